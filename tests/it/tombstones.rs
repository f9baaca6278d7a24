//! Tombstones written by duplex's triggers on a node: on a key change as on a delete,
//! with the key printed exactly as the stream prints it whatever its type, and without
//! any grant on schema `duplex` for the application's own roles.

use crate::harness::duplex::Rig;
use crate::harness::pg::Cluster;
use crate::harness::tables::converge;
use crate::harness::{count, wait_count};
use crate::harness::{unique, wait_for};
use std::time::Duration;
use tokio_postgres::{Client, NoTls};

const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, val text, updated_at timestamptz NOT NULL DEFAULT clock_timestamp());";

/// Both nodes synced both ways, item 1 written on a and applied on b, duplex stopped.
async fn item_on_both_then_stopped() -> (Rig, Client, Client) {
    let rig = Rig::both(ITEMS, &["public.items"], "").await;
    assert!(rig.command(&["setup"]).status.success());
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    let d = rig.start();
    a.batch_execute("INSERT INTO items (id, val) VALUES (1, 'x')")
        .await
        .unwrap();
    wait_count(&b, "SELECT count(*) FROM items", 1).await;
    assert_eq!(d.stop().await, Some(0));
    (rig, a, b)
}

#[tokio::test]
async fn a_key_change_leaves_a_tombstone_so_an_older_update_of_the_old_key_loses() {
    let (rig, a, b) = item_on_both_then_stopped().await;
    // While duplex is down: b updates key 1, then a renames key 1 to 2. a's change is
    // the newer one, so key 1 must be gone on both nodes.
    b.batch_execute("UPDATE items SET val = 'b', updated_at = clock_timestamp() WHERE id = 1")
        .await
        .unwrap();
    a.batch_execute("UPDATE items SET id = 2, updated_at = clock_timestamp() WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(
        count(
            &a,
            "SELECT count(*) FROM duplex.tombstones WHERE key = '[\"1\"]'"
        )
        .await,
        1,
        "the key change left no tombstone"
    );
    let d = rig.start();
    converge(&a, &b, &["items"], Duration::from_secs(30)).await;
    assert_eq!(
        count(&a, "SELECT count(*) FROM items WHERE id = 2").await,
        1
    );
    assert_eq!(count(&a, "SELECT count(*) FROM items").await, 1);
    assert_eq!(d.stop().await, Some(0));
}

#[tokio::test]
async fn tombstone_keys_match_the_stream_for_timestamp_bool_and_float_keys() {
    let ddl = "CREATE TABLE readings (at timestamptz, flag bool, score float8, val text,
                 updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
                 PRIMARY KEY (at, flag, score));";
    let rig = Rig::both(ddl, &["public.readings"], "").await;
    assert!(rig.command(&["setup"]).status.success());
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    let d = rig.start();
    d.wait_applying(2).await;
    let key = "'2026-11-30 10:00:00.5+01'::timestamptz, true, 0.1::float8";
    a.batch_execute(&format!(
        "INSERT INTO readings (at, flag, score, val) VALUES ({key}, 'x')"
    ))
    .await
    .unwrap();
    wait_count(&b, "SELECT count(*) FROM readings", 1).await;
    a.batch_execute("DELETE FROM readings").await.unwrap();
    wait_count(&b, "SELECT count(*) FROM readings", 0).await;
    // Both nodes hold the same tombstone key: the trigger's on a, the stream's on b.
    let tomb = "SELECT key::text FROM duplex.tombstones WHERE table_name = 'public.readings'";
    let ka: String = a.query_one(tomb, &[]).await.unwrap().get(0);
    let kb: String = b.query_one(tomb, &[]).await.unwrap().get(0);
    assert_eq!(ka, kb);
    assert_eq!(ka, r#"["2026-11-30 09:00:00.5+00", "t", "0.1"]"#);
    // An insert on b stamped before the delete must not bring the row back.
    b.batch_execute(&format!(
        "INSERT INTO readings (at, flag, score, val, updated_at)
         VALUES ({key}, 'late', now() - interval '1 minute')"
    ))
    .await
    .unwrap();
    wait_count(
        &a,
        "SELECT count(*) FROM duplex.conflicts WHERE resolution = 'dropped_older_than_tombstone'",
        1,
    )
    .await;
    converge(&a, &b, &["readings"], Duration::from_secs(30)).await;
    assert_eq!(count(&a, "SELECT count(*) FROM readings").await, 0);
    assert_eq!(d.stop().await, Some(0));
}

#[tokio::test]
async fn an_application_role_without_grants_on_duplex_can_write() {
    let ddl = "CREATE TABLE items (id int PRIMARY KEY, val text, updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
               CREATE TABLE users (id uuid PRIMARY KEY, email text NOT NULL, active bool NOT NULL,
                                   updated_at timestamptz NOT NULL DEFAULT clock_timestamp());";
    let rig = Rig::both(ddl, &["public.items", "public.users"], "").await;
    rig.add_identity("public.users", "users", &["email", "active"]);
    assert!(rig.command(&["setup"]).status.success());
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    let role = unique("app");
    a.batch_execute(&format!(
        "CREATE ROLE {role} LOGIN; GRANT SELECT, INSERT, UPDATE, DELETE ON items, users TO {role}"
    ))
    .await
    .unwrap();
    let (app, conn) = tokio_postgres::connect(&cl.url(&role, &rig.db_a), NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let d = rig.start();
    app.batch_execute(
        "INSERT INTO items (id, val) VALUES (1, 'x'), (2, 'y');
         DELETE FROM items WHERE id = 1;
         UPDATE items SET id = 3, updated_at = clock_timestamp() WHERE id = 2;
         INSERT INTO users (email, active) VALUES ('zoe@example.com', true);",
    )
    .await
    .unwrap();
    converge(&a, &b, &["items", "users"], Duration::from_secs(30)).await;
    assert_eq!(count(&b, "SELECT count(*) FROM items").await, 1);
    // The id derives from the natural key printed as text: true prints as "t".
    let id: String = b
        .query_one("SELECT id::text FROM users", &[])
        .await
        .unwrap()
        .get(0);
    let out = std::process::Command::new(crate::harness::duplex::bin())
        .args(["uuid", "--namespace", "users", "zoe@example.com", "t"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), id);
    assert_eq!(d.stop().await, Some(0));
    a.batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await
        .unwrap();
}

#[tokio::test]
async fn tombstones_outlive_their_retention_while_the_backlog_they_guard_is_unapplied() {
    let rig = Rig::both(ITEMS, &["public.items"], "").await;
    rig.edit_config(&[(
        "linger_ms = 10",
        "linger_ms = 10\ntombstone_retention_ms = 1000",
    )]);
    assert!(rig.command(&["setup"]).status.success());
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    let d = rig.start();
    a.batch_execute("INSERT INTO items (id, val) VALUES (1, 'x')")
        .await
        .unwrap();
    b.batch_execute("INSERT INTO items (id, val) VALUES (2, 'y')")
        .await
        .unwrap();
    wait_count(&b, "SELECT count(*) FROM items", 2).await;
    wait_count(&a, "SELECT count(*) FROM items", 2).await;
    assert_eq!(d.stop().await, Some(0));
    // While duplex is down: b updates the row, then a deletes it (the newer change).
    b.batch_execute("UPDATE items SET val = 'b', updated_at = clock_timestamp() WHERE id = 1")
        .await
        .unwrap();
    a.batch_execute("DELETE FROM items WHERE id = 1")
        .await
        .unwrap();
    // The retention passes by the wall clock before b's update is applied to a.
    wait_for("the retention to pass", Duration::from_secs(10), || async {
        let passed = count(
            &a,
            "SELECT count(*) FROM duplex.tombstones WHERE deleted_at < now() - interval '1500 ms'",
        )
        .await;
        (passed == 1).then_some(())
    })
    .await;
    let d = rig.start();
    converge(&a, &b, &["items"], Duration::from_secs(30)).await;
    assert_eq!(
        count(&a, "SELECT count(*) FROM items WHERE id = 1").await,
        0
    );
    assert_eq!(d.stop().await, Some(0));
}

/// A row older than its own node's tombstone (an application's stale insert that
/// committed before a concurrent delete it escaped) loses to that tombstone on its node
/// too, as it did on the peer.
#[tokio::test]
async fn a_row_older_than_its_nodes_tombstone_is_removed() {
    let (rig, a, b) = item_on_both_then_stopped().await;
    // The end state of that race, written directly: on a the row with a newer local
    // tombstone; on b (which applied both changes in commit order) no row.
    a.batch_execute(
        "INSERT INTO duplex.tombstones (table_name, key, deleted_at, origin)
         VALUES ('public.items', '[\"1\"]', clock_timestamp(), 'local')",
    )
    .await
    .unwrap();
    b.batch_execute(&format!(
        "SELECT pg_replication_origin_session_setup('{}_b_from_a');
         DELETE FROM items WHERE id = 1;
         SELECT pg_replication_origin_session_reset();",
        rig.prefix
    ))
    .await
    .unwrap();
    let d = rig.start();
    converge(&a, &b, &["items"], Duration::from_secs(30)).await;
    assert_eq!(count(&a, "SELECT count(*) FROM items").await, 0);
    assert_eq!(d.stop().await, Some(0));
}

/// A statement's deletes come before their tombstones (row triggers fire at its end):
/// however small the batches, the peer records each delete at the source's exact time,
/// never at the commit time.
#[tokio::test]
async fn small_batches_keep_each_delete_with_its_tombstone() {
    let rig = Rig::new(ITEMS, &["public.items"], "").await;
    rig.edit_config(&[("linger_ms = 10", "linger_ms = 10\nbatch_rows = 1")]);
    assert!(rig.command(&["setup"]).status.success());
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    let d = rig.start();
    a.batch_execute("INSERT INTO items (id, val) VALUES (1, 'x'), (2, 'y'), (3, 'z')")
        .await
        .unwrap();
    wait_count(&b, "SELECT count(*) FROM items", 3).await;
    a.batch_execute(
        "BEGIN; DELETE FROM items WHERE id IN (1, 2, 3); SELECT pg_sleep(0.2);
         INSERT INTO items (id, val) VALUES (4, 'w'); COMMIT;",
    )
    .await
    .unwrap();
    wait_count(&b, "SELECT count(*) FROM items WHERE id = 4", 1).await;
    let tombs = "SELECT key::text || ' ' || deleted_at::text FROM duplex.tombstones ORDER BY key";
    let ta: Vec<String> = a
        .query(tombs, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let tb: Vec<String> = b
        .query(tombs, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ta.len(), 3, "{ta:?}");
    assert_eq!(ta, tb);
    assert_eq!(d.stop().await, Some(0));
}
