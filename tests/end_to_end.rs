//! The real binary against the Tansu broker (out of process) and a real Redis: the same path an
//! operator deploys.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use redis::Commands;

use crate::support::daemon::{http_get, wait_until, write_config, DaemonProcess, Setup};
use crate::support::redis::RedisServer;
use crate::support::tansu::TansuBroker;

const TOPIC: &str = "shop.public.products";

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!("{}/tests/fixtures/debezium/{name}", env!("CARGO_MANIFEST_DIR"))).expect("fixture")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_against_tansu_and_redis() {
    let broker = TansuBroker::start();
    broker.create_topic(TOPIC, 3);
    let redis = RedisServer::start();
    let url = redis.url();
    let mut c = redis::Client::open(url.as_str()).unwrap().get_connection().unwrap();
    // What an application cached: pages of product 42 and 43, and category listings registered
    // under their tags (SADD tag:<tag> <key>).
    for k in ["product:42", "product:43", "listing:5", "listing:7", "listing:9"] {
        let _: () = c.set(k, "cached").unwrap();
    }
    for (tag, key) in
        [("tag:category:5", "listing:5"), ("tag:category:7", "listing:7"), ("tag:category:9", "listing:9")]
    {
        let _: () = c.sadd(tag, key).unwrap();
    }

    let dir = tempfile::tempdir().unwrap();
    let bootstrap = broker.bootstrap();
    let (config, port) = write_config(
        dir.path(),
        &Setup { bootstrap: &bootstrap, topics: &[TOPIC], group: "e2e", redis_url: &url, extra: "", librdkafka: &[] },
    );
    let mut daemon = DaemonProcess::start(&config, dir.path());
    let ready = wait_until(Duration::from_secs(30), || http_get(port, "/readyz").is_some_and(|(s, _)| s == 200)).await;
    assert!(ready, "the daemon becomes ready; log:\n{}", daemon.log_text());

    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &bootstrap).create().unwrap();
    // The schema-envelope update moves product 42 from category 5 to 7; the insert adds 43 to 7.
    for name in ["pg-update-with-schema.json", "pg-insert.json", "tombstone.json"] {
        let value = fixture(name);
        let mut record: FutureRecord<'_, str, str> = FutureRecord::to(TOPIC).key("{\"id\":42}");
        if value.trim() != "null" {
            record = record.payload(&value);
        }
        producer.send(record, Duration::from_secs(10)).await.expect("produce to tansu");
    }

    let done = wait_until(Duration::from_secs(30), || {
        ["product:42", "product:43", "listing:5", "listing:7"].iter().all(|k| !c.exists::<_, bool>(*k).unwrap_or(true))
    })
    .await;
    assert!(done, "keys and tag members are invalidated; log:\n{}", daemon.log_text());
    assert!(c.exists::<_, bool>("listing:9").unwrap(), "an untouched tag stays");

    let (status, body) = http_get(port, "/metrics").unwrap();
    assert_eq!(status, 200);
    let line = body
        .lines()
        .find(|l| l.starts_with("cdc_invalidator_staleness_seconds_count{sink=\"redis\"}"))
        .unwrap_or_else(|| panic!("staleness histogram exported:\n{body}"));
    assert!(!line.ends_with(" 0"), "{line}");

    daemon.signal("TERM");
    let (code, log) =
        tokio::task::spawn_blocking(move || (daemon.wait(Duration::from_secs(30)), daemon.log_text())).await.unwrap();
    assert_eq!(code, Some(0), "{log}");
}
