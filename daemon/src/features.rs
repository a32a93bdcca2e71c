//! The feature pipeline: raw column values to the network's input vector.
//!
//! Fitted on the training rows only. The same arithmetic (in f32) is written
//! into every exported ONNX graph, so the artifact scores raw column values
//! exactly as the engine saw them.

use std::collections::HashMap;

use cerebro_shared::batch::ColumnData;
use cerebro_shared::spec::{Feature, FeatureKind, NULL_CATEGORY};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Encoder {
    /// `(x - mean) / std`; NULL (or NaN) becomes 0, the mean. When the training
    /// rows had NULLs, one more input says "this was NULL".
    Numeric { mean: f32, std: f32, null_indicator: bool },
    /// One-hot over `vocabulary` (NULL is the entry [`NULL_CATEGORY`] when it
    /// was seen); a value not in the vocabulary is all zeros.
    Categorical { vocabulary: Vec<String> },
}

impl Encoder {
    pub fn width(&self) -> usize {
        match self {
            Encoder::Numeric { null_indicator, .. } => 1 + *null_indicator as usize,
            Encoder::Categorical { vocabulary } => vocabulary.len(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FittedFeature {
    pub name: String,
    pub encoder: Encoder,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeaturePipeline {
    pub features: Vec<FittedFeature>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FeatureError {
    #[error("feature \"{name}\" is {expected:?} but its column holds {found}")]
    KindMismatch { name: String, expected: FeatureKind, found: &'static str },
    #[error("{given} columns given for {expected} features")]
    ColumnCount { given: usize, expected: usize },
    #[error("columns have different row counts")]
    RaggedColumns,
}

fn numeric_value(v: Option<f64>) -> Option<f32> {
    v.filter(|x| !x.is_nan()).map(|x| x as f32)
}

impl FeaturePipeline {
    /// Fits encoders for `features` on the given `rows` of `columns`.
    pub fn fit(
        features: &[Feature],
        columns: &[ColumnData],
        rows: &[usize],
        max_categories: usize,
    ) -> Result<FeaturePipeline, FeatureError> {
        check_columns(features.len(), columns)?;
        let mut fitted = Vec::with_capacity(features.len());
        for (feature, column) in features.iter().zip(columns) {
            let encoder = match (feature.kind, column) {
                (FeatureKind::Numeric, ColumnData::Float64(values)) => {
                    let (mut sum, mut count, mut nulls) = (0.0f64, 0usize, 0usize);
                    for &r in rows {
                        match numeric_value(values[r]) {
                            Some(x) => {
                                sum += x as f64;
                                count += 1;
                            }
                            None => nulls += 1,
                        }
                    }
                    let mean = if count > 0 { sum / count as f64 } else { 0.0 };
                    let var = rows
                        .iter()
                        .filter_map(|&r| numeric_value(values[r]))
                        .map(|x| (x as f64 - mean).powi(2))
                        .sum::<f64>()
                        / count.max(1) as f64;
                    let std = var.sqrt();
                    // A constant column carries no signal; keep it finite and harmless.
                    let std = if std > 1e-12 { std } else { 1.0 };
                    Encoder::Numeric { mean: mean as f32, std: std as f32, null_indicator: nulls > 0 }
                }
                (FeatureKind::Categorical, ColumnData::Text(values)) => {
                    let mut counts: HashMap<&str, usize> = HashMap::new();
                    for &r in rows {
                        *counts.entry(values[r].as_deref().unwrap_or(NULL_CATEGORY)).or_default() += 1;
                    }
                    let mut by_freq: Vec<(&str, usize)> = counts.into_iter().collect();
                    by_freq.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
                    by_freq.truncate(max_categories);
                    let mut vocabulary: Vec<String> = by_freq.into_iter().map(|(v, _)| v.to_owned()).collect();
                    vocabulary.sort();
                    Encoder::Categorical { vocabulary }
                }
                (expected, found) => {
                    return Err(FeatureError::KindMismatch {
                        name: feature.name.clone(),
                        expected,
                        found: found.kind_name(),
                    });
                }
            };
            fitted.push(FittedFeature { name: feature.name.clone(), encoder });
        }
        Ok(FeaturePipeline { features: fitted })
    }

    /// Width of the encoded input vector.
    pub fn width(&self) -> usize {
        self.features.iter().map(|f| f.encoder.width()).sum()
    }

    /// Encodes every row of `columns` into a row-major n × width matrix.
    pub fn transform(&self, columns: &[ColumnData]) -> Result<Vec<f32>, FeatureError> {
        let n = check_columns(self.features.len(), columns)?;
        let width = self.width();
        let mut out = vec![0.0f32; n * width];
        let mut offset = 0;
        for (feature, column) in self.features.iter().zip(columns) {
            match (&feature.encoder, column) {
                (Encoder::Numeric { mean, std, null_indicator }, ColumnData::Float64(values)) => {
                    for (r, v) in values.iter().enumerate() {
                        let row = &mut out[r * width + offset..];
                        match numeric_value(*v) {
                            Some(x) => row[0] = (x - mean) / std,
                            None if *null_indicator => row[1] = 1.0,
                            None => {}
                        }
                    }
                }
                (Encoder::Categorical { vocabulary }, ColumnData::Text(values)) => {
                    let index: HashMap<&str, usize> =
                        vocabulary.iter().enumerate().map(|(i, v)| (v.as_str(), i)).collect();
                    for (r, v) in values.iter().enumerate() {
                        if let Some(&i) = index.get(v.as_deref().unwrap_or(NULL_CATEGORY)) {
                            out[r * width + offset + i] = 1.0;
                        }
                    }
                }
                (encoder, found) => {
                    let expected = match encoder {
                        Encoder::Numeric { .. } => FeatureKind::Numeric,
                        Encoder::Categorical { .. } => FeatureKind::Categorical,
                    };
                    return Err(FeatureError::KindMismatch {
                        name: feature.name.clone(),
                        expected,
                        found: found.kind_name(),
                    });
                }
            }
            offset += feature.encoder.width();
        }
        Ok(out)
    }
}

fn check_columns(expected: usize, columns: &[ColumnData]) -> Result<usize, FeatureError> {
    if columns.len() != expected {
        return Err(FeatureError::ColumnCount { given: columns.len(), expected });
    }
    let n = columns.first().map_or(0, |c| c.len());
    if columns.iter().any(|c| c.len() != n) {
        return Err(FeatureError::RaggedColumns);
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features() -> Vec<Feature> {
        vec![
            Feature { name: "tenure".into(), kind: FeatureKind::Numeric },
            Feature { name: "contract".into(), kind: FeatureKind::Categorical },
        ]
    }

    fn columns() -> Vec<ColumnData> {
        vec![
            ColumnData::Float64(vec![Some(1.0), Some(3.0), None, Some(f64::NAN)]),
            ColumnData::Text(vec![Some("a".into()), Some("b".into()), None, Some("a".into())]),
        ]
    }

    #[test]
    fn fits_on_training_rows_and_encodes_nulls_and_unseen_values() {
        let p = FeaturePipeline::fit(&features(), &columns(), &[0, 1, 2], 100).unwrap();
        assert_eq!(p.features[0].encoder, Encoder::Numeric { mean: 2.0, std: 1.0, null_indicator: true });
        assert_eq!(
            p.features[1].encoder,
            Encoder::Categorical { vocabulary: vec![NULL_CATEGORY.into(), "a".into(), "b".into()] }
        );
        assert_eq!(p.width(), 5);

        let scoring =
            vec![ColumnData::Float64(vec![Some(4.0), None]), ColumnData::Text(vec![Some("never seen".into()), None])];
        let x = p.transform(&scoring).unwrap();
        assert_eq!(x, vec![2.0, 0.0, 0.0, 0.0, 0.0, /* row 2 */ 0.0, 1.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn rare_categories_beyond_the_cap_are_dropped() {
        let cols = vec![ColumnData::Text(vec![Some("x".into()), Some("x".into()), Some("y".into())])];
        let f = vec![Feature { name: "c".into(), kind: FeatureKind::Categorical }];
        let p = FeaturePipeline::fit(&f, &cols, &[0, 1, 2], 1).unwrap();
        assert_eq!(p.features[0].encoder, Encoder::Categorical { vocabulary: vec!["x".into()] });
    }

    #[test]
    fn mismatched_columns_are_errors() {
        let cols = vec![ColumnData::Text(vec![]), ColumnData::Text(vec![])];
        assert!(matches!(FeaturePipeline::fit(&features(), &cols, &[], 10), Err(FeatureError::KindMismatch { .. })));
        assert_eq!(
            FeaturePipeline::fit(&features(), &cols[..1], &[], 10),
            Err(FeatureError::ColumnCount { given: 1, expected: 2 })
        );
    }
}
