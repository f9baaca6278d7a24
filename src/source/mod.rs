//! The source side: reads a node's committed changes through logical replication.
//!
//! `walsender` speaks the streaming replication protocol, `pgoutput` decodes the
//! plugin's binary messages, `slot` manages the publication, slot, origins and the
//! `duplex` schema on the node, `history` checks that a node did not go back in time,
//! `triggers` the tombstone and identity triggers on the
//! configured tables, and `reader` turns decoded messages into change events.

pub mod history;
pub mod pgoutput;
pub mod reader;
pub mod slot;
pub mod triggers;
pub mod walsender;
