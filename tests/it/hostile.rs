//! Any bytes on a change topic: messages duplex did not write (not JSON, JSON of the
//! wrong shape, a table nobody configured, values of the wrong type, a key that does
//! not match the value, a huge value) end in the dead-letter queue or the halt
//! message, never in a panic or a wrong write; the valid events around them are
//! applied.

use crate::harness::duplex::Rig;
use crate::harness::events::{txn, DDL};
use crate::harness::kafka::Broker;
use crate::harness::tables::item_ids;
use crate::harness::wait_for;
use duplex::event::Value;
use std::time::Duration;

fn raw(ev: &duplex::event::ChangeEvent) -> (Vec<u8>, Vec<u8>) {
    (ev.kafka_key(), ev.to_json())
}

#[tokio::test]
async fn hostile_messages_go_to_the_dead_letter_queue_and_valid_ones_apply() {
    let rig = Rig::new(DDL, &["public.items"], "").await;
    rig.edit_config(&[(
        "linger_ms = 10",
        "linger_ms = 10\non_error = \"dead_letter\"",
    )]);
    assert!(rig.command(&["setup"]).status.success());
    let b = rig.client_b().await;
    let d = rig.start();
    d.wait_applying(1).await;

    let good = |lsn: u64, id: i32| txn(&rig.db_a, lsn, &[id]).remove(0);
    let mut unknown_table = good(0x2000, 2);
    unknown_table.source.table = "nope".into();
    let mut wrong_type = good(0x3000, 3);
    if let Some(row) = wrong_type.after.as_mut() {
        row.0[0].1 = Value::Text("three".into());
    }
    // The envelope's list of key columns is informational: the target's primary key
    // identifies the row, so this one applies as the row says.
    let mut no_key_column = good(0x4000, 4);
    no_key_column.key = vec!["missing".into()];
    let mut huge = good(0x5000, 5);
    if let Some(row) = huge.after.as_mut() {
        row.0[1].1 = Value::Text("x".repeat(3_000_000));
    }
    let mismatched_key = good(0x6000, 6);
    let mut messages = vec![
        raw(&good(0x1000, 1)),
        (b"k".to_vec(), b"not json at all \xff\xfe".to_vec()),
        (b"{}".to_vec(), br#"{"op":"c","after":{"id":"9"}}"#.to_vec()),
        (
            b"{}".to_vec(),
            br#"{"op":"zz","before":null,"after":null,"key":[],"types":{},"source":{}}"#.to_vec(),
        ),
        (Vec::new(), Vec::new()),
        raw(&unknown_table),
        raw(&wrong_type),
        raw(&no_key_column),
        raw(&huge),
    ];
    // A Kafka key naming another row than the value: the value's key is the truth.
    messages.push((
        br#"{"key":{"id":"999"},"table":"public.items"}"#.to_vec(),
        mismatched_key.to_json(),
    ));
    messages.push(raw(&good(0x7000, 7)));
    Broker::shared().produce_raw(&rig.topic(), &messages);

    wait_for("the valid rows on b", Duration::from_secs(60), || {
        let b = &b;
        async move {
            let ids = item_ids(b).await;
            (ids.contains(&7)).then_some(ids)
        }
    })
    .await;
    let ids = item_ids(&b).await;
    // Nothing wrong was written: only rows whose events were valid, each as sent.
    for id in &ids {
        assert!(
            [1, 4, 5, 6, 7].contains(id),
            "row {id} written from a hostile message: {ids:?}"
        );
    }
    assert_eq!(ids, [1, 4, 5, 6, 7]);
    let huge: i32 = b
        .query_one("SELECT length(val) FROM items WHERE id = 5", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(huge, 3_000_000);
    let letters = rig.command(&["dlq", "list"]);
    let listed = String::from_utf8_lossy(&letters.stdout).to_string();
    let dead: i64 = b
        .query_one("SELECT count(*) FROM duplex.dead_letters", &[])
        .await
        .unwrap()
        .get(0);
    // Not JSON, two of the wrong shape, an empty message, an unknown table, a wrong type.
    assert_eq!(dead, 6, "{dead} dead letters:\n{listed}");
    let logs = d.logs();
    assert!(!logs.contains("panicked"), "{logs}");
    assert_eq!(d.stop().await, Some(0));
}

/// With the default `on_error = "halt"`, the first hostile message halts its
/// direction with a message naming its offset; nothing after it is applied.
#[tokio::test]
async fn a_hostile_message_halts_its_direction_by_default() {
    let rig = Rig::new(DDL, &["public.items"], "").await;
    assert!(rig.command(&["setup"]).status.success());
    let b = rig.client_b().await;
    let d = rig.start();
    d.wait_applying(1).await;
    let good = |lsn: u64, id: i32| txn(&rig.db_a, lsn, &[id]).remove(0);
    Broker::shared().produce_raw(
        &rig.topic(),
        &[
            raw(&good(0x1000, 1)),
            (b"k".to_vec(), b"\x00\x01 garbage".to_vec()),
            raw(&good(0x2000, 2)),
        ],
    );
    let logs = d.wait_log("halted", 1, Duration::from_secs(60)).await;
    assert!(logs.contains("Kafka offset 1"), "{logs}");
    assert!(!logs.contains("panicked"), "{logs}");
    let ids = item_ids(&b).await;
    // Nothing past the halt; what came before it is applied now or after the fix.
    assert!(ids.is_empty() || ids == [1], "{ids:?}");
    let status = rig.command(&["status"]);
    let text = String::from_utf8_lossy(&status.stdout).to_string();
    assert!(text.contains("halted"), "{text}");
    assert_eq!(d.stop().await, Some(0));
}
