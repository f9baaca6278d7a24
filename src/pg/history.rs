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
//!
//! A topic found lost (the broker lost acknowledged messages) is recorded on its
//! node, and [`check`] refuses it at every session start. A running applier of
//! another instance (components may be split between two) learns of it from
//! [`topic_lost`], which it polls while it applies.

use crate::config::{Config, Direction};
use crate::pg::error::SqlError;
use crate::pg::node::{self, NodeError, SqlContext};
use crate::pg::state::slots;
use std::time::Duration;
use tokio_postgres::Client;

/// How often a running applier looks whether its topic was recorded lost.
const TOPIC_CHECK_EVERY: Duration = Duration::from_secs(5);

/// Fails with [`NodeError::HistoryRewound`] when `dir.to` applied changes of
/// `dir.from`, through the slot's current stream, beyond the end of `dir.from`'s WAL.
/// Either node unreachable (or not set up yet) is no failure: the check runs again
/// with the next session of either component.
pub async fn check(cfg: &Config, dir: &Direction) -> Result<(), NodeError> {
    let (source, target) = match (
        node::connect(cfg, &dir.from, "history check").await,
        node::connect(cfg, &dir.to, "history check").await,
    ) {
        (Ok(s), Ok(t)) => (s, t),
        (Err(e), _) | (_, Err(e)) => {
            tracing::info!(direction = %dir, error = %e, "could not compare the nodes' positions now; will at the next session");
            return Ok(());
        }
    };
    let slot_name = cfg.slot_name(&dir.from);
    let stream: String = match slots::load(&source, &slot_name).await {
        Ok(Some(record)) => {
            if let Some(detail) = record.topic_lost {
                return Err(NodeError::TopicLost {
                    node: dir.from.clone(),
                    detail,
                });
            }
            record.stream
        }
        Ok(None) => return Ok(()),
        Err(e) if not_set_up(&e) => return Ok(()),
        Err(e) => return Err(SqlError::new(&dir.from, "reading duplex.slots", e).into()),
    };
    let wal_end: String = source
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .sql(&dir.from, "reading the WAL position")?
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
        Err(e) if not_set_up(&e) => Ok(()),
        Err(e) => Err(SqlError::new(&dir.to, "reading duplex.apply_positions", e).into()),
    }
}

/// Resolves, with the error to stop on, once `dir.from`'s topic is recorded lost on
/// `dir.from` (by its reader, in this process or another instance). Asks every
/// [`TOPIC_CHECK_EVERY`] over a session of its own, each question bounded by that
/// too; a node it cannot reach is asked again at the next turn.
pub async fn topic_lost(cfg: &Config, dir: &Direction) -> NodeError {
    let slot = cfg.slot_name(&dir.from);
    let mut client: Option<Client> = None;
    loop {
        tokio::time::sleep(TOPIC_CHECK_EVERY).await;
        if client.as_ref().is_none_or(Client::is_closed) {
            let connecting = node::connect(cfg, &dir.from, "topic check");
            client = tokio::time::timeout(TOPIC_CHECK_EVERY, connecting)
                .await
                .ok()
                .and_then(Result::ok);
        }
        let Some(c) = &client else { continue };
        match tokio::time::timeout(TOPIC_CHECK_EVERY, slots::topic_lost(c, &slot)).await {
            Ok(Ok(Some(detail))) => {
                return NodeError::TopicLost {
                    node: dir.from.clone(),
                    detail,
                }
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) if not_set_up(&e) => {}
            Ok(Err(_)) | Err(_) => client = None,
        }
    }
}

/// A node whose `duplex` schema is not (fully) set up yet has nothing to compare: the
/// other component's setup may still be running.
fn not_set_up(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    [
        SqlState::UNDEFINED_TABLE,
        SqlState::UNDEFINED_COLUMN,
        SqlState::INVALID_SCHEMA_NAME,
    ]
    .iter()
    .any(|c| e.code() == Some(c))
}
