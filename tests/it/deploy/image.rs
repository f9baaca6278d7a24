//! The container image: the Dockerfile passes hadolint, and the configs the deployment
//! files carry load as duplex configs.

use super::*;
#[test]
fn deploy_configs_load_as_duplex_configs() {
    let image = load_config("the image's config", &image_config());
    assert_listens_everywhere("the image's config", &image);
    for rel in [
        "deploy/kubernetes/duplex.toml",
        "deploy/compose/duplex.toml",
    ] {
        let cfg = load_config(rel, &read(rel));
        assert_listens_everywhere(rel, &cfg);
    }
    // The systemd environment file names the example config's nodes.
    let env = read("deploy/systemd/duplex.env.example");
    for node in image.nodes.keys() {
        let var = format!("{}=", password_env_var(node));
        assert!(
            env.lines().any(|l| l.starts_with(&var)),
            "duplex.env.example lacks {var}"
        );
    }
}

// ---- Dockerfile --------------------------------------------------------------------

#[test]
fn dockerfile_passes_hadolint() {
    let out = run(Command::new(tool("hadolint"))
        .arg("--no-color")
        .arg(root().join("Dockerfile")));
    assert!(
        out.status.success() && out.stdout.is_empty(),
        "hadolint:\n{}",
        said(&out)
    );
    let dockerfile = read("Dockerfile");
    // The dependency layer builds stubs; Cargo refuses a manifest with a declared
    // target whose file is missing, so every bench and test needs one.
    let manifest: toml::Table = toml::from_str(&read("Cargo.toml")).unwrap();
    for (kind, dir) in [("bench", "benches"), ("test", "tests")] {
        let targets = manifest.get(kind).and_then(|t| t.as_array());
        for target in targets.into_iter().flatten() {
            let name = target.get("name").and_then(|n| n.as_str()).unwrap();
            let path = target
                .get("path")
                .and_then(|p| p.as_str())
                .map(String::from)
                .unwrap_or_else(|| format!("{dir}/{name}.rs"));
            assert!(
                dockerfile.contains(&path),
                "the Dockerfile's dependency layer needs a stub for {path}"
            );
        }
    }
    for line in [
        "FROM debian:bookworm-slim".to_string(),
        format!("USER {UID}:{UID}"),
        format!("EXPOSE {METRICS_PORT}"),
        r#"ENTRYPOINT ["duplex"]"#.to_string(),
        r#"CMD ["run", "--config", "/etc/duplex/duplex.toml"]"#.to_string(),
    ] {
        assert!(
            dockerfile.lines().any(|l| l == line),
            "Dockerfile lacks {line}"
        );
    }
    // The build context keeps what the Dockerfile copies and leaves out the rest.
    let dockerignore = read(".dockerignore");
    let ignored: BTreeSet<&str> = dockerignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/'))
        .collect();
    let copied: BTreeSet<&str> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("COPY "))
        .filter(|l| !l.starts_with("--from"))
        .flat_map(|l| {
            let mut words: Vec<&str> = l.split_whitespace().collect();
            words.pop(); // the destination
            words
        })
        .collect();
    let expected: BTreeSet<&str> = ["Cargo.toml", "Cargo.lock", "src", "config"]
        .into_iter()
        .collect();
    assert_eq!(
        copied, expected,
        "what the Dockerfile copies from the context"
    );
    for needed in copied {
        assert!(
            !ignored.contains(needed) && !ignored.contains("*"),
            ".dockerignore leaves {needed} out of the build"
        );
    }
    for big in ["target", ".git", ".dev-env", "fuzz"] {
        assert!(
            ignored.contains(big),
            ".dockerignore should leave out {big}"
        );
    }
}

#[test]
fn hadolint_rejects_a_broken_dockerfile() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text, expect) in [
        (
            "Dockerfile.parse",
            "FROM debian:bookworm-slim\nCOPYY a b\n",
            "",
        ),
        (
            "Dockerfile.lint",
            "FROM debian:bookworm-slim\nRUN apt-get update && apt-get install -y curl\n",
            "DL3015",
        ),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let out = run(Command::new(tool("hadolint")).arg("--no-color").arg(path));
        let text = said(&out);
        assert!(
            !out.status.success() && !text.is_empty() && text.contains(expect),
            "hadolint accepted {name}: {text}"
        );
    }
}

// ---- systemd -----------------------------------------------------------------------
