//! Mapped tables, beyond convergence: each mapping error class ends as a dead letter,
//! `duplex check` validates a mapping and explains it, `duplex verify` compares and
//! repairs through it, and a deleted row's key pairing goes with its tombstone.

use crate::harness::mapping::{converged, pairs, rig};
use crate::harness::wait_for;
use std::time::Duration;
use tokio_postgres::Client;

/// Each mapping error class ends in the dead-letter queue with its reason, and
/// nothing else is held up: a value outside the value map, a number the scale cannot
/// carry exactly, and a reference whose row is never paired (after
/// `sync.reference_wait_ms`).
#[tokio::test]
async fn mapping_errors_go_to_the_dead_letter_queue_and_nothing_else_stops() {
    let (rig, a, b) = rig("[snapshot]\nmode = \"never\"\n").await;
    rig.edit_config(&[(
        "linger_ms = 10",
        "linger_ms = 10\non_error = \"dead_letter\"\nreference_wait_ms = 1000",
    )]);
    b.batch_execute("ALTER TABLE orders ALTER total TYPE numeric(12,3)")
        .await
        .unwrap();
    assert!(rig.command(&["setup"]).status.success());
    let d = rig.start();
    d.wait_applying(2).await;
    b.batch_execute(
        "INSERT INTO accounts (id, email, full_name) VALUES ('00000000-0000-0000-0000-0000000000a1', 'm@x', 'M');
         INSERT INTO orders (id, account_id, total, status) VALUES
           ('00000000-0000-0000-0000-0000000000b1', '00000000-0000-0000-0000-0000000000a1', 1.5, 'pending');
         INSERT INTO orders (id, account_id, total, status) VALUES
           ('00000000-0000-0000-0000-0000000000b2', '00000000-0000-0000-0000-0000000000a1', 2, 'lost');
         INSERT INTO orders (id, account_id, total, status) VALUES
           ('00000000-0000-0000-0000-0000000000b3', '00000000-0000-0000-0000-0000000000a1', 1.005, 'shipped');
         SET session_replication_role = replica;
         INSERT INTO orders (id, account_id, total, status) VALUES
           ('00000000-0000-0000-0000-0000000000b4', '00000000-0000-0000-0000-0000000000ff', 3, 'pending');
         RESET session_replication_role;
         INSERT INTO orders (id, account_id, total, status) VALUES
           ('00000000-0000-0000-0000-0000000000b5', '00000000-0000-0000-0000-0000000000a1', 4.25, 'cancelled');",
    )
    .await
    .unwrap();
    // The good rows arrive, converted; the bad ones are dead letters with reasons.
    wait_for("the good orders on legacy", Duration::from_secs(60), || {
        let a = &a;
        async move {
            let rows = a
                .query(
                    "SELECT total_cents, status::text FROM orders ORDER BY total_cents",
                    &[],
                )
                .await
                .unwrap();
            let got: Vec<(i32, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            (got == [(150, "P".to_string()), (425, "C".to_string())]).then_some(())
        }
    })
    .await;
    let letters = wait_for("three dead letters", Duration::from_secs(60), || {
        let a = &a;
        async move {
            let rows = a
                .query(
                    "SELECT key, error FROM duplex.dead_letters ORDER BY key",
                    &[],
                )
                .await
                .unwrap();
            let l: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            (l.len() == 3).then_some(l)
        }
    })
    .await;
    let text = format!("{letters:?}");
    assert!(
        letters[0].0.contains("b2") && letters[0].1.contains("outside the value map"),
        "{text}"
    );
    assert!(
        letters[1].0.contains("b3") && letters[1].1.contains("not a whole number"),
        "{text}"
    );
    assert!(
        letters[2].0.contains("b4") && letters[2].1.contains("no row paired"),
        "{text}"
    );
    assert_eq!(d.stop().await, Some(0));
}

/// `duplex check` validates the mapping against both live schemas and `--explain`
/// prints what each side's row becomes.
#[tokio::test]
async fn check_validates_the_mapping_and_explains_a_row() {
    let (rig, a, b) = rig("[snapshot]\nmode = \"never\"\n").await;
    a.batch_execute(
        "INSERT INTO users (email, name) VALUES ('x@legacy', 'X');
         INSERT INTO orders (user_id, total_cents, status, note) SELECT id, 1999, 'S', 'n' FROM users;",
    )
    .await
    .unwrap();
    let out = rig.command(&["check"]);
    let t = crate::harness::output_text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    let out = rig.command(&["check", "--explain", "public.orders"]);
    let t = crate::harness::output_text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    for want in [
        "public.orders on a -> public.orders on b",
        "key id -> id",
        "UUIDv5(namespace, id)",
        "total_cents (integer) -> total (numeric(12,2)): x 10^-2",
        "P -> pending",
        "user_id (integer) -> account_id (uuid): the b key of public.accounts's row",
        "total=19.99",
        "updated_at (timestamp without time zone) -> updated_at (timestamp with time zone): the same instant, as UTC",
        "status=shipped",
        "a row new to a gets the next value of public.orders_id_seq",
    ] {
        assert!(t.contains(want), "{want:?} missing from:\n{t}");
    }
    // A modern column nothing feeds, NOT NULL without a default, is a problem; so is
    // a reference whose column type is not the referenced key's.
    b.batch_execute(
        "ALTER TABLE accounts ADD COLUMN tier text NOT NULL;
         ALTER TABLE orders DROP CONSTRAINT orders_account_id_fkey, ALTER account_id TYPE text;",
    )
    .await
    .unwrap();
    let out = rig.command(&["check"]);
    let t = crate::harness::output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("public.accounts.tier: NOT NULL without a default"),
        "{t}"
    );
    assert!(t.contains("public.orders.account_id: references public.accounts, whose key on node b is uuid, not text"), "{t}");
}

/// `duplex verify` compares a mapped pair through the mapping: equal after the copy;
/// a changed value, a row missing on each side are each found (keys on legacy's
/// side, but for a row only modern holds); `--repair` makes them equal again.
#[tokio::test]
async fn verify_compares_through_the_mapping_and_repairs() {
    let (rig, a, b) = rig("").await;
    a.batch_execute(
        "INSERT INTO users (email, name) SELECT 'u' || i || '@l', 'U' || i FROM generate_series(1, 200) i;
         INSERT INTO orders (user_id, total_cents, status, note)
           SELECT 1 + i % 200, i, 'P', 'n' || i FROM generate_series(1, 1000) i;",
    )
    .await
    .unwrap();
    let d = rig.start();
    d.wait_applying(2).await;
    converged(&a, &b, Duration::from_secs(60)).await;
    let verify = |extra: &[&str]| {
        let mut args = vec!["verify", "--json", "--settle-ms", "300"];
        args.extend_from_slice(extra);
        let out = rig.command(&args);
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        (out.status.code(), json, crate::harness::output_text(&out))
    };
    let (code, _, out) = verify(&[]);
    assert_eq!(code, Some(0), "{out}");
    // Writes on modern that do not replicate (under an origin duplex's readers take
    // for their own): order 5's total, order 6 gone, an account legacy never saw.
    for sql in [
        format!("SELECT pg_replication_origin_create('{}_planted')", rig.prefix),
        format!("SELECT pg_replication_origin_session_setup('{}_planted')", rig.prefix),
        "UPDATE orders SET total = total + 1 WHERE note = 'n5'".into(),
        "DELETE FROM orders WHERE note = 'n6'".into(),
        "INSERT INTO accounts (id, email, full_name) VALUES ('00000000-0000-0000-0000-00000000abcd', 'ghost@m', 'G')".into(),
        "SELECT pg_replication_origin_session_reset()".into(),
    ] {
        b.batch_execute(&sql).await.unwrap();
    }
    let (code, json, out) = verify(&[]);
    assert_eq!(code, Some(1), "{out}");
    let found: Vec<(String, String, String)> = json["tables"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| {
            let table = t["table"].as_str().unwrap().to_string();
            t["differences"].as_array().unwrap().iter().map(move |d| {
                (
                    table.clone(),
                    d["key"][0].as_str().unwrap().to_string(),
                    d["kind"].as_str().unwrap().to_string(),
                )
            })
        })
        .collect();
    let (o5, o6): (String, String) = {
        let r = a
            .query_one(
                "SELECT (SELECT id::text FROM orders WHERE note = 'n5'), (SELECT id::text FROM orders WHERE note = 'n6')",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    let mut want = vec![
        (
            "public.accounts".to_string(),
            "00000000-0000-0000-0000-00000000abcd".to_string(),
            "missing_on_a".to_string(),
        ),
        (
            "public.orders".to_string(),
            o5.clone(),
            "mismatched".to_string(),
        ),
        (
            "public.orders".to_string(),
            o6.clone(),
            "missing_on_b".to_string(),
        ),
    ];
    want.sort();
    let mut found = found;
    found.sort();
    assert_eq!(found, want, "{out}");
    let out = rig.command(&["verify", "--repair", "--settle-ms", "300"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        crate::harness::output_text(&out)
    );
    // The repaired rows reach the other node as the stream carries them.
    converged(&a, &b, Duration::from_secs(60)).await;
    assert_eq!(
        crate::harness::count(&a, "SELECT count(*) FROM users WHERE email = 'ghost@m'").await,
        1
    );
    assert_eq!(d.stop().await, Some(0));
}

async fn orders_pairs(c: &Client) -> Vec<String> {
    pairs(c, "public.orders").await.into_keys().collect()
}

/// A deleted row's pairing outlives it as long as its tombstone (a late change of
/// the key must find both), then maintenance removes it on both nodes; a live row's
/// pairing stays.
#[tokio::test]
async fn a_deleted_rows_pairing_goes_with_its_tombstone() {
    let (rig, a, b) = rig("[snapshot]\nmode = \"never\"\n").await;
    assert!(rig.command(&["setup"]).status.success());
    let d = rig.start();
    d.wait_applying(2).await;
    a.batch_execute(
        "INSERT INTO users (id, email, name) VALUES (1, 'p@l', 'P');
         INSERT INTO orders (id, user_id, total_cents, status) VALUES (10, 1, 100, 'P'), (11, 1, 200, 'S');",
    )
    .await
    .unwrap();
    converged(&a, &b, Duration::from_secs(60)).await;
    a.batch_execute("DELETE FROM orders WHERE id = 10")
        .await
        .unwrap();
    // Later changes on both sides carry each direction's applied time past the delete.
    a.batch_execute("INSERT INTO users (id, email, name) VALUES (2, 'q@l', 'Q')")
        .await
        .unwrap();
    b.batch_execute(
        "UPDATE accounts SET full_name = 'P2', updated_at = clock_timestamp() WHERE email = 'p@l'",
    )
    .await
    .unwrap();
    converged(&a, &b, Duration::from_secs(60)).await;
    assert_eq!(orders_pairs(&a).await, ["10", "11"]);
    assert_eq!(orders_pairs(&b).await, ["10", "11"]);
    assert_eq!(d.stop().await, Some(0));
    // With no retention, the start's maintenance prunes the tombstone, then the
    // pairing, on each node: each direction has applied a commit later than the
    // delete. (Any retention at all could be longer than the time between the
    // delete and the later commits, which on a fast machine is under a millisecond.)
    rig.edit_config(&[(
        "linger_ms = 10",
        "linger_ms = 10\ntombstone_retention_ms = 0",
    )]);
    let d = rig.start();
    d.wait_applying(2).await;
    for c in [&a, &b] {
        wait_for(
            "the deleted order's pairing to go",
            Duration::from_secs(60),
            || async move { (orders_pairs(c).await == ["11"]).then_some(()) },
        )
        .await;
    }
    assert_eq!(d.stop().await, Some(0));
}
