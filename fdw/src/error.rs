//! The extension's errors and their SQLSTATEs.
//!
//! Every error a user can cause has its own variant, a precise message, the
//! SQLSTATE a PostgreSQL user would expect, and a hint where one helps.

use cerebro_shared::error::{ErrorCode, WireError};
use cerebro_shared::protocol::FrameError;
use cerebro_shared::request::RequestError;
use cerebro_shared::spec::SpecError;
use cerebro_shared::sql::ModelStatus;
use cerebro_shared::surrogate::{DEFAULT_MAX_DEPTH, DEPTHS};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum CerebroError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error("column \"{0}\" of cerebro.models is required")]
    MissingValue(&'static str),
    #[error("features holds a NULL; each of its elements names a column")]
    NullFeature,
    #[error("column \"{0}\" of cerebro.models is set by Cerebro and cannot be inserted")]
    ReadOnlyColumn(String),
    #[error("column \"{column}\" of cerebro.models must be {expected}")]
    WrongValueType { column: String, expected: &'static str },
    #[error("{what} is not JSON Cerebro can read: {reason}")]
    UnusableJson { what: String, reason: String },
    #[error("relation \"{0}\" does not exist")]
    UnknownRelation(String),
    #[error("\"{name}\" is {kind}; Cerebro reads tables, views, materialized views and foreign tables")]
    UnsupportedRelation { name: String, kind: &'static str },
    #[error("permission denied for table {relation}")]
    PermissionDenied { relation: String, columns: Vec<String> },
    #[error("{relation} has no rows with a non-NULL \"{target}\" to train on")]
    EmptySource { relation: String, target: String },
    #[error("model \"{0}\" does not exist")]
    ModelNotFound(String),
    #[error("model \"{name}\" has no version {version}")]
    VersionNotFound { name: String, version: i32 },
    #[error("model \"{name}\" version {version} is {state}")]
    ModelNotReady { name: String, version: i32, state: String, failed: bool },
    #[error("a model named \"{0}\" already exists and you may not add versions to it")]
    NameTaken(String),
    #[error("cerebro.may_use answers only about your own role and roles whose privileges you have")]
    AskingForAnotherRole,
    #[error(
        "model \"{model}\" reads its source through {code} of role \"{owner}\", which would run with your \
         rights"
    )]
    ForeignSourceCode { model: String, code: String, owner: String, own_source: String },
    #[error("model \"{name}\" version {version} has no frozen snapshot left to {to}")]
    SnapshotGone { name: String, version: i32, to: &'static str },
    #[error("model \"{name}\" version {version} was imported without a target: it has no rows to {to}")]
    ImportWithoutRows { name: String, version: i32, to: &'static str },
    #[error("model \"{name}\" version {version} was imported: Cerebro cannot train a graph made elsewhere again")]
    ReproducingImport { name: String, version: i32 },
    #[error("a selection on model \"{name}\" version {version}'s snapshot reads column \"{column}\", which was not frozen with it")]
    NotInSnapshot { column: String, name: String, version: i32 },
    #[error("a selection on version {version}'s snapshot trains on its rows and target; it cannot name {what}")]
    OnSnapshot { version: i32, what: &'static str },
    #[error("k must be at least 1, not {0}")]
    RecommendCount(i32),
    #[error(transparent)]
    Joins(#[from] cerebro_shared::joins::JoinsError),
    #[error("joins(auto) follows the foreign keys declared on a table, and {relation} is {kind}")]
    JoinsNeedTable { relation: String, kind: &'static str },
    #[error("a change and a spec cannot be given together")]
    ChangeWithSpec,
    #[error("max_depth must be between {} and {}, not {given}", DEPTHS.start(), DEPTHS.end())]
    MaxDepth { given: i32 },
    #[error("model \"{name}\" version {version} is {status} and cannot be deleted")]
    NotDeletable { name: String, version: i32, status: String },
    #[error("model \"{name}\" version {version} is {status}; only a queued or training version can be cancelled")]
    NotCancellable { name: String, version: i32, status: String },
    #[error("model \"{name}\" version {version} is deployed and cannot be deleted")]
    DeletingDeployed { name: String, version: i32 },
    #[error("model \"{name}\" version {version} is a member of ensemble version {ensemble}, which is explained and reproduced by its members")]
    DeletingMember { name: String, version: i32, ensemble: i32 },
    #[error("invalid selection spec: {}", .0.message)]
    Selection(cerebro_shared::mst::MstError),
    #[error("this selection expands to {total} candidates, more than cerebro.max_candidates ({limit})")]
    TooManyCandidates { total: u128, limit: u128 },
    #[error("{what} is {value}, more than {setting} allows ({limit})")]
    LimitExceeded { what: String, value: String, setting: &'static str, limit: String, smaller: &'static str },
    #[error("selection {0} does not exist")]
    SelectionNotFound(i64),
    #[error("role \"{0}\" does not exist")]
    UnknownRole(String),
    #[error("{0} must not be NULL")]
    NullArgument(&'static str),
    #[error("permission denied to {action} model \"{model}\"")]
    NotModelOwner { model: String, owner: String, action: &'static str },
    #[error("model \"{name}\" version {version} is {status}; only a ready version can be {to}")]
    NotDeployable { name: String, version: i32, status: String, to: &'static str },
    #[error("model \"{name}\" version {version} has no rule surrogate")]
    NoSurrogate { name: String, version: i32 },
    #[error("model \"{name}\" has no earlier deployment to roll back to")]
    NothingToRollBack { name: String, deployed: Option<i32> },
    #[error("cerebro.predictions needs to know which model to score with")]
    MissingModel,
    /// A scan whose version, given by a join, has no scores: it returns no
    /// rows (never raised to the user).
    #[error("the version a join gives has no scores")]
    NothingToScore,
    #[error(
        "cerebro.predictions cannot take its {0} from another table's rows in this query: it would score \
         the default {0}'s rows, and the join would keep only those"
    )]
    ChoiceLeftToJoin(&'static str),
    #[error(
        "cerebro.predictions cannot read the {0} this query gives it (a value of a type it does not read, or \
         text it cannot convert)"
    )]
    UnreadableChoice(&'static str),
    #[error("cerebro.predictions scores one {field} a scan; this query names {count}")]
    SeveralInOneScan { field: &'static str, count: usize },
    #[error("top_k must be at least 1, not {0}")]
    TopK(i32),
    #[error("cerebro.predict needs a row (of a table, a composite type or a subquery), not {0}")]
    NotARow(String),
    #[error("model \"{model}\" version {version} reads column \"{column}\", which {row_type} does not have")]
    MissingFeature { model: String, version: i32, column: String, row_type: String },
    #[error(
        "model \"{model}\" version {version} reads column \"{column}\" through the joins its selection found, \
         which start from column \"{key}\", which {row_type} does not have"
    )]
    MissingJoinKey { model: String, version: i32, column: String, key: String, row_type: String },
    #[error("cannot change Cerebro's catalog during recovery: this server is a standby")]
    DuringRecovery,
    #[error("column \"{column}\" is {type_name}, but the model reads it as {expected}")]
    FeatureType { column: String, type_name: String, expected: &'static str },
    #[error(
        "column \"{column}\" is {type_name}, but model \"{model}\" version {version} learned its categories \
         from {trained}: as text its values would be categories the model never saw"
    )]
    CategoryType { model: String, version: i32, column: String, type_name: String, trained: String },
    #[error("model \"{0}\" has no key column to identify the rows it scores")]
    MissingKey(String),
    #[error("the source query cannot be used: {0}")]
    QuerySource(&'static str),
    #[error("model \"{0}\" has no deployed or ready version to derive from")]
    NoParent(String),
    #[error("cannot derive from version {version} of \"{name}\": it is {status}, not ready")]
    NotDerivable { name: String, version: i32, status: String },
    #[error("option \"split\" = \"ordered\" validates on the last rows in key order, but no key is given")]
    OrderedSplitNeedsKey,
    #[error("could not connect to cerebrod at \"{socket}\": {reason}")]
    DaemonUnavailable { socket: String, reason: String },
    #[error("cerebrod: {0}")]
    Daemon(WireError),
    #[error("lost the connection to cerebrod: {0}")]
    Connection(#[from] FrameError),
    #[error("cerebrod did not answer within {0} ms")]
    Timeout(i32),
    #[error("canceling statement due to user request")]
    Interrupted,
    #[error("cerebrod answered out of turn: {0}")]
    Protocol(String),
    #[error("the scan's cursor on its source ({0}) was closed before the scan ended")]
    SourceCursorClosed(String),
    #[error("the backend's copy of the model could not score the row: {0}")]
    InBackend(String),
    #[error("cannot set up shared memory for scoring: {0}")]
    SharedMemory(std::io::Error),
    #[error("{0}")]
    Spi(#[from] pgrx::spi::Error),
    #[error("{0} is not supported")]
    Unsupported(&'static str),
    #[error("a row's explanation cannot be made as jsonb: {0}")]
    Jsonb(#[from] cerebro_shared::jsonb::JsonbError),
    #[error("foreign table option \"object\" must be 'models' or 'predictions', not {0:?}")]
    UnknownObject(String),
    #[error("server cerebro_daemon has no \"socket\" option")]
    MissingSocket,
    #[error("the catalog holds an unreadable value: {0}")]
    Catalog(String),
}

impl CerebroError {
    pub fn sqlstate(&self) -> PgSqlErrorCode {
        use PgSqlErrorCode::*;
        match self {
            CerebroError::Spec(e) => match e {
                SpecError::InvalidName { .. } => ERRCODE_INVALID_NAME,
                SpecError::TaskMismatch { .. } | SpecError::EncodingKind { .. } => ERRCODE_DATATYPE_MISMATCH,
                SpecError::UnknownEncodedColumn(_) => ERRCODE_UNDEFINED_COLUMN,
                _ => ERRCODE_INVALID_PARAMETER_VALUE,
            },
            CerebroError::MissingValue(_) => ERRCODE_NOT_NULL_VIOLATION,
            CerebroError::ReadOnlyColumn(_) => ERRCODE_GENERATED_ALWAYS,
            CerebroError::WrongValueType { .. } => ERRCODE_DATATYPE_MISMATCH,
            CerebroError::UnusableJson { .. } => ERRCODE_INVALID_PARAMETER_VALUE,
            CerebroError::UnknownRelation(_) => ERRCODE_UNDEFINED_TABLE,
            CerebroError::UnsupportedRelation { .. } => ERRCODE_WRONG_OBJECT_TYPE,
            CerebroError::Request(e) => match e {
                RequestError::UnknownColumn { .. } | RequestError::NotAFeature { .. } => ERRCODE_UNDEFINED_COLUMN,
                RequestError::UnsupportedType { .. } => ERRCODE_DATATYPE_MISMATCH,
                RequestError::DuplicateFeature(_) => ERRCODE_DUPLICATE_COLUMN,
                RequestError::FeatureConflict { .. }
                | RequestError::KeyIsTarget(_)
                | RequestError::NoFeatures { .. }
                | RequestError::EmptyFeatures
                | RequestError::SelectionTable { .. }
                | RequestError::ImportInvalid(_) => ERRCODE_INVALID_PARAMETER_VALUE,
            },
            CerebroError::PermissionDenied { .. } => ERRCODE_INSUFFICIENT_PRIVILEGE,
            CerebroError::EmptySource { .. } => ERRCODE_INVALID_PARAMETER_VALUE,
            CerebroError::ModelNotFound(_) | CerebroError::VersionNotFound { .. } => ERRCODE_UNDEFINED_OBJECT,
            CerebroError::ModelNotReady { .. } => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            CerebroError::NoParent(_) | CerebroError::NotDerivable { .. } => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            CerebroError::QuerySource(_) => ERRCODE_INVALID_PARAMETER_VALUE,
            CerebroError::MissingModel
            | CerebroError::MissingKey(_)
            | CerebroError::OrderedSplitNeedsKey
            | CerebroError::NothingToScore => ERRCODE_INVALID_PARAMETER_VALUE,
            CerebroError::SeveralInOneScan { .. }
            | CerebroError::ChoiceLeftToJoin(_)
            | CerebroError::UnreadableChoice(_) => ERRCODE_FEATURE_NOT_SUPPORTED,
            CerebroError::NullArgument(_) | CerebroError::NullFeature => ERRCODE_NULL_VALUE_NOT_ALLOWED,
            CerebroError::NotModelOwner { .. }
            | CerebroError::AskingForAnotherRole
            | CerebroError::ForeignSourceCode { .. } => ERRCODE_INSUFFICIENT_PRIVILEGE,
            CerebroError::NameTaken(_) => ERRCODE_DUPLICATE_OBJECT,
            CerebroError::UnknownRole(_) | CerebroError::SelectionNotFound(_) => ERRCODE_UNDEFINED_OBJECT,
            CerebroError::Selection(e) => match e.kind {
                cerebro_shared::mst::ErrorKind::Syntax => ERRCODE_SYNTAX_ERROR,
                cerebro_shared::mst::ErrorKind::Invalid => ERRCODE_INVALID_PARAMETER_VALUE,
            },
            CerebroError::TooManyCandidates { .. } | CerebroError::LimitExceeded { .. } => {
                ERRCODE_PROGRAM_LIMIT_EXCEEDED
            }
            CerebroError::Jsonb(e) => match e {
                cerebro_shared::jsonb::JsonbError::TooLarge => ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                cerebro_shared::jsonb::JsonbError::NotFinite(_) => ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
            },
            CerebroError::SnapshotGone { .. }
            | CerebroError::NotDeletable { .. }
            | CerebroError::DeletingDeployed { .. }
            | CerebroError::DeletingMember { .. }
            | CerebroError::NotCancellable { .. } => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            CerebroError::NotDeployable { .. }
            | CerebroError::NothingToRollBack { .. }
            | CerebroError::NoSurrogate { .. } => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            CerebroError::DaemonUnavailable { .. } => ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
            CerebroError::Daemon(w) => match w.code {
                ErrorCode::ProtocolMismatch | ErrorCode::BadRequest => ERRCODE_PROTOCOL_VIOLATION,
                ErrorCode::ModelNotFound => ERRCODE_UNDEFINED_OBJECT,
                ErrorCode::ArtifactInvalid => ERRCODE_DATA_CORRUPTED,
                ErrorCode::BufferInvalid | ErrorCode::Internal | ErrorCode::Unknown => ERRCODE_INTERNAL_ERROR,
                ErrorCode::ScoringFailed => ERRCODE_DATA_EXCEPTION,
                ErrorCode::Unavailable => ERRCODE_CONNECTION_FAILURE,
                ErrorCode::LockNotAvailable => ERRCODE_LOCK_NOT_AVAILABLE,
                ErrorCode::Unsupported => ERRCODE_FEATURE_NOT_SUPPORTED,
                ErrorCode::TooManyConnections => ERRCODE_TOO_MANY_CONNECTIONS,
            },
            CerebroError::Connection(_) => ERRCODE_CONNECTION_FAILURE,
            CerebroError::DuringRecovery => ERRCODE_READ_ONLY_SQL_TRANSACTION,
            CerebroError::NotARow(_) | CerebroError::FeatureType { .. } | CerebroError::CategoryType { .. } => {
                ERRCODE_DATATYPE_MISMATCH
            }
            CerebroError::MissingFeature { .. } | CerebroError::MissingJoinKey { .. } => ERRCODE_UNDEFINED_COLUMN,
            CerebroError::Timeout(_) | CerebroError::Interrupted => ERRCODE_QUERY_CANCELED,
            CerebroError::Protocol(_) => ERRCODE_PROTOCOL_VIOLATION,
            CerebroError::SourceCursorClosed(_) => ERRCODE_INVALID_CURSOR_STATE,
            CerebroError::InBackend(_) => ERRCODE_DATA_EXCEPTION,
            CerebroError::SharedMemory(_) => ERRCODE_INSUFFICIENT_RESOURCES,
            CerebroError::Spi(_) => ERRCODE_INTERNAL_ERROR,
            CerebroError::Unsupported(_) => ERRCODE_FEATURE_NOT_SUPPORTED,
            CerebroError::TopK(_) | CerebroError::MaxDepth { .. } => ERRCODE_INVALID_PARAMETER_VALUE,
            CerebroError::ImportWithoutRows { .. } => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            CerebroError::ReproducingImport { .. } => ERRCODE_FEATURE_NOT_SUPPORTED,
            CerebroError::NotInSnapshot { .. } => ERRCODE_UNDEFINED_COLUMN,
            CerebroError::Joins(cerebro_shared::joins::JoinsError::NameTooLong { .. }) => ERRCODE_NAME_TOO_LONG,
            CerebroError::Joins(cerebro_shared::joins::JoinsError::NameTaken { .. }) => ERRCODE_DUPLICATE_COLUMN,
            CerebroError::JoinsNeedTable { .. } => ERRCODE_FEATURE_NOT_SUPPORTED,
            CerebroError::OnSnapshot { .. } | CerebroError::ChangeWithSpec | CerebroError::RecommendCount(_) => {
                ERRCODE_INVALID_PARAMETER_VALUE
            }
            CerebroError::UnknownObject(_) => ERRCODE_FDW_INVALID_OPTION_NAME,
            CerebroError::Catalog(_) => ERRCODE_DATA_CORRUPTED,
            CerebroError::MissingSocket => ERRCODE_FDW_OPTION_NAME_NOT_FOUND,
        }
    }

    pub fn hint(&self) -> Option<String> {
        match self {
            CerebroError::Spec(e) => e.hint(),
            CerebroError::Request(e) => e.hint(),
            CerebroError::PermissionDenied { relation, .. } => {
                Some(format!("Training reads the source with your privileges: ask for GRANT SELECT ON {relation}."))
            }
            CerebroError::LimitExceeded { setting, smaller, .. } => Some(format!(
                "{smaller}, or ask a superuser to raise {setting} (ALTER SYSTEM SET {setting} = ...; SELECT \
                 pg_reload_conf())."
            )),
            CerebroError::UnusableJson { .. } => Some(
                "Numbers must fit in a double precision float; objects and arrays may nest at most 32 levels deep; \
                 the text may be at most 1 MB."
                    .into(),
            ),
            CerebroError::EmptySource { .. } => Some("A model needs rows to learn from; check the source.".into()),
            CerebroError::ModelNotReady { failed: true, .. } => {
                Some("The reason is in the error column of cerebro.models; insert a new version to retrain.".into())
            }
            CerebroError::ModelNotReady { .. } => {
                Some("Watch it with: SELECT name, version, status, progress FROM cerebro.models;".into())
            }
            CerebroError::ModelNotFound(_) => Some(
                "SELECT name, version, status FROM cerebro.models lists the models you may use; \
                 another role's model is used only once its owner grants it: cerebro.grant_model."
                    .into(),
            ),
            CerebroError::MissingModel => Some(
                "Add WHERE model = '<name>' to the query (or a join condition on model). The scan uses model = \
                 ..., model = ANY (...) and model IN (...), alone or joined by AND; not an OR, a LIKE or a \
                 function of the column: for several models, one query each, combined with UNION ALL."
                    .into(),
            ),
            CerebroError::Connection(_) => Some(
                "The connection to cerebrod broke in the middle of the statement (cerebrod stopped, restarted \
                 or was killed, or sent what could not be read): run the statement again once it is back; its \
                 log says why."
                    .into(),
            ),
            CerebroError::ChoiceLeftToJoin(column) => Some(format!(
                "The query is refused as it is planned (EXPLAIN too). A join may give {column} only as \
                 p.{column} = <the other table's column>, in a plan that scans cerebro.predictions once per \
                 row of the other table (a nested loop, which enable_nestloop = off rules out). Or ask per \
                 row with a correlated subquery, (SELECT p.score FROM cerebro.predictions p WHERE p.model = \
                 ... AND p.{column} = t.x AND p.key = ...), or give {column} as a constant or a parameter."
            )),
            CerebroError::UnreadableChoice(column) => Some(if *column == "version" {
                "Give the version as an integer, e.g. p.version = a.v::integer.".into()
            } else {
                format!("Give {column} as text, e.g. p.{column} = a.x::text.")
            }),
            CerebroError::SeveralInOneScan { field, .. } => {
                Some(format!("Score each {field} in a query of its own and combine them with UNION ALL."))
            }
            CerebroError::TopK(_) => Some(
                "top_k is how many columns each explanation lists, largest contribution first; the others are \
                 summed in its \"rest\". Leave it out for 5."
                    .into(),
            ),
            CerebroError::NotARow(_) => Some(
                "Pass a whole row: cerebro.predict('churn', c) FROM customers c, ROW(...)::customers, or a \
                 subquery's row: FROM (VALUES (...)) AS r(tenure, contract, ...)."
                    .into(),
            ),
            CerebroError::MissingJoinKey { key, column, .. } => Some(format!(
                "Give the row \"{key}\" and the other keys the joins start from, and the joined columns are read \
                 from their tables; or give \"{column}\" and the other joined columns yourself."
            )),
            CerebroError::MissingFeature { model, version, .. } => Some(format!(
                "The row needs every feature the model was trained on, by name: SELECT features FROM \
                 cerebro.model_versions WHERE name = '{model}' AND version = {version} lists them."
            )),
            CerebroError::CategoryType { column, trained, .. } => Some(format!(
                "Cast it to the type the model learned from, e.g. {column}::{trained} in a query source, \
                 a view or the row given to cerebro.predict."
            )),
            CerebroError::FeatureType { column, .. } => Some(format!(
                "Cast it in the query, e.g. ROW(..., {column}::float8, ...), or pass the table's own row."
            )),
            CerebroError::NotModelOwner { owner, .. } => Some(format!(
                "Only the model's owner ({owner}), members of role cerebro_admin and superusers may do this."
            )),
            CerebroError::DeletingDeployed { name, .. } => Some(format!(
                "Deploy another version first (SELECT cerebro.deploy('{name}', <version>)), or roll back; \
                     the model's last version can be deleted, and its deployment goes with it."
            )),
            CerebroError::DeletingMember { name, ensemble, .. } => {
                Some(format!("Delete the ensemble first: SELECT cerebro.delete_model('{name}', {ensemble});"))
            }
            CerebroError::NotDeletable { status, .. } if status == ModelStatus::Training.as_str() => {
                Some("Wait for its training to end, then delete it.".into())
            }
            CerebroError::NameTaken(_) => {
                Some("Model names are unique in a database; choose another name for your model.".into())
            }
            CerebroError::ForeignSourceCode { own_source, .. } => Some(format!(
                "Scoring it would run that code with your rights. Name the rows to score yourself: \
                 ... WHERE model = '...' AND source = '<a table or query you trust>' \
                 (its own source is {own_source})."
            )),
            CerebroError::NoSurrogate { name, version } => Some(format!(
                "cerebrod distills one after training, except for the candidates that halving stopped early and \
                 for imported models; SELECT cerebro.distill('{name}', {version}) distills it now."
            )),
            CerebroError::NotInSnapshot { name, version, .. } => Some(format!(
                "A selection with parent_version trains on the rows and columns frozen for that version: SELECT \
                 s.columns FROM cerebro.snapshots s JOIN cerebro.model_versions m ON m.snapshot_id = s.id WHERE \
                 m.name = '{name}' AND m.version = {version} lists them. Leave parent_version out to freeze the \
                 source afresh."
            )),
            CerebroError::OnSnapshot { .. } => Some(
                "Leave it out to search on the parent's rows, or leave parent_version out to freeze a source afresh."
                    .into(),
            ),
            CerebroError::RecommendCount(_) => Some("k is how many versions to recommend; leave it out for 5.".into()),
            CerebroError::Joins(e) => e.hint(),
            CerebroError::JoinsNeedTable { .. } => Some(
                "Name the table the foreign keys are declared on as the source (ALTER TABLE ... ADD FOREIGN KEY ... \
                 NOT VALID declares one without checking the rows), or write the joins in a view."
                    .into(),
            ),
            CerebroError::ChangeWithSpec => Some(
                "A spec with parent_version is a selection on that version's snapshot; a change derives one version. \
                 Write what the change says in the spec instead."
                    .into(),
            ),
            CerebroError::MaxDepth { .. } => Some(format!(
                "A tree of depth d has at most 2^d rules; leave max_depth out for {DEFAULT_MAX_DEPTH}, as cerebrod \
                 distills after training."
            )),
            CerebroError::ImportWithoutRows { .. } => Some(
                "Import the graph again with its target column (cerebro.import_onnx(..., target => 'column')): \
                 Cerebro then freezes the source's rows with the target, to measure and distill the graph on. \
                 It scores through cerebro.predictions as it is."
                    .into(),
            ),
            CerebroError::ReproducingImport { .. } => {
                Some("cerebro.import_onnx adds another version of a graph trained elsewhere.".into())
            }
            CerebroError::NotDeployable { .. } => Some(
                "SELECT version, status FROM cerebro.models WHERE name = '...' shows which versions are ready.".into(),
            ),
            CerebroError::NothingToRollBack { deployed: Some(v), .. } => Some(format!(
                "Version {v} is deployed and no earlier deployment is left to return to; \
                 cerebro.deploy(model, version) deploys any ready version."
            )),
            CerebroError::NothingToRollBack { deployed: None, .. } => {
                Some("Nothing is deployed yet: cerebro.deploy(model, version) deploys a version.".into())
            }
            CerebroError::MissingKey(_) => Some("Name one in the query: ... AND key_column = '<column>'.".into()),
            CerebroError::OrderedSplitNeedsKey => {
                Some("Set key to a column that orders the rows in time (an id or a timestamp).".into())
            }
            CerebroError::DaemonUnavailable { .. } => Some(
                "Start cerebrod as the PostgreSQL server's OS user: cerebrod --config <file> (deploy/demo.sh starts \
                 one). The path is the socket option of SERVER cerebro_daemon."
                    .into(),
            ),
            CerebroError::Daemon(w) => w.hint.clone(),
            CerebroError::Timeout(_) => Some("Raise cerebro.scoring_timeout, or check cerebrod's log.".into()),
            CerebroError::Unsupported(_) => {
                Some("Model versions are immutable: INSERT INTO cerebro.models a new version instead.".into())
            }
            CerebroError::Jsonb(cerebro_shared::jsonb::JsonbError::TooLarge) => {
                Some("List fewer columns (AND top_k = ...), or explain a model without its longest text column.".into())
            }
            _ => None,
        }
    }

    pub fn detail(&self) -> Option<String> {
        match self {
            CerebroError::Selection(e) => Some(format!("line {}, column {}:\n{}", e.line, e.column, e.snippet)),
            CerebroError::PermissionDenied { columns, .. } if !columns.is_empty() => {
                Some(format!("No SELECT privilege on column(s): {}.", columns.join(", ")))
            }
            _ => None,
        }
    }
}

impl From<CerebroError> for ErrorReport {
    fn from(e: CerebroError) -> ErrorReport {
        if matches!(e, CerebroError::Interrupted) {
            // PostgreSQL's own error where it has one pending: a statement
            // timeout, a lock timeout or a terminate says so, rather than
            // "due to user request".
            pgrx::check_for_interrupts!();
        }
        let mut report = ErrorReport::new(e.sqlstate(), e.to_string(), "cerebro");
        if let Some(h) = e.hint() {
            report = report.set_hint(h);
        }
        if let Some(d) = e.detail() {
            report = report.set_detail(d);
        }
        report
    }
}

pub type Result<T> = std::result::Result<T, CerebroError>;

/// Raises `e` as an ERROR with its SQLSTATE, hint and detail.
pub(crate) fn raise(e: CerebroError) -> ! {
    ErrorReport::from(e).report(PgLogLevel::ERROR);
    unreachable!("an ERROR does not return")
}
