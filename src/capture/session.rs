//! One node's capture session: slot → decoder → reader → Kafka, and durable
//! positions back to the slot.
//!
//! [`run_capture`] keeps one streaming session alive, retrying transient failures with
//! exponential backoff and stopping on definite ones. A session ([`stream_once`])
//! checks the node, creates what is missing, starts replication from the slot's
//! confirmed position and then loops: decode each XLogData, turn it into events,
//! enqueue them on the producer (pipelined) and their delivery futures on a bounded
//! queue read by the delivery tracker. Only the tracker's durable LSN, the end of a
//! commit whose every message the broker acknowledged, is ever confirmed to the slot.

use crate::capture::assembler::{Output, TxnAssembler};
use crate::capture::confirm::SlotProgress;
pub use crate::capture::error::CaptureError;
use crate::capture::pgoutput::{self, LogicalMessage};
use crate::capture::producer::{self, ChangeProducer, Pending};
use crate::config::{Config, EchoFilter};
use crate::event::{ChangeEvent, Lsn};
use crate::kafka::{self, BrokerError};
use crate::metrics::{self as m, CaptureMetrics, Health};
use crate::pg::error::SqlContext;
use crate::pg::node::{self, NodeError};
use crate::pg::setup;
use crate::pg::state::slots;
use crate::pg::walsender::{
    ReplicationMessage, ReplicationStream, WalsenderConnection, WalsenderError,
};
use crate::runtime::{supervise, Supervised};
use crate::runtime::{Stop, StopHandle};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

/// How often slot statistics are read from the node.
const SLOT_STATS_EVERY: Duration = Duration::from_secs(5);
/// How often the reader looks whether its connection went silent.
const STALL_CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long a clean stop waits for in-flight messages to be acknowledged.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(30);
/// How long a session waits for its Kafka producer's id before it reports ready and
/// reads changes anyway (a broker that does not answer shows in the deliveries).
const PRODUCER_ID_WAIT: Duration = Duration::from_secs(5);

/// The readiness component of `node`'s capture.
pub fn component(node: &str) -> String {
    format!("source {node}")
}

/// Streams `node`'s changes to Kafka until `stop` is requested; retries transient
/// failures with backoff, returns definite ones. A broker found to have lost
/// acknowledged messages aborts every component through `abort`.
pub async fn run_capture(
    cfg: Arc<Config>,
    node: String,
    health: Health,
    stop: Stop,
    abort: StopHandle,
) -> Result<(), CaptureError> {
    let component = component(&node);
    let what = Supervised {
        component: &component,
        errors_metric: m::SOURCE_ERRORS_TOTAL,
        label: ("node", node.clone()),
    };
    let metrics = CaptureMetrics::new(&node, cfg.tables.iter().map(|t| t.name_on(&node)));
    supervise(&cfg, &what, &health, stop, |stop| {
        let (cfg, node, health, component) = (&cfg, &node, &health, &component);
        let (metrics, abort) = (metrics.clone(), &abort);
        async move {
            let connected = metrics.connected.clone();
            let r = crate::standby::run_leased(cfg, node, component, health, &stop, || {
                stream_once(cfg, node, health, component, metrics, &stop, abort)
            })
            .await;
            connected.set(0.0);
            r
        }
    })
    .await
}

/// Whether the node's walsender drops what duplex applied there (pgoutput's `origin =
/// 'none'`): with `source.echo_filter = "node"`, on PostgreSQL 16 and later, once the
/// slot has read past `duplex.slots.filter_from` (where duplex began to publish its
/// repairs and pairings through `duplex.outbox`; before it, they travel inside the
/// applied transactions, which only duplex's own filter lets them out of).
async fn walsender_filters(
    cfg: &Config,
    client: &tokio_postgres::Client,
    node: &str,
    slot: &str,
) -> Result<bool, CaptureError> {
    if cfg.source.echo_filter != EchoFilter::Node {
        return Ok(false);
    }
    let ready: bool = client
        .query_one(
            "SELECT current_setting('server_version_num')::int >= 160000
                    AND coalesce((SELECT s.confirmed_flush_lsn >= d.filter_from
                                  FROM pg_replication_slots s JOIN duplex.slots d USING (slot_name)
                                  WHERE s.slot_name = $1), true)",
            &[&slot],
        )
        .await
        .sql(node, "reading where the slot's echo filter begins")?
        .get(0);
    Ok(ready)
}

/// One replication session, from connecting to a failure or stop.
async fn stream_once(
    cfg: &Config,
    node: &str,
    health: &Health,
    component: &str,
    metrics: CaptureMetrics,
    stop: &Stop,
    abort: &StopHandle,
) -> Result<(), CaptureError> {
    let sink = |source| CaptureError::Broker {
        node: node.to_string(),
        source,
    };
    let wal_err = |source| CaptureError::Walsender {
        node: node.to_string(),
        source,
    };
    // The topic, then the producer, first: librdkafka acquires its idempotent producer
    // id in the background, on a 500 ms timer that may take two turns; made here, that
    // overlaps the checks below, and the session is ready only once it has the id
    // (before, the first change after a start took up to 0.95 s to reach the broker).
    // The topic exists before the producer asks for it: a producer told the topic is
    // unknown fails its first messages.
    let topic = cfg.topic(node);
    kafka::ensure_topic(&cfg.kafka, &topic)
        .await
        .map_err(sink)?;
    let producer = ChangeProducer::new(&cfg.kafka, &topic).map_err(sink)?;
    let client = node::connect(cfg, node, "reader").await?;
    let problems = crate::preflight::node_problems(cfg, node, &client, true)
        .await
        .sql(node, "checking the node")?;
    let (warnings, problems): (Vec<String>, Vec<String>) = problems
        .into_iter()
        .partition(|p| crate::preflight::is_warning(p));
    for w in warnings {
        tracing::warn!(node, "{w}");
    }
    if !problems.is_empty() {
        return Err(CaptureError::Preflight {
            node: node.to_string(),
            problems,
        });
    }
    setup::setup(cfg, node, setup::LostSlot::Refuse).await?;
    let slot_stream = slots::load(&client, &cfg.slot_name(node))
        .await
        .sql(node, "reading duplex.slots")?
        .map(|s| s.stream);
    // Before anything of the stream is published here: where it begins on the topic
    // (kept if an earlier session recorded it), for directions starting without a copy.
    if let Some(stream) = &slot_stream {
        let (_, end) = kafka::watermarks(&cfg.kafka, &topic).await.map_err(sink)?;
        crate::pg::state::streams::record_start(&client, node, stream, &topic, end).await?;
    }
    for dir in cfg.directions().unwrap_or_default() {
        if dir.from == node {
            crate::pg::history::check(cfg, &dir).await?;
        }
    }

    let pg = cfg.nodes[node].pg_config().map_err(|e| {
        CaptureError::Node(NodeError::Config {
            node: node.to_string(),
            detail: e.to_string(),
        })
    })?;
    let tls = crate::pg::node::tls_of(cfg, node)?;
    let timeout = Duration::from_millis(cfg.source.connect_timeout_ms);
    let allow_cleartext = cfg.nodes[node].allow_cleartext_password;
    let mut wal = WalsenderConnection::connect(
        &pg,
        &tls,
        &format!("duplex reader {node}"),
        timeout,
        allow_cleartext,
    )
    .await
    .map_err(wal_err)?;
    let ident = wal.identify_system().await.map_err(wal_err)?;
    let slot_name = cfg.slot_name(node);
    let only_local = walsender_filters(cfg, &client, node, &slot_name).await?;
    let stream = wal
        .start_replication(
            &slot_name,
            &cfg.publication_name(node),
            Lsn::ZERO,
            only_local,
        )
        .await
        .map_err(wal_err)?;
    if !producer.wait_for_id(PRODUCER_ID_WAIT).await {
        tracing::info!(node, topic = %topic, "the Kafka producer has no producer id yet; streaming anyway");
    }
    health.set(component, true);
    metrics.connected.set(1.0);
    tracing::info!(node, slot = %slot_name, topic = %topic, system_id = %ident.system_id,
        echoes_dropped_by = if only_local { "the node" } else { "duplex" }, "streaming");

    let (queue_tx, queue_rx) = mpsc::channel(cfg.kafka.max_in_flight_messages);
    let (durable_tx, durable_rx) = watch::channel(Lsn::ZERO);
    let last_offset = slots::last_offset(&client, &slot_name, &topic)
        .await
        .sql(node, "reading duplex.slots")?;
    let (acked_tx, acked_rx) = watch::channel(producer::Acked {
        topic: topic.clone(),
        last: last_offset,
    });
    let tracker = tokio::spawn(
        producer::track_deliveries(queue_rx, durable_tx, acked_tx)
            .instrument(tracing::info_span!("delivery_tracker", node)),
    );
    let mut session = Session {
        cfg,
        node,
        client,
        producer,
        stream,
        reader: TxnAssembler::new(node, &ident.dbname, slot_stream),
        queue: queue_tx,
        durable: durable_rx,
        acked: acked_rx,
        recorded_offset: last_offset,
        tracker,
        progress: SlotProgress::default(),
        out: Vec::new(),
        metrics,
        abort,
    };
    session.run(stop).await
}

/// State of one streaming session.
struct Session<'a> {
    cfg: &'a Config,
    node: &'a str,
    client: tokio_postgres::Client,
    producer: ChangeProducer,
    stream: ReplicationStream,
    reader: TxnAssembler,
    queue: mpsc::Sender<Pending>,
    durable: watch::Receiver<Lsn>,
    /// The highest offset acknowledged, and the one last recorded on the node.
    acked: watch::Receiver<producer::Acked>,
    recorded_offset: Option<i64>,
    tracker: JoinHandle<Result<(), BrokerError>>,
    /// What may be confirmed to the slot.
    progress: SlotProgress,
    out: Vec<Output>,
    metrics: CaptureMetrics,
    /// Stops every component without finishing what it holds (a lost topic).
    abort: &'a StopHandle,
}

impl Session<'_> {
    async fn run(&mut self, stop: &Stop) -> Result<(), CaptureError> {
        let mut status =
            tokio::time::interval(Duration::from_millis(self.cfg.source.status_interval_ms));
        let mut heartbeat =
            tokio::time::interval(Duration::from_millis(self.cfg.source.heartbeat_interval_ms));
        let mut slot_stats = tokio::time::interval(SLOT_STATS_EVERY);
        let topic_gone = producer::watch_topic(self.producer.clone(), self.acked.clone());
        let mut topic_gone = std::pin::pin!(topic_gone);
        // A stalled connection (no FIN, no data) is noticed by silence: on a healthy
        // one the heartbeat's WAL arrives every heartbeat interval.
        let patience = Duration::from_millis(self.cfg.source.receive_timeout_ms);
        let mut last_received = tokio::time::Instant::now();
        let mut stall_check = tokio::time::interval(STALL_CHECK_EVERY);
        loop {
            tokio::select! {
                biased;
                _ = stop.requested() => return self.drain().await,
                e = &mut topic_gone => return Err(self.sink_failed(e).await),
                joined = &mut self.tracker => return Err(self.tracker_ended(joined).await),
                _ = stall_check.tick() => {
                    if last_received.elapsed() > patience {
                        return Err(self.stalled());
                    }
                }
                // Timers before the stream: during a catch-up the stream is always
                // ready, and the node must still hear from us within its
                // wal_sender_timeout.
                _ = status.tick() => self.patiently(patience, |s| s.send_status(true)).await?,
                msg = self.stream.recv() => {
                    let msg = msg.map_err(|e| self.wal_err(e))?;
                    self.on_message(msg).await?;
                    // After the message is handed on: waiting for the broker is no stall.
                    last_received = tokio::time::Instant::now();
                }
                _ = heartbeat.tick() => self.patiently(patience, |s| s.heartbeat()).await?,
                _ = slot_stats.tick() => self.patiently(patience, |s| s.slot_stats()).await?,
            }
        }
    }

    /// Runs one of the reader's own requests to the node, which a stalled connection
    /// would leave waiting for ever: at most `patience`.
    async fn patiently<'s, F, Fut>(
        &'s mut self,
        patience: Duration,
        f: F,
    ) -> Result<(), CaptureError>
    where
        F: FnOnce(&'s mut Self) -> Fut,
        Fut: std::future::Future<Output = Result<(), CaptureError>> + 's,
    {
        let node = self.node.to_string();
        let ms = self.cfg.source.receive_timeout_ms;
        tokio::time::timeout(patience, f(self))
            .await
            .map_err(|_| CaptureError::Stalled { node, ms })?
    }

    fn stalled(&self) -> CaptureError {
        CaptureError::Stalled {
            node: self.node.to_string(),
            ms: self.cfg.source.receive_timeout_ms,
        }
    }

    /// A WAL record in this database, so the slot moves even when idle.
    async fn heartbeat(&mut self) -> Result<(), CaptureError> {
        self.client
            .execute(
                "SELECT pg_logical_emit_message(false, 'duplex.heartbeat', '')",
                &[],
            )
            .await
            .sql(self.node, "emitting heartbeat")?;
        Ok(())
    }

    /// Exports how much WAL the slot holds and how close it is to being lost.
    async fn slot_stats(&mut self) -> Result<(), CaptureError> {
        let row = self
            .client
            .query_opt(
                "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::float8,
                        (pg_current_wal_lsn() - restart_lsn)::float8, wal_status, safe_wal_size::float8
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.cfg.slot_name(self.node)],
            )
            .await
            .sql(self.node, "reading slot statistics")?;
        let Some(row) = row else { return Ok(()) };
        let m = &self.metrics;
        for (gauge, column) in [(&m.slot_lag, 0), (&m.slot_retained_wal, 1)] {
            if let Some(v) = row.get::<_, Option<f64>>(column) {
                gauge.set(v);
            }
        }
        let status: Option<String> = row.get(2);
        let status = status.as_deref().unwrap_or("");
        // NULL means unlimited, or a slot already lost.
        let safe = row.get::<_, Option<f64>>(3).unwrap_or(match status {
            "lost" => 0.0,
            _ => m::UNLIMITED_SAFE_WAL_SIZE,
        });
        m.slot_safe_wal_size.set(safe);
        m.set_wal_status(status);
        Ok(())
    }

    async fn on_message(&mut self, msg: ReplicationMessage) -> Result<(), CaptureError> {
        match msg {
            ReplicationMessage::Keepalive {
                wal_end,
                reply_requested,
            } => {
                self.progress.reported(wal_end);
                if reply_requested {
                    self.send_status(true).await?;
                }
            }
            ReplicationMessage::XLogData { wal_start, data } => {
                let decoded = pgoutput::decode(&data).map_err(|source| CaptureError::Decode {
                    node: self.node.to_string(),
                    lsn: wal_start,
                    source,
                })?;
                if let LogicalMessage::Relation(rel) = &decoded {
                    let info = crate::capture::catalog::table_info(&self.client, rel)
                        .await
                        .sql(self.node, "looking up a table's types and key")?;
                    self.reader.add_table(rel.id, info);
                }
                if matches!(
                    decoded,
                    LogicalMessage::Message {
                        transactional: false,
                        ..
                    }
                ) {
                    self.progress.reported(wal_start);
                }
                let mut out = std::mem::take(&mut self.out);
                self.reader
                    .handle(decoded, wal_start, now_ms(), &mut out)
                    .map_err(|source| CaptureError::Reader {
                        node: self.node.to_string(),
                        source,
                    })?;
                for o in out.drain(..) {
                    self.forward(o).await?;
                }
                self.out = out;
            }
        }
        Ok(())
    }

    /// Hands one output to the producer and the delivery queue. Waits when the queue
    /// is full: that is the backpressure on reading WAL.
    async fn forward(&mut self, o: Output) -> Result<(), CaptureError> {
        let pending = match o {
            Output::Event(ev) => {
                let (read, produced) = self.counters_for(&ev);
                read.increment(1);
                let delivery = self
                    .producer
                    .send(&ev)
                    .await
                    .map_err(|e| self.sink_err(e))?;
                Pending::Message {
                    commit_lsn: ev.source.lsn,
                    delivery,
                    produced,
                }
            }
            Output::Commit { end_lsn, echo, .. } => {
                self.metrics.transactions.increment(1);
                if echo {
                    self.metrics.echoes.increment(1);
                }
                self.progress.handed_over(end_lsn);
                Pending::Commit { end_lsn }
            }
        };
        if self.queue.send(pending).await.is_err() {
            // The tracker ended, and only does on an error: that error is the cause
            // (offsets that went back must stop duplex, not read as a transient stop).
            let joined = (&mut self.tracker).await;
            return Err(self.tracker_ended(joined).await);
        }
        Ok(())
    }

    /// The session's end once the delivery tracker ended, on the error it ended with.
    async fn tracker_ended(
        &mut self,
        joined: Result<Result<(), BrokerError>, tokio::task::JoinError>,
    ) -> CaptureError {
        let e = match joined {
            Ok(Err(e)) => e,
            _ => BrokerError::TrackerGone,
        };
        self.sink_failed(e).await
    }

    fn counters_for(&mut self, ev: &ChangeEvent) -> (metrics::Counter, metrics::Counter) {
        let table = ev.source.table_name().to_string();
        self.metrics.table_op(&table, ev.op.label()).clone()
    }

    /// Confirms the newest durable position to the slot.
    async fn send_status(&mut self, force: bool) -> Result<(), CaptureError> {
        let durable = *self.durable.borrow();
        let in_transaction = self.reader.in_transaction();
        if let Some(flush) = self.progress.confirmable(durable, in_transaction, force) {
            self.stream
                .send_status(flush)
                .await
                .map_err(|e| self.wal_err(e))?;
            self.metrics.confirmed_lsn.set(flush.0 as f64);
        }
        self.record_offset().await
    }

    /// Records the highest acknowledged offset on the node, so that a later session
    /// notices a broker that came back without it. It only rises on one topic: an
    /// old instance's late write, after a standby took over and recorded more, must
    /// not lower it.
    async fn record_offset(&mut self) -> Result<(), CaptureError> {
        let last = self.acked.borrow().last;
        let Some(offset) = last.filter(|_| last != self.recorded_offset) else {
            return Ok(());
        };
        let (slot, topic) = (self.cfg.slot_name(self.node), self.cfg.topic(self.node));
        slots::record_offset(&self.client, &slot, &topic, offset)
            .await
            .sql(self.node, "recording the topic's last offset")?;
        self.recorded_offset = last;
        Ok(())
    }

    /// Clean stop: let in-flight messages be acknowledged, confirm them, return.
    async fn drain(&mut self) -> Result<(), CaptureError> {
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.queue, closed));
        match tokio::time::timeout(SHUTDOWN_DRAIN, &mut self.tracker).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => return Err(self.sink_failed(e).await),
            _ => tracing::warn!(
                node = self.node,
                "in-flight messages not acknowledged in time; they will be re-read on restart"
            ),
        }
        self.send_status(true).await?;
        tracing::info!(node = self.node, confirmed = %self.progress.confirmed(), "reader stopped");
        Ok(())
    }

    /// The session's end on a sink error; a broker found to have lost acknowledged
    /// messages is recorded on the node first, so that no later session (of this
    /// process or another) reads or writes the topic before the operator resynchronised.
    /// Where the stream began on that topic is forgotten with it: the topic's offsets
    /// start over, and the next session records where the stream begins on it again.
    async fn sink_failed(&mut self, source: BrokerError) -> CaptureError {
        if source.is_topic_lost() {
            self.abort.abort();
            let (slot, topic) = (self.cfg.slot_name(self.node), self.cfg.topic(self.node));
            let recorded =
                slots::mark_topic_lost(&self.client, &slot, &topic, &source.to_string()).await;
            if let Err(e) = recorded {
                tracing::error!(node = self.node, error = %e, "could not record the lost topic on the node");
            }
        }
        self.sink_err(source)
    }

    fn sink_err(&self, source: BrokerError) -> CaptureError {
        CaptureError::Broker {
            node: self.node.to_string(),
            source,
        }
    }

    fn wal_err(&self, source: WalsenderError) -> CaptureError {
        CaptureError::Walsender {
            node: self.node.to_string(),
            source,
        }
    }
}

impl Drop for Session<'_> {
    /// The tracker belongs to this session: a new session starts its own.
    fn drop(&mut self) {
        self.tracker.abort();
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
