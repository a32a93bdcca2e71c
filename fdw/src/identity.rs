//! Whose rights a statement runs with, and which `search_path` it sees.
//!
//! Reading user data always happens as the calling user, so privileges and
//! row-level security apply. Writing the catalog happens as the extension's
//! owner, the way a SECURITY DEFINER function would, so users never need
//! write access to Cerebro's tables.
//!
//! Both kinds of statement run with `search_path = pg_catalog, pg_temp`
//! ([`pin_search_path`]): the caller's path could put a schema of theirs
//! first, and an unqualified `nextval` or `=` in Cerebro's SQL would then run
//! their function with the owner's rights. (`pg_temp` last keeps temporary
//! relations from shadowing catalog ones; functions and operators are never
//! looked up in it.) As the owner the statement is also a security-restricted
//! operation, as PostgreSQL runs maintenance on behalf of a table's owner:
//! whatever might still run there cannot change the session's role or leave
//! temporary objects behind. SQL that carries text a user wrote (a query
//! source) never runs as the owner: it runs as the user, under the user's own
//! path, with Cerebro's parts of it schema-qualified (`cerebro_shared::sql`).

use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::error::Result;

/// The path every Cerebro statement runs under.
const PINNED_PATH: &CStr = c"pg_catalog, pg_temp";

/// Restores the `search_path` the caller had when dropped.
pub struct PinnedPath {
    nest_level: i32,
}

impl Drop for PinnedPath {
    fn drop(&mut self) {
        // While unwinding from an ERROR, the (sub)transaction abort that
        // follows restores the setting, as it does after a SECURITY DEFINER
        // function with SET fails; popping the GUC stack here would race it.
        if !std::thread::panicking() {
            // SAFETY: pops exactly the level pin_search_path pushed.
            unsafe { pg_sys::AtEOXact_GUC(true, self.nest_level) };
        }
    }
}

/// Sets `search_path` to `pg_catalog, pg_temp` until the returned guard is
/// dropped, the way `SET search_path` on a function does.
pub fn pin_search_path() -> PinnedPath {
    // SAFETY: the same calls fmgr_security_definer makes for a function's
    // SET clause; an ERROR in set_config_option becomes a Rust panic at the
    // pg_guard boundary and the transaction abort undoes the new level.
    unsafe {
        let nest_level = pg_sys::NewGUCNestLevel();
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            PINNED_PATH.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            pg_sys::PGERROR as i32,
            false,
        );
        PinnedPath { nest_level }
    }
}

/// Restores the saved identity (and then the path) when dropped, also while
/// unwinding.
pub struct OwnerScope {
    saved_user: pg_sys::Oid,
    saved_context: i32,
    _path: PinnedPath,
}

impl Drop for OwnerScope {
    fn drop(&mut self) {
        // SAFETY: restores exactly what GetUserIdAndSecContext returned.
        unsafe { pg_sys::SetUserIdAndSecContext(self.saved_user, self.saved_context) };
    }
}

/// The extension owner's role, read under the pinned path.
pub fn extension_owner() -> Result<pg_sys::Oid> {
    let _path = pin_search_path();
    // A read-only query: `Spi::get_one` runs its query as an update, and
    // giving a transaction an id fails on a standby (and costs an xid, and
    // WAL, on a primary) where nothing is written.
    let owner = Spi::connect(|client| {
        client
            .select(
                "SELECT extowner FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'cerebro'",
                Some(1),
                &[],
            )?
            .first()
            .get_one::<pg_sys::Oid>()
    })?;
    Ok(owner.expect("the cerebro extension is installed while its code runs"))
}

/// Switches to the extension owner, under the pinned path and as a
/// security-restricted operation, until the returned scope is dropped.
pub fn become_owner() -> Result<OwnerScope> {
    let path = pin_search_path();
    let owner = extension_owner()?;
    let (mut saved_user, mut saved_context) = (pg_sys::Oid::INVALID, 0);
    // SAFETY: plain getters/setters of backend-local state; the transaction
    // abort path also restores it.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
        pg_sys::SetUserIdAndSecContext(
            owner,
            saved_context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32 | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
        );
    }
    Ok(OwnerScope { saved_user, saved_context, _path: path })
}

/// The role running the statement (`current_user`).
pub fn current_role() -> pg_sys::Oid {
    // SAFETY: a getter of backend-local state.
    unsafe { pg_sys::GetUserId() }
}
