//! Scoring a model Cerebro trained with the engine's own forward pass.
//!
//! ONNX Runtime runs the exported graph node by node, categoricals as
//! string tensors (each value copied twice on the way in), and a one-row
//! request pays for the whole graph's dispatch. The engine scores the same
//! network from the same weights: the version's fitted pipeline encodes
//! the batch (as in training), the network is rebuilt from the weights the
//! ONNX file holds (read back as warm starts read them, here every one of
//! them), and the head and target transform are applied as the graph does.
//!
//! The ONNX file stays the one home of the weights. A model is scored
//! natively only once a probe batch (every kind of value each feature can
//! take, NULLs and unseen categories included) scores the same through
//! both, to [`AGREEMENT`]; otherwise ONNX Runtime scores it, and the log
//! says why.

use std::collections::{HashMap, VecDeque};

use cerebro_shared::batch::{ColumnData, ColumnRef, NO_LABEL};
use cerebro_shared::spec::{Task, TrainOptions, NULL_CATEGORY};
use prost::Message;

use crate::features::{Encoder, FeatureError, FeaturePipeline};
use crate::proto::ModelProto;
use crate::TargetScale;
use crate::{sigmoid, softmax_into, Arch, Batch, Op, Predictor, Stack, NORM_EPS};

/// How far a native score may be from ONNX Runtime's on the probe batch:
/// absolute for probabilities, relative (to at least 1) for values.
pub const AGREEMENT: f64 = 1e-5;

#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    #[error("the ONNX file cannot be read: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("the ONNX file has no graph")]
    NoGraph,
    #[error("the ONNX file does not hold the network its options describe: {0}")]
    Shape(String),
    #[error(transparent)]
    Features(#[from] FeatureError),
}

/// What the graph does after the network, per member.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Head {
    Sigmoid,
    Softmax,
    /// The network's output in the target's units.
    Value(TargetScale),
}

/// A model ready for the engine: its pipeline, its network (one per member
/// of a mini-ensemble, stacked) and its head.
#[derive(Debug, Clone)]
pub struct NativeModel {
    pub pipeline: FeaturePipeline,
    pub(crate) network: Stack,
    pub(crate) head: Head,
    /// Each member's share of the output (`ensemble_weight`; 1 alone).
    pub(crate) weights: Vec<f32>,
}

/// The initializers of one member of the graph, by kind (`weight`,
/// `bias`, `ln_gain`, ...), each kind in the order the graph holds them.
type Tensors = HashMap<String, VecDeque<(Vec<i64>, Vec<f32>)>>;

fn shape(what: impl Into<String>) -> NativeError {
    NativeError::Shape(what.into())
}

fn take(tensors: &mut Tensors, kind: &str, len: usize) -> Result<Vec<f32>, NativeError> {
    let (_, data) =
        tensors.get_mut(kind).and_then(VecDeque::pop_front).ok_or_else(|| shape(format!("no {kind} left")))?;
    if data.len() != len {
        return Err(shape(format!("a {kind} of {} values where {len} are needed", data.len())));
    }
    Ok(data)
}

/// One member's network of architecture `arch`, its parameters taken from
/// `tensors` in the order the export wrote them.
fn member(arch: &Arch, tensors: &mut Tensors) -> Result<Stack, NativeError> {
    let mut params = Vec::new();
    let mut state = Vec::new();
    for e in &arch.embeddings {
        params.push(take(tensors, "embedding", (e.vocabulary + 1) * e.dim)?);
    }
    for op in &arch.ops {
        match *op {
            Op::Dense { inputs, outputs } => {
                params.push(take(tensors, "weight", inputs * outputs)?);
                params.push(take(tensors, "bias", outputs)?);
            }
            Op::LayerNorm { width } => {
                params.push(take(tensors, "ln_gain", width)?);
                params.push(take(tensors, "ln_shift", width)?);
            }
            Op::BatchNorm { width } => {
                // The file holds the folded affine map; as gain and shift
                // over a mean of 0 and a variance of 1 − ε it is the same map.
                params.push(take(tensors, "bn_scale", width)?);
                params.push(take(tensors, "bn_offset", width)?);
                state.push(vec![0.0; width]);
                state.push(vec![1.0 - NORM_EPS; width]);
            }
            Op::Activation { .. } | Op::Dropout { .. } | Op::Residual { .. } => {}
        }
    }
    if let Some(p) = &arch.periodic {
        let (kf, d) = (p.frequencies, p.dim);
        let (mut frequencies, mut weights, mut biases) = (Vec::new(), Vec::new(), Vec::new());
        for _ in &p.columns {
            // Stored as 2π·c, the engine's c.
            frequencies.extend(take(tensors, "frequencies", kf)?.into_iter().map(|c| c / std::f32::consts::TAU));
            weights.extend(take(tensors, "periodic_weight", 2 * kf * d)?);
            biases.extend(take(tensors, "periodic_bias", d)?);
        }
        params.extend([frequencies, weights, biases]);
    }
    for kind in ["embedding", "weight", "bias", "ln_gain", "ln_shift", "bn_scale", "bn_offset", "frequencies"] {
        if tensors.get(kind).is_some_and(|left| !left.is_empty()) {
            return Err(shape(format!("more {kind} tensors than the network has")));
        }
    }
    Ok(Stack { k: 1, arch: arch.clone(), params, state, seed: 0 })
}

impl NativeModel {
    /// The model in `onnx`, a file Cerebro exported for a version of `task`
    /// with `classes` class labels, fitted pipeline `pipeline` and
    /// `options` (as the catalog keeps them).
    pub fn from_onnx(
        onnx: &[u8],
        pipeline: FeaturePipeline,
        options: &TrainOptions,
        task: Task,
        classes: usize,
    ) -> Result<NativeModel, NativeError> {
        let graph = ModelProto::decode(onnx)?.graph.ok_or(NativeError::NoGraph)?;
        // What the catalog holds is read in a backend too: a pipeline that
        // no fit makes is refused here, not met as a panic when scoring.
        if let Some(f) = pipeline.features.iter().find(
            |f| matches!(&f.encoder, Encoder::Ple { edges, .. } | Encoder::Quantile { edges, .. } if edges.len() < 2),
        ) {
            return Err(shape(format!("feature {} has fewer than two bin edges", f.name)));
        }
        // A mini-ensemble's members are prefixed `_m0/`, `_m1/`, ...
        let initializers = graph.initializer.len();
        let mut members: Vec<Tensors> = Vec::new();
        let mut weights: Vec<f32> = Vec::new();
        for t in graph.initializer {
            let (index, name) = match t.name.strip_prefix("_m").and_then(|rest| rest.split_once('/')) {
                Some((i, rest)) => match i.parse::<usize>() {
                    // Each member has initializers of its own.
                    Ok(i) if i < initializers => (i, rest),
                    _ => return Err(shape(format!("initializer {}", t.name))),
                },
                None => (0, t.name.as_str()),
            };
            if members.len() <= index {
                members.resize_with(index + 1, Tensors::new);
                weights.resize(index + 1, 1.0);
            }
            if name == "ensemble_weight" {
                weights[index] = t.float_data.first().copied().ok_or_else(|| shape("an empty ensemble weight"))?;
                continue;
            }
            let Some((kind, _)) = name.strip_prefix("_cerebro/").and_then(|n| n.rsplit_once('_')) else {
                return Err(shape(format!("initializer {} is not one Cerebro writes", t.name)));
            };
            members[index].entry(kind.to_owned()).or_default().push_back((t.dims, t.float_data));
        }
        if members.is_empty() {
            return Err(shape("no initializers"));
        }
        let outputs = if task == Task::Multiclass { classes } else { 1 };
        let arch = crate::architecture(options, &pipeline, outputs);
        let head = match task {
            Task::Binary => Head::Sigmoid,
            Task::Multiclass => Head::Softmax,
            Task::Regression => {
                let log = graph.node.iter().any(|n| n.op_type == "Exp");
                let first = &mut members[0];
                let std = take(first, "target_std", 1)?[0];
                let mean = take(first, "target_mean", 1)?[0];
                Head::Value(TargetScale { mean, std, log })
            }
        };
        let networks = members.iter_mut().map(|m| member(&arch, m)).collect::<Result<Vec<_>, _>>()?;
        Ok(NativeModel { pipeline, network: Stack::from_models(&networks), head, weights })
    }

    /// The graph's output for `columns` (in the pipeline's feature order),
    /// row by row, and its width: what ONNX Runtime gives for the file.
    pub fn run(&self, columns: &[ColumnRef<'_>]) -> Result<(Vec<f32>, usize), NativeError> {
        let encoded = self.pipeline.transform_refs(columns)?;
        let n = encoded.n;
        let mut logits = Vec::with_capacity(n * self.network.k * self.network.outputs());
        Predictor::new(&self.network, 1).predict(Batch { x: &encoded.x, codes: &encoded.codes, n }, &mut logits);
        let (k, width) = (self.network.k, self.network.outputs());
        let mut out = vec![0.0f32; n * width];
        let mut probabilities = vec![0.0f32; width];
        for (row, wide) in out.chunks_exact_mut(width).zip(logits.chunks_exact(k * width)) {
            self.head_output(wide, row, &mut probabilities);
        }
        Ok((out, width))
    }

    /// The graph's output for one row from every member's logits (`wide`,
    /// `K × outputs`), added into `row` (zeros); `probabilities` is scratch
    /// of one member's width.
    pub(crate) fn head_output(&self, wide: &[f32], row: &mut [f32], probabilities: &mut [f32]) {
        let width = self.network.outputs();
        for (member, &weight) in wide.chunks_exact(width).zip(&self.weights) {
            match self.head {
                Head::Sigmoid => row[0] += weight * sigmoid(member[0]),
                Head::Softmax => {
                    softmax_into(member, probabilities);
                    row.iter_mut().zip(probabilities.iter()).for_each(|(o, p)| *o += weight * p);
                }
                Head::Value(scale) => row[0] += weight * scale.value(member[0]),
            }
        }
    }

    /// Rows that reach every branch of the pipeline: for each numeric
    /// feature NULL, NaN, its centre, far below and far above it and the
    /// edges of its bins; for each categorical one NULL, every value it
    /// knows and one it never saw. Features cycle through their values
    /// independently, so rows mix them.
    pub fn probe(&self) -> Vec<ColumnData> {
        let rows = self
            .pipeline
            .features
            .iter()
            .map(|f| match &f.encoder {
                Encoder::Categorical { vocabulary } | Encoder::Embedding { vocabulary, .. } => vocabulary.len() + 2,
                Encoder::Ple { edges, .. } | Encoder::Quantile { edges, .. } => edges.len() + 4,
                _ => 6,
            })
            .max()
            .unwrap_or(1)
            .max(8);
        self.pipeline
            .features
            .iter()
            .map(|f| {
                let numbers = |centre: f32, spread: f32, extra: &[f32]| {
                    let mut values: Vec<Option<f64>> = vec![
                        None,
                        Some(f64::NAN),
                        Some(centre as f64),
                        Some((centre - 3.0 * spread) as f64),
                        Some((centre + 3.0 * spread) as f64),
                        Some((centre + 0.5 * spread) as f64),
                    ];
                    values.extend(extra.iter().map(|&e| Some(e as f64)));
                    ColumnData::Float64((0..rows).map(|r| values[r % values.len()]).collect())
                };
                match &f.encoder {
                    Encoder::Numeric { mean, std, .. } | Encoder::Periodic { mean, std, .. } => {
                        numbers(*mean, *std, &[])
                    }
                    Encoder::Robust { median, scale, .. } => numbers(*median, *scale * 4.0, &[]),
                    Encoder::Ple { edges, .. } | Encoder::Quantile { edges, .. } => {
                        let (lo, hi) = (edges[0], edges[edges.len() - 1]);
                        numbers((lo + hi) / 2.0, (hi - lo).abs().max(1.0), edges)
                    }
                    Encoder::Categorical { vocabulary } | Encoder::Embedding { vocabulary, .. } => {
                        let mut values: Vec<Option<String>> = vec![None, Some("\u{2}never seen".to_owned())];
                        values.extend(vocabulary.iter().map(|v| (v != NULL_CATEGORY).then(|| v.clone())));
                        ColumnData::Text((0..rows).map(|r| values[(r + 1) % values.len()].clone()).collect())
                    }
                }
            })
            .collect()
    }
}

/// One score and one label index per row of a graph's output `width`
/// wide, as `cerebro.predictions` shows them: a binary model's probability
/// of its positive class (output `positive_column`; label 1 at 0.5 or
/// more), a multiclass model's most probable class and its probability, a
/// regression's value (no label).
pub fn scores_and_labels(task: Task, positive_column: usize, out: &[f32], width: usize) -> (Vec<f64>, Vec<u32>) {
    let rows = out.chunks_exact(width.max(1));
    match task {
        Task::Binary => rows
            .map(|row| {
                let p = row[positive_column.min(row.len() - 1)];
                (p as f64, (p >= 0.5) as u32)
            })
            .unzip(),
        Task::Multiclass => rows
            .map(|row| {
                let (i, p) = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).expect("non-empty row");
                (*p as f64, i as u32)
            })
            .unzip(),
        Task::Regression => out.iter().map(|&v| (v as f64, NO_LABEL)).unzip(),
    }
}

/// The largest disagreement between two outputs of one graph, in the
/// sense of [`AGREEMENT`] (absolute for probabilities, relative for values).
pub fn disagreement(a: &[f32], b: &[f32], values: bool) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            let (x, y) = (x as f64, y as f64);
            if x.is_nan() && y.is_nan() {
                return 0.0;
            }
            let d = (x - y).abs();
            if values {
                d / x.abs().max(1.0)
            } else {
                d
            }
        })
        .fold(0.0, |m, d| if d.is_nan() { f64::INFINITY } else { m.max(d) })
}

/// Every class's probability for each row of a multiclass graph's output
/// `width` wide, `classes` per row in the order of the model's class
/// labels; None when the graph has another number of outputs.
pub fn class_probabilities(out: &[f32], width: usize, classes: usize) -> Option<Vec<f64>> {
    (width == classes || out.is_empty()).then(|| out.iter().map(|&p| p as f64).collect())
}

/// A scorer's answer for a batch: a score and a label index per row, and
/// the class probabilities asked for (empty: none).
#[derive(Debug, Clone, Copy)]
pub struct Answer<'a> {
    pub scores: &'a [f64],
    pub labels: &'a [u32],
    pub probabilities: &'a [f64],
}

/// Whether two scorers answered a batch of a `task` model alike: scores
/// and probabilities within [`AGREEMENT`] (relative for a regression's
/// values), the bar the engine's copy of a model is held to against ONNX
/// Runtime, for as many rows. Labels follow from the scores
/// ([`scores_and_labels`]); two answers this close may still label a row
/// apart whose score sits on 0.5, or whose two likeliest classes tie.
pub fn answers_agree(task: Task, a: Answer<'_>, b: Answer<'_>) -> bool {
    let narrow = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    a.labels.len() == b.labels.len()
        && disagreement(&narrow(a.scores), &narrow(b.scores), task == Task::Regression) <= AGREEMENT
        && disagreement(&narrow(a.probabilities), &narrow(b.probabilities), false) <= AGREEMENT
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer<'a>(scores: &'a [f64], labels: &'a [u32], probabilities: &'a [f64]) -> Answer<'a> {
        Answer { scores, labels, probabilities }
    }

    #[test]
    fn answers_agree_within_the_bar() {
        let same = answer(&[0.25, 0.75], &[0, 1], &[]);
        assert!(answers_agree(Task::Binary, same, same));
        assert!(answers_agree(Task::Binary, same, answer(&[0.25 + 5e-6, 0.75], &[0, 1], &[])));
        assert!(!answers_agree(Task::Binary, same, answer(&[0.25 + 1e-4, 0.75], &[0, 1], &[])), "a score apart");
        assert!(!answers_agree(Task::Binary, same, answer(&[0.25], &[0], &[])), "a row missing");
        // A score on the threshold, a hair apart: labelled apart, still alike.
        let edge = answer(&[0.5], &[1], &[]);
        assert!(answers_agree(Task::Binary, edge, answer(&[0.5 - 1e-7], &[0], &[])));
        let probabilities = answer(&[0.6], &[1], &[0.4, 0.6]);
        assert!(!answers_agree(Task::Multiclass, probabilities, answer(&[0.6], &[1], &[0.39, 0.6])));
        // A regression's values agree relative to their size.
        let values = answer(&[1.0e6], &[NO_LABEL], &[]);
        assert!(answers_agree(Task::Regression, values, answer(&[1.0e6 + 5.0], &[NO_LABEL], &[])));
        assert!(!answers_agree(Task::Regression, values, answer(&[1.0e6 + 50.0], &[NO_LABEL], &[])));
        let nan = answer(&[f64::NAN], &[NO_LABEL], &[]);
        assert!(answers_agree(Task::Regression, nan, nan), "NaN where both give NaN");
        assert!(!answers_agree(Task::Regression, nan, values));
    }

    /// An ONNX file whose only initializer is `name`.
    fn file_with(name: &str) -> Vec<u8> {
        use crate::proto::{GraphProto, TensorProto};
        let tensor =
            TensorProto { dims: vec![1], data_type: 1, float_data: vec![0.5], name: name.into(), ..Default::default() };
        let graph = GraphProto { initializer: vec![tensor], ..Default::default() };
        ModelProto { graph: Some(graph), ..Default::default() }.encode_to_vec()
    }

    #[test]
    fn a_file_or_pipeline_no_export_makes_is_refused_not_met_as_a_panic() {
        use crate::features::FittedFeature;
        let options = TrainOptions::default();
        let empty = FeaturePipeline { features: Vec::new() };
        // A member index past the file's initializers would size a list by it.
        let far = NativeModel::from_onnx(
            &file_with("_m4000000000/_cerebro/weight_0"),
            empty.clone(),
            &options,
            Task::Binary,
            2,
        );
        assert!(matches!(far, Err(NativeError::Shape(_))), "{far:?}");
        let binned = FeaturePipeline {
            features: vec![FittedFeature {
                name: "tenure".into(),
                encoder: Encoder::Ple { edges: vec![1.0], null_indicator: false },
                typical: None,
            }],
        };
        let one_edge = NativeModel::from_onnx(&file_with("_cerebro/weight_0"), binned, &options, Task::Binary, 2);
        assert!(matches!(&one_edge, Err(NativeError::Shape(why)) if why.contains("two bin edges")), "{one_edge:?}");
    }

    #[test]
    fn scores_and_labels_read_each_head() {
        let (scores, labels) = scores_and_labels(Task::Binary, 0, &[0.2, 0.5, 0.9], 1);
        assert_eq!((scores, labels), (vec![0.2f32 as f64, 0.5, 0.9f32 as f64], vec![0, 1, 1]));
        let (scores, labels) = scores_and_labels(Task::Multiclass, 0, &[0.1, 0.7, 0.2, 0.5, 0.25, 0.25], 3);
        assert_eq!((scores, labels), (vec![0.7f32 as f64, 0.5], vec![1, 0]));
        let (scores, labels) = scores_and_labels(Task::Regression, 0, &[3.5, -1.0], 1);
        assert_eq!((scores, labels), (vec![3.5, -1.0], vec![NO_LABEL, NO_LABEL]));
    }
}
