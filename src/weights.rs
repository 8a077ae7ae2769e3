//! Checkpoint weights: safetensors files (memory-mapped, single or sharded), the layout they follow, and a
//! candle `VarBuilder` that serves them under HF-native names whatever the layout.
//!
//! The model code asks for every tensor by its HF-native name (`model.vision_tower.convs.0.conv.weight`).
//! For Microsoft's original layout [`Checkpoint`] maps that name to the stored one
//! (`vision_tower.convs.0.proj.weight`) and transposes the one tensor stored the other way round
//! (`image_projection`). The HF-native layout ties `lm_head.weight` to the shared embedding and may not store
//! it; that fallback is here too, so the model code has one path.

use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use crate::config::Layout;
use crate::{Error, Result};

/// Name of the LM head bias that only Microsoft's layout has (BART's `final_logits_bias`).
pub const FINAL_LOGITS_BIAS: &str = "final_logits_bias";

/// Memory-mapped weights of one checkpoint.
pub struct Checkpoint {
    tensors: MmapedSafetensors,
    layout: Layout,
    /// What to name in error messages: the file, or the folder for sharded checkpoints.
    source: PathBuf,
}

impl Checkpoint {
    /// Opens the weights in `dir`: `model.safetensors`, or the shards listed in
    /// `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let (files, source) = if single.is_file() {
            (vec![single.clone()], single)
        } else if index.is_file() {
            (shard_files(&index)?, index)
        } else {
            let hint = if dir.join("pytorch_model.bin").exists() {
                "Only safetensors weights are supported; this folder has pytorch_model.bin. Convert it with \
                 `safetensors.torch.save_file(torch.load(...), \"model.safetensors\")` or download model.safetensors."
            } else {
                "Expected model.safetensors or model.safetensors.index.json in the checkpoint folder."
            };
            return Err(Error::NotFound {
                path: single,
                hint: hint.into(),
            });
        };
        // SAFETY: the files are mapped read-only; like transformers and candle we assume nobody truncates
        // them while the model is alive.
        let tensors = unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| Error::Weights {
            path: source.clone(),
            msg: format!("cannot read safetensors ({e}); the file may be truncated or corrupt, download it again"),
        })?;
        let layout = detect_layout(&tensors).ok_or_else(|| Error::Weights {
            path: source.clone(),
            msg: "no Florence-2 weights found (expected `model.vision_tower.*` or `vision_tower.*` keys)".into(),
        })?;
        Ok(Checkpoint {
            tensors,
            layout,
            source,
        })
    }

    /// The layout the stored key names follow.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The file (or shard index) the weights came from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The floating dtype of the stored weights (the first floating tensor's), used by `dtype="auto"`.
    pub fn stored_dtype(&self) -> Option<DType> {
        let mut names: Vec<_> = self.tensors.tensors().into_iter().collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        names.into_iter().find_map(|(_, view)| match view.dtype() {
            safetensors::Dtype::F32 => Some(DType::F32),
            safetensors::Dtype::F16 => Some(DType::F16),
            safetensors::Dtype::BF16 => Some(DType::BF16),
            safetensors::Dtype::F64 => Some(DType::F64),
            _ => None,
        })
    }

    /// A `VarBuilder` over these weights that answers HF-native names, converting to `dtype` on `device`.
    pub fn var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    /// The stored name of an HF-native tensor name, in this checkpoint's layout.
    fn stored_name(&self, hf_name: &str) -> String {
        match self.layout {
            Layout::HfNative => hf_name.to_owned(),
            Layout::Original => original_name(hf_name),
        }
    }

    fn load(&self, hf_name: &str, device: &Device) -> candle_core::Result<Tensor> {
        if self.layout == Layout::HfNative
            && hf_name == "lm_head.weight"
            && self.tensors.get(hf_name).is_err()
        {
            // Tied to the shared embedding and not saved (transformers drops tied copies).
            return self.load("model.language_model.shared.weight", device);
        }
        let stored = self.stored_name(hf_name);
        let tensor = self.tensors.load(&stored, device).map_err(|_| {
            candle_core::Error::Msg(format!(
                "{}: missing tensor `{stored}`; the weights do not match this Florence-2 config",
                self.source.display()
            ))
        })?;
        if self.layout == Layout::Original && stored == "image_projection" {
            // Microsoft stores the projection as [vision_dim, projection_dim] and multiplies `x @ W`.
            return tensor.t()?.contiguous();
        }
        Ok(tensor)
    }
}

impl SimpleBackend for Checkpoint {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.load(name, dev)?;
        if tensor.shape() != &shape {
            candle_core::bail!(
                "{}: tensor `{}` has shape {:?}, the config implies {:?}; the config.json does not fit these weights",
                self.source.display(),
                self.stored_name(name),
                tensor.dims(),
                shape.dims()
            );
        }
        tensor.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        (self.layout == Layout::HfNative && name == "lm_head.weight")
            || self.tensors.get(&self.stored_name(name)).is_ok()
    }
}

fn detect_layout(tensors: &MmapedSafetensors) -> Option<Layout> {
    let names = tensors.tensors();
    if names
        .iter()
        .any(|(n, _)| n.starts_with("model.vision_tower."))
    {
        Some(Layout::HfNative)
    } else if names.iter().any(|(n, _)| n.starts_with("vision_tower.")) {
        Some(Layout::Original)
    } else {
        None
    }
}

/// The shard files `model.safetensors.index.json` lists in its `weight_map`, each once, in order.
pub fn shard_names(index: &Path) -> Result<Vec<String>> {
    let bad = |msg: String| Error::Weights {
        path: index.to_path_buf(),
        msg,
    };
    let text = std::fs::read_to_string(index).map_err(|source| Error::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no \"weight_map\" object".to_string()))?;
    let mut shards: Vec<String> = Vec::new();
    for value in map.values() {
        let shard = value
            .as_str()
            .ok_or_else(|| bad(format!("weight_map value {value} is not a file name")))?;
        // The names come from the repository and become paths in the cache: keep them inside the snapshot.
        let plain = Path::new(shard)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if shard.is_empty() || !plain {
            return Err(bad(format!(
                "shard name {shard:?} is not a file name inside the repository"
            )));
        }
        if !shards.iter().any(|s| s == shard) {
            shards.push(shard.to_string());
        }
    }
    if shards.is_empty() {
        return Err(bad("\"weight_map\" lists no shard".to_string()));
    }
    Ok(shards)
}

/// The shard paths of a sharded checkpoint, each checked to exist.
fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let dir = index.parent().unwrap_or(Path::new("."));
    shard_names(index)?
        .into_iter()
        .map(|name| {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(Error::NotFound {
                    path,
                    hint: format!("listed as a shard in {}", index.display()),
                })
            }
        })
        .collect()
}

/// Maps an HF-native tensor name to Microsoft's original one (the inverse of transformers'
/// `convert_florence2_original_pytorch_to_hf.py` renames).
pub fn original_name(hf: &str) -> String {
    if let Some(rest) = hf.strip_prefix("model.vision_tower.") {
        // Order matters: the norm renames produce `window_attn.norm.`, which no later rule touches.
        const RULES: [(&str, &str); 12] = [
            (".conv.", ".proj."),
            ("_block.conv1.", "_block.conv1.fn.dw."),
            ("_block.conv2.", "_block.conv2.fn.dw."),
            ("spatial_block.norm1.", "spatial_block.window_attn.norm."),
            ("window_attn.qkv.", "window_attn.fn.qkv."),
            ("window_attn.proj.", "window_attn.fn.proj."),
            ("channel_block.norm1.", "channel_block.channel_attn.norm."),
            ("channel_attn.qkv.", "channel_attn.fn.qkv."),
            ("channel_attn.proj.", "channel_attn.fn.proj."),
            ("_block.norm2.", "_block.ffn.norm."),
            ("ffn.fc1.", "ffn.fn.net.fc1."),
            ("ffn.fc2.", "ffn.fn.net.fc2."),
        ];
        let mut name = format!("vision_tower.{rest}");
        for (from, to) in RULES {
            name = name.replace(from, to);
        }
        return name;
    }
    if let Some(rest) = hf.strip_prefix("model.multi_modal_projector.") {
        return match rest {
            "image_projection.weight" => "image_projection".into(),
            _ => rest.replace("image_position_embed.", "image_pos_embed."),
        };
    }
    if let Some(rest) = hf.strip_prefix("model.language_model.") {
        return format!("language_model.model.{rest}");
    }
    match hf {
        "lm_head.weight" => "language_model.lm_head.weight".into(),
        FINAL_LOGITS_BIAS => "language_model.final_logits_bias".into(),
        other => other.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::original_name;

    #[test]
    fn renames_match_the_release_key_list() {
        // Pairs from ../shared/florence2-release-files/keys/Florence-2-large_hf_native_keys_DERIVED.txt.
        let pairs = [
            (
                "model.vision_tower.convs.0.conv.weight",
                "vision_tower.convs.0.proj.weight",
            ),
            (
                "model.vision_tower.convs.3.norm.bias",
                "vision_tower.convs.3.norm.bias",
            ),
            (
                "model.vision_tower.blocks.0.0.spatial_block.conv1.weight",
                "vision_tower.blocks.0.0.spatial_block.conv1.fn.dw.weight",
            ),
            (
                "model.vision_tower.blocks.2.7.spatial_block.norm1.bias",
                "vision_tower.blocks.2.7.spatial_block.window_attn.norm.bias",
            ),
            (
                "model.vision_tower.blocks.0.0.spatial_block.window_attn.qkv.weight",
                "vision_tower.blocks.0.0.spatial_block.window_attn.fn.qkv.weight",
            ),
            (
                "model.vision_tower.blocks.0.0.spatial_block.norm2.weight",
                "vision_tower.blocks.0.0.spatial_block.ffn.norm.weight",
            ),
            (
                "model.vision_tower.blocks.0.0.spatial_block.ffn.fc2.bias",
                "vision_tower.blocks.0.0.spatial_block.ffn.fn.net.fc2.bias",
            ),
            (
                "model.vision_tower.blocks.1.0.channel_block.conv2.bias",
                "vision_tower.blocks.1.0.channel_block.conv2.fn.dw.bias",
            ),
            (
                "model.vision_tower.blocks.1.0.channel_block.norm1.weight",
                "vision_tower.blocks.1.0.channel_block.channel_attn.norm.weight",
            ),
            (
                "model.vision_tower.blocks.1.0.channel_block.channel_attn.proj.weight",
                "vision_tower.blocks.1.0.channel_block.channel_attn.fn.proj.weight",
            ),
            (
                "model.multi_modal_projector.image_projection.weight",
                "image_projection",
            ),
            (
                "model.multi_modal_projector.image_position_embed.row_embeddings.weight",
                "image_pos_embed.row_embeddings.weight",
            ),
            (
                "model.multi_modal_projector.visual_temporal_embed.pos_idx_to_embed",
                "visual_temporal_embed.pos_idx_to_embed",
            ),
            (
                "model.multi_modal_projector.image_proj_norm.weight",
                "image_proj_norm.weight",
            ),
            (
                "model.language_model.decoder.layers.0.encoder_attn.k_proj.weight",
                "language_model.model.decoder.layers.0.encoder_attn.k_proj.weight",
            ),
            ("lm_head.weight", "language_model.lm_head.weight"),
        ];
        for (hf, orig) in pairs {
            assert_eq!(original_name(hf), orig, "{hf}");
        }
    }
}
