//! Telemetry: metrics, the typed events that move them (and write their log lines), the
//! `/metrics` `/healthz` `/readyz` server, and logging setup.

pub mod events;
pub mod histogram;
pub mod http;
pub mod logging;
pub mod metrics;

pub use http::Health;
pub use metrics::Metrics;
