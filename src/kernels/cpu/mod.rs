//! CPU kernels: candle custom ops and plain functions over slices, in f32 and bf16, vectorized for the widest
//! SIMD the CPU has ([`features`]) and parallel over rayon's threads ([`parallel`]).
//!
//! Nothing here knows the model: each kernel takes tensors or slices of given shapes and says what it
//! requires (device, dtype, contiguity). The layers above choose between a kernel and candle.

pub mod amx;
pub mod attention;
pub mod bf16_gemm;
pub mod depthwise;
pub mod elementwise;
pub mod f32_gemm;
pub mod features;
pub mod gemm;
pub mod grouped;
pub mod im2col;
pub mod layer_norm;
pub mod math;
pub mod memory;
pub mod panels;
pub mod parallel;
pub mod quantized_gemm;
pub mod storage;
pub mod window_attention;

/// Test inputs for the kernels.
#[cfg(test)]
pub(crate) mod test_values {
    /// `(m, k, n)` products that reach every path of a packed kernel: one and a few rows, many rows, `k` odd
    /// and not a multiple of 4 or of a block, partial panels and row tiles, several row blocks and panel
    /// groups.
    pub const SHAPES: [(usize, usize, usize); 8] = [
        (1, 1, 1),
        (3, 33, 50),
        (8, 768, 17),
        (9, 7, 31),
        (13, 147, 33),
        (40, 64, 96),
        (300, 128, 70),
        (97, 4096, 40),
    ];

    /// A cheap deterministic spread of `len` values in [-2, 2), multiples of 2^-10 (exact in bf16 up to
    /// its 8 bits), different for each `seed`.
    pub fn spread(len: usize, seed: u32) -> Vec<f32> {
        (0..len as u32)
            .map(|i| {
                let h = (i ^ seed).wrapping_mul(2_654_435_761).rotate_left(13);
                (h % 4096) as f32 / 1024.0 - 2.0
            })
            .collect()
    }
}
