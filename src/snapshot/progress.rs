//! How far a direction's copy is, per table: rows, rate and ETA, for people and for
//! Prometheus.
//!
//! Copy workers report each finished chunk here. A reporter task draws one line per
//! table on stderr when it is a terminal (redrawn every second), and otherwise logs a
//! line per table every [`LOG_EVERY`], like cargo does; the metrics are set on every
//! report.

use crate::metrics::SnapshotMetrics;
use crate::runtime::Stop;
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often progress is logged when stderr is not a terminal.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// How often the terminal lines are redrawn.
const DRAW_EVERY: Duration = Duration::from_secs(1);

struct TableProgress {
    table: String,
    estimated: u64,
    rows: u64,
    chunks_left: u64,
    /// When this run started copying the table; rows copied by earlier runs count
    /// toward the total but not toward the rate.
    started: Option<Instant>,
    rows_at_start: u64,
    metrics: SnapshotMetrics,
}

impl TableProgress {
    fn line(&self, direction: &str) -> String {
        let pct = if self.estimated == 0 {
            100.0
        } else {
            (self.rows as f64 * 100.0 / self.estimated as f64).min(100.0)
        };
        let elapsed = self.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
        let rate = if elapsed > 0.0 {
            (self.rows - self.rows_at_start) as f64 / elapsed
        } else {
            0.0
        };
        let eta = if self.chunks_left == 0 {
            "done".to_string()
        } else if rate > 0.0 {
            let left = self.estimated.saturating_sub(self.rows) as f64 / rate;
            format!("ETA {}", human_duration(left))
        } else {
            "ETA ?".to_string()
        };
        format!(
            "snapshot {direction} {:<24} {} {:>5.1}% {}/{} rows, {:.0} rows/s, {}",
            self.table,
            bar(pct),
            pct,
            self.rows,
            self.estimated,
            rate,
            eta
        )
    }
}

/// A direction's copy progress, shared by its workers and its reporter.
pub(crate) struct Progress {
    direction: String,
    tables: Mutex<Vec<TableProgress>>,
}

impl Progress {
    pub(crate) fn new(direction: &str) -> Progress {
        Progress {
            direction: direction.to_string(),
            tables: Mutex::new(Vec::new()),
        }
    }

    /// Declares a table's copy: its estimated rows, chunks, and what earlier runs
    /// already copied.
    pub(crate) fn table(&self, table: &str, estimated: u64, chunks: u64, copied: (u64, u64)) {
        let metrics = SnapshotMetrics::new(&self.direction, table);
        metrics.rows_estimated.set(estimated as f64);
        metrics
            .chunks_remaining
            .set((chunks - copied.0.min(chunks)) as f64);
        if let Ok(mut t) = self.tables.lock() {
            t.push(TableProgress {
                table: table.to_string(),
                estimated,
                rows: copied.1,
                chunks_left: chunks - copied.0.min(chunks),
                started: None,
                rows_at_start: copied.1,
                metrics,
            });
        }
    }

    /// A worker starts on `table`.
    pub(crate) fn started(&self, table: &str) {
        self.with(table, |t| {
            t.started.get_or_insert_with(Instant::now);
        });
    }

    /// A chunk of `table` with `rows` rows committed.
    pub(crate) fn chunk_copied(&self, table: &str, rows: u64) {
        self.with(table, |t| {
            t.rows += rows;
            // More rows than estimated: the table grew during the copy.
            t.estimated = t.estimated.max(t.rows);
            t.chunks_left = t.chunks_left.saturating_sub(1);
            t.metrics.rows.increment(rows);
            t.metrics.rows_estimated.set(t.estimated as f64);
            t.metrics.chunks_remaining.set(t.chunks_left as f64);
        });
    }

    fn with(&self, table: &str, f: impl FnOnce(&mut TableProgress)) {
        if let Ok(mut tables) = self.tables.lock() {
            if let Some(t) = tables.iter_mut().find(|t| t.table == table) {
                f(t);
            }
        }
    }

    fn lines(&self, only_active: bool) -> Vec<String> {
        let Ok(tables) = self.tables.lock() else {
            return Vec::new();
        };
        tables
            .iter()
            .filter(|t| !only_active || (t.started.is_some() && t.chunks_left > 0))
            .map(|t| t.line(&self.direction))
            .collect()
    }

    /// Rows copied and total chunks left, over every table.
    pub(crate) fn totals(&self) -> (u64, u64) {
        let Ok(tables) = self.tables.lock() else {
            return (0, 0);
        };
        tables
            .iter()
            .fold((0, 0), |(r, c), t| (r + t.rows, c + t.chunks_left))
    }

    /// Reports until `done` turns true, then prints the final lines once.
    pub(crate) async fn report(&self, done: Stop) {
        let terminal = std::io::stderr().is_terminal();
        let mut tick = tokio::time::interval(if terminal { DRAW_EVERY } else { LOG_EVERY });
        tick.tick().await;
        let mut drawn = 0;
        loop {
            tokio::select! {
                _ = done.requested() => break,
                _ = tick.tick() => {
                    if terminal {
                        drawn = self.draw(drawn);
                    } else {
                        for line in self.lines(true) {
                            tracing::info!("{line}");
                        }
                    }
                }
            }
        }
        if terminal {
            self.draw(drawn);
            eprintln!();
        } else {
            for line in self.lines(false) {
                tracing::info!("{line}");
            }
        }
    }

    /// Redraws the table lines in place of the `drawn` previous ones.
    fn draw(&self, drawn: usize) -> usize {
        let lines = self.lines(false);
        let mut err = std::io::stderr().lock();
        if drawn > 0 {
            let _ = write!(err, "\x1b[{drawn}F");
        }
        for line in &lines {
            let _ = writeln!(err, "\x1b[2K{line}");
        }
        let _ = err.flush();
        lines.len()
    }
}

/// A 20-character bar for `pct` percent, in brackets.
pub(crate) fn bar(pct: f64) -> String {
    const WIDTH: usize = 20;
    let filled = ((pct.clamp(0.0, 100.0) / 100.0) * WIDTH as f64) as usize;
    format!("[{}{}]", "#".repeat(filled), " ".repeat(WIDTH - filled))
}

pub(crate) fn human_duration(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_a_clock() {
        assert_eq!(human_duration(5.2), "5s");
        assert_eq!(human_duration(125.0), "2m05s");
        assert_eq!(human_duration(7322.0), "2h02m");
    }

    #[test]
    fn a_line_shows_rows_percentage_and_eta() {
        let p = Progress::new("a_to_b");
        p.table("public.t", 1000, 4, (1, 250));
        p.started("public.t");
        p.chunk_copied("public.t", 250);
        let line = &p.lines(false)[0];
        assert!(line.contains("500/1000 rows"), "{line}");
        assert!(line.contains("50.0%"), "{line}");
        assert!(line.contains("ETA"), "{line}");
        assert_eq!(p.totals(), (500, 2));
    }
}
