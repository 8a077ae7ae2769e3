//! The product of each row's channel groups with their group's matrix: `x` `[R, G*d]` times `w` `[G, d, e]`
//! → `[R, G*e]`, where output group `g` of a row is the row's input group `g` times `w[g]`.
//!
//! The vision tower's channel attention applies its per-group attention weights this way to every token. As
//! tensor ops that is a transpose of the tokens to groups first, a batched matmul of many small products and
//! a transpose back, with the copies (and, in bf16, conversions to f32 and back) dominating the few
//! multiply-adds. Here each row is read in place and written once; the sums are taken in f32 and rounded once
//! to the input's dtype. Subnormal entries of `w` count as zero (see `cpu_fwd`).

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::features::wide_fn;
use super::storage::{contiguous, contiguous_f32};

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 64;

/// `x` `[R, G*d]` (CPU, f32 or bf16) times `w` `[G, d, e]` (CPU, f32) by groups → `[R, G*e]` in `x`'s dtype.
pub fn grouped_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2_no_bwd(&w.contiguous()?, &GroupedMatmul)
}

struct GroupedMatmul;

/// An input row's values, read as f32.
trait Value: Copy + Send + Sync {
    fn f32(self) -> f32;
    fn of(value: f32) -> Self;
}

impl Value for f32 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn of(value: f32) -> Self {
        value
    }
}

impl Value for bf16 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn of(value: f32) -> Self {
        bf16::from_f32(value)
    }
}

impl CustomOp2 for GroupedMatmul {
    fn name(&self) -> &'static str {
        "grouped-row-matmul"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, width) = xl.shape().dims2()?;
        let (groups, d, e) = wl.shape().dims3()?;
        if groups * d != width {
            candle_core::bail!(
                "{}: {width} features are not {groups} groups of {d}",
                self.name()
            );
        }
        // Subnormal weights are read as zero. A product with one is below 2^-126 times the row's value, under
        // the rounding of any sum it could change but the tiniest, while each multiply-add with a subnormal
        // operand costs a microcode assist on Intel CPUs, and softmax probabilities (this op's weights in the
        // channel attention) underflow to subnormals often.
        let w: Vec<f32> = contiguous_f32(w, wl, self.name())?
            .iter()
            .map(|&v| if v.abs() < f32::MIN_POSITIVE { 0.0 } else { v })
            .collect();
        let out_shape = Shape::from((rows, groups * e));
        let out = match x {
            CpuStorage::BF16(x) => CpuStorage::BF16(run(contiguous(x, xl)?, &w, (groups, d, e))),
            _ => CpuStorage::F32(run(contiguous_f32(x, xl, self.name())?, &w, (groups, d, e))),
        };
        Ok((out, out_shape))
    }
}

fn run<T: Value + Default>(x: &[T], w: &[f32], (groups, d, e): (usize, usize, usize)) -> Vec<T> {
    let (width, out_width) = (groups * d, groups * e);
    let mut out = vec![T::default(); x.len() / width.max(1) * out_width];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(ROWS_PER_TASK * out_width)
        .zip(x.par_chunks(ROWS_PER_TASK * width))
        .for_each_init(
            || vec![0f32; e],
            |acc, (out, x)| rows(out, x, w, (groups, d, e), acc),
        );
    out
}

wide_fn! {
    fn rows[T: Value](out: &mut [T], x: &[T], w: &[f32], shape: (usize, usize, usize), acc: &mut [f32]) = rows_portable;
}

/// Rows of `x` (`groups` groups of `d`) times their group's `d`×`e` block of `w` into `out` (groups of `e`);
/// `acc` holds `e` sums.
#[inline(always)]
fn rows_portable<T: Value>(
    out: &mut [T],
    x: &[T],
    w: &[f32],
    (groups, d, e): (usize, usize, usize),
    acc: &mut [f32],
) {
    for (out_row, x_row) in out
        .chunks_exact_mut(groups * e)
        .zip(x.chunks_exact(groups * d))
    {
        for ((out_group, x_group), w_group) in out_row
            .chunks_exact_mut(e)
            .zip(x_row.chunks_exact(d))
            .zip(w.chunks_exact(d * e))
        {
            acc.fill(0.0);
            for (&xv, w_row) in x_group.iter().zip(w_group.chunks_exact(e)) {
                let xv = xv.f32();
                for (a, &wv) in acc.iter_mut().zip(w_row) {
                    *a += xv * wv;
                }
            }
            for (o, &a) in out_group.iter_mut().zip(acc.iter()) {
                *o = T::of(a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Against the tensor ops: groups first, a batched matmul in f32, back to rows.
    #[test]
    fn matches_the_batched_matmul() {
        let dev = Device::Cpu;
        for (rows, groups, d, e) in [(1, 1, 1, 1), (3, 2, 5, 7), (130, 4, 32, 32), (65, 3, 8, 16)] {
            let x = Tensor::randn(0f32, 1., (rows, groups * d), &dev).unwrap();
            let w = Tensor::randn(0f32, 1., (groups, d, e), &dev).unwrap();
            for dtype in [DType::F32, DType::BF16] {
                let x = x.to_dtype(dtype).unwrap();
                let by_group = x
                    .to_dtype(DType::F32)
                    .unwrap()
                    .reshape((rows, groups, d))
                    .unwrap()
                    .transpose(0, 1)
                    .unwrap()
                    .contiguous()
                    .unwrap();
                let want = by_group
                    .matmul(&w)
                    .unwrap()
                    .transpose(0, 1)
                    .unwrap()
                    .reshape((rows, groups * e))
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap();
                let got = grouped_matmul(&x, &w).unwrap();
                assert_eq!(got.dtype(), dtype);
                let got = got.to_dtype(DType::F32).unwrap();
                let diff = (got - want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                // f32: summation order only; bf16: at most one rounding step of the outputs (up to ~20).
                let tol = if dtype == DType::F32 { 1e-4 } else { 0.13 };
                assert!(diff <= tol, "{rows}x{groups}x{d}x{e} {dtype:?}: {diff}");
            }
        }
    }
}
