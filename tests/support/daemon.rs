//! Runs the daemon in process (for fault-injection tests that need the mock cluster's handle)
//! and as the real binary (for signal and end-to-end tests).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use cdc_invalidator::app::{self, AppError};
use cdc_invalidator::config;
use cdc_invalidator::rules::Rules;
use cdc_invalidator::shutdown::{self, ShutdownTrigger};
use cdc_invalidator::telemetry::Metrics;

/// What a test daemon consumes and where it invalidates.
pub struct Setup<'a> {
    pub bootstrap: &'a str,
    pub topics: &'a [&'a str],
    pub group: &'a str,
    pub redis_url: &'a str,
    /// Extra top-level YAML appended to the config (e.g. a `pipeline:` section).
    pub extra: &'a str,
    /// Extra librdkafka settings for the source.
    pub librdkafka: &'a [(&'a str, &'a str)],
}

/// Writes rules and config into `dir`; returns the config path.
pub fn write_config(dir: &Path, setup: &Setup<'_>) -> (PathBuf, u16) {
    std::fs::write(dir.join("rules.yaml"), super::events::RULES).expect("write rules");
    let port = super::free_port();
    let topics = setup.topics.iter().map(|t| format!("\"{t}\"")).collect::<Vec<_>>().join(", ");
    let text = format!(
        r#"rules: rules.yaml
source:
  kind: kafka
  kafka:
    brokers: "{bootstrap}"
    group_id: "{group}"
    topics: [{topics}]
    commit_interval: 100ms
    librdkafka:
      session.timeout.ms: 6000
      heartbeat.interval.ms: 300
{librdkafka}sinks:
  redis:
    url: "{redis}"
    retry: {{ initial: 20ms, max: 250ms }}
metrics:
  listen: "127.0.0.1:{port}"
dead_letter:
  file: dead-letters.jsonl
shutdown:
  grace: 5s
log:
  level: "info,librdkafka=warn"
{extra}"#,
        bootstrap = setup.bootstrap,
        group = setup.group,
        redis = setup.redis_url,
        extra = setup.extra,
        librdkafka = setup.librdkafka.iter().map(|(k, v)| format!("      {k}: \"{v}\"\n")).collect::<String>(),
    );
    let path = dir.join("config.yaml");
    std::fs::write(&path, text).expect("write config");
    (path, port)
}

/// The daemon running inside the test process.
pub struct Daemon {
    trigger: ShutdownTrigger,
    task: tokio::task::JoinHandle<Result<(), AppError>>,
    pub metrics: Arc<Metrics>,
    pub metrics_port: u16,
    pub dir: PathBuf,
}

impl Daemon {
    pub fn start(dir: &Path, setup: &Setup<'_>) -> Daemon {
        let (path, metrics_port) = write_config(dir, setup);
        Daemon::from_config(dir, &path, metrics_port)
    }

    /// Runs an already written config (tests that edit what `write_config` produced).
    pub fn from_config(dir: &Path, path: &Path, metrics_port: u16) -> Daemon {
        let config = config::load_with_env(path, []).expect("valid test config");
        let rules = Rules::from_file(&config.rules).expect("valid test rules");
        let metrics = Arc::new(Metrics::new());
        let (trigger, shutdown) = shutdown::channel();
        let task = tokio::spawn(app::run(config, rules, metrics.clone(), shutdown));
        Daemon { trigger, task, metrics, metrics_port, dir: dir.to_path_buf() }
    }

    /// SIGTERM's first stage: stop intake, drain, final commit. Returns the run result.
    pub async fn stop(self) -> Result<(), AppError> {
        self.trigger.stop_intake();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("daemon drained within 30 s")
            .expect("daemon task")
    }

    /// Abandon in-flight work at once (as when the grace period runs out).
    pub async fn abandon(self) -> Result<(), AppError> {
        self.trigger.abandon();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("daemon stopped within 30 s")
            .expect("daemon task")
    }

    /// The daemon stopped by itself (a fatal error, or its run ended).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    pub fn dead_letters(&self) -> Vec<serde_json::Value> {
        read_dead_letters(&self.dir.join("dead-letters.jsonl"))
    }
}

pub fn read_dead_letters(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("dead letters are JSON lines"))
        .collect()
}

/// Polls `check` every 20 ms until it is true or `timeout` passes.
pub async fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check()
}

/// The real binary, built by cargo for this test run.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cdc-invalidator"))
}

/// The binary as a child process running `run -c CONFIG`, logs to `dir/daemon.log`.
pub struct DaemonProcess {
    pub child: Child,
    pub log: PathBuf,
}

impl DaemonProcess {
    pub fn start(config: &Path, dir: &Path) -> DaemonProcess {
        DaemonProcess::start_wrapped(config, dir, &[])
    }

    /// As [`DaemonProcess::start`], run by `wrapper` (a program and its arguments, such as
    /// `valgrind --tool=massif`) when it is not empty: the benches' memory profiling.
    pub fn start_wrapped(config: &Path, dir: &Path, wrapper: &[&str]) -> DaemonProcess {
        let log = dir.join("daemon.log");
        let out = std::fs::File::create(&log).expect("create daemon log");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(binary());
                c
            }
            None => Command::new(binary()),
        };
        let child = command
            .args(["run", "-c"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup log"))
            .stderr(out)
            .spawn()
            .expect("spawn cdc-invalidator");
        DaemonProcess { child, log }
    }

    pub fn signal(&self, sig: &str) {
        let status =
            Command::new("kill").args([&format!("-{sig}"), &self.child.id().to_string()]).status().expect("kill");
        assert!(status.success());
    }

    /// Waits for exit; returns the exit code.
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The values of every exposition line starting with `prefix`, added up (all label sets).
pub fn series_sum(exposition: &str, prefix: &str) -> f64 {
    exposition.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

/// A plain HTTP/1.1 GET on loopback: (status, body).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((status, body))
}
