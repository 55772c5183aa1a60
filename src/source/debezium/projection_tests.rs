//! Column projection (`onepass.rs`, `Keep`) against whole rows: for every message the one-pass
//! tests decode (fixtures, edge cases, mutations), decoding with the projection of each rules
//! file below declines, fails and succeeds exactly as decoding whole rows, its rows hold the
//! same value (or absence) for every column the rules read, and the rules' `Evaluation`
//! (invalidations, matched rules, errors) is the same. And an event decoded for one rules load
//! and evaluated by another is decoded again in full first (`encoded::unproject`).

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use super::{decode_keeping, onepass, DecodeError, Placeholders};
use crate::event::{Decoded, Row};
use crate::rules::{Projection, Rules};
// The rules of the pipeline tests (`tests/support/events.rs`): two columns of one table.
use crate::source::test_events::RULES as PIPELINE;
use crate::source::{Ack, Position, RawMessage, SourceEvent};

/// A glob matching every table, reading columns most tables lack (errors), and a table-wide
/// glob beside an exact rule of a table it matches.
const GLOBS: &str = r#"version: 1
rules:
  - name: everything
    table: "*.*"
    ops: [insert, update, delete, snapshot]
    redis:
      keys: ["row:{id}", "pk:{pk}", "name:{name|lower}"]
  - name: public-tables
    table: public.*
    cdn:
      surrogate_keys: ["slug-{slug|urlencode}"]
  - name: products
    table: public.products
    redis:
      tags: ["category:{category_id}"]
"#;

/// `when_changed` (its columns read by no template), vars, a template of vars alone and
/// `on_truncate`.
const WHEN_CHANGED: &str = r#"version: 1
rules:
  - name: price-changes
    table: public.products
    ops: [insert, update, delete, snapshot]
    when_changed: [price, name]
    vars:
      locale: [en, fr]
    redis:
      keys: ["product:{id}:{locale}", "all:{locale}"]
    on_truncate:
      redis: { tags: ["products:all"] }
  - name: customers
    table: inventory.customers
    when_changed: [email]
    redis:
      keys: ["customer:{id}"]
  - name: glob-changes
    table: "*.customers*"
    when_changed: [first_name]
    redis:
      keys: ["c:{last_name}"]
"#;

/// Columns messages lack, TOAST placeholders (`payload`, `blob`, Oracle's `SLUG` and `DATA`),
/// the edge cases' `v` and `n` columns, and tables named like the topics the tests decode on
/// (so that the columns kept while the table is unknown are others than those needed).
const ODD_COLUMNS: &str = r#"version: 1
rules:
  - name: missing
    table: public.products
    redis:
      keys: ["missing:{missing}", "v:{v}", "n:{n}", "a:{a}"]
  - name: toast
    table: dbz1258.toast_test
    redis:
      keys: ["toast:{pk}:{payload}", "label:{label}"]
  - name: toast-products
    table: public.products
    cdn:
      urls: ["https://x.example/{blob}/{slug}"]
  - name: oracle
    table: DEBEZIUM.DOCS
    redis:
      keys: ["doc:{ID}:{SLUG}", "data:{DATA}"]
  - name: topic-named
    table: dbo.customers
    redis:
      keys: ["email:{email}"]
  - name: temporal
    table: "*.orders"
    redis:
      keys: ["order:{id}:{day}:{at}", "local:{local_ts}"]
"#;

/// The rules files projections are checked with; one more with no rule matching anything.
pub(super) fn rules_files() -> &'static [Rules] {
    static RULES: OnceLock<Vec<Rules>> = OnceLock::new();
    RULES.get_or_init(|| {
        let contract = include_str!("../../../tests/fixtures/rules/contract.yaml");
        let nothing =
            "version: 1\nrules:\n  - name: none\n    table: no.such_table\n    redis:\n      keys: [\"k:{id}\"]\n";
        [PIPELINE, contract, GLOBS, WHEN_CHANGED, ODD_COLUMNS, nothing]
            .iter()
            .map(|text| Rules::parse(text, Path::new("rules.yaml")).unwrap_or_else(|e| panic!("{e}\n{text}")))
            .collect()
    })
}

/// Checks the message's projected decodes against `whole`, its decode with whole rows (which
/// the caller has compared with the general path): declines, errors and every outcome but
/// the rows' columns the same, and the rules' evaluation the same. Returns how many of the
/// projected decodes have projected rows (the fast path took the message and kept fewer
/// columns).
pub(super) fn same_projected(
    placeholders: &Placeholders,
    topic: &str,
    key: Option<&[u8]>,
    value: &[u8],
    whole: &Result<Decoded, DecodeError>,
) -> usize {
    let declined = onepass::decode(placeholders, topic, key, value, None).is_none();
    let mut projected_rows = 0;
    for rules in rules_files() {
        let projection = rules.projection();
        let fast = onepass::decode(placeholders, topic, key, value, Some(projection));
        assert_eq!(fast.is_none(), declined, "declines with a projection as without: {:?}", text(value));
        let projected = decode_keeping(placeholders, topic, key, Some(value), Some(projection));
        if let Some(fast) = &fast {
            assert_eq!(fast, &projected, "onepass::decode is what decode_keeping gives: {:?}", text(value));
        }
        projected_rows += usize::from(compare(rules, &projected, whole, value));
    }
    projected_rows
}

fn text(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(bytes)
}

/// Asserts `projected` is `whole` to `rules`; says whether it has a projected row.
fn compare(
    rules: &Rules,
    projected: &Result<Decoded, DecodeError>,
    whole: &Result<Decoded, DecodeError>,
    value: &[u8],
) -> bool {
    let (Ok(Decoded::Change(p)), Ok(Decoded::Change(w))) = (projected, whole) else {
        assert_eq!(projected, whole, "outcomes with a projection: {:?}", text(value));
        return false;
    };
    let projection = rules.projection();
    assert_eq!(
        (&p.table, p.op, p.committed_at, p.lsn, p.before.is_some(), p.after.is_some()),
        (&w.table, w.op, w.committed_at, w.lsn, w.before.is_some(), w.after.is_some()),
        "the event but its rows: {:?}",
        text(value)
    );
    let mut projected_row = false;
    for (p_row, w_row) in [(&p.before, &w.before), (&p.after, &w.after)] {
        let (Some(p_row), Some(w_row)) = (p_row, w_row) else { continue };
        match p_row.projection() {
            None => assert_eq!(p_row, w_row, "a row saying it is whole is: {:?}", text(value)),
            Some(id) => {
                assert_eq!(id, projection.id(), "decoded for this projection");
                projected_row = true;
                for column in projection.columns(&p.table) {
                    assert_eq!(p_row.get(&**column), w_row.get(&**column), "column {column}: {:?}", text(value));
                }
            }
        }
    }
    assert_eq!(rules.evaluate(p), rules.evaluate(w), "evaluation of {:?}", text(value));
    projected_row
}

/// A message as the Kafka source hands it over, decoded for `projection`.
fn source_event(topic: &str, key: Option<&[u8]>, value: &[u8], projection: &Projection) -> SourceEvent {
    let decoded = super::decode_projected(topic, key, Some(value), projection)
        .map_err(|e| crate::source::Malformed(e.to_string()));
    SourceEvent {
        position: Position::Kafka { topic: topic.into(), partition: 0, offset: 1 },
        decoded,
        raw: RawMessage { topic: Some(topic.into()), key: key.map(<[u8]>::to_vec), value: Some(value.to_vec()) },
        logged_at: None,
        received: Instant::now(),
        ack: Ack::detached(),
    }
}

fn change(event: &SourceEvent) -> &crate::event::ChangeEvent {
    match &event.decoded {
        Ok(Decoded::Change(change)) => change,
        other => panic!("not a change: {other:?}"),
    }
}

/// An update decoded for rules reading `id` and `category_id` (the pipeline's), then evaluated
/// by reloaded rules reading `slug` and `price` too: decoded again in full first, it gives what
/// whole rows give; evaluated without that, it would lose invalidations.
#[test]
fn debezium_projection_reloaded_rules_see_whole_rows() {
    let before = rules_files().first().expect("the pipeline's rules");
    let reloaded = Rules::parse(
        r#"version: 1
rules:
  - name: product-pages
    table: public.products
    when_changed: [price]
    redis:
      keys: ["product:{id}", "slug:{slug}"]
      tags: ["category:{category_id}"]
"#,
        Path::new("reloaded.yaml"),
    )
    .expect("rules");
    let topic = "shop.public.products";
    let value = br#"{"before":{"id":42,"name":"W","price":"1.00","category_id":5,"slug":"old-slug"},"after":{"id":42,"name":"W","price":"2.00","category_id":6,"slug":"new-slug"},"source":{"schema":"public","table":"products"},"op":"u"}"#;
    let whole = super::decode(topic, Some(br#"{"id":42}"#), Some(value)).expect("decodes");
    let Decoded::Change(whole) = whole else { panic!("a change") };
    let expected = reloaded.evaluate(&whole);
    assert!(expected.invalidations.items(crate::sink::ItemKind::RedisKey).iter().any(|k| k == "slug:old-slug"));

    let mut event = source_event(topic, Some(br#"{"id":42}"#), value, before.projection());
    let projected = change(&event).clone();
    assert!(projected.after.as_ref().is_some_and(|row| row.projection() == Some(before.projection().id())));
    assert_eq!(projected.after.as_ref().map(Row::len), Some(2), "only id and category_id: {projected:?}");
    // What the reloaded rules would make of the projected rows: the slug keys, lost (the
    // template cannot render without the column).
    assert_ne!(reloaded.evaluate(&projected), expected, "the projected rows do lack columns");

    // Under the rules it was decoded for, it is left as it is.
    crate::source::encoded::unproject(&mut event, before.projection());
    assert_eq!(change(&event), &projected);
    assert_eq!(before.evaluate(change(&event)), before.evaluate(&whole));

    // Under the reloaded rules, decoded again: whole rows, the same evaluation as a whole decode.
    crate::source::encoded::unproject(&mut event, reloaded.projection());
    assert_eq!(change(&event), &whole);
    assert_eq!(reloaded.evaluate(change(&event)), expected);

    // And the same the other way round, and for rules loaded again from the same text (a new
    // load is a new projection: its events are never taken for another's).
    let again = Rules::parse(PIPELINE, Path::new("again.yaml")).expect("rules");
    assert_ne!(again.projection().id(), before.projection().id());
    let mut event = source_event(topic, Some(br#"{"id":42}"#), value, reloaded.projection());
    crate::source::encoded::unproject(&mut event, again.projection());
    assert_eq!(change(&event), &whole);
}

/// Errors, tombstones and events without projected rows pass `unproject` untouched; a
/// projected event whose raw copy names no topic becomes a dead letter rather than being
/// evaluated without its columns.
#[test]
fn debezium_projection_unproject_leaves_the_rest_alone() {
    let rules = rules_files().first().expect("rules");
    let other = Rules::parse(PIPELINE, Path::new("other.yaml")).expect("rules");
    let topic = "shop.public.products";
    for value in [&b"{}"[..], b"null", br#"{"source":{"table":"t"},"op":"x"}"#, br#"{"ts_ms":5}"#] {
        let mut event = source_event(topic, None, value, rules.projection());
        let before = format!("{:?}", event.decoded);
        crate::source::encoded::unproject(&mut event, other.projection());
        assert_eq!(format!("{:?}", event.decoded), before);
    }
    // The general path (a nested value) keeps whole rows: nothing to decode again.
    let nested = br#"{"after":{"id":1,"tags":[1]},"source":{"schema":"public","table":"products"},"op":"c"}"#;
    let mut event = source_event(topic, None, nested, rules.projection());
    assert_eq!(change(&event).after.as_ref().and_then(Row::projection), None);
    let before = format!("{:?}", event.decoded);
    crate::source::encoded::unproject(&mut event, other.projection());
    assert_eq!(format!("{:?}", event.decoded), before);

    let value = br#"{"after":{"id":1},"source":{"schema":"public","table":"products"},"op":"c"}"#;
    let mut event = source_event(topic, None, value, rules.projection());
    event.raw.topic = None;
    crate::source::encoded::unproject(&mut event, other.projection());
    assert!(event.decoded.is_err(), "{:?}", event.decoded);
}

/// What a projected image holds and says, on the bench's message: only the columns read, a
/// whole image that has no columns at all, and a present (empty) image when none is kept.
#[test]
fn debezium_projection_keeps_images_present() {
    let rules = rules_files().first().expect("rules");
    let nothing = rules_files().last().expect("rules");
    let placeholders = Placeholders::new(None);
    let topic = "shop.public.products";
    let value = br#"{"before":{"id":1,"name":"W","price":"1.00","category_id":5,"slug":"w"},"after":{},"source":{"schema":"public","table":"products"},"op":"u"}"#;
    let decode = |rules: &Rules| match decode_keeping(&placeholders, topic, None, Some(value), Some(rules.projection()))
    {
        Ok(Decoded::Change(change)) => change,
        other => panic!("{other:?}"),
    };
    let event = decode(rules);
    let before = event.before.as_ref().expect("before");
    assert_eq!(before.keys().collect::<Vec<_>>(), ["category_id", "id"]);
    assert_eq!(before.projection(), Some(rules.projection().id()));
    assert_eq!(event.after.as_ref().map(|a| (a.len(), a.projection())), Some((0, Some(rules.projection().id()))));
    // No rule for the table: the images are present and empty.
    let event = decode(nothing);
    assert_eq!(event.before.as_ref().map(|b| (b.len(), b.projection())), Some((0, Some(nothing.projection().id()))));
    assert!(nothing.projection().columns("public.products").is_empty());
}

/// The projection of each rules file: the union over the rules matching a table, globs
/// included, of their templates' and `when_changed`'s columns; nothing for other tables.
#[test]
fn debezium_projection_columns_per_table() {
    let files = rules_files();
    let names = |projection: &Projection, table: &str| -> Vec<String> {
        projection.columns(table).iter().map(|c| c.to_string()).collect()
    };
    assert_eq!(names(files[0].projection(), "public.products"), ["category_id", "id"]);
    assert!(names(files[0].projection(), "public.orders").is_empty());
    // The contract's: `when_changed` and every template, vars excluded.
    assert_eq!(names(files[1].projection(), "public.products"), ["category_id", "id", "name", "price", "slug"]);
    // Globs: an exact table gets the globs matching it; another table every glob's columns.
    assert_eq!(names(files[2].projection(), "public.products"), ["category_id", "id", "name", "pk", "slug"]);
    assert_eq!(names(files[2].projection(), "inventory.customers"), ["id", "name", "pk", "slug"]);
    assert_eq!(names(files[3].projection(), "public.products"), ["id", "name", "price"]);
    assert_eq!(names(files[3].projection(), "inventory.customers"), ["email", "first_name", "id", "last_name"]);
    assert_eq!(names(files[3].projection(), "dbo.customers_2"), ["first_name", "last_name"]);
    assert!(names(files[3].projection(), "public.orders").is_empty());
}

/// A sink that records every item it is asked to invalidate.
#[derive(Default)]
struct Recording(std::sync::Mutex<Vec<(crate::sink::ItemKind, String)>>);

#[async_trait::async_trait]
impl crate::sink::Sink for Recording {
    fn name(&self) -> &str {
        "recording"
    }

    fn kinds(&self) -> &'static [crate::sink::ItemKind] {
        &crate::sink::ItemKind::ALL
    }

    async fn invalidate(
        &self,
        batch: &crate::sink::Invalidations,
        _: &crate::shutdown::Shutdown,
    ) -> Result<crate::sink::SinkReport, crate::sink::SinkError> {
        let mut got = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for kind in crate::sink::ItemKind::ALL {
            got.extend(batch.items(kind).iter().map(|item| (kind, item.clone())));
        }
        Ok(crate::sink::SinkReport::default())
    }

    async fn ping(&self) -> bool {
        true
    }
}

/// Everything `evaluations` ask for, each item once, in order.
fn union(evaluations: impl IntoIterator<Item = crate::rules::Evaluation>) -> Vec<(crate::sink::ItemKind, String)> {
    let mut all: Vec<_> = evaluations
        .into_iter()
        .flat_map(|e| {
            crate::sink::ItemKind::ALL
                .into_iter()
                .flat_map(move |kind| e.invalidations.items(kind).to_vec().into_iter().map(move |item| (kind, item)))
        })
        .collect();
    all.sort();
    all.dedup();
    all
}

/// The daemon's reload, through the pipeline: events the source decoded for the old rules,
/// evaluated by intake under the reloaded ones (which read other columns), invalidate what
/// whole rows make the reloaded rules invalidate.
#[tokio::test]
async fn debezium_projection_pipeline_after_a_reload_loses_nothing() {
    let old = Rules::parse(PIPELINE, Path::new("old.yaml")).expect("rules");
    let reloaded = Arc::new(
        Rules::parse(
            r#"version: 1
rules:
  - name: pages
    table: public.products
    when_changed: [price, name]
    redis:
      keys: ["slug:{slug}", "product:{id}"]
    cdn:
      urls: ["https://shop.example/{name|urlencode}"]
"#,
            Path::new("reloaded.yaml"),
        )
        .expect("rules"),
    );
    let topic = "shop.public.products";
    let messages: Vec<(Vec<u8>, Vec<u8>)> = (0..40)
        .map(|id| {
            let value = format!(
                r#"{{"before":{{"id":{id},"name":"W {id}","price":"1.00","category_id":1,"slug":"w-{id}"}},"after":{{"id":{id},"name":"W {id}","price":"{}","category_id":2,"slug":"w-{id}-new"}},"source":{{"schema":"public","table":"products"}},"op":"u"}}"#,
                if id % 2 == 0 { "2.00" } else { "1.00" }
            );
            (format!(r#"{{"id":{id}}}"#).into_bytes(), value.into_bytes())
        })
        .collect();
    let whole: Vec<_> = messages
        .iter()
        .map(|(key, value)| match super::decode(topic, Some(key), Some(value)) {
            Ok(Decoded::Change(change)) => change,
            other => panic!("{other:?}"),
        })
        .collect();
    let expected = union(whole.iter().map(|change| reloaded.evaluate(change)));
    assert!(expected.len() > 40, "{expected:?}");

    // Half decoded for the old rules (in the queue at the reload), half for the new ones.
    let events: Vec<SourceEvent> = messages
        .iter()
        .enumerate()
        .map(|(i, (key, value))| {
            let projection = if i < 20 { old.projection() } else { reloaded.projection() };
            source_event(topic, Some(key), value, projection)
        })
        .collect();
    let unprojected = union(events.iter().map(|event| reloaded.evaluate(change(event))));
    assert_ne!(unprojected, expected, "evaluated as decoded, the old rules' events would lose items");

    let dir = tempfile::tempdir().expect("temp dir");
    let metrics = Arc::new(crate::telemetry::Metrics::new());
    let dead = crate::config::DeadLetterConfig { file: Some(dir.path().join("dl.jsonl")), ..Default::default() };
    let dead_letters = crate::dead_letter::DeadLetters::open(&dead, None, metrics.clone()).await.expect("dead letters");
    let sink = Arc::new(Recording::default());
    let pipeline =
        crate::pipeline::Pipeline::new(Default::default(), reloaded, vec![sink.clone()], dead_letters, metrics);
    let (tx, rx) = tokio::sync::mpsc::channel(100);
    for event in events {
        tx.send(event).await.expect("queued");
    }
    drop(tx);
    pipeline.run(rx, &crate::shutdown::Shutdown::never()).await.expect("pipeline");
    let mut got = sink.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
    got.sort();
    got.dedup();
    assert_eq!(got, expected);
}

/// Columns the rules read and decimal or temporal columns they do not, repeated and in every
/// order, in envelopes and flattened rows with a schema: the last of each name wins, with a
/// projection as without, and the decimal columns fail as they do without.
#[test]
fn debezium_projection_repeated_columns_beside_logical_ones() {
    let schema = r#"{"type":"struct","fields":[{"type":"bytes","optional":true,"name":"org.apache.kafka.connect.data.Decimal","version":1,"parameters":{"scale":"2"},"field":"price"},{"type":"int32","name":"io.debezium.time.Date","field":"day"}]}"#;
    let envelope_schema = format!(
        r#"{{"type":"struct","fields":[{{"type":"struct","field":"before","fields":{f}}},{{"type":"struct","field":"after","fields":{f}}}]}}"#,
        f = r#"[{"type":"bytes","optional":true,"name":"org.apache.kafka.connect.data.Decimal","version":1,"parameters":{"scale":"2"},"field":"price"},{"type":"int32","name":"io.debezium.time.Date","field":"day"}]"#
    );
    let rows = [
        r#""id":1,"price":"AfQ=","id":2,"day":19000,"category_id":3"#,
        r#""price":"AfQ=","id":1,"day":1,"day":19000,"id":2,"category_id":3,"category_id":4"#,
        r#""day":19000,"category_id":3,"price":"!!","id":2"#,
        r#""category_id":null,"price":"AfQ=","id":"__debezium_unavailable_value","price":"AfQ=","id":5"#,
        r#""zz":1,"price":"AfQ=","a":2,"id":7,"day":3,"category_id":8,"b":"x""#,
    ];
    let placeholders = Placeholders::new(None);
    let mut projected = 0;
    for row in rows {
        let flat =
            format!(r#"{{"schema":{schema},"payload":{{{row},"__op":"u","__table":"products","__schema":"public"}}}}"#);
        let envelope = format!(
            r#"{{"schema":{envelope_schema},"payload":{{"before":{{{row}}},"after":{{{row}}},"source":{{"schema":"public","table":"products"}},"op":"u"}}}}"#
        );
        for (topic, key) in [("shop.public.products", None), ("other.topic", Some(&br#"{"id":9}"#[..]))] {
            for value in [&flat, &envelope] {
                // The first whole decode caches the schema, which the one-pass reader needs.
                let whole = super::decode_with(&placeholders, topic, key, Some(value.as_bytes()));
                let whole_again = super::decode_with(&placeholders, topic, key, Some(value.as_bytes()));
                assert_eq!(whole, whole_again);
                assert_eq!(super::decode_general(&placeholders, topic, key, Some(value.as_bytes())), whole);
                assert!(onepass::decode(&placeholders, topic, key, value.as_bytes(), None).is_some(), "{value}");
                projected += same_projected(&placeholders, topic, key, value.as_bytes(), &whole);
            }
        }
    }
    assert!(projected >= 20, "{projected}");
}
