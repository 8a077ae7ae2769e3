"""The part of peft's `PeftModel` that inference scripts use, over a florence2_rs model.

    from florence2_rs.peft import PeftModel          # was: from peft import PeftModel
    model = PeftModel.from_pretrained(base_model, "path/to/adapter")
    model.generate(...)

The adapter is merged into the weights as they load (see `florence2_rs.adapters`), so `merge_and_unload()`
returns the model as it is. Everything else is the wrapped model's.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


class PeftModel:
    """A florence2_rs model with a LoRA adapter, shaped like peft's `PeftModel` for inference."""

    def __init__(self, model: Any) -> None:
        self.base_model = model

    @classmethod
    def from_pretrained(cls, model: Any, model_id: str | Path, adapter_name: str = "default",
                        is_trainable: bool = False, **kwargs: Any) -> "PeftModel":
        """Loads the adapter `model_id` (a folder or Hub id) onto `model` (a florence2_rs model)."""
        if not hasattr(model, "load_adapter"):
            raise TypeError("PeftModel.from_pretrained takes a florence2_rs model "
                            f"(got {type(model).__name__})")
        if kwargs.pop("config", None) is not None:
            raise ValueError("config= is not supported: the adapter's own adapter_config.json is used")
        model.load_adapter(model_id, adapter_name=adapter_name, is_trainable=is_trainable, **kwargs)
        return cls(model)

    def load_adapter(self, model_id: str | Path, adapter_name: str, is_trainable: bool = False,
                     **kwargs: Any) -> None:
        """Loads another adapter under `adapter_name`, keeping the active one, as peft does; `set_adapter`
        switches. The adapter is found (downloaded from the Hub if need be) first; then the model's adapter lock
        is held across loading it and switching back, so that other threads never see the new adapter active.

        Raises:
            ValueError, OSError: as the model's `load_adapter`.
        """
        model = self.base_model
        name, folder = model._adapter_to_load(model_id, adapter_name, is_trainable, kwargs.pop("peft_config", None),
                                              kwargs.pop("adapter_state_dict", None), kwargs)
        with model._state.lock:
            active = self.active_adapter
            model._install_adapter(name, folder)
            model.set_adapter(active)

    def set_adapter(self, adapter_name: str) -> None:
        self.base_model.set_adapter(adapter_name)

    @property
    def active_adapter(self) -> str:
        return self.base_model.active_adapters()[0]

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters()

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Runs the base model's own weights inside the `with` block."""
        self.base_model.disable_adapters()
        try:
            yield
        finally:
            self.base_model.enable_adapters()

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> Any:
        """The model with the adapter merged (it already is)."""
        return self.base_model

    def get_base_model(self) -> Any:
        return self.base_model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "base_model":  # not set yet (copy, unpickling): no recursion through __getattr__
            raise AttributeError(name)
        return getattr(self.base_model, name)
