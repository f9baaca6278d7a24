//! The deployment files pass the validators their formats have, offline: hadolint on
//! the Dockerfile, `systemd-analyze verify` and `security` on the unit,
//! kubernetes-validate on each Kubernetes manifest and on the kustomization as kubectl
//! renders it, docker-compose's `config` on the compose file and promtool on its
//! Prometheus config. The configs they carry load as duplex configs, and the files
//! agree with each other (ports, labels, secrets, mounts). Each validator is also
//! shown to reject a broken input, so that a pass means something.
//!
//! The validators come from `scripts/dev-env install` (`DUPLEX_DEPLOY_TOOLS`, else
//! its cache); systemd-analyze and promtool from Debian's packages. A missing tool
//! fails the test. Nothing here builds an image, starts a container or needs a
//! cluster.

use duplex::config::{password_env_var, Config};
use serde_json::Value;
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

mod compose;
mod image;
mod kubernetes;
mod systemd;

const UID: u64 = 10001;
const METRICS_PORT: u16 = 9187;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A validator `scripts/dev-env install` puts in `DUPLEX_DEPLOY_TOOLS` (by default
/// ~/.cache/duplex/deploy-tools/bin). A check that passed without its tool could
/// never fail, so a missing one fails the test.
fn tool(name: &str) -> PathBuf {
    let dir = match std::env::var_os("DUPLEX_DEPLOY_TOOLS") {
        Some(dir) => PathBuf::from(dir),
        None => std::env::var_os("DUPLEX_CACHE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                    .join(".cache/duplex")
            })
            .join("deploy-tools/bin"),
    };
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{name} not found at {}: run `scripts/dev-env install`, which installs the \
         deployment validators and exports DUPLEX_DEPLOY_TOOLS",
        path.display()
    );
    path
}

/// A tool from Debian's packages, on PATH.
fn system_tool(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!("{name} is not on PATH: run `scripts/dev-env install`, which installs it")
        })
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn said(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every YAML document in `yaml`, as JSON (PyYAML, in the validators' venv).
fn yaml_docs(yaml: &str) -> Vec<Value> {
    let mut child = Command::new(tool("yaml-to-json"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("yaml-to-json");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "yaml-to-json: {}", said(&out));
    match serde_json::from_slice(&out.stdout).unwrap() {
        Value::Array(docs) => docs,
        other => panic!("yaml-to-json gave {other}"),
    }
}

fn yaml_doc(rel: &str) -> Value {
    let mut docs = yaml_docs(&read(rel));
    assert_eq!(docs.len(), 1, "{rel}: one YAML document expected");
    docs.remove(0)
}

/// Parses and validates a duplex config, as `duplex run` does (without the
/// environment's passwords).
fn load_config(what: &str, text: &str) -> Config {
    let mut cfg = Config::parse(text).unwrap_or_else(|e| panic!("{what}: {e}"));
    cfg.apply_env(|_| None);
    cfg.validate().unwrap_or_else(|e| panic!("{what}: {e}"));
    cfg
}

/// A config that listens for metrics on all interfaces, on [`METRICS_PORT`]: what a
/// container needs.
fn assert_listens_everywhere(what: &str, cfg: &Config) {
    let addr = cfg.metrics_listen().unwrap();
    assert!(
        addr.ip().is_unspecified() && addr.port() == METRICS_PORT,
        "{what}: metrics.listen is {addr}, a container needs 0.0.0.0:{METRICS_PORT}"
    );
}

/// config/duplex.example.toml as the Dockerfile turns it into the image's
/// /etc/duplex/duplex.toml (its `sed`).
fn image_config() -> String {
    const FROM: &str = "listen = \"127.0.0.1:9187\"";
    let example = read("config/duplex.example.toml");
    assert!(
        example.lines().any(|l| l.starts_with(FROM)),
        "the Dockerfile rewrites the line starting {FROM} of config/duplex.example.toml"
    );
    example
        .lines()
        .map(|l| match l.strip_prefix(FROM) {
            Some(rest) => format!("listen = \"0.0.0.0:9187\"{rest}\n"),
            None => format!("{l}\n"),
        })
        .collect()
}

// ---- configs ---------------------------------------------------------------------
