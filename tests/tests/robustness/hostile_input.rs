//! What any role can type: every outcome is a row or an ERROR with a
//! SQLSTATE, and the backend that read it lives on. Before issue 12 a spec
//! nested 20,000 brackets deep overflowed the backend's stack (signal 11,
//! and the postmaster reset every session), and out-of-range numbers
//! panicked (XX000 with a Rust backtrace sent to the client).

use cerebro_shared::mst::DEFAULT_SPEC;
use cerebro_tests::Env;
use tokio_postgres::Client;

use crate::{scoring_model, MODEL};

/// The SQLSTATE of a statement's outcome, `None` when it succeeded. A
/// failure without one (the connection is gone) fails the test.
async fn outcome(db: &Client, sql: &str, text: &str) -> anyhow::Result<Option<String>> {
    db.batch_execute("BEGIN").await?;
    let result = db.execute(sql, &[&text]).await;
    db.batch_execute("ROLLBACK").await?;
    match result {
        Ok(_) => Ok(None),
        Err(e) => match e.as_db_error() {
            Some(d) => {
                assert!(
                    !d.message().contains("panicked") && d.detail().is_none_or(|x| !x.contains("stack backtrace")),
                    "a panic reached the client for {text:?}: {d:?}"
                );
                Ok(Some(d.code().code().to_owned()))
            }
            None => anyhow::bail!("no SQLSTATE for {:?}: {e}", text.chars().take(200).collect::<String>()),
        },
    }
}

const INSERT_SPEC: &str = "INSERT INTO cerebro.models (name, source, target, key, spec)
                           VALUES ('rb_fuzz', 'telco_churn', 'churn', 'customer_id', $1)";
const INSERT_CHANGE: &str = "INSERT INTO cerebro.models (name, change) VALUES ('rb_churn', $1)";
const INSERT_OPTIONS: &str = "INSERT INTO cerebro.models (name, source, target, key, options)
                              VALUES ('rb_fuzz', 'telco_churn', 'churn', 'customer_id', $1::text::jsonb)";

#[tokio::test(flavor = "multi_thread")]
async fn text_nested_deeper_than_any_parser_allows_is_an_error_not_a_crash() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = scoring_model(&env, &db).await?;
    let pid: i32 = db.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
    let deep = |open: &str, close: &str, n: usize| format!("{}8{}", open.repeat(n), close.repeat(n));
    for n in [15_000, 20_000, 200_000] {
        for (open, close) in [("[", "]"), ("{", "}"), ("(", ")")] {
            let nested = deep(open, close, n);
            let spec = format!("model hidden = {nested}");
            assert!(outcome(&db, INSERT_SPEC, &spec).await?.is_some(), "spec {open} x {n} was accepted");
            let change = format!("model hidden = {nested}");
            assert!(outcome(&db, INSERT_CHANGE, &change).await?.is_some(), "change {open} x {n} was accepted");
        }
    }
    // jsonb nests as deep as PostgreSQL allows; Cerebro says what it cannot read.
    let options = format!(r#"{{"hidden": {}}}"#, deep("[", "]", 2_000));
    assert_eq!(outcome(&db, INSERT_OPTIONS, &options).await?.as_deref(), Some("22023"));
    assert_eq!(db.query_one("SELECT pg_backend_pid()", &[]).await?.get::<_, i32>(0), pid);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_range_numbers_are_errors_with_a_sqlstate_never_panics_or_clamps() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = scoring_model(&env, &db).await?;
    let specs = [
        "search halving(4, eta = 4294967296)",
        "search halving(4, eta = 1e308)",
        "search halving(4, eta = 0)",
        "search halving(4, eta = 1)",
        "search random(1e308)",
        "budget 1e308 min",
        "budget 1e308 epochs",
        "train epochs = 1e308",
        "train epochs = -1",
        "model hidden = [1e308]",
        "train batch_size = 4294967296",
    ];
    for spec in specs {
        let state = outcome(&db, INSERT_SPEC, spec).await?;
        assert_eq!(state.as_deref(), Some("22023"), "{spec}");
    }
    for options in
        [r#"{"epochs": 1e400}"#, r#"{"epochs": 1e308}"#, r#"{"lr": -1e400}"#, r#"{"batch_size": 18446744073709551616}"#]
    {
        let state = outcome(&db, INSERT_OPTIONS, options).await?;
        assert_eq!(state.as_deref(), Some("22023"), "{options}");
    }
    // UPDATE and DELETE are refused before any row is converted.
    for sql in [
        "UPDATE cerebro.models SET options = $1::text::jsonb WHERE name = 'rb_churn'",
        "DELETE FROM cerebro.models WHERE name = 'rb_churn' AND $1 <> ''",
    ] {
        let state = outcome(&db, sql, r#"{"epochs": 1e400}"#).await?;
        assert_eq!(state.as_deref(), Some("0A000"), "{sql}");
    }
    Ok(())
}

/// A `numeric` holds what float8 cannot (1e400), and both hold NaN and
/// infinities: such a value in a feature or the target is missing, as
/// scoring reads it, not a training that fails reading its snapshot or an
/// INSERT that fails measuring the target's skew (22003).
#[tokio::test(flavor = "multi_thread")]
async fn numbers_beyond_float8_in_the_rows_are_missing_values_not_failures() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = cerebro_tests::Daemon::start(&env)?;
    db.batch_execute(
        "DROP TABLE IF EXISTS rb_huge;
         CREATE TABLE rb_huge (id int PRIMARY KEY, n numeric, r real, s smallint, i bigint, c text, y numeric);
         INSERT INTO rb_huge SELECT g, g * 1.5, g * 0.5, g % 7, g * 1000, CASE WHEN g % 3 = 0 THEN 'a' ELSE 'b' END,
                                    g * 2.0
             FROM generate_series(1, 400) g;
         -- Each integer type's smallest value, which abs() cannot take.
         INSERT INTO rb_huge VALUES (401, 1e400, 'Infinity', -32768, -9223372036854775808, 'a', 1.0),
                                    (402, 'NaN', 'NaN', 3, 5, 'b', 1e400),
                                    (403, 2.0, 1.0, 4, 6, 'a', 'NaN');",
    )
    .await?;
    for (name, target) in [("rb_huge_y", "y"), ("rb_huge_c", "c")] {
        db.execute(
            "INSERT INTO cerebro.models (name, source, target, key, options)
             VALUES ($1, 'rb_huge', $2, 'id', '{\"epochs\": 2}')",
            &[&name, &target],
        )
        .await?;
        let seen = cerebro_tests::wait_until_done(&db, name, 1, crate::TRAIN_TIMEOUT).await?;
        let (status, _, error) = cerebro_tests::model_state(&db, name, 1).await?;
        assert_eq!((status.as_str(), error), ("ready", None), "{name}: {seen:?}");
        let scored: Vec<(String, f64)> = db
            .query(
                "SELECT key, score FROM cerebro.predictions WHERE model = $1 AND key IN ('401', '402', '403')",
                &[&name],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        assert_eq!(scored.len(), 3, "{name}: {scored:?}");
        assert!(scored.iter().all(|(_, s)| s.is_finite()), "{name}: {scored:?}");
    }
    // The recommendations measure the same rows without failing.
    let row = db
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE distance = 'NaN' OR distance IS NULL)
             FROM cerebro.recommend('rb_huge', 'y', key => 'id')",
            &[],
        )
        .await?;
    let (recommended, unmeasured): (i64, i64) = (row.get(0), row.get(1));
    assert!(recommended > 0 && unmeasured == 0, "{recommended} recommended, {unmeasured} without a distance");
    Ok(())
}

/// splitmix64: the same mutations on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

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
    "*",
    "-",
    ".",
    "'",
    "\"",
    "\n",
    " ",
    "1e308",
    "4294967296",
    "-1",
    "0",
    "1e-400",
    "nan",
    "inf",
    "range(",
    "log",
    "int",
    "halving(",
    "random(",
    "grid",
    "model",
    "train",
    "search",
    "budget",
    "features",
    "encode",
    "source",
    "promote",
    "hidden",
    "epochs",
    "eta",
    "min",
    "epochs",
    "[[[[",
    "]]]]",
    "{{{{",
    "(SELECT 1)",
    "telco_churn.*",
    "é",
    "\u{1F600}",
];

/// `text` with a few random edits: characters deleted, tokens inserted,
/// lines repeated, characters swapped.
fn mutate(rng: &mut Rng, text: &str) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(chars.len() + 1);
        match rng.below(4) {
            0 if !chars.is_empty() => {
                let end = (at + 1 + rng.below(8)).min(chars.len());
                chars.drain(at.min(end)..end);
            }
            1 if chars.len() > 1 => {
                let other = rng.below(chars.len());
                let at = at.min(chars.len() - 1);
                chars.swap(at, other);
            }
            2 => {
                let line: String = text.lines().nth(rng.below(text.lines().count())).unwrap_or("").to_owned();
                chars.splice(at..at, format!("\n{line}\n").chars());
            }
            _ => {
                let token = TOKENS[rng.below(TOKENS.len())];
                chars.splice(at..at, token.chars());
            }
        }
    }
    chars.into_iter().collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn hundreds_of_mutated_specs_and_changes_end_as_a_row_or_an_error() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = scoring_model(&env, &db).await?;
    let pid: i32 = db.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
    let specs = [
        DEFAULT_SPEC,
        "features tenure, contract, monthly_charges, total_charges?, payment_method
         model hidden = {[64, 32], [128, 64]}, dropout = {0, 0.1}
         train lr = {1e-3, 3e-3}, epochs = 2",
        "model hidden = {[8], [16, 8]}, activation = {relu, gelu}, dropout = range(0, 0.3)
         train lr = range(1e-4, 1e-2, log), batch_size = {256, 512}, epochs = 2
         search random(3, seed = 7)
         budget 30 s",
        "encode contract = {onehot, embedding}
         model hidden = [8]
         train epochs = 2
         search halving(4, eta = 2)",
    ];
    let changes = ["model hidden += [16]\ntrain lr = 3e-4", "train epochs = 2, dropout = 0.1", "model hidden = [8, 8]"];
    let mut rng = Rng(12);
    let (mut accepted, mut refused) = (0, std::collections::BTreeMap::<String, usize>::new());
    for i in 0..300 {
        let (sql, seeds) = if i % 3 == 2 { (INSERT_CHANGE, &changes[..]) } else { (INSERT_SPEC, &specs[..]) };
        let seed = seeds[rng.below(seeds.len())];
        let text = mutate(&mut rng, seed);
        match outcome(&db, sql, &text).await? {
            None => accepted += 1,
            Some(code) => *refused.entry(code).or_default() += 1,
        }
    }
    // Both kinds of outcome happen: the mutations are neither all fatal nor all harmless.
    assert!(accepted > 0 && !refused.is_empty(), "accepted {accepted}, refused {refused:?}");
    assert!(!refused.contains_key("XX000"), "internal errors: {refused:?}");
    assert_eq!(db.query_one("SELECT pg_backend_pid()", &[]).await?.get::<_, i32>(0), pid);
    let left: i64 = db.query_one("SELECT count(*) FROM cerebro.models WHERE name = 'rb_fuzz'", &[]).await?.get(0);
    assert_eq!(left, 0, "rolled-back INSERTs left versions");
    let versions: i64 = db.query_one("SELECT count(*) FROM cerebro.models WHERE name = $1", &[&MODEL]).await?.get(0);
    assert!(versions >= 1);
    Ok(())
}

/// The SQLSTATE, message and hint of a refused statement.
async fn refusal(db: &Client, sql: &str) -> anyhow::Result<(String, String, String)> {
    let e = db.batch_execute(sql).await.expect_err("refused");
    let d = e.as_db_error().ok_or_else(|| anyhow::anyhow!("no SQLSTATE: {e}"))?;
    Ok((d.code().code().to_owned(), d.message().to_owned(), d.hint().unwrap_or_default().to_owned()))
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_refuse_what_is_too_big_at_insert_and_name_their_setting() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let insert = |options: &str| {
        format!(
            "INSERT INTO cerebro.models (name, source, target, key, options)
             VALUES ('rb_limits', 'telco_churn', 'churn', 'customer_id', '{options}')"
        )
    };
    let cases = [
        (r#"{"hidden": [4096, 4096, 4096, 4096, 4096, 4096, 4096, 4096]}"#, "cerebro.max_model_parameters"),
        (r#"{"epochs": 100000, "batch_size": 1}"#, "cerebro.max_training_work"),
        (r#"{"hidden": [4096, 4096], "batch_size": 65536}"#, "cerebro.max_model_memory"),
    ];
    for (options, setting) in cases {
        let (code, message, hint) = refusal(&db, &insert(options)).await?;
        assert_eq!(code, "54000", "{options}: {message}");
        assert!(message.contains(setting) && hint.contains(setting), "{options}: {message} / {hint}");
    }
    // Only a superuser changes a limit; then the same INSERT passes it.
    db.batch_execute(&format!(
        "BEGIN; SET LOCAL cerebro.max_training_work = 1e12; {}; ROLLBACK",
        insert(r#"{"epochs": 100000, "batch_size": 1}"#)
    ))
    .await?;
    let user = crate::hostile_role_client(&env, "rb_limited").await?;
    // Before the library is loaded the setting is a placeholder anyone may
    // set; loading it drops what the role had no right to set.
    user.batch_execute("SET cerebro.max_model_parameters = 1000000000").await?;
    user.batch_execute("SELECT count(*) FROM cerebro.models").await?;
    let shown: String = user.query_one("SHOW cerebro.max_model_parameters", &[]).await?.get(0);
    assert_eq!(shown, "25000000");
    let (code, message, _) = refusal(&user, "SET cerebro.max_model_parameters = 1000000000").await?;
    assert_eq!(code, "42501", "{message}");

    // One role's share of the queue.
    db.batch_execute("BEGIN; SET LOCAL cerebro.max_jobs_per_role = 2").await?;
    for i in 0..2 {
        db.batch_execute(&insert(r#"{"epochs": 1}"#).replace("rb_limits", &format!("rb_share_{i}"))).await?;
    }
    let (code, message, _) = refusal(&db, &insert(r#"{"epochs": 1}"#)).await?;
    db.batch_execute("ROLLBACK").await?;
    assert_eq!(code, "54000", "{message}");
    assert!(message.contains("cerebro.max_jobs_per_role"), "{message}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn cerebrods_own_bound_on_work_fails_a_job_with_the_reason() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let bounded = env.with_config_value("work_bound", "max_training_work", "10000")?;
    let _daemon = cerebro_tests::Daemon::start(&bounded)?;
    // 7,043 rows × 2 epochs: within the backends' limit, beyond this daemon's.
    db.batch_execute(
        "INSERT INTO cerebro.models (name, source, target, key, options)
         VALUES ('rb_work', 'telco_churn', 'churn', 'customer_id', '{\"epochs\": 2}')",
    )
    .await?;
    let seen = cerebro_tests::wait_until_done(&db, "rb_work", 1, crate::TRAIN_TIMEOUT).await?;
    assert_eq!(seen.last().map(String::as_str), Some("failed"), "{seen:?}");
    let (_, _, error) = cerebro_tests::model_state(&db, "rb_work", 1).await?;
    let error = error.unwrap_or_default();
    assert!(error.contains("7043 rows × 2 epochs = 14086, more than cerebrod's max_training_work (10000)"), "{error}");
    Ok(())
}
