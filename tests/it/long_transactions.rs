//! A transaction that takes longer to stream than the node's `wal_sender_timeout`:
//! duplex keeps answering the node while it reads, so the walsender is not killed and
//! the transaction is not replayed from its start for ever.

use crate::harness::duplex::Rig;
use crate::harness::pg::Cluster;
use crate::harness::wait_for;
use std::time::Duration;

const DDL: &str = "CREATE TABLE items (id int PRIMARY KEY, val text, updated_at timestamptz NOT NULL DEFAULT clock_timestamp());";
const ROWS: i64 = 300_000;

#[tokio::test]
async fn a_first_transaction_longer_than_wal_sender_timeout_streams_through() {
    let rig = Rig::new(DDL, &["public.items"], "").await;
    // Node a on a cluster whose walsenders give up after 2 s of silence.
    let impatient = Cluster::start(&[("wal_sender_timeout", "'2s'")]);
    let db = impatient.create_db();
    let a = impatient.client(&db).await;
    a.batch_execute(DDL).await.unwrap();
    let cfg = std::fs::read_to_string(&rig.config).unwrap().replace(
        &Cluster::shared().url("postgres", &rig.db_a),
        &impatient.url("postgres", &db),
    );
    std::fs::write(&rig.config, cfg).unwrap();
    assert!(rig.command(&["setup"]).status.success());
    // One transaction, written while duplex is down: the first thing it reads.
    a.batch_execute(&format!(
        "INSERT INTO items (id, val) SELECT g, 'row ' || g FROM generate_series(1, {ROWS}) g"
    ))
    .await
    .unwrap();
    let d = rig.start();
    let b = rig.client_b().await;
    wait_for("every row on b", Duration::from_secs(240), || async {
        let n: i64 = b
            .query_one("SELECT count(*) FROM items", &[])
            .await
            .unwrap()
            .get(0);
        (n == ROWS).then_some(())
    })
    .await;
    let logs = d.logs();
    assert!(
        !logs.contains("failed; retrying"),
        "the reader lost its connection:\n{logs}"
    );
    assert_eq!(d.stop().await, Some(0));
}
