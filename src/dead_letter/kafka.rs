//! Dead letters produced to a Kafka topic, acknowledged by every in-sync replica before the
//! events are acknowledged.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::{DeadLetterError, Letter};
use crate::config::{DeadLetterKafka, KafkaConfig};

pub(super) struct KafkaDestination {
    producer: FutureProducer,
    topic: String,
}

/// The dead-letter producer's librdkafka settings: what [`KafkaDestination::new`] creates, and
/// what the config loader builds without connecting (so `check` sees what `run` would reject).
pub(crate) fn client_config(config: &DeadLetterKafka, source: Option<&KafkaConfig>) -> ClientConfig {
    let mut c = ClientConfig::new();
    // Default to the source cluster and its security settings.
    if let Some(s) = source {
        c.set("bootstrap.servers", &s.brokers);
        for (k, v) in &s.resolved_librdkafka {
            if is_common_client_setting(k) {
                c.set(k, v.expose());
            }
        }
    }
    if let Some(b) = &config.brokers {
        c.set("bootstrap.servers", b);
    }
    c.set("acks", "all").set("enable.idempotence", "true").set("message.timeout.ms", "30000");
    for (k, v) in &config.resolved_librdkafka {
        c.set(k, v.expose());
    }
    c
}

impl KafkaDestination {
    pub(super) fn new(
        config: &DeadLetterKafka,
        source: Option<&KafkaConfig>,
    ) -> Result<KafkaDestination, DeadLetterError> {
        let c = client_config(config, source);
        let producer = c.create().map_err(|e| DeadLetterError::Open(format!("dead-letter producer: {e}")))?;
        Ok(KafkaDestination { producer, topic: config.topic.clone() })
    }

    pub(super) fn topic(&self) -> &str {
        &self.topic
    }

    pub(super) async fn write(&self, letters: &[Letter]) -> Result<(), DeadLetterError> {
        let sends = letters.iter().map(|l| {
            let value = serde_json::to_vec(&l.record).unwrap_or_default();
            let key = l.key_bytes();
            let producer = &self.producer;
            let topic = &self.topic;
            async move {
                let mut record = FutureRecord::to(topic).payload(&value);
                if let Some(k) = key.as_deref() {
                    record = record.key(k);
                }
                producer.send(record, Duration::from_secs(30)).await.map(|_| ()).map_err(|(e, _)| e)
            }
        });
        for result in futures::future::join_all(sends).await {
            result.map_err(|e| DeadLetterError::Write(format!("topic {}: {e}", self.topic)))?;
        }
        Ok(())
    }
}

/// Connection and security settings a producer can share with the source consumer.
fn is_common_client_setting(key: &str) -> bool {
    key.starts_with("security.")
        || key.starts_with("sasl.")
        || key.starts_with("ssl.")
        || key == "client.id"
        || key == "client.rack"
}
