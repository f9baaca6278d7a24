//! SQL text and SQLSTATEs, the same for every session duplex opens: how values are
//! printed, how names and strings are quoted, and the one policy that splits server
//! errors into transient (retry) and definite (stop and say what to fix).

use crate::ErrorClass;

/// Session settings that fix how values are printed, so the text that reaches Kafka
/// does not depend on the server's or role's defaults; and how string literals are
/// read: with `standard_conforming_strings` off (a database's or role's setting), a
/// backslash in a key spliced into SQL would escape the quote closing its literal.
pub const OUTPUT_SETTINGS: &[(&str, &str)] = &[
    ("DateStyle", "ISO, MDY"),
    ("IntervalStyle", "postgres"),
    ("TimeZone", "UTC"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
    ("client_encoding", "UTF8"),
    ("standard_conforming_strings", "on"),
];

/// Splits SQLSTATEs into those that go away by themselves and those an operator fixes.
pub fn class_of_sqlstate(code: &str) -> ErrorClass {
    match code {
        // Object in use, lock or statement timeout, shutdown/crash/cannot-connect-now,
        // idle timeouts, serialization failure, deadlock, a read-only node (failover).
        "55006" | "55P03" | "57014" | "57P01" | "57P02" | "57P03" | "57P05" | "25P03" | "40001"
        | "40P01" | "25006" => ErrorClass::Transient,
        // Configuration limits (max_locks_per_transaction, ...) need the operator.
        "53400" => ErrorClass::Definite,
        // Connection errors, insufficient resources, system and I/O errors.
        c if c.starts_with("08") || c.starts_with("53") || c.starts_with("58") => {
            ErrorClass::Transient
        }
        // Auth, privileges, missing objects, bad data, constraint violations.
        _ => ErrorClass::Definite,
    }
}

/// Quotes an SQL identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes an SQL string literal as PostgreSQL's `quote_literal()` does: a string with
/// a backslash becomes an escape string (`E'...'`, backslashes doubled), which reads
/// the same whatever `standard_conforming_strings` is; others a plain literal, which
/// does too when it has no backslash.
pub fn quote_literal(s: &str) -> String {
    match s.contains('\\') {
        true => format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''")),
        false => format!("'{}'", s.replace('\'', "''")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_are_classified() {
        assert_eq!(class_of_sqlstate("28P01"), ErrorClass::Definite);
        assert_eq!(class_of_sqlstate("42704"), ErrorClass::Definite);
        assert_eq!(class_of_sqlstate("55006"), ErrorClass::Transient);
        assert_eq!(class_of_sqlstate("08006"), ErrorClass::Transient);
        assert_eq!(class_of_sqlstate("57P01"), ErrorClass::Transient);
        // Timeouts, resource shortages, a read-only node and I/O errors pass by
        // themselves; bad data, constraints, missing columns, config limits do not.
        for code in "55P03 57014 53100 53200 53300 25006 25P03 58030 40001 40P01".split(' ') {
            assert_eq!(class_of_sqlstate(code), ErrorClass::Transient, "{code}");
        }
        for code in "22P02 23505 23514 42703 53400 42501".split(' ') {
            assert_eq!(class_of_sqlstate(code), ErrorClass::Definite, "{code}");
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal(r"x\') OR (1=1) --"), r"E'x\\'') OR (1=1) --'");
        assert_eq!(quote_literal(r"tab\there"), r"E'tab\\there'");
    }
}
