//! Writing a checkpoint's weights: what `save_pretrained` stores, in the layout the model was loaded from, which
//! florence2-rs loads back as it loaded the source (transformers too, for the HF-native layout).
//!
//! The weights are read again from the checkpoint the model was loaded from, through [`Checkpoint`]: every
//! stored tensor under its stored name, a LoRA adapter merged as at load, converted to the saved dtype. A
//! quantized model's weights were quantized as they loaded, so what is written is the unquantized weights. The
//! files are streamed a tensor at a time (the header first, from the stored shapes), so saving holds one tensor
//! at a time, at most twice: as read and converted (in the wider of its stored and its saved dtype) and as the
//! bytes written (in its saved dtype); that sum is checked against the allocation limit before the tensor is
//! read. The sizes are checked to fit the format's 64-bit offsets before any file is written; each file is
//! written under a temporary name and renamed when complete.
//!
//! Microsoft's layout is saved as Microsoft's layout: its HF-native conversion has a larger vocabulary (the
//! `<image>` token, padding rows) and no `final_logits_bias`, whose extra logits change beam search's
//! log-softmax, so no conversion could generate what the loaded model generates.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::DType;
use serde_json::{json, Value};

use super::checkpoint::Checkpoint;
use super::shards::{WEIGHTS, WEIGHTS_INDEX};
use crate::{limits, Error, Result};

/// One tensor to write: its stored name, its shape, its dtype in the checkpoint and the dtype it is written in.
struct Entry {
    name: String,
    shape: Vec<usize>,
    stored: DType,
    dtype: DType,
}

impl Entry {
    /// The bytes of the tensor in `dtype` (saturating: a size past u128 is over every limit).
    fn bytes_in(&self, dtype: DType) -> u128 {
        let mut factors: Vec<u128> = self.shape.iter().map(|&d| d as u128).collect();
        factors.push(dtype.size_in_bytes() as u128);
        limits::product(&factors)
    }

    /// The bytes written for the tensor.
    fn bytes(&self) -> u128 {
        self.bytes_in(self.dtype)
    }

    /// The memory writing it takes at the most: the tensor as read and converted (the wider of the two dtypes,
    /// both alive during the conversion when they differ) and its bytes as written.
    fn peak_memory(&self) -> u128 {
        self.bytes_in(self.stored)
            .max(self.bytes())
            .saturating_add(self.bytes())
    }
}

/// Writes the weights of `checkpoint` (an adapter it carries merged in) into `dir` in its own layout, floating
/// tensors converted to `dtype`: `model.safetensors`, or, when they exceed `max_shard_size` bytes,
/// `model-0000i-of-0000n.safetensors` shards listed in `model.safetensors.index.json` (as transformers shards:
/// in name order, a new shard when the next tensor would overflow, a tensor larger than the limit alone).
/// Returns the names of the files written.
///
/// Errors: a stored tensor the layout does not name, a tensor over the allocation limit, weights whose size
/// does not fit 64 bits (checked before any file is written), or a file that cannot be written.
pub fn save_weights(
    checkpoint: &Checkpoint,
    dtype: DType,
    dir: &Path,
    max_shard_size: u64,
) -> Result<Vec<String>> {
    let entries: Vec<Entry> = checkpoint
        .stored_tensors()?
        .into_iter()
        .map(|(name, shape, stored)| Entry {
            name,
            shape,
            stored,
            dtype: if stored.is_float() { dtype } else { stored },
        })
        .collect();
    // Every offset in a file and the index's total are at most the total: it must fit the format's u64.
    let total_size = entries
        .iter()
        .fold(0u128, |sum, entry| sum.saturating_add(entry.bytes()));
    let total_size = u64::try_from(total_size).map_err(|_| {
        Error::invalid("the checkpoint's weights add up to more than 2^64 bytes; cannot save them")
    })?;
    let shards = shard(&entries, u128::from(max_shard_size));
    let count = shards.len();
    let mut files = Vec::with_capacity(count);
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = if count == 1 {
            WEIGHTS.to_string()
        } else {
            format!("model-{:05}-of-{count:05}.safetensors", i + 1)
        };
        write_safetensors(checkpoint, shard, &dir.join(&file))?;
        for entry in shard {
            weight_map.insert(entry.name.clone(), Value::String(file.clone()));
        }
        files.push(file);
    }
    if count > 1 {
        let index = json!({"metadata": {"total_size": total_size}, "weight_map": weight_map});
        let text = serde_json::to_string_pretty(&index).expect("a JSON value serializes") + "\n";
        let path = dir.join(WEIGHTS_INDEX);
        write_atomically(&path, |out| {
            out.write_all(text.as_bytes()).map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })
        })?;
        files.push(WEIGHTS_INDEX.to_string());
    }
    Ok(files)
}

/// Splits `entries` (in name order) into shards of at most `max_bytes` each, a larger tensor alone.
fn shard(entries: &[Entry], max_bytes: u128) -> Vec<Vec<&Entry>> {
    let mut shards: Vec<Vec<&Entry>> = Vec::new();
    let mut current: Vec<&Entry> = Vec::new();
    let mut size = 0u128;
    for entry in entries {
        let bytes = entry.bytes();
        if !current.is_empty() && size.saturating_add(bytes) > max_bytes {
            shards.push(std::mem::take(&mut current));
            size = 0;
        }
        current.push(entry);
        size += bytes;
    }
    if !current.is_empty() || shards.is_empty() {
        shards.push(current);
    }
    shards
}

/// Writes one safetensors file: the header from the entries' shapes, then each tensor read from
/// `checkpoint` and converted, checked to have the size the header promised. The entries' sizes add up to
/// less than 2^64 (checked by `save_weights`).
fn write_safetensors(checkpoint: &Checkpoint, entries: &[&Entry], path: &Path) -> Result<()> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0u128;
    for entry in entries {
        let end = offset + entry.bytes();
        let dtype: safetensors::Dtype = entry.dtype.into();
        header.insert(
            entry.name.clone(),
            json!({"dtype": dtype, "shape": entry.shape, "data_offsets": [offset as u64, end as u64]}),
        );
        offset = end;
    }
    let mut header = serde_json::to_vec(&Value::Object(header)).expect("a JSON value serializes");
    // The data section starts 8-byte aligned, padded with spaces as the safetensors format does.
    header.resize(header.len().next_multiple_of(8), b' ');
    write_atomically(path, |out| {
        let io_error = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        out.write_all(&(header.len() as u64).to_le_bytes())
            .and_then(|()| out.write_all(&header))
            .map_err(io_error)?;
        for entry in entries {
            write_tensor(checkpoint, entry, out, path)?;
        }
        Ok(())
    })
}

/// Writes the little-endian bytes of one tensor as it is saved to `out` (the file `path`), checked to be as
/// many as the header says.
fn write_tensor(
    checkpoint: &Checkpoint,
    entry: &Entry,
    out: &mut impl Write,
    path: &Path,
) -> Result<()> {
    limits::check_alloc(
        &format!("saving tensor `{}`", entry.name),
        entry.peak_memory(),
    )?;
    let tensor = checkpoint
        .read_stored(&entry.name, entry.dtype)?
        .flatten_all()?;
    let mut write = |bytes: &[u8]| {
        if bytes.len() as u128 != entry.bytes() {
            return Err(Error::Weights {
                path: checkpoint.source().to_path_buf(),
                msg: format!(
                    "tensor `{}` read back with {} bytes where its header says {}",
                    entry.name,
                    bytes.len(),
                    entry.bytes()
                ),
            });
        }
        out.write_all(bytes).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    };
    match entry.dtype {
        DType::F32 => write(bytemuck::cast_slice(&tensor.to_vec1::<f32>()?)),
        DType::F16 => write(bytemuck::cast_slice(&tensor.to_vec1::<half::f16>()?)),
        DType::BF16 => write(bytemuck::cast_slice(&tensor.to_vec1::<half::bf16>()?)),
        DType::F64 => write(bytemuck::cast_slice(&tensor.to_vec1::<f64>()?)),
        DType::U8 => write(&tensor.to_vec1::<u8>()?),
        DType::U32 => write(bytemuck::cast_slice(&tensor.to_vec1::<u32>()?)),
        DType::I64 => write(bytemuck::cast_slice(&tensor.to_vec1::<i64>()?)),
        other => Err(Error::invalid(format!(
            "tensor `{}` has dtype {other:?}, which saving does not write",
            entry.name
        ))),
    }
}

/// Writes `path` through `write` into a temporary file beside it, renamed over `path` once complete, so that
/// a failed save leaves no truncated file under the final name.
fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> Result<()>,
) -> Result<()> {
    let mut tmp = PathBuf::from(path);
    tmp.as_mut_os_string().push(".tmp");
    let io_error = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let result = File::create(&tmp).map_err(io_error).and_then(|file| {
        let mut out = BufWriter::new(file);
        write(&mut out)?;
        out.into_inner()
            .map_err(|e| e.into_error())
            .and_then(|file| file.sync_all())
            .map_err(io_error)
    });
    if let Err(err) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(err);
    }
    std::fs::rename(&tmp, path).map_err(io_error)
}

#[cfg(test)]
mod tests {
    use super::{save_weights, shard, Entry};
    use crate::io::checkpoint::Checkpoint;
    use candle_core::DType;

    fn entry(name: &str, len: usize) -> Entry {
        Entry {
            name: name.into(),
            shape: vec![len],
            stored: DType::F32,
            dtype: DType::F32,
        }
    }

    /// Shapes whose size overflows u128 saturate (over every limit) instead of overflowing, in the sizes, the
    /// memory check and the sharding; the memory counts the read and the written copy.
    #[test]
    fn sizes_saturate_and_count_both_copies() {
        let huge = Entry {
            name: "huge".into(),
            shape: vec![usize::MAX; 3],
            stored: DType::BF16,
            dtype: DType::F32,
        };
        assert_eq!(huge.bytes(), u128::MAX);
        assert_eq!(huge.peak_memory(), u128::MAX);
        assert!(crate::limits::check_alloc("huge", huge.peak_memory()).is_err());
        assert_eq!(shard(&[huge, entry("a", 1)], 16).len(), 2);
        let widened = Entry {
            name: "w".into(),
            shape: vec![10],
            stored: DType::BF16,
            dtype: DType::F32,
        };
        assert_eq!(widened.peak_memory(), 80);
        let narrowed = Entry {
            stored: DType::F32,
            dtype: DType::BF16,
            ..widened
        };
        assert_eq!(narrowed.peak_memory(), 60);
    }

    #[test]
    fn shards_fill_up_to_the_limit_and_a_large_tensor_stands_alone() {
        let entries = [entry("a", 2), entry("b", 2), entry("c", 10), entry("d", 1)];
        let names: Vec<Vec<&str>> = shard(&entries, 16)
            .iter()
            .map(|s| s.iter().map(|e| e.name.as_str()).collect())
            .collect();
        assert_eq!(names, [vec!["a", "b"], vec!["c"], vec!["d"]]);
        assert_eq!(shard(&entries, 1 << 20).len(), 1);
    }

    /// Both committed tiny layouts, saved whole and sharded: reopened, every tensor reads back as it was stored
    /// (bf16: as the conversion made it), under the same names.
    #[test]
    fn saved_weights_read_back_as_stored() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny");
        for layout in ["hf", "original"] {
            let source = Checkpoint::open(&fixtures.join(layout)).unwrap();
            for (dtype, max_shard) in [(DType::F32, u64::MAX), (DType::BF16, 20_000)] {
                let dir = tempfile::tempdir().unwrap();
                let files = save_weights(&source, dtype, dir.path(), max_shard).unwrap();
                assert_eq!(files.len() == 1, max_shard == u64::MAX, "{files:?}");
                let saved = Checkpoint::open(dir.path()).unwrap();
                assert_eq!(saved.layout(), source.layout());
                let names: Vec<_> = source.stored_tensors().unwrap();
                assert_eq!(saved.stored_tensors().unwrap().len(), names.len());
                for (name, shape, _) in names {
                    let want = source.read_stored(&name, dtype).unwrap();
                    let got = saved.read_stored(&name, dtype).unwrap();
                    assert_eq!(got.dims(), shape.as_slice(), "{name}");
                    let values = |t: candle_core::Tensor| {
                        let t = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
                        t.to_vec1::<f32>().unwrap()
                    };
                    assert_eq!(values(got), values(want), "{layout} {name}");
                }
            }
        }
    }
}
