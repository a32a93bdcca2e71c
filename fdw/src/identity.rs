//! Whose rights a statement runs with.
//!
//! Reading user data always happens as the calling user, so privileges and
//! row-level security apply. Writing the catalog happens as the extension's
//! owner, the way a SECURITY DEFINER function would, so users never need
//! write access to Cerebro's tables.

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::error::Result;

/// Restores the saved identity when dropped, also while unwinding.
pub struct OwnerScope {
    saved_user: pg_sys::Oid,
    saved_context: i32,
}

impl Drop for OwnerScope {
    fn drop(&mut self) {
        // SAFETY: restores exactly what GetUserIdAndSecContext returned.
        unsafe { pg_sys::SetUserIdAndSecContext(self.saved_user, self.saved_context) };
    }
}

pub fn extension_owner() -> Result<pg_sys::Oid> {
    let owner = Spi::get_one::<pg_sys::Oid>("SELECT extowner FROM pg_catalog.pg_extension WHERE extname = 'cerebro'")?;
    Ok(owner.expect("the cerebro extension is installed while its code runs"))
}

/// Switches to `owner` until the returned scope is dropped.
pub fn become_owner(owner: pg_sys::Oid) -> OwnerScope {
    let (mut saved_user, mut saved_context) = (pg_sys::Oid::INVALID, 0);
    // SAFETY: plain getters/setters of backend-local state; the transaction
    // abort path also restores it.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
        pg_sys::SetUserIdAndSecContext(owner, saved_context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32);
    }
    OwnerScope { saved_user, saved_context }
}
