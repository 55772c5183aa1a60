//! Table patterns: an exact `schema.table` name, or a glob with `*` and `?`.
//!
//! `*` matches any run of characters (dots included, so `*.audit_log` matches that table in
//! every schema) and `?` exactly one character; everything else matches itself, case
//! sensitively, as table names arrive from the source. There are no character classes or
//! escapes: `[`, `]`, `{`, `}` and `\` never occur in a table name a source reports, so they
//! are rejected rather than silently taken literally.

use std::fmt;

/// Why a table pattern was rejected; phrased to complete "table ... ".
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PatternError {
    Empty,
    /// No `.` separating a non-empty schema (or database) part from a non-empty table part.
    NotQualified,
    /// Whitespace, a control character, or a glob syntax this engine does not support.
    BadChar(char),
}

impl fmt::Display for PatternError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PatternError::Empty => f.write_str("is empty"),
            PatternError::NotQualified => f.write_str(
                "must be qualified as `schema.table` (or `db.table`), such as `public.products` or `public.*`",
            ),
            PatternError::BadChar(c) => {
                write!(f, "contains {c:?}, which cannot occur in a table name (only `*` and `?` are wildcards)")
            }
        }
    }
}

/// A compiled table pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TablePattern {
    /// No wildcard: matched through the rules' hash index, never scanned.
    Exact(Box<str>),
    Glob(Glob),
}

impl TablePattern {
    pub(crate) fn parse(text: &str) -> Result<TablePattern, PatternError> {
        if text.is_empty() {
            return Err(PatternError::Empty);
        }
        if let Some(c) =
            text.chars().find(|&c| c.is_whitespace() || c.is_control() || matches!(c, '[' | ']' | '{' | '}' | '\\'))
        {
            return Err(PatternError::BadChar(c));
        }
        // Every table a source reports is `schema.table` or `db.table`: a bare `products`
        // would never match anything, which is worse than an error.
        let qualified = text.split_once('.').is_some_and(|(schema, table)| !schema.is_empty() && !table.is_empty());
        if !qualified {
            return Err(PatternError::NotQualified);
        }
        if text.contains(['*', '?']) {
            Ok(TablePattern::Glob(Glob::compile(text)))
        } else {
            Ok(TablePattern::Exact(text.into()))
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(Box<str>),
    /// `?`: one character.
    One,
    /// `*`: any run of characters, possibly empty.
    Any,
}

/// A glob compiled into literal runs and wildcards, so matching compares whole runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Glob {
    tokens: Box<[Token]>,
}

impl Glob {
    fn compile(text: &str) -> Glob {
        let mut tokens = Vec::new();
        let mut literal = String::new();
        for c in text.chars() {
            let wildcard = match c {
                '*' => Token::Any,
                '?' => Token::One,
                _ => {
                    literal.push(c);
                    continue;
                }
            };
            if !literal.is_empty() {
                tokens.push(Token::Literal(std::mem::take(&mut literal).into()));
            }
            // `**` means the same as `*`; collapsing it keeps backtracking linear.
            if !(wildcard == Token::Any && tokens.last() == Some(&Token::Any)) {
                tokens.push(wildcard);
            }
        }
        if !literal.is_empty() {
            tokens.push(Token::Literal(literal.into()));
        }
        Glob { tokens: tokens.into() }
    }

    /// Whether `name` matches the whole pattern.
    ///
    /// The classic greedy matcher: on a mismatch, retry from the most recent `*` with it
    /// swallowing one more character. Earlier stars never need revisiting, so this runs in
    /// O(pattern × name) at worst and allocates nothing.
    pub(crate) fn matches(&self, name: &str) -> bool {
        let tokens = &self.tokens;
        let (mut t, mut at) = (0usize, 0usize);
        // (token after the last `*`, where that `*`'s match currently ends)
        let mut star: Option<(usize, usize)> = None;
        loop {
            let advanced = match tokens.get(t) {
                Some(Token::Any) => {
                    star = Some((t + 1, at));
                    t += 1;
                    continue;
                }
                Some(Token::Literal(lit)) if name[at..].starts_with(&**lit) => {
                    at += lit.len();
                    true
                }
                Some(Token::One) => match name[at..].chars().next() {
                    Some(c) => {
                        at += c.len_utf8();
                        true
                    }
                    None => false,
                },
                Some(Token::Literal(_)) => false,
                None if at == name.len() => return true,
                None => false,
            };
            if advanced {
                t += 1;
                continue;
            }
            // Mismatch: let the last `*` take one more character, or give up.
            match star {
                Some((after, end)) => match name[end..].chars().next() {
                    Some(c) => {
                        let end = end + c.len_utf8();
                        star = Some((after, end));
                        t = after;
                        at = end;
                    }
                    None => return false,
                },
                None => return false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn glob(text: &str) -> Glob {
        match TablePattern::parse(text) {
            Ok(TablePattern::Glob(g)) => g,
            other => panic!("{text} is not a glob: {other:?}"),
        }
    }

    #[test]
    fn exact_names_are_not_globs() {
        assert_eq!(TablePattern::parse("public.products"), Ok(TablePattern::Exact("public.products".into())));
    }

    #[test]
    fn star_and_question_mark() {
        let g = glob("public.order_*");
        assert!(g.matches("public.order_items"));
        assert!(g.matches("public.order_"));
        assert!(!g.matches("public.orders"));
        assert!(!g.matches("other.order_items"));

        let g = glob("*.audit_?");
        assert!(g.matches("public.audit_1"));
        assert!(g.matches("a.b.audit_é"));
        assert!(!g.matches("public.audit_"));
        assert!(!g.matches("public.audit_12"));

        let g = glob("p*c.*s");
        assert!(g.matches("public.products"));
        assert!(g.matches("pc.s"));
        assert!(!g.matches("public.product"));

        let g = glob("*.*");
        assert!(g.matches("a.b"));
        assert!(!g.matches("ab"));
    }

    #[test]
    fn backtracking_finds_a_later_match() {
        let g = glob("*ab*ab.x");
        assert!(g.matches("aabxab.x"));
        assert!(g.matches("ab.abab.x"));
        assert!(!g.matches("ab.x"));
        let g = glob("s.**?");
        assert!(g.matches("s.t"));
        assert!(!g.matches("s."));
    }

    #[test]
    fn invalid_patterns() {
        assert_eq!(TablePattern::parse(""), Err(PatternError::Empty));
        assert_eq!(TablePattern::parse("products"), Err(PatternError::NotQualified));
        assert_eq!(TablePattern::parse(".products"), Err(PatternError::NotQualified));
        assert_eq!(TablePattern::parse("public."), Err(PatternError::NotQualified));
        assert_eq!(TablePattern::parse("public.prod ucts"), Err(PatternError::BadChar(' ')));
        assert_eq!(TablePattern::parse("public.[ab]"), Err(PatternError::BadChar('[')));
    }
}
