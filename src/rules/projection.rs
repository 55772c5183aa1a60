//! What the rules read of each table's rows: the columns the Kafka source decodes (issue 12,
//! item 2). Building a row image's values and freeing them is most of what decoding a message
//! costs, and the rules of a table mostly read two or three of its columns.
//!
//! A rule reads a row only through the columns it names: its templates' placeholders (row
//! templates and `on_truncate`'s, which have none today) and its `when_changed` columns.
//! Nothing in the rules reads a row as a whole (no template renders "every column"), so a
//! table's projection is always a list of names. Outside the rules nothing reads the rows
//! of the daemon's events at all: dead letters hold the raw message, the finish stage and
//! the second pass the table, op, commit time and LSN (`docs/design.md`, "Column projection").
//!
//! A projection is computed once per rules load ([`super::Rules::parse`]) and carries an id
//! no other load has ([`ProjectionId`]): rows decoded for it say so ([`crate::event::Row`]),
//! and an event whose rows were decoded for other rules than the running ones is decoded
//! again in full before they evaluate it (`crate::source::encoded::unproject`).

use std::collections::HashMap;

use super::glob::{Glob, TablePattern};
use super::{Rule, TableHasher};
use crate::event::{Name, ProjectionId};

/// The columns the rules of one rules load read, per table.
#[derive(Debug)]
pub struct Projection {
    id: ProjectionId,
    /// Each table a rule names exactly, with the columns read by the rules naming it and by
    /// the glob rules matching it (sorted, unique); sorted by table. Searched by halving, once
    /// or twice per event: for the tens of tables of a rules file, cheaper than hashing the
    /// name.
    exact: Box<[TableColumns]>,
    /// The glob rules' patterns, for tables no rule names exactly.
    globs: Box<[Glob]>,
    /// The columns any glob rule reads (sorted, unique): what a table only globs match keeps.
    /// More than the matching globs may read, which is safe and spares a union per event.
    glob_columns: Box<[Name]>,
}

impl Projection {
    /// The projection of `rules` (a rules file's, in file order).
    pub(super) fn of(rules: &[Rule]) -> Projection {
        let mut exact: HashMap<Box<str>, Vec<Box<str>>, TableHasher> = HashMap::default();
        let mut globs = Vec::new();
        let mut glob_columns = Vec::new();
        for rule in rules {
            match &rule.table {
                TablePattern::Exact(table) => exact.entry(table.clone()).or_default().extend(rule.reads().cloned()),
                TablePattern::Glob(glob) => {
                    globs.push(glob.clone());
                    glob_columns.extend(rule.reads().cloned());
                }
            }
        }
        for (table, columns) in &mut exact {
            for rule in rules {
                if let TablePattern::Glob(glob) = &rule.table {
                    if glob.matches(table) {
                        columns.extend(rule.reads().cloned());
                    }
                }
            }
        }
        let mut exact: Vec<TableColumns> = exact.into_iter().map(|(table, columns)| (table, sorted(columns))).collect();
        exact.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Projection {
            id: ProjectionId::unique(),
            exact: exact.into(),
            globs: globs.into(),
            glob_columns: sorted(glob_columns),
        }
    }

    /// This rules load's own id.
    pub fn id(&self) -> ProjectionId {
        self.id
    }

    /// Every column a rule matching `table` reads, in any way, for any op (sorted, unique;
    /// perhaps more). Empty when no rule matches the table: nothing of its rows is read.
    /// Shared names: a decoder puts them in the rows it builds as they are.
    pub fn columns(&self, table: &str) -> &[Name] {
        if let Ok(at) = self.exact.binary_search_by(|(exact, _)| (**exact).cmp(table)) {
            return self.exact.get(at).map_or(&[], |(_, columns)| columns);
        }
        if self.globs.iter().any(|glob| glob.matches(table)) {
            return &self.glob_columns;
        }
        &[]
    }
}

/// A table and the columns the rules read of it.
type TableColumns = (Box<str>, Box<[Name]>);

fn sorted(mut columns: Vec<Box<str>>) -> Box<[Name]> {
    columns.sort_unstable();
    columns.dedup();
    columns.iter().map(|column| Name::from(&**column)).collect()
}

impl Rule {
    /// Every column the rule reads of a row: its templates' (row and `on_truncate`) and its
    /// `when_changed` columns. `Rule::apply` reads rows through these alone.
    fn reads(&self) -> impl Iterator<Item = &Box<str>> {
        let templates = self.templates.iter().chain(self.on_truncate.iter());
        templates.flat_map(|(_, template)| template.columns().iter()).chain(self.when_changed.iter())
    }
}
