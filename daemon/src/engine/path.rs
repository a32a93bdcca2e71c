//! Where a straight path through a piecewise-linear network bends.
//!
//! A network of dense layers, ReLUs, scoring-mode BatchNorms (affine maps),
//! dropouts (the identity when scoring) and residual sums is linear between
//! the points where some ReLU's input crosses zero. Along a straight line of
//! first-layer products `from + α·(to − from)`, every op's output on the
//! current piece is `a + α·b`; the next bend is the nearest α where a ReLU's
//! input reaches zero, after which that unit's state flips. Integrated
//! gradients integrate a smooth function on each piece, and a few
//! Gauss–Legendre points per piece make them exact to rounding, where
//! evenly spaced points converge only as fast as their spacing shrinks.

use super::stack::{batch_norm_affine, Arch, Op, Stack};
use super::Activation;

/// The most pieces one path is cut into; past it the path is treated as
/// curved (the caller integrates it with evenly spaced points).
pub const MAX_PIECES: usize = 4096;

/// Whether the network is linear between bends that [`bends`] can find:
/// ReLUs alone, no LayerNorm, no periodic embeddings.
pub fn piecewise_linear(arch: &Arch) -> bool {
    arch.periodic.is_none()
        && arch.ops.iter().all(|op| match op {
            Op::Activation { f } => *f == Activation::Relu,
            Op::LayerNorm { .. } => false,
            _ => true,
        })
}

/// One piece of a path, on which every model of the stack is linear.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Piece {
    pub start: f64,
    pub end: f64,
    /// The most any logit of any model changes along the piece.
    pub change: f64,
}

/// A path's pieces, and how fast each logit changes on each of them.
#[derive(Debug, Clone, PartialEq)]
pub struct Pieces {
    pub pieces: Vec<Piece>,
    /// `pieces.len() × K·outputs`: each logit's derivative in α on each
    /// piece, model after model as the stack lays its logits out.
    pub slopes: Vec<f64>,
}

/// The pieces, in order from 0 to 1, of the path of first-layer products
/// (without bias; `[K·h]` each, as `Stack::linear_products` lays them
/// out) from `from` to `to`, cut wherever any model of the stack bends;
/// `None` when the network is not [`piecewise_linear`] or bends more than
/// [`MAX_PIECES`] times.
pub fn pieces(net: &Stack, from: &[f32], to: &[f32]) -> Option<Pieces> {
    if !piecewise_linear(&net.arch) {
        return None;
    }
    // Each model's pieces: where each ends, and its logits' slopes on each.
    let models = (0..net.k).map(|m| model_pieces(net, m, from, to)).collect::<Option<Vec<_>>>()?;
    let mut ends: Vec<f64> = models.iter().flat_map(|(ends, _)| ends).copied().collect();
    ends.sort_by(f64::total_cmp);
    ends.dedup();
    if ends.len() > MAX_PIECES {
        return None;
    }
    let outputs = net.outputs();
    let mut next = vec![0usize; models.len()];
    let mut start = 0.0;
    let mut out =
        Pieces { pieces: Vec::with_capacity(ends.len()), slopes: Vec::with_capacity(ends.len() * net.k * outputs) };
    for end in ends {
        let mut rate = 0.0f64;
        for ((model_ends, slopes), at) in models.iter().zip(next.iter_mut()) {
            // The piece of this model that holds (start, end).
            while model_ends[*at] < end {
                *at += 1;
            }
            let slopes = &slopes[*at * outputs..(*at + 1) * outputs];
            rate = slopes.iter().fold(rate, |r, s| r.max(s.abs()));
            out.slopes.extend_from_slice(slopes);
        }
        out.pieces.push(Piece { start, end, change: rate * (end - start) });
        start = end;
    }
    Some(out)
}

/// Model `m`'s pieces, traced one after the other: where each ends, and
/// its logits' slopes on each, piece after piece. The whole network is run once,
/// at the start of the path; at each bend one unit switches, and only what
/// that changes downstream is updated. A ReLU with no ReLU before it sees
/// the same lines all along, so its units' switches are sorted once.
fn model_pieces(net: &Stack, m: usize, from: &[f32], to: &[f32]) -> Option<(Vec<f64>, Vec<f64>)> {
    let model = Model::of(net, m);
    let arch = &net.arch;
    let Op::Dense { outputs: h, .. } = arch.ops[0] else { return None };
    let bias = &net.params[arch.slot_of(0) + 1][m * h..(m + 1) * h];
    let start: Vec<f64> = from[m * h..(m + 1) * h].iter().zip(bias).map(|(&f, &b)| f as f64 + b as f64).collect();
    let slope: Vec<f64> =
        from[m * h..(m + 1) * h].iter().zip(&to[m * h..(m + 1) * h]).map(|(&f, &t)| (t - f) as f64).collect();

    // Each op's output on the current piece, a + α·b, and each ReLU's
    // units' states, from a full pass at α = 0.
    let ops = arch.ops.len();
    let mut outs: Vec<Line> = Vec::with_capacity(ops);
    let mut on: Vec<Vec<bool>> = vec![Vec::new(); ops];
    for i in 0..ops {
        let out = match arch.ops[i] {
            Op::Dense { .. } if i == 0 => Line { a: start.clone(), b: slope.clone() },
            Op::Activation { .. } => {
                let input = &outs[i - 1];
                on[i] = input.a.iter().zip(&input.b).map(|(&a, &b)| a > 0.0 || (a == 0.0 && b > 0.0)).collect();
                let mut out = input.clone();
                out.mask(&on[i]);
                out
            }
            _ => {
                let mut out = Line::zeros(arch.width_after(i));
                model.apply(i, &outs[i - 1], outs.get(residual_source(&arch.ops[i])), false, &mut out);
                out
            }
        };
        outs.push(out);
    }
    // Switches of the ReLUs whose inputs never change, in order.
    let first_relu = arch.ops.iter().position(|op| matches!(op, Op::Activation { .. }));
    let mut fixed: Vec<(f64, usize, usize)> = Vec::new();
    if let Some(i) = first_relu {
        let input = &outs[i - 1];
        for (u, ((&a, &b), &state)) in input.a.iter().zip(&input.b).zip(&on[i]).enumerate() {
            if b != 0.0 && (state == (b < 0.0)) {
                let cross = -a / b;
                if (0.0..1.0).contains(&cross) {
                    fixed.push((cross, i, u));
                }
            }
        }
        fixed.sort_by(|x, y| y.0.total_cmp(&x.0));
    }

    let mut deltas: Vec<Line> = (0..ops).map(|i| Line::zeros(arch.width_after(i))).collect();
    let mut touched = vec![false; ops];
    let (mut ends, mut slopes) = (Vec::new(), Vec::new());
    let mut at = 0.0f64;
    loop {
        slopes.extend_from_slice(&outs[ops - 1].b);
        // The next switch: an active unit whose input falls to zero, or an
        // inactive one whose input rises to it.
        let mut next: Option<(f64, usize, usize)> = fixed.last().copied();
        for (i, states) in on.iter().enumerate().filter(|(i, s)| !s.is_empty() && Some(*i) != first_relu) {
            let input = &outs[i - 1];
            for (u, &state) in states.iter().enumerate() {
                let b = input.b[u];
                if (state && b < 0.0) || (!state && b > 0.0) {
                    let cross = (-input.a[u] / b).max(at);
                    if cross < 1.0 && next.is_none_or(|(t, _, _)| cross < t) {
                        next = Some((cross, i, u));
                    }
                }
            }
        }
        let Some((cross, i, u)) = next else {
            ends.push(1.0);
            return Some((ends, slopes));
        };
        if Some(i) == first_relu {
            fixed.pop();
        }
        let cross = cross.max(at);
        ends.push(cross);
        if ends.len() >= MAX_PIECES {
            return None;
        }
        at = cross;
        on[i][u] = !on[i][u];
        // What the switch adds to op i's output, then to every op after it.
        let sign = if on[i][u] { 1.0 } else { -1.0 };
        let (a, b) = (sign * outs[i - 1].a[u], sign * outs[i - 1].b[u]);
        touched.fill(false);
        deltas[i].clear();
        deltas[i].a[u] = a;
        deltas[i].b[u] = b;
        outs[i].a[u] += a;
        outs[i].b[u] += b;
        touched[i] = true;
        for j in i + 1..ops {
            if !touched[j - 1] {
                continue;
            }
            let (before, after) = deltas.split_at_mut(j);
            let (input, change) = (&before[j - 1], &mut after[0]);
            match arch.ops[j] {
                Op::Activation { .. } => {
                    change.copy_from(input);
                    change.mask(&on[j]);
                }
                _ => {
                    let skip = residual_source(&arch.ops[j]);
                    let skip = (skip < j && touched[skip]).then(|| &before[skip]);
                    model.apply(j, input, skip, true, change);
                }
            }
            outs[j].add(change);
            touched[j] = true;
        }
    }
}

/// The op whose output a residual op adds (`usize::MAX`: none).
fn residual_source(op: &Op) -> usize {
    match op {
        Op::Residual { from } => from - 1,
        _ => usize::MAX,
    }
}

/// `a + α·b` for each unit of one op's output.
#[derive(Debug, Clone)]
struct Line {
    a: Vec<f64>,
    b: Vec<f64>,
}

impl Line {
    fn zeros(width: usize) -> Line {
        Line { a: vec![0.0; width], b: vec![0.0; width] }
    }

    fn clear(&mut self) {
        self.a.fill(0.0);
        self.b.fill(0.0);
    }

    fn copy_from(&mut self, other: &Line) {
        self.a.copy_from_slice(&other.a);
        self.b.copy_from_slice(&other.b);
    }

    fn mask(&mut self, on: &[bool]) {
        for ((a, b), &on) in self.a.iter_mut().zip(self.b.iter_mut()).zip(on) {
            if !on {
                (*a, *b) = (0.0, 0.0);
            }
        }
    }

    fn add(&mut self, other: &Line) {
        self.a.iter_mut().zip(&other.a).for_each(|(x, y)| *x += y);
        self.b.iter_mut().zip(&other.b).for_each(|(x, y)| *x += y);
    }
}

/// One model's parameters for the ops that are affine maps when scoring.
struct Model<'a> {
    net: &'a Stack,
    m: usize,
    /// Each BatchNorm's scale and offset.
    affine: Vec<Option<(Vec<f64>, Vec<f64>)>>,
}

impl<'a> Model<'a> {
    fn of(net: &'a Stack, m: usize) -> Model<'a> {
        let arch = &net.arch;
        let affine = arch
            .ops
            .iter()
            .enumerate()
            .map(|(i, op)| match op {
                Op::BatchNorm { width } => {
                    let (slot, s) = (arch.slot_of(i), arch.state_of(i));
                    let (scale, offset) =
                        batch_norm_affine(&net.params[slot], &net.params[slot + 1], &net.state[s], &net.state[s + 1]);
                    let cols = m * width..(m + 1) * width;
                    let widen = |v: &[f32]| v[cols.clone()].iter().map(|&x| x as f64).collect::<Vec<f64>>();
                    Some((widen(&scale), widen(&offset)))
                }
                _ => None,
            })
            .collect();
        Model { net, m, affine }
    }

    /// Op `i` (not an activation, not the first) applied to `input` into
    /// `out`, with `skip` the output a residual op adds. A change
    /// (`linear`) passes through the linear part alone: no bias, no offset.
    fn apply(&self, i: usize, input: &Line, skip: Option<&Line>, linear: bool, out: &mut Line) {
        let (net, m) = (self.net, self.m);
        match net.arch.ops[i] {
            Op::Dense { inputs, outputs } => {
                let slot = net.arch.slot_of(i);
                let w = &net.params[slot][m * outputs * inputs..(m + 1) * outputs * inputs];
                let bias = &net.params[slot + 1][m * outputs..(m + 1) * outputs];
                out.clear();
                // A change is often one unit: skip the zero columns.
                for (c, (&a, &b)) in input.a.iter().zip(&input.b).enumerate() {
                    if a == 0.0 && b == 0.0 {
                        continue;
                    }
                    for o in 0..outputs {
                        let wv = w[o * inputs + c] as f64;
                        out.a[o] += wv * a;
                        out.b[o] += wv * b;
                    }
                }
                if !linear {
                    out.a.iter_mut().zip(bias).for_each(|(x, &b)| *x += b as f64);
                }
            }
            Op::BatchNorm { .. } => {
                let (scale, offset) = self.affine[i].as_ref().expect("set for every BatchNorm");
                for u in 0..input.a.len() {
                    out.a[u] = input.a[u] * scale[u] + if linear { 0.0 } else { offset[u] };
                    out.b[u] = input.b[u] * scale[u];
                }
            }
            Op::Residual { .. } => {
                out.copy_from(input);
                if let Some(skip) = skip {
                    out.add(skip);
                }
            }
            Op::Dropout { .. } | Op::Activation { .. } | Op::LayerNorm { .. } => out.copy_from(input),
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::engine::stack::tests::randomise;
    use crate::engine::{Batch, Embedding, StackCache};

    /// A network of every piecewise-linear op: dense layers, ReLUs,
    /// scoring-mode BatchNorm, dropout and a residual sum.
    fn piecewise(outputs: usize) -> Arch {
        let ops = vec![
            Op::Dense { inputs: 5, outputs: 12 },
            Op::BatchNorm { width: 12 },
            Op::Activation { f: Activation::Relu },
            Op::Dense { inputs: 12, outputs: 8 },
            Op::Activation { f: Activation::Relu },
            Op::Dropout { p: 0.3 },
            Op::Dense { inputs: 8, outputs: 12 },
            Op::Residual { from: 3 },
            Op::Activation { f: Activation::Relu },
            Op::Dense { inputs: 12, outputs },
        ];
        Arch { inputs: 3, embeddings: vec![Embedding { vocabulary: 3, dim: 2 }], ops, periodic: None }
    }

    /// On every piece the logits are linear in α (their value halfway is
    /// the mean of their values near the ends), and no piece is cut where
    /// the network does not bend: two neighbours together are not linear.
    #[test]
    fn a_path_is_linear_on_each_piece_and_bends_between_them() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let models: Vec<Stack> = (0..2)
            .map(|m| {
                let mut net = Stack::new(piecewise(3), 5, &mut [ChaCha8Rng::seed_from_u64(m)]);
                randomise(&mut net, &mut rng);
                net
            })
            .collect();
        let net = Stack::from_models(&models);
        assert!(piecewise_linear(&net.arch));
        let n = 6;
        let x: Vec<f32> = (0..n * 3).map(|_| rng.random_range(-2.0..2.0)).collect();
        let codes: Vec<u32> = (0..n as u32).map(|r| r % 4).collect();
        let products = net.linear_products(&x, &net.categorical_vectors(Batch { x: &x, codes: &codes, n }), n);
        let kh = products.len() / n;
        let logits_at = |from: &[f32], to: &[f32], alpha: f64| {
            let along: Vec<f32> = from.iter().zip(to).map(|(f, t)| f + alpha as f32 * (t - f)).collect();
            let mut cache = StackCache::default();
            net.forward_products(Batch { x: &[], codes: &[], n: 1 }, &along, &mut cache);
            cache.logits().iter().map(|&l| l as f64).collect::<Vec<f64>>()
        };
        let linear_between = |from: &[f32], to: &[f32], a: f64, b: f64| {
            let (s, e, mid) = (logits_at(from, to, a), logits_at(from, to, b), logits_at(from, to, (a + b) / 2.0));
            mid.iter().zip(s.iter().zip(&e)).all(|(m, (s, e))| (m - (s + e) / 2.0).abs() < 1e-4)
        };
        let mut total = 0;
        for r in 1..n {
            let (from, to) = (&products[..kh], &products[r * kh..(r + 1) * kh]);
            let Pieces { pieces, slopes } = pieces(&net, from, to).expect("piecewise linear");
            assert_eq!((pieces[0].start, pieces.last().unwrap().end), (0.0, 1.0));
            total += pieces.len();
            let wide = slopes.len() / pieces.len();
            assert_eq!(wide, 2 * 3, "a slope per logit of each model");
            for (p, slope) in pieces.iter().zip(slopes.chunks_exact(wide)) {
                let inset = (p.end - p.start) * 1e-3;
                assert!(linear_between(from, to, p.start + inset, p.end - inset), "row {r}: {p:?} is not linear");
                let (s, e) = (logits_at(from, to, p.start + inset), logits_at(from, to, p.end - inset));
                let change = s.iter().zip(&e).map(|(s, e)| (e - s).abs()).fold(0.0, f64::max);
                assert!(change <= p.change * (1.0 + 1e-3) + 1e-6, "row {r}: {p:?} changes by {change}");
                // Each logit changes on the piece at its slope.
                let length = p.end - p.start - 2.0 * inset;
                for ((s, e), slope) in s.iter().zip(&e).zip(slope) {
                    assert!(((e - s) - slope * length).abs() < 1e-4, "row {r}: {p:?}: {s} to {e}, slope {slope}");
                }
            }
            for pair in pieces.windows(2) {
                let inset = (pair[0].end - pair[0].start).min(pair[1].end - pair[1].start) * 1e-3;
                if !linear_between(from, to, pair[0].start + inset, pair[1].end - inset) {
                    continue;
                }
                // A cut where a unit only touches zero is harmless; most cut a bend.
                total -= 1;
            }
        }
        assert!(total > 3 * (n - 1), "the paths bend: {total} pieces that are cut at bends");
    }

    #[test]
    fn networks_with_smooth_parts_are_not_cut() {
        let mut arch = piecewise(1);
        arch.ops[2] = Op::Activation { f: Activation::Gelu };
        assert!(!piecewise_linear(&arch));
        let mut arch = piecewise(1);
        arch.ops[1] = Op::LayerNorm { width: 12 };
        assert!(!piecewise_linear(&arch));
    }
}
