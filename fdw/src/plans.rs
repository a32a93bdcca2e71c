//! Catalog queries, and the queries scans read their rows with, planned
//! once per session.
//!
//! Every scan of `cerebro.predictions` resolves its model and source with a
//! handful of catalog queries; run through `SPI_execute`, each is parsed and
//! planned again every time, which cost more than scoring a few keys. Here
//! each query text is prepared once per backend and its plan kept
//! (`SPI_keepplan`); PostgreSQL's plan cache replans it when what it reads
//! changes (DDL, a new role for row-level security), so results are the
//! same as planning afresh.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::Hash;

use pgrx::datum::DatumWithOid;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiTupleTable};
use pgrx::PgOid;

use crate::error::Result;

thread_local! {
    static KEPT: RefCell<HashMap<&'static str, OwnedPreparedStatement>> = RefCell::new(HashMap::new());
    /// Plans of the queries scans read their rows with, by text: the same
    /// model over the same source reads with the same query every time.
    static CURSORS: RefCell<HashMap<String, OwnedPreparedStatement>> = RefCell::new(HashMap::new());
    /// Plans of queries made from a model's catalog entry, by text: the
    /// joins `cerebro.predict` reads a row's joined columns through.
    static BUILT: RefCell<HashMap<(String, Vec<u32>), OwnedPreparedStatement>> = RefCell::new(HashMap::new());
}

/// More scan queries than this and the kept ones are forgotten.
const MAX_KEPT_CURSORS: usize = 64;

/// Runs `sql` (arguments of `types`) with `args`, through the plan this
/// backend keeps for it, prepared on first use.
pub(crate) fn select<'c>(
    client: &SpiClient<'c>,
    sql: &'static str,
    types: &[PgOid],
    limit: Option<i64>,
    args: &[DatumWithOid<'_>],
) -> Result<SpiTupleTable<'c>> {
    KEPT.with(|kept| -> Result<SpiTupleTable<'c>> {
        // A query run while another is (a function in it scoring a row)
        // plans its own, unkept.
        let Ok(mut kept) = kept.try_borrow_mut() else {
            return Ok(client.select(sql, limit, args)?);
        };
        if !kept.contains_key(sql) {
            let plan = client.prepare(sql, types)?.keep();
            kept.insert(sql, plan);
        }
        Ok(client.select(&kept[sql], limit, args)?)
    })
}

/// Runs `sql`, a query made from a model's catalog entry (arguments of
/// `types`), with `args`, through the plan this backend keeps for that text
/// and those types; at most [`MAX_KEPT_CURSORS`] are kept.
pub(crate) fn select_built<'c>(
    client: &SpiClient<'c>,
    sql: &str,
    types: &[PgOid],
    limit: Option<i64>,
    args: &[DatumWithOid<'_>],
) -> Result<SpiTupleTable<'c>> {
    BUILT.with(|kept| -> Result<SpiTupleTable<'c>> {
        let Ok(mut kept) = kept.try_borrow_mut() else {
            return Ok(client.select(sql, limit, args)?);
        };
        // A plan reads its arguments as the types it was prepared with: the
        // same text with arguments of other types (another row type's keys)
        // is another plan.
        let key = (sql.to_owned(), types.iter().map(|t| t.value().to_u32()).collect::<Vec<_>>());
        Ok(client.select(kept_plan(&mut kept, key, client, sql, types)?, limit, args)?)
    })
}

/// The plan `kept` holds under `key`, prepared from `sql` (arguments of
/// `types`) and kept on first use; past [`MAX_KEPT_CURSORS`] plans, those
/// kept are forgotten first.
fn kept_plan<'k, K: Eq + Hash + Clone>(
    kept: &'k mut HashMap<K, OwnedPreparedStatement>,
    key: K,
    client: &SpiClient<'_>,
    sql: &str,
    types: &[PgOid],
) -> Result<&'k OwnedPreparedStatement> {
    if !kept.contains_key(&key) {
        if kept.len() >= MAX_KEPT_CURSORS {
            kept.clear();
        }
        kept.insert(key.clone(), client.prepare(sql, types)?.keep());
    }
    Ok(&kept[&key])
}

/// Opens a cursor on `sql` (arguments of `types`) with `args`, through the
/// plan this backend keeps for that text, and returns its name.
pub(crate) fn open_cursor(
    client: &SpiClient<'_>,
    sql: &str,
    types: &[PgOid],
    args: &[DatumWithOid<'_>],
) -> Result<String> {
    CURSORS.with(|kept| -> Result<String> {
        let Ok(mut kept) = kept.try_borrow_mut() else {
            return Ok(client.try_open_cursor(sql, args)?.detach_into_name());
        };
        let plan = kept_plan(&mut kept, sql.to_owned(), client, sql, types)?;
        Ok(client.try_open_cursor(plan, args)?.detach_into_name())
    })
}
