//! Metric names, the Prometheus recorder, and the small HTTP endpoint serving
//! `/metrics`, `/healthz` and `/readyz`.
//!
//! Every metric duplex exports is named here once, as
//! `duplex_<subsystem>_<name>_<unit>[_total]`, with labels from bounded sets (node,
//! table from the config, op, error class). Each component registers its series once
//! ([`ApplyMetrics`], [`CaptureMetrics`]) and records through those handles; [`serve`] renders the recorder's state on each scrape and reports readiness
//! from [`Health`].

use crate::runtime::Stop;
use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

/// Row changes read from a node. Labels: node, table, op.
pub const SOURCE_EVENTS_TOTAL: &str = "duplex_source_events_total";
/// Transactions read from a node. Labels: node.
pub const SOURCE_TRANSACTIONS_TOTAL: &str = "duplex_source_transactions_total";
/// Transactions dropped because duplex itself applied them. Labels: node.
pub const SOURCE_ECHOES_SUPPRESSED_TOTAL: &str = "duplex_source_echoes_suppressed_total";
/// The LSN last confirmed to the node's slot, as a byte position. Labels: node.
pub const SOURCE_CONFIRMED_LSN_BYTES: &str = "duplex_source_confirmed_lsn_bytes";
/// 1 while the reader streams from the node. Labels: node.
pub const SOURCE_CONNECTED: &str = "duplex_source_connected";
/// Errors of the reader. Labels: node, class (transient|definite).
pub const SOURCE_ERRORS_TOTAL: &str = "duplex_source_errors_total";
/// WAL the slot has not confirmed yet: current WAL LSN − confirmed_flush_lsn. Labels: node.
pub const SOURCE_SLOT_LAG_BYTES: &str = "duplex_source_slot_lag_bytes";
/// WAL the slot keeps on the node: current WAL LSN − restart_lsn. Labels: node.
pub const SOURCE_SLOT_RETAINED_WAL_BYTES: &str = "duplex_source_slot_retained_wal_bytes";
/// WAL that can still be written before the slot is lost (max_slot_wal_keep_size);
/// +Inf when unlimited, 0 once lost. Labels: node.
pub const SOURCE_SLOT_SAFE_WAL_SIZE_BYTES: &str = "duplex_source_slot_safe_wal_size_bytes";
/// 1 for the slot's current wal_status. Labels: node, status
/// (reserved|extended|unreserved|lost).
pub const SOURCE_SLOT_WAL_STATUS: &str = "duplex_source_slot_wal_status";
/// Messages the broker acknowledged. Labels: node, table, op.
pub const SINK_KAFKA_PRODUCED_TOTAL: &str = "duplex_sink_kafka_produced_total";
/// Rows written to a target. Labels: direction, table, op (upsert|delete).
pub const APPLY_ROWS_TOTAL: &str = "duplex_apply_rows_total";
/// Source transactions applied. Labels: direction.
pub const APPLY_TRANSACTIONS_TOTAL: &str = "duplex_apply_transactions_total";
/// Incoming versions that lost to the target's. Labels: direction, table, resolution.
pub const APPLY_CONFLICTS_TOTAL: &str = "duplex_apply_conflicts_total";
/// Winning versions re-published to the peer because its incoming version lost (see
/// `duplex.repairs`). Labels: direction (the one whose incoming version lost), table.
pub const APPLY_REPAIRS_TOTAL: &str = "duplex_apply_repairs_total";
/// Target transactions rolled back and written again in place after losing to a
/// concurrent transaction. Labels: direction, reason
/// (deadlock|serialization_failure|lock_timeout).
pub const APPLY_RETRIES_TOTAL: &str = "duplex_apply_retries_total";
/// Events sent to the dead-letter queue. Labels: direction.
pub const APPLY_DEAD_LETTERS_TOTAL: &str = "duplex_apply_dead_letters_total";
/// Events skipped because they were applied before (replays). Labels: direction.
pub const APPLY_DUPLICATES_SKIPPED_TOTAL: &str = "duplex_apply_duplicates_skipped_total";
/// Source transactions that arrived with events missing (a producer gave up on a
/// message) and were discarded until the source published them again. Labels: direction.
pub const APPLY_INCOMPLETE_TRANSACTIONS_TOTAL: &str = "duplex_apply_incomplete_transactions_total";
/// 1 while a direction is halted on a bad event. Labels: direction.
pub const APPLY_HALTED: &str = "duplex_apply_halted";
/// Errors of an apply worker. Labels: direction, class (transient|definite).
pub const APPLY_ERRORS_TOTAL: &str = "duplex_apply_errors_total";
/// Source commit to target commit, per applied source transaction. Labels: direction.
pub const APPLY_COMMIT_TO_APPLY_SECONDS: &str = "duplex_apply_commit_to_apply_seconds";

/// Now − commit time of the newest applied source transaction; 0 when caught up.
/// Labels: direction.
pub const APPLY_LAG_SECONDS: &str = "duplex_apply_lag_seconds";
/// Messages on the source topic not yet applied: log end offset − applied offset.
/// Labels: direction.
pub const APPLY_KAFKA_LAG_MESSAGES: &str = "duplex_apply_kafka_lag_messages";
/// Rows per flushed batch. Labels: direction.
pub const APPLY_BATCH_ROWS: &str = "duplex_apply_batch_rows";
/// Time to write one batch into the target. Labels: direction.
pub const APPLY_BATCH_SECONDS: &str = "duplex_apply_batch_seconds";
/// 1 while the apply worker is connected and applying. Labels: direction.
pub const APPLY_CONNECTED: &str = "duplex_apply_connected";

/// Rows copied by initial syncs (snapshots). Labels: direction, table.
pub const SNAPSHOT_ROWS_TOTAL: &str = "duplex_snapshot_rows_total";
/// Rows a table's snapshot expects to copy (counted when planned). Labels: direction,
/// table.
pub const SNAPSHOT_ROWS_ESTIMATED: &str = "duplex_snapshot_rows_estimated";
/// Chunks of a table's snapshot not copied yet. Labels: direction, table.
pub const SNAPSHOT_CHUNKS_REMAINING: &str = "duplex_snapshot_chunks_remaining";

/// Rows compared by `duplex verify`, over every run. Labels: table.
pub const VERIFY_ROWS_CHECKED_TOTAL: &str = "duplex_verify_rows_checked_total";
/// Differing keys plus orphaned rows the last `duplex verify` reported. Labels: table.
pub const VERIFY_DIFFERENCES: &str = "duplex_verify_differences";
/// When the last `duplex verify` of the table finished (0: never). Labels: table.
pub const VERIFY_LAST_RUN_TIMESTAMP_SECONDS: &str = "duplex_verify_last_run_timestamp_seconds";

/// 1 while this instance does all the work: every component holds its lock (see
/// `standby`); 0 while it waits as a standby (or only part of it works). No labels.
pub const INSTANCE_ACTIVE: &str = "duplex_instance_active";
/// 1 while the component works in this instance, 0 while it waits for another
/// instance or is down. Labels: component (`source <node>`, `apply <direction>`).
pub const INSTANCE_COMPONENT_ACTIVE: &str = "duplex_instance_component_active";

/// Always 1. Labels: version.
pub const BUILD_INFO: &str = "duplex_build_info";

/// Why a target transaction was rolled back and written again in place
/// ([`APPLY_RETRIES_TOTAL`]'s `reason` label).
pub const RETRY_REASONS: [&str; 3] = ["deadlock", "serialization_failure", "lock_timeout"];

/// How an incoming version lost ([`APPLY_CONFLICTS_TOTAL`]'s `resolution` label).
pub const CONFLICT_RESOLUTIONS: [&str; 2] = ["kept_local", "dropped_older_than_tombstone"];

/// One direction's apply metrics, registered once when the direction starts and
/// shared by its consumer, worker and writer. Every series exists (at zero) from
/// the start, so rates and alerts see it before the first event.
#[derive(Clone)]
pub struct ApplyMetrics {
    pub halted: Gauge,
    pub connected: Gauge,
    pub transactions: Counter,
    pub dead_letters: Counter,
    pub duplicates: Counter,
    pub incomplete: Counter,
    pub commit_to_apply: Histogram,
    pub batch_rows: Histogram,
    pub batch_seconds: Histogram,
    pub lag_seconds: Gauge,
    pub kafka_lag: Gauge,
    retries: Vec<(&'static str, Counter)>,
    tables: BTreeMap<String, ApplyTableMetrics>,
}

/// One configured table's apply counters in one direction.
#[derive(Clone)]
pub struct ApplyTableMetrics {
    pub upserts: Counter,
    pub deletes: Counter,
    pub repairs: Counter,
    conflicts: Vec<(&'static str, Counter)>,
}

impl ApplyTableMetrics {
    /// The conflict counter for `resolution`, one of [`CONFLICT_RESOLUTIONS`].
    pub fn conflicts(&self, resolution: &str) -> Option<&Counter> {
        self.conflicts
            .iter()
            .find(|(r, _)| *r == resolution)
            .map(|(_, c)| c)
    }
}

impl ApplyMetrics {
    /// Registers the series of `direction` for the configured `tables`.
    pub fn new<'t>(direction: &str, tables: impl IntoIterator<Item = &'t str>) -> ApplyMetrics {
        let d = direction.to_string();
        let counter = |name: &'static str| {
            let c = metrics::counter!(name, "direction" => d.clone());
            c.increment(0);
            c
        };
        let table_metrics = |table: &str| {
            let labels = |extra: (&'static str, &'static str)| {
                [
                    ("direction", d.clone()),
                    ("table", table.to_string()),
                    (extra.0, extra.1.to_string()),
                ]
            };
            // Every series at zero from the start: `increase()` sees the first event.
            let zero = |c: Counter| {
                c.increment(0);
                c
            };
            ApplyTableMetrics {
                upserts: zero(metrics::counter!(
                    APPLY_ROWS_TOTAL,
                    &labels(("op", "upsert"))
                )),
                deletes: zero(metrics::counter!(
                    APPLY_ROWS_TOTAL,
                    &labels(("op", "delete"))
                )),
                repairs: zero(
                    metrics::counter!(APPLY_REPAIRS_TOTAL, "direction" => d.clone(), "table" => table.to_string()),
                ),
                conflicts: CONFLICT_RESOLUTIONS
                    .iter()
                    .map(|r| {
                        let c =
                            metrics::counter!(APPLY_CONFLICTS_TOTAL, &labels(("resolution", r)));
                        (*r, zero(c))
                    })
                    .collect(),
            }
        };
        ApplyMetrics {
            halted: metrics::gauge!(APPLY_HALTED, "direction" => d.clone()),
            connected: metrics::gauge!(APPLY_CONNECTED, "direction" => d.clone()),
            transactions: counter(APPLY_TRANSACTIONS_TOTAL),
            dead_letters: counter(APPLY_DEAD_LETTERS_TOTAL),
            duplicates: counter(APPLY_DUPLICATES_SKIPPED_TOTAL),
            incomplete: counter(APPLY_INCOMPLETE_TRANSACTIONS_TOTAL),
            commit_to_apply: metrics::histogram!(APPLY_COMMIT_TO_APPLY_SECONDS, "direction" => d.clone()),
            batch_rows: metrics::histogram!(APPLY_BATCH_ROWS, "direction" => d.clone()),
            batch_seconds: metrics::histogram!(APPLY_BATCH_SECONDS, "direction" => d.clone()),
            lag_seconds: metrics::gauge!(APPLY_LAG_SECONDS, "direction" => d.clone()),
            kafka_lag: metrics::gauge!(APPLY_KAFKA_LAG_MESSAGES, "direction" => d.clone()),
            retries: RETRY_REASONS
                .iter()
                .map(|r| {
                    let c = metrics::counter!(APPLY_RETRIES_TOTAL, "direction" => d.clone(), "reason" => *r);
                    c.increment(0);
                    (*r, c)
                })
                .collect(),
            tables: tables
                .into_iter()
                .map(|t| (t.to_string(), table_metrics(t)))
                .collect(),
        }
    }

    /// The retry counter for `reason`, one of [`RETRY_REASONS`].
    pub fn retries(&self, reason: &str) -> Option<&Counter> {
        self.retries
            .iter()
            .find(|(r, _)| *r == reason)
            .map(|(_, c)| c)
    }

    /// The counters of configured table `table` (`schema.table`).
    pub fn table(&self, table: &str) -> Option<&ApplyTableMetrics> {
        self.tables.get(table)
    }
}

/// One node's capture metrics, registered once when its reader starts. The configured
/// tables' series exist at zero from the start; a table the publication holds beyond
/// them (added by hand) gets its series on its first event.
#[derive(Clone)]
pub struct CaptureMetrics {
    node: String,
    pub connected: Gauge,
    pub transactions: Counter,
    pub echoes: Counter,
    pub confirmed_lsn: Gauge,
    pub slot_lag: Gauge,
    pub slot_retained_wal: Gauge,
    pub slot_safe_wal_size: Gauge,
    slot_wal_status: Vec<(&'static str, Gauge)>,
    tables: BTreeMap<(String, &'static str), (Counter, Counter)>,
}

/// The slot's possible `wal_status` values ([`SOURCE_SLOT_WAL_STATUS`]'s label).
pub const SLOT_WAL_STATUSES: [&str; 4] = ["reserved", "extended", "unreserved", "lost"];

/// The capture metrics' `op` label values.
pub const SOURCE_OPS: [&str; 4] = ["insert", "update", "delete", "truncate"];

/// The slot's `safe_wal_size` when `max_slot_wal_keep_size` is unlimited: nothing can
/// be written that would lose the slot.
pub const UNLIMITED_SAFE_WAL_SIZE: f64 = f64::INFINITY;

impl CaptureMetrics {
    /// Registers `node`'s series, with those of its `tables` (`schema.table` on the node).
    pub fn new<'t>(node: &str, tables: impl IntoIterator<Item = &'t str>) -> CaptureMetrics {
        let n = node.to_string();
        let counter = |name: &'static str| {
            let c = metrics::counter!(name, "node" => n.clone());
            c.increment(0);
            c
        };
        let mut m = CaptureMetrics {
            connected: metrics::gauge!(SOURCE_CONNECTED, "node" => n.clone()),
            transactions: counter(SOURCE_TRANSACTIONS_TOTAL),
            echoes: counter(SOURCE_ECHOES_SUPPRESSED_TOTAL),
            confirmed_lsn: metrics::gauge!(SOURCE_CONFIRMED_LSN_BYTES, "node" => n.clone()),
            slot_lag: metrics::gauge!(SOURCE_SLOT_LAG_BYTES, "node" => n.clone()),
            slot_retained_wal: metrics::gauge!(SOURCE_SLOT_RETAINED_WAL_BYTES, "node" => n.clone()),
            slot_safe_wal_size: metrics::gauge!(SOURCE_SLOT_SAFE_WAL_SIZE_BYTES, "node" => n.clone()),
            slot_wal_status: SLOT_WAL_STATUSES
                .iter()
                .map(|s| (*s, metrics::gauge!(SOURCE_SLOT_WAL_STATUS, "node" => n.clone(), "status" => *s)))
                .collect(),
            tables: BTreeMap::new(),
            node: n,
        };
        for table in tables {
            for op in SOURCE_OPS {
                let (read, produced) = m.table_op(table, op);
                read.increment(0);
                produced.increment(0);
            }
        }
        m.slot_safe_wal_size.set(UNLIMITED_SAFE_WAL_SIZE);
        m
    }

    /// Sets the wal_status gauge of `status` to 1 and the others to 0.
    pub fn set_wal_status(&self, status: &str) {
        for (s, g) in &self.slot_wal_status {
            g.set(if *s == status { 1.0 } else { 0.0 });
        }
    }

    /// The (read, produced) counters of `table` (`schema.table`) and `op`.
    pub fn table_op(&mut self, table: &str, op: &'static str) -> &(Counter, Counter) {
        let node = &self.node;
        self.tables
            .entry((table.to_string(), op))
            .or_insert_with(|| {
                let labels = [
                    ("node", node.clone()),
                    ("table", table.to_string()),
                    ("op", op.to_string()),
                ];
                (
                    metrics::counter!(SOURCE_EVENTS_TOTAL, &labels),
                    metrics::counter!(SINK_KAFKA_PRODUCED_TOTAL, &labels),
                )
            })
    }
}

/// One table's snapshot metrics in one direction.
#[derive(Clone)]
pub struct SnapshotMetrics {
    pub rows: Counter,
    pub rows_estimated: Gauge,
    pub chunks_remaining: Gauge,
}

impl SnapshotMetrics {
    pub fn new(direction: &str, table: &str) -> SnapshotMetrics {
        let labels = [
            ("direction", direction.to_string()),
            ("table", table.to_string()),
        ];
        let rows = metrics::counter!(SNAPSHOT_ROWS_TOTAL, &labels);
        rows.increment(0);
        SnapshotMetrics {
            rows,
            rows_estimated: metrics::gauge!(SNAPSHOT_ROWS_ESTIMATED, &labels),
            chunks_remaining: metrics::gauge!(SNAPSHOT_CHUNKS_REMAINING, &labels),
        }
    }
}

/// One table's `duplex verify` results, as last recorded on the nodes.
#[derive(Clone)]
pub struct VerifyMetrics {
    pub rows_checked: Counter,
    pub differences: Gauge,
    pub last_run: Gauge,
}

impl VerifyMetrics {
    pub fn new(table: &str) -> VerifyMetrics {
        let labels = [("table", table.to_string())];
        let rows_checked = metrics::counter!(VERIFY_ROWS_CHECKED_TOTAL, &labels);
        rows_checked.increment(0);
        let m = VerifyMetrics {
            rows_checked,
            differences: metrics::gauge!(VERIFY_DIFFERENCES, &labels),
            last_run: metrics::gauge!(VERIFY_LAST_RUN_TIMESTAMP_SECONDS, &labels),
        };
        m.differences.set(0.0);
        m.last_run.set(0.0);
        m
    }
}

/// Upper bounds of [`APPLY_COMMIT_TO_APPLY_SECONDS`]' buckets: 1 ms to 10 minutes, fine
/// around the 10–500 ms a healthy direction shows, so `histogram_quantile` is close.
pub const LATENCY_BUCKETS_SECONDS: [f64; 24] = [
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5,
    2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Upper bounds of [`APPLY_BATCH_SECONDS`]' buckets: 1 ms to 1 minute.
pub const BATCH_BUCKETS_SECONDS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Upper bounds of [`APPLY_BATCH_ROWS`]' buckets: 1 row to `sync.batch_rows`' largest
/// useful values.
pub const BATCH_BUCKETS_ROWS: [f64; 14] = [
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 50000.0,
];

/// Installs the global Prometheus recorder. Every histogram is a Prometheus histogram
/// (`_bucket`, `_sum`, `_count`), so that instances aggregate and quantiles are computed
/// by the server.
pub fn install() -> Result<PrometheusHandle, String> {
    use metrics_exporter_prometheus::Matcher;
    let mut builder = PrometheusBuilder::new();
    for (name, buckets) in [
        (APPLY_COMMIT_TO_APPLY_SECONDS, &LATENCY_BUCKETS_SECONDS[..]),
        (APPLY_BATCH_SECONDS, &BATCH_BUCKETS_SECONDS[..]),
        (APPLY_BATCH_ROWS, &BATCH_BUCKETS_ROWS[..]),
    ] {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(name.to_string()), buckets)
            .map_err(|e| e.to_string())?;
    }
    let handle = builder.install_recorder().map_err(|e| e.to_string())?;
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(handle)
}

/// What a component is doing, for `/readyz` and the instance metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComponentState {
    /// Connecting, failed, halted or stopped.
    Down,
    /// Waiting while another instance does its work.
    Standby,
    Up,
}

/// What the instance does, when it is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Every component works here.
    Active,
    /// Every component waits for another instance.
    Standby,
    /// Some components work here, the others in another instance.
    Shared,
}

/// Which components are up, for `/readyz` and [`INSTANCE_ACTIVE`].
#[derive(Default, Clone)]
pub struct Health {
    components: Arc<Mutex<BTreeMap<String, (ComponentState, Gauge)>>>,
}

impl Health {
    /// Declares a component that must be up (or standing by) for readiness.
    pub fn register(&self, name: &str) {
        self.set_state(name, ComponentState::Down);
    }

    pub fn set(&self, name: &str, up: bool) {
        let state = if up {
            ComponentState::Up
        } else {
            ComponentState::Down
        };
        self.set_state(name, state);
    }

    pub fn set_state(&self, name: &str, state: ComponentState) {
        let Ok(mut m) = self.components.lock() else {
            return;
        };
        let entry = m.entry(name.to_string()).or_insert_with(|| {
            let g = metrics::gauge!(INSTANCE_COMPONENT_ACTIVE, "component" => name.to_string());
            (state, g)
        });
        entry.0 = state;
        entry.1.set(if state == ComponentState::Up {
            1.0
        } else {
            0.0
        });
        let all_up = m.values().all(|(s, _)| *s == ComponentState::Up);
        metrics::gauge!(INSTANCE_ACTIVE).set(if all_up { 1.0 } else { 0.0 });
    }

    /// Ready when every registered component is up or standing by, with the instance's
    /// role; otherwise lists the components that are down.
    pub fn readiness(&self) -> Result<Role, Vec<String>> {
        let m = self
            .components
            .lock()
            .map_err(|_| vec!["health".to_string()])?;
        let down: Vec<String> = m
            .iter()
            .filter(|(_, (s, _))| *s == ComponentState::Down)
            .map(|(n, _)| n.clone())
            .collect();
        if !down.is_empty() {
            return Err(down);
        }
        let standby = m
            .values()
            .filter(|(s, _)| *s == ComponentState::Standby)
            .count();
        Ok(match standby {
            0 => Role::Active,
            n if n == m.len() => Role::Standby,
            _ => Role::Shared,
        })
    }
}

/// Connections served at once; more are closed unanswered, so that a flood of idle
/// clients costs bounded memory.
const MAX_CONNECTIONS: usize = 64;

/// How long one connection may take to send its request and read the answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the endpoints on `listener` until `stop` turns true. Each connection is
/// served by a task of its own (at most [`MAX_CONNECTIONS`], each at most
/// [`REQUEST_TIMEOUT`]), so a slow or idle client never holds up a probe or a scrape.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle, health: Health, stop: Stop) {
    // Dropped on return: the connections still open are aborted with it.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.requested() => return,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                if connections.len() >= MAX_CONNECTIONS {
                    tracing::debug!("too many metrics connections; closing a new one");
                    continue;
                }
                let (handle, health) = (handle.clone(), health.clone());
                let served = async move {
                    match tokio::time::timeout(REQUEST_TIMEOUT, respond(stream, &handle, &health)).await {
                        Ok(Err(e)) => tracing::debug!(error = %e, "metrics request failed"),
                        Err(_) => tracing::debug!("metrics request timed out"),
                        Ok(Ok(())) => {}
                    }
                };
                connections.spawn(served.instrument(tracing::debug_span!("metrics_connection")));
            }
        }
    }
}

/// Binds the metrics address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

async fn respond(
    mut stream: TcpStream,
    handle: &PrometheusHandle,
    health: &Health,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") && len < buf.len() {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            break;
        }
        len += n;
    }
    let request = String::from_utf8_lossy(&buf[..len]);
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    let (status, body) = match path {
        "/metrics" => ("200 OK", handle.render()),
        "/healthz" => ("200 OK", "ok\n".to_string()),
        "/readyz" => match health.readiness() {
            Ok(Role::Active) => ("200 OK", "ready: active\n".to_string()),
            Ok(Role::Standby) => (
                "200 OK",
                "ready: standby (another instance does the work)\n".to_string(),
            ),
            Ok(Role::Shared) => (
                "200 OK",
                "ready: active for part of the work, standby for the rest\n".to_string(),
            ),
            Err(down) => (
                "503 Service Unavailable",
                format!("not ready: {}\n", down.join(", ")),
            ),
        },
        _ => ("404 Not Found", "not found\n".to_string()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
