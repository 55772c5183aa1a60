//! Everything the daemon reports, one typed event per thing (as Vector's `internal_events`).
//!
//! An event is a struct with named, typed fields; emitting it writes its log line (if it has
//! one) and moves its metric series together, so a call site cannot mislabel a metric (labels
//! are fields, reasons and outcomes are enums with `as_str()`: bounded by construction) and the
//! log and the metric cannot drift apart. The labelled metric families of [`Metrics`] are
//! private to `crate::telemetry`: a new thing to report is a new event struct in the file of
//! its component here, never a `with_label_values` at the call site.
//!
//! Two shapes, as in Vector:
//! - [`InternalEvent`]: emitted once, looks its series up on emission (`metrics.emit(Event {..})`).
//!   For things that happen per batch or rarer.
//! - Registered handles (`SinkCounters`, `RedisCounters`, `CdnCounters`, `LayerQueue`, ...):
//!   the series of one component resolved once (at construction, or on first use so that a
//!   series still appears only once it has something to say), for paths that report per event,
//!   per command or per request. A lookup hashes the labels and takes a lock; a handle is an
//!   atomic add.
//!
//! Logs keep the target of the module that reports them (`target:` below), so a log filter
//! such as `cdc_invalidator::sink::redis=debug` selects the same lines as before.
//!
//! One file per component: [`source`], [`pipeline`], [`sink`] (every sink), [`sink_redis`],
//! [`sink_cdn`], [`freshness`], [`rules`], [`dead_letter`].

pub mod dead_letter;
pub mod freshness;
pub mod pipeline;
pub mod rules;
pub mod sink;
pub mod sink_cdn;
pub mod sink_redis;
pub mod source;

use std::sync::OnceLock;

use super::Metrics;

/// Something the daemon reports: its log line and its metric series, written together.
pub trait InternalEvent {
    fn emit(self, metrics: &Metrics);
}

impl Metrics {
    /// Reports `event`: `metrics.emit(RebalanceAssigned { partitions })`.
    pub fn emit(&self, event: impl InternalEvent) {
        event.emit(self);
    }
}

/// A series handle resolved on first use: the exposition stays as it was (a labelled series
/// appears when first moved, not when its component is built), and every later use is the
/// atomic operation alone.
pub(super) struct Lazy<M>(OnceLock<M>);

impl<M> Lazy<M> {
    pub(super) const fn new() -> Lazy<M> {
        Lazy(OnceLock::new())
    }

    pub(super) fn get(&self, resolve: impl FnOnce() -> M) -> &M {
        self.0.get_or_init(resolve)
    }
}

impl<M> Default for Lazy<M> {
    fn default() -> Self {
        Lazy::new()
    }
}

#[cfg(test)]
mod tests;
