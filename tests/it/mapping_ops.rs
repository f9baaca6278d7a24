//! Mapped tables under the operator's commands: `duplex verify` compares every mapped
//! column whatever the rows of a range hold, and `duplex dlq replay` applies a dead
//! letter through the mapping, as the stream does.

use crate::harness::mapping::{converged, pairs, rig};
use crate::harness::{count, output_text as text, wait_for};
use std::time::Duration;

/// A range whose first row cannot be mapped (its status is outside the value map)
/// still has its status compared on every later row.
#[tokio::test]
async fn an_unmappable_first_row_hides_no_column_of_its_range() {
    let (rig, a, b) = rig("").await;
    a.batch_execute(
        "INSERT INTO users (email, name) SELECT 'u' || i || '@l', 'U' || i FROM generate_series(1, 20) i;
         INSERT INTO orders (user_id, total_cents, status, note)
           SELECT 1 + i % 20, 100 * i, 'P', 'n' || i FROM generate_series(1, 50) i;",
    )
    .await
    .unwrap();
    let d = rig.start();
    d.wait_applying(2).await;
    converged(&a, &b, Duration::from_secs(60)).await;
    assert_eq!(d.stop().await, Some(0));
    // With duplex stopped: the first order's status leaves the map on legacy, and a
    // later order's status differs on modern.
    a.batch_execute("UPDATE orders SET status = 'Z' WHERE id = (SELECT min(id) FROM orders)")
        .await
        .unwrap();
    b.batch_execute("UPDATE orders SET status = 'shipped' WHERE note = 'n30'")
        .await
        .unwrap();
    let out = rig.command(&[
        "verify",
        "--json",
        "--settle-ms",
        "300",
        "--table",
        "public.orders",
    ]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (first, n30): (String, String) = {
        let r = a
            .query_one(
                "SELECT (SELECT min(id)::text FROM orders), (SELECT id::text FROM orders WHERE note = 'n30')",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    let found: Vec<(String, String, String)> = json["tables"][0]["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["key"][0].as_str().unwrap().to_string(),
                d["kind"].as_str().unwrap().to_string(),
                d["columns"].to_string(),
            )
        })
        .collect();
    let mut want = vec![
        (first, "mismatched".to_string(), "[\"status\"]".to_string()),
        (n30, "mismatched".to_string(), "[\"status\"]".to_string()),
    ];
    want.sort();
    let mut found = found;
    found.sort();
    assert_eq!(found, want, "{t}");
}

/// An event dead-lettered because modern refused it (a check constraint), replayed
/// after the fix: it arrives mapped (modern's table, columns, key and values), and
/// the dead letter is marked replayed.
#[tokio::test]
async fn a_mapped_dead_letter_replays_through_the_mapping() {
    let (rig, a, b) = rig("[snapshot]\nmode = \"never\"\n").await;
    rig.edit_config(&[(
        "linger_ms = 10",
        "linger_ms = 10\non_error = \"dead_letter\"",
    )]);
    b.batch_execute("ALTER TABLE orders ADD CONSTRAINT small_orders CHECK (total < 100)")
        .await
        .unwrap();
    assert!(rig.command(&["setup"]).status.success());
    let d = rig.start();
    d.wait_applying(2).await;
    a.batch_execute("INSERT INTO users (id, email, name) VALUES (1, 'p@l', 'P')")
        .await
        .unwrap();
    for (id, cents, note) in [
        (10, 500, "small"),
        (11, 25_000, "large"),
        (12, 700, "after"),
    ] {
        a.execute(
            "INSERT INTO orders (id, user_id, total_cents, status, note) VALUES ($1, 1, $2, 'S', $3)",
            &[&id, &cents, &note],
        )
        .await
        .unwrap();
    }
    wait_for(
        "the small orders on modern",
        Duration::from_secs(60),
        || {
            let b = &b;
            async move {
                (count(
                    b,
                    "SELECT count(*) FROM orders WHERE note IN ('small', 'after')",
                )
                .await
                    == 2)
                    .then_some(())
            }
        },
    )
    .await;
    wait_for("one dead letter", Duration::from_secs(60), || {
        let b = &b;
        async move { (count(b, "SELECT count(*) FROM duplex.dead_letters").await == 1).then_some(()) }
    })
    .await;
    assert_eq!(d.stop().await, Some(0));
    b.batch_execute("ALTER TABLE orders DROP CONSTRAINT small_orders")
        .await
        .unwrap();
    let out = rig.command(&["dlq", "replay"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("replayed 1, still failing 0"), "{t}");
    let order = pairs(&b, "public.orders").await["11"].clone();
    let account = pairs(&b, "public.accounts").await["1"].clone();
    let row = b
        .query_one(
            "SELECT account_id::text, total::text, status FROM orders WHERE id = $1::text::uuid",
            &[&order],
        )
        .await
        .unwrap();
    let got: (String, String, String) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(got, (account, "250.00".into(), "shipped".into()), "{t}");
    assert_eq!(
        count(
            &b,
            "SELECT count(*) FROM duplex.dead_letters WHERE replayed_at IS NOT NULL"
        )
        .await,
        1
    );
    // Running again, the nodes agree through the mapping, pairings included.
    let d = rig.start();
    d.wait_applying(2).await;
    converged(&a, &b, Duration::from_secs(60)).await;
    assert_eq!(d.stop().await, Some(0));
}
