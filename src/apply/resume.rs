//! Resuming a direction at its stored Kafka offset, and proving nothing lies between.
//!
//! After the consumer is assigned at the stored offset, the first message read must be
//! that offset: a later one means the broker no longer has the messages in between, and
//! the direction halts rather than skip them. One broker behaviour looks the same but is
//! not a loss: asked for an offset inside a record batch, some Kafka-protocol brokers
//! answer with the next batch instead of the one holding the offset (Apache Kafka
//! answers with the batch itself, and librdkafka drops its messages before the offset),
//! and a stored position is inside a batch whenever a transaction ended there. So before
//! calling it a loss, duplex reads back from earlier offsets (1, 2, 4, … before the stored
//! one, never before the log start) until the broker returns a message at or before the
//! stored offset, and skips the ones before it, as a Kafka client does with a batch that
//! starts early. Only if even the log start yields a later offset, or the messages read
//! back jump over the stored one, is the position lost.

/// What the consumer loop does with a message while resuming.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// Hand it to the worker: the stored offset has been reached.
    Apply,
    /// Drop it: it lies before the stored offset, already applied.
    Skip,
    /// Assign the partition again from this offset and drop the message.
    ReadFrom(i64),
    /// The messages from the stored offset up to `first` are not in the log.
    Lost { first: i64 },
}

/// The state of resuming at a stored offset (see the module doc).
#[derive(Debug)]
pub(super) struct Resume {
    /// The offset the first applied message must have.
    stored: i64,
    /// The partition's first retained offset when the direction started.
    low: i64,
    /// The offset the partition is currently assigned from.
    from: i64,
    /// A message before `stored` was read since the last assignment.
    saw_before: bool,
    done: bool,
}

impl Resume {
    /// Resuming at `stored`, with `low` the log start (at most `stored`).
    pub fn at(stored: i64, low: i64) -> Resume {
        Resume {
            stored,
            low: low.min(stored),
            from: stored,
            saw_before: false,
            done: false,
        }
    }

    /// Decides what to do with the message at `offset`.
    pub fn on(&mut self, offset: i64) -> Step {
        if self.done {
            return Step::Apply;
        }
        if offset == self.stored {
            self.done = true;
            return Step::Apply;
        }
        if offset < self.stored {
            self.saw_before = true;
            return Step::Skip;
        }
        // Past the stored offset. After reading up to just before it, that is a hole.
        if self.saw_before || self.from <= self.low {
            return Step::Lost { first: offset };
        }
        let back = (2 * (self.stored - self.from)).max(1);
        self.from = (self.stored - back).max(self.low);
        Step::ReadFrom(self.from)
    }

    /// The offset the first applied message must have.
    pub fn stored(&self) -> i64 {
        self.stored
    }

    /// How far back from the stored offset reading had to start (0 when it did not).
    pub fn read_back(&self) -> i64 {
        self.stored - self.from
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_offset_first_is_applied_at_once() {
        let mut r = Resume::at(100, 0);
        assert_eq!(r.on(100), Step::Apply);
        assert_eq!(r.on(105), Step::Apply);
        assert_eq!(r.read_back(), 0);
    }

    #[test]
    fn a_batch_answered_late_is_read_back_doubling_until_it_is_found() {
        // The batch holding 100 spans 95..=102; the broker answers a fetch inside it
        // with the next batch, at 103.
        let mut r = Resume::at(100, 0);
        assert_eq!(r.on(103), Step::ReadFrom(99));
        assert_eq!(r.on(103), Step::ReadFrom(98));
        assert_eq!(r.on(103), Step::ReadFrom(96));
        assert_eq!(r.on(103), Step::ReadFrom(92));
        // From 92, inside the previous batch, the broker answers with 95..=102.
        for o in 95..100 {
            assert_eq!(r.on(o), Step::Skip);
        }
        assert_eq!(r.on(100), Step::Apply);
        assert_eq!(r.on(101), Step::Apply);
        assert_eq!(r.read_back(), 8);
    }

    #[test]
    fn reading_back_stops_at_the_log_start() {
        let mut r = Resume::at(10, 7);
        assert_eq!(r.on(12), Step::ReadFrom(9));
        assert_eq!(r.on(12), Step::ReadFrom(8));
        assert_eq!(r.on(12), Step::ReadFrom(7));
        assert_eq!(r.on(12), Step::Lost { first: 12 });
    }

    #[test]
    fn a_stored_offset_at_the_log_start_that_is_gone_is_lost_at_once() {
        let mut r = Resume::at(5, 5);
        assert_eq!(r.on(9), Step::Lost { first: 9 });
        // A low watermark past the stored offset is checked before resuming; here it
        // only bounds the reading back.
        let mut r = Resume::at(5, 8);
        assert_eq!(r.on(9), Step::Lost { first: 9 });
    }

    #[test]
    fn a_hole_just_before_the_stored_offset_is_lost() {
        // Read back to 96; 96..=98 arrive, then 101: 99 and 100 are gone.
        let mut r = Resume::at(100, 0);
        assert_eq!(r.on(104), Step::ReadFrom(99));
        assert_eq!(r.on(104), Step::ReadFrom(98));
        assert_eq!(r.on(104), Step::ReadFrom(96));
        assert_eq!(r.on(96), Step::Skip);
        assert_eq!(r.on(98), Step::Skip);
        assert_eq!(r.on(101), Step::Lost { first: 101 });
    }
}
