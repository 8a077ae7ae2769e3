//! Elementwise CPU ops in f32 and bf16, parallel and vectorized: the exact GELU, the sum of two tensors,
//! and the f32 ↔ bf16 conversion. candle's CPU versions are one sequential scalar loop each (its `gelu_erf`
//! calls libm's scalar `erf` per element). bf16 is computed in f32 and rounded once, as torch and candle do.
//!
//! Each function takes CPU tensors of f32 or bf16 (the caller, in `layers`, sends everything else to candle).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use half::bf16;

use super::math::gelu;
use super::parallel::{par_map, par_zip_map};
use super::storage::{contiguous, contiguous_f32};

/// `x · Φ(x) = x/2 · (1 + erf(x/√2))` of a CPU f32 or bf16 tensor.
pub fn gelu_erf(xs: &Tensor) -> Result<Tensor> {
    xs.contiguous()?.apply_op1_no_bwd(&GeluErf)
}

/// `a + b` of two CPU tensors of one shape and dtype (f32 or bf16).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &Add)
}

/// A CPU f32 tensor as bf16 (round to nearest even, as candle and torch convert), or a bf16 one as f32.
pub fn convert_f32_bf16(xs: &Tensor) -> Result<Tensor> {
    xs.contiguous()?.apply_op1_no_bwd(&Convert)
}

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf-fast"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        map_unary(
            (storage, layout, self.name()),
            |data| CpuStorage::BF16(par_map(data, |x| bf16::from_f32(gelu(x.to_f32())))),
            |data| CpuStorage::F32(par_map(data, gelu)),
        )
    }
}

struct Add;

impl CustomOp2 for Add {
    fn name(&self) -> &'static str {
        "add-parallel"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if al.shape() != bl.shape() {
            candle_core::bail!("add: shapes {:?} and {:?} differ", al.shape(), bl.shape());
        }
        let out = match (a, b) {
            (CpuStorage::BF16(a), CpuStorage::BF16(b)) => CpuStorage::BF16(par_zip_map(
                contiguous(a, al)?,
                contiguous(b, bl)?,
                |x, y| bf16::from_f32(x.to_f32() + y.to_f32()),
            )),
            _ => CpuStorage::F32(par_zip_map(
                contiguous_f32(a, al, self.name())?,
                contiguous_f32(b, bl, self.name())?,
                |x, y| x + y,
            )),
        };
        Ok((out, al.shape().clone()))
    }
}

struct Convert;

impl CustomOp1 for Convert {
    fn name(&self) -> &'static str {
        "convert-f32-bf16"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        map_unary(
            (storage, layout, self.name()),
            |data| CpuStorage::F32(par_map(data, |v| v.to_f32())),
            |data| CpuStorage::BF16(par_map(data, bf16::from_f32)),
        )
    }
}

/// A unary op's result on contiguous bf16 storage (`on_bf16`) or f32 storage (`on_f32`), in the input's
/// shape; the error for anything else names the op.
fn map_unary(
    (storage, layout, op): (&CpuStorage, &Layout, &str),
    on_bf16: impl Fn(&[bf16]) -> CpuStorage,
    on_f32: impl Fn(&[f32]) -> CpuStorage,
) -> Result<(CpuStorage, Shape)> {
    let out = match storage {
        CpuStorage::BF16(data) => on_bf16(contiguous(data, layout)?),
        _ => on_f32(contiguous_f32(storage, layout, op)?),
    };
    Ok((out, layout.shape().clone()))
}
