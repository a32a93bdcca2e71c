//! The training engine: dense networks over f32 row-major matrices on CPU.
//!
//! Kept deliberately small for now: dense layers with ReLU between them, the
//! three heads Cerebro needs, and Adam(W). Everything is single-threaded and
//! seeded, so a model trained twice with the same seed is bit-identical.

mod gemm;
mod loss;
mod mlp;
mod optim;

pub use loss::{sigmoid, softmax_into, Head};
pub use mlp::{Dense, ForwardCache, Gradients, Mlp};
pub use optim::Adam;
