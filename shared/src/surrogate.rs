//! A version's rule surrogate (issue 16, "distilling the network"): a
//! shallow decision tree fitted to the network's own predictions, with its
//! fidelity, shown as readable rules and as a SQL `CASE` expression.
//!
//! The tree is CART: each split is the one that most lowers the Gini
//! impurity of the predicted class (classification) or the squared error of
//! the predicted value (regression). A numeric column splits at a threshold
//! (`<=`), a categorical one into two sets of values (its values ordered by
//! the prediction they lean to, which is exact for two classes and for
//! regression). NULLs go to the side that fits them best. Written by hand:
//! the tree crates (linfa-trees, smartcore) take numbers only, without
//! categories or NULLs, and none renders SQL.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::batch::ColumnData;

/// How deep a surrogate grows unless asked otherwise: 4 levels, at most 16
/// rules, still read at a glance.
pub const DEFAULT_MAX_DEPTH: u32 = 4;

/// The depths one may ask for: one test at least; at most 8 levels (256
/// rules, more than anyone reads), which also keeps the tree's JSON within
/// one control frame.
pub const DEPTHS: std::ops::RangeInclusive<u32> = 1..=8;

/// What the network predicted for each row: a class index, or a value.
#[derive(Debug, Clone, PartialEq)]
pub enum Predicted {
    Classes { labels: Vec<String>, class: Vec<usize> },
    Values(Vec<f64>),
}

/// A fitted surrogate, as `cerebro.model_versions.surrogate` keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Surrogate {
    pub max_depth: u32,
    /// `agreement` (the share of validation rows where the tree predicts
    /// the network's class) or `r2` (of the network's values).
    pub fidelity_metric: String,
    pub fidelity: f64,
    /// Rows the tree was fitted on.
    pub rows: usize,
    pub root: Node,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Node {
    Leaf {
        /// The class label (classification) or the value (regression), as
        /// JSON: a string or a number.
        prediction: serde_json::Value,
        /// Fitted rows that reach it.
        support: usize,
    },
    Split {
        column: String,
        test: Test,
        /// Where the rows that pass the test go, then the others.
        yes: Box<Node>,
        no: Box<Node>,
    },
}

/// Where a test sends NULLs: `nulls_pass` is whether they pass it, None
/// when the node's fitted rows had none (a NULL then fails it, as it fails
/// a comparison in SQL).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Test {
    /// `column <= threshold`.
    AtMost {
        threshold: f64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nulls_pass: Option<bool>,
    },
    /// `column IN (values)`.
    In {
        values: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nulls_pass: Option<bool>,
    },
    /// `column IS NULL`.
    IsNull,
}

/// How large the tree may grow.
#[derive(Debug, Clone, Copy)]
pub struct Growth {
    pub max_depth: u32,
    /// Fewest fitted rows a leaf may hold.
    pub min_leaf: usize,
}

/// One leaf as a rule: the tests on the way to it, its prediction, support.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub conditions: Vec<String>,
    pub prediction: String,
    pub support: usize,
}

/// Per-node counts of the target: class counts, or (n, Σy, Σy²).
#[derive(Debug, Clone)]
enum Stats {
    Classes(Vec<f64>),
    Values { n: f64, sum: f64, squares: f64 },
}

impl Stats {
    fn empty(like: &Predicted) -> Stats {
        match like {
            Predicted::Classes { labels, .. } => Stats::Classes(vec![0.0; labels.len()]),
            Predicted::Values(_) => Stats::Values { n: 0.0, sum: 0.0, squares: 0.0 },
        }
    }

    fn add(&mut self, y: &Predicted, row: usize, sign: f64) {
        match (self, y) {
            (Stats::Classes(c), Predicted::Classes { class, .. }) => c[class[row]] += sign,
            (Stats::Values { n, sum, squares }, Predicted::Values(v)) => {
                *n += sign;
                *sum += sign * v[row];
                *squares += sign * v[row] * v[row];
            }
            _ => unreachable!("stats and predictions of one kind"),
        }
    }

    fn merge(&mut self, other: &Stats, sign: f64) {
        match (self, other) {
            (Stats::Classes(a), Stats::Classes(b)) => a.iter_mut().zip(b).for_each(|(a, b)| *a += sign * b),
            (Stats::Values { n, sum, squares }, Stats::Values { n: n2, sum: s2, squares: q2 }) => {
                *n += sign * n2;
                *sum += sign * s2;
                *squares += sign * q2;
            }
            _ => unreachable!("stats of one kind"),
        }
    }

    fn count(&self) -> f64 {
        match self {
            Stats::Classes(c) => c.iter().sum(),
            Stats::Values { n, .. } => *n,
        }
    }

    /// Gini impurity or squared error, times the rows (so that two sides add).
    fn cost(&self) -> f64 {
        match self {
            Stats::Classes(c) => {
                let n: f64 = c.iter().sum();
                if n == 0.0 {
                    0.0
                } else {
                    n - c.iter().map(|k| k * k).sum::<f64>() / n
                }
            }
            Stats::Values { n, sum, squares } => {
                if *n == 0.0 {
                    0.0
                } else {
                    (squares - sum * sum / n).max(0.0)
                }
            }
        }
    }

    /// What a row of this node leans to: the positive class's share, the
    /// majority class's share, or the mean (orders categorical values).
    fn lean(&self, class: usize) -> f64 {
        match self {
            Stats::Classes(c) => c[class] / c.iter().sum::<f64>().max(1.0),
            Stats::Values { n, sum, .. } => sum / n.max(1.0),
        }
    }

    fn majority(&self) -> usize {
        match self {
            Stats::Classes(c) => (0..c.len()).fold(0, |best, k| if c[k] > c[best] { k } else { best }),
            Stats::Values { .. } => 0,
        }
    }
}

/// The best split found for a node.
struct Best {
    gain: f64,
    column: usize,
    test: Test,
}

/// Fits a tree to `predicted` over `rows` of `columns` (named `names`).
pub fn fit(names: &[String], columns: &[ColumnData], predicted: &Predicted, rows: &[usize], growth: Growth) -> Node {
    grow(names, columns, predicted, rows.to_vec(), growth, 0)
}

fn node_stats(predicted: &Predicted, rows: &[usize]) -> Stats {
    let mut s = Stats::empty(predicted);
    for &r in rows {
        s.add(predicted, r, 1.0);
    }
    s
}

fn leaf(predicted: &Predicted, stats: &Stats, support: usize) -> Node {
    let prediction = match (predicted, stats) {
        (Predicted::Classes { labels, .. }, s) => serde_json::Value::from(labels[s.majority()].clone()),
        (Predicted::Values(_), Stats::Values { n, sum, .. }) => serde_json::Value::from(sum / n.max(1.0)),
        _ => unreachable!("stats and predictions of one kind"),
    };
    Node::Leaf { prediction, support }
}

fn grow(
    names: &[String],
    columns: &[ColumnData],
    predicted: &Predicted,
    rows: Vec<usize>,
    growth: Growth,
    depth: u32,
) -> Node {
    let stats = node_stats(predicted, &rows);
    let cost = stats.cost();
    if depth >= growth.max_depth || rows.len() < 2 * growth.min_leaf.max(1) || cost <= 1e-12 {
        return leaf(predicted, &stats, rows.len());
    }
    let mut best: Option<Best> = None;
    for (c, column) in columns.iter().enumerate() {
        let found = match column {
            ColumnData::Float64(v) => numeric_split(v, predicted, &rows, &stats, growth.min_leaf),
            ColumnData::Text(v) => categorical_split(v, predicted, &rows, &stats, growth.min_leaf),
        };
        if let Some((gain, test)) = found {
            if best.as_ref().is_none_or(|b| gain > b.gain + 1e-12) {
                best = Some(Best { gain, column: c, test });
            }
        }
    }
    let Some(best) = best.filter(|b| b.gain > 1e-9 * cost.max(1.0)) else {
        return leaf(predicted, &stats, rows.len());
    };
    let support = rows.len();
    let (yes, no): (Vec<usize>, Vec<usize>) =
        rows.into_iter().partition(|&r| passes(&columns[best.column], r, &best.test));
    let yes = grow(names, columns, predicted, yes, growth, depth + 1);
    let no = grow(names, columns, predicted, no, growth, depth + 1);
    // A split whose two leaves predict the same class says nothing a
    // reader needs (it only made the classes purer): one leaf instead.
    if let (Node::Leaf { prediction: a, .. }, Node::Leaf { prediction: b, .. }) = (&yes, &no) {
        if a == b && a.is_string() {
            return Node::Leaf { prediction: a.clone(), support };
        }
    }
    Node::Split { column: names[best.column].clone(), yes: Box::new(yes), no: Box::new(no), test: best.test }
}

fn passes(column: &ColumnData, row: usize, test: &Test) -> bool {
    match (column, test) {
        (ColumnData::Float64(v), Test::AtMost { threshold, nulls_pass }) => match v[row] {
            Some(x) if !x.is_nan() => x <= *threshold,
            _ => nulls_pass.unwrap_or(false),
        },
        (ColumnData::Text(v), Test::In { values, nulls_pass }) => match &v[row] {
            Some(s) => values.iter().any(|x| x == s),
            None => nulls_pass.unwrap_or(false),
        },
        (ColumnData::Float64(v), Test::IsNull) => v[row].is_none_or(f64::is_nan),
        (ColumnData::Text(v), Test::IsNull) => v[row].is_none(),
        _ => false,
    }
}

/// The gain of sending `nulls` (their stats) to the better side of a split
/// of the rest into `left` and the others, and which side (None: no NULLs).
fn with_nulls(total: &Stats, left: &Stats, nulls: &Stats, min_leaf: usize) -> Option<(f64, Option<bool>)> {
    let mut best: Option<(f64, Option<bool>)> = None;
    let seen = nulls.count() > 0.0;
    for nulls_pass in [false, true] {
        let mut yes = left.clone();
        if nulls_pass {
            yes.merge(nulls, 1.0);
        }
        let mut no = total.clone();
        no.merge(&yes, -1.0);
        if yes.count() < min_leaf as f64 || no.count() < min_leaf as f64 {
            continue;
        }
        let gain = total.cost() - yes.cost() - no.cost();
        if best.is_none_or(|(g, _)| gain > g + 1e-12) {
            best = Some((gain, seen.then_some(nulls_pass)));
        }
        if !seen {
            break;
        }
    }
    best
}

/// The split of the NULLs from the rest, when each side holds enough rows.
fn null_split(total: &Stats, nulls: &Stats, min_leaf: usize) -> Option<(f64, Test)> {
    let mut present = total.clone();
    present.merge(nulls, -1.0);
    if nulls.count() < min_leaf as f64 || present.count() < min_leaf as f64 {
        return None;
    }
    Some((total.cost() - nulls.cost() - present.cost(), Test::IsNull))
}

/// The better of two candidate splits (the first on a tie).
fn better(a: Option<(f64, Test)>, b: Option<(f64, Test)>) -> Option<(f64, Test)> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b.0 > a.0 + 1e-12 { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// A threshold between two neighbouring values `here < next` that people
/// read easily: the number with the fewest decimals in `[here, next)` (15
/// for 15 and 16, 56.1 for 56.05 and 56.15), else the midpoint.
fn readable_threshold(here: f64, next: f64) -> f64 {
    for decimals in 0..=15 {
        let scale = 10f64.powi(decimals);
        // Rounded, not ceiled: 0.3 · 100 is 30.000000000000004.
        let mut t = (here * scale).round() / scale;
        if t < here {
            t = ((here * scale).round() + 1.0) / scale;
        }
        if t >= here && t < next {
            return t;
        }
    }
    here + (next - here) / 2.0
}

fn numeric_split(
    v: &[Option<f64>],
    predicted: &Predicted,
    rows: &[usize],
    total: &Stats,
    min_leaf: usize,
) -> Option<(f64, Test)> {
    let mut present: Vec<(f64, usize)> =
        rows.iter().filter_map(|&r| v[r].filter(|x| !x.is_nan()).map(|x| (x, r))).collect();
    present.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut nulls = Stats::empty(predicted);
    for &r in rows {
        if v[r].is_none_or(f64::is_nan) {
            nulls.add(predicted, r, 1.0);
        }
    }
    let mut left = Stats::empty(predicted);
    let mut best: Option<(f64, Test)> = None;
    for i in 0..present.len().saturating_sub(1) {
        left.add(predicted, present[i].1, 1.0);
        let (here, next) = (present[i].0, present[i + 1].0);
        if here == next {
            continue;
        }
        if let Some((gain, nulls_pass)) = with_nulls(total, &left, &nulls, min_leaf) {
            if best.as_ref().is_none_or(|(g, _)| gain > g + 1e-12) {
                let threshold = readable_threshold(here, next);
                best = Some((gain, Test::AtMost { threshold, nulls_pass }));
            }
        }
    }
    better(best, null_split(total, &nulls, min_leaf))
}

fn categorical_split(
    v: &[Option<String>],
    predicted: &Predicted,
    rows: &[usize],
    total: &Stats,
    min_leaf: usize,
) -> Option<(f64, Test)> {
    let mut by_value: BTreeMap<&str, Stats> = BTreeMap::new();
    let mut nulls = Stats::empty(predicted);
    for &r in rows {
        match &v[r] {
            Some(s) => by_value.entry(s.as_str()).or_insert_with(|| Stats::empty(predicted)).add(predicted, r, 1.0),
            None => nulls.add(predicted, r, 1.0),
        }
    }
    // Values ordered by what they lean to: the node's majority class's
    // share, or the mean value; ties by the value itself.
    let class = total.majority();
    let mut ordered: Vec<(&str, Stats)> = by_value.into_iter().collect();
    ordered.sort_by(|a, b| a.1.lean(class).total_cmp(&b.1.lean(class)).then_with(|| a.0.cmp(b.0)));
    let mut left = Stats::empty(predicted);
    let mut best: Option<(f64, usize, Option<bool>)> = None;
    for (i, (_, stats)) in ordered.iter().enumerate().take(ordered.len().saturating_sub(1)) {
        left.merge(stats, 1.0);
        if let Some((gain, nulls_pass)) = with_nulls(total, &left, &nulls, min_leaf) {
            if best.is_none_or(|(g, _, _)| gain > g + 1e-12) {
                best = Some((gain, i + 1, nulls_pass));
            }
        }
    }
    let by_values = best.map(|(gain, k, nulls_pass)| {
        let mut values: Vec<String> = ordered[..k].iter().map(|(s, _)| s.to_string()).collect();
        values.sort();
        (gain, Test::In { values, nulls_pass })
    });
    better(by_values, null_split(total, &nulls, min_leaf))
}

impl Node {
    /// The prediction for `row` of `columns` (named `names`).
    pub fn predict<'a>(&'a self, names: &[String], columns: &[ColumnData], row: usize) -> &'a serde_json::Value {
        match self {
            Node::Leaf { prediction, .. } => prediction,
            Node::Split { column, test, yes, no } => {
                let c = names.iter().position(|n| n == column).expect("the tree's columns are the model's");
                if passes(&columns[c], row, test) { yes } else { no }.predict(names, columns, row)
            }
        }
    }

    /// Each leaf as a rule, from the first leaf down: one condition per
    /// column, in the order the path first tests them.
    pub fn rules(&self) -> Vec<Rule> {
        let mut out = Vec::new();
        self.collect_rules(&mut Vec::new(), &mut out);
        out
    }

    fn collect_rules<'a>(&'a self, path: &mut Vec<(&'a str, &'a Test, bool)>, out: &mut Vec<Rule>) {
        match self {
            Node::Leaf { prediction, support } => out.push(Rule {
                conditions: conditions(path),
                prediction: literal(prediction, false),
                support: *support,
            }),
            Node::Split { column, test, yes, no } => {
                path.push((column, test, true));
                yes.collect_rules(path, out);
                path.pop();
                path.push((column, test, false));
                no.collect_rules(path, out);
                path.pop();
            }
        }
    }

    /// The tree as a SQL `CASE` expression over the source's columns, each
    /// leaf followed by its support as a comment.
    pub fn to_sql(&self) -> String {
        let mut out = String::new();
        self.write_sql(&mut out, 0);
        out
    }

    fn write_sql(&self, out: &mut String, depth: usize) {
        let pad = "    ".repeat(depth);
        match self {
            Node::Leaf { prediction, support } => {
                let _ = write!(out, "{} /* {support} rows */", literal(prediction, true));
            }
            Node::Split { column, test, yes, no } => {
                let _ = write!(out, "CASE WHEN {}\n{pad}    THEN ", sql_test(column, test));
                yes.write_sql(out, depth + 1);
                let _ = write!(out, "\n{pad}    ELSE ");
                no.write_sql(out, depth + 1);
                let _ = write!(out, "\n{pad}END");
            }
        }
    }
}

/// A column name as SQL writes it: always quoted, so that any name reads back.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn literal(prediction: &serde_json::Value, sql: bool) -> String {
    match prediction {
        serde_json::Value::String(s) if sql => quote_literal(s),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A number as SQL and people read it: the shortest text that reads back
/// to the same f64.
fn number(x: f64) -> String {
    format!("{x}")
}

fn sql_test(column: &str, test: &Test) -> String {
    let c = quote_ident(column);
    let (core, nulls_pass) = match test {
        Test::AtMost { threshold, nulls_pass } => (format!("{c} <= {}", number(*threshold)), *nulls_pass),
        Test::In { values, nulls_pass } => {
            let list: Vec<String> = values.iter().map(|v| quote_literal(v)).collect();
            (format!("{c} IN ({})", list.join(", ")), *nulls_pass)
        }
        Test::IsNull => return format!("{c} IS NULL"),
    };
    // NULL fails a comparison, so CASE takes ELSE for it unless told.
    if nulls_pass == Some(true) {
        format!("({core} OR {c} IS NULL)")
    } else {
        core
    }
}

/// The tests of a path to a leaf (column, test, whether the path passes
/// it) as conditions a person reads: a column tested more than once says
/// once what all its tests leave (`12 < tenure <= 30`, `contract in (a)`).
fn conditions(path: &[(&str, &Test, bool)]) -> Vec<String> {
    let mut columns: Vec<&str> = Vec::new();
    for (column, _, _) in path {
        if !columns.contains(column) {
            columns.push(column);
        }
    }
    columns
        .into_iter()
        .flat_map(|column| {
            let steps: Vec<(&Test, bool)> = path.iter().filter(|s| s.0 == column).map(|s| (s.1, s.2)).collect();
            match combined(column, &steps) {
                Some(text) => vec![text],
                None => steps.iter().map(|(test, pass)| condition(column, test, *pass)).collect(),
            }
        })
        .collect()
}

/// One condition for every test of `column` on a path, when they are all
/// comparisons or all lists (a NULL test is left as it is). A NULL reaches
/// the leaf when every test lets it through.
fn combined(column: &str, steps: &[(&Test, bool)]) -> Option<String> {
    if steps.len() == 1 {
        return Some(condition(column, steps[0].0, steps[0].1));
    }
    let nulls_reach = steps.iter().all(|(test, pass)| match test {
        Test::AtMost { nulls_pass, .. } | Test::In { nulls_pass, .. } => *nulls_pass == Some(*pass),
        Test::IsNull => false,
    });
    let text = if steps.iter().all(|(t, _)| matches!(t, Test::AtMost { .. })) {
        let threshold = |t: &Test| match t {
            Test::AtMost { threshold, .. } => *threshold,
            _ => unreachable!("comparisons only"),
        };
        let upper = steps.iter().filter(|s| s.1).map(|s| threshold(s.0)).reduce(f64::min);
        let lower = steps.iter().filter(|s| !s.1).map(|s| threshold(s.0)).reduce(f64::max);
        match (lower, upper) {
            (Some(l), Some(u)) => format!("{} < {column} <= {}", number(l), number(u)),
            (Some(l), None) => format!("{column} > {}", number(l)),
            (None, Some(u)) => format!("{column} <= {}", number(u)),
            (None, None) => unreachable!("at least one step"),
        }
    } else if steps.iter().all(|(t, _)| matches!(t, Test::In { .. })) {
        let values = |t: &'_ Test| match t {
            Test::In { values, .. } => values.clone(),
            _ => unreachable!("lists only"),
        };
        let excluded: Vec<String> = steps.iter().filter(|s| !s.1).flat_map(|s| values(s.0)).collect();
        let within = steps
            .iter()
            .filter(|s| s.1)
            .map(|s| values(s.0))
            .reduce(|a, b| a.into_iter().filter(|v| b.contains(v)).collect());
        match within {
            Some(within) => {
                let left: Vec<String> = within.into_iter().filter(|v| !excluded.contains(v)).collect();
                format!("{column} in ({})", left.join(", "))
            }
            None => {
                let mut all = excluded;
                all.sort();
                all.dedup();
                format!("{column} not in ({})", all.join(", "))
            }
        }
    } else {
        return None;
    };
    Some(if nulls_reach { format!("({text} or {column} is null)") } else { text })
}

fn condition(column: &str, test: &Test, pass: bool) -> String {
    let text = match (test, pass) {
        (Test::AtMost { threshold, .. }, true) => format!("{column} <= {}", number(*threshold)),
        (Test::AtMost { threshold, .. }, false) => format!("{column} > {}", number(*threshold)),
        (Test::In { values, .. }, true) => format!("{column} in ({})", values.join(", ")),
        (Test::In { values, .. }, false) => format!("{column} not in ({})", values.join(", ")),
        (Test::IsNull, true) => return format!("{column} is null"),
        (Test::IsNull, false) => return format!("{column} is not null"),
    };
    let nulls_pass = match test {
        Test::AtMost { nulls_pass, .. } | Test::In { nulls_pass, .. } => *nulls_pass,
        Test::IsNull => unreachable!("returned above"),
    };
    if nulls_pass == Some(pass) {
        format!("({text} or {column} is null)")
    } else {
        text
    }
}

impl Surrogate {
    /// Fits the tree on `fit_rows` and measures its fidelity on `check_rows`.
    pub fn distill(
        names: &[String],
        columns: &[ColumnData],
        predicted: &Predicted,
        fit_rows: &[usize],
        check_rows: &[usize],
        growth: Growth,
    ) -> Surrogate {
        let root = fit(names, columns, predicted, fit_rows, growth);
        let (fidelity_metric, fidelity) = match predicted {
            Predicted::Classes { labels, class } => {
                let agree = check_rows
                    .iter()
                    .filter(|&&r| root.predict(names, columns, r).as_str() == Some(labels[class[r]].as_str()))
                    .count();
                ("agreement", agree as f64 / check_rows.len().max(1) as f64)
            }
            Predicted::Values(v) => {
                let n = check_rows.len().max(1) as f64;
                let mean = check_rows.iter().map(|&r| v[r]).sum::<f64>() / n;
                let total: f64 = check_rows.iter().map(|&r| (v[r] - mean).powi(2)).sum();
                let residual: f64 = check_rows
                    .iter()
                    .map(|&r| (v[r] - root.predict(names, columns, r).as_f64().unwrap_or(f64::NAN)).powi(2))
                    .sum();
                ("r2", if total > 0.0 { 1.0 - residual / total } else { 1.0 })
            }
        };
        Surrogate {
            max_depth: growth.max_depth,
            fidelity_metric: fidelity_metric.into(),
            fidelity,
            rows: fit_rows.len(),
            root,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    /// tenure and contract decide; noise does not.
    fn churn(n: usize) -> (Vec<ColumnData>, Predicted) {
        let tenure: Vec<Option<f64>> = (0..n).map(|i| if i % 17 == 0 { None } else { Some((i % 72) as f64) }).collect();
        let contract: Vec<Option<String>> =
            (0..n).map(|i| Some(["Month-to-month", "One year", "Two year"][i % 3].to_string())).collect();
        let noise: Vec<Option<f64>> = (0..n).map(|i| Some(((i * 7919) % 101) as f64)).collect();
        let class: Vec<usize> = (0..n)
            .map(|i| {
                let short = tenure[i].is_none_or(|t| t <= 12.0);
                (short && contract[i].as_deref() == Some("Month-to-month")) as usize
            })
            .collect();
        let columns = vec![ColumnData::Float64(tenure), ColumnData::Text(contract), ColumnData::Float64(noise)];
        (columns, Predicted::Classes { labels: vec!["No".into(), "Yes".into()], class })
    }

    #[test]
    fn a_tree_finds_the_rule_the_predictions_follow() {
        let (columns, predicted) = churn(3000);
        let names = names(&["tenure", "contract", "noise"]);
        let rows: Vec<usize> = (0..3000).collect();
        let s = Surrogate::distill(
            &names,
            &columns,
            &predicted,
            &rows[..2400],
            &rows[2400..],
            Growth { max_depth: 3, min_leaf: 5 },
        );
        assert_eq!((s.fidelity_metric.as_str(), s.fidelity), ("agreement", 1.0), "{:#?}", s.root);
        let rules = s.root.rules();
        assert_eq!(rules.iter().map(|r| r.support).sum::<usize>(), 2400);
        let yes: Vec<&Rule> = rules.iter().filter(|r| r.prediction == "Yes").collect();
        assert_eq!(yes.len(), 1, "{rules:#?}");
        let mut conditions = yes[0].conditions.clone();
        conditions.sort();
        assert_eq!(conditions, ["(tenure <= 12 or tenure is null)", "contract in (Month-to-month)"]);
        assert!(!format!("{rules:?}").contains("noise"));
        // Through JSON, as the catalog keeps it.
        let back: Surrogate = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn a_column_tested_twice_on_a_path_reads_as_one_condition() {
        let at_most = |threshold: f64, nulls_pass: Option<bool>| Test::AtMost { threshold, nulls_pass };
        let within =
            |values: &[&str]| Test::In { values: values.iter().map(|v| v.to_string()).collect(), nulls_pass: None };
        let (t23, t30, t12) = (at_most(23.0, None), at_most(30.0, None), at_most(12.0, None));
        assert_eq!(conditions(&[("tenure", &t23, false), ("tenure", &t30, false)]), ["tenure > 30"]);
        assert_eq!(conditions(&[("tenure", &t30, true), ("tenure", &t12, false)]), ["12 < tenure <= 30"]);
        assert_eq!(
            conditions(&[("tenure", &t30, true), ("x", &t12, true), ("tenure", &t23, true)]),
            ["tenure <= 23", "x <= 12"]
        );
        // NULLs pass "<= 23" and "<= 30" here: they reach the leaf.
        let (n23, n30) = (at_most(23.0, Some(true)), at_most(30.0, Some(true)));
        assert_eq!(conditions(&[("t", &n30, true), ("t", &n23, true)]), ["(t <= 23 or t is null)"]);
        assert_eq!(conditions(&[("t", &n30, true), ("t", &t23, true)]), ["t <= 23"]);
        let (abc, ab, c) = (within(&["a", "b", "c"]), within(&["a", "b"]), within(&["c"]));
        assert_eq!(conditions(&[("k", &abc, true), ("k", &ab, false)]), ["k in (c)"]);
        assert_eq!(conditions(&[("k", &ab, false), ("k", &c, false)]), ["k not in (a, b, c)"]);
        assert_eq!(conditions(&[("k", &abc, true), ("k", &ab, true)]), ["k in (a, b)"]);
        // A NULL test is left as written.
        assert_eq!(conditions(&[("k", &Test::IsNull, false), ("k", &ab, true)]), ["k is not null", "k in (a, b)"]);
    }

    #[test]
    fn thresholds_have_the_fewest_decimals_that_separate() {
        assert_eq!(readable_threshold(15.0, 16.0), 15.0);
        assert_eq!(readable_threshold(56.05, 56.15), 56.1);
        assert_eq!(readable_threshold(0.3, 0.302), 0.3);
        assert_eq!(readable_threshold(0.29, 0.3), 0.29);
        assert_eq!(readable_threshold(-1.5, -1.25), -1.5);
        let (a, b) = (1.0, 1.0 + f64::EPSILON);
        assert!(readable_threshold(a, b) >= a && readable_threshold(a, b) < b);
    }

    #[test]
    fn the_sql_quotes_names_and_values_and_routes_nulls() {
        let tree = Node::Split {
            column: "Contract \"type\"".into(),
            test: Test::In { values: vec!["O'Brien".into(), "b".into()], nulls_pass: Some(false) },
            yes: Box::new(Node::Leaf { prediction: serde_json::json!("it's"), support: 10 }),
            no: Box::new(Node::Split {
                column: "tenure".into(),
                test: Test::AtMost { threshold: 12.5, nulls_pass: Some(true) },
                yes: Box::new(Node::Leaf { prediction: serde_json::json!(1.25), support: 3 }),
                no: Box::new(Node::Leaf { prediction: serde_json::json!(-2.0), support: 4 }),
            }),
        };
        assert_eq!(
            tree.to_sql(),
            "CASE WHEN \"Contract \"\"type\"\"\" IN ('O''Brien', 'b')\n    THEN 'it''s' /* 10 rows */\n    ELSE CASE WHEN (\"tenure\" <= 12.5 OR \"tenure\" IS NULL)\n        THEN 1.25 /* 3 rows */\n        ELSE -2.0 /* 4 rows */\n    END\nEND"
        );
    }

    #[test]
    fn a_regression_tree_follows_the_values_and_reports_r2() {
        let n = 2000;
        let x: Vec<Option<f64>> = (0..n).map(|i| Some(i as f64 / n as f64)).collect();
        let kind: Vec<Option<String>> =
            (0..n).map(|i| if i % 5 == 0 { None } else { Some(format!("k{}", i % 4)) }).collect();
        let values: Vec<f64> =
            (0..n).map(|i| if i < n / 2 { 1.0 } else { 5.0 } + if i % 5 == 0 { 2.0 } else { 0.0 }).collect();
        let columns = vec![ColumnData::Float64(x), ColumnData::Text(kind)];
        let rows: Vec<usize> = (0..n).collect();
        let s = Surrogate::distill(
            &names(&["x", "kind"]),
            &columns,
            &Predicted::Values(values),
            &rows,
            &rows,
            Growth { max_depth: 2, min_leaf: 5 },
        );
        assert_eq!(s.fidelity_metric, "r2");
        assert!((s.fidelity - 1.0).abs() < 1e-9, "{s:#?}");
        let mut leaves: Vec<f64> = s.root.rules().iter().map(|r| r.prediction.parse().unwrap()).collect();
        leaves.sort_by(f64::total_cmp);
        assert_eq!(leaves, [1.0, 3.0, 5.0, 7.0]);
    }
}
