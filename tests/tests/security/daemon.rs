//! cerebrod's sessions against users who hold locks or squat its lock.

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use cerebro_tests::{
    daemon_log, daemon_scores, insert_telco_model, model_state, wait_for, wait_until_done, Daemon, Env,
};
use tokio_postgres::Client;

use crate::{db_error, hostile_role, TRAIN_TIMEOUT};

/// What the daemon logged since `from` (a length of its log): the log is
/// shared by every test and every tier.
fn log_since(env: &Env, from: usize) -> String {
    daemon_log(env).get(from..).unwrap_or_default().to_owned()
}

/// Versions of `name` and the state of their jobs.
async fn jobs_of(db: &Client, name: &str) -> anyhow::Result<Vec<(i32, String, String)>> {
    Ok(db
        .query(
            "SELECT m.version, m.status::text, j.state::text FROM cerebro.model_versions m
             JOIN cerebro.jobs j ON j.model_version_id = m.id WHERE m.name = $1 ORDER BY m.version",
            &[&name],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// Whether the transaction `client` has open holds a transaction id (so its
/// row locks are still held).
async fn still_holding(client: &Client) -> anyhow::Result<bool> {
    Ok(client.query_one("SELECT pg_current_xact_id_if_assigned() IS NOT NULL", &[]).await?.get(0))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_advisory_lock_no_longer_keeps_cerebrod_from_starting() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    // The key of the advisory lock cerebrod used to take: any role may take it.
    let squatter = hostile_role(&env, "sec_squatter", false).await?;
    squatter.execute("SELECT pg_advisory_lock(204386829)", &[]).await?;

    // Nor can it take the table lock that replaced it, in any mode.
    for mode in ["EXCLUSIVE", "ACCESS SHARE"] {
        squatter.batch_execute("BEGIN").await?;
        let err = squatter
            .batch_execute(&format!("LOCK TABLE cerebro.daemon_lock IN {mode} MODE NOWAIT"))
            .await
            .expect_err("nobody but cerebrod's role may lock cerebro.daemon_lock");
        assert_eq!(db_error(&err).0, "42501", "{mode}: {:?}", db_error(&err));
        squatter.batch_execute("ROLLBACK").await?;
    }

    let daemon = Daemon::start(&env)?;
    let v = insert_telco_model(&db, "sec_squat", r#"{"epochs": 2}"#).await?;
    let seen = wait_until_done(&db, "sec_squat", v, TRAIN_TIMEOUT).await?;
    assert_eq!(seen.last().map(String::as_str), Some("ready"), "{seen:?}");

    // The daemon lock still keeps a second daemon out.
    let out = std::process::Command::new(&env.daemon_bin).arg("--config").arg(&env.config).output()?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("another cerebrod"), "{stderr}");
    assert!(UnixStream::connect(&env.socket).is_ok(), "the first daemon still serves");

    // pg_dump's lock goes through the daemon's (ACCESS SHARE, as a superuser).
    db.batch_execute(
        "BEGIN; SET LOCAL lock_timeout = '2s'; LOCK TABLE cerebro.daemon_lock IN ACCESS SHARE MODE; COMMIT",
    )
    .await?;
    // The lock is a view's: a database-wide VACUUM and ANALYZE never wait for it.
    db.batch_execute("SET lock_timeout = '2s'").await?;
    db.batch_execute("VACUUM").await?;
    db.batch_execute("ANALYZE").await?;
    db.batch_execute("RESET lock_timeout").await?;
    // The squatter's advisory lock was never in the way, and it still has it.
    let held: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
             WHERE l.locktype = 'advisory' AND l.objid = 204386829 AND a.usename = 'sec_squatter' AND l.granted",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(held, 1);
    drop(daemon);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_lock_holds_vacuum_back_nowhere() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let daemon = Daemon::start(&env)?;
    // The session holding the daemon lock stays idle in its transaction for
    // the daemon's life: it must hold no snapshot (and no transaction id),
    // or VACUUM could remove no dead row of the database while it lives.
    let lock = db
        .query_one(
            "SELECT a.state, a.backend_xmin::text, a.backend_xid::text
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
             WHERE l.relation = 'cerebro.daemon_lock'::regclass AND l.mode = 'ExclusiveLock' AND l.granted",
            &[],
        )
        .await?;
    let (state, xmin, xid): (String, Option<String>, Option<String>) = (lock.get(0), lock.get(1), lock.get(2));
    assert_eq!(state, "idle in transaction");
    assert_eq!((xmin, xid), (None, None), "the daemon lock's session holds a snapshot or a transaction id");
    // Its look for a DROP EXTENSION waiting on the lock (every poll) keeps
    // no lock of a catalog it reads, pg_database's above all (which a
    // VACUUM FULL of it, and then every new connection, would wait for).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let others: Vec<String> = db
        .query(
            "SELECT l.relation::regclass::text FROM pg_locks l
             WHERE l.pid = (SELECT pid FROM pg_locks WHERE relation = 'cerebro.daemon_lock'::regclass
                            AND mode = 'ExclusiveLock' AND granted)
               AND l.locktype = 'relation' AND l.relation <> 'cerebro.daemon_lock'::regclass",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(others.is_empty(), "the daemon lock's session holds locks on {others:?}");
    // What a DBA sees: VACUUM marks the pages of rows everyone can see as
    // visible to all (what index-only scans and freezing rely on).
    db.batch_execute(
        "DROP TABLE IF EXISTS sec_vacuum; CREATE TABLE sec_vacuum AS SELECT g FROM generate_series(1, 10000) g",
    )
    .await?;
    db.batch_execute("VACUUM sec_vacuum").await?;
    let pages =
        db.query_one("SELECT relallvisible, relpages FROM pg_class WHERE oid = 'sec_vacuum'::regclass", &[]).await?;
    let (all_visible, total): (i32, i32) = (pages.get(0), pages.get(1));
    assert!(total > 0 && all_visible == total, "VACUUM marked {all_visible} of {total} pages all-visible");
    db.batch_execute("DROP TABLE sec_vacuum").await?;
    drop(daemon);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_holding_locks_on_its_jobs_does_not_stop_training_for_others() -> anyhow::Result<()> {
    let env = Env::from_env().with_config_value("locks", "lock_timeout_ms", "1000")?;
    let db = env.connect().await?;
    let holder = hostile_role(&env, "sec_holder", true).await?;
    let log_start = daemon_log(&env).len();
    let _daemon = Daemon::start(&env)?;

    // Two candidates of one shape: one stack.
    holder
        .execute(
            "INSERT INTO cerebro.models (name, source, target, key, spec) VALUES ('sec_hold', 'telco_churn', 'churn',
                 'customer_id', 'model hidden = [128, 128]
                                 train lr = {1e-3, 5e-4}, epochs = 200, patience = 0')",
            &[],
        )
        .await?;
    wait_for(&db, "sec_hold", 1, TRAIN_TIMEOUT, |s, e| s == "training" && e >= 1).await?;
    let selection: i64 =
        holder.query_one("SELECT id FROM cerebro.selections WHERE name = 'sec_hold'", &[]).await?.get(0);
    // Asking to cancel, in a transaction left open, locks the jobs' rows.
    holder.batch_execute("BEGIN").await?;
    let n: i32 = holder.query_one("SELECT cerebro.cancel_selection($1)", &[&selection]).await?.get(0);
    assert_eq!(n, 2, "both candidates were still training");

    // Meanwhile another role's model trains, once the held stack is done.
    let started = Instant::now();
    let v = insert_telco_model(&db, "sec_bystander", r#"{"epochs": 2}"#).await?;
    let seen = wait_until_done(&db, "sec_bystander", v, Duration::from_secs(150)).await?;
    assert_eq!(seen.last().map(String::as_str), Some("ready"), "{seen:?}");
    assert!(still_holding(&holder).await?, "the holder's transaction was open all along");
    eprintln!("the bystander was ready {:?} after it was queued", started.elapsed());
    // The held candidates finished training, but their ending waits for the lock.
    for (version, status, state) in jobs_of(&db, "sec_hold").await? {
        assert_eq!((status.as_str(), state.as_str()), ("training", "running"), "version {version}");
    }
    assert!(UnixStream::connect(&env.socket).is_ok(), "the daemon still serves");
    let log = log_since(&env, log_start);
    assert!(!log.contains("check the daemon role's privileges"), "{log}");
    assert!(log.contains("held a lock on the job's catalog rows"), "{log}");

    // Once the lock is released, the candidates go back to the queue and train.
    holder.batch_execute("ROLLBACK").await?;
    for v in [1, 2] {
        let seen = wait_until_done(&db, "sec_hold", v, TRAIN_TIMEOUT).await?;
        assert_eq!(seen.last().map(String::as_str), Some("ready"), "version {v}: {seen:?}");
    }
    for (version, status, state) in jobs_of(&db, "sec_hold").await? {
        assert_eq!((status.as_str(), state.as_str()), ("ready", "done"), "version {version}");
    }
    let attempts: Vec<i32> = db
        .query(
            "SELECT j.attempts FROM cerebro.jobs j JOIN cerebro.model_versions m ON m.id = j.model_version_id
             WHERE m.name = 'sec_hold' ORDER BY m.version",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(attempts, vec![2, 2], "the held attempt counts");
    assert!(!log_since(&env, log_start).contains("check the daemon role's privileges"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_held_deployment_delays_a_promotion_but_not_training() -> anyhow::Result<()> {
    let env = Env::from_env().with_config_value("locks", "lock_timeout_ms", "1000")?;
    let db = env.connect().await?;
    let holder = hostile_role(&env, "sec_holder", true).await?;
    let log_start = daemon_log(&env).len();
    let _daemon = Daemon::start(&env)?;
    let v1 = insert_telco_model(&holder, "sec_promo", r#"{"epochs": 2}"#).await?;
    wait_until_done(&db, "sec_promo", v1, TRAIN_TIMEOUT).await?;

    // Deploying in a transaction left open holds the model's deployment row.
    holder.batch_execute("BEGIN").await?;
    holder.execute("SELECT cerebro.deploy('sec_promo', $1)", &[&v1]).await?;
    let other = env.connect_as("sec_holder", &env.db).await?;
    other
        .execute(
            "INSERT INTO cerebro.models (name, source, target, key, spec) VALUES ('sec_promo', 'telco_churn',
                 'churn', 'customer_id', 'model hidden = [16]
                                          train lr = {1e-3, 5e-4}, epochs = 3
                                          promote')",
            &[],
        )
        .await?;
    let (selection, versions): (i64, Vec<i32>) = {
        let id: i64 = db.query_one("SELECT id FROM cerebro.selections WHERE name = 'sec_promo'", &[]).await?.get(0);
        let rows = db
            .query("SELECT version FROM cerebro.model_versions WHERE selection_id = $1 ORDER BY version", &[&id])
            .await?;
        (id, rows.iter().map(|r| r.get(0)).collect())
    };
    for &v in &versions {
        let seen = wait_until_done(&db, "sec_promo", v, TRAIN_TIMEOUT).await?;
        assert_eq!(seen.last().map(String::as_str), Some("ready"), "{seen:?}");
    }
    // The promotion waits for the deployment row; training goes on.
    let b = insert_telco_model(&db, "sec_bystander2", r#"{"epochs": 2}"#).await?;
    let seen = wait_until_done(&db, "sec_bystander2", b, Duration::from_secs(120)).await?;
    assert_eq!(seen.last().map(String::as_str), Some("ready"), "{seen:?}");
    assert!(still_holding(&holder).await?);
    let open: bool =
        db.query_one("SELECT finished_at IS NULL FROM cerebro.selections WHERE id = $1", &[&selection]).await?.get(0);
    assert!(open, "the selection cannot close while its promotion is held up");

    // Released: a later pass of the daemon closes the selection and promotes.
    holder.batch_execute("ROLLBACK").await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let promoted = loop {
        let row = db
            .query_one(
                "SELECT finished_at IS NOT NULL, promoted_version FROM cerebro.selections WHERE id = $1",
                &[&selection],
            )
            .await?;
        if row.get::<_, bool>(0) {
            break row.get::<_, Option<i32>>(1);
        }
        anyhow::ensure!(Instant::now() < deadline, "the selection was not closed after the lock was released");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let promoted = promoted.expect("the selection promotes its winner");
    assert!(versions.contains(&promoted));
    let deployed: i32 =
        db.query_one("SELECT version FROM cerebro.deployments WHERE name = 'sec_promo'", &[]).await?.get(0);
    assert_eq!(deployed, promoted);
    let log = log_since(&env, log_start);
    assert!(!log.contains("check the daemon role's privileges"), "{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn finish_selection_is_cerebrods_alone() -> anyhow::Result<()> {
    let env = Env::from_env();
    let hostile = hostile_role(&env, "sec_finisher", false).await?;
    let err = hostile
        .query_one("SELECT cerebro.finish_selection(1)", &[])
        .await
        .expect_err("only cerebrod's role may close a selection");
    assert_eq!(db_error(&err).0, "42501", "{:?}", db_error(&err));
    Ok(())
}

/// Operators that fail loudly, in a schema put first in the daemon's
/// search_path by its connection string: a daemon session that resolved an
/// unqualified `=` through that path would run them.
#[tokio::test(flavor = "multi_thread")]
async fn cerebrod_pins_its_search_path() -> anyhow::Result<()> {
    let base = Env::from_env();
    let db = base.connect().await?;
    db.batch_execute(
        "DROP SCHEMA IF EXISTS sec_trap CASCADE;
         CREATE SCHEMA sec_trap;
         CREATE FUNCTION sec_trap.eq_int8(bigint, bigint) RETURNS boolean LANGUAGE plpgsql AS
             $$ BEGIN RAISE EXCEPTION 'sec_trap: a search_path operator ran in %', current_user; END $$;
         CREATE FUNCTION sec_trap.eq_text(text, text) RETURNS boolean LANGUAGE plpgsql AS
             $$ BEGIN RAISE EXCEPTION 'sec_trap: a search_path operator ran in %', current_user; END $$;
         CREATE OPERATOR sec_trap.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = sec_trap.eq_int8);
         CREATE OPERATOR sec_trap.= (LEFTARG = text, RIGHTARG = text, FUNCTION = sec_trap.eq_text);",
    )
    .await?;
    let url = format!(
        "\"host={} port={} user=postgres dbname={} options='-c search_path=sec_trap,pg_catalog,public'\"",
        base.pghost, base.pgport, base.db
    );
    let env = base.with_config_value("trap", "database_url", &url)?;
    let log_start = daemon_log(&env).len();
    let result = async {
        let _daemon = Daemon::start(&env)?;
        let v = insert_telco_model(&db, "sec_trapped", r#"{"epochs": 2}"#).await?;
        let seen = wait_until_done(&db, "sec_trapped", v, TRAIN_TIMEOUT).await?;
        let (status, _, error) = model_state(&db, "sec_trapped", v).await?;
        assert_eq!(status, "ready", "{seen:?}: {error:?}");
        // cerebrod score's session too.
        let scores = daemon_scores(&env, "sec_trapped", &[])?;
        assert_eq!(scores.len(), 7043);
        anyhow::Ok(())
    }
    .await;
    db.batch_execute("DROP SCHEMA sec_trap CASCADE").await?;
    result?;
    let log = log_since(&env, log_start);
    assert!(!log.contains("search_path operator ran"), "{log}");
    Ok(())
}

/// An enum's owner can give it a cast to text of their own: `cerebrod score`
/// reads the enum through its output function instead, so the owner's code
/// never runs in the daemon's session (a superuser's here).
#[tokio::test(flavor = "multi_thread")]
async fn cerebrod_score_never_runs_an_enum_owners_cast() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let owner = hostile_role(&env, "sec_caster", true).await?;
    db.batch_execute("DROP SCHEMA IF EXISTS sec_enum CASCADE; CREATE SCHEMA sec_enum AUTHORIZATION sec_caster").await?;
    owner
        .batch_execute(
            "CREATE TYPE sec_enum.tier AS ENUM ('basic', 'premium');
             CREATE DOMAIN sec_enum.tier_d AS sec_enum.tier;
             CREATE TABLE sec_enum.customers AS
                 SELECT customer_id, tenure, churn,
                        (CASE WHEN monthly_charges > 70 THEN 'premium' ELSE 'basic' END)::sec_enum.tier_d AS tier
                 FROM public.telco_churn;
             CREATE FUNCTION sec_enum.tier_text(sec_enum.tier) RETURNS text LANGUAGE plpgsql AS
                 $$ BEGIN RAISE EXCEPTION 'sec_enum: the owner''s cast ran as %', current_user; END $$;
             CREATE CAST (sec_enum.tier AS text) WITH FUNCTION sec_enum.tier_text(sec_enum.tier);",
        )
        .await?;
    let result = async {
        let _daemon = Daemon::start(&env)?;
        owner
            .execute(
                "INSERT INTO cerebro.models (name, source, target, key, options)
                 VALUES ('sec_enum_model', 'sec_enum.customers', 'churn', 'customer_id', '{\"epochs\": 2}')",
                &[],
            )
            .await?;
        let seen = wait_until_done(&db, "sec_enum_model", 1, TRAIN_TIMEOUT).await?;
        let (status, _, error) = model_state(&db, "sec_enum_model", 1).await?;
        assert_eq!(status, "ready", "{seen:?}: {error:?}");
        let scores = daemon_scores(&env, "sec_enum_model", &[])?;
        assert_eq!(scores.len(), 7043);
        anyhow::Ok(())
    }
    .await;
    db.batch_execute("DROP SCHEMA sec_enum CASCADE").await?;
    result
}

/// One role's oversized request fails with the reason instead of taking the
/// daemon's memory; the daemon trains the next job.
#[tokio::test(flavor = "multi_thread")]
async fn a_model_too_big_for_the_daemon_fails_saying_so() -> anyhow::Result<()> {
    let env = Env::from_env().with_config_value("cerebrod-modelmem", "model_memory_mib", "1")?;
    let db = env.connect().await?;
    let hog = hostile_role(&env, "sec_hog", true).await?;
    let daemon = Daemon::start(&env)?;
    let v =
        insert_telco_model(&hog, "sec_hog_model", r#"{"hidden": [512, 512], "batch_size": 4096, "epochs": 2}"#).await?;
    wait_until_done(&hog, "sec_hog_model", v, TRAIN_TIMEOUT).await?;
    let (status, _, error) = model_state(&hog, "sec_hog_model", v).await?;
    assert_eq!(status, "failed");
    let error = error.unwrap_or_default();
    assert!(error.contains("model_memory_mib"), "{error}");
    drop(daemon);
    // With the default budget the daemon trains an ordinary model.
    let _daemon = Daemon::start(&Env::from_env())?;
    let v = insert_telco_model(&db, "sec_after_hog", r#"{"epochs": 2}"#).await?;
    let seen = wait_until_done(&db, "sec_after_hog", v, TRAIN_TIMEOUT).await?;
    assert_eq!(seen.last().map(String::as_str), Some("ready"));
    Ok(())
}

/// CPU seconds a process has used (user + system), from /proc.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses: utime and
    // stime are fields 14 and 15 of the line, in clock ticks.
    let after = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    let hz = std::process::Command::new("getconf").arg("CLK_TCK").output()?;
    let per_second: f64 = String::from_utf8(hz.stdout)?.trim().parse()?;
    Ok(ticks / per_second)
}

/// An imported graph that would run for as long as its author likes is
/// stopped at the daemon's scoring deadline, not left running after the
/// query gave up.
#[tokio::test(flavor = "multi_thread")]
async fn a_graph_that_never_ends_is_stopped_at_the_scoring_deadline() -> anyhow::Result<()> {
    let env = Env::from_env().with_config_value("cerebrod-deadline", "scoring_deadline_ms", "1500")?;
    let spinner = hostile_role(&env, "sec_spinner", true).await?;
    let daemon = Daemon::start(&env)?;
    let path = std::env::temp_dir().join(format!("cerebro-spin-{}.onnx", std::process::id()));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/make_spinning_onnx.py");
    let out = std::process::Command::new(&env.python).arg(script).arg(&path).arg("4611686018427387904").output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let onnx = std::fs::read(&path)?;
    std::fs::remove_file(&path)?;
    spinner
        .query(
            "SELECT cerebro.import_onnx('sec_spinner', $1, 'telco_churn', '{\"x\": \"tenure\"}', 'regression',
                                        NULL, 'y', 'customer_id')",
            &[&onnx],
        )
        .await?;
    let started = Instant::now();
    let err = spinner
        .query("SELECT count(*) FROM cerebro.predictions WHERE model = 'sec_spinner'", &[])
        .await
        .expect_err("the run is stopped");
    let (_, message) = db_error(&err);
    assert!(message.contains("scoring_deadline_ms"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(60), "stopped at the deadline, not at the backend's timeout");
    // Imported with a target, it is measured and distilled on its frozen
    // rows, each run stopped at the same deadline.
    spinner
        .query(
            "SELECT cerebro.import_onnx('sec_spinner', $1, 'telco_churn', '{\"x\": \"tenure\"}', 'regression',
                                        NULL, 'y', 'customer_id', 'monthly_charges')",
            &[&onnx],
        )
        .await?;
    for call in [
        "SELECT * FROM cerebro.measure_importance('sec_spinner', 2)",
        "SELECT * FROM cerebro.distill('sec_spinner', 2)",
    ] {
        let started = Instant::now();
        let err = spinner.query(call, &[]).await.expect_err("the run is stopped");
        let (_, message) = db_error(&err);
        assert!(message.contains("scoring_deadline_ms"), "{call}: {message}");
        assert!(started.elapsed() < Duration::from_secs(60), "{call}: stopped at the deadline");
    }
    // A statement timeout reached while the backend waits on cerebrod is
    // PostgreSQL's own error, not a cancel "due to user request".
    spinner.batch_execute("SET statement_timeout = '300ms'").await?;
    let err = spinner
        .query("SELECT * FROM cerebro.measure_importance('sec_spinner', 2)", &[])
        .await
        .expect_err("the statement times out");
    assert_eq!(db_error(&err), ("57014".into(), "canceling statement due to statement timeout".into()));
    spinner.batch_execute("RESET statement_timeout").await?;
    // Its run goes on in cerebrod until the deadline.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    // Nothing of it keeps running once stopped: the daemon is idle again.
    let before = cpu_seconds(daemon.pid())?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let spent = cpu_seconds(daemon.pid())? - before;
    assert!(spent < 1.0, "cerebrod used {spent:.2} CPU seconds in 3 s after the run was stopped");
    Ok(())
}
