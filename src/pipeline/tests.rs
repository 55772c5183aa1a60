//! The pipeline driven in process with test sinks.

use std::time::Duration;

use super::batching::tests::{arrival, pipeline_config};
use super::*;
use crate::sink::SinkError;

/// A unit of events asking for these keys and tags (each list sorted, as the rules make it),
/// gathered as intake gathers a batch.
fn unit_of(asked: &[(&[&str], &[&str])]) -> Unit {
    let mut gathered: [Vec<String>; ItemKind::COUNT] = Default::default();
    let items = asked
        .iter()
        .map(|(keys, tags)| {
            let mut set = Invalidations::of(ItemKind::RedisKey, keys.iter().map(|s| s.to_string()).collect())
                .with(ItemKind::RedisTag, tags.iter().map(|s| s.to_string()).collect());
            set.normalize();
            let asked = take_items(&mut gathered, &mut set);
            Item { event: arrival(), ruled: Some(Ruled { matched: true, asked }), dead: None }
        })
        .collect();
    let (batch, asked) = Invalidations::gather(gathered, &mut Vec::new());
    Unit { items, batch, asked, not_before: None }
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
        self.batches.lock().unwrap().push((batch.items(ItemKind::RedisKey).len(), tokio::time::Instant::now()));
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
            lsn: None,
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
    let dead_letters = file_dead_letters(dir.path(), &metrics).await;
    let rules = "version: 1\nrules:\n  - name: t\n    table: public.t\n    redis: { keys: [\"t:{id}\"] }\n";
    let rules = parse_rules(rules);
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
    let unit = unit_of(&[
        (&["product:2", "product:1"], &["category:5"]),
        (&["product:1"], &["category:5", "category:7"]),
        (&[], &["category:7"]),
        (&[], &[]),
    ]);
    let batch = &unit.batch;
    assert_eq!(batch.items(ItemKind::RedisKey), vec!["product:1", "product:2"]);
    assert_eq!(batch.items(ItemKind::RedisTag), vec!["category:5", "category:7"]);
    assert!(batch.items(ItemKind::SurrogateKey).is_empty() && batch.items(ItemKind::Url).is_empty());
    // Each event still knows what it asked for: as indices into the batch, and as its own set.
    let own = |i: usize| asked_set(batch, &unit.asked, &unit.items[i]).unwrap();
    assert_eq!(asked_by(&unit.asked, &unit.items[0], ItemKind::RedisKey), [0, 1]);
    assert_eq!(asked_by(&unit.asked, &unit.items[1], ItemKind::RedisTag), [0, 1]);
    assert_eq!(own(0).items(ItemKind::RedisKey), ["product:1", "product:2"]);
    assert_eq!(own(0).items(ItemKind::RedisTag), ["category:5"]);
    assert_eq!(own(1).items(ItemKind::RedisKey), ["product:1"]);
    assert_eq!(own(2).items(ItemKind::RedisTag), ["category:7"]);
    assert!(own(3).is_empty() && !unit.items[3].asks_any() && unit.items[2].asks_any());
    assert!(unit.items[2].asks(&[ItemKind::RedisTag]) && !unit.items[2].asks(&[ItemKind::RedisKey]));
}

/// A sink of the given kinds that takes `per_batch` to confirm, and records when each item
/// arrived and when it was confirmed.
struct Recording {
    name: &'static str,
    kinds: &'static [ItemKind],
    per_batch: Duration,
    /// (item, when the call started, when it confirmed)
    log: std::sync::Mutex<Vec<(String, tokio::time::Instant, tokio::time::Instant)>>,
}

impl Recording {
    fn new(name: &'static str, kinds: &'static [ItemKind], per_batch_ms: u64) -> Arc<Recording> {
        Arc::new(Recording { name, kinds, per_batch: Duration::from_millis(per_batch_ms), log: Default::default() })
    }

    /// When each item was first confirmed.
    fn confirmed(&self) -> HashMap<String, tokio::time::Instant> {
        let mut at = HashMap::new();
        for (item, _, done) in self.log.lock().unwrap().iter() {
            at.entry(item.clone()).or_insert(*done);
        }
        at
    }
}

#[async_trait::async_trait]
impl Sink for Recording {
    fn name(&self) -> &str {
        self.name
    }

    fn kinds(&self) -> &'static [ItemKind] {
        self.kinds
    }

    async fn invalidate(&self, batch: &Invalidations, _: &Shutdown) -> Result<crate::sink::SinkReport, SinkError> {
        let started = tokio::time::Instant::now();
        tokio::time::sleep(self.per_batch).await;
        let done = tokio::time::Instant::now();
        let mut log = self.log.lock().unwrap();
        for &kind in self.kinds {
            log.extend(batch.items(kind).iter().map(|i| (i.clone(), started, done)));
        }
        Ok(crate::sink::SinkReport::default())
    }

    async fn ping(&self) -> bool {
        true
    }
}

const REDIS: &[ItemKind] = &[ItemKind::RedisKey, ItemKind::RedisTag];
const CDN: &[ItemKind] = &[ItemKind::SurrogateKey, ItemKind::Url];

/// Runs `events` changes of `public.t` (one every `gap_ms`) through a pipeline of `sinks` in
/// `layers`, and returns when each event was received and acknowledged (by id), and the metrics.
async fn run_layers(
    events: i64,
    gap_ms: u64,
    sinks: Vec<Arc<dyn Sink>>,
    layers: Vec<u8>,
    timing: LayerTiming,
    config: PipelineConfig,
) -> (Vec<(tokio::time::Instant, Option<tokio::time::Instant>)>, Arc<Metrics>) {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let dead_letters = file_dead_letters(dir.path(), &metrics).await;
    let rules = "version: 1\nrules:\n  - name: t\n    table: public.t\n    redis: { keys: [\"t:{id}\"] }\n    cdn: { surrogate_keys: [\"t-{id}\"] }\n";
    let rules = parse_rules(rules);
    let pipeline = Pipeline::new(config, rules, sinks, dead_letters, metrics.clone()).with_layers(layers, timing);
    let (acks_tx, mut acks_rx) = mpsc::unbounded_channel();
    let (tx, rx) = mpsc::channel(10_000);
    let received = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sent = received.clone();
    tokio::spawn(async move {
        for id in 0..events {
            let ack = crate::source::Ack::new(acks_tx.clone(), crate::source::Finished { stream: 0, seq: id });
            sent.lock().unwrap().push(tokio::time::Instant::now());
            tx.send(SourceEvent { ack, ..change(id) }).await.unwrap();
            tokio::time::sleep(Duration::from_millis(gap_ms)).await;
        }
    });
    pipeline.run(rx, &Shutdown::never()).await.unwrap();
    let mut acked = vec![None; events as usize];
    while let Ok(f) = acks_rx.try_recv() {
        acked[f.seq as usize] = Some(tokio::time::Instant::now());
    }
    let received = received.lock().unwrap().clone();
    (received.into_iter().zip(acked).collect(), metrics)
}

#[tokio::test(start_paused = true)]
async fn a_slow_outer_layer_holds_neither_the_inner_layer_nor_the_order_nor_the_acks() {
    // 200 events/s for 2 s; Redis confirms in 1 ms, the CDN takes 2 s per batch.
    let (redis, cdn) = (Recording::new("redis", REDIS, 1), Recording::new("cdn", CDN, 2000));
    let timing = LayerTiming { layer_delay: Duration::from_millis(50), ..LayerTiming::default() };
    let sinks: Vec<Arc<dyn Sink>> = vec![redis.clone(), cdn.clone()];
    let (events, metrics) = run_layers(400, 5, sinks, vec![0, 2], timing, pipeline_config(500, 5, 1)).await;

    let (at_redis, at_cdn) = (redis.confirmed(), cdn.confirmed());
    let cdn_started: HashMap<String, tokio::time::Instant> =
        cdn.log.lock().unwrap().iter().map(|(i, s, _)| (i.clone(), *s)).collect();
    for (id, (received, acked)) in events.iter().enumerate() {
        let key = at_redis[&format!("t:{id}")];
        assert!(key - *received <= Duration::from_millis(2), "event {id}: Redis at the pace of Redis");
        let started = cdn_started[&format!("t-{id}")];
        assert!(started >= key + Duration::from_millis(50), "event {id}: the CDN only after Redis + layer_delay");
        let acked = acked.expect("every event acknowledged");
        assert!(acked >= at_cdn[&format!("t-{id}")], "event {id}: acknowledged only after the last layer");
    }
    // The CDN got everything, in few, large batches (its own batching), and was never so far
    // behind that Redis had to wait for room in its queue.
    let cdn_calls = cdn.log.lock().unwrap().iter().map(|(_, s, _)| *s).collect::<std::collections::HashSet<_>>().len();
    assert!(cdn_calls <= 4, "{cdn_calls} calls");
    for layer in ["0", "2"] {
        assert_eq!(metrics.value("cdc_invalidator_layer_queue_wait_seconds_total", &[("layer", layer)]), 0.0);
    }
    assert_eq!(metrics.value("cdc_invalidator_layer_queue_events", &[("layer", "2")]), 0.0, "drained");
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_holds_the_layer_before_it_and_the_metrics_say_which() {
    // The CDN layer's queue holds 50 events; the CDN takes 1 s per batch of at most 50, while
    // 200 events/s arrive.
    let (redis, cdn) = (Recording::new("redis", REDIS, 1), Recording::new("cdn", CDN, 1000));
    let sinks: Vec<Arc<dyn Sink>> = vec![redis.clone(), cdn.clone()];
    let config = PipelineConfig { queue_capacity: 50, ..pipeline_config(50, 5, 1) };
    let (events, metrics) = run_layers(300, 5, sinks, vec![0, 2], LayerTiming::default(), config).await;
    assert!(events.iter().all(|(_, acked)| acked.is_some()), "everything finished in the end");
    assert_eq!(cdn.confirmed().len(), 300);
    let waited = |layer| metrics.value("cdc_invalidator_layer_queue_wait_seconds_total", &[("layer", layer)]);
    assert!(waited("2") > 1.0, "Redis waited for room in the CDN's queue: {}", waited("2"));
    // Redis, held, stopped taking events: its queue filled too, and intake waited for it (and,
    // in the daemon, the source). The outermost layer that is waited on is the one holding.
    assert!(waited("0") > 0.0, "the hold reached intake");
}

#[tokio::test(start_paused = true)]
async fn a_sink_that_is_down_holds_the_acks_but_not_the_other_sinks_of_its_layer() {
    // Two Redis targets in layer 0: `eu` confirms in 1 ms, `us` is down for 10 s (its first
    // call takes that long), while 20 events come one every 5 ms.
    let (eu, us) = (Recording::new("eu", REDIS, 1), Recording::new("us", REDIS, 10_000));
    let sinks: Vec<Arc<dyn Sink>> = vec![eu.clone(), us.clone()];
    let (events, _) = run_layers(20, 5, sinks, vec![0, 0], LayerTiming::default(), pipeline_config(500, 5, 1)).await;
    let (at_eu, at_us) = (eu.confirmed(), us.confirmed());
    for (id, (received, acked)) in events.iter().enumerate() {
        let key = format!("t:{id}");
        assert!(at_eu[&key] - *received <= Duration::from_millis(2), "event {id}: eu at its own pace, not held by us");
        assert!(at_us[&key] >= at_eu[&key] + Duration::from_secs(9), "event {id}: us only once it is back");
        let acked = acked.expect("every event acknowledged");
        assert!(acked >= at_us[&key], "event {id}: acknowledged only once every target confirmed it");
    }
    // How far ahead the healthy target runs is bounded by the layer's queue (50 events): then
    // intake waits for room, and so, in the daemon, does the source.
    let (eu, us) = (Recording::new("eu", REDIS, 1), Recording::new("us", REDIS, 10_000));
    let sinks: Vec<Arc<dyn Sink>> = vec![eu.clone(), us.clone()];
    let config = PipelineConfig { queue_capacity: 50, ..pipeline_config(50, 5, 1) };
    let start = tokio::time::Instant::now();
    let (events, metrics) = run_layers(300, 5, sinks, vec![0, 0], LayerTiming::default(), config).await;
    assert!(events.iter().all(|(_, acked)| acked.is_some()), "everything finished in the end");
    let ahead = eu.confirmed().values().filter(|&&at| at < start + Duration::from_secs(10)).count();
    assert!((40..=50).contains(&ahead), "eu ran ahead by up to the queue's 50 events: {ahead}");
    assert_eq!(us.confirmed().len(), 300);
    let waited = metrics.value("cdc_invalidator_layer_queue_wait_seconds_total", &[("layer", "0")]);
    assert!(waited > 5.0, "intake waited for room in the held layer: {waited}");
}

#[tokio::test(start_paused = true)]
async fn a_second_pass_repeats_every_layer_in_order_and_acknowledges_after_it() {
    let (redis, cdn) = (Recording::new("redis", REDIS, 1), Recording::new("cdn", CDN, 10));
    let timing = LayerTiming { repeat_after: Duration::from_millis(500), ..LayerTiming::default() };
    let sinks: Vec<Arc<dyn Sink>> = vec![redis.clone(), cdn.clone()];
    let (events, _) = run_layers(20, 5, sinks, vec![0, 2], timing, pipeline_config(500, 5, 1)).await;
    let (redis_log, cdn_log) = (redis.log.lock().unwrap().clone(), cdn.log.lock().unwrap().clone());
    for (id, (received, acked)) in events.iter().enumerate() {
        let key = format!("t:{id}");
        let passes: Vec<_> = redis_log.iter().filter(|(i, _, _)| *i == key).map(|(_, _, done)| *done).collect();
        assert_eq!(passes.len(), 2, "event {id}: two passes");
        assert!(passes[1] - *received >= Duration::from_millis(500), "event {id}: the second after repeat_after");
        let surrogate = format!("t-{id}");
        let cdn_passes: Vec<_> = cdn_log.iter().filter(|(i, _, _)| *i == surrogate).collect();
        assert_eq!(cdn_passes.len(), 2, "event {id}: the CDN twice too");
        assert!(cdn_passes[1].1 >= passes[1], "event {id}: in layer order");
        assert!(acked.expect("acknowledged") >= cdn_passes[1].2, "event {id}: acknowledged after the second pass");
    }
}

/// A sink that cannot work at all.
struct Broken;

#[async_trait::async_trait]
impl Sink for Broken {
    fn name(&self) -> &str {
        "broken"
    }

    fn kinds(&self) -> &'static [ItemKind] {
        CDN
    }

    async fn invalidate(&self, _: &Invalidations, _: &Shutdown) -> Result<crate::sink::SinkReport, SinkError> {
        Err(SinkError::Fatal("no credentials".into()))
    }

    async fn ping(&self) -> bool {
        false
    }
}

#[tokio::test(start_paused = true)]
async fn a_fatal_sink_error_in_an_outer_layer_stops_the_pipeline_at_once_unacknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let dead_letters = file_dead_letters(dir.path(), &metrics).await;
    let rules = "version: 1\nrules:\n  - name: t\n    table: public.t\n    redis: { keys: [\"t:{id}\"] }\n    cdn: { surrogate_keys: [\"t-{id}\"] }\n";
    let rules = parse_rules(rules);
    let redis = Recording::new("redis", REDIS, 1);
    let sinks: Vec<Arc<dyn Sink>> = vec![redis.clone(), Arc::new(Broken)];
    let pipeline = Pipeline::new(pipeline_config(500, 5, 1), rules, sinks, dead_letters, metrics)
        .with_layers(vec![0, 2], LayerTiming::default());
    let (acks_tx, mut acks_rx) = mpsc::unbounded_channel();
    // The source stays open (it never closes the queue): the error alone must end the run.
    let (tx, rx) = mpsc::channel(10);
    let ack = crate::source::Ack::new(acks_tx, crate::source::Finished { stream: 0, seq: 1 });
    tx.send(SourceEvent { ack, ..change(1) }).await.unwrap();
    let result = tokio::time::timeout(Duration::from_secs(60), pipeline.run(rx, &Shutdown::never())).await;
    let error = result.expect("stopped at once").expect_err("a fatal error");
    assert!(error.to_string().contains("sink broken: no credentials"), "{error}");
    assert_eq!(redis.confirmed().len(), 1, "Redis had done its part");
    assert!(acks_rx.try_recv().is_err(), "nothing acknowledged");
    drop(tx);
}

#[tokio::test(start_paused = true)]
async fn abandoning_leaves_every_unfinished_event_unacknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let dead_letters = file_dead_letters(dir.path(), &metrics).await;
    let rules = "version: 1\nrules:\n  - name: t\n    table: public.t\n    redis: { keys: [\"t:{id}\"] }\n  - name: u\n    table: public.u\n    cdn: { surrogate_keys: [\"u-{id}\"] }\n";
    let rules = parse_rules(rules);
    // The CDN never finishes within the test.
    let (redis, cdn) = (Recording::new("redis", REDIS, 1), Recording::new("cdn", CDN, 3_600_000));
    let sinks: Vec<Arc<dyn Sink>> = vec![redis.clone(), cdn.clone()];
    let pipeline = Pipeline::new(pipeline_config(500, 5, 1), rules, sinks, dead_letters, metrics)
        .with_layers(vec![0, 2], LayerTiming::default());
    let (acks_tx, mut acks_rx) = mpsc::unbounded_channel();
    let (tx, rx) = mpsc::channel(10);
    // Event 1 needs the CDN (held there); event 2 only Redis (finished, though after event 1).
    let cdn_event = {
        let mut e = change(1);
        if let Ok(Decoded::Change(c)) = &mut e.decoded {
            c.table = "public.u".into();
        }
        e
    };
    for (seq, event) in [(1, cdn_event), (2, change(2))] {
        let ack = crate::source::Ack::new(acks_tx.clone(), crate::source::Finished { stream: 0, seq });
        tx.send(SourceEvent { ack, ..event }).await.unwrap();
    }
    let (trigger, shutdown) = crate::shutdown::channel();
    let run = tokio::spawn(async move { pipeline.run(rx, &shutdown).await });
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(redis.confirmed().len(), 1, "Redis did its part at once");
    trigger.abandon();
    run.await.unwrap().expect("abandoning is not an error");
    let mut acked = Vec::new();
    while let Ok(f) = acks_rx.try_recv() {
        acked.push(f.seq);
    }
    // Event 2 waits behind event 1 (units keep their order to `finish`), so neither is
    // acknowledged: both are redelivered, nothing is lost.
    assert!(acked.is_empty(), "{acked:?}");
    assert!(cdn.confirmed().is_empty());
    drop(tx);
}

/// Runs `events` changes (one every 5 ms), event `id` committed at LSN `1000 + id`, through
/// Redis and a CDN with the second pass gated on `replicas`; returns when each event was
/// received and acknowledged.
async fn run_gated(
    events: i64,
    replicas: crate::freshness::Replicas,
    sinks: Vec<Arc<dyn Sink>>,
    metrics: Arc<Metrics>,
) -> Vec<(tokio::time::Instant, Option<tokio::time::Instant>)> {
    let dir = tempfile::tempdir().unwrap();
    let dead_letters = file_dead_letters(dir.path(), &metrics).await;
    let rules = "version: 1\nrules:\n  - name: t\n    table: public.t\n    redis: { keys: [\"t:{id}\"] }\n    cdn: { surrogate_keys: [\"t-{id}\"] }\n";
    let rules = parse_rules(rules);
    let pipeline = Pipeline::new(pipeline_config(500, 5, 1), rules, sinks, dead_letters, metrics.clone())
        .with_layers(vec![0, 2], LayerTiming::default())
        .with_freshness(replicas);
    let (acks_tx, mut acks_rx) = mpsc::unbounded_channel::<crate::source::Finished>();
    let (tx, rx) = mpsc::channel(10_000);
    let received = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sent = received.clone();
    let acked = Arc::new(std::sync::Mutex::new(vec![None; events as usize]));
    let acked_in = acked.clone();
    tokio::spawn(async move {
        while let Some(f) = acks_rx.recv().await {
            acked_in.lock().unwrap()[f.seq as usize] = Some(tokio::time::Instant::now());
        }
    });
    tokio::spawn(async move {
        for id in 0..events {
            let ack = crate::source::Ack::new(acks_tx.clone(), crate::source::Finished { stream: 0, seq: id });
            sent.lock().unwrap().push(tokio::time::Instant::now());
            let position =
                crate::source::Position::Postgres { lsn: 1000 + id as u64, commit_end_lsn: 1000 + id as u64 };
            tx.send(SourceEvent { ack, position, ..change(id) }).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    pipeline.run(rx, &Shutdown::never()).await.unwrap();
    tokio::task::yield_now().await;
    let acked = acked.lock().unwrap().clone();
    let received = received.lock().unwrap().clone();
    received.into_iter().zip(acked).collect()
}

#[tokio::test(start_paused = true)]
async fn with_read_replicas_the_second_pass_waits_for_every_replica_to_replay_the_commit() {
    let metrics = Arc::new(Metrics::new());
    let margin = Duration::from_millis(100);
    let (replicas, replayed) =
        crate::freshness::Replicas::manual(&["a", "b"], margin, Duration::from_secs(30), metrics.clone());
    // Replica a replays everything at once; replica b replays events 0..10 at 2 s, the rest at 4 s.
    let start = tokio::time::Instant::now();
    tokio::spawn(async move {
        replayed.send_modify(|v| v[0] = u64::MAX);
        tokio::time::sleep(Duration::from_secs(2)).await;
        replayed.send_modify(|v| v[1] = 1010);
        tokio::time::sleep(Duration::from_secs(2)).await;
        replayed.send_modify(|v| v[1] = 2000);
        tokio::time::sleep(Duration::from_secs(60)).await;
    });
    let (redis, cdn) = (Recording::new("redis", REDIS, 1), Recording::new("cdn", CDN, 1));
    let events = run_gated(20, replicas, vec![redis.clone(), cdn.clone()], metrics.clone()).await;
    let (redis_log, cdn_log) = (redis.log.lock().unwrap().clone(), cdn.log.lock().unwrap().clone());
    for (id, (_, acked)) in events.iter().enumerate() {
        let passes: Vec<_> = redis_log.iter().filter(|(i, _, _)| *i == format!("t:{id}")).collect();
        assert_eq!(passes.len(), 2, "event {id}: two passes");
        let released = start + Duration::from_secs(if id < 10 { 2 } else { 4 });
        assert!(passes[0].2 < start + Duration::from_secs(1), "event {id}: the first pass at once");
        assert!(passes[1].1 >= released + margin, "event {id}: the second after b replayed it, plus margin");
        // A batch waits for its newest commit: an event batched with event 10 waits for 4 s.
        let latest = start + Duration::from_secs(if id < 5 { 2 } else { 4 });
        assert!(
            passes[1].1 < latest + Duration::from_secs(1),
            "event {id}: and not much later: {:?}",
            passes[1].1 - start
        );
        let cdn_passes: Vec<_> = cdn_log.iter().filter(|(i, _, _)| *i == format!("t-{id}")).collect();
        assert_eq!(cdn_passes.len(), 2, "event {id}: the CDN twice too");
        assert!(acked.expect("acknowledged") >= cdn_passes[1].2, "event {id}: acknowledged after the second pass");
    }
    assert_eq!(metrics.value("cdc_invalidator_freshness_max_wait_total", &[]), 0.0);
    assert_eq!(
        metrics.value("cdc_invalidator_settled_seconds", &[("sink", "redis")]),
        0.0,
        "no commit time: nothing observed"
    );
}

#[tokio::test(start_paused = true)]
async fn a_replica_that_never_replays_delays_the_second_pass_only_to_max_wait() {
    let metrics = Arc::new(Metrics::new());
    let max_wait = Duration::from_secs(3);
    let (replicas, replayed) =
        crate::freshness::Replicas::manual(&["dead"], Duration::from_millis(100), max_wait, metrics.clone());
    let start = tokio::time::Instant::now();
    let (redis, cdn) = (Recording::new("redis", REDIS, 1), Recording::new("cdn", CDN, 1));
    let events = run_gated(10, replicas, vec![redis.clone(), cdn.clone()], metrics.clone()).await;
    drop(replayed);
    let redis_log = redis.log.lock().unwrap().clone();
    for (id, (_, acked)) in events.iter().enumerate() {
        let passes: Vec<_> = redis_log.iter().filter(|(i, _, _)| *i == format!("t:{id}")).collect();
        assert_eq!(passes.len(), 2, "event {id}: two passes");
        assert!(passes[1].1 >= start + max_wait, "event {id}: held up to max_wait");
        assert!(passes[1].1 < start + max_wait + Duration::from_secs(1), "event {id}: not longer");
        assert!(acked.is_some(), "event {id}: acknowledged after it");
    }
    assert!(metrics.value("cdc_invalidator_freshness_max_wait_total", &[("replica", "dead")]) >= 1.0, "counted");
}

/// A Redis target that is down (its calls wait until it is back, as its retries would) from
/// `down` until `up`; records when each item was confirmed.
struct Outage {
    name: &'static str,
    down: tokio::time::Instant,
    up: tokio::time::Instant,
    log: std::sync::Mutex<Vec<(String, tokio::time::Instant)>>,
}

#[async_trait::async_trait]
impl Sink for Outage {
    fn name(&self) -> &str {
        self.name
    }

    fn kinds(&self) -> &'static [ItemKind] {
        REDIS
    }

    async fn invalidate(&self, batch: &Invalidations, _: &Shutdown) -> Result<crate::sink::SinkReport, SinkError> {
        let now = tokio::time::Instant::now();
        if now >= self.down && now < self.up {
            tokio::time::sleep_until(self.up).await;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        let done = tokio::time::Instant::now();
        self.log.lock().unwrap().extend(batch.items(ItemKind::RedisKey).iter().map(|k| (k.clone(), done)));
        Ok(crate::sink::SinkReport::default())
    }

    async fn ping(&self) -> bool {
        true
    }
}

#[tokio::test(start_paused = true)]
async fn a_target_that_is_down_delays_only_its_own_second_pass() {
    // Two Redis targets and a CDN behind them; `us` goes down after the first passes and comes
    // back 4.5 s later, while every event's second pass falls due 1 s after its first.
    let start = tokio::time::Instant::now();
    let eu = Recording::new("eu", REDIS, 1);
    let us = Arc::new(Outage {
        name: "us",
        down: start + Duration::from_millis(500),
        up: start + Duration::from_secs(5),
        log: Default::default(),
    });
    let cdn = Recording::new("cdn", CDN, 1);
    let timing = LayerTiming { repeat_after: Duration::from_secs(1), ..LayerTiming::default() };
    let sinks: Vec<Arc<dyn Sink>> = vec![eu.clone(), us.clone(), cdn.clone()];
    let (events, _) = run_layers(20, 5, sinks, vec![0, 0, 2], timing, pipeline_config(500, 5, 1)).await;
    let (eu_log, us_log, cdn_log) =
        (eu.log.lock().unwrap().clone(), us.log.lock().unwrap().clone(), cdn.log.lock().unwrap().clone());
    for (id, (received, acked)) in events.iter().enumerate() {
        let key = format!("t:{id}");
        let eu_passes: Vec<_> = eu_log.iter().filter(|(i, _, _)| *i == key).map(|(_, _, done)| *done).collect();
        assert_eq!(eu_passes.len(), 2, "event {id}: two passes at eu");
        let late = eu_passes[1] - *received;
        assert!(
            late >= Duration::from_secs(1) && late <= Duration::from_millis(1020),
            "event {id}: eu's second pass on time, {late:?} after it came"
        );
        let us_passes: Vec<_> = us_log.iter().filter(|(i, _)| *i == key).map(|(_, done)| *done).collect();
        assert_eq!(us_passes.len(), 2, "event {id}: two passes at us");
        assert!(us_passes[0] < us.down, "event {id}: the first pass before the outage");
        assert!(us_passes[1] >= us.up, "event {id}: us repeats it once back");
        // The CDN repeats only after every Redis target did (else it could refill from a stale
        // cache in front of it), and the event is acknowledged only after all of that.
        let surrogate = format!("t-{id}");
        let cdn_passes: Vec<_> = cdn_log.iter().filter(|(i, _, _)| *i == surrogate).collect();
        assert_eq!(cdn_passes.len(), 2, "event {id}: two passes at the CDN");
        assert!(cdn_passes[1].1 >= us_passes[1], "event {id}: the CDN after both Redis targets");
        let acked = acked.expect("acknowledged in the end");
        assert!(acked >= cdn_passes[1].2, "event {id}: acknowledged only after every sink's second pass");
    }
}

/// A dead-letter destination that keeps failing (every write to /dev/full is ENOSPC, retried
/// until shutdown) holds the finish stage. The queue in front of finish is bounded, so the
/// layer, intake and the source stop taking events instead of piling them up in memory (it
/// was unbounded: every malformed event the source had was taken in).
#[tokio::test(start_paused = true)]
async fn a_dead_letter_destination_that_keeps_failing_holds_intake_instead_of_filling_memory() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let metrics = Arc::new(Metrics::new());
    let dead = crate::config::DeadLetterConfig { file: Some("/dev/full".into()), ..Default::default() };
    let dead_letters = DeadLetters::open(&dead, None, metrics.clone()).await.unwrap();
    let rules = "version: 1\nrules:\n  - name: t\n    table: public.t\n    redis: { keys: [\"t:{id}\"] }\n";
    let rules = parse_rules(rules);
    let sink = Arc::new(SlowSink { per_batch: Duration::ZERO, batches: Default::default() });
    let config = PipelineConfig { queue_capacity: 40, ..pipeline_config(10, 5, 1) };
    let pipeline = Pipeline::new(config, rules, vec![sink], dead_letters, metrics.clone());
    let (tx, rx) = mpsc::channel(10);
    let taken = Arc::new(AtomicUsize::new(0));
    let counter = taken.clone();
    // Malformed events: each one is a dead letter.
    let feeder = tokio::spawn(async move {
        for _ in 0..10_000 {
            if tx.send(arrival()).await.is_err() {
                return;
            }
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    let (trigger, shutdown) = crate::shutdown::channel();
    let run = tokio::spawn(async move { pipeline.run(rx, &shutdown).await });
    tokio::time::sleep(Duration::from_secs(120)).await;
    let taken = taken.load(Ordering::Relaxed);
    // The source queue (10), the batch intake waits to queue (10), the layer's queue (40),
    // the unit the layer waits to hand to finish (10), finish's queue (40 / 10 = 4 units of
    // at most 10) and the unit finish is writing (10).
    assert!(taken <= 120, "{taken} events taken while no dead letter could be written");
    assert!(metrics.value("cdc_invalidator_dead_letter_write_errors_total", &[]) > 0.0);
    trigger.abandon();
    assert!(run.await.unwrap().is_ok(), "abandoned, not failed");
    feeder.abort();
}

/// Dead letters written to `dl.jsonl` in `dir`.
async fn file_dead_letters(dir: &std::path::Path, metrics: &Arc<Metrics>) -> DeadLetters {
    let dead = crate::config::DeadLetterConfig { file: Some(dir.join("dl.jsonl")), ..Default::default() };
    DeadLetters::open(&dead, None, metrics.clone()).await.unwrap()
}

/// A rules file's text, checked.
fn parse_rules(text: &str) -> Arc<Rules> {
    Arc::new(Rules::parse(text, std::path::Path::new("rules.yaml")).unwrap())
}

/// One histogram series of `metrics`' exposition (`labels` as rendered, `""` for none): its
/// cumulative buckets (upper bound, count), sum and count.
fn histogram_series(metrics: &Metrics, name: &str, labels: &str) -> (Vec<(f64, u64)>, f64, u64) {
    let text = metrics.render();
    let value = |line: &str| line.rsplit(' ').next().unwrap().to_string();
    let (mut buckets, mut sum, mut count) = (Vec::new(), None, None);
    let prefix = if labels.is_empty() { String::new() } else { format!("{labels},") };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(&format!("{name}_bucket{{{prefix}le=\"")) {
            let le = rest.split('"').next().unwrap();
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap() };
            buckets.push((le, value(line).parse().unwrap()));
        }
        let series = |part: &str| match labels {
            "" => format!("{name}_{part} "),
            _ => format!("{name}_{part}{{{labels}}} "),
        };
        if line.starts_with(&series("sum")) {
            sum = Some(value(line).parse().unwrap());
        }
        if line.starts_with(&series("count")) {
            count = Some(value(line).parse().unwrap());
        }
    }
    (buckets, sum.unwrap_or_else(|| panic!("{name} {{{labels}}}: no sum in\n{text}")), count.unwrap())
}

#[tokio::test]
async fn every_staleness_histogram_counts_each_event_once_in_its_bucket_whatever_the_units() {
    // Ages inside the staleness buckets, away from their bounds, every one in two tables;
    // batches of at most 4 events, so the figures add up over several units. Each observation
    // is its age plus however long the test took until then (milliseconds, more on a loaded
    // machine): the checks below allow exactly that much, measured.
    let ages = [0.15, 0.35, 0.7, 1.7, 3.5, 7.0, 20.0, 45.0, 100.0, 500.0, 2000.0];
    let now = std::time::SystemTime::now();
    let events: Vec<SourceEvent> = ["public.t", "public.u"]
        .iter()
        .flat_map(|table| {
            ages.iter().enumerate().map(move |(id, age)| {
                let mut event = change(id as i64);
                if let Ok(Decoded::Change(c)) = &mut event.decoded {
                    c.table = table.to_string();
                    c.committed_at = Some(now - Duration::from_secs_f64(*age));
                }
                event
            })
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let dead_letters = file_dead_letters(dir.path(), &metrics).await;
    let rules = "version: 1\nrules:\n  - name: t\n    table: public.*\n    redis: { keys: [\"t:{id}\"] }\n";
    let rules = parse_rules(rules);
    let sink = Arc::new(SlowSink { per_batch: Duration::from_millis(1), batches: Default::default() });
    let pipeline = Pipeline::new(pipeline_config(4, 1, 1), rules, vec![sink.clone()], dead_letters, metrics.clone());
    let (tx, rx) = mpsc::channel(100);
    for event in events {
        tx.send(event).await.unwrap();
    }
    drop(tx);
    pipeline.run(rx, &Shutdown::never()).await.unwrap();
    // Every observation was made before this: each lies within [age, age + took].
    let took = now.elapsed().unwrap_or_default().as_secs_f64();
    assert!(sink.batches.lock().unwrap().len() >= 5, "several units");

    // Each histogram against the ages of the events it covers: every bucket's count, the count
    // and the sum, each within what the test's own duration allows.
    let check = |name: &str, labels: &str, ages: &[f64]| {
        let (buckets, sum, count) = histogram_series(&metrics, name, labels);
        assert!(!buckets.is_empty(), "{name} {labels}");
        for (le, n) in buckets {
            let surely = ages.iter().filter(|a| **a + took <= le).count() as u64;
            let at_most = ages.iter().filter(|a| **a <= le).count() as u64;
            assert!((surely..=at_most).contains(&n), "{name} {{{labels}}} le={le}: {n} (test took {took} s)");
        }
        assert_eq!(count, ages.len() as u64, "{name} {{{labels}}}");
        let expected: f64 = ages.iter().sum();
        let slack = took * ages.len() as f64 + 0.001;
        assert!(sum >= expected - 0.001 && sum <= expected + slack, "{name} {{{labels}}}: sum {sum}, ages {expected}");
    };
    let both: Vec<f64> = ages.iter().chain(ages.iter()).copied().collect();
    check("cdc_invalidator_source_delay_seconds", "", &both);
    check("cdc_invalidator_acknowledged_staleness_seconds", "", &both);
    check("cdc_invalidator_staleness_seconds", "sink=\"slow\"", &both);
    check("cdc_invalidator_settled_seconds", "sink=\"slow\"", &both);
    check("cdc_invalidator_table_staleness_seconds", "table=\"public.t\"", &ages);
    check("cdc_invalidator_table_staleness_seconds", "table=\"public.u\"", &ages);
    let (_, _, processed) = histogram_series(&metrics, "cdc_invalidator_processing_seconds", "sink=\"slow\"");
    assert_eq!(processed, both.len() as u64);
}

/// A sink that rejects one key of every batch holding it, and confirms the rest.
struct Rejecting {
    key: &'static str,
}

#[async_trait::async_trait]
impl Sink for Rejecting {
    fn name(&self) -> &str {
        "rejecting"
    }

    async fn invalidate(&self, batch: &Invalidations, _: &Shutdown) -> Result<crate::sink::SinkReport, SinkError> {
        let keys = batch.items(ItemKind::RedisKey);
        let rejected = keys.iter().position(|k| k == self.key).map(|index| crate::sink::Rejected {
            kind: ItemKind::RedisKey,
            index,
            reason: "no".into(),
        });
        Ok(crate::sink::SinkReport {
            confirmed: vec![(ItemKind::RedisKey, (keys.len() - usize::from(rejected.is_some())) as u64)],
            rejected: rejected.into_iter().collect(),
            removed: 0,
        })
    }

    async fn ping(&self) -> bool {
        true
    }
}

#[tokio::test]
async fn a_rejected_item_dead_letters_exactly_the_events_that_asked_for_it() {
    // Events 1 to 6 in one unit; the rule renders `t:{id}`, ids 1, 2, 1, 3, 1, 2: the sink
    // rejects `t:1`, which three of them asked for (the batch holds it once).
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let dead_letters = file_dead_letters(dir.path(), &metrics).await;
    let rules = "version: 1\nrules:\n  - name: t\n    table: public.t\n    redis: { keys: [\"t:{id}\"] }\n";
    let rules = parse_rules(rules);
    let sink = Arc::new(Rejecting { key: "t:1" });
    let pipeline = Pipeline::new(pipeline_config(100, 50, 50), rules, vec![sink], dead_letters, metrics.clone());
    let (tx, rx) = mpsc::channel(100);
    for (line, id) in [1, 2, 1, 3, 1, 2].into_iter().enumerate() {
        let mut event = change(id);
        event.position = crate::source::Position::File { line: line as u64 + 1 };
        tx.send(event).await.unwrap();
    }
    drop(tx);
    pipeline.run(rx, &Shutdown::never()).await.unwrap();
    let letters = std::fs::read_to_string(dir.path().join("dl.jsonl")).unwrap();
    let lines: Vec<u64> = letters
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["source"]["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, [1, 3, 5], "{letters}");
    assert!(letters.lines().all(|l| l.contains("sink_rejected") && l.contains("t:1")), "{letters}");
    let count = |outcome| metrics.value("cdc_invalidator_events_total", &[("outcome", outcome)]);
    assert_eq!((count("partial"), count("invalidated")), (3.0, 3.0));
}
