//! `Florence2ForConditionalGeneration`: the vision tower, the projector and BART put together, and the
//! merge of image tokens with text tokens that differs between the two checkpoint layouts.
//!
//! - HF-native: `input_ids` hold `<image>` placeholders (image_token_id) where the image tokens go; their
//!   embeddings are replaced, in order, by the projected image features (transformers' `masked_scatter`).
//! - Original: `input_ids` hold only text; the image features are prepended to the text embeddings and the
//!   attention mask is extended with ones (Microsoft's `_merge_input_ids_with_image_features`).
//!
//! Both give the encoder the same sequence. Microsoft's LM head adds `final_logits_bias`.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use crate::generation::{DecoderSession, GenerateOutput, GenerationConfig};
use crate::interrupt::Interrupt;
use crate::io::adapter::Adapter;
use crate::io::checkpoint::{Checkpoint, FINAL_LOGITS_BIAS};
use crate::io::Layout;
use crate::layers::linear::{Linear, PackedTable, Quantization};
use crate::layers::ops::to_dtype;
use crate::limits::product;
use crate::model::bart::{BartModel, DecoderCache};
use crate::model::config::Florence2Config;
use crate::model::projector::Florence2MultiModalProjector;
use crate::model::vision::Florence2VisionBackbone;
use crate::{Error, Result};

/// HF-native names of the LM head and of the embedding copies BART keeps per stack.
const LM_HEAD: &str = "lm_head.weight";
const ENCODER_EMBED_TOKENS: &str = "model.language_model.encoder.embed_tokens.weight";
const DECODER_EMBED_TOKENS: &str = "model.language_model.decoder.embed_tokens.weight";

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

/// transformers' `Florence2ForConditionalGeneration`, for inference.
pub struct Florence2ForConditionalGeneration {
    config: Florence2Config,
    vision_tower: Florence2VisionBackbone,
    projector: Florence2MultiModalProjector,
    language: BartModel,
    lm_head: Linear,
    final_logits_bias: Option<Tensor>,
    /// The dtype the user asked for, which [`Self::dtype`] reports and a reload asks for again.
    requested_dtype: DType,
    /// The dtype the weights are held and the activations computed in ([`compute_dtype`]).
    dtype: DType,
    device: Device,
}

/// The dtype a model asked for in `requested` computes in on `device`, its linear layers `quantized` or not:
/// float16 on the CPU computes in float32, or in bfloat16 when the layers are quantized and the CPU has the
/// bf16 and int8 kernels. CPUs have no float16 arithmetic (candle and torch widen every operand of every
/// product there, which is slower than float32 itself), while float16 values widen to float32 exactly: the
/// float32 model over the same weights, without float16's rounding and overflow, is what the CPU runs. A
/// quantized model's products are int8 already, and bfloat16 keeps the rest of it at half the memory.
pub fn compute_dtype(requested: DType, device: &Device, quantized: bool) -> DType {
    match requested {
        DType::F16 if device.is_cpu() => {
            let bf16_kernels = crate::kernels::cpu::features::has_avx512_bf16()
                && crate::kernels::cpu::quantized_gemm::available();
            if quantized && bf16_kernels {
                DType::BF16
            } else {
                DType::F32
            }
        }
        other => other,
    }
}

/// The image size the checkpoint's processor makes (preprocessor_config.json's `size`), else Florence-2's
/// 768x768.
fn processor_image_size(dir: &Path) -> (usize, usize) {
    const RELEASED: (usize, usize) = (768, 768);
    let Some(size) = std::fs::read_to_string(dir.join("preprocessor_config.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|config| config.get("size").cloned())
    else {
        return RELEASED;
    };
    let side = |key: &str| {
        size.get(key)
            .and_then(serde_json::Value::as_u64)
            .and_then(|n| usize::try_from(n).ok())
    };
    side("height").zip(side("width")).unwrap_or(RELEASED)
}

/// How [`Florence2ForConditionalGeneration::from_dir_with`] loads a checkpoint, beyond its dtype and device.
#[derive(Clone, Default)]
pub struct LoadOptions {
    /// Store the linear layers' weights quantized.
    pub quantize: Option<Quantization>,
    /// A PEFT LoRA adapter to merge into the weights ([`crate::io::adapter`]).
    pub adapter: Option<Arc<Adapter>>,
}

impl Florence2ForConditionalGeneration {
    /// Loads `config.json` and the weights (safetensors, or `pytorch_model.bin`) from a checkpoint folder of
    /// either layout.
    pub fn from_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::from_dir_quantized(dir, dtype, device, None)
    }

    /// [`Self::from_dir`], with the linear layers of the vision tower, projector and BART quantized when
    /// `quantize` says so (see [`crate::layers::linear`]).
    pub fn from_dir_quantized(
        dir: &Path,
        dtype: DType,
        device: &Device,
        quantize: Option<Quantization>,
    ) -> Result<Self> {
        let options = LoadOptions {
            quantize,
            ..LoadOptions::default()
        };
        Self::from_dir_with(dir, dtype, device, &options)
    }

    /// [`Self::from_dir`] with the [`LoadOptions`]: quantized linear layers, a LoRA adapter merged in.
    pub fn from_dir_with(
        dir: &Path,
        dtype: DType,
        device: &Device,
        options: &LoadOptions,
    ) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::NotFound {
                path: dir.to_path_buf(),
                hint:
                    "Pass the folder of a Florence-2 checkpoint (config.json + model.safetensors)."
                        .into(),
            });
        }
        crate::kernels::cpu::features::check_cpu_tier().map_err(Error::invalid)?;
        let config_path = dir.join("config.json");
        let config = Florence2Config::from_file(&config_path)?;
        // A vision config that cannot run on the checkpoint's own image size is refused at load.
        let (height, width) = processor_image_size(dir);
        config
            .vision
            .check_memory(1, height, width)
            .map_err(|err| Error::Config {
                path: config_path,
                msg: err.to_string(),
            })?;
        let adapter = options.adapter.clone();
        let checkpoint = match &adapter {
            Some(adapter) => Checkpoint::open(dir)?.with_adapter(adapter.clone()),
            None => Checkpoint::open(dir)?,
        };
        let model = Self::build(config, checkpoint, dtype, device, options.quantize)?;
        if let Some(adapter) = adapter {
            adapter.check_all_merged()?;
        }
        if device.is_cpu() {
            // Loading converted and packed every weight through temporary buffers.
            crate::kernels::cpu::memory::release_free_memory();
        }
        Ok(model)
    }

    /// transformers' `dtype="auto"`: the config's `dtype`/`torch_dtype`, else the stored weights' dtype.
    pub fn auto_dtype(dir: &Path) -> Result<DType> {
        let config = Florence2Config::from_file(&dir.join("config.json"))?;
        let from_config = match config.dtype.as_deref() {
            Some("float16") => Some(DType::F16),
            Some("bfloat16") => Some(DType::BF16),
            Some("float32") => Some(DType::F32),
            _ => None,
        };
        match from_config {
            Some(dtype) => Ok(dtype),
            None => Ok(Checkpoint::stored_dtype_in(dir)?.unwrap_or(DType::F32)),
        }
    }

    /// Builds the model from a parsed config and opened weights.
    pub fn new(
        config: Florence2Config,
        checkpoint: Checkpoint,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::build(config, checkpoint, dtype, device, None)
    }

    fn build(
        config: Florence2Config,
        checkpoint: Checkpoint,
        dtype: DType,
        device: &Device,
        quantize: Option<Quantization>,
    ) -> Result<Self> {
        let source = checkpoint.source().to_path_buf();
        if checkpoint.layout() != config.layout {
            return Err(Error::Weights {
                path: source,
                msg: format!(
                    "the weights are in the {:?} layout but config.json describes the {:?} layout; use the \
                     config.json that came with these weights",
                    checkpoint.layout(),
                    config.layout
                ),
            });
        }
        // The LM head is the shared token embedding where transformers makes it so. HF-native checkpoints
        // drop a tied head, and transformers 5 uses a stored one as stored. Microsoft's remote code ties the
        // head to the embedding after loading whenever the config ties word embeddings (the default),
        // whatever copy the file holds.
        let tied_head = match checkpoint.layout() {
            Layout::HfNative => !checkpoint.stores(LM_HEAD),
            Layout::Original => config.text.tie_word_embeddings,
        };
        // Tensors the model never asks for: BART's per-stack copies of the embedding, which the original
        // layout stores (the remote code ties them to `shared` too) and a tied head. Reading them ahead
        // would only raise the peak memory of loading.
        let mut unread = vec![ENCODER_EMBED_TOKENS, DECODER_EMBED_TOKENS];
        if tied_head {
            unread.push(LM_HEAD);
        }
        let requested_dtype = dtype;
        let dtype = compute_dtype(dtype, device, quantize.is_some());
        let vb = checkpoint.var_builder(dtype, device, &unread);
        let dtypes = (requested_dtype, dtype);
        Self::load(config, vb, dtypes, device, quantize, tied_head).map_err(|source_err| {
            Error::WeightsLoad {
                path: source,
                source: source_err,
            }
        })
    }

    /// `dtypes`: the dtype asked for and the one computed in ([`compute_dtype`]).
    fn load(
        config: Florence2Config,
        vb: VarBuilder,
        (requested_dtype, dtype): (DType, DType),
        device: &Device,
        q: Option<Quantization>,
        tied_head: bool,
    ) -> candle_core::Result<Self> {
        let text = &config.text;
        let vision_tower =
            Florence2VisionBackbone::new(&config.vision, vb.pp("model.vision_tower"), q)?;
        let projector = Florence2MultiModalProjector::new(
            &config.vision,
            vb.pp("model.multi_modal_projector"),
            q,
        )?;
        let language = BartModel::new(text, vb.pp("model.language_model"), q)?;
        // A tied head shares the embedding's weights (its packed table, or its reference-counted tensor
        // where none is packed) instead of holding them twice. An untied one is packed (and quantized) as
        // the embedding would be.
        let lm_head = if tied_head {
            language.tied_head()?
        } else {
            let weight = vb.get((text.vocab_size, text.d_model), LM_HEAD)?;
            match PackedTable::pack(&weight, q)? {
                Some(table) => table.linear(None)?,
                None => Linear::Float(candle_nn::Linear::new(weight, None)),
            }
        };
        let final_logits_bias = if vb.contains_tensor(FINAL_LOGITS_BIAS) {
            // Stored as [1, vocab] by BART's register_buffer; some exports flatten it.
            Some(
                vb.get_unchecked(FINAL_LOGITS_BIAS)?
                    .flatten_all()?
                    .to_dtype(dtype)?,
            )
        } else {
            None
        };
        if let Some(bias) = &final_logits_bias {
            if bias.dim(0)? != text.vocab_size {
                candle_core::bail!(
                    "final_logits_bias has {} entries, the vocabulary {}",
                    bias.dim(0)?,
                    text.vocab_size
                );
            }
        }
        // Adding zeros leaves every logit as it is (a -0.0 becomes +0.0, the same to the softmax): an
        // all-zero bias, BART's initial buffer, is not added at every step.
        let zeros = |bias: &Tensor| -> candle_core::Result<bool> {
            let values = bias.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            Ok(values.iter().all(|&v| v == 0.0))
        };
        let final_logits_bias = match final_logits_bias {
            Some(bias) if zeros(&bias)? => None,
            bias => bias,
        };
        Ok(Self {
            config,
            vision_tower,
            projector,
            language,
            lm_head,
            final_logits_bias,
            requested_dtype,
            dtype,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &Florence2Config {
        &self.config
    }

    /// The dtype the model was loaded in, as asked (float16 on the CPU computes in another: [`compute_dtype`]).
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
        let pixels = pixel_values.to_device(&self.device)?.to_dtype(self.dtype)?;
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
                let features = features.to_device(&self.device)?.to_dtype(self.dtype)?;
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
        // Positions past max_position_embeddings are an error before they are cached.
        let length = plan.max_length.min(text.max_position_embeddings + 1) as u128;
        let cache = product(&[
            2 * text.decoder_layers as u128,
            rows,
            length,
            text.d_model as u128,
            self.dtype.size_in_bytes() as u128,
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
            Some(bias) => logits.broadcast_add(bias)?,
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
