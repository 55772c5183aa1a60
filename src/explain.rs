//! `explain`: what the rules make of one message, without touching anything. Its own module so
//! that `cli` (the command) and `replay --dry-run` (which prints the same lines) both depend on it
//! and not on each other.

use serde::Serialize;

use crate::event::Decoded;
use crate::rules::Rules;
use crate::sink::Invalidations;
use crate::source::debezium;

/// The `explain` output: field order as in the contract (`table`, `op`, one list per item kind
/// in [`crate::sink::ItemKind::ALL`] order, `matched_rules`, `errors`).
#[derive(Debug, Serialize, PartialEq)]
pub struct Explanation {
    pub table: Option<String>,
    pub op: &'static str,
    #[serde(flatten)]
    pub invalidations: Invalidations,
    pub matched_rules: Vec<String>,
    pub errors: Vec<String>,
}

/// Decodes one message and evaluates it: the heart of `explain`, shared with `replay --dry-run`.
pub fn explain_message(
    rules: &Rules,
    topic: &str,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
) -> Result<Explanation, debezium::DecodeError> {
    Ok(explanation(rules, debezium::decode(topic, key, value)?))
}

/// What `rules` make of a decoded message (whatever its encoding: JSON, or Avro decoded through
/// the schema registry).
pub(crate) fn explanation(rules: &Rules, decoded: Decoded) -> Explanation {
    match decoded {
        Decoded::NoChange(n) => Explanation {
            table: n.table,
            op: "none",
            invalidations: Invalidations::default(),
            matched_rules: vec![],
            errors: vec![],
        },
        Decoded::Change(change) => {
            let eval = rules.evaluate(&change);
            let mut matched: Vec<String> = eval.matched_rules.iter().map(|r| r.to_string()).collect();
            matched.sort();
            matched.dedup();
            Explanation {
                table: Some(change.table.clone()),
                op: change.op.as_str(),
                invalidations: eval.invalidations,
                matched_rules: matched,
                errors: eval.errors.into_iter().map(|e| e.message).collect(),
            }
        }
    }
}
