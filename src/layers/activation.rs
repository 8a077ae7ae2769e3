//! Activation functions by the names transformers' configs give them (`ACT2FN`).

use candle_core::{DType, Result, Tensor};
use candle_nn::Activation;

use crate::kernels::cpu::elementwise;

/// The activation transformers' `ACT2FN[name]` gives, for the names Florence-2 configs use.
pub fn activation(name: &str) -> std::result::Result<Activation, String> {
    match name {
        "gelu" => Ok(Activation::Gelu),
        "gelu_new" | "gelu_fast" => Ok(Activation::NewGelu),
        "gelu_pytorch_tanh" => Ok(Activation::GeluPytorchTanh),
        "relu" => Ok(Activation::Relu),
        "silu" | "swish" => Ok(Activation::Silu),
        other => Err(format!(
            "activation_function {other:?} is not supported (gelu, gelu_new, relu, silu)"
        )),
    }
}

/// `xs.apply(&act)`. The exact GELU (`gelu`, the released configs' activation) of a contiguous CPU f32 or bf16
/// tensor takes the vectorized kernel (candle's `gelu_erf` calls libm's scalar `erf` per element). bf16 is
/// computed in f32 and rounded once, as torch does.
pub fn activate(xs: &Tensor, act: Activation) -> Result<Tensor> {
    let _span = crate::profile::span("activation");
    if matches!(act, Activation::Gelu)
        && xs.device().is_cpu()
        && matches!(xs.dtype(), DType::F32 | DType::BF16)
        && xs.is_contiguous()
    {
        elementwise::gelu_erf(xs)
    } else {
        xs.apply(&act)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use half::bf16;

    #[test]
    fn fast_gelu_matches_candle_gelu_erf() {
        let xs = (Tensor::arange(-12_000f32, 12_000f32, &Device::Cpu).unwrap() / 1000.).unwrap();
        let expected: Vec<f32> = xs.gelu_erf().unwrap().to_vec1().unwrap();
        let got: Vec<f32> = activate(&xs, Activation::Gelu).unwrap().to_vec1().unwrap();
        for ((e, g), x) in expected.iter().zip(&got).zip(xs.to_vec1::<f32>().unwrap()) {
            // In the far negative tail both lose `1 + erf` to cancellation: a few 1e-6 absolute is f32 noise.
            assert!(
                (e - g).abs() <= 2e-6 + 1e-6 * e.abs(),
                "gelu({x}): {g} vs {e}"
            );
        }
    }

    #[test]
    fn fast_gelu_in_bf16_rounds_the_f32_value() {
        let xs = (Tensor::arange(-6_000f32, 6_000f32, &Device::Cpu).unwrap() / 1000.).unwrap();
        let xs = xs.to_dtype(DType::BF16).unwrap();
        let f32_of_bf16 = activate(&xs.to_dtype(DType::F32).unwrap(), Activation::Gelu).unwrap();
        let expected: Vec<bf16> = f32_of_bf16
            .to_dtype(DType::BF16)
            .unwrap()
            .to_vec1()
            .unwrap();
        let got = activate(&xs, Activation::Gelu).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        assert_eq!(got.to_vec1::<bf16>().unwrap(), expected);
    }
}
