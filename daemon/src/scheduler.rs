//! The job loop: claim a queued job, train it on a blocking thread, store the
//! artifact and results. Jobs are durable rows; this loop holds no state a
//! crash could lose.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Notify};
use tracing::{error, info, warn};

use crate::catalog::{Catalog, CatalogError, ClaimedJob, JobSpec};
use crate::data::read_snapshot;
use crate::engine::Compute;
use crate::features::FeaturePipeline;
use crate::guide::Guide;
use crate::onnx;
use crate::train::{self, Control, TrainError};
use crate::warm::ParentWeights;

/// Most candidates trained in one stack (activations of all of them stay in memory).
const MAX_STACK: i64 = 32;

pub struct Scheduler {
    /// Job state changes and progress.
    pub control: Catalog,
    /// COPY of snapshots, on its own connection so progress writes never wait on it.
    pub data: Arc<Catalog>,
    pub worker_id: String,
    pub poll_interval: Duration,
    /// The device and CPU threads every job trains with.
    pub compute: Compute,
    /// Most memory one stack may take (`stack_memory_mib`).
    pub stack_memory_bytes: usize,
    pub wake: Arc<Notify>,
    pub shutdown: watch::Receiver<bool>,
}

impl Scheduler {
    /// Runs until shutdown; returns an error only when the catalog is lost.
    pub async fn run(mut self) -> Result<(), CatalogError> {
        loop {
            while !*self.shutdown.borrow() {
                let Some(job) = self.control.claim_next_job(&self.worker_id).await? else { break };
                self.run_job(job).await?;
            }
            if *self.shutdown.borrow() {
                return Ok(());
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.poll_interval) => {}
                _ = self.shutdown.changed() => {}
            }
        }
    }

    /// Trains `first`, with the queued candidates of its selection that can
    /// share its stack: one read of the data, one pass per epoch for all.
    async fn run_job(&mut self, first: ClaimedJob) -> Result<(), CatalogError> {
        let mut jobs = vec![first.clone()];
        jobs.extend(self.control.claim_companions(&first, &self.worker_id, MAX_STACK - 1).await?);
        let mut specs = Vec::with_capacity(jobs.len());
        for job in &jobs {
            specs.push(self.control.job_spec(job.model_version_id).await?);
        }
        let spec = specs[0].clone();
        for (job, s) in jobs.iter().zip(&specs) {
            info!(job = job.job_id, model = %s.name, version = s.version, attempt = job.attempt, stack = jobs.len(), "training");
        }
        let table = match read_snapshot(self.data.client(), &spec).await {
            Ok(t) => t,
            Err(CatalogError::Db(e)) if e.as_db_error().is_some() => {
                // The server refused the read (snapshot dropped, type changed):
                // retrying cannot help.
                let msg = format!("cannot read the training snapshot {}: {e}", spec.data_relation);
                for job in &jobs {
                    self.control.finish_failure(job, &msg).await?;
                }
                return Ok(());
            }
            Err(e) => return Err(e),
        };

        // Fewer candidates share the stack when all of them would not fit
        // in the memory budget; the others go back to the queue.
        if jobs.len() > 1 {
            let features = &table.columns[..table.columns.len() - 1];
            if let Ok(per_model) = train::model_bytes(&spec.plan, features) {
                let fit = (self.stack_memory_bytes / per_model.max(1)).max(1);
                if jobs.len() > fit {
                    info!(
                        job = first.job_id,
                        claimed = jobs.len(),
                        fit,
                        per_model_mib = per_model >> 20,
                        "stack limited by stack_memory_mib"
                    );
                    for job in jobs.drain(fit..) {
                        self.control.requeue(&job).await?;
                    }
                    specs.truncate(fit);
                }
            }
        }
        let selection = spec.selection;
        let mut guide = match selection {
            Some(id) => {
                let ids: Vec<i64> = jobs.iter().map(|j| j.model_version_id).collect();
                let state = self.control.selection_state(id, &ids).await?;
                Some(Guide::new(state, jobs.len(), Instant::now()))
            }
            None => None,
        };
        if let Some(why) = guide.as_ref().and_then(|g| g.exhausted(Instant::now())) {
            for job in &jobs {
                self.control.finish_cancelled(job, Some(&why)).await?;
            }
            info!(job = first.job_id, stack = jobs.len(), "{why}");
            return self.finish_selection(selection).await;
        }

        let mut parents = Vec::with_capacity(specs.len());
        for s in &specs {
            parents.push(match s.parent_version {
                Some(v) => self.parent_weights(s, v).await?,
                None => None,
            });
        }

        let stop = Arc::new(AtomicBool::new(false));
        // Candidates a user cancelled, by index: learnt as each records an epoch.
        let cancelled: Arc<Vec<AtomicBool>> = Arc::new(jobs.iter().map(|_| AtomicBool::new(false)).collect());
        let (progress_tx, mut progress_rx) = mpsc::unbounded_channel();
        let plans: Vec<_> = specs.iter().map(|s| s.plan.clone()).collect();
        let stop_flag = stop.clone();
        let cancel_flags = cancelled.clone();
        let compute = self.compute;
        let mut training = tokio::task::spawn_blocking(move || {
            let mut columns = table.columns;
            let target = columns.pop().expect("the target column is read last");
            let warm: Vec<Option<&ParentWeights>> = parents.iter().map(Option::as_ref).collect();
            let result =
                train::train_group_warm(&plans, &warm, &columns, &target, compute, &mut |reports, controls| {
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
                });
            (result, table.fingerprint, guide)
        });

        let mut shutdown = self.shutdown.clone();
        // A write the catalog refuses stops training and fails the jobs.
        let mut refused: Option<CatalogError> = None;
        let outcome = loop {
            tokio::select! {
                done = &mut training => break done,
                Some((m, stats)) = progress_rx.recv() => {
                    if refused.is_none() {
                        match self.control.record_epoch(jobs[m].model_version_id, &stats).await {
                            Err(e) if e.is_refusal() => {
                                stop.store(true, Ordering::Relaxed);
                                refused = Some(e);
                            }
                            Err(e) => return Err(e),
                            Ok(cancel) => {
                                if cancel {
                                    cancelled[m].store(true, Ordering::Relaxed);
                                }
                            }
                        }
                    }
                }
                _ = shutdown.changed() => stop.store(true, Ordering::Relaxed),
            }
        };
        while let Ok((m, stats)) = progress_rx.try_recv() {
            if refused.is_none() {
                if let Err(e) = self.control.record_epoch(jobs[m].model_version_id, &stats).await {
                    if !e.is_refusal() {
                        return Err(e);
                    }
                    refused = Some(e);
                }
            }
        }
        if let Some(e) = refused {
            let reason = e.reason();
            for job in &jobs {
                self.fail_refused(job, &reason).await?;
            }
            return Ok(());
        }

        let (result, fingerprint, guide) = match outcome {
            Ok(r) => r,
            Err(join) => {
                let msg = format!("training crashed: {join}");
                error!(job = first.job_id, "{msg}");
                for job in &jobs {
                    self.control.finish_failure(job, &msg).await?;
                }
                return self.finish_selection(selection).await;
            }
        };
        let results = match result {
            Ok(results) => results,
            Err(TrainError::Stopped) => {
                warn!(job = first.job_id, stack = jobs.len(), "training stopped by shutdown; jobs requeued");
                for job in &jobs {
                    self.control.requeue(job).await?;
                }
                return Ok(());
            }
            Err(e) => {
                warn!(job = first.job_id, "training failed: {e}");
                for job in &jobs {
                    self.control.finish_failure(job, &e.to_string()).await?;
                }
                return self.finish_selection(selection).await;
            }
        };
        let stopped = guide.map(|g| g.stopped).unwrap_or_default();
        for (m, ((job, spec), result)) in jobs.iter().zip(&specs).zip(results).enumerate() {
            let model = match result {
                Ok(model) => model,
                Err(TrainError::Cancelled) => {
                    info!(job = job.job_id, model = %spec.name, version = spec.version, "cancelled");
                    self.control.finish_cancelled(job, None).await?;
                    continue;
                }
                Err(e) => {
                    warn!(job = job.job_id, "training failed: {e}");
                    self.control.finish_failure(job, &e.to_string()).await?;
                    continue;
                }
            };
            let meta = [
                ("cerebro.model", spec.name.clone()),
                ("cerebro.version", spec.version.to_string()),
                ("cerebro.target", spec.plan.target.clone()),
                ("cerebro.snapshot_fingerprint", fingerprint.clone()),
                ("cerebro.device", model.device.clone()),
            ];
            match onnx::export(&model, &meta) {
                Ok(bytes) => {
                    let mut with = model.trained_with(jobs.len());
                    if let Some(why) = stopped.get(m).cloned().flatten() {
                        with["stopped"] = why.into();
                    }
                    let stored =
                        self.control.finish_success(job, spec.snapshot_id, &model, &with, &bytes, &fingerprint).await;
                    match stored {
                        Err(e) if e.is_refusal() => self.fail_refused(job, &e.reason()).await?,
                        other => other?,
                    }
                    info!(job = job.job_id, model = %spec.name, version = spec.version, device = %model.device, metrics = ?model.metrics, "ready");
                }
                Err(e) => {
                    self.control.finish_failure(job, &format!("ONNX export failed: {e}")).await?;
                }
            }
        }
        self.finish_selection(selection).await
    }

    /// The weights `spec`'s parent `version` left, to start from; None (and
    /// a cold start, logged) when they are gone or unreadable.
    async fn parent_weights(&self, spec: &JobSpec, version: i32) -> Result<Option<ParentWeights>, CatalogError> {
        let Some((onnx, pipeline)) = self.control.parent_weights(&spec.name, version).await? else {
            warn!(model = %spec.name, version = spec.version, parent = version, "the parent's weights are gone; training from scratch");
            return Ok(None);
        };
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
    /// promoting its winner if the spec asked to.
    async fn finish_selection(&mut self, selection: Option<i64>) -> Result<(), CatalogError> {
        let Some(id) = selection else { return Ok(()) };
        match self.control.finish_selection(id).await {
            Ok(Some(version)) => info!(selection = id, version, "selection finished; its best candidate is deployed"),
            Ok(None) => {}
            Err(e) if e.is_refusal() => warn!(selection = id, "cannot finish the selection: {}", e.reason()),
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Fails `job` because the catalog refused one of its writes; the daemon
    /// carries on with the next job.
    async fn fail_refused(&mut self, job: &ClaimedJob, reason: &str) -> Result<(), CatalogError> {
        let msg = format!("the catalog refused cerebrod's write: {reason}; check the daemon role's privileges");
        error!(job = job.job_id, "{msg}");
        self.control.finish_failure(job, &msg).await
    }
}
