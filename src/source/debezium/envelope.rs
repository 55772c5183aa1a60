//! The standard Debezium envelope: `before`, `after`, `source`, `op`.
//!
//! `op` is `c` (insert), `u` (update), `d` (delete), `r` (snapshot read), `t` (truncate) or
//! `m` (a logical decoding message: no row change). Anything else is malformed, since
//! guessing what an unknown operation did to a row could leave a stale cache.

use std::borrow::Cow;
use std::rc::Rc;
use std::time::SystemTime;

use super::json::{self, Kind, Slot, SourceFields};
use super::schema::{self, LogicalColumns};
use super::{mongodb, DecodeError, Heading, Images, Message, Placeholders};
use crate::event::{Decoded, Name, NoChangeKind, Op};

pub(super) fn decode(
    topic: &str,
    message: Message<'_>,
    key: Option<&[u8]>,
    placeholders: &Placeholders,
) -> Result<Decoded, DecodeError> {
    let Message { mut fields, logical } = message;
    let op_slot = fields.get("op").ok_or(DecodeError::MissingField("op"))?;
    let op_code = op_slot.as_str().ok_or(DecodeError::WrongType {
        what: "`op`",
        found: op_slot.kind().name(),
        expected: "a string",
    })?;
    // The caller only gets here with `source` an object: read in the message's pass
    // (`Depth::Envelope`), or kept raw (`Depth::Event`) and read now.
    let parsed;
    let source = match fields.get("source") {
        Some(Slot::Source(source)) => source,
        Some(Slot::Raw(raw)) => {
            let kind = Kind::of(raw);
            if kind != Kind::Object {
                return Err(DecodeError::WrongType { what: "`source`", found: kind.name(), expected: "an object" });
            }
            parsed = SourceFields::parse(raw.get())
                .map_err(|err| DecodeError::Unreadable { what: "`source`", reason: json::reason(&err) })?;
            &parsed
        }
        _ => {
            parsed = SourceFields::default();
            &parsed
        }
    };
    let heading = match heading(topic, &op_code, source)? {
        Ok(heading) => heading,
        Err(message) => return Ok(message),
    };
    let before = fields.take("before");
    let after = fields.take("after");
    change(heading, RawImages { before, after, placeholder_free: false, read: None }, logical, key, placeholders)
}

/// What an envelope says before its images are looked at: a row change's op, table, commit
/// time and LSN (`Ok`), or (`Err`) the event itself when it is not a row change (`op: m`).
/// [`decode`] and the one-pass reader (`onepass.rs`) both go through it and then
/// [`change`], so every outcome of the one-pass reader is the general path's; the one-pass
/// reader looks at the table in between, to know which columns of the images it needs.
pub(super) fn heading(
    topic: &str,
    op_code: &str,
    fields: &SourceFields<'_>,
) -> Result<Result<Heading, Decoded>, DecodeError> {
    let source = Source::read(fields)?;
    let op = match operation(op_code, &source)? {
        Ok(op) => op,
        Err(message) => return Ok(Err(message)),
    };
    // MongoDB names a collection where relational connectors name a table (`mongodb.rs`).
    let table = match &source.collection {
        Some(collection) => super::table_name(source.db.as_deref(), Some(collection), topic)?,
        None => super::table_name(source.qualifier(), source.table.as_deref(), topic)?,
    };
    let mongo = source.collection.is_some();
    Ok(Ok(Heading { op, table, committed_at: source.committed_at, lsn: source.lsn, mongo }))
}

/// The row images as read, not yet checked: `None` when the field is absent.
pub(super) struct RawImages<'a> {
    pub(super) before: Option<Slot<'a>>,
    pub(super) after: Option<Slot<'a>>,
    /// Known to hold no placeholder value (the one-pass reader checks every value it builds),
    /// so that stripping them would change nothing.
    pub(super) placeholder_free: bool,
    /// When the images hold only the columns rules read (a projection, `onepass.rs`): those
    /// columns (`super::finish_keyed`).
    pub(super) read: Option<&'a [Name]>,
}

/// What `op` says: a row change, or (`m`, a logical decoding message) the event itself.
fn operation(code: &str, source: &Source<'_>) -> Result<Result<Op, Decoded>, DecodeError> {
    Ok(Ok(match code {
        "c" => Op::Insert,
        "u" => Op::Update,
        "d" => Op::Delete,
        "r" => Op::Snapshot,
        "t" => Op::Truncate,
        "m" => {
            // A message concerns a table only when the source block names one; no topic
            // fallback, as message events do not come from a table's topic.
            let table = source
                .table
                .as_deref()
                .filter(|t| !t.is_empty())
                .and_then(|table| super::table_name(source.qualifier(), Some(table), "").ok());
            return Ok(Err(super::no_change(NoChangeKind::Other, table, source.committed_at)));
        }
        other => return Err(DecodeError::UnknownOp { field: "op", value: other.to_owned() }),
    }))
}

/// The change event of a row change, from its [`heading`] and its images.
pub(super) fn change(
    heading: Heading,
    images: RawImages<'_>,
    logical: Option<Rc<LogicalColumns>>,
    key: Option<&[u8]>,
    placeholders: &Placeholders,
) -> Result<Decoded, DecodeError> {
    if !heading.has_images() {
        let images = Images { before: None, after: None };
        return super::finish(heading, images, None, placeholders);
    }
    if heading.is_mongodb() {
        let before = mongodb::image(images.before, "`before`")?;
        let mut after = mongodb::image(images.after, "`after`")?;
        let key = mongodb::key_row(key);
        // An update captured without the full document (`capture.mode=change_streams`) has
        // neither image; the key still says which document changed.
        if heading.op == Op::Update && before.is_none() && after.is_none() && key.is_some() {
            after = Some(Default::default());
        }
        return super::finish(heading, Images { before, after }, key, placeholders);
    }

    let mut before = super::image(images.before, "`before`")?;
    let mut after = super::image(images.after, "`after`")?;
    // Nothing to strip in images without placeholders, unless decoding logical types changes
    // their values first.
    let strip = (!images.placeholder_free || logical.is_some()).then_some(placeholders);
    if let Some(columns) = logical {
        // Placeholders first: the base64 placeholder in a Connect Decimal column would
        // otherwise decode to a plausible number.
        if let Some(before) = &mut before {
            placeholders.strip(before);
            schema::decode_logical(before, &columns.before)?;
        }
        if let Some(after) = &mut after {
            placeholders.strip(after);
            schema::decode_logical(after, &columns.after)?;
        }
    }
    super::finish_keyed(heading, Images { before, after }, key, strip, images.read)
}

/// What we use of the `source` block.
struct Source<'a> {
    /// PostgreSQL, SQL Server, Oracle: the schema the table lives in.
    schema: Option<Cow<'a, str>>,
    /// MySQL/MariaDB: the database (also present, and not used, for PostgreSQL).
    db: Option<Cow<'a, str>>,
    table: Option<Cow<'a, str>>,
    /// MongoDB: the collection, with `db` its database.
    collection: Option<Cow<'a, str>>,
    committed_at: Option<SystemTime>,
    /// PostgreSQL: the change's WAL position (a number; some converters write it as a string).
    lsn: Option<u64>,
}

impl<'a> Source<'a> {
    fn read(fields: &SourceFields<'a>) -> Result<Source<'a>, DecodeError> {
        Ok(Source {
            schema: text(fields.schema, "`source.schema`")?,
            db: text(fields.db, "`source.db`")?,
            table: text(fields.table, "`source.table`")?,
            collection: text(fields.collection, "`source.collection`")?,
            committed_at: super::commit_time(fields.ts_ns, fields.ts_us, fields.ts_ms),
            lsn: lsn(fields.lsn),
        })
    }

    /// What goes before the dot: the schema when the connector has one, else the database.
    fn qualifier(&self) -> Option<&str> {
        self.schema.as_deref().filter(|s| !s.is_empty()).or(self.db.as_deref())
    }
}

/// `source.lsn`: a number, or a number as a string; anything else (null, absent, other
/// connectors) is no LSN, and so is 0, which no change has (the Protobuf converter writes an
/// unset number as 0). Never an error: the LSN only tunes the second pass.
fn lsn(raw: Option<&str>) -> Option<u64> {
    let raw = raw?;
    let lsn: u64 = match Kind::of_text(raw) {
        Kind::Number => raw.parse().ok()?,
        Kind::String => json::string_text(raw)?.parse().ok()?,
        _ => return None,
    };
    (lsn != 0).then_some(lsn)
}

/// A string field of `source`: `None` when absent or null, an error for any other type.
fn text<'a>(raw: Option<&'a str>, what: &'static str) -> Result<Option<Cow<'a, str>>, DecodeError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    match Kind::of_text(raw) {
        Kind::Null => Ok(None),
        Kind::String => Ok(json::string_text(raw)),
        found => Err(DecodeError::WrongType { what, found: found.name(), expected: "a string or null" }),
    }
}
