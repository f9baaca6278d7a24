//! The random workload of the convergence tests and what checks it: a rig with four
//! tables and an apply log, a deterministic [`Rng`], concurrent writers on both
//! nodes, and the check that the nodes end identical with nothing applied twice.

use super::apply_log::{applied_twice, apply_log_ddl};
use super::duplex::{Daemon, Rig};
use super::pg::Cluster;
use super::tables::converge;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// Tables of four kinds: `items` (plain), `parent` and `child` (a foreign key) and
/// `users` (a UUID key with an identity on `email`).
const DDL: &str = "
CREATE TABLE items (id int PRIMARY KEY, val text, updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE parent (id int PRIMARY KEY, name text, updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE child (id int PRIMARY KEY, parent_id int NOT NULL REFERENCES parent(id), note text,
                    updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE users (id uuid PRIMARY KEY, email text NOT NULL, name text,
                    updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
";

const TABLES: &[&str] = &[
    "public.items",
    "public.parent",
    "public.child",
    "public.users",
];

/// [`rig_before_setup`], set up on both nodes.
pub async fn rig() -> Rig {
    let rig = rig_before_setup().await;
    assert!(rig.command(&["setup"]).status.success());
    rig
}

/// The tables, with an apply log, and a config for both directions; nothing set up on
/// the nodes yet.
pub async fn rig_before_setup() -> Rig {
    rig_before_setup_across(Cluster::shared(), Cluster::shared_b()).await
}

/// Like `rig_before_setup`, with both databases on `cluster`.
pub async fn rig_before_setup_on(cluster: &'static Cluster) -> Rig {
    rig_before_setup_across(cluster, cluster).await
}

/// Like `rig_before_setup`, node a's database on `a`, node b's on `b`.
pub async fn rig_before_setup_across(a: &'static Cluster, b: &'static Cluster) -> Rig {
    let ddl = format!("{DDL}{}", apply_log_ddl(&["items", "users"]));
    let rig = Rig::new_across(a, b, &ddl, TABLES, "").await;
    rig.edit_config(&[("\"a_to_b\"", "\"both\"")]);
    rig.add_identity("public.users", "users", &["email"]);
    rig
}

/// A small deterministic generator, so a failing run can be repeated.
pub struct Rng(pub u64);

impl Rng {
    /// The next number, below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Random writes on `node` until `until`; returns the row changes committed (each is
/// one event on the node's topic, with tombstones counted for deletes).
pub async fn workload(c: Client, node: u64, until: Instant) -> u64 {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (node + 1));
    let mut changes = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(4));
    let mut next_parent = node as i32 * 1_000_000;
    while Instant::now() < until {
        tick.tick().await;
        let k = rng.below(40) as i32;
        let n = match rng.below(10) {
            0..=3 => c
                .execute(
                    "INSERT INTO items (id, val) VALUES ($1, $2) ON CONFLICT (id)
                     DO UPDATE SET val = EXCLUDED.val, updated_at = clock_timestamp()",
                    &[&k, &format!("n{node}-{}", rng.below(1000))],
                )
                .await
                .unwrap(),
            4 | 5 => {
                2 * c
                    .execute("DELETE FROM items WHERE id = $1", &[&k])
                    .await
                    .unwrap()
            }
            6 | 7 => {
                next_parent += 1;
                c.batch_execute(&format!(
                    "BEGIN; INSERT INTO parent (id, name) VALUES ({p}, 'p');
                     INSERT INTO child (id, parent_id, note) VALUES ({p}, {p}, 'c1'), ({p} + 500000, {p}, 'c2'); COMMIT;",
                    p = next_parent
                ))
                .await
                .unwrap();
                3
            }
            8 => c
                .execute(
                    "UPDATE child SET note = $1, updated_at = clock_timestamp()
                     WHERE id = (SELECT min(id) FROM child WHERE id >= $2)",
                    &[&format!("edit{node}"), &(rng.below(2_000_000) as i32)],
                )
                .await
                .unwrap(),
            _ => c
                .execute(
                    "INSERT INTO users (email, name) VALUES ($1, $2) ON CONFLICT (id)
                     DO UPDATE SET name = EXCLUDED.name, updated_at = clock_timestamp()",
                    &[
                        &format!("user{}@example.com", rng.below(20)),
                        &format!("by {node}"),
                    ],
                )
                .await
                .unwrap(),
        };
        changes += n;
    }
    changes
}

/// Runs a [`workload`] on each node of `rig` for `secs`; returns the changes made on
/// a and on b.
pub async fn run_workloads(rig: &Rig, secs: u64) -> (u64, u64) {
    let until = Instant::now() + Duration::from_secs(secs);
    let wa = tokio::spawn(workload(rig.client_a().await, 0, until));
    let wb = tokio::spawn(workload(rig.client_b().await, 1, until));
    (wa.await.unwrap(), wb.await.unwrap())
}

/// Starts duplex and, once both directions apply, runs both nodes' workloads for
/// `secs`, each of which must make more than `at_least` changes; then checks the nodes
/// end identical with nothing applied twice. Returns the running daemon and the
/// changes made on a and on b.
pub async fn converges_under_workloads(
    rig: &Rig,
    secs: u64,
    at_least: u64,
) -> (Daemon, (u64, u64)) {
    let d = rig.start();
    // Changes only: a row copied at the first start and then replayed from the
    // topic would count as applied twice.
    d.wait_applying(2).await;
    let (changes_a, changes_b) = run_workloads(rig, secs).await;
    assert!(
        changes_a > at_least && changes_b > at_least,
        "workload too small: {changes_a}, {changes_b}"
    );
    assert_identical_and_applied_once(rig).await;
    (d, (changes_a, changes_b))
}

/// Waits until both nodes hold the same rows in every table of the rig, then checks
/// that neither applied a version twice (but repairs).
pub async fn assert_identical_and_applied_once(rig: &Rig) {
    let (a, b) = (rig.client_a().await, rig.client_b().await);
    converge(
        &a,
        &b,
        &["items", "parent", "child", "users"],
        Duration::from_secs(120),
    )
    .await;
    // A version may arrive twice only as a repair (the peer re-sending its winner).
    for (c, peer) in [(&a, &b), (&b, &a)] {
        assert_eq!(
            applied_twice(c, peer).await,
            0,
            "a version was applied twice"
        );
    }
}
