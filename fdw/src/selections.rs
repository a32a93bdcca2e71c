//! INSERT with a `spec`: a model selection. The spec (docs/selection.md) is
//! parsed and expanded here, in the INSERT's transaction; each candidate is
//! queued as a version of the model, checked like an INSERT of its own, and
//! tied to a row of `cerebro.selections` that `cerebro.leaderboard` ranks.
//! Candidates on one source share one frozen snapshot.

use cerebro_shared::mst::{self, Selection, Value};
use cerebro_shared::spec::TrainOptions;
use pgrx::prelude::*;

use crate::error::{CerebroError, Result};
use crate::gucs;
use crate::identity;
use crate::models::{queue_version, resolve_source, TrainRequest};

/// The feature columns a candidate's selections pick from `source`.
fn pick_features(
    selections: &[Selection],
    source_name: &str,
    source_columns: &[(String, bool)],
    req: &TrainRequest,
) -> Result<Vec<String>> {
    let short = |name: &str| name.rsplit('.').next().unwrap_or(name).trim_matches('"').to_string();
    let columns_of = |s: &Selection| -> Result<Vec<String>> {
        if let Some(table) = &s.table {
            if short(table) != short(source_name) {
                return Err(CerebroError::SelectionTable { table: table.clone(), relation: source_name.to_string() });
            }
        }
        Ok(match &s.columns {
            Some(names) => names.clone(),
            None => source_columns
                .iter()
                .filter(|(c, usable)| *usable && *c != req.target && Some(c) != req.key.as_ref())
                .map(|(c, _)| c.clone())
                .collect(),
        })
    };
    let mut picked: Vec<String> = Vec::new();
    for s in selections.iter().filter(|s| !s.exclude) {
        for c in columns_of(s)? {
            if !picked.contains(&c) {
                picked.push(c);
            }
        }
    }
    for s in selections.iter().filter(|s| s.exclude) {
        let out = columns_of(s)?;
        picked.retain(|c| !out.contains(c));
    }
    Ok(picked)
}

/// Queues every candidate of the selection `text` declares.
pub fn queue_selection(req: TrainRequest, written: &str) -> Result<()> {
    let text = mst::resolve(written);
    let spec = mst::parse(text).map_err(CerebroError::Selection)?;
    let limit = gucs::MAX_CANDIDATES.get().max(1) as u128;
    let total = spec.candidates(text).map_err(CerebroError::Selection)?;
    if total > limit {
        return Err(CerebroError::TooManyCandidates { total, limit });
    }
    let candidates = spec.expand(text, limit).map_err(CerebroError::Selection)?;
    let base: serde_json::Map<String, serde_json::Value> =
        req.written["options"].as_object().cloned().unwrap_or_default();

    let selection = Spi::connect_mut(|client| -> Result<i64> {
        let user = crate::admin::current_user(client)?;
        let _owner = identity::become_owner(identity::extension_owner()?);
        let id: i64 = client
            .update(
                "INSERT INTO cerebro.selections (name, spec, candidates, created_by) VALUES ($1, $2, $3, $4) RETURNING id",
                Some(1),
                &[req.name.as_str().into(), written.into(), (candidates.len() as i32).into(), user.as_str().into()],
            )?
            .first()
            .get_one()?
            .expect("RETURNING id");
        Ok(id)
    })?;

    let mut versions = Vec::with_capacity(candidates.len());
    let mut max_epochs = 0;
    let mut snapshots = crate::models::SharedSnapshots::new();
    for (i, candidate) in candidates.iter().enumerate() {
        let source = match &candidate.source {
            None => req.source.clone(),
            Some(Value::Word(w) | Value::Text(w)) => w.clone(),
            Some(_) => {
                return Err(CerebroError::Unsupported("a query as a selection source (create a view and name it)"))
            }
        };
        let features = if spec.features.is_empty() {
            req.features.clone()
        } else {
            let columns = Spi::connect(|client| -> Result<Vec<(String, bool)>> {
                let resolved = resolve_source(client, &source)?;
                Ok(resolved.columns.iter().map(|c| (c.name.clone(), c.kind.is_some())).collect())
            })?;
            Some(pick_features(&candidate.features, &source, &columns, &req)?)
        };
        let mut options = base.clone();
        for (key, value) in &candidate.options {
            match (key.as_str(), options.get_mut("encodings").and_then(|e| e.as_object_mut()), value.as_object()) {
                ("encodings", Some(existing), Some(more)) => existing.extend(more.clone()),
                _ => {
                    options.insert(key.clone(), value.clone());
                }
            }
        }
        let options_json = serde_json::Value::Object(options);
        let options = TrainOptions::from_json(Some(&options_json))?;
        max_epochs = max_epochs.max(options.epochs);
        let mut written = req.written.clone();
        written["selection"] = serde_json::json!({ "id": selection, "candidate": i + 1 });
        written["options"] = options_json.clone();
        let one = TrainRequest {
            name: req.name.clone(),
            source,
            target: req.target.clone(),
            key: req.key.clone(),
            features,
            task: req.task,
            options,
            written,
            spec: None,
            lineage: None,
        };
        versions.push(queue_version(&one, Some(selection), Some(&mut snapshots))?);
    }
    let plan = serde_json::to_value(spec.plan(max_epochs)).expect("a plan serialises");
    Spi::connect_mut(|client| -> Result<()> {
        let _owner = identity::become_owner(identity::extension_owner()?);
        client.update(
            "UPDATE cerebro.selections SET plan = $2 WHERE id = $1",
            None,
            &[selection.into(), pgrx::JsonB(plan).into()],
        )?;
        Ok(())
    })?;
    notice!(
        "cerebro: selection {selection} queued {} candidate(s) as versions {} to {} of {}; \
         SELECT * FROM cerebro.leaderboard WHERE selection = {selection} ranks them",
        versions.len(),
        versions.first().copied().unwrap_or(0),
        versions.last().copied().unwrap_or(0),
        req.name
    );
    Ok(())
}
