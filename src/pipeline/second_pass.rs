//! The second pass (`sinks.timing.repeat_after`, `freshness.replicas`): each batch's
//! invalidations run again through the layers in order once due, and its events are
//! acknowledged after that.
//!
//! Each sink runs its second passes in its own task, one pass after the other, so a sink that
//! is down delays only its own repeats: another Redis target of the same layer repeats every
//! batch when it is due, and later batches that do not need the stuck sink finish meanwhile.
//! What still waits for the stuck sink, as it must:
//! - the batch's later layers (a CDN is purged again only after the caches in front of it, or
//!   it would refill from them),
//! - the acknowledgement of the batch's events (the source's watermark only ever commits the
//!   positions before the oldest event not yet finished),
//! - intake, once `repeat_max_events` events wait for their second pass.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::finish::SecondPass;
use super::layer::invalidate_all;
use super::StageError;
use crate::config::LayerTiming;
use crate::freshness::{Commit, Replicas, Waited};
use crate::shutdown::Shutdown;
use crate::sink::{Invalidations, Sink};
use crate::telemetry::events::pipeline::{self as report, SecondPassDone};
use crate::telemetry::Metrics;

/// The front pass's schedule: due, LSN, first pass done, replayed.
type Front = (tokio::time::Instant, Option<Commit>, tokio::time::Instant, Option<tokio::time::Instant>);

/// The second-pass stage: holds batches until they are due, then runs them through the layers
/// in order, each sink in its own task (module docs), `layer_delay` between layers.
pub(super) struct SecondPasses {
    pub(super) layers: Vec<(u8, Vec<Arc<dyn Sink>>)>,
    pub(super) timing: LayerTiming,
    pub(super) metrics: Arc<Metrics>,
    /// Events waiting for their second pass; intake waits while there are `repeat_max_events`.
    pub(super) pending: watch::Sender<usize>,
    pub(super) freshness: Option<Replicas>,
}

/// A pass one sink is to run.
struct Job {
    pass: u64,
    batch: Arc<Invalidations>,
    /// The staleness origins of the pass's events, for the sink's settled figure.
    origins: Arc<[SystemTime]>,
}

/// A pass on its way through the layers.
struct Running {
    batch: Arc<Invalidations>,
    acks: Vec<crate::source::Ack>,
    origins: Arc<[SystemTime]>,
    /// The first layer (index into `layers`) not started yet.
    next_layer: usize,
    /// Sinks of the layer in progress that have not confirmed yet.
    waiting: usize,
    /// Some layer ran: the next one waits `layer_delay` after it.
    worked: bool,
    /// When the next layer may start (`layer_delay` after the one before finished).
    not_before: Option<tokio::time::Instant>,
}

impl SecondPasses {
    /// Runs until `finish` is gone and every pass it handed over is done (pending passes still
    /// run when the source has stopped, within the shutdown grace period; abandoned ones stay
    /// unacknowledged and are redone).
    pub(super) async fn run(
        self,
        mut rx: mpsc::UnboundedReceiver<SecondPass>,
        shutdown: Shutdown,
    ) -> Result<(), StageError> {
        let (answers_tx, mut answers) = mpsc::unbounded_channel::<u64>();
        // Dropped with this task: the workers stop with it.
        let mut workers: JoinSet<Result<(), StageError>> = JoinSet::new();
        // One queue per sink, indexed like `layers` flattened.
        let mut to_sinks: Vec<Vec<mpsc::UnboundedSender<Job>>> = Vec::with_capacity(self.layers.len());
        for (_, sinks) in &self.layers {
            let mut queues = Vec::with_capacity(sinks.len());
            for sink in sinks {
                // Unbounded: the passes waiting are bounded by `repeat_max_events`.
                let (tx, rx) = mpsc::unbounded_channel();
                queues.push(tx);
                let worker = Worker { sink: sink.clone(), metrics: self.metrics.clone(), answers: answers_tx.clone() };
                workers.spawn(worker.run(rx, shutdown.clone()));
            }
            to_sinks.push(queues);
        }
        drop(answers_tx);

        let mut due: VecDeque<SecondPass> = VecDeque::new();
        let mut running: BTreeMap<u64, Running> = BTreeMap::new();
        let mut next_id: u64 = 0;
        let mut open = true;
        loop {
            self.stamp(&mut due);
            let front = due.front().map(|p| (p.due, p.lsn, p.since, p.replayed_at));
            if !open && front.is_none() && running.is_empty() {
                break;
            }
            let next_layer_at = running.values().filter_map(|r| r.not_before).min();
            tokio::select! {
                biased;
                _ = shutdown.abandoned() => return Err(StageError::Stopped),
                // While passes run, a worker only ends when its sink failed or it was stopped.
                Some(joined) = workers.join_next() => return Err(super::worker_ended(joined)),
                Some(id) = answers.recv() => {
                    let finished = match running.get_mut(&id) {
                        Some(run) => {
                            run.waiting = run.waiting.saturating_sub(1);
                            self.advance(id, run, &to_sinks)?
                        }
                        None => false,
                    };
                    if finished {
                        if let Some(run) = running.remove(&id) {
                            self.finished(run);
                        }
                    }
                }
                pass = rx.recv(), if open => match pass {
                    Some(pass) => {
                        self.pending.send_modify(|n| *n += pass.acks.len());
                        self.metrics.second_pass_pending_events.set(*self.pending.borrow() as i64);
                        due.push_back(pass);
                    }
                    None => open = false,
                },
                _ = sleep_until(next_layer_at), if next_layer_at.is_some() => {
                    let now = tokio::time::Instant::now();
                    let mut done = Vec::new();
                    for (id, run) in running.iter_mut().filter(|(_, r)| r.not_before.is_some_and(|at| at <= now)) {
                        if self.advance(*id, run, &to_sinks)? {
                            done.push(*id);
                        }
                    }
                    for id in done {
                        if let Some(run) = running.remove(&id) {
                            self.finished(run);
                        }
                    }
                }
                go = self.ready(front), if front.is_some() => {
                    if !go {
                        continue;
                    }
                    let Some(pass) = due.pop_front() else { continue };
                    let id = next_id;
                    next_id += 1;
                    let mut run = Running {
                        batch: Arc::new(pass.batch),
                        acks: pass.acks,
                        origins: pass.origins.into(),
                        next_layer: 0,
                        waiting: 0,
                        worked: false,
                        not_before: None,
                    };
                    if self.advance(id, &mut run, &to_sinks)? {
                        self.finished(run);
                    } else {
                        running.insert(id, run);
                    }
                }
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

    /// Moves a pass on once the layer in progress is done: waits out `layer_delay`, then hands
    /// the next layer with work for it to that layer's sinks. `true` once no layer is left.
    fn advance(
        &self,
        id: u64,
        run: &mut Running,
        to_sinks: &[Vec<mpsc::UnboundedSender<Job>>],
    ) -> Result<bool, StageError> {
        if run.waiting > 0 {
            return Ok(false);
        }
        let has_work = |sink: &Arc<dyn Sink>| sink.kinds().iter().any(|&k| !run.batch.items(k).is_empty());
        let Some(layer) = (run.next_layer..self.layers.len())
            .find(|&l| self.layers.get(l).is_some_and(|(_, s)| s.iter().any(has_work)))
        else {
            return Ok(true);
        };
        if run.worked && !self.timing.layer_delay.is_zero() {
            let now = tokio::time::Instant::now();
            match run.not_before {
                None => {
                    run.not_before = Some(now + self.timing.layer_delay);
                    return Ok(false);
                }
                Some(at) if at > now => return Ok(false),
                Some(_) => {}
            }
        }
        run.not_before = None;
        let (Some((_, sinks)), Some(queues)) = (self.layers.get(layer), to_sinks.get(layer)) else { return Ok(true) };
        for (sink, queue) in sinks.iter().zip(queues) {
            if !has_work(sink) {
                continue;
            }
            let job = Job { pass: id, batch: run.batch.clone(), origins: run.origins.clone() };
            queue.send(job).map_err(|_| StageError::Stopped)?;
            run.waiting += 1;
        }
        run.next_layer = layer + 1;
        run.worked = true;
        Ok(false)
    }

    /// Every layer repeated the pass: its events' staleness is settled, and they are
    /// acknowledged.
    fn finished(&self, run: Running) {
        let now = SystemTime::now();
        // Observed locally, added to the histogram once (before the acknowledgements).
        let mut end_to_end = self.metrics.end_to_end_staleness.tally();
        for origin in run.origins.iter() {
            end_to_end.observe(now.duration_since(*origin).unwrap_or_default().as_secs_f64());
        }
        end_to_end.flush();
        self.pending.send_modify(|n| *n = n.saturating_sub(run.acks.len()));
        self.metrics.second_pass_pending_events.set(*self.pending.borrow() as i64);
        crate::source::Ack::finish_all(run.acks);
    }

    /// Notes when each waiting pass's commit was first seen replayed on every replica (from
    /// the front, while they are): the margin counts from there.
    fn stamp(&self, passes: &mut VecDeque<SecondPass>) {
        let Some(replicas) = &self.freshness else { return };
        let now = tokio::time::Instant::now();
        for pass in passes.iter_mut() {
            match pass.lsn {
                Some(_) if pass.replayed_at.is_some() => continue,
                Some(lsn) if replicas.is_replayed(lsn) => pass.replayed_at = Some(now),
                Some(_) => break,
                None => continue,
            }
        }
    }

    /// Whether the front pass may go now (`false`: its state changed, look again): at
    /// `repeat_after` after the first pass, or `margin` after the replicas have replayed its
    /// LSN (at most `max_wait`).
    async fn ready(&self, front: Option<Front>) -> bool {
        match (front, &self.freshness) {
            (Some((_, Some(lsn), since, replayed_at)), Some(replicas)) => {
                replicas.wait(lsn, since, replayed_at).await != Waited::Replayed
            }
            (Some((due, _, _, _)), _) => {
                tokio::time::sleep_until(due).await;
                true
            }
            (None, _) => std::future::pending().await,
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One sink's second passes, one after the other.
struct Worker {
    sink: Arc<dyn Sink>,
    metrics: Arc<Metrics>,
    answers: mpsc::UnboundedSender<u64>,
}

impl Worker {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<Job>, shutdown: Shutdown) -> Result<(), StageError> {
        loop {
            let job = tokio::select! {
                biased;
                _ = shutdown.abandoned() => return Err(StageError::Stopped),
                job = rx.recv() => match job {
                    Some(job) => job,
                    None => return Ok(()),
                },
            };
            self.repeat(&job, &shutdown).await?;
            self.answers.send(job.pass).map_err(|_| StageError::Stopped)?;
        }
    }

    /// A second pass repeats deletes that already succeeded once: its rejections were
    /// dead-lettered by the first pass and are only logged. Keys it removed again had been
    /// refilled in between (counted). The events' caches behind this sink are settled now.
    async fn repeat(&self, job: &Job, shutdown: &Shutdown) -> Result<(), StageError> {
        for done in invalidate_all(std::slice::from_ref(&self.sink), &job.batch, shutdown).await? {
            let name = done.sink.name();
            let (refilled, rejected) = (done.report.removed, done.report.rejected.len());
            self.metrics.emit(SecondPassDone { sink: name, refilled, rejected });
            // Observed locally, added to the histogram once per pass.
            let mut settled = report::settled(&self.metrics, name).tally();
            for origin in job.origins.iter() {
                settled.observe(done.at.duration_since(*origin).unwrap_or_default().as_secs_f64());
            }
            settled.flush();
        }
        Ok(())
    }
}
