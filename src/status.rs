//! `duplex status`: where each node's slot and each direction stand, read from the
//! databases (slots, `duplex.apply_state`, `duplex.apply_positions`) and the broker,
//! never from a running daemon's memory, so it works whether or not duplex runs and
//! can gate a cutover.

use crate::apply::progress::DirectionState;
use crate::config::{Config, Direction};
use crate::kafka::client_config;
use crate::pg::node::{self, describe};
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde::Serialize;
use std::time::{Duration, Instant};

#[derive(Debug, Serialize)]
pub struct NodeStatus {
    pub node: String,
    pub slot: String,
    pub slot_exists: bool,
    pub slot_active: bool,
    pub confirmed_flush_lsn: Option<String>,
    /// Current WAL LSN − confirmed_flush_lsn.
    pub lag_bytes: Option<i64>,
    /// Current WAL LSN − restart_lsn: what the slot keeps on disk.
    pub retained_wal_bytes: Option<i64>,
    pub wal_status: Option<String>,
    pub safe_wal_size_bytes: Option<i64>,
    /// Why PostgreSQL invalidated the slot (`invalidation_reason`, PostgreSQL 17 and
    /// later; before 17 an invalidated slot shows only as `wal_status` lost).
    pub invalidation_reason: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct DirectionStatus {
    pub direction: String,
    pub state: DirectionState,
    pub reason: Option<String>,
    pub since: Option<String>,
    /// An apply session is connected to the target right now.
    pub connected: bool,
    pub last_applied_commit: Option<String>,
    /// Now − commit time of the newest applied transaction; 0 when caught up.
    pub lag_seconds: Option<f64>,
    /// The source slot's unconfirmed WAL.
    pub lag_bytes: Option<i64>,
    /// Messages on the source topic not applied yet.
    pub kafka_lag_messages: Option<i64>,
    pub conflicts: i64,
    pub dead_letters_pending: i64,
    /// The initial sync's copies into the target, per table (see `duplex snapshot`).
    pub snapshot: Vec<SnapshotStatus>,
    /// Columns the target lacks whose values from the source are owed to it.
    pub owed_columns: Vec<OwedColumnStatus>,
}

#[derive(Debug, Serialize)]
pub struct OwedColumnStatus {
    pub table: String,
    pub column: String,
    /// The commit time of the first source change whose value was left out, or
    /// `the initial copy` when the copy left the column out (every row's value).
    pub since: String,
}

#[derive(Debug, Serialize)]
pub struct SnapshotStatus {
    pub table: String,
    /// `copying` or `done`.
    pub state: String,
    /// `direct` (into an empty table) or `merge` (last-writer-wins).
    pub method: String,
    pub rows_estimated: i64,
    pub rows_copied: i64,
    pub chunks: i32,
    pub chunks_copied: i32,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub nodes: Vec<NodeStatus>,
    pub directions: Vec<DirectionStatus>,
    /// What could not be read (an unreachable node or broker, missing setup).
    pub problems: Vec<String>,
}

impl Status {
    /// Why this status fails a `--max-lag` gate, if it does.
    pub fn gate(&self, max_lag_seconds: f64) -> Vec<String> {
        let mut failing = self.problems.clone();
        for n in &self.nodes {
            if n.wal_status.as_deref() == Some("lost") || n.invalidation_reason.is_some() {
                let reason = n.invalidation_reason.as_deref();
                failing.push(format!(
                    "node {}: slot {} was invalidated by PostgreSQL ({}): its unread changes are gone; run `duplex setup`, then `duplex snapshot`",
                    n.node,
                    n.slot,
                    crate::pg::node::invalidation_cause(reason)
                ));
            }
        }
        for d in &self.directions {
            if d.state == DirectionState::Halted {
                failing.push(format!(
                    "{} is halted: {}",
                    d.direction,
                    d.reason.as_deref().unwrap_or("?")
                ));
            }
            if d.dead_letters_pending > 0 {
                failing.push(format!(
                    "{} has {} dead letters pending: their changes are not applied (duplex dlq list, then replay or discard them)",
                    d.direction, d.dead_letters_pending
                ));
            }
            for o in &d.owed_columns {
                failing.push(format!(
                    "{}: values of {}.{} since {} are owed to the target, which lacks the column (add it there; duplex then brings them over)",
                    d.direction, o.table, o.column, o.since
                ));
            }
            for s in d.snapshot.iter().filter(|s| s.state != "done") {
                failing.push(format!(
                    "{}: the initial copy of {} is not finished ({}/{} chunks)",
                    d.direction, s.table, s.chunks_copied, s.chunks
                ));
            }
            match d.lag_seconds {
                Some(l) if l > max_lag_seconds => {
                    failing.push(format!("{} is {l:.1} s behind", d.direction))
                }
                None => failing.push(format!("{}: lag unknown", d.direction)),
                _ => {}
            }
        }
        failing
    }
}

/// Everything that fails a `--max-lag` gate: [`Status::gate`], and every source whose
/// changes committed before the call are not all on Kafka within its status and
/// heartbeat intervals (the reader confirms on its status timer, once the node has
/// reported a position past the last heartbeat).
pub async fn failing(cfg: &Config, s: &Status, max_lag_seconds: f64) -> Vec<String> {
    let mut failing = s.gate(max_lag_seconds);
    let wait = Duration::from_millis(
        cfg.source.status_interval_ms + cfg.source.heartbeat_interval_ms + 1000,
    );
    for node in cfg.source_nodes() {
        if let Err(e) = source_caught_up(cfg, &node, wait).await {
            failing.push(e);
        }
    }
    failing
}

/// Waits until the slot of `node` has confirmed the WAL position the node had when
/// called, so that every change committed before is durable on Kafka; fails with the
/// reason after `wait`. A reader that is down, stuck or behind fails it; nothing
/// else can tell unread changes from WAL without changes.
pub async fn source_caught_up(cfg: &Config, node: &str, wait: Duration) -> Result<(), String> {
    let client = node::connect(cfg, node, "status")
        .await
        .map_err(|e| e.to_string())?;
    let err = |e: tokio_postgres::Error| format!("node {node}: {}", describe(&e));
    let slot_name = cfg.slot_name(node);
    let wal: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(err)?
        .get(0);
    let deadline = Instant::now() + wait;
    loop {
        let row = client
            .query_opt(
                "SELECT coalesce(confirmed_flush_lsn >= $2::text::pg_lsn, false),
                        confirmed_flush_lsn::text, active
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot_name, &wal],
            )
            .await
            .map_err(err)?;
        let Some(row) = row else {
            return Err(format!("node {node}: slot {slot_name} is missing"));
        };
        if row.get::<_, bool>(0) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let confirmed: Option<String> = row.get(1);
            let down = if row.get::<_, bool>(2) {
                ""
            } else {
                "; no reader streams from the slot: is duplex running?"
            };
            return Err(format!(
                "node {node}: changes committed before this check are not all on Kafka after {:.1} s (slot {slot_name} confirmed {}, the WAL was at {wal}){down}",
                wait.as_secs_f64(),
                confirmed.as_deref().unwrap_or("-"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads the status of every node and direction.
pub async fn collect(cfg: &Config) -> Status {
    let mut status = Status {
        nodes: Vec::new(),
        directions: Vec::new(),
        problems: Vec::new(),
    };
    for node in cfg.source_nodes() {
        match node_status(cfg, &node).await {
            Ok(n) => status.nodes.push(n),
            Err(e) => status.problems.push(e),
        }
    }
    for dir in cfg.directions().unwrap_or_default() {
        match direction_status(cfg, &dir, &status.nodes).await {
            Ok(d) => status.directions.push(d),
            Err(e) => status.problems.push(e),
        }
    }
    status
}

async fn node_status(cfg: &Config, node: &str) -> Result<NodeStatus, String> {
    let client = node::connect(cfg, node, "status")
        .await
        .map_err(|e| e.to_string())?;
    let slot_name = cfg.slot_name(node);
    let row = client
        .query_opt(
            "SELECT active, confirmed_flush_lsn::text, (pg_current_wal_lsn() - confirmed_flush_lsn)::int8,
                    (pg_current_wal_lsn() - restart_lsn)::int8, wal_status, safe_wal_size,
                    to_jsonb(s) ->> 'invalidation_reason'
             FROM pg_replication_slots s WHERE slot_name = $1",
            &[&slot_name],
        )
        .await
        .map_err(|e| format!("node {node}: reading pg_replication_slots: {}", describe(&e)))?;
    Ok(match row {
        Some(r) => NodeStatus {
            node: node.to_string(),
            slot: slot_name,
            slot_exists: true,
            slot_active: r.get(0),
            confirmed_flush_lsn: r.get(1),
            lag_bytes: r.get(2),
            retained_wal_bytes: r.get(3),
            wal_status: r.get(4),
            safe_wal_size_bytes: r.get(5),
            invalidation_reason: r.get(6),
        },
        None => NodeStatus {
            node: node.to_string(),
            slot: slot_name,
            slot_exists: false,
            slot_active: false,
            confirmed_flush_lsn: None,
            lag_bytes: None,
            retained_wal_bytes: None,
            wal_status: None,
            safe_wal_size_bytes: None,
            invalidation_reason: None,
        },
    })
}

async fn direction_status(
    cfg: &Config,
    dir: &Direction,
    nodes: &[NodeStatus],
) -> Result<DirectionStatus, String> {
    let client = node::connect(cfg, &dir.to, "status")
        .await
        .map_err(|e| e.to_string())?;
    let err = |e: tokio_postgres::Error| {
        format!("direction {dir}: {} (has duplex setup run?)", describe(&e))
    };
    let row = client
        .query_one(
            "SELECT s.state, s.reason, s.since::text,
                    EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database()
                            AND application_name = $2),
                    p.last_commit_ts::text, p.next_offset,
                    (extract(epoch FROM clock_timestamp() - p.last_commit_ts))::float8,
                    (SELECT count(*) FROM duplex.conflicts WHERE incoming_node = $1),
                    (SELECT count(*) FROM duplex.dead_letters WHERE source_node = $1 AND replayed_at IS NULL)
             FROM (SELECT $1::text AS source_node) k
             LEFT JOIN duplex.apply_state s USING (source_node)
             LEFT JOIN duplex.apply_positions p ON p.source_node = k.source_node AND p.topic = $3",
            &[&dir.from, &format!("duplex apply from {}", dir.from), &cfg.topic(&dir.from)],
        )
        .await
        .map_err(err)?;
    let snapshot = crate::snapshot::load_plans(&client, dir)
        .await
        .map_err(|e| format!("direction {dir}: {e} (has duplex setup run?)"))?
        .into_iter()
        .map(|p| SnapshotStatus {
            table: p.table,
            state: if p.done { "done" } else { "copying" }.to_string(),
            method: p.method.as_str().to_string(),
            rows_estimated: p.rows_estimated,
            rows_copied: p.rows_copied,
            chunks: p.chunks,
            chunks_copied: p.chunks_copied,
        })
        .collect();
    let owed_columns = owed_columns(&client, dir).await.map_err(err)?;
    let next_offset: Option<i64> = row.get(5);
    let since_commit: Option<f64> = row.get(6);
    let end = log_end_offset(cfg, &cfg.topic(&dir.from)).await;
    let kafka_lag = end.map(|end| (end - next_offset.unwrap_or(0)).max(0));
    let lag_seconds = match (kafka_lag, since_commit) {
        (Some(0), _) => Some(0.0),
        (Some(_), Some(s)) => Some(s.max(0.0)),
        // Behind, and nothing applied yet: as far behind as the backlog is unknown.
        (Some(_), None) | (None, _) => None,
    };
    Ok(DirectionStatus {
        direction: dir.to_string(),
        state: row
            .get::<_, Option<String>>(0)
            .and_then(|s| DirectionState::parse(&s))
            .unwrap_or(DirectionState::NeverStarted),
        reason: row.get(1),
        since: row.get(2),
        connected: row.get(3),
        last_applied_commit: row.get(4),
        lag_seconds,
        lag_bytes: nodes
            .iter()
            .find(|n| n.node == dir.from)
            .and_then(|n| n.lag_bytes),
        kafka_lag_messages: kafka_lag,
        conflicts: row.get(7),
        dead_letters_pending: row.get(8),
        snapshot,
        owed_columns,
    })
}

/// The target's debts to this direction (none where duplex's schema predates them).
async fn owed_columns(
    client: &tokio_postgres::Client,
    dir: &Direction,
) -> Result<Vec<OwedColumnStatus>, tokio_postgres::Error> {
    let exists: bool = client
        .query_one("SELECT to_regclass('duplex.owed_columns') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Ok(Vec::new());
    }
    Ok(client
        .query(
            "SELECT table_name, column_name,
                    CASE WHEN since_ts = '-infinity' THEN 'the initial copy' ELSE since_ts::text END
             FROM duplex.owed_columns
             WHERE source_node = $1 ORDER BY 1, 2",
            &[&dir.from],
        )
        .await?
        .iter()
        .map(|r| OwedColumnStatus {
            table: r.get(0),
            column: r.get(1),
            since: r.get(2),
        })
        .collect())
}

/// The topic's log end offset (partition 0), if the broker answers.
async fn log_end_offset(cfg: &Config, topic: &str) -> Option<i64> {
    let (cc, topic) = (client_config(&cfg.kafka), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = cc.create().ok()?;
        consumer
            .fetch_watermarks(&topic, 0, Duration::from_secs(5))
            .ok()
            .map(|(_, high)| high)
    })
    .await
    .ok()
    .flatten()
}

/// Human-readable lines.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let opt = |v: Option<i64>| v.map_or("-".to_string(), |v| v.to_string());
    for n in &s.nodes {
        out.push_str(&format!(
            "node {}: slot {} {} confirmed {} lag {} bytes, retains {} bytes, wal_status {}\n",
            n.node,
            n.slot,
            if !n.slot_exists {
                "MISSING"
            } else if n.slot_active {
                "active"
            } else {
                "inactive"
            },
            n.confirmed_flush_lsn.as_deref().unwrap_or("-"),
            opt(n.lag_bytes),
            opt(n.retained_wal_bytes),
            n.wal_status.as_deref().unwrap_or("-"),
        ));
    }
    for d in &s.directions {
        out.push_str(&format!(
            "direction {}: {}{}{} lag {} s, {} messages; last applied commit {}; conflicts {}; dead letters {}\n",
            d.direction,
            d.state,
            d.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default(),
            if d.connected { ", connected," } else { ", not connected," },
            d.lag_seconds.map_or("?".to_string(), |l| format!("{l:.1}")),
            opt(d.kafka_lag_messages),
            d.last_applied_commit.as_deref().unwrap_or("-"),
            d.conflicts,
            d.dead_letters_pending,
        ));
        for o in &d.owed_columns {
            out.push_str(&format!(
                "  owed {}.{} since {}: the target lacks the column\n",
                o.table, o.column, o.since
            ));
        }
        for t in &d.snapshot {
            out.push_str(&format!(
                "  snapshot {}: {} ({}), {}/{} chunks, {}/{} rows\n",
                t.table,
                t.state,
                t.method,
                t.chunks_copied,
                t.chunks,
                t.rows_copied,
                t.rows_estimated
            ));
        }
    }
    for p in &s.problems {
        out.push_str(&format!("problem: {p}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caught_up(owed: Vec<OwedColumnStatus>) -> Status {
        Status {
            nodes: Vec::new(),
            directions: vec![DirectionStatus {
                direction: "a_to_b".into(),
                state: DirectionState::Running,
                reason: None,
                since: None,
                connected: true,
                last_applied_commit: None,
                lag_seconds: Some(0.0),
                lag_bytes: Some(0),
                kafka_lag_messages: Some(0),
                conflicts: 0,
                dead_letters_pending: 0,
                snapshot: Vec::new(),
                owed_columns: owed,
            }],
            problems: Vec::new(),
        }
    }

    #[test]
    fn values_owed_to_a_node_fail_the_gate_naming_the_column() {
        assert!(caught_up(Vec::new()).gate(0.0).is_empty());
        let owed = caught_up(vec![OwedColumnStatus {
            table: "public.items".into(),
            column: "color".into(),
            since: "2026-12-07 10:00:00+00".into(),
        }]);
        let failing = owed.gate(0.0);
        assert_eq!(failing.len(), 1, "{failing:?}");
        assert!(failing[0].contains("public.items.color"), "{failing:?}");
        assert!(render(&owed).contains("owed public.items.color since"));
    }
}
