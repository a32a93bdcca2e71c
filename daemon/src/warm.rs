//! Warm starts: a derived model (docs/selection.md, "Derived models") begins
//! from its parent's weights wherever the shapes allow. The parent's weights
//! are read back from its archived ONNX file, so any ready version can be a
//! parent, however long ago it trained.
//!
//! Dense layers are matched by position; a layer of the same shape is
//! copied whole. The input layer is copied column by column: each input of a
//! feature the parent also had, encoded the same way, keeps its weights, so
//! dropping or adding a column keeps what was learnt about the others.
//! Embedding tables of the same column and vocabulary are copied. Norms
//! start fresh (the ONNX file holds BatchNorm folded into an affine map).

use std::collections::HashMap;

use cerebro_shared::onnx_graph::{read_initializers, OnnxFormatError};
/// What a warm start copied, recorded in `trained_with`.
pub use cerebro_shared::provenance::WarmStart;

use crate::engine::{Op, Stack};
use crate::features::{Encoder, FeaturePipeline};

/// A parent version's weights, as its ONNX file holds them.
#[derive(Debug, Clone)]
pub struct ParentWeights {
    pub version: i32,
    pipeline: FeaturePipeline,
    /// Each dense layer's weight (`outputs × inputs`) and bias, in order.
    dense: Vec<(usize, usize, Vec<f32>, Vec<f32>)>,
    /// Each embedding table, in the order of the embedded columns.
    embeddings: Vec<Vec<f32>>,
}

impl ParentWeights {
    /// Reads the weights of the ONNX file cerebrod exported for `version`,
    /// whose feature pipeline was `pipeline`.
    pub fn from_onnx(version: i32, onnx: &[u8], pipeline: FeaturePipeline) -> Result<Self, OnnxFormatError> {
        let mut dense = Vec::new();
        let mut embeddings = Vec::new();
        let mut pending_weight: Option<(usize, usize, Vec<f32>)> = None;
        for t in read_initializers(onnx)? {
            // A mini-ensemble's first member lends its weights.
            let name = t.name.strip_prefix("_m0/").unwrap_or(&t.name);
            let kind = name.strip_prefix("_cerebro/").and_then(|n| n.rsplit_once('_')).map(|(k, _)| k);
            match (kind, t.dims.as_slice()) {
                (Some("weight"), &[outputs, inputs]) => {
                    pending_weight = Some((outputs as usize, inputs as usize, t.data));
                }
                (Some("bias"), &[outputs]) => {
                    if let Some((o, i, w)) = pending_weight.take().filter(|(o, _, _)| *o == outputs as usize) {
                        dense.push((o, i, w, t.data));
                    }
                }
                (Some("embedding"), &[_, _]) => embeddings.push(t.data),
                _ => {}
            }
        }
        Ok(ParentWeights { version, pipeline, dense, embeddings })
    }
}

/// Where each feature's inputs sit in the input layer: dense-encoded ones in
/// the encoded vector, embedded ones after it.
fn input_columns(pipeline: &FeaturePipeline) -> HashMap<&str, (usize, usize, &Encoder)> {
    let mut at = 0;
    let mut embedded_at = pipeline.width();
    let mut out = HashMap::new();
    for f in &pipeline.features {
        let (offset, width) = match &f.encoder {
            Encoder::Embedding { dim, .. } => {
                embedded_at += dim;
                (embedded_at - dim, *dim)
            }
            e => {
                at += e.width();
                (at - e.width(), e.width())
            }
        };
        out.insert(f.name.as_str(), (offset, width, &f.encoder));
    }
    out
}

/// Whether an input encoded by `a` means what one encoded by `b` meant.
fn same_inputs(a: &Encoder, b: &Encoder) -> bool {
    match (a, b) {
        // Category order is the vocabulary's: it must match exactly.
        (Encoder::Categorical { .. } | Encoder::Embedding { .. }, _) => a == b,
        // Numbers: the same encoding and width (the bins may have moved a
        // little with the data, the inputs mean the same).
        _ => std::mem::discriminant(a) == std::mem::discriminant(b) && a.width() == b.width(),
    }
}

/// Copies `parent`'s weights into model `m` of `stack`, whose pipeline is
/// `child`, wherever shapes allow.
pub fn warm_start(stack: &mut Stack, m: usize, child: &FeaturePipeline, parent: &ParentWeights) -> WarmStart {
    let k = stack.k;
    let dense_ops: Vec<(usize, usize, usize)> = stack
        .arch
        .ops
        .iter()
        .enumerate()
        .filter_map(|(i, op)| match *op {
            Op::Dense { inputs, outputs } => Some((i, inputs, outputs)),
            _ => None,
        })
        .collect();
    let mut report = WarmStart {
        from_version: parent.version,
        layers: 0,
        of_layers: dense_ops.len().saturating_sub(1),
        input_columns: 0,
        of_input_columns: dense_ops.first().map_or(0, |d| d.1),
        embeddings: 0,
    };
    // Model m's part of a stacked tensor.
    let mine = |tensor: &[f32]| {
        let len = tensor.len() / k;
        m * len..(m + 1) * len
    };
    for (l, &(i, inputs, outputs)) in dense_ops.iter().enumerate() {
        let Some((po, pi, pw, pb)) = parent.dense.get(l) else { break };
        let slot = stack.arch.slot_of(i);
        if l == 0 {
            if *po != outputs {
                continue;
            }
            let (theirs, ours) = (input_columns(&parent.pipeline), input_columns(child));
            let r = mine(&stack.params[slot]);
            let w = &mut stack.params[slot][r];
            for (name, &(at, width, encoder)) in &ours {
                let Some(&(from, their_width, their_encoder)) = theirs.get(name) else { continue };
                if width != their_width || !same_inputs(encoder, their_encoder) {
                    continue;
                }
                for o in 0..outputs {
                    w[o * inputs + at..o * inputs + at + width]
                        .copy_from_slice(&pw[o * pi + from..o * pi + from + width]);
                }
                report.input_columns += width;
            }
            // The bias goes with the layer's outputs.
            let r = mine(&stack.params[slot + 1]);
            stack.params[slot + 1][r].copy_from_slice(pb);
        } else if (*po, *pi) == (outputs, inputs) {
            let r = mine(&stack.params[slot]);
            stack.params[slot][r].copy_from_slice(pw);
            let r = mine(&stack.params[slot + 1]);
            stack.params[slot + 1][r].copy_from_slice(pb);
            report.layers += 1;
        }
    }
    // Embedding tables: slot c holds the c-th embedded column's table.
    let embedded = |p: &FeaturePipeline| -> Vec<(String, Encoder)> {
        p.features
            .iter()
            .filter(|f| matches!(f.encoder, Encoder::Embedding { .. }))
            .map(|f| (f.name.clone(), f.encoder.clone()))
            .collect()
    };
    let theirs = embedded(&parent.pipeline);
    for (c, (name, encoder)) in embedded(child).iter().enumerate() {
        let Some(j) = theirs.iter().position(|(n, e)| n == name && e == encoder) else { continue };
        let Some(table) = parent.embeddings.get(j) else { continue };
        let r = mine(&stack.params[c]);
        if stack.params[c][r.clone()].len() == table.len() {
            stack.params[c][r].copy_from_slice(table);
            report.embeddings += 1;
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use cerebro_shared::spec::Task;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::engine::Compute;
    use crate::train::tests::{plan, toy};
    use crate::train::{architecture, train, Control};

    #[test]
    fn robust_inputs_match_robust_inputs_only() {
        let robust = |median, scale| Encoder::Robust { median, scale, null_indicator: true };
        let standard = Encoder::Numeric { mean: 0.0, std: 1.0, null_indicator: true };
        // Refitted on new rows, the median and scale move; the input means the same.
        assert!(same_inputs(&robust(1.0, 2.0), &robust(1.5, 2.5)));
        // As wide as a standardised column, but not the same input.
        assert_eq!(robust(0.0, 1.0).width(), standard.width());
        assert!(!same_inputs(&robust(0.0, 1.0), &standard));
        assert!(!same_inputs(&standard, &robust(0.0, 1.0)));
        assert!(!same_inputs(&robust(0.0, 1.0), &Encoder::Robust { median: 0.0, scale: 1.0, null_indicator: false }));
    }

    #[test]
    fn a_child_keeps_its_parents_weights_where_shapes_allow() {
        let (features, target) = toy(300);
        let mut parent_plan = plan(Task::Binary, &["no", "yes"]);
        parent_plan.options.hidden = vec![16, 8];
        parent_plan.options.epochs = 3;
        let parent = train(&parent_plan, &features, &target, Compute::cpu(1), &mut |_| Control::Continue).unwrap();
        let onnx = crate::onnx::export(&parent, &[]).unwrap();
        let weights = ParentWeights::from_onnx(4, &onnx, parent.pipeline.clone()).unwrap();

        // The child drops column "c" and adds a layer: [16, 8, 4].
        let mut child_opts = parent_plan.options.clone();
        child_opts.hidden = vec![16, 8, 4];
        let rows: Vec<usize> = (0..240).collect();
        let fitted = FeaturePipeline::fit(&parent_plan.features[..1], &features[..1], &rows, &child_opts).unwrap();
        let parent_fitted = &parent.pipeline.features[0];
        assert_eq!(fitted.features[0].encoder.width(), parent_fitted.encoder.width());
        let arch = architecture(&child_opts, &fitted, 1);
        let mut child = Stack::new(arch, 1, &mut [ChaCha8Rng::seed_from_u64(9)]);
        let report = warm_start(&mut child, 0, &fitted, &weights);
        let x_width = fitted.width();
        assert_eq!(
            report,
            WarmStart {
                from_version: 4,
                layers: 1,
                of_layers: 3,
                input_columns: x_width,
                of_input_columns: x_width,
                embeddings: 0
            }
        );
        let dense = |s: &Stack| -> Vec<usize> {
            s.arch.ops.iter().enumerate().filter(|(_, o)| matches!(o, Op::Dense { .. })).map(|(i, _)| i).collect()
        };
        let (ours, theirs) = (dense(&child), dense(&parent.network));
        let parent_inputs = parent.network.arch.inputs + parent.network.arch.embedded_width();
        let (cw, _) = child.op_params(ours[0]);
        let (pw, _) = parent.network.op_params(theirs[0]);
        for o in 0..16 {
            assert_eq!(cw[o * x_width..(o + 1) * x_width], pw[o * parent_inputs..o * parent_inputs + x_width]);
        }
        assert_eq!(child.op_params(ours[1]), parent.network.op_params(theirs[1]), "16 → 8 is copied whole");
        assert_ne!(child.op_params(ours[3]).0.len(), parent.network.op_params(theirs[2]).0.len());
    }
}
