//! Mapped tables: the legacy integer-key schema (node a) and its modern UUID schema
//! (node b) kept in sync both ways through the mapping, with foreign keys following.
//! After concurrent writes on both sides, every legacy row has exactly its modern
//! counterpart through the mapping and vice versa, every reference resolves, and the
//! key pairings are the same on both nodes.

use crate::harness::duplex::Rig;
use crate::harness::mapping::{converged, rig};
use crate::harness::pg::Cluster;
use crate::harness::wait_for;
use crate::harness::workload::Rng;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

const STATUSES: [&str; 3] = ["P", "S", "C"];
const MODERN_STATUSES: [&str; 3] = ["pending", "shipped", "cancelled"];

/// Legacy application: new users and orders, updates, deletes of orders, orders
/// referencing users born on either side, users deleted and made again with the
/// same email.
async fn legacy_app(c: Client, seed: u64, until: Instant) -> u64 {
    let mut rng = Rng(seed);
    let mut n = 0;
    while Instant::now() < until {
        let r = rng.below(10);
        let res = match r {
            0 | 1 => c
                .execute(
                    "INSERT INTO users (email, name) VALUES ($1, $2)",
                    &[&format!("l{seed}-{}@example.com", rng.below(1_000_000)), &format!("L {}", rng.below(100))],
                )
                .await,
            2..=4 => c
                .execute(
                    "INSERT INTO orders (user_id, total_cents, status, note)
                     SELECT id, $1, $2, 'from legacy' FROM users
                     WHERE email NOT LIKE '%churn%' AND email LIKE $3 ORDER BY random() LIMIT 1",
                    &[
                        &(rng.below(100_000) as i32),
                        &STATUSES[rng.below(3) as usize],
                        // Half of them for users born on modern.
                        &["m%", "%"][rng.below(2) as usize],
                    ],
                )
                .await,
            5..=7 => c
                .execute(
                    "UPDATE orders SET total_cents = total_cents + 1, status = $1,
                            updated_at = clock_timestamp() AT TIME ZONE 'UTC'
                     WHERE id = (SELECT id FROM orders ORDER BY random() LIMIT 1)",
                    &[&STATUSES[rng.below(3) as usize]],
                )
                .await,
            8 if rng.below(2) == 0 => c
                .execute(
                    "UPDATE users SET name = $1, updated_at = clock_timestamp() AT TIME ZONE 'UTC'
                     WHERE id = (SELECT id FROM users WHERE email NOT LIKE '%churn%' ORDER BY random() LIMIT 1)",
                    &[&format!("L renamed {}", rng.below(100))],
                )
                .await,
            // A user deleted and signed up again with the same email. Only this
            // node touches these: an update of the old row on the other node, newer
            // than the delete, would bring it back beside the new one under
            // last-writer-wins, and the unique email would refuse one of them.
            8 => c
                .batch_execute(&format!(
                    "BEGIN; DELETE FROM users WHERE email = 'lchurn{seed}-{k}@example.com';
                     INSERT INTO users (email, name) VALUES ('lchurn{seed}-{k}@example.com', 'again'); COMMIT",
                    k = rng.below(5)
                ))
                .await
                .map(|_| 2),
            _ => c
                .execute(
                    "DELETE FROM orders WHERE id = (SELECT id FROM orders ORDER BY random() LIMIT 1)",
                    &[],
                )
                .await,
        };
        // Unique emails and races with replicated deletes may refuse a write, as
        // they would refuse the application's.
        n += res.unwrap_or(0);
    }
    n
}

/// Modern application: random UUIDs, as new code would make them.
async fn modern_app(c: Client, seed: u64, until: Instant) -> u64 {
    let mut rng = Rng(seed);
    let mut n = 0;
    while Instant::now() < until {
        let r = rng.below(10);
        let res = match r {
            0 | 1 => c
                .execute(
                    "INSERT INTO accounts (id, email, full_name) VALUES (gen_random_uuid(), $1, $2)",
                    &[&format!("m{seed}-{}@example.com", rng.below(1_000_000)), &format!("M {}", rng.below(100))],
                )
                .await,
            2..=4 => c
                .execute(
                    "INSERT INTO orders (id, account_id, total, status, note)
                     SELECT gen_random_uuid(), id, $1::int8 / 100.0, $2, 'from modern'
                     FROM accounts WHERE email NOT LIKE '%churn%' AND email LIKE $3
                     ORDER BY random() LIMIT 1",
                    &[
                        &(rng.below(100_000) as i64),
                        &MODERN_STATUSES[rng.below(3) as usize],
                        // Half of them for users born on legacy.
                        &["l%", "%"][rng.below(2) as usize],
                    ],
                )
                .await,
            5..=7 => c
                .execute(
                    "UPDATE orders SET total = total + 0.01, status = $1, updated_at = clock_timestamp()
                     WHERE id = (SELECT id FROM orders ORDER BY random() LIMIT 1)",
                    &[&MODERN_STATUSES[rng.below(3) as usize]],
                )
                .await,
            8 if rng.below(2) == 0 => c
                .execute(
                    "UPDATE accounts SET full_name = $1, updated_at = clock_timestamp()
                     WHERE id = (SELECT id FROM accounts WHERE email NOT LIKE '%churn%' ORDER BY random() LIMIT 1)",
                    &[&format!("M renamed {}", rng.below(100))],
                )
                .await,
            // An account deleted and made again with the same email, under a new id.
            8 => c
                .batch_execute(&format!(
                    "BEGIN; DELETE FROM accounts WHERE email = 'mchurn{seed}-{k}@example.com';
                     INSERT INTO accounts (id, email, full_name)
                       VALUES (gen_random_uuid(), 'mchurn{seed}-{k}@example.com', 'again'); COMMIT",
                    k = rng.below(5)
                ))
                .await
                .map(|_| 2),
            _ => c
                .execute(
                    "DELETE FROM orders WHERE id = (SELECT id FROM orders ORDER BY random() LIMIT 1)",
                    &[],
                )
                .await,
        };
        n += res.unwrap_or(0);
    }
    n
}

#[tokio::test]
async fn legacy_and_modern_stay_equal_through_the_mapping_under_concurrent_writes() {
    let (rig, a, b) = rig("[snapshot]\nmode = \"never\"\n").await;
    let out = rig.command(&["setup"]);
    assert!(
        out.status.success(),
        "{}",
        crate::harness::output_text(&out)
    );
    let d = rig.start();
    d.wait_applying(2).await;
    // A user and an order on each side first, so both applications have parents.
    a.batch_execute(
        "INSERT INTO users (email, name) VALUES ('first@legacy', 'First');
         INSERT INTO orders (user_id, total_cents, status) SELECT id, 1234, 'P' FROM users",
    )
    .await
    .unwrap();
    b.batch_execute(
        "INSERT INTO accounts (id, email, full_name) VALUES (gen_random_uuid(), 'first@modern', 'Modern');",
    )
    .await
    .unwrap();
    wait_for("the first rows to cross", Duration::from_secs(60), || {
        let (a, b) = (&a, &b);
        async move {
            let on_a = crate::harness::count(a, "SELECT count(*) FROM users").await;
            let on_b = crate::harness::count(b, "SELECT count(*) FROM accounts").await;
            (on_a == 2 && on_b == 2).then_some(())
        }
    })
    .await;
    // The legacy-born user's modern id is derived from its email.
    let derived = duplex::identity::derive(
        &duplex::identity::namespace("users"),
        &[("email", Some("first@legacy"))],
    )
    .unwrap();
    let id: String = b
        .query_one(
            "SELECT id::text FROM accounts WHERE email = 'first@legacy'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(id, derived.to_string());
    let until = Instant::now() + Duration::from_secs(20);
    let cl = Cluster::shared();
    let mut apps = Vec::new();
    for seed in 1..=2 {
        apps.push(tokio::spawn(legacy_app(
            cl.client(&rig.db_a).await,
            seed,
            until,
        )));
        apps.push(tokio::spawn(modern_app(
            rig.client_b().await,
            seed + 10,
            until,
        )));
    }
    let mut writes = 0;
    for app in apps {
        writes += app.await.unwrap();
    }
    let (accounts, orders) = converged(&a, &b, Duration::from_secs(120)).await;
    eprintln!(
        "{writes} writes; converged with {} accounts and {} orders",
        accounts.len(),
        orders.len()
    );
    // Both applications wrote orders, and each referenced users born on the other.
    for (c, sql) in [
        (
            &a,
            "SELECT count(*) FROM orders o JOIN users u ON u.id = o.user_id
              WHERE o.note = 'from modern' AND u.email LIKE 'l%'",
        ),
        (
            &b,
            "SELECT count(*) FROM orders o JOIN accounts u ON u.id = o.account_id
              WHERE o.note = 'from legacy' AND u.email LIKE 'm%'",
        ),
    ] {
        assert!(crate::harness::count(c, sql).await > 0, "{sql}");
    }
    assert!(
        accounts.len() > 20 && orders.len() > 20,
        "{writes} writes, {} accounts, {} orders",
        accounts.len(),
        orders.len()
    );
    assert_eq!(d.stop().await, Some(0));
}

/// Runs two legacy and two modern application writers until `until`.
async fn applications(rig: &Rig, until: Instant, seed: u64) -> tokio::task::JoinSet<u64> {
    let cl = Cluster::shared();
    let mut apps = tokio::task::JoinSet::new();
    for s in 1..=2 {
        apps.spawn(legacy_app(cl.client(&rig.db_a).await, seed + s, until));
        apps.spawn(modern_app(rig.client_b().await, seed + s + 10, until));
    }
    apps
}

/// The reference case: 10,000 users and 50,000 orders on legacy, modern empty. The
/// first start copies them through the mapping; then both applications write for
/// 30 s while duplex is killed with SIGKILL twice and restarted; once they stop,
/// both nodes hold the same rows through the mapping, with the same pairings.
#[tokio::test]
async fn the_reference_case_copies_then_converges_through_kills() {
    let (rig, a, b) = rig("").await;
    a.batch_execute(
        "INSERT INTO users (email, name, created_at, updated_at)
           SELECT 'user' || i || '@legacy', 'User ' || i,
                  timestamp '2020-01-01' + i * interval '1 minute', timestamp '2024-01-01' + i * interval '1 second'
           FROM generate_series(1, 10000) i;
         INSERT INTO orders (user_id, total_cents, status, note, updated_at)
           SELECT 1 + i % 10000, i * 7, (ARRAY['P','S','C'])[1 + i % 3], CASE WHEN i % 5 = 0 THEN NULL ELSE 'note ' || i END,
                  timestamp '2024-06-01' + i * interval '1 second'
           FROM generate_series(1, 50000) i;",
    )
    .await
    .unwrap();
    let d = rig.start();
    d.wait_applying(2).await;
    let (accounts, orders) = converged(&a, &b, Duration::from_secs(180)).await;
    assert_eq!((accounts.len(), orders.len()), (10_000, 50_000));
    // Every legacy-born order's modern id is UUIDv5(orders, legacy id).
    let ns = duplex::identity::namespace("orders");
    let id: String = b
        .query_one(
            "SELECT o.id::text FROM orders o WHERE o.note = 'note 4242'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        id,
        duplex::identity::derive(&ns, &[("id", Some("4242"))])
            .unwrap()
            .to_string()
    );

    let until = Instant::now() + Duration::from_secs(30);
    let mut apps = applications(&rig, until, 100).await;
    let mut d = Some(d);
    for pause in [8, 8] {
        tokio::time::sleep(Duration::from_secs(pause)).await;
        d.take().unwrap().kill9();
        d = Some(rig.start());
    }
    let mut writes = 0;
    while let Some(n) = apps.join_next().await {
        writes += n.unwrap();
    }
    let (accounts, orders) = converged(&a, &b, Duration::from_secs(180)).await;
    eprintln!(
        "{writes} writes; converged with {} accounts and {} orders",
        accounts.len(),
        orders.len()
    );
    // Every reference resolves on both nodes.
    for (c, sql) in [
        (&a, "SELECT count(*) FROM orders o WHERE NOT EXISTS (SELECT 1 FROM users u WHERE u.id = o.user_id)"),
        (&b, "SELECT count(*) FROM orders o WHERE NOT EXISTS (SELECT 1 FROM accounts u WHERE u.id = o.account_id)"),
    ] {
        assert_eq!(crate::harness::count(c, sql).await, 0, "{sql}");
    }
    // verify, through the mapping, agrees.
    let out = rig.command(&["verify", "--settle-ms", "500"]);
    let t = crate::harness::output_text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(t.contains("verify: equal"), "{t}");
    assert_eq!(d.unwrap().stop().await, Some(0));
}
