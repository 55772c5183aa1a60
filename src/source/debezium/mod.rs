//! Debezium change events (Kafka Connect JsonConverter) decoded into [`crate::event::Decoded`].
//!
//! [`decode`] takes one Kafka message and says what it is:
//!
//! - **Confluent wire format** (first byte 0): malformed, the error naming the encoding and the
//!   schema id (`confluent.rs`).
//! - **Tombstone**: no value, or the JSON literal `null` (also as a schema envelope's
//!   `payload` with a null or non-row schema). The table comes from the topic. A JSON `null`
//!   value (not an absent one) logs a warning once: see [`warn_null_value`].
//! - **`ExtractNewRecordState` delete** in its default `delete.tombstone.handling.mode`: a
//!   schema envelope whose `payload` is null but whose `schema` describes a row. A delete whose
//!   row image is the message key's fields (the contract, "Values the database did not send").
//! - **Heartbeat**: anything on a topic starting `__debezium-heartbeat`, or a value holding
//!   nothing but `ts_ms` (schema-wrapped or not); `at` is that `ts_ms`.
//! - **Standard envelope** (`envelope.rs`): an object with a `source` object and at least one of
//!   `op`, `before`, `after`. Debezium always writes `source`; requiring it keeps a flattened
//!   row whose table happens to have an `op` or `after` column from being mistaken for one. A
//!   `source.collection` makes it a MongoDB event (`mongodb.rs`).
//! - **Schema change** (`source` plus `ddl` or `tableChanges`) and **transaction metadata**
//!   (`status` BEGIN/END with `id` and `event_count`/`data_collections`): no row change.
//! - **Flattened row** (`flattened.rs`): everything else, i.e. the `ExtractNewRecordState`
//!   form. Any field starting `__` marks one for certain (the envelope never has such fields).
//!
//! Each of these may be wrapped in a schema envelope, an object with exactly the two fields
//! `schema` and `payload` (a flattened row with other columns named so has more fields). The
//! schema is only consulted for decimal columns, and what it says is cached per schema text
//! (`schema.rs`); a schema already in that cache is passed over rather than parsed again (the
//! one the previous message carried by a single comparison, others by a bracket scan), which
//! is most of the cost of a schema-enveloped message.
//!
//! The common case, a standard envelope of plain row values (schemaless, or the payload of a
//! schema envelope whose schema is cached) and a message key like `{"id":42}`, is read in one
//! hand-written pass over the bytes (`onepass.rs`), as is a flattened row of plain values and
//! scalar `__` fields; anything else, and anything that pass is
//! not sure of, is read by the general path described here, which decides every outcome.
//!
//! The daemon's Kafka source decodes with a column projection ([`decode_projected`]): the
//! one-pass reader then builds only the columns the running rules read (docs/design.md,
//! "Column projection").
//!
//! # Choices a user can see
//!
//! - **Table name**: `source.schema` (PostgreSQL, SQL Server, Oracle) or else `source.db`
//!   (MySQL/MariaDB), a dot, `source.table` (MongoDB: `source.db`, a dot, `source.collection`);
//!   for flattened rows `__schema`/`__db` and `__table`, or their `__source_*` forms (and
//!   `__collection` for MongoDB's `ExtractNewDocumentState`). When the event names no table,
//!   the last two dot-separated parts of the topic
//!   (`shop.public.products` → `public.products`, and for SQL Server's
//!   `prefix.db.schema.table` → `schema.table`); a one-part topic is the table name itself.
//!   When the event names the table but not its schema or database, the topic's second-to-last
//!   part qualifies it.
//! - **Commit time**: `source.ts_ns`, `source.ts_us` or `source.ts_ms`, the most precise present
//!   (`__source_ts_*` for flattened rows): when the database committed the change. The
//!   envelope's own `ts_ms` is deliberately ignored: it is when the *connector* processed the
//!   event, which during a backlog or snapshot can be hours later, and would make staleness
//!   look smaller than it is. Without a source time `committed_at` is `None` and the pipeline
//!   falls back to the Kafka timestamp. A timestamp that is not an integer is ignored rather
//!   than failing the event: it never decides what is invalidated.
//! - **Message key**: a JSON object (schema-wrapped or not) whose fields are the row's key
//!   columns. The key is authoritative for them: each row image that lacks a key column, or
//!   holds `null` for it (key columns cannot be null), gets the key's value; a delete without a
//!   `before` image (PostgreSQL `REPLICA IDENTITY NOTHING`) gets the key as its before image, so
//!   templates over key columns still render. A key that is absent, `null`, not JSON or not an
//!   object is ignored: the value alone is a complete event, and a key written by another
//!   converter must not make every message malformed.
//! - **Decimals**: with a schema envelope, Connect `Decimal` and Debezium
//!   `VariableScaleDecimal` columns become plain decimal strings (`"100.00"`), the same text
//!   `decimal.handling.mode=string` sends, so one rules file works with either setting.
//! - **Temporal values**: with a schema envelope, every `io.debezium.time.*` date, time and
//!   timestamp type and Connect `Date`/`Time`/`Timestamp` become ISO 8601 strings
//!   (`crate::source::temporal`), as pgoutput's values do. Without a schema an integer cannot be
//!   known to be a date and stays the integer. Other values stay as Debezium sent them.
//! - **Unavailable values**: a column holding the connector's placeholder (`placeholder.rs`) is
//!   dropped from its image, so it is unknown there, like an absent column.
//!
//! # Limits
//!
//! Nothing here panics on input. Values we parse (row images, key, schema) are subject to
//! serde_json's recursion limit of 128 levels; parts we skip (the source block's other
//! fields, a schema without decimals) are scanned iteratively, so deep nesting there costs
//! memory bounded by the message, never stack (`json.rs`). The one-pass reader never recurses
//! and leaves nesting deeper than 32 levels to the general path (`onepass.rs`). Decimals are
//! bounded in size and scale (`decimal.rs`).

mod avro;
mod confluent;
mod decimal;
mod envelope;
mod flattened;
mod json;
mod mongodb;
mod onepass;
#[cfg(test)]
mod onepass_tests;
mod placeholder;
#[cfg(test)]
mod projection_tests;
mod protobuf;
#[cfg(test)]
mod real_tests;
mod schema;
#[cfg(test)]
mod tests;

use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::de::IgnoredAny;
use serde_json::Value;

use crate::event::{ChangeEvent, Decoded, NoChange, NoChangeKind, Op, Row};
use crate::rules::Projection;

pub use avro::{AvroError, AvroSchema};
pub use decimal::DecimalError;
use json::{Depth, Fields, Kind, Slot};
pub use placeholder::{configure, current as placeholders, DebeziumConfig, Placeholders, DEFAULT_PLACEHOLDER};
pub use protobuf::{ProtobufError, ProtobufSchema};
use schema::LogicalColumns;

/// Debezium's default heartbeat topic prefix (`topic.heartbeat.prefix`); heartbeats on a
/// renamed topic are still recognised by their `{"ts_ms":…}` shape.
const HEARTBEAT_TOPIC_PREFIX: &str = "__debezium-heartbeat";

/// Why a message is not a change event we understand. Every variant is permanent: the same
/// bytes fail the same way on every retry, so the message goes to the dead-letter destination.
/// Each displays as one sentence naming what is missing or wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("the message value is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("{what} is {found}, expected {expected}")]
    WrongType { what: &'static str, found: &'static str, expected: &'static str },
    #[error("the change event has no `{0}` field")]
    MissingField(&'static str),
    #[error("`{field}` is {value:?}, expected one of \"c\", \"u\", \"d\", \"r\", \"t\" or \"m\"")]
    UnknownOp { field: &'static str, value: String },
    #[error("the {op} event has no `after` image")]
    NoAfterImage { op: Op },
    #[error("the update event has neither a `before` nor an `after` image")]
    NoImages,
    #[error("the delete event has no `before` image and no message key to take the row's key from")]
    DeleteWithoutRow,
    #[error("the event does not name its table and the topic is empty")]
    NoTable,
    #[error("{what} could not be read: {reason}")]
    Unreadable { what: &'static str, reason: String },
    #[error("column `{column}` is not a valid decimal: {reason}")]
    Decimal { column: String, reason: DecimalError },
    #[error("the message value is in the Confluent wire format, schema id {schema_id}: set source.kafka.format to avro or auto")]
    ConfluentFramed { schema_id: u32 },
    #[error("{what} is not valid MongoDB extended JSON: {reason}")]
    ExtendedJson { what: &'static str, reason: String },
}

/// Decodes one Kafka message. `value` is `None` for a tombstone. Placeholders are the ones the
/// config named ([`placeholder::configure`]), or Debezium's default.
pub fn decode(topic: &str, key: Option<&[u8]>, value: Option<&[u8]>) -> Result<Decoded, DecodeError> {
    decode_with(placeholder::current(), topic, key, value)
}

/// [`decode`] with the given unavailable-value placeholders.
pub fn decode_with(
    placeholders: &Placeholders,
    topic: &str,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
) -> Result<Decoded, DecodeError> {
    decode_keeping(placeholders, topic, key, value, None)
}

/// [`decode`] building of the row images only the columns `projection`'s rules read of the
/// event's table (column projection: the daemon's Kafka source, `crate::source::encoded`).
/// Rows so decoded say so ([`crate::event::Row::projection`]); everything else, errors
/// included, is what [`decode`] gives. Only the one-pass reader (`onepass.rs`) projects: a
/// message it leaves to the general path has whole rows.
pub fn decode_projected(
    topic: &str,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    projection: &Projection,
) -> Result<Decoded, DecodeError> {
    decode_keeping(placeholder::current(), topic, key, value, Some(projection))
}

/// [`decode_with`], keeping the columns `projection` reads (all without one).
fn decode_keeping(
    placeholders: &Placeholders,
    topic: &str,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    projection: Option<&Projection>,
) -> Result<Decoded, DecodeError> {
    if let Some(value) = value {
        confluent::reject_framed(value)?;
        if one_pass() {
            if let Some(decoded) = onepass::decode(placeholders, topic, key, value, projection) {
                return decoded;
            }
        }
    }
    decode_read(placeholders, topic, key, value, Depth::Envelope)
}

#[cfg(test)]
thread_local! {
    /// Tests turn the one-pass fast paths off to compare with the general path alone.
    static GENERAL_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the one-pass fast paths (`onepass.rs`) are tried: always, but in tests that compare
/// them with the general path.
#[inline]
fn one_pass() -> bool {
    #[cfg(test)]
    {
        !GENERAL_ONLY.with(std::cell::Cell::get)
    }
    #[cfg(not(test))]
    {
        true
    }
}

/// [`decode_with`] by the general path alone, without the one-pass fast paths.
#[cfg(test)]
fn decode_general(
    placeholders: &Placeholders,
    topic: &str,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
) -> Result<Decoded, DecodeError> {
    GENERAL_ONLY.with(|general| general.set(true));
    let decoded = decode_with(placeholders, topic, key, value);
    GENERAL_ONLY.with(|general| general.set(false));
    decoded
}

/// [`decode_with`] reading the value with `depth`. `Depth::Envelope` is the fast path for the
/// standard envelope; whatever it cannot settle (a parse error, a `source` that is not an
/// object, a flattened row needing a `source` column's value) is decoded again with
/// `Depth::Event`, so every outcome, errors included, is the one of a single `Depth::Event`
/// read.
fn decode_read(
    placeholders: &Placeholders,
    topic: &str,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    depth: Depth,
) -> Result<Decoded, DecodeError> {
    let heartbeat_topic = topic.starts_with(HEARTBEAT_TOPIC_PREFIX);
    let message = match (value, depth) {
        (Some(value), Depth::Event) => Message::read(value, depth)?,
        (Some(value), Depth::Envelope) => match Message::read(value, depth) {
            Ok(message) => message,
            Err(_) => return decode_read(placeholders, topic, key, Some(value), Depth::Event),
        },
        (None, _) => Read::Null { row_schema: false },
    };
    let message = match message {
        Read::Message(message) => message,
        Read::Null { .. } if heartbeat_topic => return Ok(no_change(NoChangeKind::Heartbeat, None, None)),
        // ExtractNewRecordState's delete in its default `delete.tombstone.handling.mode`: the
        // value is null but keeps the row's schema; the key says which row went.
        Read::Null { row_schema: true } => {
            let table = topic_table(topic).ok_or(DecodeError::NoTable)?;
            let images = Images { before: None, after: None };
            return finish(Heading::of_table(table, Op::Delete), images, key_row(key), placeholders);
        }
        Read::Null { row_schema: false } => {
            if value.is_some() {
                warn_null_value(topic);
            }
            return Ok(no_change(NoChangeKind::Tombstone, topic_table(topic), None));
        }
    };
    let fields = &message.fields;
    if heartbeat_topic || (fields.len() == 1 && fields.has("ts_ms")) {
        return Ok(no_change(NoChangeKind::Heartbeat, None, envelope_time(fields)));
    }
    let flattened_needs_values = depth == Depth::Envelope && fields.holds_source_block();
    if fields.names().any(|name| name.starts_with("__")) {
        if flattened_needs_values {
            return decode_read(placeholders, topic, key, value, Depth::Event);
        }
        return flattened::decode(topic, message, key, placeholders);
    }
    if fields.get("source").is_some_and(|source| source.kind() == Kind::Object) {
        if fields.has("op") || fields.has("before") || fields.has("after") {
            return envelope::decode(topic, message, key, placeholders);
        }
        if fields.has("ddl") || fields.has("tableChanges") {
            return Ok(no_change(NoChangeKind::Other, None, None));
        }
    }
    if is_transaction_marker(fields) {
        return Ok(no_change(NoChangeKind::Other, None, envelope_time(fields)));
    }
    if flattened_needs_values {
        return decode_read(placeholders, topic, key, value, Depth::Event);
    }
    flattened::decode(topic, message, key, placeholders)
}

/// A value that is present but JSON `null` (not a Kafka tombstone, which has no value at all)
/// is what `ExtractNewRecordState` writes for a delete in its default
/// `delete.tombstone.handling.mode` when the converter has `schemas.enable=false`: without the
/// schema nothing tells it from a tombstone, and the delete is lost. Said once per process.
fn warn_null_value(topic: &str) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !WARNED.swap(true, AtomicOrdering::Relaxed) {
        tracing::warn!(
            topic,
            "a message value is JSON null, taken as a tombstone (nothing invalidated); if this topic is written through \
             ExtractNewRecordState, that was probably a delete: set its delete.tombstone.handling.mode=rewrite \
             (or the value converter's schemas.enable=true) so deletes invalidate"
        );
    }
}

/// A heartbeat's or transaction marker's own `ts_ms`: when the connector wrote it, which for
/// these records (unlike row changes) is the time we want.
fn envelope_time(fields: &Fields<'_>) -> Option<SystemTime> {
    epoch_time(fields.get("ts_ms")?.as_i64()?, NANOS_PER_MS)
}

/// One message value (or key) read one level deep, its schema envelope taken off.
struct Message<'a> {
    /// The fields of the event (the envelope's `payload`, or the whole value).
    fields: Fields<'a>,
    /// What the schema envelope's `schema` says about decimal and temporal columns; `None`
    /// without one.
    logical: Option<Rc<LogicalColumns>>,
}

/// What a message value (or key) holds.
enum Read<'a> {
    Message(Message<'a>),
    /// `null`, or a schema envelope whose `payload` is `null`; `row_schema` when that envelope's
    /// schema describes a row (a struct with fields).
    Null {
        row_schema: bool,
    },
}

impl<'a> Message<'a> {
    /// Reads a message value (or key). `depth` is `Depth::Event` but for the value's first
    /// attempt ([`decode_read`]).
    fn read(bytes: &'a [u8], depth: Depth) -> Result<Read<'a>, DecodeError> {
        let invalid = |e: serde_json::Error| DecodeError::InvalidJson(e.to_string());
        let first = bytes.iter().copied().find(|b| !b.is_ascii_whitespace());
        match first {
            // An empty value means what a null one means, a tombstone, in the daemon as in
            // `explain` (tools such as kcat cannot tell the two apart, and a compacting producer
            // may write either); dead-lettering it would make the two disagree.
            None => Ok(Read::Null { row_schema: false }),
            Some(b'{') => {
                let text = std::str::from_utf8(bytes).map_err(|e| DecodeError::InvalidJson(e.to_string()))?;
                if let Some(message) = Message::read_known_envelope(text, depth) {
                    return message;
                }
                let mut fields = Fields::parse(text, depth).map_err(invalid)?;
                if fields.len() == 2 && fields.has("schema") && fields.has("payload") {
                    let schema = fields.take("schema");
                    let payload = fields.take("payload");
                    if matches!(payload, Some(Slot::Parsed(Value::Null)) | None) {
                        let row_schema = matches!(&schema, Some(Slot::Raw(raw)) if schema::describes_row(raw.get()));
                        return Ok(Read::Null { row_schema });
                    }
                    let logical = match schema {
                        Some(Slot::Raw(schema)) if Kind::of(schema) == Kind::Object => {
                            Some(schema::logical_columns(schema.get())?)
                        }
                        _ => None,
                    };
                    return Message::from_payload(payload, logical);
                }
                Ok(Read::Message(Message { fields, logical: None }))
            }
            Some(first) => {
                // Validated first, so that garbage reads as invalid JSON, not as a wrong type.
                serde_json::from_slice::<IgnoredAny>(bytes).map_err(invalid)?;
                match Kind::of_first_byte(Some(first)) {
                    Kind::Null => Ok(Read::Null { row_schema: false }),
                    found => Err(DecodeError::WrongType {
                        what: "the message value",
                        found: found.name(),
                        expected: "a JSON object",
                    }),
                }
            }
        }
    }

    /// The fast path for the schema envelope: when the message is `{"schema":S,"payload":P}`
    /// and `S` is a schema text seen (and so validated) before, `S` is passed over with a
    /// bracket scan and only `P` is parsed. `None` sends the message down the general path,
    /// which also reports any error with its position in the whole message.
    fn read_known_envelope(text: &'a str, depth: Depth) -> Option<Result<Read<'a>, DecodeError>> {
        let mut recent = None;
        let (schema, payload) = json::split_schema_envelope(text, |rest| {
            let (len, columns) = schema::recent_prefix(rest)?;
            recent = Some(columns);
            Some(len)
        })?;
        let logical = match recent {
            Some(columns) => columns,
            None => schema::cached(schema)?,
        };
        let payload = json::parse_payload(payload, depth).ok()?;
        // A null payload needs its schema looked at (row or not): the general path does that.
        if matches!(payload, Slot::Parsed(Value::Null)) {
            return None;
        }
        Some(Message::from_payload(Some(payload), Some(logical)))
    }

    fn from_payload(payload: Option<Slot<'a>>, logical: Option<Rc<LogicalColumns>>) -> Result<Read<'a>, DecodeError> {
        match payload {
            Some(Slot::Object(fields)) => Ok(Read::Message(Message { fields, logical })),
            Some(Slot::Parsed(Value::Null)) | None => Ok(Read::Null { row_schema: false }),
            Some(other) => Err(DecodeError::WrongType {
                what: "`payload`",
                found: other.kind().name(),
                expected: "an object or null",
            }),
        }
    }
}

/// Debezium's transaction metadata records (`provide.transaction.metadata`), which arrive on
/// their own topic that a topic pattern may well include.
fn is_transaction_marker(fields: &Fields<'_>) -> bool {
    fields.has("id")
        && (fields.has("event_count") || fields.has("data_collections"))
        && fields.get("status").and_then(Slot::as_str).is_some_and(|status| status == "BEGIN" || status == "END")
}

fn no_change(kind: NoChangeKind, table: Option<String>, at: Option<SystemTime>) -> Decoded {
    Decoded::NoChange(NoChange { kind, table, at })
}

/// What a row change's message says before its images are looked at (`envelope::heading`,
/// `flattened::heading`, and a tombstone's topic): the change event but for its images. Small,
/// as it is moved from the heading's reader through the images' to the event.
struct Heading {
    op: Op,
    table: String,
    committed_at: Option<SystemTime>,
    /// `source.lsn` (`ChangeEvent::lsn`; envelopes only).
    lsn: Option<u64>,
    /// MongoDB (a `source.collection`, a `__collection`): the images are documents in extended
    /// JSON (`mongodb.rs`).
    mongo: bool,
}

impl Heading {
    /// A change of a relational table, without a commit time or LSN.
    fn of_table(table: String, op: Op) -> Heading {
        Heading { op, table, committed_at: None, lsn: None, mongo: false }
    }

    fn table(&self) -> &str {
        &self.table
    }

    /// Whether the event's images are read at all (a truncate's are dropped).
    fn has_images(&self) -> bool {
        self.op != Op::Truncate
    }

    fn is_mongodb(&self) -> bool {
        self.mongo
    }
}

/// A change's row images, completed from the message key, checked and assembled.
struct Images {
    before: Option<Row>,
    after: Option<Row>,
}

/// Builds the change event: drops placeholder columns (unknown, see `placeholder.rs`), fills
/// key columns in from the message key's row (see the module docs) and checks the op has the
/// images it needs.
fn finish(
    heading: Heading,
    images: Images,
    key: Option<Row>,
    placeholders: &Placeholders,
) -> Result<Decoded, DecodeError> {
    complete(heading, strip(images, Some(placeholders)), key)
}

/// [`finish`] with the message key as it came (`key_row` reads it): read only when
/// it can change the outcome (issue 12, item 2). The key is needed by a delete without a
/// `before` image (it becomes that image); otherwise it only fills in the images' key columns
/// that are absent or null. So it is not read when each image holds every column of the key,
/// not null (the one-pass key scanner, [`onepass::key_fills_nothing`], tells so without
/// building it), nor, when the images hold only the columns rules read (`read`, column
/// projection), when they hold each of those, not null: whatever the key filled in, the rules
/// would not read. Without the fast paths (tests) the key is always read. `placeholders` is
/// `None` when the images are known to hold none (so stripping them would change nothing).
fn finish_keyed(
    heading: Heading,
    images: Images,
    key: Option<&[u8]>,
    placeholders: Option<&Placeholders>,
    read: Option<&[crate::event::Name]>,
) -> Result<Decoded, DecodeError> {
    let images = strip(images, placeholders);
    let present = [&images.before, &images.after];
    // A delete without a `before` image takes the key's row as that image.
    let takes_key_row = heading.op == Op::Delete && images.before.is_none();
    let fills_nothing = |key: &[u8]| {
        read.is_some_and(|read| present.iter().copied().flatten().all(|row| holds_all(row, read)))
            || onepass::key_fills_nothing(key, present)
    };
    let key = match key {
        Some(bytes) if !takes_key_row && one_pass() && fills_nothing(bytes) => None,
        key => key_row(key),
    };
    complete(heading, images, key)
}

/// Whether `row` holds each of `columns` (sorted, unique, as [`crate::rules::Projection`]
/// gives them), none null: one walk over both, in order.
fn holds_all(row: &Row, columns: &[crate::event::Name]) -> bool {
    let mut entries = row.iter_names();
    columns.iter().all(|column| loop {
        match entries.next() {
            // By pointer first (`Arc<str>`'s own equality compares the texts): the one-pass
            // reader puts the projection's own names in the row, so mostly no text is compared.
            Some((name, value)) if Arc::ptr_eq(name, column) || name == column => break !value.is_null(),
            Some((name, _)) if **name < **column => {}
            _ => break false,
        }
    })
}

/// The images without their placeholder columns (unknown, see `placeholder.rs`).
fn strip(images: Images, placeholders: Option<&Placeholders>) -> Images {
    let Images { mut before, mut after } = images;
    if let Some(placeholders) = placeholders {
        for image in [&mut before, &mut after].into_iter().flatten() {
            placeholders.strip(image);
        }
    }
    Images { before, after }
}

/// The rest of [`finish`], once placeholders are stripped.
fn complete(heading: Heading, images: Images, key: Option<Row>) -> Result<Decoded, DecodeError> {
    let Heading { op, table, committed_at, lsn, .. } = heading;
    let Images { mut before, mut after } = images;
    if op == Op::Truncate {
        // A truncate concerns the whole table; any image would be meaningless.
        before = None;
        after = None;
    } else if let Some(key) = key {
        for image in [&mut before, &mut after].into_iter().flatten() {
            for (column, value) in key.iter_names() {
                match image.get(&**column) {
                    Some(present) if !present.is_null() => {}
                    _ => {
                        image.insert_name(column.clone(), value.clone());
                    }
                }
            }
        }
        if op == Op::Delete && before.is_none() {
            before = Some(key);
        }
    }
    match op {
        Op::Insert | Op::Snapshot if after.is_none() => return Err(DecodeError::NoAfterImage { op }),
        Op::Update if before.is_none() && after.is_none() => return Err(DecodeError::NoImages),
        Op::Delete if before.is_none() => return Err(DecodeError::DeleteWithoutRow),
        _ => {}
    }
    Ok(Decoded::Change(ChangeEvent { table, op, before, after, committed_at, lsn }))
}

/// The key columns a message key carries; `None` when there is no usable key.
///
/// `ByLogicalTableRouter` adds `__dbz__physicalTableIdentifier` (and a configured
/// `key.field.name`, by default that one) to keep keys of merged tables apart: it is routing
/// metadata, not a column, so it is dropped.
fn key_row(key: Option<&[u8]>) -> Option<Row> {
    let key = key?;
    if one_pass() {
        if let Some(row) = onepass::key_row(key) {
            return Some(row);
        }
    }
    let Read::Message(message) = Message::read(key, Depth::Event).ok()? else {
        return None;
    };
    // Collected in the key's order and sorted once; the last of duplicate names wins.
    let mut columns = Vec::with_capacity(message.fields.len());
    for (name, slot) in message.fields.into_entries() {
        if name.starts_with("__dbz__") {
            continue;
        }
        columns.push((name.into_owned(), slot.into_value().ok()?));
    }
    let mut row = Row::from_entries(columns);
    if let Some(columns) = &message.logical {
        schema::decode_logical(&mut row, &columns.top).ok()?;
    }
    Some(row)
}

/// Reads a row image: an object, or null for none.
fn image(slot: Option<Slot<'_>>, what: &'static str) -> Result<Option<Row>, DecodeError> {
    let value = match slot {
        None => return Ok(None),
        Some(Slot::Image(row)) => return Ok(Some(row)),
        Some(slot) => slot.into_value().map_err(|err| DecodeError::Unreadable { what, reason: json::reason(&err) })?,
    };
    match value {
        Value::Null => Ok(None),
        Value::Object(map) => Ok(Some(Row::from(map))),
        other => {
            Err(DecodeError::WrongType { what, found: json::kind_of(&other).name(), expected: "an object or null" })
        }
    }
}

/// The table a change concerns; see the module docs for the fallbacks.
fn table_name(qualifier: Option<&str>, table: Option<&str>, topic: &str) -> Result<String, DecodeError> {
    let qualifier = qualifier.filter(|q| !q.is_empty());
    match (qualifier, table.filter(|t| !t.is_empty())) {
        (Some(qualifier), Some(table)) => Ok(qualified(qualifier, table)),
        (None, Some(table)) => Ok(match topic_parts(topic) {
            (_, Some(qualifier)) => qualified(qualifier, table),
            (_, None) => table.to_owned(),
        }),
        (_, None) => topic_table(topic).ok_or(DecodeError::NoTable),
    }
}

/// `qualifier.table`, in one allocation of the exact size: this runs once per event, and
/// `format!`'s machinery cost about 1,000 instructions there (docs/benchmarks.md, issue 12).
fn qualified(qualifier: &str, table: &str) -> String {
    let mut name = String::with_capacity(qualifier.len() + 1 + table.len());
    name.push_str(qualifier);
    name.push('.');
    name.push_str(table);
    name
}

/// The table a topic is named after: its last two dot-separated parts.
fn topic_table(topic: &str) -> Option<String> {
    match topic_parts(topic) {
        (Some(table), Some(qualifier)) => Some(qualified(qualifier, table)),
        (Some(table), None) => Some(table.to_owned()),
        (None, _) => None,
    }
}

/// A topic's last part and the one before it, each `None` when missing or empty.
fn topic_parts(topic: &str) -> (Option<&str>, Option<&str>) {
    let mut parts = topic.rsplitn(3, '.').map(|part| Some(part).filter(|p| !p.is_empty()));
    (parts.next().flatten(), parts.next().flatten())
}

const NANOS_PER_MS: i128 = 1_000_000;
const NANOS_PER_US: i128 = 1_000;
const NANOS_PER_NS: i128 = 1;

/// The most precise of the given epoch timestamps (raw JSON texts, see
/// [`json::SourceFields`]) that is present and an integer.
fn commit_time(ns: Option<&str>, us: Option<&str>, ms: Option<&str>) -> Option<SystemTime> {
    [(ns, NANOS_PER_NS), (us, NANOS_PER_US), (ms, NANOS_PER_MS)]
        .into_iter()
        // A zero count is an unset field (the Protobuf converter writes one as 0), never a
        // commit time.
        .find_map(|(raw, unit)| epoch_time(raw?.parse::<i64>().ok().filter(|n| *n != 0)?, unit))
}

/// An integer count of `unit` nanoseconds since the Unix epoch, as a time.
fn epoch_time(count: i64, unit: i128) -> Option<SystemTime> {
    // Every event's commit time: a count after the epoch, of a unit that divides a second,
    // is split without the 128-bit division below (the same seconds and nanoseconds).
    if let (Ok(count), Ok(unit)) = (u64::try_from(count), u64::try_from(unit)) {
        if unit > 0 && 1_000_000_000 % unit == 0 {
            let per_second = 1_000_000_000 / unit;
            // The remainder is below `per_second`, so this is below 10^9 and fits.
            let duration = Duration::new(count / per_second, ((count % per_second) * unit) as u32);
            return SystemTime::UNIX_EPOCH.checked_add(duration);
        }
    }
    let nanos = i128::from(count) * unit;
    let magnitude = nanos.unsigned_abs();
    let secs = u64::try_from(magnitude / 1_000_000_000).ok()?;
    // The remainder is below 10^9 and fits.
    let duration = Duration::new(secs, (magnitude % 1_000_000_000) as u32);
    if nanos >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(duration)
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(duration)
    }
}
