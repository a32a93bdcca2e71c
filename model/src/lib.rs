//! A Cerebro network and what it reads, with no runtime around it: the
//! engine's stacks of networks (K networks of one architecture) and their
//! forward and backward passes, the fitted feature pipeline that encodes a
//! batch of source columns, a trained model rebuilt from the weights its
//! ONNX file holds, and per-row explanations along the network's path.
//!
//! cerebrod trains with it (its `engine` adds the trainer, optimisers and
//! the CUDA backend) and scores with it; the extension links it to score a
//! row inside the backend that asks (`cerebro.predict`), without a round
//! trip to cerebrod. Nothing here starts a thread unless asked for more
//! than one, reads a file, or touches the network.

pub mod activation;
pub mod attribution;
pub mod features;
mod gemm;
pub mod loss;
pub mod native;
pub mod network;
pub mod path;
pub mod proto;
pub mod stack;

pub use activation::Activation;
pub use loss::{sigmoid, softmax_into, Head, Loss};
pub use network::{architecture, TargetScale};
pub use stack::{
    dropout_keeps, Arch, ArchError, Batch, Embedding, Mode, Op, Periodic, Predictor, Stack, StackCache, StackGradients,
    BATCH_NORM_MOMENTUM, NORM_EPS,
};
