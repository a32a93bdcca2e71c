//! From an INSERT into `cerebro.models` to queued jobs, in one direction:
//!
//! ```text
//! models.rs      the row as written (TrainRequest)
//!   → a builder  what versions it asks for (a Batch); reads, never writes:
//!                plain (here), selection.rs (a spec, on a parent's snapshot or
//!                not), derived.rs (a parent and a change); warm.rs finds the
//!                archived version a `warm_start` continues from
//!   → queue.rs   per version: resolve its source, freeze the snapshot, read the
//!                labels, check, write the catalog rows, enqueue
//! ```
//!
//! All of it runs in the INSERT's transaction: a rolled-back INSERT leaves
//! nothing behind and cerebrod, told by NOTIFY (delivered at commit), never
//! sees it. The rules that need no database (which columns are features,
//! how a candidate's or a change's settings rewrite options) are
//! `cerebro_shared::request`'s.

mod derived;
pub(crate) mod ensemble;
mod queue;
pub(crate) use queue::freeze_for_import;
pub(crate) mod rounds;
mod selection;
mod warm;

use cerebro_shared::mst::SelectionPlan;
use cerebro_shared::spec::{TaskChoice, TrainOptions};

use pgrx::prelude::*;

use crate::error::Result;
use crate::models::{Lineage, TrainRequest};

/// One version to queue, its options validated; its source is resolved
/// when it is queued.
#[derive(Debug)]
pub(crate) struct VersionRequest {
    pub(crate) name: String,
    pub(crate) source: String,
    pub(crate) target: String,
    pub(crate) key: Option<String>,
    /// None: every usable column but the target and key.
    pub(crate) features: Option<Vec<String>>,
    pub(crate) task: TaskChoice,
    pub(crate) options: TrainOptions,
    /// The request as written, for provenance.
    pub(crate) written: serde_json::Value,
    pub(crate) lineage: Option<Lineage>,
    /// Who wrote `source` when it is not the inserting role: a derived
    /// version reading its parent's source keeps the parent's author.
    pub(crate) source_author: Option<String>,
    /// Its place (from 1) among its selection's candidates.
    pub(crate) candidate: Option<usize>,
}

/// A selection to record with its candidates.
#[derive(Debug)]
pub(crate) struct NewSelection {
    /// The spec as written.
    pub(crate) spec: String,
    pub(crate) plan: SelectionPlan,
}

/// What one INSERT asks for.
#[derive(Debug)]
pub(crate) struct Batch {
    pub(crate) selection: Option<NewSelection>,
    pub(crate) versions: Vec<VersionRequest>,
    /// A selection on a version's frozen snapshot: the snapshot, and that
    /// version. Its candidates read it rather than freezing their own.
    pub(crate) on_snapshot: Option<(i64, i32)>,
}

/// Queues what `req` asks for: one version, a selection's candidates, or a
/// version derived from a parent. Returns the first version it queued (a
/// selection's first candidate), which `RETURNING` reads.
pub fn queue_training(req: TrainRequest) -> Result<Option<i32>> {
    let batch = match (&req.spec, &req.lineage) {
        (Some(spec), Some(lineage)) => {
            let parent = derived::parent_of(&req.name, lineage.parent_version)?;
            selection::build(&req, spec, Some(&parent))?
        }
        (Some(spec), None) => selection::build(&req, spec, None)?,
        (None, Some(lineage)) => derived::build(&req, lineage)?,
        (None, None) => plain(req)?,
    };
    queue::queue(batch)
}

/// A plain INSERT: one version, as written; with `warm_start`, continuing
/// from an archived version that differs only in parameter tuning.
fn plain(req: TrainRequest) -> Result<Batch> {
    let parent = if req.options.warm_start {
        let mut warm = warm::WarmStarts::default();
        let parent = warm.parent(&req, &req.source, req.features.as_deref(), &req.options)?;
        if parent.is_none() {
            notice!(
                "cerebro: warm_start: no ready version of \"{}\" differs from this one only in parameter tuning; it \
                 starts afresh",
                req.name
            );
        }
        parent
    } else {
        None
    };
    let version = VersionRequest {
        name: req.name,
        source: req.source,
        target: req.target,
        key: req.key,
        features: req.features,
        task: req.task,
        options: req.options,
        written: req.written,
        lineage: parent.map(|v| Lineage { parent_version: Some(v), change: None }),
        source_author: None,
        candidate: None,
    };
    Ok(Batch { selection: None, versions: vec![version], on_snapshot: None })
}
