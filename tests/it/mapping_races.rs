//! Mapped tables under the application's races: the same natural key signed up on
//! both nodes within the replication lag, and a natural key moved to another row and
//! then reused. Each ends with both nodes equal through the mapping, both directions
//! running.

use crate::harness::count;
use crate::harness::duplex::{Daemon, Rig};
use crate::mapping::{converged, rig};
use std::time::Duration;
use tokio_postgres::Client;

/// Fails the test, with the daemon's log, if it has exited.
fn still_running(d: &mut Daemon, what: &str) {
    if let Some(status) = d.child.try_wait().unwrap() {
        panic!("duplex exited ({status}) {what}");
    }
}

/// Both applications, for a while: `n` sign-ups of the same emails on legacy and on
/// modern at the same moment, each followed by an order placed on that node.
async fn sign_up_on_both(a: &Client, b: &Client, n: usize) {
    for i in 0..n {
        let email = format!("both{i}@example.com");
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&email];
        let (on_a, on_b) = tokio::join!(
            a.query_opt(
                "INSERT INTO users (email, name) VALUES ($1, 'legacy signup') RETURNING id",
                &params,
            ),
            b.query_opt(
                "INSERT INTO accounts (id, email, full_name) VALUES (gen_random_uuid(), $1, 'modern signup')
                 RETURNING id::text",
                &params,
            ),
        );
        // A sign-up that comes after the other node's has reached this one finds
        // the email taken, as the application would.
        if let Ok(Some(r)) = on_a {
            let id: i32 = r.get(0);
            a.execute(
                "INSERT INTO orders (user_id, total_cents, status, note) VALUES ($1, 100, 'P', 'legacy')",
                &[&id],
            )
            .await
            .unwrap();
        }
        if let Ok(Some(r)) = on_b {
            let id: String = r.get(0);
            b.execute(
                "INSERT INTO orders (id, account_id, total, status, note)
                 VALUES (gen_random_uuid(), $1::text::uuid, 2.5, 'pending', 'modern')",
                &[&id],
            )
            .await
            .unwrap();
        }
        if i % 5 == 4 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn started(extra: &str) -> (Rig, Daemon, Client, Client) {
    let (rig, a, b) = rig(&format!("[snapshot]\nmode = \"never\"\n{extra}")).await;
    let out = rig.command(&["setup"]);
    assert!(
        out.status.success(),
        "{}",
        crate::harness::output_text(&out)
    );
    let d = rig.start();
    d.wait_applying(2).await;
    (rig, d, a, b)
}

/// The same email signs up on legacy and on modern within the replication lag: the
/// legacy user reaches modern while modern's own row for that email is not paired
/// yet. It is that row, not a second one under the email's derived id (which the
/// unique email would refuse): the user is one entity on both nodes, under each
/// node's key, with both nodes' orders.
#[tokio::test]
async fn the_same_email_signed_up_on_both_nodes_within_the_lag_is_one_user() {
    let (_rig, mut d, a, b) = started("").await;
    sign_up_on_both(&a, &b, 30).await;
    still_running(&mut d, "after the sign-ups");
    let (accounts, orders) = converged(&a, &b, Duration::from_secs(60)).await;
    assert_eq!(accounts.len(), 30);
    let placed = count(&a, "SELECT count(*) FROM orders").await;
    assert_eq!(orders.len() as i64, placed);
    // Both nodes' orders hang off the one user per email.
    for (c, sql) in [
        (&a, "SELECT count(*) FROM (SELECT u.email FROM orders o JOIN users u ON u.id = o.user_id
                                    GROUP BY u.email HAVING count(DISTINCT o.note) = 2) x"),
        (&b, "SELECT count(*) FROM (SELECT u.email FROM orders o JOIN accounts u ON u.id = o.account_id
                                    GROUP BY u.email HAVING count(DISTINCT o.note) = 2) x"),
    ] {
        assert!(count(c, sql).await > 0, "{sql}");
    }
    still_running(&mut d, "after converging");
    assert_eq!(d.stop().await, Some(0));
}

/// A legacy user changes email and a new user then signs up with the old one (in
/// separate transactions, and in one): the new user's derived id is still the old
/// user's on modern, so it gets another, made from the email and its legacy id. Both
/// users and their orders converge, and so do modern's edits of them afterwards.
#[tokio::test]
async fn a_natural_key_moved_then_reused_gets_a_key_of_its_own() {
    let (_rig, mut d, a, b) = started("").await;
    let ns = duplex::identity::namespace("users");
    let derived = |values: &[(&str, &str)]| {
        let values: Vec<(&str, Option<&str>)> =
            values.iter().map(|(c, v)| (*c, Some(*v))).collect();
        duplex::identity::derive(&ns, &values).unwrap().to_string()
    };
    a.batch_execute(
        "INSERT INTO users (email, name) SELECT 'moved' || i || '@l', 'first' FROM generate_series(1, 10) i;
         INSERT INTO orders (user_id, total_cents, status) SELECT id, 100, 'P' FROM users;",
    )
    .await
    .unwrap();
    converged(&a, &b, Duration::from_secs(60)).await;
    for i in 1..=10 {
        let old = format!("moved{i}@l");
        let moves = format!(
            "UPDATE users SET email = 'other{i}@l', updated_at = clock_timestamp() AT TIME ZONE 'UTC'
             WHERE email = '{old}';"
        );
        let signs_up = format!(
            "INSERT INTO users (email, name) VALUES ('{old}', 'second');
             INSERT INTO orders (user_id, total_cents, status)
               SELECT id, 200, 'S' FROM users WHERE email = '{old}';"
        );
        if i % 2 == 0 {
            a.batch_execute(&format!("BEGIN; {moves} {signs_up} COMMIT"))
                .await
                .unwrap();
        } else {
            a.batch_execute(&moves).await.unwrap();
            a.batch_execute(&signs_up).await.unwrap();
        }
    }
    still_running(&mut d, "after the sign-ups");
    let (accounts, orders) = converged(&a, &b, Duration::from_secs(60)).await;
    assert_eq!((accounts.len(), orders.len()), (20, 20));
    for i in 1..=10 {
        let old = format!("moved{i}@l");
        let row = a
            .query_one("SELECT id::text FROM users WHERE email = $1", &[&old])
            .await
            .unwrap();
        let second: String = row.get(0);
        let row = b
            .query_one(
                "SELECT (SELECT id::text FROM accounts WHERE email = $1),
                        (SELECT id::text FROM accounts WHERE email = $2)",
                &[&format!("other{i}@l"), &old],
            )
            .await
            .unwrap();
        let (first_b, second_b): (String, String) = (row.get(0), row.get(1));
        assert_eq!(
            first_b,
            derived(&[("email", &old)]),
            "the first user keeps its id"
        );
        assert_eq!(
            second_b,
            derived(&[("email", &old), ("id", &second)]),
            "the second user's id is made from its email and legacy id"
        );
    }
    // Modern edits both users of each email and places an order for the second.
    b.batch_execute(
        "UPDATE accounts SET full_name = 'edited on modern', updated_at = clock_timestamp();
         INSERT INTO orders (id, account_id, total, status, note)
           SELECT gen_random_uuid(), id, 3, 'pending', 'modern' FROM accounts WHERE email LIKE 'moved%';",
    )
    .await
    .unwrap();
    let (accounts, orders) = converged(&a, &b, Duration::from_secs(60)).await;
    assert_eq!((accounts.len(), orders.len()), (20, 30));
    assert_eq!(
        count(
            &a,
            "SELECT count(*) FROM users WHERE name = 'edited on modern'"
        )
        .await,
        20
    );
    assert_eq!(
        count(
            &a,
            "SELECT count(*) FROM orders o JOIN users u ON u.id = o.user_id
             WHERE o.note = 'modern' AND u.name = 'edited on modern' AND u.email LIKE 'moved%'"
        )
        .await,
        10
    );
    still_running(&mut d, "after converging");
    assert_eq!(d.stop().await, Some(0));
}
