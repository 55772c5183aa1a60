//! Loading and checking a rules file: YAML text → checked [`Rule`]s, or every problem found.
//!
//! The checker never stops at the first problem: each field is checked on its own, a broken
//! field only skips the checks that depend on it, and a rule with any problem is left out. A
//! problem points at the node it concerns (a key for an unknown or repeated key, the value for
//! a wrong value, the rule for a missing field) and its message is one sentence naming the
//! rule and the field.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use crate::config::yaml::{self, Location, Node, Value};
use crate::config::Problem;
use crate::event::Op;
use crate::sink::ItemKind;

use super::glob::TablePattern;
use super::template::{Template, Var, MAX_FANOUT};
use super::{OpSet, Rule};

/// Longest rule name, in bytes: names are metric label values and must stay bounded.
const MAX_NAME_BYTES: usize = 128;

const RULE_FIELDS: [&str; 8] = ["name", "table", "ops", "when_changed", "vars", "redis", "cdn", "on_truncate"];
const REDIS_FIELDS: [(&str, Field); 6] = [
    ("keys", Field::List(ItemKind::RedisKey)),
    ("tags", Field::List(ItemKind::RedisTag)),
    ("patterns", Field::List(ItemKind::RedisPattern)),
    ("generations", Field::List(ItemKind::RedisGeneration)),
    ("dependents", Field::Flag(Flag::Dependents)),
    ("allow_full_scan", Field::Flag(Flag::AllowFullScan)),
];
const CDN_FIELDS: [(&str, Field); 2] =
    [("surrogate_keys", Field::List(ItemKind::SurrogateKey)), ("urls", Field::List(ItemKind::Url))];

/// A field of a `redis`/`cdn` section: a list of templates of one kind, or a boolean.
#[derive(Debug, Clone, Copy)]
enum Field {
    List(ItemKind),
    Flag(Flag),
}

#[derive(Debug, Clone, Copy)]
enum Flag {
    /// `redis.dependents`: cascade over `<dep_prefix>KEY` sets from what the section invalidates.
    Dependents,
    /// `redis.allow_full_scan`: a pattern may match every key.
    AllowFullScan,
}

/// The booleans of a section.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct SectionFlags {
    pub(super) dependents: bool,
    pub(super) allow_full_scan: bool,
}

/// A checked rules file: its rules, and what `check` should point out about them (not
/// problems: `allow_full_scan: true`).
pub(super) struct Parsed {
    pub(super) rules: Vec<Rule>,
    pub(super) notices: Vec<Problem>,
}

pub(super) fn parse(text: &str, file: &Path) -> Result<Parsed, Vec<Problem>> {
    let mut checker = Checker { file, problems: Vec::new(), notices: Vec::new() };
    let rules = match yaml::parse(text) {
        Ok(doc) => checker.document(&doc),
        Err(e) => {
            checker.report(e.location, format!("the rules file is not valid YAML: {}", e.message));
            Vec::new()
        }
    };
    if checker.problems.is_empty() {
        Ok(Parsed { rules, notices: checker.notices })
    } else {
        // Top to bottom, as an operator reads the file (stable: one node's problems keep
        // their order).
        checker.problems.sort_by_key(|p| p.location);
        Err(checker.problems)
    }
}

struct Checker<'f> {
    file: &'f Path,
    problems: Vec<Problem>,
    notices: Vec<Problem>,
}

impl Checker<'_> {
    fn report(&mut self, at: Location, message: String) {
        self.problems.push(Problem { file: self.file.to_path_buf(), location: Some(at), message });
    }

    /// `who: `field` must be EXPECTED, not TYPE`.
    fn wrong_type(&mut self, node: &Node, who: &str, field: &str, expected: &str) {
        self.report(start(node), format!("{who}: `{field}` must be {expected}, not {}", node.type_name()));
    }

    /// The values of a mapping's known keys, in the order of `names`; reports unknown and
    /// repeated keys. `path` is the mapping's own field path ("" for a rule itself).
    fn fields<'n, const N: usize>(
        &mut self,
        node: &'n Node,
        names: [&str; N],
        who: &str,
        path: &str,
    ) -> [Option<&'n Node>; N] {
        let mut found: [Option<(&Node, &'n Node)>; N] = [None; N];
        for (key, value) in node.as_map().unwrap_or_default() {
            let text = scalar_text(key);
            match names.iter().position(|n| *n == text) {
                Some(i) => match found[i] {
                    Some((first, _)) => self.report(
                        key.location,
                        format!(
                            "{who}: `{}` is given twice (first at line {})",
                            join(path, &text),
                            first.location.line
                        ),
                    ),
                    None => found[i] = Some((key, value)),
                },
                None => self.report(
                    key.location,
                    format!("{who}: `{}` is not a known field (expected {})", join(path, &text), one_of(&names)),
                ),
            }
        }
        found.map(|f| f.map(|(_, value)| value))
    }

    fn document(&mut self, doc: &Node) -> Vec<Rule> {
        const WHO: &str = "the rules file";
        match doc.value {
            Value::Map(_) => {}
            Value::Null => {
                self.report(doc.location, format!("{WHO} is empty: it needs `version: 1` and a list of `rules`"));
                return Vec::new();
            }
            _ => {
                self.report(
                    doc.location,
                    format!("{WHO} must be a mapping with `version` and `rules`, not {}", doc.type_name()),
                );
                return Vec::new();
            }
        }
        let [version, rules] = self.fields(doc, ["version", "rules"], WHO, "");
        match version {
            None => self.report(start(doc), format!("{WHO} has no `version`: add `version: 1`")),
            Some(v) if v.value == Value::Int(1) => {}
            Some(v) => self.report(v.location, format!("{WHO}: `version` must be 1, not {}", describe(v))),
        }
        let Some(rules) = rules else {
            self.report(start(doc), format!("{WHO} has no `rules` list"));
            return Vec::new();
        };
        let Some(items) = rules.as_seq() else {
            self.wrong_type(rules, WHO, "rules", "a list of rules");
            return Vec::new();
        };
        if items.is_empty() {
            self.report(rules.location, format!("{WHO}: `rules` lists no rules"));
        }
        let mut names = HashMap::new();
        items.iter().enumerate().filter_map(|(i, item)| self.rule(i, item, &mut names)).collect()
    }

    /// Checks one rule; `None` if it has any problem (all of them reported).
    fn rule(&mut self, index: usize, node: &Node, names: &mut HashMap<String, Location>) -> Option<Rule> {
        let numbered = format!("rule #{}", index + 1);
        if node.as_map().is_none() {
            self.report(node.location, format!("{numbered} must be a mapping, not {}", node.type_name()));
            return None;
        }
        let problems_before = self.problems.len();
        // The name, when usable, identifies the rule in every other message.
        let name = node.get("name").and_then(Node::as_str).filter(|n| name_problem(n).is_none());
        let who = match name {
            Some(name) => format!("rule {name:?}"),
            None => numbered,
        };
        let [name_node, table, ops, when_changed, vars, redis, cdn, on_truncate] =
            self.fields(node, RULE_FIELDS, &who, "");

        match name_node {
            None => self.report(start(node), format!("{who} has no `name`")),
            Some(n) => match n.as_str() {
                None => self.wrong_type(n, &who, "name", "a string"),
                Some(text) => match name_problem(text) {
                    Some(problem) => self.report(n.location, format!("{who}: `name` {problem}")),
                    None => match names.get(text) {
                        Some(first) => {
                            let line = first.line;
                            self.report(n.location, format!("{who}: `name` is already used by the rule at line {line}"))
                        }
                        None => {
                            names.insert(text.to_string(), n.location);
                        }
                    },
                },
            },
        }

        let table = match table {
            None => {
                self.report(start(node), format!("{who} has no `table`"));
                None
            }
            Some(t) => match t.as_str() {
                None => {
                    self.wrong_type(t, &who, "table", "a string such as `public.products`");
                    None
                }
                Some(text) => match TablePattern::parse(text) {
                    Ok(pattern) => Some(pattern),
                    Err(e) => {
                        self.report(t.location, format!("{who}: `table` {text:?} {e}"));
                        None
                    }
                },
            },
        };

        let ops = match ops {
            None => Some(OpSet::DEFAULT),
            Some(n) => self.ops(n, &who),
        };

        let when_changed = match when_changed {
            None => Vec::new(),
            Some(n) => {
                let columns = self.when_changed(n, &who);
                if ops.is_some_and(|ops| !ops.contains(Op::Update)) {
                    self.report(
                        n.location,
                        format!("{who}: `when_changed` only applies to updates, but `ops` does not include update"),
                    );
                }
                columns
            }
        };

        let vars = match vars {
            None => Vec::new(),
            Some(n) => self.vars(n, &who),
        };

        let mut templates = Vec::new();
        let mut listed = 0;
        let mut flags = SectionFlags::default();
        let mut truncate_flags = SectionFlags::default();
        if let Some(n) = redis {
            listed += self.section(n, "redis", REDIS_FIELDS, &who, &vars, false, &mut templates, &mut flags);
        }
        if let Some(n) = cdn {
            listed += self.section(n, "cdn", CDN_FIELDS, &who, &vars, false, &mut templates, &mut flags);
        }
        let mut truncate_templates = Vec::new();
        if let Some(n) = on_truncate {
            if n.as_map().is_some() {
                let [redis, cdn] = self.fields(n, ["redis", "cdn"], &who, "on_truncate");
                let mut truncate_listed = 0;
                if let Some(r) = redis {
                    truncate_listed += self.section(
                        r,
                        "on_truncate.redis",
                        REDIS_FIELDS,
                        &who,
                        &vars,
                        true,
                        &mut truncate_templates,
                        &mut truncate_flags,
                    );
                }
                if let Some(c) = cdn {
                    truncate_listed += self.section(
                        c,
                        "on_truncate.cdn",
                        CDN_FIELDS,
                        &who,
                        &vars,
                        true,
                        &mut truncate_templates,
                        &mut truncate_flags,
                    );
                }
                if truncate_listed == 0 {
                    self.report(start(n), format!("{who}: `on_truncate` lists nothing to invalidate"));
                }
                listed += truncate_listed;
            } else {
                self.wrong_type(n, &who, "on_truncate", "a mapping with `redis` and/or `cdn`");
                // Whatever it meant, it was meant to invalidate something.
                listed += 1;
            }
        }
        if listed == 0 {
            self.report(
                start(node),
                format!("{who} has nothing to invalidate: give it `redis`, `cdn` or `on_truncate` templates"),
            );
        }

        if self.problems.len() > problems_before {
            return None;
        }
        Some(Rule {
            name: Arc::from(name?),
            table: table?,
            ops: ops?,
            when_changed: when_changed.into_iter().map(Box::from).collect(),
            vars: vars.into(),
            templates: templates.into(),
            on_truncate: truncate_templates.into(),
            flags,
            truncate_flags,
        })
    }

    fn ops(&mut self, node: &Node, who: &str) -> Option<OpSet> {
        let Some(items) = node.as_seq() else {
            self.wrong_type(node, who, "ops", "a list of operations");
            return None;
        };
        if items.is_empty() {
            self.report(
                node.location,
                format!("{who}: `ops` must list at least one operation (leave it out for insert, update, delete)"),
            );
            return None;
        }
        let mut set = OpSet::default();
        let mut ok = true;
        for item in items {
            let message = match item.as_str() {
                Some(text) => match Op::parse(text) {
                    Some(Op::Truncate) => format!(
                        "{who}: `ops` cannot list truncate: truncates are handled by `on_truncate`, whatever `ops` says"
                    ),
                    Some(op) => {
                        set = set.with(op);
                        continue;
                    }
                    None => format!(
                        "{who}: `ops` lists the unknown operation {text:?} (expected insert, update, delete or snapshot)"
                    ),
                },
                None => format!("{who}: `ops` lists {}, but operations are strings", item.type_name()),
            };
            self.report(item.location, message);
            ok = false;
        }
        ok.then_some(set)
    }

    fn when_changed(&mut self, node: &Node, who: &str) -> Vec<String> {
        let Some(items) = node.as_seq() else {
            self.wrong_type(node, who, "when_changed", "a list of column names");
            return Vec::new();
        };
        if items.is_empty() {
            self.report(node.location, format!("{who}: `when_changed` must list at least one column"));
        }
        let mut columns = Vec::new();
        for item in items {
            match item.as_str() {
                Some(column) if !column.is_empty() => columns.push(column.to_string()),
                Some(_) => self.report(item.location, format!("{who}: `when_changed` lists an empty column name")),
                None => self.report(
                    item.location,
                    format!("{who}: `when_changed` lists {}, but column names are strings", item.type_name()),
                ),
            }
        }
        columns
    }

    fn vars(&mut self, node: &Node, who: &str) -> Vec<Var> {
        let Some(entries) = node.as_map() else {
            self.wrong_type(node, who, "vars", "a mapping of names to lists of values");
            return Vec::new();
        };
        let mut vars: Vec<Var> = Vec::new();
        let mut seen: HashMap<String, Location> = HashMap::new();
        for (key, value) in entries {
            let name = scalar_text(key);
            let field = join("vars", &name);
            if key.as_str().is_none() || name.trim() != name || name.is_empty() || name.contains(['{', '}', '|']) {
                self.report(
                    key.location,
                    format!("{who}: `{field}` cannot be named in a placeholder (use a name without braces, `|` or surrounding spaces)"),
                );
                continue;
            }
            if let Some(first) = seen.get(&name) {
                let line = first.line;
                self.report(key.location, format!("{who}: `{field}` is given twice (first at line {line})"));
                continue;
            }
            seen.insert(name.clone(), key.location);
            // A broken var is still declared (without values), so templates naming it are
            // not also reported as using an unknown column. The rule is rejected anyway.
            let items = match value.as_seq() {
                Some([]) => {
                    self.report(value.location, format!("{who}: `{field}` must list at least one value"));
                    &[][..]
                }
                Some(items) => items,
                None => {
                    self.wrong_type(value, who, &field, "a list of values");
                    &[][..]
                }
            };
            let mut values = Vec::with_capacity(items.len());
            for item in items {
                match &item.value {
                    Value::Str(s) => values.push(Box::from(s.as_str())),
                    Value::Int(i) => values.push(i.to_string().into()),
                    Value::Bool(b) => values.push(b.to_string().into()),
                    _ => self.report(
                        item.location,
                        format!(
                            "{who}: `{field}` lists {}, but values must be strings, integers or booleans (quote it)",
                            item.type_name()
                        ),
                    ),
                }
            }
            vars.push(Var { name: name.into(), values: values.into() });
        }
        vars
    }

    /// Checks a `redis`/`cdn` section and compiles its templates into `out`; returns how many
    /// templates it lists (compiled or not), so a section of broken templates is not also
    /// reported as empty.
    #[allow(clippy::too_many_arguments)]
    fn section<const N: usize>(
        &mut self,
        node: &Node,
        path: &str,
        kinds: [(&str, Field); N],
        who: &str,
        vars: &[Var],
        truncate: bool,
        out: &mut Vec<(ItemKind, Template)>,
        flags: &mut SectionFlags,
    ) -> usize {
        if node.as_map().is_none() {
            let lists: Vec<String> =
                kinds.iter().filter(|(_, f)| matches!(f, Field::List(_))).map(|(n, _)| format!("`{n}`")).collect();
            let expected = match lists.split_last() {
                Some((last, rest)) if !rest.is_empty() => format!("a mapping with {} and/or {last}", rest.join(", ")),
                _ => format!("a mapping with {}", lists.join("")),
            };
            self.wrong_type(node, who, path, &expected);
            return 1;
        }
        let lists = self.fields(node, kinds.map(|(name, _)| name), who, path);
        let mut listed = 0;
        let mut full_scans = Vec::new();
        for (list, (name, field_kind)) in lists.into_iter().zip(kinds) {
            let Some(list) = list else { continue };
            let field = join(path, name);
            let kind = match field_kind {
                Field::List(kind) => kind,
                Field::Flag(flag) => {
                    let set = match &list.value {
                        Value::Bool(b) => *b,
                        _ => {
                            self.wrong_type(list, who, &field, "true or false");
                            continue;
                        }
                    };
                    match flag {
                        Flag::Dependents => flags.dependents = set,
                        Flag::AllowFullScan => {
                            flags.allow_full_scan = set;
                            if set {
                                self.notices.push(Problem {
                                    file: self.file.to_path_buf(),
                                    location: Some(list.location),
                                    message: format!(
                                        "{who}: `{field}: true`: its patterns may scan the whole keyspace"
                                    ),
                                });
                            }
                        }
                    }
                    continue;
                }
            };
            let Some(items) = list.as_seq() else {
                self.wrong_type(list, who, &field, "a list of templates");
                listed += 1;
                continue;
            };
            listed += items.len();
            for item in items {
                let Some(text) = item.as_str() else {
                    self.report(
                        item.location,
                        format!("{who}: `{field}` lists {}, but templates are strings (quote it)", item.type_name()),
                    );
                    continue;
                };
                let template = match Template::compile(text, vars) {
                    Ok(template) if kind == ItemKind::RedisPattern => {
                        if template.is_full_scan() {
                            full_scans.push((item.location, text.to_string()));
                        }
                        template.escaping_glob()
                    }
                    Ok(template) => template,
                    Err(errors) => {
                        for e in errors {
                            self.report(item.location, format!("{who}: `{field}` template {text:?} {e}"));
                        }
                        continue;
                    }
                };
                let mut ok = true;
                if truncate {
                    for column in template.columns() {
                        self.report(
                            item.location,
                            format!("{who}: `{field}` template {text:?} uses the column {column:?}, but truncates carry no rows (only vars may be used here)"),
                        );
                        ok = false;
                    }
                }
                let fanout = template.fanout(vars);
                if fanout > MAX_FANOUT {
                    self.report(
                        item.location,
                        format!("{who}: `{field}` template {text:?} expands to {fanout} items per row image through `vars`, over the limit of {MAX_FANOUT}"),
                    );
                    ok = false;
                }
                if ok {
                    out.push((kind, template));
                }
            }
        }
        // Known only once the whole section is read: `allow_full_scan` may come after the list.
        if !flags.allow_full_scan {
            for (at, text) in full_scans {
                self.report(
                    at,
                    format!("{who}: `{path}.patterns` template {text:?} matches every key: a scan of the whole keyspace needs `allow_full_scan: true` in `{path}`"),
                );
            }
        }
        listed
    }
}

/// What is wrong with a rule name, if anything.
fn name_problem(name: &str) -> Option<String> {
    if name.trim().is_empty() {
        Some("is empty".into())
    } else if name.len() > MAX_NAME_BYTES {
        Some(format!("is {} bytes long, over the limit of {MAX_NAME_BYTES}", name.len()))
    } else if name.chars().any(char::is_control) {
        Some("contains a control character".into())
    } else {
        None
    }
}

/// A mapping key as written (keys are nearly always strings; `1:` is still worth naming).
fn scalar_text(node: &Node) -> String {
    match &node.value {
        Value::Str(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => "null".into(),
        Value::Seq(_) | Value::Map(_) => node.type_name().into(),
    }
}

/// Where to point at a whole mapping: its first key. (The parser places a block mapping at
/// the first `:`, which reads oddly in an error.)
fn start(node: &Node) -> Location {
    match node.as_map() {
        Some([(key, _), ..]) => key.location,
        _ => node.location,
    }
}

/// A scalar for "must be 1, not …".
fn describe(node: &Node) -> String {
    match &node.value {
        Value::Int(i) => i.to_string(),
        Value::Str(s) => format!("the string {s:?}"),
        _ => node.type_name().into(),
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// "`a`, `b` or `c`".
fn one_of(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    match quoted.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        Some((last, _)) => last.clone(),
        None => String::new(),
    }
}
