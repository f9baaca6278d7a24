//! Where a direction starts reading when it has no position, and the documented
//! recovery when it lost one: a first start begins at a known position of the source's
//! current stream (the start a copy records before it reads, or the stream's first
//! offset), never inside an older deployment's events or a transaction cut by
//! retention; a stream whose head retention removed halts the direction; and after a
//! lost position, deleting the direction's row and `duplex snapshot` leave both nodes
//! equal to what the applications wrote, deletes and truncations included, however
//! long the peer missed them (a node keeps its own deletes until the peer has them).

use crate::harness::duplex::{Daemon, Rig};
use crate::harness::kafka::Broker;
use crate::harness::pg::Cluster;
use crate::harness::tables::{converge, item_ids, rows};
use crate::harness::{count, free_port, wait_for};
use std::time::Duration;
use tokio_postgres::Client;

const DDL: &str = "CREATE TABLE items (id int PRIMARY KEY, val text,
        updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
    CREATE TABLE notes (id int PRIMARY KEY, body text,
        updated_at timestamptz NOT NULL DEFAULT clock_timestamp());";

fn said(out: &std::process::Output) -> String {
    crate::harness::output_text(out)
}

/// Replaces node b's URL with one nobody answers; returns (real, dead) to put back.
fn cut_off_b(rig: &Rig) -> (String, String) {
    let real = rig.url_b("postgres");
    let dead = format!("postgres://postgres@127.0.0.1:{}/x", free_port());
    rig.edit_config(&[(&real, &dead)]);
    (real, dead)
}

/// Waits until node a's slot confirmed everything written so far: its changes are all
/// on the topic.
async fn a_published_all(rig: &Rig, a: &Client) {
    let wal: String = a
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let slot = rig.slot_a();
    wait_for("node a's changes on the topic", Duration::from_secs(60), || {
        let (a, slot, wal) = (a, &slot, &wal);
        async move {
            let done: bool = a
                .query_one(
                    "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
                    &[slot, wal],
                )
                .await
                .unwrap()
                .get(0);
            done.then_some(())
        }
    })
    .await;
}

/// Inserts `ids` in transactions of ten rows.
async fn insert_in_tens(c: &Client, table: &str, ids: std::ops::RangeInclusive<i32>) {
    let ids: Vec<i32> = ids.collect();
    for chunk in ids.chunks(10) {
        let values: Vec<String> = chunk.iter().map(|i| format!("({i}, 'v{i}')")).collect();
        c.batch_execute(&format!(
            "INSERT INTO {table} VALUES {} ON CONFLICT DO NOTHING",
            values.join(", ").replace(')', ", clock_timestamp())")
        ))
        .await
        .unwrap();
    }
}

async fn stop(d: Daemon) {
    assert_eq!(d.stop().await, Some(0));
}

#[tokio::test]
async fn a_lost_position_is_recovered_as_documented_deletes_and_truncates_included() {
    let rig = Rig::both(DDL, &["public.items", "public.notes"], "").await;
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    assert!(rig.command(&["setup"]).status.success());
    let d = rig.start();
    d.wait_applying(2).await;
    insert_in_tens(&a, "items", 1..=40).await;
    insert_in_tens(&a, "notes", 1..=10).await;
    insert_in_tens(&b, "items", 100..=110).await;
    converge(&a, &b, &["items", "notes"], Duration::from_secs(60)).await;
    stop(d).await;
    let stored: i64 = count(
        &b,
        "SELECT next_offset FROM duplex.apply_positions WHERE source_node = 'a'",
    )
    .await;

    // Node b is out of reach; node a's application goes on, its changes reach the topic.
    let (real, dead) = cut_off_b(&rig);
    let d = rig.start();
    insert_in_tens(&a, "items", 41..=60).await;
    a.batch_execute(
        "DELETE FROM items WHERE id <= 5;
         UPDATE items SET val = 'changed', updated_at = clock_timestamp() WHERE id BETWEEN 6 AND 8;
         DELETE FROM items WHERE id = 41;
         TRUNCATE notes;
         INSERT INTO notes VALUES (1, 'reloaded', '2020-01-01'), (2, 'reloaded', '2020-01-02');",
    )
    .await
    .unwrap();
    a_published_all(&rig, &a).await;
    stop(d).await;

    // Retention removes the head of what b never read, cutting a transaction.
    let topic = rig.topic_of("a");
    Broker::shared()
        .delete_records_before(&topic, stored + 5)
        .await;
    rig.edit_config(&[(&dead, &real)]);
    let d = rig.start();
    let logs = d
        .wait_log("is not in the topic any more", 1, Duration::from_secs(60))
        .await;
    assert!(logs.contains("duplex snapshot"), "{logs}");
    stop(d).await;

    // The recovery the message gives.
    b.batch_execute("DELETE FROM duplex.apply_positions WHERE source_node = 'a'")
        .await
        .unwrap();
    let snapshot = rig.command(&["snapshot"]);
    assert!(snapshot.status.success(), "{}", said(&snapshot));
    let d = rig.start();
    d.wait_applying(2).await;
    // Both applications write on; everything converges, deletes included.
    a.batch_execute("INSERT INTO items VALUES (200, 'after', clock_timestamp())")
        .await
        .unwrap();
    b.batch_execute(
        "UPDATE items SET val = 'b edit', updated_at = clock_timestamp() WHERE id = 6;
         DELETE FROM items WHERE id = 7;",
    )
    .await
    .unwrap();
    converge(&a, &b, &["items", "notes"], Duration::from_secs(60)).await;
    let ids = item_ids(&b).await;
    assert!(
        !ids.iter().any(|i| *i <= 5 || *i == 7 || *i == 41),
        "deleted rows are back: {ids:?}"
    );
    assert!(ids.contains(&60) && ids.contains(&200) && ids.contains(&110));
    assert_eq!(rows(&b, "notes").await.len(), 2, "the truncate and reload");
    stop(d).await;
}

#[tokio::test]
async fn a_first_start_ignores_an_earlier_deployments_events() {
    let rig = Rig::new(DDL, &["public.items"], "[snapshot]\nmode = \"never\"\n").await;
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    assert!(rig.command(&["setup"]).status.success());
    let d = rig.start();
    d.wait_applying(1).await;
    insert_in_tens(&a, "items", 1..=3).await;
    converge(&a, &b, &["items"], Duration::from_secs(60)).await;
    stop(d).await;
    let out = rig.command(&["teardown", "--yes"]);
    assert!(out.status.success(), "{}", said(&out));
    // Without duplex, the applications delete row 2 on both nodes.
    for c in [&a, &b] {
        c.batch_execute("DELETE FROM items WHERE id = 2")
            .await
            .unwrap();
    }
    // A new deployment on the same topics.
    assert!(rig.command(&["setup"]).status.success());
    let d = rig.start();
    d.wait_applying(1).await;
    a.batch_execute("INSERT INTO items VALUES (4, 'new', clock_timestamp())")
        .await
        .unwrap();
    converge(&a, &b, &["items"], Duration::from_secs(60)).await;
    assert_eq!(
        item_ids(&b).await,
        [1, 3, 4],
        "an old event was applied again"
    );
    stop(d).await;
}

#[tokio::test]
async fn a_stream_whose_head_retention_removed_halts_its_first_start() {
    let rig = Rig::new(DDL, &["public.items"], "[snapshot]\nmode = \"never\"\n").await;
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    assert!(rig.command(&["setup"]).status.success());
    // The direction cannot start yet (b is out of reach); a's changes reach the topic.
    let (real, dead) = cut_off_b(&rig);
    let d = rig.start();
    insert_in_tens(&a, "items", 1..=30).await;
    a_published_all(&rig, &a).await;
    stop(d).await;
    let topic = rig.topic_of("a");
    let (low, high) = Broker::shared().watermarks(&topic);
    assert_eq!((low, high), (0, 30));
    Broker::shared().delete_records_before(&topic, 10).await;
    rig.edit_config(&[(&dead, &real)]);
    let d = rig.start();
    let logs = d
        .wait_log("is not in the topic any more", 1, Duration::from_secs(60))
        .await;
    assert!(
        logs.contains("retention removed the rest before the direction first started"),
        "{logs}"
    );
    assert!(
        item_ids(&b).await.is_empty(),
        "part of the stream was applied"
    );
    stop(d).await;
    // The recovery the message gives: `duplex snapshot` copies and sets the start.
    let snapshot = rig.command(&["snapshot"]);
    assert!(snapshot.status.success(), "{}", said(&snapshot));
    let d = rig.start();
    d.wait_applying(1).await;
    a.batch_execute("INSERT INTO items VALUES (31, 'after', clock_timestamp())")
        .await
        .unwrap();
    converge(&a, &b, &["items"], Duration::from_secs(60)).await;
    stop(d).await;
}

#[tokio::test]
async fn a_nodes_own_deletes_outlive_retention_until_the_peer_has_them() {
    // Short retention: b's changes applied on a soon make a's tombstones old enough.
    let rig = Rig::both(DDL, &["public.items"], "").await;
    rig.edit_config(&[(
        "linger_ms = 10",
        "linger_ms = 10\ntombstone_retention_ms = 1000",
    )]);
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    assert!(rig.command(&["setup"]).status.success());
    let d = rig.start();
    d.wait_applying(2).await;
    insert_in_tens(&a, "items", 1..=20).await;
    converge(&a, &b, &["items"], Duration::from_secs(60)).await;
    // b refuses one of a's rows: a_to_b halts, b_to_a goes on.
    b.batch_execute("ALTER TABLE items ADD CONSTRAINT small CHECK (id < 1000)")
        .await
        .unwrap();
    a.batch_execute("INSERT INTO items VALUES (1000, 'refused', clock_timestamp())")
        .await
        .unwrap();
    d.wait_log("halted on a bad event", 1, Duration::from_secs(60))
        .await;
    a.batch_execute("DELETE FROM items WHERE id <= 5")
        .await
        .unwrap();
    // b's application writes on for longer than the retention, and a applies it.
    for id in 100..=110 {
        b.batch_execute(&format!(
            "INSERT INTO items VALUES ({id}, 'b', clock_timestamp())"
        ))
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    wait_for("b's rows on a", Duration::from_secs(60), || {
        let a = &a;
        async move { item_ids(a).await.contains(&110).then_some(()) }
    })
    .await;
    stop(d).await;
    // A new session prunes first thing.
    let d = rig.start();
    d.wait_log("applying", 1, Duration::from_secs(60)).await;
    stop(d).await;
    let kept = count(
        &a,
        "SELECT count(*) FROM duplex.tombstones WHERE origin = 'local'",
    )
    .await;
    assert_eq!(kept, 5, "a pruned deletes b never applied");
    // The operator fixes b and brings it level.
    b.batch_execute("ALTER TABLE items DROP CONSTRAINT small")
        .await
        .unwrap();
    let snapshot = rig.command(&["snapshot"]);
    assert!(snapshot.status.success(), "{}", said(&snapshot));
    for c in [&a, &b] {
        let ids = item_ids(c).await;
        assert!(
            !ids.iter().any(|i| *i <= 5),
            "deleted rows are back: {ids:?}"
        );
    }
    assert_eq!(rows(&a, "items").await, rows(&b, "items").await);
}

/// A direction whose first start brought everything by its copy (it never applied a
/// change from the stream) and whose topic prefix then changes starts where the
/// source's stream begins on the new topic, not at its end: what the source published
/// there before the direction first read it arrives.
#[tokio::test]
async fn a_new_topic_after_a_start_that_only_copied_is_read_from_the_streams_start() {
    let rig = Rig::both(DDL, &["public.items", "public.notes"], "").await;
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    // Older than duplex: only the copy carries them.
    insert_in_tens(&a, "items", 1..=20).await;
    assert!(rig.command(&["setup"]).status.success());
    let d = rig.start();
    d.wait_applying(2).await;
    converge(&a, &b, &["items", "notes"], Duration::from_secs(60)).await;
    stop(d).await;
    let applied = count(
        &b,
        "SELECT count(*) FROM duplex.apply_positions WHERE source_node = 'a' AND commit_lsn <> '0/0'",
    )
    .await;
    assert_eq!(applied, 0, "the first start applied from the stream");

    // On the new topic, node a publishes while node b is out of reach.
    let old = format!("topic_prefix = \"{}\"", rig.prefix);
    rig.edit_config(&[(&old, &format!("topic_prefix = \"{}_v2\"", rig.prefix))]);
    let (real, dead) = cut_off_b(&rig);
    let d = rig.start();
    insert_in_tens(&a, "items", 21..=30).await;
    a.batch_execute("DELETE FROM items WHERE id <= 3")
        .await
        .unwrap();
    a_published_all(&rig, &a).await;
    stop(d).await;

    rig.edit_config(&[(&dead, &real)]);
    let d = rig.start();
    converge(&a, &b, &["items", "notes"], Duration::from_secs(60)).await;
    assert_eq!(item_ids(&b).await, (4..=30).collect::<Vec<i32>>());
    assert!(!d.logs().contains("lost its position"), "{}", d.logs());
    stop(d).await;
}
