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
use crate::pg::sql::quote_ident;
use crate::pg::table::TargetTable;
use std::collections::{HashMap, HashSet};
use tokio_postgres::Client;
use uuid::Uuid;

/// How a row new to the target gets its key there.
#[derive(Debug, Clone)]
pub enum NewKey {
    /// UUIDv5 of these source columns' values.
    Derive { namespace: Uuid, from: Vec<String> },
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
            .map_err(|source| MapError::Sql {
                node: to.to_string(),
                context: format!("reading table {}", tc.name_on(to)),
                source,
            })?
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
            let Some(col) = t.column(d) else {
                return Err(cfg_err(format!("column {d} does not exist")));
            };
            let convert = if let Some(scale) = &c.scale {
                let exp = |n: &str| scale.get(n).and_then(|f| power_of_ten(*f)).unwrap_or(0) as i32;
                Convert::Shift {
                    shift: exp(to) - exp(from),
                    integral: is_integral(&col.type_sql),
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
            },
            None => {
                let sequence: Option<String> = target
                    .query_one(
                        "SELECT pg_get_serial_sequence($1, $2)",
                        &[&t.sql_name, &target_key],
                    )
                    .await
                    .map_err(|source| MapError::Sql {
                        node: to.to_string(),
                        context: format!("reading the sequence of {}.{target_key}", t.name),
                        source,
                    })?
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
    pub async fn new_keys(
        &self,
        pairings: &Pairings<'_>,
        rows: &[(&str, &Row)],
        deleting: &HashSet<String>,
    ) -> Result<Vec<Result<String, String>>, MapError> {
        match &self.new_key {
            NewKey::Derive { namespace, from } => Ok(rows
                .iter()
                .map(|(_, row)| {
                    let values: Vec<(&str, Option<&str>)> = from
                        .iter()
                        .map(|c| match row.get(c) {
                            Some(Value::Text(t)) => (c.as_str(), Some(t.as_str())),
                            _ => (c.as_str(), None),
                        })
                        .collect();
                    identity::derive(namespace, &values)
                        .map(|u| u.to_string())
                        .map_err(|e| format!("no key on {}: {e}", self.target_table))
                })
                .collect()),
            NewKey::Allocate { sequence, matching } => {
                self.allocate(pairings, rows, sequence, matching, deleting)
                    .await
            }
        }
    }

    async fn allocate(
        &self,
        pairings: &Pairings<'_>,
        rows: &[(&str, &Row)],
        sequence: &str,
        matching: &[(String, String)],
        deleting: &HashSet<String>,
    ) -> Result<Vec<Result<String, String>>, MapError> {
        let sql_err = |context: String| {
            let node = pairings.node.to_string();
            move |source| MapError::Sql {
                node,
                context,
                source,
            }
        };
        let mut out: Vec<Option<String>> = vec![None; rows.len()];
        if !matching.is_empty() {
            // The natural key as one text per row: values joined by 0x1F.
            let natural = |row: &Row| -> Option<String> {
                let vals: Option<Vec<String>> = matching
                    .iter()
                    .map(|(s, _)| match row.get(s) {
                        Some(Value::Text(t)) => Some(t.clone()),
                        _ => None,
                    })
                    .collect();
                vals.map(|v| v.join("\u{1f}"))
            };
            let wanted: Vec<String> = rows.iter().filter_map(|(_, r)| natural(r)).collect();
            let cols: Vec<String> = matching
                .iter()
                .map(|(_, d)| format!("{}::text", quote_ident(d)))
                .collect();
            let table = self.target_table_sql();
            let found = pairings
                .client
                .query(
                    // A row already paired belongs to another of the source's
                    // rows (one deleted there and made again): it is no match.
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
                .map_err(sql_err(format!(
                    "finding rows of {} by natural key",
                    self.target_table
                )))?;
            let by_natural: HashMap<String, String> = found
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .filter(|(_, k): &(String, String)| !deleting.contains(k))
                .collect();
            for (i, (_, row)) in rows.iter().enumerate() {
                out[i] = natural(row).and_then(|n| by_natural.get(&n).cloned());
            }
        }
        let need = out.iter().filter(|o| o.is_none()).count() as i64;
        if need > 0 {
            let ids = pairings
                .client
                .query(
                    "SELECT nextval($1::text::regclass)::text FROM generate_series(1, $2::int8)",
                    &[&sequence, &need],
                )
                .await
                .map_err(sql_err(format!("taking keys from {sequence}")))?;
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
        format!("{}.{}", quote_ident(s), quote_ident(t))
    }
}
