//! Who may use and who administers a model, and what others learn.
//!
//! A model's owner is the role that created its first version. Its owner
//! (and members of it), the roles it was granted to (and their members),
//! members of `cerebro_admin` and superusers may *use* it: see it in the
//! catalog, score it, export it, derive from it. Its owner, `cerebro_admin`
//! and superusers *administer* it: deploy, roll back, grant, delete, add
//! versions.
//!
//! A role that may not use a model learns nothing about it: every function
//! answers as if it did not exist. The one exception is its name: names are
//! unique in a database, so trying to add a version to a name one cannot see
//! says the name is taken (and nothing else).

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CString;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::error::{CerebroError, Result};
use crate::identity;

/// `name`'s role, if it exists.
pub(crate) fn role_oid(name: &str) -> Option<pg_sys::Oid> {
    let name = CString::new(name).ok()?;
    // SAFETY: a syscache lookup; missing_ok makes it return InvalidOid
    // instead of raising.
    let oid = unsafe { pg_sys::get_role_oid(name.as_ptr(), true) };
    (oid != pg_sys::Oid::INVALID).then_some(oid)
}

fn is_member(who: pg_sys::Oid, role: pg_sys::Oid) -> bool {
    // SAFETY: a syscache-backed membership test, as pg_has_role(..., 'MEMBER').
    unsafe { pg_sys::is_member_of_role(who, role) }
}

fn is_superuser(who: pg_sys::Oid) -> bool {
    // SAFETY: a syscache lookup of the role.
    unsafe { pg_sys::superuser_arg(who) }
}

/// Superusers and members of `cerebro_admin` use and administer every model.
fn is_admin(who: pg_sys::Oid) -> bool {
    is_superuser(who) || role_oid("cerebro_admin").is_some_and(|admin| is_member(who, admin))
}

/// A model's owner and the roles it was granted to, read past row-level
/// security; no owner when no version of it exists.
struct Holders {
    owner: Option<String>,
    grantees: Vec<String>,
}

impl Holders {
    /// Whether `who` may use the model: an admin, or a member of its owner or
    /// of a grantee.
    fn usable_by(&self, who: pg_sys::Oid) -> bool {
        is_admin(who) || self.owner.iter().chain(&self.grantees).filter_map(|r| role_oid(r)).any(|r| is_member(who, r))
    }

    /// Refuses what `who` may not do to the model: "does not exist" when it
    /// does not exist or `who` may not even use it, a permission error naming
    /// the owner (whom `who` can see) when it may use it but not administer it.
    fn check_administers(&self, model: &str, who: pg_sys::Oid, action: &'static str) -> Result<()> {
        let owner = match &self.owner {
            Some(owner) if self.usable_by(who) => owner,
            _ => return Err(CerebroError::ModelNotFound(model.into())),
        };
        if is_admin(who) || role_oid(owner).is_some_and(|o| is_member(who, o)) {
            Ok(())
        } else {
            Err(CerebroError::NotModelOwner { model: model.into(), owner: owner.clone(), action })
        }
    }
}

fn holders(model: &str) -> Result<Holders> {
    let _owner = identity::become_owner()?;
    Spi::connect(|client| {
        let row = client
            .select(
                "SELECT (SELECT created_by::text FROM cerebro.model_versions WHERE name = $1
                         ORDER BY version LIMIT 1),
                        ARRAY(SELECT grantee::text FROM cerebro.model_grants WHERE name = $1)",
                Some(1),
                &[model.into()],
            )?
            .first()
            .get_two::<String, Vec<String>>()?;
        Ok(Holders { owner: row.0, grantees: row.1.unwrap_or_default() })
    })
}

/// Answers of [`allowed_to_use`] for the snapshot the statement reads with:
/// a policy asks once per catalog row, and an answer read through one
/// snapshot stays true for every read through the same one. Keyed by the
/// transaction, its command counter and the snapshot's horizon and count of
/// finished transactions, so that a grant, a revoke or a deletion committed
/// since is seen at once, even by the next query of a running function.
type SnapshotKey = (pg_sys::LocalTransactionId, pg_sys::CommandId, u32, u32, u64);
type Answers = (SnapshotKey, HashMap<(String, pg_sys::Oid), bool>);

thread_local! {
    static ANSWERS: RefCell<Option<Answers>> = const { RefCell::new(None) };
}

/// The active snapshot's key; None (nothing cached) without one.
fn snapshot_key() -> Option<SnapshotKey> {
    // SAFETY: MyProc is this backend's own PGPROC, set for its lifetime; the
    // active snapshot, when there is one, lives until the query ends.
    unsafe {
        let snapshot = pg_sys::GetActiveSnapshot();
        if snapshot.is_null() {
            return None;
        }
        Some((
            (*pg_sys::MyProc).lxid,
            (*snapshot).curcid,
            (*snapshot).xmin.into_inner(),
            (*snapshot).xmax.into_inner(),
            (*snapshot).snapXactCompletionCount,
        ))
    }
}

/// Whether role `who` may use `model`.
pub(crate) fn allowed_to_use(model: &str, who: pg_sys::Oid) -> Result<bool> {
    if is_admin(who) {
        return Ok(true);
    }
    let now = snapshot_key();
    let key = (model.to_owned(), who);
    let cached = ANSWERS.with_borrow(|a| match (a, now) {
        (Some((at, map)), Some(now)) if *at == now => map.get(&key).copied(),
        _ => None,
    });
    if let Some(answer) = cached {
        return Ok(answer);
    }
    let answer = holders(model)?.usable_by(who);
    if let Some(now) = now {
        ANSWERS.with_borrow_mut(|a| {
            let (at, map) = a.get_or_insert_with(|| (now, HashMap::new()));
            if *at != now {
                *at = now;
                map.clear();
            }
            map.insert(key, answer);
        });
    }
    Ok(answer)
}

/// Refuses, as "does not exist", a model `who` may not use (or that does
/// not exist).
fn check_may_use(model: &str, who: pg_sys::Oid) -> Result<()> {
    let h = holders(model)?;
    if h.owner.is_some() && h.usable_by(who) {
        Ok(())
    } else {
        Err(CerebroError::ModelNotFound(model.into()))
    }
}

/// See [`Holders::check_administers`].
fn check_administers(model: &str, who: pg_sys::Oid, action: &'static str) -> Result<()> {
    holders(model)?.check_administers(model, who, action)
}

/// Before a new version of `model` (which has versions) is added: the name
/// is taken when `who` may not even see it.
pub(crate) fn check_may_add_version(model: &str, who: pg_sys::Oid) -> Result<()> {
    let h = holders(model)?;
    if !h.usable_by(who) {
        return Err(CerebroError::NameTaken(model.into()));
    }
    h.check_administers(model, who, "add a version to")
}

/// Runs `f` as the extension owner once the calling role is found to
/// administer `model` (`action` says what it asked, for the error): the
/// check always comes first, so nothing runs with the owner's rights for a
/// role that may not.
pub(crate) fn as_administrator<T>(model: &str, action: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    check_administers(model, identity::current_role(), action)?;
    let _owner = identity::become_owner()?;
    f()
}

/// [`as_administrator`] for what the role that created a version may also
/// do to it (cancel its training): `creator` is that version's creator.
pub(crate) fn as_creator_or_administrator<T>(
    model: &str,
    creator: &str,
    action: &'static str,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let caller = identity::current_role();
    if role_oid(creator) != Some(caller) {
        check_administers(model, caller, action)?;
    }
    let _owner = identity::become_owner()?;
    f()
}

/// [`as_administrator`] for what every role that may use `model` may do
/// (export it, derive from it).
pub(crate) fn as_user_of<T>(model: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    check_may_use(model, identity::current_role())?;
    let _owner = identity::become_owner()?;
    f()
}

/// `cerebro.may_use(model, who)`: what row-level security on the catalog
/// asks (policies pass `current_user`). It answers only about the calling
/// role and roles whose privileges it has: anything else would tell anyone
/// which role may use which model.
#[pg_extern(sql = false)]
fn may_use(model: Option<&str>, who: Option<&str>) -> Option<bool> {
    let (model, who) = (model?, who?);
    let answer = || -> Result<bool> {
        let Some(who) = role_oid(who) else { return Ok(false) };
        let caller = identity::current_role();
        // SAFETY: a syscache-backed membership test.
        if who != caller && !unsafe { pg_sys::has_privs_of_role(caller, who) } {
            return Err(CerebroError::AskingForAnotherRole);
        }
        allowed_to_use(model, who)
    };
    Some(answer().unwrap_or_else(|e| crate::error::raise(e)))
}
