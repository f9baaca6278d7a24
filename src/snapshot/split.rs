//! Cutting a table into key ranges: about `snapshot.chunk_rows` rows each, and no more
//! than [`CHUNK_BYTES`] of heap and TOAST, so that a table of wide rows still spreads
//! over the workers.
//!
//! A single integer key spread evenly enough (between 0.05 and 1000 key values per
//! row, as Flink CDC judges it) is cut into equal-width ranges from its minimum and
//! maximum: two index probes. Any other key is cut at every n-th key in key order,
//! found in one ordered scan of the primary-key index. Either way the ranges cover
//! the whole key space, so rows written later fall into one of them.

use super::table::CopyTable;
use crate::config::{Config, Direction};
use crate::pg::node::{sql_err, NodeError};
use crate::pg::sql::{quote_ident, quote_literal};
use tokio_postgres::Client;

/// Heap and TOAST bytes a chunk should hold at most.
pub(crate) const CHUNK_BYTES: i64 = 16 << 20;

/// Key values per row between which a single integer key is cut by width.
const EVEN_FACTOR: (f64, f64) = (0.05, 1000.0);

/// How a table is cut.
pub(crate) struct Split {
    /// Rows the table holds, as the statistics estimate them (counted when it was
    /// never analyzed).
    pub rows: i64,
    /// The inclusive upper key of every chunk but the last, as jsonb text arrays.
    pub bounds: Vec<String>,
}

/// Heap and TOAST bytes of the table (of its partitions, if partitioned), and the
/// statistics' row estimate.
pub(crate) async fn size(
    source: &Client,
    dir: &Direction,
    t: &CopyTable,
) -> Result<(i64, f64), NodeError> {
    let row = source
        .query_one(
            "SELECT coalesce(sum(pg_table_size(p.relid)), 0)::int8,
                    coalesce(sum(greatest(c.reltuples, 0)), 0)::float8,
                    bool_or(c.reltuples < 0)
             FROM pg_partition_tree($1::text::regclass) p JOIN pg_class c ON c.oid = p.relid
             WHERE p.isleaf",
            &[&t.source_sql_name],
        )
        .await
        .map_err(sql_err(
            &dir.from,
            format!("reading the size of {}", t.name),
        ))?;
    let never_analyzed: Option<bool> = row.get(2);
    let estimate: f64 = row.get(1);
    Ok((
        row.get(0),
        if never_analyzed == Some(true) {
            -1.0
        } else {
            estimate
        },
    ))
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
    let sql = |what: &str| sql_err(&dir.from, format!("{what} {}", t.name));
    let (bytes, estimate) = size(source, dir, t).await?;
    let rows = if estimate > 0.0 {
        estimate as i64
    } else {
        source
            .query_one(&format!("SELECT count(*) FROM {}", t.source_sql_name), &[])
            .await
            .map_err(sql("counting the rows of"))?
            .get(0)
    };
    let by_bytes = if bytes > 0 {
        (rows as f64 * CHUNK_BYTES as f64 / bytes as f64).ceil() as i64
    } else {
        i64::MAX
    };
    let per_chunk = max_rows.min(by_bytes).max(1);
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
    let keys = t.key_list("");
    let texts: Vec<String> = t
        .key
        .iter()
        .map(|(k, _)| format!("concat({})", quote_ident(k)))
        .collect();
    let bounds = source
        .query(
            &format!(
                "SELECT jsonb_build_array({texts})::text FROM (
                   SELECT {keys}, row_number() OVER (ORDER BY {keys}) AS rn FROM {table}) s
                 WHERE rn % $1 = 0 ORDER BY rn",
                texts = texts.join(", "),
                table = t.source_sql_name,
            ),
            &[&per_chunk],
        )
        .await
        .map_err(sql("cutting"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(Split { rows, bounds })
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
}
