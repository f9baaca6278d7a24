//! Readies a batch of consumed events for the writer: key changes split into a delete
//! and an upsert, the source's published tombstones turned into exact delete times
//! ([`DeleteTimes`]) instead of rows to apply, and the source's repairs turned back into the row change
//! (or delete) of the table they name.

use crate::event::{ChangeEvent, Op, Row, Value, REPAIRS, TOMBSTONES, TRUNCATIONS};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

pub use crate::lww::{DeleteTimes, DeletedKey};

/// Readies a batch for the writer. An update that changes the key becomes a delete
/// of the old key and an upsert. Tombstones the source published (rows of
/// `duplex.tombstones`, written by its delete trigger in the deleting transaction) are
/// not rows to apply: they give their deletes the source's exact delete time, so that
/// both nodes hold the same tombstone. A column PostgreSQL did not send (unchanged
/// TOAST) is filled in from the event's old row (under `REPLICA IDENTITY FULL`) or
/// from the key's previous version in the batch, so that whichever version of a key
/// the writer keeps carries every value the batch knows.
pub fn prepare_batch<'e>(
    events: impl Iterator<Item = &'e ChangeEvent>,
) -> (Vec<Cow<'e, ChangeEvent>>, DeleteTimes) {
    let events: Vec<&ChangeEvent> = events.collect();
    // Most batches have no unchanged-TOAST value to fill: they need no images.
    let toast = events.iter().any(|e| {
        e.after
            .as_ref()
            .is_some_and(|a| a.0.iter().any(|(_, v)| *v == Value::UnchangedToast))
    });
    let mut out = Vec::with_capacity(events.len());
    let mut deleted = DeleteTimes::default();
    let mut images = Images::default();
    for ev in events {
        let table = (ev.source.schema.as_str(), ev.source.table.as_str());
        if table == TOMBSTONES {
            if let Some((k, at)) = ev.after.as_ref().and_then(tombstone_of) {
                deleted.deleted(k, at);
            }
            continue;
        }
        if table == TRUNCATIONS {
            let row = ev.after.as_ref();
            if let (Some(t), Some(at)) = (
                row.and_then(|r| text(r, "table_name")),
                row.and_then(|r| text(r, "truncated_at")),
            ) {
                deleted.truncated_at(t, at);
            }
            continue;
        }
        if table == REPAIRS {
            if let Some((repair, tombstone)) = repair_of(ev) {
                if let Some((k, at)) = tombstone {
                    deleted.deleted(k, at);
                }
                out.push(Cow::Owned(repair));
            }
            continue;
        }
        let old_key = ev.before.as_ref().map(|b| images.key(ev, b));
        if ev.op == Op::Update {
            if let (Some(before), Some(after)) = (&ev.before, &ev.after) {
                if old_key.as_ref() != Some(&images.key(ev, after)) {
                    let mut del = ev.clone();
                    del.op = Op::Delete;
                    del.after = None;
                    del.before = Some(Row(before.0.clone()));
                    out.push(Cow::Owned(del));
                }
            }
        }
        if !toast {
            out.push(Cow::Borrowed(ev));
            continue;
        }
        // The key this event changes: its old row's, or (no old row sent) its own.
        let prior = old_key.or_else(|| ev.after.as_ref().map(|a| images.key(ev, a)));
        let ev = images.complete(ev, prior);
        out.push(ev);
    }
    (out, deleted)
}

/// How many of `events` (in order) to write now: those before the unfinished last
/// source transaction, if any. A transaction is written whole, so that its deletes
/// meet their tombstones (the source's trigger writes each later in the same
/// transaction: row triggers fire at the end of their statement) and so that the
/// target never holds row locks for a transaction whose end has not arrived (the
/// source may be down for long). The caller bounds how much it holds back.
pub fn writable_len(events: &[&ChangeEvent]) -> usize {
    let Some(last) = events.last().filter(|e| !e.source.last) else {
        return events.len();
    };
    events
        .iter()
        .rposition(|e| e.source.lsn != last.source.lsn)
        .map_or(0, |i| i + 1)
}

/// The latest image of each key seen in a batch: (table, key values) → row.
#[derive(Default)]
struct Images(HashMap<(String, Vec<Value>), Row>);

impl Images {
    fn key(&self, ev: &ChangeEvent, row: &Row) -> (String, Vec<Value>) {
        let values = ev
            .key
            .iter()
            .map(|k| row.get(k).cloned().unwrap_or(Value::Null))
            .collect();
        (ev.source.table_name().to_string(), values)
    }

    /// `ev` with its unchanged-TOAST columns filled in where the old row or the
    /// previous image of the key it changes (`prior`) has them; remembers the result
    /// as its key's image (a delete forgets it).
    fn complete<'e>(
        &mut self,
        ev: &'e ChangeEvent,
        prior: Option<(String, Vec<Value>)>,
    ) -> Cow<'e, ChangeEvent> {
        let previous = prior.as_ref().and_then(|k| self.0.remove(k));
        let Some(after) = &ev.after else {
            return Cow::Borrowed(ev);
        };
        let known = |col: &str| -> Option<Value> {
            [ev.before.as_ref(), previous.as_ref()]
                .into_iter()
                .flatten()
                .filter_map(|row| row.get(col))
                .find(|v| **v != Value::UnchangedToast)
                .cloned()
        };
        let mut filled: Option<Row> = None;
        for (i, (col, v)) in after.0.iter().enumerate() {
            if *v == Value::UnchangedToast {
                if let Some(value) = known(col) {
                    filled.get_or_insert_with(|| after.clone()).0[i].1 = value;
                }
            }
        }
        let key = self.key(ev, after);
        match filled {
            None => {
                self.0.insert(key, after.clone());
                Cow::Borrowed(ev)
            }
            Some(row) => {
                self.0.insert(key, row.clone());
                let mut ev = ev.clone();
                ev.after = Some(row);
                Cow::Owned(ev)
            }
        }
    }
}

/// A text column of a duplex row.
fn text(row: &Row, col: &str) -> Option<String> {
    match row.get(col) {
        Some(Value::Text(t)) => Some(t.clone()),
        _ => None,
    }
}

/// (table, key values) and `deleted_at` of a published tombstone row.
fn tombstone_of(row: &Row) -> Option<(DeletedKey, String)> {
    let key: Vec<String> = serde_json::from_str(&text(row, "key")?).ok()?;
    Some(((text(row, "table_name")?, key), text(row, "deleted_at")?))
}

/// The change a published repair row stands for: an upsert of the winning row, or a
/// delete at the winning tombstone's time (returned too, as for a source delete). The
/// event keeps the repair's position, so replays of it are skipped like any other.
/// Anything but an insert (duplex pruning the table) is no change.
fn repair_of(ev: &ChangeEvent) -> Option<(ChangeEvent, Option<(DeletedKey, String)>)> {
    // An insert in the transaction that wrote it, or the republisher's update of it
    // (`duplex.republish`, where the node's walsender drops applied transactions).
    let row = ev
        .after
        .as_ref()
        .filter(|_| matches!(ev.op, Op::Insert | Op::Update))?;
    let table_name = text(row, "table_name")?;
    let (schema, table) = table_name.split_once('.')?;
    let image: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&text(row, "image")?).ok()?;
    let image = Row(image
        .into_iter()
        .map(|(col, v)| {
            let v = match v {
                serde_json::Value::String(s) => Value::Text(s),
                _ => Value::Null,
            };
            (col, v)
        })
        .collect());
    let mut repair = ev.clone();
    repair.source.schema = schema.to_string();
    repair.source.table = table.to_string();
    repair.key = vec![];
    repair.types = Arc::from([]);
    match text(row, "deleted_at") {
        Some(at) => {
            let key: Vec<String> = serde_json::from_str(&text(row, "key")?).ok()?;
            (repair.op, repair.before, repair.after) = (Op::Delete, Some(image), None);
            Some((repair, Some(((table_name, key), at))))
        }
        None => {
            (repair.op, repair.before, repair.after) = (Op::Update, None, Some(image));
            Some((repair, None))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Lsn, Source};

    fn repair(image: &str, deleted_at: Option<&str>, op: Op) -> ChangeEvent {
        let mut cols = vec![
            ("id".to_string(), Value::Text("9".into())),
            ("table_name".to_string(), Value::Text("public.items".into())),
            ("key".to_string(), Value::Text("[\"5\"]".into())),
            ("image".to_string(), Value::Text(image.into())),
        ];
        cols.push((
            "deleted_at".to_string(),
            deleted_at.map_or(Value::Null, |d| Value::Text(d.into())),
        ));
        ChangeEvent {
            op,
            before: None,
            after: Some(Row(cols)),
            key: vec!["id".into()],
            types: std::sync::Arc::from([]),
            source: Source {
                node: "a".into(),
                db: "app".into(),
                schema: "duplex".into(),
                table: "repairs".into(),
                lsn: Lsn(7),
                seq: 3,
                last: true,
                xid: 1,
                commit_ts_us: 0,
                stream: None,
                prev_lsn: None,
            },
            ts_ms: 0,
        }
    }

    #[test]
    fn a_repaired_row_becomes_an_upsert_of_its_table() {
        let ev = repair(r#"{"id": "5", "body": null, "val": "x"}"#, None, Op::Insert);
        let (events, deleted) = prepare_batch([&ev].into_iter());
        assert!(deleted.is_empty());
        let e = &events[0];
        assert_eq!(
            (e.op, e.source.schema.as_str(), e.source.table.as_str()),
            (Op::Update, "public", "items")
        );
        assert_eq!(e.position(), ev.position());
        let after = e.after.as_ref().unwrap();
        assert_eq!(after.get("val"), Some(&Value::Text("x".into())));
        assert_eq!(after.get("body"), Some(&Value::Null));
    }

    #[test]
    fn a_repaired_tombstone_becomes_a_delete_at_its_time() {
        let at = "2026-11-30 04:00:00.000001+00";
        let ev = repair(r#"{"id": "5"}"#, Some(at), Op::Insert);
        let (events, deleted) = prepare_batch([&ev].into_iter());
        assert_eq!(events[0].op, Op::Delete);
        assert_eq!(
            events[0].before.as_ref().unwrap().get("id"),
            Some(&Value::Text("5".into()))
        );
        let key = ("public.items".to_string(), vec!["5".to_string()]);
        assert_eq!(deleted.get(&key).map(String::as_str), Some(at));
    }

    fn change(op: Op, id: &str, body: Value, val: &str) -> ChangeEvent {
        let mut ev = repair("{}", None, op);
        ev.source.schema = "public".into();
        ev.source.table = "items".into();
        let row = Row(vec![
            ("id".into(), Value::Text(id.into())),
            ("body".into(), body),
            ("val".into(), Value::Text(val.into())),
        ]);
        if op == Op::Delete {
            (ev.before, ev.after) = (Some(row), None);
        } else {
            ev.after = Some(row);
        }
        ev
    }

    #[test]
    fn unchanged_toast_is_filled_from_the_keys_earlier_version() {
        let big = || Value::Text("x".repeat(10));
        let events = [
            change(Op::Insert, "1", big(), "a"),
            change(Op::Update, "1", Value::UnchangedToast, "b"),
            change(Op::Delete, "1", Value::Null, ""),
            change(Op::Insert, "1", Value::UnchangedToast, "c"),
        ];
        let (out, _) = prepare_batch(events.iter());
        let body = |i: usize| out[i].after.as_ref().unwrap().get("body").cloned();
        assert_eq!(body(1), Some(big()));
        // After a delete nothing is known of the key.
        assert_eq!(body(3), Some(Value::UnchangedToast));
        // An old row under REPLICA IDENTITY FULL fills it too.
        let mut full = change(Op::Update, "2", Value::UnchangedToast, "d");
        full.before = Some(Row(vec![
            ("id".into(), Value::Text("2".into())),
            ("body".into(), Value::Text("old".into())),
        ]));
        let (out, _) = prepare_batch([&full].into_iter());
        let after = out[0].after.as_ref().unwrap();
        assert_eq!(after.get("body"), Some(&Value::Text("old".into())));
    }

    #[test]
    fn a_republished_repair_is_applied_as_the_inserted_one_is() {
        let inserted = repair(r#"{"id": "5", "val": "x"}"#, None, Op::Insert);
        let touched = repair(r#"{"id": "5", "val": "x"}"#, None, Op::Update);
        let (a, _) = prepare_batch([&inserted].into_iter());
        let (b, _) = prepare_batch([&touched].into_iter());
        assert_eq!((a.len(), b.len()), (1, 1));
        assert_eq!((a[0].op, &a[0].after), (b[0].op, &b[0].after));
    }

    #[test]
    fn pruning_repairs_is_no_change() {
        let ev = repair(r#"{"id": "5"}"#, None, Op::Delete);
        assert!(prepare_batch([&ev].into_iter()).0.is_empty());
    }

    /// An event of transaction `lsn` on `public.items`, keyed by `id`.
    fn row_event(
        op: Op,
        before: Option<&str>,
        after: Option<&str>,
        lsn: u64,
        last: bool,
    ) -> ChangeEvent {
        let row = |id: &str| Row(vec![("id".to_string(), Value::Text(id.into()))]);
        let mut ev = repair("{}", None, op);
        (ev.source.schema, ev.source.table) = ("public".into(), "items".into());
        (ev.source.lsn, ev.source.last) = (Lsn(lsn), last);
        (ev.before, ev.after) = (before.map(row), after.map(row));
        ev
    }

    #[test]
    fn an_unfinished_transaction_is_held_back_whole() {
        let t1 = row_event(Op::Insert, None, Some("9"), 1, true);
        let t2 = row_event(Op::Insert, None, Some("8"), 2, true);
        let d1 = row_event(Op::Delete, Some("1"), None, 3, false);
        let d2 = row_event(Op::Delete, Some("2"), None, 3, false);
        let n = |evs: &[&ChangeEvent]| writable_len(evs);
        assert_eq!(n(&[&t1, &t2, &d1, &d2]), 2);
        assert_eq!(n(&[&d1, &d2]), 0);
        let mut d2_last = d2;
        d2_last.source.last = true;
        assert_eq!(n(&[&t1, &d1, &d2_last]), 3);
        assert_eq!(n(&[]), 0);
    }
}
