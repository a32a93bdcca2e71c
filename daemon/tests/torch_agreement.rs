//! Agreement with PyTorch: for fixed weights and inputs, the engine's forward
//! outputs, losses and gradients equal PyTorch's to 1e-5 relative, for every
//! activation and head. The reference values are made by
//! fixtures/make_torch_reference.py.

use cerebro_daemon::engine::{Activation, Dense, ForwardCache, Gradients, Head, Mlp};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    activation: Activation,
    head: String,
    dims: Vec<usize>,
    weights: Vec<Vec<f32>>,
    biases: Vec<Vec<f32>>,
    x: Vec<f32>,
    y: Vec<f32>,
    logits: Vec<f32>,
    loss: f64,
    grad_weights: Vec<Vec<f32>>,
    grad_biases: Vec<Vec<f32>>,
}

#[derive(Deserialize)]
struct Fixtures {
    torch: String,
    cases: Vec<Case>,
}

fn close(what: &str, ours: &[f32], theirs: &[f32]) {
    assert_eq!(ours.len(), theirs.len(), "{what}: lengths");
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        // 1e-5 relative, with an absolute floor for values near zero.
        assert!((a - b).abs() <= 1e-5 * b.abs().max(1e-1), "{what}[{i}]: engine {a}, PyTorch {b}");
    }
}

#[test]
fn forward_losses_and_gradients_agree_with_pytorch() {
    let fixtures: Fixtures =
        serde_json::from_str(include_str!("fixtures/torch_reference.json")).expect("fixtures parse");
    assert_eq!(fixtures.cases.len(), 12, "4 activations x 3 heads (PyTorch {})", fixtures.torch);
    for case in &fixtures.cases {
        let name = format!("{:?}/{}", case.activation, case.head);
        let head = match case.head.as_str() {
            "binary" => Head::Binary,
            "multiclass" => Head::Multiclass(3),
            _ => Head::Regression,
        };
        let layers = case
            .dims
            .windows(2)
            .zip(case.weights.iter().zip(&case.biases))
            .map(|(d, (w, b))| Dense { inputs: d[0], outputs: d[1], weight: w.clone(), bias: b.clone() })
            .collect();
        let mlp = Mlp { layers, activation: case.activation };
        let n = case.y.len();

        let mut cache = ForwardCache::default();
        mlp.forward(&case.x, n, &mut cache);
        close(&format!("{name} logits"), cache.logits(), &case.logits);

        let mut d = vec![0.0; case.logits.len()];
        let loss = head.loss_and_grad(cache.logits(), &case.y, n, &mut d);
        assert!((loss - case.loss).abs() <= 1e-5 * case.loss.abs().max(1e-1), "{name} loss: {loss} vs {}", case.loss);

        let mut grads = Gradients::zeros_like(&mlp);
        mlp.backward(&case.x, n, &mut cache, &d, &mut grads);
        for (l, (gw, gb)) in grads.layers.iter().enumerate() {
            close(&format!("{name} layer {l} weight gradient"), gw, &case.grad_weights[l]);
            close(&format!("{name} layer {l} bias gradient"), gb, &case.grad_biases[l]);
        }
    }
}
