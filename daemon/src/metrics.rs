//! Validation metrics, by task.

use std::collections::BTreeMap;

use cerebro_shared::sql::metrics::{ACCURACY, AUC, LOG_LOSS, MACRO_F1, MAE, R2, RMSE};

/// Metric name ([`cerebro_shared::sql::metrics`]) to value; serialised into
/// `cerebro.model_versions.metrics`.
pub type Metrics = BTreeMap<String, f64>;

/// Area under the ROC curve from scores and 0/1 labels, with tied scores
/// given their average rank. NaN when one class is absent.
pub fn auc(scores: &[f32], labels: &[bool]) -> f64 {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let (mut rank_sum, mut pos) = (0.0f64, 0usize);
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            if labels[k] {
                rank_sum += avg_rank;
                pos += 1;
            }
        }
        i = j + 1;
    }
    let neg = scores.len() - pos;
    if pos == 0 || neg == 0 {
        return f64::NAN;
    }
    (rank_sum - (pos * (pos + 1)) as f64 / 2.0) / (pos as f64 * neg as f64)
}

/// AUC, accuracy at 0.5 and log-loss from positive-class probabilities.
pub fn binary(probs: &[f32], labels: &[bool]) -> Metrics {
    let n = probs.len().max(1) as f64;
    let correct = probs.iter().zip(labels).filter(|(p, y)| (**p >= 0.5) == **y).count();
    let log_loss = probs
        .iter()
        .zip(labels)
        .map(|(p, y)| {
            let p = (*p as f64).clamp(1e-15, 1.0 - 1e-15);
            if *y {
                -p.ln()
            } else {
                -(1.0 - p).ln()
            }
        })
        .sum::<f64>()
        / n;
    Metrics::from([
        (AUC.into(), auc(probs, labels)),
        (ACCURACY.into(), correct as f64 / n),
        (LOG_LOSS.into(), log_loss),
    ])
}

/// Accuracy, macro-F1 (over classes that occur in truth or prediction) and
/// log-loss from row-major class probabilities.
pub fn multiclass(probs: &[f32], classes: usize, labels: &[usize]) -> Metrics {
    let n = labels.len().max(1) as f64;
    let predicted: Vec<usize> = probs
        .chunks_exact(classes)
        .map(|row| row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i))
        .collect();
    let correct = predicted.iter().zip(labels).filter(|(p, y)| p == y).count();
    let (mut tp, mut fp, mut fneg) = (vec![0usize; classes], vec![0usize; classes], vec![0usize; classes]);
    for (&p, &y) in predicted.iter().zip(labels) {
        if p == y {
            tp[p] += 1;
        } else {
            fp[p] += 1;
            fneg[y] += 1;
        }
    }
    let f1s: Vec<f64> = (0..classes)
        .filter(|&c| tp[c] + fp[c] + fneg[c] > 0)
        .map(|c| 2.0 * tp[c] as f64 / (2 * tp[c] + fp[c] + fneg[c]) as f64)
        .collect();
    let macro_f1 = f1s.iter().sum::<f64>() / f1s.len().max(1) as f64;
    let log_loss =
        probs.chunks_exact(classes).zip(labels).map(|(row, &y)| -(row[y] as f64).clamp(1e-15, 1.0).ln()).sum::<f64>()
            / n;
    Metrics::from([(ACCURACY.into(), correct as f64 / n), (MACRO_F1.into(), macro_f1), (LOG_LOSS.into(), log_loss)])
}

/// RMSE, MAE and R² in the target's own units.
pub fn regression(predicted: &[f64], actual: &[f64]) -> Metrics {
    let n = actual.len().max(1) as f64;
    let mean = actual.iter().sum::<f64>() / n;
    let sse: f64 = predicted.iter().zip(actual).map(|(p, y)| (p - y).powi(2)).sum();
    let sst: f64 = actual.iter().map(|y| (y - mean).powi(2)).sum();
    let mae = predicted.iter().zip(actual).map(|(p, y)| (p - y).abs()).sum::<f64>() / n;
    Metrics::from([
        (RMSE.into(), (sse / n).sqrt()),
        (MAE.into(), mae),
        (R2.into(), if sst > 0.0 { 1.0 - sse / sst } else { f64::NAN }),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_counts_ordered_pairs_and_halves_ties() {
        assert_eq!(auc(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]), 0.75);
        assert_eq!(auc(&[0.5, 0.5], &[false, true]), 0.5);
        assert_eq!(auc(&[0.9, 0.1], &[true, false]), 1.0);
        assert!(auc(&[0.3], &[true]).is_nan());
    }

    #[test]
    fn binary_metrics() {
        let m = binary(&[0.9, 0.2, 0.6, 0.4], &[true, false, false, true]);
        assert_eq!(m[ACCURACY], 0.5);
        assert_eq!(m[AUC], 0.75);
        assert!(m[LOG_LOSS] > 0.0);
    }

    #[test]
    fn multiclass_metrics() {
        let probs = [0.8, 0.1, 0.1, 0.1, 0.8, 0.1, 0.1, 0.8, 0.1];
        let m = multiclass(&probs, 3, &[0, 1, 2]);
        assert!((m[ACCURACY] - 2.0 / 3.0).abs() < 1e-12);
        // class 0: f1 1; class 1: tp1 fp1 -> 2/3; class 2: fn1 -> 0
        assert!((m[MACRO_F1] - (1.0 + 2.0 / 3.0) / 3.0).abs() < 1e-12);
    }

    #[test]
    fn regression_metrics() {
        let m = regression(&[1.0, 2.0, 3.0], &[1.0, 2.0, 5.0]);
        assert!((m[RMSE] - (4.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert!((m[MAE] - 2.0 / 3.0).abs() < 1e-12);
        assert!((m[R2] - (1.0 - 4.0 / (78.0 / 9.0))).abs() < 1e-12);
    }
}
