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

use std::cell::RefCell;
use std::ffi::CString;

use cerebro_shared::batch::PackedColumn;
use cerebro_shared::pg_numeric::numeric_to_f64;
use pgrx::{pg_guard, pg_sys};

use crate::error::{CerebroError, Result};

/// A batch under construction: what PostgreSQL sees is `dest`, the rest
/// is ours. `repr(C)` keeps `dest` first, so the pointer PostgreSQL hands
/// back to the callbacks is a pointer to the whole receiver.
#[repr(C)]
struct Receiver {
    dest: pg_sys::DestReceiver,
    columns: Vec<PackedColumn>,
    /// How each column's values are read, from the query's types (`startup`).
    reads: Vec<Read>,
    /// Set by `startup` when the query's columns are not what `columns` wants.
    mismatch: Option<String>,
    /// The text of the columns from this one on is converted to UTF-8, as
    /// cerebrod reads it (features); the columns before it keep the
    /// database's encoding (keys, handed back to PostgreSQL).
    utf8_from: usize,
}

/// How a column's datums become a batch's values.
#[derive(Clone, Copy)]
enum Read {
    Float8,
    Float4,
    Int2,
    Int4,
    Int8,
    /// Decoded from its digits ([`numeric_to_f64`]), without the text
    /// round trip of `numeric::float8`.
    Numeric,
    /// Text as stored, in the database's encoding.
    Text,
    /// Text converted from the database's encoding to UTF-8
    /// ([`text_to_utf8`]), in a database whose encoding is another.
    TextToUtf8,
}

impl Read {
    /// How a value of type `type_oid` is read into `column`, if it can be.
    fn of(column: &PackedColumn, type_oid: pg_sys::Oid) -> Option<Read> {
        Some(match (column, type_oid) {
            (PackedColumn::Float64 { .. }, pg_sys::FLOAT8OID) => Read::Float8,
            (PackedColumn::Float64 { .. }, pg_sys::FLOAT4OID) => Read::Float4,
            (PackedColumn::Float64 { .. }, pg_sys::INT2OID) => Read::Int2,
            (PackedColumn::Float64 { .. }, pg_sys::INT4OID) => Read::Int4,
            (PackedColumn::Float64 { .. }, pg_sys::INT8OID) => Read::Int8,
            (PackedColumn::Float64 { .. }, pg_sys::NUMERICOID) => Read::Numeric,
            (PackedColumn::Text { .. }, pg_sys::TEXTOID) => Read::Text,
            _ => return None,
        })
    }
}

impl Read {
    /// A non-NULL number datum as an f64; `None` for bytes no numeric
    /// would store, or for text.
    ///
    /// # Safety
    /// `value` is a datum of the type this `Read` was chosen for.
    unsafe fn number(self, value: pg_sys::Datum) -> Option<f64> {
        // Pass-by-value types are in the datum itself (float8 and int8 are
        // on every 64-bit build pgrx supports).
        match self {
            Read::Float8 => Some(f64::from_bits(value.value() as u64)),
            Read::Float4 => Some(f32::from_bits(value.value() as u32) as f64),
            Read::Int2 => Some(value.value() as i16 as f64),
            Read::Int4 => Some(value.value() as i32 as f64),
            Read::Int8 => Some(value.value() as i64 as f64),
            Read::Numeric => {
                // SAFETY: a numeric is a varlena.
                let (bytes, copy) = unsafe { varlena_bytes(value) };
                let number = numeric_to_f64(bytes);
                if let Some(copy) = copy {
                    // SAFETY: the detoasted copy is ours.
                    unsafe { pg_sys::pfree(copy.cast()) };
                }
                number
            }
            Read::Text | Read::TextToUtf8 => None,
        }
    }
}

/// Whether text read in this database must be converted for cerebrod,
/// which reads UTF-8 (a snapshot reaches it in UTF-8: COPY converts to the
/// client's encoding). SQL_ASCII declares no encoding: its bytes pass as
/// they are.
pub fn text_needs_utf8() -> bool {
    // SAFETY: reads a backend global.
    let encoding = unsafe { pg_sys::GetDatabaseEncoding() };
    encoding != pg_sys::pg_enc::PG_UTF8 as i32 && encoding != pg_sys::pg_enc::PG_SQL_ASCII as i32
}

/// Whether a datum of type `type_oid` reads as a Rust string: pgrx reads
/// text as UTF-8, which a value of a database in another encoding is only
/// when it is ASCII (any value of another type reads as its own Rust type).
///
/// # Safety
/// `value` is a non-NULL datum of type `type_oid`.
pub unsafe fn reads_as_string(value: pg_sys::Datum, type_oid: pg_sys::Oid) -> bool {
    if !text_needs_utf8() || ![pg_sys::TEXTOID, pg_sys::VARCHAROID, pg_sys::BPCHAROID].contains(&type_oid) {
        return true;
    }
    // SAFETY: these types are varlenas.
    unsafe {
        let (bytes, copy) = varlena_bytes(value);
        let ascii = bytes.is_ascii();
        if let Some(copy) = copy {
            pg_sys::pfree(copy.cast());
        }
        ascii
    }
}

/// `bytes`, text in the database's encoding, as UTF-8: the same bytes when
/// they need no conversion (ASCII), else a palloc'd copy for the caller to
/// free. Every server encoding converts to UTF-8.
///
/// # Safety
/// Called in a backend, with `bytes` a valid string of the database's encoding.
pub unsafe fn text_to_utf8(bytes: &[u8]) -> (&[u8], Option<*mut std::ffi::c_char>) {
    // SAFETY: as the caller promises; the result is NUL-terminated when it
    // is a copy.
    unsafe {
        let converted =
            pg_sys::pg_server_to_any(bytes.as_ptr().cast(), bytes.len() as i32, pg_sys::pg_enc::PG_UTF8 as i32);
        if converted.cast_const().cast::<u8>() == bytes.as_ptr() {
            (bytes, None)
        } else {
            (std::ffi::CStr::from_ptr(converted).to_bytes(), Some(converted))
        }
    }
}

/// A non-NULL datum of built-in type `type_oid` as an f64, read as scans
/// read numbers; `None` when the type is not one of [`reads_as_number`]'s.
///
/// # Safety
/// `value` is a datum of type `type_oid`.
pub unsafe fn number_of(type_oid: pg_sys::Oid, value: pg_sys::Datum) -> Option<Option<f64>> {
    // SAFETY: as the caller promises.
    Read::of(&PackedColumn::float64(0), type_oid).map(|read| unsafe { read.number(value) })
}

/// Whether a number column of built-in type `type_oid` is read as it is
/// stored, rather than cast to `float8` by the query: the integers, the
/// floats and `numeric`, whose casts cost more than reading them here.
pub fn reads_as_number(type_oid: pg_sys::Oid) -> bool {
    Read::of(&PackedColumn::float64(0), type_oid).is_some()
}

/// A varlena's bytes, read where they lie when short and inline, and the
/// detoasted copy they lie in otherwise, for the caller to free.
///
/// # Safety
/// `value` is a valid varlena datum.
unsafe fn varlena_bytes<'a>(value: pg_sys::Datum) -> (&'a [u8], Option<*mut pg_sys::varlena>) {
    // SAFETY: as the caller promises; compressed or out-of-line values are
    // copied first.
    unsafe {
        let raw = value.cast_mut_ptr::<pg_sys::varlena>();
        let extended = pgrx::varlena::varatt_is_1b_e(raw) || pgrx::varlena::varatt_is_4b_c(raw);
        let plain = if extended { pg_sys::pg_detoast_datum_packed(raw) } else { raw };
        let bytes = std::slice::from_raw_parts(
            pgrx::varlena::vardata_any(plain) as *const u8,
            pgrx::varlena::varsize_any_exhdr(plain),
        );
        (bytes, (plain != raw).then_some(plain))
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
        let mut reads = Vec::with_capacity(natts);
        let convert = text_needs_utf8();
        for (i, (attr, column)) in attrs.iter().zip(&receiver.columns).enumerate() {
            match Read::of(column, attr.atttypid) {
                Some(Read::Text) if convert && i >= receiver.utf8_from => reads.push(Read::TextToUtf8),
                Some(read) => reads.push(read),
                None => {
                    receiver.mismatch = Some(format!("column {} has type {:?}", i + 1, attr.atttypid));
                    return;
                }
            }
        }
        receiver.reads = reads;
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
        let Receiver { columns, reads, .. } = receiver;
        for (((column, read), value), null) in columns.iter_mut().zip(reads.iter()).zip(values).zip(nulls) {
            if *null {
                column.push_null();
                continue;
            }
            match read {
                Read::Text => {
                    let (bytes, copy) = varlena_bytes(*value);
                    column.push_text(Some(bytes));
                    if let Some(copy) = copy {
                        pg_sys::pfree(copy.cast());
                    }
                }
                Read::TextToUtf8 => {
                    let (bytes, copy) = varlena_bytes(*value);
                    let (utf8, converted) = text_to_utf8(bytes);
                    column.push_text(Some(utf8));
                    if let Some(converted) = converted {
                        pg_sys::pfree(converted.cast());
                    }
                    if let Some(copy) = copy {
                        pg_sys::pfree(copy.cast());
                    }
                }
                // Bytes a numeric's type would never store read as NULL.
                number => column.push_f64(number.number(*value)),
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
/// `columns` (empty, one per column of the cursor's query: a number type
/// [`reads_as_number`] accepts for a [`PackedColumn::Float64`], `text` for
/// a [`PackedColumn::Text`]) and returns them filled. The text of columns
/// `utf8_from` and after is converted to UTF-8 where the database's
/// encoding is another ([`text_needs_utf8`]); the columns before keep it.
pub fn fetch_into(cursor: &str, rows: i64, columns: Vec<PackedColumn>, utf8_from: usize) -> Result<Vec<PackedColumn>> {
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
        reads: Vec::new(),
        mismatch: None,
        utf8_from,
    });
    // SAFETY: the portal is looked up by name and checked; the receiver
    // outlives the fetch, which calls back into it only during the call.
    // This is what FETCH does with a cursor (PerformPortalFetch): the
    // portal keeps its snapshot and runs in its own memory context.
    unsafe {
        let portal = pg_sys::GetPortalByName(name.as_ptr());
        if portal.is_null() {
            return Err(CerebroError::SourceCursorClosed(cursor.to_owned()));
        }
        let dest = &mut receiver.dest as *mut pg_sys::DestReceiver;
        pg_sys::PortalRunFetch(portal, pg_sys::FetchDirection::FETCH_FORWARD, rows as std::ffi::c_long, dest);
    }
    match receiver.mismatch.take() {
        Some(what) => Err(CerebroError::Protocol(format!("the scoring query's rows are not as planned: {what}"))),
        None => Ok(receiver.columns),
    }
}

/// PostgreSQL's InvalidSubTransactionId: a portal's `createSubid` once it
/// is kept past its transaction (pgrx does not export the macro).
const INVALID_SUBTRANSACTION_ID: pg_sys::SubTransactionId = 0;

thread_local! {
    /// The scans' source cursors marked holdable, by name, and whether
    /// their scan went away without closing them (see [`abandon_hold`]).
    static HELD: RefCell<Vec<(String, bool)>> = const { RefCell::new(Vec::new()) };
}

/// Marks the scan's own cursor `cursor` holdable when the portal the scan
/// starts in is (a cursor declared `WITH HOLD`). At COMMIT PostgreSQL keeps
/// such a cursor by running its query to the end, and drops the
/// transaction's other cursors in the order of its table of portal names:
/// before this, the scan's source cursor could be dropped first, and the
/// scan then failed halfway (depending on the user's cursor's name). Held
/// too, the source cursor keeps its rows until the scan ends and closes it
/// ([`release_hold`]). It is made forward-only, so that keeping it stores
/// only the rows not read yet rather than running its query again from
/// the start. First closes source cursors of scans gone since.
pub fn hold_with_active_portal(cursor: &str) -> Result<()> {
    close_abandoned_holds();
    let name = CString::new(cursor).map_err(|_| CerebroError::SourceCursorClosed(cursor.to_owned()))?;
    // SAFETY: ActivePortal is the portal being started or run, set by
    // PortalStart/PortalRun around the executor (this runs inside it); the
    // scan's cursor is looked up by name and checked, and has not been
    // fetched from yet.
    unsafe {
        let active = pg_sys::ActivePortal;
        if active.is_null() || (*active).cursorOptions & pg_sys::CURSOR_OPT_HOLD as i32 == 0 {
            return Ok(());
        }
        let portal = pg_sys::GetPortalByName(name.as_ptr());
        if portal.is_null() {
            return Err(CerebroError::SourceCursorClosed(cursor.to_owned()));
        }
        let options = (*portal).cursorOptions & !(pg_sys::CURSOR_OPT_SCROLL as i32);
        (*portal).cursorOptions = options | (pg_sys::CURSOR_OPT_NO_SCROLL | pg_sys::CURSOR_OPT_HOLD) as i32;
    }
    HELD.with(|held| held.borrow_mut().push((cursor.to_owned(), false)));
    Ok(())
}

/// The scan closed its source cursor `cursor` itself.
pub fn release_hold(cursor: &str) {
    HELD.with(|held| held.borrow_mut().retain(|(name, _)| name != cursor));
}

/// The scan went away without closing its source cursor `cursor` (its
/// query failed or was abandoned, so PostgreSQL never ended it): a cursor
/// not kept yet goes back to ending with its transaction; one already kept
/// past COMMIT is closed when the next scan starts. Runs from a memory
/// context's reset callback, so it only looks the portal up and flips a
/// flag: nothing that allocates or raises.
pub fn abandon_hold(cursor: &str) {
    HELD.with(|held| {
        let mut held = held.borrow_mut();
        let Some(at) = held.iter().position(|(name, _)| name == cursor) else { return };
        let Ok(name) = CString::new(cursor) else { return };
        // SAFETY: a lookup in the portal table, which neither allocates nor
        // raises; a portal not kept yet was created in this transaction.
        let kept = unsafe {
            let portal = pg_sys::GetPortalByName(name.as_ptr());
            if !portal.is_null() && (*portal).createSubid != INVALID_SUBTRANSACTION_ID {
                (*portal).cursorOptions &= !(pg_sys::CURSOR_OPT_HOLD as i32);
                false
            } else {
                !portal.is_null()
            }
        };
        if kept {
            held[at].1 = true;
        } else {
            held.remove(at);
        }
    });
}

/// Closes the source cursors that scans gone left kept past their
/// transaction ([`abandon_hold`]).
fn close_abandoned_holds() {
    let abandoned: Vec<String> = HELD.with(|held| {
        let mut held = held.borrow_mut();
        let gone = held.iter().filter(|(_, abandoned)| *abandoned).map(|(name, _)| name.clone()).collect();
        held.retain(|(_, abandoned)| !abandoned);
        gone
    });
    for cursor in abandoned {
        let Ok(name) = CString::new(cursor) else { continue };
        // SAFETY: looked up by name and checked; a portal that is running
        // is left alone.
        unsafe {
            let portal = pg_sys::GetPortalByName(name.as_ptr());
            if !portal.is_null() && (*portal).status != pg_sys::PortalStatus::PORTAL_ACTIVE {
                pg_sys::SPI_cursor_close(portal);
            }
        }
    }
}
