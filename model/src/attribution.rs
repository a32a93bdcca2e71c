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
//! ([`path::piecewise_linear`]), each member's path is traced piece by
//! piece ([`path::Tracer::integrate`]): on a piece its logits are linear in α and
//! their gradient in the inputs is constant, so the integral is that
//! gradient times how the head weighs each logit over the piece. For a sigmoid or a value head, a
//! function of one logit, that weight is known in closed form; a softmax
//! head's gets Gauss–Legendre points enough for how much its logits change
//! there. Either is exact to rounding, and no pass of the network runs
//! along the path: the tracer keeps the gradient up to date as units
//! switch. Other networks get [`STEPS`] Gauss–Legendre points over the
//! whole path, one forward and backward pass a point. A row whose
//! contributions still miss by more than [`COMPLETENESS`] is integrated
//! again with twice the points, up to [`MAX_POINTS`].
//!
//! The first dense layer is linear in the inputs and vectors, so the path
//! runs through its products, interpolated between the two rows' products
//! rather than recomputed at every point, and the gradient reaches the
//! inputs through it once per row, from the pieces' or the points' weighted
//! gradients ([`Stack::linear_products`]): the path costs the layers after
//! the first (and the periodic embeddings, which are not linear).
//!
//! [`Stack::linear_products`]: crate::Stack::linear_products
//! [`FeaturePipeline::baseline`]: crate::features::FeaturePipeline::baseline

use cerebro_shared::batch::{ColumnData, ColumnRef};

use crate::native::{Head, NativeError, NativeModel};
use crate::path;
use crate::{sigmoid, softmax_into, Batch, StackCache};

/// Points over the whole path of a network that is not piecewise linear.
pub const STEPS: usize = 32;

/// Points on a piece of a softmax head's path along which no logit
/// changes by more than [`SMALL_CHANGE`]; on other pieces, this many and
/// one more for each unit the logits change by.
pub const POINTS_PER_PIECE: usize = 2;

/// A logit change small enough for one point on its piece: the score is
/// then nearly linear there, and the point's error is under a
/// two-hundredth of the piece's share of the score.
pub const SMALL_CHANGE: f64 = 0.1;

/// The most points one row is integrated with, its first try's doubled
/// (a piece weighed in closed form counts as one).
pub const MAX_POINTS: usize = 4096;

/// The most refinements of one row: its points double with each, so
/// [`MAX_POINTS`] ends it sooner but for rows whose points do not double.
const MAX_LEVEL: u32 = 12;

/// Whether a row whose contributions miss by `gap` (more than `tolerance`)
/// is integrated again: only while more points can do better. A path
/// weighed in closed form takes as many points at every level (one a
/// piece), so a gap that rounding leaves there stays whatever the level,
/// and trying again would never end.
fn retry(gap: f64, tolerance: f64, before: usize, used: usize) -> bool {
    gap > tolerance && used > before && 2 * used <= MAX_POINTS
}

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

impl Explained {
    /// Each row's baseline score, then its columns' contributions: `1 +
    /// columns` values a row, as a scoring batch carries them.
    pub fn by_row(&self) -> Vec<f64> {
        let rows = self.baselines.len();
        let columns = self.contributions.len().checked_div(rows).unwrap_or(0);
        let mut values = Vec::with_capacity(rows * (1 + columns));
        for (r, baseline) in self.baselines.iter().enumerate() {
            values.push(*baseline);
            values.extend_from_slice(&self.contributions[r * columns..(r + 1) * columns]);
        }
        values
    }
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
        let base_products = net.linear_products(&baseline.x, &base_vectors, 1);
        let path = Path {
            model: self,
            products: net.linear_products(&encoded.x, &vectors, n),
            tracer: path::Tracer::new(net, &base_products),
            base_products,
            x: &encoded.x,
            vectors,
            base_x: &baseline.x,
            base_vectors,
            explained,
            spans: self.pipeline.spans(),
        };

        let width = self.pipeline.features.len();
        let mut contributions = vec![0.0f64; n * width];
        // Each pending row with the points its last try took.
        let mut pending: Vec<(usize, usize)> = (0..n).map(|r| (r, 0)).collect();
        for level in 0..=MAX_LEVEL {
            if pending.is_empty() {
                break;
            }
            let rows: Vec<usize> = pending.iter().map(|&(r, _)| r).collect();
            let (found, points) = path.integrate(&rows, level, threads);
            let mut again = Vec::new();
            for ((&(r, before), row), &used) in pending.iter().zip(found.chunks_exact(width)).zip(&points) {
                contributions[r * width..(r + 1) * width].copy_from_slice(row);
                let gap = (row.iter().sum::<f64>() - (scores[r] - baselines[r])).abs();
                let scale = match self.head {
                    Head::Value(_) => scores[r].abs().max(1.0),
                    _ => 1.0,
                };
                if retry(gap, COMPLETENESS * scale, before, used) {
                    again.push((r, used));
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
    /// The integral over `piece` of the score's derivative in each of its
    /// member's logits, into `weights`, for a row whose explanation is of
    /// output `class`; how many points that took (one in closed form).
    /// A sigmoid's or a value's output `h` is a function of one logit
    /// linear on the piece, `f = a + α·b`, so the integral of `h'(f)` is
    /// `(h(f_end) − h(f_start)) / b`, or the derivative in the middle times
    /// the length where the logit hardly changes. A softmax's gets
    /// [`POINTS_PER_PIECE`] Gauss–Legendre points and one more for each unit
    /// its logits change by (one point where they hardly change), times
    /// 2^`level`. `ended`: the output where the last piece ended, which a
    /// piece that starts there takes rather than computing it again (and
    /// leaves its own).
    #[allow(clippy::too_many_arguments)]
    fn piece_weights(
        &self,
        piece: &path::Piece<'_>,
        class: usize,
        level: u32,
        rules: &mut Rules,
        probabilities: &mut Vec<f64>,
        ended: &mut Option<Ended>,
        weights: &mut [f64],
    ) -> usize {
        let (start, end, length) = (piece.start, piece.end, piece.end - piece.start);
        let member = self.weights[piece.model] as f64;
        if !matches!(self.head, Head::Softmax) {
            let (a, b) = (piece.a[0], piece.b[0]);
            let (f_start, f_end) = (a + start * b, a + end * b);
            let output_start = match ended.take() {
                Some(Ended { model, at, output }) if model == piece.model && at == start => Some(output),
                _ => None,
            };
            weights[0] = member
                * if (f_end - f_start).abs() > 1e-6 {
                    let output_end = self.member_output(f_end);
                    *ended = Some(Ended { model: piece.model, at: end, output: output_end });
                    (output_end - output_start.unwrap_or_else(|| self.member_output(f_start))) / b
                } else {
                    self.member_derivative((f_start + f_end) / 2.0) * length
                };
            return 1;
        }
        let change = piece.b.iter().fold(0.0f64, |c, b| c.max(b.abs())) * length;
        let n = if change < SMALL_CHANGE { 1 } else { POINTS_PER_PIECE + change.ceil().min(64.0) as usize } << level;
        weights.fill(0.0);
        probabilities.resize(piece.a.len(), 0.0);
        for &(t, w) in rules.get(n) {
            let alpha = start + t * length;
            let top = piece.a.iter().zip(piece.b).map(|(a, b)| a + alpha * b).fold(f64::NEG_INFINITY, f64::max);
            let mut sum = 0.0;
            for (p, (a, b)) in probabilities.iter_mut().zip(piece.a.iter().zip(piece.b)) {
                *p = (a + alpha * b - top).exp();
                sum += *p;
            }
            let p_class = probabilities[class] / sum;
            for (j, (weight, &p)) in weights.iter_mut().zip(probabilities.iter()).enumerate() {
                let own = if j == class { 1.0 } else { 0.0 };
                *weight += w * length * member * p_class * (own - p / sum);
            }
        }
        n
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

    /// [`NativeModel::member_output`]'s derivative in `z`.
    fn member_derivative(&self, z: f64) -> f64 {
        match self.head {
            Head::Sigmoid => {
                let p = self.member_output(z);
                p * (1.0 - p)
            }
            Head::Value(scale) => scale.std as f64 * if scale.log { self.member_output(z) } else { 1.0 },
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
    /// Cuts each row's path where the network bends, for a piecewise-linear
    /// network.
    tracer: Option<path::Tracer>,
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
        if threads == 1 {
            // A row or a few (a query by key): no thread to start.
            self.integrate_rows(rows, level, &mut out, &mut points);
            return (out, points);
        }
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

    /// Row `r`'s gradient in the first-layer products integrated along its
    /// traced path ([`path::Tracer::integrate`]), into `out` (`[K·h]`), at
    /// refinement `level`; how many points that took, or `None` when the
    /// network is not piecewise linear or the path bends too often.
    fn traced(&self, r: usize, level: u32, scratch: &mut TraceScratch, out: &mut [f64]) -> Option<usize> {
        let tracer = self.tracer.as_ref()?;
        let kh = self.base_products.len();
        let (model, class) = (self.model, self.explained[r]);
        let TraceScratch { path, rules, probabilities, ended } = scratch;
        let mut points = 0;
        let weigh = |piece: &path::Piece<'_>, weights: &mut [f64]| {
            points += model.piece_weights(piece, class, level, rules, probabilities, ended, weights);
        };
        tracer.integrate(&self.products[r * kh..(r + 1) * kh], weigh, path, out)?;
        Some(points)
    }

    fn integrate_rows(&self, rows: &[usize], level: u32, out: &mut [f64], points: &mut [usize]) {
        let kh = self.base_products.len();
        let mut scratch = PassScratch::default();
        let mut trace_scratch = TraceScratch::default();
        // Rows traced (their places in `rows`) and their gradients; rows
        // left to quadrature, with their points.
        let (mut traced, mut g_traced) = (Vec::new(), Vec::new());
        let mut g_row = vec![0.0f64; kh];
        let mut pass: Vec<RowPoints> = Vec::new();
        for (i, &r) in rows.iter().enumerate() {
            if let Some(used) = self.traced(r, level, &mut trace_scratch, &mut g_row) {
                points[i] = used;
                traced.push(i);
                g_traced.extend(g_row.iter().map(|&g| g as f32));
                if traced.len() == PATH_ROWS {
                    self.contribute(rows, &traced, &g_traced, None, out);
                    traced.clear();
                    g_traced.clear();
                }
                continue;
            }
            let along = trace_scratch.rules.get(STEPS << level).to_vec();
            points[i] = along.len();
            let queued: usize = pass.iter().map(|p| p.along.len()).sum();
            if !pass.is_empty() && queued + along.len() > PATH_ROWS {
                self.run_pass(rows, &pass, out, &mut scratch);
                pass.clear();
            }
            pass.push(RowPoints { at: i, along });
        }
        if !traced.is_empty() {
            self.contribute(rows, &traced, &g_traced, None, out);
        }
        if !pass.is_empty() {
            self.run_pass(rows, &pass, out, &mut scratch);
        }
    }

    /// One pass of the network over every point of `pass`'s rows (places
    /// in `rows`), each row with its points and weights; each row's
    /// contributions into its place in `out`.
    fn run_pass(&self, rows: &[usize], pass: &[RowPoints], out: &mut [f64], scratch: &mut PassScratch) {
        let model = self.model;
        let net = &model.network;
        let (p, kh) = (net.arch.inputs, self.base_products.len());
        let periodic = net.arch.periodic.is_some();
        let wide = net.k * net.outputs();
        let PassScratch { cache, x, products, d_logits, d_products, dx, probabilities } = scratch;
        x.clear();
        products.clear();
        // Each point's row (in `pass`) and weight.
        let mut owner = Vec::new();
        for (j, RowPoints { at, along }) in pass.iter().enumerate() {
            let r = rows[*at];
            let (row_x, row_products) = (&self.x[r * p..(r + 1) * p], &self.products[r * kh..(r + 1) * kh]);
            for &(t, weight) in along {
                let alpha = t as f32;
                let on_path = |(b, a): (&f32, &f32)| b + alpha * (a - b);
                products.extend(self.base_products.iter().zip(row_products).map(on_path));
                if periodic {
                    x.extend(self.base_x.iter().zip(row_x).map(on_path));
                }
                owner.push((j, weight));
            }
        }
        let n = owner.len();
        let batch = Batch { x, codes: &[], n };
        net.forward_products(batch, products, cache);
        d_logits.resize(n * wide, 0.0);
        for ((logits, d), &(j, weight)) in
            cache.logits().chunks_exact(wide).zip(d_logits.chunks_exact_mut(wide)).zip(&owner)
        {
            model.output_gradient(logits, self.explained[rows[pass[j].at]], Some(d), probabilities);
            d.iter_mut().for_each(|d| *d *= weight as f32);
        }
        net.products_backward(batch, cache, d_logits, d_products, dx);
        // Each row's gradient integrated along its path: of the products,
        // and of the inputs through the periodic embeddings.
        let (mut g_products, mut g_periodic) = (vec![0.0f32; pass.len() * kh], vec![0.0f64; pass.len() * p]);
        for (at, &(j, _)) in owner.iter().enumerate() {
            let g = &mut g_products[j * kh..(j + 1) * kh];
            g.iter_mut().zip(&d_products[at * kh..(at + 1) * kh]).for_each(|(g, d)| *g += d);
            if periodic {
                let gp = &mut g_periodic[j * p..(j + 1) * p];
                gp.iter_mut().zip(&dx[at * p..(at + 1) * p]).for_each(|(g, d)| *g += *d as f64);
            }
        }
        let places: Vec<usize> = pass.iter().map(|row| row.at).collect();
        self.contribute(rows, &places, &g_products, periodic.then_some(&g_periodic[..]), out);
    }

    /// Each column's contribution for the rows at `places` in `rows`, from
    /// their gradients integrated along their paths: in the products
    /// (`[places × K·h]`) and, with periodic embeddings, in the inputs
    /// through them (`[places × inputs]`); into the rows' places in `out`.
    fn contribute(
        &self,
        rows: &[usize],
        places: &[usize],
        g_products: &[f32],
        g_periodic: Option<&[f64]>,
        out: &mut [f64],
    ) {
        let net = &self.model.network;
        let (p, kc) = (net.arch.inputs, self.base_vectors.len());
        let c = kc / net.k.max(1);
        let width = self.spans.len();
        let n = places.len();
        let (mut gx, mut gv) = (vec![0.0f32; n * p], vec![0.0f32; n * kc]);
        net.linear_products_backward(g_products, n, &mut gx, &mut gv);
        for (j, &at) in places.iter().enumerate() {
            let r = rows[at];
            let (row_x, row_v) = (&self.x[r * p..(r + 1) * p], &self.vectors[r * kc..(r + 1) * kc]);
            let (gx, gv) = (&gx[j * p..(j + 1) * p], &gv[j * kc..(j + 1) * kc]);
            let gp = |i: usize| g_periodic.map_or(0.0, |g| g[j * p + i]);
            let input = |i: usize| (row_x[i] - self.base_x[i]) as f64 * (gx[i] as f64 + gp(i));
            let vector = |i: usize| (row_v[i] - self.base_vectors[i]) as f64 * gv[i] as f64;
            for (o, (inputs, embedded)) in out[at * width..(at + 1) * width].iter_mut().zip(&self.spans) {
                *o = inputs.clone().map(input).sum::<f64>();
                if let Some(dims) = embedded {
                    *o += (0..net.k).flat_map(|m| dims.clone().map(move |d| m * c + d)).map(vector).sum::<f64>();
                }
            }
        }
    }
}

/// A row quadrature integrates: its place in the rows, its points along
/// its path and their weights.
struct RowPoints {
    at: usize,
    along: Vec<(f64, f64)>,
}

/// Gauss–Legendre rules by their number of points, made once a thread.
#[derive(Default)]
struct Rules(std::collections::HashMap<usize, Vec<(f64, f64)>>);

impl Rules {
    fn get(&mut self, n: usize) -> &[(f64, f64)] {
        self.0.entry(n).or_insert_with(|| gauss_legendre(n))
    }
}

/// Buffers one thread's traces reuse.
#[derive(Default)]
struct TraceScratch {
    path: path::Scratch,
    rules: Rules,
    probabilities: Vec<f64>,
    ended: Option<Ended>,
}

/// A sigmoid's or a value's output where one piece of a member's path
/// ended. The logit is continuous where pieces meet, so the next piece
/// starts from it: one exponential a piece rather than two, and
/// neighbouring pieces' integrals meet at the very same value.
#[derive(Debug, Clone, Copy)]
struct Ended {
    model: usize,
    at: f64,
    output: f64,
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

    #[test]
    fn a_row_is_integrated_again_only_while_more_points_can_do_better() {
        // A quadrature row whose points doubled: again, while under the cap.
        assert!(retry(1e-3, 1e-4, 32, 64));
        assert!(!retry(1e-3, 1e-4, 2048, 4096 + 1));
        // Complete enough: done.
        assert!(!retry(1e-5, 1e-4, 32, 64));
        // A path weighed in closed form takes as many points at every
        // level: a gap rounding leaves is final (it looped forever before).
        assert!(!retry(3e-4, 2.6e-4, 25, 25));
        // The first try always counts as more points than none.
        assert!(retry(3e-4, 2.6e-4, 0, 25));
    }
    use super::*;

    #[test]
    fn explanations_by_row_put_each_baseline_before_its_contributions() {
        let found =
            Explained { scores: vec![0.7, 0.2], baselines: vec![0.5, 0.4], contributions: vec![0.1, 0.1, -0.2, 0.0] };
        assert_eq!(found.by_row(), vec![0.5, 0.1, 0.1, 0.4, -0.2, 0.0]);
        let none = Explained { scores: vec![], baselines: vec![], contributions: vec![] };
        assert!(none.by_row().is_empty());
    }

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
