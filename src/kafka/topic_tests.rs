use super::*;

/// A topic as duplex creates it on a three-broker cluster with replication factor 3
/// and the brokers' defaults for the rest.
fn good() -> TopicSettings {
    TopicSettings {
        replication_factor: 3,
        brokers: 3,
        cleanup_policy: Some("delete".into()),
        unclean_leader_election: Some(false),
        min_insync_replicas: Some(2),
        retention_ms: Some(MIN_RETENTION_MS),
        retention_bytes: Some(-1),
    }
}

fn severities(s: &TopicSettings) -> Vec<(Severity, String)> {
    findings("t", s)
        .into_iter()
        .map(|f| {
            assert!(f.text.starts_with("kafka: topic t: "), "{}", f.text);
            (f.severity, f.text)
        })
        .collect()
}

fn only(s: &TopicSettings) -> (Severity, String) {
    let mut found = severities(s);
    assert_eq!(found.len(), 1, "{found:?}");
    found.remove(0)
}

#[test]
fn a_topic_as_duplex_creates_it_has_no_findings() {
    assert_eq!(severities(&good()), vec![]);
    // Kept for ever, on one broker, or with settings the brokers did not report.
    let forever = TopicSettings {
        retention_ms: Some(-1),
        ..good()
    };
    assert_eq!(severities(&forever), vec![]);
    let dev = TopicSettings {
        replication_factor: 1,
        brokers: 1,
        min_insync_replicas: Some(1),
        ..good()
    };
    assert_eq!(severities(&dev), vec![]);
    let two = TopicSettings {
        replication_factor: 2,
        min_insync_replicas: Some(1),
        ..good()
    };
    assert_eq!(severities(&two), vec![]);
    let unknown = TopicSettings::from_configs(3, 3, |_| None);
    assert_eq!(severities(&unknown), vec![]);
}

#[test]
fn settings_that_drop_or_lose_changes_or_refuse_writes_are_errors() {
    for policy in ["compact", "compact,delete", "delete,compact"] {
        let s = TopicSettings {
            cleanup_policy: Some(policy.into()),
            ..good()
        };
        let (severity, text) = only(&s);
        assert_eq!(severity, Severity::Error);
        assert!(text.contains("cleanup.policy=delete"), "{text}");
    }
    let unclean = TopicSettings {
        unclean_leader_election: Some(true),
        ..good()
    };
    let (severity, text) = only(&unclean);
    assert_eq!(severity, Severity::Error);
    assert!(
        text.contains("unclean.leader.election.enable=false"),
        "{text}"
    );
    let refused = TopicSettings {
        min_insync_replicas: Some(4),
        ..good()
    };
    let (severity, text) = only(&refused);
    assert_eq!(severity, Severity::Error);
    assert!(
        text.contains("refuse every write") && text.ends_with("min.insync.replicas=2"),
        "{text}"
    );
}

#[test]
fn settings_that_risk_changes_or_stall_writes_are_warnings() {
    let cases = [
        // One broker down stops every write.
        (
            3,
            3,
            Some(3),
            "as many as its 3 replicas",
            "min.insync.replicas=2",
        ),
        (
            2,
            3,
            Some(2),
            "as many as its 2 replicas",
            "min.insync.replicas=1",
        ),
        // Acknowledged with one copy.
        (
            3,
            3,
            Some(1),
            "leader alone has it",
            "min.insync.replicas=2",
        ),
        (
            5,
            5,
            Some(1),
            "leader alone has it",
            "min.insync.replicas=2",
        ),
        // One replica on a cluster that could hold more.
        (
            1,
            3,
            Some(1),
            "one replica on a cluster of 3 brokers",
            "replicas",
        ),
    ];
    for (replication_factor, brokers, min_insync_replicas, says, fix) in cases {
        let s = TopicSettings {
            replication_factor,
            brokers,
            min_insync_replicas,
            ..good()
        };
        let (severity, text) = only(&s);
        assert_eq!(severity, Severity::Warning, "{text}");
        assert!(text.contains(says) && text.contains(fix), "{text}");
    }
    let day = TopicSettings {
        retention_ms: Some(86_400_000),
        ..good()
    };
    let (severity, text) = only(&day);
    assert_eq!(severity, Severity::Warning);
    assert!(text.contains("retention.ms is 86400000 (24 h)"), "{text}");
    let sized = TopicSettings {
        retention_bytes: Some(1 << 30),
        ..good()
    };
    let (severity, text) = only(&sized);
    assert_eq!(severity, Severity::Warning);
    assert!(text.contains("retention.bytes=-1"), "{text}");
}

#[test]
fn every_finding_of_a_topic_is_reported() {
    let bad = TopicSettings {
        replication_factor: 1,
        brokers: 3,
        cleanup_policy: Some("compact".into()),
        unclean_leader_election: Some(true),
        min_insync_replicas: Some(2),
        retention_ms: Some(3_600_000 * 3 / 2),
        retention_bytes: Some(0),
    };
    let found = severities(&bad);
    let errors = found.iter().filter(|(s, _)| *s == Severity::Error).count();
    assert_eq!((errors, found.len()), (3, 6), "{found:?}");
    assert!(
        found.iter().any(|(_, t)| t.contains("(1.5 h)")),
        "{found:?}"
    );
}

#[test]
fn created_topics_get_the_settings_the_rule_asks_for() {
    for replication_factor in 1..=5 {
        let configs = creation_configs(replication_factor);
        let get = |k: &str| {
            configs
                .iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| v.as_str())
        };
        // On a cluster as large as the replication factor, with the brokers' defaults
        // (min.insync.replicas 1, a week's retention) for what duplex leaves to them.
        let s = TopicSettings::from_configs(replication_factor, replication_factor as usize, |k| {
            get(k).or(match k {
                "min.insync.replicas" => Some("1"),
                "retention.ms" => Some("604800000"),
                "retention.bytes" => Some("-1"),
                _ => None,
            })
        });
        assert_eq!(
            findings("t", &s),
            vec![],
            "replication factor {replication_factor}"
        );
    }
    assert_eq!(
        TopicSettings::from_configs(3, 3, |k| (k == "unclean.leader.election.enable")
            .then_some("true"))
        .unclean_leader_election,
        Some(true)
    );
}
