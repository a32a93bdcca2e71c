//! The extension against a hostile role: a role with only what PUBLIC has
//! (and SELECT on telco_churn) and a schema of its own, trying to run its
//! code as the extension owner, as cerebrod or as a superuser who scores its
//! models; injection through the key; probing for other roles' models.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cerebro_tests::{daemon_scores, wait_until_done, Daemon, Env};
use futures_util::StreamExt;
use tokio_postgres::{AsyncMessage, Client, NoTls};

use crate::{db_error, hostile_role, is_superuser, TRAIN_TIMEOUT};

const MALLORY: &str = "sec_mallory";

/// A connection as `role` that keeps every notice and warning the server sends.
async fn connect_recording(env: &Env, role: &str) -> anyhow::Result<(Client, Arc<Mutex<Vec<String>>>)> {
    let url = format!("host={} port={} user={role} dbname={}", env.pghost, env.pgport, env.db);
    let (client, mut conn) = tokio_postgres::connect(&url, NoTls).await?;
    let notices = Arc::new(Mutex::new(Vec::new()));
    let sink = notices.clone();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notice(n) = message {
                sink.lock().expect("notices").push(n.message().to_owned());
            }
        }
    });
    Ok((client, notices))
}

/// Mallory's schema, first in her search_path, with a trap: a function that,
/// run by any role but hers, records the role (a warning the caller's client
/// sees even if the statement rolls back, and a row in `caught`) and tries to
/// make her a superuser.
async fn arm_mallory(env: &Env) -> anyhow::Result<Client> {
    let mallory = hostile_role(env, MALLORY, true).await?;
    let admin = env.connect().await?;
    admin
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {MALLORY} CASCADE; CREATE SCHEMA {MALLORY} AUTHORIZATION {MALLORY};"
        ))
        .await?;
    mallory
        .batch_execute(&format!(
            "CREATE TABLE {MALLORY}.caught (role name, what text);
             GRANT INSERT ON {MALLORY}.caught TO PUBLIC;
             CREATE FUNCTION {MALLORY}.trap(what text) RETURNS void LANGUAGE plpgsql AS $$
             BEGIN
                 IF current_user OPERATOR(pg_catalog.<>) '{MALLORY}' THEN
                     RAISE WARNING 'trap % ran as %', what, current_user;
                     INSERT INTO {MALLORY}.caught VALUES (current_user, what);
                     BEGIN
                         EXECUTE 'ALTER ROLE {MALLORY} SUPERUSER';
                     EXCEPTION WHEN OTHERS THEN NULL;
                     END;
                 END IF;
             END $$;
             ALTER ROLE {MALLORY} SET search_path = {MALLORY}, public;"
        ))
        .await?;
    Ok(mallory)
}

/// What the trap caught: its warnings on `notices`, and the rows it left.
async fn caught(env: &Env, notices: &Arc<Mutex<Vec<String>>>) -> anyhow::Result<Vec<String>> {
    let admin = env.connect().await?;
    let mut seen: Vec<String> =
        notices.lock().expect("notices").iter().filter(|n| n.contains("trap")).cloned().collect();
    for row in admin.query(&format!("SELECT role::text || ': ' || what FROM {MALLORY}.caught"), &[]).await? {
        seen.push(row.get(0));
    }
    Ok(seen)
}

/// Her trap never ran with another role's rights (on any of the
/// connections whose notices are given, nor in her table), and she is not a
/// superuser.
async fn assert_contained(env: &Env, notices: &[&Arc<Mutex<Vec<String>>>]) -> anyhow::Result<()> {
    let mut seen = Vec::new();
    for n in notices {
        seen.extend(caught(env, n).await?);
    }
    seen.dedup();
    assert!(seen.is_empty(), "her code ran with another role's rights: {seen:?}");
    assert!(!is_superuser(env, MALLORY).await?, "{MALLORY} became a superuser");
    Ok(())
}

/// How many rows `db` scores with `model` over its own source.
async fn scored_rows(db: &Client, model: &str) -> anyhow::Result<i64> {
    let sql = format!("SELECT count(*) FROM cerebro.predictions WHERE model = '{model}'");
    Ok(db.query_one(&sql, &[]).await?.get(0))
}

/// Scoring `model` over its own source as `db` is refused (42501) because
/// it would run another role's code; the error.
async fn refused_scoring(db: &Client, model: &str, why: &str) -> anyhow::Result<tokio_postgres::Error> {
    let sql = format!("SELECT count(*) FROM cerebro.predictions WHERE model = '{model}'");
    let err = db.query(&sql, &[]).await.expect_err(why);
    let (code, message) = db_error(&err);
    assert_eq!(code, "42501", "{model}, {why}: {message}");
    Ok(err)
}

async fn wait_ready(db: &Client, name: &str) -> anyhow::Result<i32> {
    let version: i32 = db.query_one("SELECT max(version) FROM cerebro.models WHERE name = $1", &[&name]).await?.get(0);
    let seen = wait_until_done(db, name, version, TRAIN_TIMEOUT).await?;
    anyhow::ensure!(seen.last().map(String::as_str) == Some("ready"), "{name} v{version}: {seen:?}");
    Ok(version)
}

#[tokio::test(flavor = "multi_thread")]
async fn functions_and_operators_in_a_hostile_search_path_never_run_with_more_rights() -> anyhow::Result<()> {
    let env = Env::from_env();
    let _daemon = Daemon::start(&env)?;
    arm_mallory(&env).await?;
    let (mallory, notices) = connect_recording(&env, MALLORY).await?;
    // Look-alikes of what Cerebro's SQL calls, first in her path: the same
    // signatures win over pg_catalog's, an unknown-typed literal prefers text.
    let mut traps = String::new();
    for (name, args, returns, body) in [
        ("nextval", "regclass", "bigint", "pg_catalog.nextval($1)"),
        ("nextval", "text", "bigint", "pg_catalog.nextval($1::pg_catalog.regclass)"),
        ("now", "", "timestamptz", "pg_catalog.now()"),
        ("encode", "bytea, text", "text", "pg_catalog.encode($1, $2)"),
        ("sha256", "bytea", "bytea", "pg_catalog.sha256($1)"),
        ("to_regclass", "text", "regclass", "pg_catalog.to_regclass($1)"),
        ("hashtext", "text", "integer", "pg_catalog.hashtext($1)"),
        ("pg_total_relation_size", "regclass", "bigint", "pg_catalog.pg_total_relation_size($1)"),
        ("pg_notify", "text, text", "void", "pg_catalog.pg_notify($1, $2)"),
        ("jsonb_build_object", "text, jsonb", "jsonb", "pg_catalog.jsonb_build_object($1, $2)"),
        ("eq_text", "text, text", "boolean", "$1 OPERATOR(pg_catalog.=) $2"),
        ("eq_name", "name, name", "boolean", "$1 OPERATOR(pg_catalog.=) $2"),
        ("eq_oid", "oid, oid", "boolean", "$1 OPERATOR(pg_catalog.=) $2"),
        ("eq_int8", "bigint, bigint", "boolean", "$1 OPERATOR(pg_catalog.=) $2"),
        ("eq_int4", "integer, integer", "boolean", "$1 OPERATOR(pg_catalog.=) $2"),
        ("get_text", "jsonb, text", "text", "$1 OPERATOR(pg_catalog.->>) $2"),
    ] {
        let ret = if returns == "void" { format!("PERFORM {body}; RETURN;") } else { format!("RETURN {body};") };
        traps.push_str(&format!(
            "CREATE FUNCTION {MALLORY}.{name}({args}) RETURNS {returns} LANGUAGE plpgsql AS
                 $$ BEGIN PERFORM {MALLORY}.trap('{name}'); {ret} END $$;\n"
        ));
    }
    for (op, function, left, right) in [
        ("=", "eq_text", "text", "text"),
        ("=", "eq_name", "name", "name"),
        ("=", "eq_oid", "oid", "oid"),
        ("=", "eq_int8", "bigint", "bigint"),
        ("=", "eq_int4", "integer", "integer"),
        ("->>", "get_text", "jsonb", "text"),
    ] {
        traps.push_str(&format!(
            "CREATE OPERATOR {MALLORY}.{op} (LEFTARG = {left}, RIGHTARG = {right}, FUNCTION = {MALLORY}.{function});\n"
        ));
    }
    mallory.batch_execute(&traps).await?;

    // Everything a role does with its own model, through the trapped path.
    mallory.batch_execute(&format!("SET search_path = {MALLORY}, public")).await?;
    mallory
        .execute(
            "INSERT INTO cerebro.models (name, source, target, key, options)
             VALUES ('sec_path', 'telco_churn', 'churn', 'customer_id', '{\"epochs\": 2}')",
            &[],
        )
        .await?;
    mallory
        .execute(
            "INSERT INTO cerebro.models (name, source, target, key, spec)
             VALUES ('sec_path_sel', 'telco_churn', 'churn', 'customer_id', 'train lr = {0.01, 0.001}, epochs = 2')",
            &[],
        )
        .await?;
    wait_ready(&mallory, "sec_path").await?;
    let listed: i64 = mallory.query_one("SELECT count(*) FROM cerebro.models", &[]).await?.get(0);
    assert!(listed >= 3, "her models are listed: {listed}");
    assert_eq!(scored_rows(&mallory, "sec_path").await?, 7043);
    for call in [
        "SELECT cerebro.deploy('sec_path', 1)",
        "SELECT cerebro.export_onnx('sec_path', 1)",
        "SELECT cerebro.grant_model('sec_path', 'postgres')",
        "SELECT cerebro.cancel_selection((SELECT max(id) FROM cerebro.selections))",
        "SELECT cerebro.reproduce('sec_path', 1)",
    ] {
        mallory.batch_execute(call).await.map_err(|e| anyhow::anyhow!("{call}: {e}"))?;
    }
    wait_ready(&mallory, "sec_path").await?;
    mallory.execute("INSERT INTO cerebro.models (name, change) VALUES ('sec_path', 'train lr = 3e-4')", &[]).await?;
    wait_ready(&mallory, "sec_path").await?;
    mallory.batch_execute("SELECT cerebro.delete_model('sec_path', 2)").await?;

    // A superuser whose path is as unsafe, using her model.
    let (admin, admin_notices) = connect_recording(&env, "postgres").await?;
    admin.batch_execute(&format!("SET search_path = {MALLORY}, public")).await?;
    admin.query("SELECT name, status, metrics FROM cerebro.models", &[]).await?;
    admin.query("SELECT * FROM cerebro.archive", &[]).await?;
    let scored: i64 = admin
        .query_one("SELECT count(*) FROM cerebro.predictions WHERE model OPERATOR(pg_catalog.=) 'sec_path'", &[])
        .await?
        .get(0);
    assert_eq!(scored, 7043);
    admin.batch_execute("SELECT cerebro.deploy('sec_path', 3); SELECT cerebro.rollback('sec_path')").await?;

    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_contained(&env, &[&notices, &admin_notices]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cast_on_a_users_own_type_runs_neither_as_the_owner_nor_in_cerebrod_nor_for_a_scorer() -> anyhow::Result<()> {
    let env = Env::from_env();
    let _daemon = Daemon::start(&env)?;
    arm_mallory(&env).await?;
    let (mallory, notices) = connect_recording(&env, MALLORY).await?;
    // Only the TEMP privilege every role has: a temporary enum, a cast of her
    // own from it to text, and a temporary table whose target has that type.
    mallory
        .batch_execute(&format!(
            "CREATE TYPE pg_temp.verdict AS ENUM ('No', 'Yes');
             CREATE FUNCTION pg_temp.spy(pg_temp.verdict) RETURNS text LANGUAGE plpgsql AS
                 $$ BEGIN PERFORM {MALLORY}.trap('temp cast'); RETURN 'x'; END $$;
             CREATE CAST (pg_temp.verdict AS text) WITH FUNCTION pg_temp.spy(pg_temp.verdict);
             CREATE TEMP TABLE t AS SELECT customer_id, tenure, contract, churn::pg_temp.verdict AS churn
                 FROM public.telco_churn;
             INSERT INTO cerebro.models (name, source, target, key, options)
                 VALUES ('sec_temp_cast', 't', 'churn', 'customer_id', '{{\"epochs\": 2}}');"
        ))
        .await?;
    wait_ready(&mallory, "sec_temp_cast").await?;
    let labels: Vec<String> = mallory
        .query_one("SELECT class_labels FROM cerebro.model_versions WHERE name = 'sec_temp_cast'", &[])
        .await?
        .get(0);
    assert_eq!(labels, ["No", "Yes"], "the labels are the enum's own, not what her cast returns");

    // The same with a type in her schema, which outlives her session: a
    // superuser scores the model (as a DBA auditing every model would), in
    // SQL and with `cerebrod score`.
    mallory
        .batch_execute(&format!(
            "CREATE TYPE {MALLORY}.plan AS ENUM ('Month-to-month', 'One year', 'Two year');
             CREATE FUNCTION {MALLORY}.spy(plan {MALLORY}.plan) RETURNS text LANGUAGE plpgsql AS
                 $$ BEGIN PERFORM {MALLORY}.trap('cast'); RETURN 'x'; END $$;
             CREATE CAST ({MALLORY}.plan AS text) WITH FUNCTION {MALLORY}.spy({MALLORY}.plan);
             CREATE TABLE {MALLORY}.customers AS SELECT customer_id, tenure, contract::{MALLORY}.plan AS contract,
                 churn FROM public.telco_churn;
             INSERT INTO cerebro.models (name, source, target, key, options)
                 VALUES ('sec_cast', 'customers', 'churn', 'customer_id', '{{\"epochs\": 2}}');"
        ))
        .await?;
    wait_ready(&mallory, "sec_cast").await?;
    let (admin, admin_notices) = connect_recording(&env, "postgres").await?;
    let scored = admin.query("SELECT key, score FROM cerebro.predictions WHERE model = 'sec_cast'", &[]).await?;
    assert_eq!(scored.len(), 7043);
    let hers = mallory.query("SELECT key, score FROM cerebro.predictions WHERE model = 'sec_cast'", &[]).await?;
    let score_of = |rows: &[tokio_postgres::Row]| {
        let mut v: Vec<(String, f64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    assert_eq!(score_of(&scored), score_of(&hers), "the superuser and she see the same scores");
    let reference = daemon_scores(&env, "sec_cast", &[])?;
    assert_eq!(reference.len(), 7043);

    assert_contained(&env, &[&notices, &admin_notices]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trojan_source_is_not_scored_with_another_roles_rights() -> anyhow::Result<()> {
    let env = Env::from_env();
    let _daemon = Daemon::start(&env)?;
    arm_mallory(&env).await?;
    let alice = hostile_role(&env, "sec_alice", true).await?;
    let (mallory, notices) = connect_recording(&env, MALLORY).await?;
    mallory
        .batch_execute(&format!(
            "CREATE FUNCTION {MALLORY}.spy() RETURNS boolean LANGUAGE plpgsql AS
                 $$ BEGIN PERFORM {MALLORY}.trap('query source'); RETURN true; END $$;
             CREATE VIEW {MALLORY}.churners AS SELECT * FROM public.telco_churn WHERE {MALLORY}.spy();
             GRANT SELECT ON {MALLORY}.churners TO PUBLIC;
             INSERT INTO cerebro.models (name, source, target, key, options)
                 VALUES ('sec_trojan', '(SELECT * FROM public.telco_churn WHERE (SELECT {MALLORY}.spy()))',
                         'churn', 'customer_id', '{{\"epochs\": 2}}');
             INSERT INTO cerebro.models (name, source, target, key, options)
                 VALUES ('sec_trojan_view', 'churners', 'churn', 'customer_id', '{{\"epochs\": 2}}');
             SELECT cerebro.grant_model('sec_trojan', 'sec_alice');"
        ))
        .await?;
    wait_ready(&mallory, "sec_trojan").await?;
    wait_ready(&mallory, "sec_trojan_view").await?;
    // Her own scoring runs her own code, as her.
    assert_eq!(scored_rows(&mallory, "sec_trojan").await?, 7043);

    let (admin, admin_notices) = connect_recording(&env, "postgres").await?;
    for model in ["sec_trojan", "sec_trojan_view"] {
        let err = refused_scoring(&admin, model, "a superuser does not run her source").await?;
        let (_, message) = db_error(&err);
        assert!(message.contains(&format!("of role \"{MALLORY}\"")), "{message}");
        let hint = err.as_db_error().and_then(|d| d.hint()).unwrap_or("").to_owned();
        assert!(hint.contains("source ="), "{hint}");
        // Deriving from it would run it too.
        let err = admin
            .execute(&format!("INSERT INTO cerebro.models (name, change) VALUES ('{model}', 'train lr = 0.01')"), &[])
            .await
            .expect_err("a superuser does not derive over her source");
        assert_eq!(db_error(&err).0, "42501", "{err}");
    }
    // A role she granted the model to fares the same.
    refused_scoring(&alice, "sec_trojan", "a grantee does not run her source").await?;
    // Naming the rows to score is the scorer's choice, read like any query.
    let named: i64 = admin
        .query_one(
            "SELECT count(*) FROM cerebro.predictions WHERE model = 'sec_trojan' AND source = 'public.telco_churn'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(named, 7043);

    assert_contained(&env, &[&notices, &admin_notices]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_never_becomes_sql_even_without_standard_conforming_strings() -> anyhow::Result<()> {
    let env = Env::from_env();
    let _daemon = Daemon::start(&env)?;
    let admin = env.connect().await?;
    admin
        .batch_execute(
            "DROP TABLE IF EXISTS public.sec_secrets;
             CREATE TABLE public.sec_secrets (secret text);
             INSERT INTO public.sec_secrets VALUES ('hunter2-the-secret');",
        )
        .await?;
    admin
        .execute(
            "INSERT INTO cerebro.models (name, source, target, key, options)
             VALUES ('sec_key', 'telco_churn', 'churn', 'customer_id', '{\"epochs\": 2}')",
            &[],
        )
        .await?;
    wait_ready(&admin, "sec_key").await?;
    admin.batch_execute("SET standard_conforming_strings = off").await?;
    let payload = r"\') OR (SELECT secret FROM public.sec_secrets LIMIT 1)::int > 0 --";
    // Bound, as an application passes what a visitor typed.
    let bound = admin
        .query("SELECT key, score FROM cerebro.predictions WHERE model = 'sec_key' AND key = $1", &[&payload])
        .await;
    // Written inline, with the old escape rules.
    let escaped = payload.replace('\\', "\\\\").replace('\'', "\\'");
    let inline = admin
        .query(
            &format!("SELECT key, score FROM cerebro.predictions WHERE model = 'sec_key' AND key = '{escaped}'"),
            &[],
        )
        .await;
    let listed = admin
        .query(
            "SELECT key FROM cerebro.predictions WHERE model = 'sec_key' AND key = ANY($1)",
            &[&vec![payload.to_string(), "7590".to_string()]],
        )
        .await;
    for (how, result) in [("bound", bound), ("inline", inline), ("listed", listed)] {
        match result {
            Ok(rows) => assert!(rows.len() <= 1, "{how}: the payload matched {} rows", rows.len()),
            // The key is compared as the key column's type (integer): the
            // payload, whole, is a value that integer input refuses, never SQL.
            Err(e) => {
                let (code, message) = db_error(&e);
                let refused_as_data = format!("invalid input syntax for type integer: \"{payload}\"");
                assert!(code == "22P02" && message == refused_as_data, "{how}: the key was run as SQL: {message}");
            }
        }
    }
    admin.batch_execute("RESET standard_conforming_strings").await?;
    Ok(())
}

/// Mallory probes a model she was never granted: every answer is the one a
/// model that does not exist gets.
#[tokio::test(flavor = "multi_thread")]
async fn another_roles_model_is_indistinguishable_from_none() -> anyhow::Result<()> {
    let env = Env::from_env();
    let _daemon = Daemon::start(&env)?;
    let admin = env.connect().await?;
    admin
        .execute(
            "INSERT INTO cerebro.models (name, source, target, key, spec)
             VALUES ('sec_private', 'telco_churn', 'churn', 'customer_id', 'train lr = {0.01, 0.001}, epochs = 2')",
            &[],
        )
        .await?;
    let selection: i64 =
        admin.query_one("SELECT max(id) FROM cerebro.selections WHERE name = 'sec_private'", &[]).await?.get(0);
    let mallory = hostile_role(&env, MALLORY, true).await?;

    let answer = |result: Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>, name: &str| match result {
        Ok(rows) => format!("{} rows", rows.len()),
        Err(e) => {
            let (code, message) = db_error(&e);
            let hint = e.as_db_error().and_then(|d| d.hint()).unwrap_or("").to_owned();
            format!("{code} {} {}", message.replace(name, "NAME"), hint.replace(name, "NAME"))
        }
    };
    for probe in [
        "SELECT * FROM cerebro.predictions WHERE model = 'NAME'",
        "SELECT * FROM cerebro.predictions WHERE model = 'NAME' AND version = 1",
        "SELECT cerebro.deploy('NAME', 1)",
        "SELECT cerebro.rollback('NAME')",
        "SELECT cerebro.export_onnx('NAME', 1)",
        "SELECT cerebro.reproduce('NAME', 1)",
        "SELECT cerebro.delete_model('NAME', 1)",
        "SELECT cerebro.grant_model('NAME', 'sec_mallory')",
        "SELECT cerebro.revoke_model('NAME', 'sec_mallory')",
        "SELECT cerebro.may_use('NAME', 'sec_mallory')",
        "INSERT INTO cerebro.models (name, change) VALUES ('NAME', 'train lr = 0.1')",
        "SELECT * FROM cerebro.models WHERE name = 'NAME'",
        "SELECT * FROM cerebro.archive WHERE name = 'NAME'",
        "SELECT * FROM cerebro.leaderboard WHERE name = 'NAME'",
        "SELECT * FROM cerebro.lineage WHERE name = 'NAME'",
        "SELECT * FROM cerebro.selections WHERE name = 'NAME'",
        "SELECT * FROM cerebro.audit_log WHERE model = 'NAME'",
    ] {
        let real = answer(mallory.query(&probe.replace("NAME", "sec_private"), &[]).await, "sec_private");
        let none = answer(mallory.query(&probe.replace("NAME", "sec_no_such_model"), &[]).await, "sec_no_such_model");
        assert_eq!(real, none, "{probe}");
    }
    for probe in ["SELECT cerebro.cancel_selection(ID)"] {
        let real =
            answer(mallory.query(&probe.replace("ID", &selection.to_string()), &[]).await, &selection.to_string());
        let none = answer(mallory.query(&probe.replace("ID", "987654321"), &[]).await, "987654321");
        assert_eq!(real, none, "{probe}");
    }
    // Asking about another role is refused outright.
    let err = mallory.query("SELECT cerebro.may_use('sec_private', 'postgres')", &[]).await.expect_err("refused");
    assert_eq!(db_error(&err).0, "42501");
    // Internal functions are not hers to call.
    let err = mallory.query(&format!("SELECT cerebro.finish_selection({selection})"), &[]).await.expect_err("refused");
    assert_eq!(db_error(&err).0, "42501");
    // Every catalog table shows her nothing of it.
    let ids: Vec<i64> = admin
        .query("SELECT id FROM cerebro.model_versions WHERE name = 'sec_private'", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let snapshots: Vec<i64> = admin
        .query("SELECT DISTINCT snapshot_id FROM cerebro.model_versions WHERE name = 'sec_private'", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for (table, mine) in [
        ("model_versions", "name = 'sec_private'"),
        ("jobs", "model_version_id = ANY($1)"),
        ("training_history", "model_version_id = ANY($1)"),
        ("model_features", "model_version_id = ANY($1)"),
        ("model_metrics", "model_version_id = ANY($1)"),
        ("model_layers", "model_version_id = ANY($1)"),
        ("snapshots", "id = ANY($2)"),
        ("selections", "id = $3"),
        ("deployments", "name = 'sec_private'"),
        ("deployment_history", "name = 'sec_private'"),
        ("audit_log", "model = 'sec_private'"),
        ("model_grants", "name = 'sec_private'"),
    ] {
        let query = format!("SELECT count(*) FROM cerebro.{table} WHERE {mine} AND $1::bigint[] IS NOT NULL AND $2::bigint[] IS NOT NULL AND $3::bigint IS NOT NULL");
        let theirs: i64 = admin.query_one(&query, &[&ids, &snapshots, &selection]).await?.get(0);
        let hers: i64 = mallory.query_one(&query, &[&ids, &snapshots, &selection]).await?.get(0);
        assert_eq!(hers, 0, "cerebro.{table} shows her {hers} of its {theirs} rows");
    }
    // The system catalogs show snapshot tables (as they show every table),
    // but none of a model's column names.
    let names: Vec<String> = mallory
        .query(
            "SELECT a.attname::text FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
             WHERE c.relnamespace = 'cerebro_data'::regnamespace AND a.attnum > 0",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!names.is_empty());
    assert!(names.iter().all(|n| n.starts_with('c') && n[1..].parse::<u32>().is_ok()), "{names:?}");
    // A version of a name she cannot see: the name is taken, nothing more.
    let err = mallory
        .execute(
            "INSERT INTO cerebro.models (name, source, target, key)
             VALUES ('sec_private', 'telco_churn', 'churn', 'customer_id')",
            &[],
        )
        .await
        .expect_err("the name is taken");
    let (code, message) = db_error(&err);
    assert_eq!(code, "42710", "{message}");
    assert!(
        !message.contains("postgres") && !err.as_db_error().and_then(|d| d.hint()).unwrap_or("").contains("postgres")
    );
    admin.batch_execute(&format!("SELECT cerebro.cancel_selection({selection})")).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_source_in_the_creators_own_schema_trains_and_scores() -> anyhow::Result<()> {
    let env = Env::from_env();
    let _daemon = Daemon::start(&env)?;
    arm_mallory(&env).await?;
    // Her search_path is her schema first; she names the table unqualified.
    let mallory = env.connect_as(MALLORY, &env.db).await?;
    mallory
        .batch_execute(&format!(
            "CREATE TABLE {MALLORY}.et AS SELECT * FROM public.telco_churn;
             INSERT INTO cerebro.models (name, source, target, key, options)
                 VALUES ('sec_own_schema', 'et', 'churn', 'customer_id', '{{\"epochs\": 2}}');"
        ))
        .await?;
    wait_ready(&mallory, "sec_own_schema").await?;
    let source: String =
        mallory.query_one("SELECT source FROM cerebro.models WHERE name = 'sec_own_schema'", &[]).await?.get(0);
    assert_eq!(source, format!("{MALLORY}.et"));
    assert_eq!(scored_rows(&mallory, "sec_own_schema").await?, 7043);
    Ok(())
}

/// ONNX's external data names a file by path: imported, such a model would
/// make cerebrod read a server file into the model and score with it.
#[tokio::test(flavor = "multi_thread")]
async fn an_onnx_model_that_points_at_a_server_file_is_refused() -> anyhow::Result<()> {
    let env = Env::from_env();
    let mallory = hostile_role(&env, MALLORY, true).await?;
    let dir = std::env::temp_dir().join(format!("cerebro-sec-onnx-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("model.onnx");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/make_external_onnx.py");
    let out = std::process::Command::new(&env.python).arg(script).arg(&path).arg("--external-data").output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let onnx = std::fs::read(&path)?;
    std::fs::remove_dir_all(&dir)?;
    let err = mallory
        .query(
            "SELECT cerebro.import_onnx('sec_external_data', $1, 'telco_churn',
                 '{\"numbers\": [\"tenure\", \"monthly_charges\"], \"contract\": \"contract\"}', 'binary',
                 ARRAY['No', 'Yes'], NULL, 'customer_id')",
            &[&onnx],
        )
        .await
        .expect_err("a model with external data is refused");
    let (code, message) = db_error(&err);
    assert_eq!(code, "22023", "{message}");
    assert!(message.contains("external file"), "{message}");
    let stored: i64 =
        mallory.query_one("SELECT count(*) FROM cerebro.models WHERE name = 'sec_external_data'", &[]).await?.get(0);
    assert_eq!(stored, 0);
    Ok(())
}

/// The archive's trigger function is SECURITY DEFINER: attached to a table
/// of a role's own, it would run that role's casts as its owner.
#[tokio::test(flavor = "multi_thread")]
async fn no_security_definer_function_is_a_roles_to_call_or_attach() -> anyhow::Result<()> {
    let env = Env::from_env();
    arm_mallory(&env).await?;
    let (mallory, notices) = connect_recording(&env, MALLORY).await?;
    let err = mallory
        .batch_execute(&format!(
            "CREATE TYPE pg_temp.evil AS ENUM ('x');
             CREATE FUNCTION pg_temp.pwn(pg_temp.evil) RETURNS bigint LANGUAGE plpgsql AS
                 $$ BEGIN PERFORM {MALLORY}.trap('trigger cast'); RETURN -1; END $$;
             CREATE CAST (pg_temp.evil AS bigint) WITH FUNCTION pg_temp.pwn(pg_temp.evil) AS IMPLICIT;
             CREATE TEMP TABLE fake (id pg_temp.evil, features jsonb, options jsonb, metrics jsonb);
             CREATE TRIGGER t AFTER INSERT ON fake FOR EACH ROW EXECUTE FUNCTION cerebro.index_model_version();
             INSERT INTO fake VALUES ('x', '[]', '{{}}', '{{}}');"
        ))
        .await
        .expect_err("the trigger function is not hers to attach");
    assert_eq!(db_error(&err).0, "42501", "{err}");
    let callable: Vec<String> = mallory
        .query(
            "SELECT p.oid::regprocedure::text FROM pg_proc p
             WHERE p.pronamespace = 'cerebro'::regnamespace AND p.prosecdef
               AND has_function_privilege(current_user, p.oid, 'EXECUTE')",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(callable.is_empty(), "SECURITY DEFINER functions PUBLIC may call: {callable:?}");
    assert_contained(&env, &[&notices]).await?;
    Ok(())
}

/// Reproducing, deriving from or scoring a version does not change whose
/// code its source runs: the analysed source is what is checked.
#[tokio::test(flavor = "multi_thread")]
async fn a_reproduced_version_does_not_launder_a_trojan_source() -> anyhow::Result<()> {
    let env = Env::from_env();
    let _daemon = Daemon::start(&env)?;
    arm_mallory(&env).await?;
    let (mallory, notices) = connect_recording(&env, MALLORY).await?;
    mallory
        .batch_execute(&format!(
            "CREATE FUNCTION {MALLORY}.spy() RETURNS integer LANGUAGE plpgsql AS
                 $$ BEGIN PERFORM {MALLORY}.trap('laundered'); RETURN 1; END $$;
             INSERT INTO cerebro.models (name, source, target, key, options)
                 VALUES ('sec_launder', '(SELECT t.*, {MALLORY}.spy() AS z FROM public.telco_churn t)',
                         'churn', 'customer_id', '{{\"epochs\": 2}}');"
        ))
        .await?;
    wait_ready(&mallory, "sec_launder").await?;
    let (admin, admin_notices) = connect_recording(&env, "postgres").await?;
    admin.batch_execute("SELECT cerebro.reproduce('sec_launder', 1)").await?;
    wait_ready(&admin, "sec_launder").await?;
    refused_scoring(&admin, "sec_launder", "still her code").await?;
    assert_contained(&env, &[&notices, &admin_notices]).await?;
    Ok(())
}

/// A table another role trained on, swapped for a view by its owner; and a
/// table whose row-level security policies are its owner's code.
#[tokio::test(flavor = "multi_thread")]
async fn a_tables_owner_cannot_slip_code_into_another_roles_scoring() -> anyhow::Result<()> {
    let env = Env::from_env();
    let _daemon = Daemon::start(&env)?;
    arm_mallory(&env).await?;
    let alice = hostile_role(&env, "sec_alice", true).await?;
    let (mallory, notices) = connect_recording(&env, MALLORY).await?;
    mallory
        .batch_execute(&format!(
            "CREATE FUNCTION {MALLORY}.spy() RETURNS boolean LANGUAGE plpgsql AS
                 $$ BEGIN PERFORM {MALLORY}.trap('swapped view or policy'); RETURN true; END $$;
             CREATE TABLE {MALLORY}.shared AS SELECT * FROM public.telco_churn;
             GRANT SELECT ON {MALLORY}.shared TO PUBLIC;
             CREATE TABLE {MALLORY}.guarded AS SELECT * FROM public.telco_churn;
             GRANT SELECT ON {MALLORY}.guarded TO PUBLIC;
             ALTER TABLE {MALLORY}.guarded ENABLE ROW LEVEL SECURITY;
             CREATE POLICY p ON {MALLORY}.guarded USING ({MALLORY}.spy());
             INSERT INTO cerebro.models (name, source, target, key, options)
                 VALUES ('sec_guarded', 'guarded', 'churn', 'customer_id', '{{\"epochs\": 2}}');
             SELECT cerebro.grant_model('sec_guarded', 'sec_alice');
             CREATE TABLE {MALLORY}.later AS SELECT * FROM public.telco_churn;
             GRANT SELECT ON {MALLORY}.later TO PUBLIC;
             GRANT USAGE ON SCHEMA {MALLORY} TO sec_alice;
             INSERT INTO cerebro.models (name, source, target, key, options)
                 VALUES ('sec_later', 'later', 'churn', 'customer_id', '{{\"epochs\": 2}}');
             SELECT cerebro.grant_model('sec_later', 'sec_alice');"
        ))
        .await?;
    let (admin, admin_notices) = connect_recording(&env, "postgres").await?;
    admin
        .execute(
            &format!(
                "INSERT INTO cerebro.models (name, source, target, key, options)
                 VALUES ('sec_swapped', '{MALLORY}.shared', 'churn', 'customer_id', '{{\"epochs\": 2}}')"
            ),
            &[],
        )
        .await?;
    wait_ready(&admin, "sec_swapped").await?;
    wait_ready(&mallory, "sec_guarded").await?;
    wait_ready(&mallory, "sec_later").await?;
    // Scored while they run nothing of hers: each session keeps that
    // verdict only until the catalog changes.
    assert_eq!(scored_rows(&admin, "sec_swapped").await?, 7043);
    assert_eq!(scored_rows(&alice, "sec_later").await?, 7043);
    let by_key = "SELECT count(*) FROM cerebro.predictions WHERE model = $1 AND key = '7'";
    assert_eq!(admin.query_one(by_key, &[&"sec_swapped"]).await?.get::<_, i64>(0), 1);
    mallory
        .batch_execute(&format!(
            "ALTER TABLE {MALLORY}.later ENABLE ROW LEVEL SECURITY;
             CREATE POLICY p ON {MALLORY}.later USING ({MALLORY}.spy());"
        ))
        .await?;
    let err = refused_scoring(&alice, "sec_later", "a policy of hers added since the last scan").await?;
    assert!(db_error(&err).1.contains("row-level security policies"), "{err}");
    mallory
        .batch_execute(&format!(
            "ALTER TABLE {MALLORY}.shared RENAME TO shared_data;
             CREATE VIEW {MALLORY}.shared AS SELECT * FROM {MALLORY}.shared_data WHERE {MALLORY}.spy();
             GRANT SELECT ON {MALLORY}.shared TO PUBLIC;"
        ))
        .await?;
    refused_scoring(&admin, "sec_swapped", "the view is her code").await?;
    let err = admin.query(by_key, &[&"sec_swapped"]).await.expect_err("by key, the view is her code too");
    assert_eq!(db_error(&err).0, "42501");
    // Her policy runs for a grantee who does not bypass row-level security.
    let err = refused_scoring(&alice, "sec_guarded", "the policy is her code").await?;
    assert!(db_error(&err).1.contains("row-level security policies"), "refused for her policy: {err}");
    // A superuser skips policies: nothing of hers runs, so it scores.
    assert_eq!(scored_rows(&admin, "sec_guarded").await?, 7043);
    assert_contained(&env, &[&notices, &admin_notices]).await?;
    Ok(())
}

/// Within one running function (a DO block), each query sees grants and
/// revokes committed since, as it would see any table's rows.
#[tokio::test(flavor = "multi_thread")]
async fn a_revoke_is_seen_by_the_next_query_of_a_running_block() -> anyhow::Result<()> {
    let env = Env::from_env();
    let admin = env.connect().await?;
    admin
        .execute(
            "INSERT INTO cerebro.models (name, source, target, key, options)
             VALUES ('sec_revoked', 'telco_churn', 'churn', 'customer_id', '{\"epochs\": 2}')",
            &[],
        )
        .await?;
    let mallory = hostile_role(&env, MALLORY, true).await?;
    admin.batch_execute("SELECT cerebro.grant_model('sec_revoked', 'sec_mallory')").await?;
    mallory.batch_execute("CREATE TEMP TABLE seen (at int, n bigint)").await?;
    let watching = tokio::spawn(async move {
        let result = mallory
            .batch_execute(
                "DO $$ BEGIN FOR i IN 1..40 LOOP
                     INSERT INTO seen SELECT i, count(*) FROM cerebro.model_versions WHERE name = 'sec_revoked';
                     PERFORM pg_sleep(0.1);
                 END LOOP; END $$",
            )
            .await;
        (mallory, result)
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    admin.batch_execute("SELECT cerebro.revoke_model('sec_revoked', 'sec_mallory')").await?;
    let (mallory, result) = watching.await?;
    result?;
    let first: i64 = mallory.query_one("SELECT n FROM seen WHERE at = 1", &[]).await?.get(0);
    let last: i64 = mallory.query_one("SELECT n FROM seen WHERE at = 40", &[]).await?.get(0);
    assert_eq!((first, last), (1, 0), "granted at first, revoked by the end");
    Ok(())
}

/// Numbering a model's versions takes a lock no role can hold: an advisory
/// lock on the name, which any role could take, stalled other roles' INSERTs.
#[tokio::test(flavor = "multi_thread")]
async fn nobody_can_hold_the_lock_that_numbers_a_models_versions() -> anyhow::Result<()> {
    let env = Env::from_env();
    let mallory = hostile_role(&env, MALLORY, true).await?;
    mallory
        .batch_execute(
            "SELECT pg_advisory_lock(hashtext('cerebro.models'), hashtext('sec_numbered'));
             SELECT pg_advisory_lock(hashtext('sec_numbered'))",
        )
        .await?;
    let err = mallory
        .batch_execute("BEGIN; SELECT * FROM cerebro.model_names FOR UPDATE")
        .await
        .expect_err("not hers to lock");
    assert_eq!(db_error(&err).0, "42501", "{err}");
    mallory.batch_execute("ROLLBACK").await?;
    let admin = env.connect().await?;
    admin.batch_execute("SET statement_timeout = '20s'").await?;
    admin
        .execute(
            "INSERT INTO cerebro.models (name, source, target, key, options)
             VALUES ('sec_numbered', 'telco_churn', 'churn', 'customer_id', '{\"epochs\": 2}')",
            &[],
        )
        .await?;
    admin.batch_execute("RESET statement_timeout").await?;
    mallory.batch_execute("SELECT pg_advisory_unlock_all()").await?;
    Ok(())
}

/// A view of another role can hide what it runs where no function of that
/// role appears: SQL text a builtin runs (`query_to_xml`), a setting it
/// changes for the rest of the scorer's session (`set_config`), a scan of
/// `cerebro.predictions` over a source it names, an operator whose negator
/// the planner puts in its place. Who wrote the view is what counts.
#[tokio::test(flavor = "multi_thread")]
async fn code_hidden_behind_builtins_or_the_planner_is_still_its_authors() -> anyhow::Result<()> {
    let env = Env::from_env();
    let _daemon = Daemon::start(&env)?;
    arm_mallory(&env).await?;
    let (mallory, notices) = connect_recording(&env, MALLORY).await?;
    mallory
        .batch_execute(&format!(
            "CREATE FUNCTION {MALLORY}.spy() RETURNS integer LANGUAGE plpgsql AS
                 $$ BEGIN PERFORM {MALLORY}.trap('hidden'); RETURN 1; END $$;
             CREATE FUNCTION {MALLORY}.ge(integer, integer) RETURNS boolean LANGUAGE plpgsql AS
                 $$ BEGIN PERFORM {MALLORY}.trap('negator'); RETURN $1 OPERATOR(pg_catalog.>=) $2; END $$;
             CREATE OPERATOR {MALLORY}.>>>= (LEFTARG = integer, RIGHTARG = integer, FUNCTION = {MALLORY}.ge);
             CREATE OPERATOR {MALLORY}.<<< (LEFTARG = integer, RIGHTARG = integer, FUNCTION = pg_catalog.int4lt,
                                            NEGATOR = OPERATOR({MALLORY}.>>>=));
             GRANT USAGE ON SCHEMA {MALLORY} TO PUBLIC;
             CREATE VIEW {MALLORY}.hiding AS
                 SELECT customer_id, churn, tenure, monthly_charges, contract FROM public.telco_churn;
             INSERT INTO cerebro.models (name, source, target, key, options)
                 VALUES ('sec_hiding', 'hiding', 'churn', 'customer_id', '{{\"epochs\": 2}}');
             SELECT cerebro.grant_model('sec_hiding', 'postgres');"
        ))
        .await?;
    wait_ready(&mallory, "sec_hiding").await?;
    let (admin, admin_notices) = connect_recording(&env, "postgres").await?;
    let columns = "t.customer_id, t.churn, t.tenure, t.monthly_charges, t.contract";
    for (what, view) in [
        (
            "query_to_xml",
            format!(
                "SELECT {columns}, length(pg_catalog.query_to_xml('SELECT {MALLORY}.spy()', true, false, '')::text)
                 AS junk FROM public.telco_churn t"
            ),
        ),
        (
            "set_config",
            format!(
                "SELECT {columns} FROM public.telco_churn t
                 WHERE pg_catalog.set_config('search_path', '{MALLORY}, pg_catalog', false) IS NOT NULL"
            ),
        ),
        (
            "a scan naming its source",
            format!(
                "SELECT {columns} FROM public.telco_churn t WHERE (SELECT count(*) FROM cerebro.predictions p
                 WHERE p.model = 'sec_hiding' AND p.source = '(SELECT customer_id, tenure, monthly_charges,
                 contract, {MALLORY}.spy() AS z FROM public.telco_churn LIMIT 1)') >= 0"
            ),
        ),
        (
            "a negator",
            format!("SELECT {columns} FROM public.telco_churn t WHERE NOT (t.tenure OPERATOR({MALLORY}.<<<) -1)"),
        ),
    ] {
        mallory.batch_execute(&format!("DROP VIEW {MALLORY}.hiding; CREATE VIEW {MALLORY}.hiding AS {view}")).await?;
        let (_, message) = db_error(&refused_scoring(&admin, "sec_hiding", what).await?);
        assert!(message.contains(&format!("view {MALLORY}.hiding")), "{what}: {message}");
    }
    let path: String = admin.query_one("SHOW search_path", &[]).await?.get(0);
    assert!(!path.contains(MALLORY), "the scan changed the scorer's search_path: {path}");

    // The scorer's own view, over her operator: the planner would run her
    // negator, so the operator is checked too.
    admin
        .batch_execute(
            "CREATE OR REPLACE VIEW public.sec_own_view AS SELECT * FROM public.telco_churn;
             INSERT INTO cerebro.models (name, source, target, key, options)
                 VALUES ('sec_own_view', 'public.sec_own_view', 'churn', 'customer_id', '{\"epochs\": 2}');",
        )
        .await?;
    wait_ready(&admin, "sec_own_view").await?;
    admin
        .batch_execute(&format!(
            "CREATE OR REPLACE VIEW public.sec_own_view AS SELECT * FROM public.telco_churn t
             WHERE NOT (t.tenure OPERATOR({MALLORY}.<<<) -1)"
        ))
        .await?;
    let (_, message) = db_error(&refused_scoring(&admin, "sec_own_view", "her negator").await?);
    assert!(message.contains(&format!("operator {MALLORY}.")), "{message}");
    admin.batch_execute("DROP VIEW public.sec_own_view CASCADE").await?;
    assert_contained(&env, &[&notices, &admin_notices]).await?;
    Ok(())
}
