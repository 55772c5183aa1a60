//! Reference warmer for cdc-invalidator's warm-up stream (`sinks.redis.warm`): refills hot keys
//! from PostgreSQL right after the daemon deleted them, before readers stampede the database.
//!
//! ```text
//! cargo run --example warmer -- REDIS_URL POSTGRES_URL [--stream cdc-invalidator:warm] [--group warmers] [--consumer NAME]
//! ```
//!
//! - Reads the stream with a **consumer group** (`XGROUP CREATE … MKSTREAM`, `XREADGROUP`), so
//!   several warmers share the work and an entry is handled by one of them. Each entry is
//!   `key K table T op O`.
//! - Starts with its own **pending** entries (delivered to this consumer before a crash, never
//!   acknowledged), then reads new ones (`>`), blocking up to 5 s per call.
//! - For each entry it knows how to refill (the [`REFILLS`] table: a table, a key prefix and the
//!   query that builds the cached value) it reads the row and `SET`s the key **with a TTL**;
//!   a `delete` or `truncate` has no row to refill. Then it `XACK`s the entry. An entry it
//!   cannot refill is acknowledged too (nothing to do); a failed database or Redis call leaves
//!   it pending, retried on the next start.
//! - **Why the TTL**: a refill reads the row, then writes the key. If the row changes in
//!   between, the daemon deletes the key *before* this write lands, and the write puts the old
//!   value back. The newer change has its own stream entry, so a single warmer reading in order
//!   fixes it when it gets there; with several warmers the two entries may be handled out of
//!   order. The TTL bounds how long such a value can live; `sinks.timing.repeat_after` (a second
//!   pass) removes it sooner. The daemon itself never writes a cached value.

use std::time::Duration;

use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::AsyncCommands;

/// How to rebuild one kind of cached key from its table.
struct Refill {
    /// `schema.table` as the stream names it.
    table: &'static str,
    /// Keys `<prefix><id>`: the rest of the key is the row's `id`.
    prefix: &'static str,
    /// The cached value, from the row whose id is `$1`.
    query: &'static str,
}

/// The application's cache layout: `product:{id}` holds the product row as JSON.
const REFILLS: &[Refill] = &[Refill {
    table: "public.products",
    prefix: "product:",
    query: "SELECT row_to_json(p)::text FROM products p WHERE id = $1",
}];

/// How long a refilled value lives (see the module docs).
const REFILL_TTL_SECONDS: u64 = 300;

const USAGE: &str = "usage: warmer REDIS_URL POSTGRES_URL [--stream S] [--group G] [--consumer C]";

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let option = |name: &str, default: &str| -> String {
        args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.into())
    };
    let (Some(redis_url), Some(postgres_url)) = (args.first(), args.get(1)) else {
        eprintln!("{USAGE}");
        return std::process::ExitCode::from(2);
    };
    let stream = option("--stream", "cdc-invalidator:warm");
    let group = option("--group", "warmers");
    let consumer = option("--consumer", &format!("warmer-{}", std::process::id()));
    match run(redis_url, postgres_url, &stream, &group, &consumer).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warmer: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

async fn run(redis_url: &str, postgres_url: &str, stream: &str, group: &str, consumer: &str) -> Result<(), Error> {
    let mut redis = redis::Client::open(redis_url)?.get_multiplexed_async_connection().await?;
    let (db, connection) = tokio_postgres::connect(postgres_url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("warmer: database connection: {e}");
        }
    });
    // From the end of the stream for a new group: what was invalidated before is cold by now.
    let created: redis::RedisResult<()> = redis.xgroup_create_mkstream(stream, group, "$").await;
    if let Err(e) = created {
        if e.code() != Some("BUSYGROUP") {
            return Err(e.into());
        }
    }
    eprintln!("warmer {consumer}: reading {stream} as group {group}");
    // "0": this consumer's pending entries first (a crash left them unacknowledged); ">" after.
    let mut from = "0".to_string();
    loop {
        let options = StreamReadOptions::default().group(group, consumer).count(100).block(5_000);
        let reply: Option<StreamReadReply> = redis.xread_options(&[stream], &[from.as_str()], &options).await?;
        let entries: Vec<redis::streams::StreamId> =
            reply.map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect()).unwrap_or_default();
        if entries.is_empty() && from == "0" {
            from = ">".into();
            continue;
        }
        for entry in entries {
            let field = |name: &str| -> String { entry.get::<String>(name).unwrap_or_default() };
            let (key, table, op) = (field("key"), field("table"), field("op"));
            if let Err(e) = refill(&db, &mut redis, &key, &table, &op).await {
                // Left pending: retried from "0" on the next start (or claimed by another warmer).
                eprintln!("warmer: {key}: {e}");
                continue;
            }
            let _: i64 = redis.xack(stream, group, &[&entry.id]).await?;
        }
    }
}

/// Rebuilds `key` from its row, if it is one the [`REFILLS`] table knows and the row exists.
async fn refill(
    db: &tokio_postgres::Client,
    redis: &mut redis::aio::MultiplexedConnection,
    key: &str,
    table: &str,
    op: &str,
) -> Result<(), Error> {
    if matches!(op, "delete" | "truncate") {
        return Ok(()); // no row to refill from
    }
    let Some((refill, id)) =
        REFILLS.iter().find_map(|r| Some((r, key.strip_prefix(r.prefix)?)).filter(|(r, _)| r.table == table))
    else {
        return Ok(()); // a key this warmer does not build
    };
    let Ok(id) = id.parse::<i64>() else { return Ok(()) };
    let row = tokio::time::timeout(Duration::from_secs(5), db.query_opt(refill.query, &[&id])).await??;
    if let Some(row) = row {
        let value: String = row.try_get(0)?;
        let _: () = redis.set_ex(key, value, REFILL_TTL_SECONDS).await?;
    }
    Ok(())
}
