//! The compute kernels under the layers: [`cpu`](crate::kernels::cpu) for the CPU and, in a CUDA build,
//! `cuda` for what candle's CUDA backend lacks. Kernels depend on candle and on each other only, never on
//! the layers or the model.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
