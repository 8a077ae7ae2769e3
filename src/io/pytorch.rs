//! PyTorch checkpoints (`pytorch_model.bin`): the zip archive `torch.save` writes, whose `<root>/data.pkl`
//! pickles the state dict and whose `<root>/data/<key>` entries hold the tensors' storages.
//!
//! No pickle code runs: candle's pickle reader interprets the opcodes into plain values (a class reference is
//! a name, a call is a record of it), and only a dict from names to tensors that torch rebuilds with
//! `_rebuild_tensor_v2` (or `_rebuild_parameter` around it) is accepted; anything else in the file is an error
//! that names it. candle's reader trusts its input (it clones memoized values and nests without bound), so
//! [`check_pickle`] first walks the opcodes and refuses a pickle whose values would grow past a state dict's
//! size or depth; the reader then runs under `catch_unwind`. The rebuild calls are read here ([`stored_tensor`]),
//! every shape and number checked with checked arithmetic as torch's `set_` checks them, so that no value of
//! the file can wrap around or index past what it declares. Storages are read in place (positional reads of
//! the uncompressed entries), each view once, after the storage is checked against the archive.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Layout, Tensor};

use super::files::read_exact_at;
use crate::error::panic_message;
use crate::limits::check_alloc;
use crate::{Error, Result};

/// The weights file of an older checkpoint folder, read when it has no safetensors weights.
pub const PYTORCH_WEIGHTS: &str = "pytorch_model.bin";
/// The index of such weights in shards (transformers' `save_pretrained(safe_serialization=False)` above
/// `max_shard_size`), which lists the shard files.
pub const PYTORCH_WEIGHTS_INDEX: &str = "pytorch_model.bin.index.json";

/// The largest `data.pkl` read: a state dict's pickle holds names and shapes only (kilobytes to a few
/// megabytes).
const MAX_PICKLE_BYTES: u64 = 64 << 20;

/// The most values (weighted by their bytes, see [`check_pickle`]) the pickle may make live at once, and how
/// deep they may nest: a state dict of a thousand tensors makes some tens of thousands, a few levels deep.
const MAX_PICKLE_VALUES: u64 = 1 << 22;
const MAX_PICKLE_DEPTH: u32 = 64;

/// The longest error text built from the file's own content.
const MAX_MESSAGE: usize = 300;

type Archive = zip::ZipArchive<BufReader<File>>;

/// Every tensor of the PyTorch checkpoint at `path`, by its stored name, on the CPU in its stored dtype.
pub fn read_state_dict(path: &Path) -> Result<HashMap<String, Tensor>> {
    let mut reader = ArchiveReader::open(path)?;
    let entries = reader.tensor_infos()?;
    let mut read: HashMap<(String, usize, Vec<usize>, DType), Tensor> = HashMap::new();
    let mut tensors = HashMap::with_capacity(entries.len());
    let mut total = 0u128;
    for info in entries {
        let key = (
            info.path.clone(),
            info.layout.start_offset(),
            info.layout.dims().to_vec(),
            info.dtype,
        );
        // Tied weights are one storage under several names: each view is read once.
        let tensor = match read.get(&key) {
            Some(tensor) => tensor.clone(),
            None => {
                let tensor = reader.read_tensor(&info, &mut total)?;
                read.insert(key, tensor.clone());
                tensor
            }
        };
        tensors.insert(info.name, tensor);
    }
    Ok(tensors)
}

/// The dtype of the first floating tensor (in name order) of the checkpoint stored in `paths` (one archive, or
/// the shards of one), from their pickles alone.
pub fn stored_float_dtype(paths: &[PathBuf]) -> Result<Option<DType>> {
    let mut infos = Vec::new();
    for path in paths {
        infos.extend(ArchiveReader::open(path)?.tensor_infos()?);
    }
    infos.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(infos.into_iter().map(|i| i.dtype).find(|d| d.is_float()))
}

/// One tensor of the state dict, as its `_rebuild_tensor_v2` call describes it (not yet read).
struct StoredTensor {
    name: String,
    dtype: DType,
    /// Shape, strides and offset in elements of the storage; checked to lie within the storage.
    layout: Layout,
    /// The archive entry of the storage (`<root>/data/<key>`).
    path: String,
    /// The storage's size in bytes, as the pickle declares it.
    storage_bytes: u64,
}

/// An open archive and a second handle on its file for positional reads of the storages.
struct ArchiveReader {
    path: PathBuf,
    archive: Archive,
    file: File,
    file_len: u64,
}

impl ArchiveReader {
    fn open(path: &Path) -> Result<Self> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let archive = zip::ZipArchive::new(BufReader::new(File::open(path).map_err(io)?)).map_err(|e| {
            Self::bad(
                path,
                format!(
                    "not a PyTorch zip archive ({e}); florence2-rs reads the format torch.save writes since \
                     torch 1.6"
                ),
            )
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            archive,
            file,
            file_len,
        })
    }

    fn bad(path: &Path, msg: String) -> Error {
        Error::Weights {
            path: path.to_path_buf(),
            msg,
        }
    }

    /// The tensors the state dict describes (not yet read), in the pickle's order.
    fn tensor_infos(&mut self) -> Result<Vec<StoredTensor>> {
        let bad = |msg: String| Self::bad(&self.path, msg);
        let pickle_name = pickle_entry(&self.archive).map_err(bad)?;
        let root = pickle_name
            .strip_suffix("data.pkl")
            .unwrap_or_default()
            .to_string();
        let object = unpickle(&mut self.archive, &pickle_name).map_err(bad)?;
        let Object::Dict(entries) = object else {
            return Err(bad(
                "data.pkl holds no dict of tensors (a state dict is expected; save `model.state_dict()`)".into(),
            ));
        };
        let dir = format!("{root}data");
        let mut infos = Vec::with_capacity(entries.len());
        for (key, value) in entries {
            let Object::Unicode(name) = key else {
                return Err(bad(format!(
                    "the state dict has a key that is not a string ({})",
                    kind(&key)
                )));
            };
            // torch's state dicts carry their modules' versions in `_metadata`, which is no tensor.
            if name == "_metadata" && matches!(value, Object::Dict(_)) {
                continue;
            }
            let info = stored_tensor(&name, value, &dir)
                .map_err(|e| bad(format!("`{}`: {}", clip(&name), clip(&e))))?
                .ok_or_else(|| {
                    bad(format!(
                        "`{}` is not a plain tensor; save the state dict of tensors only",
                        clip(&name)
                    ))
                })?;
            infos.push(info);
        }
        Ok(infos)
    }

    /// Reads the tensor `info` describes; `total` counts the bytes read so far, which the archive bounds.
    fn read_tensor(&mut self, info: &StoredTensor, total: &mut u128) -> Result<Tensor> {
        let name = clip(&info.name);
        let bad = |msg: String| Self::bad(&self.path, msg);
        let layout = &info.layout;
        // A transposed view (column-major) is read as its transpose and turned back; other strides would need
        // the whole storage and a gather.
        let column_major = !layout.is_contiguous() && layout.is_fortran_contiguous();
        if !layout.is_contiguous() && !column_major {
            return Err(bad(format!(
                "`{name}` is stored strided (shape {:?}, stride {:?}); save a contiguous copy",
                layout.dims(),
                layout.stride()
            )));
        }
        // `stored_tensor` checked that the view's elements fit u64 bytes, and that a non-empty view lies within
        // its storage's declared bytes. An empty view's offset is bounded by nothing (torch accepts any), and
        // it reads nothing.
        let itemsize = info.dtype.size_in_bytes() as u64;
        let len = layout.shape().elem_count() as u64 * itemsize;
        let start = if len == 0 {
            0
        } else {
            (layout.start_offset() as u64)
                .checked_mul(itemsize)
                .ok_or_else(|| {
                    bad(format!(
                        "`{name}`: its storage offset overflows; the file is corrupt"
                    ))
                })?
        };
        let entry = self
            .archive
            .by_name(&info.path)
            .map_err(|e| bad(format!("`{name}`: storage {}: {e}", clip(&info.path))))?;
        if entry.compression() != zip::CompressionMethod::Stored {
            return Err(bad(format!(
                "`{name}`: its storage is compressed; torch.save stores tensors uncompressed"
            )));
        }
        let data_start = entry.data_start();
        let stored = entry.size().min(self.file_len);
        drop(entry);
        if info.storage_bytes > stored {
            return Err(bad(format!(
                "`{name}`: its storage claims {} bytes, but the archive's {} holds {stored}; the file may be \
                 truncated or corrupt",
                info.storage_bytes,
                clip(&info.path)
            )));
        }
        let in_file = data_start
            .and_then(|at| at.checked_add(start)?.checked_add(len))
            .is_some_and(|end| end <= self.file_len);
        if start.checked_add(len).is_none_or(|end| end > stored) || !in_file {
            return Err(bad(format!(
                "`{name}` claims {len} bytes at offset {start} of a {stored}-byte storage; the file may be \
                 truncated or corrupt"
            )));
        }
        // Distinct views of one storage may overlap, but together they cannot hold more than the archive.
        *total += u128::from(len);
        if *total > u128::from(self.file_len) {
            return Err(bad(format!(
                "its tensors claim more bytes than the {}-byte file holds; the file is corrupt",
                self.file_len
            )));
        }
        check_alloc(&format!("tensor `{name}`"), u128::from(len))?;
        let mut bytes = vec![0u8; len as usize];
        let offset = data_start.unwrap_or_default() + start;
        read_exact_at(&self.file, &mut bytes, offset)
            .map_err(|e| bad(format!("`{name}`: cannot read its storage ({e})")))?;
        // torch.save writes little-endian storages, the byte order of every platform candle runs on.
        let tensor =
            |dims: &[usize]| Tensor::from_raw_buffer(&bytes, info.dtype, dims, &Device::Cpu);
        let tensor = if column_major {
            let reversed: Vec<usize> = layout.dims().iter().rev().copied().collect();
            let order: Vec<usize> = (0..reversed.len()).rev().collect();
            tensor(&reversed).and_then(|t| t.permute(order)?.contiguous())
        } else {
            tensor(layout.dims())
        };
        tensor.map_err(|e| bad(format!("`{name}`: {}", candle_message(&e))))
    }
}

/// The tensor that `value` rebuilds (`_rebuild_tensor_v2(storage, storage_offset, size, stride, ...)`, possibly
/// inside `_rebuild_parameter` or `_rebuild_from_type_v2`), its storage under `dir`; `None` for a value that
/// is no such call. Every part is checked for its type and every number for its range, so that a malformed
/// call is an error rather than a panic or a wrapped-around size; as torch's `set_` does, the view's extent
/// must lie within the storage it declares.
fn stored_tensor(
    name: &str,
    value: Object,
    dir: &str,
) -> std::result::Result<Option<StoredTensor>, String> {
    let malformed = |what: &str| format!("its pickled tensor is malformed ({what})");
    let Object::Reduce { callable, args } = value else {
        return Ok(None);
    };
    let (mut callable, mut args) = (*callable, *args);
    loop {
        match class_name(&callable) {
            // `_rebuild_parameter(data, requires_grad, backward_hooks)`: the tensor is `data`.
            Some(("torch._utils", "_rebuild_parameter")) => match args {
                Object::Tuple(items) => match items.into_iter().next() {
                    Some(Object::Reduce {
                        callable: inner,
                        args: inner_args,
                    }) => (callable, args) = (*inner, *inner_args),
                    _ => return Err(malformed("_rebuild_parameter without a tensor")),
                },
                _ => return Err(malformed("_rebuild_parameter without its arguments")),
            },
            // `_rebuild_from_type_v2(func, type, args, state)`: the tensor is `func(*args)`.
            Some(("torch._tensor", "_rebuild_from_type_v2")) => match args {
                Object::Tuple(items) if items.len() >= 3 => {
                    let mut items = items.into_iter();
                    callable = items.next().unwrap_or(Object::None);
                    args = items.nth(1).unwrap_or(Object::None);
                }
                _ => return Err(malformed("_rebuild_from_type_v2 without its arguments")),
            },
            Some(("torch._utils", "_rebuild_tensor_v2")) => break,
            _ => return Ok(None),
        }
    }
    let Object::Tuple(args) = args else {
        return Err(malformed("_rebuild_tensor_v2 without its arguments"));
    };
    let [storage, offset, size, stride, ..] = args.as_slice() else {
        return Err(malformed(&format!(
            "_rebuild_tensor_v2 with {} arguments, at least 4 expected",
            args.len()
        )));
    };
    // The storage's persistent id: ('storage', storage class, key, location, number of elements).
    let storage = match storage {
        Object::PersistentLoad(id) => match id.as_ref() {
            Object::Tuple(id) => id.as_slice(),
            _ => &[],
        },
        _ => &[],
    };
    let [Object::Unicode(kind), class, Object::Unicode(key), _, numel, ..] = storage else {
        return Err(malformed(
            "a storage that is not ('storage', type, key, location, size)",
        ));
    };
    if kind != "storage" {
        return Err(malformed(
            "a storage that is not ('storage', type, key, location, size)",
        ));
    }
    let dtype = match class_name(class) {
        Some((_, "FloatStorage")) => DType::F32,
        Some((_, "DoubleStorage")) => DType::F64,
        Some((_, "HalfStorage")) => DType::F16,
        Some((_, "BFloat16Storage")) => DType::BF16,
        Some((_, "ByteStorage")) => DType::U8,
        Some((_, "LongStorage")) => DType::I64,
        Some((_, other)) => {
            return Err(format!(
                "its storage type {} is not supported (float32, float64, float16, bfloat16, uint8 or int64 \
                 tensors are)",
                clip(other)
            ))
        }
        None => return Err(malformed("a storage type that is not a class")),
    };
    let count = |value: &Object, what: &str| -> std::result::Result<u64, String> {
        match value {
            Object::Int(n) => u64::try_from(*n).ok(),
            Object::Long(n) => u64::try_from(*n).ok(),
            _ => None,
        }
        .ok_or_else(|| malformed(&format!("{what} that is not a non-negative integer")))
    };
    let counts = |value: &Object, what: &str| -> std::result::Result<Vec<u64>, String> {
        match value {
            Object::Tuple(items) => items.iter().map(|v| count(v, what)).collect(),
            _ => Err(malformed(&format!("{what}s that are not a tuple"))),
        }
    };
    let numel = count(numel, "a storage size")?;
    let offset = count(offset, "a storage offset")?;
    let size = counts(size, "a size")?;
    let stride = counts(stride, "a stride")?;
    if size.len() != stride.len() {
        return Err(malformed(&format!(
            "{} sizes and {} strides",
            size.len(),
            stride.len()
        )));
    }
    let itemsize = dtype.size_in_bytes() as u64;
    // torch's storage-size computation: offset + sum((size - 1) * stride) + 1 elements, none for an empty
    // view, then its bytes; each step checked.
    let overflowed = || {
        clip(&format!(
            "its storage size calculation overflowed (storage offset {offset}, sizes {size:?}, strides \
             {stride:?}); the file is corrupt"
        ))
    };
    let extent = if size.contains(&0) {
        Some(0)
    } else {
        size.iter()
            .zip(&stride)
            .try_fold(offset, |acc, (&n, &s)| {
                acc.checked_add((n - 1).checked_mul(s)?)
            })
            .and_then(|last| last.checked_add(1))
    };
    let needed = extent
        .and_then(|e| e.checked_mul(itemsize))
        .ok_or_else(overflowed)?;
    // The view's own bytes too: a zero stride repeats elements, so they may exceed the storage's.
    if !size.contains(&0) {
        size.iter()
            .try_fold(itemsize, |acc, &n| acc.checked_mul(n))
            .ok_or_else(overflowed)?;
    }
    let storage_bytes = numel.checked_mul(itemsize).ok_or_else(overflowed)?;
    if needed > storage_bytes {
        return Err(clip(&format!(
            "its view claims {needed} bytes, beyond its storage of {storage_bytes} bytes (storage offset \
             {offset}, sizes {size:?}, strides {stride:?}); the file is corrupt"
        )));
    }
    // Within the storage's bytes, which the archive bounds before anything is read; on a 32-bit target the
    // values must also fit usize.
    let to_usize = |v: u64| usize::try_from(v).map_err(|_| overflowed());
    let layout = Layout::new(
        size.iter()
            .map(|&n| to_usize(n))
            .collect::<std::result::Result<Vec<_>, _>>()?
            .into(),
        stride
            .iter()
            .map(|&n| to_usize(n))
            .collect::<std::result::Result<Vec<_>, _>>()?,
        to_usize(offset)?,
    );
    Ok(Some(StoredTensor {
        name: name.to_string(),
        dtype,
        layout,
        path: format!("{dir}/{key}"),
        storage_bytes,
    }))
}

/// `(module, name)` of a pickled class reference.
fn class_name(object: &Object) -> Option<(&str, &str)> {
    match object {
        Object::Class {
            module_name,
            class_name,
        } => Some((module_name, class_name)),
        _ => None,
    }
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

/// The object `data.pkl` describes, after [`check_pickle`] has bounded what reading it makes.
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
    check_pickle(&bytes).map_err(|e| format!("{name} is not a state dict's pickle ({e})"))?;
    let parsed = catch_unwind(AssertUnwindSafe(|| {
        let mut stack = Stack::empty();
        stack.read_loop(&mut bytes.as_slice())?;
        stack.finalize()
    }));
    match parsed {
        Ok(Ok(object)) => Ok(object),
        Ok(Err(e)) => Err(format!(
            "{name} is not a pickle this reader accepts ({})",
            candle_message(&e)
        )),
        Err(panic) => Err(format!(
            "{name} is not a well-formed pickle ({})",
            clip(&panic_message(panic.as_ref()))
        )),
    }
}

/// A live value of the simulated pickle stack: its weight (1 per value, plus 1 per 16 bytes of text) and the
/// depth of its nesting. `None` is a mark.
type Sim = Option<(u64, u32)>;

/// Walks the opcodes candle's reader accepts (pickle protocol 2, what torch.save writes) with the sizes of the
/// values they would make, without making them, and refuses a pickle whose live values would weigh more than
/// [`MAX_PICKLE_VALUES`] or nest deeper than [`MAX_PICKLE_DEPTH`]: memoized values are copied on every use, so
/// a few hundred bytes could otherwise ask for terabytes, and deep nesting would overflow the stack when the
/// values are dropped.
fn check_pickle(bytes: &[u8]) -> std::result::Result<(), String> {
    let mut stack: Vec<Sim> = Vec::new();
    let mut memo: HashMap<u32, (u64, u32)> = HashMap::new();
    let (mut live, mut memo_weight) = (0u64, 0u64);
    let mut at = 0usize;
    let take = |at: &mut usize, n: usize| -> std::result::Result<&[u8], String> {
        let end = at
            .checked_add(n)
            .filter(|&end| end <= bytes.len())
            .ok_or("it ends mid-opcode")?;
        let out = &bytes[*at..end];
        *at = end;
        Ok(out)
    };
    let u32_at = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let pop = |stack: &mut Vec<Sim>, live: &mut u64| -> std::result::Result<(u64, u32), String> {
        match stack.pop() {
            Some(Some(value)) => {
                *live -= value.0;
                Ok(value)
            }
            _ => Err("an opcode finds no value where it needs one".into()),
        }
    };
    let pop_to_mark =
        |stack: &mut Vec<Sim>, live: &mut u64| -> std::result::Result<(u64, u32), String> {
            let (mut weight, mut depth) = (0u64, 0u32);
            loop {
                match stack.pop() {
                    Some(Some((w, d))) => {
                        *live -= w;
                        weight += w;
                        depth = depth.max(d);
                    }
                    Some(None) => return Ok((weight, depth)),
                    None => return Err("an opcode finds no mark".into()),
                }
            }
        };
    // Adds `value` into the value below it on the stack (APPEND, SETITEM and the like).
    let merge_below =
        |stack: &mut Vec<Sim>, live: &mut u64, (w, d): (u64, u32)| match stack.last_mut() {
            Some(Some(target)) => {
                target.0 += w;
                target.1 = target.1.max(d + 1);
                *live += w;
                Ok(target.1)
            }
            _ => Err("an opcode finds no container"),
        };
    let too_large = || "its values would grow far past a state dict's".to_string();
    loop {
        let op = *take(&mut at, 1)?.first().unwrap_or(&0);
        let push = match op {
            0x80 => {
                take(&mut at, 1)?;
                None
            }
            b'.' => return Ok(()),
            b'c' => {
                let mut text = 0;
                for _ in 0..2 {
                    let line = bytes[at..]
                        .iter()
                        .position(|&b| b == b'\n')
                        .ok_or("a name without its end")?;
                    text += line;
                    at += line + 1;
                }
                Some((1 + text as u64 / 16, 1))
            }
            b'X' => {
                let len = u32_at(take(&mut at, 4)?) as usize;
                take(&mut at, len)?;
                Some((1 + len as u64 / 16, 1))
            }
            0x8a => {
                let len = take(&mut at, 1)?[0] as usize;
                take(&mut at, len)?;
                Some((1, 1))
            }
            b'J' | b'K' | b'M' | b'G' => {
                take(
                    &mut at,
                    match op {
                        b'J' => 4,
                        b'K' => 1,
                        b'M' => 2,
                        _ => 8,
                    },
                )?;
                Some((1, 1))
            }
            b')' | b']' | b'}' | b'd' | b'N' | 0x88 | 0x89 => Some((1, 1)),
            b'(' => {
                stack.push(None);
                continue;
            }
            b'q' | b'r' => {
                let index = if op == b'q' {
                    u32::from(take(&mut at, 1)?[0])
                } else {
                    u32_at(take(&mut at, 4)?)
                };
                let top = match stack.last() {
                    Some(Some(top)) => *top,
                    _ => return Err("a memo entry of nothing".into()),
                };
                memo_weight += top.0;
                if let Some(old) = memo.insert(index, top) {
                    memo_weight -= old.0;
                }
                None
            }
            b'h' | b'j' => {
                let index = if op == b'h' {
                    u32::from(take(&mut at, 1)?[0])
                } else {
                    u32_at(take(&mut at, 4)?)
                };
                Some(
                    *memo
                        .get(&index)
                        .ok_or("a memo entry that was never stored")?,
                )
            }
            b't' => {
                let (w, d) = pop_to_mark(&mut stack, &mut live)?;
                Some((w + 1, d + 1))
            }
            0x85..=0x87 => {
                let (mut w, mut d) = (1u64, 0u32);
                for _ in 0..(op - 0x84) {
                    let (vw, vd) = pop(&mut stack, &mut live)?;
                    w += vw;
                    d = d.max(vd);
                }
                Some((w, d + 1))
            }
            b'R' | b'b' | 0x81 => {
                let (aw, ad) = pop(&mut stack, &mut live)?;
                let (bw, bd) = pop(&mut stack, &mut live)?;
                Some((aw + bw + 1, ad.max(bd) + 1))
            }
            b'Q' => {
                let (w, d) = pop(&mut stack, &mut live)?;
                Some((w + 1, d + 1))
            }
            b'a' | b's' | b'e' | b'u' => {
                let items = match op {
                    b'a' => pop(&mut stack, &mut live)?,
                    b's' => {
                        let (vw, vd) = pop(&mut stack, &mut live)?;
                        let (kw, kd) = pop(&mut stack, &mut live)?;
                        (vw + kw, vd.max(kd))
                    }
                    _ => pop_to_mark(&mut stack, &mut live)?,
                };
                if merge_below(&mut stack, &mut live, items)? > MAX_PICKLE_DEPTH {
                    return Err(too_large());
                }
                None
            }
            other => {
                return Err(format!(
                    "opcode {other:#04x}, which no torch.save state dict uses"
                ))
            }
        };
        if let Some(value) = push {
            if value.1 > MAX_PICKLE_DEPTH {
                return Err(too_large());
            }
            live += value.0;
            stack.push(Some(value));
        }
        if live + memo_weight > MAX_PICKLE_VALUES {
            return Err(too_large());
        }
    }
}

/// A short description of a pickled value, for messages (the value itself may be huge).
fn kind(object: &Object) -> &'static str {
    match object {
        Object::Class { .. } => "a class",
        Object::Int(_) | Object::Long(_) => "an integer",
        Object::Float(_) => "a float",
        Object::Unicode(_) => "a string",
        Object::Bool(_) => "a bool",
        Object::None => "None",
        Object::Tuple(_) => "a tuple",
        Object::List(_) => "a list",
        Object::Mark => "a mark",
        Object::Dict(_) => "a dict",
        Object::Reduce { .. } | Object::Build { .. } => "an object",
        Object::PersistentLoad(_) => "a storage",
    }
}

/// A candle error's first line, clipped: with `RUST_BACKTRACE` set candle appends a backtrace, which belongs in
/// no message.
fn candle_message(error: &candle_core::Error) -> String {
    clip(error.to_string().lines().next().unwrap_or_default())
}

/// `text` cut to [`MAX_MESSAGE`] characters: names and errors built from the file's own content.
fn clip(text: &str) -> String {
    match text.char_indices().nth(MAX_MESSAGE) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(module_name: &str, class_name: &str) -> Object {
        Object::Class {
            module_name: module_name.into(),
            class_name: class_name.into(),
        }
    }

    fn ints(values: &[i64]) -> Object {
        Object::Tuple(values.iter().map(|&v| Object::Long(v)).collect())
    }

    /// `_rebuild_tensor_v2(storage, offset, size, stride, False, {})` over a float32 storage of `numel`.
    fn rebuild(numel: i64, offset: i64, size: &[i64], stride: &[i64]) -> Object {
        let storage = Object::PersistentLoad(Box::new(Object::Tuple(vec![
            Object::Unicode("storage".into()),
            class("torch", "FloatStorage"),
            Object::Unicode("0".into()),
            Object::Unicode("cpu".into()),
            Object::Long(numel),
        ])));
        Object::Reduce {
            callable: Box::new(class("torch._utils", "_rebuild_tensor_v2")),
            args: Box::new(Object::Tuple(vec![
                storage,
                Object::Long(offset),
                ints(size),
                ints(stride),
                Object::Bool(false),
                Object::Dict(vec![]),
            ])),
        }
    }

    fn stored(
        numel: i64,
        offset: i64,
        size: &[i64],
        stride: &[i64],
    ) -> std::result::Result<StoredTensor, String> {
        stored_tensor("w", rebuild(numel, offset, size, stride), "archive/data")
            .map(|info| info.expect("a tensor rebuild call"))
    }

    #[test]
    fn views_within_their_storage_are_taken() {
        let info = stored(6, 0, &[2, 3], &[3, 1]).unwrap();
        assert_eq!(info.layout.dims(), &[2, 3]);
        assert_eq!(info.storage_bytes, 24);
        assert_eq!(info.path, "archive/data/0");
        // torch bounds an empty view by nothing: any offset and stride.
        for (offset, size, stride) in [
            (1 << 62, &[0][..], &[1][..]),
            (i64::MAX, &[0, 5][..], &[i64::MAX, i64::MAX][..]),
            (0, &[i64::MAX, 0][..], &[1, 1][..]),
        ] {
            let info = stored(0, offset, size, stride).unwrap();
            assert_eq!(info.layout.shape().elem_count(), 0);
        }
    }

    #[test]
    fn extreme_views_are_errors_not_overflows() {
        let cases: [(i64, i64, &[i64], &[i64]); 7] = [
            // Offsets near 2**63 of a non-empty view: past the storage, or overflowing its bytes.
            (6, i64::MAX, &[1], &[1]),
            (i64::MAX, i64::MAX - 1, &[2], &[1]),
            (i64::MAX, 1 << 62, &[1], &[1]),
            // Huge strides and sizes.
            (6, 0, &[2], &[i64::MAX]),
            (6, 0, &[i64::MAX, 2], &[1, i64::MAX]),
            (i64::MAX, 0, &[1 << 62], &[0]),
            (6, 0, &[3, 3], &[3, 1]),
        ];
        for (numel, offset, size, stride) in cases {
            let err = stored(numel, offset, size, stride).map(|_| ()).unwrap_err();
            assert!(
                err.contains("corrupt"),
                "{numel} {offset} {size:?} {stride:?}: {err}"
            );
        }
        for (numel, offset) in [(-1, 0), (6, -1)] {
            let err = stored(numel, offset, &[1], &[1]).map(|_| ()).unwrap_err();
            assert!(err.contains("not a non-negative integer"), "{err}");
        }
    }

    #[test]
    fn long_sizes_make_short_messages() {
        let size = vec![2; 1_000_000];
        let err = stored(6, 0, &size, &size).map(|_| ()).unwrap_err();
        assert!(err.len() < 2 * MAX_MESSAGE, "{} bytes", err.len());
    }
}
