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
use crate::config::{Config, Direction};
use crate::kafka::{self, BrokerError};
use crate::lww::TargetWriter;
use crate::metrics::{self as m, ApplyMetrics, Health};
use crate::pg::error::SqlContext;
use crate::pg::setup;
use crate::pg::state::positions;
use crate::runtime::{sleep_until, supervise, AbortOnDrop, Stop, Supervised};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Offset;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::Instrument;

/// The readiness component of `dir`'s apply.
pub fn component(dir: &Direction) -> String {
    format!("apply {dir}")
}

/// Applies `dir` until `stop`; a definite error halts this direction only.
pub async fn run_apply(
    cfg: Arc<Config>,
    dir: Direction,
    health: Health,
    stop: Stop,
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
    let result = supervise(&cfg, &what, &health, stop, |stop| {
        let (cfg, dir, health, component) = (&cfg, &dir, &health, &component);
        let (awaiting, metrics) = (&awaiting, metrics.clone());
        async move {
            let carried = awaiting.lock().ok().and_then(|mut a| a.take());
            let connected = metrics.connected.clone();
            let r = crate::standby::run_leased(
                cfg,
                &dir.to,
                component,
                health,
                &stop,
                // Boxed: a session's state is large, and `select!` polls it by value.
                || {
                    Box::pin(apply_once(
                        cfg,
                        dir,
                        health,
                        component,
                        metrics,
                        carried,
                        stop.clone(),
                    ))
                },
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
    stop: Stop,
) -> Result<(), ApplyError> {
    match Box::pin(open(cfg, dir, health, component, metrics, awaiting, &stop)).await? {
        Some(session) => Box::pin(run(session, cfg, dir, stop)).await,
        None => Ok(()),
    }
}

/// An open apply session: the worker, its intake stage and its helper tasks.
struct Session<'a> {
    worker: Worker<'a>,
    watchdog: Watchdog<'a>,
    intake: Intake,
    per_turn: usize,
    /// Aborted when the session ends.
    _tasks: [AbortOnDrop; 3],
}

/// Opens a session: sets the target up, copies what predates the slots (`None` when
/// stop came during the copy), reads the stored position (or where a first start
/// begins), and starts reading the topic from there.
async fn open<'a>(
    cfg: &'a Config,
    dir: &'a Direction,
    health: &Health,
    component: &str,
    metrics: ApplyMetrics,
    awaiting: Option<Gap>,
    stop: &Stop,
) -> Result<Option<Session<'a>>, ApplyError> {
    setup::setup(cfg, &dir.to, setup::LostSlot::Refuse).await?;
    crate::pg::history::check(cfg, dir).await?;
    // Rows that predate the slots reach the target before the topic's changes do.
    if crate::snapshot::before_apply(cfg, dir, stop.clone()).await?
        == crate::snapshot::Copied::Stopped
    {
        return Ok(None);
    }
    let writer = connect_bounded(cfg, dir, metrics.clone()).await?;
    let watchdog = Watchdog::new(cfg, dir, writer.backend_pid, writer.away.clone());
    let topic = cfg.topic(&dir.from);
    let mut stored = watchdog
        .run(async {
            positions::load(&writer.client, &dir.from, &topic)
                .await
                .sql(&dir.to, "reading duplex.apply_positions")
                .map_err(ApplyError::from)
        })
        .await?;
    if stored.next_offset.is_none() {
        stored.next_offset = start::first_offset(cfg, dir, &writer.client).await?;
    }
    let committed_next = stored.next_offset;
    let offset = committed_next.map_or(Offset::Beginning, Offset::Offset);
    kafka::ensure_topic(&cfg.kafka, &topic)
        .await
        .map_err(|source| ApplyError::Broker {
            direction: dir.to_string(),
            source,
        })?;
    let consumer = intake::open_consumer(cfg, dir, &topic, offset)?;
    watchdog
        .run(async {
            progress::set_state(&writer.client, dir, DirectionState::Running, None)
                .await
                .sql(&dir.to, "writing duplex.apply_state")
                .map_err(ApplyError::from)
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
            stop.clone(),
        )
        .instrument(tracing::info_span!("lag_reporter", direction = %dir)),
    );
    let reporter = AbortOnDrop(reporter);
    let republisher = AbortOnDrop(tokio::spawn(
        super::republish::run(cfg.clone(), dir.clone(), stop.clone())
            .instrument(tracing::info_span!("republisher", direction = %dir)),
    ));
    // The first message must be the stored one: anything later means a gap, once a
    // broker's answer from the next record batch is told apart (see `resume`).
    let resume = match committed_next {
        Some(stored) => Some(Resume::at(
            stored,
            check_in_log(consumer.clone(), dir, &topic, stored).await?,
        )),
        None => None,
    };
    let source = intake::IntakeSource {
        consumer,
        dir: dir.clone(),
        topic,
        stored: committed_next,
        resume,
    };
    let bounds = cfg.sync.bounds();
    let (intake, task) = intake::start(source, bounds.intake_capacity, stop.clone());
    Ok(Some(Session {
        worker,
        watchdog,
        intake,
        per_turn: bounds.per_turn,
        _tasks: [reporter, republisher, AbortOnDrop(task)],
    }))
}

/// Runs an open session until stop or an error: takes what the intake stage
/// reads, writes at the linger's end, gives up a stalled transaction, sweeps.
async fn run(
    session: Session<'_>,
    cfg: &Config,
    dir: &Direction,
    stop: Stop,
) -> Result<(), ApplyError> {
    let Session {
        mut worker,
        watchdog,
        mut intake,
        per_turn,
        _tasks,
    } = session;
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Another instance's reader may find the topic lost while this one applies it:
    // stop then, rolling back what the session holds, as an abort here would.
    let topic_lost = crate::pg::history::topic_lost(cfg, dir);
    tokio::pin!(topic_lost);
    loop {
        let deadline = worker.linger_deadline();
        let stall = worker.stall_deadline();
        tokio::select! {
            biased;
            // After an abort, what the worker holds is rolled back with its session.
            _ = stop.requested() => {
                if stop.aborted() {
                    return Ok(());
                }
                return watchdog.run(worker.finish()).await;
            }
            // Ahead of the intake, which a catch-up keeps ready: never starved.
            lost = &mut topic_lost => return Err(lost.into()),
            taken = intake.recv() => {
                // The stage ends after sending its error, or on stop (the arm above).
                let Some(taken) = taken else {
                    return Err(ApplyError::Broker {
                        direction: dir.to_string(),
                        source: BrokerError::IntakeEnded,
                    });
                };
                watchdog.run(take_ready(&mut worker, taken?, &mut intake, per_turn)).await?;
            }
            _ = sleep_until(deadline), if deadline.is_some() => watchdog.run(worker.linger_expired()).await?,
            _ = sleep_until(stall), if stall.is_some() => watchdog.run(worker.stalled()).await?,
            _ = sweep.tick() => {
                watchdog.run(worker.sweep()).await?;
                watchdog.run(worker.settle_owed()).await?;
            }
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

/// The stored offset must not lie before the partition's first retained message;
/// returns that message's offset.
/// (Past the end is left to the broker's OffsetOutOfRange, which `auto.offset.reset =
/// error` turns into `intake::position_lost`: some brokers report as the log end the base
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
    .map_err(|e| ApplyError::Broker {
        direction: dir.to_string(),
        source: BrokerError::Join(e),
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
