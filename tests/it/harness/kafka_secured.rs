//! A Kafka cluster secured the way a production one is: the client listener speaks
//! SASL_SSL with SCRAM-SHA-512 (users created when the storage is formatted), the
//! broker presents a certificate from a test CA for 127.0.0.1 and requires client
//! certificates from the same CA, and the StandardAuthorizer denies whatever no ACL
//! allows. A super user, `admin`, grants and revokes ACLs with Kafka's own AclCommand.
//!
//! The brokers' own listeners (inter-broker, controller) stay plaintext on loopback;
//! their principal, `User:ANONYMOUS`, is a super user so that the node may talk to
//! itself. Clients only ever learn the client listener.

use super::certs::Pki;
use super::kafka::{kafka_tool, Broker, Settings};
use super::temp_dir;
use std::path::PathBuf;
use std::time::Instant;

/// The super user that grants ACLs.
pub const ADMIN: &str = "admin";
const ADMIN_PASSWORD: &str = "admin-pw-1e8c";

/// The passphrase of the client key in `Pki::for_kafka`'s `client.key`.
pub const CLIENT_KEY_PASSWORD: &str = "client-key-pw-55d1";

/// The AclCommand's main class (kafka-acls.sh).
const ACL_COMMAND: &str = "org.apache.kafka.tools.AclCommand";

pub struct SecuredKafka {
    pub broker: Broker,
    pub pki: Pki,
    /// Java client properties of the admin user, for Kafka's tools.
    admin_config: PathBuf,
}

impl SecuredKafka {
    /// One node with `users` (name, password) besides the admin. Prints how long the
    /// start took.
    pub fn start(users: &[(&str, &str)]) -> SecuredKafka {
        let started = Instant::now();
        let pki = Pki::for_kafka("duplex client", CLIENT_KEY_PASSWORD);
        let client = |k: &str, v: &str| (format!("listener.name.client.{k}"), v.to_string());
        let properties = vec![
            client("sasl.enabled.mechanisms", "SCRAM-SHA-512"),
            client(
                "scram-sha-512.sasl.jaas.config",
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            ),
            client("ssl.keystore.type", "PEM"),
            client("ssl.keystore.location", &pki.path("broker.pem")),
            client("ssl.truststore.type", "PEM"),
            client("ssl.truststore.location", &pki.path("ca.pem")),
            client("ssl.client.auth", "required"),
            (
                "authorizer.class.name".into(),
                "org.apache.kafka.metadata.authorizer.StandardAuthorizer".into(),
            ),
            ("super.users".into(), format!("User:{ADMIN};User:ANONYMOUS")),
            ("allow.everyone.if.no.acl.found".into(), "false".into()),
        ];
        let mut format_args = Vec::new();
        for (name, password) in [(ADMIN, ADMIN_PASSWORD)].iter().chain(users) {
            format_args.push("--add-scram".to_string());
            format_args.push(format!("SCRAM-SHA-512=[name={name},password={password}]"));
        }
        let broker = Broker::start_cluster(
            1,
            Settings {
                properties,
                listener: Some("SASL_SSL".into()),
                format_args,
            },
        );
        let admin_config = temp_dir("duplex-kafka-admin-").join("admin.properties");
        std::fs::write(
            &admin_config,
            format!(
                "security.protocol=SASL_SSL
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username=\"{ADMIN}\" password=\"{ADMIN_PASSWORD}\";
ssl.truststore.type=PEM
ssl.truststore.location={ca}
ssl.keystore.type=PEM
ssl.keystore.location={client}
",
                ca = pki.path("ca.pem"),
                client = pki.path("client.pem"),
            ),
        )
        .unwrap();
        eprintln!(
            "SASL_SSL Kafka with ACLs started in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        SecuredKafka {
            broker,
            pki,
            admin_config,
        }
    }

    pub fn brokers(&self) -> String {
        self.broker.brokers()
    }

    /// Runs Kafka's AclCommand (kafka-acls.sh) as the admin with `args` added.
    pub fn acls(&self, args: &[&str]) -> String {
        let brokers = self.brokers();
        let config = self.admin_config.display().to_string();
        let mut all = vec!["--bootstrap-server", &brokers, "--command-config", &config];
        all.extend_from_slice(args);
        kafka_tool(ACL_COMMAND, &all, &self.broker.nodes[0].dir)
    }

    /// Creates `topic` (one partition) as the admin, as a platform team would.
    pub fn create_topic(&self, topic: &str) {
        let brokers = self.brokers();
        let config = self.admin_config.display().to_string();
        kafka_tool(
            "org.apache.kafka.tools.TopicCommand",
            &[
                "--bootstrap-server",
                &brokers,
                "--command-config",
                &config,
                "--create",
                "--topic",
                topic,
                "--partitions",
                "1",
            ],
            &self.broker.nodes[0].dir,
        );
    }
}
