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

use super::{duration, resolve_secret, Origin, Problem, Secret};
use crate::source::postgres::config::{parse_url, Connection};

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
    /// Where the entry is (`file:line:col`), filled by validation: errors found at start and
    /// by `check --against-db` name it like the config's own problems.
    #[serde(skip)]
    pub defined_at: Option<String>,
}

impl ReplicaConfig {
    /// `file:line:col: freshness.replicas NAME`, how errors name the replica.
    pub fn described(&self) -> String {
        match &self.defined_at {
            Some(at) => format!("{at}: freshness.replicas {}", self.name),
            None => format!("freshness.replicas {}", self.name),
        }
    }
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
            let place = origin.problem(&at("name"), String::new());
            replica.defined_at = Some(match place.location {
                Some(location) => format!("{}:{location}", place.file.display()),
                None => place.file.display().to_string(),
            });
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::load_with_env;

    const CORE: &str = "rules: rules.yaml\nsource:\n  kind: kafka\n  kafka:\n    brokers: \"127.0.0.1:9092\"\n    topics: [t]\nsinks:\n  redis:\n    url: \"redis://127.0.0.1:6379\"\n";

    fn load(extra: &str, env: Vec<(String, String)>) -> Result<crate::config::Config, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, format!("{CORE}{extra}")).unwrap();
        std::fs::write(dir.path().join("replica-url"), "postgresql://cdc:pw@10.0.0.2:5432/shop?sslmode=require\n")
            .unwrap();
        load_with_env(&path, env).map_err(|e| e.to_string())
    }

    #[test]
    fn replicas_take_url_env_or_file_and_default_margins() {
        let cfg = load("", vec![]).unwrap();
        assert!(!cfg.freshness.enabled(), "off by default");
        std::env::set_var("CDC_TEST_REPLICA1_URL", "postgresql://cdc:pw@10.0.0.1:5432/shop");
        let cfg = load(
            "freshness:\n  replicas:\n    - { name: replica-1, url_env: CDC_TEST_REPLICA1_URL }\n    - { name: replica-2, url_file: replica-url }\n  margin: 50ms\n",
            vec![],
        )
        .unwrap();
        let f = &cfg.freshness;
        assert!(f.enabled());
        assert_eq!(f.margin, Duration::from_millis(50));
        assert_eq!(f.max_wait, Duration::from_secs(30));
        let hosts: Vec<_> = f.replicas.iter().map(|r| r.connection.as_ref().unwrap().host.clone()).collect();
        assert_eq!(hosts, ["10.0.0.1", "10.0.0.2"]);
        assert!(!format!("{cfg:?}").contains(":pw@"), "the URL is a secret");
    }

    #[test]
    fn bad_replica_settings_are_named_with_file_line_and_column() {
        let err = load(
            "freshness:\n  replicas:\n    - { name: r1, url: \"mysql://x\" }\n    - { name: r1, url: \"postgresql://a@b/c\", url_env: X }\n  margin: 40s\n",
            vec![],
        )
        .unwrap_err();
        assert!(
            err.contains("c.yaml:12:") && err.contains("freshness.replicas[0] (r1): the URL is not valid"),
            "{err}"
        );
        assert!(err.contains("the replica name \"r1\" is used twice"), "{err}");
        assert!(err.contains("exactly one of `url`, `url_env` and `url_file`"), "{err}");
        assert!(
            err.contains("c.yaml:14:") && err.contains("freshness.margin must be shorter than freshness.max_wait"),
            "{err}"
        );
    }
}
