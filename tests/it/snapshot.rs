//! Initial sync: rows that exist before duplex first starts reach the peer, whatever
//! the application writes meanwhile, in `initial` (empty target) and `merge` (both
//! populated) modes, across SIGKILLs, and again on demand with `duplex snapshot`.

use crate::harness::duplex::Rig;
use crate::harness::pg::Cluster;
use crate::harness::tables::identical;
use crate::harness::{count, wait_for};
use std::time::{Duration, Instant};
use tokio_postgres::Client;

const DDL: &str = "
CREATE TABLE items (id int PRIMARY KEY, val text, n int,
                    updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE parent (id int PRIMARY KEY, name text,
                     updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE child (id int PRIMARY KEY, parent_id int NOT NULL REFERENCES parent(id), note text,
                    updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE docs (id int PRIMARY KEY, body text,
                   updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
";

/// Rows on node a before duplex first starts; `DUPLEX_SNAPSHOT_ROWS` overrides.
fn rows() -> i32 {
    std::env::var("DUPLEX_SNAPSHOT_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

const TABLES: &[&str] = &[
    "public.items",
    "public.parent",
    "public.child",
    "public.docs",
];

/// `rows` rows over the four tables of [`DDL`]: one in 50 a `docs` row with a body
/// of ~2.6 kB that does not compress (stored out of line, TOASTed).
async fn populate(c: &Client, rows: i32) {
    let (parents, children, docs) = (rows / 5, rows / 5, rows / 50);
    let items = rows - parents - children - docs;
    c.batch_execute(&format!(
        "INSERT INTO items (id, val, n) SELECT i, md5(i::text), i FROM generate_series(1, {items}) i;
         INSERT INTO parent (id, name) SELECT i, 'p' || i FROM generate_series(1, {parents}) i;
         INSERT INTO child (id, parent_id, note) SELECT i, 1 + i % {parents}, 'c' || i FROM generate_series(1, {children}) i;
         INSERT INTO docs (id, body) SELECT i, (SELECT string_agg(md5(random()::text || i || g), '') FROM generate_series(1, 80) g)
           FROM generate_series(1, {docs}) i;
         ANALYZE"
    ))
    .await
    .unwrap();
}

/// An application on `db`: several writers updating, deleting and re-inserting keys
/// of `items` (some in transactions held open a while) and adding children, until
/// `stop` turns true. Returns the changes committed.
async fn writers(db: &str, key_range: i32, stop: tokio::sync::watch::Receiver<bool>) -> u64 {
    let mut tasks = Vec::new();
    for w in 0..3 {
        let c = Cluster::shared().client(db).await;
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = crate::harness::workload::Rng(0x5eed ^ (w + 1));
            let mut changes = 0u64;
            while !*stop.borrow() {
                let k = 1 + rng.below(key_range as u64) as i32;
                let sql = match rng.below(6) {
                    0 => format!("DELETE FROM items WHERE id = {k}"),
                    1 => format!("INSERT INTO items (id, val, n) VALUES ({k}, 'again', {w}) ON CONFLICT (id) DO UPDATE SET val = 'upsert', updated_at = clock_timestamp()"),
                    2 => format!("BEGIN; UPDATE items SET n = n + 1, updated_at = clock_timestamp() WHERE id = {k}; SELECT pg_sleep(0.05); UPDATE docs SET body = body || 'x', updated_at = clock_timestamp() WHERE id = {}; COMMIT", 1 + k % 100),
                    3 => format!("INSERT INTO child (id, parent_id, note) VALUES ({}, 1, 'new') ON CONFLICT DO NOTHING", 10_000_000 + k),
                    _ => format!("UPDATE items SET val = 'w{w}', updated_at = clock_timestamp() WHERE id = {k}"),
                };
                c.batch_execute(&sql).await.unwrap();
                changes += 1;
            }
            changes
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total
}

async fn clients(rig: &Rig) -> (Client, Client) {
    let cl = Cluster::shared();
    (cl.client(&rig.db_a).await, rig.client_b().await)
}

#[tokio::test]
async fn a_populated_node_is_copied_into_an_empty_peer_while_the_application_writes() {
    let rig = Rig::both(DDL, TABLES, "[snapshot]\nworkers = 2\nchunk_rows = 25000\n").await;
    let (a, b) = clients(&rig).await;
    let rows = rows();
    populate(&a, rows).await;
    let d = rig.start();
    // The application keeps writing on a through the copy and a little after.
    let started = Instant::now();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let writing = tokio::spawn({
        let db = rig.db_a.clone();
        async move { writers(&db, rows / 2, stopped).await }
    });
    // b → a has nothing to copy: b was empty.
    d.wait_log(
        "snapshot copied direction=a_to_b",
        1,
        Duration::from_secs(600),
    )
    .await;
    let copy_secs = started.elapsed().as_secs_f64();
    stop.send(true).unwrap();
    let changes = writing.await.unwrap();
    assert!(changes > 0);
    // Every row, and every change made during the copy, on b.
    identical(&a, &b, TABLES, Duration::from_secs(300)).await;
    let copied = count(&b, "SELECT coalesce(sum(rows), 0)::int8 FROM duplex.snapshot_chunks WHERE copied_at IS NOT NULL").await;
    assert!(copied >= rows as i64 * 99 / 100, "copied {copied} rows");
    let status = rig.command(&["status"]);
    let text = crate::harness::output_text(&status);
    assert!(
        text.contains("snapshot public.items: done (direct)"),
        "{text}"
    );
    eprintln!("copied {rows} rows in {copy_secs:.1} s while {changes} changes were made");
    assert_eq!(d.stop().await, Some(0));
}

#[tokio::test]
async fn merge_brings_two_populated_nodes_level_under_last_writer_wins() {
    let rig = Rig::both(
        DDL,
        &["public.items"],
        "[snapshot]\nmode = \"merge\"\nchunk_rows = 10000\n",
    )
    .await;
    let (a, b) = clients(&rig).await;
    // a: keys 1..100000; b: keys 50001..150000. Of the shared keys, the even ones are
    // newer on a, the odd ones newer on b.
    a.batch_execute("INSERT INTO items (id, val, n, updated_at) SELECT i, 'a', 0, now() - interval '1 hour' FROM generate_series(1, 100000) i").await.unwrap();
    b.batch_execute("INSERT INTO items (id, val, n, updated_at) SELECT i, 'b', 0, now() - interval '1 hour' FROM generate_series(50001, 150000) i").await.unwrap();
    a.batch_execute(
        "UPDATE items SET val = 'a newer', updated_at = now() WHERE id > 50000 AND id % 2 = 0",
    )
    .await
    .unwrap();
    b.batch_execute(
        "UPDATE items SET val = 'b newer', updated_at = now() WHERE id <= 100000 AND id % 2 = 1",
    )
    .await
    .unwrap();
    assert!(rig.command(&["setup"]).status.success());
    // Deleted on one side after duplex was set up: the delete is newer than either
    // version, so the key goes on both.
    a.batch_execute("DELETE FROM items WHERE id BETWEEN 60000 AND 60999")
        .await
        .unwrap();
    b.batch_execute("DELETE FROM items WHERE id BETWEEN 140000 AND 140999")
        .await
        .unwrap();
    let d = rig.start();
    d.wait_log("snapshot copied", 2, Duration::from_secs(300))
        .await;
    identical(&a, &b, &["public.items"], Duration::from_secs(120)).await;
    for (sql, want) in [
        ("SELECT count(*) FROM items", 148_000),
        ("SELECT count(*) FROM items WHERE id BETWEEN 50001 AND 100000 AND id % 2 = 0 AND val <> 'a newer'", 0),
        ("SELECT count(*) FROM items WHERE id BETWEEN 50001 AND 100000 AND id % 2 = 1 AND val <> 'b newer'", 0),
        ("SELECT count(*) FROM items WHERE id BETWEEN 60000 AND 60999 OR id BETWEEN 140000 AND 140999", 0),
        ("SELECT count(*) FROM items WHERE id <= 50000 AND val = 'a'", 50_000),
        ("SELECT count(*) FROM items WHERE id > 100000 AND val = 'b'", 49_000),
    ] {
        assert_eq!(count(&b, sql).await, want, "on b: {sql}");
        assert_eq!(count(&a, sql).await, want, "on a: {sql}");
    }
    assert_eq!(d.stop().await, Some(0));
}

#[tokio::test]
async fn a_copy_killed_five_times_finishes_without_copying_a_chunk_twice() {
    let workers = 2;
    let rig = Rig::new(
        DDL,
        &["public.items"],
        &format!("[snapshot]\nworkers = {workers}\nchunk_rows = 5000\n"),
    )
    .await;
    let (a, b) = clients(&rig).await;
    a.batch_execute("INSERT INTO items (id, val, n) SELECT i, repeat(md5(i::text), 4), i FROM generate_series(1, 300000) i").await.unwrap();
    let copied = "SELECT count(*) FROM duplex.snapshot_chunks WHERE copied_at IS NOT NULL";
    let mut kills = 0;
    for round in 1..=5i64 {
        let d = rig.start();
        // Kill once this run has copied something more.
        let before = if round == 1 {
            0
        } else {
            count(&b, copied).await
        };
        wait_for("a chunk copied", Duration::from_secs(120), || async {
            let n = b
                .query_one(copied, &[])
                .await
                .ok()
                .map(|r| r.get::<_, i64>(0));
            n.filter(|n| *n > before).map(|_| ())
        })
        .await;
        d.kill9();
        kills += 1;
    }
    let chunks = count(&b, "SELECT count(*) FROM duplex.snapshot_chunks").await;
    assert!(
        count(&b, copied).await < chunks,
        "the copy finished before the last kill"
    );
    let d = rig.start();
    d.wait_log("snapshot copied", 1, Duration::from_secs(300))
        .await;
    identical(&a, &b, &["public.items"], Duration::from_secs(60)).await;
    let attempts = count(&b, "SELECT sum(attempts)::int8 FROM duplex.snapshot_chunks").await;
    // Each kill interrupts at most one chunk per worker; no copied chunk starts again.
    assert!(
        attempts <= chunks + kills * workers,
        "{attempts} attempts for {chunks} chunks and {kills} kills"
    );
    assert_eq!(
        count(
            &b,
            "SELECT count(*) FROM duplex.snapshot_chunks WHERE copied_at IS NULL"
        )
        .await,
        0
    );
    assert_eq!(
        count(&b, "SELECT sum(rows)::int8 FROM duplex.snapshot_chunks").await,
        300_000
    );
    eprintln!("{chunks} chunks, {attempts} attempts over {kills} kills");
    assert_eq!(d.stop().await, Some(0));
}

#[tokio::test]
async fn initial_mode_refuses_two_populated_tables_and_never_copies_nothing() {
    let rig = Rig::new(DDL, &["public.items"], "").await;
    let (a, b) = clients(&rig).await;
    a.batch_execute("INSERT INTO items (id, val) VALUES (1, 'a')")
        .await
        .unwrap();
    b.batch_execute("INSERT INTO items (id, val) VALUES (2, 'b')")
        .await
        .unwrap();
    // The direction halts, saying what to set; the rest of duplex keeps running.
    let d = rig.start();
    d.wait_log(
        "public.items holds rows on both node a and node b",
        1,
        Duration::from_secs(60),
    )
    .await;
    wait_for(
        "the halt in duplex status",
        Duration::from_secs(30),
        || async {
            let status = crate::harness::output_text(&rig.command(&["status"]));
            (status.contains("halted") && status.contains("snapshot.mode = \"merge\""))
                .then_some(())
        },
    )
    .await;
    d.stop().await;
    rig.edit_config(&[("[sync]", "[snapshot]\nmode = \"never\"\n[sync]")]);
    let d = rig.start();
    d.wait_log("applying", 1, Duration::from_secs(60)).await;
    a.batch_execute("INSERT INTO items (id, val) VALUES (3, 'after')")
        .await
        .unwrap();
    crate::harness::wait_count(&b, "SELECT count(*) FROM items WHERE id = 3", 1).await;
    assert_eq!(
        count(&b, "SELECT count(*) FROM items WHERE id = 1").await,
        0
    );
    assert_eq!(d.stop().await, Some(0));
}

#[tokio::test]
async fn duplex_snapshot_copies_a_table_again_on_demand() {
    let rig = Rig::new(
        DDL,
        &["public.items", "public.parent"],
        "[snapshot]\nmode = \"never\"\n",
    )
    .await;
    let (a, b) = clients(&rig).await;
    a.batch_execute(
        "INSERT INTO items (id, val) SELECT i, 'old' FROM generate_series(1, 20000) i;
                     INSERT INTO parent (id, name) VALUES (1, 'p')",
    )
    .await
    .unwrap();
    let out = rig.command(&["snapshot", "--table", "public.items"]);
    let text = crate::harness::output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("snapshot copied 20000 rows"), "{text}");
    assert_eq!(count(&b, "SELECT count(*) FROM items").await, 20_000);
    assert_eq!(count(&b, "SELECT count(*) FROM parent").await, 0);
    let out = rig.command(&["snapshot", "--table", "public.nope"]);
    assert!(!out.status.success());
    assert!(crate::harness::output_text(&out).contains("public.nope is not in the config"));
}

#[tokio::test]
async fn a_row_the_target_refuses_halts_the_copy_naming_its_key() {
    let rig = Rig::new(
        "CREATE TABLE items (id int PRIMARY KEY, qty text, updated_at timestamptz NOT NULL DEFAULT now())",
        &["public.items"],
        "[snapshot]\nchunk_rows = 100\n",
    )
    .await;
    let (a, b) = clients(&rig).await;
    b.batch_execute("ALTER TABLE items ALTER qty TYPE int USING qty::int")
        .await
        .unwrap();
    a.batch_execute(
        "INSERT INTO items (id, qty) SELECT i, i::text FROM generate_series(1, 1000) i;
                     UPDATE items SET qty = 'many' WHERE id = 777",
    )
    .await
    .unwrap();
    let d = rig.start();
    let logs = d
        .wait_log("the target refuses the row", 1, Duration::from_secs(60))
        .await;
    assert!(logs.contains("table public.items, key [\"777\"]"), "{logs}");
    assert!(
        logs.contains("invalid input syntax for type integer"),
        "{logs}"
    );
    // Nothing of the refused row's chunk is on b; the chunks before it are.
    assert_eq!(
        count(
            &b,
            "SELECT count(*) FROM items WHERE id BETWEEN 701 AND 800"
        )
        .await,
        0
    );
    d.stop().await;
    // Fixed: the copy resumes and finishes.
    b.batch_execute("ALTER TABLE items ALTER qty TYPE text")
        .await
        .unwrap();
    let d = rig.start();
    d.wait_applying(1).await;
    identical(&a, &b, &["public.items"], Duration::from_secs(30)).await;
    assert_eq!(d.stop().await, Some(0));
}

#[tokio::test]
async fn generated_and_identity_columns_copy_and_partitions_too() {
    let ddl = "CREATE TABLE gen (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, qty int,
                                 doubled int GENERATED ALWAYS AS (qty * 2) STORED,
                                 updated_at timestamptz NOT NULL DEFAULT now());
               CREATE TABLE part (id int PRIMARY KEY, val text, updated_at timestamptz NOT NULL DEFAULT now())
                 PARTITION BY RANGE (id);
               CREATE TABLE part_low PARTITION OF part FOR VALUES FROM (0) TO (5000);
               CREATE TABLE part_high PARTITION OF part FOR VALUES FROM (5000) TO (100000);";
    let rig = Rig::new(
        ddl,
        &["public.gen", "public.part"],
        "[snapshot]\nchunk_rows = 1000\n",
    )
    .await;
    let (a, b) = clients(&rig).await;
    a.batch_execute(
        "INSERT INTO gen (qty) SELECT i FROM generate_series(1, 3000) i;
         INSERT INTO part (id, val) SELECT i, 'p' || i FROM generate_series(1, 9000) i;",
    )
    .await
    .unwrap();
    let d = rig.start();
    d.wait_applying(1).await;
    identical(
        &a,
        &b,
        &["public.gen", "public.part"],
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        count(&b, "SELECT count(*) FROM gen WHERE doubled = qty * 2").await,
        3000
    );
    assert_eq!(count(&b, "SELECT count(*) FROM part_high").await, 4001);
    assert_eq!(d.stop().await, Some(0));
}

#[tokio::test]
async fn user_and_extension_types_copy_between_databases() {
    // User types in arrays and composites, the same on both nodes, but b made another
    // type first, so each has another OID there (the binary array and record formats
    // carry them); an extension type in a domain (earthdistance's `earth`, over
    // `cube`); and an extension type without a binary format (`seg`). Beside them,
    // a table of built-in types only, which keeps the binary format.
    let types = "CREATE EXTENSION cube; CREATE EXTENSION earthdistance; CREATE EXTENSION seg;
                 CREATE TYPE role AS ENUM ('reader', 'writer', 'admin');
                 CREATE DOMAIN percent AS int CHECK (VALUE BETWEEN 0 AND 100);
                 CREATE TYPE grant_ AS (who text, role role);";
    let ddl = "CREATE TABLE members (id int PRIMARY KEY, main role, roles role[], shares percent[],
                                     grants grant_[], last grant_, home earth, span seg,
                                     updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
               CREATE TABLE notes (id int PRIMARY KEY, body text, tags text[], at tstzrange,
                                   updated_at timestamptz NOT NULL DEFAULT clock_timestamp());";
    let tables = ["public.members", "public.notes"];
    let rig = Rig::both("", &tables, "[snapshot]\nchunk_rows = 500\n").await;
    let (a, b) = clients(&rig).await;
    a.batch_execute(&format!("{types} {ddl}")).await.unwrap();
    b.batch_execute(&format!(
        "CREATE TYPE unrelated AS ENUM ('x'); {types} {ddl}"
    ))
    .await
    .unwrap();
    let oids = "SELECT string_agg(oid::text, ',' ORDER BY typname) FROM pg_type
                WHERE typname IN ('role', '_role', 'percent', '_percent', 'grant_', '_grant_')";
    let oid_a: String = a.query_one(oids, &[]).await.unwrap().get(0);
    let oid_b: String = b.query_one(oids, &[]).await.unwrap().get(0);
    assert_ne!(oid_a, oid_b);
    a.batch_execute(
        "INSERT INTO members (id, main, roles, shares, grants, last, home, span)
         SELECT i, (enum_range(NULL::role))[1 + i % 3],
                CASE WHEN i % 7 = 0 THEN NULL ELSE (enum_range(NULL::role))[1 : 1 + i % 3] END,
                ARRAY[i % 101, (i * 7) % 101]::percent[],
                ARRAY[ROW('u' || i, 'writer')::grant_, ROW(NULL, 'admin')::grant_],
                ROW('last ' || i, (enum_range(NULL::role))[1 + i % 3])::grant_,
                CASE WHEN i % 11 = 0 THEN NULL ELSE ll_to_earth(-60 + i % 120, -170 + i % 340) END,
                ((i % 40) * 0.25 || ' .. ' || (i % 40) * 0.25 + 0.5)::seg
         FROM generate_series(1, 3000) i;
         INSERT INTO notes (id, body, tags, at)
         SELECT i, 'note ' || i, ARRAY['t' || i % 5, NULL], tstzrange(now(), NULL)
         FROM generate_series(1, 1000) i",
    )
    .await
    .unwrap();
    let d = rig.start();
    // The application goes on writing through the copy: these types travel the
    // stream too.
    a.batch_execute(
        "UPDATE members SET roles = roles || 'admin'::role, home = ll_to_earth(48.85, 2.35),
                updated_at = clock_timestamp()
         WHERE id % 250 = 0",
    )
    .await
    .unwrap();
    let copied = wait_for("the copy a → b to end", Duration::from_secs(120), || {
        let logs = d.logs();
        async move {
            if logs.contains("snapshot copied direction=a_to_b") {
                Some(Ok(logs))
            } else if logs.contains(" ERROR ") {
                Some(Err(logs))
            } else {
                None
            }
        }
    })
    .await;
    let logs = copied.unwrap_or_else(|logs| panic!("the copy failed: {logs}"));
    // Built-in types keep the binary format.
    assert!(
        logs.contains(r#"table=public.members method="direct" format="text""#)
            && logs.contains(r#"table=public.notes method="direct" format="binary""#),
        "{logs}"
    );
    b.batch_execute(
        "UPDATE members SET shares = '{1,2,3}', updated_at = clock_timestamp() WHERE id = 3000",
    )
    .await
    .unwrap();
    identical(&a, &b, &tables, Duration::from_secs(60)).await;
    assert_eq!(count(&b, "SELECT count(*) FROM members").await, 3000);
    let paris = "SELECT count(*) FROM members WHERE 'admin' = ANY (roles)
                 AND earth_distance(home, ll_to_earth(48.85, 2.35)) < 1";
    assert_eq!(count(&b, paris).await, 12);
    assert_eq!(d.stop().await, Some(0));
}
