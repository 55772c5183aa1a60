//! The pipeline: source events in, batched and coalesced invalidations out to every sink, dead
//! letters for what cannot be done, and acknowledgements only after all of that.
//!
//! ```text
//! source task ──bounded queue──▶ pipeline task: recv_many up to batch_max_events / batch_max_wait
//!                                 (closed at once with what is queued; in a backlog, once none
//!                                 came for batch_idle_wait: see BusyStreak)
//!                                 ├─ rules.evaluate(event) for every change
//!                                 ├─ coalesce: one deduplicated Invalidations per batch
//!                                 ├─ sinks, in layer order (Redis first), each until done
//!                                 ├─ dead letters (malformed, rule errors, sink rejections)
//!                                 └─ ack every event of the batch
//! ```
//!
//! One batch is in flight at a time: while it is being sent, the queue fills and, when full,
//! the source pauses. That keeps memory bounded and ordering simple; throughput comes from
//! batching (one pipelined round trip per batch), not from concurrency.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, watch};

use crate::config::{Config, LayerTiming, PipelineConfig, SourceKind};
use crate::dead_letter::{DeadLetterError, DeadLetters, Letter, Reason};
use crate::event::{ChangeEvent, Decoded};
use crate::rules::reload::{self, Reloader};
use crate::rules::{Evaluation, Rules};
use crate::shutdown::Shutdown;
use crate::sink::redis::RedisSink;
use crate::sink::{Invalidations, ItemKind, Sink, SinkError};
use crate::source::kafka::KafkaSource;
use crate::source::postgres::PostgresSource;
use crate::source::{Ack, SourceEvent};
use crate::telemetry::{self, Health, Metrics};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Http(#[from] telemetry::http::HttpError),
    #[error("{0}")]
    Sink(String),
    #[error(transparent)]
    DeadLetter(#[from] DeadLetterError),
    #[error(transparent)]
    Kafka(#[from] crate::source::kafka::KafkaSourceError),
    #[error(transparent)]
    Postgres(#[from] crate::source::postgres::PostgresSourceError),
    #[error("source task failed: {0}")]
    SourceTask(String),
}

/// How often sinks are pinged for `/readyz` and `cdc_invalidator_sink_up`.
const PING_INTERVAL: Duration = Duration::from_secs(2);
/// At most one log line per rule per this interval for rule errors (they are counted anyway).
const RULE_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Runs the daemon until `shutdown` stops it and everything in flight is finished or abandoned.
pub async fn run(config: Config, rules: Rules, metrics: Arc<Metrics>, shutdown: Shutdown) -> Result<(), AppError> {
    // Hot reload (SIGHUP, file changes), first so SIGHUP is handled from the start; the pipeline
    // picks the current rules once per batch.
    let (reloader, rules) = Reloader::new(&config.rules, Arc::new(rules), metrics.clone());
    let health = Arc::new(Health::default());
    let (addr, http) =
        telemetry::http::serve(config.metrics.listen, metrics.clone(), health.clone(), shutdown.clone()).await?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");

    let (layers, sinks) = build_sinks(&config, &metrics)?;
    let kafka_config = config.source.kafka.as_ref();
    let dead_letters = DeadLetters::open(&config.dead_letter, kafka_config, metrics.clone()).await?;
    tracing::info!(destination = %dead_letters.describe(), "dead letters");

    let (tx, rx) = mpsc::channel(config.pipeline.queue_capacity);
    let source_task = match (config.source.kind, kafka_config, config.source.postgres.as_ref()) {
        (SourceKind::Kafka, Some(k), _) => {
            let source = KafkaSource::new(k, metrics.clone())?;
            let stop = shutdown.clone();
            tokio::spawn(async move { source.run(tx, stop).await.map_err(AppError::from) })
        }
        (SourceKind::Postgres, _, Some(p)) => {
            let source = PostgresSource::new(p, metrics.clone())?;
            let stop = shutdown.clone();
            tokio::spawn(async move { source.run(tx, stop).await.map_err(AppError::from) })
        }
        _ => return Err(AppError::SourceTask("the configured source is not available".into())),
    };

    let reloads = tokio::spawn(reloader.run(reload::POLL_INTERVAL, shutdown.clone()));
    let pinger = tokio::spawn(ping_sinks(sinks.clone(), health.clone(), metrics.clone(), shutdown.clone()));
    health.alive.store(true, Ordering::Relaxed);

    let initial = rules.borrow().clone();
    let pipeline = Pipeline::new(config.pipeline.clone(), initial, sinks, dead_letters, metrics.clone())
        .with_layers(layers, config.sinks.timing.clone())
        .with_rules_updates(rules);
    let result = pipeline.run(rx, &shutdown).await;
    health.alive.store(false, Ordering::Relaxed);
    pinger.abort();
    reloads.abort();

    // The pipeline has finished or dropped every event: the source can make its final commit.
    let source_result = source_task.await;
    http.abort();
    result?;
    match source_result {
        Ok(r) => r,
        Err(e) => Err(AppError::SourceTask(e.to_string())),
    }
}

/// Each sink's layer, and the sinks in layer order (parallel vectors).
pub type LayeredSinks = (Vec<u8>, Vec<Arc<dyn Sink>>);

/// The configured sinks in layer order: Redis (0), then HTTP caches (1), then CDNs (2), stable
/// within a layer; with each sink's layer. Shared by `run` and `replay`.
pub fn build_sinks(config: &Config, metrics: &Arc<Metrics>) -> Result<LayeredSinks, AppError> {
    let mut layered: Vec<(u8, Arc<dyn Sink>)> = Vec::new();
    // One sink per named Redis target: each gets every Redis invalidation.
    for redis in config.sinks.redis.iter().flat_map(|targets| targets.iter()) {
        let sink =
            RedisSink::new(redis.target_name(), redis, metrics.clone()).map_err(|e| AppError::Sink(e.to_string()))?;
        layered.push((0, Arc::new(sink)));
    }
    for cdn in &config.sinks.cdn {
        layered.push((cdn.layer(), cdn.build(metrics.clone()).map_err(|e| AppError::Sink(e.to_string()))?));
    }
    layered.sort_by_key(|(layer, _)| *layer);
    Ok(layered.into_iter().unzip())
}

async fn ping_sinks(sinks: Vec<Arc<dyn Sink>>, health: Arc<Health>, metrics: Arc<Metrics>, shutdown: Shutdown) {
    loop {
        let mut all = true;
        for sink in &sinks {
            let up = tokio::time::timeout(Duration::from_secs(2), sink.ping()).await.unwrap_or(false);
            metrics.sink_up.with_label_values(&[sink.name()]).set(up as i64);
            all &= up;
        }
        health.sinks_ready.store(all, Ordering::Relaxed);
        tokio::select! {
            _ = shutdown.abandoned() => return,
            _ = tokio::time::sleep(PING_INTERVAL) => {}
        }
    }
}

/// Why a batch stopped early.
#[derive(Debug)]
enum BatchError {
    /// Shutdown abandoned the batch: its events stay unacknowledged.
    Abandoned,
    Fatal(AppError),
}

/// The batching, coalescing and acknowledging stage. Public so tests and benchmarks can drive it
/// with any source and sinks.
pub struct Pipeline {
    config: PipelineConfig,
    /// The running rules; read once per batch, so a reload swaps them between batches.
    rules: watch::Receiver<Arc<Rules>>,
    sinks: Vec<Arc<dyn Sink>>,
    dead_letters: DeadLetters,
    metrics: Arc<Metrics>,
    /// Last time each rule's error was logged (rate limit).
    rule_error_logged: HashMap<Arc<str>, Instant>,
    /// Each sink's layer (parallel to `sinks`, which are in layer order) and the pacing.
    layers: Vec<u8>,
    timing: LayerTiming,
    /// Batches waiting for their second pass, oldest first, with the acks that wait for it.
    second_passes: VecDeque<SecondPass>,
    second_pass_events: usize,
}

/// A batch's invalidations, due again at `due`; its events are acknowledged after that.
struct SecondPass {
    due: tokio::time::Instant,
    batch: Invalidations,
    acks: Vec<Ack>,
}

/// One event of a batch and what the rules made of it.
struct Item {
    event: SourceEvent,
    evaluation: Option<Evaluation>,
    /// Set when the event must be dead-lettered (reason, sentence).
    dead: Option<(Reason, String)>,
}

impl Pipeline {
    pub fn new(
        config: PipelineConfig,
        rules: Arc<Rules>,
        sinks: Vec<Arc<dyn Sink>>,
        dead_letters: DeadLetters,
        metrics: Arc<Metrics>,
    ) -> Pipeline {
        let layers = vec![0; sinks.len()];
        // Without `with_rules_updates` the rules never change (the sender is gone; the receiver
        // keeps the last value).
        let (_, rules) = watch::channel(rules);
        Pipeline {
            config,
            rules,
            sinks,
            dead_letters,
            metrics,
            rule_error_logged: HashMap::new(),
            layers,
            timing: LayerTiming::default(),
            second_passes: VecDeque::new(),
            second_pass_events: 0,
        }
    }

    /// Sets each sink's layer (`sinks` must already be in layer order) and the pacing between
    /// layers and of the second pass.
    pub fn with_layers(mut self, layers: Vec<u8>, timing: LayerTiming) -> Pipeline {
        if layers.len() == self.sinks.len() {
            self.layers = layers;
        }
        self.timing = timing;
        self
    }

    /// Takes the rules from `rules` (a [`Reloader`]'s receiver) from the next batch on.
    pub fn with_rules_updates(mut self, rules: watch::Receiver<Arc<Rules>>) -> Pipeline {
        self.rules = rules;
        self
    }

    /// Waits `layer_delay` before a sink of an outer layer than the last one that worked on
    /// this batch, so an edge cannot refill from an inner cache still being purged.
    async fn pace(&self, last: Option<u8>, next: usize, shutdown: &Shutdown) -> Result<(), BatchError> {
        let outer = last.is_some_and(|l| self.layers.get(next).is_some_and(|&n| n > l));
        if outer && !self.timing.layer_delay.is_zero() {
            tokio::select! {
                biased;
                _ = shutdown.abandoned() => return Err(BatchError::Abandoned),
                _ = tokio::time::sleep(self.timing.layer_delay) => {}
            }
        }
        Ok(())
    }

    /// Runs every second pass that is due, and while too many events wait for theirs (or, with
    /// `all`, every pending one) waits for the next one's due time; then acknowledges its events. A second pass repeats deletes that already
    /// succeeded once: its rejections were dead-lettered by the first pass and are only logged.
    async fn run_second_passes(&mut self, all: bool, shutdown: &Shutdown) -> Result<(), BatchError> {
        while let Some(due) = self.second_passes.front().map(|p| p.due) {
            let over = self.second_pass_events >= self.timing.repeat_max_events;
            if !all && !over && due > tokio::time::Instant::now() {
                break;
            }
            tokio::select! {
                biased;
                _ = shutdown.abandoned() => return Err(BatchError::Abandoned),
                _ = tokio::time::sleep_until(due) => {}
            }
            let Some(pass) = self.second_passes.pop_front() else { break };
            let mut last = None;
            for (i, sink) in self.sinks.clone().into_iter().enumerate() {
                if sink.kinds().iter().all(|&k| pass.batch.items(k).is_empty()) {
                    continue;
                }
                self.pace(last, i, shutdown).await?;
                match sink.invalidate(&pass.batch, shutdown).await {
                    Ok(report) if !report.rejected.is_empty() => tracing::warn!(
                        sink = sink.name(),
                        rejected = report.rejected.len(),
                        "second pass: items rejected again (dead-lettered by the first pass)"
                    ),
                    Ok(_) => {}
                    Err(SinkError::Abandoned) => return Err(BatchError::Abandoned),
                    Err(SinkError::Fatal(m)) => {
                        return Err(BatchError::Fatal(AppError::Sink(format!("sink {}: {m}", sink.name()))))
                    }
                }
                last = self.layers.get(i).copied();
            }
            self.second_pass_events -= pass.acks.len();
            self.metrics.second_pass_pending_events.set(self.second_pass_events as i64);
            for ack in pass.acks {
                ack.finish();
            }
        }
        Ok(())
    }

    /// Processes batches until the source closes the queue (after shutdown stopped it) and the
    /// queue is drained, or until shutdown abandons the work.
    pub async fn run(mut self, mut rx: mpsc::Receiver<SourceEvent>, shutdown: &Shutdown) -> Result<(), AppError> {
        let max = self.config.batch_max_events;
        let mut batch: Vec<SourceEvent> = Vec::with_capacity(max);
        let mut streak = BusyStreak::default();
        loop {
            // Second passes that are due go first. While too many events wait for theirs, take
            // no new events (the source pauses) until the oldest pass is done.
            match self.run_second_passes(false, shutdown).await {
                Ok(()) => {}
                Err(BatchError::Abandoned) => return Ok(()),
                Err(BatchError::Fatal(e)) => return Err(e),
            }
            let next_due = self.second_passes.front().map(|p| p.due);
            // Wait for the first event (or the next second pass), then gather more: how long
            // depends on whether the pipeline has been busy (BusyStreak). The tokio clock is the
            // std clock, except under a paused test clock.
            let waiting_since = tokio::time::Instant::now().into_std();
            let n = tokio::select! {
                biased;
                _ = shutdown.abandoned() => return Ok(()),
                _ = sleep_until_some(next_due), if next_due.is_some() => continue,
                n = rx.recv_many(&mut batch, max) => n,
            };
            if n == 0 {
                // Queue closed and drained: pending second passes still run (within the
                // shutdown grace period; abandoned ones stay unacknowledged and are redone).
                return match self.run_second_passes(true, shutdown).await {
                    Ok(()) | Err(BatchError::Abandoned) => Ok(()),
                    Err(BatchError::Fatal(e)) => Err(e),
                };
            }
            let load = streak.load(batch[0].received, waiting_since, self.config.batch_idle_wait);
            self.metrics.batches.with_label_values(&[load.as_str()]).inc();
            fill_batch(&mut rx, &mut batch, load, &self.config).await;
            let events = std::mem::replace(&mut batch, Vec::with_capacity(max));
            match self.process(events, shutdown).await {
                Ok(()) => {}
                Err(BatchError::Abandoned) => {
                    tracing::warn!("shutdown grace period over: in-flight events abandoned unacknowledged (they will be redelivered)");
                    return Ok(());
                }
                Err(BatchError::Fatal(e)) => return Err(e),
            }
        }
    }

    async fn process(&mut self, events: Vec<SourceEvent>, shutdown: &Shutdown) -> Result<(), BatchError> {
        self.metrics.batch_events.observe(events.len() as f64);
        // The upstream share of staleness: commit to entering the daemon (the receipt instant
        // mapped onto the wall clock the commit timestamp is on).
        let (wall, mono) = (SystemTime::now(), Instant::now());
        for event in &events {
            if let Some(origin) = origin(event) {
                let entered = wall.checked_sub(mono.saturating_duration_since(event.received)).unwrap_or(wall);
                self.metrics.source_delay.observe(entered.duration_since(origin).unwrap_or_default().as_secs_f64());
            }
        }
        // One rules version for the whole batch.
        let rules = self.rules.borrow_and_update().clone();
        let mut items: Vec<Item> = events
            .into_iter()
            .map(|event| {
                let (evaluation, dead) = match &event.decoded {
                    Err(m) => (None, Some((Reason::Malformed, m.0.clone()))),
                    Ok(Decoded::NoChange(_)) => (None, None),
                    Ok(Decoded::Change(change)) => {
                        let eval = rules.evaluate(change);
                        let dead = (!eval.errors.is_empty()).then(|| {
                            (
                                Reason::RuleError,
                                eval.errors.iter().map(|e| e.message.as_str()).collect::<Vec<_>>().join("; "),
                            )
                        });
                        (Some(eval), dead)
                    }
                };
                Item { event, evaluation, dead }
            })
            .collect();
        self.log_rule_errors(&items);

        let batch = coalesce(&items);
        self.metrics.batch_items.observe(ItemKind::ALL.iter().map(|&k| batch.items(k).len()).sum::<usize>() as f64);

        let mut last_layer = None;
        for (i, sink) in self.sinks.clone().into_iter().enumerate() {
            let kinds = sink.kinds();
            if kinds.iter().all(|&k| batch.items(k).is_empty()) {
                continue;
            }
            self.pace(last_layer, i, shutdown).await?;
            last_layer = self.layers.get(i).copied();
            let started = Instant::now();
            let report = match sink.invalidate(&batch, shutdown).await {
                Ok(r) => r,
                Err(SinkError::Abandoned) => return Err(BatchError::Abandoned),
                Err(SinkError::Fatal(m)) => {
                    return Err(BatchError::Fatal(AppError::Sink(format!("sink {}: {m}", sink.name()))))
                }
            };
            let now = SystemTime::now();
            let now_instant = Instant::now();
            self.metrics.sink_batch_duration.with_label_values(&[sink.name()]).observe(started.elapsed().as_secs_f64());
            for (kind, n) in &report.confirmed {
                self.metrics.invalidations.with_label_values(&[sink.name(), kind.as_str()]).inc_by(*n);
            }
            let staleness = self.metrics.staleness.with_label_values(&[sink.name()]);
            let processing = self.metrics.processing.with_label_values(&[sink.name()]);
            for item in &items {
                let asked = item
                    .evaluation
                    .as_ref()
                    .is_some_and(|e| kinds.iter().any(|&k| !e.invalidations.items(k).is_empty()));
                if asked {
                    if let Some(origin) = origin(&item.event) {
                        staleness.observe(now.duration_since(origin).unwrap_or_default().as_secs_f64());
                    }
                    processing.observe(now_instant.saturating_duration_since(item.event.received).as_secs_f64());
                }
            }
            for rejected in &report.rejected {
                let Some(value) = batch.items(rejected.kind).get(rejected.index) else { continue };
                for item in items.iter_mut() {
                    let wanted = item
                        .evaluation
                        .as_ref()
                        .is_some_and(|e| e.invalidations.items(rejected.kind).binary_search(value).is_ok());
                    if wanted {
                        let sentence =
                            format!("sink {} rejected {} {value:?}: {}", sink.name(), rejected.kind, rejected.reason);
                        item.dead = Some(match item.dead.take() {
                            Some((_, earlier)) => (Reason::SinkRejected, format!("{earlier} {sentence}")),
                            None => (Reason::SinkRejected, sentence),
                        });
                    }
                }
            }
        }

        let letters: Vec<Letter> = items
            .iter()
            .filter_map(|item| {
                let (reason, error) = item.dead.as_ref()?;
                let change = change_of(&item.event);
                Some(Letter::new(
                    *reason,
                    error.clone(),
                    &item.event.position,
                    &item.event.raw,
                    change.map(|c| c.table.as_str()),
                    change.map(|c| c.op.as_str()),
                ))
            })
            .collect();
        match self.dead_letters.write(&letters, shutdown).await {
            Ok(()) => {}
            Err(DeadLetterError::Abandoned) => return Err(BatchError::Abandoned),
            Err(e) => return Err(BatchError::Fatal(e.into())),
        }

        let now = SystemTime::now();
        let repeat = !self.timing.repeat_after.is_zero() && !batch.is_empty();
        let mut waiting = Vec::new();
        for item in items {
            let (table, op) = match &item.event.decoded {
                Ok(Decoded::Change(c)) => (c.table.as_str(), c.op.as_str()),
                Ok(Decoded::NoChange(n)) => (n.table.as_deref().unwrap_or("unknown"), "none"),
                Err(_) => ("unknown", "none"),
            };
            let outcome = match (&item.dead, &item.evaluation) {
                (Some((Reason::Malformed, _)), _) => "dead_lettered",
                (Some(_), _) => "partial",
                (None, None) => "no_change",
                (None, Some(e)) if e.matched_rules.is_empty() => "no_match",
                (None, Some(_)) => "invalidated",
            };
            self.metrics.events.with_label_values(&[table, op, outcome]).inc();
            if item.evaluation.is_some() {
                if let Some(origin) = origin(&item.event) {
                    let seconds = now.duration_since(origin).unwrap_or_default().as_secs_f64();
                    self.metrics.end_to_end_staleness.observe(seconds);
                    self.metrics.table_staleness.with_label_values(&[table]).observe(seconds);
                }
            }
            // With a second pass, events that asked for invalidations wait for it.
            let asked = item.evaluation.as_ref().is_some_and(|e| !e.invalidations.is_empty());
            if repeat && asked {
                waiting.push(item.event.ack);
            } else {
                item.event.ack.finish();
            }
        }
        if !waiting.is_empty() {
            self.second_pass_events += waiting.len();
            self.metrics.second_pass_pending_events.set(self.second_pass_events as i64);
            let due = tokio::time::Instant::now() + self.timing.repeat_after;
            self.second_passes.push_back(SecondPass { due, batch, acks: waiting });
        }
        Ok(())
    }

    fn log_rule_errors(&mut self, items: &[Item]) {
        for item in items {
            let Some(eval) = &item.evaluation else { continue };
            for err in &eval.errors {
                self.metrics.rule_errors.with_label_values(&[&err.rule]).inc();
                let now = Instant::now();
                let last = self.rule_error_logged.get(&err.rule);
                if last.is_none_or(|t| now.duration_since(*t) >= RULE_ERROR_LOG_INTERVAL) {
                    self.rule_error_logged.insert(err.rule.clone(), now);
                    let table = change_of(&item.event).map(|c| c.table.as_str()).unwrap_or("unknown");
                    tracing::warn!(
                        rule = %err.rule,
                        table,
                        position = %item.event.position,
                        "rule error (dead-lettered; further errors of this rule are logged at most every 10s): {}",
                        err.message
                    );
                }
            }
        }
    }
}

async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

fn change_of(event: &SourceEvent) -> Option<&ChangeEvent> {
    match &event.decoded {
        Ok(Decoded::Change(c)) => Some(c),
        _ => None,
    }
}

/// How long a batch waits for company: decided per batch by [`BusyStreak::load`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Load {
    /// The batch goes out with what is queued behind its first event, without waiting: the
    /// source hands over what it has at once (a Kafka fetch response, a PostgreSQL
    /// transaction), and waiting for more would only add staleness.
    Light,
    /// Events have been arriving faster than batches go out: the batch stays open until no
    /// event has come for `batch_idle_wait` (up to `batch_max_wait`), so that fewer, larger
    /// batches catch up. Never waiting here measured as a quarter less PostgreSQL catch-up
    /// throughput (batches of 24 events instead of 400).
    Backlog,
}

impl Load {
    /// The `load` label of `cdc_invalidator_batches_total`.
    fn as_str(self) -> &'static str {
        match self {
            Load::Light => "light",
            Load::Backlog => "backlog",
        }
    }
}

/// How long the pipeline has been busy without once waiting for an event.
#[derive(Debug)]
struct BusyStreak {
    /// When the pipeline last found the queue empty and had to wait for an event.
    since: Instant,
}

impl Default for BusyStreak {
    fn default() -> Self {
        BusyStreak { since: tokio::time::Instant::now().into_std() }
    }
}

impl BusyStreak {
    /// The load for a batch whose first event entered the process at `first_received`, the
    /// pipeline having started to wait for it at `waiting_since`. A first event that was already
    /// queued continues the busy streak; the streak only counts as a backlog once it has lasted
    /// `idle_wait`, so that a burst the pipeline happened to split in two (its tail queued
    /// while its head was being sent) still goes out at once.
    fn load(&mut self, first_received: Instant, waiting_since: Instant, idle_wait: Duration) -> Load {
        if first_received >= waiting_since {
            self.since = first_received;
            Load::Light
        } else if waiting_since.saturating_duration_since(self.since) >= idle_wait {
            Load::Backlog
        } else {
            Load::Light
        }
    }
}

/// Gathers more events into `batch` (which holds at least its first) until it holds
/// `batch_max_events`, its first event has waited `batch_max_wait`, or: under [`Load::Light`],
/// the queue is empty; under [`Load::Backlog`] (and always when `batch_idle_wait >=
/// batch_max_wait`: a fixed window) no event has arrived for `batch_idle_wait`.
async fn fill_batch(
    rx: &mut mpsc::Receiver<SourceEvent>,
    batch: &mut Vec<SourceEvent>,
    load: Load,
    config: &PipelineConfig,
) {
    // The wait counts from when the batch's first event entered the process, not from when the
    // pipeline got to it: events that queued while the previous batch was being sent have
    // already waited, and batch_max_wait bounds the wait of every event.
    let Some(first) = batch.first() else { return };
    let deadline = tokio::time::Instant::from_std(first.received) + config.batch_max_wait;
    let fixed_window = config.batch_idle_wait >= config.batch_max_wait;
    if load == Load::Light && !fixed_window {
        // Take what is queued and close, without a timer: even one tick of tokio's millisecond
        // timer wheel measured as most of the daemon's own share of staleness.
        while batch.len() < config.batch_max_events {
            match rx.try_recv() {
                Ok(event) => batch.push(event),
                Err(_) => break,
            }
        }
        return;
    }
    while batch.len() < config.batch_max_events {
        let room = config.batch_max_events - batch.len();
        // Close early once the source has gone quiet for batch_idle_wait: a burst (one Kafka
        // fetch response, one PostgreSQL transaction) arrives within microseconds, and holding
        // it for the rest of batch_max_wait only adds staleness. Under load the queue does not go
        // quiet and batches fill up as before.
        let until = deadline.min(tokio::time::Instant::now() + config.batch_idle_wait);
        match tokio::time::timeout_at(until, rx.recv_many(batch, room)).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// The staleness origin of an event: its database commit time, else the time it entered the log.
fn origin(event: &SourceEvent) -> Option<SystemTime> {
    change_of(event).and_then(|c| c.committed_at).or(event.logged_at)
}

/// One deduplicated set of invalidations for the whole batch.
fn coalesce(items: &[Item]) -> Invalidations {
    let mut sets: [HashSet<&str>; 4] = Default::default();
    for eval in items.iter().filter_map(|i| i.evaluation.as_ref()) {
        for (i, kind) in ItemKind::ALL.iter().enumerate() {
            sets[i].extend(eval.invalidations.items(*kind).iter().map(String::as_str));
        }
    }
    let [keys, tags, surrogate_keys, urls] = sets.map(|s| {
        let mut v: Vec<String> = s.into_iter().map(str::to_owned).collect();
        v.sort_unstable();
        v
    });
    Invalidations { redis_keys: keys, redis_tags: tags, surrogate_keys, urls }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{Ack, Position, RawMessage};

    fn item(keys: &[&str], tags: &[&str]) -> Item {
        let invalidations = Invalidations {
            redis_keys: keys.iter().map(|s| s.to_string()).collect(),
            redis_tags: tags.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        Item { event: arrival(), evaluation: Some(Evaluation { invalidations, ..Default::default() }), dead: None }
    }

    /// A source event that entered the process now (on tokio's clock, which tests pause).
    fn arrival() -> SourceEvent {
        SourceEvent {
            position: Position::File { line: 1 },
            decoded: Err(crate::source::Malformed("unused".into())),
            raw: RawMessage::default(),
            logged_at: None,
            received: tokio::time::Instant::now().into_std(),
            ack: Ack::detached(),
        }
    }

    fn pipeline_config(max_events: usize, max_wait_ms: u64, idle_wait_ms: u64) -> PipelineConfig {
        PipelineConfig {
            batch_max_events: max_events,
            batch_max_wait: Duration::from_millis(max_wait_ms),
            batch_idle_wait: Duration::from_millis(idle_wait_ms),
            queue_capacity: 1000,
        }
    }

    /// Sends `bursts` of (delay before it, events in it) and keeps the channel open afterwards.
    fn source(bursts: Vec<(u64, usize)>) -> mpsc::Receiver<SourceEvent> {
        let (tx, rx) = mpsc::channel(1000);
        tokio::spawn(async move {
            for (delay_ms, n) in bursts {
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                for _ in 0..n {
                    tx.send(arrival()).await.unwrap();
                }
            }
            // Quiet but open, like a source with nothing new.
            tokio::time::sleep(Duration::from_secs(3600)).await;
        });
        rx
    }

    /// Receives a first event, fills the batch, and says how many events it got and after how
    /// long (from the first event) it closed.
    async fn one_batch(rx: &mut mpsc::Receiver<SourceEvent>, load: Load, config: &PipelineConfig) -> (usize, Duration) {
        let mut batch = Vec::new();
        rx.recv_many(&mut batch, config.batch_max_events).await;
        let started = tokio::time::Instant::from_std(batch[0].received);
        fill_batch(rx, &mut batch, load, config).await;
        (batch.len(), started.elapsed())
    }

    /// A sink that takes `per_batch` to confirm and records how many keys each batch held and
    /// when it came.
    struct SlowSink {
        per_batch: Duration,
        batches: std::sync::Mutex<Vec<(usize, tokio::time::Instant)>>,
    }

    #[async_trait::async_trait]
    impl Sink for SlowSink {
        fn name(&self) -> &str {
            "slow"
        }

        async fn invalidate(&self, batch: &Invalidations, _: &Shutdown) -> Result<crate::sink::SinkReport, SinkError> {
            self.batches.lock().unwrap().push((batch.redis_keys.len(), tokio::time::Instant::now()));
            tokio::time::sleep(self.per_batch).await;
            Ok(crate::sink::SinkReport::default())
        }

        async fn ping(&self) -> bool {
            true
        }
    }

    /// An insert of row `id` into `public.t`, which the rules map to the key `t:{id}`.
    fn change(id: i64) -> SourceEvent {
        let mut row = crate::event::Row::new();
        row.insert("id".into(), id.into());
        SourceEvent {
            decoded: Ok(Decoded::Change(ChangeEvent {
                table: "public.t".into(),
                op: crate::event::Op::Insert,
                before: None,
                after: Some(row),
                committed_at: None,
            })),
            ..arrival()
        }
    }

    /// Runs a pipeline with one sink taking `sink_ms` per batch over events arriving one every
    /// `gap_ms`, and returns the batches the sink got: their sizes, and when (in ms from the
    /// first event).
    async fn batches_over(
        events: i64,
        gap_ms: u64,
        sink_ms: u64,
        config: PipelineConfig,
    ) -> (Vec<(usize, u128)>, Arc<Metrics>) {
        let start = tokio::time::Instant::now();
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let dead = crate::config::DeadLetterConfig { file: Some(dir.path().join("dl.jsonl")), ..Default::default() };
        let dead_letters = DeadLetters::open(&dead, None, metrics.clone()).await.unwrap();
        let rules = "version: 1\nrules:\n  - name: t\n    table: public.t\n    redis: { keys: [\"t:{id}\"] }\n";
        let rules = Arc::new(Rules::parse(rules, std::path::Path::new("rules.yaml")).unwrap());
        let sink = Arc::new(SlowSink { per_batch: Duration::from_millis(sink_ms), batches: Default::default() });
        let pipeline = Pipeline::new(config, rules, vec![sink.clone()], dead_letters, metrics.clone());
        let (tx, rx) = mpsc::channel(1000);
        tokio::spawn(async move {
            for id in 0..events {
                tx.send(change(id)).await.unwrap();
                tokio::time::sleep(Duration::from_millis(gap_ms)).await;
            }
        });
        pipeline.run(rx, &Shutdown::never()).await.unwrap();
        let batches: Vec<_> =
            sink.batches.lock().unwrap().iter().map(|(n, at)| (*n, (*at - start).as_millis())).collect();
        assert_eq!(batches.iter().map(|b| b.0).sum::<usize>(), events as usize, "every event once: {batches:?}");
        (batches, metrics)
    }

    #[tokio::test(start_paused = true)]
    async fn the_pipeline_sends_at_once_when_light_and_gathers_in_a_backlog() {
        // Light: one event every 5 ms, each confirmed in 1 ms: every event is its own batch,
        // sent at once (a 2 ms idle wait would not gather more, but would delay each).
        let (batches, metrics) = batches_over(10, 5, 1, pipeline_config(500, 50, 2)).await;
        assert_eq!(batches, (0..10).map(|i| (1, i * 5)).collect::<Vec<_>>());
        let count = |m: &Metrics, load| m.value("cdc_invalidator_batches_total", &[("load", load)]);
        assert_eq!((count(&metrics, "light"), count(&metrics, "backlog")), (10.0, 0.0));
        // Backlog: one event every 1 ms, each batch taking 3 ms: the first batch goes out at
        // once; the queue then never empties, and after 2 ms of that batches gather up to the
        // 50 ms max wait (never waiting would send batches of about 3).
        let (batches, metrics) = batches_over(200, 1, 3, pipeline_config(500, 50, 2)).await;
        assert_eq!(batches[0], (1, 0), "{batches:?}");
        let middle = &batches[1..batches.len() - 1];
        assert!(batches.len() <= 10 && middle.iter().all(|&(n, _)| n >= 40), "{batches:?}");
        assert_eq!(count(&metrics, "backlog"), (batches.len() - 1) as f64, "all but the first");
    }

    #[test]
    fn only_a_busy_streak_as_long_as_the_idle_wait_is_a_backlog() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let idle = Duration::from_millis(1);
        let mut streak = BusyStreak { since: t0 };
        // The pipeline waited from 10 ms, the event came at 12 ms: light, and the streak starts.
        assert_eq!(streak.load(ms(12), ms(10), idle), Load::Light);
        // The tail of that burst, queued while its head was sent (0.5 ms later): still light.
        assert_eq!(streak.load(ms(12), t0 + Duration::from_micros(12_500), idle), Load::Light);
        // Still finding events queued 1 ms after the streak began: a backlog.
        assert_eq!(streak.load(ms(12), ms(13), idle), Load::Backlog);
        assert_eq!(streak.load(ms(20), ms(30), idle), Load::Backlog);
        // Once the pipeline waits for an event again, the streak starts over.
        assert_eq!(streak.load(ms(41), ms(40), idle), Load::Light);
        assert_eq!(streak.load(ms(41), t0 + Duration::from_micros(41_200), idle), Load::Light);
    }

    #[tokio::test(start_paused = true)]
    async fn a_light_load_batch_goes_out_at_once_with_what_is_queued_behind_it() {
        let config = pipeline_config(500, 1000, 2);
        let mut rx = source(vec![(0, 40), (1, 7)]);
        // The pipeline took the first event alone; the rest of the burst is queued behind it.
        let mut batch = vec![rx.recv().await.unwrap()];
        let started = tokio::time::Instant::now();
        fill_batch(&mut rx, &mut batch, Load::Light, &config).await;
        assert_eq!(batch.len(), 40, "the rest of the queued burst, not the next one");
        assert_eq!(started.elapsed(), Duration::ZERO, "closed without waiting");
        let (n, _) = one_batch(&mut rx, Load::Light, &config).await;
        assert_eq!(n, 7, "the next burst is the next batch");
    }

    #[tokio::test(start_paused = true)]
    async fn a_backlog_burst_followed_by_quiet_is_sent_after_the_idle_wait_not_the_max_wait() {
        let config = pipeline_config(500, 1000, 2);
        let mut rx = source(vec![(0, 40), (50, 7)]);
        let (n, took) = one_batch(&mut rx, Load::Backlog, &config).await;
        assert_eq!(n, 40, "the first burst alone");
        assert!(
            took >= Duration::from_millis(2) && took < Duration::from_millis(5),
            "closed after the idle wait: {took:?}"
        );
        let (n, _) = one_batch(&mut rx, Load::Backlog, &config).await;
        assert_eq!(n, 7, "the next burst is the next batch");
    }

    #[tokio::test(start_paused = true)]
    async fn a_backlog_steady_trickle_fills_the_batch_until_the_max_wait() {
        // One event every 2 ms never leaves the queue quiet for 3 ms.
        let config = pipeline_config(500, 20, 3);
        let mut rx = source((0..100).map(|_| (2, 1)).collect());
        let (n, took) = one_batch(&mut rx, Load::Backlog, &config).await;
        assert_eq!(took, Duration::from_millis(20), "the max wait closes it");
        assert!((10..=11).contains(&n), "every event of those 20 ms: {n}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_wait_as_long_as_the_max_wait_keeps_a_fixed_window_however_the_event_came() {
        // The coalescing window for rate-limited CDNs: bursts 30 ms apart share a 100 ms batch.
        let config = pipeline_config(500, 100, 100);
        for load in [Load::Light, Load::Backlog] {
            let mut rx = source(vec![(0, 5), (30, 5), (30, 5), (80, 5)]);
            let (n, took) = one_batch(&mut rx, load, &config).await;
            assert_eq!((n, took), (15, Duration::from_millis(100)), "{load:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_is_sent_at_once() {
        for (load, idle) in [(Load::Backlog, 1000), (Load::Light, 1000), (Load::Light, 1)] {
            let config = pipeline_config(10, 1000, idle);
            let mut rx = source(vec![(0, 25)]);
            let mut batch = vec![rx.recv().await.unwrap()];
            fill_batch(&mut rx, &mut batch, load, &config).await;
            assert_eq!(batch.len(), 10, "{load:?}");
            assert_eq!(one_batch(&mut rx, load, &config).await, (10, Duration::ZERO), "{load:?}");
        }
    }

    #[test]
    fn a_batch_is_coalesced_into_one_deduplicated_sorted_set() {
        let items = vec![
            item(&["product:2", "product:1"], &["category:5"]),
            item(&["product:1"], &["category:5", "category:7"]),
            item(&[], &["category:7"]),
        ];
        let batch = coalesce(&items);
        assert_eq!(batch.redis_keys, vec!["product:1", "product:2"]);
        assert_eq!(batch.redis_tags, vec!["category:5", "category:7"]);
        assert!(batch.surrogate_keys.is_empty() && batch.urls.is_empty());
    }
}
