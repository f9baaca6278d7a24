//! Concurrent random writes on overlapping keys on both nodes converge to identical
//! tables, with no echo, and no change applied twice even when duplex is killed with
//! SIGKILL over and over.

use crate::harness::kafka::Broker;
use crate::harness::pg::Cluster;
use crate::harness::workload::{
    assert_identical_and_applied_once, converges_under_workloads, rig, workload, Rng,
};
use std::time::{Duration, Instant};

#[tokio::test]
async fn concurrent_writes_on_both_nodes_converge_without_echo() {
    let rig = rig().await;
    let (d, (changes_a, changes_b)) = converges_under_workloads(&rig, 30, 1000).await;
    let a = Cluster::shared().client(&rig.db_a).await;
    let conflicts: i64 = a
        .query_one("SELECT count(*) FROM duplex.conflicts", &[])
        .await
        .unwrap()
        .get(0);
    eprintln!("changes: a {changes_a}, b {changes_b}; conflicts recorded on a: {conflicts}");
    // No echo: each topic carries exactly its own node's committed changes.
    let broker = Broker::shared();
    for (node, changes) in [("a", changes_a), ("b", changes_b)] {
        // Repairs (winners re-sent after a conflict) come on top of the changes.
        let n = changes as usize;
        let own = |e: &[duplex::event::ChangeEvent]| {
            e.iter().filter(|e| e.source.table != "repairs").count()
        };
        let events = broker
            .read_until(&rig.topic_of(node), Duration::from_secs(60), move |e| {
                own(e) >= n
            })
            .await;
        assert_eq!(own(&events), n, "events on {node}'s topic");
        assert!(events.iter().all(|e| e.source.node == node));
    }
    assert_eq!(d.stop().await, Some(0));
}

#[tokio::test]
async fn kill_9_at_random_moments_loses_nothing_and_applies_nothing_twice() {
    let rig = rig().await;
    // The first start's copy is done before the writers start (see above).
    let d = rig.start();
    d.wait_applying(2).await;
    let workloads = {
        let cl = Cluster::shared();
        let until = Instant::now() + Duration::from_secs(25);
        let a = cl.client(&rig.db_a).await;
        let b = rig.client_b().await;
        (
            tokio::spawn(workload(a, 0, until)),
            tokio::spawn(workload(b, 1, until)),
        )
    };
    // Twelve runs, each killed at a random moment of its life.
    let mut rng = Rng(42);
    tokio::time::sleep(Duration::from_millis(500 + rng.below(1500))).await;
    d.kill9();
    for _ in 1..12 {
        let d = rig.start();
        tokio::time::sleep(Duration::from_millis(500 + rng.below(1500))).await;
        d.kill9();
    }
    workloads.0.await.unwrap();
    workloads.1.await.unwrap();
    let d = rig.start();
    assert_identical_and_applied_once(&rig).await;
    assert_eq!(d.stop().await, Some(0));
}
