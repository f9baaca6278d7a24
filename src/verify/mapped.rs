//! Verifying a mapped table (see `mapping/`): the nodes' rows have different shapes,
//! so hashes cannot be compared. The first node's rows are read a key range at a
//! time, mapped into the second node's schema as the applier maps them (keys and
//! references through the second node's pairings, values converted), and compared
//! there in the second node's types (so `12.3` equals `12.30` once scaled, and a UTC
//! `timestamp` equals its `timestamptz`). Rows of the second node that no first-node
//! row pairs with are missing on the first.
//!
//! Keys in the report are the first node's, except for `missing_on_<first>`, where
//! only the second node's key exists.

use super::compare::{Difference, Found, Pair};
use super::VerifyError;
use crate::config::{Config, Direction, TableConfig};
use crate::event::{Row, Value};
use crate::mapping::keys::Pairings;
use crate::mapping::PairMap;
use crate::pg::node::SqlContext;
use crate::pg::sql::{quote_ident, quote_literal};
use crate::snapshot::table::{Chunk, CopyTable};
use std::collections::{BTreeMap, HashMap, HashSet};
use tokio_postgres::Client;

/// Rows per key range of the first node.
const RANGE_ROWS: i64 = 10_000;

/// The first node's view of a mapped table, ready to compare.
pub(crate) struct MappedTable {
    pub t: CopyTable,
    pub pair: PairMap,
    dir: Direction,
}

impl MappedTable {
    pub(crate) async fn describe(
        p: &Pair<'_>,
        tc: &TableConfig,
    ) -> Result<MappedTable, VerifyError> {
        let dir = Direction {
            from: p.names.0.to_string(),
            to: p.names.1.to_string(),
        };
        let t = CopyTable::describe(p.clients.0, p.clients.1, &dir, tc).await?;
        let pair = PairMap::load(tc, &dir, p.clients.1)
            .await
            .map_err(|e| VerifyError::Mapping(e.to_string()))?;
        Ok(MappedTable { t, pair, dir })
    }

    fn pairings<'c>(&'c self, p: &'c Pair<'_>) -> Pairings<'c> {
        Pairings {
            client: p.clients.1,
            node: p.names.1,
            target_is_a: false,
        }
    }
}

/// Compares the whole table.
pub(crate) async fn table(p: &Pair<'_>, m: &MappedTable) -> Result<Found, VerifyError> {
    let mut found = Found::default();
    let bounds: Vec<Vec<String>> =
        crate::snapshot::split::split_at_most(p.clients.0, &m.dir, &m.t, RANGE_ROWS)
            .await?
            .bounds
            .iter()
            .filter_map(|b| serde_json::from_str(b).ok())
            .collect();
    let mut edges: Vec<Option<Vec<String>>> = vec![None];
    edges.extend(bounds.into_iter().map(Some));
    edges.push(None);
    for w in edges.windows(2) {
        let chunk = Chunk {
            table: m.t.name.clone(),
            chunk: -1,
            lower: w[0].clone(),
            upper: w[1].clone(),
        };
        let (n, diffs) = compare_rows(p, m, &m.t.chunk_filter(&chunk)).await?;
        found.rows.0 += n;
        found.chunks += 1;
        found.differences.extend(diffs);
    }
    let (n, missing) = missing_on_first(p, m, None).await?;
    found.rows.1 = n;
    found.differences.extend(missing);
    Ok(found)
}

/// How `keys` (as the report names them) differ now.
pub(crate) async fn recheck(
    p: &Pair<'_>,
    m: &MappedTable,
    keys: &[Vec<String>],
    found: &BTreeMap<Vec<String>, Difference>,
) -> Result<BTreeMap<Vec<String>, Difference>, VerifyError> {
    let first: Vec<Vec<String>> = keys
        .iter()
        .filter(|k| found.get(*k) != Some(&Difference::MissingOnFirst))
        .cloned()
        .collect();
    let second: Vec<String> = keys
        .iter()
        .filter(|k| found.get(*k) == Some(&Difference::MissingOnFirst))
        .filter_map(|k| k.first().cloned())
        .collect();
    let mut out = BTreeMap::new();
    if !first.is_empty() {
        let (_, diffs) = compare_rows(p, m, &format!(" WHERE {}", m.t.key_in(&first))).await?;
        out.extend(diffs);
    }
    if !second.is_empty() {
        let (_, missing) = missing_on_first(p, m, Some(&second)).await?;
        out.extend(missing);
    }
    Ok(out)
}

/// Compares the first node's rows matching `filter` with their counterparts;
/// returns how many rows it read and what differs.
async fn compare_rows(
    p: &Pair<'_>,
    m: &MappedTable,
    filter: &str,
) -> Result<(i64, BTreeMap<Vec<String>, Difference>), VerifyError> {
    let rows = p
        .clients
        .0
        .query(&m.t.rows_where(filter), &[])
        .await
        .sql(p.names.0, format!("reading {}", m.t.name))?;
    let images: Vec<Row> = rows
        .iter()
        .map(|r| {
            Row(m
                .t
                .columns
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    (
                        c.clone(),
                        r.get::<_, Option<String>>(i)
                            .map_or(Value::Null, Value::Text),
                    )
                })
                .collect())
        })
        .collect();
    let known = lookups(p, m, &images).await?;
    let mut out = BTreeMap::new();
    let mut payload = Vec::new();
    let columns = compared_columns(m);
    for image in &images {
        let Some(Value::Text(key)) = image.get(&m.pair.source_key) else {
            continue;
        };
        let Some(target_key) = known.get(&(m.pair.label.clone(), key.clone())) else {
            out.insert(vec![key.clone()], Difference::MissingOnSecond);
            continue;
        };
        let mut values = serde_json::Map::new();
        let mut unmappable = Vec::new();
        for (col, v) in &image.0 {
            match m.pair.map_value(col, v, &known) {
                Ok(Some((target, Value::Text(t)))) => {
                    values.insert(target, serde_json::Value::String(t));
                }
                Ok(Some((target, _))) => {
                    values.insert(target, serde_json::Value::Null);
                }
                Ok(None) => {}
                Err(_) => unmappable.push(col.clone()),
            }
        }
        if !unmappable.is_empty() {
            out.insert(vec![key.clone()], Difference::Mismatched(unmappable));
            continue;
        }
        payload.push(serde_json::json!({"s": key, "k": target_key, "v": values}));
    }
    if !payload.is_empty() {
        out.extend(compare_on_second(p, m, &columns, payload).await?);
    }
    Ok((images.len() as i64, out))
}

/// The second node's columns that the first node's map to (the key aside), from the
/// pair's rules as [`PairMap::map_value`] applies them: every mapped row is compared
/// on all of them, whatever the range's other rows hold (a row that cannot be
/// mapped is reported for its own columns and hides none of the others'). A mapped
/// column the second node lacks yet is owed, not compared (`duplex status` names it).
fn compared_columns(m: &MappedTable) -> Vec<String> {
    let on_second = |c: &String| m.pair.target_columns.iter().any(|t| t == c);
    m.t.columns
        .iter()
        .filter(|c| **c != m.pair.source_key)
        .filter_map(|c| match m.pair.rules.get(c) {
            Some(rule) => on_second(&rule.target).then(|| rule.target.clone()),
            None => on_second(c).then(|| c.clone()),
        })
        .collect()
}

/// Pairings of the rows' keys and references, on the second node.
async fn lookups(
    p: &Pair<'_>,
    m: &MappedTable,
    images: &[Row],
) -> Result<HashMap<(String, String), String>, VerifyError> {
    let mut wanted: HashMap<String, HashSet<String>> = HashMap::new();
    for image in images {
        if let Some(Value::Text(k)) = image.get(&m.pair.source_key) {
            wanted
                .entry(m.pair.label.clone())
                .or_default()
                .insert(k.clone());
        }
        for (col, r) in &m.pair.rules {
            if let (Some(label), Some(Value::Text(v))) = (&r.references, image.get(col)) {
                wanted.entry(label.clone()).or_default().insert(v.clone());
            }
        }
    }
    let pairings = m.pairings(p);
    let mut known = HashMap::new();
    for (label, keys) in wanted {
        let keys: Vec<String> = keys.into_iter().collect();
        let found = pairings
            .lookup(&label, &keys)
            .await
            .map_err(|e| VerifyError::Mapping(e.to_string()))?;
        known.extend(found.into_iter().map(|(s, t)| ((label.clone(), s), t)));
    }
    Ok(known)
}

/// Compares mapped rows with the second node's, in its types; keys are the first
/// node's.
async fn compare_on_second(
    p: &Pair<'_>,
    m: &MappedTable,
    columns: &[String],
    payload: Vec<serde_json::Value>,
) -> Result<BTreeMap<Vec<String>, Difference>, VerifyError> {
    let target = &m.t.target;
    let key = quote_ident(&m.pair.target_key);
    let checks: Vec<String> = columns
        .iter()
        .map(|c| {
            format!(
                "t.{} IS DISTINCT FROM (m.v->>{})::{}",
                quote_ident(c),
                quote_literal(c),
                target.type_of(c)
            )
        })
        .collect();
    let sql = format!(
        "SELECT m.s, t.{key} IS NULL, ARRAY[{checks}]::bool[]
         FROM jsonb_to_recordset($1::text::jsonb) AS m(s text, k text, v jsonb)
         LEFT JOIN {table} t ON t.{key} = m.k::{key_type}",
        checks = if checks.is_empty() {
            "false".into()
        } else {
            checks.join(", ")
        },
        table = target.sql_name,
        key_type = target.type_of(&m.pair.target_key),
    );
    let rows = p
        .clients
        .1
        .query(&sql, &[&serde_json::Value::Array(payload).to_string()])
        .await
        .sql(p.names.1, format!("comparing {}", m.t.name))?;
    let mut out = BTreeMap::new();
    for r in rows {
        let key: String = r.get(0);
        if r.get::<_, bool>(1) {
            out.insert(vec![key], Difference::MissingOnSecond);
            continue;
        }
        let differs: Vec<bool> = r.get(2);
        let cols: Vec<String> = columns
            .iter()
            .zip(differs)
            .filter(|(_, d)| *d)
            .map(|(c, _)| c.clone())
            .collect();
        if !cols.is_empty() {
            out.insert(vec![key], Difference::Mismatched(cols));
        }
    }
    Ok(out)
}

/// Rows of the second node (all, or those with keys `only`) that no first-node row
/// pairs with; returns how many rows it read and those, by the second node's key.
async fn missing_on_first(
    p: &Pair<'_>,
    m: &MappedTable,
    only: Option<&[String]>,
) -> Result<(i64, BTreeMap<Vec<String>, Difference>), VerifyError> {
    let target = &m.t.target;
    let key = quote_ident(&m.pair.target_key);
    let filter = match only {
        Some(_) => format!(" WHERE t.{key}::text = ANY($2)"),
        None => String::new(),
    };
    let sql = format!(
        "SELECT t.{key}::text, kp.key_a FROM {} t
         LEFT JOIN duplex.key_pairs kp ON kp.table_name = $1 AND kp.key_b = t.{key}::text{filter}",
        target.sql_name
    );
    let label = &m.pair.label;
    let rows = match only {
        Some(keys) => p.clients.1.query(&sql, &[label, &keys]).await,
        None => p.clients.1.query(&sql, &[label]).await,
    }
    .sql(p.names.1, format!("reading the keys of {}", m.t.name))?;
    let mut out = BTreeMap::new();
    let mut paired: Vec<(String, String)> = Vec::new();
    let mut unpaired = Vec::new();
    for r in &rows {
        let b: String = r.get(0);
        match r.get::<_, Option<String>>(1) {
            None => unpaired.push(b),
            Some(a) => paired.push((a, b)),
        }
    }
    // A row the first node took from here is paired there first; its pairing may
    // still be on its way here.
    let (a_table, a_key) = (&m.t.source_sql_name, &m.pair.source_key);
    let there = taken(
        p.clients.0,
        p.names.0,
        true,
        &m.pair.label,
        &unpaired,
        a_table,
        a_key,
    )
    .await?;
    for b in unpaired.into_iter().filter(|b| !there.contains(b)) {
        out.insert(vec![b], Difference::MissingOnFirst);
    }
    let present = present_on_first(p.clients.0, p.names.0, m, &paired).await?;
    for (a, b) in paired {
        if !present.contains(&a) {
            out.insert(vec![b], Difference::MissingOnFirst);
        }
    }
    Ok((rows.len() as i64, out))
}

/// Which of the paired first-node keys have a row there.
async fn present_on_first(
    client: &Client,
    node: &str,
    m: &MappedTable,
    paired: &[(String, String)],
) -> Result<HashSet<String>, VerifyError> {
    let mut present = HashSet::new();
    let (k, ty) = &m.t.key[0];
    let sql = format!(
        "SELECT {k}::text FROM {} WHERE {k} = ANY($1::text[]::{ty}[])",
        m.t.source_sql_name,
        k = quote_ident(k),
    );
    for batch in paired.chunks(10_000) {
        let keys: Vec<&str> = batch.iter().map(|(a, _)| a.as_str()).collect();
        let rows = client
            .query(&sql, &[&keys])
            .await
            .sql(node, format!("reading the keys of {}", m.t.name))?;
        present.extend(rows.iter().map(|r| r.get::<_, String>(0)));
    }
    Ok(present)
}

/// `--repair` of a mapped table: each differing row is copied through the mapping
/// from the node that has it (both ways for a mismatch), under last-writer-wins, in
/// the configured directions only. Syncing both ways, a row then still missing on one
/// node lost to a tombstone there: the delete wins, and the row is deleted where it
/// remains, as the application would delete it. One way, nothing is deleted: the
/// source is never written, and the source's tombstones are keyed in its own schema,
/// so a row only on the target is left and reported. Returns how many keys were
/// repaired.
pub(crate) async fn repair(
    cfg: &Config,
    p: &Pair<'_>,
    tc: &TableConfig,
    found: &BTreeMap<Vec<String>, Difference>,
) -> Result<usize, VerifyError> {
    if found.is_empty() {
        return Ok(0);
    }
    let m = MappedTable::describe(p, tc).await?;
    let first_keys: Vec<Vec<String>> = found
        .iter()
        .filter(|(_, d)| **d != Difference::MissingOnFirst)
        .map(|(k, _)| k.clone())
        .collect();
    let mismatched: Vec<String> = found
        .iter()
        .filter(|(_, d)| matches!(d, Difference::Mismatched(_)))
        .filter_map(|(k, _)| k.first().cloned())
        .collect();
    let mut second_keys: Vec<Vec<String>> = found
        .iter()
        .filter(|(_, d)| **d == Difference::MissingOnFirst)
        .map(|(k, _)| k.clone())
        .collect();
    let paired = m
        .pairings(p)
        .lookup(&m.pair.label, &mismatched)
        .await
        .map_err(|e| VerifyError::Mapping(e.to_string()))?;
    second_keys.extend(paired.into_values().map(|k| vec![k]));
    let back = Direction {
        from: m.dir.to.clone(),
        to: m.dir.from.clone(),
    };
    let directions = cfg.directions().unwrap_or_default();
    let flows = |d: &Direction| directions.contains(d);
    if flows(&m.dir) {
        let mut forth = crate::snapshot::copy::CopyWorker::connect(cfg, &m.dir, 0).await?;
        forth.copy_mapped_keys(&m.t, &first_keys).await?;
    }
    if flows(&back) {
        let t_back = CopyTable::describe(p.clients.1, p.clients.0, &back, tc).await?;
        let mut backward = crate::snapshot::copy::CopyWorker::connect(cfg, &back, 0).await?;
        backward.copy_mapped_keys(&t_back, &second_keys).await?;
    }
    if !(flows(&m.dir) && flows(&back)) {
        return Ok(found.len());
    }
    // What the copies could not settle: deletes that won. Each copy's target made
    // the pairing of a row it took, so it is asked.
    let on_second: Vec<String> = first_keys
        .iter()
        .filter_map(|k| k.first().cloned())
        .collect();
    let taken_by_second = taken(
        p.clients.1,
        p.names.1,
        false,
        &m.pair.label,
        &on_second,
        &m.t.sql_name,
        &m.pair.target_key,
    )
    .await?;
    let on_first: Vec<String> = found
        .iter()
        .filter(|(_, d)| **d == Difference::MissingOnFirst)
        .filter_map(|(k, _)| k.first().cloned())
        .collect();
    let taken_by_first = taken(
        p.clients.0,
        p.names.0,
        true,
        &m.pair.label,
        &on_first,
        &m.t.source_sql_name,
        &m.pair.source_key,
    )
    .await?;
    for (keys, taken, client, node, t, k) in [
        (
            &on_second,
            &taken_by_second,
            p.clients.0,
            p.names.0,
            &m.t.source_sql_name,
            &m.pair.source_key,
        ),
        (
            &on_first,
            &taken_by_first,
            p.clients.1,
            p.names.1,
            &m.t.sql_name,
            &m.pair.target_key,
        ),
    ] {
        for value in keys.iter().filter(|v| !taken.contains(*v)) {
            client
                .execute(
                    &format!("DELETE FROM {t} WHERE {}::text = $1", quote_ident(k)),
                    &[value],
                )
                .await
                .sql(
                    node,
                    format!("deleting a row of {} whose delete won", tc.name),
                )?;
        }
    }
    Ok(found.len())
}

/// Which of the other node's `keys` have a row on this node (`client`), through this
/// node's pairings; `is_a`: this node's keys are `key_a`.
async fn taken(
    client: &Client,
    node: &str,
    is_a: bool,
    label: &str,
    keys: &[String],
    sql_name: &str,
    key: &str,
) -> Result<HashSet<String>, VerifyError> {
    if keys.is_empty() {
        return Ok(HashSet::new());
    }
    let pairings = Pairings {
        client,
        node,
        target_is_a: is_a,
    };
    let paired = pairings
        .lookup(label, keys)
        .await
        .map_err(|e| VerifyError::Mapping(e.to_string()))?;
    let mine: Vec<&str> = paired.values().map(String::as_str).collect();
    let rows = client
        .query(
            &format!(
                "SELECT {k}::text FROM {sql_name} WHERE {k}::text = ANY($1)",
                k = quote_ident(key)
            ),
            &[&mine],
        )
        .await
        .sql(node, format!("reading the keys of {label}"))?;
    let present: HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
    Ok(paired
        .into_iter()
        .filter(|(_, mine)| present.contains(mine))
        .map(|(other, _)| other)
        .collect())
}
