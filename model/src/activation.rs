//! Hidden-layer nonlinearities: values and derivatives, in f32.
//!
//! The exported ONNX graph repeats these formulas op for op (see onnx/export.rs).

pub use cerebro_shared::spec::Activation;

/// `sqrt(2 / pi)` and the cubic coefficient of GELU's tanh approximation.
pub const GELU_C: f32 = 0.797_884_6;
pub const GELU_A: f32 = 0.044_715;

fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

/// `out[i] = f(z[i])`; `out` may alias nothing, `z` is untouched.
pub fn apply(act: Activation, z: &[f32], out: &mut [f32]) {
    match act {
        Activation::Relu => out.iter_mut().zip(z).for_each(|(o, z)| *o = z.max(0.0)),
        Activation::Tanh => out.iter_mut().zip(z).for_each(|(o, z)| *o = z.tanh()),
        Activation::Silu => out.iter_mut().zip(z).for_each(|(o, z)| *o = z * sigmoid(*z)),
        Activation::Gelu => out.iter_mut().zip(z).for_each(|(o, z)| *o = gelu(*z)),
    }
}

/// In place: `v[i] = f(v[i])`.
pub fn apply_in_place(act: Activation, v: &mut [f32]) {
    match act {
        Activation::Relu => v.iter_mut().for_each(|x| *x = x.max(0.0)),
        Activation::Tanh => v.iter_mut().for_each(|x| *x = x.tanh()),
        Activation::Silu => v.iter_mut().for_each(|x| *x *= sigmoid(*x)),
        Activation::Gelu => v.iter_mut().for_each(|x| *x = gelu(*x)),
    }
}

pub fn gelu(z: f32) -> f32 {
    0.5 * z * (1.0 + (GELU_C * (z + GELU_A * z * z * z)).tanh())
}

/// `delta[i] *= f'(z[i])`.
pub fn backprop(act: Activation, z: &[f32], delta: &mut [f32]) {
    match act {
        // A multiply rather than a branch, so the loop vectorises.
        Activation::Relu => delta.iter_mut().zip(z).for_each(|(d, z)| *d *= (*z > 0.0) as u32 as f32),
        Activation::Tanh => delta.iter_mut().zip(z).for_each(|(d, z)| {
            let t = z.tanh();
            *d *= 1.0 - t * t
        }),
        Activation::Silu => delta.iter_mut().zip(z).for_each(|(d, z)| {
            let s = sigmoid(*z);
            *d *= s * (1.0 + z * (1.0 - s))
        }),
        Activation::Gelu => delta.iter_mut().zip(z).for_each(|(d, z)| {
            let t = (GELU_C * (z + GELU_A * z * z * z)).tanh();
            *d *= 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * GELU_A * z * z)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derivatives_match_finite_differences() {
        for act in [Activation::Relu, Activation::Gelu, Activation::Silu, Activation::Tanh] {
            for z in [-3.0f32, -1.2, -0.3, 0.2, 0.7, 2.5] {
                let f = |x: f32| {
                    let mut o = [0.0];
                    apply(act, &[x], &mut o);
                    o[0] as f64
                };
                let eps = 1e-3;
                let numeric = (f(z + eps) - f(z - eps)) / (2.0 * eps as f64);
                let mut d = [1.0];
                backprop(act, &[z], &mut d);
                assert!((numeric - d[0] as f64).abs() < 1e-3, "{act:?} at {z}: {numeric} vs {}", d[0]);
                let mut inplace = [z];
                apply_in_place(act, &mut inplace);
                assert_eq!(inplace[0] as f64, f(z));
            }
        }
    }

    #[test]
    fn gelu_is_close_to_the_exact_form() {
        // Reference values of x·Φ(x).
        for (x, exact) in [(-1.0f32, -0.158_655_26f32), (0.5, 0.345_731_1), (2.0, 1.954_5)] {
            assert!((gelu(x) - exact).abs() < 1e-3, "{x}: {}", gelu(x));
        }
    }
}
