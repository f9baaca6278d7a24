//! The dead-letter queue: events a direction could not apply, kept so that nothing is
//! lost and they can be retried once the target is fixed.
//!
//! With `sync.on_error = "dead_letter"` the apply worker hands a bad event to
//! [`record`], which writes it with its error to the target's `duplex.dead_letters`
//! (in the same transaction as the batch, so the position only moves past it once it
//! is recorded) and to the topic `<prefix>.<source>.dlq`. `duplex dlq list` shows the
//! table; `duplex dlq replay` applies each unreplayed event again the way the stream
//! does (through a mapped table's mapping, under last-writer-wins and tombstones) and
//! marks those that now succeed.

use crate::apply::batch::prepare_batch;
use crate::apply::error::ApplyError;
use crate::config::{Config, Direction};
use crate::event::ChangeEvent;
use crate::kafka::{self, client_config, BrokerError};
use crate::lww::{TargetWriter, WriteError};
use crate::metrics::ApplyMetrics;
use crate::pg::error::SqlContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::time::Duration;

/// A bad event and why it is bad.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub offset: i64,
    pub kafka_key: Vec<u8>,
    pub raw: Vec<u8>,
    pub table: Option<String>,
    pub key: Option<String>,
    pub position: Option<String>,
    pub error: String,
}

impl DeadLetter {
    /// A message that is not a change envelope at all.
    pub fn unparseable(offset: i64, kafka_key: &[u8], raw: &[u8], error: String) -> DeadLetter {
        DeadLetter {
            offset,
            kafka_key: kafka_key.to_vec(),
            raw: raw.to_vec(),
            table: None,
            key: Some(String::from_utf8_lossy(kafka_key).into_owned()),
            position: None,
            error,
        }
    }

    pub fn of(
        offset: i64,
        kafka_key: &[u8],
        raw: &[u8],
        ev: &ChangeEvent,
        error: String,
    ) -> DeadLetter {
        DeadLetter {
            offset,
            kafka_key: kafka_key.to_vec(),
            raw: raw.to_vec(),
            table: Some(ev.source.table_name().to_string()),
            key: Some(String::from_utf8_lossy(&ev.kafka_key()).into_owned()),
            position: Some(ev.position().to_string()),
            error,
        }
    }
}

/// A direction's dead-letter topic, with one producer for the apply session, made when
/// the first letter comes.
#[derive(Default)]
pub struct DeadLetterQueue {
    producer: Option<(String, FutureProducer)>,
}

impl DeadLetterQueue {
    /// Records `letter` in the target's table (inside the caller's transaction) and on
    /// the dead-letter topic, waiting for the broker's acknowledgement.
    pub async fn record(
        &mut self,
        cfg: &Config,
        dir: &Direction,
        writer: &TargetWriter<'_>,
        letter: &DeadLetter,
    ) -> Result<(), ApplyError> {
        record(&mut self.producer, cfg, dir, writer, letter).await
    }
}

async fn record(
    producer: &mut Option<(String, FutureProducer)>,
    cfg: &Config,
    dir: &Direction,
    writer: &TargetWriter<'_>,
    letter: &DeadLetter,
) -> Result<(), ApplyError> {
    let event = String::from_utf8_lossy(&letter.raw).into_owned();
    writer
        .client
        .execute(
            "INSERT INTO duplex.dead_letters (source_node, kafka_offset, table_name, key, position, error, event)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[&dir.from, &letter.offset, &letter.table, &letter.key, &letter.position, &letter.error, &event],
        )
        .await
        .sql(&dir.to, "recording a dead letter")?;
    let sink = |source| ApplyError::Broker {
        direction: dir.to_string(),
        source,
    };
    // The session idles in its transaction meanwhile: no stall of the target.
    let _away = writer.away.enter();
    if producer.is_none() {
        let topic = kafka::dead_letter_topic(cfg, dir);
        kafka::ensure_topic(&cfg.kafka, &topic)
            .await
            .map_err(sink)?;
        let p: FutureProducer = client_config(&cfg.kafka)
            .create()
            .map_err(|e| sink(BrokerError::Kafka(e)))?;
        *producer = Some((topic, p));
    }
    let Some((topic, producer)) = producer.as_ref() else {
        return Ok(());
    };
    let headers = OwnedHeaders::new().insert(Header {
        key: "duplex_error",
        value: Some(letter.error.as_bytes()),
    });
    let record = FutureRecord::to(topic)
        .key(&letter.kafka_key)
        .payload(&letter.raw)
        .headers(headers);
    producer
        .send(record, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| sink(BrokerError::Kafka(e)))?;
    Ok(())
}

/// One row of `duplex.dead_letters`, for `duplex dlq list`.
pub struct Listed {
    pub line: String,
}

/// Dead letters of every direction, oldest first.
pub async fn list(cfg: &Config) -> Result<Vec<Listed>, ApplyError> {
    let mut out = Vec::new();
    for dir in cfg.directions().unwrap_or_default() {
        let client = crate::pg::node::connect(cfg, &dir.to, "dlq list").await?;
        let rows = client
            .query(
                "SELECT id, recorded_at::text, coalesce(table_name, '?'), coalesce(key, '?'),
                        coalesce(position, '?'), error, replayed_at IS NOT NULL
                 FROM duplex.dead_letters WHERE source_node = $1 ORDER BY id",
                &[&dir.from],
            )
            .await
            .sql(&dir.to, "reading duplex.dead_letters")?;
        for r in rows {
            let replayed: bool = r.get(6);
            out.push(Listed {
                line: format!(
                    "{dir} #{} {} {} key={} position={} {}: {}",
                    r.get::<_, i64>(0),
                    r.get::<_, String>(1),
                    r.get::<_, String>(2),
                    r.get::<_, String>(3),
                    r.get::<_, String>(4),
                    if replayed { "replayed" } else { "pending" },
                    r.get::<_, String>(5),
                ),
            });
        }
    }
    Ok(out)
}

/// Applies every unreplayed dead letter again; returns (replayed, still failing).
pub async fn replay(cfg: &Config) -> Result<(usize, usize), ApplyError> {
    let (mut ok, mut failing) = (0, 0);
    for dir in cfg.directions().unwrap_or_default() {
        let metrics =
            ApplyMetrics::new(&dir.to_string(), cfg.tables.iter().map(|t| t.name.as_str()));
        let mut writer = TargetWriter::connect(cfg, &dir, metrics).await?;
        let rows = writer
            .client
            .query(
                "SELECT id, event FROM duplex.dead_letters WHERE source_node = $1 AND replayed_at IS NULL ORDER BY id",
                &[&dir.from],
            )
            .await
            .sql(&dir.to, "reading duplex.dead_letters")?;
        for r in rows {
            let id: i64 = r.get(0);
            let raw: String = r.get(1);
            let error = match ChangeEvent::from_json(raw.as_bytes()) {
                Err(e) => Some(e.to_string()),
                Ok(ev) => replay_one(&mut writer, &ev).await?,
            };
            let updated = match &error {
                None => {
                    ok += 1;
                    let sql = "UPDATE duplex.dead_letters SET replayed_at = now() WHERE id = $1";
                    writer.client.execute(sql, &[&id]).await
                }
                Some(e) => {
                    failing += 1;
                    let sql = "UPDATE duplex.dead_letters SET error = $2 WHERE id = $1";
                    writer.client.execute(sql, &[&id, e]).await
                }
            };
            updated.sql(&dir.to, "updating duplex.dead_letters")?;
        }
    }
    Ok((ok, failing))
}

/// Applies one event in its own transaction, the way the stream writes it: readied
/// as a batch of one, mapped into the target's schema (a mapped table's keys,
/// references, columns and values; see `mapping/`), then written under
/// last-writer-wins. Returns the error if it still fails.
async fn replay_one(
    writer: &mut TargetWriter<'_>,
    ev: &ChangeEvent,
) -> Result<Option<String>, ApplyError> {
    writer.execute("BEGIN", "beginning a transaction").await?;
    let error = match write_one(writer, ev).await {
        Ok(error) => error,
        Err(WriteError::Sql(e)) if crate::Classify::class(&e) == crate::ErrorClass::Definite => {
            Some(crate::pg::node::describe(&e.source))
        }
        Err(e) => return Err(e.into()),
    };
    let end = if error.is_none() {
        "COMMIT"
    } else {
        "ROLLBACK"
    };
    writer.execute(end, "ending a transaction").await?;
    Ok(error)
}

/// The event's reason to be refused before writing, if any.
async fn write_one(
    writer: &mut TargetWriter<'_>,
    ev: &ChangeEvent,
) -> Result<Option<String>, WriteError> {
    let (events, deleted) = prepare_batch(std::iter::once(ev));
    let mapped = writer.map(events, deleted).await?;
    if let Some((_, reason)) = mapped.bad.into_iter().next() {
        return Ok(Some(reason));
    }
    let applied = writer.apply(&mapped.events, &mapped.deleted).await?;
    Ok(applied.bad.into_iter().next().map(|b| b.reason))
}
