//! The pipeline as stages: source events in, batched and coalesced invalidations out to every
//! layer of sinks, each layer at its own pace, dead letters for what cannot be done, and
//! acknowledgements only after all of that.
//!
//! ```text
//! source ─queue─▶ intake ──▶ layer 0 (Redis) ──▶ layer 1 (HTTP caches) ──▶ layer 2 (CDNs) ──▶ finish ──▶ ack
//!                  │  batch   bounded queue,       bounded queue,             …                 │ dead letters
//!                  │  rules   a task per sink,     a task per sink,                             └▶ second pass ─▶ ack
//!                  │  coalesce own batching        after layer_delay                               (repeat_after)
//!                  └─ every unit through every layer in order; one with nothing for a layer passes through
//! ```
//!
//! - **intake** ([`Pipeline::run`]): gathers a batch from the source queue (`batching.rs`),
//!   evaluates the rules once per event, coalesces the batch into one [`Invalidations`] and
//!   sends it on as a `Unit` (the batch's events travel with it, their acks included).
//! - **layers** (`layer.rs`): one task per layer (Redis 0, HTTP caches 1, CDNs 2, as configured),
//!   each with its own bounded queue (`pipeline.queue_capacity` events, held by a unit until it
//!   leaves the layer), and one task per sink of the layer: each sink takes what is queued for
//!   it (up to `pipeline.batch_max_events` events) as one merged batch at its own pace, so one
//!   sink that is down holds the units without holding the others. A unit goes on to the next
//!   layer, in order, once every sink of the layer confirmed it; the next layer starts on it
//!   only `layer_delay` after that (a unit a layer has nothing for passes through, in order).
//!   A slow layer therefore
//!   only slows itself: its queue fills while the layers before it keep going, and only when
//!   its queue is full does the layer before it wait, then intake, then the source.
//!   `cdc_invalidator_layer_queue_events{layer}` and
//!   `cdc_invalidator_layer_queue_wait_seconds_total{layer}` say which layer is holding.
//! - **finish** (`finish.rs`): dead letters (malformed, rule errors, every sink's rejections)
//!   written durably, then per-event metrics, then each event's [`crate::source::Ack`], or, with
//!   `sinks.timing.repeat_after`, a hand-over to the second-pass stage, which repeats the
//!   batch through the layers in order when it is due and acknowledges after that.
//!
//! **The delivery guarantee** is enforced by ownership: an event's `Ack` travels inside its
//! unit, and only `finish` (or the second pass) calls [`crate::source::Ack::finish`]. A unit
//! dropped anywhere (shutdown abandoning work, a fatal error) drops its acks unacknowledged, and
//! the source's watermark never moves past them: they are redelivered. Units reach `finish` in
//! the order intake made them, so dead letters are written in the order the events came.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::config::{LayerTiming, PipelineConfig};
use crate::dead_letter::{DeadLetterError, DeadLetters, Reason};
use crate::event::{ChangeEvent, Decoded};
use crate::rules::{Evaluation, Rules, Spare};
use crate::shutdown::Shutdown;
use crate::sink::{Invalidations, ItemKind, Sink};
use crate::source::SourceEvent;
use crate::telemetry::events::pipeline::{BatchGathered, RuleFailed};
use crate::telemetry::Metrics;

mod batching;
mod finish;
mod layer;
mod second_pass;

use batching::{fill_batch, BusyStreak};
use layer::{Layer, Route};

/// At most one log line per rule per this interval for rule errors (they are counted anyway).
const RULE_ERROR_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Why the pipeline stopped before its work was done (fatal: the daemon exits).
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A sink cannot work at all (bad configuration discovered at run time).
    #[error("{0}")]
    Sink(String),
    /// The dead-letter destination failed for good: nothing can be acknowledged.
    #[error(transparent)]
    DeadLetter(#[from] DeadLetterError),
    /// A stage's task panicked (a bug).
    #[error("a pipeline stage failed: {0}")]
    Stage(String),
}

/// How a stage stopped.
#[derive(Debug)]
enum StageError {
    /// Shutdown abandoned the work, or the stage after this one is gone (it failed, and its
    /// error is reported by that stage): nothing more to do here, nothing acknowledged.
    Stopped,
    Fatal(PipelineError),
}

/// The pipeline's stages, wired by [`Pipeline::run`]. Public so tests and benchmarks can drive
/// it with any source and sinks.
pub struct Pipeline {
    config: PipelineConfig,
    /// The running rules; read once per batch, so a reload swaps them between batches.
    rules: watch::Receiver<Arc<Rules>>,
    sinks: Vec<Arc<dyn Sink>>,
    dead_letters: DeadLetters,
    metrics: Arc<Metrics>,
    /// Each sink's layer (parallel to `sinks`, which are in layer order) and the pacing.
    layers: Vec<u8>,
    timing: LayerTiming,
    /// Read replicas gating the second pass (`freshness.replicas`).
    freshness: Option<crate::freshness::Replicas>,
}

/// One event of a batch and what the rules made of it.
struct Item {
    event: SourceEvent,
    /// `None` when the event is not a change (the rules did not run).
    ruled: Option<Ruled>,
    /// Set when the event must be dead-lettered (reason, sentence).
    dead: Option<(Reason, String)>,
}

/// What the rules made of one event. Its items themselves are in the unit's batch (moved there,
/// not copied): `asked[kind]` is the range of `Unit::asked[kind]` holding their indices in the
/// batch's list of that kind, ascending.
struct Ruled {
    /// Whether some rule applied to it (else its outcome is `no_match`).
    matched: bool,
    asked: [std::ops::Range<usize>; ItemKind::COUNT],
}

impl Item {
    /// Whether this event asked for any item of `kinds`.
    fn asks(&self, kinds: &[ItemKind]) -> bool {
        self.ruled
            .as_ref()
            .is_some_and(|r| kinds.iter().any(|&k| r.asked.get(k.index()).is_some_and(|a| !a.is_empty())))
    }

    /// Whether this event asked for anything at all.
    fn asks_any(&self) -> bool {
        self.ruled.as_ref().is_some_and(|r| r.asked.iter().any(|a| !a.is_empty()))
    }
}

/// What travels between stages: one intake batch, its coalesced invalidations, and its events
/// (whose acks make the unit the carrier of the delivery guarantee).
struct Unit {
    items: Vec<Item>,
    batch: Invalidations,
    /// Per kind, the indices in `batch` of what each event asked for, event after event (see
    /// [`Ruled::asked`]).
    asked: [Vec<usize>; ItemKind::COUNT],
    /// The earliest instant the next layer may start on it (`layer_delay` after the last layer
    /// that worked on it confirmed it).
    not_before: Option<tokio::time::Instant>,
}

/// The indices in `batch` of the items of `kind` that `item` asked for, ascending (`asked` is
/// its unit's [`Unit::asked`]).
fn asked_by<'a>(asked: &'a [Vec<usize>; ItemKind::COUNT], item: &Item, kind: ItemKind) -> &'a [usize] {
    let Some(ruled) = &item.ruled else { return &[] };
    let (Some(range), Some(indices)) = (ruled.asked.get(kind.index()), asked.get(kind.index())) else { return &[] };
    indices.get(range.clone()).unwrap_or_default()
}

/// Moves the items of `set` to the end of `gathered`'s lists (one per kind, in
/// [`ItemKind::ALL`] order), leaving `set`'s lists empty with their room; says where they went.
fn take_items(
    gathered: &mut [Vec<String>; ItemKind::COUNT],
    set: &mut Invalidations,
) -> [std::ops::Range<usize>; ItemKind::COUNT] {
    std::array::from_fn(|k| {
        // `k` is below COUNT, the length of both arrays.
        let (Some(kind), Some(to)) = (ItemKind::ALL.get(k), gathered.get_mut(k)) else { return 0..0 };
        let start = to.len();
        to.append(set.items_mut(*kind));
        start..to.len()
    })
}

/// What `item` asked for, as a set of its own (copied out of its unit's `batch`).
fn asked_set(batch: &Invalidations, asked: &[Vec<usize>; ItemKind::COUNT], item: &Item) -> Option<Invalidations> {
    item.ruled.as_ref()?;
    let mut set = Invalidations::default();
    for kind in ItemKind::ALL {
        let all = batch.items(kind);
        let items = asked_by(asked, item, kind).iter().filter_map(|&i| all.get(i).cloned());
        set.items_mut(kind).extend(items);
    }
    Some(set)
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
            layers,
            timing: LayerTiming::default(),
            freshness: None,
        }
    }

    /// Gates every event's second pass on the read replicas having replayed its commit.
    pub fn with_freshness(mut self, replicas: crate::freshness::Replicas) -> Pipeline {
        self.freshness = Some(replicas);
        self
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

    /// Takes the rules from `rules` (a [`crate::rules::reload::Reloader`]'s receiver) from the
    /// next batch on.
    pub fn with_rules_updates(mut self, rules: watch::Receiver<Arc<Rules>>) -> Pipeline {
        self.rules = rules;
        self
    }

    /// Runs every stage until the source closes the queue (after shutdown stopped it) and
    /// everything queued is finished, or until shutdown abandons the work, or until a stage
    /// fails (that error is returned).
    pub async fn run(self, rx: mpsc::Receiver<SourceEvent>, shutdown: &Shutdown) -> Result<(), PipelineError> {
        let Pipeline { config, rules, sinks, dead_letters, metrics, layers, timing, freshness } = self;
        let mut stages: JoinSet<Result<(), StageError>> = JoinSet::new();

        // The sinks grouped by layer, in layer order.
        let mut grouped: Vec<(u8, Vec<Arc<dyn Sink>>)> = Vec::new();
        for (sink, layer) in sinks.iter().zip(layers.iter().copied()) {
            match grouped.last_mut() {
                Some((l, group)) if *l == layer => group.push(sink.clone()),
                _ => grouped.push((layer, vec![sink.clone()])),
            }
        }

        // Second passes: the finish stage hands batches over; the pending count holds intake.
        let (pending_tx, pending_rx) = watch::channel(0usize);
        let (finish_tx, finish_rx) = layer::finish_queue(config.queue_capacity, config.batch_max_events);
        let repeat = if timing.repeat_after.is_zero() && freshness.is_none() {
            None
        } else {
            let (tx, rx) = mpsc::unbounded_channel();
            let second = finish::SecondPasses {
                layers: grouped.clone(),
                timing: timing.clone(),
                metrics: metrics.clone(),
                pending: pending_tx,
                freshness: freshness.clone(),
            };
            stages.spawn(second.run(rx, shutdown.clone()));
            Some(tx)
        };

        // Every layer's queue, then each stage with the sender of the stage after it (so that a
        // layer's queue closes once the stage before it is done: the drain cascades).
        let (senders, receivers): (Vec<_>, Vec<_>) =
            grouped.iter().map(|(layer, _)| layer::queue(*layer, config.queue_capacity, &metrics)).unzip();
        let route_to = |i: usize| match senders.get(i) {
            Some(layer) => Route::Layer(layer.clone()),
            None => Route::Finish(finish_tx.clone()),
        };
        for (i, ((_, sinks), rx)) in grouped.iter().zip(receivers).enumerate() {
            let mut kinds: Vec<ItemKind> = sinks.iter().flat_map(|s| s.kinds().iter().copied()).collect();
            kinds.sort_unstable();
            kinds.dedup();
            let stage = Layer {
                sinks: sinks.clone(),
                kinds,
                delay: timing.layer_delay,
                batch_max_events: config.batch_max_events,
                metrics: metrics.clone(),
            };
            stages.spawn(stage.run(rx, route_to(i + 1), shutdown.clone()));
        }
        let finisher = finish::Finish {
            dead_letters,
            sinks: sinks.clone(),
            metrics: metrics.clone(),
            timing: timing.clone(),
            repeat,
            freshness,
        };
        stages.spawn(finisher.run(finish_rx, shutdown.clone()));

        let intake = Intake {
            route: route_to(0),
            config,
            rules,
            metrics,
            rule_error_logged: HashMap::new(),
            repeat_max_events: timing.repeat_max_events,
            pending: pending_rx,
            spare: Spare::default(),
        };
        drop(senders);
        drop(finish_tx);
        let intake_result = intake.run(rx, &mut stages, shutdown).await;

        // Intake is done (its route dropped): the queues close one after the other as each
        // stage drains, or every stage stops at once when shutdown abandons the work.
        let mut result = match intake_result {
            Err(StageError::Fatal(e)) => Err(e),
            _ => Ok(()),
        };
        if result.is_err() {
            stages.abort_all();
        }
        while let Some(joined) = stages.join_next().await {
            if let Some(e) = failure(joined) {
                if result.is_ok() {
                    result = Err(e);
                }
                // A fatal error stops the rest at once; their units stay unacknowledged.
                stages.abort_all();
            }
        }
        if shutdown.is_abandoned() {
            tracing::warn!(
                "shutdown grace period over: in-flight events abandoned unacknowledged (they will be redelivered)"
            );
        }
        result
    }
}

/// The error of a stage that ended, if it failed (a stage that stopped, finished or was aborted
/// has nothing to report).
fn failure(joined: Result<Result<(), StageError>, tokio::task::JoinError>) -> Option<PipelineError> {
    match joined {
        Ok(Ok(())) | Ok(Err(StageError::Stopped)) => None,
        Ok(Err(StageError::Fatal(e))) => Some(e),
        Err(e) if e.is_cancelled() => None,
        Err(e) => Some(PipelineError::Stage(e.to_string())),
    }
}

/// Why a stage stops when one of its workers ended while it still ran: the worker failed for
/// good, or was stopped.
fn worker_ended(joined: Result<Result<(), StageError>, tokio::task::JoinError>) -> StageError {
    match failure(joined) {
        Some(e) => StageError::Fatal(e),
        None => StageError::Stopped,
    }
}

/// The first stage: batches from the source queue, rules, coalescing.
struct Intake {
    route: Route,
    config: PipelineConfig,
    rules: watch::Receiver<Arc<Rules>>,
    metrics: Arc<Metrics>,
    /// Last time each rule's error was logged (rate limit).
    rule_error_logged: HashMap<Arc<str>, Instant>,
    repeat_max_events: usize,
    /// Events waiting for their second pass: while there are `repeat_max_events`, intake waits.
    pending: watch::Receiver<usize>,
    /// The strings of the duplicates each batch's coalescing dropped, to render the next
    /// items into (see [`Spare`]).
    spare: Spare,
}

impl Intake {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<SourceEvent>,
        stages: &mut JoinSet<Result<(), StageError>>,
        shutdown: &Shutdown,
    ) -> Result<(), StageError> {
        let max = self.config.batch_max_events;
        let mut batch: Vec<SourceEvent> = Vec::with_capacity(max);
        let mut streak = BusyStreak::default();
        loop {
            // While too many events wait for their second pass, take no new events (the source
            // pauses) until the oldest pass is done.
            if *self.pending.borrow() >= self.repeat_max_events {
                let limit = self.repeat_max_events;
                tokio::select! {
                    biased;
                    _ = shutdown.abandoned() => return Err(StageError::Stopped),
                    r = self.pending.wait_for(|n| *n < limit) => if r.is_err() { return Err(StageError::Stopped) },
                }
            }
            // Wait for the first event, then gather more: how long depends on whether the
            // pipeline has been busy (BusyStreak). The tokio clock is the std clock, except
            // under a paused test clock. A stage that fails ends intake at once.
            let waiting_since = tokio::time::Instant::now().into_std();
            let n = loop {
                tokio::select! {
                    biased;
                    _ = shutdown.abandoned() => return Err(StageError::Stopped),
                    Some(joined) = stages.join_next() => if let Some(e) = failure(joined) {
                        return Err(StageError::Fatal(e));
                    },
                    n = rx.recv_many(&mut batch, max) => break n,
                }
            };
            if n == 0 {
                return Ok(());
            }
            let Some(first) = batch.first() else { continue };
            let load = streak.load(first.received, waiting_since, self.config.batch_idle_wait);
            self.metrics.emit(BatchGathered { load: load.report() });
            fill_batch(&mut rx, &mut batch, load, &self.config).await;
            let events = std::mem::replace(&mut batch, Vec::with_capacity(max));
            let unit = self.prepare(events);
            self.route.forward(unit, shutdown).await?;
        }
    }

    /// Rules and coalescing for one batch.
    fn prepare(&mut self, events: Vec<SourceEvent>) -> Unit {
        self.metrics.batch_events.observe(events.len() as f64);
        // The upstream share of staleness: commit to entering the daemon (the receipt instant
        // mapped onto the wall clock the commit timestamp is on).
        let (wall, mono) = (SystemTime::now(), Instant::now());
        // Observed locally and added to the histogram once per batch (one atomic update, not
        // one per event).
        let mut source_delay = self.metrics.source_delay.tally();
        for event in &events {
            if let Some(origin) = origin(event) {
                let entered = wall.checked_sub(mono.saturating_duration_since(event.received)).unwrap_or(wall);
                source_delay.observe(entered.duration_since(origin).unwrap_or_default().as_secs_f64());
            }
        }
        source_delay.flush();
        // One rules version for the whole batch.
        let rules = self.rules.borrow_and_update().clone();
        // Every event is evaluated into the same `Evaluation`, whose items are then moved into
        // the batch's lists: one allocation per rendered item, none per event for the lists.
        let mut eval = Evaluation::default();
        let mut gathered: [Vec<String>; ItemKind::COUNT] = Default::default();
        // Each event goes into its item once and stays there: an event is a few hundred bytes,
        // and moving it out of the batch, into an item, then into the list measured as about
        // 200 instructions per event (benches/pipeline_cost.rs).
        let mut items: Vec<Item> = events.into_iter().map(|event| Item { event, ruled: None, dead: None }).collect();
        for item in &mut items {
            // Rows decoded for other rules than these are decoded again in full.
            crate::source::encoded::unproject(&mut item.event, rules.projection());
            let event = &item.event;
            let (ruled, dead) = match &event.decoded {
                Err(m) => (None, Some((Reason::Malformed, m.0.clone()))),
                Ok(Decoded::NoChange(_)) => (None, None),
                Ok(Decoded::Change(change)) => {
                    rules.evaluate_reusing(change, &mut eval, &mut self.spare);
                    // Generations carry the event's position (`sink::redis::generation`);
                    // only looked up when asked for (Debezium's LSN means parsing again).
                    if !eval.invalidations.items(ItemKind::RedisGeneration).is_empty() {
                        let position = crate::sink::redis::generation::position_of(event);
                        crate::sink::redis::generation::stamp(&mut eval.invalidations, position);
                    }
                    let dead = (!eval.errors.is_empty()).then(|| {
                        (
                            Reason::RuleError,
                            eval.errors.iter().map(|e| e.message.as_str()).collect::<Vec<_>>().join("; "),
                        )
                    });
                    self.log_rule_errors(event, &eval.errors);
                    let asked = take_items(&mut gathered, &mut eval.invalidations);
                    (Some(Ruled { matched: !eval.matched_rules.is_empty(), asked }), dead)
                }
            };
            (item.ruled, item.dead) = (ruled, dead);
        }
        let mut duplicates = Vec::new();
        let (batch, asked) = Invalidations::gather(gathered, &mut duplicates);
        self.spare.refill(duplicates);
        self.metrics.batch_items.observe(ItemKind::ALL.iter().map(|&k| batch.items(k).len()).sum::<usize>() as f64);
        Unit { items, batch, asked, not_before: None }
    }

    /// Counts (and, at most every [`RULE_ERROR_LOG_INTERVAL`] per rule, logs) the rule errors of
    /// one event.
    fn log_rule_errors(&mut self, event: &SourceEvent, errors: &[crate::rules::RuleError]) {
        for err in errors {
            let now = Instant::now();
            let last = self.rule_error_logged.get(&err.rule);
            let log = last.is_none_or(|t| now.duration_since(*t) >= RULE_ERROR_LOG_INTERVAL);
            if log {
                self.rule_error_logged.insert(err.rule.clone(), now);
            }
            let table = change_of(event).map(|c| c.table.as_str()).unwrap_or("unknown");
            let (rule, position, message) = (&err.rule, &event.position, &err.message);
            self.metrics.emit(RuleFailed { rule, table, position, message, log });
        }
    }
}

fn change_of(event: &SourceEvent) -> Option<&ChangeEvent> {
    match &event.decoded {
        Ok(Decoded::Change(c)) => Some(c),
        _ => None,
    }
}

/// The staleness origin of an event: its database commit time, else the time it entered the log.
fn origin(event: &SourceEvent) -> Option<SystemTime> {
    change_of(event).and_then(|c| c.committed_at).or(event.logged_at)
}

#[cfg(test)]
mod tests;
