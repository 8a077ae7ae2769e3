//! CUDA kernels that candle lacks, compiled with NVRTC at first use (no build-time nvcc step).

pub mod depthwise;
