//! Configuration: the TOML file an operator writes, parsed and validated once at start.
//!
//! `Config::load` reads the file, rejects unknown keys, fills defaults from the named
//! constants below, pulls node passwords from the environment and runs `validate()`,
//! whose errors name the failing field path. Node URLs carry secrets: nothing here
//! prints them except through [`NodeConfig::redacted_url`].

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

mod connections;
pub mod mapping;
mod snapshot;
mod sync;
pub mod tls;
pub use connections::{
    is_secret_property, kafka_property_of_env_var, password_env_var, redact_url, KafkaConfig,
    NodeConfig,
};
pub use snapshot::{SnapshotConfig, SnapshotMode};
pub use sync::{IdentityConfig, OnError, SyncConfig, TableConfig};

pub const DEFAULT_TOPIC_PREFIX: &str = "duplex";
pub const DEFAULT_PUBLICATION: &str = "duplex";
pub const DEFAULT_REPLICATION_FACTOR: i32 = 1;
pub const DEFAULT_MAX_IN_FLIGHT_MESSAGES: usize = 10_000;
pub const DEFAULT_STATUS_INTERVAL_MS: u64 = 10_000;
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 10_000;
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_RETRY_INITIAL_MS: u64 = 500;
pub const DEFAULT_RETRY_MAX_MS: u64 = 30_000;
pub const DEFAULT_RECEIVE_TIMEOUT_MS: u64 = 60_000;
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9187";
pub const DEFAULT_TAKEOVER_MS: u64 = 15_000;
/// Below this, a slow node answering a lock check would make components stop for nothing.
pub const MIN_TAKEOVER_MS: u64 = 5_000;
pub const DEFAULT_UPDATED_AT: &str = "updated_at";
/// Replication origins of duplex's apply sessions start with this; the reader drops
/// transactions carrying such an origin so that applied changes never echo back.
pub const ORIGIN_PREFIX: &str = "duplex_";

/// Errors in the configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: String,
        source: Box<toml::de::Error>,
    },
    #[error("config field `{field}`: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub nodes: BTreeMap<String, NodeConfig>,
    pub kafka: KafkaConfig,
    #[serde(default)]
    pub source: SourceConfig,
    #[serde(default)]
    pub sync: SyncConfig,
    #[serde(default)]
    pub snapshot: SnapshotConfig,
    pub tables: Vec<TableConfig>,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub standby: StandbyConfig,
}

/// Two `duplex run` on one config: one works, the other waits (see `standby`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StandbyConfig {
    /// How long after the active instance dies (or loses its nodes) a waiting instance
    /// takes over, at most.
    pub takeover_ms: u64,
}

impl Default for StandbyConfig {
    fn default() -> Self {
        StandbyConfig {
            takeover_ms: DEFAULT_TAKEOVER_MS,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    /// Standby status updates go to the node at least this often.
    pub status_interval_ms: u64,
    /// An idle node gets a logical message this often so its slot keeps advancing.
    pub heartbeat_interval_ms: u64,
    pub connect_timeout_ms: u64,
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    /// A replication connection that delivers nothing (not even the heartbeat's WAL)
    /// for this long, or a node that does not answer a statement of the reader in this
    /// time, is taken for stalled and reconnected.
    pub receive_timeout_ms: u64,
    /// Where the changes duplex applied on a node are dropped before they could echo
    /// back: by the node's walsender where it can (PostgreSQL 16 and later, pgoutput's
    /// `origin = 'none'`, which never decodes them), or by duplex after decoding.
    pub echo_filter: EchoFilter,
}

/// Who drops the changes duplex applied on a node (see `source.echo_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EchoFilter {
    /// The node's walsender, from PostgreSQL 16; duplex on older nodes. The
    /// walsender then drops every transaction written under any replication origin,
    /// another replication tool's too.
    #[default]
    Node,
    /// duplex, after the walsender decoded them: changes other replication tools
    /// apply on the node are forwarded.
    Duplex,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            status_interval_ms: DEFAULT_STATUS_INTERVAL_MS,
            heartbeat_interval_ms: DEFAULT_HEARTBEAT_INTERVAL_MS,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            retry_initial_ms: DEFAULT_RETRY_INITIAL_MS,
            retry_max_ms: DEFAULT_RETRY_MAX_MS,
            receive_timeout_ms: DEFAULT_RECEIVE_TIMEOUT_MS,
            echo_filter: EchoFilter::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: DEFAULT_METRICS_LISTEN.to_string(),
        }
    }
}

/// One replication direction: changes read on `from` are applied to `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Direction {
    pub from: String,
    pub to: String,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}_to_{}", self.from, self.to)
    }
}

impl Config {
    /// Reads, parses and validates a config file, taking node passwords from the
    /// environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut cfg = Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                source,
            },
            other => other,
        })?;
        cfg.apply_env(|k| std::env::var(k).ok());
        cfg.apply_kafka_env(
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))),
        );
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses TOML text without validating it.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<config>".into(),
            source: Box::new(e),
        })
    }

    /// Takes `DUPLEX_NODES_<NAME>_PASSWORD` for each node from `env`.
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) {
        for (name, node) in self.nodes.iter_mut() {
            node.password_from_env = env(&password_env_var(name));
        }
    }

    /// Takes `[kafka.properties]` from `DUPLEX_KAFKA_PROPERTIES_<PROPERTY>` variables
    /// among `vars` (see [`kafka_property_of_env_var`]); they win over the file's, so
    /// that secrets need not be in it.
    pub fn apply_kafka_env(&mut self, vars: impl IntoIterator<Item = (String, String)>) {
        for (name, value) in vars {
            if let Some(property) = kafka_property_of_env_var(&name) {
                self.kafka.properties.insert(property, value);
            }
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.nodes.len() != 2 {
            return Err(invalid(
                "nodes",
                format!("exactly two nodes are needed, found {}", self.nodes.len()),
            ));
        }
        for (name, node) in &self.nodes {
            let field = format!("nodes.{name}");
            check_name(&field, name)?;
            node.pg_config().map_err(|e| match e {
                ConfigError::Invalid { reason, .. } => invalid(format!("{field}.url"), reason),
                other => other,
            })?;
            if let Some(slot) = &node.slot {
                check_name(&format!("{field}.slot"), slot)?;
            }
            if let Some(publication) = &node.publication {
                check_name(&format!("{field}.publication"), publication)?;
            }
        }
        self.validate_kafka()?;
        self.directions()?;
        self.validate_tables()?;
        self.snapshot.validate()?;
        self.metrics_listen()?;
        let s = &self.source;
        for (field, v) in [
            ("source.status_interval_ms", s.status_interval_ms),
            ("source.heartbeat_interval_ms", s.heartbeat_interval_ms),
            ("source.connect_timeout_ms", s.connect_timeout_ms),
            ("source.retry_initial_ms", s.retry_initial_ms),
            ("source.retry_max_ms", s.retry_max_ms),
        ] {
            if v == 0 {
                return Err(invalid(field, "must be greater than 0"));
            }
        }
        if self.standby.takeover_ms < MIN_TAKEOVER_MS {
            return Err(invalid(
                "standby.takeover_ms",
                format!("must be at least {MIN_TAKEOVER_MS}"),
            ));
        }
        if s.receive_timeout_ms < 2 * s.heartbeat_interval_ms {
            return Err(invalid(
                "source.receive_timeout_ms",
                "must be at least twice source.heartbeat_interval_ms (the heartbeat is what arrives on an idle connection)",
            ));
        }
        if s.retry_max_ms < s.retry_initial_ms {
            return Err(invalid(
                "source.retry_max_ms",
                "must not be smaller than source.retry_initial_ms",
            ));
        }
        Ok(())
    }

    fn validate_kafka(&self) -> Result<(), ConfigError> {
        let k = &self.kafka;
        if k.brokers.trim().is_empty() {
            return Err(invalid("kafka.brokers", "must name at least one broker"));
        }
        if k.topic_prefix.is_empty()
            || !k
                .topic_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            return Err(invalid(
                "kafka.topic_prefix",
                "must be non-empty and use only ASCII letters, digits, '.', '_' and '-'",
            ));
        }
        if k.replication_factor < 1 {
            return Err(invalid("kafka.replication_factor", "must be at least 1"));
        }
        if k.max_in_flight_messages == 0 {
            return Err(invalid(
                "kafka.max_in_flight_messages",
                "must be at least 1",
            ));
        }
        for key in ["bootstrap.servers", "enable.idempotence", "acks"] {
            if k.properties.contains_key(key) {
                return Err(invalid(
                    format!("kafka.properties.{key}"),
                    "is set by duplex itself and may not be overridden",
                ));
            }
        }
        Ok(())
    }

    fn validate_tables(&self) -> Result<(), ConfigError> {
        if self.tables.is_empty() {
            return Err(invalid("tables", "at least one table is needed"));
        }
        let nodes: Vec<&String> = self.nodes.keys().collect();
        let names: Vec<&str> = self.tables.iter().map(|t| t.name.as_str()).collect();
        for (i, t) in self.tables.iter().enumerate() {
            t.validate(i)?;
            if self.tables[..i].iter().any(|o| o.name == t.name) {
                return Err(invalid(
                    format!("tables[{i}].name"),
                    format!("{} is listed twice", t.name),
                ));
            }
            if t.is_mapped() {
                mapping::validate(
                    &format!("tables[{i}]"),
                    &nodes,
                    &t.nodes,
                    &t.key,
                    &t.new_key,
                    &t.columns,
                    &names,
                )?;
            }
            // A node's table belongs to one pair: its changes must map one way.
            for node in &nodes {
                let on = t.name_on(node);
                if self.tables[..i].iter().any(|o| o.name_on(node) == on) {
                    return Err(invalid(
                        format!("tables[{i}]"),
                        format!("table {on} on node {node} is in two [[tables]] entries"),
                    ));
                }
            }
        }
        if let Some(n) = nodes
            .iter()
            .find(|n| mapping::RESERVED.contains(&n.as_str()))
        {
            if self.tables.iter().any(|t| !t.columns.is_empty()) {
                return Err(invalid(
                    format!("nodes.{n}"),
                    format!("{n:?} is a reserved word in [[tables]] columns; rename the node"),
                ));
            }
        }
        self.sync.validate(&nodes)
    }

    pub fn metrics_listen(&self) -> Result<SocketAddr, ConfigError> {
        self.metrics
            .listen
            .parse()
            .map_err(|_| invalid("metrics.listen", "must be an address like 127.0.0.1:9187"))
    }

    /// The configured directions, from `sync.direction`.
    pub fn directions(&self) -> Result<Vec<Direction>, ConfigError> {
        let names: Vec<&String> = self.nodes.keys().collect();
        let (x, y) = match names.as_slice() {
            [x, y] => (x.to_string(), y.to_string()),
            _ => return Err(invalid("nodes", "exactly two nodes are needed")),
        };
        let xy = Direction {
            from: x.clone(),
            to: y.clone(),
        };
        let yx = Direction { from: y, to: x };
        match self.sync.direction.as_deref().unwrap_or("both") {
            "both" => Ok(vec![xy, yx]),
            d if d == xy.to_string() => Ok(vec![xy]),
            d if d == yx.to_string() => Ok(vec![yx]),
            d => Err(invalid(
                "sync.direction",
                format!("{d:?} is not one of \"both\", \"{xy}\", \"{yx}\""),
            )),
        }
    }

    /// Nodes that are the source of some direction: they need a reader.
    pub fn source_nodes(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .directions()
            .unwrap_or_default()
            .into_iter()
            .map(|d| d.from)
            .collect();
        v.dedup();
        v
    }

    pub fn slot_name(&self, node: &str) -> String {
        self.nodes
            .get(node)
            .and_then(|n| n.slot.clone())
            .unwrap_or_else(|| format!("duplex_{node}"))
    }

    pub fn publication_name(&self, node: &str) -> String {
        self.nodes
            .get(node)
            .and_then(|n| n.publication.clone())
            .unwrap_or_else(|| DEFAULT_PUBLICATION.to_string())
    }

    /// The Kafka topic carrying `node`'s changes.
    pub fn topic(&self, node: &str) -> String {
        format!("{}.{node}.changes", self.kafka.topic_prefix)
    }

    /// The node whose version wins a tie on `updated_at`.
    pub fn tie_winner(&self) -> &str {
        match &self.sync.tie_winner {
            Some(w) => w,
            None => self.nodes.keys().next().map(String::as_str).unwrap_or(""),
        }
    }

    /// The table config whose table on `node` is `name` (`schema.table`).
    pub fn table_on(&self, node: &str, name: &str) -> Option<&TableConfig> {
        self.tables.iter().find(|t| t.name_on(node) == name)
    }

    /// The table config for `schema.table`, if it is configured.
    pub fn table(&self, schema: &str, table: &str) -> Option<&TableConfig> {
        self.tables
            .iter()
            .find(|t| t.schema_table() == (schema, table))
    }

    /// Every replication origin duplex writes under on `node`: per direction into it,
    /// the apply origin and one per copy worker (`snapshot.workers`), and with a mapped
    /// table a second per worker for its mapped copies. Each keeps a replay state on
    /// the node's cluster from its first use until it is dropped, and the cluster caps
    /// those (`max_active_replication_origins` from PostgreSQL 18,
    /// `max_replication_slots` before).
    pub fn origins_on(&self, node: &str) -> Vec<String> {
        let mapped = self.tables.iter().any(TableConfig::is_mapped);
        let mut origins = Vec::new();
        for dir in self.directions().unwrap_or_default() {
            if dir.to != node {
                continue;
            }
            let apply = self.origin_name(&dir);
            for n in 0..self.snapshot.workers {
                origins.push(format!("{apply}_copy{n}"));
                if mapped {
                    origins.push(format!("{apply}_copy{n}m"));
                }
            }
            origins.push(apply);
        }
        origins
    }

    /// The replication origin under which changes from `from` are applied.
    /// Origins are cluster-wide, like slots: the target's slot name keeps two duplex
    /// deployments on one cluster apart.
    pub fn origin_name(&self, dir: &Direction) -> String {
        let slot = self.slot_name(&dir.to);
        let slot = slot.strip_prefix(ORIGIN_PREFIX).unwrap_or(&slot);
        format!("{ORIGIN_PREFIX}{slot}_from_{}", dir.from)
    }
}

/// Node, slot and publication names end up in identifiers and topic names: keep them
/// to what needs no quoting anywhere.
fn check_name(field: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{name:?} must be 1-40 of a-z, 0-9 and _, starting with a letter"),
        ))
    }
}

#[cfg(test)]
mod tests;
