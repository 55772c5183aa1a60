//! Each event moves the series operators, dashboards and alerts read (same names, same label
//! values as before events existed), read back from the registry; events that log write their
//! line with the same emission.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::dead_letter::{DeadLetterWriteFailed, DeadLettersWritten};
use super::pipeline::{BatchGathered, BatchLoad, EventOutcome, EventsFinished, RuleFailed, SecondPassDone};
use super::sink::{AttemptFailed, AttemptSucceeded, ErrorClass, Probed, SinkBuilt, SinkCounters};
use super::sink_cdn::{CdnCounters, PurgeAttempted, PurgeOutcome, PurgeRequestBuilt, VerificationOutcome, Verified};
use super::sink_redis::{
    CommandFailed, CommandRetried, GenerationOutcome, GenerationWritten, PatternWalkStarted, RedisCounters,
};
use super::source::{CommitStage, OffsetCommitFailed, OffsetsCommitted, PostgresRole, PostgresRoleChanged};
use crate::dead_letter::Reason;
use crate::telemetry::Metrics;

/// The log lines written while `f` runs (this thread only).
fn logs(f: impl FnOnce()) -> String {
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);
    impl Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let bytes = buffer.0.lock().map(|b| b.clone()).unwrap_or_default();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[test]
fn events_finished_counts_table_op_and_outcome() {
    let m = Metrics::new();
    m.emit(EventsFinished { table: "public.users", op: "u", outcome: EventOutcome::NoMatch, count: 3 });
    m.emit(EventsFinished { table: "public.users", op: "u", outcome: EventOutcome::DeadLettered, count: 1 });
    let events = "cdc_invalidator_events_total";
    assert_eq!(m.value(events, &[("table", "public.users"), ("op", "u"), ("outcome", "no_match")]), 3.0);
    assert_eq!(m.value(events, &[("outcome", "dead_lettered")]), 1.0);
    assert_eq!(m.value(events, &[]), 4.0);
}

#[test]
fn batches_count_by_load_and_both_series_exist_from_the_start() {
    let m = Metrics::new();
    assert!(m.render().contains("cdc_invalidator_batches_total{load=\"backlog\"} 0"));
    m.emit(BatchGathered { load: BatchLoad::Light });
    assert_eq!(m.value("cdc_invalidator_batches_total", &[("load", "light")]), 1.0);
    assert_eq!(m.value("cdc_invalidator_batches_total", &[("load", "backlog")]), 0.0);
}

#[test]
fn a_rule_error_is_always_counted_and_logged_only_when_asked() {
    let m = Metrics::new();
    let failed = |log| RuleFailed { rule: "users", table: "public.users", position: &"0/1", message: "no id", log };
    let first = logs(|| m.emit(failed(true)));
    let second = logs(|| m.emit(failed(false)));
    assert!(first.contains("rule error (dead-lettered") && first.contains("rule=users"), "{first}");
    assert!(second.is_empty(), "{second}");
    assert_eq!(m.value("cdc_invalidator_rule_errors_total", &[("rule", "users")]), 2.0);
}

#[test]
fn a_failed_commit_logs_and_counts_in_one_emission() {
    let m = Metrics::new();
    let text = logs(|| m.emit(OffsetCommitFailed { stage: CommitStage::Callback, error: &"broker gone" }));
    assert!(text.contains("offset commit failed; retrying on the next tick"), "{text}");
    assert!(text.contains("cdc_invalidator::source::kafka::context"), "the call site's target is kept: {text}");
    m.emit(OffsetsCommitted { partitions: None });
    assert_eq!(m.value("cdc_invalidator_source_commits_total", &[("outcome", "error")]), 1.0);
    assert_eq!(m.value("cdc_invalidator_source_commits_total", &[("outcome", "ok")]), 1.0);
}

#[test]
fn the_postgres_role_sets_one_role_and_readiness() {
    let m = Metrics::new();
    m.emit(PostgresRoleChanged { role: Some(PostgresRole::Standby) });
    assert_eq!(m.value("cdc_invalidator_postgres_role", &[("role", "standby")]), 1.0);
    assert_eq!(m.value("cdc_invalidator_postgres_role", &[("role", "active")]), 0.0);
    assert_eq!(m.source_ready.get(), 0);
    m.emit(PostgresRoleChanged { role: Some(PostgresRole::Active) });
    assert_eq!(m.value("cdc_invalidator_postgres_role", &[("role", "standby")]), 0.0);
    assert_eq!(m.source_ready.get(), 1);
}

#[test]
fn dead_letters_count_by_reason() {
    let m = Metrics::new();
    let reasons = [Reason::Malformed, Reason::SinkRejected, Reason::SinkRejected];
    m.emit(DeadLettersWritten { reasons: &mut reasons.into_iter() });
    assert_eq!(m.value("cdc_invalidator_dead_letters_total", &[("reason", "sink_rejected")]), 2.0);
    assert_eq!(m.value("cdc_invalidator_dead_letters_total", &[("reason", "malformed")]), 1.0);
    let text = logs(|| m.emit(DeadLetterWriteFailed { error: &"disk full", attempt: 2, wait: Duration::ZERO }));
    assert!(text.contains("dead-letter write failed; retrying"), "{text}");
    assert_eq!(m.dead_letter_errors.get(), 1);
}

#[test]
fn sink_counters_count_attempts_by_class_and_track_up() {
    let m = Arc::new(Metrics::new());
    m.emit(SinkBuilt { sink: "cache" });
    let sink = SinkCounters::register(&m, "cache");
    assert_eq!(m.value("cdc_invalidator_sink_up", &[("sink", "cache")]), 0.0);
    sink.emit(AttemptSucceeded);
    assert_eq!(m.value("cdc_invalidator_sink_up", &[("sink", "cache")]), 1.0);
    // A refused request does not say the sink is down; a retriable failure does.
    sink.emit(AttemptFailed { class: ErrorClass::Permanent, down: false });
    assert_eq!(m.value("cdc_invalidator_sink_up", &[("sink", "cache")]), 1.0);
    sink.emit(AttemptFailed { class: ErrorClass::Retriable, down: true });
    sink.emit(AttemptFailed { class: ErrorClass::Retriable, down: true });
    assert_eq!(m.value("cdc_invalidator_sink_up", &[("sink", "cache")]), 0.0);
    let errors = "cdc_invalidator_sink_errors_total";
    assert_eq!(m.value(errors, &[("sink", "cache"), ("class", "retriable")]), 2.0);
    assert_eq!(m.value(errors, &[("sink", "cache"), ("class", "permanent")]), 1.0);
    sink.emit(Probed { up: true });
    assert_eq!(m.value("cdc_invalidator_sink_up", &[("sink", "cache")]), 1.0);
}

#[test]
fn redis_counters_resolve_series_on_first_use_only() {
    let m = Arc::new(Metrics::new());
    let redis = RedisCounters::register(&m, "redis");
    // Nothing reported yet: the exposition has no generation or wait series (as before events).
    assert!(!m.render().contains("cdc_invalidator_redis_generations_total{"));
    redis.emit(PatternWalkStarted);
    assert!(m.render().contains("cdc_invalidator_redis_pattern_keys_matched_total{sink=\"redis\"} 0"));
    let text = logs(|| {
        redis.emit(CommandFailed { class: ErrorClass::Retriable, wait_timeout: true });
        redis.emit(CommandRetried {
            code: "response_timeout",
            attempt: 1,
            wait: Duration::from_millis(5),
            refused: false,
            error: &"timed out",
        });
    });
    assert!(text.contains("Redis command failed; retrying") && text.contains("WARN"), "{text}");
    redis.emit(GenerationWritten { outcome: GenerationOutcome::Advanced });
    redis.emit(GenerationWritten { outcome: GenerationOutcome::Kept });
    redis.emit(GenerationWritten { outcome: GenerationOutcome::Kept });
    let gens = "cdc_invalidator_redis_generations_total";
    assert_eq!(m.value(gens, &[("sink", "redis"), ("outcome", "advanced")]), 1.0);
    assert_eq!(m.value(gens, &[("sink", "redis"), ("outcome", "kept")]), 2.0);
    assert_eq!(m.value("cdc_invalidator_redis_wait_timeouts_total", &[("sink", "redis")]), 1.0);
    assert_eq!(m.value("cdc_invalidator_sink_retries_total", &[("sink", "redis")]), 1.0);
    assert_eq!(m.value("cdc_invalidator_sink_errors_total", &[("class", "retriable")]), 1.0);
    assert_eq!(m.value("cdc_invalidator_sink_up", &[("sink", "redis")]), 0.0);
}

#[test]
fn refused_credentials_are_logged_as_an_error() {
    let m = Arc::new(Metrics::new());
    let redis = RedisCounters::register(&m, "redis");
    let text = logs(|| {
        redis.emit(CommandRetried { code: "noperm", attempt: 3, wait: Duration::ZERO, refused: true, error: &"NOPERM" })
    });
    assert!(text.contains("ERROR") && text.contains("Redis refused our credentials"), "{text}");
}

#[test]
fn purge_attempts_count_by_outcome_and_class() {
    let m = Arc::new(Metrics::new());
    let cdn = CdnCounters::register(&m, "fastly");
    cdn.emit(PurgeRequestBuilt { items: 40 });
    let attempt = |outcome, failure| PurgeAttempted { took: Duration::from_millis(20), outcome, failure };
    cdn.emit(attempt(PurgeOutcome::RateLimited, Some(ErrorClass::Retriable)));
    cdn.emit(attempt(PurgeOutcome::Ok, None));
    cdn.emit(attempt(PurgeOutcome::Rejected, Some(ErrorClass::Permanent)));
    let requests = "cdc_invalidator_cdn_requests_total";
    for (outcome, n) in [("rate_limited", 1.0), ("ok", 1.0), ("rejected", 1.0), ("server_error", 0.0)] {
        assert_eq!(m.value(requests, &[("sink", "fastly"), ("outcome", outcome)]), n, "{outcome}");
    }
    assert_eq!(m.value("cdc_invalidator_cdn_request_items", &[("sink", "fastly")]), 1.0);
    assert_eq!(m.value("cdc_invalidator_cdn_request_duration_seconds", &[("sink", "fastly")]), 3.0);
    assert_eq!(m.value("cdc_invalidator_sink_errors_total", &[("sink", "fastly"), ("class", "permanent")]), 1.0);
    // The rejection came after the success: the sink still answers.
    assert_eq!(m.value("cdc_invalidator_sink_up", &[("sink", "fastly")]), 1.0);
}

#[test]
fn a_stale_verification_is_counted_and_logged() {
    let m = Metrics::new();
    let text = logs(|| {
        m.emit(Verified { sink: "cdn", outcome: VerificationOutcome::Stale });
        m.emit(Verified { sink: "cdn", outcome: VerificationOutcome::Skipped });
    });
    assert!(text.contains("verification: the cache still serves a copy older than the purge"), "{text}");
    assert_eq!(text.lines().count(), 1, "{text}");
    let v = "cdc_invalidator_cdn_verifications_total";
    assert_eq!(m.value(v, &[("sink", "cdn"), ("outcome", "stale")]), 1.0);
    assert_eq!(m.value(v, &[("sink", "cdn"), ("outcome", "skipped")]), 1.0);
}

#[test]
fn a_second_pass_counts_refills_and_logs_repeated_rejections() {
    let m = Metrics::new();
    let quiet = logs(|| m.emit(SecondPassDone { sink: "redis", refilled: 0, rejected: 0 }));
    assert!(quiet.is_empty(), "{quiet}");
    assert!(!m.render().contains("cdc_invalidator_second_pass_refills_total{"), "no series for nothing refilled");
    let text = logs(|| m.emit(SecondPassDone { sink: "redis", refilled: 4, rejected: 1 }));
    assert!(text.contains("second pass: items rejected again"), "{text}");
    assert_eq!(m.value("cdc_invalidator_second_pass_refills_total", &[("sink", "redis")]), 4.0);
}
