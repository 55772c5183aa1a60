//! What `check` and `run` ask the Redis servers before anything starts: whether the deployment
//! is what `sinks.redis.mode` says.
//!
//! A Redis Cluster node behind `mode: standalone` half-works: keys of the node's own slots are
//! unlinked, the others answer `MOVED`, and a tag's members are spread over every slot. So it is
//! refused with exit 2, like any other config error. A server that cannot be reached is not a
//! problem here (the daemon starts while Redis is down, and the sink finds out on the first
//! `MOVED` instead); only a server that answers and says `cluster_enabled:1` is.

use std::path::Path;
use std::time::Duration;

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
    let wanted: Vec<(usize, &RedisConfig)> =
        targets.iter().enumerate().filter(|(_, t)| t.mode != RedisMode::Sentinel).collect();
    if wanted.is_empty() {
        return Vec::new();
    }
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return Vec::new() };
    let doc = std::fs::read_to_string(config_path).ok().and_then(|text| yaml::parse(&text).ok());
    let mut problems = Vec::new();
    for (i, target) in wanted {
        let Some(message) = runtime.block_on(probe(target)) else { continue };
        let idx = i.to_string();
        let field = if target.mode == RedisMode::Cluster { "nodes" } else { "url" };
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

/// One target: `Some(sentence)` when the server answers and contradicts the mode.
async fn probe(target: &RedisConfig) -> Option<String> {
    let (url, mode) = match target.mode {
        RedisMode::Standalone => (target.url()?.expose().to_string(), RedisMode::Standalone),
        RedisMode::Cluster => (target.nodes.first()?.expose().to_string(), RedisMode::Cluster),
        RedisMode::Sentinel => return None,
    };
    let client = redis::Client::open(url.as_str()).ok()?;
    let enabled = tokio::time::timeout(PROBE_TIMEOUT, async {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(PROBE_TIMEOUT))
            .set_response_timeout(Some(PROBE_TIMEOUT));
        let mut connection = client.get_multiplexed_async_connection_with_config(&config).await.ok()?;
        let info: String = redis::cmd("INFO").arg("cluster").query_async(&mut connection).await.ok()?;
        cluster_enabled(&info)
    })
    .await
    .ok()??;
    let name = target.target_name();
    match (mode, enabled) {
        (RedisMode::Standalone, true) => Some(format!(
            "sinks.redis ({name}) has mode: standalone, but its url is a Redis Cluster node (cluster_enabled:1), whose other slots it cannot reach: set mode: cluster and list the cluster's nodes under `nodes`"
        )),
        (RedisMode::Cluster, false) => Some(format!(
            "sinks.redis ({name}) has mode: cluster, but its first node is not a Redis Cluster node (cluster_enabled:0): set mode: standalone with `url`, or list cluster nodes"
        )),
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
