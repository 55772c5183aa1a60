//! Avro through a schema registry, end to end: bytes from Confluent's AvroSerializer
//! (tests/fixtures/avro, written by scripts/gen-avro-fixtures.py from the JSON fixtures) through
//! the Kafka protocol (librdkafka's mock cluster) and the daemon to a real Redis, the schemas
//! served by the registry double (tests/support/registry.rs).

use std::path::Path;
use std::time::Duration;

use redis::Commands;

use crate::support::daemon::{wait_until, write_config, Daemon, Setup};
use crate::support::kafka::{committed, MockKafka};
use crate::support::redis::RedisServer;
use crate::support::registry::{cached_products, invalidates_through_tansu, use_registry, Explain, RegistryDouble};

const TOPIC: &str = "shop.public.products";

fn avro(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/tests/fixtures/avro/{name}.avro", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn start(dir: &Path, bootstrap: &str, group: &str, redis: &str, registry: &str) -> Daemon {
    let setup = Setup { bootstrap, topics: &[TOPIC], group, redis_url: redis, extra: "", librdkafka: &[] };
    let (path, port) = write_config(dir, &setup);
    use_registry(&path, "avro", registry, "s3cret");
    Daemon::from_config(dir, &path, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_update_invalidates_and_unknown_schema_id_is_dead_lettered_with_its_id() {
    let redis = RedisServer::start();
    let mut c = cached_products(&redis);
    let registry = RegistryDouble::with_avro_fixtures();
    registry.state.lock().unwrap().auth = Some(("connect".into(), "s3cret".into()));
    let kafka = MockKafka::start(1);
    kafka.create_topic(TOPIC, 1);
    // Offset 0: a schema id the registry does not know (framing of id 999 over real bytes).
    let mut unknown = avro("pg-update");
    unknown[1..5].copy_from_slice(&999u32.to_be_bytes());
    kafka.produce_bytes(TOPIC, None, Some(&unknown)).await;
    // Offset 1: the update moving product 42 from category 5 to 7, Avro key and value.
    kafka.produce_bytes(TOPIC, Some(&avro("pg-key-42")), Some(&avro("pg-update"))).await;
    // Offset 2: a tombstone (no value) with an Avro key.
    kafka.produce_bytes(TOPIC, Some(&avro("pg-key-42")), None).await;

    let dir = tempfile::tempdir().unwrap();
    let bootstrap = kafka.bootstrap();
    let daemon = start(dir.path(), &bootstrap, "g-avro", &redis.url(), &registry.url());
    let gone = || ["product:42", "listing:5", "listing:7"].iter().all(|k| !c.exists::<_, bool>(*k).unwrap_or(true));
    assert!(wait_until(Duration::from_secs(30), gone).await, "the Avro update is invalidated");
    assert!(wait_until(Duration::from_secs(10), || !daemon.dead_letters().is_empty()).await);
    let letters = daemon.dead_letters();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let error = letters[0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("999") && error.contains("404"), "{error}");
    assert_eq!(letters[0]["source"]["offset"], serde_json::Value::from(0));
    let mut all = 0;
    for _ in 0..100 {
        all = committed(&bootstrap, "g-avro", TOPIC, 1).await.first().copied().unwrap_or(-1);
        if all == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(all, 3, "every offset is committed");
    daemon.stop().await.expect("clean stop");

    // The dead letter keeps the binary value (base64); once the registry has schema 999, `replay`
    // decodes it as the source would and invalidates.
    let letter_value = letters[0]["value_base64"].as_str().unwrap_or_default();
    assert!(!letter_value.is_empty(), "{:?}", letters[0]);
    let update = avro("pg-update");
    let id = u32::from_be_bytes([update[1], update[2], update[3], update[4]]);
    let text = registry.state.lock().unwrap().schemas.iter().find(|s| s.0 == id).unwrap().3.clone();
    registry.insert(999, "shop.public.products-value", "AVRO", &text);
    let _: () = c.set("product:42", "cached").unwrap();
    let config = dir.path().join("config.yaml");
    let letters_file = dir.path().join("dead-letters.jsonl");
    let out = std::process::Command::new(crate::support::daemon::binary())
        .arg("replay")
        .args(["-c", config.to_str().unwrap(), "--file", letters_file.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!c.exists::<_, bool>("product:42").unwrap(), "replayed Avro dead letter invalidates: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_outage_holds_the_message_unacknowledged_until_it_answers() {
    let redis = RedisServer::start();
    let mut c = cached_products(&redis);
    let registry = RegistryDouble::with_avro_fixtures();
    registry.state.lock().unwrap().auth = Some(("connect".into(), "s3cret".into()));
    registry.set_outage(true);
    let kafka = MockKafka::start(1);
    kafka.create_topic(TOPIC, 1);
    kafka.produce_bytes(TOPIC, Some(&avro("pg-key-42")), Some(&avro("pg-update"))).await;

    let dir = tempfile::tempdir().unwrap();
    let bootstrap = kafka.bootstrap();
    let daemon = start(dir.path(), &bootstrap, "g-avro-outage", &redis.url(), &registry.url());
    assert!(wait_until(Duration::from_secs(30), || registry.lookups() >= 3).await, "the registry is retried");
    assert!(c.exists::<_, bool>("product:42").unwrap(), "nothing invalidated without the schema");
    assert!(daemon.dead_letters().is_empty(), "a registry outage is not a dead letter");
    let offsets = committed(&bootstrap, "g-avro-outage", TOPIC, 1).await;
    assert!(offsets.first().copied().unwrap_or(-1) <= 0, "nothing acknowledged: {offsets:?}");

    registry.set_outage(false);
    let gone = || !c.exists::<_, bool>("product:42").unwrap_or(true);
    assert!(wait_until(Duration::from_secs(30), gone).await, "invalidated once the registry answers");
    assert!(daemon.dead_letters().is_empty());
    daemon.stop().await.expect("clean stop");
}

/// `explain --format avro --schema-registry URL` prints for Avro bytes what it prints for the
/// same message as JSON.
#[test]
fn explain_decodes_an_avro_file_as_its_json_form() {
    let registry = RegistryDouble::with_avro_fixtures();
    let explain = Explain::new(TOPIC);
    let dir = &explain.dir;
    let root = env!("CARGO_MANIFEST_DIR");
    let run = |event: String, extra: &[&str]| explain.run(&event, extra);
    let url = registry.url();
    explain.assert_as_json("avro/pg-update.avro", &["--format", "avro", "--schema-registry", &url]);

    // A schema id the registry does not have: exit 1, the id named.
    let mut unknown = avro("pg-update");
    unknown[1..5].copy_from_slice(&77u32.to_be_bytes());
    let path = dir.path().join("unknown.avro");
    std::fs::write(&path, unknown).unwrap();
    let (code, _, err) = run(path.display().to_string(), &["--format", "avro", "--schema-registry", &url]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("schema id 77") || err.contains("id 77"), "{err}");

    // A schema that does not parse, a Protobuf schema, a registry refusing the credentials:
    // each a sentence naming the schema id, never a panic.
    registry.insert(55, "broken-value", "AVRO", "{\"type\": \"record\", \"name\": \"X\"");
    registry.insert(56, "proto-value", "PROTOBUF", "syntax = \"proto3\"; message X { int64 id = 1; }");
    for (id, expected) in [
        (55u32, "schema id 55 from the schema registry does not parse"),
        (56, "(Protobuf, schema id 56) cannot be read"),
    ] {
        let mut bytes = avro("pg-update");
        bytes[1..5].copy_from_slice(&id.to_be_bytes());
        std::fs::write(&path, bytes).unwrap();
        let (code, _, err) = run(path.display().to_string(), &["--format", "auto", "--schema-registry", &url]);
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains(expected) && err.contains(&id.to_string()), "{err}");
    }
    registry.state.lock().unwrap().auth = Some(("connect".into(), "s3cret".into()));
    let (code, _, err) =
        run(format!("{root}/tests/fixtures/avro/pg-update.avro"), &["--format", "avro", "--schema-registry", &url]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("HTTP 401"), "{err}");
    // A truncated record.
    let whole = avro("pg-update");
    std::fs::write(&path, &whole[..whole.len() - 7]).unwrap();
    registry.state.lock().unwrap().auth = None;
    let (code, _, err) = run(path.display().to_string(), &["--format", "avro", "--schema-registry", &url]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot be read") && err.contains("ends early"), "{err}");
}

/// `format: avro` without a registry, a password without a user or from an unset variable:
/// `check` exits 2 naming each, by file and line.
#[test]
fn check_rejects_avro_without_a_usable_registry() {
    use std::process::Command;

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.yaml"), include_str!("fixtures/rules/contract.yaml")).unwrap();
    let config = dir.path().join("config.yaml");
    let base =
        "rules: rules.yaml\nsource:\n  kind: kafka\n  kafka:\n    brokers: \"127.0.0.1:9092\"\n    topics: [\"t\"]\n";
    let sinks = "sinks:\n  redis:\n    url: \"redis://127.0.0.1:6379\"\n";
    let check = |kafka_extra: &str| {
        std::fs::write(&config, format!("{base}{kafka_extra}{sinks}")).unwrap();
        let out = Command::new(crate::support::daemon::binary()).args(["check", "-c"]).arg(&config).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = check("    format: avro\n");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("config.yaml:7:") && err.contains("schema_registry"), "{err}");
    let (code, err) = check(
        "    format: auto\n    schema_registry:\n      url: \"registry:8081\"\n      basic_auth_user: u\n      \
         basic_auth_password_env: CDC_TEST_UNSET_REGISTRY_PASSWORD\n",
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("must start with http://"), "{err}");
    assert!(err.contains("CDC_TEST_UNSET_REGISTRY_PASSWORD, which is not set"), "{err}");
    let (code, err) = check("    format: avro\n    schema_registry:\n      url: \"http://127.0.0.1:8081\"\n");
    assert_eq!(code, Some(0), "{err}");
}

/// The released binary against Tansu (the Kafka protocol out of process) and a real Redis, Avro
/// key and value through the registry double.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_against_tansu_decodes_avro() {
    let registry = RegistryDouble::with_avro_fixtures();
    invalidates_through_tansu(&registry, "avro-tansu", &avro("pg-key-42"), &avro("pg-update")).await;
}
