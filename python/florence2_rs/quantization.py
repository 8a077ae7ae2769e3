"""`BitsAndBytesConfig`: transformers' quantization settings, accepted so that scripts written for
bitsandbytes run unchanged, and mapped to the native loader's quantization modes."""

from __future__ import annotations

from typing import Any, Optional

from ._tensors import dtype_name

__all__ = ["BitsAndBytesConfig", "quantize_mode"]


class BitsAndBytesConfig:
    """transformers' `BitsAndBytesConfig` (same constructor arguments, same validation of the 4/8-bit flags).

    bitsandbytes itself is never imported: `from_pretrained(quantization_config=...)` reads `load_in_8bit` /
    `load_in_4bit` through `quantize_mode` and the other fields are kept for `to_dict()` only.

    Args:
        load_in_8bit: quantize the linear weights to 8 bits.
        load_in_4bit: quantize the linear weights to 4 bits.
        llm_int8_threshold, llm_int8_skip_modules, llm_int8_enable_fp32_cpu_offload,
        llm_int8_has_fp16_weight: bitsandbytes' LLM.int8() settings (stored).
        bnb_4bit_compute_dtype: a torch dtype or a name ("float32" when None, as in transformers).
        bnb_4bit_quant_type: "fp4" or "nf4" (stored).
        bnb_4bit_use_double_quant: bitsandbytes' nested quantization (stored).
        bnb_4bit_quant_storage: the storage dtype name (stored).
        **kwargs: ignored, as transformers does.

    Raises:
        ValueError: both load_in_4bit and load_in_8bit are set, or a dtype is not a float dtype.
    """

    quant_method = "bitsandbytes"

    def __init__(
        self,
        load_in_8bit: bool = False,
        load_in_4bit: bool = False,
        llm_int8_threshold: float = 6.0,
        llm_int8_skip_modules: Optional[list] = None,
        llm_int8_enable_fp32_cpu_offload: bool = False,
        llm_int8_has_fp16_weight: bool = False,
        bnb_4bit_compute_dtype: Any = None,
        bnb_4bit_quant_type: str = "fp4",
        bnb_4bit_use_double_quant: bool = False,
        bnb_4bit_quant_storage: Any = None,
        **kwargs: Any,
    ) -> None:
        if load_in_4bit and load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit are both True, but only one can be used at the same time")
        if bnb_4bit_quant_type not in ("fp4", "nf4"):
            raise ValueError(f"bnb_4bit_quant_type must be 'fp4' or 'nf4', got {bnb_4bit_quant_type!r}")
        self._load_in_8bit = bool(load_in_8bit)
        self._load_in_4bit = bool(load_in_4bit)
        self.llm_int8_threshold = llm_int8_threshold
        self.llm_int8_skip_modules = llm_int8_skip_modules
        self.llm_int8_enable_fp32_cpu_offload = llm_int8_enable_fp32_cpu_offload
        self.llm_int8_has_fp16_weight = llm_int8_has_fp16_weight
        # Names rather than torch dtypes, so that the config works without torch.
        self.bnb_4bit_compute_dtype = "float32" if bnb_4bit_compute_dtype is None else dtype_name(
            bnb_4bit_compute_dtype, allow_auto=False)
        self.bnb_4bit_quant_type = bnb_4bit_quant_type
        self.bnb_4bit_use_double_quant = bnb_4bit_use_double_quant
        self.bnb_4bit_quant_storage = "uint8" if bnb_4bit_quant_storage is None else str(
            bnb_4bit_quant_storage).replace("torch.", "")

    @property
    def load_in_8bit(self) -> bool:
        """Whether the weights load in 8 bits."""
        return self._load_in_8bit

    @load_in_8bit.setter
    def load_in_8bit(self, value: bool) -> None:
        self._set_bits(eight=value, four=self._load_in_4bit)

    @property
    def load_in_4bit(self) -> bool:
        """Whether the weights load in 4 bits."""
        return self._load_in_4bit

    @load_in_4bit.setter
    def load_in_4bit(self, value: bool) -> None:
        self._set_bits(eight=self._load_in_8bit, four=value)

    def _set_bits(self, eight: bool, four: bool) -> None:
        if not isinstance(eight, bool) or not isinstance(four, bool):
            raise TypeError("load_in_8bit and load_in_4bit must be booleans")
        if eight and four:
            raise ValueError("load_in_4bit and load_in_8bit are both True, but only one can be used at the same time")
        self._load_in_8bit, self._load_in_4bit = eight, four

    def is_quantizable(self) -> bool:
        """Whether either quantization is asked for (transformers' method of that name)."""
        return self._load_in_8bit or self._load_in_4bit

    def quantization_method(self) -> Optional[str]:
        """"llm_int8", "fp4" or "nf4", or None when nothing is quantized (as transformers)."""
        if self._load_in_8bit:
            return "llm_int8"
        if self._load_in_4bit:
            return self.bnb_4bit_quant_type
        return None

    def to_dict(self) -> dict:
        """The settings as a plain dict (the keys transformers writes into config.json)."""
        out = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        out.update(quant_method=self.quant_method, load_in_8bit=self._load_in_8bit, load_in_4bit=self._load_in_4bit)
        return out

    def __repr__(self) -> str:
        return f"BitsAndBytesConfig({self.to_dict()})"


def quantize_mode(config: Any) -> Optional[str]:
    """The native loader's quantization mode for a `quantization_config`.

    Args:
        config: a BitsAndBytesConfig, transformers' own BitsAndBytesConfig (duck-typed: `load_in_8bit` /
            `load_in_4bit` attributes), a dict with those keys, or None.

    Returns:
        "int8", "int4", or None for no quantization.
    """
    if config is None:
        return None
    get = config.get if isinstance(config, dict) else lambda key, default: getattr(config, key, default)
    if get("load_in_8bit", False):
        return "int8"
    if get("load_in_4bit", False):
        return "int4"
    return None
