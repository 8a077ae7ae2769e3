//! The core of the vision tower's window attention (between the qkv projection and the output projection).
//!
//! Written with tensor ops (the path other devices and dtypes take), it copies q, k and v out of the
//! projection with a permute that puts heads first, makes one score tensor for all windows, and permutes the
//! result back: strided copies of the feature map and a score tensor of up to ~85 MiB per call, while the
//! products themselves are small. On the CPU in f32 every (window, head) is one task instead: its two
//! products are GEMMs that read q, k and v in place through strides and write the output in place (the gemm
//! crate takes any strides), its scores live in a per-thread buffer that stays in cache, and the tasks run in
//! parallel.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu_attention::{matmul, softmax_rows, Mat};
use crate::nn::{attention, contiguous_f32, to_dtype, Out};

/// The CPU kernel: `heads` heads, scores scaled by `scale`.
struct StridedWindowAttention {
    heads: usize,
    scale: f32,
}

/// Window attention on `qkv` `[windows, tokens, 3 * C]` (the qkv projection of each window's tokens, laid out
/// `[3, heads, head_dim]` along the last dim) → `[windows, tokens, C]`, heads concatenated as transformers
/// does.
///
/// On the CPU a half-precision `qkv` is widened to f32 for the kernel and the output rounded back: candle's
/// CPU matmul widens half-precision operands anyway, for each product and with copies, and the whole
/// attention in f32 is no less exact than torch's, which rounds the scores and probabilities to bf16.
pub fn window_attention(qkv: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    if qkv.device().is_cpu() && matches!(qkv.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        let op = StridedWindowAttention {
            heads,
            scale: scale as f32,
        };
        let out = to_dtype(qkv, DType::F32)?
            .contiguous()?
            .apply_op1_no_bwd(&op)?;
        return to_dtype(&out, qkv.dtype());
    }
    let (windows, tokens, width) = qkv.dims3()?;
    let qkv = qkv
        .reshape((windows, tokens, 3, heads, width / 3 / heads))?
        .permute((2, 0, 3, 1, 4))?; // [3, windows, heads, tokens, head_dim]
    let [q, k, v] = [0, 1, 2].map(|i| qkv.get(i).and_then(|t| t.contiguous()));
    attention(&q?, &k?, &v?, scale, None)?
        .transpose(1, 2)?
        .reshape((windows, tokens, width / 3))
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
        let dst = Out(out.as_mut_ptr());
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
    unsafe fn window(&self, scores: &mut [f32], scale: f32) {
        let (t, d) = (self.tokens, self.head_dim);
        matmul((t, t, d), self.q, self.k.t(), scores.as_mut_ptr(), t, scale);
        softmax_rows(scores, t);
        let scores = Mat::rows(scores.as_ptr(), t);
        matmul((t, d, t), scores, self.v, self.out, self.out_stride, 1.0);
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
    fn kernel_matches_the_tensor_ops() {
        let dev = Device::Cpu;
        // Odd sizes: 3 windows of 5 tokens, 2 heads of 3.
        let qkv = Tensor::randn(0f32, 1., (3, 5, 18), &dev).unwrap();
        let expected = by_ops(&qkv, |t| window_attention(t, 2, 0.3));
        assert_close(
            &window_attention(&qkv, 2, 0.3).unwrap(),
            &expected,
            "window",
        );
    }
}
