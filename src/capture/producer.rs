//! Produces change events onto a node's Kafka topic and tracks their durability.
//!
//! [`ChangeProducer::send`] hands an event to librdkafka and returns at once
//! (pipelined); the returned delivery future, and commit markers, go in stream order
//! into a bounded channel read by [`track_deliveries`], which awaits them in that
//! order and publishes the end LSN of the newest commit whose every message the
//! broker has acknowledged. That LSN is the only one the reader may confirm to the
//! slot. The bounded channel is the backpressure: when `max_in_flight_messages` are
//! unacknowledged, the reader stops reading WAL.

use crate::config::KafkaConfig;
use crate::event::{ChangeEvent, Lsn};
use crate::ErrorClass;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

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
}

impl SinkError {
    pub fn class(&self) -> ErrorClass {
        let definite_code = |c: &RDKafkaErrorCode| {
            matches!(
                c,
                RDKafkaErrorCode::SaslAuthenticationFailed
                    | RDKafkaErrorCode::TopicAuthorizationFailed
                    | RDKafkaErrorCode::ClusterAuthorizationFailed
                    | RDKafkaErrorCode::InvalidConfig
                    | RDKafkaErrorCode::InvalidReplicationFactor
                    | RDKafkaErrorCode::InvalidPartitions
                    | RDKafkaErrorCode::InvalidTopic
                    | RDKafkaErrorCode::Authentication
                    | RDKafkaErrorCode::MessageSizeTooLarge
            )
        };
        match self {
            SinkError::Kafka(KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_)) => {
                ErrorClass::Definite
            }
            SinkError::Kafka(e) | SinkError::Delivery { error: e, .. } => {
                match e.rdkafka_error_code() {
                    Some(c) if definite_code(&c) => ErrorClass::Definite,
                    _ => ErrorClass::Transient,
                }
            }
            SinkError::CreateTopic { code, .. } if definite_code(code) => ErrorClass::Definite,
            // The same event would be too large on every retry.
            SinkError::TooLarge { .. } => ErrorClass::Definite,
            _ => ErrorClass::Transient,
        }
    }
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

/// Creates `topic` unless it exists.
pub async fn ensure_topic(cfg: &KafkaConfig, topic: &str) -> Result<(), SinkError> {
    let admin: AdminClient<DefaultClientContext> = client_config(cfg).create()?;
    let new = NewTopic::new(
        topic,
        // One partition: the node's commit order holds across all its tables.
        1,
        TopicReplication::Fixed(cfg.replication_factor),
    );
    let opts = AdminOptions::new().request_timeout(Some(TOPIC_REQUEST_TIMEOUT));
    for result in admin.create_topics([&new], &opts).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(SinkError::CreateTopic { topic, code }),
        }
    }
    Ok(())
}

/// Stage boundary between the reader and Kafka.
///
/// Contract: `send` enqueues in call order; messages to one partition are written in
/// that order without gaps or reordering (idempotent producer, acks=all). Nothing is
/// durable when `send` returns; it is once the returned future resolves `Ok`.
/// Delivery is at-least-once: after a restart the slot replays from the last confirmed
/// commit, so the topic may hold a commit twice, never miss one.
pub struct ChangeProducer {
    producer: FutureProducer,
    topic: String,
}

impl ChangeProducer {
    pub fn new(cfg: &KafkaConfig, topic: &str) -> Result<ChangeProducer, SinkError> {
        let mut cc = client_config(cfg);
        cc.set("enable.idempotence", "true").set("acks", "all").set(
            "queue.buffering.max.messages",
            (cfg.max_in_flight_messages * 2).to_string(),
        );
        if !cfg.properties.contains_key("linger.ms") {
            cc.set("linger.ms", "5");
        }
        Ok(ChangeProducer {
            producer: cc.create()?,
            topic: topic.to_string(),
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Enqueues one event. Waits only while librdkafka's own queue is full.
    pub async fn send(&self, ev: &ChangeEvent) -> Result<DeliveryFuture, SinkError> {
        let key = ev.kafka_key();
        let payload = ev.to_json();
        loop {
            let record = FutureRecord::to(&self.topic).key(&key).payload(&payload);
            match self.producer.send_result(record) {
                Ok(f) => return Ok(f),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // The queue drains as the broker acknowledges; poll again shortly.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _))
                    if e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge) =>
                {
                    return Err(SinkError::TooLarge {
                        table: format!("{}.{}", ev.source.schema, ev.source.table),
                        key: String::from_utf8_lossy(&key).into_owned(),
                        lsn: ev.source.lsn,
                        bytes: key.len() + payload.len(),
                        error: e.to_string(),
                    })
                }
                Err((e, _)) => return Err(SinkError::Kafka(e)),
            }
        }
    }

    /// Waits up to `timeout` for everything enqueued to be acknowledged.
    pub fn flush(&self, timeout: Duration) -> Result<(), SinkError> {
        self.producer.flush(timeout).map_err(SinkError::Kafka)
    }
}

/// An entry of the delivery queue, in stream order.
pub enum Pending {
    Message {
        commit_lsn: Lsn,
        delivery: DeliveryFuture,
        /// Counted once the broker acknowledges the message.
        produced: metrics::Counter,
    },
    Commit {
        end_lsn: Lsn,
    },
}

/// Awaits deliveries in order and publishes the newest durable commit end LSN on
/// `durable`. Returns when the queue closes (all durable) or on the first failed
/// delivery, whose commit and everything after it stay unconfirmed.
pub async fn track_deliveries(
    mut queue: mpsc::Receiver<Pending>,
    durable: watch::Sender<Lsn>,
) -> Result<(), SinkError> {
    while let Some(p) = queue.recv().await {
        match p {
            Pending::Message {
                commit_lsn,
                delivery,
                produced,
            } => match delivery.await {
                Ok(Ok(_)) => produced.increment(1),
                Ok(Err((error, _))) => return Err(SinkError::Delivery { commit_lsn, error }),
                Err(_) => return Err(SinkError::TrackerGone),
            },
            Pending::Commit { end_lsn } => {
                durable.send_replace(end_lsn);
            }
        }
    }
    Ok(())
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
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
        }
    }
    consumer.assign(&tpl)?;
    let mut read = 0;
    let mut last = std::time::Instant::now();
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
