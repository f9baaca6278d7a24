//! What the worker does when a source transaction does not arrive whole: a copy
//! with a hole is discarded until its next copy, a transaction whose end stops coming
//! after part of it was written is rolled back so that its row locks do not hold up
//! the application, and a new slot stream starts positions over.

use super::Worker;
use crate::apply::error::ApplyError;
use crate::apply::sequence::{Gap, Sequence};
use crate::event::ChangeEvent;
use std::time::{Duration, Instant};

/// How long the target may hold part of a source transaction, with its row locks,
/// while no message arrives: then it is rolled back and read again later.
pub(super) const STALLED_AFTER: Duration = Duration::from_secs(10);

impl Worker<'_> {
    /// A new stream (the source's slot was created again: after a restore, or after a
    /// loss the operator resolved with `duplex setup`) starts positions over: its
    /// LSNs may be below everything applied so far, and are no duplicates.
    pub(super) fn follow_stream(&mut self, event: &ChangeEvent) {
        let Some(stream) = &event.source.stream else {
            return;
        };
        if self.stream.as_ref() == Some(stream) {
            return;
        }
        if let Some(old) = &self.stream {
            tracing::warn!(direction = %self.dir, old_stream = %old, new_stream = %stream, position = %event.position(),
                "the source's slot was created again: applying its changes from the start of the new slot");
            self.sequence = Sequence::new_stream();
        }
        self.stream = Some(stream.clone());
    }

    /// The open source transaction has a hole (see [`Sequence`]): its `taken` events
    /// are dropped if none was written yet; else the target transaction is rolled back
    /// and the session restarts from the committed offset, skipping the broken copy.
    pub(super) async fn discard(&mut self, gap: Gap, taken: usize) -> Result<(), ApplyError> {
        self.metrics.incomplete.increment(1);
        if taken <= self.pending.len() {
            tracing::warn!(direction = %self.dir, %gap,
                "discarded what arrived of it, waiting for the source to publish it again");
            self.pending.truncate(self.pending.len() - taken);
            if self.pending.is_empty() {
                self.first_pending_at = None;
                self.oldest_pending_commit_us = None;
            }
            return Ok(());
        }
        if self.txn.is_open() {
            self.rollback().await?;
        }
        self.txn.rolled_back();
        self.pending.clear();
        Err(ApplyError::IncompleteTransaction {
            direction: self.dir.to_string(),
            gap,
        })
    }

    /// When the part of a source transaction in the open target transaction must be
    /// given up, if no message arrives before.
    pub(in crate::apply) fn stall_deadline(&self) -> Option<Instant> {
        self.txn
            .holds_partial()
            .then(|| self.last_taken_at + STALLED_AFTER)
    }

    /// The rest of a partly written source transaction did not arrive in time (the
    /// source or the broker is down): roll back, so that the application's writes do
    /// not wait on the rows it locked, and read it again in a new session.
    pub(in crate::apply) async fn stalled(&mut self) -> Result<(), ApplyError> {
        let commit_lsn = self.pending.last().map(|p| p.event.source.lsn);
        self.rollback().await?;
        self.txn.rolled_back();
        self.pending.clear();
        Err(ApplyError::Stalled {
            direction: self.dir.to_string(),
            commit_lsn: commit_lsn.map_or_else(|| "?".into(), |l| l.to_string()),
            secs: STALLED_AFTER.as_secs(),
        })
    }
}
