//! Change events made by hand, to write straight to a topic as if node a's capture had
//! published them: a whole source transaction inserting into `items`.

use duplex::event::{format_unix_us, ChangeEvent, Lsn, Op, Row, Source, Value};
use std::time::{SystemTime, UNIX_EPOCH};

/// The `items` table that the events of [`txn`] fit.
pub const DDL: &str =
    "CREATE TABLE items (id int PRIMARY KEY, val text, updated_at timestamptz NOT NULL)";

/// The wall clock, in microseconds since the epoch.
fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

/// Transaction `lsn` of node a, inserting `ids` (one event each, the last flagged).
pub fn txn(db: &str, lsn: u64, ids: &[i32]) -> Vec<ChangeEvent> {
    let at = now_us() - 1_000_000;
    ids.iter()
        .enumerate()
        .map(|(seq, id)| ChangeEvent {
            op: Op::Insert,
            before: None,
            after: Some(Row(vec![
                ("id".into(), Value::Text(id.to_string())),
                ("val".into(), Value::Text(format!("row {id}"))),
                ("updated_at".into(), Value::Text(format_unix_us(at))),
            ])),
            key: vec!["id".into()],
            types: [
                ("id", "integer"),
                ("val", "text"),
                ("updated_at", "timestamp with time zone"),
            ]
            .map(|(c, t)| (c.to_string(), t.to_string()))
            .into(),
            source: Source {
                node: "a".into(),
                db: db.into(),
                schema: "public".into(),
                table: "items".into(),
                lsn: Lsn(lsn),
                seq: seq as u32,
                last: seq + 1 == ids.len(),
                xid: 1000 + lsn as u32,
                commit_ts_us: at,
                stream: None,
                prev_lsn: None,
            },
            ts_ms: at / 1000,
        })
        .collect()
}
