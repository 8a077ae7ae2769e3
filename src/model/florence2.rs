//! `Florence2ForConditionalGeneration`: the vision tower, the projector and BART put together, and the
//! merge of image tokens with text tokens that differs between the two checkpoint layouts.
//!
//! - HF-native: `input_ids` hold `<image>` placeholders (image_token_id) where the image tokens go; their
//!   embeddings are replaced, in order, by the projected image features (transformers' `masked_scatter`).
//! - Original: `input_ids` hold only text; the image features are prepended to the text embeddings and the
//!   attention mask is extended with ones (Microsoft's `_merge_input_ids_with_image_features`).
//!
//! Both give the encoder the same sequence. Microsoft's LM head adds `final_logits_bias`.
//!
//! This module is the forward pass; building the model from a checkpoint is [`super::loading`]'s.

use candle_core::{DType, Device, Module, Tensor};

use crate::generation::{DecoderSession, GenerateOutput, GenerationConfig};
use crate::interrupt::Interrupt;
use crate::io::Layout;
use crate::layers::linear::Linear;
use crate::layers::ops::{broadcast_add, to_dtype};
use crate::limits::product;
use crate::model::bart::{self_kv_capacity, BartModel, DecoderCache};
use crate::model::config::Florence2Config;
use crate::model::projector::Florence2MultiModalProjector;
use crate::model::vision::Florence2VisionBackbone;
use crate::{Error, Result};

/// The encoder's output and the attention mask that goes with it (image tokens included).
#[derive(Clone)]
pub struct EncoderOutput {
    /// `[B, S, d_model]`, the encoder's last hidden state.
    pub hidden_states: Tensor,
    /// `[B, S]`, 1 where a position may be attended to.
    pub attention_mask: Tensor,
}

impl EncoderOutput {
    /// Repeats each row `times` times consecutively (transformers' `_expand_inputs_for_generation`).
    pub fn expand(&self, times: usize) -> Result<Self> {
        if times == 1 {
            return Ok(self.clone());
        }
        let rows = self.hidden_states.dim(0)?;
        let order: Vec<u32> = (0..rows as u32)
            .flat_map(|r| std::iter::repeat_n(r, times))
            .collect();
        let order = Tensor::new(order.as_slice(), self.hidden_states.device())?;
        Ok(Self {
            hidden_states: self.hidden_states.index_select(&order, 0)?,
            attention_mask: self.attention_mask.index_select(&order, 0)?,
        })
    }
}

/// transformers' `Florence2ForConditionalGeneration`, for inference. Built by [`super::loading`], which
/// alone sets the fields.
pub struct Florence2ForConditionalGeneration {
    pub(super) config: Florence2Config,
    pub(super) vision_tower: Florence2VisionBackbone,
    pub(super) projector: Florence2MultiModalProjector,
    pub(super) language: BartModel,
    pub(super) lm_head: Linear,
    pub(super) final_logits_bias: Option<Tensor>,
    /// The dtype the user asked for, which [`Self::dtype`] reports and a reload asks for again.
    pub(super) requested_dtype: DType,
    /// The dtype the weights are held and the activations computed in
    /// ([`compute_dtype`](super::loading::compute_dtype)).
    pub(super) compute_dtype: DType,
    pub(super) device: Device,
}

impl Florence2ForConditionalGeneration {
    pub fn config(&self) -> &Florence2Config {
        &self.config
    }

    /// The dtype the model was loaded in, as asked (float16 on the CPU computes in another:
    /// [`compute_dtype`](super::loading::compute_dtype)).
    pub fn dtype(&self) -> DType {
        self.requested_dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The vision tower's last hidden state `[B, C, H', W']` for `pixel_values` `[B, 3, H, W]` (any float dtype).
    ///
    /// Takes the pixels by value: the tower drops them once they are laid out as tokens (7 MB per
    /// 768x768 image in f32, at the tower's peak memory), unless the caller keeps another handle.
    /// `interrupt` is asked between the tower's blocks.
    pub fn vision_features(
        &self,
        pixel_values: Tensor,
        interrupt: &dyn Interrupt,
    ) -> Result<Tensor> {
        let (_, channels, _, _) = pixel_values.dims4().map_err(|_| {
            Error::invalid(format!(
                "pixel_values must have shape [batch, 3, height, width], got {:?}",
                pixel_values.dims()
            ))
        })?;
        if channels != self.config.vision.in_channels {
            return Err(Error::invalid(format!(
                "pixel_values has {channels} channels, the model expects {}",
                self.config.vision.in_channels
            )));
        }
        let (batch, _, height, width) = pixel_values.dims4()?;
        self.config.vision.check_memory(batch, height, width)?;
        let pixels = pixel_values
            .to_device(&self.device)?
            .to_dtype(self.compute_dtype)?;
        drop(pixel_values);
        let features = self.vision_tower.forward(pixels, interrupt)?;
        if self.device.is_cpu() {
            crate::kernels::cpu::memory::release_free_memory();
        }
        Ok(features)
    }

    /// The projected image tokens `[B, 1 + H'*W', d_model]` (transformers' `get_image_features`); `interrupt`
    /// as for [`Self::vision_features`].
    pub fn get_image_features(
        &self,
        pixel_values: Tensor,
        interrupt: &dyn Interrupt,
    ) -> Result<Tensor> {
        self.project_image_features(&self.vision_features(pixel_values, interrupt)?)
    }

    /// The projector on the vision tower's output (from [`Self::vision_features`]).
    pub fn project_image_features(&self, vision_features: &Tensor) -> Result<Tensor> {
        Ok(self.projector.forward(vision_features)?)
    }

    /// Runs the encoder on `input_ids` `[B, L]` with `attention_mask` `[B, L]` (all ones when `None`), the
    /// image features (from [`Self::get_image_features`]) merged in as the layout prescribes; `interrupt` is
    /// asked between the encoder's layers.
    pub fn encode(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        image_features: Option<&Tensor>,
        interrupt: &dyn Interrupt,
    ) -> Result<EncoderOutput> {
        let _span = crate::profile::span("encoder: other");
        let (batch, len) = input_ids.dims2().map_err(|_| {
            Error::invalid(format!(
                "input_ids must have shape [batch, length], got {:?}",
                input_ids.dims()
            ))
        })?;
        let ids = input_ids.to_device(&self.device)?.to_dtype(DType::U32)?;
        self.check_token_ids(&ids)?;
        let mask = match attention_mask {
            Some(mask) => {
                if mask.dims() != [batch, len] {
                    return Err(Error::invalid(format!(
                        "attention_mask has shape {:?}, input_ids {:?}; they must match",
                        mask.dims(),
                        input_ids.dims()
                    )));
                }
                mask.to_device(&self.device)?.to_dtype(DType::F32)?
            }
            None => Tensor::ones((batch, len), DType::F32, &self.device)?,
        };
        let text_embeds = self.language.embed_tokens(&ids)?;
        let (embeds, mask) = match image_features {
            None => (text_embeds, mask),
            Some(features) => {
                let features = features
                    .to_device(&self.device)?
                    .to_dtype(self.compute_dtype)?;
                let (f_batch, _, f_dim) = features.dims3()?;
                if f_batch != batch || f_dim != self.config.text.d_model {
                    return Err(Error::invalid(format!(
                        "image features have shape {:?}; expected [{batch}, tokens, {}] for {batch} texts",
                        features.dims(),
                        self.config.text.d_model
                    )));
                }
                match self.config.layout {
                    Layout::HfNative => (
                        self.scatter_image_features(&ids, &text_embeds, &features)?,
                        mask,
                    ),
                    Layout::Original => {
                        let image_mask =
                            Tensor::ones((batch, features.dim(1)?), DType::F32, &self.device)?;
                        (
                            Tensor::cat(&[&features, &text_embeds], 1)?,
                            Tensor::cat(&[&image_mask, &mask], 1)?,
                        )
                    }
                }
            }
        };
        let hidden_states = self.language.encoder.forward(&embeds, &mask, interrupt)?;
        Ok(EncoderOutput {
            hidden_states,
            attention_mask: mask,
        })
    }

    /// Every id must index the embedding; a bad id would otherwise surface as an opaque index error.
    fn check_token_ids(&self, ids: &Tensor) -> Result<()> {
        if ids.elem_count() == 0 {
            return Err(Error::invalid(format!(
                "input_ids of shape {:?} holds no token; pass the input_ids the processor returns",
                ids.dims()
            )));
        }
        let max = ids.flatten_all()?.max(0)?.to_scalar::<u32>()?;
        if max as usize >= self.config.text.vocab_size {
            return Err(Error::invalid(format!(
                "input id {max} is outside the vocabulary of {} tokens; was the text tokenized with this \
                 checkpoint's processor?",
                self.config.text.vocab_size
            )));
        }
        Ok(())
    }

    /// transformers' `inputs_embeds.masked_scatter(ids == image_token_id, features)`: the placeholders, in
    /// row-major order, take the feature rows in order.
    fn scatter_image_features(
        &self,
        ids: &Tensor,
        text_embeds: &Tensor,
        features: &Tensor,
    ) -> Result<Tensor> {
        let image_token = self.config.image_token_id.unwrap_or(u32::MAX);
        let (batch, len, dim) = text_embeds.dims3()?;
        let flat_ids = ids.flatten_all()?.to_vec1::<u32>()?;
        let n_features = features.dim(0)? * features.dim(1)?;
        let n_placeholders = flat_ids.iter().filter(|&&id| id == image_token).count();
        if n_placeholders != n_features {
            return Err(Error::invalid(format!(
                "Image features and image tokens do not match, tokens: {n_placeholders}, features: {n_features}. \
                 Build the inputs with this checkpoint's processor (it puts image_seq_length <image> tokens \
                 before each text)."
            )));
        }
        // Gather from [text rows ; feature rows]: position p takes row p, or the next feature row.
        let mut next_feature = (batch * len) as u32;
        let index: Vec<u32> = flat_ids
            .iter()
            .enumerate()
            .map(|(p, &id)| {
                if id == image_token {
                    next_feature += 1;
                    next_feature - 1
                } else {
                    p as u32
                }
            })
            .collect();
        let source = Tensor::cat(
            &[
                text_embeds.reshape((batch * len, dim))?,
                features.reshape((n_features, dim))?,
            ],
            0,
        )?;
        let index = Tensor::new(index.as_slice(), &self.device)?;
        Ok(source.index_select(&index, 0)?.reshape((batch, len, dim))?)
    }

    /// transformers' `generate` after the processor: encodes `input_ids` `[B, L]` with the image features
    /// merged in, then decodes with the settings of `cfg`. `interrupt` is asked between the encoder's layers
    /// and before each decoding step.
    pub fn generate(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        image_features: Option<&Tensor>,
        cfg: &GenerationConfig,
        interrupt: &dyn Interrupt,
    ) -> Result<GenerateOutput> {
        let batch = input_ids.dim(0)?;
        self.check_generate_memory(batch, cfg)?;
        let encoder = self.encode(input_ids, attention_mask, image_features, interrupt)?;
        let mut state = self.start_decoding_grouped(&encoder, cfg.expand_factor())?;
        crate::generation::generate(&mut state, cfg, batch, interrupt)
    }

    /// What the decoding rows of one generate call need at their longest (the self-attention cache of every
    /// decoder layer and a few f32 score rows over the vocabulary per row), against [`crate::limits`]: the
    /// row count is the caller's `num_beams` / `num_return_sequences` times the batch.
    fn check_generate_memory(&self, batch: usize, cfg: &GenerationConfig) -> Result<()> {
        let plan = cfg.plan()?;
        let text = &self.config.text;
        let rows = product(&[batch as u128, cfg.expand_factor() as u128]);
        // Positions past max_position_embeddings are an error before they are cached; the buffers hold whole
        // chunks of positions.
        let length =
            self_kv_capacity(plan.max_length.min(text.max_position_embeddings + 1)) as u128;
        let cache = product(&[
            2 * text.decoder_layers as u128,
            rows,
            length,
            text.d_model as u128,
            self.compute_dtype.size_in_bytes() as u128,
        ]);
        // Logits, their log-softmax and the processed scores, in f32.
        let scores = product(&[3, rows, text.vocab_size as u128, 4]);
        crate::limits::check_alloc(
            &format!(
                "generate(num_beams={}, num_return_sequences={}) on {batch} prompt(s) (the decoder cache and \
                 scores of {rows} rows)",
                cfg.num_beams.unwrap_or(1),
                cfg.num_return_sequences.unwrap_or(1),
            ),
            cache.saturating_add(scores),
        )
    }

    /// Starts decoding from `encoder` (already expanded to the decoding rows).
    pub fn start_decoding(&self, encoder: &EncoderOutput) -> Result<DecoderState<'_>> {
        self.start_decoding_grouped(encoder, 1)
    }

    /// Starts decoding `group` consecutive rows per row of `encoder` (the `num_beams` beams of each item),
    /// as [`Self::start_decoding`] on `encoder.expand(group)` would, without copying the encoder states per
    /// row. Beam reordering must then keep each row within its item's group, as beam search does.
    pub fn start_decoding_grouped(
        &self,
        encoder: &EncoderOutput,
        group: usize,
    ) -> Result<DecoderState<'_>> {
        let cache = self.language.decoder.new_cache(
            &encoder.hidden_states,
            &encoder.attention_mask,
            group,
        )?;
        Ok(DecoderState { model: self, cache })
    }

    /// Logits `[B, T, vocab]` for `decoder_input_ids` `[B, T]` given the encoder output (a full forward pass
    /// without reusing a cache, like transformers' `forward`).
    pub fn decoder_logits(
        &self,
        decoder_input_ids: &Tensor,
        encoder: &EncoderOutput,
    ) -> Result<Tensor> {
        Ok(self.decoder_forward(decoder_input_ids, encoder)?.1)
    }

    /// The decoder's last hidden state `[B, T, d_model]` (transformers' `Florence2Model` output) and the
    /// logits computed from it, for `decoder_input_ids` `[B, T]`.
    pub fn decoder_forward(
        &self,
        decoder_input_ids: &Tensor,
        encoder: &EncoderOutput,
    ) -> Result<(Tensor, Tensor)> {
        let _span = crate::profile::span("decoder: other");
        let mut state = self.start_decoding(encoder)?;
        let hidden = state.hidden_step(decoder_input_ids)?;
        let logits = self.logits(&hidden)?;
        Ok((hidden, logits))
    }

    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = self.lm_head.forward(hidden)?;
        Ok(match &self.final_logits_bias {
            Some(bias) => broadcast_add(&logits, bias)?,
            None => logits,
        })
    }
}

/// A decoder run over fixed encoder states: the KV cache plus the model it belongs to.
pub struct DecoderState<'m> {
    model: &'m Florence2ForConditionalGeneration,
    cache: DecoderCache,
}

impl DecoderState<'_> {
    /// Feeds `ids` `[rows, T]` and returns their logits `[rows, T, vocab]` in the model's dtype.
    pub fn step(&mut self, ids: &Tensor) -> Result<Tensor> {
        let _span = crate::profile::span("decoder: other");
        let hidden = self.hidden_step(ids)?;
        self.model.logits(&hidden)
    }

    /// Feeds `ids` `[rows, T]` and returns the decoder's hidden states `[rows, T, d_model]` (before the LM head).
    pub fn hidden_step(&mut self, ids: &Tensor) -> Result<Tensor> {
        let ids = ids.to_device(&self.model.device)?.to_dtype(DType::U32)?;
        self.model.check_token_ids(&ids)?;
        let embeds = self.model.language.embed_tokens(&ids)?;
        Ok(self
            .model
            .language
            .decoder
            .forward(&embeds, &mut self.cache)?)
    }
}

impl DecoderSession for DecoderState<'_> {
    fn rows(&self) -> usize {
        self.cache.rows().unwrap_or(0)
    }

    fn next_logits(&mut self, last_tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        let rows = last_tokens.len();
        let ids = Tensor::from_slice(last_tokens, (rows, 1), &self.model.device)?;
        let logits = to_dtype(&self.step(&ids)?.squeeze(1)?, DType::F32)?;
        Ok(logits.to_vec2::<f32>()?)
    }

    fn reorder(&mut self, order: &[usize]) -> Result<()> {
        Ok(self.cache.reorder(order)?)
    }
}
