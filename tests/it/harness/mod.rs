//! Real components for the integration tests: PostgreSQL 15 clusters, Apache Kafka
//! and the duplex binary, all on loopback, started on demand and stopped when the
//! test binary exits.
//!
//! One cluster and one broker are shared by the tests of a run; every test gets its own
//! database, slot, publication and topic prefix, so tests stay independent. Clusters
//! with special settings (e.g. wal_level=replica) are started per test.
//!
//! What several test modules share lives here too, so that no test module imports
//! another: table contents and convergence checks ([`tables`]), the random workload
//! ([`workload`]) and its apply log ([`apply_log`]), hand-made change events
//! ([`events`]), the mapping's reference case ([`mapping`]) and /metrics scraping
//! ([`metrics`]).

pub mod apply_log;
pub mod certs;
pub mod duplex;
pub mod events;
pub mod kafka;
pub mod kafka_secured;
pub mod mapping;
pub mod metrics;
pub mod pg;
pub mod physical;
pub mod proxy;
pub mod tables;
pub mod workload;

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Child processes and directories to clean up at exit.
static CLEANUP: Mutex<Vec<Cleanup>> = Mutex::new(Vec::new());

enum Cleanup {
    /// A postmaster: SIGQUIT makes it take its backends down with it.
    Postgres(u32),
    Kill(u32),
    Dir(std::path::PathBuf),
}

extern "C" fn cleanup_at_exit() {
    let items = match CLEANUP.lock() {
        Ok(mut v) => std::mem::take(&mut *v),
        Err(_) => return,
    };
    let mut pids = Vec::new();
    for item in &items {
        let (pid, sig) = match item {
            Cleanup::Postgres(pid) => (*pid, libc::SIGQUIT),
            Cleanup::Kill(pid) => (*pid, libc::SIGKILL),
            Cleanup::Dir(_) => continue,
        };
        // SAFETY: plain syscalls on pids this process started.
        unsafe { libc::kill(pid as i32, sig) };
        pids.push(pid);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for pid in pids {
        loop {
            let mut status = 0;
            // SAFETY: reaps the pid if it is our exited child (postmasters started by
            // pg_ctl are not), then asks whether it still exists.
            let alive = unsafe {
                libc::waitpid(pid as i32, &mut status, libc::WNOHANG);
                libc::kill(pid as i32, 0) == 0
            };
            if !alive || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    for item in items {
        if let Cleanup::Dir(d) = item {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Forgets a child that has been reaped, or a postmaster that stopped: its pid may
/// belong to another process soon.
fn forget(pid: u32) {
    if let Ok(mut v) = CLEANUP.lock() {
        v.retain(|item| !matches!(item, Cleanup::Kill(p) | Cleanup::Postgres(p) if *p == pid));
    }
}

fn register(item: Cleanup) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: registers a plain extern "C" function with no captured state.
        unsafe { libc::atexit(cleanup_at_exit) };
    });
    CLEANUP.lock().unwrap().push(item);
}

/// A finished command's stdout and stderr, for assertions and failure messages.
pub fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Polls `f` until it returns `Some`, failing the test with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A fresh directory that is removed at exit.
pub fn temp_dir(prefix: &str) -> std::path::PathBuf {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .unwrap()
        .keep();
    register(Cleanup::Dir(dir.clone()));
    dir
}

/// A name unique within this run, usable as an identifier.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// The single `bigint` a query returns (e.g. a count).
pub async fn count(c: &tokio_postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap().get(0)
}

/// Waits until `sql` returns `want`.
pub async fn wait_count(c: &tokio_postgres::Client, sql: &str, want: i64) {
    wait_for(
        &format!("{sql} = {want}"),
        Duration::from_secs(60),
        || async { (count(c, sql).await == want).then_some(()) },
    )
    .await
}
