//! `duplex verify --repair`: makes the rows verify found different equal under
//! last-writer-wins, the rule the stream applies.
//!
//! Each differing key is copied both ways through the initial sync's merge path:
//! each node takes the other's version only if it is newer (ties go to
//! `sync.tie_winner`), and a version older than a tombstone on the receiving node is
//! not taken. The copies run under duplex's replication origins, so they are not sent
//! back. A key then still missing on one node was deleted there after the other
//! node's version was written: the delete wins, and the row is deleted on the other
//! node as the application would delete it (its tombstone and the stream follow).

use super::compare::{self, Pair};
use super::VerifyError;
use crate::config::{Config, Direction, TableConfig};
use crate::pg::node::{sql_err, NodeError};
use crate::snapshot::copy::CopyWorker;
use crate::snapshot::table::CopyTable;
use tokio_postgres::Client;

/// Repairs `keys` of table `tc`; returns how many keys were written on either node.
pub(crate) async fn repair(
    cfg: &Config,
    pair: &Pair<'_>,
    tc: &TableConfig,
    keys: &[Vec<String>],
) -> Result<usize, VerifyError> {
    if keys.is_empty() {
        return Ok(0);
    }
    let (first, second) = pair.names;
    for (from, to, src, dst) in [
        (first, second, pair.clients.0, pair.clients.1),
        (second, first, pair.clients.1, pair.clients.0),
    ] {
        let dir = Direction {
            from: from.to_string(),
            to: to.to_string(),
        };
        let t = CopyTable::describe(src, dst, &dir, tc).await?;
        let mut worker = CopyWorker::connect(cfg, &dir, 0).await?;
        for key in keys {
            worker.copy_key(&t, key).await?;
        }
    }
    // What the merges could not settle: a row one node deleted later than the other
    // node's version was written.
    let dir = Direction {
        from: first.to_string(),
        to: second.to_string(),
    };
    let t = CopyTable::describe(pair.clients.0, pair.clients.1, &dir, tc).await?;
    let (ra, rb) = compare::rows_of(pair, &t, keys).await?;
    for key in keys {
        match (ra.contains_key(key), rb.contains_key(key)) {
            (true, false) => delete(pair.clients.0, first, &t, key).await?,
            (false, true) => delete(pair.clients.1, second, &t, key).await?,
            _ => {}
        }
    }
    Ok(keys.len())
}

async fn delete(
    client: &Client,
    node: &str,
    t: &CopyTable,
    key: &[String],
) -> Result<(), NodeError> {
    client
        .execute(
            &format!("DELETE FROM {} WHERE {}", t.sql_name, t.key_equals(key)),
            &[],
        )
        .await
        .map_err(sql_err(node, format!("deleting a row of {}", t.name)))?;
    Ok(())
}
