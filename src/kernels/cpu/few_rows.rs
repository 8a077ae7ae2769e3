//! `x @ wᵀ` for an `x` of a few rows, with f32 `w` as stored: on CPUs whose linear layers are not packed at load
//! (no AVX-512), the decoder's linear layers and LM head during generation, where `x` holds one row per beam. A
//! general GEMM packs (copies) `w` before multiplying, which for a handful of rows costs more than the product
//! itself. Here each weight row is read once, straight from where it lies, against all rows of `x` (held in
//! L1), so the product runs at the speed memory delivers the weights (measured in benches/kernels.rs).
//!
//! x86-64 with AVX2 + FMA only (detected at run time); elsewhere [`matmul_t`] answers `None` and the caller
//! uses candle's matmul.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::features::has_avx2_fma;
use super::storage::contiguous_f32;

/// Up to this many rows of `x` reading the weights in place beats a packing GEMM on the decoder's shapes (one
/// row per beam, a handful of beams; docs/performance.md).
pub const MAX_ROWS: usize = 8;

/// Weight rows per parallel task: 32 rows of 768-4096 values keep a task inside L2.
const WEIGHT_ROWS_PER_TASK: usize = 32;

/// The most rows of `x` a register tile of the few-row kernels holds.
#[cfg(target_arch = "x86_64")]
const ROW_TILE: usize = 4;

/// The register tiles over `m` rows of `x`, as (first row, rows): at most [`ROW_TILE`] rows each, balanced
/// (6 rows: 3 + 3), so that no tile is left with a single row while another has four.
#[cfg(target_arch = "x86_64")]
fn row_tiles(m: usize) -> impl Iterator<Item = (usize, usize)> {
    let tiles = m.div_ceil(ROW_TILE);
    (0..tiles).scan(0, move |first, tile| {
        let size = (m - *first).div_ceil(tiles - tile);
        let at = *first;
        *first += size;
        Some((at, size))
    })
}

/// `x @ wᵀ` for `x` `[..., K]` with 1 to [`MAX_ROWS`] rows and `w` `[N, K]`, both f32 on the CPU; `None`
/// when the kernel does not apply (other dtype or device, no rows or more, no AVX2 + FMA).
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    if !applies(x, w)? {
        return Ok(None);
    }
    let (n, k) = w.dims2()?;
    let rows = x.elem_count() / k;
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("x has a last dim") = n;
    let x2 = x.reshape((rows, k))?.contiguous()?;
    let out = x2.apply_op2_no_bwd(&w.contiguous()?, &FewRowsMatmulT)?;
    Ok(Some(out.reshape(out_dims)?))
}

fn applies(x: &Tensor, w: &Tensor) -> Result<bool> {
    let Some(&k) = x.dims().last() else {
        return Ok(false);
    };
    Ok(has_avx2_fma()
        && x.device().is_cpu()
        && w.device().is_cpu()
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && w.rank() == 2
        && w.dim(1)? == k
        && k > 0
        && (1..=MAX_ROWS).contains(&(x.elem_count() / k)))
}

/// `[M, K] x [N, K] → [M, N]`, both contiguous.
struct FewRowsMatmulT;

impl CustomOp2 for FewRowsMatmulT {
    fn name(&self) -> &'static str {
        "few-rows-matmul-t"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(x, x_layout, self.name())?;
        let w = contiguous_f32(w, w_layout, self.name())?;
        let (m, k) = x_layout.shape().dims2()?;
        let (n, _) = w_layout.shape().dims2()?;
        let out = run(x, m, k, w, n);
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

/// The product, row-major `[m, n]`. Each task fills a block of `[n, m]` (its weight rows' outputs, contiguous);
/// the block is transposed at the end, which for a few rows costs next to nothing.
fn run(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    let mut out_t = vec![0f32; n * m];
    out_t
        .par_chunks_mut(WEIGHT_ROWS_PER_TASK * m)
        .zip(w.par_chunks(WEIGHT_ROWS_PER_TASK * k))
        .for_each(|(out, w)| {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `applies` checked that the CPU has AVX2 and FMA; the slices hold `m` rows of `x` and
            // `out.len() / m` rows of `w`, `k` floats each.
            unsafe {
                x86::dots(x, m, k, w, out)
            }
            // `applies` asks for AVX2 + FMA, which no other target has.
            #[cfg(not(target_arch = "x86_64"))]
            unreachable!(
                "few_rows::run without AVX2 + FMA ({} inputs, {} weights, {} outputs)",
                x.len(),
                w.len(),
                out.len()
            )
        });
    let mut out = vec![0f32; m * n];
    for (j, row) in out_t.chunks_exact(m).enumerate() {
        for (i, &v) in row.iter().enumerate() {
            out[i * n + j] = v;
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// `out[r * m + i] = x[i] · w[r]` for every row `r` of `w` and `i < m`.
    ///
    /// `x` is taken in the tiles of [`super::row_tiles`]; each tile streams the weight rows
    /// in groups sized so that the accumulators (tile rows x weight rows, 8 floats each) fit the 16 AVX
    /// registers beside the loads.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `x` holds `m` rows of `k` values, `w` whole rows of `k`, and `out` `m`
    /// values per row of `w`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dots(x: &[f32], m: usize, k: usize, w: &[f32], out: &mut [f32]) {
        let rows = w.len() / k;
        let (x, w, out) = (x.as_ptr(), w.as_ptr(), out.as_mut_ptr());
        for (first, size) in super::row_tiles(m) {
            let at = Tile {
                x,
                first,
                m,
                k,
                w,
                out,
            };
            match size {
                1 => at.all_rows::<1, 8>(rows),
                2 => at.all_rows::<2, 4>(rows),
                3 => at.all_rows::<3, 4>(rows),
                _ => at.all_rows::<4, 3>(rows),
            }
        }
    }

    /// Rows `first..first + MR` of `x` against the weight rows.
    struct Tile {
        x: *const f32,
        first: usize,
        m: usize,
        k: usize,
        w: *const f32,
        out: *mut f32,
    }

    impl Tile {
        /// The tile's `MR` rows of `x` against weight rows `0..rows`, `NR` at a time.
        ///
        /// # Safety
        /// The pointers address the operands [`dots`] was given, `first + MR <= m`, `rows` at most the rows
        /// of `w`; called only from a function compiled with AVX2 and FMA.
        #[inline(always)]
        unsafe fn all_rows<const MR: usize, const NR: usize>(&self, rows: usize) {
            let mut r = 0;
            while r + NR <= rows {
                self.block::<MR, NR>(r);
                r += NR;
            }
            while r < rows {
                self.block::<MR, 1>(r);
                r += 1;
            }
        }

        /// Weight rows `r0..r0 + NR` against the tile's `MR` rows of `x`.
        ///
        /// # Safety
        /// As [`Self::all_rows`], with `r0 + NR <= rows`.
        #[inline(always)]
        unsafe fn block<const MR: usize, const NR: usize>(&self, r0: usize) {
            let k = self.k;
            let whole = k / 8 * 8;
            let xs: [*const f32; MR] = std::array::from_fn(|i| self.x.add((self.first + i) * k));
            let ws: [*const f32; NR] = std::array::from_fn(|r| self.w.add((r0 + r) * k));
            let mut acc = [[_mm256_setzero_ps(); MR]; NR];
            let mut at = 0;
            while at < whole {
                let xv: [__m256; MR] = std::array::from_fn(|i| _mm256_loadu_ps(xs[i].add(at)));
                for r in 0..NR {
                    let wv = _mm256_loadu_ps(ws[r].add(at));
                    for i in 0..MR {
                        acc[r][i] = _mm256_fmadd_ps(wv, xv[i], acc[r][i]);
                    }
                }
                at += 8;
            }
            for r in 0..NR {
                for i in 0..MR {
                    let mut sum = horizontal_sum(acc[r][i]);
                    for t in whole..k {
                        sum += *ws[r].add(t) * *xs[i].add(t);
                    }
                    *self.out.add((r0 + r) * self.m + self.first + i) = sum;
                }
            }
        }
    }

    /// The sum of the 8 lanes of `v`.
    ///
    /// # Safety
    /// Called only from a function compiled with AVX2.
    #[inline(always)]
    unsafe fn horizontal_sum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn row_tiles_cover_the_rows_in_balanced_tiles() {
        for m in 1..=3 * MAX_ROWS {
            let tiles: Vec<_> = row_tiles(m).collect();
            let mut next = 0;
            for &(first, size) in &tiles {
                assert_eq!(first, next, "{m} rows: {tiles:?}");
                assert!((1..=ROW_TILE).contains(&size), "{m} rows: {tiles:?}");
                next += size;
            }
            assert_eq!(next, m, "{m} rows: {tiles:?}");
            assert_eq!(tiles.len(), m.div_ceil(ROW_TILE), "{m} rows: {tiles:?}");
            let sizes = tiles.iter().map(|t| t.1);
            let spread = sizes.clone().max().unwrap() - sizes.min().unwrap();
            assert!(spread <= 1, "{m} rows: {tiles:?}");
        }
    }

    #[test]
    fn matches_candle_matmul() {
        if !has_avx2_fma() {
            return;
        }
        let dev = Device::Cpu;
        // Row counts hit every tile size; K with and without a tail of fewer than 8; N with a partial
        // group and a partial task.
        for (m, k, n) in [
            (1, 16, 9),
            (2, 20, 33),
            (3, 768, 77),
            (5, 13, 70),
            (6, 64, 40),
            (8, 100, 65),
        ] {
            let x = Tensor::randn(0f32, 1., (m, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1., (n, k), &dev).unwrap();
            let expected: Vec<Vec<f32>> = x.matmul(&w.t().unwrap()).unwrap().to_vec2().unwrap();
            let got: Vec<Vec<f32>> = matmul_t(&x, &w).unwrap().unwrap().to_vec2().unwrap();
            for (e, g) in expected.iter().flatten().zip(got.iter().flatten()) {
                assert!(
                    (e - g).abs() <= 1e-4 * (1.0 + e.abs()),
                    "{m}x{k}x{n}: {g} vs {e}"
                );
            }
        }
    }

    #[test]
    fn keeps_leading_dims_and_declines_what_it_does_not_cover() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (5, 8), &dev).unwrap();
        let x = Tensor::randn(0f32, 1., (3, 1, 8), &dev).unwrap();
        if has_avx2_fma() {
            let out = matmul_t(&x, &w).unwrap().unwrap();
            assert_eq!(out.dims(), &[3, 1, 5]);
        }
        let many = Tensor::randn(0f32, 1., (MAX_ROWS + 1, 8), &dev).unwrap();
        assert!(matmul_t(&many, &w).unwrap().is_none());
        let empty = Tensor::zeros((0, 8), DType::F32, &dev).unwrap();
        assert!(matmul_t(&empty, &w).unwrap().is_none());
        let bf16 = x.to_dtype(DType::BF16).unwrap();
        assert!(matmul_t(&bf16, &w.to_dtype(DType::BF16).unwrap())
            .unwrap()
            .is_none());
    }
}
