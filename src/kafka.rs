//! What both pipelines need from Kafka: client settings from the config, topic
//! creation (with the settings of [`topic`]), the one error type of Kafka clients with
//! its classification, and a plain topic reader for tools.

pub mod topic;

use crate::config::KafkaConfig;
use crate::event::Lsn;
use crate::{Classify, ErrorClass};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::ClientConfig;
use std::time::Duration;

/// How long creating a topic may take before it counts as a (transient) failure.
const TOPIC_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors producing to Kafka.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("Kafka client: {0}")]
    Kafka(#[from] KafkaError),
    #[error("creating topic {topic}: {code}")]
    CreateTopic {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error("the broker did not acknowledge a message of commit {commit_lsn}: {error}")]
    Delivery { commit_lsn: Lsn, error: KafkaError },
    #[error("the delivery tracker stopped")]
    TrackerGone,
    #[error("the change to {table} key {key} at LSN {lsn} is {bytes} bytes as a message, more than the producer or broker accepts ({error}): raise message.max.bytes in [kafka.properties] and the topic's max.message.bytes on the broker, then restart duplex")]
    TooLarge {
        table: String,
        key: String,
        lsn: Lsn,
        bytes: usize,
        error: String,
    },
    #[error("reading the topic's offsets: {0}")]
    Task(String),
    #[error("reading the settings of topic {topic}: {code}")]
    DescribeTopic {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error("topic {topic} went back: the broker acknowledged offset {now} after offset {before}, so it lost messages it had acknowledged (a broker without durable storage restarted, or the topic was deleted and created again). Consumers' stored positions no longer match the topic, so the direction reading it is stopped too. To resynchronise: stop duplex; on the peer, delete the direction's row from duplex.apply_positions; on this node, UPDATE duplex.slots SET last_offset = NULL, topic_lost = NULL; start duplex and run `duplex snapshot` to copy what the lost messages carried")]
    OffsetsWentBack {
        topic: String,
        before: i64,
        now: i64,
    },
    #[error("topic {topic} does not exist any more, although the broker had acknowledged messages up to offset {last} on it: the broker lost them (a broker without durable storage restarted, or the topic was deleted). Consumers' stored positions no longer match the topic, so the direction reading it is stopped too. To resynchronise: stop duplex; on the peer, delete the direction's row from duplex.apply_positions; on this node, UPDATE duplex.slots SET last_offset = NULL, topic_lost = NULL; start duplex and run `duplex snapshot` to copy what the lost messages carried")]
    TopicGone { topic: String, last: i64 },
}

impl Classify for SinkError {
    fn class(&self) -> ErrorClass {
        match self {
            SinkError::Kafka(e) | SinkError::Delivery { error: e, .. } => class_of(e),
            SinkError::CreateTopic { code, .. } if is_definite(code) => ErrorClass::Definite,
            // The same event would be too large on every retry.
            SinkError::TooLarge { .. } => ErrorClass::Definite,
            SinkError::OffsetsWentBack { .. } | SinkError::TopicGone { .. } => ErrorClass::Definite,
            _ => ErrorClass::Transient,
        }
    }
}

impl SinkError {
    /// Whether the broker lost messages it had acknowledged.
    pub fn is_topic_lost(&self) -> bool {
        matches!(
            self,
            SinkError::OffsetsWentBack { .. } | SinkError::TopicGone { .. }
        )
    }
}

/// The one classification of librdkafka errors, for producers and consumers alike:
/// bad settings, refused credentials or permissions and invalid topics need the
/// operator; everything else (brokers down, timeouts, leader changes) passes.
pub fn class_of(e: &KafkaError) -> ErrorClass {
    match e {
        KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) => ErrorClass::Definite,
        e => match e.rdkafka_error_code() {
            Some(c) if is_definite(&c) => ErrorClass::Definite,
            _ => ErrorClass::Transient,
        },
    }
}

fn is_definite(c: &RDKafkaErrorCode) -> bool {
    matches!(
        c,
        RDKafkaErrorCode::SaslAuthenticationFailed
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::GroupAuthorizationFailed
            | RDKafkaErrorCode::InvalidConfig
            | RDKafkaErrorCode::InvalidReplicationFactor
            | RDKafkaErrorCode::InvalidPartitions
            | RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::Authentication
            | RDKafkaErrorCode::MessageSizeTooLarge
    )
}

/// librdkafka settings shared by every duplex client: the user's properties on top of
/// the brokers.
pub fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &cfg.brokers);
    for (k, v) in &cfg.properties {
        cc.set(k, v);
    }
    cc
}

/// Creates `topic` unless it exists, with the settings [`topic::creation_configs`]
/// gives. A cluster whose policy refuses them (a managed service may fix some configs)
/// gets the topic with its own defaults and a warning: `duplex check` reports what
/// they lack.
pub async fn ensure_topic(cfg: &KafkaConfig, topic: &str) -> Result<(), SinkError> {
    let admin: AdminClient<DefaultClientContext> = client_config(cfg).create()?;
    let configs = topic::creation_configs(cfg.replication_factor);
    match create_topic(&admin, cfg, topic, &configs).await {
        Err(SinkError::CreateTopic {
            code: RDKafkaErrorCode::PolicyViolation,
            ..
        }) => {
            tracing::warn!(
                topic,
                ?configs,
                "the cluster's policy refused the change topic's settings; creating it with the cluster's defaults (see `duplex check`)"
            );
            create_topic(&admin, cfg, topic, &[]).await
        }
        created => created,
    }
}

async fn create_topic(
    admin: &AdminClient<DefaultClientContext>,
    cfg: &KafkaConfig,
    topic: &str,
    configs: &[(&str, String)],
) -> Result<(), SinkError> {
    let mut new = NewTopic::new(
        topic,
        // One partition: the node's commit order holds across all its tables.
        1,
        TopicReplication::Fixed(cfg.replication_factor),
    );
    for (key, value) in configs {
        new = new.set(key, value);
    }
    let opts = AdminOptions::new().request_timeout(Some(TOPIC_REQUEST_TIMEOUT));
    for result in admin.create_topics([&new], &opts).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(SinkError::CreateTopic { topic, code }),
        }
    }
    Ok(())
}

/// How long asking the broker for a partition's offsets may take.
const WATERMARKS_TIMEOUT: Duration = Duration::from_secs(10);

/// `topic` partition 0's first retained offset and the offset its next message will
/// get (the log start and end).
pub async fn watermarks(cfg: &KafkaConfig, topic: &str) -> Result<(i64, i64), SinkError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let mut cc = client_config(cfg);
    cc.set("group.id", "duplex-watermarks");
    let consumer: BaseConsumer = cc.create()?;
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || consumer.fetch_watermarks(&topic, 0, WATERMARKS_TIMEOUT))
        .await
        .map_err(|e| SinkError::Task(e.to_string()))?
        .map_err(SinkError::Kafka)
}

/// Reads `topic` from the beginning of every partition and hands each message's value
/// to `out`, until `max` messages were read or nothing arrived for `idle`. Blocking:
/// for tools, not the pipeline.
pub fn read_topic(
    cfg: &KafkaConfig,
    topic: &str,
    max: Option<usize>,
    idle: Duration,
    mut out: impl FnMut(&[u8]),
) -> Result<usize, SinkError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Message, Offset, TopicPartitionList};
    let mut cc = client_config(cfg);
    cc.set("group.id", "duplex-tail")
        .set("enable.auto.commit", "false");
    let consumer: BaseConsumer = cc.create()?;
    let mut last = std::time::Instant::now();
    // A topic not created yet (duplex not started, or starting) is waited for, within
    // `idle`: an assignment without partitions would never see its messages.
    let mut tpl = TopicPartitionList::new();
    while tpl.count() == 0 {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        for t in metadata.topics().iter().filter(|t| t.error().is_none()) {
            for p in t.partitions() {
                tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
            }
        }
        if tpl.count() == 0 {
            if last.elapsed() >= idle {
                return Ok(0);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    consumer.assign(&tpl)?;
    let mut read = 0;
    while max.is_none_or(|m| read < m) && last.elapsed() < idle {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                out(m.payload().unwrap_or_default());
                read += 1;
                last = std::time::Instant::now();
            }
            Some(Err(e)) => return Err(SinkError::Kafka(e)),
            None => {}
        }
    }
    Ok(read)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_errors_are_classified_once_for_both_pipelines() {
        let consume = |c| KafkaError::MessageConsumption(c);
        let produce = |c| KafkaError::MessageProduction(c);
        for code in [
            RDKafkaErrorCode::SaslAuthenticationFailed,
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::GroupAuthorizationFailed,
        ] {
            assert_eq!(class_of(&consume(code)), ErrorClass::Definite, "{code:?}");
            assert_eq!(class_of(&produce(code)), ErrorClass::Definite, "{code:?}");
        }
        for code in [
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::RequestTimedOut,
            RDKafkaErrorCode::NotLeaderForPartition,
        ] {
            assert_eq!(class_of(&consume(code)), ErrorClass::Transient, "{code:?}");
        }
        let e = SinkError::Kafka(produce(RDKafkaErrorCode::SaslAuthenticationFailed));
        assert_eq!(e.class(), ErrorClass::Definite);
    }
}
