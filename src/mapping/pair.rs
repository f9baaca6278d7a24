//! One mapped table pair as one direction applies it: which source column becomes
//! which target column and how its value converts, which columns hold references,
//! and how a row new to the target gets its key.

use super::convert::{is_integral, Convert};
use super::keys::Pairings;
use super::MapError;
use crate::config::mapping::power_of_ten;
use crate::config::{Direction, TableConfig};
use crate::event::{ChangeEvent, Op, Row, Value};
use crate::identity;
use crate::pg::error::SqlContext;
use crate::pg::sql::quote_ident;
use crate::pg::table::TargetTable;
use std::collections::{HashMap, HashSet};
use tokio_postgres::Client;
use uuid::Uuid;

/// How a row new to the target gets its key there.
#[derive(Debug, Clone)]
pub enum NewKey {
    /// The unpaired target row holding the same values in `matching` (source column,
    /// target column; empty when the natural key is the source's key, which the
    /// target does not hold) if there is one, else UUIDv5 of the `from` source
    /// columns' values; when another live row holds that, see
    /// [`PairMap::fallback_key`].
    Derive {
        namespace: Uuid,
        from: Vec<String>,
        matching: Vec<(String, String)>,
    },
    /// The target row holding the same values in `matching` (source column, target
    /// column) if there is one, else the next value of `sequence`.
    Allocate {
        sequence: String,
        matching: Vec<(String, String)>,
    },
}

/// A source column's way to the target.
#[derive(Debug, Clone)]
pub struct ColumnRule {
    pub target: String,
    pub convert: Convert,
    /// The label of the configured table whose key the column holds.
    pub references: Option<String>,
}

/// A mapped pair, from one direction's source to its target.
#[derive(Debug, Clone)]
pub struct PairMap {
    /// The configured table's `name`: the pairing table's `table_name`.
    pub label: String,
    pub source_table: String,
    pub target_table: String,
    pub source_key: String,
    pub target_key: String,
    /// Source column → rule. A source column without one crosses under its name if
    /// the target has that column, and is left out otherwise.
    pub rules: HashMap<String, ColumnRule>,
    pub target_columns: Vec<String>,
    pub new_key: NewKey,
}

impl PairMap {
    pub async fn load(
        tc: &TableConfig,
        dir: &Direction,
        target: &Client,
    ) -> Result<PairMap, MapError> {
        let (from, to) = (dir.from.as_str(), dir.to.as_str());
        let cfg_err = |detail: String| MapError::Config {
            table: tc.name_on(to).to_string(),
            node: to.to_string(),
            detail,
        };
        let t = TargetTable::load(target, tc, to)
            .await
            .sql(to, format!("reading table {}", tc.name_on(to)))?
            .ok_or_else(|| cfg_err("the table does not exist".into()))?;
        let (Some(source_key), Some(target_key)) = (tc.key.get(from), tc.key.get(to)) else {
            return Err(cfg_err(format!(
                "a mapped table needs key = {{ {from} = \"...\", {to} = \"...\" }}"
            )));
        };
        if t.column(target_key).is_none() {
            return Err(cfg_err(format!("key column {target_key} does not exist")));
        }
        let mut rules = HashMap::new();
        for c in &tc.columns {
            let (Some(s), Some(d)) = (c.names.get(from), c.names.get(to)) else {
                continue;
            };
            // A column the target lacks yet (a migration not applied there) still
            // maps: the writer leaves its values out and records them as owed
            // (`lww/owed`), and the settle, which loads the pair again, brings them.
            let integral = t.column(d).is_some_and(|col| is_integral(&col.type_sql));
            let convert = if let Some(scale) = &c.scale {
                let exp = |n: &str| scale.get(n).and_then(|f| power_of_ten(*f)).unwrap_or(0) as i32;
                Convert::Shift {
                    shift: exp(to) - exp(from),
                    integral,
                }
            } else if let Some(values) = &c.values {
                let (src, dst) = (&values[from], &values[to]);
                Convert::Values(src.iter().cloned().zip(dst.iter().cloned()).collect())
            } else {
                Convert::None
            };
            rules.insert(
                s.clone(),
                ColumnRule {
                    target: d.clone(),
                    convert,
                    references: c.references.clone(),
                },
            );
        }
        let new_key = match tc.new_key.get(to) {
            Some(rule) => NewKey::Derive {
                namespace: identity::namespace(&rule.namespace),
                from: rule.from.clone(),
                matching: derive_matching(&rule.from, source_key, &rules, &t),
            },
            None => {
                let sequence: Option<String> = target
                    .query_one(
                        "SELECT pg_get_serial_sequence($1, $2)",
                        &[&t.sql_name, &target_key],
                    )
                    .await
                    .sql(
                        to,
                        format!("reading the sequence of {}.{target_key}", t.name),
                    )?
                    .get(0);
                let sequence = sequence.ok_or_else(|| {
                    cfg_err(format!(
                        "key column {target_key} has no sequence (serial or identity) to number rows born on {from}, and new_key.{to} gives no rule"
                    ))
                })?;
                // The other node's rule names the natural key, as this node's columns
                // (the rule reads rows coming from here); the key itself cannot match.
                let matching = tc
                    .new_key
                    .get(from)
                    .map(|r| r.from.clone())
                    .unwrap_or_default();
                let matching = if matching.iter().any(|c| c == target_key) {
                    Vec::new()
                } else {
                    matching
                        .into_iter()
                        .map(|d| {
                            let s = rules
                                .iter()
                                .find(|(_, r)| r.target == d)
                                .map_or(d.clone(), |(s, _)| s.clone());
                            (s, d)
                        })
                        .collect()
                };
                NewKey::Allocate { sequence, matching }
            }
        };
        Ok(PairMap {
            label: tc.name.clone(),
            source_table: tc.name_on(from).to_string(),
            target_table: tc.name_on(to).to_string(),
            source_key: source_key.clone(),
            target_key: target_key.clone(),
            rules,
            target_columns: t.columns.iter().map(|c| c.name.clone()).collect(),
            new_key,
        })
    }

    /// The event's source key: from the old image of a delete, else the new one.
    pub fn source_key_of(&self, ev: &ChangeEvent) -> Option<String> {
        let image = if ev.op == Op::Delete {
            ev.before.as_ref()
        } else {
            ev.after.as_ref()
        }?;
        match image.get(&self.source_key) {
            Some(Value::Text(t)) => Some(t.clone()),
            _ => None,
        }
    }

    /// (referenced table label, source key) of every non-NULL reference in the event.
    pub fn references_of<'p>(&'p self, ev: &ChangeEvent) -> Vec<(&'p str, String)> {
        let Some(after) = ev.after.as_ref().filter(|_| ev.op != Op::Delete) else {
            return Vec::new();
        };
        self.rules
            .iter()
            .filter_map(|(col, r)| match (r.references.as_deref(), after.get(col)) {
                (Some(label), Some(Value::Text(v))) => Some((label, v.clone())),
                _ => None,
            })
            .collect()
    }

    /// The target column and value for a source column, `None` when it does not
    /// cross (the key, set from the pairing; a column the target lacks).
    pub fn map_value(
        &self,
        col: &str,
        v: &Value,
        known: &HashMap<(String, String), String>,
    ) -> Result<Option<(String, Value)>, String> {
        if col == self.source_key {
            return Ok(None);
        }
        let Some(rule) = self.rules.get(col) else {
            return Ok(self
                .target_columns
                .iter()
                .any(|c| c == col)
                .then(|| (col.to_string(), v.clone())));
        };
        let value = match v {
            Value::Text(t) => match &rule.references {
                Some(label) => match known.get(&(label.clone(), t.clone())) {
                    Some(k) => Value::Text(k.clone()),
                    None => {
                        return Err(format!(
                            "references {label} key {t}, which has no row paired on this node (waited sync.reference_wait_ms)"
                        ))
                    }
                },
                None => Value::Text(rule.convert.apply(t)?),
            },
            other => other.clone(),
        };
        Ok(Some((rule.target.clone(), value)))
    }

    /// Target keys for rows new to the target, as (source key, row) in batch order.
    /// Rows `deleting` (target keys this batch deletes) are no match.
    pub async fn new_keys(
        &self,
        pairings: &Pairings<'_>,
        rows: &[(&str, &Row)],
        deleting: &HashSet<String>,
    ) -> Result<Vec<Result<String, String>>, MapError> {
        match &self.new_key {
            NewKey::Derive {
                namespace,
                from,
                matching,
            } => {
                // A row the target holds already (the same entity made on both
                // nodes within the lag, or before duplex) is that entity: deriving
                // its key would make a second row the natural key's unique index
                // refuses.
                let matched = self
                    .match_natural(pairings, rows, matching, deleting)
                    .await?;
                Ok(rows
                    .iter()
                    .zip(matched)
                    .map(|((_, row), m)| match m {
                        Some(k) => Ok(k),
                        None => self.derive(namespace, from, row, &[]),
                    })
                    .collect())
            }
            NewKey::Allocate { sequence, matching } => {
                self.allocate(pairings, rows, sequence, matching, deleting)
                    .await
            }
        }
    }

    /// UUIDv5 of the row's `from` values followed by `extra` (column, value) pairs.
    fn derive(
        &self,
        namespace: &Uuid,
        from: &[String],
        row: &Row,
        extra: &[(&str, &str)],
    ) -> Result<String, String> {
        let values: Vec<(&str, Option<&str>)> = from
            .iter()
            .map(|c| match row.get(c) {
                Some(Value::Text(t)) => (c.as_str(), Some(t.as_str())),
                _ => (c.as_str(), None),
            })
            .chain(extra.iter().map(|(c, v)| (*c, Some(*v))))
            .collect();
        identity::derive(namespace, &values)
            .map(|u| u.to_string())
            .map_err(|e| format!("no key on {}: {e}", self.target_table))
    }

    /// Another key for the new row `source_key` (image `row`) whose key is held by
    /// another live row on the target (its natural key was moved to that row, or
    /// taken there meanwhile): UUIDv5 of the natural key followed by the source key
    /// (and, from the second `attempt`, the attempt's number), so that the row is
    /// written under a key of its own rather than refused. `None` when the target
    /// numbers its keys: a number is never another row's.
    pub fn fallback_key(
        &self,
        row: &Row,
        source_key: &str,
        attempt: u32,
    ) -> Option<Result<String, String>> {
        let NewKey::Derive {
            namespace, from, ..
        } = &self.new_key
        else {
            return None;
        };
        let n = attempt.to_string();
        let mut extra = vec![(self.source_key.as_str(), source_key)];
        if attempt > 0 {
            extra.push(("attempt", n.as_str()));
        }
        Some(self.derive(namespace, from, row, &extra))
    }

    /// The natural key of `row` as one text (values joined by 0x1F), converted as
    /// its columns are; `None` when a value is NULL or does not convert.
    fn natural(&self, row: &Row, matching: &[(String, String)]) -> Option<String> {
        let vals: Option<Vec<String>> = matching
            .iter()
            .map(|(s, _)| match row.get(s) {
                Some(Value::Text(t)) => match self.rules.get(s) {
                    Some(rule) => rule.convert.apply(t).ok(),
                    None => Some(t.clone()),
                },
                _ => None,
            })
            .collect();
        vals.map(|v| v.join("\u{1f}"))
    }

    /// For each row, the key of the target row holding the same natural key
    /// (`matching`) that no source row is paired with and this batch does not
    /// delete, if there is one.
    async fn match_natural(
        &self,
        pairings: &Pairings<'_>,
        rows: &[(&str, &Row)],
        matching: &[(String, String)],
        deleting: &HashSet<String>,
    ) -> Result<Vec<Option<String>>, MapError> {
        if matching.is_empty() || rows.is_empty() {
            return Ok(vec![None; rows.len()]);
        }
        let naturals: Vec<Option<String>> = rows
            .iter()
            .map(|(_, r)| self.natural(r, matching))
            .collect();
        let wanted: Vec<&String> = naturals.iter().flatten().collect();
        let cols: Vec<String> = matching
            .iter()
            .map(|(_, d)| format!("{}::text", quote_ident(d)))
            .collect();
        let table = self.target_table_sql();
        let found = pairings
            .client
            .query(
                // A row already paired belongs to another of the source's rows (one
                // deleted there and made again, or one the natural key moved from):
                // it is no match.
                &format!(
                    "SELECT concat_ws(E'\\x1f', {c}), {k}::text FROM {table} t
                     WHERE concat_ws(E'\\x1f', {c}) = ANY($1)
                       AND NOT EXISTS (SELECT 1 FROM duplex.key_pairs kp
                                       WHERE kp.table_name = $2 AND kp.{dst} = t.{k}::text)",
                    c = cols.join(", "),
                    k = quote_ident(&self.target_key),
                    dst = if pairings.target_is_a {
                        "key_a"
                    } else {
                        "key_b"
                    },
                ),
                &[&wanted, &self.label],
            )
            .await
            .sql(
                pairings.node,
                format!("finding rows of {} by natural key", self.target_table),
            )?;
        let by_natural: HashMap<String, String> = found
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .filter(|(_, k): &(String, String)| !deleting.contains(k))
            .collect();
        Ok(naturals
            .into_iter()
            .map(|n| n.and_then(|n| by_natural.get(&n).cloned()))
            .collect())
    }

    async fn allocate(
        &self,
        pairings: &Pairings<'_>,
        rows: &[(&str, &Row)],
        sequence: &str,
        matching: &[(String, String)],
        deleting: &HashSet<String>,
    ) -> Result<Vec<Result<String, String>>, MapError> {
        let mut out = self
            .match_natural(pairings, rows, matching, deleting)
            .await?;
        let need = out.iter().filter(|o| o.is_none()).count() as i64;
        if need > 0 {
            let ids = pairings
                .client
                .query(
                    "SELECT nextval($1::text::regclass)::text FROM generate_series(1, $2::int8)",
                    &[&sequence, &need],
                )
                .await
                .sql(pairings.node, format!("taking keys from {sequence}"))?;
            let mut ids = ids.iter().map(|r| r.get::<_, String>(0));
            for o in out.iter_mut().filter(|o| o.is_none()) {
                *o = ids.next();
            }
        }
        Ok(out
            .into_iter()
            .map(|o| o.ok_or_else(|| "no key taken".to_string()))
            .collect())
    }

    pub fn target_table_sql(&self) -> String {
        let (s, t) = self
            .target_table
            .split_once('.')
            .unwrap_or(("public", &self.target_table));
        crate::event::TableName::new(s, t).quoted()
    }
}

/// The natural key a deriving target matches rows by: the rule's `from` columns as
/// the target names them (renamed by `rules`). Empty when one of them is the
/// source's key (its values are not the target's), a reference, or missing on the
/// target.
fn derive_matching(
    from: &[String],
    source_key: &str,
    rules: &HashMap<String, ColumnRule>,
    target: &TargetTable,
) -> Vec<(String, String)> {
    let mut matching = Vec::new();
    for s in from {
        let d = rules.get(s).map_or(s.as_str(), |r| r.target.as_str());
        if s == source_key
            || target.column(d).is_none()
            || rules.get(s).is_some_and(|r| r.references.is_some())
        {
            return Vec::new();
        }
        matching.push((s.clone(), d.to_string()));
    }
    matching
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::table::TargetColumn;

    fn users(new_key: NewKey) -> PairMap {
        PairMap {
            label: "public.accounts".into(),
            source_table: "public.users".into(),
            target_table: "public.accounts".into(),
            source_key: "id".into(),
            target_key: "id".into(),
            rules: HashMap::from([(
                "name".to_string(),
                ColumnRule {
                    target: "full_name".into(),
                    convert: Convert::None,
                    references: None,
                },
            )]),
            target_columns: vec!["id".into(), "email".into(), "full_name".into()],
            new_key,
        }
    }

    fn derive(from: &[&str]) -> NewKey {
        NewKey::Derive {
            namespace: identity::namespace("users"),
            from: from.iter().map(|c| c.to_string()).collect(),
            matching: Vec::new(),
        }
    }

    fn row(cols: &[(&str, &str)]) -> Row {
        Row(cols
            .iter()
            .map(|(c, v)| (c.to_string(), Value::Text(v.to_string())))
            .collect())
    }

    #[test]
    fn a_taken_derived_key_falls_back_to_the_natural_key_and_the_source_key() {
        let p = users(derive(&["email"]));
        let r = row(&[("id", "8"), ("email", "e@x")]);
        let ns = identity::namespace("users");
        let id = |v: &[(&str, Option<&str>)]| identity::derive(&ns, v).unwrap().to_string();
        assert_eq!(
            p.fallback_key(&r, "8", 0),
            Some(Ok(id(&[("email", Some("e@x")), ("id", Some("8"))])))
        );
        let second = p.fallback_key(&r, "8", 1).unwrap().unwrap();
        assert_eq!(
            second,
            id(&[
                ("email", Some("e@x")),
                ("id", Some("8")),
                ("attempt", Some("1"))
            ])
        );
        assert_ne!(second, id(&[("email", Some("e@x"))]));
        // A node that numbers its keys never needs another.
        let numbered = users(NewKey::Allocate {
            sequence: "users_id_seq".into(),
            matching: Vec::new(),
        });
        assert_eq!(numbered.fallback_key(&r, "8", 0), None);
    }

    #[test]
    fn a_deriving_node_matches_by_the_natural_key_unless_it_is_the_source_key() {
        let rules = users(derive(&["email"])).rules;
        let column = |name: &str| TargetColumn {
            name: name.into(),
            type_sql: "text".into(),
            generated: false,
        };
        let target = TargetTable {
            name: "public.accounts".into(),
            label: "public.accounts".into(),
            sql_name: "\"public\".\"accounts\"".into(),
            columns: vec![column("id"), column("email"), column("full_name")],
            key: vec!["id".into()],
            updated_at: "updated_at".into(),
        };
        let m = |from: &[&str]| {
            let from: Vec<String> = from.iter().map(|c| c.to_string()).collect();
            derive_matching(&from, "id", &rules, &target)
        };
        assert_eq!(m(&["email"]), [("email".to_string(), "email".to_string())]);
        assert_eq!(
            m(&["name"]),
            [("name".to_string(), "full_name".to_string())]
        );
        assert!(m(&["id"]).is_empty(), "the legacy id is no modern column");
        assert!(
            m(&["email", "phone"]).is_empty(),
            "phone is not on the target"
        );
    }

    #[test]
    fn a_natural_key_is_converted_as_its_column_is() {
        let mut p = users(derive(&["status"]));
        p.rules.insert(
            "status".into(),
            ColumnRule {
                target: "status".into(),
                convert: Convert::Values(HashMap::from([("P".into(), "pending".into())])),
                references: None,
            },
        );
        let matching = [
            ("status".to_string(), "status".to_string()),
            ("email".to_string(), "email".to_string()),
        ];
        let r = row(&[("status", "P"), ("email", "e@x")]);
        assert_eq!(p.natural(&r, &matching), Some("pending\u{1f}e@x".into()));
        let outside = row(&[("status", "Q"), ("email", "e@x")]);
        assert_eq!(p.natural(&outside, &matching), None);
        assert_eq!(p.natural(&row(&[("status", "P")]), &matching), None);
    }
}
