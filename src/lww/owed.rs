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
use crate::pg::sql::quote_ident;
use crate::pg::table::TargetTable;
use std::collections::BTreeMap;
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

/// Rows read from the source and written into the target at a time.
const SETTLE_ROWS: usize = 5_000;

/// How far before a debt's first commit the source's rows are read again: rows an
/// application stamped with a clock this much behind the commit still count.
const SETTLE_MARGIN_MS: i64 = 5 * 60 * 1000;

/// A debt of the direction's target.
#[derive(Debug, Clone, PartialEq)]
pub struct Debt {
    pub table: String,
    pub column: String,
    /// The debt's first commit time, as PostgreSQL prints it.
    pub since: String,
    /// The column exists on the target now: the debt can be settled.
    pub ready: bool,
}

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

impl TargetWriter<'_> {
    /// This direction's debts, each saying whether its column exists on the target now.
    pub async fn owed_debts(&mut self) -> Result<Vec<Debt>, WriteError> {
        let rows = self
            .client
            .query(
                "SELECT o.table_name, o.column_name, o.since_ts::text,
                        EXISTS (SELECT 1 FROM pg_attribute a
                                WHERE a.attrelid = to_regclass(o.table_name)
                                  AND a.attname = o.column_name AND NOT a.attisdropped)
                 FROM duplex.owed_columns o WHERE o.source_node = $1",
                &[&self.dir.from],
            )
            .await
            .map_err(self.sql("reading duplex.owed_columns"))?;
        Ok(rows
            .iter()
            .map(|r| Debt {
                table: r.get(0),
                column: r.get(1),
                since: r.get(2),
                ready: r.get(3),
            })
            .collect())
    }

    /// Ends the debts in `debts` whose column the source no longer has either (a
    /// column dropped on both nodes): nothing is owed any more. Returns those ended.
    pub async fn end_dropped(
        &mut self,
        source: &Client,
        debts: &[Debt],
    ) -> Result<Vec<Debt>, WriteError> {
        let mut ended = Vec::new();
        for d in debts {
            let Some(tc) = self.cfg.table_on(&self.dir.to, &d.table) else {
                continue;
            };
            let on_source: bool = source
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_attribute a
                                    WHERE a.attrelid = to_regclass($1)
                                      AND a.attname = $2 AND NOT a.attisdropped)",
                    &[&tc.name_on(&self.dir.from), &d.column],
                )
                .await
                .map_err(self.source_sql("looking for an owed column on the source"))?
                .get(0);
            if !on_source {
                self.forget_debt(d).await?;
                ended.push(d.clone());
            }
        }
        Ok(ended)
    }

    /// As `sql`, for a statement on the direction's source.
    fn source_sql(&self, context: &str) -> impl FnOnce(tokio_postgres::Error) -> WriteError {
        let on = crate::pg::error::SqlError::on(&self.dir.from, context.to_string());
        move |source| WriteError::Sql(on(source))
    }

    async fn forget_debt(&self, d: &Debt) -> Result<(), WriteError> {
        self.client
            .execute(
                "DELETE FROM duplex.owed_columns
                 WHERE source_node = $1 AND table_name = $2 AND column_name = $3",
                &[&self.dir.from, &d.table, &d.column],
            )
            .await
            .map_err(self.sql("ending a debt in duplex.owed_columns"))?;
        Ok(())
    }

    /// Brings over what `owed` names from `source` (a session on the direction's
    /// source): each row the source changed since the debt began (less
    /// [`SETTLE_MARGIN_MS`]) gives the target row of its key the column's value,
    /// unless the target's version is newer (written there meanwhile). The table's
    /// columns are read again first, so the stream carries the column from now on.
    /// Chunks commit one by one; the debt goes with the last. Returns the values
    /// written.
    pub async fn settle_owed(&mut self, source: &Client, owed: &Debt) -> Result<u64, WriteError> {
        self.tables.remove(&owed.table);
        let Some(table) = self.table(&owed.table).await?.cloned() else {
            return Ok(0);
        };
        let Some(tc) = self.cfg.table_on(&self.dir.to, &owed.table) else {
            return Ok(0);
        };
        let source_name = tc.name_on(&self.dir.from).to_string();
        let default: Option<String> = self
            .client
            .query_opt(
                "SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d
                 JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
                 WHERE d.adrelid = to_regclass($1) AND a.attname = $2",
                &[&owed.table, &owed.column],
            )
            .await
            .map_err(self.sql(&format!(
                "reading the default of {}.{}",
                owed.table, owed.column
            )))?
            .map(|r| r.get(0));
        let read = read_sql(&table, &source_name, &owed.column);
        let write = write_sql(&table, &owed.column, default.as_deref());
        let n = table.key.len();
        let mut after: Option<Vec<String>> = None;
        let mut written = 0;
        loop {
            let rows = match source.query(&read, &[&owed.since, &after]).await {
                Ok(rows) => rows,
                // The source dropped the column since: nothing is owed any more.
                Err(e) if e.code().is_some_and(|c| c.code() == "42703") => {
                    tracing::warn!(direction = %self.dir, table = %owed.table, column = %owed.column,
                        "the source no longer has the owed column; its values are not brought over");
                    break;
                }
                Err(e) => {
                    let context =
                        format!("reading the values of {source_name}.{} owed", owed.column);
                    return Err(self.source_sql(&context)(e));
                }
            };
            let mut arrays: Vec<Vec<Option<String>>> = vec![Vec::new(); n + 2];
            for r in &rows {
                for (i, a) in arrays.iter_mut().enumerate() {
                    a.push(r.get(i));
                }
            }
            let params: Vec<&(dyn ToSql + Sync)> =
                arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
            written += self
                .client
                .execute(&write, &params)
                .await
                .map_err(self.sql(&format!(
                    "writing the values of {}.{} owed",
                    table.name, owed.column
                )))?;
            if rows.len() < SETTLE_ROWS {
                break;
            }
            after = rows.last().map(|r| (0..n).map(|i| r.get(i)).collect());
        }
        self.forget_debt(owed).await?;
        Ok(written)
    }
}

/// The source's rows changed since `$1` (a timestamp, less [`SETTLE_MARGIN_MS`]) whose
/// key is after `$2` (text array; NULL: from the first), [`SETTLE_ROWS`] at a time, by
/// key: each key's columns, `column` and `updated_at`, as text.
fn read_sql(table: &TargetTable, source_name: &str, column: &str) -> String {
    let keys: Vec<String> = table.key.iter().map(|k| quote_ident(k)).collect();
    let key_text: Vec<String> = keys.iter().map(|k| format!("{k}::text")).collect();
    let after: Vec<String> = table
        .key
        .iter()
        .enumerate()
        .map(|(i, k)| format!("($2::text[])[{}]::{}", i + 1, table.type_of(k)))
        .collect();
    let (schema, name) = source_name
        .split_once('.')
        .unwrap_or(("public", source_name));
    format!(
        "SELECT {keys_text}, {col}::text, {upd}::text FROM {schema}.{name}
         WHERE {upd} >= $1::text::timestamptz - {SETTLE_MARGIN_MS} * interval '1 millisecond'
           AND ($2::text[] IS NULL OR ({keys}) > ({after}))
         ORDER BY {keys} LIMIT {SETTLE_ROWS}",
        keys_text = key_text.join(", "),
        col = quote_ident(column),
        upd = quote_ident(&table.updated_at),
        schema = quote_ident(schema),
        name = quote_ident(name),
        keys = keys.join(", "),
        after = after.join(", "),
    )
}

/// Sets `column` on the target rows whose keys are `$1..$n` (text arrays) to `$n+1`,
/// where the target's version is not newer than the source's `$n+2`, or where the
/// target never set the column (it still holds `default`, the column's default
/// expression, or NULL without one): a target version newer than the source's but
/// made before the column existed there says nothing about the column, and the
/// source, which applied that version without the column, kept its value.
fn write_sql(table: &TargetTable, column: &str, default: Option<&str>) -> String {
    let n = table.key.len();
    let arrays: Vec<String> = (1..=n + 2).map(|i| format!("${i}::text[]")).collect();
    let names: Vec<String> = (0..n)
        .map(|i| format!("k{i}"))
        .chain(["v".into(), "u".into()])
        .collect();
    let join: Vec<String> = table
        .key
        .iter()
        .enumerate()
        .map(|(i, k)| format!("t.{} = s.k{i}::{}", quote_ident(k), table.type_of(k)))
        .collect();
    let upd = quote_ident(&table.updated_at);
    format!(
        "UPDATE {t} t SET {col} = s.v::{ty}
         FROM unnest({arrays}) AS s({names})
         WHERE {join} AND (t.{upd} IS NULL OR t.{upd} <= s.u::timestamptz
                           OR t.{col} IS NOT DISTINCT FROM ({default})::{ty})",
        t = table.sql_name,
        col = quote_ident(column),
        ty = table.type_of(column),
        arrays = arrays.join(", "),
        names = names.join(", "),
        join = join.join(" AND "),
        default = default.unwrap_or("NULL"),
    )
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
    fn the_settle_reads_by_key_after_the_last_and_never_overwrites_a_newer_target_row() {
        let read = read_sql(&target(), "public.items_src", "color");
        assert!(read.contains("FROM \"public\".\"items_src\""), "{read}");
        assert!(
            read.contains("(\"id\") > (($2::text[])[1]::text)"),
            "{read}"
        );
        assert!(read.contains("ORDER BY \"id\" LIMIT 5000"), "{read}");
        let write = write_sql(&target(), "color", Some("'none'::text"));
        assert!(
            write.contains("t.\"color\" IS NOT DISTINCT FROM ('none'::text)::text"),
            "{write}"
        );
        assert!(
            write.contains("t.\"updated_at\" <= s.u::timestamptz"),
            "{write}"
        );
        assert!(
            write.contains("unnest($1::text[], $2::text[], $3::text[])"),
            "{write}"
        );
        eprintln!("{read}\n{write}");
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
