//! Protobuf through a schema registry, end to end: bytes from Confluent's ProtobufSerializer
//! (tests/fixtures/protobuf, written by scripts/gen-protobuf-fixtures.py from the JSON fixtures)
//! through the Kafka protocol (librdkafka's mock cluster) and the daemon to a real Redis, the
//! schemas and the files they import served by the registry double (tests/support/registry.rs)
//! as the registry's REST API serves them. Also the start-up registry check of `run` and
//! `check --against-registry`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use redis::Commands;

use crate::support::daemon::{http_get, series_sum, wait_until, write_config, Daemon, Setup};
use crate::support::kafka::{committed, MockKafka};
use crate::support::redis::RedisServer;
use crate::support::registry::{cached_products, invalidates_through_tansu, use_registry, Explain, RegistryDouble};

const TOPIC: &str = "shop.public.products";

fn protobuf(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/tests/fixtures/protobuf/{name}.pb", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// A fixture with its message-index path (after the 5-byte header; `0` in the fixtures)
/// replaced by `path`.
fn with_index_path(name: &str, path: &[u8]) -> Vec<u8> {
    let bytes = protobuf(name);
    assert_eq!(bytes[5], 0, "{name}: the fixture uses the single-0 shortcut");
    [&bytes[..5], path, &bytes[6..]].concat()
}

/// A config for the fixtures' topic, format protobuf, the registry at `registry` with basic auth
/// (password `password` from a file).
fn config(
    dir: &Path,
    bootstrap: &str,
    group: &str,
    redis: &str,
    registry: &str,
    password: &str,
) -> (std::path::PathBuf, u16) {
    let setup = Setup { bootstrap, topics: &[TOPIC], group, redis_url: redis, extra: "", librdkafka: &[] };
    let (path, port) = write_config(dir, &setup);
    use_registry(&path, "protobuf", registry, password);
    (path, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protobuf_update_invalidates_and_bad_index_paths_are_dead_lettered() {
    let redis = RedisServer::start();
    let mut c = cached_products(&redis);
    let registry = RegistryDouble::with_protobuf_fixtures();
    registry.state.lock().unwrap().auth = Some(("connect".into(), "s3cret".into()));
    let kafka = MockKafka::start(1);
    kafka.create_topic(TOPIC, 1);
    // Offset 0: the path [1]: the schema's file has one top-level message (Envelope).
    kafka.produce_bytes(TOPIC, None, Some(&with_index_path("pg-update", &[2, 2]))).await;
    // Offset 1: a path whose varint never ends.
    kafka.produce_bytes(TOPIC, None, Some(&with_index_path("pg-update", &[0xff; 11]))).await;
    // Offset 2: the update moving product 42 from category 5 to 7, Protobuf key and value.
    kafka.produce_bytes(TOPIC, Some(&protobuf("pg-key-42")), Some(&protobuf("pg-update"))).await;
    // Offset 3: a tombstone (no value) with a Protobuf key.
    kafka.produce_bytes(TOPIC, Some(&protobuf("pg-key-42")), None).await;

    let dir = tempfile::tempdir().unwrap();
    let bootstrap = kafka.bootstrap();
    let (path, port) = config(dir.path(), &bootstrap, "g-protobuf", &redis.url(), &registry.url(), "s3cret");
    let daemon = Daemon::from_config(dir.path(), &path, port);
    let gone = || ["product:42", "listing:5", "listing:7"].iter().all(|k| !c.exists::<_, bool>(*k).unwrap_or(true));
    assert!(wait_until(Duration::from_secs(30), gone).await, "the Protobuf update is invalidated");
    assert!(wait_until(Duration::from_secs(10), || daemon.dead_letters().len() >= 2).await);
    let letters = daemon.dead_letters();
    assert_eq!(letters.len(), 2, "{letters:?}");
    let id = u32::from_be_bytes(protobuf("pg-update")[1..5].try_into().unwrap()).to_string();
    for (letter, (offset, detail)) in
        letters.iter().zip([(0, "[1] names no message type"), (1, "longer than 10 bytes")])
    {
        let error = letter["error"].as_str().unwrap_or_default();
        assert!(error.contains("message-index path") && error.contains(detail), "{error}");
        assert!(error.contains(&format!("Protobuf, schema id {id}")), "{error}");
        assert_eq!(letter["source"]["offset"], serde_json::Value::from(offset));
        assert!(!letter["value_base64"].as_str().unwrap_or_default().is_empty(), "{letter}");
    }
    let mut all = 0;
    for _ in 0..100 {
        all = committed(&bootstrap, "g-protobuf", TOPIC, 1).await.first().copied().unwrap_or(-1);
        if all == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(all, 4, "every offset is committed");
    // The schema and its references were fetched once each and counted; the key's schema too.
    let (_, metrics) = http_get(port, "/metrics").expect("metrics");
    let ok = series_sum(&metrics, "cdc_invalidator_schema_registry_requests_total{outcome=\"ok\"}");
    assert!(ok >= 4.0, "schema, key schema, references, probe: {ok}\n{metrics}");
    assert!(series_sum(&metrics, "cdc_invalidator_schema_registry_cached_schemas") >= 2.0, "{metrics}");
    daemon.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_the_registry_rejects_stop_the_daemon_at_start_and_an_unreachable_one_does_not() {
    let redis = RedisServer::start();
    let registry = RegistryDouble::with_protobuf_fixtures();
    registry.state.lock().unwrap().auth = Some(("connect".into(), "s3cret".into()));
    let kafka = MockKafka::start(1);
    kafka.create_topic(TOPIC, 1);
    let bootstrap = kafka.bootstrap();

    let dir = tempfile::tempdir().unwrap();
    let (path, port) = config(dir.path(), &bootstrap, "g-pb-401", &redis.url(), &registry.url(), "wrong");
    let daemon = Daemon::from_config(dir.path(), &path, port);
    assert!(wait_until(Duration::from_secs(20), || daemon.is_finished()).await, "a 401 at start is fatal");
    let err = daemon.stop().await.expect_err("the daemon fails").to_string();
    assert!(err.contains("HTTP 401") && err.contains("basic_auth_user"), "{err}");

    // Nothing listens there: the daemon starts all the same, and stops cleanly.
    let dir = tempfile::tempdir().unwrap();
    let closed = format!("http://127.0.0.1:{}", free_port());
    let (path, port) = config(dir.path(), &bootstrap, "g-pb-down", &redis.url(), &closed, "s3cret");
    let daemon = Daemon::from_config(dir.path(), &path, port);
    let ready = wait_until(Duration::from_secs(20), || http_get(port, "/readyz").is_some_and(|(s, _)| s == 200)).await;
    assert!(ready && !daemon.is_finished(), "an unreachable registry does not stop the daemon");
    daemon.stop().await.expect("clean stop");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The released binary against Tansu decodes a Protobuf key and value (format auto).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_against_tansu_decodes_protobuf() {
    let registry = RegistryDouble::with_protobuf_fixtures();
    invalidates_through_tansu(&registry, "protobuf-tansu", &protobuf("pg-key-42"), &protobuf("pg-update")).await;
}

/// `check --against-registry`: exit 0 when the registry accepts the credentials, 1 naming the
/// settings when it refuses them, 1 when it cannot be reached.
#[test]
fn check_against_registry_reports_credentials_and_reachability() {
    let registry = RegistryDouble::with_protobuf_fixtures();
    registry.state.lock().unwrap().auth = Some(("connect".into(), "s3cret".into()));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.yaml"), include_str!("fixtures/rules/contract.yaml")).unwrap();
    let config = dir.path().join("config.yaml");
    let check = |url: &str, password: &str| {
        std::fs::write(dir.path().join("registry-password"), password).unwrap();
        std::fs::write(
            &config,
            format!(
                "rules: rules.yaml\nsource:\n  kind: kafka\n  kafka:\n    brokers: \"127.0.0.1:9092\"\n    topics: [\"t\"]\n    \
                 format: protobuf\n    schema_registry:\n      url: \"{url}\"\n      basic_auth_user: connect\n      \
                 basic_auth_password_file: registry-password\nsinks:\n  redis:\n    url: \"redis://127.0.0.1:6379\"\n"
            ),
        )
        .unwrap();
        let out = Command::new(crate::support::daemon::binary())
            .args(["check", "--against-registry", "-c"])
            .arg(&config)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = check(&registry.url(), "s3cret");
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("ok") && out.contains("PROTOBUF"), "{out}");
    let (code, _, err) = check(&registry.url(), "wrong");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("HTTP 401") && err.contains("basic_auth_user"), "{err}");
    let (code, _, err) = check(&format!("http://127.0.0.1:{}", free_port()), "s3cret");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot be reached"), "{err}");
}

/// `explain --format protobuf --schema-registry URL` prints for the Protobuf bytes what it prints
/// for the same message as JSON; a bad index path is a sentence naming the schema id.
#[test]
fn explain_decodes_a_protobuf_file_as_its_json_form() {
    let registry = RegistryDouble::with_protobuf_fixtures();
    let explain = Explain::new(TOPIC);
    let url = registry.url();
    let args = ["--format", "protobuf", "--schema-registry", url.as_str()];
    explain.assert_as_json("protobuf/pg-update.pb", &args);

    let path = explain.dir.path().join("bad-index.pb");
    std::fs::write(&path, with_index_path("pg-update", &[4, 0, 10])).unwrap();
    let (code, _, err) = explain.run(&path.display().to_string(), &args);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("message-index path") && err.contains("schema id"), "{err}");
}
