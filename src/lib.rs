//! duplex keeps two PostgreSQL databases in sync in both directions through Kafka.
//!
//! Two pipelines joined by Kafka: `capture` (a node's WAL → `event`s → the node's
//! topic) and `apply` (the peer's topic → last-writer-wins writes into a node), plus
//! `snapshot`, which copies the rows that predate duplex before a direction first
//! applies. They share `lww` (the last-writer-wins writer into a node), `mapping`
//! (legacy/modern table pairs), `pg` (PostgreSQL, and what duplex keeps on each
//! node), `kafka`, `config`, `metrics` and `identity`. `daemon` runs them, `runtime` keeps their tasks alive,
//! `cli` parses commands; `status`, `preflight` and `verify` read both sides, and
//! `cutover` combines status and verify into the switch-over gate; `standby` lets
//! a second instance wait to take over. See
//! ARCHITECTURE.md.

pub mod apply;
pub mod capture;
pub mod cli;
pub mod config;
pub(crate) mod cutover;
pub(crate) mod daemon;
pub mod event;
pub mod identity;
pub(crate) mod kafka;
pub(crate) mod lww;
pub(crate) mod mapping;
pub(crate) mod metrics;
pub mod pg;
pub(crate) mod preflight;
pub(crate) mod runtime;
pub(crate) mod snapshot;
pub(crate) mod standby;
pub(crate) mod status;
pub(crate) mod verify;

/// How an error is handled, decided once where it is classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Goes away by itself (connection lost, node restarting): retry with backoff.
    Transient,
    /// Needs an operator (auth failed, table missing, wal_level wrong): stop and say why.
    Definite,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Definite => "definite",
        }
    }
}

/// Errors that know how they are handled.
pub trait Classify {
    fn class(&self) -> ErrorClass;
}
