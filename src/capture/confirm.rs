//! What a capture session may confirm to its replication slot: the one correctness
//! core of capture, kept free of I/O.
//!
//! Confirming an LSN lets PostgreSQL drop the WAL before it for good, so it must never
//! pass a change that is not durable on Kafka. Two positions are safe: the end of the
//! newest commit whose every message the broker acknowledged (the delivery tracker's
//! durable LSN), and, when nothing handed over is still unacknowledged and no
//! transaction is open, the newest position the node reported (a keepalive, or a
//! non-transactional message such as duplex's heartbeat), past which it sent nothing
//! of ours.

use crate::event::Lsn;

/// Positions of one capture session, for deciding what to confirm.
#[derive(Debug, Default)]
pub struct SlotProgress {
    /// End LSN of the newest commit handed to the delivery tracker.
    handed_over: Lsn,
    /// Newest position the node reported with nothing of ours pending before it.
    reported: Lsn,
    /// The position last sent to the slot.
    confirmed: Lsn,
}

impl SlotProgress {
    /// A commit ending at `end` was handed to the delivery tracker.
    pub fn handed_over(&mut self, end: Lsn) {
        self.handed_over = end;
    }

    /// The node reported `position` (keepalive, or a message outside a transaction).
    pub fn reported(&mut self, position: Lsn) {
        self.reported = self.reported.max(position);
    }

    /// The position to send now, given the tracker's `durable` LSN and whether a
    /// transaction is open; `None` when there is nothing new to confirm and the node did
    /// not ask for a reply (`force`). A reply always goes out, even at zero (inside a
    /// session's first transaction), and never moves the position back.
    pub fn confirmable(&mut self, durable: Lsn, in_transaction: bool, force: bool) -> Option<Lsn> {
        let mut flush = durable;
        if !in_transaction && durable >= self.handed_over {
            flush = flush.max(self.reported);
        }
        if flush <= self.confirmed && !force {
            return None;
        }
        self.confirmed = self.confirmed.max(flush);
        Some(self.confirmed)
    }

    /// The position last sent to the slot.
    pub fn confirmed(&self) -> Lsn {
        self.confirmed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_durable_commits_are_confirmed_while_deliveries_are_pending() {
        let mut p = SlotProgress::default();
        p.handed_over(Lsn(300));
        p.reported(Lsn(500));
        // The commit ending at 300 is not acknowledged yet: only 200 is durable, and
        // the node's report past the pending commit must wait.
        assert_eq!(p.confirmable(Lsn(200), false, false), Some(Lsn(200)));
        assert_eq!(p.confirmable(Lsn(200), false, false), None);
        // Acknowledged: the node's later report is safe too.
        assert_eq!(p.confirmable(Lsn(300), false, false), Some(Lsn(500)));
    }

    #[test]
    fn an_open_transaction_holds_back_the_nodes_report() {
        let mut p = SlotProgress::default();
        p.handed_over(Lsn(100));
        p.reported(Lsn(900));
        assert_eq!(p.confirmable(Lsn(100), true, false), Some(Lsn(100)));
        assert_eq!(p.confirmable(Lsn(100), false, false), Some(Lsn(900)));
    }

    #[test]
    fn replies_go_out_even_with_nothing_new_and_never_move_back() {
        let mut p = SlotProgress::default();
        // Inside a session's first transaction nothing is durable: still a reply.
        assert_eq!(p.confirmable(Lsn::ZERO, true, true), Some(Lsn::ZERO));
        p.reported(Lsn(400));
        assert_eq!(p.confirmable(Lsn::ZERO, false, false), Some(Lsn(400)));
        // A stale durable LSN after that confirms 400 again, never less.
        assert_eq!(p.confirmable(Lsn(50), false, true), Some(Lsn(400)));
        assert_eq!(p.confirmed(), Lsn(400));
    }
}
