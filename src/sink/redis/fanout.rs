//! Tag fan-out: every key listed in the set `<tag_prefix><tag>` is unlinked, then the set.
//!
//! # Why pop, not SSCAN-then-DEL
//!
//! The obvious way, SSCAN the set, UNLINK what it returns, DEL the set at the end, loses keys:
//! the application keeps tagging while we scan, and a key added to the set after the cursor
//! passed its slot is deleted with the set without ever being unlinked. Nothing can find that
//! cached value again: it is orphaned. Instead a server-side script (`fanout.lua`) atomically
//! takes up to `tag_chunk` random members, `UNLINK`s exactly those and then removes them from
//! the set (SRANDMEMBER, UNLINK, SREM: a pop whose removal comes last, so that a script failing
//! halfway removes nothing it did not unlink), and we call it until the set is gone:
//!
//! - a member leaves the set only in the same atomic step that unlinks its key, so a member
//!   added concurrently is either unlinked or still in the set, never orphaned;
//! - Redis deletes the set itself when its last member is popped: no separate delete;
//! - a chunk repeated after a lost reply is harmless (what it popped is gone; it pops others);
//! - each call takes at most `tag_chunk` members, so a set of a million members never blocks
//!   Redis in one call.
//!
//! # The bound, and the sweep that makes it exact
//!
//! A writer that keeps tagging faster than we pop must not keep us here forever, so per tag we
//! pop at most the set's size when first seen plus one chunk. Members added after that stay in
//! the set, tracked for the next invalidation of the tag. But the pop picks at random, so when the
//! bound stops us with members left, some of those can be *old* ones (a simulation with 20,000
//! members, 50 per call and a writer adding one member per call left about 320 old members):
//! stale values nobody would invalidate. So the pop phase is followed, only in that case, by one
//! sweep: the same script walks the set with `SSCAN` from cursor 0 and unlinks and `SREM`s each
//! page atomically. SSCAN returns every member present for the whole walk, and an old member
//! stays present until we remove it, so every old member is unlinked; members added during the
//! walk are unlinked or stay in the set, as before. The walk ends when the cursor comes back to
//! 0 (one pass, whatever the writer does), and is capped at a number of calls proportional to
//! the measured size in case the set grows faster than we can walk it (then the rest is logged
//! and left for the next invalidation).
//!
//! After a failed round trip every unfinished tag starts over with the pop phase and a fresh
//! measure (the server may have restarted from an older snapshot and given members back).
//!
//! A tag key holding something other than a set is reported as a rejected item and left alone:
//! it is not ours to delete, and retrying cannot change its type.
//!
//! # One call for many tags, one string back
//!
//! A round is one script call (one round trip) that takes a chunk of each of up to
//! [`TAGS_PER_CALL`] tags, in order, until [`MEMBER_CHUNKS_PER_CALL`] chunks' worth of members
//! were taken: the bound on how long one call holds Redis (what a pipeline of that many
//! one-tag calls held it, since Redis runs a client's pipelined commands back to back). The
//! tags it did not reach go in the next round. Each tag's chunk stays the atomic step described
//! above; a command failing inside the call (an ACL, a cluster node refusing a key) ends it:
//! the script catches the error and reports it after the records of the tags it finished, whose
//! progress is kept, as that of the calls before a failed one in a pipeline would be.
//!
//! The reply is one bulk string of line records (`fanout.lua` describes them), not an array
//! per tag: the client's parser costs about a thousand instructions per RESP value it reads,
//! which made reading `{0, 0, 0, "0"}` for each tag of a batch the largest part of the sink's
//! cost per event, and Redis spent more on 97 calls (and their replies) than on one. A set that
//! does not exist (already invalidated) costs one `EXISTS` shared by the whole call.
//!
//! # Redis Cluster: a pending set in the tag's slot
//!
//! In a cluster a script may only touch keys of its own slot, and a tag's members are spread
//! over every slot. So in cluster mode (`Fanout::new(.., pending: true)`) the script
//! (`fanout_cluster.lua`) moves a chunk of members from the tag set into a *pending set* that
//! shares the tag set's slot ([`pending_key`]), atomically, and returns them; the sink unlinks
//! them client-side, grouped by slot, and only then `SREM`s them from the pending set (which
//! Redis deletes when it empties). A member is therefore always in the tag set, in a pending
//! set, or unlinked: the guarantee above holds. A crash between the move and the unlink leaves
//! a pending set, which the next start finds (`SCAN` on every primary) and finishes. Budget,
//! sweep and start-over are the same as in standalone mode.
//!
//! # Dependents
//!
//! The dependents cascade (`dependents.rs`) empties `<dep_prefix>KEY` sets with this same
//! fan-out, [`Fanout::collecting`] the members each set gave (the next level starts from them):
//! standalone calls then ask the script for them (`ARGV[2]`), cluster calls return them anyway.

use std::ops::Range;

use redis::{Script, ServerErrorKind, Value};

use super::connection::{item, CommandError};
use crate::sink::{ItemKind, Rejected};

/// Standalone: the members one call takes at most, in chunks (`tag_chunk`): with the largest
/// `tag_chunk` (5000), 200k members per call.
const MEMBER_CHUNKS_PER_CALL: u64 = 40;

/// Standalone: tags one call names at most. Each set a call reaches costs Redis a few
/// microseconds besides its members (about 8 for a one-member set, measured on the 2-core
/// bench machine): 256 of them stay well under what the member bound allows, and a batch's
/// usual tags (97 in the benchmarks) go in one call.
const TAGS_PER_CALL: usize = 256;

/// Cluster mode: one-tag calls per round, at most (as many chunks as a standalone call).
const CALLS_PER_ROUND: usize = MEMBER_CHUNKS_PER_CALL as usize;

/// The sweep gives up after this many calls per chunk of the measured size (plus
/// [`SWEEP_SPARE_CALLS`]): a walk of a set that is not growing needs about one call per chunk,
/// a little more where the hash table is sparse.
const SWEEP_CALLS_PER_CHUNK: u64 = 4;
const SWEEP_SPARE_CALLS: u64 = 16;

/// The script every chunk runs; `redis::Script` knows its SHA1 for EVALSHA.
pub(super) fn script() -> Script {
    Script::new(include_str!("fanout.lua"))
}

/// The cluster variant, which moves members into a pending set instead of unlinking them.
pub(super) fn cluster_script() -> Script {
    Script::new(include_str!("fanout_cluster.lua"))
}

/// Every pending set's name starts with this (the start-up recovery looks for it).
pub(super) const PENDING_PREFIX: &str = "cdc-invalidator:pending:";

/// The pending set of a tag set: in the same hash slot, whatever the tag set's name holds.
pub(super) fn pending_key(tag_key: &str) -> String {
    let slot = super::slot::slot(tag_key.as_bytes());
    format!("{PENDING_PREFIX}{{{}}}:{tag_key}", super::slot::tag_for(slot))
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Pop chunks until the set is gone or `budget` members were popped in this phase. The
    /// budget (the set's size plus one chunk) is `None` until the first reply measures it.
    Pop { popped: u64, budget: Option<u64> },
    /// One SSCAN walk, resumed from `cursor`, for at most `calls_left` more calls.
    Sweep { cursor: String, calls_left: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Active(Phase),
    Done,
    Rejected(String),
}

#[derive(Debug)]
struct TagProgress {
    /// Index in the batch's list of tags.
    index: usize,
    /// The Redis key of the tag's set.
    key: String,
    state: State,
    /// With [`Fanout::collecting`]: the members taken so far (unlinked, or moved to the
    /// pending set and unlinked before the fan-out returns).
    taken: Vec<String>,
}

/// One round trip's worth of script calls.
pub(super) struct Round {
    pub(super) pipe: redis::Pipeline,
    /// Positions in [`Fanout::tags`] of the tags of the calls, in pipeline order.
    tags: Vec<usize>,
    /// Each call's tags: a range of `tags` (one tag per call in cluster mode).
    calls: Vec<Range<usize>>,
    /// Whether the pipeline starts with SCRIPT LOAD.
    pub(super) loads_script: bool,
}

/// What a round achieved.
pub(super) struct RoundOutcome {
    /// Members unlinked (and removed from their set) by the calls that succeeded; in pending
    /// mode, members moved to pending sets.
    pub(super) unlinked: u64,
    /// Pending mode: the members each successful call moved, with their pending set; they
    /// still have to be unlinked.
    pub(super) moved: Vec<(String, Vec<String>)>,
    /// The first failure, if any call failed; the others' progress is kept either way.
    pub(super) error: Option<CommandError>,
}

/// The fan-out of every tag of one batch.
pub(super) struct Fanout {
    tags: Vec<TagProgress>,
    chunk: u64,
    /// Cluster mode: calls name the pending set and replies carry the members.
    pending: bool,
    /// A call found the script missing (a restarted or flushed server): load it first next time.
    load_script: bool,
    /// Keep the members each tag gave (the dependents cascade follows them); standalone
    /// calls then ask the script to return them.
    collect: bool,
}

const START: State = State::Active(Phase::Pop { popped: 0, budget: None });

impl Fanout {
    pub(super) fn new(tag_prefix: &str, tags: &[String], chunk: usize, pending: bool) -> Fanout {
        let tags = tags
            .iter()
            .enumerate()
            .map(|(index, tag)| {
                // Not format!: its machinery cost more than the copy, once per tag of a batch.
                let mut key = String::with_capacity(tag_prefix.len() + tag.len());
                key.push_str(tag_prefix);
                key.push_str(tag);
                TagProgress { index, key, state: START, taken: Vec::new() }
            })
            .collect();
        Fanout { tags, chunk: chunk.max(1) as u64, pending, load_script: false, collect: false }
    }

    /// This fan-out, keeping the members each set gave ([`Fanout::take_members`]).
    pub(super) fn collecting(mut self) -> Fanout {
        self.collect = true;
        self
    }

    /// The members each set gave, by the set's index in the list it was made from.
    pub(super) fn take_members(&mut self) -> Vec<(usize, Vec<String>)> {
        self.tags.iter_mut().map(|t| (t.index, std::mem::take(&mut t.taken))).collect()
    }

    pub(super) fn is_finished(&self) -> bool {
        self.tags.iter().all(|t| !matches!(t.state, State::Active(_)))
    }

    /// The next chunk of every unfinished tag: in standalone mode one call for up to
    /// [`TAGS_PER_CALL`] tags, in cluster mode up to [`CALLS_PER_ROUND`] one-tag calls.
    pub(super) fn next_round(&self, script: &Script) -> Round {
        self.next_round_after(redis::pipe(), script)
    }

    /// [`Fanout::next_round`] appended to `pipe`, whose commands come first (and their replies:
    /// take them off before [`Fanout::apply`]).
    pub(super) fn next_round_after(&self, mut pipe: redis::Pipeline, script: &Script) -> Round {
        if self.load_script {
            pipe.load_script(script);
        }
        let limit = if self.pending { CALLS_PER_ROUND } else { TAGS_PER_CALL };
        let tags: Vec<usize> = self
            .tags
            .iter()
            .enumerate()
            .filter(|(_, t)| matches!(t.state, State::Active(_)))
            .map(|(pos, _)| pos)
            .take(limit)
            .collect();
        let calls = if self.pending {
            for &pos in &tags {
                if let Some(tag) = self.tags.get(pos) {
                    pipe.add_command(self.cluster_call(script, tag));
                }
            }
            (0..tags.len()).map(|i| i..i + 1).collect()
        } else if tags.is_empty() {
            Vec::new()
        } else {
            pipe.add_command(self.call(script, &tags));
            // One call, for every tag of the round.
            std::iter::once(0..tags.len()).collect()
        };
        Round { pipe, tags, calls, loads_script: self.load_script }
    }

    /// How many members the next chunk of `phase` asks for.
    fn count(&self, phase: &Phase) -> u64 {
        match phase {
            Phase::Pop { popped, budget } => {
                let left_in_budget = budget.map_or(self.chunk, |b| b.saturating_sub(*popped));
                self.chunk.min(left_in_budget).max(1)
            }
            Phase::Sweep { .. } => self.chunk,
        }
    }

    /// Standalone: one `fanout.lua` call for the tags at `positions` (all active).
    fn call(&self, script: &Script, positions: &[usize]) -> redis::Cmd {
        let tags = || positions.iter().filter_map(|&pos| self.tags.get(pos));
        // Each tag's count and cursor go in one argument (`ARGV[3]`), not two each: every
        // argument costs the client an encoding and Redis a parse and an allocation.
        // Most tags ask for a whole chunk: its digits are written out once.
        let whole = self.chunk.to_string();
        let mut plan = String::with_capacity(positions.len() * (whole.len() + 1));
        for tag in tags() {
            let State::Active(phase) = &tag.state else { continue };
            if !plan.is_empty() {
                plan.push(' ');
            }
            match self.count(phase) {
                count if count == self.chunk => plan.push_str(&whole),
                count => plan.push_str(&count.to_string()),
            }
            if let Phase::Sweep { cursor, .. } = phase {
                plan.push(':');
                plan.push_str(cursor);
            }
        }
        let bytes: usize = tags().map(|t| t.key.len()).sum::<usize>() + plan.len() + 64;
        let mut call = redis::Cmd::with_capacity(positions.len() + 6, bytes);
        call.arg("EVALSHA").arg(script.get_hash()).arg(positions.len());
        for tag in tags() {
            call.arg(&tag.key);
        }
        call.arg(self.chunk * MEMBER_CHUNKS_PER_CALL).arg(if self.collect { "1" } else { "0" }).arg(plan);
        call
    }

    /// Cluster mode: the `fanout_cluster.lua` call for `tag` (active).
    fn cluster_call(&self, script: &Script, tag: &TagProgress) -> redis::Cmd {
        let mut call = redis::cmd("EVALSHA");
        call.arg(script.get_hash()).arg(2).arg(&tag.key).arg(pending_key(&tag.key));
        if let State::Active(phase) = &tag.state {
            call.arg(self.count(phase));
            if let Phase::Sweep { cursor, .. } = phase {
                call.arg(cursor);
            }
        }
        call
    }

    /// Takes in the replies to `round`: progress of every call that succeeded is kept even when
    /// another one failed.
    pub(super) fn apply(&mut self, round: &Round, replies: Vec<Value>) -> RoundOutcome {
        self.apply_results(round, replies.into_iter().map(|r| item(r).map_err(CommandError::Redis)).collect())
    }

    /// [`Fanout::apply`] for replies sent one by one (cluster mode), each with its own result.
    pub(super) fn apply_results(&mut self, round: &Round, replies: Vec<Result<Value, CommandError>>) -> RoundOutcome {
        let mut outcome = RoundOutcome { unlinked: 0, moved: Vec::new(), error: None };
        let mut replies = replies.into_iter();
        if round.loads_script {
            match replies.next() {
                Some(Ok(_)) => self.load_script = false,
                Some(Err(e)) => outcome.error = Some(e),
                None => {}
            }
        }
        for (call, reply) in round.calls.iter().zip(replies) {
            let tags = round.tags.get(call.clone()).unwrap_or_default();
            match reply {
                Ok(Value::BulkString(records)) => {
                    if let Err(e) = self.take_in(tags, &records, &mut outcome) {
                        outcome.error.get_or_insert(e);
                    }
                }
                Ok(_) => {
                    outcome.error.get_or_insert(CommandError::UnexpectedReply(
                        "the fan-out script answered something else than its records".into(),
                    ));
                }
                Err(CommandError::Redis(e)) if e.kind() == redis::ErrorKind::Server(ServerErrorKind::NoScript) => {
                    // Nothing ran: the call goes again next round, after SCRIPT LOAD. If we had
                    // just loaded it, someone flushed scripts under us: back off and retry.
                    self.load_script = true;
                    if round.loads_script {
                        outcome.error.get_or_insert(CommandError::Redis(e));
                    }
                }
                Err(e) => {
                    outcome.error.get_or_insert(e);
                }
            }
        }
        if outcome.error.is_some() {
            self.start_over();
        }
        outcome
    }

    /// Reads one call's records (one per tag it reached, `tags` in order) into the tags'
    /// progress and `outcome`; a failure the script reported is returned after the progress of
    /// the tags before it is taken in.
    fn take_in(&mut self, tags: &[usize], records: &[u8], outcome: &mut RoundOutcome) -> Result<(), CommandError> {
        let mut records = Records { rest: records, members: self.pending || self.collect };
        let mut reached = 0;
        for &pos in tags {
            let Some(record) = records.next() else { break };
            reached += 1;
            let (unlinked, members) = match record? {
                Record::Chunk(chunk) => self.advance(pos, &chunk)?,
                Record::NotASet(kind) => {
                    self.reject(pos, kind);
                    (0, Vec::new())
                }
                Record::Failed(e) => return Err(CommandError::Redis(e)),
            };
            outcome.unlinked += unlinked;
            if let (false, Some(tag)) = (members.is_empty(), self.tags.get_mut(pos)) {
                if self.collect {
                    tag.taken.extend(members.iter().cloned());
                }
                if self.pending {
                    outcome.moved.push((pending_key(&tag.key), members));
                }
            }
        }
        if records.next().is_some() {
            return Err(CommandError::UnexpectedReply("the fan-out script answered for more sets than it was given".into()));
        }
        if reached == 0 && !tags.is_empty() {
            // It always reaches its first set: a call that took nothing would come back forever.
            return Err(CommandError::UnexpectedReply("the fan-out script answered for none of its sets".into()));
        }
        Ok(())
    }

    /// After a failure: every unfinished tag goes back to the pop phase, to be measured again.
    pub(super) fn start_over(&mut self) {
        for tag in self.tags.iter_mut().filter(|t| matches!(t.state, State::Active(_))) {
            tag.state = START;
        }
    }

    /// The tag at `pos` is not a set: left alone, its item rejected.
    fn reject(&mut self, pos: usize, kind: &str) {
        if let Some(tag) = self.tags.get_mut(pos) {
            tag.state = State::Rejected(format!(
                "the Redis key {:?} holds a {kind}, not a set of cache keys; it was left as it is",
                tag.key
            ));
        }
    }

    /// One chunk taken from the tag at `pos`; returns how many members it took and, with
    /// members in the reply, which.
    fn advance(&mut self, pos: usize, reply: &Chunk) -> Result<(u64, Vec<String>), CommandError> {
        let chunk = self.chunk;
        let Some(tag) = self.tags.get_mut(pos) else {
            return Err(CommandError::UnexpectedReply("a reply for a call that was not made".into()));
        };
        let State::Active(phase) = &mut tag.state else {
            return Err(CommandError::UnexpectedReply("a reply for a tag already finished".into()));
        };
        let Chunk { before, taken, left, cursor, .. } = *reply;
        let members = reply.members.iter().map(|m| String::from_utf8_lossy(m).into_owned()).collect();
        if left == 0 {
            tag.state = State::Done;
            return Ok((taken, members));
        }
        match phase {
            Phase::Pop { popped, budget } => {
                let limit = *budget.get_or_insert(*popped + before + chunk);
                *popped += taken;
                if *popped >= limit || taken == 0 {
                    // Members are left, and some may be old ones the pop did not pick: walk them.
                    let calls = SWEEP_CALLS_PER_CHUNK * limit.div_ceil(chunk) + SWEEP_SPARE_CALLS;
                    *phase = Phase::Sweep { cursor: "0".into(), calls_left: calls };
                }
            }
            Phase::Sweep { cursor: at, calls_left } => {
                *calls_left = calls_left.saturating_sub(1);
                if cursor == "0" {
                    tag.state = State::Done;
                } else if *calls_left == 0 {
                    tracing::warn!(
                        tag_index = tag.index,
                        left,
                        "a tag set grows faster than it can be walked; its remaining members stay for the next invalidation"
                    );
                    tag.state = State::Done;
                } else {
                    *at = cursor.to_string();
                }
            }
        }
        Ok((taken, members))
    }

    /// Tags whose fan-out finished.
    pub(super) fn confirmed(&self) -> u64 {
        self.tags.iter().filter(|t| t.state == State::Done).count() as u64
    }

    pub(super) fn rejected(&self) -> Vec<Rejected> {
        self.tags
            .iter()
            .filter_map(|t| match &t.state {
                State::Rejected(reason) => {
                    Some(Rejected { kind: ItemKind::RedisTag, index: t.index, reason: reason.clone() })
                }
                _ => None,
            })
            .collect()
    }
}

/// One tag set's chunk, as the script reported it.
#[derive(Debug, PartialEq, Eq)]
struct Chunk<'a> {
    /// Members before the chunk, taken by it, left after it.
    before: u64,
    taken: u64,
    left: u64,
    /// Where a sweep goes on ("0": the walk is over, or this was a pop).
    cursor: &'a str,
    /// The members taken, when the call returns them.
    members: Vec<&'a [u8]>,
}

/// One record of a fan-out reply (`fanout.lua` describes the format).
#[derive(Debug)]
enum Record<'a> {
    Chunk(Chunk<'a>),
    /// The key holds this type, not a set.
    NotASet(&'a str),
    /// A command inside the call failed (its later sets were not touched).
    Failed(redis::RedisError),
}

/// The records of one reply, in order; `members`: each chunk record is followed by its members.
struct Records<'a> {
    rest: &'a [u8],
    members: bool,
}

impl<'a> Records<'a> {
    fn unreadable() -> CommandError {
        // Not the reply itself: it may hold keys, which logs never carry.
        CommandError::UnexpectedReply("the fan-out script's reply does not read as its records".into())
    }

    /// Up to the next `\n` (consumed).
    fn line(&mut self) -> Result<&'a [u8], CommandError> {
        let end = self.rest.iter().position(|&b| b == b'\n').ok_or_else(Records::unreadable)?;
        let (line, rest) = self.rest.split_at(end);
        self.rest = rest.get(1..).unwrap_or_default();
        Ok(line)
    }

    fn record(&mut self) -> Result<Record<'a>, CommandError> {
        // A set already gone: the usual record where tags change often, read at a glance.
        if let Some(rest) = self.rest.strip_prefix(b"0 0 0 0\n") {
            self.rest = rest;
            return Ok(Record::Chunk(Chunk { before: 0, taken: 0, left: 0, cursor: "0", members: Vec::new() }));
        }
        let line = self.line()?;
        if let Some(message) = line.strip_prefix(b"! ") {
            // The last record: the error as Redis worded it, read as the error reply it was.
            self.rest = &[];
            let wire = [b"-", message, b"\r\n"].concat();
            return match redis::parse_redis_value(&wire).map(item) {
                Ok(Err(e)) => Ok(Record::Failed(e)),
                _ => Err(Records::unreadable()),
            };
        }
        if let Some(kind) = line.strip_prefix(b"-1 ") {
            return std::str::from_utf8(kind).map(Record::NotASet).map_err(|_| Records::unreadable());
        }
        // Bytes, not str::split and parse: a batch's call has a record per tag.
        let mut fields = line.split(|&b| b == b' ');
        let mut number = || fields.next().and_then(decimal).ok_or_else(Records::unreadable);
        let (before, taken, left) = (number()?, number()?, number()?);
        let cursor = fields
            .next()
            .filter(|c| decimal(c).is_some())
            .and_then(|c| std::str::from_utf8(c).ok())
            .ok_or_else(Records::unreadable)?;
        if fields.next().is_some() {
            return Err(Records::unreadable());
        }
        let mut members = Vec::new();
        if self.members {
            for _ in 0..taken {
                members.push(self.member()?);
            }
        }
        Ok(Record::Chunk(Chunk { before, taken, left, cursor, members }))
    }

    /// `<length>:<bytes>`.
    fn member(&mut self) -> Result<&'a [u8], CommandError> {
        let colon = self.rest.iter().position(|&b| b == b':').ok_or_else(Records::unreadable)?;
        let length = self.rest.get(..colon).and_then(decimal).ok_or_else(Records::unreadable)?;
        let length = usize::try_from(length).map_err(|_| Records::unreadable())?;
        let start = colon + 1;
        let member = self.rest.get(start..start + length).ok_or_else(Records::unreadable)?;
        self.rest = self.rest.get(start + length..).unwrap_or_default();
        Ok(member)
    }
}

/// Decimal digits (at least one, at most what fits in 64 bits) as a number.
fn decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        let d = d.checked_sub(b'0').filter(|d| *d <= 9)?;
        n.checked_mul(10)?.checked_add(u64::from(d))
    })
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<Record<'a>, CommandError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let record = self.record();
        if record.is_err() {
            self.rest = &[];
        }
        Some(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record of a chunk, as `fanout.lua` writes it.
    fn rec(before: i64, taken: i64, left: i64, cursor: &str) -> String {
        format!("{before} {taken} {left} {cursor}\n")
    }

    /// One call's reply: its records, one bulk string.
    fn reply(records: &[&str]) -> Value {
        Value::BulkString(records.concat().into_bytes())
    }

    fn args(cmd: &redis::Cmd) -> Vec<String> {
        cmd.args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => String::from_utf8_lossy(b).into_owned(),
                _ => "?".into(),
            })
            .collect()
    }

    /// Per tag of the round's (standalone) call: `[count]` to pop, `[count, cursor]` to sweep.
    fn calls(round: &Round) -> Vec<Vec<String>> {
        let call = round.pipe.cmd_iter().last().expect("a call");
        let args = args(call);
        let tags: usize = args[2].parse().expect("numkeys");
        // EVALSHA sha numkeys keys... bound members plan.
        assert_eq!(args.len(), 6 + tags);
        let plan: Vec<Vec<String>> =
            args[5 + tags].split(' ').map(|entry| entry.split(':').map(str::to_string).collect()).collect();
        assert_eq!(plan.len(), tags);
        plan
    }

    #[test]
    fn pops_up_to_the_measured_size_plus_one_chunk_then_sweeps_once() {
        let script = script();
        let mut f = Fanout::new("tag:", &["t".to_string()], 10, false);
        // 25 members when first seen; a writer keeps the set from ever emptying.
        let r = f.next_round(&script);
        assert_eq!(calls(&r), [["10"]]);
        assert_eq!(f.apply(&r, vec![reply(&[&rec(25, 10, 15, "0")])]).unlinked, 10);
        for _ in 0..2 {
            let r = f.next_round(&script);
            f.apply(&r, vec![reply(&[&rec(30, 10, 20, "0")])]);
        }
        // Budget 25 + 10 = 35, 30 popped: the last pop asks for 5 only.
        let r = f.next_round(&script);
        assert_eq!(calls(&r), [["5"]]);
        f.apply(&r, vec![reply(&[&rec(30, 5, 25, "0")])]);
        // Members are left: one SSCAN walk from cursor 0, resumed where the server said.
        let r = f.next_round(&script);
        assert_eq!(calls(&r), [["10", "0"]]);
        f.apply(&r, vec![reply(&[&rec(25, 10, 16, "12")])]);
        let r = f.next_round(&script);
        assert_eq!(calls(&r), [["10", "12"]]);
        assert!(!f.is_finished());
        // The cursor is back to 0: the walk is over even though the writer added more.
        f.apply(&r, vec![reply(&[&rec(16, 9, 8, "0")])]);
        assert!(f.is_finished());
        assert_eq!(f.confirmed(), 1);
    }

    #[test]
    fn an_emptied_set_ends_the_tag() {
        let script = script();
        let mut f = Fanout::new("tag:", &["t".to_string()], 10, false);
        let r = f.next_round(&script);
        assert_eq!(f.apply(&r, vec![reply(&[&rec(3, 3, 0, "0")])]).unlinked, 3);
        assert!(f.is_finished());
    }

    #[test]
    fn the_sweep_is_capped_when_the_set_outgrows_it() {
        let script = script();
        let mut f = Fanout::new("tag:", &["t".to_string()], 10, false);
        let r = f.next_round(&script);
        f.apply(&r, vec![reply(&[&rec(10, 10, 50, "0")])]); // budget 20
        let r = f.next_round(&script);
        f.apply(&r, vec![reply(&[&rec(50, 10, 90, "0")])]); // budget reached: sweep, 4 * 2 + 16 calls
        let mut sweeps = 0;
        while !f.is_finished() {
            let r = f.next_round(&script);
            f.apply(&r, vec![reply(&[&rec(1000, 10, 1000, "7")])]);
            sweeps += 1;
            assert!(sweeps <= 24, "the sweep must stop");
        }
        assert_eq!(sweeps, 24);
    }

    #[test]
    fn one_call_names_every_tag_with_its_own_count_and_cursor() {
        let script = script();
        let tags: Vec<String> = ["a", "b", "c"].iter().map(|t| t.to_string()).collect();
        let mut f = Fanout::new("tag:", &tags, 10, false);
        let r = f.next_round(&script);
        assert_eq!(r.pipe.len(), 1, "one call for every tag");
        let call = args(r.pipe.cmd_iter().next().expect("a call"));
        assert_eq!(call[..6], ["EVALSHA", script.get_hash(), "3", "tag:a", "tag:b", "tag:c"]);
        assert_eq!(call[6..8], ["400", "0"], "40 chunks of 10 at most; no members back");
        // a is done, b pops on, c sweeps from where it is.
        f.apply(&r, vec![reply(&[&rec(3, 3, 0, "0"), &rec(30, 10, 20, "0"), &rec(5, 0, 5, "0")])]);
        let r = f.next_round(&script);
        assert_eq!(calls(&r), [vec!["10"], vec!["10", "0"]]);
        assert_eq!(args(r.pipe.cmd_iter().next().expect("a call"))[3..5], ["tag:b", "tag:c"]);
    }

    #[test]
    fn tags_past_the_member_bound_wait_for_the_next_round() {
        let script = script();
        let tags: Vec<String> = (0..3).map(|t| t.to_string()).collect();
        let mut f = Fanout::new("tag:", &tags, 10, false);
        let r = f.next_round(&script);
        // The call took the bound from the first two sets and did not reach the third.
        let out = f.apply(&r, vec![reply(&[&rec(300, 10, 290, "0"), &rec(5, 5, 0, "0")])]);
        assert!(out.error.is_none());
        assert_eq!(out.unlinked, 15);
        let r = f.next_round(&script);
        assert_eq!(args(r.pipe.cmd_iter().next().expect("a call"))[2..5], ["2", "tag:0", "tag:2"]);
        assert_eq!(calls(&r), [["10"], ["10"]], "the third set is still measured by its first pop");
        f.apply(&r, vec![reply(&[&rec(290, 10, 280, "0"), &rec(0, 0, 0, "0")])]);
        assert_eq!(f.confirmed(), 2);
    }

    #[test]
    fn a_call_names_a_bounded_number_of_tags() {
        let script = script();
        let tags: Vec<String> = (0..TAGS_PER_CALL + 5).map(|t| t.to_string()).collect();
        let mut f = Fanout::new("tag:", &tags, 10, false);
        let r = f.next_round(&script);
        assert_eq!(calls(&r).len(), TAGS_PER_CALL);
        let gone = rec(0, 0, 0, "0");
        f.apply(&r, vec![reply(&vec![gone.as_str(); TAGS_PER_CALL])]);
        let r = f.next_round(&script);
        assert_eq!(calls(&r).len(), 5);
        f.apply(&r, vec![reply(&[gone.as_str(); 5])]);
        assert!(f.is_finished());
        assert_eq!(f.confirmed(), tags.len() as u64);
    }

    #[test]
    fn wrong_type_is_rejected_and_others_go_on() {
        let script = script();
        let tags = ["s".to_string(), "t".to_string()];
        let mut f = Fanout::new("tag:", &tags, 10, false);
        let r = f.next_round(&script);
        let out = f.apply(&r, vec![reply(&["-1 string\n", &rec(3, 3, 0, "0")])]);
        assert!(out.error.is_none());
        assert_eq!(out.unlinked, 3);
        assert!(f.is_finished());
        let rejected = f.rejected();
        assert_eq!(rejected.len(), 1);
        assert_eq!((rejected[0].kind, rejected[0].index), (ItemKind::RedisTag, 0));
        assert!(rejected[0].reason.contains("holds a string, not a set"), "{}", rejected[0].reason);
        assert_eq!(f.confirmed(), 1);
    }

    #[test]
    fn missing_script_is_loaded_in_the_next_round() {
        let script = script();
        let mut f = Fanout::new("tag:", &["t".to_string()], 10, false);
        let r = f.next_round(&script);
        let noscript = redis::parse_redis_value(b"-NOSCRIPT No matching script.\r\n").expect("parses");
        let out = f.apply(&r, vec![noscript]);
        assert!(out.error.is_none());
        let r = f.next_round(&script);
        assert!(r.loads_script);
        assert_eq!(r.pipe.len(), 2);
        let loaded = Value::BulkString(script.get_hash().as_bytes().to_vec());
        let out = f.apply(&r, vec![loaded, reply(&[&rec(0, 0, 0, "0")])]);
        assert!(out.error.is_none());
        assert!(f.is_finished());
    }

    /// A command failing inside the call (here an ACL refusing a member key): the tags before
    /// it keep their progress, the error is Redis's own (same code, same class), every
    /// unfinished tag starts over.
    #[test]
    fn a_failure_inside_the_call_keeps_the_progress_before_it() {
        let script = script();
        let tags: Vec<String> = ["a", "b", "c", "d"].iter().map(|t| t.to_string()).collect();
        let mut f = Fanout::new("tag:", &tags, 10, false);
        let r = f.next_round(&script);
        let denied = "! ERR The user executing the script can't access at least one of the keys\n";
        let out = f.apply(&r, vec![reply(&[&rec(2, 2, 0, "0"), &rec(100, 10, 90, "0"), denied])]);
        assert_eq!(out.unlinked, 12);
        let Some(CommandError::Redis(e)) = &out.error else { panic!("a Redis error: {:?}", out.error) };
        assert_eq!(e.code(), Some("ERR"));
        assert!(e.to_string().contains("can't access at least one of the keys"), "{e}");
        assert_eq!(f.confirmed(), 1, "a finished before the failure");
        assert!(f.tags[1..].iter().all(|t| t.state == START), "b, c and d start over");

        let busy = "! BUSY Redis is busy\n";
        let mut f = Fanout::new("tag:", &tags, 10, false);
        let r = f.next_round(&script);
        let out = f.apply(&r, vec![reply(&[busy])]);
        let Some(e) = &out.error else { panic!("an error") };
        assert_eq!(e.class(), super::super::connection::Class::Transient, "classified as the reply would be");
        assert_eq!(f.confirmed(), 0);
    }

    #[test]
    fn a_failed_cluster_call_keeps_the_others_progress_and_starts_over() {
        let script = cluster_script();
        let tags = ["a".to_string(), "b".to_string()];
        let mut f = Fanout::new("tag:", &tags, 10, true);
        let r = f.next_round(&script);
        assert_eq!(r.pipe.len(), 2, "a call per tag, each in its slot");
        let busy = redis::parse_redis_value(b"-BUSY Redis is busy running a script.\r\n").expect("parses");
        let moved = [rec(100, 2, 98, "0"), "2:k12:k2".to_string()].concat();
        let results = vec![Ok(reply(&[&moved])), item(busy).map_err(CommandError::Redis)];
        let out = f.apply_results(&r, results);
        assert_eq!(out.unlinked, 2);
        assert_eq!(out.moved, vec![(pending_key("tag:a"), vec!["k1".to_string(), "k2".to_string()])]);
        assert!(out.error.is_some());
        assert!(f.tags.iter().all(|t| t.state == START));
    }

    #[test]
    fn a_pending_set_shares_its_tag_sets_slot() {
        use super::super::slot::slot;
        for key in ["tag:category:5", "tag:{user1}:x", "tag:a{}b", "tag:}{x", "tag:{", "t:\u{e9}t\u{e9}"] {
            let pending = pending_key(key);
            assert!(pending.starts_with(PENDING_PREFIX) && pending.ends_with(key), "{pending}");
            assert_eq!(slot(pending.as_bytes()), slot(key.as_bytes()), "{key}");
        }
    }

    #[test]
    fn cluster_calls_name_the_pending_set_and_replies_carry_the_members() {
        let script = cluster_script();
        let mut f = Fanout::new("tag:", &["t".to_string()], 10, true);
        let r = f.next_round(&script);
        let call = args(r.pipe.cmd_iter().next().expect("one call"));
        assert_eq!(call[..], ["EVALSHA", script.get_hash(), "2", "tag:t", pending_key("tag:t").as_str(), "10"]);
        // Members are any bytes: the length says where each ends.
        let out = f.apply(&r, vec![reply(&[&rec(2, 2, 0, "0"), "2:k1", "5:a\nb:c"])]);
        assert!(out.error.is_none());
        assert_eq!(out.moved, vec![(pending_key("tag:t"), vec!["k1".to_string(), "a\nb:c".to_string()])]);
        assert!(f.is_finished());
    }

    #[test]
    fn collected_members_are_asked_for_and_kept() {
        let script = script();
        let mut f = Fanout::new("dep:", &["a".to_string(), "b".to_string()], 10, false).collecting();
        let r = f.next_round(&script);
        assert_eq!(args(r.pipe.cmd_iter().next().expect("a call"))[6], "1", "members asked for");
        let out = f.apply(&r, vec![reply(&[&rec(1, 1, 0, "0"), "1:x", &rec(0, 0, 0, "0")])]);
        assert!(out.error.is_none() && out.moved.is_empty());
        assert_eq!(f.take_members(), vec![(0, vec!["x".to_string()]), (1, vec![])]);
    }

    #[test]
    fn nonsense_replies_are_errors() {
        let script = script();
        for nonsense in [
            Value::Okay,
            Value::Array(vec![Value::Int(0), Value::Int(0), Value::Int(0), Value::BulkString(b"0".to_vec())]),
            reply(&["0 0 0\n"]),
            reply(&["0 0 0 0"]),
            reply(&["x 0 0 0\n"]),
            reply(&["0 0 0 0 0\n"]),
            reply(&[]),
            // More records than sets.
            reply(&[&rec(0, 0, 0, "0"), &rec(0, 0, 0, "0")]),
        ] {
            let mut f = Fanout::new("tag:", &["t".to_string()], 10, false);
            let r = f.next_round(&script);
            let out = f.apply(&r, vec![nonsense.clone()]);
            assert!(matches!(out.error, Some(CommandError::UnexpectedReply(_))), "{nonsense:?}: {:?}", out.error);
        }
        // Members cut short.
        let mut f = Fanout::new("tag:", &["t".to_string()], 10, true);
        let r = f.next_round(&cluster_script());
        let out = f.apply(&r, vec![reply(&[&rec(2, 2, 0, "0"), "2:k1", "9:k2"])]);
        assert!(matches!(out.error, Some(CommandError::UnexpectedReply(_))), "{:?}", out.error);
    }
}
