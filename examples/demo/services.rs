//! The processes the demo starts (each killed and reaped on drop, whatever path the demo leaves
//! by), and how it talks to the daemon: free loopback ports, readiness, plain HTTP GETs.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{DemoResult, READY_TIMEOUT, START_TIMEOUT};

/// Starts attempts at most this often when the port was taken between `free_port` and the bind.
pub const START_ATTEMPTS: usize = 3;

/// A child process with its output in a log file; killed and reaped on drop, so nothing it
/// started outlives the demo, whatever path the demo leaves by.
pub struct Service {
    pub name: &'static str,
    pub child: Child,
    pub log: PathBuf,
}

impl Service {
    pub fn spawn(name: &'static str, mut cmd: Command, log: &Path) -> DemoResult<Service> {
        let out = File::create(log)?;
        cmd.env("NO_COLOR", "1").stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
        let child = cmd.spawn().map_err(|e| format!("cannot start {name} ({:?}): {e}", cmd.get_program()))?;
        Ok(Service { name, child, log: log.to_path_buf() })
    }

    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Sends a signal by name (`TERM`), as an operator or a supervisor would.
    pub fn signal(&self, sig: &str) -> DemoResult<()> {
        let status = Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status()?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("kill -{sig} {} ({}) failed", self.child.id(), self.name).into())
        }
    }

    /// Waits for the process to exit; its exit code, or None on timeout (or death by signal).
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }

    pub fn failure(&self, what: &str) -> Box<dyn std::error::Error + Send + Sync> {
        format!("{} {what}; its log ({}) ends:\n{}", self.name, self.log.display(), tail(&self.log, 20)).into()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free TCP port on 127.0.0.1 (bound and released: another process may take it first, so
/// starters retry on a fresh port when the service exits at start).
pub fn free_port() -> DemoResult<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The last `lines` lines of a log file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `cdc-invalidator`, built by cargo next to this example (`target/<profile>/examples/demo`).
pub fn daemon_binary() -> DemoResult<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|profile| profile.join("cdc-invalidator"))
        .ok_or("cannot locate the target directory")?;
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!("{} not found: build it with `cargo build --release --bins --examples`", bin.display()).into())
    }
}

pub async fn start_redis(dir: &Path) -> DemoResult<(Service, String)> {
    for _ in 0..START_ATTEMPTS {
        let port = free_port()?;
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--daemonize", "no"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir);
        let mut service = Service::spawn("redis-server", cmd, &dir.join("redis.log"))?;
        let url = format!("redis://127.0.0.1:{port}/");
        let client = redis::Client::open(url.as_str())?;
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline && !service.exited() {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                if redis::cmd("PING").query_async::<String>(&mut c).await.is_ok() {
                    return Ok((service, url));
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !service.exited() {
            return Err(service.failure(&format!("did not answer PING within {START_TIMEOUT:?}")));
        }
    }
    Err(format!("redis-server exited at start {START_ATTEMPTS} times (see {})", dir.join("redis.log").display()).into())
}

/// Waits for `GET /readyz` = 200: the source streams (Kafka partitions assigned, or the
/// PostgreSQL slot held) and Redis answers PING.
pub async fn wait_ready(daemon: &mut Service, port: u16) -> DemoResult<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    while Instant::now() < deadline {
        if daemon.exited() {
            return Err(daemon.failure("exited before becoming ready"));
        }
        if http_get(port, "/readyz").await.is_some_and(|(status, _)| status == 200) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(daemon.failure(&format!("not ready within {READY_TIMEOUT:?}")))
}

/// A plain HTTP/1.1 GET on loopback: (status, body), or None when nothing answers in 5 s.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let request = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let head = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        stream.write_all(head.as_bytes()).await.ok()?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.ok()?;
        let text = String::from_utf8_lossy(&raw);
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(5), request).await.ok().flatten()
}
