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

/// Positions a [`SelfKv`] buffer grows by. A growth copies the buffer once, so a step pays for it once in this
/// many steps, and at most this many positions of a buffer stand unused.
const SELF_KV_CHUNK: usize = 128;

/// One decoder layer's self-attention keys and values of the positions decoded so far: buffers `[rows, heads,
/// capacity, head_dim]`, filled up to the cache's `past`. A step writes its new positions in place, without
/// copying the earlier ones; a beam reorder copies only the rows that change; attention reads the filled
/// positions as a `[rows, heads, past, head_dim]` view, each head's positions contiguous (as the attention
/// kernel reads them fastest). Appending by concatenation copied every earlier position at every step, and
/// reordering by an index copied every row: a cost that grew with the output's length.
struct SelfKv {
    keys: Tensor,
    values: Tensor,
}

impl SelfKv {
    /// Buffers for `keys` `[rows, heads, T, head_dim]` (and its values) after `past` earlier positions, those of
    /// `old` copied in.
    fn with_room(old: Option<&SelfKv>, keys: &Tensor, past: usize) -> Result<Self> {
        let (rows, heads, t, head_dim) = keys.dims4()?;
        let capacity = self_kv_capacity(past + t);
        let buffer = |old: Option<&Tensor>| {
            let buffer = Tensor::zeros(
                (rows, heads, capacity, head_dim),
                keys.dtype(),
                keys.device(),
            )?;
            if let Some(old) = old {
                buffer.slice_set(old, 2, 0)?;
            }
            Ok::<_, candle_core::Error>(buffer)
        };
        Ok(Self {
            keys: buffer(old.map(|kv| &kv.keys))?,
            values: buffer(old.map(|kv| &kv.values))?,
        })
    }

    fn capacity(&self) -> Result<usize> {
        self.keys.dim(2)
    }
}

/// The buffers' capacity for `positions` decoded positions: whole chunks of [`SELF_KV_CHUNK`].
pub fn self_kv_capacity(positions: usize) -> usize {
    positions.div_ceil(SELF_KV_CHUNK) * SELF_KV_CHUNK
}

/// The row copies of a beam reorder (row `order[i]` as row `i`), planned once for every buffer: `ordered`, in
/// an order where no row is written while a later copy still reads it, then `cycles` (rows that trade places,
/// such as two beams swapping), whose sources are all read before any of them is written.
struct RowMoves {
    ordered: Vec<(usize, usize)>,
    cycles: Vec<(usize, usize)>,
}

impl RowMoves {
    fn new(order: &[usize]) -> Self {
        let moves: Vec<(usize, usize)> = order
            .iter()
            .enumerate()
            .filter(|&(i, &o)| i != o)
            .map(|(i, &o)| (i, o))
            .collect();
        // readers[r]: the pending copies that read row r; source[r]: where row r is still to come from.
        let mut readers = vec![0usize; order.len()];
        let mut source = vec![None; order.len()];
        for &(to, from) in &moves {
            readers[from] += 1;
            source[to] = Some(from);
        }
        let mut ready: Vec<usize> = moves
            .iter()
            .map(|&(to, _)| to)
            .filter(|&to| readers[to] == 0)
            .collect();
        let mut ordered = Vec::with_capacity(moves.len());
        while let Some(to) = ready.pop() {
            if let Some(from) = source[to].take() {
                ordered.push((to, from));
                readers[from] -= 1;
                if readers[from] == 0 && source[from].is_some() {
                    ready.push(from);
                }
            }
        }
        // What is left is read only by itself: cycles.
        let cycles = moves
            .into_iter()
            .filter(|&(to, _)| source[to].is_some())
            .collect();
        Self { ordered, cycles }
    }

    /// Applies the copies to `buffer` `[rows, heads, capacity, head_dim]`, of whose positions the first `filled`
    /// hold values. On the CPU those of each head are copied within the buffer ([`MoveRows`]); elsewhere each
    /// changed row's whole buffer, through one copy of the source rows taken before any row is written
    /// (`slice_set` cannot read the storage it writes).
    fn apply(&self, buffer: &Tensor, filled: usize) -> Result<()> {
        if self.ordered.is_empty() && self.cycles.is_empty() {
            return Ok(());
        }
        let (_, heads, capacity, head_dim) = buffer.dims4()?;
        if buffer.device().is_cpu() {
            return buffer.inplace_op1(&MoveRows {
                moves: self,
                blocks: heads,
                block_len: capacity * head_dim,
                used: filled * head_dim,
            });
        }
        let moves: Vec<(usize, usize)> = self.ordered.iter().chain(&self.cycles).copied().collect();
        copy_whole_rows(buffer, &moves)
    }
}

/// Each `(to, from)` of `moves` on any device, over whole rows of `buffer`: the source rows copied out (one
/// index) before any row is written.
fn copy_whole_rows(buffer: &Tensor, moves: &[(usize, usize)]) -> Result<()> {
    let sources: Vec<u32> = moves.iter().map(|&(_, from)| from as u32).collect();
    let sources = buffer.index_select(&Tensor::new(sources.as_slice(), buffer.device())?, 0)?;
    for (j, &(to, _)) in moves.iter().enumerate() {
        buffer.slice_set(&sources.narrow(0, j, 1)?, 0, to)?;
    }
    Ok(())
}

/// [`RowMoves`] in a contiguous CPU buffer of rows of `blocks` blocks `block_len` values long (a row's heads),
/// copying the first `used` values of each block.
struct MoveRows<'a> {
    moves: &'a RowMoves,
    blocks: usize,
    block_len: usize,
    used: usize,
}

impl MoveRows<'_> {
    fn apply<T: Copy>(&self, data: &mut [T]) {
        let row_len = self.blocks * self.block_len;
        let block_starts =
            |row: usize| (0..self.blocks).map(move |b| row * row_len + b * self.block_len);
        for &(to, from) in &self.moves.ordered {
            for (src, dst) in block_starts(from).zip(block_starts(to)) {
                data.copy_within(src..src + self.used, dst);
            }
        }
        let cycles = &self.moves.cycles;
        let sources: Vec<Vec<T>> = cycles
            .iter()
            .map(|&(_, from)| {
                let mut source = Vec::with_capacity(self.blocks * self.used);
                for src in block_starts(from) {
                    source.extend_from_slice(&data[src..][..self.used]);
                }
                source
            })
            .collect();
        for (&(to, _), source) in cycles.iter().zip(sources) {
            for (dst, block) in block_starts(to).zip(source.chunks(self.used.max(1))) {
                data[dst..][..self.used].copy_from_slice(block);
            }
        }
    }
}

impl candle_core::InplaceOp1 for MoveRows<'_> {
    fn name(&self) -> &'static str {
        "move-rows"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<()> {
        use candle_core::CpuStorage;
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("move-rows takes a contiguous buffer");
        };
        let moves = self.moves.ordered.iter().chain(&self.moves.cycles);
        let rows = moves.flat_map(|&(to, from)| [to, from]).max();
        let row_len = self.blocks * self.block_len;
        if rows.is_some_and(|last| (last + 1) * row_len > end - start) || self.used > self.block_len
        {
            candle_core::bail!(
                "move-rows: rows up to {rows:?} outside a buffer of {} values",
                end - start
            );
        }
        match storage {
            CpuStorage::F32(data) => self.apply(&mut data[start..end]),
            CpuStorage::BF16(data) => self.apply(&mut data[start..end]),
            CpuStorage::F16(data) => self.apply(&mut data[start..end]),
            CpuStorage::F64(data) => self.apply(&mut data[start..end]),
            _ => candle_core::bail!("move-rows takes float buffers"),
        }
        Ok(())
    }
}

/// Per-layer decoder state: self-attention keys/values so far and the cross-attention keys/values.
///
/// The cross-attention keys/values and the encoder mask have one row per encoder output; each serves
/// `group` consecutive decoder rows (the beams or returned sequences of one item).
pub struct DecoderCache {
    self_kv: Vec<Option<SelfKv>>,
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
        if order.len() != self.rows()? || order.iter().any(|&o| o >= order.len()) {
            candle_core::bail!("cannot reorder {} decoder rows by {order:?}", self.rows()?);
        }
        let moves = RowMoves::new(order);
        for kv in self.self_kv.iter().flatten() {
            moves.apply(&kv.keys, self.past)?;
            moves.apply(&kv.values, self.past)?;
        }
        let index: Vec<u32> = order.iter().map(|&i| i as u32).collect();
        let index = Tensor::new(index.as_slice(), self.encoder_mask.device())?;
        let pick = |t: &Tensor| t.index_select(&index, 0);
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
        // On the CPU, f16 attention is computed in f32 (`layers::attention::attention`). The cross-attention
        // keys/values serve every step, so f16 ones are widened once here (exactly: f16 -> f32 loses nothing)
        // instead of in every layer at every step. bf16 ones stay bf16: the fused kernel reads them as stored
        // for a step's few queries, with the bits of their widened values, and a step streams half the bytes.
        let widen = encoder_states.device().is_cpu() && encoder_states.dtype() == DType::F16;
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
            self_kv: self.layers.iter().map(|_| None).collect(),
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
            let slot = &mut cache.self_kv[i];
            let room = match slot {
                Some(kv) => kv.capacity()? >= past + t,
                None => false,
            };
            if !room {
                *slot = Some(SelfKv::with_room(slot.as_ref(), &k, past)?);
            }
            let Some(kv) = slot.as_ref() else {
                candle_core::bail!("decoder layer {i} has no self-attention cache");
            };
            kv.keys.slice_set(&k, 2, past)?;
            kv.values.slice_set(&v, 2, past)?;
            let (k, v) = (
                kv.keys.narrow(2, 0, past + t)?,
                kv.values.narrow(2, 0, past + t)?,
            );
            let attended = layer.self_attn.attend(&xs, &k, &v, causal.as_ref(), 1)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every order of 4 rows (copies, chains, swaps, rotations): the filled positions of each row's heads are
    /// those of its source, as an index would pick them, and on the CPU the positions past them are left as
    /// they were; on the CPU's in-place path and on the other devices' one (whole rows).
    #[test]
    fn reordered_rows_are_their_sources() {
        let dev = candle_core::Device::Cpu;
        let (rows, heads, capacity, head_dim, filled) = (4, 2, 5, 2, 3);
        for code in 0..256usize {
            let order = [code % 4, code / 4 % 4, code / 16 % 4, code / 64];
            for in_place in [true, false] {
                let buffer =
                    Tensor::arange(0f32, (rows * heads * capacity * head_dim) as f32, &dev)
                        .and_then(|t| t.reshape((rows, heads, capacity, head_dim)))
                        .expect("buffer");
                let before: Vec<f32> = buffer
                    .flatten_all()
                    .and_then(|t| t.to_vec1())
                    .expect("values");
                let moves = RowMoves::new(&order);
                if in_place {
                    moves.apply(&buffer, filled).expect("reorder");
                } else {
                    let all: Vec<_> = moves.ordered.iter().chain(&moves.cycles).copied().collect();
                    copy_whole_rows(&buffer, &all).expect("reorder");
                }
                let after: Vec<f32> = buffer
                    .flatten_all()
                    .and_then(|t| t.to_vec1())
                    .expect("values");
                let at = |row: usize, head: usize, position: usize| {
                    ((row * heads + head) * capacity + position) * head_dim
                };
                for (i, &o) in order.iter().enumerate() {
                    for head in 0..heads {
                        for position in 0..capacity {
                            let kept = if position < filled || !in_place { o } else { i };
                            let (got, want) = (at(i, head, position), at(kept, head, position));
                            assert_eq!(
                                after[got..][..head_dim],
                                before[want..][..head_dim],
                                "{order:?}, row {i}, head {head}, position {position}"
                            );
                        }
                    }
                }
            }
        }
    }
}
