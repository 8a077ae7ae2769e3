"""`Florence2ForConditionalGeneration` and friends: transformers' API over the Rust model."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from . import _native
from ._tensors import any_torch, as_numpy, device_name, dtype_name, is_dtype_like, is_torch_tensor, torch_module, wrap
from .adapters import PeftAdapterMixin, adapter_base, resolve_adapter
from .configuration import Florence2Config, GenerationConfig
from .hub import WEIGHTS, resolve_checkpoint
from .outputs import BaseModelOutputWithPooling, Florence2Seq2SeqLMOutput, Florence2Seq2SeqModelOutput, GenerateOutput
from .quantization import quantize_mode

# from_pretrained keywords transformers users pass that change nothing here (documented in the README).
_ACCEPTED_NO_EFFECT = {
    "attn_implementation", "trust_remote_code", "low_cpu_mem_usage", "use_safetensors", "offload_folder",
    "offload_state_dict", "max_memory", "output_loading_info", "use_flash_attention_2", "variant",
    "ignore_mismatched_sizes", "_fast_init", "tp_plan", "key_mapping",
}
# Keywords that select where the files come from (passed to the Hub resolver).
_HUB_KWARGS = {"revision", "token", "cache_dir", "local_files_only", "force_download", "proxies", "subfolder",
               "use_auth_token", "resume_download"}


# BartConfig's defaults, which the native config applies to a text_config that leaves them out.
_TEXT_DEFAULTS = {"vocab_size": 50265, "pad_token_id": 1, "decoder_start_token_id": 2}
# The label of positions that count in no loss (transformers' ignore_index).
IGNORE_INDEX = -100


class Florence2PreTrainedModel(PeftAdapterMixin):
    """Shared loading, device and dtype handling of the Florence-2 model classes."""

    def __init__(self, native: Any, folder: Path, config: Florence2Config, device: str) -> None:
        self._native = native
        self._folder = folder
        self._device = device
        self._quantize: str | None = None
        self._init_adapters()
        self.config = config
        # What generate() starts from, resolved as the checkpoint layout's own code does (Microsoft's layout:
        # its text_config; the HF-native one: generation_config.json); editable, as in transformers.
        self.generation_config = GenerationConfig(**json.loads(native.generation_config))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *model_args: Any, **kwargs: Any):
        """Loads a checkpoint folder or Hub id, in either released layout (HF-native or Microsoft's original).

        Args:
            pretrained_model_name_or_path: a folder with config.json and model.safetensors, or a Hub id.
            dtype / torch_dtype: a torch dtype, "auto" (the default, as in transformers 5: the checkpoint's
                config dtype, else its weights' dtype), or a name ("float32", "float16", "bfloat16").
            device_map / device: "cpu", "auto" (GPU 0 in a CUDA build that finds one, else the CPU),
                "cuda[:N]" or an int.
            quantization_config: accepted; see the README for what is applied.
            revision, token, cache_dir, local_files_only, force_download: where the files come from.
            subfolder: the folder inside the checkpoint folder or Hub repository that holds the files.

        Returns:
            The model, ready for inference (like transformers' after `.eval()`).
        """
        if model_args:
            raise TypeError(f"{cls.__name__}.from_pretrained takes no positional arguments after the path")
        dtype = kwargs.pop("dtype", None)
        torch_dtype = kwargs.pop("torch_dtype", None)
        if dtype is None:
            dtype = torch_dtype if torch_dtype is not None else "auto"
        device = kwargs.pop("device", None)
        device_map = kwargs.pop("device_map", None)
        if isinstance(device_map, dict):
            devices = set(device_map.values())
            if len(devices) != 1:
                raise ValueError("device_map must place the whole model on one device")
            device_map = devices.pop()
        quantize = quantize_mode(kwargs.pop("quantization_config", None))
        hub_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _HUB_KWARGS}
        for key in list(kwargs):
            if key in _ACCEPTED_NO_EFFECT:
                kwargs.pop(key)
        config_overrides = kwargs.pop("config", None)
        if config_overrides is not None and not isinstance(config_overrides, Florence2Config):
            raise TypeError("config must be a Florence2Config")
        if kwargs:
            raise TypeError(f"{cls.__name__}.from_pretrained got unexpected keyword arguments: {sorted(kwargs)}")

        try:
            folder = resolve_checkpoint(pretrained_model_name_or_path, files=("config.json", WEIGHTS),
                                        optional_files=("generation_config.json",), **hub_kwargs)
            adapter = None
        except OSError:
            # A PEFT adapter rather than a model: its base model with the adapter merged, as transformers
            # loads it when peft is installed.
            adapter = resolve_adapter(pretrained_model_name_or_path, **hub_kwargs)
            if adapter is None:
                raise
            # The base is its own repository: the adapter's revision and subfolder do not apply to it.
            base_kwargs = {k: v for k, v in hub_kwargs.items() if k not in ("revision", "subfolder")}
            folder = resolve_checkpoint(adapter_base(adapter), files=("config.json", WEIGHTS),
                                        optional_files=("generation_config.json",), **base_kwargs)
        device = device_name(device if device is not None else device_map)
        native = _load_native(folder, dtype_name(dtype), device, quantize, adapter)
        model = cls(native, folder, Florence2Config.from_json_file(folder / "config.json"), device)
        model._quantize = quantize
        if adapter is not None:
            model._register_adapter("default", adapter)
        return model

    # -- torch-like surface -------------------------------------------------------------------------------
    @property
    def device(self):
        """torch.device when torch is installed, else the device name."""
        torch = torch_module()
        return torch.device(self._device) if torch is not None else self._device

    @property
    def dtype(self):
        """torch dtype when torch is installed, else the dtype name."""
        torch = torch_module()
        return getattr(torch, self._native.dtype) if torch is not None else self._native.dtype

    def to(self, *args: Any, **kwargs: Any):
        """Moves/casts like `torch.nn.Module.to(device, dtype)`; a new dtype reloads the weights in it."""
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        if kwargs:
            raise TypeError(f"to() got unexpected keyword arguments: {sorted(kwargs)}")
        for arg in args:
            if is_dtype_like(arg):
                dtype = arg
            else:
                device = arg
        new_device = device_name(device) if device is not None else self._device
        new_dtype = dtype_name(dtype, allow_auto=False) if dtype is not None else self._native.dtype
        if new_device != self._device or new_dtype != self._native.dtype:
            self._native = _load_native(self._folder, new_dtype, new_device, self._quantize, self._adapter_folder())
            self._device = new_device
        return self

    def _reload(self) -> None:
        """Loads the weights again, in the same dtype and on the same device, with the adapter now chosen."""
        self._native = _load_native(self._folder, self._native.dtype, self._device, self._quantize,
                                    self._adapter_folder())

    def eval(self):
        """No-op (the model is always in inference mode); returns self like torch."""
        return self

    def float(self):
        """Computes in float32 from now on (reloads the weights); returns self."""
        return self.to("float32")

    def half(self):
        """Computes in float16 from now on (reloads the weights); returns self."""
        return self.to("float16")

    def bfloat16(self):
        """Computes in bfloat16 from now on (reloads the weights); returns self."""
        return self.to("bfloat16")

    def cpu(self):
        """Moves the model to the CPU; returns self."""
        return self.to("cpu")

    def cuda(self, device: int | None = None):
        """Moves the model to a CUDA device (needs a CUDA build, else ValueError); returns self."""
        return self.to("cuda" if device is None else f"cuda:{device}")

    def _sharing(self, cls: type) -> Any:
        """A `cls` view over this model's weights (transformers' `model.model`, `model.vision_tower`)."""
        view = cls(self._native, self._folder, self.config, self._device)
        view._quantize = self._quantize
        view._share_adapters(self)
        return view

    def get_image_features(self, pixel_values: Any, **kwargs: Any) -> BaseModelOutputWithPooling:
        """Runs the vision tower and the projector on preprocessed images.

        Args:
            pixel_values: [B, 3, H, W] float array (numpy or torch), as the processor returns it.

        Returns:
            BaseModelOutputWithPooling with `last_hidden_state` (the vision tower's output [B, C, H', W']) and
            `pooler_output` (the projected image tokens [B, 1 + H'W', d_model]); torch tensors when
            `pixel_values` was one.
        """
        as_torch = any_torch(pixel_values)
        pixels = as_numpy(pixel_values, np.float32, "pixel_values")
        vision, pooled = self._native.get_image_features(pixels)
        dtype = self._native.dtype
        return BaseModelOutputWithPooling(last_hidden_state=wrap(vision, as_torch, dtype),
                                          pooler_output=wrap(pooled, as_torch, dtype))

    def _text_setting(self, name: str) -> int:
        return getattr(self.config.text_config, name, _TEXT_DEFAULTS[name])

    def _forward(self, input_ids: Any, pixel_values: Any, attention_mask: Any, decoder_input_ids: Any,
                 kwargs: dict, labels: Any = None) -> dict:
        """The native forward pass shared by the model classes: its outputs by name, as torch tensors when
        any input was one; with `labels`, also `loss` (see `_loss`), and decoder_input_ids default to the
        labels shifted right, as in transformers."""
        kwargs.pop("return_dict", None)
        kwargs.pop("use_cache", None)
        image_features = kwargs.pop("image_features", None)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        if kwargs:
            raise TypeError(f"forward() got unexpected keyword arguments: {sorted(kwargs)}")
        if input_ids is None:
            raise ValueError("input_ids is required (build it with the processor)")
        as_torch = any_torch(input_ids, pixel_values, attention_mask, decoder_input_ids, labels)
        ids = as_numpy(input_ids, np.int64, "input_ids")
        if decoder_input_ids is not None:
            decoder_input_ids = as_numpy(decoder_input_ids, np.int64, "decoder_input_ids")
        if labels is not None:
            labels = _labels_array(labels, ids.shape[0], decoder_input_ids, self._text_setting("vocab_size"))
            if decoder_input_ids is None:
                decoder_input_ids = shift_tokens_right(labels, self._text_setting("pad_token_id"),
                                                       self._text_setting("decoder_start_token_id"))
        if decoder_input_ids is None:
            decoder_input_ids = np.full((ids.shape[0], 1), self._text_setting("decoder_start_token_id"), np.int64)
        out = self._native.forward(
            ids,
            decoder_input_ids,
            None if attention_mask is None else as_numpy(attention_mask, np.int64, "attention_mask"),
            None if pixel_values is None else as_numpy(pixel_values, np.float32, "pixel_values"),
            None if image_features is None else as_numpy(image_features, np.float32, "image_features"),
        )
        dtype = self._native.dtype
        wrapped = {key: wrap(value, as_torch, dtype) for key, value in out.items()}
        if labels is not None:
            loss = _loss(out["logits"], labels, num_items_in_batch)
            wrapped["loss"] = wrap(np.asarray(loss), as_torch) if as_torch else loss
        return wrapped


class Florence2VisionBackbone(Florence2PreTrainedModel):
    """transformers' `Florence2VisionBackbone`: the DaViT vision tower. `from_pretrained` takes a full
    Florence-2 checkpoint; `model.model.vision_tower` gives the same object over an already loaded model."""

    main_input_name = "pixel_values"

    def __init__(self, native: Any, folder: Path, config: Florence2Config, device: str) -> None:
        super().__init__(native, folder, config, device)
        self.config = config.vision_config

    def forward(self, hidden_states: Any, **kwargs: Any) -> BaseModelOutputWithPooling:
        """Runs the vision tower.

        Args:
            hidden_states: pixel_values [B, 3, H, W] (transformers names the argument so).

        Returns:
            BaseModelOutputWithPooling with `last_hidden_state` [B, C, H', W'].
        """
        as_torch = any_torch(hidden_states)
        vision = self._native.vision_features(as_numpy(hidden_states, np.float32, "pixel_values"))
        return BaseModelOutputWithPooling(last_hidden_state=wrap(vision, as_torch, self._native.dtype))

    __call__ = forward


class Florence2Model(Florence2PreTrainedModel):
    """transformers' `Florence2Model`: vision tower, projector and BART encoder-decoder without the LM head."""

    @property
    def vision_tower(self) -> Florence2VisionBackbone:
        """The vision tower over the same weights."""
        return self._sharing(Florence2VisionBackbone)

    def forward(self, input_ids: Any = None, pixel_values: Any = None, attention_mask: Any = None,
                decoder_input_ids: Any = None, **kwargs: Any) -> Florence2Seq2SeqModelOutput:
        """One encoder-decoder pass (the decoder gets the start token unless decoder_input_ids are given).

        Args:
            input_ids, attention_mask, pixel_values: as the processor returns them.
            decoder_input_ids: [B, T] decoder ids.
            image_features: projected image tokens to use instead of pixel_values.

        Returns:
            Florence2Seq2SeqModelOutput with the decoder's `last_hidden_state` [B, T, d_model],
            `encoder_last_hidden_state` [B, S, d_model] and `image_hidden_states` [B, N, d_model].
        """
        out = self._forward(input_ids, pixel_values, attention_mask, decoder_input_ids, kwargs)
        return Florence2Seq2SeqModelOutput(last_hidden_state=out["last_hidden_state"],
                                           encoder_last_hidden_state=out["encoder_last_hidden_state"],
                                           image_hidden_states=out["image_hidden_states"])

    __call__ = forward


class Florence2ForConditionalGeneration(Florence2PreTrainedModel):
    """transformers' `Florence2ForConditionalGeneration`, running in Rust."""

    main_input_name = "input_ids"

    @property
    def model(self) -> Florence2Model:
        """The encoder-decoder without the LM head, over the same weights (transformers' `model.model`)."""
        return self._sharing(Florence2Model)

    def forward(self, input_ids: Any = None, pixel_values: Any = None, attention_mask: Any = None,
                decoder_input_ids: Any = None, labels: Any = None, **kwargs: Any) -> Florence2Seq2SeqLMOutput:
        """One forward pass. Without decoder_input_ids the decoder gets the labels shifted right (the start
        token first, -100 as the pad token), else the start token alone, as transformers does.

        Args:
            input_ids, attention_mask, pixel_values: as the processor returns them.
            decoder_input_ids: [B, T] decoder ids.
            labels: [B, T] integer target ids, -100 where a position counts in no loss.
            num_items_in_batch: with labels, the loss is the sum over the counted positions divided by it
                (transformers' Trainer passes it), instead of their mean.
            image_features: projected image tokens to use instead of pixel_values.

        Returns:
            Florence2Seq2SeqLMOutput with logits [B, T, vocab], encoder_last_hidden_state, image_hidden_states
            and, with labels, `loss`: transformers' cross-entropy of the logits in float32 (torch tensors when
            the inputs were torch, else numpy; the loss a float32 scalar).

        Raises:
            ValueError: labels that are not integers, not of shape [B, T] (that of decoder_input_ids when
                given), or hold ids outside the vocabulary other than -100.
        """
        out = self._forward(input_ids, pixel_values, attention_mask, decoder_input_ids, kwargs, labels)
        return Florence2Seq2SeqLMOutput(
            loss=out.get("loss"),
            logits=out["logits"],
            encoder_last_hidden_state=out["encoder_last_hidden_state"],
            image_hidden_states=out["image_hidden_states"],
        )

    __call__ = forward

    def generate(self, input_ids: Any = None, pixel_values: Any = None, attention_mask: Any = None,
                 generation_config: GenerationConfig | None = None, **kwargs: Any):
        """Generates token ids like transformers' `generate` (greedy, beam search, sampling).

        Args:
            input_ids, attention_mask, pixel_values: as the processor returns them.
            image_features: projected image tokens from `get_image_features(...).pooler_output`, to reuse one
                encoded image for several prompts (instead of pixel_values).
            generation_config: a GenerationConfig (florence2_rs' or transformers' own). As in transformers, the
                attributes it sets to other than transformers' global defaults replace the model's
                `generation_config` values; attributes florence2-rs has no use for are ignored (with a warning
                for those that are set).
            **kwargs: generation settings (max_new_tokens, num_beams, do_sample, ...), which override the
                generation config as in transformers; an unknown name is an error.

        Returns:
            ids [batch * num_return_sequences, length] (numpy, or torch when the inputs were torch), or a
            GenerateOutput with sequences/sequences_scores/scores when return_dict_in_generate=True, plus
            `token_scores` (not in transformers): the log-probability of each generated token, [N, length - 1]
            (beam search: transformers' compute_transition_scores with beam_indices; greedy/sampling: with
            normalize_logits=True; 0 for forced and padding tokens).
        """
        if input_ids is None:
            raise ValueError("generate() needs input_ids (build them with the processor)")
        image_features = kwargs.pop("image_features", None)
        if image_features is not None and pixel_values is not None:
            raise ValueError("You cannot pass both: raw pixels and pre-computed embeddings for input images")
        as_torch = any_torch(input_ids, pixel_values, attention_mask)
        settings = self.generation_config.to_dict()
        if generation_config is not None:
            settings.update(_set_attributes(generation_config))
        _check_finite(settings)
        _check_finite(kwargs)
        result = self._native.generate(
            as_numpy(input_ids, np.int64, "input_ids"),
            None if attention_mask is None else as_numpy(attention_mask, np.int64, "attention_mask"),
            None if pixel_values is None else as_numpy(pixel_values, np.float32, "pixel_values"),
            None if image_features is None else as_numpy(image_features, np.float32, "image_features"),
            json.dumps(settings, default=_json_default),
            json.dumps(kwargs, default=_json_default),
        )
        _warn_ignored(result["ignored"])
        sequences = wrap(result["sequences"], as_torch)
        if not result["return_dict_in_generate"]:
            return sequences
        return GenerateOutput(
            sequences=sequences,
            sequences_scores=wrap(result.get("sequences_scores"), as_torch),
            scores=None if result.get("scores") is None else tuple(wrap(s, as_torch) for s in result["scores"]),
            token_scores=wrap(result["token_scores"], as_torch),
        )


def shift_tokens_right(input_ids: np.ndarray, pad_token_id: int, decoder_start_token_id: int) -> np.ndarray:
    """transformers' (BART's) `shift_tokens_right`: the decoder inputs for `input_ids` as targets, the start
    token first and -100 replaced by the pad token."""
    shifted = np.empty_like(input_ids)
    shifted[:, 1:] = input_ids[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    shifted[shifted == IGNORE_INDEX] = pad_token_id
    return shifted


def _labels_array(labels: Any, batch: int, decoder_input_ids: np.ndarray | None, vocab_size: int) -> np.ndarray:
    """`labels` as int64 [B, T], checked against what transformers' loss and shift need."""
    if is_torch_tensor(labels):
        labels = labels.detach().to("cpu").numpy()
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be integer token ids (-100 for ignored positions), got dtype {labels.dtype}")
    expected = f"[{batch}, T]" if decoder_input_ids is None else f"{list(decoder_input_ids.shape)} (decoder_input_ids)"
    if labels.ndim != 2 or labels.shape[0] != batch or labels.shape[1] == 0 or (
            decoder_input_ids is not None and labels.shape != decoder_input_ids.shape):
        raise ValueError(f"labels must have shape {expected}, got {list(labels.shape)}")
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))
    if bad.any():
        raise ValueError(f"label {labels[bad][0]} is outside the vocabulary of {vocab_size} tokens "
                         f"(labels are token ids, or {IGNORE_INDEX} for positions that count in no loss)")
    return labels.astype(np.int64)


def _loss(logits: np.ndarray, labels: np.ndarray, num_items_in_batch: Any = None) -> np.float32:
    """transformers' loss for Florence-2 (`ForCausalLMLoss` with shift_labels=labels): the cross-entropy of
    each position's logits, in float32, over the positions whose label is not -100; their mean, or their sum
    over `num_items_in_batch` where it is given. No position counted: NaN (the mean) or 0 (the sum)."""
    keep = labels != IGNORE_INDEX
    rows = np.asarray(logits[keep], dtype=np.float32)
    targets = labels[keep]
    peak = rows.max(axis=-1, keepdims=True, initial=-np.inf)
    log_norm = np.log(np.exp(rows - peak).sum(axis=-1)) + peak[:, 0]
    total = (log_norm - rows[np.arange(len(targets)), targets]).sum(dtype=np.float32)
    if num_items_in_batch is not None:
        return np.float32(total / np.float32(float(num_items_in_batch)))
    return np.float32(total / np.float32(len(targets))) if len(targets) else np.float32(np.nan)


def _set_attributes(generation_config: Any) -> dict:
    """The attributes a caller's generation config sets: transformers' `to_diff_dict` (what differs from its
    global defaults, the values transformers lets replace the model's) for a transformers GenerationConfig,
    every attribute of ours (which holds only what was set)."""
    if hasattr(generation_config, "to_diff_dict"):
        return dict(generation_config.to_diff_dict())
    if hasattr(generation_config, "to_dict"):
        return dict(generation_config.to_dict())
    raise TypeError(f"generation_config must be a GenerationConfig, not {type(generation_config).__name__}")


def _check_finite(settings: dict) -> None:
    """JSON, which carries the settings to the native code, has no inf or NaN: name the setting instead of
    failing there."""
    for key, value in settings.items():
        if isinstance(value, float) and not np.isfinite(value):
            raise ValueError(f"`{key}` must be a finite number, but is {value}")


_WARNED_IGNORED: set[str] = set()


def _warn_ignored(names: list[str]) -> None:
    """Warns once per attribute name that a generation config set an attribute florence2-rs ignores."""
    new = sorted(set(names) - _WARNED_IGNORED)
    if new:
        _WARNED_IGNORED.update(new)
        warnings.warn(f"generation_config attributes ignored by florence2-rs (not supported here): {new}",
                      UserWarning, stacklevel=3)


def _json_default(value: Any) -> Any:
    """Lets generate() kwargs given as numpy/torch scalars or tuples pass through JSON."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"generate() got a value of type {type(value).__name__} that is not a setting: {value!r}")


def _load_native(folder: Path, dtype: str, device: str, quantize: str | None, adapter: Path | None = None) -> Any:
    """Loads the Rust model: the one place every model class loads weights through.

    `quantize` ("int8", "int4" or None) comes from `quantization_config`: the linear layers' weights are
    quantized (candle's Q8_0 / Q4_0), the embeddings and LM head stay in `dtype`. `adapter`: a PEFT LoRA
    adapter folder, merged into the weights as they load.
    """
    return _native.NativeModel.load(folder, dtype, device, quantize=quantize,
                                    adapter=None if adapter is None else str(adapter))

