//! Initial sync at its edges: statistics older than a bulk load, look-alike table
//! names and target-only columns in the merge's staging table, a plan replaced while
//! a chunk of the old one is copied, and rows frozen long before duplex.

use crate::harness::duplex::Rig;
use crate::harness::pg::Cluster;
use crate::harness::tables::{identical, ITEMS};
use crate::harness::{count, wait_for};
use std::time::Duration;
use tokio_postgres::Client;

async fn clients(rig: &Rig) -> (Client, Client) {
    let cl = rig.cluster;
    (cl.client(&rig.db_a).await, rig.client_b().await)
}

/// Two tables, one of them partitioned, analyzed at 1,000 rows, then bulk-loaded to
/// 80,000 (about 30 MB each) with autovacuum off: the plan cuts each by its size now,
/// into a few chunks, not by the stale count into one chunk per few hundred rows.
#[tokio::test]
async fn statistics_older_than_a_bulk_load_do_not_cut_a_chunk_per_few_rows() {
    let ddl = "CREATE TABLE docs (id text PRIMARY KEY, body text,
                 updated_at timestamptz NOT NULL DEFAULT clock_timestamp()) PARTITION BY HASH (id);
               CREATE TABLE docs_0 PARTITION OF docs FOR VALUES WITH (MODULUS 2, REMAINDER 0)
                 WITH (autovacuum_enabled = false);
               CREATE TABLE docs_1 PARTITION OF docs FOR VALUES WITH (MODULUS 2, REMAINDER 1)
                 WITH (autovacuum_enabled = false);
               CREATE TABLE notes (id text PRIMARY KEY, body text,
                 updated_at timestamptz NOT NULL DEFAULT clock_timestamp())
                 WITH (autovacuum_enabled = false);";
    let rig = Rig::new(ddl, &["public.docs", "public.notes"], "").await;
    let (a, b) = clients(&rig).await;
    for t in ["docs", "notes"] {
        a.batch_execute(&format!(
            "INSERT INTO {t} (id, body) SELECT md5(i::text), repeat('x', 300) FROM generate_series(1, 1000) i;
             ANALYZE {t};
             INSERT INTO {t} (id, body) SELECT md5(i::text), repeat(md5(i::text), 10)
               FROM generate_series(1001, 80000) i;"
        ))
        .await
        .unwrap();
    }
    let stale =
        "SELECT sum(reltuples)::int8 FROM pg_class WHERE relname IN ('docs_0', 'docs_1', 'notes')";
    assert_eq!(
        count(&a, stale).await,
        2000,
        "the statistics must still say 1,000 rows each"
    );
    let d = rig.start();
    d.wait_applying(1).await;
    identical(
        &a,
        &b,
        &["public.docs", "public.notes"],
        Duration::from_secs(60),
    )
    .await;
    // 30 MB at 16 MB a chunk, 80,000 rows at 50,000: 2 or 3 chunks. The stale count
    // made 150 of the partitioned table (every 530th key a bound).
    for t in ["public.docs", "public.notes"] {
        let plan = b
            .query_one(
                "SELECT chunks::int8, rows_estimated FROM duplex.snapshots WHERE table_name = $1",
                &[&t],
            )
            .await
            .unwrap();
        let (chunks, estimated): (i64, i64) = (plan.get(0), plan.get(1));
        assert!(
            (2..=8).contains(&chunks),
            "{t}: {chunks} chunks for {estimated} rows estimated"
        );
    }
    assert_eq!(d.stop().await, Some(0));
}

/// `public.a_b` and `public_a.b`, of different columns, merged by one worker: each
/// has a staging table of its own.
#[tokio::test]
async fn look_alike_table_names_get_staging_tables_of_their_own() {
    let ddl = "CREATE SCHEMA public_a;
               CREATE TABLE public.a_b (id int PRIMARY KEY, val text,
                 updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
               CREATE TABLE public_a.b (id int PRIMARY KEY, note text, qty int,
                 updated_at timestamptz NOT NULL DEFAULT clock_timestamp());";
    let rig = Rig::both(
        ddl,
        &["public.a_b", "public_a.b"],
        "[snapshot]\nmode = \"merge\"\nworkers = 1\nchunk_rows = 500\n",
    )
    .await;
    let (a, b) = clients(&rig).await;
    for (c, from, to) in [(&a, 1, 1500), (&b, 1001, 2500)] {
        c.batch_execute(&format!(
            "INSERT INTO public.a_b (id, val) SELECT i, 'v' || i FROM generate_series({from}, {to}) i;
             INSERT INTO public_a.b (id, note, qty) SELECT i, 'n' || i, i FROM generate_series({from}, {to}) i;"
        ))
        .await
        .unwrap();
    }
    // Of the shared keys, b's versions are newer.
    b.batch_execute(
        "UPDATE public.a_b SET val = 'b newer', updated_at = clock_timestamp() WHERE id <= 1500;
         UPDATE public_a.b SET note = 'b newer', updated_at = clock_timestamp() WHERE id <= 1500;",
    )
    .await
    .unwrap();
    let d = rig.start();
    d.wait_applying(2).await;
    identical(
        &a,
        &b,
        &["public.a_b", "public_a.b"],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(count(&a, "SELECT count(*) FROM public_a.b").await, 2500);
    assert_eq!(
        count(&a, "SELECT count(*) FROM public.a_b WHERE val = 'b newer'").await,
        500
    );
    assert_eq!(d.stop().await, Some(0));
}

/// The target has a column the source lacks, `NOT NULL` with a default: merged rows
/// take the default, as an insert into the table would.
#[tokio::test]
async fn a_target_only_not_null_column_takes_its_default_in_a_merge() {
    let rig = Rig::new(
        ITEMS,
        &["public.items"],
        "[snapshot]\nmode = \"merge\"\nchunk_rows = 500\n",
    )
    .await;
    let (a, b) = clients(&rig).await;
    b.batch_execute(
        "ALTER TABLE items ADD COLUMN region text NOT NULL DEFAULT 'eu';
         INSERT INTO items (id, val, qty, region) SELECT i, 'b', i, 'us' FROM generate_series(1, 100) i;",
    )
    .await
    .unwrap();
    a.batch_execute(
        "INSERT INTO items (id, val, qty) SELECT i, 'a', i FROM generate_series(51, 2000) i",
    )
    .await
    .unwrap();
    let d = rig.start();
    d.wait_applying(1).await;
    assert_eq!(count(&b, "SELECT count(*) FROM items").await, 2000);
    // a's newer versions of keys 51..100 replaced b's, keeping b's own column.
    assert_eq!(
        count(
            &b,
            "SELECT count(*) FROM items WHERE val = 'a' AND region = 'eu'"
        )
        .await,
        1900
    );
    assert_eq!(
        count(
            &b,
            "SELECT count(*) FROM items WHERE val = 'a' AND region = 'us'"
        )
        .await,
        50
    );
    assert_eq!(d.stop().await, Some(0));
}

/// Waits until the copy worker's COPY into b waits for the session `holder` (which
/// holds an inserted row uncommitted).
async fn wait_copy_blocked_by(b: &Client, holder: i32) {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity
         WHERE application_name = 'duplex snapshot a_to_b #0'
           AND pg_blocking_pids(pid) @> ARRAY[{holder}]"
    );
    wait_for(
        &format!("the copy waiting for session {holder}"),
        Duration::from_secs(60),
        || async { (count(b, &sql).await > 0).then_some(()) },
    )
    .await;
}

/// `duplex snapshot` replaces the plan (one chunk for the whole table) while the
/// daemon copies chunk 0 of the old one (keys up to 1000), and is interrupted. The
/// daemon's worker must not mark the new chunk 0, which spans every key, copied with
/// the old one's rows: else, once the daemon too is killed, the copy ends without
/// keys above 1000.
#[tokio::test]
async fn a_worker_of_a_replaced_plan_marks_none_of_the_new_plans_chunks() {
    let rig = Rig::new(
        ITEMS,
        &["public.items"],
        "[snapshot]\nworkers = 1\nchunk_rows = 1000\n",
    )
    .await;
    rig.edit_config(&[(
        "linger_ms = 10",
        "linger_ms = 10\nreceive_timeout_ms = 2000",
    )]);
    let (a, b) = clients(&rig).await;
    a.batch_execute(
        "INSERT INTO items (id, val, qty) SELECT i, 'a', i FROM generate_series(1, 2000) i; ANALYZE items",
    )
    .await
    .unwrap();
    assert!(rig.command(&["setup"]).status.success());
    // Rows the copy will meet, held uncommitted: it waits on each in turn.
    let (hold0, hold1) = (clients(&rig).await.1, clients(&rig).await.1);
    let mut pids = Vec::new();
    for (c, id) in [(&hold0, 500), (&hold1, 1500)] {
        pids.push(count(c, "SELECT pg_backend_pid()::int8").await as i32);
        c.batch_execute(&format!(
            "BEGIN; INSERT INTO items (id, val) VALUES ({id}, 'held')"
        ))
        .await
        .unwrap();
    }
    let d = rig.start();
    wait_copy_blocked_by(&b, pids[0]).await;
    assert_eq!(
        count(&b, "SELECT count(*) FROM duplex.snapshot_chunks").await,
        2
    );
    // The plan made again, with one chunk; the command's own copy then fails (the
    // daemon's worker holds the origin).
    let text = std::fs::read_to_string(&rig.config)
        .unwrap()
        .replace("chunk_rows = 1000", "chunk_rows = 5000");
    let other = rig.dir.join("replan.toml");
    std::fs::write(&other, text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_duplex"))
        .args(["snapshot", "--table", "public.items", "--config"])
        .arg(&other)
        .output()
        .unwrap();
    let said = crate::harness::output_text(&out);
    assert!(!out.status.success(), "{said}");
    assert_eq!(
        count(&b, "SELECT count(*) FROM duplex.snapshot_chunks").await,
        1,
        "{said}"
    );
    // The old chunk 0 goes on; then the worker waits on key 1500: in the old plan's
    // chunk 1, or (the old chunk given up) in the new plan's only chunk.
    hold0.batch_execute("ROLLBACK").await.unwrap();
    wait_copy_blocked_by(&b, pids[1]).await;
    let logs = d.logs();
    assert!(logs.contains("was planned again"), "{logs}");
    d.kill9();
    hold1.batch_execute("ROLLBACK").await.unwrap();
    let d = rig.start();
    d.wait_applying(1).await;
    identical(&a, &b, &["public.items"], Duration::from_secs(60)).await;
    assert_eq!(d.stop().await, Some(0));
}

/// Rows frozen long ago keep their 32-bit `xmin`, which wraps: three billion
/// transactions later they read as younger than the current transaction
/// (`age(xmin)` negative). Both nodes hold such rows, written before duplex: the
/// `initial` mode refuses, as for any rows older than duplex.
#[tokio::test]
async fn rows_frozen_billions_of_transactions_ago_predate_duplex() {
    let cluster: &'static Cluster = Box::leak(Box::new(Cluster::start(&[("autovacuum", "off")])));
    let rig = Rig::new_on(cluster, ITEMS, &["public.items"], "").await;
    {
        let (a, b) = clients(&rig).await;
        a.batch_execute("INSERT INTO items (id, val) SELECT i, 'a' FROM generate_series(1, 100) i")
            .await
            .unwrap();
        b.batch_execute(
            "INSERT INTO items (id, val) SELECT i, 'b' FROM generate_series(101, 200) i",
        )
        .await
        .unwrap();
    }
    for db in [
        "postgres",
        "template1",
        rig.db_a.as_str(),
        rig.db_b.as_str(),
    ] {
        cluster.psql(db, "VACUUM FREEZE");
    }
    cluster.advance_xids(3_000_000_000);
    let (a, _) = clients(&rig).await;
    let ages = a
        .query_one("SELECT min(age(xmin))::int8, count(*) FROM items", &[])
        .await
        .unwrap();
    assert!(ages.get::<_, i64>(0) < 0, "the rows' age must have wrapped");
    assert_eq!(ages.get::<_, i64>(1), 100);
    let d = rig.start();
    d.wait_log(
        "public.items holds rows on both node a and node b",
        1,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(count(&a, "SELECT count(*) FROM items").await, 100);
    d.stop().await;
}
