//! Values owed to a target that lacks a column its source has.
//!
//! A migration reaches one node before the other: while the target lacks a column the
//! source's rows carry, the writer applies the rows with the columns both have, and
//! notes here, per table and column, the earliest source commit whose value it left
//! out. The notes go into `duplex.owed_columns` on the target in the same transaction
//! as the rows, so a debt is durable exactly when the rows that made it are; they only
//! ever move the debt's start earlier. Once the target has the column, what is owed
//! is brought over (see `crate::schema`) and the row deleted.

use super::{TargetWriter, WriteError};
use crate::event::{format_unix_us, ChangeEvent, Lsn, Row};
use crate::pg::table::TargetTable;
use std::collections::BTreeMap;

/// Where a debt begins: the source commit whose value was first left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Since {
    pub lsn: Lsn,
    pub commit_ts_us: i64,
}

/// Columns left out of one batch, per (target table, column), each from the earliest
/// commit that had a value for it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct OwedColumns {
    owed: BTreeMap<(String, String), Since>,
}

impl OwedColumns {
    /// Notes `column` of `table` as owed since `since`, keeping the earliest.
    pub fn note(&mut self, table: &str, column: &str, since: Since) {
        self.owed
            .entry((table.to_string(), column.to_string()))
            .and_modify(|s| *s = (*s).min(since))
            .or_insert(since);
    }

    /// Notes the columns of `ev`'s new row that `table` lacks. `last` is the last row
    /// checked: the rows of a run usually share their columns, so most are checked
    /// by comparing names, and the first row of a run with a column is its earliest.
    pub fn note_missing<'e>(
        &mut self,
        ev: &'e ChangeEvent,
        table: &TargetTable,
        last: &mut Option<&'e Row>,
    ) {
        let Some(image) = ev.after.as_ref() else {
            return;
        };
        let same = last.is_some_and(|l| {
            l.0.len() == image.0.len() && l.0.iter().zip(&image.0).all(|(a, b)| a.0 == b.0)
        });
        if same {
            return;
        }
        *last = Some(image);
        let since = Since {
            lsn: ev.source.lsn,
            commit_ts_us: ev.source.commit_ts_us,
        };
        for (column, _) in &image.0 {
            if table.column(column).is_none() {
                self.note(&table.name, column, since);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.owed.is_empty()
    }

    /// (table, column, since), by table and column.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str, Since)> {
        self.owed
            .iter()
            .map(|((t, c), s)| (t.as_str(), c.as_str(), *s))
    }
}

impl TargetWriter<'_> {
    /// Records `owed` in `duplex.owed_columns`, in the caller's transaction, and logs
    /// each debt the first time it is recorded.
    pub(super) async fn record_owed(&self, owed: &OwedColumns) -> Result<(), WriteError> {
        for (table, column, since) in owed.iter() {
            let new: bool = self
                .client
                .query_one(
                    "INSERT INTO duplex.owed_columns AS o
                            (source_node, table_name, column_name, since_lsn, since_ts)
                     VALUES ($1, $2, $3, $4::text::pg_lsn, $5::text::timestamptz)
                     ON CONFLICT (source_node, table_name, column_name) DO UPDATE
                     SET since_lsn = least(o.since_lsn, EXCLUDED.since_lsn),
                         since_ts = least(o.since_ts, EXCLUDED.since_ts)
                     RETURNING xmax = 0",
                    &[
                        &self.dir.from,
                        &table,
                        &column,
                        &since.lsn.to_string(),
                        &format_unix_us(since.commit_ts_us),
                    ],
                )
                .await
                .map_err(self.sql(&format!("recording the values of {table}.{column} owed")))?
                .get(0);
            if new {
                tracing::warn!(direction = %self.dir, table, column, since_lsn = %since.lsn,
                    "node {} lacks a column node {} has: its rows are applied without it, and its values since then are owed until the column exists there",
                    self.dir.to, self.dir.from);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(lsn: u64) -> Since {
        Since {
            lsn: Lsn(lsn),
            commit_ts_us: lsn as i64 * 10,
        }
    }

    #[test]
    fn a_debt_starts_at_the_earliest_commit_that_left_a_value_out() {
        let mut owed = OwedColumns::default();
        owed.note("public.items", "color", at(30));
        owed.note("public.items", "color", at(10));
        owed.note("public.items", "color", at(20));
        owed.note("public.items", "size", at(25));
        let got: Vec<_> = owed.iter().collect();
        assert_eq!(
            got,
            [
                ("public.items", "color", at(10)),
                ("public.items", "size", at(25))
            ]
        );
    }

    fn target() -> TargetTable {
        let col = |name: &str| crate::pg::table::TargetColumn {
            name: name.into(),
            type_sql: "text".into(),
            generated: false,
        };
        TargetTable {
            name: "public.items".into(),
            label: "public.items".into(),
            sql_name: "\"public\".\"items\"".into(),
            columns: vec![col("id"), col("val"), col("updated_at")],
            key: vec!["id".into()],
            updated_at: "updated_at".into(),
        }
    }

    fn row_event(lsn: u64, columns: &[&str]) -> ChangeEvent {
        use crate::event::{Op, Source, Value};
        let row = Row(columns
            .iter()
            .map(|c| (c.to_string(), Value::Text("x".into())))
            .collect());
        ChangeEvent {
            op: Op::Insert,
            before: None,
            after: Some(row),
            key: vec!["id".into()],
            types: std::sync::Arc::from([]),
            source: Source {
                node: "a".into(),
                db: "app".into(),
                schema: "public".into(),
                table: "items".into(),
                lsn: Lsn(lsn),
                seq: 0,
                last: true,
                xid: 1,
                commit_ts_us: lsn as i64 * 10,
                stream: None,
                prev_lsn: None,
            },
            ts_ms: 0,
        }
    }

    #[test]
    fn only_the_columns_the_target_lacks_are_owed_from_the_first_row_with_them() {
        let (table, mut owed, mut last) = (target(), OwedColumns::default(), None);
        let events = [
            row_event(5, &["id", "val", "updated_at"]),
            row_event(6, &["id", "val", "color", "updated_at"]),
            row_event(7, &["id", "val", "color", "updated_at"]),
            row_event(8, &["id", "val", "color", "size", "updated_at"]),
        ];
        for ev in &events {
            owed.note_missing(ev, &table, &mut last);
        }
        let got: Vec<_> = owed.iter().collect();
        assert_eq!(
            got,
            [
                ("public.items", "color", at(6)),
                ("public.items", "size", at(8))
            ]
        );
        // A row with the target's columns only owes nothing.
        let mut none = OwedColumns::default();
        none.note_missing(&events[0], &table, &mut None);
        assert!(none.is_empty());
    }
}
