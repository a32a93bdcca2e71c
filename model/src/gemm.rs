//! Safe wrappers over the `gemm` crate's f32 kernels (AVX-512 where the CPU
//! has it, chosen at run time) for row-major and strided matrices.

/// `c = op(a) · op(b) + beta · c`, with `op(a)` of shape m×k and `op(b)` k×n,
/// every matrix stored row-major. `a_t` / `b_t` read the stored matrix
/// transposed (the stored shapes are then k×m and n×k).
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub fn gemm(m: usize, k: usize, n: usize, a: &[f32], a_t: bool, b: &[f32], b_t: bool, beta: f32, c: &mut [f32]) {
    let sa = if a_t { (1, m) } else { (k, 1) };
    let sb = if b_t { (1, k) } else { (n, 1) };
    gemm_strided(m, k, n, a, sa, b, sb, beta, c, (n, 1));
}

/// Highest index a `rows × cols` view with these (row, column) strides touches.
fn reach(rows: usize, cols: usize, (rs, cs): (usize, usize)) -> usize {
    (rows - 1) * rs + (cols - 1) * cs
}

/// `c = a · b + beta · c` over strided views: element (i, j) of a matrix is
/// at `i * row_stride + j * col_stride` of its slice. Views may be blocks of
/// wider matrices, which is how a stack multiplies each model's block in place.
#[allow(clippy::too_many_arguments)]
pub fn gemm_strided(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    sa: (usize, usize),
    b: &[f32],
    sb: (usize, usize),
    beta: f32,
    c: &mut [f32],
    sc: (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(reach(m, n, sc) < c.len(), "gemm: c view out of bounds");
    if k > 0 {
        assert!(reach(m, k, sa) < a.len() && reach(k, n, sb) < b.len(), "gemm: a or b view out of bounds");
    }
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                let v = &mut c[i * sc.0 + j * sc.1];
                *v = if beta == 0.0 { 0.0 } else { *v * beta };
            }
        }
        return;
    }
    // SAFETY: the asserts above bound every index the kernel touches. The
    // crate computes dst = alpha·dst + beta·lhs·rhs, reading dst only when asked.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            sc.1 as isize,
            sc.0 as isize,
            beta != 0.0,
            a.as_ptr(),
            sa.1 as isize,
            sa.0 as isize,
            b.as_ptr(),
            sb.1 as isize,
            sb.0 as isize,
            beta,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Reduction depth per call of [`gemm_uniform`]: at or below the crate's
/// smallest k-block, so the crate never splits k on its own.
const UNIFORM_KC: usize = 512;

/// Buffers [`gemm_uniform`] reuses across calls.
#[derive(Debug, Default)]
pub struct UniformScratch {
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
}

/// `c = a · b` where every element's arithmetic depends only on `k` and the
/// values, never on `m`, `n` or the strides.
///
/// The `gemm` crate picks its kernel by shape: a horizontal dot-product
/// kernel when both operands are contiguous along k and `m·n ≤ 256`, gemv
/// kernels when `m` or `n` is 1, and a k-blocking that differs between small
/// and large shapes. Each sums in another order. A stack multiplies all K
/// models' first layers in one product whose `n` grows with K, so this wrapper
/// keeps every call on the packed kernel: `b` row-major with at least two
/// columns, at least two rows, and k blocked here. That is what makes a model
/// trained in a stack bit-identical to the model trained alone.
#[allow(clippy::too_many_arguments)]
pub fn gemm_uniform(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    sa: (usize, usize),
    b: &[f32],
    sb: (usize, usize),
    c: &mut [f32],
    sc: (usize, usize),
    scratch: &mut UniformScratch,
) {
    if m == 0 || n == 0 {
        return;
    }
    let (m2, n2) = (m.max(2), n.max(2));
    // b as a row-major k × n2 matrix (at least two columns).
    let (b, sb) = if sb.1 == 1 && sb.0 >= 2 && n >= 2 {
        (b, sb)
    } else {
        scratch.b.clear();
        scratch.b.resize(k * n2, 0.0);
        for p in 0..k {
            for j in 0..n {
                scratch.b[p * n2 + j] = b[p * sb.0 + j * sb.1];
            }
        }
        (&scratch.b[..], (n2, 1))
    };
    // a with at least two rows.
    let (a, sa) = if m >= 2 {
        (a, sa)
    } else {
        scratch.a.clear();
        scratch.a.resize(2 * k, 0.0);
        for p in 0..k {
            scratch.a[p] = a[p * sa.1];
        }
        (&scratch.a[..], (k, 1))
    };
    let padded = m < 2 || n < 2;
    if padded {
        scratch.c.clear();
        scratch.c.resize(m2 * n2, 0.0);
    }
    let (c_view, c_strides): (&mut [f32], (usize, usize)) =
        if padded { (&mut scratch.c[..], (n2, 1)) } else { (&mut *c, sc) };
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                c_view[i * c_strides.0 + j * c_strides.1] = 0.0;
            }
        }
    }
    for start in (0..k).step_by(UNIFORM_KC) {
        let kb = UNIFORM_KC.min(k - start);
        let beta = if start == 0 { 0.0 } else { 1.0 };
        let (mm, nn) = if padded { (m2, n2) } else { (m, n) };
        gemm_strided(mm, kb, nn, &a[start * sa.1..], sa, &b[start * sb.0..], sb, beta, c_view, c_strides);
    }
    if padded {
        for i in 0..m {
            for j in 0..n {
                c[i * sc.0 + j * sc.1] = scratch.c[i * n2 + j];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::{gemm, gemm_uniform, UniformScratch};

    /// A model's block of a K-wide product equals the product computed alone,
    /// bit for bit, across the shapes where the crate switches kernels.
    #[test]
    fn uniform_products_do_not_depend_on_the_width() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut scratch = UniformScratch::default();
        for k in [1usize, 2, 3, 20, 513, 1100] {
            for h in [1usize, 2, 6, 16, 32] {
                for models in [2usize, 3, 8] {
                    for m in [1usize, 2, 3, 7, 16, 40, 70] {
                        let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
                        // b stored out × k per model, read transposed, as the engine does.
                        let b: Vec<f32> = (0..models * h * k).map(|_| rng.random_range(-1.0..1.0)).collect();
                        let wide_n = models * h;
                        let mut wide = vec![f32::NAN; m * wide_n];
                        gemm_uniform(m, k, wide_n, &a, (k, 1), &b, (1, k), &mut wide, (wide_n, 1), &mut scratch);
                        let model = models - 1;
                        let mut alone = vec![f32::NAN; m * h];
                        let b_model = &b[model * h * k..];
                        gemm_uniform(m, k, h, &a, (k, 1), b_model, (1, k), &mut alone, (h, 1), &mut scratch);
                        for i in 0..m {
                            assert_eq!(
                                &wide[i * wide_n + model * h..i * wide_n + (model + 1) * h],
                                &alone[i * h..(i + 1) * h],
                                "k {k} h {h} K {models} m {m}"
                            );
                        }
                        let naive: f32 = (0..k).map(|p| a[p] * b_model[p]).sum();
                        assert!((alone[0] - naive).abs() <= 1e-3 * (k as f32).sqrt(), "{} vs {naive}", alone[0]);
                    }
                }
            }
        }
    }

    fn naive(
        m: usize,
        k: usize,
        n: usize,
        a: impl Fn(usize, usize) -> f32,
        b: impl Fn(usize, usize) -> f32,
    ) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a(i, p) * b(p, j)).sum();
            }
        }
        c
    }

    #[test]
    fn all_transpose_combinations_match_the_definition() {
        let (m, k, n) = (3, 4, 5);
        let a: Vec<f32> = (0..m * k).map(|x| x as f32 * 0.5 - 2.0).collect();
        let b: Vec<f32> = (0..k * n).map(|x| (x as f32).sin()).collect();
        for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
            let ea = |i: usize, p: usize| if a_t { a[p * m + i] } else { a[i * k + p] };
            let eb = |p: usize, j: usize| if b_t { b[j * k + p] } else { b[p * n + j] };
            let want = naive(m, k, n, ea, eb);
            let mut c = vec![1.0; m * n];
            gemm(m, k, n, &a, a_t, &b, b_t, 0.0, &mut c);
            for (x, y) in c.iter().zip(&want) {
                assert!((x - y).abs() < 1e-5, "a_t={a_t} b_t={b_t}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn beta_accumulates() {
        let mut c = vec![1.0; 1];
        gemm(1, 1, 1, &[2.0], false, &[3.0], false, 1.0, &mut c);
        assert_eq!(c, vec![7.0]);
    }
}
