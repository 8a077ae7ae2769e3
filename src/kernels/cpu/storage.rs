//! The data of a custom op's operands: candle hands a CPU op its storage and layout; the kernels take
//! contiguous slices, of f32 or bf16 values that they compute with in f32 ([`Element`]).

use candle_core::{CpuStorage, Layout, Result};
use half::bf16;

/// The f32 data of a custom op's operand, which must be contiguous; the error names the op.
pub fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&data[start..end]),
        _ => candle_core::bail!("{op} takes contiguous f32 tensors"),
    }
}

/// The data of a contiguous operand.
pub fn contiguous<'a, T>(data: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("a custom op takes contiguous tensors"),
    }
}

/// A value type the kernels read as f32 and write from f32 (rounding once, to nearest even, for bf16).
pub trait Element: Copy + Default + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(value: f32) -> Self;
    /// The values as f32 without a copy, where they are f32.
    fn as_f32(values: &[Self]) -> Option<&[f32]>;
}

impl Element for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        value
    }
    fn as_f32(values: &[Self]) -> Option<&[f32]> {
        Some(values)
    }
}

impl Element for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        bf16::from_f32(value)
    }
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
}
