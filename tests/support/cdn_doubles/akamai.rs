//! An Akamai Fast Purge v3 double: every request's EdgeGrid signature is checked with the
//! credentials the sink is given (401 otherwise, and for a replayed nonce); `POST
//! /ccu/v3/{invalidate|delete}/{url|tag|cpcode}/{production|staging}` with the documented checks
//! (body at most 50,000 bytes else 413, valid objects else 400 naming the object) and Akamai's
//! own token buckets (requests, and objects per type; a denied request spends nothing), 429
//! `application/problem+json` with `X-Ratelimit-*` when empty or during a storm.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use cdc_invalidator::config::Secret;
use cdc_invalidator::sink::cdn::edgegrid;

use super::{Bucket, Recorded, Reply, Server};

pub const AK_CLIENT_TOKEN: &str = "akab-client-token-xxx-xxxxxxxxxxxxxxxx";
pub const AK_ACCESS_TOKEN: &str = "akab-access-token-xxx-xxxxxxxxxxxxxxxx";
pub const AK_SECRET: &str = "SOYO1PL4hQ+0sMw2dMyqA1d1sqk7dVeUTq5sahhe6rE=";

/// Akamai's documented per-account buckets, configurable for tests.
#[derive(Debug, Clone)]
pub struct AkLimits {
    pub max_body: usize,
    pub requests: Bucket,
    pub urls: Bucket,
    pub tags: Bucket,
    pub cpcodes: Bucket,
}

impl Default for AkLimits {
    fn default() -> Self {
        AkLimits {
            max_body: 50_000,
            requests: Bucket::new(100, 50.0),
            urls: Bucket::new(10_000, 200.0),
            tags: Bucket::new(5_000, 500.0 / 60.0),
            cpcodes: Bucket::new(300, 0.5),
        }
    }
}

/// One accepted purge.
#[derive(Debug, Clone)]
pub struct AkPurge {
    pub action: String,
    pub object_type: String,
    pub network: String,
    pub objects: Vec<serde_json::Value>,
    pub at: Instant,
}

pub struct AkState {
    pub limits: AkLimits,
    pub purges: Vec<AkPurge>,
    /// Every request's arrival time and status.
    pub requests: Vec<(Instant, u16)>,
    /// Until then every request is answered 429 (a storm), without touching the buckets.
    pub storm_until: Option<Instant>,
    /// Objects answered with 400, as Akamai does for an object it cannot purge.
    pub reject: HashSet<String>,
    /// Nonces seen: a replayed request is refused.
    nonces: HashSet<String>,
}

pub struct AkamaiDouble {
    pub server: Server,
    pub state: Arc<Mutex<AkState>>,
}

impl AkamaiDouble {
    pub fn start(limits: AkLimits) -> AkamaiDouble {
        let state = Arc::new(Mutex::new(AkState {
            limits,
            purges: Vec::new(),
            requests: Vec::new(),
            storm_until: None,
            reject: HashSet::new(),
            nonces: HashSet::new(),
        }));
        let s = state.clone();
        let server = Server::start(move |r| akamai(&s, r));
        AkamaiDouble { server, state }
    }

    pub fn base_url(&self) -> String {
        self.server.url()
    }

    pub fn state(&self) -> MutexGuard<'_, AkState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn credentials() -> edgegrid::Credentials {
        edgegrid::Credentials {
            client_token: AK_CLIENT_TOKEN.into(),
            client_secret: Secret::new(AK_SECRET),
            access_token: AK_ACCESS_TOKEN.into(),
        }
    }

    /// Every object purged, as text.
    pub fn purged(&self) -> Vec<String> {
        self.state()
            .purges
            .iter()
            .flat_map(|p| p.objects.iter().map(|o| o.as_str().map(str::to_string).unwrap_or_else(|| o.to_string())))
            .collect()
    }
}

fn problem(status: u16, title: &str, detail: &str, extra: Vec<(String, String)>) -> Reply {
    let mut headers = vec![("Content-Type".to_string(), "application/problem+json".to_string())];
    headers.extend(extra);
    Reply {
        status,
        headers,
        body: serde_json::json!({
            "type": format!("https://problems.purge.akamaiapis.net/-/pep-authn/{status}"),
            "title": title,
            "detail": detail,
            "httpStatus": status,
            "supportId": "17PY1321286429616716-211907680",
        })
        .to_string(),
    }
}

fn akamai(state: &Mutex<AkState>, r: Recorded) -> Reply {
    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
    let reply = akamai_inner(&mut st, &r);
    st.requests.push((Instant::now(), reply.status));
    reply
}

fn akamai_inner(st: &mut AkState, r: &Recorded) -> Reply {
    let host = r.header("host").unwrap_or("").to_string();
    let headers: Vec<(String, String)> = r.headers.clone().into_iter().collect();
    let request = edgegrid::Request {
        method: &r.method,
        scheme: "http",
        host: &host,
        path_and_query: &r.path,
        headers: &headers,
        body: &r.body,
    };
    let settings = edgegrid::Settings::default();
    match crate::support::signatures::edgegrid_verify(
        &AkamaiDouble::credentials(),
        &settings,
        &request,
        SystemTime::now(),
        Duration::from_secs(60),
    ) {
        Ok(auth) => {
            if !st.nonces.insert(auth.nonce) {
                return problem(401, "Not authorized", "The nonce was already used.", vec![]);
            }
        }
        Err(e) => return problem(401, "Not authorized", &format!("The signature does not match: {e}"), vec![]),
    }
    let path = r.path.split('?').next().unwrap_or("");
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let ["ccu", "v3", action, object_type, network] = parts[..] else {
        return problem(404, "Not found", "No such resource.", vec![]);
    };
    if r.method != "POST"
        || !matches!(action, "invalidate" | "delete")
        || !matches!(object_type, "url" | "tag" | "cpcode")
        || !matches!(network, "production" | "staging")
    {
        return problem(404, "Not found", "No such resource.", vec![]);
    }
    if let Some(until) = st.storm_until {
        if Instant::now() < until {
            return rate_limited(1, 0);
        }
    }
    if r.body.len() > st.limits.max_body {
        return problem(413, "Request Entity Too Large", "The request body exceeds 50,000 bytes.", vec![]);
    }
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(&r.body) else {
        return problem(400, "Bad request", "The body is not JSON.", vec![]);
    };
    let Some(objects) = body.get("objects").and_then(|o| o.as_array()).filter(|o| !o.is_empty()) else {
        return problem(400, "Bad request", "`objects` must be a non-empty array.", vec![]);
    };
    for o in objects {
        let ok = match object_type {
            "url" => o.as_str().is_some_and(|s| s.starts_with("http://") || s.starts_with("https://")),
            "cpcode" => o.as_u64().is_some(),
            _ => o.as_str().is_some_and(|s| !s.is_empty() && s.len() <= 128 && !s.contains(char::is_whitespace)),
        };
        let text = o.as_str().map(str::to_string).unwrap_or_else(|| o.to_string());
        if !ok || st.reject.contains(&text) {
            return problem(400, "Bad request", &format!("Invalid {object_type} object: {text}"), vec![]);
        }
    }
    let n = objects.len() as f64;
    let now = Instant::now();
    let limits = &mut st.limits;
    let objects_bucket = match object_type {
        "url" => &mut limits.urls,
        "cpcode" => &mut limits.cpcodes,
        _ => &mut limits.tags,
    };
    // A denied request spends no tokens: both buckets are checked before either is taken from.
    if !objects_bucket.has(n, now) || !limits.requests.has(1.0, now) {
        let objects_left = objects_bucket.available(now).max(0.0) as u64;
        return rate_limited(limits.requests.capacity as u64, objects_left);
    }
    let spent = objects_bucket.take(n, now).and(limits.requests.take(1.0, now));
    assert!(spent.is_ok(), "both buckets were checked just above");
    st.purges.push(AkPurge {
        action: action.to_string(),
        object_type: object_type.to_string(),
        network: network.to_string(),
        objects: objects.clone(),
        at: Instant::now(),
    });
    Reply {
        status: 201,
        headers: vec![("Content-Type".into(), "application/json".into())],
        body: serde_json::json!({
            "httpStatus": 201,
            "detail": "Request accepted",
            "estimatedSeconds": 5,
            "purgeId": format!("edcp-{}", st.purges.len()),
            "supportId": "17PY1321286429616716-211907680",
        })
        .to_string(),
    }
}

fn rate_limited(limit: u64, remaining: u64) -> Reply {
    let mut reply = problem(
        429,
        "Too many requests",
        "The rate limit was exceeded; wait and retry.",
        vec![("X-Ratelimit-Limit".into(), limit.to_string()), ("X-Ratelimit-Remaining".into(), remaining.to_string())],
    );
    reply.body = serde_json::json!({
        "type": "https://problems.purge.akamaiapis.net/-/rate-limit",
        "title": "Too many requests",
        "detail": "The rate limit was exceeded; wait and retry.",
        "rateLimit": limit,
        "rateLimitRemaining": remaining,
        "httpStatus": 429,
    })
    .to_string();
    reply
}
