//! One ONNX graph that averages several of Cerebro's own: a selection's
//! ensemble. Each member's nodes and weights are kept whole under a prefix
//! of their own (`_m0/`, `_m1/`, ...), all reading the same raw-column
//! inputs; their head outputs (probabilities or values, in the target's
//! units) are weighted and summed into the output a single model has, so
//! the file scores, exports and is read back like any version's.

use prost::Message;

use super::proto::*;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EnsembleError {
    #[error("an ensemble needs at least one member")]
    NoMembers,
    #[error("the ONNX file of member {member} cannot be read: {reason}")]
    Unreadable { member: usize, reason: String },
    #[error("member {member} has output {found}, the first member {expected}: they are not one task")]
    OutputMismatch { member: usize, found: String, expected: String },
    #[error("member {member} reads input \"{input}\" with another type than the first member")]
    InputMismatch { member: usize, input: String },
}

/// The graph of `members` (ONNX files Cerebro exported, each with its
/// weight), whose output is `Σ weight · member's output`; its metadata is
/// the first member's task and labels, then `metadata`.
pub fn ensemble(members: &[(&[u8], f32)], metadata: &[(&str, String)]) -> Result<Vec<u8>, EnsembleError> {
    let decoded: Vec<ModelProto> = members
        .iter()
        .enumerate()
        .map(|(member, (bytes, _))| {
            ModelProto::decode(*bytes).map_err(|e| EnsembleError::Unreadable { member, reason: e.to_string() })
        })
        .collect::<Result<_, _>>()?;
    let first = decoded.first().ok_or(EnsembleError::NoMembers)?;
    let graph_of = |member: usize, m: &ModelProto| -> Result<GraphProto, EnsembleError> {
        m.graph.clone().ok_or(EnsembleError::Unreadable { member, reason: "it has no graph".into() })
    };
    let head = graph_of(0, first)?;
    let output =
        head.output.first().cloned().ok_or(EnsembleError::Unreadable { member: 0, reason: "no output".into() })?;

    let mut inputs: Vec<ValueInfoProto> = Vec::new();
    let mut nodes: Vec<NodeProto> = Vec::new();
    let mut initializers: Vec<TensorProto> = Vec::new();
    let mut weighted: Vec<String> = Vec::new();
    for (member, (m, (_, weight))) in decoded.iter().zip(members).enumerate() {
        let graph = graph_of(member, m)?;
        let out = graph.output.first().map(|o| o.name.clone()).unwrap_or_default();
        if out != output.name {
            return Err(EnsembleError::OutputMismatch { member, found: out, expected: output.name.clone() });
        }
        for input in &graph.input {
            match inputs.iter().find(|i| i.name == input.name) {
                Some(seen) if seen.r#type != input.r#type => {
                    return Err(EnsembleError::InputMismatch { member, input: input.name.clone() })
                }
                Some(_) => {}
                None => inputs.push(input.clone()),
            }
        }
        // Everything but the raw-column inputs is the member's own.
        let prefix = format!("_m{member}/");
        let raw: std::collections::HashSet<&str> = graph.input.iter().map(|i| i.name.as_str()).collect();
        let own = |name: &str| {
            if raw.contains(name) || name.is_empty() {
                name.to_string()
            } else {
                format!("{prefix}{name}")
            }
        };
        for node in &graph.node {
            nodes.push(NodeProto {
                input: node.input.iter().map(|n| own(n)).collect(),
                output: node.output.iter().map(|n| own(n)).collect(),
                name: format!("{prefix}{}", node.name),
                ..node.clone()
            });
        }
        initializers.extend(graph.initializer.iter().map(|t| TensorProto { name: own(&t.name), ..t.clone() }));
        let w = format!("{prefix}ensemble_weight");
        initializers.push(TensorProto {
            dims: vec![1],
            data_type: data_type::FLOAT,
            float_data: vec![*weight],
            name: w.clone(),
            ..Default::default()
        });
        let share = format!("{prefix}ensemble_share");
        nodes.push(NodeProto {
            input: vec![own(&out), w],
            output: vec![share.clone()],
            name: format!("{prefix}Mul_ensemble"),
            op_type: "Mul".into(),
            ..Default::default()
        });
        weighted.push(share);
    }
    nodes.push(NodeProto {
        input: weighted,
        output: vec![output.name.clone()],
        name: "Sum_ensemble".into(),
        op_type: "Sum".into(),
        ..Default::default()
    });

    let kept = ["cerebro.task", "cerebro.class_labels", "cerebro.null_category"];
    let mut props: Vec<StringStringEntryProto> =
        first.metadata_props.iter().filter(|p| kept.contains(&p.key.as_str())).cloned().collect();
    props.extend(metadata.iter().map(|(k, v)| StringStringEntryProto { key: k.to_string(), value: v.clone() }));
    let proto = ModelProto {
        doc_string: format!("Cerebro ensemble: the weighted average of {} models, each whole.", members.len()),
        graph: Some(GraphProto {
            node: nodes,
            name: "cerebro_ensemble".into(),
            initializer: initializers,
            doc_string: String::new(),
            input: inputs,
            output: vec![output],
        }),
        metadata_props: props,
        ..first.clone()
    };
    Ok(proto.encode_to_vec())
}
