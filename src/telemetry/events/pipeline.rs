//! What the pipeline reports: batches, events by outcome, each layer's queue, each sink's
//! batches and staleness, rule errors, the second pass.

use std::time::Duration;

use prometheus::{Counter, IntGauge};

use super::InternalEvent;
use crate::sink::ItemKind;
use crate::telemetry::histogram::BatchHistogram;
use crate::telemetry::Metrics;

/// The load a batch was gathered under (`cdc_invalidator_batches_total{load}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchLoad {
    /// Sent at once with what was queued.
    Light,
    /// Gathered while catching up.
    Backlog,
}

impl BatchLoad {
    pub const ALL: [BatchLoad; 2] = [BatchLoad::Light, BatchLoad::Backlog];

    pub fn as_str(self) -> &'static str {
        match self {
            BatchLoad::Light => "light",
            BatchLoad::Backlog => "backlog",
        }
    }
}

/// A batch was opened under `load`.
pub struct BatchGathered {
    pub load: BatchLoad,
}

impl InternalEvent for BatchGathered {
    fn emit(self, metrics: &Metrics) {
        metrics.batches.with_label_values(&[self.load.as_str()]).inc();
    }
}

/// What became of a source message (`cdc_invalidator_events_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventOutcome {
    /// Every item it asked for was invalidated.
    Invalidated,
    /// No rule matched it.
    NoMatch,
    /// Not a change (a heartbeat, a schema change, a tombstone).
    NoChange,
    /// Malformed: the whole message went to the dead-letter destination.
    DeadLettered,
    /// Invalidated what rendered; the rest was dead-lettered.
    Partial,
}

impl EventOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            EventOutcome::Invalidated => "invalidated",
            EventOutcome::NoMatch => "no_match",
            EventOutcome::NoChange => "no_change",
            EventOutcome::DeadLettered => "dead_lettered",
            EventOutcome::Partial => "partial",
        }
    }
}

/// `count` source messages of `table` and `op` were finished with `outcome` (the finish stage
/// gathers a unit's messages per label set and reports each set once).
pub struct EventsFinished<'a> {
    pub table: &'a str,
    pub op: &'static str,
    pub outcome: EventOutcome,
    pub count: u64,
}

impl InternalEvent for EventsFinished<'_> {
    fn emit(self, metrics: &Metrics) {
        metrics.events.with_label_values(&[self.table, self.op, self.outcome.as_str()]).inc_by(self.count);
    }
}

/// Seconds from the database commit to an event of `table` finished by every sink: the
/// handle of one table, resolved once per unit and table.
pub fn table_staleness(metrics: &Metrics, table: &str) -> BatchHistogram {
    metrics.table_staleness.with_label_values(&[table])
}

/// Seconds from the database commit to the last pass confirmed by sink `sink`: the handle of
/// one sink, resolved once per unit or second pass.
pub fn settled(metrics: &Metrics, sink: &str) -> BatchHistogram {
    metrics.settled.with_label_values(&[sink])
}

/// The handles of one layer's queue: events queued, seconds waited for room.
pub fn layer_queue(metrics: &Metrics, layer: u8) -> (IntGauge, Counter) {
    let label = layer.to_string();
    (metrics.layer_queue_events.with_label_values(&[&label]), metrics.layer_queue_wait.with_label_values(&[&label]))
}

/// Sink `sink` finished one batch in `took`, confirming `confirmed` items of each kind.
pub struct SinkBatchFinished<'a> {
    pub sink: &'a str,
    pub took: Duration,
    pub confirmed: &'a [(ItemKind, u64)],
}

impl InternalEvent for SinkBatchFinished<'_> {
    fn emit(self, metrics: &Metrics) {
        metrics.sink_batch_duration.with_label_values(&[self.sink]).observe(self.took.as_secs_f64());
        for (kind, n) in self.confirmed {
            metrics.invalidations.with_label_values(&[self.sink, kind.as_str()]).inc_by(*n);
        }
    }
}

/// The handles of sink `sink`'s staleness (seconds from the database commit to its
/// confirmation) and processing time (from the event entering the daemon), resolved once per
/// batch and observed per event.
pub fn sink_latency(metrics: &Metrics, sink: &str) -> (BatchHistogram, BatchHistogram) {
    (metrics.staleness.with_label_values(&[sink]), metrics.processing.with_label_values(&[sink]))
}

/// A template of rule `rule` rendered for no row image of an event of `table`. Counted each
/// time; logged when `log` (the stage logs a rule's errors at most every 10 s).
pub struct RuleFailed<'a> {
    pub rule: &'a str,
    pub table: &'a str,
    pub position: &'a dyn std::fmt::Display,
    pub message: &'a str,
    pub log: bool,
}

impl InternalEvent for RuleFailed<'_> {
    fn emit(self, metrics: &Metrics) {
        metrics.rule_errors.with_label_values(&[self.rule]).inc();
        if self.log {
            tracing::warn!(
                target: "cdc_invalidator::pipeline",
                rule = %self.rule,
                table = self.table,
                position = %self.position,
                "rule error (dead-lettered; further errors of this rule are logged at most every 10s): {}",
                self.message
            );
        }
    }
}

/// A second pass of sink `sink` is done: it removed `refilled` keys again (readers had refilled
/// them in between) and `rejected` items were refused again (dead-lettered by the first pass).
pub struct SecondPassDone<'a> {
    pub sink: &'a str,
    pub refilled: u64,
    pub rejected: usize,
}

impl InternalEvent for SecondPassDone<'_> {
    fn emit(self, metrics: &Metrics) {
        if self.refilled > 0 {
            metrics.second_pass_refills.with_label_values(&[self.sink]).inc_by(self.refilled);
        }
        if self.rejected > 0 {
            tracing::warn!(
                target: "cdc_invalidator::pipeline::second_pass",
                sink = self.sink,
                rejected = self.rejected,
                "second pass: items rejected again (dead-lettered by the first pass)"
            );
        }
    }
}
