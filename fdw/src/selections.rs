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
use crate::models::{queue_version, TrainRequest};
use crate::sources::{resolve_source, source_query};

/// The usable columns of `source`: (name, of a type Cerebro can use).
pub(crate) fn source_columns(source: &str) -> Result<Vec<(String, bool)>> {
    Spi::connect(|client| {
        let resolved = resolve_source(client, source)?;
        Ok(resolved.columns.iter().map(|c| (c.name.clone(), c.kind.is_some())).collect())
    })
}

/// The columns one selection names: its own list, or for `*` and `t.*`
/// every usable column of `source` but the target and key.
pub(crate) fn selected_columns(
    s: &Selection,
    source: &str,
    columns: &[(String, bool)],
    target: &str,
    key: Option<&str>,
) -> Result<Vec<String>> {
    let short = |name: &str| name.rsplit('.').next().unwrap_or(name).trim_matches('"').to_string();
    if let Some(table) = &s.table {
        if source_query(source).is_some() {
            // A table the query reads: `t.*` is every column of t that the
            // query returns under the same name.
            if s.columns.is_none() {
                let of_table = source_columns(table)?;
                return Ok(columns
                    .iter()
                    .filter(|(c, usable)| {
                        *usable && c != target && Some(c.as_str()) != key && of_table.iter().any(|(t, _)| t == c)
                    })
                    .map(|(c, _)| c.clone())
                    .collect());
            }
        } else if short(table) != short(source) {
            return Err(CerebroError::SelectionTable { table: table.clone(), relation: source.to_string() });
        }
    }
    Ok(match &s.columns {
        Some(names) => names.clone(),
        None => columns
            .iter()
            .filter(|(c, usable)| *usable && c != target && Some(c.as_str()) != key)
            .map(|(c, _)| c.clone())
            .collect(),
    })
}

/// `options` with `set` applied: `encodings` merge column by column, any
/// other key is replaced.
pub(crate) fn merge_options(
    options: &mut serde_json::Map<String, serde_json::Value>,
    set: &serde_json::Map<String, serde_json::Value>,
) {
    for (key, value) in set {
        match (key.as_str(), options.get_mut("encodings").and_then(|e| e.as_object_mut()), value.as_object()) {
            ("encodings", Some(existing), Some(more)) => existing.extend(more.clone()),
            _ => {
                options.insert(key.clone(), value.clone());
            }
        }
    }
}

/// The feature columns a candidate's selections pick from `source`.
fn pick_features(
    selections: &[Selection],
    source: &str,
    columns: &[(String, bool)],
    req: &TrainRequest,
) -> Result<Vec<String>> {
    let columns_of = |s: &Selection| selected_columns(s, source, columns, &req.target, req.key.as_deref());
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
        let _owner = identity::become_owner()?;
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
            Some(Value::Query(q)) => format!("({q})"),
            Some(_) => unreachable!("the parser accepts only names and queries as sources"),
        };
        let features = if spec.features.is_empty() {
            req.features.clone()
        } else {
            let columns = source_columns(&source)?;
            Some(pick_features(&candidate.features, &source, &columns, &req)?)
        };
        let mut options = base.clone();
        merge_options(&mut options, &candidate.options);
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
            source_author: None,
        };
        versions.push(queue_version(&one, Some(selection), Some(&mut snapshots))?);
    }
    let plan = serde_json::to_value(spec.plan(max_epochs)).expect("a plan serialises");
    Spi::connect_mut(|client| -> Result<()> {
        let _owner = identity::become_owner()?;
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
