//! Metrics and readiness: `names` (every metric's name and HELP text, defined once),
//! `handles` (the series each component registers when it starts and records
//! through), `health` (which components are up, for `/readyz`), `http` (the endpoint
//! serving `/metrics`, `/healthz` and `/readyz`), and the Prometheus recorder
//! [`install`] sets up.

mod handles;
mod health;
mod http;
mod names;

pub use handles::*;
pub use health::*;
pub use http::*;
pub use names::*;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Upper bounds of [`APPLY_COMMIT_TO_APPLY_SECONDS`]' buckets: 1 ms to 10 minutes, fine
/// around the 10–500 ms a healthy direction shows, so `histogram_quantile` is close.
pub const LATENCY_BUCKETS_SECONDS: [f64; 24] = [
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5,
    2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Upper bounds of [`APPLY_BATCH_SECONDS`]' buckets: 1 ms to 1 minute.
pub const BATCH_BUCKETS_SECONDS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Upper bounds of [`APPLY_BATCH_ROWS`]' buckets: 1 row to `sync.batch_rows`' largest
/// useful values.
pub const BATCH_BUCKETS_ROWS: [f64; 14] = [
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 50000.0,
];

/// Installs the global Prometheus recorder. Every histogram is a Prometheus histogram
/// (`_bucket`, `_sum`, `_count`), so that instances aggregate and quantiles are computed
/// by the server.
pub fn install() -> Result<PrometheusHandle, String> {
    use metrics_exporter_prometheus::Matcher;
    let mut builder = PrometheusBuilder::new();
    for (name, buckets) in [
        (APPLY_COMMIT_TO_APPLY_SECONDS, &LATENCY_BUCKETS_SECONDS[..]),
        (APPLY_BATCH_SECONDS, &BATCH_BUCKETS_SECONDS[..]),
        (APPLY_BATCH_ROWS, &BATCH_BUCKETS_ROWS[..]),
    ] {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(name.to_string()), buckets)
            .map_err(|e| e.to_string())?;
    }
    let handle = builder.install_recorder().map_err(|e| e.to_string())?;
    describe();
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(handle)
}
