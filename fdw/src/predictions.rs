//! `cerebro.predictions`: scores the rows of a relation the calling user can
//! see, in batches, through cerebrod.
//!
//! The backend reads a batch of source rows (SPI cursor, the user's
//! privileges), writes it column-wise into a shared-memory region and asks
//! cerebrod to score it. Two regions alternate: while cerebrod scores one
//! batch, the backend reads the next one and hands out the previous results.

use std::cell::RefCell;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::rc::Rc;

use cerebro_shared::batch::{
    plan_explained, read_explanations, read_outputs, read_probabilities, write_packed, BatchLayout, ColumnRef,
    PackedColumn, NO_LABEL,
};
use cerebro_shared::explanation::{explain_row, printed_real, Shown, DEFAULT_TOP_K, EXPLAIN_BATCH_ROWS};
use cerebro_shared::joins::JoinPlan;
use cerebro_shared::protocol::{Request, Response, ScoreRequest};
use cerebro_shared::request::RequestError;
use cerebro_shared::spec::{Feature, FeatureKind, Task};
use cerebro_shared::sql::ModelStatus;
use pgrx::prelude::*;
use pgrx::{register_xact_callback, JsonB, PgOid, PgXactCallbackEvent};
use supabase_wrappers::prelude::{Cell, Column, Qual, Value};

use crate::daemon_client::{DaemonClient, Region};
use crate::error::{CerebroError, Result};
use crate::explanation::explanation_jsonb;
use crate::fetch::{fetch_into, reads_as_number};
use crate::gucs;
use crate::in_backend::{self, Scorer};
use crate::sources::{check_own_source, resolve_source, text_family, BaseType, Source, TextFamily};

/// Query parameters taken from the WHERE clause.
#[derive(Debug, Default)]
struct Params {
    model: Option<String>,
    version: Option<i32>,
    /// The version comes from outside the scan's query level (a join's
    /// other relation, an outer row, a subquery).
    version_from_outside: bool,
    source: Option<String>,
    key_column: Option<String>,
    keys: Option<Vec<String>>,
    explain: Option<bool>,
    top_k: Option<i32>,
}

fn as_text(cell: &Cell) -> Option<String> {
    match cell {
        Cell::String(s) => Some(s.clone()),
        _ => None,
    }
}

fn as_i32(cell: &Cell) -> Option<i32> {
    match cell {
        Cell::I16(v) => Some(*v as i32),
        Cell::I32(v) => Some(*v),
        Cell::I64(v) => i32::try_from(*v).ok(),
        _ => None,
    }
}

/// The one value of `= ANY (...)` (an `IN` list or an array), read by
/// `read`, which picks as `=` does; several are refused: a scan scores one
/// model and version.
fn only_value<T: PartialEq>(field: &'static str, cells: &[Cell], read: fn(&Cell) -> Option<T>) -> Result<Option<T>> {
    let mut distinct: Vec<T> = Vec::new();
    for value in cells.iter().filter_map(read) {
        if !distinct.contains(&value) {
            distinct.push(value);
        }
    }
    match distinct.len() {
        0 | 1 => Ok(distinct.pop()),
        count => Err(CerebroError::SeveralInOneScan { field, count }),
    }
}

impl Params {
    fn from_quals(quals: &[Qual]) -> Result<Params> {
        let mut p = Params::default();
        // A plain `=` first: with it, a list on the same column only
        // filters (PostgreSQL checks every condition again).
        let outside = crate::foreign_scan::OUTSIDE_EQUALS;
        let mut quals: Vec<&Qual> = quals.iter().filter(|q| q.operator == "=" || q.operator == outside).collect();
        quals.sort_by_key(|q| q.use_or);
        for q in quals {
            match (q.field.as_str(), &q.value, q.use_or) {
                ("model", Value::Array(cells), true) if p.model.is_none() => {
                    p.model = only_value("model", cells, as_text)?
                }
                ("version", Value::Array(cells), true) if p.version.is_none() => {
                    p.version = only_value("version", cells, as_i32)?
                }
                ("source", Value::Array(cells), true) if p.source.is_none() => {
                    p.source = only_value("source", cells, as_text)?
                }
                ("model", Value::Cell(c), false) => p.model = as_text(c),
                ("version", Value::Cell(c), false) => {
                    p.version = as_i32(c);
                    p.version_from_outside = q.operator == outside;
                }
                ("source", Value::Cell(c), false) => p.source = as_text(c),
                ("key_column", Value::Cell(c), false) => p.key_column = as_text(c),
                ("key", Value::Cell(c), false) => p.keys = as_text(c).map(|k| vec![k]),
                ("key", Value::Array(cells), true) => p.keys = cells.iter().map(as_text).collect(),
                ("explain", Value::Cell(Cell::Bool(b)), false) => p.explain = Some(*b),
                ("top_k", Value::Cell(c), false) => p.top_k = as_i32(c),
                _ => {}
            }
        }
        Ok(p)
    }
}

/// The model version a scan uses, fixed when the scan begins: the one the
/// query names, else the deployed one, else the latest ready one (else the
/// latest, to say why it cannot score).
#[derive(Clone)]
pub(crate) struct ModelVersion {
    pub(crate) id: i64,
    pub(crate) name: String,
    pub(crate) version: i32,
    pub(crate) features: Vec<Feature>,
    pub(crate) class_labels: Vec<String>,
    pub(crate) task: Task,
    source_relation: String,
    key_column: Option<String>,
    pub(crate) artifact_sha256: String,
    /// Who wrote its source (a query's text is its author's code).
    source_author: String,
    /// Each categorical feature's type in the version's snapshot, and its
    /// family (none for a version without one, an import).
    category_types: Vec<(String, pg_sys::Oid, TextFamily)>,
}

impl ModelVersion {
    /// Refuses to read categorical feature `column` from a column of type
    /// `oid` whose values read as other text than the type the version
    /// learned its categories from (a boolean given as an integer, an
    /// integer as a numeric): every value would be a category never seen,
    /// and the scores quietly those of unknown categories. Text stands for
    /// any type: it holds what its writer wrote.
    pub(crate) fn check_category_type(&self, column: &str, oid: pg_sys::Oid) -> Result<()> {
        let Some(&(_, trained, family)) = self.category_types.iter().find(|(name, ..)| name == column) else {
            return Ok(());
        };
        if oid == trained || text_family(oid).can_stand_for(family) {
            return Ok(());
        }
        Err(CerebroError::CategoryType {
            model: self.name.clone(),
            version: self.version,
            column: column.to_owned(),
            type_name: crate::predict::type_name(oid),
            trained: crate::predict::type_name(trained),
        })
    }
}

/// The types of `features`' categorical columns in the snapshot version
/// `id` was trained on, by feature name.
fn category_types(
    client: &pgrx::spi::SpiClient<'_>,
    id: i64,
    features: &[Feature],
) -> Result<Vec<(String, pg_sys::Oid, TextFamily)>> {
    if features.iter().all(|f| f.kind != FeatureKind::Categorical) {
        return Ok(Vec::new());
    }
    let rows = crate::plans::select(
        client,
        "SELECT s.columns, a.attname::text, a.atttypid
         FROM cerebro.model_versions m
         JOIN cerebro.snapshots s ON s.id = m.snapshot_id
         JOIN pg_catalog.pg_attribute a ON a.attrelid = pg_catalog.to_regclass(s.data_relation)
         WHERE m.id = $1 AND a.attnum > 0 AND NOT a.attisdropped",
        &[PgOid::from(pg_sys::INT8OID)],
        None,
        &[id.into()],
    )?;
    let mut types = Vec::new();
    for row in rows {
        let (Some(columns), Some(attname), Some(oid)) =
            (row.get::<Vec<String>>(1)?, row.get::<String>(2)?, row.get::<pg_sys::Oid>(3)?)
        else {
            continue;
        };
        // Snapshot column `c{i + 1}` holds source column `columns[i]`.
        let Some(column) = attname
            .strip_prefix('c')
            .and_then(|i| i.parse::<usize>().ok()?.checked_sub(1))
            .and_then(|i| columns.get(i))
        else {
            continue;
        };
        if features.iter().any(|f| f.kind == FeatureKind::Categorical && &f.name == column) {
            types.push((column.clone(), oid, text_family(oid)));
        }
    }
    Ok(types)
}

/// What this backend last resolved for each `(model, version asked)`.
type Resolved = HashMap<(String, Option<i32>), Rc<ModelVersion>>;

thread_local! {
    /// Kept between statements.
    static RESOLVED: RefCell<Resolved> = RefCell::new(Resolved::new());
}

/// The ready version `(name, version)` resolves to, as [`resolve_model`]
/// resolves it, from what this backend resolved before when the catalog
/// still resolves to the same version: a ready version's row does not
/// change, so one kept plan that finds its id, with the statement's
/// snapshot and the caller's row security, stands for reading and parsing
/// the row again. A deploy or a rollback is seen by the next statement.
pub(crate) fn resolved_model(name: &str, version: Option<i32>) -> Result<Rc<ModelVersion>> {
    // The artifact too, not the id alone: ids start again at 1 when the
    // extension is dropped and created again, and a session kept from
    // before must not score a new version 1 with the old one's copy.
    let current = Spi::connect(|client| -> Result<Option<(i64, String)>> {
        let rows = crate::plans::select(
            client,
            concat!(
                "SELECT id, artifact_sha256 FROM cerebro.model_versions
                 WHERE name = $1 AND status = 'ready' AND version = ",
                cerebro_shared::resolved_version_sql!()
            ),
            &[PgOid::from(pg_sys::TEXTOID), PgOid::from(pg_sys::INT4OID)],
            Some(1),
            &[name.into(), version.into()],
        )?;
        Ok(match rows.into_iter().next() {
            Some(row) => row.get::<i64>(1)?.zip(row.get::<String>(2)?),
            None => None,
        })
    })?;
    let key = (name.to_owned(), version);
    // Borrowed only here, never across a query: one may score rows itself.
    let cached = RESOLVED.with(|resolved| resolved.borrow().get(&key).cloned());
    match (current, cached) {
        (Some((id, sha)), Some(cached)) if cached.id == id && cached.artifact_sha256 == sha => Ok(cached),
        _ => {
            // Resolving in full says precisely why a model cannot score.
            let model = Rc::new(resolve_model(name, version)?);
            RESOLVED.with(|resolved| resolved.borrow_mut().insert(key, Rc::clone(&model)));
            Ok(model)
        }
    }
}

/// [`ModelVersion`] among the versions the caller may use: a model another
/// role has not granted does not exist for the caller.
fn resolve_model(name: &str, version: Option<i32>) -> Result<ModelVersion> {
    let _path = crate::identity::pin_search_path();
    Spi::connect(|client| {
        let rows = crate::plans::select(
            client,
            concat!(
                "SELECT id, version, status::text, features, class_labels, source_relation, key_column,
                        artifact_sha256, epoch, epochs, source_author::text, task
                 FROM cerebro.model_versions
                 WHERE name = $1 AND version = coalesce(",
                cerebro_shared::resolved_version_sql!(),
                ", (SELECT max(a.version) FROM cerebro.model_versions a WHERE a.name = $1))"
            ),
            &[PgOid::from(pg_sys::TEXTOID), PgOid::from(pg_sys::INT4OID)],
            Some(1),
            &[name.into(), version.into()],
        )?;
        let Some(row) = rows.into_iter().next() else {
            return Err(match version {
                Some(v) if model_exists(client, name)? => {
                    CerebroError::VersionNotFound { name: name.into(), version: v }
                }
                _ => CerebroError::ModelNotFound(name.into()),
            });
        };
        let status: String = row.get(3)?.unwrap_or_default();
        let found_version: i32 = row.get(2)?.unwrap_or_default();
        let parsed = status.parse::<ModelStatus>().ok();
        if parsed != Some(ModelStatus::Ready) {
            let state = match parsed {
                Some(ModelStatus::Training) => format!(
                    "still training (epoch {} of {})",
                    row.get::<i32>(9)?.unwrap_or(0),
                    row.get::<i32>(10)?.unwrap_or(0)
                ),
                Some(ModelStatus::Queued) => "queued for training".to_owned(),
                _ => status.clone(),
            };
            return Err(CerebroError::ModelNotReady {
                name: name.into(),
                version: found_version,
                failed: parsed == Some(ModelStatus::Failed),
                state,
            });
        }
        let features: Vec<Feature> = serde_json::from_value(row.get::<JsonB>(4)?.map(|j| j.0).unwrap_or_default())
            .map_err(|e| CerebroError::Protocol(format!("catalog features are malformed: {e}")))?;
        let id: i64 = row.get(1)?.expect("id");
        let category_types = category_types(client, id, &features)?;
        Ok(ModelVersion {
            id,
            category_types,
            name: name.into(),
            version: found_version,
            features,
            class_labels: row.get::<Vec<String>>(5)?.unwrap_or_default(),
            task: serde_json::from_value(serde_json::Value::String(row.get::<String>(12)?.unwrap_or_default()))
                .map_err(|e| CerebroError::Protocol(format!("catalog task is malformed: {e}")))?,
            source_relation: row.get(6)?.expect("source_relation"),
            key_column: row.get(7)?,
            artifact_sha256: row.get(8)?.expect("a ready model has an artifact"),
            source_author: row.get(11)?.unwrap_or_default(),
        })
    })
}

/// Whether the caller can see any version of `name`.
fn model_exists(client: &pgrx::spi::SpiClient<'_>, name: &str) -> Result<bool> {
    Ok(client
        .select("SELECT EXISTS (SELECT 1 FROM cerebro.model_versions WHERE name = $1)", Some(1), &[name.into()])?
        .first()
        .get_one::<bool>()?
        .unwrap_or(false))
}

/// The source a scan reads: the one the query names (the caller's choice,
/// read like any relation they query), else the model's own, read only if it
/// runs no code of a role without the caller's rights (check_own_source).
fn scan_source(client: &pgrx::spi::SpiClient<'_>, model: &ModelVersion, named: Option<&str>) -> Result<Source> {
    if let Some(named) = named {
        let source = resolve_source(client, named)?;
        return through_joins(client, model, source);
    }
    check_own_source(client, &model.name, &model.source_relation, &model.source_author)?;
    resolve_source(client, &model.source_relation)
}

/// A source the query names, read through the joins `joins(auto)` found
/// for the version's selection when it has the columns of the table the
/// model learnt from but none of the joined ones (docs/sql.md, "Another
/// source, through the model's joins"); else as it is. The tables joined
/// are the model's choice, not the caller's, so they are read only if they
/// run no code of a role without the caller's rights, as the model's own
/// source is.
fn through_joins(client: &pgrx::spi::SpiClient<'_>, model: &ModelVersion, source: Source) -> Result<Source> {
    let Some(plan) = joins_to_read(client, model, &|c| source.column(c).is_ok())? else { return Ok(source) };
    let Some(query) = plan.query_over(&source.display) else { return Ok(source) };
    check_joined_tables(client, model, &plan)?;
    resolve_source(client, &query)
}

/// The joins of the version's selection that a source or a row, which has
/// the columns `has` says, is to be read through: when it lacks some of the
/// version's features, every one it lacks is a joined column, and it has
/// none of the joined columns (else the caller wrote joins of their own, or
/// lacks columns the joins do not add, and the missing column is said).
pub(crate) fn joins_to_read(
    client: &pgrx::spi::SpiClient<'_>,
    model: &ModelVersion,
    has: &dyn Fn(&str) -> bool,
) -> Result<Option<JoinPlan>> {
    let missing: Vec<&str> = model.features.iter().map(|f| f.name.as_str()).filter(|name| !has(name)).collect();
    if missing.is_empty() {
        return Ok(None);
    }
    let Some(plan) = join_plan(client, model)? else { return Ok(None) };
    let joined: Vec<&str> = plan.joined_columns().collect();
    if joined.iter().any(|c| has(c)) || !missing.iter().all(|m| joined.contains(m)) {
        return Ok(None);
    }
    Ok(Some(plan))
}

/// The tables joined are the model's choice, not the caller's: they are
/// read only if they run no code of a role without the caller's rights, as
/// the model's own source is.
pub(crate) fn check_joined_tables(
    client: &pgrx::spi::SpiClient<'_>,
    model: &ModelVersion,
    plan: &JoinPlan,
) -> Result<()> {
    for join in &plan.kept {
        check_own_source(client, &model.name, &join.table, &model.source_author)?;
    }
    Ok(())
}

/// The joins the version's selection kept (`features joins(auto)`), if any.
fn join_plan(client: &pgrx::spi::SpiClient<'_>, model: &ModelVersion) -> Result<Option<JoinPlan>> {
    let plan = crate::plans::select(
        client,
        "SELECT s.plan->'joins' FROM cerebro.model_versions m JOIN cerebro.selections s ON s.id = m.selection_id
         WHERE m.id = $1",
        &[PgOid::from(pg_sys::INT8OID)],
        Some(1),
        &[model.id.into()],
    )?
    .next()
    .map(|row| row.get::<JsonB>(1))
    .transpose()?
    .flatten()
    .and_then(|plan| serde_json::from_value::<JoinPlan>(plan.0).ok());
    Ok(plan.filter(|p| !p.kept.is_empty()))
}

/// Connection and regions, shared with an abort callback so that an ERROR
/// raised in the middle of a scan (cancel, a failing source query) still
/// closes the socket and unmaps the regions.
#[derive(Default)]
struct Session {
    client: Option<DaemonClient>,
    regions: [Option<Region>; 2],
}

type SharedSession = Rc<RefCell<Session>>;

/// Regions larger than this in all are not kept between scans.
const MAX_KEPT_REGION_BYTES: usize = 16 << 20;

thread_local! {
    /// The connection and regions of this backend's last scan that ended
    /// with nothing in flight, with the socket they belong to: the next
    /// scan takes them, since connecting, shaking hands and attaching two
    /// fresh regions cost more than scoring a few keys.
    static IDLE: RefCell<Option<(String, Session)>> = const { RefCell::new(None) };
}

impl Session {
    /// A session on `socket`: the one the last scan left, if it is for the
    /// same socket and still idle, else a new connection.
    fn open(socket: &str) -> Result<Session> {
        let timeout = gucs::SCORING_TIMEOUT_MS.get();
        if let Some((kept, mut session)) = IDLE.with(|idle| idle.borrow_mut().take()) {
            if kept == socket {
                if let Some(client) = session.client.as_mut().filter(|c| c.is_idle()) {
                    if client.set_timeout_ms(timeout).is_ok() {
                        return Ok(session);
                    }
                }
            }
        }
        Ok(Session { client: Some(DaemonClient::connect(socket, timeout)?), regions: [None, None] })
    }

    /// Keeps the session for the next scan on `socket`, unless its regions
    /// grew large.
    fn keep(self, socket: String) {
        let bytes: usize = self.regions.iter().flatten().map(Region::len).sum();
        if self.client.is_some() && bytes <= MAX_KEPT_REGION_BYTES {
            IDLE.with(|idle| *idle.borrow_mut() = Some((socket, self)));
        }
    }
}

/// Whether cerebrod closed the connection with what was sent on it unread
/// (a write that found it closed, or a read that found it reset: a Unix
/// socket closed with unread bytes resets), so that sending it again on a
/// new connection scores it once. A clean end after it was read (cerebrod
/// stopped or died while scoring it) is not: the error stands.
fn closed_unread(e: &CerebroError) -> bool {
    matches!(e, CerebroError::Connection(cerebro_shared::protocol::FrameError::Io(io))
        if matches!(io.kind(), std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset))
}

struct Batch {
    region: usize,
    keys: PackedColumn,
    layout: BatchLayout,
    /// Region bytes the batch needs.
    needed: u64,
    /// The columns, until they are written into the region.
    unwritten: Option<Vec<PackedColumn>>,
    /// The columns, kept when their explanations will show their values.
    explained: Option<Vec<PackedColumn>>,
}

/// A scored batch, handed out row by row: a key or label becomes a
/// string only when the query asks for it.
#[derive(Default)]
struct Scored {
    keys: Option<PackedColumn>,
    scores: Vec<f64>,
    labels: Vec<u32>,
    /// `classes` per row, when the query reads `probabilities` of a
    /// multiclass model.
    probabilities: Vec<f64>,
    /// When the query asks for explanations: `1 + features` per row (the
    /// baseline's score, then each feature's contribution), and the
    /// feature values they explain.
    explanations: Vec<f64>,
    values: Option<Vec<PackedColumn>>,
    next: usize,
}

/// A column of `cerebro.predictions` a query reads.
#[derive(Clone, Copy)]
enum Output {
    Model,
    Version,
    Source,
    KeyColumn,
    Key,
    Label,
    Score,
    Probabilities,
    Explain,
    TopK,
    Explanation,
}

impl Output {
    fn of(column: &str) -> Option<Output> {
        Some(match column {
            "model" => Output::Model,
            "version" => Output::Version,
            "source" => Output::Source,
            "key_column" => Output::KeyColumn,
            "key" => Output::Key,
            "label" => Output::Label,
            "score" => Output::Score,
            "probabilities" => Output::Probabilities,
            "explain" => Output::Explain,
            "top_k" => Output::TopK,
            "explanation" => Output::Explanation,
            _ => return None,
        })
    }
}

/// Most keys a scan scores in the backend (see `PredictionScan::begin`).
const MAX_KEYS_IN_BACKEND: usize = 1024;

/// A text datum of `bytes` (in the database's encoding), made in the
/// current memory context.
pub(crate) fn text_datum(bytes: &[u8]) -> pg_sys::Datum {
    // SAFETY: copies `bytes.len()` readable bytes into a fresh varlena; a
    // value comes from a row of at most 1 GB, or from the catalog.
    pg_sys::Datum::from(unsafe { pg_sys::cstring_to_text_with_len(bytes.as_ptr().cast(), bytes.len() as i32) })
}

pub struct PredictionScan {
    model: Rc<ModelVersion>,
    /// The columns the query reads: (attribute number − 1, which).
    outputs: Vec<(usize, Output)>,
    /// What the `source` column shows: the source as the query named it,
    /// else the model's own.
    source_shown: String,
    key_column: String,
    cursor: Option<String>,
    session: SharedSession,
    batch_rows: i64,
    /// Rows a batch is sized for: a batch's worth, or as many as the keys.
    expected_rows: usize,
    /// Results being handed out.
    current: Scored,
    /// Whether the query asks for explanations (`explain`).
    explain: bool,
    /// Columns an explanation lists (`top_k`).
    top_k: usize,
    /// Feature columns a batch was written from, kept for the next batch.
    spare: Vec<PackedColumn>,
    inflight: Option<Batch>,
    source_done: bool,
    /// Class probabilities asked of cerebrod per row: the classes of a
    /// multiclass model whose `probabilities` the query reads, else 0.
    classes: u32,
    /// cerebrod's socket, which the session is kept for when the scan ends.
    socket: String,
    /// The backend's own copy of the model, which scores a by-key scan's
    /// rows without cerebrod (`in_backend`); None: cerebrod scores them.
    own_copy: Option<Rc<Scorer>>,
    /// What explaining a row works in, kept from row to row.
    explaining: Scratch,
    /// Per feature, whether its column is `real`: an explanation shows its
    /// value as PostgreSQL prints a `real` (3.9), not as the double it was
    /// read into (3.900000095367432).
    single_precision: Vec<bool>,
}

/// Room an explanation is made in: the columns' order by contribution and
/// the jsonb's bytes.
#[derive(Default)]
struct Scratch {
    order: Vec<usize>,
    jsonb: Vec<u8>,
}

impl PredictionScan {
    /// A scan for `quals` that hands out `columns`.
    pub fn begin(quals: &[Qual], socket: &str, columns: &[Column]) -> Result<PredictionScan> {
        let params = Params::from_quals(quals)?;
        let outputs: Vec<(usize, Output)> =
            columns.iter().filter_map(|c| Some((c.num - 1, Output::of(&c.name)?))).collect();
        let probabilities = outputs.iter().any(|(_, o)| matches!(o, Output::Probabilities));
        let name = params.model.clone().ok_or(CerebroError::MissingModel)?;
        let top_k = match params.top_k {
            Some(k) if k < 1 => return Err(CerebroError::TopK(k)),
            Some(k) => k as usize,
            None => DEFAULT_TOP_K,
        };
        // A version another relation's row gives (`JOIN cerebro.models m ON
        // p.version = m.version`) that has no scores, being queued, failed
        // or gone, has no rows, as a join to a table without them would;
        // named by the query itself, it is an error that says why.
        let model = match resolved_model(&name, params.version) {
            Err(CerebroError::ModelNotReady { .. } | CerebroError::VersionNotFound { .. })
                if params.version_from_outside =>
            {
                return Err(CerebroError::NothingToScore)
            }
            other => other?,
        };
        let key_column = params
            .key_column
            .clone()
            .or_else(|| model.key_column.clone())
            .ok_or_else(|| CerebroError::MissingKey(name.clone()))?;
        // Runs as the calling user: their privileges and RLS decide what is
        // scored. The source's own text runs under their search_path; every
        // name Cerebro adds is qualified, and the keys are a parameter.
        let mut single_precision = vec![false; model.features.len()];
        let (source_display, cursor) = Spi::connect(|client| -> Result<(String, String)> {
            let source = scan_source(client, &model, params.source.as_deref())?;
            let key = source.column(&key_column)?;
            let mut select = vec![key.text()];
            for (i, f) in model.features.iter().enumerate() {
                let col = source.column(&f.name)?;
                single_precision[i] = matches!(col.base, BaseType::BuiltIn { oid: pg_sys::FLOAT4OID, .. });
                select.push(match (f.kind, &col.base) {
                    (FeatureKind::Categorical, _) => {
                        model.check_category_type(&f.name, col.type_oid)?;
                        col.text()
                    }
                    // Read as stored: the receiver makes it a float8 itself.
                    (FeatureKind::Numeric, BaseType::BuiltIn { oid, .. }) if reads_as_number(*oid) => col.stored(),
                    // Text is not read as a number, as cerebro.predict does
                    // not: one value that is not a number would fail the scan.
                    (FeatureKind::Numeric, _) => {
                        return Err(RequestError::UnsupportedType {
                            relation: source.display.clone(),
                            column: col.name.clone(),
                            type_name: col.type_name.clone(),
                            role: "the numeric feature this model was trained on",
                        }
                        .into())
                    }
                });
            }
            let mut sql = format!("SELECT {} FROM {}", select.join(", "), source.in_from());
            let (mut types, mut args) = (Vec::new(), Vec::new());
            match params.keys.as_deref() {
                Some([one]) => {
                    sql.push_str(&format!(" WHERE {}", key.equals("$1::pg_catalog.text")));
                    types.push(PgOid::from(pg_sys::TEXTOID));
                    args.push(one.clone().into());
                }
                Some(keys) => {
                    sql.push_str(&format!(" WHERE {}", key.equals_any("$1::pg_catalog.text[]")));
                    types.push(PgOid::from(pg_sys::TEXTARRAYOID));
                    args.push(keys.to_vec().into());
                }
                None => {}
            }
            let cursor = crate::plans::open_cursor(client, &sql, &types, &args)?;
            crate::fetch::hold_with_active_portal(&cursor)?;
            Ok((source.display.clone(), cursor))
        })?;

        let explain = params.explain == Some(true);
        let batch_rows = match gucs::BATCH_ROWS.get() as i64 {
            rows if explain => rows.min(EXPLAIN_BATCH_ROWS as i64),
            rows => rows,
        };
        // A few rows by key score (and are explained) in the backend when
        // it has a copy of the model; a whole source, or many keys, go to
        // cerebrod, which scores one batch while the backend reads the next.
        let own_copy = match &params.keys {
            Some(keys) if keys.len() <= MAX_KEYS_IN_BACKEND => crate::predict::backend_copy(&model, socket)?,
            _ => None,
        };
        let session = if own_copy.is_some() { Session::default() } else { Session::open(socket)? };
        let session: SharedSession = Rc::new(RefCell::new(session));
        let on_abort = AssertUnwindSafe(session.clone());
        register_xact_callback(PgXactCallbackEvent::Abort, move || {
            // Bind the whole wrapper: a closure capturing only `.0` would lose
            // the AssertUnwindSafe around it.
            let on_abort = on_abort;
            let _ = on_abort.0.try_borrow_mut().map(|mut s| *s = Session::default());
        });

        Ok(PredictionScan {
            source_shown: params.source.clone().unwrap_or(source_display),
            outputs,
            key_column,
            cursor: Some(cursor),
            session,
            batch_rows,
            expected_rows: params.keys.as_ref().map_or(batch_rows as usize, |k| k.len().min(batch_rows as usize)),
            current: Scored::default(),
            explain,
            top_k,
            spare: Vec::new(),
            inflight: None,
            source_done: false,
            socket: socket.to_owned(),
            own_copy,
            explaining: Scratch::default(),
            single_precision,
            classes: match model.task {
                Task::Multiclass if probabilities => model.class_labels.len() as u32,
                _ => 0,
            },
            model,
        })
    }

    /// Reads the next batch of source rows into a free region; `None` at the end.
    fn prepare(&mut self, region: usize) -> Result<Option<Batch>> {
        if self.source_done {
            return Ok(None);
        }
        let name = self.cursor.as_deref().expect("the cursor is open until the scan ends");
        let capacity = self.expected_rows;
        // The cursor's columns: the key, then each feature, as `begin`
        // selected them; in the buffers of batches done with, when there
        // are (the current batch's keys are handed out by now).
        let keys = self.current.keys.take().unwrap_or_else(|| PackedColumn::text(capacity));
        let mut features = std::mem::take(&mut self.spare);
        if features.len() != self.model.features.len() {
            features = self
                .model
                .features
                .iter()
                .map(|f| match f.kind {
                    FeatureKind::Numeric => PackedColumn::float64(capacity),
                    FeatureKind::Categorical => PackedColumn::text(capacity),
                })
                .collect();
        }
        let wanted = std::iter::once(keys)
            .chain(features)
            .map(|mut column| {
                column.clear();
                column
            })
            .collect();
        // The key goes back to PostgreSQL as it is; the features go to cerebrod.
        let mut columns = fetch_into(name, self.batch_rows, wanted, 1)?;
        let keys = columns.remove(0);
        if keys.is_empty() {
            self.source_done = true;
            return Ok(None);
        }
        if (keys.len() as i64) < self.batch_rows {
            self.source_done = true;
        }
        let explained = if self.explain { self.model.features.len() as u32 } else { 0 };
        let (layout, needed) = plan_explained(&columns, self.classes, explained);
        let kept = self.explain.then(|| columns.clone());
        let mut batch = Batch { region, keys, layout, needed, unwritten: Some(columns), explained: kept };
        // Write now if the region is attached and large enough; attaching a
        // new one must wait until no request is in flight.
        let fits = self.session.borrow().regions[region].as_ref().is_some_and(|r| r.len() as u64 >= needed);
        if fits {
            self.write(&mut batch)?;
        }
        Ok(Some(batch))
    }

    /// Puts a batch's columns into its region, attaching a (larger) region
    /// first when needed. Only called with no request in flight.
    fn write(&mut self, batch: &mut Batch) -> Result<()> {
        let Some(columns) = batch.unwritten.take() else { return Ok(()) };
        let fits = self.session.borrow().regions[batch.region].as_ref().is_some_and(|r| r.len() as u64 >= batch.needed);
        if !fits {
            let len = (batch.needed as usize).next_power_of_two().max(1 << 20);
            let fresh = Region::create(len)?;
            let attached = self
                .session
                .borrow_mut()
                .client
                .as_mut()
                .ok_or(CerebroError::Interrupted)?
                .attach(batch.region as u32, &fresh);
            self.session.borrow_mut().regions[batch.region] = Some(fresh);
            match attached {
                // The new connection attaches every region, this one too.
                Err(e) if closed_unread(&e) => self.reconnect()?,
                other => other?,
            }
        }
        let mut session = self.session.borrow_mut();
        let map = &mut session.regions[batch.region].as_mut().expect("region set above").map;
        write_packed(&columns, &batch.layout, &mut map[..]).map_err(|e| CerebroError::Protocol(e.to_string()))?;
        self.spare = columns;
        Ok(())
    }

    fn request(&self, batch: &Batch) -> Request {
        Request::Score(ScoreRequest {
            model_version_id: self.model.id,
            artifact_sha256: self.model.artifact_sha256.clone(),
            region: batch.region as u32,
            layout: batch.layout.clone(),
        })
    }

    fn submit(&mut self, batch: &Batch) -> Result<()> {
        let request = self.request(batch);
        let sent = self.session.borrow_mut().client.as_mut().ok_or(CerebroError::Interrupted)?.send(&request);
        match sent {
            Err(e) if closed_unread(&e) => {
                self.reconnect()?;
                self.session.borrow_mut().client.as_mut().ok_or(CerebroError::Interrupted)?.send(&request)
            }
            other => other,
        }
    }

    /// cerebrod closed the connection between two batches, the request in
    /// flight unread ([`closed_unread`]; it makes room for another backend
    /// past its `max_connections` by closing the connection idle the
    /// longest, and a scan waiting for its client to fetch is idle to it):
    /// the scan connects again, attaches its regions again and sends the
    /// request again. A cerebrod that is gone fails the connect (08001).
    fn reconnect(&mut self) -> Result<()> {
        let mut session = self.session.borrow_mut();
        session.client = None;
        let mut client = DaemonClient::connect(&self.socket, gucs::SCORING_TIMEOUT_MS.get())?;
        for (i, region) in session.regions.iter().enumerate() {
            if let Some(region) = region {
                client.attach(i as u32, region)?;
            }
        }
        session.client = Some(client);
        Ok(())
    }

    fn collect(&mut self, batch: Batch) -> Result<()> {
        let received = self.session.borrow_mut().client.as_mut().ok_or(CerebroError::Interrupted)?.recv();
        let received = match received {
            Err(e) if closed_unread(&e) => {
                self.reconnect()?;
                let request = self.request(&batch);
                let mut session = self.session.borrow_mut();
                let client = session.client.as_mut().ok_or(CerebroError::Interrupted)?;
                client.send(&request).and_then(|_| client.recv())
            }
            other => other,
        };
        let mut session = self.session.borrow_mut();
        match received {
            Ok(Response::Scored { .. }) => {}
            Ok(other) => return Err(CerebroError::Protocol(format!("expected scored, got {other:?}"))),
            Err(CerebroError::Interrupted) => {
                // Free everything first: the ERROR raised next leaves this scan behind.
                *session = Session::default();
                drop(session);
                pgrx::check_for_interrupts!();
                return Err(CerebroError::Interrupted);
            }
            Err(e) => return Err(e),
        }
        let map = &session.regions[batch.region].as_ref().expect("a submitted batch has a region").map;
        let (scores, labels) =
            read_outputs(&batch.layout, &map[..]).map_err(|e| CerebroError::Protocol(e.to_string()))?;
        let probabilities =
            read_probabilities(&batch.layout, &map[..]).map_err(|e| CerebroError::Protocol(e.to_string()))?;
        let explanations =
            read_explanations(&batch.layout, &map[..]).map_err(|e| CerebroError::Protocol(e.to_string()))?;
        let values = batch.explained;
        self.current = Scored { keys: Some(batch.keys), scores, labels, probabilities, explanations, values, next: 0 };
        Ok(())
    }

    /// Makes the next batch's results current; false when the scan is done.
    fn advance(&mut self) -> Result<bool> {
        if let Some(scorer) = self.own_copy.clone() {
            return self.advance_in_backend(&scorer);
        }
        if self.inflight.is_none() {
            match self.prepare(0)? {
                Some(mut b) => {
                    self.write(&mut b)?;
                    self.submit(&b)?;
                    self.inflight = Some(b);
                }
                None => return Ok(false),
            }
        }
        let inflight = self.inflight.take().expect("set above");
        // Read the next source batch while cerebrod scores this one.
        let prepared = self.prepare(1 - inflight.region)?;
        self.collect(inflight)?;
        if let Some(mut next) = prepared {
            self.write(&mut next)?;
            self.submit(&next)?;
            self.inflight = Some(next);
        }
        Ok(true)
    }

    /// [`PredictionScan::advance`] with the backend's own copy of the
    /// model: the next batch scored where it was read.
    fn advance_in_backend(&mut self, scorer: &Scorer) -> Result<bool> {
        let Scorer::Backend(native) = scorer else { unreachable!("only a copy the backend scores with is kept") };
        // No region is attached, so the batch stays unwritten.
        let Some(mut batch) = self.prepare(0)? else { return Ok(false) };
        let columns = batch.unwritten.take().expect("a batch without a region is not written");
        let refs: Vec<ColumnRef<'_>> = columns.iter().map(PackedColumn::as_ref).collect();
        let scored = in_backend::score(native, self.model.task, &refs, self.classes)?;
        let explanations = if self.explain { in_backend::explain(native, &refs)? } else { Vec::new() };
        drop(refs);
        self.spare = columns;
        self.current = Scored {
            keys: Some(batch.keys),
            scores: scored.scores,
            labels: scored.labels,
            probabilities: scored.probabilities,
            explanations,
            values: batch.explained,
            next: 0,
        };
        Ok(true)
    }

    /// Writes the next row's values into `values` and `nulls` (one per
    /// attribute of `cerebro.predictions`, all NULL on entry); false when
    /// the scan is done.
    pub fn next_into(&mut self, values: &mut [pg_sys::Datum], nulls: &mut [bool]) -> Result<bool> {
        while self.current.next >= self.current.scores.len() {
            if !self.advance()? {
                return Ok(false);
            }
        }
        let i = self.current.next;
        self.current.next += 1;
        let mut explaining = std::mem::take(&mut self.explaining);
        let current = &self.current;
        for &(at, output) in &self.outputs {
            let value = match output {
                Output::Model => Some(text_datum(self.model.name.as_bytes())),
                Output::Version => Some(pg_sys::Datum::from(self.model.version)),
                Output::Source => Some(text_datum(self.source_shown.as_bytes())),
                Output::KeyColumn => Some(text_datum(self.key_column.as_bytes())),
                // The key's bytes as the source gave them, in the database's
                // encoding, as a text datum again.
                Output::Key => current.keys.as_ref().and_then(|k| k.text_at(i)).map(text_datum),
                Output::Label => self
                    .model
                    .class_labels
                    .get(current.labels[i] as usize)
                    .filter(|_| current.labels[i] != NO_LABEL)
                    .map(|label| text_datum(label.as_bytes())),
                Output::Score => Some(current.scores[i].into_datum().expect("a float8 is never NULL")),
                Output::Probabilities => self.probabilities_of(i).and_then(IntoDatum::into_datum),
                Output::Explain => Some(pg_sys::Datum::from(self.explain)),
                Output::TopK => Some(pg_sys::Datum::from(self.top_k as i32)),
                Output::Explanation => self.explanation_of(i, &mut explaining)?,
            };
            if let Some(datum) = value {
                values[at] = datum;
                nulls[at] = false;
            }
        }
        self.explaining = explaining;
        Ok(true)
    }

    /// Row `i`'s probability of each class, in the order of the model's
    /// class labels: what cerebrod gave (multiclass), `[1 − p, p]`
    /// (binary), none (regression).
    fn probabilities_of(&self, i: usize) -> Option<Vec<f64>> {
        let current = &self.current;
        match self.model.task {
            Task::Multiclass => {
                let k = self.classes as usize;
                current.probabilities.get(i * k..(i + 1) * k).map(<[f64]>::to_vec)
            }
            Task::Binary => {
                let p = current.scores[i];
                Some(vec![1.0 - p, p])
            }
            Task::Regression => None,
        }
    }

    /// Row `i`'s explanation as a jsonb datum, when the query asks for one.
    fn explanation_of(&self, i: usize, scratch: &mut Scratch) -> Result<Option<pg_sys::Datum>> {
        let current = &self.current;
        let features = &self.model.features;
        let width = 1 + features.len();
        let (Some(row), Some(values)) = (current.explanations.get(i * width..(i + 1) * width), current.values.as_ref())
        else {
            return Ok(None);
        };
        let value = |c: usize| {
            let column = &values[c];
            match column {
                PackedColumn::Float64 { .. } => match column.f64_at(i) {
                    None => Shown::Null,
                    Some(v) if self.single_precision.get(c) == Some(&true) => Shown::Number(printed_real(v)),
                    Some(v) => Shown::Number(v),
                },
                PackedColumn::Text { .. } => {
                    column.text_at(i).map_or(Shown::Null, |b| Shown::Text(String::from_utf8_lossy(b)))
                }
            }
        };
        let names: Vec<&str> = features.iter().map(|f| f.name.as_str()).collect();
        let class = match self.model.task {
            Task::Multiclass => self.model.class_labels.get(current.labels[i] as usize).map(String::as_str),
            _ => None,
        };
        let explanation = explain_row(&names, value, row[0], &row[1..], class, self.top_k, &mut scratch.order);
        Ok(Some(explanation_jsonb(&explanation, &mut scratch.jsonb)?))
    }

    pub fn end(&mut self) {
        if let Some(name) = self.cursor.take() {
            // Dropping a found cursor closes it.
            let _ = Spi::connect(|client| client.find_cursor(&name).map(drop));
            crate::fetch::release_hold(&name);
        }
        let session = std::mem::take(&mut *self.session.borrow_mut());
        // A scan stopped early (LIMIT) leaves a batch in flight: its answer
        // would be read as the next scan's, so that connection goes.
        if self.inflight.take().is_none() {
            session.keep(std::mem::take(&mut self.socket));
        }
    }
}

impl Drop for PredictionScan {
    /// A scan PostgreSQL never ended (its query failed, or was abandoned)
    /// leaves its source cursor to its transaction.
    fn drop(&mut self) {
        if let Some(name) = self.cursor.take() {
            crate::fetch::abandon_hold(&name);
        }
    }
}
