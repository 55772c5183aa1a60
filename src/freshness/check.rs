//! The replicas' identities, read at start and by `check --against-db`: each must answer, accept
//! the credentials, be in recovery (a standby) and belong to the source's cluster (same
//! `pg_control_system()` system identifier). With a Kafka source the daemon never connects to
//! the primary, so the replicas can only be compared with each other: that still catches a
//! list that mixes clusters, though not one whose replicas all follow another primary.

use std::time::Duration;

use super::FreshnessError;
use crate::config::freshness::{FreshnessConfig, ReplicaConfig};
use crate::config::postgres::Connection;
use crate::source::postgres::sql;

const APPLICATION_NAME: &str = "cdc-invalidator-freshness";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Checks every replica: at most one problem each. Without `source_system_id` (a Kafka source)
/// each replica's system identifier is compared with the first one read.
pub(super) async fn check_replicas(config: &FreshnessConfig, source_system_id: Option<u64>) -> Vec<FreshnessError> {
    let mut problems = Vec::new();
    let mut first: Option<(&str, u64)> = None;
    for replica in &config.replicas {
        match check_replica(replica, source_system_id).await {
            Err(e) => problems.push(e),
            Ok(Some(id)) if source_system_id.is_none() => match first {
                None => first = Some((replica.name.as_str(), id)),
                Some((other, other_id)) if other_id != id => {
                    problems.push(FreshnessError::OtherClusterThanReplica {
                        replica: replica.described(),
                        target: target(replica),
                        id,
                        other: other.to_string(),
                        other_id,
                    });
                }
                Some(_) => {}
            },
            Ok(_) => {}
        }
    }
    problems
}

/// Checks every replica, for `check --against-db`: one sentence per problem.
pub async fn check_all(config: &FreshnessConfig, source_system_id: Option<u64>) -> Vec<String> {
    check_replicas(config, source_system_id).await.iter().map(ToString::to_string).collect()
}

/// The system identifier of the cluster behind `c` (the source), when it can be read.
pub async fn system_identifier(c: &Connection) -> Option<u64> {
    let client = sql::connect(c, APPLICATION_NAME, CONNECT_TIMEOUT).await.ok()?;
    read_system_identifier(&client).await
}

/// `pg_control_system()` is executable by every role by default, but EXECUTE may have been
/// revoked: then no identifier and no cluster comparison, rather than a replica refused.
async fn read_system_identifier(client: &tokio_postgres::Client) -> Option<u64> {
    let row = client.query_one("SELECT system_identifier::text FROM pg_control_system()", &[]).await.ok()?;
    row.get::<_, Option<String>>(0)?.parse().ok()
}

fn target(replica: &ReplicaConfig) -> String {
    replica.connection.as_ref().map(ToString::to_string).unwrap_or_default()
}

/// One replica: its system identifier when readable, or why it cannot be listed.
async fn check_replica(replica: &ReplicaConfig, source_system_id: Option<u64>) -> Result<Option<u64>, FreshnessError> {
    let Some(c) = replica.connection.as_ref() else { return Ok(None) };
    let client = sql::connect(c, APPLICATION_NAME, CONNECT_TIMEOUT)
        .await
        .map_err(|source| FreshnessError::Connect { replica: replica.described(), source })?;
    let row = client.query_one("SELECT pg_is_in_recovery()", &[]).await.map_err(|e| FreshnessError::Statement {
        replica: replica.described(),
        what: "reading the replica's state",
        reason: sql::describe(&e),
    })?;
    if !row.get::<_, bool>(0) {
        return Err(FreshnessError::NotStandby { replica: replica.described(), target: c.to_string() });
    }
    let id = read_system_identifier(&client).await;
    if let (Some(source_id), Some(id)) = (source_system_id, id) {
        if source_id != id {
            return Err(FreshnessError::OtherCluster {
                replica: replica.described(),
                target: c.to_string(),
                id,
                source_id,
            });
        }
    }
    Ok(id)
}
