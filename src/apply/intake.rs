//! The intake stage of a direction: reads the source's change topic and decodes each
//! message on a task of its own, so that the next batch is read and decoded while the
//! worker writes one to the target.
//!
//! consumer (librdkafka's fetch queue) → [`resume`](super::resume) check of the first
//! message → JSON decode → bounded channel → the worker. Order is the topic's: one task
//! reads, one channel carries. Nothing here is durable or acknowledged: the worker
//! stores positions in the target, and a message taken from the channel but not yet
//! committed there is read again after a restart.

use crate::apply::error::ApplyError;
use crate::apply::resume::{Resume, Step};
use crate::config::{Config, Direction};
use crate::event::{ChangeEvent, TypesCache};
use crate::runtime::Stop;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::{Message, Offset, TopicPartitionList};
use std::sync::Arc;
use tokio::sync::mpsc;

/// librdkafka consumer settings duplex changes from librdkafka's defaults.
const CONSUMER_DEFAULTS: &[(&str, &str)] = &[
    ("fetch.wait.max.ms", "10"),
    // Once the prefetch queue is full, librdkafka waits this long before fetching
    // again (1 s by default): a consumer that drains the queue in 0.1 s then idles for
    // 0.9 s, which capped a catch-up at 13,000 messages/s.
    ("fetch.queue.backoff.ms", "10"),
    ("queued.min.messages", "10000"),
    ("queued.max.messages.kbytes", "8192"),
];

/// The direction's consumer of `topic`, assigned partition 0 from `offset`: manual
/// assignment, no offsets committed to Kafka (positions live in the target), and an
/// offset the broker no longer has is an error, never a jump to either end.
pub(super) fn open_consumer(
    cfg: &Config,
    dir: &Direction,
    topic: &str,
    offset: Offset,
) -> Result<Arc<StreamConsumer>, ApplyError> {
    let kafka_err = |source| ApplyError::Kafka {
        direction: dir.to_string(),
        source,
    };
    let mut cc = crate::kafka::client_config(&cfg.kafka);
    cc.set("group.id", crate::kafka::apply_group(dir))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    // Latency and memory: don't let a fetch idle for librdkafka's default 500 ms, and
    // bound the prefetch queue (100k messages or 64 MB by default). The user's
    // properties still win.
    for (key, value) in CONSUMER_DEFAULTS {
        if !cfg.kafka.properties.contains_key(*key) {
            cc.set(*key, *value);
        }
    }
    // A stored offset the broker no longer has (retention passed it, the topic was
    // recreated) must stop this direction, never jump silently to either end.
    cc.set("auto.offset.reset", "error");
    let consumer: Arc<StreamConsumer> = Arc::new(cc.create().map_err(kafka_err)?);
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, offset)
        .map_err(kafka_err)?;
    consumer.assign(&tpl).map_err(kafka_err)?;
    Ok(consumer)
}

/// One message of the topic, decoded.
pub(super) struct Taken {
    pub offset: i64,
    pub key: Vec<u8>,
    pub raw: Vec<u8>,
    /// The event, or why the message is not one.
    pub event: Result<ChangeEvent, String>,
}

/// The reading side of the intake stage: messages in topic order, or the error that
/// ended the stage (after which nothing more arrives).
pub(super) type Intake = mpsc::Receiver<Result<Taken, ApplyError>>;

/// What the intake task needs to read `topic` for `dir`.
pub(super) struct IntakeSource {
    pub consumer: Arc<StreamConsumer>,
    pub dir: Direction,
    pub topic: String,
    /// The offset stored in the target, where reading starts (`None`: the beginning).
    pub stored: Option<i64>,
    /// The check of the first message against `stored`.
    pub resume: Option<Resume>,
}

/// Starts the intake task; it holds at most `capacity` decoded messages ahead of the
/// worker and ends when the worker drops its [`Intake`] or on `stop`.
pub(super) fn start(
    source: IntakeSource,
    capacity: usize,
    stop: Stop,
) -> (Intake, tokio::task::JoinHandle<()>) {
    use tracing::Instrument;
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let span = tracing::info_span!("intake", direction = %source.dir);
    (rx, tokio::spawn(run(source, tx, stop).instrument(span)))
}

async fn run(mut s: IntakeSource, tx: mpsc::Sender<Result<Taken, ApplyError>>, stop: Stop) {
    // Its own handle: a message borrows the consumer while `s` changes.
    let consumer = s.consumer.clone();
    let mut types = TypesCache::default();
    loop {
        let msg = tokio::select! {
            _ = stop.requested() => return,
            _ = tx.closed() => return,
            msg = consumer.recv() => msg,
        };
        let taken = match msg {
            Ok(m) => match admit(&mut s, m.offset()) {
                Ok(true) => Ok(decode(&m, &mut types)),
                Ok(false) => continue,
                Err(e) => Err(*e),
            },
            Err(e) => Err(position_lost(&s, e)),
        };
        let failed = taken.is_err();
        if tx.send(taken).await.is_err() || failed {
            return;
        }
    }
}

fn decode(m: &rdkafka::message::BorrowedMessage<'_>, types: &mut TypesCache) -> Taken {
    let raw = m.payload().unwrap_or_default();
    Taken {
        offset: m.offset(),
        key: m.key().unwrap_or_default().to_vec(),
        event: ChangeEvent::from_json_in(raw, types).map_err(|e| e.to_string()),
        raw: raw.to_vec(),
    }
}

/// Whether the message at `offset` goes to the worker, while resuming at a stored
/// offset: messages before it are dropped, and the partition is assigned again from
/// further back when the broker answered from past it.
fn admit(s: &mut IntakeSource, offset: i64) -> Result<bool, Box<ApplyError>> {
    let Some(r) = s.resume.as_mut() else {
        return Ok(true);
    };
    match r.on(offset) {
        Step::Apply => {
            if r.read_back() > 0 {
                tracing::info!(direction = %s.dir, offset, read_back = r.read_back(),
                    "resumed at the stored offset, read back from an earlier record batch");
            }
            s.resume = None;
            Ok(true)
        }
        Step::Skip => Ok(false),
        Step::ReadFrom(from) => {
            read_from(&s.consumer, &s.topic, from).map_err(|source| {
                Box::new(ApplyError::Kafka {
                    direction: s.dir.to_string(),
                    source,
                })
            })?;
            Ok(false)
        }
        Step::Lost { first } => Err(Box::new(lost(
            &s.dir,
            &s.topic,
            r.stored(),
            format!(
                "the first message read is at offset {first}, so messages were removed from the log"
            ),
        ))),
    }
}

/// Assigns the partition again, reading from `from`.
fn read_from(consumer: &StreamConsumer, topic: &str, from: i64) -> KafkaResult<()> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(from))?;
    consumer.assign(&tpl)
}

pub(super) fn lost(dir: &Direction, topic: &str, offset: i64, detail: String) -> ApplyError {
    ApplyError::PositionLost(Box::new(crate::apply::error::LostPosition {
        direction: dir.to_string(),
        from: dir.from.clone(),
        to: dir.to.clone(),
        topic: topic.to_string(),
        offset,
        detail,
    }))
}

/// A consumer error: the stored offset out of the log's range is definite (it will
/// not come back), anything else transient.
fn position_lost(s: &IntakeSource, e: KafkaError) -> ApplyError {
    use rdkafka::types::RDKafkaErrorCode as Code;
    match e.rdkafka_error_code() {
        Some(Code::AutoOffsetReset | Code::OffsetOutOfRange) => lost(
            &s.dir,
            &s.topic,
            s.stored.unwrap_or(0),
            format!("the broker says {e}"),
        ),
        _ => ApplyError::Kafka {
            direction: s.dir.to_string(),
            source: e,
        },
    }
}
