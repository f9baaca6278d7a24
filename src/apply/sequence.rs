//! The order a direction's events must arrive in, and what to do when they do not.
//!
//! The source publishes each transaction whole and in order: events numbered from seq 0,
//! the last one flagged. After a crash or a failed delivery it publishes transactions
//! again from its last confirmed LSN, so the topic may hold a transaction more than
//! once; an idempotent producer that gives up on a message can also leave a hole in one
//! copy (librdkafka documents this), which the source then publishes again whole.
//!
//! [`Sequence`] classifies each event read against the last one taken: a replay of
//! something taken is a duplicate; the next event of the open transaction, or seq 0 of
//! a new one after a complete one, is taken; anything else means the open transaction
//! has a hole. Its events are then discarded (never committed past) and everything is
//! skipped until that transaction starts again, at seq 0, later in the log: the copy
//! the source publishes when it restarts from its confirmed LSN.

use crate::event::{Lsn, Position};

/// A source transaction found with a hole, waiting for its next copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    /// The incomplete transaction's commit LSN.
    pub commit_lsn: Lsn,
    /// The Kafka offset of the event that showed the hole: the next copy comes after.
    pub offset: i64,
    /// The event that showed the hole, and the seq the transaction needed instead
    /// (`None`: a new transaction was needed, at seq 0).
    pub found: Position,
    pub expected: Option<u32>,
}

/// What to do with an event read.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Apply it.
    Take,
    /// It was taken before (a replay): skip it.
    Duplicate,
    /// A transaction waits for its next copy: skip it.
    Skip,
    /// The open transaction has a hole: discard the `taken` events of it already
    /// taken, and skip this one.
    Gap { gap: Gap, taken: usize },
}

/// The position reached in the source's event order.
#[derive(Debug)]
pub struct Sequence {
    /// The last event taken.
    applied: Option<Position>,
    /// That event ended its transaction.
    boundary: bool,
    /// `applied` before the open transaction's first event.
    txn_base: Option<Position>,
    /// Events of the open transaction taken.
    txn_taken: usize,
    awaiting: Option<Gap>,
}

impl Sequence {
    /// Resuming after `applied` (a transaction's end), still waiting for `awaiting`'s
    /// transaction if a gap was found before.
    pub fn new(applied: Option<Position>, awaiting: Option<Gap>) -> Sequence {
        Sequence {
            applied,
            boundary: true,
            txn_base: applied,
            txn_taken: 0,
            awaiting,
        }
    }

    /// The last event taken.
    pub fn applied(&self) -> Option<Position> {
        self.applied
    }

    /// The last event taken ended its transaction (or nothing was taken).
    pub fn at_boundary(&self) -> bool {
        self.boundary
    }

    /// Classifies the event at `pos` (flagged `last` if it ends its transaction) read
    /// at Kafka offset `offset`, and advances past it if it is taken.
    pub fn next(&mut self, pos: Position, last: bool, offset: i64) -> Next {
        if self.applied.is_some_and(|a| pos <= a) {
            return Next::Duplicate;
        }
        // Transactions before the broken one are read as usual (a new session reads
        // them again); it and those after it wait for its next copy.
        if let Some(g) = self.awaiting.filter(|g| pos.commit_lsn >= g.commit_lsn) {
            if pos.commit_lsn != g.commit_lsn || pos.seq != 0 || offset <= g.offset {
                return Next::Skip;
            }
            self.awaiting = None;
        }
        let expected = match self.applied {
            Some(a) if !self.boundary => (a.commit_lsn == pos.commit_lsn)
                .then(|| a.seq.checked_add(1))
                .flatten()
                .filter(|&s| s == pos.seq)
                .ok_or(Some(a.seq.saturating_add(1))),
            _ => (pos.seq == 0).then_some(0).ok_or(None),
        };
        if let Err(expected) = expected {
            let commit_lsn = match self.applied {
                Some(a) if !self.boundary => a.commit_lsn,
                _ => pos.commit_lsn,
            };
            let gap = Gap {
                commit_lsn,
                offset,
                found: pos,
                expected,
            };
            let taken = self.txn_taken;
            self.applied = self.txn_base;
            self.boundary = true;
            self.txn_taken = 0;
            self.awaiting = Some(gap);
            return Next::Gap { gap, taken };
        }
        if self.boundary {
            self.txn_base = self.applied;
            self.txn_taken = 0;
        }
        self.applied = Some(pos);
        self.boundary = last;
        self.txn_taken += 1;
        Next::Take
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Next::{Duplicate, Skip, Take};

    fn pos(lsn: u64, seq: u32) -> Position {
        Position {
            commit_lsn: Lsn(lsn),
            seq,
        }
    }

    /// Feeds (lsn, seq, last) events at offsets 0, 1, ...; returns the verdicts.
    fn feed(s: &mut Sequence, events: &[(u64, u32, bool)]) -> Vec<Next> {
        events
            .iter()
            .enumerate()
            .map(|(i, &(lsn, seq, last))| s.next(pos(lsn, seq), last, i as i64))
            .collect()
    }

    #[test]
    fn whole_transactions_and_replays() {
        let mut s = Sequence::new(None, None);
        let v = feed(
            &mut s,
            &[
                (10, 0, false),
                (10, 1, true),
                (20, 0, true),
                (10, 0, false), // replay from an earlier LSN
                (10, 1, true),
                (20, 0, true),
                (30, 0, false),
                (30, 1, false),
                (30, 0, false), // the source restarted inside 30: replayed whole
                (30, 1, false),
                (30, 2, true),
            ],
        );
        assert_eq!(
            v,
            [
                Take, Take, Take, Duplicate, Duplicate, Duplicate, Take, Take, Duplicate,
                Duplicate, Take
            ]
        );
        assert_eq!((s.applied(), s.at_boundary()), (Some(pos(30, 2)), true));
    }

    #[test]
    fn a_hole_discards_the_transaction_until_its_next_copy() {
        let mut s = Sequence::new(Some(pos(5, 0)), None);
        let v = feed(
            &mut s,
            &[
                (10, 0, true),
                (20, 0, false),
                (20, 1, false),
                (20, 3, false), // offset 3: seq 2 is missing
                (20, 4, true),
                (30, 0, true), // the old copy's next transaction
                (10, 0, true), // the source's replay from its confirmed LSN
                (20, 0, false),
                (20, 1, false),
                (20, 2, false),
                (20, 3, false),
                (20, 4, true),
                (30, 0, true),
            ],
        );
        let gap = Gap {
            commit_lsn: Lsn(20),
            offset: 3,
            found: pos(20, 3),
            expected: Some(2),
        };
        assert_eq!(
            v,
            [
                Take,
                Take,
                Take,
                Next::Gap { gap, taken: 2 },
                Skip,
                Skip,
                Duplicate,
                Take,
                Take,
                Take,
                Take,
                Take,
                Take
            ]
        );
        assert_eq!(s.applied(), Some(pos(30, 0)));
    }

    #[test]
    fn a_lost_tail_or_head_is_a_hole_too() {
        // Tail: transaction 20 never ends before 30 starts.
        let mut s = Sequence::new(None, None);
        let v = feed(&mut s, &[(20, 0, false), (30, 0, true), (20, 0, true)]);
        assert!(matches!(
            v[1],
            Next::Gap {
                gap: Gap {
                    commit_lsn: Lsn(20),
                    expected: Some(1),
                    ..
                },
                taken: 1
            }
        ));
        assert_eq!(v[2], Take);
        // Head: transaction 40 starts at seq 1.
        let mut s = Sequence::new(Some(pos(30, 0)), None);
        let v = feed(&mut s, &[(40, 1, true), (40, 0, false), (40, 1, true)]);
        assert!(matches!(
            v[0],
            Next::Gap {
                gap: Gap {
                    commit_lsn: Lsn(40),
                    expected: None,
                    ..
                },
                taken: 0
            }
        ));
        assert_eq!(v[1..], [Take, Take]);
        assert_eq!(s.applied(), Some(pos(40, 1)));
    }

    #[test]
    fn a_wait_carried_into_a_new_session_skips_the_broken_copy() {
        let gap = Gap {
            commit_lsn: Lsn(20),
            offset: 3,
            found: pos(20, 4),
            expected: Some(3),
        };
        let mut s = Sequence::new(Some(pos(5, 0)), Some(gap));
        // Rolled back with it: a transaction before it, read again first.
        assert_eq!(s.next(pos(10, 0), true, -1), Take);
        let v = feed(
            &mut s,
            &[
                (20, 0, false), // offsets 0-4: the broken copy, read again
                (20, 1, false),
                (20, 2, false),
                (20, 4, false),
                (20, 5, true),
                (20, 0, false), // offset 5: the next copy
                (20, 1, true),
            ],
        );
        assert_eq!(v, [Skip, Skip, Skip, Skip, Skip, Take, Take]);
        assert_eq!(s.awaiting, None);
    }
}
