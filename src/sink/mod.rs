//! Sinks: where invalidations go.
//!
//! # The sink contract
//!
//! A sink receives one [`Invalidations`] set per batch, already deduplicated across every event
//! of the batch, and must:
//!
//! - **only delete**: UNLINK, purge, ban. A sink never writes a cached value, because a delete is
//!   safe to repeat and a write is not;
//! - **be idempotent**: the same batch may arrive again (after a crash, a rebalance or a
//!   retry), and doing it twice must be harmless;
//! - **retry transient failures itself** (through [`crate::retry`]), for as long as it takes,
//!   until shutdown abandons the work: while its cache is unreachable, `invalidate` simply does
//!   not return, the pipeline's bounded queues fill, and the source stops reading. Nothing is
//!   acknowledged and nothing is dropped;
//! - **say when it is done**: `invalidate` returns `Ok` only once every item is confirmed by the
//!   cache, or permanently rejected (reported in [`SinkReport::rejected`], which the pipeline
//!   dead-letters). Only then may the source position move past the batch's events.
//!
//! Delivery is therefore at-least-once; idempotent deletes make it effectively-once.

use std::fmt;

use async_trait::async_trait;

use crate::shutdown::Shutdown;

pub mod config;
pub mod origins;

// The kinds of sink: one line each (`sinks.<field>`, its module, its section type).
config::sink_sections! {
    /// One Redis target, or a list of named ones (`src/sink/redis/config.rs`).
    redis: Option<redis::config::RedisTargets>,
    /// HTTP caches and CDNs, each named (docs/cdn.md).
    cdn: Vec<cdn::CdnSinkConfig>,
}

pub use origins::Origins;

/// What one batch asks of the sinks: one deduplicated list per [`ItemKind`]. Each sink takes
/// the kinds it serves (Redis: keys, tags, patterns, generations, dependents; HTTP caches and CDNs: surrogate keys and URLs)
/// and ignores the rest. Indexed by kind, so a new kind is one line in the `item_kinds!`
/// invocation below and nothing here changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Invalidations {
    /// In [`ItemKind::ALL`] order: `lists[kind as usize]`.
    lists: [Vec<String>; ItemKind::COUNT],
    /// Where the items came from, for sinks that ask ([`Sink::wants_origins`]); `None` otherwise.
    origins: Option<std::sync::Arc<Origins>>,
}

impl Invalidations {
    /// A set holding `items` of one kind.
    pub fn of(kind: ItemKind, items: Vec<String>) -> Invalidations {
        Invalidations::default().with(kind, items)
    }

    /// This set with `items` added to the list of `kind` (builder style, for tests and tools).
    pub fn with(mut self, kind: ItemKind, items: Vec<String>) -> Invalidations {
        self.items_mut(kind).extend(items);
        self
    }

    pub fn is_empty(&self) -> bool {
        self.lists.iter().all(Vec::is_empty)
    }

    /// Items of every kind.
    pub fn len(&self) -> usize {
        self.lists.iter().map(Vec::len).sum()
    }

    /// The union of `sets`, each list deduplicated and sorted (how a batch's events, and a
    /// layer's queued batches, become one set).
    pub fn union<'a>(sets: impl IntoIterator<Item = &'a Invalidations>) -> Invalidations {
        let sets: Vec<&Invalidations> = sets.into_iter().collect();
        let mut all = Invalidations::default();
        // Borrowed while deduplicating (only the distinct items are copied), each with its
        // sort key; one buffer for every kind.
        let mut items: Vec<(u128, &str)> = Vec::new();
        for kind in ItemKind::ALL {
            items.clear();
            items.extend(sets.iter().flat_map(|s| s.items(kind)).map(|i| (sort_key(i), i.as_str())));
            if items.is_empty() {
                continue;
            }
            items.sort_unstable_by(bytewise);
            items.dedup_by(|a, b| bytewise(a, b).is_eq());
            *all.items_mut(kind) = items.iter().map(|(_, i)| (*i).to_owned()).collect();
        }
        let with_origins: Vec<&std::sync::Arc<Origins>> = sets.iter().filter_map(|s| s.origins.as_ref()).collect();
        all.origins = match with_origins.as_slice() {
            [] => None,
            [one] => Some((*one).clone()),
            many => Some(std::sync::Arc::new(Origins::merge(many.iter().map(|o| &***o)))),
        };
        all
    }

    /// Moves the items of `lists` (per kind, in [`ItemKind::ALL`] order, the items of several
    /// sets one after the other) into one set, each list sorted and deduplicated as
    /// [`Invalidations::union`] makes it, without copying an item. Also says where each item
    /// went: the `i`-th item given of a kind is at `positions[kind][i]` in the set's list of
    /// that kind (so a sorted list given in one piece has ascending positions). The duplicates
    /// are moved to the end of `duplicates` (whose strings can be reused for their room).
    pub fn gather(
        mut lists: [Vec<String>; ItemKind::COUNT],
        duplicates: &mut Vec<String>,
    ) -> (Invalidations, [Vec<usize>; ItemKind::COUNT]) {
        let mut all = Invalidations::default();
        let mut positions: [Vec<usize>; ItemKind::COUNT] = Default::default();
        // Each item's gather key and place in `given`, sorted; the distinct items are then moved
        // out of `given` in order, and the duplicates left there are dropped. One buffer for
        // every kind.
        let mut order: Vec<(u128, usize)> = Vec::new();
        for ((given, out), at) in lists.iter_mut().zip(all.lists.iter_mut()).zip(positions.iter_mut()) {
            if given.is_empty() {
                continue;
            }
            order.clear();
            order.extend(given.iter().enumerate().map(|(i, item)| (gather_key(item), i)));
            // What the key leaves out of an item (only read when two keys are equal and say
            // the items are longer than the key's bytes).
            let rest =
                |i: usize| given.get(i).and_then(|item| item.as_bytes().get(GATHER_KEY_BYTES..)).unwrap_or_default();
            let spills = |key: u128| (key & 0xff) as usize > GATHER_KEY_BYTES;
            order.sort_unstable_by(|a, b| {
                a.0.cmp(&b.0).then_with(|| match spills(a.0) {
                    true => rest(a.1).cmp(rest(b.1)),
                    false => std::cmp::Ordering::Equal,
                })
            });
            *at = vec![0; given.len()];
            // The place in `given` of each distinct item, in sorted order.
            let mut firsts: Vec<usize> = Vec::new();
            let mut previous: Option<(u128, usize)> = None;
            for &(key, i) in &order {
                let distinct = previous.is_none_or(|(k, p)| k != key || (spills(key) && rest(p) != rest(i)));
                if distinct {
                    firsts.push(i);
                    previous = Some((key, i));
                }
                if let Some(slot) = at.get_mut(i) {
                    *slot = firsts.len().saturating_sub(1);
                }
            }
            *out = firsts.iter().filter_map(|&i| given.get_mut(i).map(std::mem::take)).collect();
            // What is left: the duplicates, and the empty strings the distinct items left behind.
            duplicates.extend(given.drain(..).filter(|item| item.capacity() > 0));
        }
        (all, positions)
    }

    /// Empties every list (keeping its room) and forgets the origins.
    pub fn clear(&mut self) {
        for list in &mut self.lists {
            list.clear();
        }
        self.origins = None;
    }

    /// Where the items came from, when the pipeline gathered it (see [`origins`]).
    pub fn origins(&self) -> Option<&Origins> {
        self.origins.as_deref()
    }

    /// Attaches the items' origins.
    pub fn set_origins(&mut self, origins: Origins) {
        self.origins = Some(std::sync::Arc::new(origins));
    }

    /// Sorts and deduplicates every list.
    pub fn normalize(&mut self) {
        for list in &mut self.lists {
            match list.as_slice() {
                [] | [_] => {}
                // One comparison instead of a sort and a dedup: the usual update renders an item
                // from each image (a tag of the old category and one of the new).
                [a, b] => match a.cmp(b) {
                    std::cmp::Ordering::Less => {}
                    std::cmp::Ordering::Greater => list.swap(0, 1),
                    std::cmp::Ordering::Equal => list.truncate(1),
                },
                _ => {
                    list.sort_unstable();
                    list.dedup();
                }
            }
        }
    }

    /// The items of one kind.
    pub fn items(&self, kind: ItemKind) -> &[String] {
        self.lists.get(kind.index()).map_or(&[], Vec::as_slice)
    }

    /// The list of one kind, to add to.
    pub fn items_mut(&mut self, kind: ItemKind) -> &mut Vec<String> {
        // In range by construction: `item_kinds!` numbers the kinds 0..COUNT.
        &mut self.lists[kind.index()]
    }
}

/// The first [`SORT_KEY_BYTES`] bytes of `item`, big-endian, zero-padded: two items whose keys
/// differ are in the order of their keys (bytewise, as `str` orders them), so sorting compares
/// integers and reads the strings only when the keys are equal.
const SORT_KEY_BYTES: usize = 16;

fn sort_key(item: &str) -> u128 {
    let mut key = [0u8; SORT_KEY_BYTES];
    let n = item.len().min(SORT_KEY_BYTES);
    if let (Some(to), Some(from)) = (key.get_mut(..n), item.as_bytes().get(..n)) {
        to.copy_from_slice(from);
    }
    u128::from_be_bytes(key)
}

/// Bytewise order of two items with their [`sort_key`]s (the order of `str`). Equal keys mean
/// equal first bytes, the shorter item zero-padded: when both fit in the key, the shorter is a
/// prefix of the longer (so it comes first), and of equal lengths they are the same item.
fn bytewise(a: &(u128, &str), b: &(u128, &str)) -> std::cmp::Ordering {
    a.0.cmp(&b.0).then_with(|| {
        if a.1.len() <= SORT_KEY_BYTES && b.1.len() <= SORT_KEY_BYTES {
            a.1.len().cmp(&b.1.len())
        } else {
            a.1.cmp(b.1)
        }
    })
}

/// The bytes of an item in its [`gather_key`] (its last byte holds the length).
const GATHER_KEY_BYTES: usize = 15;
const _: () = assert!(GATHER_KEY_BYTES + 1 == SORT_KEY_BYTES);

/// `item`'s first [`GATHER_KEY_BYTES`] bytes, big-endian and zero-padded, then its length
/// capped at one more than that, in one integer: keys are in the bytewise order of their items
/// (equal padded bytes with a length within the key's bytes means the shorter is a prefix of
/// the longer, so it comes first), and equal keys within the key's bytes are equal items. Only
/// items longer than that with equal keys need their remaining bytes compared. Sorting
/// (key, index) pairs of 32 bytes, compared as integers, measured as a third fewer
/// instructions than sorting [`sort_key`]s with a reference to each item and its index.
fn gather_key(item: &str) -> u128 {
    let mut key = [0u8; SORT_KEY_BYTES];
    let n = item.len().min(GATHER_KEY_BYTES);
    if let (Some(to), Some(from)) = (key.get_mut(..n), item.as_bytes().get(..n)) {
        to.copy_from_slice(from);
    }
    // The last byte (SORT_KEY_BYTES is GATHER_KEY_BYTES + 1): at most 16.
    if let Some(len) = key.last_mut() {
        *len = item.len().min(GATHER_KEY_BYTES + 1) as u8;
    }
    u128::from_be_bytes(key)
}

/// Defines [`ItemKind`] and its list [`ItemKind::ALL`] from one list, so the two cannot drift
/// and every kind's index is below [`ItemKind::COUNT`].
macro_rules! item_kinds {
    ($($(#[$doc:meta])* $variant:ident => $label:literal, $field:literal;)+) => {
        /// The kinds of thing a rule can invalidate; also the `kind` label of invalidation
        /// metrics.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum ItemKind {
            $($(#[$doc])* $variant,)+
        }

        impl ItemKind {
            /// Every kind, in declaration order (the order of [`Invalidations`]' lists).
            pub const ALL: [ItemKind; [$(ItemKind::$variant),+].len()] = [$(ItemKind::$variant),+];

            /// The `kind` label and the word in messages.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(ItemKind::$variant => $label,)+
                }
            }

            /// The name of this kind's list in `explain` output (the contract's field name).
            pub fn field(self) -> &'static str {
                match self {
                    $(ItemKind::$variant => $field,)+
                }
            }
        }
    };
}

item_kinds! {
    /// `redis.keys`: a Redis key, unlinked.
    RedisKey => "key", "redis_keys";
    /// `redis.tags`: a Redis set of keys, each unlinked, then the set.
    RedisTag => "tag", "redis_tags";
    /// `redis.patterns`: a glob; every matching key (SCAN MATCH on every primary) unlinked.
    RedisPattern => "pattern", "redis_patterns";
    /// `redis.generations`: a counter key set to the event's position when that is higher.
    RedisGeneration => "generation", "redis_generations";
    /// `redis.dependents: true`: `key:K`, `tag:T` or `pattern:P`, whose invalidated keys'
    /// dependents (`<dep_prefix>K` sets) are invalidated too (`redis::dependents`).
    RedisDependents => "dependents", "redis_dependents";
    /// `cdn.surrogate_keys`: a surrogate key (cache tag), purged at HTTP caches and CDNs.
    SurrogateKey => "surrogate_key", "surrogate_keys";
    /// `cdn.urls`: an absolute URL, purged at HTTP caches and CDNs.
    Url => "url", "urls";
}

impl ItemKind {
    pub const COUNT: usize = ItemKind::ALL.len();

    /// The position of this kind in [`ItemKind::ALL`] (the enum is numbered in that order).
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// One field per kind (`"redis_keys": [...]`, ...), in [`ItemKind::ALL`] order: `explain`
/// flattens it into its output.
impl serde::Serialize for Invalidations {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(ItemKind::COUNT))?;
        for kind in ItemKind::ALL {
            map.serialize_entry(kind.field(), self.items(kind))?;
        }
        map.end()
    }
}

impl fmt::Display for ItemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One item a sink refused for good (a 400 from a CDN, a key over the provider's size): the
/// pipeline dead-letters every event that asked for it, with this reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub kind: ItemKind,
    /// Index into the batch's list of that kind.
    pub index: usize,
    pub reason: String,
}

/// What a sink did with a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkReport {
    /// Items confirmed, by kind (for metrics). Rejected items are not counted here.
    pub confirmed: Vec<(ItemKind, u64)>,
    pub rejected: Vec<Rejected>,
    /// Keys that were there and are now gone, when the sink can tell (Redis: the sum of the
    /// UNLINK replies; tag fan-out not included). On a second pass these are keys refilled
    /// between the passes: `cdc_invalidator_second_pass_refills_total`.
    pub removed: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Shutdown abandoned the batch while the sink was still retrying: nothing may be
    /// acknowledged.
    #[error("abandoned at shutdown")]
    Abandoned,
    /// The sink cannot work at all (bad configuration discovered at run time): fatal.
    #[error("{0}")]
    Fatal(String),
}

/// A cache that can be told to forget things. See the module docs for the contract.
#[async_trait]
pub trait Sink: Send + Sync {
    /// The configured name: a metric label and a log field.
    fn name(&self) -> &str;

    /// The kinds of item this sink serves; the pipeline skips it for batches with none of them
    /// and measures its staleness only over events that asked it for something.
    fn kinds(&self) -> &'static [ItemKind] {
        &ItemKind::ALL
    }

    /// Whether this sink needs the batch's [`Origins`] (positions, each key's table and op):
    /// the pipeline gathers them only for layers with such a sink.
    fn wants_origins(&self) -> bool {
        false
    }

    /// Invalidates every item of the kinds this sink serves. Returns once each item is confirmed
    /// or permanently rejected; retries everything else until `shutdown` abandons the work.
    async fn invalidate(&self, batch: &Invalidations, shutdown: &Shutdown) -> Result<SinkReport, SinkError>;

    /// Whether the cache answers right now (for `/readyz`). Must return within a few seconds.
    async fn ping(&self) -> bool;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_own_list_and_a_union_keeps_each_sorted_and_deduplicated() {
        // Whatever kinds exist: each is its own list, found by `items`, and `union` handles all
        // of them (the fixed-size array of the old `coalesce` panicked on a fifth kind).
        let sets: Vec<Invalidations> = ItemKind::ALL
            .iter()
            .map(|&k| Invalidations::of(k, vec![format!("{k}-b"), format!("{k}-a"), format!("{k}-b")]))
            .collect();
        let all = Invalidations::union(&sets);
        for kind in ItemKind::ALL {
            assert_eq!(all.items(kind), [format!("{kind}-a"), format!("{kind}-b")], "{kind}");
        }
        assert_eq!(all.len(), 2 * ItemKind::COUNT);
        assert!(!all.is_empty() && Invalidations::default().is_empty());
    }

    #[test]
    fn gathering_moves_the_items_into_the_union_and_says_where_each_went() {
        let sets = [
            Invalidations::of(ItemKind::RedisKey, vec!["product:2".into(), "product:10".into()])
                .with(ItemKind::RedisTag, vec!["category:5".into()]),
            Invalidations::of(ItemKind::RedisKey, vec!["product:1".into(), "product:2".into()])
                .with(ItemKind::RedisTag, vec!["category:5".into(), "category:7".into()])
                .with(ItemKind::Url, vec!["https://shop.example.com/p/widget-with-a-long-name".into()]),
            Invalidations::of(
                ItemKind::RedisTag,
                vec!["category:7".into(), "category:5".into(), "a\0".into(), "a".into()],
            ),
        ];
        let mut lists: [Vec<String>; ItemKind::COUNT] = Default::default();
        for set in &sets {
            for kind in ItemKind::ALL {
                lists[kind.index()].extend(set.items(kind).iter().cloned());
            }
        }
        let given = lists.clone();
        let mut duplicates = Vec::new();
        let (all, positions) = Invalidations::gather(lists, &mut duplicates);
        assert_eq!(all, Invalidations::union(&sets));
        // Every item given is either in the set or, once it is there, among the duplicates.
        duplicates.sort();
        assert_eq!(duplicates, ["category:5", "category:5", "category:7", "product:2"]);
        for kind in ItemKind::ALL {
            let (given, at) = (&given[kind.index()], &positions[kind.index()]);
            assert_eq!(given.len(), at.len(), "{kind}");
            for (item, &i) in given.iter().zip(at) {
                assert_eq!(&all.items(kind)[i], item, "{kind}");
            }
        }
        assert_eq!(positions[ItemKind::RedisKey.index()], [2, 1, 0, 2]);
        assert_eq!(all.items(ItemKind::RedisTag), ["a", "a\0", "category:5", "category:7"]);
    }

    #[test]
    fn normalizing_sorts_and_deduplicates_lists_of_any_length() {
        let cases: [(&[&str], &[&str]); 7] = [
            (&[], &[]),
            (&["b"], &["b"]),
            (&["a", "b"], &["a", "b"]),
            (&["b", "a"], &["a", "b"]),
            (&["a", "a"], &["a"]),
            (&["c", "a", "b", "a"], &["a", "b", "c"]),
            (&["category:10", "category:1"], &["category:1", "category:10"]),
        ];
        for (items, expected) in cases {
            let mut set = Invalidations::of(ItemKind::RedisTag, items.iter().map(|s| s.to_string()).collect());
            set.normalize();
            assert_eq!(set.items(ItemKind::RedisTag), expected, "{items:?}");
        }
    }

    #[test]
    fn a_union_sorts_bytewise_whatever_the_lengths_and_shared_prefixes() {
        // Items around the sort key's 16 bytes: prefixes of each other, NUL bytes (which the
        // key's zero padding must not confuse with the end), shared 16-byte prefixes, non-ASCII.
        let mut words: Vec<String> = [
            "",
            "a",
            "a\0",
            "a\0\0",
            "ab",
            "product:1",
            "product:10",
            "product:1\0",
            "product:12345678",
            "product:123456789",
            "product:12345678\0",
            "product:1234567",
            "https://shop.example.com/p/a",
            "https://shop.example.com/p/",
            "https://shop.example.com/p/b",
            "https://shop.example.co",
            "https://shop.example.com",
            "https://shop.example.com\0",
            "é",
            "e\u{301}",
            "\u{10FFFF}",
            "zzzzzzzzzzzzzzzz",
            "zzzzzzzzzzzzzzzzz",
            "zzzzzzzzzzzzzzz",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // Deterministic pseudo-random items as well: short alphabets make long shared prefixes.
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 24) as usize;
            words.push((0..len).map(|i| ['a', 'b', '\0', 'é'][((seed >> (2 * i % 60)) & 3) as usize]).collect());
        }
        let sets: Vec<Invalidations> =
            words.chunks(7).map(|chunk| Invalidations::of(ItemKind::RedisKey, chunk.to_vec())).collect();
        let mut expected = words.clone();
        expected.sort();
        expected.dedup();
        assert_eq!(Invalidations::union(&sets).items(ItemKind::RedisKey), expected);
        // And once more with the sets in the other order.
        let reversed: Vec<&Invalidations> = sets.iter().rev().collect();
        assert_eq!(Invalidations::union(reversed).items(ItemKind::RedisKey), expected);
        // Gathering (moving rather than copying) gives the same set, and each item's place.
        let mut lists: [Vec<String>; ItemKind::COUNT] = Default::default();
        lists[ItemKind::RedisKey.index()] = words.clone();
        let (all, positions) = Invalidations::gather(lists, &mut Vec::new());
        assert_eq!(all.items(ItemKind::RedisKey), expected);
        let at = &positions[ItemKind::RedisKey.index()];
        assert_eq!(at.len(), words.len());
        assert!(words.iter().zip(at).all(|(word, &i)| &expected[i] == word));
    }

    #[test]
    fn a_set_serializes_as_one_field_per_kind_in_declaration_order() {
        let set = Invalidations::of(ItemKind::Url, vec!["https://x.example/".into()]);
        let json = serde_json::to_string(&set).unwrap();
        assert_eq!(
            json,
            r#"{"redis_keys":[],"redis_tags":[],"redis_patterns":[],"redis_generations":[],"redis_dependents":[],"surrogate_keys":[],"urls":["https://x.example/"]}"#
        );
    }
}
