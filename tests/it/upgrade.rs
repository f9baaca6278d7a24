//! Upgrading duplex on live nodes. The previous release (schema version 1, before
//! numbered migrations) sets two nodes up and runs both directions; it leaves a
//! backlog in both places duplex keeps one: on the topic (node a's changes published
//! while node b was out of its reach) and in the slots (both nodes written while no
//! duplex ran). Today's `duplex setup` migrates both nodes in place, keeping the
//! slots, their streams and the directions' positions, and today's `duplex run`
//! carries the streams on: both nodes converge, nothing lost, nothing applied twice.

use crate::harness::duplex::{previous_bin, Daemon, Rig};
use crate::harness::kafka::Broker;
use crate::harness::workload::{assert_identical_and_applied_once, rig_before_setup, workload};
use crate::harness::{free_port, output_text, wait_for};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// The newest schema version today's duplex knows: its last migration's number.
fn latest_version() -> i32 {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/pg/state/migrations");
    std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".sql")?.split('_').next()?.parse().ok()
        })
        .max()
        .unwrap()
}

/// Both nodes' workloads for `secs`, each under its own `tag`s (which seed them and
/// keep their parent ids apart); returns the changes each made.
async fn writes(rig: &Rig, tags: (u64, u64), secs: u64) -> (u64, u64) {
    let cl = rig.cluster;
    let until = Instant::now() + Duration::from_secs(secs);
    let wa = tokio::spawn(workload(cl.client(&rig.db_a).await, tags.0, until));
    let wb = tokio::spawn(workload(rig.client_b().await, tags.1, until));
    let done = (wa.await.unwrap(), wb.await.unwrap());
    assert!(done.0 > 50 && done.1 > 50, "workload too small: {done:?}");
    done
}

/// One multi-row application transaction on `c`, on keys of its own from `base`:
/// ten inserts, then half of them updated and three deleted.
async fn batch(c: &Client, base: i32) {
    c.batch_execute(&format!(
        "BEGIN;
         INSERT INTO items (id, val) SELECT i, 'batch' FROM generate_series({base}, {base} + 9) i;
         UPDATE items SET val = 'updated', updated_at = clock_timestamp() WHERE id BETWEEN {base} AND {base} + 4;
         DELETE FROM items WHERE id BETWEEN {base} + 5 AND {base} + 7;
         COMMIT;"
    ))
    .await
    .unwrap();
}

/// Waits until `slot` on `c` confirmed everything written so far: the node's changes
/// are all on its topic.
async fn published_all(c: &Client, slot: &str) {
    let wal: String = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    wait_for("the node's changes on its topic", Duration::from_secs(60), || async {
        let done: bool = c
            .query_one(
                "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot, &wal],
            )
            .await
            .unwrap()
            .get(0);
        done.then_some(())
    })
    .await;
}

/// What an upgrade must keep on a node: its slot (name, stream, confirmed position)
/// and the positions of the directions into it.
async fn kept(c: &Client) -> Vec<String> {
    let mut kept: Vec<String> = c
        .query(
            "SELECT format('slot %s stream %s confirmed %s', s.slot_name, s.stream, r.confirmed_flush_lsn)
             FROM duplex.slots s JOIN pg_replication_slots r USING (slot_name) ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    kept.extend(
        c.query(
            "SELECT format('position from %s on %s: offset %s, %s/%s, stream %s',
                           source_node, topic, next_offset, commit_lsn, seq, stream)
             FROM duplex.apply_positions ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0)),
    );
    kept
}

async fn versions(c: &Client) -> Vec<i32> {
    c.query("SELECT version FROM duplex.schema_version ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn stop(d: Daemon) {
    assert_eq!(d.stop().await, Some(0));
}

#[tokio::test]
async fn an_upgrade_migrates_both_nodes_in_place_and_carries_both_backlogs_on() {
    let started = Instant::now();
    let previous = previous_bin();
    let rig = rig_before_setup().await;
    let cl = rig.cluster;
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    let info = [("RUST_LOG", "info")];

    // The previous release sets both nodes up and runs both directions.
    let out = rig.command_of(&previous, &["setup"], &[]);
    assert!(out.status.success(), "{}", output_text(&out));
    for c in [&a, &b] {
        assert_eq!(versions(c).await, [1], "the previous release's schema");
    }
    let d = rig.start_of(&previous, &rig.config, &info);
    d.wait_applying(2).await;
    writes(&rig, (0, 1), 4).await;
    batch(&a, 1000).await;
    batch(&b, 2000).await;
    assert_identical_and_applied_once(&rig).await;
    stop(d).await;

    // A backlog on the topic: node b out of the previous release's reach, node a's
    // changes published but not applied; b's pile up in its slot.
    let real = rig.url_b("postgres");
    let dead = format!("postgres://postgres@127.0.0.1:{}/x", free_port());
    rig.edit_config(&[(&real, &dead)]);
    let d = rig.start_of(&previous, &rig.config, &info);
    writes(&rig, (2, 3), 4).await;
    batch(&a, 3000).await;
    published_all(&a, &rig.slot_a()).await;
    stop(d).await;
    rig.edit_config(&[(&dead, &real)]);
    // A backlog in both slots: both applications write while no duplex runs.
    writes(&rig, (4, 5), 3).await;
    batch(&a, 4000).await;
    batch(&b, 5000).await;

    let topic_a = rig.topic_of("a");
    let stored: i64 = b
        .query_one(
            "SELECT next_offset FROM duplex.apply_positions WHERE source_node = 'a' AND topic = $1",
            &[&topic_a],
        )
        .await
        .unwrap()
        .get(0);
    let (_, end) = Broker::shared().watermarks(&topic_a);
    assert!(
        end > stored + 100,
        "no backlog on the topic: {stored}..{end}"
    );
    for (c, slot) in [(&a, rig.slot_a()), (&b, format!("{}_b", rig.prefix))] {
        let behind: bool = c
            .query_one(
                "SELECT confirmed_flush_lsn < pg_current_wal_lsn() FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .get(0);
        assert!(behind, "no backlog in slot {slot}");
    }
    let before = (kept(&a).await, kept(&b).await);

    // Today's setup migrates both nodes in place, and only once.
    let out = rig.command(&["setup"]);
    let said = output_text(&out);
    assert!(out.status.success(), "{said}");
    let latest = latest_version();
    assert!(
        said.contains(&format!("migrated schema duplex to version {latest}")),
        "today's setup did not migrate to version {latest}; it said: {said:?}"
    );
    for c in [&a, &b] {
        assert_eq!(versions(c).await, (1..=latest).collect::<Vec<_>>());
    }
    assert_eq!(
        (kept(&a).await, kept(&b).await),
        before,
        "the upgrade changed a slot or a position"
    );
    let out = rig.command(&["setup"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        !output_text(&out).contains("migrated"),
        "{}",
        output_text(&out)
    );

    // Today's run carries both backlogs on, and the applications go on writing.
    let d = rig.start();
    writes(&rig, (6, 7), 4).await;
    assert_identical_and_applied_once(&rig).await;
    // Every application transaction made it, whichever backlog it waited in.
    let batches: Vec<String> = b
        .query(
            "SELECT format('%s %s', id, val) FROM items WHERE id >= 1000 ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let want: Vec<String> = [1000, 2000, 3000, 4000, 5000]
        .iter()
        .flat_map(|base| {
            (0..5)
                .map(move |i| format!("{} updated", base + i))
                .chain((8..10).map(move |i| format!("{} batch", base + i)))
        })
        .collect();
    assert_eq!(batches, want);
    stop(d).await;
    eprintln!("upgrade test took {:?}", started.elapsed());
}
