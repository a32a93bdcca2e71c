//! Scoring with ONNX Runtime, loaded at run time from a shared library.
//!
//! The daemon is the only process that loads ONNX Runtime; backends send it
//! batches. A [`ScoringModel`] wraps one session and knows how to feed
//! Cerebro's column batches to it and how to read its head.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use cerebro_shared::batch::{ColumnData, NO_LABEL};
use cerebro_shared::spec::NULL_CATEGORY;
use ort::environment::Environment;
use ort::session::Session;
use ort::value::{Tensor, TensorElementType, ValueType};

use crate::onnx::{OUTPUT_PROBABILITIES, OUTPUT_PROBABILITY, OUTPUT_VALUE};

#[derive(Debug, thiserror::Error)]
pub enum ScoringError {
    #[error("cannot load ONNX Runtime from {path}: {reason}")]
    Runtime { path: PathBuf, reason: String },
    #[error("ONNX Runtime was already loaded from {loaded}, not {requested}")]
    RuntimeMismatch { loaded: PathBuf, requested: PathBuf },
    #[error("ONNX Runtime cannot load the artifact: {0}")]
    Artifact(String),
    #[error("the artifact's input \"{0}\" is neither a float nor a string tensor")]
    UnsupportedInput(String),
    #[error("the artifact has none of the outputs probability, probabilities or value")]
    UnknownOutput,
    #[error("{given} columns given; the model takes {expected}")]
    ColumnCount { given: usize, expected: usize },
    #[error("column {index} (input \"{name}\") holds {found}; the model wants {expected}")]
    ColumnKind { index: usize, name: String, found: &'static str, expected: &'static str },
    #[error("ONNX Runtime failed while scoring: {0}")]
    Run(String),
}

/// The process-wide ONNX Runtime environment.
#[derive(Clone)]
pub struct OnnxRuntime {
    env: &'static Environment,
    threads: usize,
}

static ENVIRONMENT: OnceLock<(PathBuf, Result<Environment, String>)> = OnceLock::new();

impl OnnxRuntime {
    /// Loads the ONNX Runtime library at `library` (once per process) and
    /// runs each session on up to `threads` threads.
    pub fn load(library: &Path, threads: usize) -> Result<OnnxRuntime, ScoringError> {
        let (loaded, env) = ENVIRONMENT.get_or_init(|| {
            // ort panics on some bad paths rather than failing: check first.
            let env = if !library.is_file() {
                Err("no such file".to_string())
            } else {
                ort::init_from(library)
                    .map_err(|e| e.to_string())
                    .and_then(|b| b.with_name("cerebrod").build().map_err(|e| e.to_string()))
            };
            (library.to_path_buf(), env)
        });
        if loaded != library {
            return Err(ScoringError::RuntimeMismatch { loaded: loaded.clone(), requested: library.to_path_buf() });
        }
        match env {
            Ok(env) => Ok(OnnxRuntime { env, threads: threads.max(1) }),
            Err(reason) => Err(ScoringError::Runtime { path: library.to_path_buf(), reason: reason.clone() }),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    Float,
    Text,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutputHead {
    Binary,
    Multiclass,
    Regression,
}

pub struct ScoringModel {
    session: Mutex<Session>,
    inputs: Vec<(String, InputKind)>,
    head: OutputHead,
    output: &'static str,
}

impl ScoringModel {
    pub fn load(rt: &OnnxRuntime, bytes: &[u8]) -> Result<ScoringModel, ScoringError> {
        let art = |e: ort::Error| ScoringError::Artifact(e.to_string());
        let session = Session::builder(rt.env)
            .map_err(art)?
            .with_intra_threads(rt.threads)
            .map_err(|e| ScoringError::Artifact(e.to_string()))?
            .commit_from_memory(bytes)
            .map_err(art)?;
        let inputs = session
            .inputs()
            .iter()
            .map(|o| match o.dtype() {
                ValueType::Tensor { ty: TensorElementType::Float32, .. } => {
                    Ok((o.name().to_string(), InputKind::Float))
                }
                ValueType::Tensor { ty: TensorElementType::String, .. } => Ok((o.name().to_string(), InputKind::Text)),
                _ => Err(ScoringError::UnsupportedInput(o.name().to_string())),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let names: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        let (head, output) = if names.contains(&OUTPUT_PROBABILITY) {
            (OutputHead::Binary, OUTPUT_PROBABILITY)
        } else if names.contains(&OUTPUT_PROBABILITIES) {
            (OutputHead::Multiclass, OUTPUT_PROBABILITIES)
        } else if names.contains(&OUTPUT_VALUE) {
            (OutputHead::Regression, OUTPUT_VALUE)
        } else {
            return Err(ScoringError::UnknownOutput);
        };
        Ok(ScoringModel { session: Mutex::new(session), inputs, head, output })
    }

    pub fn inputs(&self) -> &[(String, InputKind)] {
        &self.inputs
    }

    /// The graph's raw output for `columns` (given in input order), flattened
    /// row-major, and its width per row.
    pub fn run(&self, columns: &[ColumnData]) -> Result<(Vec<f32>, usize), ScoringError> {
        if columns.len() != self.inputs.len() {
            return Err(ScoringError::ColumnCount { given: columns.len(), expected: self.inputs.len() });
        }
        let n = columns.first().map_or(0, |c| c.len());
        if n == 0 {
            return Ok((Vec::new(), 1));
        }
        let run_err = |e: ort::Error| ScoringError::Run(e.to_string());
        let mut feed: Vec<(String, ort::session::SessionInputValue<'_>)> = Vec::with_capacity(columns.len());
        for (index, (column, (name, kind))) in columns.iter().zip(&self.inputs).enumerate() {
            let value: ort::session::SessionInputValue<'_> = match (column, kind) {
                (ColumnData::Float64(values), InputKind::Float) => {
                    let data: Vec<f32> = values.iter().map(|v| v.map_or(f32::NAN, |x| x as f32)).collect();
                    Tensor::from_array(([n, 1], data)).map_err(run_err)?.into()
                }
                (ColumnData::Text(values), InputKind::Text) => {
                    let data: Vec<String> =
                        values.iter().map(|v| v.clone().unwrap_or_else(|| NULL_CATEGORY.to_owned())).collect();
                    Tensor::from_string_array(([n, 1], &data[..])).map_err(run_err)?.into()
                }
                (found, _) => {
                    return Err(ScoringError::ColumnKind {
                        index,
                        name: name.clone(),
                        found: found.kind_name(),
                        expected: match kind {
                            InputKind::Float => "numbers",
                            InputKind::Text => "text",
                        },
                    });
                }
            };
            feed.push((name.clone(), value));
        }
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let outputs = session.run(feed).map_err(run_err)?;
        let (_, data) = outputs[self.output].try_extract_tensor::<f32>().map_err(run_err)?;
        let width = data.len() / n;
        Ok((data.to_vec(), width))
    }

    /// One score and one label index per row: the positive-class probability
    /// (binary), the top class's probability (multiclass), or the value
    /// (regression, label [`NO_LABEL`]).
    pub fn score(&self, columns: &[ColumnData]) -> Result<(Vec<f64>, Vec<u32>), ScoringError> {
        let (out, width) = self.run(columns)?;
        Ok(match self.head {
            OutputHead::Binary => out.iter().map(|&p| (p as f64, (p >= 0.5) as u32)).unzip(),
            OutputHead::Multiclass => out
                .chunks_exact(width.max(1))
                .map(|row| {
                    let (i, p) = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).expect("non-empty row");
                    (*p as f64, i as u32)
                })
                .unzip(),
            OutputHead::Regression => out.iter().map(|&v| (v as f64, NO_LABEL)).unzip(),
        })
    }
}
