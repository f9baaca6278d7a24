//! The walsender connection authenticates with trust, md5 and SCRAM-SHA-256, sends a
//! cleartext password only where allowed, and reports bad credentials as definite
//! errors.

use crate::harness::pg::{Cluster, CLEARTEXT_USER, MD5_USER, SCRAM_USER};
use duplex::capture::walsender::{Tls, WalsenderConnection, WalsenderError};
use duplex::config::tls::TlsParams;
use duplex::{Classify, ErrorClass};
use std::str::FromStr;
use std::time::Duration;

async fn connect(
    user: &str,
    password: Option<&str>,
) -> Result<WalsenderConnection, WalsenderError> {
    connect_allowing(user, password, false).await
}

async fn connect_allowing(
    user: &str,
    password: Option<&str>,
    allow_cleartext: bool,
) -> Result<WalsenderConnection, WalsenderError> {
    let cluster = Cluster::shared();
    let mut cfg = tokio_postgres::Config::from_str(&cluster.url(user, "postgres")).unwrap();
    if let Some(pw) = password {
        cfg.password(pw);
    }
    WalsenderConnection::connect(
        &cfg,
        &prefer_tls(),
        "duplex test",
        Duration::from_secs(10),
        allow_cleartext,
    )
    .await
}

/// libpq's default, `sslmode=prefer`: the shared cluster has no TLS.
fn prefer_tls() -> Tls {
    Tls::new(&TlsParams::default()).unwrap()
}

#[tokio::test]
async fn trust_md5_and_scram_all_identify_the_system() {
    for (user, pw) in [
        ("postgres", None),
        (MD5_USER.0, Some(MD5_USER.1)),
        (SCRAM_USER.0, Some(SCRAM_USER.1)),
    ] {
        let mut conn = connect(user, pw)
            .await
            .unwrap_or_else(|e| panic!("{user}: {e}"));
        let id = conn.identify_system().await.unwrap();
        assert_eq!(id.dbname, "postgres", "{user}");
        assert!(id.timeline >= 1);
        assert!(id.xlog_pos.0 > 0);
    }
}

#[tokio::test]
async fn wrong_or_missing_passwords_are_definite_errors() {
    for user in [MD5_USER.0, SCRAM_USER.0] {
        let e = connect(user, Some("wrong"))
            .await
            .err()
            .expect("wrong password accepted");
        assert_eq!(e.sqlstate(), Some("28P01"), "{user}: {e}");
        assert_eq!(e.class(), ErrorClass::Definite);
        assert!(
            e.to_string().contains("password authentication failed"),
            "{e}"
        );
        let e = connect(user, None)
            .await
            .err()
            .expect("no password accepted");
        assert!(matches!(e, WalsenderError::NoPassword), "{user}: {e}");
        assert_eq!(e.class(), ErrorClass::Definite);
    }
}

#[tokio::test]
async fn unreachable_node_is_transient() {
    let port = crate::harness::free_port();
    let cfg =
        tokio_postgres::Config::from_str(&format!("postgres://x@127.0.0.1:{port}/db")).unwrap();
    let e = WalsenderConnection::connect(
        &cfg,
        &prefer_tls(),
        "duplex test",
        Duration::from_secs(5),
        false,
    )
    .await
    .err()
    .expect("connected to nothing");
    assert_eq!(e.class(), ErrorClass::Transient, "{e}");
    assert!(e.to_string().contains(&port.to_string()), "{e}");
}

/// A request for the password in cleartext is refused unless the node's config allows
/// it: a node set up for md5 or SCRAM never asks that.
#[tokio::test]
async fn a_cleartext_password_request_is_refused_unless_allowed() {
    let (user, pw) = CLEARTEXT_USER;
    let e = connect(user, Some(pw))
        .await
        .err()
        .expect("the password went out in cleartext");
    assert!(matches!(e, WalsenderError::CleartextRefused), "{e}");
    assert_eq!(e.class(), ErrorClass::Definite);
    assert!(e.to_string().contains("allow_cleartext_password"), "{e}");
    let mut conn = connect_allowing(user, Some(pw), true).await.unwrap();
    assert!(conn.identify_system().await.is_ok());
}
