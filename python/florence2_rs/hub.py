"""Where checkpoints come from: a local folder, or a Hugging Face Hub id resolved into the standard cache.

Hub downloads run in Rust (`florence2_rs._native.hub_download`, on hf-hub) into the cache that transformers and
huggingface_hub share (`HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`), so a model either
of them downloaded is not downloaded again. `HF_ENDPOINT`, `HF_TOKEN` and `HF_HUB_OFFLINE` are honoured.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Iterable

from . import _native

#: In `files`, the model weights: model.safetensors, or model.safetensors.index.json and every shard it lists,
#: or else pytorch_model.bin.
WEIGHTS: str = _native.WEIGHTS
WEIGHTS_INDEX: str = _native.WEIGHTS_INDEX
PYTORCH_WEIGHTS: str = _native.PYTORCH_WEIGHTS


def resolve_checkpoint(
    name_or_path: str | Path,
    files: Iterable[str] = (),
    optional_files: Iterable[str] = (),
    **hub_kwargs: Any,
) -> Path:
    """Returns a local folder holding `files` (and `optional_files` where they exist).

    A local folder is used as it is. Anything else is taken as a Hub repository id and resolved into the
    Hugging Face cache, downloading only what the cache lacks.

    Args:
        name_or_path: a checkpoint folder, or a Hub id such as "microsoft/Florence-2-base".
        files: files that must be there; "model.safetensors" also accepts sharded safetensors weights and,
            where there are no safetensors, pytorch_model.bin.
        optional_files: files used where the checkpoint has them (generation_config.json ...).
        **hub_kwargs: transformers' `from_pretrained` keywords for the Hub: revision, token (a string, or
            False to send none; use_auth_token is its old name), cache_dir, local_files_only,
            force_download. Keywords that do not concern the Hub are ignored, as the callers pass theirs on.

    Returns:
        The folder: the local one, or the cache's `snapshots/{commit}` folder.

    Raises:
        OSError: a required file is missing (FileNotFoundError), or the download failed.
    """
    files, optional_files = list(files), list(optional_files)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        for name in files:
            if not _has_local(path, name):
                raise OSError(f"{path} has no {name}; is it a Florence-2 checkpoint folder?")
        return path
    if path.exists():
        raise OSError(f"{path} is a file; pass the checkpoint folder that holds it")
    return _native.hub_download(str(name_or_path), files, optional_files, **_native_kwargs(hub_kwargs))


def _has_local(folder: Path, name: str) -> bool:
    if name == WEIGHTS:
        # Sharded weights are complete only with every shard; the weights loader checks those and says which.
        return any((folder / name).is_file() for name in (WEIGHTS, WEIGHTS_INDEX, PYTORCH_WEIGHTS))
    return (folder / name).is_file()


def _native_kwargs(hub_kwargs: dict[str, Any]) -> dict[str, Any]:
    """transformers' Hub keywords, turned into those of `_native.hub_download`."""
    if hub_kwargs.get("subfolder"):
        raise ValueError("subfolder= is not supported yet; download the repository and pass the subfolder's path")
    if hub_kwargs.get("proxies"):
        warnings.warn("proxies= is ignored; set HTTPS_PROXY in the environment instead", stacklevel=4)
    token = hub_kwargs.get("token")
    if token is None:
        token = hub_kwargs.get("use_auth_token")
    cache_dir = hub_kwargs.get("cache_dir")
    return {
        "revision": hub_kwargs.get("revision"),
        "cache_dir": os.fspath(Path(cache_dir).expanduser()) if cache_dir is not None else None,
        # token=True means "the stored token", the default.
        "token": token if isinstance(token, str) else None,
        "anonymous": token is False,
        "local_files_only": bool(hub_kwargs.get("local_files_only", False)),
        "force_download": bool(hub_kwargs.get("force_download", False)),
    }
