//! Dependents: key B depends on key A when the application added B to the set
//! `<dep_prefix>A` (`SADD dep:A B`), as it adds keys to tag sets. A rule with
//! `redis.dependents: true` invalidates, with each key it invalidates (as a key, as a member of
//! one of its tags, or as a match of one of its patterns), that key's dependents, then theirs,
//! up to `dependents_depth` levels.
//!
//! # How a rule's wish travels
//!
//! The rules engine adds a *root* per item of such a rule to the batch's
//! [`ItemKind::RedisDependents`] list: `key:K`, `tag:T` or `pattern:P` ([`Root`]). The
//! [`super::RedisSink`] starts the cascade from `key:` roots (the key itself) and `tag:` roots
//! (the members its tag fan-out took); the [`super::PatternSink`] from `pattern:` roots (each
//! page of matches, as it comes). A root is confirmed once its whole cascade is.
//!
//! # The cascade is the tag fan-out again
//!
//! A dependency set is a tag set under another prefix, so each level is one fan-out
//! (`fanout.rs`, with its members collected) over the dependency sets of the keys the level
//! before unlinked: the members leave their set only in the atomic step that unlinks them (or,
//! in a cluster, moves them to the pending set in the set's slot), so a dependent registered
//! while the cascade runs is either unlinked or still registered, never orphaned; the start-up
//! recovery finishes pending sets the same way. The same bounds apply per set (its size when
//! first seen, plus a sweep).
//!
//! Breadth first, each key expanded once (`seen`): a cycle (A depends on B, B on A) ends at
//! the key already seen, and the cascade stops after `dependents_depth` levels or
//! [`MAX_CASCADE_KEYS`] keys, whichever comes first. A dependency set that holds something else
//! than a set is left as it is and its root reported as rejected (dead-lettered with the
//! reason), like a tag key that is not a set; the rest of the cascade goes on.
//!
//! # Telling applications
//!
//! The cascade returns the keys it unlinked ([`Cascade::unlinked`], each with its root), so the
//! sink that ran it lists them in the `keys` of its broadcast and appends them to the warm-up
//! stream with the table and op of the root's event: an in-process copy of `home:page` is as
//! stale as Redis's was. They are as many as the cascade unlinked (bounded by
//! [`MAX_CASCADE_KEYS`] plus the members of the last level's sets, which are in memory anyway).

use std::collections::{HashMap, HashSet};

use super::{RedisSink, Sets};
use crate::shutdown::Shutdown;
use crate::sink::{Invalidations, ItemKind, Rejected, SinkError};

/// Keys one cascade expands at most (over every level): a dependency graph registered wrongly
/// (everything depending on everything) must not hold the sink or its memory without bound.
const MAX_CASCADE_KEYS: usize = 1_000_000;

/// How a root names what it starts from, in [`ItemKind::RedisDependents`] items.
pub struct Root;

impl Root {
    pub const KEY: &'static str = "key:";
    pub const TAG: &'static str = "tag:";
    pub const PATTERN: &'static str = "pattern:";

    /// The prefix of roots made from items of `kind`; `None` for kinds that invalidate no
    /// Redis key by name.
    pub fn kind_prefix(kind: ItemKind) -> Option<&'static str> {
        match kind {
            ItemKind::RedisKey => Some(Root::KEY),
            ItemKind::RedisTag => Some(Root::TAG),
            ItemKind::RedisPattern => Some(Root::PATTERN),
            _ => None,
        }
    }
}

/// The roots of one batch (its [`ItemKind::RedisDependents`] list).
pub(super) struct Roots<'a> {
    items: &'a [String],
}

impl<'a> Roots<'a> {
    pub(super) fn of(batch: &'a Invalidations) -> Roots<'a> {
        Roots { items: batch.items(ItemKind::RedisDependents) }
    }

    /// `(index, what follows the prefix)` of every root with `prefix`.
    fn with(&self, prefix: &'static str) -> impl Iterator<Item = (usize, &'a str)> + 'a {
        self.items.iter().enumerate().filter_map(move |(i, item)| Some((i, item.strip_prefix(prefix)?)))
    }

    /// `key:` roots, each with its key: where their cascades start.
    pub(super) fn keys(&self) -> Vec<(usize, Vec<String>)> {
        self.with(Root::KEY).map(|(i, key)| (i, vec![key.to_string()])).collect()
    }

    pub(super) fn has_tags(&self) -> bool {
        self.with(Root::TAG).next().is_some()
    }

    /// `tag:` roots, each with the members its tag's fan-out took (`members`: by index in
    /// `tags`).
    pub(super) fn tag_members(&self, tags: &[String], members: Vec<(usize, Vec<String>)>) -> Vec<(usize, Vec<String>)> {
        let wanted: HashMap<&str, usize> = self.with(Root::TAG).map(|(i, tag)| (tag, i)).collect();
        members.into_iter().filter_map(|(t, members)| Some((*wanted.get(tags.get(t)?.as_str())?, members))).collect()
    }

    /// `pattern:` roots: pattern to root index.
    pub(super) fn patterns(&self) -> HashMap<&'a str, usize> {
        self.with(Root::PATTERN).map(|(i, pattern)| (pattern, i)).collect()
    }

    /// How many roots the [`RedisSink`] serves (`key:` and `tag:`).
    pub(super) fn served_here(&self) -> usize {
        self.with(Root::KEY).count() + self.with(Root::TAG).count()
    }
}

/// What one cascade did.
#[derive(Debug, Default)]
pub(super) struct Cascade {
    /// The roots rejected (a dependency set that is not a set), once each, by index.
    pub(super) rejected: Vec<Rejected>,
    /// Every key the cascade unlinked (the starts excluded), once, with its root's index.
    pub(super) unlinked: Vec<(String, usize)>,
}

impl RedisSink {
    /// Unlinks the dependents of the keys in `starts` (already invalidated), level by level;
    /// each start is `(root index, keys)`.
    pub(super) async fn cascade(
        &self,
        starts: Vec<(usize, Vec<String>)>,
        shutdown: &Shutdown,
    ) -> Result<Cascade, SinkError> {
        let mut seen: HashSet<String> = HashSet::new();
        // (key, root index): the keys whose dependency sets the next level empties.
        let mut frontier: Vec<(String, usize)> = Vec::new();
        for (root, keys) in starts {
            for key in keys {
                if seen.insert(key.clone()) {
                    frontier.push((key, root));
                }
            }
        }
        let mut rejected: HashMap<usize, String> = HashMap::new();
        let mut unlinked: Vec<(String, usize)> = Vec::new();
        for _ in 0..self.dependents_depth {
            if frontier.is_empty() {
                break;
            }
            let keys: Vec<String> = frontier.iter().map(|(k, _)| k.clone()).collect();
            let (mut fanout, _) = self.fan_out(Sets::Dependents, &keys, true, &[], shutdown).await?;
            for r in fanout.rejected() {
                let Some((_, root)) = frontier.get(r.index) else { continue };
                tracing::warn!(sink = %self.name, "a dependency set's Redis key is not a set: skipped, its root rejected");
                rejected.entry(*root).or_insert(r.reason);
            }
            let mut next = Vec::new();
            for (at, members) in fanout.take_members() {
                let Some((_, root)) = frontier.get(at) else { continue };
                for member in members {
                    if seen.len() >= MAX_CASCADE_KEYS {
                        // Unlinked all the same (its set was emptied): it is announced, not
                        // followed further.
                        if !seen.contains(&member) {
                            unlinked.push((member, *root));
                        }
                        continue;
                    }
                    if seen.insert(member.clone()) {
                        unlinked.push((member.clone(), *root));
                        next.push((member, *root));
                    }
                }
            }
            if seen.len() >= MAX_CASCADE_KEYS {
                tracing::warn!(
                    sink = %self.name,
                    keys = seen.len(),
                    "a dependents cascade reached its bound; dependents further down stay registered for the next invalidation"
                );
                break;
            }
            frontier = next;
        }
        let mut rejected: Vec<Rejected> = rejected
            .into_iter()
            .map(|(index, reason)| Rejected { kind: ItemKind::RedisDependents, index, reason })
            .collect();
        rejected.sort_by_key(|r| r.index);
        // Past the bound a member may come from two sets: once is enough.
        unlinked.sort_unstable();
        unlinked.dedup_by(|a, b| a.0 == b.0);
        Ok(Cascade { rejected, unlinked })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_are_split_by_prefix_and_tag_members_find_their_root() {
        let batch = Invalidations::of(
            ItemKind::RedisDependents,
            vec!["key:a".into(), "pattern:p:*".into(), "tag:t1".into(), "tag:t3".into()],
        );
        let roots = Roots::of(&batch);
        assert_eq!(roots.keys(), vec![(0, vec!["a".to_string()])]);
        assert!(roots.has_tags());
        assert_eq!(roots.served_here(), 3);
        assert_eq!(roots.patterns().get("p:*"), Some(&1));
        let tags = ["t1".to_string(), "t2".to_string(), "t3".to_string()];
        let members = vec![(0, vec!["m1".to_string()]), (1, vec!["m2".to_string()]), (2, vec!["m3".to_string()])];
        // t2 has no root (its rule did not ask for dependents): its members start nothing.
        assert_eq!(roots.tag_members(&tags, members), vec![(2, vec!["m1".to_string()]), (3, vec!["m3".to_string()])]);
    }
}
