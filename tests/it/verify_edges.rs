//! `duplex verify` where a quick look would say "equal" or repair the wrong way: a
//! row that never stops changing while a column stays different, keys that are
//! equal but print differently on the two nodes, one-way sync, and a direction
//! halted for a long time.

use crate::harness::duplex::Rig;
use crate::harness::output_text as text;
use crate::harness::pg::Cluster;
use crate::harness::{count, wait_for};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// Runs `duplex <args> --config <config>` off the test's runtime (so that the
/// test's own writers keep writing meanwhile), failing the test past `limit`.
async fn duplex(config: &Path, args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_duplex"))
        .args(args)
        .arg("--config")
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "duplex {args:?} still running after {limit:?}:\n{}",
                text(&out)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap()
}

/// `verify --json` with a short settle window: exit code, report, text.
async fn verify(rig: &Rig, extra: &[&str], limit: Duration) -> (Option<i32>, Value, String) {
    let mut args = vec!["verify", "--json", "--settle-ms", "300"];
    args.extend_from_slice(extra);
    let out = duplex(&rig.config, &args, limit).await;
    let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code(), json, text(&out))
}

fn table<'j>(json: &'j Value, name: &str) -> &'j Value {
    json["tables"]
        .as_array()
        .unwrap_or_else(|| panic!("no tables in {json}"))
        .iter()
        .find(|t| t["table"] == name)
        .unwrap_or_else(|| panic!("no {name} in {json}"))
}

/// (key, kind, columns) of a table's `differences` (or `unsettled`).
fn listed(t: &Value, field: &str) -> Vec<(Vec<String>, String, Vec<String>)> {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    t[field]
        .as_array()
        .unwrap_or_else(|| panic!("no {field} in {t}"))
        .iter()
        .map(|d| {
            (
                strings(&d["key"]),
                d["kind"].as_str().unwrap().to_string(),
                strings(&d["columns"]),
            )
        })
        .collect()
}

/// Writes on `c` that duplex's readers do not carry (under a replication origin
/// named like duplex's own): a difference planted while duplex runs.
async fn planted(c: &Client, prefix: &str, sql: &str) {
    let origin = format!("{prefix}_planted");
    // Each its own transaction: the origin must still be set when the change commits.
    for step in [
        format!(
            "SELECT pg_replication_origin_create('{origin}')
             WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = '{origin}')"
        ),
        format!("SELECT pg_replication_origin_session_setup('{origin}')"),
        sql.to_string(),
        "SELECT pg_replication_origin_session_reset()".to_string(),
    ] {
        c.batch_execute(&step).await.unwrap();
    }
}

const COUNTERS: &str = "
CREATE TABLE counters (id int PRIMARY KEY, hits int NOT NULL DEFAULT 0, body text,
                       updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
ALTER TABLE counters ALTER body SET STORAGE EXTERNAL;
INSERT INTO counters (id, body, updated_at)
  SELECT i, repeat(i::text, 10000), '2026-01-01 00:00:00+00' FROM generate_series(1, 50) i;
";

/// A hot row (a counter bumped every 100 ms on a) whose large body differs on b:
/// the body is stored out of line and never changes, so the counter's updates do not
/// carry it and b keeps its own. The row changes at every look, so it never stays
/// the same for the settle window; verify must still not call the nodes equal.
#[tokio::test]
async fn a_row_that_never_stops_changing_is_reported_unsettled() {
    let rig = Rig::both(
        COUNTERS,
        &["public.counters"],
        "[snapshot]\nmode = \"never\"\n",
    )
    .await;
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    assert!(rig.command(&["setup"]).status.success());
    let d = rig.start();
    d.wait_applying(2).await;
    // Row 7's body differs for good; row 9's too, but row 9 is left alone.
    planted(
        &b,
        &rig.prefix,
        "UPDATE counters SET body = repeat('x', 10000) WHERE id IN (7, 9)",
    )
    .await;
    let writer = {
        let a = cl.client(&rig.db_a).await;
        tokio::spawn(async move {
            let until = Instant::now() + Duration::from_secs(120);
            while Instant::now() < until {
                a.execute(
                    "UPDATE counters SET hits = hits + 1, updated_at = clock_timestamp() WHERE id = 7",
                    &[],
                )
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    // The counter reaches b (the stream runs), while the body stays b's own.
    wait_for("hits on b", Duration::from_secs(30), || {
        let b = &b;
        async move {
            (count(b, "SELECT hits::int8 FROM counters WHERE id = 7").await > 3).then_some(())
        }
    })
    .await;
    let (code, json, out) = verify(&rig, &[], Duration::from_secs(120)).await;
    assert_eq!(code, Some(1), "{out}");
    let t = table(&json, "public.counters");
    assert_eq!(
        listed(t, "differences"),
        vec![(
            vec!["9".to_string()],
            "mismatched".into(),
            vec!["body".into()]
        )],
        "{out}"
    );
    let unsettled = listed(t, "unsettled");
    assert_eq!(unsettled.len(), 1, "{out}");
    assert_eq!(unsettled[0].0, ["7"], "{out}");
    assert_eq!(unsettled[0].1, "mismatched", "{out}");
    assert!(unsettled[0].2.contains(&"body".to_string()), "{out}");
    assert_eq!(json["equal"], false, "{out}");
    // The text report says it, and the run's result counts it.
    let out = duplex(
        &rig.config,
        &["verify", "--settle-ms", "300"],
        Duration::from_secs(120),
    )
    .await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("unsettled mismatched [\"7\"]"), "{t}");
    assert!(t.contains("verify: 2 differences"), "{t}");
    writer.abort();
    for c in [&a, &b] {
        assert_eq!(
            count(
                c,
                "SELECT differences FROM duplex.verify_results WHERE table_name = 'public.counters'"
            )
            .await,
            2
        );
    }
    assert_eq!(d.stop().await, Some(0));
}

const PRINTED: &str = "
CREATE EXTENSION IF NOT EXISTS citext;
CREATE TABLE people (email citext PRIMARY KEY, name text,
                     updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE prices (id numeric PRIMARY KEY, label text,
                     updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
";

/// The same logical key printed differently on the two nodes (a citext key in
/// another case, a numeric key at another scale) is one row on both: verify reports
/// the key column as differing, and `--repair` deletes neither copy.
#[tokio::test]
async fn a_key_printed_differently_is_one_row_and_repair_keeps_both_copies() {
    let rig = Rig::both(
        PRINTED,
        &["public.people", "public.prices"],
        "[snapshot]\nmode = \"never\"\n",
    )
    .await;
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    assert!(rig.command(&["setup"]).status.success());
    let t = "'2026-01-01 00:00:00+00'";
    a.batch_execute(&format!(
        "INSERT INTO people VALUES ('Bob@x', 'Bob', {t}), ('carol@x', 'Carol', {t}), ('dave@x', 'Dave', {t});
         INSERT INTO prices VALUES (1.0, 'one', {t}), (2, 'two', {t});"
    ))
    .await
    .unwrap();
    b.batch_execute(&format!(
        "INSERT INTO people VALUES ('bob@x', 'Bob', {t}), ('carol@x', 'Carol', {t});
         INSERT INTO prices VALUES (1.00, 'one', {t}), (2, 'two', {t});"
    ))
    .await
    .unwrap();
    let out = duplex(
        &rig.config,
        &["verify", "--repair", "--settle-ms", "300"],
        Duration::from_secs(120),
    )
    .await;
    let out = text(&out);
    for c in [&a, &b] {
        for (sql, want) in [
            ("SELECT count(*) FROM people WHERE email = 'BOB@X'", 1),
            ("SELECT count(*) FROM people WHERE email = 'dave@x'", 1),
            ("SELECT count(*) FROM prices WHERE id = 1", 1),
            ("SELECT count(*) FROM duplex.tombstones", 0),
        ] {
            assert_eq!(count(c, sql).await, want, "{sql}\n{out}");
        }
    }
    // What remains is the keys' text, which a repair does not change.
    let (code, json, out) = verify(&rig, &[], Duration::from_secs(120)).await;
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(
        listed(table(&json, "public.people"), "differences"),
        vec![(
            vec!["Bob@x".to_string()],
            "mismatched".into(),
            vec!["email".into()]
        )],
        "{out}"
    );
    assert_eq!(
        listed(table(&json, "public.prices"), "differences"),
        vec![(
            vec!["1.0".to_string()],
            "mismatched".into(),
            vec!["id".into()]
        )],
        "{out}"
    );
}

const ITEMS: &str = "
CREATE TABLE items (id int PRIMARY KEY, val text,
                    updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
INSERT INTO items (id, val, updated_at)
  SELECT i, 'v' || i, '2026-01-01 00:00:00+00' FROM generate_series(1, 100) i;
";

async fn items(c: &Client) -> Vec<String> {
    crate::harness::tables::rows(c, "items").await
}

/// With `sync.direction = "a_to_b"`, `--repair` writes only into b: a's rows (and
/// tombstones) stay as they are whatever b holds; b takes a's newer versions and
/// rows it lacks, and loses a row a deleted later than b's version was written.
#[tokio::test]
async fn one_way_repair_writes_only_into_the_target() {
    let rig = Rig::new(ITEMS, &["public.items"], "[snapshot]\nmode = \"never\"\n").await;
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    assert!(rig.command(&["setup"]).status.success());
    // Nothing runs: these do not replicate.
    a.batch_execute(
        "DELETE FROM items WHERE id = 1;
         UPDATE items SET val = 'newer on a', updated_at = clock_timestamp() WHERE id = 3;
         INSERT INTO items (id, val) VALUES (101, 'only on a');",
    )
    .await
    .unwrap();
    b.batch_execute(
        "UPDATE items SET val = 'newer on b', updated_at = clock_timestamp() WHERE id = 2;
         INSERT INTO items (id, val) VALUES (102, 'only on b');
         DELETE FROM items WHERE id = 4;",
    )
    .await
    .unwrap();
    let a_before = items(&a).await;
    let tombstones = "SELECT count(*) FROM duplex.tombstones";
    let a_tombstones = count(&a, tombstones).await;
    let out = duplex(
        &rig.config,
        &["verify", "--repair", "--settle-ms", "300"],
        Duration::from_secs(120),
    )
    .await;
    let out = text(&out);
    assert_eq!(items(&a).await, a_before, "a changed:\n{out}");
    assert_eq!(count(&a, tombstones).await, a_tombstones, "{out}");
    let on_b = |id: i32| {
        let b = &b;
        async move {
            b.query_opt("SELECT val FROM items WHERE id = $1", &[&id])
                .await
                .unwrap()
                .map(|r| r.get::<_, String>(0))
        }
    };
    assert_eq!(on_b(1).await, None, "a's later delete wins on b\n{out}");
    assert_eq!(on_b(3).await.as_deref(), Some("newer on a"), "{out}");
    assert_eq!(on_b(101).await.as_deref(), Some("only on a"), "{out}");
    assert_eq!(on_b(2).await.as_deref(), Some("newer on b"), "{out}");
    assert_eq!(on_b(102).await.as_deref(), Some("only on b"), "{out}");
    assert_eq!(on_b(4).await, None, "{out}");
    // What a one-way repair cannot settle stays reported.
    let (code, json, out) = verify(&rig, &[], Duration::from_secs(120)).await;
    assert_eq!(code, Some(1), "{out}");
    let keys: Vec<(Vec<String>, String)> = listed(table(&json, "public.items"), "differences")
        .into_iter()
        .map(|(k, kind, _)| (k, kind))
        .collect();
    assert_eq!(
        keys,
        vec![
            (vec!["102".to_string()], "missing_on_a".to_string()),
            (vec!["2".to_string()], "mismatched".to_string()),
            (vec!["4".to_string()], "missing_on_b".to_string()),
        ],
        "{out}"
    );
}

/// A direction halted a day ago (its lag a day and growing) does not make verify
/// wait a day before reporting: its lag is left out of the settle window, and the
/// report says so.
#[tokio::test]
async fn a_halted_directions_lag_is_not_waited_for() {
    let rig = Rig::both(ITEMS, &["public.items"], "[snapshot]\nmode = \"never\"\n").await;
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    assert!(rig.command(&["setup"]).status.success());
    b.batch_execute("ALTER TABLE items ADD CONSTRAINT no_forbidden CHECK (val <> 'forbidden')")
        .await
        .unwrap();
    let d = rig.start();
    d.wait_applying(2).await;
    a.batch_execute("UPDATE items SET val = 'fine', updated_at = clock_timestamp() WHERE id = 5")
        .await
        .unwrap();
    wait_for("row 5 on b", Duration::from_secs(30), || {
        let b = &b;
        async move {
            (count(
                b,
                "SELECT count(*) FROM items WHERE id = 5 AND val = 'fine'",
            )
            .await
                == 1)
                .then_some(())
        }
    })
    .await;
    a.batch_execute(
        "UPDATE items SET val = 'forbidden', updated_at = clock_timestamp() WHERE id = 6;
         UPDATE items SET val = 'after', updated_at = clock_timestamp() WHERE id = 7;",
    )
    .await
    .unwrap();
    d.wait_log("halted on a bad event", 1, Duration::from_secs(30))
        .await;
    // As if it halted a day ago.
    b.batch_execute(
        "UPDATE duplex.apply_positions SET last_commit_ts = last_commit_ts - interval '1 day'",
    )
    .await
    .unwrap();
    let status = text(&rig.command(&["status"]));
    let (code, json, out) = verify(&rig, &[], Duration::from_secs(120)).await;
    assert_eq!(code, Some(1), "{out}\n{status}");
    let keys: Vec<Vec<String>> = listed(table(&json, "public.items"), "differences")
        .into_iter()
        .map(|(k, _, _)| k)
        .collect();
    assert_eq!(keys, [["6"], ["7"]], "{out}");
    assert!(json["settle_seconds"].as_f64().unwrap() < 60.0, "{out}");
    let notes = json["notes"].to_string();
    assert!(notes.contains("a_to_b is halted"), "{out}");
    assert_eq!(d.stop().await, Some(0));
}
