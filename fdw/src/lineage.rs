//! Derived models: an INSERT naming a parent version and a change in the
//! selection language (docs/selection.md, "Derived models") queues a new
//! version that is the parent's request with the change applied. The
//! lineage is recorded (`parent_version`, `change`); cerebrod starts the
//! new version from the parent's weights where shapes allow.

use cerebro_shared::mst::{self, Change};
use cerebro_shared::spec::TrainOptions;
use pgrx::prelude::*;
use pgrx::JsonB;

use crate::access;
use crate::admin::first;
use crate::error::{CerebroError, Result};
use crate::identity;
use crate::models::{queue_version, Lineage, TrainRequest};
use crate::selections::{merge_options, selected_columns, source_columns};
use crate::sources::check_own_source;

/// What a derived model inherits from its parent.
struct Parent {
    version: i32,
    source: String,
    target: String,
    key: Option<String>,
    features: Vec<String>,
    options: serde_json::Value,
    /// Who wrote its source.
    source_author: String,
}

/// The parent version: the one named, else the deployed one, else the
/// latest ready one.
fn parent_of(name: &str, named: Option<i32>) -> Result<Parent> {
    Spi::connect_mut(|client| {
        access::check_may_use(name, identity::current_role())?;
        let _owner = identity::become_owner()?;
        let version = match named {
            Some(v) => v,
            None => first::<i32>(client, "SELECT cerebro.resolve_version($1)", &[name.into()], 1)?
                .ok_or_else(|| CerebroError::NoParent(name.to_string()))?,
        };
        let query = "SELECT status::text, source_relation, target_column, key_column,
                            ARRAY(SELECT f->>'name' FROM jsonb_array_elements(features) f), options,
                            source_author::text
                     FROM cerebro.model_versions WHERE name = $1 AND version = $2";
        let Some(row) = client.update(query, Some(1), &[name.into(), version.into()])?.next() else {
            return Err(CerebroError::VersionNotFound { name: name.into(), version });
        };
        let status: String = row.get(1)?.unwrap_or_default();
        let target: Option<String> = row.get(3)?;
        let (true, Some(target)) = (status == "ready", target) else {
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
        })
    })
}

/// The parent's features with the change's selections applied: `-c`
/// removes, a name or group adds.
fn apply_features(
    parent: &[String],
    change: &Change,
    source: &str,
    target: &str,
    key: Option<&str>,
) -> Result<Vec<String>> {
    let mut features = parent.to_vec();
    if change.features.is_empty() {
        return Ok(features);
    }
    let columns = source_columns(source)?;
    for s in &change.features {
        let named = selected_columns(s, source, &columns, target, key)?;
        if s.exclude {
            if let Some(c) = named.iter().find(|c| !features.contains(c)) {
                return Err(CerebroError::NotAFeature { column: c.clone() });
            }
            features.retain(|c| !named.contains(c));
        } else {
            for c in named {
                if !features.contains(&c) {
                    features.push(c);
                }
            }
        }
    }
    Ok(features)
}

/// The parent's options with the change's settings and appends.
fn apply_options(parent: &serde_json::Value, change: &Change) -> serde_json::Value {
    let mut options = parent.as_object().cloned().unwrap_or_default();
    merge_options(&mut options, &change.set);
    for (key, more) in &change.append {
        let mut list = options.get(key).and_then(|v| v.as_array()).cloned().unwrap_or_default();
        list.extend(more.as_array().cloned().unwrap_or_default());
        options.insert(key.clone(), serde_json::Value::Array(list));
    }
    serde_json::Value::Object(options)
}

/// Queues the derived version `req` asks for.
pub fn queue_derived(req: TrainRequest) -> Result<()> {
    let lineage = req.lineage.clone().expect("a derived request");
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
        None => apply_features(&parent.features, &change, &source, &target, key.as_deref())?,
    };
    let mut options = apply_options(&parent.options, &change);
    if let Some(written) = req.written["options"].as_object() {
        options.as_object_mut().expect("options are an object").extend(written.clone());
    }
    let derived = TrainRequest {
        name: req.name.clone(),
        source,
        target,
        key,
        features: Some(features),
        task: req.task,
        options: TrainOptions::from_json(Some(&options))?,
        written: req.written.clone(),
        spec: None,
        lineage: Some(Lineage { parent_version: Some(parent.version), change: lineage.change }),
        source_author: inherited.then_some(parent.source_author),
    };
    queue_version(&derived, None, None).map(drop)
}
