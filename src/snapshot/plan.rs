//! Planning a table's copy: whether it needs one (an empty source does not), how
//! (COPY into an empty target, else a merge), and in which chunks (key ranges of
//! `snapshot.chunk_rows` rows, found in one ordered scan of the key).
//!
//! A plan is written to the target (`duplex.snapshots`, `duplex.snapshot_chunks`) in
//! one transaction before any of its rows, and read back on every start: chunks are
//! ranges of key values, so rows inserted after planning fall into one of them and a
//! resumed copy needs no new plan. A plan made again (`duplex snapshot` while a copy
//! runs) gets the next generation, and a chunk is marked copied only by a worker of
//! its own generation: the old plan's ranges differ.

use super::table::{Chunk, CopyTable};
use crate::config::{Config, Direction, TableConfig};
use crate::pg::error::SqlError;
use crate::pg::node::{NodeError, SqlContext};
use tokio_postgres::Client;

/// How a table's chunks are written into the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    /// COPY straight into the table, which was empty when planned.
    Direct,
    /// COPY into a staging table, then upsert under last-writer-wins and tombstones.
    Merge,
}

impl Method {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Method::Direct => "direct",
            Method::Merge => "merge",
        }
    }

    fn parse(s: &str) -> Method {
        if s == "direct" {
            Method::Direct
        } else {
            Method::Merge
        }
    }
}

/// A table's copy as stored on the target.
#[derive(Debug, Clone)]
pub(crate) struct TablePlan {
    pub table: String,
    pub done: bool,
    pub method: Method,
    pub rows_estimated: i64,
    pub chunks: i32,
    pub chunks_copied: i32,
    pub rows_copied: i64,
    /// Which plan of the table this is (see the module's header).
    pub generation: i32,
}

/// The copies stored on `dir.to` for `dir.from`, in table order.
pub(crate) async fn load(target: &Client, dir: &Direction) -> Result<Vec<TablePlan>, NodeError> {
    let rows = target
        .query(
            "SELECT s.table_name, s.state = 'done', s.method, s.rows_estimated, s.chunks,
                    count(c.copied_at)::int4, coalesce(sum(c.rows), 0)::int8, s.generation
             FROM duplex.snapshots s
             LEFT JOIN duplex.snapshot_chunks c USING (source_node, table_name, generation)
             WHERE s.source_node = $1
             GROUP BY s.table_name, s.state, s.method, s.rows_estimated, s.chunks, s.generation
             ORDER BY s.table_name",
            &[&dir.from],
        )
        .await
        .sql(&dir.to, "reading duplex.snapshots")?;
    Ok(rows
        .iter()
        .map(|r| TablePlan {
            table: r.get(0),
            done: r.get(1),
            method: Method::parse(r.get(2)),
            rows_estimated: r.get(3),
            chunks: r.get(4),
            chunks_copied: r.get(5),
            rows_copied: r.get(6),
            generation: r.get(7),
        })
        .collect())
}

/// The chunks of `table`'s plan `generation` not copied yet, in key order.
pub(crate) async fn pending(
    target: &Client,
    dir: &Direction,
    table: &str,
    generation: i32,
) -> Result<Vec<Chunk>, NodeError> {
    let rows = target
        .query(
            "SELECT chunk, lower_key::text, upper_key::text FROM duplex.snapshot_chunks
             WHERE source_node = $1 AND table_name = $2 AND generation = $3 AND copied_at IS NULL
             ORDER BY chunk",
            &[&dir.from, &table, &generation],
        )
        .await
        .sql(&dir.to, "reading duplex.snapshot_chunks")?;
    let key = |v: Option<String>| -> Option<Vec<String>> { serde_json::from_str(&v?).ok() };
    Ok(rows
        .iter()
        .map(|r| Chunk {
            table: table.to_string(),
            chunk: r.get(0),
            lower: key(r.get(1)),
            upper: key(r.get(2)),
        })
        .collect())
}

/// Whether the configured table holds any row on the source.
pub(crate) async fn source_has_rows(
    source: &Client,
    dir: &Direction,
    tc: &TableConfig,
) -> Result<bool, NodeError> {
    let (schema, table) = tc.schema_table_on(&dir.from);
    let sql_name = crate::event::TableName::new(schema, table).quoted();
    exists(source, &dir.from, &tc.name, &sql_name, "").await
}

/// Records that `table` needs no copy: its source was empty when planned.
pub(crate) async fn store_nothing(
    target: &Client,
    dir: &Direction,
    table: &str,
) -> Result<(), NodeError> {
    target
        .execute(
            "INSERT INTO duplex.snapshots (source_node, table_name, state, method, rows_estimated, chunks, finished_at)
             VALUES ($1, $2, 'done', 'direct', 0, 0, now()) ON CONFLICT (source_node, table_name) DO NOTHING",
            &[&dir.from, &table],
        )
        .await
        .sql(&dir.to, "storing a snapshot plan")?;
    Ok(())
}

/// Whether `table` holds any row.
pub(crate) async fn has_rows(
    client: &Client,
    node: &str,
    t: &CopyTable,
) -> Result<bool, NodeError> {
    exists(client, node, &t.name, &t.sql_name, "").await
}

/// Whether `table` holds a row version written before duplex was first set up on
/// the node: by a transaction older than `duplex.node.first_setup_xid`. Rows written
/// since are the application's own, at most as old as duplex, and reach the peer on
/// the stream.
///
/// A row's `xmin` is 32 bits, and a frozen row keeps it however old it grows, so
/// `age(xmin)` wraps: an old frozen table can read as newer than duplex (a negative
/// age). A row not frozen is less than 2^31 ids old, so the row's age is taken
/// modulo 2^32 (never negative), and the row is as new as duplex only when that age
/// is within the ids assigned since duplex was set up, counted exactly (with the
/// epoch). Only a frozen row exactly 2^32 ids (plus fewer than those since setup)
/// old still reads as new; a row written since setup and frozen already reads as
/// old, which makes `initial` refuse rather than merge.
pub(crate) async fn has_rows_older_than_duplex(
    client: &Client,
    node: &str,
    t: &CopyTable,
    on_source: bool,
) -> Result<bool, NodeError> {
    let older = format!(
        ", ({ASSIGNED_SINCE_SETUP}) n
         WHERE xmin::text::int8 < 3
            OR ((n.next % 4294967296) - xmin::text::int8 + 4294967296) % 4294967296 > n.since"
    );
    let sql_name = if on_source {
        &t.source_sql_name
    } else {
        &t.sql_name
    };
    exists(client, node, &t.name, sql_name, &older).await
}

/// The next transaction id, and the ids assigned since duplex was first set up
/// (below 2^31: a row not frozen is younger than that).
const ASSIGNED_SINCE_SETUP: &str = "SELECT x.next, least(x.next - d.first, 2147483647) AS since
     FROM (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::int8 AS next) x,
          (SELECT first_setup_xid::text::int8 AS first FROM duplex.node) d";

/// Whether table `sql_name` (configured as `name`) holds a row matching `filter`
/// (what follows the table in `FROM`: a `WHERE` clause, or other tables and one).
async fn exists(
    client: &Client,
    node: &str,
    name: &str,
    sql_name: &str,
    filter: &str,
) -> Result<bool, NodeError> {
    client
        .query_one(
            &format!("SELECT EXISTS (SELECT 1 FROM {sql_name}{filter})"),
            &[],
        )
        .await
        .map(|r| r.get(0))
        .sql(node, format!("reading table {name}"))
        .map_err(NodeError::from)
}

/// Plans `t`'s copy and stores it on the target, replacing an earlier plan of it:
/// counts the source's rows and reads every `chunk_rows`-th key in key order.
pub(crate) async fn store(
    cfg: &Config,
    source: &Client,
    target: &mut Client,
    dir: &Direction,
    t: &CopyTable,
    method: Method,
) -> Result<TablePlan, NodeError> {
    let super::split::Split {
        rows: total,
        bounds,
    } = super::split::split(cfg, source, dir, t).await?;
    // Chunk n spans (bounds[n-1], bounds[n]]; the first and last are open-ended.
    let chunks = bounds.len() as i32 + 1;
    let lowers: Vec<Option<String>> = std::iter::once(None)
        .chain(bounds.iter().cloned().map(Some))
        .collect();
    let uppers: Vec<Option<String>> = bounds
        .iter()
        .cloned()
        .map(Some)
        .chain(std::iter::once(None))
        .collect();
    let numbers: Vec<i32> = (0..chunks).collect();
    let sql = || SqlError::on(&dir.to, format!("storing the plan of {}", t.name));
    let tx = target.transaction().await.map_err(sql())?;
    let generation: i32 = tx
        .query_one(
            "INSERT INTO duplex.snapshots (source_node, table_name, state, method, rows_estimated, chunks, generation)
             VALUES ($1, $2, 'copying', $3, $4, $5, 1)
             ON CONFLICT (source_node, table_name) DO UPDATE SET state = 'copying', method = EXCLUDED.method,
               rows_estimated = EXCLUDED.rows_estimated, chunks = EXCLUDED.chunks, started_at = now(), finished_at = NULL,
               generation = duplex.snapshots.generation + 1
             RETURNING generation",
            &[&dir.from, &t.name, &method.as_str(), &total, &chunks],
        )
        .await
        .map_err(sql())?
        .get(0);
    tx.execute(
        "DELETE FROM duplex.snapshot_chunks WHERE source_node = $1 AND table_name = $2",
        &[&dir.from, &t.name],
    )
    .await
    .map_err(sql())?;
    tx.execute(
        "INSERT INTO duplex.snapshot_chunks (source_node, table_name, chunk, lower_key, upper_key, generation)
         SELECT $1, $2, n, l::jsonb, u::jsonb, $6 FROM unnest($3::int4[], $4::text[], $5::text[]) AS c(n, l, u)",
        &[&dir.from, &t.name, &numbers, &lowers, &uppers, &generation],
    )
    .await
    .map_err(sql())?;
    tx.commit().await.map_err(sql())?;
    Ok(TablePlan {
        table: t.name.clone(),
        done: false,
        method,
        rows_estimated: total,
        chunks,
        chunks_copied: 0,
        rows_copied: 0,
        generation,
    })
}

/// Marks `table`'s copy done once every chunk is copied; returns whether it is.
pub(crate) async fn finish(
    target: &Client,
    dir: &Direction,
    table: &str,
) -> Result<bool, NodeError> {
    let n = target
        .execute(
            "UPDATE duplex.snapshots SET state = 'done', finished_at = now()
             WHERE source_node = $1 AND table_name = $2 AND state <> 'done'
               AND NOT EXISTS (SELECT 1 FROM duplex.snapshot_chunks c WHERE c.source_node = $1
                               AND c.table_name = $2 AND c.copied_at IS NULL)",
            &[&dir.from, &table],
        )
        .await
        .sql(&dir.to, "finishing a snapshot")?;
    Ok(n > 0)
}
