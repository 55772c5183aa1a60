//! Local test doubles of the signed CDN APIs, on loopback HTTP servers: Amazon CloudFront's
//! invalidation API (SigV4) and Akamai Fast Purge v3 (EdgeGrid). Each verifies the request's
//! signature with the same credentials the sink is given, enforces the documented limits and
//! answers with the documented shapes and errors (shared/reference/cdn-apis.md), and records
//! what it accepted for the tests to check.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use cdc_invalidator::config::Secret;
use cdc_invalidator::sink::cdn::{edgegrid, sigv4};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// A request as the double saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    /// As on the wire (percent-encoded).
    pub path: String,
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// A loopback HTTP server answering with `handler`; stopped on drop.
struct Server {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(handler: Arc<dyn Fn(Received) -> Reply + Send + Sync>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let handler = handler.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.map(|b| b.to_bytes().to_vec()).unwrap_or_default();
                        let received = Received {
                            method: parts.method.as_str().to_string(),
                            path: parts.uri.path().to_string(),
                            query: parts.uri.query().unwrap_or("").to_string(),
                            headers: parts
                                .headers
                                .iter()
                                .map(|(n, v)| {
                                    (n.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned())
                                })
                                .collect(),
                            body,
                        };
                        let reply = handler(received);
                        let mut response = Response::new(Full::new(Bytes::from(reply.body)));
                        *response.status_mut() = hyper::StatusCode::from_u16(reply.status).expect("status");
                        for (n, v) in reply.headers {
                            response.headers_mut().append(
                                hyper::header::HeaderName::from_bytes(n.as_bytes()).expect("header name"),
                                hyper::header::HeaderValue::from_str(&v).expect("header value"),
                            );
                        }
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    Server { addr, task }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------------------------
// CloudFront
// ---------------------------------------------------------------------------------------------

pub const CF_DISTRIBUTION: &str = "EDFDVBD6EXAMPLE";
pub const CF_KEY_ID: &str = "AKIDEXAMPLE";
pub const CF_SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

#[derive(Debug, Clone)]
pub struct CfInvalidation {
    pub id: String,
    pub caller_reference: String,
    pub paths: Vec<String>,
    pub created: Instant,
}

/// One CreateInvalidation call and the error code it got (`None`: created or returned).
#[derive(Debug, Clone)]
pub struct CfCall {
    pub caller_reference: String,
    pub paths: Vec<String>,
    pub code: Option<String>,
}

pub struct CfState {
    pub invalidations: Vec<CfInvalidation>,
    pub calls: Vec<CfCall>,
    /// Status GETs served.
    pub status_reads: usize,
    /// Signature failures answered with 403.
    pub denied: usize,
    /// Highest paths and wildcards in progress at once.
    pub peak_paths: usize,
    pub peak_wildcards: usize,
    /// Answers to lose: the invalidation is created but the client gets a 503 (as when a
    /// response is lost on the way back).
    pub lose_answers: usize,
}

pub struct CloudFrontDouble {
    server: Server,
    pub state: Arc<Mutex<CfState>>,
}

/// Documented limits, configurable for tests.
#[derive(Debug, Clone, Copy)]
pub struct CfLimits {
    pub max_paths: usize,
    pub max_wildcards: usize,
    pub max_batch: usize,
    /// An invalidation is `Completed` this long after it was created.
    pub complete_after: Duration,
}

impl Default for CfLimits {
    fn default() -> Self {
        CfLimits { max_paths: 3_000, max_wildcards: 15, max_batch: 3_000, complete_after: Duration::from_millis(300) }
    }
}

impl CloudFrontDouble {
    pub async fn start(limits: CfLimits) -> CloudFrontDouble {
        let state = Arc::new(Mutex::new(CfState {
            invalidations: Vec::new(),
            calls: Vec::new(),
            status_reads: 0,
            denied: 0,
            peak_paths: 0,
            peak_wildcards: 0,
            lose_answers: 0,
        }));
        let s = state.clone();
        let server = serve(Arc::new(move |r| cloudfront(&s, limits, r))).await;
        CloudFrontDouble { server, state }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.server.addr)
    }

    pub fn state(&self) -> MutexGuard<'_, CfState> {
        lock(&self.state)
    }

    pub fn credentials() -> sigv4::Credentials {
        sigv4::Credentials {
            access_key_id: CF_KEY_ID.into(),
            secret_access_key: Secret::new(CF_SECRET),
            session_token: None,
        }
    }
}

fn cf_error(status: u16, code: &str, message: &str) -> Reply {
    Reply {
        status,
        headers: vec![("Content-Type".into(), "text/xml".into())],
        body: format!(
            "<?xml version=\"1.0\"?><ErrorResponse xmlns=\"http://cloudfront.amazonaws.com/doc/2020-05-31/\"><Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error><RequestId>req-1</RequestId></ErrorResponse>"
        ),
    }
}

fn cf_invalidation(inv: &CfInvalidation, status: &str) -> String {
    let items: String = inv.paths.iter().map(|p| format!("<Path>{}</Path>", xml_escape(p))).collect();
    format!(
        "<?xml version=\"1.0\"?><Invalidation xmlns=\"http://cloudfront.amazonaws.com/doc/2020-05-31/\"><Id>{}</Id><Status>{status}</Status><CreateTime>2026-01-01T00:00:00Z</CreateTime><InvalidationBatch><Paths><Quantity>{}</Quantity><Items>{items}</Items></Paths><CallerReference>{}</CallerReference></InvalidationBatch></Invalidation>",
        inv.id,
        inv.paths.len(),
        xml_escape(&inv.caller_reference)
    )
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn xml_all(doc: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = doc;
    while let Some(start) = rest.find(&open) {
        let after = &rest[start + open.len()..];
        let Some(end) = after.find(&close) else { break };
        out.push(after[..end].replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"));
        rest = &after[end + close.len()..];
    }
    out
}

fn cloudfront(state: &Mutex<CfState>, limits: CfLimits, r: Received) -> Reply {
    let decoded = String::from_utf8_lossy(&sigv4::percent_decode(&r.path)).into_owned();
    if let Err(e) = sigv4::verify(
        &CloudFrontDouble::credentials(),
        "us-east-1",
        "cloudfront",
        &r.method,
        &decoded,
        &r.query,
        &r.headers,
        &r.body,
    ) {
        lock(state).denied += 1;
        return cf_error(403, "AccessDenied", &format!("Access denied: {e}"));
    }
    let prefix = format!("/2020-05-31/distribution/{CF_DISTRIBUTION}/invalidation");
    let Some(rest) = decoded.strip_prefix(&prefix) else {
        return cf_error(404, "NoSuchDistribution", "The specified distribution does not exist.");
    };
    let mut st = lock(state);
    let completed = |inv: &CfInvalidation| inv.created.elapsed() >= limits.complete_after;
    match (r.method.as_str(), rest) {
        ("GET", id) if id.starts_with('/') => {
            st.status_reads += 1;
            match st.invalidations.iter().find(|i| i.id == id[1..]) {
                Some(inv) => Reply {
                    status: 200,
                    headers: vec![("Content-Type".into(), "text/xml".into())],
                    body: cf_invalidation(inv, if completed(inv) { "Completed" } else { "InProgress" }),
                },
                None => cf_error(404, "NoSuchInvalidation", "The specified invalidation does not exist."),
            }
        }
        ("POST", "") => {
            let body = String::from_utf8_lossy(&r.body).into_owned();
            if body.trim().is_empty() {
                return cf_error(400, "MissingBody", "This operation requires a body.");
            }
            let reference = xml_all(&body, "CallerReference").into_iter().next().unwrap_or_default();
            let quantity: Option<usize> = xml_all(&body, "Quantity").first().and_then(|q| q.parse().ok());
            let paths = xml_all(&body, "Path");
            let mut call = CfCall { caller_reference: reference.clone(), paths: paths.clone(), code: None };
            let reply = (|| {
                if reference.is_empty() {
                    return Err(cf_error(400, "InvalidArgument", "CallerReference is required."));
                }
                if quantity != Some(paths.len()) {
                    return Err(cf_error(
                        400,
                        "InconsistentQuantities",
                        "Quantity does not match the number of items.",
                    ));
                }
                if paths.is_empty() {
                    return Err(cf_error(400, "InvalidArgument", "At least one path is required."));
                }
                for p in &paths {
                    if !p.starts_with('/') || p.find('*').is_some_and(|i| i != p.len() - 1) || p.contains(' ') {
                        return Err(cf_error(400, "InvalidArgument", &format!("Invalid path: {p}")));
                    }
                }
                if paths.len() > limits.max_batch {
                    return Err(cf_error(413, "BatchTooLarge", "Invalidation batch specified is too large."));
                }
                if let Some(existing) = st.invalidations.iter().find(|i| i.caller_reference == reference) {
                    if existing.paths == paths {
                        let status = if completed(existing) { "Completed" } else { "InProgress" };
                        return Ok((existing.clone(), status));
                    }
                    return Err(cf_error(
                        409,
                        "InvalidationBatchAlreadyExists",
                        "The CallerReference is already in use with other paths.",
                    ));
                }
                let in_progress: Vec<&CfInvalidation> = st.invalidations.iter().filter(|i| !completed(i)).collect();
                let count = |inv: &[String], wild: bool| inv.iter().filter(|p| p.ends_with('*') == wild).count();
                let used_paths: usize = in_progress.iter().map(|i| count(&i.paths, false)).sum();
                let used_wild: usize = in_progress.iter().map(|i| count(&i.paths, true)).sum();
                let (new_paths, new_wild) = (count(&paths, false), count(&paths, true));
                if used_paths + new_paths > limits.max_paths || used_wild + new_wild > limits.max_wildcards {
                    return Err(cf_error(
                        400,
                        "TooManyInvalidationsInProgress",
                        "Processing your request will cause you to exceed the maximum number of in-progress invalidations.",
                    ));
                }
                let inv = CfInvalidation {
                    id: format!("I{:013}", st.invalidations.len() + 1),
                    caller_reference: reference.clone(),
                    paths: paths.clone(),
                    created: Instant::now(),
                };
                st.invalidations.push(inv.clone());
                st.peak_paths = st.peak_paths.max(used_paths + new_paths);
                st.peak_wildcards = st.peak_wildcards.max(used_wild + new_wild);
                Ok((inv, "InProgress"))
            })();
            let reply = match reply {
                Ok((inv, status)) => {
                    if st.lose_answers > 0 {
                        st.lose_answers -= 1;
                        call.code = Some("lost".into());
                        st.calls.push(call);
                        return cf_error(503, "ServiceUnavailable", "The answer was lost.");
                    }
                    Reply {
                        status: 201,
                        headers: vec![
                            ("Content-Type".into(), "text/xml".into()),
                            ("Location".into(), format!("https://cloudfront.amazonaws.com{prefix}/{}", inv.id)),
                        ],
                        body: cf_invalidation(&inv, status),
                    }
                }
                Err(reply) => {
                    call.code = xml_all(&reply.body, "Code").into_iter().next();
                    reply
                }
            };
            st.calls.push(call);
            reply
        }
        _ => cf_error(400, "InvalidArgument", "Unsupported operation."),
    }
}

// ---------------------------------------------------------------------------------------------
// Akamai Fast Purge v3
// ---------------------------------------------------------------------------------------------

pub const AK_CLIENT_TOKEN: &str = "akab-client-token-xxx-xxxxxxxxxxxxxxxx";
pub const AK_ACCESS_TOKEN: &str = "akab-access-token-xxx-xxxxxxxxxxxxxxxx";
pub const AK_SECRET: &str = "SOYO1PL4hQ+0sMw2dMyqA1d1sqk7dVeUTq5sahhe6rE=";

/// A token bucket as Akamai runs it: a denied request spends nothing.
#[derive(Debug, Clone)]
pub struct Bucket {
    capacity: f64,
    per_second: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub fn new(capacity: f64, per_second: f64) -> Bucket {
        Bucket { capacity, per_second, tokens: capacity, last: Instant::now() }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.per_second).min(self.capacity);
        self.last = now;
    }
}

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
            requests: Bucket::new(100.0, 50.0),
            urls: Bucket::new(10_000.0, 200.0),
            tags: Bucket::new(5_000.0, 500.0 / 60.0),
            cpcodes: Bucket::new(300.0, 0.5),
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
    server: Server,
    pub state: Arc<Mutex<AkState>>,
}

impl AkamaiDouble {
    pub async fn start(limits: AkLimits) -> AkamaiDouble {
        let state = Arc::new(Mutex::new(AkState {
            limits,
            purges: Vec::new(),
            requests: Vec::new(),
            storm_until: None,
            reject: HashSet::new(),
            nonces: HashSet::new(),
        }));
        let s = state.clone();
        let server = serve(Arc::new(move |r| akamai(&s, r))).await;
        AkamaiDouble { server, state }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.server.addr)
    }

    pub fn state(&self) -> MutexGuard<'_, AkState> {
        lock(&self.state)
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

fn akamai(state: &Mutex<AkState>, r: Received) -> Reply {
    let mut st = lock(state);
    let reply = akamai_inner(&mut st, &r);
    st.requests.push((Instant::now(), reply.status));
    reply
}

fn akamai_inner(st: &mut AkState, r: &Received) -> Reply {
    let host = r.header("host").unwrap_or("").to_string();
    let path_and_query = if r.query.is_empty() { r.path.clone() } else { format!("{}?{}", r.path, r.query) };
    let request = edgegrid::Request {
        method: &r.method,
        scheme: "http",
        host: &host,
        path_and_query: &path_and_query,
        headers: &r.headers,
        body: &r.body,
    };
    let settings = edgegrid::Settings::default();
    match edgegrid::verify(
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
    let parts: Vec<&str> = r.path.trim_start_matches('/').split('/').collect();
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
    let limits = &mut st.limits;
    limits.requests.refill();
    let objects_bucket = match object_type {
        "url" => &mut limits.urls,
        "cpcode" => &mut limits.cpcodes,
        _ => &mut limits.tags,
    };
    objects_bucket.refill();
    let objects_left = objects_bucket.tokens;
    if limits.requests.tokens < 1.0 || objects_left < n {
        // A denied request spends no tokens.
        return rate_limited(limits.requests.capacity as u64, objects_left.max(0.0) as u64);
    }
    limits.requests.tokens -= 1.0;
    match object_type {
        "url" => limits.urls.tokens -= n,
        "cpcode" => limits.cpcodes.tokens -= n,
        _ => limits.tags.tokens -= n,
    }
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
