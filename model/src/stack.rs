//! K networks of one architecture trained together, one pass over the data for all.
//!
//! Model selection trains many small networks on the same rows. Running them
//! one after another launches many small matrix products; a stack runs them
//! as one computation instead:
//!
//! - the first dense layer of all K models is one wide product over the
//!   shared input, `X [n × in] · W0ᵀ [in × K·h0]`;
//! - every later dense layer is block-diagonal: K products on strided views
//!   of the same activation matrix, with no copies;
//! - activations of all models live side by side in `[n × K·w]` matrices
//!   (model m owns columns `m·w .. (m+1)·w`), so element-wise layers,
//!   normalisations and dropout run over all models in one loop.
//!
//! A single model is a stack with K = 1. Every parameter tensor is stored
//! model after model (`[K × len]`), dense weights as `[out × in]` like
//! PyTorch's `Linear.weight`. Because every product sums in the same order
//! whatever K is, a model trained in a stack ends bit-identical to the same
//! model trained alone.

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::activation::{self, Activation};
use super::gemm::{gemm_strided, gemm_uniform, UniformScratch};

/// LayerNorm and BatchNorm's variance epsilon (PyTorch's default).
pub const NORM_EPS: f32 = 1e-5;
/// Weight of a batch's statistics in BatchNorm's running averages (PyTorch's default).
pub const BATCH_NORM_MOMENTUM: f32 = 0.1;

/// One layer of a network, applied to the output of the previous one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// `y = x · Wᵀ + b`. The first op of every network is dense; its input
    /// is the encoded features followed by the categorical embeddings.
    Dense {
        inputs: usize,
        outputs: usize,
    },
    Activation {
        f: Activation,
    },
    /// Normalises each row over its features, then scales and shifts.
    LayerNorm {
        width: usize,
    },
    /// Normalises each feature over the batch (running averages when scoring),
    /// then scales and shifts.
    BatchNorm {
        width: usize,
    },
    /// Zeroes each value with probability `p` while training, scaling the
    /// rest by `1/(1-p)`; the identity when scoring.
    Dropout {
        p: f32,
    },
    /// Adds the input of op `from` to this op's input: a residual connection
    /// around ops `from..this`.
    Residual {
        from: usize,
    },
}

/// A categorical column's learnt vectors: `vocabulary` rows plus one, always
/// zero, for values never seen in training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Embedding {
    pub vocabulary: usize,
    pub dim: usize,
}

/// Periodic embeddings of numeric inputs (MLP-PLR, Gorishniy et al., 2022):
/// input column `columns[f]` (a standardised value z) becomes
/// `ReLU([cos(2π·c·z), sin(2π·c·z)] · W_f + b_f)`, `dim` wide, with
/// `frequencies` learnt frequencies c (drawn from N(0, sigma²) at first).
/// Each model's embeddings follow its categorical ones into the first dense
/// layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Periodic {
    pub columns: Vec<usize>,
    pub frequencies: usize,
    pub dim: usize,
    pub sigma: f32,
}

impl Periodic {
    /// What one model's embeddings add to the first dense layer's inputs.
    pub fn width(&self) -> usize {
        self.columns.len() * self.dim
    }
}

/// The shape of every model of a stack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Arch {
    /// Width of the encoded (non-embedded) feature vector.
    pub inputs: usize,
    /// One per embedded categorical column, in the order of the codes.
    pub embeddings: Vec<Embedding>,
    pub ops: Vec<Op>,
    /// Periodic embeddings of some numeric inputs; their parameters are the
    /// last three slots (frequencies, weights, biases).
    #[serde(default)]
    pub periodic: Option<Periodic>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ArchError {
    #[error("a network starts with a dense layer over its inputs")]
    NoInputLayer,
    #[error("op {op} expects width {expected} but receives {found}")]
    Width { op: usize, expected: usize, found: usize },
    #[error("op {op}: a residual connection must start after the first op and before itself")]
    ResidualSource { op: usize },
    #[error("op {op}: dropout probability {p} is not in [0, 1)")]
    DropoutRate { op: usize, p: f32 },
    #[error("a periodic embedding reads input {column}, but there are {inputs}")]
    PeriodicColumn { column: usize, inputs: usize },
}

/// Where one parameter tensor of one model lives, and whether weight decay applies.
#[derive(Debug, Clone, Copy)]
pub struct Slot {
    pub len: usize,
    pub decay: bool,
}

impl Arch {
    /// A plain multi-layer perceptron: dense layers with `activation` between them.
    pub fn mlp(inputs: usize, hidden: &[usize], outputs: usize, activation: Activation) -> Arch {
        let mut ops = Vec::new();
        let mut width = inputs;
        for &h in hidden {
            ops.push(Op::Dense { inputs: width, outputs: h });
            ops.push(Op::Activation { f: activation });
            width = h;
        }
        ops.push(Op::Dense { inputs: width, outputs });
        Arch { inputs, embeddings: Vec::new(), ops, periodic: None }
    }

    /// The first dense layer's inputs beyond the encoded features: each
    /// model's categorical embeddings, then its periodic ones.
    pub fn embedded_width(&self) -> usize {
        self.categorical_width() + self.periodic.as_ref().map_or(0, Periodic::width)
    }

    fn categorical_width(&self) -> usize {
        self.embeddings.iter().map(|e| e.dim).sum()
    }

    /// Output width of op `i` (`i = ops.len()` is not allowed).
    pub fn width_after(&self, i: usize) -> usize {
        self.ops[..=i]
            .iter()
            .rev()
            .find_map(|op| match op {
                Op::Dense { outputs, .. } => Some(*outputs),
                _ => None,
            })
            .unwrap_or(self.inputs + self.embedded_width())
    }

    /// Input width of op `i`.
    pub fn width_before(&self, i: usize) -> usize {
        if i == 0 {
            self.inputs + self.embedded_width()
        } else {
            self.width_after(i - 1)
        }
    }

    pub fn outputs(&self) -> usize {
        self.ops.len().checked_sub(1).map_or(0, |last| self.width_after(last))
    }

    pub fn has_batch_norm(&self) -> bool {
        self.ops.iter().any(|op| matches!(op, Op::BatchNorm { .. }))
    }

    /// Multiply-adds of the dense layers for one row of one model.
    pub fn macs_per_row(&self) -> usize {
        self.ops.iter().map(|op| if let Op::Dense { inputs, outputs } = op { inputs * outputs } else { 0 }).sum()
    }

    pub fn validate(&self) -> Result<(), ArchError> {
        if !matches!(self.ops.first(), Some(Op::Dense { .. })) {
            return Err(ArchError::NoInputLayer);
        }
        if let Some(&column) = self.periodic.iter().flat_map(|p| &p.columns).find(|&&c| c >= self.inputs) {
            return Err(ArchError::PeriodicColumn { column, inputs: self.inputs });
        }
        for (i, op) in self.ops.iter().enumerate() {
            let found = self.width_before(i);
            let expected = match *op {
                Op::Dense { inputs, .. } => inputs,
                Op::LayerNorm { width } | Op::BatchNorm { width } => width,
                Op::Dropout { p } if !(0.0..1.0).contains(&p) => return Err(ArchError::DropoutRate { op: i, p }),
                Op::Residual { from } if from == 0 || from >= i => return Err(ArchError::ResidualSource { op: i }),
                Op::Residual { from } => self.width_before(from),
                Op::Activation { .. } | Op::Dropout { .. } => found,
            };
            if expected != found {
                return Err(ArchError::Width { op: i, expected, found });
            }
        }
        Ok(())
    }

    /// Parameter tensors of one model, in storage order: embedding tables,
    /// then each op's (weight, bias) or (gain, shift), then the periodic
    /// embeddings' frequencies `[F × k]`, weights `[F × 2k × dim]` and biases
    /// `[F × dim]`.
    pub fn slots(&self) -> Vec<Slot> {
        let mut slots: Vec<Slot> =
            self.embeddings.iter().map(|e| Slot { len: (e.vocabulary + 1) * e.dim, decay: true }).collect();
        for op in &self.ops {
            match *op {
                Op::Dense { inputs, outputs } => {
                    slots.push(Slot { len: inputs * outputs, decay: true });
                    slots.push(Slot { len: outputs, decay: false });
                }
                Op::LayerNorm { width } | Op::BatchNorm { width } => {
                    slots.push(Slot { len: width, decay: false });
                    slots.push(Slot { len: width, decay: false });
                }
                _ => {}
            }
        }
        if let Some(p) = &self.periodic {
            let (f, k, d) = (p.columns.len(), p.frequencies, p.dim);
            slots.push(Slot { len: f * k, decay: false });
            slots.push(Slot { len: f * 2 * k * d, decay: true });
            slots.push(Slot { len: f * d, decay: false });
        }
        slots
    }

    /// Index of the periodic embeddings' first slot (their frequencies).
    pub fn periodic_slot(&self) -> usize {
        self.slot_of(self.ops.len())
    }

    /// Index of op `i`'s first parameter slot.
    pub fn slot_of(&self, i: usize) -> usize {
        self.embeddings.len()
            + self.ops[..i]
                .iter()
                .map(|op| match op {
                    Op::Dense { .. } | Op::LayerNorm { .. } | Op::BatchNorm { .. } => 2,
                    _ => 0,
                })
                .sum::<usize>()
    }

    /// Index of op `i`'s running mean in the state (BatchNorm only; the
    /// running variance follows it).
    pub fn state_of(&self, i: usize) -> usize {
        2 * self.ops[..i].iter().filter(|op| matches!(op, Op::BatchNorm { .. })).count()
    }

    fn is_residual_source(&self, i: usize) -> bool {
        self.ops.iter().any(|op| matches!(op, Op::Residual { from } if *from == i))
    }
}

/// The rows a step or a prediction works on: `n` rows of encoded features
/// (`n × arch.inputs`) and of embedding codes (`n × arch.embeddings.len()`).
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    pub x: &'a [f32],
    pub codes: &'a [u32],
    pub n: usize,
}

impl<'a> Batch<'a> {
    /// Rows `range` of a batch whose rows are `inputs` and `codes_per_row` wide.
    pub fn rows(&self, range: std::ops::Range<usize>, inputs: usize, codes_per_row: usize) -> Batch<'a> {
        Batch {
            x: &self.x[range.start * inputs..range.end * inputs],
            codes: &self.codes[range.start * codes_per_row..range.end * codes_per_row],
            n: range.len(),
        }
    }
}

/// Training (batch statistics, dropout) or scoring (running statistics, no dropout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `step` and the batch's first row, `row_offset`, seed the dropout masks,
    /// so a batch split across threads draws what it would draw whole.
    Train {
        step: u64,
        row_offset: usize,
    },
    Eval,
    /// Scoring, keeping every op's output for [`Stack::products_backward`].
    Gradient,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stack {
    pub k: usize,
    pub arch: Arch,
    /// Slot `s` of [`Arch::slots`] holds `[K × len]`, model after model.
    pub params: Vec<Vec<f32>>,
    /// BatchNorm running means and variances, `[K × width]` each.
    pub state: Vec<Vec<f32>>,
    /// Seeds the dropout masks; models of one stack share it.
    pub seed: u64,
}

/// Activations of the last forward pass, kept for the backward pass.
#[derive(Debug, Default)]
pub struct StackCache {
    /// Gathered embeddings, `[n × K·e]`, and one model's products of them.
    emb: Vec<f32>,
    emb_product: Vec<f32>,
    /// Periodic embeddings' `[cos, sin]` features, `[n × K × F × 2k]`.
    periodic: Vec<f32>,
    uniform: UniformScratch,
    /// Output of every op, `[n × K·w]`; when scoring, element-wise ops work
    /// in place and `at[i]` says which buffer holds op i's output.
    out: Vec<Vec<f32>>,
    at: Vec<usize>,
    /// Normalised values (norms) or masks (dropout).
    aux: Vec<Vec<f32>>,
    /// LayerNorm: `1/σ` per row and model. BatchNorm: batch mean, unbiased
    /// variance and `1/σ` per column.
    stats: Vec<Vec<f32>>,
    delta: Vec<f32>,
    delta_prev: Vec<f32>,
    /// Gradient flowing into op outputs through residual connections.
    pending: Vec<Vec<f32>>,
    d_emb: Vec<f32>,
    /// Norm gains' and shifts' gradients when only the inputs' are wanted.
    d_norm: [Vec<f32>; 2],
}

impl StackCache {
    /// Logits of all models of the last forward pass, `[n × K·out]`.
    pub fn logits(&self) -> &[f32] {
        self.at.last().map_or(&[], |&b| self.out[b].as_slice())
    }
}

/// Gradients shaped like the stack's parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct StackGradients {
    pub params: Vec<Vec<f32>>,
}

/// A draw from N(0, 1) (Box–Muller, from two uniform draws).
fn standard_normal(rng: &mut impl Rng) -> f32 {
    let u: f64 = 1.0 - rng.random::<f64>();
    let v: f64 = rng.random::<f64>();
    ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
}

/// A well-mixed 64-bit hash (SplitMix64's finaliser).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Whether dropout keeps value `col` of row `row` at op `op` in step `step`:
/// a pure function of its arguments, the same for a model alone or in a
/// stack, on one thread or several.
pub fn dropout_keeps(seed: u64, step: u64, op: usize, row: usize, col: usize, p: f32) -> bool {
    let h = mix(mix(mix(seed ^ mix(step)) ^ ((op as u64) << 32 | col as u64)) ^ row as u64);
    ((h >> 40) as f32) * (1.0 / (1u64 << 24) as f32) >= p
}

impl Stack {
    /// K models of architecture `arch`, model k initialised from `rngs[k]`
    /// exactly as it would be alone.
    pub fn new<R: Rng>(arch: Arch, seed: u64, rngs: &mut [R]) -> Stack {
        arch.validate().expect("a valid architecture");
        let singles: Vec<Stack> = rngs.iter_mut().map(|r| Stack::init_one(&arch, seed, r)).collect();
        Stack::from_models(&singles)
    }

    /// Embedding vectors uniform in ±1 (the unseen row zero); dense weights
    /// He-uniform when an activation follows, Glorot-uniform otherwise; biases
    /// and shifts 0, gains 1.
    fn init_one(arch: &Arch, seed: u64, rng: &mut impl Rng) -> Stack {
        let mut params = Vec::new();
        for e in &arch.embeddings {
            let mut table: Vec<f32> = (0..e.vocabulary * e.dim).map(|_| rng.random_range(-1.0..=1.0)).collect();
            table.resize((e.vocabulary + 1) * e.dim, 0.0);
            params.push(table);
        }
        let mut state = Vec::new();
        for (i, op) in arch.ops.iter().enumerate() {
            match *op {
                Op::Dense { inputs, outputs } => {
                    let activated = arch.ops[i + 1..]
                        .iter()
                        .find(|op| !matches!(op, Op::LayerNorm { .. } | Op::BatchNorm { .. } | Op::Dropout { .. }))
                        .is_some_and(|op| matches!(op, Op::Activation { .. }));
                    let bound = if activated {
                        (6.0 / inputs.max(1) as f64).sqrt()
                    } else {
                        (6.0 / (inputs + outputs).max(1) as f64).sqrt()
                    } as f32;
                    params.push((0..inputs * outputs).map(|_| rng.random_range(-bound..=bound)).collect());
                    params.push(vec![0.0; outputs]);
                }
                Op::LayerNorm { width } | Op::BatchNorm { width } => {
                    params.push(vec![1.0; width]);
                    params.push(vec![0.0; width]);
                    if matches!(op, Op::BatchNorm { .. }) {
                        state.push(vec![0.0; width]);
                        state.push(vec![1.0; width]);
                    }
                }
                _ => {}
            }
        }
        // Drawn last, so that a network without them draws what it did before.
        if let Some(p) = &arch.periodic {
            let (f, k, d) = (p.columns.len(), p.frequencies, p.dim);
            params.push((0..f * k).map(|_| p.sigma * standard_normal(rng)).collect());
            // PyTorch's Linear: weights and biases uniform in ±1/√fan_in.
            let bound = 1.0 / ((2 * k) as f32).sqrt();
            params.push((0..f * 2 * k * d).map(|_| rng.random_range(-bound..=bound)).collect());
            params.push((0..f * d).map(|_| rng.random_range(-bound..=bound)).collect());
        }
        Stack { k: 1, arch: arch.clone(), params, state, seed }
    }

    /// Stacks models of one architecture and seed.
    pub fn from_models(models: &[Stack]) -> Stack {
        let first = &models[0];
        assert!(models.iter().all(|m| m.arch == first.arch && m.seed == first.seed), "one architecture per stack");
        let cat = |pick: fn(&Stack) -> &Vec<Vec<f32>>| -> Vec<Vec<f32>> {
            (0..pick(first).len()).map(|s| models.iter().flat_map(|m| pick(m)[s].iter().copied()).collect()).collect()
        };
        Stack {
            k: models.iter().map(|m| m.k).sum(),
            arch: first.arch.clone(),
            params: cat(|m| &m.params),
            state: cat(|m| &m.state),
            seed: first.seed,
        }
    }

    /// Model `m` on its own.
    pub fn model(&self, m: usize) -> Stack {
        let part = |tensors: &Vec<Vec<f32>>| -> Vec<Vec<f32>> {
            tensors
                .iter()
                .map(|t| {
                    let len = t.len() / self.k;
                    t[m * len..(m + 1) * len].to_vec()
                })
                .collect()
        };
        Stack { k: 1, arch: self.arch.clone(), params: part(&self.params), state: part(&self.state), seed: self.seed }
    }

    pub fn outputs(&self) -> usize {
        self.arch.outputs()
    }

    pub fn zero_gradients(&self) -> StackGradients {
        StackGradients { params: self.params.iter().map(|p| vec![0.0; p.len()]).collect() }
    }

    /// Runs a batch through every model; the logits are left in `cache.logits()`.
    pub fn forward(&self, batch: Batch<'_>, cache: &mut StackCache, mode: Mode) {
        self.forward_from(batch, None, cache, mode);
    }

    /// [`Stack::forward`] in [`Mode::Gradient`], with the first dense
    /// layer's products of the encoded inputs and categorical vectors
    /// given (`[n × K·h]`, as [`Stack::linear_products`] computes them)
    /// instead of computed: along integrated gradients' straight path they
    /// are interpolated between two rows' products. The batch's inputs are
    /// read by the periodic embeddings alone (none: may be empty).
    pub fn forward_products(&self, batch: Batch<'_>, products: &[f32], cache: &mut StackCache) {
        self.forward_from(batch, Some(products), cache, Mode::Gradient);
    }

    fn forward_from(&self, batch: Batch<'_>, products: Option<&[f32]>, cache: &mut StackCache, mode: Mode) {
        let (k, n, arch) = (self.k, batch.n, &self.arch);
        let ops = arch.ops.len();
        let train = matches!(mode, Mode::Train { .. });
        cache.out.resize_with(ops, Vec::new);
        cache.aux.resize_with(ops, Vec::new);
        cache.stats.resize_with(ops, Vec::new);
        cache.at.clear();
        match products {
            // Only the periodic embeddings are read: the categorical ones
            // are in the products.
            Some(_) => cache.emb.resize(n * k * arch.embedded_width(), 0.0),
            None => self.gather_embeddings(batch, &mut cache.emb),
        }
        self.periodic_embeddings(batch, &mut cache.emb, &mut cache.periodic);

        for i in 0..ops {
            let wide_in = k * arch.width_before(i);
            let wide_out = k * arch.width_after(i);
            let slot = arch.slot_of(i);
            // Element-wise ops run in place when scoring, unless a residual
            // connection still needs their input (or a backward pass will).
            let in_place = mode == Mode::Eval && i > 0 && !arch.is_residual_source(i);
            let src = if i == 0 { usize::MAX } else { cache.at[i - 1] };
            let elementwise = matches!(arch.ops[i], Op::Activation { .. } | Op::BatchNorm { .. } | Op::Dropout { .. });
            let (dst, input, output, earlier) = if elementwise && in_place {
                (src, None, &mut cache.out[src][..], &[][..])
            } else {
                split_io(&mut cache.out, src, i, n * wide_out)
            };
            cache.at.push(dst);
            match arch.ops[i] {
                Op::Dense { inputs, outputs } => {
                    // Products are written, not accumulated, and the bias added
                    // after: each element's arithmetic is then the product's
                    // alone, whichever kernel the gemm crate picks.
                    let (w, b) = (&self.params[slot], &self.params[slot + 1]);
                    if let (0, Some(products)) = (i, products) {
                        output.copy_from_slice(products);
                        self.periodic_dense(n, &cache.emb, &mut cache.emb_product, outputs, output);
                    } else if i == 0 {
                        let scratch = (&mut cache.emb_product, &mut cache.uniform);
                        self.input_dense(batch, &cache.emb, scratch, outputs, output);
                    } else {
                        let input = input.expect("dense layers write a new buffer");
                        for m in 0..k {
                            gemm_strided(
                                n,
                                inputs,
                                outputs,
                                &input[m * inputs..],
                                (wide_in, 1),
                                &w[m * outputs * inputs..],
                                (1, inputs),
                                0.0,
                                &mut output[m * outputs..],
                                (wide_out, 1),
                            );
                        }
                    }
                    for row in output.chunks_exact_mut(wide_out) {
                        row.iter_mut().zip(b).for_each(|(o, b)| *o += b);
                    }
                }
                Op::Activation { f } => match input {
                    Some(z) => activation::apply(f, z, output),
                    None => activation::apply_in_place(f, output),
                },
                Op::LayerNorm { width } => {
                    let input = input.expect("layer norms write a new buffer");
                    let (xhat, inv) = (&mut cache.aux[i], &mut cache.stats[i]);
                    xhat.resize(n * wide_out, 0.0);
                    inv.resize(n * k, 0.0);
                    layer_norm(input, width, &self.params[slot], &self.params[slot + 1], xhat, inv, output);
                }
                Op::BatchNorm { width } => {
                    let (gain, shift) = (&self.params[slot], &self.params[slot + 1]);
                    if train {
                        let (xhat, stats) = (&mut cache.aux[i], &mut cache.stats[i]);
                        let input = input.expect("training writes a new buffer");
                        batch_norm_train(input, n, k * width, gain, shift, xhat, stats, output);
                    } else {
                        let s = arch.state_of(i);
                        let (mean, var) = (&self.state[s], &self.state[s + 1]);
                        let (scale, offset) = batch_norm_affine(gain, shift, mean, var);
                        if let Some(src) = input {
                            output.copy_from_slice(src);
                        }
                        for row in output.chunks_exact_mut(wide_out) {
                            for ((x, s), o) in row.iter_mut().zip(&scale).zip(&offset) {
                                *x = *x * s + o;
                            }
                        }
                    }
                }
                Op::Dropout { p } => match (mode, input) {
                    (Mode::Train { step, row_offset }, Some(input)) => {
                        let width = wide_out / k;
                        let mask = &mut cache.aux[i];
                        mask.resize(n * wide_out, 0.0);
                        let keep = 1.0 / (1.0 - p);
                        for r in 0..n {
                            for c in 0..width {
                                let v =
                                    if dropout_keeps(self.seed, step, i, row_offset + r, c, p) { keep } else { 0.0 };
                                for m in 0..k {
                                    mask[r * wide_out + m * width + c] = v;
                                }
                            }
                        }
                        output.iter_mut().zip(input).zip(mask.iter()).for_each(|((o, x), m)| *o = x * m);
                    }
                    (_, Some(input)) => output.copy_from_slice(input),
                    (_, None) => {}
                },
                Op::Residual { from } => {
                    let input = input.expect("residual connections write a new buffer");
                    let skip = &earlier[cache.at[from - 1]];
                    output.iter_mut().zip(input).zip(skip).for_each(|((o, a), b)| *o = a + b);
                }
            }
        }
    }

    /// Each model's categorical embedding vectors for each row's codes,
    /// `[n × K·c]` (`c` the width of one model's categorical embeddings).
    pub fn categorical_vectors(&self, batch: Batch<'_>) -> Vec<f32> {
        let (k, e, c) = (self.k, self.arch.embedded_width(), self.arch.categorical_width());
        let mut emb = Vec::new();
        self.gather_embeddings(batch, &mut emb);
        let mut vectors = Vec::with_capacity(batch.n * k * c);
        for model_row in emb.chunks_exact(e.max(1)).take(batch.n * k) {
            vectors.extend_from_slice(&model_row[..c]);
        }
        vectors
    }

    /// The first dense layer's products (no bias, no periodic embeddings)
    /// of `n` rows of encoded inputs `x` (`[n × inputs]`) and categorical
    /// vectors (`[n × K·c]`): `[n × K·h]`, linear in both.
    pub fn linear_products(&self, x: &[f32], vectors: &[f32], n: usize) -> Vec<f32> {
        let Op::Dense { outputs, .. } = self.arch.ops[0] else { unreachable!("validated: a network starts dense") };
        let (k, p, e, c) = (self.k, self.arch.inputs, self.arch.embedded_width(), self.arch.categorical_width());
        let (fan_in, wide) = (p + e, k * outputs);
        let w = &self.params[self.arch.slot_of(0)];
        let mut out = vec![0.0f32; n * wide];
        gemm_uniform(n, p, wide, x, (p, 1), w, (1, fan_in), &mut out, (wide, 1), &mut UniformScratch::default());
        for m in 0..k {
            let w_m = &w[m * outputs * fan_in + p..];
            let v = &vectors[m * c..];
            gemm_strided(n, c, outputs, v, (k * c, 1), w_m, (1, fan_in), 1.0, &mut out[m * outputs..], (wide, 1));
        }
        out
    }

    /// The transpose of [`Stack::linear_products`]: from the gradient of
    /// the products (`[n × K·h]`), the encoded inputs' (`dx`, `[n ×
    /// inputs]`, summed over the models) and each model's categorical
    /// vectors' (`d_vectors`, `[n × K·c]`).
    pub fn linear_products_backward(&self, d_products: &[f32], n: usize, dx: &mut [f32], d_vectors: &mut [f32]) {
        let Op::Dense { outputs, .. } = self.arch.ops[0] else { unreachable!("validated: a network starts dense") };
        let (k, p, e, c) = (self.k, self.arch.inputs, self.arch.embedded_width(), self.arch.categorical_width());
        let (fan_in, wide) = (p + e, k * outputs);
        let w = &self.params[self.arch.slot_of(0)];
        for m in 0..k {
            let (d, w_m) = (&d_products[m * outputs..], &w[m * outputs * fan_in..]);
            let beta = if m == 0 { 0.0 } else { 1.0 };
            gemm_strided(n, outputs, p, d, (wide, 1), w_m, (fan_in, 1), beta, dx, (p, 1));
            let dv = &mut d_vectors[m * c..];
            gemm_strided(n, outputs, c, d, (wide, 1), &w_m[p..], (fan_in, 1), 0.0, dv, (k * c, 1));
        }
    }

    /// `[n × K·e]`: each model's vectors for each row's codes (its periodic
    /// embeddings, after them, are [`Stack::periodic_embeddings`]').
    fn gather_embeddings(&self, batch: Batch<'_>, emb: &mut Vec<f32>) {
        let (k, e, cols) = (self.k, self.arch.embedded_width(), self.arch.embeddings.len());
        emb.resize(batch.n * k * e, 0.0);
        if self.arch.categorical_width() == 0 {
            return;
        }
        for r in 0..batch.n {
            for m in 0..k {
                let mut at = r * k * e + m * e;
                for (c, spec) in self.arch.embeddings.iter().enumerate() {
                    let code = (batch.codes[r * cols + c] as usize).min(spec.vocabulary);
                    let table = &self.params[c];
                    let rows = (spec.vocabulary + 1) * spec.dim;
                    let start = m * rows + code * spec.dim;
                    emb[at..at + spec.dim].copy_from_slice(&table[start..start + spec.dim]);
                    at += spec.dim;
                }
            }
        }
    }

    /// Each model's periodic embeddings of each row, into their columns of
    /// `emb` (after the categorical ones), keeping the `[cos, sin]` features
    /// in `features` for the backward pass. Each model's product for a
    /// column has the same shape alone or in a stack, so it sums the same.
    fn periodic_embeddings(&self, batch: Batch<'_>, emb: &mut [f32], features: &mut Vec<f32>) {
        let Some(p) = &self.arch.periodic else { return };
        let (k, n, e, inputs) = (self.k, batch.n, self.arch.embedded_width(), self.arch.inputs);
        let (cat, f_count, kf, d) = (self.arch.categorical_width(), p.columns.len(), p.frequencies, p.dim);
        let slot = self.arch.periodic_slot();
        let (freq, weight, bias) = (&self.params[slot], &self.params[slot + 1], &self.params[slot + 2]);
        // features[r][m][f] holds 2k values: row stride k·F·2k.
        let row = k * f_count * 2 * kf;
        features.resize(n * row, 0.0);
        for r in 0..n {
            for m in 0..k {
                for (f, &column) in p.columns.iter().enumerate() {
                    let z = batch.x[r * inputs + column];
                    let v = &mut features[r * row + (m * f_count + f) * 2 * kf..][..2 * kf];
                    let c = &freq[(m * f_count + f) * kf..][..kf];
                    for j in 0..kf {
                        let a = (std::f32::consts::TAU * c[j]) * z;
                        v[j] = a.cos();
                        v[kf + j] = a.sin();
                    }
                }
            }
        }
        for m in 0..k {
            for f in 0..f_count {
                let block = m * f_count + f;
                gemm_strided(
                    n,
                    2 * kf,
                    d,
                    &features[block * 2 * kf..],
                    (row, 1),
                    &weight[block * 2 * kf * d..],
                    (d, 1),
                    0.0,
                    &mut emb[m * e + cat + f * d..],
                    (k * e, 1),
                );
            }
        }
        for r in 0..n {
            for m in 0..k {
                let out = &mut emb[r * k * e + m * e + cat..][..f_count * d];
                let b = &bias[m * f_count * d..][..f_count * d];
                out.iter_mut().zip(b).for_each(|(o, b)| *o = (*o + b).max(0.0));
            }
        }
    }

    /// Back-propagates `d_emb` (the gradient of the first dense layer's
    /// embedded inputs) through the periodic embeddings: into their
    /// parameters' gradients `grads` (the slots from the first dense
    /// layer's on; each written whole, summed over the rows in order), and
    /// into the gradient `dx` of the encoded inputs they read, added.
    fn periodic_backward(
        &self,
        batch: Batch<'_>,
        cache: &StackCache,
        grads: Option<&mut [Vec<f32>]>,
        mut dx: Option<&mut [f32]>,
    ) {
        let Some(p) = &self.arch.periodic else { return };
        let (k, n, e, inputs) = (self.k, batch.n, self.arch.embedded_width(), self.arch.inputs);
        let (cat, f_count, kf, d) = (self.arch.categorical_width(), p.columns.len(), p.frequencies, p.dim);
        let slot = self.arch.periodic_slot() - self.arch.embeddings.len();
        let (freq, weight) = (&self.params[self.arch.periodic_slot()], &self.params[self.arch.periodic_slot() + 1]);
        let mut grads = grads.map(|grads| {
            let (g_freq, rest) = grads[slot..].split_at_mut(1);
            let (g_weight, g_bias) = rest.split_at_mut(1);
            (&mut g_freq[0], &mut g_weight[0], &mut g_bias[0])
        });
        let row = k * f_count * 2 * kf;
        let (mut dh, mut dv) = (vec![0.0f32; n * d], vec![0.0f32; n * 2 * kf]);
        for m in 0..k {
            for (f, &column) in p.columns.iter().enumerate() {
                let block = m * f_count + f;
                // Through the ReLU: the gradient where the embedding was positive.
                for r in 0..n {
                    let at = r * k * e + m * e + cat + f * d;
                    let (out, d_out) = (&cache.emb[at..at + d], &cache.d_emb[at..at + d]);
                    for o in 0..d {
                        dh[r * d + o] = if out[o] > 0.0 { d_out[o] } else { 0.0 };
                    }
                }
                let v = &cache.periodic[block * 2 * kf..];
                let w = &weight[block * 2 * kf * d..];
                // dV [n × 2k] = dh · Wᵀ.
                gemm_strided(n, d, 2 * kf, &dh, (d, 1), w, (1, d), 0.0, &mut dv, (2 * kf, 1));
                if let Some((g_freq, g_weight, g_bias)) = grads.as_mut() {
                    let gb = &mut g_bias[block * d..(block + 1) * d];
                    gb.fill(0.0);
                    for r in 0..n {
                        gb.iter_mut().zip(&dh[r * d..(r + 1) * d]).for_each(|(g, h)| *g += h);
                    }
                    // dW [2k × d] = Vᵀ · dh.
                    let gw = &mut g_weight[block * 2 * kf * d..];
                    gemm_strided(2 * kf, n, d, v, (1, row), &dh, (d, 1), 0.0, gw, (d, 1));
                    let gc = &mut g_freq[block * kf..(block + 1) * kf];
                    gc.fill(0.0);
                    for r in 0..n {
                        let z = batch.x[r * inputs + column];
                        let (v, dv) = (&v[r * row..r * row + 2 * kf], &dv[r * 2 * kf..(r + 1) * 2 * kf]);
                        for j in 0..kf {
                            // d/dc of cos(2πcz) and sin(2πcz).
                            gc[j] += (dv[kf + j] * v[j] - dv[j] * v[kf + j]) * std::f32::consts::TAU * z;
                        }
                    }
                }
                if let Some(dx) = dx.as_deref_mut() {
                    let c = &freq[block * kf..(block + 1) * kf];
                    for r in 0..n {
                        let (v, dv) = (&v[r * row..r * row + 2 * kf], &dv[r * 2 * kf..(r + 1) * 2 * kf]);
                        // d/dz of cos(2πcz) and sin(2πcz).
                        let dz: f32 = (0..kf)
                            .map(|j| (dv[kf + j] * v[j] - dv[j] * v[kf + j]) * std::f32::consts::TAU * c[j])
                            .sum();
                        dx[r * inputs + column] += dz;
                    }
                }
            }
        }
    }

    /// Adds the first dense layer's products of each model's periodic
    /// embeddings (in `emb`, `[n × K·e]`) to `out` (`[n × K·h]`).
    fn periodic_dense(&self, n: usize, emb: &[f32], scratch: &mut Vec<f32>, outputs: usize, out: &mut [f32]) {
        let Some(periodic) = &self.arch.periodic else { return };
        let (k, p, e, c) = (self.k, self.arch.inputs, self.arch.embedded_width(), self.arch.categorical_width());
        let (fan_in, wide, width) = (p + e, k * outputs, periodic.width());
        let w = &self.params[self.arch.slot_of(0)];
        scratch.resize(n * outputs, 0.0);
        for m in 0..k {
            let (emb_m, w_m) = (&emb[m * e + c..], &w[m * outputs * fan_in + p + c..]);
            gemm_strided(n, width, outputs, emb_m, (k * e, 1), w_m, (1, fan_in), 0.0, scratch, (outputs, 1));
            for (row, part) in out.chunks_exact_mut(wide).zip(scratch.chunks_exact(outputs)) {
                row[m * outputs..(m + 1) * outputs].iter_mut().zip(part).for_each(|(o, s)| *o += s);
            }
        }
    }

    /// The first dense layer's products (without bias) into `out`: one wide
    /// product over the shared features for all models, plus each model's
    /// embeddings through its own columns of the weight.
    fn input_dense(
        &self,
        batch: Batch<'_>,
        emb: &[f32],
        (scratch, uniform): (&mut Vec<f32>, &mut UniformScratch),
        outputs: usize,
        out: &mut [f32],
    ) {
        let (k, n, p, e) = (self.k, batch.n, self.arch.inputs, self.arch.embedded_width());
        let w = &self.params[self.arch.slot_of(0)];
        let (fan_in, wide) = (p + e, k * outputs);
        gemm_uniform(n, p, wide, batch.x, (p, 1), w, (1, fan_in), out, (wide, 1), uniform);
        if e > 0 {
            scratch.resize(n * outputs, 0.0);
            for m in 0..k {
                gemm_strided(
                    n,
                    e,
                    outputs,
                    &emb[m * e..],
                    (k * e, 1),
                    &w[m * outputs * fan_in + p..],
                    (1, fan_in),
                    0.0,
                    scratch,
                    (outputs, 1),
                );
                for (row, part) in out.chunks_exact_mut(wide).zip(scratch.chunks_exact(outputs)) {
                    row[m * outputs..(m + 1) * outputs].iter_mut().zip(part).for_each(|(o, s)| *o += s);
                }
            }
        }
    }

    /// Back-propagates `d_logits` (`n × K·out`) through the activations of the
    /// last training [`Stack::forward`] on the same batch, overwriting `grads`.
    pub fn backward(&self, batch: Batch<'_>, cache: &mut StackCache, d_logits: &[f32], grads: &mut StackGradients) {
        let arch = &self.arch;
        // Dense gradients are written whole; embedding tables (scatter-added)
        // and norm gains and shifts (summed over rows) accumulate.
        for g in grads.params[..arch.embeddings.len()].iter_mut() {
            g.fill(0.0);
        }
        for (i, op) in arch.ops.iter().enumerate() {
            if matches!(op, Op::LayerNorm { .. } | Op::BatchNorm { .. }) {
                let slot = arch.slot_of(i);
                grads.params[slot].fill(0.0);
                grads.params[slot + 1].fill(0.0);
            }
        }
        self.backprop(batch, cache, d_logits, Some(&mut grads.params));
        let Op::Dense { outputs, .. } = arch.ops[0] else { unreachable!("validated: a network starts dense") };
        self.input_dense_backward(batch, cache, outputs, &mut grads.params);
    }

    /// Back-propagates `d_logits` (`n × K·out`) through the last
    /// [`Stack::forward_products`] on the same batch: `d_products` receives
    /// the gradient of the products it was given (`[n × K·h]`), and `dx`
    /// (`[n × inputs]`) that of the encoded inputs through the periodic
    /// embeddings (zero elsewhere; left empty without them).
    pub fn products_backward(
        &self,
        batch: Batch<'_>,
        cache: &mut StackCache,
        d_logits: &[f32],
        d_products: &mut Vec<f32>,
        dx: &mut Vec<f32>,
    ) {
        self.backprop(batch, cache, d_logits, None);
        d_products.clear();
        d_products.extend_from_slice(&cache.delta);
        dx.clear();
        let Some(periodic) = &self.arch.periodic else { return };
        let Op::Dense { outputs, .. } = self.arch.ops[0] else { unreachable!("validated: a network starts dense") };
        let (k, n, p, e, c) =
            (self.k, batch.n, self.arch.inputs, self.arch.embedded_width(), self.arch.categorical_width());
        let (fan_in, wide, width) = (p + e, k * outputs, periodic.width());
        let w = &self.params[self.arch.slot_of(0)];
        cache.d_emb.resize(n * k * e, 0.0);
        for m in 0..k {
            let (d, w_m) = (&cache.delta[m * outputs..], &w[m * outputs * fan_in + p + c..]);
            let d_emb = &mut cache.d_emb[m * e + c..];
            gemm_strided(n, outputs, width, d, (wide, 1), w_m, (fan_in, 1), 0.0, d_emb, (k * e, 1));
        }
        dx.resize(n * p, 0.0);
        self.periodic_backward(batch, cache, None, Some(dx));
    }

    /// The backward pass from the logits down to the first dense layer's
    /// output (its gradient left in `cache.delta`): with `grads`, after a
    /// training forward, writing the parameters' gradients of every op but
    /// the first dense layer's weights; without, after a
    /// [`Mode::Gradient`] forward, the inputs' path alone.
    fn backprop(&self, batch: Batch<'_>, cache: &mut StackCache, d_logits: &[f32], mut grads: Option<&mut [Vec<f32>]>) {
        let (k, n, arch) = (self.k, batch.n, &self.arch);
        let ops = arch.ops.len();
        cache.delta.clear();
        cache.delta.extend_from_slice(d_logits);
        cache.pending.resize_with(ops, Vec::new);
        cache.pending.iter_mut().for_each(Vec::clear);
        for i in (0..ops).rev() {
            if !cache.pending[i].is_empty() {
                cache.delta.iter_mut().zip(&cache.pending[i]).for_each(|(d, e)| *d += e);
                cache.pending[i].clear();
            }
            let wide_in = k * arch.width_before(i);
            let wide_out = k * arch.width_after(i);
            let slot = arch.slot_of(i);
            let input: &[f32] = if i == 0 { batch.x } else { &cache.out[cache.at[i - 1]] };
            match arch.ops[i] {
                Op::Dense { inputs, outputs } => {
                    if let Some(grads) = grads.as_deref_mut() {
                        column_sums(&cache.delta, wide_out, &mut grads[slot + 1]);
                    }
                    if i == 0 {
                        break;
                    }
                    let w = &self.params[slot];
                    cache.delta_prev.resize(n * wide_in, 0.0);
                    for m in 0..k {
                        if let Some(grads) = grads.as_deref_mut() {
                            // dW_m [in × out, stored transposed] = input_mᵀ · delta_m
                            gemm_strided(
                                inputs,
                                n,
                                outputs,
                                &input[m * inputs..],
                                (1, wide_in),
                                &cache.delta[m * outputs..],
                                (wide_out, 1),
                                0.0,
                                &mut grads[slot][m * outputs * inputs..],
                                (1, inputs),
                            );
                        }
                        gemm_strided(
                            n,
                            outputs,
                            inputs,
                            &cache.delta[m * outputs..],
                            (wide_out, 1),
                            &w[m * outputs * inputs..],
                            (inputs, 1),
                            0.0,
                            &mut cache.delta_prev[m * inputs..],
                            (wide_in, 1),
                        );
                    }
                    std::mem::swap(&mut cache.delta, &mut cache.delta_prev);
                }
                Op::Activation { f } => activation::backprop(f, input, &mut cache.delta),
                Op::LayerNorm { width } => {
                    let (gg, gs) = match grads.as_deref_mut() {
                        Some(grads) => {
                            let (gg, gs) = grads[slot..].split_at_mut(1);
                            (&mut gg[0], &mut gs[0])
                        }
                        None => {
                            let [gg, gs] = &mut cache.d_norm;
                            gg.resize(k * width, 0.0);
                            gs.resize(k * width, 0.0);
                            (gg, gs)
                        }
                    };
                    layer_norm_backward(
                        &mut cache.delta,
                        width,
                        &self.params[slot],
                        &cache.aux[i],
                        &cache.stats[i],
                        gg,
                        gs,
                    );
                }
                Op::BatchNorm { .. } => match grads.as_deref_mut() {
                    Some(grads) => {
                        let (gg, gs) = grads[slot..].split_at_mut(1);
                        batch_norm_backward(
                            &mut cache.delta,
                            n,
                            wide_out,
                            &self.params[slot],
                            &cache.aux[i],
                            &cache.stats[i],
                            &mut gg[0],
                            &mut gs[0],
                        );
                    }
                    None => {
                        // Scoring's BatchNorm is an affine map per column.
                        let s = arch.state_of(i);
                        let (gain, shift) = (&self.params[slot], &self.params[slot + 1]);
                        let (scale, _) = batch_norm_affine(gain, shift, &self.state[s], &self.state[s + 1]);
                        for row in cache.delta.chunks_exact_mut(wide_out) {
                            row.iter_mut().zip(&scale).for_each(|(d, s)| *d *= s);
                        }
                    }
                },
                Op::Dropout { .. } => {
                    if grads.is_some() {
                        cache.delta.iter_mut().zip(&cache.aux[i]).for_each(|(d, m)| *d *= m);
                    }
                }
                Op::Residual { from } => {
                    // The sum's gradient reaches both addends: the ops inside
                    // the block (through delta) and the block's input.
                    let into = from - 1;
                    let pending = &mut cache.pending[into];
                    if pending.is_empty() {
                        pending.extend_from_slice(&cache.delta);
                    } else {
                        pending.iter_mut().zip(&cache.delta).for_each(|(p, d)| *p += d);
                    }
                }
            }
        }
    }

    fn input_dense_backward(&self, batch: Batch<'_>, cache: &mut StackCache, outputs: usize, grads: &mut [Vec<f32>]) {
        let (k, n, p, e) = (self.k, batch.n, self.arch.inputs, self.arch.embedded_width());
        let (fan_in, wide) = (p + e, k * outputs);
        let (grads, rest) = grads.split_at_mut(self.arch.embeddings.len());
        let gw = &mut rest[0];
        // dW[:, :p] for all models at once: Xᵀ · delta, written transposed.
        gemm_uniform(p, n, wide, batch.x, (1, p), &cache.delta, (wide, 1), gw, (1, fan_in), &mut cache.uniform);
        if e == 0 {
            return;
        }
        let w = &self.params[self.arch.slot_of(0)];
        cache.d_emb.resize(n * k * e, 0.0);
        for m in 0..k {
            gemm_strided(
                e,
                n,
                outputs,
                &cache.emb[m * e..],
                (1, k * e),
                &cache.delta[m * outputs..],
                (wide, 1),
                0.0,
                &mut gw[m * outputs * fan_in + p..],
                (1, fan_in),
            );
            gemm_strided(
                n,
                outputs,
                e,
                &cache.delta[m * outputs..],
                (wide, 1),
                &w[m * outputs * fan_in + p..],
                (fan_in, 1),
                0.0,
                &mut cache.d_emb[m * e..],
                (k * e, 1),
            );
        }
        self.periodic_backward(batch, cache, Some(rest), None);
        // Scatter-add into the tables, rows in order (deterministic).
        let cols = self.arch.embeddings.len();
        for r in 0..n {
            for m in 0..k {
                let mut at = r * k * e + m * e;
                for (c, spec) in self.arch.embeddings.iter().enumerate() {
                    let code = (batch.codes[r * cols + c] as usize).min(spec.vocabulary);
                    if code < spec.vocabulary {
                        let start = m * (spec.vocabulary + 1) * spec.dim + code * spec.dim;
                        grads[c][start..start + spec.dim]
                            .iter_mut()
                            .zip(&cache.d_emb[at..at + spec.dim])
                            .for_each(|(g, d)| *g += d);
                    }
                    at += spec.dim;
                }
            }
        }
    }

    /// Scoring logits of every model for the batch's rows, `[n × K·out]`,
    /// appended to `out`, computed `chunk_rows` rows at a time.
    pub fn predict_chunked(&self, batch: Batch<'_>, chunk_rows: usize, cache: &mut StackCache, out: &mut Vec<f32>) {
        let (inputs, cols) = (self.arch.inputs, self.arch.embeddings.len());
        for start in (0..batch.n).step_by(chunk_rows.max(1)) {
            let rows = batch.rows(start..(start + chunk_rows).min(batch.n), inputs, cols);
            self.forward(rows, cache, Mode::Eval);
            out.extend_from_slice(cache.logits());
        }
    }

    /// Folds a training forward pass's batch statistics into the BatchNorm
    /// running averages of the models with `active[m]`.
    pub fn update_running_stats(&mut self, cache: &StackCache, active: &[bool]) {
        let k = self.k;
        for (i, op) in self.arch.ops.iter().enumerate() {
            let Op::BatchNorm { width } = *op else { continue };
            let s = self.arch.state_of(i);
            let stats = &cache.stats[i];
            let (mean, var) = (&stats[..k * width], &stats[k * width..2 * k * width]);
            for m in (0..k).filter(|&m| active[m]) {
                let cols = m * width..(m + 1) * width;
                for j in cols {
                    let rm = &mut self.state[s][j];
                    *rm = (1.0 - BATCH_NORM_MOMENTUM) * *rm + BATCH_NORM_MOMENTUM * mean[j];
                    let rv = &mut self.state[s + 1][j];
                    *rv = (1.0 - BATCH_NORM_MOMENTUM) * *rv + BATCH_NORM_MOMENTUM * var[j];
                }
            }
        }
    }

    /// The BatchNorm op `i`'s scoring-time `x · scale + offset`, for export.
    pub fn batch_norm_affine(&self, i: usize) -> (Vec<f32>, Vec<f32>) {
        let (slot, s) = (self.arch.slot_of(i), self.arch.state_of(i));
        batch_norm_affine(&self.params[slot], &self.params[slot + 1], &self.state[s], &self.state[s + 1])
    }

    /// Op `i`'s two parameter tensors (weight and bias, or gain and shift).
    pub fn op_params(&self, i: usize) -> (&[f32], &[f32]) {
        let slot = self.arch.slot_of(i);
        (&self.params[slot], &self.params[slot + 1])
    }

    /// Embedding table `c`, `(vocabulary + 1) × dim`.
    pub fn embedding_table(&self, c: usize) -> &[f32] {
        &self.params[c]
    }

    /// The periodic embeddings' frequencies, weights and biases, if any.
    pub fn periodic_params(&self) -> Option<(&[f32], &[f32], &[f32])> {
        self.arch.periodic.as_ref()?;
        let slot = self.arch.periodic_slot();
        Some((&self.params[slot], &self.params[slot + 1], &self.params[slot + 2]))
    }
}

/// Op `i`'s own output buffer, resized to `len`, with its input (buffer
/// `src`, none for the first op) and every earlier buffer.
#[allow(clippy::type_complexity)]
fn split_io(
    bufs: &mut [Vec<f32>],
    src: usize,
    i: usize,
    len: usize,
) -> (usize, Option<&[f32]>, &mut [f32], &[Vec<f32>]) {
    bufs[i].resize(len, 0.0);
    let (before, after) = bufs.split_at_mut(i);
    let input = (src != usize::MAX).then(|| &before[src][..]);
    (i, input, &mut after[0][..], before)
}

/// `sums[j] = Σ_r m[r, j]` over a row-major matrix `cols` wide.
fn column_sums(m: &[f32], cols: usize, sums: &mut [f32]) {
    sums.fill(0.0);
    for row in m.chunks_exact(cols) {
        sums.iter_mut().zip(row).for_each(|(s, v)| *s += v);
    }
}

/// Normalises every `width`-wide group (one row of one model) of `input`.
fn layer_norm(
    input: &[f32],
    width: usize,
    gain: &[f32],
    shift: &[f32],
    xhat: &mut [f32],
    inv: &mut [f32],
    out: &mut [f32],
) {
    let models = gain.len() / width;
    for (g, ((x, (xh, o)), inv)) in input
        .chunks_exact(width)
        .zip(xhat.chunks_exact_mut(width).zip(out.chunks_exact_mut(width)))
        .zip(inv.iter_mut())
        .enumerate()
    {
        let m = g % models;
        let mean = x.iter().sum::<f32>() / width as f32;
        let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / width as f32;
        *inv = 1.0 / (var + NORM_EPS).sqrt();
        let (gm, sm) = (&gain[m * width..(m + 1) * width], &shift[m * width..(m + 1) * width]);
        for j in 0..width {
            xh[j] = (x[j] - mean) * *inv;
            o[j] = xh[j] * gm[j] + sm[j];
        }
    }
}

fn layer_norm_backward(
    delta: &mut [f32],
    width: usize,
    gain: &[f32],
    xhat: &[f32],
    inv: &[f32],
    d_gain: &mut [f32],
    d_shift: &mut [f32],
) {
    let models = gain.len() / width;
    let mut dxhat = vec![0.0f32; width];
    for (g, ((d, xh), inv)) in delta.chunks_exact_mut(width).zip(xhat.chunks_exact(width)).zip(inv).enumerate() {
        let m = g % models;
        let cols = m * width..(m + 1) * width;
        let gm = &gain[cols.clone()];
        for j in 0..width {
            d_gain[cols.start + j] += d[j] * xh[j];
            d_shift[cols.start + j] += d[j];
            dxhat[j] = d[j] * gm[j];
        }
        let sum: f32 = dxhat.iter().sum();
        let dot: f32 = dxhat.iter().zip(xh).map(|(a, b)| a * b).sum();
        let w = width as f32;
        for j in 0..width {
            d[j] = inv / w * (w * dxhat[j] - sum - xh[j] * dot);
        }
    }
}

/// BatchNorm over the batch's `n` rows for each of `cols` columns; `stats`
/// receives each column's mean, unbiased variance and `1/σ`.
#[allow(clippy::too_many_arguments)]
fn batch_norm_train(
    input: &[f32],
    n: usize,
    cols: usize,
    gain: &[f32],
    shift: &[f32],
    xhat: &mut Vec<f32>,
    stats: &mut Vec<f32>,
    out: &mut [f32],
) {
    xhat.resize(n * cols, 0.0);
    stats.resize(3 * cols, 0.0);
    let (mean, rest) = stats.split_at_mut(cols);
    let (var, inv) = rest.split_at_mut(cols);
    column_sums(input, cols, mean);
    mean.iter_mut().for_each(|m| *m /= n as f32);
    var.fill(0.0);
    for row in input.chunks_exact(cols) {
        for j in 0..cols {
            let d = row[j] - mean[j];
            var[j] += d * d;
        }
    }
    for j in 0..cols {
        let biased = var[j] / n as f32;
        inv[j] = 1.0 / (biased + NORM_EPS).sqrt();
        var[j] = if n > 1 { var[j] / (n - 1) as f32 } else { biased };
    }
    for ((x, xh), o) in input.chunks_exact(cols).zip(xhat.chunks_exact_mut(cols)).zip(out.chunks_exact_mut(cols)) {
        for j in 0..cols {
            xh[j] = (x[j] - mean[j]) * inv[j];
            o[j] = xh[j] * gain[j] + shift[j];
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn batch_norm_backward(
    delta: &mut [f32],
    n: usize,
    cols: usize,
    gain: &[f32],
    xhat: &[f32],
    stats: &[f32],
    d_gain: &mut [f32],
    d_shift: &mut [f32],
) {
    let inv = &stats[2 * cols..3 * cols];
    // Σ dxhat and Σ dxhat·xhat per column, with dxhat = delta·gain.
    let (mut sum, mut dot) = (vec![0.0f32; cols], vec![0.0f32; cols]);
    for (d, xh) in delta.chunks_exact(cols).zip(xhat.chunks_exact(cols)) {
        for j in 0..cols {
            d_gain[j] += d[j] * xh[j];
            d_shift[j] += d[j];
            let dx = d[j] * gain[j];
            sum[j] += dx;
            dot[j] += dx * xh[j];
        }
    }
    let nf = n as f32;
    for (d, xh) in delta.chunks_exact_mut(cols).zip(xhat.chunks_exact(cols)) {
        for j in 0..cols {
            d[j] = inv[j] / nf * (nf * d[j] * gain[j] - sum[j] - xh[j] * dot[j]);
        }
    }
}

/// Scoring-time BatchNorm as `x · scale + offset`.
pub fn batch_norm_affine(gain: &[f32], shift: &[f32], mean: &[f32], var: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let scale: Vec<f32> = gain.iter().zip(var).map(|(g, v)| g / (v + NORM_EPS).sqrt()).collect();
    let offset = shift.iter().zip(mean).zip(&scale).map(|((s, m), sc)| s - m * sc).collect();
    (scale, offset)
}

/// Rows a scoring thread pushes through the network at once: activations of
/// this many rows stay in cache (measured on MLP 64-256-256-1: 512-row chunks
/// against whole 4096-row shares).
const PREDICT_CHUNK: usize = 512;

/// Scores rows with one network (or stack) on several threads, each taking a
/// contiguous share of every batch in cache-sized chunks, with buffers kept
/// across batches.
pub struct Predictor<'m> {
    net: &'m Stack,
    pool: Option<rayon::ThreadPool>,
    /// One cache and one output buffer per thread.
    parts: Vec<(StackCache, Vec<f32>)>,
}

impl<'m> Predictor<'m> {
    /// A predictor on `threads` threads; with more than one, a pool is
    /// started (an error when the system refuses threads).
    pub fn new(net: &'m Stack, threads: usize) -> Predictor<'m> {
        let threads = threads.max(1);
        let pool = (threads > 1)
            .then(|| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("cerebro-score-{i}"))
                    .build()
                    .ok()
            })
            .flatten();
        let parts = (0..if pool.is_some() { threads } else { 1 }).map(|_| Default::default()).collect();
        Predictor { net, pool, parts }
    }

    /// Logits of every model for the batch's rows, `[n × K·out]`, appended to `out`.
    pub fn predict(&mut self, batch: Batch<'_>, out: &mut Vec<f32>) {
        let (n, t) = (batch.n, self.parts.len());
        let net = self.net;
        let (inputs, cols) = (net.arch.inputs, net.arch.embeddings.len());
        let run = |(cache, logits): &mut (StackCache, Vec<f32>), rows: std::ops::Range<usize>| {
            logits.clear();
            net.predict_chunked(batch.rows(rows, inputs, cols), PREDICT_CHUNK, cache, logits);
        };
        match self.pool.as_ref().filter(|_| n >= 2 * t) {
            None => run(&mut self.parts[0], 0..n),
            Some(pool) => pool.scope(|s| {
                for (i, part) in self.parts.iter_mut().enumerate() {
                    s.spawn(move |_| run(part, n * i / t..n * (i + 1) / t));
                }
            }),
        }
        let used = if self.pool.is_some() && n >= 2 * t { t } else { 1 };
        for (_, logits) in &self.parts[..used] {
            out.extend_from_slice(logits);
        }
    }
}

/// Architectures with every op and random weights, for the tests of this
/// crate and of the daemon's trainer and CUDA backend.
#[cfg(any(test, feature = "test-support"))]
pub mod test_support {
    use rand::Rng;
    use rand_chacha::ChaCha8Rng;

    use super::*;

    /// Every kind of op: embeddings (categorical and periodic), norms,
    /// dropout, a residual block.
    pub fn every_op(act: Activation, outputs: usize) -> Arch {
        let mut arch = every_gpu_op(act, outputs);
        arch.periodic = Some(Periodic { columns: vec![0, 2], frequencies: 3, dim: 2, sigma: 0.5 });
        arch.ops[0] = Op::Dense { inputs: 9, outputs: 6 };
        arch
    }

    /// [`every_op`] without periodic embeddings, which have no GPU kernels.
    pub fn every_gpu_op(act: Activation, outputs: usize) -> Arch {
        let ops = vec![
            Op::Dense { inputs: 5, outputs: 6 },
            Op::BatchNorm { width: 6 },
            Op::Activation { f: act },
            Op::LayerNorm { width: 6 },
            Op::Dense { inputs: 6, outputs: 4 },
            Op::Activation { f: act },
            Op::Dropout { p: 0.3 },
            Op::Dense { inputs: 4, outputs: 6 },
            Op::Residual { from: 3 },
            Op::Activation { f: act },
            Op::Dense { inputs: 6, outputs },
        ];
        Arch { inputs: 3, embeddings: vec![Embedding { vocabulary: 3, dim: 2 }], ops, periodic: None }
    }

    /// Moves every parameter off its initial value (gains off 1, shifts off
    /// 0), keeping the unseen embedding rows at zero.
    pub fn randomise(stack: &mut Stack, rng: &mut ChaCha8Rng) {
        let tables = stack.arch.embeddings.clone();
        for (s, (p, slot)) in stack.params.iter_mut().zip(stack.arch.slots()).enumerate() {
            for (j, v) in p.iter_mut().enumerate() {
                if s < tables.len() && j % slot.len >= tables[s].vocabulary * tables[s].dim {
                    continue;
                }
                *v += rng.random_range(-0.3..0.3);
            }
        }
        for s in stack.state.iter_mut() {
            s.iter_mut().for_each(|v| *v = v.abs() + rng.random_range(0.1..0.5));
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::super::loss::{Head, Loss};
    use super::test_support::*;
    use super::*;

    fn batch_data(n: usize, rng: &mut ChaCha8Rng) -> (Vec<f32>, Vec<u32>) {
        let x = (0..n * 3).map(|_| rng.random_range(-1.0..1.0)).collect();
        // Code 3 is "never seen": the zero row.
        let codes = (0..n).map(|r| (r % 4) as u32).collect();
        (x, codes)
    }

    /// The periodic embeddings' values before their ReLU, by hand.
    fn periodic_pre_activations(net: &Stack, batch: Batch<'_>) -> Vec<f32> {
        let p = net.arch.periodic.as_ref().expect("periodic embeddings");
        let (freq, weight, bias) = net.periodic_params().unwrap();
        let (f_count, kf, d) = (p.columns.len(), p.frequencies, p.dim);
        let mut out = Vec::new();
        for r in 0..batch.n {
            for m in 0..net.k {
                for (f, &column) in p.columns.iter().enumerate() {
                    let z = batch.x[r * net.arch.inputs + column];
                    let c = &freq[(m * f_count + f) * kf..][..kf];
                    let v: Vec<f32> = (0..kf)
                        .map(|j| (std::f32::consts::TAU * c[j] * z).cos())
                        .chain((0..kf).map(|j| (std::f32::consts::TAU * c[j] * z).sin()))
                        .collect();
                    let w = &weight[(m * f_count + f) * 2 * kf * d..];
                    for o in 0..d {
                        let h: f32 = v.iter().enumerate().map(|(i, vi)| vi * w[i * d + o]).sum();
                        out.push(h + bias[(m * f_count + f) * d + o]);
                    }
                }
            }
        }
        out
    }

    /// Whether every ReLU's input (and every periodic embedding's value
    /// before its ReLU) on `batch` is clear of zero, so that finite
    /// differences of ±eps measure one slope, not two.
    fn clear_of_kinks(net: &Stack, batch: Batch<'_>, mode: Mode) -> bool {
        let mut c = StackCache::default();
        net.forward(batch, &mut c, mode);
        net.arch.ops.iter().enumerate().all(|(i, op)| {
            !matches!(op, Op::Activation { f: Activation::Relu }) || c.out[c.at[i - 1]].iter().all(|z| z.abs() > 0.05)
        }) && periodic_pre_activations(net, batch).iter().all(|h| h.abs() > 0.05)
    }

    /// A finite-difference slope and an analytic gradient agree, to the
    /// tolerance central differences of f32 passes allow.
    fn slopes_agree(numeric: f64, analytic: f64) -> bool {
        (numeric - analytic).abs() <= 3e-3 + 3e-2 * numeric.abs().max(analytic.abs())
    }

    /// A periodic embedding is what its formula says: the scored network's
    /// first-layer inputs hold `ReLU([cos 2πcz, sin 2πcz] · W + b)` after the
    /// categorical embeddings.
    #[test]
    fn periodic_embeddings_follow_their_formula() {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let mut stack = Stack::new(every_op(Activation::Relu, 2), 3, &mut [ChaCha8Rng::seed_from_u64(3)]);
        randomise(&mut stack, &mut rng);
        let (x, codes) = batch_data(5, &mut rng);
        let batch = Batch { x: &x, codes: &codes, n: 5 };
        let mut emb = Vec::new();
        stack.gather_embeddings(batch, &mut emb);
        stack.periodic_embeddings(batch, &mut emb, &mut Vec::new());
        let expected: Vec<f32> = periodic_pre_activations(&stack, batch).iter().map(|h| h.max(0.0)).collect();
        let e = stack.arch.embedded_width();
        let got: Vec<f32> = (0..5).flat_map(|r| emb[r * e + 2..(r + 1) * e].to_vec()).collect();
        assert_eq!(got.len(), expected.len());
        for (a, b) in got.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        assert!(got.iter().any(|v| *v > 0.0), "some embeddings are active");
        // Frequencies start from N(0, sigma²): spread, not all equal.
        let fresh = Stack::new(every_op(Activation::Relu, 2), 3, &mut [ChaCha8Rng::seed_from_u64(3)]);
        let (freq, _, _) = fresh.periodic_params().unwrap();
        assert!(freq.iter().any(|c| *c != freq[0]) && freq.iter().all(|c| c.abs() < 5.0), "{freq:?}");
    }

    #[test]
    fn stacking_round_trips_models() {
        let arch = every_op(Activation::Relu, 2);
        let models: Vec<Stack> =
            (0..3).map(|s| Stack::new(arch.clone(), 9, &mut [ChaCha8Rng::seed_from_u64(s)])).collect();
        let stack = Stack::from_models(&models);
        for (m, model) in models.iter().enumerate() {
            assert_eq!(&stack.model(m), model);
        }
    }

    #[test]
    fn bad_architectures_are_refused() {
        let mut a = Arch::mlp(3, &[4], 1, Activation::Relu);
        a.validate().unwrap();
        a.ops.insert(2, Op::LayerNorm { width: 5 });
        assert_eq!(a.validate(), Err(ArchError::Width { op: 2, expected: 5, found: 4 }));
        let r = Arch { inputs: 2, embeddings: vec![], ops: vec![Op::Residual { from: 0 }], periodic: None };
        assert_eq!(r.validate(), Err(ArchError::NoInputLayer));
        let mut d = Arch::mlp(3, &[4], 1, Activation::Relu);
        d.ops.insert(1, Op::Residual { from: 0 });
        assert_eq!(d.validate(), Err(ArchError::ResidualSource { op: 1 }));
        let mut p = every_op(Activation::Relu, 1);
        p.periodic.as_mut().unwrap().columns = vec![0, 3];
        assert_eq!(p.validate(), Err(ArchError::PeriodicColumn { column: 3, inputs: 3 }));
    }

    /// Every model's logits and gradients in a stack are bit-identical to the
    /// same model's computed alone: with every kind of op, and over the shapes
    /// where the gemm crate switches kernels (few rows, 1-wide layers).
    #[test]
    fn a_stack_computes_exactly_what_its_models_compute_alone() {
        let k = 3;
        let wide_mlp = Arch::mlp(20, &[16, 8], 2, Activation::Gelu);
        let linear = Arch::mlp(5, &[], 2, Activation::Relu);
        let narrow = Arch::mlp(3, &[1, 4], 2, Activation::Tanh);
        for arch in [every_op(Activation::Gelu, 2), wide_mlp, linear, narrow] {
            for n in [1, 2, 7, 40, 600] {
                stack_equals_models(&arch, k, n);
            }
        }
    }

    fn stack_equals_models(arch: &Arch, k: usize, n: usize) {
        let loss = Loss::new(Head::Multiclass(2));
        let mut rngs: Vec<ChaCha8Rng> = (0..k as u64).map(ChaCha8Rng::seed_from_u64).collect();
        let mut stack = Stack::new(arch.clone(), 5, &mut rngs);
        let mut rng = ChaCha8Rng::seed_from_u64(99);
        randomise(&mut stack, &mut rng);
        let x: Vec<f32> = (0..n * arch.inputs).map(|_| rng.random_range(-1.0..1.0)).collect();
        let codes: Vec<u32> = (0..n * arch.embeddings.len()).map(|r| (r % 4) as u32).collect();
        let batch = Batch { x: &x, codes: &codes, n };
        let y: Vec<f32> = (0..n).map(|i| (i % 2) as f32).collect();
        let mode = Mode::Train { step: 3, row_offset: 0 };

        let mut cache = StackCache::default();
        stack.forward(batch, &mut cache, mode);
        let wide = cache.logits().to_vec();
        let mut d_wide = vec![0.0; n * k * 2];
        let mut alone_grads = Vec::new();
        for m in 0..k {
            let model = stack.model(m);
            let mut c = StackCache::default();
            model.forward(batch, &mut c, mode);
            for r in 0..n {
                assert_eq!(
                    &wide[r * k * 2 + m * 2..r * k * 2 + m * 2 + 2],
                    &c.logits()[r * 2..r * 2 + 2],
                    "{arch:?}, {n} rows: model {m} row {r}"
                );
            }
            let mut d = vec![0.0; n * 2];
            loss.loss_and_grad(c.logits(), &y, n, &mut d);
            for r in 0..n {
                d_wide[r * k * 2 + m * 2..r * k * 2 + m * 2 + 2].copy_from_slice(&d[r * 2..r * 2 + 2]);
            }
            let mut g = model.zero_gradients();
            model.backward(batch, &mut c, &d, &mut g);
            alone_grads.push(g);
        }
        let mut grads = stack.zero_gradients();
        stack.backward(batch, &mut cache, &d_wide, &mut grads);
        let as_stack = Stack { params: grads.params, ..stack.clone() };
        for (m, g) in alone_grads.iter().enumerate() {
            assert_eq!(as_stack.model(m).params, g.params, "{arch:?}, {n} rows: model {m} gradients");
        }
    }

    /// Scoring runs element-wise ops in place; it must give what a fresh
    /// out-of-place pass gives, with residual sources left intact.
    #[test]
    fn scoring_in_place_equals_scoring_into_fresh_buffers() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let mut stack = Stack::new(every_op(Activation::Silu, 3), 1, &mut [ChaCha8Rng::seed_from_u64(1)]);
        randomise(&mut stack, &mut rng);
        let (x, codes) = batch_data(9, &mut rng);
        let batch = Batch { x: &x, codes: &codes, n: 9 };
        let mut cache = StackCache::default();
        stack.forward(batch, &mut cache, Mode::Eval);
        let scored = cache.logits().to_vec();
        // The same network without dropout and with BatchNorm as its affine
        // map, computed by hand op by op.
        let mut h: Vec<f32> = Vec::new();
        let mut inputs_of: Vec<Vec<f32>> = Vec::new();
        let mut emb = Vec::new();
        stack.gather_embeddings(batch, &mut emb);
        stack.periodic_embeddings(batch, &mut emb, &mut Vec::new());
        let e = stack.arch.embedded_width();
        for (i, op) in stack.arch.ops.iter().enumerate() {
            let input = if i == 0 {
                (0..9).flat_map(|r| x[r * 3..r * 3 + 3].iter().chain(&emb[r * e..(r + 1) * e]).copied()).collect()
            } else {
                h.clone()
            };
            inputs_of.push(input.clone());
            h = match *op {
                Op::Dense { inputs, outputs } => {
                    let (w, b) = stack.op_params(i);
                    (0..9)
                        .flat_map(|r| {
                            let input = &input;
                            (0..outputs).map(move |o| {
                                let mut s = b[o];
                                let mut acc = 0.0;
                                for j in 0..inputs {
                                    acc += input[r * inputs + j] * w[o * inputs + j];
                                }
                                s += acc;
                                s
                            })
                        })
                        .collect()
                }
                Op::Activation { f } => {
                    let mut o = vec![0.0; input.len()];
                    activation::apply(f, &input, &mut o);
                    o
                }
                Op::BatchNorm { width } => {
                    let (scale, offset) = stack.batch_norm_affine(i);
                    input.iter().enumerate().map(|(j, v)| v * scale[j % width] + offset[j % width]).collect()
                }
                Op::LayerNorm { width } => {
                    let (g, s) = stack.op_params(i);
                    input
                        .chunks(width)
                        .flat_map(|x| {
                            let mean = x.iter().sum::<f32>() / width as f32;
                            let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / width as f32;
                            let inv = 1.0 / (var + NORM_EPS).sqrt();
                            x.iter().enumerate().map(move |(j, v)| (v - mean) * inv * g[j] + s[j]).collect::<Vec<_>>()
                        })
                        .collect()
                }
                Op::Dropout { .. } => input,
                Op::Residual { from } => input.iter().zip(&inputs_of[from]).map(|(a, b)| a + b).collect(),
            };
        }
        for (a, b) in scored.iter().zip(&h) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }

    /// Central finite differences over every parameter of a network with
    /// every kind of op, for every activation and loss. For ReLU, a seed is
    /// picked whose pre-activations stay clear of the kink, where finite
    /// differences would measure a one-sided slope.
    #[test]
    fn gradients_match_finite_differences_for_every_op_activation_and_loss() {
        let n = 6;
        let losses = [
            (Loss::new(Head::Binary), vec![1.0, 0.0, 1.0, 1.0, 0.0, 0.0]),
            (Loss { class_weights: vec![0.5, 2.0], ..Loss::new(Head::Binary) }, vec![1.0, 0.0, 1.0, 1.0, 0.0, 1.0]),
            (Loss::new(Head::Multiclass(3)), vec![0.0, 2.0, 1.0, 2.0, 0.0, 1.0]),
            (
                Loss { class_weights: vec![1.0, 0.3, 3.0], ..Loss::new(Head::Multiclass(3)) },
                vec![0.0, 2.0, 1.0, 2.0, 0.0, 1.0],
            ),
            (Loss::new(Head::Regression), vec![0.5, -1.0, 2.0, 0.0, 0.3, -0.2]),
            (Loss { huber_delta: 0.5, ..Loss::new(Head::Regression) }, vec![0.5, -1.0, 2.0, 0.0, 0.3, -0.2]),
            (
                Loss { label_smoothing: 0.1, class_weights: vec![0.5, 2.0], ..Loss::new(Head::Binary) },
                vec![1.0, 0.0, 1.0, 1.0, 0.0, 1.0],
            ),
            (
                Loss { label_smoothing: 0.2, class_weights: vec![1.0, 0.3, 3.0], ..Loss::new(Head::Multiclass(3)) },
                vec![0.0, 2.0, 1.0, 2.0, 0.0, 1.0],
            ),
        ];
        let mode = Mode::Train { step: 11, row_offset: 0 };
        for act in [Activation::Relu, Activation::Gelu, Activation::Silu, Activation::Tanh] {
            for (loss, y) in &losses {
                let (mut net, x, codes) = (0..)
                    .find_map(|seed| {
                        let mut rng = ChaCha8Rng::seed_from_u64(seed);
                        let arch = every_op(act, loss.head.outputs());
                        let mut net = Stack::new(arch, seed, &mut [ChaCha8Rng::seed_from_u64(seed)]);
                        randomise(&mut net, &mut rng);
                        let (x, codes) = batch_data(n, &mut rng);
                        clear_of_kinks(&net, Batch { x: &x, codes: &codes, n }, mode).then_some((net, x, codes))
                    })
                    .expect("some seed works");
                let batch = Batch { x: &x, codes: &codes, n };
                let mut cache = StackCache::default();
                net.forward(batch, &mut cache, mode);
                let mut d = vec![0.0; n * loss.head.outputs()];
                loss.loss_and_grad(cache.logits(), y, n, &mut d);
                let mut grads = net.zero_gradients();
                net.backward(batch, &mut cache, &d, &mut grads);

                let loss_at = |net: &Stack| {
                    let mut c = StackCache::default();
                    net.forward(batch, &mut c, mode);
                    loss.loss(c.logits(), y, n)
                };
                let eps = 2e-3f32;
                let tables = net.arch.embeddings.clone();
                for s in 0..net.params.len() {
                    for j in 0..net.params[s].len() {
                        // The unseen-category row is frozen at zero, not trained.
                        if s < tables.len() && j >= tables[s].vocabulary * tables[s].dim {
                            continue;
                        }
                        let orig = net.params[s][j];
                        net.params[s][j] = orig + eps;
                        let up = loss_at(&net);
                        net.params[s][j] = orig - eps;
                        let down = loss_at(&net);
                        net.params[s][j] = orig;
                        let numeric = (up - down) / (2.0 * eps as f64);
                        let analytic = grads.params[s][j] as f64;
                        assert!(
                            slopes_agree(numeric, analytic),
                            "{act:?} {loss:?} slot {s} param {j}: numeric {numeric} analytic {analytic}"
                        );
                    }
                }
            }
        }
    }

    /// The scoring network from the first dense layer's products on: given
    /// the products of the encoded inputs and categorical vectors
    /// ([`Stack::linear_products`]) it scores as from the codes; its
    /// gradient with respect to the products and to the inputs its periodic
    /// embeddings read is the slope finite differences measure, through
    /// every op in its scoring form (running BatchNorm statistics, no
    /// dropout), for a stack of two models; and the products' backward is
    /// their transpose.
    #[test]
    fn gradients_from_the_first_layers_products_match_finite_differences_when_scoring() {
        let n = 5;
        for act in [Activation::Relu, Activation::Gelu, Activation::Tanh] {
            let (net, x, codes) = (0..)
                .find_map(|seed| {
                    let mut rng = ChaCha8Rng::seed_from_u64(seed);
                    let models: Vec<Stack> = (0..2)
                        .map(|m| {
                            let mut net =
                                Stack::new(every_op(act, 3), 7, &mut [ChaCha8Rng::seed_from_u64(seed * 2 + m)]);
                            randomise(&mut net, &mut rng);
                            net
                        })
                        .collect();
                    let net = Stack::from_models(&models);
                    let (x, codes) = batch_data(n, &mut rng);
                    let batch = Batch { x: &x, codes: &codes, n };
                    clear_of_kinks(&net, batch, Mode::Gradient).then_some((net, x, codes))
                })
                .expect("some seed works");
            let batch = Batch { x: &x, codes: &codes, n };
            let vectors = net.categorical_vectors(batch);
            assert_eq!(vectors.len(), n * 2 * 2);
            let products = net.linear_products(&x, &vectors, n);
            let logits = |x: &[f32], products: &[f32]| {
                let mut c = StackCache::default();
                net.forward_products(Batch { x, codes: &[], n }, products, &mut c);
                c.logits().to_vec()
            };
            let mut scored = StackCache::default();
            net.forward(batch, &mut scored, Mode::Eval);
            for (a, b) in logits(&x, &products).iter().zip(scored.logits()) {
                assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{act:?}: {a} from the products, {b} scored");
            }

            let mut rng = ChaCha8Rng::seed_from_u64(3);
            let weights: Vec<f32> = (0..n * 2 * 3).map(|_| rng.random_range(-1.0..1.0)).collect();
            let objective = |x: &[f32], products: &[f32]| -> f64 {
                logits(x, products).iter().zip(&weights).map(|(l, w)| (l * w) as f64).sum()
            };
            let mut cache = StackCache::default();
            net.forward_products(batch, &products, &mut cache);
            let (mut d_products, mut dx) = (Vec::new(), Vec::new());
            net.products_backward(batch, &mut cache, &weights, &mut d_products, &mut dx);
            assert_eq!((d_products.len(), dx.len()), (products.len(), x.len()));
            let eps = 2e-3f32;
            let check = |what: &str, j: usize, analytic: f32, up: f64, down: f64| {
                let numeric = (up - down) / (2.0 * eps as f64);
                assert!(
                    slopes_agree(numeric, analytic as f64),
                    "{act:?} {what} {j}: numeric {numeric} analytic {analytic}"
                );
            };
            for j in 0..x.len() {
                let (mut up, mut down) = (x.clone(), x.clone());
                up[j] += eps;
                down[j] -= eps;
                check("input", j, dx[j], objective(&up, &products), objective(&down, &products));
            }
            for j in 0..products.len() {
                let (mut up, mut down) = (products.clone(), products.clone());
                up[j] += eps;
                down[j] -= eps;
                check("product", j, d_products[j], objective(&x, &up), objective(&x, &down));
            }

            // <d, L(x, v)> = <Lᵀ d, (x, v)>.
            let (mut lx, mut lv) = (vec![0.0f32; x.len()], vec![0.0f32; vectors.len()]);
            net.linear_products_backward(&d_products, n, &mut lx, &mut lv);
            let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(a, b)| (a * b) as f64).sum::<f64>();
            let (left, right) = (dot(&d_products, &products), dot(&lx, &x) + dot(&lv, &vectors));
            assert!((left - right).abs() <= 1e-4 * left.abs().max(1.0), "{act:?}: {left} vs {right}");
        }
    }

    /// Scoring on several threads, in chunks, agrees with one pass over all
    /// rows. Not bit for bit: the gemm crate picks its kernel by the number of
    /// rows, and a chunk has fewer than the whole batch.
    #[test]
    fn threaded_chunked_prediction_equals_one_pass() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut net = Stack::new(every_op(Activation::Relu, 3), 2, &mut [ChaCha8Rng::seed_from_u64(2)]);
        randomise(&mut net, &mut rng);
        let n = 2 * PREDICT_CHUNK + 77;
        let (x, codes) = batch_data(n, &mut rng);
        let mut cache = StackCache::default();
        net.forward(Batch { x: &x, codes: &codes, n }, &mut cache, Mode::Eval);
        let whole = cache.logits().to_vec();
        for threads in [1, 2, 3] {
            let mut p = Predictor::new(&net, threads);
            let mut out = Vec::new();
            p.predict(Batch { x: &x, codes: &codes, n }, &mut out);
            p.predict(Batch { x: &x[..3 * 7], codes: &codes[..7], n: 7 }, &mut out);
            assert_eq!(out.len(), (n + 7) * 3);
            let expected = whole.iter().chain(&whole[..7 * 3]);
            for (i, (a, b)) in out.iter().zip(expected).enumerate() {
                assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{threads} threads, value {i}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn dropout_masks_drop_about_p_and_depend_only_on_their_coordinates() {
        let kept = (0..10_000).filter(|&c| dropout_keeps(1, 2, 3, 4, c, 0.25)).count();
        assert!((7_200..7_800).contains(&kept), "{kept}");
        assert_eq!(dropout_keeps(1, 2, 3, 4, 5, 0.5), dropout_keeps(1, 2, 3, 4, 5, 0.5));
        let differ = (0..1000).filter(|&r| dropout_keeps(1, 2, 3, r, 0, 0.5) != dropout_keeps(1, 3, 3, r, 0, 0.5));
        assert!(differ.count() > 300, "another step draws another mask");
    }
}
