//! The duplex binary under test (and the previous release's, which the upgrade test starts
//! from): a config for a test's databases, and the daemon as a child process that can be
//! stopped cleanly or killed with SIGKILL.

use super::kafka::Broker;
use super::pg::Cluster;
use super::{register, temp_dir, unique, Cleanup};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;
use tokio_postgres::Client;

/// The duplex binary under test: this build's, or `DUPLEX_TEST_BIN` (to run a test
/// against another build, e.g. to see a regression test fail on the code before a fix).
pub fn bin() -> PathBuf {
    std::env::var_os("DUPLEX_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_duplex").into())
}

/// The previous release's duplex, which the upgrade test sets nodes up and runs with
/// before it upgrades them: `DUPLEX_PREVIOUS_BIN` (set by `scripts/dev-env install`,
/// which builds it), else where that builds it.
pub fn previous_bin() -> PathBuf {
    let path = std::env::var_os("DUPLEX_PREVIOUS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("DUPLEX_CACHE_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                        .join(".cache/duplex")
                })
                .join("duplex-90bb4be/duplex")
        });
    assert!(
        path.is_file(),
        "the previous release's duplex is not at {}: `scripts/dev-env install` builds it",
        path.display()
    );
    path
}

/// One test's setup: node `a` (the source) and node `b`, each a database of its own.
pub struct Rig {
    pub dir: PathBuf,
    pub db_a: String,
    pub db_b: String,
    pub prefix: String,
    pub config: PathBuf,
    /// Where node a's database is (and node b's, unless b runs another version).
    pub cluster: &'static Cluster,
    /// Where node b's database is.
    pub cluster_b: &'static Cluster,
}

impl Rig {
    /// Two fresh databases on the shared clusters (node b's of `DUPLEX_PG_BIN_B`'s
    /// version if set), the given DDL run on both, and a config streaming a → b for
    /// `tables`, with `extra` TOML appended.
    pub async fn new(ddl: &str, tables: &[&str], extra: &str) -> Rig {
        Rig::new_across(Cluster::shared(), Cluster::shared_b(), ddl, tables, extra).await
    }

    /// Like `new`, both databases on `cluster`.
    pub async fn new_on(cluster: &'static Cluster, ddl: &str, tables: &[&str], extra: &str) -> Rig {
        Rig::new_across(cluster, cluster, ddl, tables, extra).await
    }

    /// Like `new`, node a's database on `cluster`, node b's on `cluster_b`.
    pub async fn new_across(
        cluster: &'static Cluster,
        cluster_b: &'static Cluster,
        ddl: &str,
        tables: &[&str],
        extra: &str,
    ) -> Rig {
        let (db_a, db_b) = (cluster.create_db(), cluster_b.create_db());
        for (cl, db) in [(cluster, &db_a), (cluster_b, &db_b)] {
            cl.client(db).await.batch_execute(ddl).await.unwrap();
        }
        let prefix = unique("duplex");
        let dir = temp_dir("duplex-rig-");
        let rig = Rig {
            config: dir.join("duplex.toml"),
            dir,
            db_a,
            db_b,
            prefix,
            cluster,
            cluster_b,
        };
        rig.write_config(tables, extra);
        rig
    }

    /// Like `new`, syncing both directions.
    pub async fn both(ddl: &str, tables: &[&str], extra: &str) -> Rig {
        let rig = Rig::new(ddl, tables, extra).await;
        rig.edit_config(&[("\"a_to_b\"", "\"both\"")]);
        rig
    }

    /// Replaces text in the config file, each pair in turn.
    pub fn edit_config(&self, replacements: &[(&str, &str)]) {
        let mut cfg = std::fs::read_to_string(&self.config).unwrap();
        for (from, to) in replacements {
            assert!(cfg.contains(from), "{from:?} is not in the config");
            cfg = cfg.replace(from, to);
        }
        std::fs::write(&self.config, cfg).unwrap();
    }

    /// Gives table `table` a deterministic id derived from `from` under `namespace`.
    pub fn add_identity(&self, table: &str, namespace: &str, from: &[&str]) {
        let name = format!("name = \"{table}\"");
        let from: Vec<String> = from.iter().map(|c| format!("\"{c}\"")).collect();
        let with = format!(
            "{name}\nidentity = {{ column = \"id\", namespace = \"{namespace}\", from = [{}] }}",
            from.join(", ")
        );
        self.edit_config(&[(&name, &with)]);
    }

    pub fn topic_of(&self, node: &str) -> String {
        format!("{}.{node}.changes", self.prefix)
    }

    /// A superuser session on node a's database.
    pub async fn client_a(&self) -> Client {
        self.cluster.client(&self.db_a).await
    }

    /// A superuser session on node b's database.
    pub async fn client_b(&self) -> Client {
        self.cluster_b.client(&self.db_b).await
    }

    /// A URL for `user` on node b's database.
    pub fn url_b(&self, user: &str) -> String {
        self.cluster_b.url(user, &self.db_b)
    }

    pub fn write_config(&self, tables: &[&str], extra: &str) {
        let tables: String = tables
            .iter()
            .map(|t| format!("[[tables]]\nname = \"{t}\"\n"))
            .collect();
        let text = format!(
            r#"
[nodes.a]
url = "{a}"
slot = "{prefix}_a"
publication = "{prefix}"
[nodes.b]
url = "{b}"
slot = "{prefix}_b"
publication = "{prefix}"
[kafka]
brokers = "{brokers}"
topic_prefix = "{prefix}"
[sync]
direction = "a_to_b"
linger_ms = 10
[metrics]
listen = "127.0.0.1:{metrics}"
[source]
status_interval_ms = 500
heartbeat_interval_ms = 500
retry_initial_ms = 100
retry_max_ms = 1000
{tables}
{extra}
"#,
            a = self.cluster.url("postgres", &self.db_a),
            b = self.url_b("postgres"),
            prefix = self.prefix,
            brokers = Broker::shared().brokers(),
            metrics = super::free_port(),
        );
        std::fs::write(&self.config, text).unwrap();
    }

    pub fn topic(&self) -> String {
        format!("{}.a.changes", self.prefix)
    }

    pub fn slot_a(&self) -> String {
        format!("{}_a", self.prefix)
    }

    /// Drops node a's slot, as a failover or a restore would lose it.
    pub async fn drop_slot_a(&self) {
        self.cluster
            .client(&self.db_a)
            .await
            .batch_execute(&format!(
                "SELECT pg_drop_replication_slot('{}')",
                self.slot_a()
            ))
            .await
            .unwrap();
    }

    /// Runs a one-shot duplex command (check, setup, teardown, ...).
    pub fn command(&self, args: &[&str]) -> Output {
        self.command_env(args, &[])
    }

    /// `command` with variables added to its environment.
    pub fn command_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        self.command_of(&bin(), args, env)
    }

    /// `command_env` run by the duplex binary `bin` (e.g. [`previous_bin`]).
    pub fn command_of(&self, bin: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
        Command::new(bin)
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .envs(env.iter().copied())
            .output()
            .unwrap()
    }

    /// Starts `duplex run` in the background.
    pub fn start(&self) -> Daemon {
        self.start_with(&self.config)
    }

    /// A copy of the config for a second instance on this host: the same except
    /// `metrics.listen`, on a port of its own. Returns its path and metrics port.
    pub fn second_instance_config(&self) -> (PathBuf, u16) {
        let cfg = std::fs::read_to_string(&self.config).unwrap();
        let port = super::free_port();
        let listen = cfg.lines().find(|l| l.starts_with("listen = ")).unwrap();
        let path = self.dir.join(format!("{}.toml", unique("instance")));
        let text = cfg.replace(listen, &format!("listen = \"127.0.0.1:{port}\""));
        std::fs::write(&path, text).unwrap();
        (path, port)
    }

    /// Starts `duplex run --config <config>` in the background.
    pub fn start_with(&self, config: &std::path::Path) -> Daemon {
        self.start_env(config, &[("RUST_LOG", "info")])
    }

    /// Starts `duplex run --config <config>` with `env` added to its environment.
    pub fn start_env(&self, config: &std::path::Path, env: &[(&str, &str)]) -> Daemon {
        self.start_of(&bin(), config, env)
    }

    /// `start_env` run by the duplex binary `bin` (e.g. [`previous_bin`]).
    pub fn start_of(&self, bin: &Path, config: &Path, env: &[(&str, &str)]) -> Daemon {
        let log = self.dir.join(format!("{}.log", unique("duplex")));
        let child = Command::new(bin)
            .args(["run", "--config"])
            .arg(config)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        register(Cleanup::Kill(child.id()));
        Daemon { child, log }
    }
}

pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Drop for Daemon {
    /// A failing test shows what its daemon logged (the log's directory is removed at
    /// exit).
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = self.logs();
            let tail: Vec<&str> = logs.lines().rev().take(60).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            eprintln!(
                "--- duplex log {} (last 60 lines) ---\n{}",
                self.log.display(),
                tail.join("\n")
            );
        }
    }
}

impl Daemon {
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `needle` occurs `count` times in the log; returns the log.
    pub async fn wait_log(&self, needle: &str, count: usize, timeout: Duration) -> String {
        let what = format!("{count} × {needle:?} in the log");
        super::wait_for(&what, timeout, || {
            let logs = self.logs();
            async move { (logs.matches(needle).count() >= count).then_some(logs) }
        })
        .await
    }

    /// Waits until `directions` apply sessions have started: each direction's initial
    /// copy is done, so what the test writes from now on travels on the stream.
    pub async fn wait_applying(&self, directions: usize) {
        self.wait_log("applying direction=", directions, Duration::from_secs(60))
            .await;
    }

    /// SIGKILL: no chance to flush or confirm anything.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        super::forget(self.child.id());
    }

    /// SIGTERM and wait for a clean exit; returns the exit code.
    pub async fn stop(mut self) -> Option<i32> {
        // SAFETY: signals our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = super::wait_for("duplex to exit", Duration::from_secs(40), || {
            let r = self.child.try_wait().unwrap();
            async move { r }
        })
        .await;
        super::forget(self.child.id());
        if status.code().is_none() {
            use std::os::unix::process::ExitStatusExt;
            eprintln!(
                "duplex ended by signal {:?} (core dumped: {}); its log:\n{}",
                status.signal(),
                status.core_dumped(),
                self.logs()
            );
        }
        status.code()
    }

    /// Waits for the process to exit by itself; returns its exit code.
    pub async fn exited(&mut self, timeout: Duration) -> Option<i32> {
        let status = super::wait_for("duplex to exit by itself", timeout, || {
            let r = self.child.try_wait().unwrap();
            async move { r }
        })
        .await;
        super::forget(self.child.id());
        status.code()
    }
}
