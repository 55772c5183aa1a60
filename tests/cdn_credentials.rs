//! Credentials that change while the daemon runs: a rotated token file (picked up when it
//! changes, and at once when the provider answers 401), and CloudFront's AWS credential chain
//! (temporary credentials from STS for a web identity, refreshed before they expire; a rotated
//! shared credentials file).

use std::sync::Arc;
use std::time::Duration;

use cdc_invalidator::shutdown::Shutdown;
use cdc_invalidator::sink::cdn::aws_credentials::AwsEnv;
use cdc_invalidator::sink::cdn::cloudfront::{CloudfrontConfig, CloudfrontSink};
use cdc_invalidator::sink::cdn::sigv4;
use cdc_invalidator::sink::{Invalidations, ItemKind, Sink};
use cdc_invalidator::telemetry::Metrics;
use serde_json::json;

use crate::support::cdn_doubles::cloudfront::{CfKey, CfLimits, CloudFrontDouble, CF_DISTRIBUTION};
use crate::support::cdn_doubles::fastly::{FastlyDouble, SERVICE, TOKEN};
use crate::support::cdn_doubles::sts::{StsDouble, ROLE_ARN};
use crate::support::cdn_doubles::{build_sink, fast_retry, rewrite_unstamped, secret_file};

fn keys(keys: &[&str]) -> Invalidations {
    Invalidations::of(ItemKind::SurrogateKey, keys.iter().map(|k| k.to_string()).collect())
}

fn refusals(fastly: &FastlyDouble) -> usize {
    fastly.state.lock().unwrap().log.iter().filter(|(_, s)| *s == 401).count()
}

/// A Fastly sink reading its token from `token_file`.
fn fastly_sink(fastly: &FastlyDouble, token_file: &str, metrics: &Arc<Metrics>) -> Arc<dyn Sink> {
    build_sink(
        json!({ "kind": "fastly", "name": "fastly", "service_id": SERVICE, "token_file": token_file, "api": fastly.api(), "retry": fast_retry() }),
        metrics.clone(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_reads_the_token_file_again_and_sends_once_more() {
    let fastly = FastlyDouble::start();
    let (_dir, token_file) = secret_file(TOKEN);
    let metrics = Arc::new(Metrics::new());
    let sink = fastly_sink(&fastly, &token_file, &metrics);
    let report = sink.invalidate(&keys(&["product-1"]), &Shutdown::never()).await.unwrap();
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);

    // Fastly takes only the new token from now on, and the file holds it, unseen by its stamp.
    let rotated = "fastly-rotd-token";
    assert_eq!(rotated.len(), TOKEN.len());
    fastly.state.lock().unwrap().accepted_token = Some(rotated.into());
    rewrite_unstamped(&token_file, &format!("{rotated}\n"));

    let report = sink.invalidate(&keys(&["product-2"]), &Shutdown::never()).await.unwrap();
    assert!(report.rejected.is_empty(), "not dead-lettered: {:?}", report.rejected);
    assert!(fastly.purged_keys().contains(&"product-2".to_string()));
    assert_eq!(refusals(&fastly), 1, "one refused request, then the new token");
    assert_eq!(
        metrics.value("cdc_invalidator_credential_reloads_total", &[("sink", "fastly"), ("outcome", "changed")]),
        1.0
    );

    // A refusal that a new read cannot cure is permanent, counted as such.
    fastly.state.lock().unwrap().accepted_token = Some("someone-elses-token".into());
    let report = sink.invalidate(&keys(&["product-3"]), &Shutdown::never()).await.unwrap();
    assert_eq!(report.rejected.len(), 1);
    assert!(report.rejected[0].reason.contains("HTTP 401"), "{}", report.rejected[0].reason);
    assert!(!report.rejected[0].reason.contains(rotated), "the token never shows");
    assert_eq!(
        metrics.value("cdc_invalidator_credential_reloads_total", &[("sink", "fastly"), ("outcome", "unchanged")]),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_token_file_is_used_without_a_refusal() {
    let fastly = FastlyDouble::start();
    let (_dir, token_file) = secret_file(TOKEN);
    let metrics = Arc::new(Metrics::new());
    let sink = fastly_sink(&fastly, &token_file, &metrics);
    sink.invalidate(&keys(&["product-1"]), &Shutdown::never()).await.unwrap();
    std::fs::write(&token_file, "a-longer-rotated-fastly-token\n").unwrap();
    fastly.state.lock().unwrap().accepted_token = Some("a-longer-rotated-fastly-token".into());
    // The file is looked at once a second at most.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let report = sink.invalidate(&keys(&["product-2"]), &Shutdown::never()).await.unwrap();
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    assert_eq!(refusals(&fastly), 0, "the change was seen before any request used the old token");
}

/// A CloudFront sink from `extra` over the test defaults, validated with `env` as its
/// environment (the chain's variables).
fn chain_sink(endpoint: &str, extra: serde_json::Value, env: &[(&str, &str)], metrics: Arc<Metrics>) -> CloudfrontSink {
    let mut config = json!({
        "name": "cloudfront",
        "distribution_id": CF_DISTRIBUTION,
        "credentials": "chain",
        "endpoint": endpoint,
        "poll_interval": "50ms",
        "retry": { "initial": "10ms", "max": "200ms" },
        "limits": { "requests_per_second": 0 },
    });
    for (k, v) in extra.as_object().unwrap() {
        config[k] = v.clone();
    }
    let mut config: CloudfrontConfig = serde_json::from_value(config).unwrap();
    config.aws_env = Some(AwsEnv::from_vars(env.iter().map(|(k, v)| (k.to_string(), v.to_string()))));
    let mut problems = Vec::new();
    config.validate(std::path::Path::new("/nonexistent/config.yaml"), &mut problems);
    assert!(problems.is_empty(), "{problems:?}");
    CloudfrontSink::new(&config, metrics).unwrap()
}

fn url(i: usize) -> Invalidations {
    Invalidations::of(ItemKind::Url, vec![format!("https://shop.example.com/p/{i}")])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_identity_credentials_sign_with_their_session_token_and_are_refreshed_before_expiry() {
    let cloudfront = CloudFrontDouble::start(CfLimits::default());
    cloudfront.state().keys.clear();
    // Credentials that last 3 s: refreshed halfway, so no request is signed with expired ones.
    let sts = StsDouble::start(&cloudfront, "eyJhbGciOiJSUzI1NiJ9.web-identity-1", Duration::from_secs(3));
    let (_dir, token_file) = secret_file("eyJhbGciOiJSUzI1NiJ9.web-identity-1");
    let env = [
        ("AWS_WEB_IDENTITY_TOKEN_FILE", token_file.as_str()),
        ("AWS_ROLE_ARN", ROLE_ARN),
        ("AWS_ROLE_SESSION_NAME", "cdc-invalidator-test"),
    ];
    let sink =
        chain_sink(&cloudfront.endpoint(), json!({ "sts_endpoint": sts.endpoint() }), &env, Arc::new(Metrics::new()));
    let started = std::time::Instant::now();
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(7) {
        i += 1;
        let report = sink.invalidate(&url(i), &Shutdown::never()).await.unwrap();
        assert!(report.rejected.is_empty(), "purge {i}: {:?}", report.rejected);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let st = cloudfront.state();
    assert_eq!(st.denied, 0, "never signed with expired, unknown or token-less credentials");
    assert_eq!(st.invalidations.len(), i, "every purge went through");
    let issued = sts.state().issued.clone();
    assert!(issued.len() >= 3, "refreshed before each expiry over 7 s: {issued:?}");
    assert!(issued.iter().all(|(_, session)| session == "cdc-invalidator-test"));
    // Each issued key signed requests in turn: the refresh replaced them.
    let used: std::collections::BTreeSet<&String> = st.signed_by.iter().collect();
    assert!(used.len() >= 3, "{used:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_web_identity_token_dead_letters_with_stss_reason() {
    let cloudfront = CloudFrontDouble::start(CfLimits::default());
    let sts = StsDouble::start(&cloudfront, "the-token-sts-expects", Duration::from_secs(900));
    let (_dir, token_file) = secret_file("a-token-sts-refuses");
    let env = [("AWS_WEB_IDENTITY_TOKEN_FILE", token_file.as_str()), ("AWS_ROLE_ARN", ROLE_ARN)];
    let sink =
        chain_sink(&cloudfront.endpoint(), json!({ "sts_endpoint": sts.endpoint() }), &env, Arc::new(Metrics::new()));
    let report = sink.invalidate(&url(1), &Shutdown::never()).await.unwrap();
    assert_eq!(report.rejected.len(), 1);
    let reason = &report.rejected[0].reason;
    assert!(reason.contains("InvalidIdentityToken"), "{reason}");
    assert!(!reason.contains("a-token-sts-refuses"), "{reason}");
    assert!(cloudfront.state().calls.is_empty(), "nothing unsigned was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_shared_credentials_file_is_picked_up() {
    let cloudfront = CloudFrontDouble::start(CfLimits::default());
    let key = |id: &str, secret: &str| CfKey {
        credentials: sigv4::Credentials {
            access_key_id: id.into(),
            secret_access_key: cdc_invalidator::config::Secret::new(secret),
            session_token: None,
        },
        expires: None,
    };
    cloudfront.state().keys = vec![key("AKIDPROFILEOLD", "old-profile-secret")];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("credentials");
    std::fs::write(&file, "[default]\naws_access_key_id = AKIDOTHER\naws_secret_access_key = x\n[purge]\naws_access_key_id = AKIDPROFILEOLD\naws_secret_access_key = old-profile-secret\n").unwrap();
    let env = [("AWS_SHARED_CREDENTIALS_FILE", file.to_str().unwrap()), ("AWS_PROFILE", "purge")];
    let metrics = Arc::new(Metrics::new());
    let sink = chain_sink(&cloudfront.endpoint(), json!({}), &env, metrics.clone());
    assert!(sink.invalidate(&url(1), &Shutdown::never()).await.unwrap().rejected.is_empty());

    // The key is rotated in IAM and in the file: the old one is refused from now on.
    cloudfront.state().keys = vec![key("AKIDPROFILENEW", "new-profile-secret")];
    std::fs::write(&file, "[purge]\naws_access_key_id = AKIDPROFILENEW\naws_secret_access_key = new-profile-secret\n")
        .unwrap();
    let report = sink.invalidate(&url(2), &Shutdown::never()).await.unwrap();
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    // Seen either by the file's stamp or, if the request went first, by the 403's reload.
    let st = cloudfront.state();
    assert_eq!(st.signed_by.last().map(String::as_str), Some("AKIDPROFILENEW"));
    assert!(st.denied <= 1, "{}", st.denied);
    assert_eq!(st.invalidations.len(), 2);
}
