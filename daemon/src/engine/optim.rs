//! Adam with decoupled weight decay (AdamW when `weight_decay > 0`).

use super::mlp::{Gradients, Mlp};

#[derive(Debug, Clone)]
pub struct Adam {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    step: i32,
    m: Vec<(Vec<f32>, Vec<f32>)>,
    v: Vec<(Vec<f32>, Vec<f32>)>,
}

impl Adam {
    pub fn new(mlp: &Mlp, weight_decay: f32) -> Adam {
        let zeros = Gradients::zeros_like(mlp).layers;
        Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay, step: 0, m: zeros.clone(), v: zeros }
    }

    pub fn step(&mut self, mlp: &mut Mlp, grads: &Gradients, lr: f32) {
        self.step += 1;
        let c1 = 1.0 - self.beta1.powi(self.step);
        let c2 = 1.0 - self.beta2.powi(self.step);
        let (b1, b2, eps) = (self.beta1, self.beta2, self.eps);
        let decay = 1.0 - lr * self.weight_decay;
        for (l, layer) in mlp.layers.iter_mut().enumerate() {
            let (gw, gb) = &grads.layers[l];
            let (mw, mb) = &mut self.m[l];
            let (vw, vb) = &mut self.v[l];
            // Decay applies to weights only, never to biases.
            let update = |p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], decay: f32| {
                for (((p, g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    *p = *p * decay - lr * (*m / c1) / ((*v / c2).sqrt() + eps);
                }
            };
            update(&mut layer.weight, gw, mw, vw, decay);
            update(&mut layer.bias, gb, mb, vb, 1.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::super::{ForwardCache, Head};
    use super::*;

    #[test]
    fn adam_fits_a_linear_target() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut mlp = Mlp::new(2, &[], 1, &mut rng);
        let mut opt = Adam::new(&mlp, 0.0);
        let x = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 2.0, -1.0];
        let y = [3.0, -2.0, 1.0, 8.0];
        let mut cache = ForwardCache::default();
        let mut grads = Gradients::zeros_like(&mlp);
        let mut d = [0.0; 4];
        let mut loss = f64::MAX;
        for _ in 0..2000 {
            mlp.forward(&x, 4, &mut cache);
            loss = Head::Regression.loss_and_grad(cache.logits(), &y, 4, &mut d);
            mlp.backward(&x, 4, &mut cache, &d, &mut grads);
            opt.step(&mut mlp, &grads, 0.05);
        }
        assert!(loss < 1e-4, "loss {loss}");
        assert!((mlp.layers[0].weight[0] - 3.0).abs() < 0.05 && (mlp.layers[0].weight[1] + 2.0).abs() < 0.05);
    }
}
