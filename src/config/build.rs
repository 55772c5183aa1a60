//! Builds, without connecting, everything `run` builds from the config: the Redis client (its
//! URL parsed as the client parses it), the librdkafka consumer and dead-letter producer (every
//! property set through librdkafka's own conf API, then the client created with no brokers to
//! contact), and the CDN sinks. What fails here is reported like any config problem, with file,
//! line and column, so `check` rejects what `run` would (exit 2), and `run` rejects it before
//! starting anything. What remains for `run` alone is what cannot be known without the network
//! or the host: a broker or server that is down, a port already taken, a wrong password.

use super::{Config, Origin, Problem};

/// Adds a problem for everything `run` would fail to build: each component checks its own.
pub(super) fn check(config: &Config, origin: &Origin, problems: &mut Vec<Problem>) {
    config.source.check(origin, problems);
    config.sinks.check(origin, problems);
    crate::dead_letter::config::check(&config.dead_letter, &config.source, origin, problems);
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
