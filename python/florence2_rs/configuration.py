"""Configuration objects shaped like transformers' (attribute access over the config.json dicts)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from ._native import TEXT_CONFIG_DEFAULTS, checkpoint_layout
from .hub import resolve_checkpoint


class _AttrConfig:
    """A JSON object with attribute access; nested objects stay dicts unless a subclass wraps them."""

    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)

    def to_dict(self) -> dict:
        """The settings as plain JSON values (nested configs as dicts)."""
        out = {}
        for key, value in self.__dict__.items():
            out[key] = value.to_dict() if isinstance(value, _AttrConfig) else copy.deepcopy(value)
        return out

    def to_json_string(self) -> str:
        """The settings as indented JSON with sorted keys."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, type(self)) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"


class Florence2VisionConfig(_AttrConfig):
    """The DaViT vision tower's settings (transformers' `Florence2VisionConfig`)."""

    model_type = "florence_vision"


class Florence2TextConfig(_AttrConfig):
    """The BART language model's settings (transformers' `BartConfig` fields). A setting config.json leaves out
    reads as the default the model applies (BartConfig's, from the native module's `TEXT_CONFIG_DEFAULTS`), as
    transformers' `BartConfig` attributes do; `to_dict` keeps config.json's content."""

    model_type = "bart"

    def __getattr__(self, name: str) -> Any:
        # Called only for a name the instance and its class lack.
        if name in TEXT_CONFIG_DEFAULTS:
            return TEXT_CONFIG_DEFAULTS[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


class Florence2Config(_AttrConfig):
    """transformers' `Florence2Config`: `vision_config`, `text_config`, `image_token_id` and the rest of
    config.json. Microsoft's original config.json loads too; `layout` says which one it was ("hf" or
    "original", by the native rule `_native.checkpoint_layout` that the model and the processor read)."""

    model_type = "florence2"

    def __init__(self, text_config: dict | None = None, vision_config: dict | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.text_config = Florence2TextConfig(**(text_config or {}))
        self.vision_config = Florence2VisionConfig(**(vision_config or {}))
        # The rule reads only the two model types; the rest of a config may hold what JSON cannot (a torch dtype,
        # int keys), as transformers' configs may.
        self.layout = checkpoint_layout({
            name: {"model_type": getattr(getattr(self, name), "model_type", None)}
            for name in ("vision_config", "text_config")})

    def to_dict(self) -> dict:
        """config.json's content (without the `layout` this class adds)."""
        out = super().to_dict()
        out.pop("layout", None)
        return out

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> "Florence2Config":
        """Reads config.json from a checkpoint folder or a Hub id."""
        folder = resolve_checkpoint(pretrained_model_name_or_path, files=("config.json",), **kwargs)
        return cls.from_json_file(folder / "config.json")

    @classmethod
    def from_json_file(cls, path: str | Path) -> "Florence2Config":
        """Reads a config.json file.

        Args:
            path: the file.

        Returns:
            The config.

        Raises:
            OSError: the file is not a JSON object.
        """
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise OSError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise OSError(f"{path} must hold a JSON object")
        return cls(**data)


class GenerationConfig(_AttrConfig):
    """transformers' `GenerationConfig`: the generation defaults of a checkpoint. Values missing from
    generation_config.json come from the model config's text_config, as transformers does for Florence-2."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> "GenerationConfig":
        """Reads generation_config.json from a checkpoint folder or a Hub id (empty when the file is absent).

        Args:
            pretrained_model_name_or_path: a checkpoint folder or a Hub id.
            **kwargs: Hub keywords (revision, token, cache_dir, local_files_only, force_download).

        Returns:
            The generation config.
        """
        folder = resolve_checkpoint(pretrained_model_name_or_path, files=("config.json",),
                                    optional_files=("generation_config.json",), **kwargs)
        path = folder / "generation_config.json"
        return cls(**json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else cls()
