//! `x @ wᵀ + b` in bf16 on Intel's AMX tile unit (`tdpbf16ps`), for the many-row products of
//! [`super::bf16_gemm`].
//!
//! On Intel CPUs from Sapphire Rapids on, AVX512-BF16's `vdpbf16ps` runs no faster than an f32 FMA, so the
//! vector kernel makes bf16 no faster than f32; the tile unit multiplies a 16x32 bf16 tile by a 32x16 one into
//! 16x16 f32 sums in one instruction, many times the vector rate, and it is what torch's oneDNN uses there.
//! The weights are the vector kernel's packed panels ([`super::bf16_gemm::Packed`]): for each pair of `k`,
//! 32 lanes of two bf16, which is the tile unit's layout for its second operand, so a panel's 16 columns
//! load as a tile with a stride of one panel row. `x` loads in place, 16 rows by 32 values of `k`.
//!
//! A register block is 32 rows x one panel (32 columns): four f32 tiles, two tiles of `x`, two of the
//! panel. Sums start at zero, accumulate in f32 (the unit rounds to nearest even, reads subnormal inputs as
//! zero and flushes subnormal sums, as oneDNN's AMX path does), and the bias is added to each before it is
//! rounded once to bf16. `k` must be a multiple of 32; the last block of a product may have fewer rows
//! ([`Tiles::configure`] sizes the tiles of `x` and the sums to them), so any number of rows runs here.
//!
//! [`block_int8`] is the same register block for int8 weights against activations quantized to unsigned bytes
//! (`tdpbusd`), for [`super::quantized_gemm`], which owns that scheme's arithmetic around the sums.
//!
//! x86-64 Linux with AMX-TILE and AMX-BF16, at the AVX-512 tier with AVX512-BF16 (the epilogue's
//! conversion), and the kernel's permission to use the tile data (`arch_prctl(ARCH_REQ_XCOMP_PERM)`, asked
//! once); [`available`] is false elsewhere. Rust has no stable AMX intrinsics, so the tile instructions are
//! inline assembly.

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
use half::bf16;

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
use super::panels::{for_each_block, Epilogue, PANEL};
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
use super::parallel::TaskPtr;

/// Values of `k` in one step: a tile row of `x` is 64 bytes.
pub const K_STEP: usize = 32;

/// Rows of `x` in a register block: two tiles of 16.
pub const BLOCK_ROWS: usize = 32;

/// Whether the kernel runs here (asks the OS for the tile data permission on the first call).
pub fn available() -> bool {
    use std::sync::OnceLock;
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(detect)
}

/// Bytes of `k` in one step of the int8 product [`block_int8`]: a tile row of quantized activations.
pub const INT8_K_STEP: usize = 64;

/// Whether [`block_int8`] runs here: [`available`] and AMX-INT8.
pub fn int8_available() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        // CPUID leaf 7: EDX bit 25 AMX-INT8.
        #[allow(unused_unsafe)] // a safe function from Rust 1.94 on
        let edx = unsafe { std::arch::x86_64::__cpuid_count(7, 0) }.edx;
        available() && edx >> 25 & 1 == 1
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    if !super::features::has_avx512_bf16() {
        return false;
    }
    // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
    #[allow(unused_unsafe)] // a safe function from Rust 1.94 on
    let edx = unsafe { std::arch::x86_64::__cpuid_count(7, 0) }.edx;
    let has = |bit: u32| edx >> bit & 1 == 1;
    if !(has(22) && has(24)) {
        return false;
    }
    // Linux leaves the tile data off until a process asks for it (from 5.16; older kernels have no AMX
    // support, and the call fails there).
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// `epilogue(x[m, k] @ wᵀ + bias)` into `out` (rows `n` values apart) for `k` a multiple of 32, `w` the
/// packed panels of `n` columns (`k / 2 * PANEL` values each), `bias` `n` values.
///
/// # Panics
/// If [`available`] is false or the shapes do not hold.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub fn linear(
    x: &[bf16],
    (m, k, n): (usize, usize, usize),
    panels: &[u32],
    bias: &[f32],
    (out, epilogue): (TaskPtr<bf16>, Epilogue),
) {
    assert!(available(), "amx::linear needs AMX-BF16");
    assert!(k % K_STEP == 0 && k > 0);
    let panel_len = k / 2 * PANEL;
    let count = n.div_ceil(PANEL);
    assert!(x.len() == m * k && panels.len() == count * panel_len && bias.len() == n);
    for_each_block(m, count, k * 2, BLOCK_ROWS, |rows, p| {
        let cols = PANEL.min(n - p * PANEL);
        let panel = &panels[p * panel_len..][..panel_len];
        let bias = &bias[p * PANEL..][..cols];
        let mut sums = [0f32; BLOCK_ROWS * PANEL];
        for (blocks, size) in register_blocks(rows.clone()) {
            // SAFETY: `available` checked the CPU and the permission; the tiles stay configured for blocks
            // of `size` rows until `_tiles` drops, and the asm reads the operands within `x` and `panel`
            // (`size` rows of `k` values, `k / 2` panel rows) and writes `sums`.
            let _tiles = unsafe { Tiles::configure(size) };
            for first in blocks.step_by(BLOCK_ROWS) {
                unsafe {
                    block(
                        x[first * k..].as_ptr(),
                        (k, size),
                        panel.as_ptr(),
                        &mut sums,
                    );
                    // SAFETY: `out` addresses rows first.. and this panel's columns, under its contract.
                    store(&sums, bias, out.at(first * n + p * PANEL), (n, size));
                }
            }
        }
        // SAFETY: the outputs this task just wrote.
        unsafe { epilogue.apply(out, rows, (p * PANEL, cols, n)) };
    });
}

/// The register blocks of `rows` as runs of blocks of one size: (rows of the run, rows per block): whole
/// blocks of [`BLOCK_ROWS`], then the remainder as one shorter block. Each run needs the tiles configured for
/// its size.
pub fn register_blocks(
    rows: std::ops::Range<usize>,
) -> impl Iterator<Item = (std::ops::Range<usize>, usize)> {
    let whole = rows.start + rows.len() / BLOCK_ROWS * BLOCK_ROWS;
    let runs = [
        (rows.start..whole, BLOCK_ROWS),
        (whole..rows.end, rows.end - whole),
    ];
    runs.into_iter().filter(|(run, _)| !run.is_empty())
}

/// The tile configuration (palette 1, `ldtilecfg`'s 64-byte layout): 64-byte rows, row counts per tile.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[repr(C, align(64))]
struct Config([u8; 64]);

/// The tile registers configured on this thread; released when dropped.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub struct Tiles;

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
impl Tiles {
    /// Configures the tiles for register blocks of `rows` (1 to [`BLOCK_ROWS`]) rows of `x`: tiles 0, 1
    /// (sums) and 4 (`x`) hold the first 16 rows or fewer, tiles 2, 3 and 5 the rest; tiles 6-7 (weights) 16
    /// rows of 64 bytes. Every tile has 64-byte rows. A block of 16 rows or fewer configures the second half
    /// with one row, which the kernels load from the first row of the block (memory they read anyway) and
    /// whose sums no one reads: the tile unit loads and stores only the configured rows, so no read or write
    /// goes past the block.
    ///
    /// # Safety
    /// [`available`] is true (the CPU has AMX-TILE and the process the tile data permission).
    pub unsafe fn configure(rows: usize) -> Self {
        assert!((1..=BLOCK_ROWS).contains(&rows));
        let half = BLOCK_ROWS / 2;
        let (upper, lower) = (rows.min(half) as u8, rows.saturating_sub(half).max(1) as u8);
        let mut config = Config([0; 64]);
        config.0[0] = 1; // palette
        for (tile, tile_rows) in [upper, upper, lower, lower, upper, lower, 16, 16]
            .into_iter()
            .enumerate()
        {
            // Bytes 16..48: bytes per row of each tile (u16, little-endian); 48..64: rows.
            config.0[16 + 2 * tile] = 64;
            config.0[48 + tile] = tile_rows;
        }
        std::arch::asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
        Tiles
    }
}

/// Where the second half of a register block of `rows` rows of `x` starts (rows `stride` elements apart):
/// row 16, or for 16 rows or fewer the first row again (see [`Tiles::configure`]).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[inline(always)]
fn lower_half<T>(a: *const T, rows: usize, stride: usize) -> *const T {
    if rows > BLOCK_ROWS / 2 {
        a.wrapping_add(BLOCK_ROWS / 2 * stride)
    } else {
        a
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: tiles were configured on this thread by `configure`.
        unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// Zeroes the four sum tiles (tiles 0-3) of a register block.
///
/// # Safety
/// Tiles configured by [`Tiles::configure`].
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[inline(always)]
unsafe fn zero_sums() {
    std::arch::asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        options(nostack, nomem)
    );
}

/// Stores the four sum tiles (4-byte f32 or int32 sums) as the block's rows of 32 in `sums`: tile 0 rows
/// 0-15 columns 0-15, tile 1 columns 16-31, tiles 2 and 3 the same for rows 16-31 (each tile its configured
/// rows).
///
/// # Safety
/// Tiles configured by [`Tiles::configure`] and holding sums of `T`'s type; `T` is 4 bytes.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[inline(always)]
unsafe fn store_sums<T>(sums: &mut [T; BLOCK_ROWS * PANEL]) {
    let c = sums.as_mut_ptr();
    std::arch::asm!(
        "tilestored [{c0} + {s}*1], tmm0",
        "tilestored [{c1} + {s}*1], tmm1",
        "tilestored [{c2} + {s}*1], tmm2",
        "tilestored [{c3} + {s}*1], tmm3",
        c0 = in(reg) c,
        c1 = in(reg) c.add(16),
        c2 = in(reg) c.add(16 * PANEL),
        c3 = in(reg) c.add(16 * PANEL + 16),
        s = in(reg) std::mem::size_of::<T>() * PANEL,
        options(nostack)
    );
}

/// The sums of a block of `rows` rows of `x` (from `a`, rows `k` values apart) times one packed panel, into
/// the first `rows` rows of `sums` (32 rows of 32 f32): tiles 0-3 hold the four quarters (rows 0-15 and
/// 16-31 by columns 0-15 and 16-31), 4-5 the two row halves of `x`, 6-7 the panel's two column halves.
///
/// # Safety
/// Tiles configured by [`Tiles::configure`] for `rows`; `a` addresses `rows` rows of `k` values and `panel`
/// `k / 2` panel rows; `k` is a multiple of 32.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[inline(always)]
unsafe fn block(
    a: *const bf16,
    (k, rows): (usize, usize),
    panel: *const u32,
    sums: &mut [f32; BLOCK_ROWS * PANEL],
) {
    use std::arch::asm;
    zero_sums();
    let (a_stride, b_stride) = (k * 2, PANEL * 4);
    for step in 0..k / K_STEP {
        let a0 = a.add(step * K_STEP);
        // A step of 32 values of `k` is 16 pairs: 16 panel rows.
        let b0 = panel.add(step * (K_STEP / 2) * PANEL);
        // Each tile is loaded right before the first product that reads it (oneDNN's order), so that a product
        // starts as soon as its two operands are in and the later loads overlap it.
        asm!(
            "tileloadd tmm4, [{a0} + {sa}*1]",
            "tileloadd tmm6, [{b0} + {sb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{b1} + {sb}*1]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{a1} + {sa}*1]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a0 = in(reg) a0,
            a1 = in(reg) lower_half(a0, rows, k),
            b0 = in(reg) b0,
            b1 = in(reg) b0.add(16),
            sa = in(reg) a_stride,
            sb = in(reg) b_stride,
            options(nostack, readonly)
        );
    }
    store_sums(sums);
}

/// The int32 sums of a block of `rows` rows of unsigned bytes (from `a`, rows `k` bytes apart) times one
/// panel of signed bytes (`k / 4` panel rows of 32 lanes of 4 bytes, the layout of
/// [`super::quantized_gemm`]'s int8 weights, which is the tile unit's for its second operand) into the first
/// `rows` rows of `sums` (32 rows of 32), by `tdpbusd`; the tiles as in [`block`].
///
/// # Safety
/// Tiles configured by [`Tiles::configure`] for `rows`, and [`int8_available`]; `a` addresses `rows` rows of
/// `k` bytes and `panel` `k / 4` panel rows; `k` is a multiple of [`INT8_K_STEP`].
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub unsafe fn block_int8(
    a: *const u8,
    (k, rows): (usize, usize),
    panel: *const u8,
    sums: &mut [i32; BLOCK_ROWS * PANEL],
) {
    use std::arch::asm;
    zero_sums();
    // A panel row holds 4 inputs of each of the 32 columns: 128 bytes.
    let b_stride = 4 * PANEL;
    for step in 0..k / INT8_K_STEP {
        let a0 = a.add(step * INT8_K_STEP);
        // A step of 64 inputs is 16 panel rows.
        let b0 = panel.add(step * (INT8_K_STEP / 4) * b_stride);
        asm!(
            "tileloadd tmm4, [{a0} + {sa}*1]",
            "tileloadd tmm5, [{a1} + {sa}*1]",
            "tileloadd tmm6, [{b0} + {sb}*1]",
            "tileloadd tmm7, [{b1} + {sb}*1]",
            "tdpbusd tmm0, tmm4, tmm6",
            "tdpbusd tmm1, tmm4, tmm7",
            "tdpbusd tmm2, tmm5, tmm6",
            "tdpbusd tmm3, tmm5, tmm7",
            a0 = in(reg) a0,
            a1 = in(reg) lower_half(a0, rows, k),
            b0 = in(reg) b0,
            b1 = in(reg) b0.add(64),
            sa = in(reg) k,
            sb = in(reg) b_stride,
            options(nostack, readonly)
        );
    }
    store_sums(sums);
}

/// `sums + bias` rounded to bf16 (to nearest even) into `rows` output rows `n` values apart, the first
/// `bias.len()` (at most 32) columns.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL and BF16; `dst` addresses `rows` rows of `bias.len()` writable values, `n`
/// apart.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn store(
    sums: &[f32; BLOCK_ROWS * PANEL],
    bias: &[f32],
    dst: *mut bf16,
    (n, rows): (usize, usize),
) {
    use std::arch::x86_64::{
        __m256i, __mmask16, _mm256_mask_storeu_epi16, _mm512_add_ps, _mm512_cvtneps_pbh,
        _mm512_loadu_ps, _mm512_maskz_loadu_ps,
    };
    let mask = |from: usize| -> __mmask16 {
        let valid = bias.len().saturating_sub(from).min(16);
        ((1u32 << valid) - 1) as __mmask16
    };
    let (mask_lo, mask_hi) = (mask(0), mask(16));
    let bias_lo = _mm512_maskz_loadu_ps(mask_lo, bias.as_ptr());
    let bias_hi = _mm512_maskz_loadu_ps(mask_hi, bias.as_ptr().wrapping_add(16));
    for r in 0..rows {
        let row = sums.as_ptr().add(r * PANEL);
        let lo = _mm512_add_ps(_mm512_loadu_ps(row), bias_lo);
        let hi = _mm512_add_ps(_mm512_loadu_ps(row.add(16)), bias_hi);
        let out = dst.add(r * n).cast::<i16>();
        let lo: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(lo));
        let hi: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(hi));
        _mm256_mask_storeu_epi16(out, mask_lo, lo);
        _mm256_mask_storeu_epi16(out.wrapping_add(16), mask_hi, hi);
    }
}
