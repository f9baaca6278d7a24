//! Keeping components alive: each capture session and apply worker runs under
//! [`supervise`], which retries transient errors with exponential backoff, stops on a
//! definite one, and keeps the component's readiness and error counters. Components
//! are told to stop through [`Stop`] ([`stop`]); the timers and task guards their
//! loops share are here too.

pub mod stop;

pub use stop::{Stop, StopHandle};

use crate::config::Config;
use crate::metrics::Health;
use crate::{Classify, ErrorClass};
use backoff::backoff::Backoff;
use std::time::{Duration, Instant};

/// A session that ran this long resets the backoff: the failure is a new one.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(60);

/// What a supervised task is called in logs, metrics and readiness.
pub struct Supervised<'a> {
    pub component: &'a str,
    pub errors_metric: &'static str,
    pub label: (&'static str, String),
}

/// Runs `session` until it returns `Ok` (shutdown) or a definite error; transient
/// errors are logged once per attempt and retried with exponential backoff. The
/// component is unready from each failure until the next session marks it up.
pub async fn supervise<E, F, Fut>(
    cfg: &Config,
    what: &Supervised<'_>,
    health: &Health,
    stop: Stop,
    mut session: F,
) -> Result<(), E>
where
    E: std::fmt::Display + Classify,
    F: FnMut(Stop) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
{
    health.register(what.component);
    // Zero series from the start, so rates and alerts see them before the first error.
    let errors = [ErrorClass::Transient, ErrorClass::Definite].map(|class| {
        let (key, value) = (what.label.0, what.label.1.clone());
        let c = metrics::counter!(what.errors_metric, key => value, "class" => class.as_str());
        c.increment(0);
        (class, c)
    });
    let mut backoff = backoff::ExponentialBackoff {
        initial_interval: Duration::from_millis(cfg.source.retry_initial_ms),
        max_interval: Duration::from_millis(cfg.source.retry_max_ms),
        max_elapsed_time: None,
        ..Default::default()
    };
    loop {
        let started = Instant::now();
        let result = session(stop.clone()).await;
        health.set(what.component, false);
        let e = match result {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        let class = e.class();
        if let Some((_, c)) = errors.iter().find(|(c, _)| *c == class) {
            c.increment(1);
        }
        if class == ErrorClass::Definite {
            tracing::error!(component = what.component, error = %e, "stopped: fix the cause and restart duplex");
            return Err(e);
        }
        if started.elapsed() > BACKOFF_RESET_AFTER {
            backoff.reset();
        }
        let delay = backoff.next_backoff().unwrap_or(backoff.max_interval);
        tracing::warn!(component = what.component, error = %e, retry_in_ms = delay.as_millis() as u64, "failed; retrying");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.requested() => return Ok(()),
        }
    }
}

/// Sleeps until `at`, or forever when there is no deadline: the shape a `select!`
/// arm with an optional timer needs.
pub async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// A helper task that lives exactly as long as what owns it: aborted on drop, so a
/// session that ends (or fails) never leaves its helpers running.
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
