//! Building blocks shared by the vision tower and the language model.

use candle_core::{Result, Tensor};
use candle_nn::Activation;

/// Scaled dot-product attention over the last two dims: `softmax(q @ kᵀ * scale + mask) @ v`.
///
/// The scale is applied after the product, as transformers' eager attention does. `mask` is additive
/// (0 where attending is allowed, a large negative value elsewhere) and broadcast over the scores.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = match mask {
        Some(mask) => scores.broadcast_add(mask)?,
        None => scores,
    };
    candle_nn::ops::softmax_last_dim(&scores)?.matmul(v)
}

/// The activation transformers' `ACT2FN[name]` gives, for the names Florence-2 configs use.
pub fn activation(name: &str) -> std::result::Result<Activation, String> {
    match name {
        "gelu" => Ok(Activation::Gelu),
        "gelu_new" | "gelu_fast" => Ok(Activation::NewGelu),
        "gelu_pytorch_tanh" => Ok(Activation::GeluPytorchTanh),
        "relu" => Ok(Activation::Relu),
        "silu" | "swish" => Ok(Activation::Silu),
        other => Err(format!(
            "activation_function {other:?} is not supported (gelu, gelu_new, relu, silu)"
        )),
    }
}

/// LayerNorm over the channel dim of an NCHW tensor (transformers permutes to NHWC and back).
pub fn layer_norm_nchw(xs: &Tensor, norm: &candle_nn::LayerNorm) -> Result<Tensor> {
    let nhwc = xs.permute((0, 2, 3, 1))?.contiguous()?;
    candle_core::Module::forward(norm, &nhwc)?
        .permute((0, 3, 1, 2))?
        .contiguous()
}

/// `[B, C, H, W]` → `[B, H*W, C]`.
pub fn nchw_to_tokens(xs: &Tensor) -> Result<Tensor> {
    xs.flatten_from(2)?.transpose(1, 2)?.contiguous()
}

/// `[B, H*W, C]` → `[B, C, H, W]`.
pub fn tokens_to_nchw(xs: &Tensor, height: usize, width: usize) -> Result<Tensor> {
    let (b, _, c) = xs.dims3()?;
    xs.transpose(1, 2)?
        .contiguous()?
        .reshape((b, c, height, width))
}
