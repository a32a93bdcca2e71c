//! PostgreSQL's jsonb, written byte for byte from Rust values.
//!
//! A jsonb datum is a varlena holding one container: a header (the count of
//! elements or pairs, and whether it is an array or an object), one `JEntry`
//! per child (its kind, and its length or, every 32nd, its end offset), then
//! the children's data; an object lists its keys, sorted shorter first and
//! then bytewise, before its values; numerics and containers start at a
//! 4-byte boundary. This is `src/include/utils/jsonb.h` and
//! `src/backend/utils/adt/jsonb_util.c` (`convertToJsonb`), stable on disk
//! since PostgreSQL 9.4.
//!
//! An explaining scan returns a jsonb a row; made here in one pass, without
//! PostgreSQL's builder, it costs a fraction of pushing each value into
//! `pushJsonbValue` (fdw/src/explanation.rs, where a test checks the bytes
//! equal those `jsonb_in` makes of the same JSON text).

use std::borrow::Cow;

use thiserror::Error;

use crate::pg_numeric::{shortest_decimal, write_numeric};

/// A JSON value to write as jsonb. Strings are bytes in the database's
/// encoding; numbers are written as the numeric `numeric_in` reads from
/// their shortest text.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    Null,
    String(Cow<'a, [u8]>),
    Number(f64),
    Array(Vec<Value<'a>>),
    /// Pairs in any order, each key once. Keys are written as their UTF-8
    /// bytes: in a database of another encoding, only ASCII keys (the same
    /// bytes in every server encoding) are right.
    Object(Vec<(&'a str, Value<'a>)>),
}

#[derive(Debug, Error, PartialEq)]
pub enum JsonbError {
    #[error("jsonb has no value for the number {0}")]
    NotFinite(f64),
    #[error("a jsonb container's elements exceed jsonb's limit of {} bytes", OFFSET_OR_LENGTH)]
    TooLarge,
}

/// `JENTRY_OFFLENMASK`: the bits of a `JEntry` that hold a length or offset.
const OFFSET_OR_LENGTH: u32 = 0x0FFF_FFFF;
const HAS_OFFSET: u32 = 0x8000_0000;
const IS_STRING: u32 = 0x0000_0000;
const IS_NUMERIC: u32 = 0x1000_0000;
const IS_NULL: u32 = 0x4000_0000;
const IS_CONTAINER: u32 = 0x5000_0000;
/// Container header flags (`JB_FSCALAR`, `JB_FOBJECT`, `JB_FARRAY`).
const SCALAR: u32 = 0x1000_0000;
const OBJECT: u32 = 0x2000_0000;
const ARRAY: u32 = 0x4000_0000;
/// Every this many children, a `JEntry` holds its child's end offset
/// instead of its length (`JB_OFFSET_STRIDE`).
const OFFSET_STRIDE: usize = 32;
/// The varlena header's bytes: written last, when the size is known.
pub const VARLENA_HEADER: usize = 4;

/// Writes `value` as a jsonb datum into `out` (emptied first), leaving its
/// first [`VARLENA_HEADER`] bytes for the caller to set to the datum's
/// size (PostgreSQL's `SET_VARSIZE`): positions inside are aligned from
/// the datum's start, as PostgreSQL aligns them.
pub fn write(value: &Value<'_>, out: &mut Vec<u8>) -> Result<(), JsonbError> {
    out.clear();
    out.extend_from_slice(&[0; VARLENA_HEADER]);
    match value {
        Value::Array(elements) => write_array(elements, 0, out).map(drop),
        Value::Object(pairs) => write_object(pairs, out).map(drop),
        // A scalar on its own is a one-element array marked as a scalar.
        scalar => write_array(std::slice::from_ref(scalar), SCALAR, out).map(drop),
    }
}

/// Appends one value; returns its `JEntry` (kind and length).
fn write_value(value: &Value<'_>, out: &mut Vec<u8>) -> Result<u32, JsonbError> {
    let start = out.len();
    let kind = match value {
        Value::Null => IS_NULL,
        Value::String(bytes) => {
            out.extend_from_slice(bytes);
            IS_STRING
        }
        Value::Number(v) => {
            let (digits, scale) = shortest_decimal(*v).ok_or(JsonbError::NotFinite(*v))?;
            pad_to_int(out);
            write_numeric(digits, scale, out);
            IS_NUMERIC
        }
        Value::Array(elements) => return write_array(elements, 0, out),
        Value::Object(pairs) => return write_object(pairs, out),
    };
    Ok(kind | length(out.len() - start)?)
}

fn write_array(elements: &[Value<'_>], flags: u32, out: &mut Vec<u8>) -> Result<u32, JsonbError> {
    let start = out.len();
    pad_to_int(out);
    let entries = begin_container(elements.len() as u32 | ARRAY | flags, elements.len(), out)?;
    let mut children = Children { entries, at: 0, total: 0 };
    for element in elements {
        let entry = write_value(element, out)?;
        children.record(entry, out)?;
    }
    Ok(IS_CONTAINER | length(out.len() - start)?)
}

fn write_object(pairs: &[(&str, Value<'_>)], out: &mut Vec<u8>) -> Result<u32, JsonbError> {
    // jsonb's key order: shorter first, then bytewise. Pairs given in that
    // order (as a fixed shape can be) are written without sorting.
    let by_key = |a: &(&str, Value<'_>), b: &(&str, Value<'_>)| {
        a.0.len().cmp(&b.0.len()).then_with(|| a.0.as_bytes().cmp(b.0.as_bytes()))
    };
    if pairs.is_sorted_by(|a, b| by_key(a, b).is_lt()) {
        return write_pairs(pairs.iter(), out);
    }
    let mut sorted: Vec<&(&str, Value<'_>)> = pairs.iter().collect();
    sorted.sort_unstable_by(|a, b| by_key(a, b));
    debug_assert!(sorted.windows(2).all(|w| w[0].0 != w[1].0), "an object's keys are unique");
    write_pairs(sorted.into_iter(), out)
}

/// An object of `pairs`, in jsonb's key order: its keys, then its values.
fn write_pairs<'p, 'v: 'p>(
    pairs: impl ExactSizeIterator<Item = &'p (&'v str, Value<'v>)> + Clone,
    out: &mut Vec<u8>,
) -> Result<u32, JsonbError> {
    let start = out.len();
    pad_to_int(out);
    let count = pairs.len();
    let entries = begin_container(count as u32 | OBJECT, 2 * count, out)?;
    let mut children = Children { entries, at: 0, total: 0 };
    for (key, _) in pairs.clone() {
        out.extend_from_slice(key.as_bytes());
        children.record(IS_STRING | length(key.len())?, out)?;
    }
    for (_, value) in pairs {
        let entry = write_value(value, out)?;
        children.record(entry, out)?;
    }
    Ok(IS_CONTAINER | length(out.len() - start)?)
}

/// Appends a container's header and room for its `count` `JEntry`s;
/// returns where they start.
fn begin_container(header: u32, count: usize, out: &mut Vec<u8>) -> Result<usize, JsonbError> {
    if count > OFFSET_OR_LENGTH as usize {
        return Err(JsonbError::TooLarge);
    }
    out.extend_from_slice(&header.to_ne_bytes());
    let entries = out.len();
    out.resize(entries + 4 * count, 0);
    Ok(entries)
}

/// A container's `JEntry`s, filled in as its children are written.
struct Children {
    entries: usize,
    at: usize,
    /// The children's bytes so far.
    total: usize,
}

impl Children {
    fn record(&mut self, entry: u32, out: &mut [u8]) -> Result<(), JsonbError> {
        self.total += (entry & OFFSET_OR_LENGTH) as usize;
        let entry = if self.at.is_multiple_of(OFFSET_STRIDE) {
            (entry & !OFFSET_OR_LENGTH) | length(self.total)? | HAS_OFFSET
        } else {
            entry
        };
        let place = self.entries + 4 * self.at;
        out[place..place + 4].copy_from_slice(&entry.to_ne_bytes());
        self.at += 1;
        Ok(())
    }
}

fn length(bytes: usize) -> Result<u32, JsonbError> {
    u32::try_from(bytes).ok().filter(|&n| n <= OFFSET_OR_LENGTH).ok_or(JsonbError::TooLarge)
}

/// Zeroes up to the next 4-byte boundary (`padBufferToInt`).
fn pad_to_int(out: &mut Vec<u8>) {
    out.resize(out.len().next_multiple_of(4), 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(value: &Value<'_>) -> Vec<u8> {
        let mut out = vec![9; 3];
        write(value, &mut out).unwrap();
        out
    }

    fn words(bytes: &[u8]) -> Vec<u32> {
        bytes.chunks(4).map(|w| u32::from_ne_bytes(w.try_into().unwrap())).collect()
    }

    fn text(s: &str) -> Value<'_> {
        Value::String(Cow::Borrowed(s.as_bytes()))
    }

    #[test]
    fn an_objects_keys_come_sorted_shorter_first_before_its_values() {
        let out = written(&Value::Object(vec![("bb", text("x")), ("a", Value::Null), ("ab", text("yz"))]));
        assert_eq!(&out[..4], &[0; 4], "the varlena header is left to the caller");
        let header = words(&out[4..8])[0];
        assert_eq!(header, 3 | OBJECT);
        let entries = words(&out[8..32]);
        // Keys a, ab, bb; then their values null, "yz", "x". The first
        // entry holds its end offset.
        assert_eq!(entries, [HAS_OFFSET | 1, 2, 2, IS_NULL, IS_STRING | 2, IS_STRING | 1], "{entries:x?}");
        assert_eq!(&out[32..], b"aabbbyzx");
        let given_in_order = written(&Value::Object(vec![("a", Value::Null), ("ab", text("yz")), ("bb", text("x"))]));
        assert_eq!(given_in_order, out);
    }

    #[test]
    fn numbers_and_containers_start_on_four_byte_boundaries() {
        let out = written(&Value::Array(vec![text("abc"), Value::Number(1.5), Value::Array(vec![])]));
        assert_eq!(words(&out[4..8])[0], 3 | ARRAY);
        let entries = words(&out[8..20]);
        assert_eq!(entries[0], HAS_OFFSET | 3);
        // "abc" ends at 23; one byte of padding, then the numeric 1.5
        // (varlena header, short header, digits 1 | 5000): 1 + 10 bytes.
        assert_eq!(entries[1], IS_NUMERIC | 11);
        assert_eq!(&out[20..23], b"abc");
        assert_eq!(out[23], 0);
        // The numeric ends at 34: the empty array pads 2 bytes, then its
        // header.
        assert_eq!(entries[2], IS_CONTAINER | 6);
        assert_eq!(out.len(), 40);
        assert_eq!(words(&out[36..40])[0], ARRAY);
    }

    #[test]
    fn every_32nd_child_holds_its_end_offset() {
        let elements: Vec<Value<'_>> = (0..70).map(|_| text("ab")).collect();
        let out = written(&Value::Array(elements));
        let entries = words(&out[8..8 + 4 * 70]);
        for (i, entry) in entries.iter().enumerate() {
            let expected = if i % 32 == 0 { HAS_OFFSET | (2 * (i as u32 + 1)) } else { 2 };
            assert_eq!(*entry, expected, "child {i}");
        }
    }

    #[test]
    fn a_scalar_alone_is_a_one_element_array_marked_scalar() {
        let out = written(&Value::Null);
        assert_eq!(words(&out[4..])[..2], [1 | ARRAY | SCALAR, HAS_OFFSET | IS_NULL]);
    }

    #[test]
    fn numbers_that_are_not_finite_are_refused() {
        let mut out = Vec::new();
        assert_eq!(
            write(&Value::Array(vec![Value::Number(f64::NAN)]), &mut out).map_err(|e| e.to_string()).unwrap_err(),
            "jsonb has no value for the number NaN"
        );
    }
}
