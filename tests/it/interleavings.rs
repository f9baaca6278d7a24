//! Convergence under the interleavings real applications produce: `updated_at` stamped
//! by the client's clock before the statement (as ORMs do) or by `now()` (the
//! transaction's start), transactions held open for a few milliseconds, several
//! statements per transaction, deletes and re-inserts of the same keys, several
//! writers per node, on a small shared key space. Such versions often arrive at a node
//! that already holds a newer one, and local writes often land older than what duplex
//! applied: both nodes must still end identical, with nothing applied twice except
//! the winners re-sent as repairs.

use crate::harness::apply_log::{applied_twice, apply_log_ddl};
use crate::harness::count;
use crate::harness::duplex::{Daemon, Rig};
use crate::harness::pg::Cluster;
use crate::harness::tables::converge;
use crate::harness::workload::Rng;
use std::time::{Duration, Instant, SystemTime};
use tokio_postgres::Client;

const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, val text, n int NOT NULL DEFAULT 0, updated_at timestamptz NOT NULL);";

/// Keys shared by every writer of both nodes.
const KEYS: u64 = 24;
/// Writers per node.
const WRITERS: u64 = 4;

/// What the writers of one run did.
#[derive(Default, Debug)]
struct Tally {
    committed: u64,
    /// Application transactions that failed (deadlock with a peer writer or with
    /// duplex, unique violation of a concurrent insert) and were rolled back.
    failed: u64,
}

/// One application transaction on `k` (and sometimes a second key), stamped as an ORM
/// would, held open a few milliseconds.
async fn transaction(c: &Client, rng: &mut Rng, tag: &str) -> Result<(), tokio_postgres::Error> {
    let k = rng.below(KEYS) as i32;
    // Most transactions are short; some stay open longer than a change takes to
    // reach the peer, so versions cross while they are open.
    let hold = Duration::from_millis(match rng.below(10) {
        0..=6 => rng.below(6),
        _ => 20 + rng.below(60),
    });
    // The client's clock, read before the statement is sent.
    let stamped = SystemTime::now();
    c.batch_execute("BEGIN").await?;
    match rng.below(8) {
        0..=2 => {
            tokio::time::sleep(hold).await;
            c.execute(
                "INSERT INTO items (id, val, updated_at) VALUES ($1, $2, $3)
                 ON CONFLICT (id) DO UPDATE SET val = EXCLUDED.val, n = items.n + 1,
                 updated_at = EXCLUDED.updated_at",
                &[&k, &tag, &stamped],
            )
            .await?;
        }
        3 | 4 => {
            // now(): the transaction's start, older than anything committed meanwhile.
            // Another key: two writes of one key in one transaction would carry the
            // same version, which the applied-twice check could not tell apart.
            let k2 = ((k as u64 + 1 + rng.below(KEYS - 1)) % KEYS) as i32;
            c.execute(
                "UPDATE items SET val = $2, n = n + 1, updated_at = now() WHERE id = $1",
                &[&k, &tag],
            )
            .await?;
            tokio::time::sleep(hold).await;
            c.execute(
                "INSERT INTO items (id, val, updated_at) VALUES ($1, $2, now())
                 ON CONFLICT (id) DO UPDATE SET val = EXCLUDED.val, updated_at = now()",
                &[&k2, &tag],
            )
            .await?;
        }
        5 | 6 => {
            c.execute("DELETE FROM items WHERE id = $1", &[&k]).await?;
            tokio::time::sleep(hold).await;
        }
        _ => {
            // Delete and re-insert the same key in one transaction.
            c.execute("DELETE FROM items WHERE id = $1", &[&k]).await?;
            tokio::time::sleep(hold).await;
            c.execute(
                "INSERT INTO items (id, val, updated_at) VALUES ($1, $2, $3)",
                &[&k, &format!("re-{tag}"), &SystemTime::now()],
            )
            .await?;
        }
    }
    c.batch_execute("COMMIT").await
}

/// One writer: transactions back to back until `until`.
async fn writer(c: Client, seed: u64, tag: String, until: Instant) -> Tally {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ seed.wrapping_mul(0x2545_f491_4f6c_dd1d));
    let mut tally = Tally::default();
    while Instant::now() < until {
        match transaction(&c, &mut rng, &tag).await {
            Ok(()) => tally.committed += 1,
            Err(e) => {
                // What an application does: roll back, count, go on.
                assert!(e.code().is_some(), "writer lost its connection: {e}");
                c.batch_execute("ROLLBACK").await.unwrap();
                tally.failed += 1;
            }
        }
    }
    tally
}

/// Runs `WRITERS` writers on each node for `secs`, with `seed` varying the run.
async fn run_writers(dbs: [(&'static Cluster, String); 2], secs: u64, seed: u64) -> Tally {
    let until = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for (n, (cl, db)) in dbs.iter().enumerate() {
        for w in 0..WRITERS {
            let c = cl.client(db).await;
            let tag = format!("{}{w}", ["a", "b"][n]);
            let seed = seed * 100 + n as u64 * 10 + w;
            tasks.push(tokio::spawn(writer(c, seed, tag, until)));
        }
    }
    let mut total = Tally::default();
    for t in tasks {
        let t = t.await.unwrap();
        total.committed += t.committed;
        total.failed += t.failed;
    }
    total
}

async fn rig() -> Rig {
    let ddl = format!("{ITEMS}{}", apply_log_ddl(&["items"]));
    let rig = Rig::both(&ddl, &["public.items"], "").await;
    assert!(rig.command(&["setup"]).status.success());
    rig
}

/// Waits for both nodes to hold the same rows, and checks nothing was applied twice
/// but repairs. Returns (conflicts, repairs) recorded on both nodes.
async fn assert_converged(rig: &Rig, d: &Daemon) -> (i64, i64) {
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    let checked = tokio::spawn({
        let (db_a, db_b) = (rig.db_a.clone(), rig.db_b.clone());
        let (cl_a, cl_b) = (rig.cluster, rig.cluster_b);
        async move {
            let (a, b) = (cl_a.client(&db_a).await, cl_b.client(&db_b).await);
            converge(&a, &b, &["items"], Duration::from_secs(120)).await
        }
    })
    .await;
    if checked.is_err() {
        for (name, c) in [("a", &a), ("b", &b)] {
            for r in c
                .query(
                    "SELECT 'row', row_to_json(r)::text FROM items r
                     UNION ALL SELECT 'tombstone', row_to_json(t)::text FROM duplex.tombstones t
                     UNION ALL SELECT 'repair', row_to_json(p)::text FROM duplex.repairs p
                     UNION ALL SELECT 'conflict', row_to_json(f)::text FROM duplex.conflicts f",
                    &[],
                )
                .await
                .unwrap()
            {
                eprintln!("{name} {} {}", r.get::<_, &str>(0), r.get::<_, String>(1));
            }
        }
        for line in d.logs().lines().filter(|l| !l.contains(" INFO ")) {
            eprintln!("log {line}");
        }
        panic!("a and b did not converge; their state and duplex's warnings are above");
    }
    assert_eq!(applied_twice(&a, &b).await, 0, "applied twice on a");
    assert_eq!(applied_twice(&b, &a).await, 0, "applied twice on b");
    let mut totals = (0, 0);
    for c in [&a, &b] {
        totals.0 += count(c, "SELECT count(*) FROM duplex.conflicts").await;
        totals.1 += count(c, "SELECT count(*) FROM duplex.repairs").await;
    }
    totals
}

/// One run of the ORM-style workload against a running duplex, killed with SIGKILL
/// at random moments if `kill`; returns what the writers did and the conflicts and
/// repairs it caused.
async fn one_run(secs: u64, seed: u64, kill: bool) -> (Tally, (i64, i64)) {
    let rig = rig().await;
    // The first start's copy is done before the writers start: a row copied and then
    // replayed from the topic would count as applied twice.
    let first = rig.start();
    first.wait_applying(2).await;
    let writers = tokio::spawn(run_writers(
        [
            (rig.cluster, rig.db_a.clone()),
            (rig.cluster_b, rig.db_b.clone()),
        ],
        secs,
        seed,
    ));
    let mut rng = Rng(seed + 7);
    let d = if kill {
        tokio::time::sleep(Duration::from_millis(500 + rng.below(2000))).await;
        first.kill9();
        while !writers.is_finished() {
            let d = rig.start();
            tokio::time::sleep(Duration::from_millis(500 + rng.below(2000))).await;
            d.kill9();
        }
        rig.start()
    } else {
        first
    };
    let tally = writers.await.unwrap();
    let resolved = assert_converged(&rig, &d).await;
    let deadlocks = d.logs().matches("deadlock detected").count();
    eprintln!("deadlocks between apply and the writers (last daemon): {deadlocks}");
    assert_eq!(d.stop().await, Some(0));
    (tally, resolved)
}

/// Waits until `sql` returns `want` on `c`.
async fn wait_value(c: &Client, sql: &str, want: i64) {
    crate::harness::wait_for(
        &format!("{sql} = {want}"),
        Duration::from_secs(30),
        || async { (count(c, sql).await == want).then_some(()) },
    )
    .await
}

#[tokio::test]
async fn a_local_write_older_than_what_was_applied_is_repaired_by_the_peer() {
    let rig = rig().await;
    let d = rig.start();
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    // Key 1 is deleted on a after b has it; key 2 is updated on a.
    a.batch_execute(
        "INSERT INTO items (id, val, updated_at) VALUES (1, 'a', now()), (2, 'a', now())",
    )
    .await
    .unwrap();
    wait_value(&b, "SELECT count(*) FROM items", 2).await;
    a.batch_execute("DELETE FROM items WHERE id = 1; UPDATE items SET val = 'a2', updated_at = now() WHERE id = 2")
        .await
        .unwrap();
    wait_value(
        &b,
        "SELECT count(*) FROM items WHERE val = 'a2' AND NOT EXISTS (SELECT FROM items WHERE id = 1)",
        1,
    )
    .await;
    // b's application writes versions stamped a minute ago (a slow client's clock): they
    // land on b, older than what b holds from a, and reach a, which keeps its own.
    b.batch_execute(
        "INSERT INTO items (id, val, updated_at) VALUES (1, 'late', now() - interval '1 minute');
         UPDATE items SET val = 'late', updated_at = now() - interval '1 minute' WHERE id = 2",
    )
    .await
    .unwrap();
    // a re-sends its winners; b converges on them.
    converge(&a, &b, &["items"], Duration::from_secs(30)).await;
    assert_eq!(
        count(&b, "SELECT count(*) FROM items WHERE val = 'late'").await,
        0
    );
    assert_eq!(count(&a, "SELECT count(*) FROM duplex.repairs").await, 2);
    assert_eq!(count(&b, "SELECT count(*) FROM duplex.repairs").await, 0);
    assert_eq!(d.stop().await, Some(0));
}

#[tokio::test]
async fn orm_stamped_writes_on_both_nodes_converge() {
    let (tally, (conflicts, repairs)) = one_run(30, 1, false).await;
    eprintln!("{tally:?}; conflicts {conflicts}, repairs {repairs}");
    assert!(tally.committed > 1000, "workload too small: {tally:?}");
    assert!(conflicts > 0, "the workload provoked no conflict");
}

#[tokio::test]
async fn orm_stamped_writes_converge_with_duplex_killed_at_random_moments() {
    let (tally, (conflicts, repairs)) = one_run(25, 2, true).await;
    eprintln!("{tally:?}; conflicts {conflicts}, repairs {repairs}");
    assert!(tally.committed > 500, "workload too small: {tally:?}");
}

/// The convergence loop: `DUPLEX_LOOP_RUNS` runs (default 20) of 30 s each, every one
/// on fresh databases and with another seed; with `DUPLEX_LOOP_KILL=1` duplex is also
/// killed with SIGKILL at random moments. Run it with
/// `cargo test --test it interleavings::loop_ -- --ignored --nocapture`.
#[tokio::test]
#[ignore]
async fn loop_orm_stamped_writes_converge_every_run() {
    let runs: u64 = std::env::var("DUPLEX_LOOP_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let kill = std::env::var("DUPLEX_LOOP_KILL").is_ok_and(|v| v == "1");
    for run in 0..runs {
        let started = Instant::now();
        let (tally, (conflicts, repairs)) = one_run(30, 1000 + run, kill).await;
        eprintln!(
            "run {}/{runs} (kill: {kill}): converged {:?} after start; {tally:?}; conflicts {conflicts}, repairs {repairs}",
            run + 1,
            started.elapsed()
        );
    }
}
