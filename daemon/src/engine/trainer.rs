//! One optimiser step for a [`Stack`], spread over threads.
//!
//! - A stack of several models is split by **model** into shards of at most
//!   [`SHARD_MODELS`] models, dealt out to threads. Each shard steps on the
//!   whole batch, on its own. Nothing is shared or summed across shards, so
//!   every model ends exactly as it would trained alone; and with
//!   [`Trainer::epoch`] each thread runs its shards through a whole epoch,
//!   gathering its own minibatches, with no barrier between steps.
//! - A single model is split by **rows**: threads take contiguous row ranges
//!   of the batch for the forward and backward passes, the loss is computed
//!   over the whole batch in between, and the per-thread gradients are summed
//!   in thread order. Deterministic for a given thread count; another count
//!   sums in another order, so weights then agree only to rounding. A
//!   network with BatchNorm is not split: its statistics are the whole
//!   batch's.

use cerebro_shared::spec::Optimizer;
use rayon::prelude::*;

use super::loss::Loss;
use super::optim::{ModelStep, StackOptimizer};
use super::stack::{Batch, Mode, Stack, StackCache, StackGradients};

/// Multiply-adds a thread must get before splitting a batch's rows pays for
/// waking it (measured: a 64-32-1 network at batch 512, about 1M, does not).
const MIN_MACS_PER_THREAD: usize = 4 << 20;

/// Most models in one shard: a stack's activations stay in cache (measured
/// with 64-32-1 networks at batch 512: 32 models in one shard ran at 70 % of
/// the per-model speed of 8).
pub const SHARD_MODELS: usize = 8;

/// A buffer [`Trainer::epoch`]'s caller may gather a minibatch into.
#[derive(Debug, Default)]
pub struct MiniBatch {
    pub x: Vec<f32>,
    pub codes: Vec<u32>,
    pub y: Vec<f32>,
    pub n: usize,
}

impl MiniBatch {
    /// The gathered rows and their targets.
    pub fn view(&self) -> (Batch<'_>, &[f32]) {
        (Batch { x: &self.x, codes: &self.codes, n: self.n }, &self.y)
    }
}

/// Where [`Trainer::epoch`] gets step `i`'s rows and targets: gathered into
/// the buffer, or borrowed from data that is already contiguous.
pub trait BatchSource: Sync {
    fn batch<'s>(&'s self, i: usize, buffer: &'s mut MiniBatch) -> (Batch<'s>, &'s [f32]);
}

/// One thread's share of a step: its rows' activations, loss and gradients.
struct Part {
    cache: StackCache,
    grads: StackGradients,
    d_logits: Vec<f32>,
    block: Vec<f32>,
    block_grad: Vec<f32>,
    /// Each model's summed loss over the part's rows.
    losses: Vec<f64>,
}

impl Part {
    fn new(stack: &Stack) -> Part {
        Part {
            cache: StackCache::default(),
            grads: stack.zero_gradients(),
            d_logits: Vec::new(),
            block: Vec::new(),
            block_grad: Vec::new(),
            losses: vec![0.0; stack.k],
        }
    }
}

/// Steps one stack, its minibatches split by rows across a pool.
struct RowTrainer {
    stack: Stack,
    loss: Loss,
    /// Steps taken, which seed the dropout masks.
    steps: u64,
    optimizer: StackOptimizer,
    pool: Option<rayon::ThreadPool>,
    parts: Vec<Part>,
    grads: StackGradients,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot start {threads} training threads: {reason}")]
pub struct ThreadsError {
    threads: usize,
    reason: String,
}

fn pool(threads: usize) -> Result<rayon::ThreadPool, ThreadsError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("cerebro-train-{i}"))
        .build()
        .map_err(|e| ThreadsError { threads, reason: e.to_string() })
}

impl RowTrainer {
    fn new(stack: Stack, loss: Loss, kind: Optimizer, threads: usize) -> Result<RowTrainer, ThreadsError> {
        let threads = threads.max(1);
        let pool = if threads > 1 { Some(pool(threads)?) } else { None };
        let parts = (0..threads).map(|_| Part::new(&stack)).collect();
        Ok(RowTrainer {
            optimizer: StackOptimizer::new(&stack, kind),
            grads: stack.zero_gradients(),
            loss,
            steps: 0,
            pool,
            parts,
            stack,
        })
    }

    /// Row ranges of an `n`-row batch: one per thread, or a single one when
    /// the step is too small for waking threads to pay off. The choice depends
    /// only on the shape and `n`, so runs stay deterministic.
    fn ranges(&self, n: usize) -> Vec<std::ops::Range<usize>> {
        let macs = n * self.stack.k * self.stack.arch.macs_per_row();
        let t = if macs < MIN_MACS_PER_THREAD * 2 || self.stack.arch.has_batch_norm() { 1 } else { self.parts.len() };
        (0..t).map(|i| n * i / t..n * (i + 1) / t).collect()
    }

    /// One step on a batch with targets `y`; every active model's batch loss
    /// times `n` is added to `losses[model]`.
    fn step(&mut self, batch: Batch<'_>, y: &[f32], settings: &[ModelStep], active: &[bool], losses: &mut [f64]) {
        let n = batch.n;
        let (inputs, cols) = (self.stack.arch.inputs, self.stack.arch.embeddings.len());
        let (k, c) = (self.stack.k, self.stack.outputs());
        let ranges = self.ranges(n);
        let (stack, loss, step) = (&self.stack, &self.loss, self.steps);
        // Each part computes its own rows' loss against the whole batch's
        // denominator, so forward, loss and backward need no barrier between them.
        let denominator = loss.denominator(&y[..n]);
        let inv_denominator = 1.0 / denominator;
        let part_step = |part: &mut Part, r: &std::ops::Range<usize>| {
            let rows = batch.rows(r.clone(), inputs, cols);
            stack.forward(rows, &mut part.cache, Mode::Train { step, row_offset: r.start });
            let m_rows = r.len();
            part.d_logits.resize(m_rows * k * c, 0.0);
            part.block.resize(m_rows * c, 0.0);
            part.block_grad.resize(m_rows * c, 0.0);
            let logits = part.cache.logits();
            for m in (0..k).filter(|&m| active[m]) {
                for j in 0..m_rows {
                    part.block[j * c..(j + 1) * c].copy_from_slice(&logits[j * k * c + m * c..j * k * c + (m + 1) * c]);
                }
                part.losses[m] = loss.sum_and_grad(&part.block, &y[r.clone()], &mut part.block_grad, inv_denominator);
                for j in 0..m_rows {
                    part.d_logits[j * k * c + m * c..j * k * c + (m + 1) * c]
                        .copy_from_slice(&part.block_grad[j * c..(j + 1) * c]);
                }
            }
            stack.backward(rows, &mut part.cache, &part.d_logits, &mut part.grads);
        };
        match self.pool.as_ref().filter(|_| ranges.len() > 1) {
            None => part_step(&mut self.parts[0], &ranges[0]),
            Some(pool) => pool.scope(|s| {
                for (part, r) in self.parts.iter_mut().zip(&ranges) {
                    s.spawn(move |_| part_step(part, r));
                }
            }),
        }
        for m in (0..k).filter(|&m| active[m]) {
            let total: f64 = self.parts[..ranges.len()].iter().map(|p| p.losses[m]).sum();
            losses[m] += total / denominator as f64 * n as f64;
        }

        let grads = if ranges.len() == 1 {
            &self.parts[0].grads
        } else {
            let (first, rest) = self.parts[..ranges.len()].split_first().expect("at least one part");
            for (total, g) in self.grads.params.iter_mut().zip(&first.grads.params) {
                total.copy_from_slice(g);
            }
            for part in rest {
                for (total, g) in self.grads.params.iter_mut().zip(&part.grads.params) {
                    total.iter_mut().zip(g).for_each(|(t, g)| *t += g);
                }
            }
            &self.grads
        };
        self.optimizer.step(&mut self.stack, grads, settings, active);
        // BatchNorm never splits rows, so part 0 saw the whole batch.
        self.stack.update_running_stats(&self.parts[0].cache, active);
        self.steps += 1;
    }

    /// Logits of every model for the batch's rows, `[n × K·out]`, scored
    /// `chunk_rows` rows at a time.
    fn predict(&self, batch: Batch<'_>, chunk_rows: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(batch.n * self.stack.k * self.stack.outputs());
        self.stack.predict_chunked(batch, chunk_rows, &mut StackCache::default(), &mut out);
        out
    }
}

/// Steps a stack of K models on one thread or several.
pub struct Trainer {
    inner: Inner,
}

/// A sub-stack and the index of its first model.
type Shard = (usize, RowTrainer);

enum Inner {
    Rows(Box<RowTrainer>),
    /// Each thread's shards, in model order.
    Models {
        pool: rayon::ThreadPool,
        threads: Vec<Vec<Shard>>,
    },
}

impl Trainer {
    pub fn new(stack: Stack, loss: Loss, kind: Optimizer, threads: usize) -> Result<Trainer, ThreadsError> {
        let threads = threads.max(1);
        if stack.k < 2 || (threads < 2 && stack.k <= SHARD_MODELS) {
            return Ok(Trainer { inner: Inner::Rows(Box::new(RowTrainer::new(stack, loss, kind, threads)?)) });
        }
        let k = stack.k;
        let workers = threads.min(k);
        // Contiguous model ranges per thread, each cut into shards.
        let mut per_thread = Vec::with_capacity(workers);
        for t in 0..workers {
            let (first, end) = (k * t / workers, k * (t + 1) / workers);
            let mut shards = Vec::new();
            let pieces = (end - first).div_ceil(SHARD_MODELS);
            for s in 0..pieces {
                let (a, b) = (first + (end - first) * s / pieces, first + (end - first) * (s + 1) / pieces);
                let models: Vec<_> = (a..b).map(|m| stack.model(m)).collect();
                shards.push((a, RowTrainer::new(Stack::from_models(&models), loss.clone(), kind, 1)?));
            }
            per_thread.push(shards);
        }
        Ok(Trainer { inner: Inner::Models { pool: pool(workers)?, threads: per_thread } })
    }

    fn shards(&self) -> impl Iterator<Item = &Shard> {
        match &self.inner {
            Inner::Rows(_) => None,
            Inner::Models { threads, .. } => Some(threads.iter().flatten()),
        }
        .into_iter()
        .flatten()
    }

    /// Model `m` as it stands.
    pub fn model(&self, m: usize) -> Stack {
        match &self.inner {
            Inner::Rows(r) => r.stack.model(m),
            Inner::Models { .. } => {
                let (first, shard) =
                    self.shards().filter(|(first, _)| *first <= m).last().expect("shard 0 starts at 0");
                shard.stack.model(m - first)
            }
        }
    }

    /// One step on a batch with targets `y`, for every model `m` with
    /// `active[m]`, with `settings[m]`; each model's batch loss times `n` is
    /// added to `losses[m]`.
    pub fn step(&mut self, batch: Batch<'_>, y: &[f32], settings: &[ModelStep], active: &[bool], losses: &mut [f64]) {
        struct One<'a>(Batch<'a>, &'a [f32]);
        impl BatchSource for One<'_> {
            fn batch<'s>(&'s self, _: usize, _: &'s mut MiniBatch) -> (Batch<'s>, &'s [f32]) {
                (self.0, self.1)
            }
        }
        self.epoch(1, &One(batch, y), &|_, m| settings[m], active, losses);
    }

    /// `steps` steps, the minibatch of step `i` from `source`
    /// and model `m`'s settings for it given by `settings(i, m)`. With models
    /// split across threads, each thread gathers its own minibatches and runs
    /// its shards through every step without waiting for the others.
    pub fn epoch(
        &mut self,
        steps: usize,
        source: &dyn BatchSource,
        settings: &(dyn Fn(usize, usize) -> ModelStep + Sync),
        active: &[bool],
        losses: &mut [f64],
    ) {
        match &mut self.inner {
            Inner::Rows(r) => {
                let mut mb = MiniBatch::default();
                let mut step_settings = Vec::with_capacity(r.stack.k);
                for i in 0..steps {
                    let (batch, y) = source.batch(i, &mut mb);
                    step_settings.clear();
                    step_settings.extend((0..r.stack.k).map(|m| settings(i, m)));
                    r.step(batch, y, &step_settings, active, losses);
                }
            }
            Inner::Models { pool, threads } => pool.scope(|s| {
                let mut rest = losses;
                for shards in threads.iter_mut() {
                    let models: usize = shards.iter().map(|(_, r)| r.stack.k).sum();
                    let (mine, others) = rest.split_at_mut(models);
                    rest = others;
                    s.spawn(move |_| {
                        let mut mb = MiniBatch::default();
                        let mut step_settings = Vec::with_capacity(SHARD_MODELS);
                        let base = shards.first().map_or(0, |(first, _)| *first);
                        for i in 0..steps {
                            let (batch, y) = source.batch(i, &mut mb);
                            for (first, shard) in shards.iter_mut() {
                                let k = shard.stack.k;
                                step_settings.clear();
                                step_settings.extend((*first..*first + k).map(|m| settings(i, m)));
                                let at = *first - base;
                                let range = *first..*first + k;
                                shard.step(batch, y, &step_settings, &active[range], &mut mine[at..at + k]);
                            }
                        }
                    });
                }
            }),
        }
    }

    /// Logits of every model for the batch's rows, `[n × K·out]`, scored
    /// `chunk_rows` rows at a time.
    pub fn predict(&self, batch: Batch<'_>, chunk_rows: usize) -> Vec<f32> {
        match &self.inner {
            Inner::Rows(r) => r.predict(batch, chunk_rows),
            Inner::Models { pool, .. } => {
                let c = self.shards().next().expect("a shard").1.stack.outputs();
                // Shards score at once, as they train: one per thread at a time.
                let shards: Vec<&RowTrainer> = self.shards().map(|(_, s)| s).collect();
                let parts: Vec<(usize, Vec<f32>)> =
                    pool.install(|| shards.par_iter().map(|s| (s.stack.k * c, s.predict(batch, chunk_rows))).collect());
                let row_width: usize = parts.iter().map(|(w, _)| w).sum();
                let n = batch.n;
                let mut out = Vec::with_capacity(n * row_width);
                for r in 0..n {
                    for (w, logits) in &parts {
                        out.extend_from_slice(&logits[r * w..(r + 1) * w]);
                    }
                }
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::super::stack::{Arch, Op};
    use super::super::{Activation, Head};
    use super::*;

    fn run(threads: usize, k: usize) -> (Vec<Stack>, Vec<f64>) {
        // Large enough per step that a single model's rows are split; with
        // dropout, whose masks must not depend on the split.
        let n = 256;
        let mut arch = Arch::mlp(8, &[256, 256], 1, Activation::Silu);
        arch.ops.insert(2, Op::Dropout { p: 0.2 });
        let mut rngs: Vec<ChaCha8Rng> = (0..k as u64).map(ChaCha8Rng::seed_from_u64).collect();
        let stack = Stack::new(arch, 3, &mut rngs);
        let mut trainer = Trainer::new(stack, Loss::new(Head::Binary), Optimizer::Adam, threads).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(42);
        let x: Vec<f32> = (0..n * 8).map(|_| rng.random_range(-1.0..1.0)).collect();
        let y: Vec<f32> = (0..n).map(|i| (x[i * 8] > 0.0) as u32 as f32).collect();
        let mut losses = vec![0.0; k];
        for _ in 0..5 {
            let settings = ModelStep { lr: 1e-3, weight_decay: 0.0, momentum: 0.0, clip_norm: 0.0 };
            let batch = Batch { x: &x, codes: &[], n };
            trainer.step(batch, &y, &vec![settings; k], &vec![true; k], &mut losses);
        }
        ((0..k).map(|m| trainer.model(m)).collect(), losses)
    }

    #[test]
    fn splitting_rows_is_deterministic_and_agrees_with_one_thread() {
        let (one, loss_one) = run(1, 1);
        let (two, loss_two) = run(2, 1);
        assert_eq!(run(2, 1).0, two, "the same thread count gives the same weights");
        assert!((loss_one[0] - loss_two[0]).abs() < 1e-4 * loss_one[0].abs());
        for (a, b) in one[0].params.iter().zip(&two[0].params) {
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= 1e-4, "{x} vs {y}");
            }
        }
    }

    /// Many shards per thread, driven a whole epoch at a time, give every
    /// model exactly what it gets trained alone, step by step.
    #[test]
    fn epochs_over_many_shards_equal_each_model_trained_alone() {
        let (n, k, steps) = (64, SHARD_MODELS * 2 + 3, 4);
        let arch = Arch::mlp(8, &[16], 1, Activation::Relu);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let x: Vec<f32> = (0..steps * n * 8).map(|_| rng.random_range(-1.0..1.0)).collect();
        let y: Vec<f32> = (0..steps * n).map(|i| (x[i * 8] > 0.0) as u32 as f32).collect();
        struct Copies<'a>(&'a [f32], &'a [f32], usize);
        impl BatchSource for Copies<'_> {
            fn batch<'s>(&'s self, i: usize, mb: &'s mut MiniBatch) -> (Batch<'s>, &'s [f32]) {
                let Copies(x, y, n) = *self;
                mb.n = n;
                mb.x = x[i * n * 8..(i + 1) * n * 8].to_vec();
                mb.codes.clear();
                mb.y = y[i * n..(i + 1) * n].to_vec();
                mb.view()
            }
        }
        let source = Copies(&x, &y, n);
        // Each model its own learning rate; the last one sits the epoch out.
        let settings = |i: usize, m: usize| ModelStep {
            lr: 1e-3 * (1 + m) as f32 / (1 + i) as f32,
            weight_decay: 0.0,
            momentum: 0.0,
            clip_norm: 0.0,
        };
        let active: Vec<bool> = (0..k).map(|m| m + 1 < k).collect();
        let mut rngs: Vec<ChaCha8Rng> = (0..k as u64).map(ChaCha8Rng::seed_from_u64).collect();
        let stack = Stack::new(arch, 3, &mut rngs);
        let mut fused = Trainer::new(stack.clone(), Loss::new(Head::Binary), Optimizer::Adam, 2).unwrap();
        let mut fused_losses = vec![0.0; k];
        fused.epoch(steps, &source, &settings, &active, &mut fused_losses);
        for m in 0..k {
            let mut alone = Trainer::new(stack.model(m), Loss::new(Head::Binary), Optimizer::Adam, 1).unwrap();
            let mut losses = [0.0];
            let mut mb = MiniBatch::default();
            for i in 0..steps {
                let (batch, y) = source.batch(i, &mut mb);
                alone.step(batch, y, &[settings(i, m)], &[active[m]], &mut losses);
            }
            assert_eq!(fused.model(m), alone.model(0), "model {m}");
            assert_eq!(fused_losses[m], losses[0], "model {m}");
        }
        assert_eq!(fused.model(k - 1), stack.model(k - 1), "an inactive model is untouched");
    }

    #[test]
    fn splitting_models_gives_each_model_its_one_thread_result() {
        let (stacked, losses) = run(2, 3);
        let (alone, alone_losses) = run(1, 3);
        assert_eq!(stacked, alone);
        assert_eq!(losses, alone_losses);
    }
}
