//! The data of a custom op's operands: candle hands a CPU op its storage and layout; the kernels take
//! contiguous slices.

use candle_core::{CpuStorage, Layout, Result};

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
