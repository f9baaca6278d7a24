//! A configured table as it exists on a node: its columns with their types, and its
//! primary key, read from the catalog; and the one statement on it that every writer
//! shares, the sweep of rows older than their tombstone.

use crate::config::TableConfig;
use crate::pg::sql::quote_ident;
use tokio_postgres::Client;

/// A column of the target table.
#[derive(Debug, Clone)]
pub struct TargetColumn {
    pub name: String,
    /// `format_type` of the column, used in casts.
    pub type_sql: String,
    /// `GENERATED ALWAYS AS (...) STORED`: computed on each node, never written.
    pub generated: bool,
}

/// A configured table as it exists on the target node.
#[derive(Debug, Clone)]
pub struct TargetTable {
    /// `schema.table` on this node (as configured); the key of `duplex.tombstones`
    /// and `conflicts`.
    pub name: String,
    /// The configured table's `name`: the `table` label of metrics.
    pub label: String,
    /// Quoted `"schema"."table"`.
    pub sql_name: String,
    pub columns: Vec<TargetColumn>,
    /// Primary-key column names, in key order.
    pub key: Vec<String>,
    pub updated_at: String,
}

impl TargetTable {
    /// Reads the table's columns and primary key from the catalog of `node`.
    pub async fn load(
        client: &Client,
        cfg: &TableConfig,
        node: &str,
    ) -> Result<Option<TargetTable>, tokio_postgres::Error> {
        let (schema, table) = cfg.schema_table_on(node);
        let rows = client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attgenerated <> '',
                        coalesce((SELECT k.n::int4 FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(att, n)
                                  WHERE k.att = a.attnum), 0)
                 FROM pg_class c
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                 JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                 LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary
                 WHERE n.nspname = $1 AND c.relname = $2
                 ORDER BY a.attnum",
                &[&schema, &table],
            )
            .await?;
        if rows.is_empty() {
            return Ok(None);
        }
        let mut key: Vec<(i32, String)> = Vec::new();
        let mut columns = Vec::new();
        for r in rows {
            let name: String = r.get(0);
            let pos: i32 = r.get(3);
            if pos > 0 {
                key.push((pos, name.clone()));
            }
            columns.push(TargetColumn {
                name,
                type_sql: r.get(1),
                generated: r.get(2),
            });
        }
        key.sort();
        Ok(Some(TargetTable {
            name: cfg.name_on(node).to_string(),
            label: cfg.name.clone(),
            sql_name: crate::event::TableName::new(schema, table).quoted(),
            columns,
            key: key.into_iter().map(|(_, n)| n).collect(),
            updated_at: cfg.updated_at.clone(),
        }))
    }

    pub fn column(&self, name: &str) -> Option<&TargetColumn> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// The column's type for casts (`text` if unknown): as `format_type` prints it,
    /// less the length of a character or bit string type (see [`cast_type`]).
    pub(crate) fn type_of(&self, name: &str) -> std::borrow::Cow<'_, str> {
        self.column(name)
            .map_or(std::borrow::Cow::Borrowed("text"), |c| {
                cast_type(&c.type_sql)
            })
    }

    /// Deletes rows older than (or as old as) a tombstone of their key recorded in
    /// the last `$2` ms, `$1` being the table name: an application's insert stamped
    /// before a delete of the same key but committed after it leaves such a row, and
    /// last-writer-wins says the delete won (the peer, which applied both in commit
    /// order, has no row).
    pub fn sweep_sql(&self) -> String {
        let upd = quote_ident(&self.updated_at);
        let keys: Vec<String> = self
            .key
            .iter()
            .enumerate()
            .map(|(n, k)| format!("t.{} = (tb.key->>{n})::{}", quote_ident(k), self.type_of(k)))
            .collect();
        format!(
            "DELETE FROM {table} t USING (
               SELECT key, deleted_at FROM duplex.tombstones
               WHERE table_name = $1::text AND deleted_at > now() - $2::int8 * interval '1 millisecond') tb
             WHERE {keys} AND (t.{upd} IS NULL OR t.{upd} <= tb.deleted_at)",
            table = self.sql_name,
            keys = keys.join(" AND "),
        )
    }
}

/// `type_sql` for a cast whose result is then assigned to a column of that type. An
/// explicit cast to `character varying(n)`, `character(n)` or `bit(n)` cuts a longer
/// value to n silently (the SQL standard's rule), where assigning it to the column
/// refuses it: so the cast goes to the type without its length, and the column's
/// own length is checked on assignment. Other types' modifiers round the same way
/// either way, and stay.
pub(crate) fn cast_type(type_sql: &str) -> std::borrow::Cow<'_, str> {
    let (base, array) = match type_sql.strip_suffix("[]") {
        Some(b) => (b, "[]"),
        None => (type_sql, ""),
    };
    let Some(open) = base.find('(').filter(|_| base.ends_with(')')) else {
        return std::borrow::Cow::Borrowed(type_sql);
    };
    let unlimited = match &base[..open] {
        "character varying" => "character varying",
        "character" => "bpchar",
        "bit varying" | "bit" => "bit varying",
        _ => return std::borrow::Cow::Borrowed(type_sql),
    };
    std::borrow::Cow::Owned(format!("{unlimited}{array}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cast_keeps_no_length_that_would_cut_a_value_short() {
        assert_eq!(cast_type("character varying(20)"), "character varying");
        assert_eq!(cast_type("character(3)"), "bpchar");
        assert_eq!(cast_type("character varying(20)[]"), "character varying[]");
        assert_eq!(cast_type("bit(8)"), "bit varying");
        assert_eq!(cast_type("numeric(12,2)"), "numeric(12,2)");
        assert_eq!(
            cast_type("timestamp(3) with time zone"),
            "timestamp(3) with time zone"
        );
        assert_eq!(cast_type("text"), "text");
    }
}
