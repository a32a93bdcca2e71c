//! PostgreSQL's `numeric`, read as the nearest `f64` straight from its
//! stored bytes.
//!
//! `numeric::float8` prints the number as text and parses it back with
//! `strtod`: a tenth of a backend's time when it scores a table with two
//! money columns. The digits are all there in the value: base-10000 digits
//! and a weight, so the decimal string is at hand without printing, and
//! Rust's float parsing rounds it to nearest as `strtod` does, so the result
//! is the same `f64` bit for bit. The format is `src/backend/utils/adt/numeric.c`'s
//! (`NumericShort`, `NumericLong`), stable on disk since PostgreSQL 9.1.

use std::fmt::Write;

/// The bytes of one stored digit: base 10000, native byte order.
const DIGIT_BYTES: usize = 2;
const SIGN_MASK: u16 = 0xC000;
const NEGATIVE: u16 = 0x4000;
const SHORT: u16 = 0x8000;
const SPECIAL: u16 = 0xC000;
const SPECIAL_MASK: u16 = 0xF000;
const NAN: u16 = 0xC000;
const POSITIVE_INFINITY: u16 = 0xD000;
const NEGATIVE_INFINITY: u16 = 0xF000;
const SHORT_NEGATIVE: u16 = 0x2000;
const SHORT_WEIGHT_NEGATIVE: u16 = 0x0040;
const SHORT_WEIGHT_MASK: u16 = 0x003F;
const SHORT_DISPLAY_SCALE_SHIFT: u16 = 7;
const SHORT_DISPLAY_SCALE_MAX: u16 = 63;
const SHORT_WEIGHT_MIN: i32 = -64;
const SHORT_WEIGHT_MAX: i32 = 63;
const DISPLAY_SCALE_MASK: u16 = 0x3FFF;
const VARLENA_HEADER: usize = 4;

/// Powers of ten an `f64` holds exactly.
const EXACT_POWERS: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20,
    1e21, 1e22,
];

/// The `f64` nearest to the numeric whose bytes (after the varlena header)
/// are `data`: what `numeric::float8` gives, except that a number beyond
/// `f64`'s range is ±infinity or 0 where the cast raises an error. `None`
/// for bytes that are no numeric.
pub fn numeric_to_f64(data: &[u8]) -> Option<f64> {
    let header = u16::from_ne_bytes([*data.first()?, *data.get(1)?]);
    let (negative, weight, digits) = match header & SIGN_MASK {
        SPECIAL => {
            return match header & SPECIAL_MASK {
                NAN => Some(f64::NAN),
                POSITIVE_INFINITY => Some(f64::INFINITY),
                NEGATIVE_INFINITY => Some(f64::NEG_INFINITY),
                _ => None,
            }
        }
        SHORT => {
            let magnitude = i32::from(header & SHORT_WEIGHT_MASK);
            let weight =
                if header & SHORT_WEIGHT_NEGATIVE != 0 { magnitude | !i32::from(SHORT_WEIGHT_MASK) } else { magnitude };
            (header & SHORT_NEGATIVE != 0, weight, &data[2..])
        }
        sign => {
            let weight = i16::from_ne_bytes([*data.get(2)?, *data.get(3)?]);
            (sign == NEGATIVE, i32::from(weight), &data[4..])
        }
    };
    if !digits.len().is_multiple_of(DIGIT_BYTES) {
        return None;
    }
    let digits = digits.chunks_exact(DIGIT_BYTES).map(|d| i16::from_ne_bytes([d[0], d[1]]));
    let count = digits.len() as i32;
    if count == 0 {
        return Some(0.0);
    }
    // The value is the digits as one integer times 10^exponent.
    let exponent = 4 * (weight - (count - 1));
    let magnitude = if count <= 3 && exponent.unsigned_abs() < EXACT_POWERS.len() as u32 {
        // Below 10^12 < 2^53 the integer is exact, and so is a power of ten
        // up to 10^22: one multiplication or division rounds once, to
        // nearest (Clinger's fast path).
        let mut integer = 0i64;
        for digit in digits {
            integer = integer * 10_000 + i64::from(digit);
        }
        let power = EXACT_POWERS[exponent.unsigned_abs() as usize];
        if exponent >= 0 {
            integer as f64 * power
        } else {
            integer as f64 / power
        }
    } else {
        let mut text = String::with_capacity(4 * count as usize + 8);
        for digit in digits {
            write!(text, "{digit:04}").ok()?;
        }
        write!(text, "e{exponent}").ok()?;
        text.parse::<f64>().ok()?
    };
    Some(if negative { -magnitude } else { magnitude })
}

/// A finite `v` as `digits × 10^−scale`, from the shortest decimal text
/// that reads back as `v` (serde_json's, which JSON numbers are written
/// with), with the scale PostgreSQL's `numeric_in` gives that text (digits
/// after the point less the exponent; below zero, an integer of scale 0):
/// what [`write_numeric`] writes as the numeric `numeric_in` would make of
/// that text, display scale included, without parsing text in the
/// backend. `None` for a number that is not finite, or whose digits do
/// not fit an i64 (never for the shortest text of an f64: 17 digits).
pub fn shortest_decimal(v: f64) -> Option<(i64, i32)> {
    if !v.is_finite() {
        return None;
    }
    // At most 24 bytes (sign, 17 digits, point, exponent): on the stack,
    // as this runs for every number of every explained row.
    let mut buffer = std::io::Cursor::new([0u8; 32]);
    serde_json::to_writer(&mut buffer, &v).ok()?;
    let written = buffer.position() as usize;
    let text = &buffer.get_ref()[..written];
    // One pass: sign, significant digits, digits after the point, exponent.
    let (mut value, mut negative, mut fraction, mut point, mut significant) = (0i64, false, 0i32, false, 0);
    let mut bytes = text.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'-' => negative = true,
            b'.' => point = true,
            b'0'..=b'9' => {
                fraction += i32::from(point);
                // Leading zeros (0.00001) add nothing to the value.
                if value != 0 || b != b'0' {
                    significant += 1;
                    if significant > 18 {
                        return None;
                    }
                    value = value * 10 + i64::from(b - b'0');
                }
            }
            b'e' | b'E' => {
                let exponent = std::str::from_utf8(bytes.as_slice()).ok()?.parse::<i32>().ok()?;
                return Some((if negative { -value } else { value }, fraction - exponent));
            }
            _ => return None,
        }
    }
    Some((if negative { -value } else { value }, fraction))
}

/// Appends the numeric `digits × 10^−scale` as PostgreSQL stores it, with
/// a 4-byte varlena header: what `int64_div_fast_to_numeric(digits,
/// scale)` makes (`make_result`: base-10000 digits without leading or
/// trailing zero digits, zero as positive with weight 0, display scale
/// `scale` or 0 when it is negative; the short format where the display
/// scale and weight allow it). Bytes in native order.
pub fn write_numeric(digits: i64, scale: i32, out: &mut Vec<u8>) {
    let display_scale = scale.max(0) as u16;
    // The lowest base-10000 place a digit fills: value = magnitude ×
    // 10^shift × 10000^lowest, so that place's digit is the magnitude's
    // last 4 − shift decimal digits, shifted. In u64 throughout.
    let lowest = (-scale).div_euclid(4);
    let shift = (-scale).rem_euclid(4) as u32;
    let magnitude = digits.unsigned_abs();
    let split = 10u64.pow(4 - shift);
    // Least significant first; at most 19 decimal digits make 6.
    let mut base_digits = [0u16; 8];
    base_digits[0] = ((magnitude % split) * 10u64.pow(shift)) as u16;
    let mut rest = magnitude / split;
    let mut count = 1;
    while rest != 0 {
        base_digits[count] = (rest % 10_000) as u16;
        rest /= 10_000;
        count += 1;
    }
    // Trailing zero digits are dropped; zero is positive, of weight 0.
    let trailing = base_digits[..count].iter().take_while(|&&d| d == 0).count();
    let (negative, weight, kept) = if trailing == count {
        (false, 0, &base_digits[..0])
    } else {
        (digits < 0, lowest + count as i32 - 1, &base_digits[trailing..count])
    };
    let short = display_scale <= SHORT_DISPLAY_SCALE_MAX && (SHORT_WEIGHT_MIN..=SHORT_WEIGHT_MAX).contains(&weight);
    let size = VARLENA_HEADER + if short { 2 } else { 4 } + DIGIT_BYTES * kept.len();
    out.extend_from_slice(&varlena_header(size));
    if short {
        let mut header = SHORT | display_scale << SHORT_DISPLAY_SCALE_SHIFT | (weight as u16 & SHORT_WEIGHT_MASK);
        if weight < 0 {
            header |= SHORT_WEIGHT_NEGATIVE;
        }
        if negative {
            header |= SHORT_NEGATIVE;
        }
        out.extend_from_slice(&header.to_ne_bytes());
    } else {
        let sign = if negative { NEGATIVE } else { 0 };
        out.extend_from_slice(&(sign | display_scale & DISPLAY_SCALE_MASK).to_ne_bytes());
        out.extend_from_slice(&(weight as i16).to_ne_bytes());
    }
    for digit in kept.iter().rev() {
        out.extend_from_slice(&digit.to_ne_bytes());
    }
}

/// A 4-byte varlena header for a datum of `size` bytes (`SET_VARSIZE_4B`).
fn varlena_header(size: usize) -> [u8; 4] {
    let size = size as u32;
    if cfg!(target_endian = "little") {
        (size << 2).to_ne_bytes()
    } else {
        (size & 0x3FFF_FFFF).to_ne_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A long-format numeric: sign and display scale, weight, digits.
    fn long(sign: u16, weight: i16, digits: &[i16]) -> Vec<u8> {
        let mut bytes = sign.to_ne_bytes().to_vec();
        bytes.extend(weight.to_ne_bytes());
        digits.iter().for_each(|d| bytes.extend(d.to_ne_bytes()));
        bytes
    }

    /// A short-format numeric: sign, weight, digits (display scale 0).
    fn short(negative: bool, weight: i8, digits: &[i16]) -> Vec<u8> {
        let mut header = SHORT | (weight as u16 & (SHORT_WEIGHT_MASK | SHORT_WEIGHT_NEGATIVE));
        if negative {
            header |= SHORT_NEGATIVE;
        }
        let mut bytes = header.to_ne_bytes().to_vec();
        digits.iter().for_each(|d| bytes.extend(d.to_ne_bytes()));
        bytes
    }

    #[test]
    fn short_numerics_read_as_their_decimal_value() {
        // 29.85: digits 29 | 8500, weight 0.
        assert_eq!(numeric_to_f64(&short(false, 0, &[29, 8500])), Some(29.85));
        assert_eq!(numeric_to_f64(&short(true, 0, &[1990, 5000])), Some(-1990.5));
        // 0.0001: weight −1, one digit 1.
        assert_eq!(numeric_to_f64(&short(false, -1, &[1])), Some(0.0001));
        // 123456789: 1 | 2345 | 6789, weight 2.
        assert_eq!(numeric_to_f64(&short(false, 2, &[1, 2345, 6789])), Some(123456789.0));
        assert_eq!(numeric_to_f64(&short(false, 0, &[])), Some(0.0));
    }

    #[test]
    fn long_numerics_and_those_past_the_fast_path_round_to_nearest() {
        // π to 20 decimals rounds to the f64 nearest π.
        assert_eq!(numeric_to_f64(&long(0, 0, &[3, 1415, 9265, 3589, 7932, 3846])), Some(std::f64::consts::PI));
        assert_eq!(numeric_to_f64(&long(NEGATIVE, 0, &[0, 1])), Some(-0.0001));
        // 1e100 and 1e-100: one digit far from the point.
        assert_eq!(numeric_to_f64(&long(0, 25, &[1])), Some(1e100));
        assert_eq!(numeric_to_f64(&long(0, -25, &[1])), Some(1e-100));
        // 0.1 + 0.2 as a numeric is 0.3 exactly, so it reads as 0.3.
        assert_eq!(numeric_to_f64(&long(0, -1, &[3000])), Some(0.3));
        // Beyond f64's range: infinity, where the cast would raise.
        assert_eq!(numeric_to_f64(&long(0, 100, &[1])), Some(f64::INFINITY));
    }

    #[test]
    fn special_values_and_malformed_bytes() {
        assert!(numeric_to_f64(&NAN.to_ne_bytes()).unwrap().is_nan());
        assert_eq!(numeric_to_f64(&POSITIVE_INFINITY.to_ne_bytes()), Some(f64::INFINITY));
        assert_eq!(numeric_to_f64(&NEGATIVE_INFINITY.to_ne_bytes()), Some(f64::NEG_INFINITY));
        assert_eq!(numeric_to_f64(&[]), None);
        assert_eq!(numeric_to_f64(&[0]), None);
        assert_eq!(numeric_to_f64(&[0, 0, 0]), None);
        assert_eq!(numeric_to_f64(&[0, 0, 0, 0, 1]), None);
    }

    #[test]
    fn shortest_decimals_give_back_the_number_with_numeric_ins_scale() {
        for (v, expected) in [
            (0.1, (1, 1)),
            (1.0, (10, 1)),
            (-0.0, (0, 1)),
            (0.2521993173286319, (2521993173286319, 16)),
            (1e-300, (1, 300)),
            (-3.5e12, (-35000000000000, 1)),
            (1.7976931348623157e308, (17976931348623157, -292)),
            (5e-324, (5, 324)),
            (1.2345678901234568e-5, (12345678901234568, 21)),
            (1e16, (1, -16)),
        ] {
            assert_eq!(shortest_decimal(v), Some(expected), "{v}");
        }
        assert_eq!(shortest_decimal(f64::NAN), None);
        assert_eq!(shortest_decimal(f64::NEG_INFINITY), None);
        for v in random_f64s(0x9E37_79B9_7F4A_7C15).filter(|v| v.is_finite()) {
            let (digits, scale) = shortest_decimal(v).expect("a finite f64 has at most 17 digits");
            assert_eq!(format!("{digits}e{}", -scale).parse::<f64>().unwrap(), if v == 0.0 { 0.0 } else { v }, "{v}");
        }
    }

    /// 20,000 f64s of every bit pattern (NaN and infinities among them),
    /// from a xorshift sequence seeded with `state`.
    fn random_f64s(mut state: u64) -> impl Iterator<Item = f64> {
        (0..20_000).map(move |_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            f64::from_bits(state)
        })
    }

    fn numeric(digits: i64, scale: i32) -> Vec<u8> {
        let mut out = Vec::new();
        write_numeric(digits, scale, &mut out);
        assert_eq!(out[..4], varlena_header(out.len()), "the varlena header holds the size");
        out.split_off(4)
    }

    #[test]
    fn numerics_are_written_as_make_result_writes_them() {
        let short_scaled = |negative: bool, scale: u16, weight: i8, digits: &[i16]| {
            let mut bytes = short(negative, weight, digits);
            let header = u16::from_ne_bytes([bytes[0], bytes[1]]) | scale << SHORT_DISPLAY_SCALE_SHIFT;
            bytes[..2].copy_from_slice(&header.to_ne_bytes());
            bytes
        };
        // 1.5 (numeric_in's "1.5"): 1 | 5000, weight 0, display scale 1.
        assert_eq!(numeric(15, 1), short_scaled(false, 1, 0, &[1, 5000]));
        // -3.5e12 as "-3500000000000.0": trailing zero digits dropped.
        assert_eq!(numeric(-35_000_000_000_000, 1), short_scaled(true, 1, 3, &[3, 5000]));
        // 1e16: scale below zero is display scale 0.
        assert_eq!(numeric(1, -16), short(false, 4, &[1]));
        // 0.0001 and zero, whatever its sign.
        assert_eq!(numeric(1, 4), short_scaled(false, 4, -1, &[1]));
        assert_eq!(numeric(0, 1), short_scaled(false, 1, 0, &[]));
        assert_eq!(numeric(-0, 0), short(false, 0, &[]));
        // Past the short format's display scale (63) or weight (−64..=63).
        assert_eq!(numeric(1, 300), long(300, -75, &[1]));
        assert_eq!(numeric(-17_976_931_348_623_157, -292), long(NEGATIVE, 77, &[1, 7976, 9313, 4862, 3157]));
    }

    #[test]
    fn written_numerics_read_back_as_the_number() {
        for v in random_f64s(0x2545_F491_4F6C_DD1D) {
            let Some((digits, scale)) = shortest_decimal(v) else { continue };
            assert_eq!(numeric_to_f64(&numeric(digits, scale)), Some(if v == 0.0 { 0.0 } else { v }), "{v}");
        }
    }
}
