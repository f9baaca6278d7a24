//! The end-to-end benchmark's code runs: a tiny run on its own clusters and broker
//! (no timings are asserted; the numbers are meaningless at this size).

use crate::harness::{free_port, temp_dir};
use std::process::Command;

/// Stops the benchmark's nodes and broker however the test ends.
struct Down(Vec<(&'static str, String)>);

impl Drop for Down {
    fn drop(&mut self) {
        let root = env!("CARGO_MANIFEST_DIR");
        let _ = Command::new(format!("{root}/scripts/dev-env"))
            .arg("down")
            .envs(self.0.iter().map(|(k, v)| (*k, v.as_str())))
            .output();
    }
}

#[test]
fn the_end_to_end_benchmark_completes_a_tiny_run() {
    let root = env!("CARGO_MANIFEST_DIR");
    let env = vec![
        (
            "DUPLEX_DEV_ENV_DIR",
            temp_dir("duplex-bench-").display().to_string(),
        ),
        ("DUPLEX_DEMO_PORT_A", free_port().to_string()),
        ("DUPLEX_DEMO_PORT_B", free_port().to_string()),
        ("DUPLEX_DEMO_PORT_KAFKA", free_port().to_string()),
        ("DUPLEX_BENCH_METRICS_PORT", free_port().to_string()),
        ("DUPLEX_BIN", env!("CARGO_BIN_EXE_duplex").to_string()),
    ];
    let _down = Down(env.clone());
    let out = Command::new(format!("{root}/benches/e2e"))
        .args(["200", "100", "2"])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("| inserts, 10 per transaction | 200 |"),
        "{text}"
    );
    assert!(
        text.contains("| 60% update / 20% insert / 20% delete | 200 |"),
        "{text}"
    );
    assert!(text.contains("| 100 | a+b |"), "{text}");
}
