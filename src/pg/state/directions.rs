//! Each direction into this node: running, halted (and why) or stopped
//! (`duplex.apply_state`), written by its apply worker and read by `duplex status`,
//! so that it outlives the process.

use crate::config::Direction;
use tokio_postgres::Client;

/// Where a direction stands, as stored in `duplex.apply_state.state` (and shown by
/// `duplex status`, where a direction without a row has never started).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DirectionState {
    Running,
    Halted,
    Stopped,
    NeverStarted,
}

impl DirectionState {
    pub fn as_str(self) -> &'static str {
        match self {
            DirectionState::Running => "running",
            DirectionState::Halted => "halted",
            DirectionState::Stopped => "stopped",
            DirectionState::NeverStarted => "never_started",
        }
    }

    /// The state a stored text names; `None` for anything else.
    pub fn parse(s: &str) -> Option<DirectionState> {
        [
            DirectionState::Running,
            DirectionState::Halted,
            DirectionState::Stopped,
            DirectionState::NeverStarted,
        ]
        .into_iter()
        .find(|d| d.as_str() == s)
    }
}

impl std::fmt::Display for DirectionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Records the direction's state (and why, for a halt) on its target.
pub async fn set_state(
    client: &Client,
    dir: &Direction,
    state: DirectionState,
    reason: Option<&str>,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO duplex.apply_state (source_node, state, reason, since) VALUES ($1, $2, $3, now())
             ON CONFLICT (source_node) DO UPDATE SET state = EXCLUDED.state, reason = EXCLUDED.reason,
               since = CASE WHEN duplex.apply_state.state = EXCLUDED.state THEN duplex.apply_state.since ELSE now() END",
            &[&dir.from, &state.as_str(), &reason],
        )
        .await
        .map(|_| ())
}
