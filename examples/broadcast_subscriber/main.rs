//! Reference subscriber for cdc-invalidator's broadcast (`sinks.redis.broadcast`): an
//! application server's in-process LRU in front of Redis, dropped entry by entry as the daemon
//! invalidates, and cleared whenever the subscription was lost (see `subscriber.rs`).
//!
//! ```text
//! cargo run --example broadcast_subscriber -- redis://127.0.0.1:6379 [CHANNEL]
//! cargo run --example broadcast_subscriber -- --cluster redis://10.0.0.1:6379 redis://10.0.0.2:6379 [--channel CHANNEL]
//! ```
//!
//! As a demonstration it reads `product:42` through the local cache once a second (a miss reads
//! Redis and caches the value under the tag `category:5`) and prints every message and how many
//! local entries it dropped. Copy `subscriber.rs` into an application and call
//! [`subscriber::run`] from its start-up instead.

mod subscriber;

use std::sync::Arc;
use std::time::Duration;

use subscriber::{Event, LocalCache, Target};

const USAGE: &str = "usage: broadcast_subscriber REDIS_URL [CHANNEL]\n       broadcast_subscriber --cluster NODE_URL... [--channel CHANNEL]";

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (target, channel) = match args.split_first() {
        Some((flag, rest)) if flag == "--cluster" => {
            let (nodes, channel) = match rest.iter().position(|a| a == "--channel") {
                Some(i) => (rest.get(..i).unwrap_or_default().to_vec(), rest.get(i + 1).cloned()),
                None => (rest.to_vec(), None),
            };
            (Target::Cluster(nodes), channel)
        }
        Some((url, rest)) if !url.starts_with('-') => (Target::Standalone(url.clone()), rest.first().cloned()),
        _ => {
            eprintln!("{USAGE}");
            return std::process::ExitCode::from(2);
        }
    };
    if matches!(&target, Target::Cluster(nodes) if nodes.is_empty()) {
        eprintln!("{USAGE}");
        return std::process::ExitCode::from(2);
    }
    let channel = channel.unwrap_or_else(|| "cdc-invalidator".to_string());
    let cache = Arc::new(LocalCache::new(10_000));
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let subscription = tokio::spawn(subscriber::run(target.clone(), channel.clone(), cache.clone(), Some(tx)));
    let reader = tokio::spawn(read_through(target, cache));
    eprintln!("subscribed to {channel}; Ctrl-C to stop");
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            event = events.recv() => match event {
                Some(Event::Message { message, dropped }) => println!(
                    "position {}: {} keys, {} tags, {} patterns: {dropped} local entries dropped",
                    message.position.as_deref().unwrap_or("-"),
                    message.keys.len(),
                    message.tags.len(),
                    message.patterns.len()
                ),
                Some(Event::Subscribed) => println!("subscribed: local cache cleared"),
                Some(Event::Lost) => println!("connection lost: local cache cleared (messages are missed until resubscribed)"),
                None => break,
            },
        }
    }
    reader.abort();
    match subscription.await {
        Ok(Err(e)) => {
            eprintln!("subscription failed: {e}");
            std::process::ExitCode::from(1)
        }
        _ => std::process::ExitCode::SUCCESS,
    }
}

/// The application's side: reads `product:42` through the local cache once a second.
async fn read_through(target: Target, cache: Arc<LocalCache>) {
    let url = match &target {
        Target::Standalone(url) => url.clone(),
        // Demonstration only: a single-key read from the first seed (it may answer MOVED).
        Target::Cluster(nodes) => nodes.first().cloned().unwrap_or_default(),
    };
    let Ok(client) = redis::Client::open(url) else { return };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if cache.get("product:42").is_some() {
            continue;
        }
        let Ok(mut con) = client.get_multiplexed_async_connection().await else { continue };
        let ticket = cache.ticket();
        let value: Option<String> = redis::cmd("GET").arg("product:42").query_async(&mut con).await.unwrap_or(None);
        if let Some(value) = value {
            if cache.put("product:42", &value, &["category:5"], ticket) {
                println!("miss: product:42 read from Redis and cached locally");
            }
        }
    }
}
