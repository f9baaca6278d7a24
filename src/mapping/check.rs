//! `duplex check` for mapped tables: the mapping against both live schemas (tables,
//! key columns and their sequences, every column carried or defaulted, types that
//! cast, references that match the referenced key's type), and `--explain`, which
//! prints what a row of each node becomes on the other.

use super::convert::Convert;
use super::pair::{NewKey, PairMap};
use crate::config::{Config, Direction, TableConfig};
use crate::pg::sql::quote_ident;
use crate::pg::table::TargetTable;
use std::collections::BTreeMap;
use tokio_postgres::Client;

/// Problems of every mapped table, as lines naming node, table and column.
pub async fn problems(cfg: &Config, clients: &BTreeMap<String, Client>) -> Vec<String> {
    let mut out = Vec::new();
    for tc in cfg.tables.iter().filter(|t| t.is_mapped()) {
        for dir in cfg.directions().unwrap_or_default() {
            let (Some(src), Some(dst)) = (clients.get(&dir.from), clients.get(&dir.to)) else {
                continue;
            };
            match direction_problems(cfg, tc, &dir, src, dst).await {
                Ok(p) => out.extend(p),
                Err(e) => out.push(e),
            }
        }
    }
    out
}

async fn direction_problems(
    cfg: &Config,
    tc: &TableConfig,
    dir: &Direction,
    src: &Client,
    dst: &Client,
) -> Result<Vec<String>, String> {
    let pair = PairMap::load(tc, dir, dst)
        .await
        .map_err(|e| e.to_string())?;
    let (s, d) = tables(tc, dir, src, dst).await?;
    let mut out = Vec::new();
    let at =
        |node: &str, t: &str, c: &str| format!("mapped table {}: node {node}: {t}.{c}", tc.name);
    for c in s
        .columns
        .iter()
        .filter(|c| !c.generated && c.name != pair.source_key)
    {
        let Some((target, convert)) = carried(&pair, &c.name) else {
            continue;
        };
        let Some(tcol) = d.column(&target) else {
            continue;
        };
        if let Some(r) = pair.rules.get(&c.name).and_then(|r| r.references.as_ref()) {
            let referenced = cfg.tables.iter().find(|t| &t.name == r);
            let key_type = match referenced.and_then(|t| t.key.get(&dir.to)) {
                Some(k) => referenced_key_type(dst, referenced.unwrap_or(tc), &dir.to, k).await?,
                None => None,
            };
            if key_type.as_deref() != Some(tcol.type_sql.as_str()) {
                out.push(format!(
                    "{}: references {r}, whose key on node {} is {}, not {}",
                    at(&dir.to, &d.name, &target),
                    dir.to,
                    key_type.as_deref().unwrap_or("unknown"),
                    tcol.type_sql
                ));
            }
            continue;
        }
        if !casts(dst, &c.type_sql, &tcol.type_sql, convert).await? {
            out.push(format!(
                "{}: type {} on node {} does not cast to {} here",
                at(&dir.to, &d.name, &target),
                c.type_sql,
                dir.from,
                tcol.type_sql
            ));
        }
    }
    // A target column nothing feeds gets its default on insert: it needs one.
    for col in uncarried_target_columns(&pair, &s, &d) {
        let required: bool = dst
            .query_one(
                "SELECT a.attnotnull AND NOT a.atthasdef AND a.attidentity = ''
                 FROM pg_attribute a WHERE a.attrelid = $1::text::regclass AND a.attname = $2",
                &[&d.sql_name, &col],
            )
            .await
            .map_err(|e| e.to_string())?
            .get(0);
        if required {
            out.push(format!(
                "{}: NOT NULL without a default, and no column of node {} maps to it; map one in columns or give it a default",
                at(&dir.to, &d.name, &col),
                dir.from
            ));
        }
    }
    Ok(out)
}

/// Both nodes' tables of `tc`.
async fn tables(
    tc: &TableConfig,
    dir: &Direction,
    src: &Client,
    dst: &Client,
) -> Result<(TargetTable, TargetTable), String> {
    Ok((
        load(tc, src, &dir.from).await?,
        load(tc, dst, &dir.to).await?,
    ))
}

async fn load(tc: &TableConfig, c: &Client, node: &str) -> Result<TargetTable, String> {
    TargetTable::load(c, tc, node)
        .await
        .map_err(|e| e.to_string())?
        .ok_or(format!(
            "mapped table {}: table {} does not exist on node {node}",
            tc.name,
            tc.name_on(node)
        ))
}

/// The target column a source column goes to, and its conversion.
fn carried<'p>(pair: &'p PairMap, col: &str) -> Option<(String, Option<&'p Convert>)> {
    match pair.rules.get(col) {
        Some(r) => Some((r.target.clone(), Some(&r.convert))),
        None => pair
            .target_columns
            .iter()
            .any(|c| c == col)
            .then(|| (col.to_string(), None)),
    }
}

fn uncarried_target_columns(pair: &PairMap, s: &TargetTable, d: &TargetTable) -> Vec<String> {
    d.columns
        .iter()
        .filter(|c| !c.generated && c.name != pair.target_key)
        .filter(|c| {
            !s.columns
                .iter()
                .filter(|sc| sc.name != pair.source_key)
                .any(|sc| carried(pair, &sc.name).is_some_and(|(t, _)| t == c.name))
        })
        .map(|c| c.name.clone())
        .collect()
}

async fn referenced_key_type(
    dst: &Client,
    tc: &TableConfig,
    node: &str,
    key: &str,
) -> Result<Option<String>, String> {
    let t = TargetTable::load(dst, tc, node)
        .await
        .map_err(|e| e.to_string())?;
    Ok(t.and_then(|t| t.column(key).map(|c| c.type_sql.clone())))
}

/// Whether a value of `from` (a source type) lands in a `to` column: the same type,
/// text on either side, a conversion that yields numbers or mapped text, or a cast
/// PostgreSQL knows.
async fn casts(
    dst: &Client,
    from: &str,
    to: &str,
    convert: Option<&Convert>,
) -> Result<bool, String> {
    let base = |t: &str| t.split('(').next().unwrap_or(t).trim().to_string();
    let texty = |t: &str| ["text", "character varying", "character"].contains(&base(t).as_str());
    if base(from) == base(to)
        || texty(from)
        || texty(to)
        || matches!(convert, Some(Convert::Values(_)))
    {
        return Ok(true);
    }
    let row = dst
        .query_one(
            "SELECT to_regtype($1) IS NOT NULL AND to_regtype($2) IS NOT NULL
                    AND (EXISTS (SELECT 1 FROM pg_cast WHERE castsource = to_regtype($1) AND casttarget = to_regtype($2))
                         OR to_regtype($1) = to_regtype($2))",
            &[&base(from), &base(to)],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

/// `duplex check --explain T`: what a row of each node becomes on the other.
pub async fn explain(
    cfg: &Config,
    table: &str,
    clients: &BTreeMap<String, Client>,
) -> Result<String, String> {
    let tc = cfg
        .tables
        .iter()
        .find(|t| t.name == table || cfg.nodes.keys().any(|n| t.name_on(n) == table))
        .ok_or(format!("table {table} is not in the config's [[tables]]"))?;
    let mut out = String::new();
    for dir in cfg.directions().map_err(|e| e.to_string())? {
        let (Some(src), Some(dst)) = (clients.get(&dir.from), clients.get(&dir.to)) else {
            continue;
        };
        out.push_str(&explain_direction(tc, &dir, src, dst).await?);
    }
    Ok(out)
}

async fn explain_direction(
    tc: &TableConfig,
    dir: &Direction,
    src: &Client,
    dst: &Client,
) -> Result<String, String> {
    let (s, d) = tables(tc, dir, src, dst).await?;
    let mut out = format!("{} on {} -> {} on {}\n", s.name, dir.from, d.name, dir.to);
    if !tc.is_mapped() {
        out.push_str("  not mapped: every column crosses under its name, unchanged\n");
        return Ok(out);
    }
    let pair = PairMap::load(tc, dir, dst)
        .await
        .map_err(|e| e.to_string())?;
    out.push_str(&format!(
        "  key {} -> {}: the pairing in duplex.key_pairs; a row new to {} gets {}\n",
        pair.source_key,
        pair.target_key,
        dir.to,
        match &pair.new_key {
            NewKey::Derive { from, matching, .. } if matching.is_empty() =>
                format!("UUIDv5(namespace, {})", from.join(", ")),
            NewKey::Derive { from, matching, .. } => format!(
                "the key of the unpaired row with the same {}, else UUIDv5(namespace, {})",
                matching
                    .iter()
                    .map(|(_, t)| t.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                from.join(", ")
            ),
            NewKey::Allocate { sequence, matching } if matching.is_empty() =>
                format!("the next value of {sequence}"),
            NewKey::Allocate { sequence, matching } => format!(
                "the key of the row with the same {}, else the next value of {sequence}",
                matching
                    .iter()
                    .map(|(_, t)| t.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    ));
    let mut dropped = Vec::new();
    for c in s
        .columns
        .iter()
        .filter(|c| !c.generated && c.name != pair.source_key)
    {
        let Some((target, convert)) = carried(&pair, &c.name) else {
            dropped.push(c.name.clone());
            continue;
        };
        let tty = d.type_of(&target).to_string();
        let how = match (
            pair.rules.get(&c.name).and_then(|r| r.references.as_ref()),
            convert,
        ) {
            (Some(r), _) => format!("the {} key of {r}'s row, through its pairing", dir.to),
            (None, Some(Convert::Shift { shift, .. })) => format!("x 10^{shift}"),
            (None, Some(Convert::Values(m))) => {
                let mut pairs: Vec<String> = m.iter().map(|(a, b)| format!("{a} -> {b}")).collect();
                pairs.sort();
                pairs.join(", ")
            }
            _ if c.type_sql.starts_with("timestamp")
                && tty.starts_with("timestamp")
                && c.type_sql != tty =>
            {
                "the same instant, as UTC".into()
            }
            _ => "as is".into(),
        };
        out.push_str(&format!(
            "  {} ({}) -> {} ({}): {how}\n",
            c.name, c.type_sql, target, tty
        ));
    }
    if !dropped.is_empty() {
        out.push_str(&format!(
            "  not carried to {}: {}\n",
            dir.to,
            dropped.join(", ")
        ));
    }
    let defaulted = uncarried_target_columns(&pair, &s, &d);
    if !defaulted.is_empty() {
        out.push_str(&format!(
            "  set by their default on {}: {}\n",
            dir.to,
            defaulted.join(", ")
        ));
    }
    out.push_str(&sample(&pair, &s, src, dir).await?);
    Ok(out)
}

/// The source's first row and what it becomes.
async fn sample(
    pair: &PairMap,
    s: &TargetTable,
    src: &Client,
    dir: &Direction,
) -> Result<String, String> {
    let cols: Vec<String> = s
        .columns
        .iter()
        .filter(|c| !c.generated)
        .map(|c| {
            format!(
                "CASE WHEN {0} IS NULL THEN NULL ELSE concat({0}) END",
                quote_ident(&c.name)
            )
        })
        .collect();
    let row = src
        .query_opt(
            &format!(
                "SELECT {} FROM {} ORDER BY {} LIMIT 1",
                cols.join(", "),
                s.sql_name,
                quote_ident(&pair.source_key)
            ),
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    let Some(row) = row else {
        return Ok(format!("  (no row on {} to show)\n", dir.from));
    };
    let names: Vec<&str> = s
        .columns
        .iter()
        .filter(|c| !c.generated)
        .map(|c| c.name.as_str())
        .collect();
    let mut from = Vec::new();
    let mut to = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let v: Option<String> = row.get(i);
        from.push(format!("{name}={}", v.as_deref().unwrap_or("NULL")));
        if *name == pair.source_key {
            to.push(format!("{}=<paired key>", pair.target_key));
            continue;
        }
        let Some((target, convert)) = carried(pair, name) else {
            continue;
        };
        let shown = match (
            &v,
            pair.rules.get(*name).and_then(|r| r.references.as_ref()),
        ) {
            (None, _) => "NULL".to_string(),
            (Some(v), Some(r)) => format!("<{r} key paired with {v}>"),
            (Some(v), None) => match convert.map(|c| c.apply(v)) {
                Some(Ok(x)) => x,
                Some(Err(e)) => format!("<error: {e}>"),
                None => v.clone(),
            },
        };
        to.push(format!("{target}={shown}"));
    }
    Ok(format!(
        "  e.g. {} row {{{}}}\n    becomes on {} {{{}}}\n",
        dir.from,
        from.join(", "),
        dir.to,
        to.join(", ")
    ))
}
