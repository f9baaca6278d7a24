//! Integration tests against real PostgreSQL 15 clusters and Apache Kafka (KRaft).
//! `scripts/dev-env install` provides both.

mod admin;
mod apply;
mod auth;
mod bad_events;
mod bench_smoke;
mod broker_loss;
mod convergence;
mod copy_stalls;
mod cutover;
mod deploy;
mod gaps;
mod harness;
mod hostile;
mod identity;
mod interleavings;
mod long_transactions;
mod mapping;
mod mapping_edges;
mod network;
mod observability;
mod oversize;
mod partial;
mod privilege;
mod restore;
mod secrets;
mod slot_loss;
mod snapshot;
mod snapshot_edges;
mod source;
mod standby;
mod timeouts;
mod tls;
mod toast;
mod tombstones;
mod verify;
