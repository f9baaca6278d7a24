//! Initial sync: the rows a node already holds, copied into its peer before the
//! direction starts applying the node's topic, so that populated databases start
//! level.
//!
//! Why no change is lost or applied twice out of order: the source's slot exists
//! before the first chunk is read (both nodes are set up first), so every change
//! committed after that is on the source's topic, and the direction applies the whole
//! topic once its copy is done. Each chunk reads the source's rows as of its own
//! snapshot, which is later than the slot. A row changed between the slot's creation
//! and the chunk's read is both copied (its version at the read) and streamed (every
//! version since the slot): the stream, applied afterwards under last-writer-wins on
//! `updated_at` with tombstones, cannot take the copied row back to an older version,
//! and brings every change made after the read. So every row is in the copy or in
//! the stream after it, whatever the application writes during the copy; this is the
//! watermark idea of DBLog with the slot's creation as the low watermark and
//! last-writer-wins in place of a per-chunk de-duplication window.
//!
//! Flow: [`before_apply`] plans every direction on its first start at once (so that
//! a copy into one node cannot make it look populated to the other direction's
//! plan), then copies the direction's chunks with `snapshot.workers` workers
//! ([`copy`]), reporting to [`progress`]. [`recopy`] is `duplex snapshot`: a new plan
//! under last-writer-wins, for every table or one.

pub(crate) mod copy;
mod deletes;
mod mapped;
mod origin;
mod plan;
pub(crate) mod progress;
pub(crate) mod split;
pub(crate) mod table;

use crate::config::{Config, Direction, SnapshotMode};
use crate::pg::error::SqlError;
use crate::pg::node::{self, NodeError};
use crate::pg::setup::{self, LostSlot};
use crate::pg::state::positions;
use crate::runtime::Stop;
use crate::standby::Lease;
use crate::{Classify, ErrorClass};
use copy::CopyWorker;
use plan::Method;
pub(crate) use plan::{load as load_plans, TablePlan};
use progress::Progress;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use table::{Chunk, CopyTable};
use tracing::Instrument;

/// Errors of an initial sync.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Write(#[from] crate::lww::WriteError),
    #[error("snapshot {direction}: {source}")]
    Kafka {
        direction: String,
        source: Box<crate::kafka::BrokerError>,
    },
    #[error(transparent)]
    Lease(#[from] crate::standby::LeaseError),
    #[error("snapshot {direction}: table {table} {detail}")]
    Table {
        direction: String,
        table: String,
        detail: String,
    },
    #[error("snapshot {direction}: table {table}, key {key}: the target refuses the row: {error}. Fix the target (its columns, types or constraints) and restart duplex: the copy resumes at this row's chunk")]
    BadRow {
        direction: String,
        table: String,
        key: String,
        error: String,
    },
    #[error("snapshot {direction}: table {table} was planned again (by `duplex snapshot`?) while chunk {chunk} of its earlier plan was copied; the copy goes on from the new plan")]
    Replanned {
        direction: String,
        table: String,
        chunk: i32,
    },
    #[error("snapshot {direction}: table {table} holds rows on both node {from} and node {to} that predate duplex, and snapshot.mode = \"initial\" copies only into tables empty of those. Set snapshot.mode = \"merge\" to merge them under last-writer-wins (each row goes where it is missing or older), or \"never\" if they already hold the same rows")]
    BothPopulated {
        direction: String,
        table: String,
        from: String,
        to: String,
    },
}

impl From<crate::pg::error::SqlError> for SnapshotError {
    fn from(e: crate::pg::error::SqlError) -> Self {
        SnapshotError::Node(NodeError::Sql(e))
    }
}

impl Classify for SnapshotError {
    fn class(&self) -> ErrorClass {
        match self {
            SnapshotError::Node(e) => e.class(),
            SnapshotError::Write(e) => e.class(),
            SnapshotError::Kafka { source, .. } => source.class(),
            SnapshotError::Lease(e) => e.class(),
            SnapshotError::Replanned { .. } => ErrorClass::Transient,
            SnapshotError::Table { .. }
            | SnapshotError::BadRow { .. }
            | SnapshotError::BothPopulated { .. } => ErrorClass::Definite,
        }
    }
}

/// Whether a copy ran to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Copied {
    Complete,
    /// Shutdown came first; what was copied stays copied.
    Stopped,
}

/// Run by a direction before it applies its topic: plans every direction's first
/// copy (`snapshot.mode`), then copies what is left of `dir`'s.
pub(crate) async fn before_apply(
    cfg: &Config,
    dir: &Direction,
    stop: Stop,
) -> Result<Copied, SnapshotError> {
    // Planning is for directions that have not had their first start, and for tables
    // added to [[tables]] since a direction's first start (each plans every direction
    // that needs it, see `plan_first_start`).
    if cfg.snapshot.mode != SnapshotMode::Never
        && (!started_before(cfg, dir).await? || !unplanned(cfg, dir).await?.is_empty())
        && plan_first_start(cfg, stop.clone()).await? == Copied::Stopped
    {
        return Ok(Copied::Stopped);
    }
    let copied = copy_pending(cfg, dir, None, stop).await?;
    publish(cfg, dir).await?;
    Ok(copied)
}

/// Sets every configured table's snapshot gauges from what is stored, so that each
/// series exists (at zero when nothing was copied) for dashboards and alerts.
async fn publish(cfg: &Config, dir: &Direction) -> Result<(), SnapshotError> {
    let target = node::connect(cfg, &dir.to, "snapshot").await?;
    let plans = plan::load(&target, dir).await?;
    for tc in &cfg.tables {
        let m = crate::metrics::SnapshotMetrics::new(&dir.to_string(), &tc.name);
        let p = plans.iter().find(|p| p.table == tc.name);
        m.rows_estimated
            .set(p.map_or(0, |p| p.rows_estimated.max(0)) as f64);
        m.chunks_remaining
            .set(p.map_or(0, |p| (p.chunks - p.chunks_copied).max(0)) as f64);
    }
    Ok(())
}

/// Whether `dir` had its first start: it applied a change on its target, or its first
/// start planned every configured table (the copy may still be under way:
/// `copy_pending` finishes it). Not whether it holds a position on today's topic: a
/// direction that had its first start and has none there (a new `topic_prefix`)
/// starts where the source's stream begins on that topic (`apply::start`), since what
/// the stream published after the copy is on it, and the topic's end would skip it.
async fn started_before(cfg: &Config, dir: &Direction) -> Result<bool, SnapshotError> {
    let target = node::connect(cfg, &dir.to, "snapshot plan").await?;
    let applied = positions::applied_before(&target, &dir.from)
        .await
        .map_err(|e| {
            SnapshotError::from(SqlError::on(&dir.to, "reading duplex.apply_positions")(e))
        })?;
    if applied {
        return Ok(true);
    }
    let plans = plan::load(&target, dir).await?;
    Ok(cfg
        .tables
        .iter()
        .all(|tc| plans.iter().any(|p| p.table == tc.name)))
}

/// The configured tables `dir` has no plan for: every table before its first start,
/// and afterwards those added to `[[tables]]` since.
async fn unplanned(cfg: &Config, dir: &Direction) -> Result<Vec<String>, SnapshotError> {
    let target = node::connect(cfg, &dir.to, "snapshot plan").await?;
    let plans = plan::load(&target, dir).await?;
    Ok(cfg
        .tables
        .iter()
        .filter(|tc| !plans.iter().any(|p| p.table == tc.name))
        .map(|tc| tc.name.clone())
        .collect())
}

/// Records where `dir` starts reading its topic after a copy that has not read the
/// source yet, unless the direction has a position there: the topic's end now. Every
/// event before it is of a change committed before the copy reads, so the copy carries
/// it, and a transaction still being published at that offset was committed before
/// too. Returns whether it recorded a start.
async fn record_start(cfg: &Config, dir: &Direction) -> Result<bool, SnapshotError> {
    let topic = cfg.topic(&dir.from);
    let kafka = |source| SnapshotError::Kafka {
        direction: dir.to_string(),
        source: Box::new(source),
    };
    let target = node::connect(cfg, &dir.to, "snapshot plan").await?;
    let sql = |e| SnapshotError::from(SqlError::on(&dir.to, "writing duplex.apply_positions")(e));
    if positions::exists(&target, &dir.from, &topic)
        .await
        .map_err(sql)?
    {
        return Ok(false);
    }
    crate::kafka::ensure_topic(&cfg.kafka, &topic)
        .await
        .map_err(kafka)?;
    let (_, end) = crate::kafka::watermarks(&cfg.kafka, &topic)
        .await
        .map_err(kafka)?;
    let recorded = positions::store_start(&target, &dir.from, &topic, end)
        .await
        .map_err(sql)?;
    if recorded {
        tracing::info!(direction = %dir, topic = %topic, offset = end, "the direction will read its topic from here, after the copy");
    }
    Ok(recorded)
}

/// `duplex snapshot`: copies every configured table (or `only`) in both directions
/// again, under last-writer-wins, whether or not `duplex run` runs meanwhile (its
/// apply writes under the same rules). Returns the rows copied.
pub async fn recopy(
    cfg: &Config,
    only: Option<&str>,
    stop: Stop,
) -> Result<(u64, Copied), SnapshotError> {
    let dirs = directions(cfg)?;
    if let Some(t) = only {
        if !cfg.tables.iter().any(|tc| tc.name == t) {
            return Err(SnapshotError::Table {
                direction: "-".into(),
                table: t.to_string(),
                detail: "is not in the config's [[tables]]".into(),
            });
        }
    }
    set_up_both(cfg).await?;
    for dir in &dirs {
        // A direction without a position (it lost it, see the recovery in README)
        // starts where this copy begins.
        record_start(cfg, dir).await?;
        let source = node::connect(cfg, &dir.from, "snapshot plan").await?;
        let mut target = node::connect(cfg, &dir.to, "snapshot plan").await?;
        for tc in cfg
            .tables
            .iter()
            .filter(|tc| only.is_none_or(|t| t == tc.name))
        {
            let t = CopyTable::describe(&source, &target, dir, tc).await?;
            // Into an empty table by COPY; a chunk that meets rows applied meanwhile
            // is merged instead.
            let method = match plan::has_rows(&target, &dir.to, &t).await? {
                true => Method::Merge,
                false => Method::Direct,
            };
            plan::store(cfg, &source, &mut target, dir, &t, method).await?;
        }
    }
    let mut rows = 0;
    for dir in &dirs {
        let (copied, outcome) = copy_tables(cfg, dir, only, stop.clone()).await?;
        rows += copied;
        if outcome == Copied::Stopped {
            return Ok((rows, Copied::Stopped));
        }
    }
    Ok((rows, Copied::Complete))
}

fn directions(cfg: &Config) -> Result<Vec<Direction>, SnapshotError> {
    cfg.directions().map_err(|e| {
        SnapshotError::Node(NodeError::Config {
            node: "-".into(),
            detail: e.to_string(),
        })
    })
}

/// Both nodes' slots must exist before a row is read: changes from then on are
/// streamed.
pub(crate) async fn set_up_both(cfg: &Config) -> Result<(), SnapshotError> {
    for node in cfg.nodes.keys() {
        setup::setup(cfg, node, LostSlot::Refuse).await?;
    }
    Ok(())
}

/// Plans the copy of every direction starting for the first time (never applied,
/// nothing planned), deciding all of them before storing any.
///
/// Both directions' tasks come here, of this instance or another (components may be
/// split between two): one plans under a lease on the first node (see `standby`),
/// the others wait, then find it done. The lease bounds the wait when its holder
/// loses the node: the holder stops planning, and a lock session silent for
/// `standby.takeover_ms` is ended, as a component's is.
async fn plan_first_start(cfg: &Config, stop: Stop) -> Result<Copied, SnapshotError> {
    let dirs = directions(cfg)?;
    set_up_both(cfg).await?;
    let first = cfg.nodes.keys().next().cloned().unwrap_or_default();
    let lease = Lease::acquire(cfg, &first, "snapshot plan", None, &stop).await?;
    let Some(mut lease) = lease else {
        return Ok(Copied::Stopped);
    };
    tokio::select! {
        r = plan_directions(cfg, &dirs) => r.map(|()| Copied::Complete),
        lost = lease.lost() => Err(lost.into()),
    }
}

/// Plans the directions of `dirs` starting for the first time (see
/// [`plan_first_start`]).
async fn plan_directions(cfg: &Config, dirs: &[Direction]) -> Result<(), SnapshotError> {
    let (mut decided, mut empty) = (Vec::new(), Vec::new());
    let starting: Vec<&Direction> = {
        let mut v = Vec::new();
        for dir in dirs {
            if !started_before(cfg, dir).await? {
                v.push(dir);
            }
        }
        v
    };
    // Before any table is looked at: what a plan finds empty, and every chunk it
    // copies later, is read after the start each direction records here.
    for dir in &starting {
        if record_start(cfg, dir).await?
            && !plan::load(&node::connect(cfg, &dir.to, "snapshot plan").await?, dir)
                .await?
                .is_empty()
        {
            tracing::warn!(direction = %dir, "the direction lost its position and copied its tables before: it starts at the topic's end now; run `duplex snapshot` to copy what it missed");
        }
    }
    // Every direction's unplanned tables: all of them for a direction starting, those
    // added to [[tables]] since for one that started (it keeps its position, and
    // what the stream brings of such a table merges with its copy).
    for dir in dirs {
        let added = unplanned(cfg, dir).await?;
        if added.is_empty() {
            continue;
        }
        if !starting.contains(&dir) {
            tracing::info!(direction = %dir, tables = ?added, "tables added to [[tables]] since the direction first started: copying them");
        }
        let target = node::connect(cfg, &dir.to, "snapshot plan").await?;
        let source = node::connect(cfg, &dir.from, "snapshot plan").await?;
        for tc in cfg.tables.iter().filter(|tc| added.contains(&tc.name)) {
            // Every row an empty table gets from now on is on the stream.
            if !plan::source_has_rows(&source, dir, tc).await? {
                empty.push((dir.clone(), tc.name.clone()));
                continue;
            }
            let t = CopyTable::describe(&source, &target, dir, tc).await?;
            let method = choose(cfg, dir, &source, &target, &t).await?;
            decided.push((dir.clone(), t, method));
        }
    }
    for (dir, table) in &empty {
        let target = node::connect(cfg, &dir.to, "snapshot plan").await?;
        plan::store_nothing(&target, dir, table).await?;
    }
    for (dir, t, method) in &decided {
        let source = node::connect(cfg, &dir.from, "snapshot plan").await?;
        let mut target = node::connect(cfg, &dir.to, "snapshot plan").await?;
        let p = plan::store(cfg, &source, &mut target, dir, t, *method).await?;
        tracing::info!(direction = %dir, table = %t.name, method = method.as_str(),
            format = t.copy_format(), rows = p.rows_estimated, chunks = p.chunks,
            "snapshot planned");
    }
    Ok(())
}

/// Direct into an empty target; else a merge, which `initial` refuses when both
/// sides hold rows that predate duplex (rows the application wrote since reach the
/// peer on the stream: a merge of those is no merge of two populated databases).
async fn choose(
    cfg: &Config,
    dir: &Direction,
    source: &tokio_postgres::Client,
    target: &tokio_postgres::Client,
    t: &CopyTable,
) -> Result<Method, SnapshotError> {
    if !plan::has_rows(target, &dir.to, t).await? {
        return Ok(Method::Direct);
    }
    if cfg.snapshot.mode == SnapshotMode::Initial
        && plan::has_rows_older_than_duplex(target, &dir.to, t, false).await?
        && plan::has_rows_older_than_duplex(source, &dir.from, t, true).await?
    {
        return Err(SnapshotError::BothPopulated {
            direction: dir.to_string(),
            table: t.name.clone(),
            from: dir.from.clone(),
            to: dir.to.clone(),
        });
    }
    Ok(Method::Merge)
}

async fn copy_pending(
    cfg: &Config,
    dir: &Direction,
    only: Option<&str>,
    stop: Stop,
) -> Result<Copied, SnapshotError> {
    copy_tables(cfg, dir, only, stop).await.map(|(_, c)| c)
}

/// Copies the chunks left of `dir`'s unfinished tables; returns the rows copied.
async fn copy_tables(
    cfg: &Config,
    dir: &Direction,
    only: Option<&str>,
    stop: Stop,
) -> Result<(u64, Copied), SnapshotError> {
    let target = node::connect(cfg, &dir.to, "snapshot").await?;
    let plans: Vec<TablePlan> = plan::load(&target, dir)
        .await?
        .into_iter()
        .filter(|p| !p.done && only.is_none_or(|t| t == p.table))
        .collect();
    if plans.is_empty() {
        return Ok((0, Copied::Complete));
    }
    let source = node::connect(cfg, &dir.from, "snapshot").await?;
    let progress = Progress::new(&dir.to_string());
    let mut tables = HashMap::new();
    let mut queue = VecDeque::new();
    for p in &plans {
        let Some(tc) = cfg.tables.iter().find(|tc| tc.name == p.table) else {
            continue; // no longer configured
        };
        let t = CopyTable::describe(&source, &target, dir, tc).await?;
        progress.table(
            &p.table,
            p.rows_estimated.max(0) as u64,
            p.chunks.max(0) as u64,
            (p.chunks_copied.max(0) as u64, p.rows_copied.max(0) as u64),
        );
        // The heaviest chunks go first, so that no big one is left to run alone at
        // the end.
        let (bytes, _) = split::size(&source, dir, &t).await?;
        let weight = bytes / i64::from(p.chunks.max(1));
        queue.extend(
            plan::pending(&target, dir, &p.table, p.generation)
                .await?
                .into_iter()
                .map(|c| (weight, c)),
        );
        tables.insert(p.table.clone(), (t, p.method, p.generation));
    }
    drop(source);
    let mut queue: Vec<(i64, Chunk)> = queue.into();
    queue.sort_by_key(|(weight, _)| std::cmp::Reverse(*weight));
    // A mapped table's chunks wait until the tables it references are copied.
    let level_of = mapped::levels(cfg);
    let mut levels: BTreeMap<usize, VecDeque<Chunk>> = BTreeMap::new();
    for (_, c) in queue {
        let level = level_of.get(&c.table).copied().unwrap_or(0);
        levels.entry(level).or_default().push_back(c);
    }
    let chunks: usize = levels.values().map(VecDeque::len).sum();
    tracing::info!(direction = %dir, tables = tables.len(), chunks, "copying");
    // What the source deleted goes first: a truncation, then its rows reloaded, must
    // leave the reloaded rows (see `deletes`).
    {
        let mut worker = CopyWorker::connect(cfg, dir, 0).await?;
        for (t, _, _) in tables.values() {
            let carried = worker.carry_deletes(t).await?;
            if carried > 0 {
                tracing::info!(direction = %dir, table = %t.name, tombstones = carried, "carried the source's deletes");
            }
        }
    }
    let (done, copied) = crate::runtime::stop::pair();
    let copying = async {
        let mut r = Ok(());
        for level in levels.into_values() {
            let workers = cfg.snapshot.workers.min(level.len()).max(1);
            let queue = Mutex::new(level);
            let all = (0..workers).map(|n| {
                work(cfg, dir, n, &queue, &tables, &progress)
                    .instrument(tracing::info_span!("snapshot_worker", direction = %dir, n))
            });
            if let Err(e) = futures_util::future::try_join_all(all).await {
                r = Err(e);
                break;
            }
        }
        done.stop();
        r
    };
    let reporting = progress.report(copied);
    let outcome = tokio::select! {
        (r, ()) = async { tokio::join!(copying, reporting) } => { r?; Copied::Complete }
        _ = stop.requested() => Copied::Stopped,
    };
    let (rows, _) = progress.totals();
    if outcome == Copied::Complete {
        for table in tables.keys() {
            plan::finish(&target, dir, table).await?;
        }
        tracing::info!(direction = %dir, rows, "snapshot copied");
    }
    Ok((rows, outcome))
}

/// One worker: takes chunks until none is left.
async fn work(
    cfg: &Config,
    dir: &Direction,
    n: usize,
    queue: &Mutex<VecDeque<Chunk>>,
    tables: &HashMap<String, (CopyTable, Method, i32)>,
    progress: &Progress,
) -> Result<(), SnapshotError> {
    let mut worker = CopyWorker::connect(cfg, dir, n).await?;
    loop {
        let next = queue.lock().ok().and_then(|mut q| q.pop_front());
        let Some(chunk) = next else { return Ok(()) };
        let Some((t, method, generation)) = tables.get(&chunk.table) else {
            continue;
        };
        progress.started(&t.name);
        let rows = worker.copy(t, &chunk, *method, *generation).await?;
        progress.chunk_copied(&t.name, rows);
    }
}
