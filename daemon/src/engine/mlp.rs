//! A multi-layer perceptron: dense layers with ReLU between them.

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::activation::{self, Activation};
use super::gemm::gemm;

/// One dense layer, `y = x · weight + bias`, weight stored inputs×outputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dense {
    pub inputs: usize,
    pub outputs: usize,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

impl Dense {
    /// He-uniform initialisation for layers followed by ReLU, Glorot for the head.
    fn init(inputs: usize, outputs: usize, relu_after: bool, rng: &mut impl Rng) -> Dense {
        let bound = if relu_after {
            (6.0 / inputs.max(1) as f64).sqrt()
        } else {
            (6.0 / (inputs + outputs).max(1) as f64).sqrt()
        } as f32;
        let weight = (0..inputs * outputs).map(|_| rng.random_range(-bound..=bound)).collect();
        Dense { inputs, outputs, weight, bias: vec![0.0; outputs] }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mlp {
    pub layers: Vec<Dense>,
    /// After every layer but the last.
    #[serde(default)]
    pub activation: Activation,
}

/// Activations kept from the forward pass for the backward pass.
#[derive(Debug, Default)]
pub struct ForwardCache {
    /// Pre-activation of every layer (the last one holds the logits).
    pre: Vec<Vec<f32>>,
    /// Post-ReLU activation of every hidden layer.
    post: Vec<Vec<f32>>,
    delta: Vec<f32>,
    delta_prev: Vec<f32>,
}

impl ForwardCache {
    pub fn logits(&self) -> &[f32] {
        self.pre.last().map_or(&[], |v| v.as_slice())
    }
}

/// Buffers reused across [`Mlp::predict_into`] calls.
#[derive(Debug, Default)]
pub struct Scratch {
    current: Vec<f32>,
    next: Vec<f32>,
}

/// Scores rows with one network on several threads, each taking a
/// contiguous share of every batch, with buffers kept across batches.
pub struct Predictor<'m> {
    mlp: &'m Mlp,
    scratch: Vec<Scratch>,
}

impl<'m> Predictor<'m> {
    pub fn new(mlp: &'m Mlp, threads: usize) -> Predictor<'m> {
        Predictor { mlp, scratch: (0..threads.max(1)).map(|_| Scratch::default()).collect() }
    }

    /// Logits for `n` rows of `x`, appended to `out`.
    pub fn predict(&mut self, x: &[f32], n: usize, out: &mut Vec<f32>) {
        let (width, t) = (self.mlp.input_dim(), self.scratch.len());
        if t == 1 || n < 2 * t {
            out.extend_from_slice(self.mlp.predict_into(x, n, &mut self.scratch[0]));
            return;
        }
        let mlp = self.mlp;
        std::thread::scope(|s| {
            let handles: Vec<_> = self
                .scratch
                .iter_mut()
                .enumerate()
                .map(|(i, scratch)| {
                    let (start, end) = (n * i / t, n * (i + 1) / t);
                    let rows = &x[start * width..end * width];
                    s.spawn(move || {
                        mlp.predict_into(rows, end - start, scratch);
                    })
                })
                .collect();
            for h in handles {
                h.join().expect("a scoring thread panicked");
            }
        });
        for (i, scratch) in self.scratch.iter().enumerate() {
            let rows = n * (i + 1) / t - n * i / t;
            out.extend_from_slice(&scratch.current[..rows * mlp.output_dim()]);
        }
    }
}

/// Gradients shaped like the network's parameters.
#[derive(Debug, Clone)]
pub struct Gradients {
    pub layers: Vec<(Vec<f32>, Vec<f32>)>,
}

impl Gradients {
    pub fn zeros_like(mlp: &Mlp) -> Gradients {
        Gradients { layers: mlp.layers.iter().map(|l| (vec![0.0; l.weight.len()], vec![0.0; l.bias.len()])).collect() }
    }
}

impl Mlp {
    pub fn new(input: usize, hidden: &[usize], output: usize, rng: &mut impl Rng) -> Mlp {
        let mut dims = vec![input];
        dims.extend_from_slice(hidden);
        dims.push(output);
        let last = dims.len() - 2;
        let layers = (0..dims.len() - 1).map(|i| Dense::init(dims[i], dims[i + 1], i < last, rng)).collect();
        Mlp { layers, activation: Activation::Relu }
    }

    pub fn with_activation(mut self, activation: Activation) -> Mlp {
        self.activation = activation;
        self
    }

    pub fn input_dim(&self) -> usize {
        self.layers.first().map_or(0, |l| l.inputs)
    }

    pub fn output_dim(&self) -> usize {
        self.layers.last().map_or(0, |l| l.outputs)
    }

    /// Runs `n` rows of `x` (n × input_dim) through the network; the logits are
    /// left in `cache.logits()`.
    pub fn forward(&self, x: &[f32], n: usize, cache: &mut ForwardCache) {
        let depth = self.layers.len();
        cache.pre.resize_with(depth, Vec::new);
        cache.post.resize_with(depth.saturating_sub(1), Vec::new);
        for (l, layer) in self.layers.iter().enumerate() {
            let z = &mut cache.pre[l];
            let input: &[f32] = if l == 0 { x } else { &cache.post[l - 1] };
            z.resize(n * layer.outputs, 0.0);
            for row in z.chunks_exact_mut(layer.outputs) {
                row.copy_from_slice(&layer.bias);
            }
            gemm(n, layer.inputs, layer.outputs, input, false, &layer.weight, false, 1.0, z);
            if l + 1 < depth {
                let a = &mut cache.post[l];
                a.resize(z.len(), 0.0);
                activation::apply(self.activation, z, a);
            }
        }
    }

    /// Logits for `n` rows, without keeping a cache around.
    pub fn predict(&self, x: &[f32], n: usize) -> Vec<f32> {
        self.predict_into(x, n, &mut Scratch::default()).to_vec()
    }

    /// Logits for `n` rows into reusable buffers: the inference path, with no
    /// allocation once the buffers have grown and ReLU applied in place.
    pub fn predict_into<'s>(&self, x: &[f32], n: usize, scratch: &'s mut Scratch) -> &'s [f32] {
        let depth = self.layers.len();
        for (l, layer) in self.layers.iter().enumerate() {
            let out = &mut scratch.next;
            out.resize(n * layer.outputs, 0.0);
            for row in out.chunks_exact_mut(layer.outputs) {
                row.copy_from_slice(&layer.bias);
            }
            let input: &[f32] = if l == 0 { x } else { &scratch.current };
            gemm(n, layer.inputs, layer.outputs, input, false, &layer.weight, false, 1.0, out);
            if l + 1 < depth {
                activation::apply_in_place(self.activation, out);
            }
            std::mem::swap(&mut scratch.current, &mut scratch.next);
        }
        &scratch.current[..n * self.output_dim()]
    }

    /// Back-propagates `d_logits` (n × output_dim) through the activations left
    /// by [`Mlp::forward`] on the same `x`, overwriting `grads`.
    pub fn backward(&self, x: &[f32], n: usize, cache: &mut ForwardCache, d_logits: &[f32], grads: &mut Gradients) {
        let depth = self.layers.len();
        cache.delta.clear();
        cache.delta.extend_from_slice(d_logits);
        for l in (0..depth).rev() {
            let layer = &self.layers[l];
            let input: &[f32] = if l == 0 { x } else { &cache.post[l - 1] };
            let (gw, gb) = &mut grads.layers[l];
            gemm(layer.inputs, n, layer.outputs, input, true, &cache.delta, false, 0.0, gw);
            gb.fill(0.0);
            for row in cache.delta.chunks_exact(layer.outputs) {
                for (b, d) in gb.iter_mut().zip(row) {
                    *b += d;
                }
            }
            if l > 0 {
                cache.delta_prev.resize(n * layer.inputs, 0.0);
                gemm(
                    n,
                    layer.outputs,
                    layer.inputs,
                    &cache.delta,
                    false,
                    &layer.weight,
                    true,
                    0.0,
                    &mut cache.delta_prev,
                );
                activation::backprop(self.activation, &cache.pre[l - 1], &mut cache.delta_prev);
                std::mem::swap(&mut cache.delta, &mut cache.delta_prev);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::super::Head;
    use super::*;

    fn loss_of(mlp: &Mlp, head: Head, x: &[f32], y: &[f32], n: usize) -> f64 {
        head.loss(&mlp.predict(x, n), y, n)
    }

    /// A network and inputs whose hidden pre-activations all stay clear of
    /// ReLU's kink, where finite differences would measure a one-sided slope.
    fn away_from_kinks(outputs: usize, n: usize, act: Activation) -> (Mlp, Vec<f32>) {
        for seed in 0.. {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut mlp = Mlp::new(4, &[6, 3], outputs, &mut rng).with_activation(act);
            for layer in &mut mlp.layers {
                layer.bias.iter_mut().for_each(|b| *b = rng.random_range(-0.3..0.3));
            }
            let x: Vec<f32> = (0..n * 4).map(|_| rng.random_range(-1.0..1.0)).collect();
            let mut cache = ForwardCache::default();
            mlp.forward(&x, n, &mut cache);
            let hidden = &cache.pre[..cache.pre.len() - 1];
            if hidden.iter().flatten().all(|z| z.abs() > 0.02) {
                return (mlp, x);
            }
        }
        unreachable!("some seed always works")
    }

    /// Central finite differences in f64 over an f32 network: compare with a
    /// tolerance that reflects f32 rounding.
    fn check_gradients(head: Head, y: Vec<f32>, act: Activation) {
        let n = 5;
        let (mut mlp, x) = away_from_kinks(head.outputs(), n, act);
        let mut cache = ForwardCache::default();
        mlp.forward(&x, n, &mut cache);
        let mut d = vec![0.0; n * head.outputs()];
        head.loss_and_grad(cache.logits(), &y, n, &mut d);
        let mut grads = Gradients::zeros_like(&mlp);
        mlp.backward(&x, n, &mut cache, &d, &mut grads);

        let eps = 1e-3f32;
        for l in 0..mlp.layers.len() {
            for i in 0..mlp.layers[l].weight.len() + mlp.layers[l].bias.len() {
                let nw = mlp.layers[l].weight.len();
                let param = |m: &mut Mlp| -> *mut f32 {
                    if i < nw {
                        &mut m.layers[l].weight[i]
                    } else {
                        &mut m.layers[l].bias[i - nw]
                    }
                };
                // SAFETY: the pointer is into `mlp`, used before `mlp` is touched again.
                let orig = unsafe { *param(&mut mlp) };
                unsafe { *param(&mut mlp) = orig + eps };
                let up = loss_of(&mlp, head, &x, &y, n);
                unsafe { *param(&mut mlp) = orig - eps };
                let down = loss_of(&mlp, head, &x, &y, n);
                unsafe { *param(&mut mlp) = orig };
                let numeric = (up - down) / (2.0 * eps as f64);
                let analytic = if i < nw { grads.layers[l].0[i] } else { grads.layers[l].1[i - nw] } as f64;
                let tol = 2e-3 + 2e-2 * numeric.abs().max(analytic.abs());
                assert!(
                    (numeric - analytic).abs() <= tol,
                    "{head:?} layer {l} param {i}: numeric {numeric} analytic {analytic}"
                );
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences_for_every_head_and_activation() {
        for act in [Activation::Relu, Activation::Gelu, Activation::Silu, Activation::Tanh] {
            check_gradients(Head::Binary, vec![1.0, 0.0, 1.0, 1.0, 0.0], act);
            check_gradients(Head::Multiclass(3), vec![0.0, 2.0, 1.0, 2.0, 0.0], act);
            check_gradients(Head::Regression, vec![0.5, -1.0, 2.0, 0.0, 0.3], act);
        }
    }

    #[test]
    fn a_network_without_hidden_layers_is_linear() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mlp = Mlp::new(2, &[], 1, &mut rng);
        let w = &mlp.layers[0].weight;
        let out = mlp.predict(&[1.0, 2.0], 1);
        assert!((out[0] - (w[0] + 2.0 * w[1])).abs() < 1e-6);
    }
}

#[cfg(test)]
mod predictor_tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    #[test]
    fn threaded_prediction_equals_single_threaded() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mlp = Mlp::new(6, &[16, 8], 3, &mut rng);
        let n = 101;
        let x: Vec<f32> = (0..n * 6).map(|_| rng.random_range(-1.0..1.0)).collect();
        let one = mlp.predict(&x, n);
        for threads in [1, 2, 3] {
            let mut out = Vec::new();
            let mut p = Predictor::new(&mlp, threads);
            p.predict(&x, n, &mut out);
            p.predict(&x[..6 * 7], 7, &mut out);
            assert_eq!(&out[..n * 3], &one[..], "{threads} threads");
            assert_eq!(&out[n * 3..], &one[..7 * 3]);
        }
    }
}
