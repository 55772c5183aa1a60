//! The pipeline driven in process with test sinks.

use std::time::Duration;

use super::batching::tests::{arrival, pipeline_config};
use super::*;
use crate::sink::SinkError;

fn item(keys: &[&str], tags: &[&str]) -> Item {
    let invalidations = Invalidations {
        redis_keys: keys.iter().map(|s| s.to_string()).collect(),
        redis_tags: tags.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    Item { event: arrival(), evaluation: Some(Evaluation { invalidations, ..Default::default() }), dead: None }
}

/// A sink that takes `per_batch` to confirm and records how many keys each batch held and
/// when it came.
struct SlowSink {
    per_batch: Duration,
    batches: std::sync::Mutex<Vec<(usize, tokio::time::Instant)>>,
}

#[async_trait::async_trait]
impl Sink for SlowSink {
    fn name(&self) -> &str {
        "slow"
    }

    async fn invalidate(&self, batch: &Invalidations, _: &Shutdown) -> Result<crate::sink::SinkReport, SinkError> {
        self.batches.lock().unwrap().push((batch.redis_keys.len(), tokio::time::Instant::now()));
        tokio::time::sleep(self.per_batch).await;
        Ok(crate::sink::SinkReport::default())
    }

    async fn ping(&self) -> bool {
        true
    }
}

/// An insert of row `id` into `public.t`, which the rules map to the key `t:{id}`.
fn change(id: i64) -> SourceEvent {
    let mut row = crate::event::Row::new();
    row.insert("id".into(), id.into());
    SourceEvent {
        decoded: Ok(Decoded::Change(ChangeEvent {
            table: "public.t".into(),
            op: crate::event::Op::Insert,
            before: None,
            after: Some(row),
            committed_at: None,
        })),
        ..arrival()
    }
}

/// Runs a pipeline with one sink taking `sink_ms` per batch over events arriving one every
/// `gap_ms`, and returns the batches the sink got: their sizes, and when (in ms from the
/// first event).
async fn batches_over(
    events: i64,
    gap_ms: u64,
    sink_ms: u64,
    config: PipelineConfig,
) -> (Vec<(usize, u128)>, Arc<Metrics>) {
    let start = tokio::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let dead = crate::config::DeadLetterConfig { file: Some(dir.path().join("dl.jsonl")), ..Default::default() };
    let dead_letters = DeadLetters::open(&dead, None, metrics.clone()).await.unwrap();
    let rules = "version: 1\nrules:\n  - name: t\n    table: public.t\n    redis: { keys: [\"t:{id}\"] }\n";
    let rules = Arc::new(Rules::parse(rules, std::path::Path::new("rules.yaml")).unwrap());
    let sink = Arc::new(SlowSink { per_batch: Duration::from_millis(sink_ms), batches: Default::default() });
    let pipeline = Pipeline::new(config, rules, vec![sink.clone()], dead_letters, metrics.clone());
    let (tx, rx) = mpsc::channel(1000);
    tokio::spawn(async move {
        for id in 0..events {
            tx.send(change(id)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(gap_ms)).await;
        }
    });
    pipeline.run(rx, &Shutdown::never()).await.unwrap();
    let batches: Vec<_> = sink.batches.lock().unwrap().iter().map(|(n, at)| (*n, (*at - start).as_millis())).collect();
    assert_eq!(batches.iter().map(|b| b.0).sum::<usize>(), events as usize, "every event once: {batches:?}");
    (batches, metrics)
}

#[tokio::test(start_paused = true)]
async fn the_pipeline_sends_at_once_when_light_and_a_slow_layer_takes_what_queued_behind_it() {
    // Light: one event every 5 ms, each confirmed in 1 ms: every event is its own batch,
    // sent at once (a 2 ms idle wait would not gather more, but would delay each).
    let (batches, metrics) = batches_over(10, 5, 1, pipeline_config(500, 50, 2)).await;
    assert_eq!(batches, (0..10).map(|i| (1, i * 5)).collect::<Vec<_>>());
    let count = |m: &Metrics, load| m.value("cdc_invalidator_batches_total", &[("load", load)]);
    assert_eq!((count(&metrics, "light"), count(&metrics, "backlog")), (10.0, 0.0));
    // A sink slower than the arrivals (one event every 1 ms, each batch taking 3 ms): the
    // first batch goes out at once; then the layer takes everything that queued while it was
    // busy as its next batch, back to back, without waiting for more (no idle gaps).
    let (batches, _) = batches_over(200, 1, 3, pipeline_config(500, 50, 2)).await;
    assert_eq!(batches[0], (1, 0), "{batches:?}");
    assert!(batches.windows(2).all(|w| w[1].1 - w[0].1 == 3), "back to back: {batches:?}");
    assert!(batches.iter().all(|&(n, _)| n <= 4), "what queued during one call: {batches:?}");
}

#[test]
fn a_batch_is_coalesced_into_one_deduplicated_sorted_set() {
    let items = vec![
        item(&["product:2", "product:1"], &["category:5"]),
        item(&["product:1"], &["category:5", "category:7"]),
        item(&[], &["category:7"]),
    ];
    let batch = coalesce(&items);
    assert_eq!(batch.redis_keys, vec!["product:1", "product:2"]);
    assert_eq!(batch.redis_tags, vec!["category:5", "category:7"]);
    assert!(batch.surrogate_keys.is_empty() && batch.urls.is_empty());
}
