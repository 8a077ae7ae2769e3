//! The data of a custom op's operands: candle hands a CPU op its storage and layout; the kernels take
//! contiguous slices, of f32 or bf16 values that they compute with in f32 ([`Element`]).

use candle_core::{CpuStorage, Layout, Result};
use half::bf16;

use super::features::wide_fn;

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

    /// Loads the first lanes of `mask` from `src` as 16 f32 (zeros elsewhere).
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL, and the caller is compiled with them; `src` holds the masked values.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(src: *const Self, mask: u16) -> std::arch::x86_64::__m512;
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
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(src: *const f32, mask: u16) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_maskz_loadu_ps(mask, src)
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
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(src: *const bf16, mask: u16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        let halves = _mm256_maskz_loadu_epi16(mask, src.cast());
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16))
    }
}

wide_fn! {
    /// The `to.len() / width` rows of `width` values of `from`, whose rows start `stride` values apart, as
    /// f32 into `to`: a task's operand widened where it is used, in loops compiled for the widest SIMD the
    /// CPU has.
    pub fn widen_rows[T: Element](from: &[T], stride: usize, width: usize, to: &mut [f32]) = widen_rows_portable;
}

#[inline(always)]
fn widen_rows_portable<T: Element>(from: &[T], stride: usize, width: usize, to: &mut [f32]) {
    for (r, to) in to.chunks_exact_mut(width).enumerate() {
        for (to, &x) in to.iter_mut().zip(&from[r * stride..][..width]) {
            *to = x.to_f32();
        }
    }
}

wide_fn! {
    /// Each value of `from` as `T` into `to` (bf16: rounded once, to nearest even).
    pub fn narrow_into[T: Element](from: &[f32], to: &mut [T]) = narrow_into_portable;
}

#[inline(always)]
fn narrow_into_portable<T: Element>(from: &[f32], to: &mut [T]) {
    for (to, &x) in to.iter_mut().zip(from) {
        *to = T::from_f32(x);
    }
}

/// The first `count` (at most 4) lanes of `v` as `T` (bf16: rounded to nearest even) into `dst`: a NEON
/// tile's store of a vector that may run past its panel's last column.
///
/// # Safety
/// `dst` is valid for `count` values of writes.
#[cfg(target_arch = "aarch64")]
#[inline(always)]
pub unsafe fn store_first4<T: Element>(
    v: std::arch::aarch64::float32x4_t,
    dst: *mut T,
    count: usize,
) {
    let mut values = [0f32; 4];
    std::arch::aarch64::vst1q_f32(values.as_mut_ptr(), v);
    for (e, &value) in values[..count].iter().enumerate() {
        dst.add(e).write(T::from_f32(value));
    }
}
