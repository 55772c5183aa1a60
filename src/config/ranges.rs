//! The range every duration and count of the config must lie in, checked at load time so that
//! `check` rejects what `run` could not use: a zero period panics (`tokio::time::interval`), a
//! zero backoff spins, a zero timeout fails every command, and a huge one never fires. Ranges
//! that belong to one component (the PostgreSQL source, each CDN provider) live with it; these
//! are the settings shared by the whole daemon.

use std::time::Duration;

use super::{Config, Origin, Problem};
use crate::retry::RetryPolicy;

pub(crate) const MS: Duration = Duration::from_millis(1);
pub(crate) const TEN_MINUTES: Duration = Duration::from_secs(600);
pub(crate) const HOUR: Duration = Duration::from_secs(3600);

/// A duration as an operator writes one: `250ms`, `5s`, `10m`, `1h`.
fn human(d: Duration) -> String {
    if d.is_zero() {
        return "0s".into();
    }
    match d.as_millis() {
        0 => format!("{}us", d.as_micros()),
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
        ms => format!("{ms}ms"),
    }
}

/// A config path as the README spells it: `sinks.cdn[0].timeout`.
fn dotted(path: &[&str]) -> String {
    let mut out = String::new();
    for seg in path {
        if seg.bytes().all(|b| b.is_ascii_digit()) && !out.is_empty() {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(seg);
        }
    }
    out
}

/// Checks values against their ranges, adding a problem (at the value, in the README's spelling)
/// for each one outside. Components use it for their own sections.
pub(crate) struct Ranges<'a, 'o> {
    origin: &'a Origin<'o>,
    problems: &'a mut Vec<Problem>,
}

impl<'a, 'o> Ranges<'a, 'o> {
    pub(crate) fn new(origin: &'a Origin<'o>, problems: &'a mut Vec<Problem>) -> Self {
        Ranges { origin, problems }
    }

    pub(crate) fn duration(&mut self, path: &[&str], value: Duration, min: Duration, max: Duration) {
        if value < min || value > max {
            self.problems.push(self.origin.problem(
                path,
                format!("{} must be between {} and {} (found {})", dotted(path), human(min), human(max), human(value)),
            ));
        }
    }

    pub(crate) fn count(&mut self, path: &[&str], value: u64, min: u64, max: u64) {
        if value < min || value > max {
            self.problems.push(
                self.origin.problem(path, format!("{} must be between {min} and {max} (found {value})", dotted(path))),
            );
        }
    }

    pub(crate) fn retry(&mut self, path: &[&str], policy: &RetryPolicy) {
        let at = |field: &'static str| -> Vec<&str> { path.iter().copied().chain([field]).collect() };
        self.duration(&at("initial"), policy.initial, MS, HOUR);
        self.duration(&at("max"), policy.max, MS, HOUR);
        if policy.max < policy.initial {
            let max = at("max");
            self.problems.push(self.origin.problem(
                &max,
                format!("{} must be at least {}.initial ({})", dotted(&max), dotted(path), human(policy.initial)),
            ));
        }
        if let Some(n) = policy.max_attempts {
            self.count(&at("max_attempts"), u64::from(n), 1, u64::from(u32::MAX));
        }
    }
}

/// Adds a problem for every shared duration or count outside its range (each source and sink
/// checks its own section's in its `validate`).
pub(super) fn check(config: &Config, origin: &Origin, problems: &mut Vec<Problem>) {
    let mut r = Ranges::new(origin, problems);
    r.count(&["pipeline", "queue_capacity"], config.pipeline.queue_capacity as u64, 1, 10_000_000);
    r.retry(&["dead_letter", "retry"], &config.dead_letter.retry);
    r.duration(&["shutdown", "grace"], config.shutdown.grace, Duration::ZERO, HOUR);
}

#[cfg(test)]
mod tests {
    use super::human;
    use std::time::Duration;

    const CONFIG: &str = r#"rules: rules.yaml
source:
  kind: kafka
  kafka:
    brokers: "127.0.0.1:9092"
    topics: [t]
    commit_interval: 0s
    max_in_flight_bytes: 0
sinks:
  redis:
    url: "redis://127.0.0.1:6379"
    connect_timeout: 0ms
    retry: { initial: 0s, max: 2h, max_attempts: 0 }
  cdn:
    - { kind: varnish, name: v, nodes: ["http://127.0.0.1:6081"], timeout: 0s, retry: { initial: 2s, max: 1s } }
pipeline:
  queue_capacity: 0
  batch_max_events: 0
shutdown:
  grace: 2h
"#;

    /// `commit_interval: 0s` passed `check` and made `run` panic (`period must be non-zero`).
    #[test]
    fn every_out_of_range_setting_is_reported_with_its_location() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, CONFIG).unwrap();
        let err = crate::config::load_with_env(&path, []).unwrap_err();
        let text = err.to_string();
        for expected in [
            "c.yaml:7:22: source.kafka.commit_interval must be between 10ms and 10m (found 0s)",
            "c.yaml:12:22: sinks.redis.connect_timeout must be between 1ms and 10m (found 0s)",
            "c.yaml:13:23: sinks.redis.retry.initial must be between 1ms and 1h (found 0s)",
            "sinks.redis.retry.max must be between 1ms and 1h (found 2h)",
            "sinks.redis.retry.max_attempts must be between 1 and",
            "sinks.cdn[0].timeout must be between 1ms and 10m (found 0s)",
            "sinks.cdn[0].retry.max must be at least sinks.cdn[0].retry.initial (2s)",
            "pipeline.queue_capacity must be between 1 and 10000000 (found 0)",
            "c.yaml:8:26: source.kafka.max_in_flight_bytes must be between 1 and 1099511627776 (found 0)",
            "c.yaml:20:10: shutdown.grace must be between 0s and 1h (found 2h)",
        ] {
            assert!(text.contains(expected), "{expected}\n{text}");
        }
    }

    #[test]
    fn durations_read_as_written() {
        assert_eq!(human(Duration::ZERO), "0s");
        assert_eq!(human(Duration::from_millis(10)), "10ms");
        assert_eq!(human(Duration::from_secs(600)), "10m");
        assert_eq!(human(Duration::from_secs(3600)), "1h");
        assert_eq!(human(Duration::from_micros(5)), "5us");
    }
}
