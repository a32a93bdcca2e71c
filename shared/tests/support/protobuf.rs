//! A protobuf writer for tests: just enough of the wire format to build the
//! ONNX files `cerebro_shared::onnx_graph` reads, field by field. Included
//! by `onnx_graph`'s unit tests and by tests/fuzz.rs.

/// `v` as a base-128 varint.
fn varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// Field `number` of wire type 2 (length-delimited): a message, bytes, a string.
pub fn field(number: u64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    varint(number << 3 | 2, &mut out);
    varint(body.len() as u64, &mut out);
    out.extend_from_slice(body);
    out
}

/// Field `number` of wire type 0 (varint).
pub fn int_field(number: u64, v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    varint(number << 3, &mut out);
    varint(v, &mut out);
    out
}

/// A `ValueInfoProto` for a tensor of `elem` type; a None dimension is symbolic (`N`).
pub fn value_info(name: &str, elem: u64, dims: &[Option<u64>]) -> Vec<u8> {
    let mut shape = Vec::new();
    for d in dims {
        let dim = match d {
            Some(v) => int_field(1, *v),
            None => field(2, b"N"),
        };
        shape.extend(field(1, &dim));
    }
    let tensor = [int_field(1, elem), field(2, &shape)].concat();
    [field(1, name.as_bytes()), field(2, &field(1, &tensor))].concat()
}
