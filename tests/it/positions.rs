//! A stored Kafka position the topic no longer holds (retention passed it, the topic
//! was recreated) stops the direction with a message saying how to resynchronise; it
//! never jumps silently to another offset.

use crate::harness::duplex::Rig;
use crate::harness::pg::Cluster;
use crate::harness::wait_for;
use std::time::Duration;
use tokio_postgres::Client;

const DDL: &str = "CREATE TABLE items (id int PRIMARY KEY, val text, updated_at timestamptz NOT NULL DEFAULT clock_timestamp());";

async fn count(c: &Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn a_stored_offset_outside_the_log_halts_the_direction() {
    let rig = Rig::new(DDL, &["public.items"], "").await;
    assert!(rig.command(&["setup"]).status.success());
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, cl.client(&rig.db_b).await);
    let d = rig.start();
    a.batch_execute("INSERT INTO items (id, val) VALUES (1, 'x')")
        .await
        .unwrap();
    wait_for("row 1 on b", Duration::from_secs(30), || async {
        (count(&b, "SELECT count(*) FROM items").await == 1).then_some(())
    })
    .await;
    assert_eq!(d.stop().await, Some(0));
    // As if the topic had been recreated: the stored offset is past its end.
    b.batch_execute("UPDATE duplex.apply_positions SET next_offset = next_offset + 1000")
        .await
        .unwrap();
    a.batch_execute("INSERT INTO items (id, val) VALUES (2, 'y')")
        .await
        .unwrap();
    let d = rig.start();
    let logs = d
        .wait_log("is not in the topic any more", 1, Duration::from_secs(60))
        .await;
    assert!(logs.contains("resynchronise the target"), "{logs}");
    wait_for(
        "the halt recorded on b",
        Duration::from_secs(30),
        || async {
            (count(
                &b,
                "SELECT count(*) FROM duplex.apply_state WHERE state = 'halted'",
            )
            .await
                == 1)
                .then_some(())
        },
    )
    .await;
    assert_eq!(count(&b, "SELECT count(*) FROM items").await, 1);
    assert_eq!(d.stop().await, Some(0));
}
