//! Writes change events into a target node: the apply session, last-writer-wins
//! decisions, set-based upserts and deletes, tombstones, conflicts and dead letters.
//!
//! A [`TargetWriter`] owns one SQL session on the target, set up like a native
//! subscriber's: `session_replication_role = replica` (the application's triggers do
//! not fire again) under the replication origin `duplex_from_<source>` (the target's
//! reader drops these transactions, so nothing echoes back). [`TargetWriter::apply`]
//! splits events into runs of one table and kind, keeps the last event per key in a
//! run, asks the target which versions win, and writes the winners in one statement
//! per run. Transactions are the caller's: nothing here commits.

use crate::config::{Config, Direction, TableConfig};
use crate::event::{format_unix_us, ChangeEvent, Op, Row, Value};
use crate::identity;
use crate::metrics as m;
use crate::sink::target::TargetTable;
use crate::source::slot::{self, describe, sql_class, NodeError};
use crate::ErrorClass;
use std::borrow::Cow;
use std::collections::HashMap;
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

/// Errors writing to a target node.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("node {node}: {context}: {}", describe(source))]
    Sql {
        node: String,
        context: String,
        source: tokio_postgres::Error,
    },
}

impl WriteError {
    pub fn class(&self) -> ErrorClass {
        match self {
            WriteError::Node(e) => e.class(),
            WriteError::Sql { source, .. } => sql_class(source),
        }
    }
}

/// An event the target cannot take, and why.
#[derive(Debug, Clone)]
pub struct BadEvent {
    pub index: usize,
    pub reason: String,
}

/// The outcome of applying a slice of events.
#[derive(Debug, Default)]
pub struct Applied {
    pub rows: usize,
    pub conflicts: usize,
    pub bad: Vec<BadEvent>,
}

/// A version that won: event index, key values, `updated_at` (or delete time) text.
type Winner = (usize, Vec<String>, Option<String>);
/// An event's final version of a key: index, kind, key values, `updated_at` text.
type Candidate = (usize, Kind, Vec<String>, Option<String>);
/// A version that lost: as a candidate, plus the target's `updated_at` and the verdict.
type Lost = (
    usize,
    Kind,
    Vec<String>,
    Option<String>,
    Option<String>,
    String,
);

pub use crate::sink::batch::DeleteTimes;

/// One SQL session on a direction's target node.
pub struct TargetWriter<'a> {
    cfg: &'a Config,
    dir: &'a Direction,
    pub client: Client,
    tables: HashMap<String, Option<TargetTable>>,
    incoming_wins_ties: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Upsert,
    Delete,
    Truncate,
}

/// A run of events of one table: indexes into the slice being applied. `kind` is
/// `Truncate` for a truncate, else `Upsert` for row changes of any kind.
struct Run {
    table: String,
    kind: Kind,
    items: Vec<usize>,
}

impl<'a> TargetWriter<'a> {
    /// Opens the apply session on `dir.to`.
    pub async fn connect(
        cfg: &'a Config,
        dir: &'a Direction,
    ) -> Result<TargetWriter<'a>, WriteError> {
        let client = slot::connect(cfg, &dir.to, &format!("apply from {}", dir.from)).await?;
        let origin = cfg.origin_name(dir);
        let w = TargetWriter {
            cfg,
            dir,
            client,
            tables: HashMap::new(),
            incoming_wins_ties: cfg.tie_winner() == dir.from,
        };
        w.client
            .batch_execute("SET session_replication_role = replica")
            .await
            .map_err(w.sql("setting session_replication_role = replica (needs superuser or GRANT SET ON PARAMETER)"))?;
        w.client
            .execute("SELECT pg_replication_origin_session_setup($1)", &[&origin])
            .await
            .map_err(w.sql(&format!(
                "using replication origin {origin} (run duplex setup)"
            )))?;
        Ok(w)
    }

    fn sql(&self, context: &str) -> impl FnOnce(tokio_postgres::Error) -> WriteError {
        let (node, context) = (self.dir.to.clone(), context.to_string());
        move |source| WriteError::Sql {
            node,
            context,
            source,
        }
    }

    pub async fn execute(&self, sql: &str, context: &str) -> Result<(), WriteError> {
        self.client
            .batch_execute(sql)
            .await
            .map_err(self.sql(context))
    }

    async fn table(&mut self, name: &str) -> Result<Option<&TargetTable>, WriteError> {
        if !self.tables.contains_key(name) {
            let loaded = match self.cfg.tables.iter().find(|t| t.name == name) {
                Some(tc) => TargetTable::load(&self.client, tc)
                    .await
                    .map_err(self.sql(&format!("reading table {name}")))?,
                None => None,
            };
            self.tables.insert(name.to_string(), loaded);
        }
        Ok(self.tables.get(name).and_then(Option::as_ref))
    }

    /// Applies `events` in order inside the caller's transaction. Events the target
    /// cannot take for a reason found before writing (missing column or table, NULL
    /// or future `updated_at`, wrong deterministic id) come back in `Applied::bad`;
    /// a failing statement is an error, after which the caller rolls back.
    pub async fn apply(
        &mut self,
        events: &[Cow<'_, ChangeEvent>],
        deleted: &DeleteTimes,
    ) -> Result<Applied, WriteError> {
        let mut out = Applied::default();
        for run in runs(events) {
            if self.table(&run.table).await?.is_none() {
                for &i in &run.items {
                    out.bad.push(BadEvent {
                        index: i,
                        reason: format!(
                            "table {} is not configured or missing on node {}",
                            run.table, self.dir.to
                        ),
                    });
                }
                continue;
            }
            match run.kind {
                Kind::Truncate => {
                    let t = self.tables[&run.table]
                        .as_ref()
                        .map(|t| t.sql_name.clone())
                        .unwrap_or_default();
                    self.execute(
                        &format!("TRUNCATE {t}"),
                        &format!("truncating {}", run.table),
                    )
                    .await?;
                    out.rows += 1;
                }
                Kind::Upsert | Kind::Delete => {
                    self.apply_run(events, &run, deleted, &mut out).await?
                }
            }
        }
        Ok(out)
    }

    async fn apply_run(
        &mut self,
        events: &[Cow<'_, ChangeEvent>],
        run: &Run,
        deleted: &DeleteTimes,
        out: &mut Applied,
    ) -> Result<(), WriteError> {
        let Some(table) = self.tables.get(&run.table).cloned().flatten() else {
            return Ok(());
        };
        let tc = self.cfg.tables.iter().find(|t| t.name == run.table);
        // The last event per key decides the key's final state: earlier ones are
        // superseded versions from the same source. Keys are independent (foreign keys
        // do not fire in replica mode), so one statement per kind serves the table.
        let mut rows: Vec<Candidate> = Vec::new();
        let mut index_of: HashMap<Vec<String>, usize> = HashMap::new();
        for &i in &run.items {
            let kind = kind_of(&events[i]);
            match self.prepare(&events[i], &table, tc, kind, deleted) {
                Ok((key, ts)) => match index_of.get(&key) {
                    Some(&slot) => rows[slot] = (i, kind, key, ts),
                    None => {
                        index_of.insert(key.clone(), rows.len());
                        rows.push((i, kind, key, ts));
                    }
                },
                Err(reason) => out.bad.push(BadEvent { index: i, reason }),
            }
        }
        if rows.is_empty() {
            return Ok(());
        }
        let verdicts = self.decide(&table, &rows, tc).await?;
        let (mut upserts, mut deletes, mut lost) = (Vec::new(), Vec::new(), Vec::new());
        for ((i, kind, key, ts), (local, verdict)) in rows.into_iter().zip(verdicts) {
            match verdict.as_str() {
                "apply" if kind == Kind::Delete => deletes.push((i, key, ts)),
                "apply" => upserts.push((i, key, ts)),
                "older" | "tombstone" => lost.push((i, kind, key, ts, local, verdict)),
                "null_ts" => out.bad.push(BadEvent {
                    index: i,
                    reason: format!(
                        "{} is NULL: last-writer-wins cannot order this version",
                        table.updated_at
                    ),
                }),
                _ => out.bad.push(BadEvent {
                    index: i,
                    reason: format!(
                        "{} is further in the future than max_future_skew_ms allows",
                        table.updated_at
                    ),
                }),
            }
        }
        self.upsert(events, &table, &upserts).await?;
        self.delete(&table, &deletes).await?;
        out.rows += upserts.len() + deletes.len();
        out.conflicts += lost.len();
        self.record_conflicts(events, &table, &lost).await
    }

    /// Key values and the version's `updated_at` text, or why the event is bad.
    fn prepare(
        &self,
        ev: &ChangeEvent,
        table: &TargetTable,
        tc: Option<&TableConfig>,
        kind: Kind,
        deleted: &DeleteTimes,
    ) -> Result<(Vec<String>, Option<String>), String> {
        let image = if kind == Kind::Delete {
            ev.before.as_ref()
        } else {
            ev.after.as_ref()
        };
        let image = image.ok_or("the event has no row image")?;
        let key = table
            .key
            .iter()
            .map(|k| match image.get(k) {
                Some(Value::Text(t)) => Ok(t.clone()),
                _ => Err(format!("key column {k} is missing or NULL in the event")),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if kind == Kind::Delete {
            // The source's tombstone time when it published one, else the commit time.
            let at = deleted
                .get(&(table.name.clone(), key.clone()))
                .cloned()
                .unwrap_or_else(|| format_unix_us(ev.source.commit_ts_us));
            return Ok((key, Some(at)));
        }
        for (col, _) in &image.0 {
            if table.column(col).is_none() {
                return Err(format!("column {col} is missing on the target node"));
            }
        }
        if let Some(id) = tc.and_then(|t| t.identity.as_ref()) {
            check_identity(image, id)?;
        }
        let ts = match image.get(&table.updated_at) {
            Some(Value::Text(t)) => Some(t.clone()),
            Some(_) => None,
            None => {
                return Err(format!(
                    "column {} is missing from the event",
                    table.updated_at
                ))
            }
        };
        Ok((key, ts))
    }

    async fn decide(
        &self,
        table: &TargetTable,
        rows: &[Candidate],
        tc: Option<&TableConfig>,
    ) -> Result<Vec<(Option<String>, String)>, WriteError> {
        let mut keys: Vec<Vec<&str>> = vec![Vec::with_capacity(rows.len()); table.key.len()];
        for (_, _, key, _) in rows {
            for (n, v) in key.iter().enumerate() {
                keys[n].push(v);
            }
        }
        let ts: Vec<Option<&str>> = rows.iter().map(|r| r.3.as_deref()).collect();
        let skew = tc.and_then(|t| t.max_future_skew_ms).map(|v| v as i64);
        let mut params: Vec<&(dyn ToSql + Sync)> =
            keys.iter().map(|k| k as &(dyn ToSql + Sync)).collect();
        params.push(&ts);
        params.push(&table.name);
        params.push(&self.incoming_wins_ties);
        params.push(&skew);
        let result = self
            .client
            .query(&table.decide_sql(), &params)
            .await
            .map_err(self.sql(&format!("comparing versions in {}", table.name)))?;
        Ok(result.iter().map(|r| (r.get(1), r.get(3))).collect())
    }

    async fn upsert(
        &self,
        events: &[Cow<'_, ChangeEvent>],
        table: &TargetTable,
        winners: &[Winner],
    ) -> Result<(), WriteError> {
        // Rows with the same columns present go in one statement (unchanged-TOAST
        // columns are left out, so the target keeps its value).
        let mut groups: Vec<(Vec<&str>, Vec<usize>)> = Vec::new();
        for (i, _, _) in winners {
            let cols: Vec<&str> = events[*i]
                .after
                .iter()
                .flat_map(|r| r.0.iter())
                .filter(|(_, v)| *v != Value::UnchangedToast)
                .map(|(c, _)| c.as_str())
                .collect();
            match groups.iter_mut().find(|(c, _)| *c == cols) {
                Some((_, members)) => members.push(*i),
                None => groups.push((cols, vec![*i])),
            }
        }
        for (cols, members) in groups {
            let arrays: Vec<Vec<Option<&str>>> = cols
                .iter()
                .map(|c| {
                    members
                        .iter()
                        .map(|&i| match events[i].after.as_ref().and_then(|r| r.get(c)) {
                            Some(Value::Text(t)) => Some(t.as_str()),
                            _ => None,
                        })
                        .collect()
                })
                .collect();
            let mut params: Vec<&(dyn ToSql + Sync)> =
                arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
            params.push(&self.incoming_wins_ties);
            self.client
                .execute(&table.upsert_sql(&cols), &params)
                .await
                .map_err(self.sql(&format!("upserting into {}", table.name)))?;
            metrics::counter!(m::APPLY_ROWS_TOTAL, "direction" => self.dir.to_string(), "table" => table.name.clone(), "op" => "upsert").increment(members.len() as u64);
        }
        Ok(())
    }

    async fn delete(&self, table: &TargetTable, winners: &[Winner]) -> Result<(), WriteError> {
        if winners.is_empty() {
            return Ok(());
        }
        let mut keys: Vec<Vec<&str>> = vec![Vec::with_capacity(winners.len()); table.key.len()];
        for (_, key, _) in winners {
            for (n, v) in key.iter().enumerate() {
                keys[n].push(v);
            }
        }
        let ts: Vec<Option<&str>> = winners.iter().map(|w| w.2.as_deref()).collect();
        let mut params: Vec<&(dyn ToSql + Sync)> =
            keys.iter().map(|k| k as &(dyn ToSql + Sync)).collect();
        params.push(&ts);
        params.push(&table.name);
        params.push(&self.dir.from);
        self.client
            .execute(&table.delete_sql(), &params)
            .await
            .map_err(self.sql(&format!("deleting from {}", table.name)))?;
        metrics::counter!(m::APPLY_ROWS_TOTAL, "direction" => self.dir.to_string(), "table" => table.name.clone(), "op" => "delete").increment(winners.len() as u64);
        Ok(())
    }

    #[allow(clippy::type_complexity)]
    async fn record_conflicts(
        &self,
        events: &[Cow<'_, ChangeEvent>],
        table: &TargetTable,
        lost: &[Lost],
    ) -> Result<(), WriteError> {
        if lost.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = lost
            .iter()
            .map(|l| serde_json::to_string(&l.2).unwrap_or_default())
            .collect();
        let local: Vec<Option<&str>> = lost.iter().map(|l| l.4.as_deref()).collect();
        let incoming: Vec<Option<&str>> = lost.iter().map(|l| l.3.as_deref()).collect();
        let resolution: Vec<&str> = lost
            .iter()
            .map(|l| {
                if l.5 == "tombstone" {
                    "dropped_older_than_tombstone"
                } else {
                    "kept_local"
                }
            })
            .collect();
        let lsn: Vec<String> = lost
            .iter()
            .map(|l| events[l.0].position().to_string())
            .collect();
        let ops: Vec<&str> = lost
            .iter()
            .map(|l| {
                if l.1 == Kind::Delete {
                    "delete"
                } else {
                    "upsert"
                }
            })
            .collect();
        self.client
            .execute(
                "INSERT INTO duplex.conflicts (table_name, key, op, local_updated_at, incoming_updated_at, incoming_node, incoming_position, resolution)
                 SELECT $1, k::jsonb, o, l, i, $3, p, r
                 FROM unnest($2::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[]) AS u(o, k, l, i, p, r)",
                &[&table.name, &ops, &self.dir.from, &keys, &local, &incoming, &lsn, &resolution],
            )
            .await
            .map_err(self.sql("recording conflicts"))?;
        for r in &resolution {
            metrics::counter!(m::APPLY_CONFLICTS_TOTAL, "direction" => self.dir.to_string(), "table" => table.name.clone(), "resolution" => *r).increment(1);
        }
        Ok(())
    }
}

/// The event's id must be the one its natural key derives.
fn check_identity(image: &Row, id: &crate::config::IdentityConfig) -> Result<(), String> {
    let values: Vec<(&str, Option<&str>)> = id
        .from
        .iter()
        .map(|c| {
            (
                c.as_str(),
                match image.get(c) {
                    Some(Value::Text(t)) => Some(t.as_str()),
                    _ => None,
                },
            )
        })
        .collect();
    let derived = identity::derive(&identity::namespace(&id.namespace), &values)
        .map_err(|e| e.to_string())?;
    match image.get(&id.column) {
        Some(Value::Text(t)) if t.eq_ignore_ascii_case(&derived.to_string()) => Ok(()),
        Some(Value::Text(t)) => Err(format!(
            "{} is {t} but its natural key derives {derived}",
            id.column
        )),
        _ => Err(format!(
            "{} is NULL; its natural key derives {derived}",
            id.column
        )),
    }
}

/// Groups events into runs: one per table with all its row changes, in order of first
/// appearance; a truncate is a run of its own and a barrier nothing moves across.
fn runs(events: &[Cow<'_, ChangeEvent>]) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    let mut segment = 0;
    for (i, ev) in events.iter().enumerate() {
        let table = format!("{}.{}", ev.source.schema, ev.source.table);
        if ev.op == Op::Truncate {
            out.push(Run {
                table,
                kind: Kind::Truncate,
                items: vec![i],
            });
            segment = out.len();
            continue;
        }
        match out[segment..].iter_mut().find(|r| r.table == table) {
            Some(r) => r.items.push(i),
            None => out.push(Run {
                table,
                kind: Kind::Upsert,
                items: vec![i],
            }),
        }
    }
    out
}

/// How an event changes its row.
fn kind_of(ev: &ChangeEvent) -> Kind {
    match ev.op {
        Op::Insert | Op::Update => Kind::Upsert,
        Op::Delete => Kind::Delete,
        Op::Truncate => Kind::Truncate,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Lsn, Source};

    fn ev(table: &str, op: Op) -> ChangeEvent {
        ChangeEvent {
            op,
            before: None,
            after: None,
            key: vec![],
            types: vec![],
            source: Source {
                node: "a".into(),
                db: "app".into(),
                schema: "public".into(),
                table: table.into(),
                lsn: Lsn(1),
                seq: 0,
                last: false,
                xid: 1,
                commit_ts_us: 0,
            },
            ts_ms: 0,
        }
    }

    #[test]
    fn runs_group_a_table_until_a_truncate() {
        let events = [
            ev("t1", Op::Insert),
            ev("t2", Op::Insert),
            ev("t1", Op::Delete),
            ev("t1", Op::Truncate),
            ev("t1", Op::Update),
        ];
        let events: Vec<Cow<ChangeEvent>> = events.iter().map(Cow::Borrowed).collect();
        let got: Vec<(String, Vec<usize>)> = runs(&events)
            .into_iter()
            .map(|r| (r.table, r.items))
            .collect();
        let want = [
            ("public.t1", vec![0, 2]),
            ("public.t2", vec![1]),
            ("public.t1", vec![3]),
            ("public.t1", vec![4]),
        ];
        assert_eq!(got, want.map(|(t, i)| (t.to_string(), i)));
    }
}
