//! Templates: compiled once at load into literal and placeholder segments, rendered per event
//! without re-parsing.
//!
//! Syntax (the user-facing description is in the [module docs](super)):
//! - `{name}` is a placeholder: a var when `name` is listed under the rule's `vars`, a column
//!   otherwise; whitespace around the name and filters is ignored;
//! - `{name|filter|filter}` applies filters left to right;
//! - `{{` and `}}` stand for a literal `{` and `}`; any other brace must open or close a
//!   placeholder.

use std::fmt;

use crate::event::Row;
use crate::source::debezium::Placeholders;

/// Longest item a template may render, in bytes. Real cache keys, surrogate keys and URLs
/// are far shorter; an item over this comes from an unexpected column value (a document
/// stored in a text column) and is reported as a rule error rather than sent to a cache.
pub(crate) const MAX_ITEM_BYTES: usize = 8 * 1024;

/// Most items one template may expand to per row image through `vars` (the product of the
/// sizes of the vars it uses), so a rules file cannot make one event invalidate an unbounded
/// number of things.
pub(crate) const MAX_FANOUT: usize = 1_000;

/// A filter applied to a placeholder's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Filter {
    /// Unicode lower case (`str::to_lowercase`).
    Lower,
    /// Unicode upper case (`str::to_uppercase`).
    Upper,
    /// Percent-encodes the UTF-8 bytes of every character outside RFC 3986's unreserved set
    /// `A-Z a-z 0-9 - . _ ~` (so a space is `%20`, never `+`), with upper-case hex digits.
    UrlEncode,
    /// Not written in templates: added as the last filter of every placeholder of a
    /// `redis.patterns` template ([`Template::escaping_glob`]), so that a value holding `*`,
    /// `?`, `[`, `]` or `\` matches itself and cannot widen the pattern (`product:{id}:*`
    /// with `id = "4*"` is `product:4\*:*`, never every product).
    GlobEscape,
}

impl Filter {
    /// Names as written in templates, for "known filters" in error messages.
    pub(crate) const NAMES: &'static str = "lower, upper, urlencode";

    fn parse(name: &str) -> Option<Filter> {
        Some(match name {
            "lower" => Filter::Lower,
            "upper" => Filter::Upper,
            "urlencode" => Filter::UrlEncode,
            _ => return None,
        })
    }

    fn apply(self, input: &str, out: &mut String) {
        match self {
            Filter::Lower if input.is_ascii() => {
                let start = out.len();
                out.push_str(input);
                out[start..].make_ascii_lowercase();
            }
            Filter::Lower => out.push_str(&input.to_lowercase()),
            Filter::Upper if input.is_ascii() => {
                let start = out.len();
                out.push_str(input);
                out[start..].make_ascii_uppercase();
            }
            Filter::Upper => out.push_str(&input.to_uppercase()),
            Filter::UrlEncode => {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                for b in input.bytes() {
                    if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                        out.push(char::from(b));
                    } else {
                        out.push('%');
                        out.push(char::from(HEX[usize::from(b >> 4)]));
                        out.push(char::from(HEX[usize::from(b & 0xf)]));
                    }
                }
            }
            Filter::GlobEscape => {
                for c in input.chars() {
                    if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                        out.push('\\');
                    }
                    out.push(c);
                }
            }
        }
    }
}

/// Appends `input` to `out` through a filter chain. Only intermediate results of a chain of
/// two or more filters need their own buffer.
fn push_filtered(out: &mut String, input: &str, filters: &[Filter]) {
    match filters {
        [] => out.push_str(input),
        [only] => only.apply(input, out),
        [first, middle @ .., last] => {
            let mut current = String::new();
            first.apply(input, &mut current);
            for filter in middle {
                let mut next = String::with_capacity(current.len());
                filter.apply(&current, &mut next);
                current = next;
            }
            last.apply(&current, out);
        }
    }
}

/// A name under a rule's `vars`, with the values a template using it expands to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Var {
    pub(crate) name: Box<str>,
    pub(crate) values: Box<[Box<str>]>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(Box<str>),
    Column {
        name: Box<str>,
        filters: Box<[Filter]>,
    },
    /// `slot` indexes [`Template::vars`].
    Var {
        slot: usize,
        filters: Box<[Filter]>,
    },
}

/// [`Template::hash_tag`]'s answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HashTag {
    /// No hash tag: the whole item is hashed, so items spread over the slots like their text.
    Whole,
    /// The hash tag holds a placeholder: it varies with the row (or the var).
    Varies,
    /// The same hash tag, so the same slot, for every item.
    Constant(String),
    /// Cannot tell from the template (a placeholder comes before the first literal `{`).
    Unknown,
}

/// A compiled template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Template {
    /// As written, for error messages.
    source: Box<str>,
    segments: Box<[Segment]>,
    /// Distinct columns used, in order of first use.
    columns: Box<[Box<str>]>,
    /// Distinct vars used (indexes into the rule's vars), in order of first use.
    vars: Box<[usize]>,
    /// Bytes of literal text: a capacity hint that makes most renders a single allocation.
    literal_len: usize,
}

/// Why a template was rejected; each phrased to follow "template "…" ".
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TemplateError {
    Empty,
    TooLong(usize),
    EmptyPlaceholder,
    /// A `{` with no `}` after it (or another `{` before it).
    Unclosed,
    /// A `}` that closes nothing.
    Unopened,
    EmptyFilter(String),
    UnknownFilter(String),
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TemplateError::Empty => f.write_str("is empty"),
            TemplateError::TooLong(n) => {
                write!(f, "is {n} bytes long, over the limit of {MAX_ITEM_BYTES}")
            }
            TemplateError::EmptyPlaceholder => f.write_str("has an empty placeholder `{}`"),
            TemplateError::Unclosed => f.write_str("has a `{` that is never closed (write `{{` for a literal brace)"),
            TemplateError::Unopened => f.write_str("has a `}` that closes nothing (write `}}` for a literal brace)"),
            TemplateError::EmptyFilter(name) => write!(f, "has an empty filter after `{name}|`"),
            TemplateError::UnknownFilter(filter) => {
                write!(f, "uses the unknown filter {filter:?} (known filters: {})", Filter::NAMES)
            }
        }
    }
}

/// Why a row image could not render a template: the first column that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Unrenderable<'t> {
    pub(crate) column: &'t str,
    pub(crate) why: Why,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Why {
    /// Not in the image at all (an unchanged TOASTed value, a key-only before image).
    Absent,
    Null,
    List,
    Object,
}

/// What rendering one template against one row image produced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Rendered {
    /// Items appended to the output.
    pub(crate) items: usize,
    /// Expansions that rendered to the empty string (not appended: never UNLINK "").
    pub(crate) empty: usize,
    /// Expansions over [`MAX_ITEM_BYTES`] (not appended), and the largest such size.
    pub(crate) oversize: usize,
    pub(crate) largest: usize,
    /// Expansions holding a connector's unavailable-value placeholder (not appended: see
    /// [`Rendered::keep`]).
    pub(crate) placeholder: usize,
}

impl Template {
    /// Compiles `text`; placeholders naming one of `vars` are vars, the rest columns. Returns
    /// every problem found (stopping at an unclosed `{`, after which nothing can be parsed).
    pub(crate) fn compile(text: &str, vars: &[Var]) -> Result<Template, Vec<TemplateError>> {
        if text.is_empty() {
            return Err(vec![TemplateError::Empty]);
        }
        if text.len() > MAX_ITEM_BYTES {
            return Err(vec![TemplateError::TooLong(text.len())]);
        }
        let mut errors = Vec::new();
        let mut segments = Vec::new();
        let mut columns: Vec<Box<str>> = Vec::new();
        let mut used_vars: Vec<usize> = Vec::new();
        let mut literal = String::new();
        let mut literal_len = 0;
        let mut rest = text;
        while let Some(brace) = rest.find(['{', '}']) {
            literal.push_str(&rest[..brace]);
            let after = &rest[brace + 1..];
            let doubled = after.starts_with(&rest[brace..brace + 1]);
            if doubled {
                literal.push_str(&rest[brace..brace + 1]);
                rest = &after[1..];
                continue;
            }
            if rest.as_bytes()[brace] == b'}' {
                errors.push(TemplateError::Unopened);
                rest = after;
                continue;
            }
            let body = match after.find(['{', '}']) {
                Some(end) if after.as_bytes()[end] == b'}' => {
                    rest = &after[end + 1..];
                    &after[..end]
                }
                _ => {
                    errors.push(TemplateError::Unclosed);
                    return Err(errors);
                }
            };
            let mut parts = body.split('|').map(str::trim);
            let name = parts.next().unwrap_or_default();
            if name.is_empty() {
                errors.push(TemplateError::EmptyPlaceholder);
                continue;
            }
            let mut filters = Vec::new();
            for filter in parts {
                match Filter::parse(filter) {
                    Some(f) => filters.push(f),
                    None if filter.is_empty() => errors.push(TemplateError::EmptyFilter(name.to_string())),
                    None => errors.push(TemplateError::UnknownFilter(filter.to_string())),
                }
            }
            if !literal.is_empty() {
                literal_len += literal.len();
                segments.push(Segment::Literal(std::mem::take(&mut literal).into()));
            }
            let filters = filters.into_boxed_slice();
            match vars.iter().position(|v| &*v.name == name) {
                Some(var) => {
                    let slot = used_vars.iter().position(|&v| v == var).unwrap_or_else(|| {
                        used_vars.push(var);
                        used_vars.len() - 1
                    });
                    segments.push(Segment::Var { slot, filters });
                }
                None => {
                    if !columns.iter().any(|c| &**c == name) {
                        columns.push(name.into());
                    }
                    segments.push(Segment::Column { name: name.into(), filters });
                }
            }
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            literal_len += literal.len();
            segments.push(Segment::Literal(literal.into()));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Template {
            source: text.into(),
            segments: segments.into(),
            columns: columns.into(),
            vars: used_vars.into(),
            literal_len,
        })
    }

    pub(crate) fn source(&self) -> &str {
        &self.source
    }

    /// What decides the Redis Cluster hash slot of the items this template renders, when the
    /// template alone says it (`prefix`, such as `tag_prefix`, goes before the item). Redis
    /// hashes only the text between the first `{` and the first `}` after it, when that is not
    /// empty. A placeholder before the first literal `{` could render braces of its own, so the
    /// answer is then unknown (without any literal `{`, braces are up to the data: `Whole`).
    pub(crate) fn hash_tag(&self, prefix: &str) -> HashTag {
        let mut open: Option<String> = None;
        // A placeholder came before any literal `{`: its value might have opened a hash tag.
        let mut value_first = false;
        let prefix = Segment::Literal(prefix.into());
        for segment in std::iter::once(&prefix).chain(self.segments.iter()) {
            let Segment::Literal(text) = segment else {
                match open {
                    // A row's value (or a var's) is inside the hash tag: slots spread.
                    Some(_) => return HashTag::Varies,
                    None => value_first = true,
                }
                continue;
            };
            for c in text.chars() {
                match (&mut open, c) {
                    (None, '{') if value_first => return HashTag::Unknown,
                    (None, '{') => open = Some(String::new()),
                    (Some(inside), '}') if inside.is_empty() => return HashTag::Whole,
                    (Some(inside), '}') => return HashTag::Constant(std::mem::take(inside)),
                    (Some(inside), c) => inside.push(c),
                    (None, _) => {}
                }
            }
        }
        HashTag::Whole
    }

    /// This template with every placeholder's value glob-escaped ([`Filter::GlobEscape`]):
    /// what `redis.patterns` compiles to. Literal text stays a pattern.
    pub(crate) fn escaping_glob(mut self) -> Template {
        let escaped = |filters: &[Filter]| -> Box<[Filter]> {
            filters.iter().copied().chain(std::iter::once(Filter::GlobEscape)).collect()
        };
        self.segments = self
            .segments
            .iter()
            .map(|segment| match segment {
                Segment::Literal(text) => Segment::Literal(text.clone()),
                Segment::Column { name, filters } => Segment::Column { name: name.clone(), filters: escaped(filters) },
                Segment::Var { slot, filters } => Segment::Var { slot: *slot, filters: escaped(filters) },
            })
            .collect();
        self
    }

    /// Whether every item this template renders is a pattern matching every key (only `*`s):
    /// a template of literal `*`s alone. (One with placeholders can still render that way when
    /// the values are empty: [`matches_everything`] checks each rendered item.)
    pub(crate) fn is_full_scan(&self) -> bool {
        self.segments.iter().all(|s| matches!(s, Segment::Literal(t) if matches_everything(t)))
    }

    /// The columns the template reads; empty for a template of literals and vars only.
    pub(crate) fn columns(&self) -> &[Box<str>] {
        &self.columns
    }

    /// How many items one row image expands to: the product of the sizes of the vars used.
    /// Saturates rather than overflows, so a huge product still fails the [`MAX_FANOUT`] check.
    pub(crate) fn fanout(&self, vars: &[Var]) -> usize {
        self.vars.iter().fold(1usize, |n, &v| n.saturating_mul(vars.get(v).map_or(1, |v| v.values.len())))
    }

    /// Renders every expansion of the template against `row` (`None` for a template without
    /// columns, such as every `on_truncate` template) and appends the items to `out`.
    ///
    /// Fails, appending nothing, when a column is absent, null, a list or an object in `row`.
    #[cfg(test)]
    pub(crate) fn render<'t>(
        &'t self,
        row: Option<&Row>,
        vars: &[Var],
        out: &mut Vec<String>,
    ) -> Result<Rendered, Unrenderable<'t>> {
        self.render_reusing(row, vars, out, &mut Spare::default())
    }

    /// [`Template::render`], each item rendered into a string of `spare` while it has any.
    pub(crate) fn render_reusing<'t>(
        &'t self,
        row: Option<&Row>,
        vars: &[Var],
        out: &mut Vec<String>,
        spare: &mut Spare,
    ) -> Result<Rendered, Unrenderable<'t>> {
        let mut rendered = Rendered::default();
        let placeholders = crate::source::debezium::placeholders();
        if self.vars.is_empty() {
            let mut buf = spare.take(self.literal_len + 24);
            let tainted = self.render_one(row, vars, &[], placeholders, &mut buf)?;
            rendered.keep(buf, tainted, out);
            return Ok(rendered);
        }
        // Odometer over the values of each var used: the cartesian product, bounded by
        // MAX_FANOUT at load. Only the first expansion can fail: they all read the same row.
        let mut choice = vec![0usize; self.vars.len()];
        loop {
            let mut buf = spare.take(self.literal_len + 24);
            let tainted = self.render_one(row, vars, &choice, placeholders, &mut buf)?;
            rendered.keep(buf, tainted, out);
            let mut slot = 0;
            loop {
                let Some(&var) = self.vars.get(slot) else {
                    return Ok(rendered);
                };
                let count = vars.get(var).map_or(1, |v| v.values.len());
                choice[slot] += 1;
                if choice[slot] < count {
                    break;
                }
                choice[slot] = 0;
                slot += 1;
            }
        }
    }

    /// Renders one expansion into `buf`; `Ok(true)` when a column value in it is (or contains)
    /// a connector's unavailable-value placeholder. Checked on the value before filters, which
    /// could disguise it (`urlencode` turns the base64 form's `==` into `%3D%3D`).
    fn render_one<'t>(
        &'t self,
        row: Option<&Row>,
        vars: &[Var],
        choice: &[usize],
        placeholders: &Placeholders,
        buf: &mut String,
    ) -> Result<bool, Unrenderable<'t>> {
        let mut tainted = false;
        for segment in self.segments.iter() {
            match segment {
                Segment::Literal(text) => buf.push_str(text),
                Segment::Var { slot, filters } => {
                    let value = self
                        .vars
                        .get(*slot)
                        .and_then(|&var| vars.get(var))
                        .zip(choice.get(*slot))
                        .and_then(|(var, &i)| var.values.get(i));
                    if let Some(value) = value {
                        push_filtered(buf, value, filters);
                    }
                }
                Segment::Column { name, filters } => {
                    let fail = |why| Unrenderable { column: name, why };
                    let value = row.and_then(|r| r.get(&**name)).ok_or(fail(Why::Absent))?;
                    match value {
                        serde_json::Value::String(s) => {
                            tainted |= placeholders.found_in(s);
                            push_filtered(buf, s, filters);
                        }
                        serde_json::Value::Bool(b) => push_filtered(buf, if *b { "true" } else { "false" }, filters),
                        serde_json::Value::Number(n) => push_number(buf, n, filters),
                        serde_json::Value::Null => return Err(fail(Why::Null)),
                        serde_json::Value::Array(_) => return Err(fail(Why::List)),
                        serde_json::Value::Object(_) => return Err(fail(Why::Object)),
                    }
                }
            }
        }
        Ok(tainted)
    }
}

/// Emptied strings of items a batch no longer needs (the duplicates coalescing dropped), kept to
/// render later items into instead of allocating new ones: in the product benchmark
/// (benches/pipeline_cost.rs) most tags rendered are also rendered by another event of the
/// batch, and each cost an allocation at rendering and a free at coalescing. Bounded, so that a
/// batch of long items or large fan-outs is not held on to.
#[derive(Debug, Default)]
pub(crate) struct Spare {
    /// Each empty, with a capacity of at most [`Spare::MAX_CAPACITY`].
    strings: Vec<String>,
}

impl Spare {
    /// At most this many strings are kept, each with room for at most `MAX_CAPACITY` bytes (an
    /// item's room is kept whole, so a long URL's is freed instead): at most about 152 KiB.
    const MAX_STRINGS: usize = 1024;
    const MAX_CAPACITY: usize = 128;

    /// An empty string: a spare one, else a new one with room for `capacity` bytes.
    fn take(&mut self, capacity: usize) -> String {
        self.strings.pop().unwrap_or_else(|| String::with_capacity(capacity))
    }

    /// Keeps the room of `strings` (emptied) within the bounds, and frees the rest.
    pub(crate) fn refill(&mut self, strings: impl IntoIterator<Item = String>) {
        for mut string in strings {
            if self.strings.len() >= Spare::MAX_STRINGS {
                return;
            }
            if (1..=Spare::MAX_CAPACITY).contains(&string.capacity()) {
                string.clear();
                self.strings.push(string);
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.strings.len()
    }
}

impl Rendered {
    /// Appends `item` unless it must not be invalidated; `tainted` when a column value in it
    /// held a placeholder.
    fn keep(&mut self, item: String, tainted: bool, out: &mut Vec<String>) {
        if tainted {
            // Belt and braces: the Debezium decoder already makes placeholder columns unknown,
            // but an item built from one (however it got into a row) names a key nobody uses
            // while the real one stays cached. Never sent; the rule reports it.
            self.placeholder += 1;
        } else if item.is_empty() {
            self.empty += 1;
        } else if item.len() > MAX_ITEM_BYTES {
            self.oversize += 1;
            self.largest = self.largest.max(item.len());
        } else {
            self.items += 1;
            out.push(item);
        }
    }
}

/// Whether a rendered glob matches every key: only unescaped `*`s (escaped values never add
/// one), or nothing at all.
pub(crate) fn matches_everything(pattern: &str) -> bool {
    pattern.bytes().all(|b| b == b'*')
}

/// Appends a number through `filters`: integers exactly as written, however long (serde_json
/// keeps the digits: `arbitrary_precision`), so 18446744073709551616 is not 1.8e19; floats in
/// their shortest round-trip form as JSON prints them: 1.5, 1.0, 1e+21.
fn push_number(buf: &mut String, n: &serde_json::Number, filters: &[Filter]) {
    let text = n.as_str();
    // The common case (ids, foreign keys): the digits as they came, without parsing them as a
    // float or formatting (what the general case below also renders for them).
    if is_integer_literal(text) {
        push_filtered(buf, text, filters);
        return;
    }
    match n.as_f64() {
        Some(x) if !(n.is_i64() || n.is_u64()) => {
            push_filtered(buf, &serde_json::Value::from(x).to_string(), filters);
        }
        // Not finite as a float (1e400): as written.
        _ => push_filtered(buf, text, filters),
    }
}

/// An integer written in full (`-`, digits), whatever its size.
fn is_integer_literal(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(value: serde_json::Value) -> Row {
        match value {
            serde_json::Value::Object(map) => map.into(),
            other => panic!("not an object: {other}"),
        }
    }

    fn render(text: &str, vars: &[Var], row: &Row) -> Result<Vec<String>, String> {
        let template = Template::compile(text, vars).map_err(|e| format!("{e:?}"))?;
        let mut out = Vec::new();
        template.render(Some(row), vars, &mut out).map_err(|e| format!("{e:?}"))?;
        Ok(out)
    }

    #[test]
    fn scalars_render_in_their_json_spelling() {
        let r = row(
            json!({"s": "Blue Widget", "i": 42, "n": -7, "b": true, "f": 1.5, "g": 1.0, "h": 1e21, "u": 18446744073709551615u64}),
        );
        assert_eq!(
            render("{s}/{i}/{n}/{b}/{f}/{g}/{h}/{u}", &[], &r).unwrap(),
            ["Blue Widget/42/-7/true/1.5/1.0/1e+21/18446744073709551615"]
        );
    }

    /// How numbers rendered before integers skipped the float parsing: the reference the fast
    /// path must match byte for byte.
    fn reference_number(n: &serde_json::Number, filters: &[Filter]) -> String {
        let integer = |n: &serde_json::Number| {
            let text = n.to_string();
            let digits = text.strip_prefix('-').unwrap_or(&text);
            !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
        };
        let text = match n.as_f64() {
            Some(x) if !(n.is_i64() || n.is_u64() || integer(n)) => serde_json::Value::from(x).to_string(),
            _ => n.to_string(),
        };
        let mut out = String::new();
        push_filtered(&mut out, &text, filters);
        out
    }

    #[test]
    fn numbers_render_as_before_integers_as_written_floats_shortest() {
        let cases = [
            ("0", "0"),
            ("42", "42"),
            ("-7", "-7"),
            ("-0", "-0"),
            ("9223372036854775807", "9223372036854775807"),
            ("-9223372036854775808", "-9223372036854775808"),
            ("18446744073709551615", "18446744073709551615"),
            // Beyond 64 bits: the digits as written, never a float.
            ("18446744073709551616", "18446744073709551616"),
            (
                "-343412345678910111213141516171819202122232425262728293031",
                "-343412345678910111213141516171819202122232425262728293031",
            ),
            ("1.5", "1.5"),
            ("1.0", "1.0"),
            ("1.50", "1.5"),
            ("-0.0", "-0.0"),
            ("0.1", "0.1"),
            ("1e21", "1e+21"),
            ("1E5", "100000.0"),
            ("2.5e-3", "0.0025"),
            ("-1.25e+2", "-125.0"),
            ("123456789012345678901234567890.5", "1.2345678901234568e+29"),
            // Not finite as a float: as the parser kept it.
            ("1e400", "1e+400"),
        ];
        let filter_chains: [&[Filter]; 4] =
            [&[], &[Filter::UrlEncode], &[Filter::Upper, Filter::Lower], &[Filter::GlobEscape]];
        for (json, _) in cases {
            let value: serde_json::Value = serde_json::from_str(&format!("{{\"n\":{json}}}")).unwrap();
            let serde_json::Value::Number(n) = &value["n"] else { panic!("{json} is not a number") };
            for filters in filter_chains {
                let mut out = String::new();
                push_number(&mut out, n, filters);
                assert_eq!(out, reference_number(n, filters), "{json} through {filters:?}");
            }
        }
        // Through templates, with and without filters, next to booleans and strings.
        for (json, expected) in cases {
            let r: Row = serde_json::from_str(&format!("{{\"n\":{json},\"b\":false,\"s\":\"A b\"}}")).unwrap();
            assert_eq!(render("k:{n}", &[], &r).unwrap(), [format!("k:{expected}")], "{json}");
            assert_eq!(
                render("{n|urlencode}/{b|upper}/{s|lower|urlencode}", &[], &r).unwrap(),
                [format!("{}/FALSE/a%20b", expected.replace('+', "%2B"))],
                "{json}"
            );
        }
    }

    #[test]
    fn filters_chain_left_to_right() {
        let r = row(json!({"slug": "Crème Brûlée & Co", "name": "straße", "sigma": "ΟΔΟΣ"}));
        assert_eq!(render("{slug|urlencode}", &[], &r).unwrap(), ["Cr%C3%A8me%20Br%C3%BBl%C3%A9e%20%26%20Co"]);
        assert_eq!(
            render("{ slug | lower | urlencode }", &[], &r).unwrap(),
            ["cr%C3%A8me%20br%C3%BBl%C3%A9e%20%26%20co"]
        );
        assert_eq!(render("{name|upper}", &[], &r).unwrap(), ["STRASSE"]);
        assert_eq!(render("{sigma|lower}", &[], &r).unwrap(), ["οδος"]);
        assert_eq!(
            render("{slug|upper|lower|urlencode}", &[], &r).unwrap(),
            ["cr%C3%A8me%20br%C3%BBl%C3%A9e%20%26%20co"]
        );
        let unreserved = row(json!({"s": "AZaz09-._~/?#"}));
        assert_eq!(render("{s|urlencode}", &[], &unreserved).unwrap(), ["AZaz09-._~%2F%3F%23"]);
        let number = row(json!({"n": 12}));
        assert_eq!(render("{n|urlencode}", &[], &number).unwrap(), ["12"]);
    }

    #[test]
    fn pattern_values_are_glob_escaped_and_literals_stay_globs() {
        let r = row(json!({"id": "4*", "odd": "a?[b]\\c", "n": 7}));
        let t = Template::compile("product:{id}:*", &[]).unwrap().escaping_glob();
        let mut out = Vec::new();
        t.render(Some(&r), &[], &mut out).unwrap();
        let t = Template::compile("x:{odd|upper}:{n}:?", &[]).unwrap().escaping_glob();
        t.render(Some(&r), &[], &mut out).unwrap();
        assert_eq!(out, ["product:4\\*:*", "x:A\\?\\[B\\]\\\\C:7:?"]);
        assert!(!t.is_full_scan());
        assert!(Template::compile("**", &[]).unwrap().is_full_scan());
        assert!(!Template::compile("*{id}", &[]).unwrap().is_full_scan());
        assert!(matches_everything("*") && matches_everything("") && !matches_everything("a*"));
    }

    #[test]
    fn doubled_braces_are_literal() {
        let r = row(json!({"id": 7}));
        assert_eq!(render("{{id}}={id}", &[], &r).unwrap(), ["{id}=7"]);
        assert_eq!(render("{{{id}}}", &[], &r).unwrap(), ["{7}"]);
    }

    #[test]
    fn vars_expand_as_a_cartesian_product() {
        let vars = [
            Var { name: "a".into(), values: vec!["x".into(), "y".into()].into() },
            Var { name: "b".into(), values: vec!["1".into(), "2".into(), "3".into()].into() },
        ];
        let r = row(json!({"id": 5}));
        let mut out = render("{b}-{id}-{a|upper}-{b}", &vars, &r).unwrap();
        out.sort();
        assert_eq!(out, ["1-5-X-1", "1-5-Y-1", "2-5-X-2", "2-5-Y-2", "3-5-X-3", "3-5-Y-3"]);
        let t = Template::compile("{a}{b}{id}", &vars).unwrap();
        assert_eq!(t.fanout(&vars), 6);
        assert_eq!(t.columns(), [Box::from("id")]);
    }

    #[test]
    fn unrenderable_columns_name_the_first_failure() {
        let r = row(json!({"a": null, "l": [1], "o": {}}));
        let t = Template::compile("{missing}{a}", &[]).unwrap();
        let mut out = Vec::new();
        assert_eq!(t.render(Some(&r), &[], &mut out), Err(Unrenderable { column: "missing", why: Why::Absent }));
        let t = Template::compile("x{a}", &[]).unwrap();
        assert_eq!(t.render(Some(&r), &[], &mut out), Err(Unrenderable { column: "a", why: Why::Null }));
        let t = Template::compile("{l}", &[]).unwrap();
        assert_eq!(t.render(Some(&r), &[], &mut out), Err(Unrenderable { column: "l", why: Why::List }));
        let t = Template::compile("{o}", &[]).unwrap();
        assert_eq!(t.render(Some(&r), &[], &mut out), Err(Unrenderable { column: "o", why: Why::Object }));
        assert!(out.is_empty());
    }

    #[test]
    fn empty_and_oversize_items_are_counted_not_kept() {
        let r = row(json!({"e": "", "big": "x".repeat(MAX_ITEM_BYTES)}));
        let mut out = Vec::new();
        let t = Template::compile("{e}", &[]).unwrap();
        assert_eq!(t.render(Some(&r), &[], &mut out).unwrap(), Rendered { empty: 1, ..Rendered::default() });
        let t = Template::compile("{big}", &[]).unwrap();
        assert_eq!(t.render(Some(&r), &[], &mut out).unwrap().items, 1);
        let t = Template::compile("k:{big}", &[]).unwrap();
        let r2 = t.render(Some(&r), &[], &mut out).unwrap();
        assert_eq!((r2.items, r2.oversize, r2.largest), (0, 1, MAX_ITEM_BYTES + 2));
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn items_holding_a_placeholder_are_counted_not_kept() {
        let r = row(json!({"body": "__debezium_unavailable_value", "b64": "X19kZWJleml1bV91bmF2YWlsYWJsZV92YWx1ZQ=="}));
        let mut out = Vec::new();
        for text in ["product:{body}", "https://shop.example.com/{b64}", "{b64|urlencode}", "{body|upper}"] {
            let t = Template::compile(text, &[]).unwrap();
            let rendered = t.render(Some(&r), &[], &mut out).unwrap();
            assert_eq!((rendered.items, rendered.placeholder), (0, 1), "{text}");
        }
        assert!(out.is_empty());
    }

    #[test]
    fn spare_strings_are_rendered_into_emptied_and_kept_within_bounds() {
        let r = row(json!({"id": 7}));
        let t = Template::compile("product:{id}", &[]).unwrap();
        let mut spare = Spare::default();
        let mut long = String::with_capacity(Spare::MAX_CAPACITY + 1);
        long.push_str("a long URL");
        // Kept: one with room (emptied); not: one without room, one with too much.
        spare.refill(["category:5".to_string(), String::new(), long]);
        assert_eq!(spare.len(), 1);
        let mut out = Vec::new();
        t.render_reusing(Some(&r), &[], &mut out, &mut spare).unwrap();
        t.render_reusing(Some(&r), &[], &mut out, &mut spare).unwrap();
        assert_eq!(out, ["product:7", "product:7"], "the spare string holds nothing of its past");
        assert_eq!(spare.len(), 0);
        spare.refill((0..Spare::MAX_STRINGS + 10).map(|i| format!("k{i}")));
        assert_eq!(spare.len(), Spare::MAX_STRINGS);
    }

    #[test]
    fn compile_errors() {
        let err = |t: &str| Template::compile(t, &[]).unwrap_err();
        assert_eq!(err(""), [TemplateError::Empty]);
        assert_eq!(err("a{}b"), [TemplateError::EmptyPlaceholder]);
        assert_eq!(err("a{ | lower}"), [TemplateError::EmptyPlaceholder]);
        assert_eq!(err("a{id"), [TemplateError::Unclosed]);
        assert_eq!(err("a{i{d}"), [TemplateError::Unclosed]);
        assert_eq!(err("a}b{id}c}"), [TemplateError::Unopened, TemplateError::Unopened]);
        assert_eq!(
            err("{id|lowr}{x|}"),
            [TemplateError::UnknownFilter("lowr".into()), TemplateError::EmptyFilter("x".into())]
        );
        assert_eq!(err(&"k".repeat(MAX_ITEM_BYTES + 1)), [TemplateError::TooLong(MAX_ITEM_BYTES + 1)]);
    }

    #[test]
    fn hash_tags_as_redis_cluster_reads_them() {
        let locale = Var { name: "locale".into(), values: vec!["en".into(), "fr".into()].into() };
        let tag =
            |text: &str, prefix: &str| Template::compile(text, std::slice::from_ref(&locale)).unwrap().hash_tag(prefix);
        assert_eq!(tag("product:{id}", ""), HashTag::Whole);
        assert_eq!(tag("{{shop}}:product:{id}", ""), HashTag::Constant("shop".into()));
        assert_eq!(tag("product:{{{id}}}:page", ""), HashTag::Varies);
        assert_eq!(tag("product:{{{locale}}}:{id}", ""), HashTag::Varies);
        // `{}` is no hash tag: Redis hashes the whole key.
        assert_eq!(tag("{{}}product:{id}", ""), HashTag::Whole);
        // The prefix counts: `tag_prefix: "{tags}:"` puts every tag set in one slot.
        assert_eq!(tag("category:{category_id}", "{tags}:"), HashTag::Constant("tags".into()));
        assert_eq!(tag("category:{category_id}", "{"), HashTag::Varies);
        // A value rendered before the first literal brace could hold braces itself.
        assert_eq!(tag("{tenant}:{{all}}", ""), HashTag::Unknown);
        // The first `}` after the first `{` closes it, even a later literal one.
        assert_eq!(tag("{{a}}{{b}}:{id}", ""), HashTag::Constant("a".into()));
    }
}
