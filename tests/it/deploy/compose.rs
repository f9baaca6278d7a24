//! The compose file: docker-compose v1's offline `config`, its mounts, and promtool on
//! its Prometheus config.

use super::*;
const COMPOSE: &str = "deploy/compose/docker-compose.yml";

/// docker-compose (v1, which validates offline) on `file`.
fn compose(file: &Path, args: &[&str]) -> Output {
    run(Command::new(tool("docker-compose"))
        .arg("--file")
        .arg(file)
        .args(args)
        .env_remove("COMPOSE_FILE")
        .env_remove("COMPOSE_PROJECT_NAME")
        .env_remove("DOCKER_HOST"))
}

#[test]
fn compose_file_passes_docker_compose_config() {
    let file = root().join(COMPOSE);
    let out = compose(&file, &["config", "-q"]);
    assert!(
        out.status.success() && said(&out).trim().is_empty(),
        "docker-compose config:\n{}",
        said(&out)
    );
    // The resolved file: every bind-mounted file or folder exists (compose does not
    // check), duplex is built from the repo's Dockerfile and finds its nodes, broker
    // and passwords, Prometheus and Grafana get the rules and the dashboard.
    let out = compose(&file, &["config"]);
    assert!(out.status.success(), "{}", said(&out));
    let resolved = yaml_docs(&String::from_utf8(out.stdout).unwrap()).remove(0);
    let services = resolved["services"].as_object().unwrap();
    let names: BTreeSet<&str> = services.keys().map(String::as_str).collect();
    let expected: BTreeSet<&str> = [
        "node-a",
        "node-b",
        "kafka",
        "duplex",
        "duplex-standby",
        "prometheus",
        "grafana",
    ]
    .into_iter()
    .collect();
    assert_eq!(names, expected);
    let mut mounts = Vec::new(); // (service, host path, container path)
    for (name, service) in services {
        for volume in service["volumes"].as_array().into_iter().flatten() {
            let spec = volume.as_str().expect("volumes as strings");
            let mut parts = spec.split(':');
            let (host, target) = (parts.next().unwrap(), parts.next().unwrap_or_default());
            assert!(Path::new(host).exists(), "{name} mounts {host}, missing");
            mounts.push((name.as_str(), host.to_string(), target.to_string()));
        }
    }
    let mounted = |service: &str, rel: &str| -> String {
        let host = root().join(rel).canonicalize().unwrap();
        mounts
            .iter()
            .find(|(s, h, _)| {
                *s == service && Path::new(h).canonicalize().ok() == Some(host.clone())
            })
            .map(|(_, _, target)| target.clone())
            .unwrap_or_else(|| panic!("{service} does not mount {rel}"))
    };

    let cfg = load_config(
        "deploy/compose/duplex.toml",
        &read("deploy/compose/duplex.toml"),
    );
    assert_listens_everywhere("deploy/compose/duplex.toml", &cfg);
    for name in ["duplex", "duplex-standby"] {
        let duplex = &services[name];
        let context = Path::new(duplex["build"]["context"].as_str().unwrap());
        assert_eq!(
            context.canonicalize().unwrap(),
            root().canonicalize().unwrap()
        );
        assert!(context.join("Dockerfile").is_file());
        assert_eq!(
            mounted(name, "deploy/compose/duplex.toml"),
            "/etc/duplex/duplex.toml"
        );
        for node in cfg.nodes.keys() {
            let var = password_env_var(node);
            assert!(
                duplex["environment"].get(&var).is_some(),
                "{name} lacks {var}"
            );
        }
        let ports: Vec<&str> = duplex["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect();
        assert!(
            ports
                .iter()
                .any(|p| p.contains(&format!(":{METRICS_PORT}/"))),
            "{name}: {ports:?}"
        );
    }
    for (node, nc) in &cfg.nodes {
        for host in nc.pg_config().unwrap().get_hosts() {
            let tokio_postgres::config::Host::Tcp(host) = host else {
                panic!("node {node}: not a TCP host")
            };
            assert!(
                names.contains(host.as_str()),
                "node {node} at {host}: no such service"
            );
        }
    }
    for broker in cfg.kafka.brokers.split(',') {
        let host = broker.trim().rsplit_once(':').unwrap().0;
        assert!(names.contains(host), "broker {broker}: no such service");
    }

    // Prometheus: its config passes promtool, loads the alert rules, scrapes both
    // duplex instances.
    let out = run(Command::new(system_tool("promtool"))
        .args(["check", "config", "--syntax-only"])
        .arg(root().join("deploy/compose/prometheus.yml")));
    assert!(out.status.success(), "promtool:\n{}", said(&out));
    let config_target = mounted("prometheus", "deploy/compose/prometheus.yml");
    let prometheus = yaml_doc("deploy/compose/prometheus.yml");
    let rules_target = mounted("prometheus", "deploy/prometheus/alerts.yml");
    let config_dir = Path::new(&config_target).parent().unwrap();
    for rules in prometheus["rule_files"].as_array().unwrap() {
        assert_eq!(
            config_dir.join(rules.as_str().unwrap()),
            Path::new(&rules_target)
        );
    }
    let targets: BTreeSet<&str> = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let instances = [
        format!("duplex:{METRICS_PORT}"),
        format!("duplex-standby:{METRICS_PORT}"),
    ];
    let expected: BTreeSet<&str> = instances.iter().map(String::as_str).collect();
    assert_eq!(targets, expected);

    // Grafana: the data source is the Prometheus service, the dashboard provider
    // reads the folder where duplex.json is mounted.
    let provisioning = mounted("grafana", "deploy/compose/grafana/provisioning");
    assert_eq!(provisioning, "/etc/grafana/provisioning");
    let datasources = yaml_doc("deploy/compose/grafana/provisioning/datasources/prometheus.yml");
    assert_eq!(datasources["datasources"][0]["type"], "prometheus");
    assert_eq!(
        datasources["datasources"][0]["url"],
        "http://prometheus:9090"
    );
    let dashboards = yaml_doc("deploy/compose/grafana/provisioning/dashboards/duplex.yml");
    let dashboard = mounted("grafana", "deploy/grafana/duplex.json");
    assert_eq!(
        Path::new(&dashboard).parent().unwrap(),
        Path::new(
            dashboards["providers"][0]["options"]["path"]
                .as_str()
                .unwrap()
        )
    );
}

#[test]
fn compose_and_promtool_reject_broken_files() {
    let compose_file = read(COMPOSE);
    let dir = tempfile::tempdir().unwrap();
    for (name, from, to) in [
        (
            "unknown-key.yml",
            "image: apache/kafka",
            "imagee: apache/kafka",
        ),
        ("bad-type.yml", "retries: 30", "retries: many"),
    ] {
        assert!(compose_file.contains(from));
        let path = dir.path().join(name);
        std::fs::write(&path, compose_file.replacen(from, to, 1)).unwrap();
        let out = compose(&path, &["config", "-q"]);
        assert!(!out.status.success(), "docker-compose accepted {name}");
    }
    let path = dir.path().join("prometheus.yml");
    std::fs::write(&path, "global:\n  scrape_interval: fast\n").unwrap();
    let out = run(Command::new(system_tool("promtool"))
        .args(["check", "config", "--syntax-only"])
        .arg(path));
    assert!(!out.status.success(), "promtool accepted: {}", said(&out));
}
