//! The slots duplex created on this node (`duplex.slots`): each one's stream id, the
//! highest offset the broker acknowledged on its topic, and whether the broker was
//! found to have lost acknowledged messages. Readers (capture sessions), setup, the
//! history check and appliers' start all read and write it through here.

use tokio_postgres::Client;

/// What `duplex.slots` records of a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SlotRecord {
    /// The slot's stream id: a slot created again gets a new one.
    pub stream: String,
    /// Why its topic is taken for lost, when it is (nothing reads or writes it then).
    pub topic_lost: Option<String>,
}

/// The record of `slot`, if duplex created it here.
pub(crate) async fn load(
    client: &Client,
    slot: &str,
) -> Result<Option<SlotRecord>, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT stream, topic_lost FROM duplex.slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?
        .map(|r| SlotRecord {
            stream: r.get(0),
            topic_lost: r.get(1),
        }))
}

/// Why `slot`'s topic is taken for lost, if it is.
pub(crate) async fn topic_lost(
    client: &Client,
    slot: &str,
) -> Result<Option<String>, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT topic_lost FROM duplex.slots WHERE slot_name = $1 AND topic_lost IS NOT NULL",
            &[&slot],
        )
        .await?
        .map(|r| r.get(0)))
}

/// The highest offset the broker acknowledged for `slot` on `topic`.
pub(crate) async fn last_offset(
    client: &Client,
    slot: &str,
    topic: &str,
) -> Result<Option<i64>, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "SELECT max(last_offset) FROM duplex.slots
             WHERE slot_name = $1 AND last_offset_topic = $2",
            &[&slot, &topic],
        )
        .await?
        .get(0))
}

/// Records `offset` as acknowledged on `topic`: it only rises on one topic (a late
/// write of an older session never lowers it), and starts afresh on another.
pub(crate) async fn record_offset(
    client: &Client,
    slot: &str,
    topic: &str,
    offset: i64,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "UPDATE duplex.slots SET last_offset_topic = $3,
                    last_offset = CASE WHEN last_offset_topic = $3 THEN greatest(last_offset, $1)
                                       ELSE $1 END
             WHERE slot_name = $2",
            &[&offset, &slot, &topic],
        )
        .await?;
    Ok(())
}

/// Records that the broker lost acknowledged messages of `topic` (`why`), and forgets
/// where the stream began there: the topic's offsets start over, and the next session
/// records the stream's start on it again.
pub(crate) async fn mark_topic_lost(
    client: &Client,
    slot: &str,
    topic: &str,
    why: &str,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "UPDATE duplex.slots SET topic_lost = $1 WHERE slot_name = $2",
            &[&why, &slot],
        )
        .await?;
    client
        .execute(
            "DELETE FROM duplex.stream_starts WHERE topic = $1",
            &[&topic],
        )
        .await?;
    Ok(())
}
