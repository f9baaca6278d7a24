//! Kafka secrets from the environment: `DUPLEX_KAFKA_PROPERTIES_<PROPERTY>` sets a
//! `[kafka.properties]` entry, and its value never appears in a log (at debug level,
//! with librdkafka's own debug output on) or in a command's output.

use crate::harness::duplex::Rig;
use crate::harness::pg::Cluster;
use crate::harness::tables::converge;
use std::time::Duration;

const DDL: &str = "CREATE TABLE items (id int PRIMARY KEY, val text, updated_at timestamptz NOT NULL DEFAULT clock_timestamp());";
const SECRET: &str = "pw-7f3a9c-never-logged";

fn said(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

#[tokio::test]
async fn kafka_secrets_from_the_environment_are_used_and_never_logged() {
    // librdkafka logs its configuration and every protocol step with `debug = all`.
    let rig = Rig::new(
        DDL,
        &["public.items"],
        "[kafka.properties]\n\"debug\" = \"all\"\n\"sasl.username\" = \"duplex\"\n",
    )
    .await;
    let secret = [
        ("DUPLEX_KAFKA_PROPERTIES_SASL_PASSWORD", SECRET),
        ("DUPLEX_KAFKA_PROPERTIES_SSL_KEY_PASSWORD", SECRET),
        ("RUST_LOG", "debug"),
    ];
    // The variable is applied: a bad value from the environment is librdkafka's
    // error, named by `duplex check`.
    let bad = rig.command_env(
        &["check"],
        &[("DUPLEX_KAFKA_PROPERTIES_SECURITY_PROTOCOL", "bogus")],
    );
    assert_eq!(bad.status.code(), Some(1), "{}", said(&bad));
    assert!(said(&bad).contains("security.protocol"), "{}", said(&bad));

    let mut outputs = Vec::new();
    for args in [&["check"][..], &["setup"], &["status", "--json"]] {
        let out = rig.command_env(args, &secret);
        outputs.push((args.join(" "), said(&out)));
    }
    let d = rig.start_env(&rig.config, &secret);
    d.wait_applying(1).await;
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    a.batch_execute("INSERT INTO items (id, val) VALUES (1, 'through a secured config')")
        .await
        .unwrap();
    converge(&a, &b, &["items"], Duration::from_secs(60)).await;
    let out = rig.command_env(&["tail", "--node", "a", "--max", "1"], &secret);
    outputs.push(("tail".into(), said(&out)));
    assert_eq!(d.stop().await, Some(0));
    let logs = d_logs(&rig);
    // librdkafka printed its configuration, secret properties included (redacted).
    assert!(
        logs.contains("Client configuration") && logs.contains("sasl.password"),
        "librdkafka's configuration dump is not in the log"
    );
    outputs.push(("run".into(), logs));
    for (what, text) in outputs {
        assert!(
            !text.contains(SECRET),
            "`duplex {what}` showed the secret:\n{text}"
        );
    }
}

/// Every daemon log of the rig.
fn d_logs(rig: &Rig) -> String {
    let mut all = String::new();
    for entry in std::fs::read_dir(&rig.dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "log") {
            all.push_str(&std::fs::read_to_string(path).unwrap_or_default());
        }
    }
    all
}
