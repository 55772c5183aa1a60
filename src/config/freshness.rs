//! `freshness`: the read replicas the application fills caches from, so that an event's second
//! pass goes out only once every one of them has replayed the event's commit.
//!
//! ```yaml
//! freshness:
//!   replicas:
//!     - name: replica-1
//!       url_env: REPLICA1_URL   # a PostgreSQL physical standby; url / url_env / url_file
//!   margin: 100ms
//!   max_wait: 30s
//! ```

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::postgres::{parse_url, Connection};
use super::{duration, resolve_secret, Origin, Problem, Secret};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FreshnessConfig {
    #[serde(default)]
    pub replicas: Vec<ReplicaConfig>,
    /// After every replica has replayed the commit, wait this long before the second pass
    /// (a reader that started its replica read just before the replay may still write late).
    #[serde(default = "default_margin", with = "duration")]
    pub margin: Duration,
    /// A replica further behind (or down): the second pass goes anyway, counted and logged.
    #[serde(default = "default_max_wait", with = "duration")]
    pub max_wait: Duration,
    /// How often each replica's replay position is read.
    #[serde(default = "default_poll_interval", with = "duration")]
    pub poll_interval: Duration,
}

impl Default for FreshnessConfig {
    fn default() -> Self {
        FreshnessConfig {
            replicas: Vec::new(),
            margin: default_margin(),
            max_wait: default_max_wait(),
            poll_interval: default_poll_interval(),
        }
    }
}

fn default_margin() -> Duration {
    Duration::from_millis(100)
}
fn default_max_wait() -> Duration {
    Duration::from_secs(30)
}
fn default_poll_interval() -> Duration {
    Duration::from_millis(25)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaConfig {
    /// Labels the replica's metrics and log lines.
    pub name: String,
    pub url: Option<Secret>,
    pub url_env: Option<String>,
    pub url_file: Option<PathBuf>,
    /// The resolved, parsed URL, filled by validation.
    #[serde(skip)]
    pub connection: Option<Connection>,
}

impl FreshnessConfig {
    /// Whether the second pass is gated on replicas at all.
    pub fn enabled(&self) -> bool {
        !self.replicas.is_empty()
    }

    pub(super) fn validate(&mut self, origin: &Origin, problems: &mut Vec<Problem>) {
        let mut names = std::collections::HashSet::new();
        for (i, replica) in self.replicas.iter_mut().enumerate() {
            let idx = i.to_string();
            let at = |key: &'static str| -> Vec<&str> { vec!["freshness", "replicas", idx.as_str(), key] };
            let name_ok = !replica.name.is_empty()
                && replica.name.len() <= 64
                && replica.name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !name_ok {
                problems.push(origin.problem(
                    &at("name"),
                    format!("freshness.replicas[{i}].name must be 1 to 64 letters, digits, `-`, `_` or `.` (it labels metrics)"),
                ));
            } else if !names.insert(replica.name.clone()) {
                problems.push(origin.problem(
                    &at("name"),
                    format!("freshness.replicas[{i}]: the replica name {:?} is used twice", replica.name),
                ));
            }
            let url = resolve_secret(
                origin,
                &at("url"),
                replica.url.as_ref(),
                replica.url_env.as_deref(),
                replica.url_file.as_deref(),
                problems,
            );
            if let Some(url) = url {
                match parse_url(url.expose(), origin.file) {
                    Ok(c) => replica.connection = Some(c),
                    Err(e) => problems.push(origin.problem(
                        &at("url"),
                        format!("freshness.replicas[{i}] ({}): the URL is not valid: {e}", replica.name),
                    )),
                }
            }
        }
        if self.max_wait.is_zero() || self.max_wait > Duration::from_secs(3600) {
            problems.push(
                origin.problem(&["freshness", "max_wait"], "freshness.max_wait must be more than 0 and at most 1h"),
            );
        }
        if self.margin >= self.max_wait {
            problems.push(
                origin.problem(&["freshness", "margin"], "freshness.margin must be shorter than freshness.max_wait"),
            );
        }
        if self.poll_interval < Duration::from_millis(5) || self.poll_interval > Duration::from_secs(1) {
            problems.push(
                origin.problem(&["freshness", "poll_interval"], "freshness.poll_interval must be between 5ms and 1s"),
            );
        }
    }
}
