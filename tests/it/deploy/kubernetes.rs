//! The Kubernetes manifests: kubernetes-validate on each file and on the rendered
//! kustomization, and the cross-references between them.

use super::*;
const K8S: &str = "deploy/kubernetes";

/// The manifests in deploy/kubernetes (every YAML file but the kustomization).
fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join(K8S))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "yaml")
                && p.file_name().is_some_and(|n| n != "kustomization.yaml")
        })
        .collect();
    files.sort();
    files
}

/// `kubernetes-validate --strict` (unknown fields are errors): (passed, output). It
/// has no schema for custom resources (the PodMonitor): it warns and passes them.
fn kubernetes_validate(files: &[PathBuf]) -> (bool, String) {
    let out = run(Command::new(tool("kubernetes-validate"))
        .arg("--strict")
        .args(files));
    (out.status.success(), said(&out))
}

fn find<'a>(docs: &'a [Value], kind: &str, name_prefix: &str) -> &'a Value {
    docs.iter()
        .find(|d| {
            d["kind"] == kind
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(name_prefix))
        })
        .unwrap_or_else(|| panic!("no {kind} {name_prefix}* in the rendered kustomization"))
}

/// Every file a kustomization names exists (resources, generator files).
fn check_kustomization_paths(dir: &Path) {
    let k = yaml_docs(&std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap()).remove(0);
    for resource in k["resources"].as_array().into_iter().flatten() {
        let p = dir.join(resource.as_str().unwrap());
        assert!(
            p.exists(),
            "{} names {}, missing",
            dir.display(),
            p.display()
        );
        if p.is_dir() {
            check_kustomization_paths(&p);
        }
    }
    for generator in k["configMapGenerator"].as_array().into_iter().flatten() {
        for file in generator["files"].as_array().into_iter().flatten() {
            let p = dir.join(file.as_str().unwrap());
            assert!(
                p.is_file(),
                "{} generates from {}, missing",
                dir.display(),
                p.display()
            );
        }
    }
}

#[test]
fn kubernetes_manifests_pass_kubernetes_validate() {
    let files = manifests();
    assert!(files.len() >= 5, "{files:?}");
    let (ok, text) = kubernetes_validate(&files);
    assert!(ok, "kubernetes-validate:\n{text}");
    for file in &files {
        let name = file.display().to_string();
        assert!(
            text.contains(&name),
            "kubernetes-validate did not read {name}:\n{text}"
        );
    }
    for line in text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("INFO "))
    {
        assert!(
            line.starts_with("WARN ") && line.contains("kind PodMonitor"),
            "kubernetes-validate: {line}"
        );
    }

    // The kustomization, rendered as `kubectl apply -k` would, validates too.
    check_kustomization_paths(&root().join(K8S));
    let out = run(Command::new(tool("kubectl"))
        .arg("kustomize")
        .arg(root().join(K8S)));
    assert!(out.status.success(), "kubectl kustomize: {}", said(&out));
    let rendered = String::from_utf8(out.stdout).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rendered.yaml");
    std::fs::write(&path, &rendered).unwrap();
    let (ok, text) = kubernetes_validate(&[path]);
    assert!(
        ok,
        "kubernetes-validate of the rendered kustomization:\n{text}"
    );

    let docs = yaml_docs(&rendered);
    for doc in docs.iter().filter(|d| d["kind"] != "Namespace") {
        assert_eq!(doc["metadata"]["namespace"], "duplex", "{doc}");
    }
    // The dashboard, generated from deploy/grafana/duplex.json, for Grafana's sidecar.
    let dashboard = find(&docs, "ConfigMap", "duplex-grafana-dashboard");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    let embedded: Value =
        serde_json::from_str(dashboard["data"]["duplex.json"].as_str().unwrap()).unwrap();
    let original: Value = serde_json::from_str(&read("deploy/grafana/duplex.json")).unwrap();
    assert!(
        embedded == original,
        "the dashboard ConfigMap differs from duplex.json"
    );
    // The config, under a hashed name the Deployment follows.
    let config_map = find(&docs, "ConfigMap", "duplex-config");
    let config_text = config_map["data"]["duplex.toml"].as_str().unwrap();
    assert_eq!(config_text, read("deploy/kubernetes/duplex.toml"));
    let cfg = load_config("the ConfigMap's duplex.toml", config_text);
    assert_listens_everywhere("the ConfigMap's duplex.toml", &cfg);

    let deployment = find(&docs, "Deployment", "duplex");
    assert_eq!(
        deployment["spec"]["replicas"], 2,
        "hot standby: two replicas"
    );
    let template = &deployment["spec"]["template"];
    let pod = &template["spec"];
    assert!(pod["terminationGracePeriodSeconds"].as_u64().unwrap() > 60);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["runAsUser"], UID,
        "the Dockerfile's USER"
    );
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "config")
        .expect("volume config");
    assert_eq!(volume["configMap"]["name"], config_map["metadata"]["name"]);
    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[..3], ["run", "--config", "/etc/duplex/duplex.toml"]);
    assert!(c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["name"] == "config" && m["mountPath"] == "/etc/duplex"));
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let port = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "metrics")
        .expect("a port named metrics");
    assert_eq!(port["containerPort"], METRICS_PORT);
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(c[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"], "metrics", "{probe}");
    }
    assert_eq!(c["resources"]["requests"]["memory"], "128Mi");
    assert_eq!(c["resources"]["requests"]["cpu"], "250m");
    assert_eq!(c["resources"]["limits"]["memory"], "256Mi");
    // Each node's password comes from a key of a Secret in the render.
    for node in cfg.nodes.keys() {
        let var = password_env_var(node);
        let env = c["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == var.as_str())
            .unwrap_or_else(|| panic!("the container lacks {var}"));
        let key_ref = &env["valueFrom"]["secretKeyRef"];
        let secret = find(&docs, "Secret", key_ref["name"].as_str().unwrap());
        let key = key_ref["key"].as_str().unwrap();
        assert!(
            secret["stringData"].get(key).is_some(),
            "{var}: the Secret has no key {key}"
        );
    }
    // What kubernetes-validate cannot check in the PodMonitor (a custom resource):
    // that it selects these pods and names their metrics port. The same for the PDB.
    let labels = &template["metadata"]["labels"];
    let selects_pods = |selector: &Value| {
        let wanted = selector["matchLabels"].as_object().unwrap();
        !wanted.is_empty() && wanted.iter().all(|(k, v)| labels[k] == *v)
    };
    let monitor = find(&docs, "PodMonitor", "duplex");
    assert!(selects_pods(&monitor["spec"]["selector"]), "{monitor}");
    let endpoints = monitor["spec"]["podMetricsEndpoints"].as_array().unwrap();
    assert!(!endpoints.is_empty());
    for endpoint in endpoints {
        assert_eq!(endpoint["port"], "metrics");
        assert_eq!(endpoint["path"], "/metrics");
    }
    let pdb = find(&docs, "PodDisruptionBudget", "duplex");
    assert!(selects_pods(&pdb["spec"]["selector"]), "{pdb}");
    assert!(selects_pods(&deployment["spec"]["selector"]));
}

#[test]
fn kubernetes_validators_reject_broken_manifests() {
    let dir = tempfile::tempdir().unwrap();
    let deployment = read("deploy/kubernetes/deployment.yaml");
    for (name, from, to) in [
        ("type.yaml", "replicas: 2", "replicas: \"two\""),
        ("field.yaml", "replicas: 2", "replicas: 2\n  replica: 2"),
    ] {
        assert!(deployment.contains(from));
        let path = dir.path().join(name);
        std::fs::write(&path, deployment.replacen(from, to, 1)).unwrap();
        let (ok, text) = kubernetes_validate(&[path]);
        assert!(!ok, "kubernetes-validate accepted {name}:\n{text}");
    }
    // kustomize refuses a generator file that is not there.
    let kdir = dir.path().join("k");
    std::fs::create_dir(&kdir).unwrap();
    std::fs::write(
        kdir.join("kustomization.yaml"),
        "configMapGenerator:\n  - name: x\n    files: [missing.toml]\n",
    )
    .unwrap();
    let out = run(Command::new(tool("kubectl")).arg("kustomize").arg(kdir));
    assert!(!out.status.success(), "kubectl kustomize: {}", said(&out));
}

// ---- Docker Compose ----------------------------------------------------------------
