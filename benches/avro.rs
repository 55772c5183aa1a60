//! Issue 17: decode + rules per second on one core, Avro next to JSON, the same events: the
//! Avro fixtures (tests/fixtures/avro, Confluent's AvroSerializer output) and the JsonConverter
//! messages they were made from. The registry is out of the picture (schemas parsed once, as
//! the cache holds them). `cargo bench --bench avro` (release profile).

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use cdc_invalidator::event::Decoded;
use cdc_invalidator::rules::Rules;
use cdc_invalidator::source::debezium::{self, AvroSchema};
use cdc_invalidator::source::registry::framed;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const CONTRACT_RULES: &str = include_str!("../tests/fixtures/rules/contract.yaml");

struct Case {
    topic: String,
    json: Vec<u8>,
    avro: Vec<u8>,
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |p: &str| std::fs::read(root.join(p)).expect("fixture");
    let manifest: serde_json::Value = serde_json::from_slice(&read("tests/fixtures/avro/manifest.json")).unwrap();
    let schema_texts: serde_json::Value = serde_json::from_slice(&read("tests/fixtures/avro/schemas.json")).unwrap();
    let schemas: HashMap<u32, AvroSchema> = schema_texts
        .as_object()
        .unwrap()
        .iter()
        .map(|(id, text)| (id.parse().unwrap(), AvroSchema::parse(text.as_str().unwrap()).unwrap()))
        .collect();
    let cases: Vec<Case> = manifest
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["key"] != true)
        .map(|c| Case {
            topic: c["topic"].as_str().unwrap().into(),
            json: read(c["json"].as_str().unwrap()),
            avro: read(&format!("tests/fixtures/avro/{}.avro", c["name"].as_str().unwrap())),
        })
        .collect();
    let rules = Rules::parse(CONTRACT_RULES, Path::new("bench-rules.yaml")).expect("bench rules");

    let avro_decode = |case: &Case| {
        let (id, datum) = framed(&case.avro).unwrap();
        let json = schemas[&id].read_json(datum).unwrap();
        debezium::decode(&case.topic, None, Some(&json))
    };
    for case in &cases {
        assert_eq!(avro_decode(case), debezium::decode(&case.topic, None, Some(&case.json)), "{}", case.topic);
    }

    let rounds = std::env::var("BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(40_000);
    let run = |avro: bool, rounds: usize| {
        let start = Instant::now();
        let mut n = 0u64;
        for _ in 0..rounds {
            for case in &cases {
                n += 1;
                let decoded =
                    if avro { avro_decode(case) } else { debezium::decode(&case.topic, None, Some(&case.json)) };
                if let Ok(Decoded::Change(c)) = decoded {
                    std::hint::black_box(rules.evaluate(&c));
                }
            }
        }
        n as f64 / start.elapsed().as_secs_f64()
    };
    run(false, 2_000);
    run(true, 2_000);
    // Interleaved, so both see the same machine load.
    for pass in 1..=3 {
        let json = run(false, rounds);
        let avro = run(true, rounds);
        println!(
            "pass {pass}: json {json:.0} messages/s, avro {avro:.0} messages/s ({} events x {rounds}); avro/json {:.2}",
            cases.len(),
            avro / json
        );
    }
}
