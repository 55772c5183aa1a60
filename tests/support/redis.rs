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

/// One `redis-server` process of a cluster or sentinel setup, with its own port and directory.
struct Node {
    port: u16,
    args: Vec<String>,
    dir: PathBuf,
    child: Option<Child>,
    access: Access,
}

impl Node {
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("redis-{}.log", self.port)))
            .expect("log file");
        let child = Command::new(REDIS_SERVER)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {REDIS_SERVER}: {e}"));
        self.child = Some(child);
        assert!(wait_for_port(self.port, Duration::from_secs(10)), "redis-server did not listen on {}", self.port);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn connection(&self) -> redis::Connection {
        redis::Client::open(self.access.url(self.port))
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(5)))
            .expect("connect to a test redis-server")
    }
}

/// A node's URL as a user would write it: the scheme, no credentials.
fn bare_url(access: &Access, port: u16) -> String {
    let scheme = if access.tls { "rediss" } else { "redis" };
    format!("{scheme}://127.0.0.1:{port}")
}

/// How test clients reach the nodes of a setup: TLS or not, and with which credentials.
#[derive(Clone, Default)]
struct Access {
    tls: bool,
    user: Option<String>,
    password: Option<String>,
}

impl Access {
    /// A URL for setting up and checking data (`#insecure`: these clients do not verify).
    fn url(&self, port: u16) -> String {
        let auth = match (&self.user, &self.password) {
            (Some(u), Some(p)) => format!("{u}:{p}@"),
            (None, Some(p)) => format!(":{p}@"),
            _ => String::new(),
        };
        match self.tls {
            true => format!("rediss://{auth}127.0.0.1:{port}/#insecure"),
            false => format!("redis://{auth}127.0.0.1:{port}"),
        }
    }
}

/// A throwaway CA and a certificate it signed for 127.0.0.1, made with the openssl CLI.
pub struct TestCa {
    dir: tempfile::TempDir,
}

impl TestCa {
    pub fn create() -> TestCa {
        let dir = tempfile::tempdir().expect("temp dir for the CA");
        let run = |args: &[&str]| {
            let out = Command::new("openssl").args(args).current_dir(dir.path()).output().expect("openssl CLI");
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=cdc-invalidator test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ]);
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        std::fs::write(
            dir.path().join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
        )
        .expect("extensions file");
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
            "-out",
            "server.pem",
        ]);
        TestCa { dir }
    }

    /// The CA certificate (PEM): what a client trusts.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// redis-server's TLS settings: TLS only, also between nodes (cluster bus, replication).
    fn server_args(&self, port: u16) -> Vec<String> {
        let path = |f: &str| self.dir.path().join(f).display().to_string();
        [
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            &path("server.pem"),
            "--tls-key-file",
            &path("server.key"),
            "--tls-ca-cert-file",
            &path("ca.pem"),
            "--tls-auth-clients",
            "no",
            "--tls-replication",
            "yes",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

/// TLS and credentials for every node of a cluster or sentinel setup.
pub struct Secure {
    pub ca: TestCa,
    /// An ACL user (with `password`), else `requirepass` for the default user.
    pub user: Option<String>,
    pub password: String,
}

impl Secure {
    fn access(&self) -> Access {
        Access { tls: true, user: self.user.clone(), password: Some(self.password.clone()) }
    }

    /// A data node's TLS and auth settings (replicas authenticate to their primary alike).
    fn server_args(&self, port: u16) -> Vec<String> {
        let mut args = self.ca.server_args(port);
        match &self.user {
            Some(user) => {
                // The default user is switched off: only our user gets in.
                // One token per word: redis-server joins an option's arguments into one line.
                let pass = format!(">{}", self.password);
                args.extend(["--user", user, "on", &pass, "~*", "&*", "+@all"].map(String::from));
                args.extend(["--user", "default", "off"].map(String::from));
                args.extend(["--masteruser".into(), user.clone()]);
            }
            None => args.extend(["--requirepass".into(), self.password.clone()]),
        }
        args.extend(["--masterauth".into(), self.password.clone()]);
        args
    }

    /// redis-cli's matching options.
    fn cli_args(&self) -> Vec<String> {
        let mut args = vec!["--tls".to_string(), "--cacert".into(), self.ca.ca_file().display().to_string()];
        if let Some(user) = &self.user {
            args.extend(["--user".into(), user.clone()]);
        }
        args.extend(["--pass".into(), self.password.clone()]);
        args
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A private Redis Cluster: `masters` primaries with one replica each, created with
/// `redis-cli --cluster create` (test-services.md, "Redis Cluster and Sentinel").
pub struct RedisCluster {
    dir: tempfile::TempDir,
    nodes: Vec<Node>,
    access: Access,
}

impl RedisCluster {
    pub fn start(masters: usize) -> RedisCluster {
        RedisCluster::launch(masters, None)
    }

    /// A cluster whose nodes speak only TLS (clients, cluster bus, replication) and require
    /// `secure`'s credentials.
    pub fn start_secure(masters: usize, secure: &Secure) -> RedisCluster {
        RedisCluster::launch(masters, Some(secure))
    }

    fn launch(masters: usize, secure: Option<&Secure>) -> RedisCluster {
        let dir = tempfile::tempdir().expect("temp dir for the cluster");
        let access = secure.map(Secure::access).unwrap_or_default();
        let mut nodes = Vec::new();
        for _ in 0..masters * 2 {
            let (port, bus) = (free_port(), free_port());
            let node_dir = dir.path().join(port.to_string());
            std::fs::create_dir_all(&node_dir).expect("node dir");
            let mut args: Vec<String> = [
                "--cluster-port",
                &bus.to_string(),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &node_dir.join("nodes.conf").display().to_string(),
                "--cluster-node-timeout",
                "2000",
                "--dir",
                &node_dir.display().to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            match secure {
                Some(secure) => {
                    args.extend(secure.server_args(port));
                    args.extend(["--tls-cluster", "yes"].map(String::from));
                }
                None => args.extend(["--port".to_string(), port.to_string()]),
            }
            let mut node = Node { port, args, dir: dir.path().to_path_buf(), child: None, access: access.clone() };
            node.spawn();
            nodes.push(node);
        }
        let mut create = Command::new("redis-cli");
        if let Some(secure) = secure {
            create.args(secure.cli_args());
        }
        create.arg("--cluster").arg("create");
        for n in &nodes {
            create.arg(format!("127.0.0.1:{}", n.port));
        }
        let out =
            create.args(["--cluster-replicas", "1", "--cluster-yes"]).output().expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { dir, nodes, access };
        cluster.wait_healthy();
        cluster
    }

    /// Waits until every live node says `cluster_state:ok` and every live replica has finished
    /// its first sync with a live primary.
    pub fn wait_healthy(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let ok = self.nodes.iter().filter(|n| n.child.is_some()).all(|n| {
                let mut con = n.connection();
                let cluster: String = redis::cmd("CLUSTER").arg("INFO").query(&mut con).unwrap_or_default();
                let repl: String = redis::cmd("INFO").arg("replication").query(&mut con).unwrap_or_default();
                cluster.contains("cluster_state:ok")
                    && (repl.contains("role:master") || repl.contains("master_link_status:up"))
            });
            if ok && self.masters().len() == self.nodes.len() / 2 {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "the test cluster did not become healthy within 60 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Seed URLs of every node, without credentials; `rediss://` for a TLS cluster (verified:
    /// the test CA is trusted through `SSL_CERT_FILE`).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| bare_url(&self.access, n.port)).collect()
    }

    /// Ports of the live primaries.
    pub fn masters(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .filter(|n| {
                let info: String = redis::cmd("INFO").arg("replication").query(&mut n.connection()).unwrap_or_default();
                info.contains("role:master")
            })
            .map(|n| n.port)
            .collect()
    }

    /// The primary serving `key`'s slot, asked of any live node.
    pub fn master_of(&self, key: &str) -> u16 {
        let node = self.nodes.iter().find(|n| n.child.is_some()).expect("a live node");
        let slot: u16 = redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).query(&mut node.connection()).expect("KEYSLOT");
        let slots: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query(&mut node.connection()).expect("SLOTS");
        for range in slots {
            let redis::Value::Array(parts) = range else { continue };
            let (Some(redis::Value::Int(from)), Some(redis::Value::Int(to)), Some(redis::Value::Array(primary))) =
                (parts.first(), parts.get(1), parts.get(2))
            else {
                continue;
            };
            if (*from..=*to).contains(&i64::from(slot)) {
                if let Some(redis::Value::Int(port)) = primary.get(1) {
                    return *port as u16;
                }
            }
        }
        panic!("slot {slot} is not served");
    }

    /// Kills a node (SIGKILL): its replica is promoted after `cluster-node-timeout`.
    pub fn kill(&mut self, port: u16) {
        let node = self.nodes.iter_mut().find(|n| n.port == port).expect("a node of this cluster");
        node.kill();
    }

    /// Starts a killed node again with its own `nodes.conf`: it rejoins the cluster (a former
    /// primary whose replica took over comes back as a replica).
    pub fn restart(&mut self, port: u16) {
        let node = self.nodes.iter_mut().find(|n| n.port == port).expect("a node of this cluster");
        node.kill();
        node.spawn();
    }

    /// The replica ports of the primary `port`, as it reports them.
    pub fn replicas_of(&self, port: u16) -> Vec<u16> {
        let node = self.nodes.iter().find(|n| n.port == port).expect("a node of this cluster");
        let info: String = redis::cmd("INFO").arg("replication").query(&mut node.connection()).unwrap_or_default();
        info.lines()
            .filter(|l| l.starts_with("slave") && l.contains("port="))
            .filter_map(|l| l.split("port=").nth(1)?.split(',').next()?.parse().ok())
            .collect()
    }

    /// A blocking cluster client for setting up and checking data.
    pub fn client(&self) -> redis::cluster::ClusterConnection {
        let live: Vec<String> =
            self.nodes.iter().filter(|n| n.child.is_some()).map(|n| self.access.url(n.port)).collect();
        redis::cluster::ClusterClient::builder(live)
            .connection_timeout(Duration::from_secs(5))
            .response_timeout(Duration::from_secs(5))
            .retries(20)
            .build()
            .and_then(|c| c.get_connection())
            .expect("connect to the test cluster")
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

/// A private Sentinel setup: one primary, one replica, three sentinels watching `master`.
pub struct RedisSentinel {
    _dir: tempfile::TempDir,
    primary: Node,
    replica: Node,
    sentinels: Vec<Node>,
}

pub const SENTINEL_MASTER: &str = "mymaster";

impl RedisSentinel {
    pub fn start() -> RedisSentinel {
        RedisSentinel::launch(None)
    }

    /// Primary, replica and sentinels speaking only TLS; the data nodes require `secure`'s
    /// credentials (the sentinels have none of their own).
    pub fn start_secure(secure: &Secure) -> RedisSentinel {
        RedisSentinel::launch(Some(secure))
    }

    fn launch(secure: Option<&Secure>) -> RedisSentinel {
        let dir = tempfile::tempdir().expect("temp dir for sentinel");
        let access = secure.map(Secure::access).unwrap_or_default();
        let data = |port: u16, extra: &[String]| -> Vec<String> {
            // Its own --dir: a replica's full sync writes an RDB file there.
            let node_dir = dir.path().join(port.to_string());
            std::fs::create_dir_all(&node_dir).expect("node dir");
            let mut args: Vec<String> = [
                "--dir",
                &node_dir.display().to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            match secure {
                Some(secure) => args.extend(secure.server_args(port)),
                None => args.extend(["--port".to_string(), port.to_string()]),
            }
            args.extend(extra.iter().cloned());
            args
        };
        let node = |port: u16, args: Vec<String>, access: &Access| Node {
            port,
            args,
            dir: dir.path().to_path_buf(),
            child: None,
            access: access.clone(),
        };
        let primary_port = free_port();
        let mut primary = node(primary_port, data(primary_port, &[]), &access);
        primary.spawn();
        let replica_port = free_port();
        let replicaof = ["--replicaof".to_string(), "127.0.0.1".to_string(), primary_port.to_string()];
        let mut replica = node(replica_port, data(replica_port, &replicaof), &access);
        replica.spawn();
        let sentinel_access = Access { tls: secure.is_some(), ..Access::default() };
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            let port = free_port();
            let conf = dir.path().join(format!("sentinel-{port}.conf"));
            let (listen, auth) = match secure {
                // tls-replication: the sentinels reach the data nodes (and each other) over TLS.
                Some(secure) => {
                    let ca = |f: &str| secure.ca.dir.path().join(f).display().to_string();
                    let listen = format!(
                        "port 0\ntls-port {port}\ntls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\n\
                         tls-auth-clients no\ntls-replication yes\n",
                        ca("server.pem"),
                        ca("server.key"),
                        ca("ca.pem")
                    );
                    let mut auth = format!("sentinel auth-pass {SENTINEL_MASTER} {}\n", secure.password);
                    if let Some(user) = &secure.user {
                        auth.push_str(&format!("sentinel auth-user {SENTINEL_MASTER} {user}\n"));
                    }
                    (listen, auth)
                }
                None => (format!("port {port}\n"), String::new()),
            };
            // `monitor` before the lines about the master it names.
            std::fs::write(
                &conf,
                format!(
                    "{listen}bind 127.0.0.1\nsentinel monitor {SENTINEL_MASTER} 127.0.0.1 {primary_port} 2\n{auth}\
                     sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\nsentinel failover-timeout {SENTINEL_MASTER} 5000\n\
                     sentinel parallel-syncs {SENTINEL_MASTER} 1\n"
                ),
            )
            .expect("sentinel config");
            let args = vec![conf.display().to_string(), "--sentinel".to_string()];
            let mut sentinel = node(port, args, &sentinel_access);
            sentinel.spawn();
            sentinels.push(sentinel);
        }
        let setup = RedisSentinel { _dir: dir, primary, replica, sentinels };
        setup.wait_replica_synced(&setup.replica);
        setup
    }

    fn wait_replica_synced(&self, replica: &Node) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let info: String =
                redis::cmd("INFO").arg("replication").query(&mut replica.connection()).unwrap_or_default();
            if info.contains("master_link_status:up") {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "the replica did not sync within 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The sentinels' URLs: `rediss://` for a TLS setup (no `#insecure`: the client verifies,
    /// trusting the test CA through `SSL_CERT_FILE`).
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels.iter().map(|n| bare_url(&n.access, n.port)).collect()
    }

    /// The port the sentinels currently name as primary.
    pub fn current_primary(&self) -> u16 {
        for s in &self.sentinels {
            let reply: redis::RedisResult<Vec<String>> =
                redis::cmd("SENTINEL").arg("get-master-addr-by-name").arg(SENTINEL_MASTER).query(&mut s.connection());
            if let Ok(addr) = reply {
                if let Some(port) = addr.get(1).and_then(|p| p.parse().ok()) {
                    return port;
                }
            }
        }
        panic!("no sentinel names a primary");
    }

    pub fn primary_port(&self) -> u16 {
        self.primary.port
    }

    pub fn replica_port(&self) -> u16 {
        self.replica.port
    }

    /// Kills the original primary (SIGKILL).
    pub fn kill_primary(&mut self) {
        self.primary.kill();
    }

    /// A blocking connection to a data node by port.
    pub fn connection(&self, port: u16) -> redis::Connection {
        [&self.primary, &self.replica].into_iter().find(|n| n.port == port).expect("a data node").connection()
    }
}
