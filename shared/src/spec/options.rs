//! Training options: what a user may write in `options`, how each key is
//! read, and the validated choices a model trains with.
//!
//! - [`WrittenOptions`] is the wire type: the options as written, every key
//!   optional, each value read as its option allows. Its fields are the list
//!   of keys ([`OPTION_KEYS`]).
//! - [`TrainOptions`] is the validated type, built with `TryFrom` (defaults
//!   filled in, then [`TrainOptions::validate`]). It is also what the catalog
//!   stores ([`TrainOptions::to_json`]) and the daemon reads back with serde,
//!   where keys stored before they existed read as what they meant then.
//! - The names of an enum's values are its serde attributes, and nowhere
//!   else: messages list them from serde ([`serde_introspect`]).
//! - [`PER_MODEL_OPTIONS`] says which options may differ inside a training
//!   stack; every other must be the same ([`TrainOptions::first_stack_mismatch`]).
//!
//! A new option is a field of both structs (its reader named on the
//! [`WrittenOptions`] one), a line of the `TryFrom`, its default, where it has
//! limits a check in `validate`, and, if models of one stack may differ in it,
//! an entry of [`PER_MODEL_OPTIONS`].

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;

use serde::de::value::{MapDeserializer, StrDeserializer};
use serde::de::{self, DeserializeOwned, Deserializer, IntoDeserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_aux::serde_introspection::serde_introspect;
use serde_json::{Number, Value};
use struct_field_names_as_array::FieldNamesAsSlice;

use super::{show_number, Feature, FeatureKind, SpecError, SqlKind, Task};

pub const MAX_HIDDEN_LAYERS: usize = 8;
pub const MAX_LAYER_WIDTH: u32 = 4096;
/// The most epochs one model trains (and the most halving's `min_epochs`).
pub const MAX_EPOCHS: u32 = 100_000;
pub const MAX_BATCH_SIZE: u32 = 65_536;
pub const MAX_CATEGORIES: u32 = 100_000;
/// Embeddings wider than this are refused.
pub const MAX_EMBEDDING_DIM: u32 = 512;
pub const MAX_RESIDUAL_BLOCKS: u32 = 16;
/// Quantile bins of the quantile and piecewise-linear encodings.
pub const MIN_BINS: u32 = 2;
pub const MAX_BINS: u32 = 256;
/// Most frequencies, and the widest output, of a periodic embedding.
pub const MAX_PERIODIC_FREQUENCIES: u32 = 128;
pub const MAX_PERIODIC_DIM: u32 = 128;
/// Most networks one mini-ensemble trains.
pub const MAX_MEMBERS: u32 = 16;

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
    /// Robust scaling (RealMLP-TD): `(x - median) / (q75 - q25)`, then the
    /// smooth clip `z / sqrt(1 + (z/3)^2)`, so outliers saturate near ±3.
    Robust,
    /// Periodic embedding (MLP-PLR): the standardised value `z` as an input,
    /// and `ReLU(W·[cos(2πcz), sin(2πcz)] + b)` with learnt frequencies `c`.
    Periodic,
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

/// How a regression model learns its target. Whatever the transform, scores
/// and validation metrics are in the target's units: the exported graph
/// inverts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetTransform {
    /// The target as it is.
    None,
    /// `(y - mean) / std` over the training rows (what every regression
    /// learnt before this option existed).
    #[default]
    Standardize,
    /// `ln(y)`, then standardised; every target must be greater than 0.
    Log,
    /// `log` when every target is greater than 0 and the training rows'
    /// sample skewness exceeds [`AUTO_LOG_SKEWNESS`], else `standardize`.
    Auto,
}

/// The sample skewness of the training rows' targets (`m3 / m2^1.5`, the
/// population moments) above which `target_transform = "auto"` learns `ln(y)`.
pub const AUTO_LOG_SKEWNESS: f64 = 1.0;

/// An encoding named for one column in `encodings`. Stored as written: a
/// name, or an embedding width. The categorical ones (`Category`, `OneHot`,
/// `Embedding`) also make an integer column a category: an identifier such
/// as a household or a store, whose values name things rather than count
/// them ([`TrainOptions::feature_kind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "Value", try_from = "Value")]
pub enum ColumnEncoding {
    Standard,
    Quantile,
    Ple,
    Robust,
    Periodic,
    /// A category, one-hot or embedded by its vocabulary's size, as a text
    /// column is by default.
    Category,
    OneHot,
    Embedding(Option<u32>),
}

/// The names a [`ColumnEncoding`] is written with (a width is the other way).
#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum EncodingName {
    Standard,
    Quantile,
    Ple,
    Robust,
    Periodic,
    Category,
    OneHot,
    Embedding,
}

/// The names [`ClassWeights`] may be written with (an object of weights is the other way).
#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum WeightsName {
    None,
    Balanced,
}

impl From<ColumnEncoding> for Value {
    fn from(e: ColumnEncoding) -> Value {
        let name = match e {
            ColumnEncoding::Standard => EncodingName::Standard,
            ColumnEncoding::Quantile => EncodingName::Quantile,
            ColumnEncoding::Ple => EncodingName::Ple,
            ColumnEncoding::Robust => EncodingName::Robust,
            ColumnEncoding::Periodic => EncodingName::Periodic,
            ColumnEncoding::Category => EncodingName::Category,
            ColumnEncoding::OneHot => EncodingName::OneHot,
            ColumnEncoding::Embedding(None) => EncodingName::Embedding,
            ColumnEncoding::Embedding(Some(d)) => return d.into(),
        };
        name_value(name)
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
            ClassWeights::None => name_value(WeightsName::None),
            ClassWeights::Balanced => name_value(WeightsName::Balanced),
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
    /// Stored class weights (see [`read::class_weights`] for written ones).
    fn parse(v: &Value) -> Option<ClassWeights> {
        match v {
            Value::String(s) => ClassWeights::named(s),
            Value::Object(obj) => obj
                .iter()
                .map(|(label, w)| w.as_f64().filter(|w| w.is_finite()).map(|w| (label.clone(), w)))
                .collect::<Option<_>>()
                .map(ClassWeights::Explicit),
            _ => None,
        }
    }

    fn named(name: &str) -> Option<ClassWeights> {
        Some(match by_name(name)? {
            WeightsName::None => ClassWeights::None,
            WeightsName::Balanced => ClassWeights::Balanced,
        })
    }
}

impl ColumnEncoding {
    /// A stored encoding (see [`read::encodings`] for written ones).
    fn parse(v: &Value) -> Option<ColumnEncoding> {
        if let Some(dim) = v.as_u64() {
            return u32::try_from(dim).ok().map(|d| ColumnEncoding::Embedding(Some(d)));
        }
        ColumnEncoding::named(v.as_str()?)
    }

    fn named(name: &str) -> Option<ColumnEncoding> {
        Some(match by_name(name)? {
            EncodingName::Standard => ColumnEncoding::Standard,
            EncodingName::Quantile => ColumnEncoding::Quantile,
            EncodingName::Ple => ColumnEncoding::Ple,
            EncodingName::Robust => ColumnEncoding::Robust,
            EncodingName::Periodic => ColumnEncoding::Periodic,
            EncodingName::Category => ColumnEncoding::Category,
            EncodingName::OneHot => ColumnEncoding::OneHot,
            EncodingName::Embedding => ColumnEncoding::Embedding(None),
        })
    }

    pub fn is_numeric(self) -> bool {
        matches!(
            self,
            ColumnEncoding::Standard
                | ColumnEncoding::Quantile
                | ColumnEncoding::Ple
                | ColumnEncoding::Robust
                | ColumnEncoding::Periodic
        )
    }
}

/// The value of enum `E` that serde names `name`.
fn by_name<E: DeserializeOwned>(name: &str) -> Option<E> {
    let name: StrDeserializer<'_, de::value::Error> = name.into_deserializer();
    E::deserialize(name).ok()
}

/// A name as serde writes it.
fn name_value(name: impl Serialize) -> Value {
    serde_json::to_value(name).expect("a name serialises")
}

/// Every name of enum `E`, as serde reads them and in their order, quoted:
/// `"relu", "gelu", "silu", "tanh"`.
fn names<E: DeserializeOwned>() -> String {
    serde_introspect::<E>().iter().map(|n| format!("\"{n}\"")).collect::<Vec<_>>().join(", ")
}

/// What a value of enum option `E` must be: `one of "adam", "adamw", "sgd"`.
fn one_of<E: DeserializeOwned>() -> String {
    format!("one of {}", names::<E>())
}

fn encodings_shape() -> String {
    format!("an object from column names to {} or an embedding width", names::<EncodingName>())
}

fn class_weights_shape() -> String {
    format!("{} or an object from labels to positive numbers", names::<WeightsName>())
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
    /// A mini-ensemble: this many networks of the same shape, from different
    /// initial weights, trained in one stack on the same batches and averaged
    /// (their probabilities, or values) into one model and one ONNX graph.
    pub members: u32,
    /// The encoding of numeric columns not named in `encodings`.
    #[serde(default = "legacy_numeric_encoding")]
    pub numeric_encoding: NumericEncoding,
    /// Quantile bins of the quantile and piecewise-linear encodings.
    pub bins: u32,
    /// Periodic embeddings: frequencies per column, the width of each
    /// column's embedding, and the deviation the frequencies start from
    /// (drawn from N(0, sigma²) over standardised values).
    pub periodic_frequencies: u32,
    pub periodic_dim: u32,
    pub periodic_sigma: f64,
    /// Categorical columns with more categories than this get an embedding
    /// (sized by [`embedding_dim`]) unless named in `encodings`; the others are one-hot.
    #[serde(default = "legacy_onehot_max")]
    pub onehot_max: u32,
    /// Per-column encodings overriding the defaults above.
    pub encodings: BTreeMap<String, ColumnEncoding>,
    pub class_weights: ClassWeights,
    /// Classification: the share ε of each row's target spread over all K
    /// classes: the target is `(1 - ε)·onehot + ε/K` (binary: `y(1 - ε) + ε/2`).
    pub label_smoothing: f64,
    pub loss: RegressionLoss,
    /// Huber's threshold, in standard deviations of the target (in the
    /// target's units with `target_transform = "none"`).
    pub huber_delta: f64,
    /// Regression: how the target is learnt. Classification has nothing
    /// to transform: `standardize` (the default) and `auto` leave it alone,
    /// so a selection may search `auto` whatever the task.
    pub target_transform: TargetTransform,
    /// A selection's candidate continues from the weights of an archived
    /// version of its model that differs from it only in parameter tuning
    /// ([`TrainOptions::differs_only_in_tuning`]), where there is one
    /// (docs/selection.md, "Warm starts"). Stored only when set.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub warm_start: bool,
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
            members: 1,
            // Measured: PLE beats standardisation on telco_churn (AUC 0.847
            // vs 0.833) and nycflights13 (0.792 vs 0.738); see docs/benchmarks.md.
            numeric_encoding: NumericEncoding::Ple,
            bins: 16,
            // MLP-PLR's usual sizes (Gorishniy et al., 2022); sigma is the
            // setting that matters most, and a selection may search it.
            periodic_frequencies: 16,
            periodic_dim: 16,
            periodic_sigma: 0.1,
            onehot_max: 16,
            encodings: BTreeMap::new(),
            class_weights: ClassWeights::None,
            label_smoothing: 0.0,
            loss: RegressionLoss::Mse,
            huber_delta: 1.0,
            // What every regression learnt before the option existed.
            // Measured on ames and hotel_rates (docs/benchmarks.md, "Accuracy
            // against gradient boosting"), `auto` did not win clearly enough
            // (RMSE of ln y 0.1228 against 0.1240 on ames, 0.469 against
            // 0.432 on hotel_rates) to change how regressions train.
            target_transform: TargetTransform::Standardize,
            warm_start: false,
        }
    }
}

/// The options as a user writes them (`cerebro.models.options`, a
/// selection's candidates): every key optional, each value read as its
/// option allows (a whole number within its limits, one of an enum's names,
/// ...), unknown keys refused. Nothing is filled in or checked against
/// another option here: [`TrainOptions::try_from`] does that.
///
/// Its fields are the options ([`OPTION_KEYS`]); [`TrainOptions`] documents
/// them. Read it with [`WrittenOptions::read`], which says what is wrong as a
/// [`SpecError`]; the error of a bare serde deserialize is internal text.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, FieldNamesAsSlice)]
#[serde(default, deny_unknown_fields)]
pub struct WrittenOptions {
    #[serde(deserialize_with = "read::hidden")]
    pub hidden: Option<Vec<u32>>,
    #[serde(deserialize_with = "read::named")]
    pub activation: Option<Activation>,
    #[serde(deserialize_with = "read::whole::<_, 1, MAX_EPOCHS>")]
    pub epochs: Option<u32>,
    #[serde(deserialize_with = "read::whole::<_, 1, MAX_BATCH_SIZE>")]
    pub batch_size: Option<u32>,
    #[serde(deserialize_with = "read::number")]
    pub learning_rate: Option<f64>,
    #[serde(deserialize_with = "read::number")]
    pub weight_decay: Option<f64>,
    #[serde(deserialize_with = "read::seed")]
    pub seed: Option<u64>,
    #[serde(deserialize_with = "read::number")]
    pub validation_fraction: Option<f64>,
    #[serde(deserialize_with = "read::named")]
    pub split: Option<Split>,
    #[serde(deserialize_with = "read::whole::<_, 0, { u32::MAX }>")]
    pub patience: Option<u32>,
    #[serde(deserialize_with = "read::whole::<_, 1, MAX_CATEGORIES>")]
    pub max_categories: Option<u32>,
    #[serde(deserialize_with = "read::named")]
    pub optimizer: Option<Optimizer>,
    #[serde(deserialize_with = "read::number")]
    pub momentum: Option<f64>,
    #[serde(deserialize_with = "read::named")]
    pub schedule: Option<Schedule>,
    #[serde(deserialize_with = "read::whole::<_, 0, { u32::MAX }>")]
    pub warmup_epochs: Option<u32>,
    #[serde(deserialize_with = "read::number")]
    pub clip_norm: Option<f64>,
    #[serde(deserialize_with = "read::whole::<_, 0, MAX_RESIDUAL_BLOCKS>")]
    pub residual_blocks: Option<u32>,
    #[serde(deserialize_with = "read::named")]
    pub norm: Option<Norm>,
    #[serde(deserialize_with = "read::number")]
    pub dropout: Option<f64>,
    #[serde(deserialize_with = "read::whole::<_, 1, MAX_MEMBERS>")]
    pub members: Option<u32>,
    #[serde(deserialize_with = "read::named")]
    pub numeric_encoding: Option<NumericEncoding>,
    #[serde(deserialize_with = "read::whole::<_, MIN_BINS, MAX_BINS>")]
    pub bins: Option<u32>,
    #[serde(deserialize_with = "read::whole::<_, 1, MAX_PERIODIC_FREQUENCIES>")]
    pub periodic_frequencies: Option<u32>,
    #[serde(deserialize_with = "read::whole::<_, 1, MAX_PERIODIC_DIM>")]
    pub periodic_dim: Option<u32>,
    #[serde(deserialize_with = "read::number")]
    pub periodic_sigma: Option<f64>,
    /// u32::MAX included: options stored before onehot_max existed read so.
    #[serde(deserialize_with = "read::whole::<_, 0, { u32::MAX }>")]
    pub onehot_max: Option<u32>,
    #[serde(deserialize_with = "read::encodings")]
    pub encodings: Option<BTreeMap<String, ColumnEncoding>>,
    #[serde(deserialize_with = "read::class_weights")]
    pub class_weights: Option<ClassWeights>,
    #[serde(deserialize_with = "read::number")]
    pub label_smoothing: Option<f64>,
    #[serde(deserialize_with = "read::named")]
    pub loss: Option<RegressionLoss>,
    #[serde(deserialize_with = "read::number")]
    pub huber_delta: Option<f64>,
    #[serde(deserialize_with = "read::named")]
    pub target_transform: Option<TargetTransform>,
    #[serde(deserialize_with = "read::flag")]
    pub warm_start: Option<bool>,
}

/// Every option's key, in the order [`WrittenOptions`] declares them (the
/// order the "Known options" hint lists them).
pub const OPTION_KEYS: &[&str] = WrittenOptions::FIELD_NAMES_AS_SLICE;

/// The options each model of a training stack may set on its own. A stack
/// trains its models in one pass over the same batches, so everything that
/// shapes the network, the inputs, the batches or the validation rows must
/// be the same for all of them ([`TrainOptions::first_stack_mismatch`]); the
/// daemon claims queued jobs as companions of a stack only when their options
/// differ in none but these.
pub const PER_MODEL_OPTIONS: &[&str] = &[
    "learning_rate",
    "weight_decay",
    "epochs",
    "patience",
    "momentum",
    "schedule",
    "warmup_epochs",
    "clip_norm",
    "warm_start",
];

/// The options a warm-started version may set apart from the archived
/// version it continues from besides [`PER_MODEL_OPTIONS`]: with them,
/// parameter tuning. Everything else (the network, the inputs and their
/// encodings, the validation rows, the target's transform) must be the
/// same, or its weights mean something else, or its validation rows were
/// trained on.
pub const TUNING_OPTIONS: &[&str] =
    &["optimizer", "batch_size", "class_weights", "label_smoothing", "loss", "huber_delta"];

impl WrittenOptions {
    /// Reads a user's `options` JSON object. Keys are read in the object's
    /// order, and the first that cannot be read (unknown, of the wrong type
    /// or out of its limits) is the error, whatever follows it.
    pub fn read(value: &Value) -> Result<WrittenOptions, SpecError> {
        let obj = value.as_object().ok_or(SpecError::OptionsNotObject)?;
        // serde reads the entries one by one and stops at the first error:
        // the last key handed to it is the one that failed.
        let last_key = Cell::new("");
        let entries = obj.iter().map(|(key, v)| {
            last_key.set(key);
            (key.as_str(), v)
        });
        WrittenOptions::deserialize(MapDeserializer::<_, serde_json::Error>::new(entries)).map_err(|e| {
            let key = last_key.get();
            if !OPTION_KEYS.contains(&key) {
                return SpecError::UnknownOption(key.to_owned());
            }
            Problem::of(&e).unwrap_or_else(|| Problem::Type(e.to_string().into())).option(key)
        })
    }
}

impl TryFrom<WrittenOptions> for TrainOptions {
    type Error = SpecError;

    /// The written options over the defaults, validated.
    fn try_from(written: WrittenOptions) -> Result<TrainOptions, SpecError> {
        let d = TrainOptions::default();
        let WrittenOptions {
            hidden,
            activation,
            epochs,
            batch_size,
            learning_rate,
            weight_decay,
            seed,
            validation_fraction,
            split,
            patience,
            max_categories,
            optimizer,
            momentum,
            schedule,
            warmup_epochs,
            clip_norm,
            residual_blocks,
            norm,
            dropout,
            members,
            numeric_encoding,
            bins,
            periodic_frequencies,
            periodic_dim,
            periodic_sigma,
            onehot_max,
            encodings,
            class_weights,
            label_smoothing,
            loss,
            huber_delta,
            target_transform,
            warm_start,
        } = written;
        let opts = TrainOptions {
            hidden: hidden.unwrap_or(d.hidden),
            activation: activation.unwrap_or(d.activation),
            epochs: epochs.unwrap_or(d.epochs),
            batch_size: batch_size.unwrap_or(d.batch_size),
            learning_rate: learning_rate.unwrap_or(d.learning_rate),
            weight_decay: weight_decay.unwrap_or(d.weight_decay),
            seed: seed.unwrap_or(d.seed),
            validation_fraction: validation_fraction.unwrap_or(d.validation_fraction),
            split: split.unwrap_or(d.split),
            patience: patience.unwrap_or(d.patience),
            max_categories: max_categories.unwrap_or(d.max_categories),
            optimizer: optimizer.unwrap_or(d.optimizer),
            momentum: momentum.unwrap_or(d.momentum),
            schedule: schedule.unwrap_or(d.schedule),
            warmup_epochs: warmup_epochs.unwrap_or(d.warmup_epochs),
            clip_norm: clip_norm.unwrap_or(d.clip_norm),
            residual_blocks: residual_blocks.unwrap_or(d.residual_blocks),
            norm: norm.unwrap_or(d.norm),
            dropout: dropout.unwrap_or(d.dropout),
            members: members.unwrap_or(d.members),
            numeric_encoding: numeric_encoding.unwrap_or(d.numeric_encoding),
            bins: bins.unwrap_or(d.bins),
            periodic_frequencies: periodic_frequencies.unwrap_or(d.periodic_frequencies),
            periodic_dim: periodic_dim.unwrap_or(d.periodic_dim),
            periodic_sigma: periodic_sigma.unwrap_or(d.periodic_sigma),
            onehot_max: onehot_max.unwrap_or(d.onehot_max),
            encodings: encodings.unwrap_or(d.encodings),
            class_weights: class_weights.unwrap_or(d.class_weights),
            label_smoothing: label_smoothing.unwrap_or(d.label_smoothing),
            loss: loss.unwrap_or(d.loss),
            huber_delta: huber_delta.unwrap_or(d.huber_delta),
            target_transform: target_transform.unwrap_or(d.target_transform),
            warm_start: warm_start.unwrap_or(d.warm_start),
        };
        opts.validate()?;
        Ok(opts)
    }
}

impl TrainOptions {
    /// Reads the user's `options` JSON object over the defaults: as
    /// [`WrittenOptions::read`] reads it, then `TrainOptions::try_from`.
    pub fn from_json(value: Option<&Value>) -> Result<Self, SpecError> {
        match value {
            None => Ok(TrainOptions::default()),
            Some(value) => TrainOptions::try_from(WrittenOptions::read(value)?),
        }
    }

    /// The first option, in [`OPTION_KEYS`] order and not one of
    /// [`PER_MODEL_OPTIONS`], in which `other` differs from `self` (their
    /// stored values compared): why the two cannot train in one stack. None
    /// when they can.
    pub fn first_stack_mismatch(&self, other: &TrainOptions) -> Option<&'static str> {
        let (a, b) = (self.to_json(), other.to_json());
        OPTION_KEYS.iter().copied().filter(|key| !PER_MODEL_OPTIONS.contains(key)).find(|key| a.get(key) != b.get(key))
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        if self.hidden.len() > MAX_HIDDEN_LAYERS {
            return Err(too_many_layers(self.hidden.len()).option("hidden"));
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
        check_range("members", self.members as f64, 1.0, MAX_MEMBERS as f64)?;
        check_range("bins", self.bins as f64, MIN_BINS as f64, MAX_BINS as f64)?;
        let (frequencies, dim) = (self.periodic_frequencies as f64, self.periodic_dim as f64);
        check_range("periodic_frequencies", frequencies, 1.0, MAX_PERIODIC_FREQUENCIES as f64)?;
        check_range("periodic_dim", dim, 1.0, MAX_PERIODIC_DIM as f64)?;
        if !(self.periodic_sigma > 0.0 && self.periodic_sigma <= 100.0) {
            return Err(range_err(
                "periodic_sigma",
                show_number(self.periodic_sigma),
                "greater than 0 and at most 100".into(),
            ));
        }
        for (col, e) in &self.encodings {
            if let ColumnEncoding::Embedding(Some(d)) = e {
                if *d == 0 || *d > MAX_EMBEDDING_DIM {
                    return Err(embedding_width(col, &d.to_string()).option("encodings"));
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
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return Err(range_err(
                "label_smoothing",
                show_number(self.label_smoothing),
                "at least 0 and below 0.5".into(),
            ));
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
        if self.label_smoothing > 0.0 && !task.is_classification() {
            return Err(SpecError::OptionTask { key: "label_smoothing", task });
        }
        if self.loss == RegressionLoss::Huber && task != Task::Regression {
            return Err(SpecError::OptionTask { key: "loss", task });
        }
        let transforms = matches!(self.target_transform, TargetTransform::None | TargetTransform::Log);
        if transforms && task != Task::Regression {
            return Err(SpecError::OptionTask { key: "target_transform", task });
        }
        Ok(())
    }

    /// Whether a model of `task` with these options needs every target to
    /// be greater than 0 (a regression with `target_transform = "log"`):
    /// the INSERT checks the frozen rows, and says
    /// [`SpecError::TargetNotPositive`] if one is not.
    pub fn needs_positive_target(&self, task: Task) -> bool {
        task == Task::Regression && self.target_transform == TargetTransform::Log
    }

    /// What a column of SQL kind `sql` is to a model with these options:
    /// its kind's, but an integer column given a categorical encoding is a
    /// category (read as its text, `42`, by training and scoring alike).
    pub fn feature_kind(&self, column: &str, sql: SqlKind) -> FeatureKind {
        match self.encodings.get(column) {
            Some(e) if sql == SqlKind::Integer && !e.is_numeric() => FeatureKind::Categorical,
            _ => sql.feature_kind(),
        }
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
            Some(ColumnEncoding::Robust) => NumericEncoding::Robust,
            Some(ColumnEncoding::Periodic) => NumericEncoding::Periodic,
            _ => self.numeric_encoding,
        }
    }

    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("options always serialise")
    }

    /// Whether `self` and `other` differ in nothing but [`PER_MODEL_OPTIONS`]
    /// and [`TUNING_OPTIONS`] (their stored values compared): the same
    /// network on the same inputs and validation rows, so one may continue
    /// from the other's weights.
    pub fn differs_only_in_tuning(&self, other: &TrainOptions) -> bool {
        let (a, b) = (self.to_json(), other.to_json());
        let tuning = |k: &&&str| PER_MODEL_OPTIONS.contains(k) || TUNING_OPTIONS.contains(k);
        OPTION_KEYS.iter().filter(|k| !tuning(k)).all(|k| a.get(k) == b.get(k))
    }
}

fn range_err(key: &str, value: String, allowed: String) -> SpecError {
    SpecError::OptionRange { key: key.to_owned(), value, allowed }
}

fn check_range(key: &str, v: f64, lo: f64, hi: f64) -> Result<(), SpecError> {
    if !(lo..=hi).contains(&v) {
        return Err(range_err(key, show_number(v), format!("from {} to {}", show_number(lo), show_number(hi))));
    }
    Ok(())
}

/// What is wrong with one option's value; [`Problem::option`] names the key.
/// A reader runs inside serde, whose errors carry text only, so a problem
/// travels as its JSON text ([`Problem::raise`]) and is read back at the top
/// ([`Problem::of`]).
#[derive(Debug, Serialize, Deserialize)]
enum Problem {
    /// Not of the option's type: it must be this.
    Type(Cow<'static, str>),
    /// Of the right type, outside the option's limits.
    Range { value: String, allowed: String },
}

impl Problem {
    fn raise<E: de::Error>(self) -> E {
        E::custom(serde_json::to_string(&self).expect("a problem serialises"))
    }

    fn of(e: &impl fmt::Display) -> Option<Problem> {
        serde_json::from_str(&e.to_string()).ok()
    }

    /// `e` if it is a problem, else (serde found another shape than the
    /// reader takes) the type problem `expected`.
    fn or_type<E: de::Error>(e: E, expected: impl Into<Cow<'static, str>>) -> E {
        match Problem::of(&e) {
            Some(_) => e,
            None => Problem::Type(expected.into()).raise(),
        }
    }

    fn option(self, key: &str) -> SpecError {
        match self {
            Problem::Type(expected) => SpecError::OptionType { key: key.to_owned(), expected },
            Problem::Range { value, allowed } => SpecError::OptionRange { key: key.to_owned(), value, allowed },
        }
    }
}

fn too_many_layers(layers: usize) -> Problem {
    Problem::Range { value: format!("{layers} layers"), allowed: format!("at most {MAX_HIDDEN_LAYERS} layers") }
}

fn embedding_width(column: &str, width: &str) -> Problem {
    Problem::Range {
        value: format!("{width} for column \"{column}\""),
        allowed: format!("embedding widths from 1 to {MAX_EMBEDDING_DIM}"),
    }
}

/// How each option's value is read, for [`WrittenOptions`]'s `deserialize_with`.
/// A reader never looks inside an array or object it does not take (they
/// may be nested deep), and every error it returns is a [`Problem`].
mod read {
    use super::*;

    /// One JSON value as a reader sees it: a number, a string, or something
    /// else. An array or object is refused unread (a serde error), which a
    /// reader takes as "something else".
    enum Scalar {
        Number(Number),
        Str(String),
        Bool(bool),
        Other,
    }

    impl<'de> Deserialize<'de> for Scalar {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Scalar, D::Error> {
            struct V;
            impl Visitor<'_> for V {
                type Value = Scalar;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a number or a string")
                }
                fn visit_u64<E>(self, x: u64) -> Result<Scalar, E> {
                    Ok(Scalar::Number(x.into()))
                }
                fn visit_i64<E>(self, x: i64) -> Result<Scalar, E> {
                    Ok(Scalar::Number(x.into()))
                }
                fn visit_f64<E>(self, x: f64) -> Result<Scalar, E> {
                    Ok(Number::from_f64(x).map_or(Scalar::Other, Scalar::Number))
                }
                fn visit_str<E>(self, s: &str) -> Result<Scalar, E> {
                    Ok(Scalar::Str(s.to_owned()))
                }
                fn visit_bool<E>(self, b: bool) -> Result<Scalar, E> {
                    Ok(Scalar::Bool(b))
                }
                fn visit_unit<E>(self) -> Result<Scalar, E> {
                    Ok(Scalar::Other)
                }
                fn visit_none<E>(self) -> Result<Scalar, E> {
                    Ok(Scalar::Other)
                }
            }
            d.deserialize_any(V)
        }
    }

    impl Scalar {
        fn read<'de, D: Deserializer<'de>>(d: D) -> Scalar {
            Scalar::deserialize(d).unwrap_or(Scalar::Other)
        }

        fn number(&self) -> Option<&Number> {
            match self {
                Scalar::Number(n) => Some(n),
                _ => None,
            }
        }
    }

    /// A whole-number option from `LO` to `HI`.
    pub(super) fn whole<'de, D: Deserializer<'de>, const LO: u32, const HI: u32>(
        d: D,
    ) -> Result<Option<u32>, D::Error> {
        let expected = if LO == 0 { "a non-negative integer" } else { "a positive integer" };
        let x = whole_number(Scalar::read(d).number(), LO.into(), HI.into(), expected, None).map_err(Problem::raise)?;
        Ok(Some(x as u32)) // at most HI
    }

    pub(super) fn seed<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        whole_number(Scalar::read(d).number(), 0, u64::MAX, "a non-negative integer", None)
            .map(Some)
            .map_err(Problem::raise)
    }

    /// true or false (as JSON, or as the words a spec writes).
    pub(super) fn flag<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
        match Scalar::read(d) {
            Scalar::Bool(b) => Some(b),
            Scalar::Str(s) if s == "true" => Some(true),
            Scalar::Str(s) if s == "false" => Some(false),
            _ => None,
        }
        .map(Some)
        .ok_or_else(|| Problem::Type("true or false".into()).raise())
    }

    /// A finite number.
    pub(super) fn number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        match Scalar::read(d) {
            Scalar::Number(n) => n.as_f64().filter(|x| x.is_finite()),
            _ => None,
        }
        .map(Some)
        .ok_or_else(|| Problem::Type("a number".into()).raise())
    }

    /// One of the names serde gives the values of enum `E`.
    pub(super) fn named<'de, D: Deserializer<'de>, E: DeserializeOwned>(d: D) -> Result<Option<E>, D::Error> {
        match Scalar::read(d) {
            Scalar::Str(s) => by_name(&s),
            _ => None,
        }
        .map(Some)
        .ok_or_else(|| Problem::Type(one_of::<E>().into()).raise())
    }

    /// Layer widths: at most [`MAX_HIDDEN_LAYERS`] of them (said before any
    /// width is looked at), each from 1 to [`MAX_LAYER_WIDTH`].
    pub(super) fn hidden<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u32>>, D::Error> {
        struct Widths;
        impl<'de> Visitor<'de> for Widths {
            type Value = Vec<u32>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of layer widths")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u32>, A::Error> {
                if let Some(layers) = seq.size_hint().filter(|n| *n > MAX_HIDDEN_LAYERS) {
                    return Err(too_many_layers(layers).raise());
                }
                let allowed = format!("widths from 1 to {MAX_LAYER_WIDTH}");
                let mut widths = Vec::new();
                loop {
                    let w = match seq.next_element::<Scalar>() {
                        Ok(None) => break,
                        Ok(Some(w)) => w,
                        Err(_) => Scalar::Other,
                    };
                    let w = whole_number(
                        w.number(),
                        1,
                        MAX_LAYER_WIDTH.into(),
                        "an array of positive integers",
                        Some(&allowed),
                    )
                    .map_err(Problem::raise)?;
                    widths.push(w as u32); // at most MAX_LAYER_WIDTH
                }
                // Only where the length was not known before.
                if widths.len() > MAX_HIDDEN_LAYERS {
                    return Err(too_many_layers(widths.len()).raise());
                }
                Ok(widths)
            }
        }
        d.deserialize_any(Widths).map(Some).map_err(|e| Problem::or_type(e, "an array of layer widths"))
    }

    /// Column names to an encoding's name or an embedding width; the first
    /// column that cannot be read is the error.
    pub(super) fn encodings<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<BTreeMap<String, ColumnEncoding>>, D::Error> {
        struct Encodings;
        impl<'de> Visitor<'de> for Encodings {
            type Value = BTreeMap<String, ColumnEncoding>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of encodings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = BTreeMap::new();
                while let Some(column) = map.next_key::<String>()? {
                    let encoding = match map.next_value::<Scalar>().unwrap_or(Scalar::Other) {
                        // A width: out of range is said as such, not as a wrong shape.
                        Scalar::Number(n) => whole_number(Some(&n), 1, MAX_EMBEDDING_DIM.into(), "", None)
                            .map(|d| ColumnEncoding::Embedding(Some(d as u32)))
                            .map_err(|_| embedding_width(&column, &show_json_number(&n))),
                        Scalar::Str(name) => {
                            ColumnEncoding::named(&name).ok_or_else(|| Problem::Type(encodings_shape().into()))
                        }
                        Scalar::Bool(_) | Scalar::Other => Err(Problem::Type(encodings_shape().into())),
                    };
                    out.insert(column, encoding.map_err(Problem::raise)?);
                }
                Ok(out)
            }
        }
        d.deserialize_any(Encodings).map(Some).map_err(|e| Problem::or_type(e, encodings_shape()))
    }

    /// `"none"`, `"balanced"` or labels to finite numbers (their limits are
    /// [`TrainOptions::validate`]'s).
    pub(super) fn class_weights<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ClassWeights>, D::Error> {
        struct Weights;
        impl<'de> Visitor<'de> for Weights {
            type Value = ClassWeights;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("class weights")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<ClassWeights, E> {
                ClassWeights::named(s).ok_or_else(|| E::invalid_value(de::Unexpected::Str(s), &self))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ClassWeights, A::Error> {
                let mut weights = BTreeMap::new();
                while let Some(label) = map.next_key::<String>()? {
                    let weight = map.next_value::<Scalar>().ok().and_then(|w| w.number()?.as_f64());
                    let weight = weight.filter(|w| w.is_finite()).ok_or_else(|| de::Error::custom("not a weight"))?;
                    weights.insert(label, weight);
                }
                Ok(ClassWeights::Explicit(weights))
            }
        }
        // Every way these go wrong is the one type error.
        d.deserialize_any(Weights).map(Some).map_err(|_| Problem::Type(class_weights_shape().into()).raise())
    }

    /// A whole number from `lo` to `hi`. A whole number outside them
    /// (negative, too large, or so large JSON reads it as a float) is a range
    /// problem that says `allowed` (or "from lo to hi"); a fraction or another
    /// type is the type problem `expected`. Never a value clamped.
    fn whole_number(
        n: Option<&Number>,
        lo: u64,
        hi: u64,
        expected: &'static str,
        allowed: Option<&str>,
    ) -> Result<u64, Problem> {
        let out_of_range = |value: String| Problem::Range {
            value,
            allowed: allowed.map_or_else(|| format!("from {lo} to {hi}"), str::to_owned),
        };
        let Some(n) = n else { return Err(Problem::Type(expected.into())) };
        if let Some(x) = n.as_u64() {
            return if (lo..=hi).contains(&x) { Ok(x) } else { Err(out_of_range(x.to_string())) };
        }
        if let Some(x) = n.as_i64() {
            return Err(out_of_range(x.to_string()));
        }
        match n.as_f64() {
            Some(x) if x.fract() == 0.0 && !(lo as f64..=hi as f64).contains(&x) => Err(out_of_range(show_number(x))),
            _ => Err(Problem::Type(expected.into())),
        }
    }

    /// A JSON number as messages show it.
    fn show_json_number(n: &Number) -> String {
        match n.as_f64() {
            Some(x) if n.is_f64() => show_number(x),
            _ => n.to_string(),
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

    /// What every kind of bad options says, word for word: these texts reach
    /// users (SQL errors, selection specs) and must not change by accident.
    /// Where several keys are bad, the first in the object's key order is the
    /// one reported.
    #[test]
    fn bad_options_are_reported_word_for_word() {
        let cases = [
            (r#"{"hidden":"64"}"#, r#"option "hidden" must be an array of layer widths"#),
            (r#"{"hidden":[64,"a"]}"#, r#"option "hidden" must be an array of positive integers"#),
            (r#"{"hidden":[64,2.5]}"#, r#"option "hidden" must be an array of positive integers"#),
            (r#"{"hidden":[64,0]}"#, r#"option "hidden" is 0, allowed: widths from 1 to 4096"#),
            (r#"{"hidden":[64,4097]}"#, r#"option "hidden" is 4097, allowed: widths from 1 to 4096"#),
            (r#"{"hidden":[1,1,1,1,1,1,1,1,1]}"#, r#"option "hidden" is 9 layers, allowed: at most 8 layers"#),
            (r#"{"hidden":[null]}"#, r#"option "hidden" must be an array of positive integers"#),
            (r#"{"activation":"swish"}"#, r#"option "activation" must be one of "relu", "gelu", "silu", "tanh""#),
            (r#"{"activation":1}"#, r#"option "activation" must be one of "relu", "gelu", "silu", "tanh""#),
            (r#"{"activation":{"relu":null}}"#, r#"option "activation" must be one of "relu", "gelu", "silu", "tanh""#),
            (r#"{"epochs":"ten"}"#, r#"option "epochs" must be a positive integer"#),
            (r#"{"epochs":0}"#, r#"option "epochs" is 0, allowed: from 1 to 100000"#),
            (r#"{"epochs":null}"#, r#"option "epochs" must be a positive integer"#),
            (r#"{"epochs":2.5}"#, r#"option "epochs" must be a positive integer"#),
            (r#"{"batch_size":0}"#, r#"option "batch_size" is 0, allowed: from 1 to 65536"#),
            (r#"{"batch_size":true}"#, r#"option "batch_size" must be a positive integer"#),
            (r#"{"learning_rate":"x"}"#, r#"option "learning_rate" must be a number"#),
            (r#"{"learning_rate":0}"#, r#"option "learning_rate" is 0, allowed: greater than 0 and at most 10"#),
            (r#"{"learning_rate":null}"#, r#"option "learning_rate" must be a number"#),
            (r#"{"weight_decay":2}"#, r#"option "weight_decay" is 2, allowed: from 0 to 1"#),
            (r#"{"weight_decay":[]}"#, r#"option "weight_decay" must be a number"#),
            (r#"{"seed":-1}"#, r#"option "seed" is -1, allowed: from 0 to 18446744073709551615"#),
            (r#"{"seed":1.5}"#, r#"option "seed" must be a non-negative integer"#),
            (r#"{"seed":"1"}"#, r#"option "seed" must be a non-negative integer"#),
            (
                r#"{"validation_fraction":0.6}"#,
                r#"option "validation_fraction" is 0.6, allowed: greater than 0 and at most 0.5"#,
            ),
            (r#"{"validation_fraction":"a"}"#, r#"option "validation_fraction" must be a number"#),
            (r#"{"split":"time"}"#, r#"option "split" must be one of "random", "ordered""#),
            (r#"{"split":null}"#, r#"option "split" must be one of "random", "ordered""#),
            (r#"{"patience":-1}"#, r#"option "patience" is -1, allowed: from 0 to 4294967295"#),
            (r#"{"patience":"x"}"#, r#"option "patience" must be a non-negative integer"#),
            (r#"{"max_categories":0}"#, r#"option "max_categories" is 0, allowed: from 1 to 100000"#),
            (r#"{"max_categories":100001}"#, r#"option "max_categories" is 100001, allowed: from 1 to 100000"#),
            (r#"{"max_categories":[1]}"#, r#"option "max_categories" must be a positive integer"#),
            (r#"{"optimizer":"lbfgs"}"#, r#"option "optimizer" must be one of "adam", "adamw", "sgd""#),
            (r#"{"optimizer":"Adam"}"#, r#"option "optimizer" must be one of "adam", "adamw", "sgd""#),
            (r#"{"momentum":1}"#, r#"option "momentum" is 1, allowed: at least 0 and below 1"#),
            (r#"{"momentum":"x"}"#, r#"option "momentum" must be a number"#),
            (r#"{"schedule":"step"}"#, r#"option "schedule" must be one of "constant", "cosine", "warmup""#),
            (r#"{"schedule":3}"#, r#"option "schedule" must be one of "constant", "cosine", "warmup""#),
            (r#"{"warmup_epochs":-2}"#, r#"option "warmup_epochs" is -2, allowed: from 0 to 4294967295"#),
            (r#"{"warmup_epochs":"x"}"#, r#"option "warmup_epochs" must be a non-negative integer"#),
            (
                r#"{"schedule":"warmup","warmup_epochs":30}"#,
                r#"option "warmup_epochs" is 30, allowed: fewer than epochs (30)"#,
            ),
            (r#"{"clip_norm":-1}"#, r#"option "clip_norm" is -1, allowed: from 0 to 1000000"#),
            (r#"{"clip_norm":"x"}"#, r#"option "clip_norm" must be a number"#),
            (r#"{"residual_blocks":17}"#, r#"option "residual_blocks" is 17, allowed: from 0 to 16"#),
            (
                r#"{"hidden":[],"residual_blocks":1}"#,
                r#"option "residual_blocks" is 1, allowed: 0 when there are no hidden layers (blocks are as wide as the last one)"#,
            ),
            (r#"{"residual_blocks":0.5}"#, r#"option "residual_blocks" must be a non-negative integer"#),
            (r#"{"norm":"group"}"#, r#"option "norm" must be one of "none", "batch", "layer""#),
            (r#"{"norm":null}"#, r#"option "norm" must be one of "none", "batch", "layer""#),
            (r#"{"dropout":0.95}"#, r#"option "dropout" is 0.95, allowed: at least 0 and below 0.95"#),
            (r#"{"dropout":"x"}"#, r#"option "dropout" must be a number"#),
            (
                r#"{"numeric_encoding":"log"}"#,
                r#"option "numeric_encoding" must be one of "standard", "quantile", "ple", "robust", "periodic""#,
            ),
            (
                r#"{"numeric_encoding":1}"#,
                r#"option "numeric_encoding" must be one of "standard", "quantile", "ple", "robust", "periodic""#,
            ),
            (r#"{"bins":1}"#, r#"option "bins" is 1, allowed: from 2 to 256"#),
            (r#"{"bins":257}"#, r#"option "bins" is 257, allowed: from 2 to 256"#),
            (r#"{"bins":"x"}"#, r#"option "bins" must be a positive integer"#),
            (r#"{"onehot_max":-1}"#, r#"option "onehot_max" is -1, allowed: from 0 to 4294967295"#),
            (r#"{"onehot_max":4294967296}"#, r#"option "onehot_max" is 4294967296, allowed: from 0 to 4294967295"#),
            (r#"{"onehot_max":"x"}"#, r#"option "onehot_max" must be a non-negative integer"#),
            (
                r#"{"encodings":[]}"#,
                r#"option "encodings" must be an object from column names to "standard", "quantile", "ple", "robust", "periodic", "category", "onehot", "embedding" or an embedding width"#,
            ),
            (
                r#"{"encodings":{"x":"log"}}"#,
                r#"option "encodings" must be an object from column names to "standard", "quantile", "ple", "robust", "periodic", "category", "onehot", "embedding" or an embedding width"#,
            ),
            (
                r#"{"encodings":{"x":0}}"#,
                r#"option "encodings" is 0 for column "x", allowed: embedding widths from 1 to 512"#,
            ),
            (
                r#"{"encodings":{"x":513}}"#,
                r#"option "encodings" is 513 for column "x", allowed: embedding widths from 1 to 512"#,
            ),
            (
                r#"{"encodings":{"x":2.5}}"#,
                r#"option "encodings" is 2.5 for column "x", allowed: embedding widths from 1 to 512"#,
            ),
            (
                r#"{"encodings":{"x":-1}}"#,
                r#"option "encodings" is -1 for column "x", allowed: embedding widths from 1 to 512"#,
            ),
            (
                r#"{"encodings":{"x":null}}"#,
                r#"option "encodings" must be an object from column names to "standard", "quantile", "ple", "robust", "periodic", "category", "onehot", "embedding" or an embedding width"#,
            ),
            (
                r#"{"encodings":{"x":1e+300}}"#,
                r#"option "encodings" is 1e300 for column "x", allowed: embedding widths from 1 to 512"#,
            ),
            (
                r#"{"encodings":{"a":0,"b":"log"}}"#,
                r#"option "encodings" is 0 for column "a", allowed: embedding widths from 1 to 512"#,
            ),
            (
                r#"{"encodings":{"a":"log","b":0}}"#,
                r#"option "encodings" must be an object from column names to "standard", "quantile", "ple", "robust", "periodic", "category", "onehot", "embedding" or an embedding width"#,
            ),
            (
                r#"{"class_weights":"inverse"}"#,
                r#"option "class_weights" must be "none", "balanced" or an object from labels to positive numbers"#,
            ),
            (
                r#"{"class_weights":[1]}"#,
                r#"option "class_weights" must be "none", "balanced" or an object from labels to positive numbers"#,
            ),
            (
                r#"{"class_weights":{"yes":-1}}"#,
                r#"option "class_weights" is -1 for "yes", allowed: greater than 0 and at most 1000000"#,
            ),
            (
                r#"{"class_weights":{"yes":"2"}}"#,
                r#"option "class_weights" must be "none", "balanced" or an object from labels to positive numbers"#,
            ),
            (
                r#"{"class_weights":{"yes":2000000.0}}"#,
                r#"option "class_weights" is 2000000 for "yes", allowed: greater than 0 and at most 1000000"#,
            ),
            (
                r#"{"class_weights":null}"#,
                r#"option "class_weights" must be "none", "balanced" or an object from labels to positive numbers"#,
            ),
            (r#"{"loss":"mae"}"#, r#"option "loss" must be one of "mse", "huber""#),
            (r#"{"loss":null}"#, r#"option "loss" must be one of "mse", "huber""#),
            (r#"{"huber_delta":0}"#, r#"option "huber_delta" is 0, allowed: greater than 0 and at most 1000"#),
            (r#"{"huber_delta":1001}"#, r#"option "huber_delta" is 1001, allowed: greater than 0 and at most 1000"#),
            (r#"{"huber_delta":"x"}"#, r#"option "huber_delta" must be a number"#),
            (r#"{"label_smoothing":0.5}"#, r#"option "label_smoothing" is 0.5, allowed: at least 0 and below 0.5"#),
            (r#"{"label_smoothing":0.7}"#, r#"option "label_smoothing" is 0.7, allowed: at least 0 and below 0.5"#),
            (r#"{"label_smoothing":-0.1}"#, r#"option "label_smoothing" is -0.1, allowed: at least 0 and below 0.5"#),
            (r#"{"label_smoothing":"0.1"}"#, r#"option "label_smoothing" must be a number"#),
            (r#"{"label_smoothing":null}"#, r#"option "label_smoothing" must be a number"#),
            (
                r#"{"target_transform":"sqrt"}"#,
                r#"option "target_transform" must be one of "none", "standardize", "log", "auto""#,
            ),
            (
                r#"{"target_transform":"Log"}"#,
                r#"option "target_transform" must be one of "none", "standardize", "log", "auto""#,
            ),
            (
                r#"{"target_transform":true}"#,
                r#"option "target_transform" must be one of "none", "standardize", "log", "auto""#,
            ),
            (r#"{"epoch":3}"#, r#"unknown option "epoch""#),
            (r#"{"Epochs":3}"#, r#"unknown option "Epochs""#),
            (r#"{"":3}"#, r#"unknown option """#),
            (r#"[1]"#, r#"options must be a JSON object"#),
            (r#""x""#, r#"options must be a JSON object"#),
            (r#"null"#, r#"options must be a JSON object"#),
            (r#"3"#, r#"options must be a JSON object"#),
            (r#"{"bins":1,"epochs":0}"#, r#"option "bins" is 1, allowed: from 2 to 256"#),
            (r#"{"epochs":0,"hidden":"x"}"#, r#"option "epochs" is 0, allowed: from 1 to 100000"#),
            (r#"{"epochs":0,"zzz":1}"#, r#"option "epochs" is 0, allowed: from 1 to 100000"#),
            (r#"{"learning_rate":-1,"zzz":1}"#, r#"unknown option "zzz""#),
            (r#"{"epochs":"x","learning_rate":-1}"#, r#"option "epochs" must be a positive integer"#),
            (r#"{"activation":"x","epoch":3}"#, r#"option "activation" must be one of "relu", "gelu", "silu", "tanh""#),
            (r#"{"bins":0,"dropout":2}"#, r#"option "bins" is 0, allowed: from 2 to 256"#),
            (r#"{"aaa":1,"activation":"x"}"#, r#"unknown option "aaa""#),
            (r#"{"hidden":[0],"learning_rate":0}"#, r#"option "hidden" is 0, allowed: widths from 1 to 4096"#),
        ];
        for (input, said) in cases {
            let v: Value = serde_json::from_str(input).unwrap();
            let e = TrainOptions::from_json(Some(&v)).unwrap_err();
            assert_eq!(e.to_string(), said, "{input}");
            let shape_ok = match &e {
                SpecError::OptionType { key, .. } => said.starts_with(&format!("option \"{key}\" must be ")),
                SpecError::OptionRange { key, .. } => said.starts_with(&format!("option \"{key}\" is ")),
                SpecError::UnknownOption(key) => said == format!("unknown option \"{key}\""),
                SpecError::OptionsNotObject => true,
                _ => false,
            };
            assert!(shape_ok, "{input}: {e:?}");
        }
        let e = TrainOptions::from_json(Some(&json!({"epoch": 3}))).unwrap_err();
        assert_eq!(
            e.hint().unwrap(),
            "Known options: hidden, activation, epochs, batch_size, learning_rate, weight_decay, seed, \
             validation_fraction, split, patience, max_categories, optimizer, momentum, schedule, warmup_epochs, \
             clip_norm, residual_blocks, norm, dropout, members, numeric_encoding, bins, periodic_frequencies, \
             periodic_dim, periodic_sigma, onehot_max, encodings, class_weights, label_smoothing, loss, \
             huber_delta, target_transform, warm_start."
        );
        // The fields of the variants, not only their text.
        assert_eq!(
            TrainOptions::from_json(Some(&json!({"activation": "swish"}))).unwrap_err(),
            SpecError::OptionType {
                key: "activation".into(),
                expected: "one of \"relu\", \"gelu\", \"silu\", \"tanh\"".into()
            }
        );
        assert_eq!(
            TrainOptions::from_json(Some(&json!({"encodings": {"city": 0}}))).unwrap_err(),
            SpecError::OptionRange {
                key: "encodings".into(),
                value: "0 for column \"city\"".into(),
                allowed: "embedding widths from 1 to 512".into()
            }
        );
    }

    /// The stored JSON of options, byte for byte: the daemon and the catalog
    /// compare and read it back.
    #[test]
    fn options_are_stored_byte_for_byte() {
        assert_eq!(
            TrainOptions::default().to_json().to_string(),
            r#"{"activation":"relu","batch_size":128,"bins":16,"class_weights":"none","clip_norm":0.0,"dropout":0.0,"encodings":{},"epochs":30,"hidden":[64,32],"huber_delta":1.0,"label_smoothing":0.0,"learning_rate":0.001,"loss":"mse","max_categories":1000,"members":1,"momentum":0.9,"norm":"none","numeric_encoding":"ple","onehot_max":16,"optimizer":"adam","patience":5,"periodic_dim":16,"periodic_frequencies":16,"periodic_sigma":0.1,"residual_blocks":0,"schedule":"constant","seed":42,"split":"random","target_transform":"standardize","validation_fraction":0.2,"warmup_epochs":0,"weight_decay":0.0}"#
        );
        let full = json!({
            "hidden": [128, 64, 32], "activation": "gelu", "epochs": 50, "batch_size": 256, "learning_rate": 0.003,
            "weight_decay": 0.0001, "seed": 7, "validation_fraction": 0.25, "split": "ordered", "patience": 9,
            "max_categories": 500, "optimizer": "sgd", "momentum": 0.85, "schedule": "warmup", "warmup_epochs": 4,
            "clip_norm": 2.5, "residual_blocks": 2, "norm": "layer", "dropout": 0.1, "numeric_encoding": "quantile",
            "bins": 32, "onehot_max": 8, "class_weights": {"no": 1, "yes": 2.5}, "loss": "huber", "huber_delta": 1.5,
            "encodings": {
                "tenure": "ple", "city": 12, "plan": "onehot", "state": "embedding", "age": "standard", "fare": "quantile"
            }
        });
        assert_eq!(
            TrainOptions::from_json(Some(&full)).unwrap().to_json().to_string(),
            r#"{"activation":"gelu","batch_size":256,"bins":32,"class_weights":{"no":1.0,"yes":2.5},"clip_norm":2.5,"dropout":0.1,"encodings":{"age":"standard","city":12,"fare":"quantile","plan":"onehot","state":"embedding","tenure":"ple"},"epochs":50,"hidden":[128,64,32],"huber_delta":1.5,"label_smoothing":0.0,"learning_rate":0.003,"loss":"huber","max_categories":500,"members":1,"momentum":0.85,"norm":"layer","numeric_encoding":"quantile","onehot_max":8,"optimizer":"sgd","patience":9,"periodic_dim":16,"periodic_frequencies":16,"periodic_sigma":0.1,"residual_blocks":2,"schedule":"warmup","seed":7,"split":"ordered","target_transform":"standardize","validation_fraction":0.25,"warmup_epochs":4,"weight_decay":0.0001}"#
        );
        let other = json!({
            "class_weights": "balanced", "optimizer": "adamw", "schedule": "cosine", "norm": "batch",
            "activation": "silu", "loss": "mse"
        });
        assert_eq!(
            TrainOptions::from_json(Some(&other)).unwrap().to_json().to_string(),
            r#"{"activation":"silu","batch_size":128,"bins":16,"class_weights":"balanced","clip_norm":0.0,"dropout":0.0,"encodings":{},"epochs":30,"hidden":[64,32],"huber_delta":1.0,"label_smoothing":0.0,"learning_rate":0.001,"loss":"mse","max_categories":1000,"members":1,"momentum":0.9,"norm":"batch","numeric_encoding":"ple","onehot_max":16,"optimizer":"adamw","patience":5,"periodic_dim":16,"periodic_frequencies":16,"periodic_sigma":0.1,"residual_blocks":0,"schedule":"cosine","seed":42,"split":"random","target_transform":"standardize","validation_fraction":0.2,"warmup_epochs":0,"weight_decay":0.0}"#
        );
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
    fn robust_encoding_is_read_and_stored_as_robust() {
        let written = json!({"numeric_encoding": "robust", "encodings": {"fare": "robust", "age": "ple"}});
        let o = TrainOptions::from_json(Some(&written)).unwrap();
        assert_eq!(o.numeric_encoding, NumericEncoding::Robust);
        assert_eq!(o.encodings["fare"], ColumnEncoding::Robust);
        assert_eq!(o.numeric_encoding("fare"), NumericEncoding::Robust);
        assert_eq!(o.numeric_encoding("age"), NumericEncoding::Ple);
        assert_eq!(o.numeric_encoding("other"), NumericEncoding::Robust);
        assert_eq!(o.to_json()["numeric_encoding"], json!("robust"));
        assert_eq!(o.to_json()["encodings"], written["encodings"], "stored as written");
        let stored: TrainOptions = serde_json::from_value(o.to_json()).unwrap();
        assert_eq!(stored, o);
        let per_column = TrainOptions::from_json(Some(&json!({"encodings": {"fare": "robust"}}))).unwrap();
        assert_eq!(per_column.numeric_encoding("fare"), NumericEncoding::Robust);
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
        check(json!({"encodings": {"tenure": "robust"}}), Task::Binary).unwrap();
        // An integer column given "category" arrives here a category already
        // (TrainOptions::feature_kind); one still numeric is a real number.
        assert_eq!(
            check(json!({"encodings": {"tenure": "category"}}), Task::Binary).unwrap_err().to_string(),
            "option \"encodings\" gives numeric column \"tenure\" the categorical encoding \"category\""
        );
        assert_eq!(
            check(json!({"encodings": {"plan": "ple"}}), Task::Binary).unwrap_err().to_string(),
            "option \"encodings\" gives categorical column \"plan\" the numeric encoding \"ple\""
        );
        assert!(matches!(
            check(json!({"encodings": {"plan": "robust"}}), Task::Binary),
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
    fn periodic_embeddings_are_an_encoding_with_checked_sizes() {
        let o = TrainOptions::from_json(Some(&json!({
            "numeric_encoding": "periodic", "periodic_frequencies": 8, "periodic_dim": 4, "periodic_sigma": 0.5,
            "encodings": {"age": "ple", "fare": "periodic"}
        })))
        .unwrap();
        assert_eq!(
            (o.numeric_encoding("other"), o.numeric_encoding("age")),
            (NumericEncoding::Periodic, NumericEncoding::Ple)
        );
        assert_eq!(o.numeric_encoding("fare"), NumericEncoding::Periodic);
        assert_eq!((o.periodic_frequencies, o.periodic_dim, o.periodic_sigma), (8, 4, 0.5));
        let err = |v: Value| TrainOptions::from_json(Some(&v)).unwrap_err().to_string();
        assert_eq!(
            err(json!({"periodic_frequencies": 0})),
            r#"option "periodic_frequencies" is 0, allowed: from 1 to 128"#
        );
        assert_eq!(err(json!({"members": 17})), r#"option "members" is 17, allowed: from 1 to 16"#);
        assert_eq!(err(json!({"members": 0})), r#"option "members" is 0, allowed: from 1 to 16"#);
        assert_eq!(err(json!({"periodic_dim": 129})), r#"option "periodic_dim" is 129, allowed: from 1 to 128"#);
        assert_eq!(
            err(json!({"periodic_sigma": 0})),
            r#"option "periodic_sigma" is 0, allowed: greater than 0 and at most 100"#
        );
        assert_eq!(err(json!({"periodic_sigma": "wide"})), r#"option "periodic_sigma" must be a number"#);
        let check = |v: Value| {
            TrainOptions::from_json(Some(&v)).unwrap().check_against(
                &[Feature { name: "plan".into(), kind: FeatureKind::Categorical }],
                Task::Binary,
                &[],
            )
        };
        assert!(check(json!({"encodings": {"plan": "periodic"}})).is_err(), "a categorical column is not periodic");
    }

    #[test]
    fn label_smoothing_and_target_transforms_are_checked() {
        let o = TrainOptions::from_json(Some(&json!({"label_smoothing": 0.1, "target_transform": "log"}))).unwrap();
        assert_eq!((o.label_smoothing, o.target_transform), (0.1, TargetTransform::Log));
        let d = TrainOptions::default();
        assert_eq!((d.label_smoothing, d.target_transform), (0.0, TargetTransform::Standardize));
        // Options stored before these keys existed read as what training did then.
        let old: TrainOptions = serde_json::from_value(json!({"epochs": 3})).unwrap();
        assert_eq!((old.label_smoothing, old.target_transform), (0.0, TargetTransform::Standardize));
        // Out of range and of the wrong type: the exact errors.
        let err = |v: Value| TrainOptions::from_json(Some(&v)).unwrap_err();
        assert_eq!(
            err(json!({"label_smoothing": 0.7})),
            SpecError::OptionRange {
                key: "label_smoothing".into(),
                value: "0.7".into(),
                allowed: "at least 0 and below 0.5".into()
            }
        );
        assert_eq!(
            err(json!({"label_smoothing": 0.5})),
            SpecError::OptionRange {
                key: "label_smoothing".into(),
                value: "0.5".into(),
                allowed: "at least 0 and below 0.5".into()
            }
        );
        assert!(TrainOptions::from_json(Some(&json!({"label_smoothing": 0.4999}))).is_ok());
        assert!(TrainOptions::from_json(Some(&json!({"label_smoothing": 0}))).is_ok());
        assert_eq!(
            err(json!({"label_smoothing": "a lot"})),
            SpecError::OptionType { key: "label_smoothing".into(), expected: "a number".into() }
        );
        assert_eq!(
            err(json!({"target_transform": "sqrt"})),
            SpecError::OptionType {
                key: "target_transform".into(),
                expected: "one of \"none\", \"standardize\", \"log\", \"auto\"".into()
            }
        );
        // Each on the wrong task.
        let check = |v: Value, task| TrainOptions::from_json(Some(&v)).unwrap().check_against(&[], task, &[]);
        for task in [Task::Binary, Task::Multiclass] {
            check(json!({"label_smoothing": 0.2}), task).unwrap();
            // standardize, the default, leaves a class alone; so does auto.
            check(json!({"target_transform": "standardize"}), task).unwrap();
            check(json!({"target_transform": "auto"}), task).unwrap();
            for transform in ["none", "log"] {
                assert_eq!(
                    check(json!({ "target_transform": transform }), task),
                    Err(SpecError::OptionTask { key: "target_transform", task })
                );
            }
        }
        assert_eq!(
            check(json!({"label_smoothing": 0.1}), Task::Regression),
            Err(SpecError::OptionTask { key: "label_smoothing", task: Task::Regression })
        );
        assert_eq!(
            check(json!({"label_smoothing": 0.1}), Task::Regression).unwrap_err().to_string(),
            "option \"label_smoothing\" does not apply to a regression model"
        );
        for transform in ["none", "standardize", "log", "auto"] {
            check(json!({ "target_transform": transform, "label_smoothing": 0 }), Task::Regression).unwrap();
        }
        // Only a log transform of a regression needs a positive target.
        let needs = |v: Value, task| TrainOptions::from_json(Some(&v)).unwrap().needs_positive_target(task);
        assert!(needs(json!({"target_transform": "log"}), Task::Regression));
        assert!(!needs(json!({"target_transform": "auto"}), Task::Regression));
        assert!(!needs(json!({}), Task::Regression));
        let e = SpecError::TargetNotPositive { target: "price".into(), smallest: "-3".into() };
        assert_eq!(
            e.to_string(),
            "option \"target_transform\" is \"log\", but target column \"price\" has values that are not greater \
             than 0 (the smallest is -3); ln(y) needs every target > 0"
        );
        assert!(e.hint().unwrap().contains("\"auto\""));
    }

    #[test]
    fn integer_columns_given_a_categorical_encoding_are_categories() {
        let o =
            TrainOptions::from_json(Some(&json!({"encodings": {"a": "category", "b": 8, "c": "periodic"}}))).unwrap();
        assert_eq!(o.feature_kind("a", SqlKind::Integer), FeatureKind::Categorical);
        assert_eq!(o.feature_kind("b", SqlKind::Integer), FeatureKind::Categorical);
        assert_eq!(o.feature_kind("c", SqlKind::Integer), FeatureKind::Numeric);
        assert_eq!(o.feature_kind("x", SqlKind::Integer), FeatureKind::Numeric);
        // A real number is never a category: check_against says so.
        assert_eq!(o.feature_kind("a", SqlKind::Real), FeatureKind::Numeric);
        assert_eq!(o.feature_kind("a", SqlKind::Text), FeatureKind::Categorical);
        // "category" follows the size rule, as a text column does by default.
        assert_eq!(o.categorical_encoding("a", 16), CategoricalEncoding::OneHot);
        assert_eq!(o.categorical_encoding("a", 300), CategoricalEncoding::Embedding(embedding_dim(300) as u32));
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

    /// The names in messages are serde's, in their order, and each reads
    /// back as the value that writes it.
    #[test]
    fn every_listed_name_round_trips_through_serde() {
        fn check<E: Serialize + DeserializeOwned>(listed: &str) {
            for name in serde_introspect::<E>() {
                let e: E = serde_json::from_value(json!(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(name_value(e), json!(name));
                assert!(by_name::<E>(name).is_some(), "{name}");
            }
            assert_eq!(names::<E>(), listed);
        }
        check::<Activation>(r#""relu", "gelu", "silu", "tanh""#);
        check::<Split>(r#""random", "ordered""#);
        check::<Optimizer>(r#""adam", "adamw", "sgd""#);
        check::<Schedule>(r#""constant", "cosine", "warmup""#);
        check::<Norm>(r#""none", "batch", "layer""#);
        check::<NumericEncoding>(r#""standard", "quantile", "ple", "robust", "periodic""#);
        check::<RegressionLoss>(r#""mse", "huber""#);
        check::<TargetTransform>(r#""none", "standardize", "log", "auto""#);
        check::<EncodingName>(
            r#""standard", "quantile", "ple", "robust", "periodic", "category", "onehot", "embedding""#,
        );
        check::<WeightsName>(r#""none", "balanced""#);
        // Names are exact: no other case, no enum written as an object.
        for v in [json!("Relu"), json!({"relu": null}), json!(["relu"])] {
            assert!(TrainOptions::from_json(Some(&json!({ "activation": v }))).is_err(), "{v}");
        }
    }

    #[test]
    fn option_keys_are_the_fields_of_both_types() {
        assert_eq!(OPTION_KEYS, serde_introspect::<WrittenOptions>(), "serde's keys, in declaration order");
        let mut keys = OPTION_KEYS.to_vec();
        keys.sort_unstable();
        let mut read_stored = serde_introspect::<TrainOptions>().to_vec();
        read_stored.sort_unstable();
        assert_eq!(read_stored, keys, "stored options read every key");
        let stored = TrainOptions::default().to_json();
        let stored = stored.as_object().unwrap();
        // warm_start is stored only when set: what versions stored before it
        // existed stays what they would store now.
        keys.retain(|k| *k != "warm_start");
        assert_eq!(stored.keys().map(String::as_str).collect::<Vec<_>>(), keys, "stored options write every key");
        // What is stored reads back as written options too.
        for (key, v) in stored {
            WrittenOptions::read(&json!({ key: v })).unwrap();
        }
        assert_eq!(WrittenOptions::read(&json!({})).unwrap(), WrittenOptions::default());
    }

    #[test]
    fn stacks_share_every_option_but_the_per_model_ones() {
        for key in PER_MODEL_OPTIONS {
            assert!(OPTION_KEYS.contains(key), "{key} is an option");
        }
        // Every option, set to a value other than its default.
        let changed = [
            ("hidden", json!([8])),
            ("activation", json!("gelu")),
            ("epochs", json!(31)),
            ("batch_size", json!(64)),
            ("learning_rate", json!(0.01)),
            ("weight_decay", json!(0.1)),
            ("seed", json!(1)),
            ("validation_fraction", json!(0.1)),
            ("split", json!("ordered")),
            ("patience", json!(6)),
            ("max_categories", json!(10)),
            ("optimizer", json!("sgd")),
            ("momentum", json!(0.5)),
            ("schedule", json!("cosine")),
            ("warmup_epochs", json!(1)),
            ("clip_norm", json!(1)),
            ("residual_blocks", json!(1)),
            ("norm", json!("batch")),
            ("dropout", json!(0.1)),
            ("members", json!(3)),
            ("numeric_encoding", json!("standard")),
            ("bins", json!(8)),
            ("periodic_frequencies", json!(8)),
            ("periodic_dim", json!(8)),
            ("periodic_sigma", json!(1)),
            ("onehot_max", json!(4)),
            ("encodings", json!({"x": "ple"})),
            ("class_weights", json!("balanced")),
            ("label_smoothing", json!(0.1)),
            ("loss", json!("huber")),
            ("huber_delta", json!(2)),
            ("target_transform", json!("log")),
            ("warm_start", json!(true)),
        ];
        assert_eq!(changed.iter().map(|(key, _)| *key).collect::<Vec<_>>(), OPTION_KEYS);
        let base = TrainOptions::default();
        assert_eq!(base.first_stack_mismatch(&base.clone()), None);
        for (key, v) in changed {
            let other = TrainOptions::from_json(Some(&json!({ key: v }))).unwrap();
            assert_ne!(other, base, "{key}");
            let mismatch = (!PER_MODEL_OPTIONS.contains(&key)).then_some(key);
            assert_eq!(base.first_stack_mismatch(&other), mismatch, "{key}");
            assert_eq!(other.first_stack_mismatch(&base), mismatch, "{key}");
        }
        // The first in key order is the one named.
        let other = TrainOptions { seed: 1, hidden: vec![8], learning_rate: 0.1, ..base.clone() };
        assert_eq!(base.first_stack_mismatch(&other), Some("hidden"));
    }

    #[test]
    fn stored_options_read_as_they_meant_then() {
        // Keys added since read as what training did before them.
        let old: TrainOptions = serde_json::from_value(json!({"epochs": 3})).unwrap();
        assert_eq!((old.numeric_encoding, old.onehot_max), (NumericEncoding::Standard, u32::MAX));
        assert_eq!(
            old,
            TrainOptions {
                epochs: 3,
                ..TrainOptions::from_json(Some(&json!({
                    "numeric_encoding": "standard", "onehot_max": u32::MAX
                })))
                .unwrap()
            }
        );
        // Stored options are every key written out; an unknown one is refused.
        assert!(serde_json::from_value::<TrainOptions>(json!({"epoch": 3})).is_err());
        let o = TrainOptions::from_json(Some(&json!({"encodings": {"city": 8, "plan": "embedding"}}))).unwrap();
        assert_eq!(serde_json::from_value::<TrainOptions>(o.to_json()).unwrap(), o);
    }

    #[test]
    fn a_warm_start_continues_only_from_options_that_differ_in_tuning() {
        let read = |v: serde_json::Value| TrainOptions::from_json(Some(&v)).unwrap();
        let archived = read(json!({"hidden": [32], "learning_rate": 0.01}));
        // Stored only when asked; a spec's word reads as JSON's boolean.
        assert!(archived.to_json().get("warm_start").is_none());
        let asked = read(json!({"hidden": [32], "learning_rate": 0.001, "epochs": 5, "warm_start": "true"}));
        assert!(asked.warm_start);
        assert_eq!(asked.to_json()["warm_start"], true);
        assert!(asked.differs_only_in_tuning(&archived));
        for other in [
            json!({"hidden": [64], "warm_start": true}),
            json!({"hidden": [32], "dropout": 0.1, "warm_start": true}),
            json!({"hidden": [32], "seed": 7, "warm_start": true}),
            json!({"hidden": [32], "numeric_encoding": "standard", "warm_start": true}),
        ] {
            assert!(!read(other.clone()).differs_only_in_tuning(&archived), "{other}");
        }
        assert_eq!(
            TrainOptions::from_json(Some(&json!({"warm_start": 1}))).unwrap_err(),
            SpecError::OptionType { key: "warm_start".into(), expected: "true or false".into() }
        );
    }
}
