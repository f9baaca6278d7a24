//! What both pipelines need from Kafka: client settings from the config, reaching
//! the brokers (a refused password or an untrusted broker certificate is definite),
//! topic creation (with the settings of [`topic`]), the one error type of Kafka clients
//! with its classification, and a plain topic reader for tools. [`access`] asks what
//! the brokers let duplex do.

pub mod topic;

pub mod access;

use crate::config::{Config, Direction, KafkaConfig};
use crate::event::Lsn;
use crate::{Classify, ErrorClass};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::ClientConfig;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long creating a topic may take before it counts as a (transient) failure.
const TOPIC_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What an operator does after a broker lost messages it had acknowledged.
const RESYNC: &str = "Consumers' stored positions no longer match the topic, so the direction reading it is stopped too. To resynchronise: stop duplex; on the peer, delete the direction's row from duplex.apply_positions; on this node, UPDATE duplex.slots SET last_offset = NULL, topic_lost = NULL; start duplex and run `duplex snapshot` to copy what the lost messages carried";

/// Errors of duplex's Kafka clients (producing, consuming, administering topics).
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
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
    #[error("a broker call on a blocking thread did not finish: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("the stage reading the topic ended")]
    IntakeEnded,
    #[error("the brokers answered no settings for topic {topic}")]
    NoTopicDescription { topic: String },
    #[error("reading the settings of topic {topic}: {code}")]
    DescribeTopic {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error("topic {topic} went back: the broker acknowledged offset {now} after offset {before}, so it lost messages it had acknowledged (a broker without durable storage restarted, or the topic was deleted and created again). {RESYNC}")]
    OffsetsWentBack {
        topic: String,
        before: i64,
        now: i64,
    },
    #[error("Kafka authentication failed: the brokers refused duplex's credentials ({0}); check sasl.username, the password (DUPLEX_KAFKA_PROPERTIES_SASL_PASSWORD) and sasl.mechanisms in [kafka.properties]")]
    Credentials(String),
    #[error("Kafka certificate verify failed: duplex does not trust the broker's certificate ({0}); set ssl.ca.location to the CA that signed the brokers' certificates, and check that each certificate names the host duplex connects to")]
    Certificate(String),
    #[error("topic {topic} does not exist any more, although the broker had acknowledged messages up to offset {last} on it: the broker lost them (a broker without durable storage restarted, or the topic was deleted). {RESYNC}")]
    TopicGone { topic: String, last: i64 },
}

impl Classify for BrokerError {
    fn class(&self) -> ErrorClass {
        match self {
            BrokerError::Kafka(e) | BrokerError::Delivery { error: e, .. } => class_of(e),
            BrokerError::CreateTopic { code, .. } if is_definite(code) => ErrorClass::Definite,
            // The same event would be too large on every retry.
            BrokerError::TooLarge { .. } => ErrorClass::Definite,
            BrokerError::OffsetsWentBack { .. } | BrokerError::TopicGone { .. } => {
                ErrorClass::Definite
            }
            // Nothing changes them but the operator.
            BrokerError::Credentials(_) | BrokerError::Certificate(_) => ErrorClass::Definite,
            _ => ErrorClass::Transient,
        }
    }
}

impl BrokerError {
    /// Whether the broker lost messages it had acknowledged.
    pub fn is_topic_lost(&self) -> bool {
        matches!(
            self,
            BrokerError::OffsetsWentBack { .. } | BrokerError::TopicGone { .. }
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

/// The refusal an error librdkafka reports while connecting stands for, if it is one:
/// the brokers rejected duplex's credentials, or duplex rejected a broker's
/// certificate (untrusted, expired, or naming another host). librdkafka reports these
/// as connection errors and retries them forever, like a broker that is down; other
/// TLS and authentication errors (a connection cut during the handshake) stay
/// transient.
fn refusal_of(code: RDKafkaErrorCode, reason: &str) -> Option<BrokerError> {
    let lower = reason.to_ascii_lowercase();
    match code {
        RDKafkaErrorCode::Authentication
            if lower.contains("authentication failed")
                || lower.contains("invalid credentials")
                || lower.contains("unsupported sasl mechanism") =>
        {
            Some(BrokerError::Credentials(reason.to_string()))
        }
        RDKafkaErrorCode::SSL
            if lower.contains("certificate verify failed")
                || lower.contains("failed to verify broker certificate") =>
        {
            Some(BrokerError::Certificate(reason.to_string()))
        }
        _ => None,
    }
}

/// A client context that keeps the first refusal librdkafka reports (see
/// [`refusal_of`]) and logs every error.
#[derive(Default)]
struct RefusalWatch {
    first: Mutex<Option<(RDKafkaErrorCode, String)>>,
}

impl ClientContext for RefusalWatch {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "librdkafka");
        if let Some(code) = error.rdkafka_error_code() {
            if refusal_of(code, reason).is_some() {
                if let Ok(mut first) = self.first.lock() {
                    first.get_or_insert((code, reason.to_string()));
                }
            }
        }
    }
}

impl ConsumerContext for RefusalWatch {}

impl RefusalWatch {
    fn refusal(&self) -> Option<BrokerError> {
        let first = self.first.lock().ok()?;
        first
            .as_ref()
            .and_then(|(code, reason)| refusal_of(*code, reason))
    }
}

/// How long reaching the brokers may take before it counts as a (transient) failure.
const REACH_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to the brokers and asks for the cluster's metadata: `Ok` once they answer,
/// a definite error as soon as they refuse duplex's credentials or duplex refuses
/// their certificate, a transient one if they do not answer in time.
pub async fn reach(cfg: &KafkaConfig) -> Result<(), BrokerError> {
    let cc = client_config(cfg);
    tokio::task::spawn_blocking(move || {
        // A consumer without a group: its metadata requests create no topic, and it
        // needs no ACL of a group.
        let consumer: BaseConsumer<RefusalWatch> =
            cc.create_with_context(RefusalWatch::default())?;
        let deadline = Instant::now() + REACH_TIMEOUT;
        loop {
            let Err(e) = consumer
                .client()
                .fetch_metadata(None, Duration::from_millis(500))
            else {
                return Ok(());
            };
            // librdkafka hands its errors to the context only from poll, queued
            // behind its log lines; a poll returns at the first error.
            let _ = consumer.poll(Duration::from_millis(100));
            if let Some(refusal) = consumer.context().refusal() {
                return Err(refusal);
            }
            if Instant::now() >= deadline {
                return Err(BrokerError::Kafka(e));
            }
        }
    })
    .await
    .map_err(BrokerError::Join)?
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

/// The consumer group of `dir`'s apply consumer. It commits no offsets (positions
/// live in the target's duplex.apply_positions), but librdkafka assigns partitions only
/// to a consumer with a group, and looks up the group's coordinator: the principal
/// needs DESCRIBE on it.
pub fn apply_group(dir: &Direction) -> String {
    format!("duplex-{dir}")
}

/// The topic `dir` sets aside the events it cannot apply on, with
/// `sync.on_error = "dead_letter"`.
pub fn dead_letter_topic(cfg: &Config, dir: &Direction) -> String {
    format!("{}.{}.dlq", cfg.kafka.topic_prefix, dir.from)
}

/// Creates `topic` unless it exists, with the settings [`topic::creation_configs`]
/// gives. A cluster whose policy refuses them (a managed service may fix some configs)
/// gets the topic with its own defaults and a warning: `duplex check` reports what
/// they lack. The principal needs the CREATE operation on it only while it does not
/// exist: a topic created beforehand is used as it is. Reaches the brokers first, so
/// that a refused password or certificate stops the caller.
pub async fn ensure_topic(cfg: &KafkaConfig, topic: &str) -> Result<(), BrokerError> {
    reach(cfg).await?;
    let admin: AdminClient<DefaultClientContext> = client_config(cfg).create()?;
    let configs = topic::creation_configs(cfg.replication_factor);
    match create_topic(&admin, cfg, topic, &configs).await {
        Err(BrokerError::CreateTopic {
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
) -> Result<(), BrokerError> {
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
            // The broker refuses a creation it does not allow even when the topic
            // exists.
            Err((topic, RDKafkaErrorCode::TopicAuthorizationFailed))
                if exists(cfg, &topic).await? => {}
            Err((topic, code)) => return Err(BrokerError::CreateTopic { topic, code }),
        }
    }
    Ok(())
}

/// Whether the brokers know `topic`. Asked by a consumer, whose metadata requests
/// never create topics.
async fn exists(cfg: &KafkaConfig, topic: &str) -> Result<bool, BrokerError> {
    let (cc, topic) = (client_config(cfg), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = cc.create()?;
        let metadata = consumer
            .client()
            .fetch_metadata(Some(&topic), TOPIC_REQUEST_TIMEOUT)?;
        Ok(metadata
            .topics()
            .iter()
            .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty()))
    })
    .await
    .map_err(BrokerError::Join)?
}

/// How long asking the broker for a partition's offsets may take.
const WATERMARKS_TIMEOUT: Duration = Duration::from_secs(10);

/// `topic` partition 0's first retained offset and the offset its next message will
/// get (the log start and end).
pub async fn watermarks(cfg: &KafkaConfig, topic: &str) -> Result<(i64, i64), BrokerError> {
    // No group.id: asking for offsets needs no consumer group, and one would need an
    // ACL of its own (librdkafka looks up a group's coordinator).
    let consumer: BaseConsumer = client_config(cfg).create()?;
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || consumer.fetch_watermarks(&topic, 0, WATERMARKS_TIMEOUT))
        .await
        .map_err(BrokerError::Join)?
        .map_err(BrokerError::Kafka)
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
) -> Result<usize, BrokerError> {
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
            Some(Err(e)) => return Err(BrokerError::Kafka(e)),
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
        let e = BrokerError::Kafka(produce(RDKafkaErrorCode::SaslAuthenticationFailed));
        assert_eq!(e.class(), ErrorClass::Definite);
    }

    /// What librdkafka 2.12 reports, as seen against Kafka 4.4.
    const BAD_PASSWORD: &str = "sasl_ssl://127.0.0.1:9093/bootstrap: SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512 (after 12ms in state AUTH_REQ)";
    const UNTRUSTED: &str = "ssl://127.0.0.1:9093/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed: broker certificate could not be verified, verify that ssl.ca.location is correctly configured or root CA certificates are installed (install ca-certificates package) (after 3ms in state SSL_HANDSHAKE)";

    #[test]
    fn refused_credentials_and_untrusted_certificates_are_definite_outages_are_not() {
        let refused = refusal_of(RDKafkaErrorCode::Authentication, BAD_PASSWORD).unwrap();
        assert!(matches!(refused, BrokerError::Credentials(_)));
        assert_eq!(refused.class(), ErrorClass::Definite);
        assert!(refused.to_string().contains("Kafka authentication failed"));
        let untrusted = refusal_of(RDKafkaErrorCode::SSL, UNTRUSTED).unwrap();
        assert!(matches!(untrusted, BrokerError::Certificate(_)));
        assert_eq!(untrusted.class(), ErrorClass::Definite);
        assert!(untrusted.to_string().contains("certificate verify failed"));
        for (code, reason) in [
            // A broker down, restarting, or cut off mid-handshake.
            (RDKafkaErrorCode::BrokerTransportFailure, "Connect to ipv4#127.0.0.1:9093 failed: Connection refused (after 0ms in state CONNECT)"),
            (RDKafkaErrorCode::SSL, "ssl://127.0.0.1:9093/1: SSL handshake failed: Disconnected: connecting to a PLAINTEXT broker listener? (after 2ms in state SSL_HANDSHAKE)"),
            (RDKafkaErrorCode::Authentication, "sasl_ssl://127.0.0.1:9093/1: SASL SCRAM-SHA-512 mechanism handshake failed: Local: Broker transport failure: broker's supported mechanisms: "),
            (RDKafkaErrorCode::AllBrokersDown, "1/1 brokers are down"),
            // Certificate words under another code.
            (RDKafkaErrorCode::BrokerTransportFailure, UNTRUSTED),
        ] {
            assert!(refusal_of(code, reason).is_none(), "{code:?}: {reason}");
        }
    }
}
