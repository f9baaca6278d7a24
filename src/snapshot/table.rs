//! A table as both nodes have it, and the SQL that copies it: the source's stored
//! columns read by primary-key range with `COPY (SELECT ...) TO STDOUT`, written with
//! `COPY ... FROM STDIN` (binary when both sides have the same built-in types), and
//! merged from a staging table under the stream's last-writer-wins rules.

use super::SnapshotError;
use crate::config::{Direction, TableConfig};
use crate::pg::node::SqlContext;
use crate::pg::sql::{quote_ident, quote_literal};
use crate::pg::table::TargetTable;
use tokio_postgres::Client;

/// A configured table as both nodes have it, ready to copy.
#[derive(Debug, Clone)]
pub(crate) struct CopyTable {
    pub name: String,
    /// Quoted `"schema"."table"` on the target.
    pub sql_name: String,
    /// Quoted `"schema"."table"` on the source: the same unless the table is mapped.
    pub source_sql_name: String,
    /// `schema.table` on the source.
    pub source_table: String,
    /// The nodes' schemas differ (see `mapping/`): rows are copied through the
    /// mapping rather than by COPY.
    pub mapped: bool,
    /// The source's stored columns the target has (generated ones are computed on
    /// the target).
    pub columns: Vec<String>,
    /// The source's stored columns the target lacks (a migration not yet applied
    /// there): rows are copied without them, and their values recorded as owed
    /// (`lww/owed`) until the target has the column.
    pub owed: Vec<String>,
    /// Primary-key columns with their source types, in key order.
    pub key: Vec<(String, String)>,
    /// Copied in PostgreSQL's binary format: every copied column has the same type
    /// on both nodes, and one of [`binary_types`].
    pub binary: bool,
    pub target: TargetTable,
}

impl CopyTable {
    /// Reads the table from both catalogs; a table or key column missing on the
    /// target, or a table without a primary key, is an error naming it.
    pub(crate) async fn describe(
        source: &Client,
        target: &Client,
        dir: &Direction,
        tc: &TableConfig,
    ) -> Result<CopyTable, SnapshotError> {
        let problem = |detail: String| SnapshotError::Table {
            direction: dir.to_string(),
            table: tc.name.clone(),
            detail,
        };
        let read = |node: &str, t: Result<Option<TargetTable>, tokio_postgres::Error>| {
            t.sql(node, format!("reading table {}", tc.name))
        };
        let source_table = read(&dir.from, TargetTable::load(source, tc, &dir.from).await)?
            .ok_or_else(|| problem(format!("missing on node {}", dir.from)))?;
        let target_table = read(&dir.to, TargetTable::load(target, tc, &dir.to).await)?
            .ok_or_else(|| problem(format!("missing on node {}", dir.to)))?;
        let (mut columns, mut owed, mut binary) = (Vec::new(), Vec::new(), !tc.is_mapped());
        for c in source_table.columns.iter().filter(|c| !c.generated) {
            match target_table.column(&c.name) {
                _ if tc.is_mapped() => {}
                None if source_table.key.contains(&c.name) => {
                    return Err(problem(format!(
                        "key column {} is missing on node {}",
                        c.name, dir.to
                    )))
                }
                None => {
                    owed.push(c.name.clone());
                    continue;
                }
                Some(t) => binary &= t.type_sql == c.type_sql,
            }
            columns.push(c.name.clone());
        }
        if binary {
            for (client, node, table) in [
                (source, &dir.from, &source_table),
                (target, &dir.to, &target_table),
            ] {
                binary &= binary_types(client, &table.sql_name, &columns)
                    .await
                    .sql(node, format!("reading the types of {}", tc.name))?;
            }
        }
        let key: Vec<(String, String)> = source_table
            .key
            .iter()
            .map(|k| (k.clone(), source_table.type_of(k).to_string()))
            .collect();
        if key.is_empty() {
            return Err(problem(format!("has no primary key on node {}", dir.from)));
        }
        Ok(CopyTable {
            name: tc.name.clone(),
            sql_name: target_table.sql_name.clone(),
            source_sql_name: source_table.sql_name.clone(),
            source_table: source_table.name.clone(),
            mapped: tc.is_mapped(),
            columns,
            owed,
            key,
            binary,
            target: target_table,
        })
    }

    pub(crate) fn key_list(&self, alias: &str) -> String {
        let cols: Vec<String> = self
            .key
            .iter()
            .map(|(k, _)| format!("{alias}{}", quote_ident(k)))
            .collect();
        cols.join(", ")
    }

    /// `(k0, k1) > (v0::t0, v1::t1)`: a row comparison in key order, which is the
    /// order of the primary-key index.
    fn bound(&self, op: &str, values: &[String]) -> String {
        let lits: Vec<String> = self
            .key
            .iter()
            .zip(values)
            .map(|((_, ty), v)| format!("{}::{ty}", quote_literal(v)))
            .collect();
        format!("({}) {op} ({})", self.key_list(""), lits.join(", "))
    }

    /// `(k0, k1) IN ((v0::t0, v1::t1), ...)`: the rows with these keys.
    pub(crate) fn key_in(&self, keys: &[Vec<String>]) -> String {
        let rows: Vec<String> = keys
            .iter()
            .map(|key| {
                let lits: Vec<String> = self
                    .key
                    .iter()
                    .zip(key)
                    .map(|((_, ty), v)| format!("{}::{ty}", quote_literal(v)))
                    .collect();
                format!("({})", lits.join(", "))
            })
            .collect();
        format!("({}) IN ({})", self.key_list(""), rows.join(", "))
    }

    /// `(k0, k1) = (v0::t0, v1::t1)`: the row with key `key`.
    pub(crate) fn key_equals(&self, key: &[String]) -> String {
        self.bound("=", key)
    }

    /// `WHERE ...` selecting the chunk's rows (empty for an unbounded chunk). Key
    /// values are inlined as quoted literals: COPY takes no parameters.
    pub(crate) fn chunk_filter(&self, chunk: &Chunk) -> String {
        let mut conds = Vec::new();
        if let Some(lower) = &chunk.lower {
            conds.push(self.bound(">", lower));
        }
        if let Some(upper) = &chunk.upper {
            conds.push(self.bound("<=", upper));
        }
        if conds.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conds.join(" AND "))
        }
    }

    /// The source-side `COPY (SELECT ...) TO STDOUT` of one chunk.
    pub(crate) fn copy_out_sql(&self, chunk: &Chunk) -> String {
        self.copy_out(&self.chunk_filter(chunk))
    }

    /// The source-side COPY of the one row with key `key`.
    pub(crate) fn copy_out_key_sql(&self, key: &[String]) -> String {
        self.copy_out(&format!(" WHERE {}", self.bound("=", key)))
    }

    fn copy_out(&self, filter: &str) -> String {
        let cols: Vec<String> = self.columns.iter().map(|c| quote_ident(c)).collect();
        format!(
            "COPY (SELECT {} FROM {}{filter}) TO STDOUT{}",
            cols.join(", "),
            self.source_sql_name,
            self.format()
        )
    }

    /// The key texts of the chunk's rows, in key order.
    pub(crate) fn keys_sql(&self, chunk: &Chunk) -> String {
        let texts: Vec<String> = self
            .key
            .iter()
            .map(|(k, _)| format!("concat({})", quote_ident(k)))
            .collect();
        format!(
            "SELECT ARRAY[{}] FROM {}{} ORDER BY {}",
            texts.join(", "),
            self.source_sql_name,
            self.chunk_filter(chunk),
            self.key_list("")
        )
    }

    /// The source rows matching `filter` (` WHERE ...`, or empty), each column as its
    /// type's output function prints it (as the stream carries it; NULL stays NULL),
    /// for a copy through the mapping.
    pub(crate) fn rows_where(&self, filter: &str) -> String {
        let texts: Vec<String> = self
            .columns
            .iter()
            .map(|c| {
                let c = quote_ident(c);
                format!("CASE WHEN {c} IS NULL THEN NULL ELSE concat({c}) END")
            })
            .collect();
        format!(
            "SELECT {} FROM {}{filter} ORDER BY {}",
            texts.join(", "),
            self.source_sql_name,
            self.key_list("")
        )
    }

    /// The target-side `COPY <into> (...) FROM STDIN`.
    pub(crate) fn copy_in_sql(&self, into: &str) -> String {
        let cols: Vec<String> = self.columns.iter().map(|c| quote_ident(c)).collect();
        format!(
            "COPY {into} ({}) FROM STDIN{}",
            cols.join(", "),
            self.format()
        )
    }

    /// How rows are copied, for the log: `binary` or `text` COPY, or `mapped`.
    pub(crate) fn copy_format(&self) -> &'static str {
        match (self.mapped, self.binary) {
            (true, _) => "mapped",
            (false, true) => "binary",
            (false, false) => "text",
        }
    }

    fn format(&self) -> &'static str {
        if self.binary {
            " (FORMAT binary)"
        } else {
            ""
        }
    }

    /// Upserts the staged rows of `staging` under the stream's rules: a row loses to
    /// a tombstone at least as new, to a truncation at least as new that another node
    /// than the source `$3` made (the source's own rows follow its truncation in its
    /// commit order), and to a target row that is newer (or as new, unless `$2`: the
    /// source wins ties). A row without `updated_at` is copied only where its key has
    /// neither a row nor a tombstone; one target row without it against another is a
    /// tie. `$1` is the table name.
    pub(crate) fn merge_sql(&self, staging: &str) -> String {
        let t = &self.sql_name;
        let upd = quote_ident(&self.target.updated_at);
        let cols: Vec<String> = self.columns.iter().map(|c| quote_ident(c)).collect();
        let picked: Vec<String> = cols.iter().map(|c| format!("s.{c}")).collect();
        let tomb: Vec<String> = self
            .key
            .iter()
            .map(|(k, _)| format!("concat(s.{})", quote_ident(k)))
            .collect();
        let sets: Vec<String> = self
            .columns
            .iter()
            .filter(|c| !self.key.iter().any(|(k, _)| k == *c))
            .map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(c)))
            .collect();
        let action = if sets.is_empty() {
            "NOTHING".to_string()
        } else {
            format!(
                "UPDATE SET {} WHERE CASE WHEN EXCLUDED.{upd} IS NULL THEN {t}.{upd} IS NULL AND $2::bool
                   ELSE {t}.{upd} IS NULL OR {t}.{upd} < EXCLUDED.{upd}
                        OR ({t}.{upd} = EXCLUDED.{upd} AND $2::bool) END",
                sets.join(", ")
            )
        };
        format!(
            "INSERT INTO {t} ({cols}) OVERRIDING SYSTEM VALUE
             SELECT {picked} FROM {staging} s
             WHERE NOT EXISTS (SELECT 1 FROM duplex.tombstones tb WHERE tb.table_name = $1::text
                               AND tb.key = jsonb_build_array({tomb})
                               AND (s.{upd} IS NULL OR tb.deleted_at >= s.{upd}))
               AND NOT EXISTS (SELECT 1 FROM duplex.truncations tr WHERE tr.table_name = $1::text
                               AND tr.origin <> $3::text
                               AND (s.{upd} IS NULL OR tr.truncated_at >= s.{upd}))
             ORDER BY {keys}
             ON CONFLICT ({keys}) DO {action}",
            cols = cols.join(", "),
            picked = picked.join(", "),
            tomb = tomb.join(", "),
            keys = self.key_list(""),
        )
    }
}

impl CopyTable {
    /// Deletes, among the target rows the chunk's transaction just merged from
    /// `staging` (their `xmin` is the transaction's own: rows the target held are
    /// never touched), the ones a tombstone or truncation now outdates, under
    /// the rules of [`Self::merge_sql`] (`$1` table name, `$2` source node): a delete
    /// the application committed while the merge waited for its row let the older
    /// version in, as on the stream (see `apply::target::settle_sql`).
    pub(crate) fn settle_merge_sql(&self, staging: &str) -> String {
        let t = &self.sql_name;
        let upd = quote_ident(&self.target.updated_at);
        let join: Vec<String> = self
            .key
            .iter()
            .map(|(k, _)| format!("t.{0} = s.{0}", quote_ident(k)))
            .collect();
        let tomb: Vec<String> = self
            .key
            .iter()
            .map(|(k, _)| format!("concat(t.{})", quote_ident(k)))
            .collect();
        format!(
            "DELETE FROM {t} t USING {staging} s
             WHERE {join} AND t.xmin = pg_current_xact_id()::xid
               AND (EXISTS (SELECT 1 FROM duplex.tombstones tb WHERE tb.table_name = $1::text
                            AND tb.key = jsonb_build_array({tomb})
                            AND (t.{upd} IS NULL OR tb.deleted_at >= t.{upd}))
                 OR EXISTS (SELECT 1 FROM duplex.truncations tr WHERE tr.table_name = $1::text
                            AND tr.origin <> $2::text
                            AND (t.{upd} IS NULL OR tr.truncated_at >= t.{upd})))",
            join = join.join(" AND "),
            tomb = tomb.join(", "),
        )
    }

    /// Deletes the rows of `chunk` the transaction just copied directly that a
    /// truncation another node than the source `$2` made outdates (`$1` table name):
    /// one recorded while the chunk was copied. (Tombstones are swept separately.)
    pub(crate) fn truncated_in_chunk_sql(&self, chunk: &Chunk) -> String {
        let upd = quote_ident(&self.target.updated_at);
        let filter = self.chunk_filter(chunk);
        let and = if filter.is_empty() { " WHERE" } else { " AND" };
        format!(
            "DELETE FROM {t}{filter}{and} xmin = pg_current_xact_id()::xid AND EXISTS (
               SELECT 1 FROM duplex.truncations tr WHERE tr.table_name = $1::text
               AND tr.origin <> $2::text AND ({upd} IS NULL OR tr.truncated_at >= {upd}))",
            t = self.sql_name,
        )
    }
}

/// Whether the binary COPY format serves every column of `columns` in `table`
/// (quoted): each type, and an array's element type, is built in (below
/// `FirstNormalObjectId`, so the same on every server), has a binary format, and is
/// not a composite (whose fields could be anything). Otherwise text: an extension's
/// type may have no binary format (`seg`, `isn`: 42883 on the first row), and a user
/// type's OID, which the array and record formats carry, differs between the nodes.
async fn binary_types(
    client: &Client,
    table: &str,
    columns: &[String],
) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT coalesce(bool_and(
                      t.oid < 16384 AND t.typtype <> 'c' AND t.typsend::oid <> 0 AND t.typreceive::oid <> 0
                      AND (t.typelem = 0 OR (e.oid < 16384 AND e.typtype <> 'c'
                                             AND e.typsend::oid <> 0 AND e.typreceive::oid <> 0))), true)
             FROM pg_attribute a
             JOIN pg_type t ON t.oid = a.atttypid
             LEFT JOIN pg_type e ON e.oid = t.typelem
             WHERE a.attrelid = $1::text::regclass AND a.attname = ANY($2::text[])
               AND a.attnum > 0 AND NOT a.attisdropped",
            &[&table, &columns],
        )
        .await?;
    Ok(row.get(0))
}

/// One key range of a table: above `lower` (exclusive), up to `upper` (inclusive);
/// `None` is unbounded.
#[derive(Debug, Clone)]
pub(crate) struct Chunk {
    pub table: String,
    pub chunk: i32,
    pub lower: Option<Vec<String>>,
    pub upper: Option<Vec<String>>,
}
