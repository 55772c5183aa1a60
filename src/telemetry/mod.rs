//! Telemetry: metrics, the `/metrics` `/healthz` `/readyz` server, and logging setup.

pub mod http;
pub mod logging;
pub mod metrics;

pub use http::Health;
pub use metrics::Metrics;
