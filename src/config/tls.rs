//! The TLS parameters of a node URL, read the way libpq reads them.
//!
//! tokio-postgres knows `sslmode` only as disable/prefer/require and rejects
//! `sslrootcert`, `sslcert`, `sslkey` and `sslpassword`, so [`split`] takes those out
//! of the URL (either form: `postgres://…?sslmode=…` or `key=value …`) before
//! tokio-postgres parses the rest, and returns them as [`TlsParams`]. `pg::tls` turns
//! them into a connector for both the SQL and the replication connections.

use std::path::PathBuf;

/// libpq's `sslmode`, with its meaning (libpq's default is `prefer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// TLS when the node offers it, without checking its certificate (`allow` is read
    /// as this too: it only differs in which of the two is tried first).
    #[default]
    Prefer,
    /// TLS or no connection; the certificate is checked only when a root certificate
    /// is given (or `~/.postgresql/root.crt` exists), as libpq does.
    Require,
    /// TLS, and the node's certificate must chain to the root certificate.
    VerifyCa,
    /// As `VerifyCa`, and the certificate must name the host connected to.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, String> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                "sslmode={other} is not one of disable, allow, prefer, require, verify-ca, verify-full"
            ))
            }
        })
    }

    /// The nearest mode tokio-postgres knows: whether it must send an SSLRequest and
    /// whether a refusal ends the attempt. Verification is the connector's business.
    pub fn negotiation(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Pg;
        match self {
            SslMode::Disable => Pg::Disable,
            SslMode::Prefer => Pg::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Pg::Require,
        }
    }

    /// The mode as written in a URL.
    pub fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether a node that does not offer TLS must be refused.
    pub fn requires_tls(self) -> bool {
        matches!(
            self,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }
}

/// Where the trusted roots for the node's certificate come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// A PEM file of CA certificates.
    File(PathBuf),
    /// The operating system's trust store (`sslrootcert=system`, as in libpq 16).
    System,
}

/// TLS settings of one node, from its URL.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TlsParams {
    pub mode: SslMode,
    /// `sslrootcert`; `None` means libpq's default `~/.postgresql/root.crt`.
    pub root_cert: Option<RootCert>,
    /// `sslcert` and `sslkey`: a client certificate (PEM) and its key.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// `sslpassword`: the passphrase of an encrypted `sslkey`.
    pub key_password: Option<String>,
}

/// The passphrase never shows.
impl std::fmt::Debug for TlsParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsParams")
            .field("mode", &self.mode)
            .field("root_cert", &self.root_cert)
            .field("client_cert", &self.client_cert)
            .field("client_key", &self.client_key)
            .field("key_password", &self.key_password.as_ref().map(|_| "***"))
            .finish()
    }
}

impl TlsParams {
    fn set(&mut self, key: &str, value: String) -> Result<(), String> {
        match key {
            "sslmode" => self.mode = SslMode::parse(&value)?,
            "sslrootcert" if value == "system" => self.root_cert = Some(RootCert::System),
            "sslrootcert" => self.root_cert = Some(RootCert::File(value.into())),
            "sslcert" => self.client_cert = Some(value.into()),
            "sslkey" => self.client_key = Some(value.into()),
            "sslpassword" => self.key_password = Some(value),
            _ => return Err(format!("{key} is not a TLS parameter")),
        }
        Ok(())
    }
}

const TLS_KEYS: &[&str] = &["sslmode", "sslrootcert", "sslcert", "sslkey", "sslpassword"];

/// Splits `url` into what tokio-postgres should parse and the TLS parameters.
/// `sslrootcert=system` without an `sslmode` means `verify-full`, as in libpq, and
/// with any other `sslmode` it is refused, as libpq 16 does: without a host name
/// check, any public CA's certificate for any name would pass.
pub fn split(url: &str) -> Result<(String, TlsParams), String> {
    let (rest, mut params, mode_given) =
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            split_uri(url)?
        } else {
            split_key_values(url)?
        };
    if params.root_cert == Some(RootCert::System) {
        match mode_given {
            None => params.mode = SslMode::VerifyFull,
            Some(_) if params.mode == SslMode::VerifyFull => {}
            Some(mode) => {
                return Err(format!(
                    "sslmode={mode} may not be used with sslrootcert=system: with the system's trusted roots any public CA's certificate would pass unless its host name is checked. Use sslmode=verify-full (or leave sslmode out)"
                ))
            }
        }
    }
    Ok((rest, params))
}

/// The URL without its TLS parameters, the parameters, and `sslmode` as written.
type Split = (String, TlsParams, Option<String>);

fn split_uri(url: &str) -> Result<Split, String> {
    let mut params = TlsParams::default();
    let mut mode_given = None;
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), params, None));
    };
    let mut kept = Vec::new();
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if TLS_KEYS.contains(&key) {
            let value = percent_decode(value)?;
            if key == "sslmode" {
                mode_given = Some(value.clone());
            }
            params.set(key, value)?;
        } else {
            kept.push(pair);
        }
    }
    let rest = match kept.is_empty() {
        true => base.to_string(),
        false => format!("{base}?{}", kept.join("&")),
    };
    Ok((rest, params, mode_given))
}

fn split_key_values(s: &str) -> Result<Split, String> {
    let mut params = TlsParams::default();
    let mut mode_given = None;
    let mut kept = Vec::new();
    for (raw, key, value) in key_values(s)? {
        if TLS_KEYS.contains(&key.as_str()) {
            if key == "sslmode" {
                mode_given = Some(value.clone());
            }
            params.set(&key, value)?;
        } else {
            kept.push(raw);
        }
    }
    Ok((kept.join(" "), params, mode_given))
}

/// `key = value` pairs of a libpq connection string: the raw text of each pair, its
/// key and its unquoted value (single quotes, backslash escapes).
fn key_values(s: &str) -> Result<Vec<(String, String, String)>, String> {
    let mut out = Vec::new();
    let mut chars = s.char_indices().peekable();
    loop {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = chars.peek() else {
            return Ok(out);
        };
        let mut key = String::new();
        while let Some((_, c)) = chars.next_if(|(_, c)| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        if chars.next_if(|(_, c)| *c == '=').is_none() {
            return Err(format!("`{key}` in the connection string has no `=`"));
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        let quoted = chars.next_if(|(_, c)| *c == '\'').is_some();
        let mut end = s.len();
        while let Some(&(i, c)) = chars.peek() {
            if !quoted && c.is_whitespace() {
                end = i;
                break;
            }
            chars.next();
            match c {
                '\\' => value.extend(chars.next().map(|(_, c)| c)),
                '\'' if quoted => {
                    end = chars.peek().map_or(s.len(), |&(i, _)| i);
                    break;
                }
                c => value.push(c),
            }
        }
        out.push((s[start..end].to_string(), key, value));
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-encoding in `{s}`"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("`{s}` is not UTF-8 once decoded"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_parameters_are_taken_out_and_the_rest_kept() {
        let (rest, p) = split(
            "postgres://u:pw@db.example:5433/app?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca%20dir%2Froot.pem&sslcert=/c.pem&sslkey=/k.pem&sslpassword=s3",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgres://u:pw@db.example:5433/app?application_name=x"
        );
        assert_eq!(p.mode, SslMode::VerifyFull);
        assert_eq!(
            p.root_cert,
            Some(RootCert::File("/etc/ca dir/root.pem".into()))
        );
        assert_eq!(p.client_cert, Some("/c.pem".into()));
        assert_eq!(p.client_key, Some("/k.pem".into()));
        assert!(!format!("{p:?}").contains("s3"));
        let (rest, p) = split("postgresql://h/db?sslmode=require").unwrap();
        assert_eq!(
            (rest.as_str(), p.mode),
            ("postgresql://h/db", SslMode::Require)
        );
    }

    #[test]
    fn key_value_parameters_are_unquoted() {
        let (rest, p) = split(
            "host=h port=5 sslmode = verify-ca sslrootcert='/a b/it\\'s.pem' user='x y' dbname=d",
        )
        .unwrap();
        assert_eq!(rest, "host=h port=5 user='x y' dbname=d");
        assert_eq!(p.mode, SslMode::VerifyCa);
        assert_eq!(p.root_cert, Some(RootCert::File("/a b/it's.pem".into())));
        assert!(split("host=h sslmode").is_err());
    }

    #[test]
    fn defaults_follow_libpq() {
        assert_eq!(split("postgres://h/d").unwrap().1.mode, SslMode::Prefer);
        let p = split("postgres://h/d?sslrootcert=system").unwrap().1;
        assert_eq!(
            (p.mode, p.root_cert),
            (SslMode::VerifyFull, Some(RootCert::System))
        );
        let p = split("host=h sslmode=verify-full sslrootcert=system")
            .unwrap()
            .1;
        assert_eq!(
            (p.mode, p.root_cert),
            (SslMode::VerifyFull, Some(RootCert::System))
        );
        assert_eq!(
            split("postgres://h/d?sslmode=allow").unwrap().1.mode,
            SslMode::Prefer
        );
        let e = split("postgres://h/d?sslmode=verify").unwrap_err();
        assert!(e.contains("sslmode=verify is not one of"), "{e}");
        assert!(split("postgres://h/d?sslrootcert=%zz").is_err());
    }

    /// Any public CA's certificate for any name passes the system's roots without a
    /// host name check: libpq 16 refuses the combination, and so does duplex.
    #[test]
    fn system_roots_only_with_verify_full() {
        for mode in ["disable", "allow", "prefer", "require", "verify-ca"] {
            for url in [
                format!("postgres://h/d?sslrootcert=system&sslmode={mode}"),
                format!("host=h sslmode={mode} sslrootcert=system"),
            ] {
                let e = split(&url).unwrap_err();
                assert!(
                    e.contains(&format!("sslmode={mode}"))
                        && e.contains("sslrootcert=system")
                        && e.contains("verify-full"),
                    "{url}: {e}"
                );
            }
        }
    }
}
