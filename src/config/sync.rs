//! The `[sync]` section and `[[tables]]`: how changes are applied to the peer node.

use super::mapping::{ColumnMapConfig, NewKeyConfig};
use super::{invalid, ConfigError, DEFAULT_UPDATED_AT};
use serde::Deserialize;
use std::collections::BTreeMap;

/// Rows per target transaction. Memory follows it: the intake stage holds this many
/// decoded events ahead of the worker and the worker a batch of them (about 2.6 kB
/// each). Against 2,000, 5,000 caught up inserts no faster and a mixed backlog about
/// 7% faster, with peak RSS 20-40 MB higher.
pub const DEFAULT_BATCH_ROWS: usize = 2_000;
pub const DEFAULT_LINGER_MS: u64 = 20;
pub const DEFAULT_TOMBSTONE_RETENTION_MS: u64 = 7 * 24 * 3600 * 1000;
pub const DEFAULT_CONFLICTS_KEPT: i64 = 100_000;
pub const DEFAULT_REFERENCE_WAIT_MS: u64 = 10_000;
pub const DEFAULT_APPLY_RECEIVE_TIMEOUT_MS: u64 = 30_000;
/// Below this, a busy node would be asked about every statement.
pub const MIN_APPLY_RECEIVE_TIMEOUT_MS: u64 = 1_000;

/// Events a batch may grow to while an unfinished source transaction is held back,
/// at least (see [`BatchBounds::hold_max`]).
pub const HELD_MIN: usize = 1_000;

/// Everything `sync.batch_rows` bounds in a direction, named once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchBounds {
    /// Decoded messages the intake stage holds ahead of the worker.
    pub intake_capacity: usize,
    /// Messages the worker takes in one turn of its loop before it looks at its timers.
    pub per_turn: usize,
    /// Events that make a batch full: it is written at its source transaction's end.
    pub flush_at: usize,
    /// Events held back at most while a source transaction is unfinished; from there
    /// on it is written as it arrives (and may hold row locks until its end).
    pub hold_max: usize,
    /// Events of the open target transaction kept to write it again in place after
    /// a deadlock; a larger transaction restarts its session instead.
    pub retry_buffer: usize,
}

/// What a direction does with an event it cannot apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Stop the direction with a message naming table, key, LSN and the error.
    #[default]
    Halt,
    /// Record the event in the dead-letter topic and table, and go on.
    DeadLetter,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    /// `both`, or `<from>_to_<to>` with the configured node names.
    pub direction: Option<String>,
    pub on_error: OnError,
    /// Rows per target transaction, at most (a larger source transaction is applied
    /// whole, in several statements of this many rows); it bounds the intake stage and
    /// what is held back too (see [`SyncConfig::bounds`]).
    pub batch_rows: usize,
    /// How long a batch waits for more rows before it commits.
    pub linger_ms: u64,
    /// The node whose version wins when both carry the same `updated_at`; default the
    /// node whose name sorts first.
    pub tie_winner: Option<String>,
    /// Tombstones older than this are pruned.
    pub tombstone_retention_ms: u64,
    /// Rows kept in `duplex.conflicts`; older ones are pruned.
    pub conflicts_kept: i64,
    /// How long a mapped row waits, inside its batch, for the row its foreign key
    /// references to be paired on the target; then it is a bad event.
    pub reference_wait_ms: u64,
    /// How long an apply session waits for the target's answer before it asks the
    /// node, over a new connection, whether the statement is still running: a node
    /// that finished it (the answer is lost: a dead route, a hung middlebox) or cannot
    /// be reached means a stalled connection, which is dropped and replaced.
    pub receive_timeout_ms: u64,
}

impl SyncConfig {
    /// What `batch_rows` bounds (see `BatchBounds`).
    pub fn bounds(&self) -> BatchBounds {
        BatchBounds {
            intake_capacity: self.batch_rows,
            per_turn: self.batch_rows,
            flush_at: self.batch_rows,
            hold_max: HELD_MIN.max(2 * self.batch_rows),
            retry_buffer: self.batch_rows,
        }
    }
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            direction: None,
            on_error: OnError::Halt,
            batch_rows: DEFAULT_BATCH_ROWS,
            linger_ms: DEFAULT_LINGER_MS,
            tie_winner: None,
            tombstone_retention_ms: DEFAULT_TOMBSTONE_RETENTION_MS,
            conflicts_kept: DEFAULT_CONFLICTS_KEPT,
            reference_wait_ms: DEFAULT_REFERENCE_WAIT_MS,
            receive_timeout_ms: DEFAULT_APPLY_RECEIVE_TIMEOUT_MS,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// Schema-qualified: `schema.table`.
    pub name: String,
    #[serde(default = "default_updated_at")]
    pub updated_at: String,
    /// Deterministic UUIDv5 primary key derived from natural-key columns.
    pub identity: Option<IdentityConfig>,
    /// Incoming versions whose `updated_at` is further than this ahead of the receiving
    /// node's clock are rejected as bad events.
    pub max_future_skew_ms: Option<u64>,
    /// Mapped pairs: the table on each node, when it is not `name` on both.
    #[serde(default)]
    pub nodes: BTreeMap<String, String>,
    /// Mapped pairs: the (single) key column on each node.
    #[serde(default)]
    pub key: BTreeMap<String, String>,
    /// Mapped pairs: how a row new to a node gets its key there; a node without a
    /// rule finds the row by the other node's rule columns, else takes the next value
    /// of its key column's sequence.
    #[serde(default)]
    pub new_key: BTreeMap<String, NewKeyConfig>,
    /// Mapped pairs: renamed or converted columns (others cross under their name).
    #[serde(default)]
    pub columns: Vec<ColumnMapConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// The uuid column holding the derived id.
    pub column: String,
    /// A UUID, or a name hashed to one (see `identity::namespace`).
    pub namespace: String,
    /// Natural-key columns, in this order.
    pub from: Vec<String>,
}

fn default_updated_at() -> String {
    DEFAULT_UPDATED_AT.to_string()
}

impl TableConfig {
    /// (schema, table); valid after `Config::validate`.
    pub fn schema_table(&self) -> (&str, &str) {
        self.name.split_once('.').unwrap_or(("public", &self.name))
    }

    /// Whether the nodes' schemas differ for this table (see `config/mapping.rs`).
    pub fn is_mapped(&self) -> bool {
        !self.nodes.is_empty()
            || !self.key.is_empty()
            || !self.new_key.is_empty()
            || !self.columns.is_empty()
    }

    /// `schema.table` on `node`.
    pub fn name_on(&self, node: &str) -> &str {
        self.nodes.get(node).map_or(&self.name, String::as_str)
    }

    /// (schema, table) on `node`; valid after `Config::validate`.
    pub fn schema_table_on(&self, node: &str) -> (&str, &str) {
        let name = self.name_on(node);
        name.split_once('.').unwrap_or(("public", name))
    }

    pub(super) fn validate(&self, i: usize) -> Result<(), ConfigError> {
        let field = format!("tables[{i}].name");
        let Some((schema, table)) = self.name.split_once('.') else {
            return Err(invalid(
                field,
                "must be schema-qualified, like public.items",
            ));
        };
        if schema.is_empty() || table.is_empty() || table.contains('.') {
            return Err(invalid(field, "must be exactly schema.table"));
        }
        if self.updated_at.is_empty() {
            return Err(invalid(
                format!("tables[{i}].updated_at"),
                "must not be empty",
            ));
        }
        if self.identity.is_some() && self.is_mapped() {
            return Err(invalid(
                format!("tables[{i}].identity"),
                "a mapped table derives its keys with new_key, not identity",
            ));
        }
        if let Some(id) = &self.identity {
            if id.column.is_empty() {
                return Err(invalid(
                    format!("tables[{i}].identity.column"),
                    "must not be empty",
                ));
            }
            if id.from.is_empty() || id.from.iter().any(|c| c.is_empty() || *c == id.column) {
                return Err(invalid(
                    format!("tables[{i}].identity.from"),
                    "must name one or more columns other than the identity column",
                ));
            }
            if id.namespace.is_empty() {
                return Err(invalid(
                    format!("tables[{i}].identity.namespace"),
                    "must be a UUID or a name",
                ));
            }
        }
        Ok(())
    }
}

impl SyncConfig {
    pub(super) fn validate(&self, nodes: &[&String]) -> Result<(), ConfigError> {
        if self.batch_rows == 0 {
            return Err(invalid("sync.batch_rows", "must be at least 1"));
        }
        if self.conflicts_kept < 0 {
            return Err(invalid("sync.conflicts_kept", "must not be negative"));
        }
        if self.receive_timeout_ms < MIN_APPLY_RECEIVE_TIMEOUT_MS {
            return Err(invalid(
                "sync.receive_timeout_ms",
                format!("must be at least {MIN_APPLY_RECEIVE_TIMEOUT_MS}"),
            ));
        }
        if let Some(w) = &self.tie_winner {
            if !nodes.contains(&w) {
                return Err(invalid(
                    "sync.tie_winner",
                    format!("{w:?} is not one of the configured nodes"),
                ));
            }
        }
        Ok(())
    }
}
