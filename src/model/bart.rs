//! The BART encoder-decoder ("BART: Denoising Sequence-to-Sequence Pre-training", Lewis et al., 2019,
//! arXiv:1910.13461) that Florence-2 uses as its language model; reference: transformers'
//! models/bart/modeling_bart.py.
//!
//! Post-LayerNorm layers, learned positions with BART's offset of 2, `layernorm_embedding` after the
//! embeddings, no final LayerNorm. For decoding, [`DecoderCache`] keeps the self-attention keys/values of
//! past steps and computes the cross-attention keys/values once per encoder output (as whisper does in
//! candle-transformers).

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Activation, Embedding, VarBuilder};

use crate::interrupt::Interrupt;
use crate::layers::activation::activation;
use crate::layers::attention::attention;
use crate::layers::embedding::TokenEmbedding;
use crate::layers::ops::{add, broadcast_add, to_dtype};
use crate::layers::{layer_norm, LayerNorm, LAYER_NORM_EPS};
use crate::layers::{Linear, Mlp, Quantization};
use crate::model::config::TextConfig;

/// BART's learned positions start at row 2 (rows 0 and 1 were reserved for padding in fairseq).
const POSITION_OFFSET: usize = 2;

/// Additive mask value for positions that must not be attended to. Finite so that a fully masked row gives
/// a uniform softmax instead of NaN, as transformers' `finfo.min` masks do.
fn mask_value(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => -65504.0,
        DType::BF16 => -3.389e38,
        _ => f32::MIN as f64,
    }
}

struct BartAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl BartAttention {
    fn new(dim: usize, num_heads: usize, vb: VarBuilder, q: Option<Quantization>) -> Result<Self> {
        Ok(Self {
            q_proj: Linear::load(dim, dim, true, vb.pp("q_proj"), q)?,
            k_proj: Linear::load(dim, dim, true, vb.pp("k_proj"), q)?,
            v_proj: Linear::load(dim, dim, true, vb.pp("v_proj"), q)?,
            out_proj: Linear::load(dim, dim, true, vb.pp("out_proj"), q)?,
            num_heads,
            head_dim: dim / num_heads,
        })
    }

    /// `[B, T, D]` → `[B, heads, T, head_dim]`.
    fn split_heads(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, t, _) = xs.dims3()?;
        xs.reshape((b, t, self.num_heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// Keys and values of `xs`, split into heads.
    fn key_values(&self, xs: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.split_heads(&xs.apply(&self.k_proj)?)?,
            self.split_heads(&xs.apply(&self.v_proj)?)?,
        ))
    }

    /// Attends from `xs` `[B, T, D]` to the given keys/values; `mask` is additive, broadcastable to
    /// `[B / group, heads, group * T, S]`.
    ///
    /// With `group > 1`, each run of `group` consecutive rows of `xs` shares one row of keys/values
    /// (`[B / group, heads, S, head_dim]`): the beams of one item attending to its encoder states. Their
    /// queries are stacked so that the keys/values are read once per item, not once per beam, and never
    /// copied per beam.
    fn attend(
        &self,
        xs: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        mask: Option<&Tensor>,
        group: usize,
    ) -> Result<Tensor> {
        let (b, t, d) = xs.dims3()?;
        let (h, hd) = (self.num_heads, self.head_dim);
        let q = self.split_heads(&xs.apply(&self.q_proj)?)?;
        let scale = (hd as f64).powf(-0.5);
        let out = if group == 1 {
            attention(&q, keys, values, scale, mask)?
        } else {
            let items = b / group;
            let q = q
                .reshape((items, group, h, t, hd))?
                .transpose(1, 2)?
                .reshape((items, h, group * t, hd))?;
            let out = attention(&q, keys, values, scale, mask)?;
            out.reshape((items, h, group, t, hd))?
                .transpose(1, 2)?
                .reshape((b, h, t, hd))?
        };
        out.transpose(1, 2)?
            .reshape((b, t, d))?
            .apply(&self.out_proj)
    }
}

struct BartEncoderLayer {
    self_attn: BartAttention,
    self_attn_layer_norm: LayerNorm,
    ffn: Mlp,
    final_layer_norm: LayerNorm,
}

impl BartEncoderLayer {
    fn new(
        cfg: &TextConfig,
        act: Activation,
        vb: VarBuilder,
        q: Option<Quantization>,
    ) -> Result<Self> {
        let d = cfg.d_model;
        Ok(Self {
            self_attn: BartAttention::new(d, cfg.encoder_attention_heads, vb.pp("self_attn"), q)?,
            self_attn_layer_norm: layer_norm(d, LAYER_NORM_EPS, vb.pp("self_attn_layer_norm"))?,
            ffn: Mlp::load(d, cfg.encoder_ffn_dim, act, &vb, q)?,
            final_layer_norm: layer_norm(d, LAYER_NORM_EPS, vb.pp("final_layer_norm"))?,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (k, v) = self.self_attn.key_values(xs)?;
        let xs = add(xs, &self.self_attn.attend(xs, &k, &v, Some(mask), 1)?)?
            .apply(&self.self_attn_layer_norm)?;
        add(&xs, &xs.apply(&self.ffn)?)?.apply(&self.final_layer_norm)
    }
}

struct BartDecoderLayer {
    self_attn: BartAttention,
    self_attn_layer_norm: LayerNorm,
    encoder_attn: BartAttention,
    encoder_attn_layer_norm: LayerNorm,
    ffn: Mlp,
    final_layer_norm: LayerNorm,
}

impl BartDecoderLayer {
    fn new(
        cfg: &TextConfig,
        act: Activation,
        vb: VarBuilder,
        q: Option<Quantization>,
    ) -> Result<Self> {
        let d = cfg.d_model;
        let heads = cfg.decoder_attention_heads;
        Ok(Self {
            self_attn: BartAttention::new(d, heads, vb.pp("self_attn"), q)?,
            self_attn_layer_norm: layer_norm(d, LAYER_NORM_EPS, vb.pp("self_attn_layer_norm"))?,
            encoder_attn: BartAttention::new(d, heads, vb.pp("encoder_attn"), q)?,
            encoder_attn_layer_norm: layer_norm(
                d,
                LAYER_NORM_EPS,
                vb.pp("encoder_attn_layer_norm"),
            )?,
            ffn: Mlp::load(d, cfg.decoder_ffn_dim, act, &vb, q)?,
            final_layer_norm: layer_norm(d, LAYER_NORM_EPS, vb.pp("final_layer_norm"))?,
        })
    }
}

/// `embed_positions` (transformers' `BartLearnedPositionalEmbedding`) followed by `layernorm_embedding`,
/// as the encoder and the decoder each apply them to their input embeddings.
struct EmbedPositions {
    embed_positions: Embedding,
    layernorm_embedding: LayerNorm,
    max_positions: usize,
}

impl EmbedPositions {
    fn new(cfg: &TextConfig, vb: &VarBuilder) -> Result<Self> {
        let rows = cfg.max_position_embeddings + POSITION_OFFSET;
        Ok(Self {
            embed_positions: candle_nn::embedding(rows, cfg.d_model, vb.pp("embed_positions"))?,
            layernorm_embedding: layer_norm(
                cfg.d_model,
                LAYER_NORM_EPS,
                vb.pp("layernorm_embedding"),
            )?,
            max_positions: cfg.max_position_embeddings,
        })
    }

    /// Adds positions `start..start+T` to `embeds` `[B, T, D]` and normalizes.
    fn forward(&self, embeds: &Tensor, start: usize) -> Result<Tensor> {
        let t = embeds.dim(1)?;
        if start + t > self.max_positions {
            candle_core::bail!(
                "sequence of {} positions exceeds the model's max_position_embeddings {}; use a shorter text or \
                 fewer new tokens",
                start + t,
                self.max_positions
            );
        }
        let ids = Tensor::arange(
            (start + POSITION_OFFSET) as u32,
            (start + t + POSITION_OFFSET) as u32,
            embeds.device(),
        )?;
        let positions = self.embed_positions.forward(&ids)?;
        broadcast_add(embeds, &positions)?.apply(&self.layernorm_embedding)
    }
}

/// transformers' `BartEncoder`, fed with embeddings (the image tokens are merged in before it).
pub struct BartEncoder {
    embed_positions: EmbedPositions,
    layers: Vec<BartEncoderLayer>,
}

impl BartEncoder {
    fn new(
        cfg: &TextConfig,
        act: Activation,
        vb: VarBuilder,
        q: Option<Quantization>,
    ) -> Result<Self> {
        let layers = (0..cfg.encoder_layers)
            .map(|i| BartEncoderLayer::new(cfg, act, vb.pp(format!("layers.{i}")), q))
            .collect::<Result<_>>()?;
        Ok(Self {
            embed_positions: EmbedPositions::new(cfg, &vb)?,
            layers,
        })
    }

    /// `inputs_embeds` `[B, S, D]`, `attention_mask` `[B, S]` (1 = attend, 0 = padding) → `[B, S, D]`;
    /// `interrupt` is asked before each layer.
    pub fn forward(
        &self,
        inputs_embeds: &Tensor,
        attention_mask: &Tensor,
        interrupt: &dyn Interrupt,
    ) -> crate::Result<Tensor> {
        let mask = padding_mask(attention_mask, inputs_embeds.dtype())?;
        let mut xs = self.embed_positions.forward(inputs_embeds, 0)?;
        for layer in &self.layers {
            interrupt.check()?;
            xs = layer.forward(&xs, &mask)?;
        }
        Ok(xs)
    }
}

/// `[B, S]` 0/1 mask → additive `[B, 1, 1, S]` mask in `dtype`.
pub fn padding_mask(attention_mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, s) = attention_mask.dims2()?;
    let keep = attention_mask.to_dtype(DType::F32)?;
    // (1 - keep) * min: 0 where kept, the mask value where padded.
    let additive = ((keep.ones_like()? - keep)? * mask_value(dtype))?;
    additive.reshape((b, 1, 1, s))?.to_dtype(dtype)
}

/// Additive causal mask `[T, past + T]` for `T` new positions after `past` cached ones.
fn causal_mask(t: usize, past: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let value = mask_value(dtype) as f32;
    let data: Vec<f32> = (0..t)
        .flat_map(|i| (0..past + t).map(move |j| if j > past + i { value } else { 0.0 }))
        .collect();
    Tensor::from_vec(data, (t, past + t), device)?.to_dtype(dtype)
}

/// Per-layer decoder state: self-attention keys/values so far and the cross-attention keys/values.
///
/// The cross-attention keys/values and the encoder mask have one row per encoder output; each serves
/// `group` consecutive decoder rows (the beams or returned sequences of one item).
pub struct DecoderCache {
    self_kv: Vec<Option<(Tensor, Tensor)>>,
    cross_kv: Vec<(Tensor, Tensor)>,
    encoder_mask: Tensor,
    group: usize,
    past: usize,
}

impl DecoderCache {
    /// Rows of the cache (the decoding batch).
    pub fn rows(&self) -> Result<usize> {
        Ok(self.encoder_mask.dim(0)? * self.group)
    }

    /// Number of decoder positions already cached.
    pub fn past_len(&self) -> usize {
        self.past
    }

    /// Keeps row `order[i]` as row `i` (beam search reordering; rows may repeat). With `group > 1` a row
    /// may only take a row of its own group, whose encoder states it shares.
    pub fn reorder(&mut self, order: &[usize]) -> Result<()> {
        let group = self.group;
        let leaves_group = |(i, &o): &(usize, &usize)| group > 1 && i / group != o / group;
        if let Some((i, o)) = order.iter().enumerate().find(leaves_group) {
            candle_core::bail!("cannot reorder decoder row {i} from row {o}: rows share encoder states in groups of {group}");
        }
        let index: Vec<u32> = order.iter().map(|&i| i as u32).collect();
        let index = Tensor::new(index.as_slice(), self.encoder_mask.device())?;
        let pick = |t: &Tensor| t.index_select(&index, 0);
        for kv in self.self_kv.iter_mut().flatten() {
            *kv = (pick(&kv.0)?, pick(&kv.1)?);
        }
        if group == 1 {
            for kv in &mut self.cross_kv {
                *kv = (pick(&kv.0)?, pick(&kv.1)?);
            }
            self.encoder_mask = pick(&self.encoder_mask)?;
        }
        Ok(())
    }
}

/// transformers' `BartDecoder`.
pub struct BartDecoder {
    embed_positions: EmbedPositions,
    layers: Vec<BartDecoderLayer>,
}

impl BartDecoder {
    fn new(
        cfg: &TextConfig,
        act: Activation,
        vb: VarBuilder,
        q: Option<Quantization>,
    ) -> Result<Self> {
        let layers = (0..cfg.decoder_layers)
            .map(|i| BartDecoderLayer::new(cfg, act, vb.pp(format!("layers.{i}")), q))
            .collect::<Result<_>>()?;
        Ok(Self {
            embed_positions: EmbedPositions::new(cfg, &vb)?,
            layers,
        })
    }

    /// A fresh cache for `encoder_states` `[B, S, D]` with its `[B, S]` attention mask, decoding `group`
    /// consecutive rows per encoder row (`B * group` rows): the cross-attention keys and values are
    /// computed here, once, and never copied per row.
    pub fn new_cache(
        &self,
        encoder_states: &Tensor,
        encoder_attention_mask: &Tensor,
        group: usize,
    ) -> Result<DecoderCache> {
        if group == 0 {
            candle_core::bail!("a decoder cache needs at least one row per encoder output");
        }
        // On the CPU, half-precision attention is computed in f32 (`layers::attention::attention`). The cross-attention
        // keys/values serve every step, so they are widened once here (exactly: bf16/f16 -> f32 loses nothing)
        // instead of in every layer at every step.
        let widen = encoder_states.device().is_cpu()
            && matches!(encoder_states.dtype(), DType::BF16 | DType::F16);
        let cross_kv = self
            .layers
            .iter()
            .map(|layer| {
                let (k, v) = layer.encoder_attn.key_values(encoder_states)?;
                if widen {
                    Ok((to_dtype(&k, DType::F32)?, to_dtype(&v, DType::F32)?))
                } else {
                    Ok((k, v))
                }
            })
            .collect::<Result<_>>()?;
        Ok(DecoderCache {
            self_kv: vec![None; self.layers.len()],
            cross_kv,
            encoder_mask: padding_mask(encoder_attention_mask, encoder_states.dtype())?,
            group,
            past: 0,
        })
    }

    /// Runs `embeds` `[B, T, D]` (the scaled token embeddings of the new positions) through the decoder,
    /// appending to `cache`; returns the hidden states `[B, T, D]`.
    pub fn forward(&self, embeds: &Tensor, cache: &mut DecoderCache) -> Result<Tensor> {
        let t = embeds.dim(1)?;
        let past = cache.past;
        let causal = if t > 1 {
            Some(causal_mask(t, past, embeds.dtype(), embeds.device())?)
        } else {
            None
        };
        let mut xs = self.embed_positions.forward(embeds, past)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let (k, v) = layer.self_attn.key_values(&xs)?;
            let (k, v) = match &cache.self_kv[i] {
                Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
                None => (k, v),
            };
            let attended = layer.self_attn.attend(&xs, &k, &v, causal.as_ref(), 1)?;
            cache.self_kv[i] = Some((k, v));
            xs = (xs + attended)?.apply(&layer.self_attn_layer_norm)?;

            let (ck, cv) = &cache.cross_kv[i];
            let attended =
                layer
                    .encoder_attn
                    .attend(&xs, ck, cv, Some(&cache.encoder_mask), cache.group)?;
            xs = (xs + attended)?.apply(&layer.encoder_attn_layer_norm)?;

            xs = (&xs + xs.apply(&layer.ffn)?)?.apply(&layer.final_layer_norm)?;
        }
        cache.past += t;
        Ok(xs)
    }
}

/// transformers' `BartModel`: the shared token embedding, encoder and decoder.
pub struct BartModel {
    shared: TokenEmbedding,
    embed_scale: f64,
    pub encoder: BartEncoder,
    pub decoder: BartDecoder,
}

impl BartModel {
    /// Loads from `vb` at `model.language_model`, the linear layers quantized when `q` says so (and the
    /// shared token embedding, where [`TokenEmbedding`] can, as [`Quantization::for_token_table`] says).
    pub fn new(cfg: &TextConfig, vb: VarBuilder, q: Option<Quantization>) -> Result<Self> {
        let act = activation(&cfg.activation_function).map_err(candle_core::Error::Msg)?;
        let shared = TokenEmbedding::load(
            cfg.vocab_size,
            cfg.d_model,
            vb.pp("shared"),
            q.map(Quantization::for_token_table),
        )?;
        Ok(Self {
            shared,
            embed_scale: if cfg.scale_embedding {
                (cfg.d_model as f64).sqrt()
            } else {
                1.0
            },
            encoder: BartEncoder::new(cfg, act, vb.pp("encoder"), q)?,
            decoder: BartDecoder::new(cfg, act, vb.pp("decoder"), q)?,
        })
    }

    /// The (scaled) token embeddings of `ids` `[B, T]`.
    pub fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        let embeds = self.shared.forward(ids)?;
        if self.embed_scale == 1.0 {
            Ok(embeds)
        } else {
            embeds * self.embed_scale
        }
    }

    /// The LM head tied to the shared embedding (as the HF-native layout and Microsoft's remote code tie
    /// them): the same weights.
    pub fn tied_head(&self) -> Result<Linear> {
        self.shared.tied_head()
    }
}
