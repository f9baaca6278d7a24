//! Network faults between duplex and a node, through a proxy: a connection that
//! stalls (no FIN, no data) is noticed within `source.receive_timeout_ms` and
//! replaced; connections cut are reconnected; in both cases what was written
//! meanwhile arrives, once.

use crate::harness::duplex::Rig;
use crate::harness::pg::Cluster;
use crate::harness::proxy::Proxy;
use crate::harness::tables::{converge, item_ids};
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
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
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
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
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
    use crate::harness::kafka::Broker;
    use crate::harness::workload::{assert_identical_and_applied_once, rig_before_setup, workload};
    let broker_port = crate::harness::free_port();
    let proxy = Proxy::start(broker_port);
    let broker: &'static Broker =
        Box::leak(Box::new(Broker::start_behind(proxy.port, broker_port)));
    let rig = rig_before_setup().await;
    rig.edit_config(&[(
        Broker::shared().brokers().as_str(),
        broker.brokers().as_str(),
    )]);
    assert!(rig.command(&["setup"]).status.success());
    let d = rig.start();
    d.wait_applying(2).await;
    let cl = Cluster::shared();
    let until = Instant::now() + Duration::from_secs(16);
    let writers = (
        tokio::spawn(workload(cl.client(&rig.db_a).await, 0, until)),
        tokio::spawn(workload(rig.client_b().await, 1, until)),
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

/// Node b, the target of a_to_b, reached through a proxy; apply sessions ask the node
/// after 2 s without an answer.
async fn rig_with_target_behind_proxy(extra: &[(&str, &str)]) -> (Rig, Proxy) {
    let rig = Rig::new(DDL, &["public.items"], "").await;
    rig.edit_config(extra);
    let proxy = Proxy::start(rig.cluster_b.port);
    let direct = format!("127.0.0.1:{}/{}", rig.cluster_b.port, rig.db_b);
    let proxied = format!("127.0.0.1:{}/{}", proxy.port, rig.db_b);
    rig.edit_config(&[
        (direct.as_str(), proxied.as_str()),
        (
            "linger_ms = 10",
            "linger_ms = 10\nreceive_timeout_ms = 2000",
        ),
    ]);
    assert!(rig.command(&["setup"]).status.success());
    (rig, proxy)
}

/// A hung middlebox: the apply session's connection (and the standby lock's) stops
/// forwarding for good while new connections work. The watchdog finds the session's
/// server process idle (the statement never reached it) and ends it; the lock held by
/// the silent lock session is taken back after `standby.takeover_ms`. Then every
/// connection stalls for a while: a new connection cannot get through either.
#[tokio::test]
async fn a_stalled_connection_to_the_target_is_noticed_and_replaced() {
    let (rig, proxy) = rig_with_target_behind_proxy(&[]).await;
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    let d = rig.start();
    d.wait_applying(1).await;
    write(&a, 1, 10).await;
    converge(&a, &b, &["items"], Duration::from_secs(60)).await;

    proxy.stall_open_connections();
    let stalled_at = Instant::now();
    write(&a, 100, 10).await;
    d.wait_log("taken for stalled", 1, Duration::from_secs(30))
        .await;
    eprintln!("stall noticed after {:?}", stalled_at.elapsed());
    assert!(
        d.logs().contains("but the answer never arrived"),
        "{}",
        d.logs()
    );
    converge(&a, &b, &["items"], Duration::from_secs(60)).await;
    eprintln!("converged {:?} after the stall", stalled_at.elapsed());
    assert!(
        d.logs().contains("the lock's holder had been silent"),
        "{}",
        d.logs()
    );

    // Whichever notices first: the watchdog or the lease's own check.
    let noticed = |logs: &str| {
        logs.matches("taken for stalled").count() + logs.matches("lost the lock").count()
    };
    let seen = noticed(&d.logs());
    proxy.stall(true);
    let stalled_at = Instant::now();
    write(&a, 200, 10).await;
    crate::harness::wait_for("the stall noticed", Duration::from_secs(30), || {
        let more = noticed(&d.logs()) > seen;
        async move { more.then_some(()) }
    })
    .await;
    eprintln!("second stall noticed after {:?}", stalled_at.elapsed());
    proxy.stall(false);
    write(&a, 300, 10).await;
    converge(&a, &b, &["items"], Duration::from_secs(60)).await;
    assert_eq!(item_ids(&b).await.len(), 40);
    assert_eq!(d.stop().await, Some(0));
}

/// As above, but the lease's check notices first (it asks every 1.25 s, the apply
/// session waits 3 s): the apply session left behind on the node still holds the
/// replication origin, and the next session ends it.
#[tokio::test]
async fn an_apply_session_left_behind_by_a_stall_is_ended_for_its_origin() {
    let (rig, proxy) =
        rig_with_target_behind_proxy(&[("[source]", "[standby]\ntakeover_ms = 5000\n[source]")])
            .await;
    rig.edit_config(&[("receive_timeout_ms = 2000", "receive_timeout_ms = 3000")]);
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    let d = rig.start();
    d.wait_applying(1).await;
    write(&a, 1, 10).await;
    converge(&a, &b, &["items"], Duration::from_secs(60)).await;
    proxy.stall_open_connections();
    write(&a, 100, 10).await;
    converge(&a, &b, &["items"], Duration::from_secs(60)).await;
    let logs = d.logs();
    assert!(logs.contains("lost the lock of apply a_to_b"), "{logs}");
    assert!(
        logs.contains("ended an earlier session of this component"),
        "{logs}"
    );
    assert!(!logs.contains("taken for stalled"), "{logs}");
    assert_eq!(item_ids(&b).await.len(), 20);
    assert_eq!(d.stop().await, Some(0));
}

/// Every connection, to both nodes and to the broker, forwarded 25 ms late in each
/// direction, under writes on both nodes.
#[tokio::test]
async fn delayed_connections_everywhere_converge() {
    use crate::harness::kafka::Broker;
    use crate::harness::workload::{converges_under_workloads, rig_before_setup};
    let broker_port = crate::harness::free_port();
    let broker_proxy = Proxy::start(broker_port);
    let broker: &'static Broker = Box::leak(Box::new(Broker::start_behind(
        broker_proxy.port,
        broker_port,
    )));
    let rig = rig_before_setup().await;
    let cl = Cluster::shared();
    let node_proxy = Proxy::start(cl.port);
    let (direct, proxied) = (
        format!("127.0.0.1:{}/", cl.port),
        format!("127.0.0.1:{}/", node_proxy.port),
    );
    let cfg = std::fs::read_to_string(&rig.config).unwrap();
    let cfg = cfg
        .replace(&direct, &proxied)
        .replace(&Broker::shared().brokers(), &broker.brokers());
    std::fs::write(&rig.config, cfg).unwrap();
    assert!(rig.command(&["setup"]).status.success());
    for p in [&broker_proxy, &node_proxy] {
        p.delay(25);
    }
    let (d, _) = converges_under_workloads(&rig, 10, 300).await;
    assert!(!d.logs().contains("taken for stalled"), "{}", d.logs());
    assert_eq!(d.stop().await, Some(0));
}
