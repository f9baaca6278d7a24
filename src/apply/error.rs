//! The errors of a direction's apply session, each with its one classification:
//! what retries (lost connections, deadlocks past their in-place retries, Kafka
//! outages, transactions to read again) and what halts the direction with a message
//! saying what to fix (a bad event, a position the topic no longer holds).

use crate::apply::sequence::Gap;
use crate::kafka::{self, BrokerError};
use crate::lww::WriteError;
use crate::pg::node::NodeError;
use crate::{Classify, ErrorClass};
use rdkafka::error::KafkaError;

/// Errors of an apply worker.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Lease(#[from] crate::standby::LeaseError),
    #[error(transparent)]
    Snapshot(Box<crate::snapshot::SnapshotError>),
    #[error("direction {direction}: Kafka: {source}")]
    Kafka {
        direction: String,
        source: KafkaError,
    },
    #[error("direction {direction}: {source}")]
    Broker {
        direction: String,
        source: BrokerError,
    },
    #[error(transparent)]
    PositionLost(Box<LostPosition>),
    #[error("direction {direction}: {gap}; rolled back what was written of it, reading again from the last commit and waiting for the source to publish it again")]
    IncompleteTransaction { direction: String, gap: Gap },
    #[error("node {node}: {detail}")]
    Waiting { node: String, detail: String },
    #[error("direction {direction}: no message for {secs} s while part of source transaction {commit_lsn} was written to the target: rolled it back to release its row locks; reading it again from the last commit")]
    Stalled {
        direction: String,
        commit_lsn: String,
        secs: u64,
    },
    #[error("direction {direction}: the apply session on node {to} got no answer for {waited_s:.1} s and is taken for stalled: {why}; reconnecting and writing the open transaction again from the last commit (sync.receive_timeout_ms sets how long it waits)")]
    TargetStalled {
        direction: String,
        to: String,
        waited_s: f64,
        why: String,
    },
    #[error(transparent)]
    BadEvent(Box<HaltingEvent>),
}

/// An event the target refused, which halts its direction.
#[derive(Debug, thiserror::Error)]
#[error("direction {direction} halted on a bad event: table {table}, key {key}, source position {position} (Kafka offset {offset}): {reason}. Fix the target (or set sync.on_error = \"dead_letter\") and restart duplex")]
pub struct HaltingEvent {
    pub direction: String,
    pub table: String,
    pub key: String,
    pub position: String,
    pub offset: i64,
    pub reason: String,
}

/// A stored position the topic no longer holds, and how to resynchronise.
#[derive(Debug, thiserror::Error)]
#[error("direction {direction}: the stored position (Kafka offset {offset} of topic {topic}) is not in the topic any more: {detail}. The events in between cannot be read, so nothing was applied past them. To resynchronise: delete this direction's row from duplex.apply_positions on node {to} (DELETE FROM duplex.apply_positions WHERE source_node = '{from}'), run `duplex snapshot` (it sets where the direction starts reading and copies what it missed, deletes included), and start duplex")]
pub struct LostPosition {
    pub direction: String,
    pub from: String,
    pub to: String,
    pub topic: String,
    pub offset: i64,
    pub detail: String,
}

impl From<crate::pg::node::SqlError> for ApplyError {
    fn from(e: crate::pg::node::SqlError) -> Self {
        ApplyError::Write(WriteError::Sql(e))
    }
}

impl From<crate::snapshot::SnapshotError> for ApplyError {
    fn from(e: crate::snapshot::SnapshotError) -> Self {
        ApplyError::Snapshot(Box::new(e))
    }
}

impl Classify for ApplyError {
    fn class(&self) -> ErrorClass {
        match self {
            ApplyError::Write(e) => e.class(),
            ApplyError::Node(e) => e.class(),
            ApplyError::Lease(e) => e.class(),
            ApplyError::Snapshot(e) => e.class(),
            ApplyError::Kafka { source, .. } => kafka::class_of(source),
            ApplyError::IncompleteTransaction { .. }
            | ApplyError::Waiting { .. }
            | ApplyError::Stalled { .. }
            | ApplyError::TargetStalled { .. } => ErrorClass::Transient,
            ApplyError::Broker { source, .. } => source.class(),
            ApplyError::BadEvent(_) | ApplyError::PositionLost(_) => ErrorClass::Definite,
        }
    }
}
