//! `x @ wᵀ + b` in f32 on the CPU with AVX-512, over weights packed once at load.
//!
//! The gemm crate, which [`super::gemm::linear`] calls for weights as stored, packs the weights at every call
//! and splits `k` into blocks: on the vision tower's first stage (`k` = 128, tens of thousands of rows) that
//! leaves it at a fraction of the FMA rate, and on every layer the packing is a pass over the whole weight.
//! Here the weights are laid out once ([`Packed`]: panels of 32 output columns, one 128-byte line of the
//! panel per input) and each tile of up to [`TILE_ROWS`] rows x 32 columns is summed over the whole of `k` in
//! registers, starting from the bias, each value of a row of `x` broadcast to 16 lanes: the structure of
//! [`super::bf16_gemm`] with f32 FMAs. Each output is `b + Σ_t x[t] w[t]` summed in order of `t`.
//!
//! With AVX2 + FMA and no AVX-512 (or a lower [`super::features::cpu_tier`]) the same panels go to a tile of up
//! to [`AVX2_TILE_ROWS`] rows x 16 columns, two passes a panel (16 AVX registers hold a tile's sums, two
//! weight vectors and the broadcast), or, for up to [`AVX2_WHOLE_PANEL_ROWS`] rows, x 32 columns in one pass:
//! the same FMAs in the same order, so the same bits as the AVX-512 tile.
//!
//! On aarch64 a NEON tile of up to [`NEON_TILE_ROWS`] rows x 16 columns takes the same panels, two passes a
//! panel, with the same FMAs in the same order: the same bits as on x86-64.
//!
//! x86-64 with AVX2 and FMA, detected at run time, and every aarch64 CPU (NEON is its baseline); [`available`]
//! is false elsewhere and the caller keeps the gemm crate.

use super::panels::Epilogue;
use super::panels::PANEL;
#[cfg(target_arch = "x86_64")]
use super::panels::{avx2_bias_sums, avx2_passes, avx2_vectors, Width};
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use super::panels::{by_rows, run_tiles, PanelTile, Panels};
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use super::parallel::TaskPtr;

/// Rows in a register tile: 2 x 12 accumulators, two weight vectors and the broadcast fill 27 of the 32
/// AVX-512 registers.
#[cfg(target_arch = "x86_64")]
const TILE_ROWS: usize = 12;
#[cfg(target_arch = "x86_64")]
const _: () = assert!(TILE_ROWS <= super::panels::MAX_TILE_ROWS);

/// Rows in a register tile of the AVX2 kernel: 2 x 6 accumulators of 8 lanes, two weight vectors and the
/// broadcast fill 15 of the 16 AVX registers.
#[cfg(target_arch = "x86_64")]
const AVX2_TILE_ROWS: usize = 6;

/// The most rows an AVX2 tile sums against the whole panel at once ([`avx2_vectors`]): 3 x 4 accumulators
/// and the three rows' broadcasts, with each weight vector loaded as it is used, fill the 16 registers.
#[cfg(target_arch = "x86_64")]
const AVX2_WHOLE_PANEL_ROWS: usize = 3;

/// Rows in a register tile of the NEON kernel: 4 x 6 accumulators of 4 lanes, four weight vectors and the
/// broadcast take 29 of the 32 vector registers.
#[cfg(target_arch = "aarch64")]
const NEON_TILE_ROWS: usize = 6;

/// Whether the kernel runs here: x86-64 with [`super::features::has_avx2_fma`], and aarch64.
pub fn available() -> bool {
    cfg!(target_arch = "aarch64") || super::features::has_avx2_fma()
}

/// Weights `w[n, k]` laid out for the kernel: for panel `p` and input `t`, 32 values, lane `c` holding
/// `w[32p + c][t]`; columns past `n` are zero.
pub struct Packed {
    panels: Vec<f32>,
    n: usize,
    k: usize,
}

impl Packed {
    /// Packs row-major `w` of `n` rows and `k` columns (both at least 1).
    ///
    /// # Panics
    /// If `w` does not hold `n` x `k` values or either is zero.
    pub fn new(w: &[f32], n: usize, k: usize) -> Self {
        use rayon::prelude::*;
        assert!(n > 0 && k > 0 && w.len() == n * k);
        let mut panels = vec![0f32; n.div_ceil(PANEL) * k * PANEL];
        panels
            .par_chunks_mut(k * PANEL)
            .enumerate()
            .for_each(|(p, panel)| {
                for c in 0..PANEL.min(n - p * PANEL) {
                    for (t, &v) in w[(p * PANEL + c) * k..][..k].iter().enumerate() {
                        panel[t * PANEL + c] = v;
                    }
                }
            });
        Self { panels, n, k }
    }

    /// `(n, k)`: output and input features.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Row `c` of `w` (`k` values) into `out`: a tied token embedding's lookup.
    pub fn row(&self, c: usize, out: &mut [f32]) {
        assert!(c < self.n && out.len() == self.k);
        let panel = &self.panels[c / PANEL * self.k * PANEL..][..self.k * PANEL];
        for (out, values) in out.iter_mut().zip(panel.chunks_exact(PANEL)) {
            *out = values[c % PANEL];
        }
    }
}

/// `epilogue(x[m, k] @ wᵀ + bias[n])`, row-major `[m, n]`; `m` at least 1.
///
/// # Panics
/// If [`available`] is false, or the slices do not hold the shapes given.
// Where `available()` is false the function only panics and its kernel arguments go unread.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(unused_variables)
)]
pub fn linear(x: &[f32], m: usize, w: &Packed, bias: &[f32], epilogue: Epilogue) -> Vec<f32> {
    assert!(available(), "f32_gemm::linear needs AVX2 and FMA");
    #[cfg(target_arch = "x86_64")]
    return linear_on(
        Width::widest(super::features::has_avx512()),
        x,
        m,
        w,
        bias,
        epilogue,
    );
    #[cfg(target_arch = "aarch64")]
    return run(
        (x, m, w, bias, epilogue),
        NEON_TILE_ROWS,
        |tile, a, size, dst| {
            // SAFETY: `run_tiles` hands each tile its rows and outputs.
            unsafe { by_rows!(size.min(NEON_TILE_ROWS), |R| tile.tile_neon::<R>(a, dst)) }
        },
    );
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    unreachable!("available() is false here")
}

/// [`linear`] on the instructions of `width`, which the CPU has.
#[cfg(target_arch = "x86_64")]
fn linear_on(
    width: Width,
    x: &[f32],
    m: usize,
    w: &Packed,
    bias: &[f32],
    epilogue: Epilogue,
) -> Vec<f32> {
    let tile_rows = match width {
        Width::Avx512 => TILE_ROWS,
        Width::Avx2 => AVX2_TILE_ROWS,
    };
    run(
        (x, m, w, bias, epilogue),
        tile_rows,
        |tile, a, size, dst| {
            // SAFETY: the caller checked the CPU's features; `run_tiles` hands each tile its rows and outputs.
            unsafe {
                by_rows!(size.min(tile_rows), |R| match width {
                    Width::Avx512 => tile.tile::<R>(a, dst),
                    Width::Avx2 if avx2_vectors(R, AVX2_WHOLE_PANEL_ROWS) == 4 =>
                        tile.tile_avx2::<R, 4>(a, dst),
                    Width::Avx2 => tile.tile_avx2::<R, 2>(a, dst),
                })
            }
        },
    )
}

/// The product by `tile(panel, rows of x, row count, outputs)` for every register tile of up to `tile_rows`
/// rows ([`run_tiles`]), which writes each of its outputs.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn run(
    (x, m, w, bias, epilogue): (&[f32], usize, &Packed, &[f32], Epilogue),
    tile_rows: usize,
    tile: impl Fn(&PanelTile<f32>, &[f32], usize, *mut f32) + Sync,
) -> Vec<f32> {
    assert!(m > 0 && x.len() == m * w.k && bias.len() == w.n);
    let n = w.n;
    let mut out = Vec::with_capacity(m * n);
    // SAFETY: `out` has room for m x n values and lives past the kernel, whose tasks write disjoint outputs.
    let dst = unsafe { TaskPtr::new(out.spare_capacity_mut().as_mut_ptr().cast::<f32>()) };
    let weights = Panels {
        data: &w.panels,
        panel_len: w.k * PANEL,
        n,
        k: w.k,
    };
    run_tiles(x, m, weights, bias, (dst, epilogue), tile_rows, tile);
    // SAFETY: the tiles write each of the m x n outputs.
    unsafe { out.set_len(m * n) };
    out
}

#[cfg(target_arch = "x86_64")]
impl PanelTile<'_, f32> {
    /// `R` (1 to [`TILE_ROWS`]) rows of `a` against the panel.
    ///
    /// # Safety
    /// The CPU has the features enabled here; `dst` addresses `R` output rows of `self.n` values from this
    /// panel's first column.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn tile<const R: usize>(&self, a: &[f32], dst: *mut f32) {
        use std::arch::x86_64::{
            _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_mask_storeu_ps, _mm512_set1_ps,
        };
        let k = self.k;
        let rows: [*const f32; R] = std::array::from_fn(|r| a.as_ptr().add(r * k));
        let panel = self.panel.as_ptr();
        let mut lo = [_mm512_loadu_ps(self.bias.as_ptr()); R];
        let mut hi = [_mm512_loadu_ps(self.bias.as_ptr().add(16)); R];
        for t in 0..k {
            let w_lo = _mm512_loadu_ps(panel.add(t * PANEL));
            let w_hi = _mm512_loadu_ps(panel.add(t * PANEL + 16));
            for r in 0..R {
                let x = _mm512_set1_ps(*rows[r].add(t));
                lo[r] = _mm512_fmadd_ps(x, w_lo, lo[r]);
                hi[r] = _mm512_fmadd_ps(x, w_hi, hi[r]);
            }
        }
        let lanes = |from: usize| ((1u32 << self.cols.saturating_sub(from).min(16)) - 1) as u16;
        for r in 0..R {
            let row = dst.add(r * self.n);
            _mm512_mask_storeu_ps(row, lanes(0), lo[r]);
            _mm512_mask_storeu_ps(row.add(16), lanes(16), hi[r]);
        }
    }

    /// [`Self::tile`] on AVX2: `R` (1 to [`AVX2_TILE_ROWS`]) rows of `a` against `V` vectors of 8 columns
    /// of the panel at a time ([`avx2_vectors`]).
    ///
    /// # Safety
    /// As [`Self::tile`], with AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    // The loops index the sums by row and by vector, in the order the FMAs run.
    #[allow(clippy::needless_range_loop)]
    unsafe fn tile_avx2<const R: usize, const V: usize>(&self, a: &[f32], dst: *mut f32) {
        use std::arch::x86_64::*;
        let k = self.k;
        let rows: [*const f32; R] = std::array::from_fn(|r| a.as_ptr().add(r * k));
        for part in avx2_passes::<V>(self.cols) {
            let panel = self.panel.as_ptr().add(part);
            let mut sums = avx2_bias_sums::<R, V>(self.bias.as_ptr().add(part));
            for t in 0..k {
                let w = |v: usize| _mm256_loadu_ps(panel.add(t * PANEL + 8 * v));
                let x = |r: usize| _mm256_broadcast_ss(&*rows[r].add(t));
                // The sums take R x V registers; of the other operands, hold whichever are fewer: the rows'
                // broadcasts (each weight vector loaded as it is used) or the weight vectors (each row
                // broadcast as it is used).
                if R <= V {
                    for v in 0..V {
                        let w = w(v);
                        for r in 0..R {
                            sums[r][v] = _mm256_fmadd_ps(x(r), w, sums[r][v]);
                        }
                    }
                } else {
                    let w: [__m256; V] = std::array::from_fn(w);
                    for r in 0..R {
                        let x = x(r);
                        for v in 0..V {
                            sums[r][v] = _mm256_fmadd_ps(x, w[v], sums[r][v]);
                        }
                    }
                }
            }
            let masks: [__m256i; V] = std::array::from_fn(|v| lanes8(self.cols, part + 8 * v));
            for (r, sums) in sums.iter().enumerate() {
                let row = dst.add(r * self.n + part);
                for (v, &sums) in sums.iter().enumerate() {
                    _mm256_maskstore_ps(row.add(8 * v), masks[v], sums);
                }
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
impl PanelTile<'_, f32> {
    /// `R` (1 to [`NEON_TILE_ROWS`]) rows of `a` against each half of the panel in turn, as
    /// [`Self::tile_avx2`] with 4 vectors of 4 for each 8 x 2.
    ///
    /// # Safety
    /// `dst` addresses `R` output rows of `self.n` values from this panel's first column.
    unsafe fn tile_neon<const R: usize>(&self, a: &[f32], dst: *mut f32) {
        use std::arch::aarch64::*;
        let k = self.k;
        let rows: [*const f32; R] = std::array::from_fn(|r| a.as_ptr().add(r * k));
        for half in (0..PANEL).step_by(16).take_while(|&half| half < self.cols) {
            let panel = self.panel.as_ptr().add(half);
            let bias = self.bias.as_ptr().add(half);
            let mut sums: [[float32x4_t; 4]; R] =
                [std::array::from_fn(|v| vld1q_f32(bias.add(4 * v))); R];
            for t in 0..k {
                let w: [float32x4_t; 4] =
                    std::array::from_fn(|v| vld1q_f32(panel.add(t * PANEL + 4 * v)));
                for r in 0..R {
                    let x = vdupq_n_f32(*rows[r].add(t));
                    for v in 0..4 {
                        sums[r][v] = vfmaq_f32(sums[r][v], x, w[v]);
                    }
                }
            }
            for (r, sums) in sums.iter().enumerate() {
                let row = dst.add(r * self.n + half);
                for (v, &sums) in sums.iter().enumerate() {
                    let valid = self.cols.saturating_sub(half + 4 * v).min(4);
                    super::storage::store_first4(sums, row.add(4 * v), valid);
                }
            }
        }
    }
}

/// The store mask of the 8 columns from `from` of a panel whose first `cols` columns are valid.
///
/// # Safety
/// Called only from functions compiled with AVX2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn lanes8(cols: usize, from: usize) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let valid = cols.saturating_sub(from).min(8) as i32;
    _mm256_cmpgt_epi32(
        _mm256_set1_epi32(valid),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    )
}

#[cfg(all(test, any(target_arch = "x86_64", target_arch = "aarch64")))]
mod tests {
    use super::*;

    use crate::kernels::cpu::test_values::spread as values;

    /// The product by each tile this CPU runs, with its name.
    // The pushes are per architecture: on aarch64 its one tile's is the only one.
    #[cfg_attr(target_arch = "aarch64", allow(clippy::vec_init_then_push))]
    fn by_each_tile(
        (x, m): (&[f32], usize),
        w: &Packed,
        bias: &[f32],
        epilogue: Epilogue,
    ) -> Vec<(&'static str, Vec<f32>)> {
        let mut products = vec![];
        #[cfg(target_arch = "x86_64")]
        {
            if available() {
                products.push(("avx2", linear_on(Width::Avx2, x, m, w, bias, epilogue)));
            }
            if crate::kernels::cpu::features::has_avx512() {
                products.push(("avx512", linear_on(Width::Avx512, x, m, w, bias, epilogue)));
            }
        }
        #[cfg(target_arch = "aarch64")]
        products.push(("neon", linear(x, m, w, bias, epilogue)));
        if products.is_empty() {
            eprintln!("skipped: this CPU tier runs no tile (it needs AVX2 and FMA)");
        }
        products
    }

    #[test]
    fn matches_the_exact_product() {
        // Few and many rows; partial panels and row tiles; more than one row block and panel group.
        for (m, k, n) in crate::kernels::cpu::test_values::SHAPES {
            let (x, w, bias) = (values(m * k, 1), values(n * k, 2), values(n, 3));
            let packed = Packed::new(&w, n, k);
            for (tile, got) in by_each_tile((&x, m), &packed, &bias, Epilogue::None) {
                for i in 0..m {
                    for c in 0..n {
                        let terms = (0..k).map(|t| x[i * k + t] as f64 * w[c * k + t] as f64);
                        let want = bias[c] as f64 + terms.clone().sum::<f64>();
                        // The bound of a sum of k + 1 f32 terms in order: k ulps of the sum of magnitudes.
                        let bound = (k + 1) as f64
                            * f32::EPSILON as f64
                            * (bias[c].abs() as f64 + terms.map(f64::abs).sum::<f64>());
                        let g = got[i * n + c] as f64;
                        assert!(
                            (g - want).abs() <= bound,
                            "{tile} {m}x{k}x{n} at ({i}, {c}): {g} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// Every tile, on every CPU, gives the bits of `b + Σ_t x[t] w[t]` by fused multiply-adds in order of `t`
    /// (then GELU), on shapes with partial quarters and halves of a panel (5, 17, 20 and 40 columns) and tiles
    /// of every row count.
    #[test]
    fn tiles_give_the_bits_of_the_ordered_sum() {
        let shapes = crate::kernels::cpu::test_values::SHAPES.into_iter().chain([
            (13, 20, 17),
            (25, 9, 40),
            (4, 64, 100),
            (7, 3, 5),
        ]);
        for (m, k, n) in shapes {
            // Weights of full 24-bit mantissas, so that the products round.
            let w: Vec<f32> = values(n * k, 5)
                .iter()
                .map(|v| v * std::f32::consts::FRAC_PI_4)
                .collect();
            let (x, bias) = (values(m * k, 4), values(n, 6));
            let packed = Packed::new(&w, n, k);
            for epilogue in [Epilogue::None, Epilogue::Gelu] {
                let want: Vec<u32> = (0..m * n)
                    .map(|at| {
                        let (i, c) = (at / n, at % n);
                        let sum =
                            (0..k).fold(bias[c], |sum, t| x[i * k + t].mul_add(w[c * k + t], sum));
                        match epilogue {
                            Epilogue::None => sum,
                            Epilogue::Gelu => crate::kernels::cpu::math::gelu(sum),
                        }
                        .to_bits()
                    })
                    .collect();
                for (tile, got) in by_each_tile((&x, m), &packed, &bias, epilogue) {
                    let got: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
                    assert_eq!(got, want, "{tile} {m}x{k}x{n} {epilogue:?}");
                }
            }
        }
    }
}
