//! Where a slot stream begins on a topic (`duplex.stream_starts` on the source node).
//!
//! A capture session records, before it publishes anything, the topic's end offset as
//! the start of its slot's stream there, unless a start is recorded already: the
//! first session of a stream on a topic records the offset below its first event, and
//! later ones keep it. A direction whose first start copies nothing applies the topic
//! from there: the whole stream, and nothing of an older one (an earlier deployment's
//! events, a slot that was created again).

use crate::pg::node::{NodeError, SqlContext};
use tokio_postgres::Client;

/// What the source node records of a stream's start on a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamStart {
    /// No capture session opened the stream on the topic yet.
    NotYet,
    /// The stream published there before duplex recorded starts: unknown.
    Unknown,
    /// Its events are at this offset or later.
    At(i64),
}

/// Records `end` as where `stream` begins on `topic`, unless a start is recorded.
/// Called by a capture session before it publishes anything.
pub(crate) async fn record_start(
    client: &Client,
    node: &str,
    stream: &str,
    topic: &str,
    end: i64,
) -> Result<(), NodeError> {
    client
        .execute(
            "INSERT INTO duplex.stream_starts (stream, topic, first_offset) VALUES ($1, $2, $3)
             ON CONFLICT (stream, topic) DO NOTHING",
            &[&stream, &topic, &end],
        )
        .await
        .sql(node, "writing duplex.stream_starts")?;
    Ok(())
}

/// Where `stream` begins on `topic`, as recorded on the source node.
pub(crate) async fn start_of(
    client: &Client,
    node: &str,
    stream: &str,
    topic: &str,
) -> Result<StreamStart, NodeError> {
    let row = client
        .query_opt(
            "SELECT first_offset FROM duplex.stream_starts WHERE stream = $1 AND topic = $2",
            &[&stream, &topic],
        )
        .await
        .sql(node, "reading duplex.stream_starts")?;
    Ok(match row {
        None => StreamStart::NotYet,
        Some(r) => r
            .get::<_, Option<i64>>(0)
            .map_or(StreamStart::Unknown, StreamStart::At),
    })
}
