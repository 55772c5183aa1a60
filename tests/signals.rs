//! The real binary: SIGTERM drains and commits, exit codes of the contract.

use std::time::Duration;

use redis::Commands;

use crate::support::daemon::{binary, http_get, series_sum, wait_until, write_config, DaemonProcess, Setup};
use crate::support::events::product_insert;
use crate::support::kafka::{committed, MockKafka};
use crate::support::redis::RedisServer;

const TOPIC: &str = "shop.public.products";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_commits_and_exits_zero() {
    let redis = RedisServer::start();
    let mut c = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    for id in 1..=20 {
        let _: () = c.set(format!("product:{id}"), "cached").unwrap();
    }
    let kafka = MockKafka::start(1);
    kafka.create_topic(TOPIC, 2);
    for id in 1..=20 {
        kafka.produce(TOPIC, None, Some(&format!("{{\"id\":{id}}}")), Some(&product_insert(id, 1))).await;
    }
    let bootstrap = kafka.bootstrap();
    let dir = tempfile::tempdir().unwrap();
    let url = redis.url();
    let (config, port) = write_config(
        dir.path(),
        &Setup { bootstrap: &bootstrap, topics: &[TOPIC], group: "sig", redis_url: &url, extra: "", librdkafka: &[] },
    );
    let mut daemon = DaemonProcess::start(&config, dir.path());

    let gone = wait_until(Duration::from_secs(30), || {
        (1..=20).all(|id| !c.exists::<_, bool>(format!("product:{id}")).unwrap_or(true))
    })
    .await;
    assert!(gone, "daemon log:\n{}", daemon.log_text());
    assert!(wait_until(Duration::from_secs(10), || http_get(port, "/readyz").is_some_and(|(s, _)| s == 200)).await);

    daemon.signal("TERM");
    let code = tokio::task::spawn_blocking(move || {
        let code = daemon.wait(Duration::from_secs(30));
        (code, daemon.log_text())
    })
    .await
    .unwrap();
    assert_eq!(code.0, Some(0), "exit 0 after a clean drain; log:\n{}", code.1);
    assert!(code.1.contains("final offsets committed"), "{}", code.1);
    assert!(!code.1.contains('\u{1b}'), "no ANSI colour codes in human logs written to a file:\n{}", code.1);
    let offsets = committed(&bootstrap, "sig", TOPIC, 2).await;
    assert_eq!(offsets.iter().sum::<i64>(), 20, "{offsets:?}");
}

#[test]
fn invalid_config_exits_2_naming_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, "rules: r.yaml\nsource:\n  kind: kafka\n  kafak: {}\nsinks: {}\n").unwrap();
    for cmd in ["run", "check"] {
        let out = std::process::Command::new(binary()).args([cmd, "-c"]).arg(&path).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{cmd}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("{}:4:3", path.display())), "{cmd}: {err}");
        assert!(!err.contains("panicked") && !err.contains("backtrace"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    let redis = RedisServer::start();
    let kafka = MockKafka::start(1);
    kafka.create_topic(TOPIC, 1);
    let bootstrap = kafka.bootstrap();
    let dir = tempfile::tempdir().unwrap();
    let url = redis.url();
    let (config, port) = write_config(
        dir.path(),
        &Setup { bootstrap: &bootstrap, topics: &[TOPIC], group: "json", redis_url: &url, extra: "", librdkafka: &[] },
    );
    let text = std::fs::read_to_string(&config).unwrap().replace("log:\n", "log:\n  format: json\n");
    std::fs::write(&config, text).unwrap();
    let mut daemon = DaemonProcess::start(&config, dir.path());
    assert!(wait_until(Duration::from_secs(30), || http_get(port, "/readyz").is_some_and(|(s, _)| s == 200)).await);
    daemon.signal("INT");
    let (code, log) =
        tokio::task::spawn_blocking(move || (daemon.wait(Duration::from_secs(30)), daemon.log_text())).await.unwrap();
    assert_eq!(code, Some(0), "SIGINT drains like SIGTERM: {log}");
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines.len() >= 3, "{log}");
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["message"].is_string(), "{line}");
    }
}

/// A drain that runs out of grace (Redis is down, so the batch cannot finish) exits 3, not 0:
/// a supervisor can tell abandoned work from a clean drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_that_runs_out_of_grace_exits_3() {
    let kafka = MockKafka::start(1);
    kafka.create_topic(TOPIC, 1);
    kafka.produce(TOPIC, None, Some("{\"id\":1}"), Some(&product_insert(1, 1))).await;
    let bootstrap = kafka.bootstrap();
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens there: every UNLINK is retried until shutdown abandons it.
    let url = format!("redis://127.0.0.1:{}", crate::support::free_port());
    let (config, port) = write_config(
        dir.path(),
        &Setup { bootstrap: &bootstrap, topics: &[TOPIC], group: "grace", redis_url: &url, extra: "", librdkafka: &[] },
    );
    let text = std::fs::read_to_string(&config).unwrap().replace("grace: 5s", "grace: 1s");
    std::fs::write(&config, text).unwrap();
    let mut daemon = DaemonProcess::start(&config, dir.path());
    let retrying = wait_until(Duration::from_secs(30), || {
        http_get(port, "/metrics")
            .is_some_and(|(_, body)| series_sum(&body, "cdc_invalidator_sink_retries_total") > 0.0)
    })
    .await;
    assert!(retrying, "daemon log:\n{}", daemon.log_text());
    daemon.signal("TERM");
    let (code, log) =
        tokio::task::spawn_blocking(move || (daemon.wait(Duration::from_secs(30)), daemon.log_text())).await.unwrap();
    assert_eq!(code, Some(3), "abandoned work is not a clean drain; log:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
}
