//! `source.kafka`: the Kafka source's own section, its checks (called through
//! [`crate::source::validate`]) and the offline build check (`check`). The dead-letter producer
//! shares the cluster settings (`dead_letter.kafka` defaults to these brokers).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::BaseConsumer;
use rdkafka::error::KafkaError;
use serde::Deserialize;
use tokio::sync::watch;

use crate::config::ranges::{Ranges, TEN_MINUTES};
use crate::config::{duration, relative_to, Origin, Problem, Scalar, Secret};
use crate::rules::Rules;
use crate::source::{Source, SourceError, SourceSection};
use crate::telemetry::Metrics;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    #[serde(default = "default_group_id")]
    pub group_id: String,
    /// Topics to subscribe to; or `topic_pattern`, not both.
    #[serde(default)]
    pub topics: Vec<String>,
    /// A librdkafka regex subscription; must start with `^`.
    pub topic_pattern: Option<String>,
    /// Passed to librdkafka as is (`security.protocol`, `sasl.*`, `ssl.*`, ...). A key ending in
    /// `_env` or `_file` is a secret indirection: `sasl.password_env: KAFKA_PASSWORD` sets
    /// `sasl.password` from that variable. Values are never logged.
    #[serde(default)]
    pub librdkafka: BTreeMap<String, Scalar>,
    /// How often finished offsets are committed (asynchronously).
    #[serde(default = "default_commit_interval", with = "duration")]
    pub commit_interval: Duration,
    /// Largest message value accepted; larger ones are dead-lettered without being parsed.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Reading stops while the events read and not yet finished hold this many bytes of
    /// messages (key and value), until acknowledgements bring them under it. The pipeline's
    /// queues count events (`pipeline.queue_capacity`); this bounds their memory when messages
    /// are large. An event costs about twice its message plus 1 KiB (the copy kept for dead
    /// letters, the decoded rows: `benches/event_memory.rs`), so the default 8 MiB holds about
    /// 17 MiB of large events; 450-byte messages never reach it (docs/design.md, "Memory:
    /// what bounds what").
    #[serde(default = "default_max_in_flight_bytes")]
    pub max_in_flight_bytes: usize,
    #[serde(skip)]
    pub resolved_librdkafka: Vec<(String, Secret)>,
    /// Static group membership (librdkafka `group.instance.id`): an id that stays the same
    /// across restarts, such as a StatefulSet pod's name, or `hostname` for the host's name. A
    /// restarted member then gets its partitions back at once instead of after
    /// `session.timeout.ms` (docs/operations.md, "Static membership").
    #[serde(default)]
    pub group_instance_id: Option<String>,
    /// How message keys and values are encoded (`json`, `avro`, `protobuf`, `auto`).
    #[serde(default)]
    pub format: KafkaFormat,
    /// Where Avro/Protobuf schemas are fetched by id; required unless `format` is `json`.
    pub schema_registry: Option<SchemaRegistryConfig>,
}

/// `source.kafka.format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KafkaFormat {
    #[default]
    Json,
    Avro,
    Protobuf,
    /// Confluent wire format when the first byte is 0, JSON otherwise.
    Auto,
}

/// `source.kafka.schema_registry`: a Confluent Schema Registry REST API.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaRegistryConfig {
    /// `http://` or `https://` (TLS through the URL).
    pub url: String,
    pub basic_auth_user: Option<String>,
    pub basic_auth_password: Option<Secret>,
    pub basic_auth_password_env: Option<String>,
    pub basic_auth_password_file: Option<PathBuf>,
    /// A PEM CA certificate to trust besides the system's.
    pub ca_file: Option<PathBuf>,
    /// Per request (connect and whole answer).
    #[serde(default = "default_registry_timeout", with = "duration")]
    pub timeout: Duration,
    #[serde(skip)]
    pub resolved_password: Option<Secret>,
}

fn default_registry_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_group_id() -> String {
    "cdc-invalidator".into()
}
fn default_commit_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_max_message_bytes() -> usize {
    8 * 1024 * 1024
}
fn default_max_in_flight_bytes() -> usize {
    8 * 1024 * 1024
}

/// Checks `source.kafka` and resolves its secrets (librdkafka `_env`/`_file` keys, the schema
/// registry password).
pub(crate) fn validate(k: &mut KafkaConfig, origin: &Origin, problems: &mut Vec<Problem>) {
    if k.brokers.trim().is_empty() {
        problems.push(origin.problem(&["source", "kafka", "brokers"], "source.kafka.brokers must not be empty"));
    }
    if k.group_id.trim().is_empty() {
        problems.push(origin.problem(&["source", "kafka", "group_id"], "source.kafka.group_id must not be empty"));
    }
    match (&k.topics.is_empty(), &k.topic_pattern) {
        (true, None) => problems.push(origin.problem(
            &["source", "kafka"],
            "source.kafka needs `topics` (a list) or `topic_pattern` (a regex starting with ^)",
        )),
        (false, Some(_)) => {
            problems.push(origin.problem(
                &["source", "kafka", "topic_pattern"],
                "source.kafka: set `topics` or `topic_pattern`, not both",
            ))
        }
        (true, Some(p)) if !p.starts_with('^') => problems.push(origin.problem(
            &["source", "kafka", "topic_pattern"],
            "source.kafka.topic_pattern must start with ^ (librdkafka treats only such names as patterns)",
        )),
        _ => {}
    }
    for (i, t) in k.topics.iter().enumerate() {
        if t.trim().is_empty() {
            let idx = i.to_string();
            problems.push(
                origin.problem(&["source", "kafka", "topics", &idx], "source.kafka.topics: a topic name is empty"),
            );
        }
    }
    validate_schema_registry(origin, k, problems);
    for reserved in ["enable.auto.commit", "group.id", "bootstrap.servers", "enable.auto.offset.store"] {
        if k.librdkafka.contains_key(reserved) {
            problems.push(origin.problem(
                &["source", "kafka", "librdkafka", reserved],
                format!("source.kafka.librdkafka.{reserved} is managed by cdc-invalidator and cannot be overridden"),
            ));
        }
    }
    if k.max_message_bytes == 0 {
        problems.push(
            origin.problem(
                &["source", "kafka", "max_message_bytes"],
                "source.kafka.max_message_bytes must be at least 1",
            ),
        );
    }
    k.resolved_librdkafka =
        crate::config::resolve_passthrough(origin, &["source", "kafka", "librdkafka"], &k.librdkafka, problems);
    crate::source::kafka::membership::validate(k, |path, message| problems.push(origin.problem(path, message)));
    let mut r = Ranges::new(origin, problems);
    r.duration(&["source", "kafka", "commit_interval"], k.commit_interval, Duration::from_millis(10), TEN_MINUTES);
    // librdkafka's own ceiling for message.max.bytes (0 is reported above).
    r.count(&["source", "kafka", "max_message_bytes"], k.max_message_bytes as u64, 0, 1_000_000_000);
    r.count(&["source", "kafka", "max_in_flight_bytes"], k.max_in_flight_bytes as u64, 1, 1 << 40);
}

impl SourceSection for KafkaConfig {
    fn validate(&mut self, origin: &Origin, problems: &mut Vec<Problem>) {
        validate(self, origin, problems);
    }

    /// The consumer `run` creates, every property set through librdkafka's conf API, and the
    /// subscription it makes (a `topic_pattern` is a regex librdkafka compiles).
    fn check(&self, origin: &Origin, problems: &mut Vec<Problem>) {
        let path = ["source", "kafka", "librdkafka"];
        let Some(consumer) =
            check_client::<BaseConsumer>(origin, &path, &self.librdkafka, super::client_config(self), problems)
        else {
            return;
        };
        let (at, topics): (&str, Vec<&str>) = match &self.topic_pattern {
            Some(p) => ("topic_pattern", vec![p.as_str()]),
            None => ("topics", self.topics.iter().map(String::as_str).collect()),
        };
        if let Err(e) = rdkafka::consumer::Consumer::subscribe(&consumer, &topics) {
            let hint = if at == "topic_pattern" { " (is it a valid regular expression?)" } else { "" };
            problems.push(origin.problem(&["source", "kafka", at], format!("source.kafka.{at}: {}{hint}", describe(&e))));
        }
    }

    fn build(
        &self,
        _queue_capacity: usize,
        rules: &watch::Receiver<Arc<Rules>>,
        metrics: Arc<Metrics>,
    ) -> Result<Box<dyn Source>, SourceError> {
        // The prefetch no longer follows the pipeline's queue (prefetch.rs).
        Ok(Box::new(super::KafkaSource::new(self, metrics)?.with_rules(rules.clone())))
    }
}

/// Sets every property through librdkafka's conf API one by one (so every bad one is reported,
/// each at its own key), then creates the client with no broker to contact, and returns it.
/// Shared with the dead-letter producer (`dead_letter.kafka.librdkafka`).
pub(crate) fn check_client<T: rdkafka::config::FromClientConfig>(
    origin: &Origin,
    path: &[&str],
    given: &BTreeMap<String, Scalar>,
    client: ClientConfig,
    problems: &mut Vec<Problem>,
) -> Option<T> {
    let mut failed = false;
    for (key, value) in client.config_map() {
        let mut one = ClientConfig::new();
        one.set(key, value);
        if let Err(e) = one.create_native_config() {
            failed = true;
            problems.push(problem_at(origin, path, given, key, &e));
        }
    }
    if failed {
        return None;
    }
    // librdkafka checks how the properties fit together only when the client is made; without
    // bootstrap servers it makes no connection.
    let mut offline = client.clone();
    offline.set("bootstrap.servers", "");
    match offline.create::<T>() {
        Ok(client) => Some(client),
        Err(e) => {
            problems.push(origin.problem(path, format!("{}: {}", path.join("."), describe(&e))));
            None
        }
    }
}

/// librdkafka's own sentence, never the value (rdkafka's `Display` appends it: a password).
fn describe(e: &KafkaError) -> String {
    let text = match e {
        KafkaError::ClientConfig(_, desc, _, _) => desc.clone(),
        KafkaError::ClientCreation(desc) => desc.clone(),
        other => other.to_string(),
    };
    crate::redact::scrub(&text).into_owned()
}

/// A problem at the key the file spelled (`sasl.password_env` for `sasl.password`), or at the
/// whole map for a property cdc-invalidator sets itself.
fn problem_at(origin: &Origin, path: &[&str], given: &BTreeMap<String, Scalar>, key: &str, e: &KafkaError) -> Problem {
    let spelled =
        [key.to_string(), format!("{key}_env"), format!("{key}_file")].into_iter().find(|k| given.contains_key(k));
    let mut at: Vec<&str> = path.to_vec();
    if let Some(k) = &spelled {
        at.push(k);
    }
    let mut problem =
        origin.problem(&at, format!("{}.{}: {}", path.join("."), spelled.as_deref().unwrap_or(key), describe(e)));
    if let KafkaError::ClientConfig(rdkafka::types::RDKafkaConfRes::RD_KAFKA_CONF_UNKNOWN, ..) = e {
        // The key is what is wrong, not its value.
        problem.location = origin.key_location(&at);
    }
    problem
}

/// `source.kafka.format` and `source.kafka.schema_registry` (issue 17).
fn validate_schema_registry(origin: &Origin, k: &mut KafkaConfig, problems: &mut Vec<Problem>) {
    let Some(registry) = k.schema_registry.as_mut() else {
        if k.format != KafkaFormat::Json {
            problems.push(origin.problem(
                &["source", "kafka", "format"],
                "source.kafka.format is not json: set source.kafka.schema_registry.url so schemas can be fetched",
            ));
        }
        return;
    };
    let path = ["source", "kafka", "schema_registry"];
    if !(registry.url.starts_with("http://") || registry.url.starts_with("https://")) {
        problems.push(origin.problem(
            &["source", "kafka", "schema_registry", "url"],
            "source.kafka.schema_registry.url must start with http:// or https://",
        ));
    }
    let any_password = registry.basic_auth_password.is_some()
        || registry.basic_auth_password_env.is_some()
        || registry.basic_auth_password_file.is_some();
    if registry.basic_auth_user.is_some() || any_password {
        let mut secret_path = path.to_vec();
        secret_path.push("basic_auth_password");
        registry.resolved_password = crate::config::resolve_secret(
            origin,
            &secret_path,
            registry.basic_auth_password.as_ref(),
            registry.basic_auth_password_env.as_deref(),
            registry.basic_auth_password_file.as_deref(),
            problems,
        );
        if registry.basic_auth_user.is_none() {
            problems
                .push(origin.problem(&path, "source.kafka.schema_registry: a password is set without basic_auth_user"));
        }
    }
    if let Some(ca) = &registry.ca_file {
        let resolved = relative_to(origin.file, ca);
        if std::fs::metadata(&resolved).is_err() {
            problems.push(origin.problem(
                &["source", "kafka", "schema_registry", "ca_file"],
                format!("source.kafka.schema_registry.ca_file {}: cannot read it", resolved.display()),
            ));
        }
        registry.ca_file = Some(resolved);
    }
}
