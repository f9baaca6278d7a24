//! TLS to the nodes: a cluster that accepts duplex's roles only over TLS, with a
//! certificate from a CA the test makes up. duplex converges through it with both its
//! SQL sessions and its replication connections encrypted (one node by SCRAM bound to
//! the TLS session, the other by client certificate), and a certificate it must not
//! accept (wrong CA, wrong host name) is a definite error naming the cause.

use crate::harness::certs::Pki;
use crate::harness::output_text;
use crate::harness::pg::{Cluster, SCRAM_USER};
use crate::harness::workload::{converges_under_workloads, rig_before_setup_on};
use duplex::pg::walsender::{Tls, WalsenderConnection};
use duplex::{Classify, ErrorClass};
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Duration;

/// Authenticated by its client certificate.
const CERT_USER: &str = "duplex_cert";

/// duplex's roles over TLS only; the tests' own `postgres` sessions as before.
const HBA: &str = "\
hostssl all duplex_cert 127.0.0.1/32 cert
hostssl replication duplex_cert 127.0.0.1/32 cert
hostssl all duplex_scram 127.0.0.1/32 scram-sha-256
hostssl replication duplex_scram 127.0.0.1/32 scram-sha-256
host all duplex_cert,duplex_scram 127.0.0.1/32 reject
host replication duplex_cert,duplex_scram 127.0.0.1/32 reject";

fn node() -> &'static (Cluster, Pki) {
    static NODE: OnceLock<(Cluster, Pki)> = OnceLock::new();
    NODE.get_or_init(|| {
        let pki = Pki::new(CERT_USER);
        let settings = pki.server_settings();
        let settings: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let cluster = Cluster::start(&settings);
        cluster.psql(
            "postgres",
            &format!("CREATE ROLE {CERT_USER} LOGIN SUPERUSER"),
        );
        cluster.prepend_hba(HBA);
        (cluster, pki)
    })
}

/// A URL for the SCRAM role on `db` at `host`, with `params` (`&`-joined).
fn scram_url(host: &str, db: &str, params: &str) -> String {
    let (user, pw) = SCRAM_USER;
    format!(
        "postgres://{user}:{pw}@{host}:{}/{db}?{params}",
        node().0.port
    )
}

#[tokio::test]
async fn every_connection_is_encrypted_and_the_nodes_converge() {
    let (cluster, pki) = node();
    let rig = rig_before_setup_on(cluster).await;
    let ca = pki.path("ca.pem");
    let url_a = scram_url(
        "localhost",
        &rig.db_a,
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    let url_b = format!(
        "postgres://{CERT_USER}@127.0.0.1:{}/{}?sslmode=verify-ca&sslrootcert={ca}&sslcert={}&sslkey={}",
        cluster.port,
        rig.db_b,
        pki.path("client.crt"),
        pki.path("client.key"),
    );
    rig.edit_config(&[
        (&cluster.url("postgres", &rig.db_a), &url_a),
        (&rig.url_b("postgres"), &url_b),
    ]);
    let check = rig.command(&["check"]);
    assert_eq!(check.status.code(), Some(0), "{}", output_text(&check));
    let setup = rig.command(&["setup"]);
    assert!(setup.status.success(), "{}", output_text(&setup));
    let (d, _) = converges_under_workloads(&rig, 10, 300).await;

    let c = cluster.client("postgres").await;
    let sessions = c
        .query(
            "SELECT a.datname::text, a.usename::text, a.backend_type, s.ssl
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
             WHERE a.application_name LIKE 'duplex%' AND a.datname IN ($1, $2)",
            &[&rig.db_a, &rig.db_b],
        )
        .await
        .unwrap();
    for (db, user) in [(&rig.db_a, SCRAM_USER.0), (&rig.db_b, CERT_USER)] {
        let on_db: Vec<_> = sessions
            .iter()
            .filter(|r| r.get::<_, String>(0) == *db)
            .collect();
        let kinds: Vec<String> = on_db.iter().map(|r| r.get(2)).collect();
        assert!(kinds.iter().any(|k| k == "walsender"), "{db}: {kinds:?}");
        assert!(
            kinds.iter().any(|k| k == "client backend"),
            "{db}: {kinds:?}"
        );
        for r in on_db {
            assert_eq!(r.get::<_, String>(1), user, "{db}");
            assert!(
                r.get::<_, bool>(3),
                "{db}: a {} session without TLS",
                r.get::<_, String>(2)
            );
        }
    }
    assert_eq!(d.stop().await, Some(0));
}

/// The replication connection's own handshake, with `params`.
async fn replication(
    db: &str,
    host: &str,
    params: &str,
) -> Result<(), duplex::pg::walsender::WalsenderError> {
    let url = scram_url(host, db, params);
    let (rest, tls) = duplex::config::tls::split(&url).unwrap();
    let mut pg = tokio_postgres::Config::from_str(&rest).unwrap();
    pg.ssl_mode(tls.mode.negotiation());
    let tls = Tls::new(&tls)?;
    let mut conn =
        WalsenderConnection::connect(&pg, &tls, "duplex test", Duration::from_secs(10), false)
            .await?;
    conn.identify_system().await.map(|_| ())
}

#[tokio::test]
async fn certificates_duplex_must_not_accept_are_definite_errors_naming_why() {
    let (cluster, pki) = node();
    let db = cluster.create_db();
    let (ca, other) = (pki.path("ca.pem"), pki.path("other-ca.pem"));
    let cases = [
        (
            "localhost",
            format!("sslmode=verify-full&sslrootcert={other}"),
            "self-signed certificate in certificate chain",
        ),
        (
            "127.0.0.1",
            format!("sslmode=verify-full&sslrootcert={ca}"),
            "mismatch",
        ),
        (
            "localhost",
            "sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem".to_string(),
            "/nonexistent/ca.pem",
        ),
        ("localhost", "sslmode=disable".to_string(), "no encryption"),
    ];
    for (host, params, cause) in &cases {
        let e = replication(&db, host, params).await.expect_err(params);
        assert!(e.to_string().contains(cause), "{params}: {e}");
        assert_eq!(e.class(), ErrorClass::Definite, "{params}: {e}");
    }
    // Encrypted without checking the certificate, as libpq's `require` does; and the
    // host name is not checked by verify-ca.
    replication(&db, "localhost", "sslmode=require")
        .await
        .unwrap();
    replication(
        &db,
        "127.0.0.1",
        &format!("sslmode=verify-ca&sslrootcert={ca}"),
    )
    .await
    .unwrap();

    // The SQL sessions: `duplex check` names the cause, `duplex run` stops with it.
    let ddl =
        "CREATE TABLE items (id int PRIMARY KEY, updated_at timestamptz NOT NULL DEFAULT now())";
    let rig = crate::harness::duplex::Rig::new_on(cluster, ddl, &["public.items"], "").await;
    for (host, params, cause) in &cases {
        let url = scram_url(host, &rig.db_a, params);
        let cfg = std::fs::read_to_string(&rig.config).unwrap();
        let cfg = cfg.replace(&cluster.url("postgres", &rig.db_a), &url);
        let path = rig.dir.join("bad.toml");
        std::fs::write(&path, cfg).unwrap();
        let out = std::process::Command::new(crate::harness::duplex::bin())
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let said = output_text(&out);
        assert_eq!(out.status.code(), Some(1), "{params}: {said}");
        assert!(
            said.contains("node a") && said.contains(cause),
            "{params}: {said}"
        );
        if *cause == "mismatch" {
            let mut d = rig.start_with(&path);
            assert_eq!(
                d.exited(Duration::from_secs(60)).await,
                Some(1),
                "{}",
                d.logs()
            );
            assert!(d.logs().contains(cause), "{}", d.logs());
        }
    }
}

/// The system's trusted roots without a host name check would let any public CA's
/// certificate for any name through: a config error naming the node's URL, before
/// anything connects.
#[test]
fn system_roots_without_verify_full_are_a_config_error() {
    let dir = crate::harness::temp_dir("duplex-cfg-");
    for mode in ["require", "verify-ca"] {
        let config = dir.join(format!("{mode}.toml"));
        std::fs::write(
            &config,
            format!(
                r#"
[nodes.a]
url = "postgres://duplex@db.example.net/app?sslmode={mode}&sslrootcert=system"
[nodes.b]
url = "postgres://duplex@127.0.0.1/app"
[kafka]
brokers = "127.0.0.1:9"
[sync]
direction = "a_to_b"
[[tables]]
name = "public.items"
"#
            ),
        )
        .unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_duplex"))
            .args(["check", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let said = output_text(&out);
        assert_eq!(out.status.code(), Some(2), "{mode}: {said}");
        assert!(
            said.contains("nodes.a.url")
                && said.contains(&format!(
                    "sslmode={mode} may not be used with sslrootcert=system"
                )),
            "{mode}: {said}"
        );
    }
}
