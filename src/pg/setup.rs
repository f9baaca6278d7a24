//! What duplex keeps on a node, created and removed idempotently: its `duplex`
//! schema, the publication of the configured tables, the logical replication slot and
//! the replication origins of apply sessions.
//!
//! `setup` creates whatever is missing and brings the publication's table list in line
//! with the config; `teardown` removes all of it (an orphaned slot keeps WAL forever,
//! so removal must be one safe command). Both run over an ordinary SQL session.

use super::node::{connect, NodeError, SqlContext};
use crate::config::Config;
use crate::event::{KEY_PAIRS, REPAIRS, TOMBSTONES, TRUNCATIONS};
use crate::pg::sql::quote_ident;
use tokio_postgres::Client;

/// How long setup's DDL waits for a lock before it fails (and is retried).
const SETUP_LOCK_TIMEOUT_MS: u64 = 5_000;

/// What setup may do about a slot duplex created before and that has disappeared or
/// that PostgreSQL invalidated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostSlot {
    /// Stop with [`NodeError::SlotLost`]: the daemon never papers over lost changes.
    Refuse,
    /// Create it again (dropping an invalidated one first): the operator ran `duplex
    /// setup` to resynchronise.
    Recreate,
}

/// Creates what is missing on `node` for the configured directions.
pub async fn setup(cfg: &Config, node: &str, lost: LostSlot) -> Result<Vec<String>, NodeError> {
    let client = connect(cfg, node, "setup").await?;
    // DDL that waits for a lock holds up every write queued behind it: give up soon
    // and retry later rather than stall the application.
    // Readers and appliers may set up the same node at once; DDL must not race. The
    // notices of IF NOT EXISTS on every start are noise.
    client
        .batch_execute(&format!(
            "SET client_min_messages = warning; SET lock_timeout = {SETUP_LOCK_TIMEOUT_MS}; SELECT pg_advisory_lock(hashtext('duplex setup'))"
        ))
        .await
        .sql(node, "taking the setup lock")?;
    let mut done = super::state::migrations::migrate(&client, node).await?;
    let directions = cfg.directions().map_err(|e| NodeError::Config {
        node: node.to_string(),
        detail: e.to_string(),
    })?;
    done.extend(crate::pg::triggers::ensure_triggers(cfg, &client, node).await?);
    if directions.iter().any(|d| d.from == node) {
        done.extend(ensure_publication(cfg, &client, node).await?);
        // Creating a slot waits for every transaction running on the cluster to end:
        // no lock timeout there, an application's long transaction is no error.
        client
            .batch_execute("SET lock_timeout = 0")
            .await
            .sql(node, "resetting lock_timeout")?;
        done.extend(ensure_slot(cfg, &client, node, lost).await?);
    }
    for d in directions.iter().filter(|d| d.to == node) {
        let origin = cfg.origin_name(d);
        if ensure_origin(&client, node, &origin).await? {
            done.push(format!("created replication origin {origin}"));
        }
    }
    client
        .batch_execute("SELECT pg_advisory_unlock(hashtext('duplex setup'))")
        .await
        .sql(node, "releasing the setup lock")?;
    Ok(done)
}

/// Creates replication origin `origin` unless it exists; returns whether it did.
pub(crate) async fn ensure_origin(
    client: &Client,
    node: &str,
    origin: &str,
) -> Result<bool, NodeError> {
    Ok(client
        .query_one(
            "SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = $1)
             THEN false ELSE pg_replication_origin_create($1) IS NOT NULL END",
            &[&origin],
        )
        .await
        .sql(node, format!("creating replication origin {origin}"))?
        .get(0))
}

/// The publication lists exactly the configured tables.
async fn ensure_publication(
    cfg: &Config,
    client: &Client,
    node: &str,
) -> Result<Option<String>, NodeError> {
    let publication = cfg.publication_name(node);
    // duplex.tombstones travels too: its rows give the peer each delete's exact time;
    // so does duplex.repairs, the winners of conflicts lost on this node.
    let tables: Vec<String> = cfg
        .tables
        .iter()
        .map(|t| {
            let (s, n) = t.schema_table_on(node);
            crate::event::TableName::new(s, n).quoted()
        })
        .chain([TOMBSTONES, TRUNCATIONS, REPAIRS, KEY_PAIRS].map(|(s, n)| format!("{s}.{n}")))
        .collect();
    // Partitioned tables are published under their own name, not their partitions'.
    let via_root: Option<bool> = client
        .query_opt(
            "SELECT pubviaroot FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .sql(node, "reading pg_publication")?
        .map(|r| r.get(0));
    let exists = via_root.is_some();
    // ALTER PUBLICATION only when the list differs: setup runs on every reconnect.
    let mut want: Vec<(String, String)> = cfg
        .tables
        .iter()
        .map(|t| {
            let (s, n) = t.schema_table_on(node);
            (s.to_string(), n.to_string())
        })
        .chain(
            [TOMBSTONES, TRUNCATIONS, REPAIRS, KEY_PAIRS]
                .map(|(s, n)| (s.to_string(), n.to_string())),
        )
        .collect();
    want.sort();
    let mut have: Vec<(String, String)> = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables
             WHERE pubname = $1 ORDER BY 1, 2",
            &[&publication],
        )
        .await
        .sql(node, "reading pg_publication_tables")?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    have.sort();
    if via_root == Some(true) && have == want {
        return Ok(None);
    }
    let (sql, what) = if exists {
        let sql = format!(
            "ALTER PUBLICATION {0} SET TABLE {1}; ALTER PUBLICATION {0} SET (publish_via_partition_root = true)",
            quote_ident(&publication),
            tables.join(", ")
        );
        (
            sql,
            format!("publication {publication} lists {} table(s)", tables.len()),
        )
    } else {
        let sql = format!(
            "CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)",
            quote_ident(&publication),
            tables.join(", ")
        );
        (sql, format!("created publication {publication}"))
    };
    client
        .batch_execute(&sql)
        .await
        .sql(node, format!("writing publication {publication}"))?;
    Ok(Some(what))
}

/// The slot exists and is duplex's; else it is created, unless duplex created it
/// before (`duplex.slots` remembers that) and `lost` refuses: a slot that vanished
/// (dropped, a failover to a standby, a restore) took the changes since with it.
async fn ensure_slot(
    cfg: &Config,
    client: &Client,
    node: &str,
    lost: LostSlot,
) -> Result<Option<String>, NodeError> {
    let slot = cfg.slot_name(node);
    let row = client
        .query_opt(
            // invalidation_reason exists from PostgreSQL 17 (read through jsonb, so
            // that older servers answer NULL rather than fail).
            "SELECT plugin, database, wal_status, coalesce(confirmed_flush_lsn::text, '?'),
                    to_jsonb(s) ->> 'invalidation_reason', to_jsonb(s) ->> 'failover'
             FROM pg_replication_slots s WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .sql(node, "reading pg_replication_slots")?;
    let row = match row {
        // PostgreSQL invalidated the slot (its WAL removed, or from 17 another
        // reason): it can never stream again. Only the operator's `duplex setup`
        // replaces it.
        Some(row)
            if row.get::<_, Option<String>>(2).as_deref() == Some("lost")
                || row.get::<_, Option<String>>(4).is_some() =>
        {
            if lost == LostSlot::Refuse {
                return Err(NodeError::SlotInvalidated {
                    node: node.to_string(),
                    slot,
                    confirmed: row.get(3),
                    reason: row.get(4),
                });
            }
            client
                .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                .await
                .sql(node, format!("dropping invalidated slot {slot}"))?;
            None
        }
        row => row,
    };
    if let Some(row) = row {
        let plugin: Option<String> = row.get(0);
        if plugin.as_deref() != Some("pgoutput") {
            return Err(NodeError::Config {
                node: node.to_string(),
                detail: format!("slot {slot} exists but is not a pgoutput logical slot; drop it or set nodes.{node}.slot"),
            });
        }
        // Slot names are per cluster: another deployment may hold this one.
        let database: Option<String> = row.get(1);
        let here: String = client
            .query_one("SELECT current_database()::text", &[])
            .await
            .sql(node, "reading the database name")?
            .get(0);
        if database.as_deref() != Some(here.as_str()) {
            return Err(NodeError::Config {
                node: node.to_string(),
                detail: format!(
                    "slot {slot} belongs to database {}, not {here}: slot names are shared by the whole cluster; set nodes.{node}.slot to a name of this deployment's own",
                    database.as_deref().unwrap_or("?")
                ),
            });
        }
        // A slot made before duplex kept this record: remember it from now on.
        client
            .execute(
                "INSERT INTO duplex.slots (slot_name, created_lsn)
                 SELECT slot_name, coalesce(confirmed_flush_lsn, restart_lsn, '0/0')
                 FROM pg_replication_slots WHERE slot_name = $1
                 ON CONFLICT (slot_name) DO NOTHING",
                &[&slot],
            )
            .await
            .sql(node, "writing duplex.slots")?;
        let failover: Option<String> = row.get(5);
        return match_failover(cfg, node, &slot, failover.as_deref()).await;
    }
    let before = client
        .query_opt(
            "SELECT created_lsn::text, created_at::text FROM duplex.slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .sql(node, "reading duplex.slots")?;
    if let (Some(row), LostSlot::Refuse) = (&before, lost) {
        return Err(NodeError::SlotLost {
            node: node.to_string(),
            slot,
            created_lsn: row.get(0),
            created_at: row.get(1),
        });
    }
    // Alone in its statement: the less the session holds while the slot waits for
    // concurrent transactions, the better. A slot made but not yet recorded is
    // recorded by the next setup, which finds it.
    let failover = cfg.nodes[node].failover_slot;
    if failover {
        failover_supported(client, node).await?;
    }
    let created: String = client
        .query_one(
            if failover {
                "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)"
            } else {
                "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')"
            },
            &[&slot],
        )
        .await
        .map_err(|source| NodeError::SlotCreation {
            node: node.to_string(),
            slot: slot.clone(),
            source,
        })?
        .get(0);
    client
        .execute(
            "INSERT INTO duplex.slots (slot_name, created_lsn) VALUES ($1, $2::text::pg_lsn)
             ON CONFLICT (slot_name) DO UPDATE
             SET created_lsn = EXCLUDED.created_lsn, created_at = now(), stream = EXCLUDED.stream",
            &[&slot, &created],
        )
        .await
        .sql(node, "writing duplex.slots")?;
    let kind = if failover { "failover slot" } else { "slot" };
    Ok(Some(match before {
        Some(_) => format!(
            "created replication {kind} {slot} again (it had been lost or invalidated; changes made meanwhile were not read)"
        ),
        None => format!("created replication {kind} {slot}"),
    }))
}

/// Refuses `nodes.<node>.failover_slot` on a server before PostgreSQL 17, which has no
/// failover slots.
async fn failover_supported(client: &Client, node: &str) -> Result<(), NodeError> {
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .sql(node, "reading server_version_num")?
        .get(0);
    if version < 170000 {
        return Err(NodeError::Config {
            node: node.to_string(),
            detail: format!("nodes.{node}.failover_slot needs PostgreSQL 17 or newer, and this node runs {version}: remove the setting, or upgrade the node"),
        });
    }
    Ok(())
}

/// Sets the existing slot's `failover` flag (`current`: PostgreSQL 17 and later, else
/// `None`) to `nodes.<node>.failover_slot`, over a replication connection
/// (`ALTER_REPLICATION_SLOT`, which needs the slot unused: `duplex setup` with duplex
/// stopped, or `duplex run` before it reads).
async fn match_failover(
    cfg: &Config,
    node: &str,
    slot: &str,
    current: Option<&str>,
) -> Result<Option<String>, NodeError> {
    let want = cfg.nodes[node].failover_slot;
    match current {
        None if want => Err(NodeError::Config {
            node: node.to_string(),
            detail: format!("nodes.{node}.failover_slot needs PostgreSQL 17 or newer, whose slots can fail over: remove the setting, or upgrade the node"),
        }),
        None => Ok(None),
        Some(flag) if (flag == "true") == want => Ok(None),
        Some(_) => {
            let mut wal = super::node::replication(cfg, node, "setup").await?;
            let sql = format!(
                "ALTER_REPLICATION_SLOT {} (FAILOVER {want})",
                super::sql::quote_ident(slot)
            );
            wal.simple_query(&sql)
                .await
                .map_err(|source| NodeError::Walsender {
                    node: node.to_string(),
                    context: format!("setting failover {want} on replication slot {slot}"),
                    source: Box::new(source),
                })?;
            Ok(Some(format!("set failover {want} on replication slot {slot}")))
        }
    }
}

/// Removes duplex's slot, publication, origins and schema from `node`.
pub async fn teardown(cfg: &Config, node: &str) -> Result<Vec<String>, NodeError> {
    let client = connect(cfg, node, "teardown").await?;
    let mut done = Vec::new();
    let slot = cfg.slot_name(node);
    let row = client
        .query_opt(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .sql(node, "reading pg_replication_slots")?;
    if let Some(row) = row {
        if let Some(pid) = row.get::<_, Option<i32>>(0) {
            return Err(NodeError::SlotActive {
                node: node.to_string(),
                slot,
                pid,
            });
        }
        client
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
            .sql(node, format!("dropping slot {slot}"))?;
        done.push(format!("dropped replication slot {slot}"));
    }
    let publication = cfg.publication_name(node);
    let n = client
        .execute(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .sql(node, "reading pg_publication")?;
    if n > 0 {
        client
            .batch_execute(&format!("DROP PUBLICATION {}", quote_ident(&publication)))
            .await
            .sql(node, format!("dropping publication {publication}"))?;
        done.push(format!("dropped publication {publication}"));
    }
    // Only this deployment's origins: another one may share the cluster.
    for d in cfg
        .directions()
        .unwrap_or_default()
        .iter()
        .filter(|d| d.to == node)
    {
        // The direction's own origin and those of its snapshot's copy workers.
        let origin = cfg.origin_name(d);
        let dropped = client
            .query(
                "SELECT roname::text, pg_replication_origin_drop(roname) FROM pg_replication_origin
                 WHERE roname = $1 OR roname LIKE $1 || '\\_copy%'",
                &[&origin],
            )
            .await
            .sql(node, format!("dropping replication origin {origin}"))?;
        for row in dropped {
            let name: String = row.get(0);
            done.push(format!("dropped replication origin {name}"));
        }
    }
    let had_schema = client
        .execute("SELECT 1 FROM pg_namespace WHERE nspname = 'duplex'", &[])
        .await
        .sql(node, "reading pg_namespace")?;
    if had_schema > 0 {
        client
            .batch_execute("DROP SCHEMA duplex CASCADE")
            .await
            .sql(node, "dropping schema duplex")?;
        done.push("dropped schema duplex".into());
    }
    Ok(done)
}
