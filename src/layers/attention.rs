//! Scaled dot-product attention: the BART layers' (any mask) and the vision tower's window attention (the
//! core between its qkv and output projections). Each takes the CPU kernel where it applies and candle's
//! tensor ops elsewhere.

use candle_core::{DType, Result, Tensor};

use super::ops::{broadcast_add, to_dtype};
use crate::kernels::cpu::attention as cpu_attention;
use crate::kernels::cpu::window_attention as cpu_window_attention;

/// Scaled dot-product attention over the last two dims: `softmax(q @ kᵀ * scale + mask) @ v`.
///
/// The scale is applied after the product, as transformers' eager attention does. `mask` is additive
/// (0 where attending is allowed, a large negative value elsewhere) and broadcast over the scores.
///
/// On the CPU in f32 and bf16 it is one fused kernel ([`cpu_attention::fused_attention`], bf16 computed in f32
/// and rounded once); f16 operands, and operands of different dtypes (f32 encoder states against bf16
/// queries), are widened to f32 first and the output rounded once to `q`'s dtype. candle's CPU matmul
/// has no half-precision kernel and widens each product's operands itself, with copies; f32 scores and
/// probabilities are no less exact than torch's half-precision ones.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let _span = crate::profile::span("attention core");
    let cpu = q.device().is_cpu();
    let mixed = k.dtype() != q.dtype() || v.dtype() != q.dtype();
    if cpu && (q.dtype() == DType::F16 || mixed) {
        let [q32, k, v] = [q, k, v].map(|t| to_dtype(t, DType::F32));
        let mask = mask.map(|m| to_dtype(m, DType::F32)).transpose()?;
        return to_dtype(
            &attention(&q32?, &k?, &v?, scale, mask.as_ref())?,
            q.dtype(),
        );
    }
    let wide_mask = match mask {
        Some(m) if cpu && m.dtype() != DType::F32 => Some(to_dtype(m, DType::F32)?),
        _ => None,
    };
    let half = matches!(q.dtype(), DType::BF16 | DType::F16);
    if let Some(out) = cpu_attention::fused_attention(q, k, v, scale, wide_mask.as_ref().or(mask))?
    {
        return Ok(out);
    }
    // The queries are scaled before the product, as transformers' BART scales them, so that half-precision
    // scores stay in range; the softmax of half-precision scores runs in f32. k and v may be strided views (a
    // decoder cache's filled positions), which a matmul's batch dims do not take: copied contiguous.
    let (k, v) = (&k.contiguous()?, &v.contiguous()?);
    let scores = (q * scale)?.matmul(&k.t()?)?;
    let scores = if half {
        scores.to_dtype(DType::F32)?
    } else {
        scores
    };
    let scores = match mask {
        Some(mask) => broadcast_add(&scores, &mask.to_dtype(scores.dtype())?)?,
        None => scores,
    };
    candle_nn::ops::softmax_last_dim(&scores)?
        .to_dtype(q.dtype())?
        .matmul(v)
}

/// Window attention on `qkv` `[windows, tokens, 3 * C]` (the qkv projection of each window's tokens, laid out
/// `[3, heads, head_dim]` along the last dim) → `[windows, tokens, C]`, heads concatenated as transformers
/// does.
///
/// On the CPU a half-precision `qkv` is computed in f32 and the output rounded back (the kernel widens bf16
/// window by window; f16 is widened whole first): candle's CPU matmul widens half-precision operands
/// anyway, for each product and with copies, and the whole attention in f32 is no less exact than torch's,
/// which rounds the scores and probabilities to bf16.
pub fn window_attention(qkv: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let _span = crate::profile::span("window attention core");
    if qkv.device().is_cpu() && matches!(qkv.dtype(), DType::F32 | DType::BF16) {
        return cpu_window_attention::window_attention(qkv, heads, scale);
    }
    if qkv.device().is_cpu() && qkv.dtype() == DType::F16 {
        let out =
            cpu_window_attention::window_attention(&to_dtype(qkv, DType::F32)?, heads, scale)?;
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

    /// The bits of a bf16 tensor's values, to compare exactly.
    fn bf16_bits(t: &Tensor) -> Vec<u16> {
        let values: Vec<half::bf16> = t.flatten_all().unwrap().to_vec1().unwrap();
        values.into_iter().map(half::bf16::to_bits).collect()
    }

    /// bf16 in and out: the f32 kernel on the same values, rounded once (windows of 5 and of 144 tokens).
    #[test]
    fn bf16_kernel_is_the_f32_one_rounded() {
        let dev = Device::Cpu;
        for (windows, tokens, heads, head_dim) in [(3, 5, 2, 3), (2, 144, 4, 32)] {
            let qkv = Tensor::randn(0f32, 1., (windows, tokens, 3 * heads * head_dim), &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let got = window_attention(&qkv, heads, 0.3).unwrap();
            assert_eq!(got.dtype(), DType::BF16);
            let want = window_attention(&qkv.to_dtype(DType::F32).unwrap(), heads, 0.3)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            assert_eq!(
                bf16_bits(&got),
                bf16_bits(&want),
                "{windows}x{tokens}, {heads} heads"
            );
        }
    }

    /// bf16 q, k and v: the f32 kernel on the same values, rounded once (a decode step's stacked beams
    /// against many keys, and more queries than a task's block).
    #[test]
    fn bf16_fused_kernel_is_the_f32_one_rounded() {
        let dev = Device::Cpu;
        for (b, h, t, s, d) in [(2, 3, 3, 581, 64), (1, 2, 70, 50, 8)] {
            let bf16 = |shape: (usize, usize, usize, usize)| {
                Tensor::randn(0f32, 1., shape, &dev)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap()
            };
            let (q, k, v) = (bf16((b, h, t, d)), bf16((b, h, s, d)), bf16((b, h, s, d)));
            let mask = Tensor::randn(0f32, 1., (b, 1, 1, s), &dev).unwrap();
            let got = cpu_attention::fused_attention(&q, &k, &v, 0.3, Some(&mask))
                .unwrap()
                .unwrap();
            assert_eq!(got.dtype(), DType::BF16);
            let wide = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let want =
                cpu_attention::fused_attention(&wide(&q), &wide(&k), &wide(&v), 0.3, Some(&mask))
                    .unwrap()
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap();
            assert_eq!(bf16_bits(&got), bf16_bits(&want), "{b}x{h}x{t}x{s}x{d}");
        }
    }

    /// k and v read through strides (the first S positions of `[B, H, capacity, D]` buffers, as a decoder
    /// cache holds them, and of `[B, capacity, H, D]` ones): the same bits as from contiguous copies, f32 and
    /// bf16, for a decode step's few queries (the direct products, bf16 read as stored) and for more (the gemm
    /// crate).
    #[test]
    fn strided_keys_and_values_give_the_contiguous_bits() {
        let dev = Device::Cpu;
        let (b, h, s, d, capacity) = (2, 3, 45, 16, 64);
        for (t, dtype, heads_first) in [1, 3, 70]
            .into_iter()
            .flat_map(|t| [DType::F32, DType::BF16].map(|dtype| (t, dtype)))
            .flat_map(|(t, dtype)| [true, false].map(|heads_first| (t, dtype, heads_first)))
        {
            let randn = |shape: (usize, usize, usize, usize)| {
                Tensor::randn(0f32, 1., shape, &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let q = randn((b, h, t, d));
            let [k, v] = [0, 1].map(|_| {
                if heads_first {
                    randn((b, h, capacity, d)).narrow(2, 0, s).unwrap()
                } else {
                    randn((b, capacity, h, d))
                        .narrow(1, 0, s)
                        .unwrap()
                        .transpose(1, 2)
                        .unwrap()
                }
            });
            let mask = Tensor::randn(0f32, 1., (b, 1, 1, s), &dev).unwrap();
            let bits = |k: &Tensor, v: &Tensor| {
                cpu_attention::fused_attention(&q, k, v, 0.3, Some(&mask))
                    .unwrap()
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect::<Vec<_>>()
            };
            let contiguous = bits(&k.contiguous().unwrap(), &v.contiguous().unwrap());
            assert_eq!(
                bits(&k, &v),
                contiguous,
                "{t} queries, {dtype:?}, heads first: {heads_first}"
            );
        }
    }

    #[test]
    fn fused_kernel_matches_the_tensor_ops() {
        let dev = Device::Cpu;
        // Query lengths around the block size, one query (decoding), grouped beams' stacked queries, a few
        // queries with head dims that leave a remainder (the direct products of `matmul`).
        for (b, h, t, s, d) in [
            (2, 3, 70, 50, 8),
            (1, 2, 1, 33, 16),
            (2, 1, 129, 129, 4),
            (3, 2, 3, 37, 7),
            (1, 1, 4, 581, 70),
            (1, 2, 5, 20, 33),
        ] {
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
            // One value per query, broadcast along the keys: read through a key stride of 0.
            let per_query = Tensor::randn(0f32, 3., (t, 1), &dev).unwrap();
            for mask in [None, Some(&padding), Some(&causal), Some(&per_query)] {
                let got = cpu_attention::fused_attention(&q, &k, &v, 0.3, mask)
                    .unwrap()
                    .unwrap();
                // The reference: the tensor ops in f64, which the kernel declines.
                let f64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
                let mask64 = mask.map(f64);
                let want = super::attention(&f64(&q), &f64(&k), &f64(&v), 0.3, mask64.as_ref())
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap();
                let diff = super::super::max_abs_diff(&got, &want);
                assert!(
                    diff < 1e-5,
                    "{b}x{h}x{t}x{s}x{d}, mask {}: {diff}",
                    mask.is_some()
                );
            }
        }
    }
}
