//! The Kafka source: a consumer group reading Debezium topics.
//!
//! - `enable.auto.commit=false`: offsets are committed by us, per partition, only up to the
//!   first event that is not finished (`tracker.rs`, built on the shared watermark).
//! - Commits are asynchronous, on a timer (`commit_interval`), re-sent after a failure; never a
//!   blocking commit on the async executor, never an endless commit retry. The final commit at
//!   shutdown is synchronous on a blocking thread, with a timeout.
//! - Backpressure: when the pipeline's queue is full, or when the events read and not yet
//!   finished hold `max_in_flight_bytes` of messages (the pipeline's queues count events, so
//!   this bounds their memory when messages are large), the source stops reading; if that lasts
//!   a second (a sink is down) the assigned partitions are *paused* and the consumer keeps
//!   being polled, so the group membership (`max.poll.interval.ms`) and rebalance callbacks stay
//!   alive while Redis is down for an hour.
//! - Rebalances: revoked partitions commit what is finished and drop their unfinished work
//!   unacknowledged (the new owner redelivers it).
//! - Errors from `recv()` are transient: librdkafka reconnects by itself.
//! - Reading is in bursts (`KafkaSource::burst`): after the `select!` yields a message, the
//!   messages librdkafka already holds follow without another pass through it (at most
//!   `BURST`); acknowledgements come back batched when the pipeline uses `Ack::finish_all`.
//! - Decoding is beside the source task, not on it: each burst, once tracked and copied, is
//!   decoded on a task of its own (at most `DECODING` at a time) and handed over in the order
//!   it was read (`KafkaSource::decode`, `oldest`, `source::hand_over`).

pub(crate) mod config;
mod context;
pub mod membership;
pub mod prefetch;
mod tracker;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::config::ClientConfig;
use futures::{FutureExt, StreamExt};
use rdkafka::consumer::{CommitMode, Consumer, MessageStream, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use tokio::sync::{mpsc, watch};

use self::context::{commit_async, commit_list, lock, KafkaContext};
use self::tracker::Tracker;
use crate::config::KafkaConfig;
use crate::event::Decoded;
use crate::rules::Rules;
use crate::shutdown::Shutdown;
use crate::source::{ack_channel, Ack, AckSender, Completions, Malformed, Position, RawMessage, SourceEvent};
use crate::telemetry::events::source::{CommitStage, OffsetCommitFailed, OffsetsCommitted};
use crate::telemetry::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum KafkaSourceError {
    /// Bad client settings or subscription: fatal at start.
    #[error("cannot create the Kafka consumer: {0}")]
    Create(rdkafka::error::KafkaError),
    #[error("cannot subscribe to {what}: {error}")]
    Subscribe { what: String, error: rdkafka::error::KafkaError },
    /// `source.kafka.schema_registry` unusable (CA file, client): fatal at start.
    #[error("source.kafka.schema_registry: {0}")]
    Registry(String),
}

/// At most this many messages are handed over per pass of `consume`'s select (`burst`).
const BURST: i64 = 64;

/// Bursts being decoded beside the source task at most (`consume`): the source reads no more
/// until the oldest is done. Decoding is most of a message's cost; on the source task it made
/// the source the pipeline's critical path (docs/benchmarks.md, "Where the daemon's time goes
/// while catching up"), while another worker had time to spare.
const DECODING: usize = 4;

/// How a burst ended.
#[derive(Default)]
struct Burst {
    /// Stop reading: shutdown during a schema lookup.
    stop: bool,
    /// The messages read, tracked, for a decoding task.
    tracked: Vec<Tracked>,
}

/// Applies the completions of `first` and of everything already queued behind it to the
/// tracker, under one lock. Returns how many events they finished (ignored ones included).
fn finish(
    tracker: &Mutex<Tracker>,
    first: Completions,
    rx: &mut mpsc::UnboundedReceiver<Completions>,
) -> usize {
    let mut tracker = lock(tracker);
    let mut n = first.len();
    tracker.finish_completions(first);
    while let Ok(c) = rx.try_recv() {
        n += c.len();
        tracker.finish_completions(c);
    }
    n
}

/// How long the pipeline queue may stay full before the partitions are paused.
const PAUSE_AFTER: Duration = Duration::from_secs(1);

/// Every this many commit ticks, every position is committed again even if it did not move.
const REFRESH_EVERY: u64 = 5;

/// How long the final, synchronous commit at shutdown may take.
const FINAL_COMMIT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct KafkaSource {
    consumer: Arc<StreamConsumer<KafkaContext>>,
    tracker: Arc<Mutex<Tracker>>,
    metrics: Arc<Metrics>,
    commit_interval: Duration,
    max_message_bytes: usize,
    /// Reading stops while the events in flight hold this many message bytes.
    max_in_flight_bytes: usize,
    /// Commit ticks so far (for the periodic refresh).
    commit_ticks: std::sync::atomic::AtomicU64,
    /// `source.kafka.format` and its schema registry; shared with the decoding tasks.
    codec: Arc<crate::source::encoded::Codec>,
}

/// A message tracked and copied by the source task, to be decoded by a decoding task.
struct Tracked {
    position: Position,
    raw: RawMessage,
    /// The reason the value was not copied (over `max_message_bytes`): the event is malformed.
    oversized: Option<Malformed>,
    logged_at: Option<SystemTime>,
    received: Instant,
    ack: Ack,
    resolved: crate::source::encoded::Resolved,
}

/// The librdkafka settings for a consumer, before passthrough: exposed for tests and `check`.
pub fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers)
        .set("group.id", &config.group_id)
        // We commit ourselves, only what is finished.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // A new group starts at the beginning: invalidating too much is safe, missing changes
        // made before the first start is not. Override with librdkafka.auto.offset.reset.
        .set("auto.offset.reset", "earliest")
        // Per-partition consumer lag for the lag metric.
        .set("statistics.interval.ms", "5000");
    for (key, value) in &config.resolved_librdkafka {
        c.set(key, value.expose());
    }
    if let Some(id) = membership::instance_id(config) {
        c.set("group.instance.id", id);
    }
    c
}

/// The consumer's settings: [`client_config`] plus a bounded prefetch (`prefetch.rs`), unless
/// `source.kafka.librdkafka` sets it.
pub fn consumer_config(config: &KafkaConfig) -> ClientConfig {
    let mut c = client_config(config);
    prefetch::apply(&mut c, &config.librdkafka);
    c
}

impl KafkaSource {
    /// Creates the consumer and subscribes. Connecting happens in the background: a broker that
    /// is down now is not an error (the source just is not ready yet).
    pub fn new(config: &KafkaConfig, metrics: Arc<Metrics>) -> Result<KafkaSource, KafkaSourceError> {
        let codec =
            crate::source::encoded::Codec::new(config, Some(metrics.clone())).map_err(KafkaSourceError::Registry)?;
        let tracker = Arc::new(Mutex::new(Tracker::default()));
        let context =
            KafkaContext { tracker: tracker.clone(), metrics: metrics.clone(), commit_failed: Default::default() };
        let consumer: StreamConsumer<KafkaContext> =
            consumer_config(config).create_with_context(context).map_err(KafkaSourceError::Create)?;
        let topics: Vec<&str> = match &config.topic_pattern {
            Some(p) => vec![p.as_str()],
            None => config.topics.iter().map(String::as_str).collect(),
        };
        consumer.subscribe(&topics).map_err(|error| KafkaSourceError::Subscribe { what: topics.join(", "), error })?;
        Ok(KafkaSource {
            consumer: Arc::new(consumer),
            tracker,
            metrics,
            commit_interval: config.commit_interval,
            max_message_bytes: config.max_message_bytes,
            max_in_flight_bytes: config.max_in_flight_bytes,
            commit_ticks: Default::default(),
            codec: Arc::new(codec),
        })
    }

    /// The source, decoding only the columns the running `rules` read (the `json` format:
    /// `crate::source::encoded::Codec::projection`); without this, whole rows.
    pub(crate) fn with_rules(self, rules: watch::Receiver<Arc<Rules>>) -> KafkaSource {
        // Called right after `new`: the codec is not shared yet, so this takes it, no copy.
        KafkaSource { codec: Arc::new(Arc::unwrap_or_clone(self.codec).following(rules)), ..self }
    }

    /// Reads until `shutdown` stops intake, then keeps committing while the pipeline drains, and
    /// commits one last time once every event is finished or abandoned.
    async fn consume(self, out: mpsc::Sender<SourceEvent>, shutdown: Shutdown) -> Result<(), KafkaSourceError> {
        // Before anything is read: credentials the registry rejects stop the daemon here.
        self.codec.check_registry().await.map_err(KafkaSourceError::Registry)?;
        let (ack_tx, mut ack_rx) = ack_channel();
        let mut commit_tick = tokio::time::interval(self.commit_interval);
        commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // One message stream for the whole run: `recv()` makes one per call, which registers a
        // waker slot (a lock) and unregisters it (another) for every message.
        let mut stream = self.consumer.stream();
        // Events received while the pipeline queue was full (already fetched before the pause
        // took effect). Bounded by librdkafka's prefetch, which pausing stops.
        let mut held: VecDeque<SourceEvent> = VecDeque::new();
        let mut paused = false;
        // Bursts being decoded, oldest first: their events are handed over in this order, so
        // the pipeline sees each partition's events in offset order as before.
        let mut decoding: VecDeque<tokio::task::JoinHandle<Vec<SourceEvent>>> = VecDeque::new();
        // Since when reading has been held back: the queue is full (`held` is not empty), or
        // the events in flight hold `max_in_flight_bytes`. Normal under load (the pipeline is
        // busy with a batch): we just stop reading for a moment and librdkafka's prefetch
        // (bounded, prefetch.rs) absorbs the rest. Only a hold that lasts PAUSE_AFTER (a sink
        // is down) pauses the partitions, so the consumer can go on being polled (group
        // membership, rebalances) without pulling in more messages. Pausing on every full
        // queue would drop librdkafka's prefetched messages each time and refetch them: that
        // thrashing halved throughput.
        let mut full_since: Option<tokio::time::Instant> = None;
        // Armed (reset) only when a hold begins, rather than built on every iteration.
        let pause_timer = tokio::time::sleep_until(tokio::time::Instant::now());
        tokio::pin!(pause_timer);

        loop {
            let holding = !held.is_empty() || self.over_budget();
            match (holding, full_since) {
                (true, None) => {
                    let now = tokio::time::Instant::now();
                    full_since = Some(now);
                    pause_timer.as_mut().reset(now + PAUSE_AFTER);
                }
                (false, Some(_)) => {
                    full_since = None;
                    if paused {
                        self.set_paused(false);
                        paused = false;
                    }
                }
                _ => {}
            }
            tokio::select! {
                // Acknowledgements first, so finished work is committed before new input piles up.
                biased;
                Some(c) = ack_rx.recv() => self.finish(c, &mut ack_rx),
                _ = commit_tick.tick() => self.commit(false),
                _ = shutdown.stopping() => break,
                // The pipeline is gone (a fatal error): nothing can finish any more.
                _ = out.closed() => break,
                permit = out.reserve(), if !held.is_empty() => match permit {
                    Ok(permit) => {
                        if let Some(ev) = held.pop_front() {
                            permit.send(ev);
                        }
                    }
                    Err(_) => break,
                },
                () = &mut pause_timer, if full_since.is_some() && !paused => {
                    self.set_paused(true);
                    paused = true;
                }
                decoded = oldest(&mut decoding), if !decoding.is_empty() => match decoded {
                    Ok(events) => {
                        if crate::source::hand_over(events, &out, &mut held) {
                            break;
                        }
                    }
                    // Not reachable (decoding does not panic); the burst's acks are dropped, so
                    // its offsets are never committed and it is read again after a restart.
                    Err(e) => tracing::error!(error = %e, "a decoding task failed"),
                },
                // While holding, read only once paused (to keep serving callbacks; at most what
                // was already prefetched arrives, and waits in `held`).
                msg = stream.next(), if (!holding || paused) && decoding.len() < DECODING => match msg {
                    Some(Ok(m)) => {
                        let burst = self.burst(m, &mut stream, &ack_tx, &held, &shutdown).await;
                        if !burst.tracked.is_empty() {
                            decoding.push_back(self.decode(burst.tracked));
                        }
                        if burst.stop {
                            break;
                        }
                    }
                    Some(Err(e)) => self.receive_error(e).await,
                    None => unreachable!("a Kafka message stream never ends"),
                },
            }
        }

        // Drain: no new input; the pipeline finishes what it holds. Held events were never
        // handed over: dropping them drops their acks, so they are redelivered next time.
        tracing::info!(
            held = held.len(),
            in_flight = lock(&self.tracker).in_flight(),
            "source stopped reading; waiting for in-flight events"
        );
        drop(held);
        // Their events were never handed over either.
        for task in decoding {
            task.abort();
        }
        drop(ack_tx);
        drop(out);
        self.set_paused(true);
        loop {
            tokio::select! {
                biased;
                c = ack_rx.recv() => match c {
                    Some(c) => self.finish(c, &mut ack_rx),
                    // Every ack was finished or dropped: nothing more can move.
                    None => break,
                },
                _ = commit_tick.tick() => self.commit(false),
                // Keep serving rebalance callbacks; partitions are paused so nothing new comes.
                _ = stream.next() => {}
            }
        }
        drop(stream);
        self.final_commit().await;
        Ok(())
    }

    /// Tracks `first` and then the messages librdkafka already holds, without going back
    /// through the `select!` in `consume` for each (its futures, wakers and locks cost more
    /// than a small message's tracking): at most [`BURST`] messages, and only while the events
    /// in flight hold less than `max_in_flight_bytes` (so at most one message over it). They
    /// are decoded by a task of their own ([`KafkaSource::decode`]) and handed over in order
    /// by `consume`. The gauges and clocks are read once per burst.
    ///
    /// Each message is tracked (`Tracker::start`) before the consumer is polled again: a poll
    /// may run a rebalance callback that revokes its partition, which must find it tracked (its
    /// work is then dropped, and redelivered to the new owner), not track it afterwards in a
    /// stream of its own. So the tracker is locked per message (uncontended), not per burst.
    ///
    /// Acknowledgements wait for the end of a burst; then `consume`'s select takes them first.
    async fn burst<'c>(
        &'c self,
        first: BorrowedMessage<'c>,
        stream: &mut MessageStream<'c, KafkaContext>,
        ack_tx: &AckSender,
        held: &VecDeque<SourceEvent>,
        shutdown: &Shutdown,
    ) -> Burst {
        let mut result = Burst::default();
        let received = Instant::now();
        let mut n = 0;
        let mut next = Some(first);
        while let Some(m) = next.take() {
            // Schemas are fetched before the message is tracked: while the registry is down the
            // message waits, and a stop leaves it unread (redelivered).
            let payload = m.payload().filter(|v| v.len() <= self.max_message_bytes);
            let Some(resolved) = self.codec.resolve(m.key(), payload, shutdown).await else {
                result.stop = true;
                break;
            };
            let (tracked, over_budget) = self.track(&m, ack_tx, resolved, received);
            result.tracked.push(tracked);
            n += 1;
            // Paused (events wait in `held`): read one at a time, only to keep the consumer
            // polled.
            if n == BURST || over_budget || !held.is_empty() {
                break;
            }
            // Polled with a no-op waker: a message already queued comes at once; otherwise the
            // no-op waker sits in this stream's slot until the select polls it again, which
            // puts the task's own waker back before it checks the queue and sleeps (rdkafka's
            // `MessageStream::poll_next`), so no wake-up is lost. A poll that served a callback
            // (rebalance, commit result) is pending too: the burst ends there.
            match stream.next().now_or_never() {
                Some(Some(Ok(m))) => next = Some(m),
                Some(Some(Err(e))) => {
                    self.receive_error(e).await;
                    break;
                }
                Some(None) | None => break,
            }
        }
        if n > 0 {
            self.metrics.pending_events.add(n);
            self.metrics.last_event_timestamp.set(unix_seconds(SystemTime::now()));
        }
        result
    }

    /// Decodes a burst's messages on a task of its own, with the columns the running rules read
    /// now (taken once per burst).
    fn decode(&self, tracked: Vec<Tracked>) -> tokio::task::JoinHandle<Vec<SourceEvent>> {
        let codec = self.codec.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let projection = codec.projection();
            let mut last_commit = None;
            let events = tracked
                .into_iter()
                .map(|t| {
                    let event = to_event(&codec, t, projection.as_deref());
                    let origin = match &event.decoded {
                        Ok(Decoded::Change(c)) => c.committed_at,
                        Ok(Decoded::NoChange(n)) => n.at,
                        Err(_) => None,
                    };
                    last_commit = origin.or(last_commit);
                    event
                })
                .collect();
            if let Some(t) = last_commit {
                metrics.last_commit_timestamp.set(unix_seconds(t));
            }
            events
        })
    }

    async fn receive_error(&self, e: rdkafka::error::KafkaError) {
        self.metrics.source_errors.inc();
        tracing::warn!(error = %e, "kafka receive error (transient)");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    fn finish(&self, first: Completions, rx: &mut mpsc::UnboundedReceiver<Completions>) {
        let n = finish(&self.tracker, first, rx);
        self.metrics.pending_events.sub(n as i64);
    }

    /// Whether the events in flight hold `max_in_flight_bytes` of messages or more.
    fn over_budget(&self) -> bool {
        lock(&self.tracker).in_flight_bytes() >= self.max_in_flight_bytes
    }

    /// `m` tracked and copied, and whether the events in flight now hold `max_in_flight_bytes`
    /// of messages or more.
    fn track(
        &self,
        m: &BorrowedMessage<'_>,
        ack_tx: &AckSender,
        resolved: crate::source::encoded::Resolved,
        received: Instant,
    ) -> (Tracked, bool) {
        let key = m.key();
        let value = m.payload();
        // What the event holds of the message: its copy for dead letters (an oversized value is
        // not copied), and the rows decoded from it, in proportion (`max_in_flight_bytes`).
        let kept = value.filter(|v| v.len() <= self.max_message_bytes);
        let bytes = key.map_or(0, <[u8]>::len) + kept.map_or(0, <[u8]>::len);
        let mut tracker = lock(&self.tracker);
        let (finished, topic) = tracker.start(m.topic(), m.partition(), m.offset(), bytes);
        let over_budget = tracker.in_flight_bytes() >= self.max_in_flight_bytes;
        drop(tracker);
        let oversized = value.filter(|v| v.len() > self.max_message_bytes).map(|v| {
            Malformed(format!(
                "the message value is {} bytes, over source.kafka.max_message_bytes ({})",
                v.len(),
                self.max_message_bytes
            ))
        });
        let logged_at = m
            .timestamp()
            .to_millis()
            .and_then(|ms| u64::try_from(ms).ok())
            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
        let tracked = Tracked {
            position: Position::Kafka { topic: topic.clone(), partition: m.partition(), offset: m.offset() },
            raw: RawMessage {
                topic: Some(topic),
                key: key.map(<[u8]>::to_vec),
                // Oversized values are not kept in memory: the dead letter records the reason
                // and position, and the message stays in Kafka for inspection.
                value: kept.map(<[u8]>::to_vec),
            },
            oversized,
            logged_at,
            received,
            ack: Ack::batched(ack_tx, finished),
            resolved,
        };
        (tracked, over_budget)
    }

    fn set_paused(&self, paused: bool) {
        let mut tracker = lock(&self.tracker);
        tracker.paused = paused;
        drop(tracker);
        let Ok(assignment) = self.consumer.assignment() else { return };
        let result = if paused { self.consumer.pause(&assignment) } else { self.consumer.resume(&assignment) };
        match result {
            Ok(()) => {
                tracing::debug!(paused, "partitions {}", if paused { "paused: pipeline full" } else { "resumed" })
            }
            Err(e) => tracing::warn!(error = %e, paused, "cannot pause/resume partitions"),
        }
    }

    /// Sends the offsets that moved, asynchronously (the result arrives in the commit callback).
    /// Every [`REFRESH_EVERY`] ticks all positions are sent again whether they moved or not, like
    /// librdkafka's own auto-commit does: a commit lost without any report heals on its own.
    fn commit(&self, force: bool) {
        let tick = self.commit_ticks.fetch_add(1, Ordering::Relaxed) + 1;
        let force = force
            || tick.is_multiple_of(REFRESH_EVERY)
            || self.consumer.context().commit_failed.swap(false, Ordering::Relaxed);
        let points = lock(&self.tracker).commits_due(force);
        if points.is_empty() {
            return;
        }
        if let Err(e) = commit_async(self.consumer.client(), &commit_list(&points)) {
            self.consumer.context().commit_failed.store(true, Ordering::Relaxed);
            self.metrics.emit(OffsetCommitFailed { stage: CommitStage::Send, error: &e });
        }
    }

    /// The last commit: synchronous so we know it landed, but on a blocking thread and with a
    /// timeout, since librdkafka's synchronous commit can block for minutes without a
    /// coordinator. Then the consumer leaves the group (also potentially slow, also off the
    /// executor).
    async fn final_commit(self) {
        let points = lock(&self.tracker).all_commit_points();
        let consumer = self.consumer.clone();
        let metrics = self.metrics.clone();
        let n = points.len();
        let job = tokio::task::spawn_blocking(move || {
            if !points.is_empty() {
                match consumer.commit(&commit_list(&points), CommitMode::Sync) {
                    Ok(()) => metrics.emit(OffsetsCommitted { partitions: None }),
                    Err(e) => metrics.emit(OffsetCommitFailed { stage: CommitStage::Final, error: &e }),
                }
            }
            consumer.unsubscribe();
        });
        match tokio::time::timeout(FINAL_COMMIT_TIMEOUT, job).await {
            Ok(_) => tracing::info!(partitions = n, "final offsets committed"),
            Err(_) => {
                tracing::warn!("final offset commit timed out: the next start redelivers from the previous commit")
            }
        }
        self.metrics.source_ready.set(0);
        // Dropping the consumer closes it (leaves the group); do that off the executor too.
        let consumer = self.consumer;
        let close = tokio::task::spawn_blocking(move || drop(consumer));
        let _ = tokio::time::timeout(FINAL_COMMIT_TIMEOUT, close).await;
    }
}

pub(crate) fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

#[async_trait::async_trait]
impl crate::source::Source for KafkaSource {
    fn kind(&self) -> &'static str {
        "kafka"
    }

    async fn run(
        self: Box<Self>,
        out: mpsc::Sender<SourceEvent>,
        shutdown: Shutdown,
    ) -> Result<(), crate::source::SourceError> {
        Ok(self.consume(out, shutdown).await?)
    }
}

/// The event of a tracked message: its copy decoded.
fn to_event(
    codec: &crate::source::encoded::Codec,
    t: Tracked,
    projection: Option<&crate::rules::Projection>,
) -> SourceEvent {
    let decoded = match t.oversized {
        Some(reason) => Err(reason),
        None => {
            let topic = t.raw.topic.as_deref().unwrap_or_default();
            codec.decode_projected(&t.resolved, topic, t.raw.key.as_deref(), t.raw.value.as_deref(), projection)
                .map_err(Malformed)
        }
    };
    SourceEvent { position: t.position, decoded, raw: t.raw, logged_at: t.logged_at, received: t.received, ack: t.ack }
}

/// The oldest burst's events, once decoded; pending while there is none. Cancel-safe: the task
/// stays in `decoding` until it is done.
async fn oldest(
    decoding: &mut VecDeque<tokio::task::JoinHandle<Vec<SourceEvent>>>,
) -> Result<Vec<SourceEvent>, tokio::task::JoinError> {
    let Some(task) = decoding.front_mut() else { return std::future::pending().await };
    let done = task.await;
    decoding.pop_front();
    done
}
