//! The signed CDN providers: SigV4 and EdgeGrid against their published test vectors, and the
//! CloudFront and Akamai sinks against local doubles that verify those signatures and enforce
//! the documented limits.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use cdc_invalidator::config::Secret;
use cdc_invalidator::sink::cdn::{edgegrid, sigv4};

fn fixtures(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(kind)
}

fn suite_credentials() -> sigv4::Credentials {
    sigv4::Credentials {
        access_key_id: "AKIDEXAMPLE".into(),
        secret_access_key: Secret::new("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
        session_token: None,
    }
}

/// A `.req` file: request line, headers (`Name:value`, a name may repeat), blank line, body.
struct SuiteRequest {
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn parse_req(text: &str) -> SuiteRequest {
    let (head, body) = text.split_once("\n\n").unwrap_or((text, ""));
    let mut lines = head.lines();
    let request_line = lines.next().expect("request line");
    let method = request_line.split(' ').next().unwrap().to_string();
    // The target runs up to the last " HTTP/1.1" (it may hold spaces).
    let target = request_line[method.len() + 1..].rsplit_once(" HTTP/").unwrap().0;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let headers = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(':').expect("header line");
            (n.to_string(), v.to_string())
        })
        .collect();
    SuiteRequest { method, path: path.into(), query: query.into(), headers, body: body.as_bytes().to_vec() }
}

#[test]
fn sigv4_matches_the_aws_test_suite() {
    let dir = fixtures("sigv4");
    let mut groups: Vec<PathBuf> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
    groups.sort();
    assert!(groups.len() >= 5, "at least five vectors: found {}", groups.len());
    for group in groups {
        let name = group.file_name().unwrap().to_str().unwrap().to_string();
        let read = |ext: &str| std::fs::read_to_string(group.join(format!("{name}.{ext}"))).unwrap();
        let req = parse_req(&read("req"));
        let signed = sigv4::sign(
            &suite_credentials(),
            "us-east-1",
            "service",
            &sigv4::Request {
                method: &req.method,
                path: &req.path,
                query: &req.query,
                headers: &req.headers,
                payload: &req.body,
            },
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(signed.canonical_request, read("creq"), "{name}: canonical request");
        assert_eq!(signed.string_to_sign, read("sts"), "{name}: string to sign");
        assert_eq!(signed.authorization, read("authz"), "{name}: Authorization");

        // The verifier the CloudFront double uses accepts exactly this request...
        let mut sent = req.headers.clone();
        sent.push(("Authorization".into(), signed.authorization.clone()));
        let verify = |headers: &[(String, String)], body: &[u8], creds: &sigv4::Credentials| {
            crate::support::signatures::sigv4_verify(
                creds,
                "us-east-1",
                "service",
                &req.method,
                &req.path,
                &req.query,
                headers,
                body,
            )
        };
        assert_eq!(verify(&sent, &req.body, &suite_credentials()), Ok(()), "{name}: verify");
        // ...and refuses it with another secret, another body or a changed signed header.
        let wrong = sigv4::Credentials { secret_access_key: Secret::new("not-the-secret"), ..suite_credentials() };
        assert_eq!(
            verify(&sent, &req.body, &wrong),
            Err(crate::support::signatures::Refusal::Mismatch),
            "{name}: wrong secret"
        );
        assert_eq!(
            verify(&sent, b"tampered", &suite_credentials()),
            Err(crate::support::signatures::Refusal::Mismatch),
            "{name}: body"
        );
        let mut moved = sent.clone();
        for (n, v) in moved.iter_mut() {
            if n.eq_ignore_ascii_case("x-amz-date") {
                *v = "20150830T123601Z".into();
            }
        }
        assert!(verify(&moved, &req.body, &suite_credentials()).is_err(), "{name}: date changed after signing");
    }
}

#[test]
fn sigv4_verify_refuses_unsigned_host_and_unknown_keys() {
    let headers = vec![
        ("Host".to_string(), "example.amazonaws.com".to_string()),
        ("X-Amz-Date".to_string(), "20150830T123600Z".to_string()),
    ];
    let request = sigv4::Request { method: "GET", path: "/", query: "", headers: &headers[1..], payload: b"" };
    // Signing without a host header is refused outright.
    assert_eq!(
        sigv4::sign(&suite_credentials(), "us-east-1", "service", &request),
        Err(sigv4::SigV4Error::MissingHeader("host"))
    );
    let signed =
        sigv4::sign(&suite_credentials(), "us-east-1", "service", &sigv4::Request { headers: &headers, ..request })
            .unwrap();
    let mut sent = headers.clone();
    sent.push(("Authorization".into(), signed.authorization.replace("AKIDEXAMPLE", "AKIDOTHER")));
    assert_eq!(
        crate::support::signatures::sigv4_verify(
            &suite_credentials(),
            "us-east-1",
            "service",
            "GET",
            "/",
            "",
            &sent,
            b""
        ),
        Err(crate::support::signatures::Refusal::UnknownKey)
    );
    // A signature for another region is refused even with the right key.
    let mut sent = headers.clone();
    sent.push(("Authorization".into(), signed.authorization.clone()));
    assert!(matches!(
        crate::support::signatures::sigv4_verify(
            &suite_credentials(),
            "eu-west-1",
            "service",
            "GET",
            "/",
            "",
            &sent,
            b""
        ),
        Err(crate::support::signatures::Refusal::Mismatch | crate::support::signatures::Refusal::WrongScope(_))
    ));
}

#[derive(serde::Deserialize)]
struct EdgeGridData {
    base_url: String,
    access_token: String,
    client_token: String,
    client_secret: String,
    max_body: usize,
    headers_to_sign: Vec<String>,
    nonce: String,
    timestamp: String,
    sign_key_test: String,
    tests: Vec<EdgeGridCase>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct EdgeGridCase {
    test_name: String,
    request: EdgeGridRequest,
    expected_authorization: String,
}

#[derive(serde::Deserialize)]
struct EdgeGridRequest {
    method: String,
    path: String,
    #[serde(default)]
    data: String,
    #[serde(default)]
    headers: Vec<std::collections::BTreeMap<String, String>>,
}

#[test]
fn edgegrid_matches_akamai_test_data() {
    let text = std::fs::read_to_string(fixtures("edgegrid").join("testdata.json")).unwrap();
    let data: EdgeGridData = serde_json::from_str(&text).unwrap();
    assert_eq!(edgegrid::signing_key(&data.client_secret, &data.timestamp), data.sign_key_test);
    let creds = edgegrid::Credentials {
        client_token: data.client_token.clone(),
        client_secret: Secret::new(data.client_secret.clone()),
        access_token: data.access_token.clone(),
    };
    let settings = edgegrid::Settings { headers_to_sign: data.headers_to_sign.clone(), max_body: data.max_body };
    let host = data.base_url.trim_start_matches("https://").trim_end_matches('/');
    assert!(data.tests.len() >= 10);
    for case in &data.tests {
        let headers: Vec<(String, String)> =
            case.request.headers.iter().flat_map(|h| h.iter().map(|(n, v)| (n.clone(), v.clone()))).collect();
        let request = edgegrid::Request {
            method: &case.request.method,
            scheme: "https",
            host,
            path_and_query: &case.request.path,
            headers: &headers,
            body: case.request.data.as_bytes(),
        };
        let header = edgegrid::authorization(&creds, &settings, &request, &data.timestamp, &data.nonce);
        assert_eq!(header, case.expected_authorization, "{}", case.test_name);

        // The Akamai double's check accepts it at the vector's time, and refuses it with
        // another secret or a changed path.
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_395_430_461); // 20140321T19:34:21Z
        let mut sent = headers.clone();
        sent.push(("Authorization".into(), header.clone()));
        let signed = edgegrid::Request { headers: &sent, ..request };
        assert!(
            crate::support::signatures::edgegrid_verify(&creds, &settings, &signed, at, Duration::from_secs(60))
                .is_ok(),
            "{}",
            case.test_name
        );
        let wrong = edgegrid::Credentials { client_secret: Secret::new("another-secret"), ..creds.clone() };
        assert_eq!(
            crate::support::signatures::edgegrid_verify(&wrong, &settings, &signed, at, Duration::from_secs(60)),
            Err(crate::support::signatures::Refusal::Mismatch),
            "{}",
            case.test_name
        );
        let moved = edgegrid::Request { path_and_query: "/other", ..signed };
        assert_eq!(
            crate::support::signatures::edgegrid_verify(&creds, &settings, &moved, at, Duration::from_secs(60)),
            Err(crate::support::signatures::Refusal::Mismatch)
        );
        // A replay long after the timestamp is stale.
        assert_eq!(
            crate::support::signatures::edgegrid_verify(
                &creds,
                &settings,
                &signed,
                at + Duration::from_secs(3600),
                Duration::from_secs(60)
            ),
            Err(crate::support::signatures::Refusal::Stale)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The sinks against the doubles
// ---------------------------------------------------------------------------------------------

use std::sync::Arc;

use cdc_invalidator::shutdown::Shutdown;
use cdc_invalidator::sink::cdn::akamai::{AkamaiConfig, AkamaiSink};
use cdc_invalidator::sink::cdn::cloudfront::{CloudfrontConfig, CloudfrontSink};
use cdc_invalidator::sink::{Invalidations, ItemKind, Sink};
use cdc_invalidator::telemetry::Metrics;

use crate::support::cdn_doubles::akamai::{AkLimits, AkamaiDouble};
use crate::support::cdn_doubles::cloudfront::{CfLimits, CloudFrontDouble, CF_DISTRIBUTION};
use crate::support::cdn_doubles::Bucket;

/// `base` with the keys of `extra` set over it.
fn merged(mut base: serde_json::Value, extra: serde_json::Value) -> serde_json::Value {
    if let (Some(base), Some(extra)) = (base.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            base.insert(k.clone(), v.clone());
        }
    }
    base
}

fn cloudfront_sink(endpoint: &str, extra: serde_json::Value, credentials: sigv4::Credentials) -> CloudfrontSink {
    let config = serde_json::json!({
        "name": "cloudfront",
        "distribution_id": CF_DISTRIBUTION,
        "access_key_id_env": "UNUSED",
        "secret_access_key_env": "UNUSED",
        "endpoint": endpoint,
        "poll_interval": "50ms",
        "busy_backoff": "200ms",
        "retry": { "initial": "10ms", "max": "200ms" },
        "limits": { "requests_per_second": 0 },
    });
    let mut config: CloudfrontConfig = serde_json::from_value(merged(config, extra)).unwrap();
    config.static_credentials = Some(credentials);
    CloudfrontSink::new(&config, Arc::new(Metrics::new())).unwrap()
}

fn akamai_sink(base_url: &str, extra: serde_json::Value, credentials: edgegrid::Credentials) -> AkamaiSink {
    let config = serde_json::json!({
        "name": "akamai",
        "base_url": base_url,
        "client_token_env": "UNUSED",
        "client_secret_env": "UNUSED",
        "access_token_env": "UNUSED",
        "retry": { "initial": "10ms", "max": "200ms" },
    });
    let mut config: AkamaiConfig = serde_json::from_value(merged(config, extra)).unwrap();
    config.credentials = Some(credentials);
    AkamaiSink::new(&config, Arc::new(Metrics::new())).unwrap()
}

fn urls(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("https://shop.example.com/p/{i}")).collect()
}

#[tokio::test]
async fn cloudfront_double_rejects_a_wrong_signature() {
    let double = CloudFrontDouble::start(CfLimits::default());
    let wrong =
        sigv4::Credentials { secret_access_key: Secret::new("not-the-secret"), ..CloudFrontDouble::credentials() };
    let sink = cloudfront_sink(&double.endpoint(), serde_json::json!({}), wrong);
    let batch = Invalidations::of(ItemKind::Url, urls(2));
    let report = sink.invalidate(&batch, &Shutdown::never()).await.unwrap();
    assert_eq!(report.rejected.len(), 2, "{report:?}");
    assert!(report.rejected[0].reason.contains("403 AccessDenied"), "{}", report.rejected[0].reason);
    assert!(double.state().denied >= 1);
    assert!(double.state().invalidations.is_empty());

    // The right key goes through.
    let sink = cloudfront_sink(&double.endpoint(), serde_json::json!({}), CloudFrontDouble::credentials());
    let report = sink.invalidate(&batch, &Shutdown::never()).await.unwrap();
    assert!(report.rejected.is_empty(), "{report:?}");
    assert_eq!(report.confirmed, vec![(ItemKind::Url, 2)]);
    assert_eq!(double.state().invalidations[0].paths, vec!["/p/0", "/p/1"]);
}

#[tokio::test]
async fn akamai_double_rejects_a_wrong_signature() {
    let double = AkamaiDouble::start(AkLimits::default());
    let wrong =
        edgegrid::Credentials { client_secret: Secret::new("bm90LXRoZS1zZWNyZXQ="), ..AkamaiDouble::credentials() };
    let sink = akamai_sink(&double.base_url(), serde_json::json!({}), wrong);
    let batch = Invalidations::of(ItemKind::SurrogateKey, vec!["product-42".into()]);
    let report = sink.invalidate(&batch, &Shutdown::never()).await.unwrap();
    assert_eq!(report.rejected.len(), 1);
    assert!(report.rejected[0].reason.contains("HTTP 401"), "{}", report.rejected[0].reason);
    assert!(double.purged().is_empty());

    let sink = akamai_sink(&double.base_url(), serde_json::json!({}), AkamaiDouble::credentials());
    let report = sink.invalidate(&batch, &Shutdown::never()).await.unwrap();
    assert!(report.rejected.is_empty(), "{report:?}");
    assert_eq!(double.purged(), vec!["product-42"]);
    let purge = double.state().purges[0].clone();
    assert_eq!(
        (purge.action.as_str(), purge.object_type.as_str(), purge.network.as_str()),
        ("invalidate", "tag", "production")
    );
}

#[tokio::test]
async fn cloudfront_batches_stay_under_the_in_flight_limits() {
    // Small limits so one batch of the sink needs several invalidations and waits for some to
    // complete; the double answers TooManyInvalidationsInProgress if the sink ever overshoots.
    let limits =
        CfLimits { max_paths: 10, max_wildcards: 3, max_batch: 3_000, complete_after: Duration::from_millis(300) };
    let double = CloudFrontDouble::start(limits);
    let sink = cloudfront_sink(
        &double.endpoint(),
        serde_json::json!({
            "max_paths_in_flight": 10,
            "max_wildcards_in_flight": 3,
            "surrogate_key_path": "/tags/{key}/*",
        }),
        CloudFrontDouble::credentials(),
    );
    let batch = Invalidations::of(ItemKind::Url, urls(25))
        .with(ItemKind::SurrogateKey, (0..7).map(|i| format!("category-{i}")).collect());
    let report = sink.invalidate(&batch, &Shutdown::never()).await.unwrap();
    assert!(report.rejected.is_empty(), "{report:?}");
    let st = double.state();
    assert!(st.calls.iter().all(|c| c.code.is_none()), "{:?}", st.calls.iter().map(|c| &c.code).collect::<Vec<_>>());
    assert!(
        st.peak_paths <= 10 && st.peak_wildcards <= 3,
        "peak {} paths, {} wildcards",
        st.peak_paths,
        st.peak_wildcards
    );
    assert!(st.status_reads > 0, "the sink asked which invalidations completed");
    let mut sent: Vec<String> = st.invalidations.iter().flat_map(|i| i.paths.clone()).collect();
    sent.sort();
    let mut expected: Vec<String> = (0..25).map(|i| format!("/p/{i}")).collect();
    expected.extend((0..7).map(|i| format!("/tags/category-{i}/*")));
    expected.sort();
    assert_eq!(sent, expected);
    // Every invalidation fits the limits on its own; wildcards are never mixed past 3.
    assert!(st.invalidations.iter().all(|i| i.paths.iter().filter(|p| p.ends_with('*')).count() <= 3));
    assert!(st.invalidations.len() >= 3 + 3, "25 paths in batches of at most 10, 7 wildcards of at most 3");
}

#[tokio::test]
async fn cloudfront_reuses_the_caller_reference_when_retrying_a_batch() {
    let double = CloudFrontDouble::start(CfLimits::default());
    // The first answer is lost after the invalidation was created.
    double.state().lose_answers = 1;
    let sink = cloudfront_sink(&double.endpoint(), serde_json::json!({}), CloudFrontDouble::credentials());
    let batch = Invalidations::of(ItemKind::Url, urls(3));
    let report = sink.invalidate(&batch, &Shutdown::never()).await.unwrap();
    assert!(report.rejected.is_empty(), "{report:?}");
    {
        let st = double.state();
        assert_eq!(st.calls.len(), 2, "one lost answer, one retry");
        assert_eq!(st.calls[0].caller_reference, st.calls[1].caller_reference);
        assert_eq!(st.invalidations.len(), 1, "the retry returned the existing invalidation instead of a new one");
    }

    // Another batch gets another reference.
    sink.invalidate(
        &Invalidations::of(ItemKind::Url, vec!["https://shop.example.com/other".into()]),
        &Shutdown::never(),
    )
    .await
    .unwrap();
    let st = double.state();
    assert_ne!(st.calls[2].caller_reference, st.calls[0].caller_reference);
}

#[tokio::test]
async fn cloudfront_paths_it_would_refuse_are_rejected_before_sending() {
    let double = CloudFrontDouble::start(CfLimits::default());
    let sink = cloudfront_sink(&double.endpoint(), serde_json::json!({}), CloudFrontDouble::credentials());
    let urls = vec![
        "https://shop.example.com/ok".into(),
        "/relative/path".into(),
        "https://shop.example.com/a*/b".into(),
        format!("https://shop.example.com/{}", "x".repeat(4_100)),
    ];
    // No surrogate_key_path: keys are not this sink's business.
    let batch = Invalidations::of(ItemKind::Url, urls).with(ItemKind::SurrogateKey, vec!["ignored".into()]);
    assert_eq!(sink.kinds(), &[ItemKind::Url]);
    let report = sink.invalidate(&batch, &Shutdown::never()).await.unwrap();
    let rejected: Vec<usize> = report.rejected.iter().map(|r| r.index).collect();
    assert_eq!(rejected, vec![1, 2, 3], "{report:?}");
    assert!(report.rejected[1].reason.contains("last character"));
    let st = double.state();
    assert_eq!(st.calls.len(), 1);
    assert_eq!(st.calls[0].paths, vec!["/ok"]);
}

#[tokio::test]
async fn cloudfront_can_wait_until_invalidations_complete() {
    let limits = CfLimits { complete_after: Duration::from_millis(600), ..CfLimits::default() };
    let double = CloudFrontDouble::start(limits);
    let sink = cloudfront_sink(
        &double.endpoint(),
        serde_json::json!({ "wait_for_completion": true }),
        CloudFrontDouble::credentials(),
    );
    let started = std::time::Instant::now();
    sink.invalidate(&Invalidations::of(ItemKind::Url, urls(2)), &Shutdown::never()).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(600), "returned before CloudFront said Completed");
    assert!(double.state().status_reads >= 1);
}

#[tokio::test]
async fn cloudfront_busy_distribution_is_retried_not_dead_lettered() {
    // Another client holds the whole wildcard budget; it completes after 700 ms.
    let limits = CfLimits { max_wildcards: 1, complete_after: Duration::from_millis(700), ..CfLimits::default() };
    let double = CloudFrontDouble::start(limits);
    let other = cloudfront_sink(&double.endpoint(), serde_json::json!({}), CloudFrontDouble::credentials());
    other
        .invalidate(&Invalidations::of(ItemKind::Url, vec!["https://x.example/*".into()]), &Shutdown::never())
        .await
        .unwrap();
    let sink = cloudfront_sink(&double.endpoint(), serde_json::json!({}), CloudFrontDouble::credentials());
    let report = sink
        .invalidate(&Invalidations::of(ItemKind::Url, vec!["https://x.example/img/*".into()]), &Shutdown::never())
        .await
        .unwrap();
    assert!(report.rejected.is_empty(), "{report:?}");
    let st = double.state();
    assert!(st.calls.iter().any(|c| c.code.as_deref() == Some("TooManyInvalidationsInProgress")));
    assert_eq!(st.invalidations.len(), 2);
}

#[tokio::test]
async fn akamai_bodies_are_split_under_50_kb() {
    let double = AkamaiDouble::start(AkLimits::default());
    let sink = akamai_sink(
        &double.base_url(),
        serde_json::json!({ "limits": { "items_per_request": 5000 } }),
        AkamaiDouble::credentials(),
    );
    let long: Vec<String> =
        (0..2_000).map(|i| format!("https://shop.example.com/catalogue/products/{i:05}/{}", "x".repeat(60))).collect();
    let batch = Invalidations::of(ItemKind::Url, long.clone());
    let report = sink.invalidate(&batch, &Shutdown::never()).await.unwrap();
    assert!(report.rejected.is_empty(), "{report:?}");
    let st = double.state();
    assert!(st.requests.iter().all(|(_, s)| *s == 201), "no 413: bodies were cut before sending");
    assert!(st.purges.len() >= 4, "about 220 KB of URLs needs at least 5 bodies, got {}", st.purges.len());
    for p in &st.purges {
        assert!(serde_json::json!({ "objects": p.objects }).to_string().len() <= 50_000);
    }
    drop(st);
    let mut purged = double.purged();
    purged.sort();
    let mut expected = long;
    expected.sort();
    assert_eq!(purged, expected);
}

#[tokio::test]
async fn akamai_413_splits_the_request_until_it_fits() {
    // The server's limit is lower than the sink's: 413s, then halves, then everything fits.
    let double = AkamaiDouble::start(AkLimits { max_body: 4_000, ..AkLimits::default() });
    let sink = akamai_sink(&double.base_url(), serde_json::json!({}), AkamaiDouble::credentials());
    let batch = Invalidations::of(ItemKind::SurrogateKey, (0..300).map(|i| format!("product-{i:04}")).collect());
    let report = sink.invalidate(&batch, &Shutdown::never()).await.unwrap();
    assert!(report.rejected.is_empty(), "{report:?}");
    let st = double.state();
    assert!(st.requests.iter().any(|(_, s)| *s == 413));
    drop(st);
    let mut purged = double.purged();
    purged.sort();
    assert_eq!(purged, batch.items(ItemKind::SurrogateKey));
}

#[tokio::test]
async fn akamai_429_storm_waits_at_least_5s_and_loses_nothing() {
    let double = AkamaiDouble::start(AkLimits::default());
    double.state().storm_until = Some(std::time::Instant::now() + Duration::from_secs(3));
    // One request in flight, so every request after a 429 is a retry that had to wait (with
    // more, the other requests already in flight are answered 429 at the same moment).
    let sink = akamai_sink(
        &double.base_url(),
        serde_json::json!({ "limits": { "items_per_request": 10, "concurrency": 1 } }),
        AkamaiDouble::credentials(),
    );
    let batch = Invalidations::of(ItemKind::SurrogateKey, (0..30).map(|i| format!("k{i}")).collect());
    let started = std::time::Instant::now();
    let report = sink.invalidate(&batch, &Shutdown::never()).await.unwrap();
    assert!(report.rejected.is_empty(), "{report:?}");
    assert!(started.elapsed() >= Duration::from_secs(5));
    let st = double.state();
    let throttled: Vec<std::time::Instant> = st.requests.iter().filter(|(_, s)| *s == 429).map(|(t, _)| *t).collect();
    assert!(!throttled.is_empty());
    // After each 429 the next request came at least 5 s later.
    for t in &throttled {
        if let Some((next, _)) = st.requests.iter().find(|(at, _)| at > t) {
            assert!(
                next.duration_since(*t) >= Duration::from_millis(4_990),
                "retried {:?} after a 429",
                next.duration_since(*t)
            );
        }
    }
    drop(st);
    let mut purged = double.purged();
    purged.sort();
    let mut expected = batch.items(ItemKind::SurrogateKey).to_vec();
    expected.sort();
    assert_eq!(purged, expected);
}

#[tokio::test]
async fn akamai_client_side_buckets_keep_under_the_provider_rate() {
    // A provider allowing 4 requests at once and 8/s; the sink configured a little under it
    // (6/s): the client's bucket counts a request when it sends it, the provider's when it
    // arrives, and on a busy machine the arrival of one request can lag by more than the 125 ms
    // between two tokens at 8/s (seen: a fifth request arriving 115 ms after the fourth). The
    // margin is what an operator leaves too; without the client's bucket most of the 20
    // requests would be answered 429.
    let limits = AkLimits { requests: Bucket::new(4, 8.0), ..AkLimits::default() };
    let double = AkamaiDouble::start(limits);
    let sink = akamai_sink(
        &double.base_url(),
        serde_json::json!({ "limits": { "items_per_request": 1, "requests_per_second": 6, "burst": 4 } }),
        AkamaiDouble::credentials(),
    );
    // Warm-up: open the connections and spend the burst on both sides, then let both buckets
    // refill. Otherwise the first requests' connection set-up (slow on a busy machine) delays
    // their arrival but not the client's clock, and a warm fifth request arrives early.
    let warm = Invalidations::of(ItemKind::SurrogateKey, (0..4).map(|i| format!("w{i}")).collect());
    sink.invalidate(&warm, &Shutdown::never()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(750)).await;
    let batch = Invalidations::of(ItemKind::SurrogateKey, (0..20).map(|i| format!("k{i}")).collect());
    sink.invalidate(&batch, &Shutdown::never()).await.unwrap();
    let st = double.state();
    assert_eq!(st.purges.len(), 24);
    assert!(st.requests.iter().all(|(_, s)| *s == 201), "the provider never had to answer 429: {:?}", st.requests);
}

#[tokio::test]
async fn akamai_bad_object_is_the_only_one_rejected() {
    let double = AkamaiDouble::start(AkLimits::default());
    double.state().reject.insert("product-13".into());
    let sink = akamai_sink(&double.base_url(), serde_json::json!({}), AkamaiDouble::credentials());
    let keys: Vec<String> = (0..32).map(|i| format!("product-{i}")).collect();
    let batch = Invalidations::of(ItemKind::SurrogateKey, keys.clone()).with(ItemKind::Url, vec!["not a url".into()]);
    let report = sink.invalidate(&batch, &Shutdown::never()).await.unwrap();
    let rejected: Vec<(ItemKind, usize)> = report.rejected.iter().map(|r| (r.kind, r.index)).collect();
    assert_eq!(rejected, vec![(ItemKind::SurrogateKey, 13), (ItemKind::Url, 0)]);
    assert!(report.rejected[0].reason.contains("Invalid tag object: product-13"), "{}", report.rejected[0].reason);
    assert_eq!(double.purged().len(), 31);
}

#[tokio::test]
async fn akamai_cpcodes_delete_on_staging() {
    let double = AkamaiDouble::start(AkLimits::default());
    let sink = akamai_sink(
        &double.base_url(),
        serde_json::json!({ "surrogate_keys_as": "cpcode", "action": "delete", "network": "staging" }),
        AkamaiDouble::credentials(),
    );
    let batch = Invalidations::of(ItemKind::SurrogateKey, vec!["12345".into(), "cp-x".into()]);
    let report = sink.invalidate(&batch, &Shutdown::never()).await.unwrap();
    assert_eq!(report.rejected.len(), 1);
    assert!(report.rejected[0].reason.contains("CP code must be a number"));
    let purge = double.state().purges[0].clone();
    assert_eq!(
        (purge.action.as_str(), purge.object_type.as_str(), purge.network.as_str()),
        ("delete", "cpcode", "staging")
    );
    assert_eq!(purge.objects, vec![serde_json::json!(12345)]);
}
