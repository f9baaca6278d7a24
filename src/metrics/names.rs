//! Every metric duplex exports, named once, as
//! `duplex_<subsystem>_<name>_<unit>[_total]`, with labels from bounded sets (node,
//! table from the config, op, error class, direction). Each name's doc comment is also
//! its Prometheus HELP text: [`describe`] registers it from the same words.

/// What a metric is, for its HELP and TYPE lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Declares each name as a constant and lists it in [`ALL`] with its kind and its doc
/// comment, so that the HELP text cannot drift from the documentation.
macro_rules! metric_names {
    ($($(#[doc = $doc:literal])+ $kind:ident $name:ident = $value:literal;)+) => {
        $($(#[doc = $doc])+ pub const $name: &str = $value;)+

        /// Every metric: its name, kind and HELP text (its doc comment).
        pub const ALL: &[(&str, Kind, &str)] = &[$(($value, metric_names!(@kind $kind), concat!($($doc),+))),+];
    };
    (@kind counter) => { Kind::Counter };
    (@kind gauge) => { Kind::Gauge };
    (@kind histogram) => { Kind::Histogram };
}

metric_names! {
    /// Row changes read from a node. Labels: node, table, op.
    counter SOURCE_EVENTS_TOTAL = "duplex_source_events_total";
    /// Transactions read from a node. Labels: node.
    counter SOURCE_TRANSACTIONS_TOTAL = "duplex_source_transactions_total";
    /// Transactions dropped because duplex itself applied them. Labels: node.
    counter SOURCE_ECHOES_SUPPRESSED_TOTAL = "duplex_source_echoes_suppressed_total";
    /// The LSN last confirmed to the node's slot, as a byte position. Labels: node.
    gauge SOURCE_CONFIRMED_LSN_BYTES = "duplex_source_confirmed_lsn_bytes";
    /// 1 while the reader streams from the node. Labels: node.
    gauge SOURCE_CONNECTED = "duplex_source_connected";
    /// Errors of the reader. Labels: node, class (transient|definite).
    counter SOURCE_ERRORS_TOTAL = "duplex_source_errors_total";
    /// WAL the slot has not confirmed yet: current WAL LSN − confirmed_flush_lsn. Labels: node.
    gauge SOURCE_SLOT_LAG_BYTES = "duplex_source_slot_lag_bytes";
    /// WAL the slot keeps on the node: current WAL LSN − restart_lsn. Labels: node.
    gauge SOURCE_SLOT_RETAINED_WAL_BYTES = "duplex_source_slot_retained_wal_bytes";
    /// WAL that can still be written before the slot is lost (max_slot_wal_keep_size);
    /// +Inf when unlimited, 0 once lost. Labels: node.
    gauge SOURCE_SLOT_SAFE_WAL_SIZE_BYTES = "duplex_source_slot_safe_wal_size_bytes";
    /// 1 for the slot's current wal_status. Labels: node, status
    /// (reserved|extended|unreserved|lost).
    gauge SOURCE_SLOT_WAL_STATUS = "duplex_source_slot_wal_status";
    /// Messages the broker acknowledged. Labels: node, table, op.
    counter SINK_KAFKA_PRODUCED_TOTAL = "duplex_sink_kafka_produced_total";
    /// Rows written to a target. Labels: direction, table, op (upsert|delete).
    counter APPLY_ROWS_TOTAL = "duplex_apply_rows_total";
    /// Source transactions applied. Labels: direction.
    counter APPLY_TRANSACTIONS_TOTAL = "duplex_apply_transactions_total";
    /// Incoming versions that lost to the target's. Labels: direction, table, resolution.
    counter APPLY_CONFLICTS_TOTAL = "duplex_apply_conflicts_total";
    /// Winning versions re-published to the peer because its incoming version lost (see
    /// `duplex.repairs`). Labels: direction (the one whose incoming version lost), table.
    counter APPLY_REPAIRS_TOTAL = "duplex_apply_repairs_total";
    /// Target transactions rolled back and written again in place after losing to a
    /// concurrent transaction. Labels: direction, reason
    /// (deadlock|serialization_failure|lock_timeout).
    counter APPLY_RETRIES_TOTAL = "duplex_apply_retries_total";
    /// Events sent to the dead-letter queue. Labels: direction.
    counter APPLY_DEAD_LETTERS_TOTAL = "duplex_apply_dead_letters_total";
    /// Events skipped because they were applied before (replays). Labels: direction.
    counter APPLY_DUPLICATES_SKIPPED_TOTAL = "duplex_apply_duplicates_skipped_total";
    /// Source transactions that arrived with events missing (a producer gave up on a
    /// message) and were discarded until the source published them again. Labels: direction.
    counter APPLY_INCOMPLETE_TRANSACTIONS_TOTAL = "duplex_apply_incomplete_transactions_total";
    /// 1 while a direction is halted on a bad event. Labels: direction.
    gauge APPLY_HALTED = "duplex_apply_halted";
    /// Columns the target lacks whose values from the source are owed to it (see
    /// README "Schema changes during a sync"). Labels: direction.
    gauge APPLY_OWED_COLUMNS = "duplex_apply_owed_columns";
    /// Errors of an apply worker. Labels: direction, class (transient|definite).
    counter APPLY_ERRORS_TOTAL = "duplex_apply_errors_total";
    /// Source commit to target commit, per applied source transaction. Labels: direction.
    histogram APPLY_COMMIT_TO_APPLY_SECONDS = "duplex_apply_commit_to_apply_seconds";

    /// Now − commit time of the newest applied source transaction; 0 when caught up.
    /// Labels: direction.
    gauge APPLY_LAG_SECONDS = "duplex_apply_lag_seconds";
    /// Messages on the source topic not yet applied: log end offset − applied offset.
    /// Labels: direction.
    gauge APPLY_KAFKA_LAG_MESSAGES = "duplex_apply_kafka_lag_messages";
    /// Rows per flushed batch. Labels: direction.
    histogram APPLY_BATCH_ROWS = "duplex_apply_batch_rows";
    /// Time to write one batch into the target. Labels: direction.
    histogram APPLY_BATCH_SECONDS = "duplex_apply_batch_seconds";
    /// 1 while the apply worker is connected and applying. Labels: direction.
    gauge APPLY_CONNECTED = "duplex_apply_connected";

    /// Rows copied by initial syncs (snapshots). Labels: direction, table.
    counter SNAPSHOT_ROWS_TOTAL = "duplex_snapshot_rows_total";
    /// Rows a table's snapshot expects to copy (counted when planned). Labels: direction,
    /// table.
    gauge SNAPSHOT_ROWS_ESTIMATED = "duplex_snapshot_rows_estimated";
    /// Chunks of a table's snapshot not copied yet. Labels: direction, table.
    gauge SNAPSHOT_CHUNKS_REMAINING = "duplex_snapshot_chunks_remaining";

    /// Rows compared by `duplex verify`, over every run. Labels: table.
    counter VERIFY_ROWS_CHECKED_TOTAL = "duplex_verify_rows_checked_total";
    /// Differing keys plus orphaned rows the last `duplex verify` reported. Labels: table.
    gauge VERIFY_DIFFERENCES = "duplex_verify_differences";
    /// When the last `duplex verify` of the table finished (0: never). Labels: table.
    gauge VERIFY_LAST_RUN_TIMESTAMP_SECONDS = "duplex_verify_last_run_timestamp_seconds";

    /// 1 while this instance does all the work: every component holds its lock (see
    /// `standby`); 0 while it waits as a standby (or only part of it works). No labels.
    gauge INSTANCE_ACTIVE = "duplex_instance_active";
    /// 1 while the component works in this instance, 0 while it waits for another
    /// instance or is down. Labels: component (`source <node>`, `apply <direction>`).
    gauge INSTANCE_COMPONENT_ACTIVE = "duplex_instance_component_active";

    /// Always 1. Labels: version.
    gauge BUILD_INFO = "duplex_build_info";
}

/// Why a target transaction was rolled back and written again in place
/// ([`APPLY_RETRIES_TOTAL`]'s `reason` label).
pub const RETRY_REASONS: [&str; 3] = ["deadlock", "serialization_failure", "lock_timeout"];

/// How an incoming version lost ([`APPLY_CONFLICTS_TOTAL`]'s `resolution` label).
pub const CONFLICT_RESOLUTIONS: [&str; 2] = ["kept_local", "dropped_older_than_tombstone"];

/// Registers every metric's HELP text with the installed recorder (the doc comment,
/// on one line).
pub fn describe() {
    for (name, kind, doc) in ALL {
        let help = doc.split_whitespace().collect::<Vec<_>>().join(" ");
        match kind {
            Kind::Counter => metrics::describe_counter!(*name, help),
            Kind::Gauge => metrics::describe_gauge!(*name, help),
            Kind::Histogram => metrics::describe_histogram!(*name, help),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_follows_the_convention_and_has_help() {
        let mut seen = std::collections::HashSet::new();
        for (name, kind, doc) in ALL {
            assert!(name.starts_with("duplex_"), "{name}");
            assert!(seen.insert(*name), "{name} twice");
            assert!(!doc.trim().is_empty(), "{name} has no HELP");
            assert_eq!(name.ends_with("_total"), *kind == Kind::Counter, "{name}");
        }
        assert_eq!(ALL.len(), seen.len());
    }
}
