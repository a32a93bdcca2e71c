//! `cerebro.predict(model, input [, version])`, `cerebro.predict_label` and
//! `cerebro.predict_proba`: one row's score, label or class probabilities,
//! for application code that asks once per request. The row is the
//! caller's own value (a table's row, a row built in the query, a
//! subquery's), read by column name; nothing is read from the model's
//! source.
//!
//! A backend keeps, between calls, what it last resolved of each model
//! (features, labels, file; `predictions::resolved_model`, as
//! `cerebro.predictions` does) and how it scores each version: in the
//! backend, with its own copy of the network once that copy answers as
//! cerebrod does (`in_backend`), else through its connection to cerebrod
//! with one attached region. Each call checks the version again with the
//! statement's snapshot (the functions are STABLE), so a deploy or a
//! rollback is seen by the next statement and never within one. A
//! connection that a cancel, a timeout or a restart of cerebrod left in
//! doubt is dropped, and the next call (or, for a connection found closed,
//! the same call) opens a new one.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use cerebro_shared::batch::{
    plan_packed, read_outputs, read_probabilities, write_packed, ColumnData, ColumnRef, PackedColumn, NO_LABEL,
};
use cerebro_shared::protocol::{Request, Response, ScoreRequest};
use cerebro_shared::spec::{Feature, FeatureKind, Task};
use cerebro_shared::sql::quote_ident;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::{AnyElement, FromDatum, PgOid};

use crate::daemon_client::{DaemonClient, Region};
use crate::error::{raise, CerebroError, Result};
use crate::gucs;
use crate::in_backend::{self, Scorer};
use crate::plans;
use crate::predictions::{self, resolved_model, ModelVersion};

/// The region a connection attaches first; a larger row attaches a larger one.
const REGION_BYTES: usize = 1 << 16;

thread_local! {
    static BACKEND: RefCell<Backend> = RefCell::new(Backend::default());
}

#[derive(Default)]
struct Backend {
    link: Option<Link>,
    /// How each version this backend scored is scored, by version id,
    /// with the artifact it was decided for.
    scorers: HashMap<i64, (String, Rc<Scorer>)>,
    /// The ONNX bytes of the copies `scorers` keeps, in all: a measure of
    /// the memory they take.
    kept_bytes: usize,
}

/// Most versions a backend keeps a scorer for; past it, it starts over.
const MAX_SCORERS: usize = 64;
/// Most ONNX bytes of the copies a backend keeps (the networks' weights,
/// about as much again once rebuilt); past it, it starts over. Memory a
/// backend's Rust code allocates is outside PostgreSQL's accounting.
const MAX_KEPT_BYTES: usize = 64 << 20;

impl Backend {
    /// How to score `model`: the engine's copy once it has answered the
    /// probe rows as cerebrod does (asked at the socket `socket` finds, only
    /// when the version is not decided yet), else cerebrod (see
    /// `in_backend`).
    fn scorer(&mut self, model: &ModelVersion, socket: impl FnOnce() -> Result<String>) -> Result<Rc<Scorer>> {
        if !gucs::SCORE_IN_BACKEND.get() {
            return Ok(Rc::new(Scorer::Daemon("cerebro.score_in_backend is off".into())));
        }
        if let Some((sha, scorer)) = self.scorers.get(&model.id) {
            if *sha == model.artifact_sha256 {
                return Ok(Rc::clone(scorer));
            }
        }
        let (scorer, bytes) = match in_backend::rebuild(model, MAX_KEPT_BYTES)? {
            Err(why) => (Scorer::Daemon(why), 0),
            Ok((native, bytes)) => {
                let probe = native.probe();
                let classes = if model.task == Task::Multiclass { model.class_labels.len() as u32 } else { 0 };
                // Only a failure to reach cerebrod fails the call: the row
                // itself needs it then.
                let refs: Vec<ColumnRef<'_>> = probe.iter().map(ColumnData::as_ref).collect();
                match (
                    in_backend::score(&native, model.task, &refs, classes),
                    self.through_daemon(model, &probe, classes, &socket()?),
                ) {
                    // cerebrod may be busy or still loading the model: not
                    // decided, asked again at the next call.
                    (_, Err(e @ CerebroError::Daemon(_))) => {
                        debug1!("model \"{}\" version {}: the probe rows: {e}", model.name, model.version);
                        return Ok(Rc::new(Scorer::Daemon(e.to_string())));
                    }
                    (_, Err(e)) => return Err(e),
                    (Err(e), Ok(_)) => (Scorer::Daemon(e.to_string()), 0),
                    (Ok(own), Ok(daemon)) if in_backend::agrees(&own, &daemon, model.task) => {
                        (Scorer::Backend(Box::new(native)), bytes)
                    }
                    (Ok(_), Ok(_)) => {
                        (Scorer::Daemon("the backend's copy scores the probe rows otherwise than cerebrod".into()), 0)
                    }
                }
            }
        };
        if let Scorer::Daemon(why) = &scorer {
            debug1!("model \"{}\" version {}: scored by cerebrod: {why}", model.name, model.version);
        }
        if self.scorers.len() >= MAX_SCORERS || self.kept_bytes + bytes > MAX_KEPT_BYTES {
            self.scorers.clear();
            self.kept_bytes = 0;
        }
        self.kept_bytes += bytes;
        let scorer = Rc::new(scorer);
        self.scorers.insert(model.id, (model.artifact_sha256.clone(), Rc::clone(&scorer)));
        Ok(scorer)
    }

    /// `columns` scored by cerebrod at `socket`. A connection in doubt, or
    /// to another socket, is dropped; one found closed (cerebrod restarted)
    /// is opened again once, since scoring changes nothing.
    fn through_daemon(
        &mut self,
        model: &ModelVersion,
        columns: &[ColumnData],
        classes: u32,
        socket: &str,
    ) -> Result<Scored> {
        if self.link.as_ref().is_some_and(|l| l.in_doubt || l.socket != socket) {
            self.link = None;
        }
        let reused = self.link.is_some();
        let attempt = |backend: &mut Backend| -> Result<Scored> {
            if backend.link.is_none() {
                backend.link = Some(Link::open(socket)?);
            }
            let link = backend.link.as_mut().expect("opened above");
            link.score(model, columns, classes)
        };
        let scored = match attempt(self) {
            Err(CerebroError::Connection(_)) if reused => {
                self.link = None;
                attempt(self)
            }
            other => other,
        };
        scored.inspect_err(|e| {
            if !matches!(e, CerebroError::Daemon(_)) {
                self.link = None;
            }
            if matches!(e, CerebroError::Interrupted) {
                pgrx::check_for_interrupts!();
            }
        })
    }
}

/// The backend's own copy of `model`, when the backend scores it (see
/// `Backend::scorer`; cerebrod asked at the scan's `socket`), for a by-key
/// scan of `cerebro.predictions`.
pub(crate) fn backend_copy(model: &ModelVersion, socket: &str) -> Result<Option<Rc<Scorer>>> {
    // Busy only if a call of cerebro.predict is under way further up this
    // backend's stack: the scan then goes to cerebrod.
    let asked = || Ok(socket.to_owned());
    let Some(scorer) = BACKEND.with(|backend| backend.try_borrow_mut().ok().map(|mut b| b.scorer(model, asked))) else {
        return Ok(None);
    };
    let scorer = scorer?;
    Ok(matches!(*scorer, Scorer::Backend(_)).then_some(scorer))
}

/// A connection to cerebrod and its one region.
struct Link {
    /// cerebrod's socket it is connected to.
    socket: String,
    client: DaemonClient,
    region: Region,
    /// A request went out and its answer has not been read: an ERROR (a
    /// cancel) came in between, so the next answer on it is not ours.
    in_doubt: bool,
}

impl Link {
    fn open(socket: &str) -> Result<Link> {
        let mut client = DaemonClient::connect(socket, gucs::SCORING_TIMEOUT_MS.get())?;
        let region = Region::create(REGION_BYTES)?;
        client.attach(0, &region)?;
        Ok(Link { socket: socket.to_owned(), client, region, in_doubt: false })
    }

    /// Scores one batch: the scores and labels of its rows, and `classes`
    /// probabilities per row (0: none asked for).
    fn score(&mut self, model: &ModelVersion, columns: &[ColumnData], classes: u32) -> Result<Scored> {
        let packed: Vec<PackedColumn> = columns.iter().map(PackedColumn::from).collect();
        let (layout, needed) = plan_packed(&packed, classes);
        if (self.region.len() as u64) < needed {
            let larger = Region::create((needed as usize).next_power_of_two())?;
            self.client.attach(0, &larger)?;
            self.region = larger;
        }
        write_packed(&packed, &layout, &mut self.region.map[..]).map_err(|e| CerebroError::Protocol(e.to_string()))?;
        let request = Request::Score(ScoreRequest {
            model_version_id: model.id,
            artifact_sha256: model.artifact_sha256.clone(),
            region: 0,
            layout: layout.clone(),
        });
        self.in_doubt = true;
        self.client.send(&request)?;
        match self.client.recv() {
            Ok(Response::Scored { .. }) => {}
            Ok(other) => return Err(CerebroError::Protocol(format!("expected scored, got {other:?}"))),
            // The daemon answered with an error: the connection is in step.
            Err(e @ CerebroError::Daemon(_)) => {
                self.in_doubt = false;
                return Err(e);
            }
            Err(e) => return Err(e),
        }
        self.in_doubt = false;
        let protocol = |e: cerebro_shared::batch::LayoutError| CerebroError::Protocol(e.to_string());
        let (scores, labels) = read_outputs(&layout, &self.region.map[..]).map_err(protocol)?;
        let probabilities = read_probabilities(&layout, &self.region.map[..]).map_err(protocol)?;
        Ok(Scored { scores, labels, probabilities })
    }
}

/// A batch's scores, from cerebrod or the backend's own copy of the model.
pub(crate) struct Scored {
    pub(crate) scores: Vec<f64>,
    pub(crate) labels: Vec<u32>,
    /// The classes asked for, per row.
    pub(crate) probabilities: Vec<f64>,
}

/// One row's prediction.
struct Prediction {
    score: f64,
    label: Option<String>,
    /// Each class's probability, in the order of the model's class labels,
    /// when asked for: what cerebrod gave (multiclass), `[1 − p, p]`
    /// (binary), none (regression); as `cerebro.predictions` shows them.
    probabilities: Option<Vec<f64>>,
}

/// One row's prediction with the model `name` resolves to; `probabilities`:
/// whether to ask for each class's.
fn predict_row(
    name: Option<&str>,
    input: Option<AnyElement>,
    version: Option<i32>,
    probabilities: bool,
) -> Result<Option<Prediction>> {
    let name = name.ok_or(CerebroError::NullArgument("model"))?;
    let Some(input) = input else { return Ok(None) };
    BACKEND.with(|backend| {
        let mut backend = backend.borrow_mut();
        let model = resolved_model(name, version)?;
        let columns = read_row(&input, &model)?;
        let classes = match model.task {
            Task::Multiclass if probabilities => model.class_labels.len() as u32,
            _ => 0,
        };
        // The server the extension's scripts create (a scan asks the one its
        // table names), looked up only when cerebrod is asked.
        let socket = crate::daemon_client::server_socket;
        let scored = match &*backend.scorer(&model, socket)? {
            Scorer::Backend(native) => {
                let refs: Vec<ColumnRef<'_>> = columns.iter().map(ColumnData::as_ref).collect();
                in_backend::score(native, model.task, &refs, classes)?
            }
            Scorer::Daemon(_) => backend.through_daemon(&model, &columns, classes, &socket()?)?,
        };
        let (Some(&score), Some(&label)) = (scored.scores.first(), scored.labels.first()) else {
            return Err(CerebroError::Protocol("cerebrod scored no row".into()));
        };
        let label = (label != NO_LABEL).then(|| model.class_labels.get(label as usize).cloned()).flatten();
        let probabilities = match model.task {
            _ if !probabilities => None,
            Task::Multiclass if scored.probabilities.len() == classes as usize => Some(scored.probabilities),
            Task::Multiclass => return Err(CerebroError::Protocol("cerebrod gave no class probabilities".into())),
            Task::Binary => Some(vec![1.0 - score, score]),
            Task::Regression => None,
        };
        Ok(Some(Prediction { score, label, probabilities }))
    })
}

/// The model's features read from `input`'s columns of the same names, one
/// row per column; those the version's joins add, when `input` has none of
/// them, read through the joins (`through_joins`).
fn read_row(input: &AnyElement, model: &ModelVersion) -> Result<Vec<ColumnData>> {
    let row = Row::of(input)?;
    let missing: Vec<&Feature> = model.features.iter().filter(|f| row.column(&f.name).is_none()).collect();
    let (joined, lacking_key) =
        if missing.is_empty() { (Vec::new(), None) } else { through_joins(&row, model, &missing)? };
    model
        .features
        .iter()
        .map(|f| {
            if let Some((_, value)) = joined.iter().find(|(name, _)| name == &f.name) {
                return Ok(value.clone());
            }
            let Some(column) = row.column(&f.name) else {
                if let Some(key) = &lacking_key {
                    return Err(CerebroError::MissingJoinKey {
                        model: model.name.clone(),
                        version: model.version,
                        column: f.name.clone(),
                        key: key.clone(),
                        row_type: row.type_name(),
                    });
                }
                return Err(CerebroError::MissingFeature {
                    model: model.name.clone(),
                    version: model.version,
                    column: f.name.clone(),
                    row_type: row.type_name(),
                });
            };
            if f.kind == FeatureKind::Categorical {
                model.check_category_type(&f.name, row.types[column])?;
            }
            row.feature(column, f.kind)
        })
        .collect()
}

/// A feature read through the model's joins, by name.
type Joined = (String, ColumnData);

/// The `missing` features of a version from a `features joins(auto)`
/// selection, read for `row` through the joins it kept, as
/// `cerebro.predictions` reads another source of the training table's shape
/// (docs/sql.md, "Another source, through the model's joins"): when `row`
/// has the keys the joins those features come through start from and none
/// of the joined columns, and every missing feature is one the joins add. Empty otherwise, so that
/// the caller names the first missing column, with the key the joins
/// start from that `row` lacks, if that is why. The joined tables are read
/// as the caller, only if they run no code of a role without the caller's
/// rights, as the model's own source is.
fn through_joins(row: &Row, model: &ModelVersion, missing: &[&Feature]) -> Result<(Vec<Joined>, Option<String>)> {
    Spi::connect(|client| {
        let has = |c: &str| row.column(c).is_some();
        let Some(plan) = predictions::joins_to_read(client, model, &has)? else { return Ok((Vec::new(), None)) };
        // Only the joins this version's missing columns come through: the
        // others' keys (other candidates' joins) the row need not have.
        let names: Vec<&str> = missing.iter().map(|f| f.name.as_str()).collect();
        let plan = plan.reading(&names);
        let mut keys: Vec<&str> = Vec::new();
        for key in plan.kept.iter().filter(|j| j.hop <= 1).flat_map(|j| j.on.iter()) {
            if !keys.contains(&key.as_str()) {
                keys.push(key);
            }
        }
        let mut args = Vec::with_capacity(keys.len());
        let mut types = Vec::with_capacity(keys.len());
        let mut columns = Vec::with_capacity(keys.len());
        for (i, key) in keys.iter().enumerate() {
            let Some(c) = row.column(key) else { return Ok((Vec::new(), Some(key.to_string()))) };
            // SAFETY: the datum is of the row's column type, whose base type
            // it is passed as; it lives as long as the row.
            args.push(if row.nulls[c] {
                DatumWithOid::null_oid(row.types[c])
            } else {
                unsafe { DatumWithOid::new(row.values[c], row.types[c]) }
            });
            types.push(PgOid::from(row.types[c]));
            columns.push(format!("${} AS {}", i + 1, quote_ident(key)));
        }
        let Some(query) = plan.query_over(&format!("(SELECT {})", columns.join(", "))) else {
            return Ok((Vec::new(), None));
        };
        predictions::check_joined_tables(client, model, &plan)?;
        // One row: the joins are LEFT JOINs on keys their tables hold once.
        let read = missing.iter().map(|f| format!("q.{}", quote_ident(&f.name))).collect::<Vec<_>>().join(", ");
        let sql = format!("SELECT ROW({read}) FROM {query} q");
        let found = plans::select_built(client, &sql, &types, Some(1), &args)?;
        let Some(values) = found.first().get::<AnyElement>(1)? else { return Ok((Vec::new(), None)) };
        let values = Row::of(&values)?;
        let read = missing.iter().enumerate().map(|(i, f)| Ok((f.name.clone(), values.feature(i, f.kind)?)));
        Ok((read.collect::<Result<_>>()?, None))
    })
}

/// A composite value's columns, deformed once.
struct Row {
    type_oid: pg_sys::Oid,
    names: Vec<String>,
    /// Each column's base type (through domains).
    types: Vec<pg_sys::Oid>,
    values: Vec<pg_sys::Datum>,
    nulls: Vec<bool>,
}

impl Row {
    fn of(input: &AnyElement) -> Result<Row> {
        // SAFETY: get_typtype reads the syscache; a composite datum (typtype
        // 'c', or a record) is a HeapTupleHeader, deformed with the row
        // type's own descriptor, released before returning.
        unsafe {
            let oid = input.oid();
            let base = pg_sys::getBaseType(oid);
            if base != pg_sys::RECORDOID && pg_sys::get_typtype(base) != pg_sys::TYPTYPE_COMPOSITE as std::ffi::c_char {
                return Err(CerebroError::NotARow(type_name(oid)));
            }
            let header = pg_sys::pg_detoast_datum(input.datum().cast_mut_ptr()) as pg_sys::HeapTupleHeader;
            let type_oid = pgrx::heap_tuple_header_get_type_id(header);
            let typmod = pgrx::heap_tuple_header_get_typmod(header);
            let desc = pg_sys::lookup_rowtype_tupdesc(type_oid, typmod);
            let natts = (*desc).natts as usize;
            let mut tuple: pg_sys::HeapTupleData = std::mem::zeroed();
            tuple.t_len = pgrx::heap_tuple_header_get_datum_length(header) as u32;
            tuple.t_data = header;
            let mut values = vec![pg_sys::Datum::from(0); natts];
            let mut nulls = vec![true; natts];
            pg_sys::heap_deform_tuple(&mut tuple, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
            let mut names = Vec::with_capacity(natts);
            let mut types = Vec::with_capacity(natts);
            for i in 0..natts {
                let att = (*desc).attrs.as_slice(natts)[i];
                // A dropped column keeps its place in the row, with no name
                // a feature has and no type (atttypid 0, which no cache
                // lookup finds).
                if att.attisdropped {
                    names.push(String::new());
                    types.push(pg_sys::InvalidOid);
                } else {
                    names.push(std::ffi::CStr::from_ptr(att.attname.data.as_ptr()).to_string_lossy().into_owned());
                    types.push(pg_sys::getBaseType(att.atttypid));
                }
            }
            // ReleaseTupleDesc: only a reference-counted descriptor was pinned.
            if (*desc).tdrefcount >= 0 {
                pg_sys::DecrTupleDescRefCount(desc);
            }
            Ok(Row { type_oid, names, types, values, nulls })
        }
    }

    fn column(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// Column `i` as a feature of `kind`, one row.
    fn feature(&self, i: usize, kind: FeatureKind) -> Result<ColumnData> {
        Ok(match kind {
            FeatureKind::Numeric => ColumnData::Float64(vec![self.number(i)?]),
            FeatureKind::Categorical => ColumnData::Text(vec![self.text(i)]),
        })
    }

    fn type_name(&self) -> String {
        type_name(self.type_oid)
    }

    /// A numeric feature: a column of an integer, floating-point or numeric
    /// type, read as `cerebro.predictions` reads it.
    fn number(&self, i: usize) -> Result<Option<f64>> {
        if self.nulls[i] {
            return Ok(None);
        }
        // SAFETY: the datum is of the row's type for this column.
        unsafe { crate::fetch::number_of(self.types[i], self.values[i]) }.ok_or_else(|| CerebroError::FeatureType {
            column: self.names[i].clone(),
            type_name: type_name(self.types[i]),
            expected: "a number (smallint, integer, bigint, real, double precision or numeric)",
        })
    }

    /// A categorical feature as the snapshot and `cerebro.predictions` read
    /// it: the column cast to text (a boolean as true/false, a character(n)
    /// without its padding), else the type's output function.
    fn text(&self, i: usize) -> Option<String> {
        if self.nulls[i] {
            return None;
        }
        let datum = self.values[i];
        // SAFETY: the datum is of the row's type for this column; the output
        // function returns a palloc'd NUL-terminated string.
        unsafe {
            match self.types[i] {
                pg_sys::BOOLOID => bool::from_datum(datum, false).map(|b| b.to_string()),
                oid => {
                    let mut output = pg_sys::InvalidOid;
                    let mut varlena = false;
                    pg_sys::getTypeOutputInfo(oid, &mut output, &mut varlena);
                    let text = pg_sys::OidOutputFunctionCall(output, datum);
                    let bytes = std::ffi::CStr::from_ptr(text).to_bytes();
                    // In cerebrod's encoding, as cerebro.predictions sends it.
                    let text = if crate::fetch::text_needs_utf8() {
                        let (utf8, converted) = crate::fetch::text_to_utf8(bytes);
                        let owned = String::from_utf8_lossy(utf8).into_owned();
                        if let Some(converted) = converted {
                            pg_sys::pfree(converted.cast());
                        }
                        owned
                    } else {
                        String::from_utf8_lossy(bytes).into_owned()
                    };
                    Some(if oid == pg_sys::BPCHAROID { text.trim_end_matches(' ').to_owned() } else { text })
                }
            }
        }
    }
}

pub(crate) fn type_name(oid: pg_sys::Oid) -> String {
    // SAFETY: format_type_be returns a palloc'd string for any type oid.
    unsafe { std::ffi::CStr::from_ptr(pg_sys::format_type_be(oid)).to_string_lossy().into_owned() }
}

#[pg_extern(sql = false)]
fn predict(model: Option<&str>, input: Option<AnyElement>, version: Option<i32>) -> Option<f64> {
    predict_row(model, input, version, false).unwrap_or_else(|e| raise(e)).map(|p| p.score)
}

#[pg_extern(sql = false)]
fn predict_label(model: Option<&str>, input: Option<AnyElement>, version: Option<i32>) -> Option<String> {
    predict_row(model, input, version, false).unwrap_or_else(|e| raise(e)).and_then(|p| p.label)
}

#[pg_extern(sql = false)]
fn predict_proba(model: Option<&str>, input: Option<AnyElement>, version: Option<i32>) -> Option<Vec<f64>> {
    predict_row(model, input, version, true).unwrap_or_else(|e| raise(e)).and_then(|p| p.probabilities)
}
