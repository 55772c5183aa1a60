//! Every problem of a config file, in plain words, each at its file, line and column, in file
//! order.
//!
//! Serde stops at the first error, and the `config` crate keeps maps in hash order, so a file
//! with two typos used to report one of them, a different one from run to run; and some errors
//! carried Rust debug output (`String("grace")`, `Hash({...})`). Here: duplicate keys are found
//! on the located YAML tree before anything else; after the first deserialization error the
//! merged settings are deserialized again from a copy with each offending key taken out, until
//! no new error appears; the messages are rewritten in plain words; and all are sorted by place.

use serde_json::Value as Json;

use super::yaml::{self, Node};
use super::{Origin, Problem};

/// At most this many deserialization errors are collected from one file.
const MAX_ERRORS: usize = 64;

/// Every key written twice in the same mapping, at the second spelling.
pub(super) fn duplicate_keys(origin: &Origin, root: &Node) -> Vec<Problem> {
    let mut out = Vec::new();
    walk_duplicates(origin, root, &mut Vec::new(), &mut out);
    out
}

fn walk_duplicates(origin: &Origin, node: &Node, path: &mut Vec<String>, out: &mut Vec<Problem>) {
    match &node.value {
        yaml::Value::Map(entries) => {
            for (i, (key, value)) in entries.iter().enumerate() {
                let name = scalar_text(key);
                if let Some((first, _)) = entries[..i].iter().find(|(k, _)| scalar_text(k) == name) {
                    let mut at = path.clone();
                    at.push(name.clone());
                    out.push(Problem {
                        file: origin.file.to_path_buf(),
                        location: Some(key.location),
                        message: format!(
                            "{}: the key `{name}` is written twice (first at line {}); remove one",
                            at.join("."),
                            first.location.line
                        ),
                    });
                }
                path.push(name);
                walk_duplicates(origin, value, path, out);
                path.pop();
            }
        }
        yaml::Value::Seq(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push(i.to_string());
                walk_duplicates(origin, item, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

fn scalar_text(node: &Node) -> String {
    match &node.value {
        yaml::Value::Str(s) => s.clone(),
        yaml::Value::Int(i) => i.to_string(),
        yaml::Value::Float(f) => f.to_string(),
        yaml::Value::Bool(b) => b.to_string(),
        yaml::Value::Null => "null".into(),
        _ => format!("<{}>", node.location),
    }
}

/// One deserialization error as a problem, and the path of the setting it concerns.
pub(super) fn from_serde(
    origin: &Origin,
    e: serde_path_to_error::Error<impl std::fmt::Display>,
) -> (Problem, Vec<String>) {
    let mut path: Vec<String> = e.path().iter().map(|s| s.to_string()).filter(|s| s != "?").collect();
    let mut message = plain_words(&e.into_inner().to_string());
    // The `config` crate appends " for key `a.b`" to some errors: the path already says it.
    if let Some(at) = message.rfind(" for key `") {
        if message.ends_with('`') {
            message.truncate(at);
        }
    }
    // For an unknown field, point at that key rather than its parent.
    let unknown = message.strip_prefix("unknown field `").and_then(|m| m.split('`').next()).map(str::to_string);
    if let Some(field) = &unknown {
        if path.last() != Some(field) {
            path.push(field.clone());
        }
    }
    let segs: Vec<&str> = path.iter().map(String::as_str).collect();
    let text = if segs.is_empty() { message } else { format!("{}: {message}", segs.join(".")) };
    let mut problem = origin.problem(&segs, text);
    if unknown.is_some() {
        problem.location = origin.doc.as_ref().map(|d| d.locate_key(&segs));
    }
    (problem, path)
}

/// Deserialization errors after the first: the settings are deserialized again with each
/// offending key removed, until they pass or no new error appears.
pub(super) fn more<T: serde::de::DeserializeOwned>(
    origin: &Origin,
    merged: &config::Config,
    first: Vec<String>,
    problems: &mut Vec<Problem>,
) {
    let Ok(mut tree) = merged.clone().try_deserialize::<Json>() else { return };
    let mut removed = vec![first];
    for _ in 0..MAX_ERRORS {
        let Some(last) = removed.last() else { return };
        if !remove(&mut tree, last) {
            return;
        }
        let e = match serde_path_to_error::deserialize::<_, T>(&tree) {
            Ok(_) => return,
            Err(e) => e,
        };
        let (problem, path) = from_serde(origin, e);
        // A required key removed for its wrong value is not also missing.
        let missing = problem.message.contains("missing field `");
        let parent_removed = removed.iter().any(|r| r.len() == path.len() + 1 && r.starts_with(&path));
        if missing && parent_removed {
            return;
        }
        if removed.contains(&path) {
            return;
        }
        problems.push(problem);
        removed.push(path);
    }
}

/// Removes the key at `path` from the tree; false when there is no such key.
fn remove(tree: &mut Json, path: &[String]) -> bool {
    let Some((last, parents)) = path.split_last() else { return false };
    let mut node = tree;
    for seg in parents {
        node = match node {
            Json::Object(map) => match map.get_mut(seg) {
                Some(n) => n,
                None => return false,
            },
            Json::Array(items) => match seg.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                Some(n) => n,
                None => return false,
            },
            _ => return false,
        };
    }
    match node {
        Json::Object(map) => map.remove(last).is_some(),
        _ => false,
    }
}

/// Rewrites the `config` crate's Rust debug output in plain words: `String("grace")` as
/// `"grace"`, `Hash({...})` as `a mapping`, `Array([...])` as `a list`, ...
pub(super) fn plain_words(message: &str) -> String {
    let mut out = message.to_string();
    for (debug, plain) in [("Hash(", "a mapping"), ("Array(", "a list"), ("Table(", "a mapping")] {
        while let Some(start) = out.find(debug) {
            let end = matching_paren(&out, start + debug.len() - 1).unwrap_or(out.len() - 1);
            out.replace_range(start..=end, plain);
        }
    }
    for (debug, plain) in
        [("String(", ""), ("I64(", ""), ("U64(", ""), ("I128(", ""), ("U128(", ""), ("Float(", ""), ("Boolean(", "")]
    {
        while let Some(start) = out.find(debug) {
            let Some(end) = matching_paren(&out, start + debug.len() - 1) else { break };
            let inner = out[start + debug.len()..end].to_string();
            out.replace_range(start..=end, &format!("{plain}{inner}"));
        }
    }
    out.replace("Nil", "nothing")
}

fn matching_paren(text: &str, open: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut prev = '\0';
    for (i, c) in text[open..].char_indices() {
        match c {
            '"' if prev != '\\' => in_string = !in_string,
            '(' | '{' | '[' if !in_string => depth += 1,
            ')' | '}' | ']' if !in_string => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return Some(open + i);
                }
            }
            _ => {}
        }
        prev = c;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::plain_words;

    fn check(text: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, text).unwrap();
        let err = crate::config::load_with_env(&path, []).unwrap_err().to_string();
        err.replace(&path.display().to_string(), "c.yaml")
    }

    const BASE: &str = "rules: r.yaml\nsource:\n  kind: kafka\n  kafka:\n    brokers: b\n    topics: [t]\n";

    /// Two typos and a wrong type: all three, in file order, the same every time (the `config`
    /// crate's hash order used to pick one at random).
    #[test]
    fn every_problem_is_reported_in_file_order() {
        let text = format!(
            "{BASE}    group_id: {{id: }}\nsinks:\n  redis:\n    url: \"redis://127.0.0.1:6379\"\n    tag_prefx: x\n    unlnk: 4\nshutdown: {{grace: {{a: 1}}}}\n"
        );
        let first = check(&text);
        let lines: Vec<&str> = first.lines().collect();
        assert_eq!(lines.len(), 4, "{first}");
        assert!(lines[0].starts_with("c.yaml:7:15: source.kafka.group_id: invalid type: map"), "{first}");
        assert!(lines[1].starts_with("c.yaml:11:5: sinks.redis.tag_prefx: unknown field `tag_prefx`"), "{first}");
        assert!(lines[2].starts_with("c.yaml:12:5: sinks.redis.unlnk: unknown field `unlnk`"), "{first}");
        assert!(lines[3].starts_with("c.yaml:13:19: shutdown.grace: invalid type: map"), "{first}");
        for _ in 0..5 {
            assert_eq!(check(&text), first);
        }
        assert!(!first.contains("String(") && !first.contains("Hash(") && !first.contains("for key"), "{first}");
    }

    #[test]
    fn a_duplicate_key_is_named_at_its_second_spelling() {
        let text = format!(
            "{BASE}sinks:\n  redis:\n    url: \"redis://127.0.0.1:6379\"\nshutdown:\n  grace: 1s\n  grace: 2s\n"
        );
        assert_eq!(
            check(&text),
            "c.yaml:12:3: shutdown.grace: the key `grace` is written twice (first at line 11); remove one"
        );
    }

    #[test]
    fn debug_output_reads_as_plain_words() {
        assert_eq!(plain_words("Cannot parse Hash({String(\"id\"): Nil})"), "Cannot parse a mapping");
        assert_eq!(plain_words("String(\"grace\"): duplicated key"), "\"grace\": duplicated key");
        assert_eq!(plain_words("found Array([I64(1)])"), "found a list");
    }
}
