//! The settings a change topic needs so that the brokers never drop a change duplex
//! has not applied: those duplex gives a topic it creates, and the rule `duplex check`
//! applies to an existing one ([`findings`], a pure function of the topic's settings).

use super::{client_config, BrokerError};
use crate::config::KafkaConfig;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use std::time::Duration;

/// The shortest retention `duplex check` accepts silently: a direction stopped longer
/// than the topic keeps changes loses its position. A week is Kafka's default and
/// outlasts a weekend's outage.
pub const MIN_RETENTION_MS: i64 = 7 * 24 * 3600 * 1000;

/// The in-sync replicas a write needs once a topic has three replicas or more: no
/// acknowledged change exists on one disk only, and one broker down stops nothing.
pub const MIN_INSYNC_REPLICAS: i32 = 2;

/// How long reading a topic's metadata and configs may take.
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The topic configs duplex sets when it creates a change topic. Retention is left to
/// the brokers' default (`log.retention.hours`, a week unless changed): keeping
/// changes for ever would fill the disks, and `duplex check` warns when it is short.
/// With fewer than three replicas `min.insync.replicas` is left to the brokers too:
/// two of two would stop every write while one broker restarts.
pub fn creation_configs(replication_factor: i32) -> Vec<(&'static str, String)> {
    let mut configs = vec![
        // The topic is a log of every change: compaction would drop all but the
        // newest event of each key.
        ("cleanup.policy", "delete".to_string()),
        // A replica without the acknowledged changes must never become leader.
        ("unclean.leader.election.enable", "false".to_string()),
    ];
    if replication_factor >= 3 {
        configs.push(("min.insync.replicas", MIN_INSYNC_REPLICAS.to_string()));
    }
    configs
}

/// What the brokers say about an existing change topic; a config the brokers did not
/// report (a Kafka-protocol broker of another kind) is `None` and goes unchecked.
#[derive(Clone, Debug, PartialEq)]
pub struct TopicSettings {
    /// Replicas of its partitions (the fewest, if they differ).
    pub replication_factor: i32,
    /// Brokers in the cluster.
    pub brokers: usize,
    pub cleanup_policy: Option<String>,
    pub unclean_leader_election: Option<bool>,
    pub min_insync_replicas: Option<i32>,
    pub retention_ms: Option<i64>,
    pub retention_bytes: Option<i64>,
}

impl TopicSettings {
    /// From the topic's replica count, the cluster's size and its effective configs.
    pub fn from_configs<'a>(
        replication_factor: i32,
        brokers: usize,
        config: impl Fn(&str) -> Option<&'a str>,
    ) -> TopicSettings {
        TopicSettings {
            replication_factor,
            brokers,
            cleanup_policy: config("cleanup.policy").map(str::to_string),
            unclean_leader_election: config("unclean.leader.election.enable")
                .and_then(|v| v.parse().ok()),
            min_insync_replicas: config("min.insync.replicas").and_then(|v| v.parse().ok()),
            retention_ms: config("retention.ms").and_then(|v| v.parse().ok()),
            retention_bytes: config("retention.bytes").and_then(|v| v.parse().ok()),
        }
    }
}

/// How bad a finding is: an error makes `duplex check` exit 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// The brokers drop or lose changes, or refuse every write.
    Error,
    /// Changes are at risk only in a further failure, or writes stall during one.
    Warning,
}

/// One thing wrong with a topic's settings, in words for the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    pub text: String,
}

/// `min.insync.replicas` for `replicas` that acknowledges a change on two disks when
/// it can, and still accepts writes with one broker down.
fn recommended_min_insync(replicas: i32) -> i32 {
    (replicas - 1).clamp(1, MIN_INSYNC_REPLICAS)
}

/// A duration in hours for messages.
fn hours(ms: i64) -> String {
    let h = ms as f64 / 3_600_000.0;
    if h.fract() == 0.0 {
        format!("{h} h")
    } else {
        format!("{h:.1} h")
    }
}

/// What is wrong with `topic`'s settings, for duplex.
pub fn findings(topic: &str, s: &TopicSettings) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut add = |severity, text: String| {
        out.push(Finding {
            severity,
            text: format!("kafka: topic {topic}: {text}"),
        })
    };
    let alter =
        format!("kafka-configs.sh --alter --entity-type topics --entity-name {topic} --add-config");
    let r = s.replication_factor;
    if let Some(policy) = s
        .cleanup_policy
        .as_deref()
        .filter(|p| p.contains("compact"))
    {
        add(
            Severity::Error,
            format!("cleanup.policy is {policy}: compaction keeps only the newest message of each key and drops the change events before it, applied or not (and a transaction missing events is never applied); run {alter} cleanup.policy=delete"),
        );
    }
    if s.unclean_leader_election == Some(true) {
        add(
            Severity::Error,
            format!("unclean.leader.election.enable is true: when the in-sync replicas are down, a replica missing acknowledged changes may become leader, and those changes are lost (duplex then stops until the nodes are resynchronised); run {alter} unclean.leader.election.enable=false"),
        );
    }
    if let Some(m) = s.min_insync_replicas {
        let fix = recommended_min_insync(r);
        if m > r {
            add(
                Severity::Error,
                format!("min.insync.replicas is {m}, more than its {r} replicas: the brokers refuse every write; run {alter} min.insync.replicas={fix}"),
            );
        } else if m == r && r > 1 {
            add(
                Severity::Warning,
                format!("min.insync.replicas is {m}, as many as its {r} replicas: every write fails, and duplex stops streaming, while any one of them is down (during a rolling restart too); run {alter} min.insync.replicas={fix}"),
            );
        } else if r >= 3 && m < MIN_INSYNC_REPLICAS {
            add(
                Severity::Warning,
                format!("min.insync.replicas is {m} with {r} replicas: a change is acknowledged when its leader alone has it, and lost if that broker's disk fails before a follower copies it; run {alter} min.insync.replicas={fix}"),
            );
        }
    }
    if r == 1 && s.brokers > 1 {
        add(
            Severity::Warning,
            format!("one replica on a cluster of {} brokers: while its broker is down duplex cannot stream, and a lost disk loses the changes on it; give it 3 replicas (kafka-reassign-partitions.sh) and set min.insync.replicas=2", s.brokers),
        );
    }
    if let Some(ms) = s
        .retention_ms
        .filter(|ms| (0..MIN_RETENTION_MS).contains(ms))
    {
        add(
            Severity::Warning,
            format!("retention.ms is {ms} ({}): a direction stopped longer than that finds changes it has not applied deleted, and halts until the nodes are resynchronised; run {alter} retention.ms=-1, or a value of at least {MIN_RETENTION_MS} (7 days) longer than duplex may ever be stopped", hours(ms)),
        );
    }
    if let Some(bytes) = s.retention_bytes.filter(|b| *b >= 0) {
        add(
            Severity::Warning,
            format!("retention.bytes is {bytes}: the brokers delete the oldest changes once the partition grows larger, however recent, so a stopped or slow direction can find changes it has not applied deleted; run {alter} retention.bytes=-1 and bound the topic by retention.ms"),
        );
    }
    out
}

/// `topic`'s settings, or `None` if the cluster has no such topic.
pub async fn describe(
    cfg: &KafkaConfig,
    topic: &str,
) -> Result<Option<TopicSettings>, BrokerError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    // A consumer's metadata request never creates the topic.
    let consumer: BaseConsumer = client_config(cfg).create()?;
    let name = topic.to_string();
    let metadata =
        tokio::task::spawn_blocking(move || consumer.fetch_metadata(Some(&name), DESCRIBE_TIMEOUT))
            .await
            .map_err(BrokerError::Join)??;
    let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(None);
    };
    match t.error().map(RDKafkaErrorCode::from) {
        None => {}
        Some(RDKafkaErrorCode::UnknownTopicOrPartition) => return Ok(None),
        Some(code) => {
            return Err(BrokerError::DescribeTopic {
                topic: topic.to_string(),
                code,
            })
        }
    }
    let replication_factor = t
        .partitions()
        .iter()
        .map(|p| p.replicas().len() as i32)
        .min()
        .unwrap_or(0);
    let brokers = metadata.brokers().len();
    let admin: AdminClient<DefaultClientContext> = client_config(cfg).create()?;
    let opts = AdminOptions::new().request_timeout(Some(DESCRIBE_TIMEOUT));
    let described = admin
        .describe_configs(&[ResourceSpecifier::Topic(topic)], &opts)
        .await?;
    let resource = match described.into_iter().next() {
        Some(Ok(resource)) => resource,
        Some(Err(code)) => {
            return Err(BrokerError::DescribeTopic {
                topic: topic.to_string(),
                code,
            })
        }
        None => {
            return Err(BrokerError::NoTopicDescription {
                topic: topic.to_string(),
            })
        }
    };
    Ok(Some(TopicSettings::from_configs(
        replication_factor,
        brokers,
        |name| resource.get(name).and_then(|e| e.value.as_deref()),
    )))
}

#[cfg(test)]
#[path = "topic_tests.rs"]
mod tests;
