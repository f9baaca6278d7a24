//! Failover slots (PostgreSQL 17 and later): node a is a primary with a physical
//! standby that synchronizes duplex's slot (`sync_replication_slots = on`,
//! `synchronized_standby_slots` on the primary). The primary crashes while both nodes
//! write, the standby is promoted and duplex is pointed at it: duplex reads on from
//! the synchronized slot, and both nodes end equal with nothing applied twice.

use crate::harness::duplex::Rig;
use crate::harness::output_text;
use crate::harness::pg::Cluster;
use crate::harness::wait_for;
use crate::harness::workload::{
    assert_identical_and_applied_once, rig_before_setup_across, run_workloads, workload,
};
use std::time::{Duration, Instant};

/// The primary's view of the slot: whether it fails over.
async fn failover_flag(rig: &Rig) -> Option<bool> {
    rig.client_a()
        .await
        .query_one(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = $1",
            &[&rig.slot_a()],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_promoted_standby_carries_the_stream_on_from_its_synchronized_slot() {
    let major = Cluster::shared().major;
    if major < 17 {
        eprintln!("node a runs PostgreSQL {major}; failover slots came with 17");
        return;
    }
    let primary: &'static Cluster = Box::leak(Box::new(Cluster::start(&[])));
    let standby: &'static Cluster = Box::leak(Box::new(
        primary.standby("duplex_standby", &[("sync_replication_slots", "on")]),
    ));
    let mut rig = rig_before_setup_across(primary, Cluster::shared_b()).await;
    rig.edit_config(&[("[nodes.a]\n", "[nodes.a]\nfailover_slot = true\n")]);

    // Without synchronized_standby_slots the primary may send duplex what its standby
    // lacks: check warns of that.
    let out = rig.command(&["check"]);
    assert!(
        output_text(&out).contains(
            "warning: node a: nodes.a.failover_slot is set, but synchronized_standby_slots is empty"
        ),
        "{}",
        output_text(&out)
    );
    primary.psql(
        "postgres",
        "ALTER SYSTEM SET synchronized_standby_slots = 'duplex_standby'",
    );
    primary.psql("postgres", "SELECT pg_reload_conf()");
    let out = rig.command(&["check"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let out = rig.command(&["setup"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("created replication failover slot"),
        "{}",
        output_text(&out)
    );
    assert_eq!(failover_flag(&rig).await, Some(true));

    let d = rig.start();
    d.wait_applying(2).await;
    let on_standby = standby.client(&rig.db_a).await;
    let slot = rig.slot_a();
    wait_for(
        "the standby to synchronize the slot",
        Duration::from_secs(90),
        || {
            let (c, slot) = (&on_standby, &slot);
            async move {
                let synced: Option<bool> = c
                    .query_opt(
                        // Temporary until it caught up with the primary's, and a
                        // temporary one goes at the promotion.
                        "SELECT synced AND NOT temporary FROM pg_replication_slots WHERE slot_name = $1",
                        &[slot],
                    )
                    .await
                    .unwrap()
                    .and_then(|r| r.get(0));
                (synced == Some(true)).then_some(())
            }
        },
    )
    .await;
    let (a1, b1) = run_workloads(&rig, 6).await;

    // The primary crashes with changes still on their way; the standby takes over.
    primary.stop("immediate");
    let failed_at = Instant::now();
    standby.promote();
    assert_eq!(d.stop().await, Some(0));
    rig.edit_config(&[(
        format!("127.0.0.1:{}/", primary.port).as_str(),
        format!("127.0.0.1:{}/", standby.port).as_str(),
    )]);
    rig.cluster = standby;
    let d = rig.start();
    d.wait_applying(2).await;
    eprintln!(
        "applying again {:?} after the primary crashed; {a1} + {b1} changes before",
        failed_at.elapsed()
    );
    // A second round of writers, with keys of their own (the first round's parents
    // exist on both nodes).
    let until = Instant::now() + Duration::from_secs(4);
    let (ca, cb) = (rig.client_a().await, rig.client_b().await);
    let (a2, b2) = tokio::join!(workload(ca, 2, until), workload(cb, 3, until));
    assert!(
        a2 > 100 && b2 > 100,
        "{a2}, {b2} changes after the failover"
    );
    assert_identical_and_applied_once(&rig).await;
    assert_eq!(failover_flag(&rig).await, Some(true));
    let logs = d.logs();
    assert!(!logs.contains("is gone"), "{logs}");
    assert_eq!(d.stop().await, Some(0));
}
