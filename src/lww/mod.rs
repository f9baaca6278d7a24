//! The last-writer-wins writer into a node, shared by what writes rows there: the
//! apply worker (a peer's changes), the initial copy's merge and the dead-letter
//! replay. It sits below all three, so none of them imports another to write.
//!
//! Modules: `decide` holds the rules (which version of a key wins, ties, tombstones),
//! `runs` cuts a batch into runs of one table, `statements` and `sql` build the
//! set-based SQL, `toast` fills in values PostgreSQL did not send, `mapped` writes
//! through the legacy/modern mapping, `deletes` carries the source's delete times.
//!
//! A [`TargetWriter`] owns one SQL session on the target, set up like a native
//! subscriber's: `session_replication_role = replica` (the application's triggers do
//! not fire again) under the replication origin `duplex_from_<source>` (the target's
//! reader drops these transactions, so nothing echoes back). [`TargetWriter::apply`]
//! splits events into runs of one table, keeps the highest version per key in a run,
//! and writes the upserts in one statement per set of columns that decides which win
//! and returns what it wrote; the deletes, and the upserts not written, go through
//! one decision statement, then the winning deletes are written. Transactions are the
//! caller's: nothing here commits.

use crate::config::{Config, Direction, TableConfig};
use crate::event::{format_unix_us, ChangeEvent, Row, Value};
use crate::identity;
use crate::metrics::ApplyMetrics;
use crate::pg::error::SqlError;
use crate::pg::node::{self, NodeError};
use crate::pg::table::TargetTable;
use crate::{Classify, ErrorClass};
use decide::{Candidate, Lost, Resolution, Verdict};
use runs::{kind_of, runs, Kind, Run};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Mutex;
use tokio_postgres::{Client, Statement};

/// Statements a session keeps prepared, at most: past that the cache starts over
/// (distinct statements are one per table and set of columns present).
const PREPARED_MAX: usize = 256;

/// `deadlock_timeout` of apply sessions, in ms: below the application's (1 s by
/// default), so that duplex is the one to give up in a deadlock.
const APPLY_DEADLOCK_TIMEOUT_MS: u64 = 100;

/// Planner settings while a batch is written (see [`TargetWriter::apply`]).
const KEYED_PLANS: &str = "SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off";
const DEFAULT_PLANS: &str = "RESET enable_hashjoin; RESET enable_mergejoin";

/// Apply sessions commit without waiting for the WAL flush, as native subscriptions
/// do: the position commits in the same transaction as the rows, so a commit the
/// node loses in a crash loses its position too and is applied again from Kafka. (The
/// node's walsender sends only flushed WAL: a lost commit was never published on.)
const SESSION_COMMIT: &str = "SET synchronous_commit = off";

mod away;
mod decide;
mod deletes;
mod mapped;
pub mod owed;
mod probe;
mod runs;
pub mod settle;
pub mod sql;
mod statements;
mod toast;

pub use away::Away;
pub use deletes::{DeleteTimes, DeletedKey};

/// Errors writing to a target node.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Sql(#[from] SqlError),
    #[error("node {node}: {detail}")]
    Internal { node: String, detail: String },
    #[error(transparent)]
    Map(#[from] crate::mapping::MapError),
}

impl Classify for WriteError {
    fn class(&self) -> ErrorClass {
        match self {
            WriteError::Node(e) => e.class(),
            WriteError::Sql(e) => e.class(),
            WriteError::Internal { .. } => ErrorClass::Definite,
            WriteError::Map(e) => e.class(),
        }
    }
}

impl WriteError {
    /// For a transaction that lost to a concurrent one (deadlock, serialization
    /// failure, lock timeout), the reason: rolling back and writing it again succeeds
    /// once the other has finished.
    pub fn retry_in_place(&self) -> Option<&'static str> {
        let WriteError::Sql(e) = self else {
            return None;
        };
        match e.code()? {
            "40P01" => Some("deadlock"),
            "40001" => Some("serialization_failure"),
            "55P03" => Some("lock_timeout"),
            _ => None,
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
    /// Columns the target lacks, whose values were left out (recorded on the target).
    pub owed: owed::OwedColumns,
}

/// One SQL session on a direction's target node.
pub struct TargetWriter<'a> {
    cfg: &'a Config,
    dir: &'a Direction,
    pub client: Client,
    /// The session's server process, for whoever watches it (`apply::watchdog`).
    pub backend_pid: i32,
    tables: HashMap<String, Option<TargetTable>>,
    /// The batch statements prepared on this session, by their text: parsed once per
    /// session, not once per batch (a round trip and a parse each).
    prepared: Mutex<HashMap<String, Statement>>,
    incoming_wins_ties: bool,
    /// The peer receives from this node, so repairs written here reach it.
    peer_receives: bool,
    /// This direction's metric handles.
    pub metrics: ApplyMetrics,
    /// The direction's mapped tables (see `mapping/`).
    mapper: crate::mapping::Mapper,
    /// Marks the session's waits elsewhere, for its watchdog.
    pub(crate) away: Away,
}

impl<'a> TargetWriter<'a> {
    /// Opens the apply session on `dir.to`.
    pub async fn connect(
        cfg: &'a Config,
        dir: &'a Direction,
        metrics: ApplyMetrics,
    ) -> Result<TargetWriter<'a>, WriteError> {
        let purpose = format!("apply from {}", dir.from);
        Self::connect_as(cfg, dir, metrics, &cfg.origin_name(dir), &purpose).await
    }

    /// Opens a session on `dir.to` writing under replication origin `origin` (which
    /// must exist), named `purpose` in `pg_stat_activity`.
    pub async fn connect_as(
        cfg: &'a Config,
        dir: &'a Direction,
        metrics: ApplyMetrics,
        origin: &str,
        purpose: &str,
    ) -> Result<TargetWriter<'a>, WriteError> {
        let client = node::connect(cfg, &dir.to, purpose).await?;
        let origin = origin.to_string();
        let mapper = crate::mapping::Mapper::load(cfg, dir, &client).await?;
        let mut w = TargetWriter {
            cfg,
            dir,
            mapper,
            client,
            backend_pid: 0,
            tables: HashMap::new(),
            prepared: Mutex::new(HashMap::new()),
            metrics,
            incoming_wins_ties: cfg.tie_winner() == dir.from,
            peer_receives: cfg
                .directions()
                .unwrap_or_default()
                .iter()
                .any(|d| d.from == dir.to && d.to == dir.from),
            away: Default::default(),
        };
        w.client
            .batch_execute("SET session_replication_role = replica")
            .await
            .map_err(w.sql("setting session_replication_role = replica (needs superuser or GRANT SET ON PARAMETER)"))?;
        w.client
            .batch_execute(SESSION_COMMIT)
            .await
            .map_err(w.sql("setting synchronous_commit = off"))?;
        w.use_origin(&origin, purpose).await?;
        // The node too should notice when duplex is gone (a dead route, a host that
        // died): its session holds the origin the next session needs.
        w.client
            .batch_execute(&node::keepalive_sql(cfg))
            .await
            .map_err(w.sql("setting TCP keepalives"))?;
        w.backend_pid = w
            .client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .map_err(w.sql("reading the session's server process"))?
            .get(0);
        // In a deadlock with the application, the session that waited deadlock_timeout
        // first gives up: let that be duplex, which writes its transaction again,
        // rather than the application, which would see an error.
        if let Err(e) = w
            .client
            .batch_execute(&format!(
                "SET deadlock_timeout = {APPLY_DEADLOCK_TIMEOUT_MS}"
            ))
            .await
        {
            tracing::warn!(direction = %dir, error = %node::describe(&e),
                "cannot lower deadlock_timeout for apply sessions (GRANT SET ON PARAMETER deadlock_timeout TO the duplex role): in a deadlock with duplex, the application's transaction may be the one aborted");
        }
        Ok(w)
    }

    /// Sets the session's replication origin. The origin takes one session at a time:
    /// one of this component's earlier sessions may still hold it on the node after
    /// duplex gave it up (its connection stalled, so the node never heard it close).
    /// The caller holds the component's lease, so such a session, silent for longer
    /// than `sync.receive_timeout_ms`, works for no one: it is ended and the origin
    /// taken.
    async fn use_origin(&self, origin: &str, purpose: &str) -> Result<(), WriteError> {
        let context = format!("using replication origin {origin} (run duplex setup)");
        let setup = "SELECT pg_replication_origin_session_setup($1)";
        match self.client.execute(setup, &[&origin]).await {
            Err(e) if e.code().is_some_and(|c| c.code() == "55006") => {
                let silent_s = self.cfg.sync.receive_timeout_ms as f64 / 1000.0;
                let ended = self
                    .client
                    .query(
                        "SELECT pid, duplex.terminate_backend(pid, 5000) FROM pg_stat_activity
                         WHERE datname = current_database() AND application_name = $1
                           AND pid <> pg_backend_pid() AND state LIKE 'idle%'
                           AND clock_timestamp() - state_change > $2 * interval '1 second'",
                        &[&format!("duplex {purpose}"), &silent_s],
                    )
                    .await
                    .map_err(self.sql("looking for the session holding the origin"))?;
                if ended.is_empty() {
                    return Err(self.sql(&context)(e));
                }
                let pids: Vec<i32> = ended.iter().map(|r| r.get(0)).collect();
                tracing::warn!(direction = %self.dir, origin, ?pids, "ended an earlier session of this component that still held the replication origin, silent for longer than sync.receive_timeout_ms");
                self.client.execute(setup, &[&origin]).await.map(drop)
            }
            other => other.map(drop),
        }
        .map_err(self.sql(&context))
    }

    fn sql(&self, context: &str) -> impl FnOnce(tokio_postgres::Error) -> WriteError {
        let on = SqlError::on(&self.dir.to, context.to_string());
        move |source| WriteError::Sql(on(source))
    }

    /// `sql` prepared on this session, from the cache when it was before.
    async fn prepared(&self, sql: String) -> Result<Statement, tokio_postgres::Error> {
        let cached = self.prepared.lock().ok().and_then(|m| m.get(&sql).cloned());
        if let Some(statement) = cached {
            return Ok(statement);
        }
        let statement = self.client.prepare(&sql).await?;
        if let Ok(mut m) = self.prepared.lock() {
            if m.len() >= PREPARED_MAX {
                m.clear();
            }
            m.insert(sql, statement.clone());
        }
        Ok(statement)
    }

    /// Runs the batch statement `sql`, prepared once per session, with `params`.
    async fn query_prepared(
        &self,
        sql: String,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        context: &str,
    ) -> Result<Vec<tokio_postgres::Row>, WriteError> {
        let statement = self.prepared(sql).await.map_err(self.sql(context))?;
        self.client
            .query(&statement, params)
            .await
            .map_err(self.sql(context))
    }

    pub async fn execute(&self, sql: &str, context: &str) -> Result<(), WriteError> {
        self.client
            .batch_execute(sql)
            .await
            .map_err(self.sql(context))
    }

    /// Removes, in every configured table, rows older than a tombstone of their key
    /// recorded in the last `window_ms` (see [`TargetTable::sweep_sql`]). Runs outside
    /// any transaction, under the apply session's origin: the peer has the tombstone
    /// already. Returns how many rows went.
    pub async fn sweep(&mut self, window_ms: i64) -> Result<u64, WriteError> {
        let mut removed = 0;
        for tc in &self.cfg.tables {
            let Some(t) = self.table(tc.name_on(&self.dir.to)).await?.cloned() else {
                continue;
            };
            removed += self
                .client
                .execute(&t.sweep_sql(), &[&t.name, &window_ms])
                .await
                .map_err(self.sql(&format!(
                    "removing rows older than their tombstone in {}",
                    t.name
                )))?;
        }
        Ok(removed)
    }

    async fn table(&mut self, name: &str) -> Result<Option<&TargetTable>, WriteError> {
        if !self.tables.contains_key(name) {
            let loaded = match self.cfg.table_on(&self.dir.to, name) {
                Some(tc) => TargetTable::load(&self.client, tc, &self.dir.to)
                    .await
                    .map_err(self.sql(&format!("reading table {name}")))?,
                None => None,
            };
            self.tables.insert(name.to_string(), loaded);
        }
        Ok(self.tables.get(name).and_then(Option::as_ref))
    }

    /// Applies `events` in order inside the caller's transaction. Events the target
    /// cannot take for a reason found before writing (missing table, NULL or future
    /// `updated_at`, wrong deterministic id) come back in `Applied::bad`; columns the
    /// target lacks are left out and recorded as owed (`Applied::owed`, and
    /// `duplex.owed_columns` in the same transaction); a failing statement is an
    /// error, after which the caller rolls back.
    pub async fn apply(
        &mut self,
        events: &[Cow<'_, ChangeEvent>],
        deleted: &DeleteTimes,
    ) -> Result<Applied, WriteError> {
        // Every statement below joins a batch of keys to a table by its primary key
        // (and to duplex's tables by theirs): one index probe per key. The planner,
        // seeing thousands of keys, prefers hashing the whole table, a scan that grows
        // with the table (150 ms per 5,000 keys at 200,000 rows, against 30 ms for the
        // probes): keep these to nested loops. (Only these: the mapping's matches by
        // natural key and the maintenance sweeps may need a hash join.) A failure
        // rolls the setting back with the caller's savepoint.
        self.execute(KEYED_PLANS, "choosing keyed plans").await?;
        let out = self.apply_runs(events, deleted).await?;
        self.execute(DEFAULT_PLANS, "restoring the planner settings")
            .await?;
        if !out.owed.is_empty() {
            self.record_owed(&out.owed).await?;
        }
        Ok(out)
    }

    async fn apply_runs(
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
                    self.truncate(&events[run.items[0]], &run.table, deleted)
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
        let Some(table) = self.current_table(events, run).await? else {
            return Ok(());
        };
        let tc = self.cfg.table_on(&self.dir.to, &run.table);
        // One version per key goes on: the highest, as applying the events one by one
        // under last-writer-wins would leave. Keys are independent (foreign keys do not
        // fire in replica mode), so one statement per kind serves the table.
        let mut rows: Vec<Candidate> = Vec::new();
        let mut index_of: HashMap<Vec<String>, usize> = HashMap::new();
        // The last row whose columns were checked against the target's (see
        // `owed::OwedColumns::note_missing`).
        let mut checked: Option<&Row> = None;
        for &index in &run.items {
            let kind = kind_of(&events[index]);
            if kind != Kind::Delete {
                out.owed.note_missing(&events[index], &table, &mut checked);
            }
            match self.prepare(&events[index], &table, tc, kind, deleted) {
                Ok((key, ts)) => {
                    let c = Candidate {
                        index,
                        kind,
                        key,
                        ts,
                        repair: false,
                    };
                    match index_of.get(&c.key) {
                        Some(&slot) => rows[slot].supersede(c),
                        None => {
                            index_of.insert(c.key.clone(), rows.len());
                            rows.push(c);
                        }
                    }
                }
                Err(reason) => out.bad.push(BadEvent { index, reason }),
            }
        }
        if rows.is_empty() {
            return Ok(());
        }
        // Upserts decide in their own statement; only the rows it did not write, and
        // the deletes, are asked about (usually none in a catch-up: one statement per
        // row instead of two).
        let (upserts, deletes): (Vec<Candidate>, Vec<Candidate>) =
            rows.into_iter().partition(|c| c.kind != Kind::Delete);
        let (mut written, mut undecided) = self.upsert(events, &table, tc, upserts).await?;
        undecided.extend(deletes);
        let decisions = if undecided.is_empty() {
            Vec::new()
        } else {
            self.decide(&table, &undecided, tc).await?
        };
        let (mut deletes, mut lost) = (Vec::new(), Vec::new());
        for (c, d) in undecided.into_iter().zip(decisions) {
            let resolution = match d.verdict {
                // An upsert not written that the decision lets win: the target holds
                // that version already (a table whose every column is its key).
                Verdict::Apply if c.kind != Kind::Delete => {
                    written.push(c);
                    continue;
                }
                Verdict::Apply => {
                    deletes.push(c);
                    continue;
                }
                Verdict::Older => Resolution::KeptLocal,
                Verdict::Tombstone => Resolution::DroppedOlderThanTombstone,
                Verdict::NullTs | Verdict::Future => {
                    out.bad.push(BadEvent {
                        index: c.index,
                        reason: bad_version(&table, d.verdict),
                    });
                    continue;
                }
            };
            lost.push(Lost {
                candidate: c,
                local_ts: d.local_ts,
                resolution,
            });
        }
        let also_repair: Vec<Vec<String>> = written
            .iter()
            .chain(&deletes)
            .filter(|c| c.repair)
            .map(|c| c.key.clone())
            .collect();
        // Settling comes before this run's deletes: their tombstones are for other keys
        // (one candidate per key), and once written they would open the settle's gate
        // (the table's newest tombstone) for every key of a batch that mixes deletes
        // with upserts, a probe per key for nothing (0.8 of 6.3 s in a mixed catch-up).
        let settled = self.settle(&table, &written).await?;
        self.delete(&table, &deletes).await?;
        out.rows += written.len() + deletes.len() - settled.len();
        lost.extend(settled);
        out.conflicts += lost.len();
        self.record_losers(events, &table, &lost).await?;
        self.repair(&table, also_repair).await
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
}

/// Why a version that last-writer-wins cannot order is a bad event.
fn bad_version(table: &TargetTable, verdict: Verdict) -> String {
    if verdict == Verdict::NullTs {
        format!(
            "{} is NULL: last-writer-wins cannot order this version",
            table.updated_at
        )
    } else {
        format!(
            "{} is further in the future than max_future_skew_ms allows",
            table.updated_at
        )
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
