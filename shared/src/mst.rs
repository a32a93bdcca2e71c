//! The model selection language: one text that declares a whole search over
//! model selection triples, feature engineering (FE), architecture (AS) and
//! parameter tuning (PT). Grammar and examples: docs/selection.md.
//!
//! ```text
//! source   {flights, (SELECT f.*, w.temp FROM flights f JOIN weather w USING (origin, hour))}
//! features flights.*, weather.{temp, precip}?, -tailnum
//! encode   dep_time = ple, carrier = {onehot, embedding}
//! model    hidden = {[64, 32], [128, 64]}, activation = {relu, gelu}, dropout = range(0, 0.3)
//! train    lr = range(1e-4, 1e-2, log), batch_size = {256, 512}, epochs = 30
//! search   random(20, seed = 7)
//! ```
//!
//! Sets `{a, b}` and ranges `range(lo, hi[, log|linear|int])` may stand for
//! any value; an optional feature group (`?`) and a set of sources are
//! searched too. Every error quotes the text and points at the position.
//! An INSERT with a `spec` queues its candidates (fdw/src/selections.rs).

use std::ops::Range;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json};

use crate::spec::{SpecError, TrainOptions};

/// Where a piece of the text is, in bytes.
pub type Span = Range<usize>;

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Number(f64),
    Word(String),
    Text(String),
    List(Vec<(Value, Span)>),
    /// One of these: a dimension of the search.
    Set(Vec<(Value, Span)>),
    /// Any number in `[lo, hi]`, drawn on this scale.
    Range {
        lo: f64,
        hi: f64,
        scale: Scale,
    },
    /// A parenthesised SQL query (as a source).
    Query(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    Linear,
    Log,
    Int,
}

/// A feature selection: `t.*`, `t.{a, b}`, `col`, `*`; `-` excludes, `?`
/// makes the group optional (searched with and without).
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    pub exclude: bool,
    pub table: Option<String>,
    /// None: every column.
    pub columns: Option<Vec<String>>,
    pub optional: bool,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub key: String,
    pub key_span: Span,
    pub value: Value,
    pub span: Span,
    /// `key += value`: appended to the parent's value (a change only).
    pub append: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Search {
    /// Every combination of the sets.
    Grid,
    /// `n` combinations drawn with `seed`.
    Random { n: u64, seed: u64 },
    /// Successive halving, asynchronous (ASHA): start `n` candidates; at
    /// each rung (`min_epochs`, `min_epochs`·`eta`, ...) a candidate goes on
    /// only if it is in the best 1/`eta` of those that reached that rung.
    /// `min_epochs` None: chosen from the candidates' epochs (three rungs).
    Halving { n: u64, eta: u64, seed: u64, min_epochs: Option<u64> },
}

/// What a selection may spend before its unfinished candidates stop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// Wall time from the INSERT.
    Seconds(f64),
    /// Epochs summed over every candidate.
    Epochs(u64),
}

/// The documented default selection (docs/selection.md): what `spec =
/// 'default'` searches when a user has no search of their own in mind.
pub const DEFAULT_SPEC: &str = "\
model  hidden = {[64, 32], [128, 64], [256, 128]}, dropout = {0, 0.1, 0.2}
train  lr = range(3e-4, 1e-2, log), weight_decay = {0, 1e-4}, epochs = 40, patience = 8
search halving(24, eta = 3, seed = 1)
budget 10 min";

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Spec {
    pub source: Option<(Value, Span)>,
    pub features: Vec<Selection>,
    pub encodings: Vec<Assignment>,
    pub model: Vec<Assignment>,
    pub train: Vec<Assignment>,
    pub search: Option<(Search, Span)>,
    pub budget: Option<(Budget, Span)>,
    /// Deploy the best candidate when the selection ends.
    pub promote: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The text does not follow the grammar (SQLSTATE 42601).
    Syntax,
    /// It does, but a value is not allowed (22023).
    Invalid,
}

/// An error with the position it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (line {line}, column {column})")]
pub struct MstError {
    pub kind: ErrorKind,
    pub message: String,
    pub offset: usize,
    pub line: usize,
    pub column: usize,
    /// The line of text with a caret under the position.
    pub snippet: String,
}

impl MstError {
    fn at(text: &str, offset: usize, kind: ErrorKind, message: String) -> MstError {
        let offset = offset.min(text.len());
        let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
        let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
        let line = text[..offset].matches('\n').count() + 1;
        let column = text[line_start..offset].chars().count() + 1;
        let snippet = format!("{}\n{}^", &text[line_start..line_end], " ".repeat(column - 1));
        MstError { kind, message, offset, line, column, snippet }
    }
}

/// Keys of the `model` clause (architecture) and the `train` clause
/// (parameter tuning), as TrainOptions names them; `lr` is `learning_rate`.
const MODEL_KEYS: &[&str] = &["hidden", "activation", "residual_blocks", "norm", "dropout"];
const TRAIN_KEYS: &[&str] = &[
    "split",
    "optimizer",
    "learning_rate",
    "batch_size",
    "epochs",
    "schedule",
    "warmup_epochs",
    "weight_decay",
    "momentum",
    "clip_norm",
    "seed",
    "patience",
    "validation_fraction",
    "class_weights",
    "loss",
    "huber_delta",
    "numeric_encoding",
    "bins",
    "onehot_max",
];

struct Parser<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Parser<'a> {
    fn error(&self, offset: usize, message: impl Into<String>) -> MstError {
        MstError::at(self.text, offset, ErrorKind::Syntax, message.into())
    }

    fn rest(&self) -> &'a str {
        &self.text[self.at..]
    }

    /// Skips spaces and `--` comments; newlines too unless `keep_newlines`.
    fn skip(&mut self, keep_newlines: bool) {
        loop {
            let rest = self.rest();
            if rest.starts_with("--") {
                self.at += rest.find('\n').unwrap_or(rest.len());
            } else if let Some(c) = rest.chars().next().filter(|c| c.is_whitespace() && !(keep_newlines && *c == '\n'))
            {
                self.at += c.len_utf8();
            } else {
                return;
            }
        }
    }

    fn peek(&mut self) -> Option<char> {
        self.skip(false);
        self.rest().chars().next()
    }

    /// Consumes `c` if it comes next; otherwise leaves the position where
    /// it was, so that a newline ending a clause is still there.
    fn eat(&mut self, c: char) -> bool {
        let before = self.at;
        if self.peek() == Some(c) {
            self.at += c.len_utf8();
            true
        } else {
            self.at = before;
            false
        }
    }

    fn expect(&mut self, c: char, context: &str) -> Result<(), MstError> {
        if self.eat(c) {
            Ok(())
        } else {
            let found = self.describe_next();
            Err(self.error(self.at, format!("expected \"{c}\" {context}, found {found}")))
        }
    }

    fn describe_next(&mut self) -> String {
        match self.peek() {
            None => "the end of the text".into(),
            Some(_) => {
                let word: String = self.rest().chars().take_while(|c| !c.is_whitespace()).take(20).collect();
                format!("\"{word}\"")
            }
        }
    }

    fn ident(&mut self) -> Option<(String, Span)> {
        self.skip(false);
        let start = self.at;
        let len: usize = self
            .rest()
            .char_indices()
            .take_while(|(i, c)| c.is_alphabetic() || *c == '_' || (*i > 0 && c.is_ascii_digit()))
            .map(|(_, c)| c.len_utf8())
            .sum();
        if len == 0 {
            return None;
        }
        self.at += len;
        Some((self.text[start..self.at].to_string(), start..self.at))
    }

    fn expect_ident(&mut self, what: &str) -> Result<(String, Span), MstError> {
        match self.ident() {
            Some(i) => Ok(i),
            None => {
                let found = self.describe_next();
                Err(self.error(self.at, format!("expected {what}, found {found}")))
            }
        }
    }

    fn number(&mut self) -> Result<Option<f64>, MstError> {
        self.skip(false);
        let start = self.at;
        let bytes = self.rest().as_bytes();
        let mut i = 0;
        if i < bytes.len() && (bytes[i] == b'-' || bytes[i] == b'+') {
            i += 1;
        }
        let digits_start = i;
        while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'.') {
            i += 1;
        }
        if i == digits_start {
            return Ok(None);
        }
        if i < bytes.len() && (bytes[i] == b'e' || bytes[i] == b'E') {
            i += 1;
            if i < bytes.len() && (bytes[i] == b'-' || bytes[i] == b'+') {
                i += 1;
            }
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
        }
        let text = &self.rest()[..i];
        let n = text.parse::<f64>().map_err(|_| self.error(start, format!("\"{text}\" is not a number")))?;
        self.at += i;
        Ok(Some(n))
    }

    /// A parenthesised SQL query, kept as written; quotes and nested
    /// parentheses are respected.
    fn query(&mut self) -> Result<String, MstError> {
        let open = self.at;
        self.at += 1;
        let (mut depth, mut quote) = (1usize, None::<char>);
        let start = self.at;
        for (i, c) in self.rest().char_indices() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '\'' | '"') => quote = Some(c),
                (None, '(') => depth += 1,
                (None, ')') => {
                    depth -= 1;
                    if depth == 0 {
                        let sql = self.text[start..start + i].trim().to_string();
                        self.at = start + i + 1;
                        return Ok(sql);
                    }
                }
                _ => {}
            }
        }
        Err(self.error(open, "this \"(\" is never closed"))
    }

    fn value(&mut self) -> Result<(Value, Span), MstError> {
        self.skip(false);
        let start = self.at;
        let value = match self.peek() {
            Some(c @ ('{' | '[')) => {
                self.at += 1;
                let close = if c == '{' { '}' } else { ']' };
                let mut items = Vec::new();
                if !self.eat(close) {
                    loop {
                        items.push(self.value()?);
                        if self.eat(close) {
                            break;
                        }
                        self.expect(',', &format!("or \"{close}\" between values"))?;
                    }
                }
                if close == '}' {
                    if items.is_empty() {
                        return Err(MstError::at(
                            self.text,
                            start,
                            ErrorKind::Invalid,
                            "an empty set has no value to try".into(),
                        ));
                    }
                    Value::Set(items)
                } else {
                    Value::List(items)
                }
            }
            Some('(') => Value::Query(self.query()?),
            Some('\'') => {
                self.at += 1;
                let end = self.rest().find('\'').ok_or_else(|| self.error(start, "this string is never closed"))?;
                let text = self.rest()[..end].to_string();
                self.at += end + 1;
                Value::Text(text)
            }
            Some(c) if c.is_ascii_digit() || c == '-' || c == '+' || c == '.' => {
                Value::Number(self.number()?.ok_or_else(|| self.error(start, "expected a number"))?)
            }
            Some(c) if c.is_alphabetic() || c == '_' => {
                let (mut word, _) = self.ident().expect("starts with a letter");
                if word == "range" && self.peek() == Some('(') {
                    self.range(start)?
                } else {
                    // A schema-qualified relation: nyc.flights.
                    while self.rest().starts_with('.')
                        && self.rest()[1..].starts_with(|c: char| c.is_alphabetic() || c == '_')
                    {
                        self.at += 1;
                        let (part, _) = self.ident().expect("starts with a letter");
                        word = format!("{word}.{part}");
                    }
                    Value::Word(word)
                }
            }
            _ => {
                let found = self.describe_next();
                return Err(self.error(start, format!("expected a value, found {found}")));
            }
        };
        Ok((value, start..self.at))
    }

    fn range(&mut self, start: usize) -> Result<Value, MstError> {
        self.expect('(', "after range")?;
        let bound = |p: &mut Parser<'_>, which: &str| -> Result<f64, MstError> {
            let at = {
                p.skip(false);
                p.at
            };
            p.number()?.ok_or_else(|| {
                MstError::at(
                    p.text,
                    at,
                    ErrorKind::Syntax,
                    format!("range needs a {which} bound: range(lo, hi[, log])"),
                )
            })
        };
        let lo = bound(self, "lower")?;
        self.expect(',', "between the bounds of range")?;
        let hi = bound(self, "upper")?;
        let scale = if self.eat(',') {
            let (word, span) = self.expect_ident("log, linear or int")?;
            match word.as_str() {
                "log" => Scale::Log,
                "linear" => Scale::Linear,
                "int" => Scale::Int,
                _ => return Err(self.error(span.start, format!("\"{word}\" is not a scale; use log, linear or int"))),
            }
        } else {
            Scale::Linear
        };
        self.expect(')', "to close range")?;
        let invalid = |m: String| MstError::at(self.text, start, ErrorKind::Invalid, m);
        if !(lo.is_finite() && hi.is_finite()) || lo >= hi {
            return Err(invalid(format!("range({lo}, {hi}) is empty: the lower bound must be below the upper")));
        }
        if scale == Scale::Log && lo <= 0.0 {
            return Err(invalid(format!("a log range needs positive bounds, not {lo}")));
        }
        Ok(Value::Range { lo, hi, scale })
    }

    fn assignments(&mut self) -> Result<Vec<Assignment>, MstError> {
        let mut out = Vec::new();
        loop {
            let (key, key_span) = self.expect_ident("a setting name")?;
            let append = self.eat('+');
            self.expect('=', &format!("after \"{key}\""))?;
            let (value, span) = self.value()?;
            out.push(Assignment { key, key_span, value, span, append });
            if !self.eat(',') {
                return Ok(out);
            }
        }
    }

    fn selection(&mut self) -> Result<Selection, MstError> {
        self.skip(false);
        let start = self.at;
        let exclude = self.eat('-');
        let (table, columns) = if self.eat('*') {
            (None, None)
        } else {
            let (first, _) = self.expect_ident("a column or table name")?;
            if self.rest().starts_with('.') {
                self.at += 1;
                if self.eat('*') {
                    (Some(first), None)
                } else if self.eat('{') {
                    let mut names = Vec::new();
                    loop {
                        names.push(self.expect_ident("a column name")?.0);
                        if self.eat('}') {
                            break;
                        }
                        self.expect(',', "or \"}\" between column names")?;
                    }
                    (Some(first), Some(names))
                } else {
                    let (column, _) = self.expect_ident("a column name, \"*\" or \"{\" after \".\"")?;
                    (Some(first), Some(vec![column]))
                }
            } else {
                (None, Some(vec![first]))
            }
        };
        let optional = self.eat('?');
        if exclude && optional {
            return Err(self.error(start, "an excluded column cannot also be optional"));
        }
        Ok(Selection { exclude, table, columns, optional, span: start..self.at })
    }

    fn search(&mut self) -> Result<Search, MstError> {
        let (word, span) = self.expect_ident("grid, random(n) or halving(n)")?;
        let count = |p: &mut Parser<'_>, what: &str| -> Result<u64, MstError> {
            p.skip(false);
            let at = p.at;
            match p.number()? {
                Some(n) if n >= 1.0 && n.fract() == 0.0 => Ok(n as u64),
                _ => Err(MstError::at(
                    p.text,
                    at,
                    ErrorKind::Invalid,
                    format!("{what} must be a whole number, at least 1"),
                )),
            }
        };
        match word.as_str() {
            "grid" => Ok(Search::Grid),
            "random" | "halving" => {
                self.expect('(', &format!("after {word}"))?;
                let n = count(self, "the number of candidates")?;
                let (mut seed, mut eta, mut min_epochs) = (0, 3, None);
                while self.eat(',') {
                    let (key, key_span) = self.expect_ident("seed, eta or min_epochs")?;
                    self.expect('=', &format!("after \"{key}\""))?;
                    match key.as_str() {
                        "seed" => {
                            self.skip(false);
                            let at = self.at;
                            seed = match self.number()? {
                                Some(n) if n >= 0.0 && n.fract() == 0.0 => n as u64,
                                _ => return Err(self.error(at, "seed must be a whole number")),
                            }
                        }
                        "eta" if word == "halving" => {
                            self.skip(false);
                            let at = self.at;
                            eta = count(self, "eta")?;
                            if eta < 2 {
                                return Err(self.error(at, "eta must be at least 2 (keep the best 1/eta at each rung)"));
                            }
                        }
                        "min_epochs" if word == "halving" => min_epochs = Some(count(self, "min_epochs")?),
                        _ => return Err(self.error(key_span.start, format!("{word} takes no setting \"{key}\""))),
                    }
                }
                self.expect(')', &format!("to close {word}"))?;
                Ok(if word == "random" {
                    Search::Random { n, seed }
                } else {
                    Search::Halving { n, eta, seed, min_epochs }
                })
            }
            _ => Err(self.error(span.start, format!("unknown search \"{word}\"; use grid, random(n) or halving(n)"))),
        }
    }

    /// `budget <amount> <unit>`: wall time (s, min, h) or epochs.
    fn budget(&mut self) -> Result<Budget, MstError> {
        self.skip(false);
        let at = self.at;
        let amount = match self.number()? {
            Some(n) if n > 0.0 && n.is_finite() => n,
            Some(_) => return Err(self.error(at, "a budget must be more than zero")),
            None => {
                let found = self.describe_next();
                return Err(self.error(at, format!("expected an amount after budget, found {found}")));
            }
        };
        let Some((unit, span)) = self.ident() else {
            return Err(self.error(self.at, "a budget needs a unit: s, min, h or epochs (e.g. budget 10 min)"));
        };
        let seconds = match unit.as_str() {
            "s" | "sec" | "second" | "seconds" => 1.0,
            "min" | "minute" | "minutes" => 60.0,
            "h" | "hour" | "hours" => 3600.0,
            "epoch" | "epochs" => {
                if amount.fract() != 0.0 {
                    return Err(self.error(at, "an epoch budget is a whole number"));
                }
                return Ok(Budget::Epochs(amount as u64));
            }
            other => {
                return Err(self.error(span.start, format!("unknown budget unit \"{other}\"; use s, min, h or epochs")))
            }
        };
        Ok(Budget::Seconds(amount * seconds))
    }

    /// The end of a clause: a newline, a ";" or the end of the text.
    fn end_clause(&mut self) -> Result<(), MstError> {
        self.skip(true);
        match self.rest().chars().next() {
            None => Ok(()),
            Some('\n') | Some(';') => {
                self.at += 1;
                Ok(())
            }
            Some(_) => {
                let found = self.describe_next();
                Err(self.error(self.at, format!("expected the end of the clause, found {found}")))
            }
        }
    }
}

/// Parses a selection text.
pub fn parse(text: &str) -> Result<Spec, MstError> {
    let mut p = Parser { text, at: 0 };
    let mut spec = Spec::default();
    loop {
        if p.peek().is_none() {
            break;
        }
        if p.eat(';') {
            continue;
        }
        let (clause, span) =
            p.expect_ident("a clause: source, features, encode, model, train, search, budget or promote")?;
        let twice = |p: &Parser<'_>| p.error(span.start, format!("\"{clause}\" is given twice"));
        match clause.as_str() {
            "source" => {
                if spec.source.is_some() {
                    return Err(twice(&p));
                }
                spec.source = Some(p.value()?);
            }
            "features" => loop {
                spec.features.push(p.selection()?);
                if !p.eat(',') {
                    break;
                }
            },
            "encode" => spec.encodings.extend(p.assignments()?),
            "model" => spec.model.extend(p.assignments()?),
            "train" => spec.train.extend(p.assignments()?),
            "search" => {
                if spec.search.is_some() {
                    return Err(twice(&p));
                }
                let start = p.at;
                let search = p.search()?;
                spec.search = Some((search, start..p.at));
            }
            "budget" => {
                if spec.budget.is_some() {
                    return Err(twice(&p));
                }
                let start = p.at;
                let budget = p.budget()?;
                spec.budget = Some((budget, start..p.at));
            }
            "promote" => {
                if spec.promote {
                    return Err(twice(&p));
                }
                spec.promote = true;
            }
            other => {
                return Err(p.error(
                    span.start,
                    format!(
                        "unknown clause \"{other}\"; the clauses are source, features, encode, model, train, search, budget and promote"
                    ),
                ))
            }
        }
        p.end_clause()?;
    }
    spec.check(text)?;
    Ok(spec)
}

/// The JSON an option value stands for (a set or range is not one).
fn to_json(value: &Value) -> Option<Json> {
    Some(match value {
        Value::Number(n) if n.fract() == 0.0 && n.abs() < 9e15 => json!(*n as i64),
        Value::Number(n) => json!(n),
        Value::Word(w) | Value::Text(w) => json!(w),
        Value::List(items) => Json::Array(items.iter().map(|(v, _)| to_json(v)).collect::<Option<_>>()?),
        Value::Set(_) | Value::Range { .. } | Value::Query(_) => return None,
    })
}

/// Every concrete value a value may take, with the span it comes from (a
/// range gives its two bounds), for checking.
fn choices(value: &Value, span: &Span) -> Vec<(Value, Span)> {
    match value {
        Value::Set(items) => items.iter().flat_map(|(v, s)| choices(v, s)).collect(),
        Value::Range { lo, hi, scale } => {
            // The bounds, and a point between them that is not a whole
            // number (as most draws will not be): an integer setting over a
            // linear range fails there.
            let round = |x: f64| if *scale == Scale::Int { x.round() } else { x };
            let mid = if *scale == Scale::Log { (lo * hi).sqrt() } else { lo + (hi - lo) * 0.377 };
            [*lo, *hi, mid].into_iter().map(|x| (Value::Number(round(x)), span.clone())).collect()
        }
        Value::List(items) => {
            // A list with sets inside stands for every list they make.
            let mut lists: Vec<Vec<(Value, Span)>> = vec![Vec::new()];
            for (item, item_span) in items {
                let options = choices(item, item_span);
                lists = lists
                    .into_iter()
                    .flat_map(|l| {
                        options.iter().map(move |o| {
                            let mut l = l.clone();
                            l.push(o.clone());
                            l
                        })
                    })
                    .collect();
                if lists.len() > 10_000 {
                    break;
                }
            }
            lists.into_iter().map(|l| (Value::List(l), span.clone())).collect()
        }
        other => vec![(other.clone(), span.clone())],
    }
}

/// How many values a value stands for in a grid; None for a range.
fn grid_size(value: &Value) -> Option<u128> {
    match value {
        Value::Set(items) => items.iter().map(|(v, _)| grid_size(v)).sum(),
        Value::List(items) => items.iter().map(|(v, _)| grid_size(v)).product(),
        Value::Range { .. } => None,
        _ => Some(1),
    }
}

impl Spec {
    /// Checks every value against the options it sets, at its position.
    fn check(&self, text: &str) -> Result<(), MstError> {
        let invalid = |span: &Span, m: String| MstError::at(text, span.start, ErrorKind::Invalid, m);
        for (clause, keys, other, other_keys) in
            [("model", MODEL_KEYS, "train", TRAIN_KEYS), ("train", TRAIN_KEYS, "model", MODEL_KEYS)]
        {
            let list = if clause == "model" { &self.model } else { &self.train };
            for a in list {
                let key = if a.key == "lr" { "learning_rate" } else { a.key.as_str() };
                if !keys.contains(&key) {
                    let why = if other_keys.contains(&key) {
                        format!("\"{}\" belongs under {other}, not {clause}", a.key)
                    } else {
                        format!("unknown {clause} setting \"{}\"; known: {}", a.key, keys.join(", "))
                    };
                    return Err(invalid(&a.key_span, why));
                }
                if matches!(a.value, Value::Query(_)) {
                    return Err(invalid(&a.span, format!("\"{}\" takes a value, not a query", a.key)));
                }
                if a.append && (key != "hidden" || !matches!(a.value, Value::List(_))) {
                    return Err(invalid(
                        &a.key_span,
                        format!("only a list can be appended to: hidden += [64] adds a layer; \"{}\" takes =", a.key),
                    ));
                }
                for (choice, span) in choices(&a.value, &a.span) {
                    let json =
                        to_json(&choice).ok_or_else(|| invalid(&span, "a set or range cannot nest here".into()))?;
                    TrainOptions::from_json(Some(&json!({ key: json })))
                        .map_err(|e| invalid(&span, option_message(e)))?;
                }
            }
        }
        for a in &self.encodings {
            for (choice, span) in choices(&a.value, &a.span) {
                let json = to_json(&choice).ok_or_else(|| invalid(&span, "an encoding is a name or a width".into()))?;
                let options = json!({ "encodings": { a.key.clone(): json } });
                TrainOptions::from_json(Some(&options)).map_err(|e| invalid(&span, option_message(e)))?;
            }
        }
        if let Some((source, span)) = &self.source {
            for (choice, span) in choices(source, span) {
                if !matches!(choice, Value::Word(_) | Value::Text(_) | Value::Query(_)) {
                    return Err(invalid(&span, "a source is a relation name or a parenthesised query".into()));
                }
            }
        }
        Ok(())
    }

    /// How many candidates the search trains: for a grid every combination
    /// (an error if a range is in it), for random and halving `n`.
    pub fn candidates(&self, text: &str) -> Result<u128, MstError> {
        if let Some(a) = self.model.iter().chain(&self.train).find(|a| a.append) {
            return Err(MstError::at(
                text,
                a.key_span.start,
                ErrorKind::Invalid,
                "\"+=\" changes a parent's setting: it belongs in a change (parent_version, change), not a selection"
                    .into(),
            ));
        }
        match self.search.as_ref().map(|(s, _)| *s).unwrap_or(Search::Grid) {
            Search::Random { n, .. } | Search::Halving { n, .. } => Ok(n as u128),
            Search::Grid => {
                let mut total: u128 = 1;
                let values = self.source.iter().map(|(v, s)| (v, s));
                let assignments =
                    self.encodings.iter().chain(&self.model).chain(&self.train).map(|a| (&a.value, &a.span));
                for (value, span) in values.chain(assignments) {
                    let size = grid_size(value).ok_or_else(|| {
                        MstError::at(
                            text,
                            span.start,
                            ErrorKind::Invalid,
                            "a grid cannot enumerate a range; use search random(n) or halving(n), or a set".into(),
                        )
                    })?;
                    total = total.saturating_mul(size);
                }
                for _ in self.features.iter().filter(|s| s.optional) {
                    total = total.saturating_mul(2);
                }
                Ok(total)
            }
        }
    }
}

/// One concrete triple of a search.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// A relation name or a query; None: the INSERT's own source.
    pub source: Option<Value>,
    /// The feature selections, without the optional groups left out.
    pub features: Vec<Selection>,
    /// `options` for this candidate: model, train and encode settings.
    pub options: serde_json::Map<String, Json>,
}

/// One axis of a search: where its value goes, and the values it takes.
enum Axis {
    Source(Vec<Value>),
    Optional(usize),
    Option { key: String, encoding: bool, choices: Vec<Json>, range: Option<(f64, f64, Scale)> },
}

/// SplitMix64: a small, seeded, portable generator, so a random search
/// draws the same candidates on every machine.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: usize) -> usize {
        (self.unit() * n as f64) as usize % n.max(1)
    }
}

impl Spec {
    fn axes(&self) -> Vec<Axis> {
        let mut axes = Vec::new();
        if let Some((value, span)) = &self.source {
            axes.push(Axis::Source(choices(value, span).into_iter().map(|(v, _)| v).collect()));
        }
        for (i, s) in self.features.iter().enumerate() {
            if s.optional {
                axes.push(Axis::Optional(i));
            }
        }
        let settings =
            self.encodings.iter().map(|a| (a, true)).chain(self.model.iter().chain(&self.train).map(|a| (a, false)));
        for (a, encoding) in settings {
            let key = if a.key == "lr" { "learning_rate".to_string() } else { a.key.clone() };
            let range = match a.value {
                Value::Range { lo, hi, scale } => Some((lo, hi, scale)),
                _ => None,
            };
            let choices = match range {
                Some(_) => Vec::new(),
                None => choices(&a.value, &a.span).iter().filter_map(|(v, _)| to_json(v)).collect(),
            };
            axes.push(Axis::Option { key, encoding, choices, range });
        }
        axes
    }

    /// The candidates the search trains: every combination for a grid (at
    /// most `limit`, else an error saying how many the spec expands to),
    /// `n` seeded draws for random and halving.
    pub fn expand(&self, text: &str, limit: u128) -> Result<Vec<Candidate>, MstError> {
        let total = self.candidates(text)?;
        if total > limit {
            let at = self.search.as_ref().map_or(0, |(_, s)| s.start);
            return Err(MstError::at(
                text,
                at,
                ErrorKind::Invalid,
                format!("this search expands to {total} candidates, more than the {limit} allowed"),
            ));
        }
        let axes = self.axes();
        let base = Candidate { source: None, features: self.features.clone(), options: serde_json::Map::new() };
        let pick = |candidate: &mut Candidate, axis: &Axis, choice: Choice| match (axis, choice) {
            (Axis::Source(values), Choice::Index(i)) => candidate.source = Some(values[i].clone()),
            // Choice 1 leaves the optional group out (marked empty, dropped below).
            (Axis::Optional(f), Choice::Index(1)) => candidate.features[*f].columns = Some(Vec::new()),
            (Axis::Option { key, encoding, choices, .. }, choice) => {
                let value = match choice {
                    Choice::Index(i) => choices[i].clone(),
                    Choice::Drawn(v) => v,
                };
                if *encoding {
                    let map = candidate.options.entry("encodings").or_insert_with(|| json!({}));
                    map.as_object_mut().expect("encodings is an object").insert(key.clone(), value);
                } else {
                    candidate.options.insert(key.clone(), value);
                }
            }
            _ => {}
        };
        let sizes: Vec<usize> = axes
            .iter()
            .map(|a| match a {
                Axis::Source(v) => v.len(),
                Axis::Optional(_) => 2,
                Axis::Option { choices, .. } => choices.len(),
            })
            .collect();
        let mut out = Vec::new();
        match self.search.as_ref().map(|(s, _)| *s).unwrap_or(Search::Grid) {
            Search::Grid => {
                for index in 0..total as usize {
                    let mut c = base.clone();
                    let mut rest = index;
                    for (axis, &size) in axes.iter().zip(&sizes) {
                        pick(&mut c, axis, Choice::Index(rest % size));
                        rest /= size;
                    }
                    out.push(c);
                }
            }
            Search::Random { n, seed } | Search::Halving { n, seed, .. } => {
                let mut rng = SplitMix(seed);
                for _ in 0..n {
                    let mut c = base.clone();
                    for (axis, &size) in axes.iter().zip(&sizes) {
                        let choice = match axis {
                            Axis::Option { range: Some((lo, hi, scale)), .. } => {
                                let u = rng.unit();
                                Choice::Drawn(match scale {
                                    Scale::Linear => json!(lo + u * (hi - lo)),
                                    Scale::Log => json!((lo.ln() + u * (hi.ln() - lo.ln())).exp()),
                                    Scale::Int => json!((lo + u * (hi - lo + 1.0)).floor().min(*hi) as i64),
                                })
                            }
                            _ => Choice::Index(rng.below(size)),
                        };
                        pick(&mut c, axis, choice);
                    }
                    out.push(c);
                }
            }
        }
        // Optional groups left out are dropped, not kept empty.
        for c in &mut out {
            c.features.retain(|s| s.columns.as_ref().is_none_or(|cols| !cols.is_empty()));
        }
        Ok(out)
    }
}

enum Choice {
    Index(usize),
    Drawn(Json),
}

/// How cerebrod runs a selection's candidates, decided at INSERT and kept in
/// `cerebro.selections.plan`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SelectionPlan {
    /// `grid`, `random` or `halving`.
    pub strategy: String,
    /// Halving: at each epoch of `rungs`, a candidate goes on only if its best
    /// validation loss so far is in the best 1/`eta` of those recorded there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rungs: Vec<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_epochs: Option<u64>,
    #[serde(default)]
    pub promote: bool,
}

impl SelectionPlan {
    /// Whether a candidate with best loss `loss` at a rung goes on, given
    /// every best loss recorded at that rung (its own included): the best
    /// ceil(n/eta) go on, so the first to arrive always does (asynchronous
    /// successive halving never waits for a rung to fill).
    pub fn survives(&self, loss: f64, recorded: &[f64]) -> bool {
        let eta = self.eta.unwrap_or(3).max(2) as usize;
        let keep = recorded.len().div_ceil(eta).max(1);
        let better = recorded.iter().filter(|&&l| l < loss).count();
        better < keep
    }
}

/// The epochs at which halving compares candidates: `min`, `min`·eta, ...
/// below `max_epochs`; `min` None picks it so there are three rungs.
pub fn rungs(eta: u64, min: Option<u64>, max_epochs: u32) -> Vec<u32> {
    let eta = eta.max(2);
    let max = u64::from(max_epochs);
    let min = min.unwrap_or_else(|| max.div_ceil(eta.pow(3)).max(1));
    let mut out = Vec::new();
    let mut r = min;
    while r < max {
        out.push(r as u32);
        r = r.saturating_mul(eta);
    }
    out
}

impl Spec {
    /// The plan for this spec's candidates, whose most epochs is `max_epochs`.
    pub fn plan(&self, max_epochs: u32) -> SelectionPlan {
        let search = self.search.as_ref().map(|(s, _)| *s).unwrap_or(Search::Grid);
        let (strategy, rungs, eta) = match search {
            Search::Grid => ("grid", Vec::new(), None),
            Search::Random { .. } => ("random", Vec::new(), None),
            Search::Halving { eta, min_epochs, .. } => {
                ("halving", rungs(eta, min_epochs, max_epochs), Some(eta.min(u64::from(u32::MAX)) as u32))
            }
        };
        let (budget_seconds, budget_epochs) = match self.budget.as_ref().map(|(b, _)| *b) {
            Some(Budget::Seconds(s)) => (Some(s), None),
            Some(Budget::Epochs(e)) => (None, Some(e)),
            None => (None, None),
        };
        SelectionPlan { strategy: strategy.into(), rungs, eta, budget_seconds, budget_epochs, promote: self.promote }
    }
}

/// A derived model's change to its parent (docs/selection.md, "Derived
/// models"): single values only.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Change {
    /// A new source relation.
    pub source: Option<String>,
    /// Selections applied to the parent's features: names and groups are
    /// added, `-name` removed.
    pub features: Vec<Selection>,
    /// Options set (model, train and encode settings).
    pub set: serde_json::Map<String, Json>,
    /// Lists appended to the parent's (`hidden += [64]`).
    pub append: Vec<(String, Json)>,
}

/// Parses a change: the language's clauses, each with one value.
pub fn parse_change(text: &str) -> Result<Change, MstError> {
    let spec = parse(text)?;
    let invalid = |at: usize, m: &str| MstError::at(text, at, ErrorKind::Invalid, m.to_string());
    if let Some((_, span)) = &spec.search {
        return Err(invalid(span.start, "a change has no search: it makes one model"));
    }
    if let Some((_, span)) = &spec.budget {
        return Err(invalid(span.start, "a change has no budget: it makes one model"));
    }
    if spec.promote {
        return Err(invalid(0, "a change has no promote: deploy the new version with cerebro.deploy"));
    }
    let single = "a change takes one value; to try several, run a selection (spec)";
    if let Some(s) = spec.features.iter().find(|s| s.optional) {
        return Err(invalid(s.span.start, single));
    }
    let mut change = Change { features: spec.features.clone(), ..Change::default() };
    if let Some((value, span)) = &spec.source {
        change.source = match value {
            Value::Word(w) | Value::Text(w) => Some(w.clone()),
            Value::Query(q) => Some(format!("({q})")),
            _ => return Err(invalid(span.start, single)),
        };
    }
    let settings =
        spec.encodings.iter().map(|a| (a, true)).chain(spec.model.iter().chain(&spec.train).map(|a| (a, false)));
    for (a, encoding) in settings {
        if grid_size(&a.value) != Some(1) {
            return Err(invalid(a.span.start, single));
        }
        let json = to_json(&a.value).ok_or_else(|| invalid(a.span.start, single))?;
        let key = if a.key == "lr" { "learning_rate".to_string() } else { a.key.clone() };
        if encoding {
            let map = change.set.entry("encodings").or_insert_with(|| json!({}));
            map.as_object_mut().expect("encodings is an object").insert(key, json);
        } else if a.append {
            change.append.push((key, json));
        } else {
            change.set.insert(key, json);
        }
    }
    Ok(change)
}

/// The text a spec stands for: `default` is [`DEFAULT_SPEC`].
pub fn resolve(text: &str) -> &str {
    if text.trim().eq_ignore_ascii_case("default") {
        DEFAULT_SPEC
    } else {
        text
    }
}

/// An option error's message, in the language's terms.
fn option_message(e: SpecError) -> String {
    e.to_string().replace("option \"learning_rate\"", "\"lr\" (learning_rate)")
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "\
source   {flights, (SELECT f.*, w.temp FROM flights f JOIN weather w USING (origin, hour) WHERE f.note <> ')')}
features flights.*, weather.{temp, precip}?, -tailnum
encode   dep_time = ple, carrier = {onehot, embedding, 8}
model    hidden = {[64, 32], [{128, 256}, 64]}, activation = {relu, gelu}, dropout = {0, 0.1}
train    lr = {1e-3, 3e-4}, batch_size = {256, 512}, epochs = 30  -- a comment
search   grid
";

    #[test]
    fn parses_every_clause_and_counts_the_grid() {
        let spec = parse(EXAMPLE).unwrap();
        let Some((Value::Set(sources), _)) = &spec.source else { panic!("{:?}", spec.source) };
        assert_eq!(sources.len(), 2);
        let Value::Query(sql) = &sources[1].0 else { panic!() };
        assert!(sql.starts_with("SELECT f.*") && sql.ends_with("<> ')'"), "{sql}");
        assert_eq!(spec.features.len(), 3);
        assert_eq!(spec.features[1].columns, Some(vec!["temp".into(), "precip".into()]));
        assert!(spec.features[1].optional && spec.features[2].exclude);
        assert_eq!(spec.features[0].table.as_deref(), Some("flights"));
        // 2 sources × 3 carrier encodings × 3 hidden × 2 activations × 2
        // dropouts × 2 lr × 2 batch sizes × 2 (optional weather group).
        assert_eq!(spec.candidates(EXAMPLE).unwrap(), 2 * 3 * 3 * 2 * 2 * 2 * 2 * 2);
        assert_eq!(spec.search.as_ref().map(|s| s.0), Some(Search::Grid));
    }

    #[test]
    fn ranges_need_a_random_or_halving_search() {
        let text = "model hidden = [64]\ntrain lr = range(1e-4, 1e-2, log), epochs = range(5, 50, int)\nsearch random(20, seed = 7)";
        let spec = parse(text).unwrap();
        assert_eq!(spec.candidates(text).unwrap(), 20);
        let grid = "train lr = range(1e-4, 1e-2, log)";
        let err = parse(grid).unwrap().candidates(grid).unwrap_err();
        assert!(err.message.contains("a grid cannot enumerate a range"), "{err}");
        assert_eq!((err.line, err.column), (1, 12));
    }

    fn error(text: &str) -> MstError {
        parse(text).expect_err(text)
    }

    #[test]
    fn bad_specs_say_what_and_where() {
        let e = error("features flights.*,\n");
        assert_eq!((e.kind, e.line, e.column), (ErrorKind::Syntax, 2, 1), "{e}");
        assert_eq!(e.message, "expected a column or table name, found the end of the text");

        let e = error("train lr = {}");
        assert_eq!((e.kind, e.column), (ErrorKind::Invalid, 12));
        assert_eq!(e.message, "an empty set has no value to try");
        assert_eq!(e.snippet, "train lr = {}\n           ^");

        let e = error("train lr = {1e-3, -0.01}");
        assert_eq!((e.kind, e.column), (ErrorKind::Invalid, 19), "{e}");
        assert!(e.message.contains("learning_rate") && e.message.contains("-0.01"), "{e}");

        let e = error("train lr = range(1e-4)");
        assert!(e.message.contains("expected \",\" between the bounds of range"), "{e}");
        let e = error("train lr = range(, 1)");
        assert!(e.message.contains("range needs a lower bound"), "{e}");
        let e = error("train lr = range(0.1, 0.01)");
        assert!(e.message.contains("is empty"), "{e}");
        let e = error("train lr = range(0, 1, log)");
        assert!(e.message.contains("positive bounds"), "{e}");

        let e = error("model lr = 0.1");
        assert_eq!(e.message, "\"lr\" belongs under train, not model");
        let e = error("train hiden = [64]");
        assert!(e.message.starts_with("unknown train setting \"hiden\""), "{e}");
        let e = error("modle hidden = [64]");
        assert!(e.message.starts_with("unknown clause \"modle\""), "{e}");
        let e = error("model activation = {relu, swish}");
        assert_eq!(e.column, 27, "{e}");
        let e = error("source (SELECT * FROM t");
        assert_eq!((e.column, e.message.as_str()), (8, "this \"(\" is never closed"));
        let e = error("search random(0)");
        assert!(e.message.contains("at least 1"), "{e}");
        let e = error("encode carrier = wide");
        assert!(e.message.contains("encodings"), "{e}");
        let e = error("train epochs = 3 4");
        assert!(e.message.contains("expected the end of the clause"), "{e}");
    }

    #[test]
    fn a_grid_expands_to_every_combination_and_a_random_search_repeats() {
        let text = "features a, b.{x, y}?\nmodel hidden = {[8], [16, 8]}\ntrain lr = {0.01, 0.001}, epochs = 3";
        let spec = parse(text).unwrap();
        let all = spec.expand(text, 100).unwrap();
        assert_eq!(all.len(), 8);
        let distinct: std::collections::BTreeSet<String> =
            all.iter().map(|c| format!("{:?}{:?}", c.options, c.features.len())).collect();
        assert_eq!(distinct.len(), 8, "every combination once");
        assert!(all.iter().all(|c| c.options["epochs"] == 3));
        let err = spec.expand(text, 7).unwrap_err();
        assert_eq!(err.message, "this search expands to 8 candidates, more than the 7 allowed");

        let text = "model dropout = range(0, 0.5)\ntrain lr = range(1e-4, 1e-2, log), epochs = range(5, 50, int)\n\
                    search random(50, seed = 3)";
        let spec = parse(text).unwrap();
        let (a, b) = (spec.expand(text, 1000).unwrap(), spec.expand(text, 1000).unwrap());
        assert_eq!(a, b, "the same seed draws the same candidates");
        for c in &a {
            let lr = c.options["learning_rate"].as_f64().unwrap();
            let epochs = c.options["epochs"].as_u64().expect("a whole number of epochs");
            let dropout = c.options["dropout"].as_f64().unwrap();
            assert!((1e-4..=1e-2).contains(&lr) && (5..=50).contains(&epochs) && (0.0..0.5).contains(&dropout));
            TrainOptions::from_json(Some(&Json::Object(c.options.clone()))).expect("valid options");
        }
        let err = parse("train epochs = range(5, 50)\nsearch random(3)").unwrap_err();
        assert!(err.message.contains("epochs"), "{err}");
    }

    #[test]
    fn a_huge_grid_is_counted_not_built() {
        let sets: Vec<String> = (0..6)
            .map(|i| format!("{{{}}}", (1..=10).map(|v| (v * 10 + i).to_string()).collect::<Vec<_>>().join(", ")))
            .collect();
        let text = format!("model hidden = [{}]", sets.join(", "));
        let spec = parse(&text).unwrap();
        assert_eq!(spec.candidates(&text).unwrap(), 1_000_000);
    }

    #[test]
    fn halving_budgets_and_promotion_make_the_plan() {
        let text = "train epochs = 30\nsearch halving(27, eta = 3, seed = 2)\nbudget 10 min\npromote";
        let spec = parse(text).unwrap();
        let plan = spec.plan(30);
        assert_eq!(plan.strategy, "halving");
        assert_eq!(plan.rungs, vec![2, 6, 18], "three rungs below 30 epochs");
        assert_eq!(
            (plan.eta, plan.budget_seconds, plan.budget_epochs, plan.promote),
            (Some(3), Some(600.0), None, true)
        );
        let plan = parse("search halving(8, eta = 2, min_epochs = 5)\nbudget 200 epochs").unwrap().plan(40);
        assert_eq!((plan.rungs, plan.budget_epochs), (vec![5, 10, 20], Some(200)));
        assert_eq!(parse("budget 1.5 h").unwrap().plan(10).budget_seconds, Some(5400.0));
        assert_eq!(
            parse("model hidden = [8]").unwrap().plan(10),
            SelectionPlan { strategy: "grid".into(), ..Default::default() }
        );

        let spec = parse("source {nyc.flights_known, nyc.flights_joined}").unwrap();
        let sources: Vec<_> = spec.expand("", 10).unwrap().into_iter().map(|c| c.source).collect();
        assert_eq!(
            sources,
            vec![Some(Value::Word("nyc.flights_known".into())), Some(Value::Word("nyc.flights_joined".into()))]
        );
        let e = error("budget 10");
        assert!(e.message.contains("needs a unit"), "{e}");
        let e = error("budget 10 weeks");
        assert!(e.message.contains("unknown budget unit \"weeks\""), "{e}");
        let e = error("budget -1 s");
        assert!(e.message.contains("more than zero") || e.message.contains("expected an amount"), "{e}");
        let e = error("budget 2.5 epochs");
        assert!(e.message.contains("whole number"), "{e}");
        let e = error("search halving(9, eta = 1)");
        assert!(e.message.contains("eta must be at least 2"), "{e}");
        let e = error("search random(9, min_epochs = 2)");
        assert!(e.message.contains("random takes no setting \"min_epochs\""), "{e}");
        let e = error("promote\npromote");
        assert!(e.message.contains("given twice"), "{e}");
    }

    #[test]
    fn a_rung_keeps_the_best_third_and_never_waits() {
        let plan = SelectionPlan { strategy: "halving".into(), eta: Some(3), ..Default::default() };
        assert!(plan.survives(0.5, &[0.5]), "the first to arrive goes on");
        let six = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6];
        let kept: Vec<f64> = six.iter().copied().filter(|&l| plan.survives(l, &six)).collect();
        assert_eq!(kept, vec![0.1, 0.2]);
        assert!(!plan.survives(0.4, &[0.4, 0.3, 0.2]));
        assert!(plan.survives(0.2, &[0.4, 0.3, 0.2]));
    }

    #[test]
    fn the_default_selection_is_valid_and_bounded() {
        assert_eq!(resolve(" DEFAULT "), DEFAULT_SPEC);
        assert_eq!(resolve("model hidden = [8]"), "model hidden = [8]");
        let spec = parse(DEFAULT_SPEC).unwrap();
        let candidates = spec.expand(DEFAULT_SPEC, 100).unwrap();
        assert_eq!(candidates.len(), 24);
        let plan = spec.plan(40);
        assert_eq!((plan.strategy.as_str(), plan.budget_seconds), ("halving", Some(600.0)));
        for c in &candidates {
            TrainOptions::from_json(Some(&Json::Object(c.options.clone()))).expect("valid options");
        }
    }

    #[test]
    fn a_change_takes_single_values_and_appends_layers() {
        let c = parse_change(
            "source nyc.flights_joined\nfeatures -tailnum, weather.{temp}\nmodel hidden += [64]\ntrain lr = 3e-4",
        )
        .unwrap();
        assert_eq!(c.source.as_deref(), Some("nyc.flights_joined"));
        assert_eq!(c.features.len(), 2);
        assert!(c.features[0].exclude);
        assert_eq!(c.append, vec![("hidden".to_string(), json!([64]))]);
        assert_eq!(c.set["learning_rate"], json!(3e-4));
        let c = parse_change("encode contract = embedding").unwrap();
        assert_eq!(c.set["encodings"], json!({"contract": "embedding"}));

        for (text, message) in [
            ("train lr = {1e-3, 3e-4}", "a change takes one value"),
            ("features weather.{temp}?", "a change takes one value"),
            ("search random(3)", "a change has no search"),
            ("budget 5 min", "a change has no budget"),
            ("train lr += [1]", "only a list can be appended to"),
        ] {
            let e = parse_change(text).unwrap_err();
            assert!(e.message.starts_with(message), "{text}: {e}");
        }
        let text = "model hidden += [64]";
        let e = parse(text).unwrap().candidates(text).unwrap_err();
        assert!(e.message.contains("belongs in a change"), "{e}");
    }
}
