//! Orphaned references: rows of a configured table whose foreign key names a parent
//! row that does not exist on the same node. duplex applies in replica mode, where
//! PostgreSQL does not check foreign keys, so this is where a lost or misordered
//! parent would show.

use crate::pg::node::{NodeError, SqlContext};
use crate::pg::sql::quote_ident;
use tokio_postgres::Client;

/// Rows of one foreign key without their parent, on one node.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Orphans {
    pub node: String,
    pub table: String,
    pub constraint: String,
    pub parent: String,
    pub rows: i64,
}

/// Every foreign key of `table` (`schema.table`) on `node` whose child rows lack a
/// parent, with how many.
pub(crate) async fn find(
    client: &Client,
    node: &str,
    table: &str,
) -> Result<Vec<Orphans>, NodeError> {
    let fks = client
        .query(
            "SELECT c.conname::text, c.confrelid::regclass::text,
                    (SELECT array_agg(a.attname::text ORDER BY k.n) FROM unnest(c.conkey) WITH ORDINALITY k(att, n)
                     JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.att),
                    (SELECT array_agg(a.attname::text ORDER BY k.n) FROM unnest(c.confkey) WITH ORDINALITY k(att, n)
                     JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.att)
             FROM pg_constraint c WHERE c.contype = 'f' AND c.conrelid = $1::text::regclass
             ORDER BY c.conname",
            &[&table],
        )
        .await
        .sql(node, format!("reading the foreign keys of {table}"))?;
    let mut out = Vec::new();
    for fk in fks {
        let (name, parent, cols, pcols): (String, String, Vec<String>, Vec<String>) =
            (fk.get(0), fk.get(1), fk.get(2), fk.get(3));
        let present: Vec<String> = cols
            .iter()
            .map(|c| format!("c.{} IS NOT NULL", quote_ident(c)))
            .collect();
        let join: Vec<String> = cols
            .iter()
            .zip(&pcols)
            .map(|(c, p)| format!("p.{} = c.{}", quote_ident(p), quote_ident(c)))
            .collect();
        let child = table.split_once('.').map_or_else(
            || quote_ident(table),
            |(s, t)| crate::event::TableName::new(s, t).quoted(),
        );
        let rows: i64 = client
            .query_one(
                &format!(
                    "SELECT count(*) FROM {child} c WHERE {} AND NOT EXISTS (SELECT 1 FROM {parent} p WHERE {})",
                    present.join(" AND "),
                    join.join(" AND ")
                ),
                &[],
            )
            .await
            .sql(node, format!("counting orphans of {name}"))?
            .get(0);
        if rows > 0 {
            out.push(Orphans {
                node: node.to_string(),
                table: table.to_string(),
                constraint: name,
                parent,
                rows,
            });
        }
    }
    Ok(out)
}
