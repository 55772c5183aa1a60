//! TLS and credentials in cluster and sentinel mode, against real servers: every node speaks
//! only TLS, with a certificate from a throwaway CA, and requires a password. The daemon runs
//! as the real binary, as an operator would run it: the CA trusted through `SSL_CERT_FILE`
//! (OpenSSL's process-wide way, the one that reaches cluster nodes, sentinels and discovered
//! masters alike; see src/sink/redis/endpoints.rs), the password through `password_env` or
//! `password_file`, never in the config file.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use redis::Commands;

use crate::support::daemon::{binary, http_get, wait_until, write_config, DaemonProcess, Setup};
use crate::support::events::product_insert;
use crate::support::kafka::MockKafka;
use crate::support::redis::{RedisCluster, RedisSentinel, Secure, TestCa, SENTINEL_MASTER};

const PASSWORD_VAR: &str = "CDC_TEST_REDIS_PASSWORD";

/// A config consuming `topic` from `bootstrap`, whose `sinks.redis` is `redis` (YAML lines
/// indented for under `sinks:`).
fn config(dir: &Path, bootstrap: &str, topic: &str, redis: &str) -> (std::path::PathBuf, u16) {
    let setup = Setup {
        bootstrap,
        topics: &[topic],
        group: "secure",
        redis_url: "redis://placeholder",
        extra: "",
        librdkafka: &[],
    };
    let (path, port) = write_config(dir, &setup);
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text.replace("  redis:\n    url: \"redis://placeholder\"\n", redis);
    assert!(!text.contains("placeholder"), "{text}");
    std::fs::write(&path, text).unwrap();
    (path, port)
}

/// The binary with `args`, the test CA trusted and `env` set; its exit code and stderr,
/// within `timeout` (`None`: still running, killed).
fn run_binary(
    args: &[&str],
    config: &Path,
    ca: &TestCa,
    env: &[(&str, &str)],
    timeout: Duration,
) -> (Option<i32>, String) {
    let mut cmd = Command::new(binary());
    cmd.args(args).arg("-c").arg(config).env("SSL_CERT_FILE", ca.ca_file());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn");
    let deadline = std::time::Instant::now() + timeout;
    let code = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status.code();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
    }
    (code, stderr)
}

/// `run` as a child process with the test CA trusted and `env` set.
fn start_daemon(config: &Path, dir: &Path, ca: &TestCa, env: &[(&str, &str)]) -> DaemonProcess {
    let log = dir.join("daemon.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut cmd = Command::new(binary());
    cmd.args(["run", "-c"]).arg(config).env("SSL_CERT_FILE", ca.ca_file());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.stdin(Stdio::null()).stdout(out.try_clone().unwrap()).stderr(out).spawn().expect("spawn");
    DaemonProcess { child, log }
}

/// Cluster mode over TLS with an ACL user (the default user switched off), the password from
/// `password_env`: a wrong password is refused by `check` and `run` at once (exit 2, naming
/// the setting) instead of a daemon that is never ready; with the right one, keys on every
/// primary and a tag's members across slots are deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_over_tls_with_an_acl_user() {
    let secure = Secure { ca: TestCa::create(), user: Some("cdc".into()), password: "cluster-s3cret".into() };
    let cluster = RedisCluster::start_secure(3, &secure);
    let mut con = cluster.client();
    let ids: Vec<i64> = (0..60).collect();
    let keys: Vec<String> = ids.iter().map(|id| format!("product:{id}")).collect();
    let members: Vec<String> = (0..300).map(|i| format!("listing:{i}")).collect();
    for k in keys.iter().chain(&members) {
        let _: () = con.set(k, "cached").unwrap();
    }
    let _: () = con.sadd("tag:category:1", &members).unwrap();
    let masters: std::collections::HashSet<u16> = keys.iter().map(|k| cluster.master_of(k)).collect();
    assert_eq!(masters.len(), 3, "the keys are spread over every primary");

    let kafka = MockKafka::start(1);
    let topic = "shop.public.products";
    kafka.create_topic(topic, 1);
    let dir = tempfile::tempdir().unwrap();
    let seeds = cluster.urls();
    assert!(seeds[0].starts_with("rediss://") && !seeds[0].contains("insecure"));
    let redis = format!(
        "  redis:\n    mode: cluster\n    nodes: [\"{}\", \"{}\"]\n    username: cdc\n    password_env: {PASSWORD_VAR}\n",
        seeds[0], seeds[3]
    );
    let (path, metrics_port) = config(dir.path(), &kafka.bootstrap(), topic, &redis);

    let text = std::fs::read_to_string(&path).unwrap();
    let line = text.lines().position(|l| l.contains("password_env")).expect("the setting") + 1;
    for command in ["check", "run"] {
        let (code, stderr) =
            run_binary(&[command], &path, &secure.ca, &[(PASSWORD_VAR, "not-the-password")], Duration::from_secs(30));
        assert_eq!(code, Some(2), "{command} with a wrong password: {stderr}");
        assert!(stderr.contains("refused our credentials"), "{stderr}");
        assert!(stderr.contains(&format!("config.yaml:{line}:")), "names the password setting's line: {stderr}");
        assert!(!stderr.contains("not-the-password"), "the password leaked: {stderr}");
    }
    let right = [(PASSWORD_VAR, secure.password.as_str())];
    let (code, stderr) = run_binary(&["check"], &path, &secure.ca, &right, Duration::from_secs(30));
    assert_eq!(code, Some(0), "{stderr}");

    let mut daemon = start_daemon(&path, dir.path(), &secure.ca, &right);
    for id in &ids {
        kafka.produce(topic, None, Some(&format!("{{\"id\":{id}}}")), Some(&product_insert(*id, 1))).await;
    }
    let gone = wait_until(Duration::from_secs(60), || {
        keys.iter().chain(&members).all(|k| !con.exists::<_, bool>(k).unwrap_or(true))
    })
    .await;
    assert!(gone, "keys on every primary and the tag's members are deleted; log:\n{}", daemon.log_text());
    assert!(!con.exists::<_, bool>("tag:category:1").unwrap());
    let ready = http_get(metrics_port, "/readyz").map(|(status, _)| status);
    assert_eq!(ready, Some(200), "ready over TLS with the ACL user");
    daemon.signal("TERM");
    assert_eq!(daemon.wait(Duration::from_secs(30)), Some(0), "{}", daemon.log_text());
}

/// Sentinel mode over TLS (sentinels and data nodes), `requirepass` on the data nodes, the
/// password from `password_file`, no `url`: the discovered master is reached over TLS with the
/// password; after the primary is killed the sentinels' new pick is followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_over_tls_with_a_password_follows_the_failover() {
    let secure = Secure { ca: TestCa::create(), user: None, password: "sentinel-s3cret".into() };
    let mut setup = RedisSentinel::start_secure(&secure);
    let keys: Vec<String> = (0..40).map(|id| format!("product:{id}")).collect();
    {
        let mut con = setup.connection(setup.primary_port());
        for k in &keys {
            let _: () = con.set(k, "cached").unwrap();
        }
        let _: i64 = redis::cmd("WAIT").arg(1).arg(5000).query(&mut con).unwrap();
    }
    let kafka = MockKafka::start(1);
    let topic = "shop.public.products";
    kafka.create_topic(topic, 1);
    let dir = tempfile::tempdir().unwrap();
    let sentinels = setup.sentinel_urls();
    assert!(sentinels[0].starts_with("rediss://"));
    std::fs::write(dir.path().join("redis-password"), "wr0ng-pw\n").unwrap();
    let redis = format!(
        "  redis:\n    mode: sentinel\n    sentinel: {{ nodes: [\"{}\", \"{}\"], master: {SENTINEL_MASTER} }}\n    password_file: redis-password\n    connect_timeout: 500ms\n    response_timeout: 1s\n",
        sentinels[0], sentinels[1]
    );
    let (path, _) = config(dir.path(), &kafka.bootstrap(), topic, &redis);
    let (code, stderr) = run_binary(&["check"], &path, &secure.ca, &[], Duration::from_secs(30));
    assert_eq!(code, Some(2), "a wrong password is refused: {stderr}");
    assert!(stderr.contains("refused our credentials"), "{stderr}");
    assert!(!stderr.contains("wr0ng-pw"), "the password leaked: {stderr}");
    std::fs::write(dir.path().join("redis-password"), format!("{}\n", secure.password)).unwrap();

    let mut daemon = start_daemon(&path, dir.path(), &secure.ca, &[]);
    for id in 0..20 {
        kafka.produce(topic, None, Some(&format!("{{\"id\":{id}}}")), Some(&product_insert(id, 1))).await;
    }
    let old = setup.primary_port();
    let gone = wait_until(Duration::from_secs(30), || {
        let mut con = setup.connection(old);
        keys[..20].iter().all(|k| !con.exists::<_, bool>(k).unwrap_or(true))
    })
    .await;
    assert!(gone, "deleted on the primary the sentinels named; log:\n{}", daemon.log_text());

    setup.kill_primary();
    for id in 20..40 {
        kafka.produce(topic, None, Some(&format!("{{\"id\":{id}}}")), Some(&product_insert(id, 1))).await;
    }
    let promoted = wait_until(Duration::from_secs(60), || setup.current_primary() == setup.replica_port()).await;
    assert!(promoted, "the sentinels promote the replica");
    let gone = wait_until(Duration::from_secs(60), || {
        let mut con = setup.connection(setup.replica_port());
        keys.iter().all(|k| !con.exists::<_, bool>(k).unwrap_or(true))
    })
    .await;
    assert!(gone, "the events after the failover are deleted on the promoted replica; log:\n{}", daemon.log_text());
    daemon.signal("TERM");
    assert_eq!(daemon.wait(Duration::from_secs(30)), Some(0), "{}", daemon.log_text());
}
