//! Comparing one table between the nodes without moving it: both nodes hash the
//! same key ranges inside PostgreSQL (row count and XOR of 64-bit row hashes, both
//! sides at once), and only ranges whose hashes differ are cut finer, down to ranges
//! small enough to fetch and compare row by row.
//!
//! A row's hash is PostgreSQL's `hash_record_extended` of its columns in a fixed
//! order: each column hashed by its type's own hash function, so equal values hash
//! equal on both nodes (jsonb keys in any order) without printing them. Columns whose
//! equality is looser than identity (numeric: 1.0 = 1.00) or whose type has no hash
//! function are hashed as text. Ranges of up to [`HASHES_ROWS`] rows that differ are
//! compared by fetching each row's key and hash; the rows whose hashes differ are then
//! fetched as text, column by column (NULL is not '').

use super::progress::Meter;
use crate::pg::node::{sql_err, NodeError};
use crate::pg::sql::quote_ident;
use crate::snapshot::table::{Chunk, CopyTable};
use std::collections::BTreeMap;
use tokio_postgres::Client;

/// Rows a differing range may hold, on the larger side, to be compared by fetching
/// each row's key and hash rather than cut finer.
const HASHES_ROWS: i64 = 2_000;
/// Types hashed by their own hash function; any other is hashed as text.
const HASHED_AS_VALUES: &[&str] = &[
    "smallint",
    "integer",
    "bigint",
    "boolean",
    "uuid",
    "text",
    "character varying",
    "character",
    "bytea",
    "date",
    "timestamp with time zone",
    "timestamp without time zone",
    "time without time zone",
    "jsonb",
    "double precision",
    "real",
];
/// Parts a differing range is cut into.
const FAN_OUT: i64 = 16;

/// A row's key texts and its columns' texts (None for NULL).
pub(crate) type Rows = BTreeMap<Vec<String>, Vec<Option<String>>>;

/// How one key differs between the nodes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) enum Difference {
    /// The row is on the second node only.
    MissingOnFirst,
    /// The row is on the first node only.
    MissingOnSecond,
    /// Both hold the key; these columns differ.
    Mismatched(Vec<String>),
}

/// What a comparison of one table found.
#[derive(Debug, Default)]
pub(crate) struct Found {
    pub rows: (i64, i64),
    pub chunks: usize,
    pub ranges_fetched: usize,
    pub differences: BTreeMap<Vec<String>, Difference>,
}

/// The two nodes' sessions, in config order.
pub(crate) struct Pair<'a> {
    pub names: (&'a str, &'a str),
    pub clients: (&'a Client, &'a Client),
}

impl Pair<'_> {
    async fn both<T>(
        &self,
        sql: &str,
        what: &str,
        read: impl Fn(&[tokio_postgres::Row]) -> T,
    ) -> Result<(T, T), NodeError> {
        let (a, b) = tokio::join!(
            self.clients.0.query(sql, &[]),
            self.clients.1.query(sql, &[])
        );
        let a = a.map_err(sql_err(self.names.0, what.to_string()))?;
        let b = b.map_err(sql_err(self.names.1, what.to_string()))?;
        Ok((read(&a), read(&b)))
    }
}

/// Compares `t` over the key ranges `bounds` (inclusive uppers, last range open).
pub(crate) async fn table(
    pair: &Pair<'_>,
    t: &CopyTable,
    bounds: &[Vec<String>],
    meter: &mut Meter,
) -> Result<Found, NodeError> {
    let mut found = Found::default();
    let mut work: Vec<Chunk> = ranges(t, None, None, bounds, true);
    found.chunks = work.len();
    while let Some(range) = work.pop() {
        let ((ca, ha), (cb, hb)) = pair
            .both(&hash_sql(t, &range), &format!("hashing {}", t.name), |r| {
                (r[0].get::<_, i64>(0), r[0].get::<_, i64>(1))
            })
            .await?;
        if range.chunk >= 0 {
            found.rows.0 += ca;
            found.rows.1 += cb;
            meter.advance(ca.max(cb));
        }
        if (ca, ha) == (cb, hb) {
            continue;
        }
        let sub = if ca.max(cb) <= HASHES_ROWS {
            Vec::new()
        } else {
            cut(pair, t, &range, (ca, cb)).await?
        };
        // Small enough, or not to be cut further: compare row hashes.
        if sub.is_empty() {
            found.ranges_fetched += 1;
            let (ha, hb) = pair
                .both(
                    &hashes_sql(t, &range),
                    &format!("hashing the rows of {}", t.name),
                    read_hashes,
                )
                .await?;
            let keys: Vec<Vec<String>> = ha
                .iter()
                .filter(|(k, h)| hb.get(*k) != Some(*h))
                .map(|(k, _)| k.clone())
                .chain(hb.keys().filter(|k| !ha.contains_key(*k)).cloned())
                .collect();
            let (ra, rb) = rows_of(pair, t, &keys).await?;
            found.differences.extend(diff(t, &ra, &rb));
            continue;
        }
        work.extend(ranges(
            t,
            range.lower.clone(),
            range.upper.clone(),
            &sub,
            false,
        ));
    }
    Ok(found)
}

/// Cuts a differing range into about [`FAN_OUT`] parts: by width when the key is a
/// single integer (its minimum and maximum in the range: an index probe each), else
/// at every n-th key of the side with more rows.
async fn cut(
    pair: &Pair<'_>,
    t: &CopyTable,
    range: &Chunk,
    (ca, cb): (i64, i64),
) -> Result<Vec<Vec<String>>, NodeError> {
    let (client, name) = if ca >= cb {
        (pair.clients.0, pair.names.0)
    } else {
        (pair.clients.1, pair.names.1)
    };
    let rows = ca.max(cb);
    let step = (rows / FAN_OUT).max(1);
    if let [(key, ty)] = t.key.as_slice() {
        if ["smallint", "integer", "bigint"].contains(&ty.as_str()) {
            let k = quote_ident(key);
            let r = client
                .query_one(
                    &format!(
                        "SELECT min({k})::int8, max({k})::int8 FROM {}{}",
                        t.sql_name,
                        t.chunk_filter(range)
                    ),
                    &[],
                )
                .await
                .map_err(sql_err(name, format!("cutting {}", t.name)))?;
            if let (Some(min), Some(max)) = (r.get::<_, Option<i64>>(0), r.get::<_, Option<i64>>(1))
            {
                return Ok(crate::snapshot::split::width_bounds(min, max, rows, step)
                    .iter()
                    .filter_map(|b| serde_json::from_str(b).ok())
                    .collect());
            }
        }
    }
    Ok(client
        .query(&cut_sql(t, range), &[&step])
        .await
        .map_err(sql_err(name, format!("cutting {}", t.name)))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// The ranges between `lower` and `upper` cut at `bounds`; ranges of a cut (not
/// `top`) are numbered -1, so that their rows are not counted twice.
fn ranges(
    t: &CopyTable,
    lower: Option<Vec<String>>,
    upper: Option<Vec<String>>,
    bounds: &[Vec<String>],
    top: bool,
) -> Vec<Chunk> {
    let mut edges: Vec<Option<Vec<String>>> = vec![lower];
    edges.extend(bounds.iter().cloned().map(Some));
    edges.push(upper);
    edges
        .windows(2)
        .enumerate()
        .map(|(n, w)| Chunk {
            table: t.name.clone(),
            chunk: if top { n as i32 } else { -1 },
            lower: w[0].clone(),
            upper: w[1].clone(),
        })
        .collect()
}

fn columns(t: &CopyTable) -> Vec<String> {
    t.columns.iter().map(|c| quote_ident(c)).collect()
}

fn key_texts(t: &CopyTable) -> String {
    let ks: Vec<String> = t
        .key
        .iter()
        .map(|(k, _)| format!("concat({})", quote_ident(k)))
        .collect();
    format!("ARRAY[{}]", ks.join(", "))
}

/// `hash_record_extended(ROW(...), 0)`: the row's 64-bit hash.
fn row_hash(t: &CopyTable) -> String {
    let parts: Vec<String> = t
        .columns
        .iter()
        .map(|c| {
            let ty = t.target.type_of(c);
            let base = ty.split(['(', '[']).next().unwrap_or(ty).trim();
            if HASHED_AS_VALUES.contains(&base) {
                quote_ident(c)
            } else {
                format!("{}::text", quote_ident(c))
            }
        })
        .collect();
    format!("hash_record_extended(ROW({}), 0)", parts.join(", "))
}

fn hash_sql(t: &CopyTable, range: &Chunk) -> String {
    format!(
        "SELECT count(*)::int8, coalesce(bit_xor({}), 0)::int8 FROM {}{}",
        row_hash(t),
        t.sql_name,
        t.chunk_filter(range)
    )
}

fn hashes_sql(t: &CopyTable, range: &Chunk) -> String {
    format!(
        "SELECT {}, {} FROM {}{}",
        key_texts(t),
        row_hash(t),
        t.sql_name,
        t.chunk_filter(range)
    )
}

fn read_hashes(rows: &[tokio_postgres::Row]) -> BTreeMap<Vec<String>, i64> {
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

fn rows_sql(t: &CopyTable, range: &Chunk) -> String {
    let texts: Vec<String> = columns(t).iter().map(|c| format!("{c}::text")).collect();
    format!(
        "SELECT {}, ARRAY[{}] FROM {}{}",
        key_texts(t),
        texts.join(", "),
        t.sql_name,
        t.chunk_filter(range)
    )
}

fn cut_sql(t: &CopyTable, range: &Chunk) -> String {
    let keys = t.key_list("");
    format!(
        "SELECT k FROM (SELECT {}::text[] AS k, row_number() OVER (ORDER BY {keys}) AS rn FROM {}{}) s
         WHERE rn % $1 = 0 ORDER BY rn",
        key_texts(t),
        t.sql_name,
        t.chunk_filter(range)
    )
}

fn read_rows(rows: &[tokio_postgres::Row]) -> Rows {
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

/// The rows of `first` and `second` that are not the same, by key.
pub(crate) fn diff(t: &CopyTable, first: &Rows, second: &Rows) -> Vec<(Vec<String>, Difference)> {
    let mut out = Vec::new();
    for (key, a) in first {
        match second.get(key) {
            None => out.push((key.clone(), Difference::MissingOnSecond)),
            Some(b) if a != b => {
                let cols = t
                    .columns
                    .iter()
                    .zip(a.iter().zip(b))
                    .filter(|(_, (x, y))| x != y)
                    .map(|(c, _)| c.clone())
                    .collect();
                out.push((key.clone(), Difference::Mismatched(cols)));
            }
            Some(_) => {}
        }
    }
    for key in second.keys().filter(|k| !first.contains_key(*k)) {
        out.push((key.clone(), Difference::MissingOnFirst));
    }
    out
}

/// Keys read at once by [`rows_of`].
const KEYS_PER_READ: usize = 500;

/// The current rows of `keys` on both nodes.
pub(crate) async fn rows_of(
    pair: &Pair<'_>,
    t: &CopyTable,
    keys: &[Vec<String>],
) -> Result<(Rows, Rows), NodeError> {
    let mut out = (Rows::new(), Rows::new());
    let all = Chunk {
        table: t.name.clone(),
        chunk: -1,
        lower: None,
        upper: None,
    };
    for batch in keys.chunks(KEYS_PER_READ) {
        let sql = format!("{} WHERE {}", rows_sql(t, &all), t.key_in(batch));
        let (a, b) = pair
            .both(&sql, &format!("reading {}", t.name), read_rows)
            .await?;
        out.0.extend(a);
        out.1.extend(b);
    }
    Ok(out)
}
