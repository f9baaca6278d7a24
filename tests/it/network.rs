//! Network faults between duplex and a node, through a proxy: a connection that
//! stalls (no FIN, no data) is noticed within `source.receive_timeout_ms` and
//! replaced; connections cut are reconnected; in both cases what was written
//! meanwhile arrives, once.

use crate::apply::{converge, item_ids};
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
    assert_eq!(item_ids(&b).await.len(), 30);
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
    assert_eq!(item_ids(&b).await.len(), 60);
    assert_eq!(d.stop().await, Some(0));
}

/// The broker behind a proxy (it advertises the proxy's address): connections to it
/// stalled for a while, then cut, in both pipelines; everything written meanwhile on
/// both nodes arrives on the other, once.
#[tokio::test]
async fn stalled_and_cut_connections_to_the_broker_are_survived() {
    use crate::convergence::{assert_identical_and_applied_once, rig_before_setup, workload};
    use crate::harness::kafka::Broker;
    let broker_port = crate::harness::free_port();
    let proxy = Proxy::start(broker_port);
    let broker: &'static Broker =
        Box::leak(Box::new(Broker::start_behind(proxy.port, broker_port)));
    let rig = rig_before_setup().await;
    rig.edit_config(&[(
        Broker::shared().brokers().as_str(),
        broker.brokers().as_str(),
    )]);
    // One message per record batch: the test broker answers a fetch that starts inside
    // a batch with the next batch, which duplex rightly takes for lost messages; a
    // reconnecting applier resumes at any offset.
    let mut cfg = std::fs::read_to_string(&rig.config).unwrap();
    cfg.push_str("\n[kafka.properties]\n\"batch.num.messages\" = \"1\"\n");
    std::fs::write(&rig.config, cfg).unwrap();
    assert!(rig.command(&["setup"]).status.success());
    let d = rig.start();
    d.wait_applying(2).await;
    let cl = Cluster::shared();
    let until = Instant::now() + Duration::from_secs(16);
    let writers = (
        tokio::spawn(workload(cl.client(&rig.db_a).await, 0, until)),
        tokio::spawn(workload(cl.client(&rig.db_b).await, 1, until)),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.stall(true);
    tokio::time::sleep(Duration::from_secs(5)).await;
    proxy.stall(false);
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.cut();
    writers.0.await.unwrap();
    writers.1.await.unwrap();
    assert_identical_and_applied_once(&rig).await;
    assert_eq!(d.stop().await, Some(0));
}
