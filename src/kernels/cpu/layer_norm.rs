//! LayerNorm over the last dim with weight and bias, on the CPU in f32 and bf16: two vectorized passes per
//! row in f32 (the mean, then the variance about it, as torch computes it), the output rounded once. candle's
//! CPU kernel sums `x` and `x²` in one sequential scalar loop.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::features::wide_fn;
use super::math::lane_sum;
use super::storage::{contiguous, contiguous_f32};

/// Values per parallel task (whole rows): about 16 Ki.
const TASK_VALUES: usize = 1 << 14;

/// `(xs - mean) / sqrt(var + eps) * weight + bias` over the last dim of a CPU tensor; `xs`, `weight` and
/// `bias` share one dtype, f32 or bf16.
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<Tensor> {
    xs.contiguous()?.apply_op3_no_bwd(
        &weight.contiguous()?,
        &bias.contiguous()?,
        &LayerNormRows { eps },
    )
}

struct LayerNormRows {
    eps: f32,
}

impl LayerNormRows {
    fn normalize<T: Copy + Default + Send + Sync>(
        &self,
        xs: &[T],
        (weight, bias): (&[T], &[T]),
        to: impl Fn(T) -> f32 + Sync,
        from: impl Fn(f32) -> T + Sync,
    ) -> Vec<T> {
        let c = weight.len();
        let weight: Vec<f32> = weight.iter().map(|&w| to(w)).collect();
        let bias: Vec<f32> = bias.iter().map(|&b| to(b)).collect();
        let mut out = vec![T::default(); xs.len()];
        let rows = TASK_VALUES / c.max(1) + 1;
        let params = Params {
            weight: &weight,
            bias: &bias,
            eps: self.eps,
            to,
            from,
        };
        out.par_chunks_mut(rows * c)
            .zip(xs.par_chunks(rows * c))
            .for_each_init(
                || vec![0f32; c],
                |row, (out, xs)| normalize_rows(xs, out, row, &params),
            );
        out
    }
}

/// The per-feature parameters of one LayerNorm, widened to f32, and the conversions of its dtype `T`.
struct Params<'a, ToF32, FromF32> {
    weight: &'a [f32],
    bias: &'a [f32],
    eps: f32,
    to: ToF32,
    from: FromF32,
}

wide_fn! {
    /// The rows of `xs` into `out`, each widened into `row` (one row of f32) first.
    fn normalize_rows[T: Copy, ToF32: Fn(T) -> f32, FromF32: Fn(f32) -> T](
        xs: &[T], out: &mut [T], row: &mut [f32], params: &Params<ToF32, FromF32>
    ) = normalize_rows_portable;
}

#[inline(always)]
fn normalize_rows_portable<T: Copy, ToF32: Fn(T) -> f32, FromF32: Fn(f32) -> T>(
    xs: &[T],
    out: &mut [T],
    row: &mut [f32],
    params: &Params<ToF32, FromF32>,
) {
    let c = params.weight.len();
    for (out, xs) in out.chunks_exact_mut(c).zip(xs.chunks_exact(c)) {
        row.iter_mut()
            .zip(xs)
            .for_each(|(r, &x)| *r = (params.to)(x));
        let mean = lane_sum(row, |x| x) / c as f32;
        let var = lane_sum(row, |x| (x - mean) * (x - mean)) / c as f32;
        let inv_std = 1.0 / (var + params.eps).sqrt();
        let affine = params.weight.iter().zip(params.bias);
        for ((o, &x), (&w, &b)) in out.iter_mut().zip(row.iter()).zip(affine) {
            *o = (params.from)((x - mean) * inv_std * w + b);
        }
    }
}

impl CustomOp3 for LayerNormRows {
    fn name(&self) -> &'static str {
        "layer-norm-rows"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let c = xl.shape().dims().last().copied().unwrap_or(0);
        if wl.shape().elem_count() != c || bl.shape().elem_count() != c {
            candle_core::bail!(
                "layer norm over {c} features with a weight of {} and a bias of {}",
                wl.shape().elem_count(),
                bl.shape().elem_count()
            );
        }
        let out = match (xs, w, b) {
            (CpuStorage::BF16(x), CpuStorage::BF16(w), CpuStorage::BF16(b)) => {
                let [x, w, b] = [(x, xl), (w, wl), (b, bl)].map(|(d, l)| contiguous(d, l));
                CpuStorage::BF16(self.normalize(x?, (w?, b?), |v| v.to_f32(), bf16::from_f32))
            }
            _ => {
                let x = contiguous_f32(xs, xl, self.name())?;
                let (w, b) = (
                    contiguous_f32(w, wl, self.name())?,
                    contiguous_f32(b, bl, self.name())?,
                );
                CpuStorage::F32(self.normalize(x, (w, b), |v| v, |v| v))
            }
        };
        Ok((out, xl.shape().clone()))
    }
}
