//! A Fastly purge API double: `Fastly-Key` checked, bulk purge by `{"surrogate_keys":[…]}` or
//! `Surrogate-Key` header (at most 256 keys, each at most 1 KB, else 400), single-key purge,
//! URL purge, `Fastly-Soft-Purge`, 404 for another service, and 429 with
//! `Fastly-RateLimit-Reset` during a storm or when its own bucket (optional) is empty.

use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;

use super::{Bucket, Recorded, Reply, Server, Shared, Storm};

pub const TOKEN: &str = "fastly-test-token";
pub const SERVICE: &str = "SU1Z0isxPaozGVKXdv0eY";

#[derive(Debug, Default)]
pub struct State {
    pub storm: Option<Storm>,
    pub bucket: Option<Bucket>,
    /// Every request: when, and what we answered.
    pub log: Vec<(Instant, u16)>,
    /// Keys purged (accepted), in order, with the soft flag.
    pub keys: Vec<(String, bool)>,
    /// URLs purged (scheme-less, as in the path).
    pub urls: Vec<String>,
    /// Keys per accepted bulk request.
    pub bulk_sizes: Vec<usize>,
    /// Keys answered with a 400 (as Fastly does for an invalid key).
    pub refuse: Vec<String>,
    /// The token accepted, when not [`TOKEN`] (a rotation at Fastly's side).
    pub accepted_token: Option<String>,
}

pub struct FastlyDouble {
    pub server: Server,
    pub state: Shared<State>,
}

impl FastlyDouble {
    pub fn start() -> FastlyDouble {
        let state: Shared<State> = Arc::new(Mutex::new(State::default()));
        let s = state.clone();
        let server = Server::start(move |req| {
            let mut st = s.lock().unwrap();
            let reply = handle(&mut st, &req);
            st.log.push((req.at, reply.status));
            reply
        });
        FastlyDouble { server, state }
    }

    pub fn api(&self) -> String {
        self.server.url()
    }

    pub fn purged_keys(&self) -> Vec<String> {
        self.state.lock().unwrap().keys.iter().map(|(k, _)| k.clone()).collect()
    }
}

fn reset_in(now: Instant, until: Instant) -> u64 {
    let epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    (epoch + until.saturating_duration_since(now)).as_secs() + 1
}

fn handle(st: &mut State, req: &Recorded) -> Reply {
    if req.method != "POST" {
        return Reply::json(405, json!({"msg": "Method not allowed"}));
    }
    if req.header("fastly-key") != Some(st.accepted_token.as_deref().unwrap_or(TOKEN)) {
        return Reply::json(401, json!({"msg": "Provided credentials are missing or invalid"}));
    }
    if let Some(storm) = st.storm.filter(|s| s.active(req.at)) {
        let reply = Reply::json(storm.status, json!({"msg": "slow down"}));
        return if storm.status == 429 {
            reply
                .with_header("Fastly-RateLimit-Remaining", 0)
                .with_header("Fastly-RateLimit-Reset", reset_in(req.at, storm.until))
        } else {
            reply
        };
    }
    if let Some(bucket) = st.bucket.as_mut() {
        if let Err(wait) = bucket.take(1.0, req.at) {
            return Reply::json(429, json!({"msg": "Too many requests"}))
                .with_header("Fastly-RateLimit-Remaining", 0)
                .with_header("Fastly-RateLimit-Reset", reset_in(req.at, req.at + wait));
        }
    }
    let soft = req.header("fastly-soft-purge") == Some("1");
    if let Some(url) = req.path.strip_prefix("/purge/") {
        // A URL purge: the purged URL, query included, without its scheme.
        st.urls.push(url.to_string());
        return Reply::json(200, json!({"status": "ok", "id": format!("u-{}", st.urls.len())}));
    }
    let path = req.path.split('?').next().unwrap_or("");
    let Some(rest) = path.strip_prefix("/service/") else {
        return Reply::json(404, json!({"msg": "Record not found"}));
    };
    let (service, tail) = rest.split_once('/').unwrap_or((rest, ""));
    if service != SERVICE {
        return Reply::json(404, json!({"msg": "Record not found", "detail": "Cannot find service"}));
    }
    if tail == "purge_all" {
        return Reply::json(400, json!({"msg": "purge_all is not allowed in tests"}));
    }
    let keys: Vec<String> = if let Some(key) = tail.strip_prefix("purge/") {
        vec![key.to_string()]
    } else if tail == "purge" {
        if let Some(h) = req.header("surrogate-key") {
            h.split(' ').filter(|k| !k.is_empty()).map(str::to_string).collect()
        } else {
            match req.json().and_then(|v| v.get("surrogate_keys").cloned()) {
                Some(serde_json::Value::Array(a)) => a.iter().filter_map(|k| k.as_str().map(str::to_string)).collect(),
                _ => return Reply::json(400, json!({"msg": "Bad request", "detail": "surrogate_keys missing"})),
            }
        }
    } else {
        return Reply::json(404, json!({"msg": "Record not found"}));
    };
    if keys.len() > 256 {
        return Reply::json(400, json!({"msg": "Bad request", "detail": "too many keys (256 at most)"}));
    }
    if let Some(k) = keys.iter().find(|k| k.len() > 1024 || st.refuse.contains(k)) {
        return Reply::json(400, json!({"msg": "Bad request", "detail": format!("invalid surrogate key {k}")}));
    }
    st.bulk_sizes.push(keys.len());
    let mut answer = serde_json::Map::new();
    for k in keys {
        answer.insert(k.clone(), json!(format!("p-{}", st.keys.len())));
        st.keys.push((k, soft));
    }
    Reply::json(200, serde_json::Value::Object(answer))
}
