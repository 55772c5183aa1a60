//! A YAML document tree that remembers where every node was written.
//!
//! The `config` crate and serde know *what* is wrong with a file but not *where*; operators need
//! `rules.yaml:12:9`. So both the config and the rules file are also parsed into this tree, and
//! every error is pinned to the line and column of the node it concerns.

use std::fmt;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A place in a file: 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

impl From<&Marker> for Location {
    fn from(m: &Marker) -> Location {
        // yaml-rust2 counts lines from 1 and columns from 0.
        Location { line: m.line(), column: m.col() + 1 }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    /// Entries in file order; duplicates are kept so a checker can report them.
    Map(Vec<(Node, Node)>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub value: Value,
    pub location: Location,
}

/// A syntax error, with where it happened.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{location}: {message}")]
pub struct SyntaxError {
    pub message: String,
    pub location: Location,
}

/// Largest number of nodes a document may expand to (aliases included): stops "billion laughs"
/// documents from exhausting memory.
const MAX_NODES: usize = 1_000_000;

/// Parses the first document of `text`. An empty document is `Null`.
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    parser
        .load(&mut builder, false)
        .map_err(|e| SyntaxError { message: e.info().to_string(), location: Location::from(e.marker()) })?;
    if let Some(err) = builder.error {
        return Err(err);
    }
    Ok(builder.root.unwrap_or(Node { value: Value::Null, location: Location { line: 1, column: 1 } }))
}

#[derive(Default)]
struct Builder {
    stack: Vec<(Node, Option<Node>, usize)>, // (container, pending map key, anchor)
    anchors: std::collections::HashMap<usize, Node>,
    root: Option<Node>,
    nodes: usize,
    error: Option<SyntaxError>,
}

impl Builder {
    fn push_value(&mut self, node: Node, anchor: usize) {
        if self.error.is_some() {
            return;
        }
        self.nodes += count(&node);
        if self.nodes > MAX_NODES {
            self.error = Some(SyntaxError {
                message: format!("document expands to more than {MAX_NODES} nodes"),
                location: node.location,
            });
            return;
        }
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => {
                if self.root.is_none() {
                    self.root = Some(node);
                }
            }
            Some((Node { value: Value::Seq(items), .. }, _, _)) => items.push(node),
            Some((Node { value: Value::Map(entries), .. }, pending, _)) => match pending.take() {
                None => *pending = Some(node),
                Some(key) => entries.push((key, node)),
            },
            Some(_) => {}
        }
    }
}

fn count(node: &Node) -> usize {
    match &node.value {
        Value::Seq(items) => 1 + items.iter().map(count).sum::<usize>(),
        Value::Map(entries) => 1 + entries.iter().map(|(k, v)| count(k) + count(v)).sum::<usize>(),
        _ => 1,
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let location = Location::from(&mark);
        match ev {
            Event::Scalar(text, style, anchor, _tag) => {
                let value = if style == TScalarStyle::Plain { resolve_plain(text) } else { Value::Str(text) };
                self.push_value(Node { value, location }, anchor);
            }
            Event::SequenceStart(anchor, _) => {
                self.stack.push((Node { value: Value::Seq(Vec::new()), location }, None, anchor));
            }
            Event::MappingStart(anchor, _) => {
                self.stack.push((Node { value: Value::Map(Vec::new()), location }, None, anchor));
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some((node, _, anchor)) = self.stack.pop() {
                    self.push_value(node, anchor);
                }
            }
            Event::Alias(id) => match self.anchors.get(&id).cloned() {
                Some(mut node) => {
                    node.location = location;
                    self.push_value(node, 0);
                }
                None => {
                    if self.error.is_none() {
                        self.error = Some(SyntaxError { message: "unknown alias".into(), location });
                    }
                }
            },
            _ => {}
        }
    }
}

/// YAML 1.2 core schema resolution of a plain scalar.
fn resolve_plain(text: String) -> Value {
    match text.as_str() {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    if let Ok(i) = text.parse::<i64>() {
        return Value::Int(i);
    }
    if let Some(hex) = text.strip_prefix("0x") {
        if let Ok(i) = i64::from_str_radix(hex, 16) {
            return Value::Int(i);
        }
    }
    let looks_numeric = text.bytes().next().is_some_and(|b| b.is_ascii_digit() || b == b'-' || b == b'+' || b == b'.');
    if looks_numeric {
        if let Ok(f) = text.parse::<f64>() {
            return Value::Float(f);
        }
    }
    Value::Str(text)
}

impl Node {
    /// The entries of a mapping, or `None`.
    pub fn as_map(&self) -> Option<&[(Node, Node)]> {
        match &self.value {
            Value::Map(entries) => Some(entries),
            _ => None,
        }
    }

    pub fn as_seq(&self) -> Option<&[Node]> {
        match &self.value {
            Value::Seq(items) => Some(items),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The value under a mapping key.
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.as_map()?.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v)
    }

    /// The key node for `key` in a mapping (to point at a key rather than its value).
    pub fn key(&self, key: &str) -> Option<&Node> {
        self.as_map()?.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(k, _)| k)
    }

    /// The child under a mapping key (ASCII case-insensitive, as the `config` crate folds
    /// environment keys) or a sequence index given as a decimal string.
    fn child(&self, segment: &str) -> Option<&Node> {
        match &self.value {
            Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.as_str().is_some_and(|s| s.eq_ignore_ascii_case(segment)))
                .map(|(_, v)| v),
            Value::Seq(items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        }
    }

    /// The deepest node along `path`, stopping at the last one found.
    fn walk<'a>(&self, path: impl IntoIterator<Item = &'a str>) -> &Node {
        let mut node = self;
        for segment in path {
            match node.child(segment) {
                Some(n) => node = n,
                None => break,
            }
        }
        node
    }

    /// The location of the deepest node along `path` (mapping keys, or sequence indexes as
    /// decimal strings). Stops at the last node found, so a path into a missing key still
    /// points at its parent.
    pub fn locate<'a>(&self, path: impl IntoIterator<Item = &'a str>) -> Location {
        self.walk(path).location
    }

    /// Like [`Node::locate`], but for a path whose last segment is a mapping key: the location
    /// of the key itself (where an "unknown key" error should point).
    pub fn locate_key(&self, path: &[&str]) -> Location {
        let Some((last, parent)) = path.split_last() else { return self.location };
        let node = self.walk(parent.iter().copied());
        node.as_map()
            .and_then(|entries| entries.iter().find(|(k, _)| k.as_str().is_some_and(|s| s.eq_ignore_ascii_case(last))))
            .map(|(k, _)| k.location)
            .unwrap_or(node.location)
    }

    /// A short name of the node's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self.value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_are_one_based() {
        let doc = parse("version: 1\nrules:\n  - name: a\n    table: t\n").unwrap();
        assert_eq!(doc.get("version").unwrap().location, Location { line: 1, column: 10 });
        assert_eq!(doc.locate(["rules", "0", "table"]), Location { line: 4, column: 12 });
        assert_eq!(doc.key("rules").unwrap().location, Location { line: 2, column: 1 });
    }

    #[test]
    fn scalars_resolve_like_yaml_1_2() {
        let doc = parse("a: 1\nb: '1'\nc: true\nd: ~\ne: 1.5\nf: hello\n").unwrap();
        assert_eq!(doc.get("a").unwrap().value, Value::Int(1));
        assert_eq!(doc.get("b").unwrap().value, Value::Str("1".into()));
        assert_eq!(doc.get("c").unwrap().value, Value::Bool(true));
        assert_eq!(doc.get("d").unwrap().value, Value::Null);
        assert_eq!(doc.get("e").unwrap().value, Value::Float(1.5));
        assert_eq!(doc.get("f").unwrap().value, Value::Str("hello".into()));
    }

    #[test]
    fn syntax_errors_carry_a_location() {
        let err = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.location.line >= 1, "{err}");
    }

    #[test]
    fn aliases_expand_and_are_bounded() {
        let doc = parse("x: &a [1, 2]\ny: *a\n").unwrap();
        assert_eq!(doc.get("y").unwrap().as_seq().unwrap().len(), 2);
        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..9 {
            let prev = format!("*a{}", i - 1);
            bomb.push_str(&format!("a{i}: &a{i} [{}]\n", vec![prev; 10].join(", ")));
        }
        let err = parse(&bomb).unwrap_err();
        assert!(err.message.contains("more than"), "{err}");
    }
}
