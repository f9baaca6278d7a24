//! duplex on a Kafka cluster of several nodes: change topics replicated three times
//! survive their partition leader being killed during writes on both nodes, and
//! `duplex check` reports the topic settings that would lose changes.

use crate::harness::duplex::Rig;
use crate::harness::kafka::{Broker, Settings};
use crate::harness::output_text;
use crate::harness::pg::Cluster;
use crate::harness::wait_for;
use crate::harness::workload::{assert_identical_and_applied_once, rig_before_setup, workload};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long one round of the convergence workload writes.
const ROUND: Duration = Duration::from_secs(3);

/// Writes on `db` in rounds of the convergence workload until `stop`, each round with
/// a node number of its own (`parity`, then `parity` + 2, ...: new parent ids and
/// another random sequence); returns the row changes committed.
async fn write_until(
    cluster: &'static Cluster,
    db: String,
    parity: u64,
    stop: Arc<AtomicBool>,
) -> u64 {
    let mut changes = 0;
    let mut round = 0;
    while !stop.load(Ordering::SeqCst) {
        let until = Instant::now() + ROUND;
        changes += workload(cluster.client(&db).await, parity + 2 * round, until).await;
        round += 1;
    }
    changes
}

/// The offset after the last message from `source` that the other node applied.
async fn applied_offset(rig: &Rig, source: &str) -> i64 {
    let target = if source == "a" {
        rig.client_b().await
    } else {
        rig.client_a().await
    };
    target
        .query_opt(
            "SELECT next_offset FROM duplex.apply_positions WHERE source_node = $1",
            &[&source],
        )
        .await
        .unwrap()
        .map_or(0, |r| r.get(0))
}

/// A three-node cluster, change topics created by duplex with three replicas. During
/// writes on both nodes, the leader of a's topic is killed (SIGKILL), and once writes
/// go on and it is back in sync, the leader of b's topic: duplex carries on through
/// both leader changes, and both nodes end equal with nothing applied twice.
#[tokio::test]
async fn a_partition_leader_killed_twice_during_a_bidirectional_workload_loses_nothing() {
    let broker: &'static Broker =
        Box::leak(Box::new(Broker::start_cluster(3, Settings::default())));
    let rig = rig_before_setup().await;
    rig.edit_config(&[
        (
            Broker::shared().brokers().as_str(),
            broker.brokers().as_str(),
        ),
        ("[kafka]\n", "[kafka]\nreplication_factor = 3\n"),
    ]);
    assert!(rig.command(&["setup"]).status.success());
    let d = rig.start();
    d.wait_applying(2).await;
    let topics = [rig.topic_of("a"), rig.topic_of("b")];
    // The topics as duplex created them: a write is acknowledged once two replicas
    // have it, so no single disk holds the only copy, and one node down stops nothing.
    for topic in &topics {
        let p = broker.partition(topic).await.expect("the topic's metadata");
        assert_eq!(p.replicas.len(), 3, "{topic}: {p:?}");
        let configs = broker.topic_configs(topic).await;
        for (key, want) in [
            ("min.insync.replicas", "2"),
            ("cleanup.policy", "delete"),
            ("unclean.leader.election.enable", "false"),
        ] {
            assert_eq!(configs[key], want, "{topic}: {key}");
        }
    }
    let check = rig.command(&["check"]);
    assert!(
        check.status.success() && !output_text(&check).contains("warning"),
        "duplex check on the topics duplex created:\n{}",
        output_text(&check)
    );

    let (cl, stop) = (rig.cluster, Arc::new(AtomicBool::new(false)));
    let writers = (
        tokio::spawn(write_until(cl, rig.db_a.clone(), 0, stop.clone())),
        tokio::spawn(write_until(
            rig.cluster_b,
            rig.db_b.clone(),
            1,
            stop.clone(),
        )),
    );
    let mut report = Vec::new();
    for (source, topic) in ["a", "b"].into_iter().zip(&topics) {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let leader = broker.partition(topic).await.expect("metadata").leader;
        // Asked until it answers: a node restarted a moment ago may still be catching up.
        let before = wait_for(
            &format!("{topic}'s high watermark"),
            Duration::from_secs(60),
            || broker.high_watermark(topic),
        )
        .await;
        let node = broker.node(leader);
        let killed = Instant::now();
        node.kill();
        // A change written after the kill, acknowledged by the new leader and its
        // in-sync follower...
        let acked = wait_for(
            &format!("a change on {topic} acknowledged after node {leader} was killed"),
            Duration::from_secs(120),
            || async {
                let high = broker.high_watermark(topic).await;
                high.filter(|h| *h > before).map(|_| killed.elapsed())
            },
        )
        .await;
        // ...and applied on the other node.
        let applied = wait_for(
            &format!("a change of {source} applied after node {leader} was killed"),
            Duration::from_secs(120),
            || async { (applied_offset(&rig, source).await > before).then(|| killed.elapsed()) },
        )
        .await;
        let now = broker.partition(topic).await.expect("metadata");
        assert_ne!(now.leader, leader, "{topic}: {now:?}");
        eprintln!(
            "{topic}: leader {leader} killed; new leader {}; next change acknowledged after {acked:?}, applied after {applied:?}",
            now.leader
        );
        report.push((acked, applied));
        // Back on its log, and in sync on both topics again before the next kill.
        tokio::task::spawn_blocking(move || node.start())
            .await
            .unwrap();
        for t in &topics {
            wait_for(
                &format!("node {leader} back in the in-sync replicas of {t}"),
                Duration::from_secs(120),
                || async {
                    let p = broker.partition(t).await?;
                    (p.isr.len() == 3).then_some(())
                },
            )
            .await;
        }
        eprintln!(
            "node {leader} back in sync {:?} after the kill",
            killed.elapsed()
        );
    }
    stop.store(true, Ordering::SeqCst);
    let changes = (writers.0.await.unwrap(), writers.1.await.unwrap());
    assert!(changes.0 > 300 && changes.1 > 300, "{changes:?}");
    let converging = Instant::now();
    assert_identical_and_applied_once(&rig).await;
    eprintln!(
        "changes {changes:?}; interruptions (acknowledged, applied) {report:?}; converged {:?} after the writes ended",
        converging.elapsed()
    );
    let logs = d.logs();
    assert!(!logs.contains("went back"), "{logs}");
    assert_eq!(d.stop().await, Some(0));
}

const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, val text, updated_at timestamptz NOT NULL DEFAULT clock_timestamp());";

/// `duplex check` on change topics created by someone else: settings that drop or
/// lose changes are errors (exit 1), those that risk them or stall writes are
/// warnings (exit 0); fixed, only what cannot be altered in place remains.
#[tokio::test]
async fn check_reports_change_topic_settings_that_would_lose_changes() {
    let broker: &'static Broker =
        Box::leak(Box::new(Broker::start_cluster(2, Settings::default())));
    let rig = Rig::both(ITEMS, &["public.items"], "").await;
    rig.edit_config(&[(
        Broker::shared().brokers().as_str(),
        broker.brokers().as_str(),
    )]);
    let (a, b) = (rig.topic_of("a"), rig.topic_of("b"));
    let check = || {
        let out = rig.command(&["check"]);
        (out.status.code(), output_text(&out))
    };

    // a's topic: every write stops while one of its two brokers is down, and a day's
    // retention; b's topic does not exist yet (duplex will create it).
    broker
        .create_topic(
            &a,
            2,
            &[("min.insync.replicas", "2"), ("retention.ms", "86400000")],
        )
        .await;
    let (code, out) = check();
    assert_eq!(code, Some(0), "{out}");
    for needle in [
        format!("warning: kafka: topic {a}: min.insync.replicas is 2, as many as its 2 replicas"),
        format!("warning: kafka: topic {a}: retention.ms is 86400000 (24 h)"),
    ] {
        assert!(out.contains(&needle), "no {needle:?} in:\n{out}");
    }
    assert!(!out.contains(&b), "{out}");

    // b's topic: compacted, unclean leader election, one replica of two brokers.
    broker
        .create_topic(
            &b,
            1,
            &[
                ("cleanup.policy", "compact"),
                ("unclean.leader.election.enable", "true"),
            ],
        )
        .await;
    let (code, out) = check();
    assert_eq!(code, Some(1), "{out}");
    for needle in [
        format!("kafka: topic {b}: cleanup.policy is compact"),
        format!("kafka: topic {b}: unclean.leader.election.enable is true"),
        format!("warning: kafka: topic {b}: one replica on a cluster of 2 brokers"),
    ] {
        assert!(out.contains(&needle), "no {needle:?} in:\n{out}");
    }
    assert!(
        !out.contains(&format!("warning: kafka: topic {b}: cleanup.policy")),
        "compaction must be an error:\n{out}"
    );

    // Fixed as the messages say; the replication factor is not a config.
    broker
        .alter_topic(&a, &[("min.insync.replicas", "1"), ("retention.ms", "-1")])
        .await;
    broker
        .alter_topic(
            &b,
            &[
                ("cleanup.policy", "delete"),
                ("unclean.leader.election.enable", "false"),
            ],
        )
        .await;
    let (code, out) = check();
    assert_eq!(code, Some(0), "{out}");
    let warnings: Vec<&str> = out.lines().filter(|l| l.starts_with("warning:")).collect();
    assert_eq!(warnings.len(), 1, "{out}");
    assert!(
        warnings[0].contains(&format!("topic {b}: one replica")),
        "{out}"
    );
}
