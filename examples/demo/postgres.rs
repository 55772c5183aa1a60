//! The PostgreSQL path (the default): no Debezium, no Kafka. A private PostgreSQL cluster
//! (`wal_level=logical`) holds the shop's `products` table; the daemon reads its logical
//! replication slot (plugin pgoutput). The demo performs UPDATEs, an INSERT, a DELETE and a
//! TRUNCATE with an ordinary SQL session and shows each cached key disappearing, with the
//! milliseconds since the commit returned; then the staleness the daemon measured and the slot
//! it confirmed. A physical standby replaying `REPLICA_DELAY` behind is the shop's read replica,
//! listed in `freshness.replicas`: after the first change a reader refills a key from it with the
//! old row, and the second pass (released once the standby has replayed the commit, + margin)
//! removes it again. Each change waits for its second pass before the next.
//!
//! Needs PostgreSQL's server binaries (`PG_BIN`, else the newest /usr/lib/postgresql/*/bin;
//! scripts/install-deps.sh installs postgresql-15). PostgreSQL refuses to run as root: as root
//! the demo runs initdb and pg_ctl as the `postgres` user (`runuser -u postgres`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

use crate::cache::{cache, check_untouched, exists, register, watch, Expected};
use crate::report::{print_dead_letters, print_indented, print_metrics, print_settled, section, wrap};
use crate::services::{daemon_binary, free_port, http_get, start_redis, tail, wait_ready, Service, START_ATTEMPTS};
use crate::{DemoResult, EXIT_TIMEOUT, INVALIDATION_DEADLINE, RULES, START_TIMEOUT};

/// The slot and the publication the daemon reads (docs/postgres.md uses the same names).
const SLOT: &str = "cdc_invalidator";
const PUBLICATION: &str = "cdc_invalidator";
/// The read replica's physical slot on the primary (keeps the WAL it has not received).
const REPLICA_SLOT: &str = "demo_replica";
/// How far behind the read replica replays (`recovery_min_apply_delay`): the window in which a
/// reader refilling the cache from it writes the old row back.
const REPLICA_DELAY: &str = "200ms";
/// What the shop's reader asks the read replica when product 42 is not cached.
const REPLICA_READ: &str = "SELECT price::text FROM products WHERE id = 42";
/// The role the daemon connects as (SCRAM), as docs/postgres.md sets it up.
const CDC_ROLE: &str = "cdc";
const CDC_PASSWORD: &str = "demo-only-password";

/// The shop's schema and rows. Product 41 is in category 3, product 42 in category 5; category
/// 9 is never touched, so its cache entries must survive.
const SCHEMA: &str = "\
CREATE TABLE public.products (
    id          int PRIMARY KEY,
    name        text NOT NULL,
    price       numeric(10,2) NOT NULL,
    category_id int NOT NULL,
    slug        text NOT NULL
);
INSERT INTO public.products VALUES
    (41, 'Red Widget',  25.00, 3, 'red-widget'),
    (42, 'Blue Widget', 100.00, 5, 'blue-widget');";

/// What docs/postgres.md asks of the database: a role that may replicate, a publication, and
/// the slot, created before the caches rely on the daemon.
fn replication_setup() -> String {
    format!(
        "\
SET password_encryption = 'scram-sha-256';
CREATE ROLE {CDC_ROLE} LOGIN REPLICATION PASSWORD '{CDC_PASSWORD}';
GRANT pg_monitor TO {CDC_ROLE};
CREATE PUBLICATION {PUBLICATION} FOR TABLE public.products;"
    )
}

/// Separate from the rest: a slot cannot be created in a transaction that has written.
fn create_slot() -> String {
    format!("SELECT pg_create_logical_replication_slot('{SLOT}', 'pgoutput');")
}

/// The fix `check --against-db` prints: updates and deletes then log the whole old row, so the
/// category a product leaves is invalidated too.
const REPLICA_IDENTITY_FULL: &str = "ALTER TABLE public.products REPLICA IDENTITY FULL;";

/// One change made in the database and what it must do.
struct Change {
    title: &'static str,
    /// Run as one simple-protocol batch: autocommit, or an explicit BEGIN ... COMMIT.
    sql: &'static str,
    expected: Expected<'static>,
    /// Keys that must still be cached once `expected` happened (what the change must not touch).
    kept: &'static [&'static str],
}

pub async fn run(dir: &Path) -> DemoResult<()> {
    let mut failures: Vec<String> = Vec::new();
    println!("cdc-invalidator demo, PostgreSQL path (work directory {})", dir.display());

    section("1. Services (private instances on free loopback ports)");
    let daemon_bin = daemon_binary()?;
    let (redis_server, redis_url) = start_redis(dir).await?;
    println!("   redis-server   {redis_url}   (log {})", redis_server.log.display());
    let mut cluster = Cluster::start(dir)?;
    let admin = cluster.connect("postgres").await?;
    let version: String = admin.query_one("SHOW server_version", &[]).await?.try_get(0)?;
    println!(
        "   PostgreSQL {version}   127.0.0.1:{}   wal_level=logical   (data {}, log {})",
        cluster.port,
        cluster.data.display(),
        cluster.log.display()
    );
    let mut replica = cluster.standby(dir)?;
    let replica_admin = replica.connect("postgres").await?;
    let in_recovery: bool = replica_admin.query_one("SELECT pg_is_in_recovery()", &[]).await?.try_get(0)?;
    println!(
        "   read replica   127.0.0.1:{}   physical standby (pg_basebackup -R -X stream), \
         recovery_min_apply_delay={REPLICA_DELAY}, in recovery: {in_recovery}   (log {})",
        replica.port,
        replica.log.display()
    );

    section("2. The shop database: table, rows, replication role, publication, slot");
    run_sql(&admin, "CREATE DATABASE shop;").await?;
    let shop = cluster.connect("shop").await?;
    run_sql(&shop, SCHEMA).await?;
    run_sql(&shop, &replication_setup()).await?;
    run_sql(&shop, &create_slot()).await?;
    // The standby replays all this REPLICA_DELAY later (the database, the daemon's role): the
    // daemon's replica check at start needs the role there. A fast machine gets here sooner.
    let setup_end = lsn_number(&shop, "pg_current_wal_lsn()").await?;
    wait_replayed(&replica_admin, setup_end).await?;
    let replica_shop = replica.connect("shop").await?;

    section("3. Rules and config");
    let rules_path = dir.join("rules.yaml");
    std::fs::write(&rules_path, RULES)?;
    let metrics_port = free_port()?;
    let config = config_text(cluster.port, replica.port, &redis_url, metrics_port);
    let config_path = dir.join("config.yaml");
    std::fs::write(&config_path, &config)?;
    println!("   {}:", rules_path.display());
    print_indented(RULES, 6);
    println!("   {}:", config_path.display());
    print_indented(&config, 6);
    println!("   (No CDN sink is configured here: surrogate keys and URLs are computed, not sent.)");

    section("4. The rules checked against the live schema");
    println!("   $ cdc-invalidator check -c config.yaml --against-db");
    let (code, text) = check_against_db(&daemon_bin, &config_path).await?;
    for line in text.lines() {
        println!("      {}", wrap(line, 96).join("\n        "));
    }
    if code != Some(0) || !text.contains("REPLICA IDENTITY FULL") {
        failures
            .push(format!("check --against-db (exit {code:?}) did not warn about REPLICA IDENTITY DEFAULT:\n{text}"));
    }
    println!("   The warning's fix: updates and deletes then carry the whole old row.");
    run_sql(&shop, REPLICA_IDENTITY_FULL).await?;
    println!("   $ cdc-invalidator check -c config.yaml --against-db");
    let (code, text) = check_against_db(&daemon_bin, &config_path).await?;
    print_indented(&text, 6);
    if code != Some(0) || text.trim() != "ok" {
        failures.push(format!("check --against-db after the fix: exit {code:?}, expected a plain ok:\n{text}"));
    }

    section("5. What the shop application cached in Redis");
    let mut redis = redis::Client::open(redis_url.as_str())?.get_multiplexed_async_connection().await?;
    cache_product(&mut redis, 41, "Red Widget", "25.00", 3).await?;
    cache_product(&mut redis, 42, "Blue Widget", "100.00", 5).await?;
    for category in [3, 5, 7, 9] {
        cache_listing(&mut redis, category).await?;
    }
    cache(&mut redis, "listing:all:page:1", "<html>all products</html>").await?;
    register(&mut redis, "tag:products:all", "listing:all:page:1").await?;
    cache(&mut redis, "product:43", "null").await?;
    println!("   (product:43 is a negative cache entry: a visitor asked for product 43 before it existed.)");

    section("6. The daemon: cdc-invalidator run -c config.yaml");
    let daemon_log = dir.join("daemon.log");
    let mut cmd = Command::new(&daemon_bin);
    cmd.arg("run").arg("-c").arg(&config_path);
    let mut daemon = Service::spawn("cdc-invalidator", cmd, &daemon_log)?;
    let t = Instant::now();
    wait_ready(&mut daemon, metrics_port).await?;
    println!(
        "   pid {}, ready after {} ms (GET /readyz = 200: it holds the slot {SLOT})",
        daemon.child.id(),
        t.elapsed().as_millis()
    );
    println!("   metrics http://127.0.0.1:{metrics_port}/metrics   log {}", daemon_log.display());

    section("7. Changes in the database, and the cache emptying");
    println!("   (an ordinary SQL session; times are from the COMMIT returning to the key being gone)");
    let dead_letters = dir.join("dead-letters.jsonl");
    let mut letters_seen = 0;
    let mut stale_refills = 0u32;
    println!(
        "   (each change is invalidated twice: at once, and again once the read replica has replayed it,\n    \
         {REPLICA_DELAY} later, plus freshness.margin)"
    );
    let changes = [
        Change {
            title: "product 42's price: 100.00 -> 80.00",
            sql: "UPDATE products SET price = 80.00 WHERE id = 42;",
            expected: Expected {
                gone: &[
                    "product:42",
                    "product:42:page:en-us",
                    "product:42:page:fr",
                    "product:42:page:de",
                    "listing:category:5:page:1",
                    "tag:category:5",
                ],
                dead_letter: None,
            },
            kept: &["listing:category:3:page:1", "listing:category:7:page:1"],
        },
        Change {
            title: "one transaction: product 42's slug only (when_changed skips it), product 41's name",
            sql: "BEGIN;\n\
                  UPDATE products SET slug = 'blue-widget-2' WHERE id = 42;\n\
                  UPDATE products SET name = 'Red Widget XL' WHERE id = 41;\n\
                  COMMIT;",
            expected: Expected {
                gone: &[
                    "product:41",
                    "product:41:page:en-us",
                    "product:41:page:fr",
                    "product:41:page:de",
                    "listing:category:3:page:1",
                    "tag:category:3",
                ],
                dead_letter: None,
            },
            kept: &["product:42", "product:42:page:en-us", "listing:category:5:page:1"],
        },
        Change {
            title: "product 42 moves from category 5 to category 7",
            sql: "UPDATE products SET category_id = 7 WHERE id = 42;",
            expected: Expected {
                gone: &[
                    "product:42",
                    "product:42:page:en-us",
                    "product:42:page:fr",
                    "product:42:page:de",
                    "listing:category:5:page:1",
                    "tag:category:5",
                    "listing:category:7:page:1",
                    "tag:category:7",
                ],
                dead_letter: None,
            },
            kept: &[],
        },
        Change {
            title: "insert product 43 into category 7",
            sql: "INSERT INTO products VALUES (43, 'Green Widget', 15.00, 7, 'green-widget');",
            expected: Expected {
                gone: &["product:43", "listing:category:7:page:1", "tag:category:7"],
                dead_letter: None,
            },
            kept: &[],
        },
        Change {
            title: "delete product 43 (the old row is whole: REPLICA IDENTITY FULL)",
            sql: "DELETE FROM products WHERE id = 43;",
            expected: Expected {
                gone: &["product:43", "product:43:page:en-us", "listing:category:7:page:1", "tag:category:7"],
                dead_letter: None,
            },
            kept: &[],
        },
        Change {
            title: "truncate products (no rows: the rule's on_truncate tags)",
            sql: "TRUNCATE products;",
            expected: Expected { gone: &["listing:all:page:1", "tag:products:all"], dead_letter: None },
            kept: &[],
        },
    ];
    for (i, change) in changes.iter().enumerate() {
        // Between changes the shop goes on serving, and caching, what the next change touches.
        match i {
            1 => {
                println!("\n   The shop re-renders product 42 and category 5:");
                cache_product(&mut redis, 42, "Blue Widget", "80.00", 5).await?;
                cache_listing(&mut redis, 5).await?;
            }
            2 => {
                println!("\n   The shop re-renders category 7:");
                cache_listing(&mut redis, 7).await?;
            }
            4 => {
                println!("\n   Product 43 exists now; the shop caches it and re-renders category 7:");
                cache(&mut redis, "product:43", r#"{"id":43,"name":"Green Widget"}"#).await?;
                cache(&mut redis, "product:43:page:en-us", "<html>Green Widget</html>").await?;
                cache_listing(&mut redis, 7).await?;
            }
            _ => {}
        }
        println!("\n   > {}", change.title);
        for line in change.sql.lines() {
            println!("     {}", line.trim());
        }
        shop.batch_execute(change.sql).await.map_err(|e| format!("{}: {e}", change.sql))?;
        let t0 = Instant::now();
        let missed = watch(&mut redis, &change.expected, t0, &dead_letters, &mut letters_seen).await?;
        failures.extend(missed.into_iter().map(|m| format!("{}: {m}", change.title)));
        for key in change.kept {
            if exists(&mut redis, key).await? {
                println!("            kept  {key}");
            } else {
                println!("     INVALIDATED, though this change does not touch it: {key}");
                failures.push(format!("{}: {key} was invalidated", change.title));
            }
        }
        if i == 0 {
            stale_refills +=
                refill_from_replica(&replica_shop, &mut redis, t0, metrics_port, &dead_letters, &mut failures).await?;
        }
        // The next change must not start before this one's second pass: the shop re-caches
        // keys between changes, and a late second pass would (rightly) remove them again.
        match wait_settled(metrics_port).await {
            true => println!(
                "     {:>5} ms  settled: second pass done, the change acknowledged to the slot",
                t0.elapsed().as_millis()
            ),
            false => failures.push(format!("{}: not acknowledged within {INVALIDATION_DEADLINE:?}", change.title)),
        }
    }
    let last_commit = lsn_number(&shop, "pg_current_wal_insert_lsn()").await?;

    println!();
    check_untouched(&mut redis, "change", &mut failures).await?;

    section("8. The dead letters (dead-letters.jsonl)");
    print_dead_letters(&dead_letters);

    section("9. Metrics (GET /metrics, the interesting lines)");
    let exposition = settled_metrics(metrics_port, last_commit).await;
    print_metrics(
        &exposition,
        &[
            "cdc_invalidator_postgres_role{",
            "cdc_invalidator_postgres_replication_lag_bytes ",
            "cdc_invalidator_postgres_slot_retained_wal_bytes ",
            "cdc_invalidator_postgres_confirmed_flush_lsn ",
            "cdc_invalidator_postgres_reconnects_total ",
            "cdc_invalidator_second_pass_refills_total{",
            "cdc_invalidator_settled_seconds_count{",
            "cdc_invalidator_settled_seconds_sum{",
            "cdc_invalidator_replica_replay_lag_seconds{",
            "cdc_invalidator_replica_replay_lag_bytes{",
            "cdc_invalidator_freshness_max_wait_total{",
        ],
    );
    print_settled(&exposition);
    let refills = gauge(&exposition, "cdc_invalidator_second_pass_refills_total{sink=\"redis\"} ").unwrap_or(0.0);
    println!(
        "   second_pass_refills_total: keys the second pass found refilled and removed again \
         (the race, caught; the demo refilled {stale_refills} with old data)"
    );
    if f64::from(stale_refills) > refills {
        failures.push(format!(
            "{stale_refills} key(s) refilled from the replica with old data, but second_pass_refills_total is {refills}"
        ));
    }
    match gauge(&exposition, "cdc_invalidator_postgres_confirmed_flush_lsn ") {
        Some(confirmed) => {
            let confirmed = confirmed as u64;
            println!(
                "   confirmed flush LSN {} (the last commit ends at {})",
                lsn_text(confirmed),
                lsn_text(last_commit)
            );
            if confirmed < last_commit {
                failures.push(format!(
                    "the daemon confirmed {} but the last commit ends at {}",
                    lsn_text(confirmed),
                    lsn_text(last_commit)
                ));
            }
        }
        None => failures.push("no cdc_invalidator_postgres_confirmed_flush_lsn in /metrics".into()),
    }

    section("10. Shutdown: SIGTERM, drain, final confirmation to the slot");
    let t = Instant::now();
    daemon.signal("TERM")?;
    match daemon.wait_exit(EXIT_TIMEOUT).await {
        Some(0) => println!("   cdc-invalidator exited with code 0 after {} ms", t.elapsed().as_millis()),
        Some(code) => {
            println!("   cdc-invalidator exited with code {code}; its log ends:");
            print_indented(&tail(&daemon_log, 20), 6);
            failures.push(format!("the daemon exited with code {code} after SIGTERM"));
        }
        None => failures.push(format!("the daemon did not exit within {EXIT_TIMEOUT:?} of SIGTERM")),
    }
    let log = std::fs::read_to_string(&daemon_log).unwrap_or_default();
    if !log.trim().is_empty() {
        println!("   its log (warnings and errors only, as configured):");
        print_indented(log.trim_end(), 6);
    }
    let slot = shop
        .query_one(
            "SELECT active, confirmed_flush_lsn::text, \
                    pg_wal_lsn_diff(confirmed_flush_lsn, '0/0')::bigint FROM pg_replication_slots WHERE slot_name = $1",
            &[&SLOT],
        )
        .await?;
    let (active, confirmed, confirmed_number): (bool, String, i64) =
        (slot.try_get(0)?, slot.try_get(1)?, slot.try_get(2)?);
    println!("   pg_replication_slots: {SLOT} active={active} confirmed_flush_lsn={confirmed}");
    if confirmed_number < 0 || (confirmed_number as u64) < last_commit {
        failures.push(format!("the slot's confirmed_flush_lsn {confirmed} is before the last commit"));
    }
    drop(daemon);
    drop(shop);
    drop(admin);
    drop(replica_shop);
    drop(replica_admin);
    replica.stop();
    cluster.stop();
    drop(redis_server);
    println!("   stopped PostgreSQL (primary and replica) and redis-server");

    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("{} expectation(s) not met:\n  - {}", failures.len(), failures.join("\n  - ")).into())
    }
}

/// The demo's config: the contract's first block with `source.kind: postgres`, plus a few
/// settings that make a short demo show settled numbers (documented inline, since the file is
/// printed).
fn config_text(pg_port: u16, replica_port: u16, redis_url: &str, metrics_port: u16) -> String {
    format!(
        r#"rules: rules.yaml
source:
  kind: postgres
  postgres:
    # demo: the URL inline; in production use url_env or url_file, and sslmode=verify-full
    url: "postgresql://{CDC_ROLE}:{CDC_PASSWORD}@127.0.0.1:{pg_port}/shop?sslmode=disable"
    slot: {SLOT}
    publication: {PUBLICATION}
    status_interval: 1s                # demo: read the slot's lag figures every second (default 5 s)
sinks:
  redis:
    url: "{redis_url}"
    tag_prefix: "tag:"
freshness:                             # the application refills caches from this read replica
  replicas:
    - name: replica-1
      url: "postgresql://{CDC_ROLE}:{CDC_PASSWORD}@127.0.0.1:{replica_port}/shop?sslmode=disable"
  margin: 100ms                        # after the replica has replayed a commit, wait this long
  max_wait: 30s                        # a replica further behind: second pass anyway, counted
pipeline:
  batch_max_wait: 5ms                  # the longest a batch gathers changes while catching up (default)
metrics:
  listen: "127.0.0.1:{metrics_port}"
dead_letter:
  file: dead-letters.jsonl
shutdown:
  grace: 5s
log:
  level: warn                          # demo: quiet; the log goes to daemon.log
"#
    )
}

/// The race the second pass closes: a reader misses product:42 just after the first pass and
/// refills it from the replica, which (replaying `REPLICA_DELAY` behind) still has the old
/// price. The second pass must remove it again. Returns 1 when the refill was stale, 0 when the
/// replica had already replayed the change (a very slow machine: nothing to show, not a failure).
async fn refill_from_replica(
    replica: &Client,
    redis: &mut redis::aio::MultiplexedConnection,
    t0: Instant,
    metrics_port: u16,
    dead_letters: &Path,
    failures: &mut Vec<String>,
) -> DemoResult<u32> {
    let row = replica.query_opt(REPLICA_READ, &[]).await?;
    let price: String = match row {
        Some(row) => row.try_get(0)?,
        None => return Err("product 42 is missing on the replica".into()),
    };
    println!(
        "     {:>5} ms  a reader misses product:42 and refills it from the replica, which says price {price}:",
        t0.elapsed().as_millis()
    );
    let json = format!(r#"{{"id":42,"name":"Blue Widget","price":"{price}","category_id":5}}"#);
    cache(redis, "product:42", &json).await?;
    if price != "100.00" {
        println!("            (the replica had already replayed the change: nothing stale to catch this time)");
        return Ok(0);
    }
    println!("            stale: the replica has not replayed the UPDATE yet. The daemon sees it lagging:");
    let exposition = http_get(metrics_port, "/metrics").await.map(|(_, body)| body).unwrap_or_default();
    for line in exposition.lines().filter(|l| {
        l.starts_with("cdc_invalidator_replica_replay_lag_")
            || l.starts_with("cdc_invalidator_second_pass_pending_events ")
    }) {
        println!("     {:>5} ms  {line}", t0.elapsed().as_millis());
    }
    println!("            (lag seconds: since the newest commit the replica has replayed, which may be older)");
    println!("            The second pass, once the replica has replayed the commit (+ margin):");
    let mut letters_seen = crate::cache::read_dead_letters(dead_letters).len();
    let expected = Expected { gone: &["product:42"], dead_letter: None };
    let missed = watch(redis, &expected, t0, dead_letters, &mut letters_seen).await?;
    failures.extend(missed.into_iter().map(|m| format!("the stale refill from the replica: {m}")));
    Ok(1)
}

/// Waits until the daemon holds no event (`pending_events` and `second_pass_pending_events`
/// both 0): every change so far had its second pass and was acknowledged. False after
/// `INVALIDATION_DEADLINE`.
async fn wait_settled(port: u16) -> bool {
    let deadline = Instant::now() + INVALIDATION_DEADLINE;
    while Instant::now() < deadline {
        let body = http_get(port, "/metrics").await.map(|(_, body)| body).unwrap_or_default();
        let pending = gauge(&body, "cdc_invalidator_pending_events ");
        let second = gauge(&body, "cdc_invalidator_second_pass_pending_events ");
        if pending == Some(0.0) && second == Some(0.0) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

/// Waits until the standby behind `replica` has replayed the primary's WAL up to `lsn`.
async fn wait_replayed(replica: &Client, lsn: u64) -> DemoResult<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let replayed = lsn_number(replica, "pg_last_wal_replay_lsn()").await.unwrap_or(0);
        if replayed >= lsn {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the read replica replayed only up to {} after {START_TIMEOUT:?}, not {}",
                lsn_text(replayed),
                lsn_text(lsn)
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A product's JSON and its page in every locale the rules expand.
async fn cache_product(
    redis: &mut redis::aio::MultiplexedConnection,
    id: u32,
    name: &str,
    price: &str,
    category: u32,
) -> DemoResult<()> {
    let json = format!(r#"{{"id":{id},"name":"{name}","price":"{price}","category_id":{category}}}"#);
    cache(redis, &format!("product:{id}"), &json).await?;
    for locale in ["en-us", "fr", "de"] {
        cache(redis, &format!("product:{id}:page:{locale}"), &format!("<html>{name}</html>")).await?;
    }
    Ok(())
}

/// A category's listing page, registered under the category's tag.
async fn cache_listing(redis: &mut redis::aio::MultiplexedConnection, category: u32) -> DemoResult<()> {
    let listing = format!("listing:category:{category}:page:1");
    cache(redis, &listing, &format!("<html>category {category}</html>")).await?;
    register(redis, &format!("tag:category:{category}"), &listing).await
}

/// Prints SQL as a psql user would type it, then runs it (simple protocol, so several
/// statements may run at once).
async fn run_sql(client: &Client, sql: &str) -> DemoResult<()> {
    for line in sql.lines() {
        println!("   shop=# {line}");
    }
    client.batch_execute(sql).await.map_err(|e| format!("{sql}: {e}"))?;
    Ok(())
}

/// An LSN-valued SQL expression as a number (bytes since 0/0).
async fn lsn_number(client: &Client, expression: &str) -> DemoResult<u64> {
    let row = client.query_one(&format!("SELECT pg_wal_lsn_diff({expression}, '0/0')::bigint"), &[]).await?;
    let n: i64 = row.try_get(0)?;
    u64::try_from(n).map_err(|_| format!("{expression} is negative: {n}").into())
}

/// An LSN as PostgreSQL writes it: `16/B374D848`.
fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// The value of the first exposition line starting with `prefix`.
fn gauge(exposition: &str, prefix: &str) -> Option<f64> {
    exposition.lines().find_map(|l| l.strip_prefix(prefix)?.trim().parse().ok())
}

/// Scrapes /metrics once the daemon has caught up: nothing pending, the last commit confirmed,
/// and a slot status read since (every second: the lag gauge then shows it). After 10 s it
/// takes what there is.
async fn settled_metrics(port: u16, last_commit: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let body = http_get(port, "/metrics").await.map(|(_, body)| body).unwrap_or_default();
        let pending = gauge(&body, "cdc_invalidator_pending_events ");
        let confirmed = gauge(&body, "cdc_invalidator_postgres_confirmed_flush_lsn ").unwrap_or(0.0);
        let lag = gauge(&body, "cdc_invalidator_postgres_replication_lag_bytes ");
        let settled = pending == Some(0.0) && confirmed as u64 >= last_commit && lag == Some(0.0);
        if settled || Instant::now() > deadline {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `cdc-invalidator check -c CONFIG --against-db`: (exit code, stdout and stderr).
async fn check_against_db(daemon_bin: &Path, config: &Path) -> DemoResult<(Option<i32>, String)> {
    let mut cmd = Command::new(daemon_bin);
    cmd.arg("check").arg("-c").arg(config).arg("--against-db").stdin(Stdio::null());
    let out = tokio::task::spawn_blocking(move || cmd.output()).await??;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.code(), text.trim_end().to_string()))
}

/// A private PostgreSQL cluster: initdb in the work directory, `pg_ctl start` on a free loopback
/// port. Stopped on drop (fast shutdown: clients are disconnected, nothing is left running).
struct Cluster {
    bin: PathBuf,
    data: PathBuf,
    /// Also the Unix socket directory, so nothing touches /var/run/postgresql.
    home: PathBuf,
    log: PathBuf,
    port: u16,
    /// Running as root: initdb and pg_ctl run as the `postgres` user.
    as_postgres: bool,
    running: bool,
}

impl Cluster {
    /// initdb and start: a few seconds. Synchronous on purpose: a signal arriving meanwhile is
    /// handled once the cluster is either running (and then stopped by drop) or not started.
    fn start(dir: &Path) -> DemoResult<Cluster> {
        let bin = pg_bin()?;
        let as_postgres = running_as_root();
        let home = dir.join("postgres");
        std::fs::create_dir_all(&home)?;
        if as_postgres {
            // The postgres user must reach its directory inside the (root-only) work directory.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
            checked(Command::new("chown").arg("postgres:postgres").arg(&home).output(), "chown postgres")?;
        }
        let data = home.join("data");
        let log = home.join("postgres.log");
        let mut cluster = Cluster { bin, data, home, log, port: 0, as_postgres, running: false };
        let data_arg = cluster.data.display().to_string();
        checked(
            cluster
                .tool("initdb")
                .args(["-D", &data_arg, "-U", "postgres", "-E", "UTF8", "--no-locale", "--auth=trust"])
                .output(),
            "initdb",
        )?;
        // The superuser connects without a password from loopback (the demo's SQL session); the
        // daemon's role uses SCRAM, as in production.
        // `replication` for pg_basebackup and the standby's WAL stream (`all` does not cover it).
        let hba = format!(
            "local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost replication postgres 127.0.0.1/32 trust\n\
             host shop {CDC_ROLE} 127.0.0.1/32 scram-sha-256\n"
        );
        let settings = "listen_addresses = '127.0.0.1'\n\
                        wal_level = logical\n\
                        max_wal_senders = 10\n\
                        max_replication_slots = 10\n\
                        max_slot_wal_keep_size = 1GB\n";
        cluster.write_owned("data/pg_hba.conf", &hba)?;
        cluster.write_owned("data/postgresql.auto.conf", settings)?;
        cluster.launch()?;
        Ok(cluster)
    }

    /// A physical standby of this (running) cluster in `dir`/replica, replaying
    /// `REPLICA_DELAY` behind it: `pg_basebackup -R -X stream` through a physical slot, as
    /// /work/shared/reference/test-services.md ("A lagging replica") and the tests'
    /// `PgCluster::standby_of` do. Its pg_hba.conf and roles are the primary's copies.
    fn standby(&self, dir: &Path) -> DemoResult<Cluster> {
        let home = dir.join("replica");
        std::fs::create_dir_all(&home)?;
        if self.as_postgres {
            checked(Command::new("chown").arg("postgres:postgres").arg(&home).output(), "chown postgres")?;
        }
        let data = home.join("data");
        let log = home.join("postgres.log");
        let mut replica =
            Cluster { bin: self.bin.clone(), data, home, log, port: 0, as_postgres: self.as_postgres, running: false };
        let conninfo = format!("host=127.0.0.1 port={} user=postgres", self.port);
        let data_arg = replica.data.display().to_string();
        checked(
            replica
                .tool("pg_basebackup")
                .args(["-d", &conninfo, "-D", &data_arg, "-R", "-X", "stream", "-C", "-S", REPLICA_SLOT, "-c", "fast"])
                .output(),
            "pg_basebackup",
        )?;
        // -R wrote primary_conninfo and primary_slot_name; the rest of the primary's settings
        // came along. The delay makes the race visible: a reader on the replica sees the old
        // row for this long after the commit.
        let auto_conf = replica.data.join("postgresql.auto.conf");
        let mut conf = std::fs::read_to_string(&auto_conf)?;
        conf.push_str(&format!("recovery_min_apply_delay = '{REPLICA_DELAY}'\n"));
        std::fs::write(&auto_conf, conf)?;
        replica.launch()?;
        Ok(replica)
    }

    /// `pg_ctl start` on a free loopback port, retried on a fresh port if it was taken meanwhile.
    fn launch(&mut self) -> DemoResult<()> {
        let cluster = self;
        let data_arg = cluster.data.display().to_string();
        for _ in 0..START_ATTEMPTS {
            cluster.port = free_port()?;
            let options = format!("-p {} -k {}", cluster.port, cluster.home.display());
            let log_arg = cluster.log.display().to_string();
            cluster.running = true;
            let started = cluster
                .tool("pg_ctl")
                .args(["-D", &data_arg, "-l", &log_arg, "-w", "-t", "30", "-o", &options, "start"])
                .output();
            match checked(started, "pg_ctl start") {
                Ok(()) => return Ok(()),
                // Most likely the port was taken meanwhile ("could not bind"): try another.
                Err(_) if tail(&cluster.log, 20).contains("could not bind") => cluster.running = false,
                Err(e) => return Err(format!("{e}\n{}", tail(&cluster.log, 20)).into()),
            }
        }
        Err(format!("PostgreSQL did not start in {START_ATTEMPTS} attempts; its log ends:\n{}", tail(&cluster.log, 20))
            .into())
    }

    /// A server binary, run as the postgres user when the demo runs as root.
    fn tool(&self, name: &str) -> Command {
        let program = self.bin.join(name);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        cmd.current_dir(&self.home).stdin(Stdio::null());
        cmd
    }

    /// Writes a file under the cluster's directory, owned by the user the server runs as.
    fn write_owned(&self, relative: &str, text: &str) -> DemoResult<()> {
        let path = self.home.join(relative);
        std::fs::write(&path, text)?;
        if self.as_postgres {
            checked(Command::new("chown").arg("postgres:postgres").arg(&path).output(), "chown postgres")?;
        }
        Ok(())
    }

    /// A superuser SQL session on `database` (trust on loopback).
    async fn connect(&self, database: &str) -> DemoResult<Client> {
        let params = format!("host=127.0.0.1 port={} user=postgres dbname={database}", self.port);
        let (client, connection) = tokio_postgres::connect(&params, NoTls).await?;
        tokio::spawn(async move {
            // Ends when the client is dropped or the server goes away.
            let _ = connection.await;
        });
        Ok(client)
    }

    /// Fast shutdown: sessions are disconnected, the server exits cleanly.
    fn stop(&mut self) {
        if !self.running {
            return;
        }
        self.running = false;
        let data = self.data.display().to_string();
        let _ = self.tool("pg_ctl").args(["-D", &data, "-m", "fast", "-w", "-t", "30", "stop"]).output();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A command's output turned into an error naming it when it failed.
fn checked(output: std::io::Result<Output>, what: &str) -> DemoResult<()> {
    let out = output.map_err(|e| format!("cannot run {what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim_end(),
            String::from_utf8_lossy(&out.stderr).trim_end()
        )
        .into())
    }
}

/// The PostgreSQL server binaries: `PG_BIN`, else the newest /usr/lib/postgresql/*/bin (Debian).
fn pg_bin() -> DemoResult<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BIN").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| format!("/usr/lib/postgresql: {e} (scripts/install-deps.sh installs postgresql-15)"))?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").is_file())
        .collect();
    // Numeric order: 9.6 < 15.
    let version = |p: &PathBuf| -> f64 {
        p.parent().and_then(Path::file_name).and_then(|v| v.to_str()).and_then(|v| v.parse().ok()).unwrap_or(0.0)
    };
    dirs.sort_by(|a, b| version(a).total_cmp(&version(b)));
    dirs.pop().ok_or_else(|| "no initdb under /usr/lib/postgresql/*/bin: set PG_BIN".into())
}

/// Whether the demo runs as root (`id -u` is 0): PostgreSQL then must run as another user.
fn running_as_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
