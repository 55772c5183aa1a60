//! What a Redis sink reports: its commands (failed, retried), its tag and dependents fan-outs,
//! pattern scans, generations, broadcasts and warm-up entries.

use std::fmt::Display;
use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounter, IntGauge};

use super::sink::{AttemptFailed, AttemptSucceeded, ErrorClass, SinkCounters};
use super::Lazy;
use crate::telemetry::Metrics;

/// The module whose logs these are (operators filter on it).
const TARGET: &str = "cdc_invalidator::sink::redis";

/// The series of one Redis sink, resolved once (on first use: a sink without patterns never
/// shows pattern series).
pub struct RedisCounters {
    sink: SinkCounters,
    wait_timeouts: Lazy<IntCounter>,
    tag_members_unlinked: Lazy<IntCounter>,
    dependents_unlinked: Lazy<IntCounter>,
    scan_calls: Lazy<IntCounter>,
    pattern_keys_matched: Lazy<IntCounter>,
    pattern_keys_unlinked: Lazy<IntCounter>,
    pattern_scans_in_flight: Lazy<IntGauge>,
    generations_advanced: Lazy<IntCounter>,
    generations_kept: Lazy<IntCounter>,
    broadcasts: Lazy<IntCounter>,
    broadcast_receivers: Lazy<IntGauge>,
    warm_entries: Lazy<IntCounter>,
}

impl RedisCounters {
    /// The handles of the Redis sink `name`; it counts as down until it first answers.
    pub fn register(metrics: &Arc<Metrics>, name: &str) -> RedisCounters {
        let sink = SinkCounters::register(metrics, name);
        sink.set_up(false);
        RedisCounters {
            sink,
            wait_timeouts: Lazy::new(),
            tag_members_unlinked: Lazy::new(),
            dependents_unlinked: Lazy::new(),
            scan_calls: Lazy::new(),
            pattern_keys_matched: Lazy::new(),
            pattern_keys_unlinked: Lazy::new(),
            pattern_scans_in_flight: Lazy::new(),
            generations_advanced: Lazy::new(),
            generations_kept: Lazy::new(),
            broadcasts: Lazy::new(),
            broadcast_receivers: Lazy::new(),
            warm_entries: Lazy::new(),
        }
    }

    /// Reports `event` through these handles.
    pub fn emit(&self, event: impl RedisEvent) {
        event.emit(self);
    }

    /// The sink-wide handles (`sink_up`, errors, retries).
    pub fn sink(&self) -> &SinkCounters {
        &self.sink
    }

    fn counter<'a>(&self, cell: &'a Lazy<IntCounter>, family: impl FnOnce(&Metrics) -> IntCounter) -> &'a IntCounter {
        cell.get(|| family(self.sink.metrics()))
    }

    /// Keys unlinked through tag fan-out (members of tag sets): counted as each round confirms.
    pub fn tag_members_unlinked(&self) -> &IntCounter {
        let name = self.sink.name();
        self.counter(&self.tag_members_unlinked, |m| m.tag_members_unlinked.with_label_values(&[name]))
    }

    /// Keys unlinked as dependents (members of `<dep_prefix>KEY` sets).
    pub fn dependents_unlinked(&self) -> &IntCounter {
        let name = self.sink.name();
        self.counter(&self.dependents_unlinked, |m| m.redis_more.dependents_unlinked.with_label_values(&[name]))
    }

    /// Patterns of the batch being scanned whose scan is not finished (set per batch, lowered
    /// as each pattern's walk ends).
    pub fn pattern_scans_in_flight(&self) -> &IntGauge {
        let name = self.sink.name();
        self.pattern_scans_in_flight
            .get(|| self.sink.metrics().redis_more.pattern_scans_in_flight.with_label_values(&[name]))
    }
}

/// Something reported through the pre-resolved series of one Redis sink.
pub trait RedisEvent {
    fn emit(self, redis: &RedisCounters);
}

/// A command (or pipeline) round succeeded: Redis answers.
pub struct CommandSucceeded;

impl RedisEvent for CommandSucceeded {
    fn emit(self, redis: &RedisCounters) {
        redis.sink.emit(AttemptSucceeded);
    }
}

/// A command round failed, of `class`; `wait_timeout` when `WAIT` got fewer replicas than
/// `sinks.redis.wait_replicas.count`. Any failure marks the sink down until it answers.
pub struct CommandFailed {
    pub class: ErrorClass,
    pub wait_timeout: bool,
}

impl RedisEvent for CommandFailed {
    fn emit(self, redis: &RedisCounters) {
        redis.sink.emit(AttemptFailed { class: self.class, down: true });
        if self.wait_timeout {
            let name = redis.sink.name();
            redis.counter(&redis.wait_timeouts, |m| m.redis_wait_timeouts.with_label_values(&[name])).inc();
        }
    }
}

/// A failed command will be retried after `wait`; `refused` when Redis refused our credentials
/// or permissions (logged as an error: only an operator fixes it).
pub struct CommandRetried<'a> {
    pub code: &'a str,
    pub attempt: u32,
    pub wait: Duration,
    pub refused: bool,
    pub error: &'a dyn Display,
}

impl RedisEvent for CommandRetried<'_> {
    fn emit(self, redis: &RedisCounters) {
        redis.sink.count_retry();
        let (sink, code, attempt, error) = (redis.sink.name(), self.code, self.attempt, self.error);
        let wait_ms = self.wait.as_millis() as u64;
        if self.refused {
            tracing::error!(target: TARGET, sink, code, attempt, wait_ms, error = %error, "Redis refused our credentials or permissions; retrying")
        } else {
            tracing::warn!(target: TARGET, sink, code, attempt, wait_ms, error = %error, "Redis command failed; retrying")
        }
    }
}

/// `calls` more `SCAN` calls for patterns are allowed by the pace and go out.
pub struct PatternScanCalls {
    pub calls: u32,
}

impl RedisEvent for PatternScanCalls {
    fn emit(self, redis: &RedisCounters) {
        let name = redis.sink.name();
        redis
            .counter(&redis.scan_calls, |m| m.redis_more.scan_calls.with_label_values(&[name]))
            .inc_by(u64::from(self.calls));
    }
}

/// A pattern's walk starts: its matched and unlinked series exist from here on (at 0 while
/// nothing matches), so a dashboard of a pattern that matches nothing reads 0, not "no data".
pub struct PatternWalkStarted;

impl RedisEvent for PatternWalkStarted {
    fn emit(self, redis: &RedisCounters) {
        let name = redis.sink.name();
        redis.counter(&redis.pattern_keys_matched, |m| m.redis_more.pattern_keys_matched.with_label_values(&[name]));
        redis.counter(&redis.pattern_keys_unlinked, |m| m.redis_more.pattern_keys_unlinked.with_label_values(&[name]));
    }
}

/// A page of a pattern's walk returned `keys` keys (before they are unlinked).
pub struct PatternKeysMatched {
    pub keys: u64,
}

impl RedisEvent for PatternKeysMatched {
    fn emit(self, redis: &RedisCounters) {
        let name = redis.sink.name();
        redis
            .counter(&redis.pattern_keys_matched, |m| m.redis_more.pattern_keys_matched.with_label_values(&[name]))
            .inc_by(self.keys);
    }
}

/// UNLINK removed `keys` keys a pattern's walk found.
pub struct PatternKeysUnlinked {
    pub keys: u64,
}

impl RedisEvent for PatternKeysUnlinked {
    fn emit(self, redis: &RedisCounters) {
        let name = redis.sink.name();
        redis
            .counter(&redis.pattern_keys_unlinked, |m| m.redis_more.pattern_keys_unlinked.with_label_values(&[name]))
            .inc_by(self.keys);
    }
}

/// What a generation write did (`cdc_invalidator_redis_generations_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GenerationOutcome {
    /// The key was set to the event's position.
    Advanced,
    /// The key already held a position as high (a redelivery, or an older event).
    Kept,
}

impl GenerationOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            GenerationOutcome::Advanced => "advanced",
            GenerationOutcome::Kept => "kept",
        }
    }
}

/// One generation key written.
pub struct GenerationWritten {
    pub outcome: GenerationOutcome,
}

impl RedisEvent for GenerationWritten {
    fn emit(self, redis: &RedisCounters) {
        let cell = match self.outcome {
            GenerationOutcome::Advanced => &redis.generations_advanced,
            GenerationOutcome::Kept => &redis.generations_kept,
        };
        let name = redis.sink.name();
        redis.counter(cell, |m| m.redis_more.generations.with_label_values(&[name, self.outcome.as_str()])).inc();
    }
}

/// A generation key holds something else than a position: left as it is, its items rejected.
pub struct GenerationKeyWrongType;

impl RedisEvent for GenerationKeyWrongType {
    fn emit(self, redis: &RedisCounters) {
        tracing::warn!(target: "cdc_invalidator::sink::redis::generation", sink = %redis.sink.name(), "a generation key holds something else: left as it is, item rejected");
    }
}

/// Redis accepted a broadcast message; `receivers` subscribers got it (PUBLISH's reply).
pub struct BroadcastSent {
    pub receivers: i64,
}

impl RedisEvent for BroadcastSent {
    fn emit(self, redis: &RedisCounters) {
        let name = redis.sink.name();
        redis.counter(&redis.broadcasts, |m| m.redis_broadcasts.with_label_values(&[name])).inc();
        redis
            .broadcast_receivers
            .get(|| redis.sink.metrics().redis_broadcast_receivers.with_label_values(&[name]))
            .set(self.receivers);
    }
}

/// `entries` entries appended to the warm-up stream.
pub struct WarmEntriesAdded {
    pub entries: u64,
}

impl RedisEvent for WarmEntriesAdded {
    fn emit(self, redis: &RedisCounters) {
        let name = redis.sink.name();
        redis.counter(&redis.warm_entries, |m| m.redis_warm_entries.with_label_values(&[name])).inc_by(self.entries);
    }
}
