//! Reads and writes of the `cerebro` schema that several SQL functions
//! share: numbering a model's versions, queueing a job, the audit log.
//! Callers decide who may (crate::access) and run these as the extension
//! owner where they read past row-level security.

use pgrx::datum::DatumWithOid;
use pgrx::spi::SpiClient;
use pgrx::{pg_sys, FromDatum, IntoDatum, JsonB};

use crate::access;
use crate::error::{CerebroError, Result};

/// Refuses, on a hot standby, a function that changes the catalog, before
/// it runs anything: PostgreSQL would refuse it only when it first gave the
/// transaction an id, with XX000 `cannot assign TransactionIds during
/// recovery`.
pub(crate) fn writable() -> Result<()> {
    // SAFETY: reads shared memory's recovery state.
    if unsafe { pg_sys::RecoveryInProgress() } {
        return Err(CerebroError::DuringRecovery);
    }
    Ok(())
}

/// Column `column` (1-based) of the first row `query` returns, None when it
/// returns no row or NULL.
pub(crate) fn first<T: FromDatum + IntoDatum>(
    client: &mut SpiClient<'_>,
    query: &str,
    args: &[DatumWithOid],
    column: usize,
) -> Result<Option<T>> {
    // Run as an update, a query gives the transaction an id, which a hot
    // standby refuses (XX000). Only reads get here there: whatever writes
    // was refused first (`writable`).
    // SAFETY: reads shared memory's recovery state.
    let rows = if unsafe { pg_sys::RecoveryInProgress() } {
        client.select(query, Some(1), args)?
    } else {
        client.update(query, Some(1), args)?
    };
    match rows.into_iter().next() {
        Some(row) => Ok(row.get::<T>(column)?),
        None => Ok(None),
    }
}

/// What a version copied from another of its model's sets for itself; the
/// rest (task, source, target, key, features, labels, snapshot, the
/// source's author) is the original's.
#[derive(Default)]
pub(crate) struct CopyOf {
    /// A subset of the original's features (a later round's candidate that
    /// leaves columns out); the snapshot is the original's.
    pub(crate) features: Option<serde_json::Value>,
    pub(crate) options: Option<serde_json::Value>,
    pub(crate) epochs: Option<i32>,
    pub(crate) request: Option<serde_json::Value>,
    /// It is a candidate of the original's selection too.
    pub(crate) in_selection: bool,
    /// It reproduces the original (`model_versions.reproduces`).
    pub(crate) reproduces: bool,
}

/// Records version `version` of `name` for `user`, a copy of its version
/// `from` with `copy`'s settings, queues its job and audits it as created
/// (with `detail`). None when `from` does not exist. As the extension owner.
pub(crate) fn queue_copy(
    client: &mut SpiClient<'_>,
    name: &str,
    from: i32,
    version: i32,
    user: &str,
    copy: CopyOf,
    detail: serde_json::Value,
) -> Result<Option<i64>> {
    let id = first::<i64>(
        client,
        "INSERT INTO cerebro.model_versions (name, version, task, source_relation, target_column, key_column,
             features, class_labels, options, snapshot_id, epochs, created_by, request, selection_id, reproduces,
             source_author)
         SELECT name, $3, task, source_relation, target_column, key_column, coalesce($10, features), class_labels,
                coalesce($4, options), snapshot_id, coalesce($5, epochs), $6, coalesce($7, request),
                CASE WHEN $8 THEN selection_id END, CASE WHEN $9 THEN version END, source_author
         FROM cerebro.model_versions WHERE name = $1 AND version = $2
         RETURNING id",
        &[
            name.into(),
            from.into(),
            version.into(),
            copy.options.map(JsonB).into(),
            copy.epochs.into(),
            user.into(),
            copy.request.map(JsonB).into(),
            copy.in_selection.into(),
            copy.reproduces.into(),
            copy.features.map(JsonB).into(),
        ],
        1,
    )?;
    let Some(id) = id else { return Ok(None) };
    enqueue(client, id)?;
    audit(client, Audit { user, action: "create", model: name, version: Some(version), detail })?;
    Ok(Some(id))
}

/// Queues a training job for a version and wakes cerebrod, which hears it
/// when the transaction commits (a rolled-back INSERT trains nothing). As
/// the extension owner.
pub(crate) fn enqueue(client: &mut SpiClient<'_>, model_version_id: i64) -> Result<()> {
    client.update("INSERT INTO cerebro.jobs (model_version_id) VALUES ($1)", None, &[model_version_id.into()])?;
    wake_daemon(client)
}

/// Wakes cerebrod's job loop when the transaction commits (NOTIFY is
/// delivered then, and never for a rolled-back one).
pub(crate) fn wake_daemon(client: &mut SpiClient<'_>) -> Result<()> {
    client.update("SELECT pg_catalog.pg_notify($1, '')", None, &[cerebro_shared::sql::JOBS_CHANNEL.into()])?;
    Ok(())
}

pub(crate) fn current_user(client: &mut SpiClient<'_>) -> Result<String> {
    Ok(first::<String>(client, "SELECT current_user::text", &[], 1)?.expect("current_user is never NULL"))
}

/// The next version number of `name`, under a lock on the name's row of
/// `cerebro.model_names` so that concurrent INSERTs number in turn; a model's versions after
/// the first are its owner's to add (`caller` is the role asking). Reads
/// past row-level security: call it as the extension owner.
pub(crate) fn next_version(client: &mut SpiClient<'_>, name: &str, caller: pg_sys::Oid) -> Result<i32> {
    let version = allocate_version(client, name)?;
    if version > 1 {
        access::check_may_add_version(name, caller)?;
    }
    Ok(version)
}

/// [`next_version`] without the owner's check, for a version Cerebro adds
/// on behalf of a role that was checked before (a selection's ensemble).
pub(crate) fn allocate_version(client: &mut SpiClient<'_>, name: &str) -> Result<i32> {
    client.update(
        "INSERT INTO cerebro.model_names (name) VALUES ($1) ON CONFLICT (name) DO NOTHING",
        None,
        &[name.into()],
    )?;
    // An UPDATE, not a row lock alone: after waiting on another INSERT of
    // the same name, a REPEATABLE READ or SERIALIZABLE transaction, whose
    // snapshot cannot see the version it added, fails with 40001 (which
    // applications retry) rather than taking the same number (23505).
    client.update("UPDATE cerebro.model_names SET name = name WHERE name = $1", None, &[name.into()])?;
    let version = first::<i32>(
        client,
        "SELECT coalesce(max(version), 0) + 1 FROM cerebro.model_versions WHERE name = $1",
        &[name.into()],
        1,
    )?
    .expect("coalesce is never NULL");
    Ok(version)
}

/// One row of `cerebro.audit_log`.
pub(crate) struct Audit<'a> {
    pub(crate) user: &'a str,
    pub(crate) action: &'a str,
    pub(crate) model: &'a str,
    /// None for what concerns the whole model (grants).
    pub(crate) version: Option<i32>,
    pub(crate) detail: serde_json::Value,
}

pub(crate) fn audit(client: &mut SpiClient<'_>, a: Audit<'_>) -> Result<()> {
    client.update(
        "INSERT INTO cerebro.audit_log (role_name, action, model, version, detail) VALUES ($1, $2, $3, $4, $5)",
        None,
        &[a.user.into(), a.action.into(), a.model.into(), a.version.into(), JsonB(a.detail).into()],
    )?;
    Ok(())
}
