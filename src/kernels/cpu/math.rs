//! Scalar math written so that loops over it vectorize: branch-free `exp`, `erf` and GELU, and a sum in
//! interleaved partial sums. Called from kernels compiled through [`super::features::wide_fn!`].

use super::storage::Element;

/// `e^x` for f32, branch-free so that loops over it vectorize: `x = n ln2 + r` with `|r| <= ln2 / 2`, a
/// degree-7 Taylor polynomial for `e^r` (truncation under 1e-8 relative, about f32's own rounding) and `2^n`
/// put into the exponent bits. 0 below -87.3, where `2^n` would leave the normal range; the callers
/// (softmax) pass values up to 0.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 * 2^23: adding it rounds to an integer (to nearest) in plain SSE2, where `round` is a libm call.
    const ROUND: f32 = 12_582_912.0;
    let x = x.min(88.0);
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    // Horner's rule from the highest coefficient: the bits of starting from 0 one step earlier (`0 * r + c`
    // is `c` for a finite `r`; `r` is NaN only for x = -inf, whose result is 0 either way).
    let p = [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ]
    .iter()
    .fold(1.0 / 5040.0, |acc, &c| acc * r + c);
    // `n` as an integer from the low mantissa bits of `shifted` (integer operations only: a float-to-int
    // `as` saturates, which keeps the loop from vectorizing). Garbage below -87.3, where the result is 0.
    let n_int = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let scale = f32::from_bits((n_int.wrapping_add(127).max(0) as u32) << 23);
    if x < -87.3 {
        0.0
    } else {
        p * scale
    }
}

/// `Σ f(x)` in 16 interleaved partial sums, so that the loop vectorizes.
#[inline(always)]
pub fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = xs.chunks_exact(16);
    let rest: f32 = chunks.remainder().iter().map(|&x| f(x)).sum();
    for chunk in chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a += f(x);
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// The largest of `xs` (NaNs ignored, as `f32::max` ignores them; -inf for none) in 16 interleaved partial
/// maxima, so that the loop vectorizes (one running maximum is a chain of dependent instructions).
#[inline(always)]
pub fn lane_max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = xs.chunks_exact(16);
    let rest = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for chunk in chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a = a.max(x);
        }
    }
    acc.iter().copied().fold(rest, f32::max)
}

/// `Σ a[i] b[i]` in 16 interleaved partial sums, so that the loop vectorizes; `b` of any [`Element`], read as
/// f32 (exactly: the sums are those of `b` widened first).
#[inline(always)]
pub fn dot<T: Element>(a: &[f32], b: &[T]) -> f32 {
    let mut acc = [0f32; 16];
    let (a_chunks, b_chunks) = (a.chunks_exact(16), b.chunks_exact(16));
    let rest: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y.to_f32())
        .sum();
    for (a, b) in a_chunks.zip(b_chunks) {
        for ((acc, x), y) in acc.iter_mut().zip(a).zip(b) {
            *acc += x * y.to_f32();
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// `x · Φ(x)`, the exact GELU.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// erf as an odd rational function of `x` clamped to [-4, 4] (beyond, erf is ±1 in f32): the minimax
/// approximation Eigen and XLA use for f32, within a few ulp of the exact value. Branch-free, so loops over
/// it vectorize, except on an x86-64 CPU without FMA (below). Its Horner steps are fused multiply-adds
/// (`mul_add`): one instruction each in the wide kernels (AVX2 + FMA and up, and every aarch64 CPU) where a
/// multiply and an add took two, with one rounding; an x86-64 CPU without FMA (the baseline tier) gets the
/// same bits from libm's `fmaf`, one call a step.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    const ALPHA: [f32; 7] = [
        -2.726_142_3e-10,
        2.770_681_4e-8,
        -2.101_024e-6,
        -5.692_506_4e-5,
        -7.349_906_3e-4,
        -2.954_6e-3,
        -1.609_603_3e-2,
    ];
    const BETA: [f32; 5] = [
        -1.456_607_2e-5,
        -2.133_740_6e-4,
        -1.682_827e-3,
        -7.373_329_2e-3,
        -1.426_474e-2,
    ];
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = ALPHA.iter().fold(0f32, |acc, &a| acc.mul_add(x2, a)) * x;
    let q = BETA.iter().fold(0f32, |acc, &b| acc.mul_add(x2, b));
    p / q
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_within_a_few_ulp() {
        for i in -100_000..=8_800 {
            let x = i as f32 / 1000.0;
            let (got, want) = (exp(x), (x as f64).exp());
            if x < -87.3 {
                assert_eq!(got, 0.0, "exp({x})");
            } else {
                assert!(
                    ((got as f64 - want) / want).abs() < 3e-7,
                    "exp({x}): {got} vs {want}"
                );
            }
        }
    }
}
