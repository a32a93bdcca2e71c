//! Model selection benchmark, Cerebro's side (issue 4): a 16-candidate grid
//! on telco_churn, trained the way cerebrod trains a selection (candidates
//! that share a shape as one stack, one pass over the data per epoch for
//! all) and the same 16 one after another through the same engine. Run
//! through deploy/bench.sh, which also runs PyTorch on the same encoded
//! rows (daemon/benches/torch_selection.py) and prints the ratios.
//!
//! `cargo bench -p cerebro-daemon --bench selection -- DIR THREADS` writes
//! the encoded rows into DIR and prints one JSON line per way of training.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use cerebro_daemon::engine::Compute;
use cerebro_daemon::features::FeaturePipeline;
use cerebro_daemon::train::{train, train_group, Control};
use cerebro_shared::batch::ColumnData;
use cerebro_shared::spec::{Feature, FeatureKind, Task, TrainOptions, TrainingPlan};
use cerebro_shared::sql::metrics;

/// The grid: hidden {[64, 32], [128, 64]} × lr {1e-3, 2e-3, 3e-3, 5e-3} ×
/// weight_decay {0, 1e-4}; every candidate runs all its epochs.
const HIDDEN: [&[u32]; 2] = [&[64, 32], &[128, 64]];
const LR: [f64; 4] = [1e-3, 2e-3, 3e-3, 5e-3];
const WEIGHT_DECAY: [f64; 2] = [0.0, 1e-4];
const EPOCHS: u32 = 20;

fn telco() -> (Vec<Feature>, Vec<ColumnData>, ColumnData) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/data/telco_churn.csv");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("a header").split(',').collect();
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    let (mut features, mut columns, mut target) = (Vec::new(), Vec::new(), None);
    for (c, name) in header.iter().enumerate() {
        let cells: Vec<&str> = rows.iter().map(|r| r[c].trim()).collect();
        if *name == "customer_id" {
            continue;
        }
        if *name == "churn" {
            target = Some(ColumnData::Text(cells.iter().map(|v| Some(v.to_string())).collect()));
            continue;
        }
        let numeric = cells.iter().all(|v| v.is_empty() || v.parse::<f64>().is_ok());
        let (kind, column) = if numeric {
            (FeatureKind::Numeric, ColumnData::Float64(cells.iter().map(|v| v.parse().ok()).collect()))
        } else {
            (FeatureKind::Categorical, ColumnData::Text(cells.iter().map(|v| Some(v.to_string())).collect()))
        };
        features.push(Feature { name: name.to_string(), kind });
        columns.push(column);
    }
    (features, columns, target.expect("a churn column"))
}

fn write_f32(path: &Path, data: &[f32]) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    for v in data {
        f.write_all(&v.to_le_bytes()).expect("write");
    }
}

fn report(way: &str, seconds: f64, best_auc: f64) {
    println!(
        "{{\"side\": \"cerebro\", \"workload\": \"{way}\", \"candidates\": 16, \"seconds\": {seconds:.6}, \
         \"best_auc\": {best_auc:.4}}}"
    );
}

fn main() {
    // Arguments: DIR [THREADS]; cargo bench may add flags of its own.
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let dir: PathBuf = args.first().cloned().unwrap_or_else(|| "bench-data".into()).into();
    let threads: usize = args.get(1).and_then(|t| t.parse().ok()).unwrap_or(1);
    std::fs::create_dir_all(&dir).expect("bench directory");

    let (features, columns, target) = telco();
    let mut plans: Vec<TrainingPlan> = Vec::new();
    for hidden in HIDDEN {
        for lr in LR {
            for weight_decay in WEIGHT_DECAY {
                let options = TrainOptions {
                    hidden: hidden.to_vec(),
                    learning_rate: lr,
                    weight_decay,
                    epochs: EPOCHS,
                    patience: 0,
                    ..TrainOptions::default()
                };
                plans.push(TrainingPlan {
                    task: Task::Binary,
                    target: "churn".into(),
                    features: features.clone(),
                    class_labels: vec!["No".into(), "Yes".into()],
                    options,
                });
            }
        }
    }

    // PyTorch's rows: the same encoding, fitted on every row (the split does
    // not change the work), and the options it needs.
    let all: Vec<usize> = (0..target.len()).collect();
    let pipeline = FeaturePipeline::fit(&features, &columns, &all, &plans[0].options).expect("fit");
    let encoded = pipeline.transform(&columns).expect("transform");
    assert!(pipeline.embeddings().is_empty(), "telco's categories are one-hot");
    let y: Vec<f32> = match &target {
        ColumnData::Text(v) => v.iter().map(|l| (l.as_deref() == Some("Yes")) as u32 as f32).collect(),
        ColumnData::Float64(_) => unreachable!("churn is text"),
    };
    write_f32(&dir.join("telco_x.f32"), &encoded.x);
    write_f32(&dir.join("telco_y.f32"), &y);
    let o = &plans[0].options;
    std::fs::write(
        dir.join("telco.json"),
        format!(
            "{{\"rows\": {}, \"width\": {}, \"batch_size\": {}, \"epochs\": {EPOCHS}, \"validation_fraction\": {}, \
             \"hidden\": {:?}, \"lr\": {:?}, \"weight_decay\": {:?}}}",
            y.len(),
            pipeline.width(),
            o.batch_size,
            o.validation_fraction,
            HIDDEN,
            LR,
            WEIGHT_DECAY
        ),
    )
    .expect("write telco.json");

    let compute = Compute::cpu(threads);
    let auc = |m: &cerebro_daemon::train::TrainedModel| m.metrics.get(metrics::AUC).copied().unwrap_or(0.0);
    // Warm caches and the thread pool once.
    train(&plans[0], &columns, &target, compute, &mut |_| Control::Continue).expect("warm-up");

    // As cerebrod trains the selection: one stack per shape.
    let started = Instant::now();
    let mut best = 0.0f64;
    for group in plans.chunks(LR.len() * WEIGHT_DECAY.len()) {
        for model in train_group(group, &columns, &target, compute, &mut |_, _| {}).expect("fused training") {
            best = best.max(auc(&model.expect("a candidate trains")));
        }
    }
    report("selection16_fused", started.elapsed().as_secs_f64(), best);

    let started = Instant::now();
    let mut best = 0.0f64;
    for plan in &plans {
        best = best.max(auc(&train(plan, &columns, &target, compute, &mut |_| Control::Continue).expect("training")));
    }
    report("selection16_sequential", started.elapsed().as_secs_f64(), best);
}
