//! What an apply worker tells the outside about itself (its position is in
//! `pg::state::positions`, its state row in `pg::state::directions`): a halt recorded
//! over a connection of its own, and its lag gauges.

use crate::config::{Config, Direction};
use crate::metrics::ApplyMetrics;
use crate::runtime::Stop;
use rdkafka::consumer::{Consumer, StreamConsumer};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How long asking the broker for the log end offset may take.
const WATERMARK_TIMEOUT: Duration = Duration::from_millis(500);

pub use crate::pg::state::directions::{set_state, DirectionState};

/// Records a halt over a fresh connection (the worker's session is gone by then).
pub async fn record_halt(cfg: &Config, dir: &Direction, reason: &str) {
    let result = match crate::pg::node::connect(cfg, &dir.to, "apply state").await {
        Ok(client) => set_state(&client, dir, DirectionState::Halted, Some(reason))
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = result {
        tracing::warn!(direction = %dir, error = %e, "could not record the halt on the target");
    }
}

/// Where a worker stands, for the lag gauges.
#[derive(Debug, Clone, Default)]
pub struct Standing {
    /// Offset after the last message taken from the topic.
    pub consumed_next: Option<i64>,
    /// Offset after the last message committed to the target.
    pub committed_next: Option<i64>,
    /// Commit time (µs) of the newest applied source transaction.
    pub last_applied_commit_us: Option<i64>,
    /// Commit time (µs) of the oldest event taken but not committed yet.
    pub oldest_pending_commit_us: Option<i64>,
    /// Nothing taken is waiting to be committed.
    pub idle: bool,
}

/// Sets the lag gauges every second from what the worker last published, until
/// `stop` or until the worker drops its sender. Runs beside the worker so the
/// gauges keep moving while a batch is blocked on the target.
pub async fn report_lag(
    metrics: ApplyMetrics,
    consumer: Arc<StreamConsumer>,
    topic: String,
    mut standing: watch::Receiver<Standing>,
    stop: Stop,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.requested() => return,
            changed = standing.changed() => if changed.is_err() { return },
            _ = tick.tick() => {
                let s = standing.borrow().clone();
                set_lag(&metrics, &consumer, &topic, &s).await;
            }
        }
    }
}

/// Lag in seconds: 0 when caught up and idle; else now − commit time of the oldest
/// event not yet applied (or of the newest applied one, while the next is unread).
/// Lag in messages: log end offset − committed offset.
async fn set_lag(
    metrics: &ApplyMetrics,
    consumer: &Arc<StreamConsumer>,
    topic: &str,
    s: &Standing,
) {
    let (c, t) = (consumer.clone(), topic.to_string());
    let marks =
        tokio::task::spawn_blocking(move || c.fetch_watermarks(&t, 0, WATERMARK_TIMEOUT)).await;
    let Ok(Ok((low, high))) = marks else {
        return;
    };
    let consumed = s.consumed_next.unwrap_or(low);
    let caught_up = s.idle && consumed >= high;
    let behind_since = s.oldest_pending_commit_us.or(s.last_applied_commit_us);
    let lag_s = match (caught_up, behind_since) {
        (true, _) | (false, None) => 0.0,
        (false, Some(ts)) => (unix_us() - ts).max(0) as f64 / 1e6,
    };
    metrics.lag_seconds.set(lag_s);
    let committed = s.committed_next.unwrap_or(low);
    metrics.kafka_lag.set((high - committed).max(0) as f64);
}

fn unix_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direction_states_round_trip_as_stored_and_shown() {
        for s in ["running", "halted", "stopped", "never_started"] {
            let state = DirectionState::parse(s).unwrap();
            assert_eq!(state.as_str(), s);
            assert_eq!(serde_json::to_string(&state).unwrap(), format!("\"{s}\""));
        }
        assert_eq!(DirectionState::parse("Running"), None);
    }
}
