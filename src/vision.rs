//! The DaViT vision tower ("DaViT: Dual Attention Vision Transformers", Ding et al., 2022,
//! arXiv:2204.03645) as Florence-2 uses it; reference: transformers' `Florence2VisionBackbone`
//! (models/florence2/modeling_florence2.py).
//!
//! Each stage is a strided convolutional patch embedding followed by blocks of a spatial block (window
//! self-attention over `window_size`² patches) and a channel block (attention between channel groups over all
//! tokens), each block wrapped in depthwise 3×3 convolutions used as conditional position encodings.
//! Drop-path is identity at inference and has no weights, so it does not appear here.
//!
//! Inside a stage the activations stay as tokens (`[B, H*W, C]`, i.e. channels last): the norms, linear
//! layers and attention all work on that layout, and so does the CPU depthwise kernel. transformers converts
//! between NCHW and tokens around every convolution; here that happens once per stage, around the patch
//! embedding.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Activation, Conv2d, Conv2dConfig, VarBuilder};

use crate::config::VisionConfig;
use crate::im2col::{patches, ConvGeometry};
use crate::nn::{
    activate, add, concat_row_chunks, layer_norm, map_row_chunks, nchw_to_tokens, to_dtype,
    tokens_to_nchw, LayerNorm,
};
use crate::quantize::{Linear, Quantization};
use crate::vision_attention::window_attention;

const LN_EPS: f64 = 1e-5;

/// About how many f32 intermediates (MLP hidden units, window q/k/v) one chunk of rows may make on `device`.
/// On the CPU 8 MiB, which bounds the peak RSS. A GPU pays for every chunk in kernel launches and has memory
/// to spare (stage 0's largest intermediate is ~75 MB on base), so there the whole map is one chunk.
fn chunk_floats(device: &Device) -> usize {
    if device.is_cpu() {
        1 << 21
    } else {
        usize::MAX / 2
    }
}

/// A stage's activations: tokens `[B, height*width, C]`.
struct FeatureMap {
    tokens: Tensor,
    height: usize,
    width: usize,
}

/// The images' results `[N, C]` as a batch `[B, N, C]`; one image without a copy.
fn stack(images: Vec<Tensor>) -> Result<Tensor> {
    match <[Tensor; 1]>::try_from(images) {
        Ok([image]) => image.unsqueeze(0),
        Err(images) => Tensor::stack(&images, 0),
    }
}

/// A patch embedding's strided convolution.
enum PatchConv {
    /// CPU, f32 (and bf16 where [`crate::dense`] has a bf16 kernel): channels-last im2col of the tokens and
    /// one GEMM per chunk of output rows ([`crate::im2col`]), with the weight flattened `(ky, kx, c)`-major to
    /// match the patch rows.
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

impl PatchConv {
    fn new(
        in_c: usize,
        out_c: usize,
        kernel: usize,
        cfg: Conv2dConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        let dtype = vb.dtype();
        if !(vb.device().is_cpu() && crate::dense::cpu_supports(dtype)) {
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

    /// Tokens `[B, H*W, C]` of a `height`×`width` map → the output map, normed by `post_norm` when given.
    fn forward(
        &self,
        tokens: &Tensor,
        height: usize,
        width: usize,
        post_norm: Option<&LayerNorm>,
    ) -> Result<FeatureMap> {
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
                Ok(FeatureMap {
                    tokens: match post_norm {
                        Some(norm) => tokens.apply(norm)?,
                        None => tokens,
                    },
                    height,
                    width,
                })
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
                conv_as_gemm(tokens, geometry, linear, post_norm)
            }
        }
    }
}

/// The convolution of tokens `[B, H*W, C]` as patch rows times the flattened weight, in chunks of output rows
/// that keep the patch matrix a few MiB. A norm after the convolution is row-local and runs per chunk too:
/// on stage 0 the unnormed output would be another 18 MiB at the tower's peak.
fn conv_as_gemm(
    tokens: &Tensor,
    geometry: ConvGeometry,
    linear: &Linear,
    post_norm: Option<&LayerNorm>,
) -> Result<FeatureMap> {
    let (height, width) = geometry.output();
    let outputs = height * width;
    let row_len = geometry.kernel * geometry.kernel * tokens.dim(2)?;
    let chunk = (chunk_floats(tokens.device()) / row_len).max(1);
    let images = (0..tokens.dim(0)?)
        .map(|b| {
            let image = tokens.get(b)?;
            concat_row_chunks(outputs, chunk, |first, rows| {
                let out = patches(&image, geometry, first, rows)?.apply(linear)?;
                match post_norm {
                    Some(norm) => out.apply(norm),
                    None => Ok(out),
                }
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(FeatureMap {
        tokens: stack(images)?,
        height,
        width,
    })
}

/// Patch embedding: a strided convolution with a LayerNorm before (stages > 0) or after (stage 0) it.
struct ConvEmbed {
    conv: PatchConv,
    norm: LayerNorm,
    pre_norm: bool,
}

impl ConvEmbed {
    fn new(cfg: &VisionConfig, stage: usize, vb: VarBuilder) -> Result<Self> {
        let in_channels = if stage == 0 {
            cfg.in_channels
        } else {
            cfg.embed_dim[stage - 1]
        };
        let out_channels = cfg.embed_dim[stage];
        let conv_cfg = Conv2dConfig {
            padding: cfg.patch_padding[stage],
            stride: cfg.patch_stride[stage],
            ..Default::default()
        };
        let conv = PatchConv::new(
            in_channels,
            out_channels,
            cfg.patch_size[stage],
            conv_cfg,
            vb.pp("conv"),
        )?;
        let pre_norm = cfg.patch_prenorm[stage];
        let norm_dim = if pre_norm { in_channels } else { out_channels };
        let norm = layer_norm(norm_dim, LN_EPS, vb.pp("norm"))?;
        Ok(Self {
            conv,
            norm,
            pre_norm,
        })
    }

    /// Takes the map by value: its tokens are dropped as soon as the convolution has read them.
    fn forward(&self, map: FeatureMap) -> Result<FeatureMap> {
        let FeatureMap {
            tokens,
            height,
            width,
        } = map;
        if self.pre_norm {
            let normed = tokens.apply(&self.norm)?;
            drop(tokens);
            self.conv.forward(&normed, height, width, None)
        } else {
            self.conv.forward(&tokens, height, width, Some(&self.norm))
        }
    }
}

/// The 3×3 depthwise convolution added back to its input (DaViT's conditional position encoding), on the
/// channels-last tokens as they are ([`crate::depthwise`]).
struct DepthwiseConv {
    taps: Tensor,
    bias: Tensor,
}

impl DepthwiseConv {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            taps: crate::depthwise::channels_last_taps(&vb.get((dim, 1, 3, 3), "weight")?)?,
            bias: vb.get(dim, "bias")?,
        })
    }

    /// `conv(x) + x` on tokens `[B, N, C]` of a `height`×`width` map.
    fn forward_residual(&self, tokens: &Tensor, height: usize, width: usize) -> Result<Tensor> {
        let (b, n, c) = tokens.dims3()?;
        let nhwc = tokens.reshape((b, height, width, c))?;
        crate::depthwise::depthwise_conv3x3_residual(&nhwc, &self.taps, &self.bias)?
            .reshape((b, n, c))
    }
}

struct Mlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
    hidden: usize,
}

impl Mlp {
    fn new(
        cfg: &VisionConfig,
        dim: usize,
        act: Activation,
        vb: VarBuilder,
        q: Option<Quantization>,
    ) -> Result<Self> {
        // transformers truncates: int(dim * mlp_ratio).
        let hidden = (dim as f64 * cfg.mlp_ratio) as usize;
        Ok(Self {
            fc1: Linear::load(dim, hidden, true, vb.pp("fc1"), q)?,
            fc2: Linear::load(hidden, dim, true, vb.pp("fc2"), q)?,
            act,
            hidden,
        })
    }
}

impl Mlp {
    /// `xs + mlp(norm(xs))` for `xs` `[B, N, C]`, in chunks of rows: the norm, the MLP and the residual sum
    /// are all row-local, so neither the normed map nor the MLP's output exists whole (each is a full-size
    /// intermediate, 18 MiB on stage 0 of a 768x768 image in f32, and they set the tower's peak memory).
    fn forward_residual(&self, xs: &Tensor, norm: &LayerNorm) -> Result<Tensor> {
        let (b, n, c) = xs.dims3()?;
        let rows = chunk_floats(xs.device()) / self.hidden;
        map_row_chunks(&xs.reshape((b * n, c))?, rows, |chunk| {
            let hidden = activate(&chunk.apply(norm)?.apply(&self.fc1)?, self.act)?;
            add(&hidden.apply(&self.fc2)?, chunk)
        })?
        .reshape((b, n, c))
    }
}

/// Multi-head self-attention inside non-overlapping `window_size`² windows; the feature map is padded on the
/// right and bottom to whole windows and cropped back afterwards.
struct WindowAttention {
    qkv: Linear,
    proj: Linear,
    num_heads: usize,
    window: usize,
    scale: f64,
}

impl WindowAttention {
    fn new(
        cfg: &VisionConfig,
        stage: usize,
        vb: VarBuilder,
        q: Option<Quantization>,
    ) -> Result<Self> {
        let dim = cfg.embed_dim[stage];
        let num_heads = cfg.num_heads[stage];
        Ok(Self {
            qkv: Linear::load(dim, dim * 3, cfg.qkv_bias, vb.pp("qkv"), q)?,
            proj: Linear::load(dim, dim, true, vb.pp("proj"), q)?,
            num_heads,
            window: cfg.window_size,
            scale: ((dim / num_heads) as f64).powf(-0.5),
        })
    }

    /// `xs + proj(attention(norm(xs)))` for tokens `[B, H*W, C]` of an `h`×`w` map.
    ///
    /// Windows never cross a band of `window` image rows, so the block runs band by band (a few bands a
    /// chunk): the normed tokens, the windows, their q/k/v and the attention output exist for one chunk at a
    /// time, and only the input and the output are full-size. Done on the whole map, three 18 MiB copies
    /// were alive at once on stage 0 of a 768x768 image, which set the tower's peak memory.
    fn forward_residual(
        &self,
        xs: &Tensor,
        h: usize,
        w: usize,
        norm: &LayerNorm,
    ) -> Result<Tensor> {
        let ws = self.window;
        let band_floats = ws * w.next_multiple_of(ws) * 3 * xs.dim(2)?;
        let bands = (chunk_floats(xs.device()) / band_floats).max(1);
        self.forward_in_bands(xs, (h, w), norm, bands)
    }

    /// [`Self::forward_residual`] with chunks of `bands` bands of windows.
    fn forward_in_bands(
        &self,
        xs: &Tensor,
        (h, w): (usize, usize),
        norm: &LayerNorm,
        bands: usize,
    ) -> Result<Tensor> {
        let (b, _, c) = xs.dims3()?;
        let rows = bands * self.window;
        let images = (0..b)
            .map(|i| {
                let image = xs.get(i)?.reshape((h, w * c))?;
                concat_row_chunks(h, rows, |start, len| {
                    let tokens = image.narrow(0, start, len)?.reshape((len, w, c))?;
                    let mixed = self.band(&tokens.apply(norm)?)?;
                    add(&tokens, &mixed)?.reshape((len, w * c))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        stack(images)?.reshape((b, h * w, c))
    }

    /// Attention within the windows of `rows` `[R, W, C]` (normed tokens whose first row starts a row of
    /// windows) → `[R, W, C]`. The map is padded with zeros to whole windows after the norm, as
    /// transformers pads it.
    fn band(&self, rows: &Tensor) -> Result<Tensor> {
        let (h, w, c) = rows.dims3()?;
        let ws = self.window;
        let (hp, wp) = (h.next_multiple_of(ws), w.next_multiple_of(ws));
        let padded = if (hp, wp) != (h, w) {
            rows.pad_with_zeros(1, 0, wp - w)?
                .pad_with_zeros(0, 0, hp - h)?
        } else {
            rows.clone()
        };
        let (nh, nw) = (hp / ws, wp / ws);
        let windows = padded
            .reshape((nh, ws, nw, ws, c))?
            .permute((0, 2, 1, 3, 4))?
            .contiguous()?
            .reshape((nh * nw, ws * ws, c))?;
        drop(padded);
        self.attend(&windows)?
            .reshape((nh, nw, ws, ws, c))?
            .permute((0, 2, 1, 3, 4))?
            .reshape((hp, wp, c))?
            .narrow(0, 0, h)?
            .narrow(1, 0, w)
    }
}

impl WindowAttention {
    /// Self-attention within each window: `windows` `[n, window², C]` → `[n, window², C]`.
    fn attend(&self, windows: &Tensor) -> Result<Tensor> {
        let qkv = windows.apply(&self.qkv)?;
        window_attention(&qkv, self.num_heads, self.scale)?.apply(&self.proj)
    }
}

/// Attention between the channels of each group, over all spatial tokens (scale: tokens^-1/2).
struct ChannelAttention {
    /// The q and k rows of the qkv projection, and its v rows: the attention runs in two passes over the
    /// tokens (see `forward`).
    qk: Linear,
    v: Linear,
    proj: Linear,
    groups: usize,
}

impl ChannelAttention {
    fn new(
        cfg: &VisionConfig,
        stage: usize,
        vb: VarBuilder,
        q: Option<Quantization>,
    ) -> Result<Self> {
        let dim = cfg.embed_dim[stage];
        let weight = vb.pp("qkv").get((3 * dim, dim), "weight")?;
        let bias = if cfg.qkv_bias {
            Some(vb.pp("qkv").get(3 * dim, "bias")?)
        } else {
            None
        };
        // A fresh buffer holding exactly these rows: a narrowed view would keep the whole qkv weight alive,
        // and candle's quantizer reads a view's whole buffer.
        let rows = |t: &Tensor, start: usize, len: usize| {
            let index = Tensor::arange(start as u32, (start + len) as u32, t.device())?;
            t.index_select(&index, 0)
        };
        let part = |start: usize, len: usize| -> Result<Linear> {
            let bias = bias.as_ref().map(|b| rows(b, start, len)).transpose()?;
            Linear::new(rows(&weight, start, len)?, bias, q)
        };
        Ok(Self {
            qk: part(0, 2 * dim)?,
            v: part(2 * dim, dim)?,
            proj: Linear::load(dim, dim, true, vb.pp("proj"), q)?,
            groups: cfg.num_groups[stage],
        })
    }
}

impl ChannelAttention {
    /// `xs + proj(attention(norm(xs)))` for tokens `[B, N, C]`.
    ///
    /// The scores `qᵀk` of a group sum over the tokens, so they are accumulated over chunks of rows (pass 1,
    /// q and k of one chunk at a time); the output `v softmax(qᵀk * N^-1/2)ᵀ` is again row-local (pass 2, v of
    /// one chunk at a time, projected and added to its rows). The same products as one pass, but the
    /// `[N, 3C]` projection (54 MiB on stage 0 of a 768x768 image) and the normed tokens never exist whole;
    /// each chunk is normed in both passes instead.
    fn forward_residual(&self, xs: &Tensor, norm: &LayerNorm) -> Result<Tensor> {
        let c = xs.dim(2)?;
        self.forward_in_chunks(xs, norm, (chunk_floats(xs.device()) / (2 * c)).max(1))
    }
}

impl ChannelAttention {
    /// [`Self::forward_residual`] with chunks of `rows` tokens.
    fn forward_in_chunks(&self, xs: &Tensor, norm: &LayerNorm, rows: usize) -> Result<Tensor> {
        let (b, n, c) = xs.dims3()?;
        let (groups, group_dim) = (self.groups, c / self.groups);
        // [rows, C] → [groups, rows, group_dim]
        let by_group = |t: Tensor| -> Result<Tensor> {
            let r = t.dim(0)?;
            t.reshape((r, groups, group_dim))?
                .transpose(0, 1)?
                .contiguous()
        };
        let images = (0..b)
            .map(|i| {
                let image = xs.get(i)?;
                let mut scores: Option<Tensor> = None;
                for start in (0..n).step_by(rows) {
                    let qk = image
                        .narrow(0, start, rows.min(n - start))?
                        .apply(norm)?
                        .apply(&self.qk)?;
                    let q = by_group(qk.narrow(1, 0, c)?)?;
                    let k = by_group(qk.narrow(1, c, c)?)?;
                    // [groups, group_dim, group_dim], summed in f32 whatever the model dtype: one
                    // rounding at the end, as a single product accumulating in f32 would have.
                    let partial = to_dtype(&q.transpose(1, 2)?, DType::F32)?
                        .matmul(&to_dtype(&k, DType::F32)?)?;
                    scores = Some(match scores {
                        Some(sum) => (sum + partial)?,
                        None => partial,
                    });
                }
                let Some(scores) = scores else {
                    candle_core::bail!("channel attention over a feature map without tokens");
                };
                // Scaled and normalized in f32: the unscaled sums over all tokens of a stage leave the
                // half-precision range where the scaled scores (what the reference computes, with q scaled
                // first) stay inside it.
                let probs = candle_nn::ops::softmax_last_dim(&(scores * (n as f64).powf(-0.5))?)?;
                // On the CPU the product is taken in f32 (candle's CPU matmul would widen a half-precision
                // one for each chunk anyway, with copies), with one rounding at the end.
                let product_dtype = if xs.device().is_cpu() {
                    DType::F32
                } else {
                    xs.dtype()
                };
                let probs_t = to_dtype(&probs.transpose(1, 2)?, product_dtype)?.contiguous()?;
                // The output projection is row-local too: applied per chunk, the unprojected output never
                // exists whole.
                map_row_chunks(&image, rows, |chunk| {
                    // [groups, rows, group_dim]
                    let v = by_group(chunk.apply(norm)?.apply(&self.v)?)?;
                    let out = to_dtype(&v, product_dtype)?.matmul(&probs_t)?;
                    let out = to_dtype(
                        &out.transpose(0, 1)?.reshape((chunk.dim(0)?, c))?,
                        xs.dtype(),
                    )?;
                    add(chunk, &out.apply(&self.proj)?)
                })
            })
            .collect::<Result<Vec<_>>>()?;
        stack(images)
    }
}

/// Which attention a [`DualBlock`] half uses.
enum Mixer {
    Window(WindowAttention),
    Channel(ChannelAttention),
}

/// One half of a DaViT block: `conv1` + attention (pre-norm, residual), `conv2` + MLP (pre-norm, residual).
/// The spatial and channel halves differ only in their attention.
struct DualBlock {
    conv1: DepthwiseConv,
    norm1: LayerNorm,
    mixer: Mixer,
    conv2: DepthwiseConv,
    norm2: LayerNorm,
    ffn: Mlp,
}

impl DualBlock {
    fn new(
        cfg: &VisionConfig,
        stage: usize,
        spatial: bool,
        act: Activation,
        vb: VarBuilder,
        q: Option<Quantization>,
    ) -> Result<Self> {
        let dim = cfg.embed_dim[stage];
        let mixer = if spatial {
            Mixer::Window(WindowAttention::new(cfg, stage, vb.pp("window_attn"), q)?)
        } else {
            Mixer::Channel(ChannelAttention::new(cfg, stage, vb.pp("channel_attn"), q)?)
        };
        Ok(Self {
            conv1: DepthwiseConv::new(dim, vb.pp("conv1"))?,
            norm1: layer_norm(dim, LN_EPS, vb.pp("norm1"))?,
            mixer,
            conv2: DepthwiseConv::new(dim, vb.pp("conv2"))?,
            norm2: layer_norm(dim, LN_EPS, vb.pp("norm2"))?,
            ffn: Mlp::new(cfg, dim, act, vb.pp("ffn"), q)?,
        })
    }

    /// Tokens `[B, H*W, C]` of an `h`×`w` map → the same shape.
    ///
    /// Takes the tokens by value and drops each full-size intermediate as soon as it is used: on stage 0 of a
    /// 768x768 image each is 18 MiB, and how many are alive at once sets the tower's peak memory.
    fn forward(&self, xs: Tensor, h: usize, w: usize) -> Result<Tensor> {
        let residual = self.conv1.forward_residual(&xs, h, w)?;
        drop(xs);
        let xs = match &self.mixer {
            Mixer::Window(attn) => attn.forward_residual(&residual, h, w, &self.norm1)?,
            Mixer::Channel(attn) => attn.forward_residual(&residual, &self.norm1)?,
        };
        drop(residual);

        let residual = self.conv2.forward_residual(&xs, h, w)?;
        drop(xs);
        self.ffn.forward_residual(&residual, &self.norm2)
    }
}

/// transformers' `Florence2VisionBackbone`: pixel values `[B, 3, H, W]` → features `[B, C_last, H/32, W/32]`
/// (for the released strides).
pub struct Florence2VisionBackbone {
    convs: Vec<ConvEmbed>,
    blocks: Vec<Vec<(DualBlock, DualBlock)>>,
}

impl Florence2VisionBackbone {
    /// Loads from `vb` at `model.vision_tower`, the linear layers quantized when `q` says so.
    pub fn new(cfg: &VisionConfig, vb: VarBuilder, q: Option<Quantization>) -> Result<Self> {
        let act =
            crate::nn::activation(&cfg.activation_function).map_err(candle_core::Error::Msg)?;
        let mut convs = Vec::with_capacity(cfg.embed_dim.len());
        let mut blocks = Vec::with_capacity(cfg.embed_dim.len());
        for stage in 0..cfg.embed_dim.len() {
            convs.push(ConvEmbed::new(cfg, stage, vb.pp(format!("convs.{stage}")))?);
            let stage_vb = vb.pp(format!("blocks.{stage}"));
            let stage_blocks = (0..cfg.depths[stage])
                .map(|i| {
                    let block_vb = stage_vb.pp(i.to_string());
                    Ok((
                        DualBlock::new(cfg, stage, true, act, block_vb.pp("spatial_block"), q)?,
                        DualBlock::new(cfg, stage, false, act, block_vb.pp("channel_block"), q)?,
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            blocks.push(stage_blocks);
        }
        Ok(Self { convs, blocks })
    }

    /// Runs the tower; `pixel_values` must already be in the model's dtype.
    /// Takes the pixels by value, to drop them (unless the caller keeps a handle) once they are tokens.
    pub fn forward(&self, pixel_values: Tensor) -> Result<Tensor> {
        let (_, _, height, width) = pixel_values.dims4()?;
        let mut map = FeatureMap {
            tokens: nchw_to_tokens(&pixel_values)?,
            height,
            width,
        };
        drop(pixel_values);
        for (conv, stage_blocks) in self.convs.iter().zip(&self.blocks) {
            map = conv.forward(map)?;
            let (h, w) = (map.height, map.width);
            for (spatial, channel) in stage_blocks {
                // Moved through the blocks, so that no block's input outlives its first use.
                let tokens = spatial.forward(map.tokens, h, w)?;
                map.tokens = channel.forward(tokens, h, w)?;
            }
        }
        tokens_to_nchw(&map.tokens, map.height, map.width)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module};

    /// The two-pass chunked channel attention against the one-pass formula (transformers'): the whole
    /// projection, `softmax(qᵀk * N^-1/2)` per group, `v` times its transpose.
    #[test]
    fn chunked_channel_attention_is_the_one_pass_formula() {
        let dev = Device::Cpu;
        let (b, n, c, groups) = (2, 11, 6, 3);
        let randn = |shape: &[usize]| Tensor::randn(0f32, 1., shape, &dev).unwrap();
        let (w, bias, proj_w) = (randn(&[3 * c, c]), randn(&[3 * c]), randn(&[c, c]));
        let part = |start, len| {
            let rows = |t: &Tensor| t.narrow(0, start, len).unwrap().contiguous().unwrap();
            Linear::new(rows(&w), Some(rows(&bias)), None).unwrap()
        };
        let attn = ChannelAttention {
            qk: part(0, 2 * c),
            v: part(2 * c, c),
            proj: Linear::new(proj_w.clone(), None, None).unwrap(),
            groups,
        };
        let xs = randn(&[b, n, c]);
        let (norm, normed) = norm_and_reference(&xs);

        let qkv = normed
            .broadcast_matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&bias)
            .unwrap();
        let qkv = qkv
            .reshape((b, n, 3, groups, c / groups))
            .unwrap()
            .permute((2, 0, 3, 1, 4))
            .unwrap();
        let [q, k, v] = [0, 1, 2].map(|i| qkv.get(i).unwrap().contiguous().unwrap()); // [B, g, N, d]
        let scores =
            (q.transpose(2, 3).unwrap().matmul(&k).unwrap() * (n as f64).powf(-0.5)).unwrap();
        let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        let out = v.matmul(&probs.transpose(2, 3).unwrap()).unwrap(); // [B, g, N, d]
        let out = out.transpose(1, 2).unwrap().reshape((b, n, c)).unwrap();
        let expected = (&xs + out.broadcast_matmul(&proj_w.t().unwrap()).unwrap()).unwrap();

        for rows in [1, 4, n] {
            let got = attn.forward_in_chunks(&xs, &norm, rows).unwrap();
            let diff = (got - &expected).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-4, "chunks of {rows}");
        }
    }

    /// A LayerNorm over the last dim of `xs` with random affine parameters, and its output by candle's
    /// LayerNorm.
    fn norm_and_reference(xs: &Tensor) -> (LayerNorm, Tensor) {
        let c = xs.dim(2).unwrap();
        let dev = xs.device();
        let weight = Tensor::randn(1f32, 0.5, c, dev).unwrap();
        let bias = Tensor::randn(0f32, 0.5, c, dev).unwrap();
        let tensors = std::collections::HashMap::from([
            ("weight".to_string(), weight.clone()),
            ("bias".to_string(), bias.clone()),
        ]);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, dev);
        let norm = layer_norm(c, 1e-5, vb).unwrap();
        let normed = candle_nn::LayerNorm::new(weight, bias, 1e-5)
            .forward(xs)
            .unwrap();
        (norm, normed)
    }

    /// Window attention band by band (chunks of one band, with maps that do not fill whole windows) against
    /// the whole map in one chunk, which pads and splits it as transformers does.
    #[test]
    fn window_attention_in_bands_is_the_whole_map_at_once() {
        let dev = Device::Cpu;
        let (b, c, heads, window) = (2, 8, 2, 3);
        let randn = |shape: &[usize]| Tensor::randn(0f32, 1., shape, &dev).unwrap();
        let attn = WindowAttention {
            qkv: Linear::new(randn(&[3 * c, c]), Some(randn(&[3 * c])), None).unwrap(),
            proj: Linear::new(randn(&[c, c]), Some(randn(&[c])), None).unwrap(),
            num_heads: heads,
            window,
            scale: ((c / heads) as f64).powf(-0.5),
        };
        for (h, w) in [(7, 5), (6, 6), (2, 4)] {
            let xs = randn(&[b, h * w, c]);
            let (norm, _) = norm_and_reference(&xs);
            let whole = attn.forward_in_bands(&xs, (h, w), &norm, h).unwrap();
            assert_eq!(whole.dims(), &[b, h * w, c]);
            for bands in [1, 2] {
                let got = attn.forward_in_bands(&xs, (h, w), &norm, bands).unwrap();
                let diff = (got - &whole).unwrap().abs().unwrap().max_all().unwrap();
                assert!(
                    diff.to_scalar::<f32>().unwrap() < 1e-5,
                    "{h}x{w}, {bands} bands"
                );
            }
        }
    }
}
