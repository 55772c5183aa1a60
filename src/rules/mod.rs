//! The rules engine: a pure function from a change event to what must be invalidated.
//!
//! A rules file is loaded and checked once ([`Rules::from_file`], [`Rules::parse`]); every
//! problem is reported with its line and column, and a file with any problem is rejected as a
//! whole. [`Rules::evaluate`] then runs for every event: templates are precompiled into
//! segments, rules are indexed by exact table name, and only glob rules are scanned.
//!
//! # The rules file
//!
//! ```yaml
//! version: 1
//! rules:
//!   - name: product-pages                 # unique; shows up in metrics and explain output
//!     table: public.products              # schema.table, or a glob such as public.order_*
//!     ops: [insert, update, delete]       # the default; `snapshot` is opt-in
//!     when_changed: [price, name, category_id]
//!     vars:
//!       locale: [en-us, fr, de]
//!     redis:
//!       keys: ["product:{id}", "product:{id}:page:{locale}"]
//!       tags: ["category:{category_id}"]
//!     cdn:
//!       surrogate_keys: ["product-{id}", "category-{category_id}"]
//!       urls: ["https://shop.example.com/p/{slug|urlencode}"]
//!     on_truncate:
//!       redis: { tags: ["products:all"] }
//! ```
//!
//! Fields of a rule (unknown keys are errors at every level):
//! - `name` (required): unique, at most 128 bytes, no control characters.
//! - `table` (required): `schema.table` (or `db.table`), or a glob where `*` matches any run
//!   of characters and `?` one character. Matching is exact and case-sensitive.
//! - `ops`: any of `insert`, `update`, `delete`, `snapshot`; default `[insert, update,
//!   delete]`. `truncate` is not an op: truncates are handled by `on_truncate` alone.
//! - `when_changed`: columns; an update applies only if one of them differs between the
//!   before and after images. Requires `update` in `ops`. An update without a before image,
//!   or where a listed column is absent from either image (an unchanged TOASTed value), is
//!   treated as changed: invalidating too much is safe, too little is not.
//! - `vars`: name → non-empty list of values (strings, integers or booleans).
//! - `redis.keys`, `redis.tags`, `cdn.surrogate_keys`, `cdn.urls`: lists of templates
//!   rendered for the rule's `ops`.
//! - `redis.patterns` (globs: every matching key; values rendered into them are glob-escaped,
//!   and one that renders to `*`s alone is a rule error without `redis.allow_full_scan: true`,
//!   a template of `*`s alone a check error), `redis.generations` (counter keys set to the
//!   event's position when higher), `redis.dependents: true` (also the keys registered in
//!   `<dep_prefix>KEY` sets of what the rule invalidates, as `redis_dependents` roots `key:`,
//!   `tag:`, `pattern:`): `docs/patterns-generations-dependents.md`.
//! - `on_truncate`: the same `redis`/`cdn` lists, applied when the table is truncated
//!   (whatever `ops` says). Truncates carry no rows, so these templates may use vars only.
//!
//! A rule must have something to invalidate: at least one template, under `redis`, `cdn` or
//! `on_truncate`.
//!
//! # Templates
//!
//! - `{column}` renders the column's value; `{name}` renders each value of the var `name`
//!   when `name` is listed under the rule's `vars` (a var shadows a column of the same name).
//!   A template using several vars expands to every combination of their values, at most
//!   1,000 items per row image (`template::MAX_FANOUT`).
//! - `{column|filter|…}` applies filters left to right: `lower`, `upper` (Unicode-aware) and
//!   `urlencode` (percent-encodes the UTF-8 bytes of every character outside `A-Z a-z 0-9 - .
//!   _ ~`, with upper-case hex; a space becomes `%20`). Whitespace around names and filters
//!   is ignored: `{ slug | urlencode }`.
//! - **Literal braces are written doubled**: `{{` renders `{` and `}}` renders `}`, so
//!   `"{{\"id\":{id}}}"` renders `{"id":42}`. Any other `{` or `}` must open or close a
//!   placeholder; an unbalanced brace is a check error.
//! - Strings render as they are, integers and booleans in their JSON spelling, floats in
//!   their shortest round-trip spelling as JSON prints them (`1.5`, `1.0`, `1e+21`). Null,
//!   lists and objects cannot be rendered.
//!
//! Each template renders against every row image the event carries (`after` for inserts and
//! snapshot reads, `before` for deletes, both for updates) in which all its columns are
//! present and renderable; the union is invalidated. A template without columns renders once
//! per event. An event no image of which can render a template produces a [`RuleError`]
//! naming the rule, the template and the missing column; everything else still renders.
//!
//! An item is never empty and never longer than 8 KiB (`template::MAX_ITEM_BYTES`): a
//! template that renders such an item from any image produces a [`RuleError`] too (the item
//! itself is dropped, the template's other items are kept), so the event reaches the dead
//! letters instead of a cache being told to forget `""`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use crate::config::Problem;
use crate::event::{ChangeEvent, Op, Row};
use crate::sink::{Invalidations, ItemKind};

mod glob;
mod parse;
mod projection;
pub mod reload;
mod template;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_more_ways;

use glob::TablePattern;
pub use projection::Projection;
pub(crate) use template::HashTag;
pub(crate) use template::Spare;
use template::{Template, Unrenderable, Var, Why};

/// A loaded, validated rules file.
#[derive(Debug)]
pub struct Rules {
    /// In file order: errors are reported in this order.
    rules: Vec<Rule>,
    /// Exact table name → indexes of the rules naming it, ascending.
    by_table: HashMap<Box<str>, Vec<usize>, TableHasher>,
    /// Indexes of the rules whose table is a glob, ascending; tested one by one.
    globs: Vec<usize>,
    /// FNV-1a of the file text: tells which rules file a running daemon has loaded.
    hash: u64,
    /// What `check` points out without refusing the file (`allow_full_scan: true`).
    notices: Vec<Problem>,
    /// The columns these rules read, per table: what the Kafka source decodes.
    projection: Arc<Projection>,
}

/// One checked rule.
#[derive(Debug)]
struct Rule {
    name: Arc<str>,
    table: TablePattern,
    ops: OpSet,
    /// Empty when the rule has no `when_changed`.
    when_changed: Box<[Box<str>]>,
    vars: Box<[Var]>,
    /// Rendered for events whose op is in `ops`.
    templates: Box<[(ItemKind, Template)]>,
    /// Rendered for truncates; no columns.
    on_truncate: Box<[(ItemKind, Template)]>,
    /// `redis.dependents` and `redis.allow_full_scan` of the rule's own `redis` section, and of
    /// its `on_truncate.redis`.
    flags: parse::SectionFlags,
    truncate_flags: parse::SectionFlags,
}

/// A set of [`Op`]s as a bit mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct OpSet(u8);

impl OpSet {
    const DEFAULT: OpSet = OpSet(0).with(Op::Insert).with(Op::Update).with(Op::Delete);

    const fn bit(op: Op) -> u8 {
        1 << op as u8
    }

    const fn with(self, op: Op) -> OpSet {
        OpSet(self.0 | OpSet::bit(op))
    }

    fn contains(self, op: Op) -> bool {
        self.0 & OpSet::bit(op) != 0
    }
}

/// What one event asks to invalidate.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Evaluation {
    /// Every list sorted bytewise and without duplicates.
    pub invalidations: Invalidations,
    /// Names of the rules that applied after the table, `ops` and `when_changed` filters,
    /// sorted and without duplicates.
    pub matched_rules: Vec<Arc<str>>,
    /// One per template that could not render (in rule order, then template order).
    pub errors: Vec<RuleError>,
}

/// A template that no row image of an event could render, or that rendered an item no cache
/// should be asked to delete (empty, or over the size bound).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    pub rule: Arc<str>,
    /// One sentence naming the rule, the template and the missing column.
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// Every problem found in the file; nothing is loaded. Never retriable: the file must be
    /// fixed.
    #[error("{}", .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

impl RulesError {
    pub fn problems(&self) -> &[Problem] {
        match self {
            RulesError::Invalid(p) => p,
        }
    }
}

impl Rules {
    pub fn from_file(path: &Path) -> Result<Rules, RulesError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            RulesError::Invalid(vec![Problem {
                file: path.to_path_buf(),
                location: None,
                message: format!("cannot read the rules file: {e}"),
            }])
        })?;
        Rules::parse(&text, path)
    }

    /// Parses and checks a rules file; `file` only names it in problems.
    pub fn parse(text: &str, file: &Path) -> Result<Rules, RulesError> {
        let parse::Parsed { rules, notices } = parse::parse(text, file).map_err(RulesError::Invalid)?;
        let mut by_table: HashMap<Box<str>, Vec<usize>, TableHasher> = HashMap::default();
        let mut globs = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            match &rule.table {
                TablePattern::Exact(table) => by_table.entry(table.clone()).or_default().push(i),
                TablePattern::Glob(_) => globs.push(i),
            }
        }
        let projection = Arc::new(Projection::of(&rules));
        Ok(Rules { rules, by_table, globs, hash: crate::fnv::hash(text.as_bytes()), notices, projection })
    }

    /// What `event` asks to invalidate.
    pub fn evaluate(&self, event: &ChangeEvent) -> Evaluation {
        let mut eval = Evaluation::default();
        self.evaluate_into(event, &mut eval);
        eval
    }

    /// [`Rules::evaluate`] into `eval`, which is cleared first: evaluating event after event into
    /// one `Evaluation` (taking its items out in between) reuses its lists' room.
    pub fn evaluate_into(&self, event: &ChangeEvent, eval: &mut Evaluation) {
        self.evaluate_reusing(event, eval, &mut Spare::default());
    }

    /// [`Rules::evaluate_into`], rendering items into the strings of `spare` while it has any
    /// (the pipeline refills it with the strings of the items coalescing drops).
    pub(crate) fn evaluate_reusing(&self, event: &ChangeEvent, eval: &mut Evaluation, spare: &mut Spare) {
        eval.invalidations.clear();
        eval.matched_rules.clear();
        eval.errors.clear();
        let exact = self.by_table.get(event.table.as_str()).map_or(&[][..], Vec::as_slice);
        // Merge the exact and glob candidates by index, so rules apply in file order.
        let (mut e, mut g) = (0, 0);
        loop {
            let index = match (exact.get(e), self.globs.get(g)) {
                (Some(&x), Some(&y)) if x < y => {
                    e += 1;
                    x
                }
                (_, Some(&y)) => {
                    g += 1;
                    if !self.glob_matches(y, &event.table) {
                        continue;
                    }
                    y
                }
                (Some(&x), None) => {
                    e += 1;
                    x
                }
                (None, None) => break,
            };
            if let Some(rule) = self.rules.get(index) {
                rule.apply(event, eval, spare);
            }
        }
        eval.invalidations.normalize();
        eval.matched_rules.sort_unstable();
        eval.matched_rules.dedup();
    }

    fn glob_matches(&self, index: usize, table: &str) -> bool {
        match self.rules.get(index).map(|r| &r.table) {
            Some(TablePattern::Glob(glob)) => glob.matches(table),
            _ => false,
        }
    }

    /// The columns these rules read of each table's rows (`projection.rs`).
    pub fn projection(&self) -> &Arc<Projection> {
        &self.projection
    }

    /// What `check` reports about valid rules: each `allow_full_scan: true`, with its place.
    pub fn notices(&self) -> &[Problem] {
        &self.notices
    }

    /// How many rules are loaded.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rule names, in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| &*r.name)
    }

    /// A stable fingerprint of the file text (64-bit FNV-1a, 16 hex digits): a metric label
    /// and log field saying which rules a daemon runs. Not a security hash.
    pub fn hash(&self) -> String {
        format!("{:016x}", self.hash)
    }
}

/// What a rule reads, for checks against a database schema (`check --against-db`).
#[derive(Debug)]
pub struct RuleColumns<'a> {
    pub name: &'a str,
    table: &'a TablePattern,
    /// The ops its row templates render for (`truncate` excluded: `on_truncate` has no columns).
    pub ops: Vec<Op>,
    /// Columns its row templates read, per template: (template source, columns).
    pub templates: Vec<(&'a str, Vec<&'a str>)>,
    /// `when_changed` columns.
    pub when_changed: Vec<&'a str>,
}

impl RuleColumns<'_> {
    /// The table name when the rule names one table (not a glob).
    pub fn exact_table(&self) -> Option<&str> {
        match self.table {
            TablePattern::Exact(t) => Some(t),
            TablePattern::Glob(_) => None,
        }
    }

    pub fn matches_table(&self, table: &str) -> bool {
        match self.table {
            TablePattern::Exact(t) => &**t == table,
            TablePattern::Glob(g) => g.matches(table),
        }
    }
}

impl Rules {
    /// Read-only: the tables, ops and columns each rule uses, in file order.
    /// Each rule's Redis key and tag templates (not `on_truncate`'s, which render once per
    /// truncate) with the hash tag of what they render, a tag with `tag_prefix` before it: for
    /// `check`'s Redis Cluster warnings (`sink/redis/hash_tags.rs`).
    pub(crate) fn redis_hash_tags<'a>(
        &'a self,
        tag_prefix: &'a str,
    ) -> impl Iterator<Item = (&'a str, ItemKind, &'a str, HashTag)> + 'a {
        self.rules.iter().flat_map(move |rule| {
            rule.templates.iter().filter_map(move |(kind, template)| {
                let prefix = match kind {
                    ItemKind::RedisKey => "",
                    ItemKind::RedisTag => tag_prefix,
                    _ => return None,
                };
                Some((&*rule.name, *kind, template.source(), template.hash_tag(prefix)))
            })
        })
    }

    pub fn columns_by_rule(&self) -> Vec<RuleColumns<'_>> {
        self.rules
            .iter()
            .map(|r| RuleColumns {
                name: &r.name,
                table: &r.table,
                ops: Op::ALL.iter().copied().filter(|&op| op != Op::Truncate && r.ops.contains(op)).collect(),
                templates: r
                    .templates
                    .iter()
                    .map(|(_, t)| (t.source(), t.columns().iter().map(|c| &**c).collect()))
                    .collect(),
                when_changed: r.when_changed.iter().map(|c| &**c).collect(),
            })
            .collect()
    }
}

/// The hasher of the table index, looked up once per event: FNV-1a, several times cheaper than
/// the default SipHash on a table name. Its keys are the rules file's table names, fixed at
/// load: a name from the stream can only miss, never grow the map, so hash flooding has nothing
/// to flood.
type TableHasher = std::hash::BuildHasherDefault<crate::fnv::Hasher>;

impl Rule {
    /// Applies the rule to an event whose table it matches.
    fn apply(&self, event: &ChangeEvent, eval: &mut Evaluation, spare: &mut Spare) {
        let (templates, flags) = if event.op == Op::Truncate {
            (&self.on_truncate, self.truncate_flags)
        } else {
            if !self.ops.contains(event.op) {
                return;
            }
            if event.op == Op::Update && !self.when_changed.is_empty() && !self.changed(event) {
                return;
            }
            (&self.templates, self.flags)
        };
        // A rule with nothing to render for this kind of event did not apply to it.
        if templates.is_empty() {
            return;
        }
        eval.matched_rules.push(self.name.clone());
        for (kind, template) in templates.iter() {
            let out = eval.invalidations.items_mut(*kind);
            let first = out.len();
            if let Some(message) = self.render(template, event, out, spare) {
                eval.errors.push(RuleError { rule: self.name.clone(), message });
            }
            if *kind == ItemKind::RedisPattern && !flags.allow_full_scan {
                // A value that rendered empty (`{prefix}*` with prefix "") must not turn into
                // a scan of the whole keyspace.
                let mut rendered = out.split_off(first.min(out.len()));
                let before = rendered.len();
                rendered.retain(|pattern| !template::matches_everything(pattern));
                let dropped = rendered.len() < before;
                out.extend(rendered);
                if dropped {
                    let message = format!(
                        "rule {:?}: pattern template {:?} rendered a pattern matching every key, which is never scanned without `allow_full_scan: true`",
                        self.name,
                        template.source()
                    );
                    eval.errors.push(RuleError { rule: self.name.clone(), message });
                }
            }
            if flags.dependents {
                if let Some(root) = crate::sink::redis::dependents::Root::kind_prefix(*kind) {
                    let added: Vec<String> = eval
                        .invalidations
                        .items(*kind)
                        .get(first..)
                        .unwrap_or_default()
                        .iter()
                        .map(|i| format!("{root}{i}"))
                        .collect();
                    eval.invalidations.items_mut(ItemKind::RedisDependents).extend(added);
                }
            }
        }
    }

    /// Whether an update changed one of the `when_changed` columns. Anything unknown counts
    /// as changed.
    fn changed(&self, event: &ChangeEvent) -> bool {
        let (Some(before), Some(after)) = (&event.before, &event.after) else {
            return true;
        };
        self.when_changed.iter().any(|column| match (before.get(&**column), after.get(&**column)) {
            (Some(b), Some(a)) => a != b,
            _ => true,
        })
    }

    /// Renders one template against the event's images into `out`; returns the error
    /// sentence if it must be reported.
    fn render(
        &self,
        template: &Template,
        event: &ChangeEvent,
        out: &mut Vec<String>,
        spare: &mut Spare,
    ) -> Option<String> {
        let mut items = 0;
        let mut empty = 0;
        let mut oversize = 0;
        let mut largest = 0;
        let mut placeholder = 0;
        // (image, first column that failed): at most two images.
        let mut failures: [Option<(&'static str, Unrenderable<'_>)>; 2] = [None, None];
        let mut tally = |r: template::Rendered| {
            items += r.items;
            empty += r.empty;
            oversize += r.oversize;
            largest = largest.max(r.largest);
            placeholder += r.placeholder;
        };
        if template.columns().is_empty() {
            match template.render_reusing(None, &self.vars, out, spare) {
                Ok(r) => tally(r),
                // Unreachable without columns; report rather than drop it silently.
                Err(u) => failures[0] = Some(("event", u)),
            }
        } else {
            let mut previous: Option<&Row> = None;
            for (i, row) in event.images().enumerate() {
                // An update that left every column of the template alone renders the same
                // items from both images: skip the second rendering (and its allocations).
                if previous.is_some_and(|p| same_columns(template, p, row)) {
                    continue;
                }
                match template.render_reusing(Some(row), &self.vars, out, spare) {
                    Ok(r) => {
                        tally(r);
                        previous = Some(row);
                    }
                    Err(u) => {
                        if let Some(slot) = failures.get_mut(i) {
                            *slot = Some((image_name(event, row), u));
                        }
                    }
                }
            }
        }
        if items == 0 && empty == 0 && oversize == 0 && placeholder == 0 {
            return Some(self.unrenderable(template, event.op, &failures));
        }
        let source = template.source();
        if placeholder > 0 {
            return Some(format!(
                "rule {:?}: template {source:?} rendered an item holding a connector's unavailable-value placeholder (a value the database did not send), which is never invalidated",
                self.name
            ));
        }
        if empty > 0 {
            return Some(format!(
                "rule {:?}: template {source:?} rendered an empty string, which is never invalidated",
                self.name
            ));
        }
        if oversize > 0 {
            return Some(format!(
                "rule {:?}: template {source:?} rendered an item of {largest} bytes, over the limit of {} bytes, which is never invalidated",
                self.name,
                template::MAX_ITEM_BYTES
            ));
        }
        None
    }

    /// The sentence for a template that no image could render.
    fn unrenderable(
        &self,
        template: &Template,
        op: Op,
        failures: &[Option<(&'static str, Unrenderable<'_>)>],
    ) -> String {
        let mut message = format!("rule {:?}: template {:?} could not be rendered: ", self.name, template.source());
        let mut previous: Option<&str> = None;
        for (image, failure) in failures.iter().flatten() {
            if previous.is_some() {
                message.push_str(" and ");
            }
            if previous != Some(failure.column) {
                message.push_str(&format!("column {:?} ", failure.column));
            }
            let why = match failure.why {
                Why::Absent => "is absent from",
                Why::Null => "is null in",
                Why::List => "is a list (which cannot be rendered) in",
                Why::Object => "is an object (which cannot be rendered) in",
            };
            message.push_str(&format!("{why} the {image} image"));
            previous = Some(failure.column);
        }
        if previous.is_none() {
            message.push_str(&format!("the {op} event carries no row image"));
        }
        message
    }
}

/// Names a row image of `event` for error messages.
fn image_name(event: &ChangeEvent, row: &Row) -> &'static str {
    if event.before.as_ref().is_some_and(|b| std::ptr::eq(b, row)) {
        "before"
    } else {
        "after"
    }
}

/// Whether every column of `template` has the same value in both images (so both render the
/// same items). A column absent from either is not known to be the same.
fn same_columns(template: &Template, a: &Row, b: &Row) -> bool {
    template.columns().iter().all(|column| match (a.get(&**column), b.get(&**column)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    })
}
