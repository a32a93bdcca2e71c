//! Meta-features measured in SQL (when a snapshot is frozen, and of a
//! source asked about), and `cerebro.recommend`: the best versions of the
//! archived tasks nearest a source's (`cerebro_shared::meta`).

use cerebro_shared::meta::{self, Archived, MetaFeatures, Recommendation};
use cerebro_shared::request;
use cerebro_shared::spec::{resolve_task, FeatureKind, Task, TaskChoice, TrainOptions};
use cerebro_shared::sql::as_float8;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::JsonB;

use crate::error::{raise, CerebroError, Result};
use crate::gucs;
use crate::sources::resolve_source;

/// A column to measure: how to read it in the query's FROM, and its kind.
pub(crate) struct Measured {
    pub(crate) expr: String,
    pub(crate) kind: FeatureKind,
}

/// The meta-features of the rows of `from` (a FROM item) whose `target`
/// (an expression) is not NULL (and, for a regression, finite), with
/// `features`, for `task`.
pub(crate) fn measure(
    client: &SpiClient<'_>,
    from: &str,
    features: &[Measured],
    target_name: &str,
    target: &str,
    task: Task,
) -> Result<MetaFeatures> {
    // A regression trains on finite targets alone: NaN, ±Infinity and a
    // numeric past float8's range are not rows of its task.
    let labelled = match task {
        Task::Regression => format!("count({})", as_float8(target)),
        _ => format!("count({target})"),
    };
    let mut select = vec![labelled, "count(*)".to_string()];
    select.extend(features.iter().map(|f| format!("count({})", f.expr)));
    let categorical: Vec<&Measured> = features.iter().filter(|f| f.kind == FeatureKind::Categorical).collect();
    select.extend(categorical.iter().map(|f| format!("count(DISTINCT {})", f.expr)));
    let query = format!("SELECT {} FROM {from}", select.join(", "));
    let row = client.select(&query, Some(1), &[])?.first();
    let labelled = row.get::<i64>(1)?.unwrap_or(0);
    let total = row.get::<i64>(2)?.unwrap_or(0);
    let mut present = 0i64;
    for i in 0..features.len() {
        present += row.get::<i64>(3 + i)?.unwrap_or(0);
    }
    let mut distinct = 0i64;
    for i in 0..categorical.len() {
        distinct += row.get::<i64>(3 + features.len() + i)?.unwrap_or(0);
    }
    let cells = (total * features.len() as i64).max(1);
    let (mut classes, mut minority_share, mut target_skew) = (None, None, None);
    if task == Task::Regression {
        let skew = format!(
            "WITH v AS (SELECT {} AS y FROM {from}),
                  m AS (SELECT avg(y) AS a, stddev_pop(y) AS s FROM v)
             SELECT avg(power((y - m.a) / nullif(m.s, 0), 3)) FROM v, m WHERE y IS NOT NULL",
            as_float8(target)
        );
        target_skew = Some(client.select(&skew, Some(1), &[])?.first().get_one::<f64>()?.unwrap_or(0.0));
    } else {
        let counts = format!(
            "SELECT count(*), min(n) FROM (SELECT count(*) AS n FROM {from} WHERE {target} IS NOT NULL GROUP BY {target}) c"
        );
        let (k, rarest) = client.select(&counts, Some(1), &[])?.first().get_two::<i64, i64>()?;
        classes = Some(k.unwrap_or(0) as u32);
        minority_share = Some(rarest.unwrap_or(0) as f64 / labelled.max(1) as f64);
    }
    Ok(MetaFeatures {
        target: target_name.to_owned(),
        task,
        rows: labelled as u64,
        numeric: features.iter().filter(|f| f.kind == FeatureKind::Numeric).count() as u32,
        categorical: categorical.len() as u32,
        null_share: 1.0 - present as f64 / cells as f64,
        mean_cardinality: if categorical.is_empty() { 0.0 } else { distinct as f64 / categorical.len() as f64 },
        classes,
        minority_share,
        target_skew,
    })
}

/// The meta-features of `target` learnt from every other usable column of
/// `source` but its `key`, read as the caller, for the task `choice` makes
/// of it (as an INSERT's `task` does).
fn source_meta(
    client: &SpiClient<'_>,
    source: &str,
    target: &str,
    key: Option<&str>,
    choice: TaskChoice,
) -> Result<MetaFeatures> {
    let source = resolve_source(client, source)?;
    let shape = source.shape();
    let kind = request::target_kind(&shape, target)?;
    if let Some(key) = key {
        shape.column(key)?;
    }
    let (features, _) = request::features(&shape, target, key, None, &TrainOptions::default())?;
    let target_column = source.column(target)?;
    let target_expr = target_column.stored();
    let from = source.in_from();
    let distinct = client
        .select(&format!("SELECT count(DISTINCT {target_expr}) FROM {from}"), Some(1), &[])?
        .first()
        .get_one::<i64>()?
        .unwrap_or(0);
    let task = resolve_task(choice, target, kind, distinct as usize)?;
    let readable: Vec<Measured> = features
        .iter()
        .filter_map(|f| source.column(&f.name).ok().filter(|c| c.readable).map(|c| (f, c)))
        .map(|(f, c)| Measured { expr: c.stored(), kind: f.kind })
        .collect();
    measure(client, &from, &readable, target, &target_expr, task)
}

/// The versions of archived tasks of `task`'s kind the caller may use, with
/// their snapshots' meta-features.
fn archived(client: &SpiClient<'_>, task: Task) -> Result<Vec<Archived>> {
    let (metric, _) = meta::metric_for(task);
    let rows = client.select(
        "SELECT s.id, s.meta, m.name, m.version, (m.metrics->>$1)::float8,
                ARRAY(SELECT f->>'name' FROM jsonb_array_elements(m.features) f), m.options
         FROM cerebro.snapshots s JOIN cerebro.model_versions m ON m.snapshot_id = s.id
         WHERE s.meta IS NOT NULL AND m.status = 'ready' AND m.task = $2 AND m.request->'ensemble' IS NULL",
        None,
        &[metric.into(), task.as_str().into()],
    )?;
    let mut found = Vec::new();
    for row in rows {
        let Some(JsonB(stored)) = row.get::<JsonB>(2)? else { continue };
        // A snapshot measured by another release may not read back: skipped.
        let Ok(meta) = serde_json::from_value::<MetaFeatures>(stored) else { continue };
        found.push(Archived {
            snapshot: row.get::<i64>(1)?.unwrap_or_default(),
            meta,
            model: row.get::<String>(3)?.unwrap_or_default(),
            version: row.get::<i32>(4)?.unwrap_or_default(),
            value: row.get::<f64>(5)?,
            features: row.get::<Vec<Option<String>>>(6)?.unwrap_or_default().into_iter().flatten().collect(),
            options: row.get::<JsonB>(7)?.map(|j| j.0).unwrap_or_default(),
        });
    }
    found.extend(meta::portfolio().into_iter().filter(|p| p.meta.task == task));
    let excluded = gucs::recommend_excluded();
    found.retain(|a| !excluded.contains(&a.model));
    Ok(found)
}

/// How many recommended versions a recommended selection starts from.
const SEEDS: usize = 5;

/// The options of the versions `cerebro.recommend` names first for
/// `source`'s `target` (the task `choice` makes of it): what
/// `spec = 'recommended'` searches around.
pub(crate) fn seeds(
    client: &SpiClient<'_>,
    source: &str,
    target: &str,
    key: Option<&str>,
    choice: TaskChoice,
) -> Result<Vec<serde_json::Value>> {
    let (_, found) = recommended(client, source, target, key, choice, SEEDS)?;
    Ok(found.into_iter().map(|r| r.from.options).collect())
}

/// The task of `source`'s `target` as the caller sees it, and the best
/// archived versions nearest it, at most `k`: what both the function and
/// the recommended selection start from.
fn recommended(
    client: &SpiClient<'_>,
    source: &str,
    target: &str,
    key: Option<&str>,
    choice: TaskChoice,
    k: usize,
) -> Result<(Task, Vec<Recommendation>)> {
    let task = source_meta(client, source, target, key, choice)?;
    let found = meta::recommend(&task, archived(client, task.task)?, k);
    Ok((task.task, found))
}

type Recommended = (i32, String, i32, f64, String, Option<f64>, Vec<String>, JsonB, String);

fn try_recommend(
    source: Option<&str>,
    target: Option<&str>,
    k: Option<i32>,
    key: Option<&str>,
) -> Result<Vec<Recommended>> {
    let source = source.ok_or(CerebroError::NullArgument("source"))?;
    let target = target.ok_or(CerebroError::NullArgument("target"))?;
    let k = k.ok_or(CerebroError::NullArgument("k"))?;
    if k < 1 {
        return Err(CerebroError::RecommendCount(k));
    }
    Spi::connect(|client| {
        let (task, found) = recommended(client, source, target, key, TaskChoice::Auto, k as usize)?;
        let (metric, _) = meta::metric_for(task);
        Ok(found
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                let m = &r.from.meta;
                let value = r.from.value.map_or("none".into(), |v| format!("{v:.4}"));
                let whose = match r.from.model.strip_prefix(meta::BUILT_IN) {
                    Some(task) => format!("built in, the best candidate of the accuracy benchmark's{task} task"),
                    None => format!("\"{}\" version {}", r.from.model, r.from.version),
                };
                let why = format!(
                    "{whose}: validation {metric} {value} on {} rows of {} numeric and {} categorical \
                     columns ({} {}), meta-feature distance {:.2}",
                    m.rows,
                    m.numeric,
                    m.categorical,
                    m.task.as_str(),
                    m.target,
                    r.distance
                );
                (
                    i as i32 + 1,
                    r.from.model,
                    r.from.version,
                    r.distance,
                    metric.to_owned(),
                    r.from.value,
                    r.from.features,
                    JsonB(r.from.options),
                    why,
                )
            })
            .collect())
    })
}

/// The best versions of the archived tasks nearest `source`'s `target` by
/// their meta-features, nearest first: what to try on it, and why. `key`,
/// as in an INSERT, is not a feature.
#[pg_extern(sql = false)]
#[allow(clippy::type_complexity)]
fn recommend(
    source: Option<&str>,
    target: Option<&str>,
    k: Option<i32>,
    key: Option<&str>,
) -> TableIterator<
    'static,
    (
        name!(rank, i32),
        name!(model, String),
        name!(version, i32),
        name!(distance, f64),
        name!(metric, String),
        name!(value, Option<f64>),
        name!(features, Vec<String>),
        name!(options, JsonB),
        name!(why, String),
    ),
> {
    TableIterator::new(try_recommend(source, target, k, key).unwrap_or_else(|e| raise(e)))
}
