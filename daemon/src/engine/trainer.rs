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
//!   sums in another order, so weights then agree only to rounding.

use super::loss::Head;
use cerebro_shared::spec::Optimizer;

use super::optim::{ModelStep, StackOptimizer};
use super::stack::{Stack, StackCache, StackGradients};

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
    head: Head,
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
    fn new(stack: Stack, head: Head, kind: Optimizer, threads: usize) -> Result<RowTrainer, ThreadsError> {
        let threads = threads.max(1);
        let pool = if threads > 1 { Some(pool(threads)?) } else { None };
        let parts =
            (0..threads).map(|_| Part { cache: StackCache::default(), grads: stack.zero_gradients() }).collect();
        Ok(RowTrainer {
            optimizer: StackOptimizer::new(&stack, kind),
            grads: stack.zero_gradients(),
            head,
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
        let macs: usize = n * self.stack.k * self.stack.dims.windows(2).map(|w| w[0] * w[1]).sum::<usize>();
        let t = if macs < MIN_MACS_PER_THREAD * 2 { 1 } else { self.parts.len() };
        (0..t).map(|i| n * i / t..n * (i + 1) / t).collect()
    }

    /// One step on `n` rows of `x` with targets `y`; every active model's
    /// batch loss times `n` is added to `losses[model]`.
    #[allow(clippy::too_many_arguments)]
    fn step(&mut self, x: &[f32], y: &[f32], n: usize, settings: &[ModelStep], active: &[bool], losses: &mut [f64]) {
        let width = self.stack.dims[0];
        let (k, c) = (self.stack.k, self.stack.outputs());
        let ranges = self.ranges(n);
        let stack = &self.stack;
        let forward = |part: &mut Part, r: &std::ops::Range<usize>| {
            stack.forward(&x[r.start * width..r.end * width], r.len(), &mut part.cache)
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
            losses[m] += self.head.loss_and_grad(&self.block, &y[..n], n, &mut self.block_grad) * n as f64;
            for row in 0..n {
                self.d_logits[row * k * c + m * c..row * k * c + (m + 1) * c]
                    .copy_from_slice(&self.block_grad[row * c..(row + 1) * c]);
            }
        }

        let d_logits = &self.d_logits;
        let backward = |part: &mut Part, r: &std::ops::Range<usize>| {
            stack.backward(
                &x[r.start * width..r.end * width],
                r.len(),
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
            for (total, g) in self.grads.weights.iter_mut().zip(&first.grads.weights) {
                total.copy_from_slice(g);
            }
            for (total, g) in self.grads.biases.iter_mut().zip(&first.grads.biases) {
                total.copy_from_slice(g);
            }
            for part in rest {
                for (total, g) in self.grads.weights.iter_mut().zip(&part.grads.weights) {
                    total.iter_mut().zip(g).for_each(|(t, g)| *t += g);
                }
                for (total, g) in self.grads.biases.iter_mut().zip(&part.grads.biases) {
                    total.iter_mut().zip(g).for_each(|(t, g)| *t += g);
                }
            }
            &self.grads
        };
        self.optimizer.step(&mut self.stack, grads, settings, active);
    }

    /// Logits of every model for `n` rows, `[n × K·out]`.
    fn predict(&self, x: &[f32], chunk_rows: usize) -> Vec<f32> {
        let width = self.stack.dims[0];
        let mut out = Vec::with_capacity(x.len() / width.max(1) * self.stack.k * self.stack.outputs());
        let mut cache = StackCache::default();
        for chunk in x.chunks(chunk_rows * width.max(1)) {
            self.stack.forward(chunk, chunk.len() / width.max(1), &mut cache);
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
    pub fn new(stack: Stack, head: Head, kind: Optimizer, threads: usize) -> Result<Trainer, ThreadsError> {
        let threads = threads.max(1);
        if stack.k < 2 || threads < 2 {
            return Ok(Trainer { inner: Inner::Rows(Box::new(RowTrainer::new(stack, head, kind, threads)?)) });
        }
        let (k, shards_n) = (stack.k, threads.min(stack.k));
        let mut shards = Vec::with_capacity(shards_n);
        for t in 0..shards_n {
            let (first, end) = (k * t / shards_n, k * (t + 1) / shards_n);
            let models: Vec<_> = (first..end).map(|m| stack.model(m)).collect();
            shards.push((first, RowTrainer::new(Stack::from_models(&models), head, kind, 1)?));
        }
        Ok(Trainer { inner: Inner::Models { pool: pool(shards_n)?, shards } })
    }

    /// Model `m` as it stands.
    pub fn model(&self, m: usize) -> super::Mlp {
        match &self.inner {
            Inner::Rows(r) => r.stack.model(m),
            Inner::Models { shards, .. } => {
                let (first, shard) = shards.iter().rev().find(|(first, _)| *first <= m).expect("shard 0 starts at 0");
                shard.stack.model(m - first)
            }
        }
    }

    /// One step on `n` rows of `x` with targets `y`, for every model `m` with
    /// `active[m]`, with `settings[m]`; each model's batch loss times `n` is
    /// added to `losses[m]`.
    pub fn step(
        &mut self,
        x: &[f32],
        y: &[f32],
        n: usize,
        settings: &[ModelStep],
        active: &[bool],
        losses: &mut [f64],
    ) {
        match &mut self.inner {
            Inner::Rows(r) => r.step(x, y, n, settings, active, losses),
            Inner::Models { pool, shards } => pool.scope(|s| {
                let mut rest = losses;
                for (first, shard) in shards.iter_mut() {
                    let k = shard.stack.k;
                    let (mine, others) = rest.split_at_mut(k);
                    rest = others;
                    let range = *first..*first + k;
                    let (settings, active) = (&settings[range.clone()], &active[range]);
                    s.spawn(move |_| shard.step(x, y, n, settings, active, mine));
                }
            }),
        }
    }

    /// Logits of every model for the rows of `x`, `[n × K·out]`, scored
    /// `chunk_rows` rows at a time.
    pub fn predict(&self, x: &[f32], chunk_rows: usize) -> Vec<f32> {
        match &self.inner {
            Inner::Rows(r) => r.predict(x, chunk_rows),
            Inner::Models { shards, .. } => {
                let c = shards[0].1.stack.outputs();
                let parts: Vec<(usize, Vec<f32>)> =
                    shards.iter().map(|(_, s)| (s.stack.k * c, s.predict(x, chunk_rows))).collect();
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

    use super::super::Activation;
    use super::*;

    fn run(threads: usize, k: usize) -> (Vec<super::super::Mlp>, Vec<f64>) {
        // Large enough per step that a single model's rows are split.
        let (n, dims) = (256, [8, 256, 256, 1]);
        let mut rngs: Vec<ChaCha8Rng> = (0..k as u64).map(ChaCha8Rng::seed_from_u64).collect();
        let mut trainer =
            Trainer::new(Stack::new(&dims, Activation::Silu, &mut rngs), Head::Binary, Optimizer::Adam, threads)
                .unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(42);
        let x: Vec<f32> = (0..n * 8).map(|_| rng.random_range(-1.0..1.0)).collect();
        let y: Vec<f32> = (0..n).map(|i| (x[i * 8] > 0.0) as u32 as f32).collect();
        let mut losses = vec![0.0; k];
        for _ in 0..5 {
            let settings = ModelStep { lr: 1e-3, weight_decay: 0.0, momentum: 0.0, clip_norm: 0.0 };
            trainer.step(&x, &y, n, &vec![settings; k], &vec![true; k], &mut losses);
        }
        ((0..k).map(|m| trainer.model(m)).collect(), losses)
    }

    #[test]
    fn splitting_rows_is_deterministic_and_agrees_with_one_thread() {
        let (one, loss_one) = run(1, 1);
        let (two, loss_two) = run(2, 1);
        assert_eq!(run(2, 1).0, two, "the same thread count gives the same weights");
        assert!((loss_one[0] - loss_two[0]).abs() < 1e-4 * loss_one[0].abs());
        for (a, b) in one[0].layers.iter().zip(&two[0].layers) {
            for (x, y) in a.weight.iter().zip(&b.weight) {
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
