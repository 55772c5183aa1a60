//! `cdc-invalidator purge`: the operator's "purge this now", through the daemon's own sinks.
//!
//! ```text
//! --key/--tag/--surrogate-key/--url ──▶ one batch ──▶ layer 0 (Redis) ──▶ layer 1 ──▶ layer 2 ──▶ JSON summary
//!                                                     every sink of a layer at once; the next layer only
//!                                                     once this one finished (as the daemon's layers)
//! ```
//!
//! The items become one batch ([`Invalidations`]) and go through the configured sinks in layer
//! order, like a change event would: a CDN is purged only after Redis confirmed, so it cannot
//! refill from a stale origin. Sinks retry as they always do, but the whole purge is bounded by
//! `--timeout`: a sink still working then is reported `timed_out`, and the layers after an
//! unfinished one are `skipped` (purging a CDN in front of a cache that still holds the old
//! value would only refill it). With `sinks.redis.broadcast` and `warm`, applications are told
//! as for any batch (op `purge`, no position).
//!
//! Output: one JSON object on stdout (what each sink confirmed or rejected, below); logs go to
//! stderr. Exit codes: 0 every sink confirmed everything; 1 something was rejected, timed out,
//! failed or was skipped; 2 invalid config or arguments, or an item kind no configured sink
//! serves (named in the message).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use clap::{Arg, ArgAction, ArgMatches};
use serde::Serialize;

use crate::config::Config;
use crate::shutdown::Shutdown;
use crate::sink::{Invalidations, ItemKind, Origins, Sink, SinkError};
use crate::telemetry::Metrics;

const OK: u8 = 0;
const FAILED: u8 = 1;
const INVALID: u8 = 2;

/// `--timeout` unless given: long enough for a CDN's purge API and a few retries, short enough
/// that an operator is not left waiting on a sink that is down.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A command-line flag that names items of one kind.
pub struct Flag {
    /// `--<long> VALUE`, repeatable.
    pub long: &'static str,
    pub kind: ItemKind,
    pub help: &'static str,
}

/// Every item flag of `purge`, one line per kind: a kind with a line here can be purged by
/// hand. (`--dependents`, a switch rather than items, joins with the dependents kind.)
pub const FLAGS: &[Flag] = &[
    Flag { long: "key", kind: ItemKind::RedisKey, help: "A Redis key to unlink (repeatable)" },
    Flag { long: "tag", kind: ItemKind::RedisTag, help: "A Redis tag to fan out: its keys, then its set (repeatable)" },
    Flag {
        long: "pattern",
        kind: ItemKind::RedisPattern,
        help: "A glob: every matching Redis key is unlinked (SCAN MATCH on every primary; repeatable)",
    },
    Flag {
        long: "surrogate-key",
        kind: ItemKind::SurrogateKey,
        help: "A surrogate key (cache tag) to purge at HTTP caches and CDNs (repeatable)",
    },
    Flag { long: "url", kind: ItemKind::Url, help: "An absolute URL to purge at HTTP caches and CDNs (repeatable)" },
];

fn flag_of(kind: ItemKind) -> Option<&'static str> {
    FLAGS.iter().find(|f| f.kind == kind).map(|f| f.long)
}

/// The items given on the command line, one list per kind (clap arguments built from [`FLAGS`]).
#[derive(Debug, Clone, Default)]
pub struct Items(pub Invalidations);

impl clap::FromArgMatches for Items {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut items = Items::default();
        items.update_from_arg_matches(matches)?;
        Ok(items)
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        for flag in FLAGS {
            if let Some(values) = matches.get_many::<String>(flag.long) {
                self.0.items_mut(flag.kind).extend(values.cloned());
            }
        }
        // `--dependents`: every key, tag and pattern given cascades to its dependents, as
        // under a rule with `redis.dependents: true`.
        if matches.try_get_one::<bool>(DEPENDENTS).ok().flatten().copied().unwrap_or(false) {
            for kind in [ItemKind::RedisKey, ItemKind::RedisTag, ItemKind::RedisPattern] {
                let Some(prefix) = crate::sink::redis::dependents::Root::kind_prefix(kind) else { continue };
                let roots: Vec<String> = self.0.items(kind).iter().map(|i| format!("{prefix}{i}")).collect();
                self.0.items_mut(ItemKind::RedisDependents).extend(roots);
            }
        }
        self.0.normalize();
        Ok(())
    }
}

/// The `--dependents` switch.
const DEPENDENTS: &str = "dependents";

impl clap::Args for Items {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        let cmd = cmd.arg(
            Arg::new(DEPENDENTS)
                .long(DEPENDENTS)
                .action(ArgAction::SetTrue)
                .help("Also invalidate the keys registered as depending on those purged (dep: sets), transitively"),
        );
        FLAGS.iter().fold(cmd, |cmd, flag| {
            cmd.arg(
                Arg::new(flag.long)
                    .long(flag.long)
                    .value_name("VALUE")
                    .value_parser(clap::value_parser!(String))
                    .action(ArgAction::Append)
                    .help(flag.help),
            )
        })
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Items::augment_args(cmd)
    }
}

/// What one sink did with the purge.
#[derive(Debug, Serialize)]
pub struct SinkOutcome {
    pub sink: String,
    pub layer: u8,
    /// `confirmed` (everything), `rejected` (something refused for good), `timed_out` (still
    /// working at `--timeout`), `failed` (an error retrying cannot fix), `skipped` (an earlier
    /// layer did not finish).
    pub status: &'static str,
    /// Items confirmed, by kind (`key`, `tag`, `surrogate_key`, `url`).
    pub confirmed: BTreeMap<&'static str, u64>,
    pub rejected: Vec<RejectedItem>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct RejectedItem {
    pub kind: &'static str,
    pub item: String,
    pub reason: String,
}

/// The JSON summary on stdout.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// `confirmed` (exit 0) or `incomplete` (exit 1).
    pub outcome: &'static str,
    /// What was asked, one list per kind (the `explain` field names).
    pub requested: Invalidations,
    pub sinks: Vec<SinkOutcome>,
}

impl Summary {
    pub fn exit_code(&self) -> u8 {
        if self.sinks.iter().all(|s| s.status == "confirmed") {
            OK
        } else {
            FAILED
        }
    }
}

/// A reason `purge` cannot start: exit 2.
#[derive(Debug, thiserror::Error)]
pub enum PurgeError {
    #[error("nothing to purge: give at least one of {}", FLAGS.iter().map(|f| format!("--{}", f.long)).collect::<Vec<_>>().join(", "))]
    Nothing,
    #[error("no configured sink serves {kind} items (--{flag}): configure {sinks}, or leave --{flag} out")]
    Unserved { kind: ItemKind, flag: &'static str, sinks: &'static str },
    #[error("{0}")]
    Sink(String),
}

/// `purge -c CONFIG [items] [--timeout]`: loads the config, purges, prints the summary.
pub fn main(config_path: &Path, items: Items, timeout: Duration) -> u8 {
    let config = match crate::config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            print_problems(&e);
            return INVALID;
        }
    };
    let preflight = crate::sink::redis::preflight::check(config_path, &config);
    if !preflight.is_empty() {
        preflight.iter().for_each(|p| print_problems(p));
        return INVALID;
    }
    crate::telemetry::logging::init(config.log.format, &config.log.level);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return FAILED;
        }
    };
    let summary = runtime.block_on(purge(&config, items.0, timeout));
    // A sink timed out mid-retry: do not wait for its connection attempts to wind down.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match summary {
        Ok(summary) => {
            match serde_json::to_string(&summary) {
                Ok(json) => println!("{json}"),
                Err(e) => {
                    eprintln!("cannot print the summary: {e}");
                    return FAILED;
                }
            }
            summary.exit_code()
        }
        Err(e) => {
            eprintln!("purge: {}", crate::redact::scrub(&e.to_string()));
            INVALID
        }
    }
}

fn print_problems(err: &dyn std::fmt::Display) {
    for line in crate::redact::scrub(&err.to_string()).lines() {
        eprintln!("{line}");
    }
}

/// Purges `items` through the sinks `config` names, in layer order, within `timeout`.
pub async fn purge(config: &Config, items: Invalidations, timeout: Duration) -> Result<Summary, PurgeError> {
    let metrics = Arc::new(Metrics::new());
    let (layers, sinks) = crate::app::build_sinks(config, &metrics).map_err(|e| PurgeError::Sink(e.to_string()))?;
    purge_through(layers.into_iter().zip(sinks).collect(), items, timeout).await
}

/// [`purge`] with the sinks given (in layer order, each with its layer).
pub async fn purge_through(
    sinks: Vec<(u8, Arc<dyn Sink>)>,
    mut items: Invalidations,
    timeout: Duration,
) -> Result<Summary, PurgeError> {
    if items.is_empty() {
        return Err(PurgeError::Nothing);
    }
    for kind in ItemKind::ALL {
        if !items.items(kind).is_empty() && !sinks.iter().any(|(_, s)| s.kinds().contains(&kind)) {
            let flag = flag_of(kind).unwrap_or("?");
            let configure = match kind {
                ItemKind::SurrogateKey | ItemKind::Url => "sinks.cdn",
                _ => "sinks.redis",
            };
            return Err(PurgeError::Unserved { kind, flag, sinks: configure });
        }
    }
    if sinks.iter().any(|(_, s)| s.wants_origins()) {
        items.set_origins(Origins::manual(&items));
    }
    let deadline = tokio::time::Instant::now() + timeout;
    // Never fires: the deadline bounds the work, and a sink still retrying then is dropped
    // mid-way, which the sink contract allows (deletes are idempotent).
    let shutdown = Shutdown::never();
    let mut outcomes = Vec::new();
    let mut finished = true;
    let mut start = 0;
    while let Some((layer, _)) = sinks.get(start) {
        let layer = *layer;
        let end = sinks.iter().skip(start).position(|(l, _)| *l != layer).map_or(sinks.len(), |n| start + n);
        let serving: Vec<&Arc<dyn Sink>> = sinks
            .get(start..end)
            .unwrap_or_default()
            .iter()
            .map(|(_, s)| s)
            .filter(|s| s.kinds().iter().any(|&k| !items.items(k).is_empty()))
            .collect();
        start = end;
        if !finished {
            outcomes.extend(serving.iter().map(|s| outcome(s.name(), layer, "skipped")));
            continue;
        }
        let calls = serving.iter().map(|sink| {
            let (items, shutdown) = (&items, &shutdown);
            async move { tokio::time::timeout_at(deadline, sink.invalidate(items, shutdown)).await }
        });
        for (sink, result) in serving.iter().zip(futures::future::join_all(calls).await) {
            let mut done = outcome(sink.name(), layer, "confirmed");
            match result {
                Ok(Ok(report)) => {
                    for (kind, n) in report.confirmed {
                        *done.confirmed.entry(kind.as_str()).or_default() += n;
                    }
                    for r in report.rejected {
                        let item = items.items(r.kind).get(r.index).cloned().unwrap_or_default();
                        done.rejected.push(RejectedItem { kind: r.kind.as_str(), item, reason: r.reason });
                    }
                    if !done.rejected.is_empty() {
                        done.status = "rejected";
                    }
                }
                Ok(Err(SinkError::Abandoned)) | Err(_) => {
                    done.status = "timed_out";
                    done.error = Some(format!("not finished within --timeout {}", humantime(timeout)));
                    finished = false;
                }
                Ok(Err(SinkError::Fatal(message))) => {
                    done.status = "failed";
                    done.error = Some(crate::redact::scrub(&message).into_owned());
                    finished = false;
                }
            }
            outcomes.push(done);
        }
    }
    let all_confirmed = outcomes.iter().all(|o| o.status == "confirmed");
    let outcome = if all_confirmed { "confirmed" } else { "incomplete" };
    // Serialized without its origins: one list per kind.
    Ok(Summary { outcome, requested: items, sinks: outcomes })
}

fn outcome(sink: &str, layer: u8, status: &'static str) -> SinkOutcome {
    SinkOutcome { sink: sink.to_string(), layer, status, confirmed: BTreeMap::new(), rejected: Vec::new(), error: None }
}

fn humantime(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}
