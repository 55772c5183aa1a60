//! The last stages: dead letters and acknowledgements (`finish`), and the second pass
//! (`sinks.timing.repeat_after`), which repeats a batch through the layers in order when it is
//! due and acknowledges its events after that.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::{mpsc, watch};

use super::layer::invalidate_all;
use super::{change_of, origin, StageError, Unit};
use crate::config::LayerTiming;
use crate::dead_letter::{DeadLetterError, DeadLetters, Letter, Reason};
use crate::event::Decoded;
use crate::shutdown::Shutdown;
use crate::sink::{Invalidations, Sink};
use crate::source::Ack;
use crate::telemetry::Metrics;

/// A batch's invalidations, due again at `due`; its events are acknowledged after that.
pub(super) struct SecondPass {
    due: tokio::time::Instant,
    batch: Invalidations,
    acks: Vec<Ack>,
}

/// Every unit ends here, once each layer with work for it confirmed it (or rejected some of it).
pub(super) struct Finish {
    pub(super) dead_letters: DeadLetters,
    pub(super) metrics: Arc<Metrics>,
    pub(super) timing: LayerTiming,
    /// Where batches go for their second pass (set when `repeat_after` is).
    pub(super) repeat: Option<mpsc::UnboundedSender<SecondPass>>,
}

impl Finish {
    pub(super) async fn run(self, mut rx: mpsc::UnboundedReceiver<Unit>, shutdown: Shutdown) -> Result<(), StageError> {
        loop {
            let unit = tokio::select! {
                biased;
                _ = shutdown.abandoned() => return Err(StageError::Stopped),
                unit = rx.recv() => match unit {
                    Some(unit) => unit,
                    None => return Ok(()),
                },
            };
            self.finish(unit, &shutdown).await?;
        }
    }

    /// Dead letters first (durable before any acknowledgement), then the per-event figures,
    /// then the acks (or the hand-over to the second pass).
    async fn finish(&self, unit: Unit, shutdown: &Shutdown) -> Result<(), StageError> {
        let letters: Vec<Letter> = unit
            .items
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
            Err(DeadLetterError::Abandoned) => return Err(StageError::Stopped),
            Err(e) => return Err(StageError::Fatal(e.into())),
        }

        let now = SystemTime::now();
        let repeat = self.repeat.is_some() && !unit.batch.is_empty();
        let mut waiting = Vec::new();
        for item in unit.items {
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
        if let (Some(repeat), false) = (&self.repeat, waiting.is_empty()) {
            let due = tokio::time::Instant::now() + self.timing.repeat_after;
            repeat.send(SecondPass { due, batch: unit.batch, acks: waiting }).map_err(|_| StageError::Stopped)?;
        }
        Ok(())
    }
}

/// The second-pass stage: holds batches until they are due, then runs them through the layers
/// in order (sinks of one layer at once, `layer_delay` between layers).
pub(super) struct SecondPasses {
    pub(super) layers: Vec<(u8, Vec<Arc<dyn Sink>>)>,
    pub(super) timing: LayerTiming,
    pub(super) metrics: Arc<Metrics>,
    /// Events waiting for their second pass; intake waits while there are `repeat_max_events`.
    pub(super) pending: watch::Sender<usize>,
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
        let mut passes: VecDeque<SecondPass> = VecDeque::new();
        let mut open = true;
        loop {
            let due = passes.front().map(|p| p.due);
            if !open && due.is_none() {
                return Ok(());
            }
            tokio::select! {
                biased;
                _ = shutdown.abandoned() => return Err(StageError::Stopped),
                pass = rx.recv(), if open => match pass {
                    Some(pass) => {
                        self.pending.send_modify(|n| *n += pass.acks.len());
                        self.metrics.second_pass_pending_events.set(*self.pending.borrow() as i64);
                        passes.push_back(pass);
                    }
                    None => open = false,
                },
                _ = sleep_until_some(due), if due.is_some() => {
                    let Some(pass) = passes.pop_front() else { continue };
                    self.run_pass(&pass.batch, &shutdown).await?;
                    self.pending.send_modify(|n| *n = n.saturating_sub(pass.acks.len()));
                    self.metrics.second_pass_pending_events.set(*self.pending.borrow() as i64);
                    for ack in pass.acks {
                        ack.finish();
                    }
                }
            }
        }
    }

    /// A second pass repeats deletes that already succeeded once: its rejections were
    /// dead-lettered by the first pass and are only logged.
    async fn run_pass(&self, batch: &Invalidations, shutdown: &Shutdown) -> Result<(), StageError> {
        let mut worked = false;
        for (_, sinks) in &self.layers {
            if !sinks.iter().any(|s| s.kinds().iter().any(|&k| !batch.items(k).is_empty())) {
                continue;
            }
            if worked && !self.timing.layer_delay.is_zero() {
                tokio::select! {
                    biased;
                    _ = shutdown.abandoned() => return Err(StageError::Stopped),
                    _ = tokio::time::sleep(self.timing.layer_delay) => {}
                }
            }
            for done in invalidate_all(sinks, batch, shutdown).await? {
                if !done.report.rejected.is_empty() {
                    tracing::warn!(
                        sink = done.sink.name(),
                        rejected = done.report.rejected.len(),
                        "second pass: items rejected again (dead-lettered by the first pass)"
                    );
                }
            }
            worked = true;
        }
        Ok(())
    }
}

async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}
