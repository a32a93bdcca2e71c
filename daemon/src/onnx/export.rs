//! Builds the ONNX graph of a trained model.
//!
//! Inputs are the raw feature columns, one `[N, 1]` tensor each: float for
//! numeric columns (NaN for NULL) and string for categorical ones
//! ([`NULL_CATEGORY`] for NULL). The graph repeats the feature pipeline's f32
//! arithmetic, runs the network and applies the head, so the file scores raw
//! values on its own, in Cerebro or anywhere ONNX Runtime runs.

use cerebro_shared::spec::{Task, NULL_CATEGORY};
use prost::Message;

use super::proto::*;
use crate::engine::activation::{Activation, GELU_A, GELU_C};
use crate::engine::{Op, Stack, NORM_EPS};
use crate::features::{Encoder, ROBUST_CLAMP};
use crate::train::TrainedModel;

/// Binary models: `[N, 1]` probability of the positive class.
pub const OUTPUT_PROBABILITY: &str = "probability";
/// Multiclass models: `[N, C]` class probabilities, classes in label order.
pub const OUTPUT_PROBABILITIES: &str = "probabilities";
/// Regression models: `[N, 1]` predicted value in the target's units
/// (the graph undoes the target transform: `exp` after `log`).
pub const OUTPUT_VALUE: &str = "value";

const IR_VERSION: i64 = 8;
const OPSET: i64 = 17;
const ML_OPSET: i64 = 3;
const ML_DOMAIN: &str = "ai.onnx.ml";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ExportError {
    #[error("the model has no input features")]
    NoInputs,
    #[error("feature column \"{0}\" has the name of an output; rename the column")]
    NameClash(String),
    #[error("the mini-ensemble's graph: {0}")]
    Members(#[from] super::EnsembleError),
}

#[derive(Default)]
struct Graph {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    next_id: usize,
}

impl Graph {
    fn fresh(&mut self, hint: &str) -> String {
        self.next_id += 1;
        format!("_cerebro/{hint}_{}", self.next_id)
    }

    fn const_f32(&mut self, hint: &str, dims: &[i64], data: Vec<f32>) -> String {
        let name = self.fresh(hint);
        self.initializers.push(TensorProto {
            dims: dims.to_vec(),
            data_type: data_type::FLOAT,
            float_data: data,
            name: name.clone(),
            ..Default::default()
        });
        name
    }

    fn const_i64(&mut self, hint: &str, dims: &[i64], data: Vec<i64>) -> String {
        let name = self.fresh(hint);
        self.initializers.push(TensorProto {
            dims: dims.to_vec(),
            data_type: data_type::INT64,
            int64_data: data,
            name: name.clone(),
            ..Default::default()
        });
        name
    }

    /// Adds a one-output node and returns its output's name (or `output`).
    fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>, output: Option<&str>) -> String {
        self.node_in(op, "", inputs, attrs, output)
    }

    fn node_in(
        &mut self,
        op: &str,
        domain: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
        output: Option<&str>,
    ) -> String {
        let out = output.map_or_else(|| self.fresh(&op.to_ascii_lowercase()), str::to_owned);
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            name: format!("{op}_{}", self.nodes.len()),
            op_type: op.into(),
            attribute: attrs,
            domain: domain.into(),
        });
        out
    }
}

fn attr_int(name: &str, i: i64) -> AttributeProto {
    AttributeProto { name: name.into(), i, r#type: attribute_type::INT, ..Default::default() }
}

fn attr_float(name: &str, f: f32) -> AttributeProto {
    AttributeProto { name: name.into(), f, r#type: attribute_type::FLOAT, ..Default::default() }
}

fn attr_ints(name: &str, ints: Vec<i64>) -> AttributeProto {
    AttributeProto { name: name.into(), ints, r#type: attribute_type::INTS, ..Default::default() }
}

fn attr_strings(name: &str, strings: Vec<Vec<u8>>) -> AttributeProto {
    AttributeProto { name: name.into(), strings, r#type: attribute_type::STRINGS, ..Default::default() }
}

fn value_info(name: &str, elem_type: i32, dims: [Option<i64>; 2]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match d {
                Some(v) => tensor_shape_proto::dimension::Value::DimValue(*v),
                None => tensor_shape_proto::dimension::Value::DimParam("N".into()),
            }),
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type,
                shape: Some(TensorShapeProto { dim }),
            })),
        }),
    }
}

/// The nodes of a hidden-layer activation, written as the engine computes it.
fn activation(g: &mut Graph, act: Activation, h: &str) -> String {
    match act {
        Activation::Relu => g.node("Relu", &[h], vec![], None),
        Activation::Tanh => g.node("Tanh", &[h], vec![], None),
        Activation::Silu => {
            let s = g.node("Sigmoid", &[h], vec![], None);
            g.node("Mul", &[h, &s], vec![], None)
        }
        Activation::Gelu => {
            // 0.5·h·(1 + tanh(C·(h + A·h³)))
            let (a, c) = (g.const_f32("gelu_a", &[1], vec![GELU_A]), g.const_f32("gelu_c", &[1], vec![GELU_C]));
            let (half, one) = (g.const_f32("half", &[1], vec![0.5]), g.const_f32("one", &[1], vec![1.0]));
            let h2 = g.node("Mul", &[h, h], vec![], None);
            let h3 = g.node("Mul", &[&h2, h], vec![], None);
            let ah3 = g.node("Mul", &[&h3, &a], vec![], None);
            let inner = g.node("Add", &[h, &ah3], vec![], None);
            let u = g.node("Mul", &[&inner, &c], vec![], None);
            let t = g.node("Tanh", &[&u], vec![], None);
            let one_t = g.node("Add", &[&t, &one], vec![], None);
            let half_h = g.node("Mul", &[h, &half], vec![], None);
            g.node("Mul", &[&half_h, &one_t], vec![], None)
        }
    }
}

/// `[N, 1]` booleans: where the float column `x` is missing to the network
/// (NULL arrives as NaN; ±Infinity counts as missing too, as in the engine).
fn missing(g: &mut Graph, x: &str) -> String {
    let nan = g.node("IsNaN", &[x], vec![], None);
    let inf = g.node("IsInf", &[x], vec![], None);
    g.node("Or", &[&nan, &inf], vec![], None)
}

/// Piecewise-linear inputs `[N, bins]` of a float column `x`, NaN for NULL rows.
fn ple(g: &mut Graph, x: &str, edges: &[f32]) -> String {
    let bins = edges.len() as i64 - 1;
    let lower = g.const_f32("ple_lower", &[bins], edges[..edges.len() - 1].to_vec());
    let width = g.const_f32("ple_width", &[bins], edges.windows(2).map(|e| e[1] - e[0]).collect());
    let (zero, one) = (g.const_f32("zero", &[], vec![0.0]), g.const_f32("one", &[], vec![1.0]));
    let shifted = g.node("Sub", &[x, &lower], vec![], None);
    let scaled = g.node("Div", &[&shifted, &width], vec![], None);
    g.node("Clip", &[&scaled, &zero, &one], vec![], None)
}

/// The robust encoding `[N, 1]` of a float column `x`, as
/// [`crate::features::robust_input`] computes it (NaN for NULL rows).
fn robust(g: &mut Graph, x: &str, median: f32, scale: f32) -> String {
    let median = g.const_f32("median", &[1], vec![median]);
    let scale = g.const_f32("scale", &[1], vec![scale]);
    let (lo, hi) =
        (g.const_f32("clamp_lo", &[], vec![-ROBUST_CLAMP]), g.const_f32("clamp_hi", &[], vec![ROBUST_CLAMP]));
    let (three, one) = (g.const_f32("three", &[1], vec![3.0]), g.const_f32("one", &[1], vec![1.0]));
    let centred = g.node("Sub", &[x, &median], vec![], None);
    let scaled = g.node("Div", &[&centred, &scale], vec![], None);
    let z = g.node("Clip", &[&scaled, &lo, &hi], vec![], None);
    let t = g.node("Div", &[&z, &three], vec![], None);
    let t2 = g.node("Mul", &[&t, &t], vec![], None);
    let inner = g.node("Add", &[&t2, &one], vec![], None);
    let root = g.node("Sqrt", &[&inner], vec![], None);
    g.node("Div", &[&z, &root], vec![], None)
}

/// The network's ops over `h`, the concatenated inputs.
fn network(g: &mut Graph, net: &Stack, mut h: String) -> String {
    // The input of every op, for residual connections.
    let mut inputs: Vec<String> = Vec::with_capacity(net.arch.ops.len());
    for (i, op) in net.arch.ops.iter().enumerate() {
        inputs.push(h.clone());
        h = match *op {
            Op::Dense { inputs, outputs } => {
                let (w, b) = net.op_params(i);
                let w = g.const_f32("weight", &[outputs as i64, inputs as i64], w.to_vec());
                let b = g.const_f32("bias", &[outputs as i64], b.to_vec());
                g.node("Gemm", &[&h, &w, &b], vec![attr_int("transB", 1)], None)
            }
            Op::Activation { f } => activation(g, f, &h),
            Op::LayerNorm { width } => {
                let (gain, shift) = net.op_params(i);
                let gain = g.const_f32("ln_gain", &[width as i64], gain.to_vec());
                let shift = g.const_f32("ln_shift", &[width as i64], shift.to_vec());
                g.node(
                    "LayerNormalization",
                    &[&h, &gain, &shift],
                    vec![attr_int("axis", -1), attr_float("epsilon", NORM_EPS)],
                    None,
                )
            }
            Op::BatchNorm { width } => {
                // Scoring uses the running statistics: an affine map per feature.
                let (scale, offset) = net.batch_norm_affine(i);
                let scale = g.const_f32("bn_scale", &[width as i64], scale);
                let offset = g.const_f32("bn_offset", &[width as i64], offset);
                let scaled = g.node("Mul", &[&h, &scale], vec![], None);
                g.node("Add", &[&scaled, &offset], vec![], None)
            }
            Op::Dropout { .. } => h,
            Op::Residual { from } => g.node("Add", &[&h, &inputs[from]], vec![], None),
        };
    }
    h
}

/// Each periodic column's embedding of its standardised value `z` (graph
/// values `inputs`, in column order), as the engine computes it:
/// `Relu(Concat(Cos(z·2πc), Sin(z·2πc)) · W + b)`.
fn periodic_embeddings(g: &mut Graph, net: &Stack, inputs: &[String]) -> Vec<String> {
    let (Some(p), Some((freq, weight, bias))) = (&net.arch.periodic, net.periodic_params()) else {
        return Vec::new();
    };
    let (kf, d) = (p.frequencies, p.dim);
    inputs
        .iter()
        .enumerate()
        .map(|(f, z)| {
            let scaled: Vec<f32> = freq[f * kf..(f + 1) * kf].iter().map(|c| std::f32::consts::TAU * c).collect();
            let c = g.const_f32("frequencies", &[1, kf as i64], scaled);
            let angle = g.node("Mul", &[z, &c], vec![], None);
            let cos = g.node("Cos", &[&angle], vec![], None);
            let sin = g.node("Sin", &[&angle], vec![], None);
            let v = g.node("Concat", &[&cos, &sin], vec![attr_int("axis", 1)], None);
            let w = g.const_f32(
                "periodic_weight",
                &[2 * kf as i64, d as i64],
                weight[f * 2 * kf * d..][..2 * kf * d].to_vec(),
            );
            let b = g.const_f32("periodic_bias", &[d as i64], bias[f * d..(f + 1) * d].to_vec());
            let h = g.node("MatMul", &[&v, &w], vec![], None);
            let hb = g.node("Add", &[&h, &b], vec![], None);
            g.node("Relu", &[&hb], vec![], None)
        })
        .collect()
}

/// Serialises `model` as an ONNX file; `metadata` lands in `metadata_props`.
/// A mini-ensemble is one graph that averages its members' graphs.
pub fn export(model: &TrainedModel, metadata: &[(&str, String)]) -> Result<Vec<u8>, ExportError> {
    if model.members.is_empty() {
        return export_network(model, metadata);
    }
    let files = std::iter::once(&model.network)
        .chain(&model.members)
        .map(|network| {
            let single = TrainedModel { network: network.clone(), members: Vec::new(), ..model.clone() };
            export_network(&single, metadata)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let weight = 1.0 / files.len() as f32;
    let members: Vec<(&[u8], f32)> = files.iter().map(|f| (f.as_slice(), weight)).collect();
    Ok(super::ensemble(&members, metadata)?)
}

/// One network's graph.
fn export_network(model: &TrainedModel, metadata: &[(&str, String)]) -> Result<Vec<u8>, ExportError> {
    if model.pipeline.width() == 0 && model.pipeline.embeddings().is_empty() {
        return Err(ExportError::NoInputs);
    }
    let outputs = [OUTPUT_PROBABILITY, OUTPUT_PROBABILITIES, OUTPUT_VALUE];
    if let Some(f) = model.pipeline.features.iter().find(|f| outputs.contains(&f.name.as_str())) {
        return Err(ExportError::NameClash(f.name.clone()));
    }

    let mut g = Graph::default();
    let mut inputs = Vec::new();
    let mut parts = Vec::new();
    // Embeddings follow the encoded inputs, in column order, as in the engine:
    // categorical ones, then periodic ones of the standardised values.
    let mut embedded = Vec::new();
    let mut periodic_inputs = Vec::new();
    let float = attr_int("to", data_type::FLOAT as i64);
    for feature in &model.pipeline.features {
        let x = feature.name.as_str();
        match &feature.encoder {
            Encoder::Numeric { mean, std, null_indicator } | Encoder::Periodic { mean, std, null_indicator } => {
                inputs.push(value_info(x, data_type::FLOAT, [None, Some(1)]));
                let mean = g.const_f32("mean", &[1], vec![*mean]);
                let std = g.const_f32("std", &[1], vec![*std]);
                let zero = g.const_f32("zero", &[1], vec![0.0]);
                let is_null = missing(&mut g, x);
                let centred = g.node("Sub", &[x, &mean], vec![], None);
                let scaled = g.node("Div", &[&centred, &std], vec![], None);
                let z = g.node("Where", &[&is_null, &zero, &scaled], vec![], None);
                if matches!(feature.encoder, Encoder::Periodic { .. }) {
                    periodic_inputs.push(z.clone());
                }
                parts.push(z);
                if *null_indicator {
                    parts.push(g.node("Cast", &[&is_null], vec![float.clone()], None));
                }
            }
            Encoder::Robust { median, scale, null_indicator } => {
                inputs.push(value_info(x, data_type::FLOAT, [None, Some(1)]));
                let zero = g.const_f32("zero", &[1], vec![0.0]);
                let is_null = missing(&mut g, x);
                let value = robust(&mut g, x, *median, *scale);
                parts.push(g.node("Where", &[&is_null, &zero, &value], vec![], None));
                if *null_indicator {
                    parts.push(g.node("Cast", &[&is_null], vec![float.clone()], None));
                }
            }
            Encoder::Ple { edges, null_indicator } | Encoder::Quantile { edges, null_indicator } => {
                inputs.push(value_info(x, data_type::FLOAT, [None, Some(1)]));
                let zero = g.const_f32("zero", &[1], vec![0.0]);
                let is_null = missing(&mut g, x);
                let pieces = ple(&mut g, x, edges);
                let value = if matches!(feature.encoder, Encoder::Quantile { .. }) {
                    let axes = g.const_i64("axes", &[1], vec![1]);
                    let sum = g.node("ReduceSum", &[&pieces, &axes], vec![attr_int("keepdims", 1)], None);
                    let bins = g.const_f32("bins", &[1], vec![(edges.len() - 1) as f32]);
                    let half = g.const_f32("half", &[1], vec![0.5]);
                    let mean = g.node("Div", &[&sum, &bins], vec![], None);
                    g.node("Sub", &[&mean, &half], vec![], None)
                } else {
                    pieces
                };
                parts.push(g.node("Where", &[&is_null, &zero, &value], vec![], None));
                if *null_indicator {
                    parts.push(g.node("Cast", &[&is_null], vec![float.clone()], None));
                }
            }
            Encoder::Categorical { vocabulary } | Encoder::Embedding { vocabulary, .. } => {
                inputs.push(value_info(x, data_type::STRING, [None, Some(1)]));
                let v = vocabulary.len() as i64;
                let embedding = matches!(feature.encoder, Encoder::Embedding { .. });
                if vocabulary.is_empty() && !embedding {
                    continue;
                }
                let index = g.node_in(
                    "LabelEncoder",
                    ML_DOMAIN,
                    &[x],
                    vec![
                        attr_strings("keys_strings", vocabulary.iter().map(|s| s.as_bytes().to_vec()).collect()),
                        attr_ints("values_int64s", (0..v).collect()),
                        // Values never seen in training: no one-hot column, or
                        // the embedding table's zero row.
                        attr_int("default_int64", if embedding { v } else { -1 }),
                    ],
                    None,
                );
                if let Encoder::Embedding { dim, .. } = &feature.encoder {
                    let c = embedded.len();
                    let table =
                        g.const_f32("embedding", &[v + 1, *dim as i64], model.network.embedding_table(c).to_vec());
                    let rows = g.node("Gather", &[&table, &index], vec![attr_int("axis", 0)], None);
                    embedded.push(g.node("Flatten", &[&rows], vec![attr_int("axis", 1)], None));
                } else {
                    let positions = g.const_i64("positions", &[v], (0..v).collect());
                    let hit = g.node("Equal", &[&index, &positions], vec![], None);
                    parts.push(g.node("Cast", &[&hit], vec![float.clone()], None));
                }
            }
        }
    }
    parts.extend(embedded);
    parts.extend(periodic_embeddings(&mut g, &model.network, &periodic_inputs));
    let part_refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    let features = g.node("Concat", &part_refs, vec![attr_int("axis", 1)], None);
    let h = network(&mut g, &model.network, features);

    let output = match model.task {
        Task::Binary => {
            g.node("Sigmoid", &[&h], vec![], Some(OUTPUT_PROBABILITY));
            value_info(OUTPUT_PROBABILITY, data_type::FLOAT, [None, Some(1)])
        }
        Task::Multiclass => {
            g.node("Softmax", &[&h], vec![attr_int("axis", -1)], Some(OUTPUT_PROBABILITIES));
            value_info(OUTPUT_PROBABILITIES, data_type::FLOAT, [None, Some(model.class_labels.len() as i64)])
        }
        Task::Regression => {
            let s = model.target_scale.expect("regression models carry a target scale");
            let std = g.const_f32("target_std", &[1], vec![s.std]);
            let mean = g.const_f32("target_mean", &[1], vec![s.mean]);
            let scaled = g.node("Mul", &[&h, &std], vec![], None);
            // The target transform, undone: scores are in the target's units.
            if s.log {
                let learnt = g.node("Add", &[&scaled, &mean], vec![], None);
                g.node("Exp", &[&learnt], vec![], Some(OUTPUT_VALUE));
            } else {
                g.node("Add", &[&scaled, &mean], vec![], Some(OUTPUT_VALUE));
            }
            value_info(OUTPUT_VALUE, data_type::FLOAT, [None, Some(1)])
        }
    };

    let mut props = vec![
        ("cerebro.task".to_string(), model.task.as_str().to_string()),
        ("cerebro.class_labels".to_string(), serde_json::to_string(&model.class_labels).expect("labels serialise")),
        ("cerebro.null_category".to_string(), NULL_CATEGORY.to_string()),
    ];
    props.extend(metadata.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let proto = ModelProto {
        ir_version: IR_VERSION,
        producer_name: "cerebro".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        domain: "cerebro".into(),
        model_version: 1,
        doc_string: "Cerebro model: feature pipeline, network and head in one graph.".into(),
        graph: Some(GraphProto {
            node: g.nodes,
            name: "cerebro_model".into(),
            initializer: g.initializers,
            doc_string: String::new(),
            input: inputs,
            output: vec![output],
        }),
        opset_import: vec![
            OperatorSetIdProto { domain: String::new(), version: OPSET },
            OperatorSetIdProto { domain: ML_DOMAIN.into(), version: ML_OPSET },
        ],
        metadata_props: props.into_iter().map(|(key, value)| StringStringEntryProto { key, value }).collect(),
    };
    Ok(proto.encode_to_vec())
}
