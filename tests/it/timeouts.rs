//! A target that is locked or slow is waited for: a lock timeout or a statement
//! timeout on the apply session is a transient error, retried until the rows go in,
//! never a bad event that halts the direction or lands in the dead-letter queue.

use crate::harness::duplex::Rig;
use crate::harness::metrics::{metrics_port, wait_value};
use crate::harness::pg::Cluster;
use crate::harness::wait_for;
use std::time::Duration;
use tokio_postgres::Client;

const DDL: &str = "CREATE TABLE items (id int PRIMARY KEY, val text, updated_at timestamptz NOT NULL DEFAULT clock_timestamp());";

async fn wait_val(b: &Client, want: &str) {
    wait_for(
        &format!("val = {want} on b"),
        Duration::from_secs(60),
        || async {
            let row = b
                .query_opt("SELECT val FROM items WHERE id = 1", &[])
                .await
                .unwrap();
            (row.map(|r| r.get::<_, String>(0)).as_deref() == Some(want)).then_some(())
        },
    )
    .await
}

/// Holds a row lock on item 1 of node b until the returned client commits.
async fn lock_item(rig: &Rig) -> Client {
    let locker = rig.client_b().await;
    locker
        .batch_execute("SET lock_timeout = 0; SET statement_timeout = 0; BEGIN; SELECT * FROM items WHERE id = 1 FOR UPDATE")
        .await
        .unwrap();
    locker
}

#[tokio::test]
async fn lock_and_statement_timeouts_on_the_target_are_retried_not_dead_lettered() {
    let rig = Rig::new(DDL, &["public.items"], "").await;
    rig.edit_config(&[(
        "linger_ms = 10",
        "linger_ms = 10\non_error = \"dead_letter\"",
    )]);
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    b.batch_execute(&format!(
        "ALTER DATABASE \"{}\" SET lock_timeout = '200ms'",
        rig.db_b
    ))
    .await
    .unwrap();
    assert!(rig.command(&["setup"]).status.success());
    let d = rig.start();
    a.batch_execute("INSERT INTO items (id, val) VALUES (1, 'v1')")
        .await
        .unwrap();
    wait_val(&b, "v1").await;

    // A lock timeout: the transaction is rolled back and written again in place.
    let locker = lock_item(&rig).await;
    a.batch_execute("UPDATE items SET val = 'v2', updated_at = clock_timestamp() WHERE id = 1")
        .await
        .unwrap();
    let port = metrics_port(&rig);
    let series = r#"duplex_apply_retries_total{direction="a_to_b",reason="lock_timeout"}"#;
    wait_value(port, series, "a retry after a lock timeout", |v| v >= 2.0).await;
    locker.batch_execute("COMMIT").await.unwrap();
    wait_val(&b, "v2").await;
    assert_eq!(d.stop().await, Some(0));

    // A statement timeout: the session is retried with backoff.
    b.batch_execute(&format!(
        "ALTER DATABASE \"{0}\" SET lock_timeout = 0; ALTER DATABASE \"{0}\" SET statement_timeout = '300ms'",
        rig.db_b
    ))
    .await
    .unwrap();
    let d = rig.start();
    let locker = lock_item(&rig).await;
    a.batch_execute("UPDATE items SET val = 'v3', updated_at = clock_timestamp() WHERE id = 1")
        .await
        .unwrap();
    d.wait_log("statement timeout", 2, Duration::from_secs(60))
        .await;
    locker.batch_execute("COMMIT").await.unwrap();
    wait_val(&b, "v3").await;

    let dead: i64 = b
        .query_one("SELECT count(*) FROM duplex.dead_letters", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(dead, 0, "a valid row was dead-lettered");
    assert_eq!(d.stop().await, Some(0));
}
