//! The training engine: tabular networks over f32 row-major matrices on CPU.
//!
//! Networks are a sequence of [`Op`]s: dense layers, ReLU/GELU/SiLU/tanh,
//! LayerNorm and BatchNorm, dropout and residual connections, over encoded
//! features and learnt categorical embeddings. Heads are binary and
//! multiclass (optionally class-weighted and label-smoothed), and regression
//! (squared error or Huber).
//! Optimisers are Adam, AdamW and SGD with momentum, with schedules,
//! weight decay and clipping.
//!
//! Stacks train on the CPU or on a CUDA GPU, behind one trait
//! ([`StackTrainer`], chosen by [`backend::start`]).
//!
//! Training always runs on a [`Stack`]: K networks of one architecture
//! trained in one pass (K = 1 for a single model). Everything is seeded, so a
//! model trained twice with the same seed is bit-identical, alone or in a stack.

pub mod backend;
pub mod cuda;
mod optim;
mod trainer;

// The networks themselves (ops, forward and backward passes, the path
// tracer) are crate `cerebro-model`'s, which the extension links too.
pub use backend::{BackendError, Compute, DeviceChoice, StackTrainer};
pub use cerebro_model::{activation, loss, path, stack};
pub use cerebro_model::{
    dropout_keeps, sigmoid, softmax_into, Activation, Arch, ArchError, Batch, Embedding, Head, Loss, Mode, Op,
    Periodic, Predictor, Stack, StackCache, StackGradients, BATCH_NORM_MOMENTUM, NORM_EPS,
};
pub use optim::{scheduled_lr, ModelStep, StackOptimizer};
pub use trainer::{BatchSource, MiniBatch, ThreadsError, Trainer, SHARD_MODELS};
