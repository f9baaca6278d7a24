//! A table pair whose schema differs between the nodes (`[[tables]]` with `nodes`,
//! `key`, `new_key` or `columns`): the legacy/modern move, where an integer key
//! becomes a UUID, columns are renamed, values converted and foreign keys follow.
//!
//! Column entries name the column on each node under the node's own name, next to a
//! conversion: `{ legacy = "total_cents", modern = "total", scale = { legacy = 100,
//! modern = 1 } }`. Node names are the user's, so an entry is read as a map and split
//! here into names and the reserved keys [`RESERVED`].

use super::{invalid, ConfigError};
use serde::Deserialize;
use std::collections::BTreeMap;

/// Keys of a column entry that are not node names.
pub const RESERVED: [&str; 3] = ["scale", "values", "references"];

/// How a row that is new to a node gets its key there.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKeyConfig {
    /// A UUID, or a name hashed to one (see `identity::namespace`).
    pub namespace: String,
    /// Columns of the incoming row (named as on the node it comes from), in order.
    pub from: Vec<String>,
}

/// One column of a mapped table pair.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "BTreeMap<String, toml::Value>")]
pub struct ColumnMapConfig {
    /// Node name → the column's name there.
    pub names: BTreeMap<String, String>,
    /// Node name → the factor of the node's unit (a power of ten): the values are
    /// equal when each is divided by its node's factor (cents: 100, units: 1).
    pub scale: Option<BTreeMap<String, u64>>,
    /// Node name → the value list; the n-th value on one node is the n-th on the
    /// other (`{ legacy = ["P"], modern = ["pending"] }`).
    pub values: Option<BTreeMap<String, Vec<String>>>,
    /// The configured table (its `name`) whose key this column holds: the value is
    /// translated through that table's key pairing.
    pub references: Option<String>,
}

impl TryFrom<BTreeMap<String, toml::Value>> for ColumnMapConfig {
    type Error = String;

    fn try_from(map: BTreeMap<String, toml::Value>) -> Result<Self, String> {
        let mut c = ColumnMapConfig {
            names: BTreeMap::new(),
            scale: None,
            values: None,
            references: None,
        };
        for (k, v) in map {
            match k.as_str() {
                "scale" => c.scale = Some(v.try_into().map_err(|_| {
                    "scale must map each node to a whole number, like { legacy = 100, modern = 1 }"
                        .to_string()
                })?),
                "values" => {
                    c.values = Some(v.try_into().map_err(|_| {
                        "values must map each node to a list of strings".to_string()
                    })?)
                }
                "references" => match v {
                    toml::Value::String(s) => c.references = Some(s),
                    _ => return Err("references must be a configured table's name".into()),
                },
                _ => match v {
                    toml::Value::String(s) => {
                        c.names.insert(k, s);
                    }
                    _ => {
                        return Err(format!(
                            "{k:?} must be the column's name on node {k} (or one of {RESERVED:?})"
                        ))
                    }
                },
            }
        }
        Ok(c)
    }
}

/// Checks a mapped pair's settings against the node names; `field` is `tables[i]`.
pub(super) fn validate(
    field: &str,
    nodes: &[&String],
    tables: &BTreeMap<String, String>,
    key: &BTreeMap<String, String>,
    new_key: &BTreeMap<String, NewKeyConfig>,
    columns: &[ColumnMapConfig],
    table_names: &[&str],
) -> Result<(), ConfigError> {
    let is_node = |n: &String| nodes.contains(&n);
    let both = |m: &dyn Fn() -> Vec<String>, f: &str| -> Result<(), ConfigError> {
        let names = m();
        if names.len() != nodes.len() || !names.iter().all(is_node) {
            return Err(invalid(
                f,
                format!("must name exactly the nodes {nodes:?}, got {names:?}"),
            ));
        }
        Ok(())
    };
    if !tables.is_empty() {
        both(
            &|| tables.keys().cloned().collect(),
            &format!("{field}.nodes"),
        )?;
        for (n, t) in tables {
            let ok = t
                .split_once('.')
                .is_some_and(|(s, t)| !s.is_empty() && !t.is_empty() && !t.contains('.'));
            if !ok {
                return Err(invalid(
                    format!("{field}.nodes.{n}"),
                    "must be exactly schema.table",
                ));
            }
        }
    }
    if !key.is_empty() {
        both(&|| key.keys().cloned().collect(), &format!("{field}.key"))?;
    }
    for (n, rule) in new_key {
        let f = format!("{field}.new_key.{n}");
        if !nodes.contains(&n) {
            return Err(invalid(f, format!("{n:?} is not a configured node")));
        }
        if rule.namespace.is_empty() {
            return Err(invalid(
                format!("{f}.namespace"),
                "must be a UUID or a name",
            ));
        }
        if rule.from.is_empty() || rule.from.iter().any(String::is_empty) {
            return Err(invalid(
                format!("{f}.from"),
                "must name one or more columns",
            ));
        }
    }
    for (i, c) in columns.iter().enumerate() {
        let f = format!("{field}.columns[{i}]");
        both(&|| c.names.keys().cloned().collect(), &f)?;
        if let Some(scale) = &c.scale {
            both(&|| scale.keys().cloned().collect(), &format!("{f}.scale"))?;
            if scale.values().any(|v| power_of_ten(*v).is_none()) {
                return Err(invalid(
                    format!("{f}.scale"),
                    "factors must be powers of ten (1, 10, 100, ...)",
                ));
            }
        }
        if let Some(values) = &c.values {
            both(&|| values.keys().cloned().collect(), &format!("{f}.values"))?;
            let lens: Vec<usize> = values.values().map(Vec::len).collect();
            if lens.iter().any(|l| *l != lens[0] || *l == 0) {
                return Err(invalid(
                    format!("{f}.values"),
                    "needs lists of the same, non-zero length: the n-th value on one node is the n-th on the other",
                ));
            }
            for (n, list) in values {
                let mut seen = std::collections::BTreeSet::new();
                if let Some(dup) = list.iter().find(|v| !seen.insert(*v)) {
                    return Err(invalid(
                        format!("{f}.values.{n}"),
                        format!("{dup:?} appears twice: the map must work both ways"),
                    ));
                }
            }
        }
        if c.scale.is_some() && c.values.is_some() {
            return Err(invalid(f, "takes scale or values, not both"));
        }
        if let Some(r) = &c.references {
            if !table_names.contains(&r.as_str()) {
                return Err(invalid(
                    format!("{f}.references"),
                    format!("{r:?} is not the name of a configured table"),
                ));
            }
        }
    }
    Ok(())
}

/// The exponent of a power of ten.
pub fn power_of_ten(v: u64) -> Option<u32> {
    let mut n = 0;
    let mut x = v;
    while x > 1 && x.is_multiple_of(10) {
        x /= 10;
        n += 1;
    }
    (x == 1).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_splits_into_names_and_conversions() {
        let c: ColumnMapConfig = toml::from_str::<BTreeMap<String, ColumnMapConfig>>(
            "c = { legacy = \"total_cents\", modern = \"total\", scale = { legacy = 100, modern = 1 } }",
        )
        .unwrap()
        .remove("c")
        .unwrap();
        assert_eq!(c.names["legacy"], "total_cents");
        assert_eq!(c.scale.unwrap()["legacy"], 100);
        let bad = toml::from_str::<BTreeMap<String, ColumnMapConfig>>("c = { legacy = 1 }");
        assert!(bad.unwrap_err().to_string().contains("column's name"));
    }

    #[test]
    fn powers_of_ten() {
        assert_eq!(power_of_ten(1), Some(0));
        assert_eq!(power_of_ten(1000), Some(3));
        assert_eq!(power_of_ten(0), None);
        assert_eq!(power_of_ten(20), None);
    }
}
