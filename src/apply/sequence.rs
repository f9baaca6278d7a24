//! The order a direction's events must arrive in, and what to do when they do not.
//!
//! The source publishes each transaction whole and in order: events numbered from seq 0,
//! the last one flagged, each carrying the commit LSN of the transaction its capture
//! session published before (`prev_lsn`, absent on a session's first). After a crash or
//! a failed delivery it publishes transactions again from its last confirmed LSN, so
//! the topic may hold a transaction more than once; an idempotent producer that gives
//! up on messages can also leave a hole in one copy, or drop whole transactions from
//! it (librdkafka documents this), which the source then publishes again.
//!
//! [`Sequence`] classifies each event read against the last one taken: a replay of
//! something taken is a duplicate; the next event of the open transaction, or seq 0 of
//! a new one after a complete one that links to what was taken, is taken; anything
//! else means a hole: in the open transaction, or a whole transaction missing before
//! the new one. The events of the broken transaction are discarded (never committed
//! past) and everything is skipped until the source's next copy: that transaction at
//! seq 0 again, or, for a missing one, a transaction that links to what was taken.
//! Skipped events never move the stored offset (see `worker`), so a restart reads
//! them again rather than past them.
//!
//! A direction's first start reads from a start recorded before a copy, or from its
//! stream's first offset: a transaction cut by that offset (its head before it) was
//! copied, or is not of this stream, so it is outside what the direction applies.

use crate::event::{Lsn, Position};

/// A source transaction found incomplete or missing, waiting for its next copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    /// The incomplete (or missing) transaction's commit LSN.
    pub commit_lsn: Lsn,
    /// The Kafka offset of the event that showed the hole: the next copy comes after.
    pub offset: i64,
    /// The event that showed the hole, and the seq the transaction needed instead
    /// (`None`: a new transaction was needed, at seq 0).
    pub found: Position,
    pub expected: Option<u32>,
    /// The whole transaction `commit_lsn` is missing: `found`'s transaction links to
    /// it, and nothing taken reaches it.
    pub whole: bool,
}

impl std::fmt::Display for Gap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.whole {
            return write!(
                f,
                "source transaction {} is missing: transaction {} (Kafka offset {}) follows it, and nothing applied reaches it",
                self.commit_lsn, self.found.commit_lsn, self.offset
            );
        }
        let expected = self
            .expected
            .map_or("a new transaction".into(), |s| format!("seq {s}"));
        write!(
            f,
            "source transaction {} arrived with events missing (found {} at Kafka offset {}, expected {expected})",
            self.commit_lsn, self.found, self.offset
        )
    }
}

/// What to do with an event read.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Apply it.
    Take,
    /// It was taken before (a replay), or lies outside what this direction applies
    /// (a transaction cut by the first start's offset): skip it, and the stored offset
    /// may pass it.
    Duplicate,
    /// A transaction waits for its next copy: skip it, without passing it.
    Skip,
    /// The open transaction has a hole, or one is missing before it: discard the
    /// `taken` events of it already taken, and skip this one.
    Gap { gap: Gap, taken: usize },
}

/// An event read while a transaction waits for its next copy.
enum Awaited {
    /// Before the broken transaction: read as usual.
    Before,
    /// Still before the next copy: skipped.
    Skip,
    /// The next copy's first event.
    Arrived,
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
    /// Nothing was taken yet at a first start: events before the first seq 0 are a
    /// transaction cut by the start offset (see the module doc).
    cut_start: bool,
}

impl Sequence {
    /// Resuming after `applied` (a transaction's end), still waiting for `awaiting`'s
    /// transaction if a gap was found before. With nothing applied, this is a first
    /// start, where a transaction cut by the start offset is outside the stream.
    pub fn new(applied: Option<Position>, awaiting: Option<Gap>) -> Sequence {
        Sequence {
            applied,
            boundary: true,
            txn_base: applied,
            txn_taken: 0,
            awaiting,
            cut_start: applied.is_none() && awaiting.is_none(),
        }
    }

    /// A new stream of the source (its slot was created again), read from its first
    /// event: nothing of it may be missing, not even its first transaction's head.
    pub fn new_stream() -> Sequence {
        Sequence {
            cut_start: false,
            ..Sequence::new(None, None)
        }
    }

    /// The last event taken.
    #[cfg(test)]
    pub fn applied(&self) -> Option<Position> {
        self.applied
    }

    /// The last event taken ended its transaction (or nothing was taken).
    pub fn at_boundary(&self) -> bool {
        self.boundary
    }

    /// Classifies the event at `pos` (flagged `last` if it ends its transaction,
    /// linking to `prev`) read at Kafka offset `offset`, and advances past it if it is
    /// taken.
    pub fn next(&mut self, pos: Position, last: bool, prev: Option<Lsn>, offset: i64) -> Next {
        if self.applied.is_some_and(|a| pos <= a) {
            return Next::Duplicate;
        }
        if self.cut_start {
            if pos.seq != 0 {
                return Next::Duplicate;
            }
            self.cut_start = false;
        }
        if let Some(g) = self.awaiting {
            match self.awaited(&g, pos, prev, offset) {
                Awaited::Before => {}
                Awaited::Skip => return Next::Skip,
                Awaited::Arrived => self.awaiting = None,
            }
        }
        if let Some(gap) = self.gap_at(pos, prev, offset) {
            // A transaction taken whole stays taken; only the open one is dropped.
            let taken = if self.boundary { 0 } else { self.txn_taken };
            if !self.boundary {
                self.applied = self.txn_base;
            }
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

    /// Where the event stands against the next copy of `g`'s transaction.
    fn awaited(&self, g: &Gap, pos: Position, prev: Option<Lsn>, offset: i64) -> Awaited {
        if g.whole {
            // The source's next copy starts at a transaction that links to what was
            // taken (or opens a session).
            return match pos.seq != 0 || offset <= g.offset || !self.links(prev) {
                true => Awaited::Skip,
                false => Awaited::Arrived,
            };
        }
        // Transactions before the broken one are read as usual (a new session reads
        // them again); it and those after it wait for its next copy.
        if pos.commit_lsn < g.commit_lsn {
            Awaited::Before
        } else if pos.commit_lsn == g.commit_lsn && pos.seq == 0 && offset > g.offset {
            Awaited::Arrived
        } else {
            Awaited::Skip
        }
    }

    /// `prev` (what the event's transaction follows) is no further than what was
    /// taken, so nothing lies between.
    fn links(&self, prev: Option<Lsn>) -> bool {
        match (prev, self.applied) {
            (Some(p), Some(a)) => p <= a.commit_lsn,
            _ => true,
        }
    }

    /// The hole the event shows, if any.
    fn gap_at(&self, pos: Position, prev: Option<Lsn>, offset: i64) -> Option<Gap> {
        let open = self.applied.filter(|_| !self.boundary);
        let expected = match open {
            Some(a) => {
                let next = a.seq.saturating_add(1);
                if a.commit_lsn == pos.commit_lsn && pos.seq == next {
                    return None;
                }
                Some(next)
            }
            None if pos.seq != 0 => None,
            None if !self.links(prev) => {
                return Some(Gap {
                    commit_lsn: prev.unwrap_or(pos.commit_lsn),
                    offset,
                    found: pos,
                    expected: None,
                    whole: true,
                })
            }
            None => return None,
        };
        Some(Gap {
            commit_lsn: open.map_or(pos.commit_lsn, |a| a.commit_lsn),
            offset,
            found: pos,
            expected,
            whole: false,
        })
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
            .map(|(i, &(lsn, seq, last))| s.next(pos(lsn, seq), last, None, i as i64))
            .collect()
    }

    /// Feeds (lsn, seq, last, prev) events at offsets 0, 1, ...; returns the verdicts.
    fn feed_linked(s: &mut Sequence, events: &[(u64, u32, bool, Option<u64>)]) -> Vec<Next> {
        events
            .iter()
            .enumerate()
            .map(|(i, &(lsn, seq, last, prev))| {
                s.next(pos(lsn, seq), last, prev.map(Lsn), i as i64)
            })
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
            whole: false,
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
        let mut s = Sequence::new_stream();
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
            whole: false,
        };
        let mut s = Sequence::new(Some(pos(5, 0)), Some(gap));
        // Rolled back with it: a transaction before it, read again first.
        assert_eq!(s.next(pos(10, 0), true, None, -1), Take);
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

    #[test]
    fn a_first_start_skips_the_transaction_its_offset_cuts_and_nothing_else() {
        // Read from a start recorded before a copy: 10's head lies before it.
        let mut s = Sequence::new(None, None);
        let v = feed(
            &mut s,
            &[(10, 2, false), (10, 3, true), (20, 0, false), (20, 1, true)],
        );
        assert_eq!(v, [Duplicate, Duplicate, Take, Take]);
        assert_eq!((s.applied(), s.at_boundary()), (Some(pos(20, 1)), true));
        // Once something was taken, a headless transaction is a hole again.
        assert!(matches!(
            s.next(pos(30, 1), true, None, 9),
            Next::Gap { taken: 0, .. }
        ));
        // A new stream of the source starts at its first event: no cut allowed.
        let mut s = Sequence::new_stream();
        assert!(matches!(
            s.next(pos(10, 2), false, None, 0),
            Next::Gap { .. }
        ));
    }

    #[test]
    fn a_whole_transaction_missing_is_a_gap_until_a_copy_links_again() {
        // 20 and 30 never reached the topic in the first session: 40 links to 30.
        let mut s = Sequence::new(Some(pos(10, 0)), None);
        let v = feed_linked(
            &mut s,
            &[
                (40, 0, true, Some(30)),
                (50, 0, true, Some(40)),
                (20, 0, true, None), // the next session publishes from 20 again
                (30, 0, false, Some(20)),
                (30, 1, true, Some(20)),
                (40, 0, true, Some(30)),
                (50, 0, true, Some(40)),
            ],
        );
        let gap = Gap {
            commit_lsn: Lsn(30),
            offset: 0,
            found: pos(40, 0),
            expected: None,
            whole: true,
        };
        assert_eq!(
            v,
            [
                Next::Gap { gap, taken: 0 },
                Skip,
                Take,
                Take,
                Take,
                Take,
                Take
            ]
        );
        assert_eq!(s.applied(), Some(pos(50, 0)));
    }

    #[test]
    fn links_to_what_was_taken_or_to_nothing_are_no_gap() {
        let mut s = Sequence::new(Some(pos(10, 0)), None);
        let v = feed_linked(
            &mut s,
            &[
                (20, 0, true, Some(10)),
                (30, 0, true, None),     // a new session's first transaction
                (30, 0, true, Some(20)), // a replay
                (40, 0, true, Some(5)),  // links below what was taken
            ],
        );
        assert_eq!(v, [Take, Take, Duplicate, Take]);
    }
}
