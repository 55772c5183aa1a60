//! Debezium change events (Kafka Connect JsonConverter) decoded into [`crate::event::Decoded`].
//! (Being written; the API below is fixed.)

use crate::event::Decoded;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("{0}")]
    Malformed(String),
}

/// Decodes one Kafka message. `value` is `None` for a tombstone.
pub fn decode(_topic: &str, _key: Option<&[u8]>, _value: Option<&[u8]>) -> Result<Decoded, DecodeError> {
    todo!("debezium decoder")
}
