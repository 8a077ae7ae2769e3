//! LayerNorm, as torch's `nn.LayerNorm` with weight and bias.

use candle_core::{DType, Module, Result, Tensor};

use crate::kernels::cpu::layer_norm as cpu_layer_norm;

/// The epsilon of every LayerNorm in Florence-2 (torch's default, which both the DaViT tower and BART use).
pub const LAYER_NORM_EPS: f64 = 1e-5;

/// LayerNorm over the last dim with weight and bias: on the CPU in f32 and bf16 the kernel
/// ([`cpu_layer_norm::layer_norm`]: two vectorized passes per row in f32, as torch computes it), elsewhere
/// candle's.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    inner: candle_nn::LayerNorm,
    eps: f32,
}

/// [`LayerNorm`] of `size` features from `vb` (`weight` and `bias`, as candle_nn::layer_norm reads them).
pub fn layer_norm(size: usize, eps: f64, vb: candle_nn::VarBuilder) -> Result<LayerNorm> {
    Ok(LayerNorm {
        inner: candle_nn::layer_norm(size, eps, vb)?,
        eps: eps as f32,
    })
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let _span = crate::profile::span("layer norm");
        let (weight, bias) = (self.inner.weight(), self.inner.bias());
        let fits = |t: &Tensor| t.device().is_cpu() && t.dtype() == xs.dtype();
        match bias {
            Some(bias)
                if fits(xs)
                    && fits(weight)
                    && fits(bias)
                    && matches!(xs.dtype(), DType::F32 | DType::BF16) =>
            {
                cpu_layer_norm::layer_norm(xs, weight, bias, self.eps)
            }
            _ => self.inner.forward(xs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::max_abs_diff;
    use candle_core::Device;

    #[test]
    fn layer_norm_matches_candle() {
        let dev = Device::Cpu;
        for c in [1, 7, 16, 33, 768] {
            let xs = Tensor::randn(1.5f32, 3., (3, 5, c), &dev).unwrap();
            let weight = Tensor::randn(1f32, 0.5, c, &dev).unwrap();
            let bias = Tensor::randn(0f32, 0.5, c, &dev).unwrap();
            for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
                let [xs, weight, bias] = [&xs, &weight, &bias].map(|t| t.to_dtype(dtype).unwrap());
                let candle = candle_nn::LayerNorm::new(weight.clone(), bias.clone(), 1e-5);
                let ours = LayerNorm {
                    inner: candle.clone(),
                    eps: 1e-5,
                };
                let got = ours.forward(&xs).unwrap();
                assert_eq!(got.dtype(), dtype);
                let want = candle.forward(&xs).unwrap();
                let diff = max_abs_diff(&got, &want);
                // Relative to the outputs' magnitude (up to ~10 with these draws): one bf16 step there is
                // 0.06, and the unseeded draws once gave a difference above an absolute 2e-2.
                let scale = max_abs_diff(&want, &want.zeros_like().unwrap()).max(1.0);
                assert!(
                    diff <= tol * scale,
                    "{dtype:?}, {c} features: {diff} (outputs up to {scale})"
                );
            }
        }
    }
}
