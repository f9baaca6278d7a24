//! A connection to a node's walsender in `replication=database` mode.
//!
//! tokio-postgres cannot open replication connections, so this speaks the protocol
//! directly over a socket with postgres-protocol's message codecs: TLS negotiation
//! (`pg::tls`, as the URL's `sslmode` asks), startup and authentication (`auth`:
//! trust, md5, SCRAM-SHA-256 with channel binding, cleartext where allowed),
//! simple queries for the replication commands, and then COPY BOTH, where the node
//! sends XLogData and keepalives and we send standby status updates. Bytes read from the socket are kept
//! in one buffer, so [`ReplicationStream::recv`] can be cancelled (e.g. by a timer in
//! `select!`) without losing data.

use crate::config::tls::SslMode;
use crate::event::Lsn;
use crate::pg::sql::{class_of_sqlstate, quote_ident, quote_literal, OUTPUT_SETTINGS};
use crate::pg::tls::server_end_point;
pub use crate::pg::tls::{Tls, TlsError};
use crate::{Classify, ErrorClass};
use bytes::{Buf, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::{backend, frontend};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

mod auth;

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
pub const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// Errors talking to a walsender.
#[derive(Debug, thiserror::Error)]
pub enum WalsenderError {
    #[error("connection to {endpoint} failed: {source}")]
    Connect {
        endpoint: String,
        source: std::io::Error,
    },
    #[error("connecting to {0} timed out")]
    ConnectTimeout(String),
    #[error("replication connection lost: {0}")]
    Io(#[from] std::io::Error),
    #[error("the node closed the replication connection")]
    Closed,
    #[error("node error {code}: {message}{}", detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Server {
        code: String,
        message: String,
        detail: Option<String>,
    },
    #[error("the node asked for a password but none is configured (set it in the URL or DUPLEX_NODES_<NAME>_PASSWORD)")]
    NoPassword,
    #[error("the node asked for the password in cleartext; duplex refuses to send it (a node set up for md5 or SCRAM never asks that, so someone between may be after the password). If the node's pg_hba.conf really uses the `password` method, set allow_cleartext_password = true for this node")]
    CleartextRefused,
    #[error("the node did not prove that it knows the password: {0}. Someone between duplex and the node may be impersonating it: check the network path, and use sslmode=verify-full so that only the node's own certificate is accepted")]
    Unproven(String),
    #[error("TLS to the node: {0}")]
    Tls(#[from] TlsError),
    #[error("unsupported connection setting: {0}")]
    Unsupported(String),
    #[error("unexpected replication protocol message: {0}")]
    Protocol(String),
}

impl Classify for WalsenderError {
    fn class(&self) -> ErrorClass {
        match self {
            WalsenderError::NoPassword
            | WalsenderError::CleartextRefused
            | WalsenderError::Unproven(_)
            | WalsenderError::Unsupported(_) => ErrorClass::Definite,
            WalsenderError::Server { code, .. } => class_of_sqlstate(code),
            WalsenderError::Tls(e) => e.class(),
            _ => ErrorClass::Transient,
        }
    }
}

impl WalsenderError {
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            WalsenderError::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

trait Socket: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Socket for T {}

/// A frame read off the wire: its tag and body (the length header stripped).
struct Frame {
    tag: u8,
    body: Bytes,
}

/// A walsender connection outside COPY mode: run replication commands on it.
pub struct WalsenderConnection {
    socket: Box<dyn Socket>,
    read: BytesMut,
    write: BytesMut,
    /// The server's major version, from its `server_version` at startup (0 if unsaid).
    server_major: u32,
}

/// Result of IDENTIFY_SYSTEM.
#[derive(Debug, Clone)]
pub struct SystemIdentity {
    pub system_id: String,
    pub timeline: u32,
    pub xlog_pos: Lsn,
    pub dbname: String,
}

impl WalsenderConnection {
    /// Opens a socket to the first reachable host of `cfg`, negotiates TLS as `tls`
    /// says, starts a replication session and authenticates.
    pub async fn connect(
        cfg: &tokio_postgres::Config,
        tls: &Tls,
        application_name: &str,
        timeout: Duration,
        allow_cleartext: bool,
    ) -> Result<WalsenderConnection, WalsenderError> {
        let (socket, binding) = open_socket(cfg, tls, timeout).await?;
        let mut conn = WalsenderConnection {
            socket,
            read: BytesMut::with_capacity(64 * 1024),
            write: BytesMut::with_capacity(1024),
            server_major: 0,
        };
        let user = cfg.get_user().unwrap_or("postgres");
        let dbname = cfg.get_dbname().unwrap_or(user);
        let mut params: Vec<(&str, &str)> = vec![
            ("user", user),
            ("database", dbname),
            ("replication", "database"),
            ("application_name", application_name),
        ];
        params.extend_from_slice(OUTPUT_SETTINGS);
        frontend::startup_message(params, &mut conn.write)?;
        conn.flush().await?;
        let auth = auth::Credentials {
            user,
            password: cfg.get_password(),
            allow_cleartext,
            binding,
            require_binding: cfg.get_channel_binding()
                == tokio_postgres::config::ChannelBinding::Require,
        };
        conn.authenticate(auth).await?;
        conn.wait_ready().await?;
        Ok(conn)
    }

    /// Reads past ParameterStatus/BackendKeyData to ReadyForQuery, keeping the
    /// server's version.
    async fn wait_ready(&mut self) -> Result<(), WalsenderError> {
        loop {
            let frame = self.read_frame().await?;
            match parse_backend(frame)? {
                backend::Message::ReadyForQuery(_) => return Ok(()),
                backend::Message::ErrorResponse(body) => return Err(server_error(&body)),
                backend::Message::ParameterStatus(p) if p.name()? == "server_version" => {
                    self.server_major = major_of(p.value()?);
                }
                _ => {}
            }
        }
    }

    /// The server's major version (13 for 13.23), 0 if the server did not say.
    pub fn server_major(&self) -> u32 {
        self.server_major
    }

    /// Runs one simple-protocol command and returns its rows as text.
    pub async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, WalsenderError> {
        frontend::query(sql, &mut self.write)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let frame = self.read_frame().await?;
            match parse_backend(frame)? {
                backend::Message::DataRow(body) => rows.push(data_row(&body)?),
                backend::Message::ErrorResponse(body) => error = Some(server_error(&body)),
                backend::Message::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    pub async fn identify_system(&mut self) -> Result<SystemIdentity, WalsenderError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows
            .first()
            .ok_or_else(|| protocol("IDENTIFY_SYSTEM without a row"))?;
        let col = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        Ok(SystemIdentity {
            system_id: col(0),
            timeline: col(1)
                .parse()
                .map_err(|_| protocol("IDENTIFY_SYSTEM timeline"))?,
            xlog_pos: col(2)
                .parse()
                .map_err(|_| protocol("IDENTIFY_SYSTEM xlogpos"))?,
            dbname: col(3),
        })
    }

    /// Creates a logical slot with pgoutput; returns its consistent point.
    pub async fn create_slot(&mut self, slot: &str) -> Result<Lsn, WalsenderError> {
        let sql = format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput",
            quote_ident(slot)
        );
        let rows = self.simple_query(&sql).await?;
        let lsn = rows
            .first()
            .and_then(|r| r.get(1).cloned().flatten())
            .ok_or_else(|| protocol("CREATE_REPLICATION_SLOT without consistent_point"))?;
        lsn.parse()
            .map_err(|_| protocol("CREATE_REPLICATION_SLOT consistent_point"))
    }

    /// Starts streaming `slot` from `start` (0/0: from the slot's confirmed position).
    /// With `only_local` the walsender sends only changes written under no replication
    /// origin (pgoutput's `origin = 'none'`, from PostgreSQL 16; ignored before).
    pub async fn start_replication(
        mut self,
        slot: &str,
        publication: &str,
        start: Lsn,
        only_local: bool,
    ) -> Result<ReplicationStream, WalsenderError> {
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {} ({})",
            quote_ident(slot),
            start,
            pgoutput_options(self.server_major, publication, only_local),
        );
        frontend::query(&sql, &mut self.write)?;
        self.flush().await?;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'W' => break,
                b'E' | b'N' | b'S' => match parse_backend(frame)? {
                    backend::Message::ErrorResponse(body) => return Err(server_error(&body)),
                    _ => continue,
                },
                t => {
                    return Err(protocol(&format!(
                        "message '{}' before COPY BOTH",
                        t as char
                    )))
                }
            }
        }
        Ok(ReplicationStream { conn: self })
    }

    async fn flush(&mut self) -> Result<(), WalsenderError> {
        self.socket.write_all(&self.write).await?;
        self.socket.flush().await?;
        self.write.clear();
        Ok(())
    }

    /// Reads one whole frame. Cancel-safe: partial frames stay in `self.read`.
    async fn read_frame(&mut self) -> Result<Frame, WalsenderError> {
        loop {
            if let Some(frame) = self.try_frame()? {
                return Ok(frame);
            }
            if self.socket.read_buf(&mut self.read).await? == 0 {
                return Err(WalsenderError::Closed);
            }
        }
    }

    fn try_frame(&mut self) -> Result<Option<Frame>, WalsenderError> {
        if self.read.len() < 5 {
            return Ok(None);
        }
        let tag = self.read[0];
        let len = u32::from_be_bytes([self.read[1], self.read[2], self.read[3], self.read[4]]);
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len < 4 {
            return Err(protocol("frame length below 4"));
        }
        let total = len.saturating_add(1);
        if self.read.len() < total {
            self.read.reserve(total - self.read.len());
            return Ok(None);
        }
        let mut frame = self.read.split_to(total);
        frame.advance(5);
        Ok(Some(Frame {
            tag,
            body: frame.freeze(),
        }))
    }
}

/// What the node sends during streaming.
#[derive(Debug)]
pub enum ReplicationMessage {
    /// WAL data: one pgoutput message starting at `wal_start`.
    XLogData { wal_start: Lsn, data: Bytes },
    /// The node's sent position; `reply_requested` asks for a status update now.
    Keepalive { wal_end: Lsn, reply_requested: bool },
}

/// A walsender connection in COPY BOTH mode.
pub struct ReplicationStream {
    conn: WalsenderConnection,
}

impl ReplicationStream {
    /// The next message from the node. Cancel-safe.
    pub async fn recv(&mut self) -> Result<ReplicationMessage, WalsenderError> {
        loop {
            let frame = self.conn.read_frame().await?;
            match frame.tag {
                b'd' => return parse_copy_data(frame.body),
                b'c' => return Err(WalsenderError::Closed),
                _ => match parse_backend(frame)? {
                    backend::Message::ErrorResponse(body) => return Err(server_error(&body)),
                    _ => continue,
                },
            }
        }
    }

    /// Sends a standby status update: everything up to `flushed` is durable downstream.
    pub async fn send_status(&mut self, flushed: Lsn) -> Result<(), WalsenderError> {
        let mut body = Vec::with_capacity(34);
        body.push(b'r');
        for lsn in [flushed, flushed, flushed] {
            body.extend_from_slice(&lsn.0.to_be_bytes());
        }
        body.extend_from_slice(&now_pg_us().to_be_bytes());
        body.push(0);
        frontend::CopyData::new(&body[..])?.write(&mut self.conn.write);
        self.conn.flush().await
    }
}

fn parse_copy_data(mut body: Bytes) -> Result<ReplicationMessage, WalsenderError> {
    if body.is_empty() {
        return Err(protocol("empty CopyData"));
    }
    match body.get_u8() {
        b'w' if body.len() >= 24 => {
            let wal_start = Lsn(body.get_u64());
            body.advance(16); // wal_end and send time: not needed per message
            Ok(ReplicationMessage::XLogData {
                wal_start,
                data: body,
            })
        }
        b'k' if body.len() >= 17 => {
            let wal_end = Lsn(body.get_u64());
            body.advance(8);
            Ok(ReplicationMessage::Keepalive {
                wal_end,
                reply_requested: body.get_u8() == 1,
            })
        }
        t => Err(protocol(&format!(
            "CopyData '{}' of {} bytes",
            t as char,
            body.len()
        ))),
    }
}

fn now_pg_us() -> i64 {
    let unix_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    unix_us - PG_EPOCH_OFFSET_US
}

/// The connected socket, and the TLS channel binding when it is encrypted.
type Opened = (Box<dyn Socket>, Option<Vec<u8>>);

async fn open_socket(
    cfg: &tokio_postgres::Config,
    tls: &Tls,
    timeout: Duration,
) -> Result<Opened, WalsenderError> {
    use tokio_postgres::config::Host;
    let hosts = cfg.get_hosts();
    let ports = cfg.get_ports();
    let mut last = WalsenderError::Unsupported("the URL names no host".into());
    for (i, host) in hosts.iter().enumerate() {
        let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        let endpoint = match host {
            Host::Tcp(h) => format!("{h}:{port}"),
            #[cfg(unix)]
            Host::Unix(dir) => dir.join(format!(".s.PGSQL.{port}")).display().to_string(),
        };
        match tokio::time::timeout(timeout, connect_one(host, port, tls)).await {
            Ok(Ok(opened)) => return Ok(opened),
            Ok(Err(WalsenderError::Io(source))) => {
                last = WalsenderError::Connect { endpoint, source }
            }
            Ok(Err(e)) => last = e,
            Err(_) => last = WalsenderError::ConnectTimeout(endpoint),
        }
    }
    Err(last)
}

async fn connect_one(
    host: &tokio_postgres::config::Host,
    port: u16,
    tls: &Tls,
) -> Result<Opened, WalsenderError> {
    use tokio_postgres::config::Host;
    match host {
        Host::Tcp(h) => {
            let mut s = tokio::net::TcpStream::connect((h.as_str(), port)).await?;
            s.set_nodelay(true)?;
            if tls.mode() == SslMode::Disable || !offers_tls(&mut s).await? {
                return match tls.mode().requires_tls() {
                    true => Err(TlsError::NotOffered(tls.mode().name()).into()),
                    false => Ok((Box::new(s), None)),
                };
            }
            let s = tls.handshake(h, s).await?;
            let binding = server_end_point(s.ssl());
            Ok((Box::new(s), binding))
        }
        // Like libpq, no TLS over a Unix socket: it never leaves the machine.
        #[cfg(unix)]
        Host::Unix(dir) => {
            let path = dir.join(format!(".s.PGSQL.{port}"));
            let s = tokio::net::UnixStream::connect(path).await?;
            Ok((Box::new(s), None))
        }
    }
}

/// Sends an SSLRequest; whether the node answered that it will speak TLS.
async fn offers_tls(s: &mut tokio::net::TcpStream) -> Result<bool, WalsenderError> {
    let mut buf = BytesMut::new();
    frontend::ssl_request(&mut buf);
    s.write_all(&buf).await?;
    match s.read_u8().await? {
        b'S' => Ok(true),
        b'N' => Ok(false),
        other => Err(protocol(&format!(
            "answer '{}' to the TLS request",
            other as char
        ))),
    }
}

/// The major version in a `server_version` ("13.23", "15.18 (Debian 15.18-1)",
/// "18beta1"); 0 when there is none.
fn major_of(version: &str) -> u32 {
    let digits: String = version.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().unwrap_or(0)
}

/// pgoutput's options for a server of `major`: protocol 1 and the publication, plus
/// logical decoding messages (duplex's heartbeats move the confirmed position of an
/// idle slot) from PostgreSQL 14, which added them to pgoutput; on 13 an idle slot
/// moves with the positions the walsender's keepalives report. With `only_local`, from
/// PostgreSQL 16, `origin 'none'`: transactions written under a replication origin are
/// dropped before they are decoded.
fn pgoutput_options(major: u32, publication: &str, only_local: bool) -> String {
    // The replication grammar has no E'' strings; a publication name is a-z, 0-9 and
    // _ (the config checks it), so this is a plain literal.
    let mut options = format!(
        "proto_version '1', publication_names {}",
        quote_literal(&quote_ident(publication))
    );
    if major == 0 || major >= 14 {
        options.push_str(", messages 'true'");
    }
    if only_local && major >= 16 {
        options.push_str(", origin 'none'");
    }
    options
}

fn parse_backend(frame: Frame) -> Result<backend::Message, WalsenderError> {
    let mut buf = BytesMut::with_capacity(frame.body.len() + 5);
    buf.extend_from_slice(&[frame.tag]);
    buf.extend_from_slice(&((frame.body.len() + 4) as u32).to_be_bytes());
    buf.extend_from_slice(&frame.body);
    backend::Message::parse(&mut buf)?.ok_or_else(|| protocol("incomplete frame"))
}

fn data_row(body: &backend::DataRowBody) -> Result<Vec<Option<String>>, WalsenderError> {
    let buf = body.buffer();
    let mut out = Vec::new();
    let mut ranges = body.ranges();
    while let Some(r) = ranges.next()? {
        out.push(r.map(|r| String::from_utf8_lossy(&buf[r]).into_owned()));
    }
    Ok(out)
}

fn server_error(body: &backend::ErrorResponseBody) -> WalsenderError {
    let (mut code, mut message, mut detail) = (String::new(), String::new(), None);
    let mut fields = body.fields();
    while let Ok(Some(f)) = fields.next() {
        let value = String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            b'C' => code = value,
            b'M' => message = value,
            b'D' => detail = Some(value),
            _ => {}
        }
    }
    WalsenderError::Server {
        code,
        message,
        detail,
    }
}

fn protocol(what: &str) -> WalsenderError {
    WalsenderError::Protocol(what.to_string())
}

#[cfg(test)]
#[path = "walsender_tests.rs"]
mod tests;
