//! Authentication of a replication connection: trust, md5 and SCRAM-SHA-256, and a
//! cleartext password only where the node's config allows it (a node set up for md5
//! or SCRAM never asks for one, so such a request may come from someone between).

use super::{parse_backend, protocol, server_error, WalsenderConnection, WalsenderError};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::{backend, frontend};

impl WalsenderConnection {
    pub(super) async fn authenticate(
        &mut self,
        user: &str,
        password: Option<&[u8]>,
        allow_cleartext: bool,
    ) -> Result<(), WalsenderError> {
        let mut scram: Option<ScramSha256> = None;
        loop {
            let frame = self.read_frame().await?;
            let msg = parse_backend(frame)?;
            match msg {
                backend::Message::AuthenticationOk => return Ok(()),
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
                    let mut has_scram = false;
                    while let Some(m) = mechanisms.next()? {
                        has_scram |= m == "SCRAM-SHA-256";
                    }
                    if !has_scram {
                        return Err(WalsenderError::Unsupported(
                            "the node offers no SASL mechanism duplex supports (SCRAM-SHA-256)"
                                .into(),
                        ));
                    }
                    let pw = password.ok_or(WalsenderError::NoPassword)?;
                    let s = ScramSha256::new(pw, ChannelBinding::unsupported());
                    frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut self.write)?;
                    scram = Some(s);
                }
                backend::Message::AuthenticationSaslContinue(body) => {
                    let s = scram.as_mut().ok_or_else(|| protocol("SASL continue"))?;
                    s.update(body.data())?;
                    frontend::sasl_response(s.message(), &mut self.write)?;
                }
                backend::Message::AuthenticationSaslFinal(body) => {
                    let s = scram.as_mut().ok_or_else(|| protocol("SASL final"))?;
                    s.finish(body.data())?;
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
