//! How the packed-weight GEMMs ([`super::f32_gemm`], [`super::bf16_gemm`], [`super::quantized_gemm`]) split `x[m, k] @ wᵀ` into
//! parallel tasks: the weights are packed in panels of [`PANEL`] output columns, a task takes a block of
//! rows of `x` and a group of panels, and the kernel sums each tile of rows x panel over the whole of `k` in
//! registers.

use std::ops::Range;

use super::math::gelu;
use super::storage::Element;

use super::parallel::TaskPtr;

/// Output columns in a panel: two 16-lane vectors.
pub const PANEL: usize = 32;

/// A task's block of rows of `x` is at most this many bytes, so that it stays in L2 while the task's panels
/// pass over it.
const ROW_BLOCK_BYTES: usize = 192 << 10;

/// A row block holds at least this many register tiles, so that each panel read from memory serves several
/// tiles while it sits in L2 (with one tile per block, a large FFN runs at a fraction of the usual rate); and
/// at most twice that.
const MIN_TILES_PER_BLOCK: usize = 8;

/// Calls `tile(rows, panel)` once for every block of rows of an `m`-row `x` (rows of `row_bytes` bytes, in
/// whole register tiles of `tile_rows` rows) and every one of `panels` panels, in parallel; each call writes
/// only its own rows x panel of the output.
pub fn for_each_block(
    m: usize,
    panels: usize,
    row_bytes: usize,
    tile_rows: usize,
    tile: impl Fn(Range<usize>, usize) + Sync,
) {
    use rayon::prelude::*;
    let block_rows = (ROW_BLOCK_BYTES / row_bytes.max(1)).clamp(
        MIN_TILES_PER_BLOCK * tile_rows,
        2 * MIN_TILES_PER_BLOCK * tile_rows,
    ) / tile_rows
        * tile_rows;
    let row_blocks = m.div_ceil(block_rows);
    // Enough tasks for the threads to balance; when there are few row blocks (the encoder's few hundred
    // rows, a decode step's one block) the panels are split too.
    let threads = rayon::current_num_threads();
    let want = 4 * threads;
    let mut panel_groups = want.div_ceil(row_blocks).clamp(1, panels.max(1));
    // Tasks of one size finish together only if each thread gets as many: 9 row blocks on 2 threads leave
    // one thread idle for the last task. Splitting the panels finer (up to twice) evens the count.
    let most = panels.min(2 * panel_groups);
    while !(row_blocks * panel_groups).is_multiple_of(threads) && panel_groups < most {
        panel_groups += 1;
    }
    let group_panels = panels.div_ceil(panel_groups);
    (0..row_blocks * panel_groups)
        .into_par_iter()
        .for_each(|task| {
            let (block, group) = (task / panel_groups, task % panel_groups);
            let rows = block * block_rows..(block * block_rows + block_rows).min(m);
            for panel in group * group_panels..((group + 1) * group_panels).min(panels) {
                tile(rows.clone(), panel);
            }
        });
}

/// The most rows a register tile may have: [`by_rows!`]'s last case.
pub const MAX_TILE_ROWS: usize = 12;

/// The register-tile kernels are generic over their row count `R` (the accumulators are arrays of `R`);
/// `by_rows!(rows, |R| expr)` evaluates `expr` with `R` the const `rows`, for 1 to [`MAX_TILE_ROWS`] rows
/// (that many for more: a kernel asserts its tile fits).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
macro_rules! by_rows {
    ($rows:expr, |$r:ident| $body:expr) => {
        match $rows {
            1 => {
                const $r: usize = 1;
                $body
            }
            2 => {
                const $r: usize = 2;
                $body
            }
            3 => {
                const $r: usize = 3;
                $body
            }
            4 => {
                const $r: usize = 4;
                $body
            }
            5 => {
                const $r: usize = 5;
                $body
            }
            6 => {
                const $r: usize = 6;
                $body
            }
            7 => {
                const $r: usize = 7;
                $body
            }
            8 => {
                const $r: usize = 8;
                $body
            }
            9 => {
                const $r: usize = 9;
                $body
            }
            10 => {
                const $r: usize = 10;
                $body
            }
            11 => {
                const $r: usize = 11;
                $body
            }
            _ => {
                const $r: usize = 12;
                $body
            }
        }
    };
}
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(crate) use by_rows;

/// The instructions a packed kernel's tiles run on: AVX-512's (for bf16, AVX512-BF16's, and the tile unit's
/// where the CPU has one) or AVX2 + FMA's. Chosen per call from the CPU tier; tests name both.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Width {
    Avx512,
    Avx2,
}

#[cfg(target_arch = "x86_64")]
impl Width {
    /// AVX-512 where the CPU has (and the tier allows) the AVX-512 instructions a kernel needs, else AVX2.
    pub fn widest(has_avx512: bool) -> Self {
        if has_avx512 {
            Self::Avx512
        } else {
            Self::Avx2
        }
    }
}

/// How many vectors of 8 columns an AVX2 tile of `rows` rows sums in one pass over `k`: the whole panel (4)
/// for up to `whole_panel_rows` rows (a decode step's few), so that each input's 128-byte line of the panel
/// is read whole and in order; half of it (2) for more rows, whose sums need the 16 registers. Two
/// half-panel passes each read every other line, which the memory system streams slower than whole lines:
/// for a decode step's rows the panels come from memory, not from cache.
#[cfg(target_arch = "x86_64")]
pub fn avx2_vectors(rows: usize, whole_panel_rows: usize) -> usize {
    if rows <= whole_panel_rows {
        4
    } else {
        2
    }
}

/// The first column of each pass of an AVX2 tile of `V` vectors of 8 columns over a panel of `cols` valid
/// columns.
#[cfg(target_arch = "x86_64")]
pub fn avx2_passes<const V: usize>(cols: usize) -> impl Iterator<Item = usize> {
    (0..PANEL)
        .step_by(8 * V)
        .take_while(move |&part| part < cols)
}

/// The sums of `R` rows for `V` vectors of 8 columns, started from the biases at `bias`.
///
/// # Safety
/// The CPU has AVX; `bias` addresses 8 x `V` values.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx")]
pub unsafe fn avx2_bias_sums<const R: usize, const V: usize>(
    bias: *const f32,
) -> [[std::arch::x86_64::__m256; V]; R] {
    [std::array::from_fn(|v| std::arch::x86_64::_mm256_loadu_ps(bias.add(8 * v))); R]
}

/// One panel of packed weights (`W`: the kernel's packed unit) and where its outputs go.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub struct PanelTile<'a, W> {
    pub panel: &'a [W],
    /// The panel's 32 biases (zeros past the last column).
    pub bias: &'a [f32],
    pub k: usize,
    /// Row stride of the output.
    pub n: usize,
    /// Valid columns in this panel (the last one may be partial).
    pub cols: usize,
}

/// Weights packed in panels for [`run_tiles`]: panel `p` is `data[p * panel_len..][..panel_len]`.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub struct Panels<'a, W> {
    pub data: &'a [W],
    pub panel_len: usize,
    pub n: usize,
    pub k: usize,
}

/// `x[m, k]` (rows of `X`) against packed weights into outputs of `A`, in parallel: `tile(panel, rows of x,
/// row count, output)`
/// for every register tile of up to `tile_rows` rows, the output addressing those rows of `out` (`[m, n]`,
/// row-major) from the panel's first column; `bias` has `n` values. Each call writes only its own outputs,
/// and `epilogue` is applied to each task's outputs after its tiles.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub fn run_tiles<W: Sync, X: Sync, A: Element>(
    x: &[X],
    m: usize,
    weights: Panels<W>,
    bias: &[f32],
    (out, epilogue): (TaskPtr<A>, Epilogue),
    tile_rows: usize,
    tile: impl Fn(&PanelTile<W>, &[X], usize, *mut A) + Sync,
) {
    let Panels {
        data,
        panel_len,
        n,
        k,
    } = weights;
    let panels = n.div_ceil(PANEL);
    let mut bias = bias.to_vec();
    bias.resize(panels * PANEL, 0.0);
    for_each_block(
        m,
        panels,
        k * std::mem::size_of::<X>(),
        tile_rows,
        |rows, p| {
            let panel = PanelTile {
                panel: &data[p * panel_len..][..panel_len],
                bias: &bias[p * PANEL..][..PANEL],
                k,
                n,
                cols: PANEL.min(n - p * PANEL),
            };
            for (r, size) in tiles(rows.clone(), tile_rows) {
                tile(
                    &panel,
                    &x[r * k..(r + size) * k],
                    size,
                    out.at(r * n + p * PANEL),
                );
            }
            // SAFETY: the outputs this task just wrote.
            unsafe { epilogue.apply(out, rows, (p * PANEL, panel.cols, n)) };
        },
    );
}

/// What a GEMM applies to its outputs after the bias, to each task's block of rows x panel right after the
/// block is written (while it is in cache), instead of in a pass of its own over the whole output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Epilogue {
    None,
    /// The exact GELU ([`super::math::gelu`]) of each output as stored (bf16 outputs: of the rounded value,
    /// rounded again), which is what the GELU after the product computes.
    Gelu,
}

impl Epilogue {
    /// Applies to `cols` outputs from column `col` in each of `rows` of `out` (rows `n` values apart).
    ///
    /// # Safety
    /// `out` addresses those outputs, written, and touched by no other thread during the call.
    pub unsafe fn apply<T: Element>(
        self,
        out: TaskPtr<T>,
        rows: Range<usize>,
        (col, cols, n): (usize, usize, usize),
    ) {
        if self == Epilogue::None {
            return;
        }
        for r in rows {
            let values = std::slice::from_raw_parts_mut(out.at(r * n + col), cols);
            gelu_in_place(values);
        }
    }
}

super::features::wide_fn! {
    fn gelu_in_place[T: Element](values: &mut [T]) = gelu_in_place_portable;
}

#[inline(always)]
fn gelu_in_place_portable<T: Element>(values: &mut [T]) {
    for v in values {
        *v = T::from_f32(gelu(v.to_f32()));
    }
}

/// The register tiles of a block of rows, as (first row, rows): `tile_rows` each, the last one shorter.
pub fn tiles(rows: Range<usize>, tile_rows: usize) -> impl Iterator<Item = (usize, usize)> {
    rows.clone()
        .step_by(tile_rows)
        .map(move |first| (first, tile_rows.min(rows.end - first)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn every_row_and_panel_once() {
        for (m, panels, row_bytes, tile_rows) in
            [(1, 1, 2, 12), (577, 24, 1536, 12), (5000, 3, 256, 6)]
        {
            let seen = Mutex::new(vec![0u32; m * panels]);
            for_each_block(m, panels, row_bytes, tile_rows, |rows, panel| {
                let mut seen = seen.lock().unwrap();
                for (first, size) in tiles(rows.clone(), tile_rows) {
                    assert!(size >= 1 && size <= tile_rows && first + size <= rows.end);
                    for r in first..first + size {
                        seen[r * panels + panel] += 1;
                    }
                }
            });
            assert!(seen.into_inner().unwrap().iter().all(|&n| n == 1));
        }
    }
}
