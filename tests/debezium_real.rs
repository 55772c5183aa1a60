//! Issue 11: real Debezium shapes (fixtures from debezium/debezium, `tests/fixtures/debezium-real`)
//! through `explain` and the running daemon on Kafka, which must agree; and one PostgreSQL row
//! through pgoutput and through Debezium's JSON, which must give the same keys.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use redis::Commands;

use cdc_invalidator::event::Decoded;
use cdc_invalidator::rules::Rules;
use cdc_invalidator::source::debezium;

use crate::support::daemon::{
    binary, http_get, read_dead_letters, wait_until, write_config, Daemon, DaemonProcess, Setup,
};
use crate::support::postgres::{self as pg, PgCluster, PgSetup};
use crate::support::redis::RedisServer;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/debezium-real").join(name)
}

const REAL_RULES: &str = r#"version: 1
rules:
  - name: toast
    table: dbz1258.toast_test
    redis: { keys: ["row:{pk}", "doc:{payload}"] }
  - name: products
    table: public.products
    redis: { keys: ["product:{id}"] }
  - name: orders
    table: shop.orders
    redis: { keys: ["orders:{day}", "orders-at:{local_ts}", "orders-z:{zoned_ts}"] }
  - name: customers
    table: inventory.customers
    redis: { keys: ["customer:{_id}"] }
"#;

/// (topic, key fixture, value fixture), each shape of the issue the daemon must act on.
const MESSAGES: [(&str, Option<&str>, &str); 4] = [
    // PostgresConnectorIT.java, DBZ-1258: unchanged TOAST as the placeholder.
    ("test_server.dbz1258.toast_test", None, "pg-toast-update.json"),
    // DefaultDeleteHandlingStrategy.java, TOMBSTONE mode: a schema-carrying null is a delete.
    ("shop.public.products", Some("key-products-42-schema.json"), "unwrap-delete-tombstone-mode.json"),
    // mysql.adoc, time.precision.mode=connect: dates as day counts, rendered as ISO.
    ("shopdb.shop.orders", None, "mysql-connect-temporal.json"),
    // mongodb.adoc: a delete without pre-image, `_id` from the key.
    ("fulfillment.inventory.customers", Some("mongodb-key-1004.json"), "mongodb-delete-no-preimage.json"),
];

const FRAMED_TOPIC: &str = "shop.public.framed";
const UNWRAPPED_TOPIC: &str = "shop.products_all";
/// Magic byte 0 and schema id 7: the Confluent wire format.
const FRAMED: [u8; 7] = [0, 0, 0, 0, 7, 2, 0x54];

fn explain(rules: &Path, event: &Path, key: Option<&Path>, topic: &str) -> std::process::Output {
    let mut command = Command::new(binary());
    command.args(["explain", "--rules"]).arg(rules).arg("--event").arg(event).args(["--topic", topic]);
    if let Some(key) = key {
        command.arg("--key").arg(key);
    }
    command.output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_debezium_shapes_explain_and_daemon_agree() {
    let dir = tempfile::tempdir().unwrap();
    let rules_path = dir.path().join("real-rules.yaml");
    std::fs::write(&rules_path, REAL_RULES).unwrap();

    // What `explain` says for each message.
    let mut expected = BTreeSet::new();
    for (topic, key, value) in MESSAGES {
        let out = explain(&rules_path, &fixture(value), key.map(fixture).as_deref(), topic);
        assert_eq!(out.status.code(), Some(0), "{value}: {}", String::from_utf8_lossy(&out.stderr));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        for k in json["redis_keys"].as_array().unwrap() {
            expected.insert(k.as_str().unwrap().to_owned());
        }
        let errors = json["errors"].as_array().unwrap();
        assert_eq!(errors.is_empty(), value != "pg-toast-update.json", "{value}: {json}");
    }
    let wanted: BTreeSet<String> = [
        "row:1",
        "product:42",
        "orders:2024-03-15",
        "orders-at:2024-03-15T10:04:05.25",
        "orders-z:2024-03-15T09:04:05.25Z",
        "customer:1004",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(expected, wanted);
    let framed_path = dir.path().join("framed.bin");
    std::fs::write(&framed_path, FRAMED).unwrap();
    let out = explain(&rules_path, &framed_path, None, FRAMED_TOPIC);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("Confluent wire format, schema id 7: set source.kafka.format to avro or auto"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The daemon on Kafka invalidates exactly those, and nothing a placeholder or a day count
    // would have named.
    let broker = crate::support::tansu::TansuBroker::start();
    let topics: Vec<&str> = MESSAGES.iter().map(|(t, _, _)| *t).chain([FRAMED_TOPIC, UNWRAPPED_TOPIC]).collect();
    for topic in &topics {
        broker.create_topic(topic, 1);
    }
    let redis = RedisServer::start();
    let url = redis.url();
    let mut c = redis::Client::open(url.as_str()).unwrap().get_connection().unwrap();
    let canaries = ["doc:__debezium_unavailable_value", "orders:19797", "customer:null"];
    for k in expected.iter().map(String::as_str).chain(canaries) {
        let _: () = c.set(k, "cached").unwrap();
    }
    let bootstrap = broker.bootstrap();
    let (config, port) = write_config(
        dir.path(),
        &Setup { bootstrap: &bootstrap, topics: &topics, group: "real", redis_url: &url, extra: "", librdkafka: &[] },
    );
    std::fs::write(dir.path().join("rules.yaml"), REAL_RULES).unwrap();
    let mut daemon = DaemonProcess::start(&config, dir.path());
    let ready = wait_until(Duration::from_secs(30), || http_get(port, "/readyz").is_some_and(|(s, _)| s == 200)).await;
    assert!(ready, "the daemon becomes ready; log:\n{}", daemon.log_text());

    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &bootstrap).create().unwrap();
    for (topic, key, value) in MESSAGES {
        let value = std::fs::read(fixture(value)).unwrap();
        let key = key.map(|k| std::fs::read(fixture(k)).unwrap());
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).payload(&value);
        if let Some(key) = &key {
            record = record.key(key);
        }
        producer.send(record, Duration::from_secs(10)).await.expect("produce to tansu");
    }
    let framed: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(FRAMED_TOPIC).payload(&FRAMED);
    producer.send(framed, Duration::from_secs(10)).await.expect("produce to tansu");
    // What a misconfigured ExtractNewRecordState writes: a schemaless row without `__deleted`
    // (event-flattening.adoc, `add.fields=source.table`), and a delete as a bare JSON null.
    let unwrapped = std::fs::read(fixture("unwrap-source-table.json")).unwrap();
    let record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(UNWRAPPED_TOPIC).payload(&unwrapped);
    producer.send(record, Duration::from_secs(10)).await.expect("produce to tansu");
    let null: FutureRecord<'_, [u8], [u8]> =
        FutureRecord::to(UNWRAPPED_TOPIC).key(&b"{\"id\":42}"[..]).payload(&b"null"[..]);
    producer.send(null, Duration::from_secs(10)).await.expect("produce to tansu");

    let done =
        wait_until(Duration::from_secs(30), || expected.iter().all(|k| !c.exists::<_, bool>(k).unwrap_or(true))).await;
    assert!(done, "every key explain lists is invalidated; log:\n{}", daemon.log_text());
    let letters_path = dir.path().join("dead-letters.jsonl");
    let lettered = wait_until(Duration::from_secs(30), || read_dead_letters(&letters_path).len() == 2).await;
    assert!(lettered, "{:?}\n{}", read_dead_letters(&letters_path), daemon.log_text());
    let reasons: Vec<String> =
        read_dead_letters(&letters_path).iter().map(|l| l["error"].as_str().unwrap_or_default().to_owned()).collect();
    assert!(reasons.iter().any(|r| r.contains("\"payload\" is absent")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("Confluent wire format, schema id 7")), "{reasons:?}");
    for k in canaries {
        assert!(c.exists::<_, bool>(k).unwrap(), "{k} is never invalidated");
    }
    let warned = wait_until(Duration::from_secs(30), || {
        let log = daemon.log_text();
        log.contains("without a `__deleted` field") && log.contains("a message value is JSON null")
    })
    .await;
    assert!(warned, "both SMT warnings are logged; log:\n{}", daemon.log_text());
    daemon.signal("TERM");
    let code = tokio::task::spawn_blocking(move || daemon.wait(Duration::from_secs(30))).await.unwrap();
    assert_eq!(code, Some(0));
}

const TEMPORAL_RULES: &str = r#"version: 1
rules:
  - name: events
    table: public.events
    redis: { keys: ["ev:{id}:{day}", "at:{at}", "lt:{local_ts}", "zt:{zoned_ts}"] }
"#;

/// One row through pgoutput (a real PostgreSQL whose TimeZone is not UTC) and through the
/// Debezium JSON the PostgreSQL connector writes for it (default `time.precision.mode=adaptive`:
/// `Date`, `MicroTime`, `MicroTimestamp`, `ZonedTimestamp`; the encodings computed by
/// PostgreSQL from the same row): the same keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgoutput_and_debezium_render_one_row_alike() {
    let cluster = PgCluster::start_with(&["timezone = 'Asia/Kolkata'"]);
    cluster
        .sql("CREATE TABLE events (id int PRIMARY KEY, day date, at time, local_ts timestamp, zoned_ts timestamptz);")
        .await;
    cluster.publish("cdc_pub", "events", "cdc_slot").await;
    cluster
        .sql(
            "INSERT INTO events VALUES (1, '2024-03-15', '10:04:05.25', '2024-03-15 10:04:05.25', '2024-03-15 10:04:05.25+01');",
        )
        .await;

    // The Debezium message for that row, its values encoded by PostgreSQL itself.
    let client = cluster.client().await;
    let row = client
        .query_one(
            "SELECT (day - date '1970-01-01')::int,
                    (extract(epoch from at) * 1000000)::bigint,
                    (extract(epoch from local_ts) * 1000000)::bigint,
                    to_char(zoned_ts AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')
             FROM events WHERE id = 1",
            &[],
        )
        .await
        .unwrap();
    let (days, micro_time, micro_ts, zoned): (i32, i64, i64, String) = (row.get(0), row.get(1), row.get(2), row.get(3));
    let message = serde_json::json!({
        "schema": {"type": "struct", "name": "shop.public.events.Envelope", "fields": [
            {"type": "struct", "field": "after", "optional": true, "fields": [
                {"type": "int32", "field": "id"},
                {"type": "int32", "field": "day", "name": "io.debezium.time.Date", "version": 1},
                {"type": "int64", "field": "at", "name": "io.debezium.time.MicroTime", "version": 1},
                {"type": "int64", "field": "local_ts", "name": "io.debezium.time.MicroTimestamp", "version": 1},
                {"type": "string", "field": "zoned_ts", "name": "io.debezium.time.ZonedTimestamp", "version": 1}]},
            {"type": "struct", "field": "source", "fields": []},
            {"type": "string", "field": "op"}]},
        "payload": {
            "before": null,
            "after": {"id": 1, "day": days, "at": micro_time, "local_ts": micro_ts, "zoned_ts": zoned},
            "source": {"connector": "postgresql", "db": "postgres", "schema": "public", "table": "events"},
            "op": "c"
        }
    });
    let rules = Rules::parse(TEMPORAL_RULES, Path::new("rules.yaml")).unwrap();
    let decoded = debezium::decode("shop.public.events", None, Some(message.to_string().as_bytes())).unwrap();
    let Decoded::Change(event) = decoded else { panic!("{decoded:?}") };
    let eval = rules.evaluate(&event);
    assert!(eval.errors.is_empty(), "{eval:?}");
    let keys = eval.invalidations.items(cdc_invalidator::sink::ItemKind::RedisKey).to_vec();
    assert_eq!(
        keys,
        ["at:10:04:05.25", "ev:1:2024-03-15", "lt:2024-03-15T10:04:05.25", "zt:2024-03-15T09:04:05.25Z"],
        "Debezium JSON renders the contract's spellings"
    );

    // pgoutput: the daemon deletes exactly those keys.
    let redis = RedisServer::start();
    let mut c = redis.connection();
    for k in &keys {
        let _: () = c.set(k, "cached").unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let url = cluster.url();
    let (config, port) =
        pg::write_config(dir.path(), &PgSetup::new(&url, "cdc_slot", "cdc_pub", &redis.url(), TEMPORAL_RULES));
    let daemon = Daemon::from_config(dir.path(), &config, port);
    let gone =
        wait_until(Duration::from_secs(30), || keys.iter().all(|k| !c.exists::<_, bool>(k).unwrap_or(true))).await;
    assert!(gone, "pgoutput renders the same keys; dead letters: {:?}", daemon.dead_letters());
    assert!(daemon.dead_letters().is_empty(), "{:?}", daemon.dead_letters());
    daemon.stop().await.unwrap();
}

/// `source.debezium.unavailable_value_placeholder` reaches the decoder of the commands that load
/// the config (here `replay --dry-run`, which decodes as the daemon does), and an empty one is
/// a config error.
#[test]
fn a_custom_placeholder_from_the_config_is_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = write_config(
        dir.path(),
        &Setup {
            bootstrap: "127.0.0.1:1",
            topics: &["shop.public.products"],
            group: "placeholder",
            redis_url: "redis://127.0.0.1:1",
            extra: "",
            librdkafka: &[],
        },
    );
    std::fs::write(
        dir.path().join("rules.yaml"),
        "version: 1\nrules:\n  - name: pages\n    table: public.products\n    redis: { keys: [\"product:{id}\", \"slug:{slug}\"] }\n",
    )
    .unwrap();
    let text = std::fs::read_to_string(&config).unwrap();
    let with = |placeholder: &str| {
        text.replacen(
            "source:\n",
            &format!("source:\n  debezium:\n    unavailable_value_placeholder: \"{placeholder}\"\n"),
            1,
        )
    };
    std::fs::write(&config, with("N/A")).unwrap();
    let input = dir.path().join("events.jsonl");
    std::fs::write(
        &input,
        "{\"before\":null,\"after\":{\"id\":42,\"slug\":\"N/A\"},\"source\":{\"schema\":\"public\",\"table\":\"products\"},\"op\":\"c\"}\n",
    )
    .unwrap();
    let out = Command::new(binary())
        .args(["replay", "-c"])
        .arg(&config)
        .arg("--file")
        .arg(&input)
        .args(["--topic", "shop.public.products", "--dry-run"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {stdout} {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(line["redis_keys"], serde_json::json!(["product:42"]), "{line}");
    assert_eq!(line["errors"].as_array().map(Vec::len), Some(1), "{line}");

    std::fs::write(&config, with("")).unwrap();
    let out = Command::new(binary()).args(["check", "-c"]).arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unavailable_value_placeholder must not be empty"), "{stderr}");
}
