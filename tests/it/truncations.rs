//! A truncation on one node against rows on both: the truncating node's own rows
//! written after it follow it in its commit order and stay, whatever their
//! `updated_at` (a truncate-and-reload of rows that keep their upstream timestamps);
//! the other node's rows are ordered against it by time, so an older one loses on
//! both nodes.

use crate::harness::duplex::Rig;
use crate::harness::pg::Cluster;
use crate::harness::tables::{converge, item_ids, ITEMS};
use std::time::Duration;

#[tokio::test]
async fn rows_reloaded_after_a_truncate_with_older_timestamps_stay_on_both_nodes() {
    let rig = Rig::both(ITEMS, &["public.items"], "").await;
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    assert!(rig.command(&["setup"]).status.success());
    let d = rig.start();
    d.wait_applying(2).await;
    a.batch_execute("INSERT INTO items (id, val) SELECT g, 'live' FROM generate_series(1, 20) g")
        .await
        .unwrap();
    converge(&a, &b, &["items"], Duration::from_secs(60)).await;
    // A reference table reloaded from upstream, its rows keeping their own times:
    // once in the truncating transaction, once in the next one.
    a.batch_execute(
        "BEGIN; TRUNCATE items;
         INSERT INTO items (id, val, updated_at)
         SELECT g, 'reloaded', '2020-01-01'::timestamptz + g * interval '1 day' FROM generate_series(1, 10) g;
         COMMIT;",
    )
    .await
    .unwrap();
    a.batch_execute("TRUNCATE items").await.unwrap();
    a.batch_execute(
        "INSERT INTO items (id, val, updated_at)
         SELECT g, 'reloaded again', '2020-01-01'::timestamptz + g * interval '1 day' FROM generate_series(1, 15) g",
    )
    .await
    .unwrap();
    converge(&a, &b, &["items"], Duration::from_secs(60)).await;
    // b's application writes a row stamped before the truncate: it loses, on both.
    b.batch_execute("INSERT INTO items (id, val, updated_at) VALUES (500, 'stale', '2019-06-01')")
        .await
        .unwrap();
    b.batch_execute("INSERT INTO items (id, val) VALUES (501, 'fresh')")
        .await
        .unwrap();
    let mut want: Vec<i32> = (1..=15).collect();
    want.push(501);
    crate::harness::wait_for("the stale row gone from b", Duration::from_secs(60), || {
        let b = &b;
        let want = want.clone();
        async move { (item_ids(b).await == want).then_some(()) }
    })
    .await;
    converge(&a, &b, &["items"], Duration::from_secs(60)).await;
    let reloaded = crate::harness::count(
        &b,
        "SELECT count(*) FROM items WHERE val = 'reloaded again'",
    )
    .await;
    assert_eq!(reloaded, 15);
    assert_eq!(d.stop().await, Some(0));
}
