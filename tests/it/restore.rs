//! A node whose history went back (restored from a backup or a disk snapshot) hands out
//! again LSNs its peer has already applied. The peer's stored position stands in for
//! the lost future here: it is set past the node's WAL, which is what the peer holds
//! after the node is restored to an earlier point.

use crate::harness::duplex::Rig;
use crate::harness::output_text as text;
use crate::harness::pg::Cluster;
use crate::harness::tables::rows;
use crate::harness::{wait_count, wait_for};
use std::time::Duration;

const DDL: &str = "CREATE TABLE items (id int PRIMARY KEY, val text, updated_at timestamptz NOT NULL DEFAULT now())";

/// Syncs one row a → b, stops, and moves b's stored position for a far past a's WAL.
async fn synced_then_rewound(rig: &Rig) {
    assert!(rig.command(&["setup"]).status.success());
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    let d = rig.start();
    d.wait_applying(1).await;
    a.batch_execute("INSERT INTO items (id, val) VALUES (1, 'before')")
        .await
        .unwrap();
    wait_for("row 1 on b", Duration::from_secs(30), || {
        let b = &b;
        async move { (rows(b, "items").await.len() == 1).then_some(()) }
    })
    .await;
    assert_eq!(d.stop().await, Some(0));
    let n = b
        .execute("UPDATE duplex.apply_positions SET commit_lsn = 'FF/0'", &[])
        .await
        .unwrap();
    assert_eq!(n, 1);
}

async fn row_reaches_b(rig: &Rig, id: i32) {
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    a.execute("INSERT INTO items (id, val) VALUES ($1, 'after')", &[&id])
        .await
        .unwrap();
    wait_count(
        &b,
        &format!("SELECT count(*) FROM items WHERE id = {id}"),
        1,
    )
    .await;
}

/// The node came back without its slot (a base backup holds none): `run` refuses, the
/// operator resynchronises and runs `setup`, and the new slot's changes are applied
/// though their LSNs are below what the peer applied before.
#[tokio::test]
async fn a_slot_created_again_starts_a_new_stream_whose_lower_lsns_are_applied() {
    let rig = Rig::new(DDL, &["public.items"], "").await;
    synced_then_rewound(&rig).await;
    rig.drop_slot_a().await;
    let mut d = rig.start();
    assert_eq!(d.exited(Duration::from_secs(60)).await, Some(1));
    let out = rig.command(&["setup"]);
    assert!(out.status.success(), "{}", text(&out));
    let d = rig.start();
    row_reaches_b(&rig, 2).await;
    let logs = d.logs();
    assert!(
        logs.contains("the source's slot was created again"),
        "{logs}"
    );
    assert_eq!(d.stop().await, Some(0));
}

/// The node came back with its slot (a disk snapshot): nothing tells the new changes
/// from old ones on the topic, so `run` refuses and says how to resynchronise; after
/// that the new slot's changes flow.
#[tokio::test]
async fn a_node_that_went_back_with_its_slot_is_refused_until_resynchronised() {
    let rig = Rig::new(DDL, &["public.items"], "").await;
    synced_then_rewound(&rig).await;
    let mut d = rig.start();
    assert_eq!(d.exited(Duration::from_secs(60)).await, Some(1));
    let logs = d.logs();
    assert!(
        logs.contains("node a went back in time") && logs.contains("pg_drop_replication_slot"),
        "{logs}"
    );
    rig.drop_slot_a().await;
    let out = rig.command(&["setup"]);
    assert!(out.status.success(), "{}", text(&out));
    let d = rig.start();
    row_reaches_b(&rig, 2).await;
    assert_eq!(d.stop().await, Some(0));
}
