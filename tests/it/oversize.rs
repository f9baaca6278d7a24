//! A change too large to be one Kafka message cannot be retried into success: duplex
//! stops with a message naming the table, key and LSN and the setting to raise,
//! instead of retrying the same message for ever.

use crate::harness::duplex::Rig;
use crate::harness::pg::Cluster;
use std::time::Duration;

#[tokio::test]
async fn a_change_larger_than_a_message_may_be_stops_duplex_naming_it() {
    let ddl = "CREATE TABLE items (id int PRIMARY KEY, body text, updated_at timestamptz NOT NULL DEFAULT clock_timestamp());";
    let rig = Rig::new(
        ddl,
        &["public.items"],
        "[kafka.properties]\n\"message.max.bytes\" = \"4000\"\n",
    )
    .await;
    assert!(rig.command(&["setup"]).status.success());
    let a = Cluster::shared().client(&rig.db_a).await;
    let mut d = rig.start();
    a.batch_execute("INSERT INTO items (id, body) VALUES (7, repeat('z', 20000))")
        .await
        .unwrap();
    assert_eq!(d.exited(Duration::from_secs(60)).await, Some(1));
    let logs = d.logs();
    assert!(
        logs.contains("public.items key")
            && logs.contains("\"7\"")
            && logs.contains("raise message.max.bytes"),
        "{logs}"
    );
}
