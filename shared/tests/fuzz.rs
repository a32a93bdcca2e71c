//! Property tests: every parser and decoder in cerebro-shared is total.
//!
//! A backend runs the spec and change parsers, the options reader, the ONNX
//! reader and the batch/frame decoders on what any role or peer sends it; the
//! daemon runs the decoders on what a backend sends. None of them may panic,
//! overflow the stack, read out of bounds or allocate more than the input
//! justifies: each returns a value or an error. Inputs are arbitrary, and,
//! more usefully, valid inputs mutated token by token (deep bracket runs,
//! numbers past every limit, multi-byte characters).
//!
//! Run with `cargo test -p cerebro-shared --test fuzz`; `PROPTEST_CASES=N`
//! runs more cases.

use cerebro_shared::batch::{
    plan_batch, read_batch, read_outputs, write_batch, write_outputs, BatchLayout, ColumnData, ColumnLayout,
    LayoutError, OutputLayout, Span, MAX_BATCH_ROWS,
};
use cerebro_shared::mst::{
    self, Budget, MstError, Search, DEFAULT_SPEC, MAX_BUDGET_EPOCHS, MAX_BUDGET_SECONDS, MAX_ETA, MAX_SEARCH_CANDIDATES,
};
use cerebro_shared::onnx_graph::{check_self_contained, read_initializers, read_signature};
use cerebro_shared::protocol::{self, read_frame, Request, Response, ScoreRequest, MAX_FRAME_BYTES};
use cerebro_shared::spec::{parse_options_text, TrainOptions, OPTION_KEYS};
use proptest::prelude::*;
use serde_json::{json, Value};

/// `cases` cases, kept small so `cargo test` stays quick on two cores;
/// `PROPTEST_CASES=N` in the environment runs N instead, for a longer hunt.
fn config(cases: u32) -> ProptestConfig {
    let default = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_some() {
        default
    } else {
        ProptestConfig { cases, ..default }
    }
}

/// Valid specs and changes to mutate: the default, the examples of
/// docs/selection.md and of the unit tests.
const SPECS: &[&str] = &[
    DEFAULT_SPEC,
    "source   {flights, (SELECT f.*, w.temp FROM flights f JOIN weather w USING (origin, hour) WHERE f.note <> ')')}
features flights.*, weather.{temp, precip}?, -tailnum
encode   dep_time = ple, carrier = {onehot, embedding, 8}
model    hidden = {[64, 32], [{128, 256}, 64]}, activation = {relu, gelu}, dropout = {0, 0.1}
train    lr = {1e-3, 3e-4}, batch_size = {256, 512}, epochs = 30  -- a comment
search   grid
",
    "model hidden = [64]\ntrain lr = range(1e-4, 1e-2, log), epochs = range(5, 50, int)\nsearch random(20, seed = 7)",
    "features tenure, contract, monthly_charges, total_charges?, payment_method
model    hidden = {[64, 32], [128, 64]}, dropout = {0, 0.1}
train    lr = {1e-3, 3e-3}, epochs = 30",
    "model  hidden = {[64, 32], [128, 64], [256, 128]}, dropout = {0, 0.1}
train  lr = range(3e-4, 1e-2, log), epochs = 40
search halving(27, eta = 3)     -- at epochs 2, 6 and 18 (of 40) only the best third goes on
budget 10 min                   -- everything stops by then, keeping its best weights
promote",
    "train epochs = 30\nsearch halving(27, eta = 3, seed = 2)\nbudget 10 min\npromote",
    "search halving(8, eta = 2, min_epochs = 5)\nbudget 200 epochs",
    "source {nyc.flights_known, nyc.flights_joined}; budget 1.5 h",
    "model dropout = range(0, 0.5)\ntrain lr = range(1e-4, 1e-2, log), epochs = range(5, 50, int)\nsearch random(50, seed = 3)",
    "features -total_charges\nmodel hidden += [64]\ntrain lr = 3e-4",
    "source nyc.flights_joined\nfeatures -tailnum, weather.{temp}\nmodel hidden += [64]\ntrain lr = 3e-4",
    "encode contract = embedding, city = 8\ntrain class_weights = balanced, seed = 9007199254740991",
];

/// Tokens that mutations insert: the language's own, and values past its
/// limits or outside what a number is.
const TOKENS: &[&str] = &[
    "[",
    "]",
    "{",
    "}",
    "(",
    ")",
    ",",
    "=",
    "+=",
    "?",
    "-",
    "*",
    ".",
    ";",
    "\n",
    " ",
    "'",
    "--",
    "\"",
    "1e308",
    "-1e308",
    "1e400",
    "1e-400",
    "4294967296",
    "18446744073709551616",
    "9007199254740993",
    "-0",
    "0",
    "-1",
    "2.5",
    ".",
    "1.2.3",
    "+",
    "1e",
    "NaN",
    "inf",
    "nan",
    "range(",
    "range(1, 2, int)",
    "range(1e-300, 1e300, log)",
    "log",
    "int",
    "linear",
    "grid",
    "random(",
    "halving(",
    "eta = ",
    "seed = ",
    "min_epochs = ",
    "budget ",
    " min",
    " epochs",
    " s",
    " h",
    "hidden",
    "lr",
    "epochs",
    "batch_size",
    "dropout",
    "seed",
    "patience",
    "bins",
    "onehot_max",
    "class_weights",
    "search ",
    "model ",
    "train ",
    "encode ",
    "features ",
    "source ",
    "promote",
    "embedding",
    "onehot",
    "ple",
    "robust",
    "é",
    "\u{0}",
    "\u{feff}",
    "日本",
    "(SELECT 1)",
    "t.*",
    "t.{a, b}",
    "default",
];

/// Values that replace a number or a word of a valid text, which keeps it
/// in the grammar more often than an edit at a random byte does.
const VALUES: &[&str] = &[
    "0",
    "1",
    "2",
    "3",
    "-1",
    "-0",
    "0.5",
    "2.5",
    "1e308",
    "-1e308",
    "1e400",
    "1e-400",
    "4294967295",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "9007199254740991",
    "9007199254740993",
    "1000",
    "1001",
    "100000",
    "100001",
    "1000000",
    "1000001",
    "65536",
    "65537",
    "4096",
    "4097",
    "512",
    "513",
    "31536000",
    "8760",
    "8761",
    "525600",
    "1e9",
    "1e10",
    "relu",
    "swish",
    "log",
    "int",
    "linear",
    "grid",
    "min",
    "epochs",
    "s",
    "h",
    "weeks",
    "embedding",
    "onehot",
    "x.y",
    "a.b.c",
    "_",
    "range",
    "é",
];

/// An edit of a text, at positions taken modulo its length.
#[derive(Debug, Clone)]
enum Edit {
    Insert(usize, String),
    Delete(usize, usize),
    Duplicate(usize, usize),
    Replace(usize, usize, String),
    /// Replaces the nth number or word.
    Swap(usize, String),
}

fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        10 => prop::sample::select(TOKENS).prop_map(str::to_string),
        2 => (1usize..100, prop::sample::select(&["[", "{", "(", "]", "}"][..])).prop_map(|(n, b)| b.repeat(n)),
        1 => Just("[".repeat(20_000)),
        1 => Just("{".repeat(20_000)),
        1 => any::<u64>().prop_map(|n| n.to_string()),
        1 => any::<f64>().prop_map(|x| format!("{x:e}")),
        1 => "\\PC{0,6}",
    ]
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        3 => (any::<usize>(), token()).prop_map(|(at, t)| Edit::Insert(at, t)),
        2 => (any::<usize>(), 1usize..12).prop_map(|(at, n)| Edit::Delete(at, n)),
        1 => (any::<usize>(), 1usize..40).prop_map(|(at, n)| Edit::Duplicate(at, n)),
        3 => (any::<usize>(), 1usize..8, token()).prop_map(|(at, n, t)| Edit::Replace(at, n, t)),
        6 => swap(),
    ]
}

/// The byte ranges of the values of a text: the numbers, and the words
/// that follow "=", "," or an opening bracket.
fn words(text: &str) -> Vec<std::ops::Range<usize>> {
    let is_word = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-' | b'+');
    let bytes = text.as_bytes();
    let is_value = |s: usize| {
        let before = bytes[..s].iter().rev().find(|b| !b.is_ascii_whitespace());
        bytes[s].is_ascii_digit() || matches!(before, Some(b'=' | b',' | b'{' | b'[' | b'('))
    };
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in bytes.iter().copied().chain([b' ']).enumerate() {
        match (is_word(c), start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                if is_value(s) {
                    out.push(s..i);
                }
                start = None;
            }
            _ => {}
        }
    }
    out
}

/// The char boundary at or before `at % (len + 1)`.
fn boundary(text: &str, at: usize) -> usize {
    let mut at = at % (text.len() + 1);
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

fn apply(text: &str, edits: &[Edit]) -> String {
    let mut text = text.to_string();
    for e in edits {
        let span = |at: usize, n: usize| {
            let start = boundary(&text, at);
            let end = boundary(&text, start.saturating_add(n).min(text.len()));
            (start, end.max(start))
        };
        match e {
            Edit::Insert(at, t) => {
                let at = boundary(&text, *at);
                text.insert_str(at, t);
            }
            Edit::Delete(at, n) => {
                let (s, e) = span(*at, *n);
                text.replace_range(s..e, "");
            }
            Edit::Duplicate(at, n) => {
                let (s, e) = span(*at, *n);
                let piece = text[s..e].to_string();
                text.insert_str(e, &piece);
            }
            Edit::Replace(at, n, t) => {
                let (s, e) = span(*at, *n);
                text.replace_range(s..e, t);
            }
            Edit::Swap(n, v) => {
                let words = words(&text);
                if !words.is_empty() {
                    text.replace_range(words[n % words.len()].clone(), v);
                }
            }
        }
    }
    text
}

fn swap() -> impl Strategy<Value = Edit> {
    (any::<usize>(), prop::sample::select(VALUES)).prop_map(|(n, v)| Edit::Swap(n, v.to_string()))
}

/// A valid spec with a few edits: mostly one or two, or only values
/// swapped, so that many still parse and go on to be checked, expanded and
/// planned.
fn mutated_spec() -> impl Strategy<Value = String> {
    let edits = prop_oneof![
        3 => prop::collection::vec(edit(), 1..3),
        1 => prop::collection::vec(edit(), 3..8),
        3 => prop::collection::vec(swap(), 1..4),
    ];
    (prop::sample::select(SPECS), edits).prop_map(|(s, e)| apply(s, &e))
}

fn token_soup() -> impl Strategy<Value = String> {
    prop::collection::vec(token(), 0..30).prop_map(|t| t.concat())
}

/// An error points into the text and quotes a bounded part of it.
fn check_error(text: &str, e: &MstError) {
    assert!(e.offset <= text.len() && text.is_char_boundary(e.offset), "{e:?}");
    assert!(e.line >= 1 && e.column >= 1, "{e:?}");
    assert!(e.snippet.ends_with('^'), "{e:?}");
    assert!(e.snippet.chars().count() < 400, "a snippet is cut to a window: {}", e.snippet.len());
    assert!(e.message.chars().count() < 400, "{}", e.message);
    let _ = e.to_string();
}

/// Everything a backend does with a spec text: parse, count, expand (with
/// a small limit, as cerebro.max_candidates is), plan; and as a change.
fn exercise_spec(text: &str) {
    match mst::parse(text) {
        Ok(spec) => {
            match spec.expand(text, 64) {
                Ok(candidates) => {
                    assert!(candidates.len() <= 64);
                    assert_eq!(Ok(candidates.len() as u128), spec.candidates(text));
                    for c in &candidates {
                        let _ = TrainOptions::from_json(Some(&Value::Object(c.options.clone())));
                    }
                }
                Err(e) => check_error(text, &e),
            }
            match spec.search.as_ref().map(|s| s.0) {
                Some(Search::Random { n, seed }) | Some(Search::Halving { n, seed, .. }) => {
                    assert!((1..=MAX_SEARCH_CANDIDATES).contains(&n) && seed < 1 << 53);
                }
                _ => {}
            }
            if let Some(Search::Halving { eta, min_epochs, .. }) = spec.search.as_ref().map(|s| s.0) {
                assert!((2..=MAX_ETA).contains(&eta) && min_epochs.is_none_or(|m| (1..=100_000).contains(&m)));
            }
            match spec.budget.as_ref().map(|b| b.0) {
                Some(Budget::Seconds(s)) => assert!(s > 0.0 && s <= MAX_BUDGET_SECONDS, "{s}"),
                Some(Budget::Epochs(e)) => assert!((1..=MAX_BUDGET_EPOCHS).contains(&e), "{e}"),
                None => {}
            }
            for max_epochs in [0, 1, 30, 100_000, u32::MAX] {
                let plan = spec.plan(max_epochs);
                assert!(plan.rungs.windows(2).all(|w| w[0] < w[1]) && plan.rungs.iter().all(|r| *r < max_epochs));
                serde_json::to_string(&plan).expect("a plan serialises");
            }
        }
        Err(e) => check_error(text, &e),
    }
    match mst::parse_change(text) {
        Ok(change) => {
            let _ = serde_json::to_string(&change.set).expect("a change serialises");
        }
        Err(e) => check_error(text, &e),
    }
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn mutated_specs_parse_or_fail_cleanly(text in mutated_spec()) {
        exercise_spec(&text);
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn any_text_parses_or_fails_cleanly(text in prop_oneof![any::<String>(), token_soup()]) {
        exercise_spec(&text);
    }

    #[test]
    fn clauses_with_any_number_parse_or_fail_cleanly(
        x in prop_oneof![any::<f64>().prop_map(|x| format!("{x:e}")), any::<u64>().prop_map(|n| n.to_string()),
                         any::<i64>().prop_map(|n| n.to_string()), Just("1e400".to_string())],
        clause in prop::sample::select(&[
            "search halving(4, eta = {})", "search halving({}, eta = 3)", "search random(5, seed = {})",
            "search halving(4, min_epochs = {})", "budget {} min", "budget {} epochs", "budget {} h",
            "train epochs = {}", "train batch_size = {}", "train seed = {}", "train lr = {}",
            "model hidden = [{}]", "encode c = {}", "train epochs = range(1, {}, int)\nsearch random(3)",
        ][..]),
    ) {
        exercise_spec(&clause.replace("{}", &x));
    }
}

// ---- options JSON -------------------------------------------------------

/// JSON values of every type, numbers at and past every limit.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(json!(null)),
        any::<bool>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        prop::sample::select(&[
            u64::MAX as f64, 4_294_967_296.0, 1e308, -1e308, f64::MIN_POSITIVE, -0.0, 0.5, 1e-300, 3.0, 100_001.0,
        ][..]).prop_map(Value::from),
        (0u64..10_000).prop_map(Value::from),
        prop::sample::select(OPTION_KEYS).prop_map(Value::from),
        prop::sample::select(
            &["relu", "sgd", "warmup", "ple", "balanced", "none", "embedding", "huber", "ordered", "log", "auto"][..],
        )
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,6}", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn options_object() -> impl Strategy<Value = Value> {
    prop::collection::btree_map(prop::sample::select(OPTION_KEYS), json_value(), 0..6)
        .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
}

fn check_options(v: &Value) {
    if let Ok(o) = TrainOptions::from_json(Some(v)) {
        o.validate().expect("accepted options are valid");
        assert_eq!(TrainOptions::from_json(Some(&o.to_json())).as_ref(), Ok(&o), "options read back as they are");
    }
}

const OPTION_TEXTS: &[&str] = &[
    r#"{"hidden": [64, 32], "epochs": 3, "learning_rate": 0.01}"#,
    r#"{"hidden": [32], "residual_blocks": 2, "norm": "layer", "dropout": 0.1, "numeric_encoding": "ple",
        "bins": 16, "onehot_max": 4, "encodings": {"tenure": "quantile", "city": 8, "plan": "onehot"},
        "class_weights": {"yes": 3.0}, "loss": "mse"}"#,
    r#"{"optimizer": "sgd", "momentum": 0.8, "schedule": "warmup", "warmup_epochs": 2, "clip_norm": 1.5}"#,
];

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn any_options_value_is_read_or_refused(v in prop_oneof![options_object(), json_value()]) {
        check_options(&v);
    }

    #[test]
    fn any_options_text_is_read_or_refused(
        text in prop_oneof![
            any::<String>(),
            (prop::sample::select(OPTION_TEXTS), prop::collection::vec(edit(), 1..5)).prop_map(|(s, e)| apply(s, &e)),
            options_object().prop_map(|v| v.to_string()),
        ]
    ) {
        if let Ok(v) = parse_options_text(&text) {
            check_options(&v);
        }
    }
}

// ---- control frames -----------------------------------------------------

fn real_frames() -> Vec<Vec<u8>> {
    let cols = [ColumnData::Float64(vec![Some(1.0), None]), ColumnData::Text(vec![Some("a".into()), None])];
    let (layout, _) = plan_batch(&cols);
    let requests = [
        Request::Hello { protocol: protocol::PROTOCOL_VERSION, client: "test".into() },
        Request::Attach { region: 3, len: 4096 },
        Request::Score(ScoreRequest { model_version_id: 7, artifact_sha256: "ab".into(), region: 0, layout }),
    ];
    let mut frames: Vec<Vec<u8>> = requests.iter().map(protocol::encode).collect();
    frames.push(protocol::encode(&Response::Scored { region: 0, rows: 2 }));
    frames
}

fn byte_edits() -> impl Strategy<Value = Vec<(usize, u8, u8)>> {
    // (position, what to do, byte): overwrite, insert, delete.
    prop::collection::vec((any::<usize>(), 0u8..3, any::<u8>()), 0..10)
}

fn apply_bytes(bytes: &mut Vec<u8>, edits: &[(usize, u8, u8)]) {
    for &(at, op, b) in edits {
        let at = at % (bytes.len() + 1);
        match op {
            0 if at < bytes.len() => bytes[at] = b,
            1 => bytes.insert(at, b),
            _ if at < bytes.len() => {
                bytes.remove(at);
            }
            _ => {}
        }
    }
}

fn exercise_frames(bytes: &[u8]) {
    let mut r = bytes;
    while let Ok(_) | Err(protocol::FrameError::Malformed(_)) = read_frame::<_, Request>(&mut r) {}
    let _ = read_frame::<_, Response>(&mut &bytes[..]);
    let _ = protocol::decode::<Request>(bytes);
    let _ = protocol::decode::<Response>(bytes);
    if let Some(header) = bytes.first_chunk::<4>() {
        match protocol::payload_len(*header) {
            Ok(n) => assert!(n <= MAX_FRAME_BYTES),
            Err(e) => assert!(matches!(e, protocol::FrameError::TooLarge(n) if n > MAX_FRAME_BYTES)),
        }
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn any_bytes_decode_as_frames_or_fail(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        exercise_frames(&bytes);
    }

    #[test]
    fn mutated_frames_decode_or_fail(which in 0usize..4, edits in byte_edits(), length in prop::option::of(any::<u32>())) {
        let mut frame = real_frames().swap_remove(which);
        apply_bytes(&mut frame, &edits);
        if let (Some(len), Some(header)) = (length, frame.first_chunk_mut::<4>()) {
            *header = len.to_le_bytes();
        }
        exercise_frames(&frame);
    }
}

#[test]
fn deeply_nested_frames_are_refused_by_the_json_recursion_limit() {
    let payload = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(payload.len() <= MAX_FRAME_BYTES);
    assert!(matches!(protocol::decode::<Request>(payload.as_bytes()), Err(protocol::FrameError::Malformed(_))));
    let payload = format!(r#"{{"type": "score", "layout": {}{}}}"#, "{\"a\":".repeat(50_000), "}".repeat(50_000));
    assert!(matches!(protocol::decode::<Request>(payload.as_bytes()), Err(protocol::FrameError::Malformed(_))));
}

// ---- batches ------------------------------------------------------------

fn span() -> impl Strategy<Value = Span> {
    prop_oneof![
        4 => (0u64..600, 0u64..600),
        1 => (any::<u64>(), any::<u64>()),
        1 => (0u64..600, Just(1u64 << 60)),
        1 => (Just(u64::MAX - 4), 0u64..64),
    ]
    .prop_map(|(offset, len)| Span { offset, len })
}

fn layout() -> impl Strategy<Value = BatchLayout> {
    let column = prop_oneof![
        (span(), span()).prop_map(|(values, validity)| ColumnLayout::Float64 { values, validity }),
        (span(), span(), span()).prop_map(|(offsets, data, validity)| ColumnLayout::Text { offsets, data, validity }),
    ];
    let rows = prop_oneof![4 => 0u32..70, 1 => any::<u32>(), 1 => Just(MAX_BATCH_ROWS), 1 => Just(MAX_BATCH_ROWS + 1)];
    (rows, prop::collection::vec(column, 0..6), span(), span()).prop_map(|(rows, columns, scores, labels)| {
        BatchLayout {
            rows,
            columns,
            output: OutputLayout {
                scores,
                labels,
                classes: 0,
                probabilities: Span::default(),
                explained: 0,
                explanations: Span::default(),
            },
        }
    })
}

fn columns() -> impl Strategy<Value = Vec<ColumnData>> {
    (0usize..40).prop_flat_map(|rows| {
        let column = prop_oneof![
            prop::collection::vec(prop::option::of(-1e6f64..1e6), rows).prop_map(ColumnData::Float64),
            prop::collection::vec(prop::option::of("\\PC{0,5}"), rows).prop_map(ColumnData::Text),
        ];
        prop::collection::vec(column, 0..5)
    })
}

/// Everything either side does with a layout and a region it did not make.
fn exercise_batch(layout: &BatchLayout, region: &mut [u8]) {
    match read_batch(layout, region) {
        Ok(cols) => {
            assert_eq!(cols.len(), layout.columns.len());
            assert!(cols.iter().all(|c| c.len() == layout.rows as usize));
            // Disjoint spans: every non-empty column took at least 4 bytes a row.
            if layout.rows > 0 {
                assert!(cols.len() as u64 * layout.rows as u64 * 4 <= region.len() as u64);
            }
        }
        Err(LayoutError::TooManyRows(rows)) => assert!(rows > MAX_BATCH_ROWS),
        Err(_) => {}
    }
    let _ = read_outputs(layout, region);
    let rows = layout.rows.min(4096) as usize;
    let _ = write_outputs(layout, region, &vec![0.5; rows], &vec![1; rows]);
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn any_layout_over_any_region_reads_or_fails(layout in layout(), region in prop::collection::vec(any::<u8>(), 0..600)) {
        let mut region = region;
        exercise_batch(&layout, &mut region);
        let _ = write_batch(&[], &layout, &mut region);
    }

    #[test]
    fn real_batches_round_trip_and_mutated_ones_read_or_fail(
        cols in columns(),
        rows in prop::option::of(any::<u32>()),
        shifts in prop::collection::vec((any::<usize>(), 0u8..3, any::<u64>()), 0..4),
        bytes in byte_edits(),
    ) {
        let (layout, len) = plan_batch(&cols);
        let mut region = vec![0xA5u8; len as usize];
        write_batch(&cols, &layout, &mut region).unwrap();
        prop_assert_eq!(&read_batch(&layout, &region).unwrap(), &cols);

        // Hostile layouts: another row count, spans moved or resized.
        let mut hostile = layout.clone();
        if let Some(rows) = rows {
            hostile.rows = rows;
        }
        for &(which, field, value) in &shifts {
            if hostile.columns.is_empty() {
                hostile.output.scores.len = value;
                continue;
            }
            let n = hostile.columns.len();
            let spans: Vec<&mut Span> = match &mut hostile.columns[which % n] {
                ColumnLayout::Float64 { values, validity } => vec![values, validity],
                ColumnLayout::Text { offsets, data, validity } => vec![offsets, data, validity],
            };
            let count = spans.len();
            let span = spans.into_iter().nth(field as usize % count).unwrap();
            if value % 2 == 0 { span.offset = value % 1024 } else { span.len = value >> (value % 64) }
        }
        exercise_batch(&hostile, &mut region.clone());
        let _ = write_batch(&cols, &hostile, &mut region.clone());

        // Hostile bytes: offsets, bitmaps and text rewritten under a valid layout.
        let mut shaken = region.clone();
        apply_bytes(&mut shaken, &bytes);
        exercise_batch(&layout, &mut shaken);
    }
}

// ---- ONNX ---------------------------------------------------------------

#[path = "support/protobuf.rs"]
mod protobuf;
use protobuf::{field, int_field, value_info};

/// A small model: an initializer with data, a node with a subgraph
/// attribute, inputs and an output.
fn real_model() -> Vec<u8> {
    let weights: Vec<u8> = [1.0f32, 2.0, 3.0].iter().flat_map(|x| x.to_le_bytes()).collect();
    let initializer = [int_field(1, 3), int_field(2, 1), field(8, b"w"), field(9, &weights)].concat();
    let subgraph = field(5, &[field(8, b"c"), int_field(2, 1)].concat());
    let node = field(5, &field(6, &subgraph));
    let graph = [
        field(1, &node),
        field(5, &initializer),
        field(11, &value_info("features", 1, &[None, Some(3)])),
        field(11, &value_info("w", 1, &[Some(3)])),
        field(12, &value_info("p", 1, &[None, Some(1)])),
    ]
    .concat();
    [int_field(1, 8), field(2, b"test"), field(7, &graph)].concat()
}

fn exercise_onnx(bytes: &[u8]) {
    let _ = check_self_contained(bytes);
    let _ = read_signature(bytes);
    if let Ok(initializers) = read_initializers(bytes) {
        let total: usize = initializers.iter().map(|i| i.data.len()).sum();
        assert!(total * 4 <= bytes.len());
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn any_bytes_read_as_onnx_or_fail(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        exercise_onnx(&bytes);
    }

    #[test]
    fn mutated_models_read_or_fail(edits in byte_edits()) {
        let mut model = real_model();
        apply_bytes(&mut model, &edits);
        exercise_onnx(&model);
    }
}

#[test]
fn the_real_model_reads() {
    let model = real_model();
    assert_eq!(read_signature(&model).unwrap().inputs.len(), 1);
    assert_eq!(read_initializers(&model).unwrap()[0].data, vec![1.0, 2.0, 3.0]);
}
