"""PEFT LoRA adapters on a loaded model: transformers' `PeftAdapterMixin` surface (`load_adapter`,
`set_adapter`, `disable_adapters`, `enable_adapters`, `active_adapters`, `delete_adapter`).

The active adapter is merged into the weights when the model loads them (in Rust, `io::adapter`), so a call costs
what it costs without one; switching adapters, or turning them off, reloads the weights with the new choice.
Adapters are for inference: training (`add_adapter`, `is_trainable=True`) stays with transformers and peft.

A model and its views (`model.model`, `model.vision_tower`, `model.model.vision_tower`) hold one `LoadedWeights`
by reference: the weights, their device and quantization, the adapter registry and choice, and the lock. A change
made through any of them (these methods, the model's `to()` and its shorthands) is a change of all, as torch's
submodules share their parents' parameters.

Threads may share a model: every change of the adapter choice or of the weights runs under that lock and installs
the new choice only with the weights loaded for it, so that the registry and the weights always agree. A call
already running keeps the weights it started with: each call reads `LoadedWeights.native` once.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

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


class LoadedWeights:
    """The weights a model and its views run, and what they were loaded with: one object per loaded model, held
    by reference by the model and each of its views.

    Invariant (under `lock`): `native` holds the weights on `device`, quantized as `quantize` says ("int8",
    "int4" or None), with the adapter folder `merged` merged, which is `adapters[active]` when `enabled` and an
    adapter is active, else None.
    """

    def __init__(self, native: Any, device: str, quantize: str | None) -> None:
        self.native = native
        self.device = device
        self.quantize = quantize
        self.adapters: dict[str, Path] = {}
        self.active: str | None = None
        self.enabled = True
        self.merged: Path | None = None
        # Reentrant: PeftModel.load_adapter holds it across load_adapter and set_adapter.
        self.lock = threading.RLock()


class PeftAdapterMixin:
    """transformers' `PeftAdapterMixin` for LoRA adapters (inference only). Expects the model to hold its
    `LoadedWeights` as `_state` (its views hold the same object) and to load weights with an adapter merged
    through `_load_weights(state, adapter)`, which the mixin calls under `state.lock`."""

    _state: LoadedWeights
    _load_weights: Callable[[LoadedWeights, Path | None], Any]

    def _register_adapter(self, name: str, folder: Path) -> None:
        """Records `folder` as the active adapter `name` of weights already loaded with it."""
        state = self._state
        with state.lock:
            state.adapters[name] = folder
            state.active = name
            state.merged = folder

    @staticmethod
    def _require_adapters(state: LoadedWeights) -> None:
        if not state.adapters:
            raise ValueError("No adapter loaded. Please load an adapter first.")

    @classmethod
    def _named(cls, state: LoadedWeights, adapter_names: str | list[str]) -> tuple[list[str], list[str]]:
        """(names, missing): `adapter_names` as a list, and those of them not loaded. The caller holds
        `state.lock`.

        Raises:
            ValueError: no adapter is loaded.
        """
        cls._require_adapters(state)
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        return names, [n for n in names if n not in state.adapters]

    def _adapter_to_load(self, peft_model_id: str | Path, adapter_name: str | None, is_trainable: bool,
                         peft_config: Any, adapter_state_dict: Any, kwargs: dict) -> tuple[str, Path]:
        """The checks of `load_adapter` that need no lock and the adapter's local folder (downloaded if it is a
        Hub id): (name, folder). The name is checked again when the adapter is installed.

        Raises:
            ValueError: as `load_adapter`.
        """
        if is_trainable:
            raise ValueError("is_trainable=True: florence2-rs runs adapters for inference; train with peft and "
                             "load the saved adapter folder here")
        if peft_config is not None or adapter_state_dict is not None:
            raise ValueError("peft_config= / adapter_state_dict= are not supported; save the adapter with "
                             "save_pretrained and pass its folder")
        name = "default" if adapter_name is None else adapter_name
        hub_kwargs = {k: v for k, v in kwargs.items() if k != "adapter_kwargs"}
        hub_kwargs.update(kwargs.get("adapter_kwargs") or {})
        state = self._state
        with state.lock:
            self._check_new_name(state, name)
        folder = resolve_adapter(peft_model_id, **hub_kwargs)
        if folder is None:
            raise ValueError(f"adapter model file not found in {peft_model_id}. Make sure you are passing the "
                             "correct path to the adapter model.")
        return name, folder

    def _install_adapter(self, name: str, folder: Path) -> None:
        """Loads the weights with the adapter `folder` merged and makes it the active adapter `name`."""
        state = self._state
        with state.lock:
            self._check_new_name(state, name)
            self._change(state, name, state.enabled, add={name: folder})

    def load_adapter(self, peft_model_id: str | Path, adapter_name: str | None = None, *,
                     is_trainable: bool = False, peft_config: Any = None, adapter_state_dict: Any = None,
                     **kwargs: Any) -> None:
        """Loads a PEFT LoRA adapter (a folder or Hub id holding adapter_config.json and
        adapter_model.safetensors) under `adapter_name` ("default") and makes it the active one, as
        transformers does; `set_adapter` switches back. The download runs before the model's lock is taken.

        Raises:
            ValueError: the name is taken, or training / in-memory adapters were asked for.
            OSError: the adapter cannot be read, uses a PEFT method or option that is not supported, or does
                not fit the model.
        """
        name, folder = self._adapter_to_load(peft_model_id, adapter_name, is_trainable, peft_config,
                                             adapter_state_dict, kwargs)
        self._install_adapter(name, folder)

    @staticmethod
    def _check_new_name(state: LoadedWeights, name: str) -> None:
        if name in state.adapters:
            raise ValueError(f"Adapter with name {name} already exists. Please use a different name.")

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Makes `adapter_name` the active adapter (and turns adapters on)."""
        state = self._state
        with state.lock:
            names, missing = self._named(state, adapter_name)
            if missing:
                raise ValueError(f"Following adapter(s) could not be found: {', '.join(missing)}. Make sure you "
                                 f"are passing the correct adapter name(s). current loaded adapters are: "
                                 f"{list(state.adapters)}")
            if len(names) != 1:
                raise ValueError("florence2-rs runs one adapter at a time; pass a single adapter name")
            self._change(state, names[0], state.enabled)

    def disable_adapters(self) -> None:
        """Runs the base model's own weights until `enable_adapters()`."""
        state = self._state
        with state.lock:
            self._require_adapters(state)
            self._change(state, state.active, False)

    def enable_adapters(self) -> None:
        """Runs the active adapter again after `disable_adapters()`."""
        state = self._state
        with state.lock:
            self._require_adapters(state)
            self._change(state, state.active, True)

    def active_adapters(self) -> list[str]:
        """The active adapter's name, in a list as transformers returns it."""
        state = self._state
        with state.lock:
            self._require_adapters(state)
            return [state.active] if state.active is not None else []

    def delete_adapter(self, adapter_names: str | list[str]) -> None:
        """Forgets adapters; deleting the active one leaves the base model's weights."""
        state = self._state
        with state.lock:
            names, missing = self._named(state, adapter_names)
            if missing:
                raise ValueError(f"The following adapter(s) are not present and cannot be deleted: "
                                 f"{', '.join(missing)}")
            left = [n for n in state.adapters if n not in names]
            # With no adapter left, the next one loaded runs (transformers forgets the disabled state with them).
            enabled = state.enabled or not left
            active = state.active if state.active not in names else next(iter(left), None)
            self._change(state, active, enabled, remove=names)

    def add_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Not supported: new (untrained) adapters are for training, which stays with transformers and peft."""
        raise NotImplementedError("add_adapter creates an adapter to train; train with transformers and peft, "
                                  "save it with save_pretrained, and load the folder with load_adapter")

    def _change(self, state: LoadedWeights, active: str | None, enabled: bool, add: dict[str, Path] | None = None,
                remove: Sequence[str] = ()) -> None:
        """Changes the registry (`add`, `remove`) and the choice (`active`, `enabled`) together with the weights.

        The weights for the new choice load first; only then do they and the registry change, so that a load that
        fails changes nothing. The caller holds `state.lock`."""
        registry = {**{k: v for k, v in state.adapters.items() if k not in remove}, **(add or {})}
        folder = registry[active] if active is not None and enabled else None
        if folder != state.merged:
            state.native = self._load_weights(state, folder)
            state.merged = folder
        state.adapters = registry
        state.active, state.enabled = active, enabled
