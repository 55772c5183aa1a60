//! Heap bytes per event as the Kafka source hands it to the pipeline: the message decoded as
//! `to_event` decodes it, its copy kept for dead letters, and the `SourceEvent` itself, counted
//! by a global allocator that adds up jemalloc's usable sizes (what the daemon's allocator
//! really reserves, size classes included). What the `source.kafka.max_in_flight_bytes` doc and
//! docs/design.md ("Memory: what bounds what") say an event costs.
//!
//! ```text
//! cargo bench --bench event_memory                    # the messages of benchmark (b)
//! BENCH_PAD=10000 cargo bench --bench event_memory    # plus a 10,000-byte text column
//! ```
//!
//! The messages are `tests/support/events.rs` `product_update`, with BENCH_PAD bytes of text
//! added to both row images (a large column appears in `before` and `after` alike). What the
//! pipeline adds per event (its rules' results, the rendered keys; a few hundred bytes) is not
//! counted.

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use cdc_invalidator::config::KafkaFormat;
use cdc_invalidator::source::encoded::{Codec, Resolved};
use cdc_invalidator::source::{Ack, Malformed, Position, RawMessage, SourceEvent};

use support::events::product_update;

/// jemalloc, counting the usable size of every live block.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call goes to jemalloc unchanged; the counting only reads the usable size of a
// block jemalloc returned (and has not freed yet).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = tikv_jemallocator::Jemalloc.alloc(layout);
        if !p.is_null() {
            LIVE.fetch_add(tikv_jemallocator::usable_size(p), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        LIVE.fetch_sub(tikv_jemallocator::usable_size(p), Ordering::Relaxed);
        tikv_jemallocator::Jemalloc.dealloc(p, layout)
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, size: usize) -> *mut u8 {
        let before = tikv_jemallocator::usable_size(p);
        let q = tikv_jemallocator::Jemalloc.realloc(p, layout, size);
        if !q.is_null() {
            LIVE.fetch_sub(before, Ordering::Relaxed);
            LIVE.fetch_add(tikv_jemallocator::usable_size(q), Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn main() {
    let pad: usize = std::env::var("BENCH_PAD").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let n = 2_000;
    let text = "x".repeat(pad);
    let messages: Vec<(Vec<u8>, Vec<u8>)> = (0..n as i64)
        .map(|id| {
            let value = product_update(10_000 + id, id % 97, (id + 1) % 97);
            let value = if pad > 0 {
                value.replace(r#","slug":"#, &format!(r#","description":"{text}","slug":"#))
            } else {
                value
            };
            (format!("{{\"id\":{}}}", 10_000 + id).into_bytes(), value.into_bytes())
        })
        .collect();
    let codec = Codec::with_registry(KafkaFormat::Json, None);
    let topic: Arc<str> = Arc::from("bench.public.products");
    let mut events = Vec::with_capacity(n);
    let before = LIVE.load(Ordering::Relaxed);
    for (offset, (key, value)) in messages.iter().enumerate() {
        // As `KafkaSource::to_event` builds it.
        let decoded = codec.decode(&Resolved::plain(), &topic, Some(key), Some(value)).map_err(Malformed);
        assert!(decoded.is_ok(), "{decoded:?}");
        events.push(SourceEvent {
            position: Position::Kafka { topic: topic.clone(), partition: 0, offset: offset as i64 },
            decoded,
            raw: RawMessage { topic: Some(topic.clone()), key: Some(key.clone()), value: Some(value.clone()) },
            logged_at: Some(SystemTime::now()),
            received: Instant::now(),
            ack: Ack::detached(),
        });
    }
    // `events` was allocated up front: what grew is the events' own heap.
    let heap = (LIVE.load(Ordering::Relaxed) - before) / n;
    let message = messages.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>() / n;
    let inline = std::mem::size_of::<SourceEvent>();
    println!(
        "event_memory: message {message} bytes (key and value); event {} bytes = {inline} inline (in a queue slot) \
         + {heap} on the heap; {:.2} x the message",
        inline + heap,
        (inline + heap) as f64 / message as f64
    );
}
