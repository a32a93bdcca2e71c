//! A task's meta-features (issue 17, "recommendations"): what its rows
//! look like to a model, measured when its snapshot is frozen and kept in
//! the archive (`cerebro.snapshots.meta`), and how far two tasks are apart,
//! so that a new task can start from what won on the archived tasks
//! nearest it (`cerebro.recommend`).

use serde::{Deserialize, Serialize};

use crate::spec::Task;

/// What a task's rows look like: their size and shape, their features'
/// kinds, gaps and cardinalities, and their target's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetaFeatures {
    /// The column learnt, and how.
    pub target: String,
    pub task: Task,
    /// Rows with a target.
    pub rows: u64,
    pub numeric: u32,
    pub categorical: u32,
    /// The share of the feature values that are NULL.
    pub null_share: f64,
    /// The categorical features' mean number of distinct values (0 without any).
    pub mean_cardinality: f64,
    /// Classification: how many classes, and the rarest one's share of the rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minority_share: Option<f64>,
    /// Regression: the target's skewness (third standardised moment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_skew: Option<f64>,
}

impl MetaFeatures {
    /// The point a task is in the space [`distance`] measures: each
    /// coordinate scaled so that a unit is a large difference between two
    /// tasks (ten times the rows, every feature numeric instead of none,
    /// ...), so that none dominates the others by its units.
    fn point(&self) -> [f64; 7] {
        let features = (self.numeric + self.categorical).max(1) as f64;
        let balance = match (self.classes, self.minority_share) {
            // The rarest class against an even share: 1 even, 0 absent.
            (Some(k), Some(m)) if k > 0 => (m * k as f64).clamp(0.0, 1.0),
            _ => 1.0,
        };
        [
            (self.rows.max(1) as f64).log10(),
            features.log10(),
            self.numeric as f64 / features,
            2.0 * self.null_share,
            (1.0 + self.mean_cardinality).log10(),
            2.0 * balance,
            self.target_skew.unwrap_or(0.0).clamp(-5.0, 5.0) / 2.5,
        ]
    }
}

/// How far apart two tasks are, for a task of `a`'s kind to start from what
/// won on `b`: None when they are not the same kind (a regression cannot
/// reuse a classifier's triple, nor a binary task a multiclass one's).
pub fn distance(a: &MetaFeatures, b: &MetaFeatures) -> Option<f64> {
    if a.task != b.task {
        return None;
    }
    let (p, q) = (a.point(), b.point());
    Some(p.iter().zip(&q).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt())
}

/// A ready version of an archived task, as a recommendation may name it.
#[derive(Debug, Clone, PartialEq)]
pub struct Archived {
    pub model: String,
    pub version: i32,
    /// The snapshot it trained on, and that snapshot's meta-features.
    pub snapshot: i64,
    pub meta: MetaFeatures,
    /// Its validation value of its task's metric ([`metric_for`]).
    pub value: Option<f64>,
    /// What to train with: its features and options.
    pub features: Vec<String>,
    pub options: serde_json::Value,
}

/// One task of the portfolio the extension ships: the best single
/// candidate of Cerebro's accuracy benchmark on it (docs/benchmarks.md),
/// with its task's meta-features. `deploy/portfolio.sh` regenerates
/// `shared/data/portfolio.json`.
#[derive(Debug, Clone, Deserialize)]
struct PortfolioEntry {
    task: String,
    value: f64,
    meta: MetaFeatures,
    options: serde_json::Value,
}

/// The portfolio's tasks as archived versions a recommendation may name:
/// model `(built in) <task>`, version 0, snapshots numbered below 0.
pub fn portfolio() -> Vec<Archived> {
    let entries: Vec<PortfolioEntry> =
        serde_json::from_str(include_str!("../data/portfolio.json")).expect("the shipped portfolio reads");
    entries
        .into_iter()
        .enumerate()
        .map(|(i, e)| Archived {
            model: format!("{BUILT_IN} {}", e.task),
            version: 0,
            snapshot: -(i as i64) - 1,
            meta: e.meta,
            value: Some(e.value),
            features: Vec::new(),
            options: e.options,
        })
        .collect()
}

/// How a portfolio task's model is named.
pub const BUILT_IN: &str = "(built in)";

/// An archived version recommended for a task, and how far its task is.
#[derive(Debug, Clone, PartialEq)]
pub struct Recommendation {
    pub from: Archived,
    pub distance: f64,
}

/// The validation metric versions of a task are compared by, and whether
/// higher is better.
pub fn metric_for(task: Task) -> (&'static str, bool) {
    use crate::sql::metrics::{ACCURACY, AUC, RMSE};
    match task {
        Task::Binary => (AUC, true),
        Task::Multiclass => (ACCURACY, true),
        Task::Regression => (RMSE, false),
    }
}

/// The best version of each archived task of `task`'s kind (by its
/// validation metric), the nearest tasks first, at most `k`: what a task
/// like `task` may start from. Versions without the metric are left out.
pub fn recommend(task: &MetaFeatures, archived: Vec<Archived>, k: usize) -> Vec<Recommendation> {
    let (_, higher) = metric_for(task.task);
    let better = |a: f64, b: f64| if higher { a > b } else { a < b };
    let mut best: Vec<Recommendation> = Vec::new();
    for version in archived {
        let (Some(distance), Some(value)) = (distance(task, &version.meta), version.value) else { continue };
        match best.iter_mut().find(|r| r.from.snapshot == version.snapshot) {
            Some(kept) if better(value, kept.from.value.unwrap_or(f64::NAN)) => kept.from = version,
            Some(_) => {}
            None => best.push(Recommendation { from: version, distance }),
        }
    }
    best.sort_by(|a, b| {
        let (va, vb) = (a.from.value.unwrap_or(f64::NAN), b.from.value.unwrap_or(f64::NAN));
        let by_value = if higher { vb.total_cmp(&va) } else { va.total_cmp(&vb) };
        a.distance.total_cmp(&b.distance).then(by_value).then(a.from.version.cmp(&b.from.version))
    });
    best.truncate(k);
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn churn() -> MetaFeatures {
        MetaFeatures {
            target: "churn".into(),
            task: Task::Binary,
            rows: 7043,
            numeric: 4,
            categorical: 15,
            null_share: 0.001,
            mean_cardinality: 2.9,
            classes: Some(2),
            minority_share: Some(0.265),
            target_skew: None,
        }
    }

    #[test]
    fn a_task_is_nearest_itself_and_nearer_a_like_task_than_an_unlike_one() {
        let a = churn();
        assert_eq!(distance(&a, &a), Some(0.0));
        let like = MetaFeatures { rows: 9000, minority_share: Some(0.3), ..churn() };
        let unlike = MetaFeatures {
            rows: 300_000,
            numeric: 80,
            categorical: 0,
            mean_cardinality: 0.0,
            minority_share: Some(0.06),
            ..churn()
        };
        let (near, far) = (distance(&a, &like).unwrap(), distance(&a, &unlike).unwrap());
        assert!(near < 0.3 && far > 2.0 && near < far, "{near} {far}");
        assert_eq!(distance(&a, &like), distance(&like, &a), "symmetric");
    }

    #[test]
    fn tasks_of_another_kind_are_not_compared() {
        let regression = MetaFeatures {
            task: Task::Regression,
            classes: None,
            minority_share: None,
            target_skew: Some(1.8),
            ..churn()
        };
        assert_eq!(distance(&churn(), &regression), None);
        let multiclass = MetaFeatures { task: Task::Multiclass, classes: Some(4), ..churn() };
        assert_eq!(distance(&churn(), &multiclass), None);
    }

    #[test]
    fn meta_features_read_back_as_stored() {
        let json = serde_json::to_value(churn()).unwrap();
        assert!(json.get("target_skew").is_none(), "absent facts are left out: {json}");
        assert_eq!(serde_json::from_value::<MetaFeatures>(json).unwrap(), churn());
    }

    fn archived(model: &str, version: i32, snapshot: i64, meta: MetaFeatures, auc: f64) -> Archived {
        Archived {
            model: model.into(),
            version,
            snapshot,
            meta,
            value: Some(auc),
            features: vec![],
            options: serde_json::json!({"hidden": [version]}),
        }
    }

    #[test]
    fn recommendations_are_each_near_tasks_best_version_nearest_first() {
        let near = MetaFeatures { rows: 9000, ..churn() };
        let far = MetaFeatures { rows: 900_000, numeric: 19, categorical: 0, ..churn() };
        let regression = MetaFeatures {
            task: Task::Regression,
            classes: None,
            minority_share: None,
            target_skew: Some(2.0),
            ..churn()
        };
        let found = recommend(
            &churn(),
            vec![
                archived("far", 1, 30, far.clone(), 0.99),
                archived("near", 1, 10, near.clone(), 0.80),
                archived("near", 2, 10, near.clone(), 0.85),
                archived("near", 3, 10, near.clone(), 0.83),
                archived("prices", 1, 40, regression, 0.1),
                Archived { value: None, ..archived("unmeasured", 1, 50, near.clone(), 0.0) },
            ],
            5,
        );
        let named: Vec<(&str, i32)> = found.iter().map(|r| (r.from.model.as_str(), r.from.version)).collect();
        assert_eq!(named, [("near", 2), ("far", 1)], "one per task, its best, nearest first; no other kind");
        assert!(found[0].distance < found[1].distance);
        assert_eq!(recommend(&churn(), vec![archived("near", 2, 10, near, 0.85)], 0), vec![]);
        // For a regression, the lowest RMSE is the best.
        let prices = MetaFeatures { task: Task::Regression, classes: None, minority_share: None, ..churn() };
        let found = recommend(
            &prices,
            vec![archived("p", 1, 1, prices.clone(), 0.3), archived("p", 2, 1, prices.clone(), 0.2)],
            3,
        );
        assert_eq!(found.iter().map(|r| r.from.version).collect::<Vec<_>>(), [2]);
    }

    #[test]
    fn the_shipped_portfolio_reads_and_covers_every_kind_of_task() {
        let tasks = portfolio();
        for kind in [Task::Binary, Task::Multiclass, Task::Regression] {
            assert!(tasks.iter().any(|t| t.meta.task == kind), "{kind:?}");
        }
        for t in &tasks {
            assert!(t.model.starts_with(BUILT_IN) && t.version == 0 && t.snapshot < 0, "{t:?}");
            assert!(t.options["hidden"].is_array(), "{t:?}");
            assert_eq!(distance(&t.meta, &t.meta), Some(0.0));
        }
    }
}
