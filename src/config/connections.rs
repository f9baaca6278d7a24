//! Where duplex connects: each PostgreSQL node and the Kafka cluster. Both carry
//! secrets (a URL's password, SASL and TLS properties), so their `Debug` output and
//! [`NodeConfig::redacted_url`] never show them.

use super::tls::{self, TlsParams};
use super::{
    invalid, ConfigError, DEFAULT_MAX_IN_FLIGHT_MESSAGES, DEFAULT_REPLICATION_FACTOR,
    DEFAULT_TOPIC_PREFIX,
};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// libpq-style URL; the password may instead come from `DUPLEX_NODES_<NAME>_PASSWORD`.
    pub url: String,
    /// Replication slot on this node; default `duplex_<node>`.
    pub slot: Option<String>,
    /// Publication on this node; default `duplex`.
    pub publication: Option<String>,
    /// Send the password in cleartext when the node asks for it so (pg_hba.conf
    /// method `password`). Off: a node set up for md5 or SCRAM never asks that, so a
    /// request for it may come from someone between duplex and the node.
    #[serde(default)]
    pub allow_cleartext_password: bool,
    /// Create this node's slot as a failover slot (PostgreSQL 17 and later), which a
    /// physical standby with `sync_replication_slots = on` keeps a copy of: after the
    /// standby is promoted, duplex reads on from that copy.
    #[serde(default)]
    pub failover_slot: bool,
    #[serde(skip)]
    pub password_from_env: Option<String>,
}

impl fmt::Debug for NodeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeConfig")
            .field("url", &self.redacted_url())
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("allow_cleartext_password", &self.allow_cleartext_password)
            .field("failover_slot", &self.failover_slot)
            .finish()
    }
}

impl NodeConfig {
    /// The URL with any password replaced, safe for logs and messages.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    /// Connection parameters, with the environment's password applied and TLS
    /// negotiation set from `sslmode` (the certificate checks are in [`Self::tls`]).
    pub fn pg_config(&self) -> Result<tokio_postgres::Config, ConfigError> {
        let (rest, tls) = tls::split(&self.url).map_err(|e| invalid("url", e))?;
        let mut cfg = tokio_postgres::Config::from_str(&rest)
            .map_err(|e| invalid("url", format!("not a PostgreSQL URL: {e}")))?;
        if let Some(pw) = &self.password_from_env {
            cfg.password(pw.as_bytes());
        }
        cfg.ssl_mode(tls.mode.negotiation());
        Ok(cfg)
    }

    /// The URL's TLS parameters (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`, `sslpassword`).
    pub fn tls(&self) -> Result<TlsParams, ConfigError> {
        tls::split(&self.url)
            .map(|(_, params)| params)
            .map_err(|e| invalid("url", e))
    }
}

/// Replaces the password part of `scheme://user:password@host`, and the values of
/// `password` and `sslpassword` parameters, with `***`.
pub fn redact_url(url: &str) -> String {
    redact_parameters(&redact_userinfo(url))
}

fn redact_userinfo(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let Some(at) = rest.find('@') else {
        return url.to_string();
    };
    let userinfo = &rest[..at];
    match userinfo.find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end + 3],
            &userinfo[..colon],
            &rest[at..]
        ),
        None => url.to_string(),
    }
}

/// `password=…` and `sslpassword=…`, in a URI's query or a key/value string: the value
/// runs to the next `&` or blank (a quoted value with blanks is cut at the first one,
/// which still hides its start).
fn redact_parameters(url: &str) -> String {
    let mut out = String::with_capacity(url.len());
    let mut rest = url;
    while let Some(i) = rest.find("password") {
        let (before, after) = rest.split_at(i + "password".len());
        out.push_str(before);
        let starts_key = before[..i]
            .chars()
            .last()
            .is_none_or(|c| matches!(c, '?' | '&' | ' ') || before[..i].ends_with("ssl"));
        let value = after.trim_start().strip_prefix('=');
        match value {
            Some(v) if starts_key => {
                let v = v.trim_start();
                let end = v.find(['&', ' ']).unwrap_or(v.len());
                out.push_str("=***");
                rest = &v[end..];
            }
            _ => rest = after,
        }
    }
    out.push_str(rest);
    out
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    pub brokers: String,
    #[serde(default = "default_topic_prefix")]
    pub topic_prefix: String,
    #[serde(default = "default_replication_factor")]
    pub replication_factor: i32,
    /// Messages produced but not yet acknowledged by the broker, at most.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight_messages: usize,
    /// Passed to librdkafka verbatim (security.protocol, sasl.*, ssl.*, ...).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

/// Whether a librdkafka property holds a secret (`sasl.password`,
/// `ssl.key.password`, `sasl.oauthbearer.client.secret`, ...).
pub fn is_secret_property(key: &str) -> bool {
    [
        "password",
        "secret",
        "ssl.key.pem",
        "ssl_key",
        "sasl.jaas.config",
    ]
    .iter()
    .any(|s| key.contains(s))
}

/// Debug output never shows a secret property's value.
impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let v = if is_secret_property(k) {
                    "<redacted>"
                } else {
                    v.as_str()
                };
                (k.as_str(), v)
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("topic_prefix", &self.topic_prefix)
            .field("replication_factor", &self.replication_factor)
            .field("max_in_flight_messages", &self.max_in_flight_messages)
            .field("properties", &properties)
            .finish()
    }
}

fn default_topic_prefix() -> String {
    DEFAULT_TOPIC_PREFIX.to_string()
}
fn default_replication_factor() -> i32 {
    DEFAULT_REPLICATION_FACTOR
}
fn default_max_in_flight() -> usize {
    DEFAULT_MAX_IN_FLIGHT_MESSAGES
}

/// Prefix of the environment variables that set `[kafka.properties]`.
pub const KAFKA_PROPERTY_ENV_PREFIX: &str = "DUPLEX_KAFKA_PROPERTIES_";

/// The librdkafka property an environment variable sets: the rest of the name after
/// `KAFKA_PROPERTY_ENV_PREFIX`, lower-cased, `_` for `.` (librdkafka's property names
/// have no `_`): `DUPLEX_KAFKA_PROPERTIES_SASL_PASSWORD` sets `sasl.password`.
pub fn kafka_property_of_env_var(name: &str) -> Option<String> {
    let rest = name.strip_prefix(KAFKA_PROPERTY_ENV_PREFIX)?;
    let valid = !rest.is_empty()
        && rest
            .split('_')
            .all(|part| !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric()));
    valid.then(|| rest.to_ascii_lowercase().replace('_', "."))
}

/// `DUPLEX_NODES_<NAME>_PASSWORD`, the name upper-cased.
pub fn password_env_var(node: &str) -> String {
    format!("DUPLEX_NODES_{}_PASSWORD", node.to_ascii_uppercase())
}
