//! The rules engine: a pure function from a change event to what must be invalidated.
//! (Being written: see the rules issue item list; the API below is fixed.)

use std::path::Path;
use std::sync::Arc;

use crate::config::Problem;
use crate::event::ChangeEvent;
use crate::sink::Invalidations;

/// A loaded, validated rules file.
#[derive(Debug)]
pub struct Rules {
    _private: (),
}

/// What one event asks to invalidate.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Evaluation {
    /// Every list sorted bytewise and without duplicates.
    pub invalidations: Invalidations,
    /// Names of the rules that applied after the table, `ops` and `when_changed` filters.
    pub matched_rules: Vec<Arc<str>>,
    /// One per template no row image could render.
    pub errors: Vec<RuleError>,
}

/// A template that no row image of an event could render.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    pub rule: Arc<str>,
    /// One sentence naming the rule, the template and the missing column.
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("{}", .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

impl Rules {
    pub fn from_file(path: &Path) -> Result<Rules, RulesError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            RulesError::Invalid(vec![Problem { file: path.to_path_buf(), location: None, message: format!("cannot read the rules file: {e}") }])
        })?;
        Rules::parse(&text, path)
    }

    pub fn parse(_text: &str, _file: &Path) -> Result<Rules, RulesError> {
        todo!("rules engine")
    }

    pub fn evaluate(&self, _event: &ChangeEvent) -> Evaluation {
        todo!("rules engine")
    }

    pub fn len(&self) -> usize {
        0
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
