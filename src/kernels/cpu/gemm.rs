//! `x @ wᵀ + b` on the CPU: the glue between the linear layer and the GEMM kernels, for f32 weights as stored
//! ([`linear`]: where nothing is packed, x86-64 CPUs without AVX2 and architectures other than aarch64) and for
//! weights packed at load ([`linear_packed`]).
//!
//! candle computes it as a matmul into a zeroed buffer followed by a broadcast add of the bias: two extra
//! passes over every output, and the vision tower's linear layers write gigabytes of outputs per image. Here
//! the output buffer starts as the bias repeated on each row and the GEMM (the gemm crate) accumulates the
//! product into it (`dst = dst + x @ wᵀ`), so each output is written once by the fill and once by the GEMM.
//! Weights packed at load go to [`super::f32_gemm`], [`super::bf16_gemm`] or [`super::quantized_gemm`].

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};
use half::bf16;

use gemm::Parallelism;

use super::bf16_gemm::{self, Packed};
use super::f32_gemm;
pub use super::panels::Epilogue;
use super::quantized_gemm;
use super::storage::{contiguous, contiguous_f32};

/// `x @ wᵀ + b` for `x` `[..., K]`, `w` `[N, K]`, `b` `[N]`, all f32 on the CPU; `None` where this path does
/// not apply (another device or dtype), for candle's.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Option<Tensor>> {
    let dtype = x.dtype();
    let supported = dtype == DType::F32;
    let cpu_same_dtype = |t: &Tensor| t.device().is_cpu() && t.dtype() == dtype;
    if !(supported && cpu_same_dtype(x) && cpu_same_dtype(w) && b.is_none_or(cpu_same_dtype))
        || w.rank() != 2
    {
        return Ok(None);
    }
    let (n, k) = w.dims2()?;
    if x.rank() == 0 {
        return Ok(None);
    }
    let (x2, out_dims) = as_rows(x, k, n)?;
    if x2.dim(0)? == 0 || k == 0 || n == 0 {
        return Ok(None); // nothing to multiply: candle's matmul handles empty shapes
    }
    let w = w.contiguous()?;
    // No bias: the output starts at zero, which is a zero bias.
    let b = match b {
        Some(b) => b.contiguous()?,
        None => Tensor::zeros(n, dtype, x.device())?,
    };
    let out = x2.apply_op3_no_bwd(&w, &b, &BiasedMatmulT)?;
    Ok(Some(out.reshape(out_dims)?))
}

/// Weights packed at load for one of the packed kernels, with their bias (zeros for none).
#[derive(Clone, Copy)]
pub enum PackedWeights<'a> {
    /// [`super::f32_gemm`]: f32 activations.
    F32(&'a f32_gemm::Packed, &'a [f32]),
    /// [`super::bf16_gemm`]: bf16 activations.
    Bf16(&'a Packed, &'a [bf16]),
    /// [`super::quantized_gemm`]: f32 or bf16 activations.
    Quantized(&'a quantized_gemm::Packed, &'a [f32]),
}

impl PackedWeights<'_> {
    fn dims(self) -> (usize, usize) {
        match self {
            Self::F32(w, _) => w.dims(),
            Self::Bf16(w, _) => w.dims(),
            Self::Quantized(w, _) => w.dims(),
        }
    }
}

/// `epilogue(x @ wᵀ + bias)` for a CPU `x` `[..., K]` and weights packed at load, in `x`'s dtype (f32 for
/// [`PackedWeights::F32`], bf16 for [`PackedWeights::Bf16`], either for [`PackedWeights::Quantized`]).
pub fn linear_packed(x: &Tensor, w: PackedWeights, epilogue: Epilogue) -> Result<Tensor> {
    let dtype = x.dtype();
    let fits = match w {
        PackedWeights::F32(..) => dtype == DType::F32,
        PackedWeights::Bf16(..) => dtype == DType::BF16,
        PackedWeights::Quantized(..) => matches!(dtype, DType::F32 | DType::BF16),
    };
    if !(x.device().is_cpu() && fits) {
        candle_core::bail!(
            "a packed CPU linear layer got a {dtype:?} input on {:?}",
            x.device().location()
        );
    }
    let (n, k) = w.dims();
    let (x2, out_dims) = as_rows(x, k, n)?;
    let out = if x2.dim(0)? == 0 {
        Tensor::zeros(out_dims.as_slice(), dtype, x.device())?
    } else {
        x2.apply_op1_no_bwd(&PackedMatmulT(w, epilogue))?
    };
    out.reshape(out_dims)
}

/// `x` `[..., K]` as contiguous rows `[rows, K]`, and the dims of the output with `n` features.
fn as_rows(x: &Tensor, k: usize, n: usize) -> Result<(Tensor, Vec<usize>)> {
    let Some(&x_k) = x.dims().last() else {
        candle_core::bail!("linear: the input is a scalar");
    };
    if x_k != k {
        candle_core::bail!("linear: input has {x_k} features, the weight {k}");
    }
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("x has a last dim") = n;
    let rows = x.elem_count() / k.max(1);
    Ok((x.reshape((rows, k))?.contiguous()?, out_dims))
}

/// `epilogue([M, K] x packed [N, K] + bias) → [M, N]`.
struct PackedMatmulT<'a>(PackedWeights<'a>, Epilogue);

impl CustomOp1 for PackedMatmulT<'_> {
    fn name(&self) -> &'static str {
        "packed-matmul-t"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, _) = xl.shape().dims2()?;
        let shape = Shape::from((m, self.0.dims().0));
        let epilogue = self.1;
        let out = match (x, self.0) {
            (CpuStorage::F32(x), PackedWeights::F32(w, b)) => {
                CpuStorage::F32(f32_gemm::linear(contiguous(x, xl)?, m, w, b, epilogue))
            }
            (CpuStorage::BF16(x), PackedWeights::Bf16(w, b)) => CpuStorage::BF16(
                bf16_gemm::linear_packed(contiguous(x, xl)?, m, w, b, epilogue),
            ),
            (CpuStorage::F32(x), PackedWeights::Quantized(w, b)) => CpuStorage::F32(
                quantized_gemm::linear(contiguous(x, xl)?, m, w, b, epilogue),
            ),
            (CpuStorage::BF16(x), PackedWeights::Quantized(w, b)) => CpuStorage::BF16(
                quantized_gemm::linear(contiguous(x, xl)?, m, w, b, epilogue),
            ),
            _ => candle_core::bail!(
                "{}: the input's dtype does not fit the weights",
                self.name()
            ),
        };
        Ok((out, shape))
    }
}

/// Whether the linear layers have a CPU kernel for `dtype` here: [`linear`] for f32 weights as stored, the
/// packed kernels for f32 and (with AVX2 + FMA) bf16 weights packed at load.
pub fn cpu_supports(dtype: DType) -> bool {
    match dtype {
        DType::F32 => true,
        DType::BF16 => bf16_gemm::available(),
        _ => false,
    }
}

/// `[M, K] x [N, K] + [N] → [M, N]`, contiguous f32 operands.
struct BiasedMatmulT;

impl BiasedMatmulT {
    fn run(
        x: (&[f32], &Layout),
        w: (&[f32], &Layout),
        bias: &[f32],
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = x.1.shape().dims2()?;
        let (n, _) = w.1.shape().dims2()?;
        let mut out = Vec::with_capacity(m * n);
        (0..m).for_each(|_| out.extend_from_slice(bias));
        // SAFETY: `out` holds m x n floats, `x` m x k and `w` n x k, all row-major; wᵀ is read through strides.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                out.as_mut_ptr(),
                1,
                n as isize,
                true,
                x.0.as_ptr(),
                1,
                k as isize,
                w.0.as_ptr(),
                k as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                Parallelism::Rayon(rayon::current_num_threads()),
            );
        }
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

impl CustomOp3 for BiasedMatmulT {
    fn name(&self) -> &'static str {
        "biased-matmul-t"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, _) = wl.shape().dims2()?;
        if bl.shape().elem_count() != n {
            candle_core::bail!(
                "linear: bias has {} entries, the weight {n} rows",
                bl.shape().elem_count()
            );
        }
        let bias = contiguous_f32(b, bl, self.name())?;
        let (x, w) = (
            contiguous_f32(x, xl, self.name())?,
            contiguous_f32(w, wl, self.name())?,
        );
        Self::run((x, xl), (w, wl), bias)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module};

    #[test]
    fn matches_candle_linear() {
        let dev = Device::Cpu;
        for (dtype, tol) in [(DType::F32, 1e-5)] {
            for (rows, k, n) in [(1, 7, 5), (20, 33, 17), (2 * 65, 64, 96)] {
                let x = Tensor::randn(0f32, 1., (2, rows / 2 + 1, k), &dev).unwrap();
                let w = Tensor::randn(0f32, 1., (n, k), &dev).unwrap();
                let b = Tensor::randn(0f32, 1., n, &dev).unwrap();
                let [x, w, b] = [x, w, b].map(|t| t.to_dtype(dtype).unwrap());
                for bias in [Some(&b), None] {
                    let expected = candle_nn::Linear::new(w.clone(), bias.cloned())
                        .forward(&x)
                        .unwrap();
                    let got = linear(&x, &w, bias).unwrap().unwrap();
                    assert_eq!(got.dims(), expected.dims());
                    assert_eq!(got.dtype(), dtype);
                    let scalar =
                        |t: Tensor| t.to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap();
                    let diff = scalar(
                        (&got - &expected)
                            .unwrap()
                            .abs()
                            .unwrap()
                            .max_all()
                            .unwrap(),
                    );
                    let scale = scalar(expected.abs().unwrap().max_all().unwrap());
                    assert!(
                        diff <= tol * scale,
                        "{dtype:?} {rows}x{k}x{n}: {diff} of {scale}"
                    );
                }
            }
        }
    }
}
