//! Agreement with PyTorch: for fixed weights and inputs, the engine's forward
//! outputs, losses and gradients equal PyTorch's to 1e-5 relative, for every
//! activation and head on plain MLPs, and for networks with embeddings,
//! LayerNorm, BatchNorm (training mode), dropout, residual blocks, class
//! weights and Huber loss. The reference values are made by
//! fixtures/make_torch_reference.py.

use cerebro_daemon::engine::{Arch, Batch, Head, Loss, Mode, Op, Stack, StackCache};
use serde::Deserialize;

#[derive(Deserialize)]
struct LossOptions {
    #[serde(default)]
    class_weights: Vec<f32>,
    #[serde(default)]
    huber_delta: f32,
    #[serde(default)]
    label_smoothing: f32,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    arch: Arch,
    head: String,
    classes: usize,
    loss: LossOptions,
    seed: u64,
    step: u64,
    params: Vec<Vec<f32>>,
    x: Vec<f32>,
    codes: Vec<u32>,
    y: Vec<f32>,
    logits: Vec<f32>,
    loss_value: f64,
    grads: Vec<Vec<f32>>,
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
    assert_eq!(fixtures.cases.len(), 18, "12 MLPs and 6 networks with every other op (PyTorch {})", fixtures.torch);
    let every_op = |op: fn(&Op) -> bool| fixtures.cases.iter().any(|c| c.arch.ops.iter().any(op));
    assert!(every_op(|o| matches!(o, Op::LayerNorm { .. })) && every_op(|o| matches!(o, Op::BatchNorm { .. })));
    assert!(every_op(|o| matches!(o, Op::Dropout { .. })) && every_op(|o| matches!(o, Op::Residual { .. })));
    assert!(fixtures.cases.iter().any(|c| !c.arch.embeddings.is_empty()));

    for case in &fixtures.cases {
        let name = &case.name;
        case.arch.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        let head = match case.head.as_str() {
            "binary" => Head::Binary,
            "multiclass" => Head::Multiclass(case.classes),
            _ => Head::Regression,
        };
        let loss = Loss {
            head,
            class_weights: case.loss.class_weights.clone(),
            huber_delta: case.loss.huber_delta,
            label_smoothing: case.loss.label_smoothing,
        };
        // BatchNorm's running statistics are not used in training mode.
        let state = case
            .arch
            .ops
            .iter()
            .filter_map(|op| if let Op::BatchNorm { width } = op { Some(*width) } else { None })
            .flat_map(|w| [vec![0.0; w], vec![1.0; w]])
            .collect();
        let net = Stack { k: 1, arch: case.arch.clone(), params: case.params.clone(), state, seed: case.seed };
        let n = case.y.len();
        let batch = Batch { x: &case.x, codes: &case.codes, n };

        let mut cache = StackCache::default();
        net.forward(batch, &mut cache, Mode::Train { step: case.step, row_offset: 0 });
        close(&format!("{name} logits"), cache.logits(), &case.logits);

        let mut d = vec![0.0; case.logits.len()];
        let value = loss.loss_and_grad(cache.logits(), &case.y, n, &mut d);
        assert!(
            (value - case.loss_value).abs() <= 1e-5 * case.loss_value.abs().max(1e-1),
            "{name} loss: {value} vs {}",
            case.loss_value
        );

        let mut grads = net.zero_gradients();
        net.backward(batch, &mut cache, &d, &mut grads);
        for (s, (ours, theirs)) in grads.params.iter().zip(&case.grads).enumerate() {
            close(&format!("{name} slot {s} gradient"), ours, theirs);
        }
    }
}
