//! The standard envelope decoded in one pass over its bytes (issue 12, item 2).
//!
//! Nearly every message is a standard envelope of one shape: `before` and `after` objects of
//! plain values, a `source` block, `op`, `ts_ms`, `transaction`, schemaless or as the
//! `payload` of a schema envelope whose schema is already cached. [`decode`] reads that shape
//! with a hand-written scanner: the images straight into [`Row`]s, the source block's fields
//! as borrowed texts, everything else passed over by a validating skipper. It is a fast path
//! and nothing more: whenever it meets anything it is not sure of (another field, a
//! duplicate, a nested value in a row, an escape it does not take, a surrogate, deep nesting,
//! invalid or truncated JSON, anything) it **declines** (`None`) and the general path
//! (`Fields`) decodes the message as before, so every outcome, errors included, is the general
//! path's. What it accepts is valid JSON that serde_json reads the same way in every context
//! the general path reads it, and every value it builds is the one serde_json builds:
//!
//! - strings without escapes are their text; with escapes the token is handed to serde_json;
//! - numbers (`arbitrary_precision` keeps their text): an integer that fits `u64` is built as
//!   serde_json builds it (`Number::from`), any other is the token parsed by serde_json's
//!   `Number::from_str`, which is what its `Value` parse does (it normalises `1E5` to
//!   `1e+5`, keeps `1.50`, `-0` and integers beyond 64 bits as written);
//! - duplicate columns in an image: the last wins, as in serde_json's map;
//! - the source block's fields are the exact texts serde_json's `RawValue` holds, read by the
//!   same code afterwards (`envelope::decode_read`).
//!
//! The scanner never indexes unchecked, never recurses (the skipper keeps a bounded stack and
//! declines deeper nesting) and never panics. A message it declines is scanned twice; only
//! unusual messages are.
//!
//! Flattened rows (`ExtractNewRecordState`, `flattened.rs`) of plain values and `__` fields
//! are read the same way ([`flat_row`]) when the envelope reader declines at a field it does
//! not know, and finished by the general path's own code (`flattened::decode_row`). A name the
//! general path could read as another kind of message (`source`, `schema`, `payload`, `ts_ms`,
//! `event_count`, `data_collections`), a nested value, a repeated `__` field or an empty
//! object declines.
//!
//! The message key (`{"id":42}`) has the same kind of fast path, [`key_row`].
//!
//! Given a [`Projection`] (the daemon's Kafka source: `super::decode_projected`), the images
//! hold only the columns the rules read of the event's table ([`Keep`]): the other values are
//! validated exactly as built ones are and dropped, so what is accepted and every outcome but
//! the rows' columns are the same as without (`projection_tests.rs`).

use std::rc::Rc;

use serde_json::{Number, Value};

use std::borrow::Cow;

use super::envelope::{self, RawImages};
use super::flattened::{self, Metadata};
use super::json::{self, Slot, SourceFields};
use super::schema::{self, LogicalColumn, LogicalColumns};
use super::{DecodeError, Placeholders, HEARTBEAT_TOPIC_PREFIX};
use crate::event::{self, Decoded, Name, ProjectionId, Row};
use crate::rules::Projection;

/// Nesting the skipper follows (in a `source` block's or `transaction`'s values) before it
/// declines; well within serde_json's recursion limit of 128, so whatever is accepted here
/// parses there, and small enough for a stack array.
const MAX_SKIP_DEPTH: usize = 32;

/// serde_json reads an object whose first key is one of these as a number or a raw value, not
/// as a map; an image holding such a column is left to it.
const SERDE_JSON_PRIVATE: &str = "$serde_json::private::";

/// Decodes `value` if it is the common shape; `None` (declined) for the general path to decode.
///
/// With a `projection` (column projection, see [`Keep`]) the row images hold only the columns
/// its rules read of the event's table, and say so ([`Row::projection`]); every other
/// outcome (errors, declines, the op, the table, the times) is the one without.
pub(super) fn decode(
    placeholders: &Placeholders,
    topic: &str,
    key: Option<&[u8]>,
    value: &[u8],
    projection: Option<&Projection>,
) -> Option<Result<Decoded, DecodeError>> {
    if topic.starts_with(HEARTBEAT_TOPIC_PREFIX) {
        return None;
    }
    let text = std::str::from_utf8(value).ok()?;
    let (body, logical) = match schema_envelope(text) {
        Envelope::Schemaless => (text, None),
        Envelope::KnownSchema(payload, logical) => (payload, Some(logical)),
        Envelope::Other => return None,
    };
    let columns = logical.as_deref();
    // The images come before the `source` block that names the table: until it is read, the
    // columns kept are those of the table the topic is named after, which it nearly always is.
    let guessed = guessed_table(topic);
    let read = projection.map(|projection| (projection, projection.columns(guessed)));
    // Filled in place: the block is large, and moving it costs copies.
    let mut source = SourceFields::default();
    let kept = [Keep::new(read, columns.map(|c| &c.before)), Keep::new(read, columns.map(|c| &c.after))];
    let Some(mut event) = Event::read(body, placeholders, &mut source, kept) else {
        // An envelope declines at its first unusual field; a flattened row at its first column.
        let kept = Keep::new(read, columns.map(|c| &c.top));
        let (row, meta) = flat_row(body, kept)?;
        let heading = match meta.and_then(|meta| flattened::heading(topic, meta, columns)) {
            Ok(Ok(heading)) => heading,
            Ok(Err(message)) => return Some(Ok(message)),
            Err(err) => return Some(Err(err)),
        };
        let read = again(read, guessed, heading.table()).filter(|_| !heading.is_mongodb());
        let needed = match heading.is_mongodb() {
            true => Keep::ALL,
            false => Keep::new(read, columns.map(|c| &c.top)),
        };
        let row = if kept.covers(&needed) { row } else { flat_row(body, needed)?.0 };
        let read = read.map(|(_, columns)| columns);
        return Some(flattened::change(heading, row, columns, key, placeholders, read));
    };
    let heading = match envelope::heading(topic, event.op, &source) {
        Ok(Ok(heading)) => heading,
        Ok(Err(message)) => return Some(Ok(message)),
        Err(err) => return Some(Err(err)),
    };
    let mut needed_read = None;
    if heading.has_images() {
        let needed = match heading.is_mongodb() {
            true => [Keep::ALL; 2],
            false => {
                let read = again(read, guessed, heading.table());
                needed_read = read.map(|(_, columns)| columns);
                [Keep::new(read, columns.map(|c| &c.before)), Keep::new(read, columns.map(|c| &c.after))]
            }
        };
        if !kept.iter().zip(&needed).all(|(kept, needed)| kept.covers(needed)) {
            event.read_images(body, placeholders, needed)?;
        }
    }
    let images = RawImages {
        before: event.before.map(slot),
        after: event.after.map(slot),
        placeholder_free: event.placeholder_free,
        read: needed_read,
    };
    Some(envelope::change(heading, images, logical, key, placeholders))
}

/// An image as read, as the general path's slot for it.
fn slot(image: Option<Row>) -> Slot<'static> {
    image.map_or(Slot::Parsed(Value::Null), Slot::Image)
}

enum Envelope<'a> {
    /// Not a schema envelope (or not one [`json::split_schema_envelope`] takes apart).
    Schemaless,
    /// A schema envelope whose schema is cached: the payload's text and what the schema says.
    KnownSchema(&'a str, Rc<LogicalColumns>),
    /// A schema envelope with a schema not seen before: the general path parses (and caches) it.
    Other,
}

/// What `Message::read_known_envelope` finds, the same way.
fn schema_envelope(text: &str) -> Envelope<'_> {
    let mut recent = None;
    let Some((schema, payload)) = json::split_schema_envelope(text, |rest| {
        let (len, columns) = schema::recent_prefix(rest)?;
        recent = Some(columns);
        Some(len)
    }) else {
        return Envelope::Schemaless;
    };
    match recent.or_else(|| schema::cached(schema)) {
        Some(logical) => Envelope::KnownSchema(payload, logical),
        None => Envelope::Other,
    }
}

/// A standard envelope as read in one pass.
struct Event<'a> {
    /// `op`'s text (a string without escapes).
    op: &'a str,
    /// `null` (`Some(None)`) or an object; `None` when absent.
    before: Option<Option<Row>>,
    after: Option<Option<Row>>,
    /// Where the `before` and `after` values start, when present (to read them again with
    /// other columns kept).
    images_at: [Option<usize>; 2],
    /// No value in either image is a placeholder.
    placeholder_free: bool,
}

impl<'a> Event<'a> {
    /// `text` holds one object (and whitespace) with a `source` object (read into `source`),
    /// an `op` string, and otherwise only `before` and `after` (each of the four at most once),
    /// `ts_ms`, `ts_us`, `ts_ns` and `transaction`. Any other field declines: one starting `__`
    /// makes a flattened row, `schema` and `payload` are read differently, and the envelope has
    /// no others.
    /// `kept`: the columns built of `before` and `after`.
    fn read(
        text: &'a str,
        placeholders: &Placeholders,
        source: &mut SourceFields<'a>,
        kept: [Keep<'_>; 2],
    ) -> Option<Event<'a>> {
        let b = text.as_bytes();
        let mut at = ws(b, 0);
        if b.get(at) != Some(&b'{') {
            return None;
        }
        at = ws(b, at + 1);
        let mut op = None;
        let mut has_source = false;
        let mut before = None;
        let mut after = None;
        let mut images_at = [None; 2];
        let mut seen = 0u8;
        let mut placeholder_free = true;
        let end = loop {
            let (name, next) = plain_string(text, at)?;
            let bit = match packed(b, at + 1, name.len()) {
                BEFORE => 1,
                AFTER => 2,
                SOURCE => 4,
                OP => 8,
                TS_MS | TS_US | TS_NS => 16,
                _ if name == "transaction" => 16,
                _ => return None,
            };
            at = colon(b, next)?;
            // A repeated `ts_*` or `transaction` is harmless (the general path ignores them
            // in an envelope; real SQL Server messages repeat `ts_ms`), any other repeat
            // declines.
            if seen & bit & !16 != 0 {
                return None;
            }
            seen |= bit;
            at = match bit {
                1 => {
                    let (image, next) = image(text, at, placeholders, &mut placeholder_free, kept[0])?;
                    before = Some(image);
                    images_at[0] = Some(at);
                    next
                }
                2 => {
                    let (image, next) = image(text, at, placeholders, &mut placeholder_free, kept[1])?;
                    after = Some(image);
                    images_at[1] = Some(at);
                    next
                }
                4 => {
                    has_source = true;
                    source_block(text, at, source)?
                }
                8 => {
                    let (code, next) = plain_string(text, at)?;
                    op = Some(code);
                    next
                }
                _ => skip(b, at)?,
            };
            match after_member(b, at)? {
                After::Next(next) => at = next,
                After::Closed(end) => break end,
            }
        };
        if ws(b, end) != b.len() {
            return None;
        }
        has_source.then_some(())?;
        Some(Event { op: op?, before, after, images_at, placeholder_free })
    }

    /// Reads the images of `text` (the text [`Event::read`] read) again, keeping `kept`'s
    /// columns. `None` only where [`Event::read`] declined already: the columns kept change
    /// what is built, never what is accepted.
    fn read_images(&mut self, text: &str, placeholders: &Placeholders, kept: [Keep<'_>; 2]) -> Option<()> {
        self.placeholder_free = true;
        for ((image_at, slot), kept) in self.images_at.iter().zip([&mut self.before, &mut self.after]).zip(kept) {
            if let Some(at) = *image_at {
                *slot = Some(image(text, at, placeholders, &mut self.placeholder_free, kept)?.0);
            }
        }
        Some(())
    }
}

/// Top-level names a flattened row read here may not have: each would make the general path
/// read the message as something else or read the field differently (`source` as an
/// envelope's source block, `schema` and `payload` as a schema envelope or raw text, `ts_ms`
/// alone as a heartbeat, `event_count` and `data_collections` as a transaction marker). With
/// no `source`, `op`, `before`, `after`, `ddl` and `tableChanges` are plain columns.
const NOT_FLAT: [&str; 6] = ["source", "schema", "payload", "ts_ms", "event_count", "data_collections"];

/// A flattened row (`ExtractNewRecordState`, `flattened.rs`): `text` holds one non-empty
/// object whose values are all strings, numbers, booleans or null, none of its names (as
/// unescaped) in [`NOT_FLAT`] or starting with serde_json's private prefix, and no `__` field
/// twice. The columns as a row, and the `__` fields read in order as `flattened::decode`
/// reads them (its first error, if any: the whole text is read and valid before it counts).
/// Whatever the general path would classify otherwise (envelope, heartbeat, schema change,
/// transaction marker, schema envelope) has one of the declined names, so it declines.
///
/// `kept`: the columns built (the `__` fields are all read).
fn flat_row<'a>(text: &'a str, kept: Keep<'_>) -> Option<(Row, Result<Metadata, DecodeError>)> {
    let b = text.as_bytes();
    let mut at = ws(b, 0);
    if b.get(at) != Some(&b'{') {
        return None;
    }
    at = ws(b, at + 1);
    let mut columns = Vec::with_capacity(kept.capacity());
    let mut meta = Ok(Metadata::default());
    // The `__` fields met, to decline a repeat.
    let mut seen: Vec<Cow<'a, str>> = Vec::new();
    let end = loop {
        let (name, next) = column_name(text, at)?;
        if NOT_FLAT.contains(&&*name) || name.starts_with(SERDE_JSON_PRIVATE) {
            return None;
        }
        at = colon(b, next)?;
        let next = match name.strip_prefix("__") {
            Some(field) => {
                let (value, next) = scalar(text, at)?;
                if seen.contains(&name) {
                    return None;
                }
                if let Ok(fields) = &mut meta {
                    if let Err(err) = fields.read(field, value) {
                        meta = Err(err);
                    }
                }
                seen.push(name);
                next
            }
            None => match kept.keeps(&name) {
                Kept::No => skip_scalar(text, at)?,
                Kept::Read(name) => {
                    let (value, next) = scalar(text, at)?;
                    insert_sorted(&mut columns, name.clone(), value);
                    next
                }
                Kept::Logical => {
                    let (value, next) = scalar(text, at)?;
                    insert_sorted(&mut columns, shared(name), value);
                    next
                }
                Kept::All => {
                    let (value, next) = scalar(text, at)?;
                    columns.push((shared(name), value));
                    next
                }
            },
        };
        match after_member(b, next)? {
            After::Next(next) => at = next,
            After::Closed(end) => break end,
        }
    };
    if ws(b, end) != b.len() {
        return None;
    }
    Some((kept.mark(Row::from_names(columns)), meta))
}

/// The message key's row when the key is an object of plain values (no schema envelope):
/// what `super::key_row` makes of it. `None` declines (any other key, valid or not).
pub(super) fn key_row(key: &[u8]) -> Option<Row> {
    let mut row = Row::new();
    key_members(key, |name, text, at| {
        let (value, next) = scalar(text, at)?;
        // Routing metadata (`ByLogicalTableRouter`), dropped as `super::key_row` does.
        if !name.starts_with("__dbz__") {
            row.insert_name(event::intern(name), value);
        }
        Some(next)
    })?;
    Some(row)
}

/// Whether filling `images` in from the message key (`super::complete`) would change nothing:
/// the key is an object of plain values that [`key_row`] takes, and each image present holds
/// every one of its columns, not null. Read as [`key_row`] reads it, without building a value;
/// `false` when it cannot tell (the key is then read into a row as before).
pub(super) fn key_fills_nothing(key: &[u8], images: [&Option<Row>; 2]) -> bool {
    let mut held = true;
    let read = key_members(key, |name, text, at| {
        // Routing metadata, never a column (`key_row`).
        if !name.starts_with("__dbz__") {
            held &= images.iter().copied().flatten().all(|row| row.get(name).is_some_and(|value| !value.is_null()));
        }
        skip_scalar(text, at)
    });
    read.is_some() && held
}

/// Reads a message key that is an object: `member` gets each member's name (without
/// escapes), the text and the index of its value, and returns the index after the value.
fn key_members<'a>(key: &'a [u8], mut member: impl FnMut(&'a str, &'a str, usize) -> Option<usize>) -> Option<()> {
    let text = std::str::from_utf8(key).ok()?;
    let b = text.as_bytes();
    let mut at = ws(b, 0);
    if b.get(at) != Some(&b'{') {
        return None;
    }
    at = ws(b, at + 1);
    let end = if b.get(at) == Some(&b'}') {
        at + 1
    } else {
        loop {
            let (name, next) = plain_string(text, at)?;
            // The general path reads these three differently (a `schema` and a `payload` make
            // a schema envelope; a non-object `payload` is a value of its own kind).
            if matches!(name, "schema" | "payload" | "source") {
                return None;
            }
            match after_member(b, member(name, text, colon(b, next)?)?)? {
                After::Next(next) => at = next,
                After::Closed(end) => break end,
            }
        }
    };
    (ws(b, end) == b.len()).then_some(())
}

/// A row image: `null` (`None`), or an object whose values are all strings, numbers, booleans
/// or null, of which `kept`'s columns are built. `placeholder_free` is cleared if a value
/// built is a placeholder (only a string can be one here).
fn image(
    text: &str,
    at: usize,
    placeholders: &Placeholders,
    placeholder_free: &mut bool,
    kept: Keep<'_>,
) -> Option<(Option<Row>, usize)> {
    let b = text.as_bytes();
    match b.get(at)? {
        b'n' => literal(b, at, b"null").map(|next| (None, next)),
        b'{' => {
            let mut at = ws(b, at + 1);
            if b.get(at) == Some(&b'}') {
                // Marked even so: decoded for a projection, the key may not fill it in
                // (`super::finish_keyed`).
                return Some((Some(kept.mark(Row::new())), at + 1));
            }
            // Collected as they come and sorted once (`Row::from_entries`); room for a usual
            // row from the start.
            let mut columns = Vec::with_capacity(kept.capacity());
            loop {
                let (name, next) = column_name(text, at)?;
                if name.starts_with(SERDE_JSON_PRIVATE) {
                    return None;
                }
                at = colon(b, next)?;
                let next = match kept.keeps(&name) {
                    Kept::No => skip_scalar(text, at)?,
                    kept => {
                        let (value, next) = scalar(text, at)?;
                        if let Value::String(s) = &value {
                            *placeholder_free &= !placeholders.is_placeholder_text(s);
                        }
                        match kept {
                            Kept::Read(name) => insert_sorted(&mut columns, name.clone(), value),
                            Kept::Logical => insert_sorted(&mut columns, shared(name), value),
                            _ => columns.push((shared(name), value)),
                        }
                        next
                    }
                };
                match after_member(b, next)? {
                    After::Next(next) => at = next,
                    // Last wins among duplicates, as in serde_json's map.
                    After::Closed(end) => return Some((Some(kept.mark(Row::from_names(columns))), end)),
                }
            }
        }
        _ => None,
    }
}

/// A column's name at `at` as [`string`] reads it: borrowed when it has no escapes.
// Inlined into each of its callers (the image and flattened-row loops), as when it had one: a
// call per value costs the envelope's images about 2%.
#[inline(always)]
fn column_name(text: &str, at: usize) -> Option<(Cow<'_, str>, usize)> {
    let (end, escaped) = scan_string(text.as_bytes(), at)?;
    if escaped {
        let (name, end) = string(text, at)?;
        return Some((Cow::Owned(name), end));
    }
    Some((Cow::Borrowed(text.get(at + 1..end - 1)?), end))
}

/// Adds a column to `columns`, kept sorted by name (a projection keeps few), the value of a
/// name already there replaced: the last wins among duplicates, as in serde_json's map (and
/// [`Row::from_names`] then finds them in order).
#[inline(always)]
fn insert_sorted(columns: &mut Vec<(Name, Value)>, name: Name, value: Value) {
    let at = columns.partition_point(|(column, _)| **column < *name);
    match columns.get_mut(at) {
        Some(column) if column.0 == name => column.1 = value,
        _ => columns.insert(at, (name, value)),
    }
}

/// A column name as a row holds it: shared ([`event::intern`]) when it had no escapes.
#[inline(always)]
fn shared(name: Cow<'_, str>) -> Name {
    match name {
        Cow::Borrowed(name) => event::intern(name),
        Cow::Owned(name) => Name::from(name),
    }
}

/// Which columns of a row image are built (column projection, issue 12, item 2): all of them,
/// or those the rules of a [`Projection`] read of the event's table and the decimal and
/// temporal columns the message's schema names (decoding those can fail, and must fail as it
/// does when every column is built). The values of the others are validated exactly as built
/// ones are ([`skip_scalar`]) and dropped, so what is accepted, and every outcome but the
/// rows' columns, never depends on what is kept.
#[derive(Clone, Copy)]
pub(super) struct Keep<'a> {
    /// `None` for every column; else the columns the rules read (sorted) and whose they are.
    read: Option<(&'a [Name], ProjectionId)>,
    logical: &'a [LogicalColumn],
}

/// Whether [`Keep`] keeps a column, and how a row collects it: every column in the message's
/// order ([`Kept::All`], sorted once at the end), or a projection's few sorted as they come
/// ([`insert_sorted`]).
enum Kept<'a> {
    No,
    All,
    /// A column the rules read, by the projection's own name (shared without a lookup).
    Read(&'a Name),
    /// A decimal or temporal column the rules do not read.
    Logical,
}

impl<'a> Keep<'a> {
    /// Every column.
    const ALL: Keep<'static> = Keep { read: None, logical: &[] };

    /// The columns `read` says the rules read, if given (else all), and `logical`'s.
    fn new(read: Option<(&'a Projection, &'a [Name])>, logical: Option<&'a Vec<LogicalColumn>>) -> Keep<'a> {
        Keep {
            read: read.map(|(projection, columns)| (columns, projection.id())),
            logical: logical.map_or(&[], Vec::as_slice),
        }
    }

    #[inline(always)]
    fn keeps(&self, name: &str) -> Kept<'a> {
        let Some((read, _)) = self.read else { return Kept::All };
        if let Some(column) = read.iter().find(|column| ***column == *name) {
            return Kept::Read(column);
        }
        match self.logical.iter().any(|column| column.name() == name) {
            true => Kept::Logical,
            false => Kept::No,
        }
    }

    /// Whether a row built with `self` holds every column `needed` keeps (the same logical
    /// columns, read by the same rules: they come from the same message and projection).
    fn covers(&self, needed: &Keep<'_>) -> bool {
        match (self.read, needed.read) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some((have, _)), Some((want, _))) => {
                std::ptr::eq(have, want) || want.iter().all(|column| have.contains(column))
            }
        }
    }

    /// Room for the columns a row keeps (none allocated when it keeps nothing).
    fn capacity(&self) -> usize {
        match self.read {
            None => IMAGE_CAPACITY,
            Some((read, _)) => (read.len() + self.logical.len()).min(IMAGE_CAPACITY),
        }
    }

    /// `row`, built with `self`, saying what it holds.
    fn mark(&self, row: Row) -> Row {
        match self.read {
            Some((_, projection)) => row.decoded_for(projection),
            None => row,
        }
    }
}

/// The columns the rules read of `table`'s rows, given those of `guessed` (`read`): looked up
/// again only when the table is not the one guessed.
fn again<'a>(
    read: Option<(&'a Projection, &'a [Name])>,
    guessed: &str,
    table: &str,
) -> Option<(&'a Projection, &'a [Name])> {
    let (projection, columns) = read?;
    Some((projection, if table == guessed { columns } else { projection.columns(table) }))
}

/// The table a topic is most likely named after (`prefix.schema.table` → `schema.table`): its
/// text after the second-to-last dot, or all of it. Only a guess, checked once the message
/// names its table (`super::table_name`).
fn guessed_table(topic: &str) -> &str {
    let Some(last) = topic.rfind('.') else { return topic };
    match topic.get(..last).and_then(|head| head.rfind('.')) {
        Some(dot) => topic.get(dot + 1..).unwrap_or(topic),
        None => topic,
    }
}

/// Columns an image has room for before its first growth.
const IMAGE_CAPACITY: usize = 8;

/// A `source` block, read into `fields` (as they were): the raw text of the last occurrence of
/// each field we use (as `json::SourceVisitor` keeps them), every value validated. The index
/// after the block.
fn source_block<'a>(text: &'a str, at: usize, fields: &mut SourceFields<'a>) -> Option<usize> {
    let b = text.as_bytes();
    if b.get(at) != Some(&b'{') {
        return None;
    }
    let mut at = ws(b, at + 1);
    if b.get(at) == Some(&b'}') {
        return Some(at + 1);
    }
    loop {
        let (name, next) = plain_string(text, at)?;
        let slot = match packed(b, at + 1, name.len()) {
            SCHEMA => Some(&mut fields.schema),
            DB => Some(&mut fields.db),
            TABLE => Some(&mut fields.table),
            TS_NS => Some(&mut fields.ts_ns),
            TS_US => Some(&mut fields.ts_us),
            TS_MS => Some(&mut fields.ts_ms),
            LSN => Some(&mut fields.lsn),
            _ if name == "collection" => Some(&mut fields.collection),
            _ => None,
        };
        at = colon(b, next)?;
        let end = skip(b, at)?;
        if let Some(slot) = slot {
            *slot = Some(text.get(at..end)?);
        }
        match after_member(b, end)? {
            After::Next(next) => at = next,
            After::Closed(end) => return Some(end),
        }
    }
}

/// A string, number, boolean or null at `at`, as serde_json parses it into a [`Value`].
// Inlined into each of its callers (the image, key and flattened-row loops), as when it had
// one: a call per value costs the envelope's images about 2%.
#[inline(always)]
fn scalar(text: &str, at: usize) -> Option<(Value, usize)> {
    let b = text.as_bytes();
    match *b.get(at)? {
        b'"' => string(text, at).map(|(s, next)| (Value::String(s), next)),
        b't' => literal(b, at, b"true").map(|next| (Value::Bool(true), next)),
        b'f' => literal(b, at, b"false").map(|next| (Value::Bool(false), next)),
        b'n' => literal(b, at, b"null").map(|next| (Value::Null, next)),
        b'-' | b'0'..=b'9' => {
            let (end, unsigned) = number(b, at)?;
            let number = match unsigned {
                Some(n) => Number::from(n),
                None => text.get(at..end)?.parse::<Number>().ok()?,
            };
            Some((Value::Number(number), end))
        }
        _ => None,
    }
}

/// The index after the value at `at` that [`scalar`] would read, accepting exactly what it
/// accepts, without building it (an integer that fits `u64` and a string without escapes are
/// scanned alone; anything else is read as [`scalar`] reads it, and dropped).
#[inline(always)]
fn skip_scalar(text: &str, at: usize) -> Option<usize> {
    let b = text.as_bytes();
    match *b.get(at)? {
        b'"' => {
            let (end, escaped) = scan_string(b, at)?;
            if escaped {
                string(text, at)?;
            }
            Some(end)
        }
        b't' => literal(b, at, b"true"),
        b'f' => literal(b, at, b"false"),
        b'n' => literal(b, at, b"null"),
        b'-' | b'0'..=b'9' => {
            let (end, unsigned) = number(b, at)?;
            if unsigned.is_none() {
                text.get(at..end)?.parse::<Number>().ok()?;
            }
            Some(end)
        }
        _ => None,
    }
}

/// The string at `at`, unescaped exactly as serde_json does (by serde_json, when it has
/// escapes).
fn string(text: &str, at: usize) -> Option<(String, usize)> {
    let (end, escaped) = scan_string(text.as_bytes(), at)?;
    let token = text.get(at..end)?;
    let s =
        if escaped { serde_json::from_str::<String>(token).ok()? } else { token.get(1..token.len() - 1)?.to_owned() };
    Some((s, end))
}

/// The string at `at` borrowed, declining one with escapes.
// Inlined: it reads every field name of the envelope and its `source` block, and the call
// cost about a fifth of it.
#[inline(always)]
fn plain_string(text: &str, at: usize) -> Option<(&str, usize)> {
    let (end, escaped) = scan_string(text.as_bytes(), at)?;
    if escaped {
        return None;
    }
    Some((text.get(at + 1..end - 1)?, end))
}

/// Scans the string whose opening quote is at `at`: the index after its closing quote, and
/// whether it holds escapes. Declines a control character (invalid JSON) and an escape that is
/// not one of JSON's (invalid) or is a `\u` escape of a surrogate (serde_json's treatment of
/// those varies with what it reads them into). The text is valid UTF-8, so a byte that is a
/// quote or a backslash is one.
#[inline]
fn scan_string(b: &[u8], at: usize) -> Option<(usize, bool)> {
    if b.get(at) != Some(&b'"') {
        return None;
    }
    let end = plain_run(b, at + 1);
    if b.get(end) == Some(&b'"') {
        return Some((end + 1, false));
    }
    scan_string_rest(b, end)
}

/// [`scan_string`] from the first byte that is not plain content.
#[inline(never)]
fn scan_string_rest(b: &[u8], mut at: usize) -> Option<(usize, bool)> {
    let mut escaped = false;
    loop {
        let byte = *b.get(at)?;
        at += 1;
        match byte {
            b'"' => return Some((at, escaped)),
            b'\\' => {
                escaped = true;
                match *b.get(at)? {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => at += 1,
                    b'u' => {
                        let mut code = 0u32;
                        for &digit in b.get(at + 1..at + 5)? {
                            code = code * 16 + char::from(digit).to_digit(16)?;
                        }
                        if (0xD800..0xE000).contains(&code) {
                            return None;
                        }
                        at += 5;
                    }
                    _ => return None,
                }
            }
            0..=0x1F => return None,
            _ => {}
        }
        at = plain_run(b, at);
    }
}

/// The index of the first byte at or after `at` that ends a run of plain string content: a
/// quote, a backslash or a control character (or the end of `b`). Eight bytes at a time: most
/// of a message is string content.
#[inline]
fn plain_run(b: &[u8], mut at: usize) -> usize {
    const ONES: u64 = u64::from_le_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_le_bytes([0x80; 8]);
    while let Some(chunk) = b.get(at..at + 8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_le_bytes(word);
        // Bytes below 0x20, and bytes equal to a quote or a backslash (a zero after the xor).
        // A flag can be wrong only above a byte rightly flagged in the same test, so the
        // lowest flag of all three is always a byte that ends the run.
        let below = |n: u8, v: u64| v.wrapping_sub(ONES * u64::from(n)) & !v & HIGHS;
        let flags = below(0x20, x) | below(1, x ^ (ONES * 0x22)) | below(1, x ^ (ONES * 0x5C));
        if flags != 0 {
            return at + (flags.trailing_zeros() / 8) as usize;
        }
        at += 8;
    }
    while b.get(at).is_some_and(|&byte| byte != b'"' && byte != b'\\' && byte >= 0x20) {
        at += 1;
    }
    at
}

/// Scans the number at `at` by JSON's grammar (`-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`):
/// the index after it and, for an integer without sign, fraction or exponent that fits, its
/// value. What follows is for the caller to check (a delimiter).
#[inline]
fn number(b: &[u8], at: usize) -> Option<(usize, Option<u64>)> {
    // Most numbers are small unsigned integers: at most 19 digits cannot overflow.
    if let Some(&first @ b'1'..=b'9') = b.get(at) {
        let mut value = u64::from(first - b'0');
        let mut end = at + 1;
        while let Some(&digit) = b.get(end).filter(|d| d.is_ascii_digit()) {
            if end - at >= 19 {
                return any_number(b, at);
            }
            value = value * 10 + u64::from(digit - b'0');
            end += 1;
        }
        if !matches!(b.get(end), Some(b'.' | b'e' | b'E')) {
            return Some((end, Some(value)));
        }
    }
    any_number(b, at)
}

/// [`number`] for any number.
#[inline(never)]
fn any_number(b: &[u8], at: usize) -> Option<(usize, Option<u64>)> {
    let mut at = at;
    let negative = b.get(at) == Some(&b'-');
    if negative {
        at += 1;
    }
    let mut value = Some(0u64);
    match *b.get(at)? {
        b'0' => {
            at += 1;
            // A leading zero is alone.
            if b.get(at).is_some_and(u8::is_ascii_digit) {
                return None;
            }
        }
        b'1'..=b'9' => {
            while let Some(&digit) = b.get(at).filter(|d| d.is_ascii_digit()) {
                value = value.and_then(|v| v.checked_mul(10)?.checked_add(u64::from(digit - b'0')));
                at += 1;
            }
        }
        _ => return None,
    }
    let mut plain = !negative;
    if b.get(at) == Some(&b'.') {
        plain = false;
        at = digits(b, at + 1)?;
    }
    if matches!(b.get(at), Some(b'e' | b'E')) {
        plain = false;
        at += 1;
        if matches!(b.get(at), Some(b'+' | b'-')) {
            at += 1;
        }
        at = digits(b, at)?;
    }
    Some((at, value.filter(|_| plain)))
}

/// The index after one or more digits at `at`.
fn digits(b: &[u8], at: usize) -> Option<usize> {
    let mut end = at;
    while b.get(end).is_some_and(u8::is_ascii_digit) {
        end += 1;
    }
    (end > at).then_some(end)
}

/// The index after `word` at `at`.
fn literal(b: &[u8], at: usize, word: &[u8]) -> Option<usize> {
    let end = at.checked_add(word.len())?;
    (b.get(at..end)? == word).then_some(end)
}

/// A field name of at most eight bytes as a number (the bytes, zero-padded), so that names
/// are told apart by one comparison each; `u64::MAX` (no UTF-8 text) for a longer one. Names
/// hold no zero bytes (the scanner declines control characters), so the padding is unambiguous.
/// The name is the `len` bytes at `start` of `b`.
#[inline(always)]
fn packed(b: &[u8], start: usize, len: usize) -> u64 {
    if len > 8 {
        return u64::MAX;
    }
    // One load of eight bytes, masked, when `b` has them: a name is followed by its closing
    // quote and more, so nearly always. Copying just the name's bytes into a word cost a call
    // to `memcpy` (a length unknown at compile time) per name, fourteen an event, and a byte
    // loop cost more still (issue 12).
    match b.get(start..start + 8) {
        Some(chunk) => {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            let word = u64::from_le_bytes(word);
            match len {
                8 => word,
                _ => word & ((1 << (8 * len)) - 1),
            }
        }
        None => b
            .get(start..start + len)
            .map_or(u64::MAX, |name| name.iter().rev().fold(0, |word, &byte| (word << 8) | u64::from(byte))),
    }
}

/// [`packed`] at compile time.
const fn pack(name: &str) -> u64 {
    let bytes = name.as_bytes();
    assert!(bytes.len() <= 8);
    let mut word = 0u64;
    let mut i = bytes.len();
    while i > 0 {
        i -= 1;
        word = (word << 8) | bytes[i] as u64;
    }
    word
}

const BEFORE: u64 = pack("before");
const AFTER: u64 = pack("after");
const SOURCE: u64 = pack("source");
const OP: u64 = pack("op");
const TS_MS: u64 = pack("ts_ms");
const TS_US: u64 = pack("ts_us");
const TS_NS: u64 = pack("ts_ns");
const SCHEMA: u64 = pack("schema");
const DB: u64 = pack("db");
const TABLE: u64 = pack("table");
const LSN: u64 = pack("lsn");

/// After a member's name: whitespace, the colon, whitespace; the index of the value.
fn colon(b: &[u8], at: usize) -> Option<usize> {
    let at = ws(b, at);
    (b.get(at) == Some(&b':')).then(|| ws(b, at + 1))
}

/// What follows an object member's value: the next member (after the `,` and whitespace) or
/// the end of the object (the index past its `}`).
enum After {
    Next(usize),
    Closed(usize),
}

/// Reads what follows the member value ending at `at`; `None` for anything but `,` or `}`.
#[inline(always)]
fn after_member(b: &[u8], at: usize) -> Option<After> {
    let at = ws(b, at);
    match b.get(at)? {
        b',' => Some(After::Next(ws(b, at + 1))),
        b'}' => Some(After::Closed(at + 1)),
        _ => None,
    }
}

/// The index of the first byte at or after `at` that is not JSON whitespace.
#[inline(always)]
fn ws(b: &[u8], at: usize) -> usize {
    // Messages are mostly written without whitespace: one comparison then.
    match b.get(at) {
        Some(&byte) if byte > b' ' => at,
        _ => ws_run(b, at),
    }
}

/// [`ws`] past a run of whitespace.
fn ws_run(b: &[u8], mut at: usize) -> usize {
    while matches!(b.get(at), Some(b' ' | b'\n' | b'\r' | b'\t')) {
        at += 1;
    }
    at
}

/// Passes over the JSON value at `at`, validating it: the index after it. Iterative; declines
/// nesting deeper than [`MAX_SKIP_DEPTH`].
#[inline(always)]
fn skip(b: &[u8], at: usize) -> Option<usize> {
    match *b.get(at)? {
        b'"' => Some(scan_string(b, at)?.0),
        b'0'..=b'9' => Some(number(b, at)?.0),
        b'n' => literal(b, at, b"null"),
        _ => skip_any(b, at),
    }
}

/// The index after the name of a member of a skipped object. Declines a name with escapes or
/// starting with `$`: serde_json reads an object whose first key is one of its private tokens
/// (`$serde_json::private::Number`, …) as something else when it parses a value (the general
/// path parses the envelope's `transaction` and `ts_*` fields).
fn member_name(b: &[u8], at: usize) -> Option<usize> {
    let (end, escaped) = scan_string(b, at)?;
    (!escaped && b.get(at + 1) != Some(&b'$')).then_some(end)
}

/// [`skip`] for any value.
#[inline(never)]
fn skip_any(b: &[u8], at: usize) -> Option<usize> {
    // Whether each open container is an object (else an array).
    let mut objects = [false; MAX_SKIP_DEPTH];
    let mut depth = 0usize;
    let mut at = at;
    loop {
        // A value starts at `at`.
        at = match *b.get(at)? {
            b'"' => scan_string(b, at)?.0,
            b'-' | b'0'..=b'9' => number(b, at)?.0,
            b't' => literal(b, at, b"true")?,
            b'f' => literal(b, at, b"false")?,
            b'n' => literal(b, at, b"null")?,
            open @ (b'{' | b'[') => {
                let object = open == b'{';
                let close = if object { b'}' } else { b']' };
                let inner = ws(b, at + 1);
                if b.get(inner) == Some(&close) {
                    inner + 1
                } else {
                    *objects.get_mut(depth)? = object;
                    depth += 1;
                    at = if object { colon(b, member_name(b, inner)?)? } else { inner };
                    continue;
                }
            }
            _ => return None,
        };
        // After a value: the next member or element, or the ends of containers.
        loop {
            let Some(open) = depth.checked_sub(1) else {
                return Some(at);
            };
            let object = *objects.get(open)?;
            at = ws(b, at);
            match (*b.get(at)?, object) {
                (b',', true) => {
                    at = colon(b, member_name(b, ws(b, at + 1))?)?;
                    break;
                }
                (b',', false) => {
                    at = ws(b, at + 1);
                    break;
                }
                (b'}', true) | (b']', false) => {
                    at += 1;
                    depth = open;
                }
                _ => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names tell fields apart only if [`packed`] reads each as [`pack`] does, wherever it
    /// sits: with eight bytes after its start (one load) or near the end of the text.
    #[test]
    fn packed_reads_a_name_as_pack_does() {
        for name in ["", "op", "lsn", "ts_ms", "before", "schema", "ts_msx", "12345678"] {
            for text in [format!("\"{name}\":1,\"more\":2}}"), format!("\"{name}")] {
                assert_eq!(packed(text.as_bytes(), 1, name.len()), pack(name), "{text}");
            }
        }
        assert_eq!(packed(b"\"transaction\":null}", 1, 11), u64::MAX);
        // A name is told from its prefixes and extensions.
        assert_ne!(packed(b"\"ts_ms\":1", 1, 4), TS_MS);
        assert_ne!(packed(b"\"ts_msx\":1", 1, 6), TS_MS);
    }
}
