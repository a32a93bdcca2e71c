//! Queues the versions a builder asked for, each in stages: resolve its
//! source and features, freeze its training data, read its labels, check it
//! against options and limits, record it and wake cerebrod.
//!
//! A selection's candidates on one source share one snapshot, of every
//! readable column they could use; a plain INSERT freezes what it uses.

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use cerebro_shared::request::{self, Column};
use cerebro_shared::spec::{resolve_task, Feature, SpecError, Split, SqlKind, Task};
use cerebro_shared::sql::{quote_ident, snapshot_column};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::JsonB;

use super::{Batch, NewSelection, VersionRequest};
use crate::catalog::{audit, current_user, enqueue, next_version, Audit};
use crate::error::{CerebroError, Result};
use crate::identity;
use crate::recommend::{measure, Measured};
use crate::sources::{resolve_source, Source, SourceColumn};

/// Queues every version of `batch` (and records its selection, if any);
/// returns the first version queued (a selection's first candidate).
pub(super) fn queue(batch: Batch) -> Result<Option<i32>> {
    let Batch { selection, versions, on_snapshot } = batch;
    LEFT_OUT_TOLD.with(|told| told.borrow_mut().clear());
    let Some(new_selection) = selection else {
        let mut first = None;
        for version in &versions {
            let number = queue_version(version, None, None, None, &mut KnownTargets::new())?;
            first.get_or_insert(number);
        }
        return Ok(first);
    };
    let name = versions.first().map(|v| v.name.clone()).unwrap_or_default();
    let mut snapshots = SharedSnapshots::new();
    let mut known = KnownTargets::new();
    let fixed = on_snapshot.map(|(snapshot, parent)| frozen_snapshot(&name, snapshot, parent)).transpose()?;
    let selection = record_selection(&name, &new_selection, versions.len())?;
    let mut numbers = Vec::with_capacity(versions.len());
    for mut version in versions {
        if let Some(candidate) = version.candidate {
            version.written["selection"] = serde_json::json!({ "id": selection, "candidate": candidate });
        }
        numbers.push(queue_version(&version, Some(selection), Some(&mut snapshots), fixed.as_ref(), &mut known)?);
    }
    notice!(
        "cerebro: selection {selection} queued {} candidate(s) as versions {} to {} of {name}; \
         SELECT * FROM cerebro.leaderboard WHERE selection = {selection} ranks them",
        numbers.len(),
        numbers.first().copied().unwrap_or(0),
        numbers.last().copied().unwrap_or(0),
    );
    Ok(numbers.first().copied())
}

/// The row of `cerebro.selections` its candidates point to; returns its id.
fn record_selection(name: &str, selection: &NewSelection, candidates: usize) -> Result<i64> {
    let plan = serde_json::to_value(&selection.plan).expect("a plan serialises");
    Spi::connect_mut(|client| {
        let user = current_user(client)?;
        let _owner = identity::become_owner()?;
        let id: i64 = client
            .update(
                "INSERT INTO cerebro.selections (name, spec, candidates, created_by, plan)
                 VALUES ($1, $2, $3, $4, $5) RETURNING id",
                Some(1),
                &[
                    name.into(),
                    selection.spec.as_str().into(),
                    (candidates as i32).into(),
                    user.as_str().into(),
                    JsonB(plan).into(),
                ],
            )?
            .first()
            .get_one()?
            .expect("RETURNING id");
        Ok(id)
    })
}

/// Version `parent`'s snapshot `id`, for a selection on it.
fn frozen_snapshot(name: &str, id: i64, parent: i32) -> Result<Frozen> {
    Spi::connect(|client| {
        let _owner = identity::become_owner()?;
        let row = client
            .select(
                "SELECT data_relation, row_count, columns FROM cerebro.snapshots
                 WHERE id = $1 AND pg_catalog.to_regclass(data_relation) IS NOT NULL",
                Some(1),
                &[id.into()],
            )?
            .first();
        let (Some(data_relation), Some(row_count), Some(columns)) =
            (row.get::<String>(1)?, row.get::<i64>(2)?, row.get::<Vec<String>>(3)?)
        else {
            return Err(CerebroError::SnapshotGone { name: name.into(), version: parent, to: "train a selection on" });
        };
        Ok(Frozen { id, data_relation, row_count, columns, query: None, of_version: Some(parent) })
    })
}

/// A snapshot frozen for the candidates of one selection on one source.
#[derive(Clone)]
struct Frozen {
    id: i64,
    data_relation: String,
    row_count: i64,
    /// The source column each snapshot column holds, in order.
    columns: Vec<String>,
    /// The copy that filled it; None when it was frozen for an earlier candidate.
    query: Option<String>,
    /// The version it was frozen for, when a selection trains on that
    /// version's snapshot: it holds only the columns frozen then.
    of_version: Option<i32>,
}

/// Snapshots shared by a selection's candidates, by source.
type SharedSnapshots = HashMap<String, Frozen>;

/// A version's source and what it reads of it.
struct Resolved {
    source: Source,
    target_kind: SqlKind,
    features: Vec<Feature>,
    /// Target, key and features: what the version reads.
    used: Vec<String>,
}

/// What the frozen rows say of the target.
struct Labels {
    /// Rows with a target.
    labelled: i64,
    task: Task,
    /// Classification: the distinct targets in sort order.
    class_labels: Vec<String>,
}

/// Queues one version (a candidate of `selection`, if any); returns its number.
/// With `fixed`, it reads that snapshot (a selection on a version's).
fn queue_version(
    v: &VersionRequest,
    selection: Option<i64>,
    shared: Option<&mut SharedSnapshots>,
    fixed: Option<&Frozen>,
    known: &mut KnownTargets,
) -> Result<i32> {
    Spi::connect_mut(|client| {
        let resolved = resolve(client, v)?;
        let user = current_user(client)?;
        let caller = identity::current_role();
        let reused = fixed.cloned().or_else(|| shared.as_ref().and_then(|m| m.get(&resolved.source.display).cloned()));
        // Column i of the snapshot holds frozen[i]: what this version reads,
        // and for a selection every other readable column of a usable type.
        let mut frozen: Vec<&SourceColumn> =
            resolved.used.iter().map(|c| resolved.source.column(c)).collect::<Result<_>>()?;
        if shared.is_some() {
            for c in &resolved.source.columns {
                if c.readable && c.kind.is_some() && !frozen.iter().any(|f| f.name == c.name) {
                    frozen.push(c);
                }
            }
        }
        let version = {
            let _owner = identity::become_owner()?;
            next_version(client, &v.name, caller)?
        };
        let snapshot = match reused {
            Some(f) => f,
            None => freeze(client, &resolved.source, &frozen, &user)?,
        };
        if let (Some(parent), Some(missing)) =
            (snapshot.of_version, resolved.used.iter().find(|c| !snapshot.columns.contains(c)))
        {
            return Err(CerebroError::NotInSnapshot { column: missing.clone(), name: v.name.clone(), version: parent });
        }
        let labels = read_labels(client, v, &resolved, &snapshot, known)?;
        v.options.check_against(&resolved.features, labels.task, &labels.class_labels)?;
        crate::limits::check_model(
            &v.options,
            &resolved.features,
            labels.task,
            labels.class_labels.len(),
            labels.labelled as u64,
        )?;
        crate::limits::check_role_share(client, &user)?;
        record(client, v, &resolved, &snapshot, &labels, version, selection, &user)?;
        if snapshot.query.is_some() {
            store_meta(client, v, &resolved, &snapshot, labels.task)?;
        }
        if let (Some(map), Some(_)) = (shared, &snapshot.query) {
            map.insert(resolved.source.display.clone(), Frozen { query: None, ..snapshot });
        }
        Ok(version)
    })
}

thread_local! {
    /// The columns of a source this batch has already said it leaves out
    /// for their type: a selection says so once, not once a candidate.
    static LEFT_OUT_TOLD: std::cell::RefCell<std::collections::BTreeSet<(String, String)>> =
        const { std::cell::RefCell::new(std::collections::BTreeSet::new()) };
}

/// Resolves the version's source as the user, and checks the target, key
/// and features against it and their privileges.
fn resolve(client: &SpiClient<'_>, v: &VersionRequest) -> Result<Resolved> {
    let source = resolve_source(client, &v.source)?;
    let shape = source.shape();
    let target_kind = request::target_kind(&shape, &v.target)?;
    let key = v.key.as_deref().map(|k| shape.column(k)).transpose()?;
    if v.options.split == Split::Ordered && key.is_none() {
        return Err(CerebroError::OrderedSplitNeedsKey);
    }
    let (features, unusable) =
        request::features(&shape, &v.target, v.key.as_deref(), v.features.as_deref(), &v.options)?;
    for Column { name, type_name, .. } in unusable {
        let first = LEFT_OUT_TOLD.with(|told| told.borrow_mut().insert((source.display.clone(), name.clone())));
        if first {
            notice!("cerebro: column \"{name}\" ({type_name}) is not used as a feature: its type is not supported");
        }
    }
    // Privileges are checked up front so the error names every column; the
    // snapshot query runs as the user anyway, with RLS applied.
    let mut used: Vec<String> = vec![v.target.clone()];
    used.extend(v.key.clone());
    used.extend(features.iter().map(|f| f.name.clone()));
    let denied: Vec<String> =
        used.iter().filter(|c| !source.column(c).map(|c| c.readable).unwrap_or(false)).cloned().collect();
    if !denied.is_empty() {
        return Err(CerebroError::PermissionDenied { relation: source.display.clone(), columns: denied });
    }
    Ok(Resolved { source, target_kind, features, used })
}

/// Creates a snapshot table and copies `columns` of the source into it as
/// `user`, whose privileges and row-level security decide which rows a
/// model may learn from. Each column is converted to a built-in type as the
/// user (who may run their own casts): the owner and cerebrod then only
/// ever read built-in types.
fn freeze(client: &mut SpiClient<'_>, source: &Source, columns: &[&SourceColumn], user: &str) -> Result<Frozen> {
    let (id, data_relation) = {
        let _owner = identity::become_owner()?;
        let id: i64 = client
            .update("SELECT nextval('cerebro.snapshots_id_seq')", Some(1), &[])?
            .first()
            .get_one()?
            .expect("nextval is never NULL");
        let data_relation = format!("cerebro_data.snapshot_{id}");
        let definition = columns
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{} {}", snapshot_column(i), c.storage()))
            .collect::<Vec<_>>()
            .join(", ");
        client.update(&format!("CREATE TABLE {data_relation} ({definition})"), None, &[])?;
        client.update(&format!("GRANT INSERT ON {data_relation} TO {}", quote_ident(user)), None, &[])?;
        (id, data_relation)
    };
    let targets = (0..columns.len()).map(snapshot_column).collect::<Vec<_>>().join(", ");
    let values = columns.iter().map(|c| c.stored()).collect::<Vec<_>>().join(", ");
    let query = format!("INSERT INTO {data_relation} ({targets}) SELECT {values} FROM {}", source.in_from());
    let row_count = client.update(&query, None, &[])?.len() as i64;
    let _owner = identity::become_owner()?;
    client.update(&format!("REVOKE INSERT ON {data_relation} FROM {}", quote_ident(user)), None, &[])?;
    Ok(Frozen {
        id,
        data_relation,
        row_count,
        columns: columns.iter().map(|c| c.name.clone()).collect(),
        query: Some(query),
        of_version: None,
    })
}

/// Writes the row of a snapshot just frozen from `source` by `query`.
fn register(client: &mut SpiClient<'_>, snapshot: &Frozen, query: &str, source: &str, user: &str) -> Result<()> {
    client.update(
        "INSERT INTO cerebro.snapshots (id, source_relation, query, data_relation, row_count, created_by, columns)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        None,
        &[
            snapshot.id.into(),
            source.into(),
            query.into(),
            snapshot.data_relation.as_str().into(),
            snapshot.row_count.into(),
            user.into(),
            snapshot.columns.clone().into(),
        ],
    )?;
    Ok(())
}

/// A snapshot frozen for an imported graph (`cerebro.import_onnx` with a
/// target): `columns` of `source` copied as `user`, as training freezes
/// them, and recorded. Its id, its table, and the snapshot column that holds
/// each of `columns`, in order.
pub(crate) fn freeze_for_import(
    client: &mut SpiClient<'_>,
    source: &Source,
    columns: &[&str],
    user: &str,
) -> Result<(i64, String, Vec<String>)> {
    let frozen: Vec<&SourceColumn> = columns.iter().map(|c| source.column(c)).collect::<Result<_>>()?;
    let snapshot = freeze(client, source, &frozen, user)?;
    let query = snapshot.query.as_deref().expect("a snapshot just frozen has its query");
    let _owner = identity::become_owner()?;
    register(client, &snapshot, query, &source.display, user)?;
    Ok((snapshot.id, snapshot.data_relation, (0..columns.len()).map(snapshot_column).collect()))
}

/// Measures a snapshot just frozen as the task of its first version (its
/// features and target) and keeps its meta-features (`cerebro.recommend`).
fn store_meta(
    client: &mut SpiClient<'_>,
    v: &VersionRequest,
    resolved: &Resolved,
    snapshot: &Frozen,
    task: Task,
) -> Result<()> {
    let _owner = identity::become_owner()?;
    let column = |name: &str| snapshot.columns.iter().position(|c| c == name).map(snapshot_column);
    let features: Vec<Measured> =
        resolved.features.iter().filter_map(|f| column(&f.name).map(|expr| Measured { expr, kind: f.kind })).collect();
    let target = column(&v.target).expect("the target is frozen");
    let meta = measure(client, &snapshot.data_relation, &features, &v.target, &target, task)?;
    let meta = serde_json::to_value(&meta).expect("meta-features serialise");
    client.update(
        "UPDATE cerebro.snapshots SET meta = $2 WHERE id = $1",
        None,
        &[snapshot.id.into(), JsonB(meta).into()],
    )?;
    Ok(())
}

/// Counts the frozen rows with a target, resolves the task and reads the
/// class labels; a regression learning `ln(y)` must have every target > 0.
fn read_labels(
    client: &mut SpiClient<'_>,
    v: &VersionRequest,
    resolved: &Resolved,
    snapshot: &Frozen,
    known: &mut KnownTargets,
) -> Result<Labels> {
    let _owner = identity::become_owner()?;
    let position = snapshot.columns.iter().position(|n| n == &v.target).expect("the target is frozen");
    let (target, data) = (snapshot_column(position), &snapshot.data_relation);
    let facts = match known.entry((data.clone(), target.clone())) {
        Entry::Occupied(known) => known.into_mut(),
        Entry::Vacant(unknown) => {
            let (labelled, distinct) = client
                .select(&format!("SELECT count({target}), count(DISTINCT {target}) FROM {data}"), Some(1), &[])?
                .first()
                .get_two::<i64, i64>()?;
            unknown.insert(TargetFacts {
                labelled: labelled.unwrap_or(0),
                distinct: distinct.unwrap_or(0),
                smallest: None,
                labels: None,
            })
        }
    };
    let (labelled, distinct) = (facts.labelled, facts.distinct);
    if labelled == 0 {
        return Err(CerebroError::EmptySource { relation: resolved.source.display.clone(), target: v.target.clone() });
    }
    let task = resolve_task(v.task, &v.target, resolved.target_kind, distinct as usize)?;
    if v.options.needs_positive_target(task) {
        if facts.smallest.is_none() {
            let found = client
                .select(&format!("SELECT min({target})::text, min({target}) > 0 FROM {data}"), Some(1), &[])?
                .first()
                .get_two::<String, bool>()?;
            facts.smallest = Some(found);
        }
        if let Some((smallest, Some(false))) = &facts.smallest {
            let smallest = smallest.clone().unwrap_or_default();
            return Err(SpecError::TargetNotPositive { target: v.target.clone(), smallest }.into());
        }
    }
    if task == Task::Regression {
        return Ok(Labels { labelled, task, class_labels: Vec::new() });
    }
    if facts.labels.is_none() {
        let rows = client.select(
            &format!(
                "SELECT d.v::text FROM (SELECT DISTINCT {target} AS v FROM {data}
                 WHERE {target} IS NOT NULL) d ORDER BY d.v"
            ),
            None,
            &[],
        )?;
        let mut labels = Vec::new();
        for row in rows {
            labels.push(row.get(1)?.expect("labels are not NULL"));
        }
        facts.labels = Some(labels);
    }
    Ok(Labels { labelled, task, class_labels: facts.labels.clone().unwrap_or_default() })
}

/// What a snapshot's target column holds, each fact read once per INSERT
/// (a selection's candidates share their snapshot and target) and only
/// when a candidate needs it.
struct TargetFacts {
    labelled: i64,
    distinct: i64,
    /// The smallest value, as text, and whether it is above 0: read for a
    /// regression that learns `ln y`.
    smallest: Option<(Option<String>, Option<bool>)>,
    /// The distinct values in sort order: read for a classification.
    labels: Option<Vec<String>>,
}

/// Target facts by snapshot table and column.
type KnownTargets = HashMap<(String, String), TargetFacts>;

/// Writes the snapshot's row (when it is new), the version's row and its
/// job, and the audit row; cerebrod hears of the job at commit.
#[allow(clippy::too_many_arguments)]
fn record(
    client: &mut SpiClient<'_>,
    v: &VersionRequest,
    resolved: &Resolved,
    snapshot: &Frozen,
    labels: &Labels,
    version: i32,
    selection: Option<i64>,
    user: &str,
) -> Result<()> {
    let _owner = identity::become_owner()?;
    let source = &resolved.source.display;
    if let Some(query) = &snapshot.query {
        register(client, snapshot, query, source, user)?;
    }
    let features_json = serde_json::to_value(&resolved.features).expect("features serialise");
    let model_version_id: i64 = client
        .update(
            "INSERT INTO cerebro.model_versions (name, version, task, source_relation, target_column, key_column,
                 features, class_labels, options, snapshot_id, epochs, created_by, request, selection_id,
                 parent_version, change, source_author)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17) RETURNING id",
            Some(1),
            &[
                v.name.as_str().into(),
                version.into(),
                labels.task.as_str().into(),
                source.as_str().into(),
                v.target.as_str().into(),
                v.key.clone().into(),
                JsonB(features_json).into(),
                labels.class_labels.clone().into(),
                JsonB(v.options.to_json()).into(),
                snapshot.id.into(),
                (v.options.epochs as i32).into(),
                user.into(),
                JsonB(v.written.clone()).into(),
                selection.into(),
                v.lineage.as_ref().and_then(|l| l.parent_version).into(),
                v.lineage.as_ref().and_then(|l| l.change.clone()).into(),
                v.source_author.as_deref().unwrap_or(user).into(),
            ],
        )?
        .first()
        .get_one()?
        .expect("RETURNING id");
    enqueue(client, model_version_id)?;
    let detail = serde_json::json!({ "source": source, "target": v.target });
    audit(client, Audit { user, action: "create", model: &v.name, version: Some(version), detail })?;
    notice!(
        "cerebro: queued {} version {} ({} task, {} features, {} rows); it trains once this transaction commits",
        v.name,
        version,
        labels.task,
        resolved.features.len(),
        snapshot.row_count
    );
    Ok(())
}
