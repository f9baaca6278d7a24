//! One direction's apply worker: consumes the source node's change topic and applies
//! it to the target node, exactly once.
//!
//! The worker assigns partition 0 of `<prefix>.<from>.changes` explicitly, from the
//! offset stored in the target's `duplex.apply_positions` (see [`super::resume`] for how
//! the first message read is checked against it), and reads events in the source's
//! commit order: [`super::intake`] reads and decodes them on a task of its own while the
//! worker writes the previous batch. Events gather into a batch (`sync.batch_rows`, `linger_ms`);
//! the target transaction commits only at a source transaction boundary, after the
//! position row is updated in it, so a crash at any instant leaves the target either
//! before or after whole source transactions, and the restart resumes exactly there.
//! Events at or below the applied position (the source may publish a transaction
//! twice after a crash) are skipped; a transaction that arrives with a hole is
//! discarded until its next copy (see [`super::sequence`]). A statement that fails on a bad event is rolled
//! back to a savepoint and its batch retried one event at a time to find the culprit,
//! which then halts the direction or goes to the dead-letter queue.

use crate::apply::error::ApplyError;
use crate::apply::intake::{self, Intake, Taken};
use crate::apply::progress::{self, DirectionState};
use crate::apply::resume::Resume;
use crate::apply::sequence::Gap;
use crate::apply::start;
use crate::apply::watchdog::Watchdog;
use crate::apply::worker::{Worker, SWEEP_EVERY};
use crate::apply::writer::{TargetWriter, WriteError};
use crate::config::{Config, Direction};
use crate::kafka::{self, client_config, SinkError};
use crate::metrics::{self as m, ApplyMetrics, Health};
use crate::pg::setup;
use crate::pg::state::positions;
use crate::runtime::{supervise, Supervised};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::Instrument;

/// librdkafka consumer settings duplex changes from librdkafka's defaults.
const CONSUMER_DEFAULTS: &[(&str, &str)] = &[
    ("fetch.wait.max.ms", "10"),
    // Once the prefetch queue is full, librdkafka waits this long before fetching
    // again (1 s by default): a consumer that drains the queue in 0.1 s then idles for
    // 0.9 s, which capped a catch-up at 13,000 messages/s.
    ("fetch.queue.backoff.ms", "10"),
    ("queued.min.messages", "10000"),
    ("queued.max.messages.kbytes", "8192"),
];

/// The readiness component of `dir`'s apply.
pub fn component(dir: &Direction) -> String {
    format!("apply {dir}")
}

/// Applies `dir` until `shutdown`; a definite error halts this direction only.
pub async fn run_apply(
    cfg: Arc<Config>,
    dir: Direction,
    health: Health,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ApplyError> {
    let component = component(&dir);
    let what = Supervised {
        component: &component,
        errors_metric: m::APPLY_ERRORS_TOTAL,
        label: ("direction", dir.to_string()),
    };
    let metrics = ApplyMetrics::new(&dir.to_string(), cfg.tables.iter().map(|t| t.name.as_str()));
    metrics.halted.set(0.0);
    // The initial-sync series exist (at zero) too, whether a copy runs or not.
    for t in &cfg.tables {
        m::SnapshotMetrics::new(&dir.to_string(), &t.name);
    }
    // A transaction found incomplete is waited for across sessions: the next one
    // reads its broken copy again.
    let awaiting = std::sync::Mutex::new(None);
    let result = supervise(&cfg, &what, &health, shutdown, |shutdown| {
        let (cfg, dir, health, component) = (&cfg, &dir, &health, &component);
        let (awaiting, metrics) = (&awaiting, metrics.clone());
        async move {
            let carried = awaiting.lock().ok().and_then(|mut a| a.take());
            let connected = metrics.connected.clone();
            let mut lock_shutdown = shutdown.clone();
            let r = crate::standby::run_leased(
                cfg,
                &dir.to,
                component,
                health,
                &mut lock_shutdown,
                || apply_once(cfg, dir, health, component, metrics, carried, shutdown),
            )
            .await;
            if let Err(ApplyError::IncompleteTransaction { gap, .. }) = &r {
                if let Ok(mut a) = awaiting.lock() {
                    *a = Some(*gap);
                }
            }
            connected.set(0.0);
            r
        }
    })
    .await;
    if let Err(e) = &result {
        metrics.halted.set(1.0);
        progress::record_halt(&cfg, &dir, &e.to_string()).await;
    }
    result
}

async fn apply_once(
    cfg: &Config,
    dir: &Direction,
    health: &Health,
    component: &str,
    metrics: ApplyMetrics,
    awaiting: Option<Gap>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ApplyError> {
    setup::setup(cfg, &dir.to, setup::LostSlot::Refuse).await?;
    crate::pg::history::check(cfg, dir).await?;
    // Rows that predate the slots reach the target before the topic's changes do.
    if crate::snapshot::before_apply(cfg, dir, shutdown.clone()).await?
        == crate::snapshot::Copied::Stopped
    {
        return Ok(());
    }
    let writer = connect_bounded(cfg, dir, metrics.clone()).await?;
    let watchdog = Watchdog::new(cfg, dir, writer.backend_pid);
    let topic = cfg.topic(&dir.from);
    let mut stored = watchdog
        .run(async {
            positions::load(&writer.client, &dir.from, &topic)
                .await
                .map_err(target_sql(dir, "reading duplex.apply_positions"))
        })
        .await?;
    if stored.next_offset.is_none() {
        stored.next_offset = start::first_offset(cfg, dir, &writer.client).await?;
    }
    let committed_next = stored.next_offset;
    let offset = committed_next.map_or(Offset::Beginning, Offset::Offset);
    let kafka_err = |source| ApplyError::Kafka {
        direction: dir.to_string(),
        source,
    };
    kafka::ensure_topic(&cfg.kafka, &topic)
        .await
        .map_err(|source| ApplyError::Sink {
            direction: dir.to_string(),
            source,
        })?;
    let mut cc = client_config(&cfg.kafka);
    cc.set("group.id", kafka::apply_group(dir))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    // Latency and memory: don't let a fetch idle for librdkafka's default 500 ms, and
    // bound the prefetch queue (100k messages or 64 MB by default). The user's
    // properties still win.
    for (key, value) in CONSUMER_DEFAULTS {
        if !cfg.kafka.properties.contains_key(*key) {
            cc.set(*key, *value);
        }
    }
    // A stored offset the broker no longer has (retention passed it, the topic was
    // recreated) must stop this direction, never jump silently to either end.
    cc.set("auto.offset.reset", "error");
    let consumer: Arc<StreamConsumer> = Arc::new(cc.create().map_err(kafka_err)?);
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, offset)
        .map_err(kafka_err)?;
    consumer.assign(&tpl).map_err(kafka_err)?;
    watchdog
        .run(async {
            progress::set_state(&writer.client, dir, DirectionState::Running, None)
                .await
                .map_err(target_sql(dir, "writing duplex.apply_state"))
        })
        .await?;
    health.set(component, true);
    metrics.connected.set(1.0);
    tracing::info!(direction = %dir, topic = %topic, ?offset, "applying");
    let mut worker = Worker::new(cfg, dir, writer, stored, awaiting);
    let (standing_tx, standing_rx) = watch::channel(worker.standing());
    worker.report_to(standing_tx);
    // Prune once at the start too, before anything is applied: a session that ends
    // within a minute must not keep its tables unpruned.
    watchdog.run(worker.maintain()).await?;
    let reporter = tokio::spawn(
        progress::report_lag(
            metrics,
            consumer.clone(),
            topic.clone(),
            standing_rx,
            shutdown.clone(),
        )
        .instrument(tracing::info_span!("lag_reporter", direction = %dir)),
    );
    let _reporter = AbortOnDrop(reporter);
    // The first message must be the stored one: anything later means a gap, once a
    // broker's answer from the next record batch is told apart (see `resume`).
    let resume = match committed_next {
        Some(stored) => Some(Resume::at(
            stored,
            check_in_log(consumer.clone(), dir, &topic, stored).await?,
        )),
        None => None,
    };
    let source = intake::Source {
        consumer,
        dir: dir.clone(),
        topic: topic.clone(),
        stored: committed_next,
        resume,
    };
    let (mut intake, task) = intake::start(source, cfg.sync.batch_rows, shutdown.clone());
    let _intake = AbortOnDrop(task);
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let deadline = worker.linger_deadline();
        let stall = worker.stall_deadline();
        tokio::select! {
            biased;
            // After an abort, what the worker holds is rolled back with its session.
            _ = shutdown.changed() => {
                if crate::daemon::aborting() {
                    return Ok(());
                }
                return watchdog.run(worker.finish()).await;
            }
            taken = intake.recv() => {
                // The stage ends after sending its error, or on shutdown (the arm above).
                let Some(taken) = taken else {
                    return Err(ApplyError::Sink {
                        direction: dir.to_string(),
                        source: SinkError::Task("the intake stage ended".into()),
                    });
                };
                watchdog.run(take_ready(&mut worker, taken?, &mut intake, cfg.sync.batch_rows)).await?;
            }
            _ = sleep_until(deadline), if deadline.is_some() => watchdog.run(worker.linger_expired()).await?,
            _ = sleep_until(stall), if stall.is_some() => watchdog.run(worker.stalled()).await?,
            _ = sweep.tick() => watchdog.run(worker.sweep()).await?,
        }
    }
}

/// Takes `first`, then what the intake stage has ready, up to `max` messages: one
/// turn of the loop above per message (its timers, the watchdog's) cost more than
/// taking a decoded message. The deadlines are looked at again after `max`.
async fn take_ready(
    worker: &mut Worker<'_>,
    first: Taken,
    intake: &mut Intake,
    max: usize,
) -> Result<(), ApplyError> {
    worker.take(first).await?;
    for _ in 1..max {
        match intake.try_recv() {
            Ok(taken) => worker.take(taken?).await?,
            // Empty, or ended: the loop's `recv` says which.
            Err(_) => break,
        }
    }
    Ok(())
}

/// Opens the apply session, within the connect timeout plus `sync.receive_timeout_ms`
/// for its setup statements (a connection that stalls right away says nothing either).
async fn connect_bounded<'a>(
    cfg: &'a Config,
    dir: &'a Direction,
    metrics: ApplyMetrics,
) -> Result<TargetWriter<'a>, ApplyError> {
    let bound = Duration::from_millis(cfg.source.connect_timeout_ms + cfg.sync.receive_timeout_ms);
    match tokio::time::timeout(bound, TargetWriter::connect(cfg, dir, metrics)).await {
        Ok(writer) => Ok(writer?),
        Err(_) => Err(ApplyError::TargetStalled {
            direction: dir.to_string(),
            to: dir.to.clone(),
            waited_s: bound.as_secs_f64(),
            why: "opening the apply session did not finish".into(),
        }),
    }
}

/// Turns an error of a statement on the target into the direction's error.
fn target_sql<'a>(
    dir: &'a Direction,
    context: &'a str,
) -> impl FnOnce(tokio_postgres::Error) -> ApplyError + 'a {
    move |source| {
        ApplyError::from(WriteError::Sql {
            node: dir.to.clone(),
            context: context.into(),
            source,
        })
    }
}

/// The stored offset must not lie before the partition's first retained message;
/// returns that message's offset.
/// (Past the end is left to the broker's OffsetOutOfRange, which `auto.offset.reset =
/// error` turns into [`position_lost`]: some brokers report as the log end the base
/// offset of the last record batch, which would make a healthy direction halt.)
async fn check_in_log(
    consumer: Arc<StreamConsumer>,
    dir: &Direction,
    topic: &str,
    stored: i64,
) -> Result<i64, ApplyError> {
    let t = topic.to_string();
    let marks = tokio::task::spawn_blocking(move || {
        consumer.fetch_watermarks(&t, 0, Duration::from_secs(10))
    })
    .await
    .map_err(|e| ApplyError::Sink {
        direction: dir.to_string(),
        source: SinkError::Task(e.to_string()),
    })?;
    let (low, _) = marks.map_err(|source| ApplyError::Kafka {
        direction: dir.to_string(),
        source,
    })?;
    if stored < low {
        return Err(intake::lost(
            dir,
            topic,
            stored,
            format!(
            "the topic's oldest retained message is at offset {low} (retention removed the rest)"
        ),
        ));
    }
    Ok(low)
}

/// Aborts a helper task when the session that owns it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(d) = deadline {
        tokio::time::sleep_until(d.into()).await;
    }
}
