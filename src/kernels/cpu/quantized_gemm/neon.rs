//! The aarch64 kernels of [`super`], on NEON: `usmmla` on CPUs with the Int8 matrix multiply extension, `sdot`
//! on the others with the DotProd extension. Both read the same panels and give the x86-64 kernels' integers.
//!
//! `usmmla` multiplies a 2 x 8 matrix of unsigned bytes by an 8 x 2 one of signed bytes and adds the 2 x 2
//! product to four int32 sums. Its first operand is two rows' eight activations, stored with 128 added as
//! the x86-64 kernels store them; its second is two columns' eight weights, the zip of those columns' lanes
//! in two consecutive quads. Its sums are then the x86-64 kernels' integers as they stand.
//!
//! `sdot` (each int32 lane of the sum gains the dot product of four signed bytes of one operand with four
//! of the other) multiplies signed bytes, so for it the activations are stored as their levels (-127..=127)
//! and a tile sums `Σ_t q_x[i][t] * q_w[c][t]` for each group. The x86-64 kernels sum the offset levels,
//! `Σ_t (q_x[i][t] + 128) * q_w[c][t]`, which is that plus `128 * Σ_t q_w[c][t]`: the tile sums the weights
//! too (an `sdot` with ones, shared by its rows) and adds 128 times them.
//!
//! Either way each group's int32 sum is the x86 kernels' integer, and the f32 steps after it (the same
//! operations in the same order, fused multiply-adds where they fuse) give the same bits.
//!
//! The weights are the same panels, whose quads hold four inputs of the panel's 32 columns: in int8 16 bytes
//! hold four columns' four inputs, in int4 16 bytes hold four columns in their low nibbles and the four 16
//! columns further on in their high ones.

use std::arch::aarch64::*;
use std::arch::asm;

use super::{inverse, quantize_rows, round_even, Activation, Bits, Packed, Tile};
use crate::kernels::cpu::features::{has_dotprod, has_i8mm};
use crate::kernels::cpu::panels::{by_rows, tiles, Epilogue, PANEL};
use crate::kernels::cpu::parallel::TaskPtr;
use crate::kernels::cpu::storage::{store_first4, Element};

/// Rows in a register tile. `sdot`: 4 rows x 4 vectors of int32 sums, the 4 vectors of the weights' sums, the
/// 4 weight vectors, a broadcast and the ones (and for int4 the two nibble constants) take 26 (28) of the 32
/// vector registers. `usmmla`: 2 pairs of rows x 8 blocks of sums, the 8 zipped weight vectors and 2 of
/// activations take 26 (and for int4 the two nibble constants, 28). The f32 totals, touched once per group, do
/// not stay in them.
const TILE_ROWS: usize = 4;

/// Columns of a tile: four vectors of 4, half a panel.
const TILE_COLS: usize = PANEL / 2;

/// A NEON kernel: how it stores an activation's level, and its register tile.
pub(super) trait NeonKernel {
    /// A stored level: the level itself (`sdot`'s signed bytes) or the level plus 128 (`usmmla`'s unsigned
    /// bytes).
    type Level: Copy + Send + Sync;
    /// A zero activation.
    const ZERO: Self::Level;
    /// The stored form of `level` (an integer in -127..=127).
    fn level(level: f32) -> Self::Level;
    /// Whether the CPU tier runs the kernel.
    fn runs() -> bool;
    /// Rows `first..first + R` against tile `half` of the panel, into `dst` (that row block's outputs from
    /// the panel's first column, rows `tile.n` apart).
    ///
    /// # Safety
    /// [`Self::runs`]; rows `first..first + R` exist; `dst` addresses their outputs of this panel, which no
    /// other thread touches during the call.
    unsafe fn tile<const R: usize, const INT4: bool, A: Element>(
        tile: &Tile<Self::Level>,
        first: usize,
        half: usize,
        dst: *mut A,
    );
}

/// The kernel on `sdot` (the dotprod tier).
pub(super) struct Sdot;

/// The kernel on `usmmla` (the i8mm tier).
pub(super) struct Usmmla;

impl NeonKernel for Sdot {
    type Level = i8;
    const ZERO: i8 = 0;
    fn level(level: f32) -> i8 {
        level as i8
    }
    fn runs() -> bool {
        has_dotprod()
    }
    unsafe fn tile<const R: usize, const INT4: bool, A: Element>(
        tile: &Tile<i8>,
        first: usize,
        half: usize,
        dst: *mut A,
    ) {
        tile.sdot::<R, INT4, A>(first, half, dst)
    }
}

impl NeonKernel for Usmmla {
    type Level = u8;
    const ZERO: u8 = 128;
    fn level(level: f32) -> u8 {
        (level + 128.0) as u8
    }
    fn runs() -> bool {
        has_i8mm()
    }
    unsafe fn tile<const R: usize, const INT4: bool, A: Element>(
        tile: &Tile<u8>,
        first: usize,
        half: usize,
        dst: *mut A,
    ) {
        tile.usmmla::<R, INT4, A>(first, half, dst)
    }
}

/// `x @ wᵀ + bias` into the `[m, n]` output `dst`, then `epilogue`, by the kernel `K`: the rows of `x`
/// quantized to `K`'s levels, then every register tile of up to [`TILE_ROWS`] rows against each half of
/// each panel.
///
/// # Panics
/// If the CPU tier does not run `K`.
pub(super) fn linear<K: NeonKernel, A: Activation + Element>(
    x: &[A],
    w: &Packed,
    bias: &[f32],
    (dst, epilogue): (TaskPtr<A>, Epilogue),
) {
    assert!(K::runs());
    let quantize = |row: &[A], q: *mut K::Level| {
        // SAFETY: `quantize_rows` gives each row `k_padded` values of room, at least `row.len()`.
        unsafe { quantize_row::<A, K>(row, q) }
    };
    // SAFETY: `quantize_row` writes every value of a row whose scale is not NaN.
    let (qx, sx) = unsafe { quantize_rows(x, (w.k, w.k_padded), K::ZERO, quantize) };
    let int4 = w.bits == Bits::Int4;
    super::for_each_tile(
        w,
        (&qx[..], &sx[..]),
        bias,
        TILE_ROWS,
        (dst, epilogue),
        |tile, rows| {
            for (r, size) in tiles(rows, TILE_ROWS) {
                let out = tile.out(dst, r);
                for half in 0..2 {
                    if tile.column(int4, half, 0) < tile.cols {
                        // SAFETY: `K` runs (checked above); rows r..r + size exist, and their outputs in
                        // this panel only this call writes.
                        by_rows!(size.min(TILE_ROWS), |R| unsafe {
                            if int4 {
                                K::tile::<R, true, A>(tile, r, half, out)
                            } else {
                                K::tile::<R, false, A>(tile, r, half, out)
                            }
                        })
                    }
                }
            }
        },
    );
}

/// `acc` plus, in each int32 lane, the dot product of that lane's four bytes of `a` and of `b`.
///
/// # Safety
/// The CPU has the DotProd extension; called only from a function compiled with it.
// Instructions rather than the intrinsics (here and below), which Rust has not stabilised.
#[inline(always)]
unsafe fn sdot(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    asm!(
        "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
        acc = inout(vreg) acc,
        a = in(vreg) a,
        b = in(vreg) b,
        options(pure, nomem, nostack, preserves_flags)
    );
    acc
}

/// `acc` plus the 2 x 2 product of `a` (two rows of eight unsigned bytes) and the transpose of `b` (two
/// rows of eight signed bytes), row-major: lane `2i + j` gains the dot product of `a`'s row `i` and `b`'s
/// row `j`.
///
/// # Safety
/// The CPU has the Int8 matrix multiply extension; called only from a function compiled with it.
#[inline(always)]
unsafe fn usmmla(mut acc: int32x4_t, a: uint8x16_t, b: int8x16_t) -> int32x4_t {
    asm!(
        "usmmla {acc:v}.4s, {a:v}.16b, {b:v}.16b",
        acc = inout(vreg) acc,
        a = in(vreg) a,
        b = in(vreg) b,
        options(pure, nomem, nostack, preserves_flags)
    );
    acc
}

/// Quantizes `row` into its levels (-127..=127), stored as `K` stores them, at `q`, and returns its scale,
/// as the x86-64 quantizers do (the same largest magnitude, scale, product and rounding): a row holding a NaN
/// or an infinity gets a NaN scale and leaves `q` unwritten; any other row writes every value.
///
/// # Safety
/// `q` is valid for `row.len()` values of writes.
unsafe fn quantize_row<A: Element, K: NeonKernel>(row: &[A], q: *mut K::Level) -> f32 {
    // Pass 1, four lanes at a time for the vectorizer: the largest magnitude, and whether every value is
    // finite.
    let (mut max, mut finite) = ([0f32; 4], [true; 4]);
    let mut observe = |lane: usize, v: &A| {
        let magnitude = v.to_f32().abs();
        finite[lane] &= magnitude <= f32::MAX;
        max[lane] = if magnitude > max[lane] {
            magnitude
        } else {
            max[lane]
        };
    };
    let mut lanes = row.chunks_exact(4);
    for values in &mut lanes {
        values
            .iter()
            .enumerate()
            .for_each(|(lane, v)| observe(lane, v));
    }
    let remainder = lanes.remainder().iter().enumerate();
    remainder.for_each(|(lane, v)| observe(lane, v));
    if finite.contains(&false) {
        return f32::NAN;
    }
    let scale = max.into_iter().fold(0.0, f32::max) / 127.0;
    let inverse = inverse(scale);
    // Pass 2: round to nearest even (|v * inverse| is at most 127 and a little, inside `round_even`'s
    // range), clamp.
    for (t, v) in row.iter().enumerate() {
        let level = round_even(v.to_f32() * inverse).clamp(-127.0, 127.0);
        q.add(t).write(K::level(level));
    }
    scale
}

impl<L> Tile<'_, L> {
    /// The first column of the tile's vector `v` (0..4) in tile `half` of the panel: int8 takes columns
    /// 0..16, then 16..32; int4 columns 0..8 and 16..24 (a quad's first 32 bytes, low and high nibbles), then
    /// 8..16 and 24..32.
    fn column(&self, int4: bool, half: usize, v: usize) -> usize {
        if int4 {
            8 * half + 4 * (v % 2) + 16 * (v / 2)
        } else {
            TILE_COLS * half + 4 * v
        }
    }

    /// Quad `j`'s weight levels for the four vectors of columns of tile `half`.
    ///
    /// # Safety
    /// `j` is a quad of the panel.
    #[inline(always)]
    unsafe fn quad<const INT4: bool>(&self, j: usize, half: usize) -> [int8x16_t; 4] {
        let panel = self.panel.as_ptr();
        if INT4 {
            let (nibble, eight) = (vdupq_n_u8(0x0F), vdupq_n_u8(8));
            let at = panel.add(j * 2 * PANEL + 2 * TILE_COLS * half);
            let bytes = [vld1q_u8(at), vld1q_u8(at.add(16))];
            let low = bytes.map(|b| vreinterpretq_s8_u8(vsubq_u8(vandq_u8(b, nibble), eight)));
            let high = bytes.map(|b| vreinterpretq_s8_u8(vsubq_u8(vshrq_n_u8::<4>(b), eight)));
            [low[0], low[1], high[0], high[1]]
        } else {
            let at = panel.add(j * 4 * PANEL + 4 * TILE_COLS * half).cast::<i8>();
            std::array::from_fn(|v| vld1q_s8(at.add(16 * v)))
        }
    }

    /// Group `g`'s column scales for the four vectors of tile `half`.
    ///
    /// # Safety
    /// `g` is a group of the panel.
    #[inline(always)]
    unsafe fn group_scales<const INT4: bool>(&self, g: usize, half: usize) -> [float32x4_t; 4] {
        let scales = self.scales.as_ptr().add(g * PANEL);
        std::array::from_fn(|v| vld1q_f32(scales.add(self.column(INT4, half, v))))
    }

    /// Stores rows `first..first + R`' outputs of tile `half` from their `totals` (per row and vector, `Σ_g
    /// s_w[g][c] * Σ_t (q_x[t] + 128) * q_w[c][t]`) into `dst`, as the x86 kernels finish them: the offset's
    /// constant off, times the row's scale, plus the bias.
    ///
    /// # Safety
    /// `dst` addresses those rows' outputs of this panel, rows `self.n` apart.
    #[inline(always)]
    unsafe fn store<const R: usize, const INT4: bool, A: Element>(
        &self,
        (first, half): (usize, usize),
        totals: &[[float32x4_t; 4]; R],
        dst: *mut A,
    ) {
        for (r, totals) in totals.iter().enumerate() {
            let scale = vdupq_n_f32(self.sx[first + r]);
            for (v, &totals) in totals.iter().enumerate() {
                let col = self.column(INT4, half, v);
                if col >= self.cols {
                    continue;
                }
                let offsets = vld1q_f32(self.offsets.as_ptr().add(col));
                let bias = vld1q_f32(self.bias.as_ptr().add(col));
                let out = vfmaq_f32(bias, vsubq_f32(totals, offsets), scale);
                store_first4(out, dst.add(r * self.n + col), (self.cols - col).min(4));
            }
        }
    }
}

impl Tile<'_, i8> {
    /// Rows `first..first + R` against tile `half` of the panel, into `dst` (that row block's outputs from
    /// the panel's first column, rows `self.n` apart).
    ///
    /// # Safety
    /// The CPU has the DotProd extension; rows `first..first + R` exist; `dst` addresses their outputs of
    /// this panel, which no other thread touches during the call.
    #[target_feature(enable = "dotprod")]
    unsafe fn sdot<const R: usize, const INT4: bool, A: Element>(
        &self,
        first: usize,
        half: usize,
        dst: *mut A,
    ) {
        let rows: [*const i8; R] =
            std::array::from_fn(|r| self.qx.as_ptr().add((first + r) * self.k_padded));
        let ones = vdupq_n_s8(1);
        let mut totals = [[vdupq_n_f32(0.0); 4]; R];
        for g in 0..self.groups {
            let mut sums = [[vdupq_n_s32(0); 4]; R];
            // Σ_t q_w[c][t] over the group, for the offset the x86 kernels' sums carry.
            let mut weight_sums = [vdupq_n_s32(0); 4];
            for j in g * self.group_quads..(g + 1) * self.group_quads {
                let w = self.quad::<INT4>(j, half);
                for v in 0..4 {
                    weight_sums[v] = sdot(weight_sums[v], w[v], ones);
                }
                for r in 0..R {
                    let quad = rows[r].add(4 * j).cast::<i32>().read_unaligned();
                    let x = vreinterpretq_s8_s32(vdupq_n_s32(quad));
                    for v in 0..4 {
                        sums[r][v] = sdot(sums[r][v], w[v], x);
                    }
                }
            }
            let offset = weight_sums.map(|sums| vshlq_n_s32::<7>(sums));
            let scale = self.group_scales::<INT4>(g, half);
            for r in 0..R {
                for v in 0..4 {
                    let sum = vcvtq_f32_s32(vaddq_s32(sums[r][v], offset[v]));
                    totals[r][v] = vfmaq_f32(totals[r][v], sum, scale[v]);
                }
            }
        }
        self.store::<R, INT4, A>((first, half), &totals, dst);
    }
}

impl Tile<'_, u8> {
    /// As [`Tile::sdot`], by `usmmla`: rows in pairs (an odd row count's last row paired with itself, its
    /// second copy's sums not stored), each pair against the tile's eight pairs of columns.
    ///
    /// # Safety
    /// The CPU has the Int8 matrix multiply extension; rows `first..first + R` exist; `dst` addresses their
    /// outputs of this panel, which no other thread touches during the call.
    #[target_feature(enable = "i8mm")]
    unsafe fn usmmla<const R: usize, const INT4: bool, A: Element>(
        &self,
        first: usize,
        half: usize,
        dst: *mut A,
    ) {
        const PAIRS: usize = TILE_ROWS / 2;
        assert!(R <= TILE_ROWS, "a tile has at most {TILE_ROWS} rows");
        let pairs = R.div_ceil(2);
        let rows: [*const u8; R] =
            std::array::from_fn(|r| self.qx.as_ptr().add((first + r) * self.k_padded));
        let pair = |p: usize| [rows[2 * p], rows[(2 * p + 1).min(R - 1)]];
        let mut totals = [[vdupq_n_f32(0.0); 4]; R];
        for g in 0..self.groups {
            // Per pair of rows and pair of columns (vector v's first two columns at 2v, its last two at
            // 2v + 1): the 2 x 2 block of int32 sums, row-major.
            let mut sums = [[vdupq_n_s32(0); 8]; PAIRS];
            // Inputs 4j..4j + 8: quads j and j + 1, or (`last`, a group of an odd number of quads) quad j
            // alone, as if zero weights and activations followed it.
            let mut step = |j: usize, last: bool| {
                let a = self.quad::<INT4>(j, half).map(|w| vreinterpretq_s32_s8(w));
                let b = if last {
                    [vdupq_n_s32(0); 4]
                } else {
                    self.quad::<INT4>(j + 1, half)
                        .map(|w| vreinterpretq_s32_s8(w))
                };
                let w: [int8x16_t; 8] = std::array::from_fn(|i| {
                    let (a, b) = (a[i / 2], b[i / 2]);
                    vreinterpretq_s8_s32(if i % 2 == 0 {
                        vzip1q_s32(a, b)
                    } else {
                        vzip2q_s32(a, b)
                    })
                });
                for (p, sums) in sums.iter_mut().enumerate().take(pairs) {
                    let eight = pair(p).map(|row| {
                        let at = row.add(4 * j);
                        if last {
                            u64::from(at.cast::<u32>().read_unaligned())
                        } else {
                            at.cast::<u64>().read_unaligned()
                        }
                    });
                    let x = vreinterpretq_u8_u64(vcombine_u64(
                        vcreate_u64(eight[0]),
                        vcreate_u64(eight[1]),
                    ));
                    for (sum, &w) in sums.iter_mut().zip(&w) {
                        *sum = usmmla(*sum, x, w);
                    }
                }
            };
            let quads = g * self.group_quads..(g + 1) * self.group_quads;
            let mut j = quads.start;
            while j + 1 < quads.end {
                step(j, false);
                j += 2;
            }
            if j < quads.end {
                step(j, true);
            }
            let scale = self.group_scales::<INT4>(g, half);
            for (p, sums) in sums.iter().enumerate().take(pairs) {
                for v in 0..4 {
                    let blocks = [sums[2 * v], sums[2 * v + 1]].map(|s| vreinterpretq_s64_s32(s));
                    // Each 64-bit half of a block is one row's two columns.
                    let by_row = [
                        vzip1q_s64(blocks[0], blocks[1]),
                        vzip2q_s64(blocks[0], blocks[1]),
                    ];
                    for (e, sum) in by_row.into_iter().enumerate() {
                        let r = 2 * p + e;
                        if r < R {
                            let sum = vcvtq_f32_s32(vreinterpretq_s32_s64(sum));
                            totals[r][v] = vfmaq_f32(totals[r][v], sum, scale[v]);
                        }
                    }
                }
            }
        }
        self.store::<R, INT4, A>((first, half), &totals, dst);
    }
}
