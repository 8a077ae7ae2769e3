//! Which files hold a checkpoint's weights: the names of the safetensors weights file and its shard index, the
//! shard files an index lists (each kept inside the checkpoint's folder), and PyTorch weights in shards.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use super::pytorch::{PYTORCH_WEIGHTS, PYTORCH_WEIGHTS_INDEX};
use crate::{Error, Result};

/// The weights file of a checkpoint folder.
pub const WEIGHTS: &str = "model.safetensors";
/// The index of a checkpoint's sharded weights, which lists the shard files.
pub const WEIGHTS_INDEX: &str = "model.safetensors.index.json";

/// The shard files a shard index (`model.safetensors.index.json`, `pytorch_model.bin.index.json`) lists in
/// its `weight_map`, each once, in order.
pub fn shard_names(index: &Path) -> Result<Vec<String>> {
    Ok(distinct_shards(&weight_map(index)?))
}

/// The shard files of a `weight_map`'s pairs, each once, in order.
fn distinct_shards(weight_map: &[(String, String)]) -> Vec<String> {
    let mut shards: Vec<String> = Vec::new();
    for (_, shard) in weight_map {
        if !shards.contains(shard) {
            shards.push(shard.clone());
        }
    }
    shards
}

/// The `weight_map` of a shard index: (tensor name, shard file) pairs, each file name checked to lie inside
/// the index's folder: relative, of plain components, so that `..`, absolute paths and Windows prefixes are
/// refused. A shard that is a symlink is followed, as the Hub cache's snapshot files are symlinks to its
/// blobs.
fn weight_map(index: &Path) -> Result<Vec<(String, String)>> {
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
    let mut pairs = Vec::with_capacity(map.len());
    for (name, value) in map {
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
        pairs.push((name.clone(), shard.to_string()));
    }
    if pairs.is_empty() {
        return Err(bad("\"weight_map\" lists no shard".to_string()));
    }
    Ok(pairs)
}

/// The shard index of `dir`: `model.safetensors.index.json`, else `pytorch_model.bin.index.json`; `None`
/// without either.
pub fn weights_index(dir: &Path) -> Option<PathBuf> {
    [WEIGHTS_INDEX, PYTORCH_WEIGHTS_INDEX]
        .into_iter()
        .map(|name| dir.join(name))
        .find(|index| index.is_file())
}

/// The PyTorch weights of `dir`: `pytorch_model.bin`, else `pytorch_model.bin.index.json`; `None` without
/// either.
pub(super) fn pytorch_weights(dir: &Path) -> Option<PathBuf> {
    [PYTORCH_WEIGHTS, PYTORCH_WEIGHTS_INDEX]
        .into_iter()
        .map(|name| dir.join(name))
        .find(|path| path.is_file())
}

/// Every tensor of the PyTorch shards `index` lists, each checked as a single archive is: every tensor is in
/// exactly one shard, the one the index names for it.
pub(super) fn read_pytorch_shards(index: &Path) -> Result<HashMap<String, Tensor>> {
    let bad = |msg: String| Error::Weights {
        path: index.to_path_buf(),
        msg,
    };
    let weight_map = weight_map(index)?;
    let shards = distinct_shards(&weight_map);
    let paths = shard_paths(index, &shards)?;
    let mut tensors = HashMap::new();
    let mut shard_of: HashMap<String, String> = HashMap::new();
    for (shard, path) in shards.into_iter().zip(paths) {
        for (name, tensor) in super::pytorch::read_state_dict(&path)? {
            if let Some(first) = shard_of.insert(name.clone(), shard.clone()) {
                return Err(bad(format!(
                    "tensor `{name}` is stored in two shards ({first} and {shard}); the checkpoint is corrupt"
                )));
            }
            tensors.insert(name, tensor);
        }
    }
    for (name, shard) in weight_map {
        if shard_of.get(&name) != Some(&shard) {
            return Err(bad(format!(
                "the index lists tensor `{name}` in {shard}, which does not hold it; the checkpoint is corrupt"
            )));
        }
    }
    Ok(tensors)
}

/// The shard paths of a sharded checkpoint, each checked to exist.
pub(super) fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    shard_paths(index, &shard_names(index)?)
}

/// The paths of the shard files `names` of the index `index`, each checked to exist.
fn shard_paths(index: &Path, names: &[String]) -> Result<Vec<PathBuf>> {
    let dir = index.parent().unwrap_or(Path::new("."));
    names
        .iter()
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
