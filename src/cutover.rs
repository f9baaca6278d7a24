//! `duplex cutover --check`: the gate before an application moves from one node to
//! the other (or back). It passes only when nothing is in flight and the data is
//! equal: every direction caught up to `--max-lag` with no halt, dead letter or
//! unfinished copy, every source's committed changes on Kafka (the status gate), and
//! then `duplex verify` clean (no persisting difference, no orphaned foreign key).
//!
//! duplex does not switch the application itself: the check is what the operator's
//! runbook (or deploy pipeline) runs before flipping it. Exit 0 pass, 1 fail, 2 when
//! the tables could not be compared.

use crate::config::Config;
use serde::Serialize;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Serialize)]
struct CheckReport<'a> {
    /// Both parts passed.
    ok: bool,
    /// Why the status gate failed (empty: every direction caught up).
    not_caught_up: &'a [String],
    verify: &'a crate::verify::Report,
}

/// Runs the status gate, then verify; prints both (JSON with `json`).
pub async fn check(cfg: &Config, max_lag_seconds: f64, settle_ms: u64, json: bool) -> ExitCode {
    let status = crate::status::collect(cfg).await;
    let not_caught_up = crate::status::failing(cfg, &status, max_lag_seconds).await;
    let settle = Duration::from_millis(settle_ms);
    let report = match crate::verify::run(cfg, None, settle, false).await {
        Ok((report, _)) => report,
        Err(e) => {
            for f in &not_caught_up {
                eprintln!("not ok: {f}");
            }
            eprintln!("error: cannot compare: {e}");
            return ExitCode::from(2);
        }
    };
    crate::verify::store_results(cfg, &report).await;
    let ok = not_caught_up.is_empty() && report.equal;
    if json {
        let out = CheckReport {
            ok,
            not_caught_up: &not_caught_up,
            verify: &report,
        };
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    } else {
        print!("{}", crate::status::render(&status));
        print!("{}", crate::verify::render(&report));
    }
    for f in &not_caught_up {
        eprintln!("not ok: {f}");
    }
    let verdict = match (not_caught_up.is_empty(), report.equal) {
        (true, true) => "ok (caught up, verify equal)",
        (false, false) => "not ok (not caught up, and the nodes differ)",
        (false, true) => "not ok (not caught up)",
        (true, false) => "not ok (the nodes differ)",
    };
    if !json {
        println!("cutover check: {verdict}");
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
