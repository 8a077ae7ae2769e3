//! Checkpoint weights: safetensors files (single or sharded) or, in folders without them, a PyTorch
//! `pytorch_model.bin` ([`super::pytorch`]); the layout they follow; and a candle `VarBuilder` that serves them
//! under HF-native names whatever the layout.
//!
//! The model code asks for every tensor by its HF-native name (`model.vision_tower.convs.0.conv.weight`).
//! For Microsoft's original layout [`Checkpoint`] maps that name to the stored one
//! (`vision_tower.convs.0.proj.weight`) and transposes the one tensor stored the other way round
//! (`image_projection`). A tied LM head that the HF-native layout does not store is not served here: the
//! model shares its embedding tensor instead of reading it twice (`Checkpoint::stores` tells it).
//!
//! The files are not memory-mapped: each tensor is read (`pread`) straight into the buffer that becomes its
//! storage. A mapping would copy every tensor out of the page cache anyway, and the mapped pages count in the
//! process's RSS until the file is closed, so peak memory would be twice the weights.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Shape, Tensor, WithDType};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use rayon::prelude::*;
use safetensors::tensor::{Metadata, TensorInfo, TensorView};
use safetensors::{Dtype, SafeTensorError};

use super::adapter::Adapter;
use super::layout::Layout;
use super::pytorch::{PYTORCH_WEIGHTS, PYTORCH_WEIGHTS_INDEX};
use crate::{Error, Result};

/// The weights file of a checkpoint folder.
pub const WEIGHTS: &str = "model.safetensors";
/// The index of a checkpoint's sharded weights, which lists the shard files.
pub const WEIGHTS_INDEX: &str = "model.safetensors.index.json";

/// Name of the LM head bias that only Microsoft's layout has (BART's `final_logits_bias`).
pub const FINAL_LOGITS_BIAS: &str = "final_logits_bias";

/// One open safetensors file and its parsed header.
struct Shard {
    path: PathBuf,
    file: File,
    /// File offset of the data section (the header's `data_offsets` count from here).
    data_start: u64,
    metadata: Metadata,
}

impl Shard {
    /// Opens `path` and validates its header against the file size, so that a truncated file fails here
    /// and not halfway through loading.
    fn open(path: &Path) -> std::result::Result<Self, String> {
        let mut file = File::open(path).map_err(|e| e.to_string())?;
        let file_len = file.metadata().map_err(|e| e.to_string())?.len();
        let mut len = [0u8; 8];
        file.read_exact(&mut len)
            .map_err(|_| SafeTensorError::HeaderTooSmall.to_string())?;
        let header_len = u64::from_le_bytes(len);
        // The same limit as `SafeTensors::read_metadata`; it also keeps a garbage length from allocating.
        if header_len > 100_000_000 || 8 + header_len > file_len {
            return Err(SafeTensorError::InvalidHeaderLength.to_string());
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header).map_err(|e| e.to_string())?;
        let header = std::str::from_utf8(&header)
            .map_err(|e| SafeTensorError::InvalidHeader(e).to_string())?;
        // `Metadata`'s deserializer checks that the offsets are contiguous and fit each dtype and shape.
        let metadata: Metadata = serde_json::from_str(header)
            .map_err(|e| SafeTensorError::InvalidHeaderDeserialization(e).to_string())?;
        // Checked: the sizes in the header are untrusted.
        let end = (metadata.data_len() as u64).checked_add(8 + header_len);
        if end != Some(file_len) {
            return Err(SafeTensorError::MetadataIncompleteBuffer.to_string());
        }
        Ok(Shard {
            path: path.to_path_buf(),
            file,
            data_start: 8 + header_len,
            metadata,
        })
    }

    /// Reads tensor `info` into a new tensor on `device`, in its stored dtype.
    fn read(&self, info: &TensorInfo, device: &Device) -> candle_core::Result<Tensor> {
        match info.dtype {
            // The weight dtypes are read straight into the tensor's own storage.
            Dtype::F32 => self.read_typed::<f32>(info, device),
            Dtype::F16 => self.read_typed::<half::f16>(info, device),
            Dtype::BF16 => self.read_typed::<half::bf16>(info, device),
            Dtype::F64 => self.read_typed::<f64>(info, device),
            // Anything else (rare and small) goes through candle's conversion, which knows every dtype it
            // supports and rejects the others.
            dtype => {
                let mut bytes = vec![0u8; byte_len(info)?];
                self.read_at(&mut bytes, info)?;
                TensorView::new(dtype, info.shape.clone(), &bytes)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?
                    .load(device)
            }
        }
    }

    fn read_typed<T: WithDType + bytemuck::Pod>(
        &self,
        info: &TensorInfo,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        // `Metadata` checked at open that the byte range holds exactly shape × dtype bytes and lies in the
        // file, so the buffer is sized from the range: no larger than the file.
        let count = byte_len(info)? / std::mem::size_of::<T>();
        let mut data = vec![T::zeroed(); count];
        self.read_at(bytemuck::cast_slice_mut(&mut data), info)?;
        // safetensors stores little-endian, the byte order of every platform candle runs on.
        Tensor::from_vec(data, info.shape.as_slice(), device)
    }

    fn read_at(&self, buf: &mut [u8], info: &TensorInfo) -> candle_core::Result<()> {
        let offset = u64::try_from(info.data_offsets.0)
            .ok()
            .and_then(|start| self.data_start.checked_add(start))
            .ok_or_else(|| self.corrupt("a tensor offset past the end of any file"))?;
        read_exact_at(&self.file, buf, offset)
            .map_err(|e| self.corrupt(&format!("cannot read ({e})")))
    }

    fn corrupt(&self, what: &str) -> candle_core::Error {
        candle_core::Error::Msg(format!(
            "{}: {what}; the file may be truncated or corrupt, download it again",
            self.path.display()
        ))
    }
}

/// The byte length of a tensor's data (`data_offsets` end - start; `Metadata` checked the order at open).
fn byte_len(info: &TensorInfo) -> candle_core::Result<usize> {
    let (start, end) = info.data_offsets;
    end.checked_sub(start).ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "data_offsets [{start}, {end}] end before they start"
        ))
    })
}

/// Whether `read_exact_at` leaves the file cursor alone, so that threads may read one file at once.
const POSITIONAL_READS: bool = cfg!(any(unix, windows));

#[cfg(unix)]
pub(super) fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
pub(super) fn read_exact_at(
    file: &File,
    mut buf: &mut [u8],
    mut offset: u64,
) -> std::io::Result<()> {
    use std::io::ErrorKind;
    while !buf.is_empty() {
        match std::os::windows::fs::FileExt::seek_read(file, buf, offset) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(not(any(unix, windows)))]
pub(super) fn read_exact_at(mut file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    // Moves the shared cursor: `POSITIONAL_READS` is false, so tensors are read one at a time.
    use std::io::Seek;
    file.seek(std::io::SeekFrom::Start(offset))?;
    file.read_exact(buf)
}

/// Where a checkpoint's tensors are.
enum Stored {
    /// safetensors files, read a tensor at a time into the tensor's own buffer.
    Safetensors {
        shards: Vec<Shard>,
        /// Which shard stores each tensor.
        routing: HashMap<String, usize>,
    },
    /// A PyTorch archive, read whole at open (its storages are not laid out to be read in place), on the CPU
    /// in the stored dtypes.
    Pytorch(HashMap<String, Tensor>),
}

/// The weights of one checkpoint.
pub struct Checkpoint {
    stored: Stored,
    layout: Layout,
    /// What to name in error messages: the file, or the folder for sharded checkpoints.
    source: PathBuf,
    /// Tensors read ahead in parallel (stored names), each taken out by the first `load` that asks for it.
    prefetched: Mutex<HashMap<String, Tensor>>,
    /// A LoRA adapter merged into each tensor as it is loaded.
    adapter: Option<Arc<Adapter>>,
}

impl Checkpoint {
    /// Opens the weights in `dir`: `model.safetensors`, or the shards listed in
    /// `model.safetensors.index.json`, or else `pytorch_model.bin`, or the shards listed in
    /// `pytorch_model.bin.index.json` (in transformers' order of preference).
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join(WEIGHTS);
        let index = dir.join(WEIGHTS_INDEX);
        let (files, source) = if single.is_file() {
            (vec![single.clone()], single)
        } else if index.is_file() {
            (shard_files(&index)?, index)
        } else if let Some(source) = pytorch_weights(dir) {
            let tensors = if source.ends_with(PYTORCH_WEIGHTS_INDEX) {
                read_pytorch_shards(&source)?
            } else {
                super::pytorch::read_state_dict(&source)?
            };
            return Self::new(Stored::Pytorch(tensors), source);
        } else {
            return Err(Error::NotFound {
                path: single,
                hint: format!(
                    "Expected {WEIGHTS}, {WEIGHTS_INDEX}, {PYTORCH_WEIGHTS} or {PYTORCH_WEIGHTS_INDEX} in the \
                     checkpoint folder."
                ),
            });
        };
        let shards = files
            .iter()
            .map(|file| {
                Shard::open(file).map_err(|e| Error::Weights {
                    path: source.clone(),
                    msg: format!(
                        "cannot read safetensors ({}: {e}); the file may be truncated or corrupt, download it again",
                        file.display()
                    ),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut routing = HashMap::new();
        for (i, shard) in shards.iter().enumerate() {
            for name in shard.metadata.offset_keys() {
                routing.insert(name, i);
            }
        }
        Self::new(Stored::Safetensors { shards, routing }, source)
    }

    fn new(stored: Stored, source: PathBuf) -> Result<Self> {
        let layout = Layout::of_weight_names(stored.names()).ok_or_else(|| Error::Weights {
            path: source.clone(),
            msg: "no Florence-2 weights found (expected `model.vision_tower.*` or `vision_tower.*` keys)".into(),
        })?;
        Ok(Checkpoint {
            stored,
            layout,
            source,
            prefetched: Mutex::default(),
            adapter: None,
        })
    }

    /// These weights with `adapter` merged into every tensor it changes, as the model loads them.
    pub fn with_adapter(self, adapter: Arc<Adapter>) -> Self {
        Self {
            adapter: Some(adapter),
            ..self
        }
    }

    /// The layout the stored key names follow.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The file (or shard index) the weights came from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Whether the checkpoint stores `hf_name` (an HF-native name).
    pub fn stores(&self, hf_name: &str) -> bool {
        self.stored.has(&self.stored_name(hf_name))
    }

    /// Every stored tensor as (stored name, shape, dtype), in name order, from the headers alone (a PyTorch
    /// archive is read whole at open). Errors for a dtype candle does not support.
    pub fn stored_tensors(&self) -> Result<Vec<(String, Vec<usize>, DType)>> {
        let mut tensors = match &self.stored {
            Stored::Pytorch(tensors) => tensors
                .iter()
                .map(|(name, t)| (name.clone(), t.dims().to_vec(), t.dtype()))
                .collect::<Vec<_>>(),
            Stored::Safetensors { .. } => self
                .stored
                .names()
                .filter_map(|name| self.stored.info(name).map(|(_, info)| (name, info)))
                .map(|(name, info)| {
                    let dtype = DType::try_from(info.dtype).map_err(|err| Error::Weights {
                        path: self.source.clone(),
                        msg: format!("tensor `{name}`: {err}"),
                    })?;
                    Ok((name.clone(), info.shape.clone(), dtype))
                })
                .collect::<Result<Vec<_>>>()?,
        };
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(tensors)
    }

    /// The stored tensor `stored` as `save_pretrained` writes it back: under its stored name and in its stored
    /// orientation, with the adapter merged, converted to `dtype` on the CPU.
    pub fn read_stored(&self, stored: &str, dtype: DType) -> Result<Tensor> {
        let hf = match self.layout {
            Layout::HfNative => stored.to_owned(),
            Layout::Original => hf_name(stored).ok_or_else(|| Error::Weights {
                path: self.source.clone(),
                msg: format!("tensor `{stored}` is not one of Microsoft's Florence-2 tensor names; cannot save it"),
            })?,
        };
        let tensor = self.load(&hf, &Device::Cpu)?;
        let tensor = if self.layout == Layout::Original && stored == "image_projection" {
            tensor.t()?.contiguous()?
        } else {
            tensor
        };
        Ok(tensor.to_dtype(dtype)?)
    }

    /// [`Self::stored_dtype`] of the weights in `dir`, reading only headers (a safetensors header, or a
    /// PyTorch archive's pickle).
    pub fn stored_dtype_in(dir: &Path) -> Result<Option<DType>> {
        if !dir.join(WEIGHTS).is_file() && !dir.join(WEIGHTS_INDEX).is_file() {
            if let Some(source) = pytorch_weights(dir) {
                let files = if source.ends_with(PYTORCH_WEIGHTS_INDEX) {
                    shard_files(&source)?
                } else {
                    vec![source]
                };
                return super::pytorch::stored_float_dtype(&files);
            }
        }
        Ok(Self::open(dir)?.stored_dtype())
    }

    /// The floating dtype of the stored weights (the first floating tensor's), used by `dtype="auto"`.
    pub fn stored_dtype(&self) -> Option<DType> {
        let mut names: Vec<_> = self.stored.names().collect();
        names.sort();
        names
            .into_iter()
            .find_map(|name| self.stored.float_dtype(name))
    }

    /// A `VarBuilder` over these weights that answers HF-native names, converting to `dtype` on `device`.
    /// `unread` names (HF-native) tensors the model will not ask for, which are not read ahead.
    pub fn var_builder(
        self,
        dtype: DType,
        device: &Device,
        unread: &[&str],
    ) -> VarBuilder<'static> {
        let unread: Vec<String> = unread.iter().map(|name| self.stored_name(name)).collect();
        self.prefetch(dtype, device, &unread);
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    /// Reads every tensor but `unread` at once, in parallel, when they are stored in `dtype` and go to the CPU.
    /// Loading is mostly the kernel faulting in and clearing fresh pages for the buffers, work that runs on
    /// every core; the model's constructors ask for tensors one at a time. With a conversion to do, tensors
    /// stay read one at a time: holding all of them in the stored dtype at once would add the whole checkpoint
    /// to peak memory.
    /// A tensor that fails to read here is left out, and `load` reads it again and reports the error.
    fn prefetch(&self, dtype: DType, device: &Device, unread: &[String]) {
        let Stored::Safetensors { routing, .. } = &self.stored else {
            return; // read whole at open
        };
        let mut names: Vec<&String> = routing
            .keys()
            .filter(|name| !unread.contains(name))
            .collect();
        let all_in_dtype = names
            .iter()
            .filter_map(|name| self.stored.info(name))
            .all(|(_, info)| safetensors_float_dtype(info.dtype).is_none_or(|d| d == dtype));
        if !device.is_cpu() || !all_in_dtype || !POSITIONAL_READS {
            return;
        }
        // Largest first, so that the parallel reads end together.
        names.sort_by_key(|name| {
            std::cmp::Reverse(
                self.stored
                    .info(name)
                    .map_or(0, |(_, i)| byte_len(i).unwrap_or(0)),
            )
        });
        let read: HashMap<String, Tensor> = names
            .into_par_iter()
            .filter_map(|name| {
                let (shard, info) = self.stored.info(name)?;
                Some((name.clone(), shard.read(info, device).ok()?))
            })
            .collect();
        *self.prefetched.lock().unwrap_or_else(|e| e.into_inner()) = read;
    }

    /// The stored name of an HF-native tensor name, in this checkpoint's layout.
    fn stored_name(&self, hf_name: &str) -> String {
        match self.layout {
            Layout::HfNative => hf_name.to_owned(),
            Layout::Original => original_name(hf_name),
        }
    }

    fn load(&self, hf_name: &str, device: &Device) -> candle_core::Result<Tensor> {
        let stored = self.stored_name(hf_name);
        let missing = || {
            candle_core::Error::Msg(format!(
                "{}: missing tensor `{stored}`; the weights do not match this Florence-2 config",
                self.source.display()
            ))
        };
        let tensor = match &self.stored {
            Stored::Pytorch(tensors) => tensors
                .get(&stored)
                .ok_or_else(missing)?
                .to_device(device)?,
            Stored::Safetensors { .. } => {
                let (shard, info) = self.stored.info(&stored).ok_or_else(missing)?;
                let prefetched = self
                    .prefetched
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&stored);
                match prefetched {
                    Some(tensor) => tensor,
                    None => shard.read(info, device)?,
                }
            }
        };
        let tensor = if self.layout == Layout::Original && stored == "image_projection" {
            // Microsoft stores the projection as [vision_dim, projection_dim] and multiplies `x @ W`.
            tensor.t()?.contiguous()?
        } else {
            tensor
        };
        match &self.adapter {
            Some(adapter) => adapter.apply(hf_name, tensor),
            None => Ok(tensor),
        }
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
        self.stores(name)
    }
}

impl Stored {
    /// The stored tensor names.
    fn names(&self) -> Box<dyn Iterator<Item = &String> + '_> {
        match self {
            Stored::Safetensors { routing, .. } => Box::new(routing.keys()),
            Stored::Pytorch(tensors) => Box::new(tensors.keys()),
        }
    }

    fn has(&self, stored: &str) -> bool {
        match self {
            Stored::Safetensors { .. } => self.info(stored).is_some(),
            Stored::Pytorch(tensors) => tensors.contains_key(stored),
        }
    }

    /// The dtype of a stored tensor when it is a floating one.
    fn float_dtype(&self, stored: &str) -> Option<DType> {
        match self {
            Stored::Safetensors { .. } => safetensors_float_dtype(self.info(stored)?.1.dtype),
            Stored::Pytorch(tensors) => Some(tensors.get(stored)?.dtype()).filter(|d| d.is_float()),
        }
    }

    /// The shard and header entry of a stored tensor name in safetensors files.
    fn info(&self, stored: &str) -> Option<(&Shard, &TensorInfo)> {
        let Stored::Safetensors { shards, routing } = self else {
            return None;
        };
        let shard = &shards[*routing.get(stored)?];
        Some((shard, shard.metadata.info(stored)?))
    }
}

/// The candle dtype of a stored floating dtype; `None` for integer and other dtypes.
fn safetensors_float_dtype(dtype: Dtype) -> Option<DType> {
    match dtype {
        Dtype::F32 => Some(DType::F32),
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::BF16),
        Dtype::F64 => Some(DType::F64),
        _ => None,
    }
}

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
fn pytorch_weights(dir: &Path) -> Option<PathBuf> {
    [PYTORCH_WEIGHTS, PYTORCH_WEIGHTS_INDEX]
        .into_iter()
        .map(|name| dir.join(name))
        .find(|path| path.is_file())
}

/// Every tensor of the PyTorch shards `index` lists, each checked as a single archive is: every tensor is in
/// exactly one shard, the one the index names for it.
fn read_pytorch_shards(index: &Path) -> Result<HashMap<String, Tensor>> {
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
fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
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

/// The HF-native name of a tensor name of Microsoft's layout: the inverse of [`original_name`], checked by
/// mapping back; `None` for a name [`original_name`] does not produce.
pub fn hf_name(original: &str) -> Option<String> {
    let candidate = if let Some(rest) = original.strip_prefix("vision_tower.") {
        // The renames of `original_name` undone in reverse order; `.conv.` became `.proj.` in the patch
        // embeddings (`convs.N`) only, the one rename whose result other names contain too.
        const RULES: [(&str, &str); 11] = [
            ("ffn.fn.net.fc2.", "ffn.fc2."),
            ("ffn.fn.net.fc1.", "ffn.fc1."),
            ("_block.ffn.norm.", "_block.norm2."),
            ("channel_attn.fn.proj.", "channel_attn.proj."),
            ("channel_attn.fn.qkv.", "channel_attn.qkv."),
            ("channel_block.channel_attn.norm.", "channel_block.norm1."),
            ("window_attn.fn.proj.", "window_attn.proj."),
            ("window_attn.fn.qkv.", "window_attn.qkv."),
            ("spatial_block.window_attn.norm.", "spatial_block.norm1."),
            ("_block.conv2.fn.dw.", "_block.conv2."),
            ("_block.conv1.fn.dw.", "_block.conv1."),
        ];
        let mut name = rest.to_owned();
        if name.starts_with("convs.") {
            name = name.replacen(".proj.", ".conv.", 1);
        }
        for (from, to) in RULES {
            name = name.replace(from, to);
        }
        format!("model.vision_tower.{name}")
    } else if original == "image_projection" {
        "model.multi_modal_projector.image_projection.weight".into()
    } else if let Some(rest) = original.strip_prefix("image_pos_embed.") {
        format!("model.multi_modal_projector.image_position_embed.{rest}")
    } else if original.starts_with("visual_temporal_embed.")
        || original.starts_with("image_proj_norm.")
    {
        format!("model.multi_modal_projector.{original}")
    } else if let Some(rest) = original.strip_prefix("language_model.model.") {
        format!("model.language_model.{rest}")
    } else if original == "language_model.lm_head.weight" {
        "lm_head.weight".into()
    } else if original == "language_model.final_logits_bias" {
        FINAL_LOGITS_BIAS.into()
    } else {
        return None;
    };
    (original_name(&candidate) == original).then_some(candidate)
}

#[cfg(test)]
mod tests {
    use super::{hf_name, original_name, Checkpoint};

    /// A one-tensor safetensors file in a fresh folder: `header` JSON, then `data_len` zero bytes.
    fn checkpoint_with(header: &str, data_len: usize) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.resize(bytes.len() + data_len, 0);
        std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
        dir
    }

    fn open_err(dir: &tempfile::TempDir) -> String {
        match Checkpoint::open(dir.path()) {
            Ok(_) => panic!("opened a bad checkpoint"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn headers_that_overrun_the_file_fail_at_open() {
        let key = "model.vision_tower.convs.0.conv.weight";
        let fits = format!(r#"{{"{key}":{{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}}}"#);
        assert!(Checkpoint::open(checkpoint_with(&fits, 16).path()).is_ok());
        for data_len in [15, 17] {
            let msg = open_err(&checkpoint_with(&fits, data_len));
            assert!(msg.contains("truncated or corrupt"), "{msg}");
        }
        let huge = usize::MAX / 8;
        let overflow =
            format!(r#"{{"{key}":{{"dtype":"U8","shape":[{huge}],"data_offsets":[0,{huge}]}}}}"#);
        assert!(open_err(&checkpoint_with(&overflow, 16)).contains("truncated or corrupt"));
    }

    /// Any header: a tensor entry with a dtype, a shape and offsets drawn from values that are valid, off by
    /// a little, or huge.
    fn header_entries() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let number = prop_oneof![0u64..64, Just(u64::MAX), Just(1 << 62), any::<u64>()];
        let dtype = prop_oneof![
            Just("F32"),
            Just("F16"),
            Just("BF16"),
            Just("F64"),
            Just("U8"),
            Just("I64"),
            Just("BOOL"),
            Just("F8_E4M3"),
            Just("Q7"),
            Just("")
        ];
        let entry = (
            "[a-z.]{1,12}",
            dtype,
            proptest::collection::vec(number.clone(), 0..4),
            number.clone(),
            number,
        )
            .prop_map(|(name, dtype, shape, start, end)| {
                format!(
                    r#""model.vision_tower.{name}":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[{start},{end}]}}"#
                )
            });
        proptest::collection::vec(entry, 0..4)
            .prop_map(|entries| format!("{{{}}}", entries.join(",")))
    }

    /// Opens a checkpoint made of `file`, and where it opens reads every tensor: neither may panic, and every
    /// failure names the file.
    fn open_and_read(file: &[u8]) {
        use candle_core::{DType, Device};
        use candle_nn::var_builder::SimpleBackend;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.safetensors"), file).unwrap();
        match Checkpoint::open(dir.path()) {
            Err(err) => assert!(err.to_string().contains("model.safetensors"), "{err}"),
            Ok(checkpoint) => {
                let names: Vec<String> = checkpoint.stored.names().cloned().collect();
                for name in names {
                    if let Err(err) = checkpoint.get_unchecked(&name, DType::F32, &Device::Cpu) {
                        assert!(!err.to_string().is_empty());
                    }
                }
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        #[test]
        fn any_bytes_open_or_fail_without_a_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            open_and_read(&bytes);
        }

        #[test]
        fn any_header_opens_or_fails_without_a_panic(
            header in header_entries(),
            data_len in 0usize..80,
            length_delta in proptest::prelude::prop_oneof![proptest::prelude::Just(0i64), -8i64..8],
        ) {
            let length = (header.len() as i64 + length_delta).max(0) as u64;
            let mut file = length.to_le_bytes().to_vec();
            file.extend_from_slice(header.as_bytes());
            file.resize(file.len() + data_len, 0x3f);
            open_and_read(&file);
        }
    }

    #[test]
    fn tensors_are_read_in_their_stored_dtype() {
        use candle_core::{DType, Device};
        use candle_nn::var_builder::SimpleBackend;
        let key = "model.vision_tower.convs.0.conv.weight";
        let header = format!(
            r#"{{"{key}":{{"dtype":"F16","shape":[2],"data_offsets":[0,4]}},"ids":{{"dtype":"U8","shape":[2],"data_offsets":[4,6]}}}}"#
        );
        let dir = checkpoint_with(&header, 0);
        let path = dir.path().join("model.safetensors");
        let mut bytes = std::fs::read(&path).unwrap();
        for value in [half::f16::from_f32(1.5), half::f16::from_f32(-2.0)] {
            bytes.extend_from_slice(&value.to_le_bytes());
        }
        bytes.extend_from_slice(&[7, 9]);
        std::fs::write(&path, bytes).unwrap();
        let checkpoint = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(checkpoint.stored_dtype(), Some(DType::F16));
        let cpu = Device::Cpu;
        let weight = checkpoint.get_unchecked(key, DType::F32, &cpu).unwrap();
        assert_eq!(weight.to_vec1::<f32>().unwrap(), [1.5, -2.0]);
        let ids = checkpoint.get_unchecked("ids", DType::U8, &cpu).unwrap();
        assert_eq!(ids.to_vec1::<u8>().unwrap(), [7, 9]);
    }

    #[test]
    fn prefetch_reads_every_tensor_but_the_unread_ones() {
        use candle_core::{DType, Device};
        let (a, b) = ("model.vision_tower.a", "model.vision_tower.b");
        let header = format!(
            r#"{{"{a}":{{"dtype":"F32","shape":[1],"data_offsets":[0,4]}},"{b}":{{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}}}"#
        );
        let dir = checkpoint_with(&header, 8);
        let checkpoint = Checkpoint::open(dir.path()).unwrap();
        checkpoint.prefetch(DType::F32, &Device::Cpu, &[b.to_string()]);
        let prefetched = checkpoint.prefetched.lock().unwrap();
        let mut names: Vec<&String> = prefetched.keys().collect();
        names.sort();
        // Positional reads exist on unix and windows; elsewhere nothing is read ahead.
        let expected: Vec<&str> = if super::POSITIONAL_READS {
            vec![a]
        } else {
            vec![]
        };
        assert_eq!(names, expected);
    }

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
            assert_eq!(hf_name(orig).as_deref(), Some(hf), "{orig}");
        }
    }

    #[test]
    fn every_stored_original_name_has_an_hf_name() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/original");
        let checkpoint = Checkpoint::open(&dir).unwrap();
        let tensors = checkpoint.stored_tensors().unwrap();
        assert!(tensors.len() > 50);
        for (name, _, _) in tensors {
            let hf = hf_name(&name).unwrap_or_else(|| panic!("{name}"));
            assert_eq!(original_name(&hf), name);
        }
        assert_eq!(hf_name("classifier.weight"), None);
    }
}
