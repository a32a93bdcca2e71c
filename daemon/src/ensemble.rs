//! A selection's ensemble (docs/selection.md, "Ensembles"): greedy ensemble
//! selection with replacement (Caruana et al., 2004) over the best
//! candidates' predictions on their shared validation rows, then one ONNX
//! graph that averages the chosen members with their weights.
//!
//! The members are read back from their ONNX files and scored by ONNX
//! Runtime, so what is weighed is exactly what each version scores.

use cerebro_shared::batch::ColumnData;
use cerebro_shared::importance::Importance;
use cerebro_shared::provenance::{Ensemble, EnsembleMember, TrainedWith};
use cerebro_shared::spec::{Feature, Task, TrainingPlan};
use cerebro_shared::surrogate::{Surrogate, DEFAULT_MAX_DEPTH};
use tracing::{error, warn};

use crate::catalog::Artifact;
use crate::metrics::Metrics;
use crate::native::disagreement;
use crate::onnx::{self, EnsembleError};
use crate::scoring::{OnnxRuntime, ScoringError, ScoringModel};
use crate::train::{self, TrainError};
use crate::{distill, importance};

/// Greedy steps: each adds one share of a member (so weights are
/// multiples of 1/rounds at most this fine).
pub const ROUNDS: usize = 25;
/// How far the ensemble's graph may stray from the average of its members'
/// outputs (f32 arithmetic in another order) before it is refused: in
/// probability, or relative to the value.
const AGREEMENT: f64 = 1e-4;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    Data(#[from] TrainError),
    #[error("member version {version}: {source}")]
    Member { version: i32, source: ScoringError },
    #[error("member version {version} does not read column \"{input}\", which the ensemble's request has not")]
    UnknownInput { version: i32, input: String },
    #[error("the ensemble's graph: {0}")]
    Graph(#[from] EnsembleError),
    #[error("the ensemble's graph cannot be scored: {0}")]
    Scoring(ScoringError),
    #[error("the ensemble's graph disagrees with its members' average by {0:e} on a validation row")]
    Disagrees(f64),
}

/// One candidate the ensemble may weigh.
pub struct Candidate {
    pub version: i32,
    pub artifact: Artifact,
}

/// What [`build`] made.
pub struct Built {
    pub onnx: Vec<u8>,
    pub metrics: Metrics,
    pub ensemble: Ensemble,
    /// sha256 of its members' ONNX files and weights: what stands for its
    /// weights (`model_versions.weights_sha256`), equal when a reproduction
    /// weighs the same files the same way.
    pub weights_sha256: String,
    /// Validation rows it was weighed on.
    pub rows_valid: usize,
    /// Its source columns' permutation importance, scored through ONNX
    /// Runtime (None when it could not be measured, logged).
    pub importance: Option<Importance>,
    /// Its rule surrogate, distilled through ONNX Runtime (None when it
    /// could not be, logged).
    pub surrogate: Option<Surrogate>,
}

impl Built {
    /// Its provenance: `trained_with`, with the members and their weights.
    pub fn trained_with(&self) -> TrainedWith {
        TrainedWith {
            cerebrod: env!("CARGO_PKG_VERSION").into(),
            commit: env!("CEREBRO_GIT_COMMIT").into(),
            device: "cpu, ONNX Runtime".into(),
            stack: 1,
            warm_start: None,
            stopped: None,
            target_transform: None,
            ensemble: Some(self.ensemble.clone()),
        }
    }
}

/// How many shares of each member greedy selection took.
#[derive(Debug, Clone, PartialEq)]
pub struct Weighed {
    pub counts: Vec<usize>,
    pub rounds: usize,
    pub loss: f64,
}

/// The loss greedy selection lowers: log-loss for classification (outputs
/// are probabilities, `width` per row), squared error for regression.
fn loss(task: Task, outputs: &[f64], width: usize, targets: &[f64]) -> f64 {
    let n = targets.len().max(1) as f64;
    let total: f64 = match task {
        Task::Binary => outputs
            .iter()
            .zip(targets)
            .map(|(&p, &y)| {
                let p = p.clamp(1e-7, 1.0 - 1e-7);
                if y == 1.0 {
                    -p.ln()
                } else {
                    -(1.0 - p).ln()
                }
            })
            .sum(),
        Task::Multiclass => {
            targets.iter().enumerate().map(|(r, &y)| -outputs[r * width + y as usize].clamp(1e-7, 1.0).ln()).sum()
        }
        Task::Regression => outputs.iter().zip(targets).map(|(p, y)| (p - y).powi(2)).sum(),
    };
    total / n
}

/// Greedy ensemble selection with replacement: start from the member with
/// the lowest loss, then `rounds - 1` times add the member whose extra share
/// lowers the average's loss most (the first on ties); keep the best prefix,
/// so the ensemble is never worse on these rows than its best member.
/// `outputs[m]` is member m's output, `width` values per row.
pub fn greedy(task: Task, outputs: &[Vec<f32>], width: usize, targets: &[f64], rounds: usize) -> Weighed {
    let members = outputs.len();
    let cells = targets.len() * width;
    let mut sum = vec![0.0f64; cells];
    let mut counts = vec![0usize; members];
    let mut best = Weighed { counts: counts.clone(), rounds: 0, loss: f64::INFINITY };
    let mut trial = vec![0.0f64; cells];
    for step in 0..rounds.max(1) {
        let k = (step + 1) as f64;
        let mut chosen: Option<(usize, f64)> = None;
        for (m, out) in outputs.iter().enumerate() {
            for ((t, s), o) in trial.iter_mut().zip(&sum).zip(out) {
                *t = (s + f64::from(*o)) / k;
            }
            let l = loss(task, &trial, width, targets);
            if chosen.is_none_or(|(_, c)| l < c) {
                chosen = Some((m, l));
            }
        }
        let Some((m, l)) = chosen else { break };
        counts[m] += 1;
        for (s, o) in sum.iter_mut().zip(&outputs[m]) {
            *s += f64::from(*o);
        }
        if l < best.loss {
            best = Weighed { counts: counts.clone(), rounds: step + 1, loss: l };
        }
    }
    best
}

/// Scores each candidate on the validation rows of `plan` (from `columns`,
/// the plan's features then the target), weighs them greedily, and builds
/// and checks the graph of the weighted average. `candidates` are best
/// first; `metadata` goes into the graph.
pub fn build(
    runtime: &OnnxRuntime,
    plan: &TrainingPlan,
    columns: &[ColumnData],
    candidates: &[Candidate],
    metadata: &[(&str, String)],
) -> Result<Built, BuildError> {
    let (features, target) = columns.split_at(columns.len() - 1);
    let (rows, targets) = train::validation_rows(plan, &target[0])?;
    let valid: Vec<ColumnData> = features.iter().map(|c| c.take(&rows)).collect();
    let width = match plan.task {
        Task::Multiclass => plan.class_labels.len(),
        _ => 1,
    };
    let mut outputs = Vec::with_capacity(candidates.len());
    for c in candidates {
        let member = |source| BuildError::Member { version: c.version, source };
        let model = ScoringModel::from_artifact(runtime, &c.artifact).map_err(member)?;
        let (out, _) = model.run(&feed(&model, &plan.features, &valid, c.version)?).map_err(member)?;
        outputs.push(out);
    }
    let weighed = greedy(plan.task, &outputs, width, &targets, ROUNDS);
    let chosen: Vec<(usize, f64)> = weighed
        .counts
        .iter()
        .enumerate()
        .filter(|(_, &n)| n > 0)
        .map(|(m, &n)| (m, n as f64 / weighed.rounds as f64))
        .collect();

    let mut average = vec![0.0f32; targets.len() * width];
    for &(m, w) in &chosen {
        for (a, o) in average.iter_mut().zip(&outputs[m]) {
            *a += w as f32 * o;
        }
    }
    let metrics = train::validation_metrics(plan.task, plan.class_labels.len(), &average, &targets);
    let members: Vec<(&[u8], f32)> =
        chosen.iter().map(|&(m, w)| (candidates[m].artifact.bytes.as_slice(), w as f32)).collect();
    let bytes = onnx::ensemble(&members, metadata)?;

    let graph = ScoringModel::load(runtime, &bytes).map_err(BuildError::Scoring)?;
    let (scored, _) = graph.run(&feed(&graph, &plan.features, &valid, 0)?).map_err(BuildError::Scoring)?;
    // Relative for values: members the engine scores and the graph ONNX
    // Runtime runs round a price of a million apart by a few hundredths.
    let worst = disagreement(&scored, &average, plan.task == Task::Regression);
    if worst > AGREEMENT {
        return Err(BuildError::Disagrees(worst));
    }

    // Extras: a failure, even a panic, leaves the ensemble without them.
    let explained = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let importance = measure_importance(&graph, chosen.len(), plan, &valid, &targets).unwrap_or_else(|e| {
            warn!("cannot measure the importance of the ensemble's columns: {e}");
            None
        });
        let surrogate = distill::distill_scored(&graph, plan, features, &target[0], DEFAULT_MAX_DEPTH, None)
            .inspect_err(|e| warn!("cannot distill the ensemble's rule surrogate: {e}"))
            .ok();
        (importance, surrogate)
    }));
    let (importance, surrogate) = explained.unwrap_or_else(|_| {
        error!("measuring the ensemble's importance or surrogate panicked; it is stored without them");
        (None, None)
    });

    let files: Vec<String> = chosen
        .iter()
        .map(|&(m, w)| format!("{}:{w}", crate::digest::sha256_hex(&candidates[m].artifact.bytes)))
        .collect();
    let mut members: Vec<EnsembleMember> =
        chosen.iter().map(|&(m, w)| EnsembleMember { version: candidates[m].version, weight: w }).collect();
    members.sort_by(|a, b| b.weight.total_cmp(&a.weight).then(a.version.cmp(&b.version)));
    Ok(Built {
        onnx: bytes,
        metrics,
        ensemble: Ensemble { members, pool: candidates.len(), rounds: weighed.rounds },
        weights_sha256: crate::digest::sha256_hex(files.join(",").as_bytes()),
        rows_valid: rows.len(),
        importance,
        surrogate,
    })
}

/// The permutation importance of the merged `graph`'s columns (of
/// `networks` members) on (a sample of) the validation rows `valid`.
fn measure_importance(
    graph: &ScoringModel,
    networks: usize,
    plan: &TrainingPlan,
    valid: &[ColumnData],
    targets: &[f64],
) -> Result<Option<Importance>, BuildError> {
    let measured = importance::on_sample::<BuildError>(plan, networks, valid, targets, &mut |columns| {
        Ok(graph.run(&feed(graph, &plan.features, columns, 0)?).map_err(BuildError::Scoring)?.0)
    })?;
    Ok(importance::bounded(measured))
}

/// `valid`'s columns (in `features` order) in the order `model` takes its inputs.
fn feed(
    model: &ScoringModel,
    features: &[Feature],
    valid: &[ColumnData],
    version: i32,
) -> Result<Vec<ColumnData>, BuildError> {
    model.arrange(features, valid).map_err(|e| match e {
        ScoringError::MissingInput(input) => BuildError::UnknownInput { version, input },
        e => BuildError::Member { version, source: e },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_selection_starts_from_the_best_and_mixes_what_helps() {
        // Two members wrong in opposite directions: their average is exact.
        let targets = [1.0, 2.0, 3.0, 4.0];
        let low: Vec<f32> = targets.iter().map(|t| *t as f32 - 1.0).collect();
        let high: Vec<f32> = targets.iter().map(|t| *t as f32 + 1.0).collect();
        let noisy: Vec<f32> = vec![0.0, 9.0, 0.0, 9.0];
        let w = greedy(Task::Regression, &[noisy, low, high], 1, &targets, 10);
        assert_eq!(w.counts[0], 0, "a member that only hurts gets no share");
        assert_eq!(w.counts[1], w.counts[2], "equal shares of both sides: {w:?}");
        assert!(w.loss < 1e-12, "{w:?}");
        assert_eq!(w.rounds, 2, "the best prefix is kept, not the last step");
    }

    #[test]
    fn a_single_best_member_keeps_all_the_weight() {
        let targets = [0.0, 1.0, 1.0, 0.0];
        let good = vec![0.1f32, 0.9, 0.8, 0.2];
        let bad = vec![0.9f32, 0.1, 0.2, 0.8];
        let w = greedy(Task::Binary, &[bad, good], 1, &targets, 25);
        assert_eq!((w.counts.clone(), w.rounds), (vec![0, 1], 1), "{w:?}");
    }

    #[test]
    fn multiclass_loss_reads_the_true_class_column() {
        let targets = [0.0, 2.0];
        let right = vec![0.8f32, 0.1, 0.1, 0.1, 0.1, 0.8];
        let wrong = vec![0.1f32, 0.8, 0.1, 0.8, 0.1, 0.1];
        let w = greedy(Task::Multiclass, &[wrong, right], 3, &targets, 5);
        assert_eq!(w.counts, vec![0, 1]);
        assert!((w.loss - -(0.8f64.ln())).abs() < 1e-6);
    }
}
