//! Authentication of a replication connection: trust, md5 and SCRAM-SHA-256 (bound to
//! the TLS session, SCRAM-SHA-256-PLUS, when it is encrypted and the node offers it),
//! and a cleartext password only where the node's config allows it (a node set up for
//! md5 or SCRAM never asks for one, so such a request may come from someone between).
//!
//! Once SCRAM has started, the node's "authenticated" counts only after its final
//! message proved that it knows the password (and, bound to the TLS session, that
//! duplex's TLS session ends at the node): an impostor between duplex and the node
//! can say "authenticated" right after duplex's first message, and that is what
//! `channel_binding=require` exists to refuse.

use super::{parse_backend, protocol, server_error, WalsenderConnection, WalsenderError};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::{backend, frontend};

/// Who connects, and what the TLS session offers to bind SCRAM to.
pub(super) struct Credentials<'a> {
    pub user: &'a str,
    pub password: Option<&'a [u8]>,
    pub allow_cleartext: bool,
    /// The `tls-server-end-point` hash when the connection is encrypted.
    pub binding: Option<Vec<u8>>,
    /// `channel_binding=require` in the URL: only SCRAM bound to the TLS session.
    pub require_binding: bool,
}

impl WalsenderConnection {
    pub(super) async fn authenticate(&mut self, c: Credentials<'_>) -> Result<(), WalsenderError> {
        let (user, password, allow_cleartext) = (c.user, c.password, c.allow_cleartext);
        let mut scram: Option<Scram> = None;
        loop {
            let frame = self.read_frame().await?;
            let msg = parse_backend(frame)?;
            match msg {
                backend::Message::AuthenticationOk => {
                    return match &scram {
                        Some(s) if !s.proven => Err(WalsenderError::Unproven(
                            "it said authentication succeeded before finishing SCRAM".into(),
                        )),
                        Some(s) if c.require_binding && !s.bound => Err(unbound()),
                        None if c.require_binding => Err(unbound()),
                        _ => Ok(()),
                    };
                }
                backend::Message::AuthenticationCleartextPassword
                | backend::Message::AuthenticationMd5Password(_)
                    if c.require_binding =>
                {
                    return Err(unbound());
                }
                backend::Message::AuthenticationCleartextPassword => {
                    if !allow_cleartext {
                        return Err(WalsenderError::CleartextRefused);
                    }
                    let pw = password.ok_or(WalsenderError::NoPassword)?;
                    frontend::password_message(pw, &mut self.write)?;
                }
                backend::Message::AuthenticationMd5Password(body) => {
                    let pw = password.ok_or(WalsenderError::NoPassword)?;
                    let hash =
                        postgres_protocol::authentication::md5_hash(user.as_bytes(), pw, body.salt());
                    frontend::password_message(hash.as_bytes(), &mut self.write)?;
                }
                backend::Message::AuthenticationSasl(body) => {
                    let mut mechanisms = body.mechanisms();
                    let (mut has_scram, mut has_plus) = (false, false);
                    while let Some(m) = mechanisms.next()? {
                        has_scram |= m == "SCRAM-SHA-256";
                        has_plus |= m == "SCRAM-SHA-256-PLUS";
                    }
                    let pw = password.ok_or(WalsenderError::NoPassword)?;
                    let (mechanism, binding) = match c.binding.clone() {
                        Some(hash) if has_plus => (
                            "SCRAM-SHA-256-PLUS",
                            ChannelBinding::tls_server_end_point(hash),
                        ),
                        _ if c.require_binding => return Err(unbound()),
                        // Encrypted, but the node offers no binding: say so ('y'), so
                        // that a node which does offer it sees the downgrade.
                        Some(_) if has_scram => ("SCRAM-SHA-256", ChannelBinding::unrequested()),
                        None if has_scram => ("SCRAM-SHA-256", ChannelBinding::unsupported()),
                        _ => {
                            return Err(WalsenderError::Unsupported(
                                "the node offers no SASL mechanism duplex supports (SCRAM-SHA-256)"
                                    .into(),
                            ))
                        }
                    };
                    if scram.is_some() {
                        return Err(protocol("a second SASL start"));
                    }
                    let s = ScramSha256::new(pw, binding);
                    frontend::sasl_initial_response(mechanism, s.message(), &mut self.write)?;
                    scram = Some(Scram {
                        exchange: s,
                        bound: mechanism == "SCRAM-SHA-256-PLUS",
                        proven: false,
                    });
                }
                backend::Message::AuthenticationSaslContinue(body) => {
                    let s = scram.as_mut().ok_or_else(|| protocol("SASL continue"))?;
                    s.exchange.update(body.data()).map_err(|e| {
                        WalsenderError::Unproven(format!("its SCRAM message is not valid ({e})"))
                    })?;
                    frontend::sasl_response(s.exchange.message(), &mut self.write)?;
                }
                backend::Message::AuthenticationSaslFinal(body) => {
                    let s = scram.as_mut().ok_or_else(|| protocol("SASL final"))?;
                    // Checks the server's signature: only who knows the password (and,
                    // with -PLUS, saw this TLS session) can compute it.
                    s.exchange.finish(body.data()).map_err(|e| {
                        WalsenderError::Unproven(format!("its SCRAM signature is wrong ({e})"))
                    })?;
                    s.proven = true;
                    continue;
                }
                backend::Message::ErrorResponse(body) => return Err(server_error(&body)),
                _ => {
                    return Err(WalsenderError::Unsupported(
                        "authentication method (duplex supports trust, password, md5 and SCRAM-SHA-256)".into(),
                    ))
                }
            }
            self.flush().await?;
        }
    }
}

/// A SCRAM exchange under way.
struct Scram {
    exchange: ScramSha256,
    /// SCRAM-SHA-256-PLUS: bound to the TLS session.
    bound: bool,
    /// The node's final message carried a valid server signature.
    proven: bool,
}

fn unbound() -> WalsenderError {
    WalsenderError::Unsupported(
        "channel_binding=require, but the node did not authenticate with SCRAM bound to a TLS session (use sslmode=require or stricter and scram-sha-256 in pg_hba.conf)".into(),
    )
}
