//! Hot standby: two `duplex run` processes on one config, one doing the work while the
//! other waits to take over.
//!
//! Each component holds a [`Lease`] while it works: a PostgreSQL session-level
//! advisory lock, on its own session, on the node the component works on (a node's
//! capture: that node, whose slot it reads; a direction's apply: the target, which
//! holds its positions). The same component in another instance finds the lock taken
//! and waits, trying again every [`poll_interval`]. When the active process dies, the
//! node ends its sessions and releases the lock; the waiting component takes it and
//! starts from the durable positions (the slot's confirmed LSN, the target's stored
//! offset), exactly as after a restart, so nothing is applied twice.
//!
//! The bound is `standby.takeover_ms` (T). A working component checks its lock
//! session every T/4 and stops working when a check fails or goes unanswered for T/4:
//! within T/2 of losing its node. The lock session asks the node (TCP keepalives: idle
//! T/2, then 3 probes T/12 apart) to end it, and so release the lock, only after the
//! client went silent for 3T/4: later than the holder stops, and early enough for a
//! waiting instance, trying every T/5 (at most 1 s), to take over within T.

use crate::config::Config;
use crate::metrics::{ComponentState, Health};
use crate::pg::error::SqlContext;
use crate::pg::node::{self, NodeError};
use crate::runtime::Stop;
use crate::{Classify, ErrorClass};
use std::time::Duration;
use tokio_postgres::Client;

/// Errors holding a component's lease.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("node {node}: lost the lock of {component} ({reason}); stopped it so that another instance may take over")]
    Lost {
        node: String,
        component: String,
        reason: String,
    },
}

impl From<crate::pg::error::SqlError> for LeaseError {
    fn from(e: crate::pg::error::SqlError) -> Self {
        LeaseError::Node(NodeError::Sql(e))
    }
}

impl Classify for LeaseError {
    fn class(&self) -> ErrorClass {
        match self {
            LeaseError::Node(e) => e.class(),
            LeaseError::Lost { .. } => ErrorClass::Transient,
        }
    }
}

/// How often a waiting component tries the lock.
pub fn poll_interval(cfg: &Config) -> Duration {
    Duration::from_millis((cfg.standby.takeover_ms / 5).min(1_000))
}

/// How often, and how patiently, a working component checks its lock session.
fn check_interval(cfg: &Config) -> Duration {
    Duration::from_millis(cfg.standby.takeover_ms / 4)
}

/// A component's exclusive right to work, held as long as the value lives.
pub struct Lease {
    client: Client,
    node: String,
    component: String,
    check_every: Duration,
}

impl Lease {
    /// Takes the lock of `component` on `node`, waiting while another instance holds
    /// it (the component is reported as standing by meanwhile, in `health` if it is
    /// one of the instance's). `None` when `stop` came first.
    pub async fn acquire(
        cfg: &Config,
        node: &str,
        component: &str,
        health: Option<&Health>,
        stop: &Stop,
    ) -> Result<Option<Lease>, LeaseError> {
        let client = node::connect(cfg, node, &format!("lock {component}")).await?;
        // The node ends this session (and releases the lock) when duplex goes silent.
        let idle_s = (cfg.standby.takeover_ms / 2_000).max(1);
        let interval_s = (cfg.standby.takeover_ms / 12_000).max(1);
        client
            .batch_execute(&format!(
                "SET tcp_keepalives_idle = {idle_s}; SET tcp_keepalives_interval = {interval_s}; \
                 SET tcp_keepalives_count = 3"
            ))
            .await
            .sql(node, "setting keepalives of the lock session")?;
        let key = lock_key(cfg, node, component);
        let mut waiting = false;
        loop {
            let row = client
                .query_one(
                    "SELECT pg_try_advisory_lock(hashtextextended($1, 0))",
                    &[&key],
                )
                .await
                .sql(node, "taking the standby lock")?;
            if row.get::<_, bool>(0) {
                if waiting {
                    tracing::info!(component, node, "the other instance let go: taking over");
                }
                return Ok(Some(Lease {
                    client,
                    node: node.to_string(),
                    component: component.to_string(),
                    check_every: check_interval(cfg),
                }));
            }
            if end_silent_holder(cfg, &client, node, &key).await? {
                tracing::warn!(component, node, "the lock's holder had been silent for longer than standby.takeover_ms (its instance stopped working, or its connection to the node is stalled): ended its session");
                continue;
            }
            if !waiting {
                match health {
                    Some(health) => {
                        tracing::info!(
                            component,
                            node,
                            "another instance does this work: standing by"
                        );
                        health.set_state(component, ComponentState::Standby);
                    }
                    // Not a component: the holder may be another task of this instance.
                    None => tracing::info!(component, node, "waiting for the lock's holder"),
                }
                waiting = true;
            }
            tokio::select! {
                _ = tokio::time::sleep(poll_interval(cfg)) => {}
                _ = stop.requested() => return Ok(None),
            }
        }
    }

    /// Resolves when the lock can no longer be trusted: its session closed (noticed
    /// within [`CLOSED_CHECK`]), failed, or did not answer a check in time. Never
    /// resolves while the lock holds.
    pub async fn lost(&mut self) -> LeaseError {
        let mut next_check = tokio::time::Instant::now() + self.check_every;
        let reason = loop {
            tokio::time::sleep(CLOSED_CHECK).await;
            if self.client.is_closed() {
                break "the lock session was closed".to_string();
            }
            if tokio::time::Instant::now() < next_check {
                continue;
            }
            let check = self.client.simple_query("SELECT 1");
            match tokio::time::timeout(self.check_every, check).await {
                Ok(Ok(_)) => next_check = tokio::time::Instant::now() + self.check_every,
                Ok(Err(e)) => break node::describe(&e),
                Err(_) => {
                    break format!(
                        "the lock session did not answer within {} ms",
                        self.check_every.as_millis()
                    )
                }
            }
        };
        LeaseError::Lost {
            node: self.node.clone(),
            component: self.component.clone(),
            reason,
        }
    }
}

/// Ends the session holding the lock `key` if the node has heard nothing from it for
/// longer than T. A working holder checks its session every T/4 and stops within T/2
/// when a check goes unanswered, so such a holder no longer works: its process is
/// gone or frozen, or its connection stalled somewhere the node cannot tell (a hung
/// middlebox still answers TCP keepalives). Its component's own fences stay: the slot
/// and the replication origin take one session at a time. True if it ended one.
async fn end_silent_holder(
    cfg: &Config,
    client: &Client,
    node: &str,
    key: &str,
) -> Result<bool, NodeError> {
    let silent_s = cfg.standby.takeover_ms as f64 / 1000.0;
    let ended = client
        .query_opt(
            "SELECT duplex.terminate_backend(a.pid, 5000)
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid,
                  (SELECT hashtextextended($1, 0) AS v) k
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND l.classid = ((k.v >> 32) & 4294967295)::oid
               AND l.objid = (k.v & 4294967295)::oid
               AND a.state = 'idle'
               AND clock_timestamp() - a.state_change > $2 * interval '1 second'",
            &[&key, &silent_s],
        )
        .await
        .sql(node, "looking at the standby lock's holder")?;
    Ok(ended.is_some_and(|r| r.get::<_, bool>(0)))
}

/// How often a working component looks whether its lock session was closed (a local
/// check, no round trip): a session the node ended stops the work this fast.
const CLOSED_CHECK: Duration = Duration::from_millis(100);

/// The lock's name: unique per deployment (slot names are unique on a cluster) and
/// component. PostgreSQL hashes it into the advisory lock's key.
fn lock_key(cfg: &Config, node: &str, component: &str) -> String {
    format!("duplex {} {component}", cfg.slot_name(node))
}

/// Runs `work` while holding the lease of `component` on `node`: waits as a standby
/// while another instance holds it, and stops `work` (as a transient error, so the
/// component waits for the lock again) if the lease is lost. `Ok(())` on stop.
pub async fn run_leased<E, Fut>(
    cfg: &Config,
    node: &str,
    component: &str,
    health: &Health,
    stop: &Stop,
    work: impl FnOnce() -> Fut,
) -> Result<(), E>
where
    E: From<LeaseError>,
    Fut: std::future::Future<Output = Result<(), E>>,
{
    let Some(mut lease) = Lease::acquire(cfg, node, component, Some(health), stop).await? else {
        return Ok(());
    };
    health.set(component, false);
    tokio::select! {
        r = work() => r,
        lost = lease.lost() => {
            tracing::warn!(component, error = %lost, "stopping");
            Err(lost.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(takeover_ms: u64) -> Config {
        let text = format!(
            r#"
            [nodes.a]
            url = "postgres://u@127.0.0.1:5432/d"
            [nodes.b]
            url = "postgres://u@127.0.0.1:5433/d"
            [kafka]
            brokers = "127.0.0.1:9092"
            [[tables]]
            name = "public.t"
            [standby]
            takeover_ms = {takeover_ms}
            "#
        );
        Config::parse(&text).unwrap()
    }

    #[test]
    fn checks_and_polls_fit_in_the_takeover_bound() {
        for takeover in [5_000, 15_000, 120_000] {
            let c = cfg(takeover);
            // A holder cut off notices within two check intervals: T/2, before the
            // node drops its silent session (keepalive idle T/2 plus 3 probes).
            assert!(check_interval(&c) * 2 <= Duration::from_millis(takeover / 2));
            assert!(poll_interval(&c) <= Duration::from_millis(takeover / 5));
        }
    }

    #[test]
    fn lock_names_differ_per_component_and_deployment() {
        let c = cfg(15_000);
        assert_ne!(
            lock_key(&c, "a", "source a"),
            lock_key(&c, "a", "apply b_to_a")
        );
        assert!(lock_key(&c, "a", "source a").contains(&c.slot_name("a")));
    }

    #[test]
    fn takeover_below_the_minimum_is_refused() {
        let e = cfg(500).validate().unwrap_err().to_string();
        assert!(e.contains("standby.takeover_ms"), "{e}");
    }
}
