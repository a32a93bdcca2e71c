//! The whole product, every part real: PostgreSQL 15 with the release build of
//! the extension, cerebrod processes, ONNX Runtime, the telco churn data.
//!
//! Run by deploy/test.sh (tier 3), one test at a time: the tests share one
//! database and start and kill their own daemons. Roles are the cluster's,
//! not the database's: tests create theirs if missing and never drop them.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use cerebro_shared::protocol::{self, Request, Response, PROTOCOL_VERSION};
use cerebro_tests::{daemon_log, daemon_scores, job_attempts, model_state, wait_for, wait_until_done, Daemon, Env};

const TRAIN_TIMEOUT: Duration = Duration::from_secs(300);

async fn insert(db: &tokio_postgres::Client, name: &str, target: &str, options: &str) -> anyhow::Result<i32> {
    let row = db
        .query_one(
            "INSERT INTO cerebro.models (name, source, target, key, options)
             VALUES ($1, 'telco_churn', $2, 'customer_id', $3::text::jsonb) RETURNING version",
            &[&name, &target, &options],
        )
        .await?;
    Ok(row.get(0))
}

/// `INSERT ... RETURNING` reads the row as queued: the version (a
/// selection's first candidate) and its status, one row per row inserted,
/// through a statement prepared once and run again, and in a transaction
/// block.
#[tokio::test(flavor = "multi_thread")]
async fn an_insert_returns_the_version_it_queued() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = Daemon::start(&env)?;
    let returning = "INSERT INTO cerebro.models (name, source, target, key, options)
                     VALUES ('e2e_returning', 'telco_churn', 'churn', 'customer_id', $1::text::jsonb)
                     RETURNING name, version, status, options->>'epochs'";
    let statement = db.prepare(returning).await?;
    for expected in 1..=2 {
        let row = db.query_one(&statement, &[&r#"{"epochs": 1}"#]).await?;
        assert_eq!(row.get::<_, String>(0), "e2e_returning");
        assert_eq!(row.get::<_, Option<i32>>(1), Some(expected), "the version queued");
        assert_eq!(row.get::<_, Option<String>>(2).as_deref(), Some("queued"));
        assert_eq!(row.get::<_, Option<String>>(3).as_deref(), Some("1"), "the rest as written");
    }
    let two = db
        .query(
            "INSERT INTO cerebro.models (name, source, target, key, options) VALUES
                 ('e2e_returning', 'telco_churn', 'churn', 'customer_id', '{\"epochs\": 1}'),
                 ('e2e_returning', 'telco_churn', 'churn', 'customer_id', '{\"epochs\": 1}')
             RETURNING version",
            &[],
        )
        .await?;
    assert_eq!(two.iter().map(|r| r.get::<_, i32>(0)).collect::<Vec<_>>(), [3, 4]);
    let selection = db
        .query_one(
            "INSERT INTO cerebro.models (name, source, target, key, spec) VALUES ('e2e_returning', 'telco_churn',
                 'churn', 'customer_id', 'model hidden = {[8], [16]}\ntrain epochs = 1') RETURNING version, status",
            &[],
        )
        .await?;
    let first: i32 = db
        .query_one(
            "SELECT min(version) FROM cerebro.model_versions
             WHERE name = 'e2e_returning' AND selection_id IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(selection.get::<_, i32>(0), first, "a selection returns its first candidate");
    assert_eq!(first, 5);
    assert_eq!(selection.get::<_, String>(1), "queued");
    // Rolled back, it said which version it would have been, and queued nothing.
    db.batch_execute("BEGIN").await?;
    let undone: i32 = db.query_one(&statement, &[&r#"{"epochs": 1}"#]).await?.get(1);
    db.batch_execute("ROLLBACK").await?;
    assert!(undone > 6, "after the selection's candidates: {undone}");
    for version in 1..=6 {
        let states = wait_until_done(&db, "e2e_returning", version, TRAIN_TIMEOUT).await?;
        assert_eq!(states.last().map(String::as_str), Some("ready"), "version {version}");
    }
    let plain: i64 = db
        .query_one(
            "SELECT count(*) FROM cerebro.model_versions WHERE name = 'e2e_returning' AND selection_id IS NULL",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(plain, 4, "the rolled back INSERT left no version");
    Ok(())
}

/// The same label and a score equal to 1e-6: a row may be summed in another
/// order in another batch (docs/sql.md).
fn agree(a: &(Option<String>, f64), b: &(Option<String>, f64)) -> bool {
    a.0 == b.0 && (a.1 - b.1).abs() <= 1e-6
}

async fn sql_scores(
    db: &tokio_postgres::Client,
    query: &str,
) -> anyhow::Result<HashMap<String, (Option<String>, f64)>> {
    Ok(db
        .query(query, &[])
        .await?
        .into_iter()
        .map(|r| (r.get::<_, String>(0), (r.get::<_, Option<String>>(1), r.get::<_, f64>(2))))
        .collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_trains_from_insert_and_scores_from_select() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;

    // Queued while no daemon runs: the job waits in the catalog.
    let v = insert(&db, "e2e_churn", "churn", r#"{"epochs": 25}"#).await?;
    assert_eq!(model_state(&db, "e2e_churn", v).await?.0, "queued");

    let _daemon = Daemon::start(&env)?;
    let seen = wait_until_done(&db, "e2e_churn", v, TRAIN_TIMEOUT).await?;
    assert_eq!(seen.last().map(String::as_str), Some("ready"), "statuses seen: {seen:?}");
    let allowed = ["queued", "training", "ready"];
    assert!(seen.iter().all(|s| allowed.contains(&s.as_str())), "{seen:?}");

    let row = db
        .query_one(
            "SELECT (metrics->>'auc')::float8, metrics ? 'accuracy' AND metrics ? 'log_loss', epoch, progress,
                    created_by, trained_at IS NOT NULL
             FROM cerebro.models WHERE name = 'e2e_churn' AND version = $1",
            &[&v],
        )
        .await?;
    let auc: f64 = row.get(0);
    assert!(auc >= 0.80, "validation AUC {auc}");
    assert!(row.get::<_, bool>(1));
    let epochs_run: i32 = row.get(2);
    assert!(epochs_run >= 1);
    assert!(row.get::<_, String>(3).starts_with("trained"));
    assert_eq!(row.get::<_, String>(4), "postgres");
    assert!(row.get::<_, bool>(5));

    let history: i64 = db
        .query_one(
            "SELECT count(*) FROM cerebro.training_history h JOIN cerebro.model_versions m ON m.id = h.model_version_id
             WHERE m.name = 'e2e_churn' AND m.version = $1",
            &[&v],
        )
        .await?
        .get(0);
    assert_eq!(history, epochs_run as i64, "one history row per epoch");
    let (bytes, fingerprint): (i64, Option<String>) = {
        let r = db
            .query_one(
                "SELECT a.size_bytes, s.fingerprint FROM cerebro.model_versions m
                 JOIN cerebro.artifacts a ON a.model_version_id = m.id JOIN cerebro.snapshots s ON s.id = m.snapshot_id
                 WHERE m.name = 'e2e_churn' AND m.version = $1",
                &[&v],
            )
            .await?;
        (r.get(0), r.get(1))
    };
    assert!(bytes > 1000);
    assert_eq!(fingerprint.map(|f| f.len()), Some(64));

    // SQL predictions equal the daemon's own scoring of the same rows.
    let sql = sql_scores(&db, "SELECT key, label, score FROM cerebro.predictions WHERE model = 'e2e_churn'").await?;
    assert_eq!(sql.len(), 7043);
    let reference = daemon_scores(&env, "e2e_churn", &[])?;
    assert_eq!(reference.len(), 7043);
    for (key, (label, score)) in &reference {
        let (sql_label, sql_score) = sql.get(key).unwrap_or_else(|| panic!("key {key} missing from SQL"));
        assert_eq!(sql_label, label, "key {key}");
        assert!((sql_score - score).abs() <= 1e-6, "key {key}: SQL {sql_score} daemon {score}");
        assert_eq!(label.as_deref(), Some(if *score >= 0.5 { "Yes" } else { "No" }));
    }

    // Small batches give the same answers (many round trips, both regions).
    db.batch_execute("SET cerebro.batch_rows = 500").await?;
    let small = sql_scores(&db, "SELECT key, label, score FROM cerebro.predictions WHERE model = 'e2e_churn'").await?;
    assert_eq!(small.len(), sql.len());
    assert!(small.iter().all(|(k, v)| agree(v, &sql[k])), "batches of 500 and of 8192");
    db.batch_execute("RESET cerebro.batch_rows").await?;

    // A key filter is pushed into the source query.
    let one =
        sql_scores(&db, "SELECT key, label, score FROM cerebro.predictions WHERE model = 'e2e_churn' AND key = '42'")
            .await?;
    assert_eq!(one.len(), 1);
    assert!(agree(&one["42"], &sql["42"]), "{:?} against {:?}", one["42"], sql["42"]);

    // Another relation with the same columns, named in the query; the scan
    // reads it with the caller's privileges.
    db.batch_execute(
        "CREATE OR REPLACE VIEW public.telco_new AS SELECT * FROM telco_churn WHERE tenure < 12;
         DO $$ BEGIN CREATE ROLE e2e_analyst; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         GRANT SELECT ON public.telco_new TO e2e_analyst;
         SELECT cerebro.grant_model('e2e_churn', 'e2e_analyst');",
    )
    .await?;
    let new_rows: i64 = db.query_one("SELECT count(*) FROM telco_new", &[]).await?.get(0);
    let q = "SELECT key, label, score FROM cerebro.predictions WHERE model = 'e2e_churn' AND source = 'telco_new'";
    let scored = sql_scores(&db, q).await?;
    assert_eq!(scored.len() as i64, new_rows);
    assert!(scored.iter().all(|(k, v)| sql.get(k).is_some_and(|s| agree(v, s))));
    let reference_new = daemon_scores(&env, "e2e_churn", &["--source", "telco_new"])?;
    assert_eq!(reference_new.len() as i64, new_rows);

    db.batch_execute("SET ROLE e2e_analyst").await?;
    assert_eq!(sql_scores(&db, q).await?.len() as i64, new_rows);
    let denied = db
        .query("SELECT * FROM cerebro.predictions WHERE model = 'e2e_churn'", &[])
        .await
        .expect_err("no privilege on telco_churn");
    assert_eq!(denied.code().map(|c| c.code()), Some("42501"), "{denied}");
    db.batch_execute("RESET ROLE").await?;

    // A source without one of the model's columns: the column is named.
    let missing = db
        .query(
            "SELECT * FROM cerebro.predictions
             WHERE model = 'e2e_churn' AND source = '(SELECT customer_id, tenure FROM telco_churn)'",
            &[],
        )
        .await
        .expect_err("a source without the model's columns");
    assert_eq!(missing.code().map(|c| c.code()), Some("42703"), "{missing}");
    let said = missing.as_db_error().map(|e| e.message().to_string()).unwrap_or_default();
    assert!(said.contains("does not exist in (SELECT customer_id, tenure"), "{said}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_and_multiclass_models_train_and_score() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = Daemon::start(&env)?;
    let reg = insert(&db, "e2e_charges", "monthly_charges", r#"{"epochs": 15}"#).await?;
    let multi = insert(&db, "e2e_contract", "contract", r#"{"epochs": 5}"#).await?;
    for (name, v) in [("e2e_charges", reg), ("e2e_contract", multi)] {
        let seen = wait_until_done(&db, name, v, TRAIN_TIMEOUT).await?;
        assert_eq!(seen.last().map(String::as_str), Some("ready"), "{name}: {seen:?}");
    }
    let r = db
        .query_one(
            "SELECT task, (metrics->>'r2')::float8, metrics ? 'rmse' AND metrics ? 'mae'
             FROM cerebro.models WHERE name = 'e2e_charges'",
            &[],
        )
        .await?;
    assert_eq!(r.get::<_, String>(0), "regression");
    assert!(r.get::<_, f64>(1) > 0.8, "R² {}", r.get::<_, f64>(1));
    assert!(r.get::<_, bool>(2));
    let preds =
        sql_scores(&db, "SELECT key, label, score FROM cerebro.predictions WHERE model = 'e2e_charges'").await?;
    assert_eq!(preds.len(), 7043);
    assert!(preds.values().all(|(label, value)| label.is_none() && (0.0..200.0).contains(value)));
    assert_eq!(preds, daemon_scores(&env, "e2e_charges", &[])?);

    let m = db
        .query_one(
            "SELECT task, metrics ? 'accuracy' AND metrics ? 'macro_f1' FROM cerebro.models WHERE name = 'e2e_contract'",
            &[],
        )
        .await?;
    assert_eq!(m.get::<_, String>(0), "multiclass");
    assert!(m.get::<_, bool>(1));
    let labels: Vec<String> = db
        .query("SELECT DISTINCT label FROM cerebro.predictions WHERE model = 'e2e_contract'", &[])
        .await?
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    let known = ["Month-to-month", "One year", "Two year"];
    assert!(!labels.is_empty() && labels.iter().all(|l| known.contains(&l.as_str())), "{labels:?}");
    Ok(())
}

/// `key,score` by key: `bytes` (an exported ONNX file) scoring `rows` (a
/// JSON array of row objects) in Python's onnxruntime (tests/python/score_onnx.py).
/// Permutation importance (issue 16) on a table where only `a` and `b`
/// decide the target, for every head.
#[tokio::test(flavor = "multi_thread")]
async fn importance_ranks_the_two_columns_that_decide_the_target_first() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = Daemon::start(&env)?;
    db.batch_execute(
        "DROP TABLE IF EXISTS e2e_two_matter;
         SELECT setseed(0.25);
         CREATE TABLE e2e_two_matter AS
         SELECT i AS id, a, b, random() AS noise1, random() AS noise2, (ARRAY['x', 'y', 'z'])[1 + i % 3] AS noise3,
                CASE WHEN a + b > 1 THEN 'yes' ELSE 'no' END AS label,
                3 * a - 2 * b + 0.05 * random() AS amount,
                CASE WHEN a > 0.5 AND b > 0.5 THEN 'both' WHEN a > 0.5 THEN 'a' WHEN b > 0.5 THEN 'b'
                     ELSE 'none' END AS kind
         FROM (SELECT i, random() AS a, random() AS b FROM generate_series(1, 3000) i) s",
    )
    .await?;
    let mut trained = Vec::new();
    for (name, target, metric) in
        [("e2e_imp_binary", "label", "auc"), ("e2e_imp_reg", "amount", "rmse"), ("e2e_imp_multi", "kind", "accuracy")]
    {
        db.execute(
            "INSERT INTO cerebro.models (name, source, target, key, features, options)
             VALUES ($1, 'e2e_two_matter', $2, 'id', ARRAY['noise1', 'a', 'noise2', 'b', 'noise3'], '{\"epochs\": 30}')",
            &[&name, &target],
        )
        .await?;
        let v: i32 = db.query_one("SELECT max(version) FROM cerebro.models WHERE name = $1", &[&name]).await?.get(0);
        trained.push((name, v, metric));
    }
    for &(name, v, metric) in &trained {
        let seen = wait_until_done(&db, name, v, TRAIN_TIMEOUT).await?;
        assert_eq!(seen.last().map(String::as_str), Some("ready"), "{name}: {seen:?}");
        let row = db
            .query_one(
                "SELECT a.top_columns, m.importance->>'metric', (m.importance->>'repeats')::int,
                        (SELECT sum(i.importance) FROM cerebro.model_importance i WHERE i.model_version_id = m.id)
                 FROM cerebro.archive a JOIN cerebro.model_versions m ON m.id = a.model_version_id
                 WHERE a.name = $1 AND a.version = $2",
                &[&name, &v],
            )
            .await?;
        let mut top: Vec<String> = row.get(0);
        assert_eq!(top.len(), 5, "{name}: {top:?}");
        let listed: Vec<String> = db
            .query_one("SELECT top_columns FROM cerebro.models WHERE name = $1 AND version = $2", &[&name, &v])
            .await?
            .get(0);
        assert_eq!(listed, top, "{name}: cerebro.models and cerebro.archive agree");
        top.truncate(2);
        top.sort();
        assert_eq!(top, ["a", "b"], "{name}");
        assert_eq!((row.get::<_, String>(1), row.get::<_, i32>(2)), (metric.to_string(), 3), "{name}");
        let shares: f64 = row.get(3);
        assert!((shares - 1.0).abs() < 1e-9, "{name}: shares sum to {shares}");

        // The rule surrogate: its leaves cover the rows it was fitted on, and
        // its SQL, run over the source, agrees with the model as its
        // fidelity says.
        let s = db
            .query_one(
                "SELECT surrogate->>'fidelity_metric', (surrogate->>'fidelity')::float8, (surrogate->>'rows')::int8
                 FROM cerebro.model_versions WHERE name = $1 AND version = $2",
                &[&name, &v],
            )
            .await?;
        let (fidelity_metric, fidelity, fitted): (String, f64, i64) = (s.get(0), s.get(1), s.get(2));
        let rules = db
            .query_one(
                "SELECT count(*), sum(support)::int8, sum(share), bool_and(rule LIKE '%a %' OR rule LIKE '%b %')
                 FROM cerebro.surrogate_rules($1, $2)",
                &[&name, &v],
            )
            .await?;
        let (leaves, support, share): (i64, i64, f64) = (rules.get(0), rules.get(1), rules.get(2));
        assert!((2..=16).contains(&leaves) && support == fitted && (share - 1.0).abs() < 1e-9, "{name}");
        assert!(rules.get::<_, bool>(3), "{name}: every rule tests a or b");
        let case: String = db.query_one("SELECT cerebro.surrogate_sql($1, $2)", &[&name, &v]).await?.get(0);
        let compare = if metric == "rmse" {
            format!(
                "SELECT 1 - sum((c - s)^2) / (count(*) * var_pop(s))
                 FROM (SELECT ({case}) AS c, p.score AS s FROM e2e_two_matter t JOIN p ON p.key = t.id::text) x"
            )
        } else {
            format!("SELECT avg((({case}) = p.label)::int::float8) FROM e2e_two_matter t JOIN p ON p.key = t.id::text")
        };
        let agreement: f64 = db
            .query_one(
                &format!(
                    "WITH p AS (SELECT key, label, score FROM cerebro.predictions WHERE model = '{name}') {compare}"
                ),
                &[],
            )
            .await?
            .get(0);
        let expected = if metric == "rmse" { "r2" } else { "agreement" };
        assert_eq!(fidelity_metric, expected, "{name}");
        assert!(
            fidelity > 0.75 && (agreement - fidelity).abs() < 0.1,
            "{name}: {agreement} over the table, {fidelity}"
        );

        // Distilled again on request, shallower, then at the default depth:
        // the same training rows, the same first test, a fidelity near the
        // one fitted after training (ONNX Runtime and the engine may round a
        // borderline row apart).
        let first_test = |case: &str| case.split(" THEN ").next().map(str::to_owned);
        let shallow = db
            .query_one(
                "SELECT leaves, fidelity_metric, fidelity, fitted_rows FROM cerebro.distill($1, $2, max_depth => $3)",
                &[&name, &v, &2i32],
            )
            .await?;
        let leaves: i32 = shallow.get(0);
        assert!((2..=4).contains(&leaves), "{name}: {leaves} leaves at depth 2");
        assert_eq!((shallow.get::<_, String>(1), shallow.get::<_, i64>(3)), (expected.to_string(), fitted), "{name}");
        let stored = db
            .query_one(
                "SELECT (surrogate->>'max_depth')::int, (SELECT count(*)::int FROM cerebro.surrogate_rules($1, $2))
                 FROM cerebro.model_versions WHERE name = $1 AND version = $2",
                &[&name, &v],
            )
            .await?;
        assert_eq!((stored.get::<_, i32>(0), stored.get::<_, i32>(1)), (2, leaves), "{name}: the new one is shown");
        let again = db.query_one("SELECT fidelity FROM cerebro.distill($1, $2)", &[&name, &v]).await?;
        assert!(
            (again.get::<_, f64>(0) - fidelity).abs() < 0.02,
            "{name}: {} against {fidelity}",
            again.get::<_, f64>(0)
        );
        let case_again: String = db.query_one("SELECT cerebro.surrogate_sql($1, $2)", &[&name, &v]).await?.get(0);
        assert_eq!(first_test(&case_again), first_test(&case), "{name}");

        // Importance measured again on request, scored as cerebro.predictions
        // scores (ONNX Runtime or the engine that agrees with it): the same
        // rows and shuffles, so the same drops but for rounding, and the
        // same two columns first.
        let drops = |sql: &'static str| {
            let db = &db;
            async move {
                let rows = db.query(sql, &[&name, &v]).await?;
                anyhow::Ok(rows.iter().map(|r| (r.get::<_, String>(0), r.get::<_, f64>(1))).collect::<Vec<_>>())
            }
        };
        let stored = drops(
            "SELECT i.column_name, i.metric_drop FROM cerebro.model_importance i
             JOIN cerebro.model_versions m ON m.id = i.model_version_id WHERE m.name = $1 AND m.version = $2
             ORDER BY i.rank",
        )
        .await?;
        let measured =
            drops("SELECT column_name, metric_drop FROM cerebro.measure_importance($1, $2) ORDER BY rank").await?;
        assert_eq!(measured.len(), stored.len(), "{name}");
        for (column, drop) in &stored {
            let again = measured.iter().find(|(c, _)| c == column).map(|(_, d)| *d);
            assert!(
                again.is_some_and(|d| (d - drop).abs() < 1e-3 * (1.0 + drop.abs())),
                "{name}: {column} {drop} then {again:?}"
            );
        }
        let mut first_two: Vec<&str> = measured[..2].iter().map(|(c, _)| c.as_str()).collect();
        first_two.sort_unstable();
        assert_eq!(first_two, ["a", "b"], "{name}: {measured:?}");

        // Per-row attributions: every row's add up to its score (the
        // baseline's score, the listed contributions and the rest), and on
        // average a and b move the score most. Asked with parameters, as an
        // application asks.
        let rows = db
            .query(
                "SELECT score, label, explanation, explain, top_k FROM cerebro.predictions
                 WHERE model = $1 AND explain AND top_k = $2",
                &[&name, &5i32],
            )
            .await?;
        assert_eq!(rows.len(), 3000, "{name}");
        let mut sizes: HashMap<String, f64> = HashMap::new();
        for row in &rows {
            let (score, label, e): (f64, Option<String>, serde_json::Value) = (row.get(0), row.get(1), row.get(2));
            assert_eq!((row.get::<_, bool>(3), row.get::<_, i32>(4)), (true, 5), "{name}");
            let listed = e["contributions"].as_array().expect("contributions");
            assert_eq!(listed.len(), 5, "{name}: {e}");
            let total = e["baseline"].as_f64().unwrap()
                + e["rest"].as_f64().unwrap()
                + listed.iter().map(|c| c["contribution"].as_f64().unwrap()).sum::<f64>();
            let scale = if metric == "rmse" { score.abs().max(1.0) } else { 1.0 };
            assert!((total - score).abs() <= 1e-3 * scale, "{name}: {e} adds up to {total}, not {score}");
            if metric == "accuracy" {
                assert_eq!(e["class"].as_str(), label.as_deref(), "{name}: the predicted class is explained");
            }
            for c in listed {
                *sizes.entry(c["column"].as_str().unwrap().to_owned()).or_default() +=
                    c["contribution"].as_f64().unwrap().abs();
            }
        }
        let mut by_size: Vec<(String, f64)> = sizes.into_iter().collect();
        by_size.sort_by(|a, b| b.1.total_cmp(&a.1));
        let mut top: Vec<&str> = by_size[..2].iter().map(|(c, _)| c.as_str()).collect();
        top.sort();
        assert_eq!(top, ["a", "b"], "{name}: {by_size:?}");
        // Fewer columns listed: the others are the rest; without explain, none.
        let e: serde_json::Value = db
            .query_one(
                "SELECT explanation FROM cerebro.predictions WHERE model = $1 AND key = '7' AND explain AND top_k = 2",
                &[&name],
            )
            .await?
            .get(0);
        assert_eq!(e["contributions"].as_array().map(Vec::len), Some(2), "{name}: {e}");
        let plain = db
            .query_one("SELECT explanation, explain FROM cerebro.predictions WHERE model = $1 AND key = '7'", &[&name])
            .await?;
        assert_eq!(plain.get::<_, Option<serde_json::Value>>(0), None, "{name}");
        assert!(!plain.get::<_, bool>(1));
    }
    let err = db
        .query(
            "SELECT explanation FROM cerebro.predictions WHERE model = 'e2e_imp_binary' AND explain AND top_k = 0",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("22023"), "{err}");
    let binary = trained[0].1;
    for depth in [0i32, 9, -1] {
        let err = db
            .query("SELECT * FROM cerebro.distill('e2e_imp_binary', $1, $2)", &[&binary, &depth])
            .await
            .expect_err("a depth out of range");
        let e = err.as_db_error().expect("a server error");
        assert_eq!(e.code().code(), "22023", "{depth}: {}", e.message());
        assert_eq!(e.message(), format!("max_depth must be between 1 and 8, not {depth}"));
        assert!(e.hint().is_some_and(|h| h.contains("leave max_depth out for 4")), "{:?}", e.hint());
    }
    let audited = db
        .query_one(
            "SELECT count(*) FROM cerebro.audit_log WHERE action = 'distill' AND model = 'e2e_imp_binary'
             AND version = $1",
            &[&binary],
        )
        .await?;
    assert_eq!(audited.get::<_, i64>(0), 2, "each distill call is audited, and only those that ran");
    Ok(())
}

fn python_scores(env: &Env, bytes: &[u8], rows: &serde_json::Value, key: &str) -> anyhow::Result<HashMap<String, f64>> {
    let dir = std::env::temp_dir().join(format!("cerebro-score-{}-{key}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (model, rows_file) = (dir.join("model.onnx"), dir.join("rows.json"));
    std::fs::write(&model, bytes)?;
    std::fs::write(&rows_file, rows.to_string())?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/score_onnx.py");
    let out = std::process::Command::new(&env.python).arg(script).arg(&model).arg(&rows_file).arg(key).output()?;
    std::fs::remove_dir_all(&dir)?;
    anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?
        .lines()
        .map(|l| {
            let (key, score) = l.split_once(',').expect("key,score");
            (key.to_string(), score.parse().expect("a number"))
        })
        .collect())
}

/// A regression that learns ln(y) scores in the target's units, from SQL,
/// cerebrod and the exported file alike; `auto` picks log for a positive,
/// right-skewed target and says so in `trained_with`.
#[tokio::test(flavor = "multi_thread")]
async fn a_log_target_regression_scores_in_the_targets_units() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    // Prices from about 6 to 330, log-uniform-ish: skewness about 1.5.
    db.batch_execute(
        "DROP TABLE IF EXISTS public.e2e_prices;
         CREATE TABLE public.e2e_prices AS
         SELECT i AS id, (i % 40) / 10.0 AS size, (ARRAY['north', 'south', 'east'])[1 + i % 3] AS area,
                round(exp(2 + 0.8 * ((i % 40) / 10.0) + CASE WHEN i % 3 = 0 THEN 0.5 ELSE 0 END
                          + 0.2 * sin(i))::numeric, 2)::float8 AS price
         FROM generate_series(1, 800) i;",
    )
    .await?;
    let _daemon = Daemon::start(&env)?;
    let mut versions = Vec::new();
    for (name, transform) in [("e2e_log_price", "log"), ("e2e_auto_price", "auto")] {
        let options = format!(r#"{{"target_transform": "{transform}", "epochs": 40, "learning_rate": 0.01}}"#);
        db.execute(
            "INSERT INTO cerebro.models (name, source, target, key, options)
             VALUES ($1, 'e2e_prices', 'price', 'id', $2::text::jsonb)",
            &[&name, &options],
        )
        .await?;
        let v: i32 = db.query_one("SELECT max(version) FROM cerebro.models WHERE name = $1", &[&name]).await?.get(0);
        versions.push((name, v));
    }
    for &(name, v) in &versions {
        let seen = wait_until_done(&db, name, v, TRAIN_TIMEOUT).await?;
        assert_eq!(
            seen.last().map(String::as_str),
            Some("ready"),
            "{name}: {seen:?} {:?}",
            model_state(&db, name, v).await?
        );
    }
    let mean_price: f64 = db.query_one("SELECT avg(price) FROM e2e_prices", &[]).await?.get(0);
    let rows: serde_json::Value = db.query_one("SELECT json_agg(t) FROM e2e_prices t", &[]).await?.get(0);
    for &(name, v) in &versions {
        let r = db
            .query_one(
                "SELECT task, (metrics->>'r2')::float8, (metrics->>'rmse')::float8, trained_with->>'target_transform'
                 FROM cerebro.model_versions WHERE name = $1 AND version = $2",
                &[&name, &v],
            )
            .await?;
        assert_eq!(r.get::<_, String>(0), "regression");
        let (r2, rmse): (f64, f64) = (r.get(1), r.get(2));
        // Metrics are in the target's units (an RMSE in ln units would be below 1).
        assert!(r2 > 0.8 && rmse > 1.0 && rmse < 0.5 * mean_price, "{name}: R² {r2}, RMSE {rmse}");
        let chosen: Option<String> = r.get(3);
        let expected = (name == "e2e_auto_price").then(|| "log".to_string());
        assert_eq!(chosen, expected, "{name}: trained_with says what auto chose, and only then");

        let sql = sql_scores(&db, &format!("SELECT key, label, score FROM cerebro.predictions WHERE model = '{name}'"))
            .await?;
        assert_eq!(sql.len(), 800);
        let mean_score = sql.values().map(|(_, s)| s).sum::<f64>() / sql.len() as f64;
        assert!(
            (mean_score - mean_price).abs() < 0.2 * mean_price,
            "{name}: mean score {mean_score}, mean price {mean_price}"
        );
        assert!(
            sql.values().all(|(label, s)| label.is_none() && *s > 1.0 && *s < 1000.0),
            "{name}: in the target's units"
        );
        assert_eq!(sql, daemon_scores(&env, name, &[])?, "{name}: SQL and cerebrod agree");
        // The exported file gives the same values on its own.
        let bytes: Vec<u8> = db.query_one("SELECT cerebro.export_onnx($1, $2)", &[&name, &v]).await?.get(0);
        let python = python_scores(&env, &bytes, &rows, "id")?;
        assert_eq!(python.len(), 800);
        for (key, (_, score)) in &sql {
            let p = python[key];
            // The engine scores Cerebro's own models, to 1e-5 of ONNX Runtime (docs/sql.md).
            assert!((p - score).abs() <= 1e-5 * score.abs().max(1.0), "{name} row {key}: python {p}, sql {score}");
        }
    }
    Ok(())
}

/// Bad values of the training options that need the data or a range are
/// 22023 with the option's message, and queue nothing.
#[tokio::test(flavor = "multi_thread")]
async fn bad_label_smoothing_and_target_transforms_are_refused_at_insert() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    db.batch_execute(
        "DROP TABLE IF EXISTS public.e2e_signed;
         CREATE TABLE public.e2e_signed AS SELECT i AS id, i % 7 AS x, (i % 11 - 2)::float8 AS y
         FROM generate_series(1, 100) i;",
    )
    .await?;
    let jobs_before: i64 = db.query_one("SELECT count(*) FROM cerebro.jobs", &[]).await?.get(0);
    let cases = [
        (
            "telco_churn",
            "churn",
            r#"{"label_smoothing": 0.7}"#,
            r#"option "label_smoothing" is 0.7, allowed: at least 0 and below 0.5"#,
        ),
        (
            "telco_churn",
            "monthly_charges",
            r#"{"label_smoothing": 0.1}"#,
            r#"option "label_smoothing" does not apply to a regression model"#,
        ),
        (
            "telco_churn",
            "churn",
            r#"{"target_transform": "log"}"#,
            r#"option "target_transform" does not apply to a binary model"#,
        ),
        (
            "telco_churn",
            "monthly_charges",
            r#"{"target_transform": "exp"}"#,
            r#"option "target_transform" must be one of "none", "standardize", "log", "auto""#,
        ),
        (
            "e2e_signed",
            "y",
            r#"{"target_transform": "log"}"#,
            r#"option "target_transform" is "log", but target column "y" has values that are not greater than 0 (the smallest is -2); ln(y) needs every target > 0"#,
        ),
        (
            "telco_churn",
            "churn",
            r#"{"periodic_sigma": 0}"#,
            r#"option "periodic_sigma" is 0, allowed: greater than 0 and at most 100"#,
        ),
        (
            "telco_churn",
            "churn",
            r#"{"periodic_frequencies": 1000}"#,
            r#"option "periodic_frequencies" is 1000, allowed: from 1 to 128"#,
        ),
    ];
    for (source, target, options, message) in cases {
        let task = if target == "churn" { "auto" } else { "regression" };
        let err = db
            .execute(
                "INSERT INTO cerebro.models (name, source, target, task, options)
                 VALUES ('e2e_bad_option', $1, $2, $3, $4::text::jsonb)",
                &[&source, &target, &task, &options],
            )
            .await
            .expect_err(options);
        let e = err.as_db_error().expect("a server error");
        assert_eq!(e.code().code(), "22023", "{options}: {}", e.message());
        assert_eq!(e.message(), message, "{options}");
    }
    let jobs_after: i64 = db.query_one("SELECT count(*) FROM cerebro.jobs", &[]).await?.get(0);
    assert_eq!(jobs_after, jobs_before, "nothing was queued");
    Ok(())
}

/// A network with every kind of layer and encoding, declared in SQL, trains
/// in the daemon and scores from SQL exactly as the daemon's own scoring path.
#[tokio::test(flavor = "multi_thread")]
async fn every_layer_and_encoding_trains_from_sql_and_scores() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = Daemon::start(&env)?;
    let options = r#"{"epochs": 8, "hidden": [32], "residual_blocks": 1, "norm": "layer", "dropout": 0.1,
        "activation": "gelu", "numeric_encoding": "ple", "onehot_max": 3,
        "encodings": {"total_charges": "quantile", "payment_method": 3, "tenure": "periodic",
                      "monthly_charges": "periodic", "paperless_billing": "onehot"},
        "periodic_frequencies": 8, "periodic_dim": 8, "class_weights": "balanced", "members": 2}"#;
    let v = insert(&db, "e2e_family", "churn", options).await?;
    let seen = wait_until_done(&db, "e2e_family", v, TRAIN_TIMEOUT).await?;
    assert_eq!(seen.last().map(String::as_str), Some("ready"), "{seen:?}");
    let auc: f64 = db
        .query_one("SELECT (metrics->>'auc')::float8 FROM cerebro.models WHERE name = 'e2e_family'", &[])
        .await?
        .get(0);
    assert!(auc > 0.8, "AUC {auc}");
    let preds = sql_scores(&db, "SELECT key, label, score FROM cerebro.predictions WHERE model = 'e2e_family'").await?;
    assert_eq!(preds.len(), 7043);
    assert_eq!(preds, daemon_scores(&env, "e2e_family", &[])?);
    Ok(())
}

/// The same rows in another order train the same model: training reads a
/// snapshot in key order, so the seeded split, the fingerprint, every epoch's
/// losses and the metrics repeat.
#[tokio::test(flavor = "multi_thread")]
async fn an_insert_repeated_over_reordered_rows_trains_the_same_model() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = Daemon::start(&env)?;
    let mut versions = Vec::new();
    for direction in ["ASC", "DESC"] {
        db.batch_execute(&format!(
            "CREATE OR REPLACE VIEW public.e2e_reordered AS
             SELECT * FROM public.telco_churn ORDER BY md5(customer_id::text) {direction}"
        ))
        .await?;
        db.execute(
            "INSERT INTO cerebro.models (name, source, target, key, options)
             VALUES ('e2e_repeat', 'e2e_reordered', 'churn', 'customer_id', '{\"epochs\": 4, \"patience\": 0}')",
            &[],
        )
        .await?;
        let v: i32 =
            db.query_one("SELECT max(version) FROM cerebro.models WHERE name = 'e2e_repeat'", &[]).await?.get(0);
        let seen = wait_until_done(&db, "e2e_repeat", v, TRAIN_TIMEOUT).await?;
        assert_eq!(seen.last().map(String::as_str), Some("ready"), "{seen:?}");
        versions.push(v);
    }
    let model = |v: i32| {
        let db = &db;
        async move {
            let row = db
                .query_one(
                    "SELECT s.fingerprint, m.metrics::text,
                            (SELECT array_agg(h.train_loss || '/' || h.valid_loss ORDER BY h.epoch)
                             FROM cerebro.training_history h WHERE h.model_version_id = m.id)
                     FROM cerebro.model_versions m JOIN cerebro.snapshots s ON s.id = m.snapshot_id
                     WHERE m.name = 'e2e_repeat' AND m.version = $1",
                    &[&v],
                )
                .await?;
            anyhow::Ok((row.get::<_, String>(0), row.get::<_, String>(1), row.get::<_, Vec<String>>(2)))
        }
    };
    let (first, second) = (model(versions[0]).await?, model(versions[1]).await?);
    assert_eq!(first.2.len(), 4);
    assert_eq!(first, second);
    db.batch_execute("DROP VIEW public.e2e_reordered").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rolled_back_insert_trains_nothing() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = Daemon::start(&env)?;
    let count = |sql: &'static str| {
        let db = &db;
        async move { db.query_one(sql, &[]).await.map(|r| r.get::<_, i64>(0)) }
    };
    let jobs_before = count("SELECT count(*) FROM cerebro.jobs").await?;
    let tables_before = count("SELECT count(*) FROM pg_tables WHERE schemaname = 'cerebro_data'").await?;
    db.batch_execute(
        "BEGIN;
         INSERT INTO cerebro.models (name, source, target, key) VALUES ('e2e_rollback', 'telco_churn', 'churn', 'customer_id');
         ROLLBACK;",
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(count("SELECT count(*) FROM cerebro.model_versions WHERE name = 'e2e_rollback'").await?, 0);
    assert_eq!(count("SELECT count(*) FROM cerebro.jobs").await?, jobs_before);
    assert_eq!(count("SELECT count(*) FROM pg_tables WHERE schemaname = 'cerebro_data'").await?, tables_before);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_an_error_with_its_sqlstate_and_queues_nothing() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    db.batch_execute(
        "DROP TABLE IF EXISTS public.e2e_empty, public.e2e_one_class;
         CREATE TABLE public.e2e_empty (id int, x int, y text);
         CREATE TABLE public.e2e_one_class AS SELECT i AS id, i AS x, 'same'::text AS y FROM generate_series(1, 10) i;
         DO $$ BEGIN CREATE ROLE e2e_nobody; EXCEPTION WHEN duplicate_object THEN NULL; END $$;",
    )
    .await?;
    let jobs_before: i64 = db.query_one("SELECT count(*) FROM cerebro.jobs", &[]).await?.get(0);
    let cases = [
        ("INSERT INTO cerebro.models (name, source, target) VALUES ('bad', 'no_such_table', 'churn')", "42P01"),
        ("INSERT INTO cerebro.models (name, source, target) VALUES ('bad', 'telco_churn', 'no_such_column')", "42703"),
        (
            "INSERT INTO cerebro.models (name, source, target, features) VALUES ('bad', 'telco_churn', 'churn', ARRAY['tenure', 'nope'])",
            "42703",
        ),
        (
            "INSERT INTO cerebro.models (name, source, target, features)
             VALUES ('bad', 'pg_catalog.pg_class', 'relname', ARRAY['reltuples', 'relacl'])",
            "42804",
        ),
        ("INSERT INTO cerebro.models (name, source, target) VALUES ('bad', 'e2e_empty', 'y')", "22023"),
        ("INSERT INTO cerebro.models (name, source, target) VALUES ('bad', 'e2e_one_class', 'y')", "22023"),
        ("INSERT INTO cerebro.models (name, source, target) VALUES ('9bad', 'telco_churn', 'churn')", "42602"),
        (
            "INSERT INTO cerebro.models (name, source, target, options) VALUES ('bad', 'telco_churn', 'churn', '{\"learning_rate\": -1}')",
            "22023",
        ),
        (
            "INSERT INTO cerebro.models (name, source, target, options) VALUES ('bad', 'telco_churn', 'churn', '{\"encodings\": {\"tenur\": \"ple\"}}')",
            "42703",
        ),
        (
            "INSERT INTO cerebro.models (name, source, target, options) VALUES ('bad', 'telco_churn', 'churn', '{\"encodings\": {\"contract\": \"ple\"}}')",
            "42804",
        ),
        (
            "INSERT INTO cerebro.models (name, source, target, options) VALUES ('bad', 'telco_churn', 'monthly_charges', '{\"class_weights\": \"balanced\"}')",
            "22023",
        ),
        (
            "INSERT INTO cerebro.models (name, source, target, options) VALUES ('bad', 'telco_churn', 'churn', '{\"residual_blocks\": 2, \"hidden\": []}')",
            "22023",
        ),
        ("INSERT INTO cerebro.models (source, target) VALUES ('telco_churn', 'churn')", "23502"),
        ("UPDATE cerebro.models SET target = 'x'", "0A000"),
    ];
    for (sql, code) in cases {
        let err = db.batch_execute(sql).await.expect_err(sql);
        assert_eq!(err.code().map(|c| c.code()), Some(code), "{sql}: {err:?}");
    }
    db.batch_execute("SET ROLE e2e_nobody").await?;
    let err = db
        .batch_execute(
            "INSERT INTO cerebro.models (name, source, target) VALUES ('bad', 'public.telco_churn', 'churn')",
        )
        .await
        .expect_err("no privilege");
    assert_eq!(err.code().map(|c| c.code()), Some("42501"));
    db.batch_execute("RESET ROLE").await?;
    let jobs_after: i64 = db.query_one("SELECT count(*) FROM cerebro.jobs", &[]).await?.get(0);
    assert_eq!(jobs_after, jobs_before, "nothing was queued");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_socket_refuses_every_user_but_postgres() -> anyhow::Result<()> {
    let env = Env::from_env();
    let me = std::process::Command::new("id").arg("-un").output()?;
    if String::from_utf8_lossy(&me.stdout).trim() == "postgres" {
        eprintln!("SKIPPED: the test runs as postgres, the one user the daemon admits");
        return Ok(());
    }
    let db = env.connect().await?;
    let _daemon = Daemon::start(&env)?;
    let mut stream = UnixStream::connect(&env.socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let _ =
        stream.write_all(&protocol::encode(&Request::Hello { protocol: PROTOCOL_VERSION, client: "intruder".into() }));
    let response: Response = protocol::read_frame(&mut stream)?;
    match response {
        Response::Error(e) => assert!(e.message.contains("permission denied"), "{e}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let mut rest = Vec::new();
    assert_eq!(stream.read_to_end(&mut rest)?, 0, "the connection is closed after the refusal");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(daemon_log(&env).contains("refused connection"), "the refusal is logged");

    // The daemon keeps serving the database's backends.
    let v = insert(&db, "e2e_refusal", "churn", r#"{"epochs": 2}"#).await?;
    wait_until_done(&db, "e2e_refusal", v, TRAIN_TIMEOUT).await?;
    let n: i64 =
        db.query_one("SELECT count(*) FROM cerebro.predictions WHERE model = 'e2e_refusal'", &[]).await?.get(0);
    assert_eq!(n, 7043);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_daemon_down_scoring_fails_clearly_and_training_waits() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let mut daemon = Daemon::start(&env)?;
    let v1 = insert(&db, "e2e_down", "churn", r#"{"epochs": 2}"#).await?;
    wait_until_done(&db, "e2e_down", v1, TRAIN_TIMEOUT).await?;
    daemon.stop()?;

    let err = db
        .query("SELECT * FROM cerebro.predictions WHERE model = 'e2e_down'", &[])
        .await
        .expect_err("the daemon is down");
    let db_err = err.as_db_error().expect("a server error");
    assert_eq!(db_err.code().code(), "08001");
    assert!(db_err.message().contains(env.socket.to_str().unwrap()), "{}", db_err.message());
    assert!(db_err.hint().unwrap_or("").contains("cerebrod"), "{:?}", db_err.hint());

    // Training requests still queue, and run once a daemon starts.
    let v2 = insert(&db, "e2e_down", "churn", r#"{"epochs": 2}"#).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(model_state(&db, "e2e_down", v2).await?.0, "queued");
    let _daemon = Daemon::start(&env)?;
    let seen = wait_until_done(&db, "e2e_down", v2, TRAIN_TIMEOUT).await?;
    assert_eq!(seen.last().map(String::as_str), Some("ready"));
    let n: i64 = db.query_one("SELECT count(*) FROM cerebro.predictions WHERE model = 'e2e_down'", &[]).await?.get(0);
    assert_eq!(n, 7043);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_daemon_mid_training_leaves_no_job_stuck() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let slow = r#"{"epochs": 60, "patience": 0, "hidden": [128, 128]}"#;

    // Killed once: the job is retried and finishes.
    let mut daemon = Daemon::start(&env)?;
    let v = insert(&db, "e2e_killed", "churn", slow).await?;
    wait_for(&db, "e2e_killed", v, TRAIN_TIMEOUT, |s, e| s == "training" && e >= 2).await?;
    daemon.kill();
    assert_eq!(model_state(&db, "e2e_killed", v).await?.0, "training", "the catalog still says training");
    let daemon = Daemon::start(&env)?;
    let seen = wait_until_done(&db, "e2e_killed", v, TRAIN_TIMEOUT).await?;
    assert_eq!(seen.last().map(String::as_str), Some("ready"), "{seen:?}");
    let attempts = job_attempts(&db, "e2e_killed", v).await?;
    assert_eq!(attempts, 2);
    let (epochs, distinct): (i64, i64) = {
        let r = db
            .query_one(
                "SELECT count(*), count(DISTINCT h.epoch) FROM cerebro.training_history h
                 JOIN cerebro.model_versions m ON m.id = h.model_version_id WHERE m.name = 'e2e_killed'",
                &[],
            )
            .await?;
        (r.get(0), r.get(1))
    };
    assert_eq!((epochs, distinct), (60, 60), "the history is the retried attempt's, epoch by epoch");
    drop(daemon);

    // Out of attempts: the job fails with the reason instead of looping forever.
    let v2 = insert(&db, "e2e_killed", "churn", slow).await?;
    db.execute(
        "UPDATE cerebro.jobs SET max_attempts = 1 WHERE model_version_id =
             (SELECT id FROM cerebro.model_versions WHERE name = 'e2e_killed' AND version = $1)",
        &[&v2],
    )
    .await?;
    let mut daemon = Daemon::start(&env)?;
    wait_for(&db, "e2e_killed", v2, TRAIN_TIMEOUT, |s, e| s == "training" && e >= 1).await?;
    daemon.kill();
    let _daemon = Daemon::start(&env)?;
    let seen = wait_until_done(&db, "e2e_killed", v2, TRAIN_TIMEOUT).await?;
    assert_eq!(seen.last().map(String::as_str), Some("failed"));
    let (_, _, error) = model_state(&db, "e2e_killed", v2).await?;
    assert!(error.unwrap_or_default().contains("giving up"));
    Ok(())
}

/// A stop (SIGTERM) while an epoch longer than cerebrod waits for is in
/// training: the daemon exits promptly and puts the job back in the queue
/// itself, its attempt not counted, rather than leaving it `running` for
/// the next daemon's sweep to count.
#[tokio::test(flavor = "multi_thread")]
async fn stopping_the_daemon_mid_epoch_requeues_without_counting_an_attempt() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    // One epoch of this network on telco_churn sixteen times over takes far
    // longer than the 5 s cerebrod waits for an epoch's end (about 36 s on
    // 2 cores; what the machine has beyond that, the test does not need).
    let mut daemon = Daemon::start(&env)?;
    let v: i32 = db
        .query_one(
            "INSERT INTO cerebro.models (name, source, target, key, options)
             VALUES ('e2e_stopped',
                     '(SELECT t.*, t.customer_id * 16 + g AS row_key FROM telco_churn t CROSS JOIN generate_series(0, 15) g)',
                     'churn', 'row_key', '{\"epochs\": 1, \"hidden\": [2048, 2048]}')
             RETURNING version",
            &[],
        )
        .await?
        .get(0);
    wait_for(&db, "e2e_stopped", v, TRAIN_TIMEOUT, |s, _| s == "training").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopping = std::time::Instant::now();
    daemon.stop()?;
    assert!(stopping.elapsed() < Duration::from_secs(20), "stopped in {:?}", stopping.elapsed());
    let (state, attempts): (String, i32) = {
        let r = db
            .query_one(
                "SELECT j.state::text, j.attempts FROM cerebro.jobs j
                 JOIN cerebro.model_versions m ON m.id = j.model_version_id
                 WHERE m.name = 'e2e_stopped' AND m.version = $1",
                &[&v],
            )
            .await?;
        (r.get(0), r.get(1))
    };
    assert_eq!((state.as_str(), attempts), ("queued", 0));
    assert_eq!(model_state(&db, "e2e_stopped", v).await?.0, "queued");
    assert!(daemon_log(&env).contains("requeueing its jobs now"), "the early requeue is logged");
    // Not for the next test's daemon to train.
    let cancelled: String = db.query_one("SELECT cerebro.cancel('e2e_stopped', $1)", &[&v]).await?.get(0);
    assert_eq!(cancelled, "cancelled");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cuda_job_on_a_machine_without_a_gpu_fails_with_the_reason_and_the_daemon_keeps_serving() -> anyhow::Result<()>
{
    let env = Env::from_env();
    let db = env.connect().await?;
    let mut daemon = Daemon::start(&env)?;
    let v1 = insert(&db, "e2e_device", "churn", r#"{"epochs": 2}"#).await?;
    assert_eq!(wait_until_done(&db, "e2e_device", v1, TRAIN_TIMEOUT).await?.last().map(String::as_str), Some("ready"));
    daemon.stop()?;

    let _daemon = Daemon::start(&env.with_config_lines("cuda", "device = \"cuda\"\n")?)?;
    let v2 = insert(&db, "e2e_device", "churn", r#"{"epochs": 2}"#).await?;
    let seen = wait_until_done(&db, "e2e_device", v2, TRAIN_TIMEOUT).await?;
    let (status, _, error) = model_state(&db, "e2e_device", v2).await?;
    if std::path::Path::new("/proc/driver/nvidia").exists() {
        // A machine with an NVIDIA driver: the job trains on its GPU.
        assert_eq!(status, "ready", "{seen:?} {error:?}");
    } else {
        assert_eq!(status, "failed", "{seen:?}");
        let error = error.unwrap_or_default();
        assert!(error.starts_with("no GPU"), "{error}");
    }
    // The same daemon still scores with the version that trained.
    let n: i64 = db.query_one("SELECT count(*) FROM cerebro.predictions WHERE model = 'e2e_device'", &[]).await?.get(0);
    assert_eq!(n, 7043);
    Ok(())
}

/// Each row's version in a predictions query, counted.
async fn versions_scored(db: &tokio_postgres::Client, query: &str) -> anyhow::Result<Vec<(i32, i64)>> {
    let rows = db.query(&format!("SELECT version, count(*) FROM ({query}) p GROUP BY 1 ORDER BY 1"), &[]).await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Whether `cerebrod score` (no version named) gives SQL predictions' answers.
async fn daemon_agrees_with_sql(env: &Env, db: &tokio_postgres::Client, model: &str) -> anyhow::Result<()> {
    let sql = sql_scores(
        db,
        &format!(
            "SELECT key, label, score FROM cerebro.predictions WHERE model = '{model}' AND key_column = 'customer_id'"
        ),
    )
    .await?;
    let daemon = daemon_scores(env, model, &[])?;
    assert_eq!(sql.len(), daemon.len());
    for (key, (label, score)) in &sql {
        let (d_label, d_score) = &daemon[key];
        assert_eq!(label, d_label, "{key}");
        assert!((score - d_score).abs() < 1e-6, "{key}: SQL {score}, cerebrod score {d_score}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn cerebrod_score_follows_deployments_and_rollbacks_as_sql_predictions_do() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = Daemon::start(&env)?;
    let mut versions = Vec::new();
    for (epochs, hidden) in [(2, 16), (3, 8)] {
        let options = format!(r#"{{"epochs": {epochs}, "hidden": [{hidden}]}}"#);
        let v = insert(&db, "e2e_resolve", "churn", &options).await?;
        let seen = wait_until_done(&db, "e2e_resolve", v, TRAIN_TIMEOUT).await?;
        assert_eq!(seen.last().map(String::as_str), Some("ready"), "{seen:?}");
        versions.push(v);
    }
    // The two versions score differently, so agreeing says which one scored.
    let by_version = |v: i32| {
        format!("SELECT key, label, score FROM cerebro.predictions WHERE model = 'e2e_resolve' AND version = {v}")
    };
    let (first, second) =
        (sql_scores(&db, &by_version(versions[0])).await?, sql_scores(&db, &by_version(versions[1])).await?);
    assert!(first.iter().any(|(k, (_, s))| (s - second[k].1).abs() > 1e-6), "the versions score alike");
    let resolve = "SELECT cerebro.resolve_version('e2e_resolve')";
    // Nothing deployed: the newest ready version.
    assert_eq!(db.query_one(resolve, &[]).await?.get::<_, i32>(0), versions[1]);
    daemon_agrees_with_sql(&env, &db, "e2e_resolve").await?;
    // Deployed: the older version, for SQL and for cerebrod alike.
    db.execute("SELECT cerebro.deploy('e2e_resolve', $1)", &[&versions[0]]).await?;
    assert_eq!(db.query_one(resolve, &[]).await?.get::<_, i32>(0), versions[0]);
    daemon_agrees_with_sql(&env, &db, "e2e_resolve").await?;
    // Deploy the newer one, roll back to the older one.
    db.execute("SELECT cerebro.deploy('e2e_resolve', $1)", &[&versions[1]]).await?;
    daemon_agrees_with_sql(&env, &db, "e2e_resolve").await?;
    db.execute("SELECT cerebro.rollback('e2e_resolve')", &[]).await?;
    assert_eq!(db.query_one(resolve, &[]).await?.get::<_, i32>(0), versions[0]);
    daemon_agrees_with_sql(&env, &db, "e2e_resolve").await?;
    // A named version is that version.
    let named: i32 = db.query_one("SELECT cerebro.resolve_version('e2e_resolve', 2)", &[]).await?.get(0);
    assert_eq!(named, 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn deployments_choose_the_scored_version_roll_back_and_keep_their_history() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = Daemon::start(&env)?;
    let mut versions = Vec::new();
    for epochs in [2, 3, 4] {
        let v = insert(&db, "e2e_deploy", "churn", &format!(r#"{{"epochs": {epochs}}}"#)).await?;
        assert_eq!(
            wait_until_done(&db, "e2e_deploy", v, TRAIN_TIMEOUT).await?.last().map(String::as_str),
            Some("ready")
        );
        versions.push(v);
    }
    let (v1, v2, v3) = (versions[0], versions[1], versions[2]);
    let all = "SELECT * FROM cerebro.predictions WHERE model = 'e2e_deploy'";

    // Nothing deployed: the latest ready version scores.
    assert_eq!(versions_scored(&db, all).await?, vec![(v3, 7043)]);
    let deployed: i32 = db.query_one("SELECT cerebro.deploy('e2e_deploy', $1, 'first release')", &[&v2]).await?.get(0);
    assert_eq!(deployed, v2);
    assert_eq!(versions_scored(&db, all).await?, vec![(v2, 7043)]);
    // A query that names a version gets it, deployed or not.
    let named = format!("{all} AND version = {v1}");
    assert_eq!(versions_scored(&db, &named).await?, vec![(v1, 7043)]);

    // A scan that started keeps its version through a deployment change.
    let mut reader = env.connect().await?;
    let tx = reader.transaction().await?;
    tx.execute(&format!("DECLARE c NO SCROLL CURSOR FOR SELECT version FROM ({all}) p"), &[]).await?;
    let first: Vec<i32> = tx.query("FETCH 100 FROM c", &[]).await?.iter().map(|r| r.get(0)).collect();
    db.execute("SELECT cerebro.deploy('e2e_deploy', $1)", &[&v3]).await?;
    let rest: Vec<i32> = tx.query("FETCH ALL FROM c", &[]).await?.iter().map(|r| r.get(0)).collect();
    assert_eq!(first.len() + rest.len(), 7043);
    assert!(first.iter().chain(&rest).all(|&v| v == v2), "a running scan changed version");
    tx.commit().await?;
    // New queries see the change at once, with nothing restarted.
    assert_eq!(versions_scored(&db, all).await?, vec![(v3, 7043)]);

    let back: i32 = db.query_one("SELECT cerebro.rollback('e2e_deploy', 'v3 is worse')", &[]).await?.get(0);
    assert_eq!(back, v2);
    assert_eq!(versions_scored(&db, all).await?, vec![(v2, 7043)]);
    let err = db.query_one("SELECT cerebro.rollback('e2e_deploy')", &[]).await.expect_err("nothing earlier");
    assert_eq!(err.as_db_error().map(|e| e.code().code()), Some("55000"), "{err}");

    type Change = (String, Option<i32>, i32, Option<String>, String);
    let history: Vec<Change> = db
        .query(
            "SELECT action, from_version, to_version, comment, changed_by::text FROM cerebro.deployment_history
             WHERE name = 'e2e_deploy' ORDER BY id",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    let by = "postgres".to_string();
    assert_eq!(
        history,
        vec![
            ("deploy".into(), None, v2, Some("first release".into()), by.clone()),
            ("deploy".into(), Some(v2), v3, None, by.clone()),
            ("rollback".into(), Some(v3), v2, Some("v3 is worse".into()), by),
        ]
    );
    let flags: Vec<(i32, bool)> = db
        .query("SELECT version, deployed FROM cerebro.models WHERE name = 'e2e_deploy' ORDER BY version", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(flags, vec![(v1, false), (v2, true), (v3, false)]);

    // A version deleted between two deployments of another leaves that one
    // twice in a row on the stack: rolling back skips it, to the one before.
    for v in [v1, v3, v1] {
        db.execute("SELECT cerebro.deploy('e2e_deploy', $1)", &[&v]).await?;
    }
    db.execute("SELECT cerebro.delete_model('e2e_deploy', $1)", &[&v3]).await?;
    let back: i32 = db.query_one("SELECT cerebro.rollback('e2e_deploy')", &[]).await?.get(0);
    assert_eq!(back, v2);
    let err = db.query_one("SELECT cerebro.rollback('e2e_deploy')", &[]).await.expect_err("nothing earlier");
    assert_eq!(err.as_db_error().map(|e| e.code().code()), Some("55000"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn export_onnx_returns_the_archived_file_and_is_audited() -> anyhow::Result<()> {
    use sha2::Digest;
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = Daemon::start(&env)?;
    let v = insert(&db, "e2e_export", "churn", r#"{"epochs": 2}"#).await?;
    wait_until_done(&db, "e2e_export", v, TRAIN_TIMEOUT).await?;
    let bytes: Vec<u8> = db.query_one("SELECT cerebro.export_onnx('e2e_export', $1)", &[&v]).await?.get(0);
    let archived: String = db
        .query_one(
            "SELECT artifact_sha256 FROM cerebro.model_versions WHERE name = 'e2e_export' AND version = $1",
            &[&v],
        )
        .await?
        .get(0);
    let sha: String = sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(sha, archived);
    let audited: i64 = db
        .query_one("SELECT count(*) FROM cerebro.audit_log WHERE model = 'e2e_export' AND action = 'export'", &[])
        .await?
        .get(0);
    assert_eq!(audited, 1);

    // The file scores every row in Python's onnxruntime exactly as SQL does.
    let dir = std::env::temp_dir().join(format!("cerebro-export-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (model, rows) = (dir.join("model.onnx"), dir.join("rows.json"));
    std::fs::write(&model, &bytes)?;
    let json: serde_json::Value = db.query_one("SELECT json_agg(t) FROM telco_churn t", &[]).await?.get(0);
    std::fs::write(&rows, json.to_string())?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/score_onnx.py");
    let out = std::process::Command::new(&env.python).arg(script).arg(&model).arg(&rows).arg("customer_id").output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let python: HashMap<String, f64> = String::from_utf8(out.stdout)?
        .lines()
        .map(|l| {
            let (key, score) = l.split_once(',').expect("key,score");
            (key.to_string(), score.parse().expect("a number"))
        })
        .collect();
    let sql = sql_scores(&db, "SELECT key, label, score FROM cerebro.predictions WHERE model = 'e2e_export'").await?;
    assert_eq!(python.len(), 7043);
    assert_eq!(sql.len(), 7043);
    for (key, (_, score)) in &sql {
        let p = python[key];
        // The engine scores Cerebro's own models, to 1e-5 of ONNX Runtime (docs/sql.md).
        assert!((p - score).abs() <= 1e-5, "row {key}: python {p}, sql {score}");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_role_without_a_grant_sees_and_scores_nothing_until_granted() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = Daemon::start(&env)?;
    db.batch_execute(
        "DO $$ BEGIN CREATE ROLE e2e_outsider; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         ALTER ROLE e2e_outsider LOGIN; GRANT SELECT ON telco_churn TO e2e_outsider",
    )
    .await?;
    let v = insert(&db, "e2e_private", "churn", r#"{"epochs": 2}"#).await?;
    wait_until_done(&db, "e2e_private", v, TRAIN_TIMEOUT).await?;

    let outsider = env.connect_as("e2e_outsider", &env.db).await?;
    let listed = "SELECT count(*) FROM cerebro.models WHERE name = 'e2e_private'";
    assert_eq!(outsider.query_one(listed, &[]).await?.get::<_, i64>(0), 0, "another role's model is listed");
    let importance = "SELECT count(*) FROM cerebro.model_importance i JOIN cerebro.model_versions m
                      ON m.id = i.model_version_id WHERE m.name = 'e2e_private'";
    let ranked = "SELECT count(*) FROM cerebro.model_importance";
    assert_eq!(db.query_one(importance, &[]).await?.get::<_, i64>(0), 19, "one row per feature");
    let hidden = outsider.query_one(ranked, &[]).await?.get::<_, i64>(0);
    assert_eq!(hidden, 0, "another role's importance is visible");
    let scoring = "SELECT count(*) FROM cerebro.predictions WHERE model = 'e2e_private'";
    let err = outsider.query_one(scoring, &[]).await.expect_err("no grant");
    let e = err.as_db_error().expect("a server error");
    // Another role's model does not exist for a role without a grant.
    assert_eq!(e.code().code(), "42704");
    assert_eq!(e.message(), "model \"e2e_private\" does not exist");
    assert!(e.hint().unwrap_or("").contains("cerebro.grant_model"), "{:?}", e.hint());
    for denied in ["SELECT cerebro.export_onnx('e2e_private', 1)", "SELECT cerebro.deploy('e2e_private', 1)"] {
        let err = outsider.query_one(denied, &[]).await.expect_err("no grant");
        assert_eq!(err.as_db_error().map(|e| e.code().code()), Some("42704"), "{denied}: {err}");
    }

    let surrogate = "SELECT cerebro.surrogate_sql('e2e_private', 1)";
    let err = outsider.query_one(surrogate, &[]).await.expect_err("no grant");
    assert_eq!(err.as_db_error().map(|e| e.code().code()), Some("42704"), "{err}");
    let rules = "SELECT count(*) FROM cerebro.surrogate_rules('e2e_private', 1)";
    let err = outsider.query_one(rules, &[]).await.expect_err("no grant");
    assert_eq!(err.as_db_error().map(|e| e.code().code()), Some("42704"), "{err}");
    // Nor is the version's row, with its importance and surrogate, visible.
    let row = "SELECT count(*) FROM cerebro.model_versions WHERE name = 'e2e_private'";
    assert_eq!(outsider.query_one(row, &[]).await?.get::<_, i64>(0), 0, "another role's version is visible");
    let distill = "SELECT * FROM cerebro.distill('e2e_private', 1, 3)";
    let measure = "SELECT * FROM cerebro.measure_importance('e2e_private', 1)";
    for call in [distill, measure] {
        let err = outsider.query_one(call, &[]).await.expect_err("no grant");
        assert_eq!(err.as_db_error().map(|e| e.code().code()), Some("42704"), "{call}: {err}");
    }
    let explained = "SELECT explanation FROM cerebro.predictions WHERE model = 'e2e_private' AND key = '7' AND explain";
    let err = outsider.query_one(explained, &[]).await.expect_err("no grant");
    assert_eq!(err.as_db_error().map(|e| e.code().code()), Some("42704"), "{err}");

    db.execute("SELECT cerebro.grant_model('e2e_private', 'e2e_outsider')", &[]).await?;
    assert_eq!(outsider.query_one(listed, &[]).await?.get::<_, i64>(0), 1);
    assert_eq!(outsider.query_one(importance, &[]).await?.get::<_, i64>(0), 19);
    assert!(outsider.query_one(surrogate, &[]).await?.get::<_, String>(0).starts_with("CASE WHEN "));
    assert!(outsider.query_one(rules, &[]).await?.get::<_, i64>(0) >= 1, "a grant shows the rules");
    assert_eq!(outsider.query_one(scoring, &[]).await?.get::<_, i64>(0), 7043);
    let why: serde_json::Value = outsider.query_one(explained, &[]).await?.get(0);
    assert_eq!(why["contributions"].as_array().map(Vec::len), Some(5), "{why}");
    // A grant lets one see and score, not deploy.
    let err = outsider.query_one("SELECT cerebro.deploy('e2e_private', 1)", &[]).await.expect_err("not the owner");
    assert_eq!(err.as_db_error().map(|e| e.code().code()), Some("42501"));
    // Nor distill or measure: that replaces the surrogate or importance the
    // owner's users read.
    for call in [distill, measure] {
        let err = outsider.query_one(call, &[]).await.expect_err("not the owner");
        assert_eq!(err.as_db_error().map(|e| e.code().code()), Some("42501"), "{call}: {err}");
    }

    db.execute("SELECT cerebro.revoke_model('e2e_private', 'e2e_outsider')", &[]).await?;
    assert_eq!(outsider.query_one(listed, &[]).await?.get::<_, i64>(0), 0);
    let audited: Vec<String> = db
        .query("SELECT action FROM cerebro.audit_log WHERE model = 'e2e_private' ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(audited, ["create", "grant", "revoke"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn reproduce_retrains_a_version_bit_for_bit_from_its_frozen_snapshot() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = Daemon::start(&env)?;
    db.batch_execute("DROP TABLE IF EXISTS e2e_repro_src; CREATE TABLE e2e_repro_src AS SELECT * FROM telco_churn")
        .await?;
    db.execute(
        "INSERT INTO cerebro.models (name, source, target, key, options)
         VALUES ('e2e_repro', 'e2e_repro_src', 'churn', 'customer_id', '{\"epochs\": 4, \"dropout\": 0.1}')",
        &[],
    )
    .await?;
    assert_eq!(wait_until_done(&db, "e2e_repro", 1, TRAIN_TIMEOUT).await?.last().map(String::as_str), Some("ready"));
    // The source changes after training; a reproduction reads the frozen snapshot.
    db.execute("UPDATE e2e_repro_src SET tenure = tenure + 7, churn = 'No'", &[]).await?;
    let v2: i32 = db.query_one("SELECT cerebro.reproduce('e2e_repro', 1)", &[]).await?.get(0);
    assert_eq!(v2, 2);
    assert_eq!(wait_until_done(&db, "e2e_repro", v2, TRAIN_TIMEOUT).await?.last().map(String::as_str), Some("ready"));

    let provenance = "SELECT weights_sha256, metrics, snapshot_id, request, trained_with, reproduces
                      FROM cerebro.model_versions WHERE name = 'e2e_repro' AND version = $1";
    let (a, b) = (db.query_one(provenance, &[&1i32]).await?, db.query_one(provenance, &[&v2]).await?);
    let sha: (Option<String>, Option<String>) = (a.get(0), b.get(0));
    assert!(sha.0.is_some());
    assert_eq!(sha.0, sha.1, "the reproduction's weights differ");
    assert_eq!(a.get::<_, serde_json::Value>(1), b.get::<_, serde_json::Value>(1), "metrics differ");
    assert_eq!(a.get::<_, i64>(2), b.get::<_, i64>(2), "not the same snapshot");
    let request: serde_json::Value = a.get(3);
    assert_eq!(request["options"], serde_json::json!({"epochs": 4, "dropout": 0.1}), "options as written");
    assert_eq!(request["source"], "e2e_repro_src");
    assert_eq!(request, b.get::<_, serde_json::Value>(3));
    let trained_with: serde_json::Value = a.get(4);
    assert!(trained_with["commit"].as_str().is_some_and(|c| c.len() >= 40), "{trained_with}");
    assert_eq!(trained_with["device"], "cpu, 1 thread");
    assert_eq!(trained_with["stack"], 1);
    assert_eq!((a.get::<_, Option<i32>>(5), b.get::<_, Option<i32>>(5)), (None, Some(1)));

    let history = "SELECT array_agg(h.train_loss ORDER BY h.epoch) || array_agg(h.valid_loss ORDER BY h.epoch)
                   FROM cerebro.training_history h JOIN cerebro.model_versions m ON m.id = h.model_version_id
                   WHERE m.name = 'e2e_repro' AND m.version = $1";
    let (ha, hb): (Vec<f64>, Vec<f64>) =
        (db.query_one(history, &[&1i32]).await?.get(0), db.query_one(history, &[&v2]).await?.get(0));
    assert_eq!(ha, hb, "per-epoch losses differ");
    // The daemon's metrics reach the searchable archive.
    let row = db
        .query_one(
            "SELECT a.auc, (m.metrics->>'auc')::float8, a.layers, cardinality(a.features) FROM cerebro.archive a
             JOIN cerebro.model_versions m ON m.id = a.model_version_id WHERE a.name = 'e2e_repro' AND a.version = 1",
            &[],
        )
        .await?;
    let (auc, metric): (Option<f64>, Option<f64>) = (row.get(0), row.get(1));
    assert!(auc.is_some() && auc == metric, "{auc:?} {metric:?}");
    assert!(row.get::<_, i32>(2) >= 1 && row.get::<_, i32>(3) == 19, "layers and features");
    let scores = |v: i32| {
        format!("SELECT key, label, score FROM cerebro.predictions WHERE model = 'e2e_repro' AND version = {v}")
    };
    assert_eq!(sql_scores(&db, &scores(1)).await?, sql_scores(&db, &scores(v2)).await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_version_frees_the_storage_cerebro_models_shows() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = Daemon::start(&env)?;
    for _ in 0..2 {
        let v = insert(&db, "e2e_retain", "churn", r#"{"epochs": 2}"#).await?;
        wait_until_done(&db, "e2e_retain", v, TRAIN_TIMEOUT).await?;
    }
    let storage = "SELECT version, storage_bytes FROM cerebro.models WHERE name = 'e2e_retain' ORDER BY version";
    let sizes: Vec<(i32, i64)> = db.query(storage, &[]).await?.iter().map(|r| (r.get(0), r.get(1))).collect();
    let artifact: i64 = db
        .query_one("SELECT artifact_bytes FROM cerebro.model_versions WHERE name = 'e2e_retain' AND version = 1", &[])
        .await?
        .get(0);
    assert!(artifact > 10_000 && sizes[0].1 > artifact, "{sizes:?}, artifact {artifact}");

    let freed: i64 = db.query_one("SELECT cerebro.delete_model('e2e_retain', 1)", &[]).await?.get(0);
    assert_eq!(freed, sizes[0].1, "freed what cerebro.models showed");
    let left: Vec<(i32, i64)> = db.query(storage, &[]).await?.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(left, vec![sizes[1]]);
    let err = db
        .query("SELECT * FROM cerebro.predictions WHERE model = 'e2e_retain' AND version = 1", &[])
        .await
        .expect_err("deleted");
    assert_eq!(err.as_db_error().map(|e| e.code().code()), Some("42704"), "{err}");
    let n: i64 = db.query_one("SELECT count(*) FROM cerebro.predictions WHERE model = 'e2e_retain'", &[]).await?.get(0);
    assert_eq!(n, 7043, "the other version still scores");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pg_dump_restores_every_model_with_its_archive_and_no_duplicate_audit() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = Daemon::start(&env)?;
    let v = insert(&db, "e2e_backup", "churn", r#"{"epochs": 2}"#).await?;
    wait_until_done(&db, "e2e_backup", v, TRAIN_TIMEOUT).await?;
    db.execute("SELECT cerebro.deploy('e2e_backup', $1)", &[&v]).await?;

    let dump = std::env::temp_dir().join(format!("cerebro-e2e-{}.dump", std::process::id()));
    let tool = |name: &str| std::path::Path::new(&env.pgbin).join(name);
    let conn = ["-h", &env.pghost, "-p", &env.pgport, "-U", "postgres"];
    let out =
        std::process::Command::new(tool("pg_dump")).args(conn).args(["-Fc", "-f"]).arg(&dump).arg(&env.db).output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    db.execute("DROP DATABASE IF EXISTS cerebro_restored WITH (FORCE)", &[]).await?;
    db.execute("CREATE DATABASE cerebro_restored", &[]).await?;
    let out = std::process::Command::new(tool("pg_restore"))
        .args(conn)
        .args(["-d", "cerebro_restored"])
        .arg(&dump)
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_file(&dump)?;

    let restored = env.connect_to("cerebro_restored").await?;
    let census = "SELECT (SELECT count(*) FROM cerebro.model_versions), (SELECT count(*) FROM cerebro.artifacts),
                         (SELECT count(*) FROM cerebro.audit_log), (SELECT count(*) FROM cerebro.model_metrics),
                         (SELECT count(*) FROM cerebro.model_features), (SELECT count(*) FROM cerebro.deployments),
                         (SELECT count(*) FROM cerebro.model_importance),
                         (SELECT string_agg(artifact_sha256, ',' ORDER BY id) FROM cerebro.model_versions)";
    let count =
        |r: &tokio_postgres::Row| -> (Vec<i64>, Option<String>) { ((0..7).map(|i| r.get(i)).collect(), r.get(7)) };
    let (before, after) = (count(&db.query_one(census, &[]).await?), count(&restored.query_one(census, &[]).await?));
    assert!(before.0.iter().all(|&n| n > 0), "{before:?}");
    assert_eq!(before, after);
    drop(restored);
    db.execute("DROP DATABASE cerebro_restored WITH (FORCE)", &[]).await?;
    Ok(())
}

/// A database in LATIN1: training reads its text as UTF-8 (COPY converts
/// to cerebrod's encoding), so scoring must send it so too, or a
/// category with an accent is a value never seen.
#[tokio::test(flavor = "multi_thread")]
async fn a_latin1_database_scores_accented_categories_as_it_trained_on_them() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let name = "cerebro_e2e_latin1";
    db.execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"), &[]).await?;
    db.execute(
        &format!("CREATE DATABASE {name} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"),
        &[],
    )
    .await?;
    let socket = env.socket.with_file_name("cerebrod-e2e-latin1.sock");
    let latin = env.connect_to(name).await?;
    latin
        .batch_execute(&format!(
            "CREATE EXTENSION cerebro;
             ALTER SERVER cerebro_daemon OPTIONS (SET socket '{}');
             CREATE TABLE cafes AS
             SELECT kind || '-' || i AS tag, kind, (i * 7919 % 101)::float8 AS noise,
                    CASE WHEN kind = 'Café' THEN 'oui' ELSE 'non' END AS label
             FROM generate_series(1, 900) i, LATERAL (SELECT (ARRAY['Café', 'Crème', 'Thé'])[1 + i % 3] AS kind) k",
            socket.display()
        ))
        .await?;
    let url = format!("'host={} port={} user=postgres dbname={name}'", env.pghost, env.pgport);
    let mut latin_env = env.with_config_value("latin1", "database_url", &url)?;
    latin_env = latin_env.with_config_value("latin1", "socket_path", &format!("'{}'", socket.display()))?;
    latin_env.socket = socket;
    let mut daemon = Daemon::start(&latin_env)?;
    latin
        .execute(
            "INSERT INTO cerebro.models (name, source, target, key, features, options)
             VALUES ('e2e_latin1', 'cafes', 'label', 'tag', ARRAY['kind', 'noise'], '{\"epochs\": 30}')",
            &[],
        )
        .await?;
    let seen = wait_until_done(&latin, "e2e_latin1", 1, TRAIN_TIMEOUT).await?;
    assert_eq!(seen.last().map(String::as_str), Some("ready"), "{seen:?}");
    let by_kind: HashMap<String, (f64, i64)> = latin
        .query(
            "SELECT c.kind, avg(p.score), count(*) FROM cerebro.predictions p JOIN cafes c ON c.tag = p.key
             WHERE p.model = 'e2e_latin1' GROUP BY c.kind",
            &[],
        )
        .await?
        .into_iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    // Every key came back as it is stored (the join found all 900).
    assert_eq!(by_kind.values().map(|(_, n)| n).sum::<i64>(), 900, "{by_kind:?}");
    assert!(by_kind["Café"].0 > 0.9, "{by_kind:?}");
    assert!(by_kind["Crème"].0 < 0.1 && by_kind["Thé"].0 < 0.1, "{by_kind:?}");
    let one: f64 =
        latin.query_one("SELECT cerebro.predict('e2e_latin1', c) FROM cafes c WHERE tag = 'Café-3'", &[]).await?.get(0);
    assert!(one > 0.9, "{one}");
    let label: String = latin
        .query_one("SELECT label FROM cerebro.predictions WHERE model = 'e2e_latin1' AND key = 'Crème-1'", &[])
        .await?
        .get(0);
    assert_eq!(label, "non");
    // The explanation shows the accented category as the database stores
    // it (made as jsonb from UTF-8, converted to LATIN1).
    let shown: String = latin
        .query_one(
            "SELECT c->>'value' FROM cerebro.predictions p, jsonb_array_elements(p.explanation->'contributions') c
             WHERE p.model = 'e2e_latin1' AND p.key = 'Crème-1' AND p.explain AND c->>'column' = 'kind'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(shown, "Crème");
    daemon.stop()?;
    drop(latin);
    db.execute(&format!("DROP DATABASE {name} WITH (FORCE)"), &[]).await?;
    Ok(())
}

/// DROP EXTENSION and CREATE EXTENSION under a live session: the new
/// archive's ids start again at 1, so a session that kept the old version
/// 1 (its scorer, its resolved model) must see that the new version 1 is
/// another model (its artifact differs) and score with it. cerebrod, running
/// all along, lets the DROP take its lock, and trains the new archive's jobs.
#[tokio::test(flavor = "multi_thread")]
async fn a_session_kept_across_drop_and_create_extension_scores_the_new_archives_model() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let name = "cerebro_e2e_recreated";
    db.execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"), &[]).await?;
    db.execute(&format!("CREATE DATABASE {name}"), &[]).await?;
    let socket = env.socket.with_file_name("cerebrod-e2e-recreated.sock");
    let setup = |label_kind: &str| {
        format!(
            "CREATE EXTENSION cerebro;
             ALTER SERVER cerebro_daemon OPTIONS (SET socket '{}');
             DROP TABLE IF EXISTS drinks;
             CREATE TABLE drinks AS
             SELECT kind || '-' || i AS tag, kind, (i * 7919 % 101)::float8 AS noise,
                    CASE WHEN kind = '{label_kind}' THEN 'yes' ELSE 'no' END AS label
             FROM generate_series(1, 900) i, LATERAL (SELECT (ARRAY['tea', 'coffee', 'milk'])[1 + i % 3] AS kind) k",
            socket.display()
        )
    };
    let admin = env.connect_to(name).await?;
    admin.batch_execute(&setup("tea")).await?;
    let url = format!("'host={} port={} user=postgres dbname={name}'", env.pghost, env.pgport);
    let mut own = env.with_config_value("recreated", "database_url", &url)?;
    own = own.with_config_value("recreated", "socket_path", &format!("'{}'", socket.display()))?;
    own.socket = socket.clone();
    let mut daemon = Daemon::start(&own)?;
    let train = "INSERT INTO cerebro.models (name, source, target, key, features, options)
                 VALUES ('e2e_recreated', 'drinks', 'label', 'tag', ARRAY['kind', 'noise'], '{\"epochs\": 30}')";
    admin.execute(train, &[]).await?;
    let seen = wait_until_done(&admin, "e2e_recreated", 1, TRAIN_TIMEOUT).await?;
    assert_eq!(seen.last().map(String::as_str), Some("ready"), "{seen:?}");

    // The kept session scores version 1 every way it can: by scan, by key
    // (in the backend and through cerebrod), and with cerebro.predict.
    let kept = env.connect_to(name).await?;
    let before = tea_scores(&kept).await?;
    assert!(before.iter().all(|&s| s > 0.9), "{before:?}");

    // A role that may not change the view waits for its lock all the same
    // (CREATE RULE locks before it checks): cerebrod does not give it up.
    admin
        .batch_execute(
            "DO $$ BEGIN CREATE ROLE e2e_rule_maker LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$",
        )
        .await?;
    let outsider = env.connect_as("e2e_rule_maker", name).await?;
    outsider.batch_execute("SET lock_timeout = '5s'").await?;
    let refused = outsider
        .batch_execute("CREATE RULE e2e_squat AS ON INSERT TO cerebro.daemon_lock DO INSTEAD NOTHING")
        .await
        .expect_err("only the owner may add a rule");
    assert_eq!(refused.code().map(|c| c.code()), Some("55P03"), "cerebrod kept its lock: {refused}");
    drop(outsider);

    // cerebrod holds cerebro.daemon_lock for its life: it gives the lock
    // up when the DROP waits for it, or the DROP would wait for ever.
    tokio::time::timeout(Duration::from_secs(60), admin.batch_execute("DROP EXTENSION cerebro CASCADE"))
        .await
        .map_err(|_| anyhow::anyhow!("DROP EXTENSION still waits on cerebrod after 60 s"))??;
    admin.batch_execute(&setup("coffee")).await?;
    admin.execute(train, &[]).await?;
    let seen = wait_until_done(&admin, "e2e_recreated", 1, TRAIN_TIMEOUT).await?;
    assert_eq!(seen.last().map(String::as_str), Some("ready"), "{seen:?}");
    let after = tea_scores(&kept).await?;
    assert!(after.iter().all(|&s| s < 0.1), "the kept session scored the dropped archive's model: {after:?}");
    daemon.stop()?;
    drop(kept);
    drop(admin);
    db.execute(&format!("DROP DATABASE {name} WITH (FORCE)"), &[]).await?;
    Ok(())
}

/// How `e2e_recreated` scores a tea, every way a session can ask.
async fn tea_scores(session: &tokio_postgres::Client) -> anyhow::Result<Vec<f64>> {
    let mut scores = Vec::new();
    for in_backend in ["on", "off"] {
        session.batch_execute(&format!("SET cerebro.score_in_backend = {in_backend}")).await?;
        let by_key: f64 = session
            .query_one("SELECT score FROM cerebro.predictions WHERE model = 'e2e_recreated' AND key = 'tea-3'", &[])
            .await?
            .get(0);
        let scanned: f64 = session
            .query_one(
                "SELECT avg(p.score) FROM cerebro.predictions p JOIN drinks d ON d.tag = p.key
                 WHERE p.model = 'e2e_recreated' AND d.kind = 'tea'",
                &[],
            )
            .await?
            .get(0);
        let one: f64 = session
            .query_one("SELECT cerebro.predict('e2e_recreated', d) FROM drinks d WHERE tag = 'tea-3'", &[])
            .await?
            .get(0);
        scores.extend([by_key, scanned, one]);
    }
    session.batch_execute("RESET cerebro.score_in_backend").await?;
    Ok(scores)
}

#[tokio::test(flavor = "multi_thread")]
async fn cerebrod_runs_as_a_role_with_only_the_documented_privileges() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    db.batch_execute(
        "DO $$ BEGIN CREATE ROLE e2e_cerebrod; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         ALTER ROLE e2e_cerebrod LOGIN BYPASSRLS;
         SELECT cerebro.grant_daemon_privileges('e2e_cerebrod');",
    )
    .await?;
    let url = format!("'host={} port={} user=e2e_cerebrod dbname={}'", env.pghost, env.pgport, env.db);
    let _daemon = Daemon::start(&env.with_config_value("least-privilege", "database_url", &url)?)?;
    let v = insert(&db, "e2e_least", "churn", r#"{"epochs": 2}"#).await?;
    let seen = wait_until_done(&db, "e2e_least", v, TRAIN_TIMEOUT).await?;
    let (status, _, error) = model_state(&db, "e2e_least", v).await?;
    assert_eq!(status, "ready", "{seen:?}: {error:?}");
    let n: i64 = db.query_one("SELECT count(*) FROM cerebro.predictions WHERE model = 'e2e_least'", &[]).await?.get(0);
    assert_eq!(n, 7043);
    let superuser: bool =
        db.query_one("SELECT rolsuper FROM pg_roles WHERE rolname = 'e2e_cerebrod'", &[]).await?.get(0);
    assert!(!superuser);

    // A privilege taken away: the job fails with the reason, and the daemon
    // goes on to the next one.
    db.batch_execute("REVOKE INSERT ON cerebro.training_history FROM e2e_cerebrod").await?;
    let v2 = insert(&db, "e2e_least", "churn", r#"{"epochs": 2}"#).await?;
    wait_until_done(&db, "e2e_least", v2, TRAIN_TIMEOUT).await?;
    let (status, _, error) = model_state(&db, "e2e_least", v2).await?;
    assert_eq!(status, "failed");
    let error = error.unwrap_or_default();
    assert!(error.contains("permission denied for table training_history"), "{error}");
    assert!(error.contains("privileges"), "{error}");
    db.batch_execute("GRANT INSERT ON cerebro.training_history TO e2e_cerebrod").await?;
    let v3 = insert(&db, "e2e_least", "churn", r#"{"epochs": 2}"#).await?;
    assert_eq!(wait_until_done(&db, "e2e_least", v3, TRAIN_TIMEOUT).await?.last().map(String::as_str), Some("ready"));
    Ok(())
}

/// A maintenance statement's lock on the artifacts (VACUUM FULL, say) that
/// outlasts a short training holds up its ending: the job goes back to the
/// queue and waits before its next attempt, rather than using its three
/// attempts up in seconds; it ends ready once the lock is gone.
#[tokio::test(flavor = "multi_thread")]
async fn a_lock_held_for_twenty_seconds_does_not_use_up_a_jobs_attempts() -> anyhow::Result<()> {
    let env = Env::from_env().with_config_value("artifact-lock", "lock_timeout_ms", "1000")?;
    let db = env.connect().await?;
    let holder = env.connect().await?;
    let _daemon = Daemon::start(&env)?;
    holder.batch_execute("BEGIN; LOCK TABLE cerebro.artifacts IN ACCESS EXCLUSIVE MODE").await?;
    let v = insert(&db, "e2e_held_artifacts", "churn", r#"{"epochs": 2}"#).await?;
    // Held for 20 s at least, and until a second attempt has begun.
    let held = std::time::Instant::now();
    while held.elapsed() < Duration::from_secs(20) || job_attempts(&db, "e2e_held_artifacts", v).await? < 2 {
        anyhow::ensure!(held.elapsed() < TRAIN_TIMEOUT, "no second attempt while the lock was held");
        let (status, _, error) = model_state(&db, "e2e_held_artifacts", v).await?;
        assert_ne!(status, "failed", "{error:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    holder.batch_execute("COMMIT").await?;
    let seen = wait_until_done(&db, "e2e_held_artifacts", v, TRAIN_TIMEOUT).await?;
    let (status, _, error) = model_state(&db, "e2e_held_artifacts", v).await?;
    assert_eq!(status, "ready", "{seen:?}: {error:?}");
    let attempts = job_attempts(&db, "e2e_held_artifacts", v).await?;
    assert!((2..=3).contains(&attempts), "{attempts} attempts");
    Ok(())
}

/// Two transactions adding a version to one model at once: in REPEATABLE
/// READ the later fails with 40001, which applications retry, not with a
/// duplicate version number (23505).
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_inserts_under_repeatable_read_fail_with_a_serialization_failure() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let first = insert(&db, "e2e_conc", "churn", r#"{"epochs": 1}"#).await?;
    let (one, two) = (env.connect().await?, env.connect().await?);
    let add = "INSERT INTO cerebro.models (name, source, target, key, options)
               VALUES ('e2e_conc', 'telco_churn', 'churn', 'customer_id', '{\"epochs\": 1}')";
    for s in [&one, &two] {
        s.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1").await?;
    }
    one.batch_execute(add).await?;
    let later = tokio::spawn(async move {
        let r = two.batch_execute(add).await;
        let _ = two.batch_execute("ROLLBACK").await;
        r
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    one.batch_execute("COMMIT").await?;
    let refused = later.await?.expect_err("the later INSERT cannot take the same version");
    assert_eq!(refused.code().map(|c| c.code()), Some("40001"), "{refused}");
    let versions: Vec<i32> = db
        .query("SELECT version FROM cerebro.models WHERE name = 'e2e_conc' ORDER BY version", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, vec![first, first + 1]);
    for v in versions {
        db.execute("SELECT cerebro.cancel('e2e_conc', $1)", &[&v]).await?;
    }
    Ok(())
}

/// Settings a database or a role gives its applications do not reach
/// cerebrod's sessions: a statement_timeout shorter than reading the
/// snapshot, an idle_session_timeout shorter than training (the data
/// connection idles meanwhile), read-only transactions by default, and
/// SERIALIZABLE. The model trains in one attempt.
#[tokio::test(flavor = "multi_thread")]
async fn a_roles_defaults_for_applications_do_not_reach_cerebrods_sessions() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    db.batch_execute(
        "DO $$ BEGIN CREATE ROLE e2e_defaults; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         ALTER ROLE e2e_defaults LOGIN BYPASSRLS;
         SELECT cerebro.grant_daemon_privileges('e2e_defaults');
         ALTER ROLE e2e_defaults SET statement_timeout = '50ms';
         ALTER ROLE e2e_defaults SET idle_session_timeout = '300ms';
         ALTER ROLE e2e_defaults SET default_transaction_read_only = on;
         ALTER ROLE e2e_defaults SET default_transaction_isolation = 'serializable';",
    )
    .await?;
    let url = format!("'host={} port={} user=e2e_defaults dbname={}'", env.pghost, env.pgport, env.db);
    let daemon = Daemon::start(&env.with_config_value("role-defaults", "database_url", &url)?)?;
    let v = insert(&db, "e2e_defaults", "churn", r#"{"epochs": 100, "hidden": [256, 256], "patience": 0}"#).await?;
    let seen = wait_until_done(&db, "e2e_defaults", v, TRAIN_TIMEOUT).await?;
    let (status, _, error) = model_state(&db, "e2e_defaults", v).await?;
    assert_eq!(status, "ready", "{seen:?}: {error:?}");
    let attempts = job_attempts(&db, "e2e_defaults", v).await?;
    assert_eq!(attempts, 1, "the session was not lost while the model trained");
    drop(daemon);
    db.batch_execute("ALTER ROLE e2e_defaults RESET ALL").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_onnx_model_built_elsewhere_imports_checked_and_scores() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = Daemon::start(&env)?;
    let path = std::env::temp_dir().join(format!("cerebro-external-{}.onnx", std::process::id()));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/make_external_onnx.py");
    let out = std::process::Command::new(&env.python).arg(script).arg(&path).output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let onnx = std::fs::read(&path)?;
    std::fs::remove_file(&path)?;

    let import = "SELECT cerebro.import_onnx('e2e_external', $1, 'telco_churn', $2::text::jsonb, $3,
                                            ARRAY['No', 'Yes'], NULL, 'customer_id')";
    let good = r#"{"numbers": ["tenure", "monthly_charges"], "contract": "contract"}"#;
    // Every mismatch between the graph and the columns is refused, and nothing is stored.
    for (bytes, inputs, task, expected) in [
        (&b"not onnx"[..], good, "binary", "not a readable ONNX model"),
        (
            &onnx[..],
            r#"{"numbers": ["tenure", "monthly_charges"]}"#,
            "binary",
            "graph input \"contract\" is not mapped",
        ),
        (
            &onnx[..],
            r#"{"numbers": ["tenure", "monthly_charges"], "contract": "contract", "extra": "x"}"#,
            "binary",
            "no input \"extra\"",
        ),
        (
            &onnx[..],
            r#"{"numbers": ["tenure", "contract"], "contract": "contract"}"#,
            "binary",
            "cannot feed input \"numbers\"",
        ),
        (&onnx[..], r#"{"numbers": ["tenure"], "contract": "contract"}"#, "binary", "takes 2 column(s); 1 are mapped"),
        (
            &onnx[..],
            r#"{"numbers": ["tenure", "nope"], "contract": "contract"}"#,
            "binary",
            "column \"nope\" does not exist",
        ),
        (&onnx[..], good, "regression", "a regression model takes no labels"),
    ] {
        let err = db.query_one(import, &[&bytes, &inputs, &task]).await.expect_err(expected);
        let e = err.as_db_error().expect("a server error");
        assert!(e.message().contains(expected), "{expected}: got {}", e.message());
        assert!(["22023", "42703"].contains(&e.code().code()), "{expected}: {}", e.code().code());
    }
    let none: i64 = db.query_one("SELECT count(*) FROM cerebro.models WHERE name = 'e2e_external'", &[]).await?.get(0);
    assert_eq!(none, 0);

    let v: i32 = db.query_one(import, &[&onnx, &good, &"binary"]).await?.get(0);
    assert_eq!(v, 1);
    let status: String =
        db.query_one("SELECT status FROM cerebro.models WHERE name = 'e2e_external'", &[]).await?.get(0);
    assert_eq!(status, "ready");
    let scored =
        sql_scores(&db, "SELECT key, label, score FROM cerebro.predictions WHERE model = 'e2e_external'").await?;
    assert_eq!(scored.len(), 7043);
    // Explanations need a network Cerebro trained.
    let explained =
        "SELECT explanation FROM cerebro.predictions WHERE model = 'e2e_external' AND key = '7' AND explain";
    let err = db.query_one(explained, &[]).await.expect_err("an imported graph");
    let e = err.as_db_error().expect("a server error");
    assert_eq!(e.code().code(), "0A000", "{}", e.message());
    assert!(e.message().contains("imported"), "{}", e.message());
    let rows =
        db.query("SELECT customer_id::text, tenure, monthly_charges::float8, contract FROM telco_churn", &[]).await?;
    for r in rows {
        let (key, tenure, monthly, contract): (String, i32, f64, String) = (r.get(0), r.get(1), r.get(2), r.get(3));
        let code =
            ["Month-to-month", "One year", "Two year"].iter().position(|c| *c == contract).map_or(-1.0, |i| i as f32);
        let z = -0.05 * tenure as f32 + 0.02 * monthly as f32 - 0.8 * code - 0.3;
        let p = 1.0 / (1.0 + (-z).exp());
        let (label, score) = &scored[&key];
        assert!((score - p as f64).abs() < 1e-5, "row {key}: {score} vs {p}");
        assert_eq!(label.as_deref(), Some(if *score >= 0.5 { "Yes" } else { "No" }), "row {key}");
    }
    // Nothing to distill or measure it on: imported without a target, it
    // has no rows.
    let err = db.query_one("SELECT cerebro.surrogate_sql('e2e_external', 1)", &[]).await.expect_err("no surrogate");
    let e = err.as_db_error().expect("a server error");
    assert_eq!((e.code().code(), e.message()), ("55000", "model \"e2e_external\" version 1 has no rule surrogate"));
    assert!(e.hint().unwrap_or("").contains("cerebro.distill('e2e_external', 1)"), "{:?}", e.hint());
    for (call, to) in [
        ("SELECT * FROM cerebro.distill('e2e_external', 1)", "distill it on"),
        ("SELECT * FROM cerebro.measure_importance('e2e_external', 1)", "measure it on"),
    ] {
        let err = db.query_one(call, &[]).await.expect_err("imported without a target");
        let e = err.as_db_error().expect("a server error");
        let expected =
            format!("model \"e2e_external\" version 1 was imported without a target: it has no rows to {to}");
        assert_eq!((e.code().code(), e.message()), ("55000", expected.as_str()));
        assert!(e.hint().unwrap_or("").contains("target => 'column'"), "{:?}", e.hint());
    }
    let err = db.query_one("SELECT cerebro.reproduce('e2e_external', 1)", &[]).await.expect_err("not retrainable");
    let e = err.as_db_error().expect("a server error");
    assert_eq!(e.code().code(), "0A000", "{}", e.message());

    // With a target, its rows are frozen, checked against the labels, and
    // its importance measured through ONNX Runtime on request.
    let with_target = "SELECT cerebro.import_onnx('e2e_external', $1, 'telco_churn', $2::text::jsonb, 'binary',
                                                  $3, NULL, 'customer_id', target => $4)";
    let yes_no = vec!["No".to_string(), "Yes".to_string()];
    for (target, labels, code, expected) in [
        ("nope", yes_no.clone(), "42703", "column \"nope\" does not exist"),
        ("tenure", yes_no.clone(), "22023", "the target \"tenure\" also feeds a graph input"),
        ("churn", vec!["no".to_string(), "yes".to_string()], "22023", "which is not one of the labels (no, yes)"),
    ] {
        let err = db.query_one(with_target, &[&onnx, &good, &labels, &target]).await.expect_err(expected);
        let e = err.as_db_error().expect("a server error");
        assert!(e.message().contains(expected), "{expected}: got {}", e.message());
        assert_eq!(e.code().code(), code, "{}", e.message());
    }
    let v2: i32 = db.query_one(with_target, &[&onnx, &good, &yes_no, &"churn"]).await?.get(0);
    assert_eq!(v2, 2);
    let progress: String = db
        .query_one("SELECT progress FROM cerebro.models WHERE name = 'e2e_external' AND version = 2", &[])
        .await?
        .get(0);
    assert_eq!(progress, "imported");
    let frozen: i64 = db
        .query_one(
            "SELECT s.row_count FROM cerebro.snapshots s JOIN cerebro.model_versions m ON m.snapshot_id = s.id
             WHERE m.name = 'e2e_external' AND m.version = 2 AND m.target_column = 'churn'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(frozen, 7043);
    // cerebrod measures it once the import commits, as it measures a
    // version it trained: its importance and metrics, through ONNX Runtime.
    let (measured_by_cerebrod, _) = import_measured(&db, "e2e_external", 2).await?;
    let measured_by_cerebrod = measured_by_cerebrod.expect("an importance: the rows hold both classes");
    // And distilled, as after training: a surrogate of depth 4 at most.
    let case: String = db.query_one("SELECT cerebro.surrogate_sql('e2e_external', 2)", &[]).await?.get(0);
    assert!(case.starts_with("CASE") && case.contains("tenure"), "{case}");
    let measured = db.query("SELECT * FROM cerebro.measure_importance('e2e_external', 2)", &[]).await?;
    let ranked: Vec<(i32, String, f64, f64)> =
        measured.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect();
    assert_eq!(ranked.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 2, 3], "{ranked:?}");
    let mut columns: Vec<&str> = ranked.iter().map(|r| r.1.as_str()).collect();
    columns.sort_unstable();
    assert_eq!(columns, ["contract", "monthly_charges", "tenure"]);
    // Every column the formula weighs moves its AUC when shuffled.
    assert!(ranked.iter().all(|r| r.3 > 0.0), "{ranked:?}");
    assert!((ranked.iter().map(|r| r.2).sum::<f64>() - 1.0).abs() < 1e-9, "{ranked:?}");
    // Measured again on request, it is what cerebrod measured: the same
    // rows, shuffles and scores.
    let again: Vec<(String, f64)> = measured_by_cerebrod["columns"]
        .as_array()
        .expect("columns")
        .iter()
        .map(|c| (c["column"].as_str().expect("column").to_string(), c["drop"].as_f64().expect("drop")))
        .collect();
    assert_eq!(again.len(), ranked.len(), "{measured_by_cerebrod}");
    for ((column, drop), r) in again.iter().zip(&ranked) {
        assert_eq!(column, &r.1, "{measured_by_cerebrod}");
        assert!((drop - r.3).abs() < 1e-9, "{column}: {drop} then {}", r.3);
    }
    // Stored as training stores it: the index and the models' top columns.
    let (indexed, top): (i64, Vec<String>) = {
        let r = db
            .query_one(
                "SELECT (SELECT count(*) FROM cerebro.model_importance i JOIN cerebro.model_versions m
                         ON m.id = i.model_version_id WHERE m.name = 'e2e_external' AND m.version = 2),
                        (SELECT top_columns FROM cerebro.models WHERE name = 'e2e_external' AND version = 2)",
                &[],
            )
            .await?;
        (r.get(0), r.get(1))
    };
    assert_eq!(indexed, 3);
    assert_eq!(top, ranked.iter().map(|r| r.1.clone()).collect::<Vec<_>>());
    // Its metric is the AUC of the graph's own scores on the rows measured:
    // the formula's AUC on telco_churn is far above chance.
    let measured = db
        .query_one(
            "SELECT (importance->>'baseline')::float8, (importance->>'rows')::int8, metrics
             FROM cerebro.model_versions WHERE name = 'e2e_external' AND version = 2",
            &[],
        )
        .await?;
    let (baseline, rows, metrics): (f64, i64, serde_json::Value) = (measured.get(0), measured.get(1), measured.get(2));
    assert!(baseline > 0.7, "{baseline}");
    // The import now has metrics, on the validation rows a version trained
    // on its snapshot validates on; all 1,409 of them were measured, so its
    // AUC is the importance's baseline.
    assert_eq!(rows, 1409);
    assert_eq!(metrics["auc"].as_f64(), Some(baseline), "{metrics}");
    assert!(metrics["accuracy"].as_f64().is_some_and(|a| a > 0.7) && metrics["log_loss"].is_f64(), "{metrics}");
    // And its rule surrogate, fitted to the graph's own predictions.
    let (leaves, fidelity): (i32, f64) = {
        let r = db.query_one("SELECT leaves, fidelity FROM cerebro.distill('e2e_external', 2, 3)", &[]).await?;
        (r.get(0), r.get(1))
    };
    assert!(leaves >= 2 && fidelity > 0.8, "{leaves} leaves, fidelity {fidelity}");
    let audited: i64 = db
        .query_one(
            "SELECT count(*) FROM cerebro.audit_log WHERE model = 'e2e_external' AND version = 2
               AND action IN ('measure', 'distill')",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(audited, 2);
    // On rows of one class the AUC, and so the importance, is undefined:
    // no rows, and metrics without it.
    let one_class = "SELECT cerebro.import_onnx('e2e_external', $1,
                         '(SELECT * FROM telco_churn WHERE churn = ''No'')', $2::text::jsonb, 'binary',
                         ARRAY['No', 'Yes'], NULL, 'customer_id', target => 'churn')";
    let v_one: i32 = db.query_one(one_class, &[&onnx, &good]).await?.get(0);
    let (importance, metrics) = import_measured(&db, "e2e_external", v_one).await?;
    assert_eq!(importance, None);
    assert!(metrics.get("auc").is_none() && metrics["accuracy"].is_f64(), "{metrics}");
    let measured = db.query("SELECT * FROM cerebro.measure_importance('e2e_external', $1)", &[&v_one]).await?;
    assert!(measured.is_empty(), "{} rows", measured.len());
    let (importance, metrics): (Option<serde_json::Value>, serde_json::Value) = {
        let r = db
            .query_one(
                "SELECT importance, metrics FROM cerebro.model_versions WHERE name = 'e2e_external' AND version = $1",
                &[&v_one],
            )
            .await?;
        (r.get(0), r.get(1))
    };
    assert_eq!(importance, None);
    assert!(metrics.get("auc").is_none() && metrics["accuracy"].is_f64(), "{metrics}");
    // With a target it can be a parent: a network of Cerebro's on its
    // columns and target (nothing to warm-start from), to compare with it.
    db.execute(
        "INSERT INTO cerebro.models (name, parent_version, change) VALUES ('e2e_external', 2, 'train epochs = 1')",
        &[],
    )
    .await?;
    assert_eq!(wait_until_done(&db, "e2e_external", 4, TRAIN_TIMEOUT).await?.last().map(String::as_str), Some("ready"));
    let derived = db
        .query_one(
            "SELECT target, ARRAY(SELECT f FROM unnest(features) f ORDER BY 1)
             FROM cerebro.models WHERE name = 'e2e_external' AND version = 4",
            &[],
        )
        .await?;
    assert_eq!(derived.get::<_, String>(0), "churn");
    assert_eq!(derived.get::<_, Vec<String>>(1), ["contract", "monthly_charges", "tenure"]);
    Ok(())
}

/// Runs a script of tests/python that writes an ONNX file, and reads it.
fn built_onnx(env: &Env, script: &str, args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let path = std::env::temp_dir().join(format!("cerebro-{script}-{}.onnx", std::process::id()));
    let script = format!("{}/python/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(&env.python).arg(script).arg(&path).args(args).output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let onnx = std::fs::read(&path)?;
    std::fs::remove_file(&path)?;
    Ok(onnx)
}

/// ONNX Runtime does not hold a graph to the output shape it declares: a
/// binary graph that leaves its width unsaid is read by the width each run
/// gives (the positive class second of two), and one that gives more values
/// than rows fails with its shape (22000) wherever it is scored, rather
/// than panicking cerebrod's task or reading past its rows.
#[tokio::test(flavor = "multi_thread")]
async fn an_imported_graph_is_read_by_the_shape_it_gives_not_the_one_it_declares() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = Daemon::start(&env)?;
    let unsaid = built_onnx(&env, "make_external_onnx.py", &["--width-unsaid"])?;
    let first: i32 = db
        .query_one(
            "SELECT cerebro.import_onnx('e2e_shapes', $1, 'telco_churn',
                 '{\"numbers\": [\"tenure\", \"monthly_charges\"], \"contract\": \"contract\"}', 'binary',
                 ARRAY['No', 'Yes'], NULL, 'customer_id', target => 'churn')",
            &[&unsaid],
        )
        .await?
        .get(0);
    let scored = sql_scores(
        &db,
        &format!("SELECT key, label, score FROM cerebro.predictions WHERE model = 'e2e_shapes' AND version = {first}"),
    )
    .await?;
    let rows =
        db.query("SELECT customer_id::text, tenure, monthly_charges::float8, contract FROM telco_churn", &[]).await?;
    assert_eq!(scored.len(), rows.len());
    for r in rows {
        let (key, tenure, monthly, contract): (String, i32, f64, String) = (r.get(0), r.get(1), r.get(2), r.get(3));
        let code =
            ["Month-to-month", "One year", "Two year"].iter().position(|c| *c == contract).map_or(-1.0, |i| i as f32);
        let p = 1.0 / (1.0 + (0.05 * tenure as f32 - 0.02 * monthly as f32 + 0.8 * code + 0.3).exp());
        assert!((scored[&key].1 - p as f64).abs() < 1e-5, "row {key}: {:?} vs {p}", scored[&key]);
    }
    // Measured by the same column: the formula's AUC, not one minus it.
    db.query("SELECT * FROM cerebro.measure_importance('e2e_shapes', $1)", &[&first]).await?;
    let auc: f64 = db
        .query_one(
            "SELECT (metrics->>'auc')::float8 FROM cerebro.models WHERE name = 'e2e_shapes' AND version = $1",
            &[&first],
        )
        .await?
        .get(0);
    assert!(auc > 0.7, "{auc}");

    let misshapen = built_onnx(&env, "make_misshapen_onnx.py", &[])?;
    let v: i32 = db
        .query_one(
            "SELECT cerebro.import_onnx('e2e_shapes', $1, 'telco_churn', '{\"x\": \"tenure\"}', 'regression',
                 NULL, NULL, 'customer_id', target => 'monthly_charges')",
            &[&misshapen],
        )
        .await?
        .get(0);
    for call in [
        format!("SELECT count(*) FROM cerebro.predictions WHERE model = 'e2e_shapes' AND version = {v}"),
        format!("SELECT cerebro.predict('e2e_shapes', t, {v}) FROM telco_churn t WHERE customer_id = 7"),
        format!("SELECT * FROM cerebro.measure_importance('e2e_shapes', {v})"),
        format!("SELECT * FROM cerebro.distill('e2e_shapes', {v})"),
    ] {
        let err = db.query(&call, &[]).await.expect_err("one value too many");
        let e = err.as_db_error().expect("a server error");
        assert_eq!(e.code().code(), "22000", "{call}: {}", e.message());
        assert!(
            e.message().contains("value(s) for") && e.message().contains("a regression model gives one value a row"),
            "{call}: {}",
            e.message()
        );
    }
    // Nothing else was hurt: the first import still scores.
    let n: i64 = db
        .query_one("SELECT count(*) FROM cerebro.predictions WHERE model = 'e2e_shapes' AND version = $1", &[&first])
        .await?
        .get(0);
    assert_eq!(n, 7043);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_selection_trains_every_candidate_and_the_leaderboard_ranks_them() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = Daemon::start(&env)?;
    db.execute(
        "INSERT INTO cerebro.models (name, source, target, key, spec) VALUES ('e2e_select', 'telco_churn', 'churn',
             'customer_id', 'model hidden = {[16], [32, 16]}\ntrain lr = {0.01, 0.003}, epochs = 3')",
        &[],
    )
    .await?;
    for v in 1..=4 {
        assert_eq!(
            wait_until_done(&db, "e2e_select", v, TRAIN_TIMEOUT).await?.last().map(String::as_str),
            Some("ready")
        );
    }
    let board = db
        .query(
            "SELECT rank, version, (metrics->>'auc')::float8, triple FROM cerebro.leaderboard
             WHERE name = 'e2e_select' ORDER BY rank, version",
            &[],
        )
        .await?;
    assert_eq!(board.len(), 4);
    let aucs: Vec<f64> = board.iter().map(|r| r.get(2)).collect();
    assert!(aucs.windows(2).all(|w| w[0] >= w[1]), "ranked by AUC: {aucs:?}");
    assert_eq!(board[0].get::<_, i32>(0), 1);
    let triples: std::collections::BTreeSet<String> =
        board.iter().map(|r| r.get::<_, serde_json::Value>(3)).map(|t| format!("{}{}", t["hidden"], t["lr"])).collect();
    assert_eq!(triples.len(), 4, "{triples:?}");
    // Candidates of one shape trained together, as one stack over one read
    // of the data: two shapes, two stacks of two.
    let stacks: Vec<i64> = db
        .query(
            "SELECT (trained_with->>'stack')::bigint FROM cerebro.model_versions WHERE name = 'e2e_select' ORDER BY version",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(stacks, vec![2, 2, 2, 2]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_a_selection_stops_its_candidates() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = Daemon::start(&env)?;
    db.execute(
        "INSERT INTO cerebro.models (name, source, target, key, spec) VALUES ('e2e_cancel', 'telco_churn', 'churn',
             'customer_id', 'model hidden = {[256, 256], [8]}\ntrain lr = {1e-3, 5e-4, 2e-4}, epochs = 400, patience = 0
              ensemble')",
        &[],
    )
    .await?;
    // Versions 1, 3 and 5 share a shape and train as one stack; 2, 4 and 6 wait.
    wait_for(&db, "e2e_cancel", 1, TRAIN_TIMEOUT, |s, e| s == "training" && e >= 2).await?;
    let selection: i64 = db.query_one("SELECT id FROM cerebro.selections WHERE name = 'e2e_cancel'", &[]).await?.get(0);
    let n: i32 = db.query_one("SELECT cerebro.cancel_selection($1)", &[&selection]).await?.get(0);
    assert_eq!(n, 6);
    for v in 1..=6 {
        let seen = wait_until_done(&db, "e2e_cancel", v, TRAIN_TIMEOUT).await.ok();
        let (status, epoch, _) = model_state(&db, "e2e_cancel", v).await?;
        assert_eq!(status, "cancelled", "version {v}: {seen:?}");
        assert!(epoch < 400, "version {v} ran to the end");
    }
    let audited: i64 = db
        .query_one("SELECT count(*) FROM cerebro.audit_log WHERE model = 'e2e_cancel' AND action = 'cancel'", &[])
        .await?
        .get(0);
    assert_eq!(audited, 1);
    // A cancelled selection gets no ensemble of what it kept.
    wait_for_selection(&db, "e2e_cancel").await?;
    let row = db
        .query_one(
            "SELECT plan ? 'ensemble', (SELECT count(*) FROM cerebro.model_versions m WHERE m.selection_id = s.id)
             FROM cerebro.selections s WHERE s.id = $1",
            &[&selection],
        )
        .await?;
    assert_eq!((row.get::<_, bool>(0), row.get::<_, i64>(1)), (false, 6));
    Ok(())
}

/// Waits for cerebrod to close the newest selection of `name` (after its last
/// candidate); returns its id and promoted version.
async fn wait_for_selection(db: &tokio_postgres::Client, name: &str) -> anyhow::Result<(i64, Option<i32>)> {
    let deadline = std::time::Instant::now() + TRAIN_TIMEOUT;
    loop {
        let row = db
            .query_one(
                "SELECT id, finished_at IS NOT NULL, promoted_version FROM cerebro.selections WHERE name = $1
                 ORDER BY id DESC LIMIT 1",
                &[&name],
            )
            .await?;
        if row.get::<_, bool>(1) {
            return Ok((row.get(0), row.get(2)));
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "selection {name} not finished after {TRAIN_TIMEOUT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn halving_stops_the_weak_at_each_rung_and_promotes_the_winner() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = Daemon::start(&env)?;
    // Nine candidates of one shape: one stack. Rungs at epochs 2 and 6: three
    // go past the first, one past the second.
    db.execute(
        "INSERT INTO cerebro.models (name, source, target, key, spec) VALUES ('e2e_halving', 'telco_churn', 'churn',
             'customer_id', 'model hidden = [16]
              train lr = range(1e-4, 3e-2, log), epochs = 12, patience = 0
              search halving(9, eta = 3, min_epochs = 2, seed = 5)
              promote')",
        &[],
    )
    .await?;
    let (selection, promoted) = wait_for_selection(&db, "e2e_halving").await?;
    let rows = db
        .query(
            "SELECT version, status::text, epochs_run, stopped, rank FROM cerebro.leaderboard WHERE selection = $1
             ORDER BY version",
            &[&selection],
        )
        .await?;
    assert_eq!(rows.len(), 9);
    let mut epochs: Vec<i32> = rows.iter().map(|r| r.get(2)).collect();
    epochs.sort();
    assert_eq!(epochs, vec![2, 2, 2, 2, 2, 2, 6, 6, 12]);
    for r in &rows {
        assert_eq!(r.get::<_, String>(1), "ready");
        let stopped: Option<String> = r.get(3);
        assert_eq!(stopped.is_some(), r.get::<_, i32>(2) < 12, "{stopped:?}");
        if let Some(why) = stopped {
            assert!(why.starts_with("halving: not in the best 1/3 at rung"), "{why}");
        }
    }
    let best = rows.iter().find(|r| r.get::<_, i32>(4) == 1).map(|r| r.get::<_, i32>(0));
    assert_eq!(promoted, best, "the leaderboard's first is promoted");
    let deployed: i32 =
        db.query_one("SELECT version FROM cerebro.deployments WHERE name = 'e2e_halving'", &[]).await?.get(0);
    assert_eq!(Some(deployed), best);
    let comment: String =
        db.query_one("SELECT comment FROM cerebro.deployment_history WHERE name = 'e2e_halving'", &[]).await?.get(0);
    assert!(comment.starts_with(&format!("promoted: best candidate of selection {selection}")), "{comment}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spent_budget_stops_training_and_cancels_what_has_not_started() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = Daemon::start(&env)?;
    // Two shapes, two stacks of two; 30 epochs in all: the first stack uses
    // them (15 each), the second never starts.
    db.execute(
        "INSERT INTO cerebro.models (name, source, target, key, spec) VALUES ('e2e_budget', 'telco_churn', 'churn',
             'customer_id', 'model hidden = {[16], [8]}
              train lr = {0.01, 0.003}, epochs = 40, patience = 0
              budget 30 epochs')",
        &[],
    )
    .await?;
    let (selection, promoted) = wait_for_selection(&db, "e2e_budget").await?;
    assert_eq!(promoted, None, "promotion was not asked for");
    let rows = db
        .query(
            "SELECT status::text, epochs_run, stopped, error FROM cerebro.leaderboard WHERE selection = $1",
            &[&selection],
        )
        .await?;
    let mut ready = 0;
    for r in &rows {
        let (status, epochs, stopped, error): (String, i32, Option<String>, Option<String>) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        match status.as_str() {
            "ready" => {
                ready += 1;
                assert_eq!(epochs, 15);
                assert_eq!(stopped.as_deref(), Some("the selection's budget of 30 epochs was spent (after epoch 15)"));
            }
            "cancelled" => {
                let error = error.unwrap_or_default();
                assert!(error.contains("budget of 30 epochs was spent before this candidate started"), "{error}");
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(ready, 2);
    // The budget and what was spent of it, as cerebro.selections shows them.
    let spent = db
        .query_one(
            "SELECT budget_epochs, budget_seconds, spent_epochs, spent_seconds,
                    spent_seconds <= extract(epoch FROM finished_at - created_at)
             FROM cerebro.selections WHERE id = $1",
            &[&selection],
        )
        .await?;
    let (budget, no_seconds, epochs, seconds, bounded): (Option<i64>, Option<f64>, i64, f64, bool) =
        (spent.get(0), spent.get(1), spent.get(2), spent.get(3), spent.get(4));
    assert_eq!((budget, no_seconds, epochs), (Some(30), None, 30));
    assert!(seconds > 0.0 && bounded, "spent {seconds} s, within the selection's life");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_default_selection_finds_a_good_churn_model() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = Daemon::start(&env)?;
    db.execute(
        "INSERT INTO cerebro.models (name, source, target, key, spec)
         VALUES ('e2e_default_sel', 'telco_churn', 'churn', 'customer_id', 'default')",
        &[],
    )
    .await?;
    let (selection, _) = wait_for_selection(&db, "e2e_default_sel").await?;
    let row = db
        .query_one(
            "SELECT count(*), max((metrics->>'auc')::float8), count(*) FILTER (WHERE status = 'ready')
             FROM cerebro.leaderboard WHERE selection = $1",
            &[&selection],
        )
        .await?;
    let (versions, best, ready): (i64, f64, i64) = (row.get(0), row.get(1), row.get(2));
    // Rounds of 24 candidates, then the ensemble of the best.
    assert!(versions % 24 == 1 && versions > 24 && ready == versions, "{versions} versions, {ready} ready");
    // The rounds ended at their most, or after two found nothing better.
    let rounds = db
        .query_one(
            "SELECT max(coalesce((m.request->'selection'->>'round')::int, 1)),
                    (SELECT coalesce((b.request->'selection'->>'round')::int, 1)
                     FROM cerebro.leaderboard l JOIN cerebro.model_versions b
                          ON b.selection_id = l.selection AND b.version = l.version
                     WHERE l.selection = $1 AND l.ensemble_of IS NULL ORDER BY l.rank, l.version LIMIT 1)
             FROM cerebro.model_versions m WHERE m.selection_id = $1 AND NOT m.request ? 'ensemble'",
            &[&selection],
        )
        .await?;
    let (last, best_round): (i32, i32) = (rounds.get(0), rounds.get(1));
    assert_eq!(i64::from(last) * 24 + 1, versions);
    assert!(last == 25 || last - best_round >= 2, "stopped after round {last}, best in round {best_round}");
    let ensembles: i64 = db
        .query_one(
            "SELECT count(*) FROM cerebro.leaderboard WHERE selection = $1 AND ensemble_of IS NOT NULL",
            &[&selection],
        )
        .await?
        .get(0);
    assert_eq!(ensembles, 1);
    assert!(best >= 0.83, "best validation AUC {best}");
    let row =
        db.query_one("SELECT spec, plan ? 'searched' FROM cerebro.selections WHERE id = $1", &[&selection]).await?;
    assert_eq!(row.get::<_, String>(0), "default", "the spec is kept as written");
    assert!(!row.get::<_, bool>(1), "churners are 26 %: no class weights searched");
    Ok(())
}

/// With a class under 15 % of the rows and 1,000 rows of it, the default
/// selection also searches `class_weights = {none, balanced}`, in every round.
#[tokio::test(flavor = "multi_thread")]
async fn the_default_selection_weighs_a_rare_class() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    // 1,869 churners among 17,391 customers (11 %): every customer, and
    // those who stayed twice more.
    db.batch_execute(
        "DROP TABLE IF EXISTS e2e_rare_churn;
         CREATE TABLE e2e_rare_churn AS
         SELECT row_number() OVER () AS id, t.* FROM (
             SELECT * FROM telco_churn
             UNION ALL SELECT * FROM telco_churn WHERE churn = 'No'
             UNION ALL SELECT * FROM telco_churn WHERE churn = 'No') t;
         ALTER TABLE e2e_rare_churn DROP COLUMN customer_id;",
    )
    .await?;
    let _daemon = Daemon::start(&env)?;
    db.execute(
        "INSERT INTO cerebro.models (name, source, target, key, spec)
         VALUES ('e2e_rare', 'e2e_rare_churn', 'churn', 'id', 'default')",
        &[],
    )
    .await?;
    let (selection, _) = wait_for_selection(&db, "e2e_rare").await?;
    let searched: String =
        db.query_one("SELECT plan->>'searched' FROM cerebro.selections WHERE id = $1", &[&selection]).await?.get(0);
    assert!(searched.ends_with("train  class_weights = {none, balanced}"), "{searched}");
    let rows = db
        .query(
            "SELECT coalesce((request->'selection'->>'round')::int, 1), options->>'class_weights', count(*)
             FROM cerebro.model_versions WHERE selection_id = $1 AND NOT request ? 'ensemble' GROUP BY 1, 2",
            &[&selection],
        )
        .await?;
    let mut weights: HashMap<String, i64> = HashMap::new();
    for r in &rows {
        *weights.entry(r.get(1)).or_default() += r.get::<_, i64>(2);
    }
    assert!(
        weights.get("balanced").is_some_and(|&n| n > 0) && weights.get("none").is_some_and(|&n| n > 0),
        "{weights:?}"
    );
    let rounds = rows.iter().map(|r| r.get::<_, i32>(0)).max().unwrap_or(0);
    if rounds > 1 {
        assert!(
            rows.iter().any(|r| r.get::<_, i32>(0) == 2 && r.get::<_, String>(1) == "balanced"),
            "later rounds search the weights too"
        );
    }
    Ok(())
}

/// `default` followed by clauses of the user's: their budget, training and
/// ensemble replace the default's, and with `features joins(auto)` the
/// joins found are searched in one round, the identifier rule of the
/// default still applied to the source's columns.
#[tokio::test(flavor = "multi_thread")]
async fn the_default_changed_by_a_users_clauses_searches_as_they_say() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    db.batch_execute(
        "DROP SCHEMA IF EXISTS e2e_dc CASCADE;
         CREATE SCHEMA e2e_dc;
         CREATE TABLE e2e_dc.sites (site_id integer PRIMARY KEY, elevation float8, kind text);
         INSERT INTO e2e_dc.sites SELECT i, i * 37 % 500, (ARRAY['a', 'b'])[1 + i % 2] FROM generate_series(1, 150) i;
         CREATE TABLE e2e_dc.visits (id integer PRIMARY KEY, site_id integer REFERENCES e2e_dc.sites, hours float8,
                                     busy boolean);
         INSERT INTO e2e_dc.visits SELECT i, 1 + i % 150, i % 13, (i % 150) * 37 % 500 > 250
         FROM generate_series(1, 1500) i;",
    )
    .await?;
    let _daemon = Daemon::start(&env)?;
    db.execute(
        "INSERT INTO cerebro.models (name, source, target, key, spec) VALUES ('e2e_dc', 'telco_churn', 'churn',
             'customer_id', 'default
                             budget 5 min
                             train epochs = 2, lr = {0.003, 0.01}
                             ensemble 2')",
        &[],
    )
    .await?;
    let (selection, _) = wait_for_selection(&db, "e2e_dc").await?;
    let row = db
        .query_one(
            "SELECT spec, plan->>'searched', budget_seconds FROM cerebro.selections WHERE id = $1",
            &[&selection],
        )
        .await?;
    let (spec, searched, budget): (String, String, Option<f64>) = (row.get(0), row.get(1), row.get(2));
    assert!(spec.starts_with("default"), "the spec as written: {spec}");
    assert_eq!(budget, Some(300.0));
    assert!(searched.contains("search halving(24") && searched.contains("ensemble 2"), "{searched}");
    let drawn = db
        .query(
            "SELECT (options->>'epochs')::int, (options->>'learning_rate')::float8
             FROM cerebro.model_versions WHERE selection_id = $1 AND NOT request ? 'ensemble'",
            &[&selection],
        )
        .await?;
    assert!(drawn.len() >= 24, "{} candidates", drawn.len());
    for r in &drawn {
        let (epochs, lr): (i32, f64) = (r.get(0), r.get(1));
        assert!(epochs == 2 && (lr == 0.003 || lr == 0.01), "{epochs} epochs, lr {lr}");
    }
    // Its ensemble weighs the best two.
    let pool: i32 = db
        .query_one(
            "SELECT jsonb_array_length(request->'ensemble'->'pool') FROM cerebro.model_versions
             WHERE selection_id = $1 AND request ? 'ensemble'",
            &[&selection],
        )
        .await?
        .get(0);
    assert_eq!(pool, 2);

    // With the joins the sites' key leads to: one round, the join searched.
    db.execute(
        "INSERT INTO cerebro.models (name, source, target, key, spec) VALUES ('e2e_dcj', 'e2e_dc.visits', 'busy',
             'id', 'default
                    features joins(auto)
                    train epochs = 2
                    budget 5 min')",
        &[],
    )
    .await?;
    let (selection, _) = wait_for_selection(&db, "e2e_dcj").await?;
    let plan: serde_json::Value =
        db.query_one("SELECT plan FROM cerebro.selections WHERE id = $1", &[&selection]).await?.get(0);
    assert!(plan.get("rounds").is_none_or(|r| r.is_null() || r == 1), "{plan}");
    // The default's identifier rule read the sites' key as a category.
    assert!(plan["searched"].as_str().is_some_and(|t| t.contains("site_id = category")), "{plan}");
    let kept: Vec<&str> =
        plan["joins"]["kept"].as_array().into_iter().flatten().filter_map(|j| j["prefix"].as_str()).collect();
    assert_eq!(kept, ["sites"], "{plan}");
    let reads: Vec<bool> = db
        .query(
            "SELECT features @> '[{\"name\": \"sites__elevation\"}]' FROM cerebro.model_versions
             WHERE selection_id = $1 AND NOT request ? 'ensemble' AND status = 'ready'",
            &[&selection],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(reads.contains(&true) && reads.contains(&false), "searched with and without the join: {reads:?}");

    // `default` with a clause that says what the default says already is
    // the default, round after round.
    db.execute(
        "INSERT INTO cerebro.models (name, source, target, key, spec) VALUES ('e2e_dce', 'telco_churn', 'churn',
             'customer_id', 'default
                             ensemble')",
        &[],
    )
    .await?;
    let (selection, _) = wait_for_selection(&db, "e2e_dce").await?;
    let row = db
        .query_one(
            "SELECT max(coalesce((request->'selection'->>'round')::int, 1)), count(*) FILTER (WHERE status = 'failed')
             FROM cerebro.model_versions WHERE selection_id = $1",
            &[&selection],
        )
        .await?;
    let (rounds, failed): (i32, i64) = (row.get(0), row.get(1));
    assert!(rounds >= 2 && failed == 0, "{rounds} round(s), {failed} failed");
    Ok(())
}

/// On an ordered split, the default searches with and without a numeric
/// column that follows the key order (a time index): every round's
/// candidates learn with it or leave it out, and those without it score.
#[tokio::test(flavor = "multi_thread")]
async fn the_default_selection_searches_without_a_time_index_on_an_ordered_split() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    // signup_day rises with id, as a date stored as a number would.
    db.batch_execute(
        "DROP TABLE IF EXISTS e2e_dated_churn;
         CREATE TABLE e2e_dated_churn AS
         SELECT row_number() OVER (ORDER BY customer_id) AS id, t.* FROM telco_churn t;
         ALTER TABLE e2e_dated_churn ADD COLUMN signup_day float8;
         UPDATE e2e_dated_churn SET signup_day = 20000 + id / 10.0 + (id % 7);
         ALTER TABLE e2e_dated_churn DROP COLUMN customer_id;",
    )
    .await?;
    let _daemon = Daemon::start(&env)?;
    db.execute(
        "INSERT INTO cerebro.models (name, source, target, key, spec, options)
         VALUES ('e2e_dated', 'e2e_dated_churn', 'churn', 'id', 'default', '{\"split\": \"ordered\"}')",
        &[],
    )
    .await?;
    let (selection, _) = wait_for_selection(&db, "e2e_dated").await?;
    let searched: String =
        db.query_one("SELECT plan->>'searched' FROM cerebro.selections WHERE id = $1", &[&selection]).await?.get(0);
    assert!(searched.ends_with("features *, -signup_day?"), "{searched}");
    let rows = db
        .query(
            "SELECT coalesce((request->'selection'->>'round')::int, 1), features @> '[{\"name\": \"signup_day\"}]',
                    jsonb_array_length(features), status::text, error
             FROM cerebro.model_versions WHERE selection_id = $1 AND NOT request ? 'ensemble'",
            &[&selection],
        )
        .await?;
    let mut sets: HashMap<(i32, bool), i32> = HashMap::new();
    for r in &rows {
        assert_eq!(r.get::<_, String>(3), "ready", "{:?}", r.get::<_, Option<String>>(4));
        let (with, width) = (r.get::<_, bool>(1), r.get::<_, i32>(2));
        assert_eq!(width, if with { 20 } else { 19 }, "every other column is kept");
        *sets.entry((r.get(0), with)).or_default() += 1;
    }
    let rounds = rows.iter().map(|r| r.get::<_, i32>(0)).max().unwrap_or(0);
    for round in 1..=rounds.min(2) {
        assert!(sets.contains_key(&(round, true)) && sets.contains_key(&(round, false)), "round {round}: {sets:?}");
    }
    // A candidate without the column scores every row, the column unread.
    let without: i32 = db
        .query_one(
            "SELECT min(version) FROM cerebro.model_versions
             WHERE selection_id = $1 AND NOT features @> '[{\"name\": \"signup_day\"}]'",
            &[&selection],
        )
        .await?
        .get(0);
    let scored: i64 = db
        .query_one(
            &format!("SELECT count(score) FROM cerebro.predictions WHERE model = 'e2e_dated' AND version = {without}"),
            &[],
        )
        .await?
        .get(0);
    assert_eq!(scored, 7043);
    Ok(())
}

/// `ensemble`: once its candidates are done, a selection weighs its best
/// into one more version, whose file averages theirs; it scores, deploys,
/// exports and reproduces like any version.
#[tokio::test(flavor = "multi_thread")]
async fn a_selections_ensemble_averages_its_best_and_is_a_version_like_any() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = Daemon::start(&env)?;
    db.execute(
        "INSERT INTO cerebro.models (name, source, target, key, spec) VALUES ('e2e_ensemble', 'telco_churn', 'churn',
             'customer_id', 'model hidden = {[16], [8, 8]}
              train lr = {0.01, 0.002}, epochs = 6, patience = 0
              ensemble 3')",
        &[],
    )
    .await?;
    let (selection, _) = wait_for_selection(&db, "e2e_ensemble").await?;
    let rows = db
        .query(
            "SELECT version, status::text, rank, ensemble_of, error FROM cerebro.leaderboard WHERE selection = $1
             ORDER BY version",
            &[&selection],
        )
        .await?;
    assert_eq!(rows.len(), 5, "four candidates and the ensemble");
    for r in &rows {
        assert_eq!(r.get::<_, String>(1), "ready", "{:?}", r.get::<_, Option<String>>(4));
    }
    let ensemble: i32 = rows[4].get(0);
    assert_eq!(ensemble, 5);
    let members: serde_json::Value = rows[4].get(3);
    assert!(rows[..4].iter().all(|r| r.get::<_, Option<serde_json::Value>>(3).is_none()));

    // Its pool: the best three candidates by rank, as its request records them.
    let pool: serde_json::Value = db
        .query_one(
            "SELECT request->'ensemble'->'pool' FROM cerebro.model_versions WHERE name = 'e2e_ensemble' AND version = 5",
            &[],
        )
        .await?
        .get(0);
    let mut ranked: Vec<(i32, i32)> = rows[..4].iter().map(|r| (r.get(2), r.get(0))).collect();
    ranked.sort();
    let best3: Vec<i32> = ranked.iter().take(3).map(|&(_, v)| v).collect();
    assert_eq!(pool, serde_json::json!(best3));
    let weights: Vec<(i32, f64)> = members
        .as_array()
        .expect("members")
        .iter()
        .map(|m| (m["version"].as_i64().unwrap() as i32, m["weight"].as_f64().unwrap()))
        .collect();
    assert!(!weights.is_empty() && weights.iter().all(|(v, w)| best3.contains(v) && *w > 0.0), "{weights:?}");
    assert!((weights.iter().map(|(_, w)| w).sum::<f64>() - 1.0).abs() < 1e-6, "{weights:?}");
    let lineage: serde_json::Value = db
        .query_one("SELECT ensemble_of FROM cerebro.lineage WHERE name = 'e2e_ensemble' AND version = 5", &[])
        .await?
        .get(0);
    assert_eq!(lineage, members);
    // It trained no epochs of its own, and says what it is instead.
    let progress: String = db
        .query_one("SELECT progress FROM cerebro.models WHERE name = 'e2e_ensemble' AND version = 5", &[])
        .await?
        .get(0);
    assert_eq!(progress, format!("an ensemble of {} versions", weights.len()));
    // Its importance, measured through ONNX Runtime on its validation rows.
    let imp = db
        .query_one(
            "SELECT importance->>'metric', jsonb_array_length(importance->'columns'), (importance->>'rows')::int,
                    surrogate->>'fidelity_metric', (surrogate->>'rows')::int
             FROM cerebro.model_versions WHERE name = 'e2e_ensemble' AND version = 5",
            &[],
        )
        .await?;
    // Of its 1,409 validation rows, a sample sized to its 19 columns and its members.
    let (metric, columns, rows) = (imp.get::<_, String>(0), imp.get::<_, i32>(1), imp.get::<_, i32>(2));
    assert!(metric == "auc" && columns == 19 && (500..=1409).contains(&rows), "{metric} {columns} {rows}");
    // And its rule surrogate, fitted on the training rows.
    assert_eq!((imp.get::<_, String>(3), imp.get::<_, i32>(4)), ("agreement".into(), 7043 - 1409));
    // cerebrod queued it for the role that started the selection.
    let by: (String, String) = {
        let r = db
            .query_one(
                "SELECT created_by::text, current_user::text FROM cerebro.model_versions
                 WHERE name = 'e2e_ensemble' AND version = 5",
                &[],
            )
            .await?;
        (r.get(0), r.get(1))
    };
    assert_eq!(by.0, by.1);
    // Its stacks after the first took the snapshot from cerebrod's memory.
    let cache = db
        .query_one(
            "SELECT snapshot_cache_hits, snapshot_cache_bytes FROM cerebro.selections WHERE id = $1",
            &[&selection],
        )
        .await?;
    let (hits, bytes): (i32, i64) = (cache.get(0), cache.get(1));
    // telco_churn's 7,043 rows of 19 features and the target: well over 100 kB a read.
    assert!(hits >= 1 && bytes >= hits as i64 * 100_000, "{hits} hits, {bytes} bytes");
    // The selection ended after its ensemble.
    let after: bool = db
        .query_one(
            "SELECT s.finished_at >= m.trained_at FROM cerebro.selections s
             JOIN cerebro.model_versions m ON m.selection_id = s.id AND m.version = 5 WHERE s.id = $1",
            &[&selection],
        )
        .await?
        .get(0);
    assert!(after);

    // Its scores are the weighted average of its members' scores, row by row.
    let scores = |v: i32| {
        format!("SELECT key, label, score FROM cerebro.predictions WHERE model = 'e2e_ensemble' AND version = {v}")
    };
    let scored = sql_scores(&db, &scores(ensemble)).await?;
    assert_eq!(scored.len(), 7043);
    let mut average: HashMap<String, f64> = HashMap::new();
    for &(v, w) in &weights {
        for (key, (_, s)) in sql_scores(&db, &scores(v)).await? {
            *average.entry(key).or_default() += w * s;
        }
    }
    for (key, (label, s)) in &scored {
        assert!((s - average[key]).abs() < 1e-5, "row {key}: ensemble {s}, average {}", average[key]);
        assert_eq!(label.as_deref(), Some(if *s >= 0.5 { "Yes" } else { "No" }));
    }
    // It is explained by its members, and completely: each row's
    // contributions add up to its own score.
    let explained = db
        .query(
            "SELECT key, score, explanation FROM cerebro.predictions
             WHERE model = 'e2e_ensemble' AND version = $1 AND explain AND top_k = 19",
            &[&ensemble],
        )
        .await?;
    assert_eq!(explained.len(), 7043);
    for row in &explained {
        let (key, score, e): (String, f64, serde_json::Value) = (row.get(0), row.get(1), row.get(2));
        assert!((score - scored[&key].1).abs() < 1e-9, "row {key}");
        let total = e["baseline"].as_f64().unwrap()
            + e["rest"].as_f64().unwrap()
            + e["contributions"].as_array().unwrap().iter().map(|c| c["contribution"].as_f64().unwrap()).sum::<f64>();
        assert!((total - score).abs() <= 1e-3, "row {key}: {e} adds up to {total}, not {score}");
    }
    // And distilled again on request, through ONNX Runtime.
    let shallow = db.query_one("SELECT leaves, fitted_rows FROM cerebro.distill('e2e_ensemble', 5, 2)", &[]).await?;
    assert!((1..=4).contains(&shallow.get::<_, i32>(0)) && shallow.get::<_, i64>(1) == 7043 - 1409);
    // Deployed, it is what predictions score; exported, it scores the same on its own.
    db.execute("SELECT cerebro.deploy('e2e_ensemble', 5)", &[]).await?;
    let deployed =
        sql_scores(&db, "SELECT key, label, score FROM cerebro.predictions WHERE model = 'e2e_ensemble'").await?;
    assert_eq!(deployed, scored);
    assert_eq!(daemon_scores(&env, "e2e_ensemble", &[])?, scored, "cerebrod score agrees");
    let bytes: Vec<u8> = db.query_one("SELECT cerebro.export_onnx('e2e_ensemble', 5)", &[]).await?.get(0);
    let rows_json: serde_json::Value =
        db.query_one("SELECT json_agg(t) FROM (SELECT * FROM telco_churn LIMIT 500) t", &[]).await?.get(0);
    let python = python_scores(&env, &bytes, &rows_json, "customer_id")?;
    assert_eq!(python.len(), 500);
    for (key, p) in &python {
        assert!((p - scored[key].1).abs() < 1e-6, "row {key}: python {p}, sql {}", scored[key].1);
    }
    // A reproduction weighs the same pool again, to the same result.
    let v6: i32 = db.query_one("SELECT cerebro.reproduce('e2e_ensemble', 5)", &[]).await?.get(0);
    assert_eq!(
        wait_until_done(&db, "e2e_ensemble", v6, TRAIN_TIMEOUT).await?.last().map(String::as_str),
        Some("ready")
    );
    let provenance = "SELECT weights_sha256, metrics, trained_with->'ensemble', artifact_sha256
                      FROM cerebro.model_versions WHERE name = 'e2e_ensemble' AND version = $1";
    let (a, b) = (db.query_one(provenance, &[&5i32]).await?, db.query_one(provenance, &[&v6]).await?);
    assert_eq!(a.get::<_, Option<String>>(0), b.get::<_, Option<String>>(0));
    assert_eq!(a.get::<_, serde_json::Value>(1), b.get::<_, serde_json::Value>(1));
    assert_eq!(a.get::<_, serde_json::Value>(2), b.get::<_, serde_json::Value>(2));
    // Derived from the ensemble, a new version is one network that starts
    // from its best candidate, whose options it carries.
    db.execute(
        "INSERT INTO cerebro.models (name, parent_version, change) VALUES ('e2e_ensemble', 5, 'train lr = 0.003')",
        &[],
    )
    .await?;
    let v7: i32 =
        db.query_one("SELECT max(version) FROM cerebro.models WHERE name = 'e2e_ensemble'", &[]).await?.get(0);
    assert_eq!(
        wait_until_done(&db, "e2e_ensemble", v7, TRAIN_TIMEOUT).await?.last().map(String::as_str),
        Some("ready")
    );
    let warm: serde_json::Value = db
        .query_one(
            "SELECT trained_with->'warm_start' FROM cerebro.model_versions WHERE name = 'e2e_ensemble' AND version = $1",
            &[&v7],
        )
        .await?
        .get(0);
    assert_eq!(warm["from_version"], best3[0], "{warm}");
    assert!(warm["layers"].as_u64().unwrap_or(0) >= 1, "{warm}");
    // A member stays while an ensemble of it does: the ensemble is
    // explained and reproduced by its members.
    let member = weights[0].0;
    let err = db
        .query_one("SELECT cerebro.delete_model('e2e_ensemble', $1)", &[&member])
        .await
        .expect_err("a member of versions 5 and 6");
    let e = err.as_db_error().expect("a server error");
    assert_eq!(e.code().code(), "55000", "{}", e.message());
    assert!(e.message().contains("is a member of ensemble version 5"), "{}", e.message());
    assert!(e.hint().is_some_and(|h| h.contains("cerebro.delete_model('e2e_ensemble', 5)")), "{:?}", e.hint());
    Ok(())
}

/// `rounds`: each round draws the next candidates of the same seeded
/// sequence once the last round is done, on the first round's snapshot,
/// while the budget can hold one more round.
#[tokio::test(flavor = "multi_thread")]
async fn a_selection_draws_rounds_while_its_budget_lasts() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = Daemon::start(&env)?;
    let space = "model hidden = {[8], [16]}
                 train lr = range(1e-3, 3e-2, log), epochs = 4, patience = 0";
    for (name, search) in [
        ("e2e_rounds", "search random(3, seed = 2, rounds = 3)"),
        // Round 1 spends 12 epochs; another would pass the budget of 20.
        ("e2e_rounds_budget", "search random(3, seed = 2, rounds = 5)\nbudget 20 epochs"),
    ] {
        db.execute(
            "INSERT INTO cerebro.models (name, source, target, key, spec)
             VALUES ($1, 'telco_churn', 'churn', 'customer_id', $2)",
            &[&name, &format!("{space}\n{search}")],
        )
        .await?;
    }
    let (selection, _) = wait_for_selection(&db, "e2e_rounds").await?;
    let rows = db
        .query(
            "SELECT m.version, m.status::text, m.request->'selection', m.options->>'learning_rate', m.snapshot_id,
                    m.created_at
             FROM cerebro.model_versions m WHERE m.selection_id = $1 ORDER BY m.version",
            &[&selection],
        )
        .await?;
    assert_eq!(rows.len(), 9, "three rounds of three");
    let snapshot: i64 = rows[0].get(4);
    let mut rates = std::collections::HashSet::new();
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r.get::<_, String>(1), "ready");
        let place: serde_json::Value = r.get(2);
        assert_eq!(place["candidate"], i + 1);
        let round = if i < 3 { serde_json::Value::Null } else { serde_json::json!(i / 3 + 1) };
        assert_eq!(place["round"], round, "{place}");
        assert_eq!(r.get::<_, i64>(4), snapshot, "every round learns from the first one's snapshot");
        assert!(rates.insert(r.get::<_, String>(3)), "each draw is new");
    }
    // A round starts once the one before it is done.
    let round_done = |round: usize| -> anyhow::Result<()> {
        let next: std::time::SystemTime = rows[round * 3].get(5);
        anyhow::ensure!(rows[..round * 3].iter().all(|r| r.get::<_, std::time::SystemTime>(5) < next));
        Ok(())
    };
    round_done(1)?;
    round_done(2)?;
    let candidates: i32 =
        db.query_one("SELECT candidates FROM cerebro.selections WHERE id = $1", &[&selection]).await?.get(0);
    assert_eq!(candidates, 9);
    let strangers: i64 = db
        .query_one(
            "SELECT count(*) FROM cerebro.model_versions WHERE selection_id = $1 AND created_by <> current_user",
            &[&selection],
        )
        .await?
        .get(0);
    assert_eq!(strangers, 0, "later rounds are the selection's creator's");

    let (selection, _) = wait_for_selection(&db, "e2e_rounds_budget").await?;
    let row = db
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE status = 'ready'), sum(epoch)
             FROM cerebro.model_versions WHERE selection_id = $1",
            &[&selection],
        )
        .await?;
    let (count, ready, epochs): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!((count, ready, epochs), (3, 3, 12), "no round that the budget could not hold");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_derived_model_records_its_lineage_and_starts_from_its_parent() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = Daemon::start(&env)?;
    insert(&db, "e2e_lineage", "churn", r#"{"hidden": [32, 16], "epochs": 4}"#).await?;
    assert_eq!(wait_until_done(&db, "e2e_lineage", 1, TRAIN_TIMEOUT).await?.last().map(String::as_str), Some("ready"));

    // No parent named: the latest ready version (1).
    db.execute(
        "INSERT INTO cerebro.models (name, change) VALUES ('e2e_lineage', 'features -female
             model hidden += [8]
             train lr = 3e-4')",
        &[],
    )
    .await?;
    assert_eq!(wait_until_done(&db, "e2e_lineage", 2, TRAIN_TIMEOUT).await?.last().map(String::as_str), Some("ready"));
    let row = db
        .query_one(
            "SELECT parent_version, change, features, options->'hidden', (options->>'learning_rate')::float8,
                    options->>'epochs'
             FROM cerebro.models WHERE name = 'e2e_lineage' AND version = 2",
            &[],
        )
        .await?;
    assert_eq!(row.get::<_, Option<i32>>(0), Some(1));
    assert!(row.get::<_, String>(1).starts_with("features -female"));
    let features: Vec<String> = row.get(2);
    assert!(!features.contains(&"female".to_string()) && features.contains(&"tenure".to_string()), "{features:?}");
    assert_eq!(row.get::<_, serde_json::Value>(3), serde_json::json!([32, 16, 8]));
    assert_eq!((row.get::<_, f64>(4), row.get::<_, String>(5)), (3e-4, "4".to_string()), "the rest is inherited");
    let warm: serde_json::Value = db
        .query_one(
            "SELECT trained_with->'warm_start' FROM cerebro.model_versions WHERE name = 'e2e_lineage' AND version = 2",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(
        (warm["from_version"].as_i64(), warm["layers"].as_i64(), warm["of_layers"].as_i64()),
        (Some(1), Some(1), Some(3)),
        "{warm}"
    );
    let (kept, of) = (warm["input_columns"].as_i64().unwrap(), warm["of_input_columns"].as_i64().unwrap());
    assert!(kept > 0 && kept == of, "every input but female's was the parent's too: {warm}");

    db.execute(
        "INSERT INTO cerebro.models (name, parent_version, change) VALUES ('e2e_lineage', 2, 'train epochs = 2')",
        &[],
    )
    .await?;
    assert_eq!(wait_until_done(&db, "e2e_lineage", 3, TRAIN_TIMEOUT).await?.last().map(String::as_str), Some("ready"));
    type Node = (i32, Option<i32>, i32, Vec<i32>, String);
    let tree: Vec<Node> = db
        .query(
            "SELECT version, parent, depth, path, tree FROM cerebro.lineage WHERE name = 'e2e_lineage' ORDER BY path",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    assert_eq!(
        tree,
        vec![
            (1, None, 0, vec![1], "v1".to_string()),
            (2, Some(1), 1, vec![1, 2], "  v2".to_string()),
            (3, Some(2), 2, vec![1, 2, 3], "    v3".to_string())
        ]
    );

    // Bad changes: a clear error each, and nothing queued.
    for (sql, code) in [
        ("INSERT INTO cerebro.models (name, change) VALUES ('e2e_lineage', 'train lr = {1e-3, 1e-4}')", "22023"),
        (
            "INSERT INTO cerebro.models (name, parent_version, change) VALUES ('e2e_lineage', 99, 'train epochs = 2')",
            "42704",
        ),
        ("INSERT INTO cerebro.models (name, change) VALUES ('e2e_lineage', 'features -no_such_column')", "42703"),
        ("INSERT INTO cerebro.models (name, change) VALUES ('e2e_no_such_model', 'train epochs = 2')", "42704"),
    ] {
        let err = db.execute(sql, &[]).await.expect_err(sql);
        assert_eq!(err.as_db_error().map(|e| e.code().code()), Some(code), "{sql}: {err:?}");
    }
    let versions: i64 =
        db.query_one("SELECT count(*) FROM cerebro.models WHERE name = 'e2e_lineage'", &[]).await?.get(0);
    assert_eq!(versions, 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_specs_are_precise_errors_and_queue_nothing() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let million = format!(
        "model hidden = [{}]",
        (0..6)
            .map(|i| format!("{{{}}}", (1..=10).map(|v| (v * 10 + i).to_string()).collect::<Vec<_>>().join(", ")))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for (spec, code, message) in [
        ("features tenure, no_such_column", "42703", "column \"no_such_column\" does not exist in public.telco_churn"),
        ("train lr = {}", "22023", "an empty set has no value to try"),
        ("train lr = -0.01", "22023", "learning_rate"),
        ("train lr = range(, 1e-2)", "42601", "range needs a lower bound"),
        (million.as_str(), "54000", "this selection expands to 1000000 candidates"),
        ("search random(4)\nensemble 1", "22023", "an ensemble weighs from 2 to 32 of the best candidates"),
        ("search halving(4, rounds = 0)", "22023", "rounds must be a whole number, at least 1 and at most 1000"),
        (
            "features tenure, contract?\nsearch random(4, rounds = 3)",
            "22023",
            "they need one source and no other optional feature group",
        ),
    ] {
        let err = db
            .execute(
                "INSERT INTO cerebro.models (name, source, target, key, spec)
                 VALUES ('e2e_bad_spec', 'telco_churn', 'churn', 'customer_id', $1)",
                &[&spec],
            )
            .await
            .expect_err(spec);
        let e = err.as_db_error().expect("a server error");
        assert_eq!(e.code().code(), code, "{spec}: {}", e.message());
        assert!(e.message().contains(message), "{spec}: {}", e.message());
    }
    let queued: i64 = db
        .query_one(
            "SELECT (SELECT count(*) FROM cerebro.models WHERE name = 'e2e_bad_spec')
                  + (SELECT count(*) FROM cerebro.selections WHERE name = 'e2e_bad_spec')",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(queued, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_memory_budget_splits_a_stack() -> anyhow::Result<()> {
    // 1 MiB holds no churn model's activations: each candidate trains alone.
    let env = Env::from_env().with_config_value("cerebrod-stackmem", "stack_memory_mib", "1")?;
    let db = env.connect().await?;
    let _daemon = Daemon::start(&env)?;
    db.execute(
        "INSERT INTO cerebro.models (name, source, target, key, spec) VALUES ('e2e_stackmem', 'telco_churn', 'churn',
             'customer_id', 'train lr = {0.01, 0.003, 0.001}, epochs = 2')",
        &[],
    )
    .await?;
    let (selection, _) = wait_for_selection(&db, "e2e_stackmem").await?;
    let rows = db
        .query(
            "SELECT m.status::text, (m.trained_with->>'stack')::int FROM cerebro.model_versions m
             WHERE m.selection_id = $1",
            &[&selection],
        )
        .await?;
    let seen: Vec<(String, i32)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(seen, vec![("ready".to_string(), 1); 3]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_query_with_a_join_is_a_source_for_training_scoring_and_selections() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = Daemon::start(&env)?;
    db.batch_execute(
        "DROP TABLE IF EXISTS e2e_contracts;
         CREATE TABLE e2e_contracts AS SELECT DISTINCT contract, length(contract) AS contract_len FROM telco_churn;",
    )
    .await?;
    let query = "(SELECT c.customer_id, c.churn, c.tenure, c.monthly_charges, c.contract, k.contract_len
                 FROM telco_churn c JOIN e2e_contracts k USING (contract))";
    db.execute(
        "INSERT INTO cerebro.models (name, source, target, key, options)
         VALUES ('e2e_query', $1, 'churn', 'customer_id', '{\"epochs\": 3}')",
        &[&query],
    )
    .await?;
    assert_eq!(wait_until_done(&db, "e2e_query", 1, TRAIN_TIMEOUT).await?.last().map(String::as_str), Some("ready"));
    let row = db.query_one("SELECT source, features FROM cerebro.models WHERE name = 'e2e_query'", &[]).await?;
    assert!(row.get::<_, String>(0).starts_with("(SELECT c.customer_id"));
    assert!(row.get::<_, Vec<String>>(1).contains(&"contract_len".to_string()));
    // Scoring runs the query again, as the querying user.
    let scored: i64 = db
        .query_one("SELECT count(*) FROM cerebro.predictions WHERE model = 'e2e_query' AND score BETWEEN 0 AND 1", &[])
        .await?
        .get(0);
    assert_eq!(scored, 7043);

    // A selection over a relation and a query: telco_churn.* from the query
    // is every column of telco_churn the query returns.
    db.execute(
        "INSERT INTO cerebro.models (name, source, target, key, spec) VALUES ('e2e_query_sel', 'telco_churn', 'churn',
             'customer_id', 'source {telco_churn, (SELECT c.*, k.contract_len FROM telco_churn c JOIN e2e_contracts k USING (contract))}
              features telco_churn.*, -total_charges
              train epochs = 2')",
        &[],
    )
    .await?;
    let (selection, _) = wait_for_selection(&db, "e2e_query_sel").await?;
    let rows = db
        .query(
            "SELECT status::text, source, features FROM cerebro.leaderboard WHERE selection = $1 ORDER BY version",
            &[&selection],
        )
        .await?;
    assert_eq!(rows.len(), 2);
    for r in &rows {
        assert_eq!(r.get::<_, String>(0), "ready");
        let features: Vec<String> = r.get(2);
        assert!(features.contains(&"tenure".to_string()) && !features.contains(&"total_charges".to_string()));
        assert!(!features.contains(&"contract_len".to_string()), "telco_churn.* names telco_churn's columns only");
    }

    for (source, code) in [
        ("(SELECT 1 AS churn; DROP TABLE e2e_contracts)", "22023"),
        ("(DELETE FROM e2e_contracts RETURNING *)", "22023"),
        ("(SELECT c.churn, c.churn FROM telco_churn c)", "22023"),
        ("(SELECT churn FROM no_such_table)", "42P01"),
    ] {
        let err = db
            .execute(
                "INSERT INTO cerebro.models (name, source, target) VALUES ('e2e_query_bad', $1, 'churn')",
                &[&source],
            )
            .await
            .expect_err(source);
        assert_eq!(err.as_db_error().map(|e| e.code().code()), Some(code), "{source}: {err:?}");
    }
    let kept: i64 = db.query_one("SELECT count(*) FROM e2e_contracts", &[]).await?.get(0);
    assert_eq!(kept, 3, "nothing in a source query runs but its SELECT");
    Ok(())
}

/// Every object of schema cerebro, described in text, sorted.
async fn describe_schema(db: &tokio_postgres::Client) -> anyhow::Result<Vec<String>> {
    let rows = db
        .query(
            "SELECT format('%s %s', c.relkind, c.relname) FROM pg_class c
                 WHERE c.relnamespace = 'cerebro'::regnamespace
             UNION ALL
             SELECT format('column %s.%s %s %s %s', c.relname, a.attname, format_type(a.atttypid, a.atttypmod),
                           a.attnotnull, pg_get_expr(d.adbin, d.adrelid))
                 FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
                 LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                 WHERE c.relnamespace = 'cerebro'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
             UNION ALL
             SELECT format('constraint %s %s', conname, pg_get_constraintdef(oid)) FROM pg_constraint
                 WHERE connamespace = 'cerebro'::regnamespace
             UNION ALL
             SELECT format('index %s', pg_get_indexdef(indexrelid)) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
                 WHERE c.relnamespace = 'cerebro'::regnamespace
             UNION ALL
             SELECT format('function %s(%s) %s %s', p.proname, pg_get_function_arguments(p.oid),
                           pg_get_function_result(p.oid), p.prosecdef)
                 FROM pg_proc p WHERE p.pronamespace = 'cerebro'::regnamespace
             UNION ALL
             SELECT format('trigger %s', pg_get_triggerdef(t.oid)) FROM pg_trigger t
                 JOIN pg_class c ON c.oid = t.tgrelid
                 WHERE c.relnamespace = 'cerebro'::regnamespace AND NOT t.tgisinternal
             UNION ALL
             SELECT format('dumped %s', x::regclass) FROM pg_extension e, unnest(e.extconfig) x
                 WHERE e.extname = 'cerebro'
             UNION ALL
             SELECT format('grant %s %s', c.relname, c.relacl) FROM pg_class c
                 WHERE c.relnamespace = 'cerebro'::regnamespace AND c.relacl IS NOT NULL",
            &[],
        )
        .await?;
    let mut lines: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    lines.sort();
    Ok(lines)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_made_by_0_1_0_upgrades_to_exactly_the_fresh_schema() -> anyhow::Result<()> {
    let env = Env::from_env();
    let admin = env.connect().await?;
    admin.execute("DROP DATABASE IF EXISTS cerebro_upgrade WITH (FORCE)", &[]).await?;
    admin.execute("CREATE DATABASE cerebro_upgrade", &[]).await?;
    let old = env.connect_to("cerebro_upgrade").await?;
    old.batch_execute("CREATE EXTENSION cerebro VERSION '0.1.0'").await?;
    // A snapshot frozen by 0.1.0: source column names, an enum column (under
    // two domains).
    old.batch_execute(
        "CREATE TYPE public.verdict AS ENUM ('No', 'Yes');
         CREATE DOMAIN public.verdict_d AS public.verdict;
         CREATE DOMAIN public.verdict_dd AS public.verdict_d;
         CREATE TABLE cerebro_data.snapshot_1 (churn public.verdict_dd, \"c1\" integer, tenure numeric);
         INSERT INTO cerebro_data.snapshot_1 VALUES ('Yes', 7, 1.5), ('No', NULL, 2);
         INSERT INTO cerebro.snapshots (id, source_relation, query, data_relation, row_count, created_by)
             VALUES (1, 'public.t', 'SELECT churn, c1, tenure FROM public.t', 'cerebro_data.snapshot_1', 2, 'postgres');",
    )
    .await?;
    old.batch_execute("ALTER EXTENSION cerebro UPDATE").await?;
    let columns: Vec<String> = old.query_one("SELECT columns FROM cerebro.snapshots WHERE id = 1", &[]).await?.get(0);
    assert_eq!(columns, ["churn", "c1", "tenure"]);
    let layout: String = old
        .query_one(
            "SELECT string_agg(attname || ' ' || format_type(atttypid, atttypmod), ', ' ORDER BY attnum)
             FROM pg_attribute WHERE attrelid = 'cerebro_data.snapshot_1'::regclass AND attnum > 0",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(layout, "c1 text, c2 integer, c3 numeric", "renamed, the enum as text");
    let rows: Vec<(String, Option<i32>)> = old
        .query("SELECT c1, c2 FROM cerebro_data.snapshot_1 ORDER BY c1", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows, [("No".to_string(), None), ("Yes".to_string(), Some(7))]);
    let version: String =
        old.query_one("SELECT extversion FROM pg_extension WHERE extname = 'cerebro'", &[]).await?.get(0);
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
    // The e2e database was created fresh at the current version.
    let (upgraded, fresh) = (describe_schema(&old).await?, describe_schema(&admin).await?);
    let only_upgraded: Vec<&String> = upgraded.iter().filter(|l| !fresh.contains(l)).collect();
    let only_fresh: Vec<&String> = fresh.iter().filter(|l| !upgraded.contains(l)).collect();
    assert!(
        only_upgraded.is_empty() && only_fresh.is_empty(),
        "upgraded only: {only_upgraded:#?}\nfresh only: {only_fresh:#?}"
    );
    drop(old);
    admin.execute("DROP DATABASE cerebro_upgrade WITH (FORCE)", &[]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_daemon_for_the_same_database_refuses_to_start() -> anyhow::Result<()> {
    let env = Env::from_env();
    let daemon = Daemon::start(&env)?;
    let out = std::process::Command::new(&env.daemon_bin).arg("--config").arg(&env.config).output()?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another cerebrod"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The first one still serves: its socket accepts connections.
    assert!(UnixStream::connect(&env.socket).is_ok());
    drop(daemon);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn filters_the_foreign_tables_cannot_push_down_raise_no_warning() -> anyhow::Result<()> {
    let env = Env::from_env();
    let (db, notices) = env.connect_recording_notices().await?;
    // A leaderboard query: an expression on a column, a subquery.
    db.query(
        "SELECT name, version FROM cerebro.models
         WHERE (metrics->>'auc')::float8 > 0.5 AND version = (SELECT max(version) FROM cerebro.models)",
        &[],
    )
    .await?;
    let err = db
        .query("SELECT * FROM cerebro.predictions WHERE model = 'no_such_model' AND score * 2 > 1", &[])
        .await
        .expect_err("unknown model");
    assert_eq!(err.code().map(|c| c.code()), Some("42704"));
    let seen = notices.lock().expect("notice log").clone();
    assert!(seen.iter().all(|n| !n.starts_with("WARNING")), "{seen:?}");
    // The thresholds were restored after planning: warnings still reach the client.
    db.batch_execute("DO $$ BEGIN RAISE WARNING 'still heard'; END $$").await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(notices.lock().expect("notice log").iter().any(|n| n == "WARNING: still heard"));
    Ok(())
}

/// `parent_version` with a `spec`: a selection on that version's frozen
/// snapshot. Its candidates read the rows the parent trained on (the source
/// has changed since), with the parent's features unless the spec picks
/// others among the columns frozen then; cerebrod reads the snapshot once.
#[tokio::test(flavor = "multi_thread")]
async fn a_selection_on_a_versions_snapshot_trains_on_its_frozen_rows() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = Daemon::start(&env)?;
    db.batch_execute(
        "DROP TABLE IF EXISTS e2e_onsnap_src;
         CREATE TABLE e2e_onsnap_src AS SELECT * FROM telco_churn;
         INSERT INTO cerebro.models (name, source, target, key, features, options) VALUES ('e2e_onsnap',
             'e2e_onsnap_src', 'churn', 'customer_id', ARRAY['tenure', 'contract', 'monthly_charges'],
             '{\"epochs\": 3}')",
    )
    .await?;
    let seen = wait_until_done(&db, "e2e_onsnap", 1, TRAIN_TIMEOUT).await?;
    assert_eq!(seen.last().map(String::as_str), Some("ready"), "{seen:?}");
    // The source changes; the parent's snapshot does not.
    db.batch_execute("DELETE FROM e2e_onsnap_src WHERE tenure > 12").await?;
    let snapshots = "SELECT count(*) FROM cerebro.snapshots";
    let before: i64 = db.query_one(snapshots, &[]).await?.get(0);

    db.execute(
        "INSERT INTO cerebro.models (name, parent_version, spec) VALUES ('e2e_onsnap', $1,
             'model hidden = {[8], [16]}
              train lr = {0.01, 0.003}, epochs = 3, patience = 0')",
        &[&1i32],
    )
    .await?;
    let (selection, _) = wait_for_selection(&db, "e2e_onsnap").await?;
    assert_eq!(db.query_one(snapshots, &[]).await?.get::<_, i64>(0), before, "no snapshot frozen");
    let rows = db
        .query(
            "SELECT m.version, m.status::text, m.snapshot_id = p.snapshot_id, s.row_count,
                    ARRAY(SELECT f->>'name' FROM jsonb_array_elements(m.features) f), m.target_column, m.error
             FROM cerebro.model_versions m JOIN cerebro.snapshots s ON s.id = m.snapshot_id
             JOIN cerebro.model_versions p ON p.name = m.name AND p.version = 1
             WHERE m.selection_id = $1 ORDER BY m.version",
            &[&selection],
        )
        .await?;
    assert_eq!(rows.len(), 4, "four candidates");
    for r in &rows {
        let (status, same, frozen_rows) = (r.get::<_, String>(1), r.get::<_, bool>(2), r.get::<_, i64>(3));
        assert_eq!(status, "ready", "{:?}", r.get::<_, Option<String>>(6));
        assert!(same, "version {} trains on the parent's snapshot", r.get::<_, i32>(0));
        assert_eq!(frozen_rows, 7043, "the rows frozen before the DELETE");
        assert_eq!(r.get::<_, Vec<String>>(4), ["tenure", "contract", "monthly_charges"]);
        assert_eq!(r.get::<_, String>(5), "churn");
    }
    // cerebrod read the snapshot for the parent; the candidates took it from memory.
    let hits: i32 =
        db.query_one("SELECT snapshot_cache_hits FROM cerebro.selections WHERE id = $1", &[&selection]).await?.get(0);
    assert!(hits >= 1, "{hits} cache hits");

    // Columns frozen with the parent only; no source, no change with it.
    for (spec, code, says) in [
        (
            "features tenure, total_charges\nmodel hidden = [8]",
            "42703",
            "column \"total_charges\", which was not frozen",
        ),
        ("source telco_churn\nmodel hidden = [8]", "22023", "it cannot name a source"),
    ] {
        let err = db
            .execute("INSERT INTO cerebro.models (name, parent_version, spec) VALUES ('e2e_onsnap', 1, $1)", &[&spec])
            .await
            .expect_err(spec);
        let e = err.as_db_error().expect("a server error");
        assert_eq!(e.code().code(), code, "{spec}: {}", e.message());
        assert!(e.message().contains(says), "{spec}: {}", e.message());
        assert!(e.hint().is_some(), "{spec}");
    }
    let err = db
        .execute(
            "INSERT INTO cerebro.models (name, parent_version, change, spec) VALUES ('e2e_onsnap', 1, 'train lr = 0.01',
                 'model hidden = [8]')",
            &[],
        )
        .await
        .expect_err("a change and a spec");
    assert_eq!(err.code().map(|c| c.code()), Some("22023"), "{err}");
    Ok(())
}

/// `features joins(auto)` on a schema with declared keys: a one-column
/// key, a NOT VALID one with orphans, a composite one, and a second hop.
/// The tiny table behind a categorical key is pruned by the tuple ratio
/// rule, the others are searched with and without, the plan says which and
/// why, and the winner (the join that decides the target) scores through
/// its query source.
#[tokio::test(flavor = "multi_thread")]
async fn joins_auto_follows_declared_foreign_keys_and_prunes_small_tables() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = Daemon::start(&env)?;
    db.batch_execute(
        "DROP SCHEMA IF EXISTS e2e_shop CASCADE;
         CREATE SCHEMA e2e_shop;
         SELECT setseed(0.25);
         CREATE TABLE e2e_shop.regions (code text PRIMARY KEY, tax float8);
         INSERT INTO e2e_shop.regions VALUES ('n', 0.1), ('s', 0.2), ('e', 0.15), ('w', 0.05);
         CREATE TABLE e2e_shop.customers (id integer PRIMARY KEY, segment text, age float8,
             region text REFERENCES e2e_shop.regions);
         INSERT INTO e2e_shop.customers
         SELECT i, (ARRAY['home', 'pro'])[1 + i % 2], 18 + (i * 37) % 60, (ARRAY['n', 's', 'e', 'w'])[1 + i % 4]
         FROM generate_series(1, 400) i;
         CREATE TABLE e2e_shop.stores (store text PRIMARY KEY, size float8);
         INSERT INTO e2e_shop.stores SELECT 'st' || i, i * 100 FROM generate_series(1, 5) i;
         CREATE TABLE e2e_shop.promos (store text, week integer, discount float8, PRIMARY KEY (store, week));
         INSERT INTO e2e_shop.promos SELECT 'st' || s, w, round(random()::numeric, 2)
         FROM generate_series(1, 5) s, generate_series(1, 520) w;
         CREATE TABLE e2e_shop.orders (id integer PRIMARY KEY, customer_id integer, store text
             REFERENCES e2e_shop.stores, week integer, amount float8, returned boolean,
             FOREIGN KEY (store, week) REFERENCES e2e_shop.promos);
         INSERT INTO e2e_shop.orders
         SELECT i, 1 + (i * 7) % 410, 'st' || (1 + floor(random() * 5)), 1 + floor(random() * 520), (i % 97) + 1,
                false
         FROM generate_series(1, 3000) i;
         -- Whether an order is returned is decided by its promotion alone, of
         -- 2,600 (store, week) pairs: too many to learn from the key.
         UPDATE e2e_shop.orders o SET returned = p.discount > 0.5
         FROM e2e_shop.promos p WHERE p.store = o.store AND p.week = o.week;
         -- Ten customers are missing: the key is declared without checking the rows.
         ALTER TABLE e2e_shop.orders ADD FOREIGN KEY (customer_id) REFERENCES e2e_shop.customers NOT VALID;
         CREATE VIEW e2e_shop.orders_view AS SELECT * FROM e2e_shop.orders;",
    )
    .await?;
    let (client, notices) = env.connect_recording_notices().await?;
    client
        .execute(
            "INSERT INTO cerebro.models (name, source, target, key, spec) VALUES ('e2e_joins', 'e2e_shop.orders',
                 'returned', 'id', 'features joins(auto, hops = 2)
                                    model hidden = [32]
                                    train lr = 0.01, epochs = 12, patience = 0')",
            &[],
        )
        .await?;
    let said = notices.lock().expect("notices").join("\n");
    assert!(said.contains("joins(auto) searches with and without 2 join(s)"), "{said}");
    let (selection, _) = wait_for_selection(&db, "e2e_joins").await?;

    let plan: serde_json::Value =
        db.query_one("SELECT plan->'joins' FROM cerebro.selections WHERE id = $1", &[&selection]).await?.get(0);
    let kept: Vec<(String, serde_json::Value)> = plan["kept"]
        .as_array()
        .expect("kept joins")
        .iter()
        .map(|j| (j["prefix"].as_str().unwrap_or_default().to_string(), j["on"].clone()))
        .collect();
    assert_eq!(
        kept,
        [
            ("customers".to_string(), serde_json::json!(["customer_id"])),
            ("promos".to_string(), serde_json::json!(["store", "week"])),
        ],
        "{plan}"
    );
    let pruned: Vec<(&str, u64)> = plan["pruned"]
        .as_array()
        .expect("pruned joins")
        .iter()
        .map(|p| (p["table"].as_str().unwrap_or_default(), p["hop"].as_u64().unwrap_or(0)))
        .collect();
    // stores: 5 rows for 3,000 orders, behind the categorical store; regions
    // (hop 2): 4 rows behind the customers' region.
    assert_eq!(pruned, [("e2e_shop.stores", 1), ("e2e_shop.regions", 2)], "{plan}");
    assert!(plan["pruned"][0]["why"].as_str().unwrap_or_default().contains("tuple ratio 600"), "{plan}");

    // Four candidates: with and without each join.
    let rows = db
        .query(
            "SELECT m.version, m.status::text, m.error,
                    ARRAY(SELECT f->>'name' FROM jsonb_array_elements(m.features) f), l.rank
             FROM cerebro.model_versions m JOIN cerebro.leaderboard l ON l.name = m.name AND l.version = m.version
             WHERE m.selection_id = $1 ORDER BY l.rank",
            &[&selection],
        )
        .await?;
    let mut combinations = Vec::new();
    for r in &rows {
        assert_eq!(r.get::<_, String>(1), "ready", "{:?}", r.get::<_, Option<String>>(2));
        let features: Vec<String> = r.get(3);
        assert!(features.contains(&"store".to_string()) && features.contains(&"customer_id".to_string()));
        assert!(!features.iter().any(|f| f.starts_with("stores__")), "pruned: {features:?}");
        combinations.push((
            features.contains(&"customers__age".to_string()),
            features.contains(&"promos__discount".to_string()),
        ));
    }
    combinations.sort();
    assert_eq!(combinations, [(false, false), (false, true), (true, false), (true, true)]);
    // The promotion decides the target: the best candidates have it.
    let best: Vec<String> = rows[0].get(3);
    assert!(best.contains(&"promos__discount".to_string()), "{best:?}");

    // Scoring reads the query the plan wrote, every order once.
    let version: i32 = rows[0].get(0);
    let scored: i64 = db
        .query_one("SELECT count(*) FROM cerebro.predictions WHERE model = 'e2e_joins' AND version = $1", &[&version])
        .await?
        .get(0);
    assert_eq!(scored, 3000);

    // Another table of the orders' shape, without the joined columns, is
    // scored through the same joins: every candidate scores its rows as it
    // scores them in its own source, whole and by key.
    db.batch_execute(
        "CREATE TABLE e2e_shop.new_orders (LIKE e2e_shop.orders);
         INSERT INTO e2e_shop.new_orders SELECT * FROM e2e_shop.orders WHERE id % 10 = 0;",
    )
    .await?;
    let scores = |source: Option<&'static str>, version: i32| {
        let db = &db;
        async move {
            let rows = match source {
                Some(source) => {
                    db.query(
                        "SELECT key, score FROM cerebro.predictions
                         WHERE model = 'e2e_joins' AND version = $1 AND source = $2",
                        &[&version, &source],
                    )
                    .await?
                }
                None => {
                    db.query(
                        "SELECT key, score FROM cerebro.predictions WHERE model = 'e2e_joins' AND version = $1",
                        &[&version],
                    )
                    .await?
                }
            };
            anyhow::Ok(rows.iter().map(|r| (r.get::<_, String>(0), r.get::<_, f64>(1))).collect::<HashMap<_, _>>())
        }
    };
    for r in &rows {
        let version: i32 = r.get(0);
        let own = scores(None, version).await?;
        let new = scores(Some("e2e_shop.new_orders"), version).await?;
        assert_eq!(new.len(), 300, "version {version}");
        for (key, score) in &new {
            assert_eq!(Some(score), own.get(key), "version {version}, order {key}");
        }
    }
    let by_key: f64 = db
        .query_one(
            "SELECT score FROM cerebro.predictions
             WHERE model = 'e2e_joins' AND version = $1 AND source = 'e2e_shop.new_orders' AND key = '20'",
            &[&version],
        )
        .await?
        .get(0);
    assert_eq!(Some(&by_key), scores(None, version).await?.get("20"));
    // One new order's row, as an application passes it, is read through the
    // same joins by cerebro.predict, and scores as the scan scores it.
    for r in &rows {
        let version: i32 = r.get(0);
        let own = scores(None, version).await?;
        let predicted = db
            .query("SELECT o.id::text, cerebro.predict('e2e_joins', o, $1) FROM e2e_shop.new_orders o", &[&version])
            .await?;
        assert_eq!(predicted.len(), 300, "version {version}");
        for p in &predicted {
            let (key, score): (String, f64) = (p.get(0), p.get(1));
            let expected = own[&key];
            assert!((score - expected).abs() <= 1e-6, "version {version}, order {key}: {score} against {expected}");
        }
    }
    // The same joins with a key of another type (week a numeric): another
    // plan, not the one kept for integer weeks, and the same scores.
    let own = scores(None, version).await?;
    let retyped = db
        .query(
            "SELECT r.id::text, cerebro.predict('e2e_joins', r, $1)
             FROM (SELECT id, customer_id, store, week::numeric AS week, amount, returned FROM e2e_shop.new_orders) r",
            &[&version],
        )
        .await?;
    assert_eq!(retyped.len(), 300);
    for p in &retyped {
        let (key, score): (String, f64) = (p.get(0), p.get(1));
        assert!((score - own[&key]).abs() <= 1e-6, "order {key}: {score} against {}", own[&key]);
    }
    let err = db
        .query_one(
            "SELECT cerebro.predict('e2e_joins', r, $1) FROM (SELECT id, week FROM e2e_shop.new_orders LIMIT 1) r",
            &[&version],
        )
        .await
        .expect_err("a row without the model's columns");
    assert_eq!(err.code().map(|c| c.code()), Some("42703"), "{err:?}");
    // A row without a key the joins start from, where the version reads
    // the key only through its joins: the error names the key.
    db.execute(
        "INSERT INTO cerebro.models (name, source, target, key, spec)
         VALUES ('e2e_joins_keyless', 'e2e_shop.orders', 'returned', 'id',
                 E'model hidden = {[8]}\ntrain epochs = 1\nfeatures amount, joins(auto)')",
        &[],
    )
    .await?;
    let keyless: i32 = db
        .query_one(
            "SELECT min(version) FROM cerebro.model_versions
             WHERE name = 'e2e_joins_keyless' AND features::text LIKE '%customers__age%'
               AND features::text NOT LIKE '%stores__%' AND features::text NOT LIKE '%promos__%'",
            &[],
        )
        .await?
        .get(0);
    let seen = wait_until_done(&db, "e2e_joins_keyless", keyless, TRAIN_TIMEOUT).await?;
    assert_eq!(seen.last().map(String::as_str), Some("ready"), "{seen:?}");
    let err = db
        .query_one(
            "SELECT cerebro.predict('e2e_joins_keyless', r, $1)
             FROM (SELECT id, store, week, amount FROM e2e_shop.new_orders LIMIT 1) r",
            &[&keyless],
        )
        .await
        .expect_err("a row without the customer the customers are joined on");
    let message = err.as_db_error().map(|e| e.message().to_owned()).unwrap_or_default();
    assert_eq!(err.code().map(|c| c.code()), Some("42703"), "{err:?}");
    assert!(message.contains("which start from column \"customer_id\""), "{message}");
    // It reads only the customers: a row without the store and week the
    // other candidates' joins start from scores as the scan does.
    let alone: f64 = db
        .query_one(
            "SELECT cerebro.predict('e2e_joins_keyless', r, $1)
             FROM (SELECT id, customer_id, amount FROM e2e_shop.new_orders WHERE id = 20) r",
            &[&keyless],
        )
        .await?
        .get(0);
    let scanned: f64 = db
        .query_one(
            "SELECT score FROM cerebro.predictions WHERE model = 'e2e_joins_keyless' AND version = $1 AND key = '20'",
            &[&keyless],
        )
        .await?
        .get(0);
    assert!((alone - scanned).abs() < 1e-6, "{alone} against {scanned}");
    // Columns the joins do not add are still missing, and said.
    let err = db
        .query(
            "SELECT score FROM cerebro.predictions
             WHERE model = 'e2e_joins' AND version = $1 AND source = '(SELECT id, week FROM e2e_shop.new_orders)'",
            &[&version],
        )
        .await
        .expect_err("a source without the model's columns");
    assert_eq!(err.code().map(|c| c.code()), Some("42703"), "{err:?}");

    // An integer key is a number, which the pruning rule cannot count on to
    // stand in for its join, until the spec encodes it as a category.
    db.batch_execute(
        "CREATE TABLE e2e_shop.tiers (tier integer PRIMARY KEY, discount float8);
         INSERT INTO e2e_shop.tiers VALUES (1, 0), (2, 0.1), (3, 0.2);
         CREATE TABLE e2e_shop.members (id integer PRIMARY KEY, tier integer REFERENCES e2e_shop.tiers,
             spent float8, left_us boolean);
         INSERT INTO e2e_shop.members SELECT i, 1 + i % 3, i % 50, i % 7 = 0 FROM generate_series(1, 300) i;",
    )
    .await?;
    for (name, encode, kept) in [("e2e_tiers", "", true), ("e2e_tiers_category", "encode tier = category", false)] {
        db.execute(
            &format!(
                "INSERT INTO cerebro.models (name, source, target, key, spec) VALUES ('{name}', 'e2e_shop.members',
                     'left_us', 'id', 'features joins(auto)
                                       {encode}
                                       train epochs = 1')"
            ),
            &[],
        )
        .await?;
        let (selection, _) = wait_for_selection(&db, name).await?;
        let joins: serde_json::Value =
            db.query_one("SELECT plan->'joins' FROM cerebro.selections WHERE id = $1", &[&selection]).await?.get(0);
        let tiers_kept = joins["kept"].as_array().is_some_and(|k| k.iter().any(|j| j["prefix"] == "tiers"));
        assert_eq!(tiers_kept, kept, "{name}: {joins}");
    }

    // A view has no keys; a selection on a snapshot and a change cannot join.
    for (sql, code, says) in [
        (
            "INSERT INTO cerebro.models (name, source, target, key, spec) VALUES ('e2e_joins_view',
                 'e2e_shop.orders_view', 'returned', 'id', 'features joins(auto)')",
            "0A000",
            "is a view",
        ),
        (
            "INSERT INTO cerebro.models (name, parent_version, spec) VALUES ('e2e_joins', 1, 'features joins(auto)')",
            "22023",
            "cannot name joins(auto)",
        ),
        (
            "INSERT INTO cerebro.models (name, source, target, key, spec) VALUES ('e2e_joins_q',
                 '(SELECT * FROM e2e_shop.orders)', 'returned', 'id', 'features joins(auto)')",
            "0A000",
            "is a query",
        ),
    ] {
        let err = db.execute(sql, &[]).await.expect_err(sql);
        let e = err.as_db_error().expect("a server error");
        assert_eq!(e.code().code(), code, "{sql}: {}", e.message());
        assert!(e.message().contains(says), "{sql}: {}", e.message());
        assert!(e.hint().is_some(), "{sql}");
    }
    Ok(())
}

/// `train warm_start = true`: a selection's candidate that differs from
/// an archived version of its model only in parameter tuning continues
/// from the best such version's weights; one with another network starts
/// afresh.
#[tokio::test(flavor = "multi_thread")]
async fn warm_started_candidates_continue_from_versions_that_differ_only_in_tuning() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = Daemon::start(&env)?;
    db.execute(
        "INSERT INTO cerebro.models (name, source, target, key, spec) VALUES ('e2e_warm', 'telco_churn', 'churn',
             'customer_id', 'features tenure, contract, monthly_charges
                             model hidden = [16]
                             train lr = {0.01, 0.003}, epochs = 3, patience = 0')",
        &[],
    )
    .await?;
    let first = wait_for_selection(&db, "e2e_warm").await?.0;
    let (client, notices) = env.connect_recording_notices().await?;
    client
        .execute(
            "INSERT INTO cerebro.models (name, source, target, key, spec) VALUES ('e2e_warm', 'telco_churn',
                 'churn', 'customer_id', 'features tenure, contract, monthly_charges
                                         model hidden = {[16], [32]}
                                         train lr = 0.001, epochs = 2, patience = 0, warm_start = true')",
            &[],
        )
        .await?;
    let said = notices.lock().expect("notices").join("\n");
    assert!(said.contains("warm_start: 1 of 2 candidate(s) continue"), "{said}");
    let second = wait_for_selection(&db, "e2e_warm").await?.0;
    assert_ne!(first, second);

    // The best of the first selection, by validation AUC.
    let best: i32 = db
        .query_one(
            "SELECT version FROM cerebro.model_versions WHERE selection_id = $1
             ORDER BY (metrics->>'auc')::float8 DESC, version DESC LIMIT 1",
            &[&first],
        )
        .await?
        .get(0);
    let rows = db
        .query(
            "SELECT options->'hidden', parent_version, trained_with->'warm_start', status::text, error
             FROM cerebro.model_versions WHERE selection_id = $1 ORDER BY version",
            &[&second],
        )
        .await?;
    assert_eq!(rows.len(), 2);
    for r in &rows {
        assert_eq!(r.get::<_, String>(3), "ready", "{:?}", r.get::<_, Option<String>>(4));
        let warm: Option<serde_json::Value> = r.get(2);
        match r.get::<_, serde_json::Value>(0).to_string().as_str() {
            "[16]" => {
                assert_eq!(r.get::<_, Option<i32>>(1), Some(best), "the best archived version");
                let warm = warm.expect("a warm start");
                assert_eq!(warm["from_version"], best);
                assert_eq!(warm["layers"], warm["of_layers"], "every layer copied: {warm}");
            }
            other => {
                assert_eq!(other, "[32]");
                assert_eq!(r.get::<_, Option<i32>>(1), None, "another network starts afresh");
                assert!(warm.is_none(), "{warm:?}");
            }
        }
    }
    // A warm-started candidate is the archived version's child in the lineage.
    let children: i64 = db
        .query_one(
            "SELECT count(*) FROM cerebro.model_versions WHERE name = 'e2e_warm' AND parent_version = $1",
            &[&best],
        )
        .await?
        .get(0);
    assert_eq!(children, 1);

    // A plain INSERT continues from the best such version too.
    client
        .execute(
            "INSERT INTO cerebro.models (name, source, target, key, features, options) VALUES ('e2e_warm',
                 'telco_churn', 'churn', 'customer_id', ARRAY['tenure', 'contract', 'monthly_charges'],
                 '{\"hidden\": [16], \"learning_rate\": 0.0005, \"epochs\": 1, \"patience\": 0, \"warm_start\": true}')",
            &[],
        )
        .await?;
    let version: i32 =
        db.query_one("SELECT max(version) FROM cerebro.model_versions WHERE name = 'e2e_warm'", &[]).await?.get(0);
    let seen = wait_until_done(&db, "e2e_warm", version, TRAIN_TIMEOUT).await?;
    assert_eq!(seen.last().map(String::as_str), Some("ready"), "{seen:?}");
    let row = db
        .query_one(
            "SELECT p.options->'hidden', m.trained_with->'warm_start'->'from_version' = to_jsonb(p.version)
             FROM cerebro.model_versions m JOIN cerebro.model_versions p ON p.name = m.name AND p.version = m.parent_version
             WHERE m.name = 'e2e_warm' AND m.version = $1",
            &[&version],
        )
        .await?;
    assert_eq!(row.get::<_, serde_json::Value>(0), serde_json::json!([16]));
    assert!(row.get::<_, bool>(1), "trained_with names the version it continued from");
    Ok(())
}

/// Meta-features are measured when a snapshot is frozen, and
/// `cerebro.recommend` ranks the best version of each archived task of the
/// same kind by how near its meta-features are to a new source's.
#[tokio::test(flavor = "multi_thread")]
async fn recommendations_come_from_the_nearest_archived_tasks() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = Daemon::start(&env)?;
    // Two archived tasks: one shaped like the new source, one not.
    db.batch_execute(
        "DROP TABLE IF EXISTS e2e_rec_like, e2e_rec_unlike, e2e_rec_new;
         SELECT setseed(0.5);
         CREATE TABLE e2e_rec_like AS
         SELECT i AS id, random() AS a, random() AS b, CASE WHEN i % 10 = 0 THEN NULL ELSE random() END AS c,
                (ARRAY['x', 'y', 'z'])[1 + i % 3] AS kind, (i % 4 = 0) AS label
         FROM generate_series(1, 4000) i;
         CREATE TABLE e2e_rec_new AS SELECT id + 10000 AS id, a, b, c, kind, label FROM e2e_rec_like;
         CREATE TABLE e2e_rec_unlike AS
         SELECT i AS id, random() AS a, random() AS b, random() AS d, random() AS e, random() AS f, random() AS g,
                random() AS h, random() AS j, (i % 2 = 0) AS label
         FROM generate_series(1, 300) i;
         INSERT INTO cerebro.models (name, source, target, key, options) VALUES
             ('e2e_rec_like', 'e2e_rec_like', 'label', 'id', '{\"epochs\": 2}'),
             ('e2e_rec_unlike', 'e2e_rec_unlike', 'label', 'id', '{\"epochs\": 2}');",
    )
    .await?;
    for name in ["e2e_rec_like", "e2e_rec_unlike"] {
        let v: i32 = db.query_one("SELECT max(version) FROM cerebro.models WHERE name = $1", &[&name]).await?.get(0);
        let seen = wait_until_done(&db, name, v, TRAIN_TIMEOUT).await?;
        assert_eq!(seen.last().map(String::as_str), Some("ready"), "{name}: {seen:?}");
    }
    let meta: serde_json::Value = db
        .query_one(
            "SELECT s.meta FROM cerebro.snapshots s JOIN cerebro.model_versions m ON m.snapshot_id = s.id
             WHERE m.name = 'e2e_rec_like' ORDER BY m.version DESC LIMIT 1",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(
        (&meta["task"], &meta["rows"], &meta["numeric"], &meta["categorical"], &meta["classes"]),
        (
            &serde_json::json!("binary"),
            &serde_json::json!(4000),
            &serde_json::json!(3),
            &serde_json::json!(1),
            &serde_json::json!(2)
        ),
        "{meta}"
    );
    let share = meta["minority_share"].as_f64().unwrap();
    assert!((share - 0.25).abs() < 1e-9, "{meta}");
    let nulls = meta["null_share"].as_f64().unwrap();
    assert!((nulls - 400.0 / 16000.0).abs() < 1e-9, "{meta}");
    assert!((meta["mean_cardinality"].as_f64().unwrap() - 3.0).abs() < 1e-9, "{meta}");

    // Asked with parameters, as an application asks.
    let rows = db
        .query(
            "SELECT rank, model, version, distance, metric, value, features, options, why
             FROM cerebro.recommend($1, $2, k => $3, key => $4)",
            &[&"e2e_rec_new", &"label", &50i32, &"id"],
        )
        .await?;
    assert!(!rows.is_empty());
    let first = &rows[0];
    assert_eq!((first.get::<_, i32>(0), first.get::<_, String>(1)), (1, "e2e_rec_like".to_string()));
    assert!(first.get::<_, f64>(3) < 0.05, "the same shape: {}", first.get::<_, f64>(3));
    assert_eq!(first.get::<_, String>(4), "auc");
    assert_eq!(first.get::<_, Vec<String>>(6), ["a", "b", "c", "kind"]);
    assert_eq!(first.get::<_, serde_json::Value>(7)["epochs"], 2);
    assert!(first.get::<_, String>(8).contains("\"e2e_rec_like\" version"), "{}", first.get::<_, String>(8));
    let distances: Vec<f64> = rows.iter().map(|r| r.get(3)).collect();
    assert!(distances.windows(2).all(|w| w[0] <= w[1]), "nearest first: {distances:?}");
    let unlike = rows.iter().position(|r| r.get::<_, String>(1) == "e2e_rec_unlike").expect("every binary task ranked");
    assert!(unlike > 0 && distances[unlike] > 0.5, "{distances:?}");
    assert!(rows.iter().all(|r| r.get::<_, String>(4) == "auc"), "binary tasks only");
    // The portfolio the extension ships is ranked with the archive.
    let built_in = rows.iter().find(|r| r.get::<_, String>(1) == "(built in) telco_churn").expect("shipped");
    assert_eq!(built_in.get::<_, i32>(2), 0);
    assert!(
        built_in.get::<_, String>(8).starts_with("built in, the best candidate"),
        "{}",
        built_in.get::<_, String>(8)
    );
    assert_eq!(db.query("SELECT * FROM cerebro.recommend('e2e_rec_new', 'label', 1)", &[]).await?.len(), 1);
    // Without the key, the id is a feature: the same task looks a little further.
    let keyless: f64 =
        db.query_one("SELECT distance FROM cerebro.recommend('e2e_rec_new', 'label', 1)", &[]).await?.get(0);
    assert!(keyless > first.get::<_, f64>(3), "{keyless}");
    // Models left out by the setting are not recommended, built in or not.
    db.batch_execute("SET cerebro.recommend_exclude = 'e2e_rec_like, (built in) telco_churn'").await?;
    let left: Vec<String> = db
        .query("SELECT model FROM cerebro.recommend('e2e_rec_new', 'label', 50, key => 'id')", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left.len(), rows.len() - 2, "{left:?}");
    assert!(!left.iter().any(|m| m == "e2e_rec_like" || m == "(built in) telco_churn"), "{left:?}");
    db.batch_execute("RESET cerebro.recommend_exclude").await?;
    // The INSERT's task decides what is recommended: an integer target of
    // 4,000 values is a regression when the INSERT says so (task auto would
    // refuse it as too many classes). Rolled back: only the INSERT is tried.
    db.batch_execute(
        "BEGIN;
         INSERT INTO cerebro.models (name, source, target, task, spec)
             VALUES ('e2e_rec_regression', 'e2e_rec_new', 'id', 'regression', 'recommended');
         ROLLBACK;",
    )
    .await?;

    // spec = 'recommended': a selection around what was recommended,
    // written out in the selection's plan.
    db.execute(
        "INSERT INTO cerebro.models (name, source, target, key, spec)
         VALUES ('e2e_rec_sel', 'e2e_rec_new', 'label', 'id', 'recommended')",
        &[],
    )
    .await?;
    let plan = db
        .query_one(
            "SELECT id, spec, plan->>'searched', candidates FROM cerebro.selections WHERE name = 'e2e_rec_sel'",
            &[],
        )
        .await?;
    let searched: String = plan.get(2);
    assert_eq!(plan.get::<_, String>(1), "recommended");
    assert!(searched.starts_with("model  hidden = {[64, 32]"), "the recommended versions' layers: {searched}");
    assert!(searched.contains("search halving(12"), "{searched}");
    assert_eq!(plan.get::<_, i32>(3), 12);
    db.execute("SELECT cerebro.cancel_selection($1)", &[&plan.get::<_, i64>(0)]).await?;

    for (call, code) in [
        ("SELECT * FROM cerebro.recommend('e2e_rec_new', 'label', 0)", "22023"),
        ("SELECT * FROM cerebro.recommend('e2e_rec_missing', 'label')", "42P01"),
        ("SELECT * FROM cerebro.recommend('e2e_rec_new', 'nope')", "42703"),
        ("SELECT * FROM cerebro.recommend('e2e_rec_new', 'label', key => 'nope')", "42703"),
    ] {
        let err = db.query(call, &[]).await.expect_err(call);
        assert_eq!(err.code().map(|c| c.code()), Some(code), "{call}: {err}");
    }
    Ok(())
}

/// The importance and metrics cerebrod stores of an import with a target
/// once its import commits: waits for the metrics (an import has none
/// before), for at most a minute.
async fn import_measured(
    db: &tokio_postgres::Client,
    name: &str,
    version: i32,
) -> anyhow::Result<(Option<serde_json::Value>, serde_json::Value)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let row = db
            .query_one(
                "SELECT importance, metrics FROM cerebro.model_versions WHERE name = $1 AND version = $2",
                &[&name, &version],
            )
            .await?;
        if let Some(metrics) = row.get::<_, Option<serde_json::Value>>(1) {
            return Ok((row.get(0), metrics));
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("cerebrod did not measure {name} version {version} within a minute of its import");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
