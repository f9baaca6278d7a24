//! Network faults between duplex and a node, through a proxy: a connection that
//! stalls (no FIN, no data) is noticed within `source.receive_timeout_ms` and
//! replaced; connections cut are reconnected; in both cases what was written
//! meanwhile arrives, once.

use crate::apply::converge;
use crate::harness::duplex::Rig;
use crate::harness::pg::Cluster;
use crate::harness::proxy::Proxy;
use std::time::{Duration, Instant};

const DDL: &str = "CREATE TABLE items (id int PRIMARY KEY, val text, updated_at timestamptz NOT NULL DEFAULT clock_timestamp());";

/// Node a reached through a proxy; a_to_b.
async fn rig_behind_proxy() -> (Rig, Proxy) {
    let rig = Rig::new(DDL, &["public.items"], "").await;
    let cl = Cluster::shared();
    let proxy = Proxy::start(cl.port);
    let direct = format!("127.0.0.1:{}/{}", cl.port, rig.db_a);
    let proxied = format!("127.0.0.1:{}/{}", proxy.port, rig.db_a);
    rig.edit_config(&[
        (direct.as_str(), proxied.as_str()),
        (
            "retry_max_ms = 1000",
            "retry_max_ms = 1000\nreceive_timeout_ms = 3000",
        ),
    ]);
    assert!(rig.command(&["setup"]).status.success());
    (rig, proxy)
}

async fn write(a: &tokio_postgres::Client, from: i32, n: i32) {
    a.batch_execute(&format!(
        "INSERT INTO items (id, val) SELECT g, 'w' FROM generate_series({from}, {}) g",
        from + n - 1
    ))
    .await
    .unwrap();
}

#[tokio::test]
async fn a_stalled_connection_to_the_source_is_noticed_and_replaced() {
    let (rig, proxy) = rig_behind_proxy().await;
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, cl.client(&rig.db_b).await);
    let d = rig.start();
    d.wait_applying(1).await;
    write(&a, 1, 10).await;
    converge(&a, &b, &["items"], Duration::from_secs(60)).await;

    proxy.stall(true);
    let stalled_at = Instant::now();
    write(&a, 100, 10).await;
    d.wait_log("the connection is stalled", 1, Duration::from_secs(30))
        .await;
    eprintln!("stall noticed after {:?}", stalled_at.elapsed());
    proxy.stall(false);
    write(&a, 200, 10).await;
    converge(&a, &b, &["items"], Duration::from_secs(60)).await;
    let count: i64 = b
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 30);
    assert_eq!(d.stop().await, Some(0));
}

#[tokio::test]
async fn cut_connections_to_the_source_are_reconnected() {
    let (rig, proxy) = rig_behind_proxy().await;
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, cl.client(&rig.db_b).await);
    let d = rig.start();
    d.wait_applying(1).await;
    for round in 0..3 {
        write(&a, round * 100 + 1, 10).await;
        proxy.cut();
        write(&a, round * 100 + 50, 10).await;
    }
    converge(&a, &b, &["items"], Duration::from_secs(60)).await;
    let count: i64 = b
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 60);
    assert_eq!(d.stop().await, Some(0));
}
