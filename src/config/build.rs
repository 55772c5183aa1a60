//! Builds, without connecting, everything `run` builds from the config: the Redis client (its
//! URL parsed as the client parses it), the librdkafka consumer and dead-letter producer (every
//! property set through librdkafka's own conf API, then the client created with no brokers to
//! contact), and the CDN sinks. What fails here is reported like any config problem, with file,
//! line and column, so `check` rejects what `run` would (exit 2), and `run` rejects it before
//! starting anything. What remains for `run` alone is what cannot be known without the network
//! or the host: a broker or server that is down, a port already taken, a wrong password.

use std::collections::BTreeMap;
use std::sync::Arc;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::BaseConsumer;
use rdkafka::error::KafkaError;
use rdkafka::producer::BaseProducer;

use super::{Config, Origin, Problem, Scalar};

/// Adds a problem for everything `run` would fail to build.
pub(super) fn check(config: &Config, origin: &Origin, problems: &mut Vec<Problem>) {
    if let Some(r) = &config.sinks.redis {
        if let Some(url) = &r.resolved_url {
            if let Err(e) = redis::Client::open(url.expose()) {
                problems
                    .push(origin.problem(&["sinks", "redis", "url"], format!("sinks.redis.url: {}", redis_reason(&e))));
            }
        }
    }
    if let Some(k) = &config.source.kafka {
        let path = ["source", "kafka", "librdkafka"];
        if let Some(consumer) =
            kafka::<BaseConsumer>(origin, &path, &k.librdkafka, crate::source::kafka::client_config(k), problems)
        {
            // The subscription `run` makes (a topic_pattern is a regex librdkafka compiles).
            let (at, topics): (&str, Vec<&str>) = match &k.topic_pattern {
                Some(p) => ("topic_pattern", vec![p.as_str()]),
                None => ("topics", k.topics.iter().map(String::as_str).collect()),
            };
            if let Err(e) = rdkafka::consumer::Consumer::subscribe(&consumer, &topics) {
                let hint = if at == "topic_pattern" { " (is it a valid regular expression?)" } else { "" };
                problems.push(
                    origin.problem(&["source", "kafka", at], format!("source.kafka.{at}: {}{hint}", describe(&e))),
                );
            }
        }
    }
    if let Some(dl) = &config.dead_letter.kafka {
        let path = ["dead_letter", "kafka", "librdkafka"];
        let client = crate::dead_letter::kafka::client_config(dl, config.source.kafka.as_ref());
        let _ = kafka::<BaseProducer>(origin, &path, &dl.librdkafka, client, problems);
    }
    if let (Some(file), None) = (&config.dead_letter.file, &config.dead_letter.kafka) {
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
    // A registry of its own: building registers each sink's series.
    let metrics = Arc::new(crate::telemetry::Metrics::new());
    for (i, cdn) in config.sinks.cdn.iter().enumerate() {
        if let Err(e) = cdn.build(metrics.clone()) {
            problems.push(origin.problem(&["sinks", "cdn", &i.to_string()], format!("sinks.cdn[{i}]: {e}")));
        }
    }
}

/// The Redis client's reason in words, without the URL (it may hold a password).
fn redis_reason(e: &redis::RedisError) -> String {
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

/// Sets every property through librdkafka's conf API one by one (so every bad one is reported,
/// each at its own key), then creates the client with no broker to contact, and returns it.
fn kafka<T: rdkafka::config::FromClientConfig>(
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
        problem.location = origin.doc.as_ref().map(|d| d.locate_key(&at));
    }
    problem
}

#[cfg(test)]
mod tests {
    fn load(text: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, text).unwrap();
        match crate::config::load_with_env(&path, []) {
            Ok(_) => "ok".into(),
            Err(e) => e.to_string().replace(&format!("{}", path.display()), "c.yaml"),
        }
    }

    fn config(url: &str, librdkafka: &str) -> String {
        format!(
            "rules: r.yaml\nsource:\n  kind: kafka\n  kafka:\n    brokers: \"127.0.0.1:9\"\n    topics: [t]\n    librdkafka:\n{librdkafka}sinks:\n  redis:\n    url: \"{url}\"\n"
        )
    }

    /// Each passed `check` and made `run` exit 1.
    #[test]
    fn what_run_cannot_build_is_a_config_problem_with_its_location() {
        let ok = config("redis://127.0.0.1:6379/0", "      fetch.wait.max.ms: 10\n");
        assert_eq!(load(&ok), "ok");

        let text = load(&config("redis://:pw-5e1d@127.0.0.1:notaport", "      fetch.wait.max.ms: 10\n"));
        assert!(text.starts_with("c.yaml:11:10: sinks.redis.url: "), "{text}");
        assert!(!text.contains("pw-5e1d"), "{text}");
        let text = load(&config("redis://127.0.0.1:6379/notadb", "      fetch.wait.max.ms: 10\n"));
        assert!(text.starts_with("c.yaml:11:10: sinks.redis.url: "), "{text}");

        let text = load(&config(
            "redis://127.0.0.1:6379",
            "      fetch.wait.max.mss: 10\n      fetch.wait.max.ms: lots\n      security.protocol: SASL_SSL\n",
        ));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            text.contains("c.yaml:8:7: source.kafka.librdkafka.fetch.wait.max.mss: No such configuration property"),
            "{text}"
        );
        assert!(text.contains("c.yaml:9:26: source.kafka.librdkafka.fetch.wait.max.ms: Invalid value"), "{text}");

        let pattern = config("redis://127.0.0.1:6379", "      fetch.wait.max.ms: 10\n")
            .replace("    topics: [t]\n", "    topic_pattern: \"^dbz.((\"\n");
        let text = load(&pattern);
        assert!(text.starts_with("c.yaml:6:20: source.kafka.topic_pattern: Subscription error"), "{text}");
    }
}
