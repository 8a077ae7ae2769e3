//! The vision tower's convolutions, on channels-last maps: strided convolutions over tokens (as im2col + GEMM
//! on the CPU) and DaViT's 3×3 depthwise convolution added back to its input (its conditional position
//! encoding), which one CPU and CUDA kernel computes in f32 for any model dtype.

use candle_core::{DType, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};

use super::ops::{concat_row_chunks, nchw_to_tokens, stack, to_dtype, tokens_to_nchw};
use super::{LayerNorm, Linear};
use crate::kernels::cpu::im2col::{patches, ConvGeometry};
use crate::kernels::cpu::{depthwise, gemm};

/// A strided convolution over the tokens `[B, H*W, C]` of a channels-last feature map (the vision tower's
/// patch embeddings), optionally followed by a LayerNorm.
pub enum TokenConv2d {
    /// CPU, f32 (and bf16 where the GEMM has a bf16 kernel): channels-last im2col of the tokens and one GEMM
    /// per chunk of output rows ([`patches`]), with the weight flattened `(ky, kx, c)`-major to match the
    /// patch rows.
    Gemm {
        linear: Linear,
        kernel: usize,
        stride: usize,
        padding: usize,
    },
    /// Other devices and dtypes: candle's conv2d on NCHW, computed in f32 when the model is bf16 (candle's CPU
    /// convolution has no bf16 kernel).
    Nchw { conv: Conv2d, dtype: DType },
}

impl TokenConv2d {
    /// The convolution `weight` `[out_c, in_c, kernel, kernel]` and `bias` of `vb`.
    pub fn new(
        in_c: usize,
        out_c: usize,
        kernel: usize,
        cfg: Conv2dConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        let dtype = vb.dtype();
        if !(vb.device().is_cpu() && gemm::cpu_supports(dtype)) {
            let vb = if dtype == DType::BF16 {
                vb.set_dtype(DType::F32)
            } else {
                vb
            };
            let conv = candle_nn::conv2d(in_c, out_c, kernel, cfg, vb)?;
            return Ok(Self::Nchw { conv, dtype });
        }
        let weight = vb.get((out_c, in_c, kernel, kernel), "weight")?;
        let flat = weight
            .permute((0, 2, 3, 1))?
            .flatten_from(1)?
            .contiguous()?;
        Ok(Self::Gemm {
            linear: Linear::new(flat, Some(vb.get(out_c, "bias")?), None)?,
            kernel,
            stride: cfg.stride,
            padding: cfg.padding,
        })
    }

    /// Tokens `[B, H*W, C]` of a `height`×`width` map → the output's tokens, height and width, normed by
    /// `post_norm` when given. On the CPU the output is made in chunks of rows whose patch matrix holds about
    /// `chunk_values` values; the norm is row-local and runs per chunk too, so the unnormed output never
    /// exists whole.
    pub fn forward(
        &self,
        tokens: &Tensor,
        (height, width): (usize, usize),
        post_norm: Option<&LayerNorm>,
        chunk_values: usize,
    ) -> Result<(Tensor, usize, usize)> {
        match self {
            Self::Nchw { conv, dtype } => {
                let nchw = tokens_to_nchw(tokens, height, width)?;
                let out = if *dtype == DType::BF16 {
                    nchw.to_dtype(DType::F32)?
                        .apply(conv)?
                        .to_dtype(DType::BF16)?
                } else {
                    nchw.apply(conv)?
                };
                let (_, _, height, width) = out.dims4()?;
                let tokens = nchw_to_tokens(&out)?;
                let tokens = match post_norm {
                    Some(norm) => tokens.apply(norm)?,
                    None => tokens,
                };
                Ok((tokens, height, width))
            }
            &Self::Gemm {
                ref linear,
                kernel,
                stride,
                padding,
            } => {
                let geometry = ConvGeometry {
                    kernel,
                    stride,
                    padding,
                    height,
                    width,
                };
                conv_as_gemm(tokens, geometry, linear, post_norm, chunk_values)
            }
        }
    }
}

/// The convolution of tokens `[B, H*W, C]` as patch rows times the flattened weight, in chunks of output rows
/// whose patch matrix holds about `chunk_values` values.
fn conv_as_gemm(
    tokens: &Tensor,
    geometry: ConvGeometry,
    linear: &Linear,
    post_norm: Option<&LayerNorm>,
    chunk_values: usize,
) -> Result<(Tensor, usize, usize)> {
    let (height, width) = geometry.output();
    let outputs = height * width;
    let row_len = geometry.kernel * geometry.kernel * tokens.dim(2)?;
    let chunk = (chunk_values / row_len).max(1);
    let images = (0..tokens.dim(0)?)
        .map(|b| {
            let image = tokens.get(b)?;
            concat_row_chunks(outputs, chunk, |first, rows| {
                let patches = {
                    let _span = crate::profile::span("im2col");
                    patches(&image, geometry, first, rows)?
                };
                let out = patches.apply(linear)?;
                match post_norm {
                    Some(norm) => out.apply(norm),
                    None => Ok(out),
                }
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((stack(images)?, height, width))
}

/// `xs + conv2d(xs, weight, bias, padding=1, groups=C)` for channels-last `xs` `[B, H, W, C]`, with the
/// weight given as `taps` (from [`depthwise_taps`]), in `xs`'s dtype.
pub fn depthwise_conv3x3_residual(xs: &Tensor, taps: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let _span = crate::profile::span("depthwise conv");
    let bias = to_dtype(bias, DType::F32)?;
    // The CPU kernel reads and writes bf16 itself; the CUDA one takes f32.
    if xs.device().is_cpu() && xs.dtype() == DType::BF16 {
        return depthwise::depthwise_conv3x3_residual(xs, taps, &bias);
    }
    let out = depthwise::depthwise_conv3x3_residual(&to_dtype(xs, DType::F32)?, taps, &bias)?;
    to_dtype(&out, xs.dtype())
}

/// The taps of a `[C, 1, 3, 3]` depthwise weight in the layout [`depthwise_conv3x3_residual`] reads.
pub use crate::kernels::cpu::depthwise::channels_last_taps as depthwise_taps;
