//! Values owed to a target that lacks a column its source has.
//!
//! A migration reaches one node before the other: while the target lacks a column the
//! source's rows carry, the writer applies the rows with the columns both have, and
//! notes here, per table and column, the earliest source commit whose value it left
//! out. The notes go into `duplex.owed_columns` on the target in the same transaction
//! as the rows, so a debt is durable exactly when the rows that made it are; they only
//! ever move the debt's start earlier. Once the target has the column, what is owed
//! is brought over (`lww/settle`) and the row deleted. The initial copy records a
//! debt of every row (`FROM_THE_COPY`) for a column it left out.

use super::{TargetWriter, WriteError};
use crate::event::{format_unix_us, ChangeEvent, Lsn, Row};
use crate::pg::table::TargetTable;
use std::collections::BTreeMap;
use tokio_postgres::Client;

/// Where a debt begins: the source commit whose value was first left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Since {
    pub lsn: Lsn,
    pub commit_ts_us: i64,
}

impl Since {
    /// As `duplex.owed_columns` records it: (LSN, commit time). Rows a copy wrote
    /// (LSN 0: not from the stream, and stamped with the copy's time) owe every
    /// row's value, [`FROM_THE_COPY`].
    fn recorded(&self) -> (String, String) {
        if self.lsn == Lsn::ZERO {
            let (lsn, ts) = FROM_THE_COPY;
            return (lsn.to_string(), ts.to_string());
        }
        (self.lsn.to_string(), format_unix_us(self.commit_ts_us))
    }
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
        if last.is_some_and(|l| same_names(l, image)) {
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

/// Whether two rows have the same columns, in the same order.
fn same_names(a: &Row, b: &Row) -> bool {
    a.0.len() == b.0.len() && a.0.iter().zip(&b.0).all(|(x, y)| x.0 == y.0)
}

impl TargetWriter<'_> {
    /// Forgets the tables' columns read so far; they are read again when next used.
    /// The writer casts each value to the type it read, so a column whose type
    /// changed since makes a batch fail that the columns read again may take.
    pub fn forget_tables(&mut self) {
        self.tables.clear();
    }

    /// The run's table as the target has it now: the columns read earlier, read again
    /// when a row of the run has one they lack (it may have been added since).
    pub(super) async fn current_table(
        &mut self,
        events: &[std::borrow::Cow<'_, ChangeEvent>],
        run: &super::runs::Run,
    ) -> Result<Option<TargetTable>, WriteError> {
        let Some(table) = self.tables.get(&run.table).cloned().flatten() else {
            return Ok(None);
        };
        // Each column set once: the rows of a run usually share theirs.
        let mut last: Option<&Row> = None;
        let lacks = run.items.iter().any(|&i| {
            let Some(r) = events[i].after.as_ref() else {
                return false;
            };
            if last.is_some_and(|l| same_names(l, r)) {
                return false;
            }
            last = Some(r);
            r.0.iter().any(|(c, _)| table.column(c).is_none())
        });
        if !lacks {
            return Ok(Some(table));
        }
        self.tables.remove(&run.table);
        Ok(self.table(&run.table).await?.cloned())
    }

    /// Records `owed` in `duplex.owed_columns`, in the caller's transaction, and logs
    /// each debt the first time it is recorded.
    pub(super) async fn record_owed(&self, owed: &OwedColumns) -> Result<(), WriteError> {
        for (table, column, since) in owed.iter() {
            let (since_lsn, since_ts) = since.recorded();
            let new = record_debt(
                &self.client,
                &self.dir.from,
                table,
                column,
                &since_lsn,
                &since_ts,
            )
            .await
            .map_err(self.sql(&format!("recording the values of {table}.{column} owed")))?;
            if new {
                tracing::warn!(direction = %self.dir, table, column, since_lsn = %since.lsn,
                    "node {} lacks a column node {} has: its rows are applied without it, and its values since then are owed until the column exists there",
                    self.dir.to, self.dir.from);
            }
        }
        Ok(())
    }
}

/// A debt's start when a table is copied whole (the initial copy): every row's value
/// is owed, whatever its `updated_at`.
pub const FROM_THE_COPY: (&str, &str) = ("0/0", "-infinity");

/// Records on `target`, in the caller's transaction, that the values of
/// `table`.`column` from `source_node` are owed since (`since_lsn`, `since_ts`), or
/// moves an existing debt's start earlier. True when the debt is new.
pub(crate) async fn record_debt(
    target: &Client,
    source_node: &str,
    table: &str,
    column: &str,
    since_lsn: &str,
    since_ts: &str,
) -> Result<bool, tokio_postgres::Error> {
    Ok(target
        .query_one(
            "INSERT INTO duplex.owed_columns AS o
                    (source_node, table_name, column_name, since_lsn, since_ts)
             VALUES ($1, $2, $3, $4::text::pg_lsn, $5::text::timestamptz)
             ON CONFLICT (source_node, table_name, column_name) DO UPDATE
             SET since_lsn = least(o.since_lsn, EXCLUDED.since_lsn),
                 since_ts = least(o.since_ts, EXCLUDED.since_ts)
             RETURNING xmax = 0",
            &[&source_node, &table, &column, &since_lsn, &since_ts],
        )
        .await?
        .get(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lww::settle::tests::target;

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
    fn a_debt_of_rows_a_copy_wrote_owes_every_row() {
        let copied = Since {
            lsn: Lsn::ZERO,
            commit_ts_us: 1_700_000_000_000_000,
        };
        assert_eq!(copied.recorded(), ("0/0".into(), "-infinity".into()));
        let streamed = at(0x10);
        assert_eq!(streamed.recorded().0, "0/10");
        assert_ne!(streamed.recorded().1, "-infinity");
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
