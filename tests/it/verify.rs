//! `duplex verify`: planted differences are each found and nothing else is reported;
//! changes in flight during a live workload are not reported.

use crate::harness::duplex::Rig;
use crate::harness::output_text as text;
use crate::harness::pg::Cluster;
use std::time::{Duration, Instant};

const DDL: &str = "
CREATE TABLE items (id int PRIMARY KEY, val text, amount numeric, doc jsonb,
                    updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE parent (id int PRIMARY KEY, updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent(id),
                    updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
";

/// The same 20,000 items, parents and children on both nodes, with one timestamp.
const ROWS: &str = "
INSERT INTO items (id, val, amount, doc, updated_at)
  SELECT i, 'v' || i, i / 4.0, jsonb_build_object('a', i, 'b', 'x'), '2026-01-01 00:00:00+00' FROM generate_series(1, 20000) i;
INSERT INTO parent (id, updated_at) SELECT i, '2026-01-01 00:00:00+00' FROM generate_series(1, 100) i;
INSERT INTO child (id, parent_id, updated_at) SELECT i, 1 + i % 100, '2026-01-01 00:00:00+00' FROM generate_series(1, 1000) i;
";

fn verify_json(rig: &Rig, extra: &[&str]) -> (Option<i32>, serde_json::Value, String) {
    let mut args = vec!["verify", "--json", "--settle-ms", "500"];
    args.extend_from_slice(extra);
    let out = rig.command(&args);
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.code(), json, text(&out))
}

#[tokio::test]
async fn planted_differences_are_each_found_and_nothing_else() {
    let rig = Rig::both(
        DDL,
        &["public.items", "public.parent", "public.child"],
        "[snapshot]\nmode = \"never\"\n",
    )
    .await;
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    a.batch_execute(ROWS).await.unwrap();
    b.batch_execute(ROWS).await.unwrap();
    let (code, _, out) = verify_json(&rig, &[]);
    assert_eq!(code, Some(0), "{out}");
    a.batch_execute(
        "DELETE FROM items WHERE id = 10;
         UPDATE items SET val = NULL WHERE id = 40;
         UPDATE items SET amount = 1.0 WHERE id = 50;
         UPDATE items SET doc = '{\"a\": 1, \"b\": 2}' WHERE id = 60;",
    )
    .await
    .unwrap();
    b.batch_execute(
        "DELETE FROM items WHERE id = 20;
         UPDATE items SET val = 'changed' WHERE id = 30;
         UPDATE items SET val = '' WHERE id = 40;
         UPDATE items SET amount = 1.00 WHERE id = 50;
         UPDATE items SET doc = '{\"b\": 2, \"a\": 1}' WHERE id = 60;
         SET session_replication_role = replica;
         INSERT INTO child (id, parent_id) VALUES (5000, 999);
         RESET session_replication_role;",
    )
    .await
    .unwrap();
    let (code, json, out) = verify_json(&rig, &[]);
    assert_eq!(code, Some(1), "{out}");
    let items = json["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == "public.items")
        .unwrap();
    let found: Vec<(String, String, Vec<String>)> = items["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["key"][0].as_str().unwrap().to_string(),
                d["kind"].as_str().unwrap().to_string(),
                d["columns"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect();
    let expected: Vec<(String, String, Vec<String>)> = vec![
        ("10".into(), "missing_on_a".into(), vec![]),
        ("20".into(), "missing_on_b".into(), vec![]),
        ("30".into(), "mismatched".into(), vec!["val".into()]),
        ("40".into(), "mismatched".into(), vec!["val".into()]),
        ("50".into(), "mismatched".into(), vec!["amount".into()]),
    ];
    assert_eq!(found, expected, "{out}");
    assert_eq!(items["rows"]["a"], 19_999);
    // The child on b whose parent b lacks; nothing else in the other tables.
    let child = json["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == "public.child")
        .unwrap();
    assert_eq!(child["differences"].as_array().unwrap().len(), 1, "{out}");
    let orphans = child["orphans"].as_array().unwrap();
    assert_eq!(orphans.len(), 1, "{out}");
    assert_eq!(orphans[0]["node"], "b");
    assert_eq!(orphans[0]["rows"], 1);
    let parent = json["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == "public.parent")
        .unwrap();
    assert!(
        parent["differences"].as_array().unwrap().is_empty(),
        "{out}"
    );
    // The text report says the same; an unknown table cannot be compared.
    let out = text(&rig.command(&["verify", "--table", "public.items", "--settle-ms", "500"]));
    assert!(
        out.contains("mismatched [\"30\"]: val") && out.contains("missing_on_a [\"10\"]"),
        "{out}"
    );
    assert_eq!(
        rig.command(&["verify", "--table", "public.nope"])
            .status
            .code(),
        Some(2)
    );
    // --repair makes them equal under last-writer-wins (equal timestamps: a, the tie
    // winner, keeps its versions); an orphan is no row to repair, so it goes first.
    b.batch_execute("DELETE FROM child WHERE id = 5000")
        .await
        .unwrap();
    let out = rig.command(&["verify", "--repair", "--settle-ms", "500"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("repaired 5 rows"), "{}", text(&out));
    let (code, _, out) = verify_json(&rig, &[]);
    assert_eq!(code, Some(0), "{out}");
    for (sql, want) in [
        ("SELECT count(*) FROM items", 20_000),
        (
            "SELECT count(*) FROM items WHERE id = 30 AND val = 'v30'",
            1,
        ),
        (
            "SELECT count(*) FROM items WHERE id = 40 AND val IS NULL",
            1,
        ),
        (
            "SELECT count(*) FROM items WHERE id = 50 AND amount::text = '1.0'",
            1,
        ),
    ] {
        assert_eq!(crate::harness::count(&a, sql).await, want, "a: {sql}");
        assert_eq!(crate::harness::count(&b, sql).await, want, "b: {sql}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_in_flight_during_a_live_workload_are_not_differences() {
    let rig = Rig::both(DDL, &["public.items"], "").await;
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    a.batch_execute("INSERT INTO items (id, val) SELECT i, 'v' FROM generate_series(1, 5000) i")
        .await
        .unwrap();
    let d = rig.start();
    d.wait_applying(2).await;
    // Writers on both nodes for 30 s; verify runs twice while they write.
    let until = Instant::now() + Duration::from_secs(30);
    let mut writers = Vec::new();
    for (n, c) in [a, b].into_iter().enumerate() {
        writers.push(tokio::spawn(async move {
            let mut rng = crate::harness::workload::Rng(77 + n as u64);
            while Instant::now() < until {
                let k = 1 + rng.below(5000) as i32;
                c.execute(
                    "UPDATE items SET val = $2, updated_at = clock_timestamp() WHERE id = $1",
                    &[&k, &format!("n{n}")],
                )
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    for _ in 0..2 {
        // Off the test's runtime, so that the writers keep writing while it compares:
        // a key written during the comparison is in flight, not unsettled.
        let (code, _, out) = tokio::task::block_in_place(|| verify_json(&rig, &[]));
        assert_eq!(
            code,
            Some(0),
            "a change in flight was reported:\n{out}\n{}",
            d.logs()
        );
    }
    for w in writers {
        w.await.unwrap();
    }
    let (code, _, out) = verify_json(&rig, &[]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(d.stop().await, Some(0));
}
