//! Capture: a node's committed changes onto its Kafka topic.
//!
//! A capture session reads the node's slot through [`crate::pg::walsender`] (the
//! streaming replication protocol); `pgoutput` decodes the plugin's messages;
//! `assembler` assembles them into change events, numbered per transaction;
//! `producer` sends them to the node's topic and reports, in order, which commits the
//! broker has made durable; `session` drives one node's stream and confirms to the
//! slot only what `confirm` finds durable on Kafka; `catalog` reads each announced
//! relation's types and key; `error` is capture's one error type.

pub mod assembler;
pub(crate) mod catalog;
pub(crate) mod confirm;
pub(crate) mod error;
pub mod pgoutput;
pub(crate) mod producer;
pub(crate) mod session;
