//! `x @ wᵀ + b` with int8 or int4 weights on the CPU, by AVX512-VNNI's byte dot product (`vpdpbusd`: 64
//! products of an unsigned and a signed byte, summed in fours into 16 int32 lanes, in one instruction, twice
//! the products of a bf16 `vdpbf16ps` and four times an f32 FMA of the same width).
//!
//! The scheme is bitsandbytes' LLM.int8() without its outlier columns: symmetric weights, activations
//! quantized per row (per token) at each call.
//! - Weights, quantized at load ([`Packed`]): int8 with one scale per output column (`max |w| / 127`), or
//!   int4 with one scale per column and group of [`INT4_GROUP`] inputs, as GGML's `Q4_0` (the value of
//!   largest magnitude over -8, levels -8..=7).
//! - Activations: each row of `x` scaled by `max |x| / 127` and rounded to -127..=127, stored with 128 added
//!   (`vpdpbusd` takes its first operand unsigned). The weights' column sums, times 128 and the weight
//!   scale, are taken off at the end.
//!
//! So `y[i][c] = s_x[i] * (Σ_g s_w[g][c] * Σ_{t in g} (q_x[i][t] + 128) * q_w[c][t] - 128 * Σ_g s_w[g][c] *
//! Σ_{t in g} q_w[c][t]) + b[c]`: the inner sums are exact in int32 (a group's are at most 255 x 127 x its
//! inputs, and [`MAX_INPUTS`] bounds them), the rest in f32.
//!
//! The packed weights lie in panels of [`PANEL`] output columns ([`super::panels`]), four consecutive
//! inputs of a column in each 32-bit lane, so that one 64-byte load (int8) or half of one (int4, two
//! nibbles a byte) gives a `vpdpbusd` operand for 16 columns. One kernel serves every row count: a decode
//! step's few rows read each panel once. On CPUs with AMX-INT8, int8 products of many rows take the tile unit
//! instead ([`super::amx::block_int8`], the same int32 sums), and the epilogue here.
//!
//! CPUs without AVX512-VNNI take AVX2 kernels over the same panels. For int4, `vpmaddubsw`: 32 byte
//! products of an offset activation and a weight level, summed in pairs in int16, which they cannot leave
//! (at most 2 x 255 x 8), nor can the sums of a group's [`INT4_GROUP`] inputs; `vpmaddwd` by ones widens
//! those to int32 column sums. For int8 those pairs would saturate (2 x 255 x 127), so the activations are
//! widened to 16 bits (a quad of a row is 64 bits, broadcast to the four quads of a vector), 16 weight bytes
//! (four columns' quads) sign-extended, and `vpmaddwd` sums pairs of products in int32: a column's quad sum
//! is two lanes, folded into one at the end. Either way the int32 sums are the same integers as
//! `vpdpbusd`'s and the f32 arithmetic after them is the same operations in the same order, so the kernels
//! give the same bits.
//!
//! On aarch64 the kernels are NEON's ([`neon`]). Where the CPU has the Int8 matrix multiply extension,
//! `usmmla` (a 2 x 2 block of int32 sums, each of eight products of an unsigned and a signed byte) sums the
//! offset activations as `vpdpbusd` does. Otherwise `sdot` (four products of signed bytes summed into each
//! int32 lane): the activations are quantized to the same levels, stored without the offset, and a group's
//! `128 * Σ_t q_w[c][t]` is added to its int32 sums, which makes them the same integers again.
//!
//! Every kernel, then, gives the same bits from the same inputs, whatever the CPU: detected at run time
//! ([`super::features::cpu_tier`]), the `vpdpbusd` kernel at the AVX-512 tier on CPUs with AVX512-VNNI, the
//! AVX2 kernels at the AVX2 tier and on AVX-512 CPUs without VNNI, the `usmmla` kernel at aarch64's i8mm
//! tier and the `sdot` kernel at its dotprod tier. [`available`] is false elsewhere (the baseline tiers,
//! other architectures) and the caller keeps candle's quantized matmul.

use half::bf16;

#[cfg(target_arch = "x86_64")]
use super::amx;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use super::panels::for_each_block;
#[cfg(target_arch = "x86_64")]
use super::panels::{by_rows, tiles};
use super::panels::{Epilogue, PANEL};
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use super::parallel::TaskPtr;
use super::storage::Element;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use std::ops::Range;

#[cfg(target_arch = "aarch64")]
mod neon;

/// Inputs that share an int4 scale (GGML's `Q4_0` block).
pub const INT4_GROUP: usize = 32;

/// The most inputs (`k`) a layer may have: a sum of that many products of an offset activation (at most
/// 255) and an int8 weight (at most 127 in magnitude) stays inside an int32.
pub const MAX_INPUTS: usize = (i32::MAX as usize) / (255 * 127);

/// How the weights are quantized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bits {
    /// int8, one scale per output column.
    Int8,
    /// int4, one scale per output column and [`INT4_GROUP`] inputs.
    Int4,
}

impl Bits {
    /// Bytes a quad (four inputs of 32 columns) takes in a panel.
    fn quad_bytes(self) -> usize {
        match self {
            Self::Int8 => 4 * PANEL,
            Self::Int4 => 2 * PANEL,
        }
    }

    /// The lowest and highest level.
    fn levels(self) -> (f32, f32) {
        match self {
            Self::Int8 => (-127.0, 127.0),
            Self::Int4 => (-8.0, 7.0),
        }
    }

    /// A group of weights' scale: int8 `max |w| / 127`; int4 the value of largest magnitude over -8, so that
    /// it takes level -8 and all 16 levels serve. A group holding a NaN or an infinity gets a NaN scale (its
    /// outputs are NaN, as the product's would be).
    fn scale(self, values: &[f32]) -> f32 {
        if values.iter().any(|v| !v.is_finite()) {
            return f32::NAN;
        }
        let extreme = values
            .iter()
            .fold(0f32, |e, &v| if v.abs() > e.abs() { v } else { e });
        match self {
            Self::Int8 => extreme.abs() / 127.0,
            Self::Int4 => extreme / -8.0,
        }
    }
}

/// The factor that takes a value to its level for `scale`: zero for a zero (or NaN) scale, and for one so
/// small that its inverse is not finite (the values are then zero to f32 precision).
fn inverse(scale: f32) -> f32 {
    let inverse = scale.recip();
    if inverse.is_finite() {
        inverse
    } else {
        0.0
    }
}

/// Whether the kernel runs here (for f32 and bf16 activations alike).
pub fn available() -> bool {
    Kernel::detected().is_some()
}

/// The kernel families: each quantizes the activations and sums a register tile its own way, over the same
/// packed weights and to the same outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    /// AVX-512 F/BW/VL and VNNI (`vpdpbusd`), and the tile unit for int8 where it runs.
    #[cfg(target_arch = "x86_64")]
    Vnni,
    /// AVX2 and FMA (`vpmaddwd`).
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// NEON with the Int8 matrix multiply extension (`usmmla`).
    #[cfg(target_arch = "aarch64")]
    I8mm,
    /// NEON with the dot product extension (`sdot`).
    #[cfg(target_arch = "aarch64")]
    Dotprod,
}

impl Kernel {
    /// This architecture's families, fastest first.
    #[cfg(target_arch = "x86_64")]
    const ALL: &[Kernel] = &[Self::Vnni, Self::Avx2];
    #[cfg(target_arch = "aarch64")]
    const ALL: &[Kernel] = &[Self::I8mm, Self::Dotprod];
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    const ALL: &[Kernel] = &[];

    /// The fastest family the CPU tier runs, if any.
    fn detected() -> Option<Self> {
        Self::ALL.iter().copied().find(|kernel| kernel.runs())
    }

    /// Whether the CPU tier runs this family.
    fn runs(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Vnni => super::features::has_avx512_vnni(),
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => super::features::has_avx2_fma(),
            #[cfg(target_arch = "aarch64")]
            Self::I8mm => super::features::has_i8mm(),
            #[cfg(target_arch = "aarch64")]
            Self::Dotprod => super::features::has_dotprod(),
        }
    }
}

/// Quantized weights `w[n, k]`, laid out for the kernel, with their scales and the per-column constant of
/// the activations' offset.
pub struct Packed {
    bits: Bits,
    n: usize,
    k: usize,
    /// Inputs sharing a scale: `k` rounded up to a quad for int8, [`INT4_GROUP`] for int4.
    group: usize,
    /// `k` rounded up to whole groups; the padding inputs are zero weights.
    k_padded: usize,
    /// Per panel, `k_padded / 4` quads. int8: 32 lanes of 4 bytes, lane `c` holding column `c`'s inputs
    /// `4j..4j + 4`. int4: 64 bytes, byte `4c + e` holding column `c`'s input `4j + e` in its low nibble and
    /// column `16 + c`'s in its high nibble, both with 8 added.
    data: Vec<u8>,
    /// Per panel and group, 32 column scales.
    scales: Vec<f32>,
    /// Per column (padded to whole panels): `128 * Σ_g s_w[g][c] * Σ_{t in g} q_w[c][t]`. Read by the
    /// kernels only (on other architectures nothing packs weights: `available()` is false).
    #[cfg_attr(
        not(any(target_arch = "x86_64", target_arch = "aarch64")),
        allow(dead_code)
    )]
    offsets: Vec<f32>,
}

impl Packed {
    /// Quantizes and packs row-major `w` of `n` rows and `k` columns (`n`, `k` at least 1, `k` at most
    /// [`MAX_INPUTS`]).
    ///
    /// # Panics
    /// On shapes outside those bounds, or a `w` that does not hold them.
    pub fn new(w: &[f32], n: usize, k: usize, bits: Bits) -> Self {
        use rayon::prelude::*;
        assert!(n > 0 && (1..=MAX_INPUTS).contains(&k) && w.len() == n * k);
        let group = match bits {
            Bits::Int8 => k.next_multiple_of(4),
            Bits::Int4 => INT4_GROUP,
        };
        let k_padded = k.next_multiple_of(group);
        let (groups, panels) = (k_padded / group, n.div_ceil(PANEL));
        let panel_bytes = k_padded / 4 * bits.quad_bytes();
        // Zero weights (columns past `n`, inputs past `k`) are 0 in int8 and 8 in an int4 nibble.
        let zero = match bits {
            Bits::Int8 => 0,
            Bits::Int4 => 0x88,
        };
        let mut data = vec![zero; panels * panel_bytes];
        let mut scales = vec![0f32; panels * groups * PANEL];
        let mut offsets = vec![0f32; panels * PANEL];
        data.par_chunks_mut(panel_bytes)
            .zip(scales.par_chunks_mut(groups * PANEL))
            .zip(offsets.par_chunks_mut(PANEL))
            .enumerate()
            .for_each(|(p, ((data, scales), offsets))| {
                for c in 0..PANEL.min(n - p * PANEL) {
                    let row = &w[(p * PANEL + c) * k..][..k];
                    let (low, high) = bits.levels();
                    for (g, values) in row.chunks(group).enumerate() {
                        let scale = bits.scale(values);
                        let inverse = inverse(scale);
                        let mut sum = 0i32;
                        for (i, &v) in values.iter().enumerate() {
                            // |v * inverse| is at most 128, inside `round_even`'s range.
                            let q = round_even(v * inverse).clamp(low, high) as i32;
                            sum += q;
                            let t = g * group + i;
                            let (quad, e) = (t / 4, t % 4);
                            match bits {
                                Bits::Int8 => data[quad * 4 * PANEL + 4 * c + e] = q as i8 as u8,
                                Bits::Int4 => {
                                    let nibble = (q + 8) as u8;
                                    let byte = &mut data[quad * 2 * PANEL + 4 * (c % 16) + e];
                                    *byte = if c < 16 {
                                        (*byte & 0xF0) | nibble
                                    } else {
                                        (*byte & 0x0F) | nibble << 4
                                    };
                                }
                            }
                        }
                        scales[g * PANEL + c] = scale;
                        offsets[c] += 128.0 * scale * sum as f32;
                    }
                }
            });
        Self {
            bits,
            n,
            k,
            group,
            k_padded,
            data,
            scales,
            offsets,
        }
    }

    /// `(n, k)`: output and input features.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Row `c` of `w` as the kernel sees it (each quantized value times its scale), into `out` (`k`
    /// values): the token embedding's lookup, where the embedding is the LM head's weight.
    ///
    /// # Panics
    /// If `c` is not a row of `w` or `out` does not hold `k` values.
    pub fn row(&self, c: usize, out: &mut [f32]) {
        assert!(c < self.n && out.len() == self.k);
        let (p, lane) = (c / PANEL, c % PANEL);
        let groups = self.k_padded / self.group;
        let panel = &self.data[p * (self.k_padded / 4 * self.bits.quad_bytes())..];
        let scales = &self.scales[p * groups * PANEL..];
        for (t, out) in out.iter_mut().enumerate() {
            let (quad, e) = (t / 4, t % 4);
            let q = match self.bits {
                Bits::Int8 => f32::from(panel[quad * 4 * PANEL + 4 * lane + e] as i8),
                Bits::Int4 => {
                    let byte = panel[quad * 2 * PANEL + 4 * (lane % 16) + e];
                    let nibble = if lane < 16 { byte & 0x0F } else { byte >> 4 };
                    f32::from(nibble) - 8.0
                }
            };
            *out = q * scales[t / self.group * PANEL + lane];
        }
    }
}

/// `v` rounded to the nearest integer, ties to even (as the activations are rounded), for `|v|` up to 2^22
/// in the default floating-point rounding mode: adding and taking off 1.5 x 2^23 leaves no fraction bits,
/// and the float addition rounds to even. (`f32::round_ties_even` is a library call on baseline x86-64.)
fn round_even(v: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0;
    (v + SHIFT) - SHIFT
}

/// What the kernel reads and writes as activations: f32 or bf16 rows.
pub trait Activation: Element {
    /// Stores `cols` (at most 32) values, the first 16 from `lo` and the rest from `hi`.
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL; `dst` has room for `cols` values. Called only from a function compiled
    /// with those features.
    #[cfg(target_arch = "x86_64")]
    unsafe fn store(
        dst: *mut Self,
        lo: std::arch::x86_64::__m512,
        hi: std::arch::x86_64::__m512,
        cols: usize,
    );

    /// Loads 8 values from `src` as f32.
    ///
    /// # Safety
    /// As [`Activation::store8`], with `src` holding 8 values.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(src: *const Self) -> std::arch::x86_64::__m256;

    /// Stores the 8 values of `v`, rounded as [`Activation::store`] rounds them.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `dst` has room for 8 values. Called only from a function compiled with
    /// those features.
    #[cfg(target_arch = "x86_64")]
    unsafe fn store8(dst: *mut Self, v: std::arch::x86_64::__m256);
}

/// The mask of the first `cols` (clamped to 0..=16) lanes.
#[cfg(target_arch = "x86_64")]
#[inline]
fn lanes(cols: usize) -> u16 {
    ((1u32 << cols.min(16)) - 1) as u16
}

impl Activation for f32 {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn store(
        dst: *mut f32,
        lo: std::arch::x86_64::__m512,
        hi: std::arch::x86_64::__m512,
        cols: usize,
    ) {
        use std::arch::x86_64::_mm512_mask_storeu_ps;
        _mm512_mask_storeu_ps(dst, lanes(cols), lo);
        _mm512_mask_storeu_ps(dst.add(16), lanes(cols.saturating_sub(16)), hi);
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(src: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(src)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn store8(dst: *mut f32, v: std::arch::x86_64::__m256) {
        std::arch::x86_64::_mm256_storeu_ps(dst, v)
    }
}

impl Activation for bf16 {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn store(
        dst: *mut bf16,
        lo: std::arch::x86_64::__m512,
        hi: std::arch::x86_64::__m512,
        cols: usize,
    ) {
        use std::arch::x86_64::_mm256_mask_storeu_epi16;
        let dst = dst.cast::<i16>();
        _mm256_mask_storeu_epi16(dst, lanes(cols), to_bf16(lo));
        _mm256_mask_storeu_epi16(dst.add(16), lanes(cols.saturating_sub(16)), to_bf16(hi));
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(src: *const bf16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let halves = _mm_loadu_si128(src.cast());
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16))
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn store8(dst: *mut bf16, v: std::arch::x86_64::__m256) {
        std::arch::x86_64::_mm_storeu_si128(dst.cast(), to_bf16_avx2(v))
    }
}

/// The first `count` values of `src` (all 8 from 8 on) as f32, zeros in the other lanes.
///
/// # Safety
/// As [`Activation::load8`], with `src` holding `count.min(8)` values.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn load_first<A: Activation>(src: *const A, count: usize) -> std::arch::x86_64::__m256 {
    if count >= 8 {
        return A::load8(src);
    }
    // SAFETY: all-zero bits are 0.0 in f32 and bf16.
    let mut values: [A; 8] = std::mem::zeroed();
    std::ptr::copy_nonoverlapping(src, values.as_mut_ptr(), count);
    A::load8(values.as_ptr())
}

/// Stores the first `count` lanes of `v` (all 8 from 8 on).
///
/// # Safety
/// As [`Activation::store8`], with room for `count.min(8)` values at `dst`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn store_first<A: Activation>(dst: *mut A, v: std::arch::x86_64::__m256, count: usize) {
    if count >= 8 {
        return A::store8(dst, v);
    }
    // SAFETY: all-zero bits are 0.0 in f32 and bf16.
    let mut values: [A; 8] = std::mem::zeroed();
    A::store8(values.as_mut_ptr(), v);
    std::ptr::copy_nonoverlapping(values.as_ptr(), dst, count);
}

/// 16 f32 rounded to bf16 (to nearest even; a NaN stays a NaN, made quiet), as `vcvtneps2bf16` does but
/// with AVX-512 F/BW alone, so that CPUs with VNNI and without AVX512-BF16 run the kernel too.
///
/// # Safety
/// As [`Activation::store`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn to_bf16(v: std::arch::x86_64::__m512) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let bits = _mm512_castps_si512(v);
    let odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    let rounded = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
    let quiet = _mm512_or_si512(bits, _mm512_set1_epi32(0x0040_0000));
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
    _mm512_cvtepi32_epi16(_mm512_srli_epi32(
        _mm512_mask_blend_epi32(nan, rounded, quiet),
        16,
    ))
}

/// [`to_bf16`] for 8 f32, with AVX2: the same bits.
///
/// # Safety
/// As [`Activation::store8`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn to_bf16_avx2(v: std::arch::x86_64::__m256) -> std::arch::x86_64::__m128i {
    use std::arch::x86_64::*;
    let bits = _mm256_castps_si256(v);
    let odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    let rounded = _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd));
    let quiet = _mm256_or_si256(bits, _mm256_set1_epi32(0x0040_0000));
    let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
    narrow_avx2(_mm256_srli_epi32(
        _mm256_blendv_epi8(rounded, quiet, nan),
        16,
    ))
}

/// 8 int32 lanes from 0 to `u16::MAX`, as 16-bit lanes in the same order.
///
/// # Safety
/// As [`Activation::store8`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn narrow_avx2(v: std::arch::x86_64::__m256i) -> std::arch::x86_64::__m128i {
    use std::arch::x86_64::*;
    _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v))
}

/// Rows of `x` quantized for a kernel: `k_padded` values a row (each value's level as the kernel reads it,
/// by `quantize_row`; the padding `zero`, the zero level), and each row's scale.
///
/// # Safety
/// `quantize_row(row, q)` writes the `row.len()` values from `q` whenever the scale it returns is not NaN
/// (the contract of every kernel's quantizer): the buffer is returned initialised on that promise.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
unsafe fn quantize_rows<A: Activation, Q: Copy + Send + Sync>(
    x: &[A],
    (k, k_padded): (usize, usize),
    zero: Q,
    quantize_row: impl Fn(&[A], *mut Q) -> f32 + Sync,
) -> (Vec<Q>, Vec<f32>) {
    use rayon::prelude::*;
    let m = x.len() / k;
    // Left uninitialised until the rows below write every value: filling it first would be one more pass
    // over a buffer of many megabytes, on one thread.
    let mut q = Vec::with_capacity(m * k_padded);
    let mut scales = vec![0f32; m];
    let rows = q.spare_capacity_mut()[..m * k_padded]
        .par_chunks_mut(k_padded)
        .zip(scales.par_iter_mut())
        .zip(x.par_chunks(k));
    // A decode step's few rows are not worth the threads.
    rows.with_min_len(16).for_each(|((q, scale), row)| {
        *scale = quantize_row(row, q.as_mut_ptr().cast());
        // A row with a NaN scale was left unwritten: all of it is initialised here (to the zero level; its
        // outputs are NaN whatever it holds).
        let written = if scale.is_nan() { 0 } else { k };
        for level in &mut q[written..] {
            level.write(zero);
        }
    });
    // SAFETY: each row's first k values were written by `quantize_row` (the caller's promise) or above, the
    // rest above.
    q.set_len(m * k_padded);
    (q, scales)
}

/// Quantizes `row` into the `row.len()` bytes from `q`, rounding to nearest even, and returns its scale. A
/// row holding a NaN or an infinity gets a NaN scale, so that its outputs are NaN rather than a finite value
/// computed from the other inputs, and leaves `q` unwritten; any other row writes every byte.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL; `q` is valid for `row.len()` bytes of writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn quantize_row<A: Activation>(row: &[A], q: *mut u8) -> f32 {
    use std::arch::x86_64::*;
    let k = row.len();
    let lanes = |at: usize| -> __mmask16 { lanes(k - at) };
    // Pass 1: the largest magnitude, and whether any value is not finite (x * 0 is NaN exactly then).
    let (mut max, mut probe) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    for at in (0..k).step_by(16) {
        let v = _mm512_abs_ps(A::load16(row.as_ptr().add(at), lanes(at)));
        max = _mm512_max_ps(max, v);
        probe = _mm512_add_ps(probe, _mm512_mul_ps(v, _mm512_setzero_ps()));
    }
    let max = _mm512_reduce_max_ps(max);
    if _mm512_reduce_add_ps(probe).is_nan() {
        return f32::NAN;
    }
    let scale = max / 127.0;
    let inverse = _mm512_set1_ps(inverse(scale));
    // Pass 2: round to nearest even, clamp, offset, narrow.
    let (low, high, offset) = (
        _mm512_set1_epi32(-127),
        _mm512_set1_epi32(127),
        _mm512_set1_epi32(128),
    );
    for at in (0..k).step_by(16) {
        let v = _mm512_mul_ps(A::load16(row.as_ptr().add(at), lanes(at)), inverse);
        let v = _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
        let v = _mm512_max_epi32(_mm512_min_epi32(v, high), low);
        let bytes = _mm512_cvtepi32_epi8(_mm512_add_epi32(v, offset));
        _mm_mask_storeu_epi8(q.add(at).cast(), lanes(at), bytes);
    }
    scale
}

/// An activation's level + 128 as an AVX2 kernel reads it: a byte (int4, `vpmaddubsw`) or 16 bits (int8,
/// `vpmaddwd`).
#[cfg(target_arch = "x86_64")]
trait Level: Copy + Send + Sync + From<u8> {
    /// Stores the 8 int32 lanes of `v`, each from 0 to 255.
    ///
    /// # Safety
    /// As [`Activation::store8`].
    unsafe fn store8(dst: *mut Self, v: std::arch::x86_64::__m256i);
}

#[cfg(target_arch = "x86_64")]
impl Level for u8 {
    #[inline(always)]
    unsafe fn store8(dst: *mut u8, v: std::arch::x86_64::__m256i) {
        use std::arch::x86_64::*;
        let words = narrow_avx2(v);
        _mm_storel_epi64(dst.cast(), _mm_packus_epi16(words, words));
    }
}

#[cfg(target_arch = "x86_64")]
impl Level for u16 {
    #[inline(always)]
    unsafe fn store8(dst: *mut u16, v: std::arch::x86_64::__m256i) {
        std::arch::x86_64::_mm_storeu_si128(dst.cast(), narrow_avx2(v));
    }
}

/// [`quantize_row`] with AVX2, into `L` values: the same levels and scale (the same largest magnitude,
/// product and rounding), and the same writes (every value, none for a row with a NaN scale).
///
/// # Safety
/// The CPU has AVX2 and FMA; `q` is valid for `row.len()` values of writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_row_avx2<A: Activation, L: Level>(row: &[A], q: *mut L) -> f32 {
    use std::arch::x86_64::*;
    let k = row.len();
    let load = |at: usize| load_first(row.as_ptr().add(at), k - at);
    // Pass 1, as `quantize_row`'s.
    let magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    let (mut max, mut probe) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for at in (0..k).step_by(8) {
        let v = _mm256_and_ps(load(at), magnitude);
        max = _mm256_max_ps(max, v);
        probe = _mm256_add_ps(probe, _mm256_mul_ps(v, _mm256_setzero_ps()));
    }
    let [max, probe] = [max, probe].map(|v| std::mem::transmute::<__m256, [f32; 8]>(v));
    if probe.iter().any(|v| v.is_nan()) {
        return f32::NAN;
    }
    let scale = max.into_iter().fold(0.0, f32::max) / 127.0;
    let inverse = _mm256_set1_ps(inverse(scale));
    // Pass 2: round to nearest even (the rounding mode Rust code runs in), clamp, offset, narrow.
    let (low, high, offset) = (
        _mm256_set1_epi32(-127),
        _mm256_set1_epi32(127),
        _mm256_set1_epi32(128),
    );
    for at in (0..k).step_by(8) {
        let v = _mm256_cvtps_epi32(_mm256_mul_ps(load(at), inverse));
        let v = _mm256_add_epi32(_mm256_max_epi32(_mm256_min_epi32(v, high), low), offset);
        if k - at >= 8 {
            L::store8(q.add(at), v);
        } else {
            let mut levels = [L::from(0); 8];
            L::store8(levels.as_mut_ptr(), v);
            std::ptr::copy_nonoverlapping(levels.as_ptr(), q.add(at), k - at);
        }
    }
    scale
}

/// Rows in a register tile: 2 x 12 int32 sums, two weight vectors, the broadcast and (for int4) the two
/// nibble constants stay in registers; the f32 totals, touched once per group, may not.
#[cfg(target_arch = "x86_64")]
const TILE_ROWS: usize = 12;
#[cfg(target_arch = "x86_64")]
const _: () = assert!(TILE_ROWS <= super::panels::MAX_TILE_ROWS);

/// Rows in the AVX2 int8 kernel's register tile.
#[cfg(target_arch = "x86_64")]
const AVX2_INT8_ROWS: usize = 4;

/// Columns in the AVX2 int8 kernel's register tile of `rows` rows: 8 vectors of int32 sums (four columns
/// each) in all, which with the broadcast quads, a weight vector and a product fit in the 16 registers. A
/// decode step's single row takes the whole panel in one pass.
#[cfg(target_arch = "x86_64")]
const fn avx2_int8_cols(rows: usize) -> usize {
    match rows {
        1 => 32,
        2 => 16,
        _ => 8,
    }
}

/// Rows in the AVX2 int4 kernel's register tile, of 16 columns (8 from each half of the panel, which share
/// their bytes): the int16 sums (3 x 2), a broadcast quad, the two weight vectors and the two nibble
/// constants stay in registers; the f32 totals, touched once per group, may not.
#[cfg(target_arch = "x86_64")]
const AVX2_INT4_ROWS: usize = 3;
#[cfg(target_arch = "x86_64")]
const _: () = {
    assert!(AVX2_INT8_ROWS <= super::panels::MAX_TILE_ROWS);
    assert!(AVX2_INT4_ROWS <= super::panels::MAX_TILE_ROWS);
    // Int8 tiles of whole vectors of 8 columns, in whole panels, with at most 8 vectors of sums.
    let mut rows = 1;
    while rows <= AVX2_INT8_ROWS {
        let cols = avx2_int8_cols(rows);
        assert!(cols.is_multiple_of(8) && PANEL.is_multiple_of(cols) && rows * cols / 4 <= 8);
        rows += 1;
    }
    // The int4 kernel's int16 sums of a group: each lane two products a quad, of a level + 128 (at most
    // 255) and a weight level (at most 8 in magnitude).
    assert!(INT4_GROUP / 4 * 2 * 255 * 8 <= i16::MAX as usize);
};

/// The fewest rows that go to the tile unit (int8 only): `vpdpbusd` does four byte products per lane, so
/// this module's vector kernel keeps up with the tile unit until its register block is most of the way full.
#[cfg(target_arch = "x86_64")]
const TILE_UNIT_MIN_ROWS: usize = 24;

/// `epilogue(x[m, k] @ wᵀ + bias[n])`, row-major `[m, n]` in the activations' type; `m` at least 1.
///
/// # Panics
/// If [`available`] is false, or the slices do not hold the shapes given.
pub fn linear<A: Activation>(
    x: &[A],
    m: usize,
    w: &Packed,
    bias: &[f32],
    epilogue: Epilogue,
) -> Vec<A> {
    let kernel = Kernel::detected().expect("quantized_gemm::linear needs a kernel for this CPU");
    linear_on(kernel, x, m, w, bias, epilogue)
}

/// [`linear`] by the kernel family `kernel`.
///
/// # Panics
/// If the CPU tier does not run `kernel`, or the slices do not hold the shapes given.
// Where no kernel runs, the function only panics and its kernel arguments go unread.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(unused_variables)
)]
fn linear_on<A: Activation>(
    kernel: Kernel,
    x: &[A],
    m: usize,
    w: &Packed,
    bias: &[f32],
    epilogue: Epilogue,
) -> Vec<A> {
    assert!(kernel.runs(), "the {kernel:?} kernel does not run here");
    assert!(m > 0 && x.len() == m * w.k && bias.len() == w.n);
    let mut out = Vec::with_capacity(m * w.n);
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    {
        // SAFETY: `out` has room for m x n values and lives past the kernel, whose tasks write disjoint
        // outputs.
        let dst = unsafe { TaskPtr::new(out.spare_capacity_mut().as_mut_ptr().cast::<A>()) };
        match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni => {
                let shape = (w.k, w.k_padded);
                // SAFETY: the CPU has AVX-512 F/BW/VL (`kernel.runs()`); `quantize_rows` gives each row
                // `k_padded` bytes, and `quantize_row` keeps its promise.
                let quantize = |row: &[A], q: *mut u8| unsafe { quantize_row(row, q) };
                let (qx, sx) = unsafe { quantize_rows(x, shape, 128, quantize) };
                // int8 on the tile unit where it runs and there are rows enough for it, in register blocks
                // of 32.
                let tiled = w.bits == Bits::Int8
                    && w.k_padded.is_multiple_of(amx::INT8_K_STEP)
                    && m >= TILE_UNIT_MIN_ROWS
                    && amx::int8_available();
                let block_unit = if tiled { amx::BLOCK_ROWS } else { TILE_ROWS };
                let quantized = (&qx[..], &sx[..]);
                for_each_tile(
                    w,
                    quantized,
                    bias,
                    block_unit,
                    (dst, epilogue),
                    |tile, rows| {
                        let on_tiles = if tiled { rows.end } else { rows.start };
                        #[cfg(target_os = "linux")]
                        for (blocks, size) in amx::register_blocks(rows.start..on_tiles) {
                            // SAFETY: `int8_available` checked the CPU and the permission; the tiles stay
                            // configured for blocks of `size` rows until `_tiles` drops; each block reads its
                            // rows of `qx` and `k_padded / 4` panel rows, and writes rows of the output only
                            // this task writes.
                            unsafe {
                                let _tiles = amx::Tiles::configure(size);
                                let mut sums = [0i32; amx::BLOCK_ROWS * PANEL];
                                for first in blocks.step_by(amx::BLOCK_ROWS) {
                                    let a = qx[first * w.k_padded..].as_ptr();
                                    amx::block_int8(
                                        a,
                                        (w.k_padded, size),
                                        tile.panel.as_ptr(),
                                        &mut sums,
                                    );
                                    tile.finish_block((first, size), &sums, tile.out(dst, first));
                                }
                            }
                        }
                        for (r, size) in tiles(on_tiles..rows.end, TILE_ROWS) {
                            // SAFETY: the CPU has AVX-512 F/BW/VL and VNNI (`kernel.runs()`); rows
                            // r..r + size exist, and their outputs in this panel only this call writes.
                            unsafe {
                                match w.bits {
                                    Bits::Int8 => tile.run::<false, A>(r, size, tile.out(dst, r)),
                                    Bits::Int4 => tile.run::<true, A>(r, size, tile.out(dst, r)),
                                }
                            }
                        }
                    },
                );
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => match w.bits {
                // SAFETY (both): the CPU has AVX2 and FMA (`kernel.runs()`); each tile's rows exist, and
                // their outputs in its panel only that call writes.
                Bits::Int8 => avx2_tiles::<u16, A>(
                    x,
                    w,
                    bias,
                    (dst, epilogue),
                    AVX2_INT8_ROWS,
                    |t, r, n, d| unsafe { t.run_int8_avx2(r, n, d) },
                ),
                Bits::Int4 => avx2_tiles::<u8, A>(
                    x,
                    w,
                    bias,
                    (dst, epilogue),
                    AVX2_INT4_ROWS,
                    |t, r, n, d| unsafe { t.run_int4_avx2(r, n, d) },
                ),
            },
            #[cfg(target_arch = "aarch64")]
            Kernel::I8mm => neon::linear::<neon::Usmmla, A>(x, w, bias, (dst, epilogue)),
            #[cfg(target_arch = "aarch64")]
            Kernel::Dotprod => neon::linear::<neon::Sdot, A>(x, w, bias, (dst, epilogue)),
        }
    }
    // SAFETY: the kernel writes each of the m x n outputs.
    unsafe { out.set_len(m * w.n) };
    out
}

/// The AVX2 kernel with activations quantized to levels of `L` (u16 for int8's 16-bit products, u8 for int4's
/// byte products): `run(tile, first row, rows, outputs)` for every register tile of up to `tile_rows` rows.
#[cfg(target_arch = "x86_64")]
fn avx2_tiles<L: Level, A: Activation>(
    x: &[A],
    w: &Packed,
    bias: &[f32],
    out: (TaskPtr<A>, Epilogue),
    tile_rows: usize,
    run: impl Fn(&Tile<L>, usize, usize, *mut A) + Sync,
) {
    // SAFETY: the caller checked AVX2 and FMA; `quantize_rows` gives each row `k_padded` values, and
    // `quantize_row_avx2` keeps its promise.
    let quantize = |row: &[A], q: *mut L| unsafe { quantize_row_avx2(row, q) };
    let (qx, sx) = unsafe { quantize_rows(x, (w.k, w.k_padded), L::from(128), quantize) };
    for_each_tile(w, (&qx[..], &sx[..]), bias, tile_rows, out, |tile, rows| {
        for (r, size) in tiles(rows, tile_rows) {
            run(tile, r, size, tile.out(out.0, r));
        }
    });
}

/// Calls `body(tile, rows)` for every block of `rows` (in whole register tiles of `tile_rows`) and panel of
/// `w`, in parallel ([`for_each_block`]), then applies `epilogue` to the block's outputs in that panel, which
/// `body` writes (through `dst`, the `[m, n]` output) and no other call touches. `qx` and `sx` are the
/// quantized rows of `x` ([`quantize_rows`]) and `bias` has `n` values.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn for_each_tile<Q: Sync, A: Element>(
    w: &Packed,
    (qx, sx): (&[Q], &[f32]),
    bias: &[f32],
    tile_rows: usize,
    (dst, epilogue): (TaskPtr<A>, Epilogue),
    body: impl Fn(&Tile<Q>, Range<usize>) + Sync,
) {
    let (m, panels) = (sx.len(), w.n.div_ceil(PANEL));
    let mut bias = bias.to_vec();
    bias.resize(panels * PANEL, 0.0);
    let (groups, panel_bytes) = (w.k_padded / w.group, w.k_padded / 4 * w.bits.quad_bytes());
    let row_bytes = w.k_padded * std::mem::size_of::<Q>();
    for_each_block(m, panels, row_bytes, tile_rows, |rows, p| {
        let tile = Tile {
            qx,
            sx,
            k_padded: w.k_padded,
            panel: &w.data[p * panel_bytes..][..panel_bytes],
            scales: &w.scales[p * groups * PANEL..][..groups * PANEL],
            offsets: &w.offsets[p * PANEL..][..PANEL],
            bias: &bias[p * PANEL..][..PANEL],
            groups,
            group_quads: w.group / 4,
            n: w.n,
            col: p * PANEL,
            cols: PANEL.min(w.n - p * PANEL),
        };
        body(&tile, rows.clone());
        // SAFETY: the outputs `body` just wrote, which only this task touches.
        unsafe { epilogue.apply(dst, rows, (tile.col, tile.cols, w.n)) };
    });
}

/// One panel of packed weights, the quantized rows of `x` (`Q`: bytes for `vpdpbusd`, 16-bit values for
/// the AVX2 kernel, signed bytes for `sdot`, offset bytes for `usmmla`), and where the outputs go.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
struct Tile<'a, Q> {
    qx: &'a [Q],
    sx: &'a [f32],
    k_padded: usize,
    panel: &'a [u8],
    scales: &'a [f32],
    offsets: &'a [f32],
    bias: &'a [f32],
    groups: usize,
    group_quads: usize,
    /// Row stride of the output.
    n: usize,
    /// The panel's first column.
    col: usize,
    /// Valid columns in this panel (the last one may be partial).
    cols: usize,
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
impl<Q> Tile<'_, Q> {
    /// Where output row `row`'s values of this panel go in the `[m, n]` output `dst`.
    fn out<A>(&self, dst: TaskPtr<A>, row: usize) -> *mut A {
        dst.at(row * self.n + self.col)
    }
}

#[cfg(target_arch = "x86_64")]
impl Tile<'_, u8> {
    /// Rows `first..first + rows` (`rows` from 1 to [`TILE_ROWS`]) against the panel.
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL and VNNI; `dst` addresses `rows` output rows of `self.n` values from this
    /// panel's first column.
    unsafe fn run<const INT4: bool, A: Activation>(&self, first: usize, rows: usize, dst: *mut A) {
        by_rows!(rows.min(TILE_ROWS), |R| self.tile::<R, INT4, A>(first, dst))
    }

    /// [`Self::run`] for `R` rows.
    ///
    /// # Safety
    /// As [`Self::run`], with `rows` = `R`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn tile<const R: usize, const INT4: bool, A: Activation>(
        &self,
        first: usize,
        dst: *mut A,
    ) {
        use std::arch::x86_64::*;
        let rows: [*const u8; R] =
            std::array::from_fn(|r| self.qx.as_ptr().add((first + r) * self.k_padded));
        let panel = self.panel.as_ptr();
        let (nibble, eight) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(8));
        // Group g's scaled sums added to `totals`. The first group starts from zeros passed by value rather
        // than from a zeroed array kept across the loop, which the compiler cleared with a call to `memset` on
        // every tile (12 rows of totals do not fit the registers; docs/performance.md).
        let group = |g: usize, mut totals: [[__m512; 2]; R]| {
            let mut sums = [[_mm512_setzero_si512(); 2]; R];
            for j in g * self.group_quads..(g + 1) * self.group_quads {
                let (w_lo, w_hi) = if INT4 {
                    let bytes = _mm512_loadu_si512(panel.add(j * 2 * PANEL).cast());
                    let low = _mm512_and_si512(bytes, nibble);
                    let high = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), nibble);
                    (_mm512_sub_epi8(low, eight), _mm512_sub_epi8(high, eight))
                } else {
                    let at = panel.add(j * 4 * PANEL);
                    (
                        _mm512_loadu_si512(at.cast()),
                        _mm512_loadu_si512(at.add(64).cast()),
                    )
                };
                for r in 0..R {
                    let quad = _mm512_set1_epi32(rows[r].add(4 * j).cast::<i32>().read_unaligned());
                    sums[r][0] = _mm512_dpbusd_epi32(sums[r][0], quad, w_lo);
                    sums[r][1] = _mm512_dpbusd_epi32(sums[r][1], quad, w_hi);
                }
            }
            let scales = self.scales.as_ptr().add(g * PANEL);
            let scale = [_mm512_loadu_ps(scales), _mm512_loadu_ps(scales.add(16))];
            for r in 0..R {
                for h in 0..2 {
                    totals[r][h] =
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[r][h]), scale[h], totals[r][h]);
                }
            }
            totals
        };
        let mut totals = group(0, [[_mm512_setzero_ps(); 2]; R]);
        for g in 1..self.groups {
            totals = group(g, totals);
        }
        for (r, &totals) in totals.iter().enumerate() {
            self.store_row(first + r, totals, dst.add(r * self.n));
        }
    }

    /// Output row `row` from its scaled sums (`Σ_g s_w[g][c] * Σ_t ...` for the panel's two halves of 16
    /// columns): the activations' offset taken off, times the row's scale, plus the bias.
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL; `row` is a row of `self.qx`; `dst` has room for the panel's `self.cols`
    /// values of that output row.
    // Compiled with the features itself: the closure below takes the target features of the function it is
    // written in, and without them its intrinsics stayed out-of-line calls even where this function was
    // inlined into a kernel that has them (docs/performance.md, Zen 4).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn store_row<A: Activation>(
        &self,
        row: usize,
        totals: [std::arch::x86_64::__m512; 2],
        dst: *mut A,
    ) {
        use std::arch::x86_64::*;
        let scale = _mm512_set1_ps(self.sx[row]);
        let [lo, hi] = [0, 1].map(|h| {
            let offsets = _mm512_loadu_ps(self.offsets.as_ptr().add(16 * h));
            let bias = _mm512_loadu_ps(self.bias.as_ptr().add(16 * h));
            _mm512_fmadd_ps(_mm512_sub_ps(totals[h], offsets), scale, bias)
        });
        A::store(dst, lo, hi, self.cols);
    }

    /// Output rows `first..first + rows` from the int8 sums of the tile unit ([`amx::block_int8`], rows of
    /// 32): the same arithmetic as [`Self::tile`]'s single group of int8, so the same outputs.
    ///
    /// # Safety
    /// As [`Self::run`] for `rows` rows; the CPU has AVX-512 F/BW/VL.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn finish_block<A: Activation>(
        &self,
        (first, rows): (usize, usize),
        sums: &[i32; amx::BLOCK_ROWS * PANEL],
        dst: *mut A,
    ) {
        use std::arch::x86_64::*;
        let scale = [
            _mm512_loadu_ps(self.scales.as_ptr()),
            _mm512_loadu_ps(self.scales.as_ptr().add(16)),
        ];
        for r in 0..rows {
            let totals = [0, 1].map(|h| {
                let sums = _mm512_loadu_si512(sums.as_ptr().add(r * PANEL + 16 * h).cast());
                _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale[h], _mm512_setzero_ps())
            });
            self.store_row(first + r, totals, dst.add(r * self.n));
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl Tile<'_, u16> {
    /// Rows `first..first + rows` (`rows` from 1 to [`AVX2_INT8_ROWS`]) against the panel of int8 weights,
    /// [`avx2_int8_cols`] columns at a time up to the last valid one.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `dst` addresses `rows` output rows of `self.n` values from this panel's
    /// first column.
    unsafe fn run_int8_avx2<A: Activation>(&self, first: usize, rows: usize, dst: *mut A) {
        by_rows!(rows.min(AVX2_INT8_ROWS), |R| {
            for col in (0..self.cols).step_by(avx2_int8_cols(R)) {
                self.int8_avx2::<R, A>(first, col, dst);
            }
        })
    }

    /// [`Self::run_int8_avx2`] for `R` rows and the tile's columns from `col`.
    ///
    /// # Safety
    /// As [`Self::run_int8_avx2`], with `rows` = `R`; `col` is a multiple of the tile's columns below
    /// [`PANEL`].
    #[target_feature(enable = "avx2,fma")]
    unsafe fn int8_avx2<const R: usize, A: Activation>(
        &self,
        first: usize,
        col: usize,
        dst: *mut A,
    ) {
        use std::arch::x86_64::*;
        // The arrays are sized for the widest tile; the loops, whose bounds are constants, touch the first
        // `vectors` of each.
        let vectors = avx2_int8_cols(R) / 4;
        let rows: [*const u16; R] =
            std::array::from_fn(|r| self.qx.as_ptr().add((first + r) * self.k_padded));
        // Quad j's 16 bytes from `quads.add(j * 4 * PANEL + 16 * v)`: columns `col + 4v..col + 4v + 4`.
        let quads = self.panel.as_ptr().add(4 * col);
        let mut totals = [[_mm256_setzero_ps(); PANEL / 8]; R];
        for g in 0..self.groups {
            // Lanes 2c and 2c + 1 of `sums[r][v]`: the two halves of column `col + 4v + c`'s sum.
            let mut sums = [[_mm256_setzero_si256(); PANEL / 4]; R];
            for j in g * self.group_quads..(g + 1) * self.group_quads {
                let x: [__m256i; R] = std::array::from_fn(|r| {
                    _mm256_set1_epi64x(rows[r].add(4 * j).cast::<i64>().read_unaligned())
                });
                for v in 0..vectors {
                    let w = _mm256_cvtepi8_epi16(_mm_loadu_si128(
                        quads.add(j * 4 * PANEL + 16 * v).cast(),
                    ));
                    for (sums, &x) in sums.iter_mut().zip(&x) {
                        sums[v] = _mm256_add_epi32(sums[v], _mm256_madd_epi16(x, w));
                    }
                }
            }
            let scales = self.scales.as_ptr().add(g * PANEL + col);
            for r in 0..R {
                for (h, totals) in totals[r][..vectors / 2].iter_mut().enumerate() {
                    // The lane pairs summed: columns 0, 1, 4, 5 | 2, 3, 6, 7 of these 8, which the
                    // permute of 64-bit lanes puts in order.
                    let pairs = _mm256_hadd_epi32(sums[r][2 * h], sums[r][2 * h + 1]);
                    let columns = _mm256_permute4x64_epi64(pairs, 0xD8);
                    let scale = _mm256_loadu_ps(scales.add(8 * h));
                    *totals = _mm256_fmadd_ps(_mm256_cvtepi32_ps(columns), scale, *totals);
                }
            }
        }
        for (r, totals) in totals.iter().enumerate() {
            for (h, &totals) in totals[..vectors / 2].iter().enumerate() {
                self.store_avx2(first + r, col + 8 * h, totals, dst.add(r * self.n));
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl Tile<'_, u8> {
    /// Rows `first..first + rows` (`rows` from 1 to [`AVX2_INT4_ROWS`]) against the panel of int4 weights,
    /// in two tiles: columns 0..8 and 16..24, then 8..16 and 24..32 (where the panel has any of them).
    ///
    /// # Safety
    /// As [`Self::run_int8_avx2`].
    unsafe fn run_int4_avx2<A: Activation>(&self, first: usize, rows: usize, dst: *mut A) {
        for col in (0..self.cols.min(16)).step_by(8) {
            by_rows!(rows.min(AVX2_INT4_ROWS), |R| self
                .int4_avx2::<R, A>(first, col, dst))
        }
    }

    /// [`Self::run_int4_avx2`] for `R` rows and the columns `col..col + 8` and `col + 16..col + 24`:
    /// `vpmaddubsw` of the activations' bytes and the weight levels, whose int16 pairs of products are
    /// exact, summed in int16 over a group ([`INT4_GROUP`] bounds them) and then in int32 by `vpmaddwd`.
    ///
    /// # Safety
    /// As [`Self::run_int4_avx2`], with `rows` = `R`; `col` is 0 or 8.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn int4_avx2<const R: usize, A: Activation>(
        &self,
        first: usize,
        col: usize,
        dst: *mut A,
    ) {
        use std::arch::x86_64::*;
        let rows: [*const u8; R] =
            std::array::from_fn(|r| self.qx.as_ptr().add((first + r) * self.k_padded));
        // Quad j's 32 bytes from `quads.add(j * 2 * PANEL)`: columns `col..col + 8` in their low nibbles,
        // `col + 16..col + 24` in their high ones.
        let quads = self.panel.as_ptr().add(4 * col);
        let (nibble, eight) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(8));
        let mut totals = [[_mm256_setzero_ps(); 2]; R];
        for g in 0..self.groups {
            // int16 lanes 2c and 2c + 1 of `sums[r][h]`: the two halves of column `col + 16h + c`'s sum.
            let mut sums = [[_mm256_setzero_si256(); 2]; R];
            for j in g * self.group_quads..(g + 1) * self.group_quads {
                let bytes = _mm256_loadu_si256(quads.add(j * 2 * PANEL).cast());
                let w = [
                    _mm256_and_si256(bytes, nibble),
                    _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble),
                ]
                .map(|levels| _mm256_sub_epi8(levels, eight));
                for r in 0..R {
                    let x = _mm256_set1_epi32(rows[r].add(4 * j).cast::<i32>().read_unaligned());
                    for h in 0..2 {
                        sums[r][h] = _mm256_add_epi16(sums[r][h], _mm256_maddubs_epi16(x, w[h]));
                    }
                }
            }
            let scales = self.scales.as_ptr().add(g * PANEL + col);
            for r in 0..R {
                for h in 0..2 {
                    let columns = _mm256_madd_epi16(sums[r][h], _mm256_set1_epi16(1));
                    let scale = _mm256_loadu_ps(scales.add(16 * h));
                    totals[r][h] =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(columns), scale, totals[r][h]);
                }
            }
        }
        for (r, totals) in totals.iter().enumerate() {
            for (h, &totals) in totals.iter().enumerate() {
                self.store_avx2(first + r, col + 16 * h, totals, dst.add(r * self.n));
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl<Q> Tile<'_, Q> {
    /// Output row `row`'s valid values of the 8 columns from `col`, from their scaled sums: as
    /// [`Tile::store_row`], with AVX2.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `row` is a row of `self.qx`; `dst` addresses that output row from the panel's
    /// first column.
    // Compiled with the features itself, as `store_row` is, so that its intrinsics inline whatever it is
    // rewritten into.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn store_avx2<A: Activation>(
        &self,
        row: usize,
        col: usize,
        totals: std::arch::x86_64::__m256,
        dst: *mut A,
    ) {
        use std::arch::x86_64::*;
        if col < self.cols {
            let scale = _mm256_set1_ps(self.sx[row]);
            let offsets = _mm256_loadu_ps(self.offsets.as_ptr().add(col));
            let bias = _mm256_loadu_ps(self.bias.as_ptr().add(col));
            let out = _mm256_fmadd_ps(_mm256_sub_ps(totals, offsets), scale, bias);
            store_first(dst.add(col), out, self.cols - col);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::kernels::cpu::test_values::spread as values;

    /// The kernel families that run on this CPU, each of which the tests check; none at the baseline tiers
    /// and on other architectures. A FLORENCE2_CPU_TIER that the CPU cannot honour fails the tests rather
    /// than skip them (CI names the tier whose kernel it means to test).
    fn kernels() -> Vec<Kernel> {
        crate::kernels::cpu::features::check_cpu_tier().expect("FLORENCE2_CPU_TIER");
        let kernels: Vec<Kernel> = Kernel::ALL
            .iter()
            .copied()
            .filter(|kernel| kernel.runs())
            .collect();
        if kernels.is_empty() {
            eprintln!("skipped: this CPU tier runs no kernel (it needs AVX2 and FMA, or sdot)");
        }
        kernels
    }

    /// The levels and scale of a group of values by the module's rules, written out again: int8 `max |v| /
    /// 127` and levels -127..=127, int4 (`int4`) the value of largest magnitude over -8 and levels -8..=7;
    /// ties to even.
    fn levels_of(v: &[f32], int4: bool) -> (Vec<f32>, f32) {
        let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
        let signed = v.iter().copied().find(|x| x.abs() == max).unwrap_or(0.0);
        let (scale, low, high) = if int4 {
            (signed / -8.0, -8.0, 7.0)
        } else {
            (max / 127.0, -127.0, 127.0)
        };
        // A scale too small for its inverse to be finite (zero among them) quantizes every value to zero.
        let inverse = Some(scale.recip()).filter(|v| v.is_finite()).unwrap_or(0.0);
        let q = v
            .iter()
            .map(|x| (x * inverse).round_ties_even().clamp(low, high))
            .collect();
        (q, scale)
    }

    /// The kernel's arithmetic in f64, from the quantized values it should have made: what it computes up to
    /// f32 rounding.
    fn reference(
        x: &[f32],
        m: usize,
        k: usize,
        w: &[f32],
        n: usize,
        bias: &[f32],
        bits: Bits,
    ) -> Vec<f64> {
        let group = match bits {
            Bits::Int8 => k,
            Bits::Int4 => INT4_GROUP,
        };
        // The same f32 steps as the kernel's (a tie's rounding depends on them), then exact f64 sums.
        let quantize = |v: &[f32], int4: bool| -> (Vec<f64>, f64) {
            let (q, scale) = levels_of(v, int4);
            (q.into_iter().map(f64::from).collect(), scale as f64)
        };
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            let (qx, sx) = quantize(&x[i * k..][..k], false);
            for c in 0..n {
                let row = &w[c * k..][..k];
                let mut dot = 0f64;
                for (g, values) in row.chunks(group).enumerate() {
                    let (qw, sw) = quantize(values, bits == Bits::Int4);
                    let part: f64 = qw.iter().zip(&qx[g * group..]).map(|(a, b)| a * b).sum();
                    dot += sw * part;
                }
                out[i * n + c] = sx * dot + bias[c] as f64;
            }
        }
        out
    }

    #[test]
    fn matches_the_quantized_product() {
        // Few and many rows; k not a multiple of 4 or of a group; partial panels and row tiles; more than
        // one row block and panel group.
        for (kernel, bits) in kernels()
            .into_iter()
            .flat_map(|kernel| [(kernel, Bits::Int8), (kernel, Bits::Int4)])
        {
            for (m, k, n) in crate::kernels::cpu::test_values::SHAPES {
                let (x, w, bias) = (values(m * k, 1), values(n * k, 2), values(n, 3));
                let want = reference(&x, m, k, &w, n, &bias, bits);
                let packed = Packed::new(&w, n, k, bits);
                let in_f32 = linear_on(kernel, &x, m, &packed, &bias, Epilogue::None);
                let x_bf16: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
                // bf16 inputs quantize like their f32 values only where those are bf16 already: compare the
                // bf16 run with the reference from the rounded inputs.
                let rounded: Vec<f32> = x_bf16.iter().map(|v| v.to_f32()).collect();
                let want_bf16 = reference(&rounded, m, k, &w, n, &bias, bits);
                let in_bf16 = linear_on(kernel, &x_bf16, m, &packed, &bias, Epilogue::None);
                let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
                for (idx, (g, e)) in in_f32.iter().zip(&want).enumerate() {
                    // f32 sums of exact int32 groups; a quantized value may round the other way where the
                    // f32 and f64 scales differ in the last bit.
                    assert!(
                        ((*g as f64) - e).abs() <= 1e-4 * scale,
                        "{kernel:?} {bits:?} {m}x{k}x{n} f32 at {idx}: {g} vs {e}"
                    );
                }
                for (idx, (g, e)) in in_bf16.iter().zip(&want_bf16).enumerate() {
                    let tol = e.abs() / 128.0 + 1e-4 * scale;
                    assert!(
                        (g.to_f64() - e).abs() <= tol,
                        "{kernel:?} {bits:?} {m}x{k}x{n} bf16 at {idx}: {g} vs {e}"
                    );
                }
            }
        }
    }

    /// A row's outputs do not depend on the rows beside it: one row at a time (the vector kernel) and all of
    /// them at once (on CPUs with AMX-INT8, int8 on the tile unit in whole and partial register blocks) give
    /// the same bits, so a batch answers as its requests alone.
    #[test]
    fn rows_alone_and_together_are_the_same() {
        for (kernel, bits) in kernels()
            .into_iter()
            .flat_map(|kernel| [(kernel, Bits::Int8), (kernel, Bits::Int4)])
        {
            for (m, k, n) in [(24, 128, 40), (40, 64, 96), (50, 192, 33), (97, 256, 70)] {
                let (x, w, bias) = (values(m * k, 4), values(n * k, 5), values(n, 6));
                let packed = Packed::new(&w, n, k, bits);
                let together = linear_on(kernel, &x, m, &packed, &bias, Epilogue::None);
                for (r, row) in x.chunks(k).enumerate() {
                    let alone = linear_on(kernel, row, 1, &packed, &bias, Epilogue::None);
                    let same = together[r * n..][..n].iter().zip(&alone);
                    assert!(
                        same.clone().all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{kernel:?} {bits:?} {m}x{k}x{n} row {r}"
                    );
                }
            }
        }
    }

    #[test]
    fn rows_are_the_dequantized_weights() {
        let (n, k) = (37, 150);
        let w = values(n * k, 2);
        for bits in [Bits::Int8, Bits::Int4] {
            let packed = Packed::new(&w, n, k, bits);
            let group = if bits == Bits::Int8 { k } else { INT4_GROUP };
            let mut row = vec![0f32; k];
            for c in [0, 15, 16, 31, 32, 36] {
                packed.row(c, &mut row);
                for (g, (got, want)) in row
                    .chunks(group)
                    .zip(w[c * k..][..k].chunks(group))
                    .enumerate()
                {
                    let (levels, scale) = levels_of(want, bits == Bits::Int4);
                    for (t, (got, q)) in got.iter().zip(levels).enumerate() {
                        assert!(
                            (got - q * scale).abs() <= 1e-6,
                            "{bits:?} row {c} group {g} at {t}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn round_even_is_ties_to_even() {
        for v in [
            0.5f32, 1.5, 2.5, -0.5, -1.5, 126.5, -127.5, 3.2, -3.7, 0.0, 100.49999,
        ] {
            assert_eq!(round_even(v), v.round_ties_even(), "{v}");
        }
    }

    #[test]
    fn non_finite_inputs_give_nan_rows() {
        for kernel in kernels() {
            let (k, n) = (40, 3);
            let packed = Packed::new(&values(n * k, 2), n, k, Bits::Int8);
            let mut x = values(3 * k, 1);
            x[5] = f32::NAN;
            x[k + 7] = f32::INFINITY;
            let out = linear_on(kernel, &x, 3, &packed, &[0.0; 3], Epilogue::None);
            assert!(out[..2 * n].iter().all(|v| v.is_nan()), "{kernel:?}");
            assert!(out[2 * n..].iter().all(|v| v.is_finite()), "{kernel:?}");
            // A non-finite weight makes its column's outputs NaN, in both formats.
            for bits in [Bits::Int8, Bits::Int4] {
                let mut w = values(n * k, 2);
                w[k + 3] = f32::INFINITY;
                let out = linear_on(
                    kernel,
                    &values(2 * k, 1),
                    2,
                    &Packed::new(&w, n, k, bits),
                    &[0.0; 3],
                    Epilogue::None,
                );
                for (i, v) in out.iter().enumerate() {
                    assert_eq!(
                        v.is_nan(),
                        i % n == 1,
                        "{kernel:?} {bits:?} output {i}: {v}"
                    );
                }
            }
        }
    }

    /// `m` rows of `k` spread values, and where there are rows enough, rows that take the edge cases of the
    /// activations' quantization: a NaN, an infinity, all zeros, values too small for their scale to have a
    /// finite inverse, and ties (halves of the scale).
    fn awkward_rows(m: usize, k: usize, seed: u32) -> Vec<f32> {
        let mut x = values(m * k, seed);
        let mut rows = x.chunks_mut(k).skip(1);
        if let Some(row) = rows.next() {
            row[k / 2] = f32::NAN;
        }
        if let Some(row) = rows.next() {
            row[k - 1] = f32::NEG_INFINITY;
        }
        if let Some(row) = rows.next() {
            row.fill(0.0);
        }
        if let Some(row) = rows.next() {
            row.iter_mut().for_each(|v| *v *= 1e-40);
        }
        if let Some(row) = rows.next() {
            // Scale 1: each value's level is itself, the halves ties.
            for (t, v) in row.iter_mut().enumerate() {
                *v = (t % 255) as f32 * 0.5 - 63.5;
            }
            row[0] = 127.0;
        }
        x
    }

    /// The AVX2 kernels quantize the activations as the `vpdpbusd` kernel does: the same levels (as bytes
    /// and widened) and scales.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_quantizes_as_vnni() {
        if !Kernel::Vnni.runs() {
            eprintln!("skipped: this CPU tier has no AVX512-VNNI to compare with");
            return;
        }
        // SAFETY (the `unsafe` blocks): the CPU tier runs both kernels; `quantize_rows` gives each row
        // `k_padded` values, and both quantizers keep its promise.
        fn same<A: Activation>(x: &[A], shape: (usize, usize), what: &str) {
            let bits = |scales: &[f32]| scales.iter().map(|s| s.to_bits()).collect::<Vec<_>>();
            let vnni = |row: &[A], q: *mut u8| unsafe { quantize_row(row, q) };
            let bytes = |row: &[A], q: *mut u8| unsafe { quantize_row_avx2::<A, u8>(row, q) };
            let words = |row: &[A], q: *mut u16| unsafe { quantize_row_avx2::<A, u16>(row, q) };
            let (want, scales) = unsafe { quantize_rows(x, shape, 128, vnni) };
            let bytes = unsafe { quantize_rows(x, shape, 128, bytes) };
            let words = unsafe { quantize_rows(x, shape, 128, words) };
            assert!(
                bytes.0 == want && bits(&bytes.1) == bits(&scales),
                "{what} bytes"
            );
            let widened: Vec<u16> = want.iter().map(|&q| u16::from(q)).collect();
            assert!(
                words.0 == widened && bits(&words.1) == bits(&scales),
                "{what} words"
            );
        }
        for k in [1, 7, 8, 9, 16, 33, 100, 768] {
            let x = awkward_rows(8, k, 10);
            let x_bf16: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            let shape = (k, k.next_multiple_of(INT4_GROUP));
            same(&x, shape, &format!("f32 k = {k}"));
            same(&x_bf16, shape, &format!("bf16 k = {k}"));
        }
    }

    /// The module's arithmetic written out one output at a time, from the levels and scales its rules give
    /// ([`levels_of`]): each group's sum of (activation level + 128) x weight level in int32, the f32 steps
    /// after it in the kernels' order (fused where they fuse), the output rounded to `A`, then GELU. Every
    /// kernel on every CPU gives these bits.
    fn arithmetic<A: Element>(
        x: &[A],
        (w, n, k): (&[f32], usize, usize),
        (bits, bias, epilogue): (Bits, &[f32], Epilogue),
    ) -> Vec<A> {
        let group = match bits {
            Bits::Int8 => k,
            Bits::Int4 => INT4_GROUP,
        };
        // Per column and group: the weight levels, their scale and their sum.
        let weights: Vec<Vec<(Vec<f32>, f32, i32)>> = (0..n)
            .map(|c| {
                w[c * k..][..k]
                    .chunks(group)
                    .map(|values| {
                        let (levels, scale) = levels_of(values, bits == Bits::Int4);
                        let sum = levels.iter().map(|&q| q as i32).sum();
                        (levels, scale, sum)
                    })
                    .collect()
            })
            .collect();
        let mut out = Vec::with_capacity(x.len() / k * n);
        for row in x.chunks(k) {
            let row: Vec<f32> = row.iter().map(|v| v.to_f32()).collect();
            let (qx, sx) = if row.iter().all(|v| v.is_finite()) {
                levels_of(&row, false)
            } else {
                (vec![0.0; k], f32::NAN)
            };
            for (groups, &bias) in weights.iter().zip(bias) {
                let (mut totals, mut offset) = (0f32, 0f32);
                for (g, (qw, sw, level_sum)) in groups.iter().enumerate() {
                    let sum: i32 = qw
                        .iter()
                        .zip(&qx[g * group..])
                        .map(|(&w, &x)| (x as i32 + 128) * w as i32)
                        .sum();
                    totals = (sum as f32).mul_add(*sw, totals);
                    offset += 128.0 * sw * *level_sum as f32;
                }
                let value = A::from_f32((totals - offset).mul_add(sx, bias));
                out.push(match epilogue {
                    Epilogue::None => value,
                    Epilogue::Gelu => A::from_f32(crate::kernels::cpu::math::gelu(value.to_f32())),
                });
            }
        }
        out
    }

    /// Every kernel gives [`arithmetic`]'s bits (NaN where it is NaN): both formats and activation types,
    /// every path of the tiles, with and without GELU, and the activations' edge cases.
    #[test]
    fn kernels_give_the_bits_of_the_arithmetic() {
        fn same<A: Activation>(
            kernel: Kernel,
            x: &[A],
            m: usize,
            (w, n, k): (&[f32], usize, usize),
            (bits, bias): (Bits, &[f32]),
            what: &str,
        ) {
            let packed = Packed::new(w, n, k, bits);
            for epilogue in [Epilogue::None, Epilogue::Gelu] {
                let want = arithmetic(x, (w, n, k), (bits, bias, epilogue));
                let got = linear_on(kernel, x, m, &packed, bias, epilogue);
                // bf16 widens to f32 exactly.
                let bits = |out: &[A]| -> Vec<u32> {
                    let canonical = |v: f32| if v.is_nan() { f32::NAN } else { v };
                    out.iter()
                        .map(|v| canonical(v.to_f32()).to_bits())
                        .collect()
                };
                let (want, got) = (bits(&want), bits(&got));
                if let Some(i) = (0..want.len()).find(|&i| want[i] != got[i]) {
                    panic!(
                        "{kernel:?} {what} {epilogue:?} at {i}: {:#x} vs {:#x} (of {m} rows)",
                        got[i], want[i]
                    );
                }
            }
        }
        // k not a multiple of the int4 group; a partial panel of at most 8 and of at most 16 columns; more
        // than 16.
        let shapes = [(6, 100, 45), (7, 70, 12), (5, 40, 5), (2, 500, 64)];
        for kernel in kernels() {
            for (m, k, n) in crate::kernels::cpu::test_values::SHAPES
                .into_iter()
                .chain(shapes)
            {
                let x = awkward_rows(m, k, 11);
                let x_bf16: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
                // Weights of full 24-bit mantissas, so that their scales' products round (the spread's
                // values have 12 bits, which the products of short sums hold exactly); a column of zeros
                // and one too small for its scale's inverse to be finite.
                let mut w: Vec<f32> = values(n * k, 12)
                    .iter()
                    .map(|v| v * std::f32::consts::FRAC_PI_4)
                    .collect();
                if n >= 3 {
                    w[..k].fill(0.0);
                    w[k..2 * k].iter_mut().for_each(|v| *v *= 1e-40);
                }
                let bias = values(n, 13);
                for bits in [Bits::Int8, Bits::Int4] {
                    let what = format!("{bits:?} {m}x{k}x{n}");
                    same(
                        kernel,
                        &x,
                        m,
                        (&w, n, k),
                        (bits, &bias),
                        &format!("{what} f32"),
                    );
                    same(
                        kernel,
                        &x_bf16,
                        m,
                        (&w, n, k),
                        (bits, &bias),
                        &format!("{what} bf16"),
                    );
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn bf16_rounding_matches_half() {
        let values = [
            1.0f32,
            // Halfway between two bf16 values: ties to even, down and up.
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            -3.3,
            f32::MAX,
            f32::INFINITY,
            f32::NAN,
            1e-40,
            -0.0,
            -2.0078125,
            f32::from_bits(0x7F80_0001),
            f32::NEG_INFINITY,
            3.0e38,
            -2.5e-39,
            65504.0,
            0.1,
        ];
        let want = values.map(|v| bf16::from_f32(v).to_bits());
        for kernel in kernels() {
            // SAFETY: the CPU tier runs `kernel`.
            let got = unsafe {
                match kernel {
                    Kernel::Vnni => round(&values),
                    Kernel::Avx2 => round_avx2(&values),
                }
            };
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    g == w || (bf16::from_bits(*g).is_nan() && bf16::from_bits(*w).is_nan()),
                    "{kernel:?} {g:#x} vs {w:#x}"
                );
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn round(lanes: &[f32; 16]) -> [u16; 16] {
        std::mem::transmute(to_bf16(std::arch::x86_64::_mm512_loadu_ps(lanes.as_ptr())))
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn round_avx2(lanes: &[f32; 16]) -> [u16; 16] {
        use std::arch::x86_64::_mm256_loadu_ps;
        let lo = to_bf16_avx2(_mm256_loadu_ps(lanes.as_ptr()));
        let hi = to_bf16_avx2(_mm256_loadu_ps(lanes.as_ptr().add(8)));
        std::mem::transmute([lo, hi])
    }
}
