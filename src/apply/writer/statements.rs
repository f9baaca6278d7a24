//! The set-based writes of winning versions: one upsert per group of rows with the
//! same columns present, one delete per run, and a truncate as of its time. Each is a
//! single statement over arrays of text values cast on the target.

use super::lww::Candidate;
use super::{TargetWriter, WriteError};
use crate::apply::batch::DeleteTimes;
use crate::apply::target::TargetTable;
use crate::event::{format_unix_us, ChangeEvent, Value};
use std::borrow::Cow;
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

    pub(super) async fn upsert(
        &self,
        events: &[Cow<'_, ChangeEvent>],
        table: &TargetTable,
        winners: &[Candidate],
    ) -> Result<(), WriteError> {
        // Rows with the same columns present go in one statement (unchanged-TOAST
        // columns are left out, so the target keeps its value).
        let mut groups: Vec<(Vec<&str>, Vec<usize>)> = Vec::new();
        for Candidate { index: i, .. } in winners {
            let cols: Vec<&str> = events[*i]
                .after
                .iter()
                .flat_map(|r| r.0.iter())
                .filter(|(_, v)| *v != Value::UnchangedToast)
                .map(|(c, _)| c.as_str())
                .collect();
            match groups.iter_mut().find(|(c, _)| *c == cols) {
                Some((_, members)) => members.push(*i),
                None => groups.push((cols, vec![*i])),
            }
        }
        for (cols, members) in groups {
            let arrays: Vec<Vec<Option<&str>>> = cols
                .iter()
                .map(|c| {
                    members
                        .iter()
                        .map(|&i| match events[i].after.as_ref().and_then(|r| r.get(c)) {
                            Some(Value::Text(t)) => Some(t.as_str()),
                            _ => None,
                        })
                        .collect()
                })
                .collect();
            let mut params: Vec<&(dyn ToSql + Sync)> =
                arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
            params.push(&self.incoming_wins_ties);
            self.client
                .execute(&table.upsert_sql(&cols), &params)
                .await
                .map_err(self.sql(&format!("upserting into {}", table.name)))?;
            if let Some(t) = self.metrics.table(&table.label) {
                t.upserts.increment(members.len() as u64);
            }
        }
        for c in winners {
            self.carry_toast(&events[c.index], table).await?;
        }
        Ok(())
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
        self.client
            .execute(&table.delete_sql(), &params)
            .await
            .map_err(self.sql(&format!("deleting from {}", table.name)))?;
        if let Some(t) = self.metrics.table(&table.label) {
            t.deletes.increment(winners.len() as u64);
        }
        Ok(())
    }
}
