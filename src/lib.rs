//! # cdc-invalidator
//!
//! Keeps caches honest by reading the database's own change log.
//!
//! ```text
//!   source ──SourceEvent──▶ intake ──Unit──▶ layer 0 ──▶ layer 1 ──▶ layer 2 ──▶ finish
//!   (kafka+debezium,        (batch ▸ rules   (Redis)     (HTTP       (CDNs)      (dead letters,
//!    postgres)               ▸ coalesce)                  caches)                 acks, 2nd pass)
//!      ▲                                                                            │
//!      └──────────────── Ack (after every layer is done with the event) ◀──────────┘
//! ```
//!
//! Each stage is its own task; each layer has its own bounded queue and batching and runs its
//! sinks at once, so a slow CDN never makes Redis stale. The delivery guarantee is enforced in
//! one place: an event's ack travels with it, and only [`pipeline`]'s finish stage calls it.
//!
//! - [`event`]: the one change-event type every source decodes into.
//! - [`source`]: Kafka with Debezium JSON ([`source::kafka`], [`source::debezium`]) and
//!   PostgreSQL logical replication ([`source::postgres`]); each tracks its positions with
//!   [`source::watermark::Watermark`] and acknowledges only what is finished.
//! - [`rules`]: a pure function from a change event to the keys, tags, surrogate keys and URLs
//!   to invalidate.
//! - [`sink`]: the sink trait and its contract (delete only, idempotent, at-least-once, says
//!   when done); [`sink::redis`] and the HTTP caches and CDNs under [`sink::cdn`].
//! - [`pipeline`]: the stages between source and sinks: batching, rules, coalescing, one task
//!   per layer, dead letters ([`dead_letter`]), acknowledgements, the second pass.
//! - [`app`]: builds source, sinks, dead letters and telemetry from the config and runs the
//!   pipeline with hot-reloaded rules until shutdown.
//! - [`telemetry`]: Prometheus metrics, health endpoints, logging; [`telemetry::events`]: one
//!   typed event per thing the daemon reports, whose emission logs and counts together (the
//!   labelled metric families are private to `telemetry`, so call sites go through an event).
//! - [`cli`]: `run`, `check`, `explain` (the user-facing contract) and `replay`.
//! - [`explain`]: what the rules make of one message (`explain`, `replay --dry-run`).
//! - [`replay`]: `cdc-invalidator replay`, dead letters back through the pipeline.
//! - [`purge`]: `cdc-invalidator purge`, items given by hand through the sinks in layer order.
//! - [`config`], [`retry`], [`shutdown`]: the plumbing.

pub mod app;
mod calendar;
pub mod cli;
pub mod config;
pub mod dead_letter;
pub mod event;
pub mod explain;
mod fnv;
pub mod freshness;
pub mod pipeline;
pub mod purge;
pub mod redact;
pub mod replay;
pub mod retry;
pub mod rules;
pub mod shutdown;
pub mod sink;
pub mod source;
pub mod telemetry;
