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
//! x86-64 with AVX-512 F/BW/VL and BF16, detected at run time, at the AVX-512 tier ([`super::features::cpu_tier`]);
//! [`available`] is false elsewhere and the caller keeps candle's matmul.

use half::bf16;

use super::panels::Epilogue;
use super::panels::PANEL;
#[cfg(target_arch = "x86_64")]
use super::panels::{by_rows, run_tiles, PanelTile, Panels};
#[cfg(target_arch = "x86_64")]
use super::parallel::TaskPtr;

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

/// Whether the kernels run here ([`super::features::has_avx512_bf16`]).
pub fn available() -> bool {
    super::features::has_avx512_bf16()
}

/// `epilogue(x[m, k] @ wᵀ + bias[n])` with weights packed beforehand (a model's layers pack theirs once, at
/// load), row-major `[m, n]`; any `m` from 1.
///
/// # Panics
/// If [`available`] is false, or the slices do not hold the shapes given.
// Off x86-64 `available()` is false: the function only panics and its kernel arguments go unread.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
pub fn linear_packed(
    x: &[bf16],
    m: usize,
    w: &Packed,
    bias: &[bf16],
    epilogue: Epilogue,
) -> Vec<bf16> {
    assert!(available(), "bf16_gemm::linear_packed needs AVX512-BF16");
    assert!(m > 0 && x.len() == m * w.k && bias.len() == w.n);
    let mut out = Vec::with_capacity(m * w.n);
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `out` has room for m x n values and lives past the kernel, whose tasks write disjoint
        // outputs.
        let dst = unsafe { TaskPtr::new(out.spare_capacity_mut().as_mut_ptr().cast::<bf16>()) };
        panels(x, m, w, bias, (dst, epilogue));
    }
    // SAFETY: the kernel writes each of the m x n outputs.
    unsafe { out.set_len(m * w.n) };
    out
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

/// The many-row kernel: `x[m, k]` against packed weights; on the tile unit ([`super::amx`]) where it runs
/// and `k` fits it, else here.
#[cfg(target_arch = "x86_64")]
fn panels(
    x: &[bf16],
    m: usize,
    packed: &Packed,
    bias: &[bf16],
    (out, epilogue): (TaskPtr<bf16>, Epilogue),
) {
    let (n, k) = packed.dims();
    let bias: Vec<f32> = bias.iter().map(|b| b.to_f32()).collect();
    #[cfg(target_os = "linux")]
    {
        use super::amx;
        if k % amx::K_STEP == 0 && m >= TILE_UNIT_MIN_ROWS && amx::available() {
            amx::linear(x, (m, k, n), &packed.panels, &bias, (out, epilogue));
            return;
        }
    }
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
        &bias,
        (out, epilogue),
        TILE_ROWS,
        |tile, a, size, dst| {
            // SAFETY: `available` checked the CPU; `run_tiles` hands each tile its rows and outputs.
            unsafe { by_rows!(size.min(TILE_ROWS), |R| tile.tile::<R>(a, dst)) }
        },
    );
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
}

#[cfg(test)]
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

    #[test]
    fn matches_the_exact_product() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
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
            let packed = linear_packed(&x, m, &Packed::new(&w, n, k), &bias, Epilogue::None);
            for (idx, (g, e)) in packed.iter().zip(&want).enumerate() {
                // f32 sums of exact bf16 products, rounded once to bf16 (2^-8 relative) and a little
                // accumulation error on top.
                let tol = e.abs() / 128.0 + 1e-3 * (k as f64).sqrt();
                assert!(
                    (g.to_f64() - e).abs() <= tol,
                    "{m}x{k}x{n} at {idx}: {} vs {e}",
                    g.to_f64()
                );
            }
        }
    }
}
