//! The fan-out's one-call, one-string protocol (`fanout.lua`, `fanout.rs`) against a real
//! redis-server: what the records say is what happened in Redis, including when a command
//! fails halfway through a call.
//!
//! Here rather than in `tests/` because they reach the sink's own module (its constants); they
//! start their own private server as `tests/support/redis.rs` does, without its extras.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::fanout::MEMBER_CHUNKS_PER_CALL;
use super::RedisSink;
use crate::config::RedisConfig;
use crate::retry::RetryPolicy;
use crate::shutdown::Shutdown;
use crate::sink::{Invalidations, ItemKind, Sink, SinkError};
use crate::telemetry::Metrics;

/// A private redis-server on a free loopback port, killed on drop.
struct Server {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::tempdir().expect("temp dir for redis-server");
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt install redis-server)");
        let server = Server { port, child, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.try_connection().and_then(|mut c| redis::cmd("PING").query::<String>(&mut c)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not answer within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn try_connection(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(self.url())?.get_connection_with_timeout(Duration::from_secs(5))
    }

    fn connection(&self) -> redis::Connection {
        self.try_connection().expect("connect to the test redis-server")
    }

    /// `INFO commandstats` calls of `command` (scripts' inner commands included).
    fn calls(&self, command: &str) -> u64 {
        let info: String = redis::cmd("INFO").arg("commandstats").query(&mut self.connection()).expect("INFO");
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(url: &str) -> RedisConfig {
    let mut c = RedisConfig::for_url(url);
    c.retry = RetryPolicy { initial: Duration::from_millis(10), max: Duration::from_millis(100), max_attempts: Some(3) };
    c.connect_timeout = Duration::from_secs(2);
    c.response_timeout = Duration::from_secs(5);
    c
}

fn sink(config: &RedisConfig) -> (RedisSink, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    (RedisSink::new("redis", config, metrics.clone()).expect("valid URL"), metrics)
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|i| i.to_string()).collect()
}

fn unlinked_members(metrics: &Metrics) -> f64 {
    metrics.value("cdc_invalidator_tag_members_unlinked_total", &[("sink", "redis")])
}

fn exists(con: &mut redis::Connection, key: &str) -> bool {
    redis::cmd("EXISTS").arg(key).query::<u64>(con).expect("EXISTS") == 1
}

fn set(con: &mut redis::Connection, keys: &[&str]) {
    for key in keys {
        redis::cmd("SET").arg(*key).arg("cached").exec(con).expect("SET");
    }
}

fn tag(con: &mut redis::Connection, set: &str, members: &[&str]) {
    redis::cmd("SADD").arg(set).arg(members).exec(con).expect("SADD");
}

/// Keys, and tags of every kind of answer (gone, emptied in one chunk, needing several chunks,
/// not a set) in one batch: each record lands on its tag, the keys ride along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_call_answers_for_every_tag_of_a_batch() {
    let server = Server::start();
    let mut con = server.connection();
    set(&mut con, &["k:1", "k:2", "m:1", "m:2", "m:3", "tag:text"]);
    tag(&mut con, "tag:small", &["m:1", "m:2"]);
    tag(&mut con, "tag:large", &["m:3", "m:4", "m:5", "m:6", "m:7"]);
    let mut cfg = config(&server.url());
    cfg.tag_chunk = 2;
    let (sink, metrics) = sink(&cfg);
    redis::cmd("CONFIG").arg("RESETSTAT").exec(&mut con).expect("RESETSTAT");

    let batch = Invalidations::of(ItemKind::RedisKey, strings(&["k:1", "k:2", "k:never"]))
        .with(ItemKind::RedisTag, strings(&["gone", "large", "small", "text"]));
    let report = sink.invalidate(&batch, &Shutdown::never()).await.expect("invalidated");

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
    assert_eq!(server.calls("evalsha"), 4);
    assert_eq!(server.calls("unlink"), 1 + 4, "the keys' UNLINK, and the script's, one per chunk taken");
    assert_eq!(server.calls("type"), 1, "TYPE only names what is not a set");
}

/// A call stops taking members at its bound: the tags it did not reach go in the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_member_bound_spreads_many_tags_over_calls() {
    let server = Server::start();
    let mut con = server.connection();
    let tags: Vec<String> = (0..100).map(|i| format!("t{i}")).collect();
    for t in &tags {
        let member = format!("member:{t}");
        set(&mut con, &[&member]);
        tag(&mut con, &format!("tag:{t}"), &[&member]);
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
    // 40 members per call: 40, 40, 20, after the call that found the script missing.
    assert_eq!(MEMBER_CHUNKS_PER_CALL, 40);
    assert_eq!(server.calls("evalsha"), 1 + 3);
    assert_eq!(server.calls("srandmember"), 100, "no set was touched twice");
}

/// A command refused inside the call (an ACL that does not cover one member key): the tags
/// before it are done and counted, the failing one keeps every member, the later ones are not
/// touched, and the error is Redis's own (here fatal: retrying cannot fix an ACL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_inside_the_call_keeps_what_it_finished() {
    let server = Server::start();
    let mut con = server.connection();
    set(&mut con, &["ok:1", "ok:2", "ok:3", "ok:4", "bad:1"]);
    tag(&mut con, "tag:a", &["ok:1", "ok:2"]);
    tag(&mut con, "tag:b", &["ok:3", "bad:1"]);
    tag(&mut con, "tag:c", &["ok:4"]);
    redis::cmd("ACL")
        .arg(&["SETUSER", "cdc", "on", ">secret", "~tag:*", "~ok:*", "+@all"])
        .exec(&mut con)
        .expect("ACL SETUSER");
    let cfg = config(&format!("redis://cdc:secret@127.0.0.1:{}", server.port));
    let (sink, metrics) = sink(&cfg);

    let batch = Invalidations::of(ItemKind::RedisTag, strings(&["a", "b", "c"]));
    let err = sink.invalidate(&batch, &Shutdown::never()).await.expect_err("refused");

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
    let server = Server::start();
    let mut con = server.connection();
    let odd = "page:1 2:\n3";
    set(&mut con, &["root", odd, "leaf"]);
    tag(&mut con, "dep:root", &[odd]);
    tag(&mut con, &format!("dep:{odd}"), &["leaf"]);
    let (sink, _) = sink(&config(&server.url()));

    let batch = Invalidations::of(ItemKind::RedisKey, strings(&["root"]))
        .with(ItemKind::RedisDependents, strings(&["key:root"]));
    let report = sink.invalidate(&batch, &Shutdown::never()).await.expect("invalidated");

    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    for key in ["root", odd, "leaf", "dep:root"] {
        assert!(!exists(&mut con, key), "{key:?} is gone");
    }
}
