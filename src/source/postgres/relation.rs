//! The relation cache (table name and columns by relation OID, refreshed by every Relation
//! message) and the translation of pgoutput row changes into [`ChangeEvent`]s.
//!
//! Values render as Debezium's JSON renders them, so one rules file serves both sources:
//! - `smallint`, `integer`, `bigint`, `oid`: JSON integers;
//! - `real`, `double precision`: JSON numbers (`NaN` and infinities, which JSON cannot hold,
//!   as strings);
//! - `boolean`: `true` / `false`;
//! - `numeric`: the decimal string PostgreSQL prints (`"19.90"`), as the Debezium decoder
//!   renders Connect decimals;
//! - `date`, `time`, `timetz`, `timestamp`, `timestamptz`: ISO 8601 strings as the contract's
//!   table fixes them (`2024-03-15`, `10:04:05.25`, `2024-03-15T10:04:05`, zoned values in UTC
//!   with `Z`), the spelling the Debezium decoder gives its temporal logical types;
//! - everything else (text, varchar, uuid, json, arrays...): PostgreSQL's text output, as
//!   a string. Debezium renders bytea differently (base64);
//!   `check --against-db` warns about template columns of such types.
//! - SQL NULL: `null`. An unchanged TOASTed value: the column is *absent* (unknown).

use std::collections::HashMap;
use std::time::SystemTime;

use serde_json::{json, Number, Value};

use super::pgoutput::{Column, Datum, OldTuple, Relation, Tuple};
use crate::event::{ChangeEvent, Op, Row};

/// Type OIDs from `pg_type.dat` (stable across versions).
pub(crate) mod oid {
    pub const BOOL: u32 = 16;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const OID: u32 = 26;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const NUMERIC: u32 = 1700;
    pub const DATE: u32 = 1082;
    pub const TIME: u32 = 1083;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const TIMETZ: u32 = 1266;
}

/// One cached table.
#[derive(Debug, Clone)]
pub(crate) struct Table {
    /// `schema.table`.
    pub name: String,
    pub schema: String,
    pub table: String,
    pub columns: Vec<Column>,
}

#[derive(Debug, Default)]
pub(crate) struct RelationCache {
    tables: HashMap<u32, Table>,
}

/// A change that cannot become an event: the reason, for the dead letter.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Undecodable {
    pub reason: String,
    /// The table, when known.
    pub table: Option<String>,
    /// A best-effort Debezium rendering (undecodable values as their raw text), for replay.
    pub rendering: Option<Value>,
}

impl RelationCache {
    /// A Relation message: new table, or a changed definition (ADD COLUMN...).
    pub fn refresh(&mut self, r: Relation) {
        let name = format!("{}.{}", r.schema, r.name);
        self.tables.insert(r.oid, Table { name, schema: r.schema, table: r.name, columns: r.columns });
    }

    fn table(&self, oid: u32) -> Result<&Table, Undecodable> {
        self.tables.get(&oid).ok_or_else(|| Undecodable {
            reason: format!("a change of relation {oid} arrived before its Relation message"),
            table: None,
            rendering: None,
        })
    }

    pub fn insert(&self, oid: u32, new: &Tuple, at: Option<SystemTime>) -> Result<ChangeEvent, Undecodable> {
        let t = self.table(oid)?;
        let after = t.row(new, RowKind::All);
        t.finish(Op::Insert, None, Some(after), at)
    }

    pub fn update(
        &self,
        oid: u32,
        old: Option<&OldTuple>,
        new: &Tuple,
        at: Option<SystemTime>,
    ) -> Result<ChangeEvent, Undecodable> {
        let t = self.table(oid)?;
        let before = old.map(|o| t.old_row(o));
        let after = t.row(new, RowKind::All);
        t.finish(Op::Update, before, Some(after), at)
    }

    pub fn delete(&self, oid: u32, old: &OldTuple, at: Option<SystemTime>) -> Result<ChangeEvent, Undecodable> {
        let t = self.table(oid)?;
        let before = t.old_row(old);
        t.finish(Op::Delete, Some(before), None, at)
    }

    pub fn truncate(&self, oid: u32, at: Option<SystemTime>) -> Result<ChangeEvent, Undecodable> {
        let t = self.table(oid)?;
        Ok(ChangeEvent {
            table: t.name.clone(),
            op: Op::Truncate,
            before: None,
            after: None,
            committed_at: at,
            lsn: None,
        })
    }
}

#[derive(Clone, Copy, PartialEq)]
enum RowKind {
    All,
    KeyOnly,
}

/// A row rendered column by column; values that failed keep their raw text and a reason.
struct Rendered {
    row: Row,
    errors: Vec<String>,
}

impl Table {
    fn old_row(&self, old: &OldTuple) -> Rendered {
        match old {
            OldTuple::Key(t) => self.row(t, RowKind::KeyOnly),
            OldTuple::Full(t) => self.row(t, RowKind::All),
        }
    }

    fn row(&self, tuple: &Tuple, kind: RowKind) -> Rendered {
        // Collected in the table's order and sorted once (`Row::from_entries`).
        let mut columns = Vec::with_capacity(self.columns.len());
        let mut errors = Vec::new();
        if tuple.len() != self.columns.len() {
            errors.push(format!(
                "the row has {} columns but the Relation message of {} announced {}",
                tuple.len(),
                self.name,
                self.columns.len()
            ));
        }
        for (column, datum) in self.columns.iter().zip(tuple) {
            if kind == RowKind::KeyOnly && !column.key {
                continue;
            }
            let value = match datum {
                Datum::Null => Value::Null,
                // Unknown, never null and never "changed": leave the column out.
                Datum::UnchangedToast => continue,
                Datum::Text(bytes) => match render(column.type_oid, bytes) {
                    Ok(v) => v,
                    Err(why) => {
                        errors.push(format!("column {:?} of {}: {why}", column.name, self.name));
                        Value::String(String::from_utf8_lossy(bytes).into_owned())
                    }
                },
                Datum::Binary(_) => {
                    errors.push(format!(
                        "column {:?} of {} arrived in binary format, which this source never requests",
                        column.name, self.name
                    ));
                    continue;
                }
            };
            columns.push((crate::event::intern(&column.name), value));
        }
        Rendered { row: Row::from_names(columns), errors }
    }

    fn finish(
        &self,
        op: Op,
        before: Option<Rendered>,
        after: Option<Rendered>,
        at: Option<SystemTime>,
    ) -> Result<ChangeEvent, Undecodable> {
        let errors: Vec<String> = before.iter().chain(after.iter()).flat_map(|r| r.errors.iter().cloned()).collect();
        let event = ChangeEvent {
            table: self.name.clone(),
            op,
            before: before.map(|r| r.row),
            after: after.map(|r| r.row),
            committed_at: at,
            lsn: None,
        };
        if errors.is_empty() {
            Ok(event)
        } else {
            Err(Undecodable {
                reason: errors.join("; "),
                table: Some(self.name.clone()),
                rendering: Some(debezium_json(&event, &self.schema, &self.table, None)),
            })
        }
    }
}

/// One value in the type's text output format, rendered as Debezium renders it.
pub(crate) fn render(type_oid: u32, bytes: &[u8]) -> Result<Value, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "the value is not valid UTF-8".to_string())?;
    Ok(match type_oid {
        oid::BOOL => match text {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            _ => return Err(format!("{text:?} is not a boolean")),
        },
        oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => match text.parse::<i64>() {
            Ok(i) => Value::Number(i.into()),
            // oid is unsigned 32-bit: always fits i64; anything else is not an integer.
            Err(_) => return Err(format!("{text:?} is not an integer")),
        },
        oid::FLOAT4 | oid::FLOAT8 => match text.parse::<f64>() {
            Ok(f) => match Number::from_f64(f) {
                Some(n) => Value::Number(n),
                None => Value::String(text.to_owned()),
            },
            Err(_) => return Err(format!("{text:?} is not a floating-point number")),
        },
        oid::NUMERIC => {
            let ok = matches!(text, "NaN" | "Infinity" | "-Infinity")
                || (!text.is_empty()
                    && text.trim_start_matches('-').chars().all(|c| c.is_ascii_digit() || c == '.')
                    && text.trim_start_matches('-').chars().any(|c| c.is_ascii_digit()));
            if !ok {
                return Err(format!("{text:?} is not a decimal number"));
            }
            Value::String(text.to_owned())
        }
        // ISO 8601 as the Debezium decoder spells its temporal types (`crate::source::temporal`),
        // so one rules file gives one key from either source. PostgreSQL prints these in the
        // session's DateStyle (ISO by default); a text we cannot read (`infinity`, a BC date,
        // another DateStyle) is kept as PostgreSQL printed it.
        oid::DATE | oid::TIME | oid::TIMESTAMP | oid::TIMESTAMPTZ | oid::TIMETZ => {
            use crate::source::temporal;
            let iso = match type_oid {
                oid::DATE => temporal::pg_date(text),
                oid::TIME => temporal::pg_time(text),
                oid::TIMESTAMP => temporal::pg_timestamp(text),
                oid::TIMESTAMPTZ => temporal::zoned_timestamp(text),
                _ => temporal::zoned_time(text),
            };
            Value::String(iso.unwrap_or_else(|| text.to_owned()))
        }
        _ => Value::String(text.to_owned()),
    })
}

/// A Debezium-shaped JSON rendering of an event (the standard envelope, no schema), kept as the
/// dead letter's `value` so `replay` can feed it back through the Debezium decoder.
pub(crate) fn debezium_json(event: &ChangeEvent, schema: &str, table: &str, lsn: Option<u64>) -> Value {
    let op = match event.op {
        Op::Insert => "c",
        Op::Update => "u",
        Op::Delete => "d",
        Op::Snapshot => "r",
        Op::Truncate => "t",
    };
    let ts_us =
        event.committed_at.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_micros() as i64);
    let mut source = json!({"connector": "postgresql", "schema": schema, "table": table});
    if let Some(map) = source.as_object_mut() {
        if let Some(us) = ts_us {
            map.insert("ts_us".into(), json!(us));
            map.insert("ts_ms".into(), json!(us / 1000));
        }
        if let Some(lsn) = lsn {
            map.insert("lsn".into(), json!(lsn));
        }
    }
    json!({"before": event.before, "after": event.after, "source": source, "op": op})
}

#[cfg(test)]
mod tests {
    use super::super::pgoutput::{self, tests::Builder, Message};
    use super::*;

    fn cache(ident: u8) -> RelationCache {
        let rel = Builder::relation(
            10,
            "public",
            "items",
            ident,
            &[("id", oid::INT4, true), ("price", oid::NUMERIC, false), ("name", 25, false), ("live", oid::BOOL, false)],
        );
        let Ok(Message::Relation(r)) = pgoutput::parse(&rel) else { panic!() };
        let mut c = RelationCache::default();
        c.refresh(r);
        c
    }

    fn tuple(values: &[Option<&str>]) -> Tuple {
        values
            .iter()
            .map(|v| match v {
                None => Datum::Null,
                Some("\u{0}u") => Datum::UnchangedToast,
                Some(t) => Datum::Text(t.as_bytes().to_vec()),
            })
            .collect()
    }

    #[test]
    fn temporal_values_render_as_iso() {
        assert_eq!(render(oid::DATE, b"2024-03-15").unwrap(), json!("2024-03-15"));
        assert_eq!(render(oid::TIME, b"10:04:05.25").unwrap(), json!("10:04:05.25"));
        assert_eq!(render(oid::TIMESTAMP, b"2024-03-15 10:04:05").unwrap(), json!("2024-03-15T10:04:05"));
        assert_eq!(render(oid::TIMESTAMPTZ, b"2024-03-15 10:04:05.25+01").unwrap(), json!("2024-03-15T09:04:05.25Z"));
        assert_eq!(render(oid::TIMETZ, b"10:04:05+01").unwrap(), json!("09:04:05Z"));
        assert_eq!(render(oid::TIMESTAMP, b"infinity").unwrap(), json!("infinity"));
    }

    #[test]
    fn values_render_like_debezium() {
        let c = cache(b'd');
        let e = c.insert(10, &tuple(&[Some("42"), Some("19.90"), Some("Lamp"), Some("t")]), None).unwrap();
        assert_eq!(e.table, "public.items");
        assert_eq!(e.after.unwrap().into_value(), json!({"id": 42, "price": "19.90", "name": "Lamp", "live": true}));
        assert_eq!(render(oid::INT8, b"-9223372036854775808").unwrap(), json!(i64::MIN));
        assert_eq!(render(oid::FLOAT8, b"1.5").unwrap(), json!(1.5));
        assert_eq!(render(oid::FLOAT8, b"NaN").unwrap(), json!("NaN"));
        assert_eq!(
            render(2950, b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").unwrap(),
            json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
        );
    }

    #[test]
    fn key_only_old_images_and_unchanged_toast() {
        let c = cache(b'd');
        let old = OldTuple::Key(tuple(&[Some("42"), None, None, None]));
        let e = c.update(10, Some(&old), &tuple(&[Some("43"), Some("1"), Some("\u{0}u"), None]), None).unwrap();
        // Key-only: non-key columns are absent, not null.
        assert_eq!(e.before.unwrap().into_value(), json!({"id": 42}));
        // Unchanged TOAST: absent; a real NULL stays null.
        assert_eq!(e.after.unwrap().into_value(), json!({"id": 43, "price": "1", "live": null}));
        let e = c.delete(10, &old, None).unwrap();
        assert_eq!(e.before.unwrap().into_value(), json!({"id": 42}));
        let full = OldTuple::Full(tuple(&[Some("42"), Some("2.5"), Some("x"), Some("f")]));
        let e = c.delete(10, &full, None).unwrap();
        assert_eq!(e.before.unwrap().len(), 4);
    }

    #[test]
    fn schema_change_refreshes_the_cache() {
        let mut c = cache(b'd');
        let rel = Builder::relation(10, "public", "items", b'd', &[("id", oid::INT4, true), ("slug", 25, false)]);
        let Ok(Message::Relation(r)) = pgoutput::parse(&rel) else { panic!() };
        c.refresh(r);
        let e = c.insert(10, &tuple(&[Some("1"), Some("lamp")]), None).unwrap();
        assert_eq!(e.after.unwrap().into_value(), json!({"id": 1, "slug": "lamp"}));
    }

    #[test]
    fn bad_values_are_undecodable_with_a_rendering() {
        let c = cache(b'd');
        let err = c.insert(10, &tuple(&[Some("4x"), Some("1"), Some("n"), Some("t")]), None).unwrap_err();
        assert!(err.reason.contains("column \"id\" of public.items: \"4x\" is not an integer"), "{}", err.reason);
        assert_eq!(err.rendering.unwrap()["after"]["id"], json!("4x"));
        let err = c.insert(10, &vec![Datum::Text(vec![0xff]); 4], None).unwrap_err();
        assert!(err.reason.contains("not valid UTF-8"));
        let err = c.insert(99, &tuple(&[Some("1")]), None).unwrap_err();
        assert!(err.reason.contains("relation 99"));
        let err = c.insert(10, &tuple(&[Some("1")]), None).unwrap_err();
        assert!(err.reason.contains("1 columns"), "{}", err.reason);
    }

    #[test]
    fn the_debezium_rendering_decodes_back_to_the_same_event() {
        let c = cache(b'f');
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_micros(1_700_000_000_123_456);
        let old = OldTuple::Full(tuple(&[Some("1"), Some("2.50"), Some("a"), Some("t")]));
        let e =
            c.update(10, Some(&old), &tuple(&[Some("1"), Some("3.00"), Some("\u{0}u"), Some("f")]), Some(at)).unwrap();
        let json = debezium_json(&e, "public", "items", Some(77)).to_string();
        let back = crate::source::debezium::decode("", None, Some(json.as_bytes())).unwrap();
        // The rendering names the change's LSN as Debezium does (`source.lsn`), which decodes back.
        assert_eq!(back, crate::event::Decoded::Change(ChangeEvent { lsn: Some(77), ..e }));
    }
}
