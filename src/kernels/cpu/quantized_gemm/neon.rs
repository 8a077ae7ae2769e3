//! The aarch64 kernel of [`super`]: NEON's `sdot` (each int32 lane of the sum gains the dot product of four
//! signed bytes of one operand with four of the other), on CPUs with the DotProd extension.
//!
//! `sdot` multiplies signed bytes, so the activations are stored as their levels (-127..=127) rather than
//! with 128 added, and a tile sums `Σ_t q_x[i][t] * q_w[c][t]` for each group. The x86-64 kernels sum the
//! offset levels, `Σ_t (q_x[i][t] + 128) * q_w[c][t]`, which is that plus `128 * Σ_t q_w[c][t]`: the tile
//! sums the weights too (an `sdot` with ones, shared by its rows) and adds 128 times them, so that each
//! group's int32 sum is the x86 kernels' integer and the f32 steps after it (the same operations in the
//! same order, fused multiply-adds where they fuse) give the same bits.
//!
//! The weights are the same panels: an int8 quad is four columns' four inputs in 16 bytes, an int4 quad's
//! 16 bytes hold four columns in their low nibbles and the four 16 columns further on in their high ones.

use std::arch::aarch64::*;
use std::arch::asm;

use super::{inverse, quantize_rows, round_even, Activation, Bits, Packed, Tile};
use crate::kernels::cpu::panels::{by_rows, tiles, Epilogue, PANEL};
use crate::kernels::cpu::parallel::TaskPtr;
use crate::kernels::cpu::storage::{store_first4, Element};

/// Rows in a register tile: 4 rows x 4 vectors of int32 sums, the 4 vectors of the weights' sums, the 4
/// weight vectors, a broadcast and the ones (and for int4 the two nibble constants) take 26 (28) of the 32
/// vector registers; the f32 totals, touched once per group, do not stay in them.
const TILE_ROWS: usize = 4;

/// Columns of a tile: four vectors of 4, half a panel.
const TILE_COLS: usize = PANEL / 2;

/// `x @ wᵀ + bias` into the `[m, n]` output `dst`, then `epilogue`.
///
/// # Panics
/// If the CPU tier has no `sdot` ([`crate::kernels::cpu::features::has_dotprod`]).
pub(super) fn linear<A: Activation + Element>(
    x: &[A],
    w: &Packed,
    bias: &[f32],
    (dst, epilogue): (TaskPtr<A>, Epilogue),
) {
    assert!(crate::kernels::cpu::features::has_dotprod());
    let quantize = |row: &[A], q: *mut i8| {
        // SAFETY: `quantize_rows` gives each row `k_padded` values of room, at least `row.len()`.
        unsafe { quantize_row(row, q) }
    };
    // SAFETY: `quantize_row` writes every value of a row whose scale is not NaN.
    let (qx, sx) = unsafe { quantize_rows(x, (w.k, w.k_padded), 0i8, quantize) };
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
                    // SAFETY: the CPU has `sdot` (checked above); rows r..r + size exist, and their
                    // outputs in this panel only this call writes.
                    unsafe {
                        if tile.column(int4, half, 0) < tile.cols {
                            by_rows!(size.min(TILE_ROWS), |R| if int4 {
                                tile.sdot::<R, true, A>(r, half, out)
                            } else {
                                tile.sdot::<R, false, A>(r, half, out)
                            })
                        }
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
// An instruction rather than the intrinsic, which Rust has not stabilised.
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

/// Quantizes `row` into its levels (-127..=127) at `q`, and returns its scale, as the x86-64 quantizers do
/// (the same largest magnitude, scale, product and rounding), without their offset: a row holding a NaN or
/// an infinity gets a NaN scale and leaves `q` unwritten; any other row writes every value.
///
/// # Safety
/// `q` is valid for `row.len()` bytes of writes.
unsafe fn quantize_row<A: Element>(row: &[A], q: *mut i8) -> f32 {
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
        q.add(t).write(level as i8);
    }
    scale
}

impl Tile<'_, i8> {
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
        let panel = self.panel.as_ptr();
        let columns: [usize; 4] = std::array::from_fn(|v| self.column(INT4, half, v));
        let (ones, nibble, eight) = (vdupq_n_s8(1), vdupq_n_u8(0x0F), vdupq_n_u8(8));
        // Quad j's weights for the tile's four vectors of columns.
        let weights = |j: usize| -> [int8x16_t; 4] {
            if INT4 {
                let at = panel.add(j * 2 * PANEL + 2 * TILE_COLS * half);
                let bytes = [vld1q_u8(at), vld1q_u8(at.add(16))];
                let low = bytes.map(|b| vreinterpretq_s8_u8(vsubq_u8(vandq_u8(b, nibble), eight)));
                let high = bytes.map(|b| vreinterpretq_s8_u8(vsubq_u8(vshrq_n_u8::<4>(b), eight)));
                [low[0], low[1], high[0], high[1]]
            } else {
                let at = panel.add(j * 4 * PANEL + 4 * TILE_COLS * half).cast::<i8>();
                std::array::from_fn(|v| vld1q_s8(at.add(16 * v)))
            }
        };
        let mut totals = [[vdupq_n_f32(0.0); 4]; R];
        for g in 0..self.groups {
            let mut sums = [[vdupq_n_s32(0); 4]; R];
            // Σ_t q_w[c][t] over the group, for the offset the x86 kernels' sums carry.
            let mut weight_sums = [vdupq_n_s32(0); 4];
            for j in g * self.group_quads..(g + 1) * self.group_quads {
                let w = weights(j);
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
            let scales = self.scales.as_ptr().add(g * PANEL);
            let scale: [float32x4_t; 4] =
                std::array::from_fn(|v| vld1q_f32(scales.add(columns[v])));
            for r in 0..R {
                for v in 0..4 {
                    let sum = vcvtq_f32_s32(vaddq_s32(sums[r][v], offset[v]));
                    totals[r][v] = vfmaq_f32(totals[r][v], sum, scale[v]);
                }
            }
        }
        for (r, totals) in totals.iter().enumerate() {
            let scale = vdupq_n_f32(self.sx[first + r]);
            for (v, &totals) in totals.iter().enumerate() {
                let col = columns[v];
                if col >= self.cols {
                    continue;
                }
                // As the x86 kernels: the offset's constant off, times the row's scale, plus the bias.
                let offsets = vld1q_f32(self.offsets.as_ptr().add(col));
                let bias = vld1q_f32(self.bias.as_ptr().add(col));
                let out = vfmaq_f32(bias, vsubq_f32(totals, offsets), scale);
                store_first4(out, dst.add(r * self.n + col), (self.cols - col).min(4));
            }
        }
    }
}
