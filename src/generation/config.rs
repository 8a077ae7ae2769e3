//! `GenerationConfig`: the generation settings of transformers' `GenerationConfig`, resolved for a checkpoint
//! as the code that released its layout resolves them ([`GenerationConfig::from_dir`]), and overridden by a
//! caller's `generation_config=` and `generate()` keyword arguments.
//!
//! - HF-native layout (transformers' own Florence-2): generation_config.json when the checkpoint has one, else
//!   transformers' `GenerationConfig.from_model_config` on config.json.
//! - Microsoft's original layout: its remote code generates through `self.language_model.generate(...)`, whose
//!   generation config transformers builds from the language model's own config when the model is constructed:
//!   `text_config` over the defaults of Microsoft's `Florence2LanguageConfig`. A generation_config.json (as
//!   Florence-2-large-ft ships) is loaded onto the outer model only and never reaches that call, so it is not
//!   read for this layout.
//!
//! Every field is an `Option`: `None` means "not set here", exactly like transformers' `None` attributes, so
//! that the precedence kwargs > generation_config.json > global defaults is a plain overwrite and the global
//! defaults (max_length 20, num_beams 1 ...) are applied only when generation starts ([`GenerationConfig::plan`]).

use std::path::Path;

use serde::{Serialize, Serializer};
use serde_json::Value;

use crate::io::json::read_json;
use crate::io::Layout;
use crate::{Error, Result};

/// transformers' `early_stopping`: `True`, `False` or `"never"` (see `_check_early_stop_heuristic`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EarlyStopping {
    /// Stop a batch item as soon as `num_beams` hypotheses are finished.
    True,
    /// Stop when the best running beam (scored at the current length) cannot beat the worst finished one.
    False,
    /// Canonical beam search: stop only when no running beam can improve, even at `max_length`.
    Never,
}

impl Serialize for EarlyStopping {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            EarlyStopping::True => serializer.serialize_bool(true),
            EarlyStopping::False => serializer.serialize_bool(false),
            EarlyStopping::Never => serializer.serialize_str("never"),
        }
    }
}

/// A token list as transformers' configs write it: one id as a plain number, several as a list.
fn one_or_many<S: Serializer>(
    tokens: &Option<Vec<u32>>,
    serializer: S,
) -> std::result::Result<S::Ok, S::Error> {
    match tokens.as_deref() {
        Some([one]) => serializer.serialize_u32(*one),
        other => other.serialize(serializer),
    }
}

/// The generation settings transformers' `generate()` reads, in transformers' names and meanings, plus `seed`.
/// Serialized, it is a JSON object of the settings that are set (the unset ones are left out).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct GenerationConfig {
    pub max_length: Option<usize>,
    pub max_new_tokens: Option<usize>,
    pub min_length: Option<usize>,
    pub min_new_tokens: Option<usize>,
    pub early_stopping: Option<EarlyStopping>,
    pub do_sample: Option<bool>,
    pub num_beams: Option<usize>,
    pub temperature: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub length_penalty: Option<f64>,
    pub no_repeat_ngram_size: Option<usize>,
    pub bad_words_ids: Option<Vec<Vec<u32>>>,
    pub forced_bos_token_id: Option<u32>,
    #[serde(serialize_with = "one_or_many")]
    pub forced_eos_token_id: Option<Vec<u32>>,
    pub suppress_tokens: Option<Vec<u32>>,
    pub begin_suppress_tokens: Option<Vec<u32>>,
    pub num_return_sequences: Option<usize>,
    pub output_scores: Option<bool>,
    pub return_dict_in_generate: Option<bool>,
    pub pad_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    #[serde(serialize_with = "one_or_many")]
    pub eos_token_id: Option<Vec<u32>>,
    pub decoder_start_token_id: Option<u32>,
    /// Not in transformers: seeds the sampling RNG (ChaCha8) so that `do_sample=True` is reproducible.
    /// Sampled ids follow the same distribution as transformers' but cannot equal torch's RNG draws.
    pub seed: Option<u64>,
}

/// transformers' `GenerationConfig` attributes that this crate accepts but that change nothing here (cache and
/// debugging-output switches), so that a generation_config.json or a user's call carrying them still works.
const NO_EFFECT_KEYS: &[&str] = &[
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "output_logits",
    "cache_implementation",
    "cache_config",
    "compile_config",
    "disable_compile",
    "transformers_version",
    "_from_model_config",
    "_commit_hash",
];

/// transformers' `GenerationConfig` attributes that are not implemented, each with the value at which it does
/// nothing (its global default). They are accepted at that value and rejected at any other.
const UNSUPPORTED_KEYS: &[(&str, Option<f64>)] = &[
    ("typical_p", Some(1.0)),
    ("epsilon_cutoff", Some(0.0)),
    ("eta_cutoff", Some(0.0)),
    ("encoder_repetition_penalty", Some(1.0)),
    ("encoder_no_repeat_ngram_size", Some(0.0)),
    ("num_beam_groups", Some(1.0)),
    ("diversity_penalty", Some(0.0)),
    ("guidance_scale", Some(1.0)),
    ("remove_invalid_values", Some(0.0)),
    ("renormalize_logits", Some(0.0)),
    ("token_healing", Some(0.0)),
    ("low_memory", Some(0.0)),
    ("min_p", None),
    ("top_h", None),
    ("max_time", None),
    ("stop_strings", None),
    ("sequence_bias", None),
    ("exponential_decay_length_penalty", None),
    ("penalty_alpha", None),
    ("dola_layers", None),
    ("constraints", None),
    ("force_words_ids", None),
    ("watermarking_config", None),
    ("prompt_lookup_num_tokens", None),
    ("assistant_early_exit", None),
];

impl GenerationConfig {
    /// The settings transformers uses for a checkpoint: generation_config.json when the checkpoint has one
    /// (it then replaces the model config entirely), else [`GenerationConfig::from_model_config`] on config.json.
    pub fn from_checkpoint(
        generation_config_json: Option<&Value>,
        config_json: &Value,
    ) -> Result<Self> {
        match generation_config_json {
            Some(v) => Self::from_json(v),
            None => Self::from_model_config(config_json),
        }
    }

    /// The settings `generate` starts from for a checkpoint folder of `layout` (see the module docs).
    ///
    /// HF-native, one deviation from transformers: special token ids that generation_config.json lacks are
    /// taken from config.json, without which transformers' generate cannot start ("decoder_start_token_id ...
    /// has to be defined") on a bare generation_config.json.
    pub fn from_dir(dir: &Path, layout: Layout) -> Result<Self> {
        let config = read_json(&dir.join("config.json"))?;
        if layout == Layout::Original {
            return Self::from_original_config(&config);
        }
        let gen_path = dir.join("generation_config.json");
        let generation = if gen_path.is_file() {
            Some(read_json(&gen_path)?)
        } else {
            None
        };
        let mut cfg = Self::from_checkpoint(generation.as_ref(), &config)?;
        if generation.is_some() {
            let model = Self::from_model_config(&config)?;
            cfg.decoder_start_token_id =
                cfg.decoder_start_token_id.or(model.decoder_start_token_id);
            cfg.bos_token_id = cfg.bos_token_id.or(model.bos_token_id);
            cfg.eos_token_id = cfg.eos_token_id.or(model.eos_token_id);
            cfg.pad_token_id = cfg.pad_token_id.or(model.pad_token_id);
        }
        Ok(cfg)
    }

    /// Parses a generation_config.json. Keys that are not generation settings are ignored (transformers keeps
    /// them as custom attributes); known keys with a wrong type are errors.
    pub fn from_json(value: &Value) -> Result<Self> {
        let obj = value
            .as_object()
            .ok_or_else(|| Error::invalid("generation_config.json must hold a JSON object"))?;
        let mut cfg = Self::default();
        for (key, v) in obj {
            cfg.apply(key, v)?;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// transformers' `GenerationConfig.from_model_config` on a config.json: its top-level generation keys,
    /// then, for every setting still unset, the value in `text_config` (or `decoder`/`generator`). Florence-2
    /// keeps num_beams 3, no_repeat_ngram_size 3, early_stopping, forced_bos/eos and decoder_start there.
    pub fn from_model_config(config_json: &Value) -> Result<Self> {
        let obj = config_json
            .as_object()
            .ok_or_else(|| Error::invalid("config.json must hold a JSON object"))?;
        let mut cfg = Self::default();
        for (key, v) in obj {
            if !v.is_null() {
                cfg.apply(key, v)?;
            }
        }
        let text = ["decoder", "generator", "text_config"]
            .iter()
            .find_map(|name| {
                obj.get(*name)
                    .and_then(Value::as_object)
                    .filter(|t| !t.is_empty())
            });
        if let Some(text) = text {
            for (key, v) in text {
                if cfg.field_is_none(key) {
                    cfg.apply(key, v)?;
                }
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// The language model's generation config in Microsoft's remote code: `text_config` (null values included:
    /// they unset) over the defaults `Florence2LanguageConfig.__init__` passes to transformers.
    pub fn from_original_config(config_json: &Value) -> Result<Self> {
        let text = config_json
            .get("text_config")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::invalid("config.json has no `text_config` object"))?;
        let mut cfg = Self {
            pad_token_id: Some(1),
            bos_token_id: Some(0),
            eos_token_id: Some(vec![2]),
            decoder_start_token_id: Some(2),
            forced_eos_token_id: Some(vec![2]),
            ..Self::default()
        };
        for (key, v) in text {
            cfg.apply(key, v)?;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Applies the attributes of a caller's `generation_config=` object. Unlike keyword arguments, attributes
    /// that are not generation settings here (transformers' assistant or cache options, custom ones) are
    /// ignored, as transformers keeps them; their names are returned so that the caller can warn.
    pub fn merge_lenient(
        &mut self,
        settings: &serde_json::Map<String, Value>,
    ) -> Result<Vec<String>> {
        let mut ignored = Vec::new();
        for (key, v) in settings {
            match self.apply(key, v) {
                Ok(true) => {}
                Ok(false) => ignored.push(key.clone()),
                Err(_) if UNSUPPORTED_KEYS.iter().any(|(k, _)| k == key) => {
                    ignored.push(key.clone())
                }
                Err(err) => return Err(err),
            }
        }
        Ok(ignored)
    }

    /// The settings that are set, as a JSON object in transformers' names.
    pub fn to_json(&self) -> Value {
        let mut value =
            serde_json::to_value(self).unwrap_or_else(|_| Value::Object(Default::default()));
        if let Value::Object(map) = &mut value {
            map.retain(|_, v| !v.is_null());
        }
        value
    }

    /// Sets one setting by its transformers name, as `generate(**kwargs)` does; `null` unsets it.
    /// Unknown names, wrong types and out-of-range values are [`Error::InvalidInput`].
    pub fn set(&mut self, key: &str, value: Value) -> Result<()> {
        if self.apply(key, &value)? {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "`{key}` is not a generation setting (note: typos in the generate arguments also show up here)"
            )))
        }
    }

    /// Rows per batch item the caller's [`super::DecoderSession`] must hold: transformers'
    /// `max(num_beams, num_return_sequences)`, each item repeated consecutively.
    pub fn expand_factor(&self) -> usize {
        self.num_beams
            .unwrap_or(1)
            .max(self.num_return_sequences.unwrap_or(1))
    }

    /// transformers' `GenerationConfig.validate` errors (its warnings are not reproduced).
    pub fn validate(&self) -> Result<()> {
        if self.max_new_tokens == Some(0) {
            return Err(Error::invalid(
                "`max_new_tokens` must be greater than 0, but is 0.",
            ));
        }
        if self.num_beams == Some(0) {
            return Err(Error::invalid(
                "`num_beams` has to be a strictly positive integer, but is 0.",
            ));
        }
        if self.num_return_sequences == Some(0) {
            return Err(Error::invalid(
                "`num_return_sequences` has to be a strictly positive integer, but is 0.",
            ));
        }
        let nrs = self.num_return_sequences.unwrap_or(1);
        let num_beams = self.num_beams.unwrap_or(1);
        if nrs > 1 {
            if num_beams == 1 && self.do_sample != Some(true) {
                return Err(Error::invalid(format!(
                    "Greedy methods (do_sample != True) without beam search do not support `num_return_sequences` \
                     different than 1 (got {nrs})."
                )));
            }
            if num_beams > 1 && nrs > num_beams {
                return Err(Error::invalid(format!(
                    "`num_return_sequences` ({nrs}) has to be smaller or equal to `num_beams` ({num_beams})."
                )));
            }
        }
        if let Some(suppressed) = &self.suppress_tokens {
            let forced = [
                (
                    "forced_bos_token_id",
                    self.forced_bos_token_id.map(|t| vec![t]),
                ),
                ("forced_eos_token_id", self.forced_eos_token_id.clone()),
            ];
            for (name, tokens) in forced {
                if let Some(tokens) = tokens.filter(|t| !t.is_empty()) {
                    if tokens.iter().all(|t| suppressed.contains(t)) {
                        return Err(Error::invalid(format!(
                            "Every token in `{name}` ({tokens:?}) is also in `suppress_tokens`. Forcing a token while \
                             suppressing it leaves no token to generate. Remove the overlapping token(s) from either \
                             `{name}` or `suppress_tokens` (to prevent an early EOS token, use `min_new_tokens`)."
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether `key` names no setting that is set (unknown, no-effect and unsupported keys hold nothing).
    fn field_is_none(&self, key: &str) -> bool {
        self.to_json().get(key).is_none()
    }

    /// Applies one key; `Ok(false)` for a key that is not a generation setting.
    fn apply(&mut self, key: &str, v: &Value) -> Result<bool> {
        match key {
            "max_length" => self.max_length = opt(v, |v| positive(key, v))?,
            "max_new_tokens" => self.max_new_tokens = opt(v, |v| positive(key, v))?,
            "min_length" => self.min_length = opt(v, |v| count(key, v))?,
            "min_new_tokens" => self.min_new_tokens = opt(v, |v| count(key, v))?,
            "early_stopping" => self.early_stopping = opt(v, early_stopping)?,
            "do_sample" => self.do_sample = opt(v, |v| boolean(key, v))?,
            "num_beams" => self.num_beams = opt(v, |v| positive(key, v))?,
            "temperature" => {
                self.temperature = opt(v, |v| {
                    let t = float(key, v)?;
                    if t > 0.0 {
                        Ok(t)
                    } else {
                        Err(Error::invalid(format!(
                            "`temperature` (={t}) has to be a strictly positive float, otherwise your next token \
                             scores will be invalid. If you're looking for greedy decoding strategies, set \
                             `do_sample=False`."
                        )))
                    }
                })?
            }
            "top_k" => self.top_k = opt(v, |v| count(key, v))?,
            "top_p" => {
                self.top_p = opt(v, |v| {
                    let p = float(key, v)?;
                    if (0.0..=1.0).contains(&p) {
                        Ok(p)
                    } else {
                        Err(Error::invalid(format!(
                            "`top_p` has to be a float > 0 and < 1, but is {p}"
                        )))
                    }
                })?
            }
            "repetition_penalty" => {
                self.repetition_penalty = opt(v, |v| {
                    let p = float(key, v)?;
                    if p > 0.0 {
                        Ok(p)
                    } else {
                        Err(Error::invalid(format!(
                            "`penalty` has to be a strictly positive float, but is {p}"
                        )))
                    }
                })?
            }
            "length_penalty" => self.length_penalty = opt(v, |v| float(key, v))?,
            "no_repeat_ngram_size" => self.no_repeat_ngram_size = opt(v, |v| count(key, v))?,
            "bad_words_ids" => self.bad_words_ids = opt(v, bad_words)?,
            "forced_bos_token_id" => self.forced_bos_token_id = opt(v, |v| token(key, v))?,
            "forced_eos_token_id" => self.forced_eos_token_id = opt(v, |v| tokens(key, v))?,
            "suppress_tokens" => self.suppress_tokens = opt(v, |v| token_list(key, v))?,
            "begin_suppress_tokens" => self.begin_suppress_tokens = opt(v, |v| token_list(key, v))?,
            "num_return_sequences" => self.num_return_sequences = opt(v, |v| positive(key, v))?,
            "output_scores" => self.output_scores = opt(v, |v| boolean(key, v))?,
            "return_dict_in_generate" => {
                self.return_dict_in_generate = opt(v, |v| boolean(key, v))?
            }
            "pad_token_id" => self.pad_token_id = opt(v, |v| token(key, v))?,
            "bos_token_id" => self.bos_token_id = opt(v, |v| token(key, v))?,
            "eos_token_id" => self.eos_token_id = opt(v, |v| tokens(key, v))?,
            "decoder_start_token_id" => self.decoder_start_token_id = opt(v, |v| token(key, v))?,
            "seed" => {
                self.seed = opt(v, |v| {
                    v.as_u64()
                        .ok_or_else(|| type_error(key, "a non-negative integer", v))
                })?
            }
            _ if NO_EFFECT_KEYS.contains(&key) => {}
            _ => match UNSUPPORTED_KEYS.iter().find(|(k, _)| *k == key) {
                Some((_, neutral)) => {
                    let is_neutral = match (v, neutral) {
                        (Value::Null, _) => true,
                        (Value::Bool(b), Some(n)) => f64::from(u8::from(*b)) == *n,
                        (Value::Number(x), Some(n)) => x.as_f64() == Some(*n),
                        _ => false,
                    };
                    if !is_neutral {
                        return Err(Error::invalid(format!(
                            "`{key}` = {v} is not supported by florence2-rs's generation loop"
                        )));
                    }
                }
                None => return Ok(false),
            },
        }
        Ok(true)
    }
}

fn opt<T>(v: &Value, parse: impl FnOnce(&Value) -> Result<T>) -> Result<Option<T>> {
    if v.is_null() {
        Ok(None)
    } else {
        parse(v).map(Some)
    }
}

fn type_error(key: &str, expected: &str, v: &Value) -> Error {
    Error::invalid(format!("`{key}` must be {expected}, but is {v}"))
}

fn count(key: &str, v: &Value) -> Result<usize> {
    v.as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| type_error(key, "a non-negative integer below 2^64", v))
}

fn positive(key: &str, v: &Value) -> Result<usize> {
    let non_positive = v.as_f64().is_some_and(|x| x <= 0.0);
    match count(key, v) {
        Ok(n) if n > 0 => Ok(n),
        Err(err) if !non_positive => Err(err),
        _ => Err(Error::invalid(format!(
            "`{key}` must be greater than 0, but is {v}."
        ))),
    }
}

fn float(key: &str, v: &Value) -> Result<f64> {
    v.as_f64().ok_or_else(|| type_error(key, "a number", v))
}

fn boolean(key: &str, v: &Value) -> Result<bool> {
    v.as_bool().ok_or_else(|| type_error(key, "a boolean", v))
}

fn token(key: &str, v: &Value) -> Result<u32> {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| type_error(key, "a non-negative token id", v))
}

fn token_list(key: &str, v: &Value) -> Result<Vec<u32>> {
    v.as_array()
        .ok_or_else(|| type_error(key, "a list of token ids", v))?
        .iter()
        .map(|t| token(key, t))
        .collect()
}

/// A token id or a list of them (eos_token_id and forced_eos_token_id accept both).
fn tokens(key: &str, v: &Value) -> Result<Vec<u32>> {
    if v.is_array() {
        token_list(key, v)
    } else {
        Ok(vec![token(key, v)?])
    }
}

fn early_stopping(v: &Value) -> Result<EarlyStopping> {
    match v {
        Value::Bool(true) => Ok(EarlyStopping::True),
        Value::Bool(false) => Ok(EarlyStopping::False),
        Value::String(s) if s == "never" => Ok(EarlyStopping::Never),
        _ => Err(Error::invalid(format!(
            "`early_stopping` must be a boolean or 'never', but is {v}."
        ))),
    }
}

/// transformers' `NoBadWordsLogitsProcessor._validate_arguments`: a non-empty list of non-empty lists of ids.
fn bad_words(v: &Value) -> Result<Vec<Vec<u32>>> {
    let err = || {
        Error::invalid(format!(
            "`bad_words_ids` has to be a non-empty list of lists of positive integers, but is {v}."
        ))
    };
    let outer = v.as_array().filter(|a| !a.is_empty()).ok_or_else(err)?;
    outer
        .iter()
        .map(|seq| {
            let ids = seq.as_array().filter(|a| !a.is_empty()).ok_or_else(err)?;
            ids.iter()
                .map(|t| token("bad_words_ids", t).map_err(|_| err()))
                .collect()
        })
        .collect()
}

/// Everything one `generate` call needs, with transformers' global defaults and length rules applied.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub num_beams: usize,
    pub num_return_sequences: usize,
    pub do_sample: bool,
    pub max_length: usize,
    pub min_length: usize,
    pub min_new_tokens: Option<usize>,
    pub early_stopping: EarlyStopping,
    pub length_penalty: f64,
    pub eos: Vec<u32>,
    pub pad: Option<u32>,
    pub decoder_start: u32,
    pub output_scores: bool,
    pub seed: Option<u64>,
}

impl GenerationConfig {
    /// The decoder prompt is the single decoder_start token: transformers' `input_ids_length` is 1.
    pub(crate) const DECODER_PROMPT_LEN: usize = 1;

    /// transformers' `generate` steps 1 and 6: `_prepare_special_tokens` and `_prepare_generated_length`
    /// (max_new_tokens wins over max_length; with neither set, 20 new tokens).
    pub(crate) fn plan(&self) -> Result<Plan> {
        self.validate()?;
        let prompt = Self::DECODER_PROMPT_LEN;
        let max_length = match (self.max_new_tokens, self.max_length) {
            (Some(new), _) => new.checked_add(prompt).ok_or_else(|| {
                Error::invalid(format!(
                    "`max_new_tokens` ({new}) is too large: the decoder can generate at most as many tokens as \
                     its max_position_embeddings"
                ))
            })?,
            (None, Some(max)) => max,
            (None, None) => 20 + prompt,
        };
        if prompt >= max_length {
            return Err(Error::invalid(format!(
                "Input length of decoder_input_ids is {prompt}, but `max_length` is set to {max_length}. You \
                 should consider increasing `max_length` or, better yet, setting `max_new_tokens`."
            )));
        }
        let min_length = match self.min_new_tokens {
            Some(n) => n + prompt,
            None => self.min_length.unwrap_or(0),
        };
        let eos = self.eos_token_id.clone().unwrap_or_default();
        let decoder_start = self.decoder_start_token_id.or(self.bos_token_id).ok_or_else(|| {
            Error::invalid("`decoder_start_token_id` or `bos_token_id` has to be defined for encoder-decoder generation.")
        })?;
        Ok(Plan {
            num_beams: self.num_beams.unwrap_or(1),
            num_return_sequences: self.num_return_sequences.unwrap_or(1),
            do_sample: self.do_sample.unwrap_or(false),
            max_length,
            min_length,
            min_new_tokens: self.min_new_tokens,
            early_stopping: self.early_stopping.unwrap_or(EarlyStopping::False),
            length_penalty: self.length_penalty.unwrap_or(1.0),
            pad: self.pad_token_id.or_else(|| eos.first().copied()),
            eos,
            decoder_start,
            output_scores: self.output_scores.unwrap_or(false),
            seed: self.seed,
        })
    }
}
