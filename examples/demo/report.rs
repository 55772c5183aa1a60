//! How the demo shows things: section titles, indented files, dead letters, and the metrics
//! (with the staleness quantiles estimated from the histogram buckets).

use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value;

use crate::cache::read_dead_letters;

/// A numbered part of the demo, underlined.
pub fn section(title: &str) {
    println!("\n{title}");
    println!("{}", "-".repeat(title.chars().count()));
}

pub fn print_indented(text: &str, indent: usize) {
    for line in text.lines() {
        println!("{:indent$}{line}", "");
    }
}

/// The dead-letter file, one letter a few lines.
pub fn print_dead_letters(path: &Path) {
    let letters = read_dead_letters(path);
    if letters.is_empty() {
        println!("   (empty)");
    }
    for letter in letters {
        let field = |name: &str| match letter.get(name) {
            Some(Value::String(s)) => s.clone(),
            None | Some(Value::Null) => "-".into(),
            Some(v) => v.to_string(),
        };
        println!(
            "   reason {}   position {}   table {}   op {}",
            field("reason"),
            field("position"),
            field("table"),
            field("op")
        );
        // Several rule errors arrive as one string, sentence after sentence: one line each.
        let error = field("error").replace(" rule \"", "\n rule \"");
        for (i, sentence) in error.lines().enumerate() {
            let label = if i == 0 { "error:" } else { "" };
            println!("     {label:<6} {}", wrap(sentence.trim(), 100).join("\n              "));
        }
        println!("     key:   {}", field("key"));
        println!("     value: {}", shorten(&field("value"), 110));
    }
}

/// Splits `text` into lines of at most `width` characters, at spaces.
pub fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split(' ') {
        let Some(line) = lines.last_mut() else { break };
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            lines.push(word.to_string());
        } else {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
    }
    lines
}

fn shorten(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}... ({} bytes)", &text[..cut], text.len()),
        None => text.to_string(),
    }
}

/// The interesting lines of a /metrics exposition: the pipeline's, then those starting with one
/// of `source_metrics` (the source's own), then the staleness summary.
pub fn print_metrics(exposition: &str, source_metrics: &[&str]) {
    const SHOWN: [&str; 8] = [
        "cdc_invalidator_events_total{",
        "cdc_invalidator_invalidations_total{",
        "cdc_invalidator_tag_members_unlinked_total{",
        "cdc_invalidator_staleness_seconds_count{",
        "cdc_invalidator_staleness_seconds_sum{",
        "cdc_invalidator_dead_letters_total{",
        "cdc_invalidator_rule_errors_total{",
        "cdc_invalidator_pending_events ",
    ];
    if exposition.is_empty() {
        println!("   (no answer from /metrics)");
        return;
    }
    for prefix in SHOWN.iter().chain(source_metrics) {
        for line in exposition.lines().filter(|l| l.starts_with(prefix)) {
            println!("   {line}");
        }
    }
    const STALENESS: &str = "cdc_invalidator_staleness_seconds";
    let sample = |suffix: &str| -> Option<f64> {
        let prefix = format!("{STALENESS}_{suffix}{{sink=\"redis\"}} ");
        exposition.lines().find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
    };
    let p50 = quantile(exposition, STALENESS, "redis", 0.50);
    let p99 = quantile(exposition, STALENESS, "redis", 0.99);
    let mut line = String::from("\n   Staleness, database commit -> Redis confirmed:");
    match (sample("count"), sample("sum"), p50, p99) {
        (Some(count), Some(sum), Some(p50), Some(p99)) if count > 0.0 => {
            let _ = write!(
                line,
                " {count} changes, mean {:.1} ms, p50 ~ {:.1} ms, p99 ~ {:.1} ms",
                sum / count * 1e3,
                p50 * 1e3,
                p99 * 1e3
            );
        }
        _ => line.push_str(" no observations"),
    }
    println!("{line}\n   (p50/p99 estimated from the histogram buckets, as Prometheus' histogram_quantile does)");
}

/// `cdc_invalidator_settled_seconds{sink="redis"}` summarised: commit to the last pass confirmed,
/// what readers of a replica see (the freshness second pass).
pub fn print_settled(exposition: &str) {
    const SETTLED: &str = "cdc_invalidator_settled_seconds";
    let sample = |suffix: &str| -> Option<f64> {
        let prefix = format!("{SETTLED}_{suffix}{{sink=\"redis\"}} ");
        exposition.lines().find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
    };
    let p50 = quantile(exposition, SETTLED, "redis", 0.50);
    let p99 = quantile(exposition, SETTLED, "redis", 0.99);
    match (sample("count"), sample("sum"), p50, p99) {
        (Some(count), Some(sum), Some(p50), Some(p99)) if count > 0.0 => println!(
            "   Settled, database commit -> second pass confirmed (the replica replayed it, + margin): \
             {count} changes, mean {:.0} ms, p50 ~ {:.0} ms, p99 ~ {:.0} ms",
            sum / count * 1e3,
            p50 * 1e3,
            p99 * 1e3
        ),
        _ => println!("   Settled: no observations"),
    }
}

/// The q-quantile of a histogram's buckets for one sink, interpolated within the bucket as
/// Prometheus' `histogram_quantile` does. None without observations.
fn quantile(exposition: &str, metric: &str, sink: &str, q: f64) -> Option<f64> {
    let prefix = format!("{metric}_bucket{{sink=\"{sink}\",le=\"");
    let mut buckets: Vec<(f64, f64)> = exposition
        .lines()
        .filter_map(|l| {
            let (le, count) = l.strip_prefix(&prefix)?.split_once("\"} ")?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map(|b| b.1).filter(|&t| t > 0.0)?;
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, count) in &buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let within = if count > prev.1 { (rank - prev.1) / (count - prev.1) } else { 0.0 };
            return Some(prev.0 + (le - prev.0) * within);
        }
        prev = (le, count);
    }
    None
}
