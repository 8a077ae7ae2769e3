//! Building blocks shared by the vision tower and the language model.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use candle_nn::Activation;
use rayon::prelude::*;

/// Scaled dot-product attention over the last two dims: `softmax(q @ kᵀ * scale + mask) @ v`.
///
/// The scale is applied after the product, as transformers' eager attention does. `mask` is additive
/// (0 where attending is allowed, a large negative value elsewhere) and broadcast over the scores.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = match mask {
        Some(mask) => scores.broadcast_add(mask)?,
        None => scores,
    };
    candle_nn::ops::softmax_last_dim(&scores)?.matmul(v)
}

/// The activation transformers' `ACT2FN[name]` gives, for the names Florence-2 configs use.
pub fn activation(name: &str) -> std::result::Result<Activation, String> {
    match name {
        "gelu" => Ok(Activation::Gelu),
        "gelu_new" | "gelu_fast" => Ok(Activation::NewGelu),
        "gelu_pytorch_tanh" => Ok(Activation::GeluPytorchTanh),
        "relu" => Ok(Activation::Relu),
        "silu" | "swish" => Ok(Activation::Silu),
        other => Err(format!(
            "activation_function {other:?} is not supported (gelu, gelu_new, relu, silu)"
        )),
    }
}

/// `xs.apply(&act)`. The exact GELU (`gelu`, the released configs' activation) of a CPU f32 tensor uses a
/// vectorizable erf: candle's `gelu_erf` calls libm's scalar `erf` per element, which made it about a tenth
/// of the vision tower's time.
pub fn activate(xs: &Tensor, act: Activation) -> Result<Tensor> {
    if matches!(act, Activation::Gelu)
        && xs.device().is_cpu()
        && xs.dtype() == DType::F32
        && xs.is_contiguous()
    {
        xs.apply_op1_no_bwd(&GeluErf)
    } else {
        xs.apply(&act)
    }
}

/// The f32 data of a custom op's operand, which must be contiguous; the error names the op.
pub fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&data[start..end]),
        _ => candle_core::bail!("{op} takes contiguous f32 tensors"),
    }
}

/// `x · Φ(x) = x/2 · (1 + erf(x/√2))` for contiguous f32 storage.
struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf-fast"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let values = contiguous_f32(storage, layout, self.name())?;
        let mut out = vec![0f32; values.len()];
        out.par_chunks_mut(1 << 14)
            .zip(values.par_chunks(1 << 14))
            .for_each(|(out, xs)| {
                simd(|| {
                    for (o, &x) in out.iter_mut().zip(xs) {
                        *o = 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
                    }
                })
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// erf as an odd rational function of `x` clamped to [-4, 4] (beyond, erf is ±1 in f32): the minimax
/// approximation Eigen and XLA use for f32, within a few ulp of the exact value. Branch-free, so loops over
/// it vectorize.
#[inline(always)]
fn erf(x: f32) -> f32 {
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
    let p = ALPHA.iter().fold(0.0, |acc, &a| acc * x2 + a) * x;
    let q = BETA.iter().fold(0.0, |acc, &b| acc * x2 + b);
    p / q
}

/// Runs `kernel` inside a function compiled for AVX2 + FMA when this x86-64 CPU has them: the default build
/// targets baseline x86-64 (SSE2), so a plain loop vectorizes 4 floats wide; inlined here it gets 8. The
/// kernel's own helpers should be `#[inline(always)]` so that they are compiled in this context too.
#[inline(always)]
pub fn simd<R>(kernel: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<R>(kernel: impl FnOnce() -> R) -> R {
            kernel()
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features `avx2` is compiled for.
            return unsafe { avx2(kernel) };
        }
    }
    kernel()
}

/// `f` applied to consecutive slices of at most `rows` along dim 0 of `xs`, the results concatenated.
/// Row-local work (an MLP, window attention) over a large feature map then keeps its intermediates a few
/// MiB: small enough to stay in cache and to be reused by the allocator instead of being mapped fresh (and
/// page-faulted and zeroed) on every call.
pub fn map_row_chunks(
    xs: &Tensor,
    rows: usize,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let total = xs.dim(0)?;
    if total <= rows {
        return f(xs);
    }
    let parts = (0..total)
        .step_by(rows.max(1))
        .map(|start| f(&xs.narrow(0, start, rows.min(total - start))?))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&parts, 0)
}

/// `[B, C, H, W]` → `[B, H*W, C]`.
pub fn nchw_to_tokens(xs: &Tensor) -> Result<Tensor> {
    xs.flatten_from(2)?.transpose(1, 2)?.contiguous()
}

/// `[B, H*W, C]` → `[B, C, H, W]`.
pub fn tokens_to_nchw(xs: &Tensor, height: usize, width: usize) -> Result<Tensor> {
    let (b, _, c) = xs.dims3()?;
    xs.transpose(1, 2)?
        .contiguous()?
        .reshape((b, c, height, width))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fast_gelu_matches_candle_gelu_erf() {
        let xs = (Tensor::arange(-12_000f32, 12_000f32, &Device::Cpu).unwrap() / 1000.).unwrap();
        let expected: Vec<f32> = xs.gelu_erf().unwrap().to_vec1().unwrap();
        let got: Vec<f32> = activate(&xs, Activation::Gelu).unwrap().to_vec1().unwrap();
        for ((e, g), x) in expected.iter().zip(&got).zip(xs.to_vec1::<f32>().unwrap()) {
            // In the far negative tail both lose `1 + erf` to cancellation: a few 1e-6 absolute is f32 noise.
            assert!(
                (e - g).abs() <= 2e-6 + 1e-6 * e.abs(),
                "gelu({x}): {g} vs {e}"
            );
        }
    }

    #[test]
    fn row_chunks_equal_one_call() {
        let xs = Tensor::randn(0f32, 1., (10, 3), &Device::Cpu).unwrap();
        let f = |t: &Tensor| t.sqr()?.sum_keepdim(1);
        let whole: Vec<Vec<f32>> = f(&xs).unwrap().to_vec2().unwrap();
        for rows in [1, 3, 4, 10, 11] {
            let chunked: Vec<Vec<f32>> = map_row_chunks(&xs, rows, f).unwrap().to_vec2().unwrap();
            assert_eq!(chunked, whole, "{rows} rows a chunk");
        }
    }
}
