//! How the intake stage gathers a batch from the source queue: at once under light load, for a
//! while in a backlog (see [`BusyStreak`]).

use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::config::PipelineConfig;
use crate::source::SourceEvent;
use crate::telemetry::events::pipeline::BatchLoad;

/// How long a batch waits for company: decided per batch by [`BusyStreak::load`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Load {
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
    /// What `cdc_invalidator_batches_total` reports of it.
    pub(super) fn report(self) -> BatchLoad {
        match self {
            Load::Light => BatchLoad::Light,
            Load::Backlog => BatchLoad::Backlog,
        }
    }
}

/// How long the pipeline has been busy without once waiting for an event.
#[derive(Debug)]
pub(super) struct BusyStreak {
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
    pub(super) fn load(&mut self, first_received: Instant, waiting_since: Instant, idle_wait: Duration) -> Load {
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
pub(super) async fn fill_batch(
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::source::{Ack, Position, RawMessage};

    /// A source event that entered the process now (on tokio's clock, which tests pause).
    pub(crate) fn arrival() -> SourceEvent {
        SourceEvent {
            position: Position::File { line: 1 },
            decoded: Err(crate::source::Malformed("unused".into())),
            raw: RawMessage::default(),
            logged_at: None,
            received: tokio::time::Instant::now().into_std(),
            ack: Ack::detached(),
        }
    }

    pub(crate) fn pipeline_config(max_events: usize, max_wait_ms: u64, idle_wait_ms: u64) -> PipelineConfig {
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
}
