//! PyTorch checkpoints (`pytorch_model.bin`): the zip archive `torch.save` writes, whose `<root>/data.pkl`
//! pickles the state dict and whose `<root>/data/<key>` entries hold the tensors' storages.
//!
//! No pickle code runs: candle's pickle reader interprets the opcodes into plain values (a class reference is
//! a name, a call is a record of it), and only a dict from names to tensors that torch rebuilds with
//! `_rebuild_tensor_v2` (or `_rebuild_parameter` around it) is accepted; anything else in the file is an error
//! that names it. Every size in the file is checked against the archive before anything is allocated for it.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use candle_core::pickle::{Object, Stack};
use candle_core::{Device, Tensor};

use crate::error::panic_message;
use crate::limits::check_alloc;
use crate::{Error, Result};

/// The weights file of an older checkpoint folder, read when it has no safetensors weights.
pub const PYTORCH_WEIGHTS: &str = "pytorch_model.bin";

/// The largest `data.pkl` read: a state dict's pickle holds names and shapes only (kilobytes to a few
/// megabytes), so a larger one is not a checkpoint of plain tensors.
const MAX_PICKLE_BYTES: u64 = 256 << 20;

type Archive = zip::ZipArchive<BufReader<File>>;

/// Every tensor of the PyTorch checkpoint at `path`, by its stored name, on the CPU in its stored dtype.
pub fn read_state_dict(path: &Path) -> Result<HashMap<String, Tensor>> {
    let bad = |msg: String| Error::Weights {
        path: path.to_path_buf(),
        msg,
    };
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let mut archive = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| {
        bad(format!(
            "not a PyTorch zip archive ({e}); florence2-rs reads the format torch.save writes since torch 1.6"
        ))
    })?;
    let pickle_name = pickle_entry(&archive).map_err(bad)?;
    let root = pickle_name
        .strip_suffix("data.pkl")
        .unwrap_or_default()
        .to_string();
    let object = unpickle(&mut archive, &pickle_name).map_err(bad)?;
    let Object::Dict(entries) = object else {
        return Err(bad(
            "data.pkl holds no dict of tensors (a state dict is expected; save `model.state_dict()`)".into(),
        ));
    };
    let mut tensors = HashMap::with_capacity(entries.len());
    for (key, value) in entries {
        let Object::Unicode(name) = key else {
            return Err(bad(format!(
                "the state dict has a key that is not a string: {key:?}"
            )));
        };
        let tensor = read_tensor(&mut archive, (&root, file_len), &name, value).map_err(bad)?;
        tensors.insert(name, tensor);
    }
    Ok(tensors)
}

/// The name of the archive's one `data.pkl`.
fn pickle_entry(archive: &Archive) -> std::result::Result<String, String> {
    let names = archive
        .file_names()
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| format!("unreadable entry names ({e})"))?;
    let mut pickles = names
        .into_iter()
        .filter(|name| name == "data.pkl" || name.ends_with("/data.pkl"));
    match (pickles.next(), pickles.next()) {
        (Some(name), None) => Ok(name.into_owned()),
        (None, _) => Err("the archive has no data.pkl: not a checkpoint torch.save wrote".into()),
        (Some(_), Some(_)) => Err("the archive has more than one data.pkl".into()),
    }
}

/// The object `data.pkl` describes. candle's reader is an interpreter of pickle opcodes that assumes
/// well-formed input in places; a file that makes it panic is reported as not being a checkpoint.
fn unpickle(archive: &mut Archive, name: &str) -> std::result::Result<Object, String> {
    let entry = archive.by_name(name).map_err(|e| format!("{name}: {e}"))?;
    if entry.size() > MAX_PICKLE_BYTES {
        return Err(format!(
            "{name} is {} bytes, far more than a state dict's pickle: not a checkpoint of plain tensors",
            entry.size()
        ));
    }
    let mut bytes = Vec::new();
    entry
        .take(MAX_PICKLE_BYTES)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{name}: {e}"))?;
    let parsed = catch_unwind(AssertUnwindSafe(|| {
        let mut stack = Stack::empty();
        stack.read_loop(&mut bytes.as_slice())?;
        stack.finalize()
    }));
    match parsed {
        Ok(Ok(object)) => Ok(object),
        Ok(Err(e)) => Err(format!("{name} is not a pickle this reader accepts ({e})")),
        Err(panic) => Err(format!(
            "{name} is not a well-formed pickle ({})",
            panic_message(panic.as_ref())
        )),
    }
}

/// The tensor `value` of the state dict describes, read from its storage entry.
/// `root` is the archive's top folder and `file_len` the archive's size, which bounds every storage in it.
fn read_tensor(
    archive: &mut Archive,
    (root, file_len): (&str, u64),
    name: &str,
    value: Object,
) -> std::result::Result<Tensor, String> {
    let not_plain =
        || format!("`{name}` is not a plain tensor; save the state dict of tensors only");
    let dir = PathBuf::from(format!("{root}data"));
    let info = catch_unwind(AssertUnwindSafe(|| {
        value.into_tensor_info(Object::Unicode(name.to_string()), &dir)
    }))
    .map_err(|_| not_plain())?
    .map_err(|e| format!("`{name}`: {e}"))?
    .ok_or_else(not_plain)?;
    let layout = &info.layout;
    // A transposed view (column-major) is read as its transpose and turned back; other strides would need
    // the whole storage and a gather.
    let column_major = !layout.is_contiguous() && layout.is_fortran_contiguous();
    if !layout.is_contiguous() && !column_major {
        return Err(format!(
            "`{name}` is stored strided (shape {:?}, stride {:?}); save a contiguous copy",
            layout.dims(),
            layout.stride()
        ));
    }
    let elems = layout.shape().elem_count();
    let start = layout.start_offset() as u64;
    let len = (elems as u64)
        .checked_mul(info.dtype.size_in_bytes() as u64)
        .ok_or_else(|| format!("`{name}`: shape {:?} overflows", layout.dims()))?;
    let mut entry = archive
        .by_name(&info.path)
        .map_err(|e| format!("`{name}`: storage {}: {e}", info.path))?;
    if entry.compression() != zip::CompressionMethod::Stored {
        return Err(format!(
            "`{name}`: its storage is compressed; torch.save stores tensors uncompressed"
        ));
    }
    let stored = entry.size().min(file_len);
    if start.checked_add(len).is_none_or(|end| end > stored) {
        return Err(format!(
            "`{name}` claims {len} bytes at offset {start} of a {stored}-byte storage; the file may be truncated \
             or corrupt"
        ));
    }
    check_alloc(&format!("tensor `{name}`"), u128::from(len)).map_err(|e| e.to_string())?;
    std::io::copy(&mut (&mut entry).take(start), &mut std::io::sink())
        .map_err(|e| format!("`{name}`: {e}"))?;
    let mut bytes = vec![0u8; len as usize];
    entry
        .read_exact(&mut bytes)
        .map_err(|e| format!("`{name}`: {e}"))?;
    // torch.save writes little-endian storages, the byte order of every platform candle runs on.
    let read = |dims: &[usize]| Tensor::from_raw_buffer(&bytes, info.dtype, dims, &Device::Cpu);
    let tensor = if column_major {
        let reversed: Vec<usize> = layout.dims().iter().rev().copied().collect();
        let order: Vec<usize> = (0..reversed.len()).rev().collect();
        read(&reversed).and_then(|t| t.permute(order)?.contiguous())
    } else {
        read(layout.dims())
    };
    tensor.map_err(|e| format!("`{name}`: {e}"))
}
