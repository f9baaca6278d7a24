//! A slot PostgreSQL invalidated: duplex stopped while the node wrote more WAL than
//! `max_slot_wal_keep_size` keeps. `duplex run` then stops with exit code 1 and says
//! what happened and how to recover, `duplex status` fails its gate naming the slot,
//! and the documented recovery (`duplex setup`, `duplex snapshot`) brings the nodes
//! level and streaming again.

use crate::harness::duplex::Rig;
use crate::harness::pg::Cluster;
use crate::harness::tables::converge;
use crate::harness::wait_for;
use std::time::Duration;

const DDL: &str = "CREATE TABLE items (id int PRIMARY KEY, val text, updated_at timestamptz NOT NULL DEFAULT clock_timestamp());";

fn said(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

/// `duplex status` fails its gate saying `status_says`, and `duplex run` stops with
/// exit code 1 saying each of `run_says`.
async fn refused_as_invalidated(rig: &Rig, status_says: &str, run_says: &[&str]) {
    let status = rig.command(&["status", "--max-lag", "60"]);
    assert_eq!(status.status.code(), Some(1), "{}", said(&status));
    assert!(said(&status).contains(status_says), "{}", said(&status));
    let mut d = rig.start();
    assert_eq!(d.exited(Duration::from_secs(60)).await, Some(1));
    let logs = d.logs();
    assert!(run_says.iter().all(|s| logs.contains(s)), "{logs}");
}

#[tokio::test]
async fn an_invalidated_slot_stops_duplex_and_setup_then_snapshot_recover() {
    // Small WAL limits: a few segments past the slot invalidate it at a checkpoint.
    let cluster: &'static Cluster = Box::leak(Box::new(Cluster::start(&[
        ("max_slot_wal_keep_size", "'1MB'"),
        ("wal_keep_size", "0"),
        ("min_wal_size", "'32MB'"),
        ("max_wal_size", "'64MB'"),
    ])));
    let rig = Rig::new_on(cluster, DDL, &["public.items"], "").await;
    let (a, b) = (cluster.client(&rig.db_a).await, rig.client_b().await);
    assert!(rig.command(&["setup"]).status.success());
    let d = rig.start();
    d.wait_applying(1).await;
    a.batch_execute("INSERT INTO items (id, val) VALUES (1, 'before')")
        .await
        .unwrap();
    converge(&a, &b, &["items"], Duration::from_secs(60)).await;
    assert_eq!(d.stop().await, Some(0));

    // duplex is stopped; the application goes on writing, past the limit.
    let slot = rig.slot_a();
    wait_for("the slot to be invalidated", Duration::from_secs(60), || {
        let (a, slot) = (&a, &slot);
        async move {
            a.batch_execute(
                "INSERT INTO items (id, val) SELECT 100 + g, 'while stopped' FROM generate_series(1, 10) g
                 ON CONFLICT (id) DO UPDATE SET val = EXCLUDED.val, updated_at = clock_timestamp();
                 SELECT pg_switch_wal(); CHECKPOINT;",
            )
            .await
            .unwrap();
            let status: Option<String> = a
                .query_one(
                    "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
                    &[slot],
                )
                .await
                .unwrap()
                .get(0);
            (status.as_deref() == Some("lost")).then_some(())
        }
    })
    .await;

    refused_as_invalidated(
        &rig,
        &format!("slot {slot} was invalidated"),
        &["was invalidated by PostgreSQL", "duplex setup"],
    )
    .await;

    // The recovery the message gives.
    let setup = rig.command(&["setup"]);
    assert!(setup.status.success(), "{}", said(&setup));
    assert!(said(&setup).contains("again"), "{}", said(&setup));
    let snapshot = rig.command(&["snapshot"]);
    assert!(snapshot.status.success(), "{}", said(&snapshot));
    let d = rig.start();
    d.wait_applying(1).await;
    a.batch_execute("INSERT INTO items (id, val) VALUES (2, 'after')")
        .await
        .unwrap();
    converge(&a, &b, &["items"], Duration::from_secs(60)).await;
    let rows: i64 = b
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 12);
    assert_eq!(d.stop().await, Some(0));
}

/// From PostgreSQL 18 a slot left unused for longer than
/// `idle_replication_slot_timeout` is invalidated too: `duplex status` and `duplex run`
/// name that cause (`invalidation_reason` idle_timeout) and the setting to raise, not
/// `max_slot_wal_keep_size`; the same recovery brings the slot back.
#[tokio::test]
async fn a_slot_invalidated_for_being_idle_is_named_from_postgresql_18() {
    let major = Cluster::shared().major;
    if major < 18 {
        eprintln!("node a runs PostgreSQL {major}; idle_replication_slot_timeout came with 18");
        return;
    }
    let cluster: &'static Cluster = Box::leak(Box::new(Cluster::start(&[(
        "idle_replication_slot_timeout",
        "'1s'",
    )])));
    let rig = Rig::new_on(cluster, DDL, &["public.items"], "").await;
    let a = cluster.client(&rig.db_a).await;
    assert!(rig.command(&["setup"]).status.success());
    let d = rig.start();
    d.wait_applying(1).await;
    assert_eq!(d.stop().await, Some(0));

    // duplex is stopped; the checkpointer finds the slot idle.
    let slot = rig.slot_a();
    wait_for(
        "the idle slot to be invalidated",
        Duration::from_secs(60),
        || {
            let (a, slot) = (&a, &slot);
            async move {
                a.batch_execute("CHECKPOINT").await.unwrap();
                let reason: Option<String> = a
                    .query_one(
                        "SELECT invalidation_reason FROM pg_replication_slots WHERE slot_name = $1",
                        &[slot],
                    )
                    .await
                    .unwrap()
                    .get(0);
                (reason.as_deref() == Some("idle_timeout")).then_some(())
            }
        },
    )
    .await;

    refused_as_invalidated(
        &rig,
        &format!("slot {slot} was invalidated by PostgreSQL (invalidation_reason idle_timeout"),
        &[
            "invalidation_reason idle_timeout",
            "raise idle_replication_slot_timeout",
        ],
    )
    .await;
    let setup = rig.command(&["setup"]);
    assert!(setup.status.success(), "{}", said(&setup));
    let d = rig.start();
    d.wait_applying(1).await;
    assert_eq!(d.stop().await, Some(0));
}
