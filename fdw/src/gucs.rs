//! Every setting of the extension.

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

/// Rows sent to cerebrod in one scoring batch.
pub static BATCH_ROWS: GucSetting<i32> = GucSetting::<i32>::new(8192);
/// How long a backend waits for one answer from cerebrod, in milliseconds.
pub static SCORING_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(60_000);

/// Most candidates one selection INSERT may queue.
pub static MAX_CANDIDATES: GucSetting<i32> = GucSetting::<i32>::new(100);

pub fn init() {
    GucRegistry::define_int_guc(
        c"cerebro.max_candidates",
        c"Most candidates one INSERT with a selection spec may queue.",
        c"A spec that expands to more is refused with the number it expands to.",
        &MAX_CANDIDATES,
        1,
        1_000_000,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"cerebro.batch_rows",
        c"Rows per scoring batch sent to cerebrod.",
        c"Larger batches amortise the round trip; smaller ones return first rows sooner.",
        &BATCH_ROWS,
        1,
        1_048_576,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"cerebro.scoring_timeout",
        c"How long to wait for cerebrod to answer one request.",
        c"A scoring query fails with SQLSTATE 57014 when cerebrod does not answer in time.",
        &SCORING_TIMEOUT_MS,
        100,
        i32::MAX,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
}
