//! README "A secured Kafka cluster", for real: a broker whose client listener speaks
//! SASL_SSL (SCRAM-SHA-512, a test CA, client certificates required) behind an ACL
//! authorizer. duplex runs both directions with exactly the README's properties and
//! ACLs; a wrong password and an untrusted broker certificate are definite errors
//! naming their cause; `duplex check` names each ACL the principal lacks.

use crate::harness::duplex::{Daemon, Rig};
use crate::harness::kafka::Broker;
use crate::harness::kafka_secured::{SecuredKafka, CLIENT_KEY_PASSWORD};
use crate::harness::workload::{
    assert_identical_and_applied_once, rig_before_setup, run_workloads,
};
use crate::harness::{output_text, wait_for};
use std::sync::OnceLock;
use std::time::Duration;

const PASSWORD: &str = "duplex-scram-pw-9b2e";

/// The users of the module's cluster: `duplex` as in the README, and one per test
/// that takes grants away.
const USERS: &[(&str, &str)] = &[
    ("duplex", PASSWORD),
    ("duplex_nowrite", PASSWORD),
    ("duplex_noread", PASSWORD),
    ("duplex_nocreate", PASSWORD),
];

const DDL: &str = "CREATE TABLE items (id int PRIMARY KEY, val text, updated_at timestamptz NOT NULL DEFAULT clock_timestamp());";

/// The module's secured cluster, started once.
fn kafka() -> &'static SecuredKafka {
    static KAFKA: OnceLock<SecuredKafka> = OnceLock::new();
    KAFKA.get_or_init(|| SecuredKafka::start(USERS))
}

/// The `[kafka.properties]` of README "A secured Kafka cluster", its file paths
/// pointing at the test's certificates, and the variables its example exports.
fn readme_properties(k: &SecuredKafka) -> (String, Vec<(&'static str, &'static str)>) {
    let readme = include_str!("../../README.md");
    let section = readme
        .split("### A secured Kafka cluster")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("README has no section \"A secured Kafka cluster\"");
    let toml = section
        .split("```toml\n")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("the section has no TOML example");
    let properties = toml
        .split("[kafka.properties]\n")
        .nth(1)
        .expect("the example has no [kafka.properties]");
    let properties = properties
        .replace("/etc/duplex/kafka-ca.pem", &k.pki.path("ca.pem"))
        .replace("/etc/duplex/duplex.crt", &k.pki.path("client.crt"))
        .replace("/etc/duplex/duplex.key", &k.pki.path("client.key"));
    assert!(
        !properties.contains("/etc/duplex"),
        "a file of the example is not mapped to the test's: {properties}"
    );
    let env = vec![
        ("DUPLEX_KAFKA_PROPERTIES_SASL_PASSWORD", PASSWORD),
        (
            "DUPLEX_KAFKA_PROPERTIES_SSL_KEY_PASSWORD",
            CLIENT_KEY_PASSWORD,
        ),
    ];
    for (var, _) in &env {
        assert!(
            section.contains(&format!("export {var}=")),
            "the example does not export {var}"
        );
    }
    (format!("[kafka.properties]\n{properties}"), env)
}

/// Points `rig` at the secured cluster with the README's properties, as `user`;
/// returns the environment duplex needs, with `RUST_LOG`.
fn secure(rig: &Rig, user: &str) -> Vec<(&'static str, &'static str)> {
    let k = kafka();
    let (properties, mut env) = readme_properties(k);
    let readme_user = "\"sasl.username\" = \"duplex\"";
    assert!(properties.contains(readme_user), "{properties}");
    let properties = properties.replace(readme_user, &format!("\"sasl.username\" = \"{user}\""));
    rig.edit_config(&[(Broker::shared().brokers().as_str(), k.brokers().as_str())]);
    let mut cfg = std::fs::read_to_string(&rig.config).unwrap();
    cfg.push_str(&properties);
    std::fs::write(&rig.config, cfg).unwrap();
    env.push(("RUST_LOG", "info"));
    env
}

/// `var` set to `value` instead.
fn with(
    env: &[(&'static str, &'static str)],
    var: &str,
    value: &'static str,
) -> Vec<(&'static str, &'static str)> {
    env.iter()
        .map(|&(k, v)| (k, if k == var { value } else { v }))
        .collect()
}

/// The grants README "A secured Kafka cluster" lists, for `user` on `rig`'s topics and
/// groups, as its kafka-acls.sh commands give them: CREATE on the topics only if
/// `create`, and `except` (an operation and a resource, e.g. `("Write", "--topic",
/// <topic>)`) left out.
fn grant_readme_acls(rig: &Rig, user: &str, create: bool, except: Option<(&str, &str, &str)>) {
    let k = kafka();
    let principal = format!("User:{user}");
    let topics = [rig.topic_of("a"), rig.topic_of("b")];
    let groups = ["duplex-a_to_b", "duplex-b_to_a", "duplex-tail"];
    let mut grants: Vec<(&str, &str, &str)> = Vec::new();
    let ops: &[&str] = if create {
        &["Write", "Read", "Create"]
    } else {
        &["Write", "Read"]
    };
    for &op in ops {
        for t in &topics {
            grants.push((op, "--topic", t));
        }
    }
    for g in groups {
        grants.push(("Describe", "--group", g));
    }
    grants.retain(|g| Some(*g) != except);
    // One kafka-acls.sh run for the operations on the same resources, as in the
    // README (each JVM takes seconds to start).
    let mut resources: Vec<(&str, Vec<&str>)> = Vec::new();
    for (op, kind, name) in grants {
        match resources.iter_mut().find(|(o, _)| *o == op) {
            Some((_, args)) => args.extend([kind, name]),
            None => resources.push((op, vec![kind, name])),
        }
    }
    let mut commands: Vec<(Vec<&str>, Vec<&str>)> = Vec::new();
    for (op, on) in resources {
        match commands.iter_mut().find(|(_, r)| *r == on) {
            Some((ops, _)) => ops.push(op),
            None => commands.push((vec![op], on)),
        }
    }
    for (ops, on) in commands {
        let mut args = vec!["--add", "--allow-principal", &principal];
        for op in ops {
            args.extend(["--operation", op]);
        }
        args.extend(on);
        k.acls(&args);
    }
}

/// The `kafka:` lines of `duplex check`, once they are `want` many (grants reach
/// the broker's authorizer a moment after kafka-acls.sh returns).
async fn kafka_problems(rig: &Rig, env: &[(&str, &str)], want: usize) -> Vec<String> {
    wait_for(
        &format!("{want} kafka problems from duplex check"),
        Duration::from_secs(30),
        || {
            let out = rig.command_env(&["check"], env);
            let text = output_text(&out);
            let lines: Vec<String> = text
                .lines()
                .filter(|l| l.starts_with("kafka:"))
                .map(str::to_string)
                .collect();
            let done =
                lines.len() == want && out.status.code() == Some(if want == 0 { 0 } else { 1 });
            async move { done.then_some(lines) }
        },
    )
    .await
}

#[tokio::test]
async fn the_readme_example_syncs_both_ways_through_sasl_ssl_and_acls() {
    let rig = rig_before_setup().await;
    let env = secure(&rig, "duplex");
    grant_readme_acls(&rig, "duplex", true, None);
    kafka_problems(&rig, &env, 0).await;
    let setup = rig.command_env(&["setup"], &env);
    assert!(setup.status.success(), "{}", output_text(&setup));
    let d = rig.start_env(&rig.config, &env);
    d.wait_applying(2).await;
    let (changes_a, changes_b) = run_workloads(&rig, 10).await;
    assert!(
        changes_a > 200 && changes_b > 200,
        "{changes_a}, {changes_b}"
    );
    assert_identical_and_applied_once(&rig).await;
    let tail = rig.command_env(&["tail", "--node", "a", "--max", "1"], &env);
    assert!(tail.status.success(), "{}", output_text(&tail));
    assert_eq!(d.stop().await, Some(0));
}

#[tokio::test]
async fn a_wrong_password_or_an_untrusted_broker_certificate_stops_duplex_naming_it() {
    let rig = Rig::both(DDL, &["public.items"], "").await;
    let env = secure(&rig, "duplex");
    let setup = rig.command_env(&["setup"], &env);
    assert!(setup.status.success(), "{}", output_text(&setup));
    let k = kafka();
    let wrong_password = with(&env, "DUPLEX_KAFKA_PROPERTIES_SASL_PASSWORD", "not-it");
    let other_ca = rig.config.with_extension("other-ca.toml");
    let cfg = std::fs::read_to_string(&rig.config).unwrap();
    std::fs::write(
        &other_ca,
        cfg.replace(&k.pki.path("ca.pem"), &k.pki.path("other-ca.pem")),
    )
    .unwrap();
    // The broker's certificate names 127.0.0.1 only.
    let other_host = rig.config.with_extension("localhost.toml");
    std::fs::write(
        &other_host,
        cfg.replace(&k.brokers(), &k.brokers().replace("127.0.0.1", "localhost")),
    )
    .unwrap();
    for (config, env, cause) in [
        (&rig.config, &wrong_password, "Kafka authentication failed"),
        (&other_ca, &env, "Kafka certificate verify failed"),
        (&other_host, &env, "Kafka certificate verify failed"),
    ] {
        let mut d = rig.start_env(config, env);
        // Definite: no retrying until the operator fixes it.
        let code = d.exited(Duration::from_secs(40)).await;
        let logs = d.logs();
        assert_eq!(code, Some(1), "{logs}");
        assert!(
            logs.contains(cause),
            "the log does not say {cause:?}:\n{logs}"
        );
        let check = std::process::Command::new(crate::harness::duplex::bin())
            .args(["check", "--config"])
            .arg(config)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let said = output_text(&check);
        eprintln!("duplex check:\n{said}");
        assert_eq!(check.status.code(), Some(1), "{said}");
        assert!(
            said.contains(cause),
            "check does not say {cause:?}:\n{said}"
        );
    }
}

#[tokio::test]
async fn check_names_a_missing_write_on_a_nodes_topic_and_run_stops_on_it() {
    let mut d = missing_grant("duplex_nowrite", "Write", "a", "source a").await;
    // A source that cannot publish stops the daemon.
    assert_eq!(d.exited(Duration::from_secs(30)).await, Some(1));
}

#[tokio::test]
async fn check_names_a_missing_read_on_the_peers_topic_and_its_direction_halts() {
    let mut d = missing_grant("duplex_noread", "Read", "b", "apply b_to_a").await;
    // A halted direction leaves the rest running, as with any definite error of one
    // direction.
    assert!(d.child.try_wait().unwrap().is_none(), "duplex exited");
    d.stop().await;
}

/// `user` has every grant of the README but `op` on node `node`'s topic, which the
/// admin created beforehand (so CREATE is not needed): `duplex check` names exactly
/// that grant, and `duplex run` stops `component` (a definite error) once it needs
/// it. Returns the daemon.
async fn missing_grant(user: &'static str, op: &str, node: &str, component: &str) -> Daemon {
    let named = op.to_ascii_uppercase();
    let rig = Rig::both(DDL, &["public.items"], "").await;
    let env = secure(&rig, user);
    let k = kafka();
    let topic = rig.topic_of(node);
    for n in ["a", "b"] {
        k.create_topic(&rig.topic_of(n));
    }
    // Without CREATE on the topics too: they exist.
    grant_readme_acls(&rig, user, false, Some((op, "--topic", &topic)));
    let problems = kafka_problems(&rig, &env, 1).await;
    let line = &problems[0];
    for part in [
        format!("principal User:{user} may not {named} topic {topic} "),
        format!("--add --allow-principal User:{user} --operation {op} --topic {topic}"),
    ] {
        assert!(line.contains(&part), "{part:?} is not in {line:?}");
    }
    let setup = rig.command_env(&["setup"], &env);
    assert!(setup.status.success(), "{}", output_text(&setup));
    let d = rig.start_env(&rig.config, &env);
    d.wait_applying(2).await;
    let a = rig.cluster.client(&rig.db_a).await;
    a.batch_execute("INSERT INTO items (id, val) VALUES (1, 'needs the grant')")
        .await
        .unwrap();
    let b = rig.client_b().await;
    b.batch_execute("INSERT INTO items (id, val) VALUES (2, 'needs it too')")
        .await
        .unwrap();
    let stopped = format!("stopped: fix the cause and restart duplex component=\"{component}\"");
    let logs = d.wait_log(&stopped, 1, Duration::from_secs(60)).await;
    let line = logs.lines().find(|l| l.contains(&stopped)).unwrap();
    assert!(
        line.contains("Topic authorization failed"),
        "{component} stopped for another reason: {line}"
    );
    d
}

#[tokio::test]
async fn check_names_a_missing_create_and_a_missing_group_describe() {
    let rig = Rig::both(DDL, &["public.items"], "").await;
    let user = "duplex_nocreate";
    let env = secure(&rig, user);
    let k = kafka();
    let principal = format!("User:{user}");
    let (ta, tb) = (rig.topic_of("a"), rig.topic_of("b"));
    k.acls(&[
        "--add",
        "--allow-principal",
        &principal,
        "--operation",
        "Write",
        "--operation",
        "Read",
        "--topic",
        &ta,
        "--topic",
        &tb,
    ]);
    k.acls(&[
        "--add",
        "--allow-principal",
        &principal,
        "--operation",
        "Describe",
        "--group",
        "duplex-a_to_b",
    ]);
    let problems = kafka_problems(&rig, &env, 3).await;
    for part in [
        format!("may not CREATE topic {ta} "),
        format!("may not CREATE topic {tb} "),
        "may not DESCRIBE group duplex-b_to_a ".to_string(),
    ] {
        assert!(
            problems.iter().any(|l| l.contains(&part)),
            "{part:?} is not in {problems:#?}"
        );
    }
}
