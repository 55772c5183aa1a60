//! Telemetry: metrics, the `/metrics` `/healthz` `/readyz` server, and logging setup.

pub mod metrics;

pub use metrics::Metrics;
