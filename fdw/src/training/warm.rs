//! Warm starts from the archive (`warm_start = true`, docs/selection.md,
//! "Warm starts from the archive"): the ready version of the same model a
//! new version continues from, when their options differ only in
//! parameter tuning. cerebrod copies the weights, as for a derived model.

use std::collections::HashMap;

use cerebro_shared::request;
use cerebro_shared::spec::TrainOptions;
use pgrx::prelude::*;
use pgrx::JsonB;

use crate::access;
use crate::error::{CerebroError, Result};
use crate::models::TrainRequest;
use crate::sources::read_shape;

/// A ready version a warm-started candidate may continue from.
struct ArchivedVersion {
    version: i32,
    /// Resolved, as `model_versions.source_relation` stores it.
    source: String,
    target: String,
    /// Sorted.
    features: Vec<String>,
    options: TrainOptions,
}

/// The archived versions a warm-started candidate may continue from, read
/// once per INSERT.
#[derive(Default)]
pub(super) struct WarmStarts {
    /// Ready versions of the model (not ensembles), best first by the
    /// leaderboard's order.
    archived: Option<Vec<ArchivedVersion>>,
    /// Resolved source and default features of each source named.
    sources: HashMap<String, (String, Vec<String>)>,
    pub(super) asked: usize,
    pub(super) found: usize,
}

impl WarmStarts {
    /// The best archived version of `req`'s model on the same source and
    /// target, with the same features, whose options differ from `options`
    /// only in parameter tuning (`TrainOptions::differs_only_in_tuning`).
    pub(super) fn parent(
        &mut self,
        req: &TrainRequest,
        source: &str,
        features: Option<&[String]>,
        options: &TrainOptions,
    ) -> Result<Option<i32>> {
        self.asked += 1;
        if self.archived.is_none() {
            self.archived = Some(archived_versions(&req.name)?);
        }
        if !self.sources.contains_key(source) {
            let resolved = Spi::connect(|client| -> Result<(String, Vec<String>)> {
                let shape = read_shape(client, source, &[])?;
                let (all, _) =
                    request::features(&shape, &req.target, req.key.as_deref(), None, &TrainOptions::default())?;
                Ok((shape.relation.clone(), all.into_iter().map(|f| f.name).collect()))
            })?;
            self.sources.insert(source.to_owned(), resolved);
        }
        let (relation, every) = &self.sources[source];
        let mut wanted: Vec<String> = features.map_or_else(|| every.clone(), <[String]>::to_vec);
        wanted.sort();
        let found = self.archived.iter().flatten().find(|a| {
            a.source == *relation
                && a.target == req.target
                && a.features == wanted
                && options.differs_only_in_tuning(&a.options)
        });
        self.found += usize::from(found.is_some());
        Ok(found.map(|a| a.version))
    }
}

/// `name`'s ready versions that are not ensembles, best first (the
/// leaderboard's order), as [`WarmStarts::archived`] holds them; none for
/// a model the caller may not use, or one that does not exist yet.
fn archived_versions(name: &str) -> Result<Vec<ArchivedVersion>> {
    let read = || {
        Spi::connect(|client| {
            let rows = client.select(
                "SELECT version, source_relation, target_column,
                        ARRAY(SELECT f->>'name' FROM jsonb_array_elements(features) f), options
                 FROM cerebro.model_versions
                 WHERE name = $1 AND status = 'ready' AND target_column IS NOT NULL AND NOT request ? 'ensemble'
                 ORDER BY CASE task WHEN 'binary' THEN -(metrics->>'auc')::float8
                                    WHEN 'multiclass' THEN -(metrics->>'accuracy')::float8
                                    ELSE (metrics->>'rmse')::float8 END NULLS LAST, version DESC",
                None,
                &[name.into()],
            )?;
            let mut out = Vec::new();
            for row in rows {
                let stored = row.get::<JsonB>(5)?.map(|j| j.0).unwrap_or_default();
                // Options another release stored and this one cannot read are skipped.
                let Ok(options) = serde_json::from_value::<TrainOptions>(stored) else { continue };
                // Sorted here, not in SQL, whose order follows the database's collation.
                let mut features: Vec<String> =
                    row.get::<Vec<Option<String>>>(4)?.unwrap_or_default().into_iter().flatten().collect();
                features.sort();
                out.push(ArchivedVersion {
                    version: row.get::<i32>(1)?.unwrap_or_default(),
                    source: row.get::<String>(2)?.unwrap_or_default(),
                    target: row.get::<String>(3)?.unwrap_or_default(),
                    features,
                    options,
                });
            }
            Ok(out)
        })
    };
    match access::as_user_of(name, read) {
        Err(CerebroError::ModelNotFound(_)) => Ok(Vec::new()),
        found => found,
    }
}
