//! Reading rows out of PostgreSQL with COPY BINARY into column batches.

use cerebro_shared::batch::ColumnData;
use cerebro_shared::spec::{FeatureKind, SqlKind, Task};
use cerebro_shared::sql::{as_float8, as_text, quote_ident};
use futures_util::{pin_mut, TryStreamExt};
use sha2::{Digest, Sha256};
use tokio_postgres::binary_copy::BinaryCopyOutStream;
use tokio_postgres::types::Type;
use tokio_postgres::Client;

use crate::catalog::{CatalogError, JobSpec, Result};

/// The SQL type a column is read as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadAs {
    Float64,
    Text,
}

impl ReadAs {
    pub fn for_feature(kind: FeatureKind) -> ReadAs {
        match kind {
            FeatureKind::Numeric => ReadAs::Float64,
            FeatureKind::Categorical => ReadAs::Text,
        }
    }
}

/// One column of a read: its name in the relation, the type it is read as
/// and, when its base type is an enum, that enum (schema-qualified and
/// quoted), read through the enum's output function rather than a cast.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadColumn {
    pub name: String,
    pub read_as: ReadAs,
    pub enum_type: Option<String>,
}

impl ReadColumn {
    /// A column of a built-in type (every column of a snapshot).
    pub fn builtin(name: impl Into<String>, read_as: ReadAs) -> ReadColumn {
        ReadColumn { name: name.into(), read_as, enum_type: None }
    }

    /// The select-list expression: only pg_catalog's conversions, so no cast,
    /// function or operator a user wrote runs in the daemon's session.
    fn expr(&self) -> String {
        let column = quote_ident(&self.name);
        match self.read_as {
            ReadAs::Float64 => as_float8(&column),
            ReadAs::Text => as_text(&column, self.enum_type.as_deref()),
        }
    }
}

/// The last OID of objects made by initdb (FirstNormalObjectId): types
/// below it are built in, so neither they nor casts between them belong to
/// any user.
const FIRST_NORMAL_OID: u32 = 16384;

/// A user's relation as `cerebrod score` reads it: its schema-qualified name
/// and the base type (domains resolved) of each of its columns.
#[derive(Debug, Clone)]
pub struct UserRelation {
    pub qualified: String,
    columns: Vec<RelationColumn>,
}

/// One column of a [`UserRelation`], its domains resolved.
#[derive(Debug, Clone)]
struct RelationColumn {
    name: String,
    /// The base type's OID.
    oid: u32,
    /// The base type schema-qualified and quoted, when it is an enum.
    enum_type: Option<String>,
    /// What the base type is to a model (`SqlKind::classify`): numbers are
    /// read as numbers only from a number type.
    kind: Option<SqlKind>,
}

impl UserRelation {
    /// Looks `name` up as a relation name (never a query: the daemon runs no
    /// SQL a user wrote). An unqualified name is looked up in the session's
    /// search_path as it was before cerebrod pinned it (the role's or the
    /// database's), as psql would.
    pub async fn resolve(client: &mut Client, name: &str) -> Result<UserRelation> {
        if name.trim_start().starts_with('(') {
            return Err(CatalogError::Unreadable(format!(
                "{name} is a query; cerebrod score reads relations only (name one with --source)"
            )));
        }
        // Only the name lookup runs under the caller's search_path: a
        // relation is all it can find there.
        let tx = client.transaction().await?;
        tx.execute(
            "SELECT pg_catalog.set_config('search_path', s.reset_val, true) FROM pg_catalog.pg_settings s
             WHERE s.name = 'search_path'",
            &[],
        )
        .await?;
        let oid: Option<u32> =
            tx.query_one("SELECT pg_catalog.to_regclass($1)::pg_catalog.oid", &[&name]).await?.get(0);
        tx.commit().await?;
        let oid = oid.ok_or_else(|| CatalogError::NotFound(format!("relation \"{name}\" does not exist")))?;
        let qualified: String = client
            .query_one(
                "SELECT pg_catalog.format('%I.%I', n.nspname, c.relname)
                 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                 WHERE c.oid = $1",
                &[&oid],
            )
            .await?
            .get(0);
        // Domains over domains are followed down to the base type.
        let rows = client
            .query(
                "WITH RECURSIVE base (attnum, name, type) AS (
                     SELECT a.attnum, a.attname::pg_catalog.text, a.atttypid FROM pg_catalog.pg_attribute a
                     WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
                     UNION ALL
                     SELECT b.attnum, b.name, t.typbasetype
                     FROM base b JOIN pg_catalog.pg_type t ON t.oid = b.type WHERE t.typtype = 'd')
                 SELECT b.name, t.oid, CASE WHEN t.typtype = 'e'
                        THEN pg_catalog.format('%I.%I', n.nspname, t.typname) END,
                        t.typcategory::pg_catalog.text, t.typname::pg_catalog.text
                 FROM base b JOIN pg_catalog.pg_type t ON t.oid = b.type
                 JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
                 WHERE t.typtype <> 'd'
                 ORDER BY b.attnum",
                &[&oid],
            )
            .await?;
        let columns = rows
            .iter()
            .map(|r| {
                let (category, type_name): (String, String) = (r.get(3), r.get(4));
                RelationColumn {
                    name: r.get(0),
                    oid: r.get(1),
                    enum_type: r.get(2),
                    kind: SqlKind::classify(category.chars().next().unwrap_or_default(), &type_name),
                }
            })
            .collect();
        Ok(UserRelation { qualified, columns })
    }

    /// How to read `column` as `read_as` without running a user's code: a
    /// built-in type through pg_catalog's casts, an enum to text through its
    /// output function; anything else is refused.
    pub fn read(&self, column: &str, read_as: ReadAs) -> Result<ReadColumn> {
        let Some(RelationColumn { name, oid, enum_type, kind }) = self.columns.iter().find(|c| c.name == column) else {
            return Err(CatalogError::NotFound(format!("relation {} has no column {column}", self.qualified)));
        };
        match (read_as, enum_type) {
            (ReadAs::Text, Some(e)) => Ok(ReadColumn { name: name.clone(), read_as, enum_type: Some(e.clone()) }),
            (ReadAs::Float64, None)
                if *oid < FIRST_NORMAL_OID && !matches!(kind, Some(SqlKind::Integer | SqlKind::Real)) =>
            {
                Err(CatalogError::Unreadable(format!(
                    "column {column} of {} is not a number; the model reads it as one (cast it in a view)",
                    self.qualified
                )))
            }
            (_, None) if *oid < FIRST_NORMAL_OID => Ok(ReadColumn::builtin(name.clone(), read_as)),
            _ => Err(CatalogError::Unreadable(format!(
                "column {column} of {} has a type that is not built in; cerebrod score reads it only as {}",
                self.qualified,
                if enum_type.is_some() { "text (an enum)" } else { "nothing (its conversions are its owner's code)" }
            ))),
        }
    }
}

/// Columns read, plus a sha256 over every value in order: the fingerprint of
/// exactly the rows that were read.
#[derive(Debug, Clone)]
pub struct Table {
    pub columns: Vec<ColumnData>,
    pub fingerprint: String,
}

/// `SELECT <column as type>, ... FROM relation [ORDER BY order_by]` as a
/// COPY BINARY stream. `relation` is already quoted and qualified.
pub async fn copy_columns(
    client: &Client,
    relation: &str,
    columns: &[ReadColumn],
    order_by: Option<&str>,
) -> Result<Table> {
    let select: Vec<String> = columns.iter().map(ReadColumn::expr).collect();
    let order = order_by.map_or(String::new(), |k| format!(" ORDER BY {}", quote_ident(k)));
    let sql = format!("COPY (SELECT {} FROM {relation}{order}) TO STDOUT (FORMAT binary)", select.join(", "));
    let types: Vec<Type> = columns
        .iter()
        .map(|c| match c.read_as {
            ReadAs::Float64 => Type::FLOAT8,
            ReadAs::Text => Type::TEXT,
        })
        .collect();
    let stream = BinaryCopyOutStream::new(client.copy_out(&sql).await?, &types);
    pin_mut!(stream);
    let mut out: Vec<ColumnData> = columns
        .iter()
        .map(|c| match c.read_as {
            ReadAs::Float64 => ColumnData::Float64(Vec::new()),
            ReadAs::Text => ColumnData::Text(Vec::new()),
        })
        .collect();
    let mut hash = Sha256::new();
    while let Some(row) = stream.try_next().await? {
        for (i, col) in out.iter_mut().enumerate() {
            match col {
                ColumnData::Float64(v) => {
                    let x: Option<f64> = row.try_get(i)?;
                    match x {
                        Some(x) => {
                            hash.update([1]);
                            hash.update(x.to_le_bytes());
                        }
                        None => hash.update([0]),
                    }
                    v.push(x);
                }
                ColumnData::Text(v) => {
                    let s: Option<String> = row.try_get(i)?;
                    match &s {
                        Some(s) => {
                            hash.update([2]);
                            hash.update((s.len() as u64).to_le_bytes());
                            hash.update(s.as_bytes());
                        }
                        None => hash.update([0]),
                    }
                    v.push(s);
                }
            }
        }
    }
    Ok(Table { columns: out, fingerprint: crate::digest::hex(&hash.finalize()) })
}

/// Reads a job's snapshot: its features in plan order, then the target; in
/// key order when the model has a key, so that the same rows give the same
/// seeded split, the same model and the same fingerprint whatever order the
/// snapshot's heap holds them in. Snapshot columns are built-in types under
/// neutral names (`JobSpec::snapshot_columns`).
pub async fn read_snapshot(client: &Client, job: &JobSpec) -> Result<Table> {
    copy_columns(client, &job.data_relation, &snapshot_read(job), job.snapshot_columns.key.as_deref()).await
}

/// The columns [`read_snapshot`] reads for `job`: its features, then its
/// target (a number for a regression, else text).
pub fn snapshot_read(job: &JobSpec) -> Vec<ReadColumn> {
    let names = &job.snapshot_columns;
    let mut columns: Vec<ReadColumn> = job
        .plan
        .features
        .iter()
        .zip(&names.features)
        .map(|(f, name)| ReadColumn::builtin(name.clone(), ReadAs::for_feature(f.kind)))
        .collect();
    let target = if job.plan.task == Task::Regression { ReadAs::Float64 } else { ReadAs::Text };
    columns.push(ReadColumn::builtin(names.target.clone(), target));
    columns
}
