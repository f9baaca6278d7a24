//! Comparing one table between the nodes without moving it: both nodes hash the
//! same key ranges inside PostgreSQL (row count and XOR of 64-bit row hashes, both
//! sides at once), and only ranges whose hashes differ are cut finer, down to ranges
//! small enough to fetch and compare row by row.
//!
//! A row's hash is PostgreSQL's `hash_record_extended` of its columns in a fixed
//! order: each column hashed by its type's own hash function, so equal values hash
//! equal on both nodes (jsonb keys in any order) without printing them. PostgreSQL 13
//! has no `hash_record_extended`: when either node runs it, both hash the row's text
//! instead ([`RowHash`]), which duplex's fixed output settings make the same on both. Columns whose
//! equality is looser than identity (numeric: 1.0 = 1.00) or whose type has no hash
//! function are hashed as text. Ranges of up to [`HASHES_ROWS`] rows that differ are
//! compared by fetching each row's key and hash; the rows whose hashes differ are then
//! fetched as text, column by column (NULL is not ''). Rows are fetched by key
//! equality on each node, so a key that prints differently on the two nodes (citext
//! case, numeric scale) is one row whose key columns differ ([`rows_of`]).

use super::progress::Meter;
use crate::pg::node::{NodeError, SqlContext};
use crate::pg::sql::quote_ident;
use crate::snapshot::table::{Chunk, CopyTable};
use std::collections::{BTreeMap, HashMap, HashSet};
use tokio_postgres::types::ToSql;
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
    /// How both nodes hash a row: the same way on both, or hashes never match.
    pub hash: RowHash,
}

/// How a row is hashed on both nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RowHash {
    /// `hash_record_extended` of the row (PostgreSQL 14 and later on both nodes).
    Record,
    /// `hashtextextended` of the row's text, summed rather than XORed, where a node
    /// runs PostgreSQL 13.
    Text,
}

impl RowHash {
    /// The way both nodes of `names` (with `clients`) can hash.
    pub(crate) async fn of(
        names: (&str, &str),
        clients: (&Client, &Client),
    ) -> Result<RowHash, NodeError> {
        let mut oldest = i32::MAX;
        for (name, client) in [(names.0, clients.0), (names.1, clients.1)] {
            let version: i32 = client
                .query_one("SELECT current_setting('server_version_num')::int", &[])
                .await
                .sql(name, "reading server_version_num")?
                .get(0);
            oldest = oldest.min(version);
        }
        Ok(RowHash::for_version(oldest))
    }

    /// The way a pair whose older node is at `server_version_num` hashes.
    pub(crate) fn for_version(oldest: i32) -> RowHash {
        if oldest >= 140000 {
            RowHash::Record
        } else {
            RowHash::Text
        }
    }
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
        let a = a.sql(self.names.0, what.to_string())?;
        let b = b.sql(self.names.1, what.to_string())?;
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
            .both(
                &hash_sql(t, &range, pair.hash),
                &format!("hashing {}", t.name),
                |r| (r[0].get::<_, i64>(0), r[0].get::<_, i64>(1)),
            )
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
                    &hashes_sql(t, &range, pair.hash),
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
                .sql(name, format!("cutting {}", t.name))?;
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
        .sql(name, format!("cutting {}", t.name))?
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

fn key_texts(t: &CopyTable) -> String {
    let ks: Vec<String> = t
        .key
        .iter()
        .map(|(k, _)| format!("concat({})", quote_ident(k)))
        .collect();
    format!("ARRAY[{}]", ks.join(", "))
}

/// The row's 64-bit hash: `hash_record_extended(ROW(...), 0)`, or with
/// [`RowHash::Text`] `hashtextextended(ROW(...)::text, 0)`.
fn row_hash(t: &CopyTable, how: RowHash) -> String {
    let parts: Vec<String> = t
        .columns
        .iter()
        .map(|c| {
            let ty = t.target.type_of(c);
            let base = ty.split(['(', '[']).next().unwrap_or(&ty).trim();
            if HASHED_AS_VALUES.contains(&base) {
                quote_ident(c)
            } else {
                format!("{}::text", quote_ident(c))
            }
        })
        .collect();
    match how {
        RowHash::Record => format!("hash_record_extended(ROW({}), 0)", parts.join(", ")),
        RowHash::Text => format!("hashtextextended(ROW({})::text, 0)", parts.join(", ")),
    }
}

/// A range's row count and the order-free sum of its row hashes: their XOR, or where a
/// node runs PostgreSQL 13 (no `bit_xor`) their sum modulo 2^63 - 1.
fn hash_sql(t: &CopyTable, range: &Chunk, how: RowHash) -> String {
    let h = row_hash(t, how);
    let sum = match how {
        RowHash::Record => format!("coalesce(bit_xor({h}), 0)::int8"),
        RowHash::Text => format!("(coalesce(sum({h}::numeric), 0) % 9223372036854775807)::int8"),
    };
    format!(
        "SELECT count(*)::int8, {sum} FROM {}{}",
        t.sql_name,
        t.chunk_filter(range)
    )
}

fn hashes_sql(t: &CopyTable, range: &Chunk, how: RowHash) -> String {
    format!(
        "SELECT {}, {} FROM {}{}",
        key_texts(t),
        row_hash(t, how),
        t.sql_name,
        t.chunk_filter(range)
    )
}

fn read_hashes(rows: &[tokio_postgres::Row]) -> BTreeMap<Vec<String>, i64> {
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
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

/// The current rows of `keys` on both nodes, each under the requested key that found
/// it. A key is found by its type's equality on each node, not by its text: a citext
/// key 'Bob@x' finds 'bob@x', a numeric key 1.0 finds 1.00. So a row whose key prints
/// differently on the two nodes is one row here, found on both under the same
/// requested key (the first one requested that found it), and its key columns
/// differ; never two rows each missing on one node.
pub(crate) async fn rows_of(
    pair: &Pair<'_>,
    t: &CopyTable,
    keys: &[Vec<String>],
) -> Result<(Rows, Rows), NodeError> {
    let mut out = (Rows::new(), Rows::new());
    // Rows already found, by their own key on each node.
    let mut seen: (HashSet<Vec<String>>, HashSet<Vec<String>>) = Default::default();
    let sql = rows_by_key_sql(t);
    let what = format!("reading {}", t.name);
    for batch in keys.chunks(KEYS_PER_READ) {
        let columns: Vec<Vec<&str>> = (0..t.key.len())
            .map(|i| {
                batch
                    .iter()
                    .map(|k| k.get(i).map_or("", String::as_str))
                    .collect()
            })
            .collect();
        let params: Vec<&(dyn ToSql + Sync)> =
            columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
        let (a, b) = tokio::join!(
            pair.clients.0.query(&sql, &params),
            pair.clients.1.query(&sql, &params)
        );
        let a = found_by_request(&a.sql(pair.names.0, what.clone())?);
        let b = found_by_request(&b.sql(pair.names.1, what.clone())?);
        for (n, requested) in batch.iter().enumerate() {
            let (on_a, on_b) = (a.get(&(n as i64 + 1)), b.get(&(n as i64 + 1)));
            let again = on_a.is_some_and(|(k, _)| seen.0.contains(k))
                || on_b.is_some_and(|(k, _)| seen.1.contains(k));
            if again {
                continue;
            }
            if let Some((k, row)) = on_a {
                seen.0.insert(k.clone());
                out.0.insert(requested.clone(), row.clone());
            }
            if let Some((k, row)) = on_b {
                seen.1.insert(k.clone());
                out.1.insert(requested.clone(), row.clone());
            }
        }
    }
    Ok(out)
}

/// The rows whose keys equal the requested ones (`$1`, `$2`, ...: each key column's
/// requested texts, cast to its type): the request's number, the row's own key
/// texts and its columns' texts.
fn rows_by_key_sql(t: &CopyTable) -> String {
    let n = t.key.len();
    let params: Vec<String> = (1..=n).map(|i| format!("${i}::text[]")).collect();
    let names: Vec<String> = (0..n).map(|i| format!("duplex_k{i}")).collect();
    let requested: Vec<String> = t
        .key
        .iter()
        .zip(&names)
        .map(|((_, ty), q)| format!("q.{q}::{ty}"))
        .collect();
    let own: Vec<String> = t
        .key
        .iter()
        .map(|(k, _)| format!("concat(t.{})", quote_ident(k)))
        .collect();
    let texts: Vec<String> = t
        .columns
        .iter()
        .map(|c| format!("t.{}::text", quote_ident(c)))
        .collect();
    format!(
        "SELECT q.duplex_n, ARRAY[{own}], ARRAY[{texts}]
         FROM unnest({params}) WITH ORDINALITY AS q({names}, duplex_n)
         JOIN {table} t ON ({keys}) = ({requested})",
        own = own.join(", "),
        texts = texts.join(", "),
        params = params.join(", "),
        names = names.join(", "),
        table = t.sql_name,
        keys = t.key_list("t."),
        requested = requested.join(", "),
    )
}

/// Request number → (the row's own key texts, its columns' texts).
fn found_by_request(
    rows: &[tokio_postgres::Row],
) -> HashMap<i64, (Vec<String>, Vec<Option<String>>)> {
    rows.iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::RowHash;

    #[test]
    fn a_pair_with_a_node_on_13_hashes_text_and_any_other_pair_records() {
        assert_eq!(RowHash::for_version(130023), RowHash::Text);
        assert_eq!(RowHash::for_version(139999), RowHash::Text);
        assert_eq!(RowHash::for_version(140000), RowHash::Record);
        assert_eq!(RowHash::for_version(180004), RowHash::Record);
    }
}
