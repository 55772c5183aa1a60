//! What the read-replica freshness gate reports: each replica's replay lag, and second passes
//! sent at `freshness.max_wait` because replicas were behind.

use std::time::Duration;

use super::InternalEvent;
use crate::telemetry::Metrics;

/// Replica `replica` is `bytes` of WAL (received or awaited) behind in replay, and `seconds`
/// when a poll of the replica measured it (`None`: only the bytes are known, from a newer
/// commit awaited).
pub struct ReplicaLag<'a> {
    pub replica: &'a str,
    pub bytes: i64,
    pub seconds: Option<f64>,
}

impl InternalEvent for ReplicaLag<'_> {
    fn emit(self, metrics: &Metrics) {
        metrics.replica_replay_lag_bytes.with_label_values(&[self.replica]).set(self.bytes.max(0));
        if let Some(seconds) = self.seconds {
            metrics.replica_replay_lag_seconds.with_label_values(&[self.replica]).set(seconds.max(0.0));
        }
    }
}

/// `freshness.max_wait` (`max_wait`) passed before replicas `behind` replayed the commit at
/// `lsn` (formatted): the second pass goes anyway.
pub struct MaxWaitReached<'a> {
    pub behind: &'a [&'a str],
    pub lsn: &'a str,
    pub max_wait: Duration,
}

impl InternalEvent for MaxWaitReached<'_> {
    fn emit(self, metrics: &Metrics) {
        for replica in self.behind {
            metrics.freshness_max_wait.with_label_values(&[replica]).inc();
        }
        tracing::warn!(
            target: "cdc_invalidator::freshness",
            replicas = %self.behind.join(","),
            lsn = %self.lsn,
            max_wait_ms = self.max_wait.as_millis() as u64,
            "freshness.max_wait reached before every replica replayed the commit: second pass sent anyway"
        );
    }
}
