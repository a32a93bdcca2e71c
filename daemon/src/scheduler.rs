//! The job loop: claim a queued job, train it on a blocking thread, store the
//! artifact and results. Jobs are durable rows; this loop holds no state a
//! crash could lose.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cerebro_shared::batch::ColumnData;
use cerebro_shared::error::{ErrorCode, WireError};
use cerebro_shared::protocol::{DistillRequest, MeasureRequest};
use cerebro_shared::provenance::TrainedWith;
use cerebro_shared::spec::TrainingPlan;
use cerebro_shared::surrogate::DEFAULT_MAX_DEPTH;
use rayon::prelude::*;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinError;
use tracing::{debug, error, info, warn};

use crate::catalog::{Catalog, CatalogError, ClaimedJob, ImportToMeasure, JobSpec, SessionEnd, Stored, SweptTo};
use crate::data::{read_snapshot, Table};
use crate::engine::Compute;
use crate::ensemble::{self, Candidate};
use crate::features::FeaturePipeline;
use crate::guide::Guide;
use crate::onnx;
use crate::scoring::OnnxRuntime;
use crate::server::ScoringService;
use crate::snapshot_cache::{SnapshotCache, SnapshotKey};
use crate::train::{self, Control, EpochStats, TrainError, TrainedModel};
use crate::warm::ParentWeights;

/// Most candidates trained in one stack (activations of all of them stay in memory).
const MAX_STACK: i64 = 32;
/// After a lock kept one of a model's epochs out of the catalog, its records
/// are skipped for this long, so that a lock held for a long time costs one
/// `lock_timeout` per model now and then, not one per epoch.
const RECORD_PAUSE: Duration = Duration::from_secs(30);
/// How long a retry to close a selection (the sweep's) waits for a lock: the
/// first try, after the selection's last stack, waits the full lock_timeout.
const RETRY_LOCK_TIMEOUT: Duration = Duration::from_millis(100);
/// How long a stop waits for the epoch in training to end before it puts
/// the stack's jobs back in the queue anyway: well within the daemon's own
/// grace (`STOP_GRACE`), after which its connections are closed and the
/// jobs would be left `running`, their attempt counted by the next sweep.
const EPOCH_END_WAIT: Duration = Duration::from_secs(5);
/// Earlier sessions remembered to name why their jobs were left running.
/// The first sweep of the next session takes nearly all of them; the bound
/// only keeps a daemon that reconnects for months from growing.
const EARLIER_SESSIONS: usize = 64;

/// What one session of the job loop hands the next when the daemon's
/// session with the database ends and cerebrod reconnects.
#[derive(Default)]
pub struct Carry {
    /// A stack told to stop when the session ended, which stops at the end
    /// of its epoch: the next session trains nothing before it has, so
    /// that two stacks never hold the memory and cores one may take.
    unwinding: Option<tokio::task::JoinHandle<()>>,
    /// Worker ids of earlier sessions and why each ended: the sweep names
    /// that reason in the jobs they left running.
    earlier: Vec<(String, SessionEnd)>,
    /// Measuring the imports that committed with their rows (see
    /// `Scheduler::measure_imports`), while it runs.
    measuring: Option<tokio::task::JoinHandle<()>>,
    /// Imports whose measuring failed, and how many times it failed for a
    /// reason that may pass: those that failed for good, or too often, are
    /// not tried again until cerebrod restarts (`cerebro.measure_importance`
    /// says why on request).
    unmeasurable: Arc<std::sync::Mutex<Unmeasurable>>,
}

impl Carry {
    /// Records that the session working as `worker` ended, and how.
    pub fn session_ended(&mut self, worker: String, end: SessionEnd) {
        if self.earlier.len() >= EARLIER_SESSIONS {
            self.earlier.remove(0);
        }
        self.earlier.push((worker, end));
    }
}

pub struct Scheduler {
    /// Job state changes and progress.
    pub control: Catalog,
    /// COPY of snapshots, on its own connection so progress writes never wait on it.
    pub data: Arc<Catalog>,
    pub worker_id: String,
    /// When the server this session reaches started (a restart since an
    /// earlier session's end is what excuses its jobs' attempts).
    pub server_started: i64,
    pub poll_interval: Duration,
    /// The sessions' lock_timeout (`lock_timeout_ms`).
    pub lock_timeout: Duration,
    /// The device and CPU threads every job trains with.
    pub compute: Compute,
    /// Most memory one stack may take (`stack_memory_mib`).
    pub stack_memory_bytes: usize,
    /// Most memory one model may take (`model_memory_mib`).
    pub model_memory_bytes: usize,
    /// Most rows × epochs one job may be (`max_training_work`).
    pub max_training_work: u64,
    /// Scores a selection's candidates when it weighs them into an ensemble.
    pub runtime: OnnxRuntime,
    pub wake: Arc<Notify>,
    pub shutdown: watch::Receiver<bool>,
    /// Turns true when the daemon's session with the database ends (a
    /// connection, or the daemon lock's, is lost): the loop stops what it
    /// does, a stack in training included, and returns.
    pub lost: watch::Receiver<bool>,
    /// From the session before, and for the next.
    pub carry: Carry,
    /// Snapshots read, for the next stacks that read the same (`snapshot_cache_mib`).
    pub snapshots: Arc<SnapshotCache>,
    /// Measures imported versions as `cerebro.measure_importance` does.
    pub service: Arc<ScoringService>,
}

/// The outcome of a write that ends `job`, where a lock another transaction
/// held past lock_timeout is no failure: the job stays `running`, and the
/// sweep puts it back in the queue once the lock is released.
fn unless_locked(job: &ClaimedJob, written: Result<(), CatalogError>) -> Result<(), CatalogError> {
    match written {
        Err(e) if e.is_lock_timeout() => {
            warn!(
                job = job.job_id,
                "a transaction held a lock on the job's catalog rows past lock_timeout ({}); the job stays \
                 running and goes back to the queue once the lock is released",
                e.reason()
            );
            Ok(())
        }
        other => other,
    }
}

/// The error the loop returns when told its session ended.
fn session_lost() -> CatalogError {
    CatalogError::Lost("cerebrod's session with the database ended".into())
}

/// Measures the permutation importance of each model the stack trained and
/// distills its rule surrogate, on both cores at once, except for those
/// halving stopped at a rung: a selection stops most of its candidates so,
/// and they lost to better ones. A model whose measurement fails, even by
/// a panic, is stored without it (logged): it is an extra, and the trained
/// model must not be lost for it.
fn explain_models(
    models: &mut [Result<TrainedModel, TrainError>],
    plans: &[TrainingPlan],
    features: &[ColumnData],
    target: &ColumnData,
    guide: Option<&Guide>,
) {
    let started = Instant::now();
    models.par_iter_mut().zip(plans).enumerate().for_each(|(m, (model, plan))| {
        let Ok(model) = model else { return };
        if guide.is_some_and(|g| g.halved(m)) {
            return;
        }
        let explained = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if let Err(e) = model.measure_importance(plan, features, target) {
                warn!("cannot measure the importance of a model's columns: {e}");
            }
            if let Err(e) = model.distill(plan, features, target) {
                warn!("cannot distill a model's rule surrogate: {e}");
            }
        }));
        if explained.is_err() {
            error!("measuring a model's importance or surrogate panicked; it is stored without them");
            (model.importance, model.surrogate) = (None, None);
        }
    });
    info!(models = models.len(), seconds = started.elapsed().as_secs_f64(), "importance and surrogates measured");
}

/// Why an import was not measured: `Later` when the next pass may, as
/// when cerebrod is away from the database or a lock held the write up.
enum Unmeasured {
    Later(String),
    Never(String),
}

/// Most imports one pass looks at.
const IMPORTS_A_PASS: usize = 16;
/// Passes an import may fail for a reason that may pass before it is
/// given up on.
const MEASURE_TRIES: u32 = 5;

/// The imports whose measuring failed (see `Carry::unmeasurable`).
#[derive(Default)]
struct Unmeasurable(std::collections::HashMap<i64, u32>);

impl Unmeasurable {
    /// Counts a failure; whether the import is given up on now.
    fn failed(&mut self, id: i64, why: &Unmeasured) -> bool {
        let tries = self.0.entry(id).or_default();
        *tries = match why {
            Unmeasured::Never(_) => MEASURE_TRIES,
            Unmeasured::Later(_) => *tries + 1,
        };
        *tries >= MEASURE_TRIES
    }

    fn given_up(&self) -> Vec<i64> {
        self.0.iter().filter(|(_, &tries)| tries >= MEASURE_TRIES).map(|(&id, _)| id).collect()
    }
}

/// Measures one import on its frozen rows, distills it, and stores both,
/// unless someone measured it meanwhile.
async fn measure_import(data: &Catalog, service: &ScoringService, import: &ImportToMeasure) -> Result<(), Unmeasured> {
    let started = Instant::now();
    let request = MeasureRequest { model_version_id: import.id, artifact_sha256: import.artifact_sha256.clone() };
    let unmeasured = |e: WireError| match e.code {
        ErrorCode::Unavailable | ErrorCode::LockNotAvailable => Unmeasured::Later(e.message),
        _ => Unmeasured::Never(e.message),
    };
    let (importance, metrics) = service.measure_version(request).await.map_err(unmeasured)?;
    // Its rule surrogate too, as after training; without it if the graph
    // fails there (the importance still tells what it reads).
    let request = DistillRequest {
        model_version_id: import.id,
        artifact_sha256: import.artifact_sha256.clone(),
        max_depth: DEFAULT_MAX_DEPTH,
    };
    let surrogate = match service.distill_version(request).await.map_err(unmeasured) {
        Ok(surrogate) => Some(surrogate),
        Err(Unmeasured::Later(why)) => return Err(Unmeasured::Later(why)),
        Err(Unmeasured::Never(why)) => {
            warn!(model = %import.name, version = import.version, "cannot distill the imported version: {why}");
            None
        }
    };
    match data.store_import_measure(import, importance.as_ref(), &metrics, surrogate.as_ref()).await {
        Ok(true) => info!(
            model = %import.name,
            version = import.version,
            rows = importance.as_ref().map_or(0, |i| i.rows),
            seconds = started.elapsed().as_secs_f64(),
            "importance of the imported version measured once its import committed"
        ),
        Ok(false) => debug!(model = %import.name, version = import.version, "the import was measured meanwhile"),
        Err(e) => return Err(Unmeasured::Later(format!("cannot store what was measured: {}", e.reason()))),
    }
    Ok(())
}

/// The jobs of one stack, with what each asks for (`specs[i]` is
/// `jobs[i]`'s). A stage of `Scheduler::run_job` takes out the jobs it ends.
struct StackJobs {
    /// The job the stack was claimed for, which names the stack in log
    /// lines, still in it or not.
    first: i64,
    /// The first request read: the stack reads its snapshot and is sized by
    /// it (its models share one architecture), and its selection is the
    /// stack's.
    lead: JobSpec,
    jobs: Vec<ClaimedJob>,
    specs: Vec<JobSpec>,
}

/// What the training thread hands back: each model's result (or one error
/// for all), the snapshot's fingerprint, and the guide that steered it.
type TrainOutput = (Result<Vec<Result<TrainedModel, TrainError>>, TrainError>, String, Option<Guide>);

/// A stack training on a blocking thread, and what the job loop steers it by.
struct Training {
    task: tokio::task::JoinHandle<TrainOutput>,
    /// Each model's epochs, as they finish.
    progress: mpsc::UnboundedReceiver<(usize, EpochStats)>,
    /// Stops every model at the end of its epoch.
    stop: Arc<AtomicBool>,
    /// Candidates a user cancelled, by index: learnt as each records an epoch.
    cancelled: Arc<Vec<AtomicBool>>,
}

/// How training a stack ended.
enum Trained {
    /// Each model's result, to store or end one by one.
    Models(TrainedStack),
    /// Every job of the stack has ended: its selection may be finished.
    Ended,
    /// A shutdown stopped the stack, and its jobs went back to the queue.
    Requeued,
}

/// The models a stack trained, or why each did not train.
struct TrainedStack {
    results: Vec<Result<TrainedModel, TrainError>>,
    fingerprint: String,
    /// Per model, why its selection's guide stopped it before its own end.
    stopped: Vec<Option<String>>,
}

impl Scheduler {
    /// Runs until shutdown, or until the session ends (`lost`, or an error:
    /// the catalog lost, or refusing what the loop cannot work without);
    /// hands back what the next session needs.
    pub async fn run(mut self) -> (Carry, Result<(), CatalogError>) {
        let result = self.serve().await;
        (self.carry, result)
    }

    async fn serve(&mut self) -> Result<(), CatalogError> {
        if let Some(mut stack) = self.carry.unwinding.take() {
            if !stack.is_finished() {
                info!("waiting for the stack the lost session was training to stop at the end of its epoch");
            }
            let mut shutdown = self.shutdown.clone();
            let mut lost = self.lost.clone();
            let lost_again = tokio::select! {
                _ = &mut stack => false,
                _ = shutdown.changed() => return Ok(()),
                _ = lost.changed() => true,
            };
            if lost_again {
                // Handed on: the next session waits for it instead.
                self.carry.unwinding = Some(stack);
                return Err(session_lost());
            }
        }
        let mut selections_swept: Option<Instant> = None;
        loop {
            while !*self.shutdown.borrow() {
                if *self.lost.borrow() {
                    return Err(session_lost());
                }
                self.sweep_jobs(&[]).await?;
                self.measure_imports();
                if selections_swept.is_none_or(|t| t.elapsed() >= self.poll_interval) {
                    self.sweep_selections().await?;
                    selections_swept = Some(Instant::now());
                }
                let job = match self.control.claim_next_job(&self.worker_id).await {
                    Ok(Some(job)) => job,
                    Ok(None) => break,
                    Err(e) if e.is_lock_timeout() => {
                        warn!("claiming a job waited on a lock past lock_timeout ({}); trying again later", e.reason());
                        break;
                    }
                    Err(e) => return Err(e),
                };
                match self.run_job(job.clone()).await {
                    // Any other write of the stack a lock held up: the
                    // stack's jobs stay running, and the sweep requeues them.
                    Err(e) if e.is_lock_timeout() => warn!(
                        job = job.job_id,
                        "a transaction held a lock the job needed past lock_timeout ({}); its stack stays \
                         running and goes back to the queue once the lock is released",
                        e.reason()
                    ),
                    other => other?,
                }
            }
            if *self.shutdown.borrow() {
                return Ok(());
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.poll_interval) => {}
                _ = self.shutdown.changed() => {}
                _ = self.lost.changed() => return Err(session_lost()),
            }
        }
    }

    /// Measures, beside the job loop, the imported versions whose rows
    /// were frozen with their import and that nobody has measured yet: their
    /// importance and metrics, as `cerebro.measure_importance` would, stored
    /// by cerebrod (the import's own transaction cannot ask: cerebrod sees
    /// its rows only once it commits, and the import's NOTIFY wakes this
    /// loop then). Beside, not in it: a graph may take up to
    /// `scoring_deadline_ms` a run, and training waits for none of it.
    fn measure_imports(&mut self) {
        if self.carry.measuring.as_ref().is_some_and(|m| !m.is_finished()) {
            return;
        }
        let (data, service) = (self.data.clone(), self.service.clone());
        let (unmeasurable, wake) = (self.carry.unmeasurable.clone(), self.wake.clone());
        self.carry.measuring = Some(tokio::spawn(async move {
            let skip = unmeasurable.lock().unwrap_or_else(|e| e.into_inner()).given_up();
            let pending = match data.imports_to_measure(&skip, IMPORTS_A_PASS).await {
                Ok(pending) => pending,
                Err(e) => return debug!("cannot look for imports to measure: {}; next pass", e.reason()),
            };
            let mut measured = 0;
            for import in &pending {
                let failed = match measure_import(&data, &service, import).await {
                    Ok(()) => {
                        measured += 1;
                        continue;
                    }
                    Err(failed) => failed,
                };
                let given_up = unmeasurable.lock().unwrap_or_else(|e| e.into_inner()).failed(import.id, &failed);
                let why = match &failed {
                    Unmeasured::Later(why) | Unmeasured::Never(why) => why,
                };
                if given_up {
                    warn!(
                        model = %import.name,
                        version = import.version,
                        "cannot measure the imported version: {why}; not tried again until cerebrod restarts \
                         (cerebro.measure_importance tries on request)"
                    );
                } else {
                    debug!(model = %import.name, version = import.version, "{why}; a later pass tries again");
                }
            }
            // More may wait than one look returns.
            if measured > 0 || pending.len() == IMPORTS_A_PASS {
                wake.notify_one();
            }
        }));
    }

    /// Requeues, fails or cancels the jobs left `running` but for those of
    /// `training` (see `Catalog::sweep_jobs`); never waits on a lock.
    async fn sweep_jobs(&mut self, training: &[i64]) -> Result<(), CatalogError> {
        let swept =
            match self.control.sweep_jobs(&self.worker_id, training, &self.carry.earlier, self.server_started).await {
                Ok(swept) => swept,
                Err(e) if e.is_lock_timeout() => {
                    debug!("the sweep waited on a lock past lock_timeout ({}); next pass", e.reason());
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
        for s in swept {
            let why = s.left_by.describe();
            match s.to {
                SweptTo::Queued => warn!(job = s.job_id, "job was left running {why}; requeued"),
                SweptTo::Failed => warn!(job = s.job_id, "job was left running {why} too many times; marked failed"),
                SweptTo::Cancelled => info!(job = s.job_id, "job was left running {why}; cancelled, as asked"),
            }
        }
        Ok(())
    }

    /// Closes selections that nothing is left to train for but are still
    /// open (their closing was held up by a lock, or their candidates were
    /// all cancelled). Each try waits only briefly: a lock held for long
    /// costs this loop little, and the next pass tries again.
    async fn sweep_selections(&mut self) -> Result<(), CatalogError> {
        let ids = match self.control.unfinished_selections().await {
            Ok(ids) => ids,
            Err(e) if e.is_lock_timeout() || e.is_refusal() => {
                debug!("cannot list unfinished selections: {}", e.reason());
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let wait = self.lock_timeout.min(RETRY_LOCK_TIMEOUT);
        for id in ids {
            match self.control.finish_selection(id, Some(wait)).await {
                Ok(Some(version)) => {
                    info!(selection = id, version, "selection finished; its best candidate is deployed")
                }
                Ok(None) => info!(selection = id, "selection finished"),
                Err(e) if e.is_lock_timeout() || e.is_refusal() => {
                    debug!(selection = id, "cannot finish the selection yet: {}", e.reason())
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Records an epoch of `job`, unless a lock kept one of its epochs out
    /// less than RECORD_PAUSE ago (`paused_until`); true when a user asked to
    /// cancel it. A lock held past lock_timeout skips the record with a
    /// warning: training goes on.
    async fn record_epoch(
        &mut self,
        job: &ClaimedJob,
        stats: &EpochStats,
        paused_until: &mut Option<Instant>,
    ) -> Result<bool, CatalogError> {
        if paused_until.is_some_and(|t| Instant::now() < t) {
            debug!(job = job.job_id, epoch = stats.epoch, "epoch not recorded: the job's catalog rows were locked");
            return Ok(false);
        }
        match self.control.record_epoch(job.model_version_id, stats).await {
            Err(e) if e.is_lock_timeout() => {
                warn!(
                    job = job.job_id,
                    epoch = stats.epoch,
                    "a transaction held a lock on the job's catalog rows past lock_timeout ({}); epochs are not \
                     recorded for {}s, training goes on",
                    e.reason(),
                    RECORD_PAUSE.as_secs()
                );
                *paused_until = Some(Instant::now() + RECORD_PAUSE);
                Ok(false)
            }
            other => other,
        }
    }

    /// Trains `first`, with the queued candidates of its selection that can
    /// share its stack: one read of the data, one pass per epoch for all.
    /// Each stage ends the jobs it cannot take further; a stage that leaves
    /// none has ended them all, and their selection may be finished.
    async fn run_job(&mut self, first: ClaimedJob) -> Result<(), CatalogError> {
        let claimed = self.claim_stack(&first).await?;
        let Some(mut stack) = self.read_requests(&first, claimed).await? else { return Ok(()) };
        let selection = stack.lead.selection;
        if stack.lead.ensemble.is_some() {
            self.build_ensemble(&stack).await?;
            return self.finish_selection(selection).await;
        }
        // A spent budget ends the stack before its data is read: reading a
        // large snapshot takes seconds, and every stack still queued when the
        // budget runs out would read it for nothing.
        let early = self.selection_guide(&stack).await?;
        if !self.keep_within_budget(&stack, early.as_ref()).await? {
            return self.finish_selection(selection).await;
        }
        let Some(table) = self.read_training_data(&stack).await? else {
            return self.finish_selection(selection).await;
        };
        if !self.keep_within_work_bound(&mut stack, &table).await? {
            return self.finish_selection(selection).await;
        }
        if !self.fit_memory(&mut stack, &table).await? {
            return self.finish_selection(selection).await;
        }
        let guide = self.selection_guide(&stack).await?;
        if !self.keep_within_budget(&stack, guide.as_ref()).await? {
            return self.finish_selection(selection).await;
        }
        let parents = self.warm_starts(&stack).await?;
        let training = self.start_training(&stack, table, parents, guide);
        let (finished, refused) = self.watch_training(&stack, training).await?;
        let trained = match self.training_outcome(&stack, finished, refused).await? {
            Trained::Models(trained) => trained,
            Trained::Ended => return self.finish_selection(selection).await,
            Trained::Requeued => return Ok(()),
        };
        self.store_models(&stack, trained).await?;
        self.finish_selection(selection).await
    }

    /// `first`, with the queued candidates of its selection that can share
    /// its stack; alone when a lock holds them up.
    async fn claim_stack(&mut self, first: &ClaimedJob) -> Result<Vec<ClaimedJob>, CatalogError> {
        let mut claimed = vec![first.clone()];
        match self.control.claim_companions(first, &self.worker_id, MAX_STACK - 1).await {
            Ok(more) => claimed.extend(more),
            Err(e) if e.is_lock_timeout() => {
                warn!(job = first.job_id, "claiming its companions waited on a lock ({}); it trains alone", e.reason())
            }
            Err(e) => return Err(e),
        }
        Ok(claimed)
    }

    /// What each of `claimed` asks for; a job whose request is gone or
    /// unreadable fails. None when no job is left.
    async fn read_requests(
        &mut self,
        first: &ClaimedJob,
        claimed: Vec<ClaimedJob>,
    ) -> Result<Option<StackJobs>, CatalogError> {
        let mut jobs = Vec::with_capacity(claimed.len());
        let mut specs = Vec::with_capacity(claimed.len());
        for job in claimed {
            match self.control.job_spec(job.model_version_id).await {
                Ok(spec) => {
                    jobs.push(job);
                    specs.push(spec);
                }
                Err(e @ (CatalogError::Corrupt(_) | CatalogError::NotFound(_))) => {
                    let msg = format!("cannot read the training request: {e}");
                    warn!(job = job.job_id, "{msg}");
                    let ended = self.control.finish_failure(&job, &msg).await;
                    unless_locked(&job, ended)?;
                }
                Err(e) => return Err(e),
            }
        }
        let Some(lead) = specs.first().cloned() else { return Ok(None) };
        for (job, s) in jobs.iter().zip(&specs) {
            info!(job = job.job_id, model = %s.name, version = s.version, attempt = job.attempt, stack = jobs.len(), "training");
        }
        Ok(Some(StackJobs { first: first.job_id, lead, jobs, specs }))
    }

    /// The stack's snapshot, read once for all its models. None when the
    /// server refused the read (the jobs failed).
    async fn read_training_data(&mut self, stack: &StackJobs) -> Result<Option<Arc<Table>>, CatalogError> {
        let key = SnapshotKey::of(&stack.lead);
        if let Some((table, bytes)) = self.snapshots.get(&key) {
            let cache = self.snapshots.stats();
            info!(
                job = stack.first,
                snapshot = stack.lead.snapshot_id,
                bytes,
                hits = cache.hits,
                misses = cache.misses,
                cached = cache.bytes,
                "snapshot read from cerebrod's cache"
            );
            if let Some(selection) = stack.lead.selection {
                match self.control.count_cache_hit(selection, bytes as i64).await {
                    Err(e) if e.is_lock_timeout() => {
                        warn!(selection, "not counted in the selection's cache hits: {}", e.reason())
                    }
                    counted => counted?,
                }
            }
            return Ok(Some(table));
        }
        match read_snapshot(self.data.client(), &stack.lead).await {
            Ok(t) => {
                let table = Arc::new(t);
                if self.snapshots.insert(key, table.clone()) {
                    let cache = self.snapshots.stats();
                    debug!(
                        snapshot = stack.lead.snapshot_id,
                        entries = cache.entries,
                        cached = cache.bytes,
                        "snapshot kept"
                    );
                }
                Ok(Some(table))
            }
            Err(e) if e.is_refusal() => {
                // The server refused the read (snapshot dropped, type changed):
                // retrying cannot help.
                let msg = format!("cannot read the training snapshot {}: {}", stack.lead.data_relation, e.reason());
                self.fail_all(&stack.jobs, &msg).await?;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Fails, saying so, each job beyond the daemon's own bound on work;
    /// false when none is left.
    async fn keep_within_work_bound(&mut self, stack: &mut StackJobs, table: &Table) -> Result<bool, CatalogError> {
        let rows = table.columns.first().map_or(0, |c| c.len() as u64);
        let (jobs, specs) = (std::mem::take(&mut stack.jobs), std::mem::take(&mut stack.specs));
        let (mut within, mut within_specs) = (Vec::with_capacity(jobs.len()), Vec::with_capacity(specs.len()));
        for (job, s) in jobs.into_iter().zip(specs) {
            let epochs = s.plan.options.epochs;
            let work = cerebro_shared::limits::training_work(rows, epochs);
            if work > self.max_training_work {
                let msg = format!(
                    "this job's work is {rows} rows × {epochs} epochs = {work}, more than cerebrod's \
                     max_training_work ({}); ask for fewer epochs or train on fewer rows",
                    self.max_training_work
                );
                warn!(job = job.job_id, "{msg}");
                let ended = self.control.finish_failure(&job, &msg).await;
                unless_locked(&job, ended)?;
            } else {
                within.push(job);
                within_specs.push(s);
            }
        }
        (stack.jobs, stack.specs) = (within, within_specs);
        Ok(!stack.jobs.is_empty())
    }

    /// A model too big for the daemon fails, saying so (false: the whole
    /// stack failed); fewer candidates share the stack when all of them
    /// would not fit in the memory budget, and the others go back to the
    /// queue. (A stack's models share one architecture, so one size fits all.)
    async fn fit_memory(&mut self, stack: &mut StackJobs, table: &Table) -> Result<bool, CatalogError> {
        let features = &table.columns[..table.columns.len() - 1];
        let per_model = train::model_bytes(&stack.lead.plan, features).ok();
        if let Some(needed) = per_model.filter(|&b| b > self.model_memory_bytes) {
            let msg = format!(
                "training this model needs about {} MiB, more than cerebrod's model_memory_mib ({} MiB); use \
                 fewer or narrower layers, smaller embeddings or a smaller batch_size",
                needed >> 20,
                self.model_memory_bytes >> 20
            );
            warn!(job = stack.first, "{msg}");
            self.fail_all(&stack.jobs, &msg).await?;
            return Ok(false);
        }
        if stack.jobs.len() > 1 {
            if let Some(per_model) = per_model {
                let fit = (self.stack_memory_bytes / per_model.max(1)).max(1);
                if stack.jobs.len() > fit {
                    info!(
                        job = stack.first,
                        claimed = stack.jobs.len(),
                        fit,
                        per_model_mib = per_model >> 20,
                        "stack limited by stack_memory_mib"
                    );
                    for job in stack.jobs.drain(fit..) {
                        let requeued = self.control.requeue(&job).await;
                        unless_locked(&job, requeued)?;
                    }
                    stack.specs.truncate(fit);
                }
            }
        }
        Ok(true)
    }

    /// What steers a selection's stack between epochs (None for a model
    /// outside a selection), from where the selection stands now.
    async fn selection_guide(&mut self, stack: &StackJobs) -> Result<Option<Guide>, CatalogError> {
        let Some(id) = stack.lead.selection else { return Ok(None) };
        let ids: Vec<i64> = stack.jobs.iter().map(|j| j.model_version_id).collect();
        let state = self.control.selection_state(id, &ids).await?;
        Ok(Some(Guide::new(state, stack.jobs.len(), Instant::now())))
    }

    /// Cancels the stack's jobs, saying why, when their selection's budget
    /// is spent before they start; false when it was.
    async fn keep_within_budget(&mut self, stack: &StackJobs, guide: Option<&Guide>) -> Result<bool, CatalogError> {
        let Some(why) = guide.and_then(|g| g.exhausted(Instant::now())) else { return Ok(true) };
        for job in &stack.jobs {
            let ended = self.control.finish_cancelled(job, Some(&why)).await;
            unless_locked(job, ended)?;
        }
        info!(job = stack.first, stack = stack.jobs.len(), "{why}");
        Ok(false)
    }

    /// Each model's parent weights to start from, in stack order (None: a
    /// cold start).
    async fn warm_starts(&self, stack: &StackJobs) -> Result<Vec<Option<ParentWeights>>, CatalogError> {
        let mut parents = Vec::with_capacity(stack.specs.len());
        for s in &stack.specs {
            parents.push(match s.parent_version {
                Some(v) => self.parent_weights(s, v).await?,
                None => None,
            });
        }
        Ok(parents)
    }

    /// Starts training the stack on a blocking thread, which reports each
    /// epoch and is told after it which models go on.
    fn start_training(
        &self,
        stack: &StackJobs,
        table: Arc<Table>,
        parents: Vec<Option<ParentWeights>>,
        mut guide: Option<Guide>,
    ) -> Training {
        let stop = Arc::new(AtomicBool::new(false));
        let cancelled: Arc<Vec<AtomicBool>> = Arc::new(stack.jobs.iter().map(|_| AtomicBool::new(false)).collect());
        let (progress_tx, progress) = mpsc::unbounded_channel();
        let plans: Vec<_> = stack.specs.iter().map(|s| s.plan.clone()).collect();
        let stop_flag = stop.clone();
        let cancel_flags = cancelled.clone();
        let compute = self.compute;
        let deadline = guide.as_ref().and_then(Guide::deadline);
        let (cache, read) = (self.snapshots.clone(), SnapshotKey::of(&stack.lead));
        let task = tokio::task::spawn_blocking(move || {
            let (columns, target) = table.columns.split_at(table.columns.len() - 1);
            let target = &target[0];
            let warm: Vec<Option<&ParentWeights>> = parents.iter().map(Option::as_ref).collect();
            let reuse = Some(train::Reuse { cache: &cache, read: &read });
            let mut result = train::train_group_warm(
                &plans,
                &warm,
                columns,
                target,
                compute,
                deadline,
                reuse,
                &mut |reports, controls| {
                    for (m, stats) in reports {
                        let _ = progress_tx.send((*m, stats.clone()));
                        controls[*m] = if stop_flag.load(Ordering::Relaxed) {
                            Control::Stop
                        } else if cancel_flags[*m].load(Ordering::Relaxed) {
                            Control::Drop
                        } else {
                            Control::Continue
                        };
                    }
                    if let Some(guide) = guide.as_mut() {
                        guide.steer(reports, controls, Instant::now());
                    }
                },
            );
            if let (Ok(models), Some(guide)) = (&result, guide.as_mut()) {
                guide.note_interrupted(models);
            }
            if let Ok(models) = result.as_mut() {
                explain_models(models, &plans, columns, target, guide.as_ref());
            }
            (result, table.fingerprint.clone(), guide)
        });
        Training { task, progress, stop, cancelled }
    }

    /// Records the stack's epochs while it trains, sweeping meanwhile, and
    /// tells it to stop on shutdown; returns how its thread ended and a
    /// write the catalog refused, if one did (it stopped the stack then).
    /// When the session ends under it, its jobs stay `running` for the next
    /// session's sweep.
    async fn watch_training(
        &mut self,
        stack: &StackJobs,
        training: Training,
    ) -> Result<(Result<TrainOutput, JoinError>, Option<CatalogError>), CatalogError> {
        let Training { task: mut training, progress: mut progress_rx, stop, cancelled } = training;
        let jobs = &stack.jobs;
        let mut shutdown = self.shutdown.clone();
        // A write the catalog refuses stops training and fails the jobs.
        let mut refused: Option<CatalogError> = None;
        // Per model: until when its epochs go unrecorded (a lock held them up).
        let mut paused: Vec<Option<Instant>> = vec![None; jobs.len()];
        // Jobs left running by earlier stacks go back to the queue while this
        // one trains, not only after it.
        let stack_ids: Vec<i64> = jobs.iter().map(|j| j.job_id).collect();
        let mut sweep = tokio::time::interval_at(tokio::time::Instant::now() + self.poll_interval, self.poll_interval);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut lost = self.lost.clone();
        // The stack's thread, left to end its epoch alone after a stop.
        let mut abandoned = false;
        let outcome = loop {
            tokio::select! {
                done = &mut training => break Ok(done),
                Some((m, stats)) = progress_rx.recv() => {
                    if refused.is_none() {
                        match self.record_epoch(&jobs[m], &stats, &mut paused[m]).await {
                            Err(e) if e.is_refusal() => {
                                stop.store(true, Ordering::Relaxed);
                                refused = Some(e);
                            }
                            Err(e) => break Err(e),
                            Ok(cancel) => {
                                if cancel {
                                    cancelled[m].store(true, Ordering::Relaxed);
                                }
                            }
                        }
                    }
                }
                _ = sweep.tick() => {
                    if let Err(e) = self.sweep_jobs(&stack_ids).await {
                        debug!("sweep during training: {e}");
                    }
                    // An import that commits while a stack trains is measured
                    // now, not once the stack ends.
                    self.measure_imports();
                }
                _ = shutdown.changed() => {
                    stop.store(true, Ordering::Relaxed);
                    match tokio::time::timeout(EPOCH_END_WAIT, &mut training).await {
                        Ok(done) => break Ok(done),
                        Err(_) => {
                            // An epoch longer than the wait: the jobs go back
                            // to the queue now, their attempt not counted,
                            // while cerebrod can still write it.
                            warn!(
                                job = stack.first,
                                "the epoch in training did not end within {} s of the stop; requeueing its jobs now",
                                EPOCH_END_WAIT.as_secs()
                            );
                            abandoned = true;
                            break Ok(Ok((Err(TrainError::Stopped), String::new(), None)));
                        }
                    }
                }
                _ = lost.changed() => break Err(session_lost()),
            }
        };
        let outcome = match outcome {
            Ok(done) if abandoned => {
                self.carry.unwinding = Some(tokio::spawn(async move {
                    let _ = training.await;
                }));
                return Ok((done, refused));
            }
            Ok(done) => done,
            Err(e) => {
                // The session ended under the stack (or cannot record it):
                // its jobs stay `running`, and the next session's sweep puts
                // them back in the queue. The stack stops at the end of its
                // epoch; the next session waits for that before it trains.
                stop.store(true, Ordering::Relaxed);
                warn!(job = stack.first, stack = jobs.len(), "training stopped: {e}");
                self.carry.unwinding = Some(tokio::spawn(async move {
                    let _ = training.await;
                }));
                return Err(e);
            }
        };
        while let Ok((m, stats)) = progress_rx.try_recv() {
            if refused.is_none() {
                if let Err(e) = self.record_epoch(&jobs[m], &stats, &mut paused[m]).await {
                    if !e.is_refusal() {
                        return Err(e);
                    }
                    refused = Some(e);
                }
            }
        }
        Ok((outcome, refused))
    }

    /// Ends the stack's jobs when training ended for all of them at once (a
    /// refused write, a crash, a shutdown, bad data); else each model's
    /// result.
    async fn training_outcome(
        &mut self,
        stack: &StackJobs,
        finished: Result<TrainOutput, JoinError>,
        refused: Option<CatalogError>,
    ) -> Result<Trained, CatalogError> {
        if let Some(e) = refused {
            let reason = e.reason();
            for job in &stack.jobs {
                self.fail_refused(job, &reason).await?;
            }
            return Ok(Trained::Ended);
        }
        let (result, fingerprint, guide) = match finished {
            Ok(r) => r,
            Err(join) => {
                let msg = format!("training crashed: {join}");
                error!(job = stack.first, "{msg}");
                self.fail_all(&stack.jobs, &msg).await?;
                return Ok(Trained::Ended);
            }
        };
        let results = match result {
            Ok(results) => results,
            Err(TrainError::Stopped) => {
                warn!(job = stack.first, stack = stack.jobs.len(), "training stopped by shutdown; jobs requeued");
                for job in &stack.jobs {
                    let requeued = self.control.requeue(job).await;
                    unless_locked(job, requeued)?;
                }
                return Ok(Trained::Requeued);
            }
            Err(e) => {
                warn!(job = stack.first, "training failed: {e}");
                self.fail_all(&stack.jobs, &e.to_string()).await?;
                return Ok(Trained::Ended);
            }
        };
        let stopped = guide.map(|g| g.stopped).unwrap_or_default();
        Ok(Trained::Models(TrainedStack { results, fingerprint, stopped }))
    }

    /// Ends each job of the stack by its model's result: stored and ready,
    /// cancelled, or failed.
    async fn store_models(&mut self, stack: &StackJobs, trained: TrainedStack) -> Result<(), CatalogError> {
        let TrainedStack { results, fingerprint, stopped } = trained;
        for (m, ((job, spec), result)) in stack.jobs.iter().zip(&stack.specs).zip(results).enumerate() {
            let model = match result {
                Ok(model) => model,
                Err(TrainError::Cancelled) => {
                    info!(job = job.job_id, model = %spec.name, version = spec.version, "cancelled");
                    let ended = self.control.finish_cancelled(job, None).await;
                    unless_locked(job, ended)?;
                    continue;
                }
                Err(e) => {
                    warn!(job = job.job_id, "training failed: {e}");
                    let ended = self.control.finish_failure(job, &e.to_string()).await;
                    unless_locked(job, ended)?;
                    continue;
                }
            };
            let why_stopped = stopped.get(m).cloned().flatten();
            self.store_model(job, spec, &model, stack.jobs.len(), why_stopped, &fingerprint).await?;
        }
        Ok(())
    }

    /// Exports `model` to ONNX and stores it with its results and
    /// provenance, in one transaction that makes its version ready; an
    /// export or a write the catalog refuses fails the job instead.
    async fn store_model(
        &mut self,
        job: &ClaimedJob,
        spec: &JobSpec,
        model: &TrainedModel,
        stack_size: usize,
        stopped: Option<String>,
        fingerprint: &str,
    ) -> Result<(), CatalogError> {
        let meta = [
            ("cerebro.model", spec.name.clone()),
            ("cerebro.version", spec.version.to_string()),
            ("cerebro.target", spec.plan.target.clone()),
            ("cerebro.snapshot_fingerprint", fingerprint.to_string()),
            ("cerebro.device", model.device.clone()),
        ];
        match onnx::export(model, &meta) {
            Ok(bytes) => {
                let with = TrainedWith { stopped, ..model.trained_with(stack_size) };
                let stored = Stored::model(model, &with, &bytes);
                let stored = self.control.finish_success(job, spec.snapshot_id, &stored, fingerprint).await;
                match stored {
                    Ok(()) => {
                        info!(job = job.job_id, model = %spec.name, version = spec.version, device = %model.device, metrics = ?model.metrics, "ready")
                    }
                    Err(e) if e.is_refusal() => self.fail_refused(job, &e.reason()).await?,
                    other => unless_locked(job, other)?,
                }
            }
            Err(e) => {
                let ended = self.control.finish_failure(job, &format!("ONNX export failed: {e}")).await;
                unless_locked(job, ended)?;
            }
        }
        Ok(())
    }

    /// Weighs a selection's best candidates into its ensemble (the stack's
    /// one job, which claims no companions) and stores it as its version:
    /// each member scored by ONNX Runtime on the candidates' validation
    /// rows, read again from their snapshot. A member gone or not ready, or
    /// any other failure, fails the job with the reason.
    async fn build_ensemble(&mut self, stack: &StackJobs) -> Result<(), CatalogError> {
        let (job, spec) = (&stack.jobs[0], &stack.specs[0]);
        let Some(members) = self.ensemble_members(job, spec).await? else { return Ok(()) };
        let Some(table) = self.read_training_data(stack).await? else { return Ok(()) };
        let meta = [
            ("cerebro.model", spec.name.clone()),
            ("cerebro.version", spec.version.to_string()),
            ("cerebro.target", spec.plan.target.clone()),
            ("cerebro.snapshot_fingerprint", table.fingerprint.clone()),
        ];
        let (runtime, plan) = (self.runtime.clone(), spec.plan.clone());
        let weighing = tokio::task::spawn_blocking(move || {
            let meta: Vec<(&str, String)> = meta.iter().map(|(k, v)| (*k, v.clone())).collect();
            (ensemble::build(&runtime, &plan, &table.columns, &members, &meta), table.fingerprint.clone())
        });
        let (built, fingerprint) = match weighing.await {
            Ok(done) => done,
            Err(join) => {
                let msg = format!("building the ensemble crashed: {join}");
                error!(job = job.job_id, "{msg}");
                return self.fail_all(&stack.jobs, &msg).await;
            }
        };
        let built = match built {
            Ok(b) => b,
            Err(e) => {
                let msg = format!("cannot build the ensemble: {e}");
                warn!(job = job.job_id, "{msg}");
                let ended = self.control.finish_failure(job, &msg).await;
                return unless_locked(job, ended);
            }
        };
        let with = built.trained_with();
        let stored = Stored {
            onnx: &built.onnx,
            metrics: &built.metrics,
            pipeline: None,
            weights_sha256: built.weights_sha256.clone(),
            trained_with: &with,
            importance: built.importance.as_ref(),
            surrogate: built.surrogate.as_ref(),
            epochs_run: None,
        };
        match self.control.finish_success(job, spec.snapshot_id, &stored, &fingerprint).await {
            Ok(()) => info!(
                job = job.job_id,
                model = %spec.name,
                version = spec.version,
                members = ?built.ensemble.members,
                rows_valid = built.rows_valid,
                metrics = ?built.metrics,
                "ensemble ready"
            ),
            Err(e) if e.is_refusal() => self.fail_refused(job, &e.reason()).await?,
            other => unless_locked(job, other)?,
        }
        Ok(())
    }

    /// The ensemble's pool as its request names it, each with its ONNX
    /// file; None (the job failed, saying why) when one is gone, not ready
    /// or learnt from other data than the ensemble's.
    async fn ensemble_members(
        &mut self,
        job: &ClaimedJob,
        spec: &JobSpec,
    ) -> Result<Option<Vec<Candidate>>, CatalogError> {
        let pool = spec.ensemble.as_ref().map(|e| e.pool.clone()).unwrap_or_default();
        let mut found = self.control.ensemble_candidates(&spec.name, &pool).await?;
        let features = serde_json::to_value(&spec.plan.features).expect("features serialise");
        let problem = pool.iter().find_map(|&version| match found.iter().find(|c| c.version == version) {
            None => Some(format!("member version {version} was deleted")),
            Some(c) if c.status != "ready" => Some(format!("member version {version} is {}, not ready", c.status)),
            Some(c) if c.snapshot_id != spec.snapshot_id || c.features != features => {
                Some(format!("member version {version} learnt from other data than the ensemble's request"))
            }
            Some(c) if c.artifact.is_none() => Some(format!("member version {version} has no ONNX file")),
            Some(_) => None,
        });
        if let Some(why) = problem {
            let msg = format!("cannot build the ensemble: {why}");
            warn!(job = job.job_id, "{msg}");
            let ended = self.control.finish_failure(job, &msg).await;
            unless_locked(job, ended)?;
            return Ok(None);
        }
        Ok(Some(
            found
                .drain(..)
                .filter_map(|c| c.artifact.map(|artifact| Candidate { version: c.version, artifact }))
                .collect(),
        ))
    }

    /// The weights `spec`'s parent `version` left, to start from (an
    /// ensemble's: its best candidate's); None (and a cold start, logged)
    /// when they are gone or unreadable.
    async fn parent_weights(&self, spec: &JobSpec, version: i32) -> Result<Option<ParentWeights>, CatalogError> {
        let Some((from, onnx, pipeline)) = self.control.parent_weights(&spec.name, version).await? else {
            warn!(model = %spec.name, version = spec.version, parent = version, "the parent's weights are gone; training from scratch");
            return Ok(None);
        };
        if from != version {
            info!(model = %spec.name, version = spec.version, parent = version, member = from, "the parent is an ensemble: starting from its best candidate");
        }
        let version = from;
        let pipeline: FeaturePipeline = match serde_json::from_value(pipeline) {
            Ok(p) => p,
            Err(e) => {
                warn!(model = %spec.name, parent = version, "the parent's pipeline is unreadable ({e}); training from scratch");
                return Ok(None);
            }
        };
        match ParentWeights::from_onnx(version, &onnx, pipeline) {
            Ok(w) => Ok(Some(w)),
            Err(e) => {
                warn!(model = %spec.name, parent = version, "the parent's ONNX file is unreadable ({e}); training from scratch");
                Ok(None)
            }
        }
    }

    /// Lets the catalog close the selection when its last candidate is done,
    /// promoting its winner if the spec asked to. When a lock or a refusal
    /// keeps it open, the sweep tries again on later passes.
    async fn finish_selection(&mut self, selection: Option<i64>) -> Result<(), CatalogError> {
        let Some(id) = selection else { return Ok(()) };
        match self.control.finish_selection(id, None).await {
            Ok(Some(version)) => info!(selection = id, version, "selection finished; its best candidate is deployed"),
            Ok(None) => {}
            Err(e) if e.is_lock_timeout() => warn!(
                selection = id,
                "a transaction held a lock that closing the selection needs (its model's deployment?) past \
                 lock_timeout ({}); tried again on later passes",
                e.reason()
            ),
            Err(e) if e.is_refusal() => warn!(selection = id, "cannot finish the selection: {}", e.reason()),
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Fails each of `jobs` with `msg`.
    async fn fail_all(&mut self, jobs: &[ClaimedJob], msg: &str) -> Result<(), CatalogError> {
        for job in jobs {
            let ended = self.control.finish_failure(job, msg).await;
            unless_locked(job, ended)?;
        }
        Ok(())
    }

    /// Fails `job` because the catalog refused one of its writes; the daemon
    /// carries on with the next job.
    async fn fail_refused(&mut self, job: &ClaimedJob, reason: &str) -> Result<(), CatalogError> {
        let msg = format!("the catalog refused cerebrod's write: {reason}; check the daemon role's privileges");
        error!(job = job.job_id, "{msg}");
        let ended = self.control.finish_failure(job, &msg).await;
        unless_locked(job, ended)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_import_is_given_up_on_at_once_for_good_reasons_and_after_some_tries_for_passing_ones() {
        let mut failures = Unmeasurable::default();
        assert!(failures.failed(1, &Unmeasured::Never("the graph gave 2 values".into())));
        for _ in 1..MEASURE_TRIES {
            assert!(!failures.failed(2, &Unmeasured::Later("a lock held the write".into())));
        }
        assert_eq!(failures.given_up(), [1]);
        assert!(failures.failed(2, &Unmeasured::Later("a lock held the write".into())));
        let mut given_up = failures.given_up();
        given_up.sort_unstable();
        assert_eq!(given_up, [1, 2]);
    }
}
