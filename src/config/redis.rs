//! `sinks.redis` deployments: standalone, cluster or sentinel (`mode`), and the list form that
//! names several targets (one per region or cluster). The fields themselves live on
//! [`RedisConfig`]; this file holds the new types and their validation.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::{resolve_secret, Origin, Problem, RedisConfig, Secret};

/// The name a single (unnamed) `sinks.redis` object gets: the metric label it always had.
pub const DEFAULT_TARGET_NAME: &str = "redis";

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
    #[serde(with = "super::duration", default = "default_wait_timeout")]
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

/// Checks every target and resolves its secrets.
pub(super) fn validate(targets: &mut RedisTargets, origin: &Origin, cdn_names: &[String], problems: &mut Vec<Problem>) {
    let listed = targets.0.len() > 1 || targets.0.first().is_some_and(|t| t.name.is_some());
    let mut names = std::collections::HashSet::new();
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
                if !names.insert(n.clone()) || cdn_names.contains(n) {
                    problems.push(problem(
                        &["name"],
                        format!("{label}: the sink name {n:?} is used twice (names label metrics)"),
                    ));
                }
            }
            (None, false) => {}
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
        if r.tag_prefix.is_empty() {
            problems.push(problem(
                &["tag_prefix"],
                format!("{label}.tag_prefix must not be empty (tag sets would collide with cache keys)"),
            ));
        }
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
    }
}

fn url_scheme_ok(u: &str) -> bool {
    u.starts_with("redis://") || u.starts_with("rediss://")
}

#[cfg(test)]
mod tests {
    use super::super::{load_with_env, ConfigError};
    use super::*;

    const HEAD: &str =
        "rules: rules.yaml\nsource:\n  kind: kafka\n  kafka:\n    brokers: \"b:9092\"\n    topics: [\"t\"]\n";

    fn load(sinks: &str) -> Result<super::super::Config, ConfigError> {
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
}
