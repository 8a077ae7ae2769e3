"""PEFT LoRA adapters on a loaded model: transformers' `PeftAdapterMixin` surface (`load_adapter`,
`set_adapter`, `disable_adapters`, `enable_adapters`, `active_adapters`, `delete_adapter`).

The active adapter is merged into the weights when the model loads them (in Rust, `io::adapter`), so a call costs
what it costs without one; switching adapters, or turning them off, reloads the weights with the new choice.
Adapters are for inference: training (`add_adapter`, `is_trainable=True`) stays with transformers and peft.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import _native
from .hub import local_folder, resolve_checkpoint

ADAPTER_CONFIG: str = _native.ADAPTER_CONFIG
ADAPTER_WEIGHTS: tuple[str, ...] = (_native.ADAPTER_WEIGHTS, _native.ADAPTER_WEIGHTS_BIN)


def resolve_adapter(peft_model_id: str | Path, **hub_kwargs: Any) -> Path | None:
    """The local folder of the adapter `peft_model_id` (a folder or a Hub id, with transformers' Hub keywords
    such as `subfolder`), or None when it holds no adapter_config.json. Download failures other than a missing
    file are raised."""
    folder = local_folder(peft_model_id, hub_kwargs.get("subfolder"))
    if folder is not None:
        return folder if (folder / ADAPTER_CONFIG).is_file() else None
    try:
        return resolve_checkpoint(peft_model_id, files=(ADAPTER_CONFIG,), optional_files=ADAPTER_WEIGHTS,
                                  **hub_kwargs)
    except FileNotFoundError:
        return None


def adapter_base(folder: Path) -> str:
    """The base model an adapter folder names (`base_model_name_or_path` of its adapter_config.json)."""
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as err:
        raise OSError(f"{folder / ADAPTER_CONFIG}: cannot read it ({err})") from err
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not isinstance(base, str) or not base:
        raise OSError(f"{folder / ADAPTER_CONFIG} names no base_model_name_or_path; load the base model with "
                      "from_pretrained and add the adapter with model.load_adapter(folder)")
    return base


class PeftAdapterMixin:
    """transformers' `PeftAdapterMixin` for LoRA adapters (inference only). Expects the model to reload its
    weights through `_reload()` and to start with `_init_adapters()`."""

    def _init_adapters(self) -> None:
        self._adapters: dict[str, Path] = {}
        self._active_adapter: str | None = None
        self._adapters_enabled = True

    def _share_adapters(self, other: "PeftAdapterMixin") -> None:
        """Takes `other`'s adapter choice (a view over the same weights)."""
        self._adapters = other._adapters
        self._active_adapter, self._adapters_enabled = other._active_adapter, other._adapters_enabled

    def _register_adapter(self, name: str, folder: Path) -> None:
        """Records `folder` as the active adapter `name` of weights already loaded with it."""
        self._adapters[name] = folder
        self._active_adapter = name

    def _adapter_folder(self) -> Path | None:
        """The adapter the weights are loaded with: the active one, unless adapters are disabled."""
        if self._active_adapter is None or not self._adapters_enabled:
            return None
        return self._adapters[self._active_adapter]

    def _require_adapters(self) -> None:
        if not self._adapters:
            raise ValueError("No adapter loaded. Please load an adapter first.")

    def load_adapter(self, peft_model_id: str | Path, adapter_name: str | None = None, *,
                     is_trainable: bool = False, peft_config: Any = None, adapter_state_dict: Any = None,
                     **kwargs: Any) -> None:
        """Loads a PEFT LoRA adapter (a folder or Hub id holding adapter_config.json and
        adapter_model.safetensors) under `adapter_name` ("default") and makes it the active one, as
        transformers does; `set_adapter` switches back.

        Raises:
            ValueError: the name is taken, or training / in-memory adapters were asked for.
            OSError: the adapter cannot be read, uses a PEFT method or option that is not supported, or does
                not fit the model.
        """
        if is_trainable:
            raise ValueError("is_trainable=True: florence2-rs runs adapters for inference; train with peft and "
                             "load the saved adapter folder here")
        if peft_config is not None or adapter_state_dict is not None:
            raise ValueError("peft_config= / adapter_state_dict= are not supported; save the adapter with "
                             "save_pretrained and pass its folder")
        name = "default" if adapter_name is None else adapter_name
        if name in self._adapters:
            raise ValueError(f"Adapter with name {name} already exists. Please use a different name.")
        hub_kwargs = {k: v for k, v in kwargs.items() if k != "adapter_kwargs"}
        hub_kwargs.update(kwargs.get("adapter_kwargs") or {})
        folder = resolve_adapter(peft_model_id, **hub_kwargs)
        if folder is None:
            raise ValueError(f"adapter model file not found in {peft_model_id}. Make sure you are passing the "
                             "correct path to the adapter model.")
        previous = (dict(self._adapters), self._active_adapter)
        self._adapters[name] = folder
        self._active_adapter = name
        try:
            self._reload()
        except BaseException:
            self._adapters, self._active_adapter = previous
            raise

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Makes `adapter_name` the active adapter (and turns adapters on)."""
        self._require_adapters()
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        missing = [n for n in names if n not in self._adapters]
        if missing:
            raise ValueError(f"Following adapter(s) could not be found: {', '.join(missing)}. Make sure you are "
                             f"passing the correct adapter name(s). current loaded adapters are: "
                             f"{list(self._adapters)}")
        if len(names) != 1:
            raise ValueError("florence2-rs runs one adapter at a time; pass a single adapter name")
        self._switch(names[0], self._adapters_enabled)

    def disable_adapters(self) -> None:
        """Runs the base model's own weights until `enable_adapters()`."""
        self._require_adapters()
        self._switch(self._active_adapter, False)

    def enable_adapters(self) -> None:
        """Runs the active adapter again after `disable_adapters()`."""
        self._require_adapters()
        self._switch(self._active_adapter, True)

    def active_adapters(self) -> list[str]:
        """The active adapter's name, in a list as transformers returns it."""
        self._require_adapters()
        return [self._active_adapter] if self._active_adapter is not None else []

    def delete_adapter(self, adapter_names: str | list[str]) -> None:
        """Forgets adapters; deleting the active one leaves the base model's weights."""
        self._require_adapters()
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        missing = [n for n in names if n not in self._adapters]
        if missing:
            raise ValueError(f"The following adapter(s) are not present and cannot be deleted: {', '.join(missing)}")
        for name in names:
            del self._adapters[name]
        # With no adapter left, the next one loaded runs (transformers forgets the disabled state with them).
        enabled = self._adapters_enabled or not self._adapters
        active = self._active_adapter if self._active_adapter not in names else next(iter(self._adapters), None)
        self._switch(active, enabled)

    def add_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Not supported: new (untrained) adapters are for training, which stays with transformers and peft."""
        raise NotImplementedError("add_adapter creates an adapter to train; train with transformers and peft, "
                                  "save it with save_pretrained, and load the folder with load_adapter")

    def _switch(self, active: str | None, enabled: bool) -> None:
        before = (self._active_adapter, self._adapters_enabled)
        if (active, enabled) == before:
            return
        self._active_adapter, self._adapters_enabled = active, enabled
        try:
            self._reload()
        except BaseException:
            self._active_adapter, self._adapters_enabled = before
            raise

