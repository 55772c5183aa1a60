//! `dead_letter`: where dead letters go (a JSON-lines file or a Kafka topic), its checks and its
//! offline build check.

use std::collections::BTreeMap;
use std::path::PathBuf;

use rdkafka::producer::BaseProducer;
use serde::Deserialize;

use crate::config::{relative_to, resolve_passthrough, Origin, Problem, Scalar, Secret};
use crate::retry::RetryPolicy;
use crate::source::SourceConfig;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterConfig {
    /// A JSON-lines file (relative to the config file). Used when `kafka` is not set.
    pub file: Option<PathBuf>,
    /// A Kafka topic on the source cluster (or on `brokers`).
    pub kafka: Option<DeadLetterKafka>,
    #[serde(default)]
    pub retry: RetryPolicy,
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        DeadLetterConfig { file: Some(PathBuf::from("dead-letters.jsonl")), kafka: None, retry: RetryPolicy::default() }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterKafka {
    pub topic: String,
    /// Defaults to the source's brokers and librdkafka settings.
    pub brokers: Option<String>,
    #[serde(default)]
    pub librdkafka: BTreeMap<String, Scalar>,
    #[serde(skip)]
    pub resolved_librdkafka: Vec<(String, Secret)>,
}

impl DeadLetterConfig {
    /// Checks the section, makes the file path relative to the config file and resolves the
    /// producer's secrets.
    pub(crate) fn validate(&mut self, origin: &Origin, problems: &mut Vec<Problem>) {
        match (&self.kafka, &self.file) {
            (Some(k), _) => {
                if k.topic.trim().is_empty() {
                    problems.push(
                        origin.problem(&["dead_letter", "kafka", "topic"], "dead_letter.kafka.topic must not be empty"),
                    );
                }
            }
            (None, None) => problems.push(
                origin.problem(&["dead_letter"], "dead_letter needs `file` or `kafka`: dead letters must go somewhere"),
            ),
            (None, Some(_)) => {}
        }
        if self.kafka.is_some() {
            self.file = None;
        }
        if let Some(f) = self.file.as_mut() {
            *f = relative_to(origin.file, f);
        }
        if let Some(k) = self.kafka.as_mut() {
            k.resolved_librdkafka =
                resolve_passthrough(origin, &["dead_letter", "kafka", "librdkafka"], &k.librdkafka, problems);
        }
    }
}

/// What `run` would fail to open, found without connecting or writing: the producer (which
/// defaults to the Kafka source's cluster), or a file path that names no file.
pub(crate) fn check(config: &DeadLetterConfig, source: &SourceConfig, origin: &Origin, problems: &mut Vec<Problem>) {
    if let Some(dl) = &config.kafka {
        let path = ["dead_letter", "kafka", "librdkafka"];
        let client = super::kafka::client_config(dl, source.kafka.as_ref());
        let _ =
            crate::source::kafka::config::check_client::<BaseProducer>(origin, &path, &dl.librdkafka, client, problems);
    }
    if let (Some(file), None) = (&config.file, &config.kafka) {
        // `run` creates the file (or appends to it); what `check` can see without writing.
        let why = if file.as_os_str().is_empty() || file.to_string_lossy().ends_with('/') {
            Some("names no file".to_string())
        } else if file.is_dir() {
            Some("is a directory".to_string())
        } else {
            // A missing folder is not reported: `check` often runs on another machine (CI)
            // than the daemon, where /var/lib/... exists.
            None
        };
        if let Some(why) = why {
            problems
                .push(origin.problem(&["dead_letter", "file"], format!("dead_letter.file {}: {why}", file.display())));
        }
    }
}
