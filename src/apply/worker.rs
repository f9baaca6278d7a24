//! The apply worker's state between the consumer and the target: events gather into a
//! batch, are written into the open target transaction, and commit with their position
//! at a source transaction boundary.
//!
//! In: events in the source's commit order, each with its Kafka offset, from
//! [`super::session`]. Out: target transactions holding whole source transactions plus
//! the `duplex.apply_positions` row saying how far they reach; nothing is durable
//! before that commit returns. Events at or below the applied position are skipped.
//! A source transaction is written once its end has arrived, unless it outgrows what
//! may be held back; `incomplete` handles transactions that do not arrive whole,
//! `maintenance` the sweep and pruning between transactions.

use crate::apply::batch::{prepare_batch, writable_len};
use crate::apply::dead_letter::{DeadLetter, DeadLetterQueue};
use crate::apply::error::ApplyError;
use crate::apply::intake::Taken;
use crate::apply::progress::Standing;
use crate::apply::sequence::{Gap, Next, Sequence};
use crate::config::{Config, Direction};
use crate::event::{ChangeEvent, Position};
use crate::lww::TargetWriter;
use crate::metrics::ApplyMetrics;
use crate::pg::error::SqlContext;
use crate::pg::state::positions::{self, Stored};
use crate::{Classify, ErrorClass};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod bad_events;
use bad_events::pending_of;
mod incomplete;
mod maintenance;
mod owed;
mod reclaim;
mod txn;
use reclaim::Reclaim;
use txn::{Mark, Marked, Offsets, OpenTxn};

pub(super) use maintenance::SWEEP_EVERY;
use tokio::sync::watch;

/// Times a transaction that met a deadlock, serialization failure or lock timeout is
/// rolled back and written again in place before the session restarts instead.
const IN_PLACE_ATTEMPTS: u32 = 5;

/// An event waiting in the batch, with its Kafka coordinates.
struct Held {
    event: ChangeEvent,
    offset: i64,
    key: Vec<u8>,
    raw: Vec<u8>,
}

impl Marked for Held {
    fn mark(&self) -> Mark {
        Mark {
            position: self.event.position(),
            offset: self.offset,
            last: self.event.source.last,
            commit_us: self.event.source.commit_ts_us,
        }
    }
}

pub(super) struct Worker<'a> {
    cfg: &'a Config,
    dir: &'a Direction,
    writer: TargetWriter<'a>,
    /// Where the events taken reach, committed, written or held.
    sequence: Sequence,
    /// The source slot's stream the taken events belong to (see `Source::stream`).
    stream: Option<String>,
    /// The last source position committed.
    committed: Option<Position>,
    /// The open target transaction.
    txn: OpenTxn<Held>,
    /// Read, settled and committed Kafka offsets.
    offsets: Offsets,
    /// Events taken and not written yet, in topic order.
    pending: Vec<Held>,
    /// The offset of a message that is no event, read after events still held, whose
    /// dead letter the open transaction holds: it may commit only once they are written.
    letter_after_held: Option<i64>,
    first_pending_at: Option<Instant>,
    last_maintenance: Instant,
    /// No sweep before this (see `maintenance::sweep_pause`).
    next_sweep: Instant,
    /// Some values may be owed to the target (see `owed`).
    owed_pending: bool,
    next_owed_check: Instant,
    next_owed_source_check: Instant,
    last_applied_commit_us: Option<i64>,
    oldest_pending_commit_us: Option<i64>,
    /// Where the lag reporter learns how far this worker is.
    standing_tx: Option<watch::Sender<Standing>>,
    /// When the last message was taken.
    last_taken_at: Instant,
    metrics: ApplyMetrics,
    /// Where bad events go when `sync.on_error = "dead_letter"`.
    dlq: DeadLetterQueue,
    /// Frees applied batches off the apply path.
    reclaim: Reclaim<Held>,
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
            txn: OpenTxn::default(),
            offsets: Offsets::at(stored.next_offset),
            pending: Vec::new(),
            letter_after_held: None,
            first_pending_at: None,
            last_maintenance: Instant::now(),
            next_sweep: Instant::now(),
            owed_pending: true,
            next_owed_check: Instant::now(),
            next_owed_source_check: Instant::now(),
            last_applied_commit_us: stored.last_commit_us,
            oldest_pending_commit_us: None,
            standing_tx: None,
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
            consumed_next: self.offsets.consumed_next,
            committed_next: self.offsets.committed_next,
            last_applied_commit_us: self.last_applied_commit_us,
            oldest_pending_commit_us: self.oldest_pending_commit_us,
            idle: self.pending.is_empty() && !self.txn.is_open(),
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
        self.offsets.read(offset);
        self.last_taken_at = Instant::now();
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                let letter = DeadLetter::unparseable(offset, &key, &raw, e);
                self.begin().await?;
                self.txn.wrote_unkept();
                self.bad(letter).await?;
                self.settle_outside(offset, true);
                return Ok(());
            }
        };
        self.follow_stream(&event);
        let next = self.sequence.next(
            event.position(),
            event.source.last,
            event.source.prev_lsn,
            offset,
        );
        match next {
            Next::Take => {}
            Next::Duplicate => {
                self.metrics.duplicates.increment(1);
                self.settle_outside(offset, false);
                return Ok(());
            }
            // Waiting for a transaction's next copy: nothing here is settled, so that
            // a restart reads it again rather than past it.
            Next::Skip => return Ok(()),
            Next::Gap { gap, taken } => return self.discard(gap, taken).await,
        }
        self.pending.push(Held {
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
        let bounds = self.cfg.sync.bounds();
        if n >= bounds.flush_at && (self.sequence.at_boundary() || n >= bounds.hold_max) {
            self.flush().await?;
            self.commit_written().await?;
        }
        Ok(())
    }

    /// The message at `offset` needs nothing applied (a replay, one outside what is
    /// applied, or a message that is no event, whose dead letter the open transaction
    /// holds: `letter`): passed when nothing before it is held.
    fn settle_outside(&mut self, offset: i64, letter: bool) {
        if !self.pending.is_empty() {
            if letter {
                self.letter_after_held = Some(offset);
            }
            return;
        }
        self.offsets.passed(offset);
        if !self.txn.is_open() {
            // Nothing else will publish: let the reporter see the replay end.
            self.publish();
        }
        // And store the offset past it when the linger ends, so that a tail of
        // replays does not read as unapplied changes.
        self.first_pending_at.get_or_insert_with(Instant::now);
    }

    /// The linger ended: writes what is complete and commits it, holding back an
    /// unfinished source transaction without its row locks.
    pub(super) async fn linger_expired(&mut self) -> Result<(), ApplyError> {
        self.flush().await?;
        self.commit_written().await
    }

    async fn begin(&mut self) -> Result<(), ApplyError> {
        if !self.txn.is_open() {
            self.writer
                .execute("BEGIN", "beginning a transaction")
                .await?;
            self.txn.began();
        }
        Ok(())
    }

    /// Writes the batch into the open transaction (without committing), but for an
    /// unfinished source transaction at its end (see [`writable_len`]). Memory stays
    /// bounded: from `hold_max` events on (see `BatchBounds`), everything is written, and a
    /// transaction that large may hold target row locks until its end arrives (or
    /// [`incomplete::STALLED_AFTER`] passes without a message).
    async fn flush(&mut self) -> Result<(), ApplyError> {
        self.first_pending_at = None;
        let events: Vec<&ChangeEvent> = self.pending.iter().map(|p| &p.event).collect();
        let ready = match writable_len(&events) {
            _ if self.pending.len() >= self.cfg.sync.bounds().hold_max => self.pending.len(),
            n => n,
        };
        let held = self.pending.split_off(ready);
        let written = self.write_pending().await;
        // The held events wait for the next message (which arms the linger again).
        self.pending.extend(held);
        written
    }

    /// Writes `pending` into the open transaction. A deadlock or serialization failure
    /// rolls the transaction back and writes it again when it kept all of it; else the
    /// session restarts.
    async fn write_pending(&mut self) -> Result<(), ApplyError> {
        let mut attempt = 0;
        loop {
            let pending = std::mem::take(&mut self.pending);
            let Some(next) = pending.last().map(|p| p.offset + 1) else {
                return Ok(());
            };
            let e = match self.write(&pending).await {
                Ok(()) => {
                    self.offsets.written_to(next);
                    let free = self.txn.wrote(pending, self.cfg.sync.bounds().retry_buffer);
                    self.reclaim.give(free);
                    return Ok(());
                }
                Err(e) => e,
            };
            self.pending = pending;
            let reason = match &e {
                ApplyError::Write(w)
                    if self.txn.may_retry_in_place() && attempt < IN_PLACE_ATTEMPTS =>
                {
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
            self.rollback().await?;
            let mut again = self.txn.rolled_back();
            again.append(&mut self.pending);
            self.pending = again;
            // The other transaction goes first.
            tokio::time::sleep(Duration::from_millis(2 << attempt)).await;
        }
    }

    /// Rolls the open transaction back on the target: what it settled is unsettled.
    async fn rollback(&mut self) -> Result<(), ApplyError> {
        self.offsets.rolled_back();
        self.letter_after_held = None;
        self.writer.execute("ROLLBACK", "rolling back").await?;
        Ok(())
    }

    /// Writes `pending` into the open transaction.
    async fn write(&mut self, pending: &[Held]) -> Result<(), ApplyError> {
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
                self.owed_pending |= !applied.owed.is_empty();
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
                // A column's type may have changed on the target since its columns
                // were read (a migration): the retry reads them again.
                self.writer.forget_tables();
                self.one_by_one(pending, &events, &deleted).await?;
            }
        }
        self.metrics.batch_rows.record(events.len() as f64);
        self.metrics
            .batch_seconds
            .record(batch_started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Commits what the open transaction holds of whole source transactions, with
    /// the position it reaches; nothing while it holds part of one (see `txn`), or
    /// while a dead letter in it waits for events still held.
    async fn commit_written(&mut self) -> Result<(), ApplyError> {
        if let Some(letter) = self.letter_after_held {
            if self.pending.first().is_some_and(|p| p.offset < letter) {
                return Ok(());
            }
            self.offsets.passed(letter);
            self.letter_after_held = None;
        }
        let Ok(reach) = self.txn.committable() else {
            return Ok(());
        };
        let Some(next_offset) = self.offsets.to_store() else {
            return Ok(());
        };
        self.begin().await?;
        let stored = Stored {
            applied: reach.map(|r| r.applied).or(self.committed),
            next_offset: Some(next_offset),
            last_commit_us: self.txn.last_commit_us(),
            stream: self.stream.clone(),
        };
        let topic = self.cfg.topic(&self.dir.from);
        positions::store(&self.writer.client, &self.dir.from, &topic, &stored)
            .await
            .sql(&self.dir.to, "storing the apply position")?;
        self.writer.execute("COMMIT", "committing").await?;
        self.offsets.committed(next_offset);
        let (free, commits) = self.txn.committed();
        self.reclaim.give(free);
        self.committed = stored.applied;
        if let Some(ts) = stored.last_commit_us {
            self.last_applied_commit_us = Some(ts);
        }
        self.oldest_pending_commit_us = self.pending.first().map(|p| p.event.source.commit_ts_us);
        self.publish();
        let now_us = unix_us();
        for ts in commits {
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
        self.flush().await?;
        self.commit_written().await?;
        if self.txn.is_open() {
            self.rollback().await?;
            self.txn.rolled_back();
        }
        if let Err(e) = crate::apply::progress::set_state(
            &self.writer.client,
            self.dir,
            crate::apply::progress::DirectionState::Stopped,
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
