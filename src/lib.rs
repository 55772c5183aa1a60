//! # cdc-invalidator
//!
//! Keeps caches honest by reading the database's own change log.
//!
//! ```text
//!   source ──SourceEvent──▶ pipeline ──Invalidations──▶ sinks
//!   (kafka+debezium,        (decode ▸ rules ▸ batch      (redis: UNLINK + tag fan-out,
//!    postgres)               ▸ coalesce ▸ dead letters)   cdn/…: purges)
//!      ▲                                                     │
//!      └───────────── Ack (after every sink is done) ◀──────┘
//! ```
//!
//! - [`event`]: the one change-event type every source decodes into.
//! - [`source`]: Kafka with Debezium JSON ([`source::kafka`], [`source::debezium`]) and
//!   PostgreSQL logical replication ([`source::postgres`]); each tracks its positions with
//!   [`source::watermark::Watermark`] and acknowledges only what is finished.
//! - [`rules`]: a pure function from a change event to the keys, tags, surrogate keys and URLs
//!   to invalidate.
//! - [`sink`]: the sink trait and its contract (delete only, idempotent, at-least-once, says
//!   when done); [`sink::redis`] and the HTTP caches and CDNs under [`sink::cdn`].
//! - [`app`]: the pipeline that wires them together: batching, coalescing, layers in order,
//!   dead letters ([`dead_letter`]), acknowledgements, hot-reloaded rules, shutdown.
//! - [`telemetry`]: Prometheus metrics, health endpoints, logging.
//! - [`cli`]: `run`, `check`, `explain` (the user-facing contract) and `replay`.
//! - [`replay`]: `cdc-invalidator replay`, dead letters back through the pipeline.
//! - [`config`], [`retry`], [`shutdown`]: the plumbing.

pub mod app;
pub mod cli;
pub mod config;
pub mod dead_letter;
pub mod event;
pub mod redact;
pub mod replay;
pub mod retry;
pub mod rules;
pub mod shutdown;
pub mod sink;
pub mod source;
pub mod telemetry;
