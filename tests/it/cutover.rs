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
    let (a, b) = (cl.client(&rig.db_a).await, cl.client(&rig.db_b).await);
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
