//! `duplex status --max-lag 0`, the cutover gate: it passes only when every change
//! committed on a source before it ran is applied on the target, and fails, saying
//! why, while changes wait in the WAL, on Kafka or in the dead-letter queue.

use crate::harness::duplex::Rig;
use crate::harness::kafka::Broker;
use crate::harness::output_text as text;
use crate::harness::pg::Cluster;
use crate::harness::wait_for;
use std::time::Duration;

const DDL: &str = "CREATE TABLE items (id int PRIMARY KEY, val text, updated_at timestamptz NOT NULL DEFAULT clock_timestamp())";

/// Runs the gate until it passes, within `timeout`.
async fn gate_passes(rig: &Rig, timeout: Duration) {
    wait_for("the gate to pass", timeout, || {
        let out = rig.command(&["status", "--max-lag", "0"]);
        async move { out.status.success().then_some(()) }
    })
    .await;
}

/// The gate's output when it fails; panics when it passes.
fn gate_fails(rig: &Rig) -> String {
    let out = rig.command(&["status", "--max-lag", "0"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "the gate passed:\n{t}");
    t
}

#[tokio::test]
async fn the_gate_waits_for_unread_wal_replayed_tails_and_dead_letters() {
    let rig = Rig::new(DDL, &["public.items"], "").await;
    rig.edit_config(&[(
        "linger_ms = 10",
        "linger_ms = 10\non_error = \"dead_letter\"",
    )]);
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    b.batch_execute("ALTER TABLE items ADD CONSTRAINT no_forbidden CHECK (val <> 'forbidden')")
        .await
        .unwrap();
    assert!(rig.command(&["setup"]).status.success());
    let d = rig.start();
    d.wait_applying(1).await;
    a.batch_execute("INSERT INTO items (id, val) VALUES (1, 'one')")
        .await
        .unwrap();
    gate_passes(&rig, Duration::from_secs(30)).await;

    // A change committed while no reader runs is in the WAL only.
    assert_eq!(d.stop().await, Some(0));
    a.batch_execute("INSERT INTO items (id, val) VALUES (2, 'two')")
        .await
        .unwrap();
    let t = gate_fails(&rig);
    assert!(
        t.contains("not all on Kafka") && t.contains("is duplex running?"),
        "{t}"
    );

    // Running again, it catches up.
    let d = rig.start();
    gate_passes(&rig, Duration::from_secs(30)).await;

    // A replayed tail (the source published a transaction again after a crash) is no
    // lag once the applier has skipped it.
    let topic = rig.topic();
    let events = Broker::shared()
        .read_until(&topic, Duration::from_secs(30), |e| {
            e.iter().any(|e| e.source.table == "items")
        })
        .await;
    let replay: Vec<_> = events
        .into_iter()
        .filter(|e| e.source.table == "items")
        .collect();
    Broker::shared().produce(&topic, &replay);
    gate_passes(&rig, Duration::from_secs(30)).await;

    // A change parked in the dead-letter queue is not applied.
    a.batch_execute("INSERT INTO items (id, val) VALUES (3, 'forbidden')")
        .await
        .unwrap();
    wait_for("the dead letter", Duration::from_secs(30), || {
        let b = &b;
        async move {
            let n: i64 = b
                .query_one("SELECT count(*) FROM duplex.dead_letters", &[])
                .await
                .unwrap()
                .get(0);
            (n == 1).then_some(())
        }
    })
    .await;
    let t = gate_fails(&rig);
    assert!(t.contains("1 dead letters pending"), "{t}");
    assert_eq!(d.stop().await, Some(0));
}

/// `duplex cutover --check` passes only when every direction is caught up and verify
/// finds the nodes equal; each verify's result reaches the daemon's metrics, which
/// exist at 0 before the first run.
#[tokio::test]
async fn cutover_check_needs_caught_up_and_equal_nodes_and_verify_feeds_the_metrics() {
    use crate::harness::metrics::{metrics_port, wait_value};
    let rig = Rig::both(DDL, &["public.items"], "[snapshot]\nmode = \"never\"\n").await;
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    let d = rig.start();
    d.wait_applying(2).await;
    let port = metrics_port(&rig);
    let series = |name: &str| format!("{name}{{table=\"public.items\"}}");
    wait_value(
        port,
        &series("duplex_verify_rows_checked_total"),
        "verify rows at 0",
        |v| v == 0.0,
    )
    .await;
    wait_value(
        port,
        &series("duplex_verify_last_run_timestamp_seconds"),
        "no verify yet",
        |v| v == 0.0,
    )
    .await;

    a.batch_execute(
        "INSERT INTO items (id, val) SELECT i, 'a' || i FROM generate_series(1, 300) i",
    )
    .await
    .unwrap();
    b.batch_execute(
        "INSERT INTO items (id, val) SELECT i, 'b' || i FROM generate_series(301, 500) i",
    )
    .await
    .unwrap();
    wait_for("the cutover check to pass", Duration::from_secs(60), || {
        let out = rig.command(&["cutover", "--check", "--settle-ms", "200"]);
        async move { out.status.success().then_some(out) }
    })
    .await;
    wait_value(
        port,
        &series("duplex_verify_rows_checked_total"),
        "rows checked",
        |v| v >= 500.0,
    )
    .await;
    wait_value(
        port,
        &series("duplex_verify_last_run_timestamp_seconds"),
        "a verify ran",
        |v| v > 0.0,
    )
    .await;

    // A change on b that is never replicated (written under an origin named like
    // duplex's, so b's reader takes it for an echo): the nodes differ for good.
    // Each statement commits alone: a commit carries the origin set when it commits.
    for sql in [
        format!(
            "SELECT pg_replication_origin_create('{}_planted')",
            rig.prefix
        ),
        format!(
            "SELECT pg_replication_origin_session_setup('{}_planted')",
            rig.prefix
        ),
        "UPDATE items SET val = 'only on b' WHERE id = 7".into(),
        "DELETE FROM items WHERE id = 8".into(),
        "SELECT pg_replication_origin_session_reset()".into(),
    ] {
        b.batch_execute(&sql).await.unwrap();
    }
    // Caught up (a heartbeat may be in flight for a moment), the nodes differ.
    let json = wait_for(
        "the check to fail on the differences alone",
        Duration::from_secs(60),
        || {
            let out = rig.command(&["cutover", "--check", "--settle-ms", "200", "--json"]);
            async move {
                let json: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
                (out.status.code() == Some(1) && json["not_caught_up"].as_array()?.is_empty())
                    .then_some(json)
            }
        },
    )
    .await;
    assert_eq!(json["ok"], false);
    let diffs = json["verify"]["tables"][0]["differences"]
        .as_array()
        .unwrap();
    let kinds: Vec<(&str, &str)> = diffs
        .iter()
        .map(|d| (d["key"][0].as_str().unwrap(), d["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [("7", "mismatched"), ("8", "missing_on_b")],
        "{json}"
    );
    wait_value(
        port,
        &series("duplex_verify_differences"),
        "2 differences",
        |v| v == 2.0,
    )
    .await;

    // Repaired, it passes again; with the reader stopped and a change in the WAL, it
    // fails as not caught up, though the rows are still equal.
    assert_eq!(
        rig.command(&["verify", "--repair", "--settle-ms", "200"])
            .status
            .code(),
        Some(0)
    );
    wait_for(
        "the cutover check to pass after repair",
        Duration::from_secs(60),
        || {
            let out = rig.command(&["cutover", "--check", "--settle-ms", "200"]);
            async move { out.status.success().then_some(()) }
        },
    )
    .await;
    wait_value(
        port,
        &series("duplex_verify_differences"),
        "0 differences",
        |v| v == 0.0,
    )
    .await;
    assert_eq!(d.stop().await, Some(0));
    a.batch_execute("INSERT INTO items (id, val) VALUES (1000, 'late')")
        .await
        .unwrap();
    let out = rig.command(&["cutover", "--check", "--settle-ms", "200"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("not all on Kafka") && t.contains("cutover check: not ok (not caught up"),
        "{t}"
    );
    // Without --check there is nothing to do: a usage error.
    assert_eq!(rig.command(&["cutover"]).status.code(), Some(2));
}
