//! A version's rule surrogate (docs/sql.md, "Rule surrogates"): a shallow
//! decision tree fitted to what the version predicts on its training rows
//! ([`cerebro_shared::surrogate`]), its fidelity measured on the validation
//! rows. The scorer is the caller's: the engine for a model Cerebro
//! trained, ONNX Runtime for an ensemble, either for a version distilled
//! on request (`cerebro.distill`, [`distill_scored`]).

use cerebro_shared::batch::ColumnData;
use cerebro_shared::spec::{Task, TrainingPlan};
use cerebro_shared::surrogate::{Growth, Predicted, Surrogate};

use crate::importance::{seeded_sample, Scorer};
use crate::scoring::{RunDeadline, ScoringError, ScoringModel};
use crate::train::{self, TrainError};

#[derive(Debug, thiserror::Error)]
pub enum DistillError {
    #[error("{0}")]
    Rows(#[from] TrainError),
    #[error("{0}")]
    Scoring(#[from] ScoringError),
}

/// Training rows the tree is fitted on: a seeded sample of this many when
/// there are more.
pub const FIT_ROWS: usize = 20_000;

/// Validation rows the fidelity is measured on: a seeded sample of this
/// many when there are more.
pub const CHECK_ROWS: usize = 5_000;

/// The share of the fitted rows a leaf holds at least (and 5 rows).
const MIN_LEAF_SHARE: f64 = 0.01;

/// Fits the surrogate of a version of `task` (classes `labels`) whose
/// outputs `score` gives, `max_depth` levels deep, on `fit_rows` of
/// `features` (named `names`), and measures it on `check_rows`.
#[allow(clippy::too_many_arguments)]
pub fn distill<E>(
    task: Task,
    labels: &[String],
    names: &[String],
    features: &[ColumnData],
    fit_rows: &[usize],
    check_rows: &[usize],
    seed: u64,
    max_depth: u32,
    score: &mut Scorer<'_, E>,
) -> Result<Surrogate, E> {
    let fit = seeded_sample(fit_rows, FIT_ROWS, seed);
    let check = seeded_sample(check_rows, CHECK_ROWS, seed);
    let rows: Vec<usize> = fit.iter().chain(&check).copied().collect();
    let scored: Vec<ColumnData> = features.iter().map(|c| c.take(&rows)).collect();
    let outputs = score(&scored)?;
    let predicted = match task {
        Task::Binary => Predicted::Classes {
            labels: labels.to_vec(),
            class: outputs.iter().map(|&p| (p >= 0.5) as usize).collect(),
        },
        Task::Multiclass => Predicted::Classes {
            labels: labels.to_vec(),
            class: outputs
                .chunks(labels.len().max(1))
                .map(|p| (0..p.len()).fold(0, |best, k| if p[k] > p[best] { k } else { best }))
                .collect(),
        },
        Task::Regression => Predicted::Values(outputs.iter().map(|&v| v as f64).collect()),
    };
    let fitted: Vec<usize> = (0..fit.len()).collect();
    let checked: Vec<usize> = (fit.len()..rows.len()).collect();
    let min_leaf = ((fit.len() as f64 * MIN_LEAF_SHARE) as usize).max(5);
    let growth = Growth { max_depth, min_leaf };
    Ok(Surrogate::distill(names, &scored, &predicted, &fitted, &checked, growth))
}

/// The surrogate, `max_depth` levels deep, of the version `model` scores,
/// fitted on `plan`'s training rows of `features` (in `plan`'s order, as
/// its snapshot is read) and measured on its validation rows. An imported
/// graph's runs stop once `deadline` has passed, when given.
pub fn distill_scored(
    model: &ScoringModel,
    plan: &TrainingPlan,
    features: &[ColumnData],
    target: &ColumnData,
    max_depth: u32,
    deadline: Option<RunDeadline>,
) -> Result<Surrogate, DistillError> {
    let (train, valid) = train::training_and_validation_rows(plan, target)?;
    let names: Vec<String> = plan.features.iter().map(|f| f.name.clone()).collect();
    distill(
        plan.task,
        &plan.class_labels,
        &names,
        features,
        &train,
        &valid,
        plan.options.seed,
        max_depth,
        &mut |columns| Ok(model.metric_outputs(plan, columns, deadline)?),
    )
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;

    #[test]
    fn a_surrogate_reads_the_versions_outputs() {
        // The "network" says yes when x > 0.3; its fitted rows are the even ones.
        let n = 1000;
        let x: Vec<Option<f64>> = (0..n).map(|i| Some(i as f64 / n as f64)).collect();
        let features = vec![ColumnData::Float64(x)];
        let even: Vec<usize> = (0..n).step_by(2).collect();
        let odd: Vec<usize> = (1..n).step_by(2).collect();
        let labels = vec!["no".to_string(), "yes".to_string()];
        let mut score = |cols: &[ColumnData]| -> Result<Vec<f32>, Infallible> {
            let ColumnData::Float64(x) = &cols[0] else { unreachable!() };
            Ok(x.iter().map(|v| if v.unwrap() > 0.3 { 0.9 } else { 0.2 }).collect())
        };
        let s = distill(Task::Binary, &labels, &["x".into()], &features, &even, &odd, 1, 4, &mut score).unwrap();
        assert_eq!((s.rows, s.fidelity_metric.as_str()), (500, "agreement"));
        assert!(s.fidelity > 0.99, "{s:?}");
        let rules = s.root.rules();
        assert_eq!(rules.len(), 2, "{rules:?}");
        assert_eq!((rules[0].prediction.as_str(), rules[1].prediction.as_str()), ("no", "yes"));
        assert!(rules[0].conditions[0].starts_with("x <= 0.3"), "{rules:?}");
    }
}
