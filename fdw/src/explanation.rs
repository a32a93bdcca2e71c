//! A row's explanation (`cerebro_shared::explanation::Explanation`) made
//! into a jsonb datum: its bytes written in jsonb's binary format by
//! `cerebro_shared::jsonb`, then copied into one palloc'd datum. Writing
//! JSON text for `jsonb_in` to lex took about a quarter of an explaining
//! scan's backend time, and pushing each value into PostgreSQL's builder
//! (`pushJsonbValue`) about as much again, most of it guarded calls and
//! sorting keys known in advance. A test checks the bytes equal those
//! `jsonb_in` makes of the explanation's JSON text.

use std::borrow::Cow;

use cerebro_shared::explanation::{jsonb_value, Explanation};
use cerebro_shared::jsonb::{self, JsonbError};
use pgrx::pg_sys;

/// `e` as a jsonb datum in the current memory context; `scratch` holds its
/// bytes on the way (kept between rows). Strings are UTF-8 and are
/// converted to the database's encoding (an ERROR where a character has no
/// equivalent there, as `jsonb_in` raises for a `\u` escape it cannot
/// translate).
pub fn explanation_jsonb(e: &Explanation<'_>, scratch: &mut Vec<u8>) -> Result<pg_sys::Datum, JsonbError> {
    let convert = crate::fetch::text_needs_utf8();
    let value = jsonb_value(e, |text| if convert { to_server(text) } else { Cow::Borrowed(text.as_bytes()) });
    jsonb::write(&value, scratch)?;
    // SAFETY: a fresh allocation of the datum's size in the current memory
    // context, filled with its bytes; the header `write` left is then set
    // to the size, as SET_VARSIZE does.
    unsafe {
        let datum = pg_sys::palloc(scratch.len()).cast::<u8>();
        std::ptr::copy_nonoverlapping(scratch.as_ptr(), datum, scratch.len());
        pgrx::set_varsize_4b(datum.cast(), scratch.len() as i32);
        Ok(pg_sys::Datum::from(datum))
    }
}

/// `text`'s bytes in the database's encoding.
fn to_server(text: &str) -> Cow<'_, [u8]> {
    // SAFETY: `text` is valid UTF-8 of its length; the result is `text`
    // itself where no conversion is needed, else a palloc'd, NUL-terminated
    // copy, read here and freed.
    unsafe {
        let converted =
            pg_sys::pg_any_to_server(text.as_ptr().cast(), text.len() as i32, pg_sys::pg_enc::PG_UTF8 as i32);
        if std::ptr::eq(converted, text.as_ptr().cast()) {
            return Cow::Borrowed(text.as_bytes());
        }
        let bytes = std::ffi::CStr::from_ptr(converted).to_bytes().to_vec();
        pg_sys::pfree(converted.cast());
        Cow::Owned(bytes)
    }
}
