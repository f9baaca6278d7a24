//! Schema changes: a column dropped on one node first while both nodes write.

use super::schema_changes::{crosses, owed};
use crate::harness::duplex::Rig;
use crate::harness::tables::converge;
use crate::harness::wait_for;
use crate::harness::workload::Rng;
use crate::harness::{count, output_text};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::Client;

/// A writer on one node until `stop`, setting `color` while `color` says so; `done`
/// counts its statements, so that a caller can wait for one made after a change of
/// `color`.
async fn colored_writer(
    c: Client,
    seed: u64,
    color: Arc<AtomicBool>,
    done: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    let mut rng = Rng(seed);
    while !stop.load(Ordering::SeqCst) {
        let k = rng.below(200) as i32;
        let v = format!("v{seed}-{}", rng.below(1000));
        let sql = if color.load(Ordering::SeqCst) {
            format!(
                "INSERT INTO items (id, val, color) VALUES ({k}, '{v}', 'c{v}') ON CONFLICT (id)
                 DO UPDATE SET val = EXCLUDED.val, color = EXCLUDED.color, updated_at = clock_timestamp()"
            )
        } else {
            format!(
                "INSERT INTO items (id, val) VALUES ({k}, '{v}') ON CONFLICT (id)
                 DO UPDATE SET val = EXCLUDED.val, updated_at = clock_timestamp()"
            )
        };
        c.batch_execute(&sql).await.unwrap();
        done.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

/// Stops `color` writes of a writer: returns once it has made a statement without.
async fn stop_coloring(color: &AtomicBool, done: &std::sync::atomic::AtomicU64) {
    color.store(false, Ordering::SeqCst);
    let from = done.load(Ordering::SeqCst);
    wait_for(
        "a write without the column",
        Duration::from_secs(10),
        || async move { (done.load(Ordering::SeqCst) >= from + 2).then_some(()) },
    )
    .await;
}

/// A column dropped on node a first while both nodes write, and on node b a while
/// later: meanwhile a's changes apply to b leaving b's column alone, b's apply to a
/// without it and a records b's values as owed (status says so); once b drops the
/// column too the debt ends, with no halt, restart or operator step, and the nodes
/// end equal.
#[tokio::test]
async fn a_column_dropped_on_one_node_first_stops_nothing_and_its_debt_ends_with_the_column() {
    let ddl = "CREATE TABLE items (id int PRIMARY KEY, val text, color text,
               updated_at timestamptz NOT NULL DEFAULT clock_timestamp());";
    let rig = Rig::both(ddl, &["public.items"], "").await;
    assert!(rig.command(&["setup"]).status.success());
    let d = rig.start();
    d.wait_applying(2).await;
    let (a, b) = (rig.client_a().await, rig.client_b().await);
    let stop = Arc::new(AtomicBool::new(false));
    let color = [
        Arc::new(AtomicBool::new(true)),
        Arc::new(AtomicBool::new(true)),
    ];
    let done = [
        Arc::new(std::sync::atomic::AtomicU64::new(0)),
        Arc::new(std::sync::atomic::AtomicU64::new(0)),
    ];
    let mut writers = Vec::new();
    for (i, c) in [rig.client_a().await, rig.client_b().await]
        .into_iter()
        .enumerate()
    {
        writers.push(tokio::spawn(colored_writer(
            c,
            i as u64 + 1,
            color[i].clone(),
            done[i].clone(),
            stop.clone(),
        )));
    }
    wait_for("rows on b", Duration::from_secs(60), || {
        let b = &b;
        async move {
            (count(b, "SELECT count(*) FROM items WHERE color IS NOT NULL").await > 50)
                .then_some(())
        }
    })
    .await;

    stop_coloring(&color[0], &done[0]).await;
    a.batch_execute("ALTER TABLE items DROP COLUMN color")
        .await
        .unwrap();
    let debt = (
        "b".to_string(),
        "public.items".to_string(),
        "color".to_string(),
    );
    wait_for(
        "a to record b's values as owed",
        Duration::from_secs(60),
        || {
            let (a, debt) = (&a, &debt);
            async move { owed(a).await.contains(debt).then_some(()) }
        },
    )
    .await;
    // Both directions still apply: a's rows reach b, b's reach a.
    crosses(&a, &b, 10_000).await;
    crosses(&b, &a, 10_001).await;
    let status = rig.command(&["status", "--max-lag", "600"]);
    let said = output_text(&status);
    assert!(said.contains("owed public.items.color since"), "{said}");
    assert!(!said.contains("halted"), "{said}");

    stop_coloring(&color[1], &done[1]).await;
    b.batch_execute("ALTER TABLE items DROP COLUMN color")
        .await
        .unwrap();
    wait_for("the debt ended", Duration::from_secs(90), || {
        let a = &a;
        async move { owed(a).await.is_empty().then_some(()) }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.await.unwrap();
    }
    converge(&a, &b, &["public.items"], Duration::from_secs(60)).await;
    assert!(d
        .logs()
        .contains("the source dropped the owed column too: its values are owed no more"));
    assert_eq!(d.stop().await, Some(0));
}
