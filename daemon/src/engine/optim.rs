//! Adam with decoupled weight decay (AdamW when `weight_decay > 0`).

use super::stack::{Stack, StackGradients};

/// Adam(W) over a [`Stack`]: every model has its own learning rate, weight
/// decay and step count, and an inactive model is left untouched.
#[derive(Debug, Clone)]
pub struct StackAdam {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    steps: Vec<i32>,
    m: StackGradients,
    v: StackGradients,
}

impl StackAdam {
    pub fn new(stack: &Stack) -> StackAdam {
        StackAdam {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            steps: vec![0; stack.k],
            m: stack.zero_gradients(),
            v: stack.zero_gradients(),
        }
    }

    /// One step for every model `i` with `active[i]`, at `lr[i]` and decay `wd[i]`.
    pub fn step(&mut self, stack: &mut Stack, grads: &StackGradients, lr: &[f32], wd: &[f32], active: &[bool]) {
        let k = stack.k;
        let (b1, b2, eps) = (self.beta1, self.beta2, self.eps);
        for model in 0..k {
            if !active[model] {
                continue;
            }
            self.steps[model] += 1;
            let t = self.steps[model];
            let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
            let lr = lr[model];
            let decay = 1.0 - lr * wd[model];
            let update = |p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], decay: f32| {
                for (((p, g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    *p = *p * decay - lr * (*m / c1) / ((*v / c2).sqrt() + eps);
                }
            };
            for l in 0..stack.weights.len() {
                let (rows, cols) = (stack.dims[l], stack.dims[l + 1]);
                // This model's weights: `runs` runs of `len` elements, `stride` apart.
                let (first, len, stride, runs) = if l == 0 {
                    (model * cols, cols, k * cols, rows)
                } else {
                    (model * rows * cols, rows * cols, 0, 1)
                };
                for run in 0..runs {
                    let r = first + run * stride..first + run * stride + len;
                    update(
                        &mut stack.weights[l][r.clone()],
                        &grads.weights[l][r.clone()],
                        &mut self.m.weights[l][r.clone()],
                        &mut self.v.weights[l][r],
                        decay,
                    );
                }
                let r = model * cols..(model + 1) * cols;
                update(
                    &mut stack.biases[l][r.clone()],
                    &grads.biases[l][r.clone()],
                    &mut self.m.biases[l][r.clone()],
                    &mut self.v.biases[l][r],
                    1.0,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::super::{Head, StackCache};
    use super::*;
    use crate::engine::Mlp;

    #[test]
    fn adam_fits_a_linear_target() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut stack = Stack::from_models(&[Mlp::new(2, &[], 1, &mut rng)]);
        let mut opt = StackAdam::new(&stack);
        let x = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 2.0, -1.0];
        let y = [3.0, -2.0, 1.0, 8.0];
        let mut cache = StackCache::default();
        let mut grads = stack.zero_gradients();
        let mut d = [0.0; 4];
        let mut loss = f64::MAX;
        for _ in 0..2000 {
            stack.forward(&x, 4, &mut cache);
            loss = Head::Regression.loss_and_grad(cache.logits(), &y, 4, &mut d);
            stack.backward(&x, 4, &mut cache, &d, &mut grads);
            opt.step(&mut stack, &grads, &[0.05], &[0.0], &[true]);
        }
        assert!(loss < 1e-4, "loss {loss}");
        let w = &stack.model(0).layers[0].weight;
        assert!((w[0] - 3.0).abs() < 0.05 && (w[1] + 2.0).abs() < 0.05);
    }
}
