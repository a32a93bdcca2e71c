//! A version's global importance: how much its validation metric drops when
//! one source column's values are shuffled among the validation rows
//! (permutation importance), as `cerebro.model_versions.importance` keeps
//! it and `cerebro.model_importance` indexes it.

use serde::{Deserialize, Serialize};

/// Each source column's importance to one version, most important first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Importance {
    /// The metric whose drop is measured: `auc` (binary), `accuracy`
    /// (multiclass) or `rmse` (regression, where a drop is a rise).
    pub metric: String,
    /// The metric on the rows scored, none shuffled.
    pub baseline: f64,
    /// How many validation rows were scored.
    pub rows: usize,
    /// How many times each column was shuffled; `drop` is their mean.
    pub repeats: u32,
    pub columns: Vec<ColumnImportance>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColumnImportance {
    pub column: String,
    /// The column's share of the positive drops, from 0 to 1: the shares
    /// sum to 1, or are all 0 when no shuffle made the metric worse.
    pub importance: f64,
    /// How much worse the metric got with the column shuffled, in the
    /// metric's units; below 0 when shuffling it happened to help.
    pub drop: f64,
}

impl Importance {
    /// Ranks `drops` (each column with its mean drop) from the largest
    /// drop down, ties by name, and gives each its share.
    pub fn from_drops(metric: &str, baseline: f64, rows: usize, repeats: u32, drops: Vec<(String, f64)>) -> Importance {
        let positive: f64 = drops.iter().map(|(_, d)| d.max(0.0)).sum();
        let mut columns: Vec<ColumnImportance> = drops
            .into_iter()
            .map(|(column, drop)| ColumnImportance {
                column,
                importance: if positive > 0.0 { drop.max(0.0) / positive } else { 0.0 },
                drop,
            })
            .collect();
        columns.sort_by(|a, b| b.drop.total_cmp(&a.drop).then_with(|| a.column.cmp(&b.column)));
        Importance { metric: metric.to_string(), baseline, rows, repeats, columns }
    }

    /// The first column whose drop is not a number (NaN, infinite): the
    /// scores went non-finite with it shuffled, as a regression graph's may
    /// (a square root of a difference its rows keep positive). Such an
    /// importance cannot be stored or normalised.
    pub fn unbounded(&self) -> Option<&str> {
        self.columns.iter().find(|c| !c.drop.is_finite()).map(|c| c.column.as_str())
    }

    /// The `n` most important columns' names.
    pub fn top(&self, n: usize) -> Vec<&str> {
        self.columns.iter().take(n).map(|c| c.column.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_come_from_positive_drops_and_rank_by_drop() {
        let drops = vec![("b".into(), 0.25), ("a".into(), 0.5), ("c".into(), -0.002), ("d".into(), 0.25)];
        let imp = Importance::from_drops("auc", 0.84, 1409, 3, drops);
        assert_eq!(imp.top(4), ["a", "b", "d", "c"], "by drop, ties by name");
        let shares: Vec<f64> = imp.columns.iter().map(|c| c.importance).collect();
        assert_eq!(shares, [0.5, 0.25, 0.25, 0.0]);
        assert_eq!(imp.unbounded(), None);
        let broken = Importance::from_drops("rmse", 1.5, 10, 3, vec![("a".into(), 0.5), ("b".into(), f64::NAN)]);
        assert_eq!(broken.unbounded(), Some("b"));
        assert_eq!(imp.columns[3].drop, -0.002, "a negative drop is kept as measured");

        let none = Importance::from_drops("rmse", 1.5, 10, 3, vec![("x".into(), 0.0), ("y".into(), -0.1)]);
        assert!(none.columns.iter().all(|c| c.importance == 0.0));
    }

    #[test]
    fn it_is_stored_as_the_catalog_reads_it() {
        let imp = Importance::from_drops("accuracy", 0.9, 100, 3, vec![("tenure".into(), 0.05)]);
        let json = serde_json::to_value(&imp).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"metric": "accuracy", "baseline": 0.9, "rows": 100, "repeats": 3,
                               "columns": [{"column": "tenure", "importance": 1.0, "drop": 0.05}]})
        );
        assert_eq!(serde_json::from_value::<Importance>(json).unwrap(), imp);
    }
}
