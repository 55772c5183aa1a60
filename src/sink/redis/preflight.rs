//! What `check` and `run` ask the Redis servers before anything starts: whether the deployment
//! is what `sinks.redis.mode` says.
//!
//! A Redis Cluster node behind `mode: standalone` half-works: keys of the node's own slots are
//! unlinked, the others answer `MOVED`, and a tag's members are spread over every slot. So it is
//! refused with exit 2, like any other config error. A server that cannot be reached is not a
//! problem here (the daemon starts while Redis is down, and the sink finds out on the first
//! `MOVED` instead); only a server that answers and says `cluster_enabled:1` is.
//!
//! A server that answers and refuses our credentials (`WRONGPASS`, `NOAUTH`) is refused the
//! same way, naming where the password was written: at start the config is what is wrong, and
//! exit 2 says so at once instead of a daemon that runs and is never ready. A refusal while
//! running (a password rotated on the server first) is retried instead (`mod.rs`), since
//! invalidations must not be dropped while the two sides are brought in line.

use std::path::Path;
use std::time::Duration;

use super::connection::bad_credentials;
use super::endpoints;
use crate::config::{yaml, Config, Problem, RedisConfig, RedisMode};

/// Bound on connecting to and asking one server.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Problems with the deployments the config names, one per target that is not what its `mode`
/// says. Runs its own small runtime: called before the daemon's.
pub fn check(config_path: &Path, config: &Config) -> Vec<Problem> {
    // On a thread of its own: a caller already inside a runtime could not block on another.
    std::thread::scope(|s| s.spawn(|| check_here(config_path, config)).join().unwrap_or_default())
}

fn check_here(config_path: &Path, config: &Config) -> Vec<Problem> {
    let Some(targets) = &config.sinks.redis else { return Vec::new() };
    let listed = targets.0.len() > 1 || targets.0.first().is_some_and(|t| t.name.is_some());
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return Vec::new() };
    let doc = std::fs::read_to_string(config_path).ok().and_then(|text| yaml::parse(&text).ok());
    let mut problems = Vec::new();
    for (i, target) in targets.iter().enumerate() {
        let Some((field, message)) = runtime.block_on(probe(target)) else { continue };
        let idx = i.to_string();
        let mut path = vec!["sinks", "redis"];
        if listed {
            path.push(&idx);
        }
        path.push(field);
        let location = doc.as_ref().map(|d| d.locate(path.iter().copied()));
        problems.push(Problem { file: config_path.to_path_buf(), location, message });
    }
    problems
}

/// One target: `Some((field, sentence))` when a server answers and contradicts the mode, or
/// refuses the credentials.
async fn probe(target: &RedisConfig) -> Option<(&'static str, String)> {
    let name = target.target_name();
    // Where a refused password was written.
    let credentials_field = if target.password_env.is_some() {
        "password_env"
    } else if target.password_file.is_some() {
        "password_file"
    } else if target.password.is_some() {
        "password"
    } else {
        match target.mode {
            RedisMode::Standalone | RedisMode::Sentinel => "url",
            RedisMode::Cluster => "nodes",
        }
    };
    let refused = |e: &redis::RedisError| {
        bad_credentials(e).then(|| {
            (
                credentials_field,
                format!(
                    "sinks.redis ({name}): Redis refused our credentials ({}): check sinks.redis username and password (or the user:password in the URL)",
                    e.code().unwrap_or("authentication failed")
                ),
            )
        })
    };
    let (client, mode) = match target.mode {
        RedisMode::Standalone => (endpoints::standalone(target).ok()?, RedisMode::Standalone),
        RedisMode::Cluster => (endpoints::first_seed(target).ok()??, RedisMode::Cluster),
        RedisMode::Sentinel => {
            // The sentinels name the master; its handshake says whether it takes our credentials.
            let mut sentinel = endpoints::sentinel(target).ok()?;
            let client = match tokio::time::timeout(PROBE_TIMEOUT, sentinel.async_get_client()).await.ok()? {
                Ok(client) => client,
                Err(e) => return refused(&e),
            };
            (client, RedisMode::Sentinel)
        }
    };
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(PROBE_TIMEOUT))
        .set_response_timeout(Some(PROBE_TIMEOUT));
    let info = tokio::time::timeout(PROBE_TIMEOUT * 2, async {
        let mut connection = client.get_multiplexed_async_connection_with_config(&config).await?;
        redis::cmd("INFO").arg("cluster").query_async::<String>(&mut connection).await
    })
    .await
    .ok()?;
    let enabled = match info {
        Ok(info) => cluster_enabled(&info)?,
        Err(e) => return refused(&e),
    };
    match (mode, enabled) {
        (RedisMode::Standalone, true) => Some(("url", format!(
            "sinks.redis ({name}) has mode: standalone, but its url is a Redis Cluster node (cluster_enabled:1), whose other slots it cannot reach: set mode: cluster and list the cluster's nodes under `nodes`"
        ))),
        (RedisMode::Cluster, false) => Some(("nodes", format!(
            "sinks.redis ({name}) has mode: cluster, but its first node is not a Redis Cluster node (cluster_enabled:0): set mode: standalone with `url`, or list cluster nodes"
        ))),
        _ => None,
    }
}

/// `cluster_enabled:1` / `:0` from `INFO cluster`; `None` if the line is missing.
fn cluster_enabled(info: &str) -> Option<bool> {
    info.lines().find_map(|line| line.trim().strip_prefix("cluster_enabled:")).map(|v| v.trim() == "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cluster_enabled() {
        assert_eq!(cluster_enabled("# Cluster\r\ncluster_enabled:1\r\n"), Some(true));
        assert_eq!(cluster_enabled("# Cluster\r\ncluster_enabled:0\r\n"), Some(false));
        assert_eq!(cluster_enabled(""), None);
    }
}
