//! A Cloudflare purge_cache double: Bearer token checked (403, code 10000), exactly one of
//! `files`, `tags`, `hosts`, `prefixes`, `purge_everything` per request (else 400), at most
//! `max_items` items (else `success:false` code 1107 inside a 200, as Cloudflare sometimes
//! answers), the tag/host/prefix token bucket of the plan and a URL rate, 429 with
//! `Retry-After` when a bucket is empty (a denied request spends nothing), storms, and a
//! "poison" tag answered with `success:false` in a 200.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::json;

use super::{Bucket, Recorded, Reply, Server, Shared, Storm};

pub const TOKEN: &str = "cloudflare-test-token";
pub const ZONE: &str = "023e105f4ecef8ad9ca31a8372d0c353";
/// A tag the double refuses with `success:false` in an HTTP 200.
pub const POISON_TAG: &str = "poison-tag";

#[derive(Debug)]
pub struct State {
    pub storm: Option<Storm>,
    /// Tags, hosts and prefixes: requests.
    pub purge_bucket: Bucket,
    /// Files: URLs.
    pub url_bucket: Bucket,
    pub max_items: usize,
    /// Every request: when, and what we answered.
    pub log: Vec<(Instant, u16)>,
    /// Accepted requests: (when, kind, items).
    pub accepted: Vec<(Instant, String, Vec<String>)>,
}

impl State {
    pub fn items(&self, kind: &str) -> Vec<String> {
        self.accepted.iter().filter(|(_, k, _)| k == kind).flat_map(|(_, _, i)| i.clone()).collect()
    }
}

pub struct CloudflareDouble {
    pub server: Server,
    pub state: Shared<State>,
}

impl CloudflareDouble {
    /// Pro plan: 5 tag requests/s, burst 25; 800 URLs/s.
    pub fn start() -> CloudflareDouble {
        CloudflareDouble::with_buckets(Bucket::new(25, 5.0), Bucket::new(800, 800.0))
    }

    pub fn with_buckets(purge_bucket: Bucket, url_bucket: Bucket) -> CloudflareDouble {
        let state = Arc::new(Mutex::new(State {
            storm: None,
            purge_bucket,
            url_bucket,
            max_items: 100,
            log: Vec::new(),
            accepted: Vec::new(),
        }));
        let s = state.clone();
        let server = Server::start(move |req| {
            let mut st = s.lock().unwrap();
            let reply = handle(&mut st, &req);
            st.log.push((req.at, reply.status));
            reply
        });
        CloudflareDouble { server, state }
    }

    /// The `api` setting for the sink (`.../client/v4`).
    pub fn api(&self) -> String {
        format!("{}/client/v4", self.server.url())
    }
}

fn failure(status: u16, code: i64, message: &str) -> Reply {
    Reply::json(
        status,
        json!({"success": false, "errors": [{"code": code, "message": message}], "messages": [], "result": null}),
    )
}

fn handle(st: &mut State, req: &Recorded) -> Reply {
    if req.header("authorization") != Some(&format!("Bearer {TOKEN}")) {
        return failure(403, 10000, "Authentication error");
    }
    if req.method != "POST" || req.path != format!("/client/v4/zones/{ZONE}/purge_cache") {
        return failure(404, 7003, "Could not route to the requested resource");
    }
    if let Some(storm) = st.storm.filter(|s| s.active(req.at)) {
        let secs = storm.until.saturating_duration_since(req.at).as_secs() + 1;
        return failure(storm.status, 971, "Please wait and consider throttling your request speed")
            .with_header("Retry-After", secs);
    }
    let Some(serde_json::Value::Object(body)) = req.json() else {
        return failure(
            400,
            1012,
            "Request must contain one of \"purge_everything\", \"files\", \"tags\", \"hosts\" or \"prefixes\"",
        );
    };
    let kinds: Vec<&String> = body.keys().collect();
    if kinds.len() != 1 {
        return failure(400, 1012, "Request must contain exactly one purge kind");
    }
    let kind = kinds[0].clone();
    if kind == "purge_everything" {
        return failure(400, 1012, "purge_everything is not allowed in tests");
    }
    if !["files", "tags", "hosts", "prefixes"].contains(&kind.as_str()) {
        return failure(400, 1012, "unknown purge kind");
    }
    let items: Vec<String> = match &body[&kind] {
        serde_json::Value::Array(a) => a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
        _ => return failure(400, 1012, "items must be a list"),
    };
    if items.len() > st.max_items {
        return failure(200, 1107, &format!("Purge request exceeds the {} item limit", st.max_items));
    }
    let (bucket, cost) =
        if kind == "files" { (&mut st.url_bucket, items.len() as f64) } else { (&mut st.purge_bucket, 1.0) };
    if let Err(wait) = bucket.take(cost, req.at) {
        return failure(429, 971, "Rate limited").with_header("Retry-After", wait.as_secs() + 1);
    }
    if items.iter().any(|i| i == POISON_TAG) {
        return failure(200, 1107, "Invalid tag");
    }
    st.accepted.push((req.at, kind, items));
    Reply::json(
        200,
        json!({"success": true, "errors": [], "messages": [], "result": {"id": format!("purge-{}", st.accepted.len())}}),
    )
}
