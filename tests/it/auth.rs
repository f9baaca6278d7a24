//! The walsender connection authenticates with trust, md5 and SCRAM-SHA-256, sends a
//! cleartext password only where allowed, and reports bad credentials as definite
//! errors. An impostor that skips SCRAM's proof (it never shows that it knows the
//! password) is refused, with or without channel binding.

use crate::harness::certs::Pki;
use crate::harness::pg::{Cluster, CLEARTEXT_USER, MD5_USER, SCRAM_USER};
use duplex::config::tls::TlsParams;
use duplex::pg::walsender::{Tls, WalsenderConnection, WalsenderError};
use duplex::{Classify, ErrorClass};
use std::pin::Pin;
use std::str::FromStr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

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

/// One message from the client: `tag` (none for the startup message), its body.
async fn read_message<S: AsyncRead + Unpin>(s: &mut S, tag: Option<u8>) -> Vec<u8> {
    if let Some(tag) = tag {
        assert_eq!(s.read_u8().await.unwrap(), tag);
    }
    let len = s.read_i32().await.unwrap();
    let mut body = vec![0; len as usize - 4];
    s.read_exact(&mut body).await.unwrap();
    body
}

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// Someone between duplex and a node, on loopback: it answers the SSLRequest with TLS
/// under a certificate of its own, offers `offered` as SASL mechanisms, reads duplex's
/// client-first message and then says AuthenticationOk and ReadyForQuery, skipping
/// the rest of SCRAM (where it would have to prove it knows the password). Returns
/// its port, and the mechanism duplex chose.
async fn impostor(offered: &'static [&'static str]) -> (u16, tokio::task::JoinHandle<String>) {
    use openssl::ssl::{Ssl, SslAcceptor, SslFiletype, SslMethod};
    let pki = Pki::new("nobody");
    let mut acceptor = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).unwrap();
    acceptor
        .set_certificate_chain_file(pki.path("server.crt"))
        .unwrap();
    acceptor
        .set_private_key_file(pki.path("server.key"), SslFiletype::PEM)
        .unwrap();
    let acceptor = acceptor.build();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let request = read_message(&mut tcp, None).await;
        assert_eq!(request, 80_877_103_i32.to_be_bytes(), "not an SSLRequest");
        tcp.write_all(b"S").await.unwrap();
        let mut s =
            tokio_openssl::SslStream::new(Ssl::new(acceptor.context()).unwrap(), tcp).unwrap();
        Pin::new(&mut s).accept().await.unwrap();
        read_message(&mut s, None).await;
        let mut sasl = 10_i32.to_be_bytes().to_vec();
        for m in offered {
            sasl.extend_from_slice(m.as_bytes());
            sasl.push(0);
        }
        sasl.push(0);
        s.write_all(&message(b'R', &sasl)).await.unwrap();
        let first = read_message(&mut s, Some(b'p')).await;
        let chosen = first.split(|b| *b == 0).next().unwrap_or_default();
        let chosen = String::from_utf8_lossy(chosen).into_owned();
        // No server-first message, no server signature: straight to "authenticated".
        let mut ok = message(b'R', &0_i32.to_be_bytes());
        ok.extend(message(b'Z', b"I"));
        // duplex may already have hung up.
        let _ = s.write_all(&ok).await;
        let _ = s.flush().await;
        // Until duplex sends something or hangs up.
        let _ = s.read_u8().await;
        chosen
    });
    (port, server)
}

/// The replication connection's handshake with the node at `url`, as `duplex run`
/// makes it.
async fn replication(url: &str) -> Result<WalsenderConnection, WalsenderError> {
    let (rest, tls) = duplex::config::tls::split(url).unwrap();
    let mut pg = tokio_postgres::Config::from_str(&rest).unwrap();
    pg.ssl_mode(tls.mode.negotiation());
    WalsenderConnection::connect(
        &pg,
        &Tls::new(&tls)?,
        "duplex test",
        Duration::from_secs(10),
        false,
    )
    .await
}

/// With `channel_binding=require`, SCRAM bound to the TLS session is what proves that
/// no one sits in between, and the proof is the node's final SCRAM message: a
/// "success" without it is someone who never saw the password. Without channel
/// binding, the same "success" is refused too.
#[tokio::test]
async fn an_impostor_that_skips_the_scram_proof_is_refused() {
    const BOTH: &[&str] = &["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"];
    let cases: [(&'static [&'static str], &str, &str); 3] = [
        (BOTH, "&channel_binding=require", "SCRAM-SHA-256-PLUS"),
        (BOTH, "", "SCRAM-SHA-256-PLUS"),
        (
            &["SCRAM-SHA-256"],
            "&channel_binding=disable",
            "SCRAM-SHA-256",
        ),
    ];
    let (user, pw) = SCRAM_USER;
    for (offered, binding, chosen) in cases {
        let (port, server) = impostor(offered).await;
        let url = format!("postgres://{user}:{pw}@127.0.0.1:{port}/app?sslmode=require{binding}");
        let e = replication(&url)
            .await
            .err()
            .unwrap_or_else(|| panic!("{url}: authenticated by an impostor"));
        let said = tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the impostor is still talking")
            .unwrap();
        assert_eq!(said, chosen, "{url}");
        assert_eq!(e.class(), ErrorClass::Definite, "{url}: {e}");
        assert!(e.to_string().contains("did not prove"), "{url}: {e}");
    }
}
