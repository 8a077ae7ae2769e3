//! CPU kernels: candle custom ops and plain functions over slices, in f32 and bf16, vectorized for the widest
//! SIMD the CPU has ([`features`]) and parallel over rayon's threads ([`parallel`]).
//!
//! Nothing here knows the model: each kernel takes tensors or slices of given shapes and says what it
//! requires (device, dtype, contiguity). The layers above choose between a kernel and candle.

pub mod attention;
pub mod bf16_gemm;
pub mod depthwise;
pub mod elementwise;
pub mod features;
pub mod few_rows;
pub mod gemm;
pub mod im2col;
pub mod layer_norm;
pub mod math;
pub mod memory;
pub mod parallel;
pub mod storage;
pub mod window_attention;
