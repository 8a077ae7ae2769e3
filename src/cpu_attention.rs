//! Attention on the CPU in f32 as one fused kernel: each task takes one (item, head, block of query rows),
//! computes its scores with a GEMM that reads q and k in place through strides (the gemm crate takes any
//! strides), adds the mask, applies a vectorized softmax in a per-thread buffer that stays in cache, and
//! multiplies by v straight into the output. With tensor ops, candle makes the whole `[B, H, T, S]` score
//! tensor and passes over it four times (product, scale, mask, softmax): on the base encoder (581 tokens,
//! 12 heads) 16 MiB of fresh memory per layer. The pieces are shared with the vision tower's window
//! attention (`crate::vision_attention`).

use candle_core::{CpuStorage, DType, Result, Storage, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::nn::{exp, lane_sum, wide_fn, Out};

/// Query rows per task: 64 rows of scores over ~600 keys stay in L2.
const QUERY_BLOCK: usize = 64;

/// `softmax(q kᵀ * scale + mask) v` for f32 CPU tensors `q` `[B, H, T, D]`, `k` and `v` `[B, H, S, D]`, and
/// an additive `mask` broadcastable to `[B, H, T, S]`; `None` where this kernel does not apply (another
/// device or dtype), for the tensor ops.
pub fn attention(
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
    let (qp, kp, vp) = (
        Shared(data(&q_store, q_layout.start_offset())?),
        Shared(data(&k_store, k_layout.start_offset())?),
        Shared(data(&v_store, v_layout.start_offset())?),
    );
    let mask = match &mask_parts {
        Some((store, layout)) => {
            let stride = layout.stride();
            Some((
                Shared(data(store, layout.start_offset())?),
                [stride[0], stride[1], stride[2], stride[3]],
            ))
        }
        None => None,
    };

    let mut out = vec![0f32; b * h * t * d];
    let dst = Out(out.as_mut_ptr());
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

/// A read-only pointer shared by the parallel tasks.
#[derive(Clone, Copy)]
struct Shared(*const f32);
// SAFETY: only read, while the tensors that own the data are alive (they outlive the parallel loop).
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// The element `offset` floats in. (A method, so that closures capture the whole `Shared`.)
    fn at(self, offset: usize) -> *const f32 {
        self.0.wrapping_add(offset)
    }
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
/// Every element the three matrices address lies inside live allocations.
pub unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    lhs: Mat,
    rhs: Mat,
    dst: *mut f32,
    dst_row_stride: usize,
    scale: f32,
) {
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

wide_fn! {
    /// In-place softmax of each `len`-long row of `rows`, vectorized (libm's scalar `expf` was ~3 % of the
    /// tower) for the widest SIMD the CPU has.
    pub fn softmax_rows(rows: &mut [f32], len: usize) = softmax_rows_portable;
}

#[inline(always)]
fn softmax_rows_portable(rows: &mut [f32], len: usize) {
    for row in rows.chunks_exact_mut(len) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        row.iter_mut().for_each(|v| *v = exp(*v - max));
        let inv = 1.0 / lane_sum(row, |v| v);
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    #[test]
    fn fused_kernel_matches_the_tensor_ops() {
        let dev = Device::Cpu;
        // Query lengths around the block size, one query (decoding), grouped beams' stacked queries.
        for (b, h, t, s, d) in [(2, 3, 70, 50, 8), (1, 2, 1, 33, 16), (2, 1, 129, 129, 4)] {
            let q = Tensor::randn(0f32, 1., (b, h, t, d), &dev).unwrap();
            let k = Tensor::randn(0f32, 1., (b, h, s, d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1., (b, h, s, d), &dev).unwrap();
            let padding = Tensor::randn(0f32, 1., (b, 1, 1, s), &dev)
                .unwrap()
                .ge(0.5)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .affine(-1e9, 0.)
                .unwrap();
            let causal = Tensor::randn(0f32, 3., (t, s), &dev).unwrap();
            for mask in [None, Some(&padding), Some(&causal)] {
                let got = super::attention(&q, &k, &v, 0.3, mask).unwrap().unwrap();
                // The reference: the tensor ops in f64, which the kernel declines.
                let f64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
                let mask64 = mask.map(f64);
                let want = crate::nn::attention(&f64(&q), &f64(&k), &f64(&v), 0.3, mask64.as_ref())
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap();
                let diff = crate::nn::max_abs_diff(&got, &want);
                assert!(
                    diff < 1e-5,
                    "{b}x{h}x{t}x{s}x{d}, mask {}: {diff}",
                    mask.is_some()
                );
            }
        }
    }
}
