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
use candle_nn::{Activation, Conv2dConfig, VarBuilder};

use crate::interrupt::{checked_within, Interrupt};
use crate::layers::activation::activation;
use crate::layers::attention::window_attention;
use crate::layers::conv::{depthwise_conv3x3_residual, depthwise_taps, TokenConv2d};
use crate::layers::ops::{
    grouped_matmul, grouped_outer_sums, nchw_to_tokens, pre_norm_residual, stack, to_dtype,
    tokens_to_nchw,
};
use crate::layers::{layer_norm, LayerNorm, Linear, Mlp, Quantization, LAYER_NORM_EPS};
use crate::model::config::VisionConfig;

/// About how many values the intermediates of one chunk of rows (MLP hidden units, window q/k/v, patch rows)
/// may hold on `device`. On the CPU 2 Mi (8 MiB in f32), which bounds the peak memory. A GPU pays for every
/// chunk in kernel launches and has memory to spare, so there the whole map is one chunk.
fn chunk_values(device: &Device) -> usize {
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

/// transformers' `Florence2VisionConvEmbed`: a strided convolution with a LayerNorm before (stages > 0) or
/// after (stage 0) it.
struct Florence2VisionConvEmbed {
    conv: TokenConv2d,
    norm: LayerNorm,
    pre_norm: bool,
}

impl Florence2VisionConvEmbed {
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
        let conv = TokenConv2d::new(
            in_channels,
            out_channels,
            cfg.patch_size[stage],
            conv_cfg,
            vb.pp("conv"),
        )?;
        let pre_norm = cfg.patch_prenorm[stage];
        let norm_dim = if pre_norm { in_channels } else { out_channels };
        let norm = layer_norm(norm_dim, LAYER_NORM_EPS, vb.pp("norm"))?;
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
        let chunk = chunk_values(tokens.device());
        let (tokens, height, width) = if self.pre_norm {
            let normed = tokens.apply(&self.norm)?;
            drop(tokens);
            self.conv.forward(&normed, (height, width), None, chunk)?
        } else {
            self.conv
                .forward(&tokens, (height, width), Some(&self.norm), chunk)?
        };
        Ok(FeatureMap {
            tokens,
            height,
            width,
        })
    }
}

/// A block's `conv1` / `conv2`: a 3×3 depthwise convolution added back to its input (DaViT's conditional
/// position encoding), on the channels-last tokens as they are.
struct DepthwiseConv {
    taps: Tensor,
    bias: Tensor,
}

impl DepthwiseConv {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            taps: depthwise_taps(&vb.get((dim, 1, 3, 3), "weight")?)?,
            bias: vb.get(dim, "bias")?,
        })
    }

    /// `x + conv(x)` on tokens `[B, N, C]` of a `height`×`width` map; `x` is dropped once read.
    fn forward(&self, x: Tensor, height: usize, width: usize) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let nhwc = x.reshape((b, height, width, c))?;
        depthwise_conv3x3_residual(&nhwc, &self.taps, &self.bias)?.reshape((b, n, c))
    }
}

/// The attention of a spatial or a channel block: the one part in which the two differ.
trait BlockAttention: Sized {
    /// The attention's name in the checkpoint.
    const NAME: &'static str;

    fn new(
        cfg: &VisionConfig,
        stage: usize,
        vb: VarBuilder,
        q: Option<Quantization>,
    ) -> Result<Self>;

    /// `x + attention(norm(x))` for tokens `[B, H*W, C]` of an `h`×`w` map; `x` is dropped once read.
    /// `interrupt` is asked before each image and each chunk of rows.
    fn residual(
        &self,
        x: Tensor,
        norm: &LayerNorm,
        h: usize,
        w: usize,
        interrupt: &dyn Interrupt,
    ) -> crate::Result<Tensor>;
}

/// transformers' `Florence2VisionWindowAttention`: multi-head self-attention inside non-overlapping
/// `window_size`² windows; the feature map is padded on the right and bottom to whole windows and cropped back
/// afterwards.
struct Florence2VisionWindowAttention {
    qkv: Linear,
    proj: Linear,
    num_heads: usize,
    window: usize,
    scale: f64,
}

impl BlockAttention for Florence2VisionWindowAttention {
    const NAME: &'static str = "window_attn";

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

    fn residual(
        &self,
        x: Tensor,
        norm: &LayerNorm,
        h: usize,
        w: usize,
        interrupt: &dyn Interrupt,
    ) -> crate::Result<Tensor> {
        let ws = self.window;
        let band_values = ws * w.next_multiple_of(ws) * 3 * x.dim(2)?;
        let bands = (chunk_values(x.device()) / band_values).max(1);
        self.residual_in_bands(&x, (h, w), norm, bands, interrupt)
    }
}

impl Florence2VisionWindowAttention {
    /// `x + attention(norm(x))` in chunks of `bands` bands of `window` image rows. Windows never cross a
    /// band, so the whole is row-local over bands: the normed tokens, the windows, their q/k/v and the
    /// attention output exist for one chunk at a time. `interrupt` is asked before each image and each chunk.
    fn residual_in_bands(
        &self,
        x: &Tensor,
        (h, w): (usize, usize),
        norm: &LayerNorm,
        bands: usize,
        interrupt: &dyn Interrupt,
    ) -> crate::Result<Tensor> {
        let (b, _, c) = x.dims3()?;
        let images = (0..b)
            .map(|i| {
                interrupt.check()?;
                let image = x.get(i)?.reshape((h, w, c))?;
                checked_within(interrupt, |check| {
                    pre_norm_residual(&image, norm, bands * self.window, |rows| {
                        check()?;
                        self.band(rows)
                    })
                })
            })
            .collect::<crate::Result<Vec<_>>>()?;
        Ok(stack(images)?.reshape((b, h * w, c))?)
    }

    /// Attention within the windows of `rows` `[R, W, C]` (normed tokens whose first row starts a row of
    /// windows) → `[R, W, C]`. The map is padded with zeros to whole windows after the norm, as
    /// transformers pads it.
    fn band(&self, rows: &Tensor) -> Result<Tensor> {
        // Its self time is the window partition (padding, permuting) and its inverse.
        let _span = crate::profile::span("window partition");
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

    /// Self-attention within each window: `windows` `[n, window², C]` → `[n, window², C]`.
    fn attend(&self, windows: &Tensor) -> Result<Tensor> {
        let qkv = windows.apply(&self.qkv)?;
        window_attention(&qkv, self.num_heads, self.scale)?.apply(&self.proj)
    }
}

/// transformers' `Florence2VisionChannelAttention`: attention between the channels of each group, over all
/// spatial tokens (scale: tokens^-1/2).
struct Florence2VisionChannelAttention {
    /// The q and k rows of the qkv projection, and its v rows: the attention runs in two passes over the
    /// tokens (see [`Self::residual_in_chunks`]).
    qk: Linear,
    v: Linear,
    proj: Linear,
    groups: usize,
}

impl BlockAttention for Florence2VisionChannelAttention {
    const NAME: &'static str = "channel_attn";

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

    fn residual(
        &self,
        x: Tensor,
        norm: &LayerNorm,
        _h: usize,
        _w: usize,
        interrupt: &dyn Interrupt,
    ) -> crate::Result<Tensor> {
        let rows = (chunk_values(x.device()) / (2 * x.dim(2)?)).max(1);
        self.residual_in_chunks(&x, norm, rows, interrupt)
    }
}

impl Florence2VisionChannelAttention {
    /// `x + attention(norm(x))` in chunks of `rows` tokens.
    ///
    /// The scores `qᵀk` of a group sum over the tokens, so they are accumulated over chunks of rows (pass 1,
    /// [`Self::weights`]); given them, the output `v softmax(qᵀk * N^-1/2)ᵀ` is row-local (pass 2). The same
    /// products as one pass, but the `[N, 3C]` projection and the normed tokens never exist whole; each chunk
    /// is normed in both passes instead. `interrupt` is asked before each image and each chunk of pass 2.
    fn residual_in_chunks(
        &self,
        x: &Tensor,
        norm: &LayerNorm,
        rows: usize,
        interrupt: &dyn Interrupt,
    ) -> crate::Result<Tensor> {
        let images = (0..x.dim(0)?)
            .map(|i| {
                interrupt.check()?;
                let image = x.get(i)?;
                let weights_t = self.weights(&image, norm, rows)?;
                checked_within(interrupt, |check| {
                    pre_norm_residual(&image, norm, rows, |x| {
                        check()?;
                        self.mix(x, &weights_t)
                    })
                })
            })
            .collect::<crate::Result<Vec<_>>>()?;
        Ok(stack(images)?)
    }

    /// Pass 1 over the tokens `[N, C]` of one image: the transposed attention weights
    /// `softmax(qᵀk * N^-1/2)ᵀ` per group, `[groups, group_dim, group_dim]`, in the dtype of pass 2's product.
    fn weights(&self, image: &Tensor, norm: &LayerNorm, rows: usize) -> Result<Tensor> {
        let _span = crate::profile::span("channel attention scores");
        let n = image.dim(0)?;
        let mut scores: Option<Tensor> = None;
        for start in (0..n).step_by(rows) {
            let qk = image
                .narrow(0, start, rows.min(n - start))?
                .apply(norm)?
                .apply(&self.qk)?;
            // Summed in f32 whatever the model dtype: one rounding at the end, as a single product
            // accumulating in f32 would have.
            let partial = grouped_outer_sums(&qk, self.groups)?;
            scores = Some(match scores {
                Some(sum) => (sum + partial)?,
                None => partial,
            });
        }
        let Some(scores) = scores else {
            candle_core::bail!("channel attention over a feature map without tokens");
        };
        // Scaled and normalized in f32: the unscaled sums over all tokens of a stage leave the half-precision
        // range where the scaled scores (what the reference computes, with q scaled first) stay inside it.
        let probs = candle_nn::ops::softmax_last_dim(&(scores * (n as f64).powf(-0.5))?)?;
        to_dtype(&probs.transpose(1, 2)?, self.product_dtype(image))?.contiguous()
    }

    /// On the CPU pass 2's product is taken in f32 (the grouped kernel sums in f32 whatever the rows' dtype),
    /// with one rounding at the end.
    fn product_dtype(&self, image: &Tensor) -> DType {
        if image.device().is_cpu() {
            DType::F32
        } else {
            image.dtype()
        }
    }

    /// Pass 2 for normed rows `[R, C]`: `proj(v weights_t)`, in the rows' dtype.
    fn mix(&self, normed: &Tensor, weights_t: &Tensor) -> Result<Tensor> {
        let v = normed.apply(&self.v)?;
        let mixed = {
            let _span = crate::profile::span("channel attention mix");
            grouped_matmul(&v, weights_t)?
        };
        mixed.apply(&self.proj)
    }
}

/// transformers' `Florence2VisionSpatialBlock` (`A` = window attention) and `Florence2VisionChannelBlock`
/// (`A` = channel attention): `x + conv1(x)`, `x + attention(norm1(x))`, `x + conv2(x)`, `x + ffn(norm2(x))`.
struct AttentionBlock<A> {
    conv1: DepthwiseConv,
    norm1: LayerNorm,
    attention: A,
    conv2: DepthwiseConv,
    norm2: LayerNorm,
    /// transformers' `Florence2VisionMLP`.
    ffn: Mlp,
}

type Florence2VisionSpatialBlock = AttentionBlock<Florence2VisionWindowAttention>;
type Florence2VisionChannelBlock = AttentionBlock<Florence2VisionChannelAttention>;

impl<A: BlockAttention> AttentionBlock<A> {
    fn new(
        cfg: &VisionConfig,
        stage: usize,
        act: Activation,
        vb: VarBuilder,
        q: Option<Quantization>,
    ) -> Result<Self> {
        let dim = cfg.embed_dim[stage];
        Ok(Self {
            conv1: DepthwiseConv::new(dim, vb.pp("conv1"))?,
            norm1: layer_norm(dim, LAYER_NORM_EPS, vb.pp("norm1"))?,
            attention: A::new(cfg, stage, vb.pp(A::NAME), q)?,
            conv2: DepthwiseConv::new(dim, vb.pp("conv2"))?,
            norm2: layer_norm(dim, LAYER_NORM_EPS, vb.pp("norm2"))?,
            // transformers truncates: int(dim * mlp_ratio).
            ffn: Mlp::load(
                dim,
                (dim as f64 * cfg.mlp_ratio) as usize,
                act,
                &vb.pp("ffn"),
                q,
            )?,
        })
    }

    /// Tokens `[B, H*W, C]` of an `h`×`w` map → the same shape. Each step takes its input by value, so that
    /// no full-size intermediate outlives its use; `interrupt` is asked before each step and each chunk of
    /// rows, as one step over a large batch of images, or over one large image, can take a while.
    fn forward(
        &self,
        x: Tensor,
        h: usize,
        w: usize,
        interrupt: &dyn Interrupt,
    ) -> crate::Result<Tensor> {
        interrupt.check()?;
        let x = self.conv1.forward(x, h, w)?;
        let x = self.attention.residual(x, &self.norm1, h, w, interrupt)?;
        interrupt.check()?;
        let x = self.conv2.forward(x, h, w)?;
        interrupt.check()?;
        let (b, n, c) = x.dims3()?;
        let rows = chunk_values(x.device()) / self.ffn.hidden();
        let x = checked_within(interrupt, |check| {
            pre_norm_residual(&x.reshape((b * n, c))?, &self.norm2, rows, |x| {
                check()?;
                x.apply(&self.ffn)
            })
        })?;
        Ok(x.reshape((b, n, c))?)
    }
}

/// transformers' `Florence2VisionBlock`: a spatial block, then a channel block.
struct Florence2VisionBlock {
    spatial_block: Florence2VisionSpatialBlock,
    channel_block: Florence2VisionChannelBlock,
}

impl Florence2VisionBlock {
    fn new(
        cfg: &VisionConfig,
        stage: usize,
        act: Activation,
        vb: VarBuilder,
        q: Option<Quantization>,
    ) -> Result<Self> {
        Ok(Self {
            spatial_block: AttentionBlock::new(cfg, stage, act, vb.pp("spatial_block"), q)?,
            channel_block: AttentionBlock::new(cfg, stage, act, vb.pp("channel_block"), q)?,
        })
    }

    fn forward(
        &self,
        x: Tensor,
        h: usize,
        w: usize,
        interrupt: &dyn Interrupt,
    ) -> crate::Result<Tensor> {
        let x = self.spatial_block.forward(x, h, w, interrupt)?;
        self.channel_block.forward(x, h, w, interrupt)
    }
}

/// transformers' `Florence2VisionBackbone`: pixel values `[B, 3, H, W]` → features `[B, C_last, H/32, W/32]`
/// (for the released strides).
pub struct Florence2VisionBackbone {
    convs: Vec<Florence2VisionConvEmbed>,
    blocks: Vec<Vec<Florence2VisionBlock>>,
}

impl Florence2VisionBackbone {
    /// Loads from `vb` at `model.vision_tower`, the linear layers quantized when `q` says so.
    pub fn new(cfg: &VisionConfig, vb: VarBuilder, q: Option<Quantization>) -> Result<Self> {
        let act = activation(&cfg.activation_function).map_err(candle_core::Error::Msg)?;
        let mut convs = Vec::with_capacity(cfg.embed_dim.len());
        let mut blocks = Vec::with_capacity(cfg.embed_dim.len());
        for stage in 0..cfg.embed_dim.len() {
            convs.push(Florence2VisionConvEmbed::new(
                cfg,
                stage,
                vb.pp(format!("convs.{stage}")),
            )?);
            let stage_vb = vb.pp(format!("blocks.{stage}"));
            let stage_blocks = (0..cfg.depths[stage])
                .map(|i| Florence2VisionBlock::new(cfg, stage, act, stage_vb.pp(i.to_string()), q))
                .collect::<Result<Vec<_>>>()?;
            blocks.push(stage_blocks);
        }
        Ok(Self { convs, blocks })
    }

    /// Runs the tower; `pixel_values` must already be in the model's dtype. `interrupt` is asked before each
    /// stage's patch embedding and each step of its blocks.
    /// Takes the pixels by value, to drop them (unless the caller keeps a handle) once they are tokens.
    pub fn forward(
        &self,
        pixel_values: Tensor,
        interrupt: &dyn Interrupt,
    ) -> crate::Result<Tensor> {
        let _span = crate::profile::span("tower: other");
        let (_, _, height, width) = pixel_values.dims4()?;
        let mut map = FeatureMap {
            tokens: nchw_to_tokens(&pixel_values)?,
            height,
            width,
        };
        drop(pixel_values);
        for (stage, (conv, stage_blocks)) in self.convs.iter().zip(&self.blocks).enumerate() {
            let _stage = crate::profile::stage(stage);
            interrupt.check()?;
            map = conv.forward(map)?;
            for block in stage_blocks {
                map.tokens = block.forward(map.tokens, map.height, map.width, interrupt)?;
            }
        }
        Ok(tokens_to_nchw(&map.tokens, map.height, map.width)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::Uninterrupted;
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
        let attn = Florence2VisionChannelAttention {
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
            let got = attn
                .residual_in_chunks(&xs, &norm, rows, &Uninterrupted)
                .unwrap();
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
        let norm = layer_norm(c, LAYER_NORM_EPS, vb).unwrap();
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
        let attn = Florence2VisionWindowAttention {
            qkv: Linear::new(randn(&[3 * c, c]), Some(randn(&[3 * c])), None).unwrap(),
            proj: Linear::new(randn(&[c, c]), Some(randn(&[c])), None).unwrap(),
            num_heads: heads,
            window,
            scale: ((c / heads) as f64).powf(-0.5),
        };
        for (h, w) in [(7, 5), (6, 6), (2, 4)] {
            let xs = randn(&[b, h * w, c]);
            let (norm, _) = norm_and_reference(&xs);
            let whole = attn
                .residual_in_bands(&xs, (h, w), &norm, h, &Uninterrupted)
                .unwrap();
            assert_eq!(whole.dims(), &[b, h * w, c]);
            for bands in [1, 2] {
                let got = attn
                    .residual_in_bands(&xs, (h, w), &norm, bands, &Uninterrupted)
                    .unwrap();
                let diff = (got - &whole).unwrap().abs().unwrap().max_all().unwrap();
                assert!(
                    diff.to_scalar::<f32>().unwrap() < 1e-5,
                    "{h}x{w}, {bands} bands"
                );
            }
        }
    }
}
