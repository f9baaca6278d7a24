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
use crate::kafka::{client_config, SinkError};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

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
