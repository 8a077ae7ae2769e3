//! Attention on the CPU in f32 as one fused kernel: each task takes one (item, head, block of query rows),
//! computes its scores with a GEMM that reads q and k in place through strides (the gemm crate takes any
//! strides), adds the mask, applies a vectorized softmax in a per-thread buffer that stays in cache, and
//! multiplies by v straight into the output. With tensor ops, candle makes the whole `[B, H, T, S]` score
//! tensor and passes over it four times (product, scale, mask, softmax), in fresh memory for every layer.
//! The pieces ([`Mat`], [`matmul`], [`softmax_rows`]) are shared with the vision tower's window attention
//! ([`super::window_attention`]).

use candle_core::{CpuStorage, DType, Result, Storage, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::features::wide_fn;
use super::math::{dot, exp, lane_max, lane_sum};
use super::parallel::TaskPtr;

/// Query rows per task: 64 rows of scores over ~600 keys stay in L2.
const QUERY_BLOCK: usize = 64;

/// Up to this many rows of `lhs`, [`matmul`] computes its outputs as dot products or row sums in place
/// (a decode step has one query row per task), where a gemm call's packing and dispatch cost more than the
/// product.
const DIRECT_ROWS: usize = 4;

/// `softmax(q kᵀ * scale + mask) v` for f32 CPU tensors `q` `[B, H, T, D]`, `k` and `v` `[B, H, S, D]`, and
/// an additive `mask` broadcastable to `[B, H, T, S]`; `None` where this kernel does not apply (another
/// device or dtype), for the tensor ops.
pub fn fused_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if !(f32_cpu(q) && f32_cpu(k) && f32_cpu(v) && mask.is_none_or(f32_cpu)) {
        return Ok(None);
    }
    let (b, h, t, d) = q.dims4()?;
    let (kb, kh, s, kd) = k.dims4()?;
    if (kb, kh, kd) != (b, h, d) || v.dims() != k.dims() {
        candle_core::bail!(
            "attention: q {:?}, k {:?} and v {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if b * h * t * s * d == 0 {
        return Ok(None); // nothing to compute: the tensor ops handle empty shapes
    }
    let [q, k, v] = [q, k, v].map(|x| x.contiguous());
    let (q, k, v) = (q?, k?, v?);
    // The mask is read through its strides: a broadcast dim has stride 0.
    let mask = mask.map(|m| m.broadcast_as((b, h, t, s))).transpose()?;
    let (q_store, q_layout) = q.storage_and_layout();
    let (k_store, k_layout) = k.storage_and_layout();
    let (v_store, v_layout) = v.storage_and_layout();
    let mask_parts = mask.as_ref().map(|m| m.storage_and_layout());
    let data = |store: &Storage, start: usize| -> Result<*const f32> {
        match store {
            Storage::Cpu(CpuStorage::F32(data)) => Ok(data[start..].as_ptr()),
            _ => candle_core::bail!("attention: expected f32 CPU storage"),
        }
    };
    // SAFETY: q, k, v and the mask are only read, and their storage guards live past the loop.
    let shared = |p: *const f32| unsafe { TaskPtr::read_only(p) };
    let (qp, kp, vp) = (
        shared(data(&q_store, q_layout.start_offset())?),
        shared(data(&k_store, k_layout.start_offset())?),
        shared(data(&v_store, v_layout.start_offset())?),
    );
    let mask = match &mask_parts {
        Some((store, layout)) => {
            let stride = layout.stride();
            Some((
                shared(data(store, layout.start_offset())?),
                [stride[0], stride[1], stride[2], stride[3]],
            ))
        }
        None => None,
    };

    let mut out = vec![0f32; b * h * t * d];
    // SAFETY: `out` lives past the loop, and each task writes only its own rows of it.
    let dst = unsafe { TaskPtr::new(out.as_mut_ptr()) };
    let blocks = t.div_ceil(QUERY_BLOCK);
    let scale = scale as f32;
    (0..b * h * blocks).into_par_iter().for_each_init(
        || vec![0f32; QUERY_BLOCK * s],
        |scores, task| {
            let (item, head, block) = (task / (h * blocks), task / blocks % h, task % blocks);
            let first = block * QUERY_BLOCK;
            let rows = QUERY_BLOCK.min(t - first);
            let head_at = (item * h + head) * t * d;
            let kv_at = (item * h + head) * s * d;
            let scores = &mut scores[..rows * s];
            // SAFETY: q, k and v are contiguous `[B, H, T|S, D]` and outlive the loop; the offsets stay inside
            // this (item, head); each task writes its own rows of `out`; the mask is read within its
            // broadcast layout.
            unsafe {
                let q = Mat::rows(qp.at(head_at + first * d), d);
                let k = Mat::rows(kp.at(kv_at), d);
                matmul((rows, s, d), q, k.t(), scores.as_mut_ptr(), s, scale);
                if let Some((mask, stride)) = mask {
                    for (i, row) in scores.chunks_exact_mut(s).enumerate() {
                        let at = item * stride[0] + head * stride[1] + (first + i) * stride[2];
                        for (j, v) in row.iter_mut().enumerate() {
                            *v += *mask.at(at + j * stride[3]);
                        }
                    }
                }
                softmax_rows(scores, s);
                let v = Mat::rows(vp.at(kv_at), d);
                let probs = Mat::rows(scores.as_ptr(), s);
                matmul((rows, d, s), probs, v, dst.at(head_at + first * d), d, 1.0);
            }
        },
    );
    drop((q_store, k_store, v_store, mask_parts));
    Ok(Some(Tensor::from_vec(out, (b, h, t, d), q.device())?))
}

/// A matrix in memory: element `(i, j)` at `ptr + i * row_stride + j * col_stride`.
#[derive(Clone, Copy)]
pub struct Mat {
    ptr: *const f32,
    row_stride: isize,
    col_stride: isize,
}

impl Mat {
    /// Rows `row_stride` floats apart, each contiguous.
    pub fn rows(ptr: *const f32, row_stride: usize) -> Self {
        Self {
            ptr,
            row_stride: row_stride as isize,
            col_stride: 1,
        }
    }

    /// The transpose of the same elements.
    pub fn t(self) -> Self {
        Self {
            ptr: self.ptr,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }
}

/// `dst[m x n] = scale * lhs[m x k] @ rhs[k x n]` on this thread, `dst` rows `dst_row_stride` apart.
///
/// # Safety
/// Every element the three matrices address lies inside live allocations, and `dst`'s do not overlap the
/// others'.
pub unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    lhs: Mat,
    rhs: Mat,
    dst: *mut f32,
    dst_row_stride: usize,
    scale: f32,
) {
    let contiguous = |stride: isize| stride == 1;
    // The output slice below spans whole rows: with several rows, only where they are contiguous (window
    // attention's rows interleave other heads' columns, which other tasks write).
    let direct = m <= DIRECT_ROWS
        && m * n * k > 0
        && (m == 1 || dst_row_stride == n)
        && contiguous(lhs.col_stride)
        && lhs.row_stride >= 0
        && rhs.row_stride >= 0
        && rhs.col_stride >= 0
        && (contiguous(rhs.row_stride) || contiguous(rhs.col_stride));
    if direct {
        // SAFETY (the slices): the contract says every element the matrices address is live; each slice
        // spans from a matrix's first element to its last, and `dst`'s (whole rows, contiguous) overlaps
        // neither input nor another task's output.
        let span = |count: usize, stride: isize, len: usize| (count - 1) * stride as usize + len;
        let lhs_rows = std::slice::from_raw_parts(lhs.ptr, span(m, lhs.row_stride, k));
        let out = std::slice::from_raw_parts_mut(dst, span(m, dst_row_stride as isize, n));
        let shape = Shape {
            m,
            n,
            k,
            lhs_stride: lhs.row_stride as usize,
            dst_stride: dst_row_stride,
        };
        if contiguous(rhs.row_stride) {
            // Column j of rhs is contiguous: each output is a dot product.
            let cols = std::slice::from_raw_parts(rhs.ptr, span(n, rhs.col_stride, k));
            dot_products(shape, lhs_rows, cols, rhs.col_stride as usize, out, scale);
        } else {
            // Row t of rhs is contiguous: each output row is a sum of rhs rows.
            let rows = std::slice::from_raw_parts(rhs.ptr, span(k, rhs.row_stride, n));
            row_sums(shape, lhs_rows, rows, rhs.row_stride as usize, out, scale);
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_row_stride as isize,
        false,
        lhs.ptr,
        lhs.col_stride,
        lhs.row_stride,
        rhs.ptr,
        rhs.col_stride,
        rhs.row_stride,
        0.0,
        scale,
        false,
        false,
        false,
        Parallelism::None,
    )
}

/// The sizes of a [`matmul`] and the row strides of its `lhs` and `dst`.
#[derive(Clone, Copy)]
struct Shape {
    m: usize,
    n: usize,
    k: usize,
    lhs_stride: usize,
    dst_stride: usize,
}

wide_fn! {
    /// `out[i][j] = scale * lhs[i] · col[j]`, column j of rhs at `cols[j * col_stride..][..k]`.
    fn dot_products(shape: Shape, lhs: &[f32], cols: &[f32], col_stride: usize, out: &mut [f32], scale: f32)
        = dot_products_portable;
}

#[inline(always)]
fn dot_products_portable(
    s: Shape,
    lhs: &[f32],
    cols: &[f32],
    col_stride: usize,
    out: &mut [f32],
    scale: f32,
) {
    for i in 0..s.m {
        let row = &lhs[i * s.lhs_stride..][..s.k];
        for (j, out) in out[i * s.dst_stride..][..s.n].iter_mut().enumerate() {
            *out = scale * dot(row, &cols[j * col_stride..][..s.k]);
        }
    }
}

wide_fn! {
    /// `out[i] = scale * Σ_t lhs[i][t] * rhs[t]`, row t of rhs at `rows[t * row_stride..][..n]`.
    fn row_sums(shape: Shape, lhs: &[f32], rows: &[f32], row_stride: usize, out: &mut [f32], scale: f32)
        = row_sums_portable;
}

#[inline(always)]
fn row_sums_portable(
    s: Shape,
    lhs: &[f32],
    rows: &[f32],
    row_stride: usize,
    out: &mut [f32],
    scale: f32,
) {
    for i in 0..s.m {
        let out = &mut out[i * s.dst_stride..][..s.n];
        out.fill(0.0);
        for (t, &weight) in lhs[i * s.lhs_stride..][..s.k].iter().enumerate() {
            for (out, &x) in out.iter_mut().zip(&rows[t * row_stride..][..s.n]) {
                *out += weight * x;
            }
        }
        if scale != 1.0 {
            out.iter_mut().for_each(|v| *v *= scale);
        }
    }
}

wide_fn! {
    /// In-place softmax of each `len`-long row of `rows`, vectorized for the widest SIMD the CPU has (libm's
    /// `expf` is scalar).
    pub fn softmax_rows(rows: &mut [f32], len: usize) = softmax_rows_portable;
}

#[inline(always)]
fn softmax_rows_portable(rows: &mut [f32], len: usize) {
    for row in rows.chunks_exact_mut(len) {
        let max = lane_max(row);
        row.iter_mut().for_each(|v| *v = exp(*v - max));
        let inv = 1.0 / lane_sum(row, |v| v);
        row.iter_mut().for_each(|v| *v *= inv);
    }
}
