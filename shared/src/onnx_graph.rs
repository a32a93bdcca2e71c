//! The inputs and outputs of an ONNX model, read straight from its protobuf
//! bytes: enough to check an imported model against the columns it is
//! declared to score, without ONNX Runtime (the database process never loads
//! it).

use serde::{Deserialize, Serialize};

/// How an imported model is fed and read, stored with it in the catalog
/// (`model_versions.import_layout`). Cerebro's own exports need none: one
/// `[N, 1]` input per feature and an output named after the head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportLayout {
    /// Graph inputs in feed order; each takes the next `columns` features.
    pub inputs: Vec<ImportInput>,
    /// The float output scores are read from.
    pub output: String,
}

/// A binary model's scored column in an output `width` wide: the second of
/// two (`[P(first label), P(second label)]`, as exporters write them), else
/// the only one. Read from the output each run gives, not from the shape
/// the graph declares, which may leave the width unsaid (`[N, ?]`).
pub fn positive_column(width: usize) -> usize {
    usize::from(width == 2)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportInput {
    pub name: String,
    pub columns: usize,
}

/// ONNX's `TensorProto.DataType` values Cerebro feeds or reads.
pub const FLOAT: i32 = 1;
pub const STRING: i32 = 8;

/// One graph input or output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// `TensorProto.DataType`; 0 when the value is not a tensor.
    pub elem_type: i32,
    /// One entry per dimension: its size, or None when symbolic or unknown.
    pub dims: Vec<Option<i64>>,
}

impl TensorInfo {
    pub fn type_name(&self) -> &'static str {
        match self.elem_type {
            FLOAT => "float",
            STRING => "string",
            0 => "not a tensor",
            2 => "uint8",
            3 => "int8",
            6 => "int32",
            7 => "int64",
            9 => "bool",
            10 => "float16",
            11 => "double",
            _ => "another element type",
        }
    }
}

/// A graph's real inputs (initializers excluded) and its outputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphSignature {
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a readable ONNX model: {0}")]
pub struct OnnxFormatError(String);

fn malformed(what: &str) -> OnnxFormatError {
    OnnxFormatError(what.to_string())
}

/// A cursor over protobuf fields.
struct Fields<'a> {
    bytes: &'a [u8],
}

enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

impl<'a> Fields<'a> {
    fn varint(&mut self) -> Result<u64, OnnxFormatError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self.bytes.split_first().ok_or_else(|| malformed("truncated varint"))?;
            self.bytes = rest;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(malformed("varint longer than 10 bytes"))
    }

    fn next_field(&mut self) -> Result<Option<(u64, Value<'a>)>, OnnxFormatError> {
        if self.bytes.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 | 5 => {
                let n = if key & 7 == 1 { 8 } else { 4 };
                if self.bytes.len() < n {
                    return Err(malformed("truncated fixed-size field"));
                }
                self.bytes = &self.bytes[n..];
                Value::Fixed
            }
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| malformed("length too large"))?;
                if self.bytes.len() < len {
                    return Err(malformed("a field runs past the end of the file"));
                }
                let (field, rest) = self.bytes.split_at(len);
                self.bytes = rest;
                Value::Bytes(field)
            }
            other => return Err(malformed(&format!("unsupported wire type {other}"))),
        };
        Ok(Some((key >> 3, value)))
    }
}

/// Every length-delimited field `number` of a message.
fn messages(bytes: &[u8], number: u64) -> Result<Vec<&[u8]>, OnnxFormatError> {
    let mut fields = Fields { bytes };
    let mut found = Vec::new();
    while let Some((n, value)) = fields.next_field()? {
        if let (true, Value::Bytes(b)) = (n == number, value) {
            found.push(b);
        }
    }
    Ok(found)
}

fn varint_field(bytes: &[u8], number: u64) -> Result<Option<u64>, OnnxFormatError> {
    let mut fields = Fields { bytes };
    let mut found = None;
    while let Some((n, value)) = fields.next_field()? {
        if let (true, Value::Varint(v)) = (n == number, value) {
            found = Some(v);
        }
    }
    Ok(found)
}

fn string_field(bytes: &[u8], number: u64) -> Result<Option<String>, OnnxFormatError> {
    Ok(match messages(bytes, number)?.last() {
        Some(b) => Some(String::from_utf8(b.to_vec()).map_err(|_| malformed("a name is not UTF-8"))?),
        None => None,
    })
}

/// ValueInfoProto: name (1), type (2) → TypeProto.tensor_type (1) →
/// elem_type (1), shape (2) → dim (1) → dim_value (1).
fn tensor_info(value_info: &[u8]) -> Result<TensorInfo, OnnxFormatError> {
    let name = string_field(value_info, 1)?.ok_or_else(|| malformed("a graph value has no name"))?;
    let (mut elem_type, mut dims) = (0, Vec::new());
    if let Some(tensor) =
        messages(value_info, 2)?.last().map(|t| messages(t, 1)).transpose()?.and_then(|t| t.last().copied())
    {
        elem_type = varint_field(tensor, 1)?.unwrap_or(0) as i32;
        if let Some(shape) = messages(tensor, 2)?.last() {
            for dim in messages(shape, 1)? {
                dims.push(varint_field(dim, 1)?.map(|v| v as i64));
            }
        }
    }
    Ok(TensorInfo { name, elem_type, dims })
}

/// How deep graphs may nest (a subgraph in an attribute of a node of a
/// subgraph...): far beyond any real model, and a bound on the recursion.
const MAX_NESTING: usize = 64;

/// Refuses a model that does not carry all its data: a tensor anywhere in it
/// (an initializer, a sparse one, a node attribute's, in a subgraph or a
/// function) whose data is stored outside the file would make ONNX Runtime
/// read a file of the server's by a path the model's author chose, and hand
/// its bytes to the model.
pub fn check_self_contained(model: &[u8]) -> Result<(), OnnxFormatError> {
    for graph in messages(model, 7)? {
        check_graph(graph, 0)?;
    }
    // ModelProto.functions (25) → FunctionProto.node (7).
    for function in messages(model, 25)? {
        for node in messages(function, 7)? {
            check_node(node, 0)?;
        }
    }
    Ok(())
}

/// GraphProto: node (1), initializer (5), sparse_initializer (15).
fn check_graph(graph: &[u8], depth: usize) -> Result<(), OnnxFormatError> {
    if depth > MAX_NESTING {
        return Err(malformed("graphs nest too deeply"));
    }
    for tensor in messages(graph, 5)? {
        check_tensor(tensor)?;
    }
    for sparse in messages(graph, 15)? {
        check_sparse(sparse)?;
    }
    for node in messages(graph, 1)? {
        check_node(node, depth)?;
    }
    Ok(())
}

/// NodeProto.attribute (5) → AttributeProto: t (5), g (6), tensors (10),
/// graphs (11), sparse_tensor (22), sparse_tensors (23).
fn check_node(node: &[u8], depth: usize) -> Result<(), OnnxFormatError> {
    for attribute in messages(node, 5)? {
        for tensor in messages(attribute, 5)?.into_iter().chain(messages(attribute, 10)?) {
            check_tensor(tensor)?;
        }
        for sparse in messages(attribute, 22)?.into_iter().chain(messages(attribute, 23)?) {
            check_sparse(sparse)?;
        }
        for graph in messages(attribute, 6)?.into_iter().chain(messages(attribute, 11)?) {
            check_graph(graph, depth + 1)?;
        }
    }
    Ok(())
}

/// SparseTensorProto: values (1), indices (2).
fn check_sparse(sparse: &[u8]) -> Result<(), OnnxFormatError> {
    for tensor in messages(sparse, 1)?.into_iter().chain(messages(sparse, 2)?) {
        check_tensor(tensor)?;
    }
    Ok(())
}

/// TensorProto: external_data (13), data_location (14, 1 = EXTERNAL).
fn check_tensor(tensor: &[u8]) -> Result<(), OnnxFormatError> {
    if varint_field(tensor, 14)? == Some(1) || !messages(tensor, 13)?.is_empty() {
        let name = string_field(tensor, 8)?.unwrap_or_default();
        return Err(OnnxFormatError(format!(
            "tensor \"{name}\" keeps its data in an external file; Cerebro imports only models that carry \
             all their data (save it with the data inside, e.g. onnx.save(model, path, save_as_external_data=False))"
        )));
    }
    Ok(())
}

/// ModelProto.graph (7) → GraphProto.input (11), output (12), initializer (5,
/// whose names, field 8, older exporters also list as inputs).
pub fn read_signature(model: &[u8]) -> Result<GraphSignature, OnnxFormatError> {
    check_self_contained(model)?;
    let graph = *messages(model, 7)?.last().ok_or_else(|| malformed("no graph"))?;
    // A set: a file of many tiny inputs and initializers would make a list
    // search quadratic, in the backend that imports it.
    let initializers: std::collections::HashSet<String> =
        messages(graph, 5)?.into_iter().filter_map(|t| string_field(t, 8).transpose()).collect::<Result<_, _>>()?;
    let inputs = messages(graph, 11)?
        .into_iter()
        .map(tensor_info)
        .filter(|i| i.as_ref().map_or(true, |i| !initializers.contains(&i.name)))
        .collect::<Result<Vec<_>, _>>()?;
    let outputs = messages(graph, 12)?.into_iter().map(tensor_info).collect::<Result<Vec<_>, _>>()?;
    if outputs.is_empty() {
        return Err(malformed("the graph has no output"));
    }
    Ok(GraphSignature { inputs, outputs })
}

/// A float tensor stored in a graph.
#[derive(Debug, Clone, PartialEq)]
pub struct Initializer {
    pub name: String,
    pub dims: Vec<i64>,
    pub data: Vec<f32>,
}

/// Little-endian f32s, four bytes each.
fn floats(bytes: &[u8]) -> Result<Vec<f32>, OnnxFormatError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(malformed("float data is not a whole number of floats"));
    }
    Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// The graph's float initializers, in file order: TensorProto dims (1,
/// packed or not), data_type (2, FLOAT = 1), float_data (4, packed) or
/// raw_data (9), name (8). Tensors of other types are skipped.
pub fn read_initializers(model: &[u8]) -> Result<Vec<Initializer>, OnnxFormatError> {
    const FLOAT: u64 = 1;
    let graph = *messages(model, 7)?.last().ok_or_else(|| malformed("no graph"))?;
    let mut out = Vec::new();
    for tensor in messages(graph, 5)? {
        if varint_field(tensor, 2)?.unwrap_or(0) != FLOAT {
            continue;
        }
        let (mut dims, mut data) = (Vec::new(), Vec::new());
        let mut fields = Fields { bytes: tensor };
        while let Some((n, value)) = fields.next_field()? {
            match (n, value) {
                (1, Value::Varint(d)) => dims.push(d as i64),
                (1, Value::Bytes(packed)) => {
                    let mut ints = Fields { bytes: packed };
                    while !ints.bytes.is_empty() {
                        dims.push(ints.varint()? as i64);
                    }
                }
                (4 | 9, Value::Bytes(b)) => data.extend(floats(b)?),
                _ => {}
            }
        }
        let name = string_field(tensor, 8)?.unwrap_or_default();
        // Checked: dims come from the file, and their product can overflow.
        let expected = dims.iter().try_fold(1i64, |n, d| if *d < 0 { None } else { n.checked_mul(*d) });
        if expected != i64::try_from(data.len()).ok() {
            return Err(malformed(&format!("initializer {name} has {} values for dims {dims:?}", data.len())));
        }
        out.push(Initializer { name, dims, data });
    }
    Ok(out)
}

/// The tests' protobuf writer, shared with tests/fuzz.rs.
#[cfg(test)]
#[path = "../tests/support/protobuf.rs"]
mod protobuf;

#[cfg(test)]
mod tests {
    use super::*;

    use super::protobuf::{field, int_field, value_info};

    #[test]
    fn a_tensor_with_external_data_anywhere_is_refused() {
        let outputs = field(12, &value_info("p", 1, &[None, Some(1)]));
        let external = [field(8, b"w"), int_field(14, 1)].concat();
        let listed = [field(8, b"w"), field(13, &[field(1, b"location"), field(2, b"/etc/passwd")].concat())].concat();
        let inline = [field(8, b"w"), int_field(2, 1)].concat();
        let as_initializer = |t: &[u8]| [field(5, t), outputs.clone()].concat();
        let in_constant = |t: &[u8]| [field(1, &field(5, &field(5, t))), outputs.clone()].concat();
        let in_subgraph = |t: &[u8]| {
            let body = field(5, t);
            [field(1, &field(5, &field(6, &body))), outputs.clone()].concat()
        };
        let in_sparse = |t: &[u8]| [field(15, &field(1, t)), outputs.clone()].concat();
        for graph in [as_initializer(&external), in_constant(&external), in_subgraph(&external), in_sparse(&external)] {
            let model = field(7, &graph);
            let err = read_signature(&model).unwrap_err();
            assert!(err.to_string().contains("external file"), "{err}");
        }
        assert!(read_signature(&field(7, &as_initializer(&listed))).is_err());
        let function = field(25, &field(7, &field(5, &field(5, &external))));
        assert!(check_self_contained(&[field(7, &as_initializer(&inline)), function].concat()).is_err());
        assert!(read_signature(&field(7, &as_initializer(&inline))).is_ok());
        // Nesting past any real model is refused, not followed.
        let mut deep = field(5, &inline);
        for _ in 0..100 {
            deep = field(1, &field(5, &field(6, &deep)));
        }
        assert!(check_self_contained(&field(7, &deep)).unwrap_err().to_string().contains("nest"));
    }

    #[test]
    fn reads_inputs_outputs_and_skips_initializers() {
        let initializer = [field(8, b"w"), int_field(2, 1)].concat();
        let graph = [
            field(5, &initializer),
            field(11, &value_info("features", 1, &[None, Some(3)])),
            field(11, &value_info("w", 1, &[Some(3)])),
            field(11, &value_info("plan", 8, &[None, Some(1)])),
            field(12, &value_info("p", 1, &[None, Some(1)])),
        ]
        .concat();
        // ir_version (1) and a producer name (2) around the graph (7).
        let model = [int_field(1, 8), field(2, b"test"), field(7, &graph)].concat();
        let sig = read_signature(&model).unwrap();
        let names: Vec<&str> = sig.inputs.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["features", "plan"]);
        assert_eq!(sig.inputs[0].dims, vec![None, Some(3)]);
        assert_eq!((sig.inputs[1].elem_type, sig.inputs[1].type_name()), (STRING, "string"));
        assert_eq!(sig.outputs[0].name, "p");
    }

    #[test]
    fn initializer_dims_that_overflow_or_are_negative_are_errors() {
        let tensor = |dims: &[u64]| {
            let mut t: Vec<u8> = dims.iter().flat_map(|d| int_field(1, *d)).collect();
            t.extend(int_field(2, 1));
            t.extend(field(8, b"w"));
            t.extend(field(9, &[0u8; 8]));
            field(7, &field(5, &t))
        };
        assert_eq!(read_initializers(&tensor(&[2])).unwrap()[0].data, vec![0.0, 0.0]);
        for dims in [&[1 << 40, 1 << 40][..], &[u64::MAX, 2], &[1 << 62, 4, 0]] {
            let e = read_initializers(&tensor(dims)).unwrap_err();
            assert!(e.to_string().contains("has 2 values for dims"), "{dims:?}: {e}");
        }
    }

    #[test]
    fn garbage_and_truncation_are_errors_not_panics() {
        assert!(read_signature(b"").is_err());
        assert!(read_signature(b"not an onnx file at all").is_err());
        let graph = field(12, &value_info("p", 1, &[Some(1)]));
        let model = field(7, &graph);
        for cut in 0..model.len() {
            let _ = read_signature(&model[..cut]);
        }
        assert!(read_signature(&model).is_ok());
    }
}
