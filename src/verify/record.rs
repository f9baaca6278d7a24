//! Verify results for Prometheus: `duplex verify` is a short-lived command that no
//! scraper sees, so each run writes its per-table result into `duplex.verify_results`
//! on both nodes, and the daemon reads it back into the `duplex_verify_*` metrics.
//!
//! `verify → duplex.verify_results (both nodes) → daemon's export task → /metrics`.
//! The export reads every node and keeps the newest result per table, so a run that
//! reached only one node still shows.

use super::Report;
use crate::config::Config;
use crate::metrics::VerifyMetrics;
use crate::pg::node;
use crate::runtime::Stop;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// How often the daemon reads the recorded results.
const EXPORT_EVERY: Duration = Duration::from_secs(10);

/// Records each table's result on every node that has duplex's schema. A node that
/// cannot take it is reported on stderr: the comparison itself stands.
pub(crate) async fn store(cfg: &Config, report: &Report) {
    for name in cfg.nodes.keys() {
        if let Err(e) = store_on(cfg, name, report).await {
            eprintln!("warning: verify results not recorded on node {name}: {e}");
        }
    }
}

async fn store_on(cfg: &Config, name: &str, report: &Report) -> Result<(), String> {
    let client = node::connect(cfg, name, "verify results")
        .await
        .map_err(|e| e.to_string())?;
    let set_up: bool = client
        .query_one(
            "SELECT to_regclass('duplex.verify_results') IS NOT NULL",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    if !set_up {
        // Not set up yet (duplex setup creates the table): nothing to export from.
        return Ok(());
    }
    for t in &report.tables {
        let rows = t.rows.values().max().copied().unwrap_or(0);
        let orphans: i64 = t.orphans.iter().map(|o| o.rows).sum();
        // A key that never settled is not known to be equal: it counts.
        let differences = (t.differences.len() + t.unsettled.len()) as i64;
        client
            .execute(
                "INSERT INTO duplex.verify_results AS r
                   (table_name, finished_at, rows_checked, rows_checked_total, differences, orphans)
                 VALUES ($1, now(), $2, $2, $3, $4)
                 ON CONFLICT (table_name) DO UPDATE SET finished_at = now(),
                   rows_checked = $2, rows_checked_total = r.rows_checked_total + $2,
                   differences = $3, orphans = $4",
                &[&t.table, &rows, &differences, &orphans],
            )
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// One table's newest recorded result.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Recorded {
    finished_at: f64,
    rows_checked_total: i64,
    differences: i64,
}

/// The daemon's task: sets the verify metrics of every configured table from the
/// recorded results (0 until a first run) until `stop`.
pub async fn export(cfg: Arc<Config>, stop: Stop) {
    let metrics: BTreeMap<String, VerifyMetrics> = cfg
        .tables
        .iter()
        .map(|t| (t.name.clone(), VerifyMetrics::new(&t.name)))
        .collect();
    loop {
        let newest = read_newest(&cfg).await;
        for (table, r) in newest {
            if let Some(m) = metrics.get(&table) {
                m.rows_checked.absolute(r.rows_checked_total.max(0) as u64);
                m.differences.set(r.differences as f64);
                m.last_run.set(r.finished_at);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(EXPORT_EVERY) => {}
            _ = stop.requested() => return,
        }
    }
}

async fn read_newest(cfg: &Config) -> BTreeMap<String, Recorded> {
    let mut newest: BTreeMap<String, Recorded> = BTreeMap::new();
    for name in cfg.nodes.keys() {
        let rows = match read_on(cfg, name).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::debug!(node = %name, error = %e, "verify results not read");
                continue;
            }
        };
        for (table, r) in rows {
            let keep = newest
                .get(&table)
                .is_none_or(|n| n.finished_at < r.finished_at);
            if keep {
                newest.insert(table, r);
            }
        }
    }
    newest
}

async fn read_on(cfg: &Config, name: &str) -> Result<Vec<(String, Recorded)>, String> {
    let client = node::connect(cfg, name, "verify metrics")
        .await
        .map_err(|e| e.to_string())?;
    let rows = client
        .query(
            "SELECT table_name, extract(epoch FROM finished_at)::float8, rows_checked_total,
                    differences + orphans
             FROM duplex.verify_results",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                Recorded {
                    finished_at: r.get(1),
                    rows_checked_total: r.get(2),
                    differences: r.get(3),
                },
            )
        })
        .collect())
}
