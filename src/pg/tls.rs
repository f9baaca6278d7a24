//! TLS to a node, for the SQL sessions (as tokio-postgres's connector) and the
//! replication connection (which negotiates it itself, see `capture::walsender`).
//!
//! [`Tls::new`] turns a node URL's [`TlsParams`] into an OpenSSL client context the
//! way libpq would: `prefer` and `require` encrypt without checking the certificate
//! (unless `require` has a root certificate, which makes it `verify-ca`), `verify-ca`
//! checks the chain against `sslrootcert`, `verify-full` also the host name; a client
//! certificate is sent when `sslcert`/`sslkey` (or `~/.postgresql/postgresql.crt`) are
//! there. A handshake that fails names why ([`TlsError`]): a certificate the node
//! rejected or one we did not accept is definite, a connection lost midway transient.
//! The session's `tls-server-end-point` channel binding lets SCRAM prove that no one
//! sits between duplex and the node.

use crate::config::tls::{RootCert, SslMode, TlsParams};
use crate::{Classify, ErrorClass};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::PKey;
use openssl::ssl::{SslConnector, SslMethod, SslRef, SslVerifyMode};
use openssl::x509::X509VerifyResult;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_openssl::SslStream;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

/// Why TLS to a node failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {}: {detail}", path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("sslmode={mode} needs a root certificate: {} does not exist. Set sslrootcert to the CA's certificate (PEM), use sslrootcert=system with sslmode=verify-full for the system's trusted roots, or choose a sslmode that does not check the certificate", path.display())]
    NoRootCert { mode: &'static str, path: PathBuf },
    #[error("the certificate of {host} was not accepted: {reason} ({check})")]
    Rejected {
        host: String,
        reason: String,
        check: String,
    },
    #[error(
        "the node does not accept TLS (its `ssl` setting is off), but sslmode={0} requires it"
    )]
    NotOffered(&'static str),
    #[error("TLS handshake with {host} failed: {source}")]
    Handshake {
        host: String,
        source: openssl::ssl::Error,
    },
    #[error("setting up TLS: {0}")]
    Setup(#[from] openssl::error::ErrorStack),
    #[error("connection lost during the TLS handshake: {0}")]
    Io(#[from] std::io::Error),
}

impl Classify for TlsError {
    fn class(&self) -> ErrorClass {
        match self {
            TlsError::Io(_) => ErrorClass::Transient,
            TlsError::Handshake { source, .. } if source.io_error().is_some() => {
                ErrorClass::Transient
            }
            _ => ErrorClass::Definite,
        }
    }
}

/// A node's TLS client context; cheap to clone.
#[derive(Clone)]
pub struct Tls {
    mode: SslMode,
    /// `None` with `sslmode=disable`.
    connector: Option<SslConnector>,
    verify_host: bool,
    /// What the certificate was checked against, for error messages.
    check: String,
}

/// Contexts built so far, with the settings and the stamps of the files they read.
/// Building one costs 18 ms of CPU (OpenSSL loads the system's CA bundle for every
/// connector), which every connection paid: a start opens about twenty, and with both
/// pipelines starting at once that was most of the time to `/readyz`.
type Built = Vec<(TlsParams, Vec<Option<FileStamp>>, Tls)>;
static BUILT: std::sync::Mutex<Built> = std::sync::Mutex::new(Vec::new());

/// When a file was last changed, and its length.
type FileStamp = (std::time::SystemTime, u64);

/// The stamps of the files a context for `params` reads (given or libpq's defaults
/// under `~/.postgresql`), so that a rotated certificate or key is read again, as
/// libpq reads them for every connection.
fn stamps(params: &TlsParams) -> Vec<Option<FileStamp>> {
    let root = match &params.root_cert {
        Some(RootCert::File(path)) => Some(path.clone()),
        _ => None,
    };
    [
        root,
        home_file("root.crt"),
        params
            .client_cert
            .clone()
            .or_else(|| home_file("postgresql.crt")),
        params
            .client_key
            .clone()
            .or_else(|| home_file("postgresql.key")),
    ]
    .iter()
    .map(|path| {
        let meta = std::fs::metadata(path.as_ref()?).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    })
    .collect()
}

impl Tls {
    /// [`Self::new`], built once per settings and reused while the files it read are
    /// unchanged.
    pub fn shared(params: &TlsParams) -> Result<Tls, TlsError> {
        let stamps = stamps(params);
        // Held while building: two sessions starting at once build one context.
        let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, _, tls)) = built.iter().find(|(p, s, _)| p == params && *s == stamps) {
            return Ok(tls.clone());
        }
        let tls = Tls::new(params)?;
        built.retain(|(p, _, _)| p != params);
        built.push((params.clone(), stamps, tls.clone()));
        Ok(tls)
    }

    pub fn new(params: &TlsParams) -> Result<Tls, TlsError> {
        let mut tls = Tls {
            mode: params.mode,
            connector: None,
            verify_host: params.mode == SslMode::VerifyFull,
            check: String::new(),
        };
        if params.mode == SslMode::Disable {
            return Ok(tls);
        }
        let mut builder = SslConnector::builder(SslMethod::tls_client())?;
        builder.set_verify(SslVerifyMode::NONE);
        if let Some(root) = root_cert(params)? {
            builder.set_verify(SslVerifyMode::PEER);
            tls.check = match &root {
                RootCert::System => {
                    builder.set_default_verify_paths()?;
                    "checked against the system's trusted roots".into()
                }
                RootCert::File(path) => {
                    readable("root certificate file", path)?;
                    builder.set_ca_file(path)?;
                    format!("checked against sslrootcert {}", path.display())
                }
            };
            if tls.verify_host {
                tls.check
                    .push_str(" and the host name, as sslmode=verify-full asks");
            }
        }
        client_certificate(&mut builder, params)?;
        tls.connector = Some(builder.build());
        Ok(tls)
    }

    pub fn mode(&self) -> SslMode {
        self.mode
    }

    /// Runs the TLS handshake with `host` over `stream`.
    pub async fn handshake<S>(&self, host: &str, stream: S) -> Result<TlsStream<S>, TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        // With sslmode=disable, tokio-postgres and the walsender never ask for TLS.
        let connector = self
            .connector
            .as_ref()
            .ok_or(TlsError::NotOffered("disable"))?;
        let mut config = connector.configure()?;
        config.set_verify_hostname(self.verify_host);
        let ssl = config.into_ssl(host)?;
        let mut stream = SslStream::new(ssl, stream)?;
        if let Err(source) = Pin::new(&mut stream).connect().await {
            let verify = stream.ssl().verify_result();
            return Err(match verify {
                X509VerifyResult::OK => TlsError::Handshake {
                    host: host.to_string(),
                    source,
                },
                failed => TlsError::Rejected {
                    host: host.to_string(),
                    reason: failed.error_string().to_string(),
                    check: self.check.clone(),
                },
            });
        }
        Ok(TlsStream(stream))
    }
}

/// The root certificate to check the node's against, if the mode checks it.
fn root_cert(params: &TlsParams) -> Result<Option<RootCert>, TlsError> {
    let default = home_file("root.crt");
    match params.mode {
        SslMode::VerifyCa | SslMode::VerifyFull => {}
        // libpq: `require` with a root certificate at hand behaves as `verify-ca`.
        SslMode::Require => {
            let given = params.root_cert.clone();
            return Ok(given.or_else(|| default.filter(|p| p.exists()).map(RootCert::File)));
        }
        SslMode::Disable | SslMode::Prefer => return Ok(None),
    }
    match (&params.root_cert, default) {
        (Some(root), _) => Ok(Some(root.clone())),
        (None, Some(path)) if path.exists() => Ok(Some(RootCert::File(path))),
        (None, path) => Err(TlsError::NoRootCert {
            mode: params.mode.name(),
            path: path.unwrap_or_else(|| "~/.postgresql/root.crt".into()),
        }),
    }
}

/// Loads the client certificate and key: the URL's `sslcert`, or libpq's default
/// `~/.postgresql/postgresql.crt` when it exists; the key is `sslkey` or
/// `~/.postgresql/postgresql.key`.
fn client_certificate(
    builder: &mut openssl::ssl::SslConnectorBuilder,
    params: &TlsParams,
) -> Result<(), TlsError> {
    let cert = match (&params.client_cert, home_file("postgresql.crt")) {
        (Some(given), _) => given.clone(),
        (None, Some(default)) if default.exists() => default,
        _ => return Ok(()),
    };
    let key = params
        .client_key
        .clone()
        .or_else(|| home_file("postgresql.key"))
        .unwrap_or_else(|| "~/.postgresql/postgresql.key".into());
    readable("client certificate file", &cert)?;
    let pem = readable("client key file", &key)?;
    builder.set_certificate_chain_file(&cert)?;
    let pkey = match &params.key_password {
        Some(pw) => PKey::private_key_from_pem_passphrase(&pem, pw.as_bytes()),
        None => PKey::private_key_from_pem(&pem),
    }
    .map_err(|e| TlsError::File {
        what: "client key file",
        path: key.clone(),
        detail: format!("not a PEM private key, or sslpassword does not open it: {e}"),
    })?;
    builder.set_private_key(&pkey)?;
    builder.check_private_key().map_err(|e| TlsError::File {
        what: "client key file",
        path: key,
        detail: format!("does not belong to sslcert {}: {e}", cert.display()),
    })?;
    Ok(())
}

fn readable(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::File {
        what,
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

fn home_file(name: &str) -> Option<PathBuf> {
    std::env::var_os("HOME").map(|home| Path::new(&home).join(".postgresql").join(name))
}

/// The `tls-server-end-point` channel binding (RFC 5929): a hash of the node's
/// certificate with its signature's digest, SHA-256 for MD5 and SHA-1.
pub fn server_end_point(ssl: &SslRef) -> Option<Vec<u8>> {
    let cert = ssl.peer_certificate()?;
    let signature = cert.signature_algorithm().object().nid();
    let digest = match signature.signature_algorithms()?.digest {
        Nid::MD5 | Nid::SHA1 => MessageDigest::sha256(),
        nid => MessageDigest::from_nid(nid)?,
    };
    cert.digest(digest).ok().map(|d| d.to_vec())
}

/// A TLS session over `S`.
pub struct TlsStream<S>(SslStream<S>);

impl<S> TlsStream<S> {
    pub fn ssl(&self) -> &SslRef {
        self.0.ssl()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for TlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        match server_end_point(self.ssl()) {
            Some(hash) => ChannelBinding::tls_server_end_point(hash),
            None => ChannelBinding::none(),
        }
    }
}

/// tokio-postgres's side: one `HostTls` per host it tries.
impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> MakeTlsConnect<S> for Tls {
    type Stream = TlsStream<S>;
    type TlsConnect = HostTls;
    type Error = TlsError;

    fn make_tls_connect(&mut self, host: &str) -> Result<HostTls, TlsError> {
        Ok(HostTls {
            tls: self.clone(),
            host: host.to_string(),
        })
    }
}

/// [`Tls`] for one host.
pub struct HostTls {
    tls: Tls,
    host: String,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> TlsConnect<S> for HostTls {
    type Stream = TlsStream<S>;
    type Error = TlsError;
    type Future = Pin<Box<dyn Future<Output = Result<TlsStream<S>, TlsError>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move { self.tls.handshake(&self.host, stream).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The address of the OpenSSL context: the same one is shared.
    fn context_of(tls: &Tls) -> usize {
        tls.connector
            .as_ref()
            .map_or(0, |c| std::ptr::from_ref(c.context()) as usize)
    }

    #[test]
    fn a_context_is_built_once_per_settings_and_again_when_its_files_change() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("client.crt");
        std::fs::write(&cert, "one").unwrap();
        let params = TlsParams {
            mode: SslMode::Prefer,
            // Only stamped here: `prefer` reads no root certificate.
            root_cert: Some(RootCert::File(cert.clone())),
            ..Default::default()
        };
        let first = Tls::shared(&params).unwrap();
        let again = Tls::shared(&params).unwrap();
        assert_eq!(context_of(&first), context_of(&again));
        let before = stamps(&params);
        std::fs::write(&cert, "rotated, longer").unwrap();
        assert_ne!(stamps(&params), before);
        let rotated = Tls::shared(&params).unwrap();
        assert_ne!(context_of(&first), context_of(&rotated));
        // Other settings get their own context.
        let required = TlsParams {
            mode: SslMode::Require,
            root_cert: None,
            ..params
        };
        assert_ne!(
            context_of(&Tls::shared(&required).unwrap()),
            context_of(&rotated)
        );
    }
}
