//! `duplex verify`: whether both nodes hold the same rows in every configured table,
//! while writes go on, for a cutover decision.
//!
//! Per table: the key space is cut as the initial sync cuts it, both nodes hash each
//! range inside PostgreSQL at once, and only ranges that differ are cut finer and
//! finally fetched ([`compare`]); equal tables cost one hashing scan per node and a
//! few bytes per range on the wire. A difference may be a change still in flight:
//! each one is read again until it has stayed the same for the settle window (the
//! applying directions' current lag plus `--settle-ms`), and only those are reported,
//! with how long they lasted; a key still changing when verify gives up on it is
//! reported as unsettled ([`settle`]). Orphaned foreign keys are counted on each node
//! ([`orphans`]). Each run's result is recorded on the nodes for the daemon's metrics
//! ([`record`]).

mod compare;
mod mapped;
mod orphans;
mod progress;
mod record;
mod repair;
mod settle;

pub use record::export as export_metrics;
pub(crate) use record::store as store_results;

use crate::config::{Config, Direction};
use crate::pg::node::{self, NodeError};
use crate::snapshot::table::CopyTable;
use crate::snapshot::SnapshotError;
use compare::{Difference, Pair, RowHash};
use serde::Serialize;
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

/// Rows per range of the first pass: small enough that a range holding one
/// difference costs little to cut down, large enough that a range costs more in
/// hashing than in round trips.
const RANGE_ROWS: i64 = 10_000;

/// Errors that leave a table uncompared.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Table(#[from] SnapshotError),
    #[error("table {0} is not in the config's [[tables]]")]
    UnknownTable(String),
    #[error("{0}")]
    Mapping(String),
}

impl From<crate::pg::error::SqlError> for VerifyError {
    fn from(e: crate::pg::error::SqlError) -> Self {
        VerifyError::Node(NodeError::Sql(e))
    }
}

/// One key that differs.
#[derive(Debug, Serialize)]
pub struct KeyDifference {
    /// The key's values, as text, in key order.
    pub key: Vec<String>,
    /// `missing_on_<node>` or `mismatched`.
    pub kind: String,
    /// The columns that differ, for `mismatched`.
    pub columns: Vec<String>,
    /// How long the difference stayed unchanged before it was reported.
    pub for_seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct TableReport {
    pub table: String,
    /// Rows on each node, in config order.
    pub rows: BTreeMap<String, i64>,
    pub chunks: usize,
    /// Ranges small enough that were compared row by row.
    pub ranges_compared_by_row: usize,
    pub differences: Vec<KeyDifference>,
    /// Keys that differed at every look but kept changing until verify gave up on
    /// them (`for_seconds`: how long they were watched): not known to be equal.
    pub unsettled: Vec<KeyDifference>,
    pub orphans: Vec<orphans::Orphans>,
}

impl TableReport {
    /// Differing keys, settled or not, and orphaned rows' foreign keys.
    pub fn findings(&self) -> usize {
        self.differences.len() + self.unsettled.len() + self.orphans.len()
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub tables: Vec<TableReport>,
    /// How long a difference had to stay unchanged to be reported.
    pub settle_seconds: f64,
    /// What the settle window left out (a halted direction's lag, a lag past the
    /// cap).
    pub notes: Vec<String>,
    /// No difference, settled or not, and no orphan.
    pub equal: bool,
}

/// Compares every configured table (or `only`) between the two nodes; with
/// `repair`, makes the differing rows equal (see [`repair`]) and compares again.
/// Returns the report and how many keys were repaired.
pub async fn run(
    cfg: &Config,
    only: Option<&str>,
    settle: Duration,
    repair: bool,
) -> Result<(Report, usize), VerifyError> {
    let report = compare_all(cfg, only, settle).await?;
    if !repair || report.equal {
        return Ok((report, 0));
    }
    // Repairs write as duplex does: its schema and origins must exist.
    crate::snapshot::set_up_both(cfg).await?;
    let names: Vec<&String> = cfg.nodes.keys().collect();
    let (first, second) = (names[0].as_str(), names[1].as_str());
    let a = node::connect(cfg, first, "verify repair").await?;
    let b = node::connect(cfg, second, "verify repair").await?;
    let pair = Pair {
        names: (first, second),
        clients: (&a, &b),
        hash: RowHash::of((first, second), (&a, &b)).await?,
    };
    let mut repaired = 0;
    for t in &report.tables {
        let Some(tc) = cfg.tables.iter().find(|tc| tc.name == t.table) else {
            continue;
        };
        // Unsettled keys too: the merge takes the newer version, as the stream would.
        let all = || t.differences.iter().chain(&t.unsettled);
        let keys: Vec<Vec<String>> = all().map(|d| d.key.clone()).collect();
        if tc.is_mapped() {
            let missing_on_first = format!("missing_on_{first}");
            let found: BTreeMap<Vec<String>, Difference> = all()
                .map(|d| {
                    let kind = match d.kind.as_str() {
                        k if k == missing_on_first => Difference::MissingOnFirst,
                        "mismatched" => Difference::Mismatched(d.columns.clone()),
                        _ => Difference::MissingOnSecond,
                    };
                    (d.key.clone(), kind)
                })
                .collect();
            repaired += mapped::repair(cfg, &pair, tc, &found).await?;
            continue;
        }
        repaired += repair::repair(cfg, &pair, tc, &keys).await?;
    }
    Ok((compare_all(cfg, only, settle).await?, repaired))
}

async fn compare_all(
    cfg: &Config,
    only: Option<&str>,
    settle: Duration,
) -> Result<Report, VerifyError> {
    if let Some(t) = only {
        if !cfg.tables.iter().any(|tc| tc.name == t) {
            return Err(VerifyError::UnknownTable(t.to_string()));
        }
    }
    let names: Vec<&String> = cfg.nodes.keys().collect();
    let (first, second) = (names[0].as_str(), names[1].as_str());
    let a = node::connect(cfg, first, "verify").await?;
    let b = node::connect(cfg, second, "verify").await?;
    let pair = Pair {
        names: (first, second),
        clients: (&a, &b),
        hash: RowHash::of((first, second), (&a, &b)).await?,
    };
    // The lag a change may still be in flight for.
    let (window, notes) = settle::window(settle, &crate::status::collect(cfg).await.directions);
    let dir = Direction {
        from: first.to_string(),
        to: second.to_string(),
    };
    let mut tables = Vec::new();
    for tc in cfg
        .tables
        .iter()
        .filter(|tc| only.is_none_or(|t| t == tc.name))
    {
        let (found, settled) = if tc.is_mapped() {
            let m = mapped::MappedTable::describe(&pair, tc).await?;
            let found = mapped::table(&pair, &m).await?;
            let settled = settle::mapped_differences(&pair, &m, &found.differences, window).await?;
            (found, settled)
        } else {
            let t = CopyTable::describe(&a, &b, &dir, tc).await?;
            let split = crate::snapshot::split::split_at_most(&a, &dir, &t, RANGE_ROWS).await?;
            let bounds: Vec<Vec<String>> = split
                .bounds
                .iter()
                .filter_map(|b| serde_json::from_str(b).ok())
                .collect();
            let mut meter = progress::Meter::new(&tc.name, split.rows);
            let found = compare::table(&pair, &t, &bounds, &mut meter).await;
            meter.finish();
            let mut found = found?;
            let found_differences = std::mem::take(&mut found.differences);
            let settled = settle::differences(&pair, &t, found_differences, window).await?;
            (found, settled)
        };
        let mut orphans = orphans::find(&a, first, tc.name_on(first)).await?;
        orphans.extend(orphans::find(&b, second, tc.name_on(second)).await?);
        tables.push(TableReport {
            table: tc.name.clone(),
            rows: BTreeMap::from([
                (first.to_string(), found.rows.0),
                (second.to_string(), found.rows.1),
            ]),
            chunks: found.chunks,
            ranges_compared_by_row: found.ranges_fetched,
            differences: listed(settled.persisting, (first, second)),
            unsettled: listed(settled.unsettled, (first, second)),
            orphans,
        });
    }
    let equal = tables.iter().all(|t| t.findings() == 0);
    Ok(Report {
        tables,
        settle_seconds: window.as_secs_f64(),
        notes,
        equal,
    })
}

/// The report's lines for watched keys.
fn listed(keys: settle::Watched, (first, second): (&str, &str)) -> Vec<KeyDifference> {
    keys.into_iter()
        .map(|(key, (d, secs))| KeyDifference {
            key,
            kind: match &d {
                Difference::MissingOnFirst => format!("missing_on_{first}"),
                Difference::MissingOnSecond => format!("missing_on_{second}"),
                Difference::Mismatched(_) => "mismatched".into(),
            },
            columns: match d {
                Difference::Mismatched(c) => c,
                _ => Vec::new(),
            },
            for_seconds: secs,
        })
        .collect()
}

/// `duplex verify`: prints the report (JSON with `json`); exit 0 equal, 1 different,
/// 2 when a table could not be compared.
pub async fn command(
    cfg: &Config,
    table: Option<&str>,
    json: bool,
    settle_ms: u64,
    repair: bool,
) -> ExitCode {
    let settle = std::time::Duration::from_millis(settle_ms);
    match run(cfg, table, settle, repair).await {
        Ok((report, repaired)) => {
            store_results(cfg, &report).await;
            if repair {
                eprintln!("repaired {repaired} rows; compared again:");
            }
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                print!("{}", render(&report));
            }
            if report.equal {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: cannot compare: {e}");
            ExitCode::from(2)
        }
    }
}

/// Human-readable lines.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let mut total = 0;
    for t in &r.tables {
        let rows: Vec<String> = t.rows.iter().map(|(n, c)| format!("{c} on {n}")).collect();
        let mut found = Vec::new();
        if !t.differences.is_empty() {
            found.push(format!("{} differences", t.differences.len()));
        }
        if !t.unsettled.is_empty() {
            found.push(format!("{} unsettled", t.unsettled.len()));
        }
        out.push_str(&format!(
            "table {}: {} rows ({}), {} chunks, {} ranges compared row by row: {}\n",
            t.table,
            t.rows.values().max().copied().unwrap_or(0),
            rows.join(", "),
            t.chunks,
            t.ranges_compared_by_row,
            if found.is_empty() {
                "equal".to_string()
            } else {
                found.join(", ")
            }
        ));
        for (d, unsettled) in t
            .differences
            .iter()
            .map(|d| (d, false))
            .chain(t.unsettled.iter().map(|d| (d, true)))
        {
            out.push_str(&format!(
                "  {}{} {}{} ({} {:.1} s)\n",
                if unsettled { "unsettled " } else { "" },
                d.kind,
                serde_json::to_string(&d.key).unwrap_or_default(),
                if d.columns.is_empty() {
                    String::new()
                } else {
                    format!(": {}", d.columns.join(", "))
                },
                if unsettled {
                    "still changing, different at every look for"
                } else {
                    "for"
                },
                d.for_seconds
            ));
        }
        for o in &t.orphans {
            out.push_str(&format!(
                "  orphans on {}: {} rows of {} without their {} row ({})\n",
                o.node, o.rows, o.table, o.parent, o.constraint
            ));
        }
        total += t.findings();
    }
    for n in &r.notes {
        out.push_str(&format!("note: {n}\n"));
    }
    out.push_str(&if r.equal {
        "verify: equal\n".to_string()
    } else {
        format!("verify: {total} differences (unsettled included) or orphaned foreign keys\n")
    });
    out
}
