//! The core of the vision tower's window attention (between the qkv projection and the output projection)
//! on the CPU in f32.
//!
//! Written with tensor ops (the path other devices and dtypes take), it copies q, k and v out of the
//! projection with a permute that puts heads first, makes one score tensor for all windows, and permutes the
//! result back: strided copies of the feature map and a large score tensor per call, while the products
//! themselves are small. Here every (window, head) is one task instead: its two
//! products are GEMMs that read q, k and v in place through strides and write the output in place (the gemm
//! crate takes any strides), its scores live in a per-thread buffer that stays in cache, and the tasks run in
//! parallel.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::attention::{matmul, softmax_rows, Mat};
use super::parallel::TaskPtr;
use super::storage::contiguous_f32;

/// The CPU kernel: `heads` heads, scores scaled by `scale`.
struct StridedWindowAttention {
    heads: usize,
    scale: f32,
}

/// Window attention on a CPU f32 `qkv` `[windows, tokens, 3 * C]` (the qkv projection of each window's
/// tokens, laid out `[3, heads, head_dim]` along the last dim) → `[windows, tokens, C]`, heads concatenated
/// as transformers concatenates them.
pub fn window_attention(qkv: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let op = StridedWindowAttention {
        heads,
        scale: scale as f32,
    };
    qkv.contiguous()?.apply_op1_no_bwd(&op)
}

impl CustomOp1 for StridedWindowAttention {
    fn name(&self) -> &'static str {
        "strided-window-attention"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = contiguous_f32(storage, layout, self.name())?;
        let (items, tokens, width) = layout.shape().dims3()?;
        let heads = self.heads;
        if width % 3 != 0 || (width / 3) % heads != 0 {
            candle_core::bail!(
                "strided-window-attention: {width} features are not 3 x {heads} heads"
            );
        }
        let c = width / 3;
        let head_dim = c / heads;
        let scores_len = tokens * tokens;
        let mut out = vec![0f32; items * tokens * c];
        // SAFETY: `out` lives past the loop, and each task writes only its own (item, head) block.
        let dst = unsafe { TaskPtr::new(out.as_mut_ptr()) };
        (0..items * heads).into_par_iter().for_each_init(
            || vec![0f32; scores_len],
            |scores, task| {
                let (item, head) = (task / heads, task % heads);
                // Head `head` of window `item`: its q, k and v are `[tokens, head_dim]` with rows 3C apart; its
                // output, the same columns of `out` with rows C apart.
                let at = item * tokens * 3 * c + head * head_dim;
                let [q, k, v] =
                    [0, c, 2 * c].map(|offset| Mat::rows(src[at + offset..].as_ptr(), 3 * c));
                // SAFETY: the matrices above stay inside item `item` of `src`; the output block lies inside
                // `out`, and tasks write disjoint (item, head) blocks.
                unsafe {
                    let out = dst.at(item * tokens * c + head * head_dim);
                    let product = Product {
                        q,
                        k,
                        v,
                        tokens,
                        head_dim,
                        out,
                        out_stride: c,
                    };
                    product.window(scores, self.scale);
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
    head_dim: usize,
    out: *mut f32,
    out_stride: usize,
}

impl Product {
    /// One head of one window: `softmax(q kᵀ * scale) v`; `scores` holds `tokens²`.
    ///
    /// # Safety
    /// `q`, `k` and `v` address `tokens x head_dim` elements of live memory, and `out` the same with rows
    /// `out_stride` apart, which no other thread touches during the call.
    unsafe fn window(&self, scores: &mut [f32], scale: f32) {
        let (t, d) = (self.tokens, self.head_dim);
        matmul((t, t, d), self.q, self.k.t(), scores.as_mut_ptr(), t, scale);
        softmax_rows(scores, t);
        let scores = Mat::rows(scores.as_ptr(), t);
        matmul((t, d, t), scores, self.v, self.out, self.out_stride, 1.0);
    }
}
