//! The one change-event type every source decodes into.
//!
//! A source (Debezium over Kafka, PostgreSQL logical replication) turns its wire format into a
//! [`Decoded`] value; the rules engine is a pure function from a [`ChangeEvent`] to the set of
//! keys, tags, surrogate keys and URLs to invalidate; sinks never see source formats.

use std::cell::RefCell;
use std::cmp::Ordering;
use std::fmt;
use std::ops::Index;
use std::sync::Arc;
use std::time::SystemTime;

use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// A row image: column name to value.
///
/// Values keep their JSON shape (numbers, strings, booleans, null). Sources normalise
/// database-specific encodings before they get here (a Connect Decimal becomes a decimal string,
/// a PostgreSQL numeric too), so one rules file renders the same keys from either source.
///
/// A column that is *absent* is unknown (an unchanged TOASTed value, a key-only before image);
/// a column that is present with `null` is known to be null. Neither can render a template.
///
/// It behaves as the `serde_json::Map` it replaces (a `BTreeMap`): iteration, serialisation,
/// `explain` output and dead letters are in column-name order, a name appears once, and an
/// insert of a present name replaces its value. It is held as one vector of entries kept sorted
/// by name (issue 12, item 2): a row is built with one allocation and one sort
/// ([`Row::from_entries`]), looked up by binary search (a scan up to `LINEAR_SEARCH` columns),
/// and freed without a B-tree's nodes.
/// Column names are shared [`Name`]s: the decoders take them from a small per-thread cache
/// ([`intern`]), so the rows of a table do not allocate (nor free) a name each.
///
/// A row is the whole image as the source sent it, unless it says it was decoded for a
/// projection ([`Row::projection`]): the Kafka source decodes only the columns the running
/// rules read (issue 12, item 2), and such a row holds those (as the whole image has them)
/// and perhaps a few others, nothing more.
#[derive(Clone, Default, PartialEq)]
pub struct Row {
    /// Sorted by name (as `str`s compare, a `BTreeMap<String, _>`'s order), names unique.
    entries: Vec<(Name, Value)>,
    /// `None` for a whole image; else the projection it was decoded for: it holds every
    /// column that projection's rules read, with the value (or absence) the whole image has,
    /// and perhaps others, but not all (`crate::rules::Projection`).
    projection: Option<ProjectionId>,
}

/// Which rules' projection (`crate::rules::Projection`) a [`Row`] was decoded for: one number
/// per rules load in the process, never reused, so a row decoded for other rules than the
/// running ones is told apart by one comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProjectionId(std::num::NonZeroU64);

impl ProjectionId {
    /// A number no other projection of this process has.
    pub fn unique() -> ProjectionId {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Starts at 1 and would take centuries of reloads a nanosecond apart to wrap.
        ProjectionId(std::num::NonZeroU64::new(n).unwrap_or(std::num::NonZeroU64::MIN))
    }
}

/// A column name, shared between the rows that hold it.
pub type Name = Arc<str>;

/// Names up to this long are cached by [`intern`].
const INTERNED_LEN: usize = 64;
/// Slots in [`intern`]'s per-thread cache (a name per slot, the last one met).
const INTERNED_SLOTS: usize = 256;

/// `name` as a shared [`Name`]: the one last made for it on this thread, when it is still in
/// the cache (a direct-mapped table of `INTERNED_SLOTS` names of at most `INTERNED_LEN`
/// bytes, so it never holds more than 16 KiB per thread), or a new one put there.
pub fn intern(name: &str) -> Name {
    thread_local! {
        static NAMES: RefCell<Vec<Option<Name>>> = const { RefCell::new(Vec::new()) };
    }
    if name.len() > INTERNED_LEN {
        return Name::from(name);
    }
    NAMES
        .try_with(|names| {
            let mut names = names.borrow_mut();
            if names.is_empty() {
                names.resize(INTERNED_SLOTS, None);
            }
            let slot = &mut names[slot_of(name.as_bytes())];
            match slot {
                Some(known) if **known == *name => known.clone(),
                _ => slot.insert(Name::from(name)).clone(),
            }
        })
        .unwrap_or_else(|_| Name::from(name))
}

/// The name's slot: its FNV-1a, folded.
fn slot_of(name: &[u8]) -> usize {
    let hash = crate::fnv::hash(name);
    ((hash ^ (hash >> 32)) as usize) % INTERNED_SLOTS
}

impl Row {
    pub fn new() -> Row {
        Row { entries: Vec::new(), projection: None }
    }

    pub fn with_capacity(capacity: usize) -> Row {
        Row { entries: Vec::with_capacity(capacity), projection: None }
    }

    /// `None` for a whole image; else the projection it was decoded for (see [`Row`]).
    pub fn projection(&self) -> Option<ProjectionId> {
        self.projection
    }

    /// Says the row holds only the columns `projection` keeps (a decoder's word).
    pub(crate) fn decoded_for(mut self, projection: ProjectionId) -> Row {
        self.projection = Some(projection);
        self
    }

    /// The row of `entries` in any order: sorted once (O(n log n); nothing to do when already
    /// in order), and of duplicate names the **last** kept, as serde_json's map keeps it.
    pub fn from_entries(entries: Vec<(String, Value)>) -> Row {
        Row::from_names(entries.into_iter().map(|(name, value)| (intern(&name), value)).collect())
    }

    /// [`Row::from_entries`] of names already shared.
    pub fn from_names(mut entries: Vec<(Name, Value)>) -> Row {
        if !entries.is_sorted_by(|a, b| compare(&a.0, &b.0) == Ordering::Less) {
            // Stable: equal names keep their order, so the last of them is the last one given.
            entries.sort_by(|a, b| compare(&a.0, &b.0));
            // `dedup_by` drops the later of two equal neighbours; the later value is moved into
            // the one kept first, so a run of equal names ends holding the last value.
            entries.dedup_by(|later, kept| {
                let same = compare(&later.0, &kept.0) == Ordering::Equal;
                if same {
                    std::mem::swap(&mut later.1, &mut kept.1);
                }
                same
            });
        }
        Row { entries, projection: None }
    }

    fn find<Q>(&self, name: &Q) -> Result<usize, usize>
    where
        Q: AsRef<str> + ?Sized,
    {
        let name = name.as_ref();
        if self.entries.len() > LINEAR_SEARCH {
            return self.entries.binary_search_by(|(column, _)| compare(column, name));
        }
        // A usual row: a scan that mostly looks at first bytes is cheaper than halving.
        for (at, (column, _)) in self.entries.iter().enumerate() {
            match compare(column, name) {
                Ordering::Less => {}
                Ordering::Equal => return Ok(at),
                Ordering::Greater => return Err(at),
            }
        }
        Err(self.entries.len())
    }

    pub fn get<Q>(&self, name: &Q) -> Option<&Value>
    where
        Q: AsRef<str> + ?Sized,
    {
        self.find(name).ok().map(|at| &self.entries[at].1)
    }

    pub fn get_mut<Q>(&mut self, name: &Q) -> Option<&mut Value>
    where
        Q: AsRef<str> + ?Sized,
    {
        self.find(name).ok().map(|at| &mut self.entries[at].1)
    }

    pub fn contains_key<Q>(&self, name: &Q) -> bool
    where
        Q: AsRef<str> + ?Sized,
    {
        self.find(name).is_ok()
    }

    /// Sets column `name`; its previous value, if it was present (the name kept is the one
    /// already there, as in a `BTreeMap`).
    pub fn insert(&mut self, name: String, value: Value) -> Option<Value> {
        self.insert_name(intern(&name), value)
    }

    /// [`Row::insert`] of a name already shared.
    pub fn insert_name(&mut self, name: Name, value: Value) -> Option<Value> {
        match self.find(&*name) {
            Ok(at) => Some(std::mem::replace(&mut self.entries[at].1, value)),
            Err(at) => {
                self.entries.insert(at, (name, value));
                None
            }
        }
    }

    pub fn remove<Q>(&mut self, name: &Q) -> Option<Value>
    where
        Q: AsRef<str> + ?Sized,
    {
        self.remove_entry(name).map(|(_, value)| value)
    }

    pub fn remove_entry<Q>(&mut self, name: &Q) -> Option<(String, Value)>
    where
        Q: AsRef<str> + ?Sized,
    {
        self.find(name).ok().map(|at| self.entries.remove(at)).map(|(name, value)| (String::from(&*name), value))
    }

    /// Keeps the columns for which `keep` is true (in order, as `BTreeMap::retain`).
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &mut Value) -> bool) {
        self.entries.retain_mut(|(name, value)| keep(name, value));
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The columns in name order.
    pub fn iter(&self) -> Iter<'_> {
        Iter(self.entries.iter())
    }

    pub fn iter_mut(&mut self) -> IterMut<'_> {
        IterMut(self.entries.iter_mut())
    }

    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &str> + ExactSizeIterator + '_ {
        self.entries.iter().map(|(name, _)| &**name)
    }

    /// The columns in name order, with their shared names.
    pub fn iter_names(&self) -> impl DoubleEndedIterator<Item = (&Name, &Value)> + ExactSizeIterator + '_ {
        self.entries.iter().map(|(name, value)| (name, value))
    }

    pub fn values(&self) -> impl DoubleEndedIterator<Item = &Value> + ExactSizeIterator + '_ {
        self.entries.iter().map(|(_, value)| value)
    }

    pub fn values_mut(&mut self) -> impl DoubleEndedIterator<Item = &mut Value> + ExactSizeIterator + '_ {
        self.entries.iter_mut().map(|(_, value)| value)
    }

    /// The same columns as a `serde_json::Map` (for a `Value::Object`).
    pub fn into_map(self) -> Map<String, Value> {
        // In order and unique: the map's own `FromIterator`.
        self.into_iter().collect()
    }

    /// The row as a JSON object value.
    pub fn into_value(self) -> Value {
        Value::Object(self.into_map())
    }
}

/// Rows up to this wide are searched from the start, wider ones by halving.
const LINEAR_SEARCH: usize = 8;

/// `a.cmp(b)` (the order of `str`s, byte by byte), deciding on the first bytes when they
/// differ, as a row's names mostly do, before it calls on `memcmp`.
#[inline]
fn compare(a: &str, b: &str) -> Ordering {
    match (a.as_bytes().first(), b.as_bytes().first()) {
        (Some(x), Some(y)) if x != y => x.cmp(y),
        _ => a.cmp(b),
    }
}

impl fmt::Debug for Row {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<Q> Index<&Q> for Row
where
    Q: AsRef<str> + ?Sized,
{
    type Output = Value;

    /// The value of a column that must be present (panics otherwise, as the map did).
    fn index(&self, name: &Q) -> &Value {
        self.get(name).expect("no such column in the row")
    }
}

/// The columns of a row, by reference, in name order.
#[derive(Clone, Debug)]
pub struct Iter<'a>(std::slice::Iter<'a, (Name, Value)>);

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a str, &'a Value);

    fn next(&mut self) -> Option<Self::Item> {
        self.0.next().map(|(name, value)| (&**name, value))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl DoubleEndedIterator for Iter<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.0.next_back().map(|(name, value)| (&**name, value))
    }
}

impl ExactSizeIterator for Iter<'_> {}

/// The columns of a row, values mutable, in name order.
#[derive(Debug)]
pub struct IterMut<'a>(std::slice::IterMut<'a, (Name, Value)>);

impl<'a> Iterator for IterMut<'a> {
    type Item = (&'a str, &'a mut Value);

    fn next(&mut self) -> Option<Self::Item> {
        self.0.next().map(|(name, value)| (&**name, value))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl DoubleEndedIterator for IterMut<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.0.next_back().map(|(name, value)| (&**name, value))
    }
}

impl ExactSizeIterator for IterMut<'_> {}

impl<'a> IntoIterator for &'a Row {
    type Item = (&'a str, &'a Value);
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

impl<'a> IntoIterator for &'a mut Row {
    type Item = (&'a str, &'a mut Value);
    type IntoIter = IterMut<'a>;

    fn into_iter(self) -> IterMut<'a> {
        self.iter_mut()
    }
}

impl IntoIterator for Row {
    type Item = (String, Value);
    type IntoIter = std::iter::Map<std::vec::IntoIter<(Name, Value)>, fn((Name, Value)) -> (String, Value)>;

    /// The columns in name order (each name a `String` of its own).
    fn into_iter(self) -> Self::IntoIter {
        self.entries.into_iter().map(|(name, value)| (String::from(&*name), value))
    }
}

impl FromIterator<(String, Value)> for Row {
    /// Of duplicate names the last wins, as in serde_json's map.
    fn from_iter<I: IntoIterator<Item = (String, Value)>>(iter: I) -> Row {
        Row::from_entries(iter.into_iter().collect())
    }
}

impl Extend<(String, Value)> for Row {
    /// As inserting each in turn: a later value of a name replaces an earlier one.
    fn extend<I: IntoIterator<Item = (String, Value)>>(&mut self, iter: I) {
        let mut entries = std::mem::take(&mut self.entries);
        entries.extend(iter.into_iter().map(|(name, value)| (intern(&name), value)));
        let projection = self.projection;
        *self = Row { projection, ..Row::from_names(entries) };
    }
}

impl From<Map<String, Value>> for Row {
    fn from(map: Map<String, Value>) -> Row {
        // A `BTreeMap`'s order, names unique: nothing to sort.
        Row { entries: map.into_iter().map(|(name, value)| (intern(&name), value)).collect(), projection: None }
    }
}

impl From<Row> for Map<String, Value> {
    fn from(row: Row) -> Map<String, Value> {
        row.into_map()
    }
}

impl From<Row> for Value {
    fn from(row: Row) -> Value {
        row.into_value()
    }
}

impl Serialize for Row {
    /// A JSON object, columns in name order: the text the map wrote.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.entries.len()))?;
        for (name, value) in &self.entries {
            map.serialize_entry(&**name, value)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Row {
    /// A JSON object, read as serde_json's map reads it.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Row, D::Error> {
        Map::<String, Value>::deserialize(deserializer).map(Row::from)
    }
}

/// What happened to the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    Insert,
    Update,
    Delete,
    /// A snapshot read (Debezium `op: r`): the row existed when the connector started.
    Snapshot,
    /// Every row of the table went at once; no row images.
    Truncate,
}

impl Op {
    /// The spelling used in rules files, `explain` output and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Snapshot => "snapshot",
            Op::Truncate => "truncate",
        }
    }

    /// Parses the rules-file spelling.
    pub fn parse(s: &str) -> Option<Op> {
        Some(match s {
            "insert" => Op::Insert,
            "update" => Op::Update,
            "delete" => Op::Delete,
            "snapshot" => Op::Snapshot,
            "truncate" => Op::Truncate,
            _ => return None,
        })
    }

    pub const ALL: [Op; 5] = [Op::Insert, Op::Update, Op::Delete, Op::Snapshot, Op::Truncate];
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One changed row (or one truncated table).
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeEvent {
    /// `schema.table` (PostgreSQL, SQL Server) or `db.table` (MySQL/MariaDB).
    pub table: String,
    pub op: Op,
    /// The row before the change: present for updates and deletes when the database logs it
    /// (PostgreSQL REPLICA IDENTITY DEFAULT logs only the key columns, or nothing for an update
    /// that leaves the key alone).
    pub before: Option<Row>,
    /// The row after the change: present for inserts, updates and snapshot reads.
    pub after: Option<Row>,
    /// When the database committed the change: the origin of every staleness figure.
    /// `None` when the source does not say; the pipeline then falls back to the time the
    /// message was written to the log (Kafka timestamp) or received.
    pub committed_at: Option<SystemTime>,
    /// The change's position in the PostgreSQL WAL as Debezium's PostgreSQL connector writes
    /// it (`source.lsn`), whatever the encoding (JSON, Avro, Protobuf): what a second pass
    /// waits for read replicas to replay (`freshness`). `None` for other connectors and
    /// sources (the PostgreSQL source keeps its commit LSN in the event's position).
    pub lsn: Option<u64>,
}

impl ChangeEvent {
    /// The row images a template is rendered against, per the contract: `after` for inserts
    /// and snapshot reads, `before` for deletes, both for updates. Truncates have none.
    pub fn images(&self) -> impl Iterator<Item = &Row> {
        let (first, second) = match self.op {
            Op::Insert | Op::Snapshot => (self.after.as_ref(), None),
            Op::Delete => (self.before.as_ref(), None),
            Op::Update => (self.before.as_ref(), self.after.as_ref()),
            Op::Truncate => (None, None),
        };
        first.into_iter().chain(second)
    }
}

/// What one source message turned out to be.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    /// A row change (or truncate) to run through the rules.
    Change(ChangeEvent),
    /// A message that carries no row change: a tombstone, a heartbeat, a schema-change or
    /// transaction-boundary record. Nothing is invalidated, but it proves the source is alive
    /// and its position must still be acknowledged.
    NoChange(NoChange),
}

#[derive(Debug, Clone, PartialEq)]
pub struct NoChange {
    pub kind: NoChangeKind,
    /// The table it concerns, when known (a tombstone's topic names one).
    pub table: Option<String>,
    /// When the source produced it (a heartbeat's `ts_ms`), for liveness metrics.
    pub at: Option<SystemTime>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoChangeKind {
    Tombstone,
    Heartbeat,
    /// Debezium `op: m` messages, schema-change and transaction metadata records.
    Other,
}

impl NoChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            NoChangeKind::Tombstone => "tombstone",
            NoChangeKind::Heartbeat => "heartbeat",
            NoChangeKind::Other => "other",
        }
    }
}

#[cfg(test)]
mod row_tests {
    //! [`Row`] against the `serde_json::Map` it replaced: the same answers, the same order, the
    //! same text.

    use serde_json::{json, Map, Value};

    use super::Row;

    type Json = Map<String, Value>;

    /// Names that sort in ways a careless comparison gets wrong, and names serde_json gives a
    /// meaning elsewhere (a map must treat them as any other).
    const ODD: [&str; 14] = [
        "",
        "a",
        "A",
        "ab",
        "a\u{0}",
        "é",
        "ß",
        "z",
        "10",
        "9",
        "\u{1F600}",
        "$serde_json::private::Number",
        "$serde_json::private::RawValue",
        " id",
    ];

    fn same(row: &Row, map: &Json) {
        assert_eq!(row.len(), map.len());
        assert_eq!(row.is_empty(), map.is_empty());
        assert!(row.iter().eq(map.iter().map(|(k, v)| (k.as_str(), v))), "iteration order: {row:?} / {map:?}");
        assert!(row.keys().eq(map.keys().map(String::as_str)));
        assert!(row.values().eq(map.values()));
        assert_eq!(serde_json::to_string(row).unwrap(), serde_json::to_string(map).unwrap());
        assert_eq!(serde_json::to_string_pretty(row).unwrap(), serde_json::to_string_pretty(map).unwrap());
        assert_eq!(serde_json::to_value(row).unwrap(), Value::Object(map.clone()));
        assert_eq!(format!("{row:?}"), format!("{map:?}"));
        assert_eq!(row.clone().into_value(), Value::Object(map.clone()));
        assert_eq!(&Row::from(map.clone()), row);
        for name in ODD {
            assert_eq!(row.get(name), map.get(name), "{name:?}");
            assert_eq!(row.contains_key(name), map.contains_key(name), "{name:?}");
        }
    }

    #[test]
    fn built_in_one_sort_as_by_inserts_the_last_duplicate_winning() {
        let mut entries = Vec::new();
        let mut map = Json::new();
        for (i, name) in ODD.iter().chain(ODD.iter().rev()).chain(["a", "", "z", "a"].iter()).enumerate() {
            entries.push((name.to_string(), Value::from(i)));
            map.insert(name.to_string(), Value::from(i));
        }
        let row = Row::from_entries(entries.clone());
        same(&row, &map);
        assert_eq!(row["a"], json!(entries.len() - 1), "the last `a`");
        assert_eq!(entries.iter().cloned().collect::<Row>(), row);

        let mut extended = Row::new();
        extended.insert("a".into(), json!("first"));
        extended.insert("b".into(), json!("kept"));
        extended.extend(entries);
        let mut expected = map.clone();
        expected.insert("b".into(), json!("kept"));
        same(&extended, &expected);
        assert_eq!(extended["b"], "kept");
    }

    #[test]
    fn sorted_input_and_empty_rows() {
        same(&Row::from_entries(Vec::new()), &Json::new());
        same(&Row::new(), &Json::new());
        same(&Row::default(), &Json::new());
        let sorted: Vec<(String, Value)> = ["a", "b", "c"].iter().map(|n| (n.to_string(), json!(n))).collect();
        same(&Row::from_entries(sorted.clone()), &sorted.into_iter().collect());
        // Sorted but for a duplicate: still the last one.
        let row = Row::from_entries(vec![("a".into(), json!(1)), ("a".into(), json!(2)), ("b".into(), json!(3))]);
        assert_eq!(row.into_value(), json!({"a": 2, "b": 3}));
    }

    #[test]
    fn inserts_removes_and_retains_as_the_map_does() {
        // A fixed pseudo-random walk over a few names; every answer compared.
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut row = Row::new();
        let mut map = Json::new();
        for step in 0..4_000 {
            let name = ODD[(next() % ODD.len() as u64) as usize].to_owned();
            match next() % 10 {
                0..=4 => assert_eq!(row.insert(name.clone(), json!(step)), map.insert(name, json!(step))),
                5..=6 => assert_eq!(row.remove(&name), map.remove(&name)),
                7 => assert_eq!(row.remove_entry(name.as_str()), map.remove_entry(name.as_str())),
                8 => {
                    if let (Some(r), Some(m)) = (row.get_mut(&name), map.get_mut(&name)) {
                        *r = json!([step]);
                        *m = json!([step]);
                    } else {
                        assert_eq!(row.get_mut(&name).is_none(), map.get_mut(&name).is_none());
                    }
                }
                _ => {
                    let keep = |n: &str, v: &mut Value| {
                        !(n.len().is_multiple_of(2) && v.as_u64().is_some_and(|k| k.is_multiple_of(3)))
                    };
                    row.retain(keep);
                    map.retain(|n, v| keep(n, v));
                }
            }
            same(&row, &map);
        }
        let owned: Vec<(String, Value)> = row.clone().into_iter().collect();
        assert_eq!(owned, map.clone().into_iter().collect::<Vec<_>>());
        for (_, value) in &mut row {
            *value = Value::Null;
        }
        row.values_mut().for_each(|v| *v = json!(true));
        assert!(row.values().all(|v| *v == json!(true)));
        row.clear();
        assert!(row.is_empty());
    }

    #[test]
    fn read_as_the_map_reads_it() {
        for text in [
            r#"{}"#,
            r#"{"b":1,"a":"x","a":null,"":[1,{"z":2}]}"#,
            r#"{"n":1E5,"m":-0,"big":123456789012345678901234567890,"d":1.50}"#,
            r#"{"$serde_json::private::Number":"12"}"#,
            r#"{"x":1,"$serde_json::private::Number":"12"}"#,
            r#"{"$serde_json::private::RawValue":"12"}"#,
            r#"{"é":1,"e":2,"\u00e9\ud83d\ude00":3}"#,
            r#"[1]"#,
            r#""text""#,
            r#"{"a":1"#,
        ] {
            let row = serde_json::from_str::<Row>(text).map_err(|e| e.to_string());
            let map = serde_json::from_str::<Json>(text).map_err(|e| e.to_string());
            match (&row, &map) {
                (Ok(row), Ok(map)) => same(row, map),
                _ => assert_eq!(row.map(Row::into_value), map.map(Value::Object), "{text}"),
            }
        }
    }

    #[test]
    fn names_are_shared_and_stay_themselves() {
        use std::sync::Arc;

        let a = super::intern("category_id");
        assert!(Arc::ptr_eq(&a, &super::intern("category_id")), "cached");
        // Many more names than slots: every one still comes back as itself.
        let names: Vec<String> = (0..2_000).map(|i| format!("column_{i}")).collect();
        for name in names.iter().chain(&names) {
            assert_eq!(&*super::intern(name), name.as_str());
        }
        let long = "x".repeat(super::INTERNED_LEN + 1);
        assert_eq!(&*super::intern(&long), long.as_str());
        for name in ODD {
            assert_eq!(&*super::intern(name), name);
        }
    }

    #[test]
    fn names_compare_as_strs_do() {
        for a in ODD {
            for b in ODD {
                assert_eq!(super::compare(a, b), a.cmp(b), "{a:?} {b:?}");
            }
        }
    }

    #[test]
    fn wide_rows_in_any_order() {
        let n = 1_000;
        let entries: Vec<(String, Value)> = (0..n).rev().map(|i| (format!("c{i}"), json!(i))).collect();
        let map: Json = entries.iter().cloned().collect();
        let row = Row::from_entries(entries);
        same(&row, &map);
        for i in 0..n {
            assert_eq!(row.get(format!("c{i}").as_str()), Some(&json!(i)));
        }
    }
}
