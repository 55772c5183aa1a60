//! MongoDB connector events.
//!
//! The MongoDB connector writes the standard envelope, but `after` and `before` are strings
//! holding the document as MongoDB extended JSON, the table is `source.db` plus
//! `source.collection`, and the message key is `{"id": "<the _id as extended JSON>"}`
//! (Debezium's mongodb.adoc, "Change event keys" and "Change event values").
//!
//! The document's fields become the row image, with extended JSON's type wrappers taken off so
//! a template renders the value a user sees in the shell:
//!
//! | extended JSON | renders as |
//! |---|---|
//! | `{"$oid": "596e2758…"}` | `596e2758…` |
//! | `{"$numberLong": "1004"}`, `{"$numberInt": "7"}` | `1004`, `7` |
//! | `{"$numberDouble": "1.5"}` | `1.5` |
//! | `{"$numberDecimal": "19.90"}` | `19.90` |
//! | `{"$date": …}` (epoch ms, or ISO text) | `2024-03-15T09:04:05Z` (UTC) |
//!
//! Other wrappers (`$binary`, `$regularExpression`, …) stay objects, which cannot render. A
//! delete without a pre-image (the default: MongoDB sends no `before` unless pre-images are
//! enabled) takes `_id` from the key, so templates over `_id` still render.

use serde_json::{Number, Value};

use super::json::{self, Slot};
use super::{DecodeError, Message};
use crate::event::Row;

const NANOS_PER_MS: i64 = 1_000_000;

/// Reads a MongoDB `before`/`after`: an extended JSON string, or null for none.
pub(super) fn image(slot: Option<Slot<'_>>, what: &'static str) -> Result<Option<Row>, DecodeError> {
    let value = match slot {
        None => return Ok(None),
        Some(slot) => slot.into_value().map_err(|err| DecodeError::Unreadable { what, reason: json::reason(&err) })?,
    };
    let document = match value {
        Value::Null => return Ok(None),
        Value::String(text) => serde_json::from_str::<Value>(&text)
            .map_err(|err| DecodeError::ExtendedJson { what, reason: json::reason(&err) })?,
        // Already a document (a converter that expanded it): read the same way.
        other => other,
    };
    match document {
        Value::Object(map) => {
            let mut row = Row::from(map);
            normalise(&mut row);
            Ok(Some(row))
        }
        other => Err(DecodeError::WrongType {
            what,
            found: json::kind_of(&other).name(),
            expected: "a document in MongoDB extended JSON",
        }),
    }
}

/// Takes the extended JSON type wrappers off every field of a document.
pub(super) fn normalise(row: &mut Row) {
    for value in row.values_mut() {
        convert(value);
    }
}

/// The row a MongoDB message key names: `{"_id": value}` from the key's `id`, which holds the
/// `_id` serialized as extended JSON (`"1004"`, `"\"abc\""`, `"{\"$oid\" : \"…\"}"`). `None`
/// when the key is absent or not of that shape.
pub(super) fn key_row(key: Option<&[u8]>) -> Option<Row> {
    let super::Read::Message(message) = Message::read(key?, super::json::Depth::Event).ok()? else {
        return None;
    };
    let mut row = Row::new();
    for (name, slot) in message.fields.into_entries() {
        let value = slot.into_value().ok()?;
        match (&*name, value) {
            ("id", Value::String(text)) => {
                let mut id = serde_json::from_str(&text).unwrap_or(Value::String(text));
                convert(&mut id);
                row.insert("_id".to_owned(), id);
            }
            // A key already holding `_id` (a flattening or routing SMT upstream).
            ("_id", mut value) => {
                convert(&mut value);
                row.insert("_id".to_owned(), value);
            }
            _ => {}
        }
    }
    (!row.is_empty()).then_some(row)
}

/// Replaces a type wrapper by the value it wraps, recursively.
fn convert(value: &mut Value) {
    match value {
        Value::Object(map) if map.len() == 1 => {
            let Some((tag, inner)) = map.iter_mut().next() else {
                return;
            };
            let converted = match (tag.as_str(), &*inner) {
                ("$oid" | "$numberDecimal" | "$symbol", Value::String(s)) => Some(Value::String(s.clone())),
                ("$numberLong" | "$numberInt", Value::String(s)) => s.parse::<i64>().ok().map(Value::from),
                ("$numberDouble", Value::String(s)) => Some(
                    s.parse::<f64>()
                        .ok()
                        .and_then(Number::from_f64)
                        .map_or_else(|| Value::String(s.clone()), Value::Number),
                ),
                ("$date", date) => date_value(date).map(Value::String),
                (name, _) if name.starts_with('$') => None,
                _ => {
                    convert(inner);
                    None
                }
            };
            if let Some(converted) = converted {
                *value = converted;
            }
        }
        Value::Object(map) => map.values_mut().for_each(convert),
        Value::Array(items) => items.iter_mut().for_each(convert),
        _ => {}
    }
}

/// `$date`'s value: epoch milliseconds (a number or `{"$numberLong": "…"}`, canonical mode) or
/// an ISO text (relaxed mode), as an ISO timestamp in UTC.
fn date_value(date: &Value) -> Option<String> {
    use crate::source::temporal;
    match date {
        Value::Number(n) => temporal::timestamp(n.as_i64()?, NANOS_PER_MS, true),
        Value::String(text) => temporal::zoned_timestamp(text),
        Value::Object(map) => {
            let ms = map.get("$numberLong")?.as_str()?.parse().ok()?;
            temporal::timestamp(ms, NANOS_PER_MS, true)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn wrappers_come_off() {
        let mut doc = json!({
            "_id": {"$oid": "596e275826f08b2730779e1f"},
            "n": {"$numberLong": "1004"},
            "i": {"$numberInt": "7"},
            "d": {"$numberDouble": "1.5"},
            "dec": {"$numberDecimal": "19.90"},
            "at": {"$date": {"$numberLong": "1710497045250"}},
            "relaxed": {"$date": "2024-03-15T10:04:05.25Z"},
            "nested": {"a": [{"$numberInt": "1"}]},
            "bin": {"$binary": {"base64": "a2Fma2E=", "subType": "00"}}
        });
        convert(&mut doc);
        assert_eq!(
            doc,
            json!({
                "_id": "596e275826f08b2730779e1f",
                "n": 1004, "i": 7, "d": 1.5, "dec": "19.90",
                "at": "2024-03-15T10:04:05.25Z", "relaxed": "2024-03-15T10:04:05.25Z",
                "nested": {"a": [1]},
                "bin": {"$binary": {"base64": "a2Fma2E=", "subType": "00"}}
            })
        );
    }
}
