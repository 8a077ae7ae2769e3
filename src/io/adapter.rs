//! PEFT LoRA adapters: the folder peft's `save_pretrained` writes (`adapter_config.json` and
//! `adapter_model.safetensors`, or `adapter_model.bin`), merged into the base weights as the model loads them,
//! so that a call costs what it costs without the adapter.
//!
//! The adapter's tensors are named after the modules of the model it was trained on, behind peft's
//! `base_model.model.` prefix: transformers' HF-native model (`model.language_model.encoder.layers.0...`) or
//! Microsoft's remote-code one (`language_model.model.encoder.layers.0...`, `vision_tower.blocks...`). Those
//! are the tensor names of a checkpoint in that layout, so either kind applies to a base in either layout.
//!
//! What the file holds, per module `m` of the base:
//! - `m.lora_A.weight` `[r, in, ...]` and `m.lora_B.weight` `[out, r, 1, ...]` (linear and convolution
//!   layers): `W += scale · B A`, the product taken over `r` with A's trailing dims kept;
//! - any other tensor (`modules_to_save`, trained biases): the base tensor's replacement.
//!
//! The token embedding and the LM head are refused: florence2-rs holds one token embedding for the encoder,
//! the decoder and the tied head, while transformers' model (and Microsoft's) keeps the decoder's and the
//! head's copies apart from the one a LoRA or `modules_to_save` would change.
//!
//! `scale` is `lora_alpha / r`, or `lora_alpha / √r` with `use_rslora`. Other peft methods and LoRA options
//! that change the formula (DoRA, per-module rank or alpha patterns, LoRA biases, `fan_in_fan_out`) are refused
//! with an error naming them.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::checkpoint::original_name;
use super::json::read_json;
use super::layout::Layout;
use super::pytorch::read_state_dict;
use crate::{Error, Result};

/// The config file of a peft adapter folder.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// Its weights, as peft saves them by default.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// Its weights, as older peft versions (or `safe_serialization=False`) save them.
pub const ADAPTER_WEIGHTS_BIN: &str = "adapter_model.bin";

/// The prefix peft puts before the base model's own names.
const PEFT_PREFIX: &str = "base_model.model.";

/// The low-rank factors of one module.
struct LowRank {
    a: Tensor,
    b: Tensor,
}

/// A LoRA adapter, read and checked, ready to be merged tensor by tensor.
pub struct Adapter {
    /// The naming of the model the adapter was trained on.
    layout: Layout,
    source: PathBuf,
    scale: f64,
    /// `lora_A` / `lora_B` of linear and convolution layers, by module name.
    linear: HashMap<String, LowRank>,
    /// Tensors that replace the base's, by tensor name.
    replaced: HashMap<String, Tensor>,
    /// The names (of `replaced`, or modules of `linear`) merged so far.
    used: Mutex<HashSet<String>>,
}

impl Adapter {
    /// Reads the adapter folder `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let config_path = dir.join(ADAPTER_CONFIG);
        if !config_path.is_file() {
            return Err(Error::NotFound {
                path: config_path,
                hint: "A PEFT adapter folder holds adapter_config.json and adapter_model.safetensors (what \
                       peft's save_pretrained writes)."
                    .into(),
            });
        }
        let config = read_json(&config_path)?;
        let (scale, rank) = lora_scale(&config).map_err(|msg| Error::Config {
            path: config_path.clone(),
            msg,
        })?;
        let (tensors, source) = read_weights(dir)?;
        let bad = |msg: String| Error::Weights {
            path: source.clone(),
            msg,
        };
        let mut names = Vec::with_capacity(tensors.len());
        let mut parts: HashMap<String, [Option<Tensor>; 2]> = HashMap::new();
        let mut replaced = HashMap::new();
        for (key, tensor) in tensors {
            let Some(name) = key.strip_prefix(PEFT_PREFIX) else {
                return Err(bad(format!(
                    "tensor `{key}` lacks peft's `{PEFT_PREFIX}` prefix: not a peft adapter file"
                )));
            };
            if let Some(what) = token_embedding_or_head(name) {
                return Err(bad(format!(
                    "the adapter changes the {what} (`{name}`), which florence2-rs shares between the encoder, \
                     the decoder and the LM head where transformers keeps separate copies; adapters on the other \
                     modules are supported"
                )));
            }
            names.push(name.to_string());
            let factor = [(".lora_A.weight", 0), (".lora_B.weight", 1)]
                .into_iter()
                .find_map(|(suffix, slot)| Some((name.strip_suffix(suffix)?, slot)));
            match factor {
                Some((module, slot)) => {
                    parts.entry(module.to_string()).or_default()[slot] = Some(tensor);
                }
                None if name.contains(".lora_") => {
                    return Err(bad(format!(
                        "tensor `{key}` is of a LoRA variant florence2-rs does not merge (DoRA's magnitude, \
                         LoRA biases, LoRA on embeddings ...); plain LoRA on linear and convolution layers is \
                         supported"
                    )));
                }
                // peft's copy of a `modules_to_save` module as it was before training: the base's own.
                None if name.contains(".original_module.") => {}
                None => {
                    // A trained copy of a base tensor; peft names a wrapped layer's own tensors `base_layer`.
                    replaced.insert(name.replace(".base_layer.", "."), tensor);
                }
            }
        }
        let layout = adapter_layout(names.iter()).ok_or_else(|| {
            bad("its tensor names are not those of a Florence-2 model (neither transformers' `model.*` nor \
                 Microsoft's `language_model.*` / `vision_tower.*`)"
                .into())
        })?;
        let linear = parts
            .into_iter()
            .map(|(module, [a, b])| match (a, b) {
                (Some(a), Some(b)) => Ok((module, low_rank(a, b, rank).map_err(&bad)?)),
                _ => Err(bad(format!(
                    "module `{module}` has only one of its two LoRA factors"
                ))),
            })
            .collect::<Result<HashMap<_, _>>>()?;
        Ok(Self {
            layout,
            scale,
            linear,
            replaced,
            source,
            used: Mutex::default(),
        })
    }

    /// The adapter's name of the HF-native tensor name `hf_name`.
    fn name_of(&self, hf_name: &str) -> String {
        match self.layout {
            Layout::HfNative => hf_name.to_string(),
            Layout::Original => original_name(hf_name),
        }
    }

    /// The adapter's replacement of its tensor `name`, in HF-native orientation.
    fn replacement(&self, name: &str) -> candle_core::Result<Option<Tensor>> {
        let Some(tensor) = self.replaced.get(name) else {
            return Ok(None);
        };
        self.mark_used(name);
        // Microsoft's layout stores the image projection transposed ([vision_dim, projection_dim]).
        if self.layout == Layout::Original && name == "image_projection" {
            return Ok(Some(tensor.t()?.contiguous()?));
        }
        Ok(Some(tensor.clone()))
    }

    fn mark_used(&self, name: &str) {
        self.used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string());
    }

    /// Refuses an adapter some of whose tensors the model never loaded: they name modules the model does not
    /// have (an adapter made for another model), and merging the rest alone would be a silently different
    /// model.
    pub fn check_all_merged(&self) -> Result<()> {
        let used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        let mut unused: Vec<&String> = self
            .replaced
            .keys()
            .chain(self.linear.keys())
            .filter(|name| !used.contains(*name))
            .collect();
        if unused.is_empty() {
            return Ok(());
        }
        unused.sort();
        let shown: Vec<&str> = unused.iter().take(5).map(|s| s.as_str()).collect();
        Err(Error::Weights {
            path: self.source.clone(),
            msg: format!(
                "{} of the adapter's modules or tensors match nothing this model loads ({}{}); the adapter was \
                 made for another model",
                unused.len(),
                shown.join(", "),
                if unused.len() > shown.len() { ", ..." } else { "" }
            ),
        })
    }

    /// `tensor`, the base's tensor named `hf_name` (an HF-native name, in HF-native orientation), with this
    /// adapter merged in.
    pub fn apply(&self, hf_name: &str, tensor: Tensor) -> candle_core::Result<Tensor> {
        let name = self.name_of(hf_name);
        let tensor = match self.replacement(&name)? {
            Some(replacement) => {
                self.check_shape(&name, &replacement, &tensor)?;
                replacement
                    .to_dtype(tensor.dtype())?
                    .to_device(tensor.device())?
            }
            None => tensor,
        };
        let Some(pair) = name
            .strip_suffix(".weight")
            .and_then(|module| self.linear.get(module))
        else {
            return Ok(tensor);
        };
        // The product's shape is checked against the weight before it is made: factors from another model
        // could otherwise ask for an arbitrarily large product.
        let rows = tensor.dims().first().copied().unwrap_or(1);
        let cols = tensor.elem_count() / rows.max(1);
        let (r, out, per_rank) = (
            pair.a.dim(0)?,
            pair.b.dim(0)?,
            pair.a.elem_count() / pair.a.dim(0)?,
        );
        self.check_product(&name, (out, per_rank), (rows, cols))?;
        let delta = pair
            .b
            .reshape((out, r))?
            .matmul(&pair.a.reshape((r, ()))?)?
            .reshape(tensor.shape())?;
        self.mark_used(name.strip_suffix(".weight").unwrap_or(&name));
        self.check_shape(&name, &delta, &tensor)?;
        // Left in f32: the loader converts it to the model's dtype once, so a weight stored in half precision
        // and loaded in f32 keeps the whole update.
        tensor.to_dtype(DType::F32)? + (delta * self.scale)?.to_device(tensor.device())?
    }

    /// Refuses factors whose product (`got`, as rows x the rest) is not the base weight's shape (`want`).
    fn check_product(
        &self,
        name: &str,
        got: (usize, usize),
        want: (usize, usize),
    ) -> candle_core::Result<()> {
        if got != want {
            candle_core::bail!(
                "{}: the adapter's LoRA factors of `{name}` make a {}x{} update for a weight of {}x{} (shape \
                 flattened after its first dim); the adapter was trained on another model",
                self.source.display(),
                got.0,
                got.1,
                want.0,
                want.1
            );
        }
        Ok(())
    }

    fn check_shape(&self, name: &str, adapted: &Tensor, base: &Tensor) -> candle_core::Result<()> {
        if adapted.dims() != base.dims() {
            candle_core::bail!(
                "{}: the adapter's `{name}` has shape {:?}, the base model's {:?}; the adapter was trained on \
                 another model",
                self.source.display(),
                adapted.dims(),
                base.dims()
            );
        }
        Ok(())
    }
}

/// `lora_alpha / r` (or `/ √r` with `use_rslora`) and `r`, after refusing what changes the merge formula.
fn lora_scale(config: &Value) -> std::result::Result<(f64, usize), String> {
    let peft_type = config
        .get("peft_type")
        .and_then(Value::as_str)
        .unwrap_or("LORA");
    if peft_type != "LORA" {
        return Err(format!(
            "peft_type {peft_type:?} is not supported: florence2-rs merges LoRA adapters only"
        ));
    }
    let set = |key: &str| {
        config.get(key).is_some_and(|v| match v {
            Value::Null => false,
            Value::Bool(b) => *b,
            Value::Object(m) => !m.is_empty(),
            Value::Array(a) => !a.is_empty(),
            Value::String(s) => !s.is_empty(),
            Value::Number(_) => true,
        })
    };
    let refused = [
        ("use_dora", "DoRA (use_dora)"),
        ("lora_bias", "LoRA biases (lora_bias)"),
        ("fan_in_fan_out", "fan_in_fan_out"),
        ("rank_pattern", "per-module ranks (rank_pattern)"),
        ("alpha_pattern", "per-module alphas (alpha_pattern)"),
        (
            "target_parameters",
            "LoRA on parameters (target_parameters)",
        ),
        (
            "trainable_token_indices",
            "trainable tokens (trainable_token_indices)",
        ),
        ("use_qalora", "QALoRA (use_qalora)"),
        ("megatron_config", "Megatron layers (megatron_config)"),
        (
            "alora_invocation_tokens",
            "activated LoRA (alora_invocation_tokens)",
        ),
        ("arrow_config", "Arrow routing (arrow_config)"),
        ("use_bdlora", "BD-LoRA (use_bdlora)"),
        ("kasa_config", "KaSA (kasa_config)"),
        ("layer_replication", "layer replication (layer_replication)"),
    ];
    if let Some((_, what)) = refused.iter().find(|(key, _)| set(key)) {
        return Err(format!("{what} is not supported; plain LoRA adapters are"));
    }
    let r = config
        .get("r")
        .and_then(Value::as_u64)
        .filter(|&r| r > 0)
        .ok_or("`r` must be a positive integer")?;
    let alpha = config
        .get("lora_alpha")
        .map_or(Some(8.0), Value::as_f64)
        .filter(|a| a.is_finite())
        .ok_or("`lora_alpha` must be a finite number")?;
    let rslora = config
        .get("use_rslora")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let scale = if rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    };
    let rank = usize::try_from(r).map_err(|_| "`r` is too large")?;
    Ok((scale, rank))
}

/// The adapter's tensors, from its safetensors file or else its PyTorch one, and the file they came from.
fn read_weights(dir: &Path) -> Result<(HashMap<String, Tensor>, PathBuf)> {
    let safetensors = dir.join(ADAPTER_WEIGHTS);
    if safetensors.is_file() {
        let tensors = candle_core::safetensors::load(&safetensors, &Device::Cpu).map_err(|e| {
            Error::Weights {
                path: safetensors.clone(),
                msg: format!("cannot read the adapter's safetensors ({e})"),
            }
        })?;
        return Ok((tensors, safetensors));
    }
    let bin = dir.join(ADAPTER_WEIGHTS_BIN);
    if bin.is_file() {
        return Ok((read_state_dict(&bin)?, bin));
    }
    Err(Error::NotFound {
        path: safetensors,
        hint: format!("The adapter folder has {ADAPTER_CONFIG} but neither {ADAPTER_WEIGHTS} nor {ADAPTER_WEIGHTS_BIN}."),
    })
}

/// Which model's names the adapter's tensors (without peft's prefix) follow.
fn adapter_layout<'a>(names: impl Iterator<Item = &'a String>) -> Option<Layout> {
    let (mut hf_native, mut original) = (false, false);
    for name in names {
        hf_native |= name.starts_with("model.") || name.starts_with("lm_head.");
        original |= ["language_model.", "vision_tower.", "image_"]
            .iter()
            .any(|prefix| name.starts_with(prefix));
    }
    match (hf_native, original) {
        (true, false) => Some(Layout::HfNative),
        (false, true) => Some(Layout::Original),
        _ => None,
    }
}

/// The factors of one module, in f32, checked to be of the config's rank.
fn low_rank(a: Tensor, b: Tensor, rank: usize) -> std::result::Result<LowRank, String> {
    let dims = |t: &Tensor| t.dims().to_vec();
    let fits = a.rank() >= 2
        && b.rank() >= 2
        && a.dims()[0] == rank
        && b.dims()[1] == rank
        && b.dims()[2..].iter().all(|&d| d == 1);
    if !fits {
        return Err(format!(
            "LoRA factors of shapes {:?} (A) and {:?} (B) are not of rank r = {rank} (adapter_config.json), \
             or B is not a 1x1 kernel (grouped convolutions are not supported)",
            dims(&a),
            dims(&b)
        ));
    }
    let f32 = |t: Tensor| t.to_dtype(DType::F32).map_err(|e| e.to_string());
    Ok(LowRank {
        a: f32(a)?,
        b: f32(b)?,
    })
}

/// What `name` (an adapter tensor name without peft's prefix) changes when it is the token embedding or the
/// LM head, in either naming; `None` for every other module.
fn token_embedding_or_head(name: &str) -> Option<&'static str> {
    let module = name.split(".lora_").next().unwrap_or(name);
    let module = module
        .strip_suffix(".weight")
        .unwrap_or(module)
        .replace(".base_layer", "");
    let embedding = ["shared", "encoder.embed_tokens", "decoder.embed_tokens"];
    if ["model.language_model.", "language_model.model."]
        .iter()
        .any(|stack| embedding.iter().any(|e| module == format!("{stack}{e}")))
    {
        return Some("token embedding");
    }
    if module == "lm_head" || module == "language_model.lm_head" {
        return Some("LM head");
    }
    None
}
