//! A copy worker's replication origin (`<direction origin>_copy<n>`), taken back from
//! a session left behind.
//!
//! The origin takes one session at a time. An instance that lost its node in the
//! middle of a chunk (a dead route, a hung middlebox) leaves its session on the node:
//! waiting for COPY data that never comes, or idle in its transaction. The node ends
//! it only when TCP gives up: with the keepalives duplex sets
//! ([`crate::pg::node::keepalive_sql`]) after about `sync.receive_timeout_ms` on a
//! dead route, and never while a hung middlebox answers the probes. Meanwhile every
//! later attempt, the standby's too, fails with 55006.
//!
//! So the worker that meets 55006 looks at the holder: a session of the same worker
//! (same `application_name`, on this database) that the node has heard nothing from
//! for `sync.receive_timeout_ms` is ended. Silence is judged by the node: idle (in a
//! transaction or not) since longer than that, or in a COPY waiting for the client
//! (`ClientRead`) whose bytes received (`pg_stat_progress_copy`) and state did not
//! move while this worker watched for that long. A holder working on the node (a
//! statement running, waiting for a lock) is waited for, until the worker gives up
//! with the 55006 (transient: the direction tries again).

use super::SnapshotError;
use crate::config::{Config, Direction};
use crate::pg::error::SqlError;
use crate::pg::node::SqlContext;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// How often the worker tries the origin again.
const RETRY_EVERY: Duration = Duration::from_millis(250);

/// How long past `sync.receive_timeout_ms` the worker keeps trying: a killed
/// session's release, or a working holder's end.
const PATIENCE: Duration = Duration::from_secs(5);

/// How the node sees a session holding the origin.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Holder {
    pub pid: i32,
    pub state: String,
    pub wait_event: String,
    /// Seconds since its state last changed, by the node's clock.
    pub state_age_s: f64,
    /// When its state last changed, as the node prints it.
    pub state_change: String,
    /// Bytes its COPY received so far (`None`: not in a COPY).
    pub copy_bytes: Option<i64>,
}

/// What the worker saw of each holder, to tell a silent COPY from a slow one.
#[derive(Default)]
pub(crate) struct Watch {
    /// Per server process: since when it looks the same, and how.
    same_since: HashMap<i32, (Instant, String, Option<i64>)>,
}

impl Watch {
    /// Whether `h`, seen `now`, has been silent for `silent`.
    pub(crate) fn silent(&mut self, h: &Holder, now: Instant, silent: Duration) -> bool {
        if h.state.starts_with("idle") {
            return h.state_age_s > silent.as_secs_f64();
        }
        let mark = (h.state_change.clone(), h.copy_bytes);
        let since = match self.same_since.get(&h.pid) {
            Some((since, change, bytes)) if (change, bytes) == (&mark.0, &mark.1) => *since,
            _ => {
                self.same_since.insert(h.pid, (now, mark.0, mark.1));
                now
            }
        };
        h.state == "active"
            && h.wait_event == "ClientRead"
            && h.copy_bytes.is_some()
            && h.state_age_s > silent.as_secs_f64()
            && now.duration_since(since) >= silent
    }
}

/// Sets `target`'s replication origin to `origin`, ending a silent earlier session
/// of this worker (`application_name` "duplex `purpose`") that holds it.
pub(crate) async fn take(
    cfg: &Config,
    dir: &Direction,
    target: &Client,
    origin: &str,
    purpose: &str,
) -> Result<(), SnapshotError> {
    let silent = Duration::from_millis(cfg.sync.receive_timeout_ms);
    let give_up = Instant::now() + silent + PATIENCE;
    let mut watch = Watch::default();
    let setup = "SELECT pg_replication_origin_session_setup($1)";
    loop {
        let Err(e) = target.execute(setup, &[&origin]).await else {
            return Ok(());
        };
        if e.code().map(|c| c.code()) != Some("55006") || Instant::now() > give_up {
            return Err(
                SqlError::on(&dir.to, format!("using replication origin {origin}"))(e).into(),
            );
        }
        for h in holders(target, dir, purpose).await? {
            if !watch.silent(&h, Instant::now(), silent) {
                continue;
            }
            target
                .execute("SELECT duplex.terminate_backend($1, 5000)", &[&h.pid])
                .await
                .sql(&dir.to, "ending a copy session left behind")?;
            tracing::warn!(direction = %dir, origin, pid = h.pid, state = %h.state,
                wait_event = %h.wait_event, "ended an earlier copy session that still held the replication origin, silent for longer than sync.receive_timeout_ms (its instance lost the node)");
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
}

/// The other sessions of this worker on the target's database. PostgreSQL 13 has no
/// `pg_stat_progress_copy`: there a holder's COPY shows no bytes, so it is never taken
/// for silent (a slow COPY and a stalled one look alike), and only TCP ends it.
async fn holders(
    target: &Client,
    dir: &Direction,
    purpose: &str,
) -> Result<Vec<Holder>, SnapshotError> {
    let progress: bool = target
        .query_one(
            "SELECT to_regclass('pg_catalog.pg_stat_progress_copy') IS NOT NULL",
            &[],
        )
        .await
        .sql(&dir.to, "looking for pg_stat_progress_copy")?
        .get(0);
    let (join, bytes) = if progress {
        (
            "LEFT JOIN pg_stat_progress_copy p USING (pid)",
            "p.bytes_processed",
        )
    } else {
        ("", "NULL::int8")
    };
    let rows = target
        .query(
            &format!(
                "SELECT a.pid, coalesce(a.state, ''), coalesce(a.wait_event, ''),
                        coalesce(extract(epoch FROM clock_timestamp() - a.state_change)::float8, 0),
                        coalesce(a.state_change::text, ''), {bytes}
                 FROM pg_stat_activity a {join}
                 WHERE a.datname = current_database() AND a.application_name = $1
                   AND a.pid <> pg_backend_pid()"
            ),
            &[&format!("duplex {purpose}")],
        )
        .await
        .sql(&dir.to, "looking for the session holding the origin")?;
    Ok(rows
        .iter()
        .map(|r| Holder {
            pid: r.get(0),
            state: r.get(1),
            wait_event: r.get(2),
            state_age_s: r.get(3),
            state_change: r.get(4),
            copy_bytes: r.get(5),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(state: &str, wait: &str, age_s: f64, bytes: Option<i64>) -> Holder {
        Holder {
            pid: 7,
            state: state.into(),
            wait_event: wait.into(),
            state_age_s: age_s,
            state_change: "2026-12-07 10:00:00+00".into(),
            copy_bytes: bytes,
        }
    }

    const T: Duration = Duration::from_secs(30);

    #[test]
    fn an_idle_holder_is_silent_after_the_timeout_by_the_nodes_clock() {
        let mut w = Watch::default();
        let now = Instant::now();
        assert!(w.silent(
            &holder("idle in transaction", "ClientRead", 31.0, None),
            now,
            T
        ));
        assert!(!w.silent(
            &holder("idle in transaction", "ClientRead", 29.0, None),
            now,
            T
        ));
        assert!(w.silent(&holder("idle", "ClientRead", 31.0, None), now, T));
    }

    #[test]
    fn a_copy_is_silent_once_it_received_nothing_for_the_timeout() {
        let mut w = Watch::default();
        let t0 = Instant::now();
        let stuck = holder("active", "ClientRead", 100.0, Some(4096));
        // Seen first now: not yet, whatever its age.
        assert!(!w.silent(&stuck, t0, T));
        assert!(!w.silent(&stuck, t0 + T / 2, T));
        assert!(w.silent(&stuck, t0 + T, T));
    }

    #[test]
    fn a_copy_that_receives_or_works_is_not_silent() {
        let mut w = Watch::default();
        let t0 = Instant::now();
        assert!(!w.silent(&holder("active", "ClientRead", 100.0, Some(4096)), t0, T));
        // More bytes arrived: watched afresh.
        let moving = holder("active", "ClientRead", 100.0 + T.as_secs_f64(), Some(8192));
        assert!(!w.silent(&moving, t0 + T, T));
        assert!(w.silent(&moving, t0 + 2 * T, T));
        // Waiting for a lock, or running: the node works on it.
        let mut w = Watch::default();
        let waiting = holder("active", "transactionid", 100.0, Some(4096));
        assert!(!w.silent(&waiting, t0, T));
        assert!(!w.silent(&waiting, t0 + 2 * T, T));
        let merging = holder("active", "", 100.0, None);
        assert!(!w.silent(&merging, t0, T));
        assert!(!w.silent(&merging, t0 + 2 * T, T));
    }
}
