//! PostgreSQL clusters for tests: initdb into a temp dir, wal_level=logical, a free
//! loopback port, started with pg_ctl and stopped (SIGQUIT) at exit. The server is
//! Debian's PostgreSQL 15, or the one in `DUPLEX_PG_BIN` (initdb, pg_ctl, postgres and
//! psql; `scripts/dev-env install` puts 13 to 18 in /var/cache/duplex/postgresql).
//! With `DUPLEX_PG_BIN_B` naming another version, node b's databases live on a
//! cluster of that version: a pair across major versions, as in an upgrade.

use super::{free_port, register, temp_dir, unique, Cleanup};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use tokio_postgres::{Client, NoTls};

/// Roles every test cluster has, for the authentication tests.
pub const MD5_USER: (&str, &str) = ("duplex_md5", "md5-secret");
pub const SCRAM_USER: (&str, &str) = ("duplex_scram", "scram-secret");
/// A role that may log in but not replicate.
pub const PLAIN_USER: &str = "duplex_plain";
/// Authenticated by pg_hba.conf method `password` (the password sent in cleartext).
pub const CLEARTEXT_USER: (&str, &str) = ("duplex_cleartext", "cleartext-secret");

const HBA: &str = "\
local all all trust
local replication all trust
host all duplex_md5 127.0.0.1/32 md5
host replication duplex_md5 127.0.0.1/32 md5
host all duplex_scram 127.0.0.1/32 scram-sha-256
host replication duplex_scram 127.0.0.1/32 scram-sha-256
host all duplex_cleartext 127.0.0.1/32 password
host replication duplex_cleartext 127.0.0.1/32 password
host all all 127.0.0.1/32 trust
host replication all 127.0.0.1/32 trust
";

pub struct Cluster {
    pub port: u16,
    pub dir: PathBuf,
    /// Where its server binaries are.
    pub bin: PathBuf,
    /// Its server's major version.
    pub major: u32,
}

/// Node a's server binaries: `DUPLEX_PG_BIN`, or Debian's PostgreSQL 15.
fn bin_a() -> PathBuf {
    std::env::var_os("DUPLEX_PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/usr/lib/postgresql/15/bin".into())
}

/// Node b's server binaries when they differ from node a's: `DUPLEX_PG_BIN_B`, for
/// the pairs across major versions.
fn bin_b() -> Option<PathBuf> {
    std::env::var_os("DUPLEX_PG_BIN_B")
        .map(PathBuf::from)
        .filter(|b| *b != bin_a())
}

/// The major version of the server in `bin` (`postgres --version`).
fn major_of(bin: &Path) -> u32 {
    let postgres = bin.join("postgres");
    let out = Command::new(&postgres)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", postgres.display()));
    let text = String::from_utf8_lossy(&out.stdout);
    // "postgres (PostgreSQL) 18.4"
    text.rsplit(' ')
        .next()
        .and_then(|v| v.trim().split('.').next())
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("no version in {text:?}"))
}

/// Runs the PostgreSQL tool in `bin`, as the `postgres` OS user when we are root
/// (initdb and the server refuse to run as root).
pub(super) fn pg_command(bin: &Path, tool: &str) -> Command {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        c
    } else {
        Command::new(bin.join(tool))
    }
}

pub(super) fn run(mut c: Command, what: &str) {
    let out = c.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Cluster {
    /// The cluster shared by tests that need nothing special: node a's databases, and
    /// node b's unless b runs another version.
    pub fn shared() -> &'static Cluster {
        static SHARED: OnceLock<Cluster> = OnceLock::new();
        SHARED.get_or_init(|| Cluster::start(&[]))
    }

    /// The cluster of node b's databases: the shared one, or one of its own running
    /// `DUPLEX_PG_BIN_B`'s version.
    pub fn shared_b() -> &'static Cluster {
        static SHARED_B: OnceLock<&'static Cluster> = OnceLock::new();
        SHARED_B.get_or_init(|| match bin_b() {
            Some(bin) => Box::leak(Box::new(Cluster::start_bin(bin, &[]))),
            None => Cluster::shared(),
        })
    }

    /// Starts a new cluster of node a's version with `settings` on top of the test
    /// defaults.
    pub fn start(settings: &[(&str, &str)]) -> Cluster {
        Cluster::start_bin(bin_a(), settings)
    }

    /// Starts a new cluster of the server in `bin` with `settings` on top of the test
    /// defaults.
    pub fn start_bin(bin: PathBuf, settings: &[(&str, &str)]) -> Cluster {
        let major = major_of(&bin);
        let dir = temp_dir("duplex-pg-");
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            run(
                {
                    let mut c = Command::new("chown");
                    c.args(["-R", "postgres:postgres"]).arg(&dir);
                    c
                },
                "chown",
            );
        }
        let data = dir.join("data");
        let mut init = pg_command(&bin, "initdb");
        init.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        run(init, "initdb");
        std::fs::write(data.join("pg_hba.conf"), HBA).unwrap();
        let port = free_port();
        let mut conf = vec![
            ("listen_addresses", "'127.0.0.1'".to_string()),
            ("port", port.to_string()),
            ("unix_socket_directories", format!("'{}'", dir.display())),
            ("wal_level", "logical".into()),
            // Every test leaves its slots and its origins' replay state (which this
            // setting also bounds) behind: room for a whole run.
            ("max_replication_slots", "512".into()),
            ("max_wal_senders", "64".into()),
            ("max_connections", "200".into()),
            ("fsync", "off".into()),
            ("full_page_writes", "off".into()),
            ("wal_sender_timeout", "60s".into()),
            ("max_slot_wal_keep_size", "'10GB'".into()),
        ];
        if major >= 18 {
            // From 18, origins with replay state have their own cap (default 10).
            conf.push(("max_active_replication_origins", "512".into()));
        }
        for (k, v) in settings {
            conf.retain(|(c, _)| c != k);
            conf.push((k, v.to_string()));
        }
        let text: String = conf.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
        let mut existing = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        existing.push_str(&text);
        std::fs::write(data.join("postgresql.conf"), existing).unwrap();
        let cluster = Cluster {
            port,
            dir,
            bin,
            major,
        };
        cluster.start_server();
        cluster.psql("postgres", &format!(
            "SET password_encryption = 'md5'; CREATE ROLE {} LOGIN SUPERUSER PASSWORD '{}';
             SET password_encryption = 'scram-sha-256'; CREATE ROLE {} LOGIN SUPERUSER PASSWORD '{}';
             CREATE ROLE {PLAIN_USER} LOGIN;
             CREATE ROLE {} LOGIN REPLICATION PASSWORD '{}';",
            MD5_USER.0, MD5_USER.1, SCRAM_USER.0, SCRAM_USER.1, CLEARTEXT_USER.0, CLEARTEXT_USER.1
        ));
        cluster
    }

    /// Moves the cluster's transaction ids `by` ahead, as years of traffic would: stops
    /// it, sets the next id with pg_resetwal (after making the commit log's segment
    /// for it) and starts it again. Every row must be frozen first (`VACUUM FREEZE` in
    /// every database), or it would read as written in the future.
    pub fn advance_xids(&self, by: u64) {
        let data = self.dir.join("data");
        self.stop("fast");
        let mut control = pg_command(&self.bin, "pg_controldata");
        control.arg("-D").arg(&data);
        let out = control.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let next = text
            .lines()
            .find_map(|l| l.strip_prefix("Latest checkpoint's NextXID:"))
            .unwrap_or_else(|| panic!("no NextXID in {text}"))
            .trim()
            .to_string();
        let (epoch, xid) = next.split_once(':').unwrap();
        let full = (epoch.parse::<u64>().unwrap() << 32) + xid.parse::<u64>().unwrap() + by;
        let (epoch, xid) = (full >> 32, (full & 0xffff_ffff).max(3));
        // One segment of the commit log holds 32 pages of 32,768 transactions.
        let segment = data
            .join("pg_xact")
            .join(format!("{:04X}", xid / (32 * 32768)));
        if !segment.exists() {
            std::fs::write(&segment, vec![0u8; 32 * 8192]).unwrap();
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } == 0 {
                let mut chown = Command::new("chown");
                chown.arg("postgres:postgres").arg(&segment);
                run(chown, "chown");
            }
        }
        let mut reset = pg_command(&self.bin, "pg_resetwal");
        reset
            .arg("-D")
            .arg(&data)
            .args(["-x", &xid.to_string(), "-e", &epoch.to_string()]);
        run(reset, "pg_resetwal");
        self.start_server();
    }

    /// Stops the server (`mode`: pg_ctl's fast, or immediate as a crash would).
    pub fn stop(&self, mode: &str) {
        let old_pid = self.postmaster_pid();
        let mut stop = pg_command(&self.bin, "pg_ctl");
        stop.arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", mode, "-w", "stop"]);
        run(stop, "pg_ctl stop");
        super::forget(old_pid);
    }

    /// Starts the server of this cluster's data directory and waits for it to take
    /// connections.
    pub(super) fn start_server(&self) {
        let mut start = pg_command(&self.bin, "pg_ctl");
        start
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(["-w", "-t", "60", "start"]);
        run(start, "pg_ctl start");
        register(Cleanup::Postgres(self.postmaster_pid()));
    }

    /// Runs pg_ctl `args` on this cluster's data directory.
    pub(super) fn pg_ctl(&self, args: &[&str]) {
        let mut c = pg_command(&self.bin, "pg_ctl");
        c.arg("-D").arg(self.dir.join("data")).args(args);
        run(c, "pg_ctl");
    }

    fn postmaster_pid(&self) -> u32 {
        let pid_file =
            std::fs::read_to_string(self.dir.join("data").join("postmaster.pid")).unwrap();
        pid_file.lines().next().unwrap().trim().parse().unwrap()
    }

    /// Puts `lines` ahead of the test defaults in pg_hba.conf (the first match wins)
    /// and reloads.
    pub fn prepend_hba(&self, lines: &str) {
        let path = self.dir.join("data").join("pg_hba.conf");
        std::fs::write(path, format!("{lines}\n{HBA}")).unwrap();
        self.psql("postgres", "SELECT pg_reload_conf()");
    }

    pub fn psql(&self, db: &str, sql: &str) {
        let mut c = pg_command(&self.bin, "psql");
        c.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.dir)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-c",
                sql,
            ]);
        run(c, "psql");
    }

    /// A URL for `user` on database `db`.
    pub fn url(&self, user: &str, db: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{db}", self.port)
    }

    /// A fresh database owned by this test.
    pub fn create_db(&self) -> String {
        let db = unique("t");
        self.psql("postgres", &format!("CREATE DATABASE {db}"));
        db
    }

    /// A superuser session on `db` printing values the way duplex's sessions do.
    pub async fn client(&self, db: &str) -> Client {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host("127.0.0.1")
            .port(self.port)
            .user("postgres")
            .dbname(db)
            .options("-c DateStyle=ISO,\\ MDY -c TimeZone=UTC -c extra_float_digits=3 -c IntervalStyle=postgres");
        let (client, conn) = cfg.connect(NoTls).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }
}
