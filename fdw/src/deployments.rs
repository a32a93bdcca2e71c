//! `cerebro.deploy`, `cerebro.rollback` and `cerebro.export_onnx`.
//!
//! Deploying picks the version `cerebro.predictions` scores with when a query
//! names none. Only a model's owner (the role that created its first
//! version), a member of `cerebro_admin` or a superuser may change it. Every
//! change is recorded in `cerebro.deployment_history` and
//! `cerebro.audit_log`; the catalog is written as the extension owner, after
//! the checks ran as the caller. A scan resolves its version when it starts,
//! so a deployment change reaches new queries at once and never a running one.

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::{FromDatum, IntoDatum, JsonB, PgLogLevel};

use crate::error::{CerebroError, Result};
use crate::identity;

/// Raises `e` as an ERROR with its SQLSTATE, hint and detail.
fn raise(e: CerebroError) -> ! {
    ErrorReport::from(e).report(PgLogLevel::ERROR);
    unreachable!("an ERROR does not return")
}

fn required<T>(value: Option<T>, what: &'static str) -> Result<T> {
    value.ok_or(CerebroError::NullArgument(what))
}

/// Column `column` (1-based) of the first row `query` returns, None when it
/// returns no row or NULL.
fn first<T: FromDatum + IntoDatum>(
    client: &mut SpiClient<'_>,
    query: &str,
    args: &[DatumWithOid],
    column: usize,
) -> Result<Option<T>> {
    match client.update(query, Some(1), args)?.next() {
        Some(row) => Ok(row.get::<T>(column)?),
        None => Ok(None),
    }
}

fn current_user(client: &mut SpiClient<'_>) -> Result<String> {
    Ok(first::<String>(client, "SELECT current_user::text", &[], 1)?.expect("current_user is never NULL"))
}

/// Who may deploy: the owner, `cerebro_admin`'s members, superusers.
fn check_may_deploy(client: &mut SpiClient<'_>, model: &str, user: &str) -> Result<()> {
    let owner = first::<String>(
        client,
        "SELECT created_by::text FROM cerebro.model_versions WHERE name = $1 ORDER BY version LIMIT 1",
        &[model.into()],
        1,
    )?
    .ok_or_else(|| CerebroError::ModelNotFound(model.into()))?;
    let allowed = first::<bool>(
        client,
        "SELECT $1 = $2
             OR (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = $2)
             OR (EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'cerebro_admin')
                 AND pg_catalog.pg_has_role($2, 'cerebro_admin', 'MEMBER'))",
        &[owner.as_str().into(), user.into()],
        1,
    )?
    .unwrap_or(false);
    if allowed {
        Ok(())
    } else {
        Err(CerebroError::NotModelOwner { model: model.into(), owner, action: "deploy or roll back" })
    }
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
    if status == "ready" {
        Ok(())
    } else {
        Err(CerebroError::NotDeployable { name: model.into(), version, status, to })
    }
}

/// One row of `cerebro.audit_log`.
struct Audit<'a> {
    user: &'a str,
    action: &'a str,
    model: &'a str,
    version: i32,
    detail: serde_json::Value,
}

fn audit(client: &mut SpiClient<'_>, a: Audit<'_>) -> Result<()> {
    client.update(
        "INSERT INTO cerebro.audit_log (role_name, action, model, version, detail) VALUES ($1, $2, $3, $4, $5)",
        None,
        &[a.user.into(), a.action.into(), a.model.into(), a.version.into(), JsonB(a.detail).into()],
    )?;
    Ok(())
}

fn try_deploy(model: Option<&str>, version: Option<i32>, comment: Option<&str>) -> Result<i32> {
    let model = required(model, "model")?;
    let version = required(version, "version")?;
    Spi::connect_mut(|client| {
        let user = current_user(client)?;
        check_may_deploy(client, model, &user)?;
        check_ready(client, model, version, "deployed")?;
        let _owner = identity::become_owner(identity::extension_owner()?);
        let current = first::<i32>(
            client,
            "SELECT version FROM cerebro.deployments WHERE name = $1 FOR UPDATE",
            &[model.into()],
            1,
        )?;
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
            &[model.into(), version.into(), user.as_str().into()],
        )?;
        record(client, Change { user: &user, action: "deploy", model, from: current, to: version, comment })?;
        Ok(version)
    })
}

fn try_rollback(model: Option<&str>, comment: Option<&str>) -> Result<i32> {
    let model = required(model, "model")?;
    Spi::connect_mut(|client| {
        let user = current_user(client)?;
        check_may_deploy(client, model, &user)?;
        let _owner = identity::become_owner(identity::extension_owner()?);
        let query = "SELECT version, earlier[cardinality(earlier)] FROM cerebro.deployments WHERE name = $1 FOR UPDATE";
        let (current, previous) = match client.update(query, Some(1), &[model.into()])?.next() {
            Some(row) => (row.get::<i32>(1)?, row.get::<i32>(2)?),
            None => (None, None),
        };
        let (Some(current), Some(previous)) = (current, previous) else {
            return Err(CerebroError::NothingToRollBack { name: model.into(), deployed: current });
        };
        check_ready(client, model, previous, "rolled back to")?;
        client.update(
            "UPDATE cerebro.deployments
             SET version = earlier[cardinality(earlier)], earlier = earlier[1:cardinality(earlier) - 1],
                 deployed_at = now(), deployed_by = $2
             WHERE name = $1",
            None,
            &[model.into(), user.as_str().into()],
        )?;
        let change = Change { user: &user, action: "rollback", model, from: Some(current), to: previous, comment };
        record(client, change)?;
        Ok(previous)
    })
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
    audit(client, Audit { user: c.user, action: c.action, model: c.model, version: c.to, detail })?;
    let model = c.model;
    match c.from {
        Some(from) => notice!("model \"{model}\": version {} is deployed (was {from})", c.to),
        None => notice!("model \"{model}\": version {} is deployed", c.to),
    }
    Ok(())
}

fn try_export(model: Option<&str>, version: Option<i32>) -> Result<Vec<u8>> {
    let model = required(model, "model")?;
    let version = required(version, "version")?;
    Spi::connect_mut(|client| {
        let user = current_user(client)?;
        check_ready(client, model, version, "exported")?;
        let _owner = identity::become_owner(identity::extension_owner()?);
        let bytes = first::<Vec<u8>>(
            client,
            "SELECT a.bytes FROM cerebro.artifacts a JOIN cerebro.model_versions m ON m.id = a.model_version_id
             WHERE m.name = $1 AND m.version = $2",
            &[model.into(), version.into()],
            1,
        )?
        .ok_or_else(|| CerebroError::VersionNotFound { name: model.into(), version })?;
        let detail = serde_json::json!({ "bytes": bytes.len() });
        audit(client, Audit { user: &user, action: "export", model, version, detail })?;
        Ok(bytes)
    })
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

/// The version's ONNX file, as cerebrod exported it.
#[pg_extern(sql = false)]
fn export_onnx(model: Option<&str>, version: Option<i32>) -> Vec<u8> {
    try_export(model, version).unwrap_or_else(|e| raise(e))
}
