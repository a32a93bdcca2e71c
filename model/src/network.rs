//! The network a version's options describe, and how a regression
//! network's output becomes a value in the target's units: what training
//! builds, and what scoring rebuilds from an ONNX file.

use cerebro_shared::spec::{Norm, TrainOptions};
use serde::{Deserialize, Serialize};

use crate::features::FeaturePipeline;
use crate::stack::{Arch, Embedding, Op, Periodic};

/// How a regression network's output becomes a value in the target's
/// units: `z · std + mean`, then `exp` when `log`. The network learnt
/// `(y - mean) / std`, or `(ln y - mean) / std` when `log`
/// (`target_transform`; `none` is mean 0 and std 1).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TargetScale {
    pub mean: f32,
    pub std: f32,
    /// The network learnt the target's natural logarithm.
    #[serde(default)]
    pub log: bool,
}

impl TargetScale {
    /// A target value as the network learns it.
    pub fn learnt(&self, y: f64) -> f32 {
        let y = if self.log { y.ln() } else { y };
        (y as f32 - self.mean) / self.std
    }

    /// A network output as a value in the target's units.
    pub fn value(&self, z: f32) -> f32 {
        let v = z * self.std + self.mean;
        if self.log {
            v.exp()
        } else {
            v
        }
    }
}

/// The network the options describe, over the pipeline's inputs:
/// `hidden` dense layers (each dense → norm → activation → dropout), then
/// `residual_blocks` blocks `x + dense(dropout(act(dense(norm(x)))))`, then
/// (after blocks) norm → activation, then the output layer.
pub fn architecture(opts: &TrainOptions, pipeline: &FeaturePipeline, outputs: usize) -> Arch {
    let embeddings: Vec<Embedding> =
        pipeline.embeddings().into_iter().map(|(vocabulary, dim)| Embedding { vocabulary, dim }).collect();
    let columns = pipeline.periodic_inputs();
    let periodic = (!columns.is_empty()).then_some(Periodic {
        columns,
        frequencies: opts.periodic_frequencies as usize,
        dim: opts.periodic_dim as usize,
        sigma: opts.periodic_sigma as f32,
    });
    let mut width = pipeline.width()
        + embeddings.iter().map(|e| e.dim).sum::<usize>()
        + periodic.as_ref().map_or(0, Periodic::width);
    let mut ops = Vec::new();
    let norm = |ops: &mut Vec<Op>, width: usize| match opts.norm {
        Norm::None => {}
        Norm::Batch => ops.push(Op::BatchNorm { width }),
        Norm::Layer => ops.push(Op::LayerNorm { width }),
    };
    let f = opts.activation;
    let dropout = |ops: &mut Vec<Op>| {
        if opts.dropout > 0.0 {
            ops.push(Op::Dropout { p: opts.dropout as f32 });
        }
    };
    for &h in &opts.hidden {
        ops.push(Op::Dense { inputs: width, outputs: h as usize });
        width = h as usize;
        norm(&mut ops, width);
        ops.push(Op::Activation { f });
        dropout(&mut ops);
    }
    for _ in 0..opts.residual_blocks {
        let from = ops.len();
        norm(&mut ops, width);
        ops.push(Op::Dense { inputs: width, outputs: width });
        ops.push(Op::Activation { f });
        dropout(&mut ops);
        ops.push(Op::Dense { inputs: width, outputs: width });
        ops.push(Op::Residual { from });
    }
    if opts.residual_blocks > 0 {
        norm(&mut ops, width);
        ops.push(Op::Activation { f });
    }
    ops.push(Op::Dense { inputs: width, outputs });
    Arch { inputs: pipeline.width(), embeddings, ops, periodic }
}
