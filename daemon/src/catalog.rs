//! The daemon's access to the catalog (schema `cerebro`) over tokio-postgres.
//!
//! Every session cerebrod opens pins `search_path` to `pg_catalog, pg_temp`,
//! so no unqualified name in its SQL resolves to a schema a user can create
//! objects in, and sets `lock_timeout`, so that no statement waits longer
//! than that on a lock a user's open transaction holds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cerebro_shared::importance::Importance;
use cerebro_shared::mst::SelectionPlan;
use cerebro_shared::provenance::{EnsembleRequest, TrainedWith};
use cerebro_shared::spec::{Feature, Task, TrainOptions, TrainingPlan};
use cerebro_shared::sql::{snapshot_column, JobState, ModelStatus};
use cerebro_shared::surrogate::Surrogate;
use futures_util::{stream, StreamExt};
use tokio::sync::Notify;
use tokio_postgres::error::{Severity, SqlState};
use tokio_postgres::{AsyncMessage, Client, NoTls};
use tracing::{debug, warn};

use crate::metrics::Metrics;
use crate::train::{EpochStats, TrainedModel};

pub use cerebro_shared::sql::JOBS_CHANNEL;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// Displayed through [`describe`]: tokio-postgres shows a server's error
    /// as just "db error". Not a `#[source]`, so that the chain a binary
    /// prints does not repeat the message.
    #[error("database error: {}", describe(.0))]
    Db(tokio_postgres::Error),
    /// This daemon's session with the database ended (the connection, or
    /// the daemon lock's, was lost) while the job loop worked.
    #[error("the connection to the database was lost: {0}")]
    Lost(String),
    #[error("catalog row is not as expected: {0}")]
    Corrupt(String),
    #[error("{0}")]
    NotFound(String),
    /// A user's relation the daemon will not read (it would run their code).
    #[error("{0}")]
    Unreadable(String),
}

impl From<tokio_postgres::Error> for CatalogError {
    fn from(e: tokio_postgres::Error) -> Self {
        CatalogError::Db(e)
    }
}

pub type Result<T> = std::result::Result<T, CatalogError>;

/// A database error as people should read it (in a job's reason, a log
/// line): the server's own message with its detail and hint when the server
/// sent one, otherwise what happened to the connection, with its causes.
pub fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut text = db.message().to_string();
        if let Some(detail) = db.detail() {
            text.push_str(&format!(" (DETAIL: {detail})"));
        }
        if let Some(hint) = db.hint() {
            text.push_str(&format!(" (HINT: {hint})"));
        }
        return text;
    }
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// SQLSTATEs with which the server ends a session, or refuses one for now:
/// connection exceptions (class 08), and an administrator's or a crash's
/// shutdown, or a server still starting (57P01, 57P02, 57P03).
fn ends_session(code: &SqlState) -> bool {
    code.code().starts_with("08")
        || *code == SqlState::ADMIN_SHUTDOWN
        || *code == SqlState::CRASH_SHUTDOWN
        || *code == SqlState::CANNOT_CONNECT_NOW
}

/// What a statement's failure means for the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Another transaction held a lock the statement needed, past
    /// `lock_timeout` (or a deadlock or a serialization failure with it was
    /// broken by failing ours), or someone cancelled the statement
    /// (`pg_cancel_backend`): nothing is wrong with the job, the write may
    /// succeed later.
    Lock,
    /// The server refused the statement (a privilege, a constraint) while
    /// the connection stayed up: the job at hand fails, the daemon goes on.
    Refusal,
    /// No answer from the server: the connection is gone.
    Lost,
}

impl Failure {
    /// Classifies a failed statement by its SQLSTATE (None: no server error).
    /// A server that ends the session (a fast shutdown's "terminating
    /// connection due to administrator command") answers with an error too,
    /// which is no refusal: the job did nothing wrong.
    pub fn of(code: Option<&SqlState>) -> Failure {
        match code {
            None => Failure::Lost,
            Some(c)
                if *c == SqlState::LOCK_NOT_AVAILABLE
                    || *c == SqlState::T_R_DEADLOCK_DETECTED
                    || *c == SqlState::T_R_SERIALIZATION_FAILURE
                    || *c == SqlState::QUERY_CANCELED =>
            {
                Failure::Lock
            }
            Some(c) if ends_session(c) => Failure::Lost,
            Some(_) => Failure::Refusal,
        }
    }

    /// Classifies a failed statement: a FATAL or PANIC error ends the
    /// session whatever its SQLSTATE.
    pub fn of_error(e: &tokio_postgres::Error) -> Failure {
        match e.as_db_error().and_then(|d| d.parsed_severity()) {
            Some(Severity::Fatal | Severity::Panic) => Failure::Lost,
            _ => Failure::of(e.code()),
        }
    }
}

impl CatalogError {
    fn failure(&self) -> Option<Failure> {
        match self {
            CatalogError::Db(e) => Some(Failure::of_error(e)),
            CatalogError::Lost(_) => Some(Failure::Lost),
            _ => None,
        }
    }

    /// The session with the database is gone (or going): reconnecting is
    /// the cure, and nothing is wrong with the job at hand.
    pub fn is_lost(&self) -> bool {
        self.failure() == Some(Failure::Lost)
    }

    /// Worth trying again at start-up: the server is unreachable, starting,
    /// stopping or out of connection slots. Not a wrong password, database
    /// or extension, which no retry mends (and which cerebrod reports and
    /// exits on when it has not served yet).
    pub fn is_transient(&self) -> bool {
        match self {
            CatalogError::Db(e) => match e.code() {
                Some(c) => ends_session(c) || c.code().starts_with("53"),
                None => {
                    e.is_closed()
                        || std::iter::successors(std::error::Error::source(e), |c| c.source())
                            .any(|c| c.is::<std::io::Error>())
                }
            },
            CatalogError::Lost(_) => true,
            _ => false,
        }
    }

    /// Another transaction held a lock this statement needed (see
    /// [`Failure::Lock`]); never a reason to fail a job or stop the daemon.
    pub fn is_lock_timeout(&self) -> bool {
        self.failure() == Some(Failure::Lock)
    }

    /// The server refused a statement (a privilege, a constraint) while the
    /// connection stayed up: the job at hand fails, the daemon goes on.
    pub fn is_refusal(&self) -> bool {
        self.failure() == Some(Failure::Refusal)
    }

    /// The server's own message (with its detail and hint) when it refused
    /// a statement, else the error.
    pub fn reason(&self) -> String {
        match self {
            CatalogError::Db(e) => describe(e),
            other => other.to_string(),
        }
    }
}

/// What every session of cerebrod runs first: nothing it runs later may
/// resolve a name through a schema a user can write (pg_temp last, where
/// functions and operators are never looked up), nor wait on a lock for
/// longer than `lock_timeout`. And a database's or role's defaults, meant
/// for applications, do not reach it: a `statement_timeout` would cancel
/// reading a large snapshot, an `idle_session_timeout` end the data
/// connection while a model trains (and the session with it, an attempt
/// counted each time), `default_transaction_read_only` leave every job
/// queued for ever, and a stricter isolation level fail a write on a
/// concurrent update of a row the daemon owns.
pub fn session_setup(lock_timeout: Duration) -> String {
    format!(
        "SET search_path = pg_catalog, pg_temp; SET lock_timeout = {}; SET statement_timeout = 0; \
         SET idle_session_timeout = 0; SET default_transaction_read_only = off; \
         SET default_transaction_isolation = 'read committed'",
        lock_timeout.as_millis().max(1)
    )
}

/// The `application_name` cerebrod's sessions show in `pg_stat_activity`,
/// unless `database_url` names another.
pub const APPLICATION_NAME: &str = "cerebrod";

/// How a session with the database ended: what the server said, whether
/// the server was shut down or the session terminated on purpose (`pg_ctl
/// stop` or `restart`, `pg_terminate_backend`: SQLSTATE 57P01), and when
/// the server it was a session of had started (`pg_postmaster_start_time`,
/// in microseconds; set by the daemon, not the driver). A restart on purpose is
/// no job's fault; a crash of another backend (57P02), a lost network, or a
/// session terminated again and again while the server ran on may be.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SessionEnd {
    pub why: String,
    pub on_purpose: bool,
    pub server_started: Option<i64>,
    /// The daemon ended it to give its lock to a `DROP` or `ALTER
    /// EXTENSION` of a role that may run it: no job's fault either.
    pub stepped_aside: bool,
    /// The server ended it for another process's crash (57P02); for the
    /// session as a whole, every connection of it was (none of cerebrod's
    /// own backends crashed): no job's fault.
    pub crashed_elsewhere: bool,
}

impl SessionEnd {
    fn from_code(why: String, code: Option<&SqlState>) -> SessionEnd {
        SessionEnd {
            why,
            on_purpose: code == Some(&SqlState::ADMIN_SHUTDOWN),
            crashed_elsewhere: code == Some(&SqlState::CRASH_SHUTDOWN),
            ..SessionEnd::default()
        }
    }

    /// Whether the session ended with a restart on purpose of its server,
    /// which now runs since `server_started`.
    pub fn planned_restart(&self, server_started: i64) -> bool {
        self.on_purpose && self.server_started.is_some_and(|then| then != server_started)
    }
}

/// Opens a connection whose driver task runs in the background, with the
/// session set up by [`session_setup`]. When `notify` is given, NOTIFY
/// messages on the connection wake it. The returned handle finishes when the
/// connection is lost, with what the server said about it.
pub async fn connect(
    url: &str,
    notify: Option<Arc<Notify>>,
    lock_timeout: Duration,
) -> Result<(Catalog, tokio::task::JoinHandle<SessionEnd>)> {
    let mut config: tokio_postgres::Config = url.parse()?;
    if config.get_application_name().is_none() {
        config.application_name(APPLICATION_NAME);
    }
    let (client, mut connection) = config.connect(NoTls).await?;
    let driver = tokio::spawn(async move {
        // A server that stops at once (immediate shutdown, a crashed
        // backend) says why in a WARNING before it closes the connection.
        let mut farewell: Option<SessionEnd> = None;
        let mut messages = stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    debug!(channel = n.channel(), payload = n.payload(), "notification");
                    if let Some(notify) = &notify {
                        notify.notify_one();
                    }
                }
                Ok(AsyncMessage::Notice(n)) => {
                    debug!("server notice: {}", n.message());
                    if ends_session(n.code()) {
                        farewell = Some(SessionEnd::from_code(n.message().to_string(), Some(n.code())));
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let end = farewell.take().unwrap_or_else(|| SessionEnd::from_code(describe(&e), e.code()));
                    debug!("database connection lost: {}", end.why);
                    return end;
                }
            }
        }
        farewell.unwrap_or_else(|| SessionEnd::from_code("the server closed the connection".into(), None))
    });
    if let Err(e) = client.batch_execute(&session_setup(lock_timeout)).await {
        driver.abort();
        return Err(e.into());
    }
    Ok((Catalog { client }, driver))
}

/// The daemon lock: while this lives, its session keeps a transaction open
/// holding `cerebro.daemon_lock` in EXCLUSIVE mode, which no role but the
/// daemon's (and the extension owner and superusers) has a privilege to
/// take. EXCLUSIVE lets `pg_dump`'s ACCESS SHARE through; being a view's,
/// it is never in VACUUM's or ANALYZE's way. Dropping it closes
/// the session, which ends the transaction and frees the lock.
pub struct DaemonLock {
    client: Client,
    backend_pid: i32,
    /// The database's, the view's and its owner's oids, read before the
    /// lock's transaction began: what [`DaemonLock::until_wanted_whole`]
    /// looks for without reading a catalog table in that transaction.
    database: u32,
    view: u32,
    owner: u32,
}

impl DaemonLock {
    /// The server process of the lock's session: it names the daemon in
    /// `pg_stat_activity` and in the jobs it claims.
    pub fn backend_pid(&self) -> i32 {
        self.backend_pid
    }

    /// Returns once a session waits to take `cerebro.daemon_lock` whole
    /// (`DROP EXTENSION`, an `ALTER EXTENSION ... UPDATE` that replaces the
    /// view, a DROP or ALTER of it) as a role that may do so (a superuser,
    /// or a member of the view's owner: `pg_has_role` of its session user),
    /// looking every `every`: the daemon then gives the lock up rather than
    /// leave that statement waiting for ever, and with it every statement
    /// queued behind the locks it already holds (the jobs table's, for a
    /// DROP EXTENSION). A role that may not (whose `CREATE RULE` on the view
    /// waits for the lock before it is refused) is not given it. It looks
    /// on the lock's own session, which runs nothing else, so no statement
    /// of the daemon's is ever ahead of the look; through functions alone
    /// (`pg_lock_status`, `pg_stat_get_activity`, `pg_has_role`), whose
    /// catalog reads release their locks at once, where a query of a
    /// catalog table would keep its lock for the transaction's, the
    /// daemon's, life; in a savepoint, so that a failed look leaves the
    /// lock's transaction as it was. Says why.
    pub async fn until_wanted_whole(&self, every: Duration) -> String {
        let look = format!(
            "SAVEPOINT cerebro_look;
             SELECT l.pid FROM pg_catalog.pg_lock_status() l
             WHERE l.locktype = 'relation' AND NOT l.granted AND l.mode = 'AccessExclusiveLock'
               AND l.database = {}::pg_catalog.oid AND l.relation = {}::pg_catalog.oid
               AND pg_catalog.pg_has_role(
                   (SELECT s.usesysid FROM pg_catalog.pg_stat_get_activity(l.pid) s), {}::pg_catalog.oid, 'USAGE')
             LIMIT 1;
             RELEASE SAVEPOINT cerebro_look",
            self.database, self.view, self.owner
        );
        let mut failed: Option<String> = None;
        loop {
            tokio::time::sleep(every).await;
            match self.client.simple_query(&look).await {
                Ok(messages) => {
                    failed = None;
                    let waiter = messages.iter().find_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
                        _ => None,
                    });
                    if let Some(pid) = waiter {
                        return format!(
                            "server process {pid} waits to take cerebro.daemon_lock whole (a DROP EXTENSION, an \
                             ALTER EXTENSION ... UPDATE); cerebrod gives the lock up and takes it again once it can"
                        );
                    }
                }
                Err(e) => {
                    // Said once, and again when it says something else: a
                    // look that keeps failing would leave a DROP waiting.
                    let why = describe(&e);
                    if failed.as_deref() != Some(why.as_str()) {
                        warn!(
                            "cannot look for a DROP or ALTER EXTENSION waiting on the daemon lock: {why}; such a \
                             statement waits until cerebrod stops"
                        );
                    }
                    failed = Some(why);
                    let _ = self.client.batch_execute("ROLLBACK TO SAVEPOINT cerebro_look").await;
                }
            }
        }
    }
}

/// Takes the daemon lock on a session of its own; None when another daemon
/// holds it. The returned handle finishes when that session is lost, and
/// with it the lock.
pub async fn lock_daemon(
    url: &str,
    lock_timeout: Duration,
) -> Result<Option<(DaemonLock, tokio::task::JoinHandle<SessionEnd>)>> {
    let (session, driver) = connect(url, None, lock_timeout).await?;
    let client = session.client;
    // The transaction stays idle for the daemon's life: a role or database
    // setting must not end it. Idle in a READ COMMITTED transaction that
    // wrote nothing, the session holds no snapshot and no transaction id, so
    // it holds vacuum back nowhere, as long as every statement in it runs
    // by the simple protocol: the extended protocol's unnamed portal (a
    // `query`) would stay open until the transaction ends, and with it
    // its snapshot, keeping every dead row of the database from VACUUM
    // for the daemon's life. So the pid is read before BEGIN.
    let taken = async {
        let row = client
            .query_one(
                "SELECT pg_catalog.pg_backend_pid(), d.oid::pg_catalog.int8, c.oid::pg_catalog.int8,
                        c.relowner::pg_catalog.int8
                 FROM pg_catalog.pg_database d, pg_catalog.pg_class c
                 WHERE d.datname = pg_catalog.current_database()
                   AND c.oid = 'cerebro.daemon_lock'::pg_catalog.regclass",
                &[],
            )
            .await?;
        let oid = |i: usize| row.get::<_, i64>(i) as u32;
        let (backend_pid, database, view, owner): (i32, u32, u32, u32) = (row.get(0), oid(1), oid(2), oid(3));
        client.batch_execute("SET idle_in_transaction_session_timeout = 0").await?;
        client.batch_execute("BEGIN ISOLATION LEVEL READ COMMITTED").await?;
        client.batch_execute("LOCK TABLE cerebro.daemon_lock IN EXCLUSIVE MODE NOWAIT").await?;
        Ok::<_, tokio_postgres::Error>((backend_pid, database, view, owner))
    }
    .await;
    match taken {
        Ok((backend_pid, database, view, owner)) => {
            Ok(Some((DaemonLock { client, backend_pid, database, view, owner }, driver)))
        }
        Err(e) => {
            driver.abort();
            match e.code() {
                Some(c) if *c == SqlState::LOCK_NOT_AVAILABLE => Ok(None),
                _ => Err(e.into()),
            }
        }
    }
}

pub struct Catalog {
    client: Client,
}

/// A version's ONNX file and how to feed it (`ScoringModel::from_artifact`
/// loads it).
pub struct Artifact {
    /// The version as users name it, `model "churn" version 3`, for logs.
    pub label: String,
    pub sha256: String,
    pub bytes: Vec<u8>,
    /// Set for imported models; Cerebro's own exports need none.
    pub import_layout: Option<cerebro_shared::onnx_graph::ImportLayout>,
    pub task: cerebro_shared::spec::Task,
    /// What the engine needs to score the version itself (a model Cerebro
    /// trained; None for an imported one or a selection's ensemble).
    pub native: Option<NativeParts>,
    /// A selection's ensemble's members, heaviest first (empty for any other
    /// version): what explains it.
    pub members: Vec<MemberRef>,
}

/// A member of a selection's ensemble, as its lineage names it.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberRef {
    pub version: i32,
    pub weight: f64,
    /// Its `model_versions.id` and artifact, None once it was deleted.
    pub stored: Option<(i64, String)>,
}

/// A trained version's fitted pipeline, options and class labels.
pub struct NativeParts {
    pub pipeline: crate::features::FeaturePipeline,
    pub options: TrainOptions,
    pub classes: usize,
}

/// What a finished job stores with its version.
pub struct Stored<'a> {
    pub onnx: &'a [u8],
    pub metrics: &'a Metrics,
    /// The fitted feature pipeline (None for an ensemble: its members keep theirs).
    pub pipeline: Option<serde_json::Value>,
    pub weights_sha256: String,
    pub trained_with: &'a TrainedWith,
    pub importance: Option<&'a Importance>,
    pub surrogate: Option<&'a Surrogate>,
    /// The epochs it trained, when it trained (not an ensemble): what
    /// `epoch` says once ready, whether or not each was recorded in
    /// `training_history` (a lock can leave some out).
    pub epochs_run: Option<i32>,
}

impl<'a> Stored<'a> {
    /// What `model`, exported as `onnx`, stores.
    pub fn model(model: &'a TrainedModel, trained_with: &'a TrainedWith, onnx: &'a [u8]) -> Stored<'a> {
        Stored {
            onnx,
            metrics: &model.metrics,
            pipeline: Some(serde_json::to_value(&model.pipeline).expect("pipeline serialises")),
            weights_sha256: model.weights_sha256(),
            trained_with,
            importance: model.importance.as_ref(),
            surrogate: model.surrogate.as_ref(),
            epochs_run: Some(model.epochs_run as i32),
        }
    }
}

/// A version an ensemble may weigh, as the catalog has it now.
pub struct EnsembleCandidate {
    pub version: i32,
    pub status: String,
    pub snapshot_id: i64,
    pub features: serde_json::Value,
    pub artifact: Option<Artifact>,
}

/// A job this daemon has claimed.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub job_id: i64,
    pub model_version_id: i64,
    pub attempt: i32,
}

/// Everything needed to train a claimed job.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub name: String,
    pub version: i32,
    pub plan: TrainingPlan,
    pub data_relation: String,
    pub snapshot_id: i64,
    /// When the snapshot was frozen, in microseconds since 1970: with its
    /// id, what tells it from one a catalog made again numbers the same.
    pub snapshot_created_micros: i64,
    /// The source's key column, if the model has one: the snapshot is read
    /// in its order.
    pub key_column: Option<String>,
    /// Where the snapshot keeps the plan's columns.
    pub snapshot_columns: SnapshotColumns,
    /// The model selection the version is a candidate of.
    pub selection: Option<i64>,
    /// The version it derives from (a warm start).
    pub parent_version: Option<i32>,
    /// Set for a selection's ensemble: the versions it may weigh.
    pub ensemble: Option<EnsembleRequest>,
}

/// The snapshot table's names for a plan's columns: a snapshot stores source
/// column i as `snapshot_column(i)` and lists the source names in
/// `cerebro.snapshots.columns`. Everything but the read of the snapshot
/// itself keeps the source names.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotColumns {
    /// The features', in plan order.
    pub features: Vec<String>,
    pub target: String,
    pub key: Option<String>,
}

impl SnapshotColumns {
    /// Maps `plan`'s features and target, and `key`, through `columns` (the
    /// source names, in snapshot order).
    pub fn map(columns: &[String], plan: &TrainingPlan, key: Option<&str>) -> Result<SnapshotColumns> {
        let find = |name: &str| {
            columns.iter().position(|c| c == name).map(snapshot_column).ok_or_else(|| {
                CatalogError::Corrupt(format!("the snapshot has no column {name} (it has {})", columns.join(", ")))
            })
        };
        Ok(SnapshotColumns {
            features: plan.features.iter().map(|f| find(&f.name)).collect::<Result<_>>()?,
            target: find(&plan.target)?,
            key: key.map(find).transpose()?,
        })
    }
}

/// Where a selection stands when a stack of its candidates starts.
#[derive(Debug, Clone)]
pub struct SelectionState {
    pub plan: SelectionPlan,
    /// Since the INSERT that started it.
    pub elapsed_seconds: f64,
    /// Epochs its candidates have trained so far.
    pub epochs_spent: u64,
    /// Per rung epoch, the best validation loss up to it of every candidate
    /// outside the stack that reached it.
    pub rung_losses: BTreeMap<u32, Vec<f64>>,
}

/// Where the sweep put a job that was left `running`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SweptTo {
    Queued,
    /// Its attempts are used up.
    Failed,
    /// A user asked to cancel it.
    Cancelled,
}

impl SweptTo {
    /// The job's state it ends in.
    fn job_state(self) -> JobState {
        match self {
            SweptTo::Queued => JobState::Queued,
            SweptTo::Failed => JobState::Failed,
            SweptTo::Cancelled => JobState::Cancelled,
        }
    }

    /// Its model version's status: the label of the same name.
    fn model_status(self) -> ModelStatus {
        match self {
            SweptTo::Queued => ModelStatus::Queued,
            SweptTo::Failed => ModelStatus::Failed,
            SweptTo::Cancelled => ModelStatus::Cancelled,
        }
    }
}

/// Who or what left a job `running` that the sweep finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeftBy {
    /// Another daemon, which stopped (killed, crashed, its machine down).
    StoppedDaemon,
    /// This daemon's write that ended the attempt, because a transaction
    /// held a lock it needed.
    HeldLock,
    /// An earlier session of this daemon, which ended for the reason given
    /// (its connection to the database was lost, say) while the job trained.
    EndedSession(SessionEnd),
}

impl LeftBy {
    /// What to call it in a log line.
    pub fn describe(&self) -> &str {
        match self {
            LeftBy::StoppedDaemon => "by a stopped daemon",
            LeftBy::HeldLock => "when a lock held up its ending",
            LeftBy::EndedSession(_) => "when cerebrod's session with the database ended",
        }
    }

    /// Whether the attempt counts against the job's `max_attempts`, the
    /// server now running since `server_started`: not when the session
    /// ended with a restart of the server on purpose, which no job is to
    /// blame for.
    pub fn counts(&self, server_started: i64) -> bool {
        !matches!(self, LeftBy::EndedSession(end)
            if end.stepped_aside || end.crashed_elsewhere || end.planned_restart(server_started))
    }
}

/// What the sweep did with a job left `running`.
#[derive(Debug, Clone, PartialEq)]
pub struct Swept {
    pub job_id: i64,
    pub to: SweptTo,
    pub left_by: LeftBy,
}

/// How a job requeued because a lock held up its ending begins its error:
/// the claim reads it to wait before the next attempt.
pub const LOCK_HELD: &str = "another transaction held a lock on the job's catalog rows or snapshot";

/// How long a job requeued because a lock held up its ending waits before
/// its next attempt, from the start of the last: this doubled for each
/// attempt already made (15, 30, 60 s...), so that a maintenance statement's
/// lock of a few tens of seconds does not use up its attempts at once.
pub const LOCK_RETRY_WAIT_SECS: f64 = 15.0;

/// The condition a queued job `j` meets when it may be claimed: not one
/// waiting after a lock held up its last attempt ([`LOCK_RETRY_WAIT_SECS`]).
/// `$lock` and `$wait` are its parameters' placeholders.
fn claimable(j: &str, lock: &str, wait: &str) -> String {
    format!(
        "NOT ({j}.attempts > 0 AND {j}.claimed_at IS NOT NULL
              AND coalesce(pg_catalog.starts_with({j}.error, {lock}), false)
              AND {j}.claimed_at > pg_catalog.now() - pg_catalog.make_interval(
                  secs => {wait} * pg_catalog.power(2.0::pg_catalog.float8, LEAST({j}.attempts, 6) - 1)))"
    )
}

/// Where a job left `running` goes, and the error users read. Attempts count
/// whatever left it there, so that a job that keeps being left (one that
/// crashes the daemon or a backend each time) ends `failed` after
/// `max_attempts`.
pub fn sweep_outcome(
    attempts: i32,
    max_attempts: i32,
    cancel_requested: bool,
    left_by: &LeftBy,
    server_started: i64,
) -> (SweptTo, Option<String>) {
    if cancel_requested {
        return (SweptTo::Cancelled, None);
    }
    let counts = left_by.counts(server_started);
    let used_up = attempts >= max_attempts && counts;
    let lock = LOCK_HELD;
    let error = match (left_by, used_up) {
        (LeftBy::EndedSession(end), _) if !counts => format!(
            "attempt {attempts} was interrupted: {}; the job was requeued, the attempt not counted ({})",
            end.why,
            if end.stepped_aside {
                "cerebrod gave its lock to a DROP or ALTER EXTENSION"
            } else if end.crashed_elsewhere {
                "another server process crashed, none of cerebrod's"
            } else {
                "the database was restarted on purpose"
            }
        ),
        (LeftBy::StoppedDaemon, false) => format!("cerebrod stopped during attempt {attempts}; the job was requeued"),
        (LeftBy::StoppedDaemon, true) => format!("cerebrod stopped during training {attempts} times; giving up"),
        (LeftBy::HeldLock, false) => format!("{lock} during attempt {attempts}; the job was requeued"),
        (LeftBy::HeldLock, true) => {
            format!("{lock} during attempt {attempts}; giving up after {attempts} attempts")
        }
        (LeftBy::EndedSession(end), false) => {
            format!("attempt {attempts} was interrupted: {}; the job was requeued", end.why)
        }
        (LeftBy::EndedSession(end), true) => {
            format!("attempt {attempts} was interrupted: {}; giving up after {attempts} attempts", end.why)
        }
    };
    (if used_up { SweptTo::Failed } else { SweptTo::Queued }, Some(error))
}

/// An imported version cerebrod measures once its import commits.
#[derive(Debug, Clone)]
pub struct ImportToMeasure {
    pub id: i64,
    pub artifact_sha256: String,
    pub name: String,
    pub version: i32,
}

/// A model version as the scorer needs to find it.
#[derive(Debug, Clone)]
pub struct ModelRef {
    pub id: i64,
    pub name: String,
    pub version: i32,
    pub features: Vec<Feature>,
    pub class_labels: Vec<String>,
    pub source_relation: String,
    pub key_column: Option<String>,
    pub artifact_sha256: String,
}

impl Catalog {
    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn client_mut(&mut self) -> &mut Client {
        &mut self.client
    }

    /// When the server started (`pg_postmaster_start_time`), in microseconds
    /// since the epoch: a different value after a reconnect means the
    /// server restarted.
    pub async fn server_started(&self) -> Result<i64> {
        let row = self
            .client
            .query_one(
                "SELECT (pg_catalog.date_part('epoch', pg_catalog.pg_postmaster_start_time()) * 1e6)::pg_catalog.int8",
                &[],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Whether the server is a standby in recovery (not yet promoted).
    pub async fn in_recovery(&self) -> Result<bool> {
        Ok(self.client.query_one("SELECT pg_catalog.pg_is_in_recovery()", &[]).await?.get(0))
    }

    pub async fn listen(&self) -> Result<()> {
        self.client.batch_execute(&format!("LISTEN {JOBS_CHANNEL}")).await?;
        Ok(())
    }

    /// Puts jobs left `running` back in the queue (or fails them after
    /// `max_attempts`, or cancels them if a user asked to), but for those of
    /// `training`: ones a daemon that stopped claimed, ones whose ending
    /// write `worker` gave up on because a transaction held a lock it needed,
    /// and ones claimed by this daemon's `earlier` sessions (worker id, and
    /// why the session ended). Rows locked now are skipped, never waited
    /// for: a later sweep takes them. Only safe while holding the daemon lock.
    pub async fn sweep_jobs(
        &mut self,
        worker: &str,
        training: &[i64],
        earlier: &[(String, SessionEnd)],
        server_started: i64,
    ) -> Result<Vec<Swept>> {
        let tx = self.client.transaction().await?;
        let rows = tx
            .query(
                "SELECT j.id, j.model_version_id, j.attempts, j.max_attempts, j.cancel_requested, j.claimed_by
                 FROM cerebro.jobs j JOIN cerebro.model_versions m ON m.id = j.model_version_id
                 WHERE j.state = 'running' AND j.id <> ALL($1)
                 ORDER BY j.id
                 FOR UPDATE OF j SKIP LOCKED FOR NO KEY UPDATE OF m SKIP LOCKED",
                &[&training],
            )
            .await?;
        let mut swept = Vec::with_capacity(rows.len());
        for row in rows {
            let (job_id, mv, claimed_by): (i64, i64, Option<String>) = (row.get(0), row.get(1), row.get(5));
            let left_by = match claimed_by {
                Some(w) if w == worker => LeftBy::HeldLock,
                Some(w) => match earlier.iter().find(|(id, _)| *id == w) {
                    Some((_, end)) => LeftBy::EndedSession(end.clone()),
                    None => LeftBy::StoppedDaemon,
                },
                None => LeftBy::StoppedDaemon,
            };
            let (to, error) = sweep_outcome(row.get(2), row.get(3), row.get(4), &left_by, server_started);
            let uncounted = !left_by.counts(server_started);
            // A cancel keeps the reason its request wrote on the job.
            tx.execute(
                "UPDATE cerebro.jobs SET state = $2::pg_catalog.text::cerebro.job_state,
                        error = coalesce($3, error),
                        finished_at = CASE WHEN $2 = 'queued' THEN NULL ELSE pg_catalog.now() END,
                        claimed_by = CASE WHEN $2 = 'queued' THEN NULL ELSE claimed_by END,
                        attempts = CASE WHEN $4 AND $2 = 'queued' THEN GREATEST(attempts - 1, 0)
                                        ELSE attempts END
                 WHERE id = $1",
                &[&job_id, &to.job_state().as_str(), &error, &uncounted],
            )
            .await?;
            tx.execute(
                "UPDATE cerebro.model_versions SET status = $2::pg_catalog.text::cerebro.model_status,
                        error = CASE WHEN $2 = 'queued' THEN NULL
                                     ELSE (SELECT j.error FROM cerebro.jobs j WHERE j.id = $3) END,
                        epoch = CASE WHEN $2 = 'queued' THEN 0 ELSE epoch END
                 WHERE id = $1",
                &[&mv, &to.model_status().as_str(), &job_id],
            )
            .await?;
            swept.push(Swept { job_id, to, left_by });
        }
        tx.commit().await?;
        Ok(swept)
    }

    /// Claims a queued job, marking it and its model as training (a job whose
    /// cancel was asked for before a requeue keeps the request's reason,
    /// and stops after its first epoch): the oldest
    /// of the role served longest ago, so that roles take turns and one
    /// role's long queue cannot hold everyone else's (its own jobs still go
    /// in order). Jobs whose rows another transaction holds are skipped, not
    /// waited for.
    pub async fn claim_next_job(&mut self, worker: &str) -> Result<Option<ClaimedJob>> {
        let tx = self.client.transaction().await?;
        let sql = format!(
            "UPDATE cerebro.jobs j SET state = 'running', attempts = attempts + 1,
                        claimed_by = $1, claimed_at = pg_catalog.now(),
                        error = CASE WHEN j.cancel_requested THEN j.error END
                 FROM (WITH served AS (
                           SELECT m.created_by, pg_catalog.max(j.claimed_at) AS last
                           FROM cerebro.jobs j JOIN cerebro.model_versions m ON m.id = j.model_version_id
                           WHERE j.claimed_at IS NOT NULL
                           GROUP BY m.created_by)
                       SELECT j2.id FROM cerebro.jobs j2 JOIN cerebro.model_versions m2 ON m2.id = j2.model_version_id
                       LEFT JOIN served s ON s.created_by = m2.created_by
                       WHERE j2.state = 'queued' AND {}
                       ORDER BY s.last NULLS FIRST, j2.id LIMIT 1
                       FOR UPDATE OF j2 SKIP LOCKED FOR NO KEY UPDATE OF m2 SKIP LOCKED) next
                 WHERE j.id = next.id
                 RETURNING j.id, j.model_version_id, j.attempts",
            claimable("j2", "$2", "$3")
        );
        let row = tx.query_opt(&sql, &[&worker, &LOCK_HELD, &LOCK_RETRY_WAIT_SECS]).await?;
        let Some(row) = row else {
            tx.commit().await?;
            return Ok(None);
        };
        let job = ClaimedJob { job_id: row.get(0), model_version_id: row.get(1), attempt: row.get(2) };
        tx.execute(
            "UPDATE cerebro.model_versions SET status = 'training', started_at = pg_catalog.now(), epoch = 0,
                    error = NULL
             WHERE id = $1",
            &[&job.model_version_id],
        )
        .await?;
        tx.execute("DELETE FROM cerebro.training_history WHERE model_version_id = $1", &[&job.model_version_id])
            .await?;
        tx.commit().await?;
        Ok(Some(job))
    }

    /// Claims, with `job`, up to `limit` queued jobs of the same selection
    /// that can train in one stack with it: same snapshot, target, features,
    /// task and options but for those a stack lets each model have its own
    /// (engine::train_group). Lost races are skipped, not waited for.
    pub async fn claim_companions(&mut self, job: &ClaimedJob, worker: &str, limit: i64) -> Result<Vec<ClaimedJob>> {
        let tx = self.client.transaction().await?;
        let sql = format!(
            "UPDATE cerebro.jobs j SET state = 'running', attempts = attempts + 1,
                        claimed_by = $2, claimed_at = pg_catalog.now(),
                        error = CASE WHEN j.cancel_requested THEN j.error END
                 FROM (SELECT j2.id FROM cerebro.jobs j2
                       JOIN cerebro.model_versions m2 ON m2.id = j2.model_version_id
                       JOIN cerebro.model_versions m ON m.id = $1
                       WHERE j2.state = 'queued' AND {} AND m.selection_id IS NOT NULL
                         AND NOT m.request ? 'ensemble' AND NOT m2.request ? 'ensemble'
                         AND m2.selection_id = m.selection_id AND m2.snapshot_id = m.snapshot_id
                         AND m2.target_column = m.target_column AND m2.task = m.task
                         AND m2.features = m.features AND m2.class_labels = m.class_labels
                         AND m2.options - $3::pg_catalog.text[] = m.options - $3::pg_catalog.text[]
                       ORDER BY j2.id LIMIT $4
                       FOR UPDATE OF j2 SKIP LOCKED FOR NO KEY UPDATE OF m2 SKIP LOCKED) next
                 WHERE j.id = next.id
                 RETURNING j.id, j.model_version_id, j.attempts",
            claimable("j2", "$5", "$6")
        );
        let rows = tx
            .query(
                &sql,
                &[
                    &job.model_version_id,
                    &worker,
                    &cerebro_shared::spec::PER_MODEL_OPTIONS,
                    &limit,
                    &LOCK_HELD,
                    &LOCK_RETRY_WAIT_SECS,
                ],
            )
            .await?;
        let jobs: Vec<ClaimedJob> = rows
            .iter()
            .map(|r| ClaimedJob { job_id: r.get(0), model_version_id: r.get(1), attempt: r.get(2) })
            .collect();
        let ids: Vec<i64> = jobs.iter().map(|j| j.model_version_id).collect();
        tx.execute(
            "UPDATE cerebro.model_versions SET status = 'training', started_at = pg_catalog.now(), epoch = 0,
                    error = NULL
             WHERE id = ANY($1)",
            &[&ids],
        )
        .await?;
        tx.execute("DELETE FROM cerebro.training_history WHERE model_version_id = ANY($1)", &[&ids]).await?;
        tx.commit().await?;
        Ok(jobs)
    }

    /// What training `model_version_id` needs; NotFound when its version or
    /// snapshot is gone.
    pub async fn job_spec(&self, model_version_id: i64) -> Result<JobSpec> {
        let row = self
            .client
            .query_opt(
                "SELECT m.name, m.version, m.task, m.target_column, m.features, m.class_labels, m.options,
                        s.data_relation, s.id, m.key_column, m.selection_id, m.parent_version, s.columns,
                        m.request->'ensemble', (extract(epoch FROM s.created_at) * 1e6)::int8
                 FROM cerebro.model_versions m JOIN cerebro.snapshots s ON s.id = m.snapshot_id
                 WHERE m.id = $1",
                &[&model_version_id],
            )
            .await?
            .ok_or_else(|| CatalogError::NotFound(format!("model version {model_version_id} has no snapshot")))?;
        let corrupt = |what: &str, e: serde_json::Error| CatalogError::Corrupt(format!("{what}: {e}"));
        let task: Task =
            serde_json::from_value(serde_json::Value::String(row.get(2))).map_err(|e| corrupt("task", e))?;
        let features: Vec<Feature> = serde_json::from_value(row.get(4)).map_err(|e| corrupt("features", e))?;
        let options: TrainOptions = serde_json::from_value(row.get(6)).map_err(|e| corrupt("options", e))?;
        let plan = TrainingPlan { task, target: row.get(3), features, class_labels: row.get(5), options };
        let key_column: Option<String> = row.get(9);
        let columns: Vec<String> = row.get(12);
        let ensemble: Option<serde_json::Value> = row.get(13);
        let ensemble = ensemble.map(serde_json::from_value).transpose().map_err(|e| corrupt("ensemble", e))?;
        Ok(JobSpec {
            name: row.get(0),
            version: row.get(1),
            snapshot_columns: SnapshotColumns::map(&columns, &plan, key_column.as_deref())?,
            plan,
            data_relation: row.get(7),
            snapshot_id: row.get(8),
            snapshot_created_micros: row.get(14),
            key_column,
            selection: row.get(10),
            parent_version: row.get(11),
            ensemble,
        })
    }

    /// Counts a stack of `selection` whose snapshot, `bytes` of it, came
    /// from cerebrod's cache rather than the database.
    pub async fn count_cache_hit(&self, selection: i64, bytes: i64) -> Result<()> {
        self.client
            .execute(
                "UPDATE cerebro.selections
                 SET snapshot_cache_hits = snapshot_cache_hits + 1, snapshot_cache_bytes = snapshot_cache_bytes + $2
                 WHERE id = $1",
                &[&selection, &bytes],
            )
            .await?;
        Ok(())
    }

    /// The ONNX file and feature pipeline of `name`'s `version`, if it still
    /// has them (a deleted version has neither).
    /// For an ensemble, its best candidate's (the first of its pool, whose
    /// options it carries): the version they are read from comes first.
    pub async fn parent_weights(&self, name: &str, version: i32) -> Result<Option<(i32, Vec<u8>, serde_json::Value)>> {
        let row = self
            .client
            .query_opt(
                "SELECT p.version, a.bytes, p.pipeline FROM cerebro.model_versions p
                 JOIN cerebro.artifacts a ON a.model_version_id = p.id
                 WHERE p.name = $1 AND p.pipeline IS NOT NULL
                   AND p.version = coalesce(
                       (SELECT (e.request->'ensemble'->'pool'->>0)::int
                        FROM cerebro.model_versions e WHERE e.name = $1 AND e.version = $2),
                       $2)",
                &[&name, &version],
            )
            .await?;
        Ok(row.map(|r| (r.get(0), r.get(1), r.get(2))))
    }

    /// The plan and progress of `selection`, leaving out the versions in
    /// `stack` (about to train).
    pub async fn selection_state(&self, selection: i64, stack: &[i64]) -> Result<SelectionState> {
        let row = self
            .client
            .query_one(
                "SELECT s.plan, extract(epoch FROM pg_catalog.clock_timestamp() - s.created_at)::pg_catalog.float8,
                        (SELECT coalesce(pg_catalog.sum(m.epoch), 0)::pg_catalog.int8 FROM cerebro.model_versions m
                         WHERE m.selection_id = s.id AND m.id <> ALL($2))
                 FROM cerebro.selections s WHERE s.id = $1",
                &[&selection, &stack],
            )
            .await?;
        let plan: SelectionPlan =
            serde_json::from_value(row.get(0)).map_err(|e| CatalogError::Corrupt(format!("selection plan: {e}")))?;
        let rungs: Vec<i32> = plan.rungs.iter().map(|&r| r as i32).collect();
        let mut rung_losses: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
        for r in self
            .client
            .query(
                "SELECT r.epoch, (SELECT pg_catalog.min(h.valid_loss) FROM cerebro.training_history h
                                  WHERE h.model_version_id = m.id AND h.epoch <= r.epoch)
                 FROM cerebro.model_versions m, pg_catalog.unnest($2::pg_catalog.int4[]) AS r(epoch)
                 WHERE m.selection_id = $1 AND m.id <> ALL($3) AND m.epoch >= r.epoch",
                &[&selection, &rungs, &stack],
            )
            .await?
        {
            if let Some(loss) = r.get::<_, Option<f64>>(1) {
                rung_losses.entry(r.get::<_, i32>(0) as u32).or_default().push(loss);
            }
        }
        Ok(SelectionState {
            plan,
            elapsed_seconds: row.get(1),
            epochs_spent: row.get::<_, i64>(2).max(0) as u64,
            rung_losses,
        })
    }

    /// Lets the catalog close `selection` if nothing of it is left to train
    /// (and promote its winner if asked); returns the version promoted.
    /// `lock_timeout` overrides the session's for this call.
    pub async fn finish_selection(&mut self, selection: i64, lock_timeout: Option<Duration>) -> Result<Option<i32>> {
        let tx = self.client.transaction().await?;
        if let Some(t) = lock_timeout {
            tx.batch_execute(&format!("SET LOCAL lock_timeout = {}", t.as_millis().max(1))).await?;
        }
        let row = tx.query_one("SELECT cerebro.finish_selection($1)", &[&selection]).await?;
        tx.commit().await?;
        Ok(row.get(0))
    }

    /// Selections left open with nothing of them queued or training: the
    /// call that should have closed them (after their last stack) failed, or
    /// a user cancelled all that was left of them.
    pub async fn unfinished_selections(&self) -> Result<Vec<i64>> {
        let rows = self
            .client
            .query(
                "SELECT s.id FROM cerebro.selections s
                 WHERE s.finished_at IS NULL
                   AND NOT EXISTS (SELECT FROM cerebro.model_versions m
                                   WHERE m.selection_id = s.id AND m.status IN ('queued', 'training'))
                 ORDER BY s.id",
                &[],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// At most `limit` imported versions with frozen rows that nobody has
    /// measured yet (no importance, no metrics), but for `skip`, oldest first: cerebrod
    /// measures them once their import commits. An import measured on
    /// request, or whose rows hold one class (metrics without importance),
    /// is not among them.
    pub async fn imports_to_measure(&self, skip: &[i64], limit: usize) -> Result<Vec<ImportToMeasure>> {
        let rows = self
            .client
            .query(
                "SELECT id, artifact_sha256, name, version FROM cerebro.model_versions
                 WHERE import_layout IS NOT NULL AND snapshot_id IS NOT NULL AND status = 'ready'
                   AND importance IS NULL AND metrics IS NULL AND artifact_sha256 IS NOT NULL
                   AND id <> ALL($1)
                 ORDER BY id LIMIT $2",
                &[&skip, &(limit as i64)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| ImportToMeasure { id: r.get(0), artifact_sha256: r.get(1), name: r.get(2), version: r.get(3) })
            .collect())
    }

    /// Stores what cerebrod measured of an import (and its surrogate, where
    /// it has none), unless someone measured
    /// it meanwhile (`cerebro.measure_importance`) or its graph changed;
    /// whether it was stored. The trigger on `cerebro.model_versions`
    /// indexes the importance, as after training.
    pub async fn store_import_measure(
        &self,
        import: &ImportToMeasure,
        importance: Option<&Importance>,
        metrics: &Metrics,
        surrogate: Option<&Surrogate>,
    ) -> Result<bool> {
        let importance = importance.map(|i| serde_json::to_value(i).expect("importance serialises"));
        let metrics = serde_json::to_value(metrics).expect("metrics serialise");
        let surrogate = surrogate.map(|s| serde_json::to_value(s).expect("surrogate serialises"));
        // A surrogate distilled on request meanwhile stays.
        let stored = self
            .client
            .execute(
                "UPDATE cerebro.model_versions
                 SET importance = $3, metrics = $4, surrogate = coalesce(surrogate, $5)
                 WHERE id = $1 AND artifact_sha256 = $2 AND status = 'ready'
                   AND importance IS NULL AND metrics IS NULL",
                &[&import.id, &import.artifact_sha256, &importance, &metrics, &surrogate],
            )
            .await?;
        Ok(stored == 1)
    }

    /// Records one epoch of a version; returns whether a user asked to
    /// cancel its job (cerebro.cancel_selection), so training can stop it.
    pub async fn record_epoch(&self, model_version_id: i64, stats: &EpochStats) -> Result<bool> {
        let row = self
            .client
            .query_opt(
                "WITH h AS (
                     INSERT INTO cerebro.training_history (model_version_id, epoch, train_loss, valid_loss, seconds)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (model_version_id, epoch) DO UPDATE
                         SET train_loss = EXCLUDED.train_loss, valid_loss = EXCLUDED.valid_loss,
                             seconds = EXCLUDED.seconds, recorded_at = pg_catalog.now())
                 UPDATE cerebro.model_versions SET epoch = $2 WHERE id = $1
                 RETURNING (SELECT j.cancel_requested FROM cerebro.jobs j WHERE j.model_version_id = $1)",
                &[&model_version_id, &(stats.epoch as i32), &stats.train_loss, &stats.valid_loss, &stats.seconds],
            )
            .await?;
        Ok(row.and_then(|r| r.get::<_, Option<bool>>(0)).unwrap_or(false))
    }

    /// Stores the artifact and results and marks job and model done, at once.
    pub async fn finish_success(
        &mut self,
        job: &ClaimedJob,
        snapshot_id: i64,
        stored: &Stored<'_>,
        fingerprint: &str,
    ) -> Result<()> {
        let onnx = stored.onnx;
        let sha256 = crate::digest::sha256_hex(onnx);
        let sha256 = sha256.as_str();
        let metrics = serde_json::to_value(stored.metrics).expect("metrics serialise");
        let pipeline = &stored.pipeline;
        let trained_with = serde_json::to_value(stored.trained_with).expect("trained_with serialises");
        let importance = stored.importance.map(|i| serde_json::to_value(i).expect("importance serialises"));
        let surrogate = stored.surrogate.map(|s| serde_json::to_value(s).expect("surrogate serialises"));
        let tx = self.client.transaction().await?;
        // The job's row first, then the version's: the order in which
        // cerebro.delete_model takes them, so the two never deadlock.
        tx.execute(
            "UPDATE cerebro.jobs SET state = 'done', finished_at = pg_catalog.now() WHERE id = $1",
            &[&job.job_id],
        )
        .await?;
        tx.execute(
            "INSERT INTO cerebro.artifacts (model_version_id, sha256, size_bytes, bytes) VALUES ($1, $2, $3, $4)
             ON CONFLICT (model_version_id) DO UPDATE
                 SET sha256 = EXCLUDED.sha256, size_bytes = EXCLUDED.size_bytes, bytes = EXCLUDED.bytes,
                     created_at = pg_catalog.now()",
            &[&job.model_version_id, &sha256, &(onnx.len() as i64), &onnx],
        )
        .await?;
        tx.execute(
            "UPDATE cerebro.model_versions SET status = 'ready', metrics = $2, pipeline = $3,
                    artifact_sha256 = $4, trained_at = pg_catalog.now(), error = NULL,
                    epoch = coalesce($10, (SELECT coalesce(pg_catalog.max(epoch), 0) FROM cerebro.training_history
                                           WHERE model_version_id = $1)),
                    weights_sha256 = $5, trained_with = $6, artifact_bytes = $7, importance = $8,
                    surrogate = $9
             WHERE id = $1",
            &[
                &job.model_version_id,
                &metrics,
                &pipeline,
                &sha256,
                &stored.weights_sha256,
                &trained_with,
                &(onnx.len() as i64),
                &importance,
                &surrogate,
                &stored.epochs_run,
            ],
        )
        .await?;
        tx.execute("UPDATE cerebro.snapshots SET fingerprint = $2 WHERE id = $1", &[&snapshot_id, &fingerprint])
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Marks job and model failed with `error`, which users read in
    /// `cerebro.models.error`.
    pub async fn finish_failure(&mut self, job: &ClaimedJob, error: &str) -> Result<()> {
        self.end_job(job, JobState::Failed, ModelStatus::Failed, Some(error)).await
    }

    /// Ends a job whose cancellation was asked for (or whose selection's
    /// budget ran out: `reason`); its model is 'cancelled'.
    pub async fn finish_cancelled(&mut self, job: &ClaimedJob, reason: Option<&str>) -> Result<()> {
        self.end_job(job, JobState::Cancelled, ModelStatus::Cancelled, reason).await
    }

    /// Ends the job in `state` and its model in `status` (both failed, or
    /// both cancelled) with `error`, at once.
    async fn end_job(
        &mut self,
        job: &ClaimedJob,
        state: JobState,
        status: ModelStatus,
        error: Option<&str>,
    ) -> Result<()> {
        let tx = self.client.transaction().await?;
        tx.execute(
            "UPDATE cerebro.jobs SET state = $3::pg_catalog.text::cerebro.job_state, finished_at = pg_catalog.now(),
                    error = coalesce($2, error)
             WHERE id = $1",
            &[&job.job_id, &error, &state.as_str()],
        )
        .await?;
        // Without a reason of its own (a user's cancel), the job's is kept:
        // cerebro.cancel wrote who asked and when; a claim clears it.
        tx.execute(
            "UPDATE cerebro.model_versions SET status = $3::pg_catalog.text::cerebro.model_status,
                    error = (SELECT j.error FROM cerebro.jobs j WHERE j.id = $2)
             WHERE id = $1",
            &[&job.model_version_id, &job.job_id, &status.as_str()],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Puts a job back in the queue, its attempt not counted (the daemon is
    /// shutting down, the job did nothing wrong).
    pub async fn requeue(&mut self, job: &ClaimedJob) -> Result<()> {
        let tx = self.client.transaction().await?;
        tx.execute(
            "UPDATE cerebro.jobs SET state = 'queued', attempts = greatest(attempts - 1, 0), claimed_by = NULL
             WHERE id = $1",
            &[&job.job_id],
        )
        .await?;
        tx.execute(
            "UPDATE cerebro.model_versions SET status = 'queued', epoch = 0 WHERE id = $1",
            &[&job.model_version_id],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Each of `name`'s `versions` that still exists, in that order, with
    /// its artifact if it has one.
    pub async fn ensemble_candidates(&self, name: &str, versions: &[i32]) -> Result<Vec<EnsembleCandidate>> {
        let rows = self
            .client
            .query(
                "SELECT m.id, m.version, m.status::pg_catalog.text, m.snapshot_id, m.features
                 FROM pg_catalog.unnest($2::pg_catalog.int4[]) WITH ORDINALITY AS p(version, place)
                 JOIN cerebro.model_versions m ON m.name = $1 AND m.version = p.version
                 ORDER BY p.place",
                &[&name, &versions],
            )
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push(EnsembleCandidate {
                version: r.get(1),
                status: r.get(2),
                snapshot_id: r.get(3),
                features: r.get(4),
                artifact: self.artifact(r.get(0)).await?,
            });
        }
        Ok(out)
    }

    /// The ONNX bytes of a ready model version and their sha256.
    pub async fn artifact(&self, model_version_id: i64) -> Result<Option<Artifact>> {
        let row = self
            .client
            .query_opt(
                "SELECT a.sha256, a.bytes, m.import_layout, m.task, m.pipeline, m.options, m.class_labels,
                        pg_catalog.format('model \"%s\" version %s', m.name, m.version)
                 FROM cerebro.artifacts a JOIN cerebro.model_versions m ON m.id = a.model_version_id
                 WHERE a.model_version_id = $1",
                &[&model_version_id],
            )
            .await?;
        let artifact = row
            .map(|r| {
                let layout: Option<serde_json::Value> = r.get(2);
                let task: String = r.get(3);
                let pipeline: Option<serde_json::Value> = r.get(4);
                let options: Option<serde_json::Value> = r.get(5);
                let classes = r.get::<_, Option<Vec<String>>>(6).map_or(0, |c| c.len());
                // A catalog the engine cannot read leaves the version to ONNX Runtime.
                let native = match (pipeline, options, &layout) {
                    (Some(pipeline), Some(options), None) => {
                        match (serde_json::from_value(pipeline), serde_json::from_value(options)) {
                            (Ok(pipeline), Ok(options)) => Some(NativeParts { pipeline, options, classes }),
                            _ => None,
                        }
                    }
                    _ => None,
                };
                Ok(Artifact {
                    label: r.get(7),
                    sha256: r.get(0),
                    bytes: r.get(1),
                    members: Vec::new(),
                    import_layout: layout
                        .map(serde_json::from_value)
                        .transpose()
                        .map_err(|e| CatalogError::Corrupt(format!("import_layout: {e}")))?,
                    task: match task.parse() {
                        Ok(cerebro_shared::spec::TaskChoice::Fixed(t)) => t,
                        _ => return Err(CatalogError::Corrupt(format!("unknown task {task}"))),
                    },
                    native,
                })
            })
            .transpose()?;
        match artifact {
            // Only a version the engine cannot score alone may be an ensemble.
            Some(mut artifact) if artifact.native.is_none() && artifact.import_layout.is_none() => {
                artifact.members = self.ensemble_members(model_version_id).await?;
                Ok(Some(artifact))
            }
            artifact => Ok(artifact),
        }
    }

    /// The members of `model_version_id` if it is a selection's ensemble,
    /// heaviest first, as its lineage records them.
    async fn ensemble_members(&self, model_version_id: i64) -> Result<Vec<MemberRef>> {
        let rows = self
            .client
            .query(
                "SELECT (e->>'version')::int, (e->>'weight')::float8, v.id, a.sha256
                 FROM cerebro.model_versions m
                 CROSS JOIN LATERAL jsonb_array_elements(m.trained_with->'ensemble'->'members')
                     WITH ORDINALITY AS l(e, n)
                 LEFT JOIN cerebro.model_versions v ON v.name = m.name AND v.version = (e->>'version')::int
                 LEFT JOIN cerebro.artifacts a ON a.model_version_id = v.id
                 WHERE m.id = $1 AND jsonb_typeof(m.trained_with->'ensemble'->'members') = 'array'
                 ORDER BY l.n",
                &[&model_version_id],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let stored = match (r.get::<_, Option<i64>>(2), r.get::<_, Option<String>>(3)) {
                    (Some(id), Some(sha)) => Some((id, sha)),
                    _ => None,
                };
                MemberRef { version: r.get(0), weight: r.get(1), stored }
            })
            .collect())
    }

    /// The version of `name` SQL predictions score with (the given one, else
    /// the deployed one, else the newest ready one: cerebro.resolve_version),
    /// if it is ready.
    pub async fn find_model(&self, name: &str, version: Option<i32>) -> Result<ModelRef> {
        let row = self
            .client
            .query_opt(
                "SELECT id, name, version, features, class_labels, source_relation, key_column, artifact_sha256
                 FROM cerebro.model_versions
                 WHERE name = $1 AND status = 'ready' AND version = cerebro.resolve_version($1, $2::pg_catalog.int4)",
                &[&name, &version],
            )
            .await?;
        let row = row.ok_or_else(|| {
            CatalogError::NotFound(match version {
                Some(v) => format!("model \"{name}\" has no ready version {v}"),
                None => format!("model \"{name}\" has no ready version"),
            })
        })?;
        let features: Vec<Feature> =
            serde_json::from_value(row.get(3)).map_err(|e| CatalogError::Corrupt(format!("features: {e}")))?;
        Ok(ModelRef {
            id: row.get(0),
            name: row.get(1),
            version: row.get(2),
            features,
            class_labels: row.get(4),
            source_relation: row.get(5),
            key_column: row.get(6),
            artifact_sha256: row.get(7),
        })
    }
}

#[cfg(test)]
mod tests {
    use cerebro_shared::spec::FeatureKind;

    use super::*;

    #[test]
    fn lock_conflicts_are_told_apart_from_refusals() {
        assert_eq!(Failure::of(Some(&SqlState::LOCK_NOT_AVAILABLE)), Failure::Lock);
        assert_eq!(Failure::of(Some(&SqlState::T_R_DEADLOCK_DETECTED)), Failure::Lock);
        assert_eq!(Failure::of(Some(&SqlState::T_R_SERIALIZATION_FAILURE)), Failure::Lock);
        assert_eq!(Failure::of(Some(&SqlState::INSUFFICIENT_PRIVILEGE)), Failure::Refusal);
        assert_eq!(Failure::of(Some(&SqlState::UNIQUE_VIOLATION)), Failure::Refusal);
        assert_eq!(Failure::of(None), Failure::Lost);
        // A server stopping (fast or after a crash), starting, or a broken
        // connection: the session is gone, the statement was not refused.
        assert_eq!(Failure::of(Some(&SqlState::ADMIN_SHUTDOWN)), Failure::Lost);
        assert_eq!(Failure::of(Some(&SqlState::CRASH_SHUTDOWN)), Failure::Lost);
        assert_eq!(Failure::of(Some(&SqlState::CANNOT_CONNECT_NOW)), Failure::Lost);
        assert_eq!(Failure::of(Some(&SqlState::CONNECTION_FAILURE)), Failure::Lost);
        // A cancelled statement (pg_cancel_backend) is not a lost session,
        // nor the job's fault: the write is tried again later.
        assert_eq!(Failure::of(Some(&SqlState::QUERY_CANCELED)), Failure::Lock);
        let lost = CatalogError::Lost("the server closed the connection".into());
        assert!(lost.is_lost() && lost.is_transient() && !lost.is_refusal());
        let corrupt = CatalogError::Corrupt("x".into());
        assert!(!corrupt.is_lock_timeout() && !corrupt.is_refusal());
    }

    #[test]
    fn sessions_pin_the_search_path_and_bound_lock_waits() {
        let sql = session_setup(Duration::from_millis(1500));
        assert!(sql.starts_with("SET search_path = pg_catalog, pg_temp; SET lock_timeout = 1500;"), "{sql}");
        for pinned in [
            "statement_timeout = 0",
            "idle_session_timeout = 0",
            "default_transaction_read_only = off",
            "default_transaction_isolation = 'read committed'",
        ] {
            assert!(sql.contains(pinned), "{sql}");
        }
        // Never 0, which would mean waiting forever.
        assert!(session_setup(Duration::ZERO).contains("lock_timeout = 1;"));
    }

    #[test]
    fn the_sweep_requeues_cancels_or_gives_up() {
        let stopped = LeftBy::StoppedDaemon;
        let lock = LeftBy::HeldLock;
        assert_eq!(sweep_outcome(1, 3, true, &lock, NOW), (SweptTo::Cancelled, None));
        assert_eq!(sweep_outcome(3, 3, true, &stopped, NOW), (SweptTo::Cancelled, None));
        let (to, error) = sweep_outcome(1, 3, false, &stopped, NOW);
        assert_eq!(to, SweptTo::Queued);
        assert_eq!(error.unwrap(), "cerebrod stopped during attempt 1; the job was requeued");
        let (to, error) = sweep_outcome(3, 3, false, &stopped, NOW);
        assert_eq!(to, SweptTo::Failed);
        assert!(error.unwrap().contains("giving up"));
        let (to, error) = sweep_outcome(2, 3, false, &lock, NOW);
        assert_eq!(to, SweptTo::Queued);
        assert!(error.unwrap().contains("another transaction held a lock on the job's catalog rows"));
        let (to, error) = sweep_outcome(3, 3, false, &lock, NOW);
        assert_eq!(to, SweptTo::Failed);
        let error = error.unwrap();
        assert!(error.contains("held a lock") && error.contains("giving up after 3 attempts"), "{error}");
    }

    #[test]
    fn a_job_a_lost_session_left_is_requeued_with_the_servers_reason_until_its_attempts_run_out() {
        let lost = LeftBy::EndedSession(SessionEnd {
            why: "the connection to the database was lost: terminating connection because of crash of another \
                  server process"
                .into(),
            on_purpose: false,
            server_started: Some(BEFORE),
            ..SessionEnd::default()
        });
        let (to, error) = sweep_outcome(1, 3, false, &lost, NOW);
        assert_eq!(to, SweptTo::Queued, "a database restart fails no job that has attempts left");
        let error = error.unwrap();
        assert!(error.starts_with("attempt 1 was interrupted: the connection to the database was lost"), "{error}");
        assert!(error.contains("crash of another server process"), "{error}");
        let (to, error) = sweep_outcome(3, 3, false, &lost, NOW);
        assert_eq!(to, SweptTo::Failed);
        assert!(error.unwrap().ends_with("giving up after 3 attempts"));
        assert_eq!(sweep_outcome(2, 3, true, &lost, NOW), (SweptTo::Cancelled, None));
        // A restart on purpose (57P01, and the server started again since)
        // counts no attempt: the third one is requeued too, not failed.
        let mut end = SessionEnd::from_code(
            "terminating connection due to administrator command".into(),
            Some(&SqlState::ADMIN_SHUTDOWN),
        );
        end.server_started = Some(BEFORE);
        let restart = LeftBy::EndedSession(end.clone());
        assert!(!restart.counts(NOW) && lost.counts(NOW) && LeftBy::StoppedDaemon.counts(NOW));
        let (to, error) = sweep_outcome(3, 3, false, &restart, NOW);
        assert_eq!(to, SweptTo::Queued);
        assert!(error.unwrap().ends_with("the attempt not counted (the database was restarted on purpose)"));
        assert_eq!(sweep_outcome(3, 3, true, &restart, NOW), (SweptTo::Cancelled, None));
        // The same 57P01 while the server ran on (pg_terminate_backend of
        // cerebrod's session, again and again) counts: the job cannot go
        // round for ever.
        assert!(restart.counts(BEFORE));
        assert_eq!(sweep_outcome(3, 3, false, &restart, BEFORE).0, SweptTo::Failed);
        // Unknown when the server started: counted, as before.
        end.server_started = None;
        assert!(LeftBy::EndedSession(end).counts(NOW));
        // Every connection ended for another server process's crash
        // (57P02): none of cerebrod's backends crashed, not counted. One
        // that closed without a word (the backend that crashed) counts.
        let elsewhere = SessionEnd::from_code(
            "terminating connection because of crash of another server process".into(),
            Some(&SqlState::CRASH_SHUTDOWN),
        );
        assert!(elsewhere.crashed_elsewhere && !LeftBy::EndedSession(elsewhere.clone()).counts(BEFORE));
        let (to, error) = sweep_outcome(3, 3, false, &LeftBy::EndedSession(elsewhere), BEFORE);
        assert_eq!(to, SweptTo::Queued);
        assert!(error.unwrap().ends_with("(another server process crashed, none of cerebrod's)"));
        assert!(!SessionEnd::from_code("the server closed the connection".into(), None).crashed_elsewhere);
        // The lock given to a DROP or ALTER EXTENSION: not counted.
        let aside = LeftBy::EndedSession(SessionEnd {
            why: "server process 7 waits to take cerebro.daemon_lock whole".into(),
            stepped_aside: true,
            ..SessionEnd::default()
        });
        assert!(!aside.counts(NOW));
        let (to, error) = sweep_outcome(3, 3, false, &aside, NOW);
        assert_eq!(to, SweptTo::Queued);
        assert!(error.unwrap().ends_with("(cerebrod gave its lock to a DROP or ALTER EXTENSION)"));
    }

    /// Server start times (microseconds since the epoch) for the sweep's tests.
    const BEFORE: i64 = 1_764_900_000_000_000;
    const NOW: i64 = 1_764_950_000_000_000;

    fn plan(features: &[&str], target: &str) -> TrainingPlan {
        TrainingPlan {
            task: Task::Binary,
            target: target.into(),
            features: features.iter().map(|n| Feature { name: (*n).into(), kind: FeatureKind::Numeric }).collect(),
            class_labels: vec!["no".into(), "yes".into()],
            options: TrainOptions::default(),
        }
    }

    #[test]
    fn snapshot_columns_follow_the_recorded_order() {
        let columns: Vec<String> = ["customer_id", "tenure", "churn", "Monthly \"x\""].map(String::from).into();
        let p = plan(&["Monthly \"x\"", "tenure"], "churn");
        let mapped = SnapshotColumns::map(&columns, &p, Some("customer_id")).unwrap();
        assert_eq!(mapped.features, vec!["c4", "c2"]);
        assert_eq!(mapped.target, "c3");
        assert_eq!(mapped.key.as_deref(), Some("c1"));
        assert_eq!(SnapshotColumns::map(&columns, &p, None).unwrap().key, None);
        let e = SnapshotColumns::map(&columns, &plan(&["gone"], "churn"), None).unwrap_err();
        assert!(e.to_string().contains("no column gone"), "{e}");
    }
}
