//! `cerebro.models`: INSERT validates a training request and queues it;
//! SELECT lists every model version with its status and metrics.

use cerebro_shared::spec::{resolve_task, validate_model_name, Feature, Split, Task, TaskChoice, TrainOptions};
use cerebro_shared::sql::{quote_ident, snapshot_column};
use pgrx::prelude::*;
use pgrx::JsonB;
use supabase_wrappers::prelude::{Cell, Row};

use crate::error::{CerebroError, Result};
use crate::identity;
use crate::sources::{resolve_source, SourceColumn};

/// Columns users may set on INSERT; every other column is Cerebro's.
const WRITABLE: &[&str] =
    &["name", "source", "target", "key", "features", "task", "options", "spec", "parent_version", "change"];

/// A training request as inserted, before it is checked against the source.
#[derive(Debug)]
pub struct TrainRequest {
    pub name: String,
    pub source: String,
    pub target: String,
    pub key: Option<String>,
    pub features: Option<Vec<String>>,
    pub task: TaskChoice,
    pub options: TrainOptions,
    /// The row as written, before any default: provenance.
    pub written: serde_json::Value,
    /// A model selection spec (docs/selection.md): queue every candidate.
    pub spec: Option<String>,
    /// A derived model: its parent version (None: the deployed or latest
    /// ready one) and the change, both as written.
    pub lineage: Option<Lineage>,
    /// Who wrote `source` when it is not the inserting role: a derived
    /// version reading its parent's source keeps the parent's author.
    pub source_author: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Lineage {
    pub parent_version: Option<i32>,
    pub change: Option<String>,
}

fn text(column: &str, cell: &Option<Cell>) -> Result<Option<String>> {
    match cell {
        None => Ok(None),
        Some(Cell::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(CerebroError::WrongValueType { column: column.into(), expected: "text" }),
    }
}

impl TrainRequest {
    pub fn from_row(row: &Row) -> Result<TrainRequest> {
        let (mut name, mut source, mut target, mut key, mut features, mut task, mut options) =
            (None, None, None, None, None, None, None);
        let (mut spec, mut change, mut parent_version) = (None, None, None);
        for (column, cell) in row.iter() {
            match column.as_str() {
                "change" => change = text(column, cell)?,
                "parent_version" => {
                    parent_version = match cell {
                        None => None,
                        Some(Cell::I32(v)) => Some(*v),
                        Some(_) => {
                            return Err(CerebroError::WrongValueType { column: column.clone(), expected: "integer" });
                        }
                    }
                }
                "name" => name = text(column, cell)?,
                "source" => source = text(column, cell)?,
                "target" => target = text(column, cell)?,
                "key" => key = text(column, cell)?,
                "task" => task = text(column, cell)?,
                "spec" => spec = text(column, cell)?,
                "features" => {
                    features = match cell {
                        None => None,
                        Some(Cell::StringArray(values)) => Some(
                            values
                                .iter()
                                .map(|v| v.clone().ok_or(CerebroError::MissingValue("features")))
                                .collect::<Result<Vec<_>>>()?,
                        ),
                        Some(_) => {
                            return Err(CerebroError::WrongValueType { column: column.clone(), expected: "text[]" });
                        }
                    }
                }
                "options" => {
                    options = match cell {
                        None => None,
                        Some(Cell::Json(j)) => Some(j.0.clone()),
                        Some(_) => {
                            return Err(CerebroError::WrongValueType { column: column.clone(), expected: "jsonb" });
                        }
                    }
                }
                other if cell.is_some() && !WRITABLE.contains(&other) => {
                    return Err(CerebroError::ReadOnlyColumn(other.to_owned()));
                }
                _ => {}
            }
        }
        let written = serde_json::json!({
            "name": name, "source": source, "target": target, "key": key,
            "features": features, "task": task, "options": options, "spec": spec,
            "parent_version": parent_version, "change": change,
        });
        let name = name.ok_or(CerebroError::MissingValue("name"))?;
        validate_model_name(&name)?;
        let lineage = (parent_version.is_some() || change.is_some()).then_some(Lineage { parent_version, change });
        if lineage.is_some() && spec.is_some() {
            return Err(CerebroError::Unsupported("a selection (spec) derived from a parent version"));
        }
        // A derived model takes what it does not set from its parent.
        let derived = lineage.is_some();
        Ok(TrainRequest {
            name,
            source: source.or_else(|| derived.then(String::new)).ok_or(CerebroError::MissingValue("source"))?,
            target: target.or_else(|| derived.then(String::new)).ok_or(CerebroError::MissingValue("target"))?,
            key,
            features,
            task: task.as_deref().unwrap_or("auto").parse()?,
            options: TrainOptions::from_json(options.as_ref())?,
            written,
            spec,
            lineage,
            source_author: None,
        })
    }
}

/// Validates `req`, freezes its training data and queues the job, all in the
/// calling transaction: a rolled-back INSERT leaves nothing behind and the
/// daemon, told by NOTIFY (delivered at commit), never sees it.
pub fn queue_training(req: TrainRequest) -> Result<()> {
    match (req.spec.clone(), req.lineage.is_some()) {
        (Some(spec), _) => crate::selections::queue_selection(req, &spec),
        (None, true) => crate::lineage::queue_derived(req),
        (None, false) => queue_version(&req, None, None).map(drop),
    }
}

/// A snapshot frozen for the candidates of one selection on one source.
#[derive(Clone)]
pub(crate) struct Frozen {
    id: i64,
    data_relation: String,
    row_count: i64,
    /// The source column each snapshot column holds, in order.
    columns: Vec<String>,
}

/// Snapshots shared by a selection's candidates, by source.
pub(crate) type SharedSnapshots = std::collections::HashMap<String, Frozen>;

/// Queues one version for `req` (part of selection `selection`, if any);
/// returns its version number.
pub(crate) fn queue_version(
    req: &TrainRequest,
    selection: Option<i64>,
    shared: Option<&mut SharedSnapshots>,
) -> Result<i32> {
    Spi::connect_mut(|client| {
        let source = resolve_source(client, &req.source)?;
        let target = source.column(&req.target)?;
        let target_kind = target.kind.ok_or_else(|| CerebroError::UnsupportedType {
            relation: source.display.clone(),
            column: target.name.clone(),
            type_name: target.type_name.clone(),
            role: "a target",
        })?;
        let key = req.key.as_deref().map(|k| source.column(k)).transpose()?;
        if req.options.split == Split::Ordered && key.is_none() {
            return Err(CerebroError::OrderedSplitNeedsKey);
        }

        let mut features: Vec<Feature> = Vec::new();
        match &req.features {
            Some(names) => {
                for name in names {
                    let col = source.column(name)?;
                    if name == &req.target {
                        return Err(CerebroError::FeatureConflict { column: name.clone(), role: "target" });
                    }
                    if Some(name.as_str()) == req.key.as_deref() {
                        return Err(CerebroError::FeatureConflict { column: name.clone(), role: "key" });
                    }
                    if features.iter().any(|f| &f.name == name) {
                        return Err(CerebroError::DuplicateFeature(name.clone()));
                    }
                    let kind = col.kind.ok_or_else(|| CerebroError::UnsupportedType {
                        relation: source.display.clone(),
                        column: name.clone(),
                        type_name: col.type_name.clone(),
                        role: "a feature",
                    })?;
                    features.push(Feature { name: name.clone(), kind: kind.feature_kind() });
                }
            }
            None => {
                for col in &source.columns {
                    if col.name == req.target || Some(col.name.as_str()) == req.key.as_deref() {
                        continue;
                    }
                    match col.kind {
                        Some(kind) => features.push(Feature { name: col.name.clone(), kind: kind.feature_kind() }),
                        None => notice!(
                            "cerebro: column \"{}\" ({}) is not used as a feature: its type is not supported",
                            col.name,
                            col.type_name
                        ),
                    }
                }
            }
        }
        if features.is_empty() {
            return Err(CerebroError::NoFeatures { relation: source.display.clone() });
        }

        // Privileges are checked up front so the error names every column; the
        // snapshot query below runs as the user anyway, with RLS applied.
        let mut used: Vec<&str> = vec![req.target.as_str()];
        used.extend(key.map(|k| k.name.as_str()));
        used.extend(features.iter().map(|f| f.name.as_str()));
        let denied: Vec<String> = used
            .iter()
            .filter(|c| !source.column(c).map(|c| c.readable).unwrap_or(false))
            .map(|c| c.to_string())
            .collect();
        if !denied.is_empty() {
            return Err(CerebroError::PermissionDenied { relation: source.display.clone(), columns: denied });
        }

        let user_name = crate::admin::current_user(client)?;
        let caller = identity::current_role();
        // A selection's candidates share one snapshot per source, of every
        // readable column they could use; a plain INSERT freezes what it uses.
        let reused = shared.as_ref().and_then(|m| m.get(&source.display).cloned());
        let mut frozen: Vec<&SourceColumn> = used.iter().map(|c| source.column(c)).collect::<Result<_>>()?;
        if shared.is_some() {
            for c in &source.columns {
                if c.readable && c.kind.is_some() && !frozen.iter().any(|f| f.name == c.name) {
                    frozen.push(c);
                }
            }
        }
        // Column i of the snapshot is snapshot_column(i), holding frozen[i]
        // converted to a built-in type as the user (who may run their own
        // casts): the owner and cerebrod then only ever read built-in types.
        let frozen_names: Vec<String> = match &reused {
            Some(f) => f.columns.clone(),
            None => frozen.iter().map(|c| c.name.clone()).collect(),
        };
        let snapshot_col = |name: &str| -> String {
            let i = frozen_names.iter().position(|n| n == name).expect("every used column is frozen");
            snapshot_column(i)
        };
        let targets = (0..frozen.len()).map(snapshot_column).collect::<Vec<_>>().join(", ");
        let values = frozen.iter().map(|c| c.stored()).collect::<Vec<_>>().join(", ");

        let (version, snapshot_id, data_relation) = {
            let _owner = identity::become_owner()?;
            let version = crate::admin::next_version(client, &req.name, caller)?;
            if let Some(f) = &reused {
                (version, f.id, f.data_relation.clone())
            } else {
                let snapshot_id: i64 = client
                    .update("SELECT nextval('cerebro.snapshots_id_seq')", Some(1), &[])?
                    .first()
                    .get_one()?
                    .expect("nextval is never NULL");
                let data_relation = format!("cerebro_data.snapshot_{snapshot_id}");
                let definition = frozen
                    .iter()
                    .enumerate()
                    .map(|(i, c)| format!("{} {}", snapshot_column(i), c.storage()))
                    .collect::<Vec<_>>()
                    .join(", ");
                client.update(&format!("CREATE TABLE {data_relation} ({definition})"), None, &[])?;
                client.update(&format!("GRANT INSERT ON {data_relation} TO {}", quote_ident(&user_name)), None, &[])?;
                (version, snapshot_id, data_relation)
            }
        };
        let query = format!("INSERT INTO {data_relation} ({targets}) SELECT {values} FROM {}", source.in_from());

        // The copy runs as the calling user: their privileges and row-level
        // security decide which rows a model may learn from.
        let row_count = match &reused {
            Some(f) => f.row_count,
            None => {
                let rows = client.update(&query, None, &[])?.len() as i64;
                let _owner = identity::become_owner()?;
                client.update(
                    &format!("REVOKE INSERT ON {data_relation} FROM {}", quote_ident(&user_name)),
                    None,
                    &[],
                )?;
                rows
            }
        };

        let _owner = identity::become_owner()?;
        let target_q = snapshot_col(&req.target);
        let (labelled, distinct) = client
            .select(
                &format!("SELECT count({target_q}), count(DISTINCT {target_q}) FROM {data_relation}"),
                Some(1),
                &[],
            )?
            .first()
            .get_two::<i64, i64>()?;
        let (labelled, distinct) = (labelled.unwrap_or(0), distinct.unwrap_or(0));
        if labelled == 0 {
            return Err(CerebroError::EmptySource { relation: source.display.clone(), target: req.target.clone() });
        }
        let task = resolve_task(req.task, &req.target, target_kind, distinct as usize)?;
        let mut class_labels: Vec<String> = Vec::new();
        if task != Task::Regression {
            let labels = client.select(
                &format!(
                    "SELECT d.v::text FROM (SELECT DISTINCT {target_q} AS v FROM {data_relation}
                     WHERE {target_q} IS NOT NULL) d ORDER BY d.v"
                ),
                None,
                &[],
            )?;
            for row in labels {
                class_labels.push(row.get(1)?.expect("labels are not NULL"));
            }
        }
        req.options.check_against(&features, task, &class_labels)?;
        crate::limits::check_model(&req.options, &features, task, class_labels.len(), labelled as u64)?;
        crate::limits::check_role_share(client, &user_name)?;

        if reused.is_none() {
            client.update(
                "INSERT INTO cerebro.snapshots (id, source_relation, query, data_relation, row_count, created_by,
                     columns)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                None,
                &[
                    snapshot_id.into(),
                    source.display.as_str().into(),
                    query.as_str().into(),
                    data_relation.as_str().into(),
                    row_count.into(),
                    user_name.as_str().into(),
                    frozen_names.clone().into(),
                ],
            )?;
            if let Some(map) = shared {
                map.insert(
                    source.display.clone(),
                    Frozen { id: snapshot_id, data_relation: data_relation.clone(), row_count, columns: frozen_names },
                );
            }
        }
        let features_json = serde_json::to_value(&features).expect("features serialise");
        let model_version_id: i64 = client
            .update(
                "INSERT INTO cerebro.model_versions (name, version, task, source_relation, target_column, key_column,
                     features, class_labels, options, snapshot_id, epochs, created_by, request, selection_id,
                     parent_version, change, source_author)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17) RETURNING id",
                Some(1),
                &[
                    req.name.as_str().into(),
                    version.into(),
                    task.as_str().into(),
                    source.display.as_str().into(),
                    req.target.as_str().into(),
                    req.key.clone().into(),
                    JsonB(features_json).into(),
                    class_labels.clone().into(),
                    JsonB(req.options.to_json()).into(),
                    snapshot_id.into(),
                    (req.options.epochs as i32).into(),
                    user_name.as_str().into(),
                    JsonB(req.written.clone()).into(),
                    selection.into(),
                    req.lineage.as_ref().and_then(|l| l.parent_version).into(),
                    req.lineage.as_ref().and_then(|l| l.change.clone()).into(),
                    req.source_author.as_deref().unwrap_or(&user_name).into(),
                ],
            )?
            .first()
            .get_one()?
            .expect("RETURNING id");
        crate::admin::enqueue(client, model_version_id)?;
        let detail = serde_json::json!({ "source": source.display, "target": req.target });
        let create = crate::admin::Audit {
            user: &user_name,
            action: "create",
            model: &req.name,
            version: Some(version),
            detail,
        };
        crate::admin::audit(client, create)?;
        notice!(
            "cerebro: queued {} version {} ({} task, {} features, {} rows); it trains once this transaction commits",
            req.name,
            version,
            task,
            features.len(),
            row_count
        );
        Ok(version)
    })
}

/// One row of `cerebro.models`, as (column, value) pairs.
pub type ModelRow = Vec<(&'static str, Option<Cell>)>;

pub fn list_models() -> Result<Vec<ModelRow>> {
    let _path = identity::pin_search_path();
    Spi::connect(|client| {
        let rows = client.select(
            "SELECT m.name, m.version, m.status::text, m.task, m.source_relation, m.target_column, m.key_column,
                    ARRAY(SELECT f->>'name' FROM jsonb_array_elements(m.features) f), m.options,
                    m.epoch, m.epochs, m.metrics, m.error, m.created_at, m.created_by::text, m.trained_at,
                    d.version IS NOT DISTINCT FROM m.version,
                    coalesce(m.artifact_bytes, 0)
                        + coalesce(pg_catalog.pg_total_relation_size(pg_catalog.to_regclass(s.data_relation)), 0),
                    m.parent_version, m.change
             FROM cerebro.model_versions m LEFT JOIN cerebro.deployments d ON d.name = m.name
             LEFT JOIN cerebro.snapshots s ON s.id = m.snapshot_id
             ORDER BY m.name, m.version",
            None,
            &[],
        )?;
        let mut out = Vec::new();
        for row in rows {
            let status: String = row.get(3)?.unwrap_or_default();
            let epoch: i32 = row.get(10)?.unwrap_or(0);
            let epochs: i32 = row.get(11)?.unwrap_or(0);
            let progress = match status.as_str() {
                "training" => format!("epoch {epoch} of {epochs}"),
                "ready" => format!("trained {epoch} of {epochs} epochs"),
                other => other.to_owned(),
            };
            let string = |v: Option<String>| v.map(Cell::String);
            out.push(vec![
                ("name", string(row.get(1)?)),
                ("version", row.get::<i32>(2)?.map(Cell::I32)),
                ("status", Some(Cell::String(status))),
                ("task", string(row.get(4)?)),
                ("source", string(row.get(5)?)),
                ("target", string(row.get(6)?)),
                ("key", string(row.get(7)?)),
                ("features", row.get::<Vec<Option<String>>>(8)?.map(Cell::StringArray)),
                ("options", row.get::<JsonB>(9)?.map(Cell::Json)),
                ("epoch", Some(Cell::I32(epoch))),
                ("epochs", Some(Cell::I32(epochs))),
                ("progress", Some(Cell::String(progress))),
                ("metrics", row.get::<JsonB>(12)?.map(Cell::Json)),
                ("error", string(row.get(13)?)),
                ("created_at", row.get::<pgrx::datum::TimestampWithTimeZone>(14)?.map(Cell::Timestamptz)),
                ("created_by", string(row.get(15)?)),
                ("trained_at", row.get::<pgrx::datum::TimestampWithTimeZone>(16)?.map(Cell::Timestamptz)),
                ("deployed", row.get::<bool>(17)?.map(Cell::Bool)),
                ("storage_bytes", row.get::<i64>(18)?.map(Cell::I64)),
                ("parent_version", row.get::<i32>(19)?.map(Cell::I32)),
                ("change", string(row.get(20)?)),
            ]);
        }
        Ok(out)
    })
}
