//! `duplex snapshot` against writers and against rows without `updated_at`: a delete
//! the application commits while a merge waits for its row stays deleted on both
//! nodes, and two rows without `updated_at` go to `sync.tie_winner`'s version on both.

use crate::harness::duplex::Rig;
use crate::harness::pg::Cluster;
use crate::harness::tables::{item_ids, rows};
use crate::harness::{output_text, wait_for};
use std::time::Duration;

const DDL: &str = "CREATE TABLE items (id int PRIMARY KEY, val text, updated_at timestamptz)";

#[tokio::test]
async fn a_delete_committed_while_the_merge_waits_for_its_row_stays_deleted() {
    let rig = Rig::both(DDL, &["public.items"], "").await;
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    assert!(rig.command(&["setup"]).status.success());
    a.batch_execute(
        "INSERT INTO items SELECT g, 'old on a', '2026-01-01' FROM generate_series(1, 3) g",
    )
    .await
    .unwrap();
    b.batch_execute("INSERT INTO items SELECT g, 'new on b', now() FROM generate_series(1, 3) g")
        .await
        .unwrap();
    // b's application holds row 2 in a transaction that deletes it once the copy's
    // merge waits for the row.
    let deleter = rig.client_b().await;
    deleter
        .batch_execute("BEGIN; SELECT * FROM items WHERE id = 2 FOR UPDATE")
        .await
        .unwrap();
    let config = rig.config.clone();
    let snapshot = tokio::task::spawn_blocking(move || {
        std::process::Command::new(crate::harness::duplex::bin())
            .args(["snapshot", "--config"])
            .arg(config)
            .output()
            .unwrap()
    });
    let db_b = rig.db_b.clone();
    wait_for("the copy waiting for row 2", Duration::from_secs(60), || {
        let (b, db_b) = (&b, &db_b);
        async move {
            let waiting: Vec<String> = b
                .query(
                    "SELECT query FROM pg_stat_activity
                     WHERE datname = $1 AND wait_event_type = 'Lock' AND application_name LIKE 'duplex%'",
                    &[db_b],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            waiting.iter().any(|q| q.starts_with("INSERT INTO")).then_some(())
        }
    })
    .await;
    deleter
        .batch_execute("DELETE FROM items WHERE id = 2; COMMIT")
        .await
        .unwrap();
    let out = snapshot.await.unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(item_ids(&b).await, [1, 3], "the deleted row came back on b");
    assert_eq!(item_ids(&a).await, [1, 3], "the delete did not reach a");
    assert_eq!(rows(&a, "items").await, rows(&b, "items").await);
}

#[tokio::test]
async fn rows_without_updated_at_on_both_nodes_go_to_the_tie_winner() {
    let rig = Rig::both(DDL, &["public.items"], "").await;
    rig.edit_config(&[("linger_ms = 10", "linger_ms = 10\ntie_winner = \"b\"")]);
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    assert!(rig.command(&["setup"]).status.success());
    a.batch_execute("INSERT INTO items VALUES (1, 'from a', NULL), (2, 'only on a', NULL)")
        .await
        .unwrap();
    b.batch_execute("INSERT INTO items VALUES (1, 'from b', NULL), (3, 'only on b', NULL)")
        .await
        .unwrap();
    let out = rig.command(&["snapshot"]);
    assert!(out.status.success(), "{}", output_text(&out));
    for c in [&a, &b] {
        let vals: Vec<String> = c
            .query("SELECT val FROM items ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(vals, ["from b", "only on a", "only on b"]);
    }
}
