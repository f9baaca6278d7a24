//! Broker restarts. One that comes back without the messages duplex relied on (its
//! disk lost: every topic gone): duplex notices and stops with a message saying what
//! happened and how to resynchronise; it never skips the lost range silently nor
//! applies anything twice. One that comes back with its log: duplex carries on, and
//! nothing is lost or applied twice.

use crate::harness::duplex::Rig;
use crate::harness::kafka::Broker;
use crate::harness::pg::Cluster;
use crate::harness::tables::converge;
use std::time::Duration;

const DDL: &str = "CREATE TABLE items (id int PRIMARY KEY, val text, updated_at timestamptz NOT NULL DEFAULT clock_timestamp());";

#[tokio::test]
async fn a_broker_that_lost_its_log_stops_duplex_with_the_cause() {
    let broker: &'static Broker = Box::leak(Box::new(Broker::start_own()));
    let rig = Rig::new(DDL, &["public.items"], "").await;
    let shared = Broker::shared().brokers();
    rig.edit_config(&[(shared.as_str(), broker.brokers().as_str())]);
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    assert!(rig.command(&["setup"]).status.success());
    let mut d = rig.start();
    d.wait_applying(1).await;
    for t in 0..5 {
        a.batch_execute(&format!(
            "INSERT INTO items (id, val) SELECT {t} * 10 + g, 'before' FROM generate_series(1, 10) g"
        ))
        .await
        .unwrap();
    }
    converge(&a, &b, &["items"], Duration::from_secs(60)).await;

    broker.restart_empty();
    // The application goes on writing; the topic now starts again at offset 0.
    let writes = async {
        for t in 0..20 {
            a.batch_execute(&format!(
                "INSERT INTO items (id, val) SELECT 1000 + {t} * 10 + g, 'after' FROM generate_series(1, 10) g"
            ))
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    writes.await;
    // duplex stops (exit code 1), naming the cause, before anything of the new log is
    // applied: the topic's offsets went back.
    assert_eq!(d.exited(Duration::from_secs(90)).await, Some(1));
    let logs = d.logs();
    assert!(
        logs.contains("went back") && logs.contains("lost messages it had acknowledged"),
        "no explanation:\n{logs}"
    );
    let after: i64 = b
        .query_one("SELECT count(*) FROM items WHERE val = 'after'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        after, 0,
        "rows of the new log were applied past the lost range"
    );
    // It stays stopped: a restart says the same (the last offset is recorded on a).
    let mut again = rig.start();
    assert_eq!(again.exited(Duration::from_secs(90)).await, Some(1));
    assert!(again.logs().contains("went back"), "{}", again.logs());

    // The recovery the message gives: reset both positions, start, copy.
    b.batch_execute("DELETE FROM duplex.apply_positions")
        .await
        .unwrap();
    a.batch_execute("UPDATE duplex.slots SET last_offset = NULL, topic_lost = NULL")
        .await
        .unwrap();
    let d = rig.start();
    d.wait_applying(1).await;
    let snapshot = rig.command(&["snapshot"]);
    assert!(
        snapshot.status.success(),
        "{}",
        String::from_utf8_lossy(&snapshot.stderr)
    );
    a.batch_execute("INSERT INTO items (id, val) VALUES (5000, 'recovered')")
        .await
        .unwrap();
    converge(&a, &b, &["items"], Duration::from_secs(60)).await;
    assert_eq!(d.stop().await, Some(0));
}

/// A broker stopped and started again on its log twice during
/// writes on both nodes, once gracefully and once killed: the producers and consumers
/// reconnect, the recorded offsets keep rising, and both nodes end equal with nothing
/// applied twice.
#[tokio::test]
async fn a_durable_broker_restarted_during_a_bidirectional_workload_loses_nothing() {
    use crate::harness::workload::{assert_identical_and_applied_once, rig_before_setup, workload};
    use std::time::Instant;
    let broker: &'static Broker = Box::leak(Box::new(Broker::start_own()));
    let rig = rig_before_setup().await;
    rig.edit_config(&[(
        Broker::shared().brokers().as_str(),
        broker.brokers().as_str(),
    )]);
    assert!(rig.command(&["setup"]).status.success());
    let d = rig.start();
    d.wait_applying(2).await;
    let cl = Cluster::shared();
    let until = Instant::now() + Duration::from_secs(20);
    let writers = (
        tokio::spawn(workload(cl.client(&rig.db_a).await, 0, until)),
        tokio::spawn(workload(rig.client_b().await, 1, until)),
    );
    // A rolling restart (SIGTERM), then a crash (SIGKILL).
    for crash in [false, true] {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let down = Instant::now();
        match crash {
            false => broker.restart_gracefully(),
            true => broker.restart(),
        }
        eprintln!("broker back after {:?}", down.elapsed());
    }
    let changes = (writers.0.await.unwrap(), writers.1.await.unwrap());
    assert!(changes.0 > 500 && changes.1 > 500, "{changes:?}");
    let converging = Instant::now();
    assert_identical_and_applied_once(&rig).await;
    eprintln!(
        "converged {:?} after the writes ended",
        converging.elapsed()
    );
    let logs = d.logs();
    assert!(!logs.contains("went back"), "{logs}");
    assert_eq!(d.stop().await, Some(0));
}

/// A stored position inside a record batch (a crash after applying one transaction of
/// several the producer sent together): Kafka answers a fetch from there with the whole
/// batch, and duplex resumes exactly at the stored offset: nothing skipped, and nothing
/// before it applied again. (A broker that answered with the next batch instead would
/// make duplex read back from earlier offsets; `apply::resume`'s unit tests cover that.)
#[tokio::test]
async fn a_position_inside_a_record_batch_resumes_there() {
    let rig = Rig::new(DDL, &["public.items"], "").await;
    // Transactions that commit within 300 ms of each other share a record batch.
    let mut cfg = std::fs::read_to_string(&rig.config).unwrap();
    cfg.push_str("\n[kafka.properties]\n\"linger.ms\" = \"300\"\n");
    std::fs::write(&rig.config, cfg).unwrap();
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    assert!(rig.command(&["setup"]).status.success());
    let d = rig.start();
    d.wait_applying(1).await;
    for id in 1..=6 {
        a.batch_execute(&format!("INSERT INTO items (id, val) VALUES ({id}, 'v')"))
            .await
            .unwrap();
    }
    converge(&a, &b, &["items"], Duration::from_secs(60)).await;
    assert_eq!(d.stop().await, Some(0));
    let versions = "SELECT string_agg(id || ':' || xmin, ',' ORDER BY id) FROM items";
    let before: String = b.query_one(versions, &[]).await.unwrap().get(0);
    // Back to the offset of the third row's transaction: as if duplex had crashed
    // right after committing the second (the rows are applied already; the position
    // in the source's commit order still says so).
    b.batch_execute("UPDATE duplex.apply_positions SET next_offset = next_offset - 4")
        .await
        .unwrap();
    let d = rig.start();
    d.wait_applying(1).await;
    a.batch_execute("INSERT INTO items (id, val) VALUES (7, 'after')")
        .await
        .unwrap();
    converge(&a, &b, &["items"], Duration::from_secs(60)).await;
    let after: String = b.query_one(versions, &[]).await.unwrap().get(0);
    assert!(after.starts_with(&before), "{before} became {after}");
    assert_eq!(d.stop().await, Some(0));
}

/// A topic deleted and created again while duplex was stopped: the positions stored
/// on both sides lie past its end now. duplex stops naming what happened, applies
/// nothing of the new log over the old positions, and the documented recovery brings
/// both nodes level with nothing lost.
#[tokio::test]
async fn a_topic_deleted_while_stopped_is_found_and_recovered() {
    let rig = Rig::both(DDL, &["public.items"], "").await;
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    assert!(rig.command(&["setup"]).status.success());
    let d = rig.start();
    d.wait_applying(2).await;
    a.batch_execute("INSERT INTO items (id, val) SELECT g, 'before' FROM generate_series(1, 30) g")
        .await
        .unwrap();
    converge(&a, &b, &["items"], Duration::from_secs(60)).await;
    assert_eq!(d.stop().await, Some(0));
    Broker::shared().delete_topic(&rig.topic_of("a")).await;
    // While duplex is stopped, node a deletes and writes.
    a.batch_execute(
        "DELETE FROM items WHERE id <= 10;
         INSERT INTO items (id, val) SELECT 100 + g, 'while stopped' FROM generate_series(1, 5) g;",
    )
    .await
    .unwrap();
    let mut d = rig.start();
    assert_eq!(d.exited(Duration::from_secs(90)).await, Some(1));
    let logs = d.logs();
    assert!(
        logs.contains("went back")
            || logs.contains("does not exist any more")
            || logs.contains("is not in the topic any more"),
        "no explanation:\n{logs}"
    );
    assert_eq!(
        crate::harness::count(&b, "SELECT count(*) FROM items WHERE val = 'while stopped'").await,
        0,
        "the new log was applied over the old positions"
    );
    // The documented recovery.
    b.batch_execute("DELETE FROM duplex.apply_positions WHERE source_node = 'a'")
        .await
        .unwrap();
    a.batch_execute("UPDATE duplex.slots SET last_offset = NULL, topic_lost = NULL")
        .await
        .unwrap();
    let d = rig.start();
    d.wait_applying(2).await;
    let snapshot = rig.command(&["snapshot"]);
    assert!(
        snapshot.status.success(),
        "{}",
        crate::harness::output_text(&snapshot)
    );
    a.batch_execute("INSERT INTO items (id, val) VALUES (500, 'after')")
        .await
        .unwrap();
    converge(&a, &b, &["items"], Duration::from_secs(60)).await;
    assert_eq!(crate::harness::tables::item_ids(&b).await.len(), 20 + 5 + 1);
    assert_eq!(d.stop().await, Some(0));
}

/// Components split between two instances: the reader that finds the topic lost is
/// another instance's, which records it on the node (simulated here by that record).
/// The applier running here reads the same topic: it stops too, halting its
/// direction with the recorded cause, instead of applying on until its next start.
#[tokio::test]
async fn a_running_applier_stops_when_another_instance_finds_its_topic_lost() {
    let rig = Rig::new(DDL, &["public.items"], "").await;
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    assert!(rig.command(&["setup"]).status.success());
    let d = rig.start();
    d.wait_applying(1).await;
    a.batch_execute("INSERT INTO items (id, val) VALUES (1, 'before')")
        .await
        .unwrap();
    converge(&a, &b, &["items"], Duration::from_secs(60)).await;
    a.batch_execute(
        "UPDATE duplex.slots SET topic_lost = 'topic went back (found by the other instance)'",
    )
    .await
    .unwrap();
    d.wait_log(
        "topic went back (found by the other instance) (recorded in duplex.slots.topic_lost",
        1,
        Duration::from_secs(30),
    )
    .await;
    crate::harness::wait_for("the direction halted", Duration::from_secs(30), || async {
        let state: Option<String> = b
            .query_opt(
                "SELECT state FROM duplex.apply_state WHERE source_node = 'a'",
                &[],
            )
            .await
            .unwrap()
            .map(|r| r.get(0));
        (state.as_deref() == Some("halted")).then_some(())
    })
    .await;
    d.stop().await;
}

/// The highest offset the broker acknowledged, recorded on the node, only rises: an
/// instance that took over recorded a higher one (set here), and the older session's
/// next record must not lower it, or the next session's check for a broker that lost
/// messages would expect too little.
#[tokio::test]
async fn the_recorded_last_offset_never_goes_down() {
    let rig = Rig::new(DDL, &["public.items"], "").await;
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    assert!(rig.command(&["setup"]).status.success());
    let d = rig.start();
    d.wait_applying(1).await;
    a.batch_execute("INSERT INTO items (id, val) SELECT g, 'v' FROM generate_series(1, 5) g")
        .await
        .unwrap();
    converge(&a, &b, &["items"], Duration::from_secs(60)).await;
    let recorded = "SELECT coalesce(last_offset, -1) FROM duplex.slots";
    crate::harness::wait_for("an offset recorded", Duration::from_secs(30), || async {
        (crate::harness::count(&a, recorded).await >= 0).then_some(())
    })
    .await;
    let higher = crate::harness::count(&a, recorded).await + 1000;
    let version: String = a
        .query_one(
            &format!("UPDATE duplex.slots SET last_offset = {higher} RETURNING xmin::text"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // More changes: the session records its newest offset again (a new row version).
    for id in 10..15 {
        a.batch_execute(&format!(
            "INSERT INTO items (id, val) VALUES ({id}, 'more')"
        ))
        .await
        .unwrap();
    }
    converge(&a, &b, &["items"], Duration::from_secs(60)).await;
    crate::harness::wait_for(
        "the session's next record",
        Duration::from_secs(30),
        || async {
            let now: String = a
                .query_one("SELECT xmin::text FROM duplex.slots", &[])
                .await
                .unwrap()
                .get(0);
            (now != version).then_some(())
        },
    )
    .await;
    assert_eq!(crate::harness::count(&a, recorded).await, higher);
    assert_eq!(d.stop().await, Some(0));
}
