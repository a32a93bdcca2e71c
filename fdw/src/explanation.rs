//! A row's explanation (`cerebro_shared::explanation::Explanation`) made
//! into a jsonb datum directly: its values pushed into PostgreSQL's jsonb
//! builder (`pushJsonbValue`), rather than written as JSON text for
//! `jsonb_in` to lex again, which took about a quarter of an explaining
//! scan's backend time. The shape is the one the explanation's JSON text
//! has (a test checks the two are equal jsonb).

use std::ffi::c_char;
use std::marker::PhantomData;

use cerebro_shared::explanation::{finite, non_finite_name, Explanation, Shown};
use cerebro_shared::pg_numeric::shortest_decimal;
use pgrx::pg_sys;
use pgrx::pg_sys::JsonbIteratorToken::{
    WJB_BEGIN_ARRAY, WJB_BEGIN_OBJECT, WJB_END_ARRAY, WJB_END_OBJECT, WJB_KEY, WJB_VALUE,
};

/// `e` as a jsonb datum, made in the current memory context. Strings are
/// UTF-8 and are converted to the database's encoding (an ERROR where a
/// character has no equivalent there, as `jsonb_in` raises for a `\u`
/// escape it cannot translate).
pub fn explanation_jsonb(e: &Explanation<'_>) -> pg_sys::Datum {
    let mut builder =
        Builder { state: std::ptr::null_mut(), convert: crate::fetch::text_needs_utf8(), strings: PhantomData };
    builder.push(WJB_BEGIN_OBJECT, None);
    if let Some(class) = e.class {
        builder.key("class");
        let class = builder.string(class);
        builder.push(WJB_VALUE, Some(class));
    }
    builder.key("baseline");
    let baseline = builder.number(finite(e.baseline));
    builder.push(WJB_VALUE, Some(baseline));
    builder.key("contributions");
    builder.push(WJB_BEGIN_ARRAY, None);
    for listed in &e.contributions {
        builder.push(WJB_BEGIN_OBJECT, None);
        builder.key("column");
        let column = builder.string(listed.column);
        builder.push(WJB_VALUE, Some(column));
        builder.key("value");
        let value = match &listed.value {
            Shown::Number(v) if v.is_finite() => builder.number(Some(*v)),
            // JSON has no NaN or infinity: those are shown by name.
            Shown::Number(v) => builder.string(non_finite_name(*v)),
            Shown::Text(text) => builder.string(text),
            Shown::Null => null(),
        };
        builder.push(WJB_VALUE, Some(value));
        builder.key("contribution");
        let contribution = builder.number(finite(listed.contribution));
        builder.push(WJB_VALUE, Some(contribution));
        builder.push(WJB_END_OBJECT, None);
    }
    builder.push(WJB_END_ARRAY, None);
    builder.key("rest");
    let rest = builder.number(finite(e.rest));
    builder.push(WJB_VALUE, Some(rest));
    let root = builder.push(WJB_END_OBJECT, None);
    // SAFETY: `root` is the finished object pushJsonbValue returned; the
    // strings its values point to are alive (borrowed from `e`, or
    // palloc'd by the conversion) until the jsonb is made from it here.
    pg_sys::Datum::from(unsafe { pg_sys::JsonbValueToJsonb(root) })
}

/// A jsonb being pushed together. Its string values point to the text
/// they are made from until the jsonb is made, so that text must live as
/// long as the builder (`'a`).
struct Builder<'a> {
    state: *mut pg_sys::JsonbParseState,
    /// Whether strings need converting: the database's encoding is neither
    /// UTF-8 nor SQL_ASCII (where PostgreSQL would take the bytes as they
    /// are, after checking what a Rust string already is).
    convert: bool,
    strings: PhantomData<&'a str>,
}

impl<'a> Builder<'a> {
    /// Pushes one token (with its value for a key, a value or an element);
    /// what `pushJsonbValue` returns (the finished container at the end).
    fn push(
        &mut self,
        token: pg_sys::JsonbIteratorToken::Type,
        value: Option<pg_sys::JsonbValue>,
    ) -> *mut pg_sys::JsonbValue {
        let mut value = value;
        let value = value.as_mut().map_or(std::ptr::null_mut(), |v| v as *mut pg_sys::JsonbValue);
        // SAFETY: `state` is this builder's (null at first, as
        // pushJsonbValue expects), the tokens come in the order jsonb
        // nests them, and a scalar value is copied by the call.
        unsafe { pg_sys::pushJsonbValue(&mut self.state, token, value) }
    }

    fn key(&mut self, name: &'static str) {
        // Keys are ASCII, the same in every database encoding.
        let key = jsonb_string(name.as_ptr().cast_mut().cast(), name.len());
        self.push(WJB_KEY, Some(key));
    }

    /// A string value, converted from UTF-8 to the database's encoding.
    fn string(&mut self, text: &'a str) -> pg_sys::JsonbValue {
        if !self.convert {
            return jsonb_string(text.as_ptr().cast_mut().cast(), text.len());
        }
        // SAFETY: `text` is valid UTF-8 of its length; the result is
        // `text` itself where no conversion is needed, else a palloc'd
        // copy in the current memory context, alive as long as the datum
        // being made.
        let converted = unsafe {
            pg_sys::pg_any_to_server(text.as_ptr().cast(), text.len() as i32, pg_sys::pg_enc::PG_UTF8 as i32)
        };
        let len = if std::ptr::eq(converted, text.as_ptr().cast()) {
            text.len()
        } else {
            // SAFETY: a converted string is NUL-terminated.
            unsafe { std::ffi::CStr::from_ptr(converted) }.to_bytes().len()
        };
        jsonb_string(converted, len)
    }

    /// A number, the numeric `numeric_in` reads from the shortest text that
    /// gives the f64 back (as the JSON text had it, display scale included),
    /// made from its digits without parsing text; or `null`.
    fn number(&mut self, v: Option<f64>) -> pg_sys::JsonbValue {
        let Some(v) = v else { return null() };
        let (digits, scale) = shortest_decimal(v).expect("a finite f64's shortest text has at most 17 digits");
        let mut value = null();
        value.type_ = pg_sys::jbvType::jbvNumeric;
        // SAFETY: makes a fresh numeric, digits × 10^−scale, in the
        // current memory context; any i64 and scale are accepted.
        value.val.numeric = unsafe { pg_sys::int64_div_fast_to_numeric(digits, scale) };
        value
    }
}

fn null() -> pg_sys::JsonbValue {
    // SAFETY: all zeroes is jbvNull with an unused payload.
    unsafe { std::mem::zeroed() }
}

fn jsonb_string(text: *mut c_char, len: usize) -> pg_sys::JsonbValue {
    let mut value = null();
    value.type_ = pg_sys::jbvType::jbvString;
    value.val.string = pg_sys::JsonbValue__bindgen_ty_1__bindgen_ty_1 { len: len as i32, val: text };
    value
}
