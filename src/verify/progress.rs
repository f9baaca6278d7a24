//! How far a table's comparison is: on a terminal, one line on stderr redrawn as
//! ranges finish (bar, rows, rate, ETA); otherwise a plain line every
//! [`LOG_EVERY`], for long runs under cron. The report itself goes to stdout.

use crate::snapshot::progress::{bar, human_duration};
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// How often a line is printed when stderr is not a terminal.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// How often the terminal line is redrawn at most.
const DRAW_EVERY: Duration = Duration::from_millis(200);

/// One table's comparison progress.
pub(crate) struct Meter {
    table: String,
    estimated: u64,
    rows: u64,
    started: Instant,
    shown: Option<Instant>,
    terminal: bool,
}

impl Meter {
    /// `estimated`: the rows the table is expected to hold (the larger side).
    pub(crate) fn new(table: &str, estimated: i64) -> Meter {
        Meter {
            table: table.to_string(),
            estimated: estimated.max(0) as u64,
            rows: 0,
            started: Instant::now(),
            shown: None,
            terminal: std::io::stderr().is_terminal(),
        }
    }

    /// Counts `rows` more rows compared.
    pub(crate) fn advance(&mut self, rows: i64) {
        self.rows += rows.max(0) as u64;
        let every = if self.terminal { DRAW_EVERY } else { LOG_EVERY };
        let due = match self.shown {
            None => self.started.elapsed() >= every,
            Some(at) => at.elapsed() >= every,
        };
        if due {
            self.shown = Some(Instant::now());
            self.show();
        }
    }

    fn show(&self) {
        let line = self.line();
        let mut err = std::io::stderr().lock();
        let _ = if self.terminal {
            write!(err, "\r\x1b[2K{line}")
        } else {
            writeln!(err, "{line}")
        };
        let _ = err.flush();
    }

    /// Clears the terminal line once the table is done.
    pub(crate) fn finish(&self) {
        if self.terminal && self.shown.is_some() {
            let _ = write!(std::io::stderr().lock(), "\r\x1b[2K");
        }
    }

    fn line(&self) -> String {
        // The estimate is the statistics': never show more than 100 %.
        let total = self.estimated.max(self.rows);
        let pct = if total == 0 {
            100.0
        } else {
            self.rows as f64 * 100.0 / total as f64
        };
        let secs = self.started.elapsed().as_secs_f64();
        let rate = if secs > 0.0 {
            self.rows as f64 / secs
        } else {
            0.0
        };
        let eta = if rate > 0.0 {
            human_duration(total.saturating_sub(self.rows) as f64 / rate)
        } else {
            "?".to_string()
        };
        format!(
            "verify {:<24} {} {pct:>5.1}% {}/{} rows, {rate:.0} rows/s, ETA {eta}",
            self.table,
            bar(pct),
            self.rows,
            total,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_never_passes_100_percent_and_says_rows() {
        let mut m = Meter::new("public.t", 100);
        m.terminal = false;
        m.rows = 150;
        let line = m.line();
        assert!(line.contains("100.0%"), "{line}");
        assert!(line.contains("150/150 rows"), "{line}");
        m.rows = 50;
        m.estimated = 200;
        assert!(m.line().contains(" 25.0%"), "{}", m.line());
    }
}
