//! Issue 10: what an operator meets at the edge of the daemon. A sentinel secret in every
//! setting never shows in any output; `check` rejects what `run` would.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use crate::support::daemon::{binary, http_get, read_dead_letters, wait_until, write_config, DaemonProcess, Setup};
use crate::support::events::product_insert;
use crate::support::kafka::MockKafka;
use crate::support::redis::RedisServer;

const TOPIC: &str = "shop.public.products";
const SENTINEL: &str = "s3ntinel-9d4c-hunter2";

/// An HTTP server that answers every request 400 with the request (headers and all) as its
/// body, as some CDNs' error pages do.
fn echo_400() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
            let mut buf = vec![0u8; 16384];
            let n = s.read(&mut buf).unwrap_or(0);
            let body = String::from_utf8_lossy(&buf[..n]).replace("\r\n", " | ");
            let _ = write!(
                s,
                "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

fn cli(args: &[&str], config: &std::path::Path, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(binary());
    cmd.args(args).arg(config);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (out.status.code(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// The typo of the issue (`sasl.pasword_env`) and an unparseable Redis URL holding the secret:
/// `check` and `run` both exit 2 naming file, line and column, and never print the secret.
#[test]
fn config_errors_never_print_a_secret_and_check_rejects_what_run_would() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.yaml"), crate::support::events::RULES).unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(
        &path,
        format!(
            "rules: rules.yaml\nsource:\n  kind: kafka\n  kafka:\n    brokers: \"127.0.0.1:9\"\n    topics: [t]\n    librdkafka:\n      sasl.pasword_env: CDC_TEST_SENTINEL_PW\nsinks:\n  redis:\n    url: \"redis://:{SENTINEL}@127.0.0.1:notaport\"\n"
        ),
    )
    .unwrap();
    for cmd in ["check", "run"] {
        let (code, out) = cli(&[cmd, "-c"], &path, &[("CDC_TEST_SENTINEL_PW", SENTINEL)]);
        assert_eq!(code, Some(2), "{cmd}: {out}");
        assert!(!out.contains(SENTINEL), "{cmd} printed the secret: {out}");
        assert!(out.contains(&format!("{}:8:7: ", path.display())), "{cmd}: {out}");
        assert!(out.contains("sasl.pasword_env: No such configuration property"), "{cmd}: {out}");
        assert!(out.contains(&format!("{}:11:10: sinks.redis.url", path.display())), "{cmd}: {out}");
    }
}

/// The daemon at trace level with the sentinel as the Redis password, a librdkafka password
/// and a CDN token, and a CDN that echoes the request (token header included) in its 400: the
/// secret is in none of the logs, the dead letters, `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_daemon_never_outputs_a_secret() {
    let redis = RedisServer::start_with_password(SENTINEL);
    let echo = echo_400();
    let kafka = MockKafka::start(1);
    kafka.create_topic(TOPIC, 1);
    kafka.produce(TOPIC, Some(0), Some("{\"id\":1}"), Some(&product_insert(1, 5))).await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{SENTINEL}\n")).unwrap();
    let bootstrap = kafka.bootstrap();
    let url = redis.url();
    let (config, port) = write_config(
        dir.path(),
        &Setup {
            bootstrap: &bootstrap,
            topics: &[TOPIC],
            group: "sentinel",
            redis_url: &url,
            extra: "",
            librdkafka: &[("sasl.username", "svc"), ("sasl.password_env", "CDC_TEST_SENTINEL_PW")],
        },
    );
    std::fs::write(
        dir.path().join("rules.yaml"),
        "version: 1\nrules:\n  - name: p\n    table: public.products\n    redis:\n      keys: [\"product:{id}\"]\n    cdn:\n      surrogate_keys: [\"product-{id}\"]\n",
    )
    .unwrap();
    let text = std::fs::read_to_string(&config).unwrap().replacen(
        "sinks:\n",
        &format!(
            "sinks:\n  cdn:\n    - {{ kind: fastly, name: fastly, service_id: svc1, token_file: \"{}\", api: \"http://127.0.0.1:{echo}\", retry: {{ initial: 20ms, max: 200ms }} }}\n",
            token.display()
        ),
        1,
    );
    let text = text.replace("level: \"info,librdkafka=warn\"", "level: \"trace\"");
    std::fs::write(&config, text).unwrap();
    let mut daemon = {
        let mut cmd = Command::new(binary());
        let log = dir.path().join("daemon.log");
        let out = std::fs::File::create(&log).unwrap();
        cmd.args(["run", "-c"]).arg(&config).env("CDC_TEST_SENTINEL_PW", SENTINEL);
        let child = cmd.stdout(out.try_clone().unwrap()).stderr(out).spawn().unwrap();
        DaemonProcess { child, log }
    };
    let letters_path = dir.path().join("dead-letters.jsonl");
    let lettered = wait_until(Duration::from_secs(30), || !read_dead_letters(&letters_path).is_empty()).await;
    assert!(lettered, "the CDN's 400 dead-letters the event; log:\n{}", daemon.log_text());
    let metrics = http_get(port, "/metrics").map(|(_, b)| b).unwrap_or_default();
    daemon.signal("TERM");
    let (_, log) =
        tokio::task::spawn_blocking(move || (daemon.wait(Duration::from_secs(30)), daemon.log_text())).await.unwrap();
    let letters = std::fs::read_to_string(&letters_path).unwrap();
    assert!(letters.contains("fastly-key") || letters.contains("Fastly-Key"), "the echo is kept: {letters}");
    for (what, text) in [("the log", &log), ("the dead letters", &letters), ("/metrics", &metrics)] {
        assert!(!text.contains(SENTINEL), "{what} shows the secret:\n{text}");
    }
    assert!(log.lines().count() > 50, "trace logging was on: {log}");
}
