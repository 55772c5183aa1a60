//! Where a target's connections go and with what credentials and TLS, in one place for every
//! mode, so that the sink and the start-up probe (`preflight.rs`) reach the same servers the
//! same way.
//!
//! - **TLS** comes from the scheme: `rediss://` on the URL, on the cluster seeds (the client
//!   then speaks TLS to every node it learns of from `CLUSTER SLOTS`) or on the sentinels. In
//!   sentinel mode the discovered master is reached with the TLS of `url` if given, else with
//!   the sentinels' own: a deployment that encrypts one almost always encrypts both.
//!   Certificates are verified against the system's trust store, which OpenSSL also reads from
//!   `SSL_CERT_FILE`/`SSL_CERT_DIR` (a private CA); `#insecure` after the URL turns
//!   verification off. The `redis` crate takes a CA per client only with its rustls backend,
//!   and only outside cluster mode with ours (native-tls), so one process-wide way is the only
//!   one that reaches cluster nodes, sentinels and discovered masters alike.
//! - **Credentials** come from `username` and `password`/`password_env`/`password_file` when
//!   given (validation refuses a password given there and in a URL too), else from the URLs.
//!   They are the data nodes' (every cluster node, the master Sentinel names); a sentinel's own
//!   password, if it has one, is in its URL.

use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo, TlsMode};

use super::RedisSinkError;
use crate::config::RedisConfig;

/// The user and password from `username`/`password*` laid over what a URL says.
fn credentials(mut settings: RedisConnectionInfo, config: &RedisConfig) -> RedisConnectionInfo {
    if let Some(user) = &config.username {
        settings = settings.set_username(user);
    }
    if let Some(password) = &config.resolved_password {
        settings = settings.set_password(password.expose());
    }
    settings
}

/// A URL's connection info, its errors in words that never quote it.
fn parse(url: &str) -> Result<ConnectionInfo, RedisSinkError> {
    url.into_connection_info().map_err(|e| super::url_error(&e, url))
}

fn tls_mode(addr: &ConnectionAddr) -> Option<TlsMode> {
    match addr {
        ConnectionAddr::TcpTls { insecure: true, .. } => Some(TlsMode::Insecure),
        ConnectionAddr::TcpTls { .. } => Some(TlsMode::Secure),
        _ => None,
    }
}

/// Standalone: the client for `url`, with the configured credentials.
pub(super) fn standalone(config: &RedisConfig) -> Result<redis::Client, RedisSinkError> {
    let url = config.url().ok_or_else(|| RedisSinkError::InvalidUrl("no URL configured".into()))?.expose();
    let info = parse(url)?;
    let settings = credentials(info.redis_settings().clone(), config);
    redis::Client::open(info.set_redis_settings(settings)).map_err(|e| super::url_error(&e, url))
}

/// Cluster: the seed nodes' connection info and a client builder carrying the credentials
/// (the crate uses them for every node it connects to).
pub(super) fn cluster(config: &RedisConfig) -> Result<redis::cluster::ClusterClientBuilder, RedisSinkError> {
    let mut seeds = Vec::with_capacity(config.nodes.len());
    for node in &config.nodes {
        seeds.push(parse(node.expose())?);
    }
    let mut builder = redis::cluster::ClusterClient::builder(seeds);
    if let Some(user) = &config.username {
        builder = builder.username(user);
    }
    if let Some(password) = &config.resolved_password {
        builder = builder.password(password.expose());
    }
    Ok(builder)
}

/// The first cluster seed as a plain client (the start-up probe asks one node).
pub(super) fn first_seed(config: &RedisConfig) -> Result<Option<redis::Client>, RedisSinkError> {
    let Some(node) = config.nodes.first() else { return Ok(None) };
    let info = parse(node.expose())?;
    let settings = credentials(info.redis_settings().clone(), config);
    redis::Client::open(info.set_redis_settings(settings)).map(Some).map_err(|e| super::url_error(&e, node.expose()))
}

/// Sentinel: a client that asks the sentinels for the master, reaching it with the
/// credentials and database of `url` and `username`/`password*`, and the TLS of `url` or else
/// of the sentinels.
pub(super) fn sentinel(config: &RedisConfig) -> Result<SentinelClient, RedisSinkError> {
    let Some(sentinel) = &config.sentinel else {
        return Err(RedisSinkError::InvalidUrl("mode: sentinel needs sinks.redis.sentinel".into()));
    };
    let mut nodes = Vec::with_capacity(sentinel.nodes.len());
    for n in &sentinel.nodes {
        nodes.push(parse(n.expose())?);
    }
    let (settings, tls) = match config.url() {
        Some(url) => {
            let info = parse(url.expose())?;
            (info.redis_settings().clone(), tls_mode(info.addr()))
        }
        None => (RedisConnectionInfo::default(), nodes.first().and_then(|n| tls_mode(n.addr()))),
    };
    let mut master = SentinelNodeConnectionInfo::default().set_redis_connection_info(credentials(settings, config));
    if let Some(tls) = tls {
        master = master.set_tls_mode(tls);
    }
    SentinelClient::build(nodes, sentinel.master.clone(), Some(master), SentinelServerType::Master)
        .map_err(|e| RedisSinkError::InvalidUrl(format!("sinks.redis.sentinel: {:?}", e.kind())))
}
