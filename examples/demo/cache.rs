//! What the shop application does with Redis (cache a value, register it under a tag), and the
//! demo's eyes on it: watching keys disappear and dead letters appear.

use std::path::Path;
use std::time::Instant;

use redis::aio::MultiplexedConnection;
use serde_json::Value;

use crate::{DemoResult, INVALIDATION_DEADLINE, POLL};

/// What one change must do.
pub struct Expected<'a> {
    /// Keys that must be gone from Redis afterwards.
    pub gone: &'a [&'a str],
    /// The reason of the dead letter the change must produce, if any.
    pub dead_letter: Option<&'a str>,
}

/// Waits until every key of `expected.gone` has disappeared and its dead letter (if any) is
/// written, printing each as it happens with the milliseconds since `t0`. Returns what did not
/// happen within the deadline. `letters_seen` counts the dead letters already shown.
pub async fn watch(
    redis: &mut MultiplexedConnection,
    expected: &Expected<'_>,
    t0: Instant,
    dead_letters: &Path,
    letters_seen: &mut usize,
) -> DemoResult<Vec<String>> {
    let mut waiting: Vec<&str> = expected.gone.to_vec();
    let mut letter_due = expected.dead_letter;
    let mut missed = Vec::new();
    loop {
        if !waiting.is_empty() {
            let mut pipe = redis::pipe();
            for key in &waiting {
                pipe.cmd("EXISTS").arg(*key);
            }
            let present: Vec<bool> = pipe.query_async(redis).await?;
            let ms = t0.elapsed().as_millis();
            let mut still = Vec::with_capacity(waiting.len());
            for (key, present) in waiting.iter().zip(present) {
                if present {
                    still.push(*key);
                } else {
                    println!("     {ms:>5} ms  gone  {key}");
                }
            }
            waiting = still;
        }
        let letters = read_dead_letters(dead_letters);
        for letter in letters.iter().skip(*letters_seen) {
            let reason = letter.get("reason").and_then(Value::as_str).unwrap_or("?");
            let position = letter.get("position").and_then(Value::as_str).unwrap_or("?");
            println!("     {:>5} ms  dead-lettered ({reason}) at {position}", t0.elapsed().as_millis());
            match letter_due {
                Some(want) if want == reason => letter_due = None,
                _ => missed.push(format!("an unexpected dead letter ({reason}) at {position}")),
            }
        }
        *letters_seen = letters.len();

        if waiting.is_empty() && letter_due.is_none() {
            return Ok(missed);
        }
        if t0.elapsed() > INVALIDATION_DEADLINE {
            for key in waiting {
                println!("     NOT GONE after {INVALIDATION_DEADLINE:?}: {key}");
                missed.push(format!("{key} still cached after {INVALIDATION_DEADLINE:?}"));
            }
            if let Some(reason) = letter_due {
                println!("     NO dead letter ({reason}) after {INVALIDATION_DEADLINE:?}");
                missed.push(format!("no {reason} dead letter after {INVALIDATION_DEADLINE:?}"));
            }
            return Ok(missed);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `SET key value`, printed as the application would issue it.
pub async fn cache(redis: &mut MultiplexedConnection, key: &str, value: &str) -> DemoResult<()> {
    redis::cmd("SET").arg(key).arg(value).query_async::<()>(redis).await?;
    println!("   SET  {key:<26} {value}");
    Ok(())
}

/// `SADD tag member`: registers a cached key under a tag, so a tag invalidation finds it.
pub async fn register(redis: &mut MultiplexedConnection, tag: &str, key: &str) -> DemoResult<()> {
    redis::cmd("SADD").arg(tag).arg(key).query_async::<()>(redis).await?;
    println!("   SADD {tag:<26} {key}");
    Ok(())
}

/// `EXISTS key`.
pub async fn exists(redis: &mut MultiplexedConnection, key: &str) -> DemoResult<bool> {
    Ok(redis::cmd("EXISTS").arg(key).query_async(redis).await?)
}

/// The dead-letter file, one JSON object a line (a line that is not JSON is kept as a string).
pub fn read_dead_letters(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| Value::String(line.to_string())))
        .collect()
}

/// Checks that category 9, which no change touches, is still cached; a miss is a failure.
/// `what` names the input ("event" or "change") in the messages.
pub async fn check_untouched(
    redis: &mut MultiplexedConnection,
    what: &str,
    failures: &mut Vec<String>,
) -> DemoResult<()> {
    for key in ["listing:category:9:page:1", "tag:category:9"] {
        if exists(redis, key).await? {
            println!("   still cached: {key}   (category 9 was not touched)");
        } else {
            failures.push(format!("{key} was invalidated, but no {what} touched category 9"));
            println!("   MISSING: {key}, though no {what} touched category 9");
        }
    }
    Ok(())
}
