//! Weight files read in place: one safetensors file with its header checked against the file ([`Shard`]),
//! and the positional reads it and the PyTorch archive reader ([`super::pytorch`]) use.
//!
//! The files are not memory-mapped: each tensor is read (`pread`) straight into the buffer that becomes its
//! storage. A mapping would copy every tensor out of the page cache anyway, and the mapped pages count in the
//! process's RSS until the file is closed, so peak memory would be twice the weights.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::safetensors::Load;
use candle_core::{Device, Tensor, WithDType};
use safetensors::tensor::{Metadata, TensorInfo, TensorView};
use safetensors::{Dtype, SafeTensorError};

/// One open safetensors file and its parsed header.
pub(super) struct Shard {
    path: PathBuf,
    file: File,
    /// File offset of the data section (the header's `data_offsets` count from here).
    data_start: u64,
    pub(super) metadata: Metadata,
}

impl Shard {
    /// Opens `path` and validates its header against the file size, so that a truncated file fails here
    /// and not halfway through loading.
    pub(super) fn open(path: &Path) -> std::result::Result<Self, String> {
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
    pub(super) fn read(&self, info: &TensorInfo, device: &Device) -> candle_core::Result<Tensor> {
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
pub(super) fn byte_len(info: &TensorInfo) -> candle_core::Result<usize> {
    let (start, end) = info.data_offsets;
    end.checked_sub(start).ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "data_offsets [{start}, {end}] end before they start"
        ))
    })
}

/// Whether `read_exact_at` leaves the file cursor alone, so that threads may read one file at once.
pub(super) const POSITIONAL_READS: bool = cfg!(any(unix, windows));

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
