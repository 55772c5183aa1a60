//! Protobuf values written by Confluent's `ProtobufConverter`, rendered as the JsonConverter's
//! payload with every logical value already spelled as the JSON path spells it, so that the
//! rest of the decoder (envelope, flattened rows, placeholders, keys) is shared, as for Avro
//! (`avro.rs`).
//!
//! The schema comes from the registry as `.proto` text (plus the files it imports, which the
//! registry names as references) and is compiled at run time with `protox` into a
//! `prost-reflect` descriptor pool; the message is decoded dynamically against it. Why these
//! crates, and what they cost, is in docs/design.md ("Dependencies").
//!
//! How Kafka Connect's values come out of the converter (confluentinc/schema-registry,
//! protobuf-converter/src/main/java/io/confluent/connect/protobuf/ProtobufData.java,
//! `fromConnectSchema`/`toConnectData`):
//! - a struct is a message (nested messages for nested structs), an array a `repeated` field,
//!   a map a `repeated` map-entry message;
//! - Connect `Decimal` is a `confluent.type.Decimal` message (unscaled big-endian
//!   two's-complement `value`, its `scale`); `Date` is `google.type.Date`, `Time`
//!   `google.type.TimeOfDay`, `Timestamp` `google.protobuf.Timestamp`: rendered here as the
//!   JSON path renders those Connect types;
//! - with `wrapper.for.nullables`, optional primitives are `google.protobuf.*Value` wrappers,
//!   read through to their value;
//! - the converter keeps no Connect name on primitive types, so Debezium's own temporal types
//!   (`io.debezium.time.MicroTimestamp`: an `int64`) arrive as the numbers the connector wrote;
//!   with `time.precision.mode=connect` they are the Connect types above (README, "Protobuf");
//! - Debezium's `VariableScaleDecimal` struct keeps its name as the message's, and becomes the
//!   decimal string as on the other paths;
//! - a field without presence that is absent reads as its default (`0`, `""`), as the
//!   converter itself reads it; with `optional.for.nullables=true` optional columns are proto3
//!   `optional` fields and an absent one is `null`, exactly as in JSON.
//!
//! The Confluent framing of a Protobuf value has, after the schema id, the path to the message
//! type in the schema: a count and that many indexes, zig-zag varints, with a single `0` byte
//! for the common case of the file's first message (the wire format in Confluent's docs;
//! `ProtobufSerializer._encode_varints` in confluent-kafka-python).
//!
//! Nothing here panics on input: the index path and its varints are bounds-checked, the
//! message decoder (`prost`) returns errors for bad bytes, and nesting is bounded by
//! [`MAX_DEPTH`].

use std::collections::HashMap;

use base64::Engine;
use prost_reflect::{
    DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MapKey, MessageDescriptor, ReflectMessage, Value,
};
use protox::file::{ChainFileResolver, File, FileResolver, GoogleFileResolver};
use serde_json::{Map, Number, Value as Json};

use crate::source::temporal;

use super::decimal;

/// Deepest nesting of messages rendered (Debezium events nest 3 levels).
const MAX_DEPTH: usize = 64;
/// Longest message-index path accepted (a message nested this deep is not a Debezium event).
const MAX_INDEXES: u64 = 32;
/// The name the registry's schema text is compiled under (imports use their own names).
const MAIN_FILE: &str = "cdc-invalidator/registry-schema.proto";

const NANOS_PER_MS: i64 = 1_000_000;

/// A compiled Protobuf schema, ready to read messages written with it.
#[derive(Debug)]
pub struct ProtobufSchema {
    /// The top-level messages of the registered file, in declaration order: what the
    /// message-index path starts from.
    messages: Vec<MessageDescriptor>,
}

/// Why a schema or a message could not be read. Both are permanent for the bytes at hand.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProtobufError {
    #[error("the Protobuf schema does not compile: {0}")]
    Schema(String),
    #[error("the message-index path is invalid: {0}")]
    Index(String),
    #[error("the Protobuf message does not decode as {message}: {reason}")]
    Decode { message: String, reason: String },
    #[error("the Protobuf message nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

impl ProtobufSchema {
    /// Compiles the registry's schema text with the files it imports (`(import path, text)`,
    /// from the registry's references). Google's well-known types and the files every
    /// Confluent registry knows without references (`confluent/meta.proto`,
    /// `confluent/type/decimal.proto`, `google/type/date.proto`, `google/type/timeofday.proto`)
    /// are built in.
    pub fn compile(text: &str, imports: Vec<(String, String)>) -> Result<ProtobufSchema, ProtobufError> {
        let mut files: HashMap<String, String> = imports.into_iter().collect();
        files.insert(MAIN_FILE.to_owned(), text.to_owned());
        for (name, text) in KNOWN_FILES {
            files.entry((*name).to_owned()).or_insert_with(|| (*text).to_owned());
        }
        let mut resolver = ChainFileResolver::new();
        resolver.add(Sources(files));
        resolver.add(GoogleFileResolver::new());
        let mut compiler = protox::Compiler::with_file_resolver(resolver);
        compiler.include_imports(true);
        compiler.open_file(MAIN_FILE).map_err(|e| ProtobufError::Schema(e.to_string()))?;
        let pool: DescriptorPool = compiler.descriptor_pool();
        let file = pool
            .get_file_by_name(MAIN_FILE)
            .ok_or_else(|| ProtobufError::Schema("the compiled schema is missing".into()))?;
        let messages: Vec<MessageDescriptor> = file.messages().collect();
        if messages.is_empty() {
            return Err(ProtobufError::Schema("the schema defines no message".into()));
        }
        Ok(ProtobufSchema { messages })
    }

    /// Reads one framed value (the bytes after the magic byte and schema id: the message-index
    /// path, then the message) into the JsonConverter's payload shape, as JSON text.
    pub fn read_json(&self, payload: &[u8]) -> Result<Vec<u8>, ProtobufError> {
        let value = self.read(payload)?;
        serde_json::to_vec(&value).map_err(|e| ProtobufError::Decode { message: "?".into(), reason: e.to_string() })
    }

    /// [`ProtobufSchema::read_json`] as a value tree.
    pub fn read(&self, payload: &[u8]) -> Result<Json, ProtobufError> {
        let (descriptor, body) = self.message_type(payload)?;
        let message = DynamicMessage::decode(descriptor.clone(), body)
            .map_err(|e| ProtobufError::Decode { message: descriptor.full_name().to_owned(), reason: e.to_string() })?;
        render_message(&message, 0)
    }

    /// The message type the index path names, and the bytes after the path.
    fn message_type<'a>(&self, payload: &'a [u8]) -> Result<(MessageDescriptor, &'a [u8]), ProtobufError> {
        let mut at = 0;
        let count = zigzag(payload, &mut at)?;
        let path: Vec<i64> = if count == 0 {
            // The single 0 byte: the file's first message.
            vec![0]
        } else {
            if count < 0 || count as u64 > MAX_INDEXES {
                return Err(ProtobufError::Index(format!("it claims {count} indexes")));
            }
            (0..count).map(|_| zigzag(payload, &mut at)).collect::<Result<_, _>>()?
        };
        let mut indexes = path.iter();
        let first = indexes.next().copied().unwrap_or(0);
        let mut descriptor = usize::try_from(first)
            .ok()
            .and_then(|i| self.messages.get(i))
            .cloned()
            .ok_or_else(|| unknown_index(&path, self.messages.len()))?;
        for &index in indexes {
            let children: Vec<MessageDescriptor> = descriptor.child_messages().collect();
            descriptor = usize::try_from(index)
                .ok()
                .and_then(|i| children.get(i))
                .cloned()
                .ok_or_else(|| unknown_index(&path, children.len()))?;
        }
        let body = payload.get(at..).unwrap_or_default();
        Ok((descriptor, body))
    }
}

fn unknown_index(path: &[i64], available: usize) -> ProtobufError {
    ProtobufError::Index(format!("{path:?} names no message type in the schema ({available} at that level)"))
}

/// A zig-zag varint of the index path.
fn zigzag(bytes: &[u8], at: &mut usize) -> Result<i64, ProtobufError> {
    let mut n: u64 = 0;
    for shift in (0..64).step_by(7) {
        let b = *bytes.get(*at).ok_or_else(|| ProtobufError::Index(format!("it ends early (byte {at})")))?;
        *at += 1;
        n |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok((n >> 1) as i64 ^ -((n & 1) as i64));
        }
    }
    Err(ProtobufError::Index("a varint is longer than 10 bytes".into()))
}

/// The registry's files by import path.
struct Sources(HashMap<String, String>);

impl FileResolver for Sources {
    fn open_file(&self, name: &str) -> Result<File, protox::Error> {
        match self.0.get(name) {
            Some(text) => File::from_source(name, text),
            None => Err(protox::Error::file_not_found(name)),
        }
    }
}

fn render_message(message: &DynamicMessage, depth: usize) -> Result<Json, ProtobufError> {
    if depth > MAX_DEPTH {
        return Err(ProtobufError::TooDeep);
    }
    let descriptor = message.descriptor();
    if let Some(value) = logical(message, &descriptor)? {
        return Ok(value);
    }
    let mut out = Map::new();
    // A oneof that is not proto3's synthetic one for `optional` is a Connect union, a struct
    // named `{oneof}_{index}` holding the one field set (ProtobufData.toConnectData).
    for (index, oneof) in descriptor.oneofs().enumerate() {
        if oneof.is_synthetic() {
            continue;
        }
        let mut union = Map::new();
        for field in oneof.fields() {
            if message.has_field(&field) {
                union.insert(field.name().to_owned(), render_value(&message.get_field(&field), &field, depth)?);
            }
        }
        let value = if union.is_empty() { Json::Null } else { Json::Object(union) };
        out.insert(format!("{}_{index}", oneof.name()), value);
    }
    for field in descriptor.fields() {
        if field.containing_oneof().is_some_and(|o| !o.is_synthetic()) {
            continue;
        }
        let absent = !message.has_field(&field);
        let value = if absent && (field.supports_presence() && !field.is_list() && !field.is_map()) {
            // A message field, or a proto3 `optional` one, that is not set: null.
            Json::Null
        } else {
            render_value(&message.get_field(&field), &field, depth)?
        };
        out.insert(field.name().to_owned(), value);
    }
    Ok(Json::Object(out))
}

/// The types the converter writes for Connect's logical types and Debezium's variable-scale
/// decimal, spelled as the JSON path spells them.
fn logical(message: &DynamicMessage, descriptor: &MessageDescriptor) -> Result<Option<Json>, ProtobufError> {
    let int = |name: &str| match message.get_field_by_name(name).as_deref() {
        Some(Value::I32(n)) => i64::from(*n),
        Some(Value::I64(n)) => *n,
        Some(Value::U32(n)) => i64::from(*n),
        _ => 0,
    };
    let bytes = |name: &str| match message.get_field_by_name(name).as_deref() {
        Some(Value::Bytes(b)) => b.to_vec(),
        _ => Vec::new(),
    };
    let invalid = |what: &str, detail: String| ProtobufError::Decode {
        message: descriptor.full_name().to_owned(),
        reason: format!("{what}: {detail}"),
    };
    let spelled =
        |text: Option<String>, what: &str| text.map(Json::String).ok_or_else(|| invalid(what, "out of range".into()));
    Ok(Some(match descriptor.full_name() {
        "confluent.type.Decimal" => {
            decimal_value(&bytes("value"), int("scale")).map_err(|e| invalid("a decimal", e))?
        }
        "google.type.Date" => spelled(temporal::civil_date(int("year"), int("month"), int("day")), "a date")?,
        "google.type.TimeOfDay" => {
            let nanos = ((int("hours") * 60 + int("minutes")) * 60 + int("seconds")) * 1_000_000_000 + int("nanos");
            spelled(time(nanos), "a time of day")?
        }
        "google.protobuf.Timestamp" => {
            let nanos = i128::from(int("seconds")) * 1_000_000_000 + i128::from(int("nanos"));
            spelled(timestamp(nanos), "a timestamp")?
        }
        "google.protobuf.DoubleValue"
        | "google.protobuf.FloatValue"
        | "google.protobuf.Int64Value"
        | "google.protobuf.UInt64Value"
        | "google.protobuf.Int32Value"
        | "google.protobuf.UInt32Value"
        | "google.protobuf.BoolValue"
        | "google.protobuf.StringValue"
        | "google.protobuf.BytesValue" => match descriptor.get_field_by_name("value") {
            Some(field) => render_value(&message.get_field(&field), &field, 0)?,
            None => Json::Null,
        },
        _ if descriptor.name() == "VariableScaleDecimal"
            && descriptor.get_field_by_name("scale").is_some()
            && descriptor.get_field_by_name("value").is_some() =>
        {
            decimal_value(&bytes("value"), int("scale")).map_err(|e| invalid("a variable-scale decimal", e))?
        }
        _ => return Ok(None),
    }))
}

/// An unscaled value with its scale as a decimal string; empty bytes (proto3's default) are 0.
fn decimal_value(unscaled: &[u8], scale: i64) -> Result<Json, String> {
    let unscaled = if unscaled.is_empty() { &[0u8][..] } else { unscaled };
    decimal::to_plain_string(unscaled, scale).map(Json::String).map_err(|e| e.to_string())
}

/// A Connect `Time` (milliseconds) comes out as the JSON path spells it; finer values keep
/// their nanoseconds.
fn time(nanos: i64) -> Option<String> {
    match nanos % NANOS_PER_MS {
        0 => temporal::time_of_day(nanos / NANOS_PER_MS, NANOS_PER_MS),
        _ => temporal::time_of_day(nanos, 1),
    }
}

fn timestamp(nanos: i128) -> Option<String> {
    let nanos = i64::try_from(nanos).ok()?;
    match nanos % NANOS_PER_MS {
        0 => temporal::timestamp(nanos / NANOS_PER_MS, NANOS_PER_MS, false),
        _ => temporal::timestamp(nanos, 1, false),
    }
}

fn render_value(value: &Value, field: &FieldDescriptor, depth: usize) -> Result<Json, ProtobufError> {
    Ok(match value {
        Value::Bool(b) => Json::Bool(*b),
        Value::I32(n) => Json::from(*n),
        Value::I64(n) => Json::from(*n),
        Value::U32(n) => Json::from(*n),
        Value::U64(n) => Json::from(*n),
        Value::F32(f) => float(f64::from(*f)),
        Value::F64(f) => float(*f),
        Value::String(s) => Json::String(s.clone()),
        // The JsonConverter writes bytes as base64.
        Value::Bytes(b) => Json::String(base64::engine::general_purpose::STANDARD.encode(b)),
        // An enum is a string column (ProtobufData maps a Connect string with enum parameters
        // to a Protobuf enum): its symbol, or the number for a value the schema does not name.
        Value::EnumNumber(n) => match field.kind() {
            Kind::Enum(e) => e.get_value(*n).map(|v| Json::String(v.name().to_owned())).unwrap_or(Json::from(*n)),
            _ => Json::from(*n),
        },
        Value::Message(m) => render_message(m, depth + 1)?,
        Value::List(items) => {
            Json::Array(items.iter().map(|v| render_value(v, field, depth + 1)).collect::<Result<_, _>>()?)
        }
        Value::Map(entries) => {
            let value_field = match field.kind() {
                Kind::Message(entry) => entry.map_entry_value_field(),
                _ => field.clone(),
            };
            // The JsonConverter writes a map with string keys as an object, any other map as
            // an array of [key, value] pairs.
            let mut sorted: Vec<(&MapKey, &Value)> = entries.iter().collect();
            sorted.sort_by(|a, b| a.0.cmp(b.0));
            if sorted.iter().all(|(k, _)| matches!(k, MapKey::String(_))) {
                let mut out = Map::new();
                for (key, value) in sorted {
                    if let MapKey::String(key) = key {
                        out.insert(key.clone(), render_value(value, &value_field, depth + 1)?);
                    }
                }
                Json::Object(out)
            } else {
                let mut out = Vec::with_capacity(sorted.len());
                for (key, value) in sorted {
                    out.push(Json::Array(vec![map_key(key), render_value(value, &value_field, depth + 1)?]));
                }
                Json::Array(out)
            }
        }
    })
}

fn map_key(key: &MapKey) -> Json {
    match key {
        MapKey::Bool(b) => Json::Bool(*b),
        MapKey::I32(n) => Json::from(*n),
        MapKey::I64(n) => Json::from(*n),
        MapKey::U32(n) => Json::from(*n),
        MapKey::U64(n) => Json::from(*n),
        MapKey::String(s) => Json::String(s.clone()),
    }
}

fn float(f: f64) -> Json {
    // JSON has no NaN or infinity (as on the Avro path).
    Number::from_f64(f).map(Json::Number).unwrap_or_else(|| Json::String(f.to_string()))
}

/// The files a Confluent registry resolves without references (`ProtobufSchema.KNOWN_DEPENDENCIES`
/// in confluentinc/schema-registry): the ones the converter imports besides Google's
/// well-known types (which `protox` carries). The texts (in `known-protos/`, shared with
/// scripts/gen-protobuf-fixtures.py) are those files' definitions (confluentinc/schema-registry
/// protobuf-types/src/main/proto/confluent/; googleapis google/type/), comments and language
/// options left out.
const KNOWN_FILES: &[(&str, &str)] = &[
    ("confluent/meta.proto", include_str!("known-protos/confluent/meta.proto")),
    ("confluent/type/decimal.proto", include_str!("known-protos/confluent/type/decimal.proto")),
    ("google/type/date.proto", include_str!("known-protos/google/type/date.proto")),
    ("google/type/timeofday.proto", include_str!("known-protos/google/type/timeofday.proto")),
];

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &str = r#"syntax = "proto3";
package shop.public.products;
import "confluent/type/decimal.proto";
message Value {
  int32 id = 1;
  confluent.type.Decimal price = 2;
  optional string note = 3;
  string name = 4;
  message Inner { int32 x = 1; }
}
message Other { int32 y = 1; }
"#;

    fn schema() -> ProtobufSchema {
        ProtobufSchema::compile(SCHEMA, Vec::new()).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_index_path_picks_the_message_type() {
        let schema = schema();
        // id = 42 (field 1, varint), price = {value: [0x03, 0xe8], scale: 2}.
        let value = [0x08, 42, 0x12, 0x06, 0x0a, 0x02, 0x03, 0xe8, 0x18, 0x02];
        let mut first = vec![0u8];
        first.extend_from_slice(&value);
        assert_eq!(
            schema.read(&first),
            Ok(serde_json::json!({"id": 42, "price": "10.00", "note": null, "name": ""})),
            "absent without presence: the default; absent `optional`: null"
        );
        // [1]: count 1 (zig-zag 2), index 1 (zig-zag 2): `Other`.
        assert_eq!(schema.read(&[2, 2, 0x08, 7]), Ok(serde_json::json!({"y": 7})));
        // [0, 0]: `Value.Inner`.
        assert_eq!(schema.read(&[4, 0, 0, 0x08, 1]), Ok(serde_json::json!({"x": 1})));
    }

    #[test]
    fn bad_index_paths_and_bytes_are_errors_not_panics() {
        let schema = schema();
        for payload in [&[][..], &[2, 4][..], &[2, 6][..], &[0xff; 12][..], &[1][..], &[0x7e][..], &[4, 0][..]] {
            assert!(matches!(schema.read(payload), Err(ProtobufError::Index(_))), "{payload:?}");
        }
        // Field 1 as a length-delimited field running past the end.
        assert!(matches!(schema.read(&[0, 0x0a, 0x7f]), Err(ProtobufError::Decode { .. })));
    }

    #[test]
    fn a_schema_that_does_not_compile_is_an_error() {
        for text in
            ["syntax = \"proto3\"; message {", "syntax = \"proto3\"; import \"missing.proto\"; message A {}", ""]
        {
            assert!(matches!(ProtobufSchema::compile(text, Vec::new()), Err(ProtobufError::Schema(_))), "{text}");
        }
    }
}
