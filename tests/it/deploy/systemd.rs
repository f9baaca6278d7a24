//! The systemd unit: `systemd-analyze verify` and `security --offline`.

use super::*;
const UNIT: &str = "deploy/systemd/duplex.service";
const EXEC_START: &str = "ExecStart=/usr/local/bin/duplex run --config /etc/duplex/duplex.toml";

/// `unit` written to `dir/name` with ExecStart on the built binary: verify checks
/// that the program exists.
fn unit_copy(dir: &Path, name: &str, unit: &str) -> PathBuf {
    let exec = format!("ExecStart={} ", env!("CARGO_BIN_EXE_duplex"));
    let path = dir.join(name);
    std::fs::write(
        &path,
        unit.replace("ExecStart=/usr/local/bin/duplex ", &exec),
    )
    .unwrap();
    path
}

/// `systemd-analyze verify`: Ok, or what it said. It exits 0 on an unknown key or a
/// value it cannot parse (it warns and ignores them), so whatever it says about the
/// unit counts as a failure.
fn verify_unit(path: &Path) -> Result<(), String> {
    let out = run(Command::new(system_tool("systemd-analyze"))
        .args(["verify", "--man=no", "--recursive-errors=no"])
        .arg(path));
    let text = said(&out);
    let name = path.file_name().unwrap().to_str().unwrap();
    if out.status.success() && !text.contains(name) {
        Ok(())
    } else {
        Err(text)
    }
}

/// `systemd-analyze security --offline`: (exit status success, the overall line).
/// The threshold is in tenths: 20 fails a unit whose exposure is over 2.0 ("OK" ends
/// at 4.9, 10 is "UNSAFE").
fn security(path: &Path) -> (bool, String) {
    let out = run(Command::new(system_tool("systemd-analyze"))
        .args(["security", "--offline=yes", "--threshold=20", "--no-pager"])
        .arg(path));
    let text = said(&out);
    let overall = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"))
        .to_string();
    (out.status.success(), overall)
}

#[test]
fn systemd_unit_passes_verify_and_security() {
    let unit = read(UNIT);
    for line in [
        EXEC_START,
        "Type=simple",
        "EnvironmentFile=/etc/duplex/duplex.env",
        "Restart=on-failure",
        "RestartPreventExitStatus=2",
        "KillSignal=SIGTERM",
        "StandardOutput=journal",
    ] {
        assert!(unit.lines().any(|l| l == line), "{UNIT} lacks {line}");
    }
    let stop = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .and_then(|v| v.strip_suffix('s'))
        .and_then(|v| v.parse::<u64>().ok())
        .expect("TimeoutStopSec=<seconds>s");
    assert!(
        stop > 60,
        "duplex may take 60 s to stop; TimeoutStopSec={stop}s"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = unit_copy(dir.path(), "duplex.service", &unit);
    if let Err(e) = verify_unit(&path) {
        panic!("systemd-analyze verify {UNIT}:\n{e}");
    }
    let (ok, overall) = security(&path);
    eprintln!("{UNIT}: {overall}");
    assert!(ok, "{UNIT} is exposed more than 2.0: {overall}");
}

#[test]
fn systemd_analyze_rejects_a_broken_unit() {
    let unit = read(UNIT);
    let dir = tempfile::tempdir().unwrap();
    for (name, from, to) in [
        (
            "bad-value.service",
            "Restart=on-failure",
            "Restart=sometimes",
        ),
        ("bad-key.service", "KillMode=mixed", "KilMode=mixed"),
        (
            "no-exec.service",
            EXEC_START,
            "ExecStart=/nonexistent/duplex run",
        ),
    ] {
        assert!(unit.contains(from), "{UNIT} lacks {from}");
        let path = unit_copy(dir.path(), name, &unit.replace(from, to));
        assert!(verify_unit(&path).is_err(), "verify accepted {name}");
    }
    let bare = unit_copy(
        dir.path(),
        "bare.service",
        &format!("[Service]\n{EXEC_START}\n"),
    );
    assert!(verify_unit(&bare).is_ok());
    let (ok, overall) = security(&bare);
    assert!(!ok, "security accepted a unit without hardening: {overall}");
}

// ---- Kubernetes --------------------------------------------------------------------
