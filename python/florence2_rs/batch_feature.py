"""`BatchFeature`: the dict of model inputs a processor returns, shaped like transformers' class."""

from __future__ import annotations

from collections import UserDict
from typing import Any

import numpy as np

from ._tensors import dtype_name, is_dtype_like

__all__ = ["BatchFeature"]


def _torch():
    try:
        import torch
    except ImportError as err:  # torch is optional at runtime
        raise ImportError(
            "return_tensors='pt' needs PyTorch, which is not installed; use return_tensors='np' "
            "or install torch"
        ) from err
    return torch


def _is_torch_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "is_floating_point")


class BatchFeature(UserDict):
    """Model inputs (``input_ids``, ``attention_mask``, ``pixel_values`` ...) with attribute access.

    Args:
        data: the inputs by name.
        tensor_type: ``"np"`` for numpy arrays, ``"pt"`` for torch tensors (torch must be installed),
            or ``None`` to keep Python lists.
    """

    def __init__(self, data: dict[str, Any] | None = None, tensor_type: str | None = None):
        super().__init__(data or {})
        self.convert_to_tensors(tensor_type)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.data[name]
        except KeyError as err:
            raise AttributeError(name) from err

    def __getstate__(self):
        return {"data": self.data}

    def __setstate__(self, state):
        self.data = state["data"]

    def convert_to_tensors(self, tensor_type: str | None = None) -> "BatchFeature":
        """Converts every value to numpy arrays (``"np"``) or torch tensors (``"pt"``) in place.

        Args:
            tensor_type: ``"np"``, ``"pt"`` or ``None`` (leave the values as they are).

        Returns:
            self
        """
        if tensor_type is None:
            return self
        tensor_type = getattr(tensor_type, "value", tensor_type)
        if tensor_type == "np":
            convert = np.asarray
        elif tensor_type == "pt":
            torch = _torch()

            def convert(value):
                if _is_torch_tensor(value):
                    return value
                array = np.asarray(value)
                return torch.from_numpy(np.ascontiguousarray(array))
        else:
            raise ValueError(f"return_tensors must be 'np', 'pt' or None, got {tensor_type!r}")
        for key, value in self.data.items():
            try:
                self.data[key] = convert(value)
            except ValueError as err:
                raise ValueError(
                    f"Unable to create tensor for {key!r}: sequences of different lengths; "
                    "use padding=True or padding='max_length'"
                ) from err
        return self

    def to(self, *args, **kwargs) -> "BatchFeature":
        """Moves torch tensors to a device and casts floating ones to a dtype, like transformers.

        Args:
            *args: a device, a dtype, or a device then a dtype.
            **kwargs: ``device=`` / ``dtype=``.

        Returns:
            self, with the values replaced. numpy values accept a dtype (floating arrays are cast)
            and the device ``"cpu"``.
        """
        device = kwargs.get("device")
        dtype = kwargs.get("dtype")
        for arg in args:
            if _is_dtype(arg):
                dtype = arg
            else:
                device = arg
        for key, value in self.data.items():
            if _is_torch_tensor(value):
                if value.is_floating_point() and dtype is not None:
                    value = value.to(device=device, dtype=dtype)
                elif device is not None:
                    value = value.to(device=device)
                self.data[key] = value
            elif isinstance(value, np.ndarray):
                if device is not None and str(device) != "cpu":
                    raise ValueError(f"numpy inputs stay on the CPU; got device {device!r} (use return_tensors='pt')")
                target = None if dtype is None else _numpy_dtype(dtype)
                if target is not None and np.issubdtype(value.dtype, np.floating):
                    self.data[key] = value.astype(target)
        return self


def _is_dtype(value: Any) -> bool:
    """A torch dtype, a numpy dtype, or a dtype name ("bfloat16", "float16" ...), as opposed to a device."""
    if is_dtype_like(value):
        return True
    if isinstance(value, str):
        return False
    try:
        np.dtype(value)
    except TypeError:
        return False
    return True


def _numpy_dtype(dtype: Any) -> np.dtype | None:
    """The numpy dtype floating arrays are cast to; None (left as they are) for bfloat16, which numpy lacks:
    the model casts its float32 inputs to its own dtype, so `.to(model.device, model.dtype)` works without
    torch too."""
    if is_dtype_like(dtype):
        name = dtype_name(dtype, allow_auto=False)
        return None if name == "bfloat16" else np.dtype(name)
    return np.dtype(dtype)
