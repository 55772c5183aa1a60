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
//! Script calls of several tags share one pipeline (one round trip per round of chunks), at most
//! [`CALLS_PER_ROUND`] of them, so that one round trip holds Redis for a bounded time.
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
//! standalone calls then ask the script for them (`ARGV[3]`), cluster calls return them anyway.

use redis::{Script, ServerErrorKind, Value};

use super::connection::{item, CommandError};
use crate::sink::{ItemKind, Rejected};

/// Script calls per round trip: with the largest `tag_chunk` (5000), 200k members per round.
const CALLS_PER_ROUND: usize = 40;

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
    /// Positions in [`Fanout::tags`] of the calls, in pipeline order.
    tags: Vec<usize>,
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
            .map(|(index, tag)| TagProgress {
                index,
                key: format!("{tag_prefix}{tag}"),
                state: START,
                taken: Vec::new(),
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

    /// The next chunk of every unfinished tag (up to [`CALLS_PER_ROUND`]).
    pub(super) fn next_round(&self, script: &Script) -> Round {
        let mut pipe = redis::pipe();
        if self.load_script {
            pipe.load_script(script);
        }
        let mut tags = Vec::new();
        for (pos, tag) in self.tags.iter().enumerate() {
            if tags.len() == CALLS_PER_ROUND {
                break;
            }
            let State::Active(phase) = &tag.state else { continue };
            let mut call = script.key(&tag.key);
            if self.pending {
                call.key(pending_key(&tag.key));
            }
            // Standalone calls that must return their members say so in ARGV[3].
            let returning = self.collect && !self.pending;
            match phase {
                Phase::Pop { popped, budget } => {
                    let left_in_budget = budget.map_or(self.chunk, |b| b.saturating_sub(*popped));
                    call.arg(self.chunk.min(left_in_budget).max(1));
                    if returning {
                        call.arg("").arg("1");
                    }
                }
                Phase::Sweep { cursor, .. } => {
                    call.arg(self.chunk).arg(cursor);
                    if returning {
                        call.arg("1");
                    }
                }
            }
            pipe.invoke_script(&call);
            tags.push(pos);
        }
        Round { pipe, tags, loads_script: self.load_script }
    }

    /// Takes in the replies to `round`: progress of every call that succeeded is kept even when
    /// another one failed.
    pub(super) fn apply(&mut self, round: &Round, replies: Vec<Value>) -> RoundOutcome {
        self.apply_results(round, replies.into_iter().map(|r| item(r).map_err(CommandError::Redis)).collect())
    }

    /// [`Fanout::apply`] for replies sent one by one (cluster mode), each with its own result.
    pub(super) fn apply_results(
        &mut self,
        round: &Round,
        mut replies: Vec<Result<Value, CommandError>>,
    ) -> RoundOutcome {
        let mut outcome = RoundOutcome { unlinked: 0, moved: Vec::new(), error: None };
        if round.loads_script && !replies.is_empty() {
            match replies.remove(0) {
                Ok(_) => self.load_script = false,
                Err(e) => outcome.error = Some(e),
            }
        }
        for (&pos, reply) in round.tags.iter().zip(replies) {
            match reply {
                Ok(value) => match self.advance(pos, &value) {
                    Ok((unlinked, members)) => {
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
                    Err(e) => {
                        outcome.error.get_or_insert(e);
                    }
                },
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

    /// After a failure: every unfinished tag goes back to the pop phase, to be measured again.
    pub(super) fn start_over(&mut self) {
        for tag in self.tags.iter_mut().filter(|t| matches!(t.state, State::Active(_))) {
            tag.state = START;
        }
    }

    /// One script reply for the tag at `pos`; returns how many members it took and, in pending
    /// mode, which.
    fn advance(&mut self, pos: usize, reply: &Value) -> Result<(u64, Vec<String>), CommandError> {
        let chunk = self.chunk;
        let Some(tag) = self.tags.get_mut(pos) else {
            return Err(CommandError::UnexpectedReply("a reply for a call that was not made".into()));
        };
        let unexpected = || CommandError::UnexpectedReply(format!("the fan-out script answered {reply:?}"));
        let Value::Array(fields) = reply else { return Err(unexpected()) };
        let State::Active(phase) = &mut tag.state else { return Err(unexpected()) };
        let mut members = Vec::new();
        let fields = match fields.as_slice() {
            [head @ .., Value::Array(moved)] if (self.pending || self.collect) && head.len() == 4 => {
                for m in moved {
                    members.push(text(m).ok_or_else(unexpected)?);
                }
                head
            }
            [head @ .., Value::Nil] if (self.pending || self.collect) && head.len() == 4 => head,
            all => all,
        };
        let (before, taken, left, cursor) = match fields {
            [Value::Int(-1), kind] => {
                let kind = text(kind).ok_or_else(unexpected)?;
                tag.state = State::Rejected(format!(
                    "the Redis key {:?} holds a {kind}, not a set of cache keys; it was left as it is",
                    tag.key
                ));
                return Ok((0, members));
            }
            [Value::Int(before), Value::Int(taken), Value::Int(left), cursor]
                if *before >= 0 && *taken >= 0 && *left >= 0 =>
            {
                (*before as u64, *taken as u64, *left as u64, text(cursor).ok_or_else(unexpected)?)
            }
            _ => return Err(unexpected()),
        };
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
                    *at = cursor;
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

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(before: i64, taken: i64, left: i64, cursor: &str) -> Value {
        Value::Array(vec![
            Value::Int(before),
            Value::Int(taken),
            Value::Int(left),
            Value::BulkString(cursor.as_bytes().to_vec()),
        ])
    }

    /// The arguments after the key of each EVALSHA of a round: `[count]` or `[count, cursor]`.
    fn calls(round: &Round) -> Vec<Vec<String>> {
        round
            .pipe
            .cmd_iter()
            .map(|c| {
                c.args_iter()
                    .skip(4) // EVALSHA sha numkeys key
                    .map(|a| match a {
                        redis::Arg::Simple(b) => String::from_utf8_lossy(b).into_owned(),
                        _ => "?".into(),
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn pops_up_to_the_measured_size_plus_one_chunk_then_sweeps_once() {
        let script = script();
        let mut f = Fanout::new("tag:", &["t".to_string()], 10, false);
        // 25 members when first seen; a writer keeps the set from ever emptying.
        let r = f.next_round(&script);
        assert_eq!(calls(&r), [["10"]]);
        assert_eq!(f.apply(&r, vec![reply(25, 10, 15, "0")]).unlinked, 10);
        for _ in 0..2 {
            let r = f.next_round(&script);
            f.apply(&r, vec![reply(30, 10, 20, "0")]);
        }
        // Budget 25 + 10 = 35, 30 popped: the last pop asks for 5 only.
        let r = f.next_round(&script);
        assert_eq!(calls(&r), [["5"]]);
        f.apply(&r, vec![reply(30, 5, 25, "0")]);
        // Members are left: one SSCAN walk from cursor 0, resumed where the server said.
        let r = f.next_round(&script);
        assert_eq!(calls(&r), [["10", "0"]]);
        f.apply(&r, vec![reply(25, 10, 16, "12")]);
        let r = f.next_round(&script);
        assert_eq!(calls(&r), [["10", "12"]]);
        assert!(!f.is_finished());
        // The cursor is back to 0: the walk is over even though the writer added more.
        f.apply(&r, vec![reply(16, 9, 8, "0")]);
        assert!(f.is_finished());
        assert_eq!(f.confirmed(), 1);
    }

    #[test]
    fn an_emptied_set_ends_the_tag() {
        let script = script();
        let mut f = Fanout::new("tag:", &["t".to_string()], 10, false);
        let r = f.next_round(&script);
        assert_eq!(f.apply(&r, vec![reply(3, 3, 0, "0")]).unlinked, 3);
        assert!(f.is_finished());
    }

    #[test]
    fn the_sweep_is_capped_when_the_set_outgrows_it() {
        let script = script();
        let mut f = Fanout::new("tag:", &["t".to_string()], 10, false);
        let r = f.next_round(&script);
        f.apply(&r, vec![reply(10, 10, 50, "0")]); // budget 20
        let r = f.next_round(&script);
        f.apply(&r, vec![reply(50, 10, 90, "0")]); // budget reached: sweep, 4 * 2 + 16 calls
        let mut sweeps = 0;
        while !f.is_finished() {
            let r = f.next_round(&script);
            f.apply(&r, vec![reply(1000, 10, 1000, "7")]);
            sweeps += 1;
            assert!(sweeps <= 24, "the sweep must stop");
        }
        assert_eq!(sweeps, 24);
    }

    #[test]
    fn wrong_type_is_rejected_and_others_go_on() {
        let script = script();
        let tags = ["s".to_string(), "t".to_string()];
        let mut f = Fanout::new("tag:", &tags, 10, false);
        let r = f.next_round(&script);
        let wrong = Value::Array(vec![Value::Int(-1), Value::BulkString(b"string".to_vec())]);
        let out = f.apply(&r, vec![wrong, reply(3, 3, 0, "0")]);
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
        let out = f.apply(&r, vec![Value::BulkString(script.get_hash().as_bytes().to_vec()), reply(0, 0, 0, "0")]);
        assert!(out.error.is_none());
        assert!(f.is_finished());
    }

    #[test]
    fn a_failed_call_keeps_the_others_progress_and_starts_over() {
        let script = script();
        let tags = ["a".to_string(), "b".to_string()];
        let mut f = Fanout::new("tag:", &tags, 10, false);
        let r = f.next_round(&script);
        let busy = redis::parse_redis_value(b"-BUSY Redis is busy running a script.\r\n").expect("parses");
        let out = f.apply(&r, vec![reply(100, 10, 90, "0"), busy]);
        assert_eq!(out.unlinked, 10);
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
        let call = r.pipe.cmd_iter().next().expect("one call");
        let args: Vec<String> = call
            .args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => String::from_utf8_lossy(b).into_owned(),
                _ => "?".into(),
            })
            .collect();
        assert_eq!(&args[2..5], ["2", "tag:t", pending_key("tag:t").as_str()]);
        let members = Value::Array(vec![Value::BulkString(b"k1".to_vec()), Value::BulkString(b"k2".to_vec())]);
        let mut reply = match reply(2, 2, 0, "0") {
            Value::Array(v) => v,
            _ => unreachable!(),
        };
        reply.push(members);
        let out = f.apply(&r, vec![Value::Array(reply)]);
        assert!(out.error.is_none());
        assert_eq!(out.moved, vec![(pending_key("tag:t"), vec!["k1".to_string(), "k2".to_string()])]);
        assert!(f.is_finished());
    }

    #[test]
    fn nonsense_replies_are_errors() {
        let script = script();
        let mut f = Fanout::new("tag:", &["t".to_string()], 10, false);
        let r = f.next_round(&script);
        let out = f.apply(&r, vec![Value::Okay]);
        assert!(matches!(out.error, Some(CommandError::UnexpectedReply(_))));
    }
}
