//! What the rules report: the running rules (count, hash, load time) and reloads.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use super::InternalEvent;
use crate::config::Problem;
use crate::telemetry::Metrics;

/// The module whose logs these are (operators filter on it).
const TARGET: &str = "cdc_invalidator::rules::reload";

/// Rules are in force from now on: `rules` of them, of file hash `hash` (the series of the
/// `previous` hash, if any, is removed: one `rules_info` series at a time).
pub struct RulesInForce<'a> {
    pub rules: usize,
    pub hash: &'a str,
    pub previous: Option<&'a str>,
}

impl InternalEvent for RulesInForce<'_> {
    fn emit(self, metrics: &Metrics) {
        metrics.rules_loaded.set(self.rules as i64);
        if let Some(previous) = self.previous {
            let _ = metrics.rules_info.remove_label_values(&[previous]);
        }
        metrics.rules_info.with_label_values(&[self.hash]).set(1);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        metrics.rules_loaded_timestamp.set(now);
    }
}

/// A reload (on `trigger`) swapped in `rules` rules of hash `hash` for those of `previous`.
pub struct RulesReloaded<'a> {
    pub trigger: &'static str,
    pub previous: &'a str,
    pub hash: &'a str,
    pub rules: usize,
}

impl InternalEvent for RulesReloaded<'_> {
    fn emit(self, metrics: &Metrics) {
        metrics.rules_reloads.with_label_values(&["ok"]).inc();
        tracing::info!(
            target: TARGET,
            trigger = self.trigger,
            previous = %self.previous,
            hash = %self.hash,
            rules = self.rules,
            "rules reloaded: later batches use the new rules"
        );
    }
}

/// A reload (on `trigger`) found the rules file `file` invalid: the rules of hash `running`
/// stay in force. Logged with each problem when `log` (a poll logs a given broken text once),
/// then counted, so whoever sees the gauge finds the problems in the log.
pub struct RulesReloadRejected<'a> {
    pub trigger: &'static str,
    pub file: &'a Path,
    pub problems: &'a [Problem],
    pub running: &'a str,
    pub log: bool,
}

impl InternalEvent for RulesReloadRejected<'_> {
    fn emit(self, metrics: &Metrics) {
        if self.log {
            tracing::error!(
                target: TARGET,
                trigger = self.trigger,
                file = %self.file.display(),
                problems = self.problems.len(),
                running = %self.running,
                "rules reload rejected: the running rules stay in force"
            );
            for p in self.problems {
                tracing::error!(target: TARGET, trigger = self.trigger, "rules reload: {p}");
            }
        }
        metrics.rules_reloads.with_label_values(&["error"]).inc();
        metrics.rules_reload_failed.set(1);
    }
}
