//! PostgreSQL restarted and cerebrod killed while a selection trains and a
//! scan streams. Before issue 12 cerebrod exited on the first lost
//! connection ("the connection to the database was lost") and nothing
//! started it again, so every queued and training job stalled. Now it
//! reconnects by itself, and deploy/watchdog.sh (systemd's Restart=on-failure
//! where there is systemd) starts it again when it dies.
//!
//! "Nothing lost" is checked against a reference: the same selection trained
//! without a fault, whose every candidate must come out with the same
//! weights.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cerebro_tests::{
    daemon_log, insert_telco_model, job_attempts, model_state, wait_for, wait_until_done, Daemon, Env, Supervised,
};
use tokio_postgres::Client;

use crate::TRAIN_TIMEOUT;

/// Four candidates in two stacks of two (one per shape), slow enough that a
/// fault lands while a stack trains.
const SPEC: &str = "model hidden = {[128, 128], [96, 48]}
train lr = {0.01, 0.003}, epochs = 400, batch_size = 64, patience = 0";

/// The selection trained without a fault, whose weights the others must equal.
const REFERENCE: &str = "rs_reference";

/// Models scored by the tests: trained once per database.
const SCORED: &str = "rs_scored";
const UNLOADED: &str = "rs_unloaded";

/// How long a restarted or reconnecting daemon may take to serve again.
const BACK_TIMEOUT: Duration = Duration::from_secs(60);

async fn insert_selection(db: &Client, name: &str) -> anyhow::Result<()> {
    db.execute(
        "INSERT INTO cerebro.models (name, source, target, key, spec)
         VALUES ($1, 'telco_churn', 'churn', 'customer_id', $2)",
        &[&name, &SPEC],
    )
    .await?;
    Ok(())
}

/// Waits for cerebrod to close selection `name` (after its last candidate);
/// returns its id.
async fn wait_for_selection(db: &Client, name: &str) -> anyhow::Result<i64> {
    let deadline = Instant::now() + TRAIN_TIMEOUT;
    loop {
        let row = db
            .query_one("SELECT id, finished_at IS NOT NULL FROM cerebro.selections WHERE name = $1", &[&name])
            .await?;
        if row.get::<_, bool>(1) {
            return Ok(row.get(0));
        }
        anyhow::ensure!(Instant::now() < deadline, "selection {name} not finished after {TRAIN_TIMEOUT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One candidate as it ended.
#[derive(Debug, Clone, PartialEq)]
struct Candidate {
    version: i32,
    status: String,
    weights: Option<String>,
    attempts: i32,
    error: Option<String>,
    /// Epochs in training_history, and distinct ones.
    history: (i64, i64),
    epoch: i32,
}

/// Every candidate of selection `name`, by its hyper-parameters.
async fn candidates(db: &Client, name: &str) -> anyhow::Result<BTreeMap<String, Candidate>> {
    let rows = db
        .query(
            "SELECT concat_ws(' ', m.options->'hidden', m.options->'learning_rate'), m.version, m.status::text, m.weights_sha256, j.attempts, m.error,
                    (SELECT count(*) FROM cerebro.training_history h WHERE h.model_version_id = m.id),
                    (SELECT count(DISTINCT h.epoch) FROM cerebro.training_history h WHERE h.model_version_id = m.id),
                    m.epoch
             FROM cerebro.model_versions m JOIN cerebro.jobs j ON j.model_version_id = m.id
             WHERE m.name = $1 ORDER BY m.version",
            &[&name],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                Candidate {
                    version: r.get(1),
                    status: r.get(2),
                    weights: r.get(3),
                    attempts: r.get(4),
                    error: r.get(5),
                    history: (r.get(6), r.get(7)),
                    epoch: r.get(8),
                },
            )
        })
        .collect())
}

/// The reference selection's weights by hyper-parameters, trained (by the
/// daemon running now) the first time a test asks.
async fn reference(db: &Client) -> anyhow::Result<BTreeMap<String, String>> {
    let exists: i64 =
        db.query_one("SELECT count(*) FROM cerebro.selections WHERE name = $1", &[&REFERENCE]).await?.get(0);
    if exists == 0 {
        insert_selection(db, REFERENCE).await?;
    }
    wait_for_selection(db, REFERENCE).await?;
    let mut weights = BTreeMap::new();
    for (triple, c) in candidates(db, REFERENCE).await? {
        anyhow::ensure!(c.status == "ready" && c.attempts == 1, "reference candidate {triple}: {c:?}");
        weights.insert(triple, c.weights.expect("a ready version has weights"));
    }
    anyhow::ensure!(weights.len() == 4, "{weights:?}");
    Ok(weights)
}

/// Checks that selection `name` lost nothing: every candidate ready, with
/// the reference's weights and one history row per epoch it trained.
async fn assert_nothing_lost(db: &Client, name: &str, reference: &BTreeMap<String, String>) -> anyhow::Result<()> {
    wait_for_selection(db, name).await?;
    let got = candidates(db, name).await?;
    assert_eq!(got.len(), reference.len(), "{got:?}");
    for (triple, c) in &got {
        assert_eq!(c.status, "ready", "{triple}: {c:?}");
        assert_eq!(c.weights.as_ref(), reference.get(triple), "{triple} trained other weights than without a fault");
        assert_eq!(c.history, (c.epoch as i64, c.epoch as i64), "{triple}: one history row per epoch: {c:?}");
        assert!(c.attempts <= 3, "{triple}: {c:?}");
    }
    Ok(())
}

/// A ready plain model `name` (trained once per database).
async fn ready_model(db: &Client, name: &str) -> anyhow::Result<()> {
    let ready: i64 = db
        .query_one("SELECT count(*) FROM cerebro.models WHERE name = $1 AND status = 'ready'", &[&name])
        .await?
        .get(0);
    if ready == 0 {
        db.execute(
            "INSERT INTO cerebro.models (name, source, target, key, options)
             VALUES ($1, 'telco_churn', 'churn', 'customer_id', '{\"epochs\": 2}')",
            &[&name],
        )
        .await?;
        let version: i32 =
            db.query_one("SELECT max(version) FROM cerebro.models WHERE name = $1", &[&name]).await?.get(0);
        let seen = wait_until_done(db, name, version, TRAIN_TIMEOUT).await?;
        assert_eq!(seen.last().map(String::as_str), Some("ready"), "{seen:?}");
    }
    Ok(())
}

async fn count_scored(db: &Client, model: &str) -> Result<i64, tokio_postgres::Error> {
    Ok(db.query_one("SELECT count(*) FROM cerebro.predictions WHERE model = $1", &[&model]).await?.get(0))
}

/// A connection once the server accepts them again.
async fn reconnect(env: &Env) -> anyhow::Result<Client> {
    let deadline = Instant::now() + BACK_TIMEOUT;
    loop {
        match env.connect().await {
            Ok(db) => return Ok(db),
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for PostgreSQL: {e:#}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Waits until cerebrod's log, past `from`, says `what`.
async fn wait_for_log(env: &Env, from: usize, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + BACK_TIMEOUT;
    while !daemon_log(env).get(from..).is_some_and(|l| l.contains(what)) {
        anyhow::ensure!(Instant::now() < deadline, "cerebrod's log never said {what:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// PostgreSQL restarted in `mode` while a selection trains and a scan is
/// half read: the scan's session ends with the server's, a new one scores;
/// the same cerebrod reconnects and the selection ends as if nothing had
/// happened.
async fn restart_mid_selection_and_scan(mode: &str) -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let mut daemon = Daemon::start(&env)?;
    let pid = daemon.pid();
    let reference = reference(&db).await?;
    ready_model(&db, SCORED).await?;
    let name = format!("rs_restart_{mode}");
    insert_selection(&db, &name).await?;
    wait_for(&db, &name, 1, TRAIN_TIMEOUT, |s, e| s == "training" && e >= 2).await?;

    // A scan streaming from another session: small batches, the first few
    // scored and read, the rest waiting.
    let scanner = env.connect().await?;
    scanner
        .batch_execute(&format!(
            "SET cerebro.batch_rows = 100; BEGIN;
             DECLARE scan CURSOR FOR SELECT key, score FROM cerebro.predictions WHERE model = '{SCORED}'"
        ))
        .await?;
    assert_eq!(scanner.query("FETCH 250 FROM scan", &[]).await?.len(), 250);

    let log_from = daemon_log(&env).len();
    let server_log_from = env.server_log_len();
    env.restart_postgres(mode)?;

    // The scan's session went with the server, as every session did.
    let err = scanner.query("FETCH 250 FROM scan", &[]).await.expect_err("the server restarted under the scan");
    assert!(
        err.is_closed() || err.code().is_some_and(|c| c.code().starts_with("57P") || c.code().starts_with("08")),
        "{err:?}"
    );
    // A new session scores at once, from the model cerebrod has loaded,
    // even before cerebrod is back in the database.
    let db = reconnect(&env).await?;
    assert_eq!(count_scored(&db, SCORED).await?, 7043);

    assert_nothing_lost(&db, &name, &reference).await?;
    let first = &candidates(&db, &name).await?.into_values().find(|c| c.version == 1).expect("version 1");
    // A restart on purpose (fast or immediate: SQLSTATE 57P01) counts no
    // attempt: interrupted once, then trained in full, in one attempt.
    assert_eq!(first.attempts, 1, "interrupted by the restart, then trained in full: {first:?}");

    assert!(daemon.is_running(), "cerebrod exited; see {}", env.log.display());
    assert_eq!(daemon.pid(), pid);
    let log = daemon_log(&env)[log_from..].to_string();
    assert!(log.contains("the connection to the database was lost"), "{log}");
    assert!(log.contains("reconnected to the database"), "{log}");
    let server_log = env.server_log_since(server_log_from);
    assert!(!server_log.contains("terminated by signal"), "{server_log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fast_restart_of_postgresql_loses_no_training_and_cerebrod_reconnects() -> anyhow::Result<()> {
    restart_mid_selection_and_scan("fast").await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_immediate_restart_of_postgresql_loses_no_training_and_cerebrod_reconnects() -> anyhow::Result<()> {
    restart_mid_selection_and_scan("immediate").await
}

/// While cerebrod cannot reach the database it still scores the models it
/// has loaded (the data comes from the backend), and refuses the others at
/// once, saying why, instead of leaving the query waiting.
#[tokio::test(flavor = "multi_thread")]
async fn while_cerebrod_is_away_loaded_models_score_and_others_fail_at_once() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let mut daemon = Daemon::start(&env)?;
    ready_model(&db, SCORED).await?;
    ready_model(&db, UNLOADED).await?;
    assert_eq!(count_scored(&db, SCORED).await?, 7043, "loads it");

    let log_from = daemon_log(&env).len();
    let closed = ClosedDatabase::close(&env).await?;
    wait_for_log(&env, log_from, "cannot reconnect to the database").await?;

    assert_eq!(count_scored(&db, SCORED).await?, 7043, "a loaded model needs no database");
    let started = Instant::now();
    let err = count_scored(&db, UNLOADED).await.expect_err("its artifact cannot be read");
    assert!(started.elapsed() < Duration::from_secs(10), "refused at once, not after a wait");
    let db_err = err.as_db_error().expect("an ERROR");
    assert_eq!(db_err.code().code(), "08006", "{db_err:?}");
    assert!(db_err.message().contains("reconnecting"), "{}", db_err.message());

    drop(closed);
    wait_for_log(&env, log_from, "reconnected to the database").await?;
    assert_eq!(count_scored(&db, UNLOADED).await?, 7043);
    assert!(daemon.is_running(), "cerebrod exited; see {}", env.log.display());
    Ok(())
}

/// The test database closed to new connections, and cerebrod's sessions
/// terminated: cerebrod cannot reconnect until this is dropped (also when
/// the test fails half-way, so the database is never left closed).
struct ClosedDatabase {
    env: Env,
}

impl ClosedDatabase {
    async fn close(env: &Env) -> anyhow::Result<ClosedDatabase> {
        // From another database: PostgreSQL refuses to close the one a
        // session is connected to.
        let admin = env.connect_to("postgres").await?;
        // cerebrod's three sessions first: one may still be opening (its data
        // connection right after start-up, say).
        let sessions = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'cerebrod' AND datname = $1";
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while admin.query_one(sessions, &[&env.db]).await?.get::<_, i64>(0) < 3 {
            anyhow::ensure!(std::time::Instant::now() < deadline, "cerebrod did not open its three sessions in 30 s");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let closed = ClosedDatabase { env: env.clone() };
        admin.batch_execute(&format!("ALTER DATABASE {} ALLOW_CONNECTIONS false", env.db)).await?;
        // The sessions chosen first (OFFSET 0 keeps the planner from
        // merging the filters), and only then terminated.
        let terminated: i64 = admin
            .query_one(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(s.pid))
                 FROM (SELECT pid FROM pg_stat_activity
                       WHERE application_name = 'cerebrod' AND datname = $1 OFFSET 0) s",
                &[&env.db],
            )
            .await?
            .get(0);
        // Usually all three; one ending on its own meanwhile (the backend
        // already gone) is not terminated, so what matters is that none is left.
        assert!(terminated >= 1, "the daemon lock's, the job loop's and the data sessions: none terminated");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while admin.query_one(sessions, &[&env.db]).await?.get::<_, i64>(0) > 0 {
            anyhow::ensure!(std::time::Instant::now() < deadline, "cerebrod's sessions did not end in 30 s");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        Ok(closed)
    }
}

impl Drop for ClosedDatabase {
    fn drop(&mut self) {
        // Synchronous, so that it runs when a test panics as well.
        let status = std::process::Command::new(format!("{}/psql", self.env.pgbin))
            .args(["-X", "-q", "-h", &self.env.pghost, "-p", &self.env.pgport, "-U", "postgres", "-d", "postgres"])
            .arg("-c")
            .arg(format!("ALTER DATABASE {} ALLOW_CONNECTIONS true", self.env.db))
            .status();
        assert!(status.is_ok_and(|s| s.success()), "could not open database {} again", self.env.db);
    }
}

/// kill -9 of cerebrod at three moments of a selection (just after the
/// INSERT, during its first stack, during its second) under the watchdog
/// that deploy/lib.sh starts it with: a new cerebrod is back each time, and
/// every candidate ends with the weights of an uninterrupted run.
#[tokio::test(flavor = "multi_thread")]
async fn cerebrod_killed_under_its_watchdog_is_back_and_the_selection_loses_nothing() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let supervised = Supervised::start(&env)?;
    let reference = reference(&db).await?;
    let name = "rs_killed";
    let mut pids = vec![supervised.pid().expect("running")];

    insert_selection(&db, name).await?;
    let killed = supervised.kill_daemon()?;
    pids.push(supervised.wait_serving(Some(killed), BACK_TIMEOUT)?);
    // Versions 1 and 3 share a shape and train as one stack, 2 and 4 as
    // the next.
    for version in [1, 2] {
        wait_for(&db, name, version, TRAIN_TIMEOUT, |s, e| s == "training" && e >= 2).await?;
        let killed = supervised.kill_daemon()?;
        pids.push(supervised.wait_serving(Some(killed), BACK_TIMEOUT)?);
    }
    assert_nothing_lost(&db, name, &reference).await?;
    let got = candidates(&db, name).await?;
    for c in got.values().filter(|c| c.version <= 2) {
        assert!(c.attempts >= 2, "killed while it trained, then trained in full: {c:?}");
    }
    pids.dedup();
    assert_eq!(pids.len(), 4, "a new cerebrod after each kill: {pids:?}");
    let log = daemon_log(&env);
    assert!(log.contains("was killed by signal 9; starting it again"), "the watchdog says what it did");
    Ok(())
}

/// A job whose daemon is killed every time it trains fails after its third
/// attempt, saying why, instead of going round for ever.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_killed_three_times_fails_with_the_reason() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let supervised = Supervised::start(&env)?;
    db.execute(
        "INSERT INTO cerebro.models (name, source, target, key, options)
         VALUES ('rs_thrice', 'telco_churn', 'churn', 'customer_id',
                 '{\"epochs\": 400, \"patience\": 0, \"hidden\": [128, 128], \"batch_size\": 64}')",
        &[],
    )
    .await?;
    let version: i32 =
        db.query_one("SELECT max(version) FROM cerebro.models WHERE name = 'rs_thrice'", &[]).await?.get(0);
    for attempt in 1..=3 {
        let deadline = Instant::now() + TRAIN_TIMEOUT;
        loop {
            let (status, epoch, _) = model_state(&db, "rs_thrice", version).await?;
            if status == "training" && epoch >= 1 && job_attempts(&db, "rs_thrice", version).await? == attempt {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "attempt {attempt} never trained (status {status})");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let killed = supervised.kill_daemon()?;
        supervised.wait_serving(Some(killed), BACK_TIMEOUT)?;
    }
    let seen = wait_until_done(&db, "rs_thrice", version, TRAIN_TIMEOUT).await?;
    let (status, _, error) = model_state(&db, "rs_thrice", version).await?;
    assert_eq!(status, "failed", "{seen:?}");
    let error = error.unwrap_or_default();
    assert!(error.contains("cerebrod stopped during training 3 times; giving up"), "{error}");
    assert_eq!(job_attempts(&db, "rs_thrice", version).await?, 3);
    Ok(())
}

/// A hot standby scores through a cerebrod of its own (as on the
/// standby's machine, where no primary's cerebrod is), which trains
/// nothing there and, once the standby is promoted, takes its lock and
/// trains. Before, cerebrod pointed at a standby exited: a standby on
/// another machine could not score at all.
#[tokio::test(flavor = "multi_thread")]
async fn a_standby_scores_through_a_cerebrod_of_its_own_and_trains_once_promoted() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let mut primary = Daemon::start(&env)?;
    ready_model(&db, SCORED).await?;
    let expected: Vec<(String, f64)> = db
        .query(
            "SELECT key, score FROM cerebro.predictions WHERE model = $1 AND key = ANY ('{1,2,3}') ORDER BY key",
            &[&SCORED],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // The standby's server option names the primary's socket, as it would
    // on its own machine: its cerebrod binds the same path.
    primary.stop()?;
    let standby = cerebro_tests::Standby::start(&env)?;
    let standby_env = env.with_config_value("standby", "database_url", &format!("\"{}\"", standby.url(&env.db)))?;
    let from = daemon_log(&env).len();
    let mut daemon = Daemon::start(&standby_env)?;
    wait_for_log(&env, from, "hot standby").await?;
    let replica = standby.connect(&env.db).await?;
    for in_backend in ["on", "off"] {
        replica.batch_execute(&format!("SET cerebro.score_in_backend = {in_backend}")).await?;
        let scored: Vec<(String, f64)> = replica
            .query(
                "SELECT key, score FROM cerebro.predictions WHERE model = $1 AND key = ANY ('{1,2,3}') ORDER BY key",
                &[&SCORED],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        assert_eq!(scored.len(), 3);
        for ((k, s), (ek, es)) in scored.iter().zip(&expected) {
            assert!(k == ek && (s - es).abs() < 1e-6, "score_in_backend {in_backend}: {k} {s} against {ek} {es}");
        }
        assert_eq!(count_scored(&replica, SCORED).await?, 7043);
        let predicted: f64 = replica
            .query_one("SELECT cerebro.predict($1, t) FROM telco_churn t WHERE customer_id = 1", &[&SCORED])
            .await?
            .get(0);
        assert!((predicted - expected[0].1).abs() < 1e-6, "{predicted} against {}", expected[0].1);
    }
    // A training asked for on the standby is refused by PostgreSQL (25006):
    // the standby's cerebrod has nothing to train.
    let refused = replica
        .execute(
            "INSERT INTO cerebro.models (name, source, target, key) VALUES ('rs_standby', 'telco_churn', 'churn', 'customer_id')",
            &[],
        )
        .await
        .expect_err("a standby takes no INSERT");
    assert_eq!(refused.code().map(|c| c.code()), Some("25006"), "{refused:?}");

    standby.promote()?;
    wait_for_log(&env, from, "the database was promoted").await?;
    let promoted = standby.connect(&env.db).await?;
    promoted
        .execute(
            "INSERT INTO cerebro.models (name, source, target, key, options)
             VALUES ('rs_promoted', 'telco_churn', 'churn', 'customer_id', '{\"epochs\": 1}')",
            &[],
        )
        .await?;
    let seen = wait_until_done(&promoted, "rs_promoted", 1, TRAIN_TIMEOUT).await?;
    assert_eq!(seen.last().map(String::as_str), Some("ready"), "{seen:?}");
    assert!(daemon.is_running());
    daemon.stop()?;
    drop(standby);
    let log = daemon_log(&env);
    assert!(!log[from..].contains("panicked"), "{}", &log[from..]);
    Ok(())
}

/// A backend of another session that crashes (an application's, killed by
/// the OOM killer, say) makes PostgreSQL end every session, cerebrod's
/// with "crash of another server process": the training it interrupts is
/// requeued without counting the attempt, since none of cerebrod's own
/// backends crashed. Before, three such crashes failed the job.
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_of_another_backend_costs_a_training_no_attempt() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let _daemon = Daemon::start(&env)?;
    let version = insert_telco_model(
        &db,
        "rs_crash_elsewhere",
        r#"{"epochs": 40, "patience": 0, "hidden": [256, 256], "batch_size": 16}"#,
    )
    .await?;
    // Well into training, its epochs long: cerebrod's connections idle
    // between an epoch's writes, so each hears the server's word (one in
    // the middle of a write does not, and a silent end counts).
    wait_for(&db, "rs_crash_elsewhere", version, TRAIN_TIMEOUT, |s, epoch| s == "training" && epoch >= 2).await?;
    let victim = env.connect().await?;
    // Its last query is what the server log names the process by: test.sh
    // passes over a backend killed so.
    let pid: i32 = victim.query_one("SELECT pg_backend_pid() AS killed_on_purpose_by_a_test", &[]).await?.get(0);
    let from = daemon_log(&env).len();
    let killed = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status()?;
    anyhow::ensure!(killed.success(), "kill -KILL {pid}");
    wait_for_log(&env, from, "crash of another server process").await?;
    let db = reconnect(&env).await?;
    let seen = wait_until_done(&db, "rs_crash_elsewhere", version, TRAIN_TIMEOUT).await?;
    let (status, _, error) = model_state(&db, "rs_crash_elsewhere", version).await?;
    assert_eq!(status, "ready", "{seen:?} {error:?}");
    assert_eq!(job_attempts(&db, "rs_crash_elsewhere", version).await?, 1, "the crash cost an attempt");
    Ok(())
}

/// A query waiting for cerebrod's answer shows it in `pg_stat_activity`
/// (`wait_event_type` `Extension`), as one waiting on a lock does: before,
/// it showed `active` with no wait, like a query using the CPU.
#[tokio::test(flavor = "multi_thread")]
async fn a_query_waiting_for_cerebrod_shows_its_wait() -> anyhow::Result<()> {
    let env = Env::from_env();
    let db = env.connect().await?;
    let daemon = Daemon::start(&env)?;
    ready_model(&db, SCORED).await?;
    let waiting = env.connect().await?;
    waiting.batch_execute("SET cerebro.score_in_backend = off; SET cerebro.scoring_timeout = '60s'").await?;
    let pid: i32 = waiting.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
    let stop = |signal: &str| std::process::Command::new("kill").args([signal, &daemon.pid().to_string()]).status();
    anyhow::ensure!(stop("-STOP")?.success(), "kill -STOP");
    let scan = tokio::spawn(async move {
        waiting.query_one("SELECT count(*) FROM cerebro.predictions WHERE model = $1", &[&SCORED]).await
    });
    let deadline = Instant::now() + BACK_TIMEOUT;
    let seen = loop {
        let row =
            db.query_one("SELECT wait_event_type, wait_event FROM pg_stat_activity WHERE pid = $1", &[&pid]).await?;
        let seen: (Option<String>, Option<String>) = (row.get(0), row.get(1));
        if seen.0.is_some() || Instant::now() > deadline {
            break seen;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let continued = stop("-CONT")?;
    anyhow::ensure!(continued.success(), "kill -CONT");
    assert_eq!(seen, (Some("Extension".into()), Some("Extension".into())));
    let scanned: i64 = scan.await??.get(0);
    assert_eq!(scanned, 7043);
    Ok(())
}
