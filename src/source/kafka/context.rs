//! librdkafka callbacks: rebalances, commit results, statistics (lag), errors and logs.
//!
//! These run on whatever thread polls the consumer (our source task, inside `recv()`), so they
//! must be quick and must never block: commits here are asynchronous.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::{ClientContext, Offset, Statistics, TopicPartitionList};

use super::tracker::{CommitPoint, Tracker};
use crate::telemetry::events::source::{
    CommitStage, KafkaClientError, KafkaConsumerLag, OffsetCommitFailed, OffsetsCommitted, PartitionsAssigned,
    PartitionsRevoked,
};
use crate::telemetry::Metrics;

pub(super) struct KafkaContext {
    pub(super) tracker: Arc<Mutex<Tracker>>,
    pub(super) metrics: Arc<Metrics>,
    /// Set by a failed asynchronous commit so the next tick re-sends every offset.
    pub(super) commit_failed: AtomicBool,
}

/// Locks the tracker; a poisoned lock (a panic elsewhere) is still usable: the tracker has no
/// invariants a panic could half-break that matter more than continuing to commit correctly.
pub(super) fn lock(tracker: &Mutex<Tracker>) -> std::sync::MutexGuard<'_, Tracker> {
    tracker.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sends an asynchronous offset commit whose result comes back as an event on the consumer
/// queue, so [`ConsumerContext::commit_callback`] runs when the consumer is next polled.
///
/// Why not `Consumer::commit(.., CommitMode::Async)`: rust-rdkafka 0.39 submits it with
/// `rd_kafka_commit()` and neither a reply queue nor a callback, so librdkafka never reports the
/// result (rust-rdkafka issue #856, fix proposed in #857). Without the result a failed commit
/// (coordinator moving, broker down) would go unnoticed and, for a partition whose offset does
/// not move again, never be re-sent.
pub(super) fn commit_async<C: rdkafka::ClientContext>(
    client: &rdkafka::client::Client<C>,
    tpl: &TopicPartitionList,
) -> KafkaResult<()> {
    use rdkafka::bindings as rd;
    // SAFETY: `client` owns a live rd_kafka_t for the duration of this call. The queue handle
    // returned by rd_kafka_queue_get_consumer is our own reference; rd_kafka_commit_queue takes
    // a separate reference for its reply, so destroying ours right away is allowed. The
    // partition list is only read during the call (librdkafka copies it).
    let err = unsafe {
        let rk = client.native_ptr();
        let queue = rd::rd_kafka_queue_get_consumer(rk);
        if queue.is_null() {
            return Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::State));
        }
        let err = rd::rd_kafka_commit_queue(rk, tpl.ptr(), queue, None, std::ptr::null_mut());
        rd::rd_kafka_queue_destroy(queue);
        err
    };
    if err == rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR {
        Ok(())
    } else {
        Err(KafkaError::ConsumerCommit(err.into()))
    }
}

pub(super) fn commit_list(points: &[CommitPoint]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::with_capacity(points.len());
    for p in points {
        // Only fails for an invalid offset, which a watermark never produces.
        let _ = tpl.add_partition_offset(&p.topic, p.partition, Offset::Offset(p.offset));
    }
    tpl
}

impl ClientContext for KafkaContext {
    fn stats(&self, statistics: Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                // Partition -1 is librdkafka's internal UA partition; lag -1 means unknown.
                if *partition < 0 || p.consumer_lag < 0 {
                    continue;
                }
                self.metrics.emit(KafkaConsumerLag { topic, partition: *partition, lag: p.consumer_lag });
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // librdkafka recovers from these by itself (broker down, transport failure, all brokers
        // down): count and log, never stop.
        self.metrics.emit(KafkaClientError { error: &error, reason });
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel::*;
        match level {
            Emerg | Alert | Critical | Error => tracing::error!(target: "librdkafka", fac, "{message}"),
            Warning => tracing::warn!(target: "librdkafka", fac, "{message}"),
            Notice | Info => tracing::info!(target: "librdkafka", fac, "{message}"),
            Debug => tracing::debug!(target: "librdkafka", fac, "{message}"),
        }
    }
}

impl ConsumerContext for KafkaContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let points: Vec<CommitPoint> = {
                let mut tracker = lock(&self.tracker);
                tpl.elements().iter().filter_map(|e| tracker.revoke(e.topic(), e.partition())).collect()
            };
            self.metrics.emit(PartitionsRevoked { partitions: tpl.count(), committing: points.len() });
            if !points.is_empty() {
                // Asynchronous: a rebalance callback must not block. If it is lost, the new owner
                // redelivers from the previous commit: duplicates, never a loss.
                if let Err(e) = commit_async(consumer.client(), &commit_list(&points)) {
                    self.metrics.emit(OffsetCommitFailed { stage: CommitStage::Revoke, error: &e });
                }
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let mut tracker = lock(&self.tracker);
        match rebalance {
            Rebalance::Assign(tpl) => {
                for e in tpl.elements() {
                    tracker.assign(e.topic(), e.partition());
                }
                if tracker.paused {
                    let _ = consumer.pause(tpl);
                }
                self.metrics.emit(PartitionsAssigned { partitions: tpl.count() });
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
        self.metrics.source_ready.set((tracker.assigned() > 0) as i64);
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => {
                self.metrics.emit(OffsetsCommitted { partitions: Some(offsets.count()) });
            }
            Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                self.commit_failed.store(true, Ordering::Relaxed);
                self.metrics.emit(OffsetCommitFailed { stage: CommitStage::Callback, error: &e });
            }
        }
    }
}
