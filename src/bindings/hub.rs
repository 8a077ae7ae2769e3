//! `hub_download`: the Hub half of `florence2_rs.hub.resolve_checkpoint`, with the GIL released while it
//! waits on the network.

use std::path::PathBuf;

use pyo3::prelude::*;

use super::errors::guarded;

use crate::io::hub::{self, Auth, HubOptions};

/// Makes sure the Hugging Face cache holds the files of a Hub repository and returns the snapshot folder.
///
/// Args:
///     repo_id: `org/name` on the Hub (`HF_ENDPOINT` picks another Hub).
///     files: required files; "model.safetensors" stands for the weights, single or sharded.
///     optional_files: files fetched where the repository has them, skipped where it does not.
///     revision: branch, tag or commit hash (default "main").
///     cache_dir: the hub cache folder; default `HF_HUB_CACHE`, else `$HF_HOME/hub`.
///     token: the token to send; default `HF_TOKEN`, else the token file `hf auth login` wrote.
///     anonymous: send no token at all (transformers' `token=False`).
///     local_files_only: use only the cache (as `HF_HUB_OFFLINE=1` does).
///     force_download: download again even where the cache has the files.
///
/// Returns:
///     pathlib.Path of `snapshots/{commit}` in the cache.
///
/// Raises:
///     FileNotFoundError: the repository, revision or a required file does not exist, or is not in the
///         cache in offline mode.
///     OSError: the download failed (network, permissions, an interrupted transfer: the next call resumes).
#[pyfunction]
#[pyo3(signature = (repo_id, files, optional_files, *, revision=None, cache_dir=None, token=None,
                    anonymous=false, local_files_only=false, force_download=false))]
#[allow(clippy::too_many_arguments)] // mirrors the keyword arguments of from_pretrained
fn hub_download(
    py: Python<'_>,
    repo_id: String,
    files: Vec<String>,
    optional_files: Vec<String>,
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
    };
    py.detach(move || {
        guarded("the Hub download", || {
            let files: Vec<&str> = files.iter().map(String::as_str).collect();
            let optional: Vec<&str> = optional_files.iter().map(String::as_str).collect();
            hub::download(&repo_id, &files, &optional, &options)
        })
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(hub_download, m)?)
}
