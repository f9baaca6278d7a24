//! Which column of a refused row the target's types refuse.
//!
//! A set-based upsert casts every value to its target column's type at once, so a
//! value the target cannot take (a migration changed the column's type on one node:
//! text to integer, varchar(50) to varchar(10)) fails the statement with PostgreSQL's
//! message alone, which names the type but not the column. When one row fails so,
//! each of its values is cast again on its own, under a savepoint of its own, to name
//! the column and the value for the operator.

use super::{TargetWriter, WriteError};
use crate::event::{ChangeEvent, Value};
use crate::pg::table::cast_type;

/// The longest value quoted in a message.
const QUOTED_CHARS: usize = 60;

impl TargetWriter<'_> {
    /// The first column of `ev`'s new row whose value its target column's type
    /// refuses, as "column c (type t) refuses 'v': message"; `None` when every value
    /// casts (the row failed for another reason). Runs inside the caller's
    /// transaction, which each probe leaves as it found it.
    pub async fn refused_column(&mut self, ev: &ChangeEvent) -> Result<Option<String>, WriteError> {
        let name = format!("{}.{}", ev.source.schema, ev.source.table);
        let Some(row) = ev.after.as_ref() else {
            return Ok(None);
        };
        let Some(table) = self.table(&name).await?.cloned() else {
            return Ok(None);
        };
        for (column, value) in &row.0 {
            let (Value::Text(text), Some(col)) = (value, table.column(column)) else {
                continue;
            };
            self.execute("SAVEPOINT probe", "savepoint").await?;
            // The cast the writer makes, and the column's own type: an explicit cast
            // to a length cuts a longer value short, which assigning it refuses.
            let cast = format!(
                "SELECT $1::text::{} IS DISTINCT FROM $1::text::{}",
                col.type_sql,
                cast_type(&col.type_sql)
            );
            let refused = match self.client.query_one(&cast, &[text]).await {
                Err(e) => Some(crate::pg::error::describe(&e)),
                Ok(r) if r.get::<_, bool>(0) => Some(format!("too long for {}", col.type_sql)),
                Ok(_) => None,
            };
            let undo = if refused.is_some() {
                "ROLLBACK TO SAVEPOINT probe"
            } else {
                "RELEASE SAVEPOINT probe"
            };
            self.execute(undo, "savepoint").await?;
            if let Some(why) = refused {
                let shown: String = text.chars().take(QUOTED_CHARS).collect();
                let more = if shown.len() < text.len() { "…" } else { "" };
                return Ok(Some(format!(
                    "column {column} ({}) refuses '{shown}{more}': {why}",
                    col.type_sql,
                )));
            }
        }
        Ok(None)
    }
}
