//! Configuration: one YAML (or TOML) file, overridable key by key through environment variables
//! `CDC_INVALIDATOR__SECTION__KEY` (double underscore for nesting).
//!
//! Loading happens in three steps, each reporting every problem with file, line and column:
//! 1. the file is parsed into a located tree ([`yaml`]) so errors can point at the right line;
//! 2. the `config` crate merges file and environment and serde fills the typed structs
//!    (`deny_unknown_fields` everywhere: a typo is an error, not a silently ignored setting);
//! 3. `Config::validate` checks cross-field constraints and resolves `*_env` / `*_file`
//!    secret indirections.
//!
//! Types holding secrets implement neither `Serialize` nor a revealing `Debug`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod build;
pub mod duration;
pub mod freshness;
mod problems;
pub(crate) mod ranges;
pub mod secret;
pub mod yaml;

pub use secret::{relative_to, Need, Secret, SecretRef};

// Each component owns its section (its type, checks and construction) in its own `config.rs`;
// these re-exports keep the paths that code and tests have always used.
pub use crate::dead_letter::config::{DeadLetterConfig, DeadLetterKafka};
pub use crate::sink::config::{LayerTiming, SinksConfig};
pub use crate::sink::redis::config::{RedisConfig, RedisMode, RedisTargets, SentinelConfig, WaitReplicas};
pub use crate::source::kafka::config::{KafkaConfig, KafkaFormat, SchemaRegistryConfig};
pub use crate::source::postgres::config::PostgresConfig;
pub use crate::source::{SourceConfig, SourceKind};

/// `source.postgres` (re-exported from `crate::source::postgres::config`, its home).
pub mod postgres {
    pub use crate::source::postgres::config::*;
}

/// `sinks.redis` (re-exported from `crate::sink::redis::config`, its home).
pub mod redis {
    pub use crate::sink::redis::config::*;
}

pub use yaml::Location;

/// Environment variables that override config keys start with this, then `__`.
pub const ENV_PREFIX: &str = "CDC_INVALIDATOR";

/// The whole configuration, after validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The rules file; relative paths are relative to the config file.
    pub rules: PathBuf,
    pub source: SourceConfig,
    pub sinks: SinksConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub pipeline: PipelineConfig,
    #[serde(default)]
    pub dead_letter: DeadLetterConfig,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// Read replicas gating the second pass (`freshness`).
    #[serde(default)]
    pub freshness: freshness::FreshnessConfig,
}

/// A scalar config value passed through to a library as a string (YAML may spell `1000` or
/// `true` unquoted).
#[derive(Clone, Deserialize)]
#[serde(untagged)]
pub enum Scalar {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Str(s) => f.write_str(s),
            Scalar::Int(i) => write!(f, "{i}"),
            Scalar::Float(x) => write!(f, "{x}"),
            Scalar::Bool(b) => write!(f, "{b}"),
        }
    }
}

impl fmt::Debug for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Passthrough maps may hold passwords: never print them.
        f.write_str("<redacted>")
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the HTTP server for `/metrics`, `/healthz` and `/readyz`.
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { listen: SocketAddr::from(([127, 0, 0, 1], 9464)) }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// A batch is sent when it holds this many events...
    pub batch_max_events: usize,
    /// ...or when its first event has waited this long...
    #[serde(with = "duration")]
    pub batch_max_wait: Duration,
    /// ...or sooner. Normally a batch goes out at once with whatever queued behind its first
    /// event: the source hands over what it has at once (a Kafka fetch response, a PostgreSQL
    /// transaction), and waiting for more only adds staleness. In a backlog (the pipeline has
    /// found events queued, without once waiting for one, for longer than `batch_idle_wait`) a
    /// batch stays open until no new event has come for `batch_idle_wait`: fewer, larger
    /// batches catch up faster. With `batch_idle_wait >= batch_max_wait` every batch is a fixed
    /// window (a coalescing window for rate-limited CDNs). Measured in docs/benchmarks.md.
    #[serde(with = "duration")]
    pub batch_idle_wait: Duration,
    /// Events buffered between the source and the batcher; when full, the source pauses. It
    /// also bounds each layer's queue, so it is the daemon's main memory setting in events
    /// (`source.kafka.max_in_flight_bytes` bounds the same events in bytes): about 4 KiB of
    /// peak RSS per slot with 450-byte messages, 34 MiB catching up at 1,024 (two default
    /// batches), 47 MiB at 4,096 (docs/benchmarks.md, "Memory per queued event (hmem)").
    pub queue_capacity: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            batch_max_events: 500,
            batch_max_wait: Duration::from_millis(5),
            batch_idle_wait: Duration::from_millis(1),
            queue_capacity: 1024,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// After SIGTERM, how long in-flight work may take to finish before it is abandoned
    /// (unacknowledged, so it is redelivered on the next start).
    #[serde(with = "duration")]
    pub grace: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig { grace: Duration::from_secs(20) }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `cdc_invalidator=debug,rdkafka=warn`; `RUST_LOG`
    /// wins when set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: LogFormat::Human, level: "info".into() }
    }
}

/// One problem with a config or rules file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub location: Option<Location>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.location {
            Some(loc) => write!(f, "{}:{}: {}", self.file.display(), loc, self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Every problem found; the daemon starts nothing (exit 2).
    #[error("{}", .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

impl ConfigError {
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid(p) => p,
        }
    }
}

/// Where the file came from, to resolve relative paths and place errors.
pub(crate) struct Origin<'a> {
    pub(crate) file: &'a Path,
    doc: Option<yaml::Node>,
}

impl Origin<'_> {
    /// Where the key (not its value) at `path` is written, for a problem with the key itself.
    pub(crate) fn key_location(&self, path: &[&str]) -> Option<Location> {
        self.doc.as_ref().map(|d| d.locate_key(path))
    }

    pub(crate) fn problem(&self, path: &[&str], message: impl Into<String>) -> Problem {
        Problem {
            file: self.file.to_path_buf(),
            location: self.doc.as_ref().map(|d| d.locate(path.iter().copied())),
            message: message.into(),
        }
    }
}

/// Loads, merges with the environment, and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    load_with_env(path, std::env::vars())
}

/// [`load`], with the environment given explicitly (tests).
pub fn load_with_env(path: &Path, env: impl IntoIterator<Item = (String, String)>) -> Result<Config, ConfigError> {
    let one = |location: Option<Location>, message: String| {
        ConfigError::Invalid(vec![Problem { file: path.to_path_buf(), location, message }])
    };
    let text = std::fs::read_to_string(path).map_err(|e| one(None, format!("cannot read the config file: {e}")))?;
    let is_toml = path.extension().is_some_and(|e| e == "toml");
    let doc = if is_toml {
        None
    } else {
        Some(yaml::parse(&text).map_err(|e| one(Some(e.location), format!("invalid YAML: {}", e.message)))?)
    };
    let origin = Origin { file: path, doc };
    if let Some(doc) = &origin.doc {
        // Before the `config` crate, which reports only the first, in Rust debug output.
        let duplicates = problems::duplicate_keys(&origin, doc);
        if !duplicates.is_empty() {
            return Err(ConfigError::Invalid(duplicates));
        }
    }

    let format = if is_toml { config::FileFormat::Toml } else { config::FileFormat::Yaml };
    let env_map: std::collections::HashMap<String, String> =
        env.into_iter().filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__"))).collect();
    let merged = config::Config::builder()
        .add_source(config::File::from_str(&text, format))
        .add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("source.kafka.topics")
                .source(Some(env_map)),
        )
        .build()
        .map_err(|e| one(None, problems::plain_words(&e.to_string())))?;

    let mut cfg: Config = match serde_path_to_error::deserialize(merged.clone()) {
        Ok(cfg) => cfg,
        Err(e) => {
            let (first, path) = problems::from_serde(&origin, e);
            let mut all = vec![first];
            problems::more::<Config>(&origin, &merged, path, &mut all);
            all.sort_by_key(|p| p.location);
            return Err(ConfigError::Invalid(all));
        }
    };

    let mut problems = cfg.validate(&origin);
    if problems.is_empty() {
        // Only a config that is valid so far: the builders assume resolved settings.
        build::check(&cfg, &origin, &mut problems);
    }
    if !problems.is_empty() {
        // File order: the same file gives the same report, top to bottom.
        problems.sort_by_key(|p| p.location);
        return Err(ConfigError::Invalid(problems));
    }
    Ok(cfg)
}

/// Reads a secret setting that also takes its value inline: exactly one of the value, an
/// environment variable, a file ([`secret::SecretRef`]: the one convention).
pub(crate) fn resolve_secret(
    origin: &Origin,
    path: &[&str],
    value: Option<&Secret>,
    env: Option<&str>,
    file: Option<&Path>,
    problems: &mut Vec<Problem>,
) -> Option<Secret> {
    let name = path.last().copied().unwrap_or("value");
    let secret = SecretRef::of(&env.map(str::to_string), &file.map(Path::to_path_buf));
    match secret.with_inline(value).resolve(name, Need::Required, origin.file) {
        Ok(v) => v,
        Err(p) => {
            problems.push(secret_problem(origin, &path[..path.len().saturating_sub(1)], p));
            None
        }
    }
}

/// A [`secret::SecretProblem`] placed at the key it names, below `entry`.
fn secret_problem(origin: &Origin, entry: &[&str], p: secret::SecretProblem) -> Problem {
    let mut at = entry.to_vec();
    at.extend(p.key.as_deref());
    origin.problem(&at, p.message)
}

/// Resolves `_env`/`_file` keys of a librdkafka passthrough map: `sasl.password_file: f` is
/// `sasl.password` read from `f`, by the same convention as every other secret.
pub(crate) fn resolve_passthrough(
    origin: &Origin,
    path: &[&str],
    map: &BTreeMap<String, Scalar>,
    problems: &mut Vec<Problem>,
) -> Vec<(String, Secret)> {
    let mut out = Vec::new();
    for (key, value) in map {
        let text = value.to_string();
        let indirect = if let Some(base) = key.strip_suffix("_env") {
            Some((base, SecretRef::of(&Some(text.clone()), &None)))
        } else {
            key.strip_suffix("_file").map(|base| (base, SecretRef::of(&None, &Some(PathBuf::from(&text)))))
        };
        match indirect {
            Some((base, secret)) => match secret.resolve(base, Need::Required, origin.file) {
                Ok(Some(v)) => out.push((base.to_string(), v)),
                Ok(None) => {}
                Err(p) => problems.push(secret_problem(origin, path, p)),
            },
            None if is_sensitive_key(key) => out.push((key.clone(), Secret::new(text))),
            None => out.push((key.clone(), Secret::plain(text))),
        }
    }
    out
}

/// A librdkafka property whose value is a credential (`sasl.password`, `ssl.key.pem`,
/// `sasl.oauthbearer.client.secret`, `sasl.jaas.config`, ...), given inline.
fn is_sensitive_key(key: &str) -> bool {
    ["password", "secret", "token", "pem", "jaas", "oauthbearer.config", "key"].iter().any(|w| key.contains(w))
}

impl Config {
    /// Cross-field checks and secret resolution; returns every problem found. Each component
    /// checks its own section.
    fn validate(&mut self, origin: &Origin) -> Vec<Problem> {
        let mut problems = Vec::new();
        self.rules = relative_to(origin.file, &self.rules);
        self.source.validate(origin, &mut problems);
        self.sinks.validate(origin, &mut problems);

        let p = &self.pipeline;
        if p.batch_max_events == 0 || p.batch_max_events > 100_000 {
            problems.push(
                origin.problem(
                    &["pipeline", "batch_max_events"],
                    "pipeline.batch_max_events must be between 1 and 100000",
                ),
            );
        }
        if p.queue_capacity < p.batch_max_events {
            problems.push(origin.problem(
                &["pipeline", "queue_capacity"],
                "pipeline.queue_capacity must be at least pipeline.batch_max_events",
            ));
        }
        if p.batch_max_wait > Duration::from_secs(60) {
            problems
                .push(origin.problem(&["pipeline", "batch_max_wait"], "pipeline.batch_max_wait must be at most 60s"));
        }
        if p.batch_idle_wait > Duration::from_secs(60) {
            problems
                .push(origin.problem(&["pipeline", "batch_idle_wait"], "pipeline.batch_idle_wait must be at most 60s"));
        }

        self.dead_letter.validate(origin, &mut problems);
        if self.log.level.trim().is_empty() {
            problems.push(origin.problem(&["log", "level"], "log.level must not be empty"));
        }
        ranges::check(self, origin, &mut problems);
        self.freshness.validate(origin, &mut problems);
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    const CORE: &str = r#"rules: rules.yaml
source:
  kind: kafka
  kafka:
    brokers: "127.0.0.1:9092"
    group_id: cdc-invalidator
    topics: ["dbz.public.products"]
    librdkafka: {}
sinks:
  redis:
    url: "redis://127.0.0.1:6379"
    tag_prefix: "tag:"
metrics:
  listen: "127.0.0.1:9464"
"#;

    #[test]
    fn the_contract_core_config_runs_as_is() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "c.yaml", CORE);
        let cfg = load_with_env(&p, []).unwrap();
        assert_eq!(cfg.rules, dir.path().join("rules.yaml"));
        assert_eq!(cfg.source.kafka.as_ref().unwrap().topics, vec!["dbz.public.products"]);
        assert_eq!(cfg.sinks.redis.as_ref().unwrap().url().unwrap().expose(), "redis://127.0.0.1:6379");
        assert_eq!(cfg.pipeline.batch_max_events, 500);
        assert_eq!(cfg.dead_letter.file.as_deref(), Some(dir.path().join("dead-letters.jsonl").as_path()));
    }

    #[test]
    fn environment_overrides_nested_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "c.yaml", CORE);
        let cfg = load_with_env(
            &p,
            [
                ("CDC_INVALIDATOR__SINKS__REDIS__TAG_PREFIX".to_string(), "t:".to_string()),
                ("CDC_INVALIDATOR__PIPELINE__BATCH_MAX_EVENTS".to_string(), "64".to_string()),
                ("CDC_INVALIDATOR__SOURCE__KAFKA__TOPICS".to_string(), "a,b".to_string()),
            ],
        )
        .unwrap();
        assert_eq!(cfg.sinks.redis.as_ref().unwrap().tag_prefix, "t:");
        assert_eq!(cfg.pipeline.batch_max_events, 64);
        assert_eq!(cfg.source.kafka.as_ref().unwrap().topics, vec!["a", "b"]);
    }

    #[test]
    fn unknown_key_is_named_with_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "c.yaml",
            &CORE.replace("    tag_prefix: \"tag:\"", "    tag_prefix: \"tag:\"\n    tag_prefx: x"),
        );
        let err = load_with_env(&p, []).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("c.yaml:13:5"), "{text}");
        assert!(text.contains("tag_prefx"), "{text}");
    }

    #[test]
    fn wrong_type_points_at_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "c.yaml", &format!("{CORE}pipeline:\n  batch_max_events: lots\n"));
        let text = load_with_env(&p, []).unwrap_err().to_string();
        assert!(text.contains("c.yaml:16:21"), "{text}");
        assert!(text.contains("batch_max_events"), "{text}");
    }

    #[test]
    fn batch_waits_parse_default_and_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = load_with_env(&write(&dir, "c.yaml", CORE), []).unwrap();
        assert_eq!(
            (cfg.pipeline.batch_max_wait, cfg.pipeline.batch_idle_wait),
            (Duration::from_millis(5), Duration::from_millis(1))
        );
        let p = write(&dir, "c.yaml", &format!("{CORE}pipeline:\n  batch_max_wait: 10s\n  batch_idle_wait: 10s\n"));
        let cfg = load_with_env(&p, []).unwrap();
        assert_eq!(cfg.pipeline.batch_idle_wait, Duration::from_secs(10));
        let p = write(&dir, "c.yaml", &format!("{CORE}pipeline:\n  batch_idle_wait: 2m\n"));
        let text = load_with_env(&p, []).unwrap_err().to_string();
        assert!(text.contains("c.yaml:16:") && text.contains("pipeline.batch_idle_wait must be at most 60s"), "{text}");
    }

    #[test]
    fn yaml_syntax_error_has_a_location() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "c.yaml", "rules: [\n");
        let text = load_with_env(&p, []).unwrap_err().to_string();
        assert!(text.starts_with(&format!("{}:", p.display())), "{text}");
        assert!(text.contains("invalid YAML"), "{text}");
    }

    #[test]
    fn every_validation_problem_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let bad = CORE
            .replace("    topics: [\"dbz.public.products\"]\n", "")
            .replace("url: \"redis://127.0.0.1:6379\"", "url: \"http://nope\"")
            + "pipeline:\n  batch_max_events: 0\n";
        let p = write(&dir, "c.yaml", &bad);
        let err = load_with_env(&p, []).unwrap_err();
        let problems = err.problems();
        assert_eq!(problems.len(), 3, "{err}");
        assert!(problems.iter().all(|p| p.location.is_some()));
        // The URL is never echoed: it may hold a password.
        assert!(!err.to_string().contains("http://nope"));
    }

    #[test]
    fn secrets_come_from_env_or_file_and_are_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let secret = write(&dir, "redis-url", "redis://:hunter2@127.0.0.1:6379\n");
        let text = CORE.replace("url: \"redis://127.0.0.1:6379\"", &format!("url_file: {}", secret.display()));
        let p = write(&dir, "c.yaml", &text);
        let cfg = load_with_env(&p, []).unwrap();
        let redis = cfg.sinks.redis.as_ref().unwrap();
        assert_eq!(redis.url().unwrap().expose(), "redis://:hunter2@127.0.0.1:6379");
        assert!(!format!("{cfg:?}").contains("hunter2"));
    }

    #[test]
    fn librdkafka_secrets_come_from_env_or_file() {
        let dir = tempfile::tempdir().unwrap();
        let secret = write(&dir, "kafka-password", "s3cret\n");
        // A variable name unique to this test: the process environment is shared.
        std::env::set_var("CDC_TEST_KAFKA_USER_7f3a", "svc-user");
        let text = CORE.replace(
            "    librdkafka: {}",
            &format!(
                "    librdkafka:\n      security.protocol: SASL_SSL\n      sasl.mechanisms: PLAIN\n      sasl.username_env: CDC_TEST_KAFKA_USER_7f3a\n      sasl.password_file: {}\n      fetch.wait.max.ms: 10",
                secret.display()
            ),
        );
        let p = write(&dir, "c.yaml", &text);
        let cfg = load_with_env(&p, []).unwrap();
        let resolved: std::collections::BTreeMap<_, _> = cfg
            .source
            .kafka
            .as_ref()
            .unwrap()
            .resolved_librdkafka
            .iter()
            .map(|(k, v)| (k.clone(), v.expose().to_string()))
            .collect();
        assert_eq!(resolved["sasl.username"], "svc-user");
        assert_eq!(resolved["sasl.password"], "s3cret");
        assert_eq!(resolved["security.protocol"], "SASL_SSL");
        assert_eq!(resolved["fetch.wait.max.ms"], "10");
        assert!(!format!("{cfg:?}").contains("s3cret"));

        let missing = CORE
            .replace("    librdkafka: {}", "    librdkafka:\n      sasl.password_env: CDC_TEST_UNSET_VARIABLE_91b2");
        let p = write(&dir, "c2.yaml", &missing);
        let err = load_with_env(&p, []).unwrap_err().to_string();
        assert!(err.contains("CDC_TEST_UNSET_VARIABLE_91b2") && err.contains("c2.yaml:"), "{err}");
    }

    #[test]
    fn both_url_and_url_env_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let text = CORE.replace("    tag_prefix: \"tag:\"", "    url_env: REDIS_URL");
        let p = write(&dir, "c.yaml", &text);
        let text = load_with_env(&p, []).unwrap_err().to_string();
        assert!(text.contains("exactly one of `url`, `url_env` and `url_file`"), "{text}");
    }

    #[test]
    fn cdn_sinks_are_checked_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let token = write(&dir, "token", "s3cret-token\n");
        let cdn = format!(
            "  cdn:\n    - {{ kind: fastly, name: edge, service_id: abc, token_file: {} }}\n    - {{ kind: varnish, name: edge, nodes: [\"http://127.0.0.1:6081\"] }}\n    - {{ kind: cloudflare, name: cf, zone_id: z1 }}\n",
            token.display()
        );
        let p = write(&dir, "c.yaml", &CORE.replace("sinks:\n", &format!("sinks:\n{cdn}")));
        let text = load_with_env(&p, []).unwrap_err().to_string();
        assert!(text.contains("\"edge\" is used twice"), "{text}");
        assert!(text.contains("`token_env` or `token_file` is required"), "{text}");
        assert!(!text.contains("s3cret"), "{text}");

        let typo = CORE.replace(
            "sinks:\n",
            &format!("sinks:\n  cdn:\n    - kind: fastly\n      name: f\n      service_id: abc\n      token_file: {}\n      sofft: true\n", token.display()),
        );
        let p = write(&dir, "t.yaml", &typo);
        let text = load_with_env(&p, []).unwrap_err().to_string();
        assert!(text.contains("sofft"), "{text}");

        let ok = CORE.replace(
            "sinks:\n",
            &format!("sinks:\n  cdn:\n    - {{ kind: fastly, name: f, service_id: abc, token_file: {} }}\n  timing: {{ layer_delay: 250ms, repeat_after: 30s }}\n", token.display()),
        );
        let p = write(&dir, "ok.yaml", &ok);
        let cfg = load_with_env(&p, []).unwrap();
        assert_eq!(cfg.sinks.cdn.len(), 1);
        assert_eq!(cfg.sinks.cdn[0].layer(), 2);
        assert_eq!(cfg.sinks.timing.repeat_after, Duration::from_secs(30));
        assert!(!format!("{cfg:?}").contains("s3cret"));
    }

    #[test]
    fn signed_cdn_sinks_are_checked_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let key_id = write(&dir, "key_id", "AKIDEXAMPLE\n");
        let key = write(&dir, "key", "aws-s3cret-key\n");
        let ak = write(&dir, "ak", "akab-s3cret\n");
        let (key_id, key, ak) = (key_id.display(), key.display(), ak.display());
        let load = |name: &str, cdn: &str| {
            let p = write(&dir, name, &CORE.replace("sinks:\n", &format!("sinks:\n  cdn:\n{cdn}")));
            load_with_env(&p, [])
        };

        // A missing credential, an inline one, a typo and out-of-range settings are errors.
        let text = load(
            "missing.yaml",
            &format!("    - {{ kind: cloudfront, name: cf, distribution_id: EDFDVBD6EXAMPLE, access_key_id_file: {key_id} }}\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(text.contains("`secret_access_key_env` or `secret_access_key_file` is required"), "{text}");
        let text = load(
            "inline.yaml",
            &format!("    - {{ kind: cloudfront, name: cf, distribution_id: EDFDVBD6EXAMPLE, access_key_id_file: {key_id}, secret_access_key: inline-s3cret }}\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(text.contains("secret_access_key"), "{text}");
        assert!(!text.contains("inline-s3cret"), "{text}");
        let text = load(
            "typo.yaml",
            &format!("    - kind: akamai\n      name: ak\n      base_url: \"https://akab-x.purge.akamaiapis.net\"\n      client_token_file: {ak}\n      client_secret_file: {ak}\n      access_token_file: {ak}\n      netwrok: staging\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(text.contains("netwrok"), "{text}");
        let text = load(
            "range.yaml",
            &format!("    - {{ kind: akamai, name: ak, base_url: \"https://akab-x.purge.akamaiapis.net\", client_token_file: {ak}, client_secret_file: {ak}, access_token_file: {ak}, max_body_bytes: 60000, limits: {{ items_per_request: 6000 }} }}\n    - {{ kind: cloudfront, name: cf, distribution_id: \"bad id\", access_key_id_file: {key_id}, secret_access_key_file: {key}, max_wildcards_in_flight: 16, surrogate_key_path: /tags/x }}\n"),
        )
        .unwrap_err()
        .to_string();
        for expected in [
            "max_body_bytes must be between 1024 and 50000",
            "limits.items_per_request must be between 1 and 5000",
            "distribution_id must be a CloudFront distribution id",
            "max_wildcards_in_flight must be between 1 and 15",
            "surrogate_key_path must start with / and contain {key}",
        ] {
            assert!(text.contains(expected), "{expected}: {text}");
        }
        assert!(!text.contains("s3cret"), "{text}");

        // Valid entries: CDN layer by default, credentials resolved and kept out of Debug.
        let cfg = load(
            "ok.yaml",
            &format!("    - {{ kind: cloudfront, name: cf, distribution_id: EDFDVBD6EXAMPLE, access_key_id_file: {key_id}, secret_access_key_file: {key}, surrogate_key_path: \"/tags/{{key}}/*\" }}\n    - {{ kind: akamai, name: ak, base_url: \"https://akab-x.purge.akamaiapis.net\", client_token_file: {ak}, client_secret_file: {ak}, access_token_file: {ak}, verify: {{ url: \"https://shop.example.com/p/{{key}}\" }} }}\n"),
        )
        .unwrap();
        assert_eq!(cfg.sinks.cdn.len(), 2);
        assert_eq!((cfg.sinks.cdn[0].kind(), cfg.sinks.cdn[0].layer()), ("cloudfront", 2));
        assert_eq!((cfg.sinks.cdn[1].kind(), cfg.sinks.cdn[1].layer()), ("akamai", 2));
        assert!(!format!("{cfg:?}").contains("s3cret"));
    }

    #[test]
    fn toml_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "c.toml",
            "rules = \"r.yaml\"\n[source]\nkind = \"kafka\"\n[source.kafka]\nbrokers = \"b:9092\"\ntopics = [\"t\"]\n[sinks.redis]\nurl = \"redis://127.0.0.1:6379\"\n",
        );
        let cfg = load_with_env(&p, []).unwrap();
        assert_eq!(cfg.source.kafka.unwrap().brokers, "b:9092");
    }
}
