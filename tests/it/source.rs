//! Node → Kafka: every committed change lands on the node's topic, in commit order,
//! with exact values, across kill -9; idle slots advance; duplex's own applied
//! transactions are not published.

use crate::harness::duplex::Rig;
use crate::harness::kafka::Broker;
use crate::harness::pg::Cluster;
use crate::harness::wait_for;
use duplex::event::{ChangeEvent, Lsn, Op, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tokio_postgres::Client;

const TYPES_DDL: &str = "
CREATE TYPE mood AS ENUM ('happy', 'sad', 'ünïcode');
CREATE TABLE items (
    id bigint PRIMARY KEY, n numeric(24,6), ts timestamptz, j jsonb, arr int4[], tags text[],
    b bytea, u uuid, m mood, t text, f float8, d date, big text,
    updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE other (k text PRIMARY KEY, v int, updated_at timestamptz NOT NULL DEFAULT now());
";

/// Column name and value as PostgreSQL prints it (`col::text`), NULL as `None`.
type RowText = Vec<(String, Option<String>)>;

/// Each column of one row as PostgreSQL prints it (`col::text`), NULL as `None`.
async fn row_text(c: &Client, table: &str, key_col: &str, key: &str) -> RowText {
    let cols: Vec<String> = c
        .query(
            "SELECT attname::text FROM pg_attribute WHERE attrelid = $1::text::regclass AND attnum > 0
             AND NOT attisdropped ORDER BY attnum",
            &[&table],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let select: Vec<String> = cols.iter().map(|c| format!("{c}::text")).collect();
    let sql = format!(
        "SELECT {} FROM {table} WHERE {key_col}::text = $1",
        select.join(", ")
    );
    let row = c.query_one(&sql, &[&key]).await.unwrap();
    cols.iter()
        .enumerate()
        .map(|(i, name)| (name.clone(), row.get(i)))
        .collect()
}

fn as_text(ev_row: &duplex::event::Row) -> RowText {
    ev_row
        .0
        .iter()
        .map(|(c, v)| match v {
            Value::Null => (c.clone(), None),
            Value::Text(t) => (c.clone(), Some(t.clone())),
            Value::UnchangedToast => panic!("unexpected unchanged-TOAST in {c}"),
        })
        .collect()
}

/// Commit order: positions never go back, each transaction's events are numbered
/// 0..n with only the n-th flagged last.
fn assert_commit_order(events: &[ChangeEvent]) {
    for pair in events.windows(2) {
        let (p, n) = (&pair[0].source, &pair[1].source);
        if p.lsn == n.lsn {
            assert_eq!(n.seq, p.seq + 1, "gap in transaction {}", p.lsn);
            assert!(!p.last, "event after the last of {}", p.lsn);
        } else {
            assert!(n.lsn > p.lsn, "commit {} after {}", n.lsn, p.lsn);
            assert!(p.last, "transaction {} ended without its last event", p.lsn);
            assert_eq!(n.seq, 0);
        }
    }
}

#[tokio::test]
async fn changes_arrive_in_commit_order_with_exact_values() {
    let rig = Rig::new(TYPES_DDL, &["public.items", "public.other"], "").await;
    // The slot exists from `setup` on: what is committed after it is streamed.
    assert!(rig.command(&["setup"]).status.success());
    let daemon = rig.start();
    let c = Cluster::shared().client(&rig.db_a).await;
    c.batch_execute(
        "BEGIN;
         INSERT INTO items (id, n, ts, j, arr, tags, b, u, m, t, f, d) VALUES
           (1, 12345678901234.123456, '2024-02-29 23:59:59.123456+05:30', '{\"b\": [1, 2], \"a\": \"x\"}',
            '{1,NULL,3}', '{\"a b\",\"c,d\",é,NULL}', '\\x00ff10', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
            'ünïcode', E'Zoë 日本 😀 \"q\" \\\\ back\\nline', 0.1, '2024-01-31'),
           (2, -0.000001, 'infinity', 'null', '{}', '{}', '\\x', '00000000-0000-0000-0000-000000000000',
            'sad', '', 'NaN', '0001-01-01 BC'),
           (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
         INSERT INTO other (k, v) VALUES ('x', 1);
         COMMIT;",
    )
    .await
    .unwrap();
    let mut expected: Vec<(String, RowText)> = Vec::new();
    for id in ["1", "2", "3"] {
        expected.push(("c".into(), row_text(&c, "items", "id", id).await));
    }
    expected.push(("c".into(), row_text(&c, "other", "k", "x").await));
    c.batch_execute("UPDATE items SET n = 1.5, t = 'changed' WHERE id = 1")
        .await
        .unwrap();
    expected.push(("u".into(), row_text(&c, "items", "id", "1").await));
    c.batch_execute("DELETE FROM items WHERE id = 2")
        .await
        .unwrap();
    expected.push(("d".into(), vec![("id".into(), Some("2".into()))]));
    // A TOASTed value, then an update that leaves it untouched.
    c.batch_execute(
        "INSERT INTO items (id, big) SELECT 10, string_agg(md5(random()::text), '') FROM generate_series(1, 400);
         UPDATE items SET t = 'toast kept' WHERE id = 10;
         UPDATE other SET k = 'y' WHERE k = 'x';
         TRUNCATE other;",
    )
    .await
    .unwrap();
    let big = row_text(&c, "items", "id", "10").await;
    for i in 0..50 {
        c.batch_execute(&format!(
            "INSERT INTO other (k, v) SELECT 'k{i}_' || g, g FROM generate_series(1, 10) g"
        ))
        .await
        .unwrap();
    }
    // Row changes, plus the tombstones the triggers wrote with the delete and the key
    // change, and the truncation record written with the truncate.
    let total = 4 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 500 + 1;
    let all = Broker::shared()
        .read_until(&rig.topic(), Duration::from_secs(60), move |e| {
            e.len() >= total
        })
        .await;
    assert_eq!(all.len(), total, "events on the topic");
    assert_commit_order(&all);
    let tombstone = &all[6];
    assert_eq!(
        (
            tombstone.source.schema.as_str(),
            tombstone.source.table.as_str()
        ),
        ("duplex", "tombstones")
    );
    assert_eq!(
        tombstone.after.as_ref().unwrap().get("key"),
        Some(&Value::Text("[\"2\"]".into()))
    );
    assert_eq!(
        tombstone.source.lsn, all[5].source.lsn,
        "the tombstone commits with its delete"
    );
    let truncation = all
        .iter()
        .find(|e| e.source.table == "truncations")
        .expect("no truncation record on the topic");
    assert_eq!(
        truncation.after.as_ref().unwrap().get("table_name"),
        Some(&Value::Text("public.other".into()))
    );
    let truncate = all.iter().find(|e| e.op == Op::Truncate).unwrap();
    assert_eq!(truncation.source.lsn, truncate.source.lsn);
    let events: Vec<ChangeEvent> = all
        .into_iter()
        .filter(|e| e.source.schema != "duplex")
        .collect();
    // The first transaction: four inserts with exact values.
    for (ev, (op, row)) in events.iter().zip(&expected) {
        let image = if ev.op == Op::Delete {
            &ev.before
        } else {
            &ev.after
        };
        assert_eq!(serde_json::to_value(ev.op).unwrap(), op.as_str());
        assert_eq!(
            &as_text(image.as_ref().unwrap()),
            row,
            "event {}",
            ev.position()
        );
    }
    let first = &events[0];
    assert_eq!(first.source.node, "a");
    assert_eq!(first.source.db, rig.db_a);
    assert_eq!(
        (first.source.schema.as_str(), first.source.table.as_str()),
        ("public", "items")
    );
    assert_eq!(first.key, vec!["id".to_string()]);
    let types: BTreeMap<_, _> = first.types.iter().cloned().collect();
    assert_eq!(types["n"], "numeric(24,6)");
    assert_eq!(types["m"], "mood");
    assert_eq!(types["arr"], "integer[]");
    assert!(first.source.commit_ts_us > 1_600_000_000_000_000);
    assert_eq!(events[3].source.table, "other");
    assert!(events[3].source.last && events[3].source.seq == 3);
    // TOAST: inserted in full, then unchanged-TOAST (not NULL) on the update.
    let ins = &events[6];
    assert_eq!(
        as_text(ins.after.as_ref().unwrap())
            .iter()
            .find(|c| c.0 == "big"),
        big.iter().find(|c| c.0 == "big")
    );
    let upd = &events[7];
    assert_eq!(upd.op, Op::Update);
    assert_eq!(
        upd.after.as_ref().unwrap().get("big"),
        Some(&Value::UnchangedToast)
    );
    assert_eq!(
        upd.after.as_ref().unwrap().get("t"),
        Some(&Value::Text("toast kept".into()))
    );
    // A key change carries the old key.
    let rekey = &events[8];
    assert_eq!(
        rekey.before.as_ref().unwrap().get("k"),
        Some(&Value::Text("x".into()))
    );
    assert_eq!(
        rekey.after.as_ref().unwrap().get("k"),
        Some(&Value::Text("y".into()))
    );
    assert_eq!(events[9].op, Op::Truncate);
    assert_eq!(events[9].source.table, "other");
    assert_eq!(daemon.stop().await, Some(0));
}

#[tokio::test]
async fn kill_9_mid_stream_loses_nothing() {
    let ddl = "CREATE TABLE seq_items (id bigint PRIMARY KEY, payload text, updated_at timestamptz NOT NULL DEFAULT now());";
    let rig = Rig::new(ddl, &["public.seq_items"], "").await;
    let c = Cluster::shared().client(&rig.db_a).await;
    let out = rig.command(&["setup"]);
    assert!(out.status.success());
    // A backlog of 2000 transactions of 10 rows, written before duplex runs.
    c.batch_execute(
        "DO $$ BEGIN FOR t IN 0..1999 LOOP
           INSERT INTO seq_items (id, payload) SELECT t * 10 + g, repeat('x', 100) FROM generate_series(0, 9) g;
           COMMIT;
         END LOOP; END $$;",
    )
    .await
    .unwrap();
    let broker = Broker::shared();
    for threshold in [3_000usize, 9_000, 15_000] {
        let d = rig.start();
        broker
            .read_until(&rig.topic(), Duration::from_secs(120), move |e| {
                e.len() >= threshold
            })
            .await;
        d.kill9();
    }
    // More writes while duplex is down, then a final run to the end.
    c.batch_execute(
        "DO $$ BEGIN FOR t IN 2000..2499 LOOP
           INSERT INTO seq_items (id, payload) SELECT t * 10 + g, 'late' FROM generate_series(0, 9) g;
           COMMIT;
         END LOOP; END $$;",
    )
    .await
    .unwrap();
    let d = rig.start();
    let all: BTreeSet<i64> = (0..25_000).collect();
    let events = broker
        .read_until(&rig.topic(), Duration::from_secs(180), move |events| {
            let ids: BTreeSet<i64> = events.iter().map(id_of).collect();
            ids.len() == all.len()
        })
        .await;
    let ids: BTreeSet<i64> = events.iter().map(id_of).collect();
    assert_eq!(ids.len(), 25_000, "rows missing from the topic");
    // Duplicates are allowed; dropping them must leave the history in commit order,
    // every transaction whole.
    let mut seen = BTreeSet::new();
    let unique: Vec<ChangeEvent> = events
        .into_iter()
        .filter(|e| seen.insert(e.position()))
        .collect();
    assert_commit_order(&unique);
    assert_eq!(unique.len(), 25_000);
    assert_eq!(d.stop().await, Some(0));
}

fn id_of(e: &ChangeEvent) -> i64 {
    match e.after.as_ref().and_then(|r| r.get("id")) {
        Some(Value::Text(t)) => t.parse().unwrap(),
        other => panic!("no id in {other:?}"),
    }
}

async fn confirmed_flush(c: &Client, slot: &str) -> Lsn {
    let row = c
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap();
    let s: Option<String> = row.and_then(|r| r.get(0));
    s.map(|s| s.parse().unwrap()).unwrap_or_default()
}

#[tokio::test]
async fn idle_node_slot_keeps_advancing() {
    let ddl =
        "CREATE TABLE quiet (id int PRIMARY KEY, updated_at timestamptz NOT NULL DEFAULT now());";
    let rig = Rig::new(ddl, &["public.quiet"], "").await;
    let d = rig.start();
    let c = Cluster::shared().client(&rig.db_a).await;
    let slot = rig.slot_a();
    wait_for("the slot to exist", Duration::from_secs(30), || {
        let (c, slot) = (&c, slot.clone());
        async move { (confirmed_flush(c, &slot).await > Lsn::ZERO).then_some(()) }
    })
    .await;
    // WAL written elsewhere in the cluster, none of it for this publication.
    let other_db = Cluster::shared().create_db();
    let o = Cluster::shared().client(&other_db).await;
    o.batch_execute("CREATE TABLE noise AS SELECT g FROM generate_series(1, 10000) g")
        .await
        .unwrap();
    let target: String = o
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let target: Lsn = target.parse().unwrap();
    wait_for(
        "confirmed_flush_lsn to pass the other database's WAL",
        Duration::from_secs(30),
        || {
            let (c, slot) = (&c, slot.clone());
            async move { (confirmed_flush(c, &slot).await >= target).then_some(()) }
        },
    )
    .await;
    assert_eq!(d.stop().await, Some(0));
}

#[tokio::test]
async fn transactions_under_a_duplex_origin_are_not_published() {
    let ddl =
        "CREATE TABLE echo (id int PRIMARY KEY, updated_at timestamptz NOT NULL DEFAULT now());";
    let rig = Rig::new(ddl, &["public.echo"], "").await;
    // Both directions, so node a has the origin for changes applied from b.
    rig.edit_config(&[("\"a_to_b\"", "\"both\"")]);
    let out = rig.command(&["setup"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = rig.start();
    let c = Cluster::shared().client(&rig.db_a).await;
    // Each statement its own transaction: the origin is taken at commit.
    for sql in [
        &format!(
            "SELECT pg_replication_origin_session_setup('{}_a_from_b')",
            rig.prefix
        ),
        "INSERT INTO echo (id) VALUES (1)",
        "SELECT pg_replication_origin_session_reset()",
        "INSERT INTO echo (id) VALUES (2)",
    ] {
        c.batch_execute(sql).await.unwrap();
    }
    let events = Broker::shared()
        .read_until(&rig.topic(), Duration::from_secs(30), |e| !e.is_empty())
        .await;
    assert_eq!(events.len(), 1);
    assert_eq!(
        events[0].after.as_ref().unwrap().get("id"),
        Some(&Value::Text("2".into()))
    );
    // Nothing else arrives later either: a marker written after it is the next event.
    c.batch_execute("INSERT INTO echo (id) VALUES (3)")
        .await
        .unwrap();
    let events = Broker::shared()
        .read_until(&rig.topic(), Duration::from_secs(30), |e| e.len() >= 2)
        .await;
    let ids: Vec<_> = events
        .iter()
        .map(|e| e.after.as_ref().unwrap().get("id").cloned())
        .collect();
    assert_eq!(
        ids,
        vec![Some(Value::Text("2".into())), Some(Value::Text("3".into()))]
    );
    assert_eq!(d.stop().await, Some(0));
}
