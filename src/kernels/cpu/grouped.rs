//! Products over channel groups, the two halves of the vision tower's channel attention:
//! - [`grouped_matmul`]: each row's channel groups times their group's matrix, `x` `[R, G*d]` times `w`
//!   `[G, d, e]` → `[R, G*e]`, where output group `g` of a row is the row's input group `g` times `w[g]`;
//! - [`grouped_outer_sums`]: per group, the sum over rows of the outer product of the row's group in one
//!   half of `x` `[R, 2*G*d]` with its group in the other half → `[G, d, d]` (the attention scores `qᵀk`).
//!
//! The channel attention applies its per-group attention weights to every token with the first. As
//! tensor ops that is a transpose of the tokens to groups first, a batched matmul of many small products and
//! a transpose back, with the copies (and, in bf16, conversions to f32 and back) dominating the few
//! multiply-adds. Here each row is read in place and written once; the sums are taken in f32 and rounded once
//! to the input's dtype. Subnormal entries of `w` count as zero (see `cpu_fwd`).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::features::wide_fn;
use super::storage::{contiguous, contiguous_f32, Element};

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 64;

/// `x` `[R, G*d]` (CPU, f32 or bf16) times `w` `[G, d, e]` (CPU, f32) by groups → `[R, G*e]` in `x`'s dtype.
pub fn grouped_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2_no_bwd(&w.contiguous()?, &GroupedMatmul)
}

struct GroupedMatmul;

/// For `x` `[R, 2*G*d]` (CPU, f32 or bf16; its first half the `q`, its second the `k` of `G` groups of `d`)
/// the f32 sums over the rows `Σ_r q[r, g]ᵀ k[r, g]` → `[G, d, d]`, each summed in f32 in row order.
pub fn grouped_outer_sums(x: &Tensor, groups: usize) -> Result<Tensor> {
    x.contiguous()?
        .apply_op1_no_bwd(&GroupedOuterSums { groups })
}

struct GroupedOuterSums {
    groups: usize,
}

impl CustomOp1 for GroupedOuterSums {
    fn name(&self) -> &'static str {
        "grouped-outer-sums"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, width) = xl.shape().dims2()?;
        let groups = self.groups;
        if groups == 0 || width % (2 * groups) != 0 {
            candle_core::bail!(
                "{}: {width} features are not 2 x {groups} groups",
                self.name()
            );
        }
        let d = width / 2 / groups;
        let out = match x {
            CpuStorage::BF16(x) => outer_sums(contiguous(x, xl)?, groups, d),
            _ => outer_sums(contiguous_f32(x, xl, self.name())?, groups, d),
        };
        Ok((CpuStorage::F32(out), Shape::from((groups, d, d))))
    }
}

/// One task per group, over all rows, its `d`×`d` sums in a buffer of its own that stays in L1.
fn outer_sums<T: Element>(x: &[T], groups: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0f32; groups * d * d];
    out.par_chunks_mut(d * d)
        .enumerate()
        .for_each(|(g, sums)| outer_sums_wide(x, (groups, d, g), sums));
    out
}

wide_fn! {
    fn outer_sums_wide[T: Element](x: &[T], shape: (usize, usize, usize), sums: &mut [f32]) = outer_sums_portable;
}

/// Group `g`'s sums: for each row, `sums[i][..] += q[i] * k[..]`; for the released models' groups of 32
/// in register blocks ([`outer_sums_blocked`]).
#[inline(always)]
fn outer_sums_portable<T: Element>(
    x: &[T],
    (groups, d, g): (usize, usize, usize),
    sums: &mut [f32],
) {
    if d == 32 {
        return outer_sums_blocked::<T, 32>(x, groups, g, sums);
    }
    let c = groups * d;
    let mut k = vec![0f32; d];
    for row in x.chunks_exact(2 * c) {
        let q = &row[g * d..(g + 1) * d];
        for (kv, &v) in k.iter_mut().zip(&row[c + g * d..c + (g + 1) * d]) {
            *kv = v.to_f32();
        }
        for (&qv, sums_row) in q.iter().zip(sums.chunks_exact_mut(d)) {
            let qv = qv.to_f32();
            for (s, &kv) in sums_row.iter_mut().zip(&k) {
                *s += qv * kv;
            }
        }
    }
}

/// The sums' rows four at a time, their sums in registers over a run of [`OUTER_RUN`] rows of `x` (whose
/// group values stay in L1 for the passes): each row's `k` widened once per four rows of sums and used by
/// their independent sums (one row of sums alone is a chain of dependent adds). Each sum adds its products
/// in the order of the rows, as the one-row loop of [`outer_sums_portable`] does.
#[inline(always)]
fn outer_sums_blocked<T: Element, const D: usize>(
    x: &[T],
    groups: usize,
    g: usize,
    sums: &mut [f32],
) {
    const { assert!(D.is_multiple_of(4)) };
    let c = groups * D;
    for run in x.chunks(2 * c * OUTER_RUN) {
        for (block, sums_rows) in sums.chunks_exact_mut(4 * D).enumerate() {
            let first = g * D + 4 * block;
            // Four named arrays rather than an array of them, which the vectorizer leaves in memory.
            let (mut s0, mut s1, mut s2, mut s3) = ([0f32; D], [0f32; D], [0f32; D], [0f32; D]);
            for row in run.chunks_exact(2 * c) {
                let k: &[T; D] = row[c + g * D..][..D].try_into().expect("D values");
                let q = &row[first..][..4];
                let (q0, q1, q2, q3) = (q[0].to_f32(), q[1].to_f32(), q[2].to_f32(), q[3].to_f32());
                for j in 0..D {
                    let kv = k[j].to_f32();
                    s0[j] += q0 * kv;
                    s1[j] += q1 * kv;
                    s2[j] += q2 * kv;
                    s3[j] += q3 * kv;
                }
            }
            let block_sums = s0.iter().chain(&s1).chain(&s2).chain(&s3);
            for (s, a) in sums_rows.iter_mut().zip(block_sums) {
                *s += a;
            }
        }
    }
}

/// Rows of `x` summed per pass over the sums' rows.
const OUTER_RUN: usize = 256;

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

fn run<T: Element>(x: &[T], w: &[f32], (groups, d, e): (usize, usize, usize)) -> Vec<T> {
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
    fn rows[T: Element](out: &mut [T], x: &[T], w: &[f32], shape: (usize, usize, usize), acc: &mut [f32]) = rows_portable;
}

/// Rows of `x` (`groups` groups of `d`) times their group's `d`×`e` block of `w` into `out` (groups of `e`);
/// `acc` holds `e` sums. The released models' groups are 32 wide: with `e` known at compile time the sums
/// stay in registers, for [`ROWS_TOGETHER`] rows at a time.
#[inline(always)]
fn rows_portable<T: Element>(
    out: &mut [T],
    x: &[T],
    w: &[f32],
    (groups, d, e): (usize, usize, usize),
    acc: &mut [f32],
) {
    // Group by group over the task's rows, so that the group's block of `w` stays in L1.
    for (g, w_group) in w.chunks_exact(d * e).enumerate().take(groups) {
        let rows = out
            .chunks_mut(ROWS_TOGETHER * groups * e)
            .zip(x.chunks(ROWS_TOGETHER * groups * d));
        for (out_rows, x_rows) in rows {
            let layout = (groups, d, g);
            match (e, x_rows.len() / (groups * d)) {
                (32, ROWS_TOGETHER) => {
                    group_rows::<T, 32, ROWS_TOGETHER>(out_rows, x_rows, w_group, layout)
                }
                (16, ROWS_TOGETHER) => {
                    group_rows::<T, 16, ROWS_TOGETHER>(out_rows, x_rows, w_group, layout)
                }
                (32, _) => group_rows::<T, 32, 1>(out_rows, x_rows, w_group, layout),
                (16, _) => group_rows::<T, 16, 1>(out_rows, x_rows, w_group, layout),
                _ => {
                    for (out_row, x_row) in out_rows
                        .chunks_exact_mut(groups * e)
                        .zip(x_rows.chunks_exact(groups * d))
                    {
                        let out_group = &mut out_row[g * e..(g + 1) * e];
                        group(out_group, &x_row[g * d..(g + 1) * d], w_group, acc);
                    }
                }
            }
        }
    }
}

/// Rows of `x` that [`rows_portable`] sums together: their sums are independent chains of multiply-adds
/// (one row's 2 vectors of 32 sums wait on each other's adds).
const ROWS_TOGETHER: usize = 4;

/// Group `g` of each row of `x` (`groups` groups of `d`) times `w_group` (`d`×`E`) into group `g` of each row
/// of `out`, `R` rows at a time (the rows after the last whole `R` one at a time); each output summed in
/// order of the inputs, as [`group`] sums it.
#[inline(always)]
fn group_rows<T: Element, const E: usize, const R: usize>(
    out: &mut [T],
    x: &[T],
    w_group: &[f32],
    (groups, d, g): (usize, usize, usize),
) {
    let rows = out
        .chunks_exact_mut(R * groups * E)
        .zip(x.chunks_exact(R * groups * d));
    for (out, x) in rows {
        let mut acc = [[0f32; E]; R];
        for (t, w_row) in w_group.chunks_exact(E).enumerate() {
            for (r, acc) in acc.iter_mut().enumerate() {
                let xv = x[r * groups * d + g * d + t].to_f32();
                for (a, &wv) in acc.iter_mut().zip(w_row) {
                    *a += xv * wv;
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let out = &mut out[r * groups * E + g * E..][..E];
            for (o, &a) in out.iter_mut().zip(acc) {
                *o = T::from_f32(a);
            }
        }
    }
}

/// One group: `out = x_group @ w_group` (`d`×`e`, `e` = `acc.len()`), summed in `acc`.
#[inline(always)]
fn group<T: Element>(out: &mut [T], x: &[T], w: &[f32], acc: &mut [f32]) {
    let e = acc.len();
    acc.fill(0.0);
    for (&xv, w_row) in x.iter().zip(w.chunks_exact(e)) {
        let xv = xv.to_f32();
        for (a, &wv) in acc.iter_mut().zip(w_row) {
            *a += xv * wv;
        }
    }
    for (o, &a) in out.iter_mut().zip(acc.iter()) {
        *o = T::from_f32(a);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Rows `[R, G*d]` as f32 groups `[G, R, d]`.
    fn by_group(x: &Tensor, groups: usize) -> Tensor {
        let (rows, width) = x.dims2().unwrap();
        let x = x.to_dtype(DType::F32).unwrap();
        let x = x.reshape((rows, groups, width / groups)).unwrap();
        x.transpose(0, 1).unwrap().contiguous().unwrap()
    }

    fn max_abs_diff(a: Tensor, b: Tensor) -> f32 {
        let diff = (a - b).and_then(|d| d.abs()).and_then(|d| d.max_all());
        diff.and_then(|d| d.to_scalar::<f32>()).unwrap()
    }

    /// Against the tensor ops in f32: the halves by group, transposed, a batched matmul.
    #[test]
    fn outer_sums_match_the_batched_matmul() {
        let dev = Device::Cpu;
        for (rows, groups, d) in [(1, 1, 1), (7, 2, 3), (300, 4, 32)] {
            let x = Tensor::randn(0f32, 1., (rows, 2 * groups * d), &dev).unwrap();
            for dtype in [DType::F32, DType::BF16] {
                let x = x.to_dtype(dtype).unwrap();
                let half =
                    |i: usize| by_group(&x.narrow(1, i * groups * d, groups * d).unwrap(), groups);
                let want = half(0).transpose(1, 2).unwrap().matmul(&half(1)).unwrap();
                let got = grouped_outer_sums(&x, groups).unwrap();
                assert_eq!(got.dims(), &[groups, d, d]);
                let diff = max_abs_diff(got, want);
                // Both sum exact products of the same values in f32, in different orders.
                assert!(diff <= 1e-3, "{rows}x{groups}x{d} {dtype:?}: {diff}");
            }
        }
    }

    /// The register-blocked kernels of the released models' groups of 32 (and 16) give the bits of the
    /// one-row loops they replace: the same products added in the same order.
    #[test]
    fn blocked_kernels_give_the_bits_of_the_one_row_loops() {
        let values = |len: usize, seed: u64| -> Vec<f32> {
            let t = Tensor::randn(0f32, 1., len, &Device::Cpu).unwrap();
            let t = (t + seed as f64).unwrap();
            t.to_vec1().unwrap()
        };
        let (rows, groups, d) = (300, 2, 32);
        let x = values(rows * 2 * groups * d, 1);
        let got = outer_sums(&x, groups, d);
        let c = groups * d;
        for (at, got) in got.iter().enumerate() {
            let (g, i, j) = (at / (d * d), at / d % d, at % d);
            let want = x.chunks(2 * c * OUTER_RUN).fold(0f32, |sum, run| {
                let products = run
                    .chunks_exact(2 * c)
                    .map(|r| r[g * d + i] * r[c + g * d + j]);
                sum + products.fold(0f32, |acc, p| acc + p)
            });
            assert_eq!(got.to_bits(), want.to_bits(), "outer sums ({g}, {i}, {j})");
        }
        for e in [16, 32] {
            let rows = 2 * ROWS_PER_TASK + ROWS_TOGETHER + 3;
            let (x, w) = (values(rows * groups * d, 2), values(groups * d * e, 3));
            let got = run(&x, &w, (groups, d, e));
            let mut want = vec![0f32; rows * groups * e];
            for (out, x) in want
                .chunks_exact_mut(groups * e)
                .zip(x.chunks_exact(groups * d))
            {
                for g in 0..groups {
                    let w = &w[g * d * e..][..d * e];
                    let x = &x[g * d..][..d];
                    group(&mut out[g * e..][..e], x, w, &mut vec![0f32; e]);
                }
            }
            let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "rows times groups of {e}");
        }
    }

    /// Against the tensor ops: groups first, a batched matmul in f32, back to rows.
    #[test]
    fn matches_the_batched_matmul() {
        let dev = Device::Cpu;
        for (rows, groups, d, e) in [(1, 1, 1, 1), (3, 2, 5, 7), (130, 4, 32, 32), (65, 3, 8, 16)] {
            let x = Tensor::randn(0f32, 1., (rows, groups * d), &dev).unwrap();
            let w = Tensor::randn(0f32, 1., (groups, d, e), &dev).unwrap();
            for dtype in [DType::F32, DType::BF16] {
                let x = x.to_dtype(dtype).unwrap();
                let want = by_group(&x, groups)
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
                let diff = max_abs_diff(got, want);
                // f32: summation order only; bf16: at most one rounding step of the outputs (up to ~20).
                let tol = if dtype == DType::F32 { 1e-4 } else { 0.13 };
                assert!(diff <= tol, "{rows}x{groups}x{d}x{e} {dtype:?}: {diff}");
            }
        }
    }
}
