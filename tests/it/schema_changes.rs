//! Schema changes during a sync: a migration that reaches one node before the other,
//! while the applications on both nodes write.

use crate::harness::duplex::Rig;
use crate::harness::metrics::{metrics_port, wait_value};
use crate::harness::tables::converge;
use crate::harness::wait_for;
use crate::harness::workload::Rng;
use crate::harness::{count, output_text};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

const DDL: &str = "CREATE TABLE items (id int PRIMARY KEY, val text,
                   updated_at timestamptz NOT NULL DEFAULT clock_timestamp());";

/// An application on one node until `stop`: upserts, updates and deletes of keys
/// `0..200`; with `color` set, it writes the column too. Returns its changes.
async fn application(c: Client, seed: u64, color: Arc<AtomicBool>, stop: Arc<AtomicBool>) -> u64 {
    let mut rng = Rng(seed);
    let mut changes = 0;
    while !stop.load(Ordering::SeqCst) {
        let k = rng.below(200) as i32;
        let v = format!("v{seed}-{}", rng.below(1000));
        let sql = match (rng.below(10), color.load(Ordering::SeqCst)) {
            (0, _) => format!("DELETE FROM items WHERE id = {k}"),
            (1..=5, false) => format!(
                "INSERT INTO items (id, val) VALUES ({k}, '{v}') ON CONFLICT (id)
                 DO UPDATE SET val = EXCLUDED.val, updated_at = clock_timestamp()"
            ),
            (1..=5, true) => format!(
                "INSERT INTO items (id, val, color) VALUES ({k}, '{v}', 'c{v}') ON CONFLICT (id)
                 DO UPDATE SET val = EXCLUDED.val, color = EXCLUDED.color, updated_at = clock_timestamp()"
            ),
            _ => format!(
                "UPDATE items SET val = '{v}', updated_at = clock_timestamp() WHERE id = {k}"
            ),
        };
        c.batch_execute(&sql).await.unwrap();
        changes += 1;
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    changes
}

/// Inserts row `id` (outside the applications' keys) on `from` and waits for it on
/// `to`: the direction still applies.
pub(crate) async fn crosses(from: &Client, to: &Client, id: i32) {
    from.batch_execute(&format!(
        "INSERT INTO items (id, val) VALUES ({id}, 'marker')"
    ))
    .await
    .unwrap();
    let sql = format!("SELECT count(*) FROM items WHERE id = {id}");
    wait_for("a marker row crossing", Duration::from_secs(60), || {
        let sql = &sql;
        async move { (count(to, sql).await == 1).then_some(()) }
    })
    .await;
}

/// What node b owes: (source node, table, column).
pub(crate) async fn owed(b: &Client) -> Vec<(String, String, String)> {
    b.query(
        "SELECT source_node, table_name, column_name FROM duplex.owed_columns ORDER BY 1, 2, 3",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// A column added on node a while both nodes write, and on node b a while later (a
/// rolling migration): meanwhile rows keep flowing both ways with the columns both
/// have and b records the values it is owed; once b has the column, the values a's
/// application wrote meanwhile arrive, with no restart and no operator step, and both
/// nodes end equal, the column included.
#[tokio::test]
async fn a_column_added_on_one_node_first_loses_none_of_its_values() {
    let rig = Rig::both(DDL, &["public.items"], "").await;
    assert!(rig.command(&["setup"]).status.success());
    let d = rig.start();
    d.wait_applying(2).await;
    let (a, b) = (rig.client_a().await, rig.client_b().await);
    let stop = Arc::new(AtomicBool::new(false));
    let (color_a, color_b) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let writers = [
        tokio::spawn(application(
            rig.client_a().await,
            1,
            color_a.clone(),
            stop.clone(),
        )),
        tokio::spawn(application(
            rig.client_b().await,
            2,
            color_b.clone(),
            stop.clone(),
        )),
    ];
    tokio::time::sleep(Duration::from_secs(2)).await;

    a.batch_execute("ALTER TABLE items ADD COLUMN color text")
        .await
        .unwrap();
    color_a.store(true, Ordering::SeqCst);
    let debt = (
        "a".to_string(),
        "public.items".to_string(),
        "color".to_string(),
    );
    wait_for(
        "b to record the values it is owed",
        Duration::from_secs(60),
        || {
            let (b, debt) = (&b, &debt);
            async move { owed(b).await.contains(debt).then_some(()) }
        },
    )
    .await;
    // Rows keep flowing from a meanwhile.
    crosses(&a, &b, 10_000).await;
    // check names the drift as a warning, and passes.
    let check = rig.command(&["check"]);
    let said = output_text(&check);
    assert!(check.status.success(), "{said}");
    assert!(
        said.contains("warning: table public.items: column color exists on node a only"),
        "{said}"
    );
    // Status names the debt, and the cutover gate fails on it.
    let status = rig.command(&["status", "--max-lag", "600"]);
    let said = output_text(&status);
    assert_eq!(status.status.code(), Some(1), "{said}");
    assert!(said.contains("owed public.items.color since"), "{said}");
    wait_value(
        metrics_port(&rig),
        r#"duplex_apply_owed_columns{direction="a_to_b"}"#,
        "the owed column in the metrics",
        |v| v == 1.0,
    )
    .await;

    b.batch_execute("ALTER TABLE items ADD COLUMN color text")
        .await
        .unwrap();
    let gained = Instant::now();
    color_b.store(true, Ordering::SeqCst);
    wait_for("the debt settled", Duration::from_secs(60), || {
        let b = &b;
        async move { owed(b).await.is_empty().then_some(()) }
    })
    .await;
    eprintln!(
        "owed values settled {:?} after b gained the column",
        gained.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        assert!(w.await.unwrap() > 100);
    }
    converge(&a, &b, &["public.items"], Duration::from_secs(60)).await;
    wait_value(
        metrics_port(&rig),
        r#"duplex_apply_owed_columns{direction="a_to_b"}"#,
        "no owed column in the metrics",
        |v| v == 0.0,
    )
    .await;
    let colored = count(&b, "SELECT count(*) FROM items WHERE color IS NOT NULL").await;
    assert!(colored > 0, "no value of the new column reached b");
    assert_eq!(d.stop().await, Some(0));
}

/// Column types changed on one node first: widened types (integer to bigint,
/// varchar(20) to text) keep both directions flowing while the values fit both; a
/// value the other node's type cannot take goes to the dead-letter queue naming the
/// table, the key and the column, and the rest flows on.
#[tokio::test]
async fn a_type_changed_on_one_node_first_applies_what_casts_and_names_what_does_not() {
    let ddl = "CREATE TABLE items (id int PRIMARY KEY, n int, label varchar(20), code int,
               updated_at timestamptz NOT NULL DEFAULT clock_timestamp());";
    let rig = Rig::both(ddl, &["public.items"], "").await;
    rig.edit_config(&[(
        "linger_ms = 10",
        "linger_ms = 10\non_error = \"dead_letter\"",
    )]);
    assert!(rig.command(&["setup"]).status.success());
    let d = rig.start();
    d.wait_applying(2).await;
    let (a, b) = (rig.client_a().await, rig.client_b().await);
    a.batch_execute(
        "ALTER TABLE items ALTER n TYPE bigint, ALTER label TYPE text, ALTER code TYPE text",
    )
    .await
    .unwrap();
    for i in 0..50 {
        a.batch_execute(&format!(
            "INSERT INTO items (id, n, label, code) VALUES ({i}, {i}, 'from a {i}', '{i}')"
        ))
        .await
        .unwrap();
        b.batch_execute(&format!(
            "INSERT INTO items (id, n, label, code) VALUES ({}, {i}, 'from b {i}', {i})",
            1000 + i
        ))
        .await
        .unwrap();
    }
    // A code b's integer column cannot take, and a label longer than b's
    // varchar(20) (refused, not cut short).
    a.batch_execute(&format!(
        "INSERT INTO items (id, n, label, code) VALUES (500, 1, 'bad code', 'abc');
         INSERT INTO items (id, n, label, code) VALUES (501, 1, '{}', '1')",
        "y".repeat(30)
    ))
    .await
    .unwrap();
    wait_for(
        "b's letters for rows 500 and 501",
        Duration::from_secs(60),
        || {
            let b = &b;
            async move {
                (count(b, "SELECT count(*) FROM duplex.dead_letters").await == 2).then_some(())
            }
        },
    )
    .await;
    let errors: Vec<String> = b
        .query("SELECT error FROM duplex.dead_letters ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("column code (integer) refuses 'abc'")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("column label (character varying(20)) refuses 'yyyy")),
        "{errors:?}"
    );
    assert_eq!(
        count(&b, "SELECT count(*) FROM items WHERE id = 501").await,
        0
    );
    // Everything else flowed both ways.
    assert_eq!(
        count(&b, "SELECT count(*) FROM items WHERE id < 500").await,
        50
    );
    assert_eq!(
        count(&a, "SELECT count(*) FROM items WHERE id >= 1000").await,
        50
    );

    // b widens its columns too: values beyond the old limits now flow.
    b.batch_execute(
        "ALTER TABLE items ALTER n TYPE bigint, ALTER label TYPE text, ALTER code TYPE text",
    )
    .await
    .unwrap();
    a.batch_execute(&format!(
        "INSERT INTO items (id, n, label, code) VALUES (600, 5000000000, '{}', 'x')",
        "long label ".repeat(10)
    ))
    .await
    .unwrap();
    wait_for("row 600 on b", Duration::from_secs(60), || {
        let b = &b;
        async move {
            (count(
                b,
                "SELECT count(*) FROM items WHERE id = 600 AND n = 5000000000",
            )
            .await
                == 1)
                .then_some(())
        }
    })
    .await;
    assert_eq!(d.stop().await, Some(0));
}

/// A table added to `[[tables]]` (it exists on both nodes, with rows on node a only):
/// `duplex setup` and a restart copy it into node b and stream it both ways, while
/// the configured table goes on; removed from `[[tables]]` again, it stops being
/// synced and its rows stay as they are.
#[tokio::test]
async fn a_table_added_to_the_config_is_copied_then_streamed_and_one_removed_is_left_alone() {
    let ddl = "CREATE TABLE items (id int PRIMARY KEY, val text,
                   updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
               CREATE TABLE notes (id int PRIMARY KEY, body text,
                   updated_at timestamptz NOT NULL DEFAULT clock_timestamp());";
    let rig = Rig::both(ddl, &["public.items"], "").await;
    let (a, b) = (rig.client_a().await, rig.client_b().await);
    a.batch_execute("INSERT INTO notes (id, body) SELECT i, 'old' FROM generate_series(1, 3000) i")
        .await
        .unwrap();
    assert!(rig.command(&["setup"]).status.success());
    let d = rig.start();
    d.wait_applying(2).await;
    a.batch_execute("INSERT INTO items (id, val) VALUES (1, 'before')")
        .await
        .unwrap();
    converge(&a, &b, &["public.items"], Duration::from_secs(60)).await;
    assert_eq!(count(&b, "SELECT count(*) FROM notes").await, 0);
    assert_eq!(d.stop().await, Some(0));

    rig.edit_config(&[(
        "name = \"public.items\"\n",
        "name = \"public.items\"\n[[tables]]\nname = \"public.notes\"\n",
    )]);
    let setup = rig.command(&["setup"]);
    assert!(setup.status.success(), "{}", output_text(&setup));
    let d = rig.start();
    d.wait_applying(2).await;
    a.batch_execute(
        "UPDATE notes SET body = 'edited on a', updated_at = clock_timestamp() WHERE id = 1",
    )
    .await
    .unwrap();
    b.batch_execute("INSERT INTO notes (id, body) VALUES (5000, 'new on b')")
        .await
        .unwrap();
    b.batch_execute("INSERT INTO items (id, val) VALUES (2, 'during')")
        .await
        .unwrap();
    converge(
        &a,
        &b,
        &["public.notes", "public.items"],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(count(&b, "SELECT count(*) FROM notes").await, 3001);
    assert!(d
        .logs()
        .contains("tables added to [[tables]] since the direction first started"));
    assert_eq!(d.stop().await, Some(0));

    rig.edit_config(&[("[[tables]]\nname = \"public.notes\"\n", "")]);
    assert!(rig.command(&["setup"]).status.success());
    let d = rig.start();
    d.wait_applying(2).await;
    a.batch_execute(
        "UPDATE notes SET body = 'not synced', updated_at = clock_timestamp() WHERE id = 2;
                     INSERT INTO items (id, val) VALUES (3, 'after')",
    )
    .await
    .unwrap();
    converge(&a, &b, &["public.items"], Duration::from_secs(60)).await;
    assert_eq!(
        count(&b, "SELECT count(*) FROM notes WHERE body = 'not synced'").await,
        0
    );
    assert_eq!(count(&b, "SELECT count(*) FROM notes").await, 3001);
    assert_eq!(d.stop().await, Some(0));
}

/// The initial copy into a node that lacks a column the source has: the rows are
/// copied without it while both applications write, every row's value is owed from
/// the copy on, and once the node gains the column the values arrive and both nodes
/// end equal.
#[tokio::test]
async fn a_table_copied_into_a_node_without_a_column_gets_its_values_once_it_has_it() {
    let rig = Rig::both(DDL, &["public.items"], "").await;
    let (a, b) = (rig.client_a().await, rig.client_b().await);
    a.batch_execute("ALTER TABLE items ADD COLUMN color text")
        .await
        .unwrap();
    a.batch_execute(
        "INSERT INTO items (id, val, color)
         SELECT i, 'old', 'c' || i FROM generate_series(1000, 3999) i",
    )
    .await
    .unwrap();
    assert!(rig.command(&["setup"]).status.success());
    let stop = Arc::new(AtomicBool::new(false));
    let color_b = Arc::new(AtomicBool::new(false));
    // a's application writes during the copy; b's, once b has the rows (an
    // initial copy goes only into a table empty of rows that predate it).
    let writer_a = tokio::spawn(application(
        rig.client_a().await,
        1,
        Arc::new(AtomicBool::new(true)),
        stop.clone(),
    ));
    let d = rig.start();
    d.wait_applying(2).await;
    let writers = [
        writer_a,
        tokio::spawn(application(
            rig.client_b().await,
            2,
            color_b.clone(),
            stop.clone(),
        )),
    ];
    assert_eq!(
        count(&b, "SELECT count(*) FROM items WHERE id >= 1000").await,
        3000
    );
    let debt = (
        "a".to_string(),
        "public.items".to_string(),
        "color".to_string(),
    );
    assert!(owed(&b).await.contains(&debt));
    let status = rig.command(&["status", "--max-lag", "600"]);
    let said = output_text(&status);
    assert!(
        said.contains("owed public.items.color since the initial copy"),
        "{said}"
    );

    // b's application's rows (without the column) reach a before b gains it.
    wait_for("b's rows on a", Duration::from_secs(60), || {
        let a = &a;
        async move {
            (count(a, "SELECT count(*) FROM items WHERE val LIKE 'v2-%'").await >= 20).then_some(())
        }
    })
    .await;
    b.batch_execute("ALTER TABLE items ADD COLUMN color text")
        .await
        .unwrap();
    color_b.store(true, Ordering::SeqCst);
    wait_for("the debt settled", Duration::from_secs(60), || {
        let b = &b;
        async move { owed(b).await.is_empty().then_some(()) }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.await.unwrap();
    }
    converge(&a, &b, &["public.items"], Duration::from_secs(60)).await;
    assert_eq!(
        count(
            &b,
            "SELECT count(*) FROM items WHERE id >= 1000 AND color = 'c' || id"
        )
        .await,
        3000
    );
    assert_eq!(d.stop().await, Some(0));
}
