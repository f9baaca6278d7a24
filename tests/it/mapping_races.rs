//! Mapped tables under the application's races: a parent and its child made while
//! the initial copy runs, rows whose `updated_at` is NULL in the copy, the same
//! natural key signed up on both nodes within the replication lag, and a natural key
//! moved to another row and then reused. Each ends with both nodes equal through the
//! mapping, both directions running.

use crate::harness::count;
use crate::harness::duplex::{Daemon, Rig};
use crate::harness::mapping::{converged, pairs, rig};
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// Fails the test, with the daemon's log, if it has exited.
fn still_running(d: &mut Daemon, what: &str) {
    if let Some(status) = d.child.try_wait().unwrap() {
        panic!("duplex exited ({status}) {what}");
    }
}

/// (accounts chunks left, orders chunks left) of the legacy → modern copy, as
/// modern's plan says; `None` before it is planned.
async fn chunks_left(b: &Client) -> Option<(i64, i64)> {
    let r = b
        .query_one(
            "SELECT count(*) FILTER (WHERE table_name = 'public.accounts' AND copied_at IS NULL),
                    count(*) FILTER (WHERE table_name = 'public.orders' AND copied_at IS NULL),
                    count(*) FILTER (WHERE table_name = 'public.orders')
             FROM duplex.snapshot_chunks WHERE source_node = 'a'",
            &[],
        )
        .await
        .ok()?;
    let planned: i64 = r.get(2);
    (planned > 0).then(|| (r.get(0), r.get(1)))
}

/// The legacy application signs users up and places their first order while the
/// initial copy runs (one worker, small chunks, so the orders take a while): a user
/// made after the accounts were copied is paired on modern only on the stream, which
/// is applied after the copy, yet its order is in a chunk still to copy. The copy
/// takes the order's user along; both nodes converge, and the stream that follows
/// (the same rows again, then renames) changes nothing but the renames.
#[tokio::test]
async fn a_parent_and_child_made_during_the_mapped_copy_arrive() {
    let (rig, a, b) = rig("[snapshot]\nworkers = 1\nchunk_rows = 200\n").await;
    a.batch_execute(
        "INSERT INTO users (email, name, updated_at)
           SELECT 'user' || i || '@legacy', 'User ' || i, timestamp '2024-01-01' + i * interval '1 second'
           FROM generate_series(1, 2000) i;
         INSERT INTO orders (user_id, total_cents, status, note, updated_at)
           SELECT 1 + i % 2000, i, (ARRAY['P','S','C'])[1 + i % 3], 'note ' || i,
                  timestamp '2024-06-01' + i * interval '1 second'
           FROM generate_series(1, 30000) i;",
    )
    .await
    .unwrap();
    let mut d = rig.start();
    let deadline = Instant::now() + Duration::from_secs(120);
    // (made while the orders were being copied, made in all)
    let (mut during, mut made) = (0, 0);
    loop {
        still_running(&mut d, "during the copy");
        assert!(Instant::now() < deadline, "the copy did not end");
        let left = chunks_left(&b).await;
        if left.is_some_and(|(_, orders)| orders == 0) {
            break;
        }
        made += 1;
        let email = format!("during{made}@legacy");
        let id: i32 = a
            .query_one(
                "INSERT INTO users (email, name) VALUES ($1, 'new') RETURNING id",
                &[&email],
            )
            .await
            .unwrap()
            .get(0);
        a.execute(
            "INSERT INTO orders (user_id, total_cents, status, note) VALUES ($1, 995, 'P', 'first order')",
            &[&id],
        )
        .await
        .unwrap();
        if left.is_some_and(|(accounts, _)| accounts == 0) {
            during += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        during > 0,
        "no user and order made between the two levels ({made} made)"
    );
    d.wait_applying(2).await;
    a.batch_execute(
        "UPDATE users SET name = 'renamed', updated_at = clock_timestamp() AT TIME ZONE 'UTC'
         WHERE email LIKE 'during%'",
    )
    .await
    .unwrap();
    let (accounts, orders) = converged(&a, &b, Duration::from_secs(120)).await;
    assert_eq!(
        (accounts.len(), orders.len()),
        (2000 + made, 30_000 + made),
        "{made} users and orders made during the copy ({during} between the levels)"
    );
    assert_eq!(
        count(
            &b,
            "SELECT count(*) FROM accounts WHERE full_name = 'renamed'"
        )
        .await,
        made as i64
    );
    eprintln!("{made} users and orders made during the copy, {during} between the levels");
    assert_eq!(d.stop().await, Some(0));
}

/// Rows whose `updated_at` is NULL cannot be ordered by last-writer-wins, but the
/// initial copy still takes them where their key is missing (users, and orders of
/// such users); where the target has the key, a copy leaves its row (seen here with
/// `duplex snapshot` after modern changed one without replicating it: modern's
/// version stays, and it wins over legacy's NULL version on the way back).
#[tokio::test]
async fn rows_with_a_null_updated_at_are_copied_where_missing() {
    let (rig, a, b) = rig("").await;
    for (c, tables) in [(&a, ["users", "orders"]), (&b, ["accounts", "orders"])] {
        for t in tables {
            c.batch_execute(&format!(
                "ALTER TABLE {t} ALTER updated_at DROP NOT NULL, ALTER updated_at DROP DEFAULT"
            ))
            .await
            .unwrap();
        }
    }
    a.batch_execute(
        "INSERT INTO users (email, name, updated_at)
           SELECT 'u' || i || '@l', 'U' || i,
                  CASE WHEN i % 4 = 0 THEN NULL ELSE timestamp '2024-01-01' + i * interval '1 second' END
           FROM generate_series(1, 400) i;
         INSERT INTO orders (user_id, total_cents, status, updated_at)
           SELECT 1 + i % 400, i, 'S',
                  CASE WHEN i % 3 = 0 THEN NULL ELSE timestamp '2024-06-01' + i * interval '1 second' END
           FROM generate_series(1, 2000) i;",
    )
    .await
    .unwrap();
    let d = rig.start();
    d.wait_applying(2).await;
    let legacy = |sql: &'static str| {
        let a = &a;
        async move { count(a, sql).await }
    };
    for (sql_a, sql_b) in [
        (
            "SELECT count(*) FROM users WHERE updated_at IS NULL",
            "SELECT count(*) FROM accounts WHERE updated_at IS NULL",
        ),
        (
            "SELECT count(*) FROM users",
            "SELECT count(*) FROM accounts",
        ),
        (
            "SELECT count(*) FROM orders WHERE updated_at IS NULL",
            "SELECT count(*) FROM orders WHERE updated_at IS NULL",
        ),
        ("SELECT count(*) FROM orders", "SELECT count(*) FROM orders"),
    ] {
        let want = legacy(sql_a).await;
        assert!(want > 0, "{sql_a}");
        assert_eq!(count(&b, sql_b).await, want, "{sql_b}");
    }
    // Every modern row is its legacy row through the pairings.
    let users = pairs(&b, "public.accounts").await;
    let orders = pairs(&b, "public.orders").await;
    let legacy_orders = a
        .query(
            "SELECT o.id::text, o.user_id::text, o.total_cents, coalesce(o.updated_at::text, '-')
             FROM orders o",
            &[],
        )
        .await
        .unwrap();
    let modern_orders: std::collections::BTreeMap<String, (String, String, String)> = b
        .query(
            "SELECT id::text, account_id::text, total::text,
                    coalesce((updated_at AT TIME ZONE 'UTC')::text, '-') FROM orders",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect();
    for r in legacy_orders {
        let id: String = r.get(0);
        let m = &modern_orders[&orders[&id]];
        let total: i32 = r.get(2);
        assert_eq!(m.0, users[&r.get::<_, String>(1)], "order {id}");
        assert_eq!(
            m.1,
            format!("{}.{:02}", total / 100, total % 100),
            "order {id}"
        );
        assert_eq!(m.2, r.get::<_, String>(3), "order {id}");
    }
    assert_eq!(d.stop().await, Some(0));

    // Modern changes a user whose legacy version has no updated_at, without it
    // replicating (under an origin the readers take for duplex's own).
    for sql in [
        format!(
            "SELECT pg_replication_origin_create('{}_planted')",
            rig.prefix
        ),
        format!(
            "SELECT pg_replication_origin_session_setup('{}_planted')",
            rig.prefix
        ),
        "UPDATE accounts SET full_name = 'kept on modern', updated_at = now() WHERE email = 'u8@l'"
            .into(),
        "SELECT pg_replication_origin_session_reset()".into(),
    ] {
        b.batch_execute(&sql).await.unwrap();
    }
    let out = rig.command(&["snapshot", "--table", "public.accounts"]);
    assert!(
        out.status.success(),
        "{}",
        crate::harness::output_text(&out)
    );
    for (c, sql) in [
        (&b, "SELECT count(*) FROM accounts WHERE email = 'u8@l' AND full_name = 'kept on modern'"),
        (&a, "SELECT count(*) FROM users WHERE email = 'u8@l' AND name = 'kept on modern' AND updated_at IS NOT NULL"),
    ] {
        assert_eq!(count(c, sql).await, 1, "{sql}");
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
