//! The apply worker's state between the consumer and the target: events gather into a
//! batch, are written into the open target transaction, and commit with their position
//! at a source transaction boundary.
//!
//! In: events in the source's commit order, each with its Kafka offset, from
//! [`super::consumer`]. Out: target transactions holding whole source transactions plus
//! the `duplex.apply_positions` row saying how far they reach; nothing is durable
//! before that commit returns. Events at or below the applied position are skipped.
//! A source transaction is written once its end has arrived, unless it outgrows what
//! may be held back; `incomplete` handles transactions that do not arrive whole,
//! `maintenance` the sweep and pruning between transactions.

use crate::apply::batch::{prepare_batch, writable_len};
use crate::apply::dead_letter::{DeadLetter, DeadLetterQueue};
use crate::apply::error::ApplyError;
use crate::apply::intake::Taken;
use crate::apply::progress::{self, Standing, Stored};
use crate::apply::sequence::{Gap, Next, Sequence};
use crate::apply::writer::{TargetWriter, WriteError};
use crate::config::{Config, Direction};
use crate::event::{ChangeEvent, Position};
use crate::metrics::ApplyMetrics;
use crate::{Classify, ErrorClass};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod bad_events;
use bad_events::pending_of;
mod incomplete;
mod maintenance;
mod reclaim;
use reclaim::Reclaim;

pub(super) use maintenance::SWEEP_EVERY;
use tokio::sync::watch;

/// Times a transaction that met a deadlock, serialization failure or lock timeout is
/// rolled back and written again in place before the session restarts instead.
const IN_PLACE_ATTEMPTS: u32 = 5;

/// Events a batch may grow to while an unfinished source transaction is held back,
/// at least.
const HELD_MIN: usize = 1000;

/// An event waiting in the batch, with its Kafka coordinates.
struct Pending {
    event: ChangeEvent,
    offset: i64,
    key: Vec<u8>,
    raw: Vec<u8>,
}

pub(super) struct Worker<'a> {
    cfg: &'a Config,
    dir: &'a Direction,
    writer: TargetWriter<'a>,
    /// Where the events taken reach, committed or in the open transaction.
    sequence: Sequence,
    /// The source slot's stream the taken events belong to (see `Source::stream`).
    stream: Option<String>,
    committed: Option<Position>,
    /// Offset after the last message taken, not yet committed.
    next_offset: Option<i64>,
    pending: Vec<Pending>,
    in_txn: bool,
    first_pending_at: Option<Instant>,
    /// Commit times (µs) of source transactions in the open target transaction.
    txn_commits: Vec<i64>,
    last_maintenance: Instant,
    /// No sweep before this (see `maintenance::sweep_pause`).
    next_sweep: Instant,
    consumed_next: Option<i64>,
    committed_next: Option<i64>,
    last_applied_commit_us: Option<i64>,
    oldest_pending_commit_us: Option<i64>,
    /// Where the lag reporter learns how far this worker is.
    standing_tx: Option<watch::Sender<Standing>>,
    /// Events written into the open target transaction, kept while they are at most
    /// `sync.batch_rows`, so that a deadlock can be retried without reconnecting.
    written: Vec<Pending>,
    /// `written` holds every event of the open transaction.
    written_complete: bool,
    /// The open transaction holds part of a source transaction whose end has not
    /// arrived (it outgrew what may be held back).
    partial_written: bool,
    /// When the last message was taken.
    last_taken_at: Instant,
    metrics: ApplyMetrics,
    /// Where bad events go when `sync.on_error = "dead_letter"`.
    dlq: DeadLetterQueue,
    /// Frees applied batches off the apply path.
    reclaim: Reclaim<Pending>,
}

impl<'a> Worker<'a> {
    /// A worker resuming from `stored`, still waiting for the next copy of a
    /// transaction found incomplete if `awaiting`.
    pub(super) fn new(
        cfg: &'a Config,
        dir: &'a Direction,
        writer: TargetWriter<'a>,
        stored: Stored,
        awaiting: Option<Gap>,
    ) -> Worker<'a> {
        let metrics = writer.metrics.clone();
        Worker {
            cfg,
            dir,
            writer,
            sequence: Sequence::new(stored.applied, awaiting),
            stream: stored.stream,
            committed: stored.applied,
            next_offset: None,
            pending: Vec::new(),
            in_txn: false,
            first_pending_at: None,
            txn_commits: Vec::new(),
            last_maintenance: Instant::now(),
            next_sweep: Instant::now(),
            consumed_next: stored.next_offset,
            committed_next: stored.next_offset,
            last_applied_commit_us: stored.last_commit_us,
            oldest_pending_commit_us: None,
            standing_tx: None,
            written: Vec::new(),
            written_complete: true,
            partial_written: false,
            last_taken_at: Instant::now(),
            metrics,
            dlq: DeadLetterQueue::default(),
            reclaim: Reclaim::start(&dir.to_string()),
        }
    }

    /// Where the lag reporter learns how far this worker is.
    pub(super) fn report_to(&mut self, tx: watch::Sender<Standing>) {
        self.standing_tx = Some(tx);
    }

    /// When the open batch must be written at the latest (`sync.linger_ms`).
    pub(super) fn linger_deadline(&self) -> Option<Instant> {
        self.first_pending_at
            .map(|t| t + Duration::from_millis(self.cfg.sync.linger_ms))
    }

    pub(super) fn standing(&self) -> Standing {
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

    pub(super) async fn take(&mut self, taken: Taken) -> Result<(), ApplyError> {
        let Taken {
            offset,
            key,
            raw,
            event,
        } = taken;
        self.next_offset = Some(offset + 1);
        self.consumed_next = Some(offset + 1);
        self.last_taken_at = Instant::now();
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                let letter = DeadLetter::unparseable(offset, &key, &raw, e);
                self.begin().await?;
                // Not among `written`: a retry in place would lose its record.
                self.written_complete = false;
                return self.bad(letter).await;
            }
        };
        self.follow_stream(&event);
        let next = self
            .sequence
            .next(event.position(), event.source.last, offset);
        match next {
            Next::Take => {}
            Next::Duplicate | Next::Skip => {
                if next == Next::Duplicate {
                    self.metrics.duplicates.increment(1);
                }
                if self.pending.is_empty() && !self.in_txn {
                    // Nothing else will publish: let the reporter see the replay end.
                    self.publish();
                    // And store the offset past it when the linger ends, so that a
                    // tail of replays does not read as unapplied changes.
                    self.first_pending_at.get_or_insert_with(Instant::now);
                }
                return Ok(());
            }
            Next::Gap { gap, taken } => return self.discard(gap, taken).await,
        }
        self.pending.push(Pending {
            event,
            offset,
            key,
            raw,
        });
        self.first_pending_at.get_or_insert_with(Instant::now);
        // The lag reporter learns of a batch when it starts and when it commits, not
        // per message: waking it for every event would cost more than it tells.
        if self.oldest_pending_commit_us.is_none() {
            self.oldest_pending_commit_us =
                self.pending.last().map(|p| p.event.source.commit_ts_us);
            self.publish();
        }
        // A full batch is written at its source transaction's end, or once it holds
        // as much as may be held back (see `flush`).
        let n = self.pending.len();
        if n >= self.cfg.sync.batch_rows && (self.sequence.at_boundary() || n >= self.held_max()) {
            self.flush().await?;
            if self.sequence.at_boundary() {
                self.commit().await?;
            }
        }
        Ok(())
    }

    /// Events the batch may grow to while an unfinished source transaction is held
    /// back.
    fn held_max(&self) -> usize {
        HELD_MIN.max(2 * self.cfg.sync.batch_rows)
    }

    pub(super) async fn linger_expired(&mut self) -> Result<(), ApplyError> {
        self.flush().await?;
        if self.sequence.at_boundary() {
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

    /// Writes the batch into the open transaction (without committing), but for an
    /// unfinished source transaction at its end (see [`writable_len`]). Memory stays
    /// bounded: from [`Self::held_max`] events on, everything is written, and a
    /// transaction that large may hold target row locks until its end arrives (or
    /// [`incomplete::STALLED_AFTER`] passes without a message).
    async fn flush(&mut self) -> Result<(), ApplyError> {
        self.first_pending_at = None;
        let events: Vec<&ChangeEvent> = self.pending.iter().map(|p| &p.event).collect();
        let ready = match writable_len(&events) {
            _ if self.pending.len() >= self.held_max() => self.pending.len(),
            n => n,
        };
        let held = self.pending.split_off(ready);
        if self.pending.last().is_some_and(|p| !p.event.source.last) {
            self.partial_written = true;
        }
        let written = self.write_pending().await;
        // The held events wait for the next message (which arms the linger again).
        self.pending.extend(held);
        written
    }

    /// Writes `pending` into the open transaction. A deadlock or serialization failure
    /// rolls the transaction back and writes it again, from `written`, when that holds
    /// all of it; else the session restarts.
    async fn write_pending(&mut self) -> Result<(), ApplyError> {
        let mut attempt = 0;
        loop {
            let pending = std::mem::take(&mut self.pending);
            if pending.is_empty() {
                return Ok(());
            }
            let e = match self.write(&pending).await {
                Ok(()) => {
                    if self.written_complete
                        && self.written.len() + pending.len() <= self.cfg.sync.batch_rows
                    {
                        self.written.extend(pending);
                    } else {
                        self.reclaim.give(std::mem::take(&mut self.written));
                        self.reclaim.give(pending);
                        self.written_complete = false;
                    }
                    return Ok(());
                }
                Err(e) => e,
            };
            self.pending = pending;
            let reason = match &e {
                ApplyError::Write(w) if self.written_complete && attempt < IN_PLACE_ATTEMPTS => {
                    w.retry_in_place()
                }
                _ => None,
            };
            let Some(reason) = reason else { return Err(e) };
            attempt += 1;
            if let Some(c) = self.metrics.retries(reason) {
                c.increment(1);
            }
            tracing::info!(direction = %self.dir, error = %e, attempt, "rolled back; writing the transaction again");
            self.writer.execute("ROLLBACK", "rolling back").await?;
            self.in_txn = false;
            self.txn_commits.clear();
            let mut again = std::mem::take(&mut self.written);
            again.append(&mut self.pending);
            self.pending = again;
            // The other transaction goes first.
            tokio::time::sleep(Duration::from_millis(2 << attempt)).await;
        }
    }

    /// Writes `pending` into the open transaction.
    async fn write(&mut self, pending: &[Pending]) -> Result<(), ApplyError> {
        self.begin().await?;
        let (events, deleted) = prepare_batch(pending.iter().map(|p| &p.event));
        let batch_started = Instant::now();
        // Mapped tables' key pairings are made before the savepoint: a batch that
        // falls back to writing event by event keeps them for the rows it writes.
        let mapped = self.writer.map(events, deleted).await?;
        self.writer.execute("SAVEPOINT batch", "savepoint").await?;
        let (events, deleted) = (mapped.events, mapped.deleted);
        for (ev, reason) in mapped.bad {
            let p = pending_of(pending, &ev);
            self.bad(DeadLetter::of(p.offset, &p.key, &p.raw, &ev, reason))
                .await?;
        }
        match self.writer.apply(&events, &deleted).await {
            Ok(applied) => {
                self.writer
                    .execute("RELEASE SAVEPOINT batch", "savepoint")
                    .await?;
                for bad in applied.bad {
                    let p = pending_of(pending, &events[bad.index]);
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
                self.one_by_one(pending, &events, &deleted).await?;
            }
        }
        self.txn_commits.extend(
            pending
                .iter()
                .filter(|p| p.event.source.last)
                .map(|p| p.event.source.commit_ts_us),
        );
        self.metrics.batch_rows.record(events.len() as f64);
        self.metrics
            .batch_seconds
            .record(batch_started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Stores the position and commits the open transaction.
    async fn commit(&mut self) -> Result<(), ApplyError> {
        let Some(next_offset) = self.next_offset else {
            return Ok(());
        };
        self.begin().await?;
        let last_commit_ts = self.txn_commits.last().copied();
        let reach = Stored {
            applied: self.sequence.applied(),
            next_offset: Some(next_offset),
            last_commit_us: last_commit_ts,
            stream: self.stream.clone(),
        };
        progress::store(&self.writer.client, self.cfg, self.dir, &reach)
            .await
            .map_err(|source| WriteError::Sql {
                node: self.dir.to.clone(),
                context: "storing the apply position".into(),
                source,
            })?;
        self.writer.execute("COMMIT", "committing").await?;
        self.in_txn = false;
        self.partial_written = false;
        self.reclaim.give(std::mem::take(&mut self.written));
        self.written_complete = true;
        self.committed = self.sequence.applied();
        self.committed_next = Some(next_offset);
        self.next_offset = None;
        if let Some(ts) = last_commit_ts {
            self.last_applied_commit_us = Some(ts);
        }
        self.oldest_pending_commit_us = None;
        self.publish();
        let now_us = unix_us();
        for ts in self.txn_commits.drain(..) {
            self.metrics
                .commit_to_apply
                .record((now_us - ts).max(0) as f64 / 1e6);
            self.metrics.transactions.increment(1);
        }
        if self.last_maintenance.elapsed() > maintenance::MAINTENANCE_EVERY {
            self.maintain().await?;
        }
        Ok(())
    }

    /// Clean stop: commit what forms whole source transactions, drop the rest (it is
    /// read again on the next start).
    pub(super) async fn finish(&mut self) -> Result<(), ApplyError> {
        if self.sequence.at_boundary() {
            self.flush().await?;
            self.commit().await?;
        } else if self.in_txn {
            self.writer.execute("ROLLBACK", "rolling back").await?;
        }
        if let Err(e) = progress::set_state(
            &self.writer.client,
            self.dir,
            progress::DirectionState::Stopped,
            None,
        )
        .await
        {
            tracing::warn!(direction = %self.dir, error = %e, "could not record the stop on the target");
        }
        tracing::info!(direction = %self.dir, applied = ?self.committed.map(|p| p.to_string()), "apply stopped");
        Ok(())
    }
}

fn unix_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
