//! Where a straight path through a piecewise-linear network bends, and the
//! integral of its gradient along the path.
//!
//! A network of dense layers, ReLUs, scoring-mode BatchNorms (affine maps),
//! dropouts (the identity when scoring) and residual sums is linear between
//! the points where some ReLU's input crosses zero. Along a straight line of
//! first-layer products `from + α·(to − from)`, every op's output on the
//! current piece is `a + α·b`; the next bend is the nearest α where a ReLU's
//! input reaches zero, after which that unit's state flips. On a piece the
//! logits' gradient in the products is constant, so integrated gradients
//! need, per piece, only how the head weighs each logit there (a smooth
//! function of linear logits) times that gradient. The tracer keeps the
//! gradient as it keeps the lines: at a bend one unit switches, and only
//! what that changes upstream is updated, so no pass of the network runs
//! along the path.

use super::stack::{batch_norm_affine, Arch, Op, Stack};
use super::Activation;

/// The most pieces one model's path is cut into; past it the path is
/// treated as curved (the caller integrates it with evenly spaced points).
pub const MAX_PIECES: usize = 4096;

/// Whether the network is linear between bends that [`Tracer::trace`] can find:
/// ReLUs alone, no LayerNorm, no periodic embeddings.
pub fn piecewise_linear(arch: &Arch) -> bool {
    arch.periodic.is_none()
        && arch.ops.iter().all(|op| match op {
            Op::Activation { f } => *f == Activation::Relu,
            Op::LayerNorm { .. } => false,
            _ => true,
        })
}

/// One piece of one model's path, on which the model is linear.
#[derive(Debug)]
pub struct Piece<'a> {
    pub model: usize,
    pub start: f64,
    pub end: f64,
    /// The model's logits on the piece: `a + α·b`.
    pub a: &'a [f64],
    pub b: &'a [f64],
}

/// What tracing paths from one start through one stack needs, made once
/// for many paths: each model's dense weights (and their transposes) and
/// BatchNorms' affine maps in f64, each op's width, and the network at the
/// start. Each thread traces with its own [`Scratch`].
pub struct Tracer {
    ops: Vec<Op>,
    widths: Vec<usize>,
    /// The first layer's products at the start, `[K·h]`.
    from: Vec<f32>,
    /// Per model, per op, its parameters.
    models: Vec<Vec<Params>>,
    /// Per model, the network at the start.
    starts: Vec<Start>,
    /// Units of the first layer, and logits, of each model.
    h: usize,
    logits: usize,
    first_relu: Option<usize>,
    /// Whether a switch at the first ReLU changes the gradient in one unit
    /// alone: only elementwise ops stand between it and the first layer.
    first_is_elementwise: bool,
    /// Whether an op's output is read along the path (a ReLU's input, or
    /// the logits); the others' outputs are kept at the start alone.
    read: Vec<bool>,
}

/// One op's parameters in one model, in f64.
enum Params {
    /// `w` is `outputs × inputs`, row after row; `wt` its transpose.
    Dense {
        w: Vec<f64>,
        wt: Vec<f64>,
        bias: Vec<f64>,
    },
    Affine {
        scale: Vec<f64>,
        offset: Vec<f64>,
    },
    None,
}

/// One model at the start of every path: each op's output, each ReLU's
/// units' states (a unit exactly at zero starts off; a path that raises
/// it switches it on at once), and each op's output's adjoint, the logits'
/// gradient in it (`logits × width`, logit after logit).
struct Start {
    outs: Vec<Vec<f64>>,
    on: Vec<Vec<bool>>,
    adjoints: Vec<Vec<f64>>,
}

/// Buffers one thread's traces reuse, row after row.
#[derive(Default)]
pub struct Scratch {
    outs: Vec<Line>,
    deltas: Vec<Line>,
    on: Vec<Vec<bool>>,
    adjoints: Vec<Vec<f64>>,
    changes: Vec<Vec<f64>>,
    touched: Vec<bool>,
    reached: Vec<bool>,
    fixed: Vec<(f64, usize, usize)>,
    crosses: Vec<f64>,
    /// Each logit's weight on the current piece, and summed over the
    /// pieces so far.
    weights: Vec<f64>,
    weighed: Vec<f64>,
    /// Each change of the gradient times the weight before it, summed.
    earlier: Vec<f64>,
}

impl Tracer {
    /// Paths from the first-layer products `from` (without bias, `[K·h]`
    /// as `Stack::linear_products` lays them out); `None` when the network
    /// is not [`piecewise_linear`].
    pub fn new(net: &Stack, from: &[f32]) -> Option<Tracer> {
        let arch = &net.arch;
        if !piecewise_linear(arch) {
            return None;
        }
        let Some(&Op::Dense { outputs: h, .. }) = arch.ops.first() else { return None };
        let widen = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
        let models = (0..net.k)
            .map(|m| {
                (0..arch.ops.len())
                    .map(|i| match arch.ops[i] {
                        Op::Dense { inputs, outputs } if i > 0 => {
                            let slot = arch.slot_of(i);
                            let w = widen(&net.params[slot][m * outputs * inputs..(m + 1) * outputs * inputs]);
                            let mut wt = vec![0.0; w.len()];
                            for (o, row) in w.chunks_exact(inputs).enumerate() {
                                for (c, &v) in row.iter().enumerate() {
                                    wt[c * outputs + o] = v;
                                }
                            }
                            let bias = widen(&net.params[slot + 1][m * outputs..(m + 1) * outputs]);
                            Params::Dense { w, wt, bias }
                        }
                        Op::BatchNorm { width } => {
                            let (slot, s) = (arch.slot_of(i), arch.state_of(i));
                            let (scale, offset) = batch_norm_affine(
                                &net.params[slot],
                                &net.params[slot + 1],
                                &net.state[s],
                                &net.state[s + 1],
                            );
                            let cols = m * width..(m + 1) * width;
                            Params::Affine { scale: widen(&scale[cols.clone()]), offset: widen(&offset[cols]) }
                        }
                        _ => Params::None,
                    })
                    .collect()
            })
            .collect();
        let first_relu = arch.ops.iter().position(|op| matches!(op, Op::Activation { .. }));
        let mut tracer = Tracer {
            ops: arch.ops.clone(),
            widths: (0..arch.ops.len()).map(|i| arch.width_after(i)).collect(),
            from: from.to_vec(),
            models,
            starts: Vec::new(),
            h,
            logits: arch.outputs(),
            first_relu,
            first_is_elementwise: first_relu.is_some_and(|i| {
                arch.ops[1..i].iter().all(|op| matches!(op, Op::BatchNorm { .. } | Op::Dropout { .. }))
            }),
            read: (0..arch.ops.len())
                .map(|i| i + 1 == arch.ops.len() || matches!(arch.ops[i + 1], Op::Activation { .. }))
                .collect(),
        };
        let bias = &net.params[arch.slot_of(0) + 1];
        tracer.starts =
            (0..net.k).map(|m| tracer.start(m, &from[m * h..(m + 1) * h], &bias[m * h..(m + 1) * h])).collect();
        Some(tracer)
    }

    /// Model `m` at the start of every path: a full pass forward from its
    /// first-layer products `from` and `bias`, then backward.
    fn start(&self, m: usize, from: &[f32], bias: &[f32]) -> Start {
        let (ops, params) = (self.ops.len(), &self.models[m]);
        let mut outs: Vec<Line> = Vec::with_capacity(ops);
        let mut on = vec![Vec::new(); ops];
        for i in 0..ops {
            let mut out = Line::default();
            out.resize(self.widths[i]);
            match self.ops[i] {
                Op::Dense { .. } if i == 0 => {
                    out.a.iter_mut().zip(from.iter().zip(bias)).for_each(|(x, (&f, &b))| *x = f as f64 + b as f64);
                }
                Op::Activation { .. } => {
                    on[i] = outs[i - 1].a.iter().map(|&a| a > 0.0).collect();
                    out.copy_from(&outs[i - 1]);
                    out.mask(&on[i]);
                }
                _ => {
                    let skip = outs.get(residual_source(&self.ops[i]));
                    apply(&self.ops[i], &params[i], &outs[i - 1], skip, false, None, &mut out);
                }
            }
            outs.push(out);
        }
        let logits = self.logits;
        let mut adjoints: Vec<Vec<f64>> = self.widths.iter().map(|w| vec![0.0; logits * w]).collect();
        for o in 0..logits {
            adjoints[ops - 1][o * logits + o] = 1.0;
        }
        self.pull_back(params, ops - 1, &on, &mut adjoints, &mut vec![true; ops]);
        Start { outs: outs.into_iter().map(|line| line.a).collect(), on, adjoints }
    }

    /// The integral along the path of first-layer products from the start
    /// to `to` (`[K·h]`) of the score's gradient in the products, into
    /// `out` (`[K·h]`, overwritten). `weigh` says, for one piece of one
    /// model, the integral over the piece of the score's derivative in each
    /// of the model's logits (into its second argument); the score is taken
    /// to be a sum over the models, each of its own logits. Returns how
    /// many pieces were weighed; `None` when a model's path bends more than
    /// [`MAX_PIECES`] times.
    pub fn integrate(
        &self,
        to: &[f32],
        weigh: impl FnMut(&Piece<'_>, &mut [f64]),
        scratch: &mut Scratch,
        out: &mut [f64],
    ) -> Option<usize> {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            // SAFETY: this CPU has AVX2, checked just above.
            return unsafe { self.integrate_avx2(to, weigh, scratch, out) };
        }
        self.integrate_here(to, weigh, scratch, out)
    }

    /// [`Tracer::integrate`] compiled for AVX2, four f64 lanes a vector
    /// rather than SSE2's two, chosen at run time since cerebrod is built
    /// for any x86-64: on the tracer benchmark, 10.1 → 7.8 µs a row. No
    /// fused multiply-add is enabled, and Rust never reorders
    /// floating-point arithmetic, so the results are the portable build's,
    /// bit for bit. Only what is inlined here gets the features: hence
    /// `#[inline(always)]` on `trace` and the helpers it calls (without it
    /// on the helpers, 9.4 µs), and no closure between here and `trace`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn integrate_avx2(
        &self,
        to: &[f32],
        weigh: impl FnMut(&Piece<'_>, &mut [f64]),
        scratch: &mut Scratch,
        out: &mut [f64],
    ) -> Option<usize> {
        self.integrate_here(to, weigh, scratch, out)
    }

    /// The body of [`Tracer::integrate`], inlined into each build of it.
    #[inline(always)]
    fn integrate_here(
        &self,
        to: &[f32],
        mut weigh: impl FnMut(&Piece<'_>, &mut [f64]),
        scratch: &mut Scratch,
        out: &mut [f64],
    ) -> Option<usize> {
        let h = self.h;
        // A loop, not a fold: a closure would be a function of its own,
        // built without the caller's target features.
        let mut pieces = 0;
        for m in 0..self.models.len() {
            pieces += self.trace(m, to, scratch, &mut weigh, &mut out[m * h..(m + 1) * h])?;
        }
        Some(pieces)
    }

    /// Model `m`'s pieces along the path from the start to `to`, in order
    /// from 0 to 1, each given to `weigh` with the model's logits on it
    /// (see [`Tracer::integrate`]), and the integral of the score's gradient
    /// in the model's first-layer products into `out` (`[h]`); how many
    /// pieces there were, or `None` past [`MAX_PIECES`]. The path starts
    /// where every path does (`Start`): only the lines' slopes are the
    /// path's own, one pass forward. At each bend one unit switches, and
    /// only what that changes downstream (the lines) and upstream (the
    /// gradient) is updated. A ReLU with no ReLU before it sees the same
    /// lines all along, so its units' switches are sorted once.
    ///
    /// The gradient is not added up piece by piece: with `W` the pieces'
    /// weights summed, and each change `Δ` of the gradient at a bend
    /// weighed by the sum `C` of the weights before it, the integral is
    /// `g_end·W − Σ Δ·C`. A switch at the first ReLU changes one unit of
    /// the gradient, so most bends cost the gradient a handful of
    /// operations, not a pass over the layer.
    #[inline(always)]
    pub fn trace(
        &self,
        m: usize,
        to: &[f32],
        scratch: &mut Scratch,
        mut weigh: impl FnMut(&Piece<'_>, &mut [f64]),
        out: &mut [f64],
    ) -> Option<usize> {
        let (h, ops, logits) = (self.h, self.ops.len(), self.logits);
        let params = &self.models[m];
        let Scratch {
            outs,
            deltas,
            on,
            adjoints,
            changes,
            touched,
            reached,
            fixed,
            crosses,
            weights,
            weighed,
            earlier,
        } = scratch;
        outs.resize_with(ops, Line::default);
        deltas.resize_with(ops, Line::default);
        on.resize_with(ops, Vec::new);
        adjoints.resize_with(ops, Vec::new);
        changes.resize_with(ops, Vec::new);
        touched.resize(ops, false);
        reached.resize(ops, false);
        weights.clear();
        weights.resize(logits, 0.0);
        weighed.clear();
        weighed.resize(logits, 0.0);
        earlier.clear();
        earlier.resize(logits * h, 0.0);

        // Each op's output on the current piece, a + α·b, each ReLU's units'
        // states, and each op's output's adjoint, at α = 0.
        let start = &self.starts[m];
        for i in 0..ops {
            let (before, after) = outs.split_at_mut(i);
            let out = &mut after[0];
            out.a.clear();
            out.a.extend_from_slice(&start.outs[i]);
            out.b.resize(self.widths[i], 0.0);
            match self.ops[i] {
                Op::Dense { .. } if i == 0 => {
                    let (from, to) = (&self.from[m * h..(m + 1) * h], &to[m * h..(m + 1) * h]);
                    out.b.iter_mut().zip(from.iter().zip(to)).for_each(|(b, (&f, &t))| *b = (t - f) as f64);
                }
                Op::Activation { .. } => {
                    let input = &before[i - 1].b;
                    out.b.iter_mut().zip(input.iter().zip(&start.on[i])).for_each(|(b, (&x, &on))| {
                        *b = kept(x, on);
                    });
                }
                _ => {
                    let skip = before.get(residual_source(&self.ops[i])).map(|line| &line.b[..]);
                    slope(&self.ops[i], &params[i], &before[i - 1].b, skip, &mut out.b);
                }
            }
            on[i].clone_from(&start.on[i]);
            adjoints[i].clone_from(&start.adjoints[i]);
        }

        // Switches of the ReLUs whose inputs never change, in order.
        let first_relu = self.first_relu;
        fixed.clear();
        if let Some(i) = first_relu {
            crossings(&outs[i - 1], &on[i], crosses);
            let ahead = crosses.iter().enumerate().filter(|(_, c)| (0.0..1.0).contains(*c));
            fixed.extend(ahead.map(|(u, &cross)| (cross, i, u)));
            fixed.sort_unstable_by(|x, y| y.0.total_cmp(&x.0));
        }

        for (i, (delta, change)) in deltas.iter_mut().zip(changes.iter_mut()).enumerate() {
            delta.resize(self.widths[i]);
            change.clear();
            change.resize(logits * self.widths[i], 0.0);
        }
        let mut pieces = 0;
        let mut at = 0.0f64;
        loop {
            // The next switch: an active unit whose input falls to zero, or
            // an inactive one whose input rises to it.
            let mut next: Option<(f64, usize, usize)> = fixed.last().copied();
            let mut soonest = next.map_or(1.0, |(t, _, _)| t);
            for (i, states) in on.iter().enumerate().filter(|(i, s)| !s.is_empty() && Some(*i) != first_relu) {
                crossings(&outs[i - 1], states, crosses);
                let least = least(crosses);
                if least < soonest {
                    soonest = least;
                    let u = crosses.iter().position(|&c| c == least).expect("the least is one of them");
                    next = Some((least.max(at), i, u));
                }
            }
            let end = next.map_or(1.0, |(cross, _, _)| cross.max(at));
            if end > at {
                let last = &outs[ops - 1];
                weigh(&Piece { model: m, start: at, end, a: &last.a, b: &last.b }, weights);
                weighed.iter_mut().zip(weights.iter()).for_each(|(s, w)| *s += w);
                pieces += 1;
            }
            let Some((_, i, u)) = next else { break };
            if Some(i) == first_relu {
                fixed.pop();
            }
            if pieces >= MAX_PIECES {
                return None;
            }
            at = end;
            on[i][u] = !on[i][u];
            let sign = if on[i][u] { 1.0 } else { -1.0 };

            // What the switch adds to op i's output, then to every op after
            // it; `only`: while the change is in unit u alone.
            let (a, b) = (sign * outs[i - 1].a[u], sign * outs[i - 1].b[u]);
            touched.fill(false);
            deltas[i].clear();
            deltas[i].a[u] = a;
            deltas[i].b[u] = b;
            outs[i].a[u] += a;
            outs[i].b[u] += b;
            touched[i] = true;
            let mut only = Some(u);
            for j in i + 1..ops {
                if !touched[j - 1] {
                    continue;
                }
                let (before, after) = deltas.split_at_mut(j);
                let (input, change) = (&before[j - 1], &mut after[0]);
                match self.ops[j] {
                    Op::Activation { .. } => {
                        change.copy_from(input);
                        change.mask(&on[j]);
                    }
                    _ => {
                        let skip = residual_source(&self.ops[j]);
                        let skip = (skip < j && touched[skip]).then(|| &before[skip]);
                        apply(&self.ops[j], &params[j], input, skip, true, only, change);
                        if matches!(self.ops[j], Op::Dense { .. }) || skip.is_some() {
                            only = None;
                        }
                    }
                }
                if self.read[j] {
                    outs[j].add(change);
                }
                touched[j] = true;
            }

            // What it adds to the adjoint of op i's input (unit u passes op
            // i's adjoint back now, or stops), then to every op before it.
            if Some(i) == first_relu && self.first_is_elementwise {
                for o in 0..logits {
                    let mut d = sign * adjoints[i][o * h + u];
                    for j in (0..i).rev() {
                        adjoints[j][o * h + u] += d;
                        if let Params::Affine { scale, .. } = &params[j] {
                            d *= scale[u];
                        }
                    }
                    earlier[o * h + u] += d * weighed[o];
                }
                continue;
            }
            let width = self.widths[i];
            for change in &mut changes[..i] {
                change.fill(0.0);
            }
            for o in 0..logits {
                changes[i - 1][o * width + u] = sign * adjoints[i][o * width + u];
            }
            reached.fill(false);
            reached[i - 1] = true;
            self.pull_back(params, i - 1, on, changes, reached);
            for j in (0..i).filter(|&j| reached[j]) {
                adjoints[j].iter_mut().zip(&changes[j]).for_each(|(x, d)| *x += d);
            }
            if reached[0] {
                for ((earlier, change), &weighed) in
                    earlier.chunks_exact_mut(h).zip(changes[0].chunks_exact(h)).zip(weighed.iter())
                {
                    earlier.iter_mut().zip(change).for_each(|(e, d)| *e += d * weighed);
                }
            }
        }
        out.fill(0.0);
        for ((gradient, earlier), &weighed) in
            adjoints[0].chunks_exact(h).zip(earlier.chunks_exact(h)).zip(weighed.iter())
        {
            out.iter_mut().zip(gradient.iter().zip(earlier)).for_each(|(o, (g, e))| *o += g * weighed - e);
        }
        Some(pieces)
    }

    /// Pulls the adjoints of ops `top` down to 1 back through each op into
    /// those of the ops it reads (op `j`'s into op `j − 1`'s, and a
    /// residual's into its skip's too), each op whose adjoint `reached`
    /// marks, and marks the ops it reaches. `on` holds each ReLU's units'
    /// states.
    #[inline(always)]
    fn pull_back(
        &self,
        params: &[Params],
        top: usize,
        on: &[Vec<bool>],
        adjoints: &mut [Vec<f64>],
        reached: &mut [bool],
    ) {
        for j in (1..=top).rev() {
            if !reached[j] {
                continue;
            }
            let (below, above) = adjoints.split_at_mut(j);
            let (lower, input) = below.split_at_mut(j - 1);
            let (output, input) = (&above[0], &mut input[0]);
            let add = |into: &mut [f64]| into.iter_mut().zip(output).for_each(|(x, d)| *x += d);
            match (&self.ops[j], &params[j]) {
                (Op::Dense { inputs, outputs }, Params::Dense { w, .. }) => {
                    for (out_row, in_row) in output.chunks_exact(*outputs).zip(input.chunks_exact_mut(*inputs)) {
                        // A change is often one unit: skip the zero rows of W.
                        for (&d, w_row) in out_row.iter().zip(w.chunks_exact(*inputs)).filter(|(&d, _)| d != 0.0) {
                            in_row.iter_mut().zip(w_row).for_each(|(x, &w)| *x += d * w);
                        }
                    }
                }
                (Op::Activation { .. }, _) => {
                    let on = &on[j];
                    for (input, output) in input.chunks_exact_mut(on.len()).zip(output.chunks_exact(on.len())) {
                        for ((x, &d), &on) in input.iter_mut().zip(output).zip(on) {
                            *x += kept(d, on);
                        }
                    }
                }
                (Op::BatchNorm { width }, Params::Affine { scale, .. }) => {
                    for (input, output) in input.chunks_exact_mut(*width).zip(output.chunks_exact(*width)) {
                        for ((x, &d), &s) in input.iter_mut().zip(output).zip(scale) {
                            *x += d * s;
                        }
                    }
                }
                (Op::Residual { .. }, _) => {
                    add(input);
                    let source = residual_source(&self.ops[j]);
                    if source == j - 1 {
                        add(input);
                    } else {
                        add(&mut lower[source]);
                    }
                    reached[source] = true;
                }
                _ => add(input),
            }
            reached[j - 1] = true;
        }
    }
}

/// Op `op` (not an activation, not the first) with its `params` applied
/// to `input` into `out`, with `skip` the output a residual op adds. A
/// change (`linear`) passes through the linear part alone: no bias, no
/// offset; `only` says when the change is in that one unit of `input`.
#[inline(always)]
fn apply(
    op: &Op,
    params: &Params,
    input: &Line,
    skip: Option<&Line>,
    linear: bool,
    only: Option<usize>,
    out: &mut Line,
) {
    match (op, params) {
        (Op::Dense { inputs, outputs }, Params::Dense { w, wt, bias }) => match only.filter(|_| linear) {
            Some(c) => {
                let (a, b) = (input.a[c], input.b[c]);
                let column = &wt[c * outputs..(c + 1) * outputs];
                for ((x, y), &w) in out.a.iter_mut().zip(out.b.iter_mut()).zip(column) {
                    (*x, *y) = (w * a, w * b);
                }
            }
            None => {
                for (o, row) in w.chunks_exact(*inputs).enumerate() {
                    out.a[o] = dot(row, &input.a) + if linear { 0.0 } else { bias[o] };
                    out.b[o] = dot(row, &input.b);
                }
            }
        },
        (Op::BatchNorm { .. }, Params::Affine { scale, offset }) => {
            for u in 0..input.a.len() {
                out.a[u] = input.a[u] * scale[u] + if linear { 0.0 } else { offset[u] };
                out.b[u] = input.b[u] * scale[u];
            }
        }
        (Op::Residual { .. }, _) => {
            out.copy_from(input);
            if let Some(skip) = skip {
                out.add(skip);
            }
        }
        _ => out.copy_from(input),
    }
}

/// The slopes of op `op`'s output (not an activation's, not the first op's)
/// from those of its `input` and, for a residual, of its `skip`.
#[inline(always)]
fn slope(op: &Op, params: &Params, input: &[f64], skip: Option<&[f64]>, out: &mut [f64]) {
    match (op, params) {
        (Op::Dense { inputs, .. }, Params::Dense { w, .. }) => {
            out.iter_mut().zip(w.chunks_exact(*inputs)).for_each(|(b, row)| *b = dot(row, input));
        }
        (Op::BatchNorm { .. }, Params::Affine { scale, .. }) => {
            out.iter_mut().zip(input.iter().zip(scale)).for_each(|(b, (&x, &s))| *b = x * s);
        }
        _ => {
            out.copy_from_slice(input);
            if let (Op::Residual { .. }, Some(skip)) = (op, skip) {
                out.iter_mut().zip(skip).for_each(|(b, &x)| *b += x);
            }
        }
    }
}

/// `Σ w·x`, in four sums so that the additions need not wait on each other.
#[inline(always)]
fn dot(w: &[f64], x: &[f64]) -> f64 {
    let (w4, x4) = (w.chunks_exact(4), x.chunks_exact(4));
    let tail: f64 = w4.remainder().iter().zip(x4.remainder()).map(|(w, x)| w * x).sum();
    let mut sums = [0.0f64; 4];
    for (w, x) in w4.zip(x4) {
        for k in 0..4 {
            sums[k] += w[k] * x[k];
        }
    }
    (sums[0] + sums[1]) + (sums[2] + sums[3]) + tail
}

/// Where each unit of a ReLU whose input is `input` switches, into
/// `crosses`: the α where an active unit's input falls to zero or an
/// inactive one's rises to it, infinity where it heads away. Every unit's
/// first, without a branch on its state (it would be mispredicted about as
/// often as not), so that the loop runs on vectors.
#[inline(always)]
fn crossings(input: &Line, on: &[bool], crosses: &mut Vec<f64>) {
    crosses.clear();
    crosses.extend(input.a.iter().zip(&input.b).zip(on).map(|((&a, &b), &on)| {
        let heading = (b < 0.0) == on && b != 0.0;
        if heading {
            -a / b
        } else {
            f64::INFINITY
        }
    }));
}

/// `x` where `on`, else 0: its bits masked rather than a choice made, so
/// that a loop of these takes no branch and runs on vectors (LLVM keeps a
/// select over a `bool` slice as a branch a unit).
#[inline(always)]
fn kept(x: f64, on: bool) -> f64 {
    f64::from_bits(x.to_bits() & u64::from(on).wrapping_neg())
}

/// The least of `values` (infinity for none), in four running minima
/// that need not wait on each other and compile to vector minima.
#[inline(always)]
fn least(values: &[f64]) -> f64 {
    let chunks = values.chunks_exact(4);
    let tail = chunks.remainder().iter().fold(f64::INFINITY, |m, &v| if v < m { v } else { m });
    let mut mins = [f64::INFINITY; 4];
    for chunk in chunks {
        for k in 0..4 {
            mins[k] = if chunk[k] < mins[k] { chunk[k] } else { mins[k] };
        }
    }
    [tail, mins[1], mins[2], mins[3]].into_iter().fold(mins[0], |m, v| if v < m { v } else { m })
}

/// The op whose output a residual op adds (`usize::MAX`: none).
fn residual_source(op: &Op) -> usize {
    match op {
        Op::Residual { from } => from - 1,
        _ => usize::MAX,
    }
}

/// `a + α·b` for each unit of one op's output.
#[derive(Debug, Clone, Default)]
struct Line {
    a: Vec<f64>,
    b: Vec<f64>,
}

impl Line {
    fn resize(&mut self, width: usize) {
        self.a.clear();
        self.a.resize(width, 0.0);
        self.b.clear();
        self.b.resize(width, 0.0);
    }

    #[inline(always)]
    fn clear(&mut self) {
        self.a.fill(0.0);
        self.b.fill(0.0);
    }

    #[inline(always)]
    fn copy_from(&mut self, other: &Line) {
        self.a.copy_from_slice(&other.a);
        self.b.copy_from_slice(&other.b);
    }

    #[inline(always)]
    fn mask(&mut self, on: &[bool]) {
        for (a, &on) in self.a.iter_mut().zip(on) {
            *a = kept(*a, on);
        }
        for (b, &on) in self.b.iter_mut().zip(on) {
            *b = kept(*b, on);
        }
    }

    #[inline(always)]
    fn add(&mut self, other: &Line) {
        self.a.iter_mut().zip(&other.a).for_each(|(x, y)| *x += y);
        self.b.iter_mut().zip(&other.b).for_each(|(x, y)| *x += y);
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::stack::test_support::randomise;
    use crate::{Batch, Embedding, StackCache};

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

    /// A stack of two randomised models of [`piecewise`] and the products
    /// of a few random rows.
    fn two_models_and_products(outputs: usize, n: usize) -> (Stack, Vec<f32>) {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let models: Vec<Stack> = (0..2)
            .map(|m| {
                let mut net = Stack::new(piecewise(outputs), 5, &mut [ChaCha8Rng::seed_from_u64(m)]);
                randomise(&mut net, &mut rng);
                net
            })
            .collect();
        let net = Stack::from_models(&models);
        let x: Vec<f32> = (0..n * 3).map(|_| rng.random_range(-2.0..2.0)).collect();
        let codes: Vec<u32> = (0..n as u32).map(|r| r % 4).collect();
        let products = net.linear_products(&x, &net.categorical_vectors(Batch { x: &x, codes: &codes, n }), n);
        (net, products)
    }

    /// Every model's logits at `alpha` along the path, by a forward pass.
    fn logits_at(net: &Stack, from: &[f32], to: &[f32], alpha: f64) -> Vec<f64> {
        let along: Vec<f32> = from.iter().zip(to).map(|(f, t)| f + alpha as f32 * (t - f)).collect();
        let mut cache = StackCache::default();
        net.forward_products(Batch { x: &[], codes: &[], n: 1 }, &along, &mut cache);
        cache.logits().iter().map(|&l| l as f64).collect()
    }

    /// On every piece a model's logits are the piece's lines (and so
    /// linear in α), no piece is cut where the model does not bend (two
    /// neighbours together are not linear), and the pieces cover [0, 1].
    #[test]
    fn a_path_is_linear_on_each_piece_and_bends_between_them() {
        let (outputs, n) = (3, 6);
        let (net, products) = two_models_and_products(outputs, n);
        let kh = products.len() / n;
        let tracer = Tracer::new(&net, &products[..kh]).expect("piecewise linear");
        let mut scratch = Scratch::default();
        let mut total = 0;
        for r in 1..n {
            let (from, to) = (&products[..kh], &products[r * kh..(r + 1) * kh]);
            for m in 0..net.k {
                let mine = |alpha: f64| logits_at(&net, from, to, alpha)[m * outputs..(m + 1) * outputs].to_vec();
                let mut ends = Vec::new();
                let mut integral = vec![0.0; kh / net.k];
                let count = tracer
                    .trace(
                        m,
                        to,
                        &mut scratch,
                        |p, _| {
                            assert_eq!(p.model, m);
                            let inset = (p.end - p.start) * 1e-3;
                            for alpha in [p.start + inset, (p.start + p.end) / 2.0, p.end - inset] {
                                for (o, logit) in mine(alpha).iter().enumerate() {
                                    let line = p.a[o] + alpha * p.b[o];
                                    assert!(
                                        (logit - line).abs() < 1e-4,
                                        "row {r}, model {m}, {alpha}: {logit} vs {line}"
                                    );
                                }
                            }
                            ends.push((p.start, p.end));
                        },
                        &mut integral,
                    )
                    .expect("piecewise linear");
                assert_eq!(count, ends.len());
                assert_eq!((ends[0].0, ends.last().unwrap().1), (0.0, 1.0));
                assert!(ends.windows(2).all(|w| w[0].1 == w[1].0), "row {r}: the pieces meet: {ends:?}");
                total += ends.len();
                for pair in ends.windows(2) {
                    let inset = (pair[0].1 - pair[0].0).min(pair[1].1 - pair[1].0) * 1e-3;
                    let (a, b) = (pair[0].0 + inset, pair[1].1 - inset);
                    let (s, e, mid) = (mine(a), mine(b), mine((a + b) / 2.0));
                    if mid.iter().zip(s.iter().zip(&e)).all(|(m, (s, e))| (m - (s + e) / 2.0).abs() < 1e-4) {
                        // A cut where a unit only touches zero is harmless; most cut a bend.
                        total -= 1;
                    }
                }
            }
        }
        assert!(total > 3 * (n - 1), "the paths bend: {total} pieces that are cut at bends");
    }

    /// The traced gradient, integrated piece by piece, is the gradient of
    /// the backward pass integrated by many evenly spaced points; with a
    /// weight for each logit, the same logit's gradients are weighed.
    #[test]
    fn the_integral_is_the_backward_pass_gradient_along_the_path() {
        let (outputs, n) = (2, 5);
        let (net, products) = two_models_and_products(outputs, n);
        let kh = products.len() / n;
        let tracer = Tracer::new(&net, &products[..kh]).expect("piecewise linear");
        let mut scratch = Scratch::default();
        let wide = net.k * outputs;
        // The score: logit o of model m weighs 1 + o + 2m, a linear head.
        let weight = |m: usize, o: usize| (1 + o + 2 * m) as f64;
        let steps = 4000;
        for r in 1..n {
            let (from, to) = (&products[..kh], &products[r * kh..(r + 1) * kh]);
            let mut traced = vec![0.0f64; kh];
            let weigh = |p: &Piece<'_>, w: &mut [f64]| {
                for (o, w) in w.iter_mut().enumerate() {
                    *w = weight(p.model, o) * (p.end - p.start);
                }
            };
            let pieces = tracer.integrate(to, weigh, &mut scratch, &mut traced).expect("few bends");
            assert!(pieces > net.k, "row {r} bends");
            // The build this CPU runs (AVX2 where it has it) and the
            // portable one agree bit for bit.
            let mut portable = vec![0.0f64; kh];
            assert_eq!(tracer.integrate_here(to, weigh, &mut scratch, &mut portable), Some(pieces));
            assert_eq!(
                portable.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                traced.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "row {r}"
            );
            let along: Vec<f32> = (0..steps)
                .flat_map(|s| {
                    let alpha = (s as f32 + 0.5) / steps as f32;
                    from.iter().zip(to).map(move |(f, t)| f + alpha * (t - f))
                })
                .collect();
            let batch = Batch { x: &[], codes: &[], n: steps };
            let mut cache = StackCache::default();
            net.forward_products(batch, &along, &mut cache);
            let d_logits: Vec<f32> =
                (0..steps * wide).map(|i| weight((i % wide) / outputs, i % outputs) as f32 / steps as f32).collect();
            let (mut d_products, mut dx) = (Vec::new(), Vec::new());
            net.products_backward(batch, &mut cache, &d_logits, &mut d_products, &mut dx);
            for (u, &t) in traced.iter().enumerate() {
                let sampled: f64 = d_products.chunks_exact(kh).map(|d| d[u] as f64).sum();
                assert!((t - sampled).abs() < 2e-3 * (1.0 + t.abs()), "row {r}, product {u}: {t} vs {sampled}");
            }
            // Completeness of the linear head: the integral times the
            // products' change is the weighed logits' change.
            let change: f64 = traced.iter().zip(from.iter().zip(to)).map(|(g, (f, t))| g * (t - f) as f64).sum();
            let score =
                |l: Vec<f64>| l.iter().enumerate().map(|(i, l)| weight(i / outputs, i % outputs) * l).sum::<f64>();
            let expected = score(logits_at(&net, from, to, 1.0)) - score(logits_at(&net, from, to, 0.0));
            assert!((change - expected).abs() < 1e-4 * (1.0 + expected.abs()), "row {r}: {change} vs {expected}");
        }
    }

    #[test]
    fn networks_with_smooth_parts_are_not_cut() {
        let mut arch = piecewise(1);
        arch.ops[2] = Op::Activation { f: Activation::Gelu };
        assert!(!piecewise_linear(&arch));
        let mut arch = piecewise(1);
        arch.ops[1] = Op::LayerNorm { width: 12 };
        assert!(!piecewise_linear(&arch));
        let net = Stack::new(arch, 5, &mut [ChaCha8Rng::seed_from_u64(1)]);
        assert!(Tracer::new(&net, &[0.0; 12]).is_none());
    }
}
