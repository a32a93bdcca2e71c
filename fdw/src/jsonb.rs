//! jsonb a user wrote, read without panicking.
//!
//! pgrx's `JsonB` turns a datum into a `serde_json::Value` with `expect`:
//! jsonb PostgreSQL accepts but serde_json refuses (a number like `1e400`,
//! nesting deeper than 128) panicked in the backend and reached the client as
//! XX000 with a Rust backtrace. [`JsonbText`] takes the datum's text and
//! [`parse`] turns it into a value or a precise error.

use cerebro_shared::spec::{parse_json_within, MAX_OPTIONS_BYTES, MAX_OPTIONS_DEPTH};
use pgrx::callconv::{Arg, ArgAbi};
use pgrx::nullable::Nullable;
use pgrx::pg_sys;
use pgrx::pgrx_sql_entity_graph::metadata::{ArgumentError, Returns, ReturnsError, SqlMapping, SqlTranslatable};
use pgrx::FromDatum;
use serde_json::Value;

use crate::error::CerebroError;

/// A jsonb value as PostgreSQL writes it out.
pub struct JsonbText(pub String);

impl JsonbText {
    /// The text of a jsonb datum.
    ///
    /// # Safety
    /// `datum` must be a jsonb datum.
    pub unsafe fn of_datum(datum: pg_sys::Datum) -> JsonbText {
        unsafe {
            let text = pg_sys::OidOutputFunctionCall(pg_sys::Oid::from(pg_sys::F_JSONB_OUT), datum);
            let owned = std::ffi::CStr::from_ptr(text).to_string_lossy().into_owned();
            pg_sys::pfree(text.cast());
            JsonbText(owned)
        }
    }

    /// The value, or why Cerebro cannot read it: within the size and depth
    /// of options (checked without recursion), numbers that fit an f64.
    pub fn parse(&self, what: &str) -> Result<Value, CerebroError> {
        parse_json_within(&self.0, MAX_OPTIONS_BYTES, MAX_OPTIONS_DEPTH)
            .map_err(|reason| CerebroError::UnusableJson { what: what.to_owned(), reason })
    }
}

impl FromDatum for JsonbText {
    unsafe fn from_polymorphic_datum(datum: pg_sys::Datum, is_null: bool, _: pg_sys::Oid) -> Option<JsonbText> {
        (!is_null).then(|| unsafe { JsonbText::of_datum(datum) })
    }
}

unsafe impl<'fcx> ArgAbi<'fcx> for JsonbText {
    unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> JsonbText {
        let index = arg.index();
        unsafe { arg.unbox_arg_using_from_datum() }.unwrap_or_else(|| panic!("argument {index} must not be null"))
    }

    unsafe fn unbox_nullable_arg(arg: Arg<'_, 'fcx>) -> Nullable<JsonbText> {
        unsafe { arg.unbox_arg_using_from_datum() }.into()
    }
}

unsafe impl SqlTranslatable for JsonbText {
    fn argument_sql() -> Result<SqlMapping, ArgumentError> {
        Ok(SqlMapping::literal("jsonb"))
    }

    fn return_sql() -> Result<Returns, ReturnsError> {
        Ok(Returns::One(SqlMapping::literal("jsonb")))
    }
}
