//! How much librdkafka fetches ahead of the pipeline, sized from the daemon's own queue.
//!
//! librdkafka's defaults are made for a consumer that is itself the bottleneck's far side: it
//! keeps up to 100,000 messages or 64 MiB (`queued.min.messages`, `queued.max.messages.kbytes`)
//! fetched ahead, with fetches of up to 50 MiB (`fetch.max.bytes`). Catching up on a backlog,
//! the daemon then held most of a 200,000-event topic in memory before its pipeline got to it
//! (peak RSS 108 MiB, docs/benchmarks.md). Prefetching more than the pipeline can take next
//! buys nothing: the pipeline's own source queue (`pipeline.queue_capacity` events) already
//! smooths the hand-over, so librdkafka only has to cover one fetch round trip while that queue
//! drains. So:
//!
//! - `queued.min.messages` = 4 x `pipeline.queue_capacity`: librdkafka stops fetching once its
//!   consumer queue holds that many messages (for the high-level consumer this counts every
//!   partition together, since each partition's queue forwards to it). One queue's worth was
//!   the first choice, and it starved the pipeline once the pipeline got faster: at 330,000
//!   events/s it drains 1,024 messages in 3 ms, less than the 5 ms backoff below plus a fetch
//!   round trip, and catching up ran at 0.83 of the rate with four queues' worth
//!   (docs/benchmarks.md, "Throughput after the session's merges"). Memory is bounded by the
//!   next setting, not by this count;
//! - `queued.max.messages.kbytes` = 2 KiB per event of the pipeline queue (2 MiB with the
//!   default 1,024): the byte bound (a JSON message with its schema is 2 to 4 KB, without it
//!   under 1 KB). librdkafka lowers `fetch.max.bytes` to the same figure by itself (unless it
//!   is set), so one fetch response cannot exceed it either;
//! - `fetch.queue.backoff.ms` = 5: once over those thresholds, librdkafka looks again only
//!   after this long (default 1 s, meant for a large prefetch; with one pipeline queue's worth
//!   the pipeline would drain it in tens of milliseconds and then wait the rest of that second).
//!   It only applies while the prefetch is full, so it costs nothing under light load.
//!
//! Each can still be set in `source.kafka.librdkafka`, which wins.

use std::collections::BTreeMap;

use rdkafka::config::ClientConfig;

use crate::config::Scalar;

/// Messages of prefetch per event of the pipeline's source queue (the count that makes
/// librdkafka fetch more; the byte bound below is what bounds memory).
const MESSAGES_PER_EVENT: usize = 4;
/// KiB of prefetch per event of the pipeline's source queue.
const KIB_PER_EVENT: usize = 2;

/// librdkafka's own default for `queued.max.messages.kbytes`: never above it.
const MAX_KBYTES: usize = 65_536;

/// At least about one librdkafka `message.max.bytes` (1,000,000), which `fetch.max.bytes` may
/// not go below.
const MIN_KBYTES: usize = 1_024;

/// How long librdkafka waits before looking at a full prefetch again.
const QUEUE_BACKOFF_MS: &str = "5";

/// The prefetch settings for a pipeline queue of `queue_capacity` events.
pub fn settings(queue_capacity: usize) -> [(&'static str, String); 3] {
    let messages = queue_capacity.saturating_mul(MESSAGES_PER_EVENT).clamp(1, 10_000_000);
    let kbytes = queue_capacity.saturating_mul(KIB_PER_EVENT).clamp(MIN_KBYTES, MAX_KBYTES);
    [
        ("queued.min.messages", messages.to_string()),
        ("queued.max.messages.kbytes", kbytes.to_string()),
        ("fetch.queue.backoff.ms", QUEUE_BACKOFF_MS.to_string()),
    ]
}

/// Sets [`settings`] on `client`, except those the user set in `source.kafka.librdkafka`.
pub fn apply(client: &mut ClientConfig, queue_capacity: usize, passthrough: &BTreeMap<String, Scalar>) {
    for (key, value) in settings(queue_capacity) {
        if !passthrough.contains_key(key) {
            client.set(key, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_of_4096_prefetches_16384_messages_or_8_mib() {
        let s = settings(4096);
        assert_eq!(s[0], ("queued.min.messages", "16384".to_string()));
        assert_eq!(s[1], ("queued.max.messages.kbytes", "8192".to_string()));
        assert_eq!(s[2], ("fetch.queue.backoff.ms", "5".to_string()));
    }

    #[test]
    fn the_byte_bound_stays_within_librdkafkas_limits() {
        assert_eq!(settings(1)[1].1, MIN_KBYTES.to_string());
        assert_eq!(settings(usize::MAX)[1].1, MAX_KBYTES.to_string());
        assert_eq!(settings(usize::MAX)[0].1, "10000000");
    }

    #[test]
    fn a_setting_in_source_kafka_librdkafka_wins() {
        let passthrough = BTreeMap::from([("queued.min.messages".to_string(), Scalar::Int(50_000))]);
        let mut client = ClientConfig::new();
        client.set("queued.min.messages", "50000");
        apply(&mut client, 4096, &passthrough);
        assert_eq!(client.get("queued.min.messages"), Some("50000"));
        assert_eq!(client.get("queued.max.messages.kbytes"), Some("8192"));
    }
}
