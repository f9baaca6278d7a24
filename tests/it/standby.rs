//! Hot standby: two `duplex run` on one config. One works, the other waits and says so
//! (`/readyz`, `duplex_instance_active`); killing the active one with SIGKILL hands the
//! work to the other within `standby.takeover_ms`, with nothing lost, nothing applied
//! twice and both nodes equal.

use crate::harness::duplex::Daemon;
use crate::harness::metrics::{get, metrics_port, value};
use crate::harness::pg::Cluster;
use crate::harness::wait_for;
use crate::harness::workload::{assert_identical_and_applied_once, rig, workload};
use std::time::{Duration, Instant};

/// `standby.takeover_ms`' default: the bound the issue of a takeover is held to.
const TAKEOVER: Duration = Duration::from_secs(15);

fn active(port: u16) -> Option<f64> {
    get(port, "/metrics").and_then(|(_, body)| value(&body, "duplex_instance_active"))
}

async fn wait_role(port: u16, role: &str, timeout: Duration) {
    let want = if role == "active" { 1.0 } else { 0.0 };
    wait_for(&format!("instance on {port} {role}"), timeout, || {
        let ready = get(port, "/readyz");
        let ok = active(port) == Some(want)
            && ready.is_some_and(|(code, body)| code == 200 && body.contains(role));
        async move { ok.then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn the_standby_takes_over_when_the_active_instance_is_killed() {
    let rig = rig().await;
    let (second, second_port) = rig.second_instance_config();
    let ports = [metrics_port(&rig), second_port];
    let configs = [rig.config.clone(), second];
    let mut running: [Option<Daemon>; 2] = [Some(rig.start()), None];
    running[0].as_ref().unwrap().wait_applying(2).await;
    running[1] = Some(rig.start_with(&configs[1]));
    wait_role(ports[1], "standby", Duration::from_secs(60)).await;
    wait_role(ports[0], "active", Duration::from_secs(10)).await;

    let cl = Cluster::shared();
    let until = Instant::now() + Duration::from_secs(24);
    let writers = (
        tokio::spawn(workload(cl.client(&rig.db_a).await, 0, until)),
        tokio::spawn(workload(rig.client_b().await, 1, until)),
    );
    // Kill the active instance three times during the writes; each time the other
    // takes over, and the killed one comes back as the standby.
    let mut active_one = 0;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let standby = 1 - active_one;
        running[active_one].take().unwrap().kill9();
        let killed = Instant::now();
        wait_role(ports[standby], "active", TAKEOVER).await;
        eprintln!("took over in {:?}", killed.elapsed());
        running[active_one] = Some(rig.start_with(&configs[active_one]));
        wait_role(ports[active_one], "standby", Duration::from_secs(60)).await;
        active_one = standby;
    }
    let changes = (writers.0.await.unwrap(), writers.1.await.unwrap());
    assert!(
        changes.0 > 500 && changes.1 > 500,
        "workload too small: {changes:?}"
    );
    assert_identical_and_applied_once(&rig).await;
    // Only the active instance read and applied: the standby's log shows no session.
    let standby_logs = running[1 - active_one].as_ref().unwrap().logs();
    assert!(
        !standby_logs.contains("applying direction=") && !standby_logs.contains(" streaming "),
        "the standby worked:\n{standby_logs}"
    );
    for d in running.into_iter().flatten() {
        assert_eq!(d.stop().await, Some(0));
    }
}

/// A component whose lock session the node ended (here `pg_terminate_backend`; in
/// production a network cut the node noticed first) stops working at once; then one
/// instance, and only one, takes the component up again; nothing is lost or applied
/// twice.
#[tokio::test]
async fn a_component_that_loses_its_lock_stops_and_the_standby_takes_it() {
    let rig = rig().await;
    let (second, second_port) = rig.second_instance_config();
    let first = rig.start();
    first.wait_applying(2).await;
    let standby = rig.start_with(&second);
    wait_role(second_port, "standby", Duration::from_secs(60)).await;

    let cl = Cluster::shared();
    let until = Instant::now() + Duration::from_secs(12);
    let writers = (
        tokio::spawn(workload(cl.client(&rig.db_a).await, 0, until)),
        tokio::spawn(workload(rig.client_b().await, 1, until)),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let admin = rig.cluster_b.client("postgres").await;
    let ended: i64 = admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = $1 AND application_name = 'duplex lock apply a_to_b'
               AND pid IN (SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted)",
            &[&rig.db_b],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        ended, 1,
        "the active instance's lock session for apply a_to_b"
    );
    first
        .wait_log("lost the lock of apply a_to_b", 1, Duration::from_secs(10))
        .await;
    // Whichever instance took the lock next (the standby polling, or the first one
    // retrying), exactly one applies a_to_b again.
    let component = r#"duplex_instance_component_active{component="apply a_to_b"}"#;
    let ports = [metrics_port(&rig), second_port];
    wait_for(
        "one instance applying a_to_b",
        Duration::from_secs(30),
        || {
            let working: Vec<f64> = ports
                .iter()
                .filter_map(|p| get(*p, "/metrics").and_then(|(_, b)| value(&b, component)))
                .collect();
            let one = working.len() == 2 && working.iter().sum::<f64>() == 1.0;
            async move { one.then_some(()) }
        },
    )
    .await;
    writers.0.await.unwrap();
    writers.1.await.unwrap();
    assert_identical_and_applied_once(&rig).await;
    for d in [first, standby] {
        assert_eq!(d.stop().await, Some(0));
    }
}
