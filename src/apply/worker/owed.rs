//! Between transactions, the worker brings over the values owed to the target (see
//! `crate::lww::owed`): once a column the source's rows carried exists on the target,
//! the rows the source changed since the debt began give it their values.

use super::Worker;
use crate::apply::error::ApplyError;
use crate::pg::node;
use std::time::{Duration, Instant};

/// How often the worker looks whether an owed column exists on the target now.
pub(super) const OWED_CHECK_EVERY: Duration = Duration::from_secs(2);

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
        let (ready, all) = self.writer.owed_settleable().await?;
        self.owed_pending = all > 0;
        // Those settled below are owed no more.
        self.metrics.owed_columns.set((all - ready.len()) as f64);
        if ready.is_empty() {
            return Ok(());
        }
        let source = node::connect(self.cfg, &self.dir.from, "owed values").await?;
        for owed in ready {
            let started = Instant::now();
            let values = self.writer.settle_owed(&source, &owed).await?;
            tracing::info!(direction = %self.dir, table = %owed.table, column = %owed.column,
                since = %owed.since, values, took_ms = started.elapsed().as_millis() as u64,
                "the target has the column now: brought over the values owed");
        }
        // Look again at the next check: a debt may have been recorded meanwhile.
        self.owed_pending = true;
        Ok(())
    }
}
