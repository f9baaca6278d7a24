//! Owed values of a mapped pair (see `lww/owed`): a column the config maps that the
//! target lacked while the source's rows carried it. Once the target has it, the
//! settle reads the source's rows by the source's key and brings each value here in
//! the target's terms: its key through the pairing, its value converted (or, for a
//! reference, through the referenced table's pairing) as the stream would have.

use super::keys::Pairings;
use super::{MapError, Mapper};

/// Where an owed target column's values come from: the mapped pair's source table
/// and the source column whose rule leads to it.
#[derive(Debug, Clone, PartialEq)]
pub struct OwedSource {
    pub label: String,
    pub source_table: String,
    pub source_column: String,
}

/// A source row's owed value, as text: (key, value, `updated_at`).
pub type OwedRow = (String, Option<String>, Option<String>);

impl Mapper {
    /// The source of `column` of the mapped `target_table`, if the config maps a
    /// column to it.
    pub fn owed_source(&self, target_table: &str, column: &str) -> Option<OwedSource> {
        let pair = self.pairs.iter().find(|p| p.target_table == target_table)?;
        let (source_column, _) = pair.rules.iter().find(|(_, r)| r.target == column)?;
        Some(OwedSource {
            label: pair.label.clone(),
            source_table: pair.source_table.clone(),
            source_column: source_column.clone(),
        })
    }

    /// `rows` (source keys and values) as the target's: keyed by the target key
    /// paired with each, the value converted. A row without a pairing here is not
    /// on the target (gone, or not arrived: the stream brings it with the column), and
    /// a value the rule refuses, or a reference not paired here, is left out with a
    /// warning naming it.
    pub async fn owed_rows(
        &self,
        client: &tokio_postgres::Client,
        src: &OwedSource,
        rows: Vec<OwedRow>,
    ) -> Result<Vec<OwedRow>, MapError> {
        let Some(pair) = self.pairs.iter().find(|p| p.label == src.label) else {
            return Ok(Vec::new());
        };
        let Some(rule) = pair.rules.get(&src.source_column) else {
            return Ok(Vec::new());
        };
        let pairings = Pairings {
            client,
            node: &self.target,
            target_is_a: self.target_is_a,
        };
        let keys: Vec<String> = rows.iter().map(|(k, _, _)| k.clone()).collect();
        let paired = pairings.lookup(&pair.label, &keys).await?;
        let references = match &rule.references {
            Some(label) => {
                let values: Vec<String> = rows.iter().filter_map(|(_, v, _)| v.clone()).collect();
                pairings.lookup(label, &values).await?
            }
            None => Default::default(),
        };
        let mut out = Vec::with_capacity(rows.len());
        for (key, value, updated_at) in rows {
            let Some(target_key) = paired.get(&key) else {
                continue;
            };
            let value = match (value, &rule.references) {
                (None, _) => None,
                (Some(v), Some(label)) => match references.get(&v) {
                    Some(k) => Some(k.clone()),
                    None => {
                        tracing::warn!(table = %pair.target_table, key = %target_key, column = %rule.target,
                            "an owed value references {label} key {v}, which has no row paired here; left out");
                        continue;
                    }
                },
                (Some(v), None) => match rule.convert.apply(&v) {
                    Ok(v) => Some(v),
                    Err(e) => {
                        tracing::warn!(table = %pair.target_table, key = %target_key, column = %rule.target,
                            "an owed value does not convert ({e}); left out");
                        continue;
                    }
                },
            };
            out.push((target_key.clone(), value, updated_at));
        }
        Ok(out)
    }
}
