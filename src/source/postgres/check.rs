//! `check -c CONFIG --against-db`: the rules file checked against the live schema.
//!
//! Errors (exit 2): a table a rule names does not exist or is not in the publication; a
//! template column does not exist; a published table without a replica identity (its updates
//! and deletes fail on the database itself); the publication does not exist.
//! Warnings (exit 0): a delete or update that needs a non-key column which REPLICA IDENTITY
//! DEFAULT does not log (with the `ALTER TABLE ... REPLICA IDENTITY FULL;` that fixes it); a
//! template column whose type renders differently from Debezium; a glob matching no
//! published table.

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;

use tokio_postgres::Client;

use super::sql;
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
}

/// The schema facts the check needs, by `schema.table`.
#[derive(Debug, Default)]
pub struct Schema {
    pub publication_exists: bool,
    pub tables: BTreeMap<String, TableInfo>,
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
                    format_type(a.atttypid, a.atttypmod), \
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
        let key = row.try_get::<_, Option<bool>>(5).ok().flatten().unwrap_or(false);
        t.columns.insert(get(3), (get(4), key));
    }
    let published = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(err("reading pg_publication_tables"))?;
    for row in published {
        let get = |i: usize| row.try_get::<_, Option<String>>(i).ok().flatten().unwrap_or_default();
        if let Some(t) = tables.get_mut(&format!("{}.{}", get(0), get(1))) {
            t.published = true;
        }
    }
    Ok(Schema { publication_exists, tables })
}

/// Types whose rendering differs from Debezium's (which sends epoch numbers or base64).
fn renders_differently(type_name: &str) -> bool {
    let t = type_name.split('(').next().unwrap_or(type_name).trim();
    matches!(
        t,
        "date"
            | "time without time zone"
            | "time with time zone"
            | "timestamp without time zone"
            | "timestamp with time zone"
            | "interval"
            | "bytea"
            | "money"
    ) || t.ends_with("[]")
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

/// `check --against-db` for the CLI: prints `warning: ...` lines and `ok`, or the errors.
/// Exit 0 without errors, 2 with errors, 1 when the database cannot be read.
pub fn run_cli(config: &Config, rules: &Rules) -> ExitCode {
    let Some(pg) = config.source.postgres.as_ref().filter(|_| config.source.kind == SourceKind::Postgres) else {
        eprintln!("check --against-db needs source.kind: postgres and a source.postgres section");
        return ExitCode::from(2);
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(against(pg, rules)) {
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
    Ok(check(rules, &pg.publication, &schema))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(ident: char, published: bool, cols: &[(&str, &str, bool)]) -> TableInfo {
        TableInfo {
            replica_identity: ident,
            published,
            columns: cols.iter().map(|(n, t, k)| (n.to_string(), (t.to_string(), *k))).collect(),
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
        schema.tables.insert("public.t".into(), table('d', true, &[("d", "date", false)]));
        let r = check(&rules(text), "cdc", &schema);
        assert!(r.errors.is_empty(), "{r:?}");
        assert!(r.warnings.iter().any(|w| w.contains("type date")), "{r:?}");
    }
}
