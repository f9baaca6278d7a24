//! Where each direction into this node stands (`duplex.apply_positions`): the Kafka
//! offset to read next and the last source position applied, written in the same
//! target transaction as the rows it applied, so that both are durable together.
//!
//! A row without an applied position (`commit_lsn` 0/0) is a start: where a direction
//! that applied nothing yet begins reading. A copy records one before it reads the
//! source (`store_start`), so that everything before it on the topic is covered by
//! the copy and a transaction already open at that offset was copied too.

use crate::event::{Lsn, Position};
use tokio_postgres::Client;

/// What the target's `duplex.apply_positions` says of a direction: how far it applied.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The last source position applied (a transaction's end); `None` before the
    /// first one.
    pub applied: Option<Position>,
    /// The Kafka offset to read next.
    pub next_offset: Option<i64>,
    /// Source commit time of the newest transaction applied, µs since the epoch.
    pub last_commit_us: Option<i64>,
    /// The source slot's stream `applied` belongs to.
    pub stream: Option<String>,
}

/// Reads the direction's stored position on `topic`; the default when it has none.
pub async fn load(
    client: &Client,
    source: &str,
    topic: &str,
) -> Result<Stored, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT next_offset, commit_lsn::text, seq,
                    (extract(epoch FROM last_commit_ts) * 1000000)::int8, stream
             FROM duplex.apply_positions WHERE source_node = $1 AND topic = $2",
            &[&source, &topic],
        )
        .await?;
    Ok(row.map_or_else(Stored::default, |r| {
        let lsn: String = r.get(1);
        let seq: i32 = r.get(2);
        let commit_lsn: Lsn = lsn.parse().unwrap_or_default();
        Stored {
            applied: (commit_lsn != Lsn::ZERO).then_some(Position {
                commit_lsn,
                seq: seq.max(0) as u32,
            }),
            next_offset: Some(r.get(0)),
            last_commit_us: r.get(3),
            stream: r.get(4),
        }
    }))
}

/// Stores how far the direction reaches, in the target transaction open on `client`:
/// durable when that transaction commits, together with the rows it wrote.
pub async fn store(
    client: &Client,
    source: &str,
    topic: &str,
    s: &Stored,
) -> Result<(), tokio_postgres::Error> {
    let pos = s.applied.unwrap_or(Position {
        commit_lsn: Lsn::ZERO,
        seq: 0,
    });
    client
        .execute(
            "INSERT INTO duplex.apply_positions (source_node, topic, next_offset, commit_lsn, seq, last_commit_ts, applied_at, stream)
             VALUES ($1, $6, $2, $3::text::pg_lsn, $4, 'epoch'::timestamptz + $5::int8 * interval '1 microsecond', now(), $7)
             ON CONFLICT (source_node, topic) DO UPDATE SET next_offset = EXCLUDED.next_offset,
               commit_lsn = EXCLUDED.commit_lsn, seq = EXCLUDED.seq, applied_at = now(), stream = EXCLUDED.stream,
               last_commit_ts = coalesce(EXCLUDED.last_commit_ts, duplex.apply_positions.last_commit_ts)",
            &[
                &source,
                &s.next_offset,
                &pos.commit_lsn.to_string(),
                &(pos.seq as i32),
                &s.last_commit_us,
                &topic,
                &s.stream,
            ],
        )
        .await?;
    Ok(())
}

/// Records `offset` as where the direction from `source` starts reading `topic`,
/// unless it has a position there already; returns whether it did.
pub async fn store_start(
    client: &Client,
    source: &str,
    topic: &str,
    offset: i64,
) -> Result<bool, tokio_postgres::Error> {
    let n = client
        .execute(
            "INSERT INTO duplex.apply_positions (source_node, topic, next_offset, commit_lsn, seq)
             VALUES ($1, $2, $3, '0/0', 0) ON CONFLICT (source_node, topic) DO NOTHING",
            &[&source, &topic, &offset],
        )
        .await?;
    Ok(n == 1)
}

/// Whether the direction from `source` ever applied a change, from any topic.
pub async fn applied_before(client: &Client, source: &str) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM duplex.apply_positions
                            WHERE source_node = $1 AND commit_lsn <> '0/0')",
            &[&source],
        )
        .await?
        .get(0))
}

/// Whether the direction from `source` has any row for `topic` (a start or a position).
pub async fn exists(
    client: &Client,
    source: &str,
    topic: &str,
) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM duplex.apply_positions WHERE source_node = $1 AND topic = $2)",
            &[&source, &topic],
        )
        .await?
        .get(0))
}
