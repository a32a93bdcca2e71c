//! What a training request may say, and the validated types it becomes.
//!
//! The extension turns an `INSERT INTO cerebro.models` row into these types
//! before anything is queued; the daemon reads the same types back from the
//! catalog. Validation lives here so both sides and plain unit tests agree.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Classification targets with more distinct values than this are refused:
/// they are almost always a regression target or an identifier.
pub const MAX_CLASSES: usize = 200;
pub const MAX_HIDDEN_LAYERS: usize = 8;
pub const MAX_LAYER_WIDTH: u32 = 4096;
pub const MAX_NAME_LEN: usize = 63;
/// The most epochs one model trains (and the most halving's `min_epochs`).
pub const MAX_EPOCHS: u32 = 100_000;
pub const MAX_BATCH_SIZE: u32 = 65_536;
pub const MAX_CATEGORIES: u32 = 100_000;

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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Feature {
    pub name: String,
    pub kind: FeatureKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Optimizer {
    /// Adam; `weight_decay` is an L2 penalty added to the gradient.
    Adam,
    /// Adam with decoupled weight decay.
    AdamW,
    /// Stochastic gradient descent with momentum; `weight_decay` is L2.
    Sgd,
}

/// The nonlinearity after every hidden layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    #[default]
    Relu,
    /// GELU, tanh approximation.
    Gelu,
    /// SiLU (swish): `x · sigmoid(x)`.
    Silu,
    Tanh,
}

/// Normalisation after every hidden dense layer, before its activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Norm {
    #[default]
    None,
    Batch,
    Layer,
}

/// How a numeric column becomes inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NumericEncoding {
    /// `(x - mean) / std`.
    Standard,
    /// The value's position in the training distribution, from -0.5 to 0.5
    /// (piecewise linear between `bins` quantiles).
    Quantile,
    /// Piecewise-linear encoding: one input per quantile bin, 0 below the
    /// bin, 1 above it, linear inside.
    Ple,
}

/// How a categorical column becomes inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CategoricalEncoding {
    OneHot,
    /// A learnt vector of this many values per category.
    Embedding(u32),
}

/// Per-class weights of a classifier's loss. Stored as written:
/// `"none"`, `"balanced"` or `{"label": weight, ...}`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(into = "Value", try_from = "Value")]
pub enum ClassWeights {
    #[default]
    None,
    /// Inversely proportional to each class's share of the training rows.
    Balanced,
    /// By label; labels not named weigh 1.
    Explicit(BTreeMap<String, f64>),
}

/// A regression model's training loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegressionLoss {
    #[default]
    Mse,
    Huber,
}

/// An encoding named for one column in `encodings`. Stored as written: a
/// name, or an embedding width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "Value", try_from = "Value")]
pub enum ColumnEncoding {
    Standard,
    Quantile,
    Ple,
    OneHot,
    Embedding(Option<u32>),
}

impl From<ColumnEncoding> for Value {
    fn from(e: ColumnEncoding) -> Value {
        match e {
            ColumnEncoding::Standard => "standard".into(),
            ColumnEncoding::Quantile => "quantile".into(),
            ColumnEncoding::Ple => "ple".into(),
            ColumnEncoding::OneHot => "onehot".into(),
            ColumnEncoding::Embedding(None) => "embedding".into(),
            ColumnEncoding::Embedding(Some(d)) => d.into(),
        }
    }
}

impl TryFrom<Value> for ColumnEncoding {
    type Error = String;
    fn try_from(v: Value) -> Result<Self, String> {
        ColumnEncoding::parse(&v).ok_or_else(|| format!("not a column encoding: {v}"))
    }
}

impl From<ClassWeights> for Value {
    fn from(w: ClassWeights) -> Value {
        match w {
            ClassWeights::None => "none".into(),
            ClassWeights::Balanced => "balanced".into(),
            ClassWeights::Explicit(map) => map.into_iter().map(|(k, v)| (k, Value::from(v))).collect(),
        }
    }
}

impl TryFrom<Value> for ClassWeights {
    type Error = String;
    fn try_from(v: Value) -> Result<Self, String> {
        ClassWeights::parse(&v).ok_or_else(|| format!("not class weights: {v}"))
    }
}

impl ClassWeights {
    fn parse(v: &Value) -> Option<ClassWeights> {
        match v {
            Value::String(s) if s == "none" => Some(ClassWeights::None),
            Value::String(s) if s == "balanced" => Some(ClassWeights::Balanced),
            Value::Object(obj) => obj
                .iter()
                .map(|(label, w)| w.as_f64().filter(|w| w.is_finite()).map(|w| (label.clone(), w)))
                .collect::<Option<_>>()
                .map(ClassWeights::Explicit),
            _ => None,
        }
    }
}

impl ColumnEncoding {
    fn parse(v: &Value) -> Option<ColumnEncoding> {
        if let Some(dim) = v.as_u64() {
            return u32::try_from(dim).ok().map(|d| ColumnEncoding::Embedding(Some(d)));
        }
        match v.as_str()? {
            "standard" => Some(ColumnEncoding::Standard),
            "quantile" => Some(ColumnEncoding::Quantile),
            "ple" => Some(ColumnEncoding::Ple),
            "onehot" => Some(ColumnEncoding::OneHot),
            "embedding" => Some(ColumnEncoding::Embedding(None)),
            _ => None,
        }
    }

    fn is_numeric(self) -> bool {
        matches!(self, ColumnEncoding::Standard | ColumnEncoding::Quantile | ColumnEncoding::Ple)
    }
}

/// The embedding width for a column with `vocabulary` categories:
/// `min(32, round(1.6 · vocabulary^0.56))`, at least 2.
pub fn embedding_dim(vocabulary: usize) -> usize {
    ((1.6 * (vocabulary.max(1) as f64).powf(0.56)).round() as usize).clamp(2, 32)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// The learning rate throughout.
    Constant,
    /// Cosine decay from the learning rate to 0 over the epoch budget.
    Cosine,
    /// Linear warm-up over `warmup_epochs`, then cosine decay.
    Warmup,
}

/// Which rows validate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// A seeded random share of the rows.
    #[default]
    Random,
    /// The last share of the rows in key order: a model is validated on
    /// rows that come after everything it trained on (time-ordered data).
    Ordered,
}

/// Architecture and parameter-tuning choices of one model, with defaults.
/// Options stored before a key existed read as its default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainOptions {
    /// Widths of the hidden layers, input side first.
    pub hidden: Vec<u32>,
    pub activation: Activation,
    pub epochs: u32,
    pub batch_size: u32,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub seed: u64,
    /// Share of rows held out for validation.
    pub validation_fraction: f64,
    /// How the validation rows are chosen.
    pub split: Split,
    /// Stop after this many epochs without a better validation loss (0: never).
    pub patience: u32,
    /// Most frequent categories kept per categorical column; rarer ones are
    /// treated like values never seen.
    pub max_categories: u32,
    pub optimizer: Optimizer,
    /// SGD's momentum.
    pub momentum: f64,
    pub schedule: Schedule,
    pub warmup_epochs: u32,
    /// Largest global gradient norm per step (0: no clipping).
    pub clip_norm: f64,
    /// Residual blocks after the hidden layers, each
    /// `x + dense(dense(x) → activation → dropout)` as wide as the last hidden layer.
    pub residual_blocks: u32,
    pub norm: Norm,
    /// Dropout after every hidden activation (0: none).
    pub dropout: f64,
    /// The encoding of numeric columns not named in `encodings`.
    #[serde(default = "legacy_numeric_encoding")]
    pub numeric_encoding: NumericEncoding,
    /// Quantile bins of the quantile and piecewise-linear encodings.
    pub bins: u32,
    /// Categorical columns with more categories than this get an embedding
    /// (sized by [`embedding_dim`]) unless named in `encodings`; the others are one-hot.
    #[serde(default = "legacy_onehot_max")]
    pub onehot_max: u32,
    /// Per-column encodings overriding the defaults above.
    pub encodings: BTreeMap<String, ColumnEncoding>,
    pub class_weights: ClassWeights,
    pub loss: RegressionLoss,
    /// Huber's threshold, in standard deviations of the target.
    pub huber_delta: f64,
}

/// Options stored before `numeric_encoding` and `onehot_max` existed were
/// trained with standardised numbers and one-hot categories: read them so.
fn legacy_numeric_encoding() -> NumericEncoding {
    NumericEncoding::Standard
}

fn legacy_onehot_max() -> u32 {
    u32::MAX
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            hidden: vec![64, 32],
            activation: Activation::Relu,
            epochs: 30,
            batch_size: 128,
            learning_rate: 1e-3,
            weight_decay: 0.0,
            seed: 42,
            validation_fraction: 0.2,
            split: Split::Random,
            patience: 5,
            max_categories: 1000,
            optimizer: Optimizer::Adam,
            momentum: 0.9,
            schedule: Schedule::Constant,
            warmup_epochs: 0,
            clip_norm: 0.0,
            residual_blocks: 0,
            norm: Norm::None,
            dropout: 0.0,
            // Measured: PLE beats standardisation on telco_churn (AUC 0.847
            // vs 0.833) and nycflights13 (0.792 vs 0.738); see docs/benchmarks.md.
            numeric_encoding: NumericEncoding::Ple,
            bins: 16,
            onehot_max: 16,
            encodings: BTreeMap::new(),
            class_weights: ClassWeights::None,
            loss: RegressionLoss::Mse,
            huber_delta: 1.0,
        }
    }
}

pub const OPTION_KEYS: &[&str] = &[
    "hidden",
    "activation",
    "epochs",
    "batch_size",
    "learning_rate",
    "weight_decay",
    "seed",
    "validation_fraction",
    "split",
    "patience",
    "max_categories",
    "optimizer",
    "momentum",
    "schedule",
    "warmup_epochs",
    "clip_norm",
    "residual_blocks",
    "norm",
    "dropout",
    "numeric_encoding",
    "bins",
    "onehot_max",
    "encodings",
    "class_weights",
    "loss",
    "huber_delta",
];

/// Embeddings wider than this are refused.
pub const MAX_EMBEDDING_DIM: u32 = 512;
pub const MAX_RESIDUAL_BLOCKS: u32 = 16;
/// Quantile bins of the quantile and piecewise-linear encodings.
pub const MIN_BINS: u32 = 2;
pub const MAX_BINS: u32 = 256;

impl TrainOptions {
    /// Reads the user's `options` JSON object over the defaults.
    pub fn from_json(value: Option<&Value>) -> Result<Self, SpecError> {
        let mut opts = TrainOptions::default();
        let Some(value) = value else { return Ok(opts) };
        let obj = value.as_object().ok_or(SpecError::OptionsNotObject)?;
        for (key, v) in obj {
            match key.as_str() {
                "hidden" => {
                    let arr = v.as_array().ok_or_else(|| type_err(key, "an array of layer widths"))?;
                    if arr.len() > MAX_HIDDEN_LAYERS {
                        return Err(too_many_layers(arr.len()));
                    }
                    let widths = format!("widths from 1 to {MAX_LAYER_WIDTH}");
                    opts.hidden = arr
                        .iter()
                        .map(|w| {
                            whole(key, w, 1, MAX_LAYER_WIDTH.into(), "an array of positive integers", &widths)
                                .map(|w| w as u32)
                        })
                        .collect::<Result<_, _>>()?;
                }
                "activation" => {
                    opts.activation = match v.as_str() {
                        Some("relu") => Activation::Relu,
                        Some("gelu") => Activation::Gelu,
                        Some("silu") => Activation::Silu,
                        Some("tanh") => Activation::Tanh,
                        _ => return Err(type_err(key, "one of \"relu\", \"gelu\", \"silu\", \"tanh\"")),
                    }
                }
                "epochs" => opts.epochs = whole_u32(key, v, 1, MAX_EPOCHS, "a positive integer")?,
                "batch_size" => opts.batch_size = whole_u32(key, v, 1, MAX_BATCH_SIZE, "a positive integer")?,
                "learning_rate" => opts.learning_rate = as_f64(key, v)?,
                "weight_decay" => opts.weight_decay = as_f64(key, v)?,
                "seed" => {
                    opts.seed =
                        whole(key, v, 0, u64::MAX, "a non-negative integer", &format!("from 0 to {}", u64::MAX))?
                }
                "validation_fraction" => opts.validation_fraction = as_f64(key, v)?,
                "split" => {
                    opts.split = match v.as_str() {
                        Some("random") => Split::Random,
                        Some("ordered") => Split::Ordered,
                        _ => return Err(type_err(key, "one of \"random\", \"ordered\"")),
                    }
                }
                "patience" => opts.patience = whole_u32(key, v, 0, u32::MAX, "a non-negative integer")?,
                "max_categories" => opts.max_categories = whole_u32(key, v, 1, MAX_CATEGORIES, "a positive integer")?,
                "optimizer" => {
                    opts.optimizer = match v.as_str() {
                        Some("adam") => Optimizer::Adam,
                        Some("adamw") => Optimizer::AdamW,
                        Some("sgd") => Optimizer::Sgd,
                        _ => return Err(type_err(key, "one of \"adam\", \"adamw\", \"sgd\"")),
                    }
                }
                "momentum" => opts.momentum = as_f64(key, v)?,
                "schedule" => {
                    opts.schedule = match v.as_str() {
                        Some("constant") => Schedule::Constant,
                        Some("cosine") => Schedule::Cosine,
                        Some("warmup") => Schedule::Warmup,
                        _ => return Err(type_err(key, "one of \"constant\", \"cosine\", \"warmup\"")),
                    }
                }
                "warmup_epochs" => opts.warmup_epochs = whole_u32(key, v, 0, u32::MAX, "a non-negative integer")?,
                "clip_norm" => opts.clip_norm = as_f64(key, v)?,
                "residual_blocks" => {
                    opts.residual_blocks = whole_u32(key, v, 0, MAX_RESIDUAL_BLOCKS, "a non-negative integer")?
                }
                "norm" => {
                    opts.norm = match v.as_str() {
                        Some("none") => Norm::None,
                        Some("batch") => Norm::Batch,
                        Some("layer") => Norm::Layer,
                        _ => return Err(type_err(key, "one of \"none\", \"batch\", \"layer\"")),
                    }
                }
                "dropout" => opts.dropout = as_f64(key, v)?,
                "numeric_encoding" => {
                    opts.numeric_encoding = match v.as_str() {
                        Some("standard") => NumericEncoding::Standard,
                        Some("quantile") => NumericEncoding::Quantile,
                        Some("ple") => NumericEncoding::Ple,
                        _ => return Err(type_err(key, "one of \"standard\", \"quantile\", \"ple\"")),
                    }
                }
                "bins" => opts.bins = whole_u32(key, v, MIN_BINS, MAX_BINS, "a positive integer")?,
                // u32::MAX included: options stored before onehot_max existed read so.
                "onehot_max" => opts.onehot_max = whole_u32(key, v, 0, u32::MAX, "a non-negative integer")?,
                "encodings" => {
                    let obj = v.as_object().ok_or_else(|| type_err(key, ENCODINGS_SHAPE))?;
                    opts.encodings = obj
                        .iter()
                        .map(|(col, e)| {
                            if e.is_number() {
                                // A width: out of range is said as such, not as a wrong shape.
                                let d = whole(key, e, 1, MAX_EMBEDDING_DIM.into(), ENCODINGS_SHAPE, "")
                                    .map_err(|_| embedding_width_err(col, &show_json_number(e)))?;
                                return Ok((col.clone(), ColumnEncoding::Embedding(Some(d as u32))));
                            }
                            ColumnEncoding::parse(e)
                                .map(|e| (col.clone(), e))
                                .ok_or_else(|| type_err(key, ENCODINGS_SHAPE))
                        })
                        .collect::<Result<_, _>>()?;
                }
                "class_weights" => {
                    opts.class_weights = ClassWeights::parse(v).ok_or_else(|| type_err(key, CLASS_WEIGHTS_SHAPE))?
                }
                "loss" => {
                    opts.loss = match v.as_str() {
                        Some("mse") => RegressionLoss::Mse,
                        Some("huber") => RegressionLoss::Huber,
                        _ => return Err(type_err(key, "one of \"mse\", \"huber\"")),
                    }
                }
                "huber_delta" => opts.huber_delta = as_f64(key, v)?,
                _ => return Err(SpecError::UnknownOption(key.clone())),
            }
        }
        opts.validate()?;
        Ok(opts)
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        if self.hidden.len() > MAX_HIDDEN_LAYERS {
            return Err(too_many_layers(self.hidden.len()));
        }
        if let Some(w) = self.hidden.iter().find(|w| **w == 0 || **w > MAX_LAYER_WIDTH) {
            return Err(range_err("hidden", w.to_string(), format!("widths from 1 to {MAX_LAYER_WIDTH}")));
        }
        check_range("epochs", self.epochs as f64, 1.0, MAX_EPOCHS as f64)?;
        check_range("batch_size", self.batch_size as f64, 1.0, MAX_BATCH_SIZE as f64)?;
        if !(self.learning_rate > 0.0 && self.learning_rate <= 10.0) {
            return Err(range_err(
                "learning_rate",
                show_number(self.learning_rate),
                "greater than 0 and at most 10".into(),
            ));
        }
        check_range("weight_decay", self.weight_decay, 0.0, 1.0)?;
        if !(self.validation_fraction > 0.0 && self.validation_fraction <= 0.5) {
            return Err(range_err(
                "validation_fraction",
                show_number(self.validation_fraction),
                "greater than 0 and at most 0.5".into(),
            ));
        }
        check_range("max_categories", self.max_categories as f64, 1.0, MAX_CATEGORIES as f64)?;
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(range_err("momentum", show_number(self.momentum), "at least 0 and below 1".into()));
        }
        if self.warmup_epochs >= self.epochs && self.schedule == Schedule::Warmup {
            return Err(range_err(
                "warmup_epochs",
                self.warmup_epochs.to_string(),
                format!("fewer than epochs ({})", self.epochs),
            ));
        }
        check_range("clip_norm", self.clip_norm, 0.0, 1e6)?;
        if self.residual_blocks > 0 && self.hidden.is_empty() {
            return Err(range_err(
                "residual_blocks",
                self.residual_blocks.to_string(),
                "0 when there are no hidden layers (blocks are as wide as the last one)".into(),
            ));
        }
        check_range("residual_blocks", self.residual_blocks as f64, 0.0, MAX_RESIDUAL_BLOCKS as f64)?;
        if !(0.0..0.95).contains(&self.dropout) {
            return Err(range_err("dropout", show_number(self.dropout), "at least 0 and below 0.95".into()));
        }
        check_range("bins", self.bins as f64, MIN_BINS as f64, MAX_BINS as f64)?;
        for (col, e) in &self.encodings {
            if let ColumnEncoding::Embedding(Some(d)) = e {
                if *d == 0 || *d > MAX_EMBEDDING_DIM {
                    return Err(embedding_width_err(col, &d.to_string()));
                }
            }
        }
        if let ClassWeights::Explicit(w) = &self.class_weights {
            if let Some((label, v)) = w.iter().find(|(_, v)| !(**v > 0.0 && **v <= 1e6)) {
                return Err(range_err(
                    "class_weights",
                    format!("{} for \"{label}\"", show_number(*v)),
                    "greater than 0 and at most 1000000".into(),
                ));
            }
        }
        if !(self.huber_delta > 0.0 && self.huber_delta <= 1e3) {
            return Err(range_err(
                "huber_delta",
                show_number(self.huber_delta),
                "greater than 0 and at most 1000".into(),
            ));
        }
        Ok(())
    }

    /// Checks the options that name columns or labels against the model's
    /// features, task and class labels.
    pub fn check_against(&self, features: &[Feature], task: Task, class_labels: &[String]) -> Result<(), SpecError> {
        for (col, e) in &self.encodings {
            let Some(f) = features.iter().find(|f| &f.name == col) else {
                return Err(SpecError::UnknownEncodedColumn(col.clone()));
            };
            if e.is_numeric() != (f.kind == FeatureKind::Numeric) {
                return Err(SpecError::EncodingKind { column: col.clone(), kind: f.kind, encoding: *e });
            }
        }
        if self.class_weights != ClassWeights::None && !task.is_classification() {
            return Err(SpecError::OptionTask { key: "class_weights", task });
        }
        if let ClassWeights::Explicit(w) = &self.class_weights {
            if let Some(label) = w.keys().find(|l| !class_labels.contains(l)) {
                return Err(SpecError::UnknownLabel { label: label.clone(), labels: class_labels.to_vec() });
            }
        }
        if self.loss == RegressionLoss::Huber && task != Task::Regression {
            return Err(SpecError::OptionTask { key: "loss", task });
        }
        Ok(())
    }

    /// How column `feature` is encoded, given its vocabulary size when categorical.
    pub fn categorical_encoding(&self, column: &str, vocabulary: usize) -> CategoricalEncoding {
        match self.encodings.get(column) {
            Some(ColumnEncoding::OneHot) => CategoricalEncoding::OneHot,
            Some(ColumnEncoding::Embedding(Some(d))) => CategoricalEncoding::Embedding(*d),
            Some(ColumnEncoding::Embedding(None)) => CategoricalEncoding::Embedding(embedding_dim(vocabulary) as u32),
            _ if vocabulary > self.onehot_max as usize => {
                CategoricalEncoding::Embedding(embedding_dim(vocabulary) as u32)
            }
            _ => CategoricalEncoding::OneHot,
        }
    }

    pub fn numeric_encoding(&self, column: &str) -> NumericEncoding {
        match self.encodings.get(column) {
            Some(ColumnEncoding::Standard) => NumericEncoding::Standard,
            Some(ColumnEncoding::Quantile) => NumericEncoding::Quantile,
            Some(ColumnEncoding::Ple) => NumericEncoding::Ple,
            _ => self.numeric_encoding,
        }
    }

    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("options always serialise")
    }
}

const ENCODINGS_SHAPE: &str = "an object from column names to \"standard\", \"quantile\", \"ple\", \"onehot\", \"embedding\" or an embedding width";
const CLASS_WEIGHTS_SHAPE: &str = "\"none\", \"balanced\" or an object from labels to positive numbers";

fn type_err(key: &str, expected: &'static str) -> SpecError {
    SpecError::OptionType { key: key.to_owned(), expected }
}

fn range_err(key: &str, value: String, allowed: String) -> SpecError {
    SpecError::OptionRange { key: key.to_owned(), value, allowed }
}

fn too_many_layers(layers: usize) -> SpecError {
    range_err("hidden", format!("{layers} layers"), format!("at most {MAX_HIDDEN_LAYERS} layers"))
}

fn embedding_width_err(column: &str, width: &str) -> SpecError {
    range_err(
        "encodings",
        format!("{width} for column \"{column}\""),
        format!("embedding widths from 1 to {MAX_EMBEDDING_DIM}"),
    )
}

fn check_range(key: &str, v: f64, lo: f64, hi: f64) -> Result<(), SpecError> {
    if !(lo..=hi).contains(&v) {
        return Err(range_err(key, show_number(v), format!("from {} to {}", show_number(lo), show_number(hi))));
    }
    Ok(())
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

/// A JSON number as messages show it.
fn show_json_number(v: &Value) -> String {
    match v {
        Value::Number(n) if n.is_f64() => n.as_f64().map_or_else(|| n.to_string(), show_number),
        other => other.to_string(),
    }
}

/// A whole-number option: a JSON integer from `lo` to `hi`. A whole number
/// outside them (negative, too large, or so large JSON reads it as a
/// float) is a range error that says `allowed` (or "from lo to hi"); a
/// fraction or another type is a type error. Never a value clamped.
fn whole(key: &str, v: &Value, lo: u64, hi: u64, expected: &'static str, allowed: &str) -> Result<u64, SpecError> {
    let out_of_range = |shown: String| {
        let allowed = if allowed.is_empty() { format!("from {lo} to {hi}") } else { allowed.to_string() };
        range_err(key, shown, allowed)
    };
    let Value::Number(n) = v else { return Err(type_err(key, expected)) };
    if let Some(x) = n.as_u64() {
        return if (lo..=hi).contains(&x) { Ok(x) } else { Err(out_of_range(x.to_string())) };
    }
    if let Some(x) = n.as_i64() {
        return Err(out_of_range(x.to_string()));
    }
    match n.as_f64() {
        Some(x) if x.fract() == 0.0 && !(lo as f64..=hi as f64).contains(&x) => Err(out_of_range(show_number(x))),
        _ => Err(type_err(key, expected)),
    }
}

/// [`whole`] for the u32 options; `hi` is at most u32::MAX, so the value fits.
fn whole_u32(key: &str, v: &Value, lo: u32, hi: u32, expected: &'static str) -> Result<u32, SpecError> {
    whole(key, v, lo.into(), hi.into(), expected, "").map(|x| x as u32)
}

fn as_f64(key: &str, v: &Value) -> Result<f64, SpecError> {
    v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| type_err(key, "a number"))
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
    OptionType { key: String, expected: &'static str },
    #[error("option \"{key}\" is {value}, allowed: {allowed}")]
    OptionRange { key: String, value: String, allowed: String },
    #[error("option \"encodings\" names column \"{0}\", which is not a feature of this model")]
    UnknownEncodedColumn(String),
    #[error("option \"encodings\" gives {kind:?} column \"{column}\" the encoding {encoding:?}")]
    EncodingKind { column: String, kind: FeatureKind, encoding: ColumnEncoding },
    #[error("option \"{key}\" does not apply to a {task} model")]
    OptionTask { key: &'static str, task: Task },
    #[error("option \"class_weights\" names label \"{label}\", which the target does not have")]
    UnknownLabel { label: String, labels: Vec<String> },
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
            SpecError::SingleClass { .. } => Some("Check the source's filter: every row has the same label.".into()),
            SpecError::EncodingKind { .. } => Some(
                "Numeric columns take standard, quantile or ple; categorical ones onehot, embedding or a width.".into(),
            ),
            SpecError::UnknownLabel { labels, .. } => Some(format!("The labels are: {}.", labels.join(", "))),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn defaults_apply_and_known_options_override() {
        assert_eq!(TrainOptions::from_json(None).unwrap(), TrainOptions::default());
        let o = TrainOptions::from_json(Some(&json!({"hidden": [16], "epochs": 3, "learning_rate": 0.01}))).unwrap();
        assert_eq!(o.hidden, vec![16]);
        assert_eq!(o.epochs, 3);
        assert_eq!(o.learning_rate, 0.01);
        assert_eq!(o.batch_size, TrainOptions::default().batch_size);
        let empty = TrainOptions::from_json(Some(&json!({"hidden": []}))).unwrap();
        assert!(empty.hidden.is_empty(), "no hidden layer is a linear model, which is allowed");
    }

    #[test]
    fn bad_options_say_what_is_wrong() {
        let e = TrainOptions::from_json(Some(&json!({"epoch": 3}))).unwrap_err();
        assert_eq!(e, SpecError::UnknownOption("epoch".into()));
        assert!(e.hint().unwrap().contains("epochs"));
        assert!(matches!(
            TrainOptions::from_json(Some(&json!({"learning_rate": -0.1}))).unwrap_err(),
            SpecError::OptionRange { key, .. } if key == "learning_rate"
        ));
        assert!(matches!(
            TrainOptions::from_json(Some(&json!({"epochs": "ten"}))).unwrap_err(),
            SpecError::OptionType { key, .. } if key == "epochs"
        ));
        assert!(matches!(
            TrainOptions::from_json(Some(&json!({"hidden": [64, 0]}))).unwrap_err(),
            SpecError::OptionRange { key, .. } if key == "hidden"
        ));
        assert_eq!(TrainOptions::from_json(Some(&json!([1]))).unwrap_err(), SpecError::OptionsNotObject);
    }

    #[test]
    fn optimizers_and_schedules_are_named_options() {
        let o = TrainOptions::from_json(Some(&json!({
            "optimizer": "sgd", "momentum": 0.8, "schedule": "warmup", "warmup_epochs": 2, "clip_norm": 1.5
        })))
        .unwrap();
        assert_eq!((o.optimizer, o.schedule, o.warmup_epochs), (Optimizer::Sgd, Schedule::Warmup, 2));
        assert_eq!((o.momentum, o.clip_norm), (0.8, 1.5));
        let g = TrainOptions::from_json(Some(&json!({"activation": "gelu"}))).unwrap();
        assert_eq!(g.activation, Activation::Gelu);
        assert!(TrainOptions::from_json(Some(&json!({"activation": "swish"}))).is_err());
        assert!(matches!(
            TrainOptions::from_json(Some(&json!({"optimizer": "lbfgs"}))).unwrap_err(),
            SpecError::OptionType { key, .. } if key == "optimizer"
        ));
        assert!(matches!(
            TrainOptions::from_json(Some(&json!({"schedule": "warmup", "warmup_epochs": 40, "epochs": 10}))).unwrap_err(),
            SpecError::OptionRange { key, .. } if key == "warmup_epochs"
        ));
        assert!(matches!(
            TrainOptions::from_json(Some(&json!({"momentum": 1.0}))).unwrap_err(),
            SpecError::OptionRange { key, .. } if key == "momentum"
        ));
        // Options stored before these keys existed still read, meaning what they meant then.
        let old: TrainOptions = serde_json::from_value(json!({"epochs": 3})).unwrap();
        assert_eq!(old.optimizer, Optimizer::Adam);
        assert_eq!((old.numeric_encoding, old.onehot_max), (NumericEncoding::Standard, u32::MAX));
        assert_eq!(TrainOptions::default().numeric_encoding, NumericEncoding::Ple);
    }

    #[test]
    fn options_round_trip_through_json() {
        let o = TrainOptions { seed: 7, ..Default::default() };
        assert_eq!(TrainOptions::from_json(Some(&o.to_json())).unwrap(), o);
        let written = json!({
            "hidden": [32], "residual_blocks": 2, "norm": "layer", "dropout": 0.1,
            "numeric_encoding": "ple", "bins": 16, "onehot_max": 4,
            "encodings": {"tenure": "quantile", "city": 8, "plan": "onehot", "state": "embedding"},
            "class_weights": {"yes": 3.0}, "loss": "mse"
        });
        let o = TrainOptions::from_json(Some(&written)).unwrap();
        assert_eq!(o.encodings["city"], ColumnEncoding::Embedding(Some(8)));
        assert_eq!(o.to_json()["encodings"], written["encodings"], "stored as written");
        assert_eq!(TrainOptions::from_json(Some(&o.to_json())).unwrap(), o);
        let stored: TrainOptions = serde_json::from_value(o.to_json()).unwrap();
        assert_eq!(stored, o);
    }

    #[test]
    fn architecture_and_encoding_options_are_checked() {
        let bad = |v: Value, key: &str| {
            let e = TrainOptions::from_json(Some(&v)).unwrap_err();
            assert!(
                matches!(&e, SpecError::OptionRange { key: k, .. } | SpecError::OptionType { key: k, .. } if k == key),
                "{v}: {e}"
            );
        };
        bad(json!({"hidden": [], "residual_blocks": 1}), "residual_blocks");
        bad(json!({"dropout": 0.99}), "dropout");
        bad(json!({"norm": "group"}), "norm");
        bad(json!({"encodings": {"x": "log"}}), "encodings");
        bad(json!({"encodings": {"x": 0}}), "encodings");
        bad(json!({"class_weights": {"yes": -1}}), "class_weights");
        bad(json!({"class_weights": "inverse"}), "class_weights");
        bad(json!({"bins": 1}), "bins");

        let features = vec![
            Feature { name: "tenure".into(), kind: FeatureKind::Numeric },
            Feature { name: "plan".into(), kind: FeatureKind::Categorical },
        ];
        let labels = vec!["no".to_string(), "yes".to_string()];
        let check = |v: Value, task| TrainOptions::from_json(Some(&v)).unwrap().check_against(&features, task, &labels);
        check(json!({"encodings": {"tenure": "ple", "plan": 4}, "class_weights": {"yes": 2}}), Task::Binary).unwrap();
        assert_eq!(
            check(json!({"encodings": {"tenur": "ple"}}), Task::Binary),
            Err(SpecError::UnknownEncodedColumn("tenur".into()))
        );
        assert!(matches!(
            check(json!({"encodings": {"plan": "ple"}}), Task::Binary),
            Err(SpecError::EncodingKind { .. })
        ));
        assert!(matches!(
            check(json!({"class_weights": {"maybe": 2}}), Task::Binary),
            Err(SpecError::UnknownLabel { .. })
        ));
        assert!(matches!(check(json!({"loss": "huber"}), Task::Binary), Err(SpecError::OptionTask { .. })));
        assert!(matches!(
            check(json!({"class_weights": "balanced"}), Task::Regression),
            Err(SpecError::OptionTask { .. })
        ));
    }

    #[test]
    fn categorical_encodings_follow_the_size_rule_and_overrides() {
        let o =
            TrainOptions::from_json(Some(&json!({"encodings": {"a": "onehot", "b": 5, "c": "embedding"}}))).unwrap();
        assert_eq!(o.categorical_encoding("x", 16), CategoricalEncoding::OneHot);
        assert_eq!(o.categorical_encoding("x", 17), CategoricalEncoding::Embedding(8));
        assert_eq!(o.categorical_encoding("a", 5000), CategoricalEncoding::OneHot);
        assert_eq!(o.categorical_encoding("b", 3), CategoricalEncoding::Embedding(5));
        assert_eq!(o.categorical_encoding("c", 3), CategoricalEncoding::Embedding(3));
        assert_eq!(embedding_dim(100_000), 32);
        assert_eq!(embedding_dim(1), 2);
    }

    #[test]
    fn out_of_range_numbers_are_range_errors_that_say_the_limits() {
        let range = |v: Value| match TrainOptions::from_json(Some(&v)).unwrap_err() {
            SpecError::OptionRange { key, value, allowed } => format!("{key}: {value} not {allowed}"),
            other => panic!("{v}: {other}"),
        };
        assert_eq!(range(json!({"epochs": 4_294_967_296u64})), "epochs: 4294967296 not from 1 to 100000");
        assert_eq!(range(json!({"epochs": 1e300})), "epochs: 1e300 not from 1 to 100000");
        assert_eq!(range(json!({"epochs": 100_001})), "epochs: 100001 not from 1 to 100000");
        assert_eq!(range(json!({"epochs": -1})), "epochs: -1 not from 1 to 100000");
        assert_eq!(range(json!({"batch_size": 65_537})), "batch_size: 65537 not from 1 to 65536");
        assert_eq!(range(json!({"patience": 4_294_967_296u64})), "patience: 4294967296 not from 0 to 4294967295");
        assert_eq!(range(json!({"seed": -1})), "seed: -1 not from 0 to 18446744073709551615");
        assert_eq!(range(json!({"seed": 1e300})), "seed: 1e300 not from 0 to 18446744073709551615");
        assert_eq!(range(json!({"bins": 1e308})), "bins: 1e308 not from 2 to 256");
        assert_eq!(range(json!({"max_categories": 0})), "max_categories: 0 not from 1 to 100000");
        assert_eq!(range(json!({"residual_blocks": 17})), "residual_blocks: 17 not from 0 to 16");
        assert_eq!(range(json!({"hidden": [64, 1e10]})), "hidden: 10000000000 not widths from 1 to 4096");
        assert_eq!(range(json!({"hidden": [64, 4097]})), "hidden: 4097 not widths from 1 to 4096");
        assert_eq!(range(json!({"hidden": vec![8; 100_000]})), "hidden: 100000 layers not at most 8 layers");
        assert_eq!(
            range(json!({"encodings": {"city": 1e10}})),
            "encodings: 10000000000 for column \"city\" not embedding widths from 1 to 512"
        );
        assert_eq!(
            range(json!({"encodings": {"city": -3}})),
            "encodings: -3 for column \"city\" not embedding widths from 1 to 512"
        );
        assert_eq!(range(json!({"learning_rate": 1e300})), "learning_rate: 1e300 not greater than 0 and at most 10");
        assert_eq!(range(json!({"clip_norm": 1e7})), "clip_norm: 10000000 not from 0 to 1000000");
        // A fraction is still the wrong type for a whole-number option.
        assert_eq!(
            TrainOptions::from_json(Some(&json!({"epochs": 2.5}))).unwrap_err().to_string(),
            "option \"epochs\" must be a positive integer"
        );
        // The largest values allowed are kept exactly.
        let o = TrainOptions::from_json(Some(&json!({
            "seed": u64::MAX, "patience": u32::MAX, "onehot_max": u32::MAX, "epochs": 100_000, "hidden": vec![4096; 8]
        })))
        .unwrap();
        assert_eq!((o.seed, o.patience, o.onehot_max, o.epochs), (u64::MAX, u32::MAX, u32::MAX, 100_000));
    }

    #[test]
    fn no_json_value_panics_the_options_reader() {
        let numbers = [
            json!(u64::MAX),
            json!(i64::MIN),
            json!(f64::MAX),
            json!(-f64::MAX),
            json!(f64::MIN_POSITIVE),
            json!(-0.0),
            json!(0),
            json!(f64::NAN), // null: serde_json has no NaN
        ];
        let mut deep = json!(1);
        for _ in 0..1000 {
            deep = json!([deep]);
        }
        let mut values: Vec<Value> = numbers.to_vec();
        values.extend([json!(null), json!("x"), json!([1, "a"]), json!({"a": {"b": 1}}), deep]);
        for key in OPTION_KEYS {
            for v in &values {
                let _ = TrainOptions::from_json(Some(&json!({ *key: v.clone() })));
                let _ = TrainOptions::from_json(Some(&json!({ *key: [v.clone()] })));
                let _ = TrainOptions::from_json(Some(&json!({ *key: { "a": v.clone() } })));
            }
        }
        for v in &values {
            let _ = TrainOptions::from_json(Some(v));
        }
    }

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
