//! Copying a chunk of a mapped table (see `mapping/`): the nodes' schemas differ, so
//! rows cannot go from one COPY into the other. The chunk's source rows are read as
//! text (as the stream carries them), made into insert events, and written through
//! the same mapping and last-writer-wins writer as the stream, in one target
//! transaction that also marks the chunk copied.
//!
//! A referenced table is copied before the tables that reference it (see
//! [`levels`]), so that every reference finds its row's pairing.

use super::copy::Marked;
use super::table::CopyTable;
use super::SnapshotError;
use crate::apply::writer::{DeleteTimes, TargetWriter};
use crate::config::{Config, Direction};
use crate::event::{ChangeEvent, Lsn, Op, Row, Source, Value};
use crate::metrics::ApplyMetrics;
use crate::pg::node::sql_err;
use std::borrow::Cow;
use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio_postgres::Client;

/// A worker's session for mapped chunks: an apply-like writer under the worker's own
/// replication origin.
pub(crate) struct MappedCopier<'a> {
    writer: TargetWriter<'a>,
}

impl<'a> MappedCopier<'a> {
    pub(crate) async fn connect(
        cfg: &'a Config,
        dir: &'a Direction,
        origin: &str,
        n: usize,
    ) -> Result<MappedCopier<'a>, SnapshotError> {
        let metrics =
            ApplyMetrics::new(&dir.to_string(), cfg.tables.iter().map(|t| t.name.as_str()));
        let purpose = format!("snapshot {dir} #{n} mapped");
        let writer = TargetWriter::connect_as(cfg, dir, metrics, origin, &purpose).await?;
        Ok(MappedCopier { writer })
    }

    /// Copies the rows of `t` matching `filter` (` WHERE ...`) from `source` through
    /// the mapping in one transaction, marking `chunk` copied in it if given (the
    /// copy is rolled back if its plan was replaced meanwhile); returns the rows.
    pub(crate) async fn copy(
        &mut self,
        source: &Client,
        dir: &Direction,
        t: &CopyTable,
        filter: &str,
        chunk: Option<Marked>,
    ) -> Result<u64, SnapshotError> {
        let rows = source
            .query(&t.rows_where(filter), &[])
            .await
            .map_err(sql_err(&dir.from, format!("reading {}", t.name)))?;
        let events = events_of(dir, t, &rows);
        let n = events.len() as u64;
        let context = format!("writing rows of {}", t.name);
        self.writer.execute("BEGIN", "beginning a copy").await?;
        let written = self.write(dir, t, events).await;
        if let Err(e) = written {
            let _ = self.writer.execute("ROLLBACK", "rolling back a copy").await;
            return Err(e);
        }
        if let Some(chunk) = chunk {
            if !chunk.mark(&self.writer.client, dir, &t.name, n).await? {
                self.writer
                    .execute("ROLLBACK", "rolling back a copy")
                    .await?;
                return Err(chunk.replanned(dir, &t.name));
            }
        }
        self.writer.execute("COMMIT", &context).await?;
        Ok(n)
    }

    async fn write(
        &mut self,
        dir: &Direction,
        t: &CopyTable,
        events: Vec<ChangeEvent>,
    ) -> Result<(), SnapshotError> {
        let bad_row = |ev: &ChangeEvent, error: String| SnapshotError::BadRow {
            direction: dir.to_string(),
            table: t.name.clone(),
            key: key_text(t, ev),
            error,
        };
        let cows: Vec<Cow<'_, ChangeEvent>> = events.iter().map(Cow::Borrowed).collect();
        let mapped = self.writer.map(cows, DeleteTimes::default()).await?;
        if let Some((ev, reason)) = mapped.bad.first() {
            return Err(bad_row(ev, reason.clone()));
        }
        let applied = self.writer.apply(&mapped.events, &mapped.deleted).await?;
        if let Some(bad) = applied.bad.first() {
            return Err(bad_row(&mapped.events[bad.index], bad.reason.clone()));
        }
        Ok(())
    }
}

/// The chunk's rows as insert events of the source table.
fn events_of(dir: &Direction, t: &CopyTable, rows: &[tokio_postgres::Row]) -> Vec<ChangeEvent> {
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64);
    let (schema, table) = t
        .source_table
        .split_once('.')
        .unwrap_or(("public", &t.source_table));
    let n = rows.len();
    rows.iter()
        .enumerate()
        .map(|(i, r)| ChangeEvent {
            op: Op::Insert,
            before: None,
            after: Some(Row(t
                .columns
                .iter()
                .enumerate()
                .map(|(c, name)| {
                    let v: Option<String> = r.get(c);
                    (name.clone(), v.map_or(Value::Null, Value::Text))
                })
                .collect())),
            key: t.key.iter().map(|(k, _)| k.clone()).collect(),
            types: std::sync::Arc::from([]),
            source: Source {
                node: dir.from.clone(),
                db: String::new(),
                schema: schema.to_string(),
                table: table.to_string(),
                lsn: Lsn::ZERO,
                seq: i as u32,
                last: i + 1 == n,
                xid: 0,
                commit_ts_us: now_us,
                stream: None,
            },
            ts_ms: now_us / 1000,
        })
        .collect()
}

fn key_text(t: &CopyTable, ev: &ChangeEvent) -> String {
    let key: Vec<String> = t
        .key
        .iter()
        .map(|(k, _)| match ev.after.as_ref().and_then(|r| r.get(k)) {
            Some(Value::Text(v)) => v.clone(),
            _ => String::new(),
        })
        .collect();
    serde_json::to_string(&key).unwrap_or_default()
}

/// Copy order: a mapped table that references another configured table comes after
/// it (level = 1 + the highest level it references); unmapped tables are level 0.
pub(crate) fn levels(cfg: &Config) -> HashMap<String, usize> {
    let mut level: HashMap<String, usize> =
        cfg.tables.iter().map(|t| (t.name.clone(), 0)).collect();
    // References form no cycle in practice; the bound keeps a cycle from looping.
    for _ in 0..cfg.tables.len() {
        let mut changed = false;
        for t in &cfg.tables {
            let deepest = t
                .columns
                .iter()
                .filter_map(|c| c.references.as_ref())
                .filter(|r| **r != t.name)
                .filter_map(|r| level.get(r).map(|l| l + 1))
                .max()
                .unwrap_or(0);
            if level[&t.name] < deepest {
                level.insert(t.name.clone(), deepest);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    level
}
