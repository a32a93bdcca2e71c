//! Output heads: how logits become a loss and predictions.

/// The head of a network, fixed by the task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// One logit; sigmoid + binary cross-entropy. Targets are 0 or 1.
    Binary,
    /// One logit per class; softmax + cross-entropy. Targets are class indexes.
    Multiclass(usize),
    /// One output; mean squared error on a standardised target.
    Regression,
}

impl Head {
    pub fn outputs(self) -> usize {
        match self {
            Head::Binary | Head::Regression => 1,
            Head::Multiclass(c) => c,
        }
    }

    /// Mean loss over `n` rows; `grad` receives d(mean loss)/d(logits).
    pub fn loss_and_grad(self, logits: &[f32], targets: &[f32], n: usize, grad: &mut [f32]) -> f64 {
        let inv_n = 1.0 / n.max(1) as f32;
        let mut total = 0.0f64;
        match self {
            Head::Binary => {
                for ((z, y), g) in logits.iter().zip(targets).zip(grad.iter_mut()) {
                    total += bce_with_logits(*z, *y) as f64;
                    *g = (sigmoid(*z) - y) * inv_n;
                }
            }
            Head::Multiclass(c) => {
                for ((row, y), g) in logits.chunks_exact(c).zip(targets).zip(grad.chunks_exact_mut(c)) {
                    softmax_into(row, g);
                    let k = *y as usize;
                    total -= (g[k].max(f32::MIN_POSITIVE) as f64).ln();
                    g[k] -= 1.0;
                    g.iter_mut().for_each(|v| *v *= inv_n);
                }
            }
            Head::Regression => {
                for ((z, y), g) in logits.iter().zip(targets).zip(grad.iter_mut()) {
                    let d = z - y;
                    total += (d * d) as f64;
                    *g = 2.0 * d * inv_n;
                }
            }
        }
        total / n.max(1) as f64
    }

    /// Mean loss without gradients (validation).
    pub fn loss(self, logits: &[f32], targets: &[f32], n: usize) -> f64 {
        let mut scratch = vec![0.0; logits.len()];
        self.loss_and_grad(logits, targets, n, &mut scratch)
    }
}

pub fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

/// Stable `log(1 + e^z) - y·z`.
fn bce_with_logits(z: f32, y: f32) -> f32 {
    z.max(0.0) - z * y + (-z.abs()).exp().ln_1p()
}

pub fn softmax_into(logits: &[f32], out: &mut [f32]) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for (o, z) in out.iter_mut().zip(logits) {
        *o = (z - max).exp();
        sum += *o;
    }
    out.iter_mut().for_each(|o| *o /= sum);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_loss_is_stable_for_large_logits() {
        let l = Head::Binary.loss(&[100.0, -100.0], &[1.0, 0.0], 2);
        assert!(l.is_finite() && l < 1e-6);
        let l = Head::Binary.loss(&[100.0], &[0.0], 1);
        assert!((l - 100.0).abs() < 1e-3);
    }

    #[test]
    fn cross_entropy_of_uniform_logits_is_log_c() {
        let l = Head::Multiclass(4).loss(&[0.0; 4], &[2.0], 1);
        assert!((l - 4f64.ln()).abs() < 1e-6);
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut out = [0.0; 3];
        softmax_into(&[1000.0, 1001.0, 999.0], &mut out);
        assert!((out.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(out[1] > out[0] && out[0] > out[2]);
    }
}
