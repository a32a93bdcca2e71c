//! Optimisers over a [`Stack`]: Adam, AdamW and SGD with momentum, with an
//! optional global-norm gradient clip. Every model of the stack has its own
//! learning rate, weight decay, momentum, clip and step count; an inactive
//! model is left untouched. Weight decay applies to weights, not biases.

use cerebro_shared::spec::Optimizer;

use super::stack::{Slot, Stack, StackGradients};

/// One model's settings for one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelStep {
    pub lr: f32,
    pub weight_decay: f32,
    /// SGD's momentum (ignored by Adam).
    pub momentum: f32,
    /// Largest global gradient norm (0: no clipping).
    pub clip_norm: f32,
}

#[derive(Debug, Clone)]
pub struct StackOptimizer {
    kind: Optimizer,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    steps: Vec<i32>,
    /// The stack's parameter tensors (fixed with its architecture).
    slots: Vec<Slot>,
    /// Adam's first moments, or SGD's momentum buffers.
    m: StackGradients,
    /// Adam's second moments.
    v: StackGradients,
}

impl StackOptimizer {
    pub fn new(stack: &Stack, kind: Optimizer) -> StackOptimizer {
        StackOptimizer {
            kind,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            steps: vec![0; stack.k],
            slots: stack.arch.slots(),
            m: stack.zero_gradients(),
            v: stack.zero_gradients(),
        }
    }

    /// Global L2 norm of one model's gradient.
    fn norm(slots: &[Slot], grads: &StackGradients, model: usize) -> f32 {
        let mut sum = 0.0f64;
        for (g, slot) in grads.params.iter().zip(slots) {
            let run = &g[model * slot.len..(model + 1) * slot.len];
            sum += run.iter().map(|g| (*g as f64) * (*g as f64)).sum::<f64>();
        }
        sum.sqrt() as f32
    }

    /// One step for every model `i` with `active[i]`, with `settings[i]`.
    pub fn step(&mut self, stack: &mut Stack, grads: &StackGradients, settings: &[ModelStep], active: &[bool]) {
        let slots = &self.slots;
        for model in (0..stack.k).filter(|&m| active[m]) {
            let s = settings[model];
            let scale = if s.clip_norm > 0.0 {
                let norm = Self::norm(slots, grads, model);
                if norm.is_finite() && norm > s.clip_norm {
                    s.clip_norm / norm
                } else {
                    1.0
                }
            } else {
                1.0
            };
            self.steps[model] += 1;
            let t = self.steps[model];
            let (b1, b2, eps) = (self.beta1, self.beta2, self.eps);
            let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
            let rule = Rule { kind: self.kind, b1, b2, eps, c1, c2, scale, lr: s.lr, momentum: s.momentum };
            for (s_idx, slot) in slots.iter().enumerate() {
                let r = model * slot.len..(model + 1) * slot.len;
                rule.apply(
                    &mut stack.params[s_idx][r.clone()],
                    &grads.params[s_idx][r.clone()],
                    &mut self.m.params[s_idx][r.clone()],
                    &mut self.v.params[s_idx][r],
                    if slot.decay { s.weight_decay } else { 0.0 },
                );
            }
        }
    }
}

/// One model's update rule for one step, with its bias corrections.
#[derive(Clone, Copy)]
struct Rule {
    kind: Optimizer,
    b1: f32,
    b2: f32,
    eps: f32,
    c1: f32,
    c2: f32,
    /// The gradient clip's factor (1: none).
    scale: f32,
    lr: f32,
    momentum: f32,
}

impl Rule {
    /// Updates `p` (with moments `m`, `v`) from gradient `g`; `wd` is 0 for
    /// biases. The loops are elementwise and memory-bound, so they run in the
    /// widest vectors the CPU has: the same operations in the same order at
    /// every width (no fused multiply-add is formed), so results do not
    /// depend on the machine.
    fn apply(self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], wd: f32) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F, checked just above.
                return unsafe { self.apply_avx512(p, g, m, v, wd) };
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2, checked just above.
                return unsafe { self.apply_avx2(p, g, m, v, wd) };
            }
        }
        self.apply_portable(p, g, m, v, wd)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn apply_avx512(self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], wd: f32) {
        self.apply_portable(p, g, m, v, wd)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn apply_avx2(self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], wd: f32) {
        self.apply_portable(p, g, m, v, wd)
    }

    /// One loop per kind, so each stays branch-free and vectorises.
    #[inline(always)]
    fn apply_portable(self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], wd: f32) {
        let Rule { kind, b1, b2, eps, c1, c2, scale, lr, momentum } = self;
        let elements = p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut());
        match kind {
            Optimizer::Adam => elements.for_each(|(((p, g), m), v)| {
                let g = g * scale + wd * *p;
                *m = b1 * *m + (1.0 - b1) * g;
                *v = b2 * *v + (1.0 - b2) * g * g;
                *p -= lr * (*m / c1) / ((*v / c2).sqrt() + eps);
            }),
            Optimizer::AdamW => {
                let decay = 1.0 - lr * wd;
                elements.for_each(|(((p, g), m), v)| {
                    let g = g * scale;
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    *p = *p * decay - lr * (*m / c1) / ((*v / c2).sqrt() + eps);
                })
            }
            Optimizer::Sgd => elements.for_each(|(((p, g), m), _)| {
                *m = momentum * *m + g * scale + wd * *p;
                *p -= lr * *m;
            }),
        }
    }
}

/// The learning rate at 0-based `step` of `total` (and `warmup`) steps.
pub fn scheduled_lr(
    schedule: cerebro_shared::spec::Schedule,
    base: f32,
    step: usize,
    total: usize,
    warmup: usize,
) -> f32 {
    use cerebro_shared::spec::Schedule;
    let cosine = |done: usize, span: usize| {
        let progress = (done as f64 / span.max(1) as f64).min(1.0);
        (base as f64 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())) as f32
    };
    match schedule {
        Schedule::Constant => base,
        Schedule::Cosine => cosine(step, total),
        Schedule::Warmup if step < warmup => base * (step + 1) as f32 / warmup as f32,
        Schedule::Warmup => cosine(step - warmup, total.saturating_sub(warmup)),
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::super::stack::{Arch, Batch, Mode};
    use super::super::{Activation, Head, Loss, StackCache};
    use super::*;

    fn linear() -> Stack {
        Stack::new(Arch::mlp(2, &[], 1, Activation::Relu), 0, &mut [ChaCha8Rng::seed_from_u64(0)])
    }

    fn fit(kind: Optimizer, lr: f32, clip_norm: f32) -> (f64, Stack) {
        let mut stack = linear();
        let mut opt = StackOptimizer::new(&stack, kind);
        let x = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 2.0, -1.0];
        let y = [3.0, -2.0, 1.0, 8.0];
        let mut cache = StackCache::default();
        let mut grads = stack.zero_gradients();
        let mut d = [0.0; 4];
        let mut loss = f64::MAX;
        let settings = [ModelStep { lr, weight_decay: 0.0, momentum: 0.9, clip_norm }];
        for _ in 0..2000 {
            let batch = Batch { x: &x, codes: &[], n: 4 };
            stack.forward(batch, &mut cache, Mode::Train { step: 0, row_offset: 0 });
            loss = Loss::new(Head::Regression).loss_and_grad(cache.logits(), &y, 4, &mut d);
            stack.backward(batch, &mut cache, &d, &mut grads);
            opt.step(&mut stack, &grads, &settings, &[true]);
        }
        (loss, stack.model(0))
    }

    #[test]
    fn every_optimizer_fits_a_linear_target() {
        for (kind, lr) in [(Optimizer::Adam, 0.05), (Optimizer::AdamW, 0.05), (Optimizer::Sgd, 0.01)] {
            let (loss, model) = fit(kind, lr, 0.0);
            assert!(loss < 1e-4, "{kind:?}: loss {loss}");
            let w = &model.params[0];
            assert!((w[0] - 3.0).abs() < 0.05 && (w[1] + 2.0).abs() < 0.05, "{kind:?}: {w:?}");
        }
    }

    #[test]
    fn clipping_bounds_each_step() {
        // SGD without momentum moves by exactly lr × clipped gradient.
        let mut stack = linear();
        let before = stack.model(0);
        let grads = StackGradients { params: vec![vec![30.0, 40.0], vec![0.0]] };
        let mut opt = StackOptimizer::new(&stack, Optimizer::Sgd);
        let s = ModelStep { lr: 1.0, weight_decay: 0.0, momentum: 0.0, clip_norm: 5.0 };
        opt.step(&mut stack, &grads, &[s], &[true]);
        let after = stack.model(0);
        let moved: Vec<f32> = before.params[0].iter().zip(&after.params[0]).map(|(a, b)| a - b).collect();
        assert!((moved[0] - 3.0).abs() < 1e-5 && (moved[1] - 4.0).abs() < 1e-5, "{moved:?}");
    }

    #[test]
    fn schedules() {
        use cerebro_shared::spec::Schedule;
        assert_eq!(scheduled_lr(Schedule::Constant, 0.1, 50, 100, 0), 0.1);
        assert!((scheduled_lr(Schedule::Cosine, 0.1, 0, 100, 0) - 0.1).abs() < 1e-7);
        assert!((scheduled_lr(Schedule::Cosine, 0.1, 50, 100, 0) - 0.05).abs() < 1e-7);
        assert!(scheduled_lr(Schedule::Cosine, 0.1, 100, 100, 0).abs() < 1e-7);
        assert!((scheduled_lr(Schedule::Warmup, 0.1, 0, 100, 10) - 0.01).abs() < 1e-7);
        assert!((scheduled_lr(Schedule::Warmup, 0.1, 9, 100, 10) - 0.1).abs() < 1e-7);
        assert!((scheduled_lr(Schedule::Warmup, 0.1, 10, 100, 10) - 0.1).abs() < 1e-7);
        assert!((scheduled_lr(Schedule::Warmup, 0.1, 55, 100, 10) - 0.05).abs() < 1e-7);
    }
}
