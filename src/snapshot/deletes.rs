//! What the source deleted, carried into the target before a table's rows: the
//! source's own tombstones and its last truncation of the table, applied as the stream
//! applies a delete or a truncate (a target row newer than the delete survives, and
//! the delete is recorded as a tombstone or truncation of the source's).
//!
//! A copy without this would leave on the target every row the source deleted while
//! the target was not receiving its stream (a lost slot, topic or position), and the
//! copy the other way would then bring it back to the source. Only the source's own
//! deletes travel (origin `local` on the source): the others are the target's, which
//! it holds already. Idempotent: a copy run again deletes nothing more.

use super::copy::CopyWorker;
use super::table::CopyTable;
use super::SnapshotError;
use crate::pg::node::SqlContext;
use tokio_postgres::types::ToSql;

/// Tombstones read from the source and applied per round trip.
const TOMBSTONES_PER_BATCH: i64 = 5_000;

impl CopyWorker<'_> {
    /// Carries the source's tombstones and truncation of `t` into the target; returns
    /// how many tombstones it carried. Mapped tables carry theirs through the mapping.
    pub(crate) async fn carry_deletes(&mut self, t: &CopyTable) -> Result<u64, SnapshotError> {
        if t.mapped {
            return Ok(0);
        }
        let (dir, source, target) = self.sessions();
        let delete = t.target.delete_sql();
        let (mut after, mut carried) = (String::from("[]"), 0u64);
        loop {
            let rows = source
                .query(
                    "SELECT ARRAY(SELECT jsonb_array_elements_text(key)), key::text, deleted_at::text
                     FROM duplex.tombstones
                     WHERE table_name = $1 AND origin = 'local' AND key > $2::text::jsonb
                     ORDER BY key LIMIT $3",
                    &[&t.name, &after, &TOMBSTONES_PER_BATCH],
                )
                .await
                .sql(&dir.from, format!("reading the tombstones of {}", t.name))?;
            let Some(last) = rows.last() else { break };
            after = last.get(1);
            let mut keys: Vec<Vec<String>> = vec![Vec::with_capacity(rows.len()); t.key.len()];
            let mut times: Vec<String> = Vec::with_capacity(rows.len());
            for row in &rows {
                let key: Vec<String> = row.get(0);
                if key.len() != t.key.len() {
                    continue; // a tombstone of the table before its key changed
                }
                for (column, value) in keys.iter_mut().zip(key) {
                    column.push(value);
                }
                times.push(row.get(2));
            }
            let mut params: Vec<&(dyn ToSql + Sync)> =
                keys.iter().map(|k| k as &(dyn ToSql + Sync)).collect();
            params.push(&times);
            params.push(&t.name);
            params.push(&dir.from);
            target.execute(&delete, &params).await.sql(
                &dir.to,
                format!("deleting what node {} deleted from {}", dir.from, t.name),
            )?;
            carried += times.len() as u64;
        }
        let truncated: Option<String> = source
            .query_opt(
                "SELECT truncated_at::text FROM duplex.truncations
                 WHERE table_name = $1 AND origin = 'local'",
                &[&t.name],
            )
            .await
            .sql(&dir.from, format!("reading the truncation of {}", t.name))?
            .map(|r| r.get(0));
        if let Some(at) = truncated {
            target
                .execute(&t.target.truncate_sql(), &[&at, &t.name, &dir.from])
                .await
                .sql(
                    &dir.to,
                    format!("truncating {} as node {} did", t.name, dir.from),
                )?;
        }
        Ok(carried)
    }
}
