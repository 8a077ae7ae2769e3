"""numpy/torch interop and dtype/device names.

torch is optional: it is imported only when the caller already uses it (a torch tensor or dtype came in,
or return_tensors="pt" was asked for).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from . import _native

# Every spelling of a dtype the native table knows ("half" -> "float16"), and "auto" (the checkpoint's own).
_DTYPE_ALIASES = {**_native.DTYPE_NAMES, "auto": "auto"}


def torch_module():
    """torch if it is already imported or importable, else None (never an error)."""
    if "torch" in sys.modules:
        return sys.modules["torch"]
    try:
        import torch  # noqa: PLC0415 - optional dependency
    except ImportError:
        return None
    return torch


def imported_torch():
    """torch where the program has imported it (it works with torch), else None: reading an attribute never
    imports torch (about half a gigabyte) for a program that does not use it."""
    return sys.modules.get("torch")


def is_torch_tensor(x: Any) -> bool:
    torch = imported_torch()
    return torch is not None and isinstance(x, torch.Tensor)


def dtype_name(dtype: Any, *, allow_auto: bool = True) -> str:
    """Normalizes a torch dtype, a numpy dtype or a name to a name of `_native.DTYPES` (or "auto")."""
    key = str(dtype).lower()
    if key.startswith("<class 'numpy."):
        key = key[len("<class 'numpy."):-2]
    name = _DTYPE_ALIASES.get(key)
    if name is None or (name == "auto" and not allow_auto):
        raise ValueError(f"dtype {dtype!r} is not supported: use {', '.join(_native.DTYPES)}"
                         + (' or "auto"' if allow_auto else ""))
    return name


def is_dtype_like(x: Any) -> bool:
    """Whether `x` names a dtype (torch dtype or a known name) rather than a device."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.dtype):
        return True
    return isinstance(x, str) and x.lower() in _DTYPE_ALIASES


def device_name(device: Any) -> str:
    """Normalizes a torch device, an int (CUDA ordinal), "auto" or a name to "cpu" / "cuda" / "cuda:N".

    None is the CPU; "auto" is GPU 0 in a CUDA build that finds one, else the CPU (transformers' "auto"
    also fills the GPU first)."""
    if device is None:
        return "cpu"
    if device == "auto":
        return "cuda" if _native.cuda_available() else "cpu"
    if isinstance(device, int):
        return "cpu" if device < 0 else f"cuda:{device}"
    name = str(device)
    if name in ("cpu", "cuda") or name.startswith("cuda:"):
        return name
    raise ValueError(f"device {device!r} is not supported: use 'cpu' or 'cuda[:N]'")


def as_numpy(x: Any, dtype: Any, name: str) -> np.ndarray:
    """A contiguous numpy copy of an array-like (numpy, torch tensor of any dtype, nested lists)."""
    if is_torch_tensor(x):
        x = x.detach().to("cpu")
        if x.is_floating_point():
            x = x.float()
        x = x.numpy()
    try:
        return np.ascontiguousarray(np.asarray(x), dtype=dtype)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be an array of numbers, got {type(x).__name__}: {err}") from None


def wrap(array: np.ndarray | None, as_torch: bool, dtype: str | None = None):
    """Returns `array` as a torch tensor (in `dtype`) when the caller works with torch, else as is."""
    if array is None or not as_torch:
        return array
    torch = torch_module()
    tensor = torch.from_numpy(array)
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(getattr(torch, dtype))
    return tensor


def any_torch(*values: Any) -> bool:
    return any(is_torch_tensor(v) for v in values)
