//! Benchmark (a): Debezium decode + rules evaluation, events per second on one core, over the
//! fixture mix. `cargo bench --bench decode_rules` (release profile).

use std::path::Path;
use std::time::Instant;

use cdc_invalidator::event::Decoded;
use cdc_invalidator::rules::Rules;
use cdc_invalidator::source::debezium;

// The allocator the binary ships with (src/main.rs): decoding allocates per message, so the
// figure depends on it.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The contract's example rules plus one MySQL-table rule, so the MySQL fixture matches too.
const CONTRACT_RULES: &str = include_str!("../tests/fixtures/rules/contract.yaml");
const EXTRA_RULES: &str = r#"  - name: customers
    table: inventory.customers
    redis:
      keys: ["customer:{id}", "customer-email:{email|lower}"]
"#;

// Decoded as the daemon's Kafka source decodes: only the columns the rules read
// (`debezium::decode_projected`).
fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/debezium");
    let mut mix: Vec<(String, Option<Vec<u8>>)> = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("tests/fixtures/debezium") {
        let path = entry.expect("dir entry").path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !name.ends_with(".json") || name.starts_with("key-") {
            continue;
        }
        // BENCH_FIXTURES: only the fixtures whose names contain this (per-shape figures under
        // callgrind, e.g. `unwrapped` for the flattened rows).
        if std::env::var("BENCH_FIXTURES").is_ok_and(|only| !name.contains(&only)) {
            continue;
        }
        let topic = match name.as_str() {
            "mysql-update.json" => "inventory.inventory.customers",
            "heartbeat.json" => "__debezium-heartbeat.shop",
            _ => "shop.public.products",
        };
        let bytes = std::fs::read(&path).expect("fixture");
        let value = (bytes.trim_ascii() != b"null").then_some(bytes);
        mix.push((topic.to_string(), value));
    }
    mix.sort();
    let rules =
        Rules::parse(&format!("{CONTRACT_RULES}{EXTRA_RULES}"), Path::new("bench-rules.yaml")).expect("bench rules");

    // BENCH_ROUNDS: fewer rounds for an instruction count under callgrind (docs/benchmarks.md).
    let rounds = std::env::var("BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(40_000);
    let mut changes = 0u64;
    let mut items = 0u64;
    // Warm up, then measure.
    for round in 0..(rounds + 2_000) {
        if round == 2_000 {
            changes = 0;
            items = 0;
        }
        for (topic, value) in &mix {
            if let Ok(Decoded::Change(c)) =
                debezium::decode_projected(topic, None, value.as_deref(), rules.projection())
            {
                let e = rules.evaluate(&c);
                changes += 1;
                items += (e.invalidations.items(cdc_invalidator::sink::ItemKind::RedisKey).len()
                    + e.invalidations.items(cdc_invalidator::sink::ItemKind::RedisTag).len())
                    as u64;
            }
        }
    }
    let start = Instant::now();
    let mut n = 0u64;
    for _ in 0..rounds {
        for (topic, value) in &mix {
            n += 1;
            if let Ok(Decoded::Change(c)) =
                debezium::decode_projected(topic, None, value.as_deref(), rules.projection())
            {
                std::hint::black_box(rules.evaluate(&c));
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!("decode+rules: {n} messages ({} fixtures x {rounds}) in {secs:.2} s on one core", mix.len());
    println!(
        "decode+rules: {:.0} messages/s ({:.2} us/message); {} changes, {} redis items per warm-up pass",
        n as f64 / secs,
        secs * 1e6 / n as f64,
        changes,
        items
    );
}
