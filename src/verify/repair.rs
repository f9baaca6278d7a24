//! `duplex verify --repair`: makes the rows verify found different equal under
//! last-writer-wins, the rule the stream applies, writing only where the stream
//! writes.
//!
//! Each differing key is copied through the initial sync's merge path in each
//! configured direction: the target takes the source's version only if it is newer
//! (ties go to `sync.tie_winner`), and a version older than a tombstone on the
//! target is not taken. The copies run under duplex's replication origins, so they
//! are not sent back. Then, for a row still on one node only:
//! - both ways: the other node refused it for a later delete, which wins: the row is
//!   deleted where it remains, as the application would delete it (its tombstone and
//!   the stream follow);
//! - one way, the row only on the target: it is deleted there only if the source
//!   holds a tombstone (or truncation) not older than it, the delete the stream
//!   would have applied; else it is left, and verify still reports it;
//! - one way, the row only on the source: the target's later delete refused it, and
//!   the source is never written: it is left, and reported.
//!
//! Rows are matched by key equality on each node ([`compare::rows_of`]): a key that
//! prints differently on the two nodes is never taken for two rows each missing
//! on one side.

use super::compare::{self, Pair};
use super::VerifyError;
use crate::config::{Config, Direction, TableConfig};
use crate::pg::node::{NodeError, SqlContext};
use crate::pg::sql::quote_ident;
use crate::snapshot::copy::CopyWorker;
use crate::snapshot::table::CopyTable;
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

/// Repairs `keys` of table `tc`; returns how many keys it worked on.
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
    let directions = cfg.directions().unwrap_or_default();
    let flows = |from: &str, to: &str| directions.iter().any(|d| d.from == from && d.to == to);
    for (from, to, src, dst) in [
        (first, second, pair.clients.0, pair.clients.1),
        (second, first, pair.clients.1, pair.clients.0),
    ] {
        if !flows(from, to) {
            continue;
        }
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
    let both_ways = flows(first, second) && flows(second, first);
    for key in keys {
        // (node holding the row alone, its session, the other node, its session)
        let alone = match (ra.contains_key(key), rb.contains_key(key)) {
            (true, false) => (first, pair.clients.0, second, pair.clients.1),
            (false, true) => (second, pair.clients.1, first, pair.clients.0),
            _ => continue,
        };
        let (node, client, other, other_client) = alone;
        let delete_it = if both_ways {
            true
        } else if flows(other, node) {
            deleted_later_on(other_client, other, client, node, &t, key).await?
        } else {
            false
        };
        if delete_it {
            delete(client, node, &t, key).await?;
        }
    }
    Ok(keys.len())
}

/// Whether `source` holds a tombstone of the key, or a truncation of the table, not
/// older than the row `target` holds under `key`: the delete the stream would apply.
/// Tombstones are keyed by the key's text as the deleting node printed it.
async fn deleted_later_on(
    source: &Client,
    source_node: &str,
    target: &Client,
    target_node: &str,
    t: &CopyTable,
    key: &[String],
) -> Result<bool, NodeError> {
    let own: Vec<String> = t
        .key
        .iter()
        .map(|(k, _)| format!("concat({})", quote_ident(k)))
        .collect();
    let equals: Vec<String> = t
        .key
        .iter()
        .enumerate()
        .map(|(i, (_, ty))| format!("${}::text::{ty}", i + 1))
        .collect();
    let params: Vec<&(dyn ToSql + Sync)> = key.iter().map(|k| k as &(dyn ToSql + Sync)).collect();
    let upd = &t.target.updated_at;
    let row = target
        .query_opt(
            &format!(
                "SELECT jsonb_build_array({})::text, {}::text FROM {} WHERE ({}) = ({})",
                own.join(", "),
                quote_ident(upd),
                t.sql_name,
                t.key_list(""),
                equals.join(", ")
            ),
            &params,
        )
        .await
        .sql(target_node, format!("reading a row of {}", t.name))?;
    let Some(row) = row else { return Ok(false) };
    let (tomb_key, version): (String, Option<String>) = (row.get(0), row.get(1));
    // A row without a version is older than any delete, as the merge takes it.
    let Some(version) = version else {
        return Ok(false);
    };
    // Compared as the merge compares them: the delete time against the version in
    // its own type.
    source
        .query_one(
            &format!(
                "SELECT EXISTS (SELECT 1 FROM duplex.tombstones WHERE table_name = $1
                                  AND key = $2::text::jsonb AND deleted_at >= $3::text::{ty})
                     OR EXISTS (SELECT 1 FROM duplex.truncations WHERE table_name = $1
                                  AND truncated_at >= $3::text::{ty})",
                ty = t.target.type_of(upd)
            ),
            &[&t.name, &tomb_key, &version],
        )
        .await
        .map(|r| r.get(0))
        .sql(source_node, format!("reading the tombstones of {}", t.name))
        .map_err(NodeError::from)
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
        .sql(node, format!("deleting a row of {}", t.name))?;
    Ok(())
}
