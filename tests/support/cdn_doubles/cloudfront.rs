//! An Amazon CloudFront invalidation API double (API 2020-05-31): every request's SigV4
//! signature is checked with the access key it names, among the keys the double accepts
//! (403 `InvalidClientTokenId` for an unknown key, `ExpiredToken` for temporary credentials
//! past their expiration, `AccessDenied` for a wrong signature or a session token that is
//! missing or not signed);
//! CreateInvalidation with the documented checks (`CallerReference` required and idempotent,
//! `Quantity` consistent, valid paths, batch size) and limits (3,000 paths and 15 wildcards in
//! progress, else 400 `TooManyInvalidationsInProgress`); GetInvalidation answering `InProgress`
//! until `complete_after`, then `Completed`. Answers can be "lost" (created, but 503 returned).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use cdc_invalidator::config::Secret;
use cdc_invalidator::sink::cdn::cloudfront::{xml_all, xml_escape};
use cdc_invalidator::sink::cdn::sigv4;

use super::{Recorded, Reply, Server};

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

/// An access key the double accepts; temporary ones (from the STS double) carry a session
/// token that must be sent and signed, and expire.
#[derive(Debug, Clone)]
pub struct CfKey {
    pub credentials: sigv4::Credentials,
    pub expires: Option<SystemTime>,
}

pub struct CfState {
    /// The keys accepted now (tests replace them to rotate).
    pub keys: Vec<CfKey>,
    /// Access key ids of the requests that passed the signature check, in order.
    pub signed_by: Vec<String>,
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
    pub server: Server,
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
    pub fn start(limits: CfLimits) -> CloudFrontDouble {
        let state = Arc::new(Mutex::new(CfState {
            keys: vec![CfKey { credentials: CloudFrontDouble::credentials(), expires: None }],
            signed_by: Vec::new(),
            invalidations: Vec::new(),
            calls: Vec::new(),
            status_reads: 0,
            denied: 0,
            peak_paths: 0,
            peak_wildcards: 0,
            lose_answers: 0,
        }));
        let s = state.clone();
        let server = Server::start(move |r| cloudfront(&s, limits, r));
        CloudFrontDouble { server, state }
    }

    pub fn endpoint(&self) -> String {
        self.server.url()
    }

    pub fn state(&self) -> MutexGuard<'_, CfState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
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

/// Checks the request's signature with the accepted key it names, as AWS does.
fn authenticate(
    state: &Mutex<CfState>,
    r: &Recorded,
    path: &str,
    query: &str,
    headers: &[(String, String)],
) -> Result<(), Reply> {
    let denied = |e: String| cf_error(403, "AccessDenied", &format!("Access denied: {e}"));
    let auth = r.header("authorization").ok_or_else(|| denied("no Authorization header".into()))?;
    let parsed = crate::support::signatures::parse_sigv4(auth).map_err(|e| denied(e.to_string()))?;
    let key = {
        let st = state.lock().unwrap_or_else(|p| p.into_inner());
        st.keys.iter().find(|k| k.credentials.access_key_id == parsed.access_key_id).cloned()
    };
    let Some(key) = key else {
        return Err(cf_error(403, "InvalidClientTokenId", "The security token included in the request is invalid."));
    };
    if key.expires.is_some_and(|at| SystemTime::now() >= at) {
        return Err(cf_error(403, "ExpiredToken", "The security token included in the request is expired"));
    }
    if let Some(token) = &key.credentials.session_token {
        let sent = r.header("x-amz-security-token");
        if sent != Some(token.expose()) || !parsed.signed_headers.iter().any(|h| h == "x-amz-security-token") {
            return Err(denied("the session token is missing, wrong or not signed".into()));
        }
    }
    crate::support::signatures::sigv4_verify(
        &key.credentials,
        "us-east-1",
        "cloudfront",
        &r.method,
        path,
        query,
        headers,
        &r.body,
    )
    .map_err(|e| denied(e.to_string()))?;
    state.lock().unwrap_or_else(|p| p.into_inner()).signed_by.push(key.credentials.access_key_id);
    Ok(())
}

fn cloudfront(state: &Mutex<CfState>, limits: CfLimits, r: Recorded) -> Reply {
    let (path, query) = r.path.split_once('?').unwrap_or((&r.path, ""));
    let decoded = String::from_utf8_lossy(&sigv4::percent_decode(path)).into_owned();
    let headers: Vec<(String, String)> = r.headers.clone().into_iter().collect();
    if let Err(reply) = authenticate(state, &r, &decoded, query, &headers) {
        state.lock().unwrap_or_else(|p| p.into_inner()).denied += 1;
        return reply;
    }
    let prefix = format!("/2020-05-31/distribution/{CF_DISTRIBUTION}/invalidation");
    let Some(rest) = decoded.strip_prefix(&prefix) else {
        return cf_error(404, "NoSuchDistribution", "The specified distribution does not exist.");
    };
    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
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
