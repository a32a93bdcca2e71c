//! cerebrod: trains, exports and scores Cerebro models.
//!
//! [`run`] is the whole daemon: it takes the database's daemon lock, then
//! serves the control socket and runs the job loop (which first recovers
//! jobs a previous daemon left running) until `shutdown` turns true.

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
use crate::data::{copy_columns, ReadAs, UserRelation};
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

    let lock_timeout = config.lock_timeout;
    let Some((daemon_lock, lock_driver)) = catalog::lock_daemon(&config.database_url, lock_timeout).await? else {
        return Err(DaemonError::AlreadyRunning);
    };
    let worker_id = format!("cerebrod pid {} (session {})", std::process::id(), daemon_lock.backend_pid().await?);
    let wake = Arc::new(Notify::new());
    let (control, control_driver) = catalog::connect(&config.database_url, Some(wake.clone()), lock_timeout).await?;
    control.listen().await?;
    let (data, data_driver) = catalog::connect(&config.database_url, None, lock_timeout).await?;
    let data = Arc::new(data);

    let listener = server::bind(&config.socket_path, config.allowed_uid)?;
    info!(socket = %config.socket_path.display(), allowed_uid = config.allowed_uid, "listening");
    let service = Arc::new(server::ScoringService::new(runtime, data.clone(), config.model_cache_size));
    let server = tokio::spawn(server::serve(
        listener,
        service,
        config.allowed_uid,
        server::Limits { max_connections: config.max_connections, scoring_deadline: config.scoring_deadline },
        shutdown.clone(),
    ));
    let scheduler = scheduler::Scheduler {
        control,
        data,
        worker_id,
        poll_interval: config.poll_interval,
        lock_timeout,
        compute: Compute { device: config.device, threads: config.training_threads },
        stack_memory_bytes: config.stack_memory_bytes,
        model_memory_bytes: config.model_memory_bytes,
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
        // Without the lock's session another daemon could start and take
        // over the jobs this one is training.
        _ = lock_driver => Err(DaemonError::ConnectionLost),
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
    // Last: the lock is freed only once nothing of this daemon writes any more.
    drop(daemon_lock);
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
