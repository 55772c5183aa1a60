//! The alert rules: valid (`promtool check rules`), each alert unit-tested (`promtool test
//! rules`), and a real Prometheus server that loads them scrapes a running daemon.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::operator_metrics::repo_file;
use crate::support::daemon::{wait_until, Daemon, Setup};
use crate::support::events::product_insert;
use crate::support::free_port;
use crate::support::kafka::MockKafka;
use crate::support::redis::RedisServer;

const TOPIC: &str = "shop.public.products";

fn prometheus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus")
}

fn promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(prometheus_dir())
        .output()
        .expect("promtool is installed by scripts/install-deps.sh");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Alert names defined in alerts.yml.
fn alert_names(text: &str) -> Vec<String> {
    text.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")).map(|s| s.trim().to_string()).collect()
}

#[test]
fn alert_rules_pass_promtool_check() {
    let (ok, out) = promtool(&["check", "rules", "alerts.yml"]);
    assert!(ok, "{out}");
    let alerts = alert_names(&repo_file("deploy/prometheus/alerts.yml"));
    assert!(out.contains(&format!("SUCCESS: {} rules found", alerts.len())), "{out}");
}

#[test]
fn every_alert_has_a_passing_unit_test() {
    let (ok, out) = promtool(&["test", "rules", "alerts.test.yml"]);
    assert!(ok, "{out}");
    let alerts = alert_names(&repo_file("deploy/prometheus/alerts.yml"));
    let tests = repo_file("deploy/prometheus/alerts.test.yml");
    for wanted in [
        "StalenessHigh",
        "KafkaLagGrowing",
        "PostgresLagGrowing",
        "NoEvents",
        "DeadLetters",
        "SinkDown",
        "SinkFailing",
        "PostgresStandbyWithoutActive",
        "RulesReloadFailed",
    ] {
        assert!(alerts.iter().any(|a| a.ends_with(wanted)), "an alert for {wanted}: {alerts:?}");
    }
    for alert in &alerts {
        // Each alert is expected to fire (exp_labels) in at least one test case.
        let fires = tests.split("alertname: ").skip(1).any(|case| {
            case.starts_with(&format!("{alert}\n")) && case.lines().take(4).any(|l| l.contains("exp_labels"))
        });
        assert!(fires, "{alert} has a unit test in which it fires");
    }
    // And each is documented for the operator.
    let guide = repo_file("docs/operations.md");
    for alert in &alerts {
        assert!(guide.contains(&format!("`{alert}`")), "docs/operations.md explains {alert}");
    }
}

#[test]
fn compose_prometheus_config_passes_promtool_check() {
    let dir = tempfile::tempdir().unwrap();
    // The compose file mounts alerts.yml at /etc/prometheus; point at the repository's copy.
    let text = repo_file("deploy/prometheus/prometheus.yml")
        .replace("/etc/prometheus/alerts.yml", &prometheus_dir().join("alerts.yml").display().to_string());
    let path = dir.path().join("prometheus.yml");
    std::fs::write(&path, text).unwrap();
    let (ok, out) = promtool(&["check", "config", path.to_str().unwrap()]);
    assert!(ok, "{out}");
}

/// A GET as HTTP/1.0, so Prometheus answers without chunked encoding; the body.
fn http10_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_daemon_and_loads_the_alerts() {
    let redis = RedisServer::start();
    let kafka = MockKafka::start(1);
    kafka.create_topic(TOPIC, 1);
    let bootstrap = kafka.bootstrap();
    let dir = tempfile::tempdir().unwrap();
    let url = redis.url();
    let daemon = Daemon::start(
        dir.path(),
        &Setup { bootstrap: &bootstrap, topics: &[TOPIC], group: "prom", redis_url: &url, extra: "", librdkafka: &[] },
    );
    kafka.produce(TOPIC, None, Some("{\"id\":1}"), Some(&product_insert(1, 5))).await;
    assert!(
        wait_until(Duration::from_secs(20), || {
            daemon.metrics.value("cdc_invalidator_events_total", &[("outcome", "invalidated")]) >= 1.0
        })
        .await
    );

    let port = free_port();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\nrule_files: [\"{}\"]\nscrape_configs:\n  - job_name: cdc-invalidator\n    static_configs: [{{ targets: [\"127.0.0.1:{}\"] }}]\n",
            prometheus_dir().join("alerts.yml").display(),
            daemon.metrics_port
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let _prometheus = Prometheus(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus is installed by scripts/install-deps.sh"),
    );
    let prom_log = || std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();
    let get_json = |path: &str| -> serde_json::Value {
        http10_get(port, path).and_then(|body| serde_json::from_str(&body).ok()).unwrap_or_default()
    };

    // The target is up (the first scrape takes a few seconds after start).
    let up = wait_until(Duration::from_secs(30), || {
        let targets = get_json("/api/v1/targets");
        targets["data"]["activeTargets"]
            .as_array()
            .is_some_and(|a| a.iter().any(|t| t["health"] == "up" && t["labels"]["job"] == "cdc-invalidator"))
    })
    .await;
    assert!(up, "target up; prometheus log:\n{}", prom_log());

    // A daemon metric, through the query API.
    let query = "/api/v1/query?query=sum(cdc_invalidator_events_total%7Boutcome%3D%22invalidated%22%7D)";
    let scraped = wait_until(Duration::from_secs(15), || {
        get_json(query)["data"]["result"][0]["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
            >= 1.0
    })
    .await;
    assert!(scraped, "{}", get_json(query));

    // Prometheus loaded every alert rule.
    let rules = get_json("/api/v1/rules");
    let loaded: Vec<&str> = rules["data"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .filter_map(|r| r["name"].as_str())
        .collect();
    let expected = alert_names(&repo_file("deploy/prometheus/alerts.yml"));
    assert_eq!(loaded.len(), expected.len(), "{loaded:?}");
    daemon.stop().await.expect("clean stop");
}
