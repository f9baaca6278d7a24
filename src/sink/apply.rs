//! One direction's apply worker: consumes the source node's change topic and applies
//! it to the target node, exactly once.
//!
//! The worker assigns partition 0 of `<prefix>.<from>.changes` explicitly, from the
//! offset stored in the target's `duplex.apply_positions`, and reads events in the
//! source's commit order. Events gather into a batch (`sync.batch_rows`, `linger_ms`);
//! the target transaction commits only at a source transaction boundary, after the
//! position row is updated in it, so a crash at any instant leaves the target either
//! before or after whole source transactions, and the restart resumes exactly there.
//! Events at or below the applied position (the source may publish a transaction
//! twice after a crash) are skipped. A statement that fails on a bad event is rolled
//! back to a savepoint and its batch retried one event at a time to find the culprit,
//! which then halts the direction or goes to the dead-letter queue.

use crate::config::{Config, Direction, OnError};
use crate::event::{ChangeEvent, Lsn, Position};
use crate::metrics::{self as m, Health};
use crate::pipeline::{supervise, Supervised};
use crate::sink::batch::{prepare_batch, DeleteTimes};
use crate::sink::dead_letter::{self, DeadLetter};
use crate::sink::kafka::{self, client_config, SinkError};
use crate::sink::progress::{self, Standing};
use crate::sink::writer::{TargetWriter, WriteError};
use crate::source::slot::{self, NodeError};
use crate::{Classify, ErrorClass};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};
use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tracing::Instrument;

/// librdkafka consumer settings duplex changes from librdkafka's defaults.
const CONSUMER_DEFAULTS: &[(&str, &str)] = &[
    ("fetch.wait.max.ms", "10"),
    ("queued.min.messages", "10000"),
    ("queued.max.messages.kbytes", "8192"),
];

/// How often conflicts and tombstones are pruned.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(60);

/// Errors of an apply worker.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("direction {direction}: Kafka: {source}")]
    Kafka {
        direction: String,
        source: KafkaError,
    },
    #[error("direction {direction}: {source}")]
    Sink {
        direction: String,
        source: SinkError,
    },
    #[error("direction {direction} halted on a bad event: table {table}, key {key}, source position {position} (Kafka offset {offset}): {reason}. Fix the target (or set sync.on_error = \"dead_letter\") and restart duplex")]
    BadEvent {
        direction: String,
        table: String,
        key: String,
        position: String,
        offset: i64,
        reason: String,
    },
}

impl Classify for ApplyError {
    fn class(&self) -> ErrorClass {
        match self {
            ApplyError::Write(e) => e.class(),
            ApplyError::Node(e) => e.class(),
            ApplyError::Kafka { .. } => ErrorClass::Transient,
            ApplyError::Sink { source, .. } => source.class(),
            ApplyError::BadEvent { .. } => ErrorClass::Definite,
        }
    }
}

/// Applies `dir` until `shutdown`; a definite error halts this direction only.
pub async fn run_apply(
    cfg: Arc<Config>,
    dir: Direction,
    health: Health,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ApplyError> {
    let component = format!("apply {dir}");
    let what = Supervised {
        component: &component,
        errors_metric: m::APPLY_ERRORS_TOTAL,
        label: ("direction", dir.to_string()),
    };
    metrics::gauge!(m::APPLY_HALTED, "direction" => dir.to_string()).set(0.0);
    let result = supervise(&cfg, &what, &health, shutdown, |shutdown| {
        let (cfg, dir, health, component) = (&cfg, &dir, &health, &component);
        async move {
            let r = apply_once(cfg, dir, health, component, shutdown).await;
            metrics::gauge!(m::APPLY_CONNECTED, "direction" => dir.to_string()).set(0.0);
            r
        }
    })
    .await;
    if let Err(e) = &result {
        metrics::gauge!(m::APPLY_HALTED, "direction" => dir.to_string()).set(1.0);
        progress::record_halt(&cfg, &dir, &e.to_string()).await;
    }
    result
}

async fn apply_once(
    cfg: &Config,
    dir: &Direction,
    health: &Health,
    component: &str,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ApplyError> {
    slot::setup(cfg, &dir.to).await?;
    let writer = TargetWriter::connect(cfg, dir).await?;
    let row = writer
        .client
        .query_opt(
            "SELECT next_offset, commit_lsn::text, seq,
                    (extract(epoch FROM last_commit_ts) * 1000000)::int8
             FROM duplex.apply_positions WHERE source_node = $1 AND topic = $2",
            &[&dir.from, &cfg.topic(&dir.from)],
        )
        .await
        .map_err(|source| WriteError::Sql {
            node: dir.to.clone(),
            context: "reading duplex.apply_positions".into(),
            source,
        })?;
    let last_commit_us: Option<i64> = row.as_ref().and_then(|r| r.get(3));
    let committed_next: Option<i64> = row.as_ref().map(|r| r.get(0));
    let (offset, applied) = match row {
        Some(r) => {
            let lsn: String = r.get(1);
            let lsn: Lsn = lsn.parse().unwrap_or_default();
            let seq: i32 = r.get(2);
            (
                Offset::Offset(r.get(0)),
                Some(Position {
                    commit_lsn: lsn,
                    seq: seq as u32,
                }),
            )
        }
        None => (Offset::Beginning, None),
    };
    let topic = cfg.topic(&dir.from);
    let kafka_err = |source| ApplyError::Kafka {
        direction: dir.to_string(),
        source,
    };
    kafka::ensure_topic(&cfg.kafka, &topic)
        .await
        .map_err(|source| ApplyError::Sink {
            direction: dir.to_string(),
            source,
        })?;
    let mut cc = client_config(&cfg.kafka);
    cc.set("group.id", format!("duplex-{dir}"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    // Latency and memory: don't let a fetch idle for librdkafka's default 500 ms, and
    // bound the prefetch queue (100k messages or 64 MB by default). The user's
    // properties still win.
    for (key, value) in CONSUMER_DEFAULTS {
        if !cfg.kafka.properties.contains_key(*key) {
            cc.set(*key, *value);
        }
    }
    let consumer: Arc<StreamConsumer> = Arc::new(cc.create().map_err(kafka_err)?);
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, offset)
        .map_err(kafka_err)?;
    consumer.assign(&tpl).map_err(kafka_err)?;
    progress::set_state(&writer.client, dir, progress::RUNNING, None)
        .await
        .map_err(|source| WriteError::Sql {
            node: dir.to.clone(),
            context: "writing duplex.apply_state".into(),
            source,
        })?;
    health.set(component, true);
    metrics::gauge!(m::APPLY_CONNECTED, "direction" => dir.to_string()).set(1.0);
    for zero in [
        m::APPLY_DEAD_LETTERS_TOTAL,
        m::APPLY_DUPLICATES_SKIPPED_TOTAL,
        m::APPLY_TRANSACTIONS_TOTAL,
    ] {
        metrics::counter!(zero, "direction" => dir.to_string()).increment(0);
    }
    tracing::info!(direction = %dir, topic = %topic, ?offset, "applying");
    let mut worker = Worker {
        cfg,
        dir,
        writer,
        applied,
        committed: applied,
        next_offset: None,
        pending: Vec::new(),
        boundary: true,
        in_txn: false,
        first_pending_at: None,
        txn_commits: Vec::new(),
        last_maintenance: Instant::now(),
        consumed_next: committed_next,
        committed_next,
        last_applied_commit_us: last_commit_us,
        oldest_pending_commit_us: None,
        standing_tx: None,
        duplicates: metrics::counter!(m::APPLY_DUPLICATES_SKIPPED_TOTAL, "direction" => dir.to_string()),
    };
    let (standing_tx, standing_rx) = watch::channel(worker.standing());
    worker.standing_tx = Some(standing_tx);
    let reporter = tokio::spawn(
        progress::report_lag(
            dir.clone(),
            consumer.clone(),
            topic.clone(),
            standing_rx,
            shutdown.clone(),
        )
        .instrument(tracing::info_span!("lag_reporter", direction = %dir)),
    );
    let _reporter = AbortOnDrop(reporter);
    loop {
        let deadline = worker
            .first_pending_at
            .map(|t| t + Duration::from_millis(cfg.sync.linger_ms));
        tokio::select! {
            biased;
            _ = shutdown.changed() => return worker.finish().await,
            msg = consumer.recv() => {
                let msg = msg.map_err(kafka_err)?;
                worker.take(msg.offset(), msg.key().unwrap_or_default(), msg.payload().unwrap_or_default()).await?;
            }
            _ = sleep_until(deadline), if deadline.is_some() => worker.linger_expired().await?,
        }
    }
}

/// Aborts a helper task when the session that owns it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(d) = deadline {
        tokio::time::sleep_until(d.into()).await;
    }
}

/// An event waiting in the batch, with its Kafka coordinates.
struct Pending {
    event: ChangeEvent,
    offset: i64,
    key: Vec<u8>,
    raw: Vec<u8>,
}

struct Worker<'a> {
    cfg: &'a Config,
    dir: &'a Direction,
    writer: TargetWriter<'a>,
    /// Highest position applied, committed or in the open transaction.
    applied: Option<Position>,
    committed: Option<Position>,
    /// Offset after the last message taken, not yet committed.
    next_offset: Option<i64>,
    pending: Vec<Pending>,
    /// The last event taken ended its source transaction.
    boundary: bool,
    in_txn: bool,
    first_pending_at: Option<Instant>,
    /// Commit times (µs) of source transactions in the open target transaction.
    txn_commits: Vec<i64>,
    last_maintenance: Instant,
    consumed_next: Option<i64>,
    committed_next: Option<i64>,
    last_applied_commit_us: Option<i64>,
    oldest_pending_commit_us: Option<i64>,
    /// Where the lag reporter learns how far this worker is.
    standing_tx: Option<watch::Sender<Standing>>,
    duplicates: metrics::Counter,
}

impl Worker<'_> {
    fn standing(&self) -> Standing {
        Standing {
            consumed_next: self.consumed_next,
            committed_next: self.committed_next,
            last_applied_commit_us: self.last_applied_commit_us,
            oldest_pending_commit_us: self.oldest_pending_commit_us,
            idle: self.pending.is_empty() && !self.in_txn,
        }
    }

    fn publish(&self) {
        if let Some(tx) = &self.standing_tx {
            tx.send_replace(self.standing());
        }
    }

    async fn take(&mut self, offset: i64, key: &[u8], raw: &[u8]) -> Result<(), ApplyError> {
        self.next_offset = Some(offset + 1);
        self.consumed_next = Some(offset + 1);
        let event = match ChangeEvent::from_json(raw) {
            Ok(e) => e,
            Err(e) => {
                let letter = DeadLetter::unparseable(offset, key, raw, e.to_string());
                self.begin().await?;
                return self.bad(letter).await;
            }
        };
        if self.applied.is_some_and(|a| event.position() <= a) {
            self.duplicates.increment(1);
            if self.pending.is_empty() && !self.in_txn {
                // Nothing else will publish: let the reporter see the replay end.
                self.publish();
            }
            return Ok(());
        }
        self.applied = Some(event.position());
        self.boundary = event.source.last;
        self.pending.push(Pending {
            event,
            offset,
            key: key.to_vec(),
            raw: raw.to_vec(),
        });
        self.first_pending_at.get_or_insert_with(Instant::now);
        // The lag reporter learns of a batch when it starts and when it commits, not
        // per message: waking it for every event would cost more than it tells.
        if self.oldest_pending_commit_us.is_none() {
            self.oldest_pending_commit_us =
                self.pending.last().map(|p| p.event.source.commit_ts_us);
            self.publish();
        }
        if self.pending.len() >= self.cfg.sync.batch_rows {
            self.flush().await?;
            if self.boundary {
                self.commit().await?;
            }
        }
        Ok(())
    }

    async fn linger_expired(&mut self) -> Result<(), ApplyError> {
        self.flush().await?;
        if self.boundary {
            self.commit().await?;
        }
        Ok(())
    }

    async fn begin(&mut self) -> Result<(), ApplyError> {
        if !self.in_txn {
            self.writer
                .execute("BEGIN", "beginning a transaction")
                .await?;
            self.in_txn = true;
        }
        Ok(())
    }

    /// Writes the batch into the open transaction (without committing).
    async fn flush(&mut self) -> Result<(), ApplyError> {
        self.first_pending_at = None;
        if self.pending.is_empty() {
            return Ok(());
        }
        self.begin().await?;
        let pending = std::mem::take(&mut self.pending);
        let (events, deleted) = prepare_batch(pending.iter().map(|p| &p.event));
        let batch_started = Instant::now();
        self.writer.execute("SAVEPOINT batch", "savepoint").await?;
        match self.writer.apply(&events, &deleted).await {
            Ok(applied) => {
                self.writer
                    .execute("RELEASE SAVEPOINT batch", "savepoint")
                    .await?;
                for bad in applied.bad {
                    let p = pending_of(&pending, &events[bad.index]);
                    self.bad(DeadLetter::of(
                        p.offset,
                        &p.key,
                        &p.raw,
                        &events[bad.index],
                        bad.reason,
                    ))
                    .await?;
                }
            }
            Err(e) if e.class() == ErrorClass::Transient => return Err(e.into()),
            Err(e) => {
                tracing::warn!(direction = %self.dir, error = %e, "a batch failed; retrying it event by event");
                self.writer
                    .execute("ROLLBACK TO SAVEPOINT batch", "savepoint")
                    .await?;
                self.one_by_one(&pending, &events, &deleted).await?;
            }
        }
        self.txn_commits.extend(
            pending
                .iter()
                .filter(|p| p.event.source.last)
                .map(|p| p.event.source.commit_ts_us),
        );
        let label = self.dir.to_string();
        metrics::histogram!(m::APPLY_BATCH_ROWS, "direction" => label.clone())
            .record(events.len() as f64);
        metrics::histogram!(m::APPLY_BATCH_SECONDS, "direction" => label)
            .record(batch_started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Applies events singly, each under its own savepoint, to find the bad ones.
    async fn one_by_one(
        &mut self,
        pending: &[Pending],
        events: &[Cow<'_, ChangeEvent>],
        deleted: &DeleteTimes,
    ) -> Result<(), ApplyError> {
        for ev in events {
            self.writer.execute("SAVEPOINT one", "savepoint").await?;
            let p = pending_of(pending, ev);
            match self.writer.apply(std::slice::from_ref(ev), deleted).await {
                Ok(applied) => {
                    self.writer
                        .execute("RELEASE SAVEPOINT one", "savepoint")
                        .await?;
                    if let Some(bad) = applied.bad.into_iter().next() {
                        self.bad(DeadLetter::of(p.offset, &p.key, &p.raw, ev, bad.reason))
                            .await?;
                    }
                }
                Err(e) if e.class() == ErrorClass::Transient => return Err(e.into()),
                Err(e) => {
                    self.writer
                        .execute("ROLLBACK TO SAVEPOINT one", "savepoint")
                        .await?;
                    self.bad(DeadLetter::of(p.offset, &p.key, &p.raw, ev, error_text(&e)))
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// A bad event halts the direction or goes to the dead-letter queue.
    async fn bad(&mut self, letter: DeadLetter) -> Result<(), ApplyError> {
        if self.cfg.sync.on_error == OnError::Halt {
            return Err(ApplyError::BadEvent {
                direction: self.dir.to_string(),
                table: letter.table.unwrap_or_else(|| "?".into()),
                key: letter.key.unwrap_or_else(|| "?".into()),
                position: letter.position.unwrap_or_else(|| "?".into()),
                offset: letter.offset,
                reason: letter.error,
            });
        }
        tracing::warn!(direction = %self.dir, table = ?letter.table, key = ?letter.key, position = ?letter.position, error = %letter.error, "event sent to the dead-letter queue");
        dead_letter::record(self.cfg, self.dir, &self.writer, &letter).await?;
        metrics::counter!(m::APPLY_DEAD_LETTERS_TOTAL, "direction" => self.dir.to_string())
            .increment(1);
        Ok(())
    }

    /// Stores the position and commits the open transaction.
    async fn commit(&mut self) -> Result<(), ApplyError> {
        let Some(next_offset) = self.next_offset else {
            return Ok(());
        };
        self.begin().await?;
        let pos = self.applied.unwrap_or(Position {
            commit_lsn: Lsn::ZERO,
            seq: 0,
        });
        let last_commit_ts = self.txn_commits.last().copied();
        self.writer
            .client
            .execute(
                "INSERT INTO duplex.apply_positions (source_node, topic, next_offset, commit_lsn, seq, last_commit_ts, applied_at)
                 VALUES ($1, $6, $2, $3::text::pg_lsn, $4, 'epoch'::timestamptz + $5::int8 * interval '1 microsecond', now())
                 ON CONFLICT (source_node, topic) DO UPDATE SET next_offset = EXCLUDED.next_offset,
                   commit_lsn = EXCLUDED.commit_lsn, seq = EXCLUDED.seq, applied_at = now(),
                   last_commit_ts = coalesce(EXCLUDED.last_commit_ts, duplex.apply_positions.last_commit_ts)",
                &[
                    &self.dir.from,
                    &next_offset,
                    &pos.commit_lsn.to_string(),
                    &(pos.seq as i32),
                    &last_commit_ts,
                    &self.cfg.topic(&self.dir.from),
                ],
            )
            .await
            .map_err(|source| WriteError::Sql {
                node: self.dir.to.clone(),
                context: "storing the apply position".into(),
                source,
            })?;
        self.writer.execute("COMMIT", "committing").await?;
        self.in_txn = false;
        self.committed = self.applied;
        self.committed_next = Some(next_offset);
        self.next_offset = None;
        if let Some(ts) = last_commit_ts {
            self.last_applied_commit_us = Some(ts);
        }
        self.oldest_pending_commit_us = None;
        self.publish();
        let now_us = unix_us();
        for ts in self.txn_commits.drain(..) {
            metrics::histogram!(m::APPLY_COMMIT_TO_APPLY_SECONDS, "direction" => self.dir.to_string())
                .record((now_us - ts).max(0) as f64 / 1e6);
            metrics::counter!(m::APPLY_TRANSACTIONS_TOTAL, "direction" => self.dir.to_string())
                .increment(1);
        }
        if self.last_maintenance.elapsed() > MAINTENANCE_EVERY {
            self.maintain().await?;
        }
        Ok(())
    }

    /// Prunes old tombstones, conflicts and repairs (a repair is published when it
    /// commits; the row is kept only to be inspected).
    async fn maintain(&mut self) -> Result<(), ApplyError> {
        self.last_maintenance = Instant::now();
        let retention_ms = self.cfg.sync.tombstone_retention_ms as i64;
        let sql = format!(
            "DELETE FROM duplex.tombstones WHERE deleted_at < now() - {retention_ms} * interval '1 millisecond';
             DELETE FROM duplex.conflicts WHERE id <= (SELECT max(id) FROM duplex.conflicts) - {kept};
             DELETE FROM duplex.repairs WHERE id <= (SELECT max(id) FROM duplex.repairs) - {kept};",
            kept = self.cfg.sync.conflicts_kept
        );
        Ok(self
            .writer
            .execute(&sql, "pruning tombstones and conflicts")
            .await?)
    }

    /// Clean stop: commit what forms whole source transactions, drop the rest (it is
    /// read again on the next start).
    async fn finish(&mut self) -> Result<(), ApplyError> {
        if self.boundary {
            self.flush().await?;
            self.commit().await?;
        } else if self.in_txn {
            self.writer.execute("ROLLBACK", "rolling back").await?;
        }
        if let Err(e) =
            progress::set_state(&self.writer.client, self.dir, progress::STOPPED, None).await
        {
            tracing::warn!(direction = %self.dir, error = %e, "could not record the stop on the target");
        }
        tracing::info!(direction = %self.dir, applied = ?self.committed.map(|p| p.to_string()), "apply stopped");
        Ok(())
    }
}

fn pending_of<'p>(pending: &'p [Pending], ev: &ChangeEvent) -> &'p Pending {
    pending
        .iter()
        .find(|p| p.event.position() == ev.position())
        .unwrap_or(&pending[0])
}

fn error_text(e: &WriteError) -> String {
    match e {
        WriteError::Sql { source, .. } => crate::source::slot::describe(source),
        other => other.to_string(),
    }
}

fn unix_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
