"""Where checkpoints come from: a local folder, or a Hugging Face Hub id resolved into the standard cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable


def resolve_checkpoint(
    name_or_path: str | Path,
    files: Iterable[str] = (),
    optional_files: Iterable[str] = (),
    **hub_kwargs: Any,
) -> Path:
    """Returns a local folder holding `files` (and `optional_files` where they exist).

    A local folder is used as it is. Anything else is taken as a Hub repository id.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        for name in files:
            if not (path / name).is_file():
                raise OSError(f"{path} has no {name}; is it a Florence-2 checkpoint folder?")
        return path
    if path.exists():
        raise OSError(f"{path} is a file; pass the checkpoint folder that holds it")
    raise OSError(
        f"{name_or_path!r} is not a local folder, and downloading from the Hugging Face Hub is not available in "
        "this build. Download the checkpoint (e.g. `huggingface-cli download microsoft/Florence-2-base`) and pass "
        "its folder."
    )
