//! Stalled apply sessions: a connection to the target that stops answering without
//! closing (a dead route, a hung middlebox, a proxy that stopped forwarding) would
//! otherwise hold the direction for as long as TCP takes to give up — hours.
//!
//! Every piece of the apply loop that waits on the target runs under
//! [`Watchdog::run`]. Silence alone proves nothing (a statement may wait for a row
//! lock the application holds), so after each `sync.receive_timeout_ms` without an
//! answer the watchdog asks the node, over a new connection, what the session's
//! server process is doing: still running the statement (or waiting for a lock) means
//! wait on; idle since before the last second, gone, or a node that cannot be reached
//! means the answer is lost, so the session is given up as stalled (a transient
//! error: the direction reconnects and writes its open transaction again from its
//! durable position). The idle server process is ended right away, so it releases
//! its row locks and the replication origin the next session needs.
//!
//! While the loop waits on something else with the session's transaction open (the
//! dead-letter queue's broker acknowledging a letter, up to 30 s), the session is
//! idle on purpose: the work marks that wait with [`Away`], and the watchdog does not
//! take it for a stall.

use crate::apply::error::ApplyError;
use crate::config::{Config, Direction};
use crate::lww::Away;
use crate::pg::error::SqlContext;
use crate::pg::node;
use std::future::Future;
use std::time::{Duration, Instant};

/// How the node sees the apply session's server process.
enum Probe {
    Working(String),
    Stalled(String),
}

/// Watches one apply session (its server process is `pid` on `dir.to`; its work marks
/// waits elsewhere in `away`).
#[derive(Clone)]
pub(crate) struct Watchdog<'a> {
    cfg: &'a Config,
    dir: &'a Direction,
    pid: i32,
    away: Away,
}

impl<'a> Watchdog<'a> {
    pub(crate) fn new(cfg: &'a Config, dir: &'a Direction, pid: i32, away: Away) -> Watchdog<'a> {
        Watchdog {
            cfg,
            dir,
            pid,
            away,
        }
    }

    fn every(&self) -> Duration {
        Duration::from_millis(self.cfg.sync.receive_timeout_ms)
    }

    /// Runs `work` (which waits on the apply session), asking the node after each
    /// `sync.receive_timeout_ms` whether the session still works; a stalled session
    /// ends `work` with [`ApplyError::TargetStalled`].
    pub(crate) async fn run<T>(
        &self,
        work: impl Future<Output = Result<T, ApplyError>>,
    ) -> Result<T, ApplyError> {
        tokio::pin!(work);
        let started = Instant::now();
        loop {
            tokio::select! {
                done = &mut work => return done,
                _ = tokio::time::sleep(self.every()) => {}
            }
            let waited_s = started.elapsed().as_secs_f64();
            if self.away.now() {
                tracing::info!(direction = %self.dir, waited_s,
                    "the apply session waits on the broker (dead-letter queue), not on the target");
                continue;
            }
            match self.ask_node().await {
                Probe::Working(what) => {
                    tracing::info!(direction = %self.dir, waited_s, state = %what,
                        "the target is still working on the apply session's statement");
                }
                Probe::Stalled(why) => {
                    return Err(ApplyError::TargetStalled {
                        direction: self.dir.to_string(),
                        to: self.dir.to.clone(),
                        waited_s,
                        why,
                    })
                }
            }
        }
    }

    async fn ask_node(&self) -> Probe {
        let node = &self.dir.to;
        let asked = tokio::time::timeout(self.every(), async {
            let client = node::connect(self.cfg, node, "stall check").await?;
            let row = client
                .query_opt(
                    "SELECT state, coalesce(wait_event_type || ' ' || wait_event, ''),
                            extract(epoch FROM clock_timestamp() - state_change)::float8
                     FROM pg_stat_activity WHERE pid = $1",
                    &[&self.pid],
                )
                .await
                .sql(node, "reading pg_stat_activity")?;
            let Some(row) = row else {
                return Ok(Probe::Stalled(format!(
                    "its server process {} has ended, but the connection never said so",
                    self.pid
                )));
            };
            let (state, wait, idle_s): (Option<String>, String, Option<f64>) =
                (row.get(0), row.get(1), row.get(2));
            let state = state.unwrap_or_default();
            let idle_s = idle_s.unwrap_or(0.0);
            if !state.starts_with("idle") || idle_s < 1.0 {
                return Ok(Probe::Working(format!("{state} {wait}")));
            }
            // Its transaction is rolled back and its locks and origin released now,
            // not when TCP gives up on the connection.
            client
                .execute("SELECT duplex.terminate_backend($1, 5000)", &[&self.pid])
                .await
                .sql(node, "ending the stalled session")?;
            Ok::<_, node::NodeError>(Probe::Stalled(format!(
                "the node finished its statement {idle_s:.1} s ago ({state}), but the answer never arrived; ended server process {}",
                self.pid
            )))
        })
        .await;
        match asked {
            Ok(Ok(verdict)) => verdict,
            Ok(Err(e)) => Probe::Stalled(format!(
                "asking the node over a new connection failed too: {e}"
            )),
            Err(_) => Probe::Stalled("a new connection to the node did not answer either".into()),
        }
    }
}
