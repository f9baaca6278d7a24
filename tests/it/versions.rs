//! The PostgreSQL versions the suite runs: node a's from `DUPLEX_PG_BIN`, node b's from
//! `DUPLEX_PG_BIN_B` (the pairs across major versions), each Debian's 15 when unset.
//! These tests make a matrix run fail when a node runs another version than the one
//! asked for, and check what only some versions have.

use crate::harness::count;
use crate::harness::duplex::Rig;
use crate::harness::metrics::{get, metrics_port, value};
use crate::harness::output_text;
use crate::harness::pg::Cluster;
use crate::harness::tables::{converge, identical};
use crate::harness::wait_for;
use crate::harness::workload::{
    assert_identical_and_applied_once, rig_before_setup, run_workloads, workload,
};
use std::time::{Duration, Instant};

const TABLES: &[&str] = &[
    "public.items",
    "public.parent",
    "public.child",
    "public.users",
];

const DDL: &str = "CREATE TABLE items (id int PRIMARY KEY, val text,
                   updated_at timestamptz NOT NULL DEFAULT clock_timestamp());";

/// Each node's server is the version its binaries say, so a matrix entry tests what
/// it names.
#[tokio::test]
async fn each_node_runs_the_version_the_environment_names() {
    let rig = Rig::new(DDL, &["public.items"], "").await;
    for (node, cluster, client) in [
        ("a", rig.cluster, rig.client_a().await),
        ("b", rig.cluster_b, rig.client_b().await),
    ] {
        let num: i32 = client
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            num / 10000,
            cluster.major as i32,
            "node {node} runs {num}, its binaries in {} say {}",
            cluster.bin.display(),
            cluster.major
        );
        eprintln!("node {node}: PostgreSQL {num}");
    }
    // Node b is on a cluster of its own exactly when it runs other binaries.
    let own_b =
        std::env::var_os("DUPLEX_PG_BIN_B").is_some_and(|b| b != Cluster::shared().bin.as_os_str());
    assert_eq!(!std::ptr::eq(rig.cluster_b, rig.cluster), own_b);
}

/// The cluster caps replication origins with replay state
/// (`max_active_replication_origins` from 18, default 10; `max_replication_slots`
/// before): `duplex check` refuses a config whose copy workers and apply sessions would
/// not fit, naming the setting and the value it needs, and the same nodes sync once
/// `snapshot.workers` is lowered to fit.
#[tokio::test]
async fn check_refuses_more_replication_origins_than_the_cluster_allows() {
    let major = Cluster::shared().major;
    let setting = if major >= 18 {
        "max_active_replication_origins"
    } else {
        "max_replication_slots"
    };
    let cluster: &'static Cluster = Box::leak(Box::new(Cluster::start(&[(setting, "4")])));
    let rig = Rig::new_on(cluster, DDL, &["public.items"], "[snapshot]\nworkers = 4\n").await;
    rig.edit_config(&[("\"a_to_b\"", "\"both\"")]);
    let a = cluster.client(&rig.db_a).await;
    a.batch_execute("INSERT INTO items (id, val) SELECT i, 'a' FROM generate_series(1, 100) i")
        .await
        .unwrap();
    let out = rig.command(&["check"]);
    let t = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    for node in ["a", "b"] {
        let expected = format!("node {node}: duplex writes under up to 5 replication origins here");
        assert!(t.contains(&expected), "missing {expected:?} in:\n{t}");
    }
    assert!(t.contains(&format!("{setting} = 4 caps")), "{t}");
    assert!(t.contains(&format!("set {setting} = 5 or more")), "{t}");

    // One copy worker: two origins per node, four on the cluster, which fit.
    rig.edit_config(&[("workers = 4", "workers = 1")]);
    let out = rig.command(&["check"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(rig.command(&["setup"]).status.success());
    let d = rig.start();
    d.wait_applying(2).await;
    let b = rig.client_b().await;
    b.batch_execute("INSERT INTO items (id, val) VALUES (1000, 'b')")
        .await
        .unwrap();
    converge(&a, &b, &["items"], Duration::from_secs(60)).await;
    assert_eq!(d.stop().await, Some(0));
}

/// Waits for `duplex cutover --check` to pass: both directions caught up and verify
/// clean, the gate before moving the application.
async fn cutover_passes(rig: &Rig) {
    wait_for("the cutover check to pass", Duration::from_secs(90), || {
        let out = rig.command(&["cutover", "--check", "--settle-ms", "200"]);
        async move { out.status.success().then_some(()) }
    })
    .await;
}

/// The zero-downtime major upgrade with a way back, as README's "Upgrading PostgreSQL
/// to a new major version" walks it; on a pair across versions (node a the old major,
/// node b the new) it is that upgrade. The old node's rows are copied into the new one
/// while the application writes on the old; once `cutover --check` passes the
/// application moves to the new node and its writes reach the old; it moves back the
/// same way; the nodes end equal.
#[tokio::test]
async fn a_major_upgrade_moves_the_application_over_and_back() {
    let rig = rig_before_setup().await;
    let (old, new) = (rig.client_a().await, rig.client_b().await);
    old.batch_execute(
        "INSERT INTO items (id, val) SELECT i, 'old' FROM generate_series(1000, 30999) i;
         INSERT INTO parent (id, name) SELECT i, 'old' FROM generate_series(5000000, 5009999) i;
         INSERT INTO child (id, parent_id, note) SELECT i, i, 'old' FROM generate_series(5000000, 5009999) i",
    )
    .await
    .unwrap();
    let check = rig.command(&["check"]);
    assert!(check.status.success(), "{}", output_text(&check));
    assert!(rig.command(&["setup"]).status.success());
    let d = rig.start();
    // The initial copy, while the application goes on writing on the old node.
    let until = Instant::now() + Duration::from_secs(8);
    let app = tokio::spawn(workload(rig.client_a().await, 0, until));
    d.wait_applying(2).await;
    assert!(app.await.unwrap() > 100);
    cutover_passes(&rig).await;

    // Moved: the application writes on the new node; the old one stays current.
    let on_new = workload(
        rig.client_b().await,
        1,
        Instant::now() + Duration::from_secs(5),
    )
    .await;
    assert!(on_new > 100, "{on_new} changes on the new node");
    cutover_passes(&rig).await;

    // Rolled back: the application writes on the old node again.
    let on_old = workload(
        rig.client_a().await,
        2,
        Instant::now() + Duration::from_secs(5),
    )
    .await;
    assert!(on_old > 100, "{on_old} changes on the old node");
    identical(&old, &new, TABLES, Duration::from_secs(60)).await;
    let rows: i64 = new
        .query_one("SELECT count(*) FROM items WHERE val = 'old'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 30_000, "the old node's first rows on the new one");
    assert_eq!(d.stop().await, Some(0));
}

/// Waits for item 9999 on `c` to hold `val`.
async fn item_is(c: &tokio_postgres::Client, val: &str) {
    wait_for(
        &format!("item 9999 = {val:?}"),
        Duration::from_secs(60),
        || async {
            let row = c
                .query_opt("SELECT val FROM items WHERE id = 9999", &[])
                .await
                .unwrap();
            (row.map(|r| r.get::<_, String>(0)).as_deref() == Some(val)).then_some(())
        },
    )
    .await;
}

/// Where a node can (PostgreSQL 16 and later, `source.echo_filter = "node"`), its
/// walsender drops what duplex applied there before decoding it: no echo reaches
/// duplex's own filter, yet a repair (the winner of a conflict lost on a node) still
/// travels, through the outbox, and the nodes converge under two-way writes with
/// nothing applied twice. With `echo_filter = "duplex"`, and before 16, duplex drops
/// the echoes itself.
#[tokio::test]
async fn echoes_are_dropped_by_the_node_from_16_and_repairs_still_travel() {
    for filter in ["node", "duplex"] {
        let rig = rig_before_setup().await;
        rig.edit_config(&[(
            "[source]\n",
            format!("[source]\necho_filter = \"{filter}\"\n").as_str(),
        )]);
        assert!(rig.command(&["setup"]).status.success());
        let d = rig.start();
        d.wait_applying(2).await;
        let (a, b) = (rig.client_a().await, rig.client_b().await);
        // A version older than b's, written on a: b refuses it, and its repair brings
        // b's version back to a.
        b.batch_execute(
            "INSERT INTO items (id, val, updated_at) VALUES (9999, 'newer on b', now() + interval '1 hour')",
        )
        .await
        .unwrap();
        item_is(&a, "newer on b").await;
        a.batch_execute("UPDATE items SET val = 'older on a', updated_at = now() WHERE id = 9999")
            .await
            .unwrap();
        item_is(&a, "newer on b").await;
        assert!(count(&b, "SELECT count(*) FROM duplex.repairs").await > 0);
        let (changes_a, changes_b) = run_workloads(&rig, 5).await;
        assert!(changes_a > 100 && changes_b > 100);
        assert_identical_and_applied_once(&rig).await;

        let scrape = get(metrics_port(&rig), "/metrics").unwrap().1;
        let echoes: f64 = ["a", "b"]
            .iter()
            .filter_map(|n| {
                value(
                    &scrape,
                    &format!("duplex_source_echoes_suppressed_total{{node=\"{n}\"}}"),
                )
            })
            .sum();
        let by_node = filter == "node" && rig.cluster.major >= 16 && rig.cluster_b.major >= 16;
        eprintln!("echo_filter {filter}: {echoes} echoes dropped by duplex");
        if by_node {
            assert_eq!(echoes, 0.0, "the walsenders sent what duplex applied");
        } else {
            assert!(echoes > 0.0, "duplex dropped no echo");
        }
        for c in [&a, &b] {
            wait_for(
                "the outbox to be empty",
                Duration::from_secs(30),
                || async {
                    (count(c, "SELECT count(*) FROM duplex.outbox").await == 0).then_some(())
                },
            )
            .await;
        }
        assert_eq!(d.stop().await, Some(0));
    }
}
