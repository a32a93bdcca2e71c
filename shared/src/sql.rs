//! SQL text both sides build.
//!
//! Cerebro reads user columns in three places: the INSERT that freezes a
//! snapshot (as the user), the scan that scores (as the scorer) and
//! `cerebrod score` (as the daemon). The expressions here convert a column
//! to the built-in type Cerebro computes with without ever running code a
//! user wrote: every name is schema-qualified, so the caller's `search_path`
//! picks nothing, and an enum (the one kind of usable type an ordinary role
//! can own, and so give a cast of its own) goes to text through
//! `enum_out`, never through `pg_cast`.
//!
//! It also names the catalog's facts that Rust code on either side compares
//! or writes: the labels of the SQL enum types `cerebro.model_status` and
//! `cerebro.job_state` ([`ModelStatus`], [`JobState`]; the SQL files stay
//! their home, and a test holds the two to the same labels) and the keys
//! of a version's `metrics` ([`metrics`]).

use std::fmt;

use serde::{Deserialize, Serialize};

/// Quotes an SQL identifier (always, so any name is safe).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The name of column `index` (0-based) of a snapshot table: snapshots
/// store source columns under neutral names (`c1`, `c2`, ...), kept in
/// `cerebro.snapshots.columns`, so the system catalogs, which every role
/// may read, show nothing of a model's columns.
pub fn snapshot_column(index: usize) -> String {
    format!("c{}", index + 1)
}

/// `expr` (an already quoted column) as `float8`: a built-in cast, since only
/// built-in numeric types are used as numbers (`SqlKind::classify`). A value
/// beyond float8's range (a `numeric` can hold 1e400), infinite or NaN is
/// NULL, missing, as scoring reads it: the cast alone fails the whole read.
/// (No `abs`: it fails on the smallest integer of each type.)
pub fn as_float8(expr: &str) -> String {
    format!(
        "CASE WHEN ({expr}) OPERATOR(pg_catalog.<=) {FLOAT8_MAX} AND ({expr}) OPERATOR(pg_catalog.>=) -{FLOAT8_MAX} \
         THEN ({expr})::pg_catalog.float8 END"
    )
}

/// The largest finite float8, as a numeric literal (rounded down).
const FLOAT8_MAX: &str = "1.7976931348623157e308";

/// `expr` (an already quoted column of a type that is not built in, nor an
/// enum: a composite, a range, an extension's type) as text, through the
/// type's output function (which `format` calls; a role can create such a
/// type, and so a cast of its own from it, but not its output function).
pub fn as_output_text(expr: &str) -> String {
    format!("CASE WHEN ({expr}) IS NULL THEN NULL ELSE pg_catalog.format('%s', {expr}) END")
}

/// `expr` (an already quoted column of a built-in type, or of an enum) as
/// text, without a user-defined cast.
/// `enum_type` is the column's base type, schema-qualified and quoted, when
/// that is an enum: the value goes through the enum's output function
/// (a domain over an enum is first relabelled to it, which runs nothing).
pub fn as_text(expr: &str, enum_type: Option<&str>) -> String {
    match enum_type {
        Some(t) => format!("pg_catalog.textin(pg_catalog.enum_out(({expr})::{t}))"),
        None => format!("({expr})::pg_catalog.text"),
    }
}

/// The version model `$1` resolves to, as a SQL expression of `$1` (the
/// name) and `$2` (an `int4`, the version asked or NULL): the version asked,
/// else the deployed one, else the newest ready one, among the versions the
/// reader may see. `cerebro.resolve_version` (fdw/sql) is this rule for SQL
/// users and must say the same; the queries a backend runs for every
/// request it scores write it in themselves (with `concat!`), so that
/// PostgreSQL plans it with them once, where calling the PL/pgSQL function
/// ran two more queries at every call (a tenth of a by-key prediction).
/// Every name is qualified: the text means the same under any `search_path`.
#[macro_export]
macro_rules! resolved_version_sql {
    () => {
        "coalesce($2, \
           (SELECT d.version FROM cerebro.deployments d WHERE d.name OPERATOR(pg_catalog.=) $1), \
           (SELECT pg_catalog.max(r.version) FROM cerebro.model_versions r \
            WHERE r.name OPERATOR(pg_catalog.=) $1 AND r.status OPERATOR(pg_catalog.=) 'ready'))"
    };
}

/// The channel an INSERT notifies when it queues a job, and cerebrod
/// LISTENs on. The notification has no payload: anyone may LISTEN, and
/// cerebrod claims whatever is queued whatever woke it.
pub const JOBS_CHANNEL: &str = "cerebro_jobs";

/// A model version's status: a label of the SQL enum `cerebro.model_status`
/// (`cerebro.model_versions.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelStatus {
    Queued,
    Training,
    Ready,
    Failed,
    Cancelled,
    Deleted,
}

impl ModelStatus {
    pub const ALL: [ModelStatus; 6] = [
        ModelStatus::Queued,
        ModelStatus::Training,
        ModelStatus::Ready,
        ModelStatus::Failed,
        ModelStatus::Cancelled,
        ModelStatus::Deleted,
    ];

    /// The SQL label.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelStatus::Queued => "queued",
            ModelStatus::Training => "training",
            ModelStatus::Ready => "ready",
            ModelStatus::Failed => "failed",
            ModelStatus::Cancelled => "cancelled",
            ModelStatus::Deleted => "deleted",
        }
    }
}

impl std::str::FromStr for ModelStatus {
    type Err = UnknownLabel;
    fn from_str(label: &str) -> Result<Self, UnknownLabel> {
        ModelStatus::ALL.into_iter().find(|s| s.as_str() == label).ok_or_else(|| UnknownLabel(label.to_owned()))
    }
}

impl fmt::Display for ModelStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A job's state: a label of the SQL enum `cerebro.job_state`
/// (`cerebro.jobs.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 5] =
        [JobState::Queued, JobState::Running, JobState::Done, JobState::Failed, JobState::Cancelled];

    /// The SQL label.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

impl std::str::FromStr for JobState {
    type Err = UnknownLabel;
    fn from_str(label: &str) -> Result<Self, UnknownLabel> {
        JobState::ALL.into_iter().find(|s| s.as_str() == label).ok_or_else(|| UnknownLabel(label.to_owned()))
    }
}

/// A status or state read from the catalog that this build does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("\"{0}\" is not a label Cerebro knows")]
pub struct UnknownLabel(pub String);

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The names of validation metrics: the keys of
/// `cerebro.model_versions.metrics`, which the views `cerebro.archive` and
/// `cerebro.leaderboard` read by name.
pub mod metrics {
    /// Binary: area under the ROC curve.
    pub const AUC: &str = "auc";
    /// Binary and multiclass.
    pub const ACCURACY: &str = "accuracy";
    /// Binary and multiclass.
    pub const LOG_LOSS: &str = "log_loss";
    /// Multiclass.
    pub const MACRO_F1: &str = "macro_f1";
    /// Regression, in the target's units.
    pub const RMSE: &str = "rmse";
    /// Regression, in the target's units.
    pub const MAE: &str = "mae";
    /// Regression: R².
    pub const R2: &str = "r2";

    /// Every metric a model version may have.
    pub const ALL: [&str; 7] = [AUC, ACCURACY, LOG_LOSS, MACRO_F1, RMSE, MAE, R2];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_always_quoted_and_escaped() {
        assert_eq!(quote_ident("churn"), "\"churn\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
    }

    #[test]
    fn conversions_are_qualified_and_enums_never_use_a_cast() {
        assert_eq!(
            as_float8("\"x\""),
            "CASE WHEN (\"x\") OPERATOR(pg_catalog.<=) 1.7976931348623157e308 \
             AND (\"x\") OPERATOR(pg_catalog.>=) -1.7976931348623157e308 THEN (\"x\")::pg_catalog.float8 END"
        );
        assert_eq!(as_text("\"x\"", None), "(\"x\")::pg_catalog.text");
        let e = as_text("\"mood\"", Some("\"app\".\"mood\""));
        assert_eq!(e, "pg_catalog.textin(pg_catalog.enum_out((\"mood\")::\"app\".\"mood\"))");
        assert_eq!(snapshot_column(0), "c1");
        let o = as_output_text("\"k\"");
        assert!(o.contains("pg_catalog.format('%s', \"k\")") && !o.contains("::"), "{o}");
    }

    /// The SQL that defines the catalog: the 0.1.0 catalog, then every
    /// upgrade script in order.
    const CATALOG_SQL: [&str; 2] =
        [include_str!("../../sql/catalog.sql"), include_str!("../../sql/cerebro--0.1.0--0.2.0.sql")];

    /// The labels the SQL files give enum type `name` (`cerebro.x`): those
    /// of its `CREATE TYPE ... AS ENUM (...)`, then those `ALTER TYPE ...
    /// ADD VALUE` adds.
    fn enum_labels(name: &str) -> Vec<String> {
        let quoted = |list: &str| -> Vec<String> {
            list.split(',').map(|l| l.trim().trim_matches('\'').to_string()).filter(|l| !l.is_empty()).collect()
        };
        let create = format!("CREATE TYPE {name} AS ENUM (");
        let add = format!("ALTER TYPE {name} ADD VALUE ");
        let mut labels = Vec::new();
        for sql in CATALOG_SQL {
            for line in sql.lines().map(str::trim) {
                if let Some(rest) = line.strip_prefix(&create) {
                    let list = rest.split_once(')').expect("the label list closes on its line").0;
                    labels.extend(quoted(list));
                } else if let Some(rest) = line.strip_prefix(&add) {
                    labels.extend(quoted(rest.trim_end_matches(';')));
                }
            }
        }
        labels
    }

    #[test]
    fn statuses_and_states_are_the_labels_of_the_sql_enums() {
        let mut statuses: Vec<&str> = ModelStatus::ALL.iter().map(|s| s.as_str()).collect();
        let mut sql = enum_labels("cerebro.model_status");
        statuses.sort_unstable();
        sql.sort_unstable();
        assert_eq!(statuses, sql);
        let mut states: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
        let mut sql = enum_labels("cerebro.job_state");
        states.sort_unstable();
        sql.sort_unstable();
        assert_eq!(states, sql);
        // serde and FromStr read and write the same labels.
        for s in ModelStatus::ALL {
            assert_eq!(s.as_str().parse::<ModelStatus>(), Ok(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
            assert_eq!(serde_json::from_value::<ModelStatus>(s.as_str().into()).unwrap(), s);
        }
        assert_eq!("ended".parse::<JobState>(), Err(UnknownLabel("ended".into())));
        for s in JobState::ALL {
            assert_eq!(s.as_str().parse::<JobState>(), Ok(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
            assert_eq!(serde_json::from_value::<JobState>(s.as_str().into()).unwrap(), s);
        }
    }

    #[test]
    fn the_catalogs_views_read_every_metric_by_its_name() {
        let upgrade = CATALOG_SQL[1];
        for name in metrics::ALL {
            assert!(upgrade.contains(&format!("(m.metrics->>'{name}')")), "{name}");
        }
    }
}
