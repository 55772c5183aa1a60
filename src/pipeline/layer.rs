//! One layer of sinks as its own stage: a bounded queue in front, its own batching, every sink of
//! the layer at once, then on to the next layer (in order; a unit the layer has nothing for
//! passes through at once).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use prometheus::{Counter, IntGauge};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore, TryAcquireError};

use super::{origin, StageError, Unit};
use crate::shutdown::Shutdown;
use crate::sink::{Invalidations, ItemKind, Sink, SinkError, SinkReport};
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
    let label = layer.to_string();
    let queued = metrics.layer_queue_events.with_label_values(&[&label]);
    let waited = metrics.layer_queue_wait.with_label_values(&[&label]);
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
    async fn recv(&mut self) -> Option<Unit> {
        let queued = self.rx.recv().await?;
        Some(self.take(queued))
    }

    fn try_recv(&mut self) -> Option<Unit> {
        let queued = self.rx.try_recv().ok()?;
        Some(self.take(queued))
    }

    /// The unit leaves the queue: its room is free again.
    fn take(&self, queued: Queued) -> Unit {
        self.queued.sub(queued.events as i64);
        queued.unit
    }
}

/// Where a stage sends a unit next: the next layer, else `finish`. Every unit goes through
/// every layer's queue, in order, even one the layer has nothing to do for (it passes through
/// at once): so units reach `finish` in the order intake made them, and dead letters are
/// written in the order the events came.
pub(super) enum Route {
    Layer(LayerSender),
    /// Unbounded, but what travels on it is bounded by the layer queues before it.
    Finish(mpsc::UnboundedSender<Unit>),
}

impl Route {
    pub(super) async fn forward(&self, unit: Unit, shutdown: &Shutdown) -> Result<(), StageError> {
        match self {
            Route::Layer(layer) => layer.send(unit, shutdown).await,
            Route::Finish(finish) => finish.send(unit).map_err(|_| StageError::Stopped),
        }
    }
}

/// One layer's stage.
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

impl Layer {
    /// Takes units from the queue until every stage before it is done and the queue is empty, or
    /// shutdown abandons the work (the units it holds are dropped, unacknowledged).
    pub(super) async fn run(self, mut rx: LayerReceiver, route: Route, shutdown: Shutdown) -> Result<(), StageError> {
        // A unit taken from the queue whose `layer_delay` is not over yet: the next batch
        // starts with it.
        let mut held: Option<Unit> = None;
        loop {
            let first = match held.take() {
                Some(unit) => unit,
                None => tokio::select! {
                    biased;
                    _ = shutdown.abandoned() => return Err(StageError::Stopped),
                    unit = rx.recv() => match unit {
                        Some(unit) => unit,
                        None => return Ok(()),
                    },
                },
            };
            if !self.wants(&first) {
                // Nothing here for it, and nothing before it in this layer: on at once, with the
                // `layer_delay` of the layer that last worked on it still ahead of it.
                route.forward(first, &shutdown).await?;
                continue;
            }
            if let Some(at) = first.not_before {
                tokio::select! {
                    biased;
                    _ = shutdown.abandoned() => return Err(StageError::Stopped),
                    _ = tokio::time::sleep_until(at) => {}
                }
            }
            // The layer's own batching: whatever queued behind the first unit while the layer
            // was busy goes out with it, so a slow layer sends fewer, larger batches.
            let mut events = first.items.len();
            let mut units = vec![first];
            while events < self.batch_max_events {
                let Some(next) = rx.try_recv() else { break };
                // A unit this layer has nothing for, or must not start yet, waits for the next
                // round (not overtaking the ones before it).
                if !self.wants(&next) || next.not_before.is_some_and(|at| at > tokio::time::Instant::now()) {
                    held = Some(next);
                    break;
                }
                events += next.items.len();
                units.push(next);
            }
            self.invalidate(&mut units, &shutdown).await?;
            let not_before = (!self.delay.is_zero()).then(|| tokio::time::Instant::now() + self.delay);
            for mut unit in units {
                unit.not_before = not_before;
                route.forward(unit, &shutdown).await?;
            }
        }
    }

    /// Whether some sink of this layer has work in `unit`.
    fn wants(&self, unit: &Unit) -> bool {
        self.kinds.iter().any(|&k| !unit.batch.items(k).is_empty())
    }

    /// Runs every sink of the layer on the units' merged batch; marks the events that asked for
    /// a rejected item for the dead-letter destination.
    async fn invalidate(&self, units: &mut [Unit], shutdown: &Shutdown) -> Result<(), StageError> {
        let rejections = {
            let merged;
            let batch = match &*units {
                [one] => &one.batch,
                _ => {
                    merged = Invalidations::union(units.iter().map(|u| &u.batch));
                    &merged
                }
            };
            let done = invalidate_all(&self.sinks, batch, shutdown).await?;
            let mut rejections = Vec::new();
            for d in done {
                let name = d.sink.name();
                self.metrics.sink_batch_duration.with_label_values(&[name]).observe(d.took.as_secs_f64());
                for (kind, n) in &d.report.confirmed {
                    self.metrics.invalidations.with_label_values(&[name, kind.as_str()]).inc_by(*n);
                }
                let staleness = self.metrics.staleness.with_label_values(&[name]);
                let processing = self.metrics.processing.with_label_values(&[name]);
                let kinds = d.sink.kinds();
                for item in units.iter().flat_map(|u| &u.items).filter(|i| i.asks(kinds)) {
                    if let Some(origin) = origin(&item.event) {
                        staleness.observe(d.at.duration_since(origin).unwrap_or_default().as_secs_f64());
                    }
                    processing.observe(d.at_instant.saturating_duration_since(item.event.received).as_secs_f64());
                }
                for rejected in &d.report.rejected {
                    let Some(value) = batch.items(rejected.kind).get(rejected.index) else { continue };
                    let sentence = format!("sink {name} rejected {} {value:?}: {}", rejected.kind, rejected.reason);
                    rejections.push((rejected.kind, value.clone(), sentence));
                }
            }
            rejections
        };
        for (kind, value, sentence) in rejections {
            for item in units.iter_mut().flat_map(|u| u.items.iter_mut()) {
                let wanted =
                    item.evaluation.as_ref().is_some_and(|e| e.invalidations.items(kind).binary_search(&value).is_ok());
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
        Ok(())
    }
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
