//! `check -c CONFIG --against-db`: the rules file checked against the live schema.
//!
//! Errors (exit 2): a table a rule names does not exist or is not in the publication; a
//! template column does not exist, or exists but the publication does not publish it (left out
//! of its column list, PostgreSQL 15+; a generated column: never published when VIRTUAL, and
//! STORED ones only with PostgreSQL 18's `publish_generated_columns = stored`), so every change
//! would be a rule error at run time; a published table without a replica identity (its updates
//! and deletes fail on the database itself); the publication does not exist; the server cannot
//! serve the source as configured (the start-up checks of `server.rs`: `wal_level`, `failover`
//! before 17, a standby before 16 or without `hot_standby_feedback`, a primary whose
//! `wal_level` is below logical, a missing, invalidated or synced slot).
//! Warnings (exit 0): a delete or update that needs a non-key column which REPLICA IDENTITY
//! DEFAULT does not log (with the `ALTER TABLE ... REPLICA IDENTITY FULL;` that fixes it); a
//! template column whose type renders differently from Debezium; a glob matching no
//! published table.

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;

use tokio_postgres::Client;

use super::{server, sql};
use crate::config::{Config, PostgresConfig, SourceKind};
use crate::event::Op;
use crate::rules::Rules;

/// One table as the database describes it.
#[derive(Debug, Clone, Default)]
pub struct TableInfo {
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: char,
    /// Column name → (type name, is a replica identity key column).
    pub columns: BTreeMap<String, (String, bool)>,
    pub published: bool,
    /// The columns the publication sends (`pg_publication_tables.attnames`, PostgreSQL 15+);
    /// `None` where the server does not say.
    pub published_columns: Option<BTreeSet<String>>,
    /// Generated columns: `s` stored, `v` virtual (PostgreSQL 18).
    pub generated: BTreeMap<String, char>,
}

/// The schema facts the check needs, by `schema.table`.
#[derive(Debug, Default)]
pub struct Schema {
    pub publication_exists: bool,
    pub tables: BTreeMap<String, TableInfo>,
    /// The publication's `publish_generated_columns = stored` (`pubgencols`, PostgreSQL 18+).
    pub publishes_stored_generated: bool,
    /// `server_version_num` (0: unknown, taken as older than 18).
    pub version_num: i32,
}

#[derive(Debug, Default, PartialEq)]
pub struct Report {
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

/// Reads the schema facts from the database.
pub async fn read_schema(client: &Client, publication: &str) -> Result<Schema, sql::SqlError> {
    let err = |what: &'static str| {
        move |e: tokio_postgres::Error| sql::SqlError::Statement { what, reason: sql::describe(&e) }
    };
    let publication_exists = sql::publication_exists(client, publication).await?;
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text, c.relreplident::text, a.attname::text, \
                    format_type(a.atttypid, a.atttypmod), a.attgenerated::text, \
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND a.attnum = ANY(i.indkey) \
                            AND ((c.relreplident = 'd' AND i.indisprimary) OR (c.relreplident = 'i' AND i.indisreplident))) \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
             WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
               AND n.nspname NOT LIKE 'pg_toast%'",
            &[],
        )
        .await
        .map_err(err("reading the tables and columns"))?;
    let mut tables: BTreeMap<String, TableInfo> = BTreeMap::new();
    for row in rows {
        let get = |i: usize| row.try_get::<_, Option<String>>(i).ok().flatten().unwrap_or_default();
        let name = format!("{}.{}", get(0), get(1));
        let t = tables.entry(name).or_default();
        t.replica_identity = get(2).chars().next().unwrap_or('d');
        let key = row.try_get::<_, Option<bool>>(6).ok().flatten().unwrap_or(false);
        if let Some(g) = get(5).chars().next() {
            t.generated.insert(get(3), g);
        }
        t.columns.insert(get(3), (get(4), key));
    }
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .and_then(|r| r.try_get(0))
        .map_err(err("reading server_version_num"))?;
    // attnames (15+) lists what the publication sends: its column list, or every column it
    // publishes (generated ones only as publish_generated_columns allows).
    let published = client
        .query(
            if version >= 150_000 {
                "SELECT schemaname::text, tablename::text, attnames::text[] FROM pg_publication_tables WHERE pubname = $1"
            } else {
                "SELECT schemaname::text, tablename::text, NULL::text[] FROM pg_publication_tables WHERE pubname = $1"
            },
            &[&publication],
        )
        .await
        .map_err(err("reading pg_publication_tables"))?;
    for row in published {
        let get = |i: usize| row.try_get::<_, Option<String>>(i).ok().flatten().unwrap_or_default();
        if let Some(t) = tables.get_mut(&format!("{}.{}", get(0), get(1))) {
            t.published = true;
            t.published_columns =
                row.try_get::<_, Option<Vec<String>>>(2).ok().flatten().map(|names| names.into_iter().collect());
        }
    }
    let publishes_stored_generated = if version >= 180_000 && publication_exists {
        client
            .query_opt("SELECT pubgencols::text = 's' FROM pg_publication WHERE pubname = $1", &[&publication])
            .await
            .map_err(err("reading pg_publication.pubgencols"))?
            .and_then(|r| r.try_get::<_, Option<bool>>(0).ok().flatten())
            .unwrap_or(false)
    } else {
        false
    };
    Ok(Schema { publication_exists, tables, publishes_stored_generated, version_num: version })
}

/// Types whose rendering differs from Debezium's (which sends base64 or a duration count).
/// Dates, times and timestamps render alike from both sources (`crate::source::temporal`).
fn renders_differently(type_name: &str) -> bool {
    let t = type_name.split('(').next().unwrap_or(type_name).trim();
    matches!(t, "interval" | "bytea" | "money") || t.ends_with("[]")
}

/// The check itself: pure, so it is tested without a database.
pub fn check(rules: &Rules, publication: &str, schema: &Schema) -> Report {
    let mut report = Report::default();
    if !schema.publication_exists {
        report.errors.push(format!(
            "publication {publication:?} does not exist: create it with CREATE PUBLICATION {publication} FOR TABLE schema.table, ...;"
        ));
    }
    let mut no_identity_reported = BTreeSet::new();
    for rule in rules.columns_by_rule() {
        let tables: Vec<(&String, &TableInfo)> = match rule.exact_table() {
            Some(name) => match schema.tables.get_key_value(name) {
                Some(t) => vec![t],
                None => {
                    report.errors.push(format!(
                        "rule {:?}: table {name} does not exist in the database (rules name tables as schema.table)",
                        rule.name
                    ));
                    continue;
                }
            },
            None => {
                let matched: Vec<_> =
                    schema.tables.iter().filter(|(n, t)| t.published && rule.matches_table(n)).collect();
                if matched.is_empty() {
                    report.warnings.push(format!(
                        "rule {:?}: its table pattern matches no table in publication {publication:?}",
                        rule.name
                    ));
                }
                matched
            }
        };
        for (name, table) in tables {
            if !table.published && schema.publication_exists {
                report.errors.push(format!(
                    "rule {:?}: table {name} is not in publication {publication:?}: run ALTER PUBLICATION {publication} ADD TABLE {name};",
                    rule.name
                ));
            }
            let changes_rows = rule.ops.iter().any(|op| matches!(op, Op::Update | Op::Delete));
            if table.published
                && changes_rows
                && (table.replica_identity == 'n'
                    || !table.columns.values().any(|(_, key)| *key) && table.replica_identity != 'f')
                && no_identity_reported.insert(name.clone())
            {
                report.errors.push(format!(
                    "table {name} has no replica identity, so PostgreSQL refuses its updates and deletes while it is published: add a primary key or run ALTER TABLE {name} REPLICA IDENTITY FULL;"
                ));
            }
            let mut needs_full: BTreeSet<&str> = BTreeSet::new();
            let mut needs_for: BTreeSet<&str> = BTreeSet::new();
            for (template, columns) in &rule.templates {
                for column in columns {
                    match table.columns.get(*column) {
                        None => report.errors.push(format!(
                            "rule {:?}: template {template:?} reads column {column:?}, which table {name} does not have",
                            rule.name
                        )),
                        Some(_) if table.published && !publishes(schema, table, column) => {
                            report.errors.push(unpublished(rule.name, template, name, column, publication, schema, table))
                        }
                        Some((type_name, key)) => {
                            if renders_differently(type_name) {
                                report.warnings.push(format!(
                                    "rule {:?}: column {name}.{column} is of type {type_name}, which this source renders as PostgreSQL's text and Debezium renders differently: keys from the two sources will not match",
                                    rule.name
                                ));
                            }
                            if table.replica_identity != 'f' && !key {
                                needs_full.insert(column);
                                if rule.ops.contains(&Op::Delete) {
                                    needs_for.insert("delete");
                                }
                                if rule.ops.contains(&Op::Update) {
                                    needs_for.insert("update");
                                }
                            }
                        }
                    }
                }
            }
            if !needs_full.is_empty() && !needs_for.is_empty() && table.replica_identity != 'n' {
                let columns: Vec<&str> = needs_full.into_iter().collect();
                let ops: Vec<&str> = needs_for.into_iter().collect();
                report.warnings.push(format!(
                    "rule {:?}: under REPLICA IDENTITY {} {} {} on {name} does not log the old value of {} (only key columns), so the old value is not invalidated{}: run ALTER TABLE {name} REPLICA IDENTITY FULL;",
                    rule.name,
                    if table.replica_identity == 'i' { "USING INDEX" } else { "DEFAULT" },
                    if ops.first().is_some_and(|o| o.starts_with('u')) { "an" } else { "a" },
                    ops.join(" or "),
                    columns.iter().map(|c| format!("{c:?}")).collect::<Vec<_>>().join(", "),
                    if ops.contains(&"delete") { " and a delete's template cannot render" } else { "" },
                ));
            }
        }
    }
    report
}

/// Whether the publication sends `column` of a published `table`.
fn publishes(schema: &Schema, table: &TableInfo, column: &str) -> bool {
    match table.generated.get(column) {
        // VIRTUAL generated columns are never published.
        Some('v') => return false,
        // Before 18 no generated column is (pgoutput skips them, although 15's attnames lists
        // them for a table published without a column list).
        Some(_) if schema.version_num < 180_000 => return false,
        _ => {}
    }
    match &table.published_columns {
        Some(columns) => columns.contains(column),
        // Before 15: no column lists; generated columns are not published.
        None => !table.generated.contains_key(column) || schema.publishes_stored_generated,
    }
}

/// The error for a template column the publication does not send, with the fix.
fn unpublished(
    rule: &str,
    template: &str,
    table_name: &str,
    column: &str,
    publication: &str,
    schema: &Schema,
    table: &TableInfo,
) -> String {
    let head = format!(
        "rule {rule:?}: template {template:?} reads column {column:?} of {table_name}, which publication {publication:?} does not publish (every change would be a rule error and the key would stay cached)"
    );
    match table.generated.get(column) {
        Some('v') => format!(
            "{head}: it is a VIRTUAL generated column, which logical replication never sends: make it STORED, or write the template on the columns it is computed from"
        ),
        Some(_) if !schema.publishes_stored_generated => format!(
            "{head}: it is a generated column, published only by PostgreSQL 18, with ALTER PUBLICATION {publication} SET (publish_generated_columns = stored); or in the publication's column list (before 18, write the template on the columns it is computed from)"
        ),
        _ => {
            let mut columns: Vec<&str> =
                table.published_columns.iter().flatten().map(String::as_str).chain([column]).collect();
            columns.sort_unstable();
            format!(
                "{head}: its column list leaves it out: run ALTER PUBLICATION {publication} SET TABLE {table_name} ({});",
                columns.join(", ")
            )
        }
    }
}

/// The server and slot checks the daemon makes at start, as `check --against-db` errors and
/// warnings: the same sentences.
async fn server_report(client: &Client, pg: &PostgresConfig, report: &mut Report) -> Result<(), sql::SqlError> {
    let info = sql::server_info(client).await?;
    report.errors.extend(server::server_problems(&info, pg.failover));
    let status = sql::slot_status(client, &pg.slot, info.version_num).await?;
    match status {
        Some(status) => {
            report.errors.extend(server::slot_problems(&pg.slot, &info, &status));
            if !info.in_recovery && info.major() >= 17 && pg.failover != Some(false) {
                let standbys = sql::standbys_attached(client).await?;
                report.warnings.extend(server::failover_warning(&pg.slot, &info, &status, standbys));
            }
        }
        None => {
            if !pg.create_slot {
                report.errors.push(format!(
                    "replication slot {:?} does not exist: create it with SELECT pg_create_logical_replication_slot('{}', 'pgoutput'); or set source.postgres.create_slot: true",
                    pg.slot, pg.slot
                ));
            }
            if info.in_recovery && info.major() >= 16 && info.wal_level == "logical" {
                report.errors.extend(probe_standby_decoding(client).await);
            }
        }
    }
    Ok(())
}

/// On a standby without the slot, whether a slot could be created there: the server refuses at
/// once when the primary's `wal_level` is below logical (which no SQL function shows on a
/// standby). A temporary slot, given a second: it is dropped with the session, and a creation
/// still waiting for the primary's snapshot is cancelled (that wait is no problem).
async fn probe_standby_decoding(client: &Client) -> Option<String> {
    let attempt = client
        .batch_execute(
            "SET statement_timeout = '1s'; \
             SELECT pg_create_logical_replication_slot('cdc_invalidator_check_' || pg_backend_pid(), 'pgoutput', true); \
             RESET statement_timeout;",
        )
        .await;
    let _ = client.batch_execute("RESET statement_timeout").await;
    attempt.err().and_then(|e| server::creation_failure(&sql::describe(&e)))
}

/// `check --against-db` for the CLI: prints `warning: ...` lines and `ok`, or the errors.
/// Exit 0 without errors, 2 with errors, 1 when the database cannot be read.
pub fn run_cli(config: &Config, rules: &Rules) -> ExitCode {
    let pg = config.source.postgres.as_ref().filter(|_| config.source.kind == SourceKind::Postgres);
    if pg.is_none() && !config.freshness.enabled() {
        eprintln!(
            "check --against-db needs source.kind: postgres and a source.postgres section, or freshness.replicas"
        );
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let checked = runtime.block_on(async {
        // With a Kafka source only the replicas: the daemon has no database connection of its own.
        let mut report = match pg {
            Some(pg) => against(pg, rules).await?,
            None => Report::default(),
        };
        // The read replicas gating the second pass: reachable, standbys, of this cluster (of
        // one cluster, with a Kafka source).
        if config.freshness.enabled() {
            let source_id = match pg.and_then(|p| p.connection()) {
                Some(c) => crate::freshness::system_identifier(c).await,
                None => None,
            };
            report.errors.extend(crate::freshness::check_all(&config.freshness, source_id).await);
        }
        Ok::<_, sql::SqlError>(report)
    });
    match checked {
        Err(e) => {
            // A connection error may quote the server's answer; never a password (crate::redact).
            eprintln!("{}", crate::redact::scrub(&e.to_string()));
            ExitCode::from(1)
        }
        Ok(report) => {
            for w in &report.warnings {
                println!("warning: {w}");
            }
            for e in &report.errors {
                eprintln!("{e}");
            }
            if report.errors.is_empty() {
                println!("ok");
                ExitCode::from(0)
            } else {
                ExitCode::from(2)
            }
        }
    }
}

async fn against(pg: &PostgresConfig, rules: &Rules) -> Result<Report, sql::SqlError> {
    let Some(connection) = pg.connection() else {
        return Err(sql::SqlError::Statement { what: "reading source.postgres.url", reason: "not resolved".into() });
    };
    let client = sql::connect(connection, &pg.application_name, pg.connect_timeout).await?;
    let schema = read_schema(&client, &pg.publication).await?;
    let mut report = check(rules, &pg.publication, &schema);
    server_report(&client, pg, &mut report).await?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(ident: char, published: bool, cols: &[(&str, &str, bool)]) -> TableInfo {
        TableInfo {
            replica_identity: ident,
            published,
            columns: cols.iter().map(|(n, t, k)| (n.to_string(), (t.to_string(), *k))).collect(),
            ..TableInfo::default()
        }
    }

    fn rules(text: &str) -> Rules {
        Rules::parse(text, std::path::Path::new("rules.yaml")).unwrap()
    }

    const RULES: &str = r#"version: 1
rules:
  - name: products
    table: public.products
    redis:
      keys: ["product:{id}"]
      tags: ["category:{category_id}"]
"#;

    #[test]
    fn default_identity_warns_with_the_fix() {
        let mut schema = Schema { publication_exists: true, ..Default::default() };
        schema.tables.insert(
            "public.products".into(),
            table('d', true, &[("id", "integer", true), ("category_id", "integer", false)]),
        );
        let r = check(&rules(RULES), "cdc", &schema);
        assert!(r.errors.is_empty(), "{r:?}");
        assert_eq!(r.warnings.len(), 1, "{r:?}");
        assert!(r.warnings[0].contains("\"category_id\""), "{}", r.warnings[0]);
        assert!(r.warnings[0].contains("ALTER TABLE public.products REPLICA IDENTITY FULL;"), "{}", r.warnings[0]);
        schema.tables.get_mut("public.products").unwrap().replica_identity = 'f';
        assert_eq!(check(&rules(RULES), "cdc", &schema), Report::default());
    }

    #[test]
    fn missing_things_are_errors() {
        let mut schema = Schema::default();
        let r = check(&rules(RULES), "cdc", &schema);
        assert_eq!(r.errors.len(), 2, "{r:?}");
        assert!(r.errors[0].contains("publication \"cdc\" does not exist"));
        assert!(r.errors[1].contains("table public.products does not exist"));

        schema.publication_exists = true;
        schema.tables.insert("public.products".into(), table('f', false, &[("id", "integer", true)]));
        let r = check(&rules(RULES), "cdc", &schema);
        assert!(r.errors.iter().any(|e| e.contains("ALTER PUBLICATION cdc ADD TABLE public.products;")), "{r:?}");
        assert!(r.errors.iter().any(|e| e.contains("reads column \"category_id\"")), "{r:?}");

        schema.tables.insert(
            "public.products".into(),
            table('n', true, &[("id", "integer", false), ("category_id", "integer", false)]),
        );
        let r = check(&rules(RULES), "cdc", &schema);
        assert!(r.errors.iter().any(|e| e.contains("has no replica identity")), "{r:?}");
    }

    #[test]
    fn temporal_columns_warn() {
        let text = "version: 1\nrules:\n  - name: days\n    table: public.*\n    redis:\n      keys: [\"day:{d}\"]\n    ops: [insert]\n";
        let mut schema = Schema { publication_exists: true, ..Default::default() };
        schema.tables.insert("public.t".into(), table('d', true, &[("d", "bytea", false)]));
        let r = check(&rules(text), "cdc", &schema);
        assert!(r.errors.is_empty(), "{r:?}");
        assert!(r.warnings.iter().any(|w| w.contains("type bytea")), "{r:?}");
        // Dates render alike from pgoutput and Debezium now: no warning for them.
        schema.tables.insert("public.t".into(), table('d', true, &[("d", "date", false)]));
        assert!(check(&rules(text), "cdc", &schema).warnings.is_empty());
    }

    #[test]
    fn columns_the_publication_does_not_send_are_errors() {
        let mut schema = Schema { publication_exists: true, ..Default::default() };
        let mut t = table('f', true, &[("id", "integer", true), ("category_id", "integer", false)]);
        t.published_columns = Some(["id".to_string()].into_iter().collect());
        schema.tables.insert("public.products".into(), t);
        let r = check(&rules(RULES), "cdc", &schema);
        assert_eq!(r.errors.len(), 1, "{r:?}");
        assert!(r.errors[0].contains("does not publish"), "{r:?}");
        assert!(r.errors[0].contains("ALTER PUBLICATION cdc SET TABLE public.products (category_id, id);"), "{r:?}");

        // A stored generated column: published only with publish_generated_columns = stored.
        let t = schema.tables.get_mut("public.products").unwrap();
        t.published_columns = Some(["id".to_string()].into_iter().collect());
        t.generated.insert("category_id".into(), 's');
        let r = check(&rules(RULES), "cdc", &schema);
        assert!(r.errors[0].contains("publish_generated_columns = stored"), "{r:?}");
        let t = schema.tables.get_mut("public.products").unwrap();
        t.published_columns = Some(["id".to_string(), "category_id".to_string()].into_iter().collect());
        schema.publishes_stored_generated = true;
        assert_eq!(check(&rules(RULES), "cdc", &schema).errors.len(), 1, "before 18: never");
        schema.version_num = 180_006;
        assert!(check(&rules(RULES), "cdc", &schema).errors.is_empty());

        // VIRTUAL: never, whatever the publication says.
        let t = schema.tables.get_mut("public.products").unwrap();
        t.generated.insert("category_id".into(), 'v');
        let r = check(&rules(RULES), "cdc", &schema);
        assert!(r.errors[0].contains("VIRTUAL generated column"), "{r:?}");

        // Before 15 (no attnames): generated columns are not published.
        let t = schema.tables.get_mut("public.products").unwrap();
        t.published_columns = None;
        t.generated.insert("category_id".into(), 's');
        schema.publishes_stored_generated = false;
        schema.version_num = 140_000;
        assert_eq!(check(&rules(RULES), "cdc", &schema).errors.len(), 1);
    }
}
