//! Decoding off the source task, in stream order.
//!
//! Decoding is most of the daemon's own work per event (docs/benchmarks.md, "Per-event cost"),
//! and the source task is one task for every partition: decoding there made it the bottleneck
//! while the other core idled. So the source only reads, tracks and copies each message (a
//! [`Pending`]) and hands it to this stage, which decodes and forwards to the pipeline:
//!
//! - **Order**: events leave in the order they arrived (so per partition too): work is cut into
//!   chunks of consecutive messages, and chunks are forwarded strictly in the order they were
//!   cut, whichever finishes first. Acknowledgements and the watermark are the source's, as
//!   before; a chunk lost to a bug drops its acks, which redelivers, never loses.
//! - **Parallel only under load**: the stage takes what is waiting, never waits for company. A
//!   chunk that is small while nothing is in flight (a quiet source) is decoded right here, with
//!   no hand-over to another task, so light-load staleness stays what it was. When messages pile
//!   up, chunks grow and become tasks of their own, several at once, which the runtime's workers
//!   share out, so both cores decode. Not the blocking pool: with it bench (b)'s peak RSS was
//!   74 MiB (65.7 without), likely its extra threads' allocator arenas and caches.
//! - **Bounded**: at most [`MAX_IN_FLIGHT`] chunks of [`CHUNK`] messages are being decoded or
//!   waiting to be forwarded, besides the stage's input queue ([`QUEUE`]). While the pipeline's
//!   queue is full the stage stops taking input, its queue fills and the source sees a full
//!   queue as before (and pauses the partitions after a while).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::event::Decoded;
use crate::source::encoded::{Codec, Resolved};
use crate::source::{Ack, Malformed, Position, RawMessage, SourceEvent};
use crate::telemetry::Metrics;

/// The most messages one chunk holds: large enough that spawning a task for it is small next
/// to decoding it, small enough that a chunk holds its worker thread for a fraction of a
/// millisecond (about 7 microseconds per Debezium event, docs/benchmarks.md).
const CHUNK: usize = 32;

/// The most chunks being decoded or waiting to be forwarded: two per core of the machine this
/// was measured on; more only holds more memory.
const MAX_IN_FLIGHT: usize = 4;

/// A chunk smaller than this, with nothing in flight, is decoded on the stage's own task.
const INLINE_BELOW: usize = 4;

/// The stage's input queue, in messages: enough to fill the chunks in flight.
pub(super) const QUEUE: usize = CHUNK * MAX_IN_FLIGHT;

/// A message read and tracked by the source, its bytes copied, not decoded yet.
pub(super) struct Pending {
    pub(super) position: Position,
    /// The topic, for the decoder (a topic names a table when the event does not).
    pub(super) topic: Arc<str>,
    /// The schemas the registry gave for the key and value.
    pub(super) resolved: Resolved,
    /// Set when the message cannot be decoded whatever its bytes (over `max_message_bytes`:
    /// its value is not kept).
    pub(super) rejected: Option<Malformed>,
    pub(super) raw: RawMessage,
    pub(super) logged_at: Option<SystemTime>,
    pub(super) received: Instant,
    pub(super) ack: Ack,
}

impl Pending {
    fn decode(self, codec: &Codec, metrics: &Metrics) -> SourceEvent {
        let decoded = match self.rejected {
            Some(malformed) => Err(malformed),
            None => codec
                .decode(&self.resolved, &self.topic, self.raw.key.as_deref(), self.raw.value.as_deref())
                .map_err(Malformed),
        };
        let origin = match &decoded {
            Ok(Decoded::Change(c)) => c.committed_at,
            Ok(Decoded::NoChange(n)) => n.at,
            Err(_) => None,
        };
        if let Some(t) = origin {
            metrics.last_commit_timestamp.set(super::unix_seconds(t));
        }
        SourceEvent {
            position: self.position,
            decoded,
            raw: self.raw,
            logged_at: self.logged_at,
            received: self.received,
            ack: self.ack,
        }
    }
}

/// Starts the stage: what is sent on the returned sender reaches `out` decoded, in order. The
/// stage ends when the sender is dropped and everything sent is forwarded, or when `out` closes.
/// Nobody needs to wait for it: the source waits for every acknowledgement, which the stage
/// hands on to the pipeline or drops.
pub(super) fn spawn(codec: Arc<Codec>, metrics: Arc<Metrics>, out: mpsc::Sender<SourceEvent>) -> mpsc::Sender<Pending> {
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(run(codec, metrics, rx, out));
    tx
}

async fn run(
    codec: Arc<Codec>,
    metrics: Arc<Metrics>,
    mut rx: mpsc::Receiver<Pending>,
    out: mpsc::Sender<SourceEvent>,
) {
    let mut in_flight: VecDeque<JoinHandle<Vec<SourceEvent>>> = VecDeque::with_capacity(MAX_IN_FLIGHT);
    let mut input_open = true;
    loop {
        if !input_open && in_flight.is_empty() {
            return;
        }
        tokio::select! {
            // Forward what is decoded first: it frees room and keeps latency low.
            biased;
            done = head(&mut in_flight), if !in_flight.is_empty() => {
                in_flight.pop_front();
                match done {
                    Ok(events) => {
                        for event in events {
                            if out.send(event).await.is_err() {
                                return;
                            }
                        }
                    }
                    // Decoding does not panic on input; if a bug made it, the chunk's acks are
                    // dropped with it, and its messages are redelivered after a restart.
                    Err(e) => tracing::error!(error = %e, "a decoding task failed: its messages stay unacknowledged"),
                }
            }
            // The pipeline is gone: nothing decoded can be delivered any more.
            _ = out.closed() => return,
            first = rx.recv(), if input_open && in_flight.len() < MAX_IN_FLIGHT => {
                let Some(first) = first else {
                    input_open = false;
                    continue;
                };
                let mut chunk = Vec::with_capacity(CHUNK);
                chunk.push(first);
                while chunk.len() < CHUNK {
                    match rx.try_recv() {
                        Ok(pending) => chunk.push(pending),
                        Err(_) => break,
                    }
                }
                if in_flight.is_empty() && chunk.len() < INLINE_BELOW {
                    for pending in chunk {
                        if out.send(pending.decode(&codec, &metrics)).await.is_err() {
                            return;
                        }
                    }
                    continue;
                }
                let (codec, metrics) = (codec.clone(), metrics.clone());
                in_flight.push_back(tokio::spawn(async move {
                    chunk.into_iter().map(|pending| pending.decode(&codec, &metrics)).collect()
                }));
            }
        }
    }
}

/// The oldest chunk's result (chunks are forwarded in the order they were cut).
async fn head(
    in_flight: &mut VecDeque<JoinHandle<Vec<SourceEvent>>>,
) -> Result<Vec<SourceEvent>, tokio::task::JoinError> {
    match in_flight.front_mut() {
        Some(handle) => handle.await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KafkaFormat;
    use crate::event::Decoded;
    use crate::source::Finished;

    const TOPIC: &str = "shop.public.products";

    fn pending(offset: i64, ack_tx: &mpsc::UnboundedSender<Finished>) -> Pending {
        let topic: Arc<str> = Arc::from(TOPIC);
        let value =
            format!(r#"{{"after":{{"id":{offset}}},"source":{{"schema":"public","table":"products"}},"op":"c"}}"#);
        // Every 97th message is over the size limit: rejected before decoding, still in order.
        let rejected = (offset % 97 == 0).then(|| Malformed("too big".into()));
        Pending {
            position: Position::Kafka { topic: topic.clone(), partition: 0, offset },
            topic: topic.clone(),
            resolved: Resolved::plain(),
            rejected,
            raw: RawMessage { topic: Some(topic), key: None, value: Some(value.into_bytes()) },
            logged_at: None,
            received: Instant::now(),
            ack: Ack::new(ack_tx.clone(), Finished { stream: 0, seq: offset }),
        }
    }

    /// Events leave the stage in the order they entered, each decoded from its own message,
    /// whether they were decoded on the stage's task (one at a time) or in chunks as tasks of
    /// their own (a burst), and with the pipeline's queue smaller than a chunk.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_leave_decoded_in_stream_order() {
        let codec = Arc::new(Codec::with_registry(KafkaFormat::Json, None));
        let (out, mut pipeline) = mpsc::channel(8);
        let input = spawn(codec, Arc::new(Metrics::new()), out);
        let (ack_tx, _ack_rx) = mpsc::unbounded_channel();
        let total = 5_000;
        let feeder = tokio::spawn(async move {
            // One at a time first (a quiet source), then a burst that fills the queue.
            for offset in 0..3 {
                input.send(pending(offset, &ack_tx)).await.map_err(|_| "stage gone")?;
                tokio::task::yield_now().await;
            }
            for offset in 3..total {
                input.send(pending(offset, &ack_tx)).await.map_err(|_| "stage gone")?;
            }
            Ok::<_, &str>(())
        });
        let mut next = 0;
        while let Some(event) = pipeline.recv().await {
            let Position::Kafka { offset, .. } = event.position else { panic!("{:?}", event.position) };
            assert_eq!(offset, next, "in order");
            match event.decoded {
                Err(Malformed(reason)) => assert!(offset % 97 == 0 && reason == "too big", "{offset}: {reason}"),
                Ok(Decoded::Change(change)) => {
                    assert_ne!(offset % 97, 0);
                    let id = change.after.as_ref().and_then(|row| row.get("id")).and_then(|v| v.as_i64());
                    assert_eq!(id, Some(offset), "decoded from its own message");
                }
                Ok(other) => panic!("{other:?}"),
            }
            next += 1;
        }
        assert_eq!(next, total, "every event forwarded, then the stage ends");
        assert_eq!(feeder.await.ok(), Some(Ok(())));
    }
}
