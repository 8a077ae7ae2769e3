//! The cores of the vision tower's two attentions (between the qkv projection and the output projection).
//!
//! On the CPU in f32 they are computed straight from the qkv projection's output. Written with tensor ops
//! (the path other devices and dtypes take), both attentions first copy q, k and v out of the projection (a permute to put
//! heads or channel groups first), make a score tensor for all windows or groups at once, and permute the
//! result back: four strided copies of the feature map and a score tensor of up to ~85 MiB per call, while
//! the products themselves are small. Here every (window, head) or (item, group) is one task: its products are
//! GEMMs that read q, k and v in place through strides and write the output in place (the gemm crate takes any
//! strides), its scores live in a per-thread buffer that stays in cache, and the tasks run in parallel.
//! On Florence-2-base this took the window and channel attention cores from ~780 ms to ~TODO ms a 768x768
//! image (README, Performance).

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::nn::attention;

/// A matrix in memory: element `(i, j)` at `ptr + i * row_stride + j * col_stride`.
#[derive(Clone, Copy)]
struct Mat {
    ptr: *const f32,
    row_stride: isize,
    col_stride: isize,
}

impl Mat {
    /// Rows `row_stride` floats apart, each contiguous.
    fn rows(ptr: *const f32, row_stride: usize) -> Self {
        Self {
            ptr,
            row_stride: row_stride as isize,
            col_stride: 1,
        }
    }

    /// The transpose of the same elements.
    fn t(self) -> Self {
        Self {
            ptr: self.ptr,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }
}

/// The output buffer, written by many tasks at disjoint elements.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint elements (each its own item and head or group columns) and the buffer outlives
// the parallel loop.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The element `offset` floats in. (A method, so that closures capture the whole `Out`, which is `Sync`,
    /// rather than its pointer field.)
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// `dst[m x n] = scale * lhs[m x k] @ rhs[k x n]` on this thread, `dst` rows `dst_row_stride` apart.
///
/// # Safety
/// Every element the three matrices address lies inside live allocations.
unsafe fn matmul(
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

/// In-place softmax of each `len`-long row of `rows`.
fn softmax_rows(rows: &mut [f32], len: usize) {
    for row in rows.chunks_exact_mut(len) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

/// Which attention, and how its projection output `[items, tokens, 3 * C]` is split.
#[derive(Clone, Copy)]
enum Kind {
    /// Self-attention among the `tokens` of each window (item), per head: `softmax(q kᵀ * scale) v`.
    Window { heads: usize },
    /// Attention among the channels of each group over all tokens of the item: `v softmax(qᵀ k * scale)ᵀ`.
    Channel { groups: usize },
}

struct StridedAttention {
    kind: Kind,
    scale: f32,
}

/// Window attention on `qkv` `[windows, tokens, 3 * C]` (the qkv projection of each window's tokens, laid out
/// `[3, heads, head_dim]` along the last dim) → `[windows, tokens, C]`, heads concatenated as transformers
/// does.
pub fn window_attention(qkv: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    if let Some(out) = strided(qkv, Kind::Window { heads }, scale)? {
        return Ok(out);
    }
    let (windows, tokens, width) = qkv.dims3()?;
    // [3, windows, heads, tokens, head_dim]
    let [q, k, v] = split_qkv(qkv, heads, (2, 0, 3, 1, 4))?;
    attention(&q, &k, &v, scale, None)?
        .transpose(1, 2)?
        .reshape((windows, tokens, width / 3))
}

/// Channel attention on `qkv` `[B, N, 3 * C]` (laid out `[3, groups, group_dim]` along the last dim) →
/// `[B, N, C]`: each channel is a "token" attending to the channels of its group, over all N positions.
pub fn channel_attention(qkv: &Tensor, groups: usize, scale: f64) -> Result<Tensor> {
    if let Some(out) = strided(qkv, Kind::Channel { groups }, scale)? {
        return Ok(out);
    }
    let (b, n, width) = qkv.dims3()?;
    // [3, B, groups, group_dim, N]
    let [q, k, v] = split_qkv(qkv, groups, (2, 0, 3, 4, 1))?;
    let out = attention(&q, &k, &v, scale, None)?; // [B, groups, group_dim, N]
    out.permute((0, 3, 1, 2))?.reshape((b, n, width / 3))
}

/// q, k and v of `qkv` `[B, N, 3 * C]`, each contiguous: the projection seen as `[B, N, 3, parts, C / parts]`,
/// permuted by `dims` (which must put the q/k/v axis first) and split along it.
fn split_qkv(
    qkv: &Tensor,
    parts: usize,
    dims: (usize, usize, usize, usize, usize),
) -> Result<[Tensor; 3]> {
    let (b, n, width) = qkv.dims3()?;
    let qkv = qkv
        .reshape((b, n, 3, parts, width / 3 / parts))?
        .permute(dims)?;
    Ok([
        qkv.get(0)?.contiguous()?,
        qkv.get(1)?.contiguous()?,
        qkv.get(2)?.contiguous()?,
    ])
}

/// The strided kernel's answer, or `None` where it does not apply (not an f32 CPU tensor).
fn strided(qkv: &Tensor, kind: Kind, scale: f64) -> Result<Option<Tensor>> {
    if !qkv.device().is_cpu() || qkv.dtype() != DType::F32 {
        return Ok(None);
    }
    let op = StridedAttention {
        kind,
        scale: scale as f32,
    };
    Ok(Some(qkv.contiguous()?.apply_op1_no_bwd(&op)?))
}

impl CustomOp1 for StridedAttention {
    fn name(&self) -> &'static str {
        "strided-attention"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(all), Some((start, end))) = (storage, layout.contiguous_offsets())
        else {
            candle_core::bail!("strided-attention takes a contiguous f32 tensor");
        };
        let src = &all[start..end];
        let (items, tokens, width) = layout.shape().dims3()?;
        let parts = match self.kind {
            Kind::Window { heads } => heads,
            Kind::Channel { groups } => groups,
        };
        if width % 3 != 0 || (width / 3) % parts != 0 {
            candle_core::bail!(
                "strided-attention: {width} features are not 3 x {parts} equal parts"
            );
        }
        let c = width / 3;
        let part_dim = c / parts;
        let scores_len = match self.kind {
            Kind::Window { .. } => tokens * tokens,
            Kind::Channel { .. } => part_dim * part_dim,
        };
        let mut out = vec![0f32; items * tokens * c];
        let dst = Out(out.as_mut_ptr());
        (0..items * parts).into_par_iter().for_each_init(
            || vec![0f32; scores_len],
            |scores, task| {
                let (item, part) = (task / parts, task % parts);
                // Part `part` (a head or a channel group) of item `item`: its q, k and v are `[tokens,
                // part_dim]` with rows 3C apart; its output, the same columns of `out` with rows C apart.
                let at = item * tokens * 3 * c + part * part_dim;
                let [q, k, v] =
                    [0, c, 2 * c].map(|offset| Mat::rows(src[at + offset..].as_ptr(), 3 * c));
                // SAFETY: the matrices above stay inside item `item` of `src`; the output block lies inside
                // `out`, and tasks write disjoint (item, part) blocks.
                unsafe {
                    let out = dst.at(item * tokens * c + part * part_dim);
                    let product = Product {
                        q,
                        k,
                        v,
                        tokens,
                        part_dim,
                        out,
                        out_stride: c,
                    };
                    match self.kind {
                        Kind::Window { .. } => product.window(scores, self.scale),
                        Kind::Channel { .. } => product.channel(scores, self.scale),
                    }
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((items, tokens, c))))
    }
}

/// The operands of one task.
struct Product {
    q: Mat,
    k: Mat,
    v: Mat,
    tokens: usize,
    part_dim: usize,
    out: *mut f32,
    out_stride: usize,
}

impl Product {
    /// One head of one window: `softmax(q kᵀ * scale) v`; `scores` holds `tokens²`.
    unsafe fn window(&self, scores: &mut [f32], scale: f32) {
        let (t, d) = (self.tokens, self.part_dim);
        matmul((t, t, d), self.q, self.k.t(), scores.as_mut_ptr(), t, scale);
        softmax_rows(scores, t);
        let scores = Mat::rows(scores.as_ptr(), t);
        matmul((t, d, t), scores, self.v, self.out, self.out_stride, 1.0);
    }

    /// One channel group of one item: `v softmax(qᵀ k * scale)ᵀ`; `scores` holds `part_dim²`.
    unsafe fn channel(&self, scores: &mut [f32], scale: f32) {
        let (t, d) = (self.tokens, self.part_dim);
        matmul((d, d, t), self.q.t(), self.k, scores.as_mut_ptr(), d, scale);
        softmax_rows(scores, d);
        let scores_t = Mat::rows(scores.as_ptr(), d).t();
        matmul((t, d, d), self.v, scores_t, self.out, self.out_stride, 1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The tensor-op formulation, which other devices and dtypes run (here in f64, which the kernel declines).
    fn by_ops(qkv: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Vec<f32> {
        let out = f(&qkv.to_dtype(DType::F64).unwrap()).unwrap();
        out.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn assert_close(got: &Tensor, expected: &[f32], what: &str) {
        let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got.len(), expected.len(), "{what}");
        for (g, e) in got.iter().zip(expected) {
            assert!(
                (g - e).abs() <= 1e-5 * (1.0 + e.abs()),
                "{what}: {g} vs {e}"
            );
        }
    }

    #[test]
    fn kernels_match_the_tensor_ops() {
        let dev = Device::Cpu;
        // Odd sizes: 3 windows of 5 tokens, 2 heads of 3; 2 items of 7 tokens, 3 groups of 2 channels.
        let qkv = Tensor::randn(0f32, 1., (3, 5, 18), &dev).unwrap();
        let expected = by_ops(&qkv, |t| window_attention(t, 2, 0.3));
        assert_close(
            &window_attention(&qkv, 2, 0.3).unwrap(),
            &expected,
            "window",
        );

        let qkv = Tensor::randn(0f32, 1., (2, 7, 18), &dev).unwrap();
        let expected = by_ops(&qkv, |t| channel_attention(t, 3, 0.5));
        assert_close(
            &channel_attention(&qkv, 3, 0.5).unwrap(),
            &expected,
            "channel",
        );
    }
}
