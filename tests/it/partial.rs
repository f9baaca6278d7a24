//! A source transaction whose end has not arrived (the source or the broker is down
//! in the middle of it) must not keep the application's writes on the target waiting.

use crate::harness::duplex::Rig;
use crate::harness::events::{txn, DDL};
use crate::harness::kafka::Broker;
use crate::harness::{wait_count, wait_for};
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// Starts duplex on `rig` and applies row 1 through it; returns the daemon and b.
async fn row_one_applied(rig: &Rig) -> (crate::harness::duplex::Daemon, Client) {
    let b = rig.client_b().await;
    let d = rig.start();
    // Events written to the topic before the direction's first start would be before
    // where it starts reading (what the source held then is the copy's).
    d.wait_applying(1).await;
    Broker::shared().produce(&rig.topic(), &txn(&rig.db_a, 0x100, &[1]));
    wait_for("row 1 on b", Duration::from_secs(60), || {
        let b = &b;
        async move {
            let n: i64 = b
                .query_one("SELECT count(*) FROM items WHERE id = 1", &[])
                .await
                .unwrap()
                .get(0);
            (n == 1).then_some(())
        }
    })
    .await;
    (d, b)
}

/// The application updates row 1 on b, waiting at most `lock_timeout`.
async fn app_update(b: &Client, lock_timeout: &str) -> Result<(), tokio_postgres::Error> {
    b.batch_execute(&format!(
        "SET lock_timeout = '{lock_timeout}'; UPDATE items SET val = 'app', updated_at = now() WHERE id = 1; RESET lock_timeout"
    ))
    .await
}

#[tokio::test]
async fn an_unfinished_transaction_takes_no_row_locks() {
    let rig = Rig::new(DDL, &["public.items"], "").await;
    rig.edit_config(&[("linger_ms = 10", "linger_ms = 10\nbatch_rows = 1")]);
    let (d, b) = row_one_applied(&rig).await;
    // Rows 1 and 2 of a three-row transaction; its end is still to come.
    let whole = txn(&rig.db_a, 0x200, &[1, 2, 3]);
    Broker::shared().produce(&rig.topic(), &whole[..2]);
    // The applier reads them within milliseconds; for seconds after, the application
    // never waits on a lock of theirs.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        app_update(&b, "500ms")
            .await
            .expect("the applier holds row 1");
    }
    Broker::shared().produce(&rig.topic(), &whole[2..]);
    wait_count(&b, "SELECT count(*) FROM items", 3).await;
    assert_eq!(d.stop().await, Some(0));
}

#[tokio::test]
async fn a_stalled_transaction_too_large_to_hold_back_releases_its_locks() {
    let rig = Rig::new(DDL, &["public.items"], "").await;
    rig.edit_config(&[("linger_ms = 10", "linger_ms = 10\nbatch_rows = 1")]);
    let (d, b) = row_one_applied(&rig).await;
    // 1,000 events at most are held back with batch_rows = 1: these are written.
    let ids: Vec<i32> = (1..=1202).collect();
    let whole = txn(&rig.db_a, 0x200, &ids);
    Broker::shared().produce(&rig.topic(), &whole[..1201]);
    // Row 1's committed version names a deleter (nobody else writes it): the applier
    // has updated it in its open transaction and holds its lock.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n: i64 = b
            .query_one(
                "SELECT count(*) FROM items WHERE id = 1 AND xmax::text <> '0'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if n == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the applier never held row 1:\n{}",
            d.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The application waits on row 1 until the applier gives the transaction up.
    app_update(&b, "60s").await.unwrap();
    d.wait_log(
        "rolled it back to release its row locks",
        1,
        Duration::from_secs(30),
    )
    .await;
    Broker::shared().produce(&rig.topic(), &whole[1201..]);
    wait_count(&b, "SELECT count(*) FROM items", 1202).await;
    assert_eq!(d.stop().await, Some(0));
}

/// Whole transactions read together with the head of an unfinished one (the source or
/// the broker went down after publishing part of it) are committed at once: the
/// application neither waits on their rows nor misses them, for as long as the rest
/// does not come, and the unfinished one is applied whole once it does.
#[tokio::test]
async fn whole_transactions_before_an_unfinished_one_commit_without_it() {
    let rig = Rig::new(DDL, &["public.items"], "").await;
    let (d, b) = row_one_applied(&rig).await;
    let db = rig.db_a.clone();
    let unfinished = txn(&db, 0x400, &[20, 21, 22]);
    let mut events = [txn(&db, 0x200, &[10]), txn(&db, 0x300, &[11, 12])].concat();
    events.extend_from_slice(&unfinished[..2]);
    // One produce: the applier reads them all in one linger.
    Broker::shared().produce(&rig.topic(), &events);
    wait_count(&b, "SELECT count(*) FROM items WHERE id IN (10, 11, 12)", 3).await;
    // The outage lasts: for seconds, the application updates those rows without
    // waiting on a lock, and the applied position covers them.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        b.batch_execute(
            "SET lock_timeout = '500ms'; UPDATE items SET val = 'app', updated_at = now() WHERE id IN (10, 11, 12); RESET lock_timeout",
        )
        .await
        .expect("the applier holds the rows of a whole transaction");
    }
    let stored: String = b
        .query_one("SELECT commit_lsn::text FROM duplex.apply_positions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, "0/300", "the committed position");
    assert_eq!(
        crate::harness::count(&b, "SELECT count(*) FROM items WHERE id >= 20").await,
        0,
        "part of the unfinished transaction was committed"
    );
    Broker::shared().produce(&rig.topic(), &unfinished[2..]);
    wait_count(&b, "SELECT count(*) FROM items WHERE id >= 20", 3).await;
    assert_eq!(d.stop().await, Some(0));
}
