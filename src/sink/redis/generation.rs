//! Generations: `redis.generations` keys hold a number that only grows, the source position
//! of the newest change that touched them, so an application that builds versioned keys
//! (`product:42:v<gen>`) moves on to a fresh key whenever the row changes, and the old
//! versions simply stop being read (and expire).
//!
//! # The position
//!
//! [`position_of`]: the PostgreSQL LSN of the transaction's commit record (pgoutput), or
//! Debezium's `source.lsn` (PostgreSQL connector), or, where the source has no LSN (MySQL,
//! SQL Server, MongoDB...), the commit time in microseconds since the epoch. The two scales do
//! not mix: a generation key must be fed by one kind of source (a commit time is far above
//! any LSN, and would hold the key above every later LSN). For that reason a replayed dead
//! letter (`replay`) whose message carries no `source.lsn` gets no position, and its generation
//! items are rejected rather than stamped with a time on what may be an LSN-fed key.
//!
//! # How a position travels
//!
//! The rules render the key; intake ([`stamp`], called by the pipeline for every event) then
//! appends the event's position to each generation item as `key \x1f position`. So a batch's
//! union keeps, for one key, one item per distinct position, and the sink asks the script once
//! per key with the highest of them ([`highest_per_key`]): coalescing keeps the maximum.
//! `explain` shows the keys as rendered (it has no position).
//!
//! # The script
//!
//! `generation.lua` compares the position with what the key holds as decimal digit strings
//! (exact for all 64 bits, where Lua's doubles are not) and sets it only when higher: a
//! redelivered or older event never moves a generation back, and a second pass or a retry is
//! harmless. A key holding another type, or a string that is not a number, is left alone and
//! the item rejected with the reason.
//!
//! One call takes up to [`KEYS_PER_CALL`] keys (in a cluster, keys of one slot: calls are
//! grouped into one pipeline per slot) and answers one bulk string of line records, one per
//! key ([`answers`]), not an array per key: the client's parser costs about a thousand
//! instructions per RESP value it reads (`fanout.rs`, "One call for many tags, one string
//! back"), and a generation is asked for on every event that renders one.

use std::collections::BTreeMap;

use redis::Value;

use super::connection::{item, CommandError};
use super::{slot, Backend, RedisSink};
use crate::shutdown::Shutdown;
use crate::sink::{Invalidations, ItemKind, Rejected, SinkError};
use crate::source::{Position, SourceEvent};
use crate::telemetry::events::sink_redis::{GenerationKeyWrongType, GenerationOutcome, GenerationWritten};

/// Between a generation key and its position in a stamped item: a control character no
/// reasonable key holds, and the position is all digits, so the last one splits them exactly.
const SEPARATOR: char = '\u{1f}';

/// Keys one script call takes at most: its bound on how long it holds Redis (a GET and a SET
/// a key, about a millisecond in all), as `fanout.rs`'s `TAGS_PER_CALL` is.
const KEYS_PER_CALL: usize = 256;

/// Keys per round trip (standalone): four calls.
const KEYS_PER_ROUND: usize = 4 * KEYS_PER_CALL;

/// The source position of an event for its generations (see the module docs); `None` when it
/// has none that can be trusted to grow.
pub fn position_of(event: &SourceEvent) -> Option<u64> {
    match &event.position {
        // A replayed message: only its own LSN (a time could freeze an LSN-fed key).
        Position::File { .. } => match &event.decoded {
            Ok(crate::event::Decoded::Change(change)) => change.lsn,
            _ => None,
        },
        // The position the broadcast also carries: the commit LSN, else the commit time in µs.
        _ => crate::sink::origins::position(event),
    }
}

/// Appends `position` to every generation item of `set` (intake, once per event). Without a
/// position the items stay as rendered, and the sink rejects them.
pub fn stamp(set: &mut Invalidations, position: Option<u64>) {
    let Some(position) = position else { return };
    let items = set.items_mut(ItemKind::RedisGeneration);
    if items.is_empty() {
        return;
    }
    for item in items.iter_mut() {
        item.push(SEPARATOR);
        item.push_str(&position.to_string());
    }
    // The lists stay sorted: the layers look items up by binary search.
    items.sort_unstable();
}

/// A stamped item's key and position.
fn split(item: &str) -> Option<(&str, u64)> {
    let (key, position) = item.rsplit_once(SEPARATOR)?;
    Some((key, position.parse().ok()?))
}

/// One key to advance: the highest position asked for it, and the items that asked.
#[derive(Debug, PartialEq, Eq)]
struct Advance {
    key: String,
    position: u64,
    items: Vec<usize>,
}

/// The batch's items as one advance per key, to the highest position, and the indexes of items
/// without a position.
fn highest_per_key(items: &[String]) -> (Vec<Advance>, Vec<usize>) {
    let mut by_key: BTreeMap<&str, Advance> = BTreeMap::new();
    let mut unstamped = Vec::new();
    for (index, item) in items.iter().enumerate() {
        let Some((key, position)) = split(item) else {
            unstamped.push(index);
            continue;
        };
        let advance =
            by_key.entry(key).or_insert_with(|| Advance { key: key.to_string(), position, items: Vec::new() });
        advance.position = advance.position.max(position);
        advance.items.push(index);
    }
    (by_key.into_values().collect(), unstamped)
}

/// What the script said about one key.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Advanced,
    Kept,
    NotAGeneration(String),
}

/// One call's reply: the records of its `keys` keys, in order (`generation.lua`). Anything
/// else (another count, an unknown record, a record without its newline) is an error.
fn answers(reply: Value, keys: usize) -> Result<Vec<Answer>, CommandError> {
    let reply = item(reply).map_err(CommandError::Redis)?;
    let unexpected = |what: String| CommandError::UnexpectedReply(format!("the generation script {what}"));
    let records = match &reply {
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok(),
        _ => None,
    }
    .ok_or_else(|| unexpected(format!("answered {reply:?}")))?;
    let mut out = Vec::with_capacity(keys);
    let mut rest = records;
    while !rest.is_empty() {
        let Some((record, after)) = rest.split_once('\n') else {
            return Err(unexpected(format!("answered {records:?}: a record without its newline")));
        };
        rest = after;
        out.push(match record {
            "1" => Answer::Advanced,
            "0" => Answer::Kept,
            _ => match record.strip_prefix("-1 ") {
                Some(what) if !what.is_empty() => Answer::NotAGeneration(what.to_string()),
                _ => return Err(unexpected(format!("answered {record:?} for a key"))),
            },
        });
    }
    if out.len() != keys {
        return Err(unexpected(format!("answered for {} keys of {keys}", out.len())));
    }
    Ok(out)
}

/// The script. Every pipeline of calls starts with `SCRIPT LOAD` (a kilobyte, once per round
/// or slot): a server that restarted or failed over has it again before the calls, without a
/// NOSCRIPT round trip and the bookkeeping of which node has it.
pub(super) struct GenerationScript {
    script: redis::Script,
}

impl GenerationScript {
    pub(super) fn new() -> GenerationScript {
        GenerationScript { script: redis::Script::new(include_str!("generation.lua")) }
    }

    /// One call for `keys` (at most [`KEYS_PER_CALL`]): the keys, then their positions.
    fn call(&self, keys: &[&Advance]) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.script.get_hash()).arg(keys.len());
        for advance in keys {
            cmd.arg(&advance.key);
        }
        for advance in keys {
            cmd.arg(advance.position);
        }
        cmd
    }

    /// A pipeline of calls for `keys`, [`KEYS_PER_CALL`] a call, after SCRIPT LOAD.
    fn pipeline<'a>(&self, keys: impl IntoIterator<Item = &'a Advance>) -> redis::Pipeline {
        let keys: Vec<&Advance> = keys.into_iter().collect();
        let mut pipe = redis::pipe();
        pipe.cmd("SCRIPT").arg("LOAD").arg(include_str!("generation.lua"));
        for call in keys.chunks(KEYS_PER_CALL) {
            pipe.add_command(self.call(call));
        }
        pipe
    }
}

/// The replies of [`GenerationScript::pipeline`] for `keys` keys (WAIT's taken off): SCRIPT
/// LOAD's, then one per call; an answer per key, in order.
fn read_replies(replies: Vec<Value>, keys: usize) -> Result<Vec<Answer>, CommandError> {
    let mut replies = replies.into_iter();
    if let Some(loaded) = replies.next() {
        item(loaded).map_err(CommandError::Redis)?;
    }
    let mut out = Vec::with_capacity(keys);
    for reply in replies {
        let left = keys.saturating_sub(out.len());
        if left == 0 {
            return Err(CommandError::UnexpectedReply("a generation reply for a call that was not made".into()));
        }
        out.extend(answers(reply, left.min(KEYS_PER_CALL))?);
    }
    if out.len() != keys {
        return Err(CommandError::UnexpectedReply(format!("generation answers for {} keys of {keys}", out.len())));
    }
    Ok(out)
}

/// What a batch's generations came to.
pub(super) struct Generations {
    pub(super) confirmed: u64,
    pub(super) rejected: Vec<Rejected>,
}

impl RedisSink {
    /// Sets every generation key of the batch to its highest position where that is higher.
    pub(super) async fn advance_generations(
        &self,
        items: &[String],
        shutdown: &Shutdown,
    ) -> Result<Generations, SinkError> {
        let (calls, unstamped) = highest_per_key(items);
        let answers = match &self.backend {
            Backend::Single(_) => self.generations_single(&calls, shutdown).await?,
            Backend::Cluster(cluster) => {
                let mut by_slot: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
                for (i, call) in calls.iter().enumerate() {
                    by_slot.entry(slot::slot(call.key.as_bytes())).or_default().push(i);
                }
                let pipes: Vec<(u16, redis::Pipeline)> = by_slot
                    .iter()
                    .map(|(slot, here)| (*slot, self.generation.pipeline(here.iter().filter_map(|&i| calls.get(i)))))
                    .collect();
                let keys: Vec<usize> = by_slot.values().map(Vec::len).collect();
                let read = |pipe: usize, replies| read_replies(replies, keys.get(pipe).copied().unwrap_or(0));
                let per_slot = self.slot_pipelines(cluster, &pipes, read, shutdown).await?;
                let mut answers: Vec<Option<Answer>> = vec![None; calls.len()];
                for ((_, calls_here), slot_answers) in by_slot.iter().zip(per_slot) {
                    for (&i, a) in calls_here.iter().zip(slot_answers) {
                        if let Some(slot) = answers.get_mut(i) {
                            *slot = Some(a);
                        }
                    }
                }
                answers.into_iter().map(|a| a.unwrap_or(Answer::Kept)).collect()
            }
        };
        let mut out = Generations { confirmed: 0, rejected: Vec::new() };
        for index in unstamped {
            out.rejected.push(Rejected {
                kind: ItemKind::RedisGeneration,
                index,
                reason: "the event has no source position a generation can hold (no LSN, no commit time; a replayed message without source.lsn)".into(),
            });
        }
        for (call, answer) in calls.iter().zip(answers) {
            match answer {
                Answer::Advanced => self.telemetry.emit(GenerationWritten { outcome: GenerationOutcome::Advanced }),
                Answer::Kept => self.telemetry.emit(GenerationWritten { outcome: GenerationOutcome::Kept }),
                Answer::NotAGeneration(what) => {
                    self.telemetry.emit(GenerationKeyWrongType);
                    for &index in &call.items {
                        out.rejected.push(Rejected {
                            kind: ItemKind::RedisGeneration,
                            index,
                            reason: format!(
                                "the generation key {:?} holds a {what}, not a position; it was left as it is",
                                call.key
                            ),
                        });
                    }
                    continue;
                }
            }
            out.confirmed += call.items.len() as u64;
        }
        Ok(out)
    }

    /// Standalone or Sentinel: rounds of script calls, each followed by WAIT when configured.
    async fn generations_single(&self, calls: &[Advance], shutdown: &Shutdown) -> Result<Vec<Answer>, SinkError> {
        let Backend::Single(connection) = &self.backend else { return Ok(Vec::new()) };
        let mut all = Vec::with_capacity(calls.len());
        for round in calls.chunks(KEYS_PER_ROUND) {
            let pipe = &self.generation.pipeline(round);
            let got = self
                .with_retries(shutdown, move || async move {
                    let mut pipe = pipe.clone();
                    let plan = self.add_wait(&mut pipe, 0);
                    let mut replies = connection.round_trip(&pipe).await?;
                    self.check_wait(plan, &mut replies)?;
                    read_replies(replies, round.len())
                })
                .await?;
            all.extend(got);
        }
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamped_items_coalesce_to_the_highest_position_per_key() {
        let mut a = Invalidations::of(ItemKind::RedisGeneration, vec!["gen:b".into(), "gen:a".into()]);
        stamp(&mut a, Some(900));
        let mut b = Invalidations::of(ItemKind::RedisGeneration, vec!["gen:a".into()]);
        stamp(&mut b, Some(1200));
        let mut unknown = Invalidations::of(ItemKind::RedisGeneration, vec!["gen:c".into()]);
        stamp(&mut unknown, None);
        let all = Invalidations::union([&a, &b, &unknown]);
        let (calls, unstamped) = highest_per_key(all.items(ItemKind::RedisGeneration));
        let got: Vec<(&str, u64, usize)> = calls.iter().map(|c| (c.key.as_str(), c.position, c.items.len())).collect();
        assert_eq!(got, [("gen:a", 1200, 2), ("gen:b", 900, 1)]);
        assert_eq!(unstamped.len(), 1);
        assert_eq!(all.items(ItemKind::RedisGeneration).get(unstamped[0]).map(String::as_str), Some("gen:c"));
    }

    #[test]
    fn a_key_holding_the_separator_still_splits_at_the_position() {
        let mut set = Invalidations::of(ItemKind::RedisGeneration, vec!["odd\u{1f}7:key".into()]);
        stamp(&mut set, Some(u64::MAX));
        assert_eq!(split(&set.items(ItemKind::RedisGeneration)[0]), Some(("odd\u{1f}7:key", u64::MAX)));
        assert_eq!(split("no position"), None);
    }

    #[test]
    fn script_replies_are_read_and_nonsense_is_an_error() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let read = answers(bulk("1\n0\n-1 hash\n-1 string that is not a decimal number\n"), 4);
        assert_eq!(
            read.unwrap_or_else(|e| panic!("{e}")),
            [
                Answer::Advanced,
                Answer::Kept,
                Answer::NotAGeneration("hash".into()),
                Answer::NotAGeneration("string that is not a decimal number".into())
            ]
        );
        for (nonsense, keys) in [
            (Value::Okay, 1),
            (Value::Array(vec![Value::Int(1), bulk("5")]), 1),
            (Value::Int(1), 1),
            (bulk("1\n0\n"), 1),
            (bulk("1\n"), 2),
            (bulk("1"), 1),
            (bulk("1\n0"), 2),
            (bulk("2\n"), 1),
            (bulk("-1 \n"), 1),
            (bulk("-1\n"), 1),
            (bulk(" 1\n"), 1),
            (bulk("\n"), 1),
            (Value::BulkString(vec![0xff, b'\n']), 1),
        ] {
            let read = answers(nonsense.clone(), keys);
            assert!(matches!(read, Err(CommandError::UnexpectedReply(_))), "{nonsense:?} for {keys}: {read:?}");
        }
    }

    /// A pipeline's replies: SCRIPT LOAD's, then a call's per [`KEYS_PER_CALL`] keys, whose
    /// counts must be those of the calls made.
    #[test]
    fn a_pipelines_replies_give_one_answer_per_key_in_order() {
        let records = |n: usize, record: &str| Value::BulkString(record.repeat(n).into_bytes());
        let loaded = || Value::BulkString(b"sha".to_vec());
        let keys = KEYS_PER_CALL + 3;
        let replies = vec![loaded(), records(KEYS_PER_CALL, "1\n"), records(3, "0\n")];
        let read = read_replies(replies, keys).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read.len(), keys);
        assert!(read[..KEYS_PER_CALL].iter().all(|a| *a == Answer::Advanced));
        assert!(read[KEYS_PER_CALL..].iter().all(|a| *a == Answer::Kept));
        for wrong in [
            vec![loaded(), records(KEYS_PER_CALL, "1\n")],
            vec![loaded(), records(keys, "1\n")],
            vec![loaded(), records(KEYS_PER_CALL, "1\n"), records(3, "0\n"), records(1, "0\n")],
        ] {
            assert!(matches!(read_replies(wrong, keys), Err(CommandError::UnexpectedReply(_))));
        }
    }
}
