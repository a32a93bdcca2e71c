//! A derived version's request: the parent version's request with the
//! change (docs/selection.md, "Derived models") applied, and anything the
//! INSERT sets itself on top. The lineage is recorded (`parent_version`,
//! `change`); cerebrod starts the new version from the parent's weights
//! where shapes allow.

use cerebro_shared::mst::{self, Change};
use cerebro_shared::request::{self, apply_options};
use cerebro_shared::spec::TrainOptions;
use cerebro_shared::sql::ModelStatus;
use pgrx::prelude::*;
use pgrx::JsonB;

use super::{Batch, VersionRequest};
use crate::access;
use crate::catalog::first;
use crate::error::{CerebroError, Result};
use crate::models::{Lineage, TrainRequest};
use crate::sources::{check_own_source, read_shape};

/// What a derived version inherits from its parent.
pub(super) struct Parent {
    pub(super) version: i32,
    pub(super) source: String,
    pub(super) target: String,
    pub(super) key: Option<String>,
    pub(super) features: Vec<String>,
    pub(super) options: serde_json::Value,
    /// Who wrote its source.
    pub(super) source_author: String,
    /// Its frozen training rows (a selection on its snapshot reuses them).
    pub(super) snapshot_id: i64,
}

/// The parent version: the one named, else what `cerebro.resolve_version`
/// picks (the deployed one, else the newest ready one).
pub(super) fn parent_of(name: &str, named: Option<i32>) -> Result<Parent> {
    Spi::connect_mut(|client| {
        access::as_user_of(name, || {
            let version = match named {
                Some(v) => v,
                None => first::<i32>(client, "SELECT cerebro.resolve_version($1)", &[name.into()], 1)?
                    .ok_or_else(|| CerebroError::NoParent(name.to_string()))?,
            };
            let query = "SELECT status::text, source_relation, target_column, key_column,
                                ARRAY(SELECT f->>'name' FROM jsonb_array_elements(features) f), options,
                                source_author::text, snapshot_id
                         FROM cerebro.model_versions WHERE name = $1 AND version = $2";
            let Some(row) = client.update(query, Some(1), &[name.into(), version.into()])?.next() else {
                return Err(CerebroError::VersionNotFound { name: name.into(), version });
            };
            let status: String = row.get(1)?.unwrap_or_default();
            let target: Option<String> = row.get(3)?;
            let (true, Some(target)) = (status == ModelStatus::Ready.as_str(), target) else {
                return Err(CerebroError::NotDerivable { name: name.into(), version, status });
            };
            Ok(Parent {
                version,
                source: row.get(2)?.unwrap_or_default(),
                target,
                key: row.get(4)?,
                features: row.get::<Vec<Option<String>>>(5)?.unwrap_or_default().into_iter().flatten().collect(),
                options: row.get::<JsonB>(6)?.map(|j| j.0).unwrap_or_default(),
                source_author: row.get(7)?.unwrap_or_default(),
                snapshot_id: row.get(8)?.unwrap_or_default(),
            })
        })
    })
}

/// The version `req` derives from its parent.
pub(super) fn build(req: &TrainRequest, lineage: &Lineage) -> Result<Batch> {
    let change = match &lineage.change {
        Some(text) => mst::parse_change(text).map_err(CerebroError::Selection)?,
        None => Change::default(),
    };
    let parent = parent_of(&req.name, lineage.parent_version)?;
    let pick =
        |written: &str, inherited: &str| if written.is_empty() { inherited.to_string() } else { written.to_string() };
    let source = change.source.clone().unwrap_or_else(|| pick(&req.source, &parent.source));
    let inherited = source == parent.source;
    if inherited {
        // The parent's source is read again, as the caller: like scoring it,
        // that must run no code of a role without the caller's rights.
        Spi::connect(|client| check_own_source(client, &req.name, &source, &parent.source_author))?;
    }
    let target = pick(&req.target, &parent.target);
    let key = req.key.clone().or(parent.key.clone());
    let features = match &req.features {
        Some(written) => written.clone(),
        None if change.features.is_empty() => parent.features.clone(),
        None => {
            let tables = request::tables_to_read(&change.features, &source);
            let shape = Spi::connect(|client| read_shape(client, &source, &tables))?;
            request::apply_features(&parent.features, &change, &shape, &target, key.as_deref())?
        }
    };
    let mut options = apply_options(&parent.options, &change);
    if let Some(written) = req.written["options"].as_object() {
        options.as_object_mut().expect("options are an object").extend(written.clone());
    }
    let version = VersionRequest {
        name: req.name.clone(),
        source,
        target,
        key,
        features: Some(features),
        task: req.task,
        options: TrainOptions::from_json(Some(&options))?,
        written: req.written.clone(),
        lineage: Some(Lineage { parent_version: Some(parent.version), change: lineage.change.clone() }),
        source_author: inherited.then_some(parent.source_author),
        candidate: None,
    };
    Ok(Batch { selection: None, versions: vec![version], on_snapshot: None })
}
