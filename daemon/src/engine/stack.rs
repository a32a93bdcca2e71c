//! K networks of one shape trained together, one pass over the data for all.
//!
//! Model selection trains many small networks on the same rows. Running them
//! one after another launches many small matrix products; a stack runs them
//! as one computation instead:
//!
//! - the first layer of all K models is one wide product
//!   `X [n × in] · W0 [in × K·h0]` (model k owns columns `k·h0 .. (k+1)·h0`);
//! - every later layer is block-diagonal: K products on strided views of the
//!   same activation matrix, with no copies;
//! - activations of all models live side by side in `[n × K·h]` matrices.
//!
//! Each model keeps its own initialisation (its own seed) and learning rate,
//! and, because every product sums in the same order whatever K is, a model
//! trained in a stack ends bit-identical to the same model trained alone.

use rand::Rng;

use super::activation::{self, Activation};
use super::gemm::gemm_strided;
use super::mlp::{Dense, Mlp};

#[derive(Debug, Clone, PartialEq)]
pub struct Stack {
    pub k: usize,
    /// Layer widths, input first: `[in, h0, h1, ..., out]`.
    pub dims: Vec<usize>,
    /// Layer 0: `[in × K·dims[1]]` row-major. Layer l ≥ 1: K blocks of
    /// `[dims[l] × dims[l+1]]`, model after model.
    pub weights: Vec<Vec<f32>>,
    /// `[K·dims[l+1]]`, model after model.
    pub biases: Vec<Vec<f32>>,
    pub activation: Activation,
}

/// Activations of the last forward pass, kept for the backward pass.
#[derive(Debug, Default)]
pub struct StackCache {
    /// Pre-activation of every layer, `[n × K·dims[l+1]]`.
    pre: Vec<Vec<f32>>,
    /// Post-ReLU activation of every hidden layer.
    post: Vec<Vec<f32>>,
    delta: Vec<f32>,
    delta_prev: Vec<f32>,
}

impl StackCache {
    /// Logits of all models, `[n × K·out]`.
    pub fn logits(&self) -> &[f32] {
        self.pre.last().map_or(&[], |v| v.as_slice())
    }
}

/// Gradients shaped like the stack's parameters.
#[derive(Debug, Clone)]
pub struct StackGradients {
    pub weights: Vec<Vec<f32>>,
    pub biases: Vec<Vec<f32>>,
}

impl Stack {
    /// K models of shape `dims`, model k initialised from `rngs[k]` exactly as
    /// [`Mlp::new`] would initialise it alone.
    pub fn new<R: Rng>(dims: &[usize], activation: Activation, rngs: &mut [R]) -> Stack {
        let singles: Vec<Mlp> = rngs
            .iter_mut()
            .map(|r| Mlp::new(dims[0], &dims[1..dims.len() - 1], dims[dims.len() - 1], r).with_activation(activation))
            .collect();
        Stack::from_models(&singles)
    }

    /// Stacks models of identical shape and activation.
    pub fn from_models(models: &[Mlp]) -> Stack {
        assert!(models.iter().all(|m| m.activation == models[0].activation), "one activation per stack");
        let k = models.len();
        let first = &models[0];
        let mut dims = vec![first.input_dim()];
        dims.extend(first.layers.iter().map(|l| l.outputs));
        let mut weights = Vec::new();
        let mut biases = Vec::new();
        for l in 0..first.layers.len() {
            let (rows, cols) = (dims[l], dims[l + 1]);
            let mut w = vec![0.0; rows * cols * k];
            if l == 0 {
                for (m, model) in models.iter().enumerate() {
                    for i in 0..rows {
                        w[i * k * cols + m * cols..i * k * cols + (m + 1) * cols]
                            .copy_from_slice(&model.layers[0].weight[i * cols..(i + 1) * cols]);
                    }
                }
            } else {
                for (m, model) in models.iter().enumerate() {
                    w[m * rows * cols..(m + 1) * rows * cols].copy_from_slice(&model.layers[l].weight);
                }
            }
            weights.push(w);
            biases.push(models.iter().flat_map(|m| m.layers[l].bias.iter().copied()).collect());
        }
        Stack { k, dims, weights, biases, activation: first.activation }
    }

    /// Model `m` on its own.
    pub fn model(&self, m: usize) -> Mlp {
        let k = self.k;
        let layers = (0..self.weights.len())
            .map(|l| {
                let (rows, cols) = (self.dims[l], self.dims[l + 1]);
                let weight = if l == 0 {
                    (0..rows)
                        .flat_map(|i| {
                            self.weights[0][i * k * cols + m * cols..i * k * cols + (m + 1) * cols].iter().copied()
                        })
                        .collect()
                } else {
                    self.weights[l][m * rows * cols..(m + 1) * rows * cols].to_vec()
                };
                Dense { inputs: rows, outputs: cols, weight, bias: self.biases[l][m * cols..(m + 1) * cols].to_vec() }
            })
            .collect();
        Mlp { layers, activation: self.activation }
    }

    pub fn outputs(&self) -> usize {
        *self.dims.last().expect("a stack has layers")
    }

    pub fn zero_gradients(&self) -> StackGradients {
        StackGradients {
            weights: self.weights.iter().map(|w| vec![0.0; w.len()]).collect(),
            biases: self.biases.iter().map(|b| vec![0.0; b.len()]).collect(),
        }
    }

    /// Runs `n` rows of `x` (`n × dims[0]`) through every model.
    pub fn forward(&self, x: &[f32], n: usize, cache: &mut StackCache) {
        let (k, depth) = (self.k, self.weights.len());
        cache.pre.resize_with(depth, Vec::new);
        cache.post.resize_with(depth - 1, Vec::new);
        for l in 0..depth {
            let (rows, cols) = (self.dims[l], self.dims[l + 1]);
            let wide = k * cols;
            let z = &mut cache.pre[l];
            z.resize(n * wide, 0.0);
            for row in z.chunks_exact_mut(wide) {
                row.copy_from_slice(&self.biases[l]);
            }
            if l == 0 {
                gemm_strided(n, rows, wide, x, (rows, 1), &self.weights[0], (wide, 1), 1.0, z, (wide, 1));
            } else {
                let input = &cache.post[l - 1];
                let in_wide = k * rows;
                for m in 0..k {
                    gemm_strided(
                        n,
                        rows,
                        cols,
                        &input[m * rows..],
                        (in_wide, 1),
                        &self.weights[l][m * rows * cols..],
                        (cols, 1),
                        1.0,
                        &mut z[m * cols..],
                        (wide, 1),
                    );
                }
            }
            if l + 1 < depth {
                let a = &mut cache.post[l];
                a.resize(z.len(), 0.0);
                activation::apply(self.activation, z, a);
            }
        }
    }

    /// Back-propagates `d_logits` (`n × K·out`) through the activations of the
    /// last [`Stack::forward`] on the same `x`, overwriting `grads`.
    pub fn backward(&self, x: &[f32], n: usize, cache: &mut StackCache, d_logits: &[f32], grads: &mut StackGradients) {
        let (k, depth) = (self.k, self.weights.len());
        cache.delta.clear();
        cache.delta.extend_from_slice(d_logits);
        for l in (0..depth).rev() {
            let (rows, cols) = (self.dims[l], self.dims[l + 1]);
            let wide = k * cols;
            let gb = &mut grads.biases[l];
            gb.fill(0.0);
            for row in cache.delta.chunks_exact(wide) {
                for (b, d) in gb.iter_mut().zip(row) {
                    *b += d;
                }
            }
            if l == 0 {
                gemm_strided(
                    rows,
                    n,
                    wide,
                    x,
                    (1, rows),
                    &cache.delta,
                    (wide, 1),
                    0.0,
                    &mut grads.weights[0],
                    (wide, 1),
                );
                break;
            }
            let input = &cache.post[l - 1];
            let in_wide = k * rows;
            for m in 0..k {
                gemm_strided(
                    rows,
                    n,
                    cols,
                    &input[m * rows..],
                    (1, in_wide),
                    &cache.delta[m * cols..],
                    (wide, 1),
                    0.0,
                    &mut grads.weights[l][m * rows * cols..],
                    (cols, 1),
                );
            }
            cache.delta_prev.resize(n * in_wide, 0.0);
            for m in 0..k {
                gemm_strided(
                    n,
                    cols,
                    rows,
                    &cache.delta[m * cols..],
                    (wide, 1),
                    &self.weights[l][m * rows * cols..],
                    (1, cols),
                    0.0,
                    &mut cache.delta_prev[m * rows..],
                    (in_wide, 1),
                );
            }
            activation::backprop(self.activation, &cache.pre[l - 1], &mut cache.delta_prev);
            std::mem::swap(&mut cache.delta, &mut cache.delta_prev);
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::super::{ForwardCache, Gradients, Head};
    use super::*;

    #[test]
    fn stacking_round_trips_models() {
        let models: Vec<Mlp> = (0..3).map(|s| Mlp::new(5, &[4, 3], 2, &mut ChaCha8Rng::seed_from_u64(s))).collect();
        let stack = Stack::from_models(&models);
        for (m, model) in models.iter().enumerate() {
            assert_eq!(&stack.model(m), model);
        }
    }

    /// Every model's logits and gradients in a stack are bit-identical to the
    /// same model's computed alone (whose gradients the finite-difference
    /// tests check).
    #[test]
    fn a_stack_computes_exactly_what_its_models_compute_alone() {
        let (n, k, head) = (7, 3, Head::Multiclass(2));
        let mut rngs: Vec<ChaCha8Rng> = (0..k as u64).map(ChaCha8Rng::seed_from_u64).collect();
        let stack = Stack::new(&[5, 8, 4, 2], Activation::Gelu, &mut rngs);
        let mut rng = ChaCha8Rng::seed_from_u64(99);
        let x: Vec<f32> = (0..n * 5).map(|_| rng.random_range(-1.0..1.0)).collect();
        let y: Vec<f32> = (0..n).map(|i| (i % 2) as f32).collect();

        let mut cache = StackCache::default();
        stack.forward(&x, n, &mut cache);
        let wide = cache.logits().to_vec();
        let mut d_wide = vec![0.0; n * k * 2];
        let mut alone_grads = Vec::new();
        for m in 0..k {
            let model = stack.model(m);
            let mut c = ForwardCache::default();
            model.forward(&x, n, &mut c);
            for r in 0..n {
                assert_eq!(&wide[r * k * 2 + m * 2..r * k * 2 + m * 2 + 2], &c.logits()[r * 2..r * 2 + 2]);
            }
            let mut d = vec![0.0; n * 2];
            head.loss_and_grad(c.logits(), &y, n, &mut d);
            for r in 0..n {
                d_wide[r * k * 2 + m * 2..r * k * 2 + m * 2 + 2].copy_from_slice(&d[r * 2..r * 2 + 2]);
            }
            let mut g = Gradients::zeros_like(&model);
            model.backward(&x, n, &mut c, &d, &mut g);
            alone_grads.push(g);
        }
        let mut grads = stack.zero_gradients();
        stack.backward(&x, n, &mut cache, &d_wide, &mut grads);
        let as_stack = Stack {
            k,
            dims: stack.dims.clone(),
            weights: grads.weights.clone(),
            biases: grads.biases.clone(),
            activation: stack.activation,
        };
        for (m, g) in alone_grads.iter().enumerate() {
            let model_grads = as_stack.model(m);
            for (l, (gw, gb)) in g.layers.iter().enumerate() {
                assert_eq!(&model_grads.layers[l].weight, gw, "model {m} layer {l} weights");
                assert_eq!(&model_grads.layers[l].bias, gb, "model {m} layer {l} biases");
            }
        }
    }
}
