//! The set-based writes of winning versions: one upsert per group of rows with the
//! same columns present, one delete per run, and a truncate as of its time. Each is a
//! single statement over arrays of text values cast on the target.

use super::decide::{key_arrays, params, Candidate};
use super::DeleteTimes;
use super::{TargetWriter, WriteError};
use crate::config::TableConfig;
use crate::event::{format_unix_us, ChangeEvent, Value};
use crate::pg::table::TargetTable;
use std::borrow::Cow;
use std::collections::HashSet;
use tokio_postgres::types::ToSql;

impl TargetWriter<'_> {
    /// A truncate on the source, applied as of the time the source recorded for it
    /// (else its commit time): rows not newer go, newer ones stay (foreign keys do not
    /// fire in replica mode, so referenced tables are no special case).
    pub(super) async fn truncate(
        &mut self,
        ev: &ChangeEvent,
        table: &str,
        deleted: &DeleteTimes,
    ) -> Result<(), WriteError> {
        let Some(t) = self.tables.get(table).cloned().flatten() else {
            return Ok(());
        };
        let at = deleted
            .truncated(table)
            .cloned()
            .unwrap_or_else(|| format_unix_us(ev.source.commit_ts_us));
        self.client
            .execute(&t.truncate_sql(), &[&at, &t.name, &self.dir.from])
            .await
            .map_err(self.sql(&format!("truncating {table}")))?;
        Ok(())
    }

    /// Writes the upserts in `candidates` that win under last-writer-wins (see
    /// [`TargetTable::upsert_sql`]); returns those written and those not, whose
    /// verdict the caller asks for.
    pub(super) async fn upsert(
        &self,
        events: &[Cow<'_, ChangeEvent>],
        table: &TargetTable,
        tc: Option<&TableConfig>,
        candidates: Vec<Candidate>,
    ) -> Result<(Vec<Candidate>, Vec<Candidate>), WriteError> {
        // Rows with the same columns present go in one statement (unchanged-TOAST
        // columns are left out, so the target keeps its value; so are columns the
        // target lacks, whose values are owed: see `owed`). So are the target's
        // generated columns, which it computes and refuses values for (428C9):
        // pgoutput never sends them, but an image from elsewhere may carry them (a
        // repair written by an older duplex, a replayed dead letter).
        let generated: Vec<&str> = table
            .columns
            .iter()
            .filter(|c| c.generated)
            .map(|c| c.name.as_str())
            .collect();
        let generated = &generated;
        let present = |i: usize| {
            events[i]
                .after
                .iter()
                .flat_map(|r| r.0.iter())
                .filter(move |(n, v)| {
                    *v != Value::UnchangedToast
                        && !generated.contains(&n.as_str())
                        && table.column(n).is_some()
                })
        };
        let mut groups: Vec<(Vec<&str>, Vec<Candidate>)> = Vec::new();
        for c in candidates {
            let names = || present(c.index).map(|(n, _)| n.as_str());
            match groups
                .iter_mut()
                .rev()
                .find(|(g, _)| g.iter().copied().eq(names()))
            {
                Some((_, members)) => members.push(c),
                None => groups.push((names().collect(), vec![c])),
            }
        }
        let skew = tc.and_then(|t| t.max_future_skew_ms).map(|v| v as i64);
        let (mut written, mut not_written) = (Vec::new(), Vec::new());
        for (cols, members) in groups {
            // A member's present columns are the group's, in the same order.
            let mut arrays: Vec<Vec<Option<&str>>> = (0..cols.len())
                .map(|_| Vec::with_capacity(members.len()))
                .collect();
            for c in &members {
                for (array, (_, v)) in arrays.iter_mut().zip(present(c.index)) {
                    array.push(match v {
                        Value::Text(t) => Some(t.as_str()),
                        _ => None,
                    });
                }
            }
            let mut params: Vec<&(dyn ToSql + Sync)> =
                arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
            params.push(&self.incoming_wins_ties);
            params.push(&table.name);
            params.push(&skew);
            params.push(&self.dir.from);
            let context = format!("upserting into {}", table.name);
            let returned = self
                .query_prepared(table.upsert_sql(&cols), &params, &context)
                .await?;
            if let Some(t) = self.metrics.table(&table.label) {
                t.upserts.increment(returned.len() as u64);
            }
            if returned.len() == members.len() {
                written.extend(members);
                continue;
            }
            let n = table.key.len();
            let returned: HashSet<Vec<String>> = returned
                .iter()
                .map(|r| (0..n).map(|i| r.get(i)).collect())
                .collect();
            let keys = self.key_texts(table, &members).await?;
            for (c, key) in members.into_iter().zip(keys) {
                if returned.contains(&key) {
                    written.push(c);
                } else {
                    not_written.push(c);
                }
            }
        }
        for c in &written {
            self.carry_toast(&events[c.index], table).await?;
        }
        Ok((written, not_written))
    }

    /// The candidates' keys as the target prints its key types.
    async fn key_texts(
        &self,
        table: &TargetTable,
        members: &[Candidate],
    ) -> Result<Vec<Vec<String>>, WriteError> {
        let keys = key_arrays(table.key.len(), members.iter().map(|c| &c.key));
        let rows = self
            .client
            .query(&table.key_text_sql(), &params(&keys))
            .await
            .map_err(self.sql(&format!("reading keys of {}", table.name)))?;
        Ok(rows
            .iter()
            .map(|r| (0..table.key.len()).map(|i| r.get(i)).collect())
            .collect())
    }

    pub(super) async fn delete(
        &self,
        table: &TargetTable,
        winners: &[Candidate],
    ) -> Result<(), WriteError> {
        if winners.is_empty() {
            return Ok(());
        }
        let mut keys: Vec<Vec<&str>> = vec![Vec::with_capacity(winners.len()); table.key.len()];
        for c in winners {
            for (n, v) in c.key.iter().enumerate() {
                keys[n].push(v);
            }
        }
        let ts: Vec<Option<&str>> = winners.iter().map(|c| c.ts.as_deref()).collect();
        let mut params: Vec<&(dyn ToSql + Sync)> =
            keys.iter().map(|k| k as &(dyn ToSql + Sync)).collect();
        params.push(&ts);
        params.push(&table.name);
        params.push(&self.dir.from);
        let context = format!("deleting from {}", table.name);
        self.query_prepared(table.delete_sql(), &params, &context)
            .await?;
        if let Some(t) = self.metrics.table(&table.label) {
            t.deletes.increment(winners.len() as u64);
        }
        Ok(())
    }
}
