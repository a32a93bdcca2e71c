//! Prepared statements, cached plans and the extended protocol, as
//! applications and drivers use them: PostgreSQL switches a prepared
//! statement to a cached generic plan on its sixth execution, and psycopg,
//! JDBC, pgx and PostgREST prepare by themselves. Before issue 12 the sixth
//! execution over `cerebro.models` killed the backend (signal 11, and the
//! postmaster reset every session) and over `cerebro.predictions` failed
//! with an assertion; every test here failed on that code.

use std::process::Command;

use cerebro_tests::Env;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::{scoring_model, MODEL};

/// Version 1 of the model, scored: every row's score summed.
const SCORED: &str = "SELECT count(*)::text || ' ' || sum(score)::numeric(20,9) FROM cerebro.predictions
                      WHERE model = 'rb_churn' AND version = 1";

/// A query with `$n` parameters, the values to bind, and the same values
/// written as SQL literals for the unprepared run.
struct Case {
    what: &'static str,
    sql: &'static str,
    params: Vec<Box<dyn ToSql + Sync + Send>>,
    literals: Vec<&'static str>,
}

fn case(what: &'static str, sql: &'static str, params: Vec<(Box<dyn ToSql + Sync + Send>, &'static str)>) -> Case {
    let (params, literals) = params.into_iter().unzip();
    Case { what, sql, params, literals }
}

/// Every foreign table and SQL function a user reads, with conditions pushed
/// to Cerebro as constants, parameters, InitPlans and outer references.
fn cases() -> Vec<Case> {
    let m = || -> (Box<dyn ToSql + Sync + Send>, &'static str) { (Box::new(MODEL), "'rb_churn'") };
    vec![
        case("models by name", "SELECT name, version, status, task FROM cerebro.models WHERE name = $1", vec![m()]),
        case(
            "every model",
            "SELECT name, version FROM cerebro.models WHERE version >= $1",
            vec![(Box::new(1i32), "1")],
        ),
        case("predictions", "SELECT key, label, score FROM cerebro.predictions WHERE model = $1", vec![m()]),
        case(
            "predictions of a version",
            "SELECT key, version, score FROM cerebro.predictions WHERE model = $1 AND version = $2",
            vec![m(), (Box::new(1i32), "1")],
        ),
        case(
            "predictions of some keys",
            "SELECT key, label, score FROM cerebro.predictions WHERE model = $1 AND key = ANY ($2)",
            vec![m(), (Box::new(vec!["1".to_owned(), "17".to_owned(), "4242".to_owned()]), "'{1,17,4242}'::text[]")],
        ),
        case(
            "predictions of a model in a list",
            "SELECT key, score FROM cerebro.predictions WHERE model = ANY ($1) AND key IN ('1', '2', '3')",
            vec![(Box::new(vec![MODEL.to_owned()]), "ARRAY['rb_churn']")],
        ),
        case(
            "predictions of one key",
            "SELECT key, score FROM cerebro.predictions WHERE model = $1 AND key = $2",
            vec![m(), (Box::new("99"), "'99'")],
        ),
        case(
            "an InitPlan's model",
            "SELECT key, score FROM cerebro.predictions WHERE model = (SELECT $1::text) AND key IN ('1', '2', '3')",
            vec![m()],
        ),
        case(
            "an outer reference per row",
            "SELECT c.customer_id, (SELECT p.score FROM cerebro.predictions p
                                    WHERE p.model = $1 AND p.key = c.customer_id::text)
             FROM telco_churn c WHERE c.customer_id <= 25",
            vec![m()],
        ),
        case(
            "a join the planner narrows",
            "SELECT m.name, count(*), sum(p.score) FROM cerebro.models m
             JOIN cerebro.predictions p ON p.model = m.name AND p.version = m.version
             WHERE m.name = $1 GROUP BY m.name",
            vec![m()],
        ),
        case("archive", "SELECT name, version, auc IS NOT NULL FROM cerebro.archive WHERE name = $1", vec![m()]),
        case("lineage", "SELECT name, version, path FROM cerebro.lineage WHERE name = $1", vec![m()]),
        case("leaderboard", "SELECT * FROM cerebro.leaderboard WHERE name = $1", vec![m()]),
        case("may_use", "SELECT cerebro.may_use($1, current_user)", vec![m()]),
        case("export_onnx", "SELECT length(cerebro.export_onnx($1, 1)) > 0", vec![m()]),
    ]
}

/// The rows of `sql` as sorted text, whatever their types.
fn as_text(sql: &str) -> String {
    format!("SELECT coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), '') FROM ({sql}) t")
}

fn with_literals(sql: &str, literals: &[&str]) -> String {
    // Highest first, so that $1 does not eat the start of $10.
    literals.iter().enumerate().rev().fold(sql.to_owned(), |s, (i, lit)| s.replace(&format!("${}", i + 1), lit))
}

pub async fn unprepared(db: &Client, sql: &str) -> anyhow::Result<String> {
    let rows = db.simple_query(sql).await?;
    let text = rows.into_iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or_default().to_owned()),
        _ => None,
    });
    Ok(text.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_table_view_and_function_answers_the_same_prepared_ten_times_in_every_plan_mode() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = scoring_model(&env, &db).await?;
    let pid: i32 = db.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
    for mode in ["auto", "force_generic_plan", "force_custom_plan"] {
        db.batch_execute(&format!("SET plan_cache_mode = {mode}")).await?;
        for c in cases() {
            let expected = unprepared(&db, &as_text(&with_literals(c.sql, &c.literals))).await?;
            assert!(
                !expected.is_empty() || c.what == "leaderboard",
                "{}: the unprepared query returned nothing",
                c.what
            );
            // A named statement over the extended protocol, as drivers do.
            let statement = db.prepare(&as_text(c.sql)).await?;
            let params: Vec<&(dyn ToSql + Sync)> = c.params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect();
            for run in 1..=10 {
                let got: String = db
                    .query_one(&statement, &params)
                    .await
                    .map_err(|e| anyhow::anyhow!("{} ({mode}), execution {run}: {e:?}", c.what))?
                    .get(0);
                assert_eq!(got, expected, "{} ({mode}), execution {run}", c.what);
            }
        }
    }
    // The same backend answered everything: nothing crashed on the way.
    assert_eq!(db.query_one("SELECT pg_backend_pid()", &[]).await?.get::<_, i32>(0), pid);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn sql_prepare_and_plpgsql_loops_reuse_their_plans_safely() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = scoring_model(&env, &db).await?;
    let expected = unprepared(&db, SCORED).await?;
    for mode in ["auto", "force_generic_plan"] {
        db.batch_execute(&format!(
            "SET plan_cache_mode = {mode};
             DEALLOCATE ALL;
             PREPARE q(text) AS SELECT count(*) FROM cerebro.models WHERE name = $1 AND version = 1;
             PREPARE p(text) AS SELECT count(*)::text || ' ' || sum(score)::numeric(20,9) FROM cerebro.predictions
                 WHERE model = $1 AND version = 1;"
        ))
        .await?;
        for _ in 0..10 {
            assert_eq!(unprepared(&db, "EXECUTE q('rb_churn')").await?, "1");
            assert_eq!(unprepared(&db, "EXECUTE p('rb_churn')").await?, expected);
        }
        // PL/pgSQL caches the plans of its queries the same way.
        unprepared(
            &db,
            "DO $$ DECLARE n bigint; s text; BEGIN
                 FOR i IN 1..10 LOOP
                     SELECT count(*) INTO n FROM cerebro.models WHERE name = 'rb_churn' AND version = 1;
                     SELECT count(*)::text || ' ' || sum(score)::numeric(20,9) INTO s
                         FROM cerebro.predictions WHERE model = 'rb_churn' AND version = 1;
                     IF n <> 1 THEN RAISE EXCEPTION 'models said %', n; END IF;
                     PERFORM set_config('rb.scored', s, false);
                 END LOOP;
             END $$",
        )
        .await?;
        assert_eq!(unprepared(&db, "SELECT current_setting('rb.scored')").await?, expected);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prepared_insert_queues_one_version_per_execution() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    for mode in ["auto", "force_generic_plan", "force_custom_plan"] {
        db.batch_execute(&format!("SET plan_cache_mode = {mode}; BEGIN")).await?;
        let statement = db
            .prepare(
                "INSERT INTO cerebro.models (name, source, target, key, options)
                 VALUES ($1, 'telco_churn', 'churn', 'customer_id', $2::text::jsonb)",
            )
            .await?;
        for run in 1..=10 {
            let name = format!("rb_insert_{run}");
            let options = format!(r#"{{"epochs": {run}}}"#);
            assert_eq!(db.execute(&statement, &[&name, &options]).await?, 1, "{mode}, execution {run}");
        }
        let queued: Vec<(String, i32)> = db
            .query(
                "SELECT m.name, (v.options->>'epochs')::int FROM cerebro.models m
                 JOIN cerebro.model_versions v USING (name, version)
                 WHERE m.name LIKE 'rb\\_insert\\_%' ORDER BY 2",
                &[],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let expected: Vec<(String, i32)> = (1..=10).map(|i| (format!("rb_insert_{i}"), i)).collect();
        assert_eq!(queued, expected, "{mode}");
        db.batch_execute("ROLLBACK").await?;
    }
    Ok(())
}

/// Runs a Python program with psycopg 3 in its default configuration (it
/// prepares a statement on its fifth execution); returns what it printed.
fn psycopg(env: &Env, program: &str) -> anyhow::Result<String> {
    let dsn = format!("host={} port={} dbname={} user=postgres", env.pghost, env.pgport, env.db);
    let out = Command::new(&env.python).arg("-c").arg(program).arg(dsn).output()?;
    anyhow::ensure!(
        out.status.success(),
        "python failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

#[tokio::test(flavor = "multi_thread")]
async fn psycopg_with_its_defaults_polls_scores_and_inserts() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = scoring_model(&env, &db).await?;
    let expected = unprepared(&db, SCORED).await?;
    let printed = psycopg(
        &env,
        r#"
import sys, psycopg
with psycopg.connect(sys.argv[1]) as conn:
    assert conn.prepare_threshold == 5, conn.prepare_threshold
    pid = conn.info.backend_pid
    seen = set()
    for _ in range(12):
        status = conn.execute(
            "SELECT status FROM cerebro.models WHERE name = %s AND version = 1", ("rb_churn",)).fetchone()[0]
        scored = conn.execute(
            "SELECT count(*)::text || ' ' || sum(score)::numeric(20,9) FROM cerebro.predictions "
            "WHERE model = %s AND version = 1", ("rb_churn",)).fetchone()[0]
        one = conn.execute(
            "SELECT label FROM cerebro.predictions WHERE model = %s AND key = %s", ("rb_churn", "7")).fetchall()
        seen.add((status, scored, len(one)))
    with conn.transaction(force_rollback=True):
        for i in range(8):
            conn.execute(
                "INSERT INTO cerebro.models (name, source, target, key, options) "
                "VALUES (%s, 'telco_churn', 'churn', 'customer_id', %s::jsonb)",
                (f"rb_psycopg_{i}", '{"epochs": 2}'))
        queued = conn.execute("SELECT count(*) FROM cerebro.models WHERE name LIKE 'rb_psycopg_%'").fetchone()[0]
    assert conn.info.backend_pid == pid
    print(len(seen), *sorted(seen)[0], queued, sep="|")
"#,
    )?;
    assert_eq!(printed.trim(), format!("1|ready|{expected}|1|8"));
    let left: i64 =
        db.query_one("SELECT count(*) FROM cerebro.models WHERE name LIKE 'rb_psycopg_%'", &[]).await?.get(0);
    assert_eq!(left, 0, "the rolled-back INSERTs left versions behind");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn pgbench_with_prepared_statements_and_eight_clients_scores_without_an_error() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = scoring_model(&env, &db).await?;
    let script = std::env::temp_dir().join(format!("cerebro-pgbench-{}.sql", std::process::id()));
    std::fs::write(
        &script,
        "\\set k random(1, 7043)
SELECT status FROM cerebro.models WHERE name = 'rb_churn';
SELECT label, score FROM cerebro.predictions WHERE model = 'rb_churn' AND key = :k::text;
SELECT count(*) FROM cerebro.predictions WHERE model = 'rb_churn' AND key IN (:k::text, '1', '2');
",
    )?;
    let out = Command::new(format!("{}/pgbench", env.pgbin))
        .args(["-n", "-M", "prepared", "-c", "8", "-j", "2", "-t", "25", "-f"])
        .arg(&script)
        .args(["-h", &env.pghost, "-p", &env.pgport, "-U", "postgres", &env.db])
        .output()?;
    let _ = std::fs::remove_file(&script);
    let report = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "pgbench failed:\n{report}");
    assert!(report.contains("number of transactions actually processed: 200/200"), "{report}");
    assert!(report.contains("number of failed transactions: 0"), "{report}");
    // And the session that watched is still the same backend.
    assert_eq!(unprepared(&db, "SELECT 1").await?, "1");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn null_parameters_match_nothing_as_the_unprepared_query_does() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = scoring_model(&env, &db).await?;
    for mode in ["force_generic_plan", "force_custom_plan"] {
        db.batch_execute(&format!("SET plan_cache_mode = {mode}")).await?;
        let by_model = db.prepare("SELECT count(*) FROM cerebro.predictions WHERE model = $1").await?;
        let by_keys =
            db.prepare("SELECT count(*) FROM cerebro.predictions WHERE model = $1 AND key = ANY ($2)").await?;
        for _ in 0..7 {
            let none: Option<&str> = None;
            assert_eq!(db.query_one(&by_model, &[&none]).await?.get::<_, i64>(0), 0, "{mode}");
            let no_keys: Option<Vec<String>> = None;
            assert_eq!(db.query_one(&by_keys, &[&MODEL, &no_keys]).await?.get::<_, i64>(0), 0, "{mode}");
            let null_key = vec![None::<String>];
            assert_eq!(db.query_one(&by_keys, &[&MODEL, &null_key]).await?.get::<_, i64>(0), 0, "{mode}");
        }
    }
    assert_eq!(unprepared(&db, "SELECT count(*) FROM cerebro.predictions WHERE model = NULL").await?, "0");
    Ok(())
}

/// A cursor declared `WITH HOLD` over `cerebro.predictions` outlives its
/// transaction: at COMMIT PostgreSQL runs it to the end and keeps its rows.
/// Before, it failed at COMMIT for some cursor names (08P01 `cursor
/// <unnamed portal 1> is not open`): PostgreSQL dropped the scan's own
/// cursor on its source first, in the order of its table of portal names.
#[tokio::test(flavor = "multi_thread")]
async fn a_cursor_declared_with_hold_outlives_its_transaction_whatever_its_name() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = scoring_model(&env, &db).await?;
    let expected: Vec<(String, f64)> = db
        .query("SELECT key, score FROM cerebro.predictions WHERE model = $1 AND version = 1 ORDER BY key", &[&MODEL])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(expected.len(), 7043);
    // The trial's names that failed and that worked, and some more: the
    // order PostgreSQL drops cursors in follows their names' hashes.
    let names = ["h2", "my_cursor", "hc", "abc", "zz", "c1", "c2", "c3", "c4", "c5", "held", "scores"];
    for name in names {
        db.batch_execute(&format!(
            "BEGIN;
             DECLARE {name} CURSOR WITH HOLD FOR
                 SELECT key, score FROM cerebro.predictions WHERE model = '{MODEL}' AND version = 1 ORDER BY key;
             FETCH 5 FROM {name};
             COMMIT;"
        ))
        .await
        .map_err(|e| anyhow::anyhow!("cursor {name}: {e:?}"))?;
        let rest = db.query(&format!("FETCH ALL FROM {name}"), &[]).await?;
        db.batch_execute(&format!("CLOSE {name}")).await?;
        let rest: Vec<(String, f64)> = rest.iter().map(|r| (r.get(0), r.get(1))).collect();
        assert_eq!(rest, expected[5..], "cursor {name}");
    }
    // A cursor without HOLD still ends with its transaction.
    db.batch_execute(&format!(
        "BEGIN; DECLARE gone CURSOR FOR SELECT key FROM cerebro.predictions WHERE model = '{MODEL}'; FETCH 1 FROM gone; COMMIT;"
    ))
    .await?;
    let err = db.batch_execute("FETCH 1 FROM gone").await.expect_err("closed at COMMIT");
    assert_eq!(err.code().map(|c| c.code()), Some("34000"), "{err:?}");
    Ok(())
}

/// A join on the key scores only the rows it joins (a scan parameterised by
/// the other table's row, in a nested loop), and a LATERAL subquery may name
/// its model and keys by the outer row's columns; in every plan mode, as
/// prepared statements run. Before, the join scored the model's whole source
/// and the LATERAL subquery was 22023 `needs to know which model`.
#[tokio::test(flavor = "multi_thread")]
async fn a_join_on_the_key_scores_only_the_rows_it_joins_and_lateral_names_the_model() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = scoring_model(&env, &db).await?;
    let scored =
        |rows: Vec<tokio_postgres::Row>| -> Vec<(String, f64)> { rows.iter().map(|r| (r.get(0), r.get(1))).collect() };
    let keys: Vec<String> = db
        .query("SELECT key FROM cerebro.predictions WHERE model = $1 AND version = 1 ORDER BY key LIMIT 3", &[&MODEL])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let expected = scored(
        db.query(
            "SELECT key, score FROM cerebro.predictions WHERE model = $1 AND version = 1 AND key = ANY ($2) ORDER BY key",
            &[&MODEL, &keys],
        )
        .await?,
    );
    assert_eq!(expected.len(), 3);
    db.batch_execute("CREATE TEMP TABLE picked (id text, model text)").await?;
    for key in &keys {
        db.execute("INSERT INTO picked VALUES ($1, $2)", &[key, &MODEL]).await?;
    }
    db.batch_execute("CREATE TEMP TABLE use_model (name text)").await?;
    db.execute("INSERT INTO use_model VALUES ($1)", &[&MODEL]).await?;
    db.batch_execute("ANALYZE picked; ANALYZE use_model").await?;
    let join = "SELECT p.key, p.score FROM picked k
                JOIN cerebro.predictions p ON p.key = k.id AND p.model = $1 AND p.version = 1 ORDER BY 1";
    let lateral = "SELECT p.key, p.score FROM picked k
                   CROSS JOIN LATERAL (SELECT key, score FROM cerebro.predictions
                                       WHERE model = k.model AND version = 1 AND key = k.id) p ORDER BY 1";
    // The key from one table, the model from another.
    let two_tables = "SELECT p.key, p.score FROM picked k CROSS JOIN use_model u
                      JOIN cerebro.predictions p ON p.key = k.id AND p.model = u.name AND p.version = 1
                      WHERE $1::text IS NOT NULL ORDER BY 1";
    // An outer column projected from inside a LEFT JOIN LATERAL.
    let projected = "SELECT s.key, s.score FROM picked k
                     LEFT JOIN LATERAL (SELECT p.key, p.score, k.model AS asked FROM cerebro.predictions p
                                        WHERE p.model = k.model AND p.version = 1 AND p.key = k.id) s ON true
                     WHERE s.asked = $1 ORDER BY 1";
    // A UNION ALL of two scans (an appendrel), joined on the key.
    let union_all = "SELECT u.key, u.score FROM picked k
                     JOIN (SELECT key, score FROM cerebro.predictions WHERE model = $1 AND version = 1
                           UNION ALL
                           SELECT key, score FROM cerebro.predictions WHERE model = $1 AND version = 1) u
                       ON u.key = k.id ORDER BY 1";
    let twice: Vec<(String, f64)> = expected.iter().flat_map(|r| [r.clone(), r.clone()]).collect();
    // Scored in the backend by key or by cerebrod in a batch, a row may be
    // summed in another order: the same to single-precision rounding.
    let same = |got: Vec<(String, f64)>, want: &[(String, f64)]| {
        got.len() == want.len() && got.iter().zip(want).all(|(g, w)| g.0 == w.0 && (g.1 - w.1).abs() < 1e-6)
    };
    for mode in ["auto", "force_generic_plan", "force_custom_plan"] {
        db.batch_execute(&format!("SET plan_cache_mode = {mode}")).await?;
        let join = db.prepare(join).await?;
        let lateral = db.prepare(lateral).await?;
        let two_tables = db.prepare(two_tables).await?;
        let projected = db.prepare(projected).await?;
        let union_all = db.prepare(union_all).await?;
        for run in 1..=7 {
            assert!(same(scored(db.query(&join, &[&MODEL]).await?), &expected), "join ({mode}), run {run}");
            assert!(same(scored(db.query(&lateral, &[]).await?), &expected), "lateral ({mode}), run {run}");
            assert!(same(scored(db.query(&two_tables, &[&MODEL]).await?), &expected), "two tables ({mode}), {run}");
            assert!(same(scored(db.query(&projected, &[&MODEL]).await?), &expected), "projected ({mode}), {run}");
            assert!(same(scored(db.query(&union_all, &[&MODEL]).await?), &twice), "union all ({mode}), run {run}");
        }
    }
    db.batch_execute("RESET plan_cache_mode").await?;
    // Three rescans of one row each, not one scan of the model's 7,043.
    let plan: Vec<String> = db
        .simple_query(&format!(
            "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) SELECT p.key, p.score FROM picked k
             JOIN cerebro.predictions p ON p.key = k.id AND p.model = '{MODEL}' AND p.version = 1"
        ))
        .await?
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect();
    let plan = plan.join("\n");
    assert!(plan.contains("Nested Loop"), "{plan}");
    assert!(plan.contains("Foreign Scan on predictions p (actual rows=1 loops=3)"), "{plan}");
    assert!(plan.contains("key = ..."), "{plan}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_writes_leave_no_memory_behind_in_the_backend() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = scoring_model(&env, &db).await?;
    // Refused INSERTs, UPDATEs and DELETEs, each caught, in one session.
    unprepared(
        &db,
        "DO $$ BEGIN
             FOR i IN 1..50 LOOP
                 BEGIN
                     INSERT INTO cerebro.models (name, source, target) VALUES ('bad name!', 'telco_churn', 'churn');
                 EXCEPTION WHEN OTHERS THEN NULL; END;
                 BEGIN
                     UPDATE cerebro.models SET task = 'binary' WHERE name = 'rb_churn';
                 EXCEPTION WHEN OTHERS THEN NULL; END;
                 BEGIN
                     DELETE FROM cerebro.models WHERE name = 'rb_churn';
                 EXCEPTION WHEN OTHERS THEN NULL; END;
             END LOOP;
         END $$",
    )
    .await?;
    let contexts: i64 =
        db.query_one("SELECT count(*) FROM pg_backend_memory_contexts WHERE name LIKE 'Wrappers%'", &[]).await?.get(0);
    assert_eq!(contexts, 0, "memory contexts left by refused writes");
    Ok(())
}

/// A join that gives the scan its version or its source scores what it
/// gives: PostgreSQL is offered a scan parameterised by the other table's
/// row, and the plan that would score the deployed version (or the model's
/// own source) and leave the join to drop its rows costs too much to win;
/// where only that plan is left, 0A000, never missing rows. Before, the
/// scan ran once with the defaults and the join kept the rows that matched
/// them: one row of two, or none.
#[tokio::test(flavor = "multi_thread")]
async fn a_join_on_the_version_or_the_source_scores_what_it_names() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = scoring_model(&env, &db).await?;
    let name = "rb_joined_versions";
    db.execute("SELECT cerebro.delete_model(name, version) FROM cerebro.models WHERE name = $1", &[&name]).await?;
    let mut made = Vec::new();
    for epochs in [1, 3] {
        db.execute(
            "INSERT INTO cerebro.models (name, source, target, key, options)
             VALUES ($1, 'telco_churn', 'churn', 'customer_id', jsonb_build_object('epochs', $2::int))",
            &[&name, &epochs],
        )
        .await?;
        let version: i32 =
            db.query_one("SELECT max(version) FROM cerebro.models WHERE name = $1", &[&name]).await?.get(0);
        let seen = cerebro_tests::wait_until_done(&db, name, version, crate::TRAIN_TIMEOUT).await?;
        assert_eq!(seen.last().map(String::as_str), Some("ready"), "{seen:?}");
        made.push(version);
    }
    let (first, last) = (made[0], made[1]);
    db.batch_execute(&format!(
        "DROP TABLE IF EXISTS rb_joined_copy;
         CREATE TABLE rb_joined_copy AS SELECT * FROM telco_churn WHERE customer_id <= 10;
         UPDATE rb_joined_copy SET tenure = tenure + 40, contract = 'Two year';
         CREATE TEMP TABLE asked_versions (v int); INSERT INTO asked_versions VALUES ({first}), ({last});
         CREATE TEMP TABLE asked_sources (s text); INSERT INTO asked_sources VALUES ('telco_churn'), ('rb_joined_copy');
         ANALYZE asked_versions; ANALYZE asked_sources;",
    ))
    .await?;
    let one = |sql: String| {
        let db = &db;
        async move { db.query_one(&sql, &[]).await.map(|r| r.get::<_, f64>(0)) }
    };
    let mut by_version = Vec::new();
    for v in [first, last] {
        by_version.push((
            v,
            one(format!(
                "SELECT score FROM cerebro.predictions WHERE model = '{name}' AND version = {v} AND key = '1'"
            ))
            .await?,
        ));
    }
    let mut by_source = Vec::new();
    for s in ["rb_joined_copy", "telco_churn"] {
        by_source.push((s.to_owned(), one(format!("SELECT score FROM cerebro.predictions WHERE model = '{name}' AND version = {last} AND source = '{s}' AND key = '1'")).await?));
    }
    assert!((by_version[0].1 - by_version[1].1).abs() > 1e-9 && (by_source[0].1 - by_source[1].1).abs() > 1e-9);
    let versions = [
        "SELECT v.v, p.score FROM asked_versions v
         JOIN cerebro.predictions p ON p.version = v.v AND p.model = $1 AND p.key = '1' ORDER BY 1",
        "SELECT v.v, p.score FROM asked_versions v CROSS JOIN LATERAL
         (SELECT score FROM cerebro.predictions WHERE version = v.v AND model = $1 AND key = '1') p ORDER BY 1",
    ];
    let sources = "SELECT s.s, p.score FROM asked_sources s
                   JOIN cerebro.predictions p ON p.source = s.s AND p.model = $1 AND p.version = $2 AND p.key = '1'
                   ORDER BY 1";
    let close = |a: f64, b: f64| (a - b).abs() < 1e-6;
    for nestloop in ["on", "off"] {
        db.batch_execute(&format!("SET enable_nestloop = {nestloop}")).await?;
        for mode in ["force_generic_plan", "force_custom_plan"] {
            db.batch_execute(&format!("SET plan_cache_mode = {mode}")).await?;
            for sql in versions {
                match db.query(sql, &[&name]).await {
                    Ok(rows) => {
                        let got: Vec<(i32, f64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
                        assert!(
                            got.len() == 2 && got.iter().zip(&by_version).all(|(g, w)| g.0 == w.0 && close(g.1, w.1)),
                            "{sql} ({mode}, nestloop {nestloop}): {got:?} against {by_version:?}"
                        );
                    }
                    Err(e) => {
                        assert!(nestloop == "off", "{sql} ({mode}): {e:?}");
                        assert_eq!(e.code().map(|c| c.code()), Some("0A000"), "{e:?}");
                    }
                }
            }
            match db.query(sources, &[&name, &last]).await {
                Ok(rows) => {
                    let got: Vec<(String, f64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
                    assert!(
                        got.len() == 2 && got.iter().zip(&by_source).all(|(g, w)| g.0 == w.0 && close(g.1, w.1)),
                        "sources ({mode}, nestloop {nestloop}): {got:?} against {by_source:?}"
                    );
                }
                Err(e) => {
                    assert!(nestloop == "off", "sources ({mode}): {e:?}");
                    assert_eq!(e.code().map(|c| c.code()), Some("0A000"), "{e:?}");
                }
            }
        }
    }
    db.batch_execute("RESET enable_nestloop; RESET plan_cache_mode").await?;

    // Versions from the catalog: those with scores are scored, one that
    // has none (queued or training for long) has no rows, where the same
    // version named by the query is 55000.
    db.execute(
        "INSERT INTO cerebro.models (name, source, target, key, options)
         VALUES ($1, 'telco_churn', 'churn', 'customer_id', '{\"epochs\": 50000, \"patience\": 0}')",
        &[&name],
    )
    .await?;
    let per_version: Vec<(i32, i64)> = db
        .query(
            "SELECT m.version, count(p.key) FROM cerebro.models m
             JOIN cerebro.predictions p ON p.model = m.name AND p.version = m.version
             WHERE m.name = $1 GROUP BY 1 ORDER BY 1",
            &[&name],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(per_version, [(first, 7043), (last, 7043)], "the queued version has no rows");
    let queued: i32 = db.query_one("SELECT max(version) FROM cerebro.models WHERE name = $1", &[&name]).await?.get(0);
    let named = db
        .query_one(
            &format!("SELECT count(*) FROM cerebro.predictions WHERE model = '{name}' AND version = {queued}"),
            &[],
        )
        .await
        .expect_err("a queued version named by the query");
    assert_eq!(named.code().map(|c| c.code()), Some("55000"), "{named:?}");
    // Computed once by the query (an InitPlan), it is named too.
    let computed = db
        .query_one(
            "SELECT count(*) FROM cerebro.predictions
             WHERE model = $1 AND version = (SELECT max(version) FROM cerebro.models WHERE name = $1)",
            &[&name],
        )
        .await
        .expect_err("a queued version the query computes");
    assert_eq!(computed.code().map(|c| c.code()), Some("55000"), "{computed:?}");
    db.execute("SELECT cerebro.cancel($1, $2)", &[&name, &queued]).await?;
    // A condition on the version the scan cannot use is refused, not left
    // to a filter over the default's rows.
    let wrapped = db
        .query(
            "SELECT count(*) FROM asked_versions v
             JOIN cerebro.predictions p ON p.version::text = v.v::text AND p.model = $1 AND p.key = '1'",
            &[&name],
        )
        .await
        .expect_err("a condition the scan cannot use");
    assert_eq!(wrapped.code().map(|c| c.code()), Some("0A000"), "{wrapped:?}");
    // Two scans joined on their source each keep their own default.
    let pairs: i64 = db
        .query_one(
            &format!(
                "SELECT count(*) FROM cerebro.predictions a JOIN cerebro.predictions b USING (key, source)
                 WHERE a.model = '{MODEL}' AND b.model = '{name}' AND b.version = {last}"
            ),
            &[],
        )
        .await?
        .get(0);
    assert_eq!(pairs, 7043);
    db.batch_execute("DROP TABLE rb_joined_copy").await?;
    Ok(())
}
