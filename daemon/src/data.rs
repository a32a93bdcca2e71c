//! Reading rows out of PostgreSQL with COPY BINARY into column batches.

use cerebro_shared::batch::ColumnData;
use cerebro_shared::spec::{FeatureKind, Task};
use futures_util::{pin_mut, TryStreamExt};
use sha2::{Digest, Sha256};
use tokio_postgres::binary_copy::BinaryCopyOutStream;
use tokio_postgres::types::Type;
use tokio_postgres::Client;

use cerebro_shared::sql::quote_ident;

use crate::catalog::{JobSpec, Result};

/// The SQL type a column is read as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadAs {
    Float64,
    Text,
}

impl ReadAs {
    fn cast(self) -> &'static str {
        match self {
            ReadAs::Float64 => "float8",
            ReadAs::Text => "text",
        }
    }

    pub fn for_feature(kind: FeatureKind) -> ReadAs {
        match kind {
            FeatureKind::Numeric => ReadAs::Float64,
            FeatureKind::Categorical => ReadAs::Text,
        }
    }
}

/// Columns read, plus a sha256 over every value in order: the fingerprint of
/// exactly the rows that were read.
pub struct Table {
    pub columns: Vec<ColumnData>,
    pub fingerprint: String,
}

/// `SELECT col::type, ... FROM relation [ORDER BY order_by]` as a COPY BINARY stream.
pub async fn copy_columns(
    client: &Client,
    relation: &str,
    columns: &[(String, ReadAs)],
    order_by: Option<&str>,
) -> Result<Table> {
    let select: Vec<String> = columns.iter().map(|(c, t)| format!("{}::{}", quote_ident(c), t.cast())).collect();
    let order = order_by.map_or(String::new(), |k| format!(" ORDER BY {}", quote_ident(k)));
    let sql = format!("COPY (SELECT {} FROM {relation}{order}) TO STDOUT (FORMAT binary)", select.join(", "));
    let types: Vec<Type> = columns
        .iter()
        .map(|(_, t)| match t {
            ReadAs::Float64 => Type::FLOAT8,
            ReadAs::Text => Type::TEXT,
        })
        .collect();
    let stream = BinaryCopyOutStream::new(client.copy_out(&sql).await?, &types);
    pin_mut!(stream);
    let mut out: Vec<ColumnData> = columns
        .iter()
        .map(|(_, t)| match t {
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
    Ok(Table { columns: out, fingerprint: hex(&hash.finalize()) })
}

/// Reads a job's snapshot: its features in plan order, then the target; in
/// key order when the model has a key, so that the same rows give the same
/// seeded split, the same model and the same fingerprint whatever order the
/// snapshot's heap holds them in.
pub async fn read_snapshot(client: &Client, job: &JobSpec) -> Result<Table> {
    let mut columns: Vec<(String, ReadAs)> =
        job.plan.features.iter().map(|f| (f.name.clone(), ReadAs::for_feature(f.kind))).collect();
    let target = if job.plan.task == Task::Regression { ReadAs::Float64 } else { ReadAs::Text };
    columns.push((job.plan.target.clone(), target));
    copy_columns(client, &job.data_relation, &columns, job.key_column.as_deref()).await
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}
