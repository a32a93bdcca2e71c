//! The feature pipeline: raw column values to the network's input vector.
//!
//! Fitted on the training rows only. The same arithmetic (in f32) is written
//! into every exported ONNX graph, so the artifact scores raw column values
//! exactly as the engine saw them.

use std::collections::HashMap;

use cerebro_shared::batch::{ColumnData, ColumnRef};
use cerebro_shared::spec::{CategoricalEncoding, Feature, FeatureKind, NumericEncoding, TrainOptions, NULL_CATEGORY};
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
    /// Piecewise-linear encoding over the bins between consecutive `edges`
    /// (training quantiles): input t is `clamp((x - edges[t]) / (edges[t+1] - edges[t]), 0, 1)`.
    /// NULL is all zeros (plus the indicator).
    Ple { edges: Vec<f32>, null_indicator: bool },
    /// One input, the mean of the piecewise-linear inputs minus 0.5: the
    /// value's quantile, from -0.5 to 0.5. NULL is 0 (plus the indicator).
    Quantile { edges: Vec<f32>, null_indicator: bool },
    /// Robust scaling with smooth clipping (RealMLP-TD): `z = (x - median) / scale`,
    /// clamped to ±[`ROBUST_CLAMP`], then `z / sqrt(1 + (z/3)^2)`, which is
    /// close to `z` near the median and saturates towards ±3 for outliers.
    /// `scale` is the training rows' inter-quartile range `q75 - q25`, or
    /// `(max - min) / 2` where that is 0, or 1 for a constant column (see
    /// `robust_scale`). NULL is 0, the median (plus the indicator).
    Robust { median: f32, scale: f32, null_indicator: bool },
    /// A code into the network's embedding table for this column: the index
    /// in `vocabulary`, or `vocabulary.len()` (a zero vector) for values never seen.
    Embedding { vocabulary: Vec<String>, dim: usize },
    /// Encoded as [`Encoder::Numeric`], and the standardised value also
    /// feeds the network's periodic embedding of this column
    /// (`engine::Periodic`: learnt frequencies, then a linear layer and ReLU).
    Periodic { mean: f32, std: f32, null_indicator: bool },
}

impl Encoder {
    /// Inputs this column adds to the encoded feature vector (embeddings add
    /// none: they add a code).
    pub fn width(&self) -> usize {
        match self {
            Encoder::Numeric { null_indicator, .. }
            | Encoder::Quantile { null_indicator, .. }
            | Encoder::Robust { null_indicator, .. }
            | Encoder::Periodic { null_indicator, .. } => 1 + *null_indicator as usize,
            Encoder::Ple { edges, null_indicator } => edges.len() - 1 + *null_indicator as usize,
            Encoder::Categorical { vocabulary } => vocabulary.len(),
            Encoder::Embedding { .. } => 0,
        }
    }

    fn kind(&self) -> FeatureKind {
        match self {
            Encoder::Numeric { .. }
            | Encoder::Ple { .. }
            | Encoder::Quantile { .. }
            | Encoder::Robust { .. }
            | Encoder::Periodic { .. } => FeatureKind::Numeric,
            Encoder::Categorical { .. } | Encoder::Embedding { .. } => FeatureKind::Categorical,
        }
    }
}

/// The piecewise-linear inputs of `x` over `edges`, in f32 as the exported graph computes them.
pub fn ple_inputs(x: f32, edges: &[f32]) -> impl Iterator<Item = f32> + '_ {
    edges.windows(2).map(move |e| ((x - e[0]) / (e[1] - e[0])).clamp(0.0, 1.0))
}

/// Robust inputs are clamped to this many scales from the median before the
/// smooth clip, where it is 3 to f32 precision: beyond it `(z/3)^2` would
/// overflow f32 and the clip would fall back to 0.
pub const ROBUST_CLAMP: f32 = 1e6;

/// The robust encoding of `x` (finite) given the fitted `median` and
/// `scale`, in f32 as the exported graph computes it.
pub fn robust_input(x: f32, median: f32, scale: f32) -> f32 {
    let z = ((x - median) / scale).clamp(-ROBUST_CLAMP, ROBUST_CLAMP);
    let t = z / 3.0;
    z / (1.0 + t * t).sqrt()
}

/// The `p`-quantile of sorted `values` (not empty), interpolated linearly
/// between the two nearest ranks (numpy's default).
fn quantile_of_sorted(values: &[f32], p: f64) -> f64 {
    let pos = p * (values.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    let (a, b) = (values[lo] as f64, values[hi] as f64);
    a + (b - a) * (pos - lo as f64)
}

/// The median and scale of the robust encoding over `values` (the training
/// rows' finite values). The scale is the inter-quartile range; where that
/// is 0 (more than half the rows share one value) half the range, as
/// RealMLP-TD's reference code does; where that is 0 too (a constant
/// column, or none at all) 1, as the standard encoding does: such a column
/// carries no signal, and a value that differs still encodes finitely.
fn robust_scale(mut values: Vec<f32>) -> (f32, f32) {
    if values.is_empty() {
        return (0.0, 1.0);
    }
    values.sort_by(f32::total_cmp);
    let median = quantile_of_sorted(&values, 0.5) as f32;
    let iqr = (quantile_of_sorted(&values, 0.75) - quantile_of_sorted(&values, 0.25)) as f32;
    let half_range = ((values[values.len() - 1] as f64 - values[0] as f64) / 2.0) as f32;
    // A positive, normal f32 (a subnormal or overflowed scale would not
    // divide cleanly in f32).
    let usable = |s: f32| s.is_normal() && s > 0.0;
    let scale = [iqr, half_range].into_iter().find(|&s| usable(s)).unwrap_or(1.0);
    (median, scale)
}

/// Distinct quantiles of `values` at `0, 1/bins, ..., 1` (at least two edges;
/// a constant column gets a unit-wide bin).
fn quantile_edges(mut values: Vec<f32>, bins: usize) -> Vec<f32> {
    values.sort_by(f32::total_cmp);
    let mut edges: Vec<f32> = Vec::with_capacity(bins + 1);
    if let (Some(&lo), Some(_)) = (values.first(), values.last()) {
        for b in 0..=bins {
            let q = values[((values.len() - 1) * b).div_ceil(bins).min(values.len() - 1)];
            if edges.last().is_none_or(|&last| q > last) {
                edges.push(q);
            }
        }
        if edges.len() < 2 {
            // A bin wide enough to exist in f32 at this magnitude (1.0 is
            // lost next to 1e9).
            edges.push(lo + (lo.abs() * 1e-3).max(1.0));
        }
    } else {
        edges = vec![0.0, 1.0];
    }
    edges
}

/// A pipeline's output for some rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// `n × width` encoded inputs.
    pub x: Vec<f32>,
    /// `n × embedded columns` embedding codes.
    pub codes: Vec<u32>,
    pub n: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FittedFeature {
    pub name: String,
    pub encoder: Encoder,
    /// The training rows' typical value of the column: where integrated
    /// gradients start from (see [`FeaturePipeline::baseline`]). Absent in
    /// pipelines fitted before explanations existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub typical: Option<Typical>,
}

/// A column's typical value in the training rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Typical {
    /// The median of its numbers; NULL when most rows were NULL.
    Median(Option<f64>),
    /// Its most frequent category (ties: the first in sort order); NULL
    /// when NULL was the most frequent.
    Mode(Option<String>),
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

/// A numeric input as the network sees it: NULL, NaN, ±Infinity and values
/// beyond the f32 range (which become infinite) all count as missing, as in
/// the exported graph.
fn numeric_value(v: Option<f64>) -> Option<f32> {
    v.map(|x| x as f32).filter(|x| x.is_finite())
}

impl FeaturePipeline {
    /// Fits encoders for `features` on the given `rows` of `columns`, with
    /// the encodings `options` choose.
    pub fn fit(
        features: &[Feature],
        columns: &[ColumnData],
        rows: &[usize],
        options: &TrainOptions,
    ) -> Result<FeaturePipeline, FeatureError> {
        let max_categories = options.max_categories as usize;
        check_columns(features.len(), &columns.iter().map(ColumnData::len).collect::<Vec<_>>())?;
        let mut fitted = Vec::with_capacity(features.len());
        for (feature, column) in features.iter().zip(columns) {
            let typical;
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
                    let null_indicator = nulls > 0;
                    let seen = || rows.iter().filter_map(|&r| numeric_value(values[r])).collect::<Vec<f32>>();
                    let median = (count >= nulls && count > 0).then(|| {
                        let mut seen = seen();
                        let middle = seen.len() / 2;
                        *seen.select_nth_unstable_by(middle, f32::total_cmp).1 as f64
                    });
                    typical = Typical::Median(median);
                    let edges = || quantile_edges(seen(), options.bins as usize);
                    match options.numeric_encoding(&feature.name) {
                        NumericEncoding::Standard => {
                            Encoder::Numeric { mean: mean as f32, std: std as f32, null_indicator }
                        }
                        NumericEncoding::Ple => Encoder::Ple { edges: edges(), null_indicator },
                        NumericEncoding::Quantile => Encoder::Quantile { edges: edges(), null_indicator },
                        NumericEncoding::Robust => {
                            let (median, scale) = robust_scale(seen());
                            Encoder::Robust { median, scale, null_indicator }
                        }
                        NumericEncoding::Periodic => {
                            Encoder::Periodic { mean: mean as f32, std: std as f32, null_indicator }
                        }
                    }
                }
                (FeatureKind::Categorical, ColumnData::Text(values)) => {
                    let mut counts: HashMap<&str, usize> = HashMap::new();
                    for &r in rows {
                        *counts.entry(values[r].as_deref().unwrap_or(NULL_CATEGORY)).or_default() += 1;
                    }
                    let mut by_freq: Vec<(&str, usize)> = counts.into_iter().collect();
                    by_freq.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
                    typical = Typical::Mode(
                        by_freq.first().map(|(v, _)| *v).filter(|&v| v != NULL_CATEGORY).map(str::to_owned),
                    );
                    by_freq.truncate(max_categories);
                    let mut vocabulary: Vec<String> = by_freq.into_iter().map(|(v, _)| v.to_owned()).collect();
                    vocabulary.sort();
                    match options.categorical_encoding(&feature.name, vocabulary.len()) {
                        CategoricalEncoding::OneHot => Encoder::Categorical { vocabulary },
                        CategoricalEncoding::Embedding(dim) => Encoder::Embedding { vocabulary, dim: dim as usize },
                    }
                }
                (expected, found) => {
                    return Err(FeatureError::KindMismatch {
                        name: feature.name.clone(),
                        expected,
                        found: found.kind_name(),
                    });
                }
            };
            fitted.push(FittedFeature { name: feature.name.clone(), encoder, typical: Some(typical) });
        }
        Ok(FeaturePipeline { features: fitted })
    }

    /// One row of the typical value of each column: the baseline of an
    /// explanation. A pipeline fitted before it kept typical values gives
    /// what its encoders know: a numeric column's mean (its median, robust
    /// scaling; its middle bin edge, PLE and quantile encodings), and NULL
    /// for a categorical column.
    pub fn baseline(&self) -> Vec<ColumnData> {
        self.features
            .iter()
            .map(|f| match (&f.typical, &f.encoder) {
                (Some(Typical::Median(v)), _) => ColumnData::Float64(vec![*v]),
                (Some(Typical::Mode(v)), _) => ColumnData::Text(vec![v.clone()]),
                (None, Encoder::Numeric { mean, .. } | Encoder::Periodic { mean, .. }) => {
                    ColumnData::Float64(vec![Some(*mean as f64)])
                }
                (None, Encoder::Robust { median, .. }) => ColumnData::Float64(vec![Some(*median as f64)]),
                (None, Encoder::Ple { edges, .. } | Encoder::Quantile { edges, .. }) => {
                    ColumnData::Float64(vec![Some(edges[edges.len() / 2] as f64)])
                }
                (None, Encoder::Categorical { .. } | Encoder::Embedding { .. }) => ColumnData::Text(vec![None]),
            })
            .collect()
    }

    /// Where each column's inputs are in the encoded vector (`start..end`;
    /// empty for an embedded column) and, for an embedded column, where its
    /// vector is among one model's categorical vectors.
    pub fn spans(&self) -> Vec<(std::ops::Range<usize>, Option<std::ops::Range<usize>>)> {
        let (mut input, mut vector) = (0, 0);
        self.features
            .iter()
            .map(|f| {
                let inputs = input..input + f.encoder.width();
                input = inputs.end;
                let embedded = match &f.encoder {
                    Encoder::Embedding { dim, .. } => {
                        vector += dim;
                        Some(vector - dim..vector)
                    }
                    _ => None,
                };
                (inputs, embedded)
            })
            .collect()
    }

    /// Width of the encoded input vector.
    pub fn width(&self) -> usize {
        self.features.iter().map(|f| f.encoder.width()).sum()
    }

    /// The embedded columns' vocabulary sizes and widths, in code order.
    pub fn embeddings(&self) -> Vec<(usize, usize)> {
        self.features
            .iter()
            .filter_map(|f| match &f.encoder {
                Encoder::Embedding { vocabulary, dim } => Some((vocabulary.len(), *dim)),
                _ => None,
            })
            .collect()
    }

    /// Where each periodic column's standardised value is in the encoded
    /// inputs, in feature order: what the network's periodic embeddings read.
    pub fn periodic_inputs(&self) -> Vec<usize> {
        let mut offset = 0;
        let mut at = Vec::new();
        for f in &self.features {
            if matches!(f.encoder, Encoder::Periodic { .. }) {
                at.push(offset);
            }
            offset += f.encoder.width();
        }
        at
    }

    /// Encodes every row of `columns`.
    pub fn transform(&self, columns: &[ColumnData]) -> Result<Encoded, FeatureError> {
        self.transform_refs(&columns.iter().map(ColumnData::as_ref).collect::<Vec<_>>())
    }

    /// [`FeaturePipeline::transform`] for columns whose text is borrowed.
    pub fn transform_refs(&self, columns: &[ColumnRef<'_>]) -> Result<Encoded, FeatureError> {
        let n = check_columns(self.features.len(), &columns.iter().map(ColumnRef::len).collect::<Vec<_>>())?;
        let (width, code_cols) = (self.width(), self.embeddings().len());
        let mut x = vec![0.0f32; n * width];
        let mut codes = vec![0u32; n * code_cols];
        let (mut offset, mut code_col) = (0, 0);
        for (feature, column) in self.features.iter().zip(columns) {
            match (&feature.encoder, column) {
                (
                    Encoder::Numeric { mean, std, null_indicator } | Encoder::Periodic { mean, std, null_indicator },
                    ColumnRef::Float64(values),
                ) => {
                    for (r, v) in values.iter().enumerate() {
                        let row = &mut x[r * width + offset..];
                        match numeric_value(*v) {
                            Some(v) => row[0] = (v - mean) / std,
                            None if *null_indicator => row[1] = 1.0,
                            None => {}
                        }
                    }
                }
                (Encoder::Ple { edges, null_indicator }, ColumnRef::Float64(values)) => {
                    let bins = edges.len() - 1;
                    for (r, v) in values.iter().enumerate() {
                        let row = &mut x[r * width + offset..];
                        match numeric_value(*v) {
                            Some(v) => row.iter_mut().zip(ple_inputs(v, edges)).for_each(|(o, e)| *o = e),
                            None if *null_indicator => row[bins] = 1.0,
                            None => {}
                        }
                    }
                }
                (Encoder::Quantile { edges, null_indicator }, ColumnRef::Float64(values)) => {
                    let bins = (edges.len() - 1) as f32;
                    for (r, v) in values.iter().enumerate() {
                        let row = &mut x[r * width + offset..];
                        match numeric_value(*v) {
                            Some(v) => row[0] = ple_inputs(v, edges).sum::<f32>() / bins - 0.5,
                            None if *null_indicator => row[1] = 1.0,
                            None => {}
                        }
                    }
                }
                (Encoder::Robust { median, scale, null_indicator }, ColumnRef::Float64(values)) => {
                    for (r, v) in values.iter().enumerate() {
                        let row = &mut x[r * width + offset..];
                        match numeric_value(*v) {
                            Some(v) => row[0] = robust_input(v, *median, *scale),
                            None if *null_indicator => row[1] = 1.0,
                            None => {}
                        }
                    }
                }
                (Encoder::Categorical { vocabulary }, ColumnRef::Text(values)) => {
                    let index = Lookup::of(vocabulary, values.len());
                    for (r, v) in values.iter().enumerate() {
                        if let Some(i) = index.get(v.unwrap_or(NULL_CATEGORY.as_bytes())) {
                            x[r * width + offset + i] = 1.0;
                        }
                    }
                }
                (Encoder::Embedding { vocabulary, .. }, ColumnRef::Text(values)) => {
                    let index = Lookup::of(vocabulary, values.len());
                    for (r, v) in values.iter().enumerate() {
                        let code = index.get(v.unwrap_or(NULL_CATEGORY.as_bytes()));
                        codes[r * code_cols + code_col] = code.unwrap_or(vocabulary.len()) as u32;
                    }
                    code_col += 1;
                }
                (encoder, found) => {
                    return Err(FeatureError::KindMismatch {
                        name: feature.name.clone(),
                        expected: encoder.kind(),
                        found: found.kind_name(),
                    });
                }
            }
            offset += feature.encoder.width();
        }
        Ok(Encoded { x, codes, n })
    }
}

/// Rows below which a category is looked up by comparing it with each
/// value of the vocabulary: hashing the whole vocabulary would cost more
/// than the comparisons (one row scored in a backend, a few by key).
const SCAN_BELOW_ROWS: usize = 8;

/// A category's index in a vocabulary.
enum Lookup<'v> {
    Scan(&'v [String]),
    Map(rustc_hash::FxHashMap<&'v [u8], usize>),
}

impl<'v> Lookup<'v> {
    fn of(vocabulary: &'v [String], rows: usize) -> Lookup<'v> {
        if rows < SCAN_BELOW_ROWS {
            Lookup::Scan(vocabulary)
        } else {
            Lookup::Map(vocabulary.iter().enumerate().map(|(i, v)| (v.as_bytes(), i)).collect())
        }
    }

    fn get(&self, value: &[u8]) -> Option<usize> {
        match self {
            Lookup::Scan(vocabulary) => vocabulary.iter().position(|v| v.as_bytes() == value),
            Lookup::Map(index) => index.get(value).copied(),
        }
    }
}

/// The row count of columns of lengths `lens`, `expected` of them.
fn check_columns(expected: usize, lens: &[usize]) -> Result<usize, FeatureError> {
    if lens.len() != expected {
        return Err(FeatureError::ColumnCount { given: lens.len(), expected });
    }
    let n = lens.first().copied().unwrap_or(0);
    if lens.iter().any(|&len| len != n) {
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

    fn opts(v: serde_json::Value) -> TrainOptions {
        TrainOptions::from_json(Some(&v)).unwrap()
    }

    /// Each column's typical value is the training rows' median or most
    /// frequent category (NULL when most rows are NULL), over the rows the
    /// pipeline is fitted on; a pipeline stored before typical values
    /// existed falls back on its encoders' centres.
    #[test]
    fn typical_values_are_medians_and_modes_of_the_fitted_rows() {
        let p = FeaturePipeline::fit(&features(), &columns(), &[0, 1, 2, 3], &TrainOptions::default()).unwrap();
        assert_eq!(p.features[0].typical, Some(Typical::Median(Some(3.0))), "1 and 3 seen: the upper middle");
        assert_eq!(p.features[1].typical, Some(Typical::Mode(Some("a".into()))));
        assert_eq!(p.baseline(), vec![ColumnData::Float64(vec![Some(3.0)]), ColumnData::Text(vec![Some("a".into())])]);
        let mostly_null = FeaturePipeline::fit(&features(), &columns(), &[2, 3, 0], &TrainOptions::default()).unwrap();
        assert_eq!(mostly_null.features[0].typical, Some(Typical::Median(None)));
        assert_eq!(mostly_null.features[1].typical, Some(Typical::Mode(Some("a".into()))));
        let null_mode = FeaturePipeline::fit(&features(), &columns(), &[2, 1], &TrainOptions::default()).unwrap();
        assert_eq!(null_mode.features[1].typical, Some(Typical::Mode(None)), "a tie of NULL and b: NULL sorts first");

        let standard = opts(serde_json::json!({"numeric_encoding": "standard"}));
        let p = FeaturePipeline::fit(&features(), &columns(), &[0, 1, 2, 3], &standard).unwrap();
        let mut stored = serde_json::to_value(&p).unwrap();
        for f in stored["features"].as_array_mut().unwrap() {
            f.as_object_mut().unwrap().remove("typical");
        }
        let old: FeaturePipeline = serde_json::from_value(stored).unwrap();
        assert_eq!(
            old.baseline(),
            vec![ColumnData::Float64(vec![Some(2.0)]), ColumnData::Text(vec![None])],
            "the mean"
        );
    }

    #[test]
    fn fits_on_training_rows_and_encodes_nulls_and_unseen_values() {
        let standard = opts(serde_json::json!({"numeric_encoding": "standard"}));
        let p = FeaturePipeline::fit(&features(), &columns(), &[0, 1, 2], &standard).unwrap();
        assert_eq!(p.features[0].encoder, Encoder::Numeric { mean: 2.0, std: 1.0, null_indicator: true });
        assert_eq!(
            p.features[1].encoder,
            Encoder::Categorical { vocabulary: vec![NULL_CATEGORY.into(), "a".into(), "b".into()] }
        );
        assert_eq!(p.width(), 5);

        let scoring =
            vec![ColumnData::Float64(vec![Some(4.0), None]), ColumnData::Text(vec![Some("never seen".into()), None])];
        let x = p.transform(&scoring).unwrap().x;
        assert_eq!(x, vec![2.0, 0.0, 0.0, 0.0, 0.0, /* row 2 */ 0.0, 1.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn piecewise_linear_and_quantile_encodings() {
        let values: Vec<Option<f64>> = (0..=100).map(|v| Some(v as f64)).chain([None]).collect();
        let rows: Vec<usize> = (0..values.len()).collect();
        let cols = vec![ColumnData::Float64(values)];
        let f = vec![Feature { name: "v".into(), kind: FeatureKind::Numeric }];
        let p =
            FeaturePipeline::fit(&f, &cols, &rows, &opts(serde_json::json!({"numeric_encoding": "ple", "bins": 4})))
                .unwrap();
        assert_eq!(
            p.features[0].encoder,
            Encoder::Ple { edges: vec![0.0, 25.0, 50.0, 75.0, 100.0], null_indicator: true }
        );
        let enc = |p: &FeaturePipeline, v: Option<f64>| p.transform(&[ColumnData::Float64(vec![v])]).unwrap().x;
        assert_eq!(enc(&p, Some(60.0)), vec![1.0, 1.0, 0.4, 0.0, 0.0]);
        assert_eq!(enc(&p, Some(-5.0)), vec![0.0; 5]);
        assert_eq!(enc(&p, None), vec![0.0, 0.0, 0.0, 0.0, 1.0]);

        let q = FeaturePipeline::fit(
            &f,
            &cols,
            &rows,
            &opts(serde_json::json!({"encodings": {"v": "quantile"}, "bins": 4})),
        )
        .unwrap();
        assert_eq!(q.width(), 2);
        assert!((enc(&q, Some(60.0))[0] - 0.1).abs() < 1e-6);
        assert_eq!(enc(&q, Some(1e9)), vec![0.5, 0.0]);
        assert_eq!(enc(&q, None), vec![0.0, 1.0]);
    }

    #[test]
    fn robust_scaling_is_fitted_on_training_rows_and_clips_smoothly() {
        // Training rows 0..=8: values 1..=9 and a NULL; row 10 (1000) is not
        // a training row and must not move the median or the quartiles.
        let values: Vec<Option<f64>> = (1..=9).map(|v| Some(v as f64)).chain([None, Some(1000.0)]).collect();
        let cols = vec![ColumnData::Float64(values)];
        let f = vec![Feature { name: "v".into(), kind: FeatureKind::Numeric }];
        let rows: Vec<usize> = (0..10).collect();
        let p =
            FeaturePipeline::fit(&f, &cols, &rows, &opts(serde_json::json!({"numeric_encoding": "robust"}))).unwrap();
        // Median 5; q25 = 3, q75 = 7 (linear interpolation): IQR 4.
        assert_eq!(p.features[0].encoder, Encoder::Robust { median: 5.0, scale: 4.0, null_indicator: true });
        assert_eq!(p.width(), 2);
        let enc = |p: &FeaturePipeline, v: Option<f64>| p.transform(&[ColumnData::Float64(vec![v])]).unwrap().x;
        // By hand: z = (x - 5) / 4, then z / sqrt(1 + (z/3)^2).
        assert_eq!(enc(&p, Some(5.0)), vec![0.0, 0.0]);
        // z = 3: 3 / sqrt(2).
        assert!((enc(&p, Some(17.0))[0] - 2.121_320_3).abs() < 1e-6);
        // z = -1.5: -1.5 / sqrt(1.25) = -1.341641.
        assert!((enc(&p, Some(-1.0))[0] + 1.341_640_8).abs() < 1e-6);
        // z = 0.25: close to z itself.
        assert!((enc(&p, Some(6.0))[0] - 0.25 / (1.0f32 + 0.25 * 0.25 / 9.0).sqrt()).abs() < 1e-7);
        // Outliers saturate below 3, far ones at 3 to f32 precision, finitely.
        let outlier = enc(&p, Some(1000.0))[0];
        assert!(outlier > 2.99 && outlier < 3.0, "{outlier}");
        assert_eq!(enc(&p, Some(1e30)), vec![3.0, 0.0]);
        assert_eq!(enc(&p, Some(-3e38)), vec![-3.0, 0.0]);
        // NULL (and what counts as missing) is the median, 0, and the flag.
        assert_eq!(enc(&p, None), vec![0.0, 1.0]);
        assert_eq!(enc(&p, Some(f64::INFINITY)), vec![0.0, 1.0]);

        // Without NULLs in the training rows there is no flag; a per-column
        // `robust` overrides the default encoding.
        let p =
            FeaturePipeline::fit(&f, &cols, &[0, 1, 2, 3, 4], &opts(serde_json::json!({"encodings": {"v": "robust"}})))
                .unwrap();
        assert_eq!(p.features[0].encoder, Encoder::Robust { median: 3.0, scale: 2.0, null_indicator: false });
        assert_eq!(enc(&p, None), vec![0.0]);
    }

    #[test]
    fn a_robust_scale_of_zero_falls_back_to_half_the_range_then_to_one() {
        // Most rows share one value: the IQR is 0, half the range is 5.
        let mostly_zero = vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 10.0];
        assert_eq!(robust_scale(mostly_zero), (0.0, 5.0));
        // A constant column, and a column with no values at all: scale 1.
        assert_eq!(robust_scale(vec![7.0; 4]), (7.0, 1.0));
        assert_eq!(robust_scale(vec![]), (0.0, 1.0));
        assert_eq!(robust_scale(vec![2.5]), (2.5, 1.0));
        // Even sizes interpolate: median of 1, 2, 3, 4 is 2.5; q25 1.75, q75 3.25.
        assert_eq!(robust_scale(vec![4.0, 1.0, 3.0, 2.0]), (2.5, 1.5));
        // Extreme magnitudes keep a finite, normal scale.
        let (median, scale) = robust_scale(vec![-3e38, -3e38, 3e38, 3e38]);
        assert!(median.is_finite() && scale.is_normal(), "{median} {scale}");
        assert!(robust_input(3e38, median, scale).is_finite());
        // Every input is finite and within (-3, 3].
        for x in [-1e38, -1.0, 0.0, 1e-30, 1.0, 1e38] {
            let y = robust_input(x, 7.0, 1.0);
            assert!(y.is_finite() && y.abs() <= 3.0, "{x}: {y}");
        }
    }

    #[test]
    fn infinite_and_out_of_range_values_count_as_missing() {
        let values = vec![Some(1.0), Some(3.0), Some(f64::INFINITY), Some(f64::NEG_INFINITY), Some(1e300), None];
        let cols = vec![ColumnData::Float64(values)];
        let f = vec![Feature { name: "v".into(), kind: FeatureKind::Numeric }];
        let standard = opts(serde_json::json!({"numeric_encoding": "standard"}));
        let p = FeaturePipeline::fit(&f, &cols, &[0, 1, 2, 3, 4, 5], &standard).unwrap();
        assert_eq!(p.features[0].encoder, Encoder::Numeric { mean: 2.0, std: 1.0, null_indicator: true });
        let x = p.transform(&cols).unwrap().x;
        assert_eq!(x, vec![-1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]);
    }

    #[test]
    fn a_constant_column_gets_a_real_bin_at_any_magnitude() {
        for v in [0.0, 3.5, -2e9, 1e9, 3e30] {
            let edges = quantile_edges(vec![v as f32; 5], 8);
            assert_eq!(edges.len(), 2);
            assert!(edges[1] > edges[0], "{v}: {edges:?}");
            assert!(ple_inputs(v as f32, &edges).all(|x| x.is_finite()), "{v}");
        }
    }

    #[test]
    fn large_vocabularies_are_embedded_and_unseen_values_get_the_spare_code() {
        let values: Vec<Option<String>> = (0..40).map(|i| Some(format!("c{}", i % 20))).chain([None]).collect();
        let cols = vec![ColumnData::Text(values)];
        let f = vec![Feature { name: "c".into(), kind: FeatureKind::Categorical }];
        let p = FeaturePipeline::fit(&f, &cols, &(0..41).collect::<Vec<_>>(), &TrainOptions::default()).unwrap();
        assert_eq!(p.width(), 0);
        assert_eq!(p.embeddings(), vec![(21, cerebro_shared::spec::embedding_dim(21))]);
        let e = p.transform(&[ColumnData::Text(vec![Some("c0".into()), Some("new".into()), None])]).unwrap();
        let Encoder::Embedding { vocabulary, .. } = &p.features[0].encoder else { panic!() };
        assert_eq!(e.codes, vec![vocabulary.iter().position(|v| v == "c0").unwrap() as u32, 21, 0]);
        assert_eq!(vocabulary[0], NULL_CATEGORY);
        let onehot = FeaturePipeline::fit(&f, &cols, &[0, 1], &opts(serde_json::json!({"encodings": {"c": "onehot"}})));
        assert_eq!(onehot.unwrap().width(), 2);
        // A row alone looks its category up by comparison, a batch through
        // a hash of the vocabulary: the same codes either way.
        let batch: Vec<Option<String>> = (0..30).map(|i| (i % 7 != 0).then(|| format!("c{}", i % 23))).collect();
        let together = p.transform(&[ColumnData::Text(batch.clone())]).unwrap().codes;
        let alone: Vec<u32> =
            batch.into_iter().flat_map(|v| p.transform(&[ColumnData::Text(vec![v])]).unwrap().codes).collect();
        assert_eq!(alone, together);
    }

    #[test]
    fn rare_categories_beyond_the_cap_are_dropped() {
        let cols = vec![ColumnData::Text(vec![Some("x".into()), Some("x".into()), Some("y".into())])];
        let f = vec![Feature { name: "c".into(), kind: FeatureKind::Categorical }];
        let p = FeaturePipeline::fit(&f, &cols, &[0, 1, 2], &opts(serde_json::json!({"max_categories": 1}))).unwrap();
        assert_eq!(p.features[0].encoder, Encoder::Categorical { vocabulary: vec!["x".into()] });
    }

    #[test]
    fn mismatched_columns_are_errors() {
        let cols = vec![ColumnData::Text(vec![]), ColumnData::Text(vec![])];
        let o = TrainOptions::default();
        assert!(matches!(FeaturePipeline::fit(&features(), &cols, &[], &o), Err(FeatureError::KindMismatch { .. })));
        assert_eq!(
            FeaturePipeline::fit(&features(), &cols[..1], &[], &o),
            Err(FeatureError::ColumnCount { given: 1, expected: 2 })
        );
    }
}
