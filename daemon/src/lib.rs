//! cerebrod: trains, exports and scores Cerebro models.
//!
//! [`run`] is the whole daemon: it takes the database's daemon lock, recovers
//! jobs a previous daemon left running, then serves the control socket and
//! runs the job loop until `shutdown` turns true.

pub mod catalog;
pub mod config;
pub mod data;
pub mod engine;
pub mod features;
pub mod gpu;
pub mod guide;
pub mod metrics;
pub mod onnx;
pub mod scheduler;
pub mod scoring;
pub mod server;
pub mod train;
pub mod warm;

use std::sync::Arc;

use cerebro_shared::batch::{ColumnData, NO_LABEL};
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use crate::catalog::CatalogError;
use crate::config::Config;
use crate::data::{copy_columns, ReadAs};
use crate::engine::{Compute, DeviceChoice};
use crate::scoring::{OnnxRuntime, ScoringError};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Scoring(#[from] ScoringError),
    #[error(transparent)]
    Server(#[from] server::ServerError),
    #[error("another cerebrod already serves this database (it holds the daemon lock)")]
    AlreadyRunning,
    #[error("the connection to the database was lost")]
    ConnectionLost,
}

/// Runs the daemon until `shutdown` becomes true or the database is lost.
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
    let runtime = OnnxRuntime::load(&config.onnxruntime_library, config.scoring_threads)?;

    let wake = Arc::new(Notify::new());
    let (mut control, control_driver) = catalog::connect(&config.database_url, Some(wake.clone())).await?;
    if !control.try_lock_daemon().await? {
        return Err(DaemonError::AlreadyRunning);
    }
    for r in control.recover_stale_jobs().await? {
        if r.requeued {
            warn!(job = r.job_id, "job was left running by a stopped daemon; requeued");
        } else {
            warn!(job = r.job_id, "job was left running too many times; marked failed");
        }
    }
    control.listen().await?;
    let (data, data_driver) = catalog::connect(&config.database_url, None).await?;
    let data = Arc::new(data);

    let listener = server::bind(&config.socket_path)?;
    info!(socket = %config.socket_path.display(), allowed_uid = config.allowed_uid, "listening");
    let service = Arc::new(server::ScoringService::new(runtime, data.clone(), config.model_cache_size));
    let server =
        tokio::spawn(server::serve(listener, service, config.allowed_uid, config.max_connections, shutdown.clone()));
    let scheduler = scheduler::Scheduler {
        control,
        data,
        worker_id: format!("cerebrod pid {}", std::process::id()),
        poll_interval: config.poll_interval,
        compute: Compute { device: config.device, threads: config.training_threads },
        stack_memory_bytes: config.stack_memory_bytes,
        wake,
        shutdown: shutdown.clone(),
    };
    let mut jobs = tokio::spawn(scheduler.run());

    let result = tokio::select! {
        biased;
        _ = shutdown.changed() => Ok(()),
        done = &mut jobs => match done {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(DaemonError::ConnectionLost),
        },
        _ = control_driver => Err(DaemonError::ConnectionLost),
        _ = data_driver => Err(DaemonError::ConnectionLost),
    };
    // Once a stop was asked for, tasks winding down close their connections:
    // that is the stop, not a lost database.
    let result = if *shutdown.borrow() { Ok(()) } else { result };
    // Give an in-flight job the chance to requeue itself before we go.
    if !jobs.is_finished() {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), jobs).await;
    }
    server.abort();
    let _ = std::fs::remove_file(&config.socket_path);
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
    let runtime = OnnxRuntime::load(&config.onnxruntime_library, config.scoring_threads)?;
    let (catalog, _driver) = catalog::connect(&config.database_url, None).await?;
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
    let relation: String = match source {
        Some(s) => catalog
            .client()
            .query_one("SELECT $1::text::regclass::text", &[&s])
            .await
            .map_err(CatalogError::from)?
            .get(0),
        None => model.source_relation.clone(),
    };
    let key = key_column.map(str::to_owned).or(model.key_column.clone());
    let mut columns: Vec<(String, ReadAs)> =
        model.features.iter().map(|f| (f.name.clone(), ReadAs::for_feature(f.kind))).collect();
    if let Some(k) = &key {
        columns.push((k.clone(), ReadAs::Text));
    }
    let mut table = copy_columns(catalog.client(), &relation, &columns, None).await?.columns;
    let keys = match key {
        Some(_) => match table.pop() {
            Some(ColumnData::Text(k)) => k,
            _ => unreachable!("the key is read last, as text"),
        },
        None => vec![None; table.first().map_or(0, |c| c.len())],
    };
    let scoring = artifact.load(&runtime)?;
    let (scores, labels) = scoring.score(&table)?;
    Ok(keys
        .into_iter()
        .zip(scores.into_iter().zip(labels))
        .map(|(key, (score, label))| ScoredRow {
            key,
            label: (label != NO_LABEL).then(|| model.class_labels[label as usize].clone()),
            score,
        })
        .collect())
}
