//! PyTorch checkpoints (`pytorch_model.bin`): the zip archive `torch.save` writes, whose `<root>/data.pkl`
//! pickles the state dict and whose `<root>/data/<key>` entries hold the tensors' storages.
//!
//! No pickle code runs: candle's pickle reader interprets the opcodes into plain values (a class reference is
//! a name, a call is a record of it), and only a dict from names to tensors that torch rebuilds with
//! `_rebuild_tensor_v2` (or `_rebuild_parameter` around it) is accepted; anything else in the file is an error
//! that names it. candle's reader trusts its input (it clones memoized values and nests without bound), so
//! [`check_pickle`] first walks the opcodes and refuses a pickle whose values would grow past a state dict's
//! size or depth; the reader then runs under `catch_unwind`. Storages are read in place (positional reads of the
//! uncompressed entries), each view once, after its size is checked against the archive.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use candle_core::pickle::{Object, Stack, TensorInfo};
use candle_core::{DType, Device, Tensor};

use super::checkpoint::read_exact_at;
use crate::error::panic_message;
use crate::limits::check_alloc;
use crate::{Error, Result};

/// The weights file of an older checkpoint folder, read when it has no safetensors weights.
pub const PYTORCH_WEIGHTS: &str = "pytorch_model.bin";

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

/// The dtype of the first floating tensor of the checkpoint at `path` (in name order), from its pickle alone.
pub fn stored_float_dtype(path: &Path) -> Result<Option<DType>> {
    let mut infos = ArchiveReader::open(path)?.tensor_infos()?;
    infos.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(infos.into_iter().map(|i| i.dtype).find(|d| d.is_float()))
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
    fn tensor_infos(&mut self) -> Result<Vec<TensorInfo>> {
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
        let dir = PathBuf::from(format!("{root}data"));
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
            let not_plain = || {
                format!(
                    "`{}` is not a plain tensor; save the state dict of tensors only",
                    clip(&name)
                )
            };
            let info = catch_unwind(AssertUnwindSafe(|| {
                value.into_tensor_info(Object::Unicode(name.clone()), &dir)
            }))
            .map_err(|_| bad(not_plain()))?
            .map_err(|e| bad(format!("`{}`: {}", clip(&name), clip(&e.to_string()))))?
            .ok_or_else(|| bad(not_plain()))?;
            infos.push(info);
        }
        Ok(infos)
    }

    /// Reads the tensor `info` describes; `total` counts the bytes read so far, which the archive bounds.
    fn read_tensor(&mut self, info: &TensorInfo, total: &mut u128) -> Result<Tensor> {
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
        let start = layout.start_offset() as u64;
        let len = (layout.shape().elem_count() as u64)
            .checked_mul(info.dtype.size_in_bytes() as u64)
            .ok_or_else(|| bad(format!("`{name}`: shape {:?} overflows", layout.dims())))?;
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
        tensor.map_err(|e| bad(format!("`{name}`: {e}")))
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
            clip(&e.to_string())
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

/// `text` cut to [`MAX_MESSAGE`] characters: names and errors built from the file's own content.
fn clip(text: &str) -> String {
    match text.char_indices().nth(MAX_MESSAGE) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_string(),
    }
}
