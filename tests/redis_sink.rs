//! The Redis sink against a real redis-server.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cdc_invalidator::config::RedisConfig;
use cdc_invalidator::retry::RetryPolicy;
use cdc_invalidator::shutdown::{self, Shutdown};
use cdc_invalidator::sink::redis::RedisSink;
use cdc_invalidator::sink::{Invalidations, ItemKind, Sink, SinkError, SinkReport};
use cdc_invalidator::telemetry::Metrics;

use crate::support::redis::RedisServer;

const SINK: &str = "redis";

/// Fast retries and short timeouts, so outages in tests cost milliseconds.
fn config(url: &str) -> RedisConfig {
    let mut c = RedisConfig::for_url(url);
    c.retry = RetryPolicy { initial: Duration::from_millis(10), max: Duration::from_millis(100), max_attempts: None };
    c.connect_timeout = Duration::from_millis(500);
    c.response_timeout = Duration::from_millis(1000);
    c
}

fn sink(config: &RedisConfig) -> (Arc<RedisSink>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let sink = RedisSink::new(SINK, config, metrics.clone()).expect("valid Redis URL");
    (Arc::new(sink), metrics)
}

fn batch(keys: &[&str], tags: &[&str]) -> Invalidations {
    Invalidations::of(ItemKind::RedisKey, keys.iter().map(|k| k.to_string()).collect())
        .with(ItemKind::RedisTag, tags.iter().map(|t| t.to_string()).collect())
}

fn metric(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
    m.value(name, labels)
}

fn unlinked_members(m: &Metrics) -> f64 {
    metric(m, "cdc_invalidator_tag_members_unlinked_total", &[("sink", SINK)])
}

/// Runs `invalidate` in a task, as the pipeline does, so the test can act while it retries.
fn spawn_invalidate(
    sink: &Arc<RedisSink>,
    batch: Invalidations,
    shutdown: Shutdown,
) -> tokio::task::JoinHandle<Result<SinkReport, SinkError>> {
    let sink = sink.clone();
    tokio::spawn(async move { sink.invalidate(&batch, &shutdown).await })
}

/// `SET key v` for every key, 10,000 per MSET.
fn set_keys(con: &mut redis::Connection, keys: &[String]) {
    for chunk in keys.chunks(10_000) {
        let mut cmd = redis::cmd("MSET");
        for k in chunk {
            cmd.arg(k).arg("cached value");
        }
        cmd.exec(con).expect("MSET");
    }
}

/// Adds `members` to the set `set`, 10,000 per SADD.
fn tag(con: &mut redis::Connection, set: &str, members: &[String]) {
    for chunk in members.chunks(10_000) {
        redis::cmd("SADD").arg(set).arg(chunk).exec(con).expect("SADD");
    }
}

/// How many of `keys` exist.
fn existing(con: &mut redis::Connection, keys: &[String]) -> usize {
    let mut n = 0;
    for chunk in keys.chunks(10_000) {
        let count: usize = redis::cmd("EXISTS").arg(chunk).query(con).expect("EXISTS");
        n += count;
    }
    n
}

fn exists(con: &mut redis::Connection, key: &str) -> bool {
    redis::cmd("EXISTS").arg(key).query::<usize>(con).expect("EXISTS") == 1
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlinks_the_given_keys_in_batches_and_nothing_else() {
    let server = RedisServer::start();
    let mut con = server.connection();
    let products = names("product:", 1000);
    let others = names("other:", 10);
    set_keys(&mut con, &products);
    set_keys(&mut con, &others);
    let mut cfg = config(&server.url());
    cfg.unlink_batch = 100;
    let (sink, metrics) = sink(&cfg);
    redis::cmd("CONFIG").arg("RESETSTAT").exec(&mut con).expect("RESETSTAT");

    let mut b = Invalidations::of(ItemKind::RedisKey, products.clone());
    b.items_mut(ItemKind::RedisKey).push("product:never-cached".into());
    let report = sink.invalidate(&b, &Shutdown::never()).await.expect("invalidated");

    assert_eq!(report.confirmed, vec![(ItemKind::RedisKey, 1001)]);
    assert!(report.rejected.is_empty());
    assert_eq!(existing(&mut con, &products), 0);
    assert_eq!(existing(&mut con, &others), 10, "keys not asked for must stay");
    // 1001 keys at 100 per command.
    assert_eq!(server.command_calls("unlink"), 11);
    assert_eq!(metric(&metrics, "cdc_invalidator_sink_up", &[("sink", SINK)]), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_fan_out_unlinks_every_member_and_the_set() {
    let server = RedisServer::start();
    let mut con = server.connection();
    let keys = names("p:", 7);
    set_keys(&mut con, &keys);
    set_keys(&mut con, &["page:home".to_string()]);
    tag(&mut con, "t:category:5", &keys[0..3]);
    tag(&mut con, "t:category:7", &keys[3..5]);
    tag(&mut con, "t:category:9", &keys[5..7]);
    let mut cfg = config(&server.url());
    cfg.tag_prefix = "t:".into();
    let (sink, metrics) = sink(&cfg);

    let report = sink
        .invalidate(&batch(&[], &["category:5", "category:7", "category:never-tagged"]), &Shutdown::never())
        .await
        .expect("invalidated");

    assert_eq!(report.confirmed, vec![(ItemKind::RedisTag, 3)]);
    assert!(report.rejected.is_empty());
    assert_eq!(existing(&mut con, &keys[0..5]), 0, "every member of both tags is unlinked");
    assert!(!exists(&mut con, "t:category:5") && !exists(&mut con, "t:category:7"), "the sets are gone");
    assert_eq!(existing(&mut con, &keys[5..7]), 2, "another tag's members stay");
    assert!(exists(&mut con, "t:category:9") && exists(&mut con, "page:home"));
    assert_eq!(unlinked_members(&metrics), 5.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200k_member_tag_is_invalidated_in_bounded_chunks() {
    let server = RedisServer::start();
    let mut con = server.connection();
    let members = names("item:", 200_000);
    set_keys(&mut con, &members);
    tag(&mut con, "tag:big", &members);
    let mut cfg = config(&server.url());
    cfg.tag_chunk = 1000;
    let (sink, metrics) = sink(&cfg);
    redis::cmd("CONFIG").arg("RESETSTAT").exec(&mut con).expect("RESETSTAT");

    let report = sink.invalidate(&batch(&[], &["big"]), &Shutdown::never()).await.expect("invalidated");

    assert_eq!(report.confirmed, vec![(ItemKind::RedisTag, 1)]);
    let dbsize: u64 = redis::cmd("DBSIZE").query(&mut con).expect("DBSIZE");
    assert_eq!(dbsize, 0, "every member and the set are gone");
    assert_eq!(unlinked_members(&metrics), 200_000.0);
    // SRANDMEMBER takes at most its count, and each call asked for at most 1000: 200,000
    // members need at least 200 calls, and the loop stopped as soon as the set was empty.
    assert_eq!(server.command_calls("srandmember"), 200);
    assert_eq!(server.command_calls("spop"), 0, "members leave the set only after their UNLINK");
    // The 200 chunks, and the very first call, which found the script not loaded yet.
    assert_eq!(server.command_calls("evalsha"), 201);
    assert_eq!(server.command_calls("sscan"), 0, "no sweep without concurrent writers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_tagging_never_orphans_a_key_nor_spares_an_old_one() {
    let server = RedisServer::start();
    let mut con = server.connection();
    let old = names("old:", 20_000);
    set_keys(&mut con, &old);
    tag(&mut con, "tag:hot", &old);
    let mut cfg = config(&server.url());
    cfg.tag_chunk = 50;
    let (sink, _metrics) = sink(&cfg);
    redis::cmd("CONFIG").arg("RESETSTAT").exec(&mut con).expect("RESETSTAT");

    // The application: caches a value, then tags it, over and over.
    let written = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (written, stop, mut con) = (written.clone(), stop.clone(), server.connection());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let key = format!("new:{i}");
                redis::pipe()
                    .cmd("SET")
                    .arg(&key)
                    .arg("v")
                    .cmd("SADD")
                    .arg("tag:hot")
                    .arg(&key)
                    .exec(&mut con)
                    .expect("writer");
                written.store(i, Ordering::SeqCst);
            }
        })
    };
    while written.load(Ordering::SeqCst) < 10 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let before = written.load(Ordering::SeqCst);
    let report = sink.invalidate(&batch(&[], &["hot"]), &Shutdown::never()).await.expect("invalidated");
    let during = written.load(Ordering::SeqCst) - before;
    stop.store(true, Ordering::SeqCst);
    writer.join().expect("writer thread");
    let total = written.load(Ordering::SeqCst);

    assert_eq!(report.confirmed, vec![(ItemKind::RedisTag, 1)]);
    assert!(during > 0, "the writer must have tagged during the fan-out");
    assert_eq!(existing(&mut con, &old), 0, "every key tagged before the invalidation is unlinked");
    let mut orphans = Vec::new();
    for i in 1..=total {
        let key = format!("new:{i}");
        let (exists, tracked): (bool, bool) = redis::pipe()
            .cmd("EXISTS")
            .arg(&key)
            .cmd("SISMEMBER")
            .arg("tag:hot")
            .arg(&key)
            .query(&mut con)
            .expect("check");
        if exists && !tracked {
            orphans.push(key);
        }
    }
    assert!(orphans.is_empty(), "cached but no longer tagged: {orphans:?}");
    eprintln!(
        "{during} members tagged during the fan-out; {} SRANDMEMBER and {} SSCAN calls",
        server.command_calls("srandmember"),
        server.command_calls("sscan")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_key_that_is_not_a_set_is_rejected_and_the_rest_is_done() {
    let server = RedisServer::start();
    let mut con = server.connection();
    let keys = names("k:", 2);
    let members = names("m:", 2);
    set_keys(&mut con, &keys);
    set_keys(&mut con, &members);
    set_keys(&mut con, &["tag:broken".to_string()]);
    tag(&mut con, "tag:ok", &members);
    let (sink, _metrics) = sink(&config(&server.url()));

    let started = Instant::now();
    let report =
        sink.invalidate(&batch(&["k:0", "k:1"], &["broken", "ok"]), &Shutdown::never()).await.expect("invalidated");

    assert!(started.elapsed() < Duration::from_secs(2), "a wrong type is not retried");
    assert_eq!(report.confirmed, vec![(ItemKind::RedisKey, 2), (ItemKind::RedisTag, 1)]);
    assert_eq!(report.rejected.len(), 1);
    let rejected = &report.rejected[0];
    assert_eq!((rejected.kind, rejected.index), (ItemKind::RedisTag, 0));
    assert!(rejected.reason.contains("holds a string, not a set"), "{}", rejected.reason);
    assert_eq!(existing(&mut con, &keys), 0);
    assert_eq!(existing(&mut con, &members), 0);
    let value: String = redis::cmd("GET").arg("tag:broken").query(&mut con).expect("GET");
    assert_eq!(value, "cached value", "a key we do not understand is left alone");
}

/// The outage tests rely on this: a `SAVE`d snapshot comes back after a restart.
#[test]
fn harness_restart_reloads_a_saved_snapshot() {
    let mut server = RedisServer::start();
    let port = server.port();
    set_keys(&mut server.connection(), &["survivor".to_string()]);
    redis::cmd("SAVE").exec(&mut server.connection()).expect("SAVE");
    server.stop();
    assert!(!server.is_running());
    server.restart();
    assert_eq!(server.port(), port);
    assert!(exists(&mut server.connection(), "survivor"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_retried_until_redis_is_back() {
    let mut server = RedisServer::start();
    let mut con = server.connection();
    let keys = names("k:", 100);
    let members = names("m:", 100);
    set_keys(&mut con, &keys);
    set_keys(&mut con, &members);
    tag(&mut con, "tag:t", &members);
    // The snapshot brings everything back at restart: the deletes must happen afterwards.
    redis::cmd("SAVE").exec(&mut con).expect("SAVE");
    drop(con);
    let (sink, metrics) = sink(&config(&server.url()));
    server.stop();

    let b = Invalidations::of(ItemKind::RedisKey, keys.clone()).with(ItemKind::RedisTag, vec!["t".into()]);
    let task = spawn_invalidate(&sink, b, Shutdown::never());
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!task.is_finished(), "invalidate must wait for Redis, not give up");
    assert_eq!(metric(&metrics, "cdc_invalidator_sink_up", &[("sink", SINK)]), 0.0);
    assert!(metric(&metrics, "cdc_invalidator_sink_retries_total", &[("sink", SINK)]) >= 2.0);
    assert!(metric(&metrics, "cdc_invalidator_sink_errors_total", &[("sink", SINK), ("class", "retriable")]) >= 2.0);

    server.restart();
    let report =
        tokio::time::timeout(Duration::from_secs(10), task).await.expect("finishes once Redis is back").expect("task");
    let report = report.expect("invalidated");
    assert_eq!(report.confirmed, vec![(ItemKind::RedisKey, 100), (ItemKind::RedisTag, 1)]);
    let mut con = server.connection();
    let dbsize: u64 = redis::cmd("DBSIZE").query(&mut con).expect("DBSIZE");
    assert_eq!(dbsize, 0, "every key, member and the set are gone");
    assert_eq!(metric(&metrics, "cdc_invalidator_sink_up", &[("sink", SINK)]), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_fan_out_and_restarted_finishes_the_tag() {
    const MEMBERS: usize = 50_000;
    let mut server = RedisServer::start();
    let mut con = server.connection();
    let members = names("m:", MEMBERS);
    set_keys(&mut con, &members);
    tag(&mut con, "tag:t", &members);
    redis::cmd("SAVE").exec(&mut con).expect("SAVE");
    drop(con);
    let mut cfg = config(&server.url());
    cfg.tag_chunk = 10; // thousands of round trips: time to kill Redis half-way
    let (sink, metrics) = sink(&cfg);

    let task = spawn_invalidate(&sink, batch(&[], &["t"]), Shutdown::never());
    let deadline = Instant::now() + Duration::from_secs(10);
    while unlinked_members(&metrics) < 100.0 {
        assert!(Instant::now() < deadline, "the fan-out never started");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    server.stop();
    let progress = unlinked_members(&metrics);
    assert!(progress < MEMBERS as f64, "the fan-out finished before Redis was killed: the test needs a slower fan-out");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!task.is_finished());

    // Back from the snapshot with every member again (and without the script).
    server.restart();
    let report = tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("finishes")
        .expect("task")
        .expect("invalidated");
    assert_eq!(report.confirmed, vec![(ItemKind::RedisTag, 1)]);
    let mut con = server.connection();
    assert_eq!(existing(&mut con, &members), 0);
    assert!(!exists(&mut con, "tag:t"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandon_during_an_outage_returns_abandoned_promptly() {
    let mut server = RedisServer::start();
    let mut cfg = config(&server.url());
    // Long backoffs: abandoning must cut the wait short.
    cfg.retry = RetryPolicy { initial: Duration::from_secs(2), max: Duration::from_secs(30), max_attempts: None };
    let (sink, _metrics) = sink(&cfg);
    server.stop();

    let (trigger, shutdown) = shutdown::channel();
    let task = spawn_invalidate(&sink, batch(&["k"], &["t"]), shutdown);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!task.is_finished());
    let abandoned_at = Instant::now();
    trigger.abandon();
    let result = tokio::time::timeout(Duration::from_secs(1), task).await.expect("returns promptly").expect("task");
    assert!(matches!(result, Err(SinkError::Abandoned)), "{result:?}");
    assert!(abandoned_at.elapsed() < Duration::from_millis(500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_in_the_url_is_used() {
    let server = RedisServer::start_with_password("s3cret pass");
    assert!(server.url().contains("s3cret"));
    let mut con = server.connection();
    set_keys(&mut con, &["k".to_string()]);
    let (sink, _metrics) = sink(&config(&server.url()));

    assert!(sink.ping().await);
    let report = sink.invalidate(&batch(&["k"], &[]), &Shutdown::never()).await.expect("invalidated");
    assert_eq!(report.confirmed, vec![(ItemKind::RedisKey, 1)]);
    assert!(!exists(&mut con, "k"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_not_ready_and_retried_until_the_server_accepts_it() {
    let server = RedisServer::start_with_password("right");
    let mut admin = server.connection();
    set_keys(&mut admin, &["k".to_string()]);
    let wrong = format!("redis://:wrong@127.0.0.1:{}", server.port());
    let (sink, metrics) = sink(&config(&wrong));
    let (no_password, _) = self::sink(&config(&format!("redis://127.0.0.1:{}", server.port())));

    let started = Instant::now();
    assert!(!sink.ping().await, "refused credentials are not ready");
    assert!(!no_password.ping().await, "missing credentials are not ready");
    assert!(started.elapsed() < Duration::from_secs(2), "the probe is not retried");

    let task = spawn_invalidate(&sink, batch(&["k"], &[]), Shutdown::never());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!task.is_finished(), "a refused password is retried: the fix may be deployed on the server");
    assert!(metric(&metrics, "cdc_invalidator_sink_errors_total", &[("sink", SINK), ("class", "permanent")]) >= 1.0);
    assert!(exists(&mut admin, "k"));

    // Operations rotate the server's password to the one we were given.
    redis::cmd("CONFIG").arg("SET").arg("requirepass").arg("wrong").exec(&mut admin).expect("CONFIG SET");
    let report = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("finishes")
        .expect("task")
        .expect("invalidated");
    assert_eq!(report.confirmed, vec![(ItemKind::RedisKey, 1)]);
    assert!(sink.ping().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_tells_whether_redis_answers() {
    let mut server = RedisServer::start();
    let (sink, metrics) = sink(&config(&server.url()));
    assert!(sink.ping().await);
    assert_eq!(metric(&metrics, "cdc_invalidator_sink_up", &[("sink", SINK)]), 1.0);

    server.stop();
    let started = Instant::now();
    assert!(!sink.ping().await);
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(metric(&metrics, "cdc_invalidator_sink_up", &[("sink", SINK)]), 0.0);

    server.restart();
    assert!(sink.ping().await, "reconnects after the restart");

    // A frozen server accepts connections but never answers: the probe still returns.
    server.pause();
    let started = Instant::now();
    let up = sink.ping().await;
    server.resume();
    assert!(!up);
    assert!(started.elapsed() < Duration::from_secs(5), "ping took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_times_out_and_is_retried_until_it_answers() {
    let server = RedisServer::start();
    let mut con = server.connection();
    set_keys(&mut con, &["k".to_string()]);
    let mut cfg = config(&server.url());
    cfg.response_timeout = Duration::from_millis(200);
    cfg.connect_timeout = Duration::from_millis(200);
    let (sink, metrics) = sink(&cfg);
    assert!(sink.ping().await, "a connection is open before the freeze");

    server.pause();
    let task = spawn_invalidate(&sink, batch(&["k"], &[]), Shutdown::never());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let finished = task.is_finished();
    let errors = metric(&metrics, "cdc_invalidator_sink_errors_total", &[("sink", SINK), ("class", "retriable")]);
    server.resume();
    assert!(!finished);
    assert!(errors >= 2.0, "each attempt times out and is retried ({errors} errors)");

    let report = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("finishes")
        .expect("task")
        .expect("invalidated");
    assert_eq!(report.confirmed, vec![(ItemKind::RedisKey, 1)]);
    assert!(!exists(&mut con, "k"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_killed_by_the_server_is_replaced() {
    let server = RedisServer::start();
    let mut con = server.connection();
    set_keys(&mut con, &names("k:", 2));
    let (sink, _metrics) = sink(&config(&server.url()));
    sink.invalidate(&batch(&["k:0"], &[]), &Shutdown::never()).await.expect("first batch");

    let killed: u64 = redis::cmd("CLIENT").arg("KILL").arg("SKIPME").arg("yes").query(&mut con).expect("CLIENT KILL");
    assert!(killed >= 1);
    let report =
        tokio::time::timeout(Duration::from_secs(5), sink.invalidate(&batch(&["k:1"], &[]), &Shutdown::never()))
            .await
            .expect("finishes")
            .expect("second batch");
    assert_eq!(report.confirmed, vec![(ItemKind::RedisKey, 1)]);
    assert!(!exists(&mut con, "k:1"));
}

#[test]
fn builds_while_redis_is_down_and_refuses_unusable_urls() {
    let port = crate::support::free_port();
    let metrics = Arc::new(Metrics::new());
    assert!(RedisSink::new(SINK, &config(&format!("redis://127.0.0.1:{port}")), metrics.clone()).is_ok());
    assert!(RedisSink::new(SINK, &config("rediss://user:pw@cache.example.com:6380/2"), metrics.clone()).is_ok());
    for url in ["redis://:hunter2@127.0.0.1:notaport", "http://user:hunter2@127.0.0.1:6379"] {
        let err = match RedisSink::new(SINK, &config(url), metrics.clone()) {
            Ok(_) => panic!("accepted an unusable URL"),
            Err(e) => e.to_string(),
        };
        assert!(err.starts_with("invalid Redis URL: Redis URL did not parse"), "{err}");
        assert!(!err.contains("hunter2"), "the password leaked: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_batch_needs_no_redis() {
    let port = crate::support::free_port();
    let (sink, _metrics) = sink(&config(&format!("redis://127.0.0.1:{port}")));
    let b = Invalidations::of(ItemKind::SurrogateKey, vec!["product-1".into()]);
    let report = sink.invalidate(&b, &Shutdown::never()).await.expect("nothing to do");
    assert_eq!(report, SinkReport::default());
}

/// A private TLS-only redis-server with a self-signed certificate made by the openssl CLI.
struct TlsRedis {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl TlsRedis {
    fn start() -> TlsRedis {
        let dir = tempfile::tempdir().unwrap();
        let (key, cert) = (dir.path().join("key.pem"), dir.path().join("cert.pem"));
        let status = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"])
            .args(["-addext", "subjectAltName=IP:127.0.0.1", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl CLI");
        assert!(status.success());
        let port = crate::support::free_port();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--tls-auth-clients",
                "no",
            ])
            .arg("--tls-cert-file")
            .arg(&cert)
            .arg("--tls-key-file")
            .arg(&key)
            .arg("--tls-ca-cert-file")
            .arg(&cert)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server");
        assert!(crate::support::wait_for_port(port, Duration::from_secs(10)));
        TlsRedis { child, port, _dir: dir }
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn tls_comes_through_the_url() {
    let server = TlsRedis::start();
    // `#insecure`: the test certificate is self-signed; production URLs verify against the
    // system trust store.
    let url = format!("rediss://127.0.0.1:{}/#insecure", server.port);
    let (tls, _) = sink(&config(&url));
    assert!(tls.ping().await, "PING over TLS");
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("SET").arg("product:1").arg("cached").query_async(&mut con).await.unwrap();
    let report = tls.invalidate(&batch(&["product:1"], &[]), &Shutdown::never()).await.unwrap();
    assert!(report.rejected.is_empty());
    let left: bool = redis::cmd("EXISTS").arg("product:1").query_async(&mut con).await.unwrap();
    assert!(!left, "the key was unlinked over TLS");

    // Plain redis:// to a TLS port is never ready.
    let (plain, _) = sink(&config(&format!("redis://127.0.0.1:{}", server.port)));
    assert!(!plain.ping().await);
}

/// `wait_replicas`: while the replica is frozen, WAIT falls short; the batch is not confirmed,
/// the shortfall is counted and retried; once the replica answers, the batch is confirmed and
/// the replica holds the deletes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_replicas_holds_the_batch_until_a_replica_has_the_deletes() {
    let primary = RedisServer::start();
    let replica = RedisServer::start();
    let mut r = replica.connection();
    redis::cmd("REPLICAOF").arg("127.0.0.1").arg(primary.port()).exec(&mut r).unwrap();
    let mut p = primary.connection();
    let keys: Vec<String> = (0..50).map(|i| format!("product:{i}")).collect();
    set_keys(&mut p, &keys);
    let synced = (0..500).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        let n: i64 = redis::cmd("WAIT").arg(1).arg(100).query(&mut p).unwrap_or(0);
        n == 1 && existing(&mut r, &keys) == keys.len()
    });
    assert!(synced, "the replica syncs");

    let mut c = config(&primary.url());
    c.wait_replicas = Some(cdc_invalidator::config::WaitReplicas { count: 1, timeout: Duration::from_millis(100) });
    let (sink, metrics) = sink(&c);
    replica.pause();
    let (_trigger, shutdown) = shutdown::channel();
    let keys_batch = Invalidations::of(ItemKind::RedisKey, keys.clone());
    let task = spawn_invalidate(&sink, keys_batch, shutdown);
    let counted = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        metric(&metrics, "cdc_invalidator_redis_wait_timeouts_total", &[("sink", SINK)]) >= 2.0
    });
    assert!(counted, "WAIT shortfalls are counted");
    assert!(!task.is_finished(), "the batch is not confirmed while no replica has it");
    replica.resume();
    let report = tokio::time::timeout(Duration::from_secs(30), task).await.expect("confirmed").unwrap().unwrap();
    assert_eq!(report.confirmed, vec![(ItemKind::RedisKey, 50)]);
    let mut r = replica.connection();
    assert_eq!(existing(&mut r, &keys), 0, "the replica holds the deletes");
}

// The fan-out's one-call, one-string protocol (`fanout.lua`, `fanout.rs`): what the records
// say is what happened in Redis, including when a command fails halfway through a call.

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|i| i.to_string()).collect()
}

/// Keys, and tags of every kind of answer (gone, emptied in one chunk, needing several chunks,
/// not a set) in one batch: each record lands on its tag, the keys ride along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_call_answers_for_every_tag_of_a_batch() {
    let server = RedisServer::start();
    let mut con = server.connection();
    set_keys(&mut con, &strings(&["k:1", "k:2", "m:1", "m:2", "m:3", "tag:text"]));
    tag(&mut con, "tag:small", &strings(&["m:1", "m:2"]));
    tag(&mut con, "tag:large", &strings(&["m:3", "m:4", "m:5", "m:6", "m:7"]));
    let mut cfg = config(&server.url());
    cfg.tag_chunk = 2;
    let (sink, metrics) = sink(&cfg);
    redis::cmd("CONFIG").arg("RESETSTAT").exec(&mut con).expect("RESETSTAT");

    let report = sink
        .invalidate(&batch(&["k:1", "k:2", "k:never"], &["gone", "large", "small", "text"]), &Shutdown::never())
        .await
        .expect("invalidated");

    assert_eq!(report.confirmed, vec![(ItemKind::RedisKey, 3), (ItemKind::RedisTag, 3)]);
    assert_eq!(report.removed, 2, "k:1 and k:2 existed");
    assert_eq!(report.rejected.len(), 1);
    assert_eq!((report.rejected[0].kind, report.rejected[0].index), (ItemKind::RedisTag, 3));
    assert!(report.rejected[0].reason.contains("holds a string"), "{}", report.rejected[0].reason);
    for key in ["k:1", "k:2", "m:1", "m:2", "m:3", "tag:small", "tag:large"] {
        assert!(!exists(&mut con, key), "{key} is gone");
    }
    assert!(exists(&mut con, "tag:text"), "what is not a set is left alone");
    assert_eq!(unlinked_members(&metrics), 7.0);
    // The first call found the script missing; then one call per round (large needs three
    // chunks of 2), and a single native UNLINK for the keys.
    assert_eq!(server.command_calls("evalsha"), 4);
    assert_eq!(server.command_calls("unlink"), 1 + 4, "the keys' UNLINK, and the script's, one per chunk taken");
    assert_eq!(server.command_calls("type"), 1, "TYPE only names what is not a set");
}

/// A call stops taking members at its bound: the tags it did not reach go in the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_member_bound_spreads_many_tags_over_calls() {
    let server = RedisServer::start();
    let mut con = server.connection();
    let tags = names("t", 100);
    for t in &tags {
        let member = format!("member:{t}");
        set_keys(&mut con, std::slice::from_ref(&member));
        tag(&mut con, &format!("tag:{t}"), &[member]);
    }
    let mut cfg = config(&server.url());
    cfg.tag_chunk = 1;
    let (sink, metrics) = sink(&cfg);
    redis::cmd("CONFIG").arg("RESETSTAT").exec(&mut con).expect("RESETSTAT");

    let report =
        sink.invalidate(&Invalidations::of(ItemKind::RedisTag, tags.clone()), &Shutdown::never()).await.expect("ok");

    assert_eq!(report.confirmed, vec![(ItemKind::RedisTag, 100)]);
    let dbsize: u64 = redis::cmd("DBSIZE").query(&mut con).expect("DBSIZE");
    assert_eq!(dbsize, 0);
    assert_eq!(unlinked_members(&metrics), 100.0);
    // A call takes 40 chunks (`fanout::MEMBER_CHUNKS_PER_CALL`) of `tag_chunk` members at the
    // most: 40, 40, 20, after the call that found the script missing.
    assert_eq!(server.command_calls("evalsha"), 1 + 3);
    assert_eq!(server.command_calls("srandmember"), 100, "no set was touched twice");
}

/// A command refused inside the call (an ACL that does not cover one member key): the tags
/// before it are done and counted, the failing one keeps every member, the later ones are not
/// touched, and the error is Redis's own (here fatal: retrying cannot fix an ACL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_inside_the_call_keeps_what_it_finished() {
    let server = RedisServer::start();
    let mut con = server.connection();
    set_keys(&mut con, &strings(&["ok:1", "ok:2", "ok:3", "ok:4", "bad:1"]));
    tag(&mut con, "tag:a", &strings(&["ok:1", "ok:2"]));
    tag(&mut con, "tag:b", &strings(&["ok:3", "bad:1"]));
    tag(&mut con, "tag:c", &strings(&["ok:4"]));
    redis::cmd("ACL")
        .arg(&["SETUSER", "cdc", "on", ">secret", "~tag:*", "~ok:*", "+@all"])
        .exec(&mut con)
        .expect("ACL SETUSER");
    let mut cfg = config(&format!("redis://cdc:secret@127.0.0.1:{}", server.port()));
    // Were the refusal taken for a transient error, the test fails instead of retrying forever.
    cfg.retry.max_attempts = Some(3);
    let (sink, metrics) = sink(&cfg);

    let err = sink.invalidate(&batch(&[], &["a", "b", "c"]), &Shutdown::never()).await.expect_err("refused");

    let SinkError::Fatal(message) = err else { panic!("a fatal error, got {err:?}") };
    assert!(message.contains("can't access at least one of the keys"), "{message}");
    assert!(!exists(&mut con, "tag:a") && !exists(&mut con, "ok:1") && !exists(&mut con, "ok:2"), "a is done");
    let b: Vec<String> = redis::cmd("SMEMBERS").arg("tag:b").query(&mut con).expect("SMEMBERS");
    assert_eq!(b.len(), 2, "nothing left b's set: {b:?}");
    assert!(exists(&mut con, "tag:c") && exists(&mut con, "ok:4"), "c was not reached");
    assert_eq!(unlinked_members(&metrics), 2.0, "a's members, counted once");
}

/// The dependents cascade reads the members each set gave from the records: any bytes, the
/// record's separators included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collected_members_of_any_bytes_carry_the_cascade_on() {
    let server = RedisServer::start();
    let mut con = server.connection();
    let odd = "page:1 2:\n3";
    set_keys(&mut con, &strings(&["root", odd, "leaf"]));
    tag(&mut con, "dep:root", &strings(&[odd]));
    tag(&mut con, &format!("dep:{odd}"), &strings(&["leaf"]));
    let (sink, _) = sink(&config(&server.url()));

    let batch = Invalidations::of(ItemKind::RedisKey, strings(&["root"]))
        .with(ItemKind::RedisDependents, strings(&["key:root"]));
    let report = sink.invalidate(&batch, &Shutdown::never()).await.expect("invalidated");

    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    for key in ["root", odd, "leaf", "dep:root"] {
        assert!(!exists(&mut con, key), "{key:?} is gone");
    }
}
