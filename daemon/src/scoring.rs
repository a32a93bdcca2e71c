//! Scoring with ONNX Runtime, loaded at run time from a shared library.
//!
//! The daemon is the only process that loads ONNX Runtime, and this module
//! the only one that builds its sessions; backends send it batches. A
//! [`ScoringModel`] wraps one session and knows how to feed Cerebro's column
//! batches to it and how to read its head.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use cerebro_shared::batch::{ColumnData, NO_LABEL};
use cerebro_shared::onnx_graph::ImportLayout;
use cerebro_shared::spec::{Task, NULL_CATEGORY};
use ort::environment::Environment;
use ort::session::Session;
use ort::value::{Tensor, TensorElementType, ValueType};

use crate::catalog::Artifact;
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
    /// Graph inputs in feed order, each taking the next `usize` columns.
    inputs: Vec<(String, InputKind, usize)>,
    head: OutputHead,
    output: String,
    /// Binary: the output column with the positive class's probability.
    positive_column: usize,
}

impl ScoringModel {
    fn session(rt: &OnnxRuntime, bytes: &[u8]) -> Result<Session, ScoringError> {
        let art = |e: ort::Error| ScoringError::Artifact(e.to_string());
        Session::builder(rt.env)
            .map_err(art)?
            .with_intra_threads(rt.threads)
            .map_err(|e| ScoringError::Artifact(e.to_string()))?
            .commit_from_memory(bytes)
            .map_err(art)
    }

    fn input_kinds(session: &Session) -> Result<Vec<(String, InputKind)>, ScoringError> {
        session
            .inputs()
            .iter()
            .map(|o| match o.dtype() {
                ValueType::Tensor { ty: TensorElementType::Float32, .. } => {
                    Ok((o.name().to_string(), InputKind::Float))
                }
                ValueType::Tensor { ty: TensorElementType::String, .. } => Ok((o.name().to_string(), InputKind::Text)),
                _ => Err(ScoringError::UnsupportedInput(o.name().to_string())),
            })
            .collect()
    }

    /// A scoring session for a version's stored artifact: an imported model
    /// as its layout says, else one Cerebro exported.
    pub fn from_artifact(rt: &OnnxRuntime, artifact: &Artifact) -> Result<ScoringModel, ScoringError> {
        match &artifact.import_layout {
            Some(layout) => ScoringModel::load_imported(rt, &artifact.bytes, layout, artifact.task),
            None => ScoringModel::load(rt, &artifact.bytes),
        }
    }

    /// A model Cerebro exported: one `[N, 1]` input per feature, an output
    /// named after its head.
    pub fn load(rt: &OnnxRuntime, bytes: &[u8]) -> Result<ScoringModel, ScoringError> {
        let session = ScoringModel::session(rt, bytes)?;
        let inputs = ScoringModel::input_kinds(&session)?.into_iter().map(|(n, k)| (n, k, 1)).collect();
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
        Ok(ScoringModel { session: Mutex::new(session), inputs, head, output: output.into(), positive_column: 0 })
    }

    /// An imported model, fed and read as `layout` says, for `task`.
    pub fn load_imported(
        rt: &OnnxRuntime,
        bytes: &[u8],
        layout: &ImportLayout,
        task: Task,
    ) -> Result<ScoringModel, ScoringError> {
        // Checked at import too; a catalog restored from elsewhere is not.
        cerebro_shared::onnx_graph::check_self_contained(bytes).map_err(|e| ScoringError::Artifact(e.to_string()))?;
        let session = ScoringModel::session(rt, bytes)?;
        let kinds = ScoringModel::input_kinds(&session)?;
        let inputs = layout
            .inputs
            .iter()
            .map(|i| match kinds.iter().find(|(n, _)| *n == i.name) {
                Some((_, kind)) => Ok((i.name.clone(), *kind, i.columns)),
                None => Err(ScoringError::Artifact(format!("the graph has no input \"{}\"", i.name))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !session.outputs().iter().any(|o| o.name() == layout.output) {
            return Err(ScoringError::Artifact(format!("the graph has no output \"{}\"", layout.output)));
        }
        let head = match task {
            Task::Binary => OutputHead::Binary,
            Task::Multiclass => OutputHead::Multiclass,
            Task::Regression => OutputHead::Regression,
        };
        Ok(ScoringModel {
            session: Mutex::new(session),
            inputs,
            head,
            output: layout.output.clone(),
            positive_column: layout.positive_column,
        })
    }

    /// Each graph input's name and kind, in feed order.
    pub fn inputs(&self) -> Vec<(String, InputKind)> {
        self.inputs.iter().map(|(n, k, _)| (n.clone(), *k)).collect()
    }

    /// The graph's raw output for `columns` (given in input order), flattened
    /// row-major, and its width per row.
    pub fn run(&self, columns: &[ColumnData]) -> Result<(Vec<f32>, usize), ScoringError> {
        self.run_with(columns, None)
    }

    /// [`ScoringModel::run`] under `options`, through which another thread
    /// may stop the run (`RunOptions::terminate`): an imported graph can
    /// loop or grow for as long as its author likes.
    pub fn run_with(
        &self,
        columns: &[ColumnData],
        options: Option<&ort::session::RunOptions>,
    ) -> Result<(Vec<f32>, usize), ScoringError> {
        let expected: usize = self.inputs.iter().map(|(_, _, k)| k).sum();
        if columns.len() != expected {
            return Err(ScoringError::ColumnCount { given: columns.len(), expected });
        }
        let n = columns.first().map_or(0, |c| c.len());
        if n == 0 {
            return Ok((Vec::new(), 1));
        }
        let run_err = |e: ort::Error| ScoringError::Run(e.to_string());
        let mut feed: Vec<(String, ort::session::SessionInputValue<'_>)> = Vec::with_capacity(self.inputs.len());
        let mut next = 0;
        for (name, kind, width) in &self.inputs {
            let group = &columns[next..next + width];
            let wrong = |index: usize, found: &ColumnData| ScoringError::ColumnKind {
                index,
                name: name.clone(),
                found: found.kind_name(),
                expected: match kind {
                    InputKind::Float => "numbers",
                    InputKind::Text => "text",
                },
            };
            let value: ort::session::SessionInputValue<'_> = match kind {
                InputKind::Float => {
                    // Row-major [n, width]: row r holds the group's values of row r.
                    let mut data = vec![0.0f32; n * width];
                    for (c, column) in group.iter().enumerate() {
                        let ColumnData::Float64(values) = column else { return Err(wrong(next + c, column)) };
                        for (r, v) in values.iter().enumerate() {
                            data[r * width + c] = v.map_or(f32::NAN, |x| x as f32);
                        }
                    }
                    Tensor::from_array(([n, *width], data)).map_err(run_err)?.into()
                }
                InputKind::Text => {
                    let ColumnData::Text(values) = &group[0] else { return Err(wrong(next, &group[0])) };
                    let data: Vec<String> =
                        values.iter().map(|v| v.clone().unwrap_or_else(|| NULL_CATEGORY.to_owned())).collect();
                    Tensor::from_string_array(([n, 1], &data[..])).map_err(run_err)?.into()
                }
            };
            feed.push((name.clone(), value));
            next += width;
        }
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let outputs = match options {
            Some(options) => session.run_with_options(feed, options),
            None => session.run(feed),
        }
        .map_err(run_err)?;
        let (_, data) = outputs[self.output.as_str()].try_extract_tensor::<f32>().map_err(run_err)?;
        let width = data.len() / n;
        Ok((data.to_vec(), width))
    }

    /// One score and one label index per row: the positive-class probability
    /// (binary), the top class's probability (multiclass), or the value
    /// (regression, label [`NO_LABEL`]).
    pub fn score(&self, columns: &[ColumnData]) -> Result<(Vec<f64>, Vec<u32>), ScoringError> {
        self.score_with(columns, None)
    }

    /// [`ScoringModel::score`] under `options` (see [`ScoringModel::run_with`]).
    pub fn score_with(
        &self,
        columns: &[ColumnData],
        options: Option<&ort::session::RunOptions>,
    ) -> Result<(Vec<f64>, Vec<u32>), ScoringError> {
        let (out, width) = self.run_with(columns, options)?;
        Ok(match self.head {
            OutputHead::Binary => out
                .chunks_exact(width.max(1))
                .map(|row| {
                    let p = row[self.positive_column.min(row.len() - 1)];
                    (p as f64, (p >= 0.5) as u32)
                })
                .unzip(),
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
