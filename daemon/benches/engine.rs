//! Engine benchmark, Cerebro's side. Run through deploy/bench.sh, which also
//! runs the PyTorch baseline on the same data and initial weights and prints
//! the ratios.
//!
//! `cargo bench -p cerebro-daemon --bench engine -- DIR THREADS` writes the
//! data and initial weights into DIR, runs every workload on THREADS threads
//! and prints one JSON line per workload.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use cerebro_daemon::engine::{
    Activation, Arch, Batch, BatchSource, Head, Loss, MiniBatch, ModelStep, Op, Predictor, Stack, Trainer,
};
use cerebro_shared::spec::Optimizer;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const ROWS: usize = 200_000;
const COLS: usize = 64;
const BATCH: usize = 512;
const INFER_BATCH: usize = 8192;
const LR: f32 = 1e-3;

fn write_f32(path: &Path, data: &[f32]) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    for v in data {
        f.write_all(&v.to_le_bytes()).expect("write");
    }
}

/// Weights in PyTorch's layout (`Linear.weight` is out × in), as the engine keeps them.
fn write_model(dir: &Path, name: &str, model: &Stack) {
    let dense = model.arch.ops.iter().enumerate().filter(|(_, op)| matches!(op, Op::Dense { .. }));
    for (l, (i, _)) in dense.enumerate() {
        let (w, b) = model.op_params(i);
        write_f32(&dir.join(format!("{name}.w{l}")), w);
        write_f32(&dir.join(format!("{name}.b{l}")), b);
    }
}

fn data(dir: &Path) -> (Vec<f32>, Vec<f32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let teacher: Vec<f32> = (0..COLS).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut x = vec![0.0f32; ROWS * COLS];
    let mut y = vec![0.0f32; ROWS];
    for r in 0..ROWS {
        let row = &mut x[r * COLS..(r + 1) * COLS];
        row.iter_mut().for_each(|v| *v = rng.random_range(-1.0..1.0));
        let z: f32 = row.iter().zip(&teacher).map(|(a, b)| a * b).sum::<f32>() + (row[0] * row[1] * 3.0).sin();
        y[r] = (z > 0.0) as u32 as f32;
    }
    write_f32(&dir.join("x.f32"), &x);
    write_f32(&dir.join("y.f32"), &y);
    (x, y)
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Rows in order, borrowed in place (as PyTorch slices its tensor).
struct InOrder<'a> {
    x: &'a [f32],
    y: &'a [f32],
}

impl BatchSource for InOrder<'_> {
    fn batch<'s>(&'s self, i: usize, _: &'s mut MiniBatch) -> (Batch<'s>, &'s [f32]) {
        let rows = i * BATCH..((i + 1) * BATCH).min(self.y.len());
        (Batch { x: &self.x[rows.start * COLS..rows.end * COLS], codes: &[], n: rows.len() }, &self.y[rows])
    }
}

/// One epoch over all rows in order, K models at once; returns seconds.
fn train_epoch(stack: Stack, x: &[f32], y: &[f32], threads: usize) -> f64 {
    let k = stack.k;
    let mut trainer = Trainer::new(stack, Loss::new(Head::Binary), Optimizer::Adam, threads).expect("training threads");
    let settings = |_: usize, _: usize| ModelStep { lr: LR, weight_decay: 0.0, momentum: 0.0, clip_norm: 0.0 };
    let active = vec![true; k];
    let mut losses = vec![0.0; k];
    let source = InOrder { x, y };
    let started = Instant::now();
    trainer.epoch(y.len().div_ceil(BATCH), &source, &settings, &active, &mut losses);
    let seconds = started.elapsed().as_secs_f64();
    assert!(losses.iter().all(|l| l.is_finite()));
    seconds
}

fn report(workload: &str, models: usize, seconds: f64) {
    println!(
        "{{\"side\": \"cerebro\", \"workload\": \"{workload}\", \"models\": {models}, \"seconds\": {seconds:.6}, \
         \"samples_per_s\": {:.1}}}",
        (ROWS * models) as f64 / seconds
    );
}

fn main() {
    // Arguments: DIR [THREADS]; cargo bench may add flags of its own.
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let dir: PathBuf = args.first().cloned().unwrap_or_else(|| "bench-data".into()).into();
    let threads: usize = args.get(1).and_then(|t| t.parse().ok()).unwrap_or(1);
    // An optional third argument runs only the workloads whose names start with it (for profiling).
    let only = args.get(2).cloned().unwrap_or_default();
    let run = |workload: &str| workload.starts_with(&only);
    std::fs::create_dir_all(&dir).expect("bench directory");
    let (x, y) = data(&dir);

    let model = |seed: u64, hidden: &[usize]| {
        Stack::new(Arch::mlp(COLS, hidden, 1, Activation::Relu), 0, &mut [ChaCha8Rng::seed_from_u64(seed)])
    };
    let wide = model(1, &[256, 256]);
    let small = model(2, &[32]);
    write_model(&dir, "a", &wide);
    write_model(&dir, "b", &small);
    let fused: Vec<Stack> = (0..32).map(|s| model(100 + s, &[32])).collect();
    for (i, m) in fused.iter().enumerate() {
        write_model(&dir, &format!("c{i}"), m);
    }

    // Warm caches and page in the data once.
    train_epoch(Stack::from_models(std::slice::from_ref(&small)), &x[..BATCH * COLS * 20], &y[..BATCH * 20], threads);

    if run("a_mlp_64_256_256_1") {
        let seconds = train_epoch(Stack::from_models(std::slice::from_ref(&wide)), &x, &y, threads);
        report("a_mlp_64_256_256_1", 1, seconds);
    }
    if run("b_mlp_64_32_1") {
        report("b_mlp_64_32_1", 1, train_epoch(Stack::from_models(&[small]), &x, &y, threads));
    }
    for k in [8, 32] {
        let workload = format!("c_k{k}_mlp_64_32_1");
        if run(&workload) {
            report(&workload, k, train_epoch(Stack::from_models(&fused[..k]), &x, &y, threads));
        }
    }
    if !run("inference_b8192_mlp_64_256_256_1") {
        return;
    }

    let started = Instant::now();
    let mut checksum = 0.0f64;
    let mut predictor = Predictor::new(&wide, threads);
    let mut out = Vec::with_capacity(INFER_BATCH);
    for xb in x.chunks(INFER_BATCH * COLS) {
        out.clear();
        predictor.predict(Batch { x: xb, codes: &[], n: xb.len() / COLS }, &mut out);
        checksum += out[0] as f64;
    }
    let seconds = started.elapsed().as_secs_f64();
    assert!(checksum.is_finite());
    report("inference_b8192_mlp_64_256_256_1", 1, seconds);
    println!("{{\"side\": \"cerebro\", \"workload\": \"peak_rss_mib\", \"value\": {:.1}}}", peak_rss_mib());
}
