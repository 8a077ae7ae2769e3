//! The core of the vision tower's window attention (between the qkv projection and the output projection)
//! on the CPU in f32.
//!
//! Written with tensor ops (the path other devices and dtypes take), it copies q, k and v out of the
//! projection with a permute that puts heads first, makes one score tensor for all windows, and permutes the
//! result back: strided copies of the feature map and a large score tensor per call, while the products
//! themselves are small. Here every (window, head) is one task instead: it gathers its q, k and v from the
//! projection into a per-thread buffer (as f32, contiguous), multiplies them with the gemm crate, keeps its
//! scores in a per-thread buffer that stays in cache, and writes its output block once; the tasks run in
//! parallel.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::attention::{matmul, softmax_rows, Mat};
use super::parallel::TaskPtr;
use super::storage::{contiguous, contiguous_f32, narrow_into, widen_rows, Element};

/// The CPU kernel: `heads` heads, scores scaled by `scale`.
struct StridedWindowAttention {
    heads: usize,
    scale: f32,
}

/// Window attention on a CPU f32 or bf16 `qkv` `[windows, tokens, 3 * C]` (the qkv projection of each window's
/// tokens, laid out `[3, heads, head_dim]` along the last dim) → `[windows, tokens, C]`, heads concatenated
/// as transformers concatenates them, in `qkv`'s dtype (bf16 computed in f32 and rounded once).
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
        let (items, tokens, width) = layout.shape().dims3()?;
        let heads = self.heads;
        if width % 3 != 0 || (width / 3) % heads != 0 {
            candle_core::bail!(
                "strided-window-attention: {width} features are not 3 x {heads} heads"
            );
        }
        let shape = (items, tokens, width / 3);
        let out = match storage {
            CpuStorage::BF16(data) => {
                CpuStorage::BF16(self.attend(contiguous(data, layout)?, shape))
            }
            _ => CpuStorage::F32(self.attend(contiguous_f32(storage, layout, self.name())?, shape)),
        };
        Ok((out, Shape::from(shape)))
    }
}

impl StridedWindowAttention {
    /// `src` `[items, tokens, 3C]`: each task copies its q, k and v out of the projection into a buffer of its
    /// own as f32, contiguous (at the wider stages, whose rows are kilobytes apart, the gemm crate's products
    /// run faster there than through the projection's strides; for bf16, widening the whole projection first
    /// would stream it through memory twice), computes `softmax(q kᵀ * scale) v` in f32 and writes its output
    /// block once (bf16: rounded once).
    fn attend<T: Element>(&self, src: &[T], (items, tokens, c): (usize, usize, usize)) -> Vec<T> {
        let head_dim = c / self.heads;
        let mut out = vec![T::default(); items * tokens * c];
        // SAFETY: `out` lives past the loop, and each task writes only its own (item, head) block.
        let dst = unsafe { TaskPtr::new(out.as_mut_ptr()) };
        self.for_each_task(items, tokens, |scores, wide, item, head| {
            let block = tokens * head_dim;
            wide.resize(4 * block, 0.0);
            let at = item * tokens * 3 * c + head * head_dim;
            for (part, offset) in [0, c, 2 * c].into_iter().enumerate() {
                let to = &mut wide[part * block..][..block];
                widen_rows(&src[at + offset..], 3 * c, head_dim, to);
            }
            let (operands, result) = wide.split_at_mut(3 * block);
            let [q, k, v] =
                [0, 1, 2].map(|part| Mat::rows(operands[part * block..].as_ptr(), head_dim));
            let (t, d) = (tokens, head_dim);
            // SAFETY: q, k and v address `t x d` values each of `operands`; the products write `scores`
            // (`t²` values) and `result` (`t x d`), this task's own buffers.
            unsafe {
                matmul((t, t, d), q, k.t(), scores.as_mut_ptr(), t, self.scale);
                softmax_rows(scores, t);
                let probs = Mat::rows(scores.as_ptr(), t);
                matmul((t, d, t), probs, v, result.as_mut_ptr(), d, 1.0);
            }
            for (t, row) in result.chunks_exact(head_dim).enumerate() {
                // SAFETY: row `t` of this task's (item, head) block of `out`, which no other task writes.
                let out = unsafe {
                    std::slice::from_raw_parts_mut(
                        dst.at((item * tokens + t) * c + head * head_dim),
                        head_dim,
                    )
                };
                narrow_into(row, out);
            }
        });
        out
    }

    /// `task(scores, buffer, item, head)` for every (window, head) in parallel, with a scores buffer of
    /// `tokens²` and a scratch buffer per thread.
    fn for_each_task(
        &self,
        items: usize,
        tokens: usize,
        task: impl Fn(&mut [f32], &mut Vec<f32>, usize, usize) + Sync + Send,
    ) {
        let heads = self.heads;
        (0..items * heads).into_par_iter().for_each_init(
            || (vec![0f32; tokens * tokens], Vec::new()),
            |(scores, wide), i| task(scores, wide, i / heads, i % heads),
        );
    }
}
