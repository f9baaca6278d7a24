//! The handles each component registers its series through, once when it starts:
//! every series exists (at zero) from then on, so rates and alerts see it before the
//! first event.

use super::names::*;
use metrics::{Counter, Gauge, Histogram};
use std::collections::BTreeMap;

/// One direction's apply metrics, registered once when the direction starts and
/// shared by its consumer, worker and writer. Every series exists (at zero) from
/// the start, so rates and alerts see it before the first event.
#[derive(Clone)]
pub struct ApplyMetrics {
    pub halted: Gauge,
    pub owed_columns: Gauge,
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
            owed_columns: metrics::gauge!(APPLY_OWED_COLUMNS, "direction" => d.clone()),
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
