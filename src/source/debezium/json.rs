//! Reading JSON one level at a time.
//!
//! A Debezium message is partly ballast for us: a schema of several kilobytes, a source block
//! of which we need three fields. So objects are read one level deep into [`Fields`], the
//! ballast kept as unparsed text borrowed from the message ([`Slot::Raw`]) and parsed further
//! only when needed, everything else parsed in the same pass.
//!
//! Skipping a value is iterative in serde_json, so a deeply nested value we never read costs
//! memory proportional to the message, never stack. Every value we do parse (row images,
//! columns, the schema) is parsed within serde_json's recursion limit (128 levels), so deeper
//! nesting there is an error, not a stack overflow.

use std::borrow::Cow;
use std::fmt;

use serde::de::value::SeqAccessDeserializer;
use serde::de::{self, Deserialize, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::event::Row;

/// How [`Fields`] reads values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Depth {
    /// Values parsed, except `schema` and `source`, kept as raw text, and a `payload` object,
    /// read one level deep itself. Everything else is a row image, a column of a flattened row
    /// or small metadata, all of which we need parsed anyway, so one pass does it.
    Event,
    /// As `Event`, but `source` is read as the envelope's source block ([`SourceFields`]) in
    /// the same pass, which must then be an object (anything else fails the parse). Keeping it
    /// raw meant scanning it twice, a fifth of the cost of decoding a standard envelope (issue
    /// 12, docs/benchmarks.md). The caller reads again with `Event` when this fails or when it
    /// needs `source` as a value after all (a flattened row with a `source` column).
    Envelope,
}

/// A field's value: parsed, its raw text, (for `payload`) an object read one level deep, or
/// (for `source` with [`Depth::Envelope`]) the fields of the source block that we read.
#[derive(Debug)]
pub(super) enum Slot<'a> {
    Raw(&'a RawValue),
    Parsed(Value),
    Object(Fields<'a>),
    /// Boxed: the block's fields are many times the size of the other variants, and slots are
    /// moved about (the one-pass reader's images travel as slots).
    Source(Box<SourceFields<'a>>),
    /// A row image (an object of plain values) as the one-pass reader builds it.
    Image(Row),
}

impl Slot<'_> {
    pub(super) fn kind(&self) -> Kind {
        match self {
            Slot::Raw(raw) => Kind::of(raw),
            Slot::Parsed(value) => kind_of(value),
            Slot::Object(_) | Slot::Source(_) | Slot::Image(_) => Kind::Object,
        }
    }

    /// The string it holds, or `None` for any other type.
    pub(super) fn as_str(&self) -> Option<Cow<'_, str>> {
        match self {
            Slot::Raw(raw) => string(raw),
            Slot::Parsed(value) => value.as_str().map(Cow::Borrowed),
            Slot::Object(_) | Slot::Source(_) | Slot::Image(_) => None,
        }
    }

    /// The integer it holds, or `None` for any other type (or one out of `i64` range).
    pub(super) fn as_i64(&self) -> Option<i64> {
        match self {
            Slot::Raw(raw) => raw.get().parse().ok(),
            Slot::Parsed(value) => value.as_i64(),
            Slot::Object(_) | Slot::Source(_) | Slot::Image(_) => None,
        }
    }

    /// The parsed value (parsing raw text now, within serde_json's recursion limit).
    pub(super) fn into_value(self) -> Result<Value, serde_json::Error> {
        match self {
            Slot::Raw(raw) => serde_json::from_str(raw.get()),
            Slot::Parsed(value) => Ok(value),
            Slot::Object(fields) => fields
                .into_entries()
                .map(|(name, slot)| Ok((name.into_owned(), slot.into_value()?)))
                .collect::<Result<Map<String, Value>, _>>()
                .map(Value::Object),
            Slot::Image(row) => Ok(row.into_value()),
            // Only what we read of it was kept: the decoder reads such a message again with
            // `Depth::Event` before it needs values (`Fields::holds_source_block`).
            Slot::Source(_) => Err(de::Error::custom("the source block was not kept as a value")),
        }
    }
}

/// A JSON object read one level deep: each field's name and value.
#[derive(Debug)]
pub(super) struct Fields<'a>(Vec<(Cow<'a, str>, Slot<'a>)>);

impl<'a> Fields<'a> {
    /// Reads `text`, which must hold one JSON object and nothing else.
    pub(super) fn parse(text: &'a str, depth: Depth) -> Result<Fields<'a>, serde_json::Error> {
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let fields = FieldsSeed(depth).deserialize(&mut deserializer)?;
        deserializer.end()?;
        Ok(fields)
    }

    /// The value of field `name`. With duplicate names the last one wins, as in serde_json.
    pub(super) fn get(&self, name: &str) -> Option<&Slot<'a>> {
        self.0.iter().rev().find(|(field, _)| field == name).map(|(_, value)| value)
    }

    /// Takes field `name` out (the last one, with duplicates).
    pub(super) fn take(&mut self, name: &str) -> Option<Slot<'a>> {
        let index = self.0.iter().rposition(|(field, _)| field == name)?;
        Some(self.0.swap_remove(index).1)
    }

    pub(super) fn has(&self, name: &str) -> bool {
        self.0.iter().any(|(field, _)| field == name)
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    pub(super) fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.0.iter().map(|(field, _)| field.as_ref())
    }

    pub(super) fn into_entries(self) -> impl Iterator<Item = (Cow<'a, str>, Slot<'a>)> {
        self.0.into_iter()
    }

    /// Whether a source block was read as [`SourceFields`] anywhere in here (so its value
    /// cannot be had without reading the message again). Nesting is bounded by serde_json's
    /// recursion limit, which the parse enforced.
    pub(super) fn holds_source_block(&self) -> bool {
        self.0.iter().any(|(_, slot)| match slot {
            Slot::Source(_) => true,
            Slot::Object(fields) => fields.holds_source_block(),
            Slot::Raw(_) | Slot::Parsed(_) | Slot::Image(_) => false,
        })
    }
}

/// The fields of a `source` block we read, each as the raw text of its last occurrence (as
/// [`Fields::get`] takes the last of duplicate names): a valid JSON value without surrounding
/// whitespace, as serde_json's [`RawValue`] holds it (the one-pass decoder, `onepass.rs`, finds
/// the same texts without serde). The block has a dozen fields and we read at most eight: the
/// others are skipped without being kept.
#[derive(Debug, Default)]
pub(super) struct SourceFields<'a> {
    pub(super) schema: Option<&'a str>,
    pub(super) db: Option<&'a str>,
    pub(super) table: Option<&'a str>,
    pub(super) collection: Option<&'a str>,
    pub(super) ts_ns: Option<&'a str>,
    pub(super) ts_us: Option<&'a str>,
    pub(super) ts_ms: Option<&'a str>,
    pub(super) lsn: Option<&'a str>,
}

impl<'a> SourceFields<'a> {
    /// Reads `text`, which must hold one JSON object and nothing else.
    pub(super) fn parse(text: &'a str) -> Result<SourceFields<'a>, serde_json::Error> {
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let fields = deserializer.deserialize_map(SourceVisitor)?;
        deserializer.end()?;
        Ok(fields)
    }
}

struct SourceVisitor;

impl<'de> Visitor<'de> for SourceVisitor {
    type Value = SourceFields<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SourceFields<'de>, A::Error> {
        let mut fields = SourceFields::default();
        while let Some(Text(name)) = map.next_key::<Text<'de>>()? {
            let slot = match &*name {
                "schema" => &mut fields.schema,
                "db" => &mut fields.db,
                "table" => &mut fields.table,
                "collection" => &mut fields.collection,
                "ts_ns" => &mut fields.ts_ns,
                "ts_us" => &mut fields.ts_us,
                "ts_ms" => &mut fields.ts_ms,
                "lsn" => &mut fields.lsn,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            *slot = Some(map.next_value::<&'de RawValue>()?.get());
        }
        Ok(fields)
    }
}

/// Reads a `source` block ([`Depth::Envelope`]): an object, or an error.
struct SourceSeed;

impl<'de> DeserializeSeed<'de> for SourceSeed {
    type Value = Slot<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Slot<'de>, D::Error> {
        deserializer.deserialize_map(SourceVisitor).map(|fields| Slot::Source(Box::new(fields)))
    }
}

struct FieldsSeed(Depth);

impl<'de> DeserializeSeed<'de> for FieldsSeed {
    type Value = Fields<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Fields<'de>, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FieldsSeed {
    type Value = Fields<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'de>, A::Error> {
        let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(8));
        while let Some(Text(name)) = map.next_key::<Text<'de>>()? {
            let value = match (self.0, &*name) {
                (Depth::Envelope, "source") => map.next_value_seed(SourceSeed)?,
                (_, "schema" | "source") => Slot::Raw(map.next_value()?),
                (depth, "payload") => map.next_value_seed(PayloadSeed(depth))?,
                (_, _) => Slot::Parsed(map.next_value()?),
            };
            fields.push((name, value));
        }
        Ok(Fields(fields))
    }
}

/// Reads a `payload` in the same pass as the message: an object one level deep (it is the
/// event when the message is a schema envelope), anything else as a value (when it is not,
/// say an outbox table's `payload` column, which [`Slot::into_value`] turns back into one).
struct PayloadSeed(Depth);

impl<'de> DeserializeSeed<'de> for PayloadSeed {
    type Value = Slot<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Slot<'de>, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for PayloadSeed {
    type Value = Slot<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Slot<'de>, A::Error> {
        FieldsSeed(self.0).visit_map(map).map(Slot::Object)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Slot<'de>, A::Error> {
        Value::deserialize(SeqAccessDeserializer::new(seq)).map(Slot::Parsed)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Slot<'de>, E> {
        Ok(Slot::Parsed(Value::Null))
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Slot<'de>, E> {
        Ok(Slot::Parsed(Value::Bool(b)))
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Slot<'de>, E> {
        Ok(Slot::Parsed(Value::from(n)))
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Slot<'de>, E> {
        Ok(Slot::Parsed(Value::from(n)))
    }

    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Slot<'de>, E> {
        Ok(Slot::Parsed(Value::from(n)))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Slot<'de>, E> {
        Ok(Slot::Parsed(Value::String(s.to_owned())))
    }
}

/// Parses a schema envelope's `payload` text (the fast path of [`super::Message::read`]).
pub(super) fn parse_payload(text: &str, depth: Depth) -> Result<Slot<'_>, serde_json::Error> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let payload = PayloadSeed(depth).deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(payload)
}

/// Splits `{"schema":{…},"payload":…}` into the schema's text and the payload's, without
/// validating either: the caller trusts the schema only if it is a text known to be valid,
/// and parses the payload. For valid JSON the split is exact; for anything else it may be
/// wrong, which the caller's checks then reject. `None` for any other shape (other key order,
/// whitespace inside the key names, a non-object schema, more fields are all left to the
/// general path). `known` may say how long the schema is, given the text from its opening
/// brace on; otherwise its end is found by a bracket scan.
pub(super) fn split_schema_envelope(text: &str, known: impl FnOnce(&str) -> Option<usize>) -> Option<(&str, &str)> {
    let bytes = text.as_bytes();
    let at = skip_whitespace(bytes, 0);
    let at = skip_whitespace(bytes, expect(bytes, at, b"{")?);
    let at = skip_whitespace(bytes, expect(bytes, at, b"\"schema\"")?);
    let schema_start = skip_whitespace(bytes, expect(bytes, at, b":")?);
    if bytes.get(schema_start) != Some(&b'{') {
        return None;
    }
    let schema_end = match known(text.get(schema_start..)?) {
        Some(len) => schema_start.checked_add(len)?,
        None => skip_compound(bytes, schema_start)?,
    };
    let at = skip_whitespace(bytes, schema_end);
    let at = skip_whitespace(bytes, expect(bytes, at, b",")?);
    let at = skip_whitespace(bytes, expect(bytes, at, b"\"payload\"")?);
    let payload_start = expect(bytes, at, b":")?;
    // The payload runs up to the message's closing brace; whatever else might sit in between
    // makes the payload fail to parse.
    let close = bytes.iter().rposition(|b| !is_whitespace(*b))?;
    if bytes.get(close) != Some(&b'}') || close < payload_start {
        return None;
    }
    Some((text.get(schema_start..schema_end)?, text.get(payload_start..close)?))
}

fn is_whitespace(byte: u8) -> bool {
    matches!(byte, b' ' | b'\n' | b'\r' | b'\t')
}

fn skip_whitespace(bytes: &[u8], mut at: usize) -> usize {
    while bytes.get(at).is_some_and(|b| is_whitespace(*b)) {
        at += 1;
    }
    at
}

/// The index after `literal` if `bytes` holds it at `at`.
fn expect(bytes: &[u8], at: usize, literal: &[u8]) -> Option<usize> {
    let end = at.checked_add(literal.len())?;
    (bytes.get(at..end)? == literal).then_some(end)
}

/// The index after the object starting at `start`, found by counting braces outside strings
/// (brackets need no counting: in valid JSON braces balance on their own). Exact for valid
/// JSON; no validation.
fn skip_compound(bytes: &[u8], start: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut at = start;
    while let Some(&byte) = bytes.get(at) {
        at += 1;
        match byte {
            b'"' => loop {
                let byte = *bytes.get(at)?;
                at += 1;
                match byte {
                    b'"' => break,
                    // Skip the escaped byte, which may be a quote.
                    b'\\' => at += 1,
                    _ => {}
                }
            },
            b'{' => depth += 1,
            b'}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(at);
                }
            }
            _ => {}
        }
    }
    None
}

/// A JSON string, borrowed from the message unless it holds escapes.
pub(super) struct Text<'a>(pub(super) Cow<'a, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;

        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(s)))
            }

            fn visit_str<E: de::Error>(self, s: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(s.to_owned())))
            }
        }

        deserializer.deserialize_str(TextVisitor)
    }
}

/// The JSON type of a value, for error messages and dispatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Object,
    Array,
    String,
    Number,
    Boolean,
    Null,
}

impl Kind {
    /// The type of an already validated value: its first byte says it (serde_json hands out
    /// raw values without surrounding whitespace).
    pub(super) fn of(raw: &RawValue) -> Kind {
        Kind::of_text(raw.get())
    }

    /// The type of a valid JSON value's text without surrounding whitespace.
    pub(super) fn of_text(text: &str) -> Kind {
        Kind::of_first_byte(text.as_bytes().first().copied())
    }

    /// The type a JSON text starts with; only meaningful for text known to be valid JSON.
    pub(super) fn of_first_byte(byte: Option<u8>) -> Kind {
        match byte {
            Some(b'{') => Kind::Object,
            Some(b'[') => Kind::Array,
            Some(b'"') => Kind::String,
            Some(b't' | b'f') => Kind::Boolean,
            Some(b'n') | None => Kind::Null,
            Some(_) => Kind::Number,
        }
    }
}

impl Kind {
    /// How an error sentence names the type: "`before` is a number, expected …".
    pub(super) fn name(self) -> &'static str {
        match self {
            Kind::Object => "an object",
            Kind::Array => "an array",
            Kind::String => "a string",
            Kind::Number => "a number",
            Kind::Boolean => "a boolean",
            Kind::Null => "null",
        }
    }
}

/// The type of a parsed value.
pub(super) fn kind_of(value: &Value) -> Kind {
    match value {
        Value::Object(_) => Kind::Object,
        Value::Array(_) => Kind::Array,
        Value::String(_) => Kind::String,
        Value::Number(_) => Kind::Number,
        Value::Bool(_) => Kind::Boolean,
        Value::Null => Kind::Null,
    }
}

/// The string a raw value holds, or `None` for any other type.
pub(super) fn string(raw: &RawValue) -> Option<Cow<'_, str>> {
    string_text(raw.get())
}

/// [`string`] of a valid JSON value's text.
pub(super) fn string_text(text: &str) -> Option<Cow<'_, str>> {
    if Kind::of_text(text) != Kind::String {
        return None;
    }
    // A validated string without escapes is its text between the quotes: no parse needed
    // (this runs for several `source` fields of every event).
    // Byte by byte: these texts are short, too short for `memchr` to pay.
    if !text.bytes().any(|byte| byte == b'\\') {
        return text.get(1..text.len().saturating_sub(1)).map(Cow::Borrowed);
    }
    serde_json::from_str::<Text<'_>>(text).ok().map(|Text(s)| s)
}

/// serde_json's message without its " at line L column C" suffix: for values parsed out of a
/// larger message, where that position would point into the fragment, not the message.
pub(super) fn reason(err: &serde_json::Error) -> String {
    let text = err.to_string();
    match text.rfind(" at line ") {
        Some(end) => text[..end].to_owned(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_schema_envelope_finds_both_parts() {
        let text = r#" { "schema" : {"a":"}{\\\"","b":[{"c":"]"}]} , "payload" : {"x":1} } "#;
        let schema = r#"{"a":"}{\\\"","b":[{"c":"]"}]}"#;
        assert_eq!(split_schema_envelope(text, |_| None), Some((schema, r#" {"x":1} "#)));
        assert_eq!(split_schema_envelope(r#"{"schema":{},"payload":null}"#, |_| None), Some(("{}", "null")));
        // A known length gives the same split (it is the caller's to be right).
        let known = |rest: &str| rest.starts_with(schema).then_some(schema.len());
        assert_eq!(split_schema_envelope(text, known), Some((schema, r#" {"x":1} "#)));
    }

    #[test]
    fn split_schema_envelope_leaves_other_shapes_alone() {
        for text in [
            r#"{"payload":{},"schema":{}}"#,
            r#"{"schema":null,"payload":{}}"#,
            r#"{"schema":{"a":1},"payload":{}"#,
            r#"{"schema":{"a":"unterminated}"#,
            r#"{"schema":{"a":1}}"#,
            r#"{"schema":{"a":1},"payload":"#,
            r#"{"schema":{"a":1},"payload":{}] "#,
            r#"{"id":1}"#,
            "",
            "{",
        ] {
            let split = split_schema_envelope(text, |_| None);
            // Either no split, or one whose payload the caller's parse will reject.
            assert!(split.is_none_or(|(_, payload)| parse_payload(payload, Depth::Event).is_err()), "{text}");
        }
    }
}
