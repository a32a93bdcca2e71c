//! ONNX export: a trained model, feature pipeline included, as one ONNX graph;
//! an ensemble, as one graph that averages its members' graphs.

mod ensemble;
mod export;

pub use cerebro_model::proto;
pub use ensemble::{ensemble, EnsembleError};
pub use export::{export, ExportError, OUTPUT_PROBABILITIES, OUTPUT_PROBABILITY, OUTPUT_VALUE};
