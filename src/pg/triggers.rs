//! What duplex installs on the application's tables: per table, a tombstone function
//! with its delete and key-change triggers, and an identity function and trigger where
//! the table derives its id.
//!
//! Creating a trigger locks the table against writes, so [`ensure_triggers`] compares
//! each function's source and its triggers with what it would create and runs DDL only
//! when something differs or is missing (the setup session also sets a lock timeout):
//! a reconnect never queues behind, and in front of, the application's transactions.

use super::node::{NodeError, SqlContext};
use crate::config::{Config, IdentityConfig};
use crate::identity::namespace;
use crate::pg::sql::{quote_ident, quote_literal, OUTPUT_SETTINGS};
use tokio_postgres::Client;

/// A trigger function and the triggers calling it, as DDL.
pub struct TriggerDdl {
    /// `duplex.name`, unquoted (duplex's names need no quoting).
    pub function: String,
    /// The function's source, between the dollar quotes.
    pub body: String,
    /// The triggers' names.
    pub triggers: Vec<&'static str>,
    /// Creates or replaces the function and the triggers.
    pub sql: String,
}

/// How duplex's trigger functions run, whoever writes the table: as the role that ran
/// `setup` (the application's roles need no grants on schema `duplex`), with a search
/// path nobody can plant objects in, and with the session settings the reader and the
/// apply sessions use, so that a key printed as text here matches the key the stream
/// carries byte for byte.
pub fn trigger_function_settings() -> String {
    let mut s = String::from("SECURITY DEFINER SET search_path = pg_catalog, pg_temp");
    for (k, v) in OUTPUT_SETTINGS
        .iter()
        .filter(|(k, _)| *k != "client_encoding")
    {
        s.push_str(&format!(" SET {k} = {}", quote_literal(v)));
    }
    s
}

/// A stable name for a per-table object of duplex: `prefix_` and 16 hex digits of
/// the FNV-1a hash of the configured table name (identifiers are limited to 63 bytes).
pub fn per_table_name(prefix: &str, table: &str) -> String {
    let hash = table.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{prefix}_{hash:016x}")
}

/// The tombstone function and triggers of a table: a delete, or an update that
/// changes the key, records (table, key, now) in `duplex.tombstones` in the same
/// transaction, and a truncate records (table, now) in `duplex.truncations`. Key values are printed by their type's output function (`concat(x)`;
/// `x::text` differs for bool and inet), as pgoutput prints them. Apply sessions run as replica, where these triggers do not fire:
/// they write tombstones themselves, with the source's delete time.
fn tombstone_ddl(table_name: &str, table: &str, key: &[String]) -> TriggerDdl {
    let function = format!("duplex.{}", per_table_name("tombstone", table_name));
    let old: Vec<String> = key
        .iter()
        .map(|k| format!("concat(OLD.{})", quote_ident(k)))
        .collect();
    let row = |rec: &str| -> String {
        let cols: Vec<String> = key
            .iter()
            .map(|k| format!("{rec}.{}", quote_ident(k)))
            .collect();
        format!("ROW({})", cols.join(", "))
    };
    let body = format!(
        "
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        INSERT INTO duplex.truncations (table_name, truncated_at, origin)
        VALUES ({name}, clock_timestamp(), 'local')
        ON CONFLICT (table_name) DO UPDATE
            SET truncated_at = EXCLUDED.truncated_at, origin = EXCLUDED.origin;
        RETURN NULL;
    END IF;
    INSERT INTO duplex.tombstones (table_name, key, deleted_at, origin)
    VALUES ({name}, jsonb_build_array({old}), clock_timestamp(), 'local')
    ON CONFLICT (table_name, key) DO UPDATE
        SET deleted_at = EXCLUDED.deleted_at, origin = EXCLUDED.origin;
    RETURN NULL;
END ",
        name = quote_literal(table_name),
        old = old.join(", "),
    );
    let sql = format!(
        "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql {settings} AS $fn${body}$fn$;
CREATE OR REPLACE TRIGGER duplex_tombstone AFTER DELETE ON {table}
    FOR EACH ROW EXECUTE FUNCTION {function}();
CREATE OR REPLACE TRIGGER duplex_tombstone_key AFTER UPDATE ON {table}
    FOR EACH ROW WHEN ({old_row} IS DISTINCT FROM {new_row}) EXECUTE FUNCTION {function}();
CREATE OR REPLACE TRIGGER duplex_truncation BEFORE TRUNCATE ON {table}
    FOR EACH STATEMENT EXECUTE FUNCTION {function}();",
        settings = trigger_function_settings(),
        old_row = row("OLD"),
        new_row = row("NEW"),
    );
    TriggerDdl {
        function,
        body,
        triggers: vec![
            "duplex_tombstone",
            "duplex_tombstone_key",
            "duplex_truncation",
        ],
        sql,
    }
}

/// Runs `ddl` on `table` unless its function has that source already and every one
/// of its triggers exists on the table calling it. Returns whether it ran.
async fn install(
    client: &Client,
    node: &str,
    table: &str,
    ddl: &TriggerDdl,
    what: &str,
) -> Result<bool, NodeError> {
    let current: bool = client
        .query_opt(
            "SELECT p.prosrc = $2 AND p.prosecdef
                    AND (SELECT count(*) FROM pg_trigger t
                         WHERE t.tgrelid = $3::text::regclass AND t.tgfoid = p.oid
                           AND t.tgname = ANY($4)) = cardinality($4)
             FROM pg_proc p WHERE p.oid = to_regproc($1)",
            &[&ddl.function, &ddl.body, &table, &ddl.triggers],
        )
        .await
        .sql(node, format!("reading {what}"))?
        .is_some_and(|r| r.get(0));
    if current {
        return Ok(false);
    }
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .sql(node, "reading server_version_num")?
        .get(0);
    client
        .batch_execute(&for_server(&ddl.sql, table, version))
        .await
        .sql(node, format!("creating {what}"))?;
    Ok(true)
}

/// `sql` for a server of `version` (`server_version_num`): before PostgreSQL 14,
/// which has no `CREATE OR REPLACE TRIGGER`, each trigger on `table` is dropped if it
/// exists and created again, in the same transaction.
fn for_server(sql: &str, table: &str, version: i32) -> String {
    if version >= 140000 {
        return sql.to_string();
    }
    sql.lines()
        .map(
            |line| match line.strip_prefix("CREATE OR REPLACE TRIGGER ") {
                Some(rest) => {
                    let name = rest.split_whitespace().next().unwrap_or_default();
                    format!("DROP TRIGGER IF EXISTS {name} ON {table};\nCREATE TRIGGER {rest}")
                }
                None => line.to_string(),
            },
        )
        .collect::<Vec<_>>()
        .join("\n")
}

/// Tombstone triggers on every configured table, and identity triggers where a table
/// derives its id.
pub async fn ensure_triggers(
    cfg: &Config,
    client: &Client,
    node: &str,
) -> Result<Vec<String>, NodeError> {
    let mut done = Vec::new();
    for t in &cfg.tables {
        let (schema, name) = t.schema_table_on(node);
        let table = crate::event::TableName::new(schema, name).quoted();
        let on = t.name_on(node);
        let key: Vec<String> = client
            .query(
                "SELECT a.attname::text FROM pg_index i
                 CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                 WHERE i.indrelid = $1::text::regclass AND i.indisprimary ORDER BY k.n",
                &[&table],
            )
            .await
            .sql(node, format!("reading the primary key of {on}"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if key.is_empty() {
            return Err(NodeError::Config {
                node: node.to_string(),
                detail: format!("table {on} has no primary key"),
            });
        }
        let ddl = tombstone_ddl(on, &table, &key);
        let what = format!("the tombstone triggers on {on}");
        if install(client, node, &table, &ddl, &what).await? {
            done.push(format!("{on}: tombstone triggers"));
        }
        if let Some(id) = &t.identity {
            let ext = uuid_ossp_schema(client, node).await?;
            let ddl = identity_ddl(&t.name, &table, id, &ext);
            let what = format!("the identity trigger on {}", t.name);
            if install(client, node, &table, &ddl, &what).await? {
                done.push(format!("{}: identity trigger on {}", t.name, id.column));
            }
        }
    }
    Ok(done)
}

/// Installs uuid-ossp (for `uuid_generate_v5`) unless present; returns its schema.
async fn uuid_ossp_schema(client: &Client, node: &str) -> Result<String, NodeError> {
    client
        .batch_execute("CREATE EXTENSION IF NOT EXISTS \"uuid-ossp\" WITH SCHEMA duplex")
        .await
        .sql(node, "installing the uuid-ossp extension")?;
    let row = client
        .query_one(
            "SELECT extnamespace::regnamespace::text FROM pg_extension WHERE extname = 'uuid-ossp'",
            &[],
        )
        .await
        .sql(node, "finding the uuid-ossp extension")?;
    Ok(row.get::<_, String>(0).trim_matches('"').to_string())
}

/// SQL creating the trigger that fills in a missing id on `table` (quoted; configured
/// as `table_name`) and rejects a row whose id disagrees with its natural key, with
/// `uuid_generate_v5` from the uuid-ossp extension installed in `ext_schema`. Each
/// natural-key column is printed by its type's output function (`concat_ws` does so;
/// `col::text` would print a bool as `true`, not `t`) under duplex's fixed output
/// settings, as pgoutput prints it and the apply side checks. Applied rows are checked
/// by the apply side instead: apply sessions run as replica, where this trigger does
/// not fire.
fn identity_ddl(
    table_name: &str,
    table: &str,
    id: &IdentityConfig,
    ext_schema: &str,
) -> TriggerDdl {
    let (q, literal) = (quote_ident, quote_literal);
    let function = format!("duplex.{}", per_table_name("identity", table_name));
    let checks: Vec<String> = id
        .from
        .iter()
        .map(|c| {
            format!(
                "    IF NEW.{col} IS NULL THEN
        RAISE EXCEPTION 'duplex: natural-key column % of % is NULL', {name}, {tbl};
    END IF;",
                col = q(c),
                name = literal(c),
                tbl = literal(table_name),
            )
        })
        .collect();
    let values: Vec<String> = id.from.iter().map(|c| format!("NEW.{}", q(c))).collect();
    let body = format!(
        r#"
DECLARE
    derived uuid;
BEGIN
{checks}
    derived := {ext}.uuid_generate_v5({ns}::uuid, concat_ws(E'\x1f', {values}));
    IF NEW.{col} IS NULL THEN
        NEW.{col} := derived;
    ELSIF NEW.{col} <> derived THEN
        RAISE EXCEPTION 'duplex: % of % is % but its natural key derives %',
            {col_name}, {tbl}, NEW.{col}, derived;
    END IF;
    RETURN NEW;
END "#,
        checks = checks.join("\n"),
        ext = q(ext_schema),
        ns = literal(&namespace(&id.namespace).to_string()),
        values = values.join(", "),
        col = q(&id.column),
        col_name = literal(&id.column),
        tbl = literal(table_name),
    );
    let sql = format!(
        "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql {settings} AS $fn${body}$fn$;
CREATE OR REPLACE TRIGGER duplex_identity BEFORE INSERT OR UPDATE ON {table}
    FOR EACH ROW EXECUTE FUNCTION {function}();",
        settings = crate::pg::triggers::trigger_function_settings(),
    );
    crate::pg::triggers::TriggerDdl {
        function,
        body,
        triggers: vec!["duplex_identity"],
        sql,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tombstone_triggers_print_keys_by_output_function_and_fire_on_key_changes() {
        let ddl = tombstone_ddl(
            "public.items",
            "\"public\".\"items\"",
            &["id".into(), "at".into()],
        );
        assert!(ddl.function.starts_with("duplex.tombstone_"));
        assert!(ddl
            .body
            .contains("jsonb_build_array(concat(OLD.\"id\"), concat(OLD.\"at\"))"));
        assert!(ddl.sql.contains(&format!("$fn${}$fn$", ddl.body)));
        assert!(ddl.sql.contains(
            "WHEN (ROW(OLD.\"id\", OLD.\"at\") IS DISTINCT FROM ROW(NEW.\"id\", NEW.\"at\"))"
        ));
        assert!(ddl
            .sql
            .contains("SECURITY DEFINER SET search_path = pg_catalog, pg_temp"));
        assert!(ddl.sql.contains("SET TimeZone = 'UTC'"));
        // PostgreSQL 13 has no CREATE OR REPLACE TRIGGER.
        let on_13 = for_server(&ddl.sql, "\"public\".\"items\"", 130023);
        assert!(!on_13.contains("OR REPLACE TRIGGER"), "{on_13}");
        for t in &ddl.triggers {
            assert!(
                on_13.contains(&format!(
                    "DROP TRIGGER IF EXISTS {t} ON \"public\".\"items\";\nCREATE TRIGGER {t} "
                )),
                "{on_13}"
            );
        }
        assert_eq!(for_server(&ddl.sql, "x", 140000), ddl.sql);
        // Stable across runs, distinct per table.
        assert_eq!(
            per_table_name("t", "public.items"),
            per_table_name("t", "public.items")
        );
        assert_ne!(
            per_table_name("t", "public.items"),
            per_table_name("t", "public.item")
        );
    }
}
