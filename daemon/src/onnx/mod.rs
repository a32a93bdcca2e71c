//! ONNX export: a trained model, feature pipeline included, as one ONNX graph.

mod export;
pub mod proto;

pub use export::{export, ExportError, OUTPUT_PROBABILITIES, OUTPUT_PROBABILITY, OUTPUT_VALUE};
