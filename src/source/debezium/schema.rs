//! The Connect schema of a message, reduced to what we use: which columns are decimals and
//! which are dates, times or timestamps (logical types whose JSON value is an encoding, not the
//! value a rule should render).
//!
//! A schema envelope repeats the whole schema in every message, several kilobytes of which we
//! need one fact per decimal or temporal column. So what a schema says is cached per distinct
//! schema text (a table has one schema until its DDL changes), per thread, so the decoder stays
//! free of locks; and a schema is only parsed when its text names such a type at all.
//!
//! The cache also remembers that a text is valid JSON, which lets [`super::Message::read`]
//! skip a known schema with a plain bracket scan instead of a full JSON parse, and the schema
//! most recently seen with one comparison ([`recent_prefix`]): consecutive messages of a
//! topic carry the same schema.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::rc::Rc;

use serde_json::{Map, Value};

use super::decimal::{self, DecimalError};
use super::json::{kind_of, Kind};
use super::DecodeError;
use crate::event::Row;
use crate::source::temporal::IsoKind;

const CONNECT_DECIMAL: &str = "org.apache.kafka.connect.data.Decimal";
const VARIABLE_SCALE_DECIMAL: &str = "io.debezium.data.VariableScaleDecimal";

/// Every logical type we convert is named with one of these inside a schema's JSON text (both
/// decimal names end with the first): cheap scans tell whether a schema can hold one at all.
const LOGICAL_HINTS: [&str; 3] = ["Decimal\"", "io.debezium.time.", "org.apache.kafka.connect.data."];

const NANOS_PER_MS: i64 = 1_000_000;
const NANOS_PER_US: i64 = 1_000;

/// Distinct schemas cached per thread. One per table and DDL version; when more are in use the
/// cache starts over, which costs parsing, never correctness.
const CACHE_CAPACITY: usize = 128;

/// The decimal and temporal columns of each row image a schema describes.
#[derive(Debug, Default, PartialEq)]
pub(super) struct LogicalColumns {
    /// Fields of the top-level struct: a flattened row, or a message key.
    pub(super) top: Vec<LogicalColumn>,
    /// Fields of the envelope's `before` struct.
    pub(super) before: Vec<LogicalColumn>,
    /// Fields of the envelope's `after` struct.
    pub(super) after: Vec<LogicalColumn>,
}

#[derive(Debug, PartialEq)]
pub(super) struct LogicalColumn {
    name: String,
    kind: LogicalKind,
}

impl LogicalColumn {
    pub(super) fn name(&self) -> &str {
        &self.name
    }
}

#[derive(Debug, PartialEq)]
enum LogicalKind {
    /// `org.apache.kafka.connect.data.Decimal`: base64 bytes, scale from the schema (`None`
    /// when the schema's `scale` parameter is missing or not an integer).
    Fixed { scale: Option<i64> },
    /// `io.debezium.data.VariableScaleDecimal`: `{"scale": 2, "value": "<base64>"}`.
    Variable,
    /// Days since the epoch: `io.debezium.time.Date`, Connect `Date`.
    Date,
    /// A count of this many nanoseconds past midnight: `io.debezium.time.Time` (ms),
    /// `MicroTime` (µs), `NanoTime` (ns), Connect `Time` (ms).
    Time { unit_nanos: i64 },
    /// A count of this many nanoseconds since the epoch, wall-clock time without a zone:
    /// `io.debezium.time.Timestamp` (ms), `MicroTimestamp`, `NanoTimestamp`, Connect `Timestamp`.
    Timestamp { unit_nanos: i64 },
    /// `io.debezium.time.ZonedTimestamp`: an ISO string with an offset.
    ZonedTimestamp,
    /// `io.debezium.time.ZonedTime`: an ISO time with an offset.
    ZonedTime,
    /// `io.debezium.time.IsoDate`/`IsoTime`/`IsoTimestamp` (`time.precision.mode=isostring`).
    Iso(crate::source::temporal::IsoKind),
}

/// Schemas seen, by [`sample_hash`]; each bucket holds the full texts that share it.
type Cache = HashMap<u64, Vec<(Rc<str>, Rc<LogicalColumns>)>>;

thread_local! {
    static CACHE: RefCell<(Cache, usize)> = RefCell::new((HashMap::new(), 0));
    /// The schema most recently looked up or added: consecutive messages of a topic carry the
    /// same one, which [`recent_prefix`] then finds with one comparison.
    static RECENT: RefCell<Option<(Rc<str>, Rc<LogicalColumns>)>> = const { RefCell::new(None) };
}

/// If `rest` (a message from its schema's opening brace on) starts with the text of the schema
/// most recently seen, that schema's length and decimal columns. A valid JSON object that a
/// text starts with is exactly the object that text starts with (its closing brace is the first
/// place the nesting returns to zero), so this finds where the schema ends with one memory
/// comparison instead of a scan of every byte; and the cache vouches that the text is valid.
pub(super) fn recent_prefix(rest: &str) -> Option<(usize, Rc<LogicalColumns>)> {
    RECENT.with(|recent| {
        let recent = recent.borrow();
        let (text, columns) = recent.as_ref()?;
        rest.as_bytes().starts_with(text.as_bytes()).then(|| (text.len(), Rc::clone(columns)))
    })
}

fn remember(text: &Rc<str>, columns: &Rc<LogicalColumns>) {
    RECENT.with(|recent| *recent.borrow_mut() = Some((Rc::clone(text), Rc::clone(columns))));
}

/// The decimal columns of a schema seen before, whose text is therefore valid JSON; `None` for
/// a text not in the cache.
pub(super) fn cached(schema: &str) -> Option<Rc<LogicalColumns>> {
    let hash = sample_hash(schema);
    CACHE.with(|cache| {
        let cache = cache.borrow();
        let bucket = cache.0.get(&hash)?;
        let (text, columns) = bucket.iter().find(|(text, _)| **text == *schema)?;
        remember(text, columns);
        Some(Rc::clone(columns))
    })
}

/// The decimal columns described by `schema`, which must be the text of a JSON object (the
/// cache vouches for its validity from then on).
pub(super) fn logical_columns(schema: &str) -> Result<Rc<LogicalColumns>, DecodeError> {
    if let Some(hit) = cached(schema) {
        return Ok(hit);
    }
    let logical = LOGICAL_HINTS.iter().any(|hint| schema.contains(hint));
    let columns = Rc::new(if logical { parse(schema)? } else { LogicalColumns::default() });
    CACHE.with(|cache| {
        let (map, entries) = &mut *cache.borrow_mut();
        if *entries >= CACHE_CAPACITY {
            map.clear();
            *entries = 0;
        }
        let text: Rc<str> = schema.into();
        remember(&text, &columns);
        map.entry(sample_hash(schema)).or_default().push((text, Rc::clone(&columns)));
        *entries += 1;
    });
    Ok(columns)
}

/// Hashes a schema's length and its first and last 256 bytes. Hashing all of a multi-kilobyte
/// schema would cost more than the rest of decoding; the sample tells tables apart (the
/// envelope's name is near one end), and a full comparison settles every hit.
fn sample_hash(schema: &str) -> u64 {
    const SAMPLE: usize = 256;
    let bytes = schema.as_bytes();
    let mut hasher = DefaultHasher::new();
    bytes.len().hash(&mut hasher);
    bytes[..bytes.len().min(SAMPLE)].hash(&mut hasher);
    bytes[bytes.len().saturating_sub(SAMPLE)..].hash(&mut hasher);
    hasher.finish()
}

/// Whether a schema text describes a row: a struct with fields. Only asked of a schema whose
/// payload is null (`ExtractNewRecordState`'s delete), so parsing it here costs nothing that
/// matters.
pub(super) fn describes_row(schema: &str) -> bool {
    let Ok(schema) = serde_json::from_str::<Value>(schema) else {
        return false;
    };
    schema.get("type").and_then(Value::as_str) == Some("struct")
        && schema.get("fields").and_then(Value::as_array).is_some_and(|fields| !fields.is_empty())
}

fn parse(schema: &str) -> Result<LogicalColumns, DecodeError> {
    let schema: Value = serde_json::from_str(schema)
        .map_err(|err| DecodeError::Unreadable { what: "`schema`", reason: super::json::reason(&err) })?;
    let top = struct_fields(schema.get("fields"));
    let image = |name: &str| {
        top.iter()
            .find(|field| field.get("field").and_then(Value::as_str) == Some(name))
            .map(|field| logical(&struct_fields(field.get("fields"))))
            .unwrap_or_default()
    };
    Ok(LogicalColumns { before: image("before"), after: image("after"), top: logical(&top) })
}

/// The field schemas in a struct schema's `fields` (none for any other schema).
fn struct_fields(fields: Option<&Value>) -> Vec<&Map<String, Value>> {
    fields
        .and_then(Value::as_array)
        .map(|fields| fields.iter().filter_map(Value::as_object).collect())
        .unwrap_or_default()
}

fn logical(fields: &[&Map<String, Value>]) -> Vec<LogicalColumn> {
    fields
        .iter()
        .filter_map(|field| {
            let name = field.get("field")?.as_str()?;
            // Names from Debezium's io.debezium.time classes (each one's SCHEMA_NAME) and Kafka
            // Connect's org.apache.kafka.connect.data.{Date,Time,Timestamp} (LOGICAL_NAME).
            let kind = match field.get("name")?.as_str()? {
                CONNECT_DECIMAL => LogicalKind::Fixed { scale: scale_parameter(field) },
                VARIABLE_SCALE_DECIMAL => LogicalKind::Variable,
                "io.debezium.time.Date" | "org.apache.kafka.connect.data.Date" => LogicalKind::Date,
                "io.debezium.time.Time" | "org.apache.kafka.connect.data.Time" => {
                    LogicalKind::Time { unit_nanos: NANOS_PER_MS }
                }
                "io.debezium.time.MicroTime" => LogicalKind::Time { unit_nanos: NANOS_PER_US },
                "io.debezium.time.NanoTime" => LogicalKind::Time { unit_nanos: 1 },
                "io.debezium.time.Timestamp" | "org.apache.kafka.connect.data.Timestamp" => {
                    LogicalKind::Timestamp { unit_nanos: NANOS_PER_MS }
                }
                "io.debezium.time.MicroTimestamp" => LogicalKind::Timestamp { unit_nanos: NANOS_PER_US },
                "io.debezium.time.NanoTimestamp" => LogicalKind::Timestamp { unit_nanos: 1 },
                "io.debezium.time.ZonedTimestamp" => LogicalKind::ZonedTimestamp,
                "io.debezium.time.ZonedTime" => LogicalKind::ZonedTime,
                "io.debezium.time.IsoDate" => LogicalKind::Iso(IsoKind::Date),
                "io.debezium.time.IsoTime" => LogicalKind::Iso(IsoKind::Time),
                "io.debezium.time.IsoTimestamp" => LogicalKind::Iso(IsoKind::Timestamp),
                _ => return None,
            };
            Some(LogicalColumn { name: name.to_owned(), kind })
        })
        .collect()
}

/// Connect writes `parameters.scale` as a string (`"2"`); a number is accepted too.
fn scale_parameter(field: &Map<String, Value>) -> Option<i64> {
    match field.get("parameters")?.get("scale")? {
        Value::String(s) => s.trim().parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

/// Replaces each decimal column's encoded value in `row` by its decimal string, and each
/// temporal column's by its ISO 8601 spelling (`crate::source::temporal`). Nulls, and values
/// that are already not in the encoded shape, are left as they are; so is a temporal value out
/// of the range we spell (years 0000-9999).
pub(super) fn decode_logical(row: &mut Row, columns: &[LogicalColumn]) -> Result<(), DecodeError> {
    for column in columns {
        let Some(value) = row.get_mut(&column.name) else {
            continue;
        };
        let decoded = match (&column.kind, &*value) {
            (LogicalKind::Fixed { scale }, Value::String(text)) => {
                scale.ok_or(DecimalError::NoScale).and_then(|scale| decimal::from_base64(text, scale))
            }
            (LogicalKind::Variable, Value::Object(parts)) => variable(parts),
            (LogicalKind::Variable, other @ (Value::String(_) | Value::Array(_) | Value::Bool(_))) => {
                Err(DecimalError::VariableShape { found: kind_of(other).name() })
            }
            (kind, current) => {
                if let Some(text) = temporal(kind, current) {
                    *value = Value::String(text);
                }
                continue;
            }
        };
        match decoded {
            Ok(text) => *value = Value::String(text),
            Err(reason) => return Err(DecodeError::Decimal { column: column.name.clone(), reason }),
        }
    }
    Ok(())
}

/// The ISO spelling of a temporal column's value; `None` to leave it as sent (not a temporal
/// kind, null, another shape than the type's encoding, or out of range).
fn temporal(kind: &LogicalKind, value: &Value) -> Option<String> {
    use crate::source::temporal;
    match (kind, value) {
        (LogicalKind::Date, Value::Number(n)) => temporal::date(n.as_i64()?),
        (LogicalKind::Time { unit_nanos }, Value::Number(n)) => temporal::time_of_day(n.as_i64()?, *unit_nanos),
        (LogicalKind::Timestamp { unit_nanos }, Value::Number(n)) => {
            temporal::timestamp(n.as_i64()?, *unit_nanos, false)
        }
        (LogicalKind::ZonedTimestamp, Value::String(text)) => temporal::zoned_timestamp(text),
        (LogicalKind::ZonedTime, Value::String(text)) => temporal::zoned_time(text),
        (LogicalKind::Iso(kind), Value::String(text)) => temporal::iso_local(text, *kind),
        _ => None,
    }
}

fn variable(parts: &Map<String, Value>) -> Result<String, DecimalError> {
    let found = Kind::Object.name();
    let scale = parts.get("scale").and_then(Value::as_i64);
    let value = parts.get("value").and_then(Value::as_str);
    match (scale, value) {
        (Some(scale), Some(value)) => decimal::from_base64(value, scale),
        _ => Err(DecimalError::VariableShape { found }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn columns(schema: &str) -> LogicalColumns {
        match parse(schema) {
            Ok(columns) => columns,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn envelope_schema_names_decimals_per_image() {
        let schema = r#"{"type":"struct","fields":[
            {"type":"struct","field":"before","fields":[
                {"type":"int64","field":"id"},
                {"type":"bytes","field":"price","name":"org.apache.kafka.connect.data.Decimal","parameters":{"scale":"2"}}]},
            {"type":"struct","field":"after","fields":[
                {"type":"bytes","field":"price","name":"org.apache.kafka.connect.data.Decimal","parameters":{"scale":3}},
                {"type":"struct","field":"weight","name":"io.debezium.data.VariableScaleDecimal"},
                {"type":"bytes","field":"bad","name":"org.apache.kafka.connect.data.Decimal"}]}]}"#;
        let got = columns(schema);
        assert!(got.top.is_empty());
        assert_eq!(
            got.before,
            vec![LogicalColumn { name: "price".into(), kind: LogicalKind::Fixed { scale: Some(2) } }]
        );
        assert_eq!(
            got.after,
            vec![
                LogicalColumn { name: "price".into(), kind: LogicalKind::Fixed { scale: Some(3) } },
                LogicalColumn { name: "weight".into(), kind: LogicalKind::Variable },
                LogicalColumn { name: "bad".into(), kind: LogicalKind::Fixed { scale: None } },
            ]
        );
    }

    #[test]
    fn schema_without_decimals_has_none() {
        let schema = r#"{"type":"struct","fields":[{"type":"int32","field":"year","name":"io.debezium.time.Year"}]}"#;
        assert_eq!(logical_columns(schema).as_deref(), Ok(&LogicalColumns::default()));
    }

    #[test]
    fn cache_remembers_schemas_seen() {
        let schema = r#"{"type":"struct","fields":[{"type":"bytes","field":"p","name":"org.apache.kafka.connect.data.Decimal","parameters":{"scale":"1"}}]}"#;
        assert!(cached(schema).is_none());
        let first = logical_columns(schema);
        let second = cached(schema);
        assert!(matches!((&first, &second), (Ok(a), Some(b)) if Rc::ptr_eq(a, b) && a.top.len() == 1));
        // A different text (here one byte longer) is a different schema.
        assert!(cached(&format!("{schema} ")).is_none());
    }

    #[test]
    fn the_most_recent_schema_is_found_as_a_prefix() {
        let (a, b) = (r#"{"type":"struct","name":"a"}"#, r#"{"type":"struct","name":"b"}"#);
        let message = |schema: &str| format!("{schema},\"payload\":{{}}}}");
        let _ = logical_columns(a);
        assert_eq!(recent_prefix(&message(a)).map(|(len, _)| len), Some(a.len()));
        assert!(recent_prefix(&message(b)).is_none());
        assert!(recent_prefix(&a[..a.len() - 1]).is_none(), "a truncated schema is not the schema");
        let _ = logical_columns(b);
        assert!(recent_prefix(&message(a)).is_none(), "only the most recent one");
        // A cache hit makes a schema the most recent again.
        assert!(cached(a).is_some());
        assert_eq!(recent_prefix(&message(a)).map(|(len, _)| len), Some(a.len()));
    }

    #[test]
    fn cache_stays_bounded() {
        for i in 0..CACHE_CAPACITY * 2 + 1 {
            let schema = format!(r#"{{"type":"struct","name":"t{i}"}}"#);
            assert!(logical_columns(&schema).is_ok());
            assert!(CACHE.with(|cache| cache.borrow().1) <= CACHE_CAPACITY);
        }
        assert_eq!(CACHE.with(|cache| cache.borrow().1), 1);
    }

    #[test]
    fn decodes_values_and_names_bad_ones() {
        let cols = vec![
            LogicalColumn { name: "fixed".into(), kind: LogicalKind::Fixed { scale: Some(2) } },
            LogicalColumn { name: "var".into(), kind: LogicalKind::Variable },
            LogicalColumn { name: "gone".into(), kind: LogicalKind::Variable },
            LogicalColumn { name: "null".into(), kind: LogicalKind::Fixed { scale: Some(2) } },
        ];
        let mut row: Row = match serde_json::from_str(
            r#"{"fixed":"JxA=","var":{"scale":1,"value":"/w=="},"null":null,"other":"JxA="}"#,
        ) {
            Ok(row) => row,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(decode_logical(&mut row, &cols), Ok(()));
        assert_eq!(row["fixed"], "100.00");
        assert_eq!(row["var"], "-0.1");
        assert_eq!(row["null"], Value::Null);
        assert_eq!(row["other"], "JxA=");

        let mut bad = Row::new();
        bad.insert("var".into(), Value::String("12".into()));
        let err = decode_logical(&mut bad, &cols);
        assert_eq!(
            err.map_err(|e| e.to_string()),
            Err("column `var` is not a valid decimal: it is a string, expected an object with an \
                 integer `scale` and a base64 `value`"
                .to_owned())
        );

        let no_scale = vec![LogicalColumn { name: "p".into(), kind: LogicalKind::Fixed { scale: None } }];
        let mut row = Row::new();
        row.insert("p".into(), Value::String("JxA=".into()));
        assert_eq!(
            decode_logical(&mut row, &no_scale).map_err(|e| e.to_string()),
            Err("column `p` is not a valid decimal: its schema has no integer `scale` parameter".to_owned())
        );
    }
}
