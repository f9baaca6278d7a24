//! Key values reach SQL text as literals (COPY takes no parameters): a key holding
//! quotes and backslashes stays one key, whatever `standard_conforming_strings` the
//! database gives new sessions. With it off, a backslash escapes the quote that
//! follows, and a key could end its literal early and add a condition of its own.

use crate::harness::duplex::Rig;
use crate::harness::output_text as text;
use std::collections::BTreeMap;
use tokio_postgres::Client;

const DDL: &str = "CREATE TABLE kv (k text PRIMARY KEY, v text,
                                    updated_at timestamptz NOT NULL DEFAULT clock_timestamp())";

/// Keys that would end a literal early, and one whose `\t` would become a tab.
const DELETED_ON_B: &str = r"x\') OR (1=1) --";
const NEWER_ON_B: &str = r"y\') OR (1=1) --";
const ONLY_ON_A: &str = r"tab\there";
const NEW_ON_A: &str = r"w\') OR k <> '' --";

async fn rows(c: &Client) -> BTreeMap<String, String> {
    c.query("SELECT k, v FROM kv", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

async fn insert(c: &Client, k: &str, v: &str, age: &str) {
    c.execute(
        "INSERT INTO kv (k, v, updated_at) VALUES ($1, $2, now() - $3::text::interval)",
        &[&k, &v, &age],
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn keys_with_quotes_and_backslashes_touch_only_their_rows() {
    let rig = Rig::both(
        DDL,
        &["public.kv"],
        "[snapshot]\nmode = \"never\"\nchunk_rows = 1\n",
    )
    .await;
    for (cl, db) in [(rig.cluster, &rig.db_a), (rig.cluster_b, &rig.db_b)] {
        cl.psql(
            "postgres",
            &format!("ALTER DATABASE {db} SET standard_conforming_strings = off"),
        );
    }
    let (a, b) = (rig.cluster.client(&rig.db_a).await, rig.client_b().await);
    let scs: String = a
        .query_one("SHOW standard_conforming_strings", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(scs, "off");
    let setup = rig.command(&["setup"]);
    assert!(setup.status.success(), "{}", text(&setup));

    // The same 40 rows on both nodes, and the keys verify will find different: one
    // deleted on b after a's version was written, one updated on b later than a's,
    // one a alone has.
    let same = "INSERT INTO kv (k, v, updated_at)
                SELECT 'key' || i, 'v' || i, '2026-01-01 00:00:00+00' FROM generate_series(1, 40) i";
    a.batch_execute(same).await.unwrap();
    b.batch_execute(same).await.unwrap();
    insert(&a, DELETED_ON_B, "a", "1 hour").await;
    insert(&b, DELETED_ON_B, "b", "1 hour").await;
    b.execute("DELETE FROM kv WHERE k = $1", &[&DELETED_ON_B])
        .await
        .unwrap();
    insert(&a, NEWER_ON_B, "old", "1 hour").await;
    insert(&b, NEWER_ON_B, "new", "0").await;
    insert(&a, ONLY_ON_A, "a", "0").await;

    let out = rig.command(&["verify", "--repair", "--settle-ms", "500"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("repaired 3 rows"), "{}", text(&out));
    let mut want: BTreeMap<String, String> = (1..=40)
        .map(|i| (format!("key{i}"), format!("v{i}")))
        .collect();
    want.insert(NEWER_ON_B.into(), "new".into());
    want.insert(ONLY_ON_A.into(), "a".into());
    assert_eq!(rows(&a).await, want, "a after verify --repair");
    assert_eq!(rows(&b).await, want, "b after verify --repair");

    // `duplex snapshot`: every key a chunk bound (chunk_rows = 1), one of them new.
    insert(&a, NEW_ON_A, "a", "0").await;
    a.execute(
        "UPDATE kv SET v = 'changed', updated_at = now() WHERE k = 'key7'",
        &[],
    )
    .await
    .unwrap();
    let out = rig.command(&["snapshot", "--table", "public.kv"]);
    assert!(out.status.success(), "{}", text(&out));
    want.insert(NEW_ON_A.into(), "a".into());
    want.insert("key7".into(), "changed".into());
    assert_eq!(rows(&a).await, want, "a after snapshot");
    assert_eq!(rows(&b).await, want, "b after snapshot");
}
