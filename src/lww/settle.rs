//! Settling what a target is owed (see `lww/owed`): once the target has an owed
//! column, the source's rows changed since the debt began are read again by key, a
//! page at a time, and each value is written where the target's version is not newer
//! (or never set the column); for a mapped pair the page goes through the mapping
//! first (`mapping/owed`). A debt whose column the source dropped too is ended.
//!
//! `apply/worker/owed` calls these between the apply session's transactions.

use super::{TargetWriter, WriteError};
use crate::mapping::owed::OwedSource;
use crate::pg::sql::{quote_ident, quote_literal};
use crate::pg::table::TargetTable;
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
            // A mapped pair's debt names the target's column: the source's is the one
            // whose rule leads to it (none: the settle says so once the column exists).
            let column = if tc.is_mapped() {
                match self.mapper.owed_source(&d.table, &d.column) {
                    Some(src) => src.source_column,
                    None => continue,
                }
            } else {
                d.column.clone()
            };
            let on_source: bool = source
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_attribute a
                                    WHERE a.attrelid = to_regclass($1)
                                      AND a.attname = $2 AND NOT a.attisdropped)",
                    &[&tc.name_on(&self.dir.from), &column],
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
        let Some((source_table, column, mapped)) = self.owed_origin(source, tc, owed).await? else {
            tracing::warn!(direction = %self.dir, table = %owed.table, column = %owed.column,
                "the config no longer maps a column to the owed one; its values are not brought over");
            self.forget_debt(owed).await?;
            return Ok(0);
        };
        let source_name = tc.name_on(&self.dir.from).to_string();
        let read = read_sql(&source_table, &source_name, &column);
        let write = write_sql(&table, &owed.column);
        let n = source_table.key.len();
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
                    let context = format!("reading the values of {source_name}.{column} owed");
                    return Err(self.source_sql(&context)(e));
                }
            };
            let page: Vec<Vec<Option<String>>> = rows
                .iter()
                .map(|r| (0..n + 2).map(|i| r.get(i)).collect())
                .collect();
            let page = match &mapped {
                Some(src) => self.owed_in_target_terms(src, page).await?,
                None => page,
            };
            let mut arrays: Vec<Vec<Option<String>>> = vec![Vec::new(); table.key.len() + 2];
            for r in page {
                for (a, v) in arrays.iter_mut().zip(r) {
                    a.push(v);
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

    /// Where the owed column's values are read: the source's table (as the target's
    /// for a table that is not mapped), the column's name there, and for a mapped pair
    /// the rule leading to it (the mapping is loaded again, as the target's columns
    /// changed). `None` when the config maps no column to it any more.
    async fn owed_origin(
        &mut self,
        source: &Client,
        tc: &crate::config::TableConfig,
        owed: &Debt,
    ) -> Result<Option<(TargetTable, String, Option<OwedSource>)>, WriteError> {
        let Some(table) = self.table(&owed.table).await?.cloned() else {
            return Ok(None);
        };
        if !tc.is_mapped() {
            return Ok(Some((table, owed.column.clone(), None)));
        }
        self.mapper = crate::mapping::Mapper::load(self.cfg, self.dir, &self.client).await?;
        let Some(src) = self.mapper.owed_source(&owed.table, &owed.column) else {
            return Ok(None);
        };
        let context = format!("reading table {}", src.source_table);
        let Some(source_table) = TargetTable::load(source, tc, &self.dir.from)
            .await
            .map_err(self.source_sql(&context))?
        else {
            return Ok(None);
        };
        Ok(Some((source_table, src.source_column.clone(), Some(src))))
    }
}

/// The source's rows changed since `$1` (a timestamp, less [`SETTLE_MARGIN_MS`]; all
/// of them from `-infinity`, a debt of the initial copy, `updated_at` NULL or not) whose
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
         WHERE ($1::text = '-infinity'
                OR {upd} >= $1::text::timestamptz - {SETTLE_MARGIN_MS} * interval '1 millisecond')
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
/// where the target's version is not newer than the source's `$n+2`, or where it is
/// older than the column: its tuple was written before the column was added (the
/// age of its `xmin` is above that of the column's catalog row; a frozen tuple is
/// older than any). Such a version carried no value for the column, and the
/// source, which applied it without the column, kept its own. A newer version
/// written since carries the target's value to the source, which converges on it.
fn write_sql(table: &TargetTable, column: &str) -> String {
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
                           OR age(t.xmin) > (SELECT age(a.xmin) FROM pg_attribute a
                                             WHERE a.attrelid = {rel}::regclass
                                               AND a.attname = {name}))",
        t = table.sql_name,
        col = quote_ident(column),
        ty = table.type_of(column),
        arrays = arrays.join(", "),
        names = names.join(", "),
        join = join.join(" AND "),
        rel = quote_literal(&table.sql_name),
        name = quote_literal(column),
    )
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// `public.items (id, val, updated_at)`, keyed by id.
    pub(in crate::lww) fn target() -> TargetTable {
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

    #[test]
    fn the_settle_reads_by_key_after_the_last_and_never_overwrites_a_newer_target_row() {
        let read = read_sql(&target(), "public.items_src", "color");
        assert!(read.contains("FROM \"public\".\"items_src\""), "{read}");
        assert!(
            read.contains("(\"id\") > (($2::text[])[1]::text)"),
            "{read}"
        );
        assert!(read.contains("ORDER BY \"id\" LIMIT 5000"), "{read}");
        let write = write_sql(&target(), "color");
        assert!(
            write.contains("age(t.xmin) > (SELECT age(a.xmin) FROM pg_attribute a"),
            "{write}"
        );
        assert!(
            write.contains("a.attrelid = '\"public\".\"items\"'::regclass")
                && write.contains("a.attname = 'color'"),
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
}
