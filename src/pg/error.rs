//! The one error of a failed SQL statement, [`SqlError`]: which node, what duplex was
//! doing, and the server's message and SQLSTATE, classified once by the SQLSTATE
//! policy. Every layer that runs SQL wraps it (`NodeError`, `WriteError`, `MapError`,
//! `CaptureError`); [`SqlContext::sql`] attaches the node and context where a
//! statement's result comes back.

use crate::pg::sql::class_of_sqlstate;
use crate::pg::tls::TlsError;
use crate::{Classify, ErrorClass};
use std::borrow::Cow;

/// A statement that failed on a node.
#[derive(Debug, thiserror::Error)]
#[error("node {node}: {context}: {}", describe(source))]
pub struct SqlError {
    pub node: String,
    /// What duplex was doing: "reading duplex.slots", "writing into public.items".
    pub context: Cow<'static, str>,
    pub source: tokio_postgres::Error,
}

impl SqlError {
    pub fn new(
        node: &str,
        context: impl Into<Cow<'static, str>>,
        source: tokio_postgres::Error,
    ) -> SqlError {
        SqlError {
            node: node.to_string(),
            context: context.into(),
            source,
        }
    }

    /// What turns a failure of a statement run on `node` while doing `context` into
    /// one, for contexts used more than once (see [`SqlContext::sql`] for the rest).
    pub fn on(
        node: &str,
        context: impl Into<Cow<'static, str>>,
    ) -> impl FnOnce(tokio_postgres::Error) -> SqlError {
        let (node, context) = (node.to_string(), context.into());
        move |source| SqlError {
            node,
            context,
            source,
        }
    }

    /// The server's SQLSTATE, if the server answered.
    pub fn code(&self) -> Option<&str> {
        self.source.code().map(|c| c.code())
    }
}

impl Classify for SqlError {
    fn class(&self) -> ErrorClass {
        sql_class(&self.source)
    }
}

/// Names the node and what duplex was doing on a statement's failure.
pub trait SqlContext<T> {
    fn sql(self, node: &str, context: impl Into<Cow<'static, str>>) -> Result<T, SqlError>;
}

impl<T> SqlContext<T> for Result<T, tokio_postgres::Error> {
    fn sql(self, node: &str, context: impl Into<Cow<'static, str>>) -> Result<T, SqlError> {
        self.map_err(SqlError::on(node, context))
    }
}

/// A tokio-postgres error with what its `Display` leaves out: the server's message,
/// SQLSTATE and detail, or the underlying I/O error.
pub fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
        if let Some(d) = db.detail() {
            s.push_str(&format!("; {d}"));
        }
        return s;
    }
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s.push_str(&format!(": {c}"));
        cause = c.source();
    }
    s
}

/// Connection losses are transient; server errors go by SQLSTATE; TLS failures by
/// their cause (a certificate not accepted is definite, a connection lost midway is
/// not).
pub fn sql_class(e: &tokio_postgres::Error) -> ErrorClass {
    if let Some(code) = e.code() {
        return class_of_sqlstate(code.code());
    }
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(tls) = c.downcast_ref::<TlsError>() {
            return tls.class();
        }
        cause = c.source();
    }
    // tokio-postgres's own TLS error: the node refused TLS that sslmode requires.
    if e.to_string().starts_with("error performing TLS handshake") {
        return ErrorClass::Definite;
    }
    ErrorClass::Transient
}
