//! The HTTP endpoint on `metrics.listen`: `/metrics` (Prometheus text format), `/healthz` (the
//! process is alive and its pipeline task runs) and `/readyz` (the source is assigned and every
//! sink answers).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::Metrics;
use crate::shutdown::Shutdown;

/// Liveness and readiness, set by the pipeline and the sink pinger.
#[derive(Debug, Default)]
pub struct Health {
    /// The pipeline task is running (cleared when it stops).
    pub alive: AtomicBool,
    /// Every sink answered its last ping.
    pub sinks_ready: AtomicBool,
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {addr} (metrics.listen): {error}")]
    Bind { addr: SocketAddr, error: std::io::Error },
}

/// Binds now (so a taken port is an error at start), serves until shutdown stops intake... and
/// a little longer: the server stays up until the returned task is dropped, so the final
/// metrics can still be scraped during the drain.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: Shutdown,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), HttpError> {
    let listener = TcpListener::bind(addr).await.map_err(|error| HttpError::Bind { addr, error })?;
    let local = listener.local_addr().map_err(|error| HttpError::Bind { addr, error })?;
    let task = tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = shutdown.abandoned() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics server accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let metrics = metrics.clone();
            let health = health.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let metrics = metrics.clone();
                    let health = health.clone();
                    async move { Ok::<_, Infallible>(respond(&req, &metrics, &health)) }
                });
                // Scrapers that hang up early are not our problem.
                let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    Ok((local, task))
}

fn respond<B>(req: &Request<B>, metrics: &Metrics, health: &Health) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String, content_type: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
        r
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into(), "text/plain; charset=utf-8");
    }
    match req.uri().path() {
        // Labels never carry a secret by design; scrubbing is the second line of defence.
        "/metrics" => text(
            StatusCode::OK,
            crate::redact::scrub(&metrics.render()).into_owned(),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        "/healthz" => {
            if health.alive.load(Ordering::Relaxed) {
                text(StatusCode::OK, "ok\n".into(), "text/plain; charset=utf-8")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "pipeline stopped\n".into(), "text/plain; charset=utf-8")
            }
        }
        "/readyz" => {
            let source = metrics.source_ready.get() > 0;
            let sinks = health.sinks_ready.load(Ordering::Relaxed);
            if source && sinks && health.alive.load(Ordering::Relaxed) {
                text(StatusCode::OK, "ready\n".into(), "text/plain; charset=utf-8")
            } else {
                let mut why = Vec::new();
                if !source {
                    why.push("source not assigned");
                }
                if !sinks {
                    why.push("a sink does not answer");
                }
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {}\n", why.join(", ")),
                    "text/plain; charset=utf-8",
                )
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz or /readyz\n".into(),
            "text/plain; charset=utf-8",
        ),
    }
}
