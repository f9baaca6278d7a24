//! Deterministic ids: `duplex uuid`, Python's `uuid.uuid5` and PostgreSQL's
//! `uuid_generate_v5` agree byte for byte; rows created on both nodes for the same
//! natural key merge; a row whose id disagrees is rejected.

use crate::harness::duplex::Rig;
use crate::harness::pg::Cluster;
use crate::harness::tables::{converge, rows};
use std::process::Command;
use std::time::Duration;

const DDL: &str =
    "CREATE TABLE users (id uuid PRIMARY KEY, email text NOT NULL, org text, name text,
                   updated_at timestamptz NOT NULL DEFAULT clock_timestamp());";

/// (namespace, values) cases: a UUID namespace, a name namespace, non-ASCII text,
/// multi-column keys.
const CASES: &[(&str, &[&str])] = &[
    (
        "6ba7b811-9dad-11d1-80b4-00c04fd430c8",
        &["alice@example.com"],
    ),
    ("customers", &["Zoë@exämple.com"]),
    ("customers", &["日本", "😀 émoji"]),
    ("orders", &["acme", "42", ""]),
];

/// Runs `cmd`, which must succeed, and returns its trimmed stdout.
fn stdout_of(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn duplex_uuid(ns: &str, values: &[&str]) -> String {
    stdout_of(
        Command::new(crate::harness::duplex::bin())
            .args(["uuid", "--namespace", ns])
            .args(values),
    )
}

fn python_uuid(ns: &str, values: &[&str]) -> String {
    let script = "import sys, uuid\n\
        ns = sys.argv[1]\n\
        try:\n    ns = uuid.UUID(ns)\n\
        except ValueError:\n    ns = uuid.uuid5(uuid.NAMESPACE_URL, ns)\n\
        print(uuid.uuid5(ns, '\\x1f'.join(sys.argv[2:])))";
    stdout_of(
        Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(ns)
            .args(values),
    )
}

#[tokio::test]
async fn duplex_python_and_postgres_derive_the_same_ids() {
    let cl = Cluster::shared();
    let db = cl.create_db();
    let c = cl.client(&db).await;
    c.batch_execute("CREATE EXTENSION \"uuid-ossp\"")
        .await
        .unwrap();
    for (ns, values) in CASES {
        let ours = duplex_uuid(ns, values);
        assert_eq!(ours, python_uuid(ns, values), "{ns} {values:?}");
        let ns_uuid = duplex::identity::namespace(ns).to_string();
        let vals: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        let pg: String = c
            .query_one(
                "SELECT uuid_generate_v5($1::text::uuid, array_to_string($2::text[], E'\\x1f'))::text",
                &[&ns_uuid, &vals],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(ours, pg, "{ns} {values:?}");
    }
}

fn with_identity(rig: &Rig) {
    rig.add_identity("public.users", "customers", &["email", "org"]);
}

#[tokio::test]
async fn rows_created_on_both_nodes_for_one_natural_key_merge() {
    let rig = Rig::both(DDL, &["public.users"], "").await;
    with_identity(&rig);
    assert!(rig.command(&["setup"]).status.success());
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    // Created independently while duplex is down, without ids.
    a.batch_execute(
        "INSERT INTO users (email, org, name) VALUES ('zoë@example.com', 'acme', 'from a')",
    )
    .await
    .unwrap();
    b.batch_execute(
        "INSERT INTO users (email, org, name) VALUES ('zoë@example.com', 'acme', 'from b')",
    )
    .await
    .unwrap();
    let expected = duplex_uuid("customers", &["zoë@example.com", "acme"]);
    for c in [&a, &b] {
        let id: String = c
            .query_one("SELECT id::text FROM users", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(id, expected);
    }
    // A NULL in a natural-key column is refused with a clear error.
    let e = a
        .batch_execute("INSERT INTO users (email, org) VALUES ('x@example.com', NULL)")
        .await
        .unwrap_err();
    let msg = e
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default();
    assert!(
        msg.contains("natural-key column org") && msg.contains("NULL"),
        "{msg}"
    );
    let d = rig.start();
    converge(&a, &b, &["users"], Duration::from_secs(30)).await;
    let r = rows(&a, "users").await;
    assert_eq!(r.len(), 1);
    assert!(r[0].contains("from b"), "the newer version wins: {r:?}");
    assert_eq!(d.stop().await, Some(0));
}

#[tokio::test]
async fn an_incoming_row_whose_id_disagrees_is_rejected() {
    let rig = Rig::new(DDL, &["public.users"], "").await;
    with_identity(&rig);
    assert!(rig.command(&["setup"]).status.success());
    let a = Cluster::shared().client(&rig.db_a).await;
    // Bypass the trigger on a, as a writer that does not know the rule would.
    a.batch_execute(
        "ALTER TABLE users DISABLE TRIGGER duplex_identity;
         INSERT INTO users (id, email, org) VALUES ('00000000-0000-0000-0000-000000000001', 'y@example.com', 'acme');",
    )
    .await
    .unwrap();
    let d = rig.start();
    let logs = d
        .wait_log("halted on a bad event", 1, Duration::from_secs(30))
        .await;
    let expected = duplex_uuid("customers", &["y@example.com", "acme"]);
    assert!(
        logs.contains(&format!("its natural key derives {expected}")),
        "{logs}"
    );
    assert_eq!(d.stop().await, Some(0));
}
