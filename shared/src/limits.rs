//! How large a model is and how much work training it is, estimated from
//! what an INSERT knows (the options, the feature columns and their kinds,
//! the rows and classes), so that a server can refuse a model its limits do
//! not allow before anything is queued. The estimates are upper bounds where
//! training decides (a categorical column's vocabulary is taken at
//! `max_categories`), so a model that passes is never larger.

use crate::spec::{embedding_dim, ColumnEncoding, NumericEncoding, TrainOptions};

/// What a feature column is, as the INSERT knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    Numeric,
    Categorical,
}

/// A model's estimated size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSize {
    /// Trainable numbers: weights, biases, norm scales, embedding tables.
    pub parameters: u64,
    /// Bytes training one model holds: parameters with their gradients and
    /// optimiser state, and one minibatch's activations and their gradients.
    pub training_bytes: u64,
}

/// Inputs one column becomes, and the embedding parameters it brings.
fn column_inputs(name: &str, kind: InputKind, options: &TrainOptions) -> (u64, u64) {
    let vocabulary = u64::from(options.max_categories).max(1);
    let numeric = |encoding: NumericEncoding| match encoding {
        // The value and its "was NULL" indicator.
        NumericEncoding::Standard | NumericEncoding::Quantile | NumericEncoding::Robust => (2, 0),
        NumericEncoding::Ple => (u64::from(options.bins).max(1) + 1, 0),
        // Those two, and the embedding's outputs from its frequencies, its
        // linear layer and bias.
        NumericEncoding::Periodic => {
            let (k, d) = (u64::from(options.periodic_frequencies), u64::from(options.periodic_dim));
            (2 + d, k + 2 * k * d + d)
        }
    };
    let embedded = |dim: Option<u32>| {
        let dim = dim.map(u64::from).unwrap_or(embedding_dim(vocabulary as usize) as u64);
        // One row per category, NULL and the frozen "never seen" row.
        (dim, (vocabulary + 2).saturating_mul(dim))
    };
    match (kind, options.encodings.get(name)) {
        (InputKind::Numeric, _) => numeric(options.numeric_encoding(name)),
        (InputKind::Categorical, Some(ColumnEncoding::Embedding(dim))) => embedded(*dim),
        (InputKind::Categorical, Some(ColumnEncoding::OneHot)) => (vocabulary + 1, 0),
        (InputKind::Categorical, _) if vocabulary > u64::from(options.onehot_max) => embedded(None),
        // One per category, and NULL's.
        (InputKind::Categorical, _) => (vocabulary + 1, 0),
    }
}

/// The size of a network with `options` over `columns`, predicting
/// `outputs` numbers (1 for binary and regression, the classes otherwise).
pub fn model_size(options: &TrainOptions, columns: &[(&str, InputKind)], outputs: u64) -> ModelSize {
    let (mut inputs, mut parameters) = (0u64, 0u64);
    for (name, kind) in columns {
        let (width, embedding) = column_inputs(name, *kind, options);
        inputs = inputs.saturating_add(width);
        parameters = parameters.saturating_add(embedding);
    }
    let dense = |from: u64, to: u64| from.saturating_mul(to).saturating_add(to);
    let normed = !matches!(options.norm, crate::spec::Norm::None);
    // Every layer's width, inputs first: activations are kept per layer.
    let mut widths = vec![inputs];
    let mut from = inputs;
    for &h in &options.hidden {
        let h = u64::from(h);
        parameters = parameters.saturating_add(dense(from, h));
        if normed {
            parameters = parameters.saturating_add(2 * h);
        }
        widths.push(h);
        from = h;
    }
    for _ in 0..options.residual_blocks {
        parameters = parameters.saturating_add(dense(from, from).saturating_mul(2));
        widths.extend([from, from]);
    }
    parameters = parameters.saturating_add(dense(from, outputs.max(1)));
    widths.push(outputs.max(1));
    // f32 weights, gradients and two moments of Adam (SGD keeps one).
    let per_parameter = 4 * 4;
    // Each layer's output, its pre-activation and their gradients.
    let per_activation = 4 * 3;
    let activations = widths.iter().fold(0u64, |sum, w| sum.saturating_add(*w));
    let training_bytes = parameters
        .saturating_mul(per_parameter)
        .saturating_add(u64::from(options.batch_size).saturating_mul(activations).saturating_mul(per_activation));
    // A mini-ensemble is that many networks.
    let members = u64::from(options.members.max(1));
    ModelSize { parameters: parameters.saturating_mul(members), training_bytes: training_bytes.saturating_mul(members) }
}

/// Rows read times epochs: what one training job costs, whatever the
/// network.
pub fn training_work(rows: u64, epochs: u32) -> u64 {
    rows.saturating_mul(u64::from(epochs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(json: serde_json::Value) -> TrainOptions {
        TrainOptions::from_json(Some(&json)).unwrap()
    }

    #[test]
    fn a_mini_ensemble_counts_every_member() {
        let one = options(serde_json::json!({"hidden": [8]}));
        let three = options(serde_json::json!({"hidden": [8], "members": 3}));
        let columns = [("a", InputKind::Numeric), ("b", InputKind::Categorical)];
        let (a, b) = (model_size(&one, &columns, 1), model_size(&three, &columns, 1));
        assert_eq!((b.parameters, b.training_bytes), (3 * a.parameters, 3 * a.training_bytes));
    }

    #[test]
    fn a_periodic_column_counts_its_embedding() {
        let o = options(serde_json::json!({
            "hidden": [8], "numeric_encoding": "periodic", "periodic_frequencies": 3, "periodic_dim": 4
        }));
        let size = model_size(&o, &[("a", InputKind::Numeric)], 1);
        // z, its NULL flag and 4 outputs -> 8 -> 1; frequencies 3, W 6 × 4, b 4.
        assert_eq!(size.parameters, (3 + 6 * 4 + 4) + (6 * 8 + 8) + (8 + 1));
    }

    #[test]
    fn a_dense_network_counts_every_weight_and_bias() {
        let o = options(serde_json::json!({"hidden": [8, 4], "numeric_encoding": "standard"}));
        let size = model_size(&o, &[("a", InputKind::Numeric), ("b", InputKind::Numeric)], 1);
        // 4 inputs (two values, two NULL flags) -> 8 -> 4 -> 1.
        assert_eq!(size.parameters, (4 * 8 + 8) + (8 * 4 + 4) + (4 + 1));
        assert!(size.training_bytes > size.parameters * 16);
    }

    #[test]
    fn a_robust_column_is_one_input_and_its_null_flag() {
        let every = options(serde_json::json!({"hidden": [8], "numeric_encoding": "robust"}));
        assert_eq!(model_size(&every, &[("a", InputKind::Numeric)], 1).parameters, (2 * 8 + 8) + (8 + 1));
        // One robust column among PLE ones (16 bins and the flag).
        let one = options(serde_json::json!({"hidden": [8], "bins": 16, "encodings": {"a": "robust"}}));
        let size = model_size(&one, &[("a", InputKind::Numeric), ("b", InputKind::Numeric)], 1);
        assert_eq!(size.parameters, ((2 + 17) * 8 + 8) + (8 + 1));
    }

    #[test]
    fn wide_categories_are_embedded_and_narrow_ones_one_hot() {
        let narrow = options(serde_json::json!({"hidden": [4], "max_categories": 10, "onehot_max": 16}));
        let wide = options(serde_json::json!({"hidden": [4], "max_categories": 1000, "onehot_max": 16}));
        let one_hot = model_size(&narrow, &[("c", InputKind::Categorical)], 1).parameters;
        assert_eq!(one_hot, (11 * 4 + 4) + (4 + 1));
        let dim = embedding_dim(1000) as u64;
        let embedded = model_size(&wide, &[("c", InputKind::Categorical)], 1).parameters;
        assert_eq!(embedded, 1002 * dim + (dim * 4 + 4) + (4 + 1));
    }

    #[test]
    fn the_network_of_the_issue_is_counted_in_the_hundreds_of_millions() {
        let o = options(serde_json::json!({"hidden": [4096, 4096, 4096, 4096, 4096, 4096, 4096, 4096]}));
        let size = model_size(&o, &[("a", InputKind::Numeric)], 1);
        assert!(size.parameters > 100_000_000, "{size:?}");
        assert_eq!(training_work(7043, 100_000), 704_300_000);
        assert_eq!(training_work(u64::MAX, 2), u64::MAX);
    }
}
