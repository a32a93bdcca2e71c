//! A row's explanation as `cerebro.predictions` shows it: the baseline's
//! score and the columns that moved the row's score furthest from it.
//!
//! cerebrod computes one contribution per feature (integrated gradients);
//! the backend keeps the `k` largest in size, in that order, and sums the
//! others into `rest`, so that `baseline + Σ contribution + rest` is the
//! row's score whatever `k` is.

use serde_json::{json, Value};

/// Columns an explanation lists when the query does not say (`top_k`).
pub const DEFAULT_TOP_K: usize = 5;

/// The explanation of one row: `contributions` and `values` hold one
/// entry per column of `columns`; `class` is the class explained, for a
/// multiclass model.
pub fn explanation(
    columns: &[&str],
    values: Vec<Value>,
    baseline: f64,
    contributions: &[f64],
    class: Option<&str>,
    top_k: usize,
) -> Value {
    let mut order: Vec<usize> = (0..contributions.len()).collect();
    // Largest first; ties keep the columns' order.
    order.sort_by(|&a, &b| contributions[b].abs().total_cmp(&contributions[a].abs()));
    let (shown, rest) = order.split_at(top_k.min(order.len()));
    let mut values = values;
    let listed: Vec<Value> = shown
        .iter()
        .map(|&c| {
            json!({
                "column": columns[c],
                "value": std::mem::take(&mut values[c]),
                "contribution": contributions[c],
            })
        })
        .collect();
    let mut out = serde_json::Map::new();
    if let Some(class) = class {
        out.insert("class".into(), class.into());
    }
    out.insert("baseline".into(), baseline.into());
    out.insert("contributions".into(), listed.into());
    out.insert("rest".into(), rest.iter().map(|&c| contributions[c]).sum::<f64>().into());
    Value::Object(out)
}

/// A number as JSON: itself when finite, else its name (JSON has no NaN).
pub fn number(v: f64) -> Value {
    if v.is_finite() {
        v.into()
    } else {
        v.to_string().into()
    }
}

/// `value` as JSON text with every character beyond ASCII escaped
/// (`\uXXXX`): PostgreSQL reads the escapes into the database's own
/// encoding, whatever it is, where raw UTF-8 bytes would be read as that
/// encoding's characters.
pub fn ascii_json(value: &Value) -> String {
    let mut out = Vec::new();
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, AsciiFormatter);
    serde::Serialize::serialize(value, &mut serializer).expect("a JSON value serialises into memory");
    String::from_utf8(out).expect("escaped JSON is ASCII")
}

struct AsciiFormatter;

impl serde_json::ser::Formatter for AsciiFormatter {
    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        for c in fragment.chars() {
            if c.is_ascii() {
                writer.write_all(&[c as u8])?;
            } else {
                for unit in c.encode_utf16(&mut [0; 2]) {
                    write!(writer, "\\u{unit:04x}")?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_contributions_are_listed_and_the_rest_summed() {
        let columns = ["tenure", "contract", "charges", "paperless"];
        let values = vec![json!(2.0), json!("Month-to-month"), Value::Null, json!("Yes")];
        let contributions = [0.05, 0.25, -0.125, 0.0625];
        let e = explanation(&columns, values.clone(), 0.25, &contributions, None, 2);
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
        let all = explanation(&columns, values, 0.25, &contributions, Some("Yes"), 10);
        assert_eq!(all["class"], "Yes");
        assert_eq!(all["contributions"].as_array().unwrap().len(), 4);
        assert_eq!(all["rest"], 0.0);
        let total: f64 =
            all["contributions"].as_array().unwrap().iter().map(|c| c["contribution"].as_f64().unwrap()).sum();
        assert!((0.25 + total - (0.25 + 0.2375)).abs() < 1e-12);
    }

    #[test]
    fn json_text_escapes_everything_beyond_ascii_and_reads_back_the_same() {
        let v = json!({"value": "Crédit – 𝔸 \"quoted\"", "n": number(f64::NAN), "x": number(1.5)});
        let text = ascii_json(&v);
        assert!(text.is_ascii(), "{text}");
        assert!(text.contains("Cr\\u00e9dit \\u2013 \\ud835\\udd38"), "{text}");
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), v);
        assert_eq!(v["n"], "NaN");
    }
}
