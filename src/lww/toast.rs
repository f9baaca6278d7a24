//! Values PostgreSQL did not send: a key change that left TOASTed columns untouched
//! carries no value for them, so the new key's row takes them from the old key's row
//! on the target (still there: deletes run after upserts).

use super::{TargetWriter, WriteError};
use crate::event::{ChangeEvent, Row, Value};
use crate::pg::table::TargetTable;
use tokio_postgres::types::ToSql;

impl TargetWriter<'_> {
    /// A key change whose new row lacks unchanged-TOAST values: they stay in the old
    /// key's row on the target (deleted only after the upserts), so copy them over.
    pub(super) async fn carry_toast(
        &self,
        ev: &ChangeEvent,
        table: &TargetTable,
    ) -> Result<(), WriteError> {
        let (Some(before), Some(after)) = (&ev.before, &ev.after) else {
            return Ok(());
        };
        let key_of = |row: &Row| -> Option<Vec<String>> {
            table
                .key
                .iter()
                .map(|k| match row.get(k) {
                    Some(Value::Text(t)) => Some(t.clone()),
                    _ => None,
                })
                .collect()
        };
        let (Some(old), Some(new)) = (key_of(before), key_of(after)) else {
            return Ok(());
        };
        // A generated column is computed on the new row already, and takes no value.
        let unchanged: Vec<&str> = after
            .0
            .iter()
            .filter(|(c, v)| {
                *v == Value::UnchangedToast && table.column(c).is_some_and(|t| !t.generated)
            })
            .map(|(c, _)| c.as_str())
            .collect();
        if old == new || unchanged.is_empty() {
            return Ok(());
        }
        let params: Vec<&(dyn ToSql + Sync)> = new
            .iter()
            .chain(old.iter())
            .map(|k| k as &(dyn ToSql + Sync))
            .collect();
        self.client
            .execute(&table.carry_sql(&unchanged), &params)
            .await
            .map_err(self.sql(&format!(
                "copying unchanged values to a new key in {}",
                table.name
            )))?;
        Ok(())
    }
}
