//! Tests of config parsing and validation.
use super::*;

const GOOD: &str = r#"
    [nodes.legacy]
    url = "postgres://duplex:s3cret@127.0.0.1:5432/app"
    [nodes.modern]
    url = "postgres://duplex@127.0.0.1:5433/app"
    [kafka]
    brokers = "127.0.0.1:9092"
    [kafka.properties]
    "security.protocol" = "plaintext"
    [sync]
    direction = "legacy_to_modern"
    [[tables]]
    name = "public.items"
"#;

fn err_of(text: &str) -> String {
    match Config::parse(text).and_then(|c| c.validate().map(|_| c)) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn good_config_gets_defaults() {
    let c = Config::parse(GOOD).unwrap();
    c.validate().unwrap();
    assert_eq!(c.kafka.topic_prefix, "duplex");
    assert_eq!(c.tables[0].updated_at, "updated_at");
    assert_eq!(c.topic("legacy"), "duplex.legacy.changes");
    assert_eq!(c.slot_name("modern"), "duplex_modern");
    assert_eq!(
        c.directions().unwrap(),
        vec![Direction {
            from: "legacy".into(),
            to: "modern".into()
        }]
    );
    assert_eq!(c.source_nodes(), vec!["legacy".to_string()]);
    assert_eq!(c.source.status_interval_ms, DEFAULT_STATUS_INTERVAL_MS);
}

#[test]
fn unknown_keys_are_rejected_with_their_name() {
    let e = err_of(&GOOD.replace("[sync]", "[sync]\nspeed = 3"));
    assert!(e.contains("speed"), "{e}");
}

#[test]
fn bad_values_name_the_field() {
    let e = err_of(&GOOD.replace("legacy_to_modern", "sideways"));
    assert!(e.contains("sync.direction"), "{e}");
    let e = err_of(&GOOD.replace("public.items", "items"));
    assert!(e.contains("tables[0].name"), "{e}");
    let e = err_of(&GOOD.replace("127.0.0.1:9092", " "));
    assert!(e.contains("kafka.brokers"), "{e}");
    let e = err_of(&GOOD.replace("[nodes.modern]", "[nodes.Modern]"));
    assert!(e.contains("nodes.Modern"), "{e}");
    let e = err_of(&GOOD.replace("security.protocol", "enable.idempotence"));
    assert!(e.contains("kafka.properties.enable.idempotence"), "{e}");
    let e = err_of(&format!("{GOOD}\n[source]\nretry_max_ms = 0"));
    assert!(e.contains("source.retry_max_ms"), "{e}");
}

#[test]
fn system_roots_with_a_weak_sslmode_name_the_url() {
    let weak = GOOD.replace("5433/app", "5433/app?sslmode=require&sslrootcert=system");
    let e = err_of(&weak);
    assert!(
        e.contains("nodes.modern.url") && e.contains("sslrootcert=system"),
        "{e}"
    );
    let full = GOOD.replace(
        "5433/app",
        "5433/app?sslmode=verify-full&sslrootcert=system",
    );
    Config::parse(&full).unwrap().validate().unwrap();
}

#[test]
fn passwords_never_show_in_debug_output() {
    let mut c = Config::parse(GOOD).unwrap();
    c.apply_env(|k| (k == "DUPLEX_NODES_MODERN_PASSWORD").then(|| "envpw".to_string()));
    let dbg = format!("{c:?}");
    assert!(!dbg.contains("s3cret"), "{dbg}");
    assert!(!dbg.contains("envpw"), "{dbg}");
    assert!(dbg.contains("duplex:***@127.0.0.1"), "{dbg}");
    let pg = c.nodes["modern"].pg_config().unwrap();
    assert_eq!(pg.get_password(), Some(&b"envpw"[..]));
}

#[test]
fn url_passwords_are_redacted_in_every_form() {
    for (url, shown) in [
        ("postgres://u:pw1@h/d", "postgres://u:***@h/d"),
        (
            "postgres://u@h/d?sslmode=verify-full&sslpassword=pw2&sslcert=/c",
            "postgres://u@h/d?sslmode=verify-full&sslpassword=***&sslcert=/c",
        ),
        (
            "host=h password = pw3 sslpassword=pw4 user=u",
            "host=h password=*** sslpassword=*** user=u",
        ),
        ("postgres://u@h/password_db", "postgres://u@h/password_db"),
    ] {
        assert_eq!(redact_url(url), shown);
    }
    let e = err_of(&GOOD.replace("5432/app", "5432/app?sslmode=on"));
    assert!(
        e.contains("nodes.legacy.url") && e.contains("sslmode=on"),
        "{e}"
    );
}

#[test]
fn example_config_is_valid() {
    let text = include_str!("../../config/duplex.example.toml");
    Config::parse(text).unwrap().validate().unwrap();
}

#[test]
fn legacy_modern_example_config_is_valid_and_mapped() {
    let text = include_str!("../../config/legacy-modern.example.toml");
    let c = Config::parse(text).unwrap();
    c.validate().unwrap();
    let accounts = &c.tables[0];
    assert!(accounts.is_mapped());
    assert_eq!(accounts.name_on("legacy"), "public.users");
    assert_eq!(accounts.name_on("modern"), "public.accounts");
    assert_eq!(c.tables[1].name_on("legacy"), "public.orders");
    assert_eq!(
        c.tables[1].columns[1].scale.as_ref().unwrap()["legacy"],
        100
    );
}

#[test]
fn mapping_mistakes_name_their_field() {
    let base = include_str!("../../config/legacy-modern.example.toml");
    for (from, to, field) in [
        (
            "nodes = { legacy = \"public.users\", modern = \"public.accounts\" }",
            "nodes = { legacy = \"public.users\", other = \"public.accounts\" }",
            "tables[0].nodes",
        ),
        (
            "scale = { legacy = 100, modern = 1 }",
            "scale = { legacy = 120, modern = 1 }",
            "tables[1].columns[1].scale",
        ),
        (
            "modern = [\"pending\", \"shipped\", \"cancelled\"]",
            "modern = [\"pending\", \"shipped\"]",
            "tables[1].columns[2].values",
        ),
        (
            "modern = [\"pending\", \"shipped\", \"cancelled\"]",
            "modern = [\"pending\", \"shipped\", \"pending\"]",
            "tables[1].columns[2].values.modern",
        ),
        (
            "references = \"public.accounts\"",
            "references = \"public.nope\"",
            "tables[1].columns[0].references",
        ),
        (
            "new_key = { modern = { namespace = \"users\", from = [\"email\"] } }",
            "new_key = { modern = { namespace = \"users\", from = [] } }",
            "tables[0].new_key.modern.from",
        ),
    ] {
        assert!(base.contains(from), "{from}");
        let text = base.replace(from, to);
        let err = Config::parse(&text)
            .and_then(|c| c.validate().map(|_| c))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("`{field}`")), "{field}: {err}");
    }
    // A column entry's value must be a column name.
    let text = base.replace(
        "{ legacy = \"name\", modern = \"full_name\" }",
        "{ legacy = 1, modern = \"full_name\" }",
    );
    assert!(Config::parse(&text)
        .unwrap_err()
        .to_string()
        .contains("column's name"));
}

#[test]
fn kafka_secrets_never_show_in_debug_output() {
    let text = GOOD.replace(
        "[kafka.properties]",
        "[kafka.properties]\n\"sasl.password\" = \"kafkapw\"\n\"ssl.key.password\" = \"keypw\"\n\"sasl.username\" = \"svc\"",
    );
    let c = Config::parse(&text).unwrap();
    let dbg = format!("{c:?}");
    assert!(!dbg.contains("kafkapw") && !dbg.contains("keypw"), "{dbg}");
    assert!(dbg.contains("\"sasl.username\": \"svc\""), "{dbg}");
    assert!(dbg.contains("\"sasl.password\": \"<redacted>\""), "{dbg}");
}

#[test]
fn kafka_properties_come_from_the_environment_and_win() {
    assert_eq!(
        kafka_property_of_env_var("DUPLEX_KAFKA_PROPERTIES_SASL_PASSWORD").as_deref(),
        Some("sasl.password")
    );
    assert_eq!(
        kafka_property_of_env_var("DUPLEX_KAFKA_PROPERTIES_SSL_KEY_PASSWORD").as_deref(),
        Some("ssl.key.password")
    );
    for not_one in [
        "DUPLEX_KAFKA_PROPERTIES_",
        "DUPLEX_KAFKA_PROPERTIES__X",
        "DUPLEX_KAFKA_PROPERTIES_A-B",
        "DUPLEX_NODES_A_PASSWORD",
    ] {
        assert_eq!(kafka_property_of_env_var(not_one), None, "{not_one}");
    }
    let mut c = Config::parse(&GOOD.replace(
        "\"security.protocol\" = \"plaintext\"",
        "\"security.protocol\" = \"plaintext\"\n\"sasl.password\" = \"from-file\"",
    ))
    .unwrap();
    c.apply_kafka_env([
        (
            "DUPLEX_KAFKA_PROPERTIES_SASL_PASSWORD".to_string(),
            "s3cr3t-env".to_string(),
        ),
        ("HOME".to_string(), "/root".to_string()),
    ]);
    assert_eq!(c.kafka.properties["sasl.password"], "s3cr3t-env");
    assert_eq!(c.kafka.properties["security.protocol"], "plaintext");
    assert_eq!(c.kafka.properties.len(), 2);
    assert!(!format!("{c:?}").contains("s3cr3t-env"));
    // The properties duplex sets itself stay refused, from the environment too.
    c.apply_kafka_env([("DUPLEX_KAFKA_PROPERTIES_ACKS".to_string(), "1".to_string())]);
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("kafka.properties.acks"), "{e}");
}

#[test]
fn batch_rows_bounds_every_stage_of_a_direction() {
    let mut c = Config::parse(GOOD).unwrap();
    c.sync.batch_rows = 2_000;
    let b = c.sync.bounds();
    assert_eq!(
        (b.intake_capacity, b.per_turn, b.flush_at, b.retry_buffer),
        (2_000, 2_000, 2_000, 2_000)
    );
    assert_eq!(b.hold_max, 4_000);
    // A small batch still holds back a transaction of a thousand events.
    c.sync.batch_rows = 2;
    assert_eq!(c.sync.bounds().hold_max, sync::HELD_MIN);
}

#[test]
fn origins_on_a_node_are_the_apply_one_and_one_per_copy_worker_and_mapped_copier() {
    let one_way = Config::parse(&format!("{GOOD}\n[snapshot]\nworkers = 2\n")).unwrap();
    let mut origins = one_way.origins_on("modern");
    origins.sort();
    assert_eq!(
        origins,
        [
            "duplex_modern_from_legacy",
            "duplex_modern_from_legacy_copy0",
            "duplex_modern_from_legacy_copy1"
        ]
    );
    // Nothing is applied on the source of a one-way sync.
    assert!(one_way.origins_on("legacy").is_empty());

    let text = include_str!("../../config/legacy-modern.example.toml");
    let mapped = Config::parse(text).unwrap();
    let workers = mapped.snapshot.workers;
    for node in ["legacy", "modern"] {
        let origins = mapped.origins_on(node);
        assert_eq!(origins.len(), 1 + 2 * workers, "{node}: {origins:?}");
        assert!(origins.iter().all(|o| o.contains(&format!("{node}_from_"))));
    }
}
