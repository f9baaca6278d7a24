//! What an SRE sees: /metrics moves by the right amounts, lag rises while the apply
//! side is blocked and returns to 0, conflict and dead-letter counters match what was
//! provoked, /readyz and `duplex status` report a halted direction, and the dashboard
//! and alert rules use only metrics duplex exports.

use crate::harness::duplex::Rig;
use crate::harness::metrics::{get, metrics_port, value, wait_value};
use crate::harness::pg::Cluster;
use crate::harness::tables::converge;
use crate::harness::wait_for;
use std::collections::BTreeSet;
use std::time::Duration;

const DDL: &str = "CREATE TABLE items (id int PRIMARY KEY, val text, updated_at timestamptz NOT NULL DEFAULT clock_timestamp());";

#[tokio::test]
async fn metrics_lag_conflicts_dead_letters_and_readiness() {
    let rig = Rig::both(DDL, &["public.items"], "").await;
    let dead_letter_cfg = std::fs::read_to_string(&rig.config).unwrap().replace(
        "linger_ms = 10",
        "linger_ms = 10\non_error = \"dead_letter\"",
    );
    std::fs::write(&rig.config, &dead_letter_cfg).unwrap();
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    b.batch_execute("ALTER TABLE items ADD CONSTRAINT no_forbidden CHECK (val <> 'forbidden')")
        .await
        .unwrap();
    assert!(rig.command(&["setup"]).status.success());
    let d = rig.start();
    d.wait_applying(2).await;
    let port = metrics_port(&rig);
    wait_for("/readyz", Duration::from_secs(30), || {
        let ready = get(port, "/readyz").is_some_and(|(code, _)| code == 200);
        async move { ready.then_some(()) }
    })
    .await;
    assert_eq!(get(port, "/healthz").map(|r| r.0), Some(200));
    // Every counter exists at zero before its first event, so that `increase()` and
    // alerts see that event.
    let fresh = get(port, "/metrics").map(|r| r.1).unwrap_or_default();
    for series in [
        r#"duplex_apply_rows_total{direction="a_to_b",table="public.items",op="upsert"} 0"#,
        r#"duplex_apply_conflicts_total{direction="b_to_a",table="public.items",resolution="kept_local"} 0"#,
        r#"duplex_apply_repairs_total{direction="a_to_b",table="public.items"} 0"#,
        r#"duplex_apply_dead_letters_total{direction="a_to_b"} 0"#,
        r#"duplex_apply_errors_total{direction="b_to_a",class="definite"} 0"#,
        r#"duplex_apply_retries_total{direction="a_to_b",reason="deadlock"} 0"#,
        r#"duplex_source_events_total{node="b",table="public.items",op="delete"} 0"#,
        r#"duplex_sink_kafka_produced_total{node="a",table="public.items",op="truncate"} 0"#,
        r#"duplex_source_errors_total{node="a",class="transient"} 0"#,
        r#"duplex_source_slot_safe_wal_size_bytes{node="a"} "#,
        r#"duplex_apply_halted{direction="a_to_b"} 0"#,
        r#"duplex_snapshot_rows_total{direction="b_to_a",table="public.items"} 0"#,
        r#"duplex_snapshot_chunks_remaining{direction="a_to_b",table="public.items"} "#,
        // Histograms, not summaries: buckets that servers can aggregate.
        r#"duplex_apply_commit_to_apply_seconds_bucket{direction="a_to_b",le="0.1"} 0"#,
        r#"duplex_apply_commit_to_apply_seconds_count{direction="b_to_a"} 0"#,
        r#"duplex_apply_batch_rows_bucket{direction="a_to_b",le="+Inf"} 0"#,
        r#"duplex_apply_batch_seconds_bucket{direction="b_to_a",le="0.01"} 0"#,
    ] {
        assert!(fresh.contains(series), "{series} missing from:\n{fresh}");
    }

    // Throughput: 50 inserts on a (5 transactions), 20 on b.
    for t in 0..5 {
        a.batch_execute(&format!(
            "INSERT INTO items (id, val) SELECT {t} * 10 + g, 'a' FROM generate_series(1, 10) g"
        ))
        .await
        .unwrap();
    }
    b.batch_execute(
        "INSERT INTO items (id, val) SELECT 1000 + g, 'b' FROM generate_series(1, 20) g",
    )
    .await
    .unwrap();
    converge(&a, &b, &["items"], Duration::from_secs(30)).await;
    let upserts = r#"duplex_apply_rows_total{direction="a_to_b",table="public.items",op="upsert"}"#;
    wait_value(port, upserts, "50 rows applied a to b", |v| v == 50.0).await;
    let scrape = get(port, "/metrics").unwrap().1;
    for (series, expected) in [
        (
            r#"duplex_source_events_total{node="a",table="public.items",op="insert"}"#,
            50.0,
        ),
        (
            r#"duplex_sink_kafka_produced_total{node="a",table="public.items",op="insert"}"#,
            50.0,
        ),
        (
            r#"duplex_source_events_total{node="b",table="public.items",op="insert"}"#,
            20.0,
        ),
        (
            r#"duplex_apply_rows_total{direction="b_to_a",table="public.items",op="upsert"}"#,
            20.0,
        ),
        (
            r#"duplex_apply_transactions_total{direction="a_to_b"}"#,
            5.0,
        ),
    ] {
        assert_eq!(
            value(&scrape, series),
            Some(expected),
            "{series} in\n{scrape}"
        );
    }

    // Lag: block the apply side of a → b with a lock on b, write on a.
    let blocker = rig.client_b().await;
    blocker
        .batch_execute("BEGIN; LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    a.batch_execute("INSERT INTO items (id, val) VALUES (500, 'while blocked')")
        .await
        .unwrap();
    let lag = r#"duplex_apply_lag_seconds{direction="a_to_b"}"#;
    wait_value(port, lag, "lag to rise above 2 s", |v| v > 2.0).await;
    blocker.batch_execute("COMMIT").await.unwrap();
    wait_value(port, lag, "lag to return to 0", |v| v == 0.0).await;
    let kafka_lag = r#"duplex_apply_kafka_lag_messages{direction="a_to_b"}"#;
    wait_value(port, kafka_lag, "Kafka lag to return to 0", |v| v == 0.0).await;

    // A conflict: b's version is newer, a's later edit loses on b.
    b.batch_execute("UPDATE items SET val = 'future', updated_at = '2100-01-01' WHERE id = 1")
        .await
        .unwrap();
    a.batch_execute("UPDATE items SET val = 'now', updated_at = clock_timestamp() WHERE id = 1")
        .await
        .unwrap();
    let conflicts = r#"duplex_apply_conflicts_total{direction="a_to_b",table="public.items",resolution="kept_local"}"#;
    wait_value(port, conflicts, "one conflict a to b", |v| v == 1.0).await;
    // A dead letter.
    a.batch_execute("INSERT INTO items (id, val) VALUES (600, 'forbidden')")
        .await
        .unwrap();
    wait_value(
        port,
        r#"duplex_apply_dead_letters_total{direction="a_to_b"}"#,
        "one dead letter",
        |v| v == 1.0,
    )
    .await;

    // Every metric the dashboard and the alert rules use is exported.
    let scrape = get(port, "/metrics").unwrap().1;
    check_deploy_files(&scrape);
    assert_eq!(d.stop().await, Some(0));

    // Halt: readiness flips, the gauge and `duplex status` say why.
    std::fs::write(
        &rig.config,
        dead_letter_cfg.replace("on_error = \"dead_letter\"", ""),
    )
    .unwrap();
    let d = rig.start();
    a.batch_execute("INSERT INTO items (id, val) VALUES (601, 'forbidden')")
        .await
        .unwrap();
    wait_value(
        port,
        r#"duplex_apply_halted{direction="a_to_b"}"#,
        "the halted gauge",
        |v| v == 1.0,
    )
    .await;
    let (code, body) = get(port, "/readyz").unwrap();
    assert_eq!(code, 503);
    assert!(body.contains("apply a_to_b"), "{body}");
    let out = rig.command(&["status", "--max-lag", "60"]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("direction a_to_b: halted") && text.contains("no_forbidden"),
        "{text}"
    );
    let out = rig.command(&["status", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let dirs = json["directions"].as_array().unwrap();
    let b_to_a = dirs.iter().find(|d| d["direction"] == "b_to_a").unwrap();
    assert_eq!(b_to_a["state"], "running");
    assert_eq!(b_to_a["connected"], true);
    assert_eq!(json["nodes"][0]["slot_active"], true);
    assert_eq!(d.stop().await, Some(0));
}

/// Idle clients (a port scanner, a half-open probe) do not hold up `/healthz`: each
/// connection is served on its own. Twenty idle ones would cost a one-at-a-time server
/// twenty request timeouts (100 s) before it answered.
#[tokio::test]
async fn idle_clients_do_not_hold_up_probes() {
    let rig = Rig::new(DDL, &["public.items"], "").await;
    let d = rig.start();
    let port = metrics_port(&rig);
    wait_for("/healthz", Duration::from_secs(30), || {
        let up = get(port, "/healthz").is_some_and(|(code, _)| code == 200);
        async move { up.then_some(()) }
    })
    .await;
    let idle: Vec<std::net::TcpStream> = (0..20)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    let started = std::time::Instant::now();
    let answer = tokio::task::spawn_blocking(move || get(port, "/healthz"))
        .await
        .unwrap();
    assert_eq!(answer.map(|(code, _)| code), Some(200));
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "answered only after {:?}",
        started.elapsed()
    );
    drop(idle);
    assert_eq!(d.stop().await, Some(0));
}

/// Names `duplex_*` used by the dashboard and the alert rules must be in `scrape`.
fn check_deploy_files(scrape: &str) {
    let root = env!("CARGO_MANIFEST_DIR");
    let dashboard = std::fs::read_to_string(format!("{root}/deploy/grafana/duplex.json")).unwrap();
    let parsed: serde_json::Value =
        serde_json::from_str(&dashboard).expect("dashboard is not JSON");
    assert!(parsed["panels"].as_array().is_some_and(|p| p.len() >= 8));
    let alerts = std::fs::read_to_string(format!("{root}/deploy/prometheus/alerts.yml")).unwrap();
    assert!(alerts.matches("- alert: ").count() >= 8);
    let mut exported: BTreeSet<&str> = scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    // A histogram's own name, as the text of an annotation names it.
    let histograms: Vec<&str> = exported
        .iter()
        .filter_map(|n| n.strip_suffix("_bucket"))
        .collect();
    exported.extend(histograms);
    for text in [&dashboard, &alerts] {
        for name in metric_names(text) {
            assert!(
                exported.contains(name.as_str()),
                "{name} is used but not exported; exported: {exported:?}"
            );
        }
    }
    assert!(
        !scrape.contains("quantile="),
        "a summary is exported:\n{scrape}"
    );
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ] {
        let out = std::process::Command::new("promtool")
            .args(args)
            .current_dir(format!("{root}/deploy/prometheus"))
            .output()
            .expect("promtool is missing: run scripts/dev-env install");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("duplex_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let preceded =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        if !preceded {
            names.insert(text[start..end].to_string());
        }
        i = end;
    }
    names
}
