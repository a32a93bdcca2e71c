//! One row's score for application code (issue 15): `cerebro.predict`,
//! `cerebro.predict_label` and `cerebro.predict_proba` equal
//! `cerebro.predictions` row for row (scored in the backend, or by cerebrod
//! for an imported graph), follow deployments from one statement to the
//! next, go on scoring in the backend while cerebrod is down and survive a
//! restart of cerebrod in the same session, work prepared, and fail
//! precisely; and by-key predictions find their rows through the source's
//! index.

use std::collections::HashMap;
use std::time::Duration;

use cerebro_tests::{wait_until_done, Daemon, Env};
use tokio_postgres::Client;

const TRAIN_TIMEOUT: Duration = Duration::from_secs(300);

/// Trains a model of `target` on telco_churn and waits until it is ready.
async fn train(db: &Client, name: &str, target: &str, options: &str) -> anyhow::Result<i32> {
    db.execute(
        "INSERT INTO cerebro.models (name, source, target, key, options)
         VALUES ($1, 'telco_churn', $2, 'customer_id', $3::text::jsonb)",
        &[&name, &target, &options],
    )
    .await?;
    let version: i32 = db.query_one("SELECT max(version) FROM cerebro.models WHERE name = $1", &[&name]).await?.get(0);
    let seen = wait_until_done(db, name, version, TRAIN_TIMEOUT).await?;
    anyhow::ensure!(seen.last().map(String::as_str) == Some("ready"), "{name} v{version}: {seen:?}");
    Ok(version)
}

type Scores = HashMap<String, (Option<String>, f64)>;

async fn scores(db: &Client, query: &str) -> anyhow::Result<Scores> {
    Ok(db
        .query(query, &[])
        .await?
        .into_iter()
        .map(|r| (r.get::<_, String>(0), (r.get::<_, Option<String>>(1), r.get::<_, f64>(2))))
        .collect())
}

/// Every key of `b` in `a`, with the same label and a score equal to 1e-6
/// (ONNX Runtime may sum in another order for one row than for a batch).
fn assert_same(a: &Scores, b: &Scores, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (key, (label, score)) in b {
        let (l, s) = a.get(key).unwrap_or_else(|| panic!("{what}: key {key} missing"));
        assert_eq!(l, label, "{what}: key {key}");
        assert!((s - score).abs() <= 1e-6 * score.abs().max(1.0), "{what}: key {key}: {s} against {score}");
    }
}

/// Each key's explanation.
async fn explanations_of(db: &Client, sql: &str) -> anyhow::Result<HashMap<String, serde_json::Value>> {
    let rows = db.query(sql, &[]).await?;
    Ok(rows.iter().map(|r| (r.get::<_, String>(0), r.get::<_, serde_json::Value>(1))).collect())
}

/// The same JSON, numbers equal to 1e-6 (relative to at least 1).
fn assert_close_json(a: &serde_json::Value, b: &serde_json::Value, what: &str) {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap_or(f64::NAN), y.as_f64().unwrap_or(f64::NAN));
            assert!((x - y).abs() <= 1e-6 * x.abs().max(1.0), "{what}: {x} against {y}");
        }
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "{what}: {a} against {b}");
            x.iter().zip(y).for_each(|(x, y)| assert_close_json(x, y, what));
        }
        (Value::Object(x), Value::Object(y)) => {
            assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>(), "{what}: {a} against {b}");
            x.iter().for_each(|(k, v)| assert_close_json(v, &y[k], what));
        }
        _ => assert_eq!(a, b, "{what}"),
    }
}

async fn sqlstate(db: &Client, sql: &str) -> String {
    match db.simple_query(sql).await {
        Ok(_) => format!("no error from {sql}"),
        Err(e) => e.as_db_error().map_or_else(|| e.to_string(), |d| format!("{} {}", d.code().code(), d.message())),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn predict_equals_predictions_for_every_row_and_task() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let mut daemon = Daemon::start(&env)?;
    let mut batches = HashMap::new();
    for (name, target, options) in [
        ("p_churn", "churn", r#"{"epochs": 3}"#),
        ("p_charges", "monthly_charges", r#"{"epochs": 3, "target_transform": "log"}"#),
        ("p_contract", "contract", r#"{"epochs": 3}"#),
        // Integer columns as categories: read as their text by every path.
        ("p_tenure_category", "churn", r#"{"epochs": 3, "encodings": {"tenure": "category", "senior_citizen": 2}}"#),
    ] {
        train(&db, name, target, options).await?;
        let batch =
            scores(&db, &format!("SELECT key, label, score FROM cerebro.predictions WHERE model = '{name}'")).await?;
        let one_by_one = scores(
            &db,
            &format!(
                "SELECT t.customer_id::text, cerebro.predict_label('{name}', t), cerebro.predict('{name}', t)
                 FROM telco_churn t"
            ),
        )
        .await?;
        assert_eq!(batch.len(), 7043);
        assert_same(&one_by_one, &batch, name);
        check_probabilities(&db, name, &batch).await?;
        check_predict_proba(&db, name).await?;
        batches.insert(name, batch);
    }
    // Exported and imported again, the model with integer categories
    // scores the same: its integer columns feed the graph's string inputs
    // as their text.
    let bytes: Vec<u8> = db
        .query_one(
            "SELECT cerebro.export_onnx('p_tenure_category',
                 (SELECT max(version) FROM cerebro.models WHERE name = 'p_tenure_category'))",
            &[],
        )
        .await?
        .get(0);
    let (inputs, labels): (serde_json::Value, Vec<String>) = {
        let row = db
            .query_one(
                "SELECT (SELECT jsonb_object_agg(f->>'name', f->>'name') FROM jsonb_array_elements(features) f),
                        class_labels
                 FROM cerebro.model_versions WHERE name = 'p_tenure_category' ORDER BY version DESC LIMIT 1",
                &[],
            )
            .await?;
        (row.get(0), row.get(1))
    };
    db.execute(
        "SELECT cerebro.import_onnx('p_tenure_imported', $1, 'telco_churn', $2::text::jsonb, 'binary', $3, NULL,
                                    'customer_id')",
        &[&bytes, &inputs.to_string(), &labels],
    )
    .await?;
    let original =
        scores(&db, "SELECT key, label, score FROM cerebro.predictions WHERE model = 'p_tenure_category'").await?;
    let imported =
        scores(&db, "SELECT key, label, score FROM cerebro.predictions WHERE model = 'p_tenure_imported'").await?;
    assert_same(&imported, &original, "exported and imported again");
    // An imported graph is scored by cerebrod (ONNX Runtime), not in the
    // backend: the same scores row for row.
    let imported_one_by_one = scores(
        &db,
        "SELECT t.customer_id::text, cerebro.predict_label('p_tenure_imported', t),
                cerebro.predict('p_tenure_imported', t)
         FROM telco_churn t",
    )
    .await?;
    assert_same(&imported_one_by_one, &original, "an imported graph, one row at a time");
    // A row built in the query, read by column name (where a name first
    // appears), in any order, with columns the model does not read and a
    // NULL feature.
    let built: f64 = db
        .query_one(
            "SELECT cerebro.predict('p_churn', r) FROM (
                 SELECT t.tenure, t.contract, NULL::float8 AS total_charges, 'extra' AS note, t.*
                 FROM telco_churn t WHERE customer_id = 1) r",
            &[],
        )
        .await?
        .get(0);
    assert!((0.0..=1.0).contains(&built), "{built}");
    let none: Option<f64> = db.query_one("SELECT cerebro.predict('p_churn', NULL::telco_churn)", &[]).await?.get(0);
    assert_eq!(none, None, "a NULL row scores NULL");

    // A few rows explained by key: in the backend as cerebrod explains
    // them (read with cerebro.score_in_backend off), for every head.
    let explained = |name: &str| {
        format!(
            "SELECT key, explanation FROM cerebro.predictions WHERE model = '{name}'
             AND key IN ('1', '2', '3', '4', '5') AND explain AND top_k = 3"
        )
    };
    let mut explanations = HashMap::new();
    for name in ["p_churn", "p_charges", "p_contract"] {
        db.batch_execute("SET cerebro.score_in_backend = off").await?;
        let by_daemon = explanations_of(&db, &explained(name)).await?;
        db.batch_execute("RESET cerebro.score_in_backend").await?;
        let in_backend = explanations_of(&db, &explained(name)).await?;
        assert_eq!(by_daemon.len(), 5, "{name}");
        for (key, e) in &by_daemon {
            assert_close_json(&in_backend[key], e, &format!("{name} key {key}"));
        }
        explanations.insert(name, in_backend);
    }

    // Every head scored in the backend: with cerebrod stopped, the
    // session's copies of the four versions score as the batches did, one
    // row at a time and by key, and explain as before.
    daemon.stop()?;
    for (name, before) in &explanations {
        let rows = db.query(&explained(name), &[]).await?;
        assert_eq!(rows.len(), 5, "{name}");
        for row in rows {
            let key: String = row.get(0);
            assert_close_json(&row.get::<_, serde_json::Value>(1), &before[&key], &format!("{name} key {key}"));
        }
    }
    for (name, batch) in &batches {
        let one_by_one = scores(
            &db,
            &format!(
                "SELECT t.customer_id::text, cerebro.predict_label('{name}', t), cerebro.predict('{name}', t)
                 FROM telco_churn t WHERE customer_id <= 300"
            ),
        )
        .await?;
        let keys = (301..=340).map(|k| format!("'{k}'")).collect::<Vec<_>>().join(", ");
        let by_key = scores(
            &db,
            &format!("SELECT key, label, score FROM cerebro.predictions WHERE model = '{name}' AND key IN ({keys})"),
        )
        .await?;
        assert_eq!((one_by_one.len(), by_key.len()), (300, 40), "{name}");
        let mut expected = batch.clone();
        expected.retain(|key, _| one_by_one.contains_key(key) || by_key.contains_key(key));
        let mut found = one_by_one;
        found.extend(by_key);
        assert_same(&found, &expected, &format!("{name} in the backend"));
    }
    let proba: Vec<f64> = db
        .query_one("SELECT cerebro.predict_proba('p_contract', t) FROM telco_churn t WHERE customer_id = 5", &[])
        .await?
        .get(0);
    assert!((proba.iter().sum::<f64>() - 1.0).abs() < 1e-4, "{proba:?}");
    Ok(())
}

/// `probabilities` holds each class's probability in the order of the
/// model's class labels: they sum to 1, the label is the most probable class
/// and the score is its probability (binary: `[1 − score, score]`, the label
/// the second class when the score is at least one half); NULL for regression.
async fn check_probabilities(db: &Client, name: &str, scored: &Scores) -> anyhow::Result<()> {
    let classes: Vec<String> = db
        .query_one("SELECT class_labels FROM cerebro.model_versions WHERE name = $1 AND status = 'ready'", &[&name])
        .await?
        .get::<_, Option<Vec<String>>>(0)
        .unwrap_or_default();
    let rows =
        db.query(&format!("SELECT key, probabilities FROM cerebro.predictions WHERE model = '{name}'"), &[]).await?;
    assert_eq!(rows.len(), scored.len(), "{name}");
    for row in rows {
        let key: String = row.get(0);
        let probabilities: Option<Vec<f64>> = row.get(1);
        let (label, score) = &scored[&key];
        let Some(p) = probabilities else {
            assert!(classes.is_empty(), "{name}: key {key} has no probabilities but classes {classes:?}");
            continue;
        };
        assert_eq!(p.len(), classes.len(), "{name}: key {key}: {p:?}");
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-4, "{name}: key {key}: {p:?} does not sum to 1");
        let top = (0..p.len()).max_by(|&a, &b| p[a].total_cmp(&p[b])).expect("classes");
        // The score: the positive (second) class's probability for these
        // binary models, the predicted class's for the multiclass one.
        let expected = if classes.len() == 2 { p[1] } else { p[top] };
        assert!((expected - score).abs() < 1e-6, "{name}: key {key}: {p:?} against score {score}");
        assert_eq!(label.as_deref(), Some(classes[top].as_str()), "{name}: key {key}: {p:?}");
    }
    Ok(())
}

/// `cerebro.predict_proba` of each row, and a by-key scan of a few, equal
/// the `probabilities` that `cerebro.predictions` gives them (to 1e-6),
/// NULL for regression.
async fn check_predict_proba(db: &Client, name: &str) -> anyhow::Result<()> {
    let probabilities = |sql: String| async move {
        let rows = db.query(&sql, &[]).await?;
        anyhow::Ok(
            rows.iter().map(|r| (r.get::<_, String>(0), r.get::<_, Option<Vec<f64>>>(1))).collect::<HashMap<_, _>>(),
        )
    };
    let batch =
        probabilities(format!("SELECT key, probabilities FROM cerebro.predictions WHERE model = '{name}'")).await?;
    let one_by_one =
        probabilities(format!("SELECT t.customer_id::text, cerebro.predict_proba('{name}', t) FROM telco_churn t"))
            .await?;
    assert_eq!(one_by_one.len(), batch.len(), "{name}");
    for (key, expected) in &batch {
        let found = &one_by_one[key];
        match (found, expected) {
            (Some(f), Some(e)) => {
                assert_eq!(f.len(), e.len(), "{name}: key {key}");
                assert!(f.iter().zip(e).all(|(a, b)| (a - b).abs() <= 1e-6), "{name}: key {key}: {f:?} against {e:?}");
            }
            (None, None) => {}
            _ => panic!("{name}: key {key}: {found:?} against {expected:?}"),
        }
    }
    // A few keys, scored by the backend's own copy: the same again.
    let keys = (1..=50).map(|k| format!("'{k}'")).collect::<Vec<_>>().join(", ");
    let by_key = probabilities(format!(
        "SELECT key, probabilities FROM cerebro.predictions WHERE model = '{name}' AND key IN ({keys})"
    ))
    .await?;
    assert_eq!(by_key.len(), 50, "{name}");
    for (key, found) in &by_key {
        match (found, &batch[key]) {
            (Some(f), Some(e)) => {
                assert!(f.iter().zip(e).all(|(a, b)| (a - b).abs() <= 1e-6), "{name}: key {key}: {f:?} against {e:?}")
            }
            (None, None) => {}
            (found, expected) => panic!("{name}: key {key}: {found:?} against {expected:?}"),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn predict_follows_deployments_from_one_statement_to_the_next() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let admin = env.connect().await?;
    let mut daemon = Daemon::start(&env)?;
    let v1 = train(&db, "p_deployed", "churn", r#"{"epochs": 2, "seed": 1}"#).await?;
    let v2 = train(&db, "p_deployed", "churn", r#"{"epochs": 2, "seed": 2, "hidden": [16]}"#).await?;
    let of = |v: i32| {
        format!("SELECT score FROM cerebro.predictions WHERE model = 'p_deployed' AND version = {v} AND key = '7'")
    };
    let (s1, s2): (f64, f64) = (db.query_one(&of(v1), &[]).await?.get(0), db.query_one(&of(v2), &[]).await?.get(0));
    assert_ne!(s1, s2);
    let predict = "SELECT cerebro.predict('p_deployed', t) FROM telco_churn t WHERE customer_id = 7";
    // The same session's by-key scans keep what they resolved too, prepared.
    let by_key = db.prepare("SELECT score FROM cerebro.predictions WHERE model = 'p_deployed' AND key = $1").await?;
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-6;
    let both = |expected: f64, why: &'static str| {
        let (db, by_key) = (&db, &by_key);
        async move {
            let predicted: f64 = db.query_one(predict, &[]).await?.get(0);
            let scanned: f64 = db.query_one(by_key, &[&"7"]).await?.get(0);
            assert!(close(predicted, expected) && close(scanned, expected), "{why}: {predicted}, {scanned}");
            anyhow::Ok(())
        }
    };
    admin.execute("SELECT cerebro.deploy('p_deployed', $1)", &[&v1]).await?;
    both(s1, "the deployed version").await?;
    admin.execute("SELECT cerebro.deploy('p_deployed', $1)", &[&v2]).await?;
    both(s2, "the next statement sees the deploy").await?;
    admin.execute("SELECT cerebro.rollback('p_deployed')", &[]).await?;
    both(s1, "and the rollback").await?;
    let pinned = format!("SELECT cerebro.predict('p_deployed', t, {v2}) FROM telco_churn t WHERE customer_id = 7");
    assert!(close(db.query_one(&pinned, &[]).await?.get(0), s2), "a version named is the one scored");

    // cerebrod stopped: a version this backend has checked its own copy of
    // goes on scoring in the backend; a new session has checked nothing,
    // and with cerebro.score_in_backend off every call goes to cerebrod.
    daemon.stop()?;
    assert!(close(db.query_one(predict, &[]).await?.get(0), s1), "scored in the backend");
    let fresh = env.connect().await?;
    let down = sqlstate(&fresh, predict).await;
    assert!(down.starts_with("08001"), "a new session checks its copy with cerebrod first: {down}");
    db.batch_execute("SET cerebro.score_in_backend = off").await?;
    let down = sqlstate(&db, predict).await;
    assert!(down.starts_with("08001"), "{down}");
    // cerebrod restarted: the session's connection is gone, the next call
    // opens another.
    daemon = Daemon::start(&env)?;
    assert!(close(db.query_one(predict, &[]).await?.get(0), s1));
    assert!(close(fresh.query_one(predict, &[]).await?.get(0), s1));
    drop(daemon);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn predict_works_prepared_and_by_key_predictions_use_the_index() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = Daemon::start(&env)?;
    train(&db, "p_keyed", "churn", r#"{"epochs": 2}"#).await?;
    let batch = scores(&db, "SELECT key, label, score FROM cerebro.predictions WHERE model = 'p_keyed'").await?;
    // The extended protocol, one statement executed ten times (the sixth and
    // later with a generic plan).
    let statement = db
        .prepare(
            "SELECT t.customer_id::text, cerebro.predict_label('p_keyed', t), cerebro.predict('p_keyed', t)
             FROM telco_churn t WHERE customer_id = $1",
        )
        .await?;
    for id in 1..=10i32 {
        let row = db.query_one(&statement, &[&id]).await?;
        let got: Scores = [(row.get::<_, String>(0), (row.get(1), row.get(2)))].into();
        let key = id.to_string();
        assert_same(&got, &[(key.clone(), batch[&key].clone())].into(), "prepared");
    }
    db.batch_execute(
        "PREPARE p(int) AS SELECT cerebro.predict('p_keyed', t) FROM telco_churn t WHERE customer_id = $1",
    )
    .await?;
    for _ in 0..10 {
        let row = db.query_one("EXECUTE p(3)", &[]).await?;
        assert!((row.get::<_, f64>(0) - batch["3"].1).abs() <= 1e-6);
    }

    // A key compared in the key column's own type: an index scan of
    // telco_churn's primary key, not a sequential scan.
    let scans = "SELECT coalesce(idx_scan, 0), coalesce(seq_scan, 0) FROM pg_stat_user_tables
                 WHERE relid = 'public.telco_churn'::regclass";
    let flush = "SELECT pg_stat_force_next_flush()";
    db.query(flush, &[]).await?;
    db.batch_execute("SELECT pg_stat_clear_snapshot()").await?;
    let before = db.query_one(scans, &[]).await?;
    let (idx, seq): (i64, i64) = (before.get(0), before.get(1));
    let keyed =
        db.query("SELECT key, score FROM cerebro.predictions WHERE model = 'p_keyed' AND key = '42'", &[]).await?;
    assert_eq!(keyed.len(), 1);
    assert!((keyed[0].get::<_, f64>(1) - batch["42"].1).abs() <= 1e-6, "one row scores as in a batch");
    let many =
        db.query("SELECT key FROM cerebro.predictions WHERE model = 'p_keyed' AND key IN ('5', '6', 'x0')", &[]).await;
    let bad = many.expect_err("'x0' is not an integer").as_db_error().map(|d| d.code().code().to_string());
    assert_eq!(bad.as_deref(), Some("22P02"));
    db.query(flush, &[]).await?;
    db.batch_execute("SELECT pg_stat_clear_snapshot()").await?;
    let after = db.query_one(scans, &[]).await?;
    assert!(after.get::<_, i64>(0) > idx, "an index scan");
    assert_eq!(after.get::<_, i64>(1), seq, "no sequential scan");

    // One key at a time through one prepared statement, ten keys: the
    // source's query of one key is planned once and kept (generic from the
    // sixth call), and each key scores as in the batch.
    let one = db.prepare("SELECT key, score FROM cerebro.predictions WHERE model = 'p_keyed' AND key = $1").await?;
    for id in (1..=10).map(|i| (i * 7).to_string()) {
        let row = db.query_one(&one, &[&id]).await?;
        assert_eq!(row.get::<_, String>(0), id);
        assert!((row.get::<_, f64>(1) - batch[&id].1).abs() <= 1e-6, "key {id} scores as in a batch");
    }
    let lone = db.query(&one, &[&"x0"]).await.expect_err("'x0' is not an integer");
    assert_eq!(lone.as_db_error().map(|d| d.code().code()), Some("22P02"));
    assert!(db.query(&one, &[&"7043000"]).await?.is_empty(), "a key no row has scores nothing");
    Ok(())
}

/// A backend keeps the connection of a scan that ended with nothing in
/// flight for its next scan: scans after a LIMIT (which leaves a batch in
/// flight), after an ERROR mid-scan and after cerebrod restarted between
/// two queries all score what a fresh connection scores. (By-key scans
/// reach cerebrod here because `cerebro.score_in_backend` is off; on, they
/// score in the backend, even with cerebrod down.)
#[tokio::test(flavor = "multi_thread")]
async fn by_key_scans_keep_their_connection_across_limits_errors_and_restarts() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let mut daemon = Daemon::start(&env)?;
    train(&db, "p_kept", "churn", r#"{"epochs": 2}"#).await?;
    db.batch_execute("SET cerebro.score_in_backend = off").await?;
    let batch = scores(&db, "SELECT key, label, score FROM cerebro.predictions WHERE model = 'p_kept'").await?;
    let by_key =
        db.prepare("SELECT key, label, score FROM cerebro.predictions WHERE model = 'p_kept' AND key = $1").await?;
    let check = |rows: Vec<tokio_postgres::Row>, key: &str| {
        assert_eq!(rows.len(), 1, "key {key}");
        let got: Scores = [(rows[0].get::<_, String>(0), (rows[0].get(1), rows[0].get(2)))].into();
        assert_same(&got, &[(key.to_owned(), batch[key].clone())].into(), "kept connection");
    };
    for key in ["1", "2", "3"] {
        check(db.query(&by_key, &[&key]).await?, key);
    }
    let first = db.query("SELECT key FROM cerebro.predictions WHERE model = 'p_kept' LIMIT 1", &[]).await?;
    assert_eq!(first.len(), 1);
    check(db.query(&by_key, &[&"4"]).await?, "4");
    let bad = sqlstate(&db, "SELECT key FROM cerebro.predictions WHERE model = 'p_kept' AND key IN ('5', 'x0')").await;
    assert!(bad.starts_with("22P02"), "{bad}");
    check(db.query(&by_key, &[&"5"]).await?, "5");

    daemon.stop()?;
    let down = sqlstate(&db, "SELECT score FROM cerebro.predictions WHERE model = 'p_kept' AND key = '6'").await;
    assert!(down.starts_with("08001"), "{down}");
    daemon = Daemon::start(&env)?;
    check(db.query(&by_key, &[&"6"]).await?, "6");
    daemon.stop()?;
    daemon = Daemon::start(&env)?;
    check(db.query(&by_key, &[&"7"]).await?, "7");

    // In the backend: a few keys score with the backend's own copy of the
    // model, checked against cerebrod once, and go on while cerebrod is
    // down; a scan of the whole source still needs cerebrod.
    db.batch_execute("SET cerebro.score_in_backend = on").await?;
    check(db.query(&by_key, &[&"8"]).await?, "8");
    daemon.stop()?;
    check(db.query(&by_key, &[&"9"]).await?, "9");
    let several = db
        .query("SELECT key, label, score FROM cerebro.predictions WHERE model = 'p_kept' AND key IN ('10', '11')", &[])
        .await?;
    assert_eq!(several.len(), 2);
    for row in several {
        let key: String = row.get(0);
        check(vec![row], &key);
    }
    let whole = sqlstate(&db, "SELECT count(*) FROM cerebro.predictions WHERE model = 'p_kept'").await;
    assert!(whole.starts_with("08001"), "{whole}");
    drop(daemon);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn predict_fails_precisely() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = Daemon::start(&env)?;
    train(&db, "p_errors", "churn", r#"{"epochs": 2}"#).await?;
    db.batch_execute(
        "DROP TABLE IF EXISTS p_text_tenure;
         CREATE TABLE p_text_tenure AS SELECT * FROM telco_churn WHERE customer_id = 1;
         ALTER TABLE p_text_tenure ALTER COLUMN tenure TYPE text;",
    )
    .await?;
    for (sql, expected) in [
        ("SELECT cerebro.predict('p_errors', r) FROM (SELECT tenure FROM telco_churn LIMIT 1) r", "42703"),
        ("SELECT cerebro.predict('p_errors', t) FROM p_text_tenure t", "42804"),
        ("SELECT cerebro.predict('p_errors', 42)", "42804"),
        ("SELECT cerebro.predict('p_nothing', t) FROM telco_churn t LIMIT 1", "42704"),
        ("SELECT cerebro.predict('p_errors', t, 9) FROM telco_churn t LIMIT 1", "42704"),
        ("SELECT cerebro.predict(NULL, t) FROM telco_churn t LIMIT 1", "22004"),
    ] {
        let got = sqlstate(&db, sql).await;
        assert!(got.starts_with(expected), "{sql}: {got}");
    }
    let missing =
        sqlstate(&db, "SELECT cerebro.predict('p_errors', r) FROM (SELECT tenure FROM telco_churn LIMIT 1) r").await;
    assert!(missing.contains("reads column \"female\""), "{missing}");

    // A categorical column of another type than the model learned from:
    // its values as text would be categories never seen. Refused, by
    // predict and by a scan; an enum of the same labels reads as text does.
    db.batch_execute(
        "DROP TABLE IF EXISTS p_int_contract, p_enum_contract;
         DROP TYPE IF EXISTS p_contract;
         CREATE TABLE p_int_contract AS SELECT * FROM telco_churn WHERE customer_id = 1;
         ALTER TABLE p_int_contract ALTER COLUMN contract TYPE int USING length(contract);
         CREATE TYPE p_contract AS ENUM ('Month-to-month', 'One year', 'Two year');
         CREATE TABLE p_enum_contract AS SELECT * FROM telco_churn WHERE customer_id = 1;
         ALTER TABLE p_enum_contract ALTER COLUMN contract TYPE p_contract USING contract::p_contract;",
    )
    .await?;
    for sql in [
        "SELECT cerebro.predict('p_errors', t) FROM p_int_contract t",
        "SELECT score FROM cerebro.predictions WHERE model = 'p_errors' AND source = 'p_int_contract'",
    ] {
        let refused = sqlstate(&db, sql).await;
        assert!(
            refused.starts_with("42804") && refused.contains("learned its categories from text"),
            "{sql}: {refused}"
        );
    }
    // Scoring writes nothing, so it takes no transaction id (a standby
    // has none to give): a new session's first calls, by row and by key.
    let reader = env.connect().await?;
    reader.batch_execute("BEGIN").await?;
    reader.query_one("SELECT cerebro.predict('p_errors', t, 1) FROM telco_churn t WHERE customer_id = 1", &[]).await?;
    reader.query_one("SELECT score FROM cerebro.predictions WHERE model = 'p_errors' AND key = '2'", &[]).await?;
    let xid: Option<String> = reader.query_one("SELECT pg_current_xact_id_if_assigned()::text", &[]).await?.get(0);
    assert_eq!(xid, None, "scoring took a transaction id");
    reader.batch_execute("COMMIT").await?;

    // A model trained on a type not built in (citext, read as its text)
    // scores its own source, and text stands for it.
    db.batch_execute(
        "CREATE EXTENSION IF NOT EXISTS citext;
         DROP TABLE IF EXISTS p_citext;
         CREATE TABLE p_citext AS SELECT customer_id, contract::citext AS contract, tenure, churn FROM telco_churn;
         INSERT INTO cerebro.models (name, source, target, key, features, options)
         VALUES ('p_citext', 'p_citext', 'churn', 'customer_id', ARRAY['contract', 'tenure'], '{\"epochs\": 2}');",
    )
    .await?;
    let seen = wait_until_done(&db, "p_citext", 1, TRAIN_TIMEOUT).await?;
    assert_eq!(seen.last().map(String::as_str), Some("ready"), "{seen:?}");
    let own: f64 =
        db.query_one("SELECT cerebro.predict('p_citext', t) FROM p_citext t WHERE customer_id = 1", &[]).await?.get(0);
    let scanned: f64 =
        db.query_one("SELECT score FROM cerebro.predictions WHERE model = 'p_citext' AND key = '1'", &[]).await?.get(0);
    let as_plain_text: f64 = db
        .query_one(
            "SELECT cerebro.predict('p_citext', r) FROM
             (SELECT contract::text AS contract, tenure FROM p_citext WHERE customer_id = 1) r",
            &[],
        )
        .await?
        .get(0);
    assert!((own - scanned).abs() < 1e-6 && (own - as_plain_text).abs() < 1e-6, "{own} {scanned} {as_plain_text}");

    let as_text: f64 = db
        .query_one("SELECT cerebro.predict('p_errors', t) FROM telco_churn t WHERE customer_id = 1", &[])
        .await?
        .get(0);
    for sql in [
        "SELECT cerebro.predict('p_errors', t) FROM p_enum_contract t",
        "SELECT score FROM cerebro.predictions WHERE model = 'p_errors' AND source = 'p_enum_contract'",
    ] {
        let as_enum: f64 = db.query_one(sql, &[]).await?.get(0);
        assert!((as_enum - as_text).abs() < 1e-6, "{sql}: {as_enum} against {as_text}");
    }

    // A row whose type has a dropped column (its place kept, with no type)
    // scores as the same row without it: by predict alone and in a trigger
    // that scores each new row, as applications write them.
    db.batch_execute(
        "DROP TABLE IF EXISTS p_dropped;
         CREATE TABLE p_dropped AS SELECT 0 AS junk, * FROM telco_churn WHERE customer_id <= 3;
         ALTER TABLE p_dropped ADD COLUMN score float8, DROP COLUMN junk;
         CREATE OR REPLACE FUNCTION p_score_new_row() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN NEW.score := cerebro.predict('p_errors', NEW, 1); RETURN NEW; END $$;
         CREATE TRIGGER p_score BEFORE INSERT ON p_dropped FOR EACH ROW EXECUTE FUNCTION p_score_new_row();
         ALTER TABLE p_dropped ADD COLUMN note text;
         ALTER TABLE p_dropped DROP COLUMN note;
         INSERT INTO p_dropped SELECT t.*, NULL FROM telco_churn t WHERE customer_id = 1;",
    )
    .await?;
    let dropped: f64 = db
        .query_one("SELECT cerebro.predict('p_errors', d, 1) FROM p_dropped d WHERE customer_id = 2", &[])
        .await?
        .get(0);
    let whole: f64 = db
        .query_one("SELECT cerebro.predict('p_errors', t, 1) FROM telco_churn t WHERE customer_id = 2", &[])
        .await?
        .get(0);
    assert!((dropped - whole).abs() < 1e-6, "{dropped} against {whole}");
    let triggered: f64 = db.query_one("SELECT score FROM p_dropped WHERE score IS NOT NULL", &[]).await?.get(0);
    assert!((triggered - as_text).abs() < 1e-6, "{triggered} against {as_text}");

    // A version still training is not ready.
    db.execute(
        "INSERT INTO cerebro.models (name, source, target, key, options)
         VALUES ('p_errors', 'telco_churn', 'churn', 'customer_id', '{\"epochs\": 400}')",
        &[],
    )
    .await?;
    let not_ready =
        sqlstate(&db, "SELECT cerebro.predict('p_errors', t, 2) FROM telco_churn t WHERE customer_id = 1").await;
    assert!(not_ready.starts_with("55000"), "{not_ready}");
    db.execute("SELECT cerebro.cancel('p_errors', 2)", &[]).await?;

    // A role the model is not granted to does not see it.
    db.batch_execute(
        "DO $$ BEGIN CREATE ROLE p_outsider LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         GRANT SELECT ON telco_churn TO p_outsider;",
    )
    .await?;
    let outsider = env.connect_as("p_outsider", &env.db).await?;
    let hidden =
        sqlstate(&outsider, "SELECT cerebro.predict('p_errors', t, 1) FROM telco_churn t WHERE customer_id = 1").await;
    assert!(hidden.starts_with("42704"), "{hidden}");
    db.execute("SELECT cerebro.grant_model('p_errors', 'p_outsider')", &[]).await?;
    let granted: f64 = outsider
        .query_one("SELECT cerebro.predict('p_errors', t, 1) FROM telco_churn t WHERE customer_id = 1", &[])
        .await?
        .get(0);
    assert!((0.0..=1.0).contains(&granted));
    Ok(())
}

/// The `Filter:` line of a query's plan: the conditions PostgreSQL checks
/// on each row.
async fn filter(db: &Client, sql: &str) -> anyhow::Result<String> {
    let rows = db.query(&format!("EXPLAIN (COSTS OFF) {sql}"), &[]).await?;
    Ok(rows.iter().map(|r| r.get::<_, String>(0)).filter(|l| l.trim_start().starts_with("Filter:")).collect())
}

/// A lone `model`, `source` or `key_column = '...'` is not checked again on
/// every row (each row the scan returns says what it asked), and a query
/// still returns what PostgreSQL's own filter would: rows that say so, none
/// for two models at once, the same prepared as planned afresh.
#[tokio::test(flavor = "multi_thread")]
async fn conditions_every_row_repeats_are_not_checked_again() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = Daemon::start(&env)?;
    train(&db, "p_echo_a", "churn", r#"{"epochs": 1}"#).await?;
    train(&db, "p_echo_b", "churn", r#"{"epochs": 1}"#).await?;
    let asked = "SELECT model, source, key_column, key FROM cerebro.predictions
                 WHERE model = 'p_echo_a' AND source = 'telco_churn' AND key_column = 'customer_id'
                   AND key = ANY ('{42,43}')";
    let checked = filter(&db, asked).await?;
    assert!(!checked.contains("model =") && !checked.contains("source =") && !checked.contains("key_column ="));
    assert!(checked.contains("key = ANY"), "{checked}");
    let rows = db.query(asked, &[]).await?;
    let seen: Vec<(String, String, String, String)> =
        rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect();
    let mut keys: Vec<&str> = seen.iter().map(|(.., k)| k.as_str()).collect();
    keys.sort();
    assert_eq!(keys, ["42", "43"]);
    for (model, source, key_column, _) in &seen {
        assert_eq!((model.as_str(), source.as_str(), key_column.as_str()), ("p_echo_a", "telco_churn", "customer_id"));
    }
    // Two conditions on one column are both checked: no row is of two
    // models. (Two constants would be seen contradictory by the planner.)
    let both = "SELECT count(*) FROM cerebro.predictions WHERE model = 'p_echo_a' AND model = ANY ('{p_echo_b}')";
    assert!(filter(&db, both).await?.contains("model ="));
    assert_eq!(db.query_one(both, &[]).await?.get::<_, i64>(0), 0);
    // Prepared, past the executions after which PostgreSQL keeps a generic plan.
    let prepared = db
        .prepare(
            "SELECT count(*) FILTER (WHERE model = $1) FROM cerebro.predictions WHERE model = $1 AND key = ANY ($2)",
        )
        .await?;
    for name in ["p_echo_a", "p_echo_b"].iter().cycle().take(8) {
        let keys = vec!["42".to_owned(), "43".to_owned()];
        assert_eq!(db.query_one(&prepared, &[name, &keys]).await?.get::<_, i64>(0), 2, "{name}");
    }
    Ok(())
}

/// A deployment made while cerebrod is away warns what it costs: a session
/// scores a version it has not scored before only once cerebrod has
/// checked it, so until cerebrod is back the model scores nowhere new
/// (where the version before went on scoring in the backends).
#[tokio::test(flavor = "multi_thread")]
async fn a_deployment_while_cerebrod_is_away_warns() -> anyhow::Result<()> {
    let env = Env::from_env();
    let (db, notices) = env.connect_recording_notices().await?;
    let mut daemon = Daemon::start(&env)?;
    let first = train(&db, "p_away", "churn", r#"{"epochs": 1}"#).await?;
    let second = train(&db, "p_away", "churn", r#"{"epochs": 2}"#).await?;
    let warned = |notices: &std::sync::Mutex<Vec<String>>| {
        notices
            .lock()
            .unwrap()
            .iter()
            .any(|n| n.contains("could not connect to cerebrod") && n.contains("cannot score it"))
    };
    db.execute("SELECT cerebro.deploy('p_away', $1)", &[&first]).await?;
    assert!(!warned(&notices), "{:?}", notices.lock().unwrap());
    daemon.stop()?;
    db.execute("SELECT cerebro.deploy('p_away', $1)", &[&second]).await?;
    assert!(warned(&notices), "{:?}", notices.lock().unwrap());
    notices.lock().unwrap().clear();
    db.execute("SELECT cerebro.rollback('p_away')", &[]).await?;
    assert!(warned(&notices), "rollback: {:?}", notices.lock().unwrap());
    Ok(())
}
