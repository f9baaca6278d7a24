//! Copying a chunk of a mapped table (see `mapping/`): the nodes' schemas differ, so
//! rows cannot go from one COPY into the other. The chunk's source rows are read as
//! text (as the stream carries them), made into insert events, and written through
//! the same mapping and last-writer-wins writer as the stream, in one target
//! transaction that also marks the chunk copied.
//!
//! A referenced table is copied before the tables that reference it (see
//! [`levels`]), so that almost every reference finds its row's pairing. A row the
//! application made after its table was copied is paired on the target only by the
//! stream, which is applied after the copy; so is a row of the same table in a
//! chunk still to come. A reference to such a row takes it along: the chunk reads
//! the rows it references, from the same source snapshot, and writes them first,
//! through the mapping and under last-writer-wins, in the chunk's transaction (the
//! stream brings the same versions again later, and changes nothing). Only a
//! reference to a row the source itself does not hold stops the copy.
//!
//! A row whose `updated_at` is NULL cannot be ordered by last-writer-wins (the
//! writer refuses it as a bad event): it is inserted where the target has neither
//! its key nor a delete of it, and otherwise left as the target has it, since a
//! version without a time cannot be shown newer than either.

use super::copy::Marked;
use super::table::CopyTable;
use super::SnapshotError;
use crate::config::{Config, Direction};
use crate::event::{ChangeEvent, Lsn, Op, Row, Source, Value};
use crate::lww::{DeleteTimes, TargetWriter};
use crate::mapping::Mapper;
use crate::metrics::ApplyMetrics;
use crate::pg::node::SqlContext;
use crate::pg::sql::quote_ident;
use crate::pg::table::TargetTable;
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

/// A worker's session for mapped chunks: an apply-like writer under the worker's own
/// replication origin.
pub(crate) struct MappedCopier<'a> {
    cfg: &'a Config,
    writer: TargetWriter<'a>,
    /// The direction's mapping, to find the references a chunk must take along.
    mapper: Mapper,
    /// Referenced tables, by label, as both nodes have them.
    referenced: HashMap<String, CopyTable>,
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
        let mapper = Mapper::load(cfg, dir, &writer.client)
            .await
            .map_err(crate::lww::WriteError::from)?;
        Ok(MappedCopier {
            cfg,
            writer,
            mapper,
            referenced: HashMap::new(),
        })
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
        // One snapshot for the chunk and the rows it references: a referenced row
        // the snapshot lacks is one the source does not hold.
        source
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .sql(&dir.from, format!("reading {}", t.name))?;
        let copied = self.copy_in(source, dir, t, filter, chunk.as_ref()).await;
        let end = if copied.is_ok() { "COMMIT" } else { "ROLLBACK" };
        let ended = source
            .batch_execute(end)
            .await
            .sql(&dir.from, format!("ending the read of {}", t.name));
        let n = copied?;
        ended?;
        Ok(n)
    }

    async fn copy_in(
        &mut self,
        source: &Client,
        dir: &Direction,
        t: &CopyTable,
        filter: &str,
        chunk: Option<&Marked>,
    ) -> Result<u64, SnapshotError> {
        let rows = source
            .query(&t.rows_where(filter), &[])
            .await
            .sql(&dir.from, format!("reading {}", t.name))?;
        let events = events_of(dir, t, &rows);
        let n = events.len() as u64;
        let context = format!("writing rows of {}", t.name);
        self.writer.execute("BEGIN", "beginning a copy").await?;
        let written = match self.with_referenced(source, dir, t, events).await {
            Ok(events) => self.write(dir, t, events).await,
            Err(e) => Err(e),
        };
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

    /// `events` preceded by the source rows they reference that are neither paired
    /// on the target nor among them (and, in turn, by the rows those reference),
    /// read in the source transaction open on `source`. A reference the source
    /// cannot satisfy either is an error naming the row.
    async fn with_referenced(
        &mut self,
        source: &Client,
        dir: &Direction,
        t: &CopyTable,
        events: Vec<ChangeEvent>,
    ) -> Result<Vec<ChangeEvent>, SnapshotError> {
        let mut taken: Vec<ChangeEvent> = Vec::new();
        let mut asked: HashSet<(String, String)> = HashSet::new();
        loop {
            let all: Vec<ChangeEvent> = taken.iter().chain(&events).cloned().collect();
            let missing = self
                .mapper
                .unpaired_references(&self.writer.client, &all)
                .await
                .map_err(crate::lww::WriteError::from)?;
            let mut fresh = false;
            for (label, keys) in &missing {
                let keys: Vec<Vec<String>> = keys
                    .iter()
                    .filter(|k| asked.insert((label.clone(), (*k).clone())))
                    .map(|k| vec![k.clone()])
                    .collect();
                if keys.is_empty() {
                    continue;
                }
                let rt = self.referenced_table(source, dir, t, label).await?;
                let rows = source
                    .query(&rt.rows_where(&format!(" WHERE {}", rt.key_in(&keys))), &[])
                    .await
                    .sql(&dir.from, format!("reading {}", rt.name))?;
                fresh |= !rows.is_empty();
                let mut found = events_of(dir, &rt, &rows);
                found.append(&mut taken);
                taken = found;
            }
            if !fresh {
                if let Some((label, key, ev)) = first_orphan(&self.mapper, &all, &missing) {
                    return Err(bad_row(
                        dir,
                        t,
                        &ev,
                        format!(
                            "references {label} key {key}, which node {} does not hold either: set the reference right (or NULL) there",
                            dir.from
                        ),
                    ));
                }
                break;
            }
        }
        if !taken.is_empty() {
            tracing::info!(direction = %dir, table = %t.name, rows = taken.len(),
                "copying rows the chunk references that are not paired on the target yet (made after their table was copied, or in a later chunk)");
        }
        taken.extend(events);
        Ok(taken)
    }

    /// The configured table `label` as both nodes have it.
    async fn referenced_table(
        &mut self,
        source: &Client,
        dir: &Direction,
        t: &CopyTable,
        label: &str,
    ) -> Result<CopyTable, SnapshotError> {
        if label == t.name {
            return Ok(t.clone());
        }
        if let Some(rt) = self.referenced.get(label) {
            return Ok(rt.clone());
        }
        let tc = self
            .cfg
            .tables
            .iter()
            .find(|tc| tc.name == label)
            .ok_or_else(|| SnapshotError::Table {
                direction: dir.to_string(),
                table: t.name.clone(),
                detail: format!("references {label}, which is not configured"),
            })?;
        let rt = CopyTable::describe(source, &self.writer.client, dir, tc).await?;
        self.referenced.insert(label.to_string(), rt.clone());
        Ok(rt)
    }

    async fn write(
        &mut self,
        dir: &Direction,
        t: &CopyTable,
        events: Vec<ChangeEvent>,
    ) -> Result<(), SnapshotError> {
        let cows: Vec<Cow<'_, ChangeEvent>> = events.iter().map(Cow::Borrowed).collect();
        let mapped = self.writer.map(cows, DeleteTimes::default()).await?;
        if let Some((ev, reason)) = mapped.bad.first() {
            return Err(bad_row(dir, t, ev, reason.clone()));
        }
        let mut ordered = Vec::with_capacity(mapped.events.len());
        for ev in mapped.events {
            match self.unordered(t, &ev) {
                Some(table) => self.insert_if_missing(dir, &table, &ev).await?,
                None => ordered.push(ev),
            }
        }
        let applied = self.writer.apply(&ordered, &mapped.deleted).await?;
        if let Some(bad) = applied.bad.first() {
            return Err(bad_row(dir, t, &ordered[bad.index], bad.reason.clone()));
        }
        Ok(())
    }

    /// The target table of a mapped row whose `updated_at` is NULL, which
    /// last-writer-wins cannot order.
    fn unordered(&self, t: &CopyTable, ev: &ChangeEvent) -> Option<TargetTable> {
        let name = ev.source.table_name().to_string();
        let table = std::iter::once(t)
            .chain(self.referenced.values())
            .map(|c| &c.target)
            .find(|target| target.name == name)?;
        match ev.after.as_ref()?.get(&table.updated_at) {
            Some(Value::Null) if ev.op != Op::Delete => Some(table.clone()),
            _ => None,
        }
    }

    /// Inserts the mapped row `ev` unless the target holds its key, or a delete of
    /// it (a tombstone, or a truncation of the table) that a version without time
    /// cannot be shown to be newer than.
    async fn insert_if_missing(
        &self,
        dir: &Direction,
        table: &TargetTable,
        ev: &ChangeEvent,
    ) -> Result<(), SnapshotError> {
        let Some(row) = ev.after.as_ref() else {
            return Ok(());
        };
        let texts: Vec<Option<String>> = row
            .0
            .iter()
            .map(|(_, v)| match v {
                Value::Text(t) => Some(t.clone()),
                _ => None,
            })
            .collect();
        let cols: Vec<String> = row.0.iter().map(|(c, _)| quote_ident(c)).collect();
        let values: Vec<String> = row
            .0
            .iter()
            .enumerate()
            .map(|(i, (c, _))| format!("${}::text::{}", i + 1, table.type_of(c)))
            .collect();
        let key_params: Vec<String> = table
            .key
            .iter()
            .filter_map(|k| row.0.iter().position(|(c, _)| c == k))
            .map(|i| format!("${}::text", i + 1))
            .collect();
        let name_param = texts.len() + 1;
        let sql = format!(
            "INSERT INTO {t} ({cols}) OVERRIDING SYSTEM VALUE
             SELECT {values}
             WHERE NOT EXISTS (SELECT 1 FROM duplex.tombstones
                               WHERE table_name = ${name_param}::text AND key = jsonb_build_array({keys}))
               AND NOT EXISTS (SELECT 1 FROM duplex.truncations WHERE table_name = ${name_param}::text)
             ON CONFLICT ({key_cols}) DO NOTHING",
            t = table.sql_name,
            cols = cols.join(", "),
            values = values.join(", "),
            keys = key_params.join(", "),
            key_cols = table
                .key
                .iter()
                .map(|k| quote_ident(k))
                .collect::<Vec<_>>()
                .join(", "),
        );
        let mut params: Vec<&(dyn ToSql + Sync)> =
            texts.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        params.push(&table.name);
        self.writer.client.execute(&sql, &params).await.sql(
            &dir.to,
            format!(
                "copying a row of {} whose {} is NULL",
                table.name, table.updated_at
            ),
        )?;
        Ok(())
    }
}

/// A copy error naming the row `ev` (of `t`, or of the table it belongs to).
fn bad_row(dir: &Direction, t: &CopyTable, ev: &ChangeEvent, error: String) -> SnapshotError {
    let table = ev.source.table_name().to_string();
    SnapshotError::BadRow {
        direction: dir.to_string(),
        table: if table == t.source_table || table == t.target.name {
            t.name.clone()
        } else {
            table
        },
        key: key_text(ev),
        error,
    }
}

/// The first of `events` referencing a row in `missing`: (label, key, event).
fn first_orphan(
    mapper: &Mapper,
    events: &[ChangeEvent],
    missing: &HashMap<String, HashSet<String>>,
) -> Option<(String, String, ChangeEvent)> {
    events.iter().find_map(|ev| {
        mapper
            .references_of(ev)
            .into_iter()
            .find(|(label, k)| missing.get(label).is_some_and(|m| m.contains(k)))
            .map(|(label, k)| (label, k, ev.clone()))
    })
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
                prev_lsn: None,
            },
            ts_ms: now_us / 1000,
        })
        .collect()
}

fn key_text(ev: &ChangeEvent) -> String {
    let key: Vec<String> = ev
        .key
        .iter()
        .map(|k| match ev.after.as_ref().and_then(|r| r.get(k)) {
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
