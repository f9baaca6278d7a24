//! The initial copy when the instance doing it loses its node: what its sessions left
//! on the node (a COPY waiting for data that never comes, the planner's lock) must not
//! keep another instance from taking the copy over and finishing it.

use crate::harness::duplex::{Daemon, Rig};
use crate::harness::pg::Cluster;
use crate::harness::proxy::Proxy;
use crate::harness::tables::identical;
use crate::harness::workload::Rng;
use crate::harness::{count, wait_for};
use std::time::{Duration, Instant};
use tokio_postgres::Client;

const DDL: &str = "CREATE TABLE items (id int PRIMARY KEY, val text, n int,
                   updated_at timestamptz NOT NULL DEFAULT clock_timestamp());";

/// An application on `db` until `until`: updates, deletes and re-inserts of keys
/// within `keys`. Returns the changes committed.
async fn application(c: Client, keys: u64, until: Instant) -> u64 {
    let mut rng = Rng(0xc0b1);
    let mut changes = 0;
    while Instant::now() < until {
        let k = 1 + rng.below(keys);
        let sql = match rng.below(3) {
            0 => format!("DELETE FROM items WHERE id = {k}"),
            1 => format!(
                "INSERT INTO items (id, val, n) VALUES ({k}, 'again', 0)
                 ON CONFLICT (id) DO UPDATE SET val = 'upsert', updated_at = clock_timestamp()"
            ),
            _ => {
                format!("UPDATE items SET n = n + 1, updated_at = clock_timestamp() WHERE id = {k}")
            }
        };
        c.batch_execute(&sql).await.unwrap();
        changes += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    changes
}

/// Waits until either instance logs `needle`.
async fn either_logs(instances: &[&Daemon], needle: &str, timeout: Duration) {
    wait_for(&format!("{needle:?} in a log"), timeout, || {
        let seen = instances.iter().any(|d| d.logs().contains(needle));
        async move { seen.then_some(()) }
    })
    .await;
}

/// The copy sessions of direction a_to_b on `b`'s database: pid, application name,
/// state and wait event, for a failure's message.
async fn copy_sessions(b: &Client) -> Vec<(i32, String, String, String)> {
    b.query(
        "SELECT pid, application_name, coalesce(state, ''), coalesce(wait_event, '')
         FROM pg_stat_activity
         WHERE datname = current_database() AND application_name LIKE 'duplex snapshot a_to_b%'",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}

/// Node b reached through a proxy; the active instance's connections to it stall for
/// good in the middle of a chunk, and so do those it opens later (a hung middlebox:
/// the node still sees them open).
/// Its COPY sessions stay on the node holding the copy's replication origins; another
/// instance (whichever takes the lease) ends them once they have been silent for
/// `sync.receive_timeout_ms`, and finishes the copy, within the takeover bound plus
/// that, while the application writes.
#[tokio::test]
async fn a_copy_stalled_mid_chunk_is_taken_over_and_finished() {
    let rig = Rig::new(
        DDL,
        &["public.items"],
        "[snapshot]\nworkers = 2\nchunk_rows = 100000\n[standby]\ntakeover_ms = 5000\n",
    )
    .await;
    let cl = Cluster::shared();
    let proxy = Proxy::start(rig.cluster_b.port);
    let direct = format!("127.0.0.1:{}/{}", rig.cluster_b.port, rig.db_b);
    let proxied = format!("127.0.0.1:{}/{}", proxy.port, rig.db_b);
    rig.edit_config(&[
        (direct.as_str(), proxied.as_str()),
        (
            "linger_ms = 10",
            "linger_ms = 10\nreceive_timeout_ms = 2000",
        ),
    ]);
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    a.batch_execute(
        "INSERT INTO items (id, val, n) SELECT i, repeat(md5(i::text), 4), i FROM generate_series(1, 400000) i;
         ANALYZE items",
    )
    .await
    .unwrap();
    assert!(rig.command(&["setup"]).status.success());
    // Slow enough (64 kB per 20 ms and connection) to stall it mid-chunk.
    proxy.delay(20);
    let until = Instant::now() + Duration::from_secs(20);
    let writing = tokio::spawn(application(cl.client(&rig.db_a).await, 400_000, until));
    let first = rig.start();
    // Early in a chunk (its first 2 MB of about 13), with more chunks after
    // it: the stall cuts a COPY, and the copy has work left to take over. (Stalled
    // between chunks, or after the last, there would be no COPY to end.)
    wait_for(
        "a chunk just begun, more to come",
        Duration::from_secs(60),
        || async {
            let n = count(
                &b,
                "SELECT count(*) FROM pg_stat_progress_copy p JOIN pg_stat_activity a USING (pid)
                 WHERE a.datname = current_database()
                   AND a.application_name LIKE 'duplex snapshot a_to_b #%'
                   AND p.bytes_processed BETWEEN 1 AND 2000000
                   AND (SELECT count(*) FROM duplex.snapshot_chunks
                        WHERE source_node = 'a' AND copied_at IS NULL) >= 2",
            )
            .await;
            (n > 0).then_some(())
        },
    )
    .await;
    // The first instance's way to node b hangs: what it had open, and what it opens
    // from now on, so that it cannot take its lease back; the second instance
    // reaches node b directly.
    proxy.stall_open_connections();
    proxy.stall_new_connections(true);
    proxy.delay(0);
    let stalled_at = Instant::now();
    let at_stall = copy_sessions(&b).await;
    let (config, _) = rig.second_instance_config();
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace(proxied.as_str(), direct.as_str())).unwrap();
    let second = rig.start_with(&config);
    let both = [&first, &second];
    either_logs(
        &both,
        "snapshot copied direction=a_to_b",
        Duration::from_secs(60),
    )
    .await;
    either_logs(&both, "applying direction=a_to_b", Duration::from_secs(30)).await;
    eprintln!(
        "copied and applying {:?} after the stall",
        stalled_at.elapsed()
    );
    assert!(
        both.iter()
            .any(|d| d.logs().contains("ended an earlier copy session")),
        "copy sessions on b at the stall: {at_stall:?}\n{}\n---\n{}",
        first.logs(),
        second.logs()
    );
    let changes = writing.await.unwrap();
    assert!(changes > 100, "{changes} changes");
    identical(&a, &b, &["public.items"], Duration::from_secs(60)).await;
    for d in [first, second] {
        assert_eq!(d.stop().await, Some(0));
    }
}

/// The planner's lock (on the first node) held by a session that went silent, as
/// one of an instance that lost the node: it is ended after `standby.takeover_ms`, and
/// the copy is planned and made.
#[tokio::test]
async fn a_silent_holder_of_the_plan_lock_is_ended() {
    let rig = Rig::new(DDL, &["public.items"], "[standby]\ntakeover_ms = 5000\n").await;
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    a.batch_execute(
        "INSERT INTO items (id, val, n) SELECT i, 'a', i FROM generate_series(1, 1000) i",
    )
    .await
    .unwrap();
    assert!(rig.command(&["setup"]).status.success());
    let holder = cl.client(&rig.db_a).await;
    holder
        .batch_execute(&format!(
            "SELECT pg_advisory_lock(hashtext('duplex snapshot plan'));
             SELECT pg_advisory_lock(hashtextextended('duplex {} snapshot plan', 0))",
            rig.slot_a()
        ))
        .await
        .unwrap();
    let d = rig.start();
    d.wait_log("applying direction=a_to_b", 1, Duration::from_secs(40))
        .await;
    assert_eq!(count(&b, "SELECT count(*) FROM items").await, 1000);
    assert!(holder.simple_query("SELECT 1").await.is_err());
    assert_eq!(d.stop().await, Some(0));
}
