//! `x @ wᵀ + b` in bf16 on the CPU with AVX512-BF16's pair dot product (`vdpbf16ps`).
//!
//! candle 0.11 has no bf16 GEMM on the CPU: it widens both operands to f32, multiplies and rounds back, which
//! makes bf16 slower than f32, while torch's bf16 is faster than its f32 on a CPU with AVX512-BF16.
//! `vdpbf16ps` multiplies 16 pairs of bf16 and adds them to 16 f32 sums in one instruction, twice the
//! products of an f32 FMA of the same width. The sums start from the bias, accumulate in f32 and are rounded
//! to bf16 once (to nearest even), as torch's oneDNN path does.
//!
//! `w` is packed once, at load ([`Packed`]), into panels of 32 output columns with the pairs of `k`
//! interleaved, so that one 64-byte load gives a `vdpbf16ps` operand for 16 columns. A task takes a block of
//! rows and a range of panels, and each tile of up to [`TILE_ROWS`] rows x 32 columns is summed over the
//! whole of `k` in registers, each pair of a row of `x` broadcast to 16 lanes; a decode step's few rows read
//! each panel once.
//!
//! On Intel CPUs with AMX, products of [`TILE_UNIT_MIN_ROWS`] rows or more go to the tile unit
//! ([`super::amx`]) instead, which reads the same packed panels.
//!
//! Without AVX512-BF16 (or at a lower [`super::features::cpu_tier`]) the same panels go to an AVX2 tile of up
//! to [`AVX2_TILE_ROWS`] rows x 16 columns, two passes a panel (for up to [`AVX2_WHOLE_PANEL_ROWS`] rows, x 32
//! columns in one pass): each pair of weights widened to f32 in registers (a bf16 is the high half of its
//! f32: the pair's low value shifted up, the high one's low half cleared), and f32 FMAs, the even input
//! before the odd one. Products of bf16 values are exact in f32; the sums start from
//! the bias and are rounded to bf16 once, as above (they differ from `vdpbf16ps`'s in the last bits: it
//! sums each pair before adding it).
//!
//! On aarch64 a NEON tile of up to [`NEON_TILE_ROWS`] rows x 16 columns does the AVX2 tile's arithmetic:
//! the same FMAs in the same order, so the same bits.
//!
//! x86-64 with AVX2 and FMA, detected at run time, and every aarch64 CPU (NEON is its baseline); [`available`]
//! is false elsewhere and the caller keeps candle's matmul.

use half::bf16;

use super::panels::Epilogue;
use super::panels::PANEL;
#[cfg(target_arch = "x86_64")]
use super::panels::{avx2_bias_sums, avx2_passes, avx2_vectors, Width};
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use super::panels::{by_rows, run_tiles, PanelTile, Panels};
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use super::parallel::{par_map, TaskPtr};

/// Rows in a register tile of the packed kernel: 2 x 12 accumulators, two weight vectors and the broadcast
/// fill 27 of the 32 AVX-512 registers.
#[cfg(target_arch = "x86_64")]
const TILE_ROWS: usize = 12;
#[cfg(target_arch = "x86_64")]
const _: () = assert!(TILE_ROWS <= super::panels::MAX_TILE_ROWS);

/// The fewest rows that go to the tile unit ([`super::amx`]): each of its steps loads a whole weight tile
/// and runs one tile product whatever the rows, so for one or two rows (greedy decoding's) this module's
/// vector kernel, which streams the same weights with one multiply-add per row, is as fast or faster.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
const TILE_UNIT_MIN_ROWS: usize = 3;

/// Rows in a register tile of the AVX2 kernel: 2 x 5 accumulators of 8 lanes, four widened weight vectors
/// and the broadcast input fill 15 of the 16 AVX registers.
#[cfg(target_arch = "x86_64")]
const AVX2_TILE_ROWS: usize = 5;

/// The most rows an AVX2 tile sums against the whole panel at once ([`avx2_vectors`]): 3 x 4 accumulators,
/// the rows' three broadcasts and a widened weight vector fill the 16 registers, the 3-row loop in
/// assembly ([`three_rows_whole_panel`]).
#[cfg(target_arch = "x86_64")]
const AVX2_WHOLE_PANEL_ROWS: usize = 3;

/// Rows in a register tile of the NEON kernel: 4 x 5 accumulators of 4 lanes, four pairs of weights widened
/// to eight vectors and the broadcast input take 29 of the 32 vector registers.
#[cfg(target_arch = "aarch64")]
const NEON_TILE_ROWS: usize = 5;

/// Whether the kernels run here: x86-64 with [`super::features::has_avx2_fma`] (`vdpbf16ps` where
/// [`super::features::has_avx512_bf16`]), and aarch64.
pub fn available() -> bool {
    cfg!(target_arch = "aarch64") || super::features::has_avx2_fma()
}

/// `epilogue(x[m, k] @ wᵀ + bias[n])` with weights packed beforehand (a model's layers pack theirs once, at
/// load), row-major `[m, n]`; any `m` from 1.
///
/// # Panics
/// If [`available`] is false, or the slices do not hold the shapes given.
// Where `available()` is false the function only panics and its kernel arguments go unread.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(unused_variables)
)]
pub fn linear_packed(
    x: &[bf16],
    m: usize,
    w: &Packed,
    bias: &[bf16],
    epilogue: Epilogue,
) -> Vec<bf16> {
    assert!(available(), "bf16_gemm::linear_packed needs AVX2 and FMA");
    #[cfg(target_arch = "x86_64")]
    return linear_on(
        Width::widest(super::features::has_avx512_bf16()),
        x,
        m,
        w,
        bias,
        epilogue,
    );
    #[cfg(target_arch = "aarch64")]
    return output((x, m, w, bias), |bias, out| {
        f32_tiles(
            (x, m),
            w,
            bias,
            (out, epilogue),
            NEON_TILE_ROWS,
            |tile, a, size, dst| {
                // SAFETY: `run_tiles` hands each tile its rows and outputs.
                unsafe { by_rows!(size.min(NEON_TILE_ROWS), |R| tile.tile_neon::<R>(a, dst)) }
            },
        )
    });
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    unreachable!("available() is false here")
}

/// [`linear_packed`] on the instructions of `width`, which the CPU has.
#[cfg(target_arch = "x86_64")]
fn linear_on(
    width: Width,
    x: &[bf16],
    m: usize,
    w: &Packed,
    bias: &[bf16],
    epilogue: Epilogue,
) -> Vec<bf16> {
    output((x, m, w, bias), |bias, out| {
        panels(width, x, m, w, bias, (out, epilogue))
    })
}

/// The `[m, n]` output that `fill(bias as f32, outputs)` writes, each value once.
///
/// # Panics
/// If the slices do not hold the shapes given.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn output(
    (x, m, w, bias): (&[bf16], usize, &Packed, &[bf16]),
    fill: impl FnOnce(&[f32], TaskPtr<bf16>),
) -> Vec<bf16> {
    assert!(m > 0 && x.len() == m * w.k && bias.len() == w.n);
    let bias: Vec<f32> = bias.iter().map(|b| b.to_f32()).collect();
    let mut out = Vec::with_capacity(m * w.n);
    // SAFETY: `out` has room for m x n values and lives past the kernel, whose tasks write disjoint outputs.
    let dst = unsafe { TaskPtr::new(out.spare_capacity_mut().as_mut_ptr().cast::<bf16>()) };
    fill(&bias, dst);
    // SAFETY: the kernel writes each of the m x n outputs.
    unsafe { out.set_len(m * w.n) };
    out
}

/// The tiles that compute in f32 (AVX2's, NEON's): `x` widened once here rather than in each tile (every row
/// meets every panel), then `tile(panel, rows, row count, outputs)` for every register tile of up to
/// `tile_rows` rows ([`run_tiles`]).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn f32_tiles(
    (x, m): (&[bf16], usize),
    packed: &Packed,
    bias: &[f32],
    out: (TaskPtr<bf16>, Epilogue),
    tile_rows: usize,
    tile: impl Fn(&PanelTile<u32>, &[f32], usize, *mut bf16) + Sync,
) {
    let x = par_map(x, bf16::to_f32);
    let weights = Panels {
        data: &packed.panels,
        panel_len: packed.k.div_ceil(2) * PANEL,
        n: packed.n,
        k: packed.k,
    };
    run_tiles(&x, m, weights, bias, out, tile_rows, tile);
}

/// Weights `w[n, k]` laid out for the many-row kernel: for panel `p` and pair `j`, 32 `u32`s, lane `c`
/// holding `w[32p + c][2j]` in its low half and `w[32p + c][2j + 1]` in its high half; columns past `n`
/// and the half past an odd `k` are zero. The same bytes as `w`, give or take the last panel's padding.
pub struct Packed {
    panels: Vec<u32>,
    n: usize,
    k: usize,
}

impl Packed {
    /// Packs row-major `w` of `n` rows and `k` columns (both at least 1).
    pub fn new(w: &[bf16], n: usize, k: usize) -> Self {
        use rayon::prelude::*;
        assert!(n > 0 && k > 0 && w.len() == n * k);
        let pairs = k.div_ceil(2);
        let mut panels = vec![0u32; n.div_ceil(PANEL) * pairs * PANEL];
        panels
            .par_chunks_mut(pairs * PANEL)
            .enumerate()
            .for_each(|(p, panel)| {
                for c in 0..PANEL.min(n - p * PANEL) {
                    let row = &w[(p * PANEL + c) * k..][..k];
                    // Each pair of consecutive values: the even one in the low half of its lane.
                    let whole: &[[bf16; 2]] = bytemuck::cast_slice(&row[..k / 2 * 2]);
                    for (j, &[low, high]) in whole.iter().enumerate() {
                        panel[j * PANEL + c] =
                            u32::from(low.to_bits()) | u32::from(high.to_bits()) << 16;
                    }
                    if k % 2 == 1 {
                        panel[k / 2 * PANEL + c] = u32::from(row[k - 1].to_bits());
                    }
                }
            });
        Self { panels, n, k }
    }

    /// `(n, k)`: output and input features.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Row `c` of `w` (`k` values, exact in f32) into `out`: a tied token embedding's lookup.
    pub fn row(&self, c: usize, out: &mut [f32]) {
        assert!(c < self.n && out.len() == self.k);
        let pairs = self.k.div_ceil(2);
        let panel = &self.panels[c / PANEL * pairs * PANEL..][..pairs * PANEL];
        for (t, out) in out.iter_mut().enumerate() {
            let pair = panel[t / 2 * PANEL + c % PANEL];
            *out = bf16::from_bits((pair >> (16 * (t % 2))) as u16).to_f32();
        }
    }
}

/// The many-row kernel: `x[m, k]` against packed weights; at the AVX-512 width on the tile unit
/// ([`super::amx`]) where it runs and `k` fits it, else here.
#[cfg(target_arch = "x86_64")]
fn panels(
    width: Width,
    x: &[bf16],
    m: usize,
    packed: &Packed,
    bias: &[f32],
    (out, epilogue): (TaskPtr<bf16>, Epilogue),
) {
    let (n, k) = packed.dims();
    #[cfg(target_os = "linux")]
    {
        use super::amx;
        let fits = width == Width::Avx512 && k % amx::K_STEP == 0 && m >= TILE_UNIT_MIN_ROWS;
        if fits && amx::available() {
            amx::linear(x, (m, k, n), &packed.panels, bias, (out, epilogue));
            return;
        }
    }
    // SAFETY (both): the caller checked the CPU's features; `run_tiles` hands each tile its rows and outputs.
    match width {
        Width::Avx512 => {
            let weights = Panels {
                data: &packed.panels,
                panel_len: k.div_ceil(2) * PANEL,
                n,
                k,
            };
            run_tiles(
                x,
                m,
                weights,
                bias,
                (out, epilogue),
                TILE_ROWS,
                |tile, a, size, dst| unsafe {
                    by_rows!(size.min(TILE_ROWS), |R| tile.tile::<R>(a, dst))
                },
            )
        }
        Width::Avx2 => f32_tiles(
            (x, m),
            packed,
            bias,
            (out, epilogue),
            AVX2_TILE_ROWS,
            |tile, a, size, dst| unsafe {
                by_rows!(
                    size.min(AVX2_TILE_ROWS),
                    |R| if avx2_vectors(R, AVX2_WHOLE_PANEL_ROWS) == 4 {
                        tile.tile_avx2::<R, 4>(a, dst)
                    } else {
                        tile.tile_avx2::<R, 2>(a, dst)
                    }
                )
            },
        ),
    }
}

#[cfg(target_arch = "x86_64")]
impl PanelTile<'_, u32> {
    /// `R` (1 to [`TILE_ROWS`]) rows of `a` against the panel.
    ///
    /// # Safety
    /// The CPU has the features enabled here; `dst` addresses `R` output rows of `self.n` values from this
    /// panel's first column.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn tile<const R: usize>(&self, a: &[bf16], dst: *mut bf16) {
        use std::arch::x86_64::{
            __m256i, __m512bh, __mmask16, _mm256_mask_storeu_epi16, _mm512_cvtneps_pbh,
            _mm512_dpbf16_ps, _mm512_loadu_ps, _mm512_loadu_si512, _mm512_set1_epi32,
        };
        let k = self.k;
        let rows: [*const bf16; R] = std::array::from_fn(|r| a.as_ptr().add(r * k));
        let panel = self.panel.as_ptr();
        let mut lo = [_mm512_loadu_ps(self.bias.as_ptr()); R];
        let mut hi = [_mm512_loadu_ps(self.bias.as_ptr().add(16)); R];
        for j in 0..k / 2 {
            let w_lo: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(panel.add(j * PANEL).cast()));
            let w_hi: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(panel.add(j * PANEL + 16).cast()));
            for r in 0..R {
                let pair = rows[r].add(2 * j).cast::<i32>().read_unaligned();
                let pair: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                lo[r] = _mm512_dpbf16_ps(lo[r], pair, w_lo);
                hi[r] = _mm512_dpbf16_ps(hi[r], pair, w_hi);
            }
        }
        if k % 2 == 1 {
            // The last pair holds one value; the packed weights' high half is zero there, and so is this one.
            let j = k / 2;
            let w_lo: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(panel.add(j * PANEL).cast()));
            let w_hi: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(panel.add(j * PANEL + 16).cast()));
            for r in 0..R {
                let single = i32::from((*rows[r].add(k - 1)).to_bits());
                let single: __m512bh = std::mem::transmute(_mm512_set1_epi32(single));
                lo[r] = _mm512_dpbf16_ps(lo[r], single, w_lo);
                hi[r] = _mm512_dpbf16_ps(hi[r], single, w_hi);
            }
        }
        let mask = |from: usize| -> __mmask16 {
            let valid = self.cols.saturating_sub(from).min(16);
            ((1u32 << valid) - 1) as __mmask16
        };
        let (mask_lo, mask_hi) = (mask(0), mask(16));
        for r in 0..R {
            let row = dst.add(r * self.n).cast::<i16>();
            let lo: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(lo[r]));
            let hi: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(hi[r]));
            _mm256_mask_storeu_epi16(row, mask_lo, lo);
            _mm256_mask_storeu_epi16(row.add(16), mask_hi, hi);
        }
    }

    /// [`Self::tile`] with AVX2 and FMA, over the rows of `a` widened to f32: `R` (1 to [`AVX2_TILE_ROWS`])
    /// rows against `V` vectors of 8 columns of the panel at a time ([`avx2_vectors`]).
    ///
    /// # Safety
    /// As [`Self::tile`], with AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    // The loops index the sums by row and by vector, in the order the FMAs run.
    #[allow(clippy::needless_range_loop)]
    unsafe fn tile_avx2<const R: usize, const V: usize>(&self, a: &[f32], dst: *mut bf16) {
        use std::arch::x86_64::{
            __m256, __m256i, _mm256_broadcast_ss, _mm256_castsi256_ps, _mm256_fmadd_ps,
            _mm256_loadu_si256, _mm256_slli_epi32, _mm256_srli_epi32, _mm256_storeu_ps,
        };
        let k = self.k;
        let rows: [*const f32; R] = std::array::from_fn(|r| a.as_ptr().add(r * k));
        // The weights of input `2j + odd` for 8 columns from `at` (a pair per lane): the pair's low half
        // (even inputs) or high half (odd ones) as an f32, the other half cleared.
        let widen = |at: *const u32, odd: usize| {
            let pair: __m256i = _mm256_loadu_si256(at.cast());
            _mm256_castsi256_ps(if odd == 0 {
                _mm256_slli_epi32::<16>(pair)
            } else {
                _mm256_slli_epi32::<16>(_mm256_srli_epi32::<16>(pair))
            })
        };
        let x = |r: usize, t: usize| _mm256_broadcast_ss(&*rows[r].add(t));
        for part in avx2_passes::<V>(self.cols) {
            let panel = self.panel.as_ptr().add(part);
            let mut sums = avx2_bias_sums::<R, V>(self.bias.as_ptr().add(part));
            // Inputs 2j and 2j + 1 (`pairs`: 1 for an odd `k`'s last, single input), even before odd.
            let step = |sums: &mut [[__m256; V]; R], j: usize, pairs: usize| {
                let at = |v: usize| panel.add(j * PANEL + 8 * v);
                for odd in 0..pairs {
                    let t = 2 * j + odd;
                    // The sums take R x V registers; of the other operands, hold whichever are fewer: the
                    // rows' broadcasts (each weight vector widened as it is used) or the weight vectors (each
                    // row broadcast as it is used).
                    if R <= V {
                        for v in 0..V {
                            let w = widen(at(v), odd);
                            for r in 0..R {
                                sums[r][v] = _mm256_fmadd_ps(x(r, t), w, sums[r][v]);
                            }
                        }
                    } else {
                        let w: [__m256; V] = std::array::from_fn(|v| widen(at(v), odd));
                        for r in 0..R {
                            let x = x(r, t);
                            for v in 0..V {
                                sums[r][v] = _mm256_fmadd_ps(x, w[v], sums[r][v]);
                            }
                        }
                    }
                }
            };
            if R == 3 && V == 4 {
                // SAFETY: the sums are 3 x 4 vectors here; the rows hold `k` inputs and the panel their
                // pairs.
                let sums = &mut *sums.as_mut_ptr().cast::<[[__m256; 4]; 3]>();
                three_rows_whole_panel(sums, [rows[0], rows[1], rows[2]], panel, k / 2);
            } else {
                for j in 0..k / 2 {
                    step(&mut sums, j, 2);
                }
            }
            if k % 2 == 1 {
                step(&mut sums, k / 2, 1);
            }
            let cols = (self.cols - part).min(8 * V);
            for (r, sums) in sums.iter().enumerate() {
                let mut values = [0f32; PANEL];
                for (v, &sums) in sums.iter().enumerate() {
                    _mm256_storeu_ps(values.as_mut_ptr().add(8 * v), sums);
                }
                let row = dst.add(r * self.n + part);
                for (c, &value) in values[..cols].iter().enumerate() {
                    *row.add(c) = bf16::from_f32(value);
                }
            }
        }
    }
}

/// The pairs `0..pairs` of three rows (`rows`, f32) against a whole panel (`panel`, 32 columns of bf16 pairs a
/// pair of inputs) into `sums` (per row, four vectors of 8 columns): the AVX2 tile's FMAs for 3 rows and 4
/// vectors, in its order (each sum the even input, then the odd one), so the same bits.
///
/// Written as assembly because the 12 sums, the three rows' broadcasts and a widened weight vector take all
/// 16 registers: compiled from intrinsics, the loop spilled sums on every step, and with the weights
/// reloaded for each row the compiler merged the loads and spilled again.
///
/// # Safety
/// The CPU has AVX2 and FMA. Each row holds `2 * pairs` f32 and the panel `pairs` x 32 pairs.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn three_rows_whole_panel(
    sums: &mut [[std::arch::x86_64::__m256; 4]; 3],
    rows: [*const f32; 3],
    panel: *const u32,
    pairs: usize,
) {
    if pairs == 0 {
        return;
    }
    let [s0, s1, s2] = sums;
    #[rustfmt::skip]
    // Weight vector `$v` of 8 columns, widened by `$widen`, times the broadcasts into sums `$s0`, `$s1`, `$s2`.
    macro_rules! vector {
        ($v:literal, $widen:literal, $s0:literal, $s1:literal, $s2:literal) => {
            concat!(
                "vmovdqu ymm15, ymmword ptr [{w} + 32 * ", $v, "]\n",
                $widen,
                "vfmadd231ps ymm", $s0, ", ymm12, ymm15\n",
                "vfmadd231ps ymm", $s1, ", ymm13, ymm15\n",
                "vfmadd231ps ymm", $s2, ", ymm14, ymm15\n",
            )
        };
    }
    #[rustfmt::skip]
    // Input `$t` of the pair (0: 2j, 1: 2j + 1): each row's value broadcast, each weight vector widened by
    // `$widen` (the pairs' low halves shifted up, or their high halves with the low ones cleared).
    macro_rules! input {
        ($t:literal, $widen:literal) => {
            concat!(
                "vbroadcastss ymm12, dword ptr [{x0} + 4 * ", $t, "]\n",
                "vbroadcastss ymm13, dword ptr [{x1} + 4 * ", $t, "]\n",
                "vbroadcastss ymm14, dword ptr [{x2} + 4 * ", $t, "]\n",
                vector!(0, $widen, 0, 4, 8),
                vector!(1, $widen, 1, 5, 9),
                vector!(2, $widen, 2, 6, 10),
                vector!(3, $widen, 3, 7, 11),
            )
        };
    }
    std::arch::asm!(
        "2:",
        input!(0, "vpslld ymm15, ymm15, 16\n"),
        input!(1, "vpsrld ymm15, ymm15, 16\nvpslld ymm15, ymm15, 16\n"),
        "add {x0}, 8",
        "add {x1}, 8",
        "add {x2}, 8",
        "add {w}, 128",
        "dec {n}",
        "jnz 2b",
        x0 = inout(reg) rows[0] => _,
        x1 = inout(reg) rows[1] => _,
        x2 = inout(reg) rows[2] => _,
        w = inout(reg) panel => _,
        n = inout(reg) pairs => _,
        inout("ymm0") s0[0],
        inout("ymm1") s0[1],
        inout("ymm2") s0[2],
        inout("ymm3") s0[3],
        inout("ymm4") s1[0],
        inout("ymm5") s1[1],
        inout("ymm6") s1[2],
        inout("ymm7") s1[3],
        inout("ymm8") s2[0],
        inout("ymm9") s2[1],
        inout("ymm10") s2[2],
        inout("ymm11") s2[3],
        out("ymm12") _,
        out("ymm13") _,
        out("ymm14") _,
        out("ymm15") _,
        options(nostack, readonly),
    );
}

#[cfg(target_arch = "aarch64")]
impl PanelTile<'_, u32> {
    /// The AVX2 tile's arithmetic ([`Self::tile_avx2`]) with NEON: `R` (1 to [`NEON_TILE_ROWS`]) rows of `a`
    /// (widened to f32) against each half of the panel in turn.
    ///
    /// # Safety
    /// `dst` addresses `R` output rows of `self.n` values from this panel's first column.
    unsafe fn tile_neon<const R: usize>(&self, a: &[f32], dst: *mut bf16) {
        use std::arch::aarch64::*;
        let k = self.k;
        let rows: [*const f32; R] = std::array::from_fn(|r| a.as_ptr().add(r * k));
        let high = vdupq_n_u32(0xFFFF_0000);
        // Input `t` of every row times its weights for the half's 16 columns, added to the sums.
        let add = |sums: &mut [[float32x4_t; 4]; R], t: usize, w: [float32x4_t; 4]| {
            for (r, sums) in sums.iter_mut().enumerate() {
                let x = vdupq_n_f32(*rows[r].add(t));
                for (sum, &w) in sums.iter_mut().zip(&w) {
                    *sum = vfmaq_f32(*sum, x, w);
                }
            }
        };
        for half in (0..PANEL).step_by(16).take_while(|&half| half < self.cols) {
            let panel = self.panel.as_ptr().add(half);
            let bias = self.bias.as_ptr().add(half);
            let mut sums: [[float32x4_t; 4]; R] =
                [std::array::from_fn(|v| vld1q_f32(bias.add(4 * v))); R];
            // Pair j's 16 lanes: the even inputs' weights (low halves, shifted up) and the odd ones'.
            let pairs = |j: usize| -> [uint32x4_t; 4] {
                std::array::from_fn(|v| vld1q_u32(panel.add(j * PANEL + 4 * v)))
            };
            let even =
                |pairs: [uint32x4_t; 4]| pairs.map(|p| vreinterpretq_f32_u32(vshlq_n_u32::<16>(p)));
            let odd =
                |pairs: [uint32x4_t; 4]| pairs.map(|p| vreinterpretq_f32_u32(vandq_u32(p, high)));
            for j in 0..k / 2 {
                let pairs = pairs(j);
                add(&mut sums, 2 * j, even(pairs));
                add(&mut sums, 2 * j + 1, odd(pairs));
            }
            if k % 2 == 1 {
                // The last pair holds one input.
                add(&mut sums, k - 1, even(pairs(k / 2)));
            }
            for (r, sums) in sums.iter().enumerate() {
                let row = dst.add(r * self.n + half);
                for (v, &sum) in sums.iter().enumerate() {
                    let valid = self.cols.saturating_sub(half + 4 * v).min(4);
                    super::storage::store_first4(sum, row.add(4 * v), valid);
                }
            }
        }
    }
}

#[cfg(all(test, any(target_arch = "x86_64", target_arch = "aarch64")))]
mod tests {
    use super::*;

    /// The product in f64 from the same bf16 values.
    fn reference(x: &[bf16], m: usize, k: usize, w: &[bf16], n: usize, bias: &[bf16]) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|t| x[i * k + t].to_f64() * w[j * k + t].to_f64())
                    .sum();
                out[i * n + j] = dot + bias[j].to_f64();
            }
        }
        out
    }

    fn values(len: usize, seed: u32) -> Vec<bf16> {
        let spread = crate::kernels::cpu::test_values::spread(len, seed);
        spread.into_iter().map(bf16::from_f32).collect()
    }

    /// The product by each tile this CPU runs, with its name; `f32` whether the tile computes in f32 (AVX2's,
    /// NEON's) rather than by `vdpbf16ps` or the tile unit.
    // The pushes are per architecture: on aarch64 its one tile's is the only one.
    #[cfg_attr(target_arch = "aarch64", allow(clippy::vec_init_then_push))]
    fn by_each_tile(
        (x, m): (&[bf16], usize),
        w: &Packed,
        bias: &[bf16],
    ) -> Vec<(&'static str, bool, Vec<bf16>)> {
        let mut products = vec![];
        #[cfg(target_arch = "x86_64")]
        {
            if available() {
                let product = linear_on(Width::Avx2, x, m, w, bias, Epilogue::None);
                products.push(("avx2", true, product));
            }
            if crate::kernels::cpu::features::has_avx512_bf16() {
                let product = linear_on(Width::Avx512, x, m, w, bias, Epilogue::None);
                products.push(("avx512", false, product));
            }
        }
        #[cfg(target_arch = "aarch64")]
        products.push(("neon", true, linear_packed(x, m, w, bias, Epilogue::None)));
        if products.is_empty() {
            eprintln!("skipped: this CPU tier runs no tile (it needs AVX2 and FMA)");
        }
        products
    }

    /// The f32 tiles' arithmetic, written out: from the bias, one f32 FMA per input in order, rounded once.
    #[test]
    fn f32_tiles_are_fmas_in_order_rounded_once() {
        let shapes = crate::kernels::cpu::test_values::SHAPES.into_iter().chain([
            (11, 5, 20),
            (6, 64, 40),
            (7, 3, 5),
        ]);
        for (m, k, n) in shapes {
            let (x, w, bias) = (values(m * k, 4), values(n * k, 5), values(n, 6));
            let packed = Packed::new(&w, n, k);
            let f32_tiles = by_each_tile((&x, m), &packed, &bias)
                .into_iter()
                .filter(|(_, f32, _)| *f32);
            for (tile, _, got) in f32_tiles {
                for i in 0..m {
                    for c in 0..n {
                        let sum = (0..k).fold(bias[c].to_f32(), |sum, t| {
                            x[i * k + t].to_f32().mul_add(w[c * k + t].to_f32(), sum)
                        });
                        let (g, want) = (got[i * n + c], bf16::from_f32(sum));
                        assert_eq!(
                            g.to_bits(),
                            want.to_bits(),
                            "{tile} {m}x{k}x{n} at ({i}, {c})"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn matches_the_exact_product() {
        // Few and many rows; odd k; partial panels and row tiles; more than one row block and panel group;
        // and for the tile unit, where it runs: whole blocks of 32 rows only, several row blocks with a
        // partial panel, one block of the smallest k, and blocks of fewer rows (the fewest it takes, 16 or
        // fewer, more than 16) after whole ones or alone.
        let tile_shapes = [
            (640, 256, 100),
            (32, 32, 33),
            (97, 64, 64),
            (3, 64, 40),
            (7, 32, 33),
            (50, 96, 70),
            (17, 128, 64),
        ];
        if super::super::amx::available() {
            eprintln!("the tile unit runs the shapes with k a multiple of 32 and 3 rows or more");
        }
        for (m, k, n) in crate::kernels::cpu::test_values::SHAPES
            .into_iter()
            .chain(tile_shapes)
        {
            let (x, w, bias) = (values(m * k, 1), values(n * k, 2), values(n, 3));
            let want = reference(&x, m, k, &w, n, &bias);
            let packed = Packed::new(&w, n, k);
            for (tile, _, got) in by_each_tile((&x, m), &packed, &bias) {
                for (idx, (g, e)) in got.iter().zip(&want).enumerate() {
                    // f32 sums of exact bf16 products, rounded once to bf16 (2^-8 relative) and a little
                    // accumulation error on top.
                    let tol = e.abs() / 128.0 + 1e-3 * (k as f64).sqrt();
                    assert!(
                        (g.to_f64() - e).abs() <= tol,
                        "{tile} {m}x{k}x{n} at {idx}: {} vs {e}",
                        g.to_f64()
                    );
                }
            }
        }
    }
}
