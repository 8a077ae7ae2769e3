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
//!
//! Only the factors of modules that peft would wrap are merged ([`Targets`]: `target_modules`,
//! `exclude_modules`, `modules_to_save`, `layers_to_transform`); peft reports the others as unexpected keys and
//! leaves them out, and so does [`Adapter::ignored_modules`].

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use regex::Regex;
use serde_json::Value;

use super::json::read_json;
use super::layout::Layout;
use super::names::original_name;
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
    /// Modules with LoRA factors in the file that the config does not target, sorted: not merged.
    ignored: Vec<String>,
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
        let config_error = |msg| Error::Config {
            path: config_path.clone(),
            msg,
        };
        let (scale, rank) = lora_scale(&config).map_err(config_error)?;
        let targets = Targets::from_config(&config).map_err(config_error)?;
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
            names.push(name.to_string());
            let factor = [(".lora_A.weight", 0), (".lora_B.weight", 1)]
                .into_iter()
                .find_map(|(suffix, slot)| Some((name.strip_suffix(suffix)?, slot)));
            // LoRA factors are refused below, once the config says whether peft would wrap their module.
            if factor.is_none() {
                refuse_shared(name).map_err(&bad)?;
            }
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
        let mut ignored = Vec::new();
        let linear = parts
            .into_iter()
            .filter(|(module, [a, _])| {
                let linear = a.as_ref().is_none_or(|a| a.rank() == 2);
                let targeted = targets.matches(module, linear);
                if !targeted {
                    ignored.push(module.clone());
                }
                targeted
            })
            .map(|(module, [a, b])| match (a, b) {
                (Some(a), Some(b)) => {
                    refuse_shared(&format!("{module}.lora_A.weight")).map_err(&bad)?;
                    Ok((module, low_rank(a, b, rank).map_err(&bad)?))
                }
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
            ignored: {
                ignored.sort();
                ignored
            },
        })
    }

    /// The modules whose LoRA factors the file holds but `adapter_config.json` does not target: left out, as
    /// peft leaves them out (it warns of them as unexpected keys).
    pub fn ignored_modules(&self) -> &[String] {
        &self.ignored
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
    let peft_type = match config.get("peft_type") {
        None => "LORA",
        Some(Value::String(name)) => name.as_str(),
        Some(other) => {
            return Err(format!(
                "peft_type {other} is not a peft method's name (a string such as \"LORA\")"
            ))
        }
    };
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

/// Which modules of the base model peft wraps with an adapter's LoRA layers: peft 0.21's
/// `check_target_module_exists`, and `_maybe_include_all_linear_layers` for `"all-linear"`, on the module names
/// of the adapter's file (the names peft matched on the model the adapter was made for).
struct Targets {
    target: ModuleNames,
    exclude: Option<ModuleNames>,
    /// `modules_to_save`: modules peft copies whole, never wrapped with LoRA.
    saved: Vec<Regex>,
    /// `layers_to_transform` and the patterns that find a module's layer index (`layers_pattern`), applied
    /// to a list of `target_modules` only, as peft applies them.
    layers: Option<(Vec<u64>, Vec<Regex>)>,
}

/// `target_modules` or `exclude_modules`.
enum ModuleNames {
    /// Names a module equals or ends with after a dot.
    List(Vec<String>),
    /// A Python regex the whole module name must match (`re.fullmatch`).
    Pattern(Regex),
    /// `"all-linear"`: every linear layer but the LM head (the model's output embeddings), as peft's
    /// `_maybe_include_all_linear_layers` takes them.
    AllLinear,
}

impl ModuleNames {
    /// `None` for a setting that is absent, null or empty.
    fn parse(config: &Value, key: &str) -> std::result::Result<Option<Self>, String> {
        match config.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s))
                if key == "target_modules" && s.eq_ignore_ascii_case("all-linear") =>
            {
                Ok(Some(Self::AllLinear))
            }
            Some(Value::String(pattern)) => Ok(Some(Self::Pattern(python_regex(
                key,
                pattern,
                &format!("^(?:{pattern})$"),
            )?))),
            Some(Value::Array(items)) if items.is_empty() => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| item.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .map(|names| Some(Self::List(names)))
                .ok_or_else(|| format!("`{key}` must be a list of module names or a regex string")),
            Some(_) => Err(format!(
                "`{key}` must be a list of module names or a regex string"
            )),
        }
    }

    /// Whether `module` (a linear layer when `linear`) is named.
    fn matches(&self, module: &str, linear: bool) -> bool {
        match self {
            Self::List(names) => names.iter().any(|name| suffix_match(module, name)),
            Self::Pattern(regex) => regex.is_match(module),
            Self::AllLinear => linear && token_embedding_or_head(module) != Some("LM head"),
        }
    }
}

/// peft's list match: `module` is `name`, or ends with `.name`.
fn suffix_match(module: &str, name: &str) -> bool {
    module
        .strip_suffix(name)
        .is_some_and(|head| head.is_empty() || head.ends_with('.'))
}

/// `full`, a regex built from the Python regex `pattern` of the setting `key`, compiled; the regex crate has
/// no look-around or backreferences, so a pattern that uses them is refused rather than misread.
fn python_regex(key: &str, pattern: &str, full: &str) -> std::result::Result<Regex, String> {
    Regex::new(full).map_err(|e| {
        format!(
            "`{key}` pattern {pattern:?} cannot be used ({}); florence2-rs reads peft's Python regexes without \
             look-around or backreferences: use a list of module names or a simpler pattern",
            e.to_string().lines().last().unwrap_or_default()
        )
    })
}

impl Targets {
    fn from_config(config: &Value) -> std::result::Result<Self, String> {
        let target = ModuleNames::parse(config, "target_modules")?.ok_or(
            "`target_modules` is not set: peft needs it for Florence-2 (it has no default for this model)",
        )?;
        let exclude = ModuleNames::parse(config, "exclude_modules")?;
        let strings = |key: &str| -> std::result::Result<Vec<String>, String> {
            match config.get(key) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::String(s)) => Ok(vec![s.clone()]),
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|item| item.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| format!("`{key}` must be a list of strings")),
                Some(_) => Err(format!("`{key}` must be a list of strings")),
            }
        };
        let saved = strings("modules_to_save")?
            .iter()
            // `re.match(rf"(^|.*\.){m}($|\..*)", key)`: the pattern spliced in as peft splices it, anchored at
            // the start as a whole, as re.match anchors every alternative.
            .map(|m| {
                python_regex(
                    "modules_to_save",
                    m,
                    &format!(r"^(?:(?:^|.*\.){m}(?:$|\..*))"),
                )
            })
            .collect::<std::result::Result<_, _>>()?;
        let indices = match config.get("layers_to_transform") {
            None | Some(Value::Null) => None,
            Some(Value::Array(items)) if items.is_empty() => None,
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .map(Value::as_u64)
                    .collect::<Option<Vec<_>>>()
                    .ok_or("`layers_to_transform` must be a layer index or a list of them")?,
            ),
            Some(value) => Some(vec![value
                .as_u64()
                .ok_or("`layers_to_transform` must be a layer index or a list of them")?]),
        };
        let layers = indices
            .map(|indices| {
                let patterns = strings("layers_pattern")?;
                // peft takes its default for None, "" and [] only: a list of patterns is used as it is.
                let default = config.get("layers_pattern").is_none_or(|p| {
                    p.is_null() || p.as_str() == Some("") || p.as_array().is_some_and(Vec::is_empty)
                });
                let patterns = if default {
                    // The first numbered segment after at least two names: the layer index, not a nested one.
                    vec![Regex::new(r"^.*?\.[^.]*\.(?P<idx>\d+)\.").map_err(|e| e.to_string())?]
                } else {
                    patterns
                        .iter()
                        .map(|p| {
                            python_regex(
                                "layers_pattern",
                                p,
                                // re.match: anchored at the start as a whole.
                                &format!(r"^(?:(?:^|.*?\.){p}\.(?P<idx>\d+)\.)"),
                            )
                        })
                        .collect::<std::result::Result<_, _>>()?
                };
                Ok::<_, String>((indices, patterns))
            })
            .transpose()?;
        Ok(Self {
            target,
            exclude,
            saved,
            layers,
        })
    }

    /// Whether peft wraps `module` (a linear layer when `linear`) with LoRA.
    fn matches(&self, module: &str, linear: bool) -> bool {
        if self
            .exclude
            .as_ref()
            .is_some_and(|e| e.matches(module, linear))
            || self.saved.iter().any(|m| m.is_match(module))
        {
            return false;
        }
        let ModuleNames::List(names) = &self.target else {
            return self.target.matches(module, linear);
        };
        // A module named in full is taken whatever its layer; one matched by its suffix must be in a listed layer.
        if names.iter().any(|name| name == module) {
            return true;
        }
        if !self.target.matches(module, linear) {
            return false;
        }
        let Some((indices, patterns)) = &self.layers else {
            return true;
        };
        patterns
            .iter()
            .find_map(|p| p.captures(module))
            .and_then(|c| c.name("idx")?.as_str().parse::<u64>().ok())
            .is_some_and(|layer| indices.contains(&layer))
    }
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

/// An error for `name` (an adapter tensor name without peft's prefix) when it changes the token embedding or
/// the LM head.
fn refuse_shared(name: &str) -> std::result::Result<(), String> {
    match token_embedding_or_head(name) {
        Some(what) => Err(format!(
            "the adapter changes the {what} (`{name}`), which florence2-rs shares between the encoder, the \
             decoder and the LM head where transformers keeps separate copies; adapters on the other modules \
             are supported"
        )),
        None => Ok(()),
    }
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
