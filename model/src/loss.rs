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
}

/// A head with its loss settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Loss {
    pub head: Head,
    /// Classification: one weight per class (empty: all 1). The loss is
    /// `Σ w_y·l / Σ w_y` over the batch, as PyTorch's weighted cross-entropy.
    pub class_weights: Vec<f32>,
    /// Regression: Huber's threshold on the standardised target (0: squared error).
    pub huber_delta: f32,
    /// Classification: label smoothing ε (0: none). Binary rows learn the
    /// target `y(1 - ε) + ε/2`. Multiclass rows learn `(1 - ε)·onehot + ε/K`
    /// as PyTorch's `cross_entropy(weight=w, label_smoothing=ε)` does: a
    /// row's loss is `(1 - ε)·w_y·(-ln p_y) + (ε/K)·Σ_j w_j·(-ln p_j)`, each
    /// smoothing term weighed by its own class. Class weights still pick the
    /// denominator by each row's class.
    pub label_smoothing: f32,
}

impl Loss {
    pub fn new(head: Head) -> Loss {
        Loss { head, class_weights: Vec::new(), huber_delta: 0.0, label_smoothing: 0.0 }
    }

    fn weight(&self, class: f32) -> f32 {
        self.class_weights.get(class as usize).copied().unwrap_or(1.0)
    }

    /// What a batch's summed loss is divided by: the sum of its rows'
    /// class weights (classification) or its row count (regression).
    pub fn denominator(&self, targets: &[f32]) -> f32 {
        let d = match self.head {
            Head::Binary | Head::Multiclass(_) => targets.iter().map(|&y| self.weight(y)).sum(),
            Head::Regression => targets.len() as f32,
        };
        if d > 0.0 {
            d
        } else {
            1.0
        }
    }

    /// Loss over `n` rows; `grad` receives d(loss)/d(logits).
    pub fn loss_and_grad(&self, logits: &[f32], targets: &[f32], n: usize, grad: &mut [f32]) -> f64 {
        let denominator = self.denominator(&targets[..n]);
        self.sum_and_grad(logits, &targets[..n], grad, 1.0 / denominator) / denominator as f64
    }

    /// The summed (weighted) loss of some rows of a batch; `grad` receives
    /// its gradient times `inv_denominator`, one over the whole batch's
    /// [`Loss::denominator`]. Parts of a batch computed apart add up to the
    /// whole batch's loss and gradient.
    pub fn sum_and_grad(&self, logits: &[f32], targets: &[f32], grad: &mut [f32], inv_denominator: f32) -> f64 {
        let mut total = 0.0f64;
        let inv = inv_denominator;
        match self.head {
            Head::Multiclass(c) if self.label_smoothing > 0.0 => {
                let eps = self.label_smoothing;
                let spread = eps / c as f32;
                let weights: Vec<f32> = (0..c).map(|j| self.weight(j as f32)).collect();
                let total_weight: f32 = weights.iter().sum();
                for ((row, y), g) in logits.chunks_exact(c).zip(targets).zip(grad.chunks_exact_mut(c)) {
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0.0f32;
                    for (g, z) in g.iter_mut().zip(row) {
                        *g = (z - max).exp();
                        sum += *g;
                    }
                    let ln_sum = sum.ln();
                    let k = *y as usize;
                    let on_target = (1.0 - eps) * weights[k];
                    // d(loss)/dz = (a + (ε/K)·Σw)·p - a·onehot - (ε/K)·w, a = (1 - ε)·w_y.
                    let scale = on_target + spread * total_weight;
                    let mut row_loss = 0.0f32;
                    for (j, (g, z)) in g.iter_mut().zip(row).enumerate() {
                        let neg_log_p = -(z - max - ln_sum);
                        let here = if j == k { on_target } else { 0.0 } + spread * weights[j];
                        row_loss += here * neg_log_p;
                        *g = (scale * (*g / sum) - here) * inv;
                    }
                    total += row_loss as f64;
                }
            }
            Head::Multiclass(c) => {
                for ((row, y), g) in logits.chunks_exact(c).zip(targets).zip(grad.chunks_exact_mut(c)) {
                    softmax_into(row, g);
                    let (k, w) = (*y as usize, self.weight(*y));
                    total -= w as f64 * (g[k].max(f32::MIN_POSITIVE) as f64).ln();
                    g[k] -= 1.0;
                    g.iter_mut().for_each(|v| *v *= w * inv);
                }
            }
            Head::Binary => {
                // Sixteen running sums, one per lane, so the loop vectorises;
                // they are added in a fixed order, so the result is deterministic.
                const LANES: usize = 16;
                let mut sums = [0.0f32; LANES];
                // Class weights picked by a select, not an indexed load, so the loop vectorises.
                let (w0, w1) = (self.weight(0.0), self.weight(1.0));
                // The smoothed target; exactly y when ε = 0.
                let (keep, add) = (1.0 - self.label_smoothing, 0.5 * self.label_smoothing);
                let row = |z: f32, y: f32| {
                    let w = if y > 0.5 { w1 } else { w0 };
                    let t = y * keep + add;
                    let (loss, p) = bce_and_sigmoid(z, t);
                    (w * loss, (p - t) * w * inv)
                };
                let body = logits.len() / LANES * LANES;
                for ((z, y), g) in logits[..body]
                    .chunks_exact(LANES)
                    .zip(targets.chunks_exact(LANES))
                    .zip(grad.chunks_exact_mut(LANES))
                {
                    let (z, y, g): (&[f32; LANES], &[f32; LANES], &mut [f32; LANES]) =
                        (z.try_into().unwrap(), y.try_into().unwrap(), g.try_into().unwrap());
                    for l in 0..LANES {
                        let (loss, d) = row(z[l], y[l]);
                        sums[l] += loss;
                        g[l] = d;
                    }
                }
                for (i, (z, y)) in logits.iter().zip(targets).enumerate().skip(body) {
                    let (loss, d) = row(*z, *y);
                    sums[i - body] += loss;
                    grad[i] = d;
                }
                total = sums.iter().map(|&s| s as f64).sum();
            }
            Head::Regression => {
                let delta = self.huber_delta;
                for ((z, y), g) in logits.iter().zip(targets).zip(grad.iter_mut()) {
                    let d = z - y;
                    if delta > 0.0 && d.abs() > delta {
                        total += (delta * (d.abs() - 0.5 * delta)) as f64;
                        *g = delta * d.signum() * inv;
                    } else if delta > 0.0 {
                        total += (0.5 * d * d) as f64;
                        *g = d * inv;
                    } else {
                        total += (d * d) as f64;
                        *g = 2.0 * d * inv;
                    }
                }
            }
        }
        total
    }

    /// The loss without gradients (validation).
    pub fn loss(&self, logits: &[f32], targets: &[f32], n: usize) -> f64 {
        let mut scratch = vec![0.0; logits.len()];
        self.loss_and_grad(logits, targets, n, &mut scratch)
    }
}

pub fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

/// Stable `log(1 + e^z) - y·z` and `sigmoid(z)` from one exponential.
fn bce_and_sigmoid(z: f32, y: f32) -> (f32, f32) {
    let e = exp_nonpositive(-z.abs());
    let p = if z >= 0.0 { 1.0 / (1.0 + e) } else { e / (1.0 + e) };
    (z.max(0.0) - z * y + ln_1p_unit(e), p)
}

/// `e^x` for `x ≤ 0`, within 2 ulp (Cephes' `expf` polynomial), without
/// branches or library calls, so loops over it vectorise. Below -87 it
/// returns `e^-87`.
fn exp_nonpositive(x: f32) -> f32 {
    let x = x.max(-87.0);
    // Round to nearest with the 1.5·2²³ trick (no library call).
    let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 5e-1;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `ln(1 + e)` for `e` in `[0, 1]`, within 2 ulp (Cephes' `logf` polynomial
/// plus the classic correction for the rounding of `1 + e`), branch-free.
fn ln_1p_unit(e: f32) -> f32 {
    let u = 1.0 + e;
    let big = u > std::f32::consts::SQRT_2;
    let (m, k) = if big { (u * 0.5, 1.0) } else { (u, 0.0) };
    let x = m - 1.0;
    let z = x * x;
    let poly = ((((((((7.037_683_6e-2 * x - 1.151_461e-1) * x + 1.167_699_9e-1) * x - 1.242_014_1e-1) * x
        + 1.424_932_3e-1)
        * x
        - 1.666_805_8e-1)
        * x
        + 2.000_071_4e-1)
        * x
        - 2.499_999_4e-1)
        * x
        + 3.333_333e-1)
        * x
        * z;
    let ln_u = x + (poly - k * 2.121_944_4e-4 - 0.5 * z) + k * 0.693_359_4;
    // u - 1 is exact; scaling by e / (u - 1) undoes the rounding of 1 + e.
    if u == 1.0 {
        e
    } else {
        ln_u * (e / (u - 1.0))
    }
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
        let l = Loss::new(Head::Binary).loss(&[100.0, -100.0], &[1.0, 0.0], 2);
        assert!(l.is_finite() && l < 1e-6);
        let l = Loss::new(Head::Binary).loss(&[100.0], &[0.0], 1);
        assert!((l - 100.0).abs() < 1e-3);
    }

    #[test]
    fn cross_entropy_of_uniform_logits_is_log_c() {
        let l = Loss::new(Head::Multiclass(4)).loss(&[0.0; 4], &[2.0], 1);
        assert!((l - 4f64.ln()).abs() < 1e-6);
    }

    /// Finite differences of every loss, weighted and not, in f64.
    #[test]
    fn gradients_match_finite_differences() {
        let logits = [0.3f32, -1.2, 2.0, 0.1, -0.4, 0.9];
        let cases = [
            (Loss::new(Head::Binary), vec![1.0, 0.0, 1.0, 0.0, 0.0, 1.0]),
            (Loss { class_weights: vec![0.4, 2.5], ..Loss::new(Head::Binary) }, vec![1.0, 0.0, 1.0, 0.0, 0.0, 1.0]),
            (Loss::new(Head::Multiclass(3)), vec![2.0, 0.0]),
            (Loss { class_weights: vec![1.0, 3.0, 0.5], ..Loss::new(Head::Multiclass(3)) }, vec![1.0, 2.0]),
            (Loss::new(Head::Regression), vec![0.1, 0.5, -2.0, 0.0, 3.0, 1.0]),
            (Loss { huber_delta: 1.0, ..Loss::new(Head::Regression) }, vec![0.1, 0.5, -2.0, 0.0, 3.0, 1.0]),
            (Loss { label_smoothing: 0.2, ..Loss::new(Head::Binary) }, vec![1.0, 0.0, 1.0, 0.0, 0.0, 1.0]),
            (
                Loss { label_smoothing: 0.1, class_weights: vec![0.4, 2.5], ..Loss::new(Head::Binary) },
                vec![1.0, 0.0, 1.0, 0.0, 0.0, 1.0],
            ),
            (Loss { label_smoothing: 0.3, ..Loss::new(Head::Multiclass(3)) }, vec![2.0, 0.0]),
            (
                Loss { label_smoothing: 0.1, class_weights: vec![1.0, 3.0, 0.5], ..Loss::new(Head::Multiclass(3)) },
                vec![1.0, 2.0],
            ),
        ];
        for (loss, y) in cases {
            let n = y.len();
            let mut grad = vec![0.0; logits.len()];
            loss.loss_and_grad(&logits, &y, n, &mut grad);
            for i in 0..logits.len() {
                let eps = 1e-3;
                let at = |d: f32| {
                    let mut l = logits;
                    l[i] += d;
                    loss.loss(&l, &y, n)
                };
                let numeric = (at(eps) - at(-eps)) / (2.0 * eps as f64);
                assert!((numeric - grad[i] as f64).abs() < 1e-3, "{loss:?} logit {i}: {numeric} vs {}", grad[i]);
            }
        }
    }

    #[test]
    fn the_branch_free_exp_and_log1p_are_within_a_few_ulp() {
        let ulps = |a: f32, b: f32| (a.to_bits() as i64 - b.to_bits() as i64).abs();
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            assert!(ulps(exp_nonpositive(x), x.exp()) <= 3, "exp({x}): {} vs {}", exp_nonpositive(x), x.exp());
            let e = i as f32 / 200_000.0;
            let (ours, exact) = (ln_1p_unit(e), (e as f64).ln_1p() as f32);
            assert!(ulps(ours, exact) <= 3, "ln_1p({e}): {ours} vs {exact}");
        }
        assert_eq!(ln_1p_unit(1e-30), 1e-30);
    }

    #[test]
    fn huber_is_quadratic_inside_and_linear_outside() {
        let huber = Loss { huber_delta: 1.0, ..Loss::new(Head::Regression) };
        assert!((huber.loss(&[0.5], &[0.0], 1) - 0.125).abs() < 1e-7);
        assert!((huber.loss(&[3.0], &[0.0], 1) - 2.5).abs() < 1e-7);
    }

    #[test]
    fn class_weights_weigh_each_row_by_its_class() {
        let weighted = Loss { class_weights: vec![1.0, 3.0], ..Loss::new(Head::Binary) };
        let (a, b) = (Loss::new(Head::Binary).loss(&[0.0], &[1.0], 1), Loss::new(Head::Binary).loss(&[2.0], &[0.0], 1));
        let both = weighted.loss(&[0.0, 2.0], &[1.0, 0.0], 2);
        assert!((both - (3.0 * a + b) / 4.0).abs() < 1e-6);
    }

    /// Label smoothing against values worked out by hand (in f64).
    #[test]
    fn label_smoothing_matches_a_hand_computation() {
        let close = |a: f64, b: f64| (a - b).abs() < 1e-6 * b.abs().max(1.0);
        // Binary, ε = 0.2: targets 1 → 0.9 and 0 → 0.1. At z = 0 (p = 1/2)
        // the loss is ln 2 whatever the target, the gradient p - t.
        let binary = Loss { label_smoothing: 0.2, ..Loss::new(Head::Binary) };
        let mut g = [0.0; 2];
        let l = binary.loss_and_grad(&[0.0, 0.0], &[1.0, 0.0], 2, &mut g);
        assert!(close(l, 2f64.ln()), "{l}");
        assert!(close(g[0] as f64, (0.5 - 0.9) / 2.0) && close(g[1] as f64, (0.5 - 0.1) / 2.0), "{g:?}");
        // At z = 2, target 1: ln(1 + e^-2) + (1 - 0.9)·2 (BCE with soft target 0.9).
        let l = binary.loss(&[2.0], &[1.0], 1);
        let p = 1.0 / (1.0 + (-2f64).exp());
        assert!(close(l, (1.0 + (-2f64).exp()).ln() + 0.1 * 2.0), "{l}");
        binary.loss_and_grad(&[2.0], &[1.0], 1, &mut g);
        assert!(close(g[0] as f64, p - 0.9), "{g:?}");
        // With class weights (0.5, 2): each row weighs its own class; the
        // mean is over the weights.
        let weighted = Loss { class_weights: vec![0.5, 2.0], ..binary.clone() };
        let (a, b) = (binary.loss(&[2.0], &[1.0], 1), binary.loss(&[-1.0], &[0.0], 1));
        assert!(close(weighted.loss(&[2.0, -1.0], &[1.0, 0.0], 2), (2.0 * a + 0.5 * b) / 2.5));

        // Multiclass, K = 3, ε = 0.3: target class 1 gets 0.8, the others 0.1.
        let z = [1.0f64, 2.0, 0.5];
        let norm: f64 = z.iter().map(|v| v.exp()).sum();
        let p: Vec<f64> = z.iter().map(|v| v.exp() / norm).collect();
        let q = [0.1, 0.8, 0.1];
        let expected: f64 = -(0..3).map(|j| q[j] * p[j].ln()).sum::<f64>();
        let multi = Loss { label_smoothing: 0.3, ..Loss::new(Head::Multiclass(3)) };
        let mut g = [0.0; 3];
        let l = multi.loss_and_grad(&[1.0, 2.0, 0.5], &[1.0], 1, &mut g);
        assert!(close(l, expected), "{l} vs {expected}");
        for j in 0..3 {
            assert!(close(g[j] as f64, p[j] - q[j]), "class {j}: {} vs {}", g[j], p[j] - q[j]);
        }
        // Weighted as PyTorch: (1 - ε)·w_y·(-ln p_y) + (ε/K)·Σ_j w_j·(-ln p_j), over w_y.
        let w = [1.0, 3.0, 0.5];
        let weighted = Loss { class_weights: w.iter().map(|&v| v as f32).collect(), ..multi.clone() };
        let row = (1.0 - 0.3) * w[1] * -p[1].ln() + 0.1 * (0..3).map(|j| w[j] * -p[j].ln()).sum::<f64>();
        let l = weighted.loss_and_grad(&[1.0, 2.0, 0.5], &[1.0], 1, &mut g);
        assert!(close(l, row / w[1]), "{l} vs {}", row / w[1]);
        let total_w: f64 = w.iter().sum();
        for j in 0..3 {
            let here = if j == 1 { 0.7 * w[1] } else { 0.0 } + 0.1 * w[j];
            let expected = ((0.7 * w[1] + 0.1 * total_w) * p[j] - here) / w[1];
            assert!(close(g[j] as f64, expected), "class {j}: {} vs {expected}", g[j]);
        }
        // ε = 0 is the plain loss, bit for bit.
        let (plain, zero) = (Loss::new(Head::Binary), Loss { label_smoothing: 0.0, ..Loss::new(Head::Binary) });
        let (mut a, mut b) = ([0.0; 3], [0.0; 3]);
        let la = plain.loss_and_grad(&[0.3, -2.0, 5.0], &[1.0, 0.0, 0.0], 3, &mut a);
        let lb = zero.loss_and_grad(&[0.3, -2.0, 5.0], &[1.0, 0.0, 0.0], 3, &mut b);
        assert_eq!((la, a), (lb, b));
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut out = [0.0; 3];
        softmax_into(&[1000.0, 1001.0, 999.0], &mut out);
        assert!((out.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(out[1] > out[0] && out[0] > out[2]);
    }
}
