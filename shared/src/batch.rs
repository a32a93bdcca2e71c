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

use serde::{Deserialize, Serialize};

/// Rows in one batch are capped so a broken request cannot ask for absurd sizes.
pub const MAX_BATCH_ROWS: u32 = 1 << 20;

/// The label index written for rows that have no label (regression models).
pub const NO_LABEL: u32 = u32::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub offset: u64,
    pub len: u64,
}

impl Span {
    fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
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
        let mut end = self.output.scores.end().max(self.output.labels.end());
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

/// Lays out `columns` (all of the same length) and the output spans from offset
/// 0; returns the layout and the region size it needs.
pub fn plan_batch(columns: &[ColumnData]) -> (BatchLayout, u64) {
    // More rows than a u32 counts cannot be one batch: saturate, and
    // write_batch refuses the columns (TooManyRows), never a truncated count.
    let rows = u32::try_from(columns.first().map_or(0, |c| c.len())).unwrap_or(u32::MAX);
    let mut cur = Cursor(0);
    let mut layouts = Vec::with_capacity(columns.len());
    for col in columns {
        layouts.push(match col {
            ColumnData::Float64(_) => {
                ColumnLayout::Float64 { values: cur.take(rows as u64 * 8), validity: cur.take(bitmap_len(rows)) }
            }
            ColumnData::Text(values) => {
                let bytes: u64 = values.iter().flatten().map(|s| s.len() as u64).sum();
                ColumnLayout::Text {
                    offsets: cur.take((rows as u64 + 1) * 4),
                    data: cur.take(bytes),
                    validity: cur.take(bitmap_len(rows)),
                }
            }
        });
    }
    let output = OutputLayout { scores: cur.take(rows as u64 * 8), labels: cur.take(rows as u64 * 4) };
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
    all.extend([(layout.output.scores, "scores"), (layout.output.labels, "labels")]);
    all
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

fn write_validity<T>(out: &mut [u8], values: &[Option<T>]) {
    out.fill(0);
    for (i, v) in values.iter().enumerate() {
        if v.is_some() {
            out[i / 8] |= 1 << (i % 8);
        }
    }
}

fn is_valid(bitmap: &[u8], i: usize) -> bool {
    bitmap[i / 8] & (1 << (i % 8)) != 0
}

/// Writes `columns` into `region` where `layout` (from [`plan_batch`]) says.
/// Every span is checked against the columns and the region first: a
/// layout that does not fit them is an error, never a panic or a partial
/// write past a span.
pub fn write_batch(columns: &[ColumnData], layout: &BatchLayout, region: &mut [u8]) -> Result<(), LayoutError> {
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
            (ColumnData::Float64(values), ColumnLayout::Float64 { values: vs, validity }) => {
                expect_len(*vs, rows as u64 * 8, rows, "values")?;
                expect_len(*validity, bitmap_len(rows), rows, "validity")?;
                let out = slice_mut(region, *vs, "values")?;
                for (chunk, v) in out.chunks_exact_mut(8).zip(values) {
                    chunk.copy_from_slice(&v.unwrap_or(0.0).to_le_bytes());
                }
                write_validity(slice_mut(region, *validity, "validity")?, values);
            }
            (ColumnData::Text(values), ColumnLayout::Text { offsets, data, validity }) => {
                let bytes: u64 = values.iter().flatten().map(|s| s.len() as u64).sum();
                if bytes > u64::from(u32::MAX) {
                    return Err(LayoutError::TextTooLarge { column: ci, bytes });
                }
                expect_len(*offsets, (rows as u64 + 1) * 4, rows, "offsets")?;
                expect_len(*data, bytes, rows, "data")?;
                expect_len(*validity, bitmap_len(rows), rows, "validity")?;
                {
                    let data_out = slice_mut(region, *data, "data")?;
                    let mut pos = 0usize;
                    for s in values.iter().flatten() {
                        data_out[pos..pos + s.len()].copy_from_slice(s.as_bytes());
                        pos += s.len();
                    }
                }
                // Each offset is at most `bytes`, which fits a u32 (checked above).
                let offs = slice_mut(region, *offsets, "offsets")?;
                let mut pos = 0u32;
                offs[..4].copy_from_slice(&0u32.to_le_bytes());
                for (i, v) in values.iter().enumerate() {
                    pos += v.as_ref().map_or(0, |s| s.len() as u32);
                    offs[(i + 1) * 4..(i + 2) * 4].copy_from_slice(&pos.to_le_bytes());
                }
                write_validity(slice_mut(region, *validity, "validity")?, values);
            }
            _ => return Err(LayoutError::KindMismatch { column: ci }),
        }
    }
    Ok(())
}

/// Copies the batch's columns out of `region`, checking every span first.
pub fn read_batch(layout: &BatchLayout, region: &[u8]) -> Result<Vec<ColumnData>, LayoutError> {
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
                out.push(ColumnData::Float64(col));
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
                    col.push(if is_valid(bits, i) {
                        Some(
                            std::str::from_utf8(&bytes[start..end])
                                .map_err(|_| LayoutError::BadUtf8 { column: ci })?
                                .to_owned(),
                        )
                    } else {
                        None
                    });
                }
                out.push(ColumnData::Text(col));
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
        huge.output = OutputLayout { scores: Span { offset: 0, len: 0 }, labels: Span { offset: 0, len: 0 } };
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
