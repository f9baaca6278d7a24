//! A source transaction that reaches the topic with a hole (a producer gave up on one
//! of its messages and the source then published it again whole) is never applied in
//! part: the broken copy is discarded and the next copy applied.

use crate::harness::duplex::Rig;
use crate::harness::events::{txn, DDL};
use crate::harness::kafka::Broker;
use crate::harness::tables::rows;
use duplex::event::{ChangeEvent, Lsn};
use std::time::Duration;

/// `events` without the one at `seq`.
fn without(mut events: Vec<ChangeEvent>, seq: usize) -> Vec<ChangeEvent> {
    events.remove(seq);
    events
}

/// Starts duplex on `rig`, writes `events` to a's topic, waits until b holds `expect`
/// ids; returns the daemon's log.
async fn apply(rig: &Rig, events: &[ChangeEvent], expect: &[i32]) -> String {
    let b = rig.client_b().await;
    let d = rig.start();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !d.logs().contains("applying") {
        assert!(
            std::time::Instant::now() < deadline,
            "not applying:\n{}",
            d.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Broker::shared().produce(&rig.topic(), events);
    let want: Vec<String> = expect.iter().map(|i| format!("row {i}")).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let got: Vec<String> = b
            .query("SELECT val FROM items ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        if got == want {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "b holds {got:?}, not {want:?}; log:\n{}",
            d.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let logs = d.logs();
    assert_eq!(d.stop().await, Some(0));
    logs
}

#[tokio::test]
async fn a_transaction_with_a_hole_is_applied_from_its_next_copy() {
    // A long linger keeps the broken copy unwritten until the hole shows.
    let rig = Rig::new(DDL, &["public.items"], "").await;
    rig.edit_config(&[("linger_ms = 10", "linger_ms = 3000")]);
    let db = rig.db_a.clone();
    let events = [
        txn(&db, 0x100, &[1]),
        without(txn(&db, 0x200, &[2, 3, 4, 5, 6]), 2),
        txn(&db, 0x300, &[7]),
        // The source restarts from its confirmed LSN and publishes again.
        txn(&db, 0x200, &[2, 3, 4, 5, 6]),
        txn(&db, 0x300, &[7]),
    ]
    .concat();
    let logs = apply(&rig, &events, &[1, 2, 3, 4, 5, 6, 7]).await;
    assert!(
        logs.contains("arrived with events missing") && logs.contains("discarded what arrived"),
        "{logs}"
    );
}

#[tokio::test]
async fn a_hole_found_after_part_of_the_transaction_was_written_rolls_it_back() {
    // With batches of 2 rows, 1,000 events of an unfinished transaction are held back
    // at most: the broken copy's first 1,000 are written before the hole shows.
    let rig = Rig::new(DDL, &["public.items"], "").await;
    rig.edit_config(&[("linger_ms = 10", "linger_ms = 10\nbatch_rows = 2")]);
    let db = rig.db_a.clone();
    let big: Vec<i32> = (2..=1004).collect();
    let events = [
        txn(&db, 0x100, &[1]),
        without(txn(&db, 0x200, &big), 1001),
        txn(&db, 0x100, &[1]),
        txn(&db, 0x200, &big),
        txn(&db, 0x300, &[1005]),
    ]
    .concat();
    let all: Vec<i32> = (1..=1005).collect();
    let logs = apply(&rig, &events, &all).await;
    assert!(
        logs.contains("rolled back what was written of it"),
        "{logs}"
    );
    // Nothing of the broken copy stayed: each row was written once, by the next copy.
    let b = rig.client_b().await;
    assert_eq!(rows(&b, "items").await.len(), 1005);
}

#[tokio::test]
async fn a_transaction_whose_tail_is_missing_waits_for_its_next_copy() {
    let rig = Rig::new(DDL, &["public.items"], "").await;
    let db = rig.db_a.clone();
    let mut broken = txn(&db, 0x200, &[2, 3, 4]);
    broken.truncate(2);
    let events = [
        broken,
        txn(&db, 0x300, &[5]),
        txn(&db, 0x200, &[2, 3, 4]),
        txn(&db, 0x300, &[5]),
    ]
    .concat();
    let logs = apply(&rig, &events, &[2, 3, 4, 5]).await;
    assert!(logs.contains("arrived with events missing"), "{logs}");
}

/// `events` linked to the transaction published before them (`None`: a session's first).
fn linked(mut events: Vec<ChangeEvent>, prev: Option<u64>) -> Vec<ChangeEvent> {
    for e in &mut events {
        e.source.prev_lsn = prev.map(Lsn);
    }
    events
}

#[tokio::test]
async fn a_transaction_missing_whole_is_applied_from_the_next_copy() {
    // An idempotent producer that gave up on some messages leaves whole transactions
    // out of the topic while later ones land: 0x400 links to 0x300, which never came.
    let rig = Rig::new(DDL, &["public.items"], "").await;
    let db = rig.db_a.clone();
    let events = [
        linked(txn(&db, 0x100, &[1]), None),
        linked(txn(&db, 0x400, &[4]), Some(0x300)),
        linked(txn(&db, 0x500, &[5]), Some(0x400)),
        // The source publishes again from its confirmed position, in a new session.
        linked(txn(&db, 0x200, &[2]), None),
        linked(txn(&db, 0x300, &[3]), Some(0x200)),
        linked(txn(&db, 0x400, &[4]), Some(0x300)),
        linked(txn(&db, 0x500, &[5]), Some(0x400)),
        linked(txn(&db, 0x600, &[6]), Some(0x500)),
    ]
    .concat();
    let logs = apply(&rig, &events, &[1, 2, 3, 4, 5, 6]).await;
    assert!(
        logs.contains("source transaction 0/300 is missing"),
        "{logs}"
    );
}
