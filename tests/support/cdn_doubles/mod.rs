//! Local test doubles of the CDN purge APIs (shared/reference/cdn-apis.md): the documented
//! requests, answers, limits and errors (and, for CloudFront and Akamai, signatures), plus fault injection ("storms" of 429 or 503) and a
//! log of every request with the time it arrived, so tests can measure the request rate at the
//! provider's side.
//!
//! Each double is a small HTTP/1.1 server on a free loopback port, running on its own thread
//! and runtime (so it keeps answering whatever the test's runtime is doing); stopped on drop.

pub mod akamai;
pub mod cloudflare;
pub mod cloudfront;
pub mod fastly;
pub mod sts;
pub mod webhook;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// One request as the double saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub at: Instant,
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Lower-case names.
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(&name.to_ascii_lowercase()).map(String::as_str)
    }
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// What to answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn json(status: u16, body: serde_json::Value) -> Reply {
        Reply { status, headers: vec![("content-type".into(), "application/json".into())], body: body.to_string() }
    }
    pub fn text(status: u16, body: &str) -> Reply {
        Reply { status, headers: vec![("content-type".into(), "text/plain".into())], body: body.to_string() }
    }
    pub fn with_header(mut self, name: &str, value: impl ToString) -> Reply {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
}

type Handler = Arc<dyn Fn(Recorded) -> Reply + Send + Sync>;

/// A loopback HTTP server calling `handler` for every request.
pub struct Server {
    pub port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    pub fn start(handler: impl Fn(Recorded) -> Reply + Send + Sync + 'static) -> Server {
        let handler: Handler = Arc::new(handler);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let port = listener.local_addr().expect("local addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("double runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                loop {
                    let (stream, _) = tokio::select! {
                        _ = &mut stop_rx => return,
                        a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                    };
                    let handler = handler.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                            let handler = handler.clone();
                            async move {
                                let (parts, body) = req.into_parts();
                                let body = body.collect().await.map(|b| b.to_bytes().to_vec()).unwrap_or_default();
                                let recorded = Recorded {
                                    at: Instant::now(),
                                    method: parts.method.to_string(),
                                    path: parts.uri.path_and_query().map(|p| p.to_string()).unwrap_or_default(),
                                    headers: parts
                                        .headers
                                        .iter()
                                        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
                                        .collect(),
                                    body,
                                };
                                let reply = handler(recorded);
                                let mut response = Response::new(Full::new(Bytes::from(reply.body)));
                                *response.status_mut() =
                                    hyper::StatusCode::from_u16(reply.status).expect("valid status");
                                for (k, v) in reply.headers {
                                    response.headers_mut().append(
                                        hyper::header::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
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
        });
        Server { port, stop: Some(stop_tx), thread: Some(thread) }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A fault window: every request before `until` gets `status` (429 or 503).
#[derive(Debug, Clone, Copy)]
pub struct Storm {
    pub until: Instant,
    pub status: u16,
}

impl Storm {
    pub fn for_(duration: Duration, status: u16) -> Storm {
        Storm { until: Instant::now() + duration, status }
    }
    pub fn active(&self, now: Instant) -> bool {
        now < self.until
    }
}

/// The provider's own token bucket: a denied request spends no tokens.
#[derive(Debug, Clone)]
pub struct Bucket {
    pub capacity: f64,
    pub per_second: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub fn new(capacity: u32, per_second: f64) -> Bucket {
        Bucket { capacity: capacity as f64, per_second, tokens: capacity as f64, last: Instant::now() }
    }
    /// The tokens there are at `now` (refilled, nothing taken).
    pub fn available(&mut self, now: Instant) -> f64 {
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.per_second).min(self.capacity);
        self.last = now;
        self.tokens
    }
    /// Whether `n` tokens can be taken at `now`, with a small tolerance for timer granularity
    /// between the client's clock and ours.
    pub fn has(&mut self, n: f64, now: Instant) -> bool {
        self.available(now) + 0.05 >= n
    }
    /// Takes `n` tokens if there are; otherwise takes nothing and says how long until there are.
    pub fn take(&mut self, n: f64, now: Instant) -> Result<(), Duration> {
        if self.has(n, now) {
            self.tokens = (self.tokens - n).max(0.0);
            Ok(())
        } else {
            Err(Duration::from_secs_f64((n - self.tokens) / self.per_second))
        }
    }
}

/// The largest number of events within any window of `window` in sorted `times`.
pub fn max_in_window(times: &[Instant], window: Duration) -> usize {
    let mut best = 0;
    let mut start = 0;
    for end in 0..times.len() {
        while times[end].duration_since(times[start]) > window {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

/// A shared, lockable state (std mutex: the handlers are synchronous).
pub type Shared<T> = Arc<Mutex<T>>;

/// Builds a CDN sink from its config (as JSON, the shape of one `sinks.cdn` entry), validated
/// like the daemon does: the test fails on any config problem.
pub fn build_sink(
    config: serde_json::Value,
    metrics: Arc<cdc_invalidator::telemetry::Metrics>,
) -> Arc<dyn cdc_invalidator::sink::Sink> {
    let mut c: cdc_invalidator::sink::cdn::CdnSinkConfig =
        serde_json::from_value(config).expect("a valid CDN sink config");
    let problems = c.validate(std::path::Path::new("/nonexistent/config.yaml"));
    assert!(problems.is_empty(), "config problems: {problems:?}");
    c.build(metrics).expect("the sink builds")
}

/// A file holding `secret` (for `token_file`/`secret_file`), kept alive by the returned dir.
pub fn secret_file(secret: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("secret");
    std::fs::write(&path, format!("{secret}\n")).expect("write secret");
    (dir, path.display().to_string())
}

/// Rewrites `path` with `text` keeping its size (callers pass a text of the same length) and
/// its modification time: a rotation the file's stamp cannot show, so only reading it again
/// after a 401 can find it.
pub fn rewrite_unstamped(path: &str, text: &str) {
    let before = std::fs::metadata(path).unwrap().modified().unwrap();
    std::fs::write(path, text).unwrap();
    std::fs::File::options().write(true).open(path).unwrap().set_modified(before).unwrap();
}

/// Fast retries for tests: outages cost milliseconds, not seconds.
pub fn fast_retry() -> serde_json::Value {
    serde_json::json!({ "initial": "20ms", "max": "200ms" })
}
