//! Static group membership (KIP-345): `source.kafka.group_instance_id` becomes librdkafka's
//! `group.instance.id`.
//!
//! Why: after a kill -9 the broker keeps a dynamic member's partitions until its session times
//! out (`session.timeout.ms`, 45 s by default), and a restarted daemon joins as a new member
//! that waits for that. A static member that comes back with the same id within the session
//! timeout takes its place, and its partitions, at once, with no rebalance. The trade-off: a
//! static member that does not come back holds its partitions for the whole session timeout,
//! and a clean shutdown does not hand them over early (a static member does not leave the
//! group), so keep `session.timeout.ms` near the time a restart takes.

use crate::config::KafkaConfig;

/// The value that means "this host's name" (a Kubernetes pod's name in a StatefulSet).
pub const HOSTNAME: &str = "hostname";

/// Kafka's limit for group instance ids, as for topic names.
const MAX_LEN: usize = 249;

/// The `group.instance.id` to set, if any.
pub fn instance_id(config: &KafkaConfig) -> Option<String> {
    match config.group_instance_id.as_deref()? {
        HOSTNAME => host_name(),
        id => Some(id.to_string()),
    }
}

/// The host's name: `HOSTNAME` (set by shells and by Kubernetes), else the kernel's.
fn host_name() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

/// Checks `group_instance_id` at load time; `problem(path, sentence)` records each problem.
pub fn validate(config: &KafkaConfig, mut problem: impl FnMut(&[&str], String)) {
    let at = ["source", "kafka", "group_instance_id"];
    if config.group_instance_id.is_none() {
        // Dynamic membership, or `librdkafka: { group.instance.id: .. }` set by hand.
        return;
    }
    if config.librdkafka.contains_key("group.instance.id") {
        problem(&at, "set source.kafka.group_instance_id or librdkafka group.instance.id, not both".into());
        return;
    }
    match instance_id(config) {
        None => problem(&at, "source.kafka.group_instance_id is `hostname` but the host name cannot be read".into()),
        Some(id) if id.is_empty() || id.len() > MAX_LEN => {
            problem(&at, format!("source.kafka.group_instance_id must be 1 to {MAX_LEN} characters"))
        }
        Some(id) if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) => problem(
            &at,
            format!("source.kafka.group_instance_id {id:?} may hold only letters, digits, `.`, `_` and `-`"),
        ),
        Some(_) => {}
    }
}

#[cfg(test)]
mod tests {
    fn load(id: &str) -> Result<Option<String>, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(
            &path,
            format!("rules: r.yaml\nsource:\n  kind: kafka\n  kafka:\n    brokers: b\n    topics: [t]\n    group_instance_id: {id}\nsinks:\n  redis:\n    url: \"redis://127.0.0.1:6379\"\n"),
        )
        .unwrap();
        match crate::config::load_with_env(&path, []) {
            Ok(c) => {
                let k = c.source.kafka.unwrap();
                Ok(crate::source::kafka::client_config(&k).get("group.instance.id").map(str::to_string))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    #[test]
    fn the_instance_id_is_given_or_the_host_name() {
        assert_eq!(load("cdc-invalidator-0"), Ok(Some("cdc-invalidator-0".into())));
        let host = super::host_name().unwrap();
        assert_eq!(load("hostname"), Ok(Some(host)));
        let err = load("\"bad id\"").unwrap_err();
        assert!(err.contains("c.yaml:7:24: source.kafka.group_instance_id \"bad id\" may hold only"), "{err}");
    }
}
