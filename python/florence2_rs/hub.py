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
PYTORCH_WEIGHTS_INDEX: str = _native.PYTORCH_WEIGHTS_INDEX


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
            force_download; and subfolder, the folder inside the checkpoint folder or repository that holds
            the files (local: `<folder>/<subfolder>`; Hub: `<subfolder>/<file>` in the repository).
            Keywords that do not concern the Hub are ignored, as the callers pass theirs on.

    Returns:
        The folder: the local one, or the cache's `snapshots/{commit}` folder (with `subfolder`, the folder
        below it).

    Raises:
        OSError: a required file is missing (FileNotFoundError), or the download failed.
        ValueError: a subfolder that leads out of the checkpoint folder (`..`, an absolute path).
    """
    files, optional_files = list(files), list(optional_files)
    subfolder = _subfolder(hub_kwargs.get("subfolder"))
    path = local_folder(name_or_path, subfolder)
    if path is not None:
        for name in files:
            if not _has_local(path, name):
                raise OSError(f"{path} has no {name}; is it a Florence-2 checkpoint folder?")
        return path
    if Path(name_or_path).expanduser().exists():
        raise OSError(f"{name_or_path} is a file; pass the checkpoint folder that holds it")
    return _native.hub_download(str(name_or_path), files, optional_files, subfolder=subfolder,
                                **_native_kwargs(hub_kwargs))


def local_folder(name_or_path: str | Path, subfolder: Any = None) -> Path | None:
    """The local folder `name_or_path` names (with its `subfolder`), or None when it is no folder here (then
    it is a Hub id).

    Raises:
        OSError: the folder has no such subfolder. ValueError: a subfolder that leads out of the folder.
    """
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        return None
    inside = _subfolder(subfolder)
    if inside and not (path / inside).is_dir():
        raise OSError(f"{path} has no subfolder {inside}")
    return path / inside if inside else path


def _subfolder(subfolder: Any) -> str:
    """transformers' `subfolder` as a `/`-separated relative path ("" for none). It names a folder inside the
    checkpoint folder or repository; `_native.check_subfolder` refuses a path that could lead out of it
    (ValueError), the one check for local folders and Hub repositories."""
    if subfolder is None:
        return ""
    text = os.fspath(subfolder) if isinstance(subfolder, os.PathLike) else subfolder
    if not isinstance(text, str):
        raise TypeError(f"subfolder must be a string, not {type(subfolder).__name__}")
    return _native.check_subfolder(text)


def _has_local(folder: Path, name: str) -> bool:
    if name == WEIGHTS:
        # Sharded weights are complete only with every shard; the weights loader checks those and says which.
        return any((folder / name).is_file()
                   for name in (WEIGHTS, WEIGHTS_INDEX, PYTORCH_WEIGHTS, PYTORCH_WEIGHTS_INDEX))
    return (folder / name).is_file()


def _native_kwargs(hub_kwargs: dict[str, Any]) -> dict[str, Any]:
    """transformers' Hub keywords, turned into those of `_native.hub_download`."""
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
