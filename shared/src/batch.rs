//! Column-major layout of one scoring batch inside a shared-memory region.
//!
//! The backend writes the feature columns of up to a few thousand rows into a
//! region it shares with cerebrod; the request names where each column lies
//! ([`BatchLayout`]); the daemon scores them and writes one score and one label
//! index per row into the output spans of the same region.
//!
//! - a `Float64` column: `rows` little-endian f64 values, then a validity bitmap;
//! - a `Text` column: `rows + 1` little-endian u32 offsets into a UTF-8 byte
//!   span, then a validity bitmap;
//! - validity bitmaps: bit `i % 8` of byte `i / 8` set means row `i` is not NULL.
//!
//! Every span starts on an 8-byte boundary. The reader copies out of the region
//! and checks every span against the region's length, because the region is
//! shared with another process and its layout comes off the wire; no two
//! spans may overlap, so what a read allocates is bounded by the region's
//! size (a few times it), however many columns a layout lists.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// Rows in one batch are capped so a broken request cannot ask for absurd sizes.
pub const MAX_BATCH_ROWS: u32 = 1 << 20;

/// Class probabilities a row may ask for, capped likewise.
pub const MAX_CLASSES: u32 = 1 << 16;

/// Columns a row's explanation may cover, capped likewise.
pub const MAX_EXPLAINED: u32 = 1 << 16;

/// The label index written for rows that have no label (regression models).
pub const NO_LABEL: u32 = u32::MAX;

/// On the wire `[offset, len]`: a layout names a few spans per column, and
/// one request per scored row must decode in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "[u64; 2]", into = "[u64; 2]")]
pub struct Span {
    pub offset: u64,
    pub len: u64,
}

impl From<[u64; 2]> for Span {
    fn from([offset, len]: [u64; 2]) -> Span {
        Span { offset, len }
    }
}

impl From<Span> for [u64; 2] {
    fn from(span: Span) -> [u64; 2] {
        [span.offset, span.len]
    }
}

impl Span {
    fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}

/// Externally tagged (`{"float64": {...}}`): an internally tagged enum is
/// buffered whole before it is read, which cost more than scoring one row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColumnLayout {
    Float64 { values: Span, validity: Span },
    Text { offsets: Span, data: Span, validity: Span },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputLayout {
    /// `rows` f64: the probability of the positive class (binary), of the
    /// predicted class (multiclass), or the predicted value (regression).
    pub scores: Span,
    /// `rows` u32: index into the model's class labels, or [`NO_LABEL`].
    pub labels: Span,
    /// How many class probabilities each row gets in `probabilities`: the
    /// model's classes when the backend asks for them (multiclass), else 0.
    pub classes: u32,
    /// `rows × classes` f64, row by row: each class's probability, in the
    /// order of the model's class labels.
    pub probabilities: Span,
    /// How many columns each row's explanation covers in `explanations`:
    /// the model's features when the backend asks for explanations, else 0.
    #[serde(default)]
    pub explained: u32,
    /// `rows × (1 + explained)` f64, row by row: the baseline row's score
    /// of the output explained, then each feature's contribution to the
    /// row's score (integrated gradients), in the model's feature order.
    #[serde(default)]
    pub explanations: Span,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchLayout {
    pub rows: u32,
    pub columns: Vec<ColumnLayout>,
    pub output: OutputLayout,
}

impl BatchLayout {
    /// Bytes of region the batch needs, inputs and outputs together.
    pub fn required_len(&self) -> u64 {
        let output = &self.output;
        let mut end = output.scores.end().max(output.labels.end()).max(output.probabilities.end());
        end = end.max(output.explanations.end());
        for c in &self.columns {
            end = end.max(match c {
                ColumnLayout::Float64 { validity, .. } => validity.end(),
                ColumnLayout::Text { validity, .. } => validity.end(),
            });
        }
        end
    }
}

/// One column's values, as the backend collects them and the daemon reads them.
#[derive(Debug, Clone, PartialEq)]
pub enum ColumnData {
    Float64(Vec<Option<f64>>),
    Text(Vec<Option<String>>),
}

impl ColumnData {
    pub fn len(&self) -> usize {
        match self {
            ColumnData::Float64(v) => v.len(),
            ColumnData::Text(v) => v.len(),
        }
    }

    /// The values of `rows`, in that order.
    pub fn take(&self, rows: &[usize]) -> ColumnData {
        match self {
            ColumnData::Float64(v) => ColumnData::Float64(rows.iter().map(|&r| v[r]).collect()),
            ColumnData::Text(v) => ColumnData::Text(rows.iter().map(|&r| v[r].clone()).collect()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What the column holds, for error messages.
    pub fn kind_name(&self) -> &'static str {
        match self {
            ColumnData::Float64(_) => "numbers",
            ColumnData::Text(_) => "text",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LayoutError {
    #[error("batch of {0} rows exceeds the limit of {MAX_BATCH_ROWS}")]
    TooManyRows(u32),
    #[error("span {what} ({offset}+{len}) lies outside the {region}-byte region")]
    OutOfRegion { what: &'static str, offset: u64, len: u64, region: u64 },
    #[error("span {what} has {len} bytes where {expected} are needed for {rows} rows")]
    WrongLength { what: &'static str, len: u64, expected: u64, rows: u32 },
    #[error("text column {column} has offsets that are not increasing or exceed its data")]
    BadOffsets { column: usize },
    #[error("text column {column} holds invalid UTF-8")]
    BadUtf8 { column: usize },
    #[error("columns hold {found} rows, the batch says {rows}")]
    RowMismatch { found: usize, rows: u32 },
    #[error("{0} outputs given for a batch of {1} rows")]
    OutputMismatch(usize, u32),
    #[error("span {what} ({offset}+{len}) overlaps another span of the batch")]
    Overlap { what: &'static str, offset: u64, len: u64 },
    #[error("{found} columns given for a layout of {expected}")]
    ColumnCount { found: usize, expected: usize },
    #[error("column {column} is laid out as another kind of column")]
    KindMismatch { column: usize },
    #[error("text column {column} holds {bytes} bytes, more than its u32 offsets can address")]
    TextTooLarge { column: usize, bytes: u64 },
    #[error("{0} class probabilities per row exceed the limit of {MAX_CLASSES}")]
    TooManyClasses(u32),
    #[error("{found} probabilities given for {rows} rows of {classes} classes")]
    ProbabilityMismatch { found: usize, rows: u32, classes: u32 },
    #[error("explanations of {0} columns per row exceed the limit of {MAX_EXPLAINED}")]
    TooManyExplained(u32),
    #[error("{found} explanation values given for {rows} rows of {explained} columns (and a baseline each)")]
    ExplanationMismatch { found: usize, rows: u32, explained: u32 },
}

fn align8(x: u64) -> u64 {
    x.div_ceil(8) * 8
}

fn bitmap_len(rows: u32) -> u64 {
    (rows as u64).div_ceil(8)
}

struct Cursor(u64);

impl Cursor {
    fn take(&mut self, len: u64) -> Span {
        let span = Span { offset: self.0, len };
        self.0 = align8(self.0 + len);
        span
    }
}

/// One column in the region's own encoding, built row by row: writing it
/// into a region is a copy per span. The backend's scan appends to these
/// straight from PostgreSQL's datums, one allocation per column per batch
/// rather than one per value.
#[derive(Debug, Clone, PartialEq)]
pub enum PackedColumn {
    Float64 { values: Vec<f64>, validity: Vec<u8> },
    Text { offsets: Vec<u32>, data: Vec<u8>, validity: Vec<u8> },
}

fn push_valid(validity: &mut Vec<u8>, row: usize, valid: bool) {
    if row.is_multiple_of(8) {
        validity.push(0);
    }
    if valid {
        *validity.last_mut().expect("pushed above") |= 1 << (row % 8);
    }
}

impl PackedColumn {
    pub fn float64(capacity: usize) -> PackedColumn {
        PackedColumn::Float64 { values: Vec::with_capacity(capacity), validity: Vec::with_capacity(capacity / 8 + 1) }
    }

    pub fn text(capacity: usize) -> PackedColumn {
        let mut offsets = Vec::with_capacity(capacity + 1);
        offsets.push(0);
        PackedColumn::Text { offsets, data: Vec::new(), validity: Vec::with_capacity(capacity / 8 + 1) }
    }

    pub fn len(&self) -> usize {
        match self {
            PackedColumn::Float64 { values, .. } => values.len(),
            PackedColumn::Text { offsets, .. } => offsets.len() - 1,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Row `row`'s bytes in a text column; `None` for NULL, for a number
    /// column, or past the end.
    pub fn text_at(&self, row: usize) -> Option<&[u8]> {
        match self {
            PackedColumn::Text { offsets, data, validity } if row + 1 < offsets.len() && is_valid(validity, row) => {
                Some(&data[offsets[row] as usize..offsets[row + 1] as usize])
            }
            _ => None,
        }
    }

    /// Row `row`'s number in a number column; `None` for NULL, for a text
    /// column, or past the end.
    pub fn f64_at(&self, row: usize) -> Option<f64> {
        match self {
            PackedColumn::Float64 { values, validity } if row < values.len() && is_valid(validity, row) => {
                Some(values[row])
            }
            _ => None,
        }
    }

    /// The column as a [`ColumnRef`]: numbers copied out (NULL as `None`),
    /// text borrowed.
    pub fn as_ref(&self) -> ColumnRef<'_> {
        let rows = 0..self.len();
        match self {
            PackedColumn::Float64 { .. } => ColumnRef::Float64(Cow::Owned(rows.map(|r| self.f64_at(r)).collect())),
            PackedColumn::Text { .. } => ColumnRef::Text(rows.map(|r| self.text_at(r)).collect()),
        }
    }

    /// Empties the column, keeping its allocations for the next batch.
    pub fn clear(&mut self) {
        match self {
            PackedColumn::Float64 { values, validity } => {
                values.clear();
                validity.clear();
            }
            PackedColumn::Text { offsets, data, validity } => {
                offsets.truncate(1);
                data.clear();
                validity.clear();
            }
        }
    }

    /// Appends a NULL.
    pub fn push_null(&mut self) {
        match self {
            PackedColumn::Float64 { .. } => self.push_f64(None),
            PackedColumn::Text { .. } => self.push_text(None),
        }
    }

    /// Appends a number (NULL as `None`); a text column takes it as NULL.
    pub fn push_f64(&mut self, value: Option<f64>) {
        let row = self.len();
        match self {
            PackedColumn::Float64 { values, validity } => {
                values.push(value.unwrap_or(0.0));
                push_valid(validity, row, value.is_some());
            }
            PackedColumn::Text { .. } => self.push_text(None),
        }
    }

    /// Appends a text value's bytes (NULL as `None`); a number column takes
    /// it as NULL. Offsets past 4 GiB saturate: the write refuses the column
    /// (TextTooLarge) by its byte count.
    pub fn push_text(&mut self, value: Option<&[u8]>) {
        let row = self.len();
        match self {
            PackedColumn::Text { offsets, data, validity } => {
                if let Some(bytes) = value {
                    data.extend_from_slice(bytes);
                }
                offsets.push(u32::try_from(data.len()).unwrap_or(u32::MAX));
                push_valid(validity, row, value.is_some());
            }
            PackedColumn::Float64 { .. } => self.push_f64(None),
        }
    }
}

impl From<&ColumnData> for PackedColumn {
    fn from(column: &ColumnData) -> PackedColumn {
        match column {
            ColumnData::Float64(values) => {
                let mut packed = PackedColumn::float64(values.len());
                values.iter().for_each(|v| packed.push_f64(*v));
                packed
            }
            ColumnData::Text(values) => {
                let mut packed = PackedColumn::text(values.len());
                values.iter().for_each(|v| packed.push_text(v.as_deref().map(str::as_bytes)));
                packed
            }
        }
    }
}

/// Lays out `columns` (all of the same length) and the output spans from offset
/// 0; returns the layout and the region size it needs.
pub fn plan_batch(columns: &[ColumnData]) -> (BatchLayout, u64) {
    plan_packed(&columns.iter().map(PackedColumn::from).collect::<Vec<_>>(), 0)
}

/// [`plan_batch`] for columns already in the region's encoding, with room
/// for `classes` probabilities per row (0: none asked for).
pub fn plan_packed(columns: &[PackedColumn], classes: u32) -> (BatchLayout, u64) {
    plan_explained(columns, classes, 0)
}

/// [`plan_packed`] with room for explanations of `explained` columns per
/// row (0: none asked for).
pub fn plan_explained(columns: &[PackedColumn], classes: u32, explained: u32) -> (BatchLayout, u64) {
    // More rows than a u32 counts cannot be one batch: saturate, and
    // write_batch refuses the columns (TooManyRows), never a truncated count.
    let rows = u32::try_from(columns.first().map_or(0, |c| c.len())).unwrap_or(u32::MAX);
    let mut cur = Cursor(0);
    let mut layouts = Vec::with_capacity(columns.len());
    for col in columns {
        layouts.push(match col {
            PackedColumn::Float64 { .. } => {
                ColumnLayout::Float64 { values: cur.take(rows as u64 * 8), validity: cur.take(bitmap_len(rows)) }
            }
            PackedColumn::Text { data, .. } => ColumnLayout::Text {
                offsets: cur.take((rows as u64 + 1) * 4),
                data: cur.take(data.len() as u64),
                validity: cur.take(bitmap_len(rows)),
            },
        });
    }
    let output = OutputLayout {
        scores: cur.take(rows as u64 * 8),
        labels: cur.take(rows as u64 * 4),
        classes,
        probabilities: cur.take(rows as u64 * classes as u64 * 8),
        explained,
        explanations: cur.take(rows as u64 * explanation_width(explained) * 8),
    };
    let layout = BatchLayout { rows, columns: layouts, output };
    let len = layout.required_len();
    (layout, len)
}

fn slice_mut<'a>(region: &'a mut [u8], span: Span, what: &'static str) -> Result<&'a mut [u8], LayoutError> {
    check_span(region.len(), span, what)?;
    Ok(&mut region[span.offset as usize..span.end() as usize])
}

fn slice<'a>(region: &'a [u8], span: Span, what: &'static str) -> Result<&'a [u8], LayoutError> {
    check_span(region.len(), span, what)?;
    Ok(&region[span.offset as usize..span.end() as usize])
}

/// Every span of a layout, named, inputs and outputs.
fn spans(layout: &BatchLayout) -> Vec<(Span, &'static str)> {
    let mut all = Vec::with_capacity(layout.columns.len() * 3 + 2);
    for c in &layout.columns {
        match c {
            ColumnLayout::Float64 { values, validity } => all.extend([(*values, "values"), (*validity, "validity")]),
            ColumnLayout::Text { offsets, data, validity } => {
                all.extend([(*offsets, "offsets"), (*data, "data"), (*validity, "validity")])
            }
        }
    }
    all.extend([
        (layout.output.scores, "scores"),
        (layout.output.labels, "labels"),
        (layout.output.probabilities, "probabilities"),
        (layout.output.explanations, "explanations"),
    ]);
    all
}

/// Values per row of `explanations`: a baseline score, then one per column.
fn explanation_width(explained: u32) -> u64 {
    if explained == 0 {
        0
    } else {
        1 + explained as u64
    }
}

/// Refuses a layout two of whose non-empty spans share a byte: a layout
/// from [`plan_batch`] never does, and a hostile one that named one span for
/// every column would make a small region read as gigabytes.
fn check_disjoint(layout: &BatchLayout) -> Result<(), LayoutError> {
    let mut all: Vec<(Span, &'static str)> = spans(layout).into_iter().filter(|(s, _)| s.len > 0).collect();
    all.sort_by_key(|(s, _)| (s.offset, s.len));
    for pair in all.windows(2) {
        let ((before, _), (span, what)) = (pair[0], pair[1]);
        if span.offset < before.end() {
            return Err(LayoutError::Overlap { what, offset: span.offset, len: span.len });
        }
    }
    Ok(())
}

fn check_span(region: usize, span: Span, what: &'static str) -> Result<(), LayoutError> {
    if span.offset.checked_add(span.len).is_none_or(|end| end > region as u64) {
        return Err(LayoutError::OutOfRegion { what, offset: span.offset, len: span.len, region: region as u64 });
    }
    Ok(())
}

fn expect_len(span: Span, expected: u64, rows: u32, what: &'static str) -> Result<(), LayoutError> {
    if span.len != expected {
        return Err(LayoutError::WrongLength { what, len: span.len, expected, rows });
    }
    Ok(())
}

fn is_valid(bitmap: &[u8], i: usize) -> bool {
    bitmap[i / 8] & (1 << (i % 8)) != 0
}

/// Writes `columns` into `region` where `layout` (from [`plan_batch`]) says.
/// Every span is checked against the columns and the region first: a
/// layout that does not fit them is an error, never a panic or a partial
/// write past a span.
pub fn write_batch(columns: &[ColumnData], layout: &BatchLayout, region: &mut [u8]) -> Result<(), LayoutError> {
    write_packed(&columns.iter().map(PackedColumn::from).collect::<Vec<_>>(), layout, region)
}

/// [`write_batch`] for columns already in the region's encoding.
pub fn write_packed(columns: &[PackedColumn], layout: &BatchLayout, region: &mut [u8]) -> Result<(), LayoutError> {
    let rows = layout.rows;
    if rows > MAX_BATCH_ROWS {
        return Err(LayoutError::TooManyRows(rows));
    }
    if columns.len() != layout.columns.len() {
        return Err(LayoutError::ColumnCount { found: columns.len(), expected: layout.columns.len() });
    }
    for (ci, (col, lay)) in columns.iter().zip(&layout.columns).enumerate() {
        if col.len() != rows as usize {
            return Err(LayoutError::RowMismatch { found: col.len(), rows });
        }
        match (col, lay) {
            (PackedColumn::Float64 { values, validity }, ColumnLayout::Float64 { values: vs, validity: vb }) => {
                expect_len(*vs, rows as u64 * 8, rows, "values")?;
                expect_len(*vb, bitmap_len(rows), rows, "validity")?;
                let out = slice_mut(region, *vs, "values")?;
                for (chunk, v) in out.chunks_exact_mut(8).zip(values) {
                    chunk.copy_from_slice(&v.to_le_bytes());
                }
                slice_mut(region, *vb, "validity")?.copy_from_slice(validity);
            }
            (
                PackedColumn::Text { offsets, data, validity },
                ColumnLayout::Text { offsets: os, data: ds, validity: vb },
            ) => {
                if data.len() as u64 > u64::from(u32::MAX) {
                    return Err(LayoutError::TextTooLarge { column: ci, bytes: data.len() as u64 });
                }
                expect_len(*os, (rows as u64 + 1) * 4, rows, "offsets")?;
                expect_len(*ds, data.len() as u64, rows, "data")?;
                expect_len(*vb, bitmap_len(rows), rows, "validity")?;
                slice_mut(region, *ds, "data")?.copy_from_slice(data);
                let out = slice_mut(region, *os, "offsets")?;
                for (chunk, o) in out.chunks_exact_mut(4).zip(offsets) {
                    chunk.copy_from_slice(&o.to_le_bytes());
                }
                slice_mut(region, *vb, "validity")?.copy_from_slice(validity);
            }
            _ => return Err(LayoutError::KindMismatch { column: ci }),
        }
    }
    Ok(())
}

/// One column of a batch as it lies in the region: numbers copied out,
/// text borrowed where it lies, as bytes, so that scoring a batch allocates
/// nothing per value. A category is looked up by its bytes; bytes that are
/// not UTF-8 are no category a model knows.
#[derive(Debug, Clone, PartialEq)]
pub enum ColumnRef<'a> {
    /// Borrowed from a [`ColumnData`]; decoded from the region's bytes.
    Float64(Cow<'a, [Option<f64>]>),
    Text(Vec<Option<&'a [u8]>>),
}

impl ColumnRef<'_> {
    pub fn len(&self) -> usize {
        match self {
            ColumnRef::Float64(v) => v.len(),
            ColumnRef::Text(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What the column holds, for error messages.
    pub fn kind_name(&self) -> &'static str {
        match self {
            ColumnRef::Float64(_) => "numbers",
            ColumnRef::Text(_) => "text",
        }
    }
}

impl ColumnData {
    /// The column as a [`ColumnRef`], borrowed.
    pub fn as_ref(&self) -> ColumnRef<'_> {
        match self {
            ColumnData::Float64(v) => ColumnRef::Float64(Cow::Borrowed(v)),
            ColumnData::Text(v) => ColumnRef::Text(v.iter().map(|s| s.as_deref().map(str::as_bytes)).collect()),
        }
    }
}

/// Copies the batch's columns out of `region`, checking every span first
/// and that text is UTF-8.
pub fn read_batch(layout: &BatchLayout, region: &[u8]) -> Result<Vec<ColumnData>, LayoutError> {
    read_batch_ref(layout, region)?
        .into_iter()
        .enumerate()
        .map(|(column, c)| match c {
            ColumnRef::Float64(v) => Ok(ColumnData::Float64(v.into_owned())),
            ColumnRef::Text(v) => v
                .into_iter()
                .map(|s| {
                    s.map(|b| String::from_utf8(b.to_vec()).map_err(|_| LayoutError::BadUtf8 { column })).transpose()
                })
                .collect::<Result<_, _>>()
                .map(ColumnData::Text),
        })
        .collect()
}

/// [`read_batch`] with the text left in the region, borrowed as bytes.
pub fn read_batch_ref<'a>(layout: &BatchLayout, region: &'a [u8]) -> Result<Vec<ColumnRef<'a>>, LayoutError> {
    let rows = layout.rows;
    if rows > MAX_BATCH_ROWS {
        return Err(LayoutError::TooManyRows(rows));
    }
    check_disjoint(layout)?;
    let n = rows as usize;
    let mut out = Vec::with_capacity(layout.columns.len());
    for (ci, lay) in layout.columns.iter().enumerate() {
        match lay {
            ColumnLayout::Float64 { values, validity } => {
                expect_len(*values, rows as u64 * 8, rows, "values")?;
                expect_len(*validity, bitmap_len(rows), rows, "validity")?;
                let vals = slice(region, *values, "values")?;
                let bits = slice(region, *validity, "validity")?;
                let col = (0..n)
                    .map(|i| {
                        is_valid(bits, i)
                            .then(|| f64::from_le_bytes(vals[i * 8..i * 8 + 8].try_into().expect("8-byte chunk")))
                    })
                    .collect();
                out.push(ColumnRef::Float64(Cow::Owned(col)));
            }
            ColumnLayout::Text { offsets, data, validity } => {
                expect_len(*offsets, (rows as u64 + 1) * 4, rows, "offsets")?;
                expect_len(*validity, bitmap_len(rows), rows, "validity")?;
                let offs = slice(region, *offsets, "offsets")?;
                let bytes = slice(region, *data, "data")?;
                let bits = slice(region, *validity, "validity")?;
                let off =
                    |i: usize| u32::from_le_bytes(offs[i * 4..i * 4 + 4].try_into().expect("4-byte chunk")) as usize;
                let mut col = Vec::with_capacity(n);
                for i in 0..n {
                    let (start, end) = (off(i), off(i + 1));
                    if start > end || end > bytes.len() {
                        return Err(LayoutError::BadOffsets { column: ci });
                    }
                    col.push(is_valid(bits, i).then(|| &bytes[start..end]));
                }
                out.push(ColumnRef::Text(col));
            }
        }
    }
    Ok(out)
}

/// Daemon side: writes one score and one label index per row.
pub fn write_outputs(
    layout: &BatchLayout,
    region: &mut [u8],
    scores: &[f64],
    labels: &[u32],
) -> Result<(), LayoutError> {
    let rows = layout.rows;
    if rows > MAX_BATCH_ROWS {
        return Err(LayoutError::TooManyRows(rows));
    }
    if scores.len() != rows as usize || labels.len() != rows as usize {
        return Err(LayoutError::OutputMismatch(scores.len().min(labels.len()), rows));
    }
    expect_len(layout.output.scores, rows as u64 * 8, rows, "scores")?;
    expect_len(layout.output.labels, rows as u64 * 4, rows, "labels")?;
    let out = slice_mut(region, layout.output.scores, "scores")?;
    for (chunk, s) in out.chunks_exact_mut(8).zip(scores) {
        chunk.copy_from_slice(&s.to_le_bytes());
    }
    let out = slice_mut(region, layout.output.labels, "labels")?;
    for (chunk, l) in out.chunks_exact_mut(4).zip(labels) {
        chunk.copy_from_slice(&l.to_le_bytes());
    }
    Ok(())
}

/// Daemon side: writes each row's `classes` probabilities (row by row),
/// when the layout asks for them.
pub fn write_probabilities(layout: &BatchLayout, region: &mut [u8], probabilities: &[f64]) -> Result<(), LayoutError> {
    let (rows, classes) = (layout.rows, layout.output.classes);
    if rows > MAX_BATCH_ROWS {
        return Err(LayoutError::TooManyRows(rows));
    }
    if classes > MAX_CLASSES {
        return Err(LayoutError::TooManyClasses(classes));
    }
    let expected = rows as u64 * classes as u64;
    if probabilities.len() as u64 != expected {
        return Err(LayoutError::ProbabilityMismatch { found: probabilities.len(), rows, classes });
    }
    expect_len(layout.output.probabilities, expected * 8, rows, "probabilities")?;
    check_disjoint(layout)?;
    let out = slice_mut(region, layout.output.probabilities, "probabilities")?;
    for (chunk, p) in out.chunks_exact_mut(8).zip(probabilities) {
        chunk.copy_from_slice(&p.to_le_bytes());
    }
    Ok(())
}

/// Daemon side: writes each row's baseline score and `explained`
/// contributions (row by row), when the layout asks for them.
pub fn write_explanations(layout: &BatchLayout, region: &mut [u8], values: &[f64]) -> Result<(), LayoutError> {
    let expected = explanations_len(layout)?;
    if values.len() as u64 != expected {
        let (rows, explained) = (layout.rows, layout.output.explained);
        return Err(LayoutError::ExplanationMismatch { found: values.len(), rows, explained });
    }
    check_disjoint(layout)?;
    let out = slice_mut(region, layout.output.explanations, "explanations")?;
    for (chunk, v) in out.chunks_exact_mut(8).zip(values) {
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    Ok(())
}

/// Backend side: the explanations the daemon wrote, `1 + explained` per
/// row (empty when the layout asked for none).
pub fn read_explanations(layout: &BatchLayout, region: &[u8]) -> Result<Vec<f64>, LayoutError> {
    explanations_len(layout)?;
    Ok(slice(region, layout.output.explanations, "explanations")?
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().expect("8-byte chunk")))
        .collect())
}

/// Values the layout's explanations span holds, checked against its size.
fn explanations_len(layout: &BatchLayout) -> Result<u64, LayoutError> {
    let (rows, explained) = (layout.rows, layout.output.explained);
    if rows > MAX_BATCH_ROWS {
        return Err(LayoutError::TooManyRows(rows));
    }
    if explained > MAX_EXPLAINED {
        return Err(LayoutError::TooManyExplained(explained));
    }
    let values = rows as u64 * explanation_width(explained);
    expect_len(layout.output.explanations, values * 8, rows, "explanations")?;
    Ok(values)
}

/// Backend side: the probabilities the daemon wrote, `classes` per row
/// (empty when the layout asked for none).
pub fn read_probabilities(layout: &BatchLayout, region: &[u8]) -> Result<Vec<f64>, LayoutError> {
    let (rows, classes) = (layout.rows, layout.output.classes);
    if rows > MAX_BATCH_ROWS {
        return Err(LayoutError::TooManyRows(rows));
    }
    if classes > MAX_CLASSES {
        return Err(LayoutError::TooManyClasses(classes));
    }
    expect_len(layout.output.probabilities, rows as u64 * classes as u64 * 8, rows, "probabilities")?;
    Ok(slice(region, layout.output.probabilities, "probabilities")?
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().expect("8-byte chunk")))
        .collect())
}

/// Backend side: reads the scores and label indexes the daemon wrote.
pub fn read_outputs(layout: &BatchLayout, region: &[u8]) -> Result<(Vec<f64>, Vec<u32>), LayoutError> {
    let rows = layout.rows;
    if rows > MAX_BATCH_ROWS {
        return Err(LayoutError::TooManyRows(rows));
    }
    expect_len(layout.output.scores, rows as u64 * 8, rows, "scores")?;
    expect_len(layout.output.labels, rows as u64 * 4, rows, "labels")?;
    let scores = slice(region, layout.output.scores, "scores")?
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().expect("8-byte chunk")))
        .collect();
    let labels = slice(region, layout.output.labels, "labels")?
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4-byte chunk")))
        .collect();
    Ok((scores, labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<ColumnData> {
        vec![
            ColumnData::Float64(vec![Some(1.5), None, Some(-3.0)]),
            ColumnData::Text(vec![Some("DSL".into()), Some("".into()), None]),
            ColumnData::Text(vec![Some("Fibre optic ✓".into()), None, Some("No".into())]),
        ]
    }

    #[test]
    fn packed_columns_built_row_by_row_write_what_their_values_write() {
        let cols = sample();
        let mut packed = vec![PackedColumn::float64(3), PackedColumn::text(1), PackedColumn::text(0)];
        for row in 0..3 {
            for (p, c) in packed.iter_mut().zip(&cols) {
                match c {
                    ColumnData::Float64(v) => p.push_f64(v[row]),
                    ColumnData::Text(v) => p.push_text(v[row].as_deref().map(str::as_bytes)),
                }
            }
        }
        assert_eq!(packed, cols.iter().map(PackedColumn::from).collect::<Vec<_>>());
        assert_eq!(packed[2].text_at(0), Some("Fibre optic ✓".as_bytes()));
        assert_eq!((packed[2].text_at(1), packed[1].text_at(1), packed[0].text_at(0)), (None, Some(&b""[..]), None));
        assert_eq!(
            (packed[0].f64_at(0), packed[0].f64_at(1), packed[0].f64_at(3), packed[1].f64_at(0)),
            (Some(1.5), None, None, None)
        );
        let (layout, len) = plan_packed(&packed, 0);
        assert_eq!((layout.clone(), len), plan_batch(&cols));
        let mut region = vec![0xAAu8; len as usize];
        write_packed(&packed, &layout, &mut region).unwrap();
        assert_eq!(read_batch(&layout, &region).unwrap(), cols);
        let borrowed = read_batch_ref(&layout, &region).unwrap();
        assert_eq!(borrowed, cols.iter().map(ColumnData::as_ref).collect::<Vec<_>>());
        // Read in place, as the backend scores a batch itself.
        assert_eq!(packed.iter().map(PackedColumn::as_ref).collect::<Vec<_>>(), borrowed);
    }

    #[test]
    fn class_probabilities_have_their_own_span_and_are_counted() {
        let cols = sample();
        let packed: Vec<PackedColumn> = cols.iter().map(PackedColumn::from).collect();
        let (layout, len) = plan_packed(&packed, 2);
        assert_eq!((layout.output.classes, layout.output.probabilities.len), (2, 3 * 2 * 8));
        let mut region = vec![0u8; len as usize];
        write_packed(&packed, &layout, &mut region).unwrap();
        let probabilities = [0.25, 0.75, 1.0, 0.0, 0.5, 0.5];
        write_outputs(&layout, &mut region, &[0.75, 1.0, 0.5], &[1, 0, 1]).unwrap();
        write_probabilities(&layout, &mut region, &probabilities).unwrap();
        assert_eq!(read_probabilities(&layout, &region).unwrap(), probabilities);
        assert_eq!(read_batch(&layout, &region).unwrap(), cols, "the inputs are untouched");
        assert_eq!(
            write_probabilities(&layout, &mut region, &probabilities[..4]),
            Err(LayoutError::ProbabilityMismatch { found: 4, rows: 3, classes: 2 })
        );
        let (none, _) = plan_batch(&cols);
        assert_eq!(read_probabilities(&none, &region).unwrap(), Vec::<f64>::new());
        let mut hostile = layout.clone();
        hostile.output.probabilities = hostile.output.scores;
        hostile.output.probabilities.len = 48;
        assert!(matches!(write_probabilities(&hostile, &mut region, &probabilities), Err(LayoutError::Overlap { .. })));
    }

    #[test]
    fn explanations_have_their_own_span_and_are_counted() {
        let cols = sample();
        let packed: Vec<PackedColumn> = cols.iter().map(PackedColumn::from).collect();
        let (layout, len) = plan_explained(&packed, 2, 3);
        assert_eq!((layout.output.explained, layout.output.explanations.len), (3, 3 * 4 * 8));
        let mut region = vec![0u8; len as usize];
        write_packed(&packed, &layout, &mut region).unwrap();
        write_outputs(&layout, &mut region, &[0.75, 1.0, 0.5], &[1, 0, 1]).unwrap();
        write_probabilities(&layout, &mut region, &[0.25, 0.75, 1.0, 0.0, 0.5, 0.5]).unwrap();
        let values: Vec<f64> = (0..12).map(|v| v as f64 / 8.0).collect();
        write_explanations(&layout, &mut region, &values).unwrap();
        assert_eq!(read_explanations(&layout, &region).unwrap(), values);
        assert_eq!(read_probabilities(&layout, &region).unwrap(), [0.25, 0.75, 1.0, 0.0, 0.5, 0.5]);
        assert_eq!(read_batch(&layout, &region).unwrap(), cols, "the inputs are untouched");
        assert_eq!(
            write_explanations(&layout, &mut region, &values[..8]),
            Err(LayoutError::ExplanationMismatch { found: 8, rows: 3, explained: 3 })
        );
        let (none, _) = plan_packed(&packed, 2);
        assert_eq!(read_explanations(&none, &region).unwrap(), Vec::<f64>::new());
        // A layout from before explanations existed reads as asking for none.
        let mut old = serde_json::to_value(&none).unwrap();
        let output = old["output"].as_object_mut().unwrap();
        output.remove("explained");
        output.remove("explanations");
        let read = serde_json::from_value::<BatchLayout>(old).unwrap();
        assert_eq!((read.output.explained, read.output.explanations.len), (0, 0));
        assert_eq!(read.output.probabilities, none.output.probabilities);
        let mut hostile = layout.clone();
        hostile.output.explanations = hostile.output.probabilities;
        hostile.output.explanations.len = 3 * 4 * 8;
        assert!(write_explanations(&hostile, &mut region, &values).is_err());
        hostile.output.explained = MAX_EXPLAINED + 1;
        assert_eq!(read_explanations(&hostile, &region), Err(LayoutError::TooManyExplained(MAX_EXPLAINED + 1)));
    }

    #[test]
    fn batches_round_trip_with_nulls_and_empty_strings() {
        let cols = sample();
        let (layout, len) = plan_batch(&cols);
        assert_eq!(layout.rows, 3);
        let mut region = vec![0xAAu8; len as usize];
        write_batch(&cols, &layout, &mut region).unwrap();
        assert_eq!(read_batch(&layout, &region).unwrap(), cols);

        write_outputs(&layout, &mut region, &[0.1, 0.2, 0.3], &[1, 0, NO_LABEL]).unwrap();
        let (scores, labels) = read_outputs(&layout, &region).unwrap();
        assert_eq!(scores, vec![0.1, 0.2, 0.3]);
        assert_eq!(labels, vec![1, 0, NO_LABEL]);
        // Outputs never overwrite inputs.
        assert_eq!(read_batch(&layout, &region).unwrap(), cols);
    }

    #[test]
    fn every_span_is_aligned() {
        let (layout, _) = plan_batch(&sample());
        for c in &layout.columns {
            let spans = match c {
                ColumnLayout::Float64 { values, validity } => vec![*values, *validity],
                ColumnLayout::Text { offsets, data, validity } => vec![*offsets, *data, *validity],
            };
            assert!(spans.iter().all(|s| s.offset % 8 == 0));
        }
    }

    #[test]
    fn hostile_layouts_are_rejected() {
        let cols = sample();
        let (layout, len) = plan_batch(&cols);
        let mut region = vec![0u8; len as usize];
        write_batch(&cols, &layout, &mut region).unwrap();

        let short = &region[..len as usize - 8];
        assert!(matches!(read_outputs(&layout, short), Err(LayoutError::OutOfRegion { .. })));

        let mut far = layout.clone();
        far.columns[0] = ColumnLayout::Float64 {
            values: Span { offset: u64::MAX - 4, len: 24 },
            validity: Span { offset: 0, len: 1 },
        };
        assert!(matches!(read_batch(&far, &region), Err(LayoutError::OutOfRegion { .. })));

        let mut wrong = layout.clone();
        wrong.rows = 4;
        assert!(matches!(read_batch(&wrong, &region), Err(LayoutError::WrongLength { .. })));

        let mut huge = layout.clone();
        huge.rows = MAX_BATCH_ROWS + 1;
        assert_eq!(read_batch(&huge, &region), Err(LayoutError::TooManyRows(MAX_BATCH_ROWS + 1)));

        // Offsets that run past the column's data.
        if let ColumnLayout::Text { offsets, .. } = layout.columns[1] {
            let at = offsets.offset as usize + 4;
            region[at..at + 4].copy_from_slice(&1000u32.to_le_bytes());
        }
        assert_eq!(read_batch(&layout, &region), Err(LayoutError::BadOffsets { column: 1 }));

        assert_eq!(write_outputs(&layout, &mut region, &[0.0], &[0]), Err(LayoutError::OutputMismatch(1, 3)));
    }

    #[test]
    fn overlapping_spans_are_refused_so_a_read_stays_within_the_region() {
        let cols = vec![ColumnData::Float64(vec![Some(1.0); 64])];
        let (layout, len) = plan_batch(&cols);
        let mut region = vec![0u8; len as usize];
        write_batch(&cols, &layout, &mut region).unwrap();
        // Ten thousand columns over one span would read 10,000 × 64 values
        // out of a region of a few hundred bytes.
        let mut many = layout.clone();
        many.columns = vec![layout.columns[0].clone(); 10_000];
        let ColumnLayout::Float64 { values, .. } = layout.columns[0] else { panic!() };
        assert_eq!(
            read_batch(&many, &region),
            Err(LayoutError::Overlap { what: "values", offset: values.offset, len: values.len })
        );
        let mut onto_output = layout.clone();
        onto_output.output.labels = values;
        assert!(matches!(read_batch(&onto_output, &region), Err(LayoutError::Overlap { .. })));
        // Empty spans overlap nothing.
        let empty = vec![ColumnData::Float64(vec![]), ColumnData::Text(vec![]), ColumnData::Float64(vec![])];
        let (layout, len) = plan_batch(&empty);
        assert_eq!(read_batch(&layout, &vec![0u8; len as usize]).unwrap(), empty);
    }

    #[test]
    fn huge_lengths_are_errors_not_allocations() {
        let cols = sample();
        let (layout, len) = plan_batch(&cols);
        let region = vec![0u8; len as usize];
        let mut huge = layout.clone();
        huge.output.scores = Span { offset: 0, len: 1 << 60 };
        assert!(matches!(read_outputs(&huge, &region), Err(LayoutError::WrongLength { .. })));
        huge.rows = MAX_BATCH_ROWS;
        huge.output = OutputLayout {
            scores: Span { offset: 0, len: 0 },
            labels: Span { offset: 0, len: 0 },
            classes: 0,
            probabilities: Span::default(),
            explained: 0,
            explanations: Span::default(),
        };
        huge.columns = vec![ColumnLayout::Float64 {
            values: Span { offset: 0, len: MAX_BATCH_ROWS as u64 * 8 },
            validity: Span { offset: MAX_BATCH_ROWS as u64 * 8, len: bitmap_len(MAX_BATCH_ROWS) },
        }];
        assert!(matches!(read_batch(&huge, &region), Err(LayoutError::OutOfRegion { .. })));
    }

    #[test]
    fn a_layout_that_does_not_fit_the_columns_is_an_error_when_writing() {
        let cols = sample();
        let (layout, len) = plan_batch(&cols);
        let mut region = vec![0u8; len as usize];
        assert_eq!(
            write_batch(&cols[..2], &layout, &mut region),
            Err(LayoutError::ColumnCount { found: 2, expected: 3 })
        );
        let mut swapped = layout.clone();
        swapped.columns.swap(0, 1);
        assert_eq!(write_batch(&cols, &swapped, &mut region), Err(LayoutError::KindMismatch { column: 0 }));
        let mut short = layout.clone();
        if let ColumnLayout::Text { data, .. } = &mut short.columns[1] {
            data.len -= 1;
        }
        assert!(matches!(write_batch(&cols, &short, &mut region), Err(LayoutError::WrongLength { what: "data", .. })));
        assert!(matches!(write_batch(&cols, &layout, &mut region[..8]), Err(LayoutError::OutOfRegion { .. })));
    }

    #[test]
    fn an_empty_batch_is_valid() {
        let cols = vec![ColumnData::Float64(vec![]), ColumnData::Text(vec![])];
        let (layout, len) = plan_batch(&cols);
        let mut region = vec![0u8; len as usize];
        write_batch(&cols, &layout, &mut region).unwrap();
        assert_eq!(read_batch(&layout, &region).unwrap(), cols);
    }
}
