//! The training engine: dense networks over f32 row-major matrices on CPU.
//!
//! Dense layers with ReLU, GELU, SiLU or tanh between them, the three heads Cerebro needs, and
//! Adam, AdamW or SGD with schedules and clipping. Training runs on a [`Stack`]: K networks of one shape trained in
//! one pass (K = 1 for a single model). Everything is seeded, so a model
//! trained twice with the same seed is bit-identical, alone or in a stack.

pub mod activation;
mod gemm;
mod loss;
mod mlp;
mod optim;
mod stack;
mod trainer;

pub use activation::Activation;
pub use loss::{sigmoid, softmax_into, Head};
pub use mlp::{Dense, ForwardCache, Gradients, Mlp, Predictor, Scratch};
pub use optim::{scheduled_lr, ModelStep, StackOptimizer};
pub use stack::{Stack, StackCache, StackGradients};
pub use trainer::{ThreadsError, Trainer};
