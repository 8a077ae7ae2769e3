//! Model configuration, read from either released config.json:
//!
//! - HF-native (transformers >= 4.56, `model_type: florence2`): `vision_config` with `embed_dim`,
//!   `num_heads`, `num_groups`, `depths`, `window_size`, `projection_dim`, `max_position_embeddings`,
//!   `max_temporal_embeddings`; a BART `text_config`; `image_token_id`.
//! - Microsoft's original (trust_remote_code; `io::Layout::of_config` says which): `vision_config` with `dim_embed`,
//!   `image_pos_embed.max_pos_embeddings`, `visual_temporal_embedding.max_temporal_embeddings`, and the
//!   projection size at the top level (`projection_dim`).
//!
//! Both parse into one [`Florence2Config`]; [`Florence2Config::layout`] says which one it came from.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::io::layout::Layout;
use crate::limits::product;
use crate::{Error, Result};

/// The DaViT vision tower and the multimodal projector.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub in_channels: usize,
    pub depths: Vec<usize>,
    pub patch_size: Vec<usize>,
    pub patch_stride: Vec<usize>,
    pub patch_padding: Vec<usize>,
    pub patch_prenorm: Vec<bool>,
    pub embed_dim: Vec<usize>,
    pub num_heads: Vec<usize>,
    pub num_groups: Vec<usize>,
    pub window_size: usize,
    pub mlp_ratio: f64,
    pub qkv_bias: bool,
    pub activation_function: String,
    pub projection_dim: usize,
    pub max_temporal_embeddings: usize,
    pub max_position_embeddings: usize,
}

impl VisionConfig {
    /// The feature-map size after each stage's patch embedding for a `height`×`width` image (PyTorch's
    /// convolution formula), or what makes the image unusable: an empty image, one smaller than a stage's
    /// kernel (where torch's convolution fails too), sizes that overflow.
    pub fn stage_sizes(
        &self,
        height: usize,
        width: usize,
    ) -> std::result::Result<Vec<(usize, usize)>, String> {
        if height == 0 || width == 0 {
            return Err(format!(
                "pixel_values holds an empty {height}x{width} image; resize images with the processor"
            ));
        }
        let mut size = (height, width);
        let mut sizes = Vec::with_capacity(self.embed_dim.len());
        for s in 0..self.embed_dim.len() {
            let (kernel, stride, padding) = (
                self.patch_size[s],
                self.patch_stride[s],
                self.patch_padding[s],
            );
            let side = |n: usize| -> std::result::Result<usize, String> {
                let padded = padding
                    .checked_mul(2)
                    .and_then(|p| p.checked_add(n))
                    .ok_or_else(|| {
                        format!("vision_config.patch_padding[{s}] = {padding} is too large")
                    })?;
                if padded < kernel {
                    return Err(format!(
                        "a {height}x{width} image is too small for the vision tower: stage {s} gets a {}x{} \
                         map, smaller than its {kernel}x{kernel} patch; use the image size of the checkpoint's \
                         preprocessor config",
                        size.0, size.1
                    ));
                }
                Ok((padded - kernel) / stride + 1)
            };
            size = (side(size.0)?, side(size.1)?);
            sizes.push(size);
        }
        Ok(sizes)
    }

    /// What the tower's largest intermediates need for `batch` images of `height`×`width` (a few f32 copies of
    /// a stage's tokens, its map padded to whole windows with q/k/v, one window's attention scores per thread),
    /// against [`crate::limits`]: window and patch sizes come from a checkpoint, image sizes from a caller.
    pub fn check_memory(&self, batch: usize, height: usize, width: usize) -> Result<()> {
        let sizes = self.stage_sizes(height, width).map_err(Error::invalid)?;
        let window = self.window_size as u128;
        let threads = rayon::current_num_threads() as u128;
        let mut largest = 0u128;
        for (&(h, w), &c) in sizes.iter().zip(&self.embed_dim) {
            let (h, w, c) = (h as u128, w as u128, c as u128);
            let padded = |n: u128| n.div_ceil(window).saturating_mul(window);
            let stage = [
                product(&[8, batch as u128, h, w, c, 4]),
                product(&[3, padded(h), padded(w), c, 4]),
                product(&[threads, window, window, window, window, 4]),
            ];
            largest = stage.into_iter().fold(largest, u128::max);
        }
        crate::limits::check_alloc(
            &format!(
                "the vision tower on {batch} image(s) of {height}x{width} with window_size {} and \
                 patch_padding {:?}",
                self.window_size, self.patch_padding
            ),
            largest,
        )
    }
}

/// The BART language model (transformers' `BartConfig` fields that change the computation). A setting
/// the text_config leaves out takes BartConfig's default (see [`TextConfig::defaults`]).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct TextConfig {
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "defaults::max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "defaults::d_model")]
    pub d_model: usize,
    #[serde(default = "defaults::layers")]
    pub encoder_layers: usize,
    #[serde(default = "defaults::layers")]
    pub decoder_layers: usize,
    #[serde(default = "defaults::heads")]
    pub encoder_attention_heads: usize,
    #[serde(default = "defaults::heads")]
    pub decoder_attention_heads: usize,
    #[serde(default = "defaults::ffn_dim")]
    pub encoder_ffn_dim: usize,
    #[serde(default = "defaults::ffn_dim")]
    pub decoder_ffn_dim: usize,
    #[serde(default = "defaults::activation")]
    pub activation_function: String,
    #[serde(default)]
    pub scale_embedding: bool,
    #[serde(default = "defaults::pad")]
    pub pad_token_id: u32,
    #[serde(default)]
    pub bos_token_id: u32,
    #[serde(default = "defaults::eos")]
    pub eos_token_id: u32,
    #[serde(default = "defaults::eos")]
    pub decoder_start_token_id: u32,
    /// Whether the LM head is the token embedding (transformers' default, true; Microsoft's configs leave it
    /// out). Decides the LM head of the original layout, whose files store a copy that the remote code
    /// replaces by the embedding at load.
    #[serde(default = "defaults::tie_word_embeddings")]
    pub tie_word_embeddings: bool,
    /// The whole text_config object, for the generation defaults it carries (num_beams ...).
    #[serde(skip)]
    pub raw: Value,
}

/// The whole model.
#[derive(Debug, Clone, PartialEq)]
pub struct Florence2Config {
    pub vision: VisionConfig,
    pub text: TextConfig,
    /// Id of the `<image>` placeholder token (HF-native layout only).
    pub image_token_id: Option<u32>,
    pub layout: Layout,
    /// `dtype` / `torch_dtype` from config.json ("float16", "float32", "bfloat16"), used by dtype="auto".
    pub dtype: Option<String>,
}

impl TextConfig {
    /// Every setting of a text_config that leaves them all out, by name: the defaults applied here,
    /// which the Python package reads (`TEXT_CONFIG_DEFAULTS`) rather than writing them again.
    pub fn defaults() -> Result<serde_json::Map<String, Value>> {
        let defaults: TextConfig = serde_json::from_value(Value::Object(serde_json::Map::new()))
            .map_err(|e| Error::invalid(format!("text_config defaults: {e}")))?;
        match serde_json::to_value(defaults) {
            Ok(Value::Object(settings)) => Ok(settings),
            other => Err(Error::invalid(format!(
                "text_config defaults are not an object: {other:?}"
            ))),
        }
    }
}

mod defaults {
    pub fn vocab_size() -> usize {
        50265
    }
    pub fn max_position_embeddings() -> usize {
        1024
    }
    pub fn d_model() -> usize {
        1024
    }
    pub fn layers() -> usize {
        12
    }
    pub fn heads() -> usize {
        16
    }
    pub fn ffn_dim() -> usize {
        4096
    }
    pub fn activation() -> String {
        "gelu".into()
    }
    pub fn pad() -> u32 {
        1
    }
    pub fn tie_word_embeddings() -> bool {
        true
    }
    pub fn eos() -> u32 {
        2
    }
}

impl Florence2Config {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                Error::NotFound {
                    path: path.to_path_buf(),
                    hint: "A Florence-2 checkpoint folder needs a config.json beside its weights."
                        .into(),
                }
            } else {
                Error::Io {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        Self::from_json_str(&text).map_err(|msg| Error::Config {
            path: path.to_path_buf(),
            msg,
        })
    }

    /// Parses a config.json document of either layout.
    pub fn from_json_str(json: &str) -> std::result::Result<Self, String> {
        let root: Value = serde_json::from_str(json).map_err(|e| format!("not valid JSON: {e}"))?;
        let obj = root
            .as_object()
            .ok_or("the top level must be a JSON object")?;
        let vision_raw = obj.get("vision_config").ok_or("missing `vision_config`")?;
        let text_raw = obj.get("text_config").ok_or("missing `text_config`")?;

        let layout = Layout::of_config(&root);
        let vision = match layout {
            Layout::Original => parse_original_vision(vision_raw, obj.get("projection_dim"))?,
            Layout::HfNative => parse_hf_vision(vision_raw)?,
        };
        let mut text: TextConfig =
            serde_json::from_value(text_raw.clone()).map_err(|e| format!("text_config: {e}"))?;
        text.raw = text_raw.clone();
        // Microsoft's config repeats vocab_size at the top level; the text config's is authoritative.
        let image_token_id = match layout {
            Layout::HfNative => Some(
                obj.get("image_token_id")
                    .map(|v| as_u32(v, "image_token_id"))
                    .transpose()?
                    .unwrap_or(51289),
            ),
            Layout::Original => None,
        };
        let dtype = obj
            .get("dtype")
            .or_else(|| obj.get("torch_dtype"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let cfg = Florence2Config {
            vision,
            text,
            image_token_id,
            layout,
            dtype,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the relations the model code relies on, so that a bad config is an error, not a panic.
    fn validate(&self) -> std::result::Result<(), String> {
        let v = &self.vision;
        let stages = v.embed_dim.len();
        if stages == 0 {
            return Err("vision_config: embed_dim is empty".into());
        }
        for (name, len) in [
            ("depths", v.depths.len()),
            ("num_heads", v.num_heads.len()),
            ("num_groups", v.num_groups.len()),
            ("patch_size", v.patch_size.len()),
            ("patch_stride", v.patch_stride.len()),
            ("patch_padding", v.patch_padding.len()),
            ("patch_prenorm", v.patch_prenorm.len()),
        ] {
            if len != stages {
                return Err(format!(
                    "vision_config: {name} has {len} entries, embed_dim has {stages}"
                ));
            }
        }
        for s in 0..stages {
            let dim = v.embed_dim[s];
            if v.num_heads[s] == 0 || !dim.is_multiple_of(v.num_heads[s]) {
                return Err(format!(
                    "vision_config: stage {s}: embed_dim {dim} is not divisible by num_heads {}",
                    v.num_heads[s]
                ));
            }
            if v.num_groups[s] == 0 || !dim.is_multiple_of(v.num_groups[s]) {
                return Err(format!(
                    "vision_config: stage {s}: embed_dim {dim} is not divisible by num_groups {}",
                    v.num_groups[s]
                ));
            }
            if v.patch_size[s] == 0 || v.patch_stride[s] == 0 {
                return Err(format!(
                    "vision_config: stage {s}: patch_size and patch_stride must be positive"
                ));
            }
        }
        if v.window_size == 0 {
            return Err("vision_config: window_size must be positive".into());
        }
        if !v.embed_dim[stages - 1].is_multiple_of(2) {
            return Err(
                "vision_config: the last embed_dim must be even (cosine temporal embedding)".into(),
            );
        }
        let t = &self.text;
        for (name, dim, heads) in [
            (
                "encoder_attention_heads",
                t.d_model,
                t.encoder_attention_heads,
            ),
            (
                "decoder_attention_heads",
                t.d_model,
                t.decoder_attention_heads,
            ),
        ] {
            if heads == 0 || dim % heads != 0 {
                return Err(format!(
                    "text_config: d_model {dim} is not divisible by {name} {heads}"
                ));
            }
        }
        if v.projection_dim != t.d_model {
            return Err(format!(
                "projection_dim {} must equal text_config.d_model {} (image features enter the text encoder)",
                v.projection_dim, t.d_model
            ));
        }
        Ok(())
    }

    /// Rows of the token embedding and LM head, as stored in the weights.
    pub fn vocab_size(&self) -> usize {
        self.text.vocab_size
    }
}

/// The vision fields both layouts share, under the key names of the HF-native config; `in_key` and
/// `dim_key` are the two names Microsoft's DaViT config spells differently (`in_chans`, `dim_embed`).
fn parse_vision_fields(
    raw: &Value,
    in_key: &str,
    dim_key: &str,
) -> std::result::Result<VisionConfig, String> {
    let get = |k: &str| raw.get(k);
    Ok(VisionConfig {
        in_channels: usize_or(get(in_key), 3, in_key)?,
        depths: usize_list_or(get("depths"), &[1, 1, 9, 1], "depths")?,
        patch_size: usize_list_or(get("patch_size"), &[7, 3, 3, 3], "patch_size")?,
        patch_stride: usize_list_or(get("patch_stride"), &[4, 2, 2, 2], "patch_stride")?,
        patch_padding: usize_list_or(get("patch_padding"), &[3, 1, 1, 1], "patch_padding")?,
        patch_prenorm: bool_list_or(
            get("patch_prenorm"),
            &[false, true, true, true],
            "patch_prenorm",
        )?,
        embed_dim: usize_list_or(get(dim_key), &[128, 256, 512, 1024], dim_key)?,
        num_heads: usize_list_or(get("num_heads"), &[4, 8, 16, 32], "num_heads")?,
        num_groups: usize_list_or(get("num_groups"), &[4, 8, 16, 32], "num_groups")?,
        window_size: usize_or(get("window_size"), 12, "window_size")?,
        mlp_ratio: f64_or(get("mlp_ratio"), 4.0, "mlp_ratio")?,
        qkv_bias: bool_or(get("qkv_bias"), true, "qkv_bias")?,
        activation_function: str_or(get("activation_function"), "gelu"),
        projection_dim: usize_or(get("projection_dim"), 1024, "projection_dim")?,
        max_temporal_embeddings: usize_or(
            get("max_temporal_embeddings"),
            100,
            "max_temporal_embeddings",
        )?,
        max_position_embeddings: usize_or(
            get("max_position_embeddings"),
            50,
            "max_position_embeddings",
        )?,
    })
}

fn parse_hf_vision(raw: &Value) -> std::result::Result<VisionConfig, String> {
    parse_vision_fields(raw, "in_channels", "embed_dim")
}

/// Microsoft's DaViT config: other names for the same sizes, the projection size at the top level.
fn parse_original_vision(
    raw: &Value,
    top_projection: Option<&Value>,
) -> std::result::Result<VisionConfig, String> {
    let get = |k: &str| raw.get(k);
    let projection_dim = match (get("projection_dim"), top_projection) {
        (_, Some(p)) => as_usize(p, "projection_dim")?,
        (Some(p), None) => as_usize(p, "vision_config.projection_dim")?,
        (None, None) => return Err("missing projection_dim".into()),
    };
    let pos = get("image_pos_embed");
    if let Some(kind) = pos.and_then(|p| p.get("type")).and_then(Value::as_str) {
        if kind != "learned_abs_2d" {
            return Err(format!(
                "image_pos_embed.type {kind:?} is not supported (only learned_abs_2d)"
            ));
        }
    }
    let temporal = get("visual_temporal_embedding");
    if let Some(kind) = temporal.and_then(|p| p.get("type")).and_then(Value::as_str) {
        if kind != "COSINE" {
            return Err(format!(
                "visual_temporal_embedding.type {kind:?} is not supported (only COSINE)"
            ));
        }
    }
    if let Some(src) = get("image_feature_source").and_then(Value::as_array) {
        let names: Vec<&str> = src.iter().filter_map(Value::as_str).collect();
        if names != ["spatial_avg_pool", "temporal_avg_pool"] {
            return Err(format!(
                "image_feature_source {names:?} is not supported (only [\"spatial_avg_pool\", \"temporal_avg_pool\"])"
            ));
        }
    }
    Ok(VisionConfig {
        // DaViT's activation is fixed (GELU) in Microsoft's code, whatever the config says.
        activation_function: "gelu".into(),
        projection_dim,
        max_temporal_embeddings: usize_or(
            temporal.and_then(|t| t.get("max_temporal_embeddings")),
            100,
            "visual_temporal_embedding.max_temporal_embeddings",
        )?,
        max_position_embeddings: usize_or(
            pos.and_then(|p| p.get("max_pos_embeddings")),
            50,
            "image_pos_embed.max_pos_embeddings",
        )?,
        ..parse_vision_fields(raw, "in_chans", "dim_embed")?
    })
}

fn as_usize(v: &Value, name: &str) -> std::result::Result<usize, String> {
    v.as_u64()
        .map(|x| x as usize)
        .ok_or_else(|| format!("{name} must be a non-negative integer, got {v}"))
}

fn as_u32(v: &Value, name: &str) -> std::result::Result<u32, String> {
    v.as_u64()
        .and_then(|x| u32::try_from(x).ok())
        .ok_or_else(|| format!("{name} must be a non-negative integer, got {v}"))
}

fn usize_or(v: Option<&Value>, default: usize, name: &str) -> std::result::Result<usize, String> {
    v.filter(|v| !v.is_null())
        .map_or(Ok(default), |v| as_usize(v, name))
}

fn f64_or(v: Option<&Value>, default: f64, name: &str) -> std::result::Result<f64, String> {
    v.filter(|v| !v.is_null()).map_or(Ok(default), |v| {
        v.as_f64()
            .ok_or_else(|| format!("{name} must be a number, got {v}"))
    })
}

fn bool_or(v: Option<&Value>, default: bool, name: &str) -> std::result::Result<bool, String> {
    v.filter(|v| !v.is_null()).map_or(Ok(default), |v| {
        v.as_bool()
            .ok_or_else(|| format!("{name} must be true or false, got {v}"))
    })
}

fn str_or(v: Option<&Value>, default: &str) -> String {
    v.and_then(Value::as_str).unwrap_or(default).to_owned()
}

fn usize_list_or(
    v: Option<&Value>,
    default: &[usize],
    name: &str,
) -> std::result::Result<Vec<usize>, String> {
    match v.filter(|v| !v.is_null()) {
        None => Ok(default.to_vec()),
        Some(Value::Array(items)) => items.iter().map(|x| as_usize(x, name)).collect(),
        Some(other) => Err(format!("{name} must be a list of integers, got {other}")),
    }
}

fn bool_list_or(
    v: Option<&Value>,
    default: &[bool],
    name: &str,
) -> std::result::Result<Vec<bool>, String> {
    match v.filter(|v| !v.is_null()) {
        None => Ok(default.to_vec()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|x| {
                x.as_bool()
                    .ok_or_else(|| format!("{name} must be a list of booleans, got {x}"))
            })
            .collect(),
        Some(other) => Err(format!("{name} must be a list of booleans, got {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RELEASE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/release");

    #[test]
    fn reads_microsoft_base_config() {
        let path = Path::new(RELEASE).join("microsoft_Florence-2-base/config.json");
        let cfg = Florence2Config::from_file(&path).unwrap();
        assert_eq!(cfg.layout, Layout::Original);
        assert_eq!(cfg.vision.embed_dim, vec![128, 256, 512, 1024]);
        assert_eq!(cfg.vision.projection_dim, 768);
        assert_eq!(cfg.vision.max_position_embeddings, 50);
        assert_eq!(cfg.vision.max_temporal_embeddings, 100);
        assert_eq!(cfg.text.vocab_size, 51289);
        assert_eq!(cfg.text.d_model, 768);
        assert_eq!(cfg.image_token_id, None);
        assert_eq!(cfg.dtype.as_deref(), Some("float16"));
    }

    proptest::proptest! {
        /// Any values in the vision fields a checkpoint controls parse to a config or an error, and a parsed
        /// config's geometry and memory checks answer for any image size: never a panic or an overflow.
        #[test]
        fn vision_settings_never_panic(
            window in proptest::prop_oneof![0u64..40, proptest::num::u64::ANY],
            padding in proptest::collection::vec(proptest::prop_oneof![0u64..8, proptest::num::u64::ANY], 1..4),
            kernel in 0u64..12,
            stride in 0u64..6,
            height in proptest::prop_oneof![0usize..2000, proptest::num::usize::ANY],
            width in 0usize..2000,
        ) {
            let stages = padding.len();
            let json = serde_json::json!({
                "vision_config": {
                    "embed_dim": vec![8; stages], "num_heads": vec![2; stages], "num_groups": vec![2; stages],
                    "depths": vec![1; stages], "patch_size": vec![kernel; stages],
                    "patch_stride": vec![stride; stages], "patch_padding": padding,
                    "patch_prenorm": vec![false; stages], "window_size": window, "projection_dim": 8,
                },
                "text_config": {"d_model": 8, "encoder_attention_heads": 2, "decoder_attention_heads": 2},
            });
            if let Ok(cfg) = Florence2Config::from_json_str(&json.to_string()) {
                let _ = cfg.vision.stage_sizes(height, width);
                let _ = cfg.vision.check_memory(1, height, width);
            }
        }
    }

    #[test]
    fn reads_hf_native_defaults() {
        let cfg = Florence2Config::from_json_str(
            r#"{"model_type":"florence2","vision_config":{"projection_dim":1024},"text_config":{"d_model":1024}}"#,
        )
        .unwrap();
        assert_eq!(cfg.layout, Layout::HfNative);
        assert_eq!(cfg.image_token_id, Some(51289));
        assert_eq!(cfg.vision.window_size, 12);
    }

    #[test]
    fn rejects_inconsistent_configs() {
        let bad = [
            r#"[]"#,
            r#"{"vision_config":{}}"#,
            r#"{"vision_config":{"projection_dim":64,"embed_dim":[8,16]},"text_config":{"d_model":64}}"#,
            r#"{"vision_config":{"projection_dim":64,"num_heads":[3,8,16,32]},"text_config":{"d_model":64}}"#,
            r#"{"vision_config":{"projection_dim":64},"text_config":{"d_model":64,"encoder_attention_heads":5}}"#,
            r#"{"vision_config":{"projection_dim":64,"depths":"x"},"text_config":{"d_model":64}}"#,
            r#"{"vision_config":{"projection_dim":32},"text_config":{"d_model":64}}"#,
        ];
        for json in bad {
            assert!(
                Florence2Config::from_json_str(json).is_err(),
                "accepted {json}"
            );
        }
    }
}
