//! One optimiser step for a [`Stack`], spread over threads.
//!
//! - A stack of several models is split by **model**: each thread owns a
//!   sub-stack and steps it on the whole batch, on its own. Nothing is shared
//!   or summed across threads, so every model ends exactly as it would
//!   trained alone on one thread.
//! - A single model is split by **rows**: threads take contiguous row ranges
//!   of the batch for the forward and backward passes, the loss is computed
//!   over the whole batch in between, and the per-thread gradients are summed
//!   in thread order. Deterministic for a given thread count; another count
//!   sums in another order, so weights then agree only to rounding. A
//!   network with BatchNorm is not split: its statistics are the whole
//!   batch's.

use cerebro_shared::spec::Optimizer;

use super::loss::Loss;
use super::optim::{ModelStep, StackOptimizer};
use super::stack::{Batch, Mode, Stack, StackCache, StackGradients};

/// Multiply-adds a thread must get before splitting a batch's rows pays for
/// waking it (measured: a 64-32-1 network at batch 512, about 1M, does not).
const MIN_MACS_PER_THREAD: usize = 4 << 20;

struct Part {
    cache: StackCache,
    grads: StackGradients,
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
    d_logits: Vec<f32>,
    block: Vec<f32>,
    block_grad: Vec<f32>,
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
        let parts =
            (0..threads).map(|_| Part { cache: StackCache::default(), grads: stack.zero_gradients() }).collect();
        Ok(RowTrainer {
            optimizer: StackOptimizer::new(&stack, kind),
            grads: stack.zero_gradients(),
            loss,
            steps: 0,
            pool,
            parts,
            stack,
            d_logits: Vec::new(),
            block: Vec::new(),
            block_grad: Vec::new(),
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
        let stack = &self.stack;
        let step = self.steps;
        let forward = |part: &mut Part, r: &std::ops::Range<usize>| {
            let mode = Mode::Train { step, row_offset: r.start };
            stack.forward(batch.rows(r.clone(), inputs, cols), &mut part.cache, mode)
        };
        match self.pool.as_ref().filter(|_| ranges.len() > 1) {
            None => forward(&mut self.parts[0], &ranges[0]),
            Some(pool) => pool.scope(|s| {
                for (part, r) in self.parts.iter_mut().zip(&ranges) {
                    s.spawn(move |_| forward(part, r));
                }
            }),
        }

        self.d_logits.resize(n * k * c, 0.0);
        self.block.resize(n * c, 0.0);
        self.block_grad.resize(n * c, 0.0);
        for m in (0..k).filter(|&m| active[m]) {
            for (part, r) in self.parts.iter().zip(&ranges) {
                let logits = part.cache.logits();
                for (j, row) in r.clone().enumerate() {
                    self.block[row * c..(row + 1) * c]
                        .copy_from_slice(&logits[j * k * c + m * c..j * k * c + (m + 1) * c]);
                }
            }
            losses[m] += self.loss.loss_and_grad(&self.block, &y[..n], n, &mut self.block_grad) * n as f64;
            for row in 0..n {
                self.d_logits[row * k * c + m * c..row * k * c + (m + 1) * c]
                    .copy_from_slice(&self.block_grad[row * c..(row + 1) * c]);
            }
        }

        let d_logits = &self.d_logits;
        let backward = |part: &mut Part, r: &std::ops::Range<usize>| {
            stack.backward(
                batch.rows(r.clone(), inputs, cols),
                &mut part.cache,
                &d_logits[r.start * k * c..r.end * k * c],
                &mut part.grads,
            )
        };
        match self.pool.as_ref().filter(|_| ranges.len() > 1) {
            None => backward(&mut self.parts[0], &ranges[0]),
            Some(pool) => pool.scope(|s| {
                for (part, r) in self.parts.iter_mut().zip(&ranges) {
                    s.spawn(move |_| backward(part, r));
                }
            }),
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
        let (inputs, cols) = (self.stack.arch.inputs, self.stack.arch.embeddings.len());
        let mut out = Vec::with_capacity(batch.n * self.stack.k * self.stack.outputs());
        let mut cache = StackCache::default();
        for start in (0..batch.n).step_by(chunk_rows.max(1)) {
            let rows = batch.rows(start..(start + chunk_rows).min(batch.n), inputs, cols);
            self.stack.forward(rows, &mut cache, Mode::Eval);
            out.extend_from_slice(cache.logits());
        }
        out
    }
}

/// Steps a stack of K models on one thread or several.
pub struct Trainer {
    inner: Inner,
}

enum Inner {
    Rows(Box<RowTrainer>),
    /// Sub-stacks and the index of each one's first model.
    Models {
        pool: rayon::ThreadPool,
        shards: Vec<(usize, RowTrainer)>,
    },
}

impl Trainer {
    pub fn new(stack: Stack, loss: Loss, kind: Optimizer, threads: usize) -> Result<Trainer, ThreadsError> {
        let threads = threads.max(1);
        if stack.k < 2 || threads < 2 {
            return Ok(Trainer { inner: Inner::Rows(Box::new(RowTrainer::new(stack, loss, kind, threads)?)) });
        }
        let (k, shards_n) = (stack.k, threads.min(stack.k));
        let mut shards = Vec::with_capacity(shards_n);
        for t in 0..shards_n {
            let (first, end) = (k * t / shards_n, k * (t + 1) / shards_n);
            let models: Vec<_> = (first..end).map(|m| stack.model(m)).collect();
            shards.push((first, RowTrainer::new(Stack::from_models(&models), loss.clone(), kind, 1)?));
        }
        Ok(Trainer { inner: Inner::Models { pool: pool(shards_n)?, shards } })
    }

    /// Model `m` as it stands.
    pub fn model(&self, m: usize) -> Stack {
        match &self.inner {
            Inner::Rows(r) => r.stack.model(m),
            Inner::Models { shards, .. } => {
                let (first, shard) = shards.iter().rev().find(|(first, _)| *first <= m).expect("shard 0 starts at 0");
                shard.stack.model(m - first)
            }
        }
    }

    /// One step on a batch with targets `y`, for every model `m` with
    /// `active[m]`, with `settings[m]`; each model's batch loss times `n` is
    /// added to `losses[m]`.
    pub fn step(&mut self, batch: Batch<'_>, y: &[f32], settings: &[ModelStep], active: &[bool], losses: &mut [f64]) {
        match &mut self.inner {
            Inner::Rows(r) => r.step(batch, y, settings, active, losses),
            Inner::Models { pool, shards } => pool.scope(|s| {
                let mut rest = losses;
                for (first, shard) in shards.iter_mut() {
                    let k = shard.stack.k;
                    let (mine, others) = rest.split_at_mut(k);
                    rest = others;
                    let range = *first..*first + k;
                    let (settings, active) = (&settings[range.clone()], &active[range]);
                    s.spawn(move |_| shard.step(batch, y, settings, active, mine));
                }
            }),
        }
    }

    /// Logits of every model for the batch's rows, `[n × K·out]`, scored
    /// `chunk_rows` rows at a time.
    pub fn predict(&self, batch: Batch<'_>, chunk_rows: usize) -> Vec<f32> {
        match &self.inner {
            Inner::Rows(r) => r.predict(batch, chunk_rows),
            Inner::Models { shards, .. } => {
                let c = shards[0].1.stack.outputs();
                let parts: Vec<(usize, Vec<f32>)> =
                    shards.iter().map(|(_, s)| (s.stack.k * c, s.predict(batch, chunk_rows))).collect();
                let row_width: usize = parts.iter().map(|(w, _)| w).sum();
                let n = parts[0].1.len() / parts[0].0.max(1);
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

    #[test]
    fn splitting_models_gives_each_model_its_one_thread_result() {
        let (stacked, losses) = run(2, 3);
        let (alone, alone_losses) = run(1, 3);
        assert_eq!(stacked, alone);
        assert_eq!(losses, alone_losses);
    }
}
