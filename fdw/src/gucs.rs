//! Every setting of the extension.

use std::ffi::CString;

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

/// Rows sent to cerebrod in one scoring batch.
pub static BATCH_ROWS: GucSetting<i32> = GucSetting::<i32>::new(8192);
/// How long a backend waits for one answer from cerebrod, in milliseconds.
pub static SCORING_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(60_000);

/// Whether a backend scores `cerebro.predict`'s rows, and a by-key scan's,
/// with its own copy of a model Cerebro trained, once the copy answers as
/// cerebrod does.
pub static SCORE_IN_BACKEND: GucSetting<bool> = GucSetting::<bool>::new(true);

/// Most candidates one selection INSERT may queue.
pub static MAX_CANDIDATES: GucSetting<i32> = GucSetting::<i32>::new(100);

/// Largest model an INSERT may queue, in parameters.
pub static MAX_MODEL_PARAMETERS: GucSetting<i32> = GucSetting::<i32>::new(25_000_000);
/// Most memory training one model may be estimated to take, in MiB.
pub static MAX_MODEL_MEMORY_MB: GucSetting<i32> = GucSetting::<i32>::new(4096);
/// Most work one training job may be, in rows times epochs.
pub static MAX_TRAINING_WORK: GucSetting<f64> = GucSetting::<f64>::new(500_000_000.0);
/// Most training jobs one role may have queued or running.
pub static MAX_JOBS_PER_ROLE: GucSetting<i32> = GucSetting::<i32>::new(200);

/// Models that recommendations leave out, comma-separated: a model's name,
/// or `(built in) <task>` for an entry of the shipped portfolio.
pub static RECOMMEND_EXCLUDE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// [`RECOMMEND_EXCLUDE`] as names.
pub fn recommend_excluded() -> Vec<String> {
    RECOMMEND_EXCLUDE
        .get()
        .map(|names| {
            names.to_string_lossy().split(',').map(str::trim).filter(|n| !n.is_empty()).map(String::from).collect()
        })
        .unwrap_or_default()
}

/// Limits protect the server from its users: only a superuser (or
/// ALTER SYSTEM / ALTER DATABASE by one) changes them.
fn define_limits() {
    GucRegistry::define_int_guc(
        c"cerebro.max_model_parameters",
        c"Most parameters a model queued by INSERT may have.",
        c"Estimated at INSERT from the network, the feature columns and the classes.",
        &MAX_MODEL_PARAMETERS,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"cerebro.max_model_memory",
        c"Most memory training one model queued by INSERT may be estimated to take.",
        c"Parameters with gradients and optimiser state, and one minibatch's activations.",
        &MAX_MODEL_MEMORY_MB,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_MB,
    );
    GucRegistry::define_float_guc(
        c"cerebro.max_training_work",
        c"Most work one training job queued by INSERT may be, in rows times epochs.",
        c"Rows of the frozen snapshot with a target, times the epochs asked for.",
        &MAX_TRAINING_WORK,
        1.0,
        1e18,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"cerebro.max_jobs_per_role",
        c"Most training jobs one role may have queued or running at once.",
        c"An INSERT that would queue more is refused; cerebrod also takes roles' jobs in turn.",
        &MAX_JOBS_PER_ROLE,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::default(),
    );
}

pub fn init() {
    define_limits();
    GucRegistry::define_int_guc(
        c"cerebro.max_candidates",
        c"Most candidates one INSERT with a selection spec may queue.",
        c"A spec that expands to more is refused with the number it expands to.",
        &MAX_CANDIDATES,
        1,
        1_000_000,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"cerebro.batch_rows",
        c"Rows per scoring batch sent to cerebrod.",
        c"Larger batches amortise the round trip; smaller ones return first rows sooner.",
        &BATCH_ROWS,
        1,
        1_048_576,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"cerebro.scoring_timeout",
        c"How long to wait for cerebrod to answer one request.",
        c"A scoring query fails with SQLSTATE 57014 when cerebrod does not answer in time.",
        &SCORING_TIMEOUT_MS,
        100,
        i32::MAX,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_bool_guc(
        c"cerebro.score_in_backend",
        c"Whether cerebro.predict and by-key scans of cerebro.predictions score rows in the backend.",
        c"With the backend's own copy of the model, built once per backend and version and used only after it \
          scores the version's probe rows as cerebrod does; imported models and selection ensembles are always \
          scored by cerebrod.",
        &SCORE_IN_BACKEND,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"cerebro.recommend_exclude",
        c"Models that cerebro.recommend and spec = 'recommended' leave out, comma-separated.",
        c"A model's name, or '(built in) <task>' for an entry of the shipped portfolio: to keep a task's own \
          versions out of what is recommended for it (the leave-one-task-out benchmark does), or models that \
          should not seed others.",
        &RECOMMEND_EXCLUDE,
        GucContext::Userset,
        GucFlags::default(),
    );
}
