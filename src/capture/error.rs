//! The capture pipeline's one error type and its classification.
//!
//! Everything a capture session can fail on (the node, the walsender stream, the
//! decoder, the reader, Kafka) is a [`CaptureError`] naming the node; the supervisor
//! retries the transient ones and stops on the definite ones.

use crate::capture::assembler::AssemblerError;
use crate::capture::pgoutput::DecodeError;
use crate::event::Lsn;
use crate::kafka::BrokerError;
use crate::pg::error::SqlError;
use crate::pg::node::NodeError;
use crate::pg::walsender::WalsenderError;
use crate::{Classify, ErrorClass};

/// Errors of a node's source pipeline.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Lease(#[from] crate::standby::LeaseError),
    #[error("node {node}: {source}")]
    Walsender {
        node: String,
        source: WalsenderError,
    },
    #[error("node {node}: cannot decode pgoutput message at LSN {lsn}: {source}")]
    Decode {
        node: String,
        lsn: Lsn,
        source: DecodeError,
    },
    #[error("node {node}: {source}")]
    Reader {
        node: String,
        source: AssemblerError,
    },
    #[error("node {node}: nothing received for {ms} ms (source.receive_timeout_ms) although duplex's heartbeat writes WAL every source.heartbeat_interval_ms: the connection is stalled; reconnecting")]
    Stalled { node: String, ms: u64 },
    #[error(transparent)]
    Sql(#[from] SqlError),
    #[error("node {node}: Kafka: {source}")]
    Broker { node: String, source: BrokerError },
    #[error("node {node} is not ready for duplex:\n  {}", problems.join("\n  "))]
    Preflight { node: String, problems: Vec<String> },
}

impl Classify for CaptureError {
    fn class(&self) -> ErrorClass {
        match self {
            CaptureError::Node(e) => e.class(),
            CaptureError::Lease(e) => e.class(),
            CaptureError::Walsender { source, .. } => source.class(),
            CaptureError::Sql(e) => e.class(),
            CaptureError::Broker { source, .. } => source.class(),
            // The same bytes decode the same way on every retry.
            CaptureError::Decode { .. } | CaptureError::Reader { .. } => ErrorClass::Definite,
            CaptureError::Preflight { .. } => ErrorClass::Definite,
            CaptureError::Stalled { .. } => ErrorClass::Transient,
        }
    }
}
