//! The building blocks of the model: each is the operation transformers' module computes, and each takes
//! a kernel from `crate::kernels` where one applies (device, dtype, shape) and candle's op otherwise.
//! Layers know nothing of Florence-2; the model in `crate::model` is made of them.

pub mod activation;
pub mod attention;
pub mod conv;
pub mod embedding;
pub mod linear;
pub mod mlp;
pub mod norm;
pub mod ops;

pub use linear::{Linear, Quantization};
pub use mlp::Mlp;
pub use norm::{layer_norm, LayerNorm, LAYER_NORM_EPS};

/// The largest `|a - b|` of two tensors of one shape, in f32 (for tests).
#[cfg(test)]
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    let f32 = |t: &candle_core::Tensor| t.to_dtype(candle_core::DType::F32).unwrap();
    (f32(a) - f32(b))
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}
