//! `cerebro.import_onnx`: registers an ONNX model trained elsewhere, so that
//! `cerebro.predictions` scores with it like with any version.
//!
//! The graph is checked against the declared columns before anything is
//! stored (`cerebro_shared::request`'s import rules): every graph input is
//! mapped to columns of the source of the right kind and number, the scored
//! output is a float tensor of the width the task needs. The model is read
//! straight from its bytes (`cerebro_shared::onnx_graph`), since the backend
//! never loads ONNX Runtime.
//!
//! With a `target`, the mapped columns and the target are frozen in a
//! snapshot, as training freezes its rows, so that cerebrod can measure the
//! graph's importance and metrics there and fit its rule surrogate once the
//! import commits (woken by its NOTIFY); `cerebro.measure_importance` and
//! `cerebro.distill` do so again on request.

use cerebro_shared::onnx_graph::{read_signature, ImportLayout};
use cerebro_shared::request::{self, RequestError};
use cerebro_shared::spec::{validate_model_name, Feature, Task, TaskChoice};
use cerebro_shared::sql::quote_ident;
use pgrx::prelude::*;
use pgrx::JsonB;

use crate::catalog::{audit, current_user, next_version, wake_daemon, Audit};
use crate::error::{raise, CerebroError, Result};
use crate::identity;
use crate::sources::{resolve_source, Source};
use crate::training::freeze_for_import;

/// What `cerebro.import_onnx` was given.
pub struct ImportRequest<'a> {
    pub name: &'a str,
    pub onnx: &'a [u8],
    pub source: &'a str,
    pub inputs: &'a serde_json::Value,
    pub task: &'a str,
    pub labels: Vec<String>,
    pub output: Option<&'a str>,
    pub key: Option<&'a str>,
    pub target: Option<&'a str>,
}

/// The frozen rows of an import with a target: the snapshot's id.
fn freeze_rows(
    client: &mut pgrx::spi::SpiClient<'_>,
    req: &ImportRequest<'_>,
    source: &Source,
    features: &[Feature],
    task: Task,
    target: &str,
    user: &str,
) -> Result<i64> {
    request::import_target(&source.shape(), features, target, task)?;
    let mut columns: Vec<&str> = features.iter().map(|f| f.name.as_str()).collect();
    columns.push(target);
    if let Some(key) = req.key.filter(|k| !columns.contains(k)) {
        columns.push(key);
    }
    let (id, data, stored) = freeze_for_import(client, source, &columns, user)?;
    let _owner = identity::become_owner()?;
    let target_column = &stored[features.len()];
    let (labelled, stray) = client
        .select(
            &format!(
                "SELECT count({t}), (SELECT {t}::text FROM {data} WHERE {t} IS NOT NULL
                                     AND $2 AND NOT ({t}::text = ANY ($1)) LIMIT 1)
                 FROM {data}",
                t = quote_ident(target_column)
            ),
            Some(1),
            &[req.labels.clone().into(), (task != Task::Regression).into()],
        )?
        .first()
        .get_two::<i64, String>()?;
    if labelled.unwrap_or(0) == 0 {
        return Err(CerebroError::EmptySource { relation: source.display.clone(), target: target.into() });
    }
    if let Some(value) = stray {
        return Err(RequestError::ImportInvalid(format!(
            "the target \"{target}\" holds \"{value}\", which is not one of the labels ({})",
            req.labels.join(", ")
        ))
        .into());
    }
    Ok(id)
}

fn try_import(req: ImportRequest<'_>) -> Result<i32> {
    crate::catalog::writable()?;
    validate_model_name(req.name)?;
    let task = request::import_task(req.task.parse::<TaskChoice>()?, &req.labels)?;
    let graph = read_signature(req.onnx).map_err(|e| RequestError::ImportInvalid(e.to_string()))?;
    let groups = request::import_mapping(req.inputs, &graph.inputs)?;
    let output = request::scored_output(&graph.outputs, req.output, task, req.labels.len())?;

    Spi::connect_mut(|client| {
        let source = resolve_source(client, req.source)?;
        if let Some(key) = req.key {
            source.column(key)?;
        }
        let (features, inputs) = request::import_features(&groups, &graph.inputs, &source.shape())?;
        let layout = ImportLayout { inputs, output: output.name.clone() };

        let user = current_user(client)?;
        let caller = identity::current_role();
        // Whether the caller may add a version to this name, before any rows
        // are copied.
        let version = {
            let _owner = identity::become_owner()?;
            next_version(client, req.name, caller)?
        };
        let snapshot = match req.target {
            Some(target) => Some(freeze_rows(client, &req, &source, &features, task, target, &user)?),
            None => None,
        };
        let _owner = identity::become_owner()?;
        let sha: String = client
            .select("SELECT encode(sha256($1), 'hex')", Some(1), &[req.onnx.into()])?
            .first()
            .get_one()?
            .expect("sha256 is never NULL");
        let written = serde_json::json!({
            "imported": true, "source": req.source, "inputs": req.inputs, "task": req.task,
            "labels": req.labels, "output": req.output, "key": req.key, "target": req.target,
        });
        let id: i64 = client
            .update(
                "INSERT INTO cerebro.model_versions (name, version, status, task, source_relation, key_column, features,
                     class_labels, options, epochs, created_by, request, import_layout, artifact_sha256,
                     artifact_bytes, trained_at, source_author, target_column, snapshot_id)
                 VALUES ($1, $2, 'ready', $3, $4, $5, $6, $7, '{}', 0, $8, $9, $10, $11, $12, now(), $8, $13, $14)
                 RETURNING id",
                Some(1),
                &[
                    req.name.into(),
                    version.into(),
                    task.as_str().into(),
                    source.display.as_str().into(),
                    req.key.into(),
                    JsonB(serde_json::to_value(&features).expect("features serialise")).into(),
                    req.labels.clone().into(),
                    user.as_str().into(),
                    JsonB(written).into(),
                    JsonB(serde_json::to_value(&layout).expect("layout serialises")).into(),
                    sha.as_str().into(),
                    (req.onnx.len() as i64).into(),
                    req.target.into(),
                    snapshot.into(),
                ],
            )?
            .first()
            .get_one()?
            .expect("RETURNING id");
        client.update(
            "INSERT INTO cerebro.artifacts (model_version_id, sha256, size_bytes, bytes) VALUES ($1, $2, $3, $4)",
            None,
            &[id.into(), sha.as_str().into(), (req.onnx.len() as i64).into(), req.onnx.into()],
        )?;
        if snapshot.is_some() {
            wake_daemon(client)?;
        }
        let detail = serde_json::json!({ "imported": true, "bytes": req.onnx.len(), "snapshot": snapshot });
        audit(client, Audit { user: &user, action: "create", model: req.name, version: Some(version), detail })?;
        notice!(
            "model \"{}\" version {version} imported: {} feature column(s), output \"{}\"{}",
            req.name,
            features.len(),
            layout.output,
            match snapshot {
                Some(_) => format!(
                    "; its rows are frozen with target \"{}\", and cerebrod measures what it reads once this \
                     transaction commits (cerebro.model_importance)",
                    req.target.unwrap_or_default()
                ),
                None => String::new(),
            }
        );
        Ok(version)
    })
}

/// Registers an ONNX model trained elsewhere as the next version of `name`.
#[pg_extern(sql = false)]
#[allow(clippy::too_many_arguments)]
fn import_onnx(
    name: Option<&str>,
    onnx: Option<&[u8]>,
    source: Option<&str>,
    inputs: Option<crate::jsonb::JsonbText>,
    task: Option<&str>,
    labels: Option<Vec<Option<String>>>,
    output: Option<&str>,
    key: Option<&str>,
    target: Option<&str>,
) -> i32 {
    fn need<'a>(v: Option<&'a str>, what: &'static str) -> Result<&'a str> {
        v.ok_or(CerebroError::NullArgument(what))
    }
    let run = || -> Result<i32> {
        let inputs = inputs.ok_or(CerebroError::NullArgument("inputs"))?.parse("inputs")?;
        let labels = labels
            .unwrap_or_default()
            .into_iter()
            .map(|l| l.ok_or(CerebroError::NullArgument("a label")))
            .collect::<Result<Vec<_>>>()?;
        try_import(ImportRequest {
            name: need(name, "name")?,
            onnx: onnx.ok_or(CerebroError::NullArgument("onnx"))?,
            source: need(source, "source")?,
            inputs: &inputs,
            task: need(task, "task")?,
            labels,
            output,
            key,
            target,
        })
    };
    run().unwrap_or_else(|e| raise(e))
}
