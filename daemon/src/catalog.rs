//! The daemon's access to the catalog (schema `cerebro`) over tokio-postgres.

use std::collections::BTreeMap;
use std::sync::Arc;

use cerebro_shared::mst::SelectionPlan;
use cerebro_shared::spec::{Feature, Task, TrainOptions, TrainingPlan};
use futures_util::{stream, StreamExt};
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, Client, NoTls};
use tracing::{debug, warn};

use crate::train::{EpochStats, TrainedModel};

/// Session-level advisory lock held by the one daemon serving a database.
const DAEMON_LOCK_KEY: i64 = 0x0C3E_B20D;
/// Channel the extension notifies (at commit) when it queues a job.
pub const JOBS_CHANNEL: &str = "cerebro_jobs";

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("database error: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("catalog row is not as expected: {0}")]
    Corrupt(String),
    #[error("{0}")]
    NotFound(String),
}

pub type Result<T> = std::result::Result<T, CatalogError>;

impl CatalogError {
    /// The server refused a statement (a privilege, a constraint) while the
    /// connection stayed up: the job at hand fails, the daemon goes on.
    pub fn is_refusal(&self) -> bool {
        matches!(self, CatalogError::Db(e) if e.as_db_error().is_some())
    }

    /// The server's own message when it refused a statement, else the error.
    pub fn reason(&self) -> String {
        match self {
            CatalogError::Db(e) => e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_string()),
            other => other.to_string(),
        }
    }
}

/// Opens a connection whose driver task runs in the background. When
/// `notify` is given, NOTIFY messages on the connection wake it. The returned
/// handle finishes when the connection is lost.
pub async fn connect(url: &str, notify: Option<Arc<Notify>>) -> Result<(Catalog, tokio::task::JoinHandle<()>)> {
    let (client, mut connection) = tokio_postgres::connect(url, NoTls).await?;
    let driver = tokio::spawn(async move {
        let mut messages = stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    debug!(channel = n.channel(), payload = n.payload(), "notification");
                    if let Some(notify) = &notify {
                        notify.notify_one();
                    }
                }
                Ok(AsyncMessage::Notice(n)) => debug!("server notice: {}", n.message()),
                Ok(_) => {}
                Err(e) => {
                    warn!("database connection lost: {e}");
                    break;
                }
            }
        }
    });
    Ok((Catalog { client }, driver))
}

pub struct Catalog {
    client: Client,
}

/// Options each model of a stack may set on its own (train::train_group).
const PER_MODEL_OPTIONS: [&str; 8] =
    ["learning_rate", "weight_decay", "epochs", "patience", "momentum", "schedule", "warmup_epochs", "clip_norm"];

/// A version's ONNX file and how to feed it.
pub struct Artifact {
    pub sha256: String,
    pub bytes: Vec<u8>,
    /// Set for imported models; Cerebro's own exports need none.
    pub import_layout: Option<cerebro_shared::onnx_graph::ImportLayout>,
    pub task: cerebro_shared::spec::Task,
}

impl Artifact {
    /// A scoring session for it.
    pub fn load(
        &self,
        rt: &crate::scoring::OnnxRuntime,
    ) -> std::result::Result<crate::scoring::ScoringModel, crate::scoring::ScoringError> {
        match &self.import_layout {
            Some(layout) => crate::scoring::ScoringModel::load_imported(rt, &self.bytes, layout, self.task),
            None => crate::scoring::ScoringModel::load(rt, &self.bytes),
        }
    }
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
    /// The source's key column, if the model has one: the snapshot is read
    /// in its order.
    pub key_column: Option<String>,
    /// The model selection the version is a candidate of.
    pub selection: Option<i64>,
    /// The version it derives from (a warm start).
    pub parent_version: Option<i32>,
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

/// What recovery did with a job a dead daemon left running.
#[derive(Debug, Clone, PartialEq)]
pub struct Recovered {
    pub job_id: i64,
    pub requeued: bool,
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

    /// Takes the daemon lock; false when another daemon holds it.
    pub async fn try_lock_daemon(&self) -> Result<bool> {
        let row = self.client.query_one("SELECT pg_try_advisory_lock($1)", &[&DAEMON_LOCK_KEY]).await?;
        Ok(row.get(0))
    }

    pub async fn listen(&self) -> Result<()> {
        self.client.batch_execute(&format!("LISTEN {JOBS_CHANNEL}")).await?;
        Ok(())
    }

    /// Requeues jobs left `running` by a daemon that died, or fails those that
    /// used up their attempts. Only safe while holding the daemon lock.
    pub async fn recover_stale_jobs(&mut self) -> Result<Vec<Recovered>> {
        let tx = self.client.transaction().await?;
        let rows = tx
            .query(
                "UPDATE cerebro.jobs SET
                     state = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'queued' END::cerebro.job_state,
                     finished_at = CASE WHEN attempts >= max_attempts THEN now() END,
                     error = CASE WHEN attempts >= max_attempts
                         THEN format('cerebrod stopped during training %s times; giving up', attempts)
                         ELSE format('cerebrod stopped during attempt %s; the job was requeued', attempts) END
                 WHERE state = 'running'
                 RETURNING id, model_version_id, state = 'queued', error",
                &[],
            )
            .await?;
        let mut recovered = Vec::with_capacity(rows.len());
        for row in rows {
            let (job_id, mv, requeued, error): (i64, i64, bool, String) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            tx.execute(
                "UPDATE cerebro.model_versions SET
                     status = CASE WHEN $2 THEN 'queued' ELSE 'failed' END::cerebro.model_status,
                     error = CASE WHEN $2 THEN NULL ELSE $3 END,
                     epoch = 0
                 WHERE id = $1",
                &[&mv, &requeued, &error],
            )
            .await?;
            recovered.push(Recovered { job_id, requeued });
        }
        tx.commit().await?;
        Ok(recovered)
    }

    /// Claims the oldest queued job, marking it and its model as training.
    pub async fn claim_next_job(&mut self, worker: &str) -> Result<Option<ClaimedJob>> {
        let tx = self.client.transaction().await?;
        let row = tx
            .query_opt(
                "UPDATE cerebro.jobs j SET state = 'running', attempts = attempts + 1,
                        claimed_by = $1, claimed_at = now(), error = NULL
                 FROM (SELECT id FROM cerebro.jobs WHERE state = 'queued'
                       ORDER BY id FOR UPDATE SKIP LOCKED LIMIT 1) next
                 WHERE j.id = next.id
                 RETURNING j.id, j.model_version_id, j.attempts",
                &[&worker],
            )
            .await?;
        let Some(row) = row else {
            tx.commit().await?;
            return Ok(None);
        };
        let job = ClaimedJob { job_id: row.get(0), model_version_id: row.get(1), attempt: row.get(2) };
        tx.execute(
            "UPDATE cerebro.model_versions SET status = 'training', started_at = now(), epoch = 0, error = NULL
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
        let rows = tx
            .query(
                "UPDATE cerebro.jobs j SET state = 'running', attempts = attempts + 1,
                        claimed_by = $2, claimed_at = now(), error = NULL
                 FROM (SELECT j2.id FROM cerebro.jobs j2
                       JOIN cerebro.model_versions m2 ON m2.id = j2.model_version_id
                       JOIN cerebro.model_versions m ON m.id = $1
                       WHERE j2.state = 'queued' AND m.selection_id IS NOT NULL
                         AND m2.selection_id = m.selection_id AND m2.snapshot_id = m.snapshot_id
                         AND m2.target_column = m.target_column AND m2.task = m.task
                         AND m2.features = m.features AND m2.class_labels = m.class_labels
                         AND m2.options - $3::text[] = m.options - $3::text[]
                       ORDER BY j2.id FOR UPDATE OF j2 SKIP LOCKED LIMIT $4) next
                 WHERE j.id = next.id
                 RETURNING j.id, j.model_version_id, j.attempts",
                &[&job.model_version_id, &worker, &&PER_MODEL_OPTIONS[..], &limit],
            )
            .await?;
        let jobs: Vec<ClaimedJob> = rows
            .iter()
            .map(|r| ClaimedJob { job_id: r.get(0), model_version_id: r.get(1), attempt: r.get(2) })
            .collect();
        let ids: Vec<i64> = jobs.iter().map(|j| j.model_version_id).collect();
        tx.execute(
            "UPDATE cerebro.model_versions SET status = 'training', started_at = now(), epoch = 0, error = NULL
             WHERE id = ANY($1)",
            &[&ids],
        )
        .await?;
        tx.execute("DELETE FROM cerebro.training_history WHERE model_version_id = ANY($1)", &[&ids]).await?;
        tx.commit().await?;
        Ok(jobs)
    }

    pub async fn job_spec(&self, model_version_id: i64) -> Result<JobSpec> {
        let row = self
            .client
            .query_one(
                "SELECT m.name, m.version, m.task, m.target_column, m.features, m.class_labels, m.options,
                        s.data_relation, s.id, m.key_column, m.selection_id, m.parent_version
                 FROM cerebro.model_versions m JOIN cerebro.snapshots s ON s.id = m.snapshot_id
                 WHERE m.id = $1",
                &[&model_version_id],
            )
            .await?;
        let corrupt = |what: &str, e: serde_json::Error| CatalogError::Corrupt(format!("{what}: {e}"));
        let task: Task =
            serde_json::from_value(serde_json::Value::String(row.get(2))).map_err(|e| corrupt("task", e))?;
        let features: Vec<Feature> = serde_json::from_value(row.get(4)).map_err(|e| corrupt("features", e))?;
        let options: TrainOptions = serde_json::from_value(row.get(6)).map_err(|e| corrupt("options", e))?;
        Ok(JobSpec {
            name: row.get(0),
            version: row.get(1),
            plan: TrainingPlan { task, target: row.get(3), features, class_labels: row.get(5), options },
            data_relation: row.get(7),
            snapshot_id: row.get(8),
            key_column: row.get(9),
            selection: row.get(10),
            parent_version: row.get(11),
        })
    }

    /// The ONNX file and feature pipeline of `name`'s `version`, if it still
    /// has them (a deleted version has neither).
    pub async fn parent_weights(&self, name: &str, version: i32) -> Result<Option<(Vec<u8>, serde_json::Value)>> {
        let row = self
            .client
            .query_opt(
                "SELECT a.bytes, p.pipeline FROM cerebro.model_versions p
                 JOIN cerebro.artifacts a ON a.model_version_id = p.id
                 WHERE p.name = $1 AND p.version = $2 AND p.pipeline IS NOT NULL",
                &[&name, &version],
            )
            .await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    /// The plan and progress of `selection`, leaving out the versions in
    /// `stack` (about to train).
    pub async fn selection_state(&self, selection: i64, stack: &[i64]) -> Result<SelectionState> {
        let row = self
            .client
            .query_one(
                "SELECT s.plan, extract(epoch FROM clock_timestamp() - s.created_at)::float8,
                        (SELECT coalesce(sum(m.epoch), 0)::bigint FROM cerebro.model_versions m
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
                "SELECT r.epoch, (SELECT min(h.valid_loss) FROM cerebro.training_history h
                                  WHERE h.model_version_id = m.id AND h.epoch <= r.epoch)
                 FROM cerebro.model_versions m, unnest($2::int[]) AS r(epoch)
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
    pub async fn finish_selection(&self, selection: i64) -> Result<Option<i32>> {
        let row = self.client.query_one("SELECT cerebro.finish_selection($1)", &[&selection]).await?;
        Ok(row.get(0))
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
                             seconds = EXCLUDED.seconds, recorded_at = now())
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
        model: &TrainedModel,
        trained_with: &serde_json::Value,
        onnx: &[u8],
        fingerprint: &str,
    ) -> Result<()> {
        let sha256 = crate::data::sha256_hex(onnx);
        let sha256 = sha256.as_str();
        let metrics = serde_json::to_value(&model.metrics).expect("metrics serialise");
        let pipeline = serde_json::to_value(&model.pipeline).expect("pipeline serialises");
        let tx = self.client.transaction().await?;
        tx.execute(
            "INSERT INTO cerebro.artifacts (model_version_id, sha256, size_bytes, bytes) VALUES ($1, $2, $3, $4)
             ON CONFLICT (model_version_id) DO UPDATE
                 SET sha256 = EXCLUDED.sha256, size_bytes = EXCLUDED.size_bytes, bytes = EXCLUDED.bytes,
                     created_at = now()",
            &[&job.model_version_id, &sha256, &(onnx.len() as i64), &onnx],
        )
        .await?;
        tx.execute(
            "UPDATE cerebro.model_versions SET status = 'ready', metrics = $2, pipeline = $3,
                    artifact_sha256 = $4, trained_at = now(), error = NULL,
                    epoch = (SELECT coalesce(max(epoch), 0) FROM cerebro.training_history WHERE model_version_id = $1),
                    weights_sha256 = $5, trained_with = $6, artifact_bytes = $7
             WHERE id = $1",
            &[
                &job.model_version_id,
                &metrics,
                &pipeline,
                &sha256,
                &model.weights_sha256(),
                trained_with,
                &(onnx.len() as i64),
            ],
        )
        .await?;
        tx.execute("UPDATE cerebro.snapshots SET fingerprint = $2 WHERE id = $1", &[&snapshot_id, &fingerprint])
            .await?;
        tx.execute("UPDATE cerebro.jobs SET state = 'done', finished_at = now() WHERE id = $1", &[&job.job_id]).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Marks job and model failed with `error`, which users read in
    /// `cerebro.models.error`.
    pub async fn finish_failure(&mut self, job: &ClaimedJob, error: &str) -> Result<()> {
        self.end_job(job, "failed", Some(error)).await
    }

    /// Ends a job whose cancellation was asked for (or whose selection's
    /// budget ran out: `reason`); its model is 'cancelled'.
    pub async fn finish_cancelled(&mut self, job: &ClaimedJob, reason: Option<&str>) -> Result<()> {
        self.end_job(job, "cancelled", reason).await
    }

    /// Ends job and model in `outcome` ('failed' or 'cancelled', a value of
    /// both `job_state` and `model_status`) with `error`, at once.
    async fn end_job(&mut self, job: &ClaimedJob, outcome: &str, error: Option<&str>) -> Result<()> {
        let tx = self.client.transaction().await?;
        tx.execute(
            "UPDATE cerebro.jobs SET state = $3::text::cerebro.job_state, finished_at = now(), error = $2
             WHERE id = $1",
            &[&job.job_id, &error, &outcome],
        )
        .await?;
        tx.execute(
            "UPDATE cerebro.model_versions SET status = $3::text::cerebro.model_status, error = $2 WHERE id = $1",
            &[&job.model_version_id, &error, &outcome],
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

    /// The ONNX bytes of a ready model version and their sha256.
    pub async fn artifact(&self, model_version_id: i64) -> Result<Option<Artifact>> {
        let row = self
            .client
            .query_opt(
                "SELECT a.sha256, a.bytes, m.import_layout, m.task
                 FROM cerebro.artifacts a JOIN cerebro.model_versions m ON m.id = a.model_version_id
                 WHERE a.model_version_id = $1",
                &[&model_version_id],
            )
            .await?;
        row.map(|r| {
            let layout: Option<serde_json::Value> = r.get(2);
            let task: String = r.get(3);
            Ok(Artifact {
                sha256: r.get(0),
                bytes: r.get(1),
                import_layout: layout
                    .map(serde_json::from_value)
                    .transpose()
                    .map_err(|e| CatalogError::Corrupt(format!("import_layout: {e}")))?,
                task: match task.parse() {
                    Ok(cerebro_shared::spec::TaskChoice::Fixed(t)) => t,
                    _ => return Err(CatalogError::Corrupt(format!("unknown task {task}"))),
                },
            })
        })
        .transpose()
    }

    /// The newest ready version of `name`, or the given version.
    pub async fn find_model(&self, name: &str, version: Option<i32>) -> Result<ModelRef> {
        let row = self
            .client
            .query_opt(
                "SELECT id, name, version, features, class_labels, source_relation, key_column, artifact_sha256
                 FROM cerebro.model_versions
                 WHERE name = $1 AND status = 'ready' AND ($2::int IS NULL OR version = $2)
                 ORDER BY version DESC LIMIT 1",
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
