//! Per-row explanations: integrated gradients (Sundararajan, Taly and Yan,
//! 2017) with the engine's own forward and backward passes.
//!
//! A row's score is explained against a baseline row: each column's typical
//! training value ([`FeaturePipeline::baseline`]). Along the straight line
//! from the baseline's encoding to the row's (the encoded inputs, and each
//! model's embedding vectors for the row's categories) the gradient of the
//! score is integrated; an input's contribution is its change times that
//! integral, and a column's the sum over its inputs (its one-hot or bin
//! inputs, its NULL indicator, its embedding vector, the value its periodic
//! embedding reads). The contributions add up to the row's score minus the
//! baseline's (completeness) up to the quadrature's error.
//!
//! The quadrature is where Cerebro differs from the usual evenly spaced
//! points. A network of ReLUs bends wherever a unit switches, and evenly
//! spaced points converge only as fast as their spacing shrinks there: on a
//! churn model of hidden [64, 32], 32 points miss completeness by more
//! than 1e-3 on a third of the rows. When the network is piecewise linear
//! ([`path::piecewise_linear`]), the path is cut where it bends
//! ([`path::pieces`]). On each piece the score is a smooth function of
//! linear logits: where it is a function of one logit per network (a
//! sigmoid or a value head), its integral along the piece is known in
//! closed form ([`NativeModel::mean_gradient`]), one pass a piece; a
//! softmax head's pieces get Gauss–Legendre points enough for how much the
//! logits change there. Either is exact to rounding. Other networks get
//! [`STEPS`] Gauss–Legendre points over the whole path. A row whose
//! contributions still miss by more than [`COMPLETENESS`] is integrated
//! again with twice the points, up to [`MAX_POINTS`].
//!
//! The first dense layer is linear in the inputs and vectors, so its
//! products along the path are interpolated between the two rows' products
//! rather than recomputed at every point, and the gradient reaches the
//! inputs through it once per row, from the points' weighted gradients
//! ([`Stack::linear_products`]): the path costs the layers after the first
//! (and the periodic embeddings, which are not linear).
//!
//! [`Stack::linear_products`]: crate::engine::Stack::linear_products
//! [`FeaturePipeline::baseline`]: crate::features::FeaturePipeline::baseline

use cerebro_shared::batch::{ColumnData, ColumnRef};

use crate::engine::path;
use crate::engine::{sigmoid, softmax_into, Batch, StackCache};
use crate::native::{Head, NativeError, NativeModel};

/// Points over the whole path of a network that is not piecewise linear.
pub const STEPS: usize = 32;

/// Points on a piece of a piecewise-linear network's path along which no
/// logit changes by more than [`SMALL_CHANGE`]; on other pieces, this many
/// and one more for each unit the logits change by.
pub const POINTS_PER_PIECE: usize = 2;

/// A logit change small enough for one point on its piece: the score is
/// then nearly linear there, and the point's error is under a
/// two-hundredth of the piece's share of the score.
pub const SMALL_CHANGE: f64 = 0.1;

/// The most points one row is integrated with, its first try's doubled.
pub const MAX_POINTS: usize = 4096;

/// How far a row's contributions may add up from its score minus the
/// baseline's before it is integrated again: absolute for probabilities,
/// relative (to at least 1) for values.
pub const COMPLETENESS: f64 = 1e-4;

/// Interpolated rows one thread pushes through the network at once.
const PATH_ROWS: usize = 4096;

/// Explanations of a batch of rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Explained {
    /// Per row, the score explained: the positive class's probability, the
    /// predicted class's, or the value.
    pub scores: Vec<f64>,
    /// Per row, the baseline row's score of the same output.
    pub baselines: Vec<f64>,
    /// `rows × columns` contributions, row by row, columns in the
    /// pipeline's order.
    pub contributions: Vec<f64>,
}

impl NativeModel {
    /// Integrated-gradient contributions of every column to every row's
    /// score, over `threads` threads.
    pub fn explain(&self, columns: &[ColumnRef<'_>], threads: usize) -> Result<Explained, NativeError> {
        self.explain_against(columns, &self.pipeline.baseline(), None, threads)
    }

    /// [`NativeModel::explain`] from a given `baseline` row (one value per
    /// column, in the pipeline's order) and, for a softmax head, of the
    /// given class of each row rather than the one it ranks first: what
    /// an ensemble's members are explained with, so that their
    /// explanations add up to the ensemble's.
    pub fn explain_against(
        &self,
        columns: &[ColumnRef<'_>],
        baseline: &[ColumnData],
        classes: Option<&[usize]>,
        threads: usize,
    ) -> Result<Explained, NativeError> {
        let encoded = self.pipeline.transform_refs(columns)?;
        let baseline = self.pipeline.transform(baseline)?;
        let n = encoded.n;
        let net = &self.network;
        let rows = Batch { x: &encoded.x, codes: &encoded.codes, n };
        let base = Batch { x: &baseline.x, codes: &baseline.codes, n: 1 };
        let mut cache = StackCache::default();
        let mut logits = Vec::new();
        net.predict_chunked(base, 1, &mut cache, &mut logits);
        let base_logits = logits.clone();
        logits.clear();
        net.predict_chunked(rows, 512, &mut cache, &mut logits);
        let wide = net.k * net.outputs();
        let mut probabilities = Vec::new();
        let explained: Vec<usize> = match classes {
            Some(classes) => classes.to_vec(),
            None => logits.chunks_exact(wide).map(|l| self.explained_output(l)).collect(),
        };
        let scores: Vec<f64> = logits
            .chunks_exact(wide)
            .zip(&explained)
            .map(|(l, &c)| self.output_gradient(l, c, None, &mut probabilities))
            .collect();
        let baselines: Vec<f64> =
            explained.iter().map(|&c| self.output_gradient(&base_logits, c, None, &mut probabilities)).collect();

        let (vectors, base_vectors) = (net.categorical_vectors(rows), net.categorical_vectors(base));
        let path = Path {
            model: self,
            products: net.linear_products(&encoded.x, &vectors, n),
            base_products: net.linear_products(&baseline.x, &base_vectors, 1),
            x: &encoded.x,
            vectors,
            base_x: &baseline.x,
            base_vectors,
            explained,
            piecewise: path::piecewise_linear(&net.arch),
            spans: self.pipeline.spans(),
        };

        let width = self.pipeline.features.len();
        let mut contributions = vec![0.0f64; n * width];
        let mut pending: Vec<usize> = (0..n).collect();
        for level in 0.. {
            if pending.is_empty() {
                break;
            }
            let (found, points) = path.integrate(&pending, level, threads);
            let mut again = Vec::new();
            for ((&r, row), &used) in pending.iter().zip(found.chunks_exact(width)).zip(&points) {
                contributions[r * width..(r + 1) * width].copy_from_slice(row);
                let gap = (row.iter().sum::<f64>() - (scores[r] - baselines[r])).abs();
                let scale = match self.head {
                    Head::Value(_) => scores[r].abs().max(1.0),
                    _ => 1.0,
                };
                if gap > COMPLETENESS * scale && 2 * used <= MAX_POINTS {
                    again.push(r);
                }
            }
            pending = again;
        }
        Ok(Explained { scores, baselines, contributions })
    }

    /// Which output a row's explanation is of: the positive class, the
    /// value, or the class the members' average ranks first.
    fn explained_output(&self, logits: &[f32]) -> usize {
        let Head::Softmax = self.head else { return 0 };
        let width = self.network.outputs();
        let (mut average, mut probabilities) = (vec![0.0f32; width], vec![0.0f32; width]);
        self.head_output(logits, &mut average, &mut probabilities);
        average.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i)
    }

    /// Output `class` of one row's logits (every member's, `K × outputs`)
    /// as the graph computes it; with `d`, its gradient with respect to
    /// each logit too. `probabilities` is scratch for a softmax head.
    fn output_gradient(
        &self,
        logits: &[f32],
        class: usize,
        mut d: Option<&mut [f32]>,
        probabilities: &mut Vec<f32>,
    ) -> f64 {
        let width = self.network.outputs();
        probabilities.resize(width, 0.0);
        let mut score = 0.0f64;
        for (m, (member, &weight)) in logits.chunks_exact(width).zip(&self.weights).enumerate() {
            let d_member = d.as_deref_mut().map(|d| &mut d[m * width..(m + 1) * width]);
            match self.head {
                Head::Sigmoid => {
                    let p = sigmoid(member[0]);
                    score += (weight * p) as f64;
                    if let Some(d) = d_member {
                        d[0] = weight * p * (1.0 - p);
                    }
                }
                Head::Softmax => {
                    softmax_into(member, probabilities);
                    let p = probabilities[class];
                    score += (weight * p) as f64;
                    if let Some(d) = d_member {
                        for (j, (d, &q)) in d.iter_mut().zip(probabilities.iter()).enumerate() {
                            *d = weight * p * (f32::from(j == class) - q);
                        }
                    }
                }
                Head::Value(scale) => {
                    let value = scale.value(member[0]);
                    score += (weight * value) as f64;
                    if let Some(d) = d_member {
                        d[0] = weight * scale.std * if scale.log { value } else { 1.0 };
                    }
                }
            }
        }
        score
    }
}

impl NativeModel {
    /// The score's derivative in each logit, averaged over a piece of
    /// `length` in α on which every logit is linear (one point's
    /// `logits`, in its middle, each changing at its `slope`), times
    /// `length`, into `d`: `(h(f_end) − h(f_start)) / (f_end − f_start)`
    /// for a member's output `h`, and the derivative in the middle
    /// ([`NativeModel::output_gradient`]) where the logit hardly changes.
    /// For a sigmoid or a value head, whose output is a function of one
    /// logit. `probabilities` is `output_gradient`'s scratch.
    fn mean_gradient(&self, logits: &[f32], slopes: &[f64], length: f64, d: &mut [f32], probabilities: &mut Vec<f32>) {
        self.output_gradient(logits, 0, Some(d), probabilities);
        for (((&f, &slope), d), &weight) in logits.iter().zip(slopes).zip(d.iter_mut()).zip(&self.weights) {
            let (f, change) = (f as f64, slope * length);
            *d = if change.abs() > 1e-6 {
                let mean = (self.member_output(f + change / 2.0) - self.member_output(f - change / 2.0)) / change;
                (weight as f64 * mean * length) as f32
            } else {
                *d * length as f32
            };
        }
    }

    /// A member's output for logit `z`, in f64, for a sigmoid or a value head.
    fn member_output(&self, z: f64) -> f64 {
        match self.head {
            Head::Sigmoid => 1.0 / (1.0 + (-z).exp()),
            Head::Value(scale) => {
                let v = z * scale.std as f64 + scale.mean as f64;
                if scale.log {
                    v.exp()
                } else {
                    v
                }
            }
            Head::Softmax => unreachable!("a softmax head is integrated by quadrature"),
        }
    }
}

/// The rows of one batch, their baseline, and what each row's explanation is of.
struct Path<'a> {
    model: &'a NativeModel,
    /// The first dense layer's products of each row's inputs and vectors,
    /// `[n × K·h]`, and of the baseline's.
    products: Vec<f32>,
    base_products: Vec<f32>,
    x: &'a [f32],
    /// Each model's categorical vectors, `[n × K·c]`.
    vectors: Vec<f32>,
    base_x: &'a [f32],
    base_vectors: Vec<f32>,
    explained: Vec<usize>,
    /// Whether the path is cut where the network bends.
    piecewise: bool,
    /// Each column's encoded inputs and embedding dims
    /// ([`FeaturePipeline::spans`](crate::features::FeaturePipeline::spans)).
    spans: Vec<(std::ops::Range<usize>, Option<std::ops::Range<usize>>)>,
}

/// Gauss–Legendre points and weights on [0, 1], `n` of them: exact for
/// polynomials of degree below 2n. The nodes are Newton's roots of the
/// Legendre polynomial from the usual first guesses.
pub fn gauss_legendre(n: usize) -> Vec<(f64, f64)> {
    (0..n)
        .map(|i| {
            let mut x = (std::f64::consts::PI * (i as f64 + 0.75) / (n as f64 + 0.5)).cos();
            let mut derivative = 1.0;
            for _ in 0..100 {
                let (mut p, mut previous) = (x, 1.0);
                for k in 2..=n {
                    let next = ((2 * k - 1) as f64 * x * p - (k - 1) as f64 * previous) / k as f64;
                    previous = p;
                    p = next;
                }
                derivative = n as f64 * (x * p - previous) / (x * x - 1.0);
                let step = p / derivative;
                x -= step;
                if step.abs() < 1e-15 {
                    break;
                }
            }
            let weight = 2.0 / ((1.0 - x * x) * derivative * derivative);
            ((1.0 - x) / 2.0, weight / 2.0)
        })
        .collect()
}

impl Path<'_> {
    /// The contributions of every column for `rows`, row by row, with
    /// the points of refinement `level` (the first try's times 2^level),
    /// on up to `threads` threads; and how many points each row took.
    fn integrate(&self, rows: &[usize], level: u32, threads: usize) -> (Vec<f64>, Vec<usize>) {
        let width = self.model.pipeline.features.len();
        let threads = threads.clamp(1, rows.len().max(1));
        let mut out = vec![0.0f64; rows.len() * width];
        let mut points = vec![0usize; rows.len()];
        std::thread::scope(|scope| {
            let (mut rest, mut rest_points) = (&mut out[..], &mut points[..]);
            for t in 0..threads {
                let part = &rows[rows.len() * t / threads..rows.len() * (t + 1) / threads];
                let (mine, after) = rest.split_at_mut(part.len() * width);
                let (my_points, after_points) = rest_points.split_at_mut(part.len());
                (rest, rest_points) = (after, after_points);
                scope.spawn(move || self.integrate_rows(part, level, mine, my_points));
            }
        });
        (out, points)
    }

    /// Row `r`'s points along its path and their weights (summing to 1),
    /// at refinement `level`: on each piece of a piecewise-linear network's
    /// path, one where its logits hardly change, else [`POINTS_PER_PIECE`]
    /// and one more for each unit they change by (the score is a smooth
    /// function of them there), times 2^level; else [`STEPS`] times 2^level
    /// over the whole path.
    ///
    /// When the score is a function of each logit alone (a sigmoid or a
    /// value head), the first try needs no quadrature: on a piece, where a
    /// logit `f` is linear in α, the mean of the score's derivative in `f`
    /// is `(h(f_end) − h(f_start)) / (f_end − f_start)`, exactly. Such a
    /// piece gets one point, its middle, and the slopes of its logits
    /// (`K·outputs` a point, in the second vector) for [`Path::run_pass`]
    /// to find `f_start` and `f_end` from the logits there.
    fn points(&self, r: usize, level: u32, rules: &mut Rules) -> (Vec<(f64, f64)>, Vec<f64>) {
        let kh = self.base_products.len();
        let pieces = self
            .piecewise
            .then(|| path::pieces(&self.model.network, &self.base_products, &self.products[r * kh..(r + 1) * kh]))
            .flatten();
        let Some(path::Pieces { pieces, slopes }) = pieces else {
            return (rules.get(STEPS << level).to_vec(), Vec::new());
        };
        if level == 0 && !matches!(self.model.head, Head::Softmax) {
            let wide = slopes.len() / pieces.len().max(1);
            let (mut out, mut kept) = (Vec::with_capacity(pieces.len()), Vec::with_capacity(slopes.len()));
            for (piece, slope) in pieces.iter().zip(slopes.chunks_exact(wide)).filter(|(p, _)| p.end > p.start) {
                out.push(((piece.start + piece.end) / 2.0, piece.end - piece.start));
                kept.extend_from_slice(slope);
            }
            return (out, kept);
        }
        let scale = match self.model.head {
            Head::Value(scale) if scale.log => scale.std as f64,
            Head::Value(_) => 0.0,
            _ => 1.0,
        };
        let mut out = Vec::new();
        for piece in pieces.iter().filter(|p| p.end > p.start) {
            let change = piece.change * scale;
            let n = if change < SMALL_CHANGE { 1 } else { POINTS_PER_PIECE + change.ceil().min(64.0) as usize };
            let n = n << level;
            let length = piece.end - piece.start;
            out.extend(rules.get(n).iter().map(|&(t, w)| (piece.start + t * length, w * length)));
        }
        (out, Vec::new())
    }

    fn integrate_rows(&self, rows: &[usize], level: u32, out: &mut [f64], points: &mut [usize]) {
        let width = self.model.pipeline.features.len();
        let mut pass: Vec<RowPoints> = Vec::new();
        let mut start = 0;
        let mut scratch = PassScratch::default();
        let mut rules = Rules::default();
        for (i, &r) in rows.iter().enumerate() {
            let (along, slopes) = self.points(r, level, &mut rules);
            points[i] = along.len();
            let queued: usize = pass.iter().map(|p| p.along.len()).sum();
            if !pass.is_empty() && queued + along.len() > PATH_ROWS {
                self.run_pass(&pass, &mut out[start * width..i * width], &mut scratch);
                pass.clear();
                start = i;
            }
            pass.push(RowPoints { row: r, along, slopes });
        }
        if !pass.is_empty() {
            self.run_pass(&pass, &mut out[start * width..], &mut scratch);
        }
    }

    /// One pass of the network over every point of `pass`'s rows, each row
    /// with its points and weights; each row's contributions into `out`.
    fn run_pass(&self, pass: &[RowPoints], out: &mut [f64], scratch: &mut PassScratch) {
        let model = self.model;
        let net = &model.network;
        let (p, kc, kh) = (net.arch.inputs, self.base_vectors.len(), self.base_products.len());
        let periodic = net.arch.periodic.is_some();
        let wide = net.k * net.outputs();
        let spans = &self.spans;
        let width = spans.len();
        let c = kc / net.k.max(1);
        let PassScratch { cache, x, products, d_logits, d_products, dx, probabilities } = scratch;
        x.clear();
        products.clear();
        // Each point's row (in `pass`), weight, and place among its row's.
        let mut owner = Vec::new();
        for (j, RowPoints { row: r, along, .. }) in pass.iter().enumerate() {
            let (row_x, row_products) = (&self.x[r * p..(r + 1) * p], &self.products[r * kh..(r + 1) * kh]);
            for (k, &(t, weight)) in along.iter().enumerate() {
                let alpha = t as f32;
                let on_path = |(b, a): (&f32, &f32)| b + alpha * (a - b);
                products.extend(self.base_products.iter().zip(row_products).map(on_path));
                if periodic {
                    x.extend(self.base_x.iter().zip(row_x).map(on_path));
                }
                owner.push((j, weight, k));
            }
        }
        let n = owner.len();
        let batch = Batch { x, codes: &[], n };
        net.forward_products(batch, products, cache);
        d_logits.resize(n * wide, 0.0);
        for ((logits, d), &(j, weight, k)) in
            cache.logits().chunks_exact(wide).zip(d_logits.chunks_exact_mut(wide)).zip(&owner)
        {
            let slopes = &pass[j].slopes;
            if slopes.is_empty() {
                model.output_gradient(logits, self.explained[pass[j].row], Some(d), probabilities);
                d.iter_mut().for_each(|d| *d *= weight as f32);
            } else {
                model.mean_gradient(logits, &slopes[k * wide..(k + 1) * wide], weight, d, probabilities);
            }
        }
        net.products_backward(batch, cache, d_logits, d_products, dx);
        // Each row's gradient integrated along its path: of the products,
        // and of the inputs through the periodic embeddings.
        let rows = pass.len();
        let (mut g_products, mut g_periodic) = (vec![0.0f32; rows * kh], vec![0.0f64; rows * p]);
        for (at, &(j, _, _)) in owner.iter().enumerate() {
            let g = &mut g_products[j * kh..(j + 1) * kh];
            g.iter_mut().zip(&d_products[at * kh..(at + 1) * kh]).for_each(|(g, d)| *g += d);
            if periodic {
                let gp = &mut g_periodic[j * p..(j + 1) * p];
                gp.iter_mut().zip(&dx[at * p..(at + 1) * p]).for_each(|(g, d)| *g += *d as f64);
            }
        }
        let (mut gx, mut gv) = (vec![0.0f32; rows * p], vec![0.0f32; rows * kc]);
        net.linear_products_backward(&g_products, rows, &mut gx, &mut gv);
        for (j, (RowPoints { row: r, .. }, row_out)) in pass.iter().zip(out.chunks_exact_mut(width)).enumerate() {
            let (row_x, row_v) = (&self.x[r * p..(r + 1) * p], &self.vectors[r * kc..(r + 1) * kc]);
            let (gx, gv, gp) = (&gx[j * p..(j + 1) * p], &gv[j * kc..(j + 1) * kc], &g_periodic[j * p..(j + 1) * p]);
            let input = |i: usize| (row_x[i] - self.base_x[i]) as f64 * (gx[i] as f64 + gp[i]);
            let vector = |i: usize| (row_v[i] - self.base_vectors[i]) as f64 * gv[i] as f64;
            for (o, (inputs, embedded)) in row_out.iter_mut().zip(spans) {
                *o = inputs.clone().map(input).sum::<f64>();
                if let Some(dims) = embedded {
                    *o += (0..net.k).flat_map(|m| dims.clone().map(move |d| m * c + d)).map(vector).sum::<f64>();
                }
            }
        }
    }
}

/// One row's points along its path, their weights, and, when its pieces
/// are integrated in closed form, the slopes of its logits at each point
/// ([`Path::points`]).
struct RowPoints {
    row: usize,
    along: Vec<(f64, f64)>,
    slopes: Vec<f64>,
}

/// Gauss–Legendre rules by their number of points, made once a thread.
#[derive(Default)]
struct Rules(std::collections::HashMap<usize, Vec<(f64, f64)>>);

impl Rules {
    fn get(&mut self, n: usize) -> &[(f64, f64)] {
        self.0.entry(n).or_insert_with(|| gauss_legendre(n))
    }
}

/// Buffers one thread's passes reuse.
#[derive(Default)]
struct PassScratch {
    cache: StackCache,
    x: Vec<f32>,
    products: Vec<f32>,
    d_logits: Vec<f32>,
    d_products: Vec<f32>,
    dx: Vec<f32>,
    probabilities: Vec<f32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauss_legendre_rules_integrate_polynomials_of_degree_below_twice_their_points_exactly() {
        for n in [1, 2, 3, 8, 32, 256] {
            let rule = gauss_legendre(n);
            assert!(rule.iter().all(|&(t, w)| (0.0..=1.0).contains(&t) && w > 0.0), "{n}");
            for degree in 0..(2 * n).min(40) {
                let integral: f64 = rule.iter().map(|&(t, w)| w * t.powi(degree as i32)).sum();
                let exact = 1.0 / (degree as f64 + 1.0);
                assert!((integral - exact).abs() < 1e-12, "{n} points, degree {degree}: {integral} vs {exact}");
            }
        }
    }
}
