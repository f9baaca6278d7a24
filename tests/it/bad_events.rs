//! Events the target cannot take: halt the direction (default) or go to the
//! dead-letter queue; nothing is lost either way, and replay applies them once the
//! target is fixed.

use crate::harness::duplex::Rig;
use crate::harness::kafka::Broker;
use crate::harness::output_text as text;
use crate::harness::pg::Cluster;
use crate::harness::tables::{converge, item_ids, rows};
use crate::harness::wait_for;
use std::time::Duration;

/// `items` on both nodes; the target (b) is then made stricter in three ways.
const DDL: &str = "CREATE TABLE items (id int PRIMARY KEY, val text, qty text, updated_at timestamptz DEFAULT clock_timestamp());
                   CREATE TABLE wide (id int PRIMARY KEY, extra text, updated_at timestamptz NOT NULL DEFAULT clock_timestamp());";
const STRICTER_B: &str = "ALTER TABLE items ALTER qty TYPE int USING qty::int;
                          ALTER TABLE items ADD CONSTRAINT no_forbidden CHECK (val <> 'forbidden');
                          ALTER TABLE wide DROP COLUMN extra;";

#[tokio::test]
async fn a_bad_event_halts_its_direction_only_and_resumes_after_the_fix() {
    let rig = Rig::both(DDL, &["public.items"], "").await;
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    b.batch_execute("ALTER TABLE items ALTER qty TYPE int USING qty::int")
        .await
        .unwrap();
    assert!(rig.command(&["setup"]).status.success());
    let d = rig.start();
    d.wait_applying(2).await;
    for sql in [
        "INSERT INTO items (id, val, qty) VALUES (1, 'good', '1')",
        "INSERT INTO items (id, val, qty) VALUES (2, 'bad', 'not a number')",
        "INSERT INTO items (id, val, qty) VALUES (3, 'good', '3')",
    ] {
        a.batch_execute(sql).await.unwrap();
    }
    let logs = d
        .wait_log("halted on a bad event", 1, Duration::from_secs(30))
        .await;
    for expected in [
        "direction a_to_b",
        "table public.items",
        "\"id\":\"2\"",
        "source position",
        "invalid input syntax for type integer",
    ] {
        assert!(logs.contains(expected), "missing {expected:?} in:\n{logs}");
    }
    // The other direction keeps going.
    b.batch_execute("INSERT INTO items (id, val, qty) VALUES (100, 'from b', 7)")
        .await
        .unwrap();
    wait_for("b's row on a", Duration::from_secs(30), || {
        let a = &a;
        async move { (rows(a, "items").await.iter().any(|r| r.contains("from b"))).then_some(()) }
    })
    .await;
    // The batch holding the bad event was rolled back whole: nothing after the last
    // commit before it is on b.
    let on_b = rows(&b, "items").await;
    assert!(
        !on_b
            .iter()
            .any(|r| r.contains("\"id\":2") || r.contains("\"id\":3")),
        "{on_b:?}"
    );
    assert_eq!(d.stop().await, Some(0));
    // Fixed target, restart: nothing was lost.
    b.batch_execute("ALTER TABLE items ALTER qty TYPE text")
        .await
        .unwrap();
    let d = rig.start();
    converge(&a, &b, &["items"], Duration::from_secs(30)).await;
    assert_eq!(rows(&b, "items").await.len(), 4);
    assert_eq!(d.stop().await, Some(0));
}

#[tokio::test]
async fn bad_events_go_to_the_dead_letter_queue_and_replay_after_the_fix() {
    let rig = Rig::new(DDL, &["public.items", "public.wide"], "").await;
    let cfg = std::fs::read_to_string(&rig.config)
        .unwrap()
        .replace(
            "linger_ms = 10",
            "linger_ms = 10\non_error = \"dead_letter\"",
        )
        .replace(
            "name = \"public.items\"",
            "name = \"public.items\"\nmax_future_skew_ms = 60000",
        );
    std::fs::write(&rig.config, cfg).unwrap();
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    b.batch_execute(STRICTER_B).await.unwrap();
    assert!(rig.command(&["setup"]).status.success());
    let d = rig.start();
    d.wait_applying(1).await;
    for sql in [
        "INSERT INTO items (id, val, qty) VALUES (1, 'good', '1')",
        "INSERT INTO items (id, val, qty) VALUES (2, 'type mismatch', 'abc')",
        "INSERT INTO items (id, val, qty) VALUES (3, 'forbidden', '3')",
        "INSERT INTO wide (id, extra) VALUES (4, 'column missing on b, owed')",
        "INSERT INTO items (id, val, qty, updated_at) VALUES (5, 'null updated_at', '5', NULL)",
        "INSERT INTO items (id, val, qty, updated_at) VALUES (7, 'from the future', '7', now() + interval '1 day')",
        "INSERT INTO items (id, val, qty) VALUES (6, 'good', '6')",
    ] {
        a.batch_execute(sql).await.unwrap();
    }
    wait_for("the good rows on b", Duration::from_secs(30), || {
        let b = &b;
        async move {
            (rows(b, "items").await.len() == 2 && rows(b, "wide").await.len() == 1).then_some(())
        }
    })
    .await;
    // A column b lacks is no bad event: the row is applied without it, its value owed.
    let owed: Vec<(String, String)> = b
        .query(
            "SELECT table_name, column_name FROM duplex.owed_columns WHERE source_node = 'a'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(owed, [("public.wide".to_string(), "extra".to_string())]);
    let letters: i64 = b
        .query_one("SELECT count(*) FROM duplex.dead_letters", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(letters, 4);
    let dlq = Broker::shared()
        .read_until(
            &format!("{}.a.dlq", rig.prefix),
            Duration::from_secs(20),
            |e| e.len() >= 4,
        )
        .await;
    assert_eq!(dlq.len(), 4);
    let list = text(&rig.command(&["dlq", "list"]));
    for expected in [
        "invalid input syntax for type integer",
        "column qty (integer) refuses 'abc'",
        "no_forbidden",
        "updated_at is NULL",
        "further in the future than max_future_skew_ms allows",
    ] {
        assert!(list.contains(expected), "missing {expected:?} in:\n{list}");
    }
    assert_eq!(list.matches("pending").count(), 4, "{list}");
    assert_eq!(d.stop().await, Some(0));

    // Fix what can be fixed on the target; the NULL and the future updated_at cannot be.
    b.batch_execute(
        "ALTER TABLE items ALTER qty TYPE text; ALTER TABLE items DROP CONSTRAINT no_forbidden;
         ALTER TABLE wide ADD COLUMN extra text;",
    )
    .await
    .unwrap();
    let out = rig.command(&["dlq", "replay"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("replayed 2, still failing 2"),
        "{}",
        text(&out)
    );
    let ids: Vec<i32> = item_ids(&b).await;
    assert_eq!(ids, vec![1, 2, 3, 6]);
    assert_eq!(rows(&b, "wide").await.len(), 1);
    let list = text(&rig.command(&["dlq", "list"]));
    assert_eq!(list.matches("replayed").count(), 2, "{list}");
}

/// With `dead_letter`, the apply session's transaction waits for the broker to take a
/// letter; a slow broker (its new connections stalled for 6 s, three times
/// `sync.receive_timeout_ms`) leaves the session idle meanwhile, which is no stall of
/// the target: the watchdog lets it be, and the letter and the rows around it land
/// once the broker answers.
#[tokio::test]
async fn a_slow_dead_letter_broker_is_no_stall_of_the_target() {
    use crate::harness::proxy::Proxy;
    let broker_port = crate::harness::free_port();
    let proxy = Proxy::start(broker_port);
    let broker: &'static Broker =
        Box::leak(Box::new(Broker::start_behind(proxy.port, broker_port)));
    let rig = Rig::new(DDL, &["public.items"], "").await;
    rig.edit_config(&[
        (
            Broker::shared().brokers().as_str(),
            broker.brokers().as_str(),
        ),
        (
            "linger_ms = 10",
            "linger_ms = 10\non_error = \"dead_letter\"\nreceive_timeout_ms = 2000",
        ),
    ]);
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    b.batch_execute(STRICTER_B).await.unwrap();
    assert!(rig.command(&["setup"]).status.success());
    let d = rig.start();
    d.wait_applying(1).await;
    a.batch_execute("INSERT INTO items (id, val, qty) VALUES (1, 'good', '1')")
        .await
        .unwrap();
    wait_for("the first row on b", Duration::from_secs(30), || {
        let b = &b;
        async move { (item_ids(b).await == vec![1]).then_some(()) }
    })
    .await;
    // The dead-letter queue's producer connects anew: its connections stall.
    proxy.stall_new_connections(true);
    a.batch_execute(
        "BEGIN;
         INSERT INTO items (id, val, qty) VALUES (2, 'type mismatch', 'abc');
         INSERT INTO items (id, val, qty) VALUES (3, 'good', '3');
         COMMIT",
    )
    .await
    .unwrap();
    d.wait_log(
        "event sent to the dead-letter queue",
        1,
        Duration::from_secs(30),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    proxy.stall_new_connections(false);
    a.batch_execute("INSERT INTO items (id, val, qty) VALUES (4, 'good', '4')")
        .await
        .unwrap();
    wait_for("the good rows on b", Duration::from_secs(60), || {
        let b = &b;
        async move { (item_ids(b).await == vec![1, 3, 4]).then_some(()) }
    })
    .await;
    let letters = crate::harness::count(&b, "SELECT count(*) FROM duplex.dead_letters").await;
    assert_eq!(letters, 1);
    let logs = d.logs();
    assert!(!logs.contains("taken for stalled"), "{logs}");
    assert!(
        logs.contains("waits on the broker (dead-letter queue)"),
        "{logs}"
    );
    assert_eq!(d.stop().await, Some(0));
}
