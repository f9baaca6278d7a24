//! A certificate authority made up for a test: its root, a server certificate for
//! `localhost` and a client certificate for a role, as PEM files in a directory the
//! PostgreSQL server can read (its key owned by the server's OS user, mode 0600); or
//! the same for a Kafka broker on 127.0.0.1 and its clients ([`Pki::for_kafka`]).

use super::temp_dir;
use openssl::asn1::Asn1Time;
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{BasicConstraints, KeyUsage, SubjectAlternativeName};
use openssl::x509::{X509Name, X509};
use std::path::PathBuf;

struct Issued {
    cert: X509,
    key: PKey<Private>,
}

fn key() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
}

fn name(cn: &str) -> X509Name {
    let mut n = X509Name::builder().unwrap();
    n.append_entry_by_nid(Nid::COMMONNAME, cn).unwrap();
    n.build()
}

/// A certificate for `cn`, signed by `issuer` (self-signed, a CA, without one), with
/// `dns` as its subject alternative names.
fn issue(cn: &str, issuer: Option<&Issued>, dns: &[&str]) -> Issued {
    issue_for(cn, issuer, dns, &[])
}

/// Like `issue`, with IP addresses among the subject alternative names too.
fn issue_for(cn: &str, issuer: Option<&Issued>, dns: &[&str], ips: &[&str]) -> Issued {
    let key = key();
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    let mut serial = BigNum::new().unwrap();
    serial
        .rand(64, openssl::bn::MsbOption::MAYBE_ZERO, false)
        .unwrap();
    b.set_serial_number(&serial.to_asn1_integer().unwrap())
        .unwrap();
    b.set_subject_name(&name(cn)).unwrap();
    let issuer_name =
        issuer.map_or_else(|| name(cn), |i| i.cert.subject_name().to_owned().unwrap());
    b.set_issuer_name(&issuer_name).unwrap();
    b.set_pubkey(&key).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::days_from_now(30).unwrap())
        .unwrap();
    if issuer.is_none() {
        b.append_extension(BasicConstraints::new().critical().ca().build().unwrap())
            .unwrap();
        let usage = KeyUsage::new()
            .critical()
            .key_cert_sign()
            .crl_sign()
            .build();
        b.append_extension(usage.unwrap()).unwrap();
    }
    if !dns.is_empty() || !ips.is_empty() {
        let mut san = SubjectAlternativeName::new();
        for d in dns {
            san.dns(d);
        }
        for ip in ips {
            san.ip(ip);
        }
        let san = san
            .build(&b.x509v3_context(issuer.map(|i| i.cert.as_ref()), None))
            .unwrap();
        b.append_extension(san).unwrap();
    }
    let signer = issuer.map_or(&key, |i| &i.key);
    b.sign(signer, MessageDigest::sha256()).unwrap();
    Issued {
        cert: b.build(),
        key,
    }
}

/// The files of one test PKI.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    /// A CA; a server certificate for `localhost` only (so `127.0.0.1` fails a host
    /// name check); a client certificate for `client_role`; and a second, unrelated CA.
    pub fn new(client_role: &str) -> Pki {
        let dir = temp_dir("duplex-pki-");
        let ca = issue("duplex test CA", None, &[]);
        let server = issue("localhost", Some(&ca), &["localhost"]);
        let client = issue(client_role, Some(&ca), &[]);
        let other = issue("another CA", None, &[]);
        let pki = Pki { dir };
        pki.write("ca.pem", &ca.cert.to_pem().unwrap());
        pki.write("other-ca.pem", &other.cert.to_pem().unwrap());
        pki.write("server.crt", &server.cert.to_pem().unwrap());
        pki.write(
            "server.key",
            &server.key.private_key_to_pem_pkcs8().unwrap(),
        );
        pki.write("client.crt", &client.cert.to_pem().unwrap());
        pki.write(
            "client.key",
            &client.key.private_key_to_pem_pkcs8().unwrap(),
        );
        pki.hand_to_server();
        pki
    }

    /// For a Kafka broker on loopback: a CA (`ca.pem`); the broker's certificate for
    /// IP address 127.0.0.1 with its key, in one file as Kafka's PEM key store takes
    /// it (`broker.pem`); a client certificate for `client` (`client.crt`) with its key
    /// encrypted under `key_password` (`client.key`), and both unencrypted in one file
    /// for Java clients (`client.pem`); and an unrelated CA (`other-ca.pem`).
    pub fn for_kafka(client: &str, key_password: &str) -> Pki {
        let pki = Pki {
            dir: temp_dir("duplex-kafka-pki-"),
        };
        let ca = issue("duplex test Kafka CA", None, &[]);
        let broker = issue_for("kafka broker", Some(&ca), &[], &["127.0.0.1"]);
        let client = issue(client, Some(&ca), &[]);
        let other = issue("another CA", None, &[]);
        let pem = |i: &Issued| {
            let mut v = i.key.private_key_to_pem_pkcs8().unwrap();
            v.extend(i.cert.to_pem().unwrap());
            v
        };
        pki.write("ca.pem", &ca.cert.to_pem().unwrap());
        pki.write("other-ca.pem", &other.cert.to_pem().unwrap());
        pki.write("broker.pem", &pem(&broker));
        pki.write("client.pem", &pem(&client));
        pki.write("client.crt", &client.cert.to_pem().unwrap());
        let encrypted = client
            .key
            .private_key_to_pem_pkcs8_passphrase(
                openssl::symm::Cipher::aes_256_cbc(),
                key_password.as_bytes(),
            )
            .unwrap();
        pki.write("client.key", &encrypted);
        pki
    }

    pub fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }

    fn write(&self, file: &str, pem: &[u8]) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.join(file);
        std::fs::write(&path, pem).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// The server runs as `postgres` when the tests run as root, and refuses a key
    /// that others may read.
    fn hand_to_server(&self) {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let status = std::process::Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&self.dir)
                .status()
                .unwrap();
            assert!(status.success());
        }
    }

    /// Server settings for `Cluster::start`: TLS on, with this PKI's server
    /// certificate and its CA for client certificates.
    pub fn server_settings(&self) -> Vec<(&'static str, String)> {
        vec![
            ("ssl", "on".into()),
            ("ssl_cert_file", format!("'{}'", self.path("server.crt"))),
            ("ssl_key_file", format!("'{}'", self.path("server.key"))),
            ("ssl_ca_file", format!("'{}'", self.path("ca.pem"))),
        ]
    }
}
