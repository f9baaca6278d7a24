//! When the source deleted each key and truncated each table, as the tombstones and
//! truncation rows it published say: the writer gives its deletes these exact times,
//! so that both nodes keep the same tombstone and decide the same way.

use std::collections::HashMap;

/// When each deleted key was deleted, and each truncated table truncated, on the
/// source, from the tombstones and truncation rows published in the same transaction.
#[derive(Debug, Default)]
pub struct DeleteTimes {
    /// (table, key values) → `deleted_at` text.
    keys: HashMap<DeletedKey, String>,
    /// table → `truncated_at` text.
    tables: HashMap<String, String>,
}

impl DeleteTimes {
    /// When the source deleted `key`, if it published it.
    pub fn get(&self, key: &DeletedKey) -> Option<&String> {
        self.keys.get(key)
    }

    /// When the source truncated `table`, if it published it.
    pub fn truncated(&self, table: &str) -> Option<&String> {
        self.tables.get(table)
    }

    /// Records that the source deleted `key` at `at` (`deleted_at` text).
    pub fn deleted(&mut self, key: DeletedKey, at: String) {
        self.keys.insert(key, at);
    }

    /// Records that the source truncated `table` at `at` (`truncated_at` text).
    pub fn truncated_at(&mut self, table: String, at: String) {
        self.tables.insert(table, at);
    }

    /// The deleted keys it holds.
    pub fn keys(&self) -> impl Iterator<Item = &DeletedKey> {
        self.keys.keys()
    }

    /// The same times for a batch mapped into the target's schema: keys `mapped`
    /// translates are renamed, other keys of mapped tables (never paired on the
    /// target) dropped; `target_of` names a mapped table's target table.
    pub fn remap(
        self,
        mapped: &HashMap<DeletedKey, DeletedKey>,
        target_of: impl Fn(&str) -> Option<String>,
    ) -> DeleteTimes {
        let mut out = DeleteTimes::default();
        for (k, at) in self.keys {
            match (mapped.get(&k), target_of(&k.0)) {
                (Some(m), _) => {
                    out.keys.insert(m.clone(), at);
                }
                (None, Some(_)) => {}
                (None, None) => {
                    out.keys.insert(k, at);
                }
            }
        }
        for (t, at) in self.tables {
            out.tables.insert(target_of(&t).unwrap_or(t), at);
        }
        out
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.tables.is_empty()
    }
}

/// A deleted key: table name and key values.
pub type DeletedKey = (String, Vec<String>);
