//! What the sources report: Kafka rebalances, offset commits, client errors and lag; the
//! PostgreSQL slot role; schema registry requests.

use std::fmt::Display;

use super::InternalEvent;
use crate::telemetry::Metrics;

/// The modules whose logs these are (operators filter on them).
const KAFKA: &str = "cdc_invalidator::source::kafka";
const KAFKA_CONTEXT: &str = "cdc_invalidator::source::kafka::context";

/// librdkafka's consumer lag of one partition, from its statistics.
pub struct KafkaConsumerLag<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub lag: i64,
}

impl InternalEvent for KafkaConsumerLag<'_> {
    fn emit(self, metrics: &Metrics) {
        metrics.kafka_consumer_lag.with_label_values(&[self.topic, &self.partition.to_string()]).set(self.lag);
    }
}

/// The Kafka client reported an error it recovers from by itself (broker down, transport
/// failure, all brokers down).
pub struct KafkaClientError<'a> {
    pub error: &'a dyn Display,
    pub reason: &'a str,
}

impl InternalEvent for KafkaClientError<'_> {
    fn emit(self, metrics: &Metrics) {
        metrics.source_errors.inc();
        let (error, reason) = (self.error, self.reason);
        tracing::warn!(target: KAFKA, %error, reason, "kafka client error (transient; librdkafka retries)");
    }
}

/// The group revoked `partitions` partitions; `committing` positions are committed.
pub struct PartitionsRevoked {
    pub partitions: usize,
    pub committing: usize,
}

impl InternalEvent for PartitionsRevoked {
    fn emit(self, metrics: &Metrics) {
        metrics.rebalances.with_label_values(&["revoke"]).inc();
        tracing::info!(
            target: KAFKA_CONTEXT,
            partitions = self.partitions,
            committing = self.committing,
            "partitions revoked: committing what is finished, dropping the rest unacknowledged"
        );
    }
}

/// The group assigned `partitions` partitions to this consumer.
pub struct PartitionsAssigned {
    pub partitions: usize,
}

impl InternalEvent for PartitionsAssigned {
    fn emit(self, metrics: &Metrics) {
        metrics.rebalances.with_label_values(&["assign"]).inc();
        tracing::info!(target: KAFKA_CONTEXT, partitions = self.partitions, "partitions assigned");
    }
}

/// Source positions committed (`partitions` of them, when the client says).
pub struct OffsetsCommitted {
    pub partitions: Option<usize>,
}

impl InternalEvent for OffsetsCommitted {
    fn emit(self, metrics: &Metrics) {
        metrics.source_commits.with_label_values(&["ok"]).inc();
        if let Some(partitions) = self.partitions {
            tracing::debug!(target: KAFKA_CONTEXT, partitions, "offsets committed");
        }
    }
}

/// Where an offset commit failed, which says what happens next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitStage {
    /// On a revoke: the new owner redelivers from the previous commit.
    Revoke,
    /// The commit could not be sent: retried on the next tick.
    Send,
    /// The broker answered the commit with an error: retried on the next tick.
    Callback,
    /// The last commit at shutdown: the next start redelivers from the previous commit.
    Final,
}

/// An offset commit failed at `stage`.
pub struct OffsetCommitFailed<'a> {
    pub stage: CommitStage,
    pub error: &'a dyn Display,
}

impl InternalEvent for OffsetCommitFailed<'_> {
    fn emit(self, metrics: &Metrics) {
        metrics.source_commits.with_label_values(&["error"]).inc();
        let e = self.error;
        match self.stage {
            CommitStage::Revoke => {
                tracing::warn!(target: KAFKA_CONTEXT, error = %e, "commit on revoke failed; the new owner will redeliver")
            }
            CommitStage::Send => {
                tracing::warn!(target: KAFKA, error = %e, "cannot send offset commit; retrying on the next tick")
            }
            CommitStage::Callback => {
                tracing::warn!(target: KAFKA_CONTEXT, error = %e, "offset commit failed; retrying on the next tick")
            }
            CommitStage::Final => {
                tracing::warn!(target: KAFKA, error = %e, "final offset commit failed: the next start redelivers from the previous commit")
            }
        }
    }
}

/// The role this daemon holds on a PostgreSQL replication slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostgresRole {
    /// Streams from the slot.
    Active,
    /// Waits for the slot to become free.
    Standby,
}

impl PostgresRole {
    const ALL: [PostgresRole; 2] = [PostgresRole::Active, PostgresRole::Standby];

    pub fn as_str(self) -> &'static str {
        match self {
            PostgresRole::Active => "active",
            PostgresRole::Standby => "standby",
        }
    }
}

/// The daemon's role on the slot changed (`None`: neither, e.g. between attempts). Only the
/// active role is ready.
pub struct PostgresRoleChanged {
    pub role: Option<PostgresRole>,
}

impl InternalEvent for PostgresRoleChanged {
    fn emit(self, metrics: &Metrics) {
        for r in PostgresRole::ALL {
            metrics.postgres_role.with_label_values(&[r.as_str()]).set(i64::from(self.role == Some(r)));
        }
        metrics.source_ready.set(i64::from(self.role == Some(PostgresRole::Active)));
    }
}

/// How a schema registry request ended (`cdc_invalidator_schema_registry_requests_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistryOutcome {
    Ok,
    NotFound,
    /// 401 or 403.
    Unauthorized,
    Error,
}

impl RegistryOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            RegistryOutcome::Ok => "ok",
            RegistryOutcome::NotFound => "not_found",
            RegistryOutcome::Unauthorized => "unauthorized",
            RegistryOutcome::Error => "error",
        }
    }
}

/// One schema registry request.
pub struct SchemaRegistryRequest {
    pub outcome: RegistryOutcome,
}

impl InternalEvent for SchemaRegistryRequest {
    fn emit(self, metrics: &Metrics) {
        metrics.schema_registry_requests.with_label_values(&[self.outcome.as_str()]).inc();
    }
}
