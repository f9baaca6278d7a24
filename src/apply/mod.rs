//! Apply: a peer's topic into a node, exactly once.
//!
//! `consumer` reads the source node's topic from the position stored in the target;
//! `worker` gathers events into batches (`sequence` says which to take, `batch` readies
//! them) and commits whole source transactions with their position; `writer` writes
//! them under last-writer-wins (`target` builds its SQL); `progress` stores and reports
//! where the direction stands; `dead_letter` keeps the events the target refused;
//! `watchdog` gives up a session whose connection stalled; `error` says which
//! failures retry and which halt the direction.

pub(crate) mod batch;
pub(crate) mod consumer;
pub(crate) mod dead_letter;
pub(crate) mod error;
mod intake;
pub(crate) mod progress;
mod resume;
mod sequence;
pub mod target;
mod watchdog;
mod worker;
pub(crate) mod writer;
