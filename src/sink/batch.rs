//! Readies a batch of consumed events for the writer: key changes split into a delete
//! and an upsert, and the source's published tombstones turned into exact delete
//! times instead of rows to apply.

use crate::event::{ChangeEvent, Op, Row};
use std::borrow::Cow;
use std::collections::HashMap;

/// When each deleted key was deleted on the source, from the tombstones published in
/// the same transaction: (table, key values) → `deleted_at` text.
pub type DeleteTimes = HashMap<(String, Vec<String>), String>;

/// Readies a batch for the writer. An update that changes the key becomes a delete
/// of the old key and an upsert. Tombstones the source published (rows of
/// `duplex.tombstones`, written by its delete trigger in the deleting transaction) are
/// not rows to apply: they give their deletes the source's exact delete time, so that
/// both nodes hold the same tombstone.
pub fn prepare_batch<'e>(
    events: impl Iterator<Item = &'e ChangeEvent>,
) -> (Vec<Cow<'e, ChangeEvent>>, DeleteTimes) {
    let mut out = Vec::new();
    let mut deleted = DeleteTimes::new();
    for ev in events {
        if (ev.source.schema.as_str(), ev.source.table.as_str()) == TOMBSTONES {
            if let Some((k, at)) = ev.after.as_ref().and_then(tombstone_of) {
                deleted.insert(k, at);
            }
            continue;
        }
        if ev.op == Op::Update {
            if let (Some(before), Some(after)) = (&ev.before, &ev.after) {
                let old: Vec<_> = ev.key.iter().map(|k| before.get(k)).collect();
                let new: Vec<_> = ev.key.iter().map(|k| after.get(k)).collect();
                if old != new {
                    let mut del = ev.clone();
                    del.op = Op::Delete;
                    del.after = None;
                    del.before = Some(Row(before.0.clone()));
                    out.push(Cow::Owned(del));
                }
            }
        }
        out.push(Cow::Borrowed(ev));
    }
    (out, deleted)
}

/// The table whose rows are tombstones.
pub const TOMBSTONES: (&str, &str) = ("duplex", "tombstones");

/// (table, key values) and `deleted_at` of a published tombstone row.
fn tombstone_of(row: &Row) -> Option<((String, Vec<String>), String)> {
    let text = |c: &str| match row.get(c) {
        Some(crate::event::Value::Text(t)) => Some(t.clone()),
        _ => None,
    };
    let key: Vec<String> = serde_json::from_str(&text("key")?).ok()?;
    Some(((text("table_name")?, key), text("deleted_at")?))
}
