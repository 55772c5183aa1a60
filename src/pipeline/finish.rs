//! The last stage: dead letters and acknowledgements (`finish`), or the hand-over of a batch
//! to its second pass (`second_pass.rs`).

pub(super) use super::second_pass::SecondPasses;

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::mpsc;

use super::{change_of, origin, StageError, Unit};
use crate::config::LayerTiming;
use crate::dead_letter::{DeadLetterError, DeadLetters, Letter, Reason};
use crate::event::Decoded;
use crate::freshness::{Commit, Replicas};
use crate::shutdown::Shutdown;
use crate::sink::{Invalidations, ItemKind, Sink};
use crate::source::Ack;
use crate::telemetry::events::pipeline::{self as report, EventOutcome, EventsFinished};
use crate::telemetry::histogram::{Placed, Tally};
use crate::telemetry::Metrics;

/// A batch's invalidations, due again at `due` (or, with `lsn`, once the read replicas have
/// replayed it); its events are acknowledged after that.
pub(super) struct SecondPass {
    pub(super) due: tokio::time::Instant,
    /// The newest commit of the batch's events (`freshness.replicas`).
    pub(super) lsn: Option<Commit>,
    /// When the first pass was done: `freshness.max_wait` counts from here.
    pub(super) since: tokio::time::Instant,
    /// When every replica was first seen to have replayed that commit.
    pub(super) replayed_at: Option<tokio::time::Instant>,
    pub(super) batch: Invalidations,
    pub(super) acks: Vec<Ack>,
    /// The waiting events' staleness origins: settled and acknowledged staleness are observed
    /// after this pass.
    pub(super) origins: Vec<SystemTime>,
}

/// Every unit ends here, once each layer with work for it confirmed it (or rejected some of it).
pub(super) struct Finish {
    pub(super) dead_letters: DeadLetters,
    /// Every sink: settled seconds for an event without a second pass, per sink it asked.
    pub(super) sinks: Vec<Arc<dyn Sink>>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) timing: LayerTiming,
    /// Where batches go for their second pass (set when `repeat_after` is).
    pub(super) repeat: Option<mpsc::UnboundedSender<SecondPass>>,
    pub(super) freshness: Option<Replicas>,
}

impl Finish {
    pub(super) async fn run(self, mut rx: mpsc::Receiver<Unit>, shutdown: Shutdown) -> Result<(), StageError> {
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
        // With read replicas, the batch's second pass waits for its newest commit LSN; a batch
        // without one (a source that has none) falls back to `repeat_after`, or has none.
        let lsn = match &self.freshness {
            Some(_) => Commit::newest(unit.items.iter().filter(|i| i.asks_any()).map(|i| &i.event)),
            None => None,
        };
        let repeat =
            self.repeat.is_some() && !unit.batch.is_empty() && (lsn.is_some() || !self.timing.repeat_after.is_zero());
        // The per-event figures first, with one label lookup per distinct label set of the
        // unit instead of one per event (a lookup hashes the labels and takes a lock).
        let mut outcomes = LabelCounts::default();
        let mut tables = TableStaleness::default();
        // The unit's observations are gathered locally and added to each histogram once, before
        // any acknowledgement (one update per histogram and unit, not per event: across cores
        // those contend). Counts and buckets are the same; a sum is added per unit.
        let mut end_to_end = self.metrics.end_to_end_staleness.tally();
        // Settled seconds of events without a second pass: one histogram per sink, looked up
        // once per unit.
        let mut settled: Vec<(&[ItemKind], Tally)> = match repeat {
            true => Vec::new(),
            false => self.sinks.iter().map(|s| (s.kinds(), report::settled(&self.metrics, s.name()).tally())).collect(),
        };
        for item in &unit.items {
            let (table, op) = match &item.event.decoded {
                Ok(Decoded::Change(c)) => (c.table.as_str(), c.op.as_str()),
                Ok(Decoded::NoChange(n)) => (n.table.as_deref().unwrap_or("unknown"), "none"),
                Err(_) => ("unknown", "none"),
            };
            let outcome = match (&item.dead, &item.ruled) {
                (Some((Reason::Malformed, _)), _) => EventOutcome::DeadLettered,
                (Some(_), _) => EventOutcome::Partial,
                (None, None) => EventOutcome::NoChange,
                (None, Some(r)) if !r.matched => EventOutcome::NoMatch,
                (None, Some(_)) => EventOutcome::Invalidated,
            };
            outcomes.add(&self.metrics, (table, op, outcome));
            // With a second pass, events that asked for invalidations are acknowledged after
            // it, and observed there.
            if !(repeat && item.asks_any()) && item.ruled.is_some() {
                if let Some(origin) = origin(&item.event) {
                    let seconds = now.duration_since(origin).unwrap_or_default().as_secs_f64();
                    // The same seconds in every staleness histogram (the same buckets): its
                    // bucket is found once.
                    let seconds = end_to_end.place(seconds);
                    end_to_end.add(seconds);
                    tables.observe(&self.metrics, table, seconds);
                    // No second pass: the first was the last, so the event settled now. Observed
                    // so that settled covers every invalidated event whatever the timing.
                    for (_, tally) in settled.iter_mut().filter(|(kinds, _)| item.asks(kinds)) {
                        tally.add(seconds);
                    }
                }
            }
        }
        outcomes.flush(&self.metrics);
        end_to_end.flush();
        tables.flush();
        for (_, tally) in &mut settled {
            tally.flush();
        }
        let mut waiting = Vec::new();
        let mut origins = Vec::new();
        // Finished together: consecutive acks of one source go back as one message that wakes
        // the source once, rather than one message and one wake-up per event. The acks are
        // taken out of the events in place (moving each event out of the list copied it), and
        // the events are freed after the acknowledgement, all at once.
        let mut done = Vec::with_capacity(unit.items.len());
        let mut items = unit.items;
        for item in &mut items {
            let ack = std::mem::replace(&mut item.event.ack, Ack::detached());
            if repeat && item.asks_any() {
                origins.extend(origin(&item.event));
                waiting.push(ack);
            } else {
                done.push(ack);
            }
        }
        Ack::finish_all(done);
        drop(items);
        if let (Some(repeat), false) = (&self.repeat, waiting.is_empty()) {
            let since = tokio::time::Instant::now();
            let due = since + self.timing.repeat_after;
            if let (Some(replicas), Some(lsn)) = (&self.freshness, lsn) {
                replicas.awaited(lsn.lsn);
            }
            repeat
                .send(SecondPass { due, lsn, since, replayed_at: None, batch: unit.batch, acks: waiting, origins })
                .map_err(|_| StageError::Stopped)?;
        }
        Ok(())
    }
}

/// At most this many distinct label sets are gathered per unit; beyond, each event is counted
/// on its own (a unit spanning that many tables is rare, and a longer scan would cost more than
/// the lookup it saves).
const GATHERED_LABEL_SETS: usize = 16;

/// A label set of `cdc_invalidator_events_total`: table, op, outcome.
type EventLabels<'a> = (&'a str, &'static str, EventOutcome);

/// `cdc_invalidator_events_total` increments of one unit, gathered per label set.
#[derive(Default)]
struct LabelCounts<'a> {
    counts: Vec<(EventLabels<'a>, u64)>,
}

impl<'a> LabelCounts<'a> {
    fn add(&mut self, metrics: &Metrics, labels: EventLabels<'a>) {
        if let Some((_, n)) = self.counts.iter_mut().find(|(l, _)| *l == labels) {
            *n += 1;
        } else if self.counts.len() < GATHERED_LABEL_SETS {
            self.counts.push((labels, 1));
        } else {
            let (table, op, outcome) = labels;
            metrics.emit(EventsFinished { table, op, outcome, count: 1 });
        }
    }

    fn flush(self, metrics: &Metrics) {
        for ((table, op, outcome), count) in self.counts {
            metrics.emit(EventsFinished { table, op, outcome, count });
        }
    }
}

/// `cdc_invalidator_table_staleness_seconds` of one unit: looked up once per table, observed
/// locally and added to the histogram once ([`TableStaleness::flush`]).
#[derive(Default)]
struct TableStaleness<'a> {
    handles: Vec<(&'a str, Tally)>,
}

impl<'a> TableStaleness<'a> {
    fn observe(&mut self, metrics: &Metrics, table: &'a str, seconds: Placed) {
        if let Some((_, tally)) = self.handles.iter_mut().find(|(t, _)| *t == table) {
            tally.add(seconds);
            return;
        }
        let handle = report::table_staleness(metrics, table);
        let mut tally = handle.tally();
        tally.add(seconds);
        if self.handles.len() < GATHERED_LABEL_SETS {
            self.handles.push((table, tally));
        }
        // Else added at once, when dropped here.
    }

    fn flush(&mut self) {
        for (_, tally) in &mut self.handles {
            tally.flush();
        }
    }
}
