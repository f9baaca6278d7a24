//! Preflight checks: everything duplex needs from the nodes and the broker, found
//! before streaming starts rather than halfway through.
//!
//! `duplex check` prints every problem [`check_all`] finds, one line each; the reader
//! runs [`node_problems`] on its own node at start and stops with them if there are
//! any, since none of them goes away by retrying.

use crate::config::Config;
use crate::sink::kafka::client_config;
use rdkafka::producer::{BaseProducer, Producer};
use std::time::Duration;
use tokio_postgres::Client;

/// Finds every problem with the configured nodes and broker; empty when all is well.
pub async fn check_all(cfg: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    let sources = cfg.source_nodes();
    for node in cfg.nodes.keys() {
        match crate::source::slot::connect(cfg, node, "check").await {
            Ok(client) => {
                let is_source = sources.contains(node);
                match node_problems(cfg, node, &client, is_source).await {
                    Ok(p) => problems.extend(p),
                    Err(e) => problems.push(format!("node {node}: checking failed: {e}")),
                }
            }
            Err(e) => problems.push(format!("{e}")),
        }
    }
    if let Err(e) = check_broker(cfg).await {
        problems.push(format!(
            "kafka: brokers {} unreachable: {e}",
            cfg.kafka.brokers
        ));
    }
    problems
}

/// Problems on one node, as lines for the operator.
pub async fn node_problems(
    cfg: &Config,
    node: &str,
    client: &Client,
    is_source: bool,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let mut problems = Vec::new();
    let row = client
        .query_one(
            "SELECT current_setting('wal_level'), current_setting('server_encoding'),
                    r.rolsuper, r.rolreplication, current_user::text,
                    current_setting('server_version_num')::int
             FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await?;
    let (wal_level, encoding): (String, String) = (row.get(0), row.get(1));
    let (superuser, replication, user): (bool, bool, String) = (row.get(2), row.get(3), row.get(4));
    let version: i32 = row.get(5);
    if version < 150000 {
        problems.push(format!(
            "node {node}: PostgreSQL {version} is too old; duplex needs 15 or newer"
        ));
    }
    if is_source && wal_level != "logical" {
        problems.push(format!(
            "node {node}: wal_level is {wal_level}; set wal_level = logical in postgresql.conf and restart PostgreSQL"
        ));
    }
    if is_source && !superuser && !replication {
        problems.push(format!(
            "node {node}: role {user} may not replicate; run ALTER ROLE {user} REPLICATION"
        ));
    }
    if encoding != "UTF8" {
        problems.push(format!(
            "node {node}: server_encoding is {encoding}; duplex needs a UTF8 database"
        ));
    }
    let is_target = cfg
        .directions()
        .unwrap_or_default()
        .iter()
        .any(|d| d.to == node);
    if is_target && !superuser {
        let row = client
            .query_one(
                "SELECT has_function_privilege('pg_replication_origin_session_setup(text)', 'EXECUTE'),
                        has_parameter_privilege('session_replication_role', 'SET')",
                &[],
            )
            .await?;
        if !row.get::<_, bool>(0) {
            problems.push(format!(
                "node {node}: role {user} may not use replication origins; run GRANT EXECUTE ON FUNCTION pg_replication_origin_session_setup(text), pg_replication_origin_create(text) TO {user}"
            ));
        }
        if !row.get::<_, bool>(1) {
            problems.push(format!(
                "node {node}: role {user} may not set session_replication_role; run GRANT SET ON PARAMETER session_replication_role TO {user}"
            ));
        }
    }
    for t in &cfg.tables {
        problems.extend(table_problems(client, node, &t.name, &t.updated_at).await?);
    }
    Ok(problems)
}

async fn table_problems(
    client: &Client,
    node: &str,
    table: &str,
    updated_at: &str,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let (schema, name) = table.split_once('.').unwrap_or(("public", table));
    let row = client
        .query_opt(
            "SELECT c.oid,
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
                    EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid
                            AND a.attname = $3 AND a.attnum > 0 AND NOT a.attisdropped)
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&schema, &name, &updated_at],
        )
        .await?;
    let Some(row) = row else {
        return Ok(vec![format!(
            "node {node}: table {table} does not exist; create it or remove it from [[tables]]"
        )]);
    };
    let mut problems = Vec::new();
    if !row.get::<_, bool>(1) {
        problems.push(format!(
            "node {node}: table {table} has no primary key; duplex needs one to identify rows"
        ));
    }
    if !row.get::<_, bool>(2) {
        problems.push(format!(
            "node {node}: table {table} has no column {updated_at}; add it or set updated_at for this table"
        ));
    }
    Ok(problems)
}

/// Asks the brokers for cluster metadata.
pub async fn check_broker(cfg: &Config) -> Result<(), String> {
    let cc = client_config(&cfg.kafka);
    tokio::task::spawn_blocking(move || {
        let producer: BaseProducer = cc.create().map_err(|e| e.to_string())?;
        producer
            .client()
            .fetch_metadata(None, Duration::from_secs(10))
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}
