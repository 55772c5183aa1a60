//! The flattened form written by Debezium's `ExtractNewRecordState` transform: the row's
//! columns at the top level, plus the metadata asked for with `add.fields` under the `__`
//! prefix (`__op`, `__table`, `__schema`, `__db`, `__source_ts_ms`, …; `add.fields=source.table`
//! gives `__source_table`, read like `__table`) and, with
//! `delete.tombstone.handling.mode=rewrite`, `__deleted`.
//!
//! MongoDB's `ExtractNewDocumentState` writes the same form, the document's fields at the top
//! level and `__collection` (or `__source_collection`) naming the collection: its values are
//! read as MongoDB extended JSON (`mongodb.rs`) and the message key's `id` as `_id`.
//!
//! Every `__` field is metadata, never a column: it is taken off the row, the ones we know are
//! read, the others dropped.

use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::Value;

use super::json::{self, kind_of};
use super::schema::LogicalColumns;
use super::{mongodb, schema, DecodeError, Heading, Images, Message, Placeholders};
use crate::event::{Decoded, Name, NoChangeKind, Op, Row};

/// Decodes a flattened row.
///
/// Without `__op` the transform has not said what happened, so the row is taken as an
/// **update with only an after image**: the rules then treat it as changed (no before image to
/// compare `when_changed` against) and invalidate what the row renders. Invalidating too much
/// is safe, too little is not; and an insert would be rendered the same way, from `after`.
/// `__deleted: "true"` makes it a delete whatever `__op` says, the row being its before image.
pub(super) fn decode(
    topic: &str,
    message: Message<'_>,
    key: Option<&[u8]>,
    placeholders: &Placeholders,
) -> Result<Decoded, DecodeError> {
    let mut meta = Metadata::default();
    // Collected in the message's order and sorted once; the last of duplicate names wins.
    let mut entries = Vec::with_capacity(message.fields.len());
    for (name, slot) in message.fields.into_entries() {
        let value =
            slot.into_value().map_err(|err| DecodeError::Unreadable { what: "the row", reason: json::reason(&err) })?;
        match name.strip_prefix("__") {
            Some(field) => meta.read(field, value)?,
            None => entries.push((name.into_owned(), value)),
        }
    }
    let row = Row::from_entries(entries);
    decode_row(topic, row, meta, message.logical.as_deref(), key, placeholders)
}

/// [`decode`] once the message is read: `row` is its columns, `meta` what its `__` fields
/// said and `logical` what its schema envelope's schema says (the one-pass reader,
/// `onepass.rs`, builds these too, and goes through [`heading`] and [`change`] itself).
pub(super) fn decode_row(
    topic: &str,
    row: Row,
    meta: Metadata,
    logical: Option<&LogicalColumns>,
    key: Option<&[u8]>,
    placeholders: &Placeholders,
) -> Result<Decoded, DecodeError> {
    match heading(topic, meta, logical)? {
        Ok(heading) => change(heading, row, logical, key, placeholders, None),
        Err(message) => Ok(message),
    }
}

/// What a flattened row's `__` fields (and its topic) say before its columns are looked at:
/// a row change's op, table and commit time (`Ok`), or (`Err`) the event itself when it is
/// not a row change (`__op: m`).
pub(super) fn heading(
    topic: &str,
    meta: Metadata,
    logical: Option<&LogicalColumns>,
) -> Result<Result<Heading, Decoded>, DecodeError> {
    let Metadata { op: op_code, table, schema: schema_name, db, deleted, deleted_field, collection, .. } = meta;
    let mongo = collection.is_some();
    if !deleted_field && !mongo && logical.is_none() {
        warn_no_deleted_field(topic);
    }
    let table = table.or(collection);
    let committed_at =
        [(meta.ts_ns, super::NANOS_PER_NS), (meta.ts_us, super::NANOS_PER_US), (meta.ts_ms, super::NANOS_PER_MS)]
            .into_iter()
            .find_map(|(count, unit)| super::epoch_time(count?, unit));

    let op = if deleted {
        Op::Delete
    } else {
        match op_code.as_deref() {
            None => Op::Update,
            Some("c") => Op::Insert,
            Some("u") => Op::Update,
            Some("d") => Op::Delete,
            Some("r") => Op::Snapshot,
            Some("t") => Op::Truncate,
            Some("m") => return Ok(Err(super::no_change(NoChangeKind::Other, None, committed_at))),
            Some(other) => return Err(DecodeError::UnknownOp { field: "__op", value: other.to_owned() }),
        }
    };
    let qualifier = schema_name.as_deref().filter(|s| !s.is_empty()).or(db.as_deref());
    let table = super::table_name(qualifier, table.as_deref(), topic)?;
    Ok(Ok(Heading { op, table, committed_at, lsn: None, mongo }))
}

/// The change event of a flattened row, from its [`heading`] and its columns; `read`: the
/// columns rules read, when the row holds only those (a projection, `onepass.rs`).
pub(super) fn change(
    heading: Heading,
    mut row: Row,
    logical: Option<&LogicalColumns>,
    key: Option<&[u8]>,
    placeholders: &Placeholders,
    read: Option<&[Name]>,
) -> Result<Decoded, DecodeError> {
    let mongo = heading.is_mongodb();
    if let Some(columns) = logical {
        // Placeholders first: the base64 placeholder in a Connect Decimal column would
        // otherwise decode to a plausible number.
        placeholders.strip(&mut row);
        schema::decode_logical(&mut row, &columns.top)?;
    }
    if mongo {
        mongodb::normalise(&mut row);
    }
    let images = match heading.op {
        Op::Delete => Images { before: Some(row), after: None },
        _ => Images { before: None, after: Some(row) },
    };
    match mongo {
        true => super::finish(heading, images, mongodb::key_row(key), placeholders),
        false => super::finish_keyed(heading, images, key, Some(placeholders), read),
    }
}

/// `delete.tombstone.handling.mode=rewrite` adds `__deleted` to every row it writes (`"false"`
/// on inserts and updates; `DefaultDeleteHandlingStrategy.handleRecord`), so a flattened row
/// without it comes from another mode, in which deletes reach us as bare `null`s (the default
/// `tombstone` mode without a value schema) or not at all (`drop`, `delete-to-tombstone`): every
/// delete is lost. The typical cause is the removed `delete.handling.mode=rewrite`, which Kafka
/// Connect ignores. Said once per process, on the first such row.
fn warn_no_deleted_field(topic: &str) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            topic,
            "ExtractNewRecordState rows without a `__deleted` field and without a value schema: deletes on this \
             topic cannot be seen and are never invalidated; set the SMT's delete.tombstone.handling.mode=rewrite \
             (delete.handling.mode was removed in Debezium 3.2 and is ignored)"
        );
    }
}

/// The `__` fields we read; the others are dropped.
#[derive(Default)]
pub(super) struct Metadata {
    op: Option<String>,
    table: Option<String>,
    schema: Option<String>,
    db: Option<String>,
    /// MongoDB's `ExtractNewDocumentState`: the collection (the table of the rules).
    collection: Option<String>,
    deleted: bool,
    /// Whether `__deleted` was there at all: the rewrite mode writes it on every row.
    deleted_field: bool,
    ts_ns: Option<i64>,
    ts_us: Option<i64>,
    ts_ms: Option<i64>,
}

impl Metadata {
    /// Reads field `__<field>`.
    pub(super) fn read(&mut self, field: &str, value: Value) -> Result<(), DecodeError> {
        match field {
            "op" => self.op = string(value, "`__op`")?,
            // `add.fields=source.table` writes `__source_table` (the SMT joins struct and field
            // names with an underscore): the same table, named as the database knows it even
            // after a router changed the topic.
            "table" => self.table = string(value, "`__table`")?,
            "source_table" => self.table = string(value, "`__source_table`")?,
            "schema" => self.schema = string(value, "`__schema`")?,
            "source_schema" => self.schema = string(value, "`__source_schema`")?,
            "db" => self.db = string(value, "`__db`")?,
            "source_db" => self.db = string(value, "`__source_db`")?,
            "collection" => self.collection = string(value, "`__collection`")?,
            "source_collection" => self.collection = string(value, "`__source_collection`")?,
            // Debezium writes "true"/"false"; a boolean is accepted too.
            "deleted" => {
                self.deleted_field = true;
                self.deleted = matches!(&value, Value::Bool(true)) || value.as_str() == Some("true");
            }
            "source_ts_ns" => self.ts_ns = value.as_i64(),
            "source_ts_us" => self.ts_us = value.as_i64(),
            "source_ts_ms" => self.ts_ms = value.as_i64(),
            _ => {}
        }
        Ok(())
    }
}

/// A metadata field's string; `None` when null, an error naming `what` for any other type.
fn string(value: Value, what: &'static str) -> Result<Option<String>, DecodeError> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s)),
        other => Err(DecodeError::WrongType { what, found: kind_of(&other).name(), expected: "a string or null" }),
    }
}
