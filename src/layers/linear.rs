//! The linear layer `x @ wᵀ + b` of every projection in the model, with its weights in one of these forms:
//! packed at load for a CPU kernel (f32 and bf16, on x86-64 CPUs with AVX2 + FMA and on aarch64), as stored
//! (in the model's dtype; other CPUs take the bias-seeded GEMM of `kernels::cpu::gemm` in f32, other devices
//! candle's matmul), or quantized.
//!
//! Quantized weights (transformers' `BitsAndBytesConfig(load_in_8bit=True)` / `load_in_4bit=True` map here)
//! take one of two kernels. On an x86-64 CPU with AVX2 + FMA (AVX512-VNNI's byte products where it has them)
//! or an aarch64 CPU with NEON's `sdot`, [`quantized_gemm`]: int8 weights with a scale per
//! output column, or int4 with a scale per column and 32 inputs, against activations quantized to int8 per
//! row at each call (bitsandbytes' LLM.int8() scheme, without its outlier columns), in the model's f32 or
//! bf16 around it. Elsewhere (other CPUs, GPUs) candle's quantized matmul: weight-only GGML blocks (`Q8_0`,
//! 32 int8 weights and one f16 scale, 8.5 bits a weight; `Q4_0`, 32 int4 weights and one f16 scale, 4.5
//! bits), activations in f32. Convolutions and norms are not quantized; the token embedding and the LM head
//! are quantized where the first kernel runs (at int8 under int4 too: [`Quantization::for_token_table`])
//! and stay dense with the second.
//!
//! Packed weights are a [`PackedTable`], which the token embedding and the LM head share when they are tied
//! ([`super::embedding`]).

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Activation, VarBuilder};
use half::bf16;

use super::activation::activate;
use super::ops::broadcast_add;
use crate::kernels::cpu::bf16_gemm::{self, Packed};
use crate::kernels::cpu::f32_gemm;
use crate::kernels::cpu::gemm::{self, Epilogue, PackedWeights};
use crate::kernels::cpu::quantized_gemm::{self, Bits};

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

    /// The format of the token table and the LM head (one table where tied) when the linear layers take
    /// `self`: int4 keeps them at int8. Their rows are the logits of every step, and the `<loc_*>` rows decide
    /// the boxes between neighbouring bins: at 4 bits that table costs a trained model most of int4's loss
    /// (docs/quantization.md); bitsandbytes leaves it unquantized, int8 keeps it in a quarter of float32's
    /// memory.
    pub fn for_token_table(self) -> Self {
        match self {
            Self::Int8 | Self::Int4 => Self::Int8,
        }
    }

    fn ggml(self) -> GgmlDType {
        match self {
            Self::Int8 => GgmlDType::Q8_0,
            Self::Int4 => GgmlDType::Q4_0,
        }
    }

    fn bits(self) -> Bits {
        match self {
            Self::Int8 => Bits::Int8,
            Self::Int4 => Bits::Int4,
        }
    }
}

/// A linear layer `x @ wᵀ + b`, with dense or quantized weights. The packed forms keep no tensor of the
/// weights: `.to()` reloads the checkpoint.
pub enum Linear {
    /// The weights as loaded, in the model's dtype.
    Float(candle_nn::Linear),
    /// f32 on a CPU with AVX2 + FMA: the weights packed once at load for [`f32_gemm`], the bias as values (zeros
    /// for none).
    PackedF32 {
        weight: Arc<f32_gemm::Packed>,
        bias: Vec<f32>,
    },
    /// bf16 on a CPU with AVX2 + FMA: the weights packed once at load for [`bf16_gemm`] (packing them for
    /// each call writes the whole weight to fresh pages every time), the bias as values (zeros for none).
    PackedBf16 {
        weight: Arc<Packed>,
        bias: Vec<bf16>,
    },
    /// Quantized for [`quantized_gemm`] (a CPU with AVX2 + FMA, f32 or bf16 activations), the bias in f32
    /// (zeros for none).
    PackedQuantized {
        weight: Arc<quantized_gemm::Packed>,
        bias: Vec<f32>,
    },
    /// Quantized for candle's matmul.
    Quantized {
        weight: QMatMul,
        bias: Option<Tensor>,
    },
}

/// Weights `[out, in]` packed at load for one of the CPU kernels, shared (reference-counted) between the
/// layers that use them: a token embedding reads its rows back ([`Self::row`]) and the LM head tied to it
/// multiplies by the same table.
#[derive(Clone)]
pub enum PackedTable {
    F32(Arc<f32_gemm::Packed>),
    Bf16(Arc<Packed>),
    Quantized(Arc<quantized_gemm::Packed>),
}

impl PackedTable {
    /// `weight` packed for the kernel that runs for it here: quantized when `quantize` asks and
    /// [`pack_quantized`] runs, else dense where a kernel runs for its dtype ([`pack_dense`]); `None` where
    /// neither does.
    pub fn pack(weight: &Tensor, quantize: Option<Quantization>) -> Result<Option<Self>> {
        if let Some(quantize) = quantize {
            if let Some(packed) = pack_quantized(weight, quantize)? {
                return Ok(Some(Self::Quantized(Arc::new(packed))));
            }
        }
        pack_dense(weight)
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            Self::F32(w) => w.dims(),
            Self::Bf16(w) => w.dims(),
            Self::Quantized(w) => w.dims(),
        }
    }

    /// Row `c` (`in` values; dequantized for a quantized table) into `out`.
    pub fn row(&self, c: usize, out: &mut [f32]) {
        match self {
            Self::F32(w) => w.row(c, out),
            Self::Bf16(w) => w.row(c, out),
            Self::Quantized(w) => w.row(c, out),
        }
    }

    /// The layer `x @ wᵀ + bias` over these weights (`bias` `[out]`, none for zeros).
    pub fn linear(&self, bias: Option<Tensor>) -> Result<Linear> {
        let n = self.dims().0;
        Ok(match self {
            Self::F32(weight) => Linear::PackedF32 {
                weight: weight.clone(),
                bias: bias_values(bias, n)?,
            },
            Self::Bf16(weight) => Linear::PackedBf16 {
                weight: weight.clone(),
                bias: bias_values(bias, n)?,
            },
            Self::Quantized(weight) => Linear::PackedQuantized {
                weight: weight.clone(),
                bias: bias_values(bias, n)?,
            },
        })
    }
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
        let in_dim = weight.dims2()?.1;
        let Some(quantize) = quantize else {
            return Self::float(weight, bias);
        };
        if let Some(packed) = pack_quantized(&weight, quantize)? {
            return PackedTable::Quantized(Arc::new(packed)).linear(bias);
        }
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

    /// Unquantized: packed for the f32 or bf16 kernel where it runs, else as loaded.
    fn float(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        match pack_dense(&weight)? {
            Some(table) => table.linear(bias),
            None => Ok(Self::Float(candle_nn::Linear::new(weight, bias))),
        }
    }
}

/// Dense `weight` `[out, in]` packed for [`f32_gemm`] (f32) or [`bf16_gemm`] (bf16) where the kernel runs
/// (x86-64 with AVX2 + FMA, aarch64); `None` elsewhere.
pub fn pack_dense(weight: &Tensor) -> Result<Option<PackedTable>> {
    let (n, k) = weight.dims2()?;
    if !(weight.device().is_cpu() && n > 0 && k > 0) {
        return Ok(None);
    }
    Ok(match weight.dtype() {
        DType::F32 if f32_gemm::available() => {
            let values: Vec<f32> = weight.flatten_all()?.to_vec1()?;
            Some(PackedTable::F32(Arc::new(f32_gemm::Packed::new(
                &values, n, k,
            ))))
        }
        DType::BF16 if bf16_gemm::available() => {
            let values: Vec<bf16> = weight.flatten_all()?.to_vec1()?;
            Some(PackedTable::Bf16(Arc::new(Packed::new(&values, n, k))))
        }
        _ => None,
    })
}

/// `weight` `[out, in]` quantized for [`quantized_gemm`], where that kernel runs for it (an x86-64 CPU with
/// AVX2 + FMA or an aarch64 one with `sdot`, f32 or bf16 activations, at most [`quantized_gemm::MAX_INPUTS`]
/// inputs); `None` elsewhere.
pub fn pack_quantized(
    weight: &Tensor,
    quantize: Quantization,
) -> Result<Option<quantized_gemm::Packed>> {
    let (out_dim, in_dim) = weight.dims2()?;
    let runs = weight.device().is_cpu()
        && matches!(weight.dtype(), DType::F32 | DType::BF16)
        && quantized_gemm::available()
        && out_dim > 0
        && (1..=quantized_gemm::MAX_INPUTS).contains(&in_dim);
    if !runs {
        return Ok(None);
    }
    let values: Vec<f32> = weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(Some(quantized_gemm::Packed::new(
        &values,
        out_dim,
        in_dim,
        quantize.bits(),
    )))
}

/// A packed layer's bias: `n` values (zeros for none).
fn bias_values<T: candle_core::WithDType>(bias: Option<Tensor>, n: usize) -> Result<Vec<T>> {
    let values = match bias {
        Some(bias) => bias.to_dtype(T::DTYPE)?.flatten_all()?.to_vec1()?,
        None => vec![T::zero(); n],
    };
    if values.len() != n {
        candle_core::bail!(
            "linear: bias has {} entries, the weight {n} rows",
            values.len()
        );
    }
    Ok(values)
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_with(xs, Epilogue::None)
    }
}

impl Linear {
    /// `act(x @ wᵀ + b)`. The packed CPU kernels apply the exact GELU to each block of outputs as they write
    /// it (the same values as a GELU after the product, without its pass over the whole output); everything
    /// else applies `act` after the product.
    pub fn forward_activated(&self, xs: &Tensor, act: Activation) -> Result<Tensor> {
        let packed = matches!(
            self,
            Self::PackedF32 { .. } | Self::PackedBf16 { .. } | Self::PackedQuantized { .. }
        );
        if packed && matches!(act, Activation::Gelu) {
            return self.forward_with(xs, Epilogue::Gelu);
        }
        activate(&self.forward(xs)?, act)
    }

    fn forward_with(&self, xs: &Tensor, epilogue: Epilogue) -> Result<Tensor> {
        let mut span = crate::profile::span("linear");
        let ys = self.forward_unprofiled(xs, epilogue)?;
        span.add_flops(2.0 * xs.elem_count() as f64 * ys.dim(D::Minus1)? as f64);
        Ok(ys)
    }

    /// `epilogue` is applied by the packed kernels only; callers pass `Epilogue::None` for the others.
    fn forward_unprofiled(&self, xs: &Tensor, epilogue: Epilogue) -> Result<Tensor> {
        match self {
            // CPU f32 without a packed kernel: the bias-seeded GEMM.
            Self::Float(linear) => match gemm::linear(xs, linear.weight(), linear.bias())? {
                Some(ys) => Ok(ys),
                // candle's product, with the bias added by `ops::broadcast_add` for its rounding.
                None => {
                    let ys = candle_nn::Linear::new(linear.weight().clone(), None).forward(xs)?;
                    match linear.bias() {
                        Some(bias) => broadcast_add(&ys, bias),
                        None => Ok(ys),
                    }
                }
            },
            Self::PackedF32 { weight, bias } => {
                gemm::linear_packed(xs, PackedWeights::F32(weight, bias), epilogue)
            }
            Self::PackedBf16 { weight, bias } => {
                gemm::linear_packed(xs, PackedWeights::Bf16(weight, bias), epilogue)
            }
            Self::PackedQuantized { weight, bias } => {
                gemm::linear_packed(xs, PackedWeights::Quantized(weight, bias), epilogue)
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The GELU applied by the packed kernels as they write (the AMX and the vector kernel's rows, several
    /// tasks, a partial panel) equals the GELU after the product, bit for bit, in every packed form.
    #[test]
    fn fused_gelu_is_the_gelu_after_the_product() {
        let dev = Device::Cpu;
        let (m, k, n) = (70, 64, 100);
        let x = Tensor::randn(0f32, 1., (m, k), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.3, (n, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 1., n, &dev).unwrap();
        for (dtype, quantize) in [
            (DType::F32, None),
            (DType::BF16, None),
            (DType::F32, Some(Quantization::Int8)),
            (DType::BF16, Some(Quantization::Int4)),
        ] {
            let [x, w, b] = [&x, &w, &b].map(|t| t.to_dtype(dtype).unwrap());
            let linear = Linear::new(w, Some(b), quantize).unwrap();
            let fused = linear.forward_activated(&x, Activation::Gelu).unwrap();
            let after = activate(&linear.forward(&x).unwrap(), Activation::Gelu).unwrap();
            let bits = |t: &Tensor| -> Vec<u32> {
                let t = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
                t.to_vec1::<f32>()
                    .unwrap()
                    .into_iter()
                    .map(f32::to_bits)
                    .collect()
            };
            assert_eq!(bits(&fused), bits(&after), "{dtype:?} {quantize:?}");
        }
    }

    /// A dense packed table reads back each row of the weights, bits and all, in f32 and bf16 (where their
    /// kernels run): an odd `k` (bf16 pairs) and a partial last panel, as a tied embedding's lookups need.
    #[test]
    fn packed_rows_read_back_the_weights() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::BF16] {
            for (n, k) in [(33, 7), (70, 64)] {
                let weight = Tensor::randn(0f32, 1., (n, k), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let Some(table) = pack_dense(&weight).unwrap() else {
                    eprintln!("skipped: no {dtype:?} kernel on this CPU");
                    continue;
                };
                let want: Vec<Vec<f32>> = weight.to_dtype(DType::F32).unwrap().to_vec2().unwrap();
                let mut row = vec![0f32; k];
                for (c, want) in want.iter().enumerate() {
                    table.row(c, &mut row);
                    assert_eq!(&row, want, "{dtype:?} {n}x{k} row {c}");
                }
            }
        }
    }
}
