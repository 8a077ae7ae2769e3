"""transformers' Auto classes that load Florence-2 checkpoints, so scripts written against them run unchanged.

Microsoft's model cards load with `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`;
transformers 5 maps Florence-2 to `AutoModelForImageTextToText` and `AutoModel` (the model without LM head).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .modeling import Florence2ForConditionalGeneration, Florence2Model

__all__ = ["AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText"]


class _AutoLoader:
    """Base of the Auto classes: `from_pretrained` loads `_model_class`; they are never instantiated."""

    _model_class: type

    def __init__(self) -> None:
        raise OSError(f"{type(self).__name__} is designed to be instantiated with `from_pretrained(...)`")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *model_args: Any, **kwargs: Any) -> Any:
        """Loads a Florence-2 checkpoint (folder or Hub id, either layout) into the mapped class.

        Args:
            pretrained_model_name_or_path: a checkpoint folder or a Hub id.
            *model_args, **kwargs: as `Florence2ForConditionalGeneration.from_pretrained`.

        Returns:
            The loaded model.
        """
        return cls._model_class.from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)


class AutoModelForImageTextToText(_AutoLoader):
    """Loads `Florence2ForConditionalGeneration` (transformers 5's mapping for Florence-2)."""

    _model_class = Florence2ForConditionalGeneration


class AutoModelForCausalLM(_AutoLoader):
    """Loads `Florence2ForConditionalGeneration`, as Microsoft's remote code did for this Auto class."""

    _model_class = Florence2ForConditionalGeneration


class AutoModel(_AutoLoader):
    """Loads `Florence2Model` (no LM head), as transformers' `AutoModel` does for Florence-2."""

    _model_class = Florence2Model
