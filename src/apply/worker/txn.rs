//! The apply worker's bookkeeping as plain types, with the rules that carry
//! exactly-once: what the open target transaction holds ([`OpenTxn`]) and which Kafka
//! offset a commit may store ([`Offsets`]). No I/O here: the worker asks, then acts.
//!
//! - A commit stores how far what it wrote reaches: the last written event's source
//!   position, and an offset no further than the first message not settled (written,
//!   or outside what is applied). Events held back (an unfinished source transaction)
//!   are never passed: they are read again after a restart.
//! - A transaction that holds part of a source transaction never commits: the rest
//!   must arrive first (or the part is rolled back).
//! - A deadlock or serialization failure may be answered by writing the transaction
//!   again on the same session only while every event of it is kept: otherwise the
//!   session restarts from the last commit.

use crate::event::Position;

/// Where a written event sits: its source position and Kafka offset, whether it ends
/// its source transaction, and that transaction's commit time (µs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Mark {
    pub position: Position,
    pub offset: i64,
    pub last: bool,
    pub commit_us: i64,
}

/// An event the worker writes, which knows its [`Mark`].
pub(super) trait Marked {
    fn mark(&self) -> Mark;
}

/// How far a transaction's writes reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Reach {
    /// The last source position written.
    pub applied: Position,
    /// The offset after its message.
    pub next_offset: i64,
}

/// The open target transaction.
#[derive(Debug)]
pub(super) struct OpenTxn<E> {
    open: bool,
    /// Events written into it, kept for a retry in place while `complete`.
    written: Vec<E>,
    /// `written` holds everything the transaction wrote.
    complete: bool,
    /// The last event written does not end its source transaction.
    partial: bool,
    /// Commit times (µs) of the source transactions written whole.
    commits_us: Vec<i64>,
    reach: Option<Reach>,
}

impl<E> Default for OpenTxn<E> {
    fn default() -> Self {
        OpenTxn {
            open: false,
            written: Vec::new(),
            complete: true,
            partial: false,
            commits_us: Vec::new(),
            reach: None,
        }
    }
}

impl<E: Marked> OpenTxn<E> {
    /// The transaction was begun on the target.
    pub fn began(&mut self) {
        self.open = true;
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Part of a source transaction is written and uncommitted (it holds row locks).
    pub fn holds_partial(&self) -> bool {
        self.open && self.partial
    }

    /// `batch` was written into the transaction, in order. It is kept for a retry in
    /// place while the transaction holds at most `keep` events and no part of a source
    /// transaction (one that outgrew what may be held back: its rest may be long to
    /// come, and the session restarts from the last commit instead); returns what is
    /// not kept, to be freed.
    pub fn wrote(&mut self, batch: Vec<E>, keep: usize) -> Vec<E> {
        for e in &batch {
            let m = e.mark();
            self.reach = Some(Reach {
                applied: m.position,
                next_offset: m.offset + 1,
            });
            self.partial = !m.last;
            if m.last {
                self.commits_us.push(m.commit_us);
            }
        }
        if self.complete && !self.partial && self.written.len() + batch.len() <= keep {
            self.written.extend(batch);
            return Vec::new();
        }
        self.complete = false;
        let mut free = std::mem::take(&mut self.written);
        free.extend(batch);
        free
    }

    /// Something not kept went into the transaction (a dead letter of a message that
    /// is no event): writing the kept events again would lose it.
    pub fn wrote_unkept(&mut self) {
        self.complete = false;
    }

    /// Whether the transaction may be rolled back and written again on this session.
    pub fn may_retry_in_place(&self) -> bool {
        self.complete
    }

    /// Rolled back: returns the kept events (to write again, in order, or to free).
    pub fn rolled_back(&mut self) -> Vec<E> {
        let kept = std::mem::take(&mut self.written);
        *self = OpenTxn::default();
        kept
    }

    /// Commit time (µs) of the newest source transaction written whole.
    pub fn last_commit_us(&self) -> Option<i64> {
        self.commits_us.last().copied()
    }

    /// What a commit now makes durable: how far the writes reach (`None` when nothing
    /// was written). `Err` when it must not commit: part of a source transaction is
    /// written.
    pub fn committable(&self) -> Result<Option<Reach>, PartialWritten> {
        match self.partial {
            true => Err(PartialWritten),
            false => Ok(self.reach),
        }
    }

    /// Committed: returns the events to free and the commit times of the source
    /// transactions made durable.
    pub fn committed(&mut self) -> (Vec<E>, Vec<i64>) {
        let commits = std::mem::take(&mut self.commits_us);
        (self.rolled_back(), commits)
    }
}

/// The transaction holds part of a source transaction, which must not commit.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct PartialWritten;

/// The Kafka offsets of a direction: read, settled and committed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Offsets {
    /// After the last message read.
    pub consumed_next: Option<i64>,
    /// After the last message settled: every message before it is written into the
    /// open transaction, committed, or outside what this direction applies.
    settled_next: Option<i64>,
    /// After the last message committed with the target.
    pub committed_next: Option<i64>,
}

impl Offsets {
    /// Resuming at `stored`, the committed offset.
    pub fn at(stored: Option<i64>) -> Offsets {
        Offsets {
            consumed_next: stored,
            settled_next: stored,
            committed_next: stored,
        }
    }

    /// The message at `offset` was read.
    pub fn read(&mut self, offset: i64) {
        self.consumed_next = Some(offset + 1);
    }

    /// The message at `offset` needs nothing written (a replay, or outside what is
    /// applied) and nothing unsettled comes before it.
    pub fn passed(&mut self, offset: i64) {
        self.settled_next = self.settled_next.max(Some(offset + 1));
    }

    /// Events up to the offset before `next` were written into the open transaction.
    pub fn written_to(&mut self, next: i64) {
        self.settled_next = self.settled_next.max(Some(next));
    }

    /// The offset a commit now stores, if it moves the committed one.
    pub fn to_store(&self) -> Option<i64> {
        self.settled_next.filter(|&s| Some(s) > self.committed_next)
    }

    /// The transaction storing `next` committed.
    pub fn committed(&mut self, next: i64) {
        self.committed_next = self.committed_next.max(Some(next));
    }

    /// The open transaction was rolled back: what it settled is unsettled again.
    pub fn rolled_back(&mut self) {
        self.settled_next = self.committed_next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Lsn;

    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Ev(Mark);

    impl Marked for Ev {
        fn mark(&self) -> Mark {
            self.0
        }
    }

    /// Event `seq` of transaction `lsn` at `offset`.
    fn ev(lsn: u64, seq: u32, last: bool, offset: i64) -> Ev {
        Ev(Mark {
            position: Position {
                commit_lsn: Lsn(lsn),
                seq,
            },
            offset,
            last,
            commit_us: lsn as i64,
        })
    }

    #[test]
    fn a_deadlock_after_two_batches_writes_both_again() {
        let mut t = OpenTxn::default();
        t.began();
        assert!(t.wrote(vec![ev(10, 0, true, 0)], 10).is_empty());
        assert!(t
            .wrote(vec![ev(20, 0, false, 1), ev(20, 1, true, 2)], 10)
            .is_empty());
        assert!(t.may_retry_in_place());
        let again = t.rolled_back();
        assert_eq!(
            again,
            [ev(10, 0, true, 0), ev(20, 0, false, 1), ev(20, 1, true, 2)]
        );
        assert!(!t.is_open());
        assert_eq!(t.committable(), Ok(None));
    }

    #[test]
    fn a_transaction_larger_than_what_is_kept_is_never_retried_in_place() {
        let mut t = OpenTxn::default();
        t.began();
        assert!(t.wrote(vec![ev(10, 0, true, 0)], 2).is_empty());
        let freed = t.wrote(vec![ev(20, 0, false, 1), ev(20, 1, true, 2)], 2);
        assert_eq!(freed.len(), 3);
        assert!(!t.may_retry_in_place());
        // Nor one holding a dead letter of a message that is no event.
        let mut t = OpenTxn::<Ev>::default();
        t.began();
        t.wrote_unkept();
        assert!(!t.may_retry_in_place());
    }

    #[test]
    fn a_partial_write_is_never_retried_in_place() {
        let mut t = OpenTxn::default();
        t.began();
        let freed = t.wrote(vec![ev(10, 0, false, 0), ev(10, 1, false, 1)], 100);
        assert_eq!(freed.len(), 2);
        assert!(!t.may_retry_in_place());
        // Even once its end is written: what was given up is gone.
        t.wrote(vec![ev(10, 2, true, 2)], 100);
        assert!(!t.may_retry_in_place());
    }

    #[test]
    fn part_of_a_source_transaction_is_never_committed() {
        let mut t = OpenTxn::default();
        t.began();
        let mut freed = t.wrote(vec![ev(10, 0, true, 0), ev(20, 0, false, 1)], 10);
        assert!(t.holds_partial());
        assert_eq!(t.committable(), Err(PartialWritten));
        freed.extend(t.wrote(vec![ev(20, 1, true, 2)], 10));
        let reach = Reach {
            applied: ev(20, 1, true, 2).0.position,
            next_offset: 3,
        };
        assert_eq!(t.committable(), Ok(Some(reach)));
        let (rest, commits) = t.committed();
        freed.extend(rest);
        assert_eq!((freed.len(), commits), (3, vec![10, 20]));
    }

    #[test]
    fn the_committed_offset_moves_only_after_commit_and_never_past_what_is_held() {
        let mut o = Offsets::at(Some(5));
        // A replay passes; events taken and held are read but not settled.
        o.read(5);
        o.passed(5);
        o.read(6);
        o.read(7);
        assert_eq!(o.to_store(), Some(6));
        // Written up to 7 (offset 6 held back until now).
        o.written_to(8);
        assert_eq!((o.to_store(), o.committed_next), (Some(8), Some(5)));
        // A rollback unsettles what the transaction wrote.
        o.rolled_back();
        assert_eq!(o.to_store(), None);
        o.written_to(8);
        o.committed(8);
        assert_eq!((o.to_store(), o.committed_next), (None, Some(8)));
        assert_eq!(o.consumed_next, Some(8));
    }
}
