//! What a training request may say, and the validated types it becomes.
//!
//! The extension turns an `INSERT INTO cerebro.models` row into these types
//! before anything is queued; the daemon reads the same types back from the
//! catalog. Validation lives here so both sides and plain unit tests agree.
//! The training options, their wire type [`WrittenOptions`] and their
//! validated type [`TrainOptions`], are in `spec/options.rs`, re-exported here.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

mod options;
pub use options::*;

/// Classification targets with more distinct values than this are refused:
/// they are almost always a regression target or an identifier.
pub const MAX_CLASSES: usize = 200;
pub const MAX_NAME_LEN: usize = 63;

/// Most bytes of an `options` JSON text ([`parse_options_text`]): a
/// thousand columns' encodings take a few tens of KiB.
pub const MAX_OPTIONS_BYTES: usize = 1 << 20;
/// How deep an `options` JSON text may nest. Real options nest 2 levels
/// (`{"encodings": {...}}`); serde_json refuses 128, which a backend's stack
/// may not reach safely.
pub const MAX_OPTIONS_DEPTH: usize = 32;

/// How a categorical NULL is presented to the ONNX artifact: a string input
/// equal to this marker is the NULL category.
pub const NULL_CATEGORY: &str = "\u{1}NULL";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Binary,
    Multiclass,
    Regression,
}

impl Task {
    pub fn as_str(self) -> &'static str {
        match self {
            Task::Binary => "binary",
            Task::Multiclass => "multiclass",
            Task::Regression => "regression",
        }
    }

    pub fn is_classification(self) -> bool {
        !matches!(self, Task::Regression)
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The task a user asked for: a fixed one, or `auto` (decided from the target).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskChoice {
    Auto,
    Fixed(Task),
}

impl FromStr for TaskChoice {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(TaskChoice::Auto),
            "binary" => Ok(TaskChoice::Fixed(Task::Binary)),
            "multiclass" => Ok(TaskChoice::Fixed(Task::Multiclass)),
            "regression" => Ok(TaskChoice::Fixed(Task::Regression)),
            _ => Err(SpecError::UnknownTask(s.to_owned())),
        }
    }
}

/// How a source column's SQL type is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqlKind {
    Integer,
    Real,
    Text,
    Boolean,
}

impl SqlKind {
    /// Classifies a PostgreSQL type by `pg_type.typcategory` and `typname`;
    /// `None` for types Cerebro cannot use (dates, arrays, json, ...).
    pub fn classify(typcategory: char, typname: &str) -> Option<SqlKind> {
        match (typcategory, typname) {
            ('N', "int2" | "int4" | "int8") => Some(SqlKind::Integer),
            ('N', "float4" | "float8" | "numeric") => Some(SqlKind::Real),
            ('S', _) | ('E', _) => Some(SqlKind::Text),
            ('B', _) => Some(SqlKind::Boolean),
            _ => None,
        }
    }

    pub fn feature_kind(self) -> FeatureKind {
        match self {
            SqlKind::Integer | SqlKind::Real => FeatureKind::Numeric,
            SqlKind::Text | SqlKind::Boolean => FeatureKind::Categorical,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeatureKind {
    /// Standardised; NULLs imputed with the mean plus an indicator.
    Numeric,
    /// One-hot over the training vocabulary; NULL is its own category and
    /// values never seen in training contribute nothing.
    Categorical,
}

impl FeatureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FeatureKind::Numeric => "numeric",
            FeatureKind::Categorical => "categorical",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Feature {
    pub name: String,
    pub kind: FeatureKind,
}

/// A number as messages show it: plainly, or with an exponent when it is
/// very large or very small (`1e300`, not three hundred zeros).
pub fn show_number(x: f64) -> String {
    if x != 0.0 && x.is_finite() && !(1e-6..1e16).contains(&x.abs()) {
        format!("{x:e}")
    } else {
        x.to_string()
    }
}

/// Parses an `options` JSON text (as a backend reads it from jsonb) into a
/// value for [`TrainOptions::from_json`], within limits: at most
/// [`MAX_OPTIONS_BYTES`] bytes and [`MAX_OPTIONS_DEPTH`] levels of arrays and
/// objects (see [`parse_json_within`]).
pub fn parse_options_text(text: &str) -> Result<Value, SpecError> {
    parse_json_within(text, MAX_OPTIONS_BYTES, MAX_OPTIONS_DEPTH).map_err(SpecError::OptionsText)
}

/// Parses a JSON text of at most `max_bytes` bytes and `max_depth` levels of
/// arrays and objects, or says precisely why not ("number out of range at
/// line 1 column 16", "nested more than 32 levels deep at line 1 column
/// 33"). The depth is checked by a scan of the brackets before serde_json
/// runs, so a deep text costs no stack at all; a number JSON cannot hold
/// (`1e400`) is an error that says where, like any other malformed text.
pub fn parse_json_within(text: &str, max_bytes: usize, max_depth: usize) -> Result<Value, String> {
    if text.len() > max_bytes {
        return Err(format!("the text is {} bytes long, more than the {max_bytes} allowed", text.len()));
    }
    if let Some(at) = nesting_past(text.as_bytes(), max_depth) {
        let (line, column) = line_and_column(text, at);
        return Err(format!("nested more than {max_depth} levels deep at line {line} column {column}"));
    }
    serde_json::from_str(text).map_err(|e| e.to_string())
}

/// Where a JSON text first opens more than `most` arrays and objects, not
/// counting brackets inside strings; None if it never does. Malformed text
/// is left for the JSON parser to describe.
fn nesting_past(json: &[u8], most: usize) -> Option<usize> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, &b) in json.iter().enumerate() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > most {
                    return Some(i);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

/// The 1-based line and column (in characters) of byte `at` of `text`, as
/// serde_json reports positions.
fn line_and_column(text: &str, at: usize) -> (usize, usize) {
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Model names are identifiers people type in WHERE clauses: keep them plain.
pub fn validate_model_name(name: &str) -> Result<(), SpecError> {
    let bad = |reason: &'static str| Err(SpecError::InvalidName { name: name.to_owned(), reason });
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("it is longer than 63 bytes");
    }
    if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return bad("it must start with a letter");
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        return bad("only letters, digits, '_' and '-' are allowed");
    }
    Ok(())
}

/// Decides the task from what the user asked for, the target's SQL type and
/// its number of distinct non-NULL values.
pub fn resolve_task(choice: TaskChoice, target: &str, kind: SqlKind, distinct: usize) -> Result<Task, SpecError> {
    let classification = |requested: Option<Task>| -> Result<Task, SpecError> {
        if distinct < 2 {
            return Err(SpecError::SingleClass { target: target.to_owned(), distinct });
        }
        if distinct > MAX_CLASSES {
            return Err(SpecError::TooManyClasses { target: target.to_owned(), distinct });
        }
        match requested {
            Some(Task::Binary) if distinct > 2 => Err(SpecError::TaskMismatch {
                target: target.to_owned(),
                task: Task::Binary,
                why: format!("it has {distinct} distinct values"),
            }),
            Some(t) => Ok(t),
            None if distinct == 2 => Ok(Task::Binary),
            None => Ok(Task::Multiclass),
        }
    };
    match choice {
        TaskChoice::Fixed(Task::Regression) => match kind {
            SqlKind::Integer | SqlKind::Real if distinct >= 2 => Ok(Task::Regression),
            SqlKind::Integer | SqlKind::Real => Err(SpecError::SingleClass { target: target.to_owned(), distinct }),
            _ => Err(SpecError::TaskMismatch {
                target: target.to_owned(),
                task: Task::Regression,
                why: "it is not numeric".into(),
            }),
        },
        TaskChoice::Fixed(t) => classification(Some(t)),
        TaskChoice::Auto if kind == SqlKind::Real => {
            if distinct < 2 {
                Err(SpecError::SingleClass { target: target.to_owned(), distinct })
            } else {
                Ok(Task::Regression)
            }
        }
        TaskChoice::Auto => classification(None),
    }
}

/// Everything the daemon needs to train one model version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingPlan {
    pub task: Task,
    pub target: String,
    pub features: Vec<Feature>,
    /// Classification: the labels in the target's sort order; the positive
    /// class of a binary model is the second. Empty for regression.
    pub class_labels: Vec<String>,
    pub options: TrainOptions,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpecError {
    #[error("invalid model name \"{name}\": {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("options must be a JSON object")]
    OptionsNotObject,
    /// An options text that is not JSON, or is past a limit of
    /// [`parse_options_text`]; says what and where.
    #[error("options: {0}")]
    OptionsText(String),
    #[error("unknown option \"{0}\"")]
    UnknownOption(String),
    #[error("option \"{key}\" must be {expected}")]
    OptionType { key: String, expected: Cow<'static, str> },
    #[error("option \"{key}\" is {value}, allowed: {allowed}")]
    OptionRange { key: String, value: String, allowed: String },
    #[error("option \"encodings\" names column \"{0}\", which is not a feature of this model")]
    UnknownEncodedColumn(String),
    #[error(
        "option \"encodings\" gives {} column \"{column}\" the {} encoding {}",
        kind.as_str(),
        if encoding.is_numeric() { "numeric" } else { "categorical" },
        serde_json::Value::from(*encoding)
    )]
    EncodingKind { column: String, kind: FeatureKind, encoding: ColumnEncoding },
    #[error("option \"{key}\" does not apply to a {task} model")]
    OptionTask { key: &'static str, task: Task },
    #[error("option \"class_weights\" names label \"{label}\", which the target does not have")]
    UnknownLabel { label: String, labels: Vec<String> },
    /// `target_transform = "log"` over a target that is not always > 0.
    #[error(
        "option \"target_transform\" is \"log\", but target column \"{target}\" has values that are not greater than 0 (the smallest is {smallest}); ln(y) needs every target > 0"
    )]
    TargetNotPositive { target: String, smallest: String },
    #[error("unknown task \"{0}\"")]
    UnknownTask(String),
    #[error(
        "target column \"{target}\" has {distinct} distinct non-NULL value(s); at least 2 are needed to learn anything"
    )]
    SingleClass { target: String, distinct: usize },
    #[error("target column \"{target}\" has {distinct} distinct values, more than the {MAX_CLASSES} classes a classifier may have")]
    TooManyClasses { target: String, distinct: usize },
    #[error("target column \"{target}\" cannot be used for task {task}: {why}")]
    TaskMismatch { target: String, task: Task, why: String },
}

impl SpecError {
    /// A hint for the user, where one helps.
    pub fn hint(&self) -> Option<String> {
        match self {
            SpecError::UnknownOption(_) => Some(format!("Known options: {}.", OPTION_KEYS.join(", "))),
            SpecError::UnknownTask(_) => Some("Use binary, multiclass, regression or auto.".into()),
            SpecError::TooManyClasses { .. } => {
                Some("For a numeric target set task to 'regression'; an identifier cannot be a target.".into())
            }
            SpecError::SingleClass { distinct: 0, .. } => {
                Some("Every row's target is NULL: check the source's filter, or the target column's name.".into())
            }
            SpecError::SingleClass { .. } => Some("Check the source's filter: every row has the same label.".into()),
            SpecError::EncodingKind { .. } => Some(
                "Numeric columns take standard, quantile, ple, robust or periodic; text, boolean and integer columns \
                 take category, onehot, embedding or a width (an integer column so encoded is a category)."
                    .into(),
            ),
            SpecError::UnknownLabel { labels, .. } => Some(format!("The labels are: {}.", labels.join(", "))),
            SpecError::TargetNotPositive { .. } => Some(
                "Use \"auto\" (log only for a positive, right-skewed target), \"standardize\" or \"none\", or shift the target above 0."
                    .into(),
            ),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_text_is_parsed_within_limits() {
        let v = parse_options_text(r#"{"epochs": 3, "encodings": {"city": 8}}"#).unwrap();
        assert_eq!(TrainOptions::from_json(Some(&v)).unwrap().epochs, 3);
        assert_eq!(
            parse_options_text(r#"{"epochs": 1e400}"#).unwrap_err().to_string(),
            "options: number out of range at line 1 column 16"
        );
        let deep = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(
            parse_options_text(&deep).unwrap_err(),
            SpecError::OptionsText("nested more than 32 levels deep at line 1 column 33".into())
        );
        let deep = format!("{{\n \"a\": {}1{}}}", "{\"b\": ".repeat(200), "}".repeat(200));
        assert_eq!(
            parse_options_text(&deep).unwrap_err().to_string(),
            "options: nested more than 32 levels deep at line 2 column 193"
        );
        // Brackets in strings, escaped quotes included, are not nesting.
        let text = format!(r#"{{"a\"[": "{}\"{}"}}"#, "[".repeat(100), "{".repeat(100));
        assert_eq!(parse_options_text(&text).unwrap()["a\"["].as_str().map(str::len), Some(201));
        let big = format!(r#"{{"a": "{}"}}"#, "x".repeat(MAX_OPTIONS_BYTES));
        assert!(parse_options_text(&big).unwrap_err().to_string().contains("more than the 1048576 allowed"));
        assert!(matches!(parse_options_text("{"), Err(SpecError::OptionsText(_))));
        assert!(matches!(parse_options_text(""), Err(SpecError::OptionsText(_))));
        // serde_json reads "-0" as the float -0.0: like 3.0, not an integer (jsonb writes it 0).
        let minus_zero = parse_options_text(r#"{"seed": -0}"#).unwrap();
        assert_eq!(
            TrainOptions::from_json(Some(&minus_zero)).unwrap_err().to_string(),
            "option \"seed\" must be a non-negative integer"
        );
        // Exactly 32 levels parse.
        let ok = format!("{}1{}", "[".repeat(MAX_OPTIONS_DEPTH), "]".repeat(MAX_OPTIONS_DEPTH));
        assert!(parse_options_text(&ok).is_ok());
    }

    #[test]
    fn model_names() {
        for ok in ["churn", "Churn_v2", "a-b"] {
            validate_model_name(ok).unwrap();
        }
        for bad in ["", "2churn", "churn model", "x;drop", &"a".repeat(64)] {
            assert!(matches!(validate_model_name(bad), Err(SpecError::InvalidName { .. })), "{bad}");
        }
    }

    #[test]
    fn tasks_resolve_from_the_target() {
        let t = |c, k, d| resolve_task(c, "y", k, d);
        assert_eq!(t(TaskChoice::Auto, SqlKind::Text, 2), Ok(Task::Binary));
        assert_eq!(t(TaskChoice::Auto, SqlKind::Boolean, 2), Ok(Task::Binary));
        assert_eq!(t(TaskChoice::Auto, SqlKind::Integer, 5), Ok(Task::Multiclass));
        assert_eq!(t(TaskChoice::Auto, SqlKind::Real, 500), Ok(Task::Regression));
        assert_eq!(t(TaskChoice::Fixed(Task::Regression), SqlKind::Integer, 500), Ok(Task::Regression));
        assert!(matches!(t(TaskChoice::Auto, SqlKind::Text, 1), Err(SpecError::SingleClass { .. })));
        assert!(matches!(t(TaskChoice::Auto, SqlKind::Real, 1), Err(SpecError::SingleClass { .. })));
        assert!(matches!(t(TaskChoice::Auto, SqlKind::Integer, 5000), Err(SpecError::TooManyClasses { .. })));
        assert!(matches!(t(TaskChoice::Fixed(Task::Binary), SqlKind::Text, 3), Err(SpecError::TaskMismatch { .. })));
        assert!(matches!(
            t(TaskChoice::Fixed(Task::Regression), SqlKind::Text, 3),
            Err(SpecError::TaskMismatch { .. })
        ));
        assert_eq!("AUTO".parse::<TaskChoice>(), Ok(TaskChoice::Auto));
        assert!("ranking".parse::<TaskChoice>().is_err());
    }

    #[test]
    fn sql_types_classify() {
        assert_eq!(SqlKind::classify('N', "int4"), Some(SqlKind::Integer));
        assert_eq!(SqlKind::classify('N', "numeric"), Some(SqlKind::Real));
        assert_eq!(SqlKind::classify('S', "varchar"), Some(SqlKind::Text));
        assert_eq!(SqlKind::classify('B', "bool"), Some(SqlKind::Boolean));
        assert_eq!(SqlKind::classify('D', "date"), None);
        assert_eq!(SqlKind::classify('N', "oid"), None);
    }
}
