//! Every metric the daemon exports, in one registry per pipeline (so tests can run several
//! pipelines in one process and read each one's figures).
//!
//! Names start with `cdc_invalidator_`, use base units (`_seconds`, `_bytes`), counters end in
//! `_total`, and labels only ever carry bounded values: table, op, sink name, item kind, reason,
//! rule name, topic and partition. Never a key, a URL or a row value.
//!
//! The labelled families are private to `crate::telemetry`: they move only through the typed
//! events of [`super::events`], which log and count together and cannot mislabel a series.
//! The unlabelled gauges and counters stay public (nothing to mislabel).

use super::histogram::{self, BatchHistogram, BatchHistogramVec};
use prometheus::{
    CounterVec, Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Staleness buckets: from sub-millisecond (Redis on loopback) to minutes (a CDN backlog), dense
/// between 5 and 50 ms where a healthy Redis path lives, so p99 SLOs (e.g. 25 ms) can be read
/// off the histogram with millisecond resolution.
const STALENESS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.0225, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0];
const DURATION_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

pub struct Metrics {
    registry: Registry,
    /// Source messages by table, op and outcome (`invalidated`, `no_match`, `no_change`,
    /// `dead_lettered`, `partial` = invalidated what rendered and dead-lettered the rest).
    pub(in crate::telemetry) events: IntCounterVec,
    /// Items confirmed by a sink, by sink and kind (`key`, `tag`, `surrogate_key`, `url`).
    pub(in crate::telemetry) invalidations: IntCounterVec,
    /// Keys unlinked through tag fan-out (members of tag sets), by sink.
    pub(in crate::telemetry) tag_members_unlinked: IntCounterVec,
    /// `WAIT` replies with fewer replicas than `sinks.redis.wait_replicas.count`, by sink
    /// (each one fails its round, which is retried).
    pub(in crate::telemetry) redis_wait_timeouts: IntCounterVec,
    /// `redis.patterns`, `redis.generations`, `redis.dependents` (issue 15), by sink.
    pub(in crate::telemetry) redis_more: RedisMoreWays,
    /// Broadcast messages Redis accepted (`sinks.redis.broadcast`), by sink.
    pub(in crate::telemetry) redis_broadcasts: IntCounterVec,
    /// Subscribers that received the last broadcast message (PUBLISH's reply), by sink: 0 means
    /// nobody is listening.
    pub(in crate::telemetry) redis_broadcast_receivers: IntGaugeVec,
    /// Entries appended to the warm-up stream (`sinks.redis.warm`), by sink.
    pub(in crate::telemetry) redis_warm_entries: IntCounterVec,
    /// Seconds from the database commit to the sink confirming, per sink.
    pub(in crate::telemetry) staleness: BatchHistogramVec,
    /// Seconds from the database commit to the event being acknowledged to the source.
    pub end_to_end_staleness: BatchHistogram,
    /// Seconds from the database commit to the event entering the daemon: the share of
    /// staleness spent upstream (connector, broker, replication), which no daemon setting changes.
    pub source_delay: BatchHistogram,
    /// Seconds from the event entering the daemon to the sink confirming, per sink: the daemon's
    /// own share of staleness (batch wait, queueing, the sink round trips).
    pub(in crate::telemetry) processing: BatchHistogramVec,
    /// Per-partition consumer lag in messages, from librdkafka statistics.
    pub(in crate::telemetry) kafka_consumer_lag: IntGaugeVec,
    /// Events received but not yet acknowledged.
    pub pending_events: IntGauge,
    /// Events per batch.
    pub batch_events: Histogram,
    /// Batches, by the load they were gathered under (`light`: sent with what was queued;
    /// `backlog`: the pipeline had been busy without a break and gathered more).
    pub(in crate::telemetry) batches: IntCounterVec,
    /// Distinct items per batch after coalescing.
    pub batch_items: Histogram,
    /// Seconds a sink took to finish one batch, retries included.
    pub(in crate::telemetry) sink_batch_duration: HistogramVec,
    /// Failed sink attempts, by sink and class (`retriable`, `permanent`).
    pub(in crate::telemetry) sink_errors: IntCounterVec,
    /// Sink attempts that will be retried, by sink.
    pub(in crate::telemetry) sink_retries: IntCounterVec,
    /// 1 while the sink answers, 0 while it is failing.
    pub(in crate::telemetry) sink_up: IntGaugeVec,
    /// Dead letters written, by reason (`malformed`, `rule_error`, `sink_rejected`).
    pub(in crate::telemetry) dead_letters: IntCounterVec,
    /// Failed attempts to write a dead letter (retried).
    pub dead_letter_errors: IntCounter,
    /// Templates that no row image could render, by rule.
    pub(in crate::telemetry) rule_errors: IntCounterVec,
    /// Unix time of the last message (event or heartbeat) from the source.
    pub last_event_timestamp: Gauge,
    /// Unix time of the source commit of the newest event seen.
    pub last_commit_timestamp: Gauge,
    /// Offset commits by outcome (`ok`, `error`).
    pub(in crate::telemetry) source_commits: IntCounterVec,
    /// Consumer group rebalances by kind (`assign`, `revoke`).
    pub(in crate::telemetry) rebalances: IntCounterVec,
    /// Errors reported by the source client (transient; it recovers by itself).
    pub source_errors: IntCounter,
    /// 1 when the source has partitions assigned (Kafka) or a live stream (PostgreSQL).
    pub source_ready: IntGauge,
    /// Constant 1, labelled with the version.
    pub(in crate::telemetry) build_info: IntGaugeVec,
    /// Rules currently loaded.
    pub rules_loaded: IntGauge,
    /// CDN/HTTP-cache purge requests (attempts), by sink and outcome (`ok`, `rate_limited`,
    /// `server_error`, `network_error`, `rejected`).
    pub(in crate::telemetry) cdn_requests: IntCounterVec,
    /// Items per CDN purge request, by sink (the batching ratio).
    pub(in crate::telemetry) cdn_request_items: HistogramVec,
    /// Seconds one CDN purge attempt took, by sink.
    pub(in crate::telemetry) cdn_request_duration: HistogramVec,
    /// Seconds spent waiting on a sink's client-side rate limit (token bucket), by sink.
    pub(in crate::telemetry) cdn_rate_limit_wait: CounterVec,
    /// CDN purge requests in flight, by sink.
    pub(in crate::telemetry) cdn_in_flight: IntGaugeVec,
    /// Post-purge freshness checks, by sink and outcome (`fresh`, `stale`, `error`, `skipped`).
    pub(in crate::telemetry) cdn_verifications: IntCounterVec,
    /// Credentials read again after a provider refused them (401/403), by sink and outcome
    /// (`changed`: the request went once more; `unchanged`; `failed`).
    pub(in crate::telemetry) credential_reloads: IntCounterVec,
    /// Events whose second pass (`sinks.timing.repeat_after`) is still due.
    pub second_pass_pending_events: IntGauge,
    /// Seconds from the database commit to the event being finished by every sink, by table.
    pub(in crate::telemetry) table_staleness: BatchHistogramVec,
    /// Constant 1, labelled with the hash of the running rules file (one series at a time).
    pub(in crate::telemetry) rules_info: IntGaugeVec,
    /// Unix time the running rules were loaded (at start or by a reload).
    pub rules_loaded_timestamp: Gauge,
    /// Rules reload attempts, by outcome (`ok`, `error`).
    pub(in crate::telemetry) rules_reloads: IntCounterVec,
    /// 1 while the rules file on disk is invalid (the previous rules keep running), else 0.
    pub rules_reload_failed: IntGauge,
    /// PostgreSQL: server WAL position minus the slot's confirmed flush LSN.
    pub postgres_lag_bytes: IntGauge,
    /// PostgreSQL: WAL the slot keeps on the server (server WAL position minus restart LSN).
    pub postgres_retained_wal_bytes: IntGauge,
    /// PostgreSQL: 1 for the role this daemon holds on the slot (`active`, `standby`).
    pub(in crate::telemetry) postgres_role: IntGaugeVec,
    /// PostgreSQL: replication reconnects after a broken stream or a failed start.
    pub postgres_reconnects: IntCounter,
    /// PostgreSQL: the LSN confirmed as flushed (everything before it is invalidated).
    pub postgres_confirmed_lsn: Gauge,
    /// Events in a layer not yet confirmed by every sink of it, queued or in progress (`layer`:
    /// 0 Redis, 1 HTTP caches, 2 CDNs): a layer
    /// whose queue stays near `pipeline.queue_capacity` is the one holding the pipeline back.
    pub(in crate::telemetry) layer_queue_events: IntGaugeVec,
    /// Seconds the stages before a layer waited for room in its full queue: the backpressure
    /// that layer puts on the rest of the pipeline (and, through intake, on the source).
    pub(in crate::telemetry) layer_queue_wait: CounterVec,
    /// Keys a second-pass UNLINK actually removed, by sink: readers refilled them from data
    /// older than the change between the passes (the race, measured).
    pub(in crate::telemetry) second_pass_refills: IntCounterVec,
    /// Seconds from the database commit to the last pass confirmed, by sink.
    pub(in crate::telemetry) settled: BatchHistogramVec,
    /// Each read replica's replay lag in seconds (`freshness.replicas`).
    pub(in crate::telemetry) replica_replay_lag_seconds: GaugeVec,
    /// Each read replica's replay lag in bytes: WAL received or awaited but not replayed.
    pub(in crate::telemetry) replica_replay_lag_bytes: IntGaugeVec,
    /// Second passes that went out at `freshness.max_wait`, by the replica that was behind.
    pub(in crate::telemetry) freshness_max_wait: IntCounterVec,
    /// Schema registry requests, by outcome (`ok`, `not_found`, `unauthorized`, `error`).
    pub(in crate::telemetry) schema_registry_requests: IntCounterVec,
    /// Schemas held in the registry client's cache (messages whose schema is cached decode
    /// while the registry is down).
    pub schema_registry_cached_schemas: IntGauge,
}

/// The progress of patterns, generations and dependents, by sink.
pub(in crate::telemetry) struct RedisMoreWays {
    /// Patterns of the batch being scanned whose scan is not finished.
    pub(in crate::telemetry) pattern_scans_in_flight: IntGaugeVec,
    /// `SCAN` calls made for patterns.
    pub(in crate::telemetry) scan_calls: IntCounterVec,
    /// Keys the pattern scans returned (matches, before UNLINK).
    pub(in crate::telemetry) pattern_keys_matched: IntCounterVec,
    /// Keys the pattern scans found and unlinked (UNLINK replies).
    pub(in crate::telemetry) pattern_keys_unlinked: IntCounterVec,
    /// Generation keys set (`outcome="advanced"`) or left because they already held a
    /// position as high (`outcome="kept"`: a redelivery, or an older event).
    pub(in crate::telemetry) generations: IntCounterVec,
    /// Keys unlinked as dependents (members of `<dep_prefix>KEY` sets).
    pub(in crate::telemetry) dependents_unlinked: IntCounterVec,
}

impl RedisMoreWays {
    fn new(r: &Registry) -> RedisMoreWays {
        RedisMoreWays {
            pattern_scans_in_flight: gauge_vec(
                r,
                "cdc_invalidator_redis_pattern_scans_in_flight",
                "Patterns of the current batch whose SCAN is not finished.",
                &["sink"],
            ),
            scan_calls: counter(
                r,
                "cdc_invalidator_redis_scan_calls_total",
                "SCAN calls made for patterns.",
                &["sink"],
            ),
            pattern_keys_matched: counter(
                r,
                "cdc_invalidator_redis_pattern_keys_matched_total",
                "Keys pattern scans returned.",
                &["sink"],
            ),
            pattern_keys_unlinked: counter(
                r,
                "cdc_invalidator_redis_pattern_keys_unlinked_total",
                "Keys pattern scans found and unlinked.",
                &["sink"],
            ),
            generations: counter(
                r,
                "cdc_invalidator_redis_generations_total",
                "Generation keys advanced to an event's position, or kept because they held one as high.",
                &["sink", "outcome"],
            ),
            dependents_unlinked: counter(
                r,
                "cdc_invalidator_redis_dependents_unlinked_total",
                "Keys unlinked as dependents of invalidated keys.",
                &["sink"],
            ),
        }
    }
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric definition is valid");
    r.register(Box::new(c.clone())).expect("metric names are unique");
    c
}

fn histogram(r: &Registry, name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels)
        .expect("metric definition is valid");
    r.register(Box::new(h.clone())).expect("metric names are unique");
    h
}

fn plain_histogram(r: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("metric definition is valid");
    r.register(Box::new(h.clone())).expect("metric names are unique");
    h
}

/// A histogram observed per event and added to per batch ([`BatchHistogram`]).
fn batch_histogram(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &'static [f64],
) -> BatchHistogramVec {
    let h = histogram::vec(name, help, labels, buckets).expect("metric definition is valid");
    r.register(Box::new(h.clone())).expect("metric names are unique");
    h
}

fn plain_batch_histogram(r: &Registry, name: &str, help: &str, buckets: &'static [f64]) -> BatchHistogram {
    let h = BatchHistogram::new(name, help, buckets).expect("metric definition is valid");
    r.register(Box::new(h.clone())).expect("metric names are unique");
    h
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("metric definition is valid");
    r.register(Box::new(g.clone())).expect("metric names are unique");
    g
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let m = Metrics {
            events: counter(
                &r,
                "cdc_invalidator_events_total",
                "Source messages processed, by table, op and outcome.",
                &["table", "op", "outcome"],
            ),
            invalidations: counter(
                &r,
                "cdc_invalidator_invalidations_total",
                "Items confirmed invalidated, by sink and kind.",
                &["sink", "kind"],
            ),
            batches: {
                let c = counter(
                    &r,
                    "cdc_invalidator_batches_total",
                    "Batches sent, by load: light (sent at once with what was queued) or backlog (gathered while catching up).",
                    &["load"],
                );
                // Both series exist from the start, so a rate over them is never "no data".
                for load in super::events::pipeline::BatchLoad::ALL {
                    c.with_label_values(&[load.as_str()]);
                }
                c
            },
            tag_members_unlinked: counter(
                &r,
                "cdc_invalidator_tag_members_unlinked_total",
                "Keys unlinked through tag fan-out.",
                &["sink"],
            ),
            redis_more: RedisMoreWays::new(&r),
            redis_wait_timeouts: counter(
                &r,
                "cdc_invalidator_redis_wait_timeouts_total",
                "WAIT replies with fewer replicas than sinks.redis.wait_replicas.count (the round is retried).",
                &["sink"],
            ),
            redis_broadcasts: counter(
                &r,
                "cdc_invalidator_redis_broadcast_messages_total",
                "Broadcast messages Redis accepted (sinks.redis.broadcast), one per batch after its deletes.",
                &["sink"],
            ),
            redis_broadcast_receivers: gauge_vec(
                &r,
                "cdc_invalidator_redis_broadcast_receivers",
                "Subscribers that received the last broadcast message (0: nobody listens).",
                &["sink"],
            ),
            redis_warm_entries: counter(
                &r,
                "cdc_invalidator_redis_warm_entries_total",
                "Entries appended to the warm-up stream (sinks.redis.warm), one per invalidated key.",
                &["sink"],
            ),
            staleness: batch_histogram(
                &r,
                "cdc_invalidator_staleness_seconds",
                "Seconds from the database commit to the sink confirming the invalidation.",
                &["sink"],
                STALENESS_BUCKETS,
            ),
            end_to_end_staleness: plain_batch_histogram(
                &r,
                "cdc_invalidator_acknowledged_staleness_seconds",
                "Seconds from the database commit to the event being finished by every sink.",
                STALENESS_BUCKETS,
            ),
            source_delay: plain_batch_histogram(
                &r,
                "cdc_invalidator_source_delay_seconds",
                "Seconds from the database commit to the event entering the daemon.",
                STALENESS_BUCKETS,
            ),
            processing: batch_histogram(
                &r,
                "cdc_invalidator_processing_seconds",
                "Seconds from the event entering the daemon to the sink confirming the invalidation.",
                &["sink"],
                STALENESS_BUCKETS,
            ),
            kafka_consumer_lag: gauge_vec(
                &r,
                "cdc_invalidator_kafka_consumer_lag_messages",
                "Messages behind the partition's high watermark.",
                &["topic", "partition"],
            ),
            pending_events: {
                let g = IntGauge::new("cdc_invalidator_pending_events", "Events received and not yet acknowledged.")
                    .expect("valid");
                r.register(Box::new(g.clone())).expect("unique");
                g
            },
            batch_events: plain_histogram(&r, "cdc_invalidator_batch_events", "Events per batch.", BATCH_BUCKETS),
            batch_items: plain_histogram(
                &r,
                "cdc_invalidator_batch_items",
                "Distinct items per batch after coalescing.",
                BATCH_BUCKETS,
            ),
            sink_batch_duration: histogram(
                &r,
                "cdc_invalidator_sink_batch_duration_seconds",
                "Seconds a sink took to finish one batch, retries included.",
                &["sink"],
                DURATION_BUCKETS,
            ),
            sink_errors: counter(
                &r,
                "cdc_invalidator_sink_errors_total",
                "Failed sink attempts, by sink and class.",
                &["sink", "class"],
            ),
            sink_retries: counter(
                &r,
                "cdc_invalidator_sink_retries_total",
                "Sink attempts retried after a transient failure.",
                &["sink"],
            ),
            sink_up: gauge_vec(&r, "cdc_invalidator_sink_up", "1 while the sink answers, 0 while it fails.", &["sink"]),
            dead_letters: counter(
                &r,
                "cdc_invalidator_dead_letters_total",
                "Dead letters written, by reason.",
                &["reason"],
            ),
            dead_letter_errors: {
                let c = IntCounter::new(
                    "cdc_invalidator_dead_letter_write_errors_total",
                    "Failed attempts to write a dead letter (retried).",
                )
                .expect("valid");
                r.register(Box::new(c.clone())).expect("unique");
                c
            },
            rule_errors: counter(
                &r,
                "cdc_invalidator_rule_errors_total",
                "Templates no row image could render, by rule.",
                &["rule"],
            ),
            last_event_timestamp: {
                let g = Gauge::new(
                    "cdc_invalidator_last_event_timestamp_seconds",
                    "Unix time of the last message (event or heartbeat) received.",
                )
                .expect("valid");
                r.register(Box::new(g.clone())).expect("unique");
                g
            },
            last_commit_timestamp: {
                let g = Gauge::new(
                    "cdc_invalidator_last_source_commit_timestamp_seconds",
                    "Unix time of the database commit (or heartbeat) of the newest message received.",
                )
                .expect("valid");
                r.register(Box::new(g.clone())).expect("unique");
                g
            },
            source_commits: counter(
                &r,
                "cdc_invalidator_source_commits_total",
                "Source position commits, by outcome.",
                &["outcome"],
            ),
            rebalances: counter(
                &r,
                "cdc_invalidator_rebalances_total",
                "Consumer group rebalances, by kind.",
                &["kind"],
            ),
            source_errors: {
                let c = IntCounter::new(
                    "cdc_invalidator_source_errors_total",
                    "Transient errors reported by the source client.",
                )
                .expect("valid");
                r.register(Box::new(c.clone())).expect("unique");
                c
            },
            source_ready: {
                let g = IntGauge::new(
                    "cdc_invalidator_source_ready",
                    "1 when the source has partitions assigned or a live stream.",
                )
                .expect("valid");
                r.register(Box::new(g.clone())).expect("unique");
                g
            },
            build_info: gauge_vec(
                &r,
                "cdc_invalidator_build_info",
                "Constant 1, labelled with the version.",
                &["version"],
            ),
            rules_loaded: {
                let g = IntGauge::new("cdc_invalidator_rules", "Rules currently loaded.").expect("valid");
                r.register(Box::new(g.clone())).expect("unique");
                g
            },
            cdn_requests: counter(
                &r,
                "cdc_invalidator_cdn_requests_total",
                "CDN and HTTP-cache purge requests (attempts), by sink and outcome.",
                &["sink", "outcome"],
            ),
            cdn_request_items: histogram(
                &r,
                "cdc_invalidator_cdn_request_items",
                "Items per CDN purge request, by sink.",
                &["sink"],
                BATCH_BUCKETS,
            ),
            cdn_request_duration: histogram(
                &r,
                "cdc_invalidator_cdn_request_duration_seconds",
                "Seconds one CDN purge attempt took, by sink.",
                &["sink"],
                DURATION_BUCKETS,
            ),
            cdn_rate_limit_wait: {
                let c = CounterVec::new(
                    Opts::new(
                        "cdc_invalidator_cdn_rate_limit_wait_seconds_total",
                        "Seconds spent waiting on a sink's client-side rate limit.",
                    ),
                    &["sink"],
                )
                .expect("metric definition is valid");
                r.register(Box::new(c.clone())).expect("metric names are unique");
                c
            },
            cdn_in_flight: gauge_vec(
                &r,
                "cdc_invalidator_cdn_in_flight_requests",
                "CDN purge requests in flight, by sink.",
                &["sink"],
            ),
            cdn_verifications: counter(
                &r,
                "cdc_invalidator_cdn_verifications_total",
                "Post-purge freshness checks, by sink and outcome.",
                &["sink", "outcome"],
            ),
            credential_reloads: counter(
                &r,
                "cdc_invalidator_credential_reloads_total",
                "Credentials read again after a provider refused them (401/403), by sink and outcome.",
                &["sink", "outcome"],
            ),
            second_pass_pending_events: {
                let g = IntGauge::new(
                    "cdc_invalidator_second_pass_pending_events",
                    "Events whose second invalidation pass is still due.",
                )
                .expect("valid");
                r.register(Box::new(g.clone())).expect("unique");
                g
            },
            table_staleness: batch_histogram(
                &r,
                "cdc_invalidator_table_staleness_seconds",
                "Seconds from the database commit to the event being finished by every sink, by table.",
                &["table"],
                STALENESS_BUCKETS,
            ),
            rules_info: gauge_vec(
                &r,
                "cdc_invalidator_rules_info",
                "Constant 1, labelled with the hash of the running rules file.",
                &["hash"],
            ),
            rules_loaded_timestamp: {
                let g = Gauge::new(
                    "cdc_invalidator_rules_loaded_timestamp_seconds",
                    "Unix time the running rules were loaded.",
                )
                .expect("valid");
                r.register(Box::new(g.clone())).expect("unique");
                g
            },
            rules_reloads: counter(
                &r,
                "cdc_invalidator_rules_reloads_total",
                "Rules reload attempts (SIGHUP or a changed file), by outcome.",
                &["outcome"],
            ),
            rules_reload_failed: {
                let g = IntGauge::new(
                    "cdc_invalidator_rules_reload_failed",
                    "1 while the rules file on disk is invalid and the previous rules keep running.",
                )
                .expect("valid");
                r.register(Box::new(g.clone())).expect("unique");
                g
            },
            postgres_lag_bytes: {
                let g = IntGauge::new(
                    "cdc_invalidator_postgres_replication_lag_bytes",
                    "Server WAL position minus the slot's confirmed flush LSN, in bytes.",
                )
                .expect("valid");
                r.register(Box::new(g.clone())).expect("unique");
                g
            },
            postgres_retained_wal_bytes: {
                let g = IntGauge::new(
                    "cdc_invalidator_postgres_slot_retained_wal_bytes",
                    "WAL the replication slot keeps on the server (WAL position minus restart LSN), in bytes.",
                )
                .expect("valid");
                r.register(Box::new(g.clone())).expect("unique");
                g
            },
            postgres_role: gauge_vec(
                &r,
                "cdc_invalidator_postgres_role",
                "1 for the role this daemon holds on the replication slot.",
                &["role"],
            ),
            postgres_reconnects: {
                let c = IntCounter::new(
                    "cdc_invalidator_postgres_reconnects_total",
                    "Replication reconnects after a broken stream or a failed start.",
                )
                .expect("valid");
                r.register(Box::new(c.clone())).expect("unique");
                c
            },
            postgres_confirmed_lsn: {
                let g = Gauge::new(
                    "cdc_invalidator_postgres_confirmed_flush_lsn",
                    "The LSN confirmed to the server as flushed: every change before it is invalidated.",
                )
                .expect("valid");
                r.register(Box::new(g.clone())).expect("unique");
                g
            },
            layer_queue_events: gauge_vec(
                &r,
                "cdc_invalidator_layer_queue_events",
                "Events in a layer not yet confirmed by every sink of it, by layer (0 Redis, 1 HTTP caches, 2 CDNs).",
                &["layer"],
            ),
            layer_queue_wait: {
                let c = CounterVec::new(
                    Opts::new(
                        "cdc_invalidator_layer_queue_wait_seconds_total",
                        "Seconds the stages before a layer waited for room in its full queue, by layer.",
                    ),
                    &["layer"],
                )
                .expect("metric definition is valid");
                r.register(Box::new(c.clone())).expect("metric names are unique");
                c
            },
            second_pass_refills: counter(
                &r,
                "cdc_invalidator_second_pass_refills_total",
                "Keys a second-pass UNLINK found refilled and removed again, by sink.",
                &["sink"],
            ),
            settled: batch_histogram(
                &r,
                "cdc_invalidator_settled_seconds",
                "Seconds from the database commit to the last invalidation pass confirmed, by sink.",
                &["sink"],
                STALENESS_BUCKETS,
            ),
            replica_replay_lag_seconds: {
                let g = GaugeVec::new(
                    Opts::new("cdc_invalidator_replica_replay_lag_seconds", "Read replica replay lag in seconds."),
                    &["replica"],
                )
                .expect("metric definition is valid");
                r.register(Box::new(g.clone())).expect("metric names are unique");
                g
            },
            replica_replay_lag_bytes: gauge_vec(
                &r,
                "cdc_invalidator_replica_replay_lag_bytes",
                "Read replica replay lag in bytes (WAL received or awaited, not yet replayed).",
                &["replica"],
            ),
            freshness_max_wait: counter(
                &r,
                "cdc_invalidator_freshness_max_wait_total",
                "Second passes sent at freshness.max_wait because a replica had not replayed the commit, by replica.",
                &["replica"],
            ),
            schema_registry_requests: counter(
                &r,
                "cdc_invalidator_schema_registry_requests_total",
                "Schema registry requests, by outcome (ok, not_found, unauthorized, error).",
                &["outcome"],
            ),
            schema_registry_cached_schemas: {
                let g = IntGauge::new(
                    "cdc_invalidator_schema_registry_cached_schemas",
                    "Schemas held in the schema registry client's cache.",
                )
                .expect("valid");
                r.register(Box::new(g.clone())).expect("unique");
                g
            },
            registry: r,
        };
        m.build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        m
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Whether a metric family of this name is registered, whether or not it has a series yet
    /// (a labelled family without series is absent from [`Metrics::render`]). For tests that
    /// check dashboards and alerts against the metrics the daemon really defines.
    pub fn is_registered(&self, name: &str) -> bool {
        // Registering a probe of the same name fails exactly when the name is taken (by a
        // family with other labels or help, or the same descriptor).
        let Ok(probe) = IntGauge::new(name, "registration probe") else { return false };
        match self.registry.register(Box::new(probe.clone())) {
            Ok(()) => {
                let _ = self.registry.unregister(Box::new(probe));
                false
            }
            Err(_) => true,
        }
    }

    /// Reads a counter or gauge (summed over matching series), or a histogram's sample count,
    /// by name and labels: for tests and the demo.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        use prometheus::proto::MetricType;
        let mut total = 0.0;
        for family in self.registry.gather().iter().filter(|f| f.name() == name) {
            let kind = family.get_field_type();
            for m in family.get_metric() {
                if !labels.iter().all(|(k, v)| m.get_label().iter().any(|l| l.name() == *k && l.value() == *v)) {
                    continue;
                }
                total += match kind {
                    MetricType::COUNTER => m.get_counter().get_value(),
                    MetricType::GAUGE => m.get_gauge().get_value(),
                    MetricType::HISTOGRAM => m.get_histogram().get_sample_count() as f64,
                    _ => 0.0,
                };
            }
        }
        total
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
