//! The sink side: where change events go.
//!
//! `kafka` produces a node's events onto its change topic and reports, in order, which
//! source commits are durable on the broker.

pub mod apply;
pub mod batch;
pub mod dead_letter;
pub mod kafka;
pub mod progress;
mod sequence;
pub mod target;
mod worker;
pub mod writer;
