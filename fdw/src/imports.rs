//! `cerebro.import_onnx`: registers an ONNX model trained elsewhere, so that
//! `cerebro.predictions` scores with it like with any version.
//!
//! The graph is checked against the declared columns before anything is
//! stored: every graph input is mapped to columns of the source of the right
//! kind and number, the scored output is a float tensor of the width the
//! task needs. The model is read straight from its bytes
//! (`cerebro_shared::onnx_graph`), since the backend never loads ONNX Runtime.

use cerebro_shared::onnx_graph::{read_signature, ImportInput, ImportLayout, TensorInfo, FLOAT, STRING};
use cerebro_shared::spec::{validate_model_name, Feature, FeatureKind, Task, TaskChoice};
use pgrx::prelude::*;
use pgrx::JsonB;

use crate::admin::{audit, current_user, next_version, raise, Audit};
use crate::error::{CerebroError, Result};
use crate::identity;
use crate::sources::resolve_source;

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
}

fn invalid(message: String) -> CerebroError {
    CerebroError::ImportInvalid(message)
}

/// The columns each graph input takes, from `{"input": "col"}` or
/// `{"input": ["col", ...]}`, in graph order.
fn mapping(inputs: &serde_json::Value, graph: &[TensorInfo]) -> Result<Vec<(String, Vec<String>)>> {
    let object = inputs
        .as_object()
        .ok_or_else(|| invalid("inputs must be a JSON object from graph input names to column names".into()))?;
    let names: Vec<&str> = graph.iter().map(|i| i.name.as_str()).collect();
    if let Some(unknown) = object.keys().find(|k| !names.contains(&k.as_str())) {
        return Err(invalid(format!("the graph has no input \"{unknown}\"; its inputs are: {}", names.join(", "))));
    }
    graph
        .iter()
        .map(|input| {
            let columns: Vec<String> = match object.get(&input.name) {
                None => return Err(invalid(format!("graph input \"{}\" is not mapped to any column", input.name))),
                Some(serde_json::Value::String(c)) => vec![c.clone()],
                Some(serde_json::Value::Array(cs)) => cs
                    .iter()
                    .map(|c| c.as_str().map(str::to_owned))
                    .collect::<Option<Vec<_>>>()
                    .filter(|cs| !cs.is_empty())
                    .ok_or_else(|| {
                        invalid(format!("input \"{}\" must map to a column or a list of them", input.name))
                    })?,
                Some(_) => {
                    return Err(invalid(format!("input \"{}\" must map to a column or a list of them", input.name)))
                }
            };
            Ok((input.name.clone(), columns))
        })
        .collect()
}

/// The output to score with, checked against the task.
fn scored_output<'g>(
    graph: &'g [TensorInfo],
    wanted: Option<&str>,
    task: Task,
    classes: usize,
) -> Result<(&'g TensorInfo, usize)> {
    let floats: Vec<&TensorInfo> = graph.iter().filter(|o| o.elem_type == FLOAT).collect();
    let output = match wanted {
        Some(name) => graph
            .iter()
            .find(|o| o.name == name)
            .ok_or_else(|| invalid(format!("the graph has no output \"{name}\"")))?,
        None if floats.len() == 1 => floats[0],
        None => {
            let names: Vec<&str> = graph.iter().map(|o| o.name.as_str()).collect();
            return Err(invalid(format!(
                "name the output to score with; the graph's outputs are: {}",
                names.join(", ")
            )));
        }
    };
    if output.elem_type != FLOAT {
        return Err(invalid(format!(
            "output \"{}\" is a {} tensor; Cerebro scores from a float tensor",
            output.name,
            output.type_name()
        )));
    }
    let width = if output.dims.len() >= 2 { output.dims[1] } else { Some(1) };
    let (allowed, positive): (&[usize], usize) = match task {
        Task::Binary => (&[1, 2], if width == Some(2) { 1 } else { 0 }),
        Task::Multiclass => (std::slice::from_ref(&classes), 0),
        Task::Regression => (&[1], 0),
    };
    if let Some(w) = width {
        if !allowed.contains(&(w as usize)) {
            return Err(invalid(format!(
                "output \"{}\" has {w} column(s); a {} model needs {}",
                output.name,
                task.as_str(),
                allowed.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(" or ")
            )));
        }
    }
    Ok((output, positive))
}

fn try_import(req: ImportRequest<'_>) -> Result<i32> {
    validate_model_name(req.name)?;
    let task = match req.task.parse::<TaskChoice>()? {
        TaskChoice::Fixed(t) => t,
        TaskChoice::Auto => {
            return Err(invalid("an imported model's task must be binary, multiclass or regression".into()))
        }
    };
    match (task, req.labels.len()) {
        (Task::Binary, 2) | (Task::Regression, 0) => {}
        (Task::Multiclass, n) if n >= 2 => {}
        (Task::Binary, n) => {
            return Err(invalid(format!("a binary model needs 2 labels (negative, then positive), not {n}")));
        }
        (Task::Multiclass, n) => {
            return Err(invalid(format!("a multiclass model needs its labels in output order, not {n}")))
        }
        (Task::Regression, _) => return Err(invalid("a regression model takes no labels".into())),
    }
    let graph = read_signature(req.onnx).map_err(|e| invalid(e.to_string()))?;
    let groups = mapping(req.inputs, &graph.inputs)?;
    let (output, positive_column) = scored_output(&graph.outputs, req.output, task, req.labels.len())?;

    Spi::connect_mut(|client| {
        let source = resolve_source(client, req.source)?;
        if let Some(key) = req.key {
            source.column(key)?;
        }
        let mut features: Vec<Feature> = Vec::new();
        let mut layout = Vec::new();
        for ((input_name, columns), info) in groups.iter().zip(&graph.inputs) {
            let wanted = match info.elem_type {
                FLOAT => FeatureKind::Numeric,
                STRING => FeatureKind::Categorical,
                _ => {
                    return Err(invalid(format!(
                        "graph input \"{input_name}\" is a {} tensor; Cerebro feeds float and string tensors",
                        info.type_name()
                    )));
                }
            };
            if wanted == FeatureKind::Categorical && columns.len() != 1 {
                return Err(invalid(format!("string input \"{input_name}\" takes one column, not {}", columns.len())));
            }
            if let Some(Some(width)) = info.dims.get(1) {
                if *width as usize != columns.len() {
                    return Err(invalid(format!(
                        "graph input \"{input_name}\" takes {width} column(s); {} are mapped to it",
                        columns.len()
                    )));
                }
            }
            for name in columns {
                let col = source.column(name)?;
                let kind = col.kind.map(|k| k.feature_kind());
                if kind != Some(wanted) {
                    return Err(invalid(format!(
                        "column \"{name}\" ({}) cannot feed input \"{input_name}\", a {} tensor",
                        col.type_name,
                        info.type_name()
                    )));
                }
                if features.iter().any(|f| &f.name == name) {
                    return Err(CerebroError::DuplicateFeature(name.clone()));
                }
                features.push(Feature { name: name.clone(), kind: wanted });
            }
            layout.push(ImportInput { name: input_name.clone(), columns: columns.len() });
        }
        let layout = ImportLayout { inputs: layout, output: output.name.clone(), positive_column };

        let user = current_user(client)?;
        let caller = identity::current_role();
        let _owner = identity::become_owner()?;
        let version = next_version(client, req.name, caller)?;
        let sha: String = client
            .select("SELECT encode(sha256($1), 'hex')", Some(1), &[req.onnx.into()])?
            .first()
            .get_one()?
            .expect("sha256 is never NULL");
        let written = serde_json::json!({
            "imported": true, "source": req.source, "inputs": req.inputs, "task": req.task,
            "labels": req.labels, "output": req.output, "key": req.key,
        });
        let id: i64 = client
            .update(
                "INSERT INTO cerebro.model_versions (name, version, status, task, source_relation, key_column, features,
                     class_labels, options, epochs, created_by, request, import_layout, artifact_sha256,
                     artifact_bytes, trained_at, source_author)
                 VALUES ($1, $2, 'ready', $3, $4, $5, $6, $7, '{}', 0, $8, $9, $10, $11, $12, now(), $8) RETURNING id",
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
        let detail = serde_json::json!({ "imported": true, "bytes": req.onnx.len() });
        audit(client, Audit { user: &user, action: "create", model: req.name, version: Some(version), detail })?;
        notice!(
            "model \"{}\" version {version} imported: {} feature column(s), output \"{}\"",
            req.name,
            features.len(),
            layout.output
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
        })
    };
    run().unwrap_or_else(|e| raise(e))
}
