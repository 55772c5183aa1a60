//! The pgoutput wire format (protocol version 1), parsed from the bytes of one XLogData
//! message. Begin and Commit are parsed by the replication client already; everything else
//! arrives here.
//!
//! Pure parsing: no allocation beyond the values it returns, no panics on any input (every
//! read is bounds-checked and a short or inconsistent message is a [`ParseError`]).

use std::fmt;

/// One pgoutput message this source cares about.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Relation(Relation),
    Insert {
        relation: u32,
        new: Tuple,
    },
    Update {
        relation: u32,
        old: Option<OldTuple>,
        new: Tuple,
    },
    Delete {
        relation: u32,
        old: OldTuple,
    },
    Truncate {
        relations: Vec<u32>,
    },
    /// Begin, Commit, Origin, Type, logical decoding messages: nothing to decode here.
    Other(u8),
}

/// A Relation message: the table's name and columns, sent before the first change of a table
/// in a session and again whenever its definition changed.
#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// `d` default (primary key), `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    /// Part of the replica identity (the key columns logged in old-key images).
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
}

/// The old row of an update or delete.
#[derive(Debug, Clone, PartialEq)]
pub enum OldTuple {
    /// `K`: the replica identity columns only (the others are sent as null and mean nothing).
    Key(Tuple),
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    Full(Tuple),
}

/// One row image, column by column in the relation's order.
pub type Tuple = Vec<Datum>;

#[derive(Debug, Clone, PartialEq)]
pub enum Datum {
    Null,
    /// An unchanged TOASTed value the server did not send: unknown.
    UnchangedToast,
    /// The value in the type's text output format.
    Text(Vec<u8>),
    /// The binary format (never requested by this source).
    Binary(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(pub String);

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed pgoutput message: {}", self.0)
    }
}

impl std::error::Error for ParseError {}

/// A bounds-checked reader over one message.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], ParseError> {
        if self.buf.len() < n {
            return Err(ParseError(format!("{what}: needs {n} bytes, {} left", self.buf.len())));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &str) -> Result<u8, ParseError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16, ParseError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &str) -> Result<u32, ParseError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn string(&mut self, what: &str) -> Result<String, ParseError> {
        let end = self.buf.iter().position(|&b| b == 0).ok_or_else(|| ParseError(format!("{what}: no terminator")))?;
        let s = std::str::from_utf8(&self.buf[..end]).map_err(|_| ParseError(format!("{what}: not UTF-8")))?;
        self.buf = &self.buf[end + 1..];
        Ok(s.to_owned())
    }

    fn tuple(&mut self) -> Result<Tuple, ParseError> {
        let n = self.u16("tuple column count")? as usize;
        // Each column takes at least one byte: a count larger than what is left is a lie.
        if n > self.buf.len() {
            return Err(ParseError(format!("tuple claims {n} columns in {} bytes", self.buf.len())));
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(match self.u8("column kind")? {
                b'n' => Datum::Null,
                b'u' => Datum::UnchangedToast,
                kind @ (b't' | b'b') => {
                    let len = self.u32("value length")? as usize;
                    let bytes = self.take(len, "value")?.to_vec();
                    if kind == b't' {
                        Datum::Text(bytes)
                    } else {
                        Datum::Binary(bytes)
                    }
                }
                other => return Err(ParseError(format!("unknown column kind {:?}", other as char))),
            });
        }
        Ok(out)
    }
}

/// Parses one pgoutput message.
pub fn parse(data: &[u8]) -> Result<Message, ParseError> {
    let mut r = Reader { buf: data };
    let tag = r.u8("message tag")?;
    let msg = match tag {
        b'R' => {
            let oid = r.u32("relation oid")?;
            let schema = r.string("namespace")?;
            let name = r.string("relation name")?;
            let replica_identity = r.u8("replica identity")?;
            let n = r.u16("column count")? as usize;
            let mut columns = Vec::with_capacity(n.min(1600));
            for _ in 0..n {
                let flags = r.u8("column flags")?;
                let name = r.string("column name")?;
                let type_oid = r.u32("column type")?;
                let _typmod = r.u32("column type modifier")?;
                columns.push(Column { key: flags & 1 == 1, name, type_oid });
            }
            Message::Relation(Relation { oid, schema, name, replica_identity, columns })
        }
        b'I' => {
            let relation = r.u32("relation oid")?;
            match r.u8("tuple kind")? {
                b'N' => Message::Insert { relation, new: r.tuple()? },
                other => return Err(ParseError(format!("insert: expected N, got {:?}", other as char))),
            }
        }
        b'U' => {
            let relation = r.u32("relation oid")?;
            let (old, new) = match r.u8("tuple kind")? {
                b'K' => {
                    let old = OldTuple::Key(r.tuple()?);
                    (Some(old), expect_new(&mut r)?)
                }
                b'O' => {
                    let old = OldTuple::Full(r.tuple()?);
                    (Some(old), expect_new(&mut r)?)
                }
                b'N' => (None, r.tuple()?),
                other => return Err(ParseError(format!("update: unexpected tuple kind {:?}", other as char))),
            };
            Message::Update { relation, old, new }
        }
        b'D' => {
            let relation = r.u32("relation oid")?;
            let old = match r.u8("tuple kind")? {
                b'K' => OldTuple::Key(r.tuple()?),
                b'O' => OldTuple::Full(r.tuple()?),
                other => return Err(ParseError(format!("delete: unexpected tuple kind {:?}", other as char))),
            };
            Message::Delete { relation, old }
        }
        b'T' => {
            let n = r.u32("relation count")? as usize;
            let _options = r.u8("truncate options")?;
            if n.saturating_mul(4) > r.buf.len() {
                return Err(ParseError(format!("truncate claims {n} relations in {} bytes", r.buf.len())));
            }
            let mut relations = Vec::with_capacity(n);
            for _ in 0..n {
                relations.push(r.u32("relation oid")?);
            }
            Message::Truncate { relations }
        }
        other => Message::Other(other),
    };
    Ok(msg)
}

fn expect_new(r: &mut Reader<'_>) -> Result<Tuple, ParseError> {
    match r.u8("tuple kind")? {
        b'N' => r.tuple(),
        other => Err(ParseError(format!("update: expected the new tuple (N), got {:?}", other as char))),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds pgoutput messages for tests.
    #[derive(Default)]
    pub(crate) struct Builder(pub Vec<u8>);

    impl Builder {
        pub fn tag(mut self, t: u8) -> Self {
            self.0.push(t);
            self
        }
        pub fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        pub fn u16(mut self, v: u16) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub fn u32(mut self, v: u32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub fn str(mut self, s: &str) -> Self {
            self.0.extend_from_slice(s.as_bytes());
            self.0.push(0);
            self
        }
        /// A tuple: `None` null, `Some("\u{0}u")` unchanged TOAST, else text.
        pub fn tuple(mut self, values: &[Option<&str>]) -> Self {
            self = self.u16(values.len() as u16);
            for v in values {
                match v {
                    None => self.0.push(b'n'),
                    Some("\u{0}u") => self.0.push(b'u'),
                    Some(t) => {
                        self.0.push(b't');
                        self = self.u32(t.len() as u32);
                        self.0.extend_from_slice(t.as_bytes());
                    }
                }
            }
            self
        }
        /// A Relation message; columns are (name, type oid, key).
        pub fn relation(oid: u32, schema: &str, name: &str, ident: u8, cols: &[(&str, u32, bool)]) -> Vec<u8> {
            let mut b = Builder::default().tag(b'R').u32(oid).str(schema).str(name).u8(ident).u16(cols.len() as u16);
            for (n, t, k) in cols {
                b = b.u8(*k as u8).str(n).u32(*t).u32(u32::MAX);
            }
            b.0
        }
    }

    #[test]
    fn relation_and_changes() {
        let rel = Builder::relation(16384, "public", "items", b'd', &[("id", 23, true), ("name", 25, false)]);
        let Message::Relation(r) = parse(&rel).unwrap() else { panic!() };
        assert_eq!((r.oid, r.schema.as_str(), r.name.as_str()), (16384, "public", "items"));
        assert!(r.columns[0].key && !r.columns[1].key);

        let ins = Builder::default().tag(b'I').u32(16384).u8(b'N').tuple(&[Some("1"), None]).0;
        assert_eq!(
            parse(&ins).unwrap(),
            Message::Insert { relation: 16384, new: vec![Datum::Text(b"1".to_vec()), Datum::Null] }
        );
        let upd = Builder::default()
            .tag(b'U')
            .u32(16384)
            .u8(b'K')
            .tuple(&[Some("1"), None])
            .u8(b'N')
            .tuple(&[Some("2"), Some("\u{0}u")])
            .0;
        let Message::Update { old: Some(OldTuple::Key(old)), new, .. } = parse(&upd).unwrap() else { panic!() };
        assert_eq!(old[0], Datum::Text(b"1".to_vec()));
        assert_eq!(new[1], Datum::UnchangedToast);
        let del = Builder::default().tag(b'D').u32(7).u8(b'O').tuple(&[Some("1"), Some("x")]).0;
        assert!(matches!(parse(&del).unwrap(), Message::Delete { relation: 7, old: OldTuple::Full(_) }));
        let tr = Builder::default().tag(b'T').u32(2).u8(0).u32(5).u32(6).0;
        assert_eq!(parse(&tr).unwrap(), Message::Truncate { relations: vec![5, 6] });
        assert_eq!(parse(b"Yxyz").unwrap(), Message::Other(b'Y'));
    }

    #[test]
    fn every_truncation_of_a_message_is_an_error_not_a_panic() {
        let upd = Builder::default()
            .tag(b'U')
            .u32(1)
            .u8(b'O')
            .tuple(&[Some("1"), None])
            .u8(b'N')
            .tuple(&[Some("22"), Some("abc")])
            .0;
        let rel = Builder::relation(1, "s", "t", b'f', &[("a", 23, true)]);
        for msg in [upd, rel] {
            for cut in 0..msg.len() {
                assert!(parse(&msg[..cut]).is_err(), "cut at {cut}");
            }
            assert!(parse(&msg).is_ok());
        }
        // Lying counts.
        assert!(parse(&Builder::default().tag(b'I').u32(1).u8(b'N').u16(60000).0).is_err());
        assert!(parse(&Builder::default().tag(b'T').u32(u32::MAX).u8(0).0).is_err());
        assert!(parse(&Builder::default().tag(b'I').u32(1).u8(b'X').0).is_err());
    }

    #[test]
    fn random_bytes_never_panic() {
        use rand::Rng;
        let mut rng = rand::rng();
        for _ in 0..20_000 {
            let len = rng.random_range(0..40);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            if let Some(first) = bytes.first_mut() {
                *first = [b'R', b'I', b'U', b'D', b'T'][rng.random_range(0..5)];
            }
            let _ = parse(&bytes);
        }
    }
}
