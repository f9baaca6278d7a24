//! The command line: `duplex run | check | setup | teardown`.
//!
//! Each command loads and validates the config, does its work and returns the process
//! exit code: 0 on success, 1 when something needs the operator (problems found, a
//! definite error), 2 for a config that does not load.

use crate::config::Config;
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use tracing::Instrument;

#[derive(Parser, Debug)]
#[command(
    name = "duplex",
    version,
    about = "Keeps two PostgreSQL databases in sync through Kafka"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create what is missing, then stream changes until SIGTERM or SIGINT.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check the config, both nodes and the broker; one line per problem.
    Check {
        #[arg(long, short)]
        config: PathBuf,
        /// Print what a row of this table becomes on the other node (its mapping).
        #[arg(long, value_name = "TABLE")]
        explain: Option<String>,
    },
    /// Create duplex's schema, publications, slots and origins (idempotent).
    Setup {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print a node's change events from Kafka as JSON lines, oldest first.
    Tail {
        #[arg(long, short)]
        config: PathBuf,
        /// The node whose topic to read.
        #[arg(long)]
        node: String,
        /// Stop after this many events.
        #[arg(long)]
        max: Option<usize>,
        /// Stop when nothing arrives for this long.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// Copy the configured tables (or one) again in both directions, under
    /// last-writer-wins; resumable, like the copy on a direction's first start.
    Snapshot {
        #[arg(long, short)]
        config: PathBuf,
        /// Only this table (`schema.table`, as configured).
        #[arg(long)]
        table: Option<String>,
    },
    /// Compare every configured table (or one) between the nodes; exit 0 when equal,
    /// 1 when they differ, 2 when they could not be compared.
    Verify {
        #[arg(long, short)]
        config: PathBuf,
        /// Only this table (`schema.table`, as configured).
        #[arg(long)]
        table: Option<String>,
        /// Print JSON instead of lines.
        #[arg(long)]
        json: bool,
        /// How long a difference must stay unchanged, on top of the directions'
        /// current lag, to be reported (a change still in flight is no difference).
        #[arg(long, default_value_t = 2000)]
        settle_ms: u64,
        /// Make the differing rows equal under last-writer-wins, then compare again.
        #[arg(long)]
        repair: bool,
    },
    /// The gate before moving an application between the nodes: exit 0 only when
    /// every direction is caught up (as `status --max-lag`) and verify finds the
    /// nodes equal; 1 when not, 2 when the tables could not be compared.
    Cutover {
        #[arg(long, short)]
        config: PathBuf,
        /// Run the check (duplex does not switch the application itself).
        #[arg(long, required = true)]
        check: bool,
        /// Seconds a direction may be behind and still pass.
        #[arg(long, default_value_t = 0.0)]
        max_lag: f64,
        /// As for verify: how long a difference must stay unchanged to count.
        #[arg(long, default_value_t = 2000)]
        settle_ms: u64,
        /// Print JSON instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Show each slot and direction, read from the databases and the broker.
    Status {
        #[arg(long, short)]
        config: PathBuf,
        /// Print JSON instead of lines.
        #[arg(long)]
        json: bool,
        /// Exit 1 if a direction is halted or further behind than this many seconds.
        #[arg(long)]
        max_lag: Option<f64>,
    },
    /// Inspect or retry events a direction could not apply.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Print the deterministic id (UUIDv5) of a natural key.
    Uuid {
        /// A UUID, or a name hashed to one.
        #[arg(long)]
        namespace: String,
        /// The natural-key values, in key order.
        #[arg(required = true)]
        values: Vec<String>,
    },
    /// Remove duplex's slots, publications, origins and schema from both nodes.
    Teardown {
        #[arg(long, short)]
        config: PathBuf,
        /// Confirm: the slots' positions are lost.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum DlqAction {
    /// List dead letters of every direction, oldest first.
    List {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Apply every unreplayed dead letter again; those that succeed are marked.
    Replay {
        #[arg(long, short)]
        config: PathBuf,
    },
}

/// Sets up tracing: human-readable text or JSON lines, level from `RUST_LOG` (default info).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tokio_postgres=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

pub async fn execute(cli: Cli) -> ExitCode {
    let path = match &cli.command {
        Command::Uuid { namespace, values } => return uuid(namespace, values),
        Command::Run { config }
        | Command::Check { config, .. }
        | Command::Setup { config }
        | Command::Snapshot { config, .. }
        | Command::Verify { config, .. }
        | Command::Cutover { config, .. }
        | Command::Tail { config, .. }
        | Command::Status { config, .. }
        | Command::Dlq {
            action: DlqAction::List { config } | DlqAction::Replay { config },
        }
        | Command::Teardown { config, .. } => config,
    };
    let cfg = match Config::load(path) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Run { .. } => run(cfg).await,
        Command::Check { explain, .. } => match explain {
            Some(t) => explain_table(&cfg, &t).await,
            None => check(&cfg).await,
        },
        Command::Setup { .. } => setup(&cfg).await,
        Command::Snapshot { table, .. } => snapshot(&cfg, table.as_deref()).await,
        Command::Verify {
            table,
            json,
            settle_ms,
            repair,
            ..
        } => crate::verify::command(&cfg, table.as_deref(), json, settle_ms, repair).await,
        Command::Cutover {
            max_lag,
            settle_ms,
            json,
            ..
        } => crate::cutover::check(&cfg, max_lag, settle_ms, json).await,
        Command::Teardown { yes, .. } => teardown(&cfg, yes).await,
        Command::Tail {
            node,
            max,
            timeout_ms,
            ..
        } => tail(&cfg, &node, max, timeout_ms).await,
        Command::Dlq { action } => dlq(&cfg, action).await,
        Command::Status { json, max_lag, .. } => status(&cfg, json, max_lag).await,
        Command::Uuid { .. } => ExitCode::SUCCESS,
    }
}

async fn status(cfg: &Config, json: bool, max_lag: Option<f64>) -> ExitCode {
    let s = crate::status::collect(cfg).await;
    if json {
        println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
    } else {
        print!("{}", crate::status::render(&s));
    }
    let failing = match max_lag {
        Some(max) => crate::status::failing(cfg, &s, max).await,
        None => s.problems.clone(),
    };
    for f in &failing {
        eprintln!("not ok: {f}");
    }
    if failing.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn uuid(namespace: &str, values: &[String]) -> ExitCode {
    let ns = crate::identity::namespace(namespace);
    let pairs: Vec<(&str, Option<&str>)> =
        values.iter().map(|v| ("value", Some(v.as_str()))).collect();
    match crate::identity::derive(&ns, &pairs) {
        Ok(id) => {
            println!("{id}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

async fn dlq(cfg: &Config, action: DlqAction) -> ExitCode {
    let result = match action {
        DlqAction::List { .. } => crate::apply::dead_letter::list(cfg).await.map(|rows| {
            rows.iter().for_each(|r| println!("{}", r.line));
            if rows.is_empty() {
                println!("no dead letters");
            }
        }),
        DlqAction::Replay { .. } => {
            crate::apply::dead_letter::replay(cfg)
                .await
                .map(|(ok, failing)| {
                    println!("replayed {ok}, still failing {failing}");
                })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn check(cfg: &Config) -> ExitCode {
    let problems = crate::preflight::check_all(cfg).await;
    for p in &problems {
        println!("{p}");
    }
    if problems.is_empty() {
        println!("ok: both nodes and the broker are ready");
        ExitCode::SUCCESS
    } else if problems.iter().all(|p| crate::preflight::is_warning(p)) {
        println!("ok: both nodes and the broker are ready (mind the warnings above)");
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `duplex check --explain T`: the table's mapping in both directions, with a sample
/// row; exit 1 if it cannot be read or has problems.
async fn explain_table(cfg: &Config, table: &str) -> ExitCode {
    let mut clients = std::collections::BTreeMap::new();
    for node in cfg.nodes.keys() {
        match crate::pg::node::connect(cfg, node, "check").await {
            Ok(c) => {
                clients.insert(node.clone(), c);
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    match crate::mapping::check::explain(cfg, table, &clients).await {
        Ok(text) => print!("{text}"),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    }
    let problems = crate::mapping::check::problems(cfg, &clients).await;
    for p in &problems {
        println!("{p}");
    }
    if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn setup(cfg: &Config) -> ExitCode {
    let mut code = ExitCode::SUCCESS;
    for node in cfg.nodes.keys() {
        match crate::pg::setup::setup(cfg, node, crate::pg::setup::LostSlot::Recreate).await {
            Ok(done) => done.iter().for_each(|d| println!("node {node}: {d}")),
            Err(e) => {
                eprintln!("error: {e}");
                code = ExitCode::FAILURE;
            }
        }
    }
    code
}

async fn snapshot(cfg: &Config, table: Option<&str>) -> ExitCode {
    use tokio::signal::unix::{signal, SignalKind};
    let (stopper, stop) = crate::runtime::stop::pair();
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        eprintln!("error: cannot handle signals");
        return ExitCode::FAILURE;
    };
    let copying = crate::snapshot::recopy(cfg, table, stop);
    tokio::pin!(copying);
    let result = tokio::select! {
        r = &mut copying => r,
        _ = async { tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} } } => {
            stopper.stop();
            copying.await
        }
    };
    match result {
        Ok((rows, crate::snapshot::Copied::Complete)) => {
            println!("snapshot copied {rows} rows");
            ExitCode::SUCCESS
        }
        Ok((rows, crate::snapshot::Copied::Stopped)) => {
            eprintln!("snapshot stopped after {rows} rows; run it again to copy the rest");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn teardown(cfg: &Config, yes: bool) -> ExitCode {
    if !yes {
        eprintln!("teardown drops duplex's replication slots, publications, origins and schema on both nodes; run again with --yes");
        return ExitCode::from(2);
    }
    let mut code = ExitCode::SUCCESS;
    for node in cfg.nodes.keys() {
        match crate::pg::setup::teardown(cfg, node).await {
            Ok(done) if done.is_empty() => println!("node {node}: nothing to remove"),
            Ok(done) => done.iter().for_each(|d| println!("node {node}: {d}")),
            Err(e) => {
                eprintln!("error: {e}");
                code = ExitCode::FAILURE;
            }
        }
    }
    code
}

async fn tail(cfg: &Config, node: &str, max: Option<usize>, timeout_ms: u64) -> ExitCode {
    if !cfg.nodes.contains_key(node) {
        eprintln!("error: no node {node:?} in the config");
        return ExitCode::from(2);
    }
    let (kafka, topic) = (cfg.kafka.clone(), cfg.topic(node));
    let idle = std::time::Duration::from_millis(timeout_ms);
    let read = tokio::task::spawn_blocking(move || {
        crate::kafka::read_topic(&kafka, &topic, max, idle, |v| {
            println!("{}", String::from_utf8_lossy(v))
        })
    })
    .await;
    match read {
        Ok(Ok(n)) if max.is_none_or(|m| n >= m) => ExitCode::SUCCESS,
        Ok(Ok(n)) => {
            eprintln!("only {n} event(s) arrived within {timeout_ms} ms");
            ExitCode::FAILURE
        }
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `duplex run` until SIGTERM or SIGINT; a second signal stops it at once.
async fn run(cfg: Arc<Config>) -> ExitCode {
    use tokio::signal::unix::{signal, SignalKind};
    // Installed before anything starts, so that no signal finds the default action.
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("error: cannot handle signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (signals_tx, signals) = tokio::sync::mpsc::channel(4);
    let forward = tokio::spawn(
        async move {
            loop {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                if signals_tx.send(()).await.is_err() {
                    break;
                }
            }
        }
        .instrument(tracing::info_span!("signals")),
    );
    let code = crate::daemon::run(cfg, signals).await;
    forward.abort();
    code
}
