//! The webhook sink against a receiver that checks the HMAC signature.

use std::sync::Arc;
use std::time::Duration;

use cdc_invalidator::shutdown::Shutdown;
use cdc_invalidator::sink::{Invalidations, ItemKind, Sink};
use cdc_invalidator::telemetry::Metrics;
use serde_json::json;

use crate::support::cdn_doubles::webhook::{WebhookDouble, SECRET};
use crate::support::cdn_doubles::{build_sink, fast_retry, secret_file, Storm};

fn sink(double: &WebhookDouble, secret: &str) -> (Arc<dyn Sink>, tempfile::TempDir) {
    let (dir, file) = secret_file(secret);
    let config = json!({
        "kind": "webhook", "name": "hook", "url": double.url(), "secret_file": file,
        "limits": { "items_per_request": 10 }, "retry": fast_retry(),
    });
    (build_sink(config, Arc::new(Metrics::new())), dir)
}

#[tokio::test]
async fn signed_batches_arrive_and_a_refused_key_is_isolated() {
    let double = WebhookDouble::start();
    let (sink, _dir) = sink(&double, SECRET);
    let mut keys: Vec<String> = (0..25).map(|i| format!("k-{i}")).collect();
    keys.push("refused-key".into());
    let batch =
        Invalidations::of(ItemKind::SurrogateKey, keys).with(ItemKind::Url, vec!["https://shop.example.com/x".into()]);
    let report = sink.invalidate(&batch, &Shutdown::never()).await.unwrap();
    assert_eq!(report.rejected.len(), 1);
    assert_eq!(batch.items(ItemKind::SurrogateKey)[report.rejected[0].index], "refused-key");
    assert!(report.rejected[0].reason.contains("HTTP 422: refused key"), "{}", report.rejected[0].reason);
    assert_eq!(report.confirmed, vec![(ItemKind::SurrogateKey, 25), (ItemKind::Url, 1)]);
    let st = double.state.lock().unwrap();
    assert_eq!(st.keys.len(), 25);
    assert_eq!(st.urls, vec!["https://shop.example.com/x"]);
}

#[tokio::test]
async fn a_wrong_secret_is_refused_and_dead_lettered() {
    let double = WebhookDouble::start();
    let (sink, _dir) = sink(&double, "not-the-secret");
    let batch = Invalidations::of(ItemKind::SurrogateKey, vec!["a".into()]);
    let report = sink.invalidate(&batch, &Shutdown::never()).await.unwrap();
    assert_eq!(report.rejected.len(), 1);
    assert!(report.rejected[0].reason.contains("HTTP 401"));
    assert!(double.state.lock().unwrap().keys.is_empty());
}

#[tokio::test]
async fn a_busy_receiver_is_retried_until_it_accepts() {
    let double = WebhookDouble::start();
    double.state.lock().unwrap().storm = Some(Storm::for_(Duration::from_secs(2), 503));
    let (sink, _dir) = sink(&double, SECRET);
    let batch = Invalidations::of(ItemKind::SurrogateKey, vec!["a".into(), "b".into()]);
    let report = sink.invalidate(&batch, &Shutdown::never()).await.unwrap();
    assert!(report.rejected.is_empty());
    assert_eq!(double.state.lock().unwrap().keys, vec!["a", "b"]);
}
