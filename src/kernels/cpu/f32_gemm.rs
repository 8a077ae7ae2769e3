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
//! x86-64 with AVX-512 F/BW/VL, detected at run time, at the AVX-512 tier ([`super::features::cpu_tier`]);
//! [`available`] is false elsewhere and the caller keeps the gemm crate.

use super::panels::Epilogue;
use super::panels::PANEL;
#[cfg(target_arch = "x86_64")]
use super::panels::{by_rows, run_tiles, PanelTile, Panels};
#[cfg(target_arch = "x86_64")]
use super::parallel::TaskPtr;

/// Rows in a register tile: 2 x 12 accumulators, two weight vectors and the broadcast fill 27 of the 32
/// AVX-512 registers.
#[cfg(target_arch = "x86_64")]
const TILE_ROWS: usize = 12;
#[cfg(target_arch = "x86_64")]
const _: () = assert!(TILE_ROWS <= super::panels::MAX_TILE_ROWS);

/// Whether the kernel runs here ([`super::features::has_avx512`]).
pub fn available() -> bool {
    super::features::has_avx512()
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
// Off x86-64 `available()` is false: the function only panics and its kernel arguments go unread.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
pub fn linear(x: &[f32], m: usize, w: &Packed, bias: &[f32], epilogue: Epilogue) -> Vec<f32> {
    assert!(available(), "f32_gemm::linear needs AVX-512");
    assert!(m > 0 && x.len() == m * w.k && bias.len() == w.n);
    let n = w.n;
    let mut out = Vec::with_capacity(m * n);
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `out` has room for m x n values and lives past the kernel, whose tasks write disjoint
        // outputs.
        let dst = unsafe { TaskPtr::new(out.spare_capacity_mut().as_mut_ptr().cast::<f32>()) };
        let weights = Panels {
            data: &w.panels,
            panel_len: w.k * PANEL,
            n,
            k: w.k,
        };
        run_tiles(
            x,
            m,
            weights,
            bias,
            (dst, epilogue),
            TILE_ROWS,
            |tile, a, size, dst| {
                // SAFETY: `available` checked the CPU; `run_tiles` hands each tile its rows and outputs.
                unsafe { by_rows!(size.min(TILE_ROWS), |R| tile.tile::<R>(a, dst)) }
            },
        );
    }
    // SAFETY: the kernel writes each of the m x n outputs.
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
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::kernels::cpu::test_values::spread as values;

    #[test]
    fn matches_the_exact_product() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        // Few and many rows; partial panels and row tiles; more than one row block and panel group.
        for (m, k, n) in crate::kernels::cpu::test_values::SHAPES {
            let (x, w, bias) = (values(m * k, 1), values(n * k, 2), values(n, 3));
            let got = linear(&x, m, &Packed::new(&w, n, k), &bias, Epilogue::None);
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
                        "{m}x{k}x{n} at ({i}, {c}): {g} vs {want}"
                    );
                }
            }
        }
    }
}
