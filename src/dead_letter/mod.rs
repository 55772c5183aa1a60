//! Dead letters: events that could not be (fully) invalidated, kept with their reason and source
//! position so an operator can fix the cause and replay them.
//!
//! A dead letter is written, and durably (fsync, or a Kafka delivery report with `acks=all`),
//! *before* its event is acknowledged: an event is finished when every sink is done with it or
//! it is dead-lettered, never before. Writes retry until they succeed or shutdown abandons them.
//!
//! Record format (one JSON object; one line in the file, the message value on the topic):
//! `{"reason":"rule_error","error":"…","position":"shop.public.products[0]@42",
//!   "source":{"kind":"kafka","topic":…,"partition":0,"offset":42},"table":"public.products",
//!   "op":"delete","key":"{\"id\":43}","value":"{…original value…}","dead_lettered_at_ms":…}`.
//! `key` and `value` hold the original bytes as text (`value_base64` when they are not UTF-8),
//! so `replay` can feed them back through the decoder exactly.

pub mod config;
mod file;
pub(crate) mod kafka;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use serde_json::{json, Value};

use crate::config::{DeadLetterConfig, KafkaConfig};
use crate::retry::{self, RetryError, RetryPolicy, Verdict};
use crate::shutdown::Shutdown;
use crate::source::{Position, RawMessage};
use crate::telemetry::events::dead_letter::{DeadLetterWriteFailed, DeadLettersWritten};
use crate::telemetry::Metrics;

/// Why an event was dead-lettered; also the `reason` label of the dead-letter metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Not valid JSON, or a change event without the fields it needs.
    Malformed,
    /// A template no row image could render (the rest of the event was still invalidated).
    RuleError,
    /// A sink refused an item for good (a CDN's 400, a key over the provider's limit).
    SinkRejected,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Malformed => "malformed",
            Reason::RuleError => "rule_error",
            Reason::SinkRejected => "sink_rejected",
        }
    }
}

/// One dead letter, ready to write.
#[derive(Debug, Clone)]
pub struct Letter {
    pub reason: Reason,
    pub error: String,
    pub record: Value,
}

impl Letter {
    pub fn new(
        reason: Reason,
        error: String,
        position: &Position,
        raw: &RawMessage,
        table: Option<&str>,
        op: Option<&str>,
    ) -> Letter {
        let source = match position {
            Position::Kafka { topic, partition, offset } => {
                json!({"kind": "kafka", "topic": &**topic, "partition": partition, "offset": offset})
            }
            Position::Postgres { lsn, commit_end_lsn } => {
                json!({"kind": "postgres", "lsn": lsn, "commit_end_lsn": commit_end_lsn})
            }
            Position::File { line } => json!({"kind": "file", "line": line}),
        };
        // The reason may be a CDN's answer that echoes our request headers (a token).
        let error = crate::redact::scrub(&error).into_owned();
        let mut record = json!({
            "reason": reason.as_str(),
            "error": &error,
            "position": position.to_string(),
            "source": source,
            "table": table,
            "op": op,
            "dead_lettered_at_ms": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
        });
        if let Some(obj) = record.as_object_mut() {
            put_bytes(obj, "key", raw.key.as_deref());
            put_bytes(obj, "value", raw.value.as_deref());
        }
        Letter { reason, error, record }
    }

    /// The original message key, for keying the dead-letter topic like the source topic.
    fn key_bytes(&self) -> Option<Vec<u8>> {
        bytes_of(&self.record, "key")
    }
}

fn put_bytes(obj: &mut serde_json::Map<String, Value>, name: &str, bytes: Option<&[u8]>) {
    match bytes {
        None => {
            obj.insert(name.into(), Value::Null);
        }
        Some(b) => match std::str::from_utf8(b) {
            Ok(s) => {
                obj.insert(name.into(), Value::String(s.to_owned()));
            }
            Err(_) => {
                obj.insert(name.into(), Value::Null);
                obj.insert(
                    format!("{name}_base64"),
                    Value::String(base64::engine::general_purpose::STANDARD.encode(b)),
                );
            }
        },
    }
}

/// Reads back `key`/`value` (or `*_base64`) of a dead-letter record: the original bytes.
pub fn bytes_of(record: &Value, name: &str) -> Option<Vec<u8>> {
    if let Some(s) = record.get(name).and_then(Value::as_str) {
        return Some(s.as_bytes().to_vec());
    }
    let b64 = record.get(format!("{name}_base64")).and_then(Value::as_str)?;
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// Opening the destination failed at start: fatal.
    #[error("cannot open the dead-letter destination: {0}")]
    Open(String),
    /// A write failed (retriable: disk full, broker down).
    #[error("cannot write dead letters: {0}")]
    Write(String),
    /// Shutdown abandoned the write: the events stay unacknowledged.
    #[error("abandoned at shutdown")]
    Abandoned,
}

enum Destination {
    File(file::FileDestination),
    Kafka(kafka::KafkaDestination),
}

/// The dead-letter destination: a JSON-lines file or a Kafka topic.
pub struct DeadLetters {
    destination: Destination,
    retry: RetryPolicy,
    metrics: Arc<Metrics>,
}

impl DeadLetters {
    pub async fn open(
        config: &DeadLetterConfig,
        source: Option<&KafkaConfig>,
        metrics: Arc<Metrics>,
    ) -> Result<DeadLetters, DeadLetterError> {
        let destination = match (&config.kafka, &config.file) {
            (Some(k), _) => Destination::Kafka(kafka::KafkaDestination::new(k, source)?),
            (None, Some(path)) => Destination::File(file::FileDestination::open(path).await?),
            (None, None) => return Err(DeadLetterError::Open("no dead-letter destination configured".into())),
        };
        Ok(DeadLetters { destination, retry: config.retry.clone(), metrics })
    }

    /// A human-readable name of the destination, for logs.
    pub fn describe(&self) -> String {
        match &self.destination {
            Destination::File(f) => format!("file {}", f.path().display()),
            Destination::Kafka(k) => format!("kafka topic {}", k.topic()),
        }
    }

    /// Writes every letter durably, retrying until done or abandoned.
    pub async fn write(&self, letters: &[Letter], shutdown: &Shutdown) -> Result<(), DeadLetterError> {
        if letters.is_empty() {
            return Ok(());
        }
        let result = retry::retry(
            &self.retry,
            shutdown,
            || async {
                match &self.destination {
                    Destination::File(f) => f.write(letters).await,
                    Destination::Kafka(k) => k.write(letters).await,
                }
            },
            |_| Verdict::Retry { floor: None },
            |e, attempt, wait| {
                self.metrics.emit(DeadLetterWriteFailed { error: e, attempt, wait });
            },
        )
        .await;
        match result {
            Ok(()) => {
                self.metrics.emit(DeadLettersWritten { reasons: &mut letters.iter().map(|l| l.reason) });
                Ok(())
            }
            Err(RetryError::Abandoned { .. }) => Err(DeadLetterError::Abandoned),
            Err(RetryError::Permanent(e)) | Err(RetryError::Exhausted { last: e, .. }) => Err(e),
        }
    }
}
