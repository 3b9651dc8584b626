//! jq expressions over the instance context, and templates built from them.
//!
//! A string value that is exactly `${ … }` is a jq expression. The context an
//! expression sees is `{"input": …, "steps": {"<id>": {"output": …}}, "vars": {…}}`.
//!
//! Expressions are compiled once, when a definition is parsed, with
//! [jaq](https://github.com/01mf02/jaq) and its standard library, less the few
//! filters that would make a replay differ from the original run (`now`, `env`,
//! `localtime`, `halt`, logging).
//!
//! Evaluation runs for every step of every instance, so it avoids converting the
//! whole context to jaq's value type: plain paths (`.input.sku`,
//! `.steps.reserve.output`) are looked up directly in the JSON context, and other
//! expressions get only the parts of it they can read (`.input.qty * 2` gets
//! `{"input": {"qty": …}}`), as found when they are compiled. Only expressions that
//! may read anything (`keys`, `. as $c`) get the whole context.

use std::cell::OnceCell;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, LazyLock};

use jaq_core::load::lex::StrPart;
use jaq_core::load::parse::{BinaryOp, Def, Pattern, Term};
use jaq_core::load::{Arena, File, Loader};
use jaq_core::path::Part;
use jaq_core::{Compiler, Ctx, Vars};
use jaq_json::{Num, Rc, Val};
use serde_json::Value;

/// Longest expression accepted, in tokens (a path such as `.steps.a.output` is one).
///
/// jaq parses, compiles and runs expressions recursively; an unbounded expression
/// could overflow a thread's stack and abort the whole process.
pub const EXPRESSION_TOKENS_MAX: usize = 256;

/// Deepest nesting of brackets and string interpolations in an expression, for the
/// same reason as [`EXPRESSION_TOKENS_MAX`].
pub const EXPRESSION_DEPTH_MAX: usize = 64;

/// Filters left out because their result depends on more than their input, which
/// would break replay, or because they do I/O: natives, then the definitions using them.
const IMPURE_FILTERS: [&str; 11] = [
    "now",
    "env",
    "localtime",
    "strflocaltime",
    "halt",
    "debug_empty",
    "stderr_empty",
    "debug",
    "stderr",
    "halt_error",
    "input_filename",
];

/// Words refused in expressions because they can loop without end (jaq has no
/// evaluation budget, and an expression runs inside a partition's actor): user
/// definitions (which may recurse) and the unbounded loop builtins.
const UNBOUNDED_WORDS: [&str; 5] = ["def", "repeat", "while", "until", "recurse"];

type Data = jaq_core::data::JustLut<Val>;
type Filter = jaq_core::Filter<Data>;

/// jaq's definitions, parsed once: parsing them is half the cost of a compilation.
static DEFS: LazyLock<Vec<Def<&'static str>>> = LazyLock::new(|| {
    jaq_core::defs()
        .chain(jaq_std::defs())
        .chain(jaq_json::defs())
        .filter(|def| !IMPURE_FILTERS.contains(&def.name))
        .collect()
});

/// A compiled jq expression. Cheap to clone, `Send + Sync`.
#[derive(Clone)]
pub struct Expr {
    inner: Arc<Compiled>,
}

struct Compiled {
    source: String,
    filter: Filter,
    /// Set when the expression is a plain path, evaluated without jaq.
    path: Option<Vec<Key>>,
    /// The parts of the context the expression can read; `None` when it may read any.
    needs: Option<Needs>,
}

/// One step of a plain path.
#[derive(Debug, PartialEq)]
enum Key {
    Field(String),
    Index(usize),
}

/// An expression failed at run time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct EvalError {
    /// What went wrong, with the expression's source.
    pub message: String,
}

/// The source of the expression in `text` when `text` is exactly `${ … }`
/// (surrounding whitespace aside), trimmed.
pub fn embedded(text: &str) -> Option<&str> {
    let inner = text.trim().strip_prefix("${")?.strip_suffix('}')?;
    Some(inner.trim())
}

/// The ids of the steps that `code` reads by a literal path: `.steps.<id>`,
/// `.steps."<id>"`, `.steps["<id>"]` or `.steps.["<id>"]`, in order, repeats included.
///
/// A scan of the source rather than of jaq's syntax tree: it sees the paths people
/// write, skips string literals and comments, and misses computed ones
/// (`.steps[$id]`), which only fail at run time.
pub fn step_references(code: &str) -> Vec<String> {
    const PREFIX: &str = ".steps";
    let is_code = code_mask(code);
    let bytes = code.as_bytes();
    let ident_start = |b: u8| b.is_ascii_alphabetic() || b == b'_';
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut found = Vec::new();
    let mut at = 0;
    while let Some(offset) = code[at..].find(PREFIX) {
        let start = at + offset;
        at = start + PREFIX.len();
        if !is_code[start] {
            continue;
        }
        // `.input.steps.a` or `$x.steps.a` is not the context's `.steps`.
        if start > 0 && (ident(bytes[start - 1]) || b"]).\"?$}".contains(&bytes[start - 1])) {
            continue;
        }
        let mut next = at;
        match (bytes.get(next), bytes.get(next + 1)) {
            (Some(b'.'), Some(&b)) if ident_start(b) => {
                let mut end = next + 2;
                while end < bytes.len() && ident(bytes[end]) {
                    end += 1;
                }
                found.push(code[next + 1..end].to_string());
                continue;
            }
            (Some(b'.'), Some(b'"')) => {
                if let Some((name, _)) = quoted(code, next + 1) {
                    found.push(name);
                }
                continue;
            }
            (Some(b'.'), Some(b'[')) => next += 1,
            _ => {}
        }
        if bytes.get(next) == Some(&b'[') && bytes.get(next + 1) == Some(&b'"') {
            if let Some((name, after)) = quoted(code, next + 1) {
                if bytes.get(after) == Some(&b']') {
                    found.push(name);
                }
            }
        }
    }
    found
}

/// For each byte of `code`, whether it is code rather than string literal or comment.
fn code_mask(code: &str) -> Vec<bool> {
    let bytes = code.as_bytes();
    let mut mask = vec![true; bytes.len()];
    // For each open parenthesis: whether it opened a string interpolation `\(`.
    let mut open: Vec<bool> = Vec::new();
    let mut in_string = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            mask[i] = false;
            match b {
                b'"' => in_string = false,
                b'\\' if bytes.get(i + 1) == Some(&b'(') => {
                    mask[i + 1] = false;
                    open.push(true);
                    in_string = false;
                    i += 1;
                }
                b'\\' => {
                    if i + 1 < bytes.len() {
                        mask[i + 1] = false;
                    }
                    i += 1;
                }
                _ => {}
            }
        } else {
            match b {
                b'"' => {
                    mask[i] = false;
                    in_string = true;
                }
                b'#' => {
                    while i < bytes.len() && bytes[i] != b'\n' {
                        mask[i] = false;
                        i += 1;
                    }
                }
                b'(' => open.push(false),
                // Closing an interpolation goes back into its string.
                b')' => in_string = open.pop() == Some(true),
                _ => {}
            }
        }
        i += 1;
    }
    mask
}

/// A context converted at most once for several evaluations.
///
/// [`Template::eval`] uses one for all its expressions; a caller evaluating several
/// expressions against one context can do the same with [`Expr::eval_in`].
pub struct EvalContext<'a> {
    json: &'a Value,
    /// jaq's copy of `json`, made on the first evaluation that needs it.
    val: OnceCell<Val>,
}

impl<'a> EvalContext<'a> {
    /// Wraps `json`; nothing is converted yet.
    pub fn new(json: &'a Value) -> Self {
        EvalContext {
            json,
            val: OnceCell::new(),
        }
    }

    fn val(&self) -> Val {
        // Cloning a Val clones an Rc for objects and arrays, not the data.
        self.val.get_or_init(|| to_val(self.json)).clone()
    }
}

impl Expr {
    /// Compiles `source` (the text between `${` and `}`), or says why it does not compile.
    pub fn compile(source: &str) -> Result<Expr, String> {
        let code = source.trim();
        if code.is_empty() {
            return Err("empty expression".to_string());
        }
        check_size(code)?;
        let loader = Loader::new(DEFS.iter().cloned());
        let arena = Arena::default();
        let modules = loader
            .load(&arena, File { code, path: () })
            .map_err(|errors| {
                let reasons: Vec<String> = errors
                    .into_iter()
                    .flat_map(|(_, e)| load_error(e))
                    .collect();
                reasons.join("; ")
            })?;
        let funs = jaq_core::funs()
            .chain(jaq_std::funs().filter(|(name, _, _)| !IMPURE_FILTERS.contains(name)))
            .chain(jaq_json::funs());
        let filter = Compiler::default()
            .with_funs(funs)
            .compile(modules)
            .map_err(|errors| {
                let reasons: Vec<String> = errors
                    .into_iter()
                    .flat_map(|(_, e)| e)
                    .map(|(name, undefined)| undefined_message(name, undefined))
                    .collect();
                reasons.join("; ")
            })?;
        Ok(Expr {
            inner: Arc::new(Compiled {
                source: code.to_string(),
                filter,
                path: plain_path(code),
                needs: needs(code),
            }),
        })
    }

    /// The expression's source text.
    pub fn source(&self) -> &str {
        &self.inner.source
    }

    /// The ids of the steps whose output the expression reads by a literal path.
    ///
    /// See [`step_references`].
    pub fn step_references(&self) -> Vec<String> {
        step_references(self.source())
    }

    /// Evaluates against `context`; the first output is the value (`null` if none).
    pub fn eval(&self, context: &Value) -> Result<Value, EvalError> {
        self.eval_in(&EvalContext::new(context))
    }

    /// Evaluates against a context that may already have been converted for jaq.
    pub fn eval_in(&self, context: &EvalContext<'_>) -> Result<Value, EvalError> {
        if let Some(path) = &self.inner.path {
            if let Some(value) = lookup(context.json, path) {
                return Ok(value.clone());
            }
            // A type mismatch (indexing a number): jaq says it best.
        }
        let input = match &self.inner.needs {
            // Converting only what the expression reads keeps its cost independent of
            // how many steps have run: a context holds every step's output.
            Some(needs) => needs.extract(context.json),
            None => context.val(),
        };
        let filter = &self.inner.filter;
        let ctx = Ctx::<Data>::new(&filter.lut, Vars::new([]));
        match filter.id.run((ctx, input)).next() {
            None => Ok(Value::Null),
            Some(Ok(value)) => Ok(from_val(&value)),
            Some(Err(exception)) => {
                let reason = match exception.get_err() {
                    Ok(error) => match error.into_val() {
                        // `error("text")` reads better without JSON quotes.
                        Val::TStr(text) => String::from_utf8_lossy(&text).into_owned(),
                        other => other.to_string(),
                    },
                    // Only `halt` and `break` raise other exceptions; both are excluded
                    // or caught at compile time, but a message beats a panic.
                    Err(_) => "stopped without a value".to_string(),
                };
                Err(EvalError {
                    message: format!("`{}` failed: {reason}", self.source()),
                })
            }
        }
    }
}

impl std::fmt::Debug for Expr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "${{ {} }}", self.source())
    }
}

/// A JSON value in which some leaves are expressions.
#[derive(Debug, Clone)]
pub enum Template {
    /// A constant.
    Literal(Value),
    /// A `${ … }` string.
    Expr(Expr),
    /// An object with at least one non-constant member, in source order.
    Object(Vec<(String, Template)>),
    /// An array with at least one non-constant element.
    Array(Vec<Template>),
}

impl Template {
    /// Builds a template from a JSON value, compiling each `${ … }` string.
    pub fn from_value(value: Value) -> Result<Template, String> {
        match value {
            Value::String(text) => match embedded(&text) {
                Some(source) => Expr::compile(source)
                    .map(Template::Expr)
                    .map_err(|reason| format!("bad expression `{source}`: {reason}")),
                None => Ok(Template::Literal(Value::String(text))),
            },
            Value::Array(items) => {
                let items = items
                    .into_iter()
                    .map(Template::from_value)
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Template::array(items))
            }
            Value::Object(members) => {
                let members = members
                    .into_iter()
                    .map(|(key, value)| Ok((key, Template::from_value(value)?)))
                    .collect::<Result<Vec<_>, String>>()?;
                Ok(Template::object(members))
            }
            other => Ok(Template::Literal(other)),
        }
    }

    /// An array template, a [`Template::Literal`] when every item is one.
    pub fn array(items: Vec<Template>) -> Template {
        if items.iter().all(Template::is_literal) {
            Template::Literal(Value::Array(items.into_iter().map(into_literal).collect()))
        } else {
            Template::Array(items)
        }
    }

    /// An object template, a [`Template::Literal`] when every member is one.
    pub fn object(members: Vec<(String, Template)>) -> Template {
        if members.iter().all(|(_, t)| t.is_literal()) {
            let map = members
                .into_iter()
                .map(|(k, t)| (k, into_literal(t)))
                .collect();
            Template::Literal(Value::Object(map))
        } else {
            Template::Object(members)
        }
    }

    /// Whether the template is a constant.
    pub fn is_literal(&self) -> bool {
        matches!(self, Template::Literal(_))
    }

    /// Every expression in the template, in source order.
    pub fn exprs(&self) -> Vec<&Expr> {
        let mut found = Vec::new();
        self.collect_exprs(&mut found);
        found
    }

    fn collect_exprs<'t>(&'t self, found: &mut Vec<&'t Expr>) {
        match self {
            Template::Literal(_) => {}
            Template::Expr(e) => found.push(e),
            Template::Object(members) => members.iter().for_each(|(_, t)| t.collect_exprs(found)),
            Template::Array(items) => items.iter().for_each(|t| t.collect_exprs(found)),
        }
    }

    /// Evaluates every expression against `context`.
    pub fn eval(&self, context: &Value) -> Result<Value, EvalError> {
        self.eval_in(&EvalContext::new(context))
    }

    /// Evaluates every expression against a context shared with other evaluations.
    pub fn eval_in(&self, context: &EvalContext<'_>) -> Result<Value, EvalError> {
        match self {
            Template::Literal(value) => Ok(value.clone()),
            Template::Expr(expr) => expr.eval_in(context),
            Template::Object(members) => {
                let mut map = serde_json::Map::with_capacity(members.len());
                for (key, template) in members {
                    map.insert(key.clone(), template.eval_in(context)?);
                }
                Ok(Value::Object(map))
            }
            Template::Array(items) => items
                .iter()
                .map(|t| t.eval_in(context))
                .collect::<Result<Vec<_>, _>>()
                .map(Value::Array),
        }
    }
}

fn into_literal(template: Template) -> Value {
    match template {
        Template::Literal(value) => value,
        // Callers check `is_literal` first.
        _ => unreachable!("not a literal"),
    }
}

/// Rejects expressions too large or too deep for jaq's recursive parser and
/// interpreter, with a cheap scan that over-counts rather than under-counts.
fn check_size(code: &str) -> Result<(), String> {
    let mut tokens = 0;
    let mut depth: usize = 0;
    let mut deepest = 0;
    // For each open bracket: whether it is a string interpolation `\(`.
    let mut open: Vec<bool> = Vec::new();
    let mut in_string = false;
    let mut chars = code.chars().peekable();
    while let Some(c) = chars.next() {
        if in_string {
            match c {
                '"' => in_string = false,
                '\\' => {
                    let interpolation = chars.next() == Some('(');
                    if interpolation {
                        // The interpolation is code up to its matching `)`.
                        in_string = false;
                        open.push(true);
                        depth += 1;
                        tokens += 1;
                    }
                }
                _ => {}
            }
        } else {
            match c {
                '"' => {
                    in_string = true;
                    tokens += 1;
                }
                '#' => {
                    // A comment, to the end of the line.
                    for c in chars.by_ref() {
                        if c == '\n' {
                            break;
                        }
                    }
                }
                '(' | '[' | '{' => {
                    open.push(false);
                    depth += 1;
                    tokens += 1;
                }
                ')' | ']' | '}' => {
                    depth = depth.saturating_sub(1);
                    if open.pop() == Some(true) {
                        in_string = true;
                    }
                }
                c if c.is_whitespace() => {}
                c if c.is_alphanumeric() || "_.$@:".contains(c) => {
                    let mut word = String::from(c);
                    while let Some(&next) = chars
                        .peek()
                        .filter(|c| c.is_alphanumeric() || "_.$@:".contains(**c))
                    {
                        word.push(next);
                        chars.next();
                    }
                    if UNBOUNDED_WORDS.contains(&word.as_str()) {
                        return Err(format!(
                            "`{word}` is not available: expressions must terminate, and a loop here could hang its partition"
                        ));
                    }
                    tokens += 1;
                }
                _ => tokens += 1,
            }
        }
        deepest = deepest.max(depth);
    }
    if deepest > EXPRESSION_DEPTH_MAX {
        return Err(format!(
            "expression nests deeper than {EXPRESSION_DEPTH_MAX} levels"
        ));
    }
    if tokens > EXPRESSION_TOKENS_MAX {
        return Err(format!(
            "expression is longer than {EXPRESSION_TOKENS_MAX} tokens"
        ));
    }
    Ok(())
}

fn load_error(error: jaq_core::load::Error<&str>) -> Vec<String> {
    use jaq_core::load::Error;
    match error {
        Error::Io(errors) => errors
            .into_iter()
            .map(|(path, reason)| format!("cannot load module `{path}`: {reason}"))
            .collect(),
        Error::Lex(errors) => errors
            .into_iter()
            .map(|(expect, found)| {
                use jaq_core::load::lex::Expect;
                match expect {
                    Expect::Delim(open) => format!("unclosed `{open}`"),
                    other => format!("expected {}{}", other.as_str(), found_text(found)),
                }
            })
            .collect(),
        Error::Parse(errors) => errors
            .into_iter()
            .map(|(expect, found)| format!("expected {}{}", expect.as_str(), found_text(found)))
            .collect(),
    }
}

/// `, found `x`` for what the parser stumbled on, shortened.
fn found_text(found: &str) -> String {
    let found = found.trim();
    if found.is_empty() {
        return " at the end".to_string();
    }
    let mut shown: String = found.chars().take(20).collect();
    if shown.len() < found.len() {
        shown.push('…');
    }
    format!(", found `{shown}`")
}

fn undefined_message(name: &str, undefined: jaq_core::compile::Undefined) -> String {
    use jaq_core::compile::Undefined;
    match undefined {
        Undefined::Filter(arity) if IMPURE_FILTERS.contains(&name) => {
            format!("`{name}/{arity}` is not available: expressions must be deterministic")
        }
        Undefined::Filter(arity) => format!("undefined filter `{name}/{arity}`"),
        other => format!("undefined {} `{name}`", other.as_str()),
    }
}

/// The parts of the context an expression reads: top-level keys, each whole (`None`)
/// or only some of its members (`.steps.a` and `.steps.b` read `steps.{a, b}`).
#[derive(Debug, Default, PartialEq)]
struct Needs {
    keys: BTreeMap<String, Option<BTreeSet<String>>>,
}

impl Needs {
    fn add(&mut self, key: &str, member: Option<&str>) {
        match member {
            None => {
                self.keys.insert(key.to_string(), None);
            }
            Some(member) => {
                let entry = self
                    .keys
                    .entry(key.to_string())
                    .or_insert_with(|| Some(BTreeSet::new()));
                if let Some(members) = entry {
                    members.insert(member.to_string());
                }
            }
        }
    }

    /// The part of `context` the expression reads, converted for jaq. Keys it cannot
    /// read are left out; it would see them as missing, which it never looks at.
    fn extract(&self, context: &Value) -> Val {
        let Value::Object(map) = context else {
            return to_val(context);
        };
        let pairs = self.keys.iter().filter_map(|(key, members)| {
            let value = map.get(key)?;
            let val = match (members, value) {
                (Some(members), Value::Object(inner)) => Val::obj(
                    members
                        .iter()
                        .filter_map(|m| Some((str_val(m), to_val(inner.get(m)?))))
                        .collect(),
                ),
                _ => to_val(value),
            };
            Some((str_val(key), val))
        });
        Val::obj(pairs.collect())
    }
}

/// What `code` reads of its input (the context), or `None` if it may read anything.
///
/// A conservative walk of jaq's syntax tree, following where the context flows: it
/// is the input of the whole expression, of both sides of most operators, of the
/// left of `|` (the right side gets the left's output), of array and object
/// constructors, conditions, and so on. There, a path that starts with literal keys
/// (`.steps.a.output`) reads those; anything else that gets the context (`.`,
/// `.[]`, `keys`, `. as $c`, `..`) may read all of it.
fn needs(code: &str) -> Option<Needs> {
    let term = jaq_core::load::parse(code, |p| p.term())?;
    let mut needs = Needs::default();
    reads(&term, &mut needs).then_some(needs)
}

/// Adds what `term`, given the context as input, reads of it; false if it may read all.
fn reads(term: &Term<&str>, needs: &mut Needs) -> bool {
    match term {
        Term::Id | Term::Recurse => false,
        Term::Num(_) | Term::Var(_) | Term::Break(_) | Term::Arr(None) => true,
        Term::Str(_, parts) => parts.iter().all(|part| match part {
            StrPart::Term(t) => reads(t, needs),
            StrPart::Str(_) | StrPart::Char(_) => true,
        }),
        Term::Arr(Some(t)) | Term::Neg(t) | Term::Label(_, t) | Term::Def(_, t) => reads(t, needs),
        Term::Obj(entries) => entries.iter().all(|(key, value)| match value {
            Some(value) => reads(key, needs) && reads(value, needs),
            // `{a}` is `{a: .a}`; `{$x}` reads a variable.
            None => match (key, literal(key)) {
                (Term::Var(_), _) => true,
                (_, Some(name)) => {
                    needs.add(name, None);
                    true
                }
                _ => false,
            },
        }),
        Term::BinOp(left, op, right) => match op {
            // The right side's input is the left's output, not the context.
            BinaryOp::Pipe(None) => reads(left, needs),
            // `l as $x | r`: both get the context.
            BinaryOp::Pipe(Some(pattern)) => {
                reads(left, needs) && pattern_reads(pattern, needs) && reads(right, needs)
            }
            BinaryOp::Comma
            | BinaryOp::Alt
            | BinaryOp::Or
            | BinaryOp::And
            | BinaryOp::Math(_)
            | BinaryOp::Cmp(_) => reads(left, needs) && reads(right, needs),
            // An update returns the whole, updated context.
            BinaryOp::Assign | BinaryOp::Update | BinaryOp::UpdateMath(_) | BinaryOp::UpdateAlt => {
                false
            }
        },
        // Only the source and the initial value see the context; updates see the
        // accumulator.
        Term::Fold(_, source, pattern, args) => {
            reads(source, needs)
                && pattern_reads(pattern, needs)
                && args.first().is_none_or(|init| reads(init, needs))
        }
        // The handler's input is the error.
        Term::TryCatch(body, _) => reads(body, needs),
        Term::IfThenElse(branches, otherwise) => {
            branches
                .iter()
                .all(|(condition, then)| reads(condition, needs) && reads(then, needs))
                && otherwise.as_ref().is_none_or(|t| reads(t, needs))
        }
        // A filter given the context may do anything with it; these few ignore it.
        Term::Call(name, args) => match (*name, args.len()) {
            ("empty" | "true" | "false" | "null", 0) => true,
            ("error", 1) => reads(&args[0], needs),
            _ => false,
        },
        Term::Path(head, path) => {
            let parts = &path.0;
            let index_reads = |parts: &[(Part<Term<&str>>, _)], needs: &mut Needs| {
                // Index expressions (`.[f]`) get the context as input too.
                parts.iter().all(|(part, _)| match part {
                    Part::Index(t) => reads(t, needs),
                    Part::Range(from, to) => {
                        from.as_ref().is_none_or(|t| reads(t, needs))
                            && to.as_ref().is_none_or(|t| reads(t, needs))
                    }
                })
            };
            if !matches!(**head, Term::Id) {
                return reads(head, needs) && index_reads(parts, needs);
            }
            let key = match parts.first() {
                Some((Part::Index(t), _)) => literal(t),
                _ => None,
            };
            let Some(key) = key else {
                return false;
            };
            let member = match parts.get(1) {
                Some((Part::Index(t), _)) => literal(t),
                _ => None,
            };
            needs.add(key, member);
            index_reads(parts, needs)
        }
    }
}

fn pattern_reads(pattern: &Pattern<&str>, needs: &mut Needs) -> bool {
    match pattern {
        Pattern::Var(_) => true,
        Pattern::Arr(items) => items.iter().all(|p| pattern_reads(p, needs)),
        // Computed keys (`{(f): $x}`) are conservatively assumed to see the context.
        Pattern::Obj(entries) => entries
            .iter()
            .all(|(key, p)| reads(key, needs) && pattern_reads(p, needs)),
    }
}

/// The text of a string literal without escapes or interpolation.
fn literal<'s>(term: &Term<&'s str>) -> Option<&'s str> {
    match term {
        Term::Str(None, parts) => match parts.as_slice() {
            [StrPart::Str(text)] => Some(text),
            _ => None,
        },
        _ => None,
    }
}

/// The keys of `code` when it is a plain path: `.`, `.a.b`, `.a[0]`, `.["a-b"]`, `."a-b"`.
fn plain_path(code: &str) -> Option<Vec<Key>> {
    let bytes = code.as_bytes();
    if bytes.first() != Some(&b'.') {
        return None;
    }
    let mut keys = Vec::new();
    let mut at = 0;
    if code == "." {
        return Some(keys);
    }
    while at < bytes.len() {
        match bytes[at] {
            b'.' if bytes.get(at + 1) == Some(&b'"') => {
                let (key, next) = quoted(code, at + 1)?;
                keys.push(Key::Field(key));
                at = next;
            }
            b'.' if bytes.get(at + 1) == Some(&b'[') && at == 0 => at += 1,
            b'.' => {
                let start = at + 1;
                let first = *bytes.get(start)?;
                if !(first.is_ascii_alphabetic() || first == b'_') {
                    return None;
                }
                let mut end = start + 1;
                while end < bytes.len()
                    && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_')
                {
                    end += 1;
                }
                keys.push(Key::Field(code[start..end].to_string()));
                at = end;
            }
            b'[' => {
                let next = *bytes.get(at + 1)?;
                if next == b'"' {
                    let (key, after) = quoted(code, at + 1)?;
                    if bytes.get(after) != Some(&b']') {
                        return None;
                    }
                    keys.push(Key::Field(key));
                    at = after + 1;
                } else {
                    let end = at + 1 + code[at + 1..].find(']')?;
                    let digits = &code[at + 1..end];
                    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                        return None;
                    }
                    keys.push(Key::Index(digits.parse().ok()?));
                    at = end + 1;
                }
            }
            _ => return None,
        }
    }
    Some(keys)
}

/// A string literal without escapes starting at `start` (a `"`), and the index after it.
fn quoted(code: &str, start: usize) -> Option<(String, usize)> {
    let rest = &code[start + 1..];
    let end = rest.find('"')?;
    let text = &rest[..end];
    // Escapes and interpolations are left to jaq.
    if text.contains('\\') {
        return None;
    }
    Some((text.to_string(), start + 1 + end + 1))
}

/// Follows a plain path the way jq does, or `None` where jq would fail.
fn lookup<'v>(mut value: &'v Value, path: &[Key]) -> Option<&'v Value> {
    static NULL: Value = Value::Null;
    for key in path {
        value = match (value, key) {
            (Value::Null, _) => return Some(&NULL),
            (Value::Object(map), Key::Field(name)) => map.get(name).unwrap_or(&NULL),
            (Value::Array(items), Key::Index(i)) => items.get(*i).unwrap_or(&NULL),
            _ => return None,
        };
    }
    Some(value)
}

fn str_val(text: &str) -> Val {
    Val::utf8_str(text.as_bytes().to_vec())
}

fn to_val(value: &Value) -> Val {
    match value {
        Value::Null => Val::Null,
        Value::Bool(b) => Val::Bool(*b),
        Value::Number(n) => Val::Num(if let Some(i) = n.as_i64() {
            Num::from_integral(i)
        } else if let Some(u) = n.as_u64() {
            Num::from_integral(u)
        } else {
            Num::Float(n.as_f64().unwrap_or(f64::NAN))
        }),
        Value::String(s) => str_val(s),
        Value::Array(items) => Val::Arr(Rc::new(items.iter().map(to_val).collect())),
        Value::Object(map) => Val::obj(map.iter().map(|(k, v)| (str_val(k), to_val(v))).collect()),
    }
}

fn from_val(value: &Val) -> Value {
    match value {
        Val::Null => Value::Null,
        Val::Bool(b) => Value::Bool(*b),
        Val::Num(n) => from_num(n),
        Val::TStr(bytes) | Val::BStr(bytes) => {
            Value::String(String::from_utf8_lossy(bytes).into_owned())
        }
        Val::Arr(items) => Value::Array(items.iter().map(from_val).collect()),
        Val::Obj(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Val::TStr(bytes) | Val::BStr(bytes) => {
                            String::from_utf8_lossy(bytes).into_owned()
                        }
                        other => other.to_string(),
                    };
                    (key, from_val(v))
                })
                .collect(),
        ),
    }
}

fn from_num(n: &Num) -> Value {
    match n {
        Num::Int(i) => Value::from(*i as i64),
        Num::Float(f) => from_float(*f),
        // Big integers and decimal literals: serde_json reads what fits exactly and
        // falls back to f64 for the rest.
        other => {
            let text = other.to_string();
            match text.parse::<serde_json::Number>() {
                Ok(number) => Value::Number(number),
                Err(_) => from_float(text.parse().unwrap_or(f64::NAN)),
            }
        }
    }
}

fn from_float(f: f64) -> Value {
    /// Integers up to 2^53 are exact in f64.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    if f.fract() == 0.0 && f.abs() <= EXACT {
        // jq prints `4 / 2` as 2, not 2.0.
        return Value::from(f as i64);
    }
    if f.is_nan() {
        return Value::Null;
    }
    // jq prints infinities as the largest finite numbers.
    let f = f.clamp(f64::MIN, f64::MAX);
    serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn context() -> Value {
        json!({
            "input": {"x": 41, "sku": "A-1", "items": [1, 2, 3], "n": null, "big": 18446744073709551615u64},
            "steps": {"a": {"output": {"id": "r-7", "total": 2.5}}, "cool-off": {"output": {}}},
            "vars": {},
        })
    }

    fn eval(source: &str) -> Result<Value, String> {
        Expr::compile(source)?
            .eval(&context())
            .map_err(|e| e.message)
    }

    #[test]
    fn evaluates() {
        let cases = [
            (".input.x", json!(41)),
            (".steps.a.output.id", json!("r-7")),
            (".steps[\"cool-off\"].output", json!({})),
            (".steps.\"cool-off\".output", json!({})),
            (".input.items[1]", json!(2)),
            (".input.items[7]", json!(null)),
            (".input.missing.deeper", json!(null)),
            (".input.n.x", json!(null)),
            (".", context()),
            (
                "{id: .steps.a.output.id, n: (.input.x + 1)}",
                json!({"id": "r-7", "n": 42}),
            ),
            (".input.x * 2 - 1", json!(81)),
            (".input.x / 41", json!(1)),
            (".steps.a.output.total * 2", json!(5)),
            (".steps.a.output.total + 0.25", json!(2.75)),
            ("1.5", json!(1.5)),
            (".input.big", json!(18446744073709551615u64)),
            (".input.big + 0", json!(18446744073709551615u64)),
            ("100000000000000000000000", json!(1e23)),
            (".input.items | map(. + 1)", json!([2, 3, 4])),
            ("[.input.items[] | select(. > 1)]", json!([2, 3])),
            (".input.items | length", json!(3)),
            (".input.x | tostring", json!("41")),
            ("\"sku \\(.input.sku)\"", json!("sku A-1")),
            ("empty", json!(null)),
            ("1, 2", json!(1)),
            (".input | keys", json!(["big", "items", "n", "sku", "x"])),
            ("[.input.items[] | . * 10] | add", json!(60)),
            ("\"a-b\" | ascii_upcase | test(\"A\")", json!(true)),
            ("[limit(3; range(10))]", json!([0, 1, 2])),
            (
                "\"2015-03-05T23:51:47Z\" | fromdateiso8601",
                json!(1425599507),
            ),
        ];
        for (source, expected) in cases {
            assert_eq!(eval(source), Ok(expected), "{source}");
        }
    }

    #[test]
    fn runtime_errors_name_the_expression() {
        let cases = [
            (
                ".input.x.y",
                "`.input.x.y` failed: cannot index 41 with \"y\"",
            ),
            (
                ".input.sku + 1",
                "`.input.sku + 1` failed: cannot calculate \"A-1\" + 1",
            ),
            ("error(\"boom\")", "`error(\"boom\")` failed: boom"),
            (
                "error({code: 1})",
                "`error({code: 1})` failed: {\"code\":1}",
            ),
            (
                ".input.items.x",
                "`.input.items.x` failed: cannot index [1,2,3] with \"x\"",
            ),
        ];
        for (source, expected) in cases {
            assert_eq!(eval(source), Err(expected.to_string()), "{source}");
        }
    }

    #[test]
    fn compile_errors() {
        let cases = [
            (".a +", "expected term at the end"),
            ("(.a", "unclosed `(`"),
            ("\"abc", "unclosed `\"`"),
            ("foo(1)", "undefined filter `foo/1`"),
            ("$x", "undefined variable `$x`"),
            (
                "now",
                "`now/0` is not available: expressions must be deterministic",
            ),
            (
                "env",
                "`env/0` is not available: expressions must be deterministic",
            ),
            ("$ENV", "undefined variable `$ENV`"),
            ("   ", "empty expression"),
            (
                "import \"a\" as a; .",
                "cannot load module `a`: module loading not supported",
            ),
            ("input", "undefined filter `input/0`"),
            (
                "def f: f; f",
                "`def` is not available: expressions must terminate, and a loop here could hang its partition",
            ),
            (
                "1 | repeat(.)",
                "`repeat` is not available: expressions must terminate, and a loop here could hang its partition",
            ),
        ];
        for (source, expected) in cases {
            assert_eq!(
                Expr::compile(source).err(),
                Some(expected.to_string()),
                "{source}"
            );
        }
        let deep = format!("{}1{}", "(".repeat(65), ")".repeat(65));
        assert_eq!(
            Expr::compile(&deep).err(),
            Some("expression nests deeper than 64 levels".to_string())
        );
        let long = vec!["1"; 129].join("+");
        assert_eq!(
            Expr::compile(&long).err(),
            Some("expression is longer than 256 tokens".to_string())
        );
        let fine = vec![".a.b.c"; 128].join("+");
        assert!(Expr::compile(&fine).is_ok());
        let interpolated = format!("\"{}x{}\"", "\\(\"".repeat(65), "\")".repeat(65));
        assert!(Expr::compile(&interpolated)
            .err()
            .unwrap()
            .contains("deeper"));
    }

    proptest::proptest! {
        /// Compiling and running arbitrary text fails cleanly or succeeds, never panics.
        #[test]
        fn never_panics(source in "[a-z.\\[\\]{}()|,:;+*/%\"\\\\$?#0-9 -]{0,40}") {
            let _ = step_references(&source);
            if let Ok(expr) = Expr::compile(&source) {
                let _ = expr.eval(&context());
            }
        }
    }

    #[test]
    fn finds_what_expressions_read() {
        fn keys(pairs: &[(&str, Option<&[&str]>)]) -> Option<Needs> {
            let mut needs = Needs::default();
            for (key, members) in pairs {
                match members {
                    None => needs.add(key, None),
                    Some(members) => members.iter().for_each(|m| needs.add(key, Some(m))),
                }
            }
            Some(needs)
        }
        let cases = [
            (".input.qty * 2", keys(&[("input", Some(&["qty"]))])),
            (
                "{id: .steps.a.output.id, n: (.input + 1), b: .steps[\"cool-off\"]}",
                keys(&[("steps", Some(&["a", "cool-off"])), ("input", None)]),
            ),
            (".steps.a, .steps", keys(&[("steps", None)])),
            (
                ".input.items | map(.price * .qty) | add",
                keys(&[("input", Some(&["items"]))]),
            ),
            ("\"x \\(.vars.k)\"", keys(&[("vars", Some(&["k"]))])),
            (
                "if .input.a then .vars else empty end",
                keys(&[("input", Some(&["a"])), ("vars", None)]),
            ),
            (
                "reduce .input.xs[] as $x (0; . + $x + .zzz)",
                keys(&[("input", Some(&["xs"]))]),
            ),
            (
                ".input.a as $a | .vars.b + $a",
                keys(&[("input", Some(&["a"])), ("vars", Some(&["b"]))]),
            ),
            ("try .input.a catch .x", keys(&[("input", Some(&["a"]))])),
            (
                ".input[.vars.i]",
                keys(&[("input", None), ("vars", Some(&["i"]))]),
            ),
            ("{input}", keys(&[("input", None)])),
            ("1 + 2", keys(&[])),
            (".", None),
            ("keys", None),
            (".[]", None),
            ("..", None),
            (". as $c | $c.steps.b", None),
            ("tojson", None),
            (".input.a = 1", None),
            (".[\"in\\u0070ut\"]", None),
            ("def f: .steps; f", None),
            ("getpath([\"steps\", \"a\"])", None),
        ];
        for (source, expected) in cases {
            assert_eq!(needs(source), expected, "{source}");
        }
    }

    #[test]
    fn reading_less_gives_the_same_results() {
        let mut context = context();
        context["steps"]["b"] = json!({"output": {"list": [{"v": 1}, {"v": 2}]}});
        let cases = [
            ".steps.b.output.list | map(.v) | add",
            "{a: .steps.a.output.id, missing: .steps.zz, n: .input.n}",
            "[.steps[\"cool-off\"].output, .input.items[1:]]",
            ".steps.a.output.total * 2",
            ".steps | keys",
        ];
        for source in cases {
            let expr = Expr::compile(source).unwrap();
            assert!(
                expr.inner.needs.is_some() || source == ".steps | keys",
                "{source}"
            );
            let mut full = Expr::compile(source).unwrap();
            let compiled = Arc::get_mut(&mut full.inner).unwrap();
            compiled.needs = None;
            compiled.path = None;
            assert_eq!(expr.eval(&context), full.eval(&context), "{source}");
        }
    }

    /// Pieces of jq that expressions are made of, to build random ones from.
    const FRAGMENTS: [&str; 40] = [
        ".input",
        ".steps",
        ".a",
        ".x",
        ".items",
        ".output",
        ".steps.a.output",
        ".",
        "|",
        "+",
        ",",
        "keys",
        "map(",
        ")",
        "(",
        ".[]",
        "..",
        " as $v | ",
        "$v",
        "{a: ",
        "{input}",
        "}",
        "[",
        "]",
        "\"s\"",
        "1",
        "length",
        "select(",
        "tostring",
        "reduce ",
        "; ",
        "try ",
        " catch ",
        "if ",
        " then ",
        " else ",
        " end",
        "?",
        " // ",
        " = ",
    ];

    proptest::proptest! {
        // Few random programs compile; enough tries to check a hundred or so.
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1500))]

        /// Reading only part of the context, or a plain path without jaq, gives what
        /// jaq gives on the whole context.
        #[test]
        fn shortcuts_match_jaq(pieces in proptest::collection::vec(0..FRAGMENTS.len(), 1..10)) {
            let source: String = pieces.iter().map(|&i| FRAGMENTS[i]).collect();
            if let Ok(expr) = Expr::compile(&source) {
                let mut full = Expr::compile(&source).unwrap();
                let compiled = Arc::get_mut(&mut full.inner).unwrap();
                compiled.needs = None;
                compiled.path = None;
                let context = context();
                proptest::prop_assert_eq!(expr.eval(&context), full.eval(&context), "{}", source);
            }
        }
    }

    #[test]
    fn plain_paths_skip_jaq() {
        let cases = [
            (".", Some(vec![])),
            (".a", Some(vec![Key::Field("a".into())])),
            (
                ".steps.a_1.output",
                Some(vec![
                    Key::Field("steps".into()),
                    Key::Field("a_1".into()),
                    Key::Field("output".into()),
                ]),
            ),
            (
                ".[\"x-y\"][2]",
                Some(vec![Key::Field("x-y".into()), Key::Index(2)]),
            ),
            (
                ".\"x-y\".z",
                Some(vec![Key::Field("x-y".into()), Key::Field("z".into())]),
            ),
            (".a[-1]", None),
            (".a?", None),
            (".a | .b", None),
            (".[\"a\\\"\"]", None),
            (".a.[0]", None),
            ("..", None),
            (".1", None),
        ];
        for (source, expected) in cases {
            assert_eq!(plain_path(source), expected, "{source}");
        }
    }

    #[test]
    fn finds_step_references() {
        let cases: [(&str, &[&str]); 12] = [
            (".steps.a.output.id", &["a"]),
            (".steps.a.output + .steps.b_2.output", &["a", "b_2"]),
            (".steps[\"cool-off\"].output", &["cool-off"]),
            (".steps.[\"cool-off\"]", &["cool-off"]),
            (".steps.\"cool-off\".output", &["cool-off"]),
            ("{x: (.steps.a)}", &["a"]),
            ("\"id \\(.steps.a.output.id)\"", &["a"]),
            ("\"text .steps.a\" | .steps.b", &["b"]),
            (".input.steps.a, $x.steps.b, .stepsx.c", &[]),
            (".steps | keys, .steps[$id]", &[]),
            (".input # .steps.a\n| .steps.b", &["b"]),
            ("[.steps.a, .steps.a]", &["a", "a"]),
        ];
        for (source, expected) in cases {
            assert_eq!(step_references(source), expected, "{source}");
        }
        let expr = Expr::compile(".steps.a.output").unwrap();
        assert_eq!(expr.step_references(), ["a"]);
    }

    #[test]
    fn embedded_expressions() {
        assert_eq!(embedded("${ .a }"), Some(".a"));
        assert_eq!(embedded("${.a}"), Some(".a"));
        assert_eq!(embedded("  ${ .a }\n"), Some(".a"));
        assert_eq!(embedded("${}"), Some(""));
        assert_eq!(embedded("$ { .a }"), None);
        assert_eq!(embedded("x ${ .a }"), None);
        assert_eq!(embedded("${ .a"), None);
    }

    #[test]
    fn templates() {
        let template = Template::from_value(json!({
            "sku": "${ .input.sku }",
            "fixed": {"a": [1, "two"]},
            "list": [1, "${ .input.x + 1 }", {"deep": "${ .steps.a.output.id }"}],
            "text": "not ${ an expression",
        }))
        .unwrap();
        let Template::Object(members) = &template else {
            panic!("{template:?}")
        };
        let fixed = members.iter().find(|(k, _)| k == "fixed").unwrap();
        assert!(matches!(fixed.1, Template::Literal(_)));
        assert_eq!(template.exprs().len(), 3);
        assert_eq!(
            template.eval(&context()).unwrap(),
            json!({
                "sku": "A-1",
                "fixed": {"a": [1, "two"]},
                "list": [1, 42, {"deep": "r-7"}],
                "text": "not ${ an expression",
            })
        );
        let literal = Template::from_value(json!({"a": [1, {"b": null}]})).unwrap();
        assert!(matches!(&literal, Template::Literal(v) if *v == json!({"a": [1, {"b": null}]})));
        assert_eq!(
            Template::from_value(json!({"a": ["${ .x + }"]})).err(),
            Some("bad expression `.x +`: expected term at the end".to_string())
        );
        let failing = Template::from_value(json!(["${ .input.sku | tonumber }"])).unwrap();
        assert!(failing
            .eval(&context())
            .unwrap_err()
            .message
            .starts_with("`.input.sku | tonumber` failed: "));
    }

    #[test]
    fn shared_context_converts_once() {
        let context = context();
        let shared = EvalContext::new(&context);
        // Expressions that read only parts of the context leave it unconverted.
        let part = Expr::compile(".input.x + 1").unwrap();
        assert_eq!(part.eval_in(&shared), Ok(json!(42)));
        assert!(shared.val.get().is_none());
        // One that may read anything converts it once, for every such expression.
        let all = Expr::compile("keys | length").unwrap();
        assert_eq!(all.eval_in(&shared), Ok(json!(3)));
        assert!(shared.val.get().is_some());
        let again = Expr::compile("[.[] | length]").unwrap();
        assert_eq!(again.eval_in(&shared), Ok(json!([5, 2, 0])));
    }

    #[test]
    fn expr_is_send_sync_and_shares_on_clone() {
        fn send_sync<T: Send + Sync + Clone>() {}
        send_sync::<Expr>();
        send_sync::<Template>();
        let a = Expr::compile(".a").unwrap();
        let b = a.clone();
        assert!(Arc::ptr_eq(&a.inner, &b.inner));
        assert_eq!(format!("{b:?}"), "${ .a }");
    }
}
