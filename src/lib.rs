//! duplex keeps two PostgreSQL databases in sync in both directions through Kafka.
//!
//! Data flows `source` (walsender + pgoutput decoder) → `event` (the change envelope)
//! → `sink::kafka` (one topic per node); `pipeline` drives that flow and feeds durable
//! positions back to the replication slot. `config` and `cli` sit around it, `metrics`
//! exports what happens.

pub mod cli;
pub mod config;
pub mod event;
pub mod identity;
pub mod metrics;
pub mod pipeline;
pub mod preflight;
pub mod sink;
pub mod source;
pub mod status;

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
