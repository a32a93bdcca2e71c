//! One training run: split, fit features, train with early stopping, evaluate.

use std::sync::Arc;
use std::time::Instant;

use cerebro_shared::batch::ColumnData;
use cerebro_shared::importance::Importance;
use cerebro_shared::provenance::TrainedWith;
use cerebro_shared::spec::{
    ClassWeights, RegressionLoss, Split, TargetTransform, Task, TrainOptions, TrainingPlan, AUTO_LOG_SKEWNESS,
};
use cerebro_shared::surrogate::{Surrogate, DEFAULT_MAX_DEPTH};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::engine::{
    backend, scheduled_lr, BackendError, Batch, BatchSource, Compute, Head, Loss, MiniBatch, ModelStep, Predictor,
    Stack,
};
use crate::features::{Encoded, FeatureError, FeaturePipeline};
use crate::metrics::{self, Metrics};
use crate::snapshot_cache::{SnapshotCache, SnapshotKey};
use crate::warm::{warm_start, ParentWeights, WarmStart};
use crate::{distill, importance};
pub use cerebro_model::{architecture, TargetScale};

/// What one epoch did, reported while training runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochStats {
    pub epoch: u32,
    pub train_loss: f64,
    pub valid_loss: f64,
    pub seconds: f64,
}

/// Whether training should go on after an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// Stop every model (the daemon is shutting down).
    Stop,
    /// Stop this model only; the others go on (a cancelled candidate).
    Drop,
    /// Stop training this model and keep it as it is, like early stopping
    /// (a candidate halving or a budget let go no further).
    Finish,
}

/// Called after each epoch with the statistics of every model still
/// training (its index in the stack, its epoch); sets `controls[m]` for the
/// models it wants to stop (all start as [`Control::Continue`]).
pub type OnEpoch<'a> = dyn FnMut(&[(usize, EpochStats)], &mut [Control]) + 'a;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainedModel {
    pub task: Task,
    pub class_labels: Vec<String>,
    pub pipeline: FeaturePipeline,
    /// The trained network (a stack of one).
    pub network: Stack,
    /// A mini-ensemble's other networks (`members` − 1 of them), averaged
    /// with `network`; empty for one network.
    #[serde(default)]
    pub members: Vec<Stack>,
    pub target_scale: Option<TargetScale>,
    /// What `target_transform = "auto"` chose (`log` or `standardize`);
    /// None when the options named the transform.
    #[serde(default)]
    pub auto_transform: Option<TargetTransform>,
    /// The epoch whose weights were kept (1-based).
    pub best_epoch: u32,
    pub epochs_run: u32,
    /// The epoch that a deadline cut short (`epochs_run` + 1), if one did.
    #[serde(default)]
    pub interrupted: Option<u32>,
    pub history: Vec<EpochStats>,
    pub metrics: Metrics,
    pub rows_train: usize,
    pub rows_valid: usize,
    /// Where it trained, in words ("cpu, 1 thread", "cuda:0 NVIDIA H100 ...").
    #[serde(default)]
    pub device: String,
    /// What it took from its parent, if it is a derived model.
    #[serde(skip)]
    pub warm_start: Option<WarmStart>,
    /// Each source column's permutation importance, once measured
    /// ([`TrainedModel::measure_importance`]).
    #[serde(default)]
    pub importance: Option<Importance>,
    /// Its rule surrogate, once distilled ([`TrainedModel::distill`]).
    #[serde(default)]
    pub surrogate: Option<Surrogate>,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("only {usable} row(s) have a usable target; at least 2 are needed")]
    TooFewRows { usable: usize },
    #[error(transparent)]
    Features(#[from] FeatureError),
    #[error("the target column arrived as {found}, but task {task} needs {expected}")]
    TargetKind { task: Task, expected: &'static str, found: &'static str },
    #[error(
        "option \"target_transform\" is \"log\", but the target has values that are not greater than 0 (the smallest is {smallest}); ln(y) needs every target > 0"
    )]
    TargetNotPositive { smallest: f64 },
    #[error("training diverged at epoch {epoch} (loss is not finite); try a lower learning_rate")]
    Diverged { epoch: u32 },
    #[error("training was stopped")]
    Stopped,
    #[error("cancelled")]
    Cancelled,
    #[error("models differ in {0}, so they cannot train as one stack")]
    Incompatible(&'static str),
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Rows scored at once when evaluating, to bound memory.
const EVAL_CHUNK: usize = 8192;

/// Parts of an epoch between which a deadline is checked: an epoch of a
/// large table can take minutes.
const EPOCH_PARTS: usize = 16;

fn head_for(task: Task, classes: usize) -> Head {
    match task {
        Task::Binary => Head::Binary,
        Task::Multiclass => Head::Multiclass(classes),
        Task::Regression => Head::Regression,
    }
}

/// The loss the options describe; `targets` are the training rows' class
/// indexes (for balanced weights).
fn loss_for(plan: &TrainingPlan, head: Head, targets: impl Iterator<Item = f64>) -> Loss {
    let opts = &plan.options;
    let classes = plan.class_labels.len();
    let class_weights = match &opts.class_weights {
        ClassWeights::None => Vec::new(),
        ClassWeights::Balanced => {
            let mut counts = vec![0usize; classes];
            let mut total = 0;
            for t in targets {
                counts[t as usize] += 1;
                total += 1;
            }
            counts.iter().map(|&c| if c == 0 { 1.0 } else { total as f32 / (classes * c) as f32 }).collect()
        }
        ClassWeights::Explicit(map) => {
            plan.class_labels.iter().map(|l| map.get(l).copied().unwrap_or(1.0) as f32).collect()
        }
    };
    let huber_delta = if opts.loss == RegressionLoss::Huber { opts.huber_delta as f32 } else { 0.0 };
    let label_smoothing = if plan.task.is_classification() { opts.label_smoothing as f32 } else { 0.0 };
    Loss { head, class_weights, huber_delta, label_smoothing }
}

/// Trains one model. `features` are in `plan.features` order; `target` is text
/// for classification and numbers for regression.
pub fn train(
    plan: &TrainingPlan,
    features: &[ColumnData],
    target: &ColumnData,
    compute: Compute,
    on_epoch: &mut dyn FnMut(&EpochStats) -> Control,
) -> Result<TrainedModel, TrainError> {
    let mut models = train_group(std::slice::from_ref(plan), features, target, compute, &mut |reports, controls| {
        for (m, stats) in reports {
            controls[*m] = on_epoch(stats);
        }
    })?;
    models.pop().expect("one plan, one model")
}

/// The first thing in which `b` differs from `a` among those a stack must
/// share: task, target, features, class labels, then every option but the
/// per-model ones ([`TrainOptions::first_stack_mismatch`]).
fn incompatibility(a: &TrainingPlan, b: &TrainingPlan) -> Option<&'static str> {
    [
        (a.task != b.task, "task"),
        (a.target != b.target, "target"),
        (a.features != b.features, "features"),
        (a.class_labels != b.class_labels, "class labels"),
    ]
    .into_iter()
    .find_map(|(differs, what)| differs.then_some(what))
    .or_else(|| a.options.first_stack_mismatch(&b.options))
}

/// About how much memory one model of `plan` takes while it trains on
/// `features` (the columns it reads), in bytes: its weights, gradients,
/// optimiser moments and best copy, and its activations for a minibatch
/// (outputs, saved values, deltas) and for a chunk of validation rows.
pub fn model_bytes(plan: &TrainingPlan, features: &[ColumnData]) -> Result<usize, TrainError> {
    let rows: Vec<usize> = (0..features.first().map_or(0, ColumnData::len)).collect();
    let pipeline = FeaturePipeline::fit(&plan.features, features, &rows, &plan.options)?;
    let outputs = head_for(plan.task, plan.class_labels.len()).outputs();
    let arch = architecture(&plan.options, &pipeline, outputs);
    let params: usize = arch.slots().iter().map(|s| s.len).sum();
    // Per row: every op's output, the inputs and embeddings, and the
    // periodic embeddings' [cos, sin] features.
    let periodic = arch.periodic.as_ref().map_or(0, |p| p.columns.len() * 2 * p.frequencies);
    let activations: usize = (0..arch.ops.len()).map(|i| arch.width_after(i)).sum::<usize>()
        + arch.inputs
        + arch.embedded_width()
        + periodic;
    let rows_at_once = 3 * plan.options.batch_size as usize + EVAL_CHUNK;
    // A mini-ensemble is that many networks.
    Ok(4 * (5 * params + rows_at_once * activations) * plan.options.members.max(1) as usize)
}

/// Trains several models in one pass over the data, as one [`Stack`]. They
/// must agree on everything but the options in
/// [`PER_MODEL_OPTIONS`](cerebro_shared::spec::PER_MODEL_OPTIONS) (`learning_rate`,
/// `weight_decay`, `epochs`, `patience`, `momentum`, `schedule`, `warmup_epochs`
/// and `clip_norm`); each ends exactly as it would have trained alone.
/// `on_epoch` gets each epoch's statistics of the models still training. `compute`
/// says on which device, and on CPU with how many threads. A model that
/// diverges fails alone (its entry is the error) while the others go on;
/// the outer error fails them all (bad data, a stop).
pub fn train_group(
    plans: &[TrainingPlan],
    features: &[ColumnData],
    target: &ColumnData,
    compute: Compute,
    on_epoch: &mut OnEpoch<'_>,
) -> Result<Vec<Result<TrainedModel, TrainError>>, TrainError> {
    train_group_warm(plans, &[], features, target, compute, None, None, on_epoch)
}

/// Where a stack may find its rows already split and encoded, and keep
/// them for the next: cerebrod's cache, and the read its columns came from.
#[derive(Clone, Copy)]
pub struct Reuse<'a> {
    pub cache: &'a SnapshotCache,
    pub read: &'a SnapshotKey,
}

/// A stack's rows as [`TrainingData::prepare`] left them, with the
/// data-order stream as it left it, so that a stack that finds them trains
/// exactly as one that prepared them.
struct Prepared {
    data: TrainingData,
    order_rng: ChaCha8Rng,
}

/// What [`TrainingData::prepare`] reads of a plan, as text: its task,
/// target, features and labels, and its options but those only the
/// network and its optimiser read. Stacks of equal descriptions over the
/// same read get the same rows, split and encoding.
fn encoding_of(plan: &TrainingPlan) -> String {
    let d = TrainOptions::default();
    let mut o = plan.options.clone();
    (o.hidden, o.activation, o.epochs, o.batch_size, o.learning_rate, o.weight_decay, o.patience) =
        (d.hidden, d.activation, d.epochs, d.batch_size, d.learning_rate, d.weight_decay, d.patience);
    (o.optimizer, o.momentum, o.schedule, o.warmup_epochs, o.clip_norm, o.residual_blocks, o.norm, o.dropout) =
        (d.optimizer, d.momentum, d.schedule, d.warmup_epochs, d.clip_norm, d.residual_blocks, d.norm, d.dropout);
    (o.members, o.class_weights, o.label_smoothing, o.loss, o.huber_delta) =
        (d.members, d.class_weights, d.label_smoothing, d.loss, d.huber_delta);
    serde_json::to_string(&(plan.task, &plan.target, &plan.features, &plan.class_labels, &o))
        .expect("a plan serialises")
}

/// [`train_group`], where model `m` with `warm[m]` starts from that parent's
/// weights wherever the shapes allow (derived models; see [`crate::warm`]).
/// At `deadline`, even within an epoch, every model still training stops
/// and keeps its best epoch's weights ([`TrainedModel::interrupted`]).
/// With `reuse`, rows another stack split and encoded the same way are
/// taken from cerebrod's cache, and this stack's are kept there.
#[allow(clippy::too_many_arguments)]
pub fn train_group_warm(
    plans: &[TrainingPlan],
    warm: &[Option<&ParentWeights>],
    features: &[ColumnData],
    target: &ColumnData,
    compute: Compute,
    deadline: Option<Instant>,
    reuse: Option<Reuse<'_>>,
    on_epoch: &mut OnEpoch<'_>,
) -> Result<Vec<Result<TrainedModel, TrainError>>, TrainError> {
    let plan = stack_plan(plans)?;
    let encoding = reuse.map(|_| encoding_of(plan));
    let found = reuse.zip(encoding.as_deref()).and_then(|(r, e)| r.cache.get_encoded::<Prepared>(r.read, e));
    let prepared = match found {
        Some((prepared, bytes)) => {
            tracing::info!(bytes, "rows split and encoded taken from cerebrod's cache");
            prepared
        }
        None => {
            // One stream orders the data, another initialises weights, so
            // that the data order is the same for every model of a stack.
            let mut order_rng = ChaCha8Rng::seed_from_u64(plan.options.seed);
            let data = TrainingData::prepare(plan, features, target, &mut order_rng)?;
            let prepared = Arc::new(Prepared { data, order_rng });
            if let (Some(r), Some(e)) = (reuse, encoding) {
                r.cache.insert_encoded(r.read.clone(), e, prepared.clone(), prepared.data.bytes());
            }
            prepared
        }
    };
    let (data, mut order_rng) = (&prepared.data, prepared.order_rng.clone());
    // A mini-ensemble of `members` networks is that many models of the
    // stack (plan j's member i is model j·members + i); a parent lends its
    // weights to the first member only, so that the others differ.
    let members = plan.options.members.max(1) as usize;
    let expanded: Vec<TrainingPlan> = plans.iter().flat_map(|p| std::iter::repeat_n(p.clone(), members)).collect();
    let warm: Vec<Option<&ParentWeights>> = (0..expanded.len())
        .map(|m| if m % members == 0 { warm.get(m / members).copied().flatten() } else { None })
        .collect();
    let StartedStack { mut trainer, loss, warm_reports } = start_stack(plan, expanded.len(), &warm, data, compute)?;
    let progress = if members == 1 {
        run_epochs(&expanded, data, trainer.as_mut(), &loss, &mut order_rng, deadline, on_epoch)?
    } else {
        let mut by_plan = |reports: &[(usize, EpochStats)], controls: &mut [Control]| {
            per_plan_epoch(reports, controls, plans.len(), members, on_epoch)
        };
        run_epochs(&expanded, data, trainer.as_mut(), &loss, &mut order_rng, deadline, &mut by_plan)?
    };
    let models = finish_models(plan, data, trainer.as_ref(), progress, warm_reports)?;
    Ok(if members == 1 { models } else { join_members(models, members, data) })
}

/// A mini-ensemble's epoch as its plan's: `on_epoch` sees one report per
/// plan (the mean losses of its members that trained this epoch) and its
/// control for a plan applies to all its members.
fn per_plan_epoch(
    reports: &[(usize, EpochStats)],
    controls: &mut [Control],
    plans: usize,
    members: usize,
    on_epoch: &mut OnEpoch<'_>,
) {
    let mut joined = Vec::with_capacity(plans);
    for j in 0..plans {
        let mine: Vec<&EpochStats> = reports.iter().filter(|(m, _)| m / members == j).map(|(_, s)| s).collect();
        let Some(first) = mine.first() else { continue };
        let n = mine.len() as f64;
        joined.push((
            j,
            EpochStats {
                epoch: first.epoch,
                train_loss: mine.iter().map(|s| s.train_loss).sum::<f64>() / n,
                valid_loss: mine.iter().map(|s| s.valid_loss).sum::<f64>() / n,
                seconds: first.seconds,
            },
        ));
    }
    let mut by_plan = vec![Control::Continue; plans];
    on_epoch(&joined, &mut by_plan);
    for (m, _) in reports {
        controls[*m] = by_plan[m / members];
    }
}

/// Each plan's members as one model: the first member's, with the others
/// beside it and the metrics of their average. A member that failed fails
/// the plan (a cancel first).
fn join_members(
    models: Vec<Result<TrainedModel, TrainError>>,
    members: usize,
    data: &TrainingData,
) -> Vec<Result<TrainedModel, TrainError>> {
    let valid_targets: Vec<f64> = data.valid_idx.iter().map(|&i| data.raw_targets[i]).collect();
    let mut joined = Vec::with_capacity(models.len() / members);
    let mut models = models.into_iter();
    loop {
        let group: Vec<Result<TrainedModel, TrainError>> = models.by_ref().take(members).collect();
        if group.is_empty() {
            break;
        }
        let failed = group
            .iter()
            .position(|m| matches!(m, Err(TrainError::Cancelled)))
            .or(group.iter().position(Result::is_err));
        let mut group = group.into_iter();
        if let Some(at) = failed {
            joined.push(group.nth(at).expect("a failed member"));
            continue;
        }
        let mut first = group.next().expect("a member").expect("no member failed");
        for other in group.flatten() {
            first.epochs_run = first.epochs_run.max(other.epochs_run);
            first.members.push(other.network);
        }
        let outputs = first.outputs_from_encoded(data.valid_batch());
        first.metrics = validation_metrics(first.task, first.class_labels.len(), &outputs, &valid_targets);
        joined.push(Ok(first));
    }
    joined
}

/// The plan every model of the stack shares all but per-model options with.
fn stack_plan(plans: &[TrainingPlan]) -> Result<&TrainingPlan, TrainError> {
    let plan = plans.first().ok_or(TrainError::Incompatible("no plans"))?;
    if let Some(what) = plans.iter().find_map(|p| incompatibility(plan, p)) {
        return Err(TrainError::Incompatible(what));
    }
    Ok(plan)
}

/// The rows a stack trains and validates on, encoded once for all its models.
struct TrainingData {
    /// The rows whose target is usable (not NULL, a known label, finite), as
    /// row numbers of the columns; everything below indexes this list.
    rows: Vec<usize>,
    /// Their targets: class index or value, in the target's units.
    raw_targets: Vec<f64>,
    /// Their targets as learnt: regression transformed by `target_scale`.
    y: Vec<f32>,
    target_scale: Option<TargetScale>,
    /// What `target_transform = "auto"` chose.
    auto_transform: Option<TargetTransform>,
    train_idx: Vec<usize>,
    valid_idx: Vec<usize>,
    pipeline: FeaturePipeline,
    /// Every row of the columns, encoded (`x_all` is `width` wide).
    x_all: Vec<f32>,
    codes_all: Vec<u32>,
    /// Dense copies of the validation rows, scored once per epoch.
    valid: Encoded,
    y_valid: Vec<f32>,
}

impl TrainingData {
    /// Splits the rows (drawing from `rng`, the data-order stream), fits the
    /// feature pipeline on the training split and encodes every row.
    fn prepare(
        plan: &TrainingPlan,
        features: &[ColumnData],
        target: &ColumnData,
        rng: &mut ChaCha8Rng,
    ) -> Result<TrainingData, TrainError> {
        let opts = &plan.options;
        let (rows, raw_targets, valid_idx, train_idx) = split_usable(plan, target, rng)?;

        let train_rows: Vec<usize> = train_idx.iter().map(|&i| rows[i]).collect();
        let pipeline = FeaturePipeline::fit(&plan.features, features, &train_rows, opts)?;
        let width = pipeline.width();
        let code_cols = pipeline.embeddings().len();
        let Encoded { x: x_all, codes: codes_all, .. } = pipeline.transform(features)?;

        let (target_scale, auto_transform) = if plan.task == Task::Regression {
            let (scale, auto) = target_scale(opts.target_transform, &raw_targets, &train_idx)?;
            (Some(scale), auto)
        } else {
            (None, None)
        };
        let y: Vec<f32> = raw_targets
            .iter()
            .map(|&v| match target_scale {
                Some(s) => s.learnt(v),
                None => v as f32,
            })
            .collect();

        let mut x_valid = Vec::with_capacity(valid_idx.len() * width);
        let mut codes_valid = Vec::with_capacity(valid_idx.len() * code_cols);
        let mut y_valid = Vec::with_capacity(valid_idx.len());
        for &i in &valid_idx {
            x_valid.extend_from_slice(&x_all[rows[i] * width..(rows[i] + 1) * width]);
            codes_valid.extend_from_slice(&codes_all[rows[i] * code_cols..(rows[i] + 1) * code_cols]);
            y_valid.push(y[i]);
        }
        let valid = Encoded { x: x_valid, codes: codes_valid, n: valid_idx.len() };
        Ok(TrainingData {
            rows,
            raw_targets,
            y,
            target_scale,
            auto_transform,
            train_idx,
            valid_idx,
            pipeline,
            x_all,
            codes_all,
            valid,
            y_valid,
        })
    }

    /// About what it takes in memory.
    fn bytes(&self) -> usize {
        let floats = self.x_all.len() + self.codes_all.len() + self.y.len() + self.valid.x.len();
        let more = self.valid.codes.len() + self.y_valid.len();
        let indexes = self.rows.len() + self.train_idx.len() + self.valid_idx.len() + self.raw_targets.len();
        4 * (floats + more) + 8 * indexes
    }

    fn valid_batch(&self) -> Batch<'_> {
        Batch { x: &self.valid.x, codes: &self.valid.codes, n: self.valid.n }
    }
}

/// How a regression learns its target (`targets` are every usable row's,
/// `train_idx` the training rows among them), and what `auto` chose. The
/// mean and deviation are the training rows' (of `ln y` for `log`); every
/// usable target must be greater than 0 for `log`.
fn target_scale(
    transform: TargetTransform,
    targets: &[f64],
    train_idx: &[usize],
) -> Result<(TargetScale, Option<TargetTransform>), TrainError> {
    let smallest = targets.iter().copied().fold(f64::INFINITY, f64::min);
    let (transform, auto) = match transform {
        TargetTransform::Auto => {
            let train: Vec<f64> = train_idx.iter().map(|&i| targets[i]).collect();
            let chosen = if smallest > 0.0 && skewness(&train) > AUTO_LOG_SKEWNESS {
                TargetTransform::Log
            } else {
                TargetTransform::Standardize
            };
            (chosen, Some(chosen))
        }
        t => (t, None),
    };
    if transform == TargetTransform::Log && smallest <= 0.0 {
        return Err(TrainError::TargetNotPositive { smallest });
    }
    let log = transform == TargetTransform::Log;
    if transform == TargetTransform::None {
        return Ok((TargetScale { mean: 0.0, std: 1.0, log: false }, auto));
    }
    let value = |i: usize| if log { targets[i].ln() } else { targets[i] };
    let n = train_idx.len() as f64;
    let mean = train_idx.iter().map(|&i| value(i)).sum::<f64>() / n;
    let var = train_idx.iter().map(|&i| (value(i) - mean).powi(2)).sum::<f64>() / n;
    let std = if var.sqrt() > 1e-12 { var.sqrt() } else { 1.0 };
    Ok((TargetScale { mean: mean as f32, std: std as f32, log }, auto))
}

/// The sample skewness `m3 / m2^1.5` (population central moments) of
/// `values`; 0 when they do not vary.
fn skewness(values: &[f64]) -> f64 {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let moment = |p: i32| values.iter().map(|v| (v - mean).powi(p)).sum::<f64>() / n;
    let m2 = moment(2);
    if m2 <= 0.0 || !m2.is_finite() {
        return 0.0;
    }
    moment(3) / m2.powf(1.5)
}

/// The rows with a usable target and their targets as f64 (class index or
/// value); rows whose target is NULL or not a known label are not used.
fn usable_targets(plan: &TrainingPlan, target: &ColumnData) -> Result<(Vec<usize>, Vec<f64>), TrainError> {
    let (rows, raw_targets): (Vec<usize>, Vec<f64>) = match (plan.task.is_classification(), target) {
        (true, ColumnData::Text(values)) => values
            .iter()
            .enumerate()
            .filter_map(|(r, v)| {
                let label = v.as_deref()?;
                plan.class_labels.iter().position(|l| l == label).map(|i| (r, i as f64))
            })
            .unzip(),
        (false, ColumnData::Float64(values)) => {
            values.iter().enumerate().filter_map(|(r, v)| v.filter(|x| x.is_finite()).map(|x| (r, x))).unzip()
        }
        (classification, found) => {
            return Err(TrainError::TargetKind {
                task: plan.task,
                expected: if classification { "text" } else { "numbers" },
                found: found.kind_name(),
            });
        }
    };
    if rows.len() < 2 {
        return Err(TrainError::TooFewRows { usable: rows.len() });
    }
    Ok((rows, raw_targets))
}

/// The validation rows a model of `plan` was scored on, as row numbers of
/// `target`'s column, with their targets (class index or value): the rows
/// and order [`train_group`] validates on, so a model read back from its
/// ONNX file can be scored on them again (a selection's ensemble).
pub fn validation_rows(plan: &TrainingPlan, target: &ColumnData) -> Result<(Vec<usize>, Vec<f64>), TrainError> {
    // A fresh data-order stream, as train_group_warm starts it.
    let mut order_rng = ChaCha8Rng::seed_from_u64(plan.options.seed);
    let (rows, raw_targets, valid_idx, _) = split_usable(plan, target, &mut order_rng)?;
    Ok(valid_idx.iter().map(|&i| (rows[i], raw_targets[i])).unzip())
}

/// The training and the validation rows of `plan`'s split of `target`
/// (rows of the snapshot).
pub fn training_and_validation_rows(
    plan: &TrainingPlan,
    target: &ColumnData,
) -> Result<(Vec<usize>, Vec<usize>), TrainError> {
    let mut order_rng = ChaCha8Rng::seed_from_u64(plan.options.seed);
    let (rows, _, valid_idx, train_idx) = split_usable(plan, target, &mut order_rng)?;
    Ok((train_idx.iter().map(|&i| rows[i]).collect(), valid_idx.iter().map(|&i| rows[i]).collect()))
}

/// The rows with a usable target, their targets, and the validation and
/// training indexes among them, split with `rng`'s next draws.
type UsableSplit = (Vec<usize>, Vec<f64>, Vec<usize>, Vec<usize>);

fn split_usable(plan: &TrainingPlan, target: &ColumnData, rng: &mut ChaCha8Rng) -> Result<UsableSplit, TrainError> {
    let (rows, raw_targets) = usable_targets(plan, target)?;
    let opts = &plan.options;
    let (valid_idx, train_idx) = split_rows(rows.len(), opts.validation_fraction, opts.split, rng);
    Ok((rows, raw_targets, valid_idx, train_idx))
}

/// The validation and training indexes of `n` usable rows (at least 2):
/// each split has at least one.
fn split_rows(n: usize, validation_fraction: f64, split: Split, rng: &mut ChaCha8Rng) -> (Vec<usize>, Vec<usize>) {
    let mut order: Vec<usize> = (0..n).collect();
    let n_valid = ((n as f64 * validation_fraction).round() as usize).clamp(1, n - 1);
    let (valid_idx, train_idx) = match split {
        Split::Random => {
            order.shuffle(rng);
            order.split_at(n_valid)
        }
        // Rows arrive in key order: the last ones validate.
        Split::Ordered => {
            order.rotate_left(n - n_valid);
            order.split_at(n_valid)
        }
    };
    (valid_idx.to_vec(), train_idx.to_vec())
}

/// A stack ready for its first epoch.
struct StartedStack {
    /// Its network, on its device.
    trainer: Box<dyn backend::StackTrainer>,
    loss: Loss,
    /// Per model, what its warm start copied.
    warm_reports: Vec<Option<WarmStart>>,
}

/// The stack's network on its device, initialised (model `m` from its
/// parent's weights where `warm[m]` has them).
fn start_stack(
    plan: &TrainingPlan,
    k: usize,
    warm: &[Option<&ParentWeights>],
    data: &TrainingData,
    compute: Compute,
) -> Result<StartedStack, TrainError> {
    let opts = &plan.options;
    let head = head_for(plan.task, plan.class_labels.len());
    let arch = architecture(opts, &data.pipeline, head.outputs());
    let loss = loss_for(plan, head, data.train_idx.iter().map(|&i| data.raw_targets[i]));
    // Model m is member m % members of its mini-ensemble: member 0 draws
    // what a single network draws, member i from stream 1 + i.
    let members = opts.members.max(1) as usize;
    let mut init_rngs: Vec<ChaCha8Rng> = (0..k)
        .map(|m| {
            let mut r = ChaCha8Rng::seed_from_u64(opts.seed);
            r.set_stream(1 + (m % members) as u64);
            r
        })
        .collect();
    let mut initial = Stack::new(arch, opts.seed, &mut init_rngs);
    let warm_reports: Vec<Option<WarmStart>> = (0..k)
        .map(|m| warm.get(m).copied().flatten().map(|parent| warm_start(&mut initial, m, &data.pipeline, parent)))
        .collect();
    let trainer = backend::start(initial, loss.clone(), opts.optimizer, compute)?;
    Ok(StartedStack { trainer, loss, warm_reports })
}

/// One model's course through the epochs of its stack.
struct Progress {
    active: bool,
    /// The epoch whose loss was not finite.
    diverged: Option<u32>,
    cancelled: bool,
    /// The epoch a deadline cut short.
    interrupted: Option<u32>,
    best: (f64, Option<Stack>, u32),
    since_best: u32,
    history: Vec<EpochStats>,
}

/// Trains the stack epoch by epoch until every model has stopped: at its
/// own epoch budget, by early stopping, by diverging, as `on_epoch` says,
/// or at `deadline`. Each model keeps its best epoch's weights.
fn run_epochs(
    plans: &[TrainingPlan],
    data: &TrainingData,
    trainer: &mut dyn backend::StackTrainer,
    loss: &Loss,
    rng: &mut ChaCha8Rng,
    deadline: Option<Instant>,
    on_epoch: &mut OnEpoch<'_>,
) -> Result<Vec<Progress>, TrainError> {
    let k = plans.len();
    let outputs = loss.head.outputs();
    let width = data.pipeline.width();
    let code_cols = data.pipeline.embeddings().len();
    let valid_batch = data.valid_batch();
    let y_valid = &data.y_valid;
    // The stack's models share batch_size.
    let batch = (plans[0].options.batch_size as usize).min(data.train_idx.len());
    let steps_per_epoch = data.train_idx.len().div_ceil(batch);
    let settings: Vec<ModelStep> = plans
        .iter()
        .map(|p| ModelStep {
            lr: p.options.learning_rate as f32,
            weight_decay: p.options.weight_decay as f32,
            momentum: p.options.momentum as f32,
            clip_norm: p.options.clip_norm as f32,
        })
        .collect();
    let mut step = 0usize;

    let mut progress: Vec<Progress> = (0..k)
        .map(|_| Progress {
            active: true,
            diverged: None,
            cancelled: false,
            interrupted: None,
            best: (f64::INFINITY, None, 0),
            since_best: 0,
            history: Vec::new(),
        })
        .collect();
    let max_epochs = plans.iter().map(|p| p.options.epochs).max().unwrap_or(0);
    let mut train_order: Vec<usize> = data.train_idx.to_vec();
    for epoch in 1..=max_epochs {
        if progress.iter().all(|p| !p.active) {
            break;
        }
        let started = Instant::now();
        let active: Vec<bool> = progress.iter().map(|p| p.active).collect();
        train_order.shuffle(rng);
        let mut loss_sums = vec![0.0f64; k];
        let chunks: Vec<&[usize]> = train_order.chunks(batch).collect();
        // With a deadline the epoch runs in parts, so that it can end between
        // them; each step is the same either way.
        let part = match deadline {
            Some(_) => chunks.len().div_ceil(EPOCH_PARTS).max(1),
            None => chunks.len().max(1),
        };
        for (nth, part_chunks) in chunks.chunks(part).enumerate() {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                for p in progress.iter_mut().filter(|p| p.active) {
                    p.active = false;
                    p.interrupted = Some(epoch);
                }
                return Ok(progress);
            }
            let source = Gather {
                chunks: part_chunks,
                rows: &data.rows,
                x: &data.x_all,
                codes: &data.codes_all,
                y: &data.y,
                width,
                code_cols,
            };
            let first_step = step + nth * part;
            let step_settings = |i: usize, m: usize| {
                let o = &plans[m].options;
                let total = o.epochs as usize * steps_per_epoch;
                let warmup = o.warmup_epochs as usize * steps_per_epoch;
                ModelStep {
                    lr: scheduled_lr(o.schedule, o.learning_rate as f32, first_step + i, total, warmup),
                    ..settings[m]
                }
            };
            trainer.epoch(part_chunks.len(), &source, &step_settings, &active, &mut loss_sums)?;
        }
        step += chunks.len();
        let valid_logits = trainer.predict(valid_batch, EVAL_CHUNK)?;
        let seconds = started.elapsed().as_secs_f64();
        let mut valid_block = vec![0.0f32; y_valid.len() * outputs];
        let mut reports = Vec::with_capacity(k);
        for (m, p) in progress.iter_mut().enumerate() {
            if !p.active {
                continue;
            }
            gather_block(&valid_logits, y_valid.len(), k, outputs, m, &mut valid_block);
            let valid_loss = loss.loss(&valid_block, y_valid, y_valid.len());
            let train_loss = loss_sums[m] / train_order.len() as f64;
            if !train_loss.is_finite() || !valid_loss.is_finite() {
                p.active = false;
                p.diverged = Some(epoch);
                continue;
            }
            let stats = EpochStats { epoch, train_loss, valid_loss, seconds };
            p.history.push(stats.clone());
            if valid_loss < p.best.0 {
                p.best = (valid_loss, Some(trainer.model(m)?), epoch);
                p.since_best = 0;
            } else {
                p.since_best += 1;
            }
            let o = &plans[m].options;
            if epoch >= o.epochs || (o.patience > 0 && p.since_best >= o.patience) {
                p.active = false;
            }
            reports.push((m, stats));
        }
        let mut controls = vec![Control::Continue; k];
        on_epoch(&reports, &mut controls);
        for (m, _) in &reports {
            match controls[*m] {
                Control::Stop => return Err(TrainError::Stopped),
                // A model that has just finished its epochs is kept.
                Control::Drop if progress[*m].active => {
                    progress[*m].active = false;
                    progress[*m].cancelled = true;
                }
                Control::Drop => {}
                Control::Finish => progress[*m].active = false,
                Control::Continue => {}
            }
        }
    }
    Ok(progress)
}

/// Each model of the stack with its best weights and validation metrics,
/// or why it has none.
fn finish_models(
    plan: &TrainingPlan,
    data: &TrainingData,
    trainer: &dyn backend::StackTrainer,
    progress: Vec<Progress>,
    warm_reports: Vec<Option<WarmStart>>,
) -> Result<Vec<Result<TrainedModel, TrainError>>, TrainError> {
    let k = progress.len();
    let valid_targets: Vec<f64> = data.valid_idx.iter().map(|&i| data.raw_targets[i]).collect();
    let mut models = Vec::with_capacity(k);
    for (m, p) in progress.into_iter().enumerate() {
        if let Some(epoch) = p.diverged {
            models.push(Err(TrainError::Diverged { epoch }));
            continue;
        }
        if p.cancelled {
            models.push(Err(TrainError::Cancelled));
            continue;
        }
        let (_, best, best_epoch) = p.best;
        let network = match best {
            Some(network) => network,
            None => trainer.model(m)?,
        };
        let mut model = TrainedModel {
            task: plan.task,
            class_labels: plan.class_labels.clone(),
            pipeline: data.pipeline.clone(),
            network,
            target_scale: data.target_scale,
            auto_transform: data.auto_transform,
            best_epoch,
            epochs_run: p.history.len() as u32,
            interrupted: p.interrupted,
            history: p.history,
            metrics: Metrics::new(),
            rows_train: data.train_idx.len(),
            rows_valid: data.valid_idx.len(),
            device: trainer.device().to_string(),
            warm_start: warm_reports[m].clone(),
            importance: None,
            surrogate: None,
            members: Vec::new(),
        };
        let outputs = model.outputs_from_encoded(data.valid_batch());
        model.metrics = validation_metrics(model.task, model.class_labels.len(), &outputs, &valid_targets);
        models.push(Ok(model));
    }
    Ok(models)
}

/// A model's metrics from its outputs on the validation rows (as
/// [`TrainedModel::outputs`]) and their targets (class index or value).
pub fn validation_metrics(task: Task, classes: usize, outputs: &[f32], valid_targets: &[f64]) -> Metrics {
    match task {
        Task::Binary => metrics::binary(outputs, &valid_targets.iter().map(|&t| t == 1.0).collect::<Vec<_>>()),
        Task::Multiclass => {
            metrics::multiclass(outputs, classes, &valid_targets.iter().map(|&t| t as usize).collect::<Vec<_>>())
        }
        Task::Regression => metrics::regression(&outputs.iter().map(|&v| v as f64).collect::<Vec<_>>(), valid_targets),
    }
}

/// An epoch's minibatches: chunk `i` of the shuffled order, gathered.
struct Gather<'a> {
    chunks: &'a [&'a [usize]],
    rows: &'a [usize],
    x: &'a [f32],
    codes: &'a [u32],
    y: &'a [f32],
    width: usize,
    code_cols: usize,
}

impl BatchSource for Gather<'_> {
    fn batch<'s>(&'s self, i: usize, mb: &'s mut MiniBatch) -> (Batch<'s>, &'s [f32]) {
        let (width, cols, chunk) = (self.width, self.code_cols, self.chunks[i]);
        mb.n = chunk.len();
        mb.x.resize(mb.n * width, 0.0);
        mb.codes.resize(mb.n * cols, 0);
        mb.y.resize(mb.n, 0.0);
        for (j, &i) in chunk.iter().enumerate() {
            let r = self.rows[i];
            mb.x[j * width..(j + 1) * width].copy_from_slice(&self.x[r * width..(r + 1) * width]);
            mb.codes[j * cols..(j + 1) * cols].copy_from_slice(&self.codes[r * cols..(r + 1) * cols]);
            mb.y[j] = self.y[i];
        }
        mb.view()
    }
}

/// Copies model `m`'s `[n × c]` block out of `[n × k·c]` logits.
fn gather_block(wide: &[f32], n: usize, k: usize, c: usize, m: usize, out: &mut [f32]) {
    for r in 0..n {
        out[r * c..(r + 1) * c].copy_from_slice(&wide[r * k * c + m * c..r * k * c + (m + 1) * c]);
    }
}

fn predict_logits(network: &Stack, batch: Batch<'_>) -> Vec<f32> {
    let mut out = Vec::with_capacity(batch.n * network.outputs());
    Predictor::new(network, 1).predict(batch, &mut out);
    out
}

impl TrainedModel {
    /// sha256 of every trained parameter and running statistic, in storage
    /// order, as little-endian f32: equal exactly when the weights are.
    pub fn weights_sha256(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        for net in std::iter::once(&self.network).chain(&self.members) {
            for tensor in net.params.iter().chain(&net.state) {
                for v in tensor {
                    hash.update(v.to_le_bytes());
                }
            }
        }
        crate::digest::hex(&hash.finalize())
    }

    /// What trained it: cerebrod's version, the commit it was built from,
    /// the device, how many models its stack trained at once, and what it
    /// took from its parent. Why it stopped early is the job loop's to add.
    pub fn trained_with(&self, stack: usize) -> TrainedWith {
        TrainedWith {
            cerebrod: env!("CARGO_PKG_VERSION").into(),
            commit: env!("CEREBRO_GIT_COMMIT").into(),
            device: self.device.clone(),
            stack,
            warm_start: self.warm_start.clone(),
            stopped: None,
            target_transform: self.auto_transform,
            ensemble: None,
        }
    }

    pub fn head(&self) -> Head {
        head_for(self.task, self.class_labels.len())
    }

    /// Measures each source column's permutation importance on `plan`'s
    /// validation rows of `features` ([`crate::importance`]).
    pub fn measure_importance(
        &mut self,
        plan: &TrainingPlan,
        features: &[ColumnData],
        target: &ColumnData,
    ) -> Result<(), TrainError> {
        let (rows, targets) = validation_rows(plan, target)?;
        let valid: Vec<ColumnData> = features.iter().map(|c| c.take(&rows)).collect();
        let networks = 1 + self.members.len();
        self.importance =
            importance::bounded(importance::on_sample(plan, networks, &valid, &targets, &mut |columns| {
                self.outputs(columns)
            })?);
        Ok(())
    }

    /// Fits its rule surrogate to what it predicts on `plan`'s training rows
    /// of `features` ([`crate::distill`]).
    pub fn distill(
        &mut self,
        plan: &TrainingPlan,
        features: &[ColumnData],
        target: &ColumnData,
    ) -> Result<(), TrainError> {
        let (train, valid) = training_and_validation_rows(plan, target)?;
        let names: Vec<String> = plan.features.iter().map(|f| f.name.clone()).collect();
        let surrogate = distill::distill(
            self.task,
            &self.class_labels,
            &names,
            features,
            &train,
            &valid,
            plan.options.seed,
            DEFAULT_MAX_DEPTH,
            &mut |columns| self.outputs(columns),
        )?;
        self.surrogate = Some(surrogate);
        Ok(())
    }

    /// What the exported graph outputs, computed by the engine itself:
    /// positive-class probabilities (binary), class probabilities row by row
    /// (multiclass) or values in the target's units (regression).
    pub fn outputs(&self, columns: &[ColumnData]) -> Result<Vec<f32>, FeatureError> {
        let e = self.pipeline.transform(columns)?;
        Ok(self.outputs_from_encoded(Batch { x: &e.x, codes: &e.codes, n: e.n }))
    }

    /// A mini-ensemble's is the average of its members', `Σ (1/k)·output`
    /// in member order, as its ONNX graph sums them.
    fn outputs_from_encoded(&self, batch: Batch<'_>) -> Vec<f32> {
        if self.members.is_empty() {
            return self.network_outputs(&self.network, batch);
        }
        let weight = 1.0 / (1 + self.members.len()) as f32;
        let mut sum = vec![0.0f32; 0];
        for net in std::iter::once(&self.network).chain(&self.members) {
            let out = self.network_outputs(net, batch);
            sum.resize(out.len(), 0.0);
            sum.iter_mut().zip(&out).for_each(|(s, o)| *s += weight * o);
        }
        sum
    }

    /// One network's head outputs.
    fn network_outputs(&self, network: &Stack, batch: Batch<'_>) -> Vec<f32> {
        let mut out = predict_logits(network, batch);
        match self.head() {
            Head::Binary => out.iter_mut().for_each(|z| *z = crate::engine::sigmoid(*z)),
            Head::Multiclass(c) => {
                let mut row = vec![0.0; c];
                for chunk in out.chunks_exact_mut(c) {
                    crate::engine::softmax_into(chunk, &mut row);
                    chunk.copy_from_slice(&row);
                }
            }
            Head::Regression => {
                let s = self.target_scale.expect("regression models carry a target scale");
                out.iter_mut().for_each(|z| *z = s.value(*z));
            }
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use cerebro_shared::spec::{Feature, FeatureKind, TrainOptions};
    use cerebro_shared::sql::metrics::{ACCURACY, AUC, R2, RMSE};

    use super::*;

    /// A separable problem with a numeric and a categorical signal, NULLs in both.
    pub(crate) fn toy(n: usize) -> (Vec<ColumnData>, ColumnData) {
        let mut x = Vec::new();
        let mut c = Vec::new();
        let mut y = Vec::new();
        for i in 0..n {
            let v = (i as f64 * 0.7).sin() * 3.0;
            let cat = ["red", "green", "blue"][i % 3];
            let label = v + if cat == "red" { 1.5 } else { 0.0 } > 0.5;
            x.push(if i % 17 == 0 { None } else { Some(v) });
            c.push(if i % 23 == 0 { None } else { Some(cat.to_string()) });
            y.push(Some(if label { "yes" } else { "no" }.to_string()));
        }
        (vec![ColumnData::Float64(x), ColumnData::Text(c)], ColumnData::Text(y))
    }

    pub(crate) fn plan(task: Task, labels: &[&str]) -> TrainingPlan {
        TrainingPlan {
            task,
            target: "y".into(),
            features: vec![
                Feature { name: "x".into(), kind: FeatureKind::Numeric },
                Feature { name: "c".into(), kind: FeatureKind::Categorical },
            ],
            class_labels: labels.iter().map(|s| s.to_string()).collect(),
            options: TrainOptions { epochs: 40, hidden: vec![16], learning_rate: 0.01, ..Default::default() },
        }
    }

    #[test]
    fn a_wider_model_takes_more_memory() {
        let (features, _) = toy(300);
        let mut p = plan(Task::Binary, &["no", "yes"]);
        let small = model_bytes(&p, &features).unwrap();
        p.options.hidden = vec![256, 256];
        let wide = model_bytes(&p, &features).unwrap();
        assert!(small > 8192 * 4 && wide > 2 * small, "{small} {wide}");
    }

    #[test]
    fn an_ordered_split_validates_on_the_last_rows() {
        // The last fifth flips its labels: learnt from the rows before it,
        // it is mostly wrong; mixed into training by a random split, it is not.
        let (features, target) = toy(600);
        let ColumnData::Text(labels) = target else { unreachable!() };
        let flipped: Vec<Option<String>> = labels
            .iter()
            .enumerate()
            .map(|(i, l)| match (i >= 480, l.as_deref()) {
                (true, Some("yes")) => Some("no".to_string()),
                (true, _) => Some("yes".to_string()),
                (false, l) => l.map(str::to_string),
            })
            .collect();
        let target = ColumnData::Text(flipped);
        let accuracy = |split| {
            let mut p = plan(Task::Binary, &["no", "yes"]);
            p.options.split = split;
            let m = train(&p, &features, &target, Compute::cpu(1), &mut |_| Control::Continue).unwrap();
            assert_eq!(m.rows_valid, 120);
            m.metrics[ACCURACY]
        };
        let (ordered, random) = (accuracy(Split::Ordered), accuracy(Split::Random));
        assert!(ordered < 0.35, "validated on the flipped rows: {ordered}");
        assert!(random > 0.6, "{random}");
    }

    #[test]
    fn learns_a_binary_problem_and_reports_metrics() {
        let (features, target) = toy(600);
        let mut epochs = 0;
        let m = train(&plan(Task::Binary, &["no", "yes"]), &features, &target, Compute::cpu(1), &mut |_| {
            epochs += 1;
            Control::Continue
        })
        .unwrap();
        assert!(m.metrics[AUC] > 0.95, "{:?}", m.metrics);
        assert_eq!(m.rows_valid, 120);
        assert_eq!(epochs as usize, m.history.len());
        assert!(m.best_epoch >= 1 && m.best_epoch <= m.epochs_run);
    }

    /// A mini-ensemble trains its members in one stack: the first is the
    /// single network of the same plan, the others start elsewhere; its
    /// outputs and metrics are their average's, and `on_epoch` sees one
    /// report per epoch for the whole.
    #[test]
    fn a_mini_ensemble_trains_its_members_together_and_averages_them() {
        let (features, target) = toy(400);
        let mut p = plan(Task::Binary, &["no", "yes"]);
        p.options.epochs = 6;
        let single = train(&p, &features, &target, Compute::cpu(1), &mut |_| Control::Continue).unwrap();
        p.options.members = 3;
        let mut reports = 0;
        let m = train(&p, &features, &target, Compute::cpu(1), &mut |_| {
            reports += 1;
            Control::Continue
        })
        .unwrap();
        assert_eq!(reports, 6, "one report per epoch");
        assert_eq!(m.members.len(), 2);
        assert_eq!(m.network, single.network, "member 0 is the single network");
        assert!(m.members.iter().all(|n| *n != m.network) && m.members[0] != m.members[1]);
        let (rows, targets) = validation_rows(&p, &target).unwrap();
        let valid: Vec<ColumnData> = features.iter().map(|c| c.take(&rows)).collect();
        let average = m.outputs(&valid).unwrap();
        let mut expected = vec![0.0f32; average.len()];
        for net in std::iter::once(&m.network).chain(&m.members) {
            let alone = TrainedModel { network: net.clone(), members: Vec::new(), ..m.clone() };
            for (e, o) in expected.iter_mut().zip(alone.outputs(&valid).unwrap()) {
                *e += o / 3.0;
            }
        }
        for (a, e) in average.iter().zip(&expected) {
            assert!((a - e).abs() < 1e-6, "{a} vs {e}");
        }
        assert_eq!(m.metrics, validation_metrics(Task::Binary, 2, &average, &targets));
        assert_ne!(m.weights_sha256(), single.weights_sha256());
        // Memory: three networks' worth.
        let one = model_bytes(&plan(Task::Binary, &["no", "yes"]), &features).unwrap();
        assert_eq!(model_bytes(&p, &features).unwrap(), 3 * one);
    }

    /// A stack that finds its rows split and encoded in the cache trains
    /// exactly as one that prepared them: same weights, same losses; one
    /// whose split or encoding differs prepares its own.
    #[test]
    fn rows_taken_from_the_cache_train_the_same_models() {
        let (features, target) = toy(600);
        let mut p = plan(Task::Binary, &["no", "yes"]);
        p.options.epochs = 3;
        let cache = SnapshotCache::new(1 << 30);
        let read =
            SnapshotKey { snapshot_id: 1, created_micros: 1, relation: "s".into(), columns: vec![], order_by: None };
        let group = |plans: &[TrainingPlan], reuse: Option<Reuse<'_>>| {
            let mut go_on = |_: &[(usize, EpochStats)], _: &mut [Control]| {};
            train_group_warm(plans, &[], &features, &target, Compute::cpu(2), None, reuse, &mut go_on).unwrap()
        };
        let alone = group(std::slice::from_ref(&p), None);
        let reuse = Some(Reuse { cache: &cache, read: &read });
        let first = group(std::slice::from_ref(&p), reuse);
        assert_eq!(cache.stats().entries, 1, "the stack's rows are kept");
        // Another optimiser on the same rows: a hit.
        let mut other = p.clone();
        other.options.learning_rate = 0.003;
        let again = group(&[p.clone(), other.clone()], reuse);
        assert_eq!(cache.stats().entries, 1, "nothing new to keep");
        for (a, b) in [(&alone[0], &first[0]), (&alone[0], &again[0])] {
            let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
            assert_eq!(a.network, b.network);
            assert_eq!(
                a.history.iter().map(|h| h.train_loss).collect::<Vec<_>>(),
                b.history.iter().map(|h| h.train_loss).collect::<Vec<_>>()
            );
        }
        let other_alone = group(std::slice::from_ref(&other), None);
        assert_eq!(other_alone[0].as_ref().unwrap().network, again[1].as_ref().unwrap().network);
        // Another seed splits the rows otherwise: prepared and kept apart.
        let mut reseeded = p.clone();
        reseeded.options.seed += 1;
        group(&[reseeded], reuse);
        assert_eq!(cache.stats().entries, 2);
    }

    #[test]
    fn a_deadline_stops_within_an_epoch_and_parts_change_nothing_before_it() {
        let (features, target) = toy(600);
        let mut p = plan(Task::Binary, &["no", "yes"]);
        p.options.batch_size = 16;
        p.options.epochs = 3;
        let plans = [p.clone(), p];
        let group = |deadline: Option<Instant>| {
            // Epoch 1 ends before the deadline; the deadline passes after it.
            let mut wait = |_: &[(usize, EpochStats)], _: &mut [Control]| {
                if let Some(d) =
                    deadline.filter(|d| d.saturating_duration_since(Instant::now()) < Duration::from_secs(60))
                {
                    std::thread::sleep(d.saturating_duration_since(Instant::now()));
                }
            };
            train_group_warm(&plans, &[], &features, &target, Compute::cpu(2), deadline, None, &mut wait).unwrap()
        };
        // An epoch in parts, with a deadline that never comes, is the same epoch.
        let whole = group(None);
        let in_parts = group(Some(Instant::now() + Duration::from_secs(3600)));
        for (a, b) in whole.iter().zip(&in_parts) {
            let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
            assert_eq!(a.network, b.network);
            assert_eq!(
                a.history.iter().map(|h| h.train_loss).collect::<Vec<_>>(),
                b.history.iter().map(|h| h.train_loss).collect::<Vec<_>>()
            );
            assert_eq!((a.epochs_run, a.interrupted), (3, None));
        }
        // A deadline that passes after epoch 1 stops epoch 2 before its
        // first part: each model is epoch 1's.
        for (model, whole) in group(Some(Instant::now() + Duration::from_millis(500))).into_iter().zip(&whole) {
            let model = model.unwrap();
            assert_eq!((model.epochs_run, model.interrupted, model.best_epoch), (1, Some(2), 1));
            let first = &whole.as_ref().unwrap().history[0];
            assert_eq!(
                (model.history[0].train_loss, model.history[0].valid_loss),
                (first.train_loss, first.valid_loss)
            );
        }
        // One already passed stops every model before its first step.
        for model in group(Some(Instant::now())) {
            let model = model.unwrap();
            assert_eq!((model.epochs_run, model.interrupted, model.best_epoch), (0, Some(1), 0));
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_weights() {
        let (features, target) = toy(300);
        let p = plan(Task::Binary, &["no", "yes"]);
        let a = train(&p, &features, &target, Compute::cpu(1), &mut |_| Control::Continue).unwrap();
        let b = train(&p, &features, &target, Compute::cpu(1), &mut |_| Control::Continue).unwrap();
        assert_eq!(a.network, b.network);
        // Rows split across threads: deterministic too, equal up to rounding.
        let c = train(&p, &features, &target, Compute::cpu(2), &mut |_| Control::Continue).unwrap();
        let d = train(&p, &features, &target, Compute::cpu(2), &mut |_| Control::Continue).unwrap();
        assert_eq!(c.network, d.network);
        assert!((c.metrics[AUC] - a.metrics[AUC]).abs() < 0.02, "{:?} vs {:?}", c.metrics, a.metrics);
        let mut other = p.clone();
        other.options.seed = 7;
        let c = train(&other, &features, &target, Compute::cpu(1), &mut |_| Control::Continue).unwrap();
        assert_ne!(a.network, c.network);
    }

    #[test]
    fn regression_reports_metrics_in_target_units() {
        let n = 400;
        let xs: Vec<Option<f64>> = (0..n).map(|i| Some(i as f64 / 40.0)).collect();
        let ys: Vec<Option<f64>> = xs.iter().map(|x| Some(1000.0 + 50.0 * x.unwrap())).collect();
        let mut p = plan(Task::Regression, &[]);
        p.features.truncate(1);
        p.options.epochs = 200;
        p.options.patience = 0;
        let m = train(&p, &[ColumnData::Float64(xs)], &ColumnData::Float64(ys), Compute::cpu(1), &mut |_| {
            Control::Continue
        })
        .unwrap();
        assert!(m.metrics[R2] > 0.99, "{:?}", m.metrics);
        assert!(m.metrics[RMSE] < 20.0, "{:?}", m.metrics);
    }

    /// A strictly positive, right-skewed target over [`toy`]'s columns:
    /// `exp(1 + 0.5·x + [1 for one category in three] + noise)`, from about
    /// 0.5 to about 35.
    fn skewed(n: usize) -> (Vec<ColumnData>, ColumnData) {
        let (features, _) = toy(n);
        let ColumnData::Float64(x) = &features[0] else { unreachable!() };
        let y = x
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let noise = ((i * 7919) % 101) as f64 / 101.0 - 0.5;
                Some((1.0 + 0.5 * v.unwrap_or(0.0) + if i % 3 == 0 { 1.0 } else { 0.0 } + 0.3 * noise).exp())
            })
            .collect();
        (features, ColumnData::Float64(y))
    }

    fn regression_plan(options: serde_json::Value) -> TrainingPlan {
        let mut p = plan(Task::Regression, &[]);
        let epochs = p.options.epochs;
        p.options = TrainOptions::from_json(Some(&options)).unwrap();
        p.options.epochs = epochs;
        p.options.hidden = vec![16];
        p.options.learning_rate = 0.01;
        p
    }

    #[test]
    fn a_log_target_model_predicts_in_the_targets_units() {
        let (features, target) = skewed(600);
        let ColumnData::Float64(ys) = &target else { unreachable!() };
        let ys: Vec<f64> = ys.iter().map(|y| y.unwrap()).collect();
        assert!(skewness(&ys) > 1.0, "the toy target is right-skewed: {}", skewness(&ys));
        let train_with = |transform: &str| {
            let p = regression_plan(serde_json::json!({ "target_transform": transform }));
            train(&p, &features, &target, Compute::cpu(1), &mut |_| Control::Continue).unwrap()
        };
        let log = train_with("log");
        let scale = log.target_scale.unwrap();
        assert!(scale.log && scale.mean > 0.5 && scale.mean < 3.0, "learnt ln y: {scale:?}");
        let predicted = log.outputs(&features).unwrap();
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let (p, t) = (mean(&predicted.iter().map(|&v| v as f64).collect::<Vec<_>>()), mean(&ys));
        assert!((p - t).abs() < 0.2 * t, "mean prediction {p}, mean target {t}");
        assert!(predicted.iter().all(|&v| v > 0.0), "exp of anything is positive");
        // Metrics are in the target's units, so they compare across transforms.
        let standardized = train_with("standardize");
        assert!(!standardized.target_scale.unwrap().log);
        for m in [&log, &standardized] {
            assert!(m.metrics[R2] > 0.7 && m.metrics[RMSE] < 0.5 * t, "{:?}", m.metrics);
        }
        assert_eq!((log.auto_transform, standardized.auto_transform), (None, None));
        // Auto picks log for this target, and says so in trained_with.
        let auto = train_with("auto");
        assert_eq!(auto.auto_transform, Some(TargetTransform::Log));
        assert_eq!(auto.network, log.network, "auto's log is log");
        assert_eq!(auto.trained_with(1).target_transform, Some(TargetTransform::Log));
        assert_eq!(log.trained_with(1).target_transform, None);
        // None learns the raw target: mean 0, deviation 1, in the target's units.
        let none = train_with("none");
        assert_eq!(none.target_scale, Some(TargetScale { mean: 0.0, std: 1.0, log: false }));
    }

    #[test]
    fn auto_keeps_standardizing_a_symmetric_or_non_positive_target() {
        let (features, target) = skewed(300);
        let ColumnData::Float64(ys) = &target else { unreachable!() };
        let auto = regression_plan(serde_json::json!({"target_transform": "auto"}));
        let log = regression_plan(serde_json::json!({"target_transform": "log"}));
        let run =
            |p: &TrainingPlan, t: &ColumnData| train(p, &features, t, Compute::cpu(1), &mut |_| Control::Continue);
        // ln of the skewed target is about symmetric, and positive.
        let symmetric = ColumnData::Float64(ys.iter().map(|y| y.map(f64::ln)).collect());
        let m = run(&auto, &symmetric).unwrap();
        assert_eq!(m.auto_transform, Some(TargetTransform::Standardize));
        assert!(!m.target_scale.unwrap().log);
        let standardized = run(&regression_plan(serde_json::json!({})), &symmetric).unwrap();
        assert_eq!(m.network, standardized.network, "auto's standardize is the default's");
        // Skewed but with a value at 0: auto standardizes, log refuses.
        let mut with_zero = ys.clone();
        with_zero[5] = Some(0.0);
        let with_zero = ColumnData::Float64(with_zero);
        assert_eq!(run(&auto, &with_zero).unwrap().auto_transform, Some(TargetTransform::Standardize));
        let err = run(&log, &with_zero).unwrap_err();
        assert!(matches!(err, TrainError::TargetNotPositive { smallest } if smallest == 0.0), "{err}");
        assert_eq!(
            err.to_string(),
            "option \"target_transform\" is \"log\", but the target has values that are not greater than 0 \
             (the smallest is 0); ln(y) needs every target > 0"
        );
        // NULL and non-finite targets are not used, so they do not count.
        let mut with_null = ys.clone();
        with_null[3] = None;
        with_null[4] = Some(f64::NEG_INFINITY);
        assert!(run(&log, &ColumnData::Float64(with_null)).unwrap().target_scale.unwrap().log);
    }

    #[test]
    fn skewness_is_the_third_standardised_moment() {
        assert_eq!(skewness(&[1.0, 2.0, 3.0]), 0.0);
        assert_eq!(skewness(&[5.0; 4]), 0.0, "no spread, no skew");
        // 0, 0, 0, 3: mean 0.75, m2 = 1.6875, m3 = 2.53125, skewness = 2.53125 / 1.6875^1.5 = 2/√3.
        assert!((skewness(&[0.0, 0.0, 0.0, 3.0]) - 2.0 / 3f64.sqrt()).abs() < 1e-12);
        assert!((skewness(&[0.0, 3.0, 3.0, 3.0]) + 2.0 / 3f64.sqrt()).abs() < 1e-12, "left-skewed is negative");
    }

    #[test]
    fn stopping_and_bad_targets_are_errors() {
        let (features, target) = toy(50);
        let p = plan(Task::Binary, &["no", "yes"]);
        assert!(matches!(
            train(&p, &features, &target, Compute::cpu(1), &mut |_| Control::Stop),
            Err(TrainError::Stopped)
        ));
        let numeric_target = ColumnData::Float64(vec![Some(1.0); 50]);
        assert!(matches!(
            train(&p, &features, &numeric_target, Compute::cpu(1), &mut |_| Control::Continue),
            Err(TrainError::TargetKind { .. })
        ));
        let no_labels = ColumnData::Text(vec![None; 50]);
        assert!(matches!(
            train(&p, &features, &no_labels, Compute::cpu(1), &mut |_| Control::Continue),
            Err(TrainError::TooFewRows { usable: 0 })
        ));
    }
}

#[cfg(test)]
mod group_tests {
    use cerebro_shared::spec::{Feature, FeatureKind, TrainOptions};
    use cerebro_shared::sql::metrics::AUC;

    use super::*;

    #[test]
    fn a_model_trained_in_a_stack_equals_the_model_trained_alone() {
        for label_smoothing in [0.0, 0.15] {
            a_stack_equals_its_models_alone(label_smoothing);
        }
    }

    fn a_stack_equals_its_models_alone(label_smoothing: f64) {
        let n = 500;
        let x: Vec<Option<f64>> =
            (0..n).map(|i| if i % 13 == 0 { None } else { Some((i as f64 * 0.37).sin()) }).collect();
        let c: Vec<Option<String>> = (0..n).map(|i| Some(["a", "b", "c"][i % 3].to_string())).collect();
        let t: Vec<Option<String>> = (0..n)
            .map(|i| {
                Some(if x[i].unwrap_or(0.0) + if i % 3 == 0 { 0.4 } else { 0.0 } > 0.1 { "y" } else { "n" }.into())
            })
            .collect();
        let features = vec![ColumnData::Float64(x), ColumnData::Text(c)];
        let target = ColumnData::Text(t);
        let base = TrainingPlan {
            task: Task::Binary,
            target: "t".into(),
            features: vec![
                Feature { name: "x".into(), kind: FeatureKind::Numeric },
                Feature { name: "c".into(), kind: FeatureKind::Categorical },
            ],
            class_labels: vec!["n".into(), "y".into()],
            options: TrainOptions {
                hidden: vec![16, 8],
                epochs: 12,
                batch_size: 32,
                label_smoothing,
                ..Default::default()
            },
        };
        let mut plans = Vec::new();
        use cerebro_shared::spec::Schedule;
        for (lr, wd, epochs, patience, schedule, clip) in [
            (1e-3, 0.0, 12, 5, Schedule::Constant, 0.0),
            (1e-2, 0.01, 7, 0, Schedule::Cosine, 0.0),
            (3e-3, 0.0, 12, 2, Schedule::Warmup, 0.5),
        ] {
            let mut p = base.clone();
            p.options.learning_rate = lr;
            p.options.weight_decay = wd;
            p.options.epochs = epochs;
            p.options.patience = patience;
            p.options.schedule = schedule;
            p.options.warmup_epochs = 2;
            p.options.clip_norm = clip;
            plans.push(p);
        }
        let mut seen = vec![0; plans.len()];
        for threads in [1, 2] {
            seen.iter_mut().for_each(|s| *s = 0);
            let stacked = train_group(&plans, &features, &target, Compute::cpu(threads), &mut |reports, _| {
                for (m, _) in reports {
                    seen[*m] += 1;
                }
            })
            .unwrap()
            .into_iter()
            .map(|r| r.unwrap())
            .collect::<Vec<_>>();
            for (m, plan) in plans.iter().enumerate() {
                // Stacks split by model: each model is computed as on one thread.
                let alone = train(plan, &features, &target, Compute::cpu(1), &mut |_| Control::Continue).unwrap();
                assert_eq!(stacked[m].network, alone.network, "model {m}: weights differ");
                let losses =
                    |h: &[EpochStats]| h.iter().map(|e| (e.epoch, e.train_loss, e.valid_loss)).collect::<Vec<_>>();
                assert_eq!(losses(&stacked[m].history), losses(&alone.history));
                assert_eq!(stacked[m].best_epoch, alone.best_epoch);
                assert_eq!(stacked[m].metrics, alone.metrics);
                assert_eq!(seen[m] as usize, alone.history.len());
            }
            assert_eq!(stacked[1].epochs_run, 7, "each model keeps its own epoch budget");
        }
        if label_smoothing > 0.0 {
            // The option reaches the loss: without it the model is another.
            let mut plain = plans[0].clone();
            plain.options.label_smoothing = 0.0;
            let with = train(&plans[0], &features, &target, Compute::cpu(1), &mut |_| Control::Continue).unwrap();
            let without = train(&plain, &features, &target, Compute::cpu(1), &mut |_| Control::Continue).unwrap();
            assert_ne!(with.network, without.network);
        }
    }

    #[test]
    fn a_finished_model_stops_and_is_kept_while_its_stack_goes_on() {
        let (features, target) = super::tests::toy(300);
        let mut plan = super::tests::plan(Task::Binary, &["no", "yes"]);
        plan.options.epochs = 6;
        plan.options.patience = 0;
        let plans = [plan.clone(), plan.clone()];
        let mut reported = Vec::new();
        let results = train_group(&plans, &features, &target, Compute::cpu(1), &mut |reports, controls| {
            reported.push(reports.iter().map(|(m, s)| (*m, s.epoch)).collect::<Vec<_>>());
            for (m, stats) in reports {
                if *m == 1 && stats.epoch == 2 {
                    controls[1] = Control::Finish;
                }
            }
        })
        .unwrap();
        let (kept, full) = (results[1].as_ref().unwrap(), results[0].as_ref().unwrap());
        assert_eq!((kept.epochs_run, full.epochs_run), (2, 6));
        assert_eq!(reported[1], vec![(0, 2), (1, 2)], "one report per epoch, with every model still training");
        assert_eq!(reported[2], vec![(0, 3)]);
        assert!(kept.metrics.contains_key(AUC), "a finished model is scored: {:?}", kept.metrics);
    }

    #[test]
    fn a_model_that_diverges_fails_alone_in_its_stack() {
        let (features, target) = super::tests::toy(300);
        let mut calm = super::tests::plan(Task::Binary, &["no", "yes"]);
        calm.options.optimizer = cerebro_shared::spec::Optimizer::Sgd;
        calm.options.epochs = 3;
        let mut wild = calm.clone();
        wild.options.learning_rate = 1e30;
        let results = train_group(&[calm.clone(), wild], &features, &target, Compute::cpu(1), &mut |_, _| {}).unwrap();
        assert!(matches!(results[1], Err(TrainError::Diverged { .. })), "{:?}", results[1].as_ref().err());
        let alone = train(&calm, &features, &target, Compute::cpu(1), &mut |_| Control::Continue).unwrap();
        assert_eq!(results[0].as_ref().unwrap().network, alone.network);
    }

    #[test]
    fn models_that_differ_in_shape_or_seed_cannot_stack() {
        let a = TrainingPlan {
            task: Task::Regression,
            target: "t".into(),
            features: vec![Feature { name: "x".into(), kind: FeatureKind::Numeric }],
            class_labels: vec![],
            options: TrainOptions::default(),
        };
        let cols = [ColumnData::Float64(vec![Some(1.0), Some(2.0), Some(3.0)])];
        let t = ColumnData::Float64(vec![Some(1.0), Some(2.0), Some(3.0)]);
        let mut wider = a.clone();
        wider.options.hidden = vec![3];
        let mut reseeded = a.clone();
        reseeded.options.seed = 1;
        for (other, what) in [(wider, "hidden"), (reseeded, "seed")] {
            let err = train_group(&[a.clone(), other], &cols, &t, Compute::cpu(1), &mut |_, _| {}).unwrap_err();
            assert!(matches!(err, TrainError::Incompatible(w) if w == what), "{err}");
        }
    }
}
