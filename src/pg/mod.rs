//! PostgreSQL, and what duplex keeps on each node: used by both pipelines.
//!
//! `sql` holds the session output settings, quoting and the SQLSTATE policy; `error`
//! the one error of a failed statement, `SqlError`; `node`
//! opens sessions with duplex's fixed settings and describes and classifies SQL
//! errors; `setup` creates or removes the `duplex` schema, publication, slot and
//! replication origins, bringing the `duplex` schema to its latest version through
//! `state`'s numbered migrations; `state` owns what duplex records about itself
//! there; `triggers` installs the tombstone and identity triggers on the
//! configured tables; `history` checks that a node did not go back in time; `table`
//! reads a configured table's columns and key; `tls` encrypts and authenticates the
//! connections to a node; `walsender` speaks the streaming replication protocol
//! (capture reads a slot through it, `duplex check` tries a replication login).

pub(crate) mod error;
pub(crate) mod history;
pub(crate) mod node;
pub(crate) mod setup;
pub(crate) mod sql;
pub(crate) mod state;
pub mod table;
pub(crate) mod tls;
pub(crate) mod triggers;
pub mod walsender;
