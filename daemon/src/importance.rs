//! Permutation importance of a version's source columns on its validation
//! rows (docs/sql.md, "Importance"): each column's values are shuffled among
//! the rows, the rows scored again, and the validation metric's drop kept.
//! The scorer is the caller's: the engine for a model Cerebro trained, ONNX
//! Runtime for an ensemble, and the version's scoring model (ONNX Runtime,
//! or the engine once it agrees) for one measured on request.

use cerebro_shared::batch::ColumnData;
use cerebro_shared::importance::Importance;
use cerebro_shared::spec::{Task, TrainingPlan};
use cerebro_shared::sql::metrics::{ACCURACY, AUC, RMSE};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::metrics::Metrics;
use crate::scoring::{RunDeadline, ScoringError, ScoringModel};
use crate::train::{self, validation_metrics, TrainError};

/// Outputs of the rows of some columns, as [`validation_metrics`] reads
/// them: a version's scorer.
pub type Scorer<'a, E> = dyn FnMut(&[ColumnData]) -> Result<Vec<f32>, E> + 'a;

/// Shuffles of each column, averaged.
pub const REPEATS: u32 = 3;

/// Rows scored in one call of the scorer (several shuffles at once).
const BATCH_ROWS: usize = 32_768;

/// Rows scored per shuffle: all the validation rows up to this many.
pub const MAX_ROWS: usize = 5_000;

/// Rows scored for the whole measurement, over every column, shuffle and
/// network: a version with many columns (or an ensemble of many networks)
/// is measured on fewer rows (down to [`MIN_ROWS`]), so that importance
/// costs a small part of training.
const ROW_SCORES: usize = 100_000;
const MIN_ROWS: usize = 500;

/// Which of `valid` validation rows to score for `columns` source columns
/// of a version of `networks` networks (an ensemble scores each row with
/// every member): a seeded sample of their positions when there are more
/// than the work allows, else all of them.
pub fn sample(valid: usize, columns: usize, networks: usize, seed: u64) -> Vec<usize> {
    let work = columns.max(1) * REPEATS as usize * networks.max(1);
    let allowed = (ROW_SCORES / work).clamp(MIN_ROWS, MAX_ROWS);
    seeded_sample(&(0..valid).collect::<Vec<_>>(), allowed, seed)
}

/// At most `most` of `rows`: a seeded sample, in their order, when there
/// are more; else all of them.
pub fn seeded_sample(rows: &[usize], most: usize, seed: u64) -> Vec<usize> {
    let mut picked = rows.to_vec();
    if picked.len() > most {
        picked.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        picked.truncate(most);
        picked.sort_unstable();
    }
    picked
}

/// The importance of `plan`'s features for a version of `networks`
/// networks, on a seeded [`sample`] of the validation rows `valid` (one
/// column per feature, in `plan`'s order) whose targets are `targets`.
pub fn on_sample<E>(
    plan: &TrainingPlan,
    networks: usize,
    valid: &[ColumnData],
    targets: &[f64],
    score: &mut Scorer<'_, E>,
) -> Result<Option<Importance>, E> {
    let picked = sample(targets.len(), valid.len(), networks, plan.options.seed);
    let valid: Vec<ColumnData> = valid.iter().map(|c| c.take(&picked)).collect();
    let targets: Vec<f64> = picked.iter().map(|&p| targets[p]).collect();
    let names: Vec<String> = plan.features.iter().map(|f| f.name.clone()).collect();
    permutation(plan.task, plan.class_labels.len(), &names, &valid, &targets, plan.options.seed, score)
}

/// `importance` unless a column's drop is not a number ([`Importance::unbounded`]),
/// logged: after training it is an extra the version is stored without.
pub fn bounded(importance: Option<Importance>) -> Option<Importance> {
    let unbounded = importance.as_ref().and_then(|i| i.unbounded().map(str::to_owned));
    match unbounded {
        Some(column) => {
            tracing::warn!(column, "no importance stored: with the column shuffled the scores were not finite");
            None
        }
        None => importance,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    #[error(transparent)]
    Rows(#[from] TrainError),
    #[error(transparent)]
    Scoring(#[from] ScoringError),
    #[error(
        "with column \"{0}\" shuffled the version's scores were not finite (NaN or infinite), so its importance \
         is not a number"
    )]
    Unbounded(String),
}

/// The importance of the version `model` scores (as `cerebro.predictions`
/// does; `networks` of them for an ensemble) on `plan`'s validation rows of
/// `features` (in `plan`'s order, as its snapshot is read): what
/// `cerebro.measure_importance` asks for, of a version trained, imported
/// with a target, or an ensemble; with an imported graph's metrics on all
/// those rows (a version trained has those its training measured). An
/// imported graph's runs stop once `deadline` has passed, when given.
pub fn measure_scored(
    model: &ScoringModel,
    networks: usize,
    plan: &TrainingPlan,
    features: &[ColumnData],
    target: &ColumnData,
    deadline: Option<RunDeadline>,
) -> Result<(Option<Importance>, Metrics), MeasureError> {
    let (rows, targets) = train::validation_rows(plan, target)?;
    let valid: Vec<ColumnData> = features.iter().map(|c| c.take(&rows)).collect();
    let mut score = |columns: &[ColumnData]| model.metric_outputs(plan, columns, deadline);
    let mut metrics = Metrics::new();
    if model.imported() {
        // All the validation rows, a batch at a time, as a scan sends them.
        let mut outputs = Vec::new();
        for batch in (0..rows.len()).collect::<Vec<_>>().chunks(BATCH_ROWS) {
            outputs.extend(score(&valid.iter().map(|c| c.take(batch)).collect::<Vec<_>>())?);
        }
        metrics = validation_metrics(plan.task, plan.class_labels.len(), &outputs, &targets);
        // Undefined on these rows (AUC of one class, R² of one value): left
        // out, as JSON has no NaN.
        metrics.retain(|_, v| v.is_finite());
    }
    let importance = on_sample(plan, networks, &valid, &targets, &mut score)?;
    if let Some(column) = importance.as_ref().and_then(Importance::unbounded) {
        return Err(MeasureError::Unbounded(column.to_owned()));
    }
    Ok((importance, metrics))
}

/// The metric importance is measured by, as the leaderboard ranks: AUC,
/// accuracy, RMSE; and whether higher is better.
fn metric(task: Task) -> (&'static str, bool) {
    match task {
        Task::Binary => (AUC, true),
        Task::Multiclass => (ACCURACY, true),
        Task::Regression => (RMSE, false),
    }
}

/// The importance of each of `names` (the columns of `valid`, the rows
/// scored, whose targets are `targets`), scoring with `score`, which gives
/// the outputs of rows as [`validation_metrics`] reads them. None when the
/// metric is not defined on these rows (one class only).
pub fn permutation<E>(
    task: Task,
    classes: usize,
    names: &[String],
    valid: &[ColumnData],
    targets: &[f64],
    seed: u64,
    score: &mut Scorer<'_, E>,
) -> Result<Option<Importance>, E> {
    let (metric, higher_is_better) = metric(task);
    let measure = |outputs: &[f32]| validation_metrics(task, classes, outputs, targets)[metric];
    let baseline = measure(&score(valid)?);
    if !baseline.is_finite() {
        return Ok(None);
    }
    let n = targets.len();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // Every (column, shuffle) is a block of n rows; blocks are scored
    // together, up to BATCH_ROWS rows a call, as a scorer runs large
    // batches faster than many small ones.
    let blocks: Vec<(usize, Vec<usize>)> = (0..names.len())
        .flat_map(|j| std::iter::repeat_n(j, REPEATS as usize))
        .map(|j| {
            let mut order: Vec<usize> = (0..n).collect();
            order.shuffle(&mut rng);
            (j, order)
        })
        .collect();
    let per_call = (BATCH_ROWS / n.max(1)).max(1);
    let mut sums = vec![0.0; names.len()];
    for group in blocks.chunks(per_call) {
        let batch: Vec<ColumnData> = valid
            .iter()
            .enumerate()
            .map(|(c, column)| {
                let rows: Vec<usize> = group
                    .iter()
                    .flat_map(|(j, order)| if *j == c { order.clone() } else { (0..n).collect() })
                    .collect();
                column.take(&rows)
            })
            .collect();
        let outputs = score(&batch)?;
        let width = outputs.len() / (group.len() * n).max(1);
        for ((j, _), block) in group.iter().zip(outputs.chunks((n * width).max(1))) {
            let shuffled = measure(block);
            sums[*j] += if higher_is_better { baseline - shuffled } else { shuffled - baseline };
        }
    }
    let drops = names.iter().cloned().zip(sums.into_iter().map(|s| s / REPEATS as f64)).collect();
    Ok(Some(Importance::from_drops(metric, baseline, n, REPEATS, drops)))
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;

    #[test]
    fn only_the_columns_the_scorer_reads_matter() {
        check_importance(400, 1);
        // 9 shuffles of 12,000 rows: two a call.
        check_importance(12_000, 5);
    }

    /// y = 1 when 8a + b > 0, as the scorer knows; it never reads c.
    fn check_importance(n: usize, calls_for_shuffles: usize) {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let a: Vec<Option<f64>> = (0..n).map(|_| Some(rand::Rng::random_range(&mut rng, -1.0..1.0))).collect();
        let b: Vec<Option<f64>> = (0..n).map(|_| Some(rand::Rng::random_range(&mut rng, -1.0..1.0))).collect();
        let c: Vec<Option<String>> = (0..n).map(|i| Some(format!("c{}", i % 3))).collect();
        let targets: Vec<f64> =
            a.iter().zip(&b).map(|(a, b)| (8.0 * a.unwrap() + b.unwrap() > 0.0) as u8 as f64).collect();
        let valid = vec![ColumnData::Float64(a), ColumnData::Float64(b), ColumnData::Text(c)];
        let names: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let calls = std::cell::Cell::new(0);
        let mut score = |cols: &[ColumnData]| -> Result<Vec<f32>, Infallible> {
            calls.set(calls.get() + 1);
            let (ColumnData::Float64(a), ColumnData::Float64(b)) = (&cols[0], &cols[1]) else { unreachable!() };
            Ok(a.iter().zip(b).map(|(a, b)| 1.0 / (1.0 + (-(8.0 * a.unwrap() + b.unwrap())).exp()) as f32).collect())
        };
        let imp = permutation(Task::Binary, 2, &names, &valid, &targets, 7, &mut score).unwrap().unwrap();
        assert_eq!(calls.get(), 1 + calls_for_shuffles);
        assert_eq!(imp.top(3), ["a", "b", "c"]);
        assert_eq!((imp.metric.as_str(), imp.rows, imp.repeats), ("auc", n, REPEATS));
        assert!(imp.baseline > 0.95, "{imp:?}");
        assert!(imp.columns[0].drop > 0.3 && imp.columns[0].importance > 0.9, "{imp:?}");
        assert_eq!((imp.columns[2].drop, imp.columns[2].importance), (0.0, 0.0), "c is never read");
        // The same seed, the same measurement.
        let again = permutation(Task::Binary, 2, &names, &valid, &targets, 7, &mut score).unwrap().unwrap();
        assert_eq!(again, imp);
    }

    #[test]
    fn many_columns_score_fewer_rows() {
        assert_eq!(sample(300, 10, 1, 1), (0..300).collect::<Vec<_>>(), "few rows: all of them");
        assert_eq!(sample(20_000, 5, 1, 1).len(), MAX_ROWS);
        let wide = sample(20_000, 25, 1, 1);
        assert_eq!(wide.len(), 100_000 / (25 * 3));
        assert!(wide.windows(2).all(|w| w[0] < w[1]) && wide[wide.len() - 1] > wide.len(), "a sorted sample");
        assert_eq!(sample(20_000, 1000, 1, 1).len(), MIN_ROWS);
        assert_eq!(sample(20_000, 25, 1, 1), wide, "seeded");
        assert_eq!(sample(20_000, 10, 4, 1).len(), 100_000 / (10 * 3 * 4), "an ensemble of 4 networks");
    }
}
