//! The mapping's reference case: the legacy schema on node a, the modern one on node
//! b, the mapping between them, and the check that both nodes hold the same rows
//! through it.

use super::duplex::Rig;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// The legacy schema of the reference case: integer keys, on node a.
const LEGACY: &str = "
CREATE TABLE users (id serial PRIMARY KEY, email text UNIQUE NOT NULL, name text,
                    created_at timestamp NOT NULL DEFAULT (now() AT TIME ZONE 'UTC'),
                    updated_at timestamp NOT NULL DEFAULT (clock_timestamp() AT TIME ZONE 'UTC'));
CREATE TABLE orders (id serial PRIMARY KEY, user_id int REFERENCES users, total_cents int,
                     status char(1), note text,
                     updated_at timestamp NOT NULL DEFAULT (clock_timestamp() AT TIME ZONE 'UTC'));
";

/// The modern schema of the reference case: UUID keys, on node b.
const MODERN: &str = "
CREATE TABLE accounts (id uuid PRIMARY KEY, email text UNIQUE NOT NULL, full_name text,
                       created_at timestamptz NOT NULL DEFAULT now(),
                       updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE orders (id uuid PRIMARY KEY, account_id uuid REFERENCES accounts, total numeric(12,2),
                     status text, note text, updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
";

/// The mapping of the reference case, node a legacy and node b modern.
const MAPPING: &str = r#"
[[tables]]
name = "public.accounts"
nodes = { a = "public.users", b = "public.accounts" }
key = { a = "id", b = "id" }
new_key = { b = { namespace = "users", from = ["email"] } }
columns = [ { a = "name", b = "full_name" } ]

[[tables]]
name = "public.orders"
key = { a = "id", b = "id" }
new_key = { b = { namespace = "orders", from = ["id"] } }
columns = [
  { a = "user_id", b = "account_id", references = "public.accounts" },
  { a = "total_cents", b = "total", scale = { a = 100, b = 1 } },
  { a = "status", b = "status", values = { a = ["P", "S", "C"], b = ["pending", "shipped", "cancelled"] } },
]
"#;

/// A rig with the legacy schema on a, the modern one on b, and the mapping.
pub async fn rig(extra: &str) -> (Rig, Client, Client) {
    let rig = Rig::both("", &[], &format!("{MAPPING}\n{extra}")).await;
    let (a, b) = (rig.client_a().await, rig.client_b().await);
    a.batch_execute(LEGACY).await.unwrap();
    b.batch_execute(MODERN).await.unwrap();
    (rig, a, b)
}

/// What the legacy node holds, in the modern schema, through node b's pairings:
/// accounts as (id, email, full_name, created_at, updated_at) and orders as (id,
/// account_id, total, status, note, updated_at), all as text.
type Tables = (BTreeSet<Vec<String>>, BTreeSet<Vec<String>>);

/// The key pairings `c` holds for `table`: key on a to key on b.
pub async fn pairs(c: &Client, table: &str) -> BTreeMap<String, String> {
    c.query(
        "SELECT key_a, key_b FROM duplex.key_pairs WHERE table_name = $1",
        &[&table],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

async fn legacy_as_modern(a: &Client, b: &Client) -> Result<Tables, String> {
    let users = pairs(b, "public.accounts").await;
    let orders = pairs(b, "public.orders").await;
    let pick = |m: &BTreeMap<String, String>, what: &str, k: String| {
        m.get(&k)
            .cloned()
            .ok_or(format!("{what} {k} has no pairing on b"))
    };
    let mut accounts = BTreeSet::new();
    for r in a
        .query(
            "SELECT id::text, email, coalesce(name, '<null>'), (created_at AT TIME ZONE 'UTC')::text,
                    (updated_at AT TIME ZONE 'UTC')::text FROM users",
            &[],
        )
        .await
        .unwrap()
    {
        let id = pick(&users, "user", r.get(0))?;
        accounts.insert(vec![id, r.get(1), r.get(2), r.get(3), r.get(4)]);
    }
    let mut out = BTreeSet::new();
    for r in a
        .query(
            "SELECT id::text, user_id::text, (total_cents / 100.0)::numeric(12,2)::text,
                    CASE status WHEN 'P' THEN 'pending' WHEN 'S' THEN 'shipped' WHEN 'C' THEN 'cancelled' END,
                    coalesce(note, '<null>'), (updated_at AT TIME ZONE 'UTC')::text FROM orders",
            &[],
        )
        .await
        .unwrap()
    {
        let id = pick(&orders, "order", r.get(0))?;
        let account = match r.get::<_, Option<String>>(1) {
            Some(u) => pick(&users, "user", u)?,
            None => "<null>".into(),
        };
        out.insert(vec![id, account, r.get(2), r.get(3), r.get(4), r.get(5)]);
    }
    Ok((accounts, out))
}

async fn modern(b: &Client) -> Tables {
    let rows = |sql: &'static str| async move {
        b.query(sql, &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (0..r.len()).map(|i| r.get::<_, String>(i)).collect())
            .collect::<BTreeSet<Vec<String>>>()
    };
    (
        rows("SELECT id::text, email, coalesce(full_name, '<null>'), created_at::text, updated_at::text FROM accounts").await,
        rows("SELECT id::text, coalesce(account_id::text, '<null>'), total::text, status, coalesce(note, '<null>'), updated_at::text FROM orders").await,
    )
}

/// Waits until both nodes hold the same rows through the mapping, and the same
/// pairings of their live rows.
pub async fn converged(a: &Client, b: &Client, timeout: Duration) -> Tables {
    let deadline = Instant::now() + timeout;
    loop {
        let why = match legacy_as_modern(a, b).await {
            Ok(l) => {
                let m = modern(b).await;
                if l == m {
                    let mut why = String::new();
                    for t in ["public.accounts", "public.orders"] {
                        let (pa, pb) = (pairs(a, t).await, pairs(b, t).await);
                        let only_a: Vec<_> = pa
                            .iter()
                            .filter(|(k, v)| pb.get(*k) != Some(v))
                            .take(5)
                            .collect();
                        let only_b: Vec<_> = pb
                            .iter()
                            .filter(|(k, v)| pa.get(*k) != Some(v))
                            .take(5)
                            .collect();
                        if !only_a.is_empty() || !only_b.is_empty() {
                            why.push_str(&format!(
                                "{t} pairings only on a {only_a:?}, only on b {only_b:?}; "
                            ));
                        }
                    }
                    if why.is_empty() {
                        return m;
                    }
                    why
                } else {
                    let only_l: Vec<_> = l.1.difference(&m.1).take(3).collect();
                    let only_m: Vec<_> = m.1.difference(&l.1).take(3).collect();
                    let ua: Vec<_> = l.0.difference(&m.0).take(3).collect();
                    let ub: Vec<_> = m.0.difference(&l.0).take(3).collect();
                    format!("accounts only legacy {ua:?} only modern {ub:?}; orders only legacy {only_l:?} only modern {only_m:?}")
                }
            }
            Err(e) => e,
        };
        assert!(
            Instant::now() < deadline,
            "not converged after {timeout:?}: {why}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
