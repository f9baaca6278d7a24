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
use crate::kafka::{client_config, BrokerError};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::ClientContext;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Stage boundary between the reader and Kafka.
///
/// Contract: `send` enqueues in call order; messages to one partition are written in
/// that order without gaps or reordering (idempotent producer, acks=all). Nothing is
/// durable when `send` returns; it is once the returned future resolves `Ok`.
/// Delivery is at-least-once: after a restart the slot replays from the last confirmed
/// commit, so the topic may hold a commit twice, never miss one.
/// librdkafka's `message.timeout.ms` unless the user sets it.
const MESSAGE_TIMEOUT_MS: &str = "30000";

/// librdkafka's `statistics.interval.ms` unless the user sets it: how soon the
/// producer learns that it has its id (see [`IdWatch`]).
const STATISTICS_INTERVAL_MS: &str = "50";

#[derive(Clone)]
pub struct ChangeProducer {
    producer: FutureProducer<IdWatch>,
    topic: String,
    id_assigned: watch::Receiver<bool>,
}

/// The producer's librdkafka context. An idempotent producer holds every message
/// until the broker has given it a producer id, which librdkafka asks for on a 500 ms
/// timer that may take two turns after the producer is made. librdkafka tells of the
/// id only in its statistics (`eos.idemp_state`), so this context reads them until
/// the id is assigned, then ignores them.
struct IdWatch {
    assigned: watch::Sender<bool>,
}

impl ClientContext for IdWatch {
    fn stats_raw(&self, statistics: &[u8]) {
        if !*self.assigned.borrow() && id_assigned(statistics) {
            self.assigned.send_replace(true);
        }
    }
}

/// Whether librdkafka's statistics say the idempotent producer has its id.
fn id_assigned(statistics: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Stats {
        eos: Option<Eos>,
    }
    #[derive(serde::Deserialize)]
    struct Eos {
        idemp_state: String,
    }
    serde_json::from_slice::<Stats>(statistics)
        .ok()
        .and_then(|s| s.eos)
        .is_some_and(|eos| eos.idemp_state == "Assigned")
}

impl ChangeProducer {
    pub fn new(cfg: &KafkaConfig, topic: &str) -> Result<ChangeProducer, BrokerError> {
        let mut cc = client_config(cfg);
        cc.set("enable.idempotence", "true").set("acks", "all").set(
            "queue.buffering.max.messages",
            (cfg.max_in_flight_messages * 2).to_string(),
        );
        if !cfg.properties.contains_key("linger.ms") {
            cc.set("linger.ms", "5");
        }
        // A message the broker has not acknowledged in this time fails its delivery,
        // and the session starts again with a new producer (the slot replays what was
        // not confirmed). librdkafka's 5 minutes would leave a producer the broker no
        // longer knows (it came back without its state) retrying that long.
        if !["message.timeout.ms", "delivery.timeout.ms"]
            .iter()
            .any(|k| cfg.properties.contains_key(*k))
        {
            cc.set("message.timeout.ms", MESSAGE_TIMEOUT_MS);
        }
        if !cfg.properties.contains_key("statistics.interval.ms") {
            cc.set("statistics.interval.ms", STATISTICS_INTERVAL_MS);
        }
        let (assigned, id_assigned) = watch::channel(false);
        Ok(ChangeProducer {
            producer: cc.create_with_context(IdWatch { assigned })?,
            topic: topic.to_string(),
            id_assigned,
        })
    }

    /// Waits, at most `max`, until the producer has its id: messages sent before wait
    /// for it in librdkafka's queue. True when it has. A producer that cannot reach the
    /// broker never gets one; its deliveries fail with their own errors.
    pub async fn wait_for_id(&self, max: Duration) -> bool {
        let mut rx = self.id_assigned.clone();
        let assigned = tokio::time::timeout(max, rx.wait_for(|a| *a)).await;
        matches!(assigned, Ok(Ok(_)))
    }

    /// Whether the broker knows the topic: `Ok(false)` when its metadata says the topic
    /// does not exist. Errors reaching the broker are returned as they are.
    pub async fn topic_exists(&self) -> Result<bool, BrokerError> {
        use rdkafka::producer::Producer;
        let (producer, topic) = (self.producer.clone(), self.topic.clone());
        tokio::task::spawn_blocking(move || {
            let metadata = producer
                .client()
                .fetch_metadata(Some(&topic), Duration::from_secs(5))?;
            Ok(metadata
                .topics()
                .iter()
                .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty()))
        })
        .await
        .map_err(BrokerError::Join)?
    }

    /// Enqueues one event. Waits only while librdkafka's own queue is full.
    pub async fn send(&self, ev: &ChangeEvent) -> Result<DeliveryFuture, BrokerError> {
        let key = ev.kafka_key();
        let payload = ev.to_json();
        loop {
            // Partition 0 always: the node's commit order holds within one partition
            // only, the appliers read that one, and its offsets are checked to grow.
            let record = FutureRecord::to(&self.topic)
                .partition(0)
                .key(&key)
                .payload(&payload);
            match self.producer.send_result(record) {
                Ok(f) => return Ok(f),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // The queue drains as the broker acknowledges; poll again shortly.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _))
                    if e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge) =>
                {
                    return Err(BrokerError::TooLarge {
                        table: ev.source.table_name().to_string(),
                        key: String::from_utf8_lossy(&key).into_owned(),
                        lsn: ev.source.lsn,
                        bytes: key.len() + payload.len(),
                        error: e.to_string(),
                    })
                }
                Err((e, _)) => return Err(BrokerError::Kafka(e)),
            }
        }
    }
}

/// How often [`watch_topic`] asks the broker for the topic.
const TOPIC_CHECK_EVERY: Duration = Duration::from_secs(5);

/// Resolves when the broker no longer knows the topic although it acknowledged
/// messages on it (twice in a row, so that one odd metadata answer is not enough).
/// A broker that cannot be reached proves nothing: the deliveries' own errors say so.
pub async fn watch_topic(producer: ChangeProducer, acked: watch::Receiver<Acked>) -> BrokerError {
    let mut missing = 0;
    loop {
        tokio::time::sleep(TOPIC_CHECK_EVERY).await;
        let Some(last) = acked.borrow().last else {
            continue;
        };
        match producer.topic_exists().await {
            Ok(false) => missing += 1,
            Ok(true) | Err(_) => missing = 0,
        }
        if missing >= 2 {
            return BrokerError::TopicGone {
                topic: producer.topic.clone(),
                last,
            };
        }
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

/// The offsets the broker acknowledged on the node's topic, as far as they are known.
#[derive(Debug, Clone)]
pub struct Acked {
    pub topic: String,
    /// The highest offset acknowledged so far, in this session or (persisted in
    /// `duplex.slots.last_offset`) an earlier one.
    pub last: Option<i64>,
}

/// Awaits deliveries in order and publishes the newest durable commit end LSN on
/// `durable`, and the highest acknowledged offset on `acked` at each commit. Returns
/// when the queue closes (all durable) or on the first failed delivery, whose commit
/// and everything after it stay unconfirmed.
///
/// The topic is append-only: every acknowledged offset must be above the last one.
/// One that is not means the broker lost messages it had acknowledged (a broker
/// without durable storage restarted, the topic was deleted and created again):
/// [`BrokerError::OffsetsWentBack`], before the commit is confirmed. A retried batch the
/// broker acknowledged as a duplicate carries no offsets (see [`DuplicateBatch`]).
pub async fn track_deliveries(
    mut queue: mpsc::Receiver<Pending>,
    durable: watch::Sender<Lsn>,
    acked: watch::Sender<Acked>,
) -> Result<(), BrokerError> {
    let mut last = acked.borrow().clone();
    let mut duplicate = DuplicateBatch::default();
    while let Some(p) = queue.recv().await {
        match p {
            Pending::Message {
                commit_lsn,
                delivery,
                produced,
            } => match delivery.await {
                Ok(Ok(d)) if duplicate.holds(d.offset) => produced.increment(1),
                Ok(Ok(d)) => {
                    if let Some(before) = last.last.filter(|l| d.offset <= *l) {
                        return Err(BrokerError::OffsetsWentBack {
                            topic: last.topic,
                            before,
                            now: d.offset,
                        });
                    }
                    last.last = Some(d.offset);
                    produced.increment(1);
                }
                Ok(Err((error, _))) => return Err(BrokerError::Delivery { commit_lsn, error }),
                Err(_) => return Err(BrokerError::TrackerGone),
            },
            Pending::Commit { end_lsn } => {
                acked.send_replace(last.clone());
                durable.send_replace(end_lsn);
            }
        }
    }
    Ok(())
}

/// Recognises the messages of a retried record batch that the broker acknowledged as a
/// duplicate of one it already holds (`DUPLICATE_SEQUENCE_NUMBER`, base offset -1).
/// Their true offsets are unknown: librdkafka numbers such a batch's messages from the
/// base offset on, so they arrive as -1, 0, 1, … in order, which must not be taken for
/// offsets that went back.
#[derive(Debug, Default)]
struct DuplicateBatch {
    /// The offset the batch's next message would report.
    next: Option<i64>,
}

impl DuplicateBatch {
    /// Whether the acknowledgement with `offset` belongs to such a batch (it carries
    /// no offset to record).
    fn holds(&mut self, offset: i64) -> bool {
        if offset < 0 {
            self.next = Some(0);
            return true;
        }
        if self.next == Some(offset) {
            self.next = Some(offset + 1);
            return true;
        }
        self.next = None;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::{id_assigned, DuplicateBatch};

    #[test]
    fn the_producer_id_is_read_from_librdkafkas_statistics() {
        let stats = |state: &str| {
            format!(
                r#"{{"name":"rdkafka#producer-1","type":"producer","ts":1,"brokers":{{}},
                "eos":{{"idemp_state":"{state}","idemp_stateage":3,"txn_state":"Init",
                "producer_id":{},"producer_epoch":0,"epoch_cnt":1}}}}"#,
                if state == "Assigned" { 7 } else { -1 }
            )
        };
        assert!(id_assigned(stats("Assigned").as_bytes()));
        for state in [
            "Init",
            "RequestPID",
            "WaitTransport",
            "WaitPID",
            "DrainReset",
        ] {
            assert!(!id_assigned(stats(state).as_bytes()), "{state}");
        }
        // A consumer's statistics, or none that parse: no id.
        assert!(!id_assigned(
            br#"{"name":"c","type":"consumer","brokers":{}}"#
        ));
        assert!(!id_assigned(b"not json"));
    }

    #[test]
    fn a_duplicate_batchs_numbering_from_minus_one_is_not_an_offset() {
        let mut d = DuplicateBatch::default();
        // Offsets 10..=12, then a retried batch of four acknowledged as a duplicate,
        // then the next batch at 13.
        for o in [10, 11, 12] {
            assert!(!d.holds(o));
        }
        for o in [-1, 0, 1, 2] {
            assert!(d.holds(o), "{o}");
        }
        assert!(!d.holds(13));
        assert!(!d.holds(14));
    }

    #[test]
    fn offsets_from_zero_without_a_duplicate_before_are_offsets() {
        let mut d = DuplicateBatch::default();
        assert!(!d.holds(0));
        assert!(!d.holds(1));
        // A single-message duplicate, then offsets that are not its run.
        assert!(d.holds(-1));
        assert!(!d.holds(5));
        assert!(!d.holds(0));
    }
}
