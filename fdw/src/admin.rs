//! Model administration: `cerebro.deploy`, `cerebro.rollback`,
//! `cerebro.export_onnx`, `cerebro.grant_model` and `cerebro.revoke_model`.
//!
//! Deploying picks the version `cerebro.predictions` scores with when a query
//! names none. A model's owner (the role that created its first version, or
//! a member of it), members of `cerebro_admin` and superusers may deploy,
//! roll back and grant it; whoever may use it (`cerebro.may_use`) may export
//! it. Every change is recorded in `cerebro.audit_log` (deployments also in
//! `cerebro.deployment_history`); the catalog is read and written as the
//! extension owner, after the checks, in the caller's transaction. A scan
//! resolves its version when it starts, so a deployment change reaches new
//! queries at once and never a running one.

use cerebro_shared::importance::Importance;
use cerebro_shared::mst::SelectionPlan;
use cerebro_shared::protocol::{DistillRequest, MeasureRequest, Request, Response};
use cerebro_shared::sql::{JobState, ModelStatus};
use cerebro_shared::surrogate::{Surrogate, DEPTHS};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::JsonB;

use crate::access;
use crate::catalog::{audit, current_user, first, next_version, queue_copy, Audit, CopyOf};
use crate::daemon_client::{server_socket, DaemonClient};
use crate::error::{raise, CerebroError, Result};
use crate::identity;
use crate::training;

fn required<T>(value: Option<T>, what: &'static str) -> Result<T> {
    value.ok_or(CerebroError::NullArgument(what))
}

/// The status of `model`'s `version`, or the matching not-found error.
fn status_of(client: &mut SpiClient<'_>, model: &str, version: i32) -> Result<String> {
    let status = first::<String>(
        client,
        "SELECT status::text FROM cerebro.model_versions WHERE name = $1 AND version = $2",
        &[model.into(), version.into()],
        1,
    )?;
    match status {
        Some(s) => Ok(s),
        None => {
            let exists = first::<bool>(
                client,
                "SELECT EXISTS (SELECT 1 FROM cerebro.model_versions WHERE name = $1)",
                &[model.into()],
                1,
            )?;
            Err(if exists == Some(true) {
                CerebroError::VersionNotFound { name: model.into(), version }
            } else {
                CerebroError::ModelNotFound(model.into())
            })
        }
    }
}

fn check_ready(client: &mut SpiClient<'_>, model: &str, version: i32, to: &'static str) -> Result<()> {
    let status = status_of(client, model, version)?;
    if status == ModelStatus::Ready.as_str() {
        Ok(())
    } else {
        Err(CerebroError::NotDeployable { name: model.into(), version, status, to })
    }
}

fn try_deploy(model: Option<&str>, version: Option<i32>, comment: Option<&str>) -> Result<i32> {
    crate::catalog::writable()?;
    let model = required(model, "model")?;
    let version = required(version, "version")?;
    let deployed = Spi::connect_mut(|client| {
        let user = current_user(client)?;
        access::as_administrator(model, "deploy", || deploy_as(client, &user, model, version, comment))
    })?;
    warn_unless_cerebrod_answers(model, version);
    Ok(deployed)
}

/// Deploys `version` of `model` for `user`, whose right to has been checked;
/// runs as the extension's owner.
fn deploy_as(client: &mut SpiClient<'_>, user: &str, model: &str, version: i32, comment: Option<&str>) -> Result<i32> {
    check_ready(client, model, version, "deployed")?;
    let current =
        first::<i32>(client, "SELECT version FROM cerebro.deployments WHERE name = $1 FOR UPDATE", &[model.into()], 1)?;
    if current == Some(version) {
        notice!("model \"{model}\" version {version} is already deployed");
        return Ok(version);
    }
    client.update(
        "INSERT INTO cerebro.deployments (name, version, deployed_by) VALUES ($1, $2, $3)
         ON CONFLICT (name) DO UPDATE
             SET earlier = cerebro.deployments.earlier || cerebro.deployments.version,
                 version = EXCLUDED.version, deployed_at = now(), deployed_by = EXCLUDED.deployed_by",
        None,
        &[model.into(), version.into(), user.into()],
    )?;
    record(client, Change { user, action: "deploy", model, from: current, to: version, comment })?;
    Ok(version)
}

fn try_rollback(model: Option<&str>, comment: Option<&str>) -> Result<i32> {
    crate::catalog::writable()?;
    let model = required(model, "model")?;
    Spi::connect_mut(|client| {
        let user = current_user(client)?;
        access::as_administrator(model, "roll back", || {
            let query = "SELECT version, earlier FROM cerebro.deployments WHERE name = $1 FOR UPDATE";
            let (current, earlier) = match client.update(query, Some(1), &[model.into()])?.next() {
                Some(row) => (row.get::<i32>(1)?, row.get::<Vec<i32>>(2)?.unwrap_or_default()),
                None => (None, Vec::new()),
            };
            // The latest version deployed before that is not the current
            // one: deleting a version between two deployments of another
            // leaves that other twice in a row.
            let back = current.and_then(|c| earlier.iter().rposition(|&v| v != c));
            let (Some(current), Some(back)) = (current, back) else {
                return Err(CerebroError::NothingToRollBack { name: model.into(), deployed: current });
            };
            let previous = earlier[back];
            check_ready(client, model, previous, "rolled back to")?;
            client.update(
                "UPDATE cerebro.deployments
                 SET version = $3, earlier = earlier[1:$4], deployed_at = now(), deployed_by = $2
                 WHERE name = $1",
                None,
                &[model.into(), user.as_str().into(), previous.into(), (back as i32).into()],
            )?;
            let change = Change { user: &user, action: "rollback", model, from: Some(current), to: previous, comment };
            record(client, change)?;
            Ok(previous)
        })
    })
    .inspect(|&previous| warn_unless_cerebrod_answers(model, previous))
}

/// A deployment change.
struct Change<'a> {
    user: &'a str,
    action: &'a str,
    model: &'a str,
    from: Option<i32>,
    to: i32,
    comment: Option<&'a str>,
}

/// Writes the history row and the audit row of a deployment change.
fn record(client: &mut SpiClient<'_>, c: Change<'_>) -> Result<()> {
    client.update(
        "INSERT INTO cerebro.deployment_history (name, action, from_version, to_version, comment, changed_by)
         VALUES ($1, $2, $3, $4, $5, $6)",
        None,
        &[c.model.into(), c.action.into(), c.from.into(), c.to.into(), c.comment.into(), c.user.into()],
    )?;
    let detail = serde_json::json!({ "from_version": c.from, "comment": c.comment });
    audit(client, Audit { user: c.user, action: c.action, model: c.model, version: Some(c.to), detail })?;
    let model = c.model;
    match c.from {
        Some(from) => notice!("model \"{model}\": version {} is deployed (was {from})", c.to),
        None => notice!("model \"{model}\": version {} is deployed", c.to),
    }
    Ok(())
}

/// A session scores a version it has not scored before only once cerebrod
/// has answered its probe rows (`in_backend.rs`), so a deployment made while
/// cerebrod is away stops the model's scoring everywhere until it is back,
/// where the version before went on being scored in the backends: say so.
fn warn_unless_cerebrod_answers(model: &str, version: i32) {
    const ASK_MS: i32 = 2000;
    let answered = server_socket().and_then(|socket| DaemonClient::connect(&socket, ASK_MS));
    // Only a cerebrod that is not there: a full or slow one still checks.
    if let Err(e @ (CerebroError::DaemonUnavailable { .. } | CerebroError::Connection(_))) = answered {
        warning!(
            "cerebro: {e}; until cerebrod is back, a session that has not scored model \"{model}\" version \
             {version} before cannot score it: each checks a version with cerebrod first"
        );
    }
}

fn try_export(model: Option<&str>, version: Option<i32>) -> Result<Vec<u8>> {
    crate::catalog::writable()?;
    let model = required(model, "model")?;
    let version = required(version, "version")?;
    Spi::connect_mut(|client| {
        let user = current_user(client)?;
        access::as_user_of(model, || {
            check_ready(client, model, version, "exported")?;
            let bytes = first::<Vec<u8>>(
                client,
                "SELECT a.bytes FROM cerebro.artifacts a JOIN cerebro.model_versions m ON m.id = a.model_version_id
                 WHERE m.name = $1 AND m.version = $2",
                &[model.into(), version.into()],
                1,
            )?
            .ok_or_else(|| CerebroError::VersionNotFound { name: model.into(), version })?;
            let detail = serde_json::json!({ "bytes": bytes.len() });
            audit(client, Audit { user: &user, action: "export", model, version: Some(version), detail })?;
            Ok(bytes)
        })
    })
}

/// The version's rule surrogate, as cerebrod stored it.
fn surrogate_of(model: Option<&str>, version: Option<i32>) -> Result<Surrogate> {
    let model = required(model, "model")?;
    let version = required(version, "version")?;
    Spi::connect_mut(|client| {
        access::as_user_of(model, || {
            check_ready(client, model, version, "explained")?;
            let stored = first::<JsonB>(
                client,
                "SELECT surrogate FROM cerebro.model_versions WHERE name = $1 AND version = $2",
                &[model.into(), version.into()],
                1,
            )?
            .ok_or_else(|| CerebroError::NoSurrogate { name: model.into(), version })?;
            serde_json::from_value(stored.0).map_err(|e| CerebroError::Catalog(format!("surrogate: {e}")))
        })
    })
}

/// Longest a distill call waits for cerebrod: reading a large snapshot and
/// scoring its sample takes seconds, not this; a cancel or statement_timeout
/// ends the wait at once.
const DISTILL_TIMEOUT_MS: i32 = 600_000;

/// The catalog id and artifact of `model`'s ready `version`, which cerebrod
/// is about to read with its snapshot, and whether it was imported: refused
/// when the snapshot is gone, or when an import brought none. `ready_to` and `rows_to` say what for, as
/// the refusals word it ("distilled", "distill it on").
fn with_snapshot(
    client: &mut SpiClient<'_>,
    model: &str,
    version: i32,
    ready_to: &'static str,
    rows_to: &'static str,
) -> Result<(i64, String, bool)> {
    check_ready(client, model, version, ready_to)?;
    let row = client
        .select(
            "SELECT m.id, m.artifact_sha256, m.import_layout IS NOT NULL,
                    pg_catalog.to_regclass(s.data_relation) IS NOT NULL, m.snapshot_id IS NULL
             FROM cerebro.model_versions m LEFT JOIN cerebro.snapshots s ON s.id = m.snapshot_id
             WHERE m.name = $1 AND m.version = $2",
            Some(1),
            &[model.into(), version.into()],
        )?
        .first();
    let (id, sha, imported, snapshot, rowless) =
        (row.get::<i64>(1)?, row.get::<String>(2)?, row.get::<bool>(3)?, row.get::<bool>(4)?, row.get::<bool>(5)?);
    let (Some(id), Some(sha)) = (id, sha) else {
        return Err(CerebroError::VersionNotFound { name: model.into(), version });
    };
    let imported = imported == Some(true);
    if imported && rowless == Some(true) {
        return Err(CerebroError::ImportWithoutRows { name: model.into(), version, to: rows_to });
    }
    if snapshot != Some(true) {
        return Err(CerebroError::SnapshotGone { name: model.into(), version, to: rows_to });
    }
    Ok((id, sha, imported))
}

/// Fits the version's rule surrogate again, `max_depth` levels deep, and
/// stores it in place of the one it had.
fn try_distill(model: Option<&str>, version: Option<i32>, max_depth: Option<i32>) -> Result<Surrogate> {
    crate::catalog::writable()?;
    let model = required(model, "model")?;
    let version = required(version, "version")?;
    let asked = required(max_depth, "max_depth")?;
    let max_depth =
        u32::try_from(asked).ok().filter(|d| DEPTHS.contains(d)).ok_or(CerebroError::MaxDepth { given: asked })?;
    Spi::connect_mut(|client| {
        let user = current_user(client)?;
        access::as_administrator(model, "distill", || {
            let (id, sha, _) = with_snapshot(client, model, version, "distilled", "distill it on")?;
            let mut daemon = DaemonClient::connect(&server_socket()?, DISTILL_TIMEOUT_MS)?;
            let request = Request::Distill(DistillRequest { model_version_id: id, artifact_sha256: sha, max_depth });
            let surrogate = match daemon.call(&request)? {
                Response::Distilled { surrogate } => surrogate,
                other => return Err(CerebroError::Protocol(format!("expected a surrogate, got {other:?}"))),
            };
            let stored = serde_json::to_value(&surrogate).map_err(|e| CerebroError::Catalog(e.to_string()))?;
            client.update(
                "UPDATE cerebro.model_versions SET surrogate = $3 WHERE name = $1 AND version = $2",
                None,
                &[model.into(), version.into(), JsonB(stored).into()],
            )?;
            let detail = serde_json::json!({
                "max_depth": max_depth,
                "leaves": surrogate.root.rules().len(),
                "fidelity_metric": surrogate.fidelity_metric,
                "fidelity": surrogate.fidelity,
            });
            audit(client, Audit { user: &user, action: "distill", model, version: Some(version), detail })?;
            Ok(surrogate)
        })
    })
}

/// Measures the version's permutation importance again and stores it in
/// place of the one it had (the trigger on `cerebro.model_versions`
/// rebuilds `cerebro.model_importance` from it).
fn try_measure(model: Option<&str>, version: Option<i32>) -> Result<Option<Importance>> {
    crate::catalog::writable()?;
    let model = required(model, "model")?;
    let version = required(version, "version")?;
    Spi::connect_mut(|client| {
        let user = current_user(client)?;
        access::as_administrator(model, "measure", || {
            let (id, sha, imported) = with_snapshot(client, model, version, "measured", "measure it on")?;
            let mut daemon = DaemonClient::connect(&server_socket()?, DISTILL_TIMEOUT_MS)?;
            let request = Request::MeasureImportance(MeasureRequest { model_version_id: id, artifact_sha256: sha });
            let (importance, metrics) = match daemon.call(&request)? {
                Response::Measured { importance, metrics } => (importance, metrics),
                other => return Err(CerebroError::Protocol(format!("expected an importance, got {other:?}"))),
            };
            let stored = importance
                .as_ref()
                .map(|i| serde_json::to_value(i).map(JsonB))
                .transpose()
                .map_err(|e| CerebroError::Catalog(e.to_string()))?;
            client.update(
                "UPDATE cerebro.model_versions SET importance = $3 WHERE name = $1 AND version = $2",
                None,
                &[model.into(), version.into(), stored.into()],
            )?;
            // An import had no metrics: now it has them, on the rows the
            // versions trained on its snapshot validate on. A trained
            // version keeps those its training measured.
            if imported {
                let metrics = serde_json::to_value(&metrics).map_err(|e| CerebroError::Catalog(e.to_string()))?;
                client.update(
                    "UPDATE cerebro.model_versions SET metrics = $3 WHERE name = $1 AND version = $2",
                    None,
                    &[model.into(), version.into(), JsonB(metrics).into()],
                )?;
            }
            let detail = match &importance {
                Some(i) => serde_json::json!({ "metric": i.metric, "baseline": i.baseline, "rows": i.rows }),
                None => serde_json::json!({ "undefined": "the validation rows hold one class only" }),
            };
            audit(client, Audit { user: &user, action: "measure", model, version: Some(version), detail })?;
            Ok(importance)
        })
    })
}

fn try_grant(model: Option<&str>, grantee: Option<&str>, grant: bool) -> Result<()> {
    crate::catalog::writable()?;
    let model = required(model, "model")?;
    let grantee = required(grantee, "grantee")?;
    Spi::connect_mut(|client| {
        let user = current_user(client)?;
        access::as_administrator(model, if grant { "grant" } else { "revoke" }, || {
            let role_exists = first::<bool>(
                client,
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1)",
                &[grantee.into()],
                1,
            )?;
            if role_exists != Some(true) {
                return Err(CerebroError::UnknownRole(grantee.into()));
            }
            let changed = if grant {
                client
                    .update(
                        "INSERT INTO cerebro.model_grants (name, grantee, granted_by) VALUES ($1, $2, $3)
                         ON CONFLICT DO NOTHING RETURNING 1",
                        None,
                        &[model.into(), grantee.into(), user.as_str().into()],
                    )?
                    .len()
            } else {
                client
                    .update(
                        "DELETE FROM cerebro.model_grants WHERE name = $1 AND grantee = $2 RETURNING 1",
                        None,
                        &[model.into(), grantee.into()],
                    )?
                    .len()
            };
            if changed == 0 {
                let what = if grant { "already has" } else { "has no" };
                notice!("role \"{grantee}\" {what} a grant on model \"{model}\"");
                return Ok(());
            }
            let action = if grant { "grant" } else { "revoke" };
            let detail = serde_json::json!({ "grantee": grantee });
            audit(client, Audit { user: &user, action, model, version: None, detail })
        })
    })
}

fn try_reproduce(model: Option<&str>, version: Option<i32>) -> Result<i32> {
    crate::catalog::writable()?;
    let model = required(model, "model")?;
    let version = required(version, "version")?;
    Spi::connect_mut(|client| {
        let user = current_user(client)?;
        let caller = identity::current_role();
        access::as_administrator(model, "add a version to", || {
            status_of(client, model, version)?;
            let imported = first::<bool>(
                client,
                "SELECT import_layout IS NOT NULL FROM cerebro.model_versions WHERE name = $1 AND version = $2",
                &[model.into(), version.into()],
                1,
            )?;
            if imported == Some(true) {
                return Err(CerebroError::ReproducingImport { name: model.into(), version });
            }
            let data = first::<String>(
                client,
                "SELECT s.data_relation FROM cerebro.snapshots s JOIN cerebro.model_versions m ON m.snapshot_id = s.id
                 WHERE m.name = $1 AND m.version = $2 AND pg_catalog.to_regclass(s.data_relation) IS NOT NULL",
                &[model.into(), version.into()],
                1,
            )?;
            if data.is_none() {
                return Err(CerebroError::SnapshotGone { name: model.into(), version, to: "retrain on" });
            }
            let new_version = next_version(client, model, caller)?;
            let copy = CopyOf { reproduces: true, ..CopyOf::default() };
            let detail = serde_json::json!({ "reproduces": version });
            queue_copy(client, model, version, new_version, &user, copy, detail)?
                .ok_or_else(|| CerebroError::VersionNotFound { name: model.into(), version })?;
            notice!(
                "model \"{model}\" version {new_version} is queued: version {version} retrained on its frozen snapshot"
            );
            Ok(new_version)
        })
    })
}

/// Retrains `version` from its frozen snapshot with the same options and
/// seed, as a new version; returns it.
#[pg_extern(sql = false)]
fn reproduce(model: Option<&str>, version: Option<i32>) -> i32 {
    try_reproduce(model, version).unwrap_or_else(|e| raise(e))
}

fn try_delete(model: Option<&str>, version: Option<i32>) -> Result<i64> {
    crate::catalog::writable()?;
    let model = required(model, "model")?;
    let version = required(version, "version")?;
    Spi::connect_mut(|client| {
        let user = current_user(client)?;
        access::as_administrator(model, "delete", || {
            // Lock the job before the version, in the daemon's order when it
            // claims one: a claim in flight finishes first (and the version is
            // then training), or skips the job this transaction holds.
            client.update(
                "SELECT 1 FROM cerebro.jobs j JOIN cerebro.model_versions m ON m.id = j.model_version_id
                 WHERE m.name = $1 AND m.version = $2 FOR UPDATE OF j",
                None,
                &[model.into(), version.into()],
            )?;
            client.update(
                "SELECT 1 FROM cerebro.model_versions WHERE name = $1 AND version = $2 FOR UPDATE",
                None,
                &[model.into(), version.into()],
            )?;
            let status = status_of(client, model, version)?;
            if matches!(status.parse(), Ok(ModelStatus::Training | ModelStatus::Deleted)) {
                return Err(CerebroError::NotDeletable { name: model.into(), version, status });
            }
            let deployed = first::<i32>(
                client,
                "SELECT version FROM cerebro.deployments WHERE name = $1 FOR UPDATE",
                &[model.into()],
                1,
            )?;
            if deployed == Some(version) {
                // While other versions remain, one of them must be deployed
                // instead (or rolled back to); the model's last version goes
                // with its deployment, as the model would.
                let others = first::<i64>(
                    client,
                    "SELECT count(*) FROM cerebro.model_versions
                     WHERE name = $1 AND version <> $2 AND status <> 'deleted'",
                    &[model.into(), version.into()],
                    1,
                )?
                .unwrap_or(0);
                if others > 0 {
                    return Err(CerebroError::DeletingDeployed { name: model.into(), version });
                }
                client.update("DELETE FROM cerebro.deployments WHERE name = $1", None, &[model.into()])?;
            }
            // An ensemble's explanations and reproduction read its members.
            let ensemble = first::<i32>(
                client,
                "SELECT min(e.version) FROM cerebro.model_versions e
                 WHERE e.name = $1 AND e.status <> 'deleted'
                   AND e.trained_with->'ensemble'->'members' @> pg_catalog.jsonb_build_array(
                           pg_catalog.jsonb_build_object('version', $2))",
                &[model.into(), version.into()],
                1,
            )?;
            if let Some(ensemble) = ensemble {
                return Err(CerebroError::DeletingMember { name: model.into(), version, ensemble });
            }
            let row = client
                .update(
                    "SELECT m.id, m.snapshot_id, s.data_relation, coalesce(m.artifact_bytes, 0),
                            EXISTS (SELECT 1 FROM cerebro.model_versions c
                                    WHERE c.name = m.name AND (c.parent_version = m.version OR c.reproduces = m.version)),
                            m.selection_id
                     FROM cerebro.model_versions m LEFT JOIN cerebro.snapshots s ON s.id = m.snapshot_id
                     WHERE m.name = $1 AND m.version = $2",
                    Some(1),
                    &[model.into(), version.into()],
                )?
                .next()
                .ok_or_else(|| CerebroError::VersionNotFound { name: model.into(), version })?;
            let id: i64 = row.get(1)?.expect("id");
            // Imported versions have no snapshot.
            let snapshot: Option<i64> = row.get(2)?;
            let data_relation: Option<String> = row.get(3)?;
            let mut freed: i64 = row.get(4)?.unwrap_or(0);
            let is_parent: bool = row.get(5)?.unwrap_or(false);
            let selection: Option<i64> = row.get(6)?;

            client.update("DELETE FROM cerebro.artifacts WHERE model_version_id = $1", None, &[id.into()])?;
            if is_parent {
                // Versions descend from it: keep the row, and so the lineage.
                client.update(
                    "UPDATE cerebro.model_versions SET status = 'deleted', deleted_at = now() WHERE id = $1",
                    None,
                    &[id.into()],
                )?;
            } else {
                client.update("DELETE FROM cerebro.model_versions WHERE id = $1", None, &[id.into()])?;
            }
            client.update(
                "UPDATE cerebro.deployments SET earlier = pg_catalog.array_remove(earlier, $2) WHERE name = $1",
                None,
                &[model.into(), version.into()],
            )?;
            // The snapshot's data goes when no live version trains or retrains on it.
            if let (Some(snapshot), Some(data_relation)) = (snapshot, data_relation) {
                let still_used = first::<bool>(
                    client,
                    "SELECT EXISTS (SELECT 1 FROM cerebro.model_versions WHERE snapshot_id = $1 AND status <> 'deleted')",
                    &[snapshot.into()],
                    1,
                )?
                .unwrap_or(true);
                if !still_used {
                    freed += first::<i64>(
                        client,
                        "SELECT pg_catalog.pg_total_relation_size(pg_catalog.to_regclass($1))",
                        &[data_relation.as_str().into()],
                        1,
                    )?
                    .unwrap_or(0);
                    client.update(&format!("DROP TABLE IF EXISTS {data_relation}"), None, &[])?;
                    client.update(
                        "DELETE FROM cerebro.snapshots s WHERE s.id = $1
                             AND NOT EXISTS (SELECT 1 FROM cerebro.model_versions m WHERE m.snapshot_id = s.id)",
                        None,
                        &[snapshot.into()],
                    )?;
                    client.update(
                        "UPDATE cerebro.snapshots SET frozen = false WHERE id = $1",
                        None,
                        &[snapshot.into()],
                    )?;
                }
            }
            // A selection none of whose versions is left goes too.
            if let Some(selection) = selection {
                client.update(
                    "DELETE FROM cerebro.selections s WHERE s.id = $1
                         AND NOT EXISTS (SELECT 1 FROM cerebro.model_versions m WHERE m.selection_id = s.id)",
                    None,
                    &[selection.into()],
                )?;
            }
            // The last version gone: the name is free again, without its grants.
            client.update(
                "DELETE FROM cerebro.model_grants g WHERE g.name = $1
                     AND NOT EXISTS (SELECT 1 FROM cerebro.model_versions m WHERE m.name = g.name)",
                None,
                &[model.into()],
            )?;
            client.update(
                "DELETE FROM cerebro.deployments d WHERE d.name = $1
                     AND NOT EXISTS (SELECT 1 FROM cerebro.model_versions m WHERE m.name = d.name)",
                None,
                &[model.into()],
            )?;
            let detail = serde_json::json!({ "freed_bytes": freed, "lineage_kept": is_parent, "status": status });
            audit(client, Audit { user: &user, action: "delete", model, version: Some(version), detail })?;
            Ok(freed)
        })
    })
}

/// Deletes a version's artifact and snapshot data (and its row, unless other
/// versions descend from it); returns the bytes freed.
#[pg_extern(sql = false)]
fn delete_model(model: Option<&str>, version: Option<i32>) -> i64 {
    try_delete(model, version).unwrap_or_else(|e| raise(e))
}

/// Stops one version's training: a queued version is cancelled at once, a
/// training one after its current epoch (cerebrod reads the request when it
/// records the epoch). Its creator or whoever administers the model may;
/// the reason says who and when. Returns `cancelled` or `cancelling`.
fn try_cancel_version(model: Option<&str>, version: Option<i32>) -> Result<String> {
    crate::catalog::writable()?;
    let model = required(model, "model")?;
    let version = required(version, "version")?;
    Spi::connect_mut(|client| {
        let user = current_user(client)?;
        let caller = identity::current_role();
        if !access::allowed_to_use(model, caller)? {
            return Err(CerebroError::ModelNotFound(model.into()));
        }
        let found = {
            let _owner = identity::become_owner()?;
            client
                .update(
                    "SELECT id, status::text, created_by::text, 'cancelled by ' || $3 || ' at ' || now()::text
                     FROM cerebro.model_versions WHERE name = $1 AND version = $2",
                    Some(1),
                    &[model.into(), version.into(), user.as_str().into()],
                )?
                .next()
                .map(|row| -> Result<(i64, String, String, String)> {
                    Ok((
                        row.get(1)?.expect("id"),
                        row.get(2)?.unwrap_or_default(),
                        row.get(3)?.unwrap_or_default(),
                        row.get(4)?.unwrap_or_default(),
                    ))
                })
                .transpose()?
        };
        let (id, status, created_by, reason) =
            found.ok_or_else(|| CerebroError::VersionNotFound { name: model.into(), version })?;
        access::as_creator_or_administrator(model, &created_by, "cancel a version of", || {
            // The job's row, locked: cerebrod's claims skip it meanwhile, and
            // its state cannot change between reading and writing it.
            let state = first::<String>(
                client,
                "SELECT state::text FROM cerebro.jobs WHERE model_version_id = $1 FOR UPDATE",
                &[id.into()],
                1,
            )?;
            let outcome = match state.as_deref().map(str::parse) {
                Some(Ok(JobState::Queued)) => {
                    client.update(
                        "UPDATE cerebro.jobs SET state = 'cancelled', finished_at = now(), error = $2
                         WHERE model_version_id = $1",
                        None,
                        &[id.into(), reason.as_str().into()],
                    )?;
                    client.update(
                        "UPDATE cerebro.model_versions SET status = 'cancelled', error = $2 WHERE id = $1",
                        None,
                        &[id.into(), reason.as_str().into()],
                    )?;
                    "cancelled"
                }
                Some(Ok(JobState::Running)) => {
                    client.update(
                        "UPDATE cerebro.jobs SET cancel_requested = true, error = $2 WHERE model_version_id = $1",
                        None,
                        &[id.into(), reason.as_str().into()],
                    )?;
                    notice!("model \"{model}\" version {version} stops training after its current epoch");
                    "cancelling"
                }
                _ => return Err(CerebroError::NotCancellable { name: model.into(), version, status }),
            };
            let detail = serde_json::json!({ "outcome": outcome });
            audit(client, Audit { user: &user, action: "cancel", model, version: Some(version), detail })?;
            Ok(outcome.to_owned())
        })
    })
}

/// Stops one version's training; returns `cancelled` or `cancelling`.
#[pg_extern(sql = false)]
fn cancel(model: Option<&str>, version: Option<i32>) -> String {
    try_cancel_version(model, version).unwrap_or_else(|e| raise(e))
}

fn try_cancel(selection: Option<i64>) -> Result<i32> {
    crate::catalog::writable()?;
    let selection = selection.ok_or(CerebroError::NullArgument("selection"))?;
    Spi::connect_mut(|client| {
        let user = current_user(client)?;
        let name = {
            let _owner = identity::become_owner()?;
            first::<String>(client, "SELECT name FROM cerebro.selections WHERE id = $1", &[selection.into()], 1)?
        }
        .ok_or(CerebroError::SelectionNotFound(selection))?;
        // Another role's selection does not exist for a role that may not use its model.
        let caller = identity::current_role();
        if !access::allowed_to_use(&name, caller)? {
            return Err(CerebroError::SelectionNotFound(selection));
        }
        access::as_administrator(&name, "cancel a selection of", || {
            let reason = format!("selection {selection} cancelled by {user} at ");
            let queued = client
                .update(
                    "WITH j AS (
                         UPDATE cerebro.jobs j SET state = 'cancelled', finished_at = now(), error = $2 || now()::text
                         FROM cerebro.model_versions m
                         WHERE m.id = j.model_version_id AND m.selection_id = $1 AND j.state = 'queued'
                         RETURNING j.model_version_id)
                     UPDATE cerebro.model_versions SET status = 'cancelled', error = $2 || now()::text
                     WHERE id IN (SELECT model_version_id FROM j)
                     RETURNING id",
                    None,
                    &[selection.into(), reason.as_str().into()],
                )?
                .len();
            // cerebrod ends a running job with the reason its request left here.
            let running = client
                .update(
                    "UPDATE cerebro.jobs j SET cancel_requested = true, error = $2 || now()::text
                     FROM cerebro.model_versions m
                     WHERE m.id = j.model_version_id AND m.selection_id = $1 AND j.state = 'running'
                     RETURNING j.id",
                    None,
                    &[selection.into(), reason.as_str().into()],
                )?
                .len();
            // A cancelled selection draws no more rounds and gets no ensemble.
            client.update(
                "UPDATE cerebro.selections SET plan = plan - 'ensemble' - 'rounds' WHERE id = $1",
                None,
                &[selection.into()],
            )?;
            let detail = serde_json::json!({ "selection": selection, "queued": queued, "running": running });
            audit(client, Audit { user: &user, action: "cancel", model: &name, version: None, detail })?;
            notice!(
                "selection {selection}: {queued} queued candidate(s) cancelled, {running} training asked to stop \
                 after their current epoch; finished ones are kept"
            );
            Ok((queued + running) as i32)
        })
    })
}

/// Cancels a selection's candidates that have not finished; returns how many.
#[pg_extern(sql = false)]
fn cancel_selection(selection: Option<i64>) -> i32 {
    try_cancel(selection).unwrap_or_else(|e| raise(e))
}

/// Brings what a selection has spent of its budget up to date, marks it
/// finished once none of its candidates is queued or training, and, if its
/// spec says `promote`, deploys its best candidate for the user who started
/// it. cerebrod calls it after each stack; calling it again, or early,
/// changes nothing but the spending. Returns the version promoted, if any.
fn try_finish_selection(selection: Option<i64>) -> Result<Option<i32>> {
    crate::catalog::writable()?;
    let selection = selection.ok_or(CerebroError::NullArgument("selection"))?;
    Spi::connect_mut(|client| {
        let _owner = identity::become_owner()?;
        let query = "SELECT name, created_by::text, coalesce((plan->>'promote')::boolean, false),
                            finished_at IS NOT NULL, spec, plan
                     FROM cerebro.selections WHERE id = $1 FOR UPDATE";
        let Some(row) = client.update(query, Some(1), &[selection.into()])?.next() else {
            return Err(CerebroError::SelectionNotFound(selection));
        };
        let name: String = row.get(1)?.unwrap_or_default();
        let by: String = row.get(2)?.unwrap_or_default();
        let promote: bool = row.get(3)?.unwrap_or(false);
        let finished: bool = row.get(4)?.unwrap_or(false);
        let spec: String = row.get(5)?.unwrap_or_default();
        // A plan this code cannot read (written by another version) draws no
        // round and no ensemble, and still lets the selection close.
        let plan: SelectionPlan = row
            .get::<JsonB>(6)?
            .and_then(|p| {
                serde_json::from_value(p.0).map_err(|e| warning!("cerebro: selection {selection}'s plan: {e}")).ok()
            })
            .unwrap_or_default();
        if finished {
            return Ok(None);
        }
        client.update(
            "UPDATE cerebro.selections s
             SET spent_seconds = extract(epoch FROM now() - s.created_at),
                 spent_epochs = (SELECT coalesce(sum(m.epoch), 0) FROM cerebro.model_versions m
                                 WHERE m.selection_id = s.id)
             WHERE s.id = $1",
            None,
            &[selection.into()],
        )?;
        let unfinished = first::<i64>(
            client,
            "SELECT count(*) FROM cerebro.model_versions WHERE selection_id = $1 AND status IN ('queued', 'training')",
            &[selection.into()],
            1,
        )?;
        if unfinished.unwrap_or(0) > 0 {
            return Ok(None);
        }
        // Then the next round, while one is due; a round that cannot be
        // drawn ends the rounds, never the selection's chance to close.
        match training::rounds::draw_next(client, selection, &spec, &plan) {
            Ok(Some(round)) => {
                training::rounds::queue(client, round, &name, &by)?;
                return Ok(None);
            }
            Ok(None) => {}
            Err(e) => warning!("cerebro: selection {selection} draws no further round: {e}"),
        }
        // The ensemble comes last, once every candidate it may weigh is done;
        // the selection ends when it has.
        if let Some(pool) = plan.ensemble {
            if training::ensemble::queue(client, selection, &name, &by, pool)?.is_some() {
                return Ok(None);
            }
        }
        client.update("UPDATE cerebro.selections SET finished_at = now() WHERE id = $1", None, &[selection.into()])?;
        if !promote {
            return Ok(None);
        }
        let best = client
            .select(
                "SELECT version, metrics FROM cerebro.leaderboard
                 WHERE selection = $1 AND status = 'ready' ORDER BY rank, version LIMIT 1",
                Some(1),
                &[selection.into()],
            )?
            .first()
            .get_two::<i32, JsonB>()?;
        let (Some(version), metrics) = best else {
            notice!("selection {selection}: no candidate is ready, so none was promoted");
            return Ok(None);
        };
        let metrics = metrics.map(|m| m.0.to_string()).unwrap_or_default();
        let comment = format!("promoted: best candidate of selection {selection} ({metrics})");
        deploy_as(client, &by, &name, version, Some(&comment))?;
        client.update(
            "UPDATE cerebro.selections SET promoted_version = $2 WHERE id = $1",
            None,
            &[selection.into(), version.into()],
        )?;
        Ok(Some(version))
    })
}

/// See [`try_finish_selection`].
#[pg_extern(sql = false)]
fn finish_selection(selection: Option<i64>) -> Option<i32> {
    try_finish_selection(selection).unwrap_or_else(|e| raise(e))
}

/// Lets `grantee` (and its members) see and score `model`.
#[pg_extern(sql = false)]
fn grant_model(model: Option<&str>, grantee: Option<&str>) {
    try_grant(model, grantee, true).unwrap_or_else(|e| raise(e))
}

/// Takes back what `cerebro.grant_model` gave.
#[pg_extern(sql = false)]
fn revoke_model(model: Option<&str>, grantee: Option<&str>) {
    try_grant(model, grantee, false).unwrap_or_else(|e| raise(e))
}

/// Makes `version` the one `cerebro.predictions` uses for `model`; returns it.
#[pg_extern(sql = false)]
fn deploy(model: Option<&str>, version: Option<i32>, comment: Option<&str>) -> i32 {
    try_deploy(model, version, comment).unwrap_or_else(|e| raise(e))
}

/// Goes back to the version deployed before the current one; returns it.
#[pg_extern(sql = false)]
fn rollback(model: Option<&str>, comment: Option<&str>) -> i32 {
    try_rollback(model, comment).unwrap_or_else(|e| raise(e))
}

/// The version's rule surrogate, one row per leaf: the tests on the way to
/// it, what it predicts, and how many of the fitted rows reach it.
#[pg_extern(sql = false)]
#[allow(clippy::type_complexity)]
fn surrogate_rules(
    model: Option<&str>,
    version: Option<i32>,
) -> TableIterator<
    'static,
    (name!(leaf, i32), name!(rule, String), name!(prediction, String), name!(support, i64), name!(share, f64)),
> {
    let surrogate = surrogate_of(model, version).unwrap_or_else(|e| raise(e));
    let rows = surrogate.rows.max(1) as f64;
    let rules: Vec<_> = surrogate
        .root
        .rules()
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let rule = if r.conditions.is_empty() { "always".to_string() } else { r.conditions.join(" and ") };
            (i as i32 + 1, rule, r.prediction, r.support as i64, r.support as f64 / rows)
        })
        .collect();
    TableIterator::new(rules)
}

/// Fits the version's rule surrogate again, `max_depth` levels deep, on its
/// training snapshot, and stores it: what `surrogate_rules` and
/// `surrogate_sql` show from then on. One row: its leaves and fidelity.
#[pg_extern(sql = false)]
#[allow(clippy::type_complexity)]
fn distill(
    model: Option<&str>,
    version: Option<i32>,
    max_depth: Option<i32>,
) -> TableIterator<
    'static,
    (name!(leaves, i32), name!(fidelity_metric, String), name!(fidelity, f64), name!(fitted_rows, i64)),
> {
    let s = try_distill(model, version, max_depth).unwrap_or_else(|e| raise(e));
    TableIterator::once((s.root.rules().len() as i32, s.fidelity_metric, s.fidelity, s.rows as i64))
}

/// Measures the version's permutation importance again on its snapshot's
/// validation rows, scored as `cerebro.predictions` scores it, and stores it: what
/// `cerebro.model_importance` and `top_columns` show from then on. One row
/// per source column, most important first; none when the metric is not
/// defined on those rows (one class only).
#[pg_extern(sql = false)]
#[allow(clippy::type_complexity)]
fn measure_importance(
    model: Option<&str>,
    version: Option<i32>,
) -> TableIterator<
    'static,
    (name!(rank, i32), name!(column_name, String), name!(importance, f64), name!(metric_drop, f64)),
> {
    let measured = try_measure(model, version).unwrap_or_else(|e| raise(e));
    let columns = measured.map(|i| i.columns).unwrap_or_default();
    TableIterator::new(
        columns.into_iter().enumerate().map(|(rank, c)| (rank as i32 + 1, c.column, c.importance, c.drop)),
    )
}

/// The version's rule surrogate as a SQL `CASE` expression over the
/// source's columns, each leaf followed by its support.
#[pg_extern(sql = false)]
fn surrogate_sql(model: Option<&str>, version: Option<i32>) -> String {
    surrogate_of(model, version).map(|s| s.root.to_sql()).unwrap_or_else(|e| raise(e))
}

/// The version's ONNX file, as cerebrod exported it.
#[pg_extern(sql = false)]
fn export_onnx(model: Option<&str>, version: Option<i32>) -> Vec<u8> {
    try_export(model, version).unwrap_or_else(|e| raise(e))
}
