//! Many sessions at once, and queries stopped half way: what a shared
//! database sees every day. These hold already; they are kept as tests.

use std::time::{Duration, Instant};

use cerebro_tests::{wait_until_done, Env};
use tokio_postgres::Client;

use crate::{scoring_model, MODEL, TRAIN_TIMEOUT};

const SCORED: &str =
    "SELECT count(*)::text || ' ' || sum(score)::numeric(20,9) FROM cerebro.predictions WHERE model = 'rb_churn' AND version = 1";

async fn scored(db: &Client) -> anyhow::Result<String> {
    Ok(db.query_one(SCORED, &[]).await?.get(0))
}

#[tokio::test(flavor = "multi_thread")]
async fn thirty_two_sessions_scoring_while_a_model_trains_all_get_the_same_answer() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = scoring_model(&env, &db).await?;
    let expected = scored(&db).await?;
    db.execute(
        "INSERT INTO cerebro.models (name, source, target, key, options)
         VALUES ($1, 'telco_churn', 'churn', 'customer_id', '{\"epochs\": 15, \"hidden\": [64, 64]}')",
        &[&MODEL],
    )
    .await?;
    let training: i32 =
        db.query_one("SELECT max(version) FROM cerebro.models WHERE name = $1", &[&MODEL]).await?.get(0);

    let mut sessions = Vec::new();
    for _ in 0..32 {
        let env = env.clone();
        sessions.push(tokio::spawn(async move {
            let db = env.connect().await?;
            let mut answers = Vec::new();
            for _ in 0..5 {
                answers.push(scored(&db).await?);
            }
            anyhow::Ok(answers)
        }));
    }
    let mut answers = Vec::new();
    for s in sessions {
        answers.extend(s.await??);
    }
    assert_eq!(answers.len(), 160);
    assert!(answers.iter().all(|a| *a == expected), "answers differ from {expected}");
    let seen = wait_until_done(&db, MODEL, training, TRAIN_TIMEOUT).await?;
    assert_eq!(seen.last().map(String::as_str), Some("ready"), "{seen:?}");
    // The new version does not change what version 1 scores.
    assert_eq!(scored(&db).await?, expected);
    Ok(())
}

/// A view over 1,000 copies of every customer (7 million rows): a scan
/// that lasts seconds, so that a cancel sent after 300 ms finds it running.
/// 100 copies scored in about 0.4 s, and a fast run finished them before
/// the cancel came.
async fn long_source(db: &Client) -> anyhow::Result<()> {
    db.batch_execute(
        "CREATE OR REPLACE VIEW public.rb_long AS
             SELECT c.* FROM public.telco_churn c CROSS JOIN generate_series(1, 1000) g",
    )
    .await?;
    Ok(())
}

const LONG_SCAN: &str = "SELECT count(*) FROM cerebro.predictions
                         WHERE model = 'rb_churn' AND version = 1 AND source = 'rb_long' AND key_column = 'customer_id'";

/// Runs `query` and cancels it from another connection 300 ms in, as a
/// driver's cancel() does: it ends in 57014 within 10 seconds.
async fn cancelled_promptly(db: &Client, query: &str) -> anyhow::Result<()> {
    let cancel = db.cancel_token();
    let started = Instant::now();
    let stopper = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cancel.cancel_query(tokio_postgres::NoTls).await
    });
    let e = db.query_one(query, &[]).await.expect_err("the scan was cancelled");
    stopper.await??;
    let stopped_after = started.elapsed();
    assert_eq!(e.as_db_error().map(|d| d.code().code()), Some("57014"), "{query}: {e}");
    assert!(stopped_after < Duration::from_secs(10), "{query}: the cancel took {stopped_after:?}");
    // The postmaster signals a cancel twice, to the backend and to its
    // process group (signal_child); on a loaded machine the second SIGINT
    // can come after the first ended the statement, and cancels the next
    // one if that has already begun (seen once in CI, on the SET after the
    // scan). Idle, the backend drops it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(())
}

/// [`LONG_SCAN`], each row explained and its explanation read.
const LONG_EXPLAIN: &str = "SELECT count(explanation) FROM cerebro.predictions
                            WHERE model = 'rb_churn' AND version = 1 AND source = 'rb_long'
                              AND key_column = 'customer_id' AND explain";

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_or_timed_out_scan_stops_promptly_and_the_session_scores_again() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = scoring_model(&env, &db).await?;
    long_source(&db).await?;
    let expected = scored(&db).await?;
    db.batch_execute("SET cerebro.batch_rows = 1024").await?;

    // A cancel from another connection, as a driver's cancel() sends it.
    cancelled_promptly(&db, LONG_SCAN).await?;

    // statement_timeout ends it the same way.
    db.batch_execute("SET statement_timeout = 200").await?;
    let e = db.query_one(LONG_SCAN, &[]).await.expect_err("the scan timed out");
    assert_eq!(e.as_db_error().map(|d| d.code().code()), Some("57014"), "{e}");
    db.batch_execute("RESET statement_timeout").await?;

    // A scan that explains every row stops alike, between batches of
    // explanations, whether cerebrod or the backend is at work.
    cancelled_promptly(&db, LONG_EXPLAIN).await?;
    db.batch_execute("RESET cerebro.batch_rows").await?;

    // The same session scores again, and the daemon serves others.
    assert_eq!(scored(&db).await?, expected);
    assert_eq!(scored(&env.connect().await?).await?, expected);
    // Regions are anonymous memory files: nothing is left under /dev/shm.
    let left: Vec<String> = std::fs::read_dir("/dev/shm")?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("cerebro"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn one_roles_long_queue_does_not_hold_another_roles_job() -> anyhow::Result<()> {
    let env = Env::from_env();
    let admin = env.connect().await?;
    let mut roles = Vec::new();
    for role in ["rb_busy", "rb_patient"] {
        let db = crate::hostile_role_client(&env, role).await?;
        admin.batch_execute(&format!("GRANT SELECT ON public.telco_churn TO {role}")).await?;
        roles.push(db);
    }
    let insert = "INSERT INTO cerebro.models (name, source, target, key, options)
                  VALUES ($1, 'telco_churn', 'churn', 'customer_id', '{\"epochs\": 2}')";
    // Four of one role's jobs, then one of another's, all queued before
    // the daemon starts.
    for i in 0..4 {
        roles[0].execute(insert, &[&format!("rb_busy_{i}")]).await?;
    }
    roles[1].execute(insert, &[&"rb_patient_0"]).await?;
    let _daemon = crate::Daemon::start(&env)?;
    for name in ["rb_busy_0", "rb_busy_1", "rb_busy_2", "rb_busy_3", "rb_patient_0"] {
        let owner = if name.starts_with("rb_busy") { &roles[0] } else { &roles[1] };
        let seen = wait_until_done(owner, name, 1, TRAIN_TIMEOUT).await?;
        assert_eq!(seen.last().map(String::as_str), Some("ready"), "{name}: {seen:?}");
    }
    let order: Vec<String> = admin
        .query(
            "SELECT v.name FROM cerebro.model_versions v
             WHERE v.name LIKE 'rb\\_busy\\_%' OR v.name = 'rb_patient_0' ORDER BY v.started_at, v.id",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    // Roles take turns: the other role's job goes second, not fifth.
    assert_eq!(order, ["rb_busy_0", "rb_patient_0", "rb_busy_1", "rb_busy_2", "rb_busy_3"], "{order:?}");
    Ok(())
}

/// More scoring sessions than cerebrod's `max_connections`: each keeps its
/// connection between scans, so cerebrod closes the one idle the longest
/// for a newcomer, and its session connects again when it next scores,
/// even in the middle of a scan (a cursor between two fetches). Before,
/// every session past the limit failed for as long as the others stayed.
#[tokio::test(flavor = "multi_thread")]
async fn sessions_beyond_cerebrods_max_connections_take_turns() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let daemon = scoring_model(&env, &db).await?;
    let expected = scored(&db).await?;
    drop(daemon);
    let narrow = env.with_config_value("two-connections", "max_connections", "2")?;
    let _daemon = cerebro_tests::Daemon::start(&narrow)?;
    // A scan half read, its batches small: its connection waits between them.
    let cursor = env.connect().await?;
    cursor
        .batch_execute(
            "SET cerebro.batch_rows = 500;
             BEGIN;
             DECLARE half CURSOR FOR SELECT key, score FROM cerebro.predictions WHERE model = 'rb_churn' AND version = 1;
             FETCH 1000 FROM half;",
        )
        .await?;
    let mut sessions = Vec::new();
    for _ in 0..6 {
        let s = env.connect().await?;
        s.batch_execute("SET cerebro.score_in_backend = off").await?;
        sessions.push(s);
    }
    for round in 0..3 {
        for (i, s) in sessions.iter().enumerate() {
            assert_eq!(scored(s).await?, expected, "session {i}, round {round}");
        }
    }
    let rest: i64 = cursor.query("FETCH ALL FROM half", &[]).await?.len().try_into()?;
    assert_eq!(rest, 7043 - 1000, "the half-read scan went on");
    cursor.batch_execute("COMMIT").await?;
    Ok(())
}
