//! The linear layer `x @ wᵀ + b` of every projection in the model, with its weights in one of three forms:
//! as stored (in the model's dtype; the CPU takes the bias-seeded GEMM or the few-row kernel of
//! `kernels::cpu::gemm`, other devices candle's matmul), packed for the bf16 kernel (CPU with AVX512-BF16),
//! or quantized.
//!
//! Weight-only quantization uses candle's quantized matmul (GGML block formats: `Q8_0`, 32 int8 weights and
//! one f16 scale per block, 8.5 bits a weight; `Q4_0`, 32 int4 weights and one f16 scale, 4.5 bits a
//! weight). transformers' `BitsAndBytesConfig(load_in_8bit=True)` / `load_in_4bit=True` map here.
//! Activations stay in f32; the token embeddings, the LM head, convolutions and norms are not quantized (the
//! LM head shares its weights with the embedding in the HF-native layout).

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use half::bf16;

use crate::kernels::cpu::bf16_gemm::{self, Packed};
use crate::kernels::cpu::gemm;

/// How the weights of the linear layers are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantization {
    Int8,
    Int4,
}

impl Quantization {
    /// Parses "int8" or "int4".
    pub fn parse(name: &str) -> crate::Result<Self> {
        match name {
            "int8" => Ok(Self::Int8),
            "int4" => Ok(Self::Int4),
            other => Err(crate::Error::invalid(format!(
                "quantize={other:?} is not supported: use \"int8\" or \"int4\""
            ))),
        }
    }

    fn ggml(self) -> GgmlDType {
        match self {
            Self::Int8 => GgmlDType::Q8_0,
            Self::Int4 => GgmlDType::Q4_0,
        }
    }
}

/// A linear layer `x @ wᵀ + b`, with dense or quantized weights.
pub enum Linear {
    /// The weights as loaded, in the model's dtype.
    Float(candle_nn::Linear),
    /// bf16 on a CPU with AVX512-BF16: the weights packed once at load for [`bf16_gemm`] (packing them for
    /// each call writes the whole weight to fresh pages every time), the bias as values (zeros for none).
    /// `.to()` reloads the checkpoint, so no tensor of the weights is kept.
    PackedBf16 { weight: Packed, bias: Vec<bf16> },
    Quantized {
        weight: QMatMul,
        bias: Option<Tensor>,
    },
}

impl Linear {
    /// Loads `weight` `[out, in]` (and `bias` `[out]` when `bias`) from `vb`, quantized when asked.
    pub fn load(
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        vb: VarBuilder,
        quantize: Option<Quantization>,
    ) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Self::new(weight, bias, quantize)
    }

    /// A layer over `weight` `[out, in]` and `bias` `[out]`, quantized when asked.
    pub fn new(
        weight: Tensor,
        bias: Option<Tensor>,
        quantize: Option<Quantization>,
    ) -> Result<Self> {
        let in_dim = weight.dim(1)?;
        let Some(quantize) = quantize else {
            return Self::float(weight, bias);
        };
        if in_dim % quantize.ggml().block_size() != 0 {
            // GGML blocks run along the input dim; a layer that does not fill whole blocks stays dense.
            return Self::float(weight, bias);
        }
        let qtensor = QTensor::quantize(&weight.to_dtype(DType::F32)?, quantize.ggml())?;
        Ok(Self::Quantized {
            weight: QMatMul::from_qtensor(qtensor)?,
            bias: bias.map(|b| b.to_dtype(DType::F32)).transpose()?,
        })
    }
}

impl Linear {
    /// Unquantized: packed for the bf16 kernel where it runs, else as loaded.
    fn float(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (n, k) = weight.dims2()?;
        let packable = weight.device().is_cpu()
            && weight.dtype() == DType::BF16
            && bf16_gemm::available()
            && n > 0
            && k > 0;
        if !packable {
            return Ok(Self::Float(candle_nn::Linear::new(weight, bias)));
        }
        let values: Vec<bf16> = weight.flatten_all()?.to_vec1()?;
        let bias = match bias {
            Some(bias) => bias.to_dtype(DType::BF16)?.flatten_all()?.to_vec1()?,
            None => vec![bf16::ZERO; n],
        };
        if bias.len() != n {
            candle_core::bail!(
                "linear: bias has {} entries, the weight {n} rows",
                bias.len()
            );
        }
        Ok(Self::PackedBf16 {
            weight: Packed::new(&values, n, k),
            bias,
        })
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            // CPU f32: the bias-seeded GEMM, or the few-row kernel while decoding.
            Self::Float(linear) => match gemm::linear(xs, linear.weight(), linear.bias())? {
                Some(ys) => Ok(ys),
                None => linear.forward(xs),
            },
            Self::PackedBf16 { weight, bias } => gemm::linear_packed(xs, weight, bias),
            Self::Quantized { weight, bias } => {
                // candle's quantized matmul takes f32 activations.
                let dtype = xs.dtype();
                let ys = weight.forward(&xs.to_dtype(DType::F32)?.contiguous()?)?;
                let ys = match bias {
                    Some(bias) => ys.broadcast_add(bias)?,
                    None => ys,
                };
                ys.to_dtype(dtype)
            }
        }
    }
}
