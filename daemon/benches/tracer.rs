//! How long the path tracer of per-row explanations (`engine::path`) takes
//! on a network of the explanation benchmark's shape (hidden [64, 32], one
//! logit), without PostgreSQL, the pipeline or the head: the number to
//! watch when changing the tracer, steadier than the SQL benchmark
//! (deploy/explain.sh) because nothing else runs.
//!
//! `cargo bench -p cerebro-daemon --bench tracer` prints, for each of nine
//! rounds over 7,043 rows with random one-hot inputs, the time a row and a
//! piece, then the best round.

use std::time::Instant;

use cerebro_daemon::engine::path::{Piece, Scratch, Tracer};
use cerebro_daemon::engine::{Activation, Arch, Op, Stack};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const INPUTS: usize = 48;
const ROWS: usize = 7043;

fn main() {
    let ops = vec![
        Op::Dense { inputs: INPUTS, outputs: 64 },
        Op::Activation { f: Activation::Relu },
        Op::Dense { inputs: 64, outputs: 32 },
        Op::Activation { f: Activation::Relu },
        Op::Dense { inputs: 32, outputs: 1 },
    ];
    let arch = Arch { inputs: INPUTS, embeddings: vec![], ops, periodic: None };
    let net = Stack::new(arch, 5, &mut [ChaCha8Rng::seed_from_u64(3)]);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let x: Vec<f32> = (0..ROWS * INPUTS).map(|_| if rng.random_bool(0.3) { 1.0 } else { 0.0 }).collect();
    let products = net.linear_products(&x, &[], ROWS);
    let h = products.len() / ROWS;
    let mut scratch = Scratch::default();
    let mut out = vec![0.0; h];
    // A sigmoid head's weight on a piece, in closed form.
    let weigh = |p: &Piece<'_>, w: &mut [f64]| {
        let sigmoid = |f: f64| 1.0 / (1.0 + (-f).exp());
        let (f0, f1) = (p.a[0] + p.start * p.b[0], p.a[0] + p.end * p.b[0]);
        w[0] = if (f1 - f0).abs() > 1e-9 {
            (sigmoid(f1) - sigmoid(f0)) / p.b[0]
        } else {
            sigmoid(f0) * (1.0 - sigmoid(f0)) * (p.end - p.start)
        };
    };
    let mut best = f64::INFINITY;
    for round in 0..9 {
        let started = Instant::now();
        let tracer = Tracer::new(&net, &products[..h]).expect("a piecewise-linear network");
        let (mut pieces, mut sum) = (0, 0.0);
        for r in 0..ROWS {
            pieces +=
                tracer.integrate(&products[r * h..(r + 1) * h], weigh, &mut scratch, &mut out).expect("few bends");
            sum += out.iter().sum::<f64>();
        }
        let took = started.elapsed().as_secs_f64();
        best = best.min(took / ROWS as f64);
        println!(
            "round {round}: {:.2} µs a row, {:.1} pieces a row, {:.0} ns a piece (integrals' sum {sum})",
            took * 1e6 / ROWS as f64,
            pieces as f64 / ROWS as f64,
            took * 1e9 / pieces as f64
        );
    }
    println!("best: {:.2} µs a row", best * 1e6);
}
