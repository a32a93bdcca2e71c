//! Reads a cursor's rows straight into a scoring batch's columns.
//!
//! `SPI_cursor_fetch` materialises every batch as a table of heap tuples,
//! and reading a value back out of one walks the tuple from its start
//! (`nocachegetattr`) under a guarded call per value: for a batch of twenty
//! columns, most of the backend's time when it scores a table. Here the
//! cursor's portal runs into a receiver of our own, as `FETCH` runs a
//! cursor into its client: each row arrives as a slot, is deformed once,
//! and its values are appended to columns already in the region's encoding
//! ([`PackedColumn`]), with no tuple formed and no allocation per value.

use std::ffi::CString;

use cerebro_shared::batch::PackedColumn;
use pgrx::{pg_guard, pg_sys};

use crate::error::{CerebroError, Result};

/// A batch under construction: what PostgreSQL sees is `dest`, the rest
/// is ours. `repr(C)` keeps `dest` first, so the pointer PostgreSQL hands
/// back to the callbacks is a pointer to the whole receiver.
#[repr(C)]
struct Receiver {
    dest: pg_sys::DestReceiver,
    columns: Vec<PackedColumn>,
    /// Set by `startup` when the query's columns are not what `columns` wants.
    mismatch: Option<String>,
}

fn wanted_type(column: &PackedColumn) -> pg_sys::Oid {
    match column {
        PackedColumn::Float64 { .. } => pg_sys::FLOAT8OID,
        PackedColumn::Text { .. } => pg_sys::TEXTOID,
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn startup(dest: *mut pg_sys::DestReceiver, _operation: i32, typeinfo: pg_sys::TupleDesc) {
    // SAFETY: `dest` is the first field of the Receiver `fetch_into` made,
    // and `typeinfo` the portal's valid result descriptor.
    unsafe {
        let receiver = &mut *(dest as *mut Receiver);
        let natts = (*typeinfo).natts as usize;
        if natts != receiver.columns.len() {
            receiver.mismatch = Some(format!("{natts} columns, {} wanted", receiver.columns.len()));
            return;
        }
        let attrs = (*typeinfo).attrs.as_slice(natts);
        for (i, (attr, column)) in attrs.iter().zip(&receiver.columns).enumerate() {
            if attr.atttypid != wanted_type(column) {
                receiver.mismatch = Some(format!("column {} has type {:?}", i + 1, attr.atttypid));
                return;
            }
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn receive(slot: *mut pg_sys::TupleTableSlot, dest: *mut pg_sys::DestReceiver) -> bool {
    // SAFETY: as in `startup`; `slot` holds a row of the descriptor
    // `startup` checked, deformed below before its values are read.
    unsafe {
        let receiver = &mut *(dest as *mut Receiver);
        if receiver.mismatch.is_some() {
            return true;
        }
        let natts = receiver.columns.len();
        if ((*slot).tts_nvalid as usize) < natts {
            pg_sys::slot_getsomeattrs_int(slot, natts as i32);
        }
        let values = std::slice::from_raw_parts((*slot).tts_values, natts);
        let nulls = std::slice::from_raw_parts((*slot).tts_isnull, natts);
        for ((column, value), null) in receiver.columns.iter_mut().zip(values).zip(nulls) {
            match column {
                // float8 is passed by value on every 64-bit build pgrx supports.
                PackedColumn::Float64 { .. } => column.push_f64((!null).then(|| f64::from_bits(value.value() as u64))),
                PackedColumn::Text { .. } if *null => column.push_text(None),
                PackedColumn::Text { .. } => {
                    let raw = value.cast_mut_ptr::<pg_sys::varlena>();
                    // Compressed or out-of-line values need a copy; most
                    // are short and inline, read where they lie.
                    let extended = pgrx::varlena::varatt_is_1b_e(raw) || pgrx::varlena::varatt_is_4b_c(raw);
                    let plain = if extended { pg_sys::pg_detoast_datum_packed(raw) } else { raw };
                    let bytes = std::slice::from_raw_parts(
                        pgrx::varlena::vardata_any(plain) as *const u8,
                        pgrx::varlena::varsize_any_exhdr(plain),
                    );
                    column.push_text(Some(bytes));
                    if plain != raw {
                        pg_sys::pfree(plain.cast());
                    }
                }
            }
        }
        true
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn shutdown(_dest: *mut pg_sys::DestReceiver) {}

#[pg_guard]
unsafe extern "C-unwind" fn destroy(_dest: *mut pg_sys::DestReceiver) {}

/// Fetches up to `rows` more rows of the open cursor `cursor` into
/// `columns` (empty, one per column of the cursor's query: `float8` for a
/// [`PackedColumn::Float64`], `text` for a [`PackedColumn::Text`]) and
/// returns them filled.
pub fn fetch_into(cursor: &str, rows: i64, columns: Vec<PackedColumn>) -> Result<Vec<PackedColumn>> {
    let name = CString::new(cursor).map_err(|_| CerebroError::Protocol(format!("cursor name {cursor:?}")))?;
    let mut receiver = Box::new(Receiver {
        dest: pg_sys::DestReceiver {
            receiveSlot: Some(receive),
            rStartup: Some(startup),
            rShutdown: Some(shutdown),
            rDestroy: Some(destroy),
            mydest: pg_sys::CommandDest::DestNone,
        },
        columns,
        mismatch: None,
    });
    // SAFETY: the portal is looked up by name and checked; the receiver
    // outlives the fetch, which calls back into it only during the call.
    // This is what FETCH does with a cursor (PerformPortalFetch): the
    // portal keeps its snapshot and runs in its own memory context.
    unsafe {
        let portal = pg_sys::GetPortalByName(name.as_ptr());
        if portal.is_null() {
            return Err(CerebroError::Protocol(format!("cursor {cursor} is not open")));
        }
        let dest = &mut receiver.dest as *mut pg_sys::DestReceiver;
        pg_sys::PortalRunFetch(portal, pg_sys::FetchDirection::FETCH_FORWARD, rows as std::ffi::c_long, dest);
    }
    match receiver.mismatch.take() {
        Some(what) => Err(CerebroError::Protocol(format!("the scoring query's rows are not as planned: {what}"))),
        None => Ok(receiver.columns),
    }
}
