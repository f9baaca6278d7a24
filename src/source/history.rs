//! Guards against a node whose history went back: restored from a backup or a disk
//! snapshot, it hands out again LSNs its peer has already applied, and the peer would
//! take its new changes for replays of old ones and skip them.
//!
//! A slot created again starts a new stream (see `duplex.slots`), whose positions the
//! peer does not compare with the old ones; what remains is a node whose slot came
//! back with it. [`check`] compares, within one stream, the position the peer applied
//! with the end of the node's WAL, which a healthy node is always at or past. Readers
//! and apply workers run it when their session starts, each against the other node
//! if it can reach it.

use crate::config::{Config, Direction};
use crate::source::slot::{self, sql_err, NodeError};

/// Fails with [`NodeError::HistoryRewound`] when `dir.to` applied changes of
/// `dir.from`, through the slot's current stream, beyond the end of `dir.from`'s WAL.
/// Either node unreachable (or not set up yet) is no failure: the check runs again
/// with the next session of either component.
pub async fn check(cfg: &Config, dir: &Direction) -> Result<(), NodeError> {
    let (source, target) = match (
        slot::connect(cfg, &dir.from, "history check").await,
        slot::connect(cfg, &dir.to, "history check").await,
    ) {
        (Ok(s), Ok(t)) => (s, t),
        (Err(e), _) | (_, Err(e)) => {
            tracing::info!(direction = %dir, error = %e, "could not compare the nodes' positions now; will at the next session");
            return Ok(());
        }
    };
    let slot_name = cfg.slot_name(&dir.from);
    let Some(stream) = slot::stream_of(&source, &dir.from, &slot_name).await? else {
        return Ok(());
    };
    let wal_end: String = source
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(sql_err(&dir.from, "reading the WAL position"))?
        .get(0);
    let applied = target
        .query_opt(
            "SELECT commit_lsn::text FROM duplex.apply_positions
             WHERE source_node = $1 AND topic = $2 AND stream = $3
               AND commit_lsn > $4::text::pg_lsn",
            &[&dir.from, &cfg.topic(&dir.from), &stream, &wal_end],
        )
        .await;
    match applied {
        Ok(Some(row)) => Err(NodeError::HistoryRewound {
            node: dir.from.clone(),
            peer: dir.to.clone(),
            slot: slot_name,
            applied: row.get(0),
            wal_end,
        }),
        Ok(None) => Ok(()),
        // Not set up yet: nothing applied.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => Ok(()),
        Err(e) => Err(sql_err(&dir.to, "reading duplex.apply_positions")(e)),
    }
}
