//! A selection's request: the spec (docs/selection.md) parsed and expanded,
//! each candidate a version with its own source, features and options.

use std::collections::{BTreeMap, HashMap};

use cerebro_shared::joins::{self, JoinPlan};
use cerebro_shared::mst::{self, Candidate, ClassBalance, Selection, SelectionPlan, SourceFacts, Value};
use cerebro_shared::request::{self, merge_options, SourceShape};
use cerebro_shared::spec::{resolve_task, ColumnEncoding, Split, SqlKind, Task, TrainOptions};
use cerebro_shared::sql::quote_ident;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use super::derived::Parent;
use super::warm::WarmStarts;
use super::{Batch, NewSelection, VersionRequest};
use crate::error::{CerebroError, Result};
use crate::gucs;
use crate::models::{Lineage, TrainRequest};
use crate::recommend;
use crate::sources::{check_own_source, read_shape, resolve_source, BaseType, Source, SourceColumn};

/// The candidates of the selection `written` declares, as versions of `req`'s
/// model; with `parent`, on that version's frozen snapshot: its source,
/// target and key, its features unless the spec picks others, its options
/// under the INSERT's and the spec's.
pub(super) fn build(req: &TrainRequest, written: &str, parent: Option<&Parent>) -> Result<Batch> {
    let on_parent;
    let req = match parent {
        Some(parent) => {
            if !req.source.is_empty() {
                return Err(CerebroError::OnSnapshot { version: parent.version, what: "a source" });
            }
            if !req.target.is_empty() && req.target != parent.target {
                return Err(CerebroError::OnSnapshot { version: parent.version, what: "another target" });
            }
            // Its rows are the parent's; its source is read only for its
            // shape, as the caller, who must not run another role's code.
            Spi::connect(|client| check_own_source(client, &req.name, &parent.source, &parent.source_author))?;
            let mut options = parent.options.clone();
            if let (Some(inherited), Some(written)) = (options.as_object_mut(), req.written["options"].as_object()) {
                inherited.extend(written.clone());
            }
            let mut inherited = req.clone();
            inherited.source = parent.source.clone();
            inherited.target = parent.target.clone();
            inherited.key = req.key.clone().or(parent.key.clone());
            inherited.features = req.features.clone().or(Some(parent.features.clone()));
            inherited.written["options"] = options;
            on_parent = inherited;
            &on_parent
        }
        None => req,
    };
    let based = mst::split_base(written);
    let searched = match &based {
        Some((mst::Base::Default, _)) => Some(mst::default_for(&Spi::connect(|client| source_facts(client, req))?)),
        Some((mst::Base::Recommended, _)) => Some(Spi::connect(|client| -> Result<String> {
            let facts = source_facts(client, req)?;
            let seeds = recommend::seeds(client, &req.source, &req.target, req.key.as_deref(), req.task)?;
            Ok(match mst::recommended_for(&seeds, &facts) {
                Some(text) => {
                    notice!(
                        "cerebro: the selection searches around {} version(s) cerebro.recommend names",
                        seeds.len()
                    );
                    text
                }
                None => {
                    notice!("cerebro: the archive holds no task of this kind yet; the selection is the default");
                    mst::default_for(&facts)
                }
            })
        })?),
        None => None,
    };
    // The user's clauses after the word change what it stands for.
    let mut searched = match (searched, &based) {
        (Some(base), Some((_, clauses))) => Some(mst::with_clauses(&base, clauses).map_err(CerebroError::Selection)?),
        (searched, _) => searched,
    };
    let mut found_joins = None;
    let spec = mst::parse(searched.as_deref().unwrap_or(written)).map_err(CerebroError::Selection)?;
    if searched.is_none() {
        spec.check_written(written).map_err(CerebroError::Selection)?;
    }
    if let Some(auto) = &spec.joins {
        if let Some(parent) = parent {
            return Err(CerebroError::OnSnapshot { version: parent.version, what: "joins(auto)" });
        }
        let text = searched.as_deref().unwrap_or(written);
        let (rewritten, plan) = Spi::connect(|client| with_joins(client, req, text, &spec, auto.hops))?;
        searched = Some(rewritten);
        found_joins = Some(plan);
    }
    let text = searched.as_deref().unwrap_or(written);
    let spec = mst::parse(text).map_err(CerebroError::Selection)?;
    let limit = gucs::MAX_CANDIDATES.get().max(1) as u128;
    let total = spec.candidates(text).map_err(CerebroError::Selection)?;
    if total > limit {
        return Err(CerebroError::TooManyCandidates { total, limit });
    }
    let candidates = spec.expand(text, limit).map_err(CerebroError::Selection)?;
    let base: serde_json::Map<String, serde_json::Value> =
        req.written["options"].as_object().cloned().unwrap_or_default();

    if let (Some(parent), true) = (parent, candidates.iter().any(|c| c.source.is_some())) {
        return Err(CerebroError::OnSnapshot { version: parent.version, what: "a source" });
    }
    let source_of = |c: &Candidate| match &c.source {
        None => req.source.clone(),
        Some(Value::Word(w) | Value::Text(w)) => w.clone(),
        Some(Value::Query(q)) => format!("({q})"),
        Some(_) => unreachable!("the parser accepts only names and queries as sources"),
    };
    // Each source is read once, with the tables its candidates name whole.
    let mut shapes: HashMap<String, SourceShape> = HashMap::new();
    let mut warm = WarmStarts::default();
    let mut versions = Vec::with_capacity(candidates.len());
    let mut max_epochs = 0;
    for (i, candidate) in candidates.iter().enumerate() {
        let source = source_of(candidate);
        let features = if spec.features.is_empty() {
            req.features.clone()
        } else {
            if !shapes.contains_key(&source) {
                let named = candidates.iter().filter(|c| source_of(c) == source).flat_map(|c| &c.features);
                let tables = request::tables_to_read(named, &source);
                let shape = Spi::connect(|client| read_shape(client, &source, &tables))?;
                shapes.insert(source.clone(), shape);
            }
            let shape = &shapes[&source];
            Some(request::candidate_features(&candidate.features, shape, &req.target, req.key.as_deref())?)
        };
        let mut options = base.clone();
        merge_options(&mut options, &candidate.options);
        let options_json = serde_json::Value::Object(options);
        let options = TrainOptions::from_json(Some(&options_json))?;
        max_epochs = max_epochs.max(options.epochs);
        let mut written = req.written.clone();
        written["options"] = options_json;
        let lineage = if options.warm_start {
            warm.parent(req, &source, features.as_deref(), &options)?
                .map(|version| Lineage { parent_version: Some(version), change: None })
        } else {
            None
        };
        versions.push(VersionRequest {
            name: req.name.clone(),
            source,
            target: req.target.clone(),
            key: req.key.clone(),
            features,
            task: req.task,
            options,
            written,
            lineage,
            source_author: parent.map(|p| p.source_author.clone()),
            candidate: Some(i + 1),
        });
    }
    if warm.asked > 0 {
        notice!(
            "cerebro: warm_start: {} of {} candidate(s) continue from an archived version of \"{}\" that differs \
             only in parameter tuning; the others start afresh",
            warm.found,
            warm.asked,
            req.name
        );
    }
    let plan = SelectionPlan {
        // `default` alone reads back as the default; any other text that
        // came to the same (`default` + `ensemble`) is kept, as later rounds
        // read it.
        searched: searched.filter(|t| !(t == mst::DEFAULT_SPEC && mst::is_default(written))),
        joins: found_joins,
        ..spec.plan(max_epochs)
    };
    Ok(Batch {
        selection: Some(NewSelection { spec: written.to_owned(), plan }),
        versions,
        on_snapshot: parent.map(|p| (p.snapshot_id, p.version)),
    })
}

/// `text` with `features joins(auto)` replaced by the joins the source
/// table's foreign keys lead to (less those pruned), and what was found.
fn with_joins(
    client: &SpiClient<'_>,
    req: &TrainRequest,
    text: &str,
    spec: &mst::Spec,
    hops: u32,
) -> Result<(String, JoinPlan)> {
    let source = match &spec.source {
        Some((Value::Word(w) | Value::Text(w), _)) => w.clone(),
        _ => req.source.clone(),
    };
    let written = &req.written["options"];
    let options = TrainOptions::from_json(written.is_object().then_some(written))?;
    // A column encoded as a category (an integer key, `encode plot_id =
    // category`, or the options' `encodings`) is one for the rule too.
    let categories: Vec<String> = spec
        .categorical_encodings()
        .into_iter()
        .chain(options.encodings.iter().filter(|(_, e)| !e.is_numeric()).map(|(c, _)| c.clone()))
        .collect();
    let (schema, shape) = crate::joins::read(client, &source, hops, &categories)?;
    // The pruning rule asks whether a key is a feature of every candidate:
    // what the non-optional selections pick (everything, with none).
    let every: Vec<Selection> = if spec.features.iter().any(|s| !s.exclude && !s.optional) {
        spec.features.iter().filter(|s| !s.optional).cloned().collect()
    } else {
        let all = Selection { exclude: false, table: None, columns: None, optional: false, span: 0..0 };
        std::iter::once(all).chain(spec.features.iter().filter(|s| !s.optional).cloned()).collect()
    };
    let features = request::candidate_features(&every, &shape, &req.target, req.key.as_deref())?;
    let plan = joins::plan(&schema, hops, &features, options.max_categories)?;
    crate::joins::announce(&plan);
    let rewritten = mst::with_joins(text, spec, &plan.query, &plan.features_text());
    Ok((rewritten, plan))
}

/// What the default selection reads of `req`'s source before it searches:
/// nothing when the source cannot be resolved (queueing says why,
/// precisely).
fn source_facts(client: &SpiClient<'_>, req: &TrainRequest) -> Result<SourceFacts> {
    let Ok(source) = resolve_source(client, &req.source) else { return Ok(SourceFacts::default()) };
    let options = &req.written["options"];
    // The options as written (defaults where they are silent; none when
    // they do not read, which queueing refuses, precisely).
    let written = TrainOptions::from_json(Some(options)).ok();
    let ordered = written.as_ref().is_some_and(|o| o.split == Split::Ordered);
    let encoded = written.map(|o| o.encodings).unwrap_or_default();
    let (balance, task, rows) = target_facts(client, req, &source)?;
    let trend_columns = if ordered { trend_columns(client, req, &source)? } else { Vec::new() };
    let identifier_columns = identifier_columns(client, req, &source, &trend_columns, &encoded)?;
    let share_given = options.get("validation_fraction").is_some();
    let ordered_rows = rows.filter(|_| ordered && !share_given);
    Ok(SourceFacts { balance, trend_columns, task, identifier_columns, ordered_rows })
}

/// The integer features of `req`'s source that name groups of rows
/// (`mst::names_an_identifier`, `mst::repeats_as_a_group`), in source
/// order: not time-index columns, not columns the request's `encodings`
/// already encode. One scan counts every candidate's distinct values.
fn identifier_columns(
    client: &SpiClient<'_>,
    req: &TrainRequest,
    source: &Source,
    trends: &[String],
    written: &BTreeMap<String, ColumnEncoding>,
) -> Result<Vec<String>> {
    let listed = |name: &String| req.features.as_ref().is_none_or(|f| f.contains(name));
    let named: Vec<&SourceColumn> = source
        .columns
        .iter()
        .filter(|c| c.readable && c.kind == Some(SqlKind::Integer) && mst::names_an_identifier(&c.name))
        .filter(|c| c.name != req.target && Some(&c.name) != req.key.as_ref() && listed(&c.name))
        .filter(|c| !trends.contains(&c.name) && !written.contains_key(&c.name))
        .take(2 * mst::MAX_IDENTIFIER_COLUMNS)
        .collect();
    if named.is_empty() {
        return Ok(Vec::new());
    }
    let distinct = named.iter().map(|c| format!("pg_catalog.count(DISTINCT {})", c.stored())).collect::<Vec<_>>();
    let row = client
        .select(
            &format!("SELECT pg_catalog.count(*), {} FROM {}", distinct.join(", "), source.in_from()),
            Some(1),
            &[],
        )?
        .first();
    let rows = row.get::<i64>(1)?.unwrap_or(0).max(0) as u64;
    let mut identifiers = Vec::new();
    for (i, c) in named.iter().enumerate() {
        let values = row.get::<i64>(i + 2)?.unwrap_or(0).max(0) as u64;
        if mst::repeats_as_a_group(values, rows) {
            identifiers.push(c.name.clone());
        }
    }
    Ok(identifiers)
}

/// Most numeric columns whose correlation with the key order is measured
/// (one aggregate each, in one scan).
const MAX_TREND_SCAN: usize = 256;

/// The numeric columns of `req`'s source that follow its key order
/// (mst::TREND_CORRELATION), the most correlated first, for an ordered
/// split: only for a model whose features the user left to Cerebro, and
/// none when the key cannot be read (queueing says why).
fn trend_columns(client: &SpiClient<'_>, req: &TrainRequest, source: &Source) -> Result<Vec<String>> {
    let (None, Some(key)) = (&req.features, req.key.as_deref()) else { return Ok(Vec::new()) };
    // A key of a built-in type without an order (json, point) orders nothing.
    let orderable = |k: &&SourceColumn| k.readable && (!matches!(k.base, BaseType::BuiltIn { .. }) || k.base.ordered());
    let Some(key) = source.column(key).ok().filter(orderable) else { return Ok(Vec::new()) };
    let numeric: Vec<_> = source
        .columns
        .iter()
        .filter(|c| c.readable && c.name != req.target && c.name != key.name)
        .filter(|c| matches!(c.kind, Some(SqlKind::Integer | SqlKind::Real)))
        .take(MAX_TREND_SCAN)
        .collect();
    if numeric.is_empty() {
        return Ok(Vec::new());
    }
    let correlations = (0..numeric.len()).map(|i| format!("pg_catalog.corr(v{i}, r)")).collect::<Vec<_>>().join(", ");
    let columns = numeric.iter().enumerate().map(|(i, c)| format!("{} AS v{i}", c.float8())).collect::<Vec<_>>();
    let columns = columns.join(", ");
    let row = client
        .select(
            &format!(
                "SELECT {correlations} FROM (SELECT {columns}, pg_catalog.row_number() OVER (ORDER BY {})::float8 AS r
                 FROM {}) ordered",
                key.stored(),
                source.in_from()
            ),
            Some(1),
            &[],
        )?
        .first();
    let mut trends = Vec::new();
    for (i, c) in numeric.iter().enumerate() {
        if let Some(r) = row.get::<f64>(i + 1)?.map(f64::abs).filter(|r| *r >= mst::TREND_CORRELATION) {
            trends.push((r, c.name.clone()));
        }
    }
    trends.sort_by(|a, b| b.0.total_cmp(&a.0));
    Ok(trends.into_iter().map(|(_, name)| name).collect())
}

/// How `req`'s target spreads over its classes, when it makes a
/// classification (None for a regression), the task it makes, and how many
/// rows have a target; none of them when the target cannot be read
/// (queueing says why, precisely). Read as the user, like everything a
/// selection reads of its source.
fn target_facts(
    client: &SpiClient<'_>,
    req: &TrainRequest,
    source: &Source,
) -> Result<(Option<ClassBalance>, Option<Task>, Option<u64>)> {
    let readable = source.column(&req.target).is_ok_and(|c| c.readable);
    let Ok(kind) = request::target_kind(&source.shape(), &req.target) else { return Ok((None, None, None)) };
    if !readable {
        return Ok((None, None, None));
    }
    let target = quote_ident(&req.target);
    let row = client
        .select(
            &format!(
                "SELECT min(n), min(n)::float8 / nullif(sum(n), 0)::float8, count(*), sum(n)::int8
                 FROM (SELECT count(*) AS n FROM {} WHERE {target} IS NOT NULL GROUP BY {target}) classes",
                source.in_from()
            ),
            Some(1),
            &[],
        )?
        .first();
    let (rarest, share, classes) = (row.get::<i64>(1)?, row.get::<f64>(2)?, row.get::<i64>(3)?.unwrap_or(0));
    let rows = row.get::<i64>(4)?.map(|n| n.max(0) as u64);
    let Ok(task) = resolve_task(req.task, &req.target, kind, classes as usize) else { return Ok((None, None, rows)) };
    let (Some(rarest), Some(share)) = (rarest, share) else { return Ok((None, Some(task), rows)) };
    let balance = ClassBalance { rarest_rows: rarest.max(0) as u64, rarest_share: share };
    Ok((task.is_classification().then_some(balance), Some(task), rows))
}
