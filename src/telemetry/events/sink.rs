//! What every sink reports: whether it answers, its failed and retried attempts.

use std::sync::Arc;

use prometheus::{IntCounter, IntGauge};

use super::{InternalEvent, Lazy};
use crate::telemetry::Metrics;

/// The class of a failed sink attempt (`cdc_invalidator_sink_errors_total{class}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Retried with backoff (a timeout, a connection lost, a 5xx, a 429).
    Retriable,
    /// Not worth retrying (refused credentials, a 4xx): its items are dead-lettered.
    Permanent,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Retriable => "retriable",
            ErrorClass::Permanent => "permanent",
        }
    }
}

/// A sink was built: it counts as down until it first answers (`sink_up` 0).
pub struct SinkBuilt<'a> {
    pub sink: &'a str,
}

impl InternalEvent for SinkBuilt<'_> {
    fn emit(self, metrics: &Metrics) {
        metrics.sink_up.with_label_values(&[self.sink]).set(0);
    }
}

/// A readiness probe of a sink answered (`up`) or not.
pub struct SinkPinged<'a> {
    pub sink: &'a str,
    pub up: bool,
}

impl InternalEvent for SinkPinged<'_> {
    fn emit(self, metrics: &Metrics) {
        metrics.sink_up.with_label_values(&[self.sink]).set(i64::from(self.up));
    }
}

/// The series of one sink, resolved once: its attempts are reported per command or request.
pub struct SinkCounters {
    metrics: Arc<Metrics>,
    name: Arc<str>,
    up: IntGauge,
    retriable: Lazy<IntCounter>,
    permanent: Lazy<IntCounter>,
    retries: Lazy<IntCounter>,
}

impl SinkCounters {
    /// The handles of sink `name` (its `sink_up` series exists from here on).
    pub fn register(metrics: &Arc<Metrics>, name: &str) -> SinkCounters {
        SinkCounters {
            up: metrics.sink_up.with_label_values(&[name]),
            metrics: metrics.clone(),
            name: name.into(),
            retriable: Lazy::new(),
            permanent: Lazy::new(),
            retries: Lazy::new(),
        }
    }

    /// The sink's name, as in its labels.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(super) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Reports `event` through these handles.
    pub fn emit(&self, event: impl SinkEvent) {
        event.emit(self);
    }

    pub(super) fn set_up(&self, up: bool) {
        self.up.set(i64::from(up));
    }

    pub(super) fn count_error(&self, class: ErrorClass) {
        let errors = || self.metrics.sink_errors.with_label_values(&[&self.name, class.as_str()]);
        match class {
            ErrorClass::Retriable => self.retriable.get(errors).inc(),
            ErrorClass::Permanent => self.permanent.get(errors).inc(),
        }
    }

    pub(super) fn count_retry(&self) {
        self.retries.get(|| self.metrics.sink_retries.with_label_values(&[&self.name])).inc();
    }
}

/// Something reported through the pre-resolved series of one sink.
pub trait SinkEvent {
    fn emit(self, sink: &SinkCounters);
}

/// An attempt succeeded: the sink answers.
pub struct AttemptSucceeded;

impl SinkEvent for AttemptSucceeded {
    fn emit(self, sink: &SinkCounters) {
        sink.set_up(true);
    }
}

/// An attempt failed, of `class`; `down` when the failure says the sink does not answer (a
/// refusal of one request does not).
pub struct AttemptFailed {
    pub class: ErrorClass,
    pub down: bool,
}

impl SinkEvent for AttemptFailed {
    fn emit(self, sink: &SinkCounters) {
        if self.down {
            sink.set_up(false);
        }
        sink.count_error(self.class);
    }
}

/// A readiness probe answered (`up`) or not, through the sink's handles.
pub struct Probed {
    pub up: bool,
}

impl SinkEvent for Probed {
    fn emit(self, sink: &SinkCounters) {
        sink.set_up(self.up);
    }
}
