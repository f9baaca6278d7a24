//! Between transactions, the worker brings over the values owed to the target (see
//! `crate::lww::owed`): once a column the source's rows carried exists on the target,
//! the rows the source changed since the debt began give it their values.

use super::Worker;
use crate::apply::error::ApplyError;
use crate::pg::node;
use std::time::{Duration, Instant};

/// How often the worker looks whether an owed column exists on the target now.
const OWED_CHECK_EVERY: Duration = Duration::from_secs(2);

/// How often it looks whether the source still has a column still owed (dropped on
/// both nodes, nothing is owed any more).
const OWED_SOURCE_CHECK_EVERY: Duration = Duration::from_secs(30);

impl Worker<'_> {
    /// Settles every debt whose column the target has now; looks only while some
    /// debt is known (one found at the start, or one a write recorded since).
    pub(in crate::apply) async fn settle_owed(&mut self) -> Result<(), ApplyError> {
        if !self.owed_pending
            || self.txn.is_open()
            || !self.pending.is_empty()
            || Instant::now() < self.next_owed_check
        {
            return Ok(());
        }
        self.next_owed_check = Instant::now() + OWED_CHECK_EVERY;
        let debts = self.writer.owed_debts().await?;
        self.owed_pending = !debts.is_empty();
        let (ready, waiting): (Vec<_>, Vec<_>) = debts.into_iter().partition(|d| d.ready);
        // Those settled below are owed no more.
        self.metrics.owed_columns.set(waiting.len() as f64);
        let look_at_source = !waiting.is_empty() && Instant::now() >= self.next_owed_source_check;
        if ready.is_empty() && !look_at_source {
            return Ok(());
        }
        // The source may be down while the topic still feeds the target: the values
        // wait for the next look, and the apply session goes on.
        let source = match node::connect(self.cfg, &self.dir.from, "owed values").await {
            Ok(source) => source,
            Err(e) => {
                tracing::info!(direction = %self.dir, error = %e, "cannot reach the source to bring over owed values; trying again");
                return Ok(());
            }
        };
        for owed in ready {
            let started = Instant::now();
            let values = self.writer.settle_owed(&source, &owed).await?;
            tracing::info!(direction = %self.dir, table = %owed.table, column = %owed.column,
                since = %owed.since, values, took_ms = started.elapsed().as_millis() as u64,
                "the target has the column now: brought over the values owed");
        }
        if look_at_source {
            self.next_owed_source_check = Instant::now() + OWED_SOURCE_CHECK_EVERY;
            let ended = self.writer.end_dropped(&source, &waiting).await?;
            for d in &ended {
                tracing::info!(direction = %self.dir, table = %d.table, column = %d.column,
                    "the source dropped the owed column too: its values are owed no more");
            }
            for d in waiting.iter().filter(|d| !ended.contains(d)) {
                tracing::info!(direction = %self.dir, table = %d.table, column = %d.column, since = %d.since,
                    "values of a column the target lacks are still owed: add the column there and duplex brings them over");
            }
        }
        // Look again at the next check: a debt may have been recorded meanwhile.
        self.owed_pending = true;
        Ok(())
    }
}
