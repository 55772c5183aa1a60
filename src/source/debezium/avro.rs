//! Avro values written by Confluent's `AvroConverter`, rendered as the JsonConverter's payload
//! with every logical value already spelled as the JSON path spells it (decimals as decimal
//! strings, temporal values in ISO 8601 through `crate::source::temporal`, bytes as base64), so
//! that the rest of the decoder (envelope, flattened rows, placeholders, keys) is shared and
//! renders the same row identically whatever the encoding.
//!
//! Why our own reader rather than the `apache-avro` crate: what tells that an Avro `int` is a
//! Debezium `io.debezium.time.Date`, or a `string` an `io.debezium.time.ZonedTimestamp`, is the
//! `connect.name` attribute AvroData writes on the *primitive* type, and `apache-avro`'s schema
//! parser drops custom attributes of primitive types (`{"type":"int",...}` parses to
//! `Schema::Int`). Avro's binary encoding is small (zig-zag varints, length-prefixed bytes,
//! union branch indexes), and reading straight into `serde_json::Value` with the annotations at
//! hand avoids building an intermediate value tree. See docs/design.md.
//!
//! Nothing here panics on input: every read is bounds-checked, lengths are checked against the
//! bytes left before anything is allocated, and nesting is bounded by [`MAX_DEPTH`] (a
//! recursive schema cannot recurse the stack deeper than that).

use std::collections::HashMap;

use base64::Engine;
use serde_json::{Map, Number, Value};

use crate::source::temporal::{self, IsoKind};

use super::decimal;

/// Deepest nesting of records, arrays, maps and unions read (Debezium events nest 3 levels).
const MAX_DEPTH: usize = 64;

/// A parsed Avro schema, ready to read datums written with it.
#[derive(Debug)]
pub struct AvroSchema {
    nodes: Vec<Node>,
    root: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Logical {
    None,
    /// Connect `Decimal` / Avro `decimal`: unscaled two's-complement big-endian bytes.
    Decimal {
        scale: i64,
    },
    Date,
    Time {
        unit_nanos: i64,
    },
    Timestamp {
        unit_nanos: i64,
    },
    ZonedTimestamp,
    ZonedTime,
    Iso(IsoKind),
}

#[derive(Debug)]
enum Node {
    Null,
    Boolean,
    Int(Logical),
    Long(Logical),
    Float,
    Double,
    Bytes(Logical),
    String(Logical),
    Record {
        fields: Vec<(String, usize)>,
        variable_decimal: bool,
    },
    Enum(Vec<String>),
    Array(usize),
    Map(usize),
    Union(Vec<usize>),
    Fixed {
        size: usize,
        logical: Logical,
    },
    /// A reference by name, resolved to the named type's node after parsing.
    Link(usize),
    /// A reference by name not yet resolved (only during parsing).
    Named(String),
}

/// Why a schema or a datum could not be read. Both are permanent for the bytes at hand.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AvroError {
    #[error("the Avro schema is invalid: {0}")]
    Schema(String),
    #[error("the Avro data ends early (truncated at byte {0})")]
    Truncated(usize),
    #[error("the Avro data is invalid at byte {at}: {reason}")]
    Invalid { at: usize, reason: String },
    #[error("the Avro data nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

impl AvroSchema {
    /// Parses a schema as the registry returns it (the `schema` string).
    pub fn parse(text: &str) -> Result<AvroSchema, AvroError> {
        let json: Value = serde_json::from_str(text).map_err(|e| AvroError::Schema(e.to_string()))?;
        let mut parser = Parser { nodes: Vec::new(), names: HashMap::new() };
        let root = parser.parse(&json, "", 0)?;
        let Parser { mut nodes, names } = parser;
        for node in &mut nodes {
            if let Node::Named(name) = node {
                let target = names
                    .get(name.as_str())
                    .copied()
                    .ok_or_else(|| AvroError::Schema(format!("the type `{name}` is referenced but never defined")))?;
                *node = Node::Link(target);
            }
        }
        Ok(AvroSchema { nodes, root })
    }

    /// Reads one datum (the bytes after the Confluent header) into the JsonConverter's shape.
    pub fn read(&self, datum: &[u8]) -> Result<Value, AvroError> {
        let mut reader = Reader { bytes: datum, pos: 0 };
        let value = self.value(self.root, &mut reader, 0)?;
        if reader.pos != datum.len() {
            return Err(AvroError::Invalid {
                at: reader.pos,
                reason: format!("{} bytes left over after the value", datum.len() - reader.pos),
            });
        }
        Ok(value)
    }

    /// [`AvroSchema::read`] written straight out as JSON text, without building the value tree
    /// (what the Kafka source does: the text then goes through the one Debezium decoder).
    pub fn read_json(&self, datum: &[u8]) -> Result<Vec<u8>, AvroError> {
        let mut reader = Reader { bytes: datum, pos: 0 };
        let mut out = Vec::with_capacity(datum.len() * 2 + 16);
        self.write(self.root, &mut reader, 0, &mut out)?;
        if reader.pos != datum.len() {
            return Err(AvroError::Invalid {
                at: reader.pos,
                reason: format!("{} bytes left over after the value", datum.len() - reader.pos),
            });
        }
        Ok(out)
    }

    fn write(&self, index: usize, r: &mut Reader<'_>, depth: usize, out: &mut Vec<u8>) -> Result<(), AvroError> {
        if depth > MAX_DEPTH {
            return Err(AvroError::TooDeep);
        }
        match self.node(index)? {
            Node::Null => out.extend_from_slice(b"null"),
            Node::Boolean => match r.byte()? {
                0 => out.extend_from_slice(b"false"),
                1 => out.extend_from_slice(b"true"),
                b => return Err(r.invalid(format!("a boolean byte is {b}"))),
            },
            Node::Int(Logical::None) | Node::Long(Logical::None) => {
                let n = r.long()?;
                out.extend_from_slice(n.to_string().as_bytes());
            }
            Node::String(Logical::None) => {
                let len = r.length()?;
                let at = r.pos;
                let bytes = r.take(len)?;
                let text = std::str::from_utf8(bytes)
                    .map_err(|e| AvroError::Invalid { at, reason: format!("a string is not UTF-8: {e}") })?;
                json(out, text);
            }
            Node::Record { fields, variable_decimal: false } => {
                out.push(b'{');
                for (i, (name, field)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    json(out, name.as_str());
                    out.push(b':');
                    self.write(*field, r, depth + 1, out)?;
                }
                out.push(b'}');
            }
            Node::Union(branches) => {
                let i = r.long()?;
                let branch = usize::try_from(i).ok().and_then(|i| branches.get(i)).copied();
                match branch {
                    Some(b) => self.write(b, r, depth + 1, out)?,
                    None => return Err(r.invalid(format!("union branch {i} is out of range"))),
                }
            }
            Node::Link(target) => self.write(*target, r, depth + 1, out)?,
            // The rest (logical types, arrays, maps, enums, bytes): through the value reader.
            _ => {
                let value = self.value(index, r, depth)?;
                json(out, &value);
            }
        }
        Ok(())
    }

    fn node(&self, index: usize) -> Result<&Node, AvroError> {
        self.nodes.get(index).ok_or_else(|| AvroError::Schema("dangling type reference".into()))
    }

    fn value(&self, index: usize, r: &mut Reader<'_>, depth: usize) -> Result<Value, AvroError> {
        if depth > MAX_DEPTH {
            return Err(AvroError::TooDeep);
        }
        Ok(match self.node(index)? {
            Node::Null => Value::Null,
            Node::Boolean => match r.byte()? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(r.invalid(format!("a boolean byte is {b}"))),
            },
            Node::Int(logical) | Node::Long(logical) => {
                let n = r.long()?;
                render_integer(n, *logical)
            }
            Node::Float => float(f64::from(f32::from_le_bytes(r.array::<4>()?))),
            Node::Double => float(f64::from_le_bytes(r.array::<8>()?)),
            Node::Bytes(logical) => {
                let len = r.length()?;
                let bytes = r.take(len)?;
                render_bytes(bytes, *logical, r.pos)?
            }
            Node::Fixed { size, logical } => {
                let bytes = r.take(*size)?;
                render_bytes(bytes, *logical, r.pos)?
            }
            Node::String(logical) => {
                let len = r.length()?;
                let at = r.pos;
                let bytes = r.take(len)?;
                let text = std::str::from_utf8(bytes)
                    .map_err(|e| AvroError::Invalid { at, reason: format!("a string is not UTF-8: {e}") })?;
                render_string(text, *logical)
            }
            Node::Record { fields, variable_decimal } => {
                let mut map = Map::new();
                for (name, field) in fields {
                    let value = self.value(*field, r, depth + 1)?;
                    map.insert(name.clone(), value);
                }
                if *variable_decimal {
                    variable_decimal_value(&map, r.pos)?
                } else {
                    Value::Object(map)
                }
            }
            Node::Enum(symbols) => {
                let i = r.long()?;
                let symbol = usize::try_from(i).ok().and_then(|i| symbols.get(i));
                match symbol {
                    Some(s) => Value::String(s.clone()),
                    None => return Err(r.invalid(format!("enum index {i} is out of range"))),
                }
            }
            Node::Array(items) => {
                let mut out = Vec::new();
                loop {
                    let count = r.block_count()?;
                    if count == 0 {
                        break;
                    }
                    for _ in 0..count {
                        out.push(self.value(*items, r, depth + 1)?);
                    }
                }
                Value::Array(out)
            }
            Node::Map(values) => {
                let mut out = Map::new();
                loop {
                    let count = r.block_count()?;
                    if count == 0 {
                        break;
                    }
                    for _ in 0..count {
                        let len = r.length()?;
                        let at = r.pos;
                        let key = std::str::from_utf8(r.take(len)?)
                            .map_err(|e| AvroError::Invalid { at, reason: format!("a map key is not UTF-8: {e}") })?
                            .to_owned();
                        let value = self.value(*values, r, depth + 1)?;
                        out.insert(key, value);
                    }
                }
                Value::Object(out)
            }
            Node::Union(branches) => {
                let i = r.long()?;
                let branch = usize::try_from(i).ok().and_then(|i| branches.get(i)).copied();
                match branch {
                    Some(b) => self.value(b, r, depth + 1)?,
                    None => return Err(r.invalid(format!("union branch {i} is out of range"))),
                }
            }
            Node::Link(target) => self.value(*target, r, depth + 1)?,
            Node::Named(name) => return Err(AvroError::Schema(format!("unresolved type `{name}`"))),
        })
    }
}

/// Appends the JSON text of `value` (writing to a `Vec` cannot fail).
fn json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    let _ = serde_json::to_writer(out, value);
}

fn float(f: f64) -> Value {
    // JSON has no NaN or infinity; the JsonConverter would write them as Jackson does, which
    // no rule can use as a key part anyway.
    Number::from_f64(f).map(Value::Number).unwrap_or_else(|| Value::String(f.to_string()))
}

fn render_integer(n: i64, logical: Logical) -> Value {
    let text = match logical {
        Logical::Date => temporal::date(n),
        Logical::Time { unit_nanos } => temporal::time_of_day(n, unit_nanos),
        Logical::Timestamp { unit_nanos } => temporal::timestamp(n, unit_nanos, false),
        _ => None,
    };
    text.map(Value::String).unwrap_or_else(|| Value::Number(n.into()))
}

fn render_string(text: &str, logical: Logical) -> Value {
    let spelled = match logical {
        Logical::ZonedTimestamp => temporal::zoned_timestamp(text),
        Logical::ZonedTime => temporal::zoned_time(text),
        Logical::Iso(kind) => temporal::iso_local(text, kind),
        _ => None,
    };
    Value::String(spelled.unwrap_or_else(|| text.to_owned()))
}

fn render_bytes(bytes: &[u8], logical: Logical, at: usize) -> Result<Value, AvroError> {
    match logical {
        Logical::Decimal { scale } => decimal::to_plain_string(bytes, scale)
            .map(Value::String)
            .map_err(|e| AvroError::Invalid { at, reason: format!("a decimal is invalid: {e}") }),
        // The JsonConverter writes bytes as base64.
        _ => Ok(Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))),
    }
}

/// Debezium's `VariableScaleDecimal` struct `{scale, value}` as its decimal string.
fn variable_decimal_value(map: &Map<String, Value>, at: usize) -> Result<Value, AvroError> {
    let scale = map.get("scale").and_then(Value::as_i64);
    let value = map.get("value").and_then(Value::as_str);
    match (scale, value) {
        (Some(scale), Some(value)) => decimal::from_base64(value, scale)
            .map(Value::String)
            .map_err(|e| AvroError::Invalid { at, reason: format!("a variable-scale decimal is invalid: {e}") }),
        _ => Err(AvroError::Invalid { at, reason: "a VariableScaleDecimal lacks `scale` or `value`".into() }),
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn invalid(&self, reason: String) -> AvroError {
        AvroError::Invalid { at: self.pos, reason }
    }

    fn byte(&mut self) -> Result<u8, AvroError> {
        let b = *self.bytes.get(self.pos).ok_or(AvroError::Truncated(self.pos))?;
        self.pos += 1;
        Ok(b)
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], AvroError> {
        let end =
            self.pos.checked_add(len).filter(|end| *end <= self.bytes.len()).ok_or(AvroError::Truncated(self.pos))?;
        let out = self.bytes.get(self.pos..end).ok_or(AvroError::Truncated(self.pos))?;
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], AvroError> {
        let at = self.pos;
        self.take(N)?.try_into().map_err(|_| AvroError::Truncated(at))
    }

    /// A zig-zag varint (Avro `int` and `long`).
    fn long(&mut self) -> Result<i64, AvroError> {
        let mut n: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            n |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok((n >> 1) as i64 ^ -((n & 1) as i64));
            }
        }
        Err(self.invalid("a varint is longer than 10 bytes".into()))
    }

    /// A length, checked against what is left so nothing large is allocated on a lie.
    fn length(&mut self) -> Result<usize, AvroError> {
        let n = self.long()?;
        let len = usize::try_from(n).map_err(|_| self.invalid(format!("a length is negative ({n})")))?;
        if len > self.bytes.len() - self.pos {
            return Err(AvroError::Truncated(self.pos));
        }
        Ok(len)
    }

    /// An array or map block's item count; a negative count is followed by the block's size.
    fn block_count(&mut self) -> Result<u64, AvroError> {
        let n = self.long()?;
        if n < 0 {
            self.long()?;
        }
        let count = n.unsigned_abs();
        // Every item takes at least... zero bytes (null items), so bound the count by what is
        // left plus a margin to stop a lying count from spinning: each item must make progress
        // or be null, and a million nulls is not a Debezium event.
        if count > (self.bytes.len() - self.pos) as u64 + 1_000_000 {
            return Err(self.invalid(format!("a block claims {count} items")));
        }
        Ok(count)
    }
}

struct Parser {
    nodes: Vec<Node>,
    /// Full names of named types (records, enums, fixed) to their nodes.
    names: HashMap<String, usize>,
}

impl Parser {
    fn push(&mut self, node: Node) -> usize {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    fn parse(&mut self, json: &Value, namespace: &str, depth: usize) -> Result<usize, AvroError> {
        if depth > MAX_DEPTH {
            return Err(AvroError::Schema(format!("the schema nests deeper than {MAX_DEPTH} levels")));
        }
        match json {
            Value::String(name) => Ok(match primitive(name, Logical::None) {
                Some(node) => self.push(node),
                None => {
                    let full = full_name(name, namespace);
                    let node = match self.names.get(&full).or_else(|| self.names.get(name.as_str())) {
                        Some(i) => Node::Link(*i),
                        None => Node::Named(full),
                    };
                    self.push(node)
                }
            }),
            Value::Array(branches) => {
                let mut indexes = Vec::with_capacity(branches.len());
                for branch in branches {
                    indexes.push(self.parse(branch, namespace, depth + 1)?);
                }
                Ok(self.push(Node::Union(indexes)))
            }
            Value::Object(object) => self.parse_object(object, namespace, depth),
            other => Err(AvroError::Schema(format!("a type is {other}, expected a string, array or object"))),
        }
    }

    fn parse_object(&mut self, object: &Map<String, Value>, namespace: &str, depth: usize) -> Result<usize, AvroError> {
        let kind = object.get("type").ok_or_else(|| AvroError::Schema("a type object has no `type`".into()))?;
        let Value::String(kind) = kind else {
            // `{"type": {...}}` or `{"type": [...]}`: the inner type, attributes aside.
            return self.parse(kind, namespace, depth + 1);
        };
        let logical = logical(object);
        if let Some(node) = primitive(kind, logical) {
            return Ok(self.push(node));
        }
        let name_of = |object: &Map<String, Value>| -> Result<(String, String), AvroError> {
            let name = object
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| AvroError::Schema(format!("a {kind} has no `name`")))?;
            let ns = object.get("namespace").and_then(Value::as_str).unwrap_or(namespace);
            let full = full_name(name, ns);
            let own_ns = full.rsplit_once('.').map(|(ns, _)| ns.to_owned()).unwrap_or_default();
            Ok((full, own_ns))
        };
        match kind.as_str() {
            "record" | "error" => {
                let (full, own_ns) = name_of(object)?;
                // Registered before the fields so a recursive reference resolves.
                let index = self.push(Node::Null);
                self.names.insert(full, index);
                let fields = object
                    .get("fields")
                    .and_then(Value::as_array)
                    .ok_or_else(|| AvroError::Schema("a record has no `fields` array".into()))?;
                let mut parsed = Vec::with_capacity(fields.len());
                for field in fields {
                    let name = field
                        .get("name")
                        .and_then(Value::as_str)
                        .ok_or_else(|| AvroError::Schema("a record field has no `name`".into()))?;
                    let ty = field
                        .get("type")
                        .ok_or_else(|| AvroError::Schema(format!("record field `{name}` has no `type`")))?;
                    parsed.push((name.to_owned(), self.parse(ty, &own_ns, depth + 1)?));
                }
                let variable_decimal =
                    object.get("connect.name").and_then(Value::as_str) == Some(VARIABLE_SCALE_DECIMAL);
                if let Some(slot) = self.nodes.get_mut(index) {
                    *slot = Node::Record { fields: parsed, variable_decimal };
                }
                Ok(index)
            }
            "enum" => {
                let (full, _) = name_of(object)?;
                let symbols = object
                    .get("symbols")
                    .and_then(Value::as_array)
                    .ok_or_else(|| AvroError::Schema("an enum has no `symbols` array".into()))?
                    .iter()
                    .map(|s| {
                        s.as_str()
                            .map(str::to_owned)
                            .ok_or_else(|| AvroError::Schema("an enum symbol is not a string".into()))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let index = self.push(Node::Enum(symbols));
                self.names.insert(full, index);
                Ok(index)
            }
            "fixed" => {
                let (full, _) = name_of(object)?;
                let size = object
                    .get("size")
                    .and_then(Value::as_u64)
                    .and_then(|s| usize::try_from(s).ok())
                    .ok_or_else(|| AvroError::Schema("a fixed has no valid `size`".into()))?;
                let index = self.push(Node::Fixed { size, logical });
                self.names.insert(full, index);
                Ok(index)
            }
            "array" => {
                let items = object.get("items").ok_or_else(|| AvroError::Schema("an array has no `items`".into()))?;
                let items = self.parse(items, namespace, depth + 1)?;
                Ok(self.push(Node::Array(items)))
            }
            "map" => {
                let values = object.get("values").ok_or_else(|| AvroError::Schema("a map has no `values`".into()))?;
                let values = self.parse(values, namespace, depth + 1)?;
                Ok(self.push(Node::Map(values)))
            }
            // A named reference written as `{"type": "Name"}`.
            _ => self.parse(&Value::String(kind.clone()), namespace, depth + 1),
        }
    }
}

const VARIABLE_SCALE_DECIMAL: &str = "io.debezium.data.VariableScaleDecimal";
const NANOS_PER_MS: i64 = 1_000_000;
const NANOS_PER_US: i64 = 1_000;

fn primitive(kind: &str, logical: Logical) -> Option<Node> {
    Some(match kind {
        "null" => Node::Null,
        "boolean" => Node::Boolean,
        "int" => Node::Int(logical),
        "long" => Node::Long(logical),
        "float" => Node::Float,
        "double" => Node::Double,
        "bytes" => Node::Bytes(logical),
        "string" => Node::String(logical),
        _ => return None,
    })
}

fn full_name(name: &str, namespace: &str) -> String {
    if name.contains('.') || namespace.is_empty() {
        name.to_owned()
    } else {
        format!("{namespace}.{name}")
    }
}

/// What a type's attributes say it holds. Kafka Connect's AvroData writes the Connect schema
/// name as `connect.name` (and, for Connect's own logical types, the Avro `logicalType` too);
/// producers other than Connect write only `logicalType`. The names are those the JSON path
/// knows (`schema.rs`), so both paths render a column the same way.
fn logical(object: &Map<String, Value>) -> Logical {
    let connect = object.get("connect.name").and_then(Value::as_str);
    let by_connect = connect.and_then(|name| {
        Some(match name {
            "org.apache.kafka.connect.data.Decimal" => Logical::Decimal { scale: scale(object)? },
            "io.debezium.time.Date" | "org.apache.kafka.connect.data.Date" => Logical::Date,
            "io.debezium.time.Time" | "org.apache.kafka.connect.data.Time" => {
                Logical::Time { unit_nanos: NANOS_PER_MS }
            }
            "io.debezium.time.MicroTime" => Logical::Time { unit_nanos: NANOS_PER_US },
            "io.debezium.time.NanoTime" => Logical::Time { unit_nanos: 1 },
            "io.debezium.time.Timestamp" | "org.apache.kafka.connect.data.Timestamp" => {
                Logical::Timestamp { unit_nanos: NANOS_PER_MS }
            }
            "io.debezium.time.MicroTimestamp" => Logical::Timestamp { unit_nanos: NANOS_PER_US },
            "io.debezium.time.NanoTimestamp" => Logical::Timestamp { unit_nanos: 1 },
            "io.debezium.time.ZonedTimestamp" => Logical::ZonedTimestamp,
            "io.debezium.time.ZonedTime" => Logical::ZonedTime,
            "io.debezium.time.IsoDate" => Logical::Iso(IsoKind::Date),
            "io.debezium.time.IsoTime" => Logical::Iso(IsoKind::Time),
            "io.debezium.time.IsoTimestamp" => Logical::Iso(IsoKind::Timestamp),
            _ => return None,
        })
    });
    if let Some(logical) = by_connect {
        return logical;
    }
    match object.get("logicalType").and_then(Value::as_str) {
        Some("decimal") => scale(object).map(|scale| Logical::Decimal { scale }).unwrap_or(Logical::None),
        Some("date") => Logical::Date,
        Some("time-millis") => Logical::Time { unit_nanos: NANOS_PER_MS },
        Some("time-micros") => Logical::Time { unit_nanos: NANOS_PER_US },
        Some("timestamp-millis" | "local-timestamp-millis") => Logical::Timestamp { unit_nanos: NANOS_PER_MS },
        Some("timestamp-micros" | "local-timestamp-micros") => Logical::Timestamp { unit_nanos: NANOS_PER_US },
        Some("timestamp-nanos" | "local-timestamp-nanos") => Logical::Timestamp { unit_nanos: 1 },
        _ => Logical::None,
    }
}

/// A decimal's scale: Avro's `scale` (absent means 0), or Connect's `connect.parameters.scale`.
fn scale(object: &Map<String, Value>) -> Option<i64> {
    if let Some(scale) = object.get("scale") {
        return scale.as_i64();
    }
    match object.get("connect.parameters").and_then(|p| p.get("scale")) {
        Some(Value::String(s)) => s.trim().parse().ok(),
        Some(Value::Number(n)) => n.as_i64(),
        Some(_) => None,
        None => Some(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zigzag(n: i64) -> Vec<u8> {
        let mut z = ((n << 1) ^ (n >> 63)) as u64;
        let mut out = Vec::new();
        loop {
            let b = (z & 0x7f) as u8;
            z >>= 7;
            if z == 0 {
                out.push(b);
                return out;
            }
            out.push(b | 0x80);
        }
    }

    #[test]
    fn truncated_and_lying_lengths_are_errors_not_panics() {
        let schema = AvroSchema::parse(r#"{"type":"record","name":"R","fields":[{"name":"s","type":"string"}]}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut bytes = zigzag(1_000_000);
        bytes.push(b'a');
        assert!(matches!(schema.read(&bytes), Err(AvroError::Truncated(_))));
        assert!(matches!(schema.read(&[]), Err(AvroError::Truncated(_))));
        assert!(matches!(schema.read(&[0xff; 12]), Err(AvroError::Invalid { .. })));
    }

    #[test]
    fn recursive_schema_is_bounded() {
        let schema =
            AvroSchema::parse(r#"{"type":"record","name":"N","fields":[{"name":"next","type":["null","N"]}]}"#)
                .unwrap_or_else(|e| panic!("{e}"));
        let bytes = vec![2u8; 500];
        assert!(schema.read(&bytes).is_err());
        assert_eq!(schema.read(&[2, 2, 0]), Ok(serde_json::json!({"next": {"next": {"next": null}}})));
    }
}
