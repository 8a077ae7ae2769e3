"""`Florence2ForConditionalGeneration` and friends: transformers' API over the Rust model."""

from __future__ import annotations

import json
import numbers
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from . import _native
from ._tensors import any_torch, as_numpy, device_name, dtype_name, is_dtype_like, imported_torch, is_torch_tensor, wrap
from .adapters import LoadedWeights, PeftAdapterMixin, adapter_base, resolve_adapter
from .configuration import Florence2Config, GenerationConfig
from .hub import WEIGHTS, WEIGHTS_INDEX, resolve_checkpoint
from .outputs import BaseModelOutputWithPooling, Florence2Seq2SeqLMOutput, Florence2Seq2SeqModelOutput, GenerateOutput
from .quantization import quantize_mode
from .seeding import sampling_seed

# from_pretrained keywords transformers users pass that change nothing here (documented in the README).
_ACCEPTED_NO_EFFECT = {
    "attn_implementation", "trust_remote_code", "low_cpu_mem_usage", "use_safetensors", "offload_folder",
    "offload_state_dict", "max_memory", "output_loading_info", "use_flash_attention_2", "variant",
    "ignore_mismatched_sizes", "_fast_init", "tp_plan", "key_mapping",
}
# Keywords that select where the files come from (passed to the Hub resolver).
_HUB_KWARGS = {"revision", "token", "cache_dir", "local_files_only", "force_download", "proxies", "subfolder",
               "use_auth_token", "resume_download"}


# The label of positions that count in no loss (transformers' ignore_index).
IGNORE_INDEX = -100


def _training_message(call: str, instead: str | None = None) -> str:
    """What a training-side call is told: florence2-rs runs inference; how to fine-tune and bring the result."""
    also = f" ({instead})" if instead else ""
    return (f"{call} is not available: florence2-rs runs Florence-2 inference only and has no torch parameters"
            f"{also}. To fine-tune, train transformers' Florence2ForConditionalGeneration (with peft for LoRA), "
            "then load the result here: the merged weights with from_pretrained(folder), or the LoRA adapter with "
            "from_pretrained(adapter_folder) or model.load_adapter(adapter_folder).")


def _training_only(name: str, instead: str | None = None):
    """A method named like torch.nn.Module's `name` that raises NotImplementedError with `_training_message`."""

    def method(self, *args: Any, **kwargs: Any):
        raise NotImplementedError(_training_message(f"model.{name}()", instead))

    method.__name__ = method.__qualname__ = name
    method.__doc__ = (f"torch.nn.Module's `{name}`, which a model that runs inference only does not have.\n\n"
                      "Raises:\n    NotImplementedError: always, naming how to fine-tune and load the result.")
    return method


class Florence2PreTrainedModel(PeftAdapterMixin):
    """Shared loading, device and dtype handling of the Florence-2 model classes.

    The weights and what they were loaded with are `_state` (see `adapters.LoadedWeights`), shared with the
    model's views; a method reads `_state.native` once, so that it runs on one set of weights even while another
    thread switches them.
    """

    def __init__(self, state: LoadedWeights, folder: Path, config: Florence2Config) -> None:
        self._state = state
        self._folder = folder
        self.config = config
        # What generate() starts from, resolved as the checkpoint layout's own code does (Microsoft's layout:
        # its text_config; the HF-native one: generation_config.json); editable, as in transformers.
        self.generation_config = GenerationConfig(**state.native.generation_config)

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
        config = Florence2Config.from_json_file(folder / "config.json")
        model = cls(LoadedWeights(native, device, quantize), folder, config)
        if adapter is not None:
            model._register_adapter("default", adapter)
        return model

    # -- torch-like surface -------------------------------------------------------------------------------
    @property
    def device(self):
        """torch.device where the program has imported torch, else the device name."""
        torch = imported_torch()
        device = self._state.device
        return torch.device(device) if torch is not None else device

    @property
    def dtype(self):
        """torch dtype where the program has imported torch, else the dtype name."""
        torch = imported_torch()
        dtype = self._state.native.dtype
        return getattr(torch, dtype) if torch is not None else dtype

    def to(self, *args: Any, **kwargs: Any):
        """Moves/casts like `torch.nn.Module.to(device, dtype)`; a new dtype reloads the weights in it. As in torch,
        where `model.model` is a submodule over the same parameters, the model and all its views move together
        (they share the weights)."""
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        if kwargs:
            raise TypeError(f"to() got unexpected keyword arguments: {sorted(kwargs)}")
        for arg in args:
            if is_dtype_like(arg):
                dtype = arg
            else:
                device = arg
        new_device = device_name(device) if device is not None else None
        new_dtype = dtype_name(dtype, allow_auto=False) if dtype is not None else None
        state = self._state
        # Under the adapters' lock: an adapter change at the same time cannot reload from the old dtype or
        # device, nor this one from the old adapter (see adapters.py).
        with state.lock:
            native = state.native
            new_device = new_device or state.device
            new_dtype = new_dtype or native.dtype
            if new_device != state.device or new_dtype != native.dtype:
                state.native = _load_native(self._folder, new_dtype, new_device, state.quantize, state.merged)
                state.device = new_device
        return self

    def _load_weights(self, state: LoadedWeights, adapter: Path | None) -> Any:
        """The weights loaded again as `state`'s are (dtype, device, quantization), with `adapter` merged (None:
        the base weights). The caller (adapters.py) holds `state.lock` and installs them."""
        return _load_native(self._folder, state.native.dtype, state.device, state.quantize, adapter)

    # torch's flag: the model is always in inference mode.
    training = False

    def eval(self):
        """No-op (the model is always in inference mode); returns self like torch."""
        return self

    def train(self, mode: bool = True):
        """`train(False)` is `eval()`, as in torch; `train()` raises: the model runs inference only.

        Raises:
            NotImplementedError: `mode` true (see `parameters`).
        """
        if mode:
            raise NotImplementedError(_training_message("model.train()"))
        return self.eval()

    parameters = _training_only("parameters")
    named_parameters = _training_only("named_parameters")
    requires_grad_ = _training_only("requires_grad_")
    state_dict = _training_only("state_dict", "save_pretrained(folder) writes the weights as safetensors")
    load_state_dict = _training_only("load_state_dict")
    # peft's get_peft_model walks modules() first, before it wraps anything.
    modules = _training_only("modules")
    named_modules = _training_only("named_modules")
    children = _training_only("children")
    named_children = _training_only("named_children")
    gradient_checkpointing_enable = _training_only("gradient_checkpointing_enable")
    enable_input_require_grads = _training_only("enable_input_require_grads")

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
        """A `cls` view over this model's weights (transformers' `model.model`, `model.vision_tower`): it shares
        the weights, the device, the adapters and the lock (see `adapters.LoadedWeights`)."""
        return cls(self._state, self._folder, self.config)

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
        native = self._state.native
        vision, pooled = native.get_image_features(pixels)
        dtype = native.dtype
        return BaseModelOutputWithPooling(last_hidden_state=wrap(vision, as_torch, dtype),
                                          pooler_output=wrap(pooled, as_torch, dtype))

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
        text = self.config.text_config
        if labels is not None:
            labels = _labels_array(labels, ids.shape[0], decoder_input_ids, text.vocab_size)
            if decoder_input_ids is None:
                decoder_input_ids = shift_tokens_right(labels, text.pad_token_id, text.decoder_start_token_id)
        if decoder_input_ids is None:
            decoder_input_ids = np.full((ids.shape[0], 1), text.decoder_start_token_id, np.int64)
        native = self._state.native
        out = native.forward(
            ids,
            decoder_input_ids,
            None if attention_mask is None else as_numpy(attention_mask, np.int64, "attention_mask"),
            None if pixel_values is None else as_numpy(pixel_values, np.float32, "pixel_values"),
            None if image_features is None else as_numpy(image_features, np.float32, "image_features"),
        )
        wrapped = {key: wrap(value, as_torch, native.dtype) for key, value in out.items()}
        if labels is not None:
            loss = _loss(out["logits"], labels, num_items_in_batch)
            wrapped["loss"] = wrap(np.asarray(loss), as_torch) if as_torch else loss
        return wrapped


class Florence2VisionBackbone(Florence2PreTrainedModel):
    """transformers' `Florence2VisionBackbone`: the DaViT vision tower. `from_pretrained` takes a full
    Florence-2 checkpoint; `model.model.vision_tower` gives the same object over an already loaded model."""

    main_input_name = "pixel_values"

    def __init__(self, state: LoadedWeights, folder: Path, config: Florence2Config) -> None:
        super().__init__(state, folder, config)
        self.config = config.vision_config

    def forward(self, hidden_states: Any, **kwargs: Any) -> BaseModelOutputWithPooling:
        """Runs the vision tower.

        Args:
            hidden_states: pixel_values [B, 3, H, W] (transformers names the argument so).

        Returns:
            BaseModelOutputWithPooling with `last_hidden_state` [B, C, H', W'].
        """
        as_torch = any_torch(hidden_states)
        native = self._state.native
        vision = native.vision_features(as_numpy(hidden_states, np.float32, "pixel_values"))
        return BaseModelOutputWithPooling(last_hidden_state=wrap(vision, as_torch, native.dtype))

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

    @property
    def vision_tower(self) -> Florence2VisionBackbone:
        """The vision tower over the same weights (Microsoft's remote code's `model.vision_tower`)."""
        return self._sharing(Florence2VisionBackbone)

    def save_pretrained(self, save_directory: str | Path, is_main_process: bool = True, state_dict: Any = None,
                        push_to_hub: bool = False, max_shard_size: int | str = "50GB",
                        safe_serialization: bool = True, variant: str | None = None, **kwargs: Any) -> None:
        """Writes the model as a checkpoint folder that `from_pretrained` loads back, generating what this model
        generates: `model.safetensors` (or shards with `model.safetensors.index.json`), `config.json` and
        `generation_config.json`.

        The weights are read again from the checkpoint the model was loaded from, with the active LoRA adapter
        merged, in the model's dtype (after `.to(dtype)`: that dtype). `model.generation_config` as it is now
        (edits included) is saved where the layout's code reads it. The folder keeps the layout the model was
        loaded from: an HF-native model is saved as transformers saves it (transformers loads it back); a model
        of Microsoft's original layout is saved in that layout, its generation settings in config.json's
        text_config, its remote-code files copied, as transformers saves a trust_remote_code model (its HF-native
        conversion has a larger vocabulary and no final_logits_bias, so it would not generate the same ids); with
        a warning where the source folder has no code files to copy. A quantized model (`quantization_config`) is
        saved unquantized, with a warning: quantization is applied at load, so pass the quantization_config to
        from_pretrained again.

        Args:
            save_directory: the folder (created if needed; weights files of an earlier save there are replaced).
            is_main_process: False writes nothing (transformers' distributed training flag).
            max_shard_size: the largest weights file, bytes or a size like "5GB", "500MiB"; more is sharded.
            safe_serialization: True (safetensors, the only format written).
            push_to_hub: False (uploading is not supported).

        Warns:
            UserWarning: the model is quantized (saved unquantized), or is of Microsoft's layout and its folder
                holds no remote-code files to copy (transformers cannot load the saved folder without them).

        Raises:
            NotImplementedError: push_to_hub=True, safe_serialization=False, a variant or a state_dict.
            ValueError: save_directory is a file, or the folder the model was loaded from.
            TypeError: an unknown keyword.
        """
        if push_to_hub:
            raise NotImplementedError("save_pretrained(push_to_hub=True) is not supported: save to a folder, then "
                                      "upload it with huggingface_hub (`HfApi().upload_folder`)")
        if not safe_serialization:
            raise NotImplementedError("save_pretrained writes safetensors only (safe_serialization=True)")
        if variant is not None or state_dict is not None:
            raise NotImplementedError("save_pretrained takes no `variant` or `state_dict`: it writes the model's "
                                      "own weights as model.safetensors")
        for key in ("token", "commit_message", "create_pr", "save_peft_format", "save_original_format"):
            kwargs.pop(key, None)
        if kwargs:
            raise TypeError(f"save_pretrained() got unexpected keyword arguments: {sorted(kwargs)}")
        shard_bytes = _size_in_bytes(max_shard_size)
        folder = Path(save_directory)
        if folder.is_file():
            raise ValueError(f"save_directory {folder} is a file; give a folder")
        if folder.exists() and folder.resolve() == self._folder.resolve():
            raise ValueError(f"save_directory {folder} is the folder the model was loaded from; save elsewhere "
                             "(the model reads its weights from there again when its dtype or adapter changes)")
        if not is_main_process:
            return
        # The weights, their dtype and adapter, read together (an adapter switch holds the lock).
        state = self._state
        with state.lock:
            native, adapter, quantize = state.native, state.merged, state.quantize
        dtype = native.dtype
        if quantize is not None:
            warnings.warn(f"save_pretrained writes the unquantized weights (in {dtype}): quantization is applied "
                          "at load, so pass the quantization_config to from_pretrained again", UserWarning,
                          stacklevel=2)
        folder.mkdir(parents=True, exist_ok=True)
        written = _native.NativeModel.save_weights(self._folder, folder, dtype, shard_bytes,
                                                   adapter=None if adapter is None else str(adapter))
        for stale in [*folder.glob("model-*-of-*.safetensors"), folder / WEIGHTS, folder / WEIGHTS_INDEX]:
            if stale.name not in written and stale.is_file():
                stale.unlink()
        config = self.config.to_dict()
        config.pop("quantization_config", None)
        generation = self.generation_config.to_dict()
        if native.layout == "hf":
            config.pop("torch_dtype", None)
            config["dtype"] = dtype
        else:
            # Microsoft's code generates with its text_config's settings (generation_config.json never reaches
            # it), and loads through the remote-code files beside the weights.
            config["torch_dtype"] = dtype
            config["text_config"].update(generation)
            code_files = sorted(self._folder.glob("*.py"))
            for code in code_files:
                shutil.copyfile(code, folder / code.name)
            if not code_files:
                warnings.warn(f"{folder} is saved in Microsoft's original Florence-2 layout, but {self._folder} has "
                              "no remote-code files (*.py) to copy: transformers loads this layout only with "
                              "trust_remote_code=True and Microsoft's code files (configuration_florence2.py, "
                              "modeling_florence2.py, processing_florence2.py) beside the weights; florence2-rs "
                              "loads it as it is", UserWarning, stacklevel=2)
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n",
                                                       encoding="utf-8")

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
                generation config as in transformers; an unknown name is an error. `seed` (not in transformers)
                seeds the sampler; sampling without one draws it from torch's default generator when torch is
                imported (so `torch.manual_seed` makes a script repeat itself, as in transformers), else from
                florence2-rs' own (`florence2_rs.set_seed`). The samples repeat; they are not torch's draws.

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
        if kwargs.get("seed", settings.get("seed")) is None and kwargs.get("do_sample", settings.get("do_sample")):
            # Follows the seeds the caller set (torch.manual_seed, set_seed) as transformers' sampling does.
            kwargs["seed"] = sampling_seed()
        result = self._state.native.generate(
            as_numpy(input_ids, np.int64, "input_ids"),
            None if attention_mask is None else as_numpy(attention_mask, np.int64, "attention_mask"),
            None if pixel_values is None else as_numpy(pixel_values, np.float32, "pixel_values"),
            None if image_features is None else as_numpy(image_features, np.float32, "image_features"),
            settings,
            kwargs,
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


# transformers' `convert_file_size_to_int` units, checked in its order: (suffix, bytes, whether a lowercase "b"
# means bits).
_SIZE_UNITS = (("GIB", 2 ** 30, False), ("MIB", 2 ** 20, False), ("KIB", 2 ** 10, False),
               ("GB", 10 ** 9, True), ("MB", 10 ** 6, True), ("KB", 10 ** 3, True))


def _size_in_bytes(size: int | str) -> int:
    """`max_shard_size` in bytes, read as transformers' `convert_file_size_to_int` reads it: an integer, or an
    integer (as `int()` parses it: "5", " 5 ", "5_000") followed by a unit, "5GB" (10**9), "5 GiB" (2**30),
    "5Gb" (bits).

    Raises:
        ValueError: a size in no such form, not positive, or 2**64 bytes or more (what a safetensors offset holds).
    """
    value = None
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        value = int(size)
    elif isinstance(size, str):
        for unit, scale, bits in _SIZE_UNITS:
            if size.upper().endswith(unit):
                try:
                    value = int(size[:-len(unit)]) * scale
                except ValueError:
                    break
                if bits and size.endswith("b"):
                    value //= 8
                break
    if value is None or value <= 0:
        raise ValueError("max_shard_size must be a positive number of bytes or an integer followed by a unit, like "
                         f"\"5GB\" or \"500MiB\", got {size!r}")
    if value >= 2 ** 64:
        raise ValueError(f"max_shard_size {size!r} is {value} bytes, more than a checkpoint file can hold "
                         "(2**64 - 1); give a smaller size")
    return value


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


_WARNED_IGNORED: set[str] = set()


def _warn_ignored(names: list[str]) -> None:
    """Warns once per attribute name that a generation config set an attribute florence2-rs ignores."""
    new = sorted(set(names) - _WARNED_IGNORED)
    if new:
        _WARNED_IGNORED.update(new)
        warnings.warn(f"generation_config attributes ignored by florence2-rs (not supported here): {new}",
                      UserWarning, stacklevel=3)


def _load_native(folder: Path, dtype: str, device: str, quantize: str | None, adapter: Path | None = None) -> Any:
    """Loads the Rust model: the one place every model class loads weights through.

    `quantize` ("int8", "int4" or None) comes from `quantization_config`: the linear layers' weights are
    quantized (src/layers/linear.rs describes the formats: the VNNI/AMX kernel's where it runs, with the token
    embedding and LM head quantized too, to int8 under both settings; candle's Q8_0 / Q4_0 elsewhere, the
    embeddings and LM head in `dtype`). `adapter`: a PEFT LoRA adapter folder, merged into the weights as they load; the LoRA factors its
    config does not target are left out, as peft leaves them out, with a warning.
    """
    native = _native.NativeModel.load(folder, dtype, device, quantize=quantize,
                                      adapter=None if adapter is None else str(adapter))
    _warn_adapter_ignored(native.adapter_ignored_modules)
    return native


def _warn_adapter_ignored(modules: list[str]) -> None:
    """Warns of the modules whose LoRA factors an adapter's file holds but its config does not target (peft
    reports them as unexpected keys), at the user's call: the first frame outside this package."""
    if not modules:
        return
    shown = ", ".join(modules[:5]) + (", ..." if len(modules) > 5 else "")
    package = str(Path(__file__).resolve().parent)
    frame, stacklevel = sys._getframe(1), 2
    while frame.f_back is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(package):
        frame, stacklevel = frame.f_back, stacklevel + 1
    warnings.warn(f"the adapter's weights hold LoRA factors of {len(modules)} module(s) that adapter_config.json's "
                  f"target_modules does not target ({shown}); they are left out, as peft leaves them out",
                  UserWarning, stacklevel=stacklevel)

