//! cerebrod: trains, exports and scores Cerebro models.

pub mod engine;
pub mod features;
pub mod metrics;
pub mod train;
pub mod onnx;
pub mod scoring;
