//! Value conversions of mapped columns, on PostgreSQL's text output: a decimal
//! shift (cents ↔ units) and a value map ('P' ↔ 'pending'). Anything else crosses
//! as text and is cast to the target column's type by the writer, as every value is
//! (char(1) ↔ text, int ↔ bigint, a UTC `timestamp` ↔ `timestamptz`: every duplex
//! session runs with TimeZone UTC).
//!
//! A conversion that cannot be exact is an error naming the value, never a rounded
//! or defaulted write.

use std::collections::HashMap;

/// How a value changes on its way to the target.
#[derive(Debug, Clone, PartialEq)]
pub enum Convert {
    None,
    /// target = source × 10^shift; `integral` when the target column holds integers.
    Shift {
        shift: i32,
        integral: bool,
    },
    /// source text → target text.
    Values(HashMap<String, String>),
}

impl Convert {
    /// The target's text for the source's `v`.
    pub fn apply(&self, v: &str) -> Result<String, String> {
        match self {
            Convert::None => Ok(v.to_string()),
            Convert::Shift { shift, integral } => shift_decimal(v, *shift, *integral),
            Convert::Values(map) => map.get(v).cloned().ok_or_else(|| {
                let mut known: Vec<&String> = map.keys().collect();
                known.sort();
                format!("value {v:?} is outside the value map {known:?}")
            }),
        }
    }
}

/// `v` (a decimal as PostgreSQL prints it) × 10^shift, exactly.
pub fn shift_decimal(v: &str, shift: i32, integral: bool) -> Result<String, String> {
    let bad = || format!("{v:?} is not a decimal number");
    let (neg, digits) = match v.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, v),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if int.is_empty() && frac.is_empty()
        || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    // All digits, and where the decimal point sits after the shift.
    let all: String = format!("{int}{frac}");
    let point = int.len() as i64 + i64::from(shift);
    let (mut int, mut frac) = if point <= 0 {
        (
            String::new(),
            format!("{}{all}", "0".repeat((-point) as usize)),
        )
    } else if point as usize >= all.len() {
        (
            format!("{all}{}", "0".repeat(point as usize - all.len())),
            String::new(),
        )
    } else {
        let (i, f) = all.split_at(point as usize);
        (i.to_string(), f.to_string())
    };
    while frac.ends_with('0') {
        frac.pop();
    }
    let trimmed = int.trim_start_matches('0').to_string();
    int = if trimmed.is_empty() {
        "0".into()
    } else {
        trimmed
    };
    if integral && !frac.is_empty() {
        return Err(format!(
            "{v} × 10^{shift} = {int}.{frac} is not a whole number, and the target column holds integers"
        ));
    }
    let zero = int == "0" && frac.is_empty();
    let sign = if neg && !zero { "-" } else { "" };
    Ok(if frac.is_empty() {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{frac}")
    })
}

/// Whether a column of this type (as `format_type` prints it) holds only integers.
pub fn is_integral(type_sql: &str) -> bool {
    matches!(type_sql, "smallint" | "integer" | "bigint")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cents_to_units_and_back() {
        assert_eq!(shift_decimal("1234", -2, false).unwrap(), "12.34");
        assert_eq!(shift_decimal("5", -2, false).unwrap(), "0.05");
        assert_eq!(shift_decimal("-5", -2, false).unwrap(), "-0.05");
        assert_eq!(shift_decimal("1200", -2, false).unwrap(), "12");
        assert_eq!(shift_decimal("12.34", 2, true).unwrap(), "1234");
        assert_eq!(shift_decimal("12.30", 2, true).unwrap(), "1230");
        assert_eq!(shift_decimal("0.00", 2, true).unwrap(), "0");
        assert_eq!(shift_decimal("-0.00", 2, true).unwrap(), "0");
        assert_eq!(shift_decimal("7", 3, true).unwrap(), "7000");
        assert_eq!(shift_decimal("12.34", 0, false).unwrap(), "12.34");
    }

    #[test]
    fn inexact_or_malformed_values_are_errors() {
        let e = shift_decimal("12.345", 2, true).unwrap_err();
        assert!(e.contains("not a whole number"), "{e}");
        assert!(shift_decimal("NaN", 2, false).is_err());
        assert!(shift_decimal("1e5", 2, false).is_err());
        assert!(shift_decimal("", 2, false).is_err());
        assert!(shift_decimal("-", 2, false).is_err());
    }

    #[test]
    fn value_maps_name_the_value_they_lack() {
        let c = Convert::Values(HashMap::from([("P".to_string(), "pending".to_string())]));
        assert_eq!(c.apply("P").unwrap(), "pending");
        let e = c.apply("X").unwrap_err();
        assert!(e.contains("\"X\"") && e.contains("[\"P\"]"), "{e}");
    }
}
