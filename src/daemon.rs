//! `duplex run`: the metrics endpoint, one capture per source node and one apply per
//! direction, each a named task under supervision, until a signal arrives or a
//! component fails for good; then every component is told to stop and given
//! [`STOP_DEADLINE`] to finish (a capture drains its in-flight messages, an apply
//! commits what forms whole source transactions). A second signal, or the deadline,
//! ends the process without waiting.

use crate::capture::session;
use crate::config::Config;
use crate::metrics::{self, Health};
use crate::runtime::{sleep_until, Stop};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::Instrument;

/// How long the components have to stop once told to.
pub const STOP_DEADLINE: Duration = Duration::from_secs(60);

pub async fn run(cfg: Arc<Config>, mut signals: mpsc::Receiver<()>) -> ExitCode {
    let (stopper, stop) = crate::runtime::stop::pair();
    let health = Health::default();
    let mut tasks = JoinSet::new();
    match start_metrics(&cfg, health.clone(), stop.clone()).await {
        Ok(serve) => {
            // After the recorder is installed (a gauge made before it never reports),
            // before the endpoints answer.
            register_components(&cfg, &health);
            tasks.spawn(async move {
                serve.await;
                Ok(())
            });
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    }
    let verify = crate::verify::export_metrics(cfg.clone(), stop.clone());
    tasks.spawn(
        async move {
            verify.await;
            Ok(())
        }
        .instrument(tracing::info_span!("verify_metrics")),
    );
    for node in cfg.source_nodes() {
        let span = tracing::info_span!("source", node = %node);
        let fut = session::run_capture(
            cfg.clone(),
            node,
            health.clone(),
            stop.clone(),
            stopper.clone(),
        );
        tasks.spawn(fut.instrument(span));
    }
    for dir in cfg.directions().unwrap_or_default() {
        let span = tracing::info_span!("apply", direction = %dir);
        let fut = Box::pin(crate::apply::session::run_apply(
            cfg.clone(),
            dir,
            health.clone(),
            stop.clone(),
        ));
        // A halted direction stops alone (it logged why, /readyz and the halted gauge
        // show it); the other direction and the readers keep going.
        tasks.spawn(
            async move {
                let _ = fut.await;
                Ok(())
            }
            .instrument(span),
        );
    }
    let mut stop_by: Option<Instant> = None;
    let mut signals_open = true;
    let mut code = ExitCode::SUCCESS;
    loop {
        tokio::select! {
            signal = signals.recv(), if signals_open => match (signal, stop_by) {
                // No signals can arrive any more: run until the components end.
                (None, _) => signals_open = false,
                (Some(()), None) => {
                    tracing::info!("stopping");
                    stop_by = Some(Instant::now() + STOP_DEADLINE);
                    stopper.stop();
                }
                (Some(()), Some(_)) => {
                    tracing::warn!("second signal: stopping now, without waiting for the components");
                    return ExitCode::FAILURE;
                }
            },
            _ = sleep_until(stop_by), if stop_by.is_some() => {
                tracing::error!(deadline_s = STOP_DEADLINE.as_secs(), "components did not stop in time; exiting without them");
                return ExitCode::FAILURE;
            }
            done = tasks.join_next() => match done {
                None => break,
                Some(Ok(Err(_))) | Some(Err(_)) => {
                    // The component logged why; stop the others cleanly.
                    code = ExitCode::FAILURE;
                    stop_by.get_or_insert_with(|| Instant::now() + STOP_DEADLINE);
                    stopper.stop();
                }
                Some(Ok(Ok(()))) => {}
            },
        }
    }
    code
}

/// Registers every component before /readyz answers: registered only by its own
/// task, a probe in between would find nothing down and call the instance ready.
fn register_components(cfg: &Config, health: &Health) {
    for node in cfg.source_nodes() {
        health.register(&session::component(&node));
    }
    for dir in cfg.directions().unwrap_or_default() {
        health.register(&crate::apply::session::component(&dir));
    }
}

async fn start_metrics(
    cfg: &Config,
    health: Health,
    stop: Stop,
) -> Result<impl std::future::Future<Output = ()>, String> {
    let addr = cfg.metrics_listen().map_err(|e| e.to_string())?;
    let handle = metrics::install()?;
    let listener = metrics::bind(addr)
        .await
        .map_err(|e| format!("metrics.listen {addr}: {e}"))?;
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
    Ok(metrics::serve(
        listener,
        handle,
        health,
        async move { stop.requested().await },
    )
    .instrument(tracing::info_span!("metrics_http")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_is_not_ready_before_its_components_report() {
        let cfg = Config::parse(
            r#"
            [nodes.a]
            url = "postgres://u@127.0.0.1:1/a"
            [nodes.b]
            url = "postgres://u@127.0.0.1:2/b"
            [kafka]
            brokers = "127.0.0.1:3"
            [[tables]]
            name = "public.items"
            "#,
        )
        .unwrap();
        let health = Health::default();
        assert!(
            health.readiness().is_ok(),
            "nothing registered reads as ready"
        );
        register_components(&cfg, &health);
        let mut down = health.readiness().unwrap_err();
        down.sort();
        assert_eq!(
            down,
            ["apply a_to_b", "apply b_to_a", "source a", "source b"]
        );
    }
}
