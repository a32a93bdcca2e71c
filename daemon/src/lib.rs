//! cerebrod: trains, exports and scores Cerebro models.
//!
//! [`run`] is the whole daemon: it takes the database's daemon lock, then
//! serves the control socket and runs the job loop (which first recovers
//! jobs a previous daemon left running) until `shutdown` turns true. When
//! its session with the database ends (a restart, a crashed backend, a
//! terminated connection), it reconnects with backoff and goes on: the
//! socket stays open, and models already loaded are scored meanwhile. A
//! hot standby has no lock to take and no job to train: there cerebrod
//! only scores ([`serve_standby`]) until the standby is promoted.

pub mod catalog;
pub mod config;
pub mod data;
pub mod digest;
pub mod distill;
pub mod engine;
pub mod ensemble;
pub mod gpu;
pub mod guide;
pub mod importance;
pub mod metrics;
pub mod onnx;
pub mod scheduler;
pub mod scoring;
pub mod server;
pub mod snapshot_cache;
pub mod train;
pub mod warm;

// A network and what it reads live in crate `cerebro-model`, which the
// extension links to score in the backend; the daemon uses them as its own.
pub use cerebro_model::{attribution, features, native};

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cerebro_shared::batch::ColumnData;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use crate::catalog::{Catalog, CatalogError, SessionEnd};
use crate::config::Config;
use crate::data::{copy_columns, ReadAs, UserRelation};
use crate::engine::{Compute, DeviceChoice};
use crate::scoring::{OnnxRuntime, ScoringError, ScoringModel};
use crate::server::{CatalogSlot, ScoringService};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Scoring(#[from] ScoringError),
    #[error(transparent)]
    Server(#[from] server::ServerError),
    #[error("another cerebrod already serves this database (it holds the daemon lock), or a DROP or ALTER EXTENSION holds it")]
    AlreadyRunning,
    #[error("the job loop panicked: {0}")]
    JobLoopPanicked(String),
}

impl DaemonError {
    /// Worth trying again at start-up (see [`CatalogError::is_transient`]).
    fn is_transient(&self) -> bool {
        matches!(self, DaemonError::Catalog(e) if e.is_transient())
    }
}

/// The first wait before trying the database again.
pub const RECONNECT_FIRST: Duration = Duration::from_millis(500);
/// The longest wait between two tries.
pub const RECONNECT_MAX: Duration = Duration::from_secs(10);
/// A session that lasted this long ended by accident, not in a loop that
/// fails at once each time: the waits start again from RECONNECT_FIRST.
const STABLE_SESSION: Duration = Duration::from_secs(30);
/// How long a stopping daemon lets a stack in training requeue its jobs.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Waits between tries to reach the database: RECONNECT_FIRST, doubled
/// after each failure, at most RECONNECT_MAX.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: RECONNECT_FIRST }
    }
}

impl Backoff {
    /// The wait before the next try; each call doubles the one after.
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(RECONNECT_MAX);
        wait
    }

    pub fn reset(&mut self) {
        self.next = RECONNECT_FIRST;
    }
}

/// The daemon lock, held on a session of its own.
struct HeldLock {
    /// Its session's server process names the daemon in the jobs it claims.
    lock: catalog::DaemonLock,
    /// Finishes when the lock's session is lost, and the lock with it.
    driver: JoinHandle<SessionEnd>,
}

/// One session of the daemon with the database: the job loop's connection
/// (which LISTENs) and the one that reads snapshots and artifacts.
struct Session {
    control: Catalog,
    control_driver: JoinHandle<SessionEnd>,
    data: Arc<Catalog>,
    data_driver: JoinHandle<SessionEnd>,
    /// What the jobs this session claims say in `claimed_by`: unique to the
    /// session, so that the next one knows the jobs it left running.
    worker_id: String,
    /// When the server started (see `Catalog::server_started`).
    server_started: i64,
}

/// Takes the daemon lock unless `held` still has it (its session alive),
/// then opens the job loop's and the data connections.
async fn open_session(
    config: &Config,
    held: &mut Option<HeldLock>,
    wake: &Arc<Notify>,
    number: u64,
) -> Result<Session, DaemonError> {
    let (url, lock_timeout) = (config.database_url.as_str(), config.lock_timeout);
    if held.as_ref().is_none_or(|h| h.driver.is_finished()) {
        *held = None;
        let Some((lock, driver)) = catalog::lock_daemon(url, lock_timeout).await? else {
            return Err(DaemonError::AlreadyRunning);
        };
        *held = Some(HeldLock { lock, driver });
    }
    let pid = held.as_ref().map_or(0, |h| h.lock.backend_pid());
    let (control, control_driver) = catalog::connect(url, Some(wake.clone()), lock_timeout).await?;
    if let Err(e) = control.listen().await {
        control_driver.abort();
        return Err(e.into());
    }
    let server_started = match control.server_started().await {
        Ok(t) => t,
        Err(e) => {
            control_driver.abort();
            return Err(e.into());
        }
    };
    let (data, data_driver) = match catalog::connect(url, None, lock_timeout).await {
        Ok(c) => c,
        Err(e) => {
            control_driver.abort();
            return Err(e.into());
        }
    };
    Ok(Session {
        control,
        control_driver,
        data: Arc::new(data),
        data_driver,
        worker_id: format!("cerebrod pid {} (session {pid}, connection {number})", std::process::id()),
        server_started,
    })
}

/// The file system's identity of a socket file, to tell ours from one
/// another daemon made in its place.
fn socket_file(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The control socket being served, and the file it was bound to.
struct Listening {
    server: JoinHandle<()>,
    file: Option<(u64, u64)>,
}

/// Binds the socket once the daemon holds the lock (or serves a standby),
/// and again if another daemon replaced (or removed) the file while this
/// one was away from the database and without the lock.
fn listen(
    config: &Config,
    listening: &mut Option<Listening>,
    service: &Arc<ScoringService>,
    limits: server::Limits,
    shutdown: &watch::Receiver<bool>,
) -> Result<(), DaemonError> {
    if listening.as_ref().is_some_and(|l| l.file.is_some() && socket_file(&config.socket_path) == l.file) {
        return Ok(());
    }
    if let Some(old) = listening.take() {
        old.server.abort();
        warn!(socket = %config.socket_path.display(), "the socket file changed while cerebrod was away; binding it again");
    }
    let listener = server::bind(&config.socket_path, config.allowed_uid)?;
    info!(socket = %config.socket_path.display(), allowed_uid = config.allowed_uid, "listening");
    let server = tokio::spawn(server::serve(listener, service.clone(), config.allowed_uid, limits, shutdown.clone()));
    *listening = Some(Listening { server, file: socket_file(&config.socket_path) });
    Ok(())
}

/// How serving a hot standby ended.
enum StandbyEnd {
    /// A stop was asked for.
    Stop,
    /// The standby is a primary now: the daemon lock can be taken.
    Promoted,
    /// The database was not in recovery when first asked, though taking
    /// the lock said it was (promoted in between, or a `database_url` that
    /// reaches different servers): try the lock again, after a wait.
    NotInRecovery,
    /// The connection was lost: why.
    Lost(String),
}

/// Serves scoring from a hot standby, where the daemon lock cannot be
/// taken (no lock beyond ROW EXCLUSIVE during recovery) and no job is
/// trained, since nothing can be written: one connection reads the models,
/// artifacts and snapshots scoring asks for, as the primary's cerebrod
/// does, and looks every `poll_interval` whether the standby was promoted.
/// A standby on another machine has no primary's cerebrod to reach.
async fn serve_standby(
    config: &Config,
    catalog: &CatalogSlot,
    shutdown: &mut watch::Receiver<bool>,
    first: bool,
) -> Result<StandbyEnd, CatalogError> {
    let (data, mut driver) = catalog::connect(&config.database_url, None, config.lock_timeout).await?;
    let data = Arc::new(data);
    let promoted = !data.in_recovery().await.inspect_err(|_| driver.abort())?;
    if promoted {
        driver.abort();
        return Ok(StandbyEnd::NotInRecovery);
    }
    let said = "the database is a hot standby (in recovery): cerebrod scores from it and trains nothing until it \
                is promoted (jobs are the primary's cerebrod's)";
    if first {
        warn!("{said}");
    } else {
        info!("{said}");
    }
    catalog.set(Some(data.clone()));
    let end = loop {
        // The look waits behind a snapshot the connection reads: a stop
        // or a lost connection must not.
        let look = async {
            tokio::time::sleep(config.poll_interval).await;
            data.in_recovery().await
        };
        tokio::select! {
            biased;
            _ = shutdown.changed() => break StandbyEnd::Stop,
            why = &mut driver => break StandbyEnd::Lost(lost_because("the standby's", why).why),
            looked = look => match looked {
                Ok(true) => {}
                Ok(false) => break StandbyEnd::Promoted,
                Err(e) => break StandbyEnd::Lost(format!("cannot ask the standby whether it was promoted: {}", e.reason())),
            },
        }
    };
    catalog.set(None);
    if matches!(end, StandbyEnd::Promoted) {
        // Reads under way finish on it (they hold the connection); it
        // closes with the last of them.
        drop(driver);
    } else {
        driver.abort();
    }
    Ok(end)
}

/// How a session ended.
enum End {
    /// A stop was asked for.
    Stop,
    /// The job loop returned (an error ends the session).
    JobLoop(Result<(scheduler::Carry, Result<(), CatalogError>), tokio::task::JoinError>),
    /// A connection of the session was lost: why, and which.
    Lost(SessionEnd, Connection),
    /// A statement waits to take the daemon lock whole: why.
    StepAside(String),
}

/// A session's connections to the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Connection {
    Control,
    Data,
    Lock,
}

/// How long the session's other connections are waited for, once one was
/// ended for another server process's crash, to hear what ended them.
const CRASH_FAREWELLS: Duration = Duration::from_secs(2);

/// Whether each of `others`, the session's connections still to end after
/// one was ended for another server process's crash (57P02), was ended for
/// it too: then none of cerebrod's own backends crashed, and no job's
/// statement did it. A connection that closes without a word (the backend
/// that crashed), or not at once, says otherwise.
async fn all_said_crash_elsewhere<'a>(others: impl Iterator<Item = &'a mut JoinHandle<SessionEnd>>) -> bool {
    let deadline = tokio::time::Instant::now() + CRASH_FAREWELLS;
    for driver in others {
        match tokio::time::timeout_at(deadline, driver).await {
            Ok(Ok(end)) if end.crashed_elsewhere => {}
            other => {
                debug!("another connection of the session did not end for another process's crash: {other:?}");
                return false;
            }
        }
    }
    true
}

/// Why a driver's connection ended.
fn lost_because(what: &str, ended: Result<SessionEnd, tokio::task::JoinError>) -> SessionEnd {
    let end = ended.unwrap_or_else(|e| SessionEnd { why: e.to_string(), ..SessionEnd::default() });
    SessionEnd { why: format!("the connection to the database was lost: {} ({what} connection)", end.why), ..end }
}

/// Runs the daemon until `shutdown` becomes true. Database errors end a
/// session, never the daemon: it reconnects, waiting RECONNECT_FIRST
/// doubled after each failed try up to RECONNECT_MAX, and says so in its
/// log. It gives up only before it has first served, on errors no retry
/// mends (a wrong database or password, another daemon holding the lock).
pub async fn run(config: Config, mut shutdown: watch::Receiver<bool>) -> Result<(), DaemonError> {
    let gpus = gpu::inventory();
    info!(
        "cerebrod {} ({}) starting; {gpus}; training on device = {}",
        env!("CARGO_PKG_VERSION"),
        env!("CEREBRO_GIT_COMMIT"),
        config.device
    );
    if let DeviceChoice::Cuda(n) = config.device {
        let present = matches!(&gpus, gpu::GpuInventory::Devices(d) if d.iter().any(|g| g.ordinal == n));
        if !present {
            warn!("device = cuda:{n}, but {gpus}: training jobs will fail until the GPU is usable");
        }
    }
    let runtime =
        OnnxRuntime::load(&config.onnxruntime_library, config.scoring_threads)?.with_native(config.native_scoring);
    let catalog = Arc::new(CatalogSlot::default());
    let service = Arc::new(ScoringService::new(
        runtime.clone(),
        catalog.clone(),
        config.model_cache_size,
        config.scoring_deadline,
    ));
    let limits = server::Limits { max_connections: config.max_connections, scoring_deadline: config.scoring_deadline };
    let wake = Arc::new(Notify::new());
    // Kept across sessions: a snapshot never changes once frozen.
    let snapshots = Arc::new(snapshot_cache::SnapshotCache::new(config.snapshot_cache_bytes));

    let mut held: Option<HeldLock> = None;
    let mut listening: Option<Listening> = None;
    let mut carry = scheduler::Carry::default();
    let mut backoff = Backoff::default();
    // Before the next try to reach the database.
    let mut pause = Duration::ZERO;
    let mut sessions = 0u64;
    // Failed tries since the last session ended, and when it ended.
    let mut tries = 0u32;
    let mut away_since: Option<Instant> = None;

    let result = loop {
        if !pause.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.changed() => {}
            }
        }
        if *shutdown.borrow() {
            break Ok(());
        }
        let session = match open_session(&config, &mut held, &wake, sessions + 1).await {
            Ok(s) => s,
            Err(DaemonError::Catalog(CatalogError::Db(e)))
                if e.code() == Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION) =>
            {
                if let Err(e) = listen(&config, &mut listening, &service, limits, &shutdown) {
                    break Err(e);
                }
                let started = Instant::now();
                let served = serve_standby(&config, &catalog, &mut shutdown, sessions == 0).await;
                // Served: errors no retry mends end the daemon no more.
                if matches!(served, Ok(StandbyEnd::Stop | StandbyEnd::Promoted | StandbyEnd::Lost(_))) {
                    sessions += 1;
                }
                match served {
                    Ok(StandbyEnd::Stop) => break Ok(()),
                    Ok(StandbyEnd::Promoted) => {
                        info!("the database was promoted: cerebrod takes its lock and trains");
                        backoff.reset();
                        pause = Duration::ZERO;
                    }
                    Ok(StandbyEnd::NotInRecovery) => {
                        pause = backoff.next_wait();
                        warn!(
                            "taking the daemon lock said the database is in recovery, but it is not now; trying \
                             again in {:.1} s",
                            pause.as_secs_f64()
                        );
                    }
                    Ok(StandbyEnd::Lost(why)) => {
                        pause = if started.elapsed() >= STABLE_SESSION {
                            backoff.reset();
                            RECONNECT_FIRST
                        } else {
                            backoff.next_wait()
                        };
                        warn!("{why}; reconnecting in {:.1} s", pause.as_secs_f64());
                    }
                    Err(e) if sessions == 0 && !e.is_transient() => break Err(e.into()),
                    Err(e) => {
                        pause = backoff.next_wait();
                        warn!("cannot reach the standby: {e}; trying again in {:.1} s", pause.as_secs_f64());
                    }
                }
                continue;
            }
            Err(e) if sessions == 0 && !e.is_transient() => break Err(e),
            Err(e) => {
                tries += 1;
                pause = backoff.next_wait();
                let doing = if sessions == 0 { "reach" } else { "reconnect to" };
                warn!(
                    attempt = tries,
                    "cannot {doing} the database: {e}; trying again in {:.1} s",
                    pause.as_secs_f64()
                );
                continue;
            }
        };
        sessions += 1;
        if let Some(since) = away_since.take() {
            info!(
                attempts = tries + 1,
                "reconnected to the database after {:.1} s; the job loop resumes",
                since.elapsed().as_secs_f64()
            );
        }
        tries = 0;

        if let Err(e) = listen(&config, &mut listening, &service, limits, &shutdown) {
            break Err(e);
        }

        let Session { control, mut control_driver, data, mut data_driver, worker_id, server_started } = session;
        catalog.set(Some(data.clone()));
        let started = Instant::now();
        let (lost_tx, lost) = watch::channel(false);
        let scheduler = scheduler::Scheduler {
            control,
            data,
            worker_id: worker_id.clone(),
            server_started,
            poll_interval: config.poll_interval,
            lock_timeout: config.lock_timeout,
            compute: Compute { device: config.device, threads: config.training_threads },
            stack_memory_bytes: config.stack_memory_bytes,
            model_memory_bytes: config.model_memory_bytes,
            max_training_work: config.max_training_work,
            runtime: runtime.clone(),
            wake: wake.clone(),
            shutdown: shutdown.clone(),
            lost,
            carry: std::mem::take(&mut carry),
            snapshots: snapshots.clone(),
            service: service.clone(),
        };
        let mut jobs = tokio::spawn(scheduler.run());
        let HeldLock { lock, driver: lock_driver } = held.as_mut().expect("open_session holds the lock");
        let end = tokio::select! {
            biased;
            _ = shutdown.changed() => End::Stop,
            why = &mut control_driver => End::Lost(lost_because("the job loop's", why), Connection::Control),
            why = &mut data_driver => End::Lost(lost_because("the snapshots' and artifacts'", why), Connection::Data),
            // Without the lock's session another daemon could start and
            // take over the jobs this one is training.
            why = lock_driver => End::Lost(lost_because("the daemon lock's", why), Connection::Lock),
            why = lock.until_wanted_whole(config.poll_interval) => End::StepAside(why),
            done = &mut jobs => End::JobLoop(done),
        };
        // From here the session's connections serve nothing: calls on them
        // fail at once instead of waiting on a server that is gone.
        catalog.set(None);
        let stopping = *shutdown.borrow() || matches!(end, End::Stop);
        if stopping {
            // Give a stack in training the chance to requeue its jobs.
            if !jobs.is_finished() {
                let _ = tokio::time::timeout(STOP_GRACE, &mut jobs).await;
            }
            control_driver.abort();
            data_driver.abort();
            break Ok(());
        }
        let elsewhere = match &end {
            End::Lost(why, which) if why.crashed_elsewhere => {
                let lock_driver = held.as_mut().map(|h| &mut h.driver);
                let others = [
                    (*which != Connection::Control).then_some(&mut control_driver),
                    (*which != Connection::Data).then_some(&mut data_driver),
                    lock_driver.filter(|_| *which != Connection::Lock),
                ];
                all_said_crash_elsewhere(others.into_iter().flatten()).await
            }
            _ => false,
        };
        control_driver.abort();
        data_driver.abort();
        // A statement in flight gets the server's own words (a fast
        // shutdown's FATAL goes to it, not to the connection).
        let statement_lost = |e: &CatalogError| {
            e.is_lost().then(|| SessionEnd {
                why: format!("the connection to the database was lost: {}", e.reason()),
                on_purpose: matches!(e, CatalogError::Db(db)
                    if db.code() == Some(&tokio_postgres::error::SqlState::ADMIN_SHUTDOWN)),
                ..SessionEnd::default()
            })
        };
        let mut stepped_aside = false;
        let (ended, why) = match end {
            End::Stop => unreachable!("handled above"),
            End::Lost(why, _) => {
                let _ = lost_tx.send(true);
                let ended = jobs.await;
                let why = match &ended {
                    Ok((_, Err(e @ CatalogError::Db(db)))) if db.as_db_error().is_some() => {
                        statement_lost(e).unwrap_or(why)
                    }
                    _ => why,
                };
                (ended, SessionEnd { crashed_elsewhere: elsewhere, ..why })
            }
            End::StepAside(why) => {
                let _ = lost_tx.send(true);
                let ended = jobs.await;
                // Closing the lock's session ends its transaction and frees
                // the lock, now that nothing of this session writes.
                if let Some(h) = held.take() {
                    h.driver.abort();
                }
                stepped_aside = true;
                (ended, SessionEnd { why, stepped_aside: true, ..SessionEnd::default() })
            }
            End::JobLoop(done) => {
                let stopped = |why: String| SessionEnd { why, ..SessionEnd::default() };
                let why = match &done {
                    Ok((_, Err(e))) => {
                        statement_lost(e).unwrap_or_else(|| stopped(format!("the job loop stopped: {e}")))
                    }
                    Ok((_, Ok(()))) => stopped("the job loop stopped".into()),
                    Err(e) => stopped(e.to_string()),
                };
                (done, why)
            }
        };
        match ended {
            Ok((c, _)) => carry = c,
            Err(e) => break Err(DaemonError::JobLoopPanicked(e.to_string())),
        }
        let why_text = why.why.clone();
        carry.session_ended(worker_id, SessionEnd { server_started: Some(server_started), ..why });
        let after = "the jobs this session had in hand go back to the queue once cerebrod is back, \
                     and models already loaded are still scored meanwhile";
        if stepped_aside {
            warn!("{why_text}; {after}");
        } else {
            error!("{why_text}. Reconnecting; {after}");
        }
        let lasted = started.elapsed();
        if lasted >= STABLE_SESSION {
            backoff.reset();
            pause = Duration::ZERO;
        } else {
            // A session that ends soon after it began waits longer each
            // time, so that an error met at every start does not spin.
            pause = backoff.next_wait();
        }
        away_since = Some(Instant::now());
    };
    if let Some(l) = listening {
        l.server.abort();
        // Only our own file: another daemon may have bound the path since.
        if l.file.is_some() && socket_file(&config.socket_path) == l.file {
            let _ = std::fs::remove_file(&config.socket_path);
        }
    }
    // Last: the lock is freed only once nothing of this daemon writes any more.
    drop(held);
    info!("cerebrod stopped");
    result
}

/// One scored row of [`score_relation`].
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredRow {
    pub key: Option<String>,
    pub label: Option<String>,
    pub score: f64,
}

/// Scores every row of a relation entirely inside the daemon: rows read with
/// COPY BINARY, scored by ONNX Runtime. This is the reference the SQL path
/// (`cerebro.predictions`) is checked against.
pub async fn score_relation(
    config: &Config,
    model_name: &str,
    version: Option<i32>,
    source: Option<&str>,
    key_column: Option<&str>,
) -> Result<Vec<ScoredRow>, DaemonError> {
    let runtime =
        OnnxRuntime::load(&config.onnxruntime_library, config.scoring_threads)?.with_native(config.native_scoring);
    let (mut catalog, _driver) = catalog::connect(&config.database_url, None, config.lock_timeout).await?;
    let model = catalog.find_model(model_name, version).await?;
    let artifact = catalog
        .artifact(model.id)
        .await?
        .ok_or_else(|| CatalogError::NotFound(format!("model {model_name} has no artifact")))?;
    if artifact.sha256 != model.artifact_sha256 {
        return Err(CatalogError::Corrupt(format!(
            "artifact {} is not the recorded {}",
            artifact.sha256, model.artifact_sha256
        ))
        .into());
    }
    let relation = UserRelation::resolve(catalog.client_mut(), source.unwrap_or(&model.source_relation)).await?;
    let key = key_column.map(str::to_owned).or(model.key_column.clone());
    let mut columns = Vec::with_capacity(model.features.len() + 1);
    for f in &model.features {
        columns.push(relation.read(&f.name, ReadAs::for_feature(f.kind))?);
    }
    if let Some(k) = &key {
        columns.push(relation.read(k, ReadAs::Text)?);
    }
    let mut table = copy_columns(catalog.client(), &relation.qualified, &columns, None).await?.columns;
    let keys = match key {
        Some(_) => match table.pop() {
            Some(ColumnData::Text(k)) => k,
            _ => unreachable!("the key is read last, as text"),
        },
        None => vec![None; table.first().map_or(0, |c| c.len())],
    };
    let scoring = ScoringModel::from_artifact(&runtime, &artifact)?;
    let (scores, labels) = scoring.score(&table)?;
    Ok(keys
        .into_iter()
        .zip(scores.into_iter().zip(labels))
        .map(|(key, (score, label))| ScoredRow {
            key,
            // An imported graph wider than its labels names no label there.
            label: model.class_labels.get(label as usize).cloned(),
            score,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_waits_double_from_half_a_second_to_ten() {
        let mut backoff = Backoff::default();
        let waits: Vec<f64> = (0..7).map(|_| backoff.next_wait().as_secs_f64()).collect();
        assert_eq!(waits, vec![0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]);
        backoff.reset();
        assert_eq!(backoff.next_wait(), RECONNECT_FIRST);
    }

    #[test]
    fn only_errors_a_retry_can_mend_are_retried_at_start_up() {
        assert!(!DaemonError::AlreadyRunning.is_transient());
        assert!(DaemonError::Catalog(CatalogError::Lost("gone".into())).is_transient());
        assert!(!DaemonError::Catalog(CatalogError::Corrupt("bad row".into())).is_transient());
    }
}
