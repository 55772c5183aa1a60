//! Messages in the Confluent wire format (Avro, Protobuf or JSON Schema through a schema
//! registry): a zero byte, the schema id as a 4-byte big-endian integer, then the encoded
//! value. JSON never starts with a zero byte, so such a message is recognised for certain and
//! named, rather than reported as "not valid JSON" (the contract, "Other encodings on Kafka").

use super::DecodeError;

/// An error naming the encoding and schema id if `value` is Confluent-framed.
pub(super) fn reject_framed(value: &[u8]) -> Result<(), DecodeError> {
    match value {
        [0, a, b, c, d, ..] => Err(DecodeError::ConfluentFramed { schema_id: u32::from_be_bytes([*a, *b, *c, *d]) }),
        _ => Ok(()),
    }
}
