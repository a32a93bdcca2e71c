//! A model Cerebro trained, scored inside the backend that asks for one
//! row (`cerebro.predict`, `predict_label`, `predict_proba`) or a few by
//! key (`cerebro.predictions ... WHERE key = ...`, explained too).
//!
//! Scoring one row through cerebrod costs a round trip (a request, a
//! wake-up of the daemon, an answer, a wake-up of the backend), which is
//! most of a call's time and, with many clients on few cores, most of its
//! CPU; the network itself is a few microseconds of arithmetic. So a
//! backend rebuilds the engine's copy of a version the first time it
//! scores it, as cerebrod's own native scorer does (crate `cerebro-model`:
//! the fitted pipeline from the catalog, the network from the weights its
//! ONNX file holds), and keeps it while the version stays the one resolved.
//!
//! The copy scores nothing until it has answered the version's probe rows
//! (`NativeModel::probe`: NULLs, NaN, unseen categories, every bin edge)
//! as cerebrod answers them, to `cerebro_model::native::AGREEMENT`, the
//! same bar cerebrod sets its own copy against ONNX Runtime. A version
//! that cannot be rebuilt (imported, a selection's ensemble, a catalog the
//! engine cannot read) or whose copy disagrees is scored by cerebrod, as
//! before; `cerebro.score_in_backend = off` sends every row there. A scan
//! of a whole source is always cerebrod's: there the backend reads the
//! next batch while cerebrod scores this one.

use cerebro_model::features::FeaturePipeline;
use cerebro_model::native::{answers_agree, class_probabilities, scores_and_labels, Answer, NativeModel};
use cerebro_shared::batch::ColumnRef;
use cerebro_shared::spec::{Task, TrainOptions};
use pgrx::prelude::*;

use crate::error::{CerebroError, Result};
use crate::predict::Scored;
use crate::predictions::ModelVersion;

/// How a backend scores a version it resolved.
pub(crate) enum Scorer {
    /// The engine's copy, checked against cerebrod.
    Backend(Box<NativeModel>),
    /// cerebrod, and why not the backend (for the log).
    Daemon(String),
}

/// The engine's copy of `model` and the size of its ONNX file, read from
/// the catalog as the extension's owner (the caller may use the version:
/// it resolved), or why there is none: the file is read only for a version
/// Cerebro trained alone, of at most `max_bytes`. Not yet checked: see
/// [`agrees`].
pub(crate) fn rebuild(
    model: &ModelVersion,
    max_bytes: usize,
) -> Result<std::result::Result<(NativeModel, usize), String>> {
    let stored = crate::access::as_user_of(&model.name, || {
        Spi::connect(|client| {
            // The pipeline's vocabularies are the source's text: read as
            // UTF-8 whatever the database's encoding, as cerebrod reads them.
            let rows = client.select(
                "SELECT m.import_layout IS NOT NULL, a.size_bytes,
                        CASE WHEN m.import_layout IS NULL AND m.pipeline IS NOT NULL AND a.size_bytes <= $3
                             THEN a.bytes END,
                        pg_catalog.convert_to(m.pipeline::text, 'UTF8'),
                        pg_catalog.convert_to(m.options::text, 'UTF8')
                 FROM cerebro.artifacts a JOIN cerebro.model_versions m ON m.id = a.model_version_id
                 WHERE m.id = $1 AND a.sha256 = $2",
                Some(1),
                &[model.id.into(), model.artifact_sha256.as_str().into(), (max_bytes as i64).into()],
            )?;
            let Some(row) = rows.into_iter().next() else { return Ok(None) };
            Ok(Some((
                row.get::<bool>(1)?.unwrap_or(false),
                row.get::<i64>(2)?.unwrap_or(0).max(0) as usize,
                row.get::<Vec<u8>>(3)?,
                row.get::<Vec<u8>>(4)?,
                row.get::<Vec<u8>>(5)?,
            )))
        })
    })?;
    let Some((imported, size, bytes, pipeline, options)) = stored else {
        return Ok(Err("its artifact is not in the catalog".into()));
    };
    if imported {
        return Ok(Err("it was imported".into()));
    }
    // A selection's ensemble keeps no pipeline: its members keep theirs.
    let (Some(pipeline), Some(options)) = (pipeline, options) else {
        return Ok(Err("it has no fitted pipeline of its own (a selection's ensemble)".into()));
    };
    let Some(bytes) = bytes else {
        return Ok(Err(format!("its ONNX file ({size} bytes) is larger than a backend keeps ({max_bytes})")));
    };
    let pipeline: FeaturePipeline = match serde_json::from_slice(&pipeline) {
        Ok(p) => p,
        Err(e) => return Ok(Err(format!("its pipeline cannot be read: {e}"))),
    };
    let options: TrainOptions = match serde_json::from_slice(&options) {
        Ok(o) => o,
        Err(e) => return Ok(Err(format!("its options cannot be read: {e}"))),
    };
    Ok(NativeModel::from_onnx(&bytes, pipeline, &options, model.task, model.class_labels.len())
        .map(|native| (native, size))
        .map_err(|e| e.to_string()))
}

/// `columns` scored by the engine's copy, as cerebrod answers: a score and
/// a label index per row, and `classes` probabilities per row (0: none).
pub(crate) fn score(native: &NativeModel, task: Task, columns: &[ColumnRef<'_>], classes: u32) -> Result<Scored> {
    let (out, width) = native.run(columns).map_err(|e| CerebroError::InBackend(e.to_string()))?;
    let (scores, labels) = scores_and_labels(task, 0, &out, width);
    let probabilities = match classes {
        0 => Vec::new(),
        c => class_probabilities(&out, width, c as usize)
            .ok_or_else(|| CerebroError::InBackend(format!("the network has {width} outputs for {c} classes")))?,
    };
    Ok(Scored { scores, labels, probabilities })
}

/// Each row's baseline score and its columns' contributions (`1 +
/// features` values a row), as cerebrod explains them: on the calling
/// thread, a few rows at a time.
pub(crate) fn explain(native: &NativeModel, columns: &[ColumnRef<'_>]) -> Result<Vec<f64>> {
    Ok(native.explain(columns, 1).map_err(|e| CerebroError::InBackend(e.to_string()))?.by_row())
}

/// Whether the engine's copy answered the probe rows as cerebrod did
/// (`cerebro_model::native::answers_agree`).
pub(crate) fn agrees(own: &Scored, daemon: &Scored, task: Task) -> bool {
    fn answer(s: &Scored) -> Answer<'_> {
        Answer { scores: &s.scores, labels: &s.labels, probabilities: &s.probabilities }
    }
    answers_agree(task, answer(own), answer(daemon))
}
