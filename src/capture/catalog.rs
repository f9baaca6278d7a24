//! The catalog query capture needs for each relation the stream announces: column
//! types as `format_type` prints them, and the primary key.

use crate::capture::assembler::TableInfo;
use crate::capture::pgoutput::Relation;

/// Column types (as `format_type` prints them) and primary key of a relation.
pub(crate) async fn table_info(
    client: &tokio_postgres::Client,
    rel: &Relation,
) -> Result<TableInfo, tokio_postgres::Error> {
    let oids: Vec<u32> = rel.columns.iter().map(|c| c.type_oid).collect();
    let mods: Vec<i32> = rel.columns.iter().map(|c| c.type_modifier).collect();
    let types = client
        .query(
            "SELECT format_type(o, m) FROM unnest($1::oid[], $2::int4[]) WITH ORDINALITY AS u(o, m, n) ORDER BY n",
            &[&oids, &mods],
        )
        .await?
        .iter()
        .map(|r| r.get::<_, Option<String>>(0).unwrap_or_default())
        .collect();
    let mut key: Vec<String> = client
        .query(
            "SELECT a.attname::text FROM pg_index i
             CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE i.indrelid = $1 AND i.indisprimary ORDER BY k.n",
            &[&rel.id],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if key.is_empty() {
        // No primary key (preflight refuses such tables, but a table may lose it while
        // streaming): fall back to the replica identity the stream declares.
        key = rel
            .columns
            .iter()
            .filter(|c| c.is_key)
            .map(|c| c.name.clone())
            .collect();
    }
    Ok(TableInfo {
        schema: rel.namespace.clone(),
        name: rel.name.clone(),
        columns: rel.columns.iter().map(|c| c.name.clone()).collect(),
        types,
        key,
    })
}
