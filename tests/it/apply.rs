//! Both directions: changes on either node reach the other exactly once, with
//! last-writer-wins, tombstones, deterministic ids, and bad events halted or
//! dead-lettered.

use crate::harness::count;
use crate::harness::duplex::Rig;
use crate::harness::pg::Cluster;
use crate::harness::tables::{converge, rows, ITEMS};
use crate::harness::wait_for;
use std::time::Duration;
use tokio_postgres::Client;

async fn clients(rig: &Rig) -> (Client, Client) {
    let cl = Cluster::shared();
    (cl.client(&rig.db_a).await, rig.client_b().await)
}

#[tokio::test]
async fn changes_flow_both_ways_without_echo() {
    let rig = Rig::both(ITEMS, &["public.items"], "").await;
    assert!(rig.command(&["setup"]).status.success());
    let d = rig.start();
    d.wait_applying(2).await;
    let (a, b) = clients(&rig).await;
    // An application trigger on b: applied changes must not fire it again.
    b.batch_execute(
        "CREATE TABLE audit (id int);
         CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO audit VALUES (NEW.id); RETURN NULL; END $$;
         CREATE TRIGGER audit AFTER INSERT OR UPDATE ON items FOR EACH ROW EXECUTE FUNCTION audit();",
    )
    .await
    .unwrap();
    a.batch_execute("INSERT INTO items (id, val) VALUES (1, 'one'), (2, 'two'), (3, 'three')")
        .await
        .unwrap();
    b.batch_execute("INSERT INTO items (id, val) VALUES (10, 'ten')")
        .await
        .unwrap();
    converge(&a, &b, &["items"], Duration::from_secs(30)).await;
    a.batch_execute("UPDATE items SET val = 'uno', updated_at = clock_timestamp() WHERE id = 1")
        .await
        .unwrap();
    b.batch_execute("DELETE FROM items WHERE id = 2")
        .await
        .unwrap();
    b.batch_execute("UPDATE items SET id = 11, updated_at = clock_timestamp() WHERE id = 10")
        .await
        .unwrap();
    converge(&a, &b, &["items"], Duration::from_secs(30)).await;
    assert_eq!(rows(&a, "items").await.len(), 3);
    assert!(rows(&b, "items").await[0].contains("uno"));
    let audited: Vec<i32> = b
        .query("SELECT id FROM audit ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        audited,
        vec![10, 11],
        "only b's own writes fire b's trigger"
    );
    // No echo: each topic holds only its own node's changes (3 + 1 on a; 1 + 1 + the
    // key change as one update on b, plus b's tombstones for the old key and id 2).
    let broker = crate::harness::kafka::Broker::shared();
    let on_a = broker
        .read_until(&rig.topic_of("a"), Duration::from_secs(10), |e| {
            e.len() >= 4
        })
        .await;
    let on_b = broker
        .read_until(&rig.topic_of("b"), Duration::from_secs(10), |e| {
            e.len() >= 5
        })
        .await;
    assert_eq!(on_a.len(), 4, "a's topic: {on_a:?}");
    assert_eq!(
        on_b.len(),
        5,
        "b's topic: {:?}",
        on_b.iter().map(|e| &e.source.table).collect::<Vec<_>>()
    );
    assert!(on_a.iter().all(|e| e.source.node == "a"));
    assert_eq!(d.stop().await, Some(0));
}

#[tokio::test]
async fn equal_timestamps_resolve_to_the_same_winner_on_both() {
    let rig = Rig::both(ITEMS, &["public.items"], "").await;
    assert!(rig.command(&["setup"]).status.success());
    let (a, b) = clients(&rig).await;
    // The directions start (they apply what comes after their first start on the
    // stream), then stop.
    let d = rig.start();
    d.wait_applying(2).await;
    assert_eq!(d.stop().await, Some(0));
    let ts = "'2030-01-01 00:00:00+00'";
    // Both nodes write the same key with the same updated_at while duplex is down.
    a.batch_execute(&format!("INSERT INTO items VALUES (1, 'from a', 1, {ts})"))
        .await
        .unwrap();
    b.batch_execute(&format!("INSERT INTO items VALUES (1, 'from b', 2, {ts})"))
        .await
        .unwrap();
    let d = rig.start();
    d.wait_applying(2).await;
    converge(&a, &b, &["items"], Duration::from_secs(30)).await;
    assert!(
        rows(&a, "items").await[0].contains("from a"),
        "a, the first node, wins ties"
    );
    // The losing side's version is recorded as a conflict on a.
    wait_for("the conflict on a", Duration::from_secs(10), || {
        let a = &a;
        async move {
            (count(
                a,
                "SELECT count(*) FROM duplex.conflicts WHERE resolution = 'kept_local'",
            )
            .await
                == 1)
                .then_some(())
        }
    })
    .await;
    assert_eq!(d.stop().await, Some(0));
}

#[tokio::test]
async fn deletes_win_over_older_updates_and_lose_to_newer_ones() {
    let rig = Rig::both(ITEMS, &["public.items"], "").await;
    assert!(rig.command(&["setup"]).status.success());
    let (a, b) = clients(&rig).await;
    let d = rig.start();
    a.batch_execute("INSERT INTO items (id, val) VALUES (1, 'x'), (2, 'y')")
        .await
        .unwrap();
    converge(&a, &b, &["items"], Duration::from_secs(30)).await;
    assert_eq!(d.stop().await, Some(0));
    // Row 1: b updates, then a deletes (newer) → stays deleted.
    // Row 2: a deletes, then b updates (newer) → comes back everywhere.
    b.batch_execute("UPDATE items SET val = 'b1', updated_at = clock_timestamp() WHERE id = 1")
        .await
        .unwrap();
    a.batch_execute("DELETE FROM items WHERE id = 1")
        .await
        .unwrap();
    a.batch_execute("DELETE FROM items WHERE id = 2")
        .await
        .unwrap();
    b.batch_execute("UPDATE items SET val = 'b2', updated_at = clock_timestamp() WHERE id = 2")
        .await
        .unwrap();
    let d = rig.start();
    converge(&a, &b, &["items"], Duration::from_secs(30)).await;
    let left = rows(&a, "items").await;
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(
        left[0].contains("\"id\":2") && left[0].contains("b2"),
        "{left:?}"
    );
    assert_eq!(d.stop().await, Some(0));
}

#[tokio::test]
async fn parent_and_child_in_one_transaction_apply_in_order() {
    let ddl = "CREATE TABLE parent (id int PRIMARY KEY, updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
               CREATE TABLE child (id int PRIMARY KEY, parent_id int NOT NULL REFERENCES parent(id),
                                   updated_at timestamptz NOT NULL DEFAULT clock_timestamp());";
    let rig = Rig::new(ddl, &["public.parent", "public.child"], "").await;
    assert!(rig.command(&["setup"]).status.success());
    let d = rig.start();
    let (a, b) = clients(&rig).await;
    a.batch_execute(
        "BEGIN; INSERT INTO parent (id) VALUES (1); INSERT INTO child (id, parent_id) VALUES (1, 1), (2, 1); COMMIT;",
    )
    .await
    .unwrap();
    converge(&a, &b, &["parent", "child"], Duration::from_secs(30)).await;
    assert_eq!(rows(&b, "child").await.len(), 2);
    assert!(!d.logs().contains("halted"), "{}", d.logs());
    assert_eq!(d.stop().await, Some(0));
}

#[tokio::test]
async fn a_new_topic_prefix_is_read_from_its_beginning() {
    let rig = Rig::both(ITEMS, &["public.items"], "").await;
    assert!(rig.command(&["setup"]).status.success());
    let (a, b) = clients(&rig).await;
    let d = rig.start();
    a.batch_execute("INSERT INTO items (id, val) SELECT g, 'first' FROM generate_series(1, 5) g")
        .await
        .unwrap();
    converge(&a, &b, &["items"], Duration::from_secs(30)).await;
    assert_eq!(d.stop().await, Some(0));
    // Another topic is another stream: positions stored for the old one do not apply.
    let old = format!("topic_prefix = \"{}\"", rig.prefix);
    rig.edit_config(&[(&old, &format!("topic_prefix = \"{}_v2\"", rig.prefix))]);
    let d = rig.start();
    a.batch_execute("INSERT INTO items (id, val) VALUES (6, 'second'), (7, 'second')")
        .await
        .unwrap();
    converge(&a, &b, &["items"], Duration::from_secs(30)).await;
    assert_eq!(rows(&b, "items").await.len(), 7);
    assert_eq!(d.stop().await, Some(0));
}

#[tokio::test]
async fn partitioned_tables_and_generated_always_identities_sync() {
    let ddl = "CREATE TABLE events (id int GENERATED ALWAYS AS IDENTITY, day date, val text,
                 updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
                 PRIMARY KEY (id, day)) PARTITION BY RANGE (day);
               CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
               CREATE TABLE events_2027 PARTITION OF events FOR VALUES FROM ('2027-01-01') TO ('2028-01-01');";
    let rig = Rig::both(ddl, &["public.events"], "").await;
    assert!(rig.command(&["setup"]).status.success());
    let d = rig.start();
    let (a, b) = clients(&rig).await;
    a.batch_execute(
        "INSERT INTO events (day, val) VALUES ('2026-05-01', 'x'), ('2027-05-01', 'y');
         UPDATE events SET val = 'x2', updated_at = clock_timestamp() WHERE id = 1;",
    )
    .await
    .unwrap();
    b.batch_execute("DELETE FROM events WHERE false")
        .await
        .unwrap();
    converge(&a, &b, &["events"], Duration::from_secs(30)).await;
    assert_eq!(
        count(&b, "SELECT count(*) FROM events WHERE val IN ('x2', 'y')").await,
        2
    );
    b.batch_execute("DELETE FROM events WHERE id = 2")
        .await
        .unwrap();
    converge(&a, &b, &["events"], Duration::from_secs(30)).await;
    assert_eq!(count(&a, "SELECT count(*) FROM events").await, 1);
    assert_eq!(d.stop().await, Some(0));
}

#[tokio::test]
async fn a_truncate_removes_what_is_older_and_keeps_what_is_newer() {
    let ddl = "CREATE TABLE parent (id int PRIMARY KEY, name text, updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
               CREATE TABLE child (id int PRIMARY KEY, parent_id int NOT NULL REFERENCES parent(id), note text,
                                   updated_at timestamptz NOT NULL DEFAULT clock_timestamp());";
    let rig = Rig::both(ddl, &["public.parent", "public.child"], "").await;
    assert!(rig.command(&["setup"]).status.success());
    let (a, b) = clients(&rig).await;
    let d = rig.start();
    a.batch_execute(
        "INSERT INTO parent (id, name) VALUES (1, 'one'), (2, 'two');
         INSERT INTO child (id, parent_id, note) VALUES (1, 1, 'c');",
    )
    .await
    .unwrap();
    converge(&a, &b, &["parent", "child"], Duration::from_secs(30)).await;
    assert_eq!(d.stop().await, Some(0));
    // While duplex is down: b edits parent 2, a truncates both tables (the later
    // change), then b adds parent 3 (later still).
    b.batch_execute(
        "UPDATE parent SET name = 'two on b', updated_at = clock_timestamp() WHERE id = 2",
    )
    .await
    .unwrap();
    a.batch_execute("TRUNCATE parent, child").await.unwrap();
    b.batch_execute("INSERT INTO parent (id, name) VALUES (3, 'three')")
        .await
        .unwrap();
    let d = rig.start();
    converge(&a, &b, &["parent", "child"], Duration::from_secs(30)).await;
    let names: String = a
        .query_one("SELECT string_agg(name, ',' ORDER BY id) FROM parent", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(names, "three");
    assert_eq!(count(&b, "SELECT count(*) FROM child").await, 0);
    assert_eq!(d.stop().await, Some(0));
}

/// `lines` rows that disagree with their own generated column, on `c`.
async fn wrong_totals(c: &Client) -> i64 {
    count(
        c,
        "SELECT count(*) FROM lines WHERE total IS DISTINCT FROM price * qty",
    )
    .await
}

#[tokio::test]
async fn conflicts_on_a_table_with_a_stored_generated_column_repair_both_ways() {
    let ddl = "CREATE TABLE lines (id int PRIMARY KEY, price int NOT NULL, qty int NOT NULL,
                 total int GENERATED ALWAYS AS (price * qty) STORED,
                 updated_at timestamptz NOT NULL DEFAULT clock_timestamp());";
    let rig = Rig::both(ddl, &["public.lines"], "").await;
    assert!(rig.command(&["setup"]).status.success());
    let (a, b) = clients(&rig).await;
    let d = rig.start();
    d.wait_applying(2).await;
    a.batch_execute(
        "INSERT INTO lines (id, price, qty) SELECT g, 10, g FROM generate_series(1, 6) g",
    )
    .await
    .unwrap();
    converge(&a, &b, &["lines"], Duration::from_secs(30)).await;
    assert_eq!(d.stop().await, Some(0));
    // While duplex is down, both nodes edit the same keys, each with its own clock:
    // b's edits of 1 and 2 are the newer, a's edit of 3 is. Each node then meets the
    // other's older version, keeps its own and sends it back as a repair.
    a.batch_execute(
        "UPDATE lines SET qty = 100, updated_at = clock_timestamp() WHERE id IN (1, 2)",
    )
    .await
    .unwrap();
    b.batch_execute(
        "UPDATE lines SET price = 20, updated_at = clock_timestamp() WHERE id IN (1, 2)",
    )
    .await
    .unwrap();
    b.batch_execute("UPDATE lines SET qty = 7, updated_at = clock_timestamp() WHERE id = 3")
        .await
        .unwrap();
    a.batch_execute("UPDATE lines SET price = 30, updated_at = clock_timestamp() WHERE id = 3")
        .await
        .unwrap();
    let d = rig.start();
    d.wait_applying(2).await;
    converge(&a, &b, &["lines"], Duration::from_secs(30)).await;
    for (node, c) in [("a", &a), ("b", &b)] {
        wait_for(&format!("a repair written on {node}"), Duration::from_secs(20), || async move {
            (count(c, "SELECT count(*) FROM duplex.repairs").await > 0).then_some(())
        })
        .await;
    }
    // A repair image from elsewhere (written before generated columns were left out,
    // waiting in the topic or the dead-letter queue) still carries the column, with a
    // value of its own: the target computes the column rather than refusing the row.
    b.batch_execute(
        "UPDATE lines SET price = 11, updated_at = clock_timestamp() WHERE id = 6;
         INSERT INTO duplex.repairs (table_name, key, image)
         SELECT 'public.lines', jsonb_build_array(id::text),
                jsonb_build_object('id', id::text, 'price', price::text, 'qty', qty::text,
                                   'total', '999', 'updated_at', updated_at::text)
         FROM lines WHERE id = 6;",
    )
    .await
    .unwrap();
    // Both directions still run: later writes on either node arrive.
    a.batch_execute("UPDATE lines SET qty = 40, updated_at = clock_timestamp() WHERE id = 4")
        .await
        .unwrap();
    b.batch_execute("UPDATE lines SET qty = 50, updated_at = clock_timestamp() WHERE id = 5")
        .await
        .unwrap();
    converge(&a, &b, &["lines"], Duration::from_secs(30)).await;
    let totals: Vec<i32> = a
        .query("SELECT total FROM lines ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(totals, vec![20, 40, 90, 400, 500, 66]);
    assert_eq!(wrong_totals(&a).await, 0);
    assert_eq!(wrong_totals(&b).await, 0);
    assert!(!d.logs().contains("halted"), "{}", d.logs());
    assert_eq!(d.stop().await, Some(0));
}
