//! The `duplex` schema's numbered migrations (`migrations/NNNN_name.sql`), applied in
//! order, each in a transaction of its own together with its row in
//! `duplex.schema_version`, so that a node is always at one known version and an
//! upgrade of duplex on live nodes runs exactly the migrations the node lacks.
//!
//! A node set up before migrations existed is at version 1 (its setup recorded it):
//! from there, 0002 on. A node at the newest version runs no DDL at all, so that a
//! reconnect takes no lock. A node at a version newer than this duplex knows was set
//! up by a newer duplex, which this one refuses to run against.

use crate::pg::error::SqlError;
use crate::pg::node::{NodeError, SqlContext};
use tokio_postgres::Client;

/// One migration: its version, a name for logs, and its SQL.
pub(crate) struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, in order; versions are 1, 2, 3, … without holes.
pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "base",
        sql: include_str!("migrations/0001_base.sql"),
    },
    Migration {
        version: 2,
        name: "added_columns",
        sql: include_str!("migrations/0002_added_columns.sql"),
    },
    Migration {
        version: 3,
        name: "stream_starts",
        sql: include_str!("migrations/0003_stream_starts.sql"),
    },
    Migration {
        version: 4,
        name: "plan_generation",
        sql: include_str!("migrations/0004_plan_generation.sql"),
    },
    Migration {
        version: 5,
        name: "terminate_backend",
        sql: include_str!("migrations/0005_terminate_backend.sql"),
    },
    Migration {
        version: 6,
        name: "outbox",
        sql: include_str!("migrations/0006_outbox.sql"),
    },
    Migration {
        version: 7,
        name: "owed_columns",
        sql: include_str!("migrations/0007_owed_columns.sql"),
    },
];

/// The newest version this duplex knows.
pub(crate) fn latest() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// The migrations a node at `version` lacks, in order.
pub(crate) fn pending(version: i32) -> impl Iterator<Item = &'static Migration> {
    MIGRATIONS.iter().filter(move |m| m.version > version)
}

/// The node's schema version: 0 when it has no `duplex` schema yet.
pub(crate) async fn version(client: &Client, node: &str) -> Result<i32, NodeError> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('duplex.schema_version') IS NOT NULL",
            &[],
        )
        .await
        .sql(node, "reading duplex.schema_version")?
        .get(0);
    if !exists {
        return Ok(0);
    }
    Ok(client
        .query_one(
            "SELECT coalesce(max(version), 0) FROM duplex.schema_version",
            &[],
        )
        .await
        .sql(node, "reading duplex.schema_version")?
        .get(0))
}

/// Brings the node's `duplex` schema to the latest version; returns what it did. The
/// caller holds the setup lock, so that two sessions never migrate at once.
pub(crate) async fn migrate(client: &Client, node: &str) -> Result<Vec<String>, NodeError> {
    let at = version(client, node).await?;
    if at > latest() {
        return Err(NodeError::Config {
            node: node.to_string(),
            detail: format!(
                "its duplex schema is at version {at}, set up by a newer duplex than this one (which knows versions up to {}): run the newer duplex",
                latest()
            ),
        });
    }
    let mut done = Vec::new();
    if at == latest() {
        return Ok(done);
    }
    client
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS duplex;
             CREATE TABLE IF NOT EXISTS duplex.schema_version (
                 version integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );",
        )
        .await
        .sql(node, "creating schema duplex")?;
    for m in pending(at) {
        let sql = format!(
            "BEGIN;\n{}\nINSERT INTO duplex.schema_version (version) VALUES ({});\nCOMMIT;",
            m.sql, m.version
        );
        if let Err(e) = client.batch_execute(&sql).await {
            // The failed transaction is still open on the session.
            let _ = client.batch_execute("ROLLBACK").await;
            let context = format!(
                "migrating schema duplex to version {} ({})",
                m.version, m.name
            );
            return Err(SqlError::new(node, context, e).into());
        }
        tracing::info!(
            node,
            version = m.version,
            name = m.name,
            "migrated schema duplex"
        );
        done.push(format!(
            "migrated schema duplex to version {} ({})",
            m.version, m.name
        ));
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_run_from_one_without_holes() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i32 + 1, "{}", m.name);
            assert!(!m.sql.trim().is_empty(), "{}", m.name);
            // Each runs inside the runner's transaction: none may end it itself.
            let upper = m.sql.to_uppercase();
            assert!(
                !upper.contains("COMMIT;") && !upper.contains("BEGIN;"),
                "{}",
                m.name
            );
        }
    }

    #[test]
    fn a_node_gets_exactly_what_it_lacks() {
        let all: Vec<i32> = pending(0).map(|m| m.version).collect();
        assert_eq!(all, (1..=latest()).collect::<Vec<_>>());
        // A node set up before migrations existed recorded version 1.
        assert_eq!(pending(1).next().map(|m| m.version), Some(2));
        assert_eq!(pending(latest()).count(), 0);
    }
}
