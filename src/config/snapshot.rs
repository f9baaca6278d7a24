//! The `[snapshot]` section: how rows that exist before duplex starts reach the peer.

use super::{invalid, ConfigError};
use serde::Deserialize;

pub const DEFAULT_SNAPSHOT_WORKERS: usize = 4;
pub const DEFAULT_SNAPSHOT_CHUNK_ROWS: u64 = 50_000;
/// More copy workers than this only add connections: each holds one on both nodes.
pub const MAX_SNAPSHOT_WORKERS: usize = 32;

/// When a direction copies the rows its source holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotMode {
    /// On a direction's first start, copy each table whose target is empty; refuse
    /// to start if both sides of a table hold rows (that is `merge`'s job).
    #[default]
    Initial,
    /// On a direction's first start, copy every table under last-writer-wins, so two
    /// populated databases converge.
    Merge,
    /// Never copy; only changes made after the slots exist reach the peer.
    Never,
}

impl SnapshotMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotMode::Initial => "initial",
            SnapshotMode::Merge => "merge",
            SnapshotMode::Never => "never",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotConfig {
    pub mode: SnapshotMode,
    /// Chunks copied at once, each over its own connection to both nodes.
    pub workers: usize,
    /// Rows per chunk: the unit of parallelism and of resumption.
    pub chunk_rows: u64,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig {
            mode: SnapshotMode::Initial,
            workers: DEFAULT_SNAPSHOT_WORKERS,
            chunk_rows: DEFAULT_SNAPSHOT_CHUNK_ROWS,
        }
    }
}

impl SnapshotConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.workers == 0 || self.workers > MAX_SNAPSHOT_WORKERS {
            return Err(invalid(
                "snapshot.workers",
                format!("must be between 1 and {MAX_SNAPSHOT_WORKERS}"),
            ));
        }
        if self.chunk_rows == 0 {
            return Err(invalid("snapshot.chunk_rows", "must be at least 1"));
        }
        Ok(())
    }
}
