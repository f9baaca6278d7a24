//! Sessions to a node and their errors: [`connect`] opens an ordinary SQL session
//! with duplex's fixed output settings (every component's SQL goes through one), and
//! [`NodeError`] says which node and what failed, with the server's message and
//! SQLSTATE, classified once.

use crate::config::Config;
pub use crate::pg::error::{describe, sql_class, SqlContext, SqlError};
use crate::pg::sql::OUTPUT_SETTINGS;
use crate::pg::tls::Tls;
use crate::{Classify, ErrorClass};
use std::time::Duration;
use tokio_postgres::Client;
use tracing::Instrument;

/// Errors administering a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Sql(#[from] SqlError),
    #[error("node {node}: creating replication slot {slot}: {}", describe(source))]
    SlotCreation {
        node: String,
        slot: String,
        source: tokio_postgres::Error,
    },
    #[error("node {node}: connecting timed out")]
    Timeout { node: String },
    #[error("node {node}: {context}: {source}")]
    Walsender {
        node: String,
        context: String,
        source: Box<crate::pg::walsender::WalsenderError>,
    },
    #[error("node {node}: {0}", .detail)]
    Config { node: String, detail: String },
    #[error("node {node}: replication slot {slot} is gone (duplex created it at LSN {created_lsn} on {created_at}): changes made on this node since it was lost were never read. Bring the peer level with this node (copy the configured tables), then run `duplex setup` to create the slot again")]
    SlotLost {
        node: String,
        slot: String,
        created_lsn: String,
        created_at: String,
    },
    #[error("node {node}: replication slot {slot} was invalidated by PostgreSQL ({}), and the changes it had not read since LSN {confirmed} are gone. Run `duplex setup` (it drops the invalidated slot and creates it again), then `duplex snapshot` to bring the peer level with this node; {}", invalidation_cause(reason.as_deref()), invalidation_advice(reason.as_deref()))]
    SlotInvalidated {
        node: String,
        slot: String,
        confirmed: String,
        /// `invalidation_reason` (PostgreSQL 17 and later); `None` before 17, where
        /// only a slot that lost its WAL shows as invalidated (`wal_status` lost).
        reason: Option<String>,
    },
    #[error("node {node}: {detail} (recorded in duplex.slots.topic_lost when it was found; nothing reads or writes this topic until it is cleared)")]
    TopicLost { node: String, detail: String },
    #[error("node {node}'s WAL ends at {wal_end}, but node {peer} already applied its changes up to {applied} through the same slot {slot}: node {node} went back in time (restored from a backup or a disk snapshot?), and its new changes would be taken for ones already applied. Bring node {peer} level with node {node} (copy the configured tables), then drop the slot on node {node} (SELECT pg_drop_replication_slot('{slot}')) and run `duplex setup`: the new slot starts a new stream")]
    HistoryRewound {
        node: String,
        peer: String,
        slot: String,
        applied: String,
        wal_end: String,
    },
    #[error("node {node}: slot {slot} is in use by process {pid}; stop duplex first")]
    SlotActive {
        node: String,
        slot: String,
        pid: i32,
    },
}

/// Why PostgreSQL invalidated a slot, from its `invalidation_reason`.
pub fn invalidation_cause(reason: Option<&str>) -> String {
    match reason {
        None | Some("wal_removed") => {
            "wal_status lost: it held more WAL than max_slot_wal_keep_size allows".into()
        }
        Some("rows_removed") => "invalidation_reason rows_removed: VACUUM removed catalog rows it still needed (on a standby: hot_standby_feedback is off, or no physical slot holds them on the primary)".into(),
        Some("wal_level_insufficient") => "invalidation_reason wal_level_insufficient: wal_level was lowered below logical".into(),
        Some("idle_timeout") => "invalidation_reason idle_timeout: it was unused for longer than idle_replication_slot_timeout".into(),
        Some(other) => format!("invalidation_reason {other}"),
    }
}

/// What keeps a slot from being invalidated the same way again.
pub fn invalidation_advice(reason: Option<&str>) -> &'static str {
    match reason {
        None | Some("wal_removed") => {
            "raise max_slot_wal_keep_size if duplex may be stopped this long again"
        }
        Some("rows_removed") => "keep hot_standby_feedback on where duplex reads a standby",
        Some("wal_level_insufficient") => "keep wal_level = logical",
        Some("idle_timeout") => {
            "raise idle_replication_slot_timeout (or set it to 0) above the longest time duplex may be stopped"
        }
        Some(_) => "see PostgreSQL's documentation of pg_replication_slots.invalidation_reason",
    }
}

impl Classify for NodeError {
    fn class(&self) -> ErrorClass {
        match self {
            NodeError::Sql(e) => e.class(),
            // The slot was not made; PostgreSQL 15 sometimes fails an attempt that has
            // to wait for concurrent transactions with an internal error (XX000) that
            // the next attempt does not meet.
            NodeError::SlotCreation { source, .. }
                if source.code().is_some_and(|c| c.code() == "XX000") =>
            {
                ErrorClass::Transient
            }
            NodeError::SlotCreation { source, .. } => sql_class(source),
            NodeError::Walsender { source, .. } => source.class(),
            NodeError::Timeout { .. } | NodeError::SlotActive { .. } => ErrorClass::Transient,
            NodeError::Config { .. }
            | NodeError::SlotLost { .. }
            | NodeError::SlotInvalidated { .. }
            | NodeError::TopicLost { .. }
            | NodeError::HistoryRewound { .. } => ErrorClass::Definite,
        }
    }
}

/// The TLS context of `node` from its URL.
pub fn tls_of(cfg: &Config, node: &str) -> Result<Tls, NodeError> {
    let config_err = |detail: String| NodeError::Config {
        node: node.to_string(),
        detail,
    };
    let node_cfg = cfg
        .nodes
        .get(node)
        .ok_or_else(|| config_err("not in the config".into()))?;
    let params = node_cfg.tls().map_err(|e| config_err(e.to_string()))?;
    Tls::shared(&params).map_err(|e| config_err(e.to_string()))
}

/// TCP keepalive settings for a session that holds what the next session needs (a
/// replication origin, row locks): the node ends it once duplex has been gone for
/// about `sync.receive_timeout_ms` (idle a third of it, then three probes a third
/// apart) instead of the OS's two hours, on a dead route or a host that vanished.
pub fn keepalive_sql(cfg: &Config) -> String {
    let s = (cfg.sync.receive_timeout_ms / 3000).max(1);
    format!(
        "SET tcp_keepalives_idle = {s}; SET tcp_keepalives_interval = {s}; \
         SET tcp_keepalives_count = 3"
    )
}

/// Opens a replication connection to `node` as `duplex run` does (its own TLS
/// handshake and authentication, pg_hba.conf's `replication` lines), named "duplex
/// `purpose`".
pub async fn replication(
    cfg: &Config,
    node: &str,
    purpose: &str,
) -> Result<crate::pg::walsender::WalsenderConnection, NodeError> {
    let node_cfg = cfg.nodes.get(node).ok_or_else(|| NodeError::Config {
        node: node.to_string(),
        detail: "not in the config".into(),
    })?;
    let pg = node_cfg.pg_config().map_err(|e| NodeError::Config {
        node: node.to_string(),
        detail: e.to_string(),
    })?;
    let timeout = Duration::from_millis(cfg.source.connect_timeout_ms);
    crate::pg::walsender::WalsenderConnection::connect(
        &pg,
        &tls_of(cfg, node)?,
        &format!("duplex {purpose}"),
        timeout,
        node_cfg.allow_cleartext_password,
    )
    .await
    .map_err(|source| NodeError::Walsender {
        node: node.to_string(),
        context: "replication connection".into(),
        source: Box::new(source),
    })
}

/// Opens an ordinary SQL session to `node`, with duplex's fixed output settings. The
/// connection task ends when the returned client is dropped.
pub async fn connect(cfg: &Config, node: &str, purpose: &str) -> Result<Client, NodeError> {
    let node_cfg = cfg.nodes.get(node).ok_or_else(|| NodeError::Config {
        node: node.to_string(),
        detail: "not in the config".into(),
    })?;
    let mut pg = node_cfg.pg_config().map_err(|e| NodeError::Config {
        node: node.to_string(),
        detail: e.to_string(),
    })?;
    let timeout = Duration::from_millis(cfg.source.connect_timeout_ms);
    pg.application_name(format!("duplex {purpose}"))
        .connect_timeout(timeout);
    let options: Vec<String> = OUTPUT_SETTINGS
        .iter()
        .filter(|(k, _)| *k != "client_encoding")
        .map(|(k, v)| format!("-c {k}={}", v.replace(' ', "\\ ")))
        .collect();
    pg.options(options.join(" "));
    let fut = pg.connect(tls_of(cfg, node)?);
    let (client, connection) = tokio::time::timeout(timeout + Duration::from_secs(1), fut)
        .await
        .map_err(|_| NodeError::Timeout {
            node: node.to_string(),
        })?
        .sql(node, "connecting")?;
    let span = tracing::info_span!("pg_connection", node, purpose);
    tokio::spawn(
        async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection closed");
            }
        }
        .instrument(span),
    );
    Ok(client)
}
