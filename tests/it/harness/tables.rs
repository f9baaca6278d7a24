//! What the two nodes' tables hold, and waiting for them to agree: the `items` table
//! most tests use, a table's rows and ids, [`converge`] (row by row, for small
//! tables) and [`identical`] (by digest, for big ones).

use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// The `items` table most tests sync.
pub const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, val text, qty int,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp());";

/// A table's rows as JSON text, in key order.
pub async fn rows(c: &Client, table: &str) -> Vec<String> {
    c.query(
        &format!("SELECT row_to_json(t)::text FROM {table} t ORDER BY 1"),
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// The `id`s of `items`, in order.
pub async fn item_ids(c: &Client) -> Vec<i32> {
    c.query("SELECT id FROM items ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Waits until every table has the same rows on both nodes; on timeout, fails with
/// the first difference.
pub async fn converge(a: &Client, b: &Client, tables: &[&str], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let mut diff = None;
        for t in tables {
            let (ra, rb) = (rows(a, t).await, rows(b, t).await);
            if ra != rb {
                diff = Some(format!("{t}:\n a={ra:?}\n b={rb:?}"));
                break;
            }
        }
        let Some(diff) = diff else { return };
        assert!(
            Instant::now() < deadline,
            "not converged after {timeout:?}: {diff}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A digest of a whole table in key order, so that big tables compare cheaply.
async fn digest(c: &Client, table: &str) -> (i64, String) {
    let row = c
        .query_one(
            &format!("SELECT count(*), coalesce(md5(string_agg(t::text, '|' ORDER BY id)), '') FROM {table} t"),
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// Waits until every table digests the same on both nodes; names the first rows
/// that differ if they never do.
pub async fn identical(a: &Client, b: &Client, tables: &[&str], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    for t in tables {
        while digest(a, t).await != digest(b, t).await {
            if Instant::now() > deadline {
                panic!(
                    "{t} differs after {timeout:?}: {}",
                    differences(a, b, t).await
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn keyed_rows(c: &Client, table: &str) -> std::collections::BTreeMap<i32, String> {
    let sql = format!("SELECT id, t::text FROM {table} t ORDER BY id");
    c.query(&sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, i32>(0), r.get::<_, String>(1)))
        .collect()
}

/// The first rows of `table` that are not the same on both nodes.
async fn differences(a: &Client, b: &Client, table: &str) -> String {
    let (ra, rb) = (keyed_rows(a, table).await, keyed_rows(b, table).await);
    let mut out = Vec::new();
    for (k, v) in &ra {
        if rb.get(k) != Some(v) {
            out.push(format!(
                "{k}: a={v:.80} b={:.80}",
                rb.get(k).map_or("-", |s| s)
            ));
        }
    }
    for (k, v) in &rb {
        if !ra.contains_key(k) {
            out.push(format!("{k}: a=- b={v:.80}"));
        }
    }
    format!(
        "{} rows differ, first: {:?}",
        out.len(),
        &out[..out.len().min(8)]
    )
}
