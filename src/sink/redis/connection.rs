//! One shared connection to Redis, (re)made on demand, and the errors a round trip can end in.
//!
//! Why not `redis::aio::ConnectionManager`: it only replaces its connection after an I/O error
//! that looks like a dropped connection. A connection whose replies stopped coming (a
//! black-holed network, a frozen server) only ever produces response timeouts and would be kept
//! forever; a failed handshake that is not an I/O error (a wrong password) is cached and handed
//! back to every later call without asking the server again, so fixing the password on the
//! server would never be noticed. Here the rule is simpler: any failed round trip throws the
//! connection away and the next attempt dials again, bounded by `connect_timeout`, then
//! `response_timeout`. Reconnecting is cheap next to a retry's backoff, and it is also what
//! moves us to the new primary after a failover (`READONLY`) behind a DNS name.

use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{AsyncConnectionConfig, ErrorKind, RedisError, ServerErrorKind, Value};
use tokio::sync::Mutex;

use crate::telemetry::events::sink::ErrorClass;

/// A live connection and the generation it belongs to, so that a task holding an old
/// connection cannot throw away a newer one another task has just made.
struct Slot {
    generation: u64,
    connection: MultiplexedConnection,
}

/// How a connection is made: to one address, or to whatever primary Sentinel names right now.
pub(super) enum Dialer {
    Client(redis::Client),
    /// Asked again at every dial: after a failover the old primary answers `READONLY` (or not
    /// at all), the round trip fails, the connection is discarded, and the next dial asks the
    /// sentinels, which name the promoted replica.
    Sentinel(Mutex<redis::sentinel::SentinelClient>),
}

impl Dialer {
    async fn dial(&self, config: &AsyncConnectionConfig) -> Result<MultiplexedConnection, RedisError> {
        match self {
            Dialer::Client(client) => client.get_multiplexed_async_connection_with_config(config).await,
            Dialer::Sentinel(sentinel) => {
                let client = sentinel.lock().await.async_get_client().await?;
                client.get_multiplexed_async_connection_with_config(config).await
            }
        }
    }
}

pub(super) struct Connection {
    client: Dialer,
    config: AsyncConnectionConfig,
    connect_timeout: Duration,
    response_timeout: Duration,
    slot: Mutex<Option<Slot>>,
    /// Generations handed out so far.
    generations: std::sync::atomic::AtomicU64,
}

impl Connection {
    pub(super) fn new(client: Dialer, connect_timeout: Duration, response_timeout: Duration) -> Connection {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(response_timeout));
        Connection {
            client,
            config,
            connect_timeout,
            response_timeout,
            slot: Mutex::new(None),
            generations: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The current connection, dialling (once, within `connect_timeout`) if there is none.
    async fn get(&self, connect_timeout: Duration) -> Result<(u64, MultiplexedConnection), CommandError> {
        let mut slot = self.slot.lock().await;
        if let Some(s) = slot.as_ref() {
            return Ok((s.generation, s.connection.clone()));
        }
        let connect = self.client.dial(&self.config);
        let connection = match tokio::time::timeout(connect_timeout, connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(CommandError::Redis(e)),
            Err(_) => return Err(CommandError::ConnectTimeout(connect_timeout)),
        };
        let generation = self.generations.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        *slot = Some(Slot { generation, connection: connection.clone() });
        Ok((generation, connection))
    }

    /// Forgets the connection of `generation`, if it is still the current one.
    async fn discard(&self, generation: u64) {
        let mut slot = self.slot.lock().await;
        if slot.as_ref().is_some_and(|s| s.generation == generation) {
            *slot = None;
        }
    }

    /// Sends a pipeline in one round trip and returns one reply per command. Server errors of
    /// single commands come back as [`Value::ServerError`] items if the pipeline ignores errors,
    /// as `Err` otherwise. Any failure discards the connection (see the module docs).
    pub(super) async fn round_trip(&self, pipe: &redis::Pipeline) -> Result<Vec<Value>, CommandError> {
        self.round_trip_within(pipe, self.connect_timeout, self.response_timeout).await
    }

    /// [`Connection::round_trip`] with explicit bounds (the readiness probe uses shorter ones).
    pub(super) async fn round_trip_within(
        &self,
        pipe: &redis::Pipeline,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Result<Vec<Value>, CommandError> {
        let (generation, mut connection) = self.get(connect_timeout).await?;
        let reply =
            match tokio::time::timeout(response_timeout, connection.req_packed_commands(pipe, 0, pipe.len())).await {
                Ok(Ok(values)) => Ok(values),
                Ok(Err(e)) => Err(CommandError::Redis(e)),
                Err(_) => Err(CommandError::ResponseTimeout(response_timeout)),
            };
        let reply = reply.and_then(|values| {
            if pipe.len() != values.len() {
                return Err(CommandError::UnexpectedReply(format!(
                    "{} replies to {} commands",
                    values.len(),
                    pipe.len()
                )));
            }
            Ok(values)
        });
        if reply.is_err() {
            self.discard(generation).await;
        }
        reply
    }
}

/// How a failed round trip is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Class {
    /// The server is away, busy, loading, failing over, out of memory...: retry with backoff.
    Transient,
    /// The server refuses our credentials or our ACL user may not run a command. Retried too,
    /// since a fixed password or ACL can be deployed on the server while we wait (and giving up
    /// would drop invalidations), but logged as an error: it needs a human.
    Refused,
    /// Retrying cannot help (an unknown command, a reply we do not understand, a client-side
    /// configuration error): the sink fails.
    Fatal,
}

impl Class {
    /// The `class` of `sink_errors`: `permanent` means "needs a human", whether or not the
    /// sink keeps retrying.
    pub(super) fn report(self) -> ErrorClass {
        match self {
            Class::Transient => ErrorClass::Retriable,
            Class::Refused | Class::Fatal => ErrorClass::Permanent,
        }
    }
}

/// Server error codes that describe a passing state of the server.
const TRANSIENT_CODES: &[&str] = &[
    "LOADING",     // loading its dataset after a restart
    "BUSY",        // another client's script or function is running
    "TRYAGAIN",    // cluster resharding
    "MASTERDOWN",  // a replica lost its primary
    "READONLY",    // we reached a replica, usually right after a failover
    "CLUSTERDOWN", // cluster not serving
    "NOREPLICAS",  // min-replicas-to-write not met
    "MISCONF",     // snapshotting is failing and writes are refused
    "OOM",         // maxmemory reached; deletes free memory as TTLs expire
];

/// Server error codes about who we are.
const REFUSED_CODES: &[&str] = &["NOAUTH", "WRONGPASS", "NOPERM"];

/// Why one round trip failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum CommandError {
    #[error("could not connect within {0:?}")]
    ConnectTimeout(Duration),
    #[error("no reply within {0:?}")]
    ResponseTimeout(Duration),
    #[error("{}", describe(.0))]
    Redis(RedisError),
    #[error("unexpected reply from Redis: {0}")]
    UnexpectedReply(String),
    /// `WAIT` returned before enough replicas acknowledged the batch's deletes.
    #[error("WAIT: {acked} of {wanted} replicas acknowledged within the timeout (sinks.redis.wait_replicas; count: 0 turns it off, for a deployment without replicas)")]
    WaitTimeout { acked: i64, wanted: u32 },
    /// Cluster mode: the slot map moved under us (a redirection the client gave up following,
    /// a node it has no connection to). Passes once the cluster settles.
    #[error("cluster topology is changing: {0}")]
    Topology(RedisError),
}

impl CommandError {
    pub(super) fn class(&self) -> Class {
        match self {
            CommandError::ConnectTimeout(_) | CommandError::ResponseTimeout(_) => Class::Transient,
            CommandError::UnexpectedReply(_) => Class::Fatal,
            CommandError::WaitTimeout { .. } | CommandError::Topology(_) => Class::Transient,
            CommandError::Redis(e) => classify(e),
        }
    }

    /// A short, bounded name for logs: the server's error code or the kind of failure.
    pub(super) fn code(&self) -> &str {
        match self {
            CommandError::ConnectTimeout(_) => "connect_timeout",
            CommandError::ResponseTimeout(_) => "response_timeout",
            CommandError::UnexpectedReply(_) => "unexpected_reply",
            CommandError::WaitTimeout { .. } => "wait_timeout",
            CommandError::Topology(_) => "topology",
            CommandError::Redis(e) => match e.kind() {
                ErrorKind::Io => "io",
                ErrorKind::AuthenticationFailed => "auth",
                ErrorKind::Parse => "protocol",
                _ => e.code().unwrap_or("client"),
            },
        }
    }
}

fn classify(e: &RedisError) -> Class {
    match e.kind() {
        ErrorKind::Io | ErrorKind::Parse => Class::Transient,
        ErrorKind::AuthenticationFailed => Class::Refused,
        // Sentinel could not name a primary right now.
        ErrorKind::MasterNameNotFoundBySentinel | ErrorKind::NoValidReplicasFoundBySentinel => Class::Transient,
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
            | ServerErrorKind::TryAgain
            | ServerErrorKind::MasterDown
            | ServerErrorKind::ReadOnly
            | ServerErrorKind::ClusterDown
            // Only reaches here if the script vanished twice in a row (SCRIPT FLUSH racing us).
            | ServerErrorKind::NoScript,
        ) => Class::Transient,
        ErrorKind::Server(ServerErrorKind::NoPerm) => Class::Refused,
        _ => match e.code() {
            Some(code) if TRANSIENT_CODES.contains(&code) => Class::Transient,
            Some(code) if REFUSED_CODES.contains(&code) => Class::Refused,
            _ => Class::Fatal,
        },
    }
}

/// Whether the server refused who we say we are (not what we may do: `NOPERM` is about the
/// ACL of a command, and a probe may run one the daemon never needs).
pub(super) fn bad_credentials(e: &RedisError) -> bool {
    e.kind() == ErrorKind::AuthenticationFailed || matches!(e.code(), Some("WRONGPASS" | "NOAUTH"))
}

/// Whether an error says the server is a Redis Cluster node (reached in standalone mode).
pub(super) fn means_cluster(e: &RedisError) -> bool {
    matches!(e.kind(), ErrorKind::Server(ServerErrorKind::Moved | ServerErrorKind::Ask | ServerErrorKind::CrossSlot))
        || e.to_string().contains("non local key")
}

/// The error in words, with a hint where the fix is on our side.
fn describe(e: &RedisError) -> String {
    if means_cluster(e) {
        return format!(
            "Redis answered as a Redis Cluster node ({}): set sinks.redis.mode: cluster and list the cluster's nodes under sinks.redis.nodes",
            e.code().unwrap_or("cluster error")
        );
    }
    match classify(e) {
        Class::Refused => format!(
            "Redis refused our credentials or permissions ({e}): check the user and password in sinks.redis.url and the ACL of that user (it needs UNLINK, EVALSHA, SCRIPT LOAD and PING; with wait_replicas also WAIT and ROLE; in cluster mode also SCAN, SREM, SRANDMEMBER and CLUSTER; with broadcast PUBLISH, or SPUBLISH in cluster mode; with warm XADD)"
        ),
        _ => e.to_string(),
    }
}

/// Turns an item of an error-ignoring pipeline into a result.
pub(super) fn item(value: Value) -> Result<Value, RedisError> {
    match value {
        Value::ServerError(e) => Err(e.into()),
        v => Ok(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error reply as the client parses it off the wire.
    fn server(code: &str, detail: &str) -> CommandError {
        let wire = format!("-{code} {detail}\r\n");
        match redis::parse_redis_value(wire.as_bytes()) {
            Ok(value) => CommandError::Redis(item(value).expect_err("an error reply")),
            Err(e) => CommandError::Redis(e),
        }
    }

    #[test]
    fn passing_server_states_are_transient() {
        for code in ["LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN", "READONLY", "OOM", "MISCONF", "NOREPLICAS"] {
            assert_eq!(server(code, "whatever").class(), Class::Transient, "{code}");
        }
        let io = CommandError::Redis(std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into());
        assert_eq!(io.class(), Class::Transient);
        assert_eq!(io.code(), "io");
        assert_eq!(CommandError::ResponseTimeout(Duration::from_secs(1)).class(), Class::Transient);
        assert_eq!(CommandError::ConnectTimeout(Duration::from_secs(1)).class(), Class::Transient);
    }

    #[test]
    fn credentials_are_refused_with_a_hint() {
        let wrong = server("WRONGPASS", "invalid username-password pair or user is disabled.");
        assert_eq!(wrong.class(), Class::Refused);
        assert_eq!(wrong.class().report(), ErrorClass::Permanent);
        assert!(wrong.to_string().contains("check the user and password in sinks.redis.url"), "{wrong}");
        let failed = CommandError::Redis((ErrorKind::AuthenticationFailed, "Password authentication failed").into());
        assert_eq!(failed.class(), Class::Refused);
        assert_eq!(failed.code(), "auth");
        assert_eq!(server("NOAUTH", "Authentication required.").class(), Class::Refused);
        assert_eq!(server("NOPERM", "User u has no permissions to run the 'unlink' command").class(), Class::Refused);
    }

    #[test]
    fn unknown_errors_are_fatal() {
        assert_eq!(server("ERR", "unknown command 'UNLINK'").class(), Class::Fatal);
        assert_eq!(CommandError::UnexpectedReply("x".into()).class(), Class::Fatal);
    }
}
