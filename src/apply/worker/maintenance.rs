//! Between transactions, the worker keeps the target's duplex tables small: it sweeps
//! rows older than a recent tombstone of their key, and prunes old tombstones,
//! conflicts, repairs, and the key pairings of mapped rows long deleted.

use super::Worker;
use crate::apply::error::ApplyError;
use crate::pg::sql::quote_literal;
use std::time::{Duration, Instant};

/// How often conflicts, repairs and tombstones are pruned.
pub(super) const MAINTENANCE_EVERY: Duration = Duration::from_secs(60);

/// How far back the sweep looks for tombstones that outdate a row of their key: longer
/// than an application transaction is expected to stay open.
const SWEEP_WINDOW_MS: i64 = 60_000;

/// How often the sweep runs, at most.
pub(in crate::apply) const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// After a sweep, the next waits at least this many times as long as it took. A
/// sweep probes every tombstone of its window: 40,000 recent deletes made it
/// 50-110 ms, and at one a second a delete-heavy workload spent a tenth of a core on
/// each node re-probing the same keys. The pace bounds that to a twentieth; a row
/// such a sweep would remove stays a little longer (2 s instead of 1 at 100 ms).
const SWEEP_PACE: u32 = 20;

/// How long the sweep after one that took `took` waits, from that one's start (the
/// tick of [`SWEEP_EVERY`] still comes first when this is shorter).
fn sweep_pause(took: Duration) -> Duration {
    took * SWEEP_PACE
}

/// The longest tombstone retention honoured (100 years).
const MAX_RETENTION_MS: u64 = 100 * 365 * 24 * 3600 * 1000;

impl Worker<'_> {
    /// Between transactions: removes rows that a recent tombstone of their own node
    /// outdates (see [`crate::lww::TargetWriter::sweep`]).
    pub(in crate::apply) async fn sweep(&mut self) -> Result<(), ApplyError> {
        if self.txn.is_open() || !self.pending.is_empty() || Instant::now() < self.next_sweep {
            return Ok(());
        }
        let started = Instant::now();
        let removed = self.writer.sweep(SWEEP_WINDOW_MS).await?;
        self.next_sweep = started + sweep_pause(started.elapsed());
        if removed > 0 {
            tracing::info!(direction = %self.dir, removed, "removed rows older than their key's tombstone");
        }
        Ok(())
    }

    /// Prunes old tombstones, conflicts and repairs (a repair is published when it
    /// commits; the row is kept only to be inspected). A tombstone guards against the
    /// source's older versions still to come, so its age counts from how far this
    /// direction has applied (the source commit time of the newest change applied;
    /// nothing is pruned before the first), not from the wall clock: a direction
    /// halted for longer than the retention keeps every tombstone its backlog may meet.
    /// A delete of this node's own (a tombstone or truncation of origin `local`) is
    /// kept, besides, until the peer applied changes committed the retention after it
    /// (a transaction may stay open that long): a copy into the peer after a lost
    /// slot, topic or position carries it from here (see `snapshot::deletes`).
    /// Truncations are pruned as tombstones are.
    pub(in crate::apply) async fn maintain(&mut self) -> Result<(), ApplyError> {
        self.last_maintenance = Instant::now();
        // Beyond a century the interval would overflow; nothing is that old anyway.
        let retention_ms = self.cfg.sync.tombstone_retention_ms.min(MAX_RETENTION_MS);
        let peer_has = match self.peer_applied_until().await {
            None => "'infinity'".to_string(),
            Some(until) => quote_literal(&until.unwrap_or_else(|| "-infinity".into())),
        };
        let sql = format!(
            "DELETE FROM duplex.tombstones WHERE deleted_at < least(now(), coalesce(
               (SELECT last_commit_ts FROM duplex.apply_positions WHERE source_node = {from} AND topic = {topic}),
               '-infinity')) - {retention_ms} * interval '1 millisecond'
               AND (origin <> 'local' OR deleted_at < {peer_has}::timestamptz - {retention_ms} * interval '1 millisecond');
             DELETE FROM duplex.truncations WHERE truncated_at < least(now(), coalesce(
               (SELECT last_commit_ts FROM duplex.apply_positions WHERE source_node = {from} AND topic = {topic}),
               '-infinity')) - {retention_ms} * interval '1 millisecond'
               AND (origin <> 'local' OR truncated_at < {peer_has}::timestamptz - {retention_ms} * interval '1 millisecond');
             DELETE FROM duplex.conflicts WHERE id <= (SELECT max(id) FROM duplex.conflicts) - {kept};
             DELETE FROM duplex.repairs WHERE id <= (SELECT max(id) FROM duplex.repairs) - {kept};
             {pairings}",
            kept = self.cfg.sync.conflicts_kept,
            pairings = self.writer.pairing_prune_sql(retention_ms),
            from = quote_literal(&self.dir.from),
            topic = quote_literal(&self.cfg.topic(&self.dir.from)),
        );
        Ok(self
            .writer
            .execute(&sql, "pruning tombstones and conflicts")
            .await?)
    }

    /// How far the peer applied this node's changes (the source commit time of the
    /// newest, as text): `None` when it does not receive them (no direction this way),
    /// `Some(None)` when that is unknown now (unreachable, nothing applied yet).
    async fn peer_applied_until(&self) -> Option<Option<String>> {
        let (me, peer) = (&self.dir.to, &self.dir.from);
        let reverse = self
            .cfg
            .directions()
            .unwrap_or_default()
            .into_iter()
            .any(|d| d.from == *me && d.to == *peer);
        if !reverse {
            return None;
        }
        let client = match crate::pg::node::connect(self.cfg, peer, "tombstone pruning").await {
            Ok(c) => c,
            Err(e) => {
                tracing::info!(direction = %self.dir, error = %e, "keeping this node's own tombstones until the peer can say it applied them");
                return Some(None);
            }
        };
        let applied = client
            .query_opt(
                "SELECT last_commit_ts::text FROM duplex.apply_positions
                 WHERE source_node = $1 AND topic = $2 AND commit_lsn <> '0/0'",
                &[me, &self.cfg.topic(me)],
            )
            .await;
        Some(applied.ok().flatten().and_then(|r| r.get(0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_sweep_spaces_the_next_and_a_quick_one_does_not() {
        // 100 ms of probes: the next sweep comes 2 s after it started, not 1.
        assert_eq!(
            sweep_pause(Duration::from_millis(100)),
            Duration::from_secs(2)
        );
        // A few ms: the next tick sweeps again.
        assert!(sweep_pause(Duration::from_millis(5)) < SWEEP_EVERY);
    }
}
