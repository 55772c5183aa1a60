//! `source.kafka`: the checks of the Kafka source's own section (the settings themselves are
//! [`KafkaConfig`], next to the other config types so `check` and the dead-letter producer can
//! share the client settings). Called through [`crate::source::validate`].

use crate::config::{relative_to, KafkaConfig, KafkaFormat, Origin, Problem};

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
