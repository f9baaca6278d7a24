//! Preflight checks: everything duplex needs from the nodes and the broker, found
//! before streaming starts rather than halfway through.
//!
//! `duplex check` prints every problem [`check_all`] finds, one line each, and fails
//! unless each is a warning ([`WARNING`]: a risk, not a fault); the reader runs
//! [`node_problems`] on its own node at start and stops with them if there are any,
//! since none of them goes away by retrying. [`acls`] checks what the Kafka
//! principal may do.

mod acls;
mod drift;

use crate::config::{Config, EchoFilter, ORIGIN_PREFIX};
use crate::pg::node::NodeError;
use std::time::Duration;
use tokio_postgres::Client;
use tracing::Instrument;

/// Finds every problem with the configured nodes and broker; empty when all is well.
pub async fn check_all(cfg: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    let sources = cfg.source_nodes();
    let mut clients = std::collections::BTreeMap::new();
    for node in cfg.nodes.keys() {
        match crate::pg::node::connect(cfg, node, "check").await {
            Ok(client) => {
                let is_source = sources.contains(node);
                match node_problems(cfg, node, &client, is_source).await {
                    Ok(p) => problems.extend(p),
                    Err(e) => problems.push(format!("node {node}: checking failed: {e}")),
                }
                if is_source {
                    problems.extend(replication_problem(cfg, node).await);
                }
                clients.insert(node.clone(), client);
            }
            Err(e) => problems.push(format!("{e}")),
        }
    }
    // The mappings, once both tables exist on both nodes.
    if problems.is_empty() {
        problems.extend(crate::mapping::check::problems(cfg, &clients).await);
    }
    problems.extend(drift::warnings(cfg, &clients).await);
    problems.extend(broker_problems(cfg).await);
    problems
}

/// Whether the brokers answer and accept duplex (its credentials, their certificate),
/// then what its principal may not do that duplex needs, and the change topics'
/// settings.
async fn broker_problems(cfg: &Config) -> Vec<String> {
    use crate::kafka::BrokerError;
    match crate::kafka::reach(&cfg.kafka).await {
        Ok(()) => {
            let mut lines = acls::problems(cfg).await;
            lines.extend(topic_problems(cfg).await);
            lines
        }
        Err(e @ (BrokerError::Credentials(_) | BrokerError::Certificate(_))) => {
            vec![format!("kafka: {e}")]
        }
        Err(e) => vec![format!(
            "kafka: brokers {} unreachable: {e}",
            cfg.kafka.brokers
        )],
    }
}

/// How a line of [`check_all`] that does not fail `duplex check` begins.
pub const WARNING: &str = "warning: ";

/// Whether a line of [`check_all`] is a warning.
pub fn is_warning(line: &str) -> bool {
    line.starts_with(WARNING)
}

/// The existing change topics' settings that would lose changes or stall writes (see
/// [`crate::kafka::topic::findings`]); a topic not created yet has none, as duplex
/// creates it with the settings it needs. Settings the client may not read (no
/// DESCRIBE_CONFIGS right) are a warning: duplex runs without that right.
async fn topic_problems(cfg: &Config) -> Vec<String> {
    use crate::kafka::topic::{self, Severity};
    let mut lines = Vec::new();
    for node in cfg.source_nodes() {
        let name = cfg.topic(&node);
        match topic::describe(&cfg.kafka, &name).await {
            Ok(None) => {}
            Ok(Some(settings)) => lines.extend(topic::findings(&name, &settings).into_iter().map(
                |f| match f.severity {
                    Severity::Error => f.text,
                    Severity::Warning => format!("{WARNING}{}", f.text),
                },
            )),
            Err(e) => lines.push(format!(
                "{WARNING}kafka: topic {name}: its settings could not be checked: {e}"
            )),
        }
    }
    lines
}

/// Opens a replication connection the way `duplex run` does (its own TLS handshake
/// and authentication, and pg_hba.conf's `replication` lines) and identifies the node.
async fn replication_problem(cfg: &Config, node: &str) -> Option<String> {
    let identified = async {
        crate::pg::node::replication(cfg, node, "check")
            .await?
            .identify_system()
            .await
            .map_err(|source| NodeError::Walsender {
                node: node.to_string(),
                context: "replication connection".into(),
                source: Box::new(source),
            })
    };
    Some(identified.await.err()?.to_string())
}

/// What a role that is not a superuser lacks to apply on `node` (replication origins,
/// `session_replication_role`, `deadlock_timeout`), on a server of `version`
/// (`server_version_num`).
async fn target_privilege_problems(
    client: &Client,
    node: &str,
    user: &str,
    version: i32,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let mut problems = Vec::new();
    let major = version / 10000;
    if version < 140000 {
        // PostgreSQL 13's replication origin functions check for a superuser
        // themselves; from 14 they go by EXECUTE privileges.
        problems.push(format!(
            "node {node}: role {user} may not use replication origins: on PostgreSQL {major} only a superuser may (ALTER ROLE {user} SUPERUSER)"
        ));
    }
    let origins: bool = version < 140000
        || client
            .query_one(
                "SELECT has_function_privilege('pg_replication_origin_session_setup(text)', 'EXECUTE')",
                &[],
            )
            .await?
            .get(0);
    if !origins {
        problems.push(format!(
            "node {node}: role {user} may not use replication origins; run GRANT EXECUTE ON FUNCTION pg_replication_origin_session_setup(text), pg_replication_origin_create(text) TO {user}"
        ));
    }
    if version < 150000 {
        // GRANT SET ON PARAMETER came with PostgreSQL 15: before it, only a superuser
        // may set these.
        problems.push(format!(
            "node {node}: role {user} may not set session_replication_role, which apply sessions need: on PostgreSQL {major} only a superuser may (ALTER ROLE {user} SUPERUSER), or upgrade the node to 15 or newer and GRANT SET ON PARAMETER session_replication_role TO {user}"
        ));
        problems.push(format!(
            "node {node}: role {user} may not set deadlock_timeout, so in a deadlock between duplex and the application the application's transaction may be aborted: on PostgreSQL {major} only a superuser may"
        ));
        return Ok(problems);
    }
    let row = client
        .query_one(
            "SELECT has_parameter_privilege('session_replication_role', 'SET'),
                    has_parameter_privilege('deadlock_timeout', 'SET')",
            &[],
        )
        .await?;
    if !row.get::<_, bool>(0) {
        problems.push(format!(
            "node {node}: role {user} may not set session_replication_role; run GRANT SET ON PARAMETER session_replication_role TO {user}"
        ));
    }
    if !row.get::<_, bool>(1) {
        problems.push(format!(
            "node {node}: role {user} may not set deadlock_timeout, so in a deadlock between duplex and the application the application's transaction may be aborted; run GRANT SET ON PARAMETER deadlock_timeout TO {user}"
        ));
    }
    Ok(problems)
}

/// Whether `node`'s cluster has room for the replication origins duplex writes under
/// there ([`Config::origins_on`]): each keeps a replay state, and the cluster caps
/// them (`max_active_replication_origins` from PostgreSQL 18, default 10;
/// `max_replication_slots` before). Past the cap a copy worker or the apply session
/// fails to set its origin up.
async fn origin_room_problem(
    cfg: &Config,
    node: &str,
    client: &Client,
    version: i32,
) -> Result<Option<String>, tokio_postgres::Error> {
    let ours = cfg.origins_on(node);
    if ours.is_empty() {
        return Ok(None);
    }
    let setting = if version >= 180000 {
        "max_active_replication_origins"
    } else {
        "max_replication_slots"
    };
    let row = client
        .query_one(
            "SELECT current_setting($1)::int,
                    has_table_privilege('pg_replication_origin_status', 'SELECT')",
            &[&setting],
        )
        .await?;
    let (cap, readable): (i32, bool) = (row.get(0), row.get(1));
    // Other origins' replay states (a native subscription's, another deployment's)
    // count against the same cap; only a superuser may see them by default.
    let others: i64 = if readable {
        client
            .query_one(
                "SELECT count(*) FROM pg_replication_origin_status s
                 JOIN pg_replication_origin o ON o.roident = s.local_id
                 WHERE NOT o.roname = ANY($1)",
                &[&ours],
            )
            .await?
            .get(0)
    } else {
        0
    };
    let need = others + ours.len() as i64;
    Ok((need > i64::from(cap)).then(|| {
        format!(
            "node {node}: duplex writes under up to {} replication origins here (per direction into it, one to apply and one per snapshot.workers copy worker, two with mapped tables){}, but {setting} = {cap} caps their replay states: set {setting} = {need} or more in postgresql.conf and restart PostgreSQL, or lower snapshot.workers",
            ours.len(),
            if others > 0 {
                format!(", and {others} other origins on the cluster hold replay states")
            } else {
                String::new()
            }
        )
    }))
}

/// Replication origins of other software on `node` (a native subscription's
/// `pg_<oid>`, another tool's), when its walsender is to drop what duplex applies
/// there: from PostgreSQL 16 with `source.echo_filter = "node"` it drops what those
/// apply too, and their changes would not reach the peer.
async fn echo_filter_problem(
    cfg: &Config,
    client: &Client,
    node: &str,
    version: i32,
) -> Result<Option<String>, tokio_postgres::Error> {
    if cfg.source.echo_filter != EchoFilter::Node || version < 160000 {
        return Ok(None);
    }
    let others: Vec<String> = client
        .query(
            "SELECT roname FROM pg_replication_origin WHERE left(roname, length($1)) <> $1
             ORDER BY roname LIMIT 5",
            &[&ORIGIN_PREFIX],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok((!others.is_empty()).then(|| {
        format!(
            "node {node}: replication origins of other software exist on its cluster ({}): with source.echo_filter = \"node\" its walsender drops what they apply here as it drops what duplex applies, and the peer would never get those changes; set source.echo_filter = \"duplex\" to forward them",
            others.join(", ")
        )
    }))
}

/// What keeps `node`'s failover slot from carrying on after its standby is promoted:
/// no failover slots before PostgreSQL 17; and without `synchronized_standby_slots`
/// the primary sends duplex changes its standby may not have yet, which a promotion
/// would take from the node after the peer applied them.
async fn failover_problem(
    client: &Client,
    node: &str,
    version: i32,
) -> Result<Option<String>, tokio_postgres::Error> {
    if version < 170000 {
        return Ok(Some(format!(
            "node {node}: nodes.{node}.failover_slot needs PostgreSQL 17 or newer, and this node runs {version}"
        )));
    }
    let standbys: String = client
        .query_one("SELECT current_setting('synchronized_standby_slots')", &[])
        .await?
        .get(0);
    // A warning: right after a failover the new primary has no standby yet, and
    // duplex must run there all the same.
    Ok(standbys.trim().is_empty().then(|| {
        format!(
            "{WARNING}node {node}: nodes.{node}.failover_slot is set, but synchronized_standby_slots is empty: the node may send duplex changes its standby has not received, and after the standby is promoted the peer would hold changes the new primary never had. Set synchronized_standby_slots to the standby's physical slot in postgresql.conf and reload"
        )
    }))
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
    if version < 130000 {
        problems.push(format!(
            "node {node}: PostgreSQL {version} is too old; duplex needs 13 or newer"
        ));
    }
    if is_source && wal_level != "logical" {
        problems.push(format!(
            "node {node}: wal_level is {wal_level}; set wal_level = logical in postgresql.conf and restart PostgreSQL"
        ));
    }
    if is_source {
        problems.extend(echo_filter_problem(cfg, client, node, version).await?);
    }
    if is_source && cfg.nodes.get(node).is_some_and(|n| n.failover_slot) {
        problems.extend(failover_problem(client, node, version).await?);
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
        problems.extend(target_privilege_problems(client, node, &user, version).await?);
    }
    problems.extend(origin_room_problem(cfg, node, client, version).await?);
    // `duplex setup` creates the duplex schema and the publication.
    let row = client
        .query_one(
            "SELECT has_database_privilege(current_database(), 'CREATE'), current_database()::text,
                    to_regnamespace('duplex') IS NOT NULL
                    AND EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)",
            &[&cfg.publication_name(node)],
        )
        .await?;
    if !row.get::<_, bool>(0) && !row.get::<_, bool>(2) {
        let db: String = row.get(1);
        problems.push(format!(
            "node {node}: role {user} may not create the duplex schema and publication; run GRANT CREATE ON DATABASE {db} TO {user}"
        ));
    }
    let mut naive = Vec::new();
    for t in &cfg.tables {
        let (p, local) = table_problems(client, node, t.name_on(node), &t.updated_at).await?;
        problems.extend(p);
        if local {
            naive.push(t);
        }
    }
    if !naive.is_empty() {
        if let Some(zone) = default_time_zone(cfg, node).await.filter(|z| !is_utc(z)) {
            for t in naive {
                problems.push(format!(
                    "node {node}: table {table}: {col} is a timestamp without time zone and new sessions here use TimeZone {zone}; duplex reads such a column as UTC, so an application writing local time there would be ordered wrongly against deletes and the clock. Make it timestamptz (ALTER TABLE {table} ALTER {col} TYPE timestamptz USING {col} AT TIME ZONE '{zone}'), or, if the application writes UTC, set the database's time zone to UTC (ALTER DATABASE ... SET TimeZone = 'UTC')",
                    table = t.name_on(node),
                    col = t.updated_at,
                ));
            }
        }
    }
    Ok(problems)
}

/// Names PostgreSQL knows for UTC, lowercased.
const UTC_NAMES: &[&str] = &[
    "utc",
    "etc/utc",
    "uct",
    "etc/uct",
    "gmt",
    "etc/gmt",
    "gmt0",
    "etc/gmt0",
    "gmt+0",
    "gmt-0",
    "etc/gmt+0",
    "etc/gmt-0",
    "greenwich",
    "etc/greenwich",
    "universal",
    "etc/universal",
    "zulu",
    "etc/zulu",
];

fn is_utc(zone: &str) -> bool {
    UTC_NAMES.contains(&zone.to_ascii_lowercase().as_str())
}

/// The time zone a new session on `node` gets (duplex's own sessions set UTC, so this
/// asks over a plain connection); `None` when that cannot be learnt.
async fn default_time_zone(cfg: &Config, node: &str) -> Option<String> {
    let pg = cfg.nodes.get(node)?.pg_config().ok()?;
    let tls = crate::pg::node::tls_of(cfg, node).ok()?;
    let timeout = Duration::from_millis(cfg.source.connect_timeout_ms);
    let (client, connection) = tokio::time::timeout(timeout, pg.connect(tls))
        .await
        .ok()?
        .ok()?;
    let task = tokio::spawn(connection.instrument(tracing::info_span!(
        "pg_connection",
        node,
        purpose = "time zone check"
    )));
    let zone = client
        .query_one("SHOW TimeZone", &[])
        .await
        .ok()
        .map(|r| r.get(0));
    drop(client);
    let _ = task.await;
    zone
}

/// Problems with one table, and whether its `updated_at` is a timestamp without time
/// zone.
async fn table_problems(
    client: &Client,
    node: &str,
    table: &str,
    updated_at: &str,
) -> Result<(Vec<String>, bool), tokio_postgres::Error> {
    let (schema, name) = table.split_once('.').unwrap_or(("public", table));
    let row = client
        .query_opt(
            "SELECT c.oid,
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
                    EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid
                            AND a.attname = $3 AND a.attnum > 0 AND NOT a.attisdropped),
                    EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid
                            AND a.attname = $3 AND NOT a.attisdropped
                            AND a.atttypid = 'timestamp'::regtype),
                    pg_has_role(c.relowner, 'USAGE'), current_user::text
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&schema, &name, &updated_at],
        )
        .await?;
    let Some(row) = row else {
        return Ok((
            vec![format!(
                "node {node}: table {table} does not exist; create it or remove it from [[tables]]"
            )],
            false,
        ));
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
    // Publishing a table and adding triggers to it take its owner's rights.
    if !row.get::<_, bool>(4) {
        let user: String = row.get(5);
        problems.push(format!(
            "node {node}: role {user} does not own table {table}, which duplex publishes and adds its triggers to; run ALTER TABLE {table} OWNER TO {user} (or GRANT the owner role TO {user})"
        ));
    }
    Ok((problems, row.get(3)))
}
