//! Building [`Florence2ForConditionalGeneration`] from a checkpoint folder: the config checked against the
//! weights' layout and the checkpoint's image size, the weights read in the dtype the model computes in
//! ([`compute_dtype`]) and quantized as they load when asked, a LoRA adapter merged in and checked to have
//! matched, and the tied LM head shared with the token embedding.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::io::adapter::Adapter;
use crate::io::checkpoint::Checkpoint;
use crate::io::names::FINAL_LOGITS_BIAS;
use crate::io::Layout;
use crate::layers::linear::{Linear, PackedTable, Quantization};
use crate::model::bart::BartModel;
use crate::model::config::Florence2Config;
use crate::model::florence2::Florence2ForConditionalGeneration;
use crate::model::projector::Florence2MultiModalProjector;
use crate::model::vision::Florence2VisionBackbone;
use crate::processor::{ImageProcessorConfig, Size};
use crate::{Error, Result};

/// HF-native names of the LM head and of the embedding copies BART keeps per stack.
const LM_HEAD: &str = "lm_head.weight";
const ENCODER_EMBED_TOKENS: &str = "model.language_model.encoder.embed_tokens.weight";
const DECODER_EMBED_TOKENS: &str = "model.language_model.decoder.embed_tokens.weight";

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

/// The image size the checkpoint's processor makes (its exact `size`, read where the processor reads
/// it), else Florence-2's 768x768. Settings the processor cannot read are its own load's error, not the
/// model's.
fn processor_image_size(dir: &Path) -> (usize, usize) {
    match crate::processor::read_image_config(dir) {
        Ok(Some(ImageProcessorConfig {
            size: Size::Exact { height, width },
            ..
        })) => (height, width),
        _ => (768, 768),
    }
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
    /// transformers' `dtype="auto"`: the config's `dtype`/`torch_dtype`, else the stored weights' dtype.
    pub fn auto_dtype(dir: &Path) -> Result<DType> {
        let config = Florence2Config::from_file(&dir.join("config.json"))?;
        match config.dtype.as_deref().and_then(crate::dtype::lookup) {
            Some(dtype) => Ok(dtype),
            None => Ok(Checkpoint::stored_dtype_in(dir)?.unwrap_or(DType::F32)),
        }
    }

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
            match PackedTable::pack(&weight, q.map(Quantization::for_token_table))? {
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
            compute_dtype: dtype,
            device: device.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Module;

    fn load_quantized(dir: &Path, q: Option<Quantization>) -> Florence2ForConditionalGeneration {
        Florence2ForConditionalGeneration::from_dir_quantized(dir, DType::F32, &Device::Cpu, q)
            .expect("load")
    }

    fn bits(values: &Tensor) -> Vec<u32> {
        let values: Vec<f32> = values
            .flatten_all()
            .expect("flat")
            .to_vec1()
            .expect("values");
        values.into_iter().map(f32::to_bits).collect()
    }

    /// A 4-bit model holds its token table (and the LM head tied to it) at 8 bits: its embeddings are the
    /// 8-bit model's, bit for bit, and not the dense ones.
    #[test]
    fn int4_keeps_the_token_table_at_int8() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/hf");
        let ids = Tensor::new(&[[0u32, 5, 17, 2]], &Device::Cpu).expect("ids");
        let embed = |model: &Florence2ForConditionalGeneration| {
            bits(&model.language.embed_tokens(&ids).expect("embed"))
        };
        let int4 = embed(&load_quantized(&dir, Some(Quantization::Int4)));
        assert_eq!(int4, embed(&load_quantized(&dir, Some(Quantization::Int8))));
        if crate::kernels::cpu::quantized_gemm::available() {
            assert_ne!(
                int4,
                embed(&load_quantized(&dir, None)),
                "the table is quantized"
            );
        }
    }

    /// So does an untied LM head (Microsoft's layout with `tie_word_embeddings: false`, its stored head the
    /// embedding negated, so that a head tied by mistake shows): a 4-bit model's logits are the 8-bit model's,
    /// bit for bit, and not the tied model's.
    #[test]
    fn int4_keeps_an_untied_head_at_int8() {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/original");
        let dir = tempfile::tempdir().expect("temporary folder");
        let mut weights =
            candle_core::safetensors::load(source.join("model.safetensors"), &Device::Cpu)
                .expect("weights");
        let key = weights
            .keys()
            .find(|key| key.ends_with(LM_HEAD))
            .expect("a stored head")
            .clone();
        let negated = weights[&key].neg().expect("negated head");
        weights.insert(key, negated);
        candle_core::safetensors::save(&weights, dir.path().join("model.safetensors"))
            .expect("write weights");
        let mut config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(source.join("config.json")).expect("config"),
        )
        .expect("json");
        config["text_config"]["tie_word_embeddings"] = serde_json::Value::Bool(false);
        std::fs::write(dir.path().join("config.json"), config.to_string()).expect("write config");

        let d_model = config["text_config"]["d_model"].as_u64().expect("d_model") as usize;
        let hidden = Tensor::randn(0f32, 1.0, (1, 3, d_model), &Device::Cpu).expect("hidden");
        let head = |model: &Florence2ForConditionalGeneration| {
            bits(&model.lm_head.forward(&hidden).expect("head"))
        };
        let int4 = head(&load_quantized(dir.path(), Some(Quantization::Int4)));
        assert_eq!(
            int4,
            head(&load_quantized(dir.path(), Some(Quantization::Int8)))
        );
        assert_ne!(
            int4,
            head(&load_quantized(&source, Some(Quantization::Int4))),
            "the head is untied"
        );
        if crate::kernels::cpu::quantized_gemm::available() {
            assert_ne!(
                int4,
                head(&load_quantized(dir.path(), None)),
                "the head is quantized"
            );
        }
    }
}
