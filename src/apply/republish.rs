//! The republisher of a node whose walsender drops what duplex applies there.
//!
//! With `source.echo_filter = "node"` on PostgreSQL 16 and later, the node's walsender
//! never sends a transaction written under a replication origin (pgoutput's `origin =
//! 'none'`). The repairs (the winning version of a key whose incoming version lost)
//! and the key pairings of mapped tables that such a transaction writes must reach the
//! peer all the same: a trigger notes each in `duplex.outbox`, in the same transaction
//! (migration 0006), and this task, beside the apply session into the node, touches
//! them again (`duplex.republish`) in transactions of its own, under no origin, which
//! the walsender sends as updates of those rows. The outbox is durable, so what a
//! stop or a crash leaves there goes at the next session's start. A repair that
//! arrives later than the transaction it came from is still ordered by its row's
//! `updated_at` on the peer, so a newer change made meanwhile keeps winning.

use crate::config::{Config, Direction, EchoFilter};
use crate::pg::node::{self, NodeError, SqlContext};
use crate::runtime::Stop;
use std::time::Duration;

/// How often the outbox is emptied: the delay a repair or a pairing may add.
const REPUBLISH_EVERY: Duration = Duration::from_millis(200);

/// Empties `dir.to`'s outbox every [`REPUBLISH_EVERY`] until `stop`, reconnecting
/// after a failure (the rows wait in the outbox meanwhile). Returns at once on a
/// node before PostgreSQL 16, where nothing is noted.
pub(super) async fn run(cfg: Config, dir: Direction, stop: Stop) {
    // Touched only where the node's walsender drops them; with duplex's own filter
    // they travel in the applied transaction, and the outbox is only emptied.
    let touch = cfg.source.echo_filter == EchoFilter::Node;
    let mut retry = Duration::from_millis(cfg.source.retry_initial_ms);
    loop {
        match republish_until(&cfg, &dir, touch, &stop).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(direction = %dir, error = %e, retry_ms = retry.as_millis() as u64,
                    "could not republish the outbox's repairs and pairings; they wait there");
            }
        }
        tokio::select! {
            _ = stop.requested() => return,
            _ = tokio::time::sleep(retry) => {}
        }
        retry = (retry * 2).min(Duration::from_millis(cfg.source.retry_max_ms));
    }
}

/// One connection's work: `Ok` on stop, or on a node that notes nothing.
async fn republish_until(
    cfg: &Config,
    dir: &Direction,
    touch: bool,
    stop: &Stop,
) -> Result<(), NodeError> {
    let client = node::connect(cfg, &dir.to, "republisher").await?;
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .sql(&dir.to, "reading server_version_num")?
        .get(0);
    if version < 160000 {
        return Ok(());
    }
    let mut tick = tokio::time::interval(REPUBLISH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.requested() => return Ok(()),
            _ = tick.tick() => {}
        }
        let touched: i64 = client
            .query_one("SELECT duplex.republish($1)", &[&touch])
            .await
            .sql(&dir.to, "republishing the outbox (duplex.republish)")?
            .get(0);
        if touched > 0 {
            tracing::debug!(direction = %dir, touched, "republished repairs and pairings");
        }
    }
}
