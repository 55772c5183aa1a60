//! Private redis-server instances.
//!
//! Each [`RedisServer`] runs `redis-server` on its own free loopback port with its own temporary
//! directory (so `SAVE` snapshots stay private), without persistence unless a test asks for a
//! snapshot. It can be stopped (killed) and restarted on the same port to simulate an outage;
//! a snapshot taken with `SAVE` before the stop is loaded again on restart. Killed and waited
//! for on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{free_port, wait_for_port};

const REDIS_SERVER: &str = "redis-server";

pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    password: Option<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// A server without a password.
    pub fn start() -> RedisServer {
        RedisServer::launch(None)
    }

    /// A server that requires `password` (`--requirepass`, the default user).
    pub fn start_with_password(password: &str) -> RedisServer {
        RedisServer::launch(Some(password.to_string()))
    }

    fn launch(password: Option<String>) -> RedisServer {
        let dir = tempfile::tempdir().expect("temp dir for redis-server");
        let mut server = RedisServer { port: free_port(), dir, password, child: None };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "redis-server already running");
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).expect("redis-server log file");
        let mut cmd = Command::new(REDIS_SERVER);
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--dbfilename", "dump.rdb", "--logfile", ""]);
        if let Some(pw) = &self.password {
            cmd.args(["--requirepass", pw]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {REDIS_SERVER} (apt install redis-server): {e}"));
        self.child = Some(child);
        if !wait_for_port(self.port, Duration::from_secs(10)) {
            let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
            panic!("redis-server did not listen on port {} within 10 s; its log:\n{log}", self.port);
        }
        // Accepting connections is not serving: wait until a snapshot (if any) is loaded.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match redis::cmd("PING").query::<String>(&mut self.try_connection().expect("connect to redis-server")) {
                Ok(_) => break,
                Err(e) if std::time::Instant::now() < deadline && e.code() == Some("LOADING") => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("redis-server does not answer PING: {e}"),
            }
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://[:password@]127.0.0.1:port`.
    pub fn url(&self) -> String {
        match &self.password {
            Some(pw) => format!("redis://:{pw}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// Kills the server (SIGKILL: no shutdown snapshot) and waits for it; the port is kept so
    /// [`RedisServer::restart`] comes back at the same address.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A paused server still dies of SIGKILL.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, loading the last `SAVE` snapshot if any.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing answers, like a
    /// black-holed network.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Undoes [`RedisServer::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("redis-server running");
        let status = Command::new("kill").arg(signal).arg(child.id().to_string()).status().expect("run kill");
        assert!(status.success(), "kill {signal} failed");
    }

    /// A blocking client connection for setting up and checking data.
    pub fn connection(&self) -> redis::Connection {
        self.try_connection().expect("connect to the test redis-server")
    }

    fn try_connection(&self) -> redis::RedisResult<redis::Connection> {
        let client = redis::Client::open(self.url())?;
        client.get_connection_with_timeout(Duration::from_secs(5))
    }

    /// One `INFO commandstats` figure: how many times `command` ran (scripts' inner commands
    /// included) since the server started or `CONFIG RESETSTAT`.
    pub fn command_calls(&self, command: &str) -> u64 {
        let info: String =
            redis::cmd("INFO").arg("commandstats").query(&mut self.connection()).expect("INFO commandstats");
        let prefix = format!("cmdstat_{}:calls=", command.to_ascii_lowercase());
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
