//! Scraping duplex's HTTP endpoint: its port, a plain GET, a series' value on
//! /metrics, and waiting for a series to reach a value.

use super::duplex::Rig;
use super::wait_for;
use std::io::{Read, Write};
use std::time::Duration;

/// The port of `rig`'s metrics and health endpoint, from its config.
pub fn metrics_port(rig: &Rig) -> u16 {
    let cfg = std::fs::read_to_string(&rig.config).unwrap();
    let line = cfg.lines().find(|l| l.starts_with("listen = ")).unwrap();
    line.trim_end_matches('"')
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// GET `path`; (status code, body).
pub fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((
        code,
        text.split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_string(),
    ))
}

/// The value of the series whose line starts with `series` (name and labels as
/// rendered, e.g. `duplex_apply_halted{direction="a_to_b"}`).
pub fn value(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Waits until `series` on /metrics has a value that is `ok`; `what` names it in the
/// timeout message.
pub async fn wait_value(port: u16, series: &str, what: &str, ok: impl Fn(f64) -> bool) {
    wait_for(what, Duration::from_secs(60), || {
        let v = get(port, "/metrics").and_then(|(_, body)| value(&body, series));
        let hit = v.is_some_and(&ok);
        async move { hit.then_some(()) }
    })
    .await;
}
