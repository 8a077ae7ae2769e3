"""`BitsAndBytesConfig`: transformers' quantization settings, accepted so that scripts written for
bitsandbytes run unchanged, and mapped to the native loader's quantization modes."""

from __future__ import annotations

from typing import Any, Optional

from ._tensors import dtype_name

__all__ = ["BitsAndBytesConfig", "QUANTIZE_MODES", "config_for_mode", "quantize_mode"]

# The modes `quantize_mode` returns, which the applications' --quantize options take.
QUANTIZE_MODES = ("int8", "int4")


class BitsAndBytesConfig:
    """transformers' `BitsAndBytesConfig` (same constructor arguments, same validation of the 4/8-bit flags).

    bitsandbytes itself is never imported: `from_pretrained(quantization_config=...)` reads `load_in_8bit` /
    `load_in_4bit` through `quantize_mode` and the other fields are kept for `to_dict()` only. A config that sets
    neither flag is refused there (ValueError): transformers would quantize with it to 4 bits.

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
        TypeError: a setting of the wrong type (a flag that is not a bool, a threshold that is not a float ...),
            as transformers' `post_init` checks them.
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
        # transformers' post_init checks the types: a flag given as "false" or 1.0 is an error, not a truthy value.
        _check_types(load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit, llm_int8_threshold=llm_int8_threshold,
                     llm_int8_skip_modules=llm_int8_skip_modules,
                     llm_int8_enable_fp32_cpu_offload=llm_int8_enable_fp32_cpu_offload,
                     llm_int8_has_fp16_weight=llm_int8_has_fp16_weight, bnb_4bit_quant_type=bnb_4bit_quant_type,
                     bnb_4bit_use_double_quant=bnb_4bit_use_double_quant)
        if bnb_4bit_quant_type not in ("fp4", "nf4"):
            raise ValueError(f"bnb_4bit_quant_type must be 'fp4' or 'nf4', got {bnb_4bit_quant_type!r}")
        self._load_in_8bit = load_in_8bit
        self._load_in_4bit = load_in_4bit
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

    @classmethod
    def from_dict(cls, config_dict: dict, return_unused_kwargs: bool = False, **kwargs: Any):
        """A config from the dict `to_dict()` writes (its `quant_method` key is dropped), updated by `kwargs`,
        as transformers' `from_dict`."""
        config = cls(**{k: v for k, v in config_dict.items() if k != "quant_method"})
        unused = {}
        for key, value in kwargs.items():
            if hasattr(config, key):
                setattr(config, key, value)
            else:
                unused[key] = value
        return (config, unused) if return_unused_kwargs else config

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


def config_for_mode(mode: Optional[str]) -> Optional[BitsAndBytesConfig]:
    """The `quantization_config` of a mode `quantize_mode` returns ("int8", "int4", or None for none): the
    applications' `--quantize` option, given to `from_pretrained`."""
    if mode is None:
        return None
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize={mode!r} is not supported: use one of {', '.join(QUANTIZE_MODES)}")
    return BitsAndBytesConfig(load_in_8bit=mode == "int8", load_in_4bit=mode == "int4")


def quantize_mode(config: Any) -> Optional[str]:
    """The native loader's quantization mode for a `quantization_config`, validated as transformers'
    `from_pretrained` validates it.

    Args:
        config: a BitsAndBytesConfig, transformers' own (duck-typed: its `quant_method` and `load_in_8bit` /
            `load_in_4bit` attributes), a dict of BitsAndBytesConfig settings, or None.

    Returns:
        "int8", "int4", or None for no quantization (`config` None).

    Raises:
        TypeError: a dict setting of the wrong type (`{"load_in_4bit": "false"}`), as BitsAndBytesConfig.
        ValueError: both flags set; neither flag set (a config or a dict: transformers would quantize to 4 bits);
            a dict that names no quantization method (transformers' error); another method than bitsandbytes
            (GPTQ, AWQ, quanto, ...), which florence2-rs does not run.
        AttributeError: a value that is no config (such as the string "int8"), where transformers fails reading
            its `quant_method`.
    """
    if config is None:
        return None
    if isinstance(config, dict):
        config = _config_from_dict(config)
    method = getattr(config, "quant_method", None)
    if method is None:
        raise AttributeError(f"quantization_config must be a BitsAndBytesConfig or a dict of its settings, not "
                             f"{type(config).__name__} ({config!r}): {type(config).__name__} has no attribute "
                             f"'quant_method'. Pass BitsAndBytesConfig(load_in_8bit=True) or "
                             f"BitsAndBytesConfig(load_in_4bit=True)")
    method = getattr(method, "value", method)  # transformers' QuantizationMethod enum
    if method != BitsAndBytesConfig.quant_method:
        raise _unsupported(method)
    if getattr(config, "load_in_8bit", False):
        return "int8"
    if getattr(config, "load_in_4bit", False):
        return "int4"
    raise _neither_flag(config)


def _config_from_dict(settings: dict) -> BitsAndBytesConfig:
    """A dict as transformers' `AutoQuantizationConfig.from_dict` reads it: truthy `load_in_8bit` /
    `load_in_4bit` make it a BitsAndBytesConfig (whose checks then run), else its `quant_method` decides."""
    if settings.get("load_in_8bit", False) or settings.get("load_in_4bit", False):
        return BitsAndBytesConfig.from_dict(settings)
    method = settings.get("quant_method")
    if method is None:
        raise ValueError("The model's quantization config from the arguments has no `quant_method` attribute: "
                         f"{settings!r} asks for no quantization. Set load_in_8bit=True or load_in_4bit=True, or "
                         "pass no quantization_config")
    method = getattr(method, "value", method)
    if method == BitsAndBytesConfig.quant_method:
        raise _neither_flag(settings)
    raise _unsupported(method)


def _neither_flag(config: Any) -> ValueError:
    """The error for a bitsandbytes config that sets neither flag, which transformers' 4-bit quantizer takes."""
    return ValueError(f"quantization_config {config!r} sets neither load_in_8bit nor load_in_4bit: transformers "
                      "would quantize to 4 bits; pass load_in_4bit=True for that, or no quantization_config")


def _unsupported(method: Any) -> ValueError:
    """The error for a quantization method other than bitsandbytes."""
    return ValueError(f"quantization_config with quant_method {method!r} is not supported: florence2-rs quantizes "
                     "with its own int8 / int4 kernels from a BitsAndBytesConfig (load_in_8bit=True or "
                     "load_in_4bit=True) and does not run other quantization libraries (GPTQ, AWQ, quanto, "
                     "torchao, ...); load an unquantized checkpoint with BitsAndBytesConfig instead")


def _check_types(*, load_in_8bit: Any, load_in_4bit: Any, llm_int8_threshold: Any, llm_int8_skip_modules: Any,
                 llm_int8_enable_fp32_cpu_offload: Any, llm_int8_has_fp16_weight: Any, bnb_4bit_quant_type: Any,
                 bnb_4bit_use_double_quant: Any) -> None:
    """transformers' `BitsAndBytesConfig.post_init` type checks, in its order, with its exception (TypeError)."""
    checks = (
        ("load_in_4bit", load_in_4bit, bool, "a boolean"),
        ("load_in_8bit", load_in_8bit, bool, "a boolean"),
        ("llm_int8_threshold", llm_int8_threshold, float, "a float"),
        ("llm_int8_skip_modules", llm_int8_skip_modules, (list, type(None)), "a list of strings"),
        ("llm_int8_enable_fp32_cpu_offload", llm_int8_enable_fp32_cpu_offload, bool, "a boolean"),
        ("llm_int8_has_fp16_weight", llm_int8_has_fp16_weight, bool, "a boolean"),
        ("bnb_4bit_quant_type", bnb_4bit_quant_type, str, "a string"),
        ("bnb_4bit_use_double_quant", bnb_4bit_use_double_quant, bool, "a boolean"),
    )
    for name, value, kind, described in checks:
        if not isinstance(value, kind):
            raise TypeError(f"{name} must be {described}, got {type(value).__name__} {value!r}")
