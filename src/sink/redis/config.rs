//! `sinks.redis`: a target's settings ([`RedisConfig`]), its deployment (standalone, cluster or
//! sentinel: `mode`), the list form that names several targets (one per region or cluster), and
//! their validation.

use std::collections::HashSet;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Duration;

use std::path::PathBuf;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::config::ranges::{Ranges, MS, TEN_MINUTES};
use crate::config::{duration, resolve_secret, Origin, Problem, Secret};
use crate::retry::RetryPolicy;
use crate::telemetry::Metrics;

mod more_ways;

/// The name a single (unnamed) `sinks.redis` object gets: the metric label it always had.
pub const DEFAULT_TARGET_NAME: &str = "redis";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]` or `rediss://` for TLS. Exactly one of `url`,
    /// `url_env` (a variable holding it) and `url_file` (a file holding it).
    pub url: Option<Secret>,
    pub url_env: Option<String>,
    pub url_file: Option<PathBuf>,
    /// Prefix of the Redis sets that hold a tag's keys: tag `category:5` is the set
    /// `<tag_prefix>category:5`.
    #[serde(default = "default_tag_prefix")]
    pub tag_prefix: String,
    /// Keys per UNLINK command; commands of one batch are pipelined.
    #[serde(default = "default_unlink_batch")]
    pub unlink_batch: usize,
    /// Members popped and unlinked per server-side script call during tag fan-out: bounds how
    /// long one call holds Redis.
    #[serde(default = "default_tag_chunk")]
    pub tag_chunk: usize,
    /// Per-command timeout; a timed-out command is retried.
    #[serde(default = "default_response_timeout", with = "duration")]
    pub response_timeout: Duration,
    #[serde(default = "default_connect_timeout", with = "duration")]
    pub connect_timeout: Duration,
    #[serde(default)]
    pub retry: RetryPolicy,
    /// The target's name (metric label, log field); required in the list form, `redis` otherwise.
    pub name: Option<String>,
    /// standalone (default), cluster or sentinel.
    #[serde(default)]
    pub mode: RedisMode,
    /// Cluster seed nodes (`mode: cluster`); may carry credentials, so secrets.
    #[serde(default)]
    pub nodes: Vec<Secret>,
    /// Sentinels and the master's name (`mode: sentinel`).
    pub sentinel: Option<SentinelConfig>,
    /// `WAIT count timeout` after each batch (docs/design.md: the async replication gap).
    pub wait_replicas: Option<WaitReplicas>,
    /// `redis.patterns`: keys asked for per `SCAN` call (its COUNT), which bounds how long one
    /// call holds a primary.
    #[serde(default = "default_scan_count")]
    pub scan_count: usize,
    /// `redis.patterns`: `SCAN` calls per second at most, over every pattern and primary of the
    /// target, so a pattern over a big keyspace never saturates Redis.
    #[serde(default = "default_scans_per_second")]
    pub scans_per_second: u32,
    /// `redis.dependents`: key B depends on key A when B is a member of the set
    /// `<dep_prefix>A`.
    #[serde(default = "default_dep_prefix")]
    pub dep_prefix: String,
    /// `redis.dependents`: levels of dependents followed from an invalidated key.
    #[serde(default = "default_dependents_depth")]
    pub dependents_depth: u32,
    /// A pub/sub message per batch after its deletes (off by default).
    pub broadcast: Option<crate::sink::redis::broadcast::BroadcastConfig>,
    /// A stream entry per invalidated key after its delete (off by default).
    pub warm: Option<crate::sink::redis::warm::WarmConfig>,
    /// The resolved URL (from `url`, `url_env` or `url_file`), filled by validation.
    #[serde(skip)]
    pub resolved_url: Option<Secret>,
    /// The data nodes' ACL user and password in every mode, kept out of the URLs: exactly one
    /// of `password`, `password_env`, `password_file`, or none (checked below).
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub password_env: Option<String>,
    pub password_file: Option<PathBuf>,
    /// The resolved password, filled by validation.
    #[serde(skip)]
    pub resolved_password: Option<Secret>,
}

fn default_tag_prefix() -> String {
    "tag:".into()
}
fn default_scan_count() -> usize {
    1000
}
fn default_scans_per_second() -> u32 {
    100
}
fn default_dep_prefix() -> String {
    "dep:".into()
}
fn default_dependents_depth() -> u32 {
    3
}
fn default_unlink_batch() -> usize {
    512
}
fn default_tag_chunk() -> usize {
    500
}
fn default_response_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

impl RedisConfig {
    /// A config for tests and tools: everything default but the URL.
    pub fn for_url(url: &str) -> RedisConfig {
        RedisConfig {
            url: Some(Secret::new(url)),
            url_env: None,
            url_file: None,
            tag_prefix: default_tag_prefix(),
            unlink_batch: default_unlink_batch(),
            tag_chunk: default_tag_chunk(),
            response_timeout: default_response_timeout(),
            connect_timeout: default_connect_timeout(),
            retry: RetryPolicy::default(),
            name: None,
            mode: RedisMode::Standalone,
            nodes: Vec::new(),
            sentinel: None,
            wait_replicas: None,
            scan_count: default_scan_count(),
            scans_per_second: default_scans_per_second(),
            dep_prefix: default_dep_prefix(),
            dependents_depth: default_dependents_depth(),
            broadcast: None,
            warm: None,
            resolved_url: Some(Secret::new(url)),
            username: None,
            password: None,
            password_env: None,
            password_file: None,
            resolved_password: None,
        }
    }

    /// The target's name: a metric label and log field.
    pub fn target_name(&self) -> &str {
        self.name.as_deref().unwrap_or(DEFAULT_TARGET_NAME)
    }

    /// The connection URL (validation resolves it; `None` only for an unvalidated config).
    pub fn url(&self) -> Option<&Secret> {
        self.resolved_url.as_ref().or(self.url.as_ref())
    }
}

/// `sinks.redis.mode`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    /// One server (or a primary behind a DNS name): `url`.
    #[default]
    Standalone,
    /// Redis Cluster: `nodes` are seeds, the client learns the slot map from them.
    Cluster,
    /// A primary found through Sentinel: `sentinel.nodes`, `sentinel.master`.
    Sentinel,
}

impl RedisMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RedisMode::Standalone => "standalone",
            RedisMode::Cluster => "cluster",
            RedisMode::Sentinel => "sentinel",
        }
    }
}

/// `sinks.redis.sentinel`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SentinelConfig {
    /// Sentinel addresses (`redis://host:26379`, with the sentinels' own password if they have
    /// one). Any subset is enough: the first that answers names the primary.
    pub nodes: Vec<Secret>,
    /// The monitored master's name (`sentinel monitor <name> ...`).
    pub master: String,
}

/// `sinks.redis.wait_replicas`: `WAIT count timeout` after a batch, before it counts as done.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WaitReplicas {
    pub count: u32,
    #[serde(with = "duration", default = "default_wait_timeout")]
    pub timeout: Duration,
}

fn default_wait_timeout() -> Duration {
    Duration::from_millis(100)
}

/// `sinks.redis`: one object (named `redis` unless it says otherwise) or a list of named ones.
///
/// It derefs to the first target so code written for a single Redis keeps working; code that
/// must serve every target iterates [`RedisTargets::iter`].
#[derive(Debug)]
pub struct RedisTargets(pub Vec<RedisConfig>);

impl RedisTargets {
    pub fn iter(&self) -> std::slice::Iter<'_, RedisConfig> {
        self.0.iter()
    }
}

impl Deref for RedisTargets {
    type Target = RedisConfig;
    fn deref(&self) -> &RedisConfig {
        // Deserialization refuses an empty list, so there is always a first one.
        &self.0[0]
    }
}

impl DerefMut for RedisTargets {
    fn deref_mut(&mut self) -> &mut RedisConfig {
        &mut self.0[0]
    }
}

impl<'de> Deserialize<'de> for RedisTargets {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RedisTargets;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a Redis target (a mapping) or a list of named Redis targets")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RedisTargets, A::Error> {
                let one = RedisConfig::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RedisTargets(vec![one]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<RedisTargets, A::Error> {
                let many = Vec::<RedisConfig>::deserialize(de::value::SeqAccessDeserializer::new(seq))?;
                if many.is_empty() {
                    return Err(de::Error::custom("sinks.redis is an empty list: give at least one target"));
                }
                Ok(RedisTargets(many))
            }
        }
        d.deserialize_any(V)
    }
}

/// `sinks.redis`: one sink per target for the keys, tags and the rest, and one more on its own
/// connection for the patterns (a long scan never holds the keys), all in layer 0.
impl crate::sink::config::SinkSection for Option<RedisTargets> {
    fn is_configured(&self) -> bool {
        self.is_some()
    }

    fn validate(&mut self, origin: &Origin, names: &mut HashSet<String>, problems: &mut Vec<Problem>) {
        if let Some(targets) = self {
            validate(targets, origin, names, problems);
        }
    }

    fn check(&self, origin: &Origin, problems: &mut Vec<Problem>) {
        if let Some(targets) = self {
            check(targets, origin, problems);
        }
    }

    fn build(&self, metrics: &Arc<Metrics>, out: &mut crate::sink::config::Layered) -> Result<(), String> {
        for redis in self.iter().flat_map(|targets| targets.iter()) {
            let sink = super::RedisSink::new(redis.target_name(), redis, metrics.clone()).map_err(|e| e.to_string())?;
            out.push((0, Arc::new(sink)));
            let patterns =
                super::PatternSink::new(redis.target_name(), redis, metrics.clone()).map_err(|e| e.to_string())?;
            out.push((0, Arc::new(patterns)));
        }
        Ok(())
    }
}

/// Checks every target and resolves its secrets; `names` are the sink names taken so far.
fn validate(targets: &mut RedisTargets, origin: &Origin, names: &mut HashSet<String>, problems: &mut Vec<Problem>) {
    let listed = targets.0.len() > 1 || targets.0.first().is_some_and(|t| t.name.is_some());
    for (i, r) in targets.0.iter_mut().enumerate() {
        let idx = i.to_string();
        // Paths of settings of this target, for error locations.
        let at = |field: &[&'static str]| -> Vec<String> {
            let mut p = vec!["sinks".to_string(), "redis".to_string()];
            if listed {
                p.push(idx.clone());
            }
            p.extend(field.iter().map(|s| s.to_string()));
            p
        };
        let problem = |field: &[&'static str], message: String| {
            let path = at(field);
            let path: Vec<&str> = path.iter().map(String::as_str).collect();
            origin.problem(&path, message)
        };
        let label = if listed { format!("sinks.redis[{i}]") } else { "sinks.redis".to_string() };
        match (&r.name, listed) {
            (None, true) => {
                problems.push(problem(&[], format!("{label} needs a `name` (each target labels its metrics)")))
            }
            (Some(n), _) if n.trim().is_empty() => {
                problems.push(problem(&["name"], format!("{label}.name must not be empty")))
            }
            (Some(n), _) => {
                if !names.insert(n.clone()) {
                    problems.push(problem(
                        &["name"],
                        format!("{label}: the sink name {n:?} is used twice (names label metrics)"),
                    ));
                }
            }
            (None, false) => {
                names.insert(DEFAULT_TARGET_NAME.to_string());
            }
        }
        match r.mode {
            RedisMode::Standalone => {
                if !r.nodes.is_empty() || r.sentinel.is_some() {
                    problems.push(problem(
                        &["mode"],
                        format!("{label}: `nodes` and `sentinel` need mode: cluster or mode: sentinel"),
                    ));
                }
            }
            RedisMode::Cluster => {
                if r.nodes.is_empty() {
                    problems.push(problem(
                        &["nodes"],
                        format!(
                            "{label}: mode: cluster needs `nodes`, a list of seed URLs (any subset of the cluster)"
                        ),
                    ));
                }
                if r.url.is_some() || r.url_env.is_some() || r.url_file.is_some() || r.sentinel.is_some() {
                    problems.push(problem(
                        &["mode"],
                        format!("{label}: mode: cluster takes `nodes`, not `url` or `sentinel`"),
                    ));
                }
                for (j, node) in r.nodes.iter().enumerate() {
                    if !url_scheme_ok(node.expose()) || node.expose().contains("unix://") {
                        let path = at(&["nodes"]);
                        let mut path: Vec<&str> = path.iter().map(String::as_str).collect();
                        let j = j.to_string();
                        path.push(&j);
                        problems.push(
                            origin.problem(
                                &path,
                                format!("{label}.nodes[{j}] must start with redis:// or rediss:// (TLS)"),
                            ),
                        );
                    }
                }
            }
            RedisMode::Sentinel => {
                match &r.sentinel {
                    None => problems.push(problem(
                        &["sentinel"],
                        format!("{label}: mode: sentinel needs `sentinel: {{ nodes: [...], master: NAME }}`"),
                    )),
                    Some(s) => {
                        if s.nodes.is_empty() {
                            problems.push(problem(
                                &["sentinel", "nodes"],
                                format!("{label}.sentinel.nodes must not be empty"),
                            ));
                        }
                        if s.master.trim().is_empty() {
                            problems.push(problem(
                                &["sentinel", "master"],
                                format!("{label}.sentinel.master must not be empty"),
                            ));
                        }
                        if s.nodes.iter().any(|n| !url_scheme_ok(n.expose())) {
                            problems.push(problem(
                                &["sentinel", "nodes"],
                                format!("{label}.sentinel.nodes must start with redis:// or rediss:// (TLS)"),
                            ));
                        }
                    }
                }
                if !r.nodes.is_empty() {
                    problems.push(problem(&["nodes"], format!("{label}: `nodes` is for mode: cluster")));
                }
            }
        }
        // The URL: required standalone; optional with sentinel, where it gives the user,
        // password, database and TLS used on the master; cluster mode takes `nodes` instead.
        let has_url = r.url.is_some() || r.url_env.is_some() || r.url_file.is_some();
        if r.mode == RedisMode::Standalone || (r.mode == RedisMode::Sentinel && has_url) {
            let path = at(&["url"]);
            let path: Vec<&str> = path.iter().map(String::as_str).collect();
            r.resolved_url =
                resolve_secret(origin, &path, r.url.as_ref(), r.url_env.as_deref(), r.url_file.as_deref(), problems);
        }
        if let Some(url) = &r.resolved_url {
            if !(url_scheme_ok(url.expose())
                || (r.mode == RedisMode::Standalone
                    && (url.expose().starts_with("redis+unix://") || url.expose().starts_with("unix://"))))
            {
                // Never echo the URL: it may hold a password.
                problems.push(problem(
                    &["url"],
                    format!("{label}.url must start with redis://, rediss:// (TLS) or unix://"),
                ));
            }
        }
        // Credentials beside the URLs: the way to keep a cluster's or a sentinel-found master's
        // password out of the config file (`password_env`, `password_file`).
        if r.password.is_some() || r.password_env.is_some() || r.password_file.is_some() {
            let path = at(&["password"]);
            let path: Vec<&str> = path.iter().map(String::as_str).collect();
            r.resolved_password = resolve_secret(
                origin,
                &path,
                r.password.as_ref(),
                r.password_env.as_deref(),
                r.password_file.as_deref(),
                problems,
            );
            let data_urls = r.resolved_url.iter().chain(&r.nodes);
            if data_urls.into_iter().any(|u| url_has_password(u.expose())) {
                problems.push(problem(
                    &["password"],
                    format!("{label}: a password is given both in a URL and in password/password_env/password_file; keep one"),
                ));
            }
        }
        if r.username.as_deref().is_some_and(|u| u.trim().is_empty()) {
            problems.push(problem(&["username"], format!("{label}.username must not be empty")));
        }
        if r.tag_prefix.is_empty() {
            problems.push(problem(
                &["tag_prefix"],
                format!("{label}.tag_prefix must not be empty (tag sets would collide with cache keys)"),
            ));
        }
        more_ways::validate(r, &label, &problem, problems);
        for (field, v, max) in [("unlink_batch", r.unlink_batch, 100_000), ("tag_chunk", r.tag_chunk, 5_000)] {
            if v == 0 || v > max {
                let field: &'static str = field;
                problems.push(problem(&[field], format!("{label}.{field} must be between 1 and {max}")));
            }
        }
        let signals = r.broadcast.iter().flat_map(|b| b.problems().into_iter().map(|(f, m)| ("broadcast", f, m)));
        let signals = signals.chain(r.warm.iter().flat_map(|w| w.problems().into_iter().map(|(f, m)| ("warm", f, m))));
        for (setting, field, message) in signals {
            problems.push(problem(&[setting, field], format!("{label}.{message}")));
        }
        if let Some(w) = &r.wait_replicas {
            if w.count > 100 {
                problems.push(problem(
                    &["wait_replicas", "count"],
                    format!("{label}.wait_replicas.count must be between 0 (off) and 100"),
                ));
            }
            if w.timeout.is_zero() || w.timeout > Duration::from_secs(60) {
                // WAIT 0 would wait forever; over a minute a batch stalls for nothing.
                problems.push(problem(
                    &["wait_replicas", "timeout"],
                    format!("{label}.wait_replicas.timeout must be between 1ms and 60s"),
                ));
            }
        }
        let base = at(&[]);
        let base: Vec<&str> = base.iter().map(String::as_str).collect();
        let under = |field: &'static str| -> Vec<&str> { base.iter().copied().chain([field]).collect() };
        let mut ranges = Ranges::new(origin, problems);
        ranges.duration(&under("response_timeout"), r.response_timeout, MS, TEN_MINUTES);
        ranges.duration(&under("connect_timeout"), r.connect_timeout, MS, TEN_MINUTES);
        ranges.retry(&under("retry"), &r.retry);
    }
}

/// What `run` would fail to build, found without connecting: each target's client, its URL
/// parsed as the client parses it.
fn check(targets: &RedisTargets, origin: &Origin, problems: &mut Vec<Problem>) {
    let listed = targets.0.len() > 1 || targets.0.first().is_some_and(|t| t.name.is_some());
    for (i, r) in targets.iter().enumerate() {
        let Some(url) = &r.resolved_url else { continue };
        if let Err(e) = ::redis::Client::open(url.expose()) {
            let idx = i.to_string();
            let (path, label) = match listed {
                true => (vec!["sinks", "redis", idx.as_str(), "url"], format!("sinks.redis[{i}].url")),
                false => (vec!["sinks", "redis", "url"], "sinks.redis.url".to_string()),
            };
            problems.push(origin.problem(&path, format!("{label}: {}", redis_reason(&e))));
        }
    }
}

/// The Redis client's reason in words, without the URL (it may hold a password).
fn redis_reason(e: &::redis::RedisError) -> String {
    // The client writes "<sentence> - <KindInDebugForm>[: detail]": keep the sentence and the
    // detail, in plain words.
    let text = e.to_string();
    let sentence = text.split(" - ").next().unwrap_or(&text);
    let reason = match e.detail() {
        Some(detail) => format!("{sentence} ({detail})"),
        None => sentence.to_string(),
    };
    format!(
        "{}; expected redis://[user:password@]host[:port][/db], rediss://... for TLS, or unix:///path/to/socket",
        crate::redact::scrub(&reason)
    )
}

fn url_scheme_ok(u: &str) -> bool {
    u.starts_with("redis://") || u.starts_with("rediss://")
}

/// Whether a Redis URL carries a password (`redis://:pw@...`, `redis://user:pw@...`).
fn url_has_password(u: &str) -> bool {
    use ::redis::IntoConnectionInfo;
    u.into_connection_info().is_ok_and(|info| info.redis_settings().password().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load_with_env, ConfigError};

    const HEAD: &str =
        "rules: rules.yaml\nsource:\n  kind: kafka\n  kafka:\n    brokers: \"b:9092\"\n    topics: [\"t\"]\n";

    fn load(sinks: &str) -> Result<crate::config::Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, format!("{HEAD}sinks:\n{sinks}")).unwrap();
        load_with_env(&path, [])
    }

    fn messages(e: ConfigError) -> String {
        e.problems().iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n")
    }

    #[test]
    fn a_single_object_is_the_target_named_redis() {
        let cfg = load("  redis:\n    url: \"redis://127.0.0.1:6379\"\n").unwrap();
        let targets = cfg.sinks.redis.as_ref().unwrap();
        assert_eq!(targets.0.len(), 1);
        assert_eq!(targets.target_name(), "redis");
        assert_eq!(targets.mode, RedisMode::Standalone);
        assert_eq!(targets.wait_replicas, None);
    }

    #[test]
    fn a_list_names_each_target_and_takes_every_mode() {
        let cfg = load(
            "  redis:\n    - name: eu\n      mode: cluster\n      nodes: [\"redis://10.0.0.1:6379\", \"redis://10.0.0.2:6379\"]\n      wait_replicas: { count: 1, timeout: 50ms }\n    - name: us\n      mode: sentinel\n      sentinel: { nodes: [\"redis://10.0.1.9:26379\"], master: mymaster }\n    - name: local\n      url: \"redis://127.0.0.1:6379\"\n",
        )
        .unwrap();
        let targets = cfg.sinks.redis.as_ref().unwrap();
        let names: Vec<&str> = targets.iter().map(|t| t.target_name()).collect();
        assert_eq!(names, ["eu", "us", "local"]);
        assert_eq!(targets.0[0].mode, RedisMode::Cluster);
        assert_eq!(targets.0[0].nodes.len(), 2);
        assert_eq!(targets.0[0].wait_replicas, Some(WaitReplicas { count: 1, timeout: Duration::from_millis(50) }));
        assert_eq!(targets.0[1].sentinel.as_ref().unwrap().master, "mymaster");
    }

    #[test]
    fn listed_targets_need_unique_names() {
        let e = load("  redis:\n    - url: \"redis://a:6379\"\n    - name: x\n      url: \"redis://b:6379\"\n    - name: x\n      url: \"redis://c:6379\"\n")
            .unwrap_err();
        let text = messages(e);
        assert!(text.contains("sinks.redis[0] needs a `name`"), "{text}");
        assert!(text.contains("the sink name \"x\" is used twice"), "{text}");
        assert!(text.contains("c.yaml:"), "{text}");
    }

    /// Ranges and the offline client check used to look at the first target only (through
    /// `Deref`): a second target with a zero timeout or a URL the client cannot parse passed
    /// `check` and failed `run`.
    #[test]
    fn every_listed_target_is_range_checked_and_built_offline() {
        let text = messages(
            load("  redis:\n    - name: eu\n      url: \"redis://a:6379\"\n    - name: us\n      url: \"redis://b:6379\"\n      connect_timeout: 0s\n      retry: { initial: 2s, max: 1s }\n")
                .unwrap_err(),
        );
        assert!(text.contains("c.yaml:13:24: sinks.redis[1].connect_timeout must be between 1ms and 10m"), "{text}");
        assert!(text.contains("sinks.redis[1].retry.max must be at least sinks.redis[1].retry.initial"), "{text}");
        assert!(!text.contains("sinks.redis[0]"), "{text}");

        let text = messages(
            load("  redis:\n    - name: eu\n      url: \"redis://a:6379\"\n    - name: us\n      url: \"redis://b:6379/notadb\"\n")
                .unwrap_err(),
        );
        assert!(text.contains("c.yaml:12:12: sinks.redis[1].url: "), "{text}");
    }

    /// Names label metrics, so they are unique across kinds of sink: a CDN may not take a
    /// Redis target's name.
    #[test]
    fn a_cdn_sink_cannot_take_a_redis_targets_name() {
        let text = messages(
            load("  redis:\n    - name: edge\n      url: \"redis://a:6379\"\n  cdn:\n    - { kind: varnish, name: edge, nodes: [\"http://127.0.0.1:6081\"] }\n")
                .unwrap_err(),
        );
        assert!(text.contains("sinks.cdn[0]: the sink name \"edge\" is used twice"), "{text}");
        let text = messages(
            load("  redis:\n    url: \"redis://a:6379\"\n  cdn:\n    - { kind: varnish, name: redis, nodes: [\"http://127.0.0.1:6081\"] }\n")
                .unwrap_err(),
        );
        assert!(text.contains("the sink name \"redis\" is used twice"), "{text}");
    }

    #[test]
    fn each_mode_needs_its_own_settings() {
        let text = messages(load("  redis:\n    mode: cluster\n").unwrap_err());
        assert!(text.contains("mode: cluster needs `nodes`"), "{text}");
        let text = messages(load("  redis:\n    mode: sentinel\n").unwrap_err());
        assert!(text.contains("mode: sentinel needs `sentinel"), "{text}");
        let text = messages(load("  redis:\n    url: \"redis://a:1\"\n    nodes: [\"redis://b:1\"]\n").unwrap_err());
        assert!(text.contains("need mode: cluster or mode: sentinel"), "{text}");
        let text = messages(
            load("  redis:\n    mode: cluster\n    nodes: [\"http://b:1\"]\n    wait_replicas: { count: 500 }\n")
                .unwrap_err(),
        );
        assert!(text.contains("nodes[0] must start with redis://"), "{text}");
        assert!(text.contains("wait_replicas.count must be between 0 (off) and 100"), "{text}");
        let text = messages(load("  redis: []\n").unwrap_err());
        assert!(text.contains("empty list"), "{text}");
    }

    #[test]
    fn credentials_come_beside_the_urls_once() {
        std::env::set_var("CDC_TEST_REDIS_PASSWORD_H16", "s3cret");
        let cfg = load(
            "  redis:\n    mode: cluster\n    nodes: [\"rediss://10.0.0.1:6379\"]\n    username: cdc\n    password_env: CDC_TEST_REDIS_PASSWORD_H16\n",
        )
        .unwrap();
        let target = &cfg.sinks.redis.as_ref().unwrap().0[0];
        assert_eq!(target.username.as_deref(), Some("cdc"));
        assert_eq!(target.resolved_password.as_ref().map(Secret::expose), Some("s3cret"));

        let text = messages(
            load("  redis:\n    url: \"redis://:inline@10.0.0.1:6379\"\n    password: other\n    username: \"\"\n")
                .unwrap_err(),
        );
        assert!(text.contains("a password is given both in a URL and in password"), "{text}");
        assert!(text.contains("username must not be empty"), "{text}");
        assert!(!text.contains("inline"), "the password leaked: {text}");
        let text = messages(
            load("  redis:\n    url: \"redis://10.0.0.1:6379\"\n    password_env: CDC_TEST_UNSET_H16\n").unwrap_err(),
        );
        assert!(text.contains("CDC_TEST_UNSET_H16, which is not set"), "{text}");
    }
}
