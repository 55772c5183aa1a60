//! How much librdkafka fetches ahead of the pipeline: a fixed amount, whatever the pipeline's
//! own queue.
//!
//! librdkafka's defaults are made for a consumer that is itself the bottleneck's far side: it
//! keeps up to 100,000 messages or 64 MiB (`queued.min.messages`, `queued.max.messages.kbytes`)
//! fetched ahead, with fetches of up to 50 MiB (`fetch.max.bytes`). Catching up on a backlog,
//! the daemon then held most of a 200,000-event topic in memory before its pipeline got to it
//! (peak RSS 108 MiB, docs/benchmarks.md). The prefetch only has to cover what the pipeline
//! takes during one fetch round trip (plus `fetch.queue.backoff.ms`): that depends on how fast
//! the pipeline is, not on how long its queues are. It was sized from
//! `pipeline.queue_capacity` (4 messages and 2 KiB per event of the queue) until that turned
//! out to be most of the memory a larger queue cost: a prefetched message costs far more than
//! the byte bound counts (docs/benchmarks.md, "Memory per queued event (hmem)"). So:
//!
//! - `queued.min.messages` = 4,096: librdkafka stops fetching once its consumer queue holds that
//!   many messages (for the high-level consumer this counts every partition together, since
//!   each partition's queue forwards to it). 1,024 starved the pipeline at 330,000 events/s:
//!   it drains 1,024 messages in 3 ms, less than the 5 ms backoff below plus a fetch round trip
//!   (docs/benchmarks.md, "Throughput after the session's merges");
//! - `queued.max.messages.kbytes` = 2,048 (2 MiB): the byte bound, the one that holds for large
//!   messages. librdkafka counts only message values in it, and lowers `fetch.max.bytes` to
//!   the same figure by itself (unless it is set), so one fetch response cannot exceed it
//!   either (by more than one record batch, which a broker always returns whole);
//! - `fetch.queue.backoff.ms` = 5: once over those thresholds, librdkafka looks again only
//!   after this long (default 1 s, meant for a large prefetch; this one the pipeline drains in
//!   milliseconds and would then wait the rest of that second). It only applies while the
//!   prefetch is full, so it costs nothing under light load.
//!
//! What that holds, at most: the messages of the queue plus one fetch response arriving on
//! top (librdkafka fetches while under the thresholds), so about 4,096 messages plus 2 MiB of
//! them; each message costs librdkafka a 1 KiB operation besides its bytes, and a fetch
//! response's buffer lives until the last of its messages is consumed. For 400-byte messages
//! that is about 15 MiB, measured 22 MiB at the peak (heaptrack).
//!
//! Each can still be set in `source.kafka.librdkafka`, which wins.

use std::collections::BTreeMap;

use rdkafka::config::ClientConfig;

use crate::config::Scalar;

/// The prefetch settings, in the order of the module's list.
pub fn settings() -> [(&'static str, &'static str); 3] {
    [("queued.min.messages", "4096"), ("queued.max.messages.kbytes", "2048"), ("fetch.queue.backoff.ms", "5")]
}

/// Sets [`settings`] on `client`, except those the user set in `source.kafka.librdkafka`.
pub fn apply(client: &mut ClientConfig, passthrough: &BTreeMap<String, Scalar>) {
    for (key, value) in settings() {
        if !passthrough.contains_key(key) {
            client.set(key, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefetch_is_4096_messages_or_2_mib() {
        let mut client = ClientConfig::new();
        apply(&mut client, &BTreeMap::new());
        assert_eq!(client.get("queued.min.messages"), Some("4096"));
        assert_eq!(client.get("queued.max.messages.kbytes"), Some("2048"));
        assert_eq!(client.get("fetch.queue.backoff.ms"), Some("5"));
    }

    #[test]
    fn a_setting_in_source_kafka_librdkafka_wins() {
        let passthrough = BTreeMap::from([("queued.min.messages".to_string(), Scalar::Int(50_000))]);
        let mut client = ClientConfig::new();
        client.set("queued.min.messages", "50000");
        apply(&mut client, &passthrough);
        assert_eq!(client.get("queued.min.messages"), Some("50000"));
        assert_eq!(client.get("queued.max.messages.kbytes"), Some("2048"));
    }
}
