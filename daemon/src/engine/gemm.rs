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

#[cfg(test)]
mod tests {
    use super::gemm;

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
