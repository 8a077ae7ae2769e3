//! `hub_download`: the Hub half of `florence2_rs.hub.resolve_checkpoint`, with the GIL released while it
//! waits on the network; `check_subfolder`: the rule for transformers' `subfolder`, for local folders and
//! Hub repositories alike.

use std::path::PathBuf;

use pyo3::prelude::*;

use super::errors::guarded;

use crate::io::hub::{self, Auth, HubOptions};

/// Makes sure the Hugging Face cache holds the files of a Hub repository and returns the snapshot folder.
///
/// Args:
///     repo_id: `org/name` on the Hub (`HF_ENDPOINT` picks another Hub).
///     files: required files; "model.safetensors" stands for the weights: model.safetensors, else its index
///         and every shard it lists, else pytorch_model.bin, else its index and shards.
///     optional_files: files fetched where the repository has them, skipped where it does not.
///     subfolder: the folder of the repository that holds the files (transformers' `subfolder`): the files
///         are `<subfolder>/<file>` in the repository, shards named relative to their index; default the
///         top level.
///     revision: branch, tag or commit hash (default "main").
///     cache_dir: the hub cache folder; default `HF_HUB_CACHE`, else `$HF_HOME/hub`.
///     token: the token to send; default `HF_TOKEN`, else the token file `hf auth login` wrote.
///     anonymous: send no token at all (transformers' `token=False`).
///     local_files_only: use only the cache (as `HF_HUB_OFFLINE=1` does).
///     force_download: download again even where the cache has the files.
///
/// Returns:
///     pathlib.Path of `snapshots/{commit}` in the cache (with `subfolder`, the folder below it).
///
/// Raises:
///     FileNotFoundError: the repository, revision or a required file does not exist, or is not in the
///         cache in offline mode.
///     OSError: the download failed (network, permissions, an interrupted transfer: the next call resumes).
///     ValueError: a revision or subfolder that leads out of the cache (see `check_subfolder`).
#[pyfunction]
#[pyo3(signature = (repo_id, files, optional_files, *, subfolder=None, revision=None, cache_dir=None,
                    token=None, anonymous=false, local_files_only=false, force_download=false))]
#[allow(clippy::too_many_arguments)] // mirrors the keyword arguments of from_pretrained
fn hub_download(
    py: Python<'_>,
    repo_id: String,
    files: Vec<String>,
    optional_files: Vec<String>,
    subfolder: Option<String>,
    revision: Option<String>,
    cache_dir: Option<PathBuf>,
    token: Option<String>,
    anonymous: bool,
    local_files_only: bool,
    force_download: bool,
) -> PyResult<PathBuf> {
    let auth = match (anonymous, token) {
        (true, _) => Auth::Anonymous,
        (false, Some(token)) => Auth::Token(token),
        (false, None) => Auth::FromEnvironment,
    };
    let options = HubOptions {
        revision,
        cache_dir,
        auth,
        local_files_only,
        force_download,
        subfolder,
    };
    py.detach(move || {
        guarded("the Hub download", || {
            let files: Vec<&str> = files.iter().map(String::as_str).collect();
            let optional: Vec<&str> = optional_files.iter().map(String::as_str).collect();
            hub::download(&repo_id, &files, &optional, &options)
        })
    })
}

/// transformers' `subfolder` as the `/`-separated path of a folder inside a checkpoint folder or Hub
/// repository ("" for its top level; empty and "." segments dropped).
///
/// Args:
///     subfolder: the `subfolder=` of `from_pretrained`.
///
/// Returns:
///     str: the path, such as "checkpoints/final".
///
/// Raises:
///     ValueError: a path that could lead out of the folder (absolute, with ".." segments, backslashes,
///         colons or NUL).
#[pyfunction]
fn check_subfolder(subfolder: &str) -> PyResult<String> {
    Ok(hub::check_subfolder(subfolder)?)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(hub_download, m)?)?;
    m.add_function(wrap_pyfunction!(check_subfolder, m)?)
}
