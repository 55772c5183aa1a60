//! The connection to a Redis Cluster: the `redis` crate's async cluster client, made on first
//! use and remade after an I/O failure.
//!
//! The crate does the routing: it keeps the slot map, follows `MOVED` (and refreshes the map)
//! and `ASK`, and reconnects to nodes; we only ever hand it commands or pipelines whose keys
//! share one slot (it refuses a cross-slot pipeline, and so does Redis for a multi-key
//! command). Its own retries are kept few: a failover takes seconds (`cluster-node-timeout`
//! plus an election), and waiting for it is the job of our retry policy, which counts, logs and
//! backs off, and gives shutdown a say.

use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::RoutingInfo;
use redis::{ErrorKind, RedisError, Value};
use tokio::sync::Mutex;

use super::connection::{item, CommandError};

/// The crate's own attempts per request (MOVED/ASK redirections and reconnections included).
const CRATE_RETRIES: u32 = 3;

pub(super) struct Cluster {
    client: ClusterClient,
    connection: Mutex<Option<ClusterConnection>>,
    connect_timeout: Duration,
    response_timeout: Duration,
}

impl Cluster {
    /// `seeds`: the seed nodes with the credentials (`endpoints.rs`).
    pub(super) fn new(
        seeds: ClusterClientBuilder,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Result<Cluster, RedisError> {
        let client = seeds
            .connection_timeout(connect_timeout)
            .response_timeout(response_timeout)
            .retries(CRATE_RETRIES)
            .build()?;
        Ok(Cluster { client, connection: Mutex::new(None), connect_timeout, response_timeout })
    }

    async fn get(&self) -> Result<ClusterConnection, CommandError> {
        let mut slot = self.connection.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let connection = match tokio::time::timeout(self.connect_timeout, self.client.get_async_connection()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(cluster_error(e)),
            Err(_) => return Err(CommandError::ConnectTimeout(self.connect_timeout)),
        };
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// After an I/O failure (or a timeout) the next request builds a fresh client connection,
    /// which asks the seeds for the slot map again. Server errors keep it.
    async fn after<T>(&self, result: &Result<T, CommandError>) {
        let reset = match result {
            Err(CommandError::Redis(e)) => matches!(e.kind(), ErrorKind::Io) || e.is_connection_dropped(),
            Err(CommandError::ResponseTimeout(_)) => true,
            _ => false,
        };
        if reset {
            *self.connection.lock().await = None;
        }
    }

    /// Bound on one request: the crate may redirect or reconnect within it.
    fn request_bound(&self) -> Duration {
        self.response_timeout * (CRATE_RETRIES + 1)
    }

    /// A pipeline whose keys all share one slot, in one round trip to that slot's primary.
    pub(super) async fn pipeline(&self, pipe: &redis::Pipeline) -> Result<Vec<Value>, CommandError> {
        let mut connection = self.get().await?;
        let bound = self.request_bound();
        let result = match tokio::time::timeout(bound, connection.req_packed_commands(pipe, 0, pipe.len())).await {
            Ok(Ok(values)) if values.len() == pipe.len() => Ok(values),
            Ok(Ok(values)) => {
                Err(CommandError::UnexpectedReply(format!("{} replies to {} commands", values.len(), pipe.len())))
            }
            Ok(Err(e)) => Err(cluster_error(e)),
            Err(_) => Err(CommandError::ResponseTimeout(bound)),
        };
        self.after(&result).await;
        result
    }

    /// One command, routed by its key (or by the crate's rules for keyless commands).
    pub(super) async fn command(&self, cmd: &redis::Cmd) -> Result<Value, CommandError> {
        let mut connection = self.get().await?;
        let bound = self.request_bound();
        let result = match tokio::time::timeout(bound, connection.req_packed_command(cmd)).await {
            // An error reply may come back as a value: make it an error.
            Ok(Ok(v)) => item(v).map_err(cluster_error),
            Ok(Err(e)) => Err(cluster_error(e)),
            Err(_) => Err(CommandError::ResponseTimeout(bound)),
        };
        self.after(&result).await;
        result
    }

    /// One command sent where `routing` says (every primary, one address).
    pub(super) async fn route(&self, cmd: redis::Cmd, routing: RoutingInfo) -> Result<Value, CommandError> {
        let mut connection = self.get().await?;
        let bound = self.request_bound();
        let result = match tokio::time::timeout(bound, connection.route_command(cmd, routing)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(cluster_error(e)),
            Err(_) => Err(CommandError::ResponseTimeout(bound)),
        };
        self.after(&result).await;
        result
    }
}

/// Errors that say the slot map is moving (a failover, a resharding, slots not covered for a
/// moment) are transient here, whatever they would mean to a standalone client.
pub(super) fn cluster_error(e: RedisError) -> CommandError {
    use redis::ServerErrorKind as S;
    match e.kind() {
        ErrorKind::Server(S::Moved | S::Ask | S::TryAgain | S::ClusterDown | S::MasterDown)
        | ErrorKind::ClusterConnectionNotFound => CommandError::Topology(e),
        _ => CommandError::Redis(e),
    }
}
