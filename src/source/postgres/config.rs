//! `source.postgres`: where the PostgreSQL source connects, which slot and publication it reads,
//! and its timing knobs.
//!
//! ```yaml
//! source:
//!   kind: postgres
//!   postgres:
//!     url: "postgresql://cdc:secret@db.internal:5432/shop?sslmode=verify-full&sslrootcert=/etc/ca.pem"
//!     slot: cdc_invalidator          # must exist unless create_slot: true
//!     publication: cdc_invalidator   # must exist unless create_publication: true
//! ```
//!
//! The URL is a secret (`url`, `url_env` or `url_file`, exactly one) and is never logged; only
//! its host, port, database and user are. `sslmode` is one of `disable`, `prefer` (the
//! default, as in libpq), `require`, `verify-ca` and `verify-full`; `sslrootcert` names a PEM
//! file of trusted CAs for the verifying modes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::{duration, resolve_secret, Origin, Problem, Secret};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgresql://user:password@host:port/database?sslmode=...`: exactly one of `url`,
    /// `url_env` and `url_file`.
    pub url: Option<Secret>,
    pub url_env: Option<String>,
    pub url_file: Option<PathBuf>,
    /// The logical replication slot (plugin pgoutput). It must exist: a slot created anew
    /// would silently skip every change made while it was gone.
    pub slot: String,
    /// The publication naming the tables to stream.
    pub publication: String,
    /// Create the slot at start when it is missing (off: a missing slot is a fatal error).
    #[serde(default)]
    pub create_slot: bool,
    /// Create the publication `FOR ALL TABLES` at start when it is missing.
    #[serde(default)]
    pub create_publication: bool,
    /// Create the slot as a failover slot (PostgreSQL 17+), which standbys with
    /// `sync_replication_slots = on` keep a copy of: after a promotion the daemon resumes from
    /// it instead of a new slot that skipped every change since its last confirmation. Unset:
    /// on where the server supports it (a 17+ primary). `true` on an older server is a fatal
    /// error at start and at `check --against-db` (the server, not the file, tells the version).
    #[serde(default)]
    pub failover: Option<bool>,
    /// Throttle of standby status updates: a moved confirmed LSN reaches the server within
    /// this interval (and at once on a keepalive that asks for a reply).
    #[serde(default = "default_feedback_interval", with = "duration")]
    pub feedback_interval: Duration,
    /// How often slot figures (lag, retained WAL, `wal_status`) are read for the metrics.
    #[serde(default = "default_status_interval", with = "duration")]
    pub status_interval: Duration,
    /// While another daemon holds the slot (standby), how often to try to take it over.
    #[serde(default = "default_standby_retry", with = "duration")]
    pub standby_retry: Duration,
    /// Reconnect backoff after the stream broke: first wait...
    #[serde(default = "default_reconnect_initial", with = "duration")]
    pub reconnect_initial: Duration,
    /// ...and the longest wait (exponential with full jitter in between).
    #[serde(default = "default_reconnect_max", with = "duration")]
    pub reconnect_max: Duration,
    /// Timeout for connecting and for each SQL statement.
    #[serde(default = "default_connect_timeout", with = "duration")]
    pub connect_timeout: Duration,
    /// Replication messages buffered between the network reader and the source: bounds memory
    /// while the pipeline is full (the reader keeps answering keepalives meanwhile).
    #[serde(default = "default_buffer_messages")]
    pub buffer_messages: usize,
    /// Shown in `pg_stat_replication` / `pg_stat_activity`.
    #[serde(default = "default_application_name")]
    pub application_name: String,
    /// The resolved, parsed URL, filled by validation.
    #[serde(skip)]
    pub connection: Option<Connection>,
}

fn default_feedback_interval() -> Duration {
    Duration::from_millis(100)
}
fn default_status_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_standby_retry() -> Duration {
    Duration::from_secs(2)
}
fn default_reconnect_initial() -> Duration {
    Duration::from_millis(100)
}
fn default_reconnect_max() -> Duration {
    Duration::from_secs(10)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_buffer_messages() -> usize {
    1024
}
fn default_application_name() -> String {
    "cdc-invalidator".into()
}

/// TLS modes, as libpq spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// libpq's `target_session_attrs`: which of several hosts to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TargetSession {
    /// The first host that answers.
    #[default]
    Any,
    /// A primary that accepts writes (not in recovery, `default_transaction_read_only` off).
    ReadWrite,
    /// A primary (not in recovery).
    Primary,
    /// A physical standby (in recovery): decoding on a standby, PostgreSQL 16+.
    Standby,
}

impl std::fmt::Display for TargetSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TargetSession::Any => "any",
            TargetSession::ReadWrite => "read-write",
            TargetSession::Primary => "primary",
            TargetSession::Standby => "standby",
        })
    }
}

/// Where and as whom to connect: the URL, parsed. `Debug` never shows the password.
#[derive(Clone)]
pub struct Connection {
    /// A host name or address, or a socket directory (starting with `/`).
    pub host: String,
    pub port: u16,
    /// Further hosts of a multi-host URL (`host1:5432,host2:5432`), tried in order after the
    /// first; which one is used depends on `target`.
    pub alternates: Vec<(String, u16)>,
    pub target: TargetSession,
    pub user: String,
    pub password: Option<Secret>,
    pub database: String,
    pub ssl_mode: SslMode,
    pub ssl_root_cert: Option<PathBuf>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

impl std::fmt::Display for Connection {
    /// What logs may show: never the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}:{}", self.user, self.host, self.port)?;
        for (host, port) in &self.alternates {
            write!(f, ",{host}:{port}")?;
        }
        write!(f, "/{}", self.database)
    }
}

impl Connection {
    /// One single-host connection per host of the URL, in order.
    pub fn candidates(&self) -> Vec<Connection> {
        std::iter::once((self.host.clone(), self.port))
            .chain(self.alternates.iter().cloned())
            .map(|(host, port)| Connection { host, port, alternates: Vec::new(), ..self.clone() })
            .collect()
    }
}

impl PostgresConfig {
    /// The parsed connection; validation guarantees it is there.
    pub fn connection(&self) -> Option<&Connection> {
        self.connection.as_ref()
    }

    /// Checks the section and parses the URL; `path` is where the section sits in the file.
    pub(crate) fn validate(&mut self, origin: &Origin, problems: &mut Vec<Problem>) {
        let at = |key: &'static str| -> Vec<&'static str> { vec!["source", "postgres", key] };
        let url = resolve_secret(
            origin,
            &at("url"),
            self.url.as_ref(),
            self.url_env.as_deref(),
            self.url_file.as_deref(),
            problems,
        );
        if let Some(url) = url {
            match parse_url(url.expose(), origin.file) {
                Ok(c) => self.connection = Some(c),
                Err(why) => problems.push(origin.problem(&at("url"), format!("source.postgres.url: {why}"))),
            }
        }
        if let Err(why) = check_name(&self.slot, true) {
            problems.push(origin.problem(
                &at("slot"),
                format!("source.postgres.slot {:?} {why} (replication slot names are lower-case letters, digits and underscores)", self.slot),
            ));
        }
        if let Err(why) = check_name(&self.publication, false) {
            problems.push(origin.problem(
                &at("publication"),
                format!(
                    "source.postgres.publication {:?} {why} (use letters, digits and underscores)",
                    self.publication
                ),
            ));
        }
        for (key, value, min) in [
            ("feedback_interval", self.feedback_interval, Duration::from_millis(1)),
            ("status_interval", self.status_interval, Duration::from_millis(100)),
            ("standby_retry", self.standby_retry, Duration::from_millis(10)),
            ("reconnect_initial", self.reconnect_initial, Duration::from_millis(1)),
            ("connect_timeout", self.connect_timeout, Duration::from_millis(100)),
        ] {
            if value < min {
                problems.push(
                    origin.problem(&at(key), format!("source.postgres.{key} must be at least {}ms", min.as_millis())),
                );
            }
        }
        if self.feedback_interval > Duration::from_secs(10) {
            problems.push(origin.problem(
                &at("feedback_interval"),
                "source.postgres.feedback_interval must be at most 10s (the server's wal_sender_timeout is 60s by default)",
            ));
        }
        if self.reconnect_max < self.reconnect_initial {
            problems.push(
                origin
                    .problem(&at("reconnect_max"), "source.postgres.reconnect_max must be at least reconnect_initial"),
            );
        }
        if self.buffer_messages == 0 || self.buffer_messages > 1_000_000 {
            problems.push(
                origin.problem(&at("buffer_messages"), "source.postgres.buffer_messages must be between 1 and 1000000"),
            );
        }
    }
}

impl crate::source::SourceSection for PostgresConfig {
    fn validate(&mut self, origin: &Origin, problems: &mut Vec<Problem>) {
        PostgresConfig::validate(self, origin, problems);
    }

    /// Whole rows, whatever the rules read: column projection is the Kafka source's (its JSON
    /// decoder's, `crate::rules::Projection`).
    fn build(
        &self,
        _queue_capacity: usize,
        _rules: &tokio::sync::watch::Receiver<std::sync::Arc<crate::rules::Rules>>,
        metrics: std::sync::Arc<crate::telemetry::Metrics>,
    ) -> Result<Box<dyn crate::source::Source>, crate::source::SourceError> {
        Ok(Box::new(super::PostgresSource::new(self, metrics)?))
    }

    fn postgres_cluster(&self) -> Option<&Connection> {
        self.connection()
    }
}

/// Slot names: PostgreSQL allows `[a-z0-9_]{1,63}`. Publication names are identifiers; we
/// accept the unquoted kind only, so they can be written into replication commands as they
/// are.
fn check_name(name: &str, slot: bool) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("is empty");
    }
    if name.len() > 63 {
        return Err("is longer than 63 bytes");
    }
    let ok = name
        .chars()
        .all(|c| c.is_ascii_digit() || c == '_' || if slot { c.is_ascii_lowercase() } else { c.is_ascii_alphabetic() });
    if !ok {
        return Err("has characters that are not allowed");
    }
    Ok(())
}

/// Parses `postgres[ql]://[user[:password]@]host[:port][/database][?param=value&...]`.
/// Known parameters: `sslmode`, `sslrootcert` (relative to the config file), `host` (a socket
/// directory), `port`, `user`, `password`, `dbname`; `replication` and `application_name` are
/// ignored (the source sets them). Anything else is an error rather than silently ignored.
pub fn parse_url(url: &str, config_file: &Path) -> Result<Connection, String> {
    let rest = url
        .strip_prefix("postgresql://")
        .or_else(|| url.strip_prefix("postgres://"))
        .ok_or("it must start with postgresql:// or postgres://")?;
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, database) = match rest.split_once('/') {
        Some((a, d)) => (a, Some(decode(d)?)),
        None => (rest, None),
    };
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (mut user, mut password) = match userinfo {
        Some(u) => match u.split_once(':') {
            Some((name, pw)) => (Some(decode(name)?), Some(decode(pw)?)),
            None => (Some(decode(u)?), None),
        },
        None => (None, None),
    };
    let mut hosts = Vec::new();
    for one in hostport.split(',') {
        hosts.push(split_host_port(one)?);
    }
    let (mut host, mut port) = hosts.first().cloned().unwrap_or((None, None));
    let mut target = TargetSession::Any;
    // A `port=` parameter applies to every host that names none (a host's own port only to it).
    let mut port_param = None;
    let mut database = database.filter(|d| !d.is_empty());
    let mut ssl_mode = SslMode::Prefer;
    let mut ssl_root_cert = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = decode(value)?;
        match key {
            "sslmode" => {
                ssl_mode = match value.as_str() {
                    "disable" => SslMode::Disable,
                    "allow" | "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    _ => {
                        return Err(format!(
                            "sslmode {value:?} is not one of disable, prefer, require, verify-ca, verify-full"
                        ))
                    }
                }
            }
            "sslrootcert" => ssl_root_cert = Some(crate::config::relative_to(config_file, Path::new(&value))),
            "host" => host = Some(value),
            "port" => {
                port = Some(value.parse().map_err(|_| format!("port {value:?} is not a port number"))?);
                port_param = port;
            }
            "user" => user = Some(value),
            "password" => password = Some(value),
            "dbname" => database = Some(value),
            "target_session_attrs" => {
                target = match value.as_str() {
                    "any" => TargetSession::Any,
                    "read-write" => TargetSession::ReadWrite,
                    "primary" => TargetSession::Primary,
                    "standby" => TargetSession::Standby,
                    _ => {
                        return Err(format!(
                            "target_session_attrs {value:?} is not one of any, read-write, primary, standby"
                        ))
                    }
                }
            }
            "replication" | "application_name" | "connect_timeout" => {}
            other => return Err(format!("the parameter {other:?} is not supported (supported: sslmode, sslrootcert, host, port, user, password, dbname, target_session_attrs)")),
        }
    }
    let host = host.filter(|h| !h.is_empty()).ok_or("it names no host")?;
    if host.starts_with('/') && matches!(ssl_mode, SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull) {
        return Err("TLS cannot be used over a Unix socket: use a TCP host or sslmode=disable".into());
    }
    let user = user.filter(|u| !u.is_empty()).ok_or("it names no user (postgresql://USER@host/db)")?;
    let mut alternates = Vec::new();
    for (h, p) in hosts.into_iter().skip(1) {
        let h = h.filter(|h| !h.is_empty()).ok_or("a host of the host list is empty")?;
        if h.starts_with('/') {
            return Err("a host list names TCP hosts only".into());
        }
        alternates.push((h, p.or(port_param).unwrap_or(5432)));
    }
    Ok(Connection {
        database: database.unwrap_or_else(|| user.clone()),
        host,
        port: port.unwrap_or(5432),
        alternates,
        target,
        user,
        password: password.map(Secret::new),
        ssl_mode,
        ssl_root_cert,
    })
}

fn split_host_port(s: &str) -> Result<(Option<String>, Option<u16>), String> {
    if s.is_empty() {
        return Ok((None, None));
    }
    // [::1]:5432
    if let Some(v6) = s.strip_prefix('[') {
        let (addr, after) = v6.split_once(']').ok_or("an IPv6 address misses its closing ]")?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().map_err(|_| format!("port {p:?} is not a port number"))?),
            None => None,
        };
        return Ok((Some(addr.to_string()), port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) => {
            Ok((Some(decode(h)?), Some(p.parse().map_err(|_| format!("port {p:?} is not a port number"))?)))
        }
        None => Ok((Some(decode(s)?), None)),
    }
}

/// Percent-decoding (UTF-8).
fn decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            let b = hex.and_then(|h| u8::from_str_radix(h, 16).ok()).ok_or("a % is not followed by two hex digits")?;
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "a percent-encoded part is not UTF-8".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<Connection, String> {
        parse_url(url, Path::new("/etc/cdc/config.yaml"))
    }

    #[test]
    fn full_url() {
        let c = parse("postgresql://cdc:p%40ss@db.internal:6543/shop?sslmode=verify-full&sslrootcert=ca.pem").unwrap();
        assert_eq!(c.host, "db.internal");
        assert_eq!(c.port, 6543);
        assert_eq!(c.user, "cdc");
        assert_eq!(c.password.unwrap().expose(), "p@ss");
        assert_eq!(c.database, "shop");
        assert_eq!(c.ssl_mode, SslMode::VerifyFull);
        assert_eq!(c.ssl_root_cert.unwrap(), Path::new("/etc/cdc/ca.pem"));
    }

    #[test]
    fn defaults_follow_libpq() {
        let c = parse("postgres://app@127.0.0.1").unwrap();
        assert_eq!((c.port, c.database.as_str(), c.ssl_mode), (5432, "app", SslMode::Prefer));
        let c = parse("postgresql://app@[::1]:5433/db?replication=database").unwrap();
        assert_eq!((c.host.as_str(), c.port), ("::1", 5433));
        let c = parse("postgresql://app@/db?host=/var/run/postgresql").unwrap();
        assert_eq!(c.host, "/var/run/postgresql");
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        assert!(parse("mysql://x@h/db").unwrap_err().contains("postgresql://"));
        assert!(parse("postgresql://h/db").unwrap_err().contains("no user"));
        assert!(parse("postgresql://u@h:port/db").unwrap_err().contains("port"));
        assert!(parse("postgresql://u@h/db?sslmode=maybe").unwrap_err().contains("sslmode"));
        assert!(parse("postgresql://u@h/db?frobnicate=1").unwrap_err().contains("frobnicate"));
        assert!(parse("postgresql://u@a,/db").unwrap_err().contains("host list"));
        assert!(parse("postgresql://u@a/db?target_session_attrs=prefer-standby")
            .unwrap_err()
            .contains("target_session_attrs"));
    }

    #[test]
    fn several_hosts_with_target_session_attrs() {
        let c = parse("postgresql://u@a:5433,b,[::1]:7/db?target_session_attrs=read-write").unwrap();
        assert_eq!((c.host.as_str(), c.port), ("a", 5433));
        assert_eq!(c.alternates, vec![("b".to_string(), 5432), ("::1".to_string(), 7)]);
        assert_eq!(c.target, TargetSession::ReadWrite);
        let hosts: Vec<String> = c.candidates().iter().map(|c| format!("{}:{}", c.host, c.port)).collect();
        assert_eq!(hosts, ["a:5433", "b:5432", "::1:7"]);
        assert_eq!(c.to_string(), "u@a:5433,b:5432,::1:7/db");
        assert_eq!(parse("postgresql://u@a/db").unwrap().target, TargetSession::Any);
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("cdc_slot_1", true).is_ok());
        assert!(check_name("Cdc", true).is_err());
        assert!(check_name("Cdc", false).is_ok());
        assert!(check_name("a'b", false).is_err());
        assert!(check_name("", false).is_err());
    }
}
