//! Where a direction begins reading its topic when the target holds no position for
//! it: the first start of a direction that copies nothing (`snapshot.mode = "never"`,
//! or a new topic for a direction that applied from another one).
//!
//! A copy records its own start before it reads the source (see `snapshot`); without
//! one, the direction must apply the source's whole stream on this topic and nothing
//! older: it begins at the offset the source's capture recorded before it published
//! anything of its current stream there (`pg::state::streams`). That offset gone from
//! the topic (retention removed the head) means changes the direction can no longer
//! read: it halts and says how to resynchronise. A capture that has not opened its
//! stream yet is waited for. A stream that published before duplex recorded starts
//! is read from the topic's beginning, a transaction cut by the log's start skipped.

use crate::apply::error::ApplyError;
use crate::config::{Config, Direction};
use crate::kafka;
use crate::pg::node::{self, SqlContext};
use crate::pg::state::{positions, slots, streams, streams::StreamStart};
use tokio_postgres::Client;

/// The offset to read from (`None`: the log's start) for a direction with no stored
/// position, recorded on `target` as its start when there is one.
pub(super) async fn first_offset(
    cfg: &Config,
    dir: &Direction,
    target: &Client,
) -> Result<Option<i64>, ApplyError> {
    let topic = cfg.topic(&dir.from);
    let source = node::connect(cfg, &dir.from, "apply start").await?;
    let slot = cfg.slot_name(&dir.from);
    let stream = slots::load(&source, &slot)
        .await
        .sql(&dir.from, "reading duplex.slots")?
        .map(|s| s.stream);
    let start = match &stream {
        Some(s) => streams::start_of(&source, &dir.from, s, &topic).await?,
        None => StreamStart::NotYet,
    };
    let offset = match start {
        StreamStart::NotYet => {
            return Err(ApplyError::Waiting {
                node: dir.from.clone(),
                detail: format!("its capture has not opened its stream on topic {topic} yet; direction {dir} starts once it has"),
            });
        }
        StreamStart::Unknown => {
            tracing::warn!(direction = %dir, topic = %topic, "where the source's stream begins on the topic was never recorded (it published before duplex recorded it): reading the topic from its start");
            return Ok(None);
        }
        StreamStart::At(offset) => offset,
    };
    let (low, _) = kafka::watermarks(&cfg.kafka, &topic)
        .await
        .map_err(|source| ApplyError::Broker {
            direction: dir.to_string(),
            source,
        })?;
    if offset < low {
        return Err(super::intake::lost(
            dir,
            &topic,
            offset,
            format!("this direction never applied, and its source's stream began at offset {offset}, but the topic's oldest retained message is at offset {low} (retention removed the rest before the direction first started)"),
        ));
    }
    positions::store_start(target, &dir.from, &topic, offset)
        .await
        .sql(&dir.to, "writing duplex.apply_positions")?;
    tracing::info!(direction = %dir, topic = %topic, offset, "first start: reading the source's stream from its beginning");
    Ok(Some(offset))
}
