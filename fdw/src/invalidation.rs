//! A count of the catalog changes this backend has heard of: a check of
//! catalog facts that is kept between statements is trusted only while the
//! count stands still.
//!
//! PostgreSQL tells each backend of every catalog change (its own at once,
//! other sessions' when it next reads the catalog) through the callbacks
//! of `utils/inval.h`, as it does for its own relation and plan caches. A
//! change of any relation (a view's definition, a policy, an owner), any
//! function, operator or type, or any role or role membership moves the
//! count, as does a reset of every cache; most of them have nothing to do
//! with a kept check, which is then made again.

use std::cell::Cell;
use std::ffi::c_int;

use pgrx::pg_sys;

// Not in pgrx's bindings (utils/inval.h); both only add to a list, and
// raise FATAL (never ERROR) when it is full, which registering once per
// backend cannot make it.
extern "C-unwind" {
    fn CacheRegisterRelcacheCallback(
        func: unsafe extern "C-unwind" fn(arg: pg_sys::Datum, relid: pg_sys::Oid),
        arg: pg_sys::Datum,
    );
    fn CacheRegisterSyscacheCallback(
        cacheid: c_int,
        func: unsafe extern "C-unwind" fn(arg: pg_sys::Datum, cacheid: c_int, hashvalue: u32),
        arg: pg_sys::Datum,
    );
}

thread_local! {
    static CHANGES: Cell<u64> = const { Cell::new(0) };
    static LISTENING: Cell<bool> = const { Cell::new(false) };
}

/// The system caches whose changes can change what a source reaches or
/// whom a reader trusts.
const WATCHED: [u32; 6] = [
    pg_sys::SysCacheIdentifier::PROCOID,
    pg_sys::SysCacheIdentifier::OPEROID,
    pg_sys::SysCacheIdentifier::TYPEOID,
    pg_sys::SysCacheIdentifier::AUTHOID,
    pg_sys::SysCacheIdentifier::AUTHMEMMEMROLE,
    pg_sys::SysCacheIdentifier::AUTHMEMROLEMEM,
];

// Called by PostgreSQL while it processes invalidations: nothing here may
// allocate or raise.
unsafe extern "C-unwind" fn relation_changed(_arg: pg_sys::Datum, _relid: pg_sys::Oid) {
    CHANGES.with(|c| c.set(c.get().wrapping_add(1)));
}

unsafe extern "C-unwind" fn cache_changed(_arg: pg_sys::Datum, _cacheid: c_int, _hashvalue: u32) {
    CHANGES.with(|c| c.set(c.get().wrapping_add(1)));
}

/// The count now; the first call in a backend starts listening.
pub fn changes() -> u64 {
    if !LISTENING.with(Cell::get) {
        // SAFETY: registered once per backend, before anything is kept;
        // the callbacks touch only this thread's counter.
        unsafe {
            CacheRegisterRelcacheCallback(relation_changed, pg_sys::Datum::from(0));
            for cache in WATCHED {
                CacheRegisterSyscacheCallback(cache as c_int, cache_changed, pg_sys::Datum::from(0));
            }
        }
        LISTENING.with(|l| l.set(true));
    }
    CHANGES.with(Cell::get)
}
