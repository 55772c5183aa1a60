//! What a CDN or HTTP-cache sink reports: purge requests (items, duration, outcome, retries),
//! credentials read again after a refusal, client-side rate-limit waits, verifications.

use std::fmt::Display;
use std::sync::Arc;
use std::time::Duration;

use prometheus::{Counter, Histogram, IntCounter, IntGauge};

use super::sink::{AttemptFailed, AttemptSucceeded, ErrorClass, SinkCounters};
use super::{InternalEvent, Lazy};
use crate::config::secret::Reloaded;
use crate::telemetry::Metrics;

/// The module whose logs these are (operators filter on it).
const TARGET: &str = "cdc_invalidator::sink::cdn::http";

/// How one purge attempt ended (`cdc_invalidator_cdn_requests_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PurgeOutcome {
    Ok,
    /// 429, or the provider's own "slow down" answer: retried.
    RateLimited,
    /// 5xx or an answer that cannot be read: retried.
    ServerError,
    /// No answer (connection, timeout, a body cut short): retried.
    NetworkError,
    /// Refused for good (4xx, refused credentials): the items are dead-lettered.
    Rejected,
}

impl PurgeOutcome {
    const ALL: [PurgeOutcome; 5] = [
        PurgeOutcome::Ok,
        PurgeOutcome::RateLimited,
        PurgeOutcome::ServerError,
        PurgeOutcome::NetworkError,
        PurgeOutcome::Rejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PurgeOutcome::Ok => "ok",
            PurgeOutcome::RateLimited => "rate_limited",
            PurgeOutcome::ServerError => "server_error",
            PurgeOutcome::NetworkError => "network_error",
            PurgeOutcome::Rejected => "rejected",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The series of one CDN sink's purge requests, resolved once (on first use).
pub struct CdnCounters {
    sink: SinkCounters,
    request_items: Lazy<Histogram>,
    in_flight: Lazy<IntGauge>,
    request_duration: Lazy<Histogram>,
    requests: [Lazy<IntCounter>; PurgeOutcome::ALL.len()],
}

impl CdnCounters {
    /// The handles of the sink `name` (its `sink_up` is set by the sink when built, see
    /// [`super::sink::SinkBuilt`]).
    pub fn register(metrics: &Arc<Metrics>, name: &str) -> CdnCounters {
        CdnCounters {
            sink: SinkCounters::register(metrics, name),
            request_items: Lazy::new(),
            in_flight: Lazy::new(),
            request_duration: Lazy::new(),
            requests: Default::default(),
        }
    }

    /// Reports `event` through these handles.
    pub fn emit(&self, event: impl CdnEvent) {
        event.emit(self);
    }

    /// Purge requests of this sink in flight: raised while one is out, lowered when it ends.
    pub fn in_flight(&self) -> &IntGauge {
        let name = self.sink.name();
        self.in_flight.get(|| self.sink.metrics().cdn_in_flight.with_label_values(&[name]))
    }
}

/// Something reported through the pre-resolved series of one CDN sink.
pub trait CdnEvent {
    fn emit(self, cdn: &CdnCounters);
}

/// A purge request of `items` items is about to go out (its attempts follow).
pub struct PurgeRequestBuilt {
    pub items: usize,
}

impl CdnEvent for PurgeRequestBuilt {
    fn emit(self, cdn: &CdnCounters) {
        let name = cdn.sink.name();
        cdn.request_items
            .get(|| cdn.sink.metrics().cdn_request_items.with_label_values(&[name]))
            .observe(self.items as f64);
    }
}

/// One purge attempt ended with `outcome` after `took`; `class` of its failure, if it failed
/// (a retriable failure also says the sink does not answer; a rejection does not).
pub struct PurgeAttempted {
    pub took: Duration,
    pub outcome: PurgeOutcome,
    pub failure: Option<ErrorClass>,
}

impl CdnEvent for PurgeAttempted {
    fn emit(self, cdn: &CdnCounters) {
        let (name, metrics) = (cdn.sink.name(), cdn.sink.metrics());
        cdn.request_duration
            .get(|| metrics.cdn_request_duration.with_label_values(&[name]))
            .observe(self.took.as_secs_f64());
        if let Some(cell) = cdn.requests.get(self.outcome.index()) {
            cell.get(|| metrics.cdn_requests.with_label_values(&[name, self.outcome.as_str()])).inc();
        }
        match self.failure {
            None => cdn.sink.emit(AttemptSucceeded),
            Some(class) => cdn.sink.emit(AttemptFailed { class, down: class == ErrorClass::Retriable }),
        }
    }
}

/// A failed purge attempt will be retried after `wait`.
pub struct PurgeRetried<'a> {
    pub attempt: u32,
    pub wait: Duration,
    pub error: &'a dyn Display,
}

impl CdnEvent for PurgeRetried<'_> {
    fn emit(self, cdn: &CdnCounters) {
        cdn.sink.count_retry();
        let (sink, attempt, error) = (cdn.sink.name(), self.attempt, self.error);
        tracing::warn!(target: TARGET, sink, attempt, wait_ms = self.wait.as_millis() as u64, error = %error, "purge request failed; retrying");
    }
}

/// The provider refused the credentials (`refusal`: its message); they were read again.
pub struct CredentialsReloaded<'a> {
    pub reloaded: &'a Reloaded,
    pub refusal: &'a str,
}

impl CdnEvent for CredentialsReloaded<'_> {
    fn emit(self, cdn: &CdnCounters) {
        let sink = cdn.sink.name();
        cdn.sink.metrics().credential_reloads.with_label_values(&[sink, self.reloaded.as_str()]).inc();
        match self.reloaded {
            Reloaded::Changed => {
                tracing::info!(target: TARGET, sink, error = %self.refusal, "the provider refused the credentials; they changed since, so the request goes once more with the new ones")
            }
            Reloaded::Unchanged => {}
            Reloaded::Failed(why) => {
                tracing::warn!(target: TARGET, sink, error = %why, "the provider refused the credentials and they cannot be read again")
            }
        }
    }
}

/// The counter of seconds sink `sink` waits on its client-side rate limit (its token bucket
/// adds to it as it waits).
pub fn rate_limit_wait(metrics: &Metrics, sink: &str) -> Counter {
    metrics.cdn_rate_limit_wait.with_label_values(&[sink])
}

/// How a post-purge freshness check ended (`cdc_invalidator_cdn_verifications_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerificationOutcome {
    /// The cache serves a copy newer than the purge.
    Fresh,
    /// The cache still serves a copy older than the purge.
    Stale,
    /// The answer did not say which.
    Inconclusive,
    /// The check itself failed.
    Error,
    /// Not checked: every verification slot was busy.
    Skipped,
}

impl VerificationOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            VerificationOutcome::Fresh => "fresh",
            VerificationOutcome::Stale => "stale",
            VerificationOutcome::Inconclusive => "inconclusive",
            VerificationOutcome::Error => "error",
            VerificationOutcome::Skipped => "skipped",
        }
    }
}

/// A post-purge freshness check of sink `sink` ended (or was skipped).
pub struct Verified<'a> {
    pub sink: &'a str,
    pub outcome: VerificationOutcome,
}

impl InternalEvent for Verified<'_> {
    fn emit(self, metrics: &Metrics) {
        metrics.cdn_verifications.with_label_values(&[self.sink, self.outcome.as_str()]).inc();
        if self.outcome == VerificationOutcome::Stale {
            // Keys and URLs stay out of logs; the sink name is configuration.
            tracing::warn!(target: "cdc_invalidator::sink::cdn::verify", sink = %self.sink, "verification: the cache still serves a copy older than the purge");
        }
    }
}
