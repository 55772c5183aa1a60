//! One layer of sinks as its own stage: a bounded queue in front, one task per sink (each at its
//! own pace, with its own batching), then on to the next layer in order once every sink of the
//! layer is done with a unit (a unit the layer has nothing for passes through, in order).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use prometheus::{Counter, IntGauge};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio::task::JoinSet;

use super::{asked_by, asked_set, origin, StageError, Unit};
use crate::shutdown::Shutdown;
use crate::sink::{Invalidations, ItemKind, Origins, Sink, SinkError, SinkReport};
use crate::source::SourceEvent;
use crate::telemetry::events::pipeline::{self as report, SinkBatchFinished};
use crate::telemetry::histogram::BatchHistogram;
use crate::telemetry::Metrics;

/// A unit in a layer's queue, holding its share of the queue's room until the layer takes it.
struct Queued {
    unit: Unit,
    events: usize,
    _room: OwnedSemaphorePermit,
}

/// The sending half of a layer's queue. The queue is bounded in events, not units (a unit is one
/// intake batch, from one event to `batch_max_events`), so that its memory is bounded whatever
/// the load; the channel itself is unbounded and the semaphore is the bound.
#[derive(Clone)]
pub(super) struct LayerSender {
    tx: mpsc::UnboundedSender<Queued>,
    room: Arc<Semaphore>,
    capacity: usize,
    queued: IntGauge,
    waited: Counter,
}

/// The receiving half, owned by the layer's task.
pub(super) struct LayerReceiver {
    rx: mpsc::UnboundedReceiver<Queued>,
    queued: IntGauge,
}

/// A queue of `capacity` events for the layer `layer`.
pub(super) fn queue(layer: u8, capacity: usize, metrics: &Metrics) -> (LayerSender, LayerReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    let capacity = capacity.clamp(1, Semaphore::MAX_PERMITS);
    let (queued, waited) = report::layer_queue(metrics, layer);
    let sender = LayerSender { tx, room: Arc::new(Semaphore::new(capacity)), capacity, queued: queued.clone(), waited };
    (sender, LayerReceiver { rx, queued })
}

impl LayerSender {
    /// Queues `unit`, waiting for room while the queue is full: this wait is the backpressure
    /// of a slow layer, and it is counted against this layer.
    async fn send(&self, unit: Unit, shutdown: &Shutdown) -> Result<(), StageError> {
        let events = unit.items.len();
        // A unit larger than the whole queue takes the whole queue (never waits forever).
        let n = u32::try_from(events.clamp(1, self.capacity)).unwrap_or(u32::MAX);
        let room = match self.room.clone().try_acquire_many_owned(n) {
            Ok(room) => room,
            Err(TryAcquireError::Closed) => return Err(StageError::Stopped),
            Err(TryAcquireError::NoPermits) => {
                // tokio's clock: the std clock, except under a paused test clock.
                let started = tokio::time::Instant::now();
                let room = tokio::select! {
                    biased;
                    _ = shutdown.abandoned() => return Err(StageError::Stopped),
                    room = self.room.clone().acquire_many_owned(n) => room.map_err(|_| StageError::Stopped)?,
                };
                self.waited.inc_by(started.elapsed().as_secs_f64());
                room
            }
        };
        self.queued.add(events as i64);
        self.tx.send(Queued { unit, events, _room: room }).map_err(|_| {
            self.queued.sub(events as i64);
            StageError::Stopped
        })
    }
}

impl LayerReceiver {
    async fn recv(&mut self) -> Option<Queued> {
        self.rx.recv().await
    }

    /// The unit leaves the layer: its room is free again. A unit holds its room until every
    /// sink of the layer is done with it, not only until the layer takes it: so the events a
    /// healthy sink runs ahead of a stuck one are bounded by the queue's capacity, and the
    /// gauge shows the layer holding while one of its sinks is.
    fn leave(&self, queued: Queued) -> Unit {
        self.queued.sub(queued.events as i64);
        queued.unit
    }
}

/// The queue in front of `finish`: room for about one layer queue's worth of events in full
/// batches (`queue_capacity / batch_max_events` units, at least 2), so the events it holds are
/// bounded by `queue_capacity + batch_max_events` whatever the units' sizes. Smaller units
/// under light load only make it hold fewer events: `finish` takes microseconds per unit.
pub(super) fn finish_queue(
    queue_capacity: usize,
    batch_max_events: usize,
) -> (mpsc::Sender<Unit>, mpsc::Receiver<Unit>) {
    mpsc::channel((queue_capacity / batch_max_events.max(1)).max(2))
}

/// Where a stage sends a unit next: the next layer, else `finish`. Every unit goes through
/// every layer's queue, in order, even one the layer has nothing to do for (it passes through
/// at once): so units reach `finish` in the order intake made them, and dead letters are
/// written in the order the events came.
pub(super) enum Route {
    Layer(LayerSender),
    /// Bounded in units (see [`finish_queue`]): a unit leaving the last layer frees its room
    /// there, so while `finish` is held up (the dead-letter destination retrying) this bound
    /// is what stops the layers, and with them intake and the source.
    Finish(mpsc::Sender<Unit>),
}

impl Route {
    pub(super) async fn forward(&self, unit: Unit, shutdown: &Shutdown) -> Result<(), StageError> {
        match self {
            Route::Layer(layer) => layer.send(unit, shutdown).await,
            Route::Finish(finish) => tokio::select! {
                biased;
                _ = shutdown.abandoned() => Err(StageError::Stopped),
                sent = finish.send(unit) => sent.map_err(|_| StageError::Stopped),
            },
        }
    }
}

/// One layer's stage: a dispatcher (this task) and one worker task per sink. The dispatcher
/// takes each unit from the layer's queue and hands its batch to every sink that serves one of
/// its kinds, each through the sink's own queue; each worker runs its sink at the sink's own
/// pace, with its own batching. A unit leaves the layer, in order, once every one of those
/// sinks confirmed it (or rejected some of it). So a sink that is down holds the units (and
/// their acks) without holding the other sinks of the layer, which run ahead of it by up to
/// the layer queue's capacity (every unit in the layer holds its room until it leaves).
pub(super) struct Layer {
    pub(super) sinks: Vec<Arc<dyn Sink>>,
    /// Every kind some sink of the layer serves: a unit with none of them passes through.
    pub(super) kinds: Vec<ItemKind>,
    /// `sinks.timing.layer_delay`: how long after this layer confirmed a unit the next layer
    /// may start on it.
    pub(super) delay: Duration,
    /// At most about this many events per merged batch.
    pub(super) batch_max_events: usize,
    pub(super) metrics: Arc<Metrics>,
}

/// A unit in the layer, waiting for its sinks.
struct InLayer {
    seq: u64,
    queued: Queued,
    /// The unit's batch, shared with the workers while they work on it.
    batch: Arc<Invalidations>,
    /// How many sinks have not answered yet.
    waiting: usize,
    /// Whether some sink worked on it (else it passes through with its `not_before`).
    worked: bool,
    /// Each sink's rejections (kind, value, sentence), indexed like `Layer::sinks`, so that a
    /// dead letter's sentence lists them in sink order whatever order the sinks answered in.
    rejections: Vec<Vec<Rejection>>,
}

type Rejection = (ItemKind, String, String);

/// A unit's batch for one sink.
struct Work {
    seq: u64,
    batch: Arc<Invalidations>,
    events: usize,
    not_before: Option<tokio::time::Instant>,
}

/// A sink's answer for one unit.
struct Answer {
    seq: u64,
    sink: usize,
    rejections: Vec<Rejection>,
    /// When the sink confirmed the batch (wall clock, monotonic): the layer records the
    /// sink's staleness and processing figures of the unit's events from it.
    confirmed: Option<(SystemTime, Instant)>,
}

/// A sink's staleness and processing histograms, looked up on its first answer.
type Latency = Option<(BatchHistogram, BatchHistogram)>;

impl Layer {
    /// Takes units from the queue until every stage before it is done, the queue is empty and
    /// every sink is done with what it took; or until shutdown abandons the work or a sink
    /// fails for good (the units it holds are dropped, unacknowledged).
    pub(super) async fn run(self, mut rx: LayerReceiver, route: Route, shutdown: Shutdown) -> Result<(), StageError> {
        let (answers_tx, mut answers) = mpsc::unbounded_channel();
        // Dropped with this task (an abandon, a failure, an abort): the workers stop with it.
        let mut workers: JoinSet<Result<(), StageError>> = JoinSet::new();
        let mut to_sinks = Vec::with_capacity(self.sinks.len());
        for (index, sink) in self.sinks.iter().enumerate() {
            // Unbounded: what it holds is bounded by the layer queue's room, which every unit
            // holds until it leaves the layer.
            let (tx, rx) = mpsc::unbounded_channel();
            to_sinks.push(tx);
            let worker = Worker {
                index,
                sink: sink.clone(),
                batch_max_events: self.batch_max_events,
                metrics: self.metrics.clone(),
                answers: answers_tx.clone(),
            };
            workers.spawn(worker.run(rx, shutdown.clone()));
        }
        drop(answers_tx);

        // A sink that tells applications about each batch (the Redis broadcast, the warm-up
        // stream) needs the batch's origins; gathered only then, once per unit.
        let wants_origins = self.sinks.iter().any(|s| s.wants_origins());
        let mut latency: Vec<Latency> = vec![None; self.sinks.len()];
        let mut in_layer: VecDeque<InLayer> = VecDeque::new();
        let mut next_seq: u64 = 0;
        let mut open = true;
        while open || !in_layer.is_empty() {
            tokio::select! {
                biased;
                _ = shutdown.abandoned() => return Err(StageError::Stopped),
                // While the layer runs, a worker only ends when it failed or was stopped.
                Some(joined) = workers.join_next() => return Err(super::worker_ended(joined)),
                Some(answer) = answers.recv() => {
                    let front = in_layer.front().map_or(0, |u| u.seq);
                    let at = usize::try_from(answer.seq.saturating_sub(front)).unwrap_or(usize::MAX);
                    if let Some(unit) = in_layer.get_mut(at) {
                        unit.waiting = unit.waiting.saturating_sub(1);
                        let sink = self.sinks.get(answer.sink);
                        if let (Some(confirmed), Some(sink), Some(latency)) =
                            (answer.confirmed, sink, latency.get_mut(answer.sink))
                        {
                            let latency = latency.get_or_insert_with(|| report::sink_latency(&self.metrics, sink.name()));
                            observe_latency(&unit.queued.unit, sink.kinds(), confirmed, latency);
                        }
                        if let Some(slot) = unit.rejections.get_mut(answer.sink) {
                            *slot = answer.rejections;
                        }
                    }
                }
                queued = rx.recv(), if open => match queued {
                    None => open = false,
                    Some(mut queued) => {
                        let seq = next_seq;
                        next_seq += 1;
                        let mut batch = std::mem::take(&mut queued.unit.batch);
                        if wants_origins && batch.origins().is_none() && self.wants(&batch) {
                            // Each event's own set, copied out of the batch (only for such a layer).
                            let unit = &queued.unit;
                            let asked: Vec<(&SourceEvent, Invalidations)> = unit
                                .items
                                .iter()
                                .filter_map(|i| Some((&i.event, asked_set(&batch, &unit.asked, i)?)))
                                .collect();
                            batch.set_origins(Origins::of(asked.iter().map(|(event, set)| (*event, set))));
                        }
                        let batch = Arc::new(batch);
                        let mut waiting = 0;
                        if self.wants(&batch) {
                            for (sink, tx) in self.sinks.iter().zip(&to_sinks) {
                                if !sink.kinds().iter().any(|&k| !batch.items(k).is_empty()) {
                                    continue;
                                }
                                let work = Work {
                                    seq,
                                    batch: batch.clone(),
                                    events: queued.events,
                                    not_before: queued.unit.not_before,
                                };
                                tx.send(work).map_err(|_| StageError::Stopped)?;
                                waiting += 1;
                            }
                        }
                        let rejections = vec![Vec::new(); self.sinks.len()];
                        in_layer.push_back(InLayer { seq, queued, batch, waiting, worked: waiting > 0, rejections });
                    }
                },
            }
            // Every unit at the front that all its sinks are done with leaves, in order.
            while in_layer.front().is_some_and(|u| u.waiting == 0) {
                let Some(done) = in_layer.pop_front() else { break };
                let unit = self.leave(done, &rx);
                route.forward(unit, &shutdown).await?;
            }
        }
        // Everything is through: the workers end once their queues close.
        drop(to_sinks);
        while let Some(joined) = workers.join_next().await {
            if let Some(e) = super::failure(joined) {
                return Err(StageError::Fatal(e));
            }
        }
        Ok(())
    }

    /// Whether some sink of this layer has work in `batch`.
    fn wants(&self, batch: &Invalidations) -> bool {
        self.kinds.iter().any(|&k| !batch.items(k).is_empty())
    }

    /// The unit leaves the layer: its batch back (the workers are done with it), the events
    /// that asked for a rejected item marked for the dead-letter destination, and the next
    /// layer's `layer_delay` ahead of it.
    fn leave(&self, done: InLayer, rx: &LayerReceiver) -> Unit {
        let InLayer { queued, batch, worked, rejections, .. } = done;
        let mut unit = rx.leave(queued);
        // The workers drop their share before they answer, so this rarely copies.
        unit.batch = Arc::try_unwrap(batch).unwrap_or_else(|shared| (*shared).clone());
        if !worked {
            // Nothing here for it: on with the `layer_delay` of the layer that last worked on it
            // still ahead of it.
            return unit;
        }
        for (kind, value, sentence) in rejections.into_iter().flatten() {
            // The events that asked for it: those whose indices hold its index in the batch.
            let Ok(index) = unit.batch.items(kind).binary_search(&value) else { continue };
            for item in unit.items.iter_mut() {
                let wanted = asked_by(&unit.asked, item, kind).binary_search(&index).is_ok();
                if wanted {
                    item.dead = Some(match item.dead.take() {
                        Some((_, earlier)) => {
                            (crate::dead_letter::Reason::SinkRejected, format!("{earlier} {sentence}"))
                        }
                        None => (crate::dead_letter::Reason::SinkRejected, sentence.clone()),
                    });
                }
            }
        }
        unit.not_before = (!self.delay.is_zero()).then(|| tokio::time::Instant::now() + self.delay);
        unit
    }
}

/// One sink of a layer as its own task: takes the batches the layer hands it, merges what
/// queued while it was busy, runs the sink, records its figures and answers for each unit.
struct Worker {
    index: usize,
    sink: Arc<dyn Sink>,
    batch_max_events: usize,
    metrics: Arc<Metrics>,
    answers: mpsc::UnboundedSender<Answer>,
}

impl Worker {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<Work>, shutdown: Shutdown) -> Result<(), StageError> {
        // A batch taken whose `layer_delay` is not over yet: the next round starts with it.
        let mut held: Option<Work> = None;
        loop {
            let first = match held.take() {
                Some(work) => work,
                None => tokio::select! {
                    biased;
                    _ = shutdown.abandoned() => return Err(StageError::Stopped),
                    work = rx.recv() => match work {
                        Some(work) => work,
                        None => return Ok(()),
                    },
                },
            };
            if let Some(at) = first.not_before {
                tokio::select! {
                    biased;
                    _ = shutdown.abandoned() => return Err(StageError::Stopped),
                    _ = tokio::time::sleep_until(at) => {}
                }
            }
            // The sink's own batching: whatever queued behind the first batch while the sink
            // was busy goes out with it, so a slow sink sends fewer, larger batches.
            let mut events = first.events;
            let mut works = vec![first];
            while events < self.batch_max_events {
                let Ok(next) = rx.try_recv() else { break };
                // One that must not start yet waits for the next round (not overtaking).
                if next.not_before.is_some_and(|at| at > tokio::time::Instant::now()) {
                    held = Some(next);
                    break;
                }
                events += next.events;
                works.push(next);
            }
            for answer in self.invalidate(works, &shutdown).await? {
                self.answers.send(answer).map_err(|_| StageError::Stopped)?;
            }
        }
    }

    /// Runs the sink on the merged batch of `works`, records its figures, and says what it
    /// rejected of each unit.
    async fn invalidate(&self, works: Vec<Work>, shutdown: &Shutdown) -> Result<Vec<Answer>, StageError> {
        let merged;
        let batch = match works.as_slice() {
            [one] => &*one.batch,
            _ => {
                merged = Invalidations::union(works.iter().map(|w| &*w.batch));
                &merged
            }
        };
        let done = invalidate_all(std::slice::from_ref(&self.sink), batch, shutdown).await?;
        let mut answers: Vec<Answer> = works
            .iter()
            .map(|w| Answer { seq: w.seq, sink: self.index, rejections: Vec::new(), confirmed: None })
            .collect();
        for d in done {
            let name = d.sink.name();
            self.metrics.emit(SinkBatchFinished { sink: name, took: d.took, confirmed: &d.report.confirmed });
            for answer in &mut answers {
                answer.confirmed = Some((d.at, d.at_instant));
            }
            for rejected in &d.report.rejected {
                let Some(value) = batch.items(rejected.kind).get(rejected.index) else { continue };
                let sentence = format!("sink {name} rejected {} {value:?}: {}", rejected.kind, rejected.reason);
                for (work, answer) in works.iter().zip(answers.iter_mut()) {
                    if work.batch.items(rejected.kind).binary_search(value).is_ok() {
                        answer.rejections.push((rejected.kind, value.clone(), sentence.clone()));
                    }
                }
            }
        }
        // `works` (and their shares of each unit's batch) are dropped here, before the answers
        // go out: the layer then takes each batch back without copying it.
        Ok(answers)
    }
}

/// A sink's staleness (from each event's origin) and processing time (from its receipt), the
/// sink having confirmed at `confirmed`, over the events of `unit` that asked it for one of
/// `kinds`, into its histograms `latency`: counted locally and added once per unit, before the
/// unit can leave the layer (and so before any of its events is acknowledged). Recorded by the
/// layer, which holds the events, rather than by the sink's worker, which would need a copy of
/// each event's instants.
fn observe_latency(
    unit: &Unit,
    kinds: &[ItemKind],
    (at, at_instant): (SystemTime, Instant),
    (staleness, processing): &(BatchHistogram, BatchHistogram),
) {
    let (mut staleness, mut processing) = (staleness.tally(), processing.tally());
    for item in unit.items.iter().filter(|i| i.asks(kinds)) {
        if let Some(origin) = origin(&item.event) {
            staleness.observe(at.duration_since(origin).unwrap_or_default().as_secs_f64());
        }
        processing.observe(at_instant.saturating_duration_since(item.event.received).as_secs_f64());
    }
    staleness.flush();
    processing.flush();
}

/// What one sink did with a batch, and when it confirmed.
pub(super) struct Done {
    pub(super) sink: Arc<dyn Sink>,
    pub(super) report: SinkReport,
    pub(super) took: Duration,
    pub(super) at: SystemTime,
    pub(super) at_instant: Instant,
}

/// Runs every sink of `sinks` that serves a kind `batch` holds, all at once; returns once every
/// one is done, or at the first that cannot be (shutdown abandoned it, or it failed for good:
/// the others are dropped mid-way, which their contract allows).
pub(super) async fn invalidate_all(
    sinks: &[Arc<dyn Sink>],
    batch: &Invalidations,
    shutdown: &Shutdown,
) -> Result<Vec<Done>, StageError> {
    let calls = sinks.iter().filter(|s| s.kinds().iter().any(|&k| !batch.items(k).is_empty())).map(|sink| async move {
        let started = Instant::now();
        match sink.invalidate(batch, shutdown).await {
            Ok(report) => Ok(Done {
                sink: sink.clone(),
                report,
                took: started.elapsed(),
                at: SystemTime::now(),
                at_instant: Instant::now(),
            }),
            Err(SinkError::Abandoned) => Err(StageError::Stopped),
            Err(SinkError::Fatal(m)) => {
                Err(StageError::Fatal(super::PipelineError::Sink(format!("sink {}: {m}", sink.name()))))
            }
        }
    });
    // Sinks stop at shutdown's abandon themselves (their contract); this is the backstop for
    // one that does not.
    tokio::select! {
        biased;
        _ = shutdown.abandoned() => Err(StageError::Stopped),
        done = futures::future::try_join_all(calls) => done,
    }
}
