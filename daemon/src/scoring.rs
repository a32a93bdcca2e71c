//! Scoring with ONNX Runtime, loaded at run time from a shared library.
//!
//! The daemon is the only process that loads ONNX Runtime, and this module
//! the only one that builds its sessions; backends send it batches. A
//! [`ScoringModel`] wraps one session and knows how to feed Cerebro's column
//! batches to it and how to read its head.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use cerebro_shared::batch::{ColumnData, ColumnRef};
use cerebro_shared::onnx_graph::{positive_column, ImportLayout};
use cerebro_shared::spec::{Feature, Task, TrainingPlan, NULL_CATEGORY};
use ort::environment::Environment;
use ort::session::Session;
use ort::value::{Tensor, TensorElementType, ValueType};

use crate::catalog::{Artifact, MemberRef, NativeParts};
use crate::native::{class_probabilities, disagreement, scores_and_labels, NativeModel, AGREEMENT};
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
    #[error("the engine failed while scoring: {0}")]
    Native(String),
    #[error("the model gives {width} values per row, not one probability for each of its {classes} classes")]
    ClassCount { width: usize, classes: usize },
    #[error("this model cannot be explained: {0}")]
    NotExplainable(&'static str),
    #[error("{given} columns asked to be explained; the model reads {expected}")]
    ExplainedCount { given: usize, expected: usize },
    #[error("the graph reads column \"{0}\", which the version's features do not have")]
    MissingInput(String),
    #[error(
        "the graph gave {values} value(s) for {rows} row(s); a {task} model gives {wanted} a row",
        task = .task.as_str()
    )]
    OutputShape { rows: usize, values: usize, task: Task, wanted: &'static str },
    #[error("the imported graph's runs took longer than cerebrod's scoring_deadline_ms ({} ms) together and were stopped", .0.as_millis())]
    Deadline(Duration),
}

/// How long all the runs of an imported graph that one request makes
/// (a measure, a distill) may take together: `limit` from `start`. Bound
/// per run, a request of a few dozen runs could hold a blocking thread for
/// as many times `scoring_deadline_ms`.
#[derive(Debug, Clone, Copy)]
pub struct RunDeadline {
    pub start: Instant,
    pub limit: Duration,
}

impl RunDeadline {
    pub fn from_now(limit: Duration) -> RunDeadline {
        RunDeadline { start: Instant::now(), limit }
    }

    /// What is left of it; zero once past.
    fn left(&self) -> Duration {
        self.limit.saturating_sub(self.start.elapsed())
    }
}

/// The process-wide ONNX Runtime environment.
#[derive(Clone)]
pub struct OnnxRuntime {
    env: &'static Environment,
    threads: usize,
    /// Sessions per model: batches of several connections, or the two
    /// regions of one scan, score at once up to this many.
    sessions: usize,
    /// Whether models Cerebro trained are scored by the engine (see
    /// [`crate::native`]) once they agree with ONNX Runtime.
    native: bool,
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
            Ok(env) => {
                let threads = threads.max(1);
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                Ok(OnnxRuntime { env, threads, sessions: (cores / threads).max(1), native: true })
            }
            Err(reason) => Err(ScoringError::Runtime { path: library.to_path_buf(), reason: reason.clone() }),
        }
    }

    /// The same runtime, scoring every model with ONNX Runtime when
    /// `native` is false (config `native_scoring`).
    pub fn with_native(mut self, native: bool) -> OnnxRuntime {
        self.native = native;
        self
    }
}

/// The width of a `task` model's output of `values` for `rows` rows: as
/// many values for every row, as many as the task reads (one probability or
/// two for a binary model, one value for a regression, a probability a
/// class for a multiclass model, whose count the caller checks). The shape
/// an imported graph declares is not enforced by ONNX Runtime, and may be
/// left unsaid.
fn output_width(task: Task, rows: usize, values: usize) -> Result<usize, ScoringError> {
    let width = if rows > 0 && values.is_multiple_of(rows) { values / rows } else { 0 };
    let (fits, wanted) = match task {
        Task::Binary => ((1..=2).contains(&width), "one or two values (its classes' probabilities)"),
        Task::Multiclass => (width >= 2, "a probability for each of its classes"),
        Task::Regression => (width == 1, "one value"),
    };
    if fits {
        Ok(width)
    } else {
        Err(ScoringError::OutputShape { rows, values, task, wanted })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    Float,
    Text,
}

pub struct ScoringModel {
    /// Identical sessions of the one graph: ONNX Runtime runs a session one
    /// call at a time, so concurrent batches each take a free one.
    sessions: Vec<Mutex<Session>>,
    next_session: AtomicUsize,
    /// Graph inputs in feed order, each taking the next `usize` columns.
    inputs: Vec<(String, InputKind, usize)>,
    /// What its output is: a positive class's probability, every class's, or a value.
    task: Task,
    output: String,
    /// An imported graph, whose work per row its author decides (it may
    /// loop); one Cerebro exported does a fixed, small amount.
    imported: bool,
    /// The engine's copy of the model, when it agrees with ONNX Runtime
    /// (see [`crate::native`]): what explains it, and scores it when
    /// `scores_natively`.
    native: Option<NativeModel>,
    scores_natively: bool,
    /// Threads an explanation runs on (`scoring_threads`).
    threads: usize,
    /// A selection's ensemble's members, heaviest first: what explains it.
    members: Vec<MemberRef>,
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

    fn sessions(rt: &OnnxRuntime, bytes: &[u8]) -> Result<Vec<Mutex<Session>>, ScoringError> {
        (0..rt.sessions).map(|_| ScoringModel::session(rt, bytes).map(Mutex::new)).collect()
    }

    /// A free session, else (all busy) the next in turn, waited for.
    fn free_session(&self) -> std::sync::MutexGuard<'_, Session> {
        let first = self.next_session.fetch_add(1, Ordering::Relaxed);
        let n = self.sessions.len();
        (0..n)
            .find_map(|i| self.sessions[(first + i) % n].try_lock().ok())
            .unwrap_or_else(|| self.sessions[first % n].lock().unwrap_or_else(|p| p.into_inner()))
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
            None => {
                let mut model = ScoringModel::load(rt, &artifact.bytes)?;
                model.members = artifact.members.clone();
                if let Some(parts) = artifact.native.as_ref() {
                    model.native = model.checked_native(&artifact.bytes, parts, artifact.task);
                    model.scores_natively = rt.native;
                }
                Ok(model)
            }
        }
    }

    /// The engine's copy of this model, if it rebuilds from `bytes` and
    /// scores the probe rows as ONNX Runtime does; else None, logged.
    fn checked_native(&self, bytes: &[u8], parts: &NativeParts, task: Task) -> Option<NativeModel> {
        let native = NativeModel::from_onnx(bytes, parts.pipeline.clone(), &parts.options, task, parts.classes)
            .map_err(|e| tracing::info!("scoring with ONNX Runtime: {e}"))
            .ok()?;
        let probe = native.probe();
        let columns: Vec<ColumnRef<'_>> = probe.iter().map(ColumnData::as_ref).collect();
        let (ort, width) = self.run_refs(&columns, None).map_err(|e| tracing::warn!("probe: {e}")).ok()?;
        let (own, own_width) = native.run(&columns).map_err(|e| tracing::warn!("probe: {e}")).ok()?;
        let apart = if width == own_width { disagreement(&ort, &own, task == Task::Regression) } else { f64::INFINITY };
        if apart > AGREEMENT {
            tracing::warn!(
                "scoring with ONNX Runtime: the engine's copy of the model differs from it by {apart:e} on the probe rows"
            );
            return None;
        }
        Some(native)
    }

    /// Whether the engine scores this model (else ONNX Runtime).
    pub fn native(&self) -> bool {
        self.native.is_some() && self.scores_natively
    }

    /// Each row's baseline score and each column's contribution to its
    /// score (see [`crate::attribution`]), row by row: `1 + explained`
    /// values per row.
    pub fn explain(&self, columns: &[ColumnRef<'_>], explained: usize) -> Result<Vec<f64>, ScoringError> {
        let native = self.native.as_ref().ok_or(ScoringError::NotExplainable(if self.imported {
            "it was imported, and explanations need a network Cerebro trained"
        } else {
            "the engine does not run its graph (its copy of the network disagreed with ONNX Runtime)"
        }))?;
        let expected = native.pipeline.features.len();
        if explained != expected {
            return Err(ScoringError::ExplainedCount { given: explained, expected });
        }
        let found = native.explain(columns, self.threads).map_err(|e| ScoringError::Native(e.to_string()))?;
        Ok(found.by_row())
    }

    /// The members of a selection's ensemble, heaviest first; empty for any
    /// other version.
    pub fn members(&self) -> &[MemberRef] {
        &self.members
    }

    /// A selection's ensemble's explanations, laid out as
    /// [`ScoringModel::explain`]'s: each member's (`members`, loaded, with
    /// their weights) from one baseline row and of the class the ensemble
    /// ranks first (`out`, its output for these rows), weighted as the graph
    /// weighs their outputs. Integrated gradients are linear in the
    /// function explained, so the weighted sum explains the weighted sum:
    /// the contributions add up to the ensemble's score less the baseline's.
    /// The baseline row takes each column's typical value from the heaviest
    /// member that reads it; a column a member does not read gets nothing
    /// from it.
    pub fn explain_ensemble(
        &self,
        members: &[(f64, &ScoringModel)],
        columns: &[ColumnRef<'_>],
        explained: usize,
        out: &[f32],
        width: usize,
    ) -> Result<Vec<f64>, ScoringError> {
        let names: Vec<&str> = self.inputs.iter().map(|(name, _, _)| name.as_str()).collect();
        if explained != names.len() || columns.len() != names.len() {
            return Err(ScoringError::ExplainedCount { given: explained, expected: names.len() });
        }
        let natives = members
            .iter()
            .map(|(weight, m)| {
                m.native.as_ref().map(|n| (*weight, n)).ok_or(ScoringError::NotExplainable(
                    "a member of the ensemble is scored by ONNX Runtime alone (its copy in the engine disagreed)",
                ))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Where each member's columns are among the ensemble's.
        let places = natives
            .iter()
            .map(|(_, n)| {
                n.pipeline
                    .features
                    .iter()
                    .map(|f| names.iter().position(|&c| c == f.name).ok_or(ScoringError::MissingInput(f.name.clone())))
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut baseline: Vec<Option<ColumnData>> = vec![None; names.len()];
        for ((_, native), place) in natives.iter().zip(&places) {
            for (value, &c) in native.pipeline.baseline().into_iter().zip(place) {
                baseline[c].get_or_insert(value);
            }
        }
        let classes: Option<Vec<usize>> = match self.task {
            Task::Multiclass => Some(self.head_of(out, width).1.into_iter().map(|c| c as usize).collect()),
            _ => None,
        };
        let rows = columns.first().map_or(0, ColumnRef::len);
        let mut values = vec![0.0f64; rows * (1 + explained)];
        for ((weight, native), place) in natives.iter().zip(&places) {
            let own: Vec<ColumnRef<'_>> = place.iter().map(|&c| columns[c].clone()).collect();
            let base: Vec<ColumnData> =
                place.iter().map(|&c| baseline[c].clone().expect("set by a member reading it")).collect();
            let found = native
                .explain_against(&own, &base, classes.as_deref(), self.threads)
                .map_err(|e| ScoringError::Native(e.to_string()))?;
            let per_row = found.contributions.chunks_exact(place.len().max(1));
            for ((row, base_score), contributions) in
                values.chunks_exact_mut(1 + explained).zip(&found.baselines).zip(per_row)
            {
                row[0] += weight * base_score;
                for (&c, contribution) in place.iter().zip(contributions) {
                    row[1 + c] += weight * contribution;
                }
            }
        }
        Ok(values)
    }

    /// A model Cerebro exported: one `[N, 1]` input per feature, an output
    /// named after its head.
    pub fn load(rt: &OnnxRuntime, bytes: &[u8]) -> Result<ScoringModel, ScoringError> {
        let sessions = ScoringModel::sessions(rt, bytes)?;
        let session = sessions[0].lock().unwrap_or_else(|p| p.into_inner());
        let inputs = ScoringModel::input_kinds(&session)?.into_iter().map(|(n, k)| (n, k, 1)).collect();
        let names: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        let (task, output) = if names.contains(&OUTPUT_PROBABILITY) {
            (Task::Binary, OUTPUT_PROBABILITY)
        } else if names.contains(&OUTPUT_PROBABILITIES) {
            (Task::Multiclass, OUTPUT_PROBABILITIES)
        } else if names.contains(&OUTPUT_VALUE) {
            (Task::Regression, OUTPUT_VALUE)
        } else {
            return Err(ScoringError::UnknownOutput);
        };
        let output = output.to_owned();
        drop(session);
        Ok(ScoringModel {
            sessions,
            next_session: AtomicUsize::new(0),
            inputs,
            task,
            output,
            imported: false,
            native: None,
            scores_natively: false,
            threads: rt.threads,
            members: Vec::new(),
        })
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
        let sessions = ScoringModel::sessions(rt, bytes)?;
        let session = sessions[0].lock().unwrap_or_else(|p| p.into_inner());
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
        drop(session);
        Ok(ScoringModel {
            sessions,
            next_session: AtomicUsize::new(0),
            inputs,
            task,
            output: layout.output.clone(),
            imported: true,
            native: None,
            scores_natively: false,
            threads: rt.threads,
            members: Vec::new(),
        })
    }

    /// Whether the graph was imported rather than exported by Cerebro.
    pub fn imported(&self) -> bool {
        self.imported
    }

    /// Each graph input's name and kind, in feed order.
    pub fn inputs(&self) -> Vec<(String, InputKind)> {
        self.inputs.iter().map(|(n, k, _)| (n.clone(), *k)).collect()
    }

    /// `columns`, one per feature of `features` in that order, in the order
    /// the graph takes its inputs.
    pub fn arrange(&self, features: &[Feature], columns: &[ColumnData]) -> Result<Vec<ColumnData>, ScoringError> {
        if self.imported {
            // An import lists its features in feed order, each input's
            // columns in a row (`request::import_features`); its inputs are
            // named by the graph, not by the columns.
            return Ok(columns.to_vec());
        }
        self.inputs
            .iter()
            .map(|(name, _, _)| match features.iter().position(|f| &f.name == name) {
                Some(i) => Ok(columns[i].clone()),
                None => Err(ScoringError::MissingInput(name.clone())),
            })
            .collect()
    }

    /// The graph's raw output for `columns` (given in input order), flattened
    /// row-major, and its width per row.
    pub fn run(&self, columns: &[ColumnData]) -> Result<(Vec<f32>, usize), ScoringError> {
        self.run_with(columns, None)
    }

    /// The graph's output for `columns` (one per feature of `plan`) as
    /// validation metrics read it: one positive-class probability a row for
    /// a binary model (an imported graph's scored column, when its output is
    /// wider), else the whole output, a probability for each of `plan`'s
    /// classes for a multiclass model. An imported graph's run is stopped
    /// once `deadline` has passed, when given (a request's runs together),
    /// as a scoring batch is: its author decides how long it runs.
    pub fn metric_outputs(
        &self,
        plan: &TrainingPlan,
        columns: &[ColumnData],
        deadline: Option<RunDeadline>,
    ) -> Result<Vec<f32>, ScoringError> {
        let columns = self.arrange(&plan.features, columns)?;
        if columns.first().is_none_or(|c| c.is_empty()) {
            return Ok(Vec::new());
        }
        let (out, width) = if let Some(deadline) = deadline.filter(|_| self.imported) {
            let left = deadline.left();
            if left.is_zero() {
                return Err(ScoringError::Deadline(deadline.limit));
            }
            let options = ort::session::RunOptions::new().map_err(|e| ScoringError::Artifact(e.to_string()))?;
            let (done, wait) = std::sync::mpsc::channel::<()>();
            std::thread::scope(|scope| {
                let options = &options;
                let stopper = scope.spawn(move || {
                    let late = matches!(wait.recv_timeout(left), Err(RecvTimeoutError::Timeout));
                    if late {
                        let _ = options.terminate();
                    }
                    late
                });
                let run = self.run_with(&columns, Some(options));
                drop(done);
                let late = stopper.join().unwrap_or(false);
                run.map_err(|e| if late { ScoringError::Deadline(deadline.limit) } else { e })
            })?
        } else {
            self.run(&columns)?
        };
        if self.task == Task::Binary && width > 1 {
            let positive = positive_column(width);
            return Ok(out.chunks_exact(width).map(|row| row[positive]).collect());
        }
        let classes = plan.class_labels.len();
        if self.task == Task::Multiclass && width != classes {
            return Err(ScoringError::ClassCount { width, classes });
        }
        Ok(out)
    }

    /// [`ScoringModel::run`] under `options`, through which another thread
    /// may stop the run (`RunOptions::terminate`): an imported graph can
    /// loop or grow for as long as its author likes.
    pub fn run_with(
        &self,
        columns: &[ColumnData],
        options: Option<&ort::session::RunOptions>,
    ) -> Result<(Vec<f32>, usize), ScoringError> {
        self.run_refs(&columns.iter().map(ColumnData::as_ref).collect::<Vec<_>>(), options)
    }

    /// [`ScoringModel::run_with`] for columns borrowed from a batch's region.
    pub fn run_refs(
        &self,
        columns: &[ColumnRef<'_>],
        options: Option<&ort::session::RunOptions>,
    ) -> Result<(Vec<f32>, usize), ScoringError> {
        let expected: usize = self.inputs.iter().map(|(_, _, k)| k).sum();
        if columns.len() != expected {
            return Err(ScoringError::ColumnCount { given: columns.len(), expected });
        }
        if let Some(native) = self.native.as_ref().filter(|_| self.scores_natively) {
            return native.run(columns).map_err(|e| ScoringError::Native(e.to_string()));
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
            let wrong = |index: usize, found: &ColumnRef<'_>| ScoringError::ColumnKind {
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
                        let ColumnRef::Float64(values) = column else { return Err(wrong(next + c, column)) };
                        for (r, v) in values.iter().enumerate() {
                            data[r * width + c] = v.map_or(f32::NAN, |x| x as f32);
                        }
                    }
                    Tensor::from_array(([n, *width], data)).map_err(run_err)?.into()
                }
                InputKind::Text => {
                    let ColumnRef::Text(values) = &group[0] else { return Err(wrong(next, &group[0])) };
                    // ort wants owned ('static) strings; it copies them again
                    // for ONNX Runtime. Bytes that are not UTF-8 become a
                    // string no label encoder knows, as in the engine.
                    let data: Vec<String> = values
                        .iter()
                        .map(|v| v.map_or(NULL_CATEGORY.into(), |b| String::from_utf8_lossy(b).into_owned()))
                        .collect();
                    Tensor::from_string_array(([n, 1], &data[..])).map_err(run_err)?.into()
                }
            };
            feed.push((name.clone(), value));
            next += width;
        }
        let mut session = self.free_session();
        let outputs = match options {
            Some(options) => session.run_with_options(feed, options),
            None => session.run(feed),
        }
        .map_err(run_err)?;
        let (_, data) = outputs[self.output.as_str()].try_extract_tensor::<f32>().map_err(run_err)?;
        let width = output_width(self.task, n, data.len())?;
        Ok((data.to_vec(), width))
    }

    /// One score and one label index per row: the positive-class probability
    /// (binary), the top class's probability (multiclass), or the value
    /// (regression, label [`NO_LABEL`]).
    pub fn score(&self, columns: &[ColumnData]) -> Result<(Vec<f64>, Vec<u32>), ScoringError> {
        self.score_with(&columns.iter().map(ColumnData::as_ref).collect::<Vec<_>>(), None)
    }

    /// [`ScoringModel::score`] under `options` (see [`ScoringModel::run_with`]).
    pub fn score_with(
        &self,
        columns: &[ColumnRef<'_>],
        options: Option<&ort::session::RunOptions>,
    ) -> Result<(Vec<f64>, Vec<u32>), ScoringError> {
        let (out, width) = self.run_refs(columns, options)?;
        Ok(self.head_of(&out, width))
    }

    /// Every class's probability for each row, `classes` per row in the
    /// order of the model's class labels: a multiclass model's whole output.
    pub fn probabilities(out: &[f32], width: usize, classes: usize) -> Result<Vec<f64>, ScoringError> {
        class_probabilities(out, width, classes).ok_or(ScoringError::ClassCount { width, classes })
    }

    /// One score and one label index per row of a raw output `width` wide
    /// (see [`ScoringModel::score`]).
    pub fn head_of(&self, out: &[f32], width: usize) -> (Vec<f64>, Vec<u32>) {
        scores_and_labels(self.task, positive_column(width), out, width)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_output_is_read_by_the_values_each_row_has() {
        assert_eq!(output_width(Task::Binary, 3, 3).unwrap(), 1);
        assert_eq!(output_width(Task::Binary, 3, 6).unwrap(), 2);
        assert_eq!(output_width(Task::Multiclass, 3, 12).unwrap(), 4);
        assert_eq!(output_width(Task::Regression, 1, 1).unwrap(), 1);
        for (task, rows, values) in [
            (Task::Regression, 3, 4),
            (Task::Regression, 3, 6),
            (Task::Regression, 3, 0),
            (Task::Binary, 3, 7),
            (Task::Binary, 3, 9),
            (Task::Binary, 3, 2),
            (Task::Multiclass, 3, 3),
        ] {
            let e = output_width(task, rows, values).unwrap_err();
            assert!(matches!(e, ScoringError::OutputShape { .. }), "{task:?} {rows} {values}: {e}");
        }
        let e = output_width(Task::Regression, 7043, 7044).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the graph gave 7044 value(s) for 7043 row(s); a regression model gives one value a row"
        );
    }

    #[test]
    fn a_deadline_is_shared_by_the_runs_of_a_request() {
        let spent = RunDeadline { start: Instant::now() - Duration::from_secs(2), limit: Duration::from_secs(1) };
        assert!(spent.left().is_zero());
        let fresh = RunDeadline::from_now(Duration::from_secs(60));
        assert!(fresh.left() > Duration::from_secs(59));
    }
}
