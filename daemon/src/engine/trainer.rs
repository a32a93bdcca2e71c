//! One optimiser step for a [`Stack`], with each minibatch split across
//! threads.
//!
//! Threads take contiguous row ranges of the batch and run the forward and
//! backward passes on them; the loss is computed over the whole batch in
//! between, and the per-thread gradients are summed in thread order. With a
//! given thread count every step is deterministic; a different count sums in
//! another order, so weights agree only to rounding.

use super::loss::Head;
use super::optim::StackAdam;
use super::stack::{Stack, StackCache, StackGradients};

struct Part {
    cache: StackCache,
    grads: StackGradients,
}

pub struct Trainer {
    pub stack: Stack,
    head: Head,
    adam: StackAdam,
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

impl Trainer {
    pub fn new(stack: Stack, head: Head, threads: usize) -> Result<Trainer, ThreadsError> {
        let threads = threads.max(1);
        let pool = if threads > 1 {
            Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("cerebro-train-{i}"))
                    .build()
                    .map_err(|e| ThreadsError { threads, reason: e.to_string() })?,
            )
        } else {
            None
        };
        let parts =
            (0..threads).map(|_| Part { cache: StackCache::default(), grads: stack.zero_gradients() }).collect();
        Ok(Trainer {
            adam: StackAdam::new(&stack),
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

    /// Row ranges of an `n`-row batch, one per thread.
    fn ranges(&self, n: usize) -> Vec<std::ops::Range<usize>> {
        let t = self.parts.len();
        (0..t).map(|i| n * i / t..n * (i + 1) / t).collect()
    }

    /// One step on `n` rows of `x` with targets `y`; every active model's
    /// batch loss times `n` is added to `losses[model]`.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        x: &[f32],
        y: &[f32],
        n: usize,
        lr: &[f32],
        wd: &[f32],
        active: &[bool],
        losses: &mut [f64],
    ) {
        let width = self.stack.dims[0];
        let (k, c) = (self.stack.k, self.stack.outputs());
        let ranges = self.ranges(n);
        let stack = &self.stack;
        let forward = |part: &mut Part, r: &std::ops::Range<usize>| {
            stack.forward(&x[r.start * width..r.end * width], r.len(), &mut part.cache)
        };
        match &self.pool {
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
        match &self.pool {
            None => backward(&mut self.parts[0], &ranges[0]),
            Some(pool) => pool.scope(|s| {
                for (part, r) in self.parts.iter_mut().zip(&ranges) {
                    s.spawn(move |_| backward(part, r));
                }
            }),
        }

        let grads = if self.parts.len() == 1 {
            &self.parts[0].grads
        } else {
            let (first, rest) = self.parts.split_first().expect("at least one part");
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
        self.adam.step(&mut self.stack, grads, lr, wd, active);
    }

    /// Logits of every model for `n` rows, `[n × K·out]`.
    pub fn predict(&self, x: &[f32], chunk_rows: usize) -> Vec<f32> {
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
