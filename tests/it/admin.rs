//! `duplex check`, `setup` and `teardown`, and how `run` reacts to bad config and bad
//! connections.

use crate::harness::duplex::Rig;
use crate::harness::free_port;
use crate::harness::output_text as text;
use crate::harness::pg::{Cluster, MD5_USER, PLAIN_USER};
use std::time::Duration;

const DDL: &str = "CREATE TABLE items (id bigint PRIMARY KEY, v text, updated_at timestamptz NOT NULL DEFAULT now());";

#[tokio::test]
async fn check_passes_on_a_good_setup() {
    let rig = Rig::new(DDL, &["public.items"], "").await;
    let out = rig.command(&["check"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("ok:"), "{}", text(&out));
}

#[tokio::test]
async fn check_names_every_problem() {
    let rig = Rig::new(
        "CREATE TABLE nopk (id int, updated_at timestamptz);
         CREATE TABLE noupd (id int PRIMARY KEY);",
        &["public.nopk", "public.noupd", "public.ghost"],
        "",
    )
    .await;
    // Node a: a cluster with wal_level=replica, as a role that may not replicate;
    // Kafka: a port nobody listens on.
    let replica = Cluster::start(&[("wal_level", "replica")]);
    let cfg = std::fs::read_to_string(&rig.config).unwrap();
    let a_url = Cluster::shared().url("postgres", &rig.db_a);
    // Node b, the target, as a role without the privileges applying needs.
    let b_url = rig.url_b("postgres");
    let cfg = cfg
        .replace(&a_url, &replica.url(PLAIN_USER, "postgres"))
        .replace(&b_url, &rig.url_b(PLAIN_USER))
        .replace(
            &crate::harness::kafka::Broker::shared().brokers(),
            &format!("127.0.0.1:{}", free_port()),
        );
    std::fs::write(&rig.config, cfg).unwrap();
    let out = rig.command(&["check"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    // What a role that is not a superuser can be granted depends on the version.
    let major_b = rig.cluster_b.major;
    let origins = if major_b < 14 {
        format!("only a superuser may (ALTER ROLE {PLAIN_USER} SUPERUSER)")
    } else {
        "GRANT EXECUTE ON FUNCTION pg_replication_origin_session_setup(text)".into()
    };
    let parameter = if major_b < 15 {
        format!("on PostgreSQL {major_b} only a superuser may")
    } else {
        format!("GRANT SET ON PARAMETER session_replication_role TO {PLAIN_USER}")
    };
    for expected in [
        &origins,
        &parameter,
        "node a: wal_level is replica; set wal_level = logical",
        &format!("node a: role {PLAIN_USER} may not replicate"),
        "node a: table public.nopk does not exist",
        "node b: table public.nopk has no primary key",
        "node b: table public.noupd has no column updated_at",
        "node b: table public.ghost does not exist",
        "kafka: brokers 127.0.0.1:",
        &format!("node b: role {PLAIN_USER} may not use replication origins"),
        &format!("node b: role {PLAIN_USER} may not set session_replication_role"),
        &format!("node b: role {PLAIN_USER} may not set deadlock_timeout"),
    ] {
        assert!(t.contains(expected), "missing {expected:?} in:\n{t}");
    }
}

/// Slot names are per cluster: a second deployment on another database of the same
/// cluster that picks the first one's slot name is refused, naming the database.
#[tokio::test]
async fn a_slot_of_another_database_is_refused() {
    let first = Rig::new(DDL, &["public.items"], "").await;
    assert!(first.command(&["setup"]).status.success());
    let second = Rig::new(DDL, &["public.items"], "").await;
    second.edit_config(&[(
        &format!("slot = \"{}\"", second.slot_a()),
        &format!("slot = \"{}\"", first.slot_a()),
    )]);
    let out = second.command(&["setup"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains(&format!(
            "slot {} belongs to database {}",
            first.slot_a(),
            first.db_a
        )),
        "{t}"
    );
}

/// A `timestamp` (no time zone) `updated_at` is read as UTC: fine where sessions
/// default to UTC, refused by `check` and `run` where they default to another zone.
#[tokio::test]
async fn a_local_timestamp_updated_at_is_refused_outside_utc() {
    let ddl =
        "CREATE TABLE legacy (id int PRIMARY KEY, updated_at timestamp NOT NULL DEFAULT now())";
    let rig = Rig::new(ddl, &["public.legacy"], "").await;
    let b = rig.client_b().await;
    b.batch_execute(&format!("ALTER DATABASE {} SET TimeZone = 'UTC'", rig.db_b))
        .await
        .unwrap();
    let out = rig.command(&["check"]);
    assert!(out.status.success(), "{}", text(&out));
    b.batch_execute(&format!(
        "ALTER DATABASE {} SET TimeZone = 'Europe/Berlin'",
        rig.db_b
    ))
    .await
    .unwrap();
    let out = rig.command(&["check"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("node b: table public.legacy: updated_at is a timestamp without time zone and new sessions here use TimeZone Europe/Berlin"),
        "{t}"
    );
    // The reader's own preflight refuses it too: run stops.
    rig.edit_config(&[("\"a_to_b\"", "\"b_to_a\"")]);
    let mut d = rig.start();
    assert_eq!(d.exited(Duration::from_secs(60)).await, Some(1));
    assert!(
        d.logs().contains("timestamp without time zone"),
        "{}",
        d.logs()
    );
}

#[tokio::test]
async fn check_reports_an_unreachable_node() {
    let rig = Rig::new(DDL, &["public.items"], "").await;
    let a_url = Cluster::shared().url("postgres", &rig.db_a);
    let dead = format!("postgres://postgres@127.0.0.1:{}/x", free_port());
    rig.edit_config(&[(&a_url, &dead)]);
    let out = rig.command(&["check"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("node a: connecting:"), "{}", text(&out));
}

#[tokio::test]
async fn bad_config_names_the_field() {
    let rig = Rig::new(DDL, &["public.items"], "").await;
    let cfg = std::fs::read_to_string(&rig.config).unwrap();
    std::fs::write(&rig.config, cfg.replace("[sync]", "[sync]\nspeed = 1")).unwrap();
    let out = rig.command(&["check"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("speed"), "{}", text(&out));
    std::fs::write(&rig.config, cfg.replace("a_to_b", "a_to_c")).unwrap();
    let out = rig.command(&["run"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("sync.direction"), "{}", text(&out));
}

#[tokio::test]
async fn setup_and_teardown_are_idempotent() {
    let rig = Rig::new(DDL, &["public.items"], "").await;
    let cluster = Cluster::shared();
    for _ in 0..2 {
        let out = rig.command(&["setup"]);
        assert!(out.status.success(), "{}", text(&out));
    }
    let a = cluster.client(&rig.db_a).await;
    let b = rig.client_b().await;
    let count = |sql: &'static str| {
        let (a, slot) = (&a, rig.slot_a());
        async move { a.query_one(sql, &[&slot]).await.unwrap().get::<_, i64>(0) }
    };
    assert_eq!(
        count("SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1").await,
        1
    );
    let origin: i64 = b
        .query_one(
            "SELECT count(*) FROM pg_replication_origin WHERE roname = $1",
            &[&format!("{}_b_from_a", rig.prefix)],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(origin, 1);
    let tables: i64 = a
        .query_one(
            "SELECT count(*) FROM pg_publication_tables WHERE pubname = $1",
            &[&rig.prefix],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        tables, 5,
        "the table, duplex.tombstones, truncations, repairs and key_pairs"
    );

    let out = rig.command(&["teardown"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "teardown without --yes must refuse"
    );
    let out = rig.command(&["teardown", "--yes"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("dropped replication slot"),
        "{}",
        text(&out)
    );
    assert_eq!(
        count("SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1").await,
        0
    );
    let schema: i64 = a
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'duplex'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(schema, 0);
    let out = rig.command(&["teardown", "--yes"]);
    assert!(out.status.success());
    assert!(
        text(&out).contains("node a: nothing to remove"),
        "{}",
        text(&out)
    );
}

#[tokio::test]
async fn run_stops_with_a_message_on_definite_errors() {
    // A missing table.
    let rig = Rig::new(DDL, &["public.items", "public.ghost"], "").await;
    let mut d = rig.start();
    assert_eq!(d.exited(Duration::from_secs(30)).await, Some(1));
    assert!(
        d.logs().contains("table public.ghost does not exist"),
        "{}",
        d.logs()
    );

    // A wrong password, given through the environment variable.
    let rig = Rig::new(DDL, &["public.items"], "").await;
    let a_url = Cluster::shared().url("postgres", &rig.db_a);
    let md5_url = Cluster::shared().url(MD5_USER.0, &rig.db_a);
    rig.edit_config(&[(&a_url, &md5_url)]);
    let child = std::process::Command::new(crate::harness::duplex::bin())
        .args(["run", "--config"])
        .arg(&rig.config)
        .env("DUPLEX_NODES_A_PASSWORD", "not-the-password")
        .output()
        .unwrap();
    let t = text(&child);
    assert_eq!(child.status.code(), Some(1), "{t}");
    assert!(t.contains("password authentication failed"), "{t}");
    assert!(
        !t.contains("not-the-password"),
        "the password leaked into the output:\n{t}"
    );
}

/// A clean stop waits for the components; a second signal ends the process at once,
/// with exit code 1, even while an apply session waits on an application's lock.
#[tokio::test]
async fn a_second_signal_stops_run_at_once() {
    let rig = Rig::new(DDL, &["public.items"], "").await;
    assert!(rig.command(&["setup"]).status.success());
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    b.batch_execute("INSERT INTO items (id, v) VALUES (1, 'b')")
        .await
        .unwrap();
    // The application holds row 1 on b; the change from a waits for it.
    b.batch_execute("BEGIN; SELECT * FROM items WHERE id = 1 FOR UPDATE")
        .await
        .unwrap();
    let mut d = rig.start();
    d.wait_log("applying", 1, Duration::from_secs(30)).await;
    a.batch_execute("INSERT INTO items (id, v) VALUES (1, 'a')")
        .await
        .unwrap();
    crate::harness::wait_for(
        "the applier to wait on row 1",
        Duration::from_secs(30),
        || {
            let b2 = rig.client_b();
            async move {
                let n: i64 = b2
                    .await
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
                     AND application_name LIKE 'duplex apply%' AND wait_event_type = 'Lock'",
                        &[],
                    )
                    .await
                    .unwrap()
                    .get(0);
                (n == 1).then_some(())
            }
        },
    )
    .await;
    for _ in 0..2 {
        // SAFETY: signals our own child.
        unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
        d.wait_log("stopping", 1, Duration::from_secs(30)).await;
    }
    assert_eq!(d.exited(Duration::from_secs(30)).await, Some(1));
    assert!(d.logs().contains("second signal"), "{}", d.logs());
    b.batch_execute("ROLLBACK").await.unwrap();
}

#[tokio::test]
async fn run_retries_an_unreachable_node_until_stopped() {
    let rig = Rig::new(DDL, &["public.items"], "").await;
    let a_url = Cluster::shared().url("postgres", &rig.db_a);
    let dead = format!("postgres://postgres@127.0.0.1:{}/x", free_port());
    rig.edit_config(&[(&a_url, &dead)]);
    let d = rig.start();
    d.wait_log("failed; retrying", 3, Duration::from_secs(30))
        .await;
    assert!(
        d.logs().contains("Connection refused") || d.logs().contains("connection refused"),
        "{}",
        d.logs()
    );
    assert_eq!(d.stop().await, Some(0));
}

#[tokio::test]
async fn run_retries_an_unreachable_broker_until_stopped() {
    let rig = Rig::new(DDL, &["public.items"], "").await;
    let brokers = crate::harness::kafka::Broker::shared().brokers();
    let dead = format!("127.0.0.1:{}", free_port());
    rig.edit_config(&[(&brokers, &dead)]);
    let d = rig.start();
    d.wait_log("failed; retrying", 2, Duration::from_secs(60))
        .await;
    assert!(d.logs().contains("Kafka"), "{}", d.logs());
    assert_eq!(d.stop().await, Some(0));
}

/// After a reconnect, setup finds everything in place and runs no DDL: it neither
/// waits for the application's open transactions nor holds up the writes behind them.
#[tokio::test]
async fn a_reconnect_runs_no_ddl_and_never_blocks_application_writes() {
    let rig = Rig::new(DDL, &["public.items"], "").await;
    assert!(rig.command(&["setup"]).status.success());
    let again = rig.command(&["setup"]);
    assert!(
        !text(&again).contains("trigger") && !text(&again).contains("publication"),
        "a second setup changed something: {}",
        text(&again)
    );
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    let d = rig.start();
    a.batch_execute("INSERT INTO items (id, v) VALUES (1, 'x')")
        .await
        .unwrap();
    crate::harness::wait_for("row 1 on b", Duration::from_secs(30), || async {
        let n: i64 = b
            .query_one("SELECT count(*) FROM items", &[])
            .await
            .unwrap()
            .get(0);
        (n == 1).then_some(())
    })
    .await;
    // An application transaction stays open on b, holding its table lock.
    let open = rig.client_b().await;
    open.batch_execute("BEGIN; INSERT INTO items (id, v) VALUES (100, 'open')")
        .await
        .unwrap();
    // The apply session drops (a network blip) and reconnects, running setup.
    b.batch_execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND application_name LIKE 'duplex apply%'",
    )
    .await
    .unwrap();
    a.batch_execute("INSERT INTO items (id, v) VALUES (2, 'y')")
        .await
        .unwrap();
    // Row 2 arrives, and another application write goes through, both while the
    // transaction is still open.
    crate::harness::wait_for("row 2 on b", Duration::from_secs(30), || async {
        let n: i64 = b
            .query_one("SELECT count(*) FROM items WHERE id = 2", &[])
            .await
            .unwrap()
            .get(0);
        (n == 1).then_some(())
    })
    .await;
    let writer = rig.client_b().await;
    tokio::time::timeout(
        Duration::from_secs(10),
        writer.batch_execute("INSERT INTO items (id, v) VALUES (101, 'next')"),
    )
    .await
    .expect("an application write waited behind duplex's DDL")
    .unwrap();
    open.batch_execute("COMMIT").await.unwrap();
    assert_eq!(d.stop().await, Some(0));
}

/// A slot duplex created that has disappeared (dropped, a failover, a restore) took the
/// changes since with it: `run` stops and says how to resynchronise; the operator's
/// `setup` creates it again.
#[tokio::test]
async fn a_lost_slot_stops_run_until_the_operator_recreates_it() {
    let rig = Rig::new(DDL, &["public.items"], "").await;
    assert!(rig.command(&["setup"]).status.success());
    rig.drop_slot_a().await;
    let mut d = rig.start();
    assert_eq!(d.exited(Duration::from_secs(60)).await, Some(1));
    let logs = d.logs();
    assert!(
        logs.contains(&format!("replication slot {} is gone", rig.slot_a()))
            && logs.contains("run `duplex setup`"),
        "{logs}"
    );
    let out = rig.command(&["setup"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("created replication slot"),
        "{}",
        text(&out)
    );
    assert!(text(&out).contains("again"), "{}", text(&out));
    let d = rig.start();
    d.wait_log("streaming", 1, Duration::from_secs(30)).await;
    assert_eq!(d.stop().await, Some(0));
}

/// `duplex tail` started before duplex has created the node's topic waits for it,
/// within its timeout, and prints the first change.
#[tokio::test]
async fn tail_started_before_the_topic_exists_prints_the_first_change() {
    let rig = Rig::new(DDL, &["public.items"], "").await;
    assert!(rig.command(&["setup"]).status.success());
    let tail = std::process::Command::new(crate::harness::duplex::bin())
        .args([
            "tail",
            "--node",
            "a",
            "--max",
            "1",
            "--timeout-ms",
            "60000",
            "--config",
        ])
        .arg(&rig.config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let a = Cluster::shared().client(&rig.db_a).await;
    a.batch_execute("INSERT INTO items (id, v) VALUES (42, 'first')")
        .await
        .unwrap();
    let d = rig.start();
    let out = tokio::task::spawn_blocking(move || tail.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\"first\""),
        "{}",
        text(&out)
    );
    assert_eq!(d.stop().await, Some(0));
}
