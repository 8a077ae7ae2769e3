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
//! The files are found by [`super::shards`] and read by `super::files`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use rayon::prelude::*;
use safetensors::tensor::TensorInfo;
use safetensors::Dtype;

use super::adapter::Adapter;
use super::files::{byte_len, Shard, POSITIONAL_READS};
use super::layout::Layout;
use super::names::{hf_name, original_name};
use super::pytorch::{PYTORCH_WEIGHTS, PYTORCH_WEIGHTS_INDEX};
use super::shards::{pytorch_weights, read_pytorch_shards, shard_files, WEIGHTS, WEIGHTS_INDEX};
use crate::{Error, Result};

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
