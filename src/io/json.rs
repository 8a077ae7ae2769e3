//! Reading the JSON settings files of a checkpoint folder (config.json, generation_config.json, the
//! processor's files), with errors that name the file.

use std::path::Path;

use serde_json::Value;

use crate::{Error, Result};

/// The parsed content of `path`.
pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        msg: format!("not valid JSON: {e}"),
    })
}

/// [`read_json`] of a file that may be absent (`None`).
pub fn read_json_if_present(path: &Path) -> Result<Option<Value>> {
    if path.is_file() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}
