//! The one foreign data wrapper behind `cerebro.models` and
//! `cerebro.predictions`; the table option `object` says which is which.
//!
//! supabase-wrappers provides the handler, the validator and the modify
//! callbacks; scans and INSERT's row conversion are Cerebro's own
//! (`fdw_routine_hook`): see foreign_scan.rs for why.

use std::collections::HashMap;

use pgrx::prelude::*;
use pgrx::{pg_sys, AllocatedByRust, JsonB};
use supabase_wrappers::prelude::*;
use supabase_wrappers::FdwRoutine;

use crate::error::CerebroError;
use crate::foreign_scan;
use crate::jsonb::JsonbText;
use crate::models::{self, ModelRow, TrainRequest};
use crate::predictions::{text_datum, PredictionScan};

enum Scan {
    Models {
        rows: std::vec::IntoIter<ModelRow>,
        columns: Vec<Column>,
    },
    /// Hands out its rows through [`foreign_scan::SlotRows`].
    Predictions(Box<PredictionScan>),
}

#[wrappers_fdw(version = "0.1.0", author = "Cerebro", error_type = "CerebroError")]
pub struct CerebroFdw {
    socket: Option<String>,
    scan: Option<Scan>,
}

fn object(options: &HashMap<String, String>) -> Result<&str, CerebroError> {
    match options.get("object").map(String::as_str) {
        Some(o @ ("models" | "predictions")) => Ok(o),
        other => Err(CerebroError::UnknownObject(other.unwrap_or("").to_owned())),
    }
}

impl foreign_scan::SlotRows for CerebroFdw {
    fn next_into(&mut self, values: &mut [pg_sys::Datum], nulls: &mut [bool]) -> Option<Result<bool, CerebroError>> {
        match self.scan.as_mut() {
            Some(Scan::Predictions(scan)) => Some(scan.next_into(values, nulls)),
            _ => None,
        }
    }
}

impl ForeignDataWrapper<CerebroError> for CerebroFdw {
    fn new(server: ForeignServer) -> Result<Self, CerebroError> {
        Ok(CerebroFdw { socket: server.options.get("socket").cloned(), scan: None })
    }

    fn begin_scan(
        &mut self,
        quals: &[Qual],
        columns: &[Column],
        _sorts: &[Sort],
        _limit: &Option<Limit>,
        options: &HashMap<String, String>,
    ) -> Result<(), CerebroError> {
        self.scan = Some(match object(options)? {
            "models" => Scan::Models { rows: models::list_models()?.into_iter(), columns: columns.to_vec() },
            _ => {
                let socket = self.socket.as_deref().ok_or(CerebroError::MissingSocket)?;
                Scan::Predictions(Box::new(PredictionScan::begin(quals, socket, columns)?))
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
            Some(Scan::Predictions(_)) => unreachable!("a predictions scan hands out its rows through next_into"),
        }
    }

    fn end_scan(&mut self) -> Result<(), CerebroError> {
        if let Some(Scan::Predictions(mut scan)) = self.scan.take() {
            scan.end();
        }
        Ok(())
    }

    fn fdw_routine_hook(routine: &mut FdwRoutine<AllocatedByRust>) {
        routine.GetForeignRelSize = Some(foreign_scan::get_foreign_rel_size);
        routine.GetForeignPaths = Some(foreign_scan::get_foreign_paths);
        routine.GetForeignPlan = Some(foreign_scan::get_foreign_plan);
        routine.ExplainForeignScan = Some(foreign_scan::explain_foreign_scan);
        routine.BeginForeignScan = Some(foreign_scan::begin_foreign_scan::<Self>);
        routine.IterateForeignScan = Some(foreign_scan::iterate_foreign_scan::<Self>);
        routine.ReScanForeignScan = Some(foreign_scan::re_scan_foreign_scan::<Self>);
        routine.EndForeignScan = Some(foreign_scan::end_foreign_scan::<Self>);
        // The framework's aggregate pushdown reads the planning state its
        // own callbacks kept; Cerebro pushes no aggregates.
        routine.GetForeignUpperPaths = None;
        // The framework's modify state lived in a memory context of the
        // backend's whole life, freed only at EndForeignModify, which an
        // ERROR skips: Cerebro's modify callbacks keep no state at all.
        routine.PlanForeignModify = Some(plan_foreign_modify);
        routine.BeginForeignModify = Some(begin_foreign_modify);
        routine.EndForeignModify = Some(end_foreign_modify);
        routine.ExecForeignInsert = Some(exec_foreign_insert);
        // Refused before the framework converts the row (see exec_foreign_insert).
        routine.ExecForeignUpdate = Some(exec_foreign_update);
        routine.ExecForeignDelete = Some(exec_foreign_delete);
    }
}

/// Plans nothing: the modify callbacks keep no state. The framework's refuses
/// any `RETURNING` list; an INSERT's `RETURNING` reads the row as queued
/// (see exec_foreign_insert), and UPDATE and DELETE are refused when they run.
#[pg_guard]
unsafe extern "C-unwind" fn plan_foreign_modify(
    _root: *mut pg_sys::PlannerInfo,
    _plan: *mut pg_sys::ModifyTable,
    _result_relation: pg_sys::Index,
    _subplan_index: i32,
) -> *mut pg_sys::List {
    std::ptr::null_mut()
}

/// Only `cerebro.models` takes rows.
#[pg_guard]
unsafe extern "C-unwind" fn begin_foreign_modify(
    _mtstate: *mut pg_sys::ModifyTableState,
    rinfo: *mut pg_sys::ResultRelInfo,
    _fdw_private: *mut pg_sys::List,
    _subplan_index: i32,
    _eflags: i32,
) {
    let options = unsafe { foreign_scan::table_options((*(*rinfo).ri_RelationDesc).rd_id) };
    let writable = match object(&options) {
        Ok("models") => Ok(()),
        Ok(_) => Err(CerebroError::Unsupported("writing to cerebro.predictions")),
        Err(e) => Err(e),
    };
    if let Err(e) = writable {
        crate::error::raise(e);
    }
    unsafe { (*rinfo).ri_FdwState = std::ptr::null_mut() };
}

#[pg_guard]
unsafe extern "C-unwind" fn end_foreign_modify(_estate: *mut pg_sys::EState, _rinfo: *mut pg_sys::ResultRelInfo) {}

#[pg_guard]
unsafe extern "C-unwind" fn exec_foreign_update(
    _estate: *mut pg_sys::EState,
    _rinfo: *mut pg_sys::ResultRelInfo,
    _slot: *mut pg_sys::TupleTableSlot,
    _plan_slot: *mut pg_sys::TupleTableSlot,
) -> *mut pg_sys::TupleTableSlot {
    crate::error::raise(CerebroError::Unsupported("UPDATE on cerebro.models"))
}

#[pg_guard]
unsafe extern "C-unwind" fn exec_foreign_delete(
    _estate: *mut pg_sys::EState,
    _rinfo: *mut pg_sys::ResultRelInfo,
    _slot: *mut pg_sys::TupleTableSlot,
    _plan_slot: *mut pg_sys::TupleTableSlot,
) -> *mut pg_sys::TupleTableSlot {
    crate::error::raise(CerebroError::Unsupported("DELETE on cerebro.models"))
}

/// One INSERT into `cerebro.models`: the row becomes a training request.
/// The framework's conversion of the row panics on jsonb serde_json cannot
/// hold (see jsonb.rs); this one reads jsonb as text and says what is wrong.
/// The row handed back (what `RETURNING` reads) is the one written, with
/// the version queued (a selection's first candidate) and its status.
#[pg_guard]
unsafe extern "C-unwind" fn exec_foreign_insert(
    _estate: *mut pg_sys::EState,
    _rinfo: *mut pg_sys::ResultRelInfo,
    slot: *mut pg_sys::TupleTableSlot,
    _plan_slot: *mut pg_sys::TupleTableSlot,
) -> *mut pg_sys::TupleTableSlot {
    let queued =
        unsafe { inserted_row(slot) }.and_then(|row| crate::training::queue_training(TrainRequest::from_row(&row)?));
    match queued {
        Ok(version) => unsafe { store_queued(slot, version) },
        Err(e) => crate::error::raise(e),
    }
    slot
}

/// Replaces `slot`'s row (every attribute already read by inserted_row) by
/// the same with `version` and `status` as queued, as postgres_fdw stores a
/// remote INSERT's RETURNING row.
unsafe fn store_queued(slot: *mut pg_sys::TupleTableSlot, version: Option<i32>) {
    // SAFETY: the slot holds the inserted row with all its attributes
    // deformed; the new tuple copies every value before the slot lets the
    // old row go, and the slot frees it.
    unsafe {
        let desc = (*slot).tts_tupleDescriptor;
        let natts = (*desc).natts as usize;
        let mut values = std::slice::from_raw_parts((*slot).tts_values, natts).to_vec();
        let mut nulls = std::slice::from_raw_parts((*slot).tts_isnull, natts).to_vec();
        for (i, attr) in (*desc).attrs.as_slice(natts).iter().enumerate() {
            if attr.attisdropped {
                continue;
            }
            match (pgrx::name_data_to_str(&attr.attname), attr.atttypid) {
                ("version", pg_sys::INT4OID) => {
                    values[i] = pg_sys::Datum::from(version.unwrap_or(0));
                    nulls[i] = version.is_none();
                }
                ("status", pg_sys::TEXTOID) => {
                    values[i] = text_datum(cerebro_shared::sql::ModelStatus::Queued.to_string().as_bytes());
                    nulls[i] = false;
                }
                _ => {}
            }
        }
        let tuple = pg_sys::heap_form_tuple(desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        pg_sys::ExecForceStoreHeapTuple(tuple, slot, true);
    }
}

unsafe fn inserted_row(slot: *mut pg_sys::TupleTableSlot) -> Result<Row, CerebroError> {
    let mut row = Row::new();
    unsafe {
        let desc = (*slot).tts_tupleDescriptor;
        let natts = (*desc).natts as usize;
        if ((*slot).tts_nvalid as usize) < natts {
            pg_sys::slot_getsomeattrs_int(slot, natts as i32);
        }
        let values = std::slice::from_raw_parts((*slot).tts_values, natts);
        let nulls = std::slice::from_raw_parts((*slot).tts_isnull, natts);
        for (i, attr) in (*desc).attrs.as_slice(natts).iter().enumerate() {
            if attr.attisdropped {
                continue;
            }
            let name = pgrx::name_data_to_str(&attr.attname);
            let cell = if nulls[i] {
                None
            } else if attr.atttypid == pg_sys::JSONBOID {
                Some(Cell::Json(JsonB(JsonbText::of_datum(values[i]).parse(name)?)))
            } else {
                Cell::from_polymorphic_datum(values[i], false, attr.atttypid)
            };
            row.push(name, cell);
        }
    }
    Ok(row)
}
