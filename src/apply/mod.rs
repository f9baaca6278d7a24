//! Apply: a peer's topic into a node, exactly once.
//!
//! `session` runs an apply session: it reads the source node's topic from the position
//! stored in the target (`start` says where a direction with none begins), through
//! `intake` (reading and decoding on a task of its own, `resume` checking the first
//! message against the stored offset); `worker` gathers events into batches
//! (`sequence` says which to take, `batch` readies them, `worker/txn` keeps the open
//! transaction's and the offsets' books) and commits whole source transactions with
//! their position through the last-writer-wins writer in `crate::lww`; `progress`
//! reports where the direction stands; `dead_letter` keeps the events the target
//! refused and replays them; `republish` sends again, in transactions of their own, the
//! repairs and pairings a node's walsender drops with the applied transactions;
//! `watchdog` gives up a session whose connection stalled; `error` says which
//! failures retry and which halt the direction.

pub(crate) mod batch;
pub(crate) mod dead_letter;
pub(crate) mod error;
mod intake;
pub(crate) mod progress;
mod republish;
mod resume;
mod sequence;
pub(crate) mod session;
mod start;
mod watchdog;
mod worker;
