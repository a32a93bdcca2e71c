//! The one foreign data wrapper behind `cerebro.models` and
//! `cerebro.predictions`; the table option `object` says which is which.

use std::collections::HashMap;
use std::sync::OnceLock;

use pgrx::prelude::*;
use pgrx::{pg_sys, AllocatedByRust, PgTryBuilder};
use supabase_wrappers::prelude::*;
use supabase_wrappers::FdwRoutine;

use crate::error::CerebroError;
use crate::models::{self, ModelRow, TrainRequest};
use crate::predictions::PredictionScan;

enum Scan {
    Models { rows: std::vec::IntoIter<ModelRow>, columns: Vec<Column> },
    Predictions { scan: Box<PredictionScan>, columns: Vec<Column> },
}

/// The arguments a scan began with.
struct ScanArgs {
    quals: Vec<Qual>,
    columns: Vec<Column>,
    options: HashMap<String, String>,
}

#[wrappers_fdw(version = "0.1.0", author = "Cerebro", error_type = "CerebroError")]
pub struct CerebroFdw {
    socket: Option<String>,
    scan: Option<Scan>,
    /// What the scan began with, so a rescan (inner side of a nested loop)
    /// can start it again.
    scan_args: Option<ScanArgs>,
}

fn object(options: &HashMap<String, String>) -> Result<&str, CerebroError> {
    match options.get("object").map(String::as_str) {
        Some(o @ ("models" | "predictions")) => Ok(o),
        other => Err(CerebroError::UnknownObject(other.unwrap_or("").to_owned())),
    }
}

impl ForeignDataWrapper<CerebroError> for CerebroFdw {
    fn new(server: ForeignServer) -> Result<Self, CerebroError> {
        Ok(CerebroFdw { socket: server.options.get("socket").cloned(), scan: None, scan_args: None })
    }

    fn begin_scan(
        &mut self,
        quals: &[Qual],
        columns: &[Column],
        _sorts: &[Sort],
        _limit: &Option<Limit>,
        options: &HashMap<String, String>,
    ) -> Result<(), CerebroError> {
        self.scan_args = Some(ScanArgs { quals: quals.to_vec(), columns: columns.to_vec(), options: options.clone() });
        self.scan = Some(match object(options)? {
            "models" => Scan::Models { rows: models::list_models()?.into_iter(), columns: columns.to_vec() },
            _ => {
                let socket = self.socket.as_deref().ok_or(CerebroError::MissingSocket)?;
                Scan::Predictions { scan: Box::new(PredictionScan::begin(quals, socket)?), columns: columns.to_vec() }
            }
        });
        Ok(())
    }

    fn iter_scan(&mut self, row: &mut Row) -> Result<Option<()>, CerebroError> {
        match self.scan.as_mut() {
            None => Ok(None),
            Some(Scan::Models { rows, columns }) => {
                let Some(mut values) = rows.next() else { return Ok(None) };
                for col in columns.iter() {
                    let cell = values.iter_mut().find(|(name, _)| *name == col.name).and_then(|(_, c)| c.take());
                    row.push(&col.name, cell);
                }
                Ok(Some(()))
            }
            Some(Scan::Predictions { scan, columns }) => scan.next_row(row, columns),
        }
    }

    fn get_rel_size(
        &mut self,
        _quals: &[Qual],
        _columns: &[Column],
        _sorts: &[Sort],
        _limit: &Option<Limit>,
        options: &HashMap<String, String>,
    ) -> Result<(i64, i32), CerebroError> {
        // Rough sizes so the planner hashes a join instead of rescanning us.
        Ok(match object(options)? {
            "models" => (100, 300),
            _ => (100_000, 64),
        })
    }

    fn re_scan(&mut self) -> Result<(), CerebroError> {
        let Some(args) = self.scan_args.take() else { return Ok(()) };
        self.end_scan()?;
        self.begin_scan(&args.quals, &args.columns, &[], &None, &args.options)
    }

    fn end_scan(&mut self) -> Result<(), CerebroError> {
        if let Some(Scan::Predictions { mut scan, .. }) = self.scan.take() {
            scan.end();
        }
        Ok(())
    }

    fn begin_modify(&mut self, options: &HashMap<String, String>) -> Result<(), CerebroError> {
        match object(options)? {
            "models" => Ok(()),
            _ => Err(CerebroError::Unsupported("writing to cerebro.predictions")),
        }
    }

    fn insert(&mut self, row: &Row) -> Result<(), CerebroError> {
        models::queue_training(TrainRequest::from_row(row)?)
    }

    fn update(&mut self, _rowid: &Cell, _new_row: &Row) -> Result<(), CerebroError> {
        Err(CerebroError::Unsupported("UPDATE on cerebro.models"))
    }

    fn delete(&mut self, _rowid: &Cell) -> Result<(), CerebroError> {
        Err(CerebroError::Unsupported("DELETE on cerebro.models"))
    }

    fn fdw_routine_hook(routine: &mut FdwRoutine<AllocatedByRust>) {
        if let Some(original) = routine.GetForeignRelSize {
            let _ = WRAPPERS_REL_SIZE.set(original);
            routine.GetForeignRelSize = Some(rel_size_without_qual_warnings);
        }
    }
}

type RelSizeFn = unsafe extern "C-unwind" fn(*mut pg_sys::PlannerInfo, *mut pg_sys::RelOptInfo, pg_sys::Oid);

static WRAPPERS_REL_SIZE: OnceLock<RelSizeFn> = OnceLock::new();

/// The wrappers framework raises a WARNING, with a dump of the plan tree, for
/// every WHERE clause it cannot push down (`(metrics->>'auc')::float8 > 0.8`,
/// a subquery...). PostgreSQL evaluates those clauses itself, as it does for
/// any foreign scan, so the warning only alarms users: it is silenced while
/// the framework extracts the clauses, and the thresholds are restored even
/// when planning fails.
#[pg_guard]
unsafe extern "C-unwind" fn rel_size_without_qual_warnings(
    root: *mut pg_sys::PlannerInfo,
    baserel: *mut pg_sys::RelOptInfo,
    foreigntableid: pg_sys::Oid,
) {
    let original = *WRAPPERS_REL_SIZE.get().expect("set when the routine was built");
    // SAFETY: backend-local settings, restored below on every path.
    let saved = unsafe { (pg_sys::client_min_messages, pg_sys::log_min_messages) };
    unsafe {
        pg_sys::client_min_messages = pg_sys::PGERROR as i32;
        pg_sys::log_min_messages = pg_sys::PGERROR as i32;
    }
    PgTryBuilder::new(|| unsafe { original(root, baserel, foreigntableid) })
        .finally(|| unsafe {
            pg_sys::client_min_messages = saved.0;
            pg_sys::log_min_messages = saved.1;
        })
        .execute();
}
