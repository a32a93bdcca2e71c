//! The server's limits on what one INSERT may queue (docs/operations.md):
//! the estimates are shared/src/limits.rs's, the limits are settings only a
//! superuser changes, and each refusal names its setting.

use cerebro_shared::limits::{model_size, training_work, InputKind};
use cerebro_shared::spec::{Feature, FeatureKind, Task, TrainOptions};
use pgrx::spi::SpiClient;

use crate::error::{CerebroError, Result};
use crate::gucs;

/// `1234567` as `1,234,567`.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Refuses a version whose model or work is beyond the limits.
pub fn check_model(options: &TrainOptions, features: &[Feature], task: Task, classes: usize, rows: u64) -> Result<()> {
    let columns: Vec<(&str, InputKind)> = features
        .iter()
        .map(|f| {
            let kind = match f.kind {
                FeatureKind::Numeric => InputKind::Numeric,
                FeatureKind::Categorical => InputKind::Categorical,
            };
            (f.name.as_str(), kind)
        })
        .collect();
    let outputs = if task == Task::Multiclass { classes as u64 } else { 1 };
    let size = model_size(options, &columns, outputs);
    let max_parameters = gucs::MAX_MODEL_PARAMETERS.get().max(1) as u64;
    if size.parameters > max_parameters {
        return Err(CerebroError::LimitExceeded {
            what: "this model's parameter count".into(),
            value: format!("about {}", grouped(size.parameters)),
            setting: "cerebro.max_model_parameters",
            limit: grouped(max_parameters),
            smaller: "Use fewer or narrower hidden layers, or fewer categories (max_categories)",
        });
    }
    let mib = |bytes: u64| bytes.div_ceil(1 << 20);
    let max_memory_mb = gucs::MAX_MODEL_MEMORY_MB.get().max(1) as u64;
    if mib(size.training_bytes) > max_memory_mb {
        return Err(CerebroError::LimitExceeded {
            what: "the memory training this model takes".into(),
            value: format!("about {} MB", grouped(mib(size.training_bytes))),
            setting: "cerebro.max_model_memory",
            limit: format!("{} MB", grouped(max_memory_mb)),
            smaller: "Use a smaller network or batch_size",
        });
    }
    let work = training_work(rows, options.epochs);
    let max_work = gucs::MAX_TRAINING_WORK.get();
    if work as f64 > max_work {
        return Err(CerebroError::LimitExceeded {
            what: "this job's work".into(),
            value: format!("{} rows × {} epochs = {}", grouped(rows), options.epochs, grouped(work)),
            setting: "cerebro.max_training_work",
            limit: grouped(max_work as u64),
            smaller: "Ask for fewer epochs, or train on fewer rows",
        });
    }
    Ok(())
}

/// Refuses one more job for `role` when it has as many queued or training
/// as it may. Run with the extension owner's rights (it counts every job).
pub fn check_role_share(client: &SpiClient<'_>, role: &str) -> Result<()> {
    let active = client
        .select(
            "SELECT count(*) FROM cerebro.jobs j JOIN cerebro.model_versions v ON v.id = j.model_version_id
             WHERE j.state IN ('queued', 'running') AND v.created_by = $1",
            Some(1),
            &[role.into()],
        )?
        .first()
        .get_one::<i64>()?
        .unwrap_or(0) as u64;
    let limit = gucs::MAX_JOBS_PER_ROLE.get().max(1) as u64;
    if active >= limit {
        return Err(CerebroError::LimitExceeded {
            what: format!("the number of training jobs role \"{role}\" has queued or running"),
            value: format!("{active} with this one", active = active + 1),
            setting: "cerebro.max_jobs_per_role",
            limit: grouped(limit),
            smaller: "Wait for some to finish or cancel some (cerebro.cancel)",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::grouped;

    #[test]
    fn numbers_are_grouped_by_thousands() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1,000");
        assert_eq!(grouped(134_250_497), "134,250,497");
    }
}
