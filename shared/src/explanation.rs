//! A row's explanation as `cerebro.predictions` shows it: the baseline's
//! score and the columns that moved the row's score furthest from it.
//!
//! cerebrod computes one contribution per feature (integrated gradients);
//! the backend keeps the `k` largest in size, in that order, and sums the
//! others into `rest`, so that `baseline + Σ contribution + rest` is the
//! row's score whatever `k` is.
//!
//! Its JSON text ([`Explanation`]'s `Serialize`, [`write_ascii_json`]) is
//! the shape of record; the backend makes the same jsonb from the values
//! directly (`fdw/src/explanation.rs`), and a test there checks the two
//! agree.

use std::borrow::Cow;

use serde::ser::{Serialize, SerializeStruct, Serializer};

use crate::jsonb;

/// Columns an explanation lists when the query does not say (`top_k`).
pub const DEFAULT_TOP_K: usize = 5;

/// The most rows one batch of an explaining scan holds. Explaining a row
/// costs cerebrod tens of times what scoring it does, and the backend
/// builds each row's jsonb as it returns it: batches this small let the
/// backend read and return one batch while cerebrod explains the next,
/// where one batch of the scan's usual 8,192 rows would make each wait
/// for the other.
pub const EXPLAIN_BATCH_ROWS: usize = 1024;

/// One column's value in a row, as an explanation shows it.
#[derive(Debug, Clone, PartialEq)]
pub enum Shown<'a> {
    Number(f64),
    Text(Cow<'a, str>),
    Null,
}

impl Serialize for Shown<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            // JSON has no NaN or infinity: those are shown by name.
            Shown::Number(v) if v.is_finite() => serializer.serialize_f64(*v),
            Shown::Number(v) => serializer.serialize_str(non_finite_name(*v)),
            Shown::Text(text) => serializer.serialize_str(text),
            Shown::Null => serializer.serialize_unit(),
        }
    }
}

/// How a number that is not finite is shown: `NaN`, `inf` or `-inf`.
pub fn non_finite_name(v: f64) -> &'static str {
    match v {
        _ if v.is_nan() => "NaN",
        _ if v > 0.0 => "inf",
        _ => "-inf",
    }
}

/// A `real` read into a double, as the double nearest the shortest
/// decimal that reads back as the same `real`: what PostgreSQL prints of
/// it (3.9, where the double it widens to is 3.900000095367432).
pub fn printed_real(v: f64) -> f64 {
    let single = v as f32;
    if !single.is_finite() {
        return v;
    }
    single.to_string().parse().unwrap_or(v)
}

/// One listed column: its name, its value in the row, its contribution.
#[derive(Debug, Clone, PartialEq)]
pub struct Listed<'a> {
    pub column: &'a str,
    pub value: Shown<'a>,
    pub contribution: f64,
}

impl Serialize for Listed<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut out = serializer.serialize_struct("Listed", 3)?;
        out.serialize_field("column", self.column)?;
        out.serialize_field("value", &self.value)?;
        out.serialize_field("contribution", &finite(self.contribution))?;
        out.end()
    }
}

/// The explanation of one row: the class explained (multiclass), the
/// baseline's score, the listed columns, the others' contributions summed.
/// As JSON (its `Serialize`): `{"class", "baseline", "contributions":
/// [{"column", "value", "contribution"}], "rest"}`, numbers that are not
/// finite as `null`, `class` only where there is one.
#[derive(Debug, Clone, PartialEq)]
pub struct Explanation<'a> {
    pub class: Option<&'a str>,
    pub baseline: f64,
    pub contributions: Vec<Listed<'a>>,
    pub rest: f64,
}

impl Serialize for Explanation<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut out = serializer.serialize_struct("Explanation", 4)?;
        if let Some(class) = self.class {
            out.serialize_field("class", class)?;
        }
        out.serialize_field("baseline", &finite(self.baseline))?;
        out.serialize_field("contributions", &self.contributions)?;
        out.serialize_field("rest", &finite(self.rest))?;
        out.end()
    }
}

/// A number, or `null` where it is not finite (as serde_json's values
/// show them).
pub fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// The explanation of one row: the `top_k` columns of `columns` whose
/// contributions are largest in size, in that order (ties in the columns'
/// order), each with its `value` in the row, and the others' contributions
/// summed into `rest`; `class` is the class explained, for a multiclass
/// model. Only the listed columns' values are asked for. `order` is
/// scratch space, kept between rows.
pub fn explain_row<'a>(
    columns: &[&'a str],
    mut value: impl FnMut(usize) -> Shown<'a>,
    baseline: f64,
    contributions: &[f64],
    class: Option<&'a str>,
    top_k: usize,
    order: &mut Vec<usize>,
) -> Explanation<'a> {
    order.clear();
    order.extend(0..contributions.len());
    // Largest first; ties in the columns' order. A total order, so the
    // listed columns can be picked out before only they are sorted.
    let larger = |a: &usize, b: &usize| contributions[*b].abs().total_cmp(&contributions[*a].abs()).then(a.cmp(b));
    let listed = top_k.min(order.len());
    if listed > 0 && listed < order.len() {
        order.select_nth_unstable_by(listed - 1, larger);
    }
    order[..listed].sort_unstable_by(larger);
    let (shown, rest) = order.split_at(listed);
    Explanation {
        class,
        baseline,
        contributions: shown
            .iter()
            .map(|&c| Listed { column: columns[c], value: value(c), contribution: contributions[c] })
            .collect(),
        rest: rest.iter().map(|&c| contributions[c]).sum(),
    }
}

/// `e` as a jsonb value ([`jsonb`]), the shape its JSON text has; `string`
/// gives a string's bytes in the database's encoding. Each object's pairs
/// come in jsonb's key order (shorter first), which spares sorting them.
pub fn jsonb_value<'b>(e: &'b Explanation<'_>, mut string: impl FnMut(&'b str) -> Cow<'b, [u8]>) -> jsonb::Value<'b> {
    let number = |v: f64| finite(v).map_or(jsonb::Value::Null, jsonb::Value::Number);
    let listed = e
        .contributions
        .iter()
        .map(|listed| {
            let value = match &listed.value {
                Shown::Number(v) if v.is_finite() => jsonb::Value::Number(*v),
                Shown::Number(v) => jsonb::Value::String(Cow::Borrowed(non_finite_name(*v).as_bytes())),
                Shown::Text(text) => jsonb::Value::String(string(text)),
                Shown::Null => jsonb::Value::Null,
            };
            jsonb::Value::Object(vec![
                ("value", value),
                ("column", jsonb::Value::String(string(listed.column))),
                ("contribution", number(listed.contribution)),
            ])
        })
        .collect();
    let mut pairs = Vec::with_capacity(4);
    pairs.push(("rest", number(e.rest)));
    if let Some(class) = e.class {
        pairs.push(("class", jsonb::Value::String(string(class))));
    }
    pairs.push(("baseline", number(e.baseline)));
    pairs.push(("contributions", jsonb::Value::Array(listed)));
    jsonb::Value::Object(pairs)
}

/// `value` as JSON text with every character beyond ASCII escaped
/// (`\uXXXX`), appended to `out`: PostgreSQL reads the escapes into the
/// database's own encoding, whatever it is, where raw UTF-8 bytes would be
/// read as that encoding's characters.
pub fn write_ascii_json(value: &impl Serialize, out: &mut Vec<u8>) {
    let mut serializer = serde_json::Serializer::with_formatter(out, AsciiFormatter);
    value.serialize(&mut serializer).expect("a JSON value serialises into memory");
}

struct AsciiFormatter;

impl serde_json::ser::Formatter for AsciiFormatter {
    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        // Runs of ASCII at once: most fragments are nothing else.
        let mut rest = fragment;
        while let Some(at) = rest.bytes().position(|b| !b.is_ascii()) {
            writer.write_all(&rest.as_bytes()[..at])?;
            let c = rest[at..].chars().next().expect("a character at a found position");
            for unit in c.encode_utf16(&mut [0; 2]) {
                write!(writer, "\\u{unit:04x}")?;
            }
            rest = &rest[at + c.len_utf8()..];
        }
        writer.write_all(rest.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    fn explained(
        columns: &[&str],
        values: &[Shown<'static>],
        baseline: f64,
        contributions: &[f64],
        class: Option<&str>,
        top_k: usize,
    ) -> Value {
        let (mut order, mut out) = (Vec::new(), Vec::new());
        let mut asked = Vec::new();
        let value = |c: usize| {
            asked.push(c);
            values[c].clone()
        };
        let e = explain_row(columns, value, baseline, contributions, class, top_k, &mut order);
        write_ascii_json(&e, &mut out);
        assert!(out.is_ascii());
        assert_eq!(asked.len(), top_k.min(columns.len()), "only the listed columns' values are read");
        serde_json::from_slice(&out).expect("JSON")
    }

    #[test]
    fn the_largest_contributions_are_listed_and_the_rest_summed() {
        let columns = ["tenure", "contract", "charges", "paperless"];
        let values = [Shown::Number(2.0), Shown::Text("Month-to-month".into()), Shown::Null, Shown::Text("Yes".into())];
        let contributions = [0.05, 0.25, -0.125, 0.0625];
        let e = explained(&columns, &values, 0.25, &contributions, None, 2);
        assert_eq!(
            e,
            json!({
                "baseline": 0.25,
                "contributions": [
                    {"column": "contract", "value": "Month-to-month", "contribution": 0.25},
                    {"column": "charges", "value": null, "contribution": -0.125},
                ],
                "rest": 0.1125,
            })
        );
        let all = explained(&columns, &values, 0.25, &contributions, Some("Yes"), 10);
        assert_eq!(all["class"], "Yes");
        assert_eq!(all["contributions"].as_array().unwrap().len(), 4);
        assert_eq!(all["rest"], 0.0);
        let total: f64 =
            all["contributions"].as_array().unwrap().iter().map(|c| c["contribution"].as_f64().unwrap()).sum();
        assert!((0.25 + total - (0.25 + 0.2375)).abs() < 1e-12);
    }

    #[test]
    fn ties_keep_the_columns_order_and_numbers_keep_every_digit() {
        let columns = ["a", "b", "c"];
        let values = [Shown::Number(0.1), Shown::Number(1.0 / 3.0), Shown::Number(f64::INFINITY)];
        let e = explained(&columns, &values, 1.0 / 7.0, &[0.5, -0.5, 0.5], None, 3);
        let listed: Vec<&str> =
            e["contributions"].as_array().unwrap().iter().map(|c| c["column"].as_str().unwrap()).collect();
        assert_eq!(listed, ["a", "b", "c"]);
        assert_eq!(e["baseline"].as_f64(), Some(1.0 / 7.0));
        assert_eq!(e["contributions"][1]["value"].as_f64(), Some(1.0 / 3.0));
        assert_eq!(e["contributions"][2]["value"], "inf");
        let two = explained(&columns, &values, 0.0, &[0.25, -0.5, 0.5], None, 2);
        let listed: Vec<&str> =
            two["contributions"].as_array().unwrap().iter().map(|c| c["column"].as_str().unwrap()).collect();
        assert_eq!(listed, ["b", "c"]);
        assert_eq!(two["rest"], 0.25);
        let none = explained(&columns, &values, f64::NAN, &[0.5, -0.5, 0.5], None, 0);
        assert_eq!(none["baseline"], Value::Null);
        assert_eq!(none["contributions"], json!([]));
        assert_eq!(none["rest"], 0.5);
    }

    #[test]
    fn a_real_shows_as_postgresql_prints_it() {
        assert_eq!(printed_real(3.9f32 as f64), 3.9);
        assert_eq!(printed_real(0.1f32 as f64), 0.1);
        assert_eq!(printed_real(16777217.0), 16777216.0);
        assert_eq!(printed_real(-0.0), 0.0);
        assert!(printed_real(f64::NAN).is_nan());
        assert_eq!(printed_real(f64::INFINITY), f64::INFINITY);
    }

    fn ascii_json(value: &impl Serialize) -> String {
        let mut out = Vec::new();
        write_ascii_json(value, &mut out);
        String::from_utf8(out).expect("escaped JSON is ASCII")
    }

    #[test]
    fn json_text_escapes_everything_beyond_ascii_and_reads_back_the_same() {
        let v = json!({"value": "Crédit – 𝔸 \"quoted\""});
        let text = ascii_json(&v);
        assert!(text.is_ascii(), "{text}");
        assert!(text.contains("Cr\\u00e9dit \\u2013 \\ud835\\udd38"), "{text}");
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), v);
        let shown = ascii_json(&[Shown::Number(f64::NAN), Shown::Text("é".into())]);
        assert_eq!(shown, r#"["NaN","\u00e9"]"#);
    }
}
