//! Cutting a table into key ranges: about `snapshot.chunk_rows` rows each, and no more
//! than [`CHUNK_BYTES`] of heap and TOAST, so that a table of wide rows still spreads
//! over the workers.
//!
//! A single integer key spread evenly enough (between 0.05 and 1000 key values per
//! row, as Flink CDC judges it) is cut into equal-width ranges from its minimum and
//! maximum: two index probes. Any other key is cut at every n-th key in key order,
//! found in one ordered scan of the primary-key index. Either way the ranges cover
//! the whole key space, so rows written later fall into one of them.
//!
//! The row count comes from the statistics, scaled to the table's size now (see
//! [`estimated_rows`]), and the scan stops at twice the chunks it should find: a
//! count far too low (statistics older than a bulk load) would otherwise cut at every
//! key, millions of chunks held in memory and stored in one statement. The rows are
//! counted then, and the table cut again.

use super::table::CopyTable;
use crate::config::{Config, Direction};
use crate::pg::error::SqlError;
use crate::pg::node::{NodeError, SqlContext};
use crate::pg::sql::{quote_ident, quote_literal};
use tokio_postgres::Client;

/// Heap and TOAST bytes a chunk should hold at most.
pub(crate) const CHUNK_BYTES: i64 = 16 << 20;

/// Key values per row between which a single integer key is cut by width.
const EVEN_FACTOR: (f64, f64) = (0.05, 1000.0);

/// How a table is cut.
pub(crate) struct Split {
    /// Rows the table holds, as the statistics estimate them (counted when they
    /// cannot, or when the scan finds far more).
    pub rows: i64,
    /// The inclusive upper key of every chunk but the last, as jsonb text arrays.
    pub bounds: Vec<String>,
}

/// One leaf table (a partition, or the table itself) as the catalog describes it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Leaf {
    /// Heap and TOAST bytes now.
    pub bytes: i64,
    /// Heap pages now.
    pub pages: i64,
    /// `pg_class.reltuples` and `relpages`, as of the last VACUUM or ANALYZE
    /// (reltuples -1: never).
    pub reltuples: f64,
    pub relpages: i64,
}

/// The rows `leaves` hold now, from their statistics, as the planner reckons them:
/// the density of the last VACUUM or ANALYZE (reltuples per relpages) times the pages
/// there are now. Statistics taken before a bulk load (say 1,000 rows on 10 pages,
/// and 1.3 million pages since) so scale with the table instead of holding on to the
/// old count. `None` when a leaf holding pages has no density to go by (never
/// analyzed, or analyzed empty): its rows must be counted.
pub(crate) fn estimated_rows(leaves: &[Leaf]) -> Option<f64> {
    let mut rows = 0.0;
    for l in leaves {
        if l.pages == 0 {
            continue;
        }
        if l.reltuples < 0.0 || l.relpages <= 0 {
            return None;
        }
        rows += l.reltuples / l.relpages as f64 * l.pages as f64;
    }
    Some(rows)
}

/// The rows a chunk of a table of `rows` rows and `bytes` bytes holds: at most
/// `max_rows`, and no more than [`CHUNK_BYTES`] of them.
pub(crate) fn rows_per_chunk(rows: i64, bytes: i64, max_rows: i64) -> i64 {
    let by_bytes = if bytes > 0 {
        (rows as f64 * CHUNK_BYTES as f64 / bytes as f64).ceil() as i64
    } else {
        i64::MAX
    };
    max_rows.min(by_bytes).max(1)
}

/// How many bounds the scan for `rows` rows cut every `per_chunk` rows may return
/// before the row count is known to be wrong (the table holds more than twice as
/// many): the scan stops there and the rows are counted, so that a wrong count
/// cannot make millions of chunks.
pub(crate) fn bound_limit(rows: i64, per_chunk: i64) -> i64 {
    let chunks = (rows.max(0) / per_chunk.max(1)).saturating_add(1);
    chunks.saturating_mul(2).saturating_add(16)
}

/// The leaves of `t` on the source: its partitions if partitioned, else the table
/// itself (which `pg_partition_tree` leaves out unless it is a partition).
async fn leaves(source: &Client, dir: &Direction, t: &CopyTable) -> Result<Vec<Leaf>, NodeError> {
    let rows = source
        .query(
            "WITH t AS (SELECT $1::text::regclass AS rel),
                  leaf AS (SELECT p.relid FROM t, pg_partition_tree(t.rel) p WHERE p.isleaf
                           UNION
                           SELECT t.rel FROM t JOIN pg_class c ON c.oid = t.rel WHERE c.relkind <> 'p')
             SELECT pg_table_size(l.relid)::int8,
                    (pg_relation_size(l.relid) / current_setting('block_size')::int8)::int8,
                    c.reltuples::float8, c.relpages::int8
             FROM leaf l JOIN pg_class c ON c.oid = l.relid",
            &[&t.source_sql_name],
        )
        .await
        .sql(
            &dir.from,
            format!("reading the size of {}", t.name),
        )?;
    Ok(rows
        .iter()
        .map(|r| Leaf {
            bytes: r.get(0),
            pages: r.get(1),
            reltuples: r.get(2),
            relpages: r.get(3),
        })
        .collect())
}

/// Heap and TOAST bytes of the table (of its partitions, if partitioned), and its
/// rows as the statistics estimate them ([`estimated_rows`]; -1 when they cannot).
pub(crate) async fn size(
    source: &Client,
    dir: &Direction,
    t: &CopyTable,
) -> Result<(i64, f64), NodeError> {
    let leaves = leaves(source, dir, t).await?;
    let bytes = leaves.iter().map(|l| l.bytes).sum();
    Ok((bytes, estimated_rows(&leaves).unwrap_or(-1.0)))
}

/// Cuts `t` on the source.
pub(crate) async fn split(
    cfg: &Config,
    source: &Client,
    dir: &Direction,
    t: &CopyTable,
) -> Result<Split, NodeError> {
    split_at_most(source, dir, t, cfg.snapshot.chunk_rows as i64).await
}

/// Cuts `t` on the source into ranges of at most `max_rows` rows (and
/// [`CHUNK_BYTES`]).
pub(crate) async fn split_at_most(
    source: &Client,
    dir: &Direction,
    t: &CopyTable,
    max_rows: i64,
) -> Result<Split, NodeError> {
    let sql = |what: &str| SqlError::on(&dir.from, format!("{what} {}", t.name));
    let count = || async {
        source
            .query_one(&format!("SELECT count(*) FROM {}", t.source_sql_name), &[])
            .await
            .map(|r| r.get::<_, i64>(0))
            .map_err(sql("counting the rows of"))
    };
    let (bytes, estimate) = size(source, dir, t).await?;
    let mut rows = if estimate > 0.0 {
        estimate as i64
    } else {
        count().await?
    };
    let mut counted = estimate <= 0.0;
    loop {
        let per_chunk = rows_per_chunk(rows, bytes, max_rows);
        if rows <= per_chunk {
            return Ok(Split {
                rows,
                bounds: Vec::new(),
            });
        }
        if let Some(bounds) = by_width(source, t, rows, per_chunk)
            .await
            .map_err(sql("cutting"))?
        {
            return Ok(Split { rows, bounds });
        }
        let limit = bound_limit(rows, per_chunk);
        let bounds = by_scan(source, t, per_chunk, limit)
            .await
            .map_err(sql("cutting"))?;
        if bounds.len() as i64 >= limit && !counted {
            // Far more rows than estimated: cut again by the real count.
            tracing::info!(direction = %dir, table = %t.name, estimated = rows,
                "the table holds far more rows than its statistics say; counting them");
            rows = count().await?;
            counted = true;
            continue;
        }
        return Ok(Split { rows, bounds });
    }
}

/// Every `per_chunk`-th key in key order, at most `limit` of them: one ordered scan
/// of the primary-key index.
async fn by_scan(
    source: &Client,
    t: &CopyTable,
    per_chunk: i64,
    limit: i64,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let keys = t.key_list("");
    let texts: Vec<String> = t
        .key
        .iter()
        .map(|(k, _)| format!("concat({})", quote_ident(k)))
        .collect();
    Ok(source
        .query(
            &format!(
                "SELECT jsonb_build_array({texts})::text FROM (
                   SELECT {keys}, row_number() OVER (ORDER BY {keys}) AS rn FROM {table}) s
                 WHERE rn % $1 = 0 ORDER BY rn LIMIT $2",
                texts = texts.join(", "),
                table = t.source_sql_name,
            ),
            &[&per_chunk, &limit],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Equal-width ranges of a single integer key spread evenly enough; `None` otherwise.
async fn by_width(
    source: &Client,
    t: &CopyTable,
    rows: i64,
    per_chunk: i64,
) -> Result<Option<Vec<String>>, tokio_postgres::Error> {
    let [(key, ty)] = t.key.as_slice() else {
        return Ok(None);
    };
    if !["smallint", "integer", "bigint"].contains(&ty.as_str()) {
        return Ok(None);
    }
    let k = quote_ident(key);
    let row = source
        .query_one(
            &format!(
                "SELECT min({k})::int8, max({k})::int8 FROM {}",
                t.source_sql_name
            ),
            &[],
        )
        .await?;
    let (Some(min), Some(max)) = (row.get::<_, Option<i64>>(0), row.get::<_, Option<i64>>(1))
    else {
        return Ok(None);
    };
    let span = (max as i128 - min as i128 + 1) as f64;
    let factor = span / rows.max(1) as f64;
    if !(EVEN_FACTOR.0..=EVEN_FACTOR.1).contains(&factor) {
        return Ok(None);
    }
    Ok(Some(width_bounds(min, max, rows, per_chunk)))
}

/// The inclusive upper bounds of `ceil(rows / per_chunk)` equal ranges over
/// `min..=max`, the last range left open.
pub(crate) fn width_bounds(min: i64, max: i64, rows: i64, per_chunk: i64) -> Vec<String> {
    let n = ((rows + per_chunk - 1) / per_chunk).max(1) as i128;
    let span = max as i128 - min as i128 + 1;
    let width = (span + n - 1) / n;
    (1..n)
        .map(|i| min as i128 - 1 + i * width)
        .take_while(|b| *b < max as i128)
        .map(|b| format!("[{}]", quote_json(&b.to_string())))
        .collect()
}

fn quote_json(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| quote_literal(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn width_bounds_cover_the_range_in_equal_steps() {
        assert_eq!(
            width_bounds(1, 100, 100, 25),
            vec!["[\"25\"]", "[\"50\"]", "[\"75\"]"]
        );
        // Fewer rows than the span: still ceil(rows / per_chunk) chunks.
        assert_eq!(width_bounds(1, 1000, 100, 50), vec!["[\"500\"]"]);
        // A single chunk needs no bound.
        assert!(width_bounds(5, 5, 10, 100).is_empty());
        // The extremes of bigint do not overflow.
        let b = width_bounds(i64::MIN, i64::MAX, 4, 1);
        assert_eq!(b.len(), 3);
        assert_eq!(b[1], "[\"-1\"]");
    }

    fn leaf(bytes: i64, pages: i64, reltuples: f64, relpages: i64) -> Leaf {
        Leaf {
            bytes,
            pages,
            reltuples,
            relpages,
        }
    }

    #[test]
    fn statistics_older_than_a_bulk_load_scale_with_the_pages() {
        // Analyzed at 1,000 rows on 10 pages; 1.3 million pages (10 GB) since.
        let stale = leaf(10 << 30, 1_300_000, 1000.0, 10);
        let rows = estimated_rows(&[stale]).unwrap() as i64;
        assert_eq!(rows, 130_000_000);
        // So chunks of 50,000 rows, not one per row.
        let per_chunk = rows_per_chunk(rows, stale.bytes, 50_000);
        assert_eq!(per_chunk, 50_000);
        // The old rule took the stale count: 2 rows per chunk, 65 million chunks.
        assert_eq!(rows_per_chunk(1000, stale.bytes, 50_000), 2);
        // Partitions add up; an empty never-analyzed one counts nothing.
        let parts = [
            leaf(8192, 1, 100.0, 1),
            leaf(16384, 2, 100.0, 1),
            leaf(0, 0, -1.0, 0),
        ];
        assert_eq!(estimated_rows(&parts), Some(300.0));
    }

    #[test]
    fn leaves_without_a_density_are_counted() {
        // Never analyzed, or analyzed empty before rows came.
        assert_eq!(estimated_rows(&[leaf(1 << 20, 128, -1.0, 0)]), None);
        assert_eq!(estimated_rows(&[leaf(1 << 20, 128, 0.0, 0)]), None);
        assert_eq!(estimated_rows(&[leaf(0, 0, 0.0, 0)]), Some(0.0));
    }

    #[test]
    fn the_scan_stops_well_before_one_bound_per_row() {
        // Wide rows: 16 MB per chunk decides.
        assert_eq!(rows_per_chunk(1000, 160 << 20, 50_000), 100);
        // 20 chunks expected: the scan may return 58 bounds before the rows are
        // counted; a table of 100 million rows cut every 100 rows would return
        // a million.
        assert_eq!(bound_limit(2000, 100), 58);
        assert_eq!(bound_limit(0, 1), 18);
        assert_eq!(bound_limit(i64::MAX, 1), i64::MAX);
    }
}
