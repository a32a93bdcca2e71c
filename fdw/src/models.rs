//! `cerebro.models`: an INSERT's row becomes a training request (queued by
//! crate::training); SELECT lists every model version with its status and
//! metrics.

use cerebro_shared::spec::{validate_model_name, TaskChoice, TrainOptions};
use cerebro_shared::sql::ModelStatus;
use pgrx::prelude::*;
use pgrx::JsonB;
use supabase_wrappers::prelude::{Cell, Row};

use crate::error::{CerebroError, Result};
use crate::identity;

/// Columns users may set on INSERT; every other column is Cerebro's.
const WRITABLE: &[&str] =
    &["name", "source", "target", "key", "features", "task", "options", "spec", "parent_version", "change"];

/// A training request as inserted, before it is checked against the source.
#[derive(Debug, Clone)]
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
                                .map(|v| v.clone().ok_or(CerebroError::NullFeature))
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
        if change.is_some() && spec.is_some() {
            return Err(CerebroError::ChangeWithSpec);
        }
        let lineage = (parent_version.is_some() || change.is_some()).then_some(Lineage { parent_version, change });
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
        })
    }
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
                    m.parent_version, m.change,
                    CASE WHEN m.importance IS NOT NULL THEN
                        ARRAY(SELECT c.value->>'column'
                              FROM pg_catalog.jsonb_array_elements(m.importance->'columns') WITH ORDINALITY c(value, n)
                              ORDER BY c.n LIMIT 5) END,
                    CASE WHEN m.import_layout IS NOT NULL THEN 'imported'
                         WHEN m.trained_with ? 'ensemble' THEN
                             'an ensemble of ' || pg_catalog.jsonb_array_length(m.trained_with->'ensemble'->'members')
                             || ' versions' END
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
            // An import or an ensemble trains no epochs of its own.
            let untrained: Option<String> = row.get(22)?;
            let progress = match (status.parse(), untrained) {
                (Ok(ModelStatus::Training), _) => format!("epoch {epoch} of {epochs}"),
                (Ok(ModelStatus::Ready), Some(what)) => what,
                (Ok(ModelStatus::Ready), None) => format!("trained {epoch} of {epochs} epochs"),
                _ => status.clone(),
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
                ("top_columns", row.get::<Vec<Option<String>>>(21)?.map(Cell::StringArray)),
            ]);
        }
        Ok(out)
    })
}
