"""Type stubs of the native module `florence2_rs._native` (src/bindings/*.rs). Import `florence2_rs`, not this."""

from os import PathLike
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import numpy.typing as npt

_Path = Union[str, PathLike[str]]

CUDA_BUILD: bool
"""Whether this build has the `cuda` cargo feature."""
DTYPES: list[str]
"""The dtypes a model loads in, by name: "float32", "float16", "bfloat16"."""
DTYPE_NAMES: dict[str, str]
"""Every accepted spelling of a dtype ("half", "bf16", "torch.float32" ...) to its name in `DTYPES`."""
LOCATION_BINS: int
"""How many bins location tokens quantize each axis into (`<loc_0>` .. `<loc_999>`)."""
TEXT_CONFIG_DEFAULTS: dict[str, Any]
"""BartConfig's defaults, by setting name, that the model applies to a text_config that leaves them out."""
WEIGHTS: str
"""The weights file of a checkpoint folder (`model.safetensors`)."""
WEIGHTS_INDEX: str
"""The index of a checkpoint's sharded weights (`model.safetensors.index.json`)."""
PYTORCH_WEIGHTS: str
"""The PyTorch weights file read where a checkpoint has no safetensors (`pytorch_model.bin`)."""
PYTORCH_WEIGHTS_INDEX: str
"""The index of a checkpoint's sharded PyTorch weights (`pytorch_model.bin.index.json`)."""
ADAPTER_CONFIG: str
"""The config file of a PEFT adapter folder (`adapter_config.json`)."""
ADAPTER_WEIGHTS: str
"""A PEFT adapter's weights (`adapter_model.safetensors`)."""
ADAPTER_WEIGHTS_BIN: str
"""A PEFT adapter's weights as older peft saves them (`adapter_model.bin`)."""
TASKS_WITHOUT_INPUT: tuple[str, ...]
"""The processor's tasks whose prompt is the task token alone, in its table order."""
TASKS_WITH_INPUT: tuple[str, ...]
"""The processor's tasks that take an input after the token, in its table order."""

def cuda_available() -> bool:
    """True when this is a CUDA build and GPU 0 can be opened."""

def check_alloc(what: str, bytes: int) -> None:
    """Raises ValueError naming `what` when `bytes` is more than one allocation may take
    (FLORENCE2_MAX_ALLOC_BYTES; default the smaller of 64 GiB and the machine's memory)."""

def profile_enable(enabled: bool) -> None:
    """Turns the operation profile's recording on or off (benches/tower_profile.py)."""

def profile_take() -> list[tuple[Optional[int], str, int, float, float]]:
    """The profile recorded since the last call as (stage, kind, calls, self seconds, flops) rows, and clears it."""

class Florence2Error(Exception):
    """Base class of the errors raised by florence2_rs that are not plain ValueError/OSError."""

class NativeModel:
    """The loaded Rust model; immutable, so threads may share it. Heavy calls release the GIL."""

    @staticmethod
    def load(
        path: _Path, dtype: str, device: str, quantize: Optional[str] = None, adapter: Optional[_Path] = None
    ) -> NativeModel:
        """Loads a checkpoint folder (either layout). dtype: "auto", "float32", "float16" or "bfloat16";
        device: "cpu", "cuda" or "cuda:N"; quantize: None, "int8" or "int4"; adapter: a PEFT adapter folder to
        merge."""
    @staticmethod
    def save_weights(
        source: _Path, out: _Path, dtype: str, max_shard_size: int, adapter: Optional[str] = None
    ) -> list[str]:
        """save_pretrained's weights: the checkpoint folder `source` (the adapter folder merged) written into `out`
        in the layout of `source` (HF-native or Microsoft's), floating tensors in `dtype`, sharded above
        max_shard_size bytes; the file names."""
    @property
    def adapter_ignored_modules(self) -> list[str]:
        """The modules whose LoRA factors the adapter's file holds but its config does not target (sorted): not
        merged, as peft leaves them out. Empty without an adapter."""
    @property
    def layout(self) -> str:
        """"hf" or "original"."""
    @property
    def dtype(self) -> str:
        """The name in `DTYPES` of the dtype the model was loaded in."""
    def vision_features(self, pixel_values: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The vision tower's last hidden state [B, C, H', W'] for pixel_values [B, 3, H, W]."""
    def get_image_features(
        self, pixel_values: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """One tower pass: (the vision tower's last hidden state [B, C, H', W'], the projected image tokens
        [B, 1 + H'W', d_model])."""
    def forward(
        self,
        input_ids: npt.NDArray[np.int64],
        decoder_input_ids: npt.NDArray[np.int64],
        attention_mask: Optional[npt.NDArray[np.int64]] = None,
        pixel_values: Optional[npt.NDArray[np.float32]] = None,
        image_features: Optional[npt.NDArray[np.float32]] = None,
    ) -> dict[str, Optional[npt.NDArray[np.float32]]]:
        """{"last_hidden_state", "logits", "encoder_last_hidden_state", "image_hidden_states"} (the last None
        without images)."""
    def generate(
        self,
        input_ids: npt.NDArray[np.int64],
        attention_mask: Optional[npt.NDArray[np.int64]] = None,
        pixel_values: Optional[npt.NDArray[np.float32]] = None,
        image_features: Optional[npt.NDArray[np.float32]] = None,
        config: Optional[dict[str, Any]] = None,
        kwargs: Optional[dict[str, Any]] = None,
    ) -> dict[str, Any]:
        """config: generation-config attributes (unknown ones ignored; None: the checkpoint's
        generation_config); kwargs: generate() keywords (unknown ones are errors), applied after config over
        transformers' global defaults. Values are None, bool, int, finite float, str, lists, tuples, sets
        and dicts of them, or numpy/torch scalars and arrays (by `tolist()`). Returns {"sequences": int64 [N, T], "token_scores": float32 [N, T-1],
        "return_dict_in_generate": bool, "sequences_scores": float32 [N] | None,
        "scores": list of float32 [rows, vocab] | None, "ignored": names of the ignored config attributes}."""
    @property
    def generation_config(self) -> dict[str, Any]:
        """The checkpoint's generation settings (those that are set) as its layout's code resolves them."""

class ProcessorCore:
    """Tokenizer, image preprocessing, prompts and post-processing of one checkpoint."""

    @staticmethod
    def from_dir(path: _Path) -> ProcessorCore:
        """Loads the processor files of a local checkpoint folder."""
    @property
    def image_token_id(self) -> Optional[int]:
        """`<image>`'s id in the HF-native layout, else None."""
    @property
    def bos_token_id(self) -> int: ...
    @property
    def eos_token_id(self) -> int: ...
    @property
    def pad_token_id(self) -> int: ...
    @property
    def model_max_length(self) -> int: ...
    def vocab_len(self) -> int:
        """Vocabulary size with the added tokens."""
    def image_settings(self) -> dict[str, Any]:
        """The image-processor settings as plain values."""
    def build_prompts(self, texts: list[str]) -> list[str]:
        """Task tokens replaced by their prompts."""
    def encode_prompts(
        self,
        texts: list[str],
        with_images: bool,
        padding: str = "do_not_pad",
        truncation: Optional[bool] = None,
        max_length: Optional[int] = None,
        pad_to_multiple_of: Optional[int] = None,
        add_special_tokens: bool = False,
        truncation_side: str = "right",
    ) -> tuple[list[list[int]], list[list[int]]]:
        """(input_ids, attention_mask) of the processor's text encoding."""
    def tokenize(
        self,
        texts: list[str],
        add_special_tokens: bool = True,
        padding: str = "do_not_pad",
        truncation: Optional[bool] = None,
        max_length: Optional[int] = None,
        pad_to_multiple_of: Optional[int] = None,
        truncation_side: str = "right",
    ) -> tuple[list[list[int]], list[list[int]]]:
        """(input_ids, attention_mask) of plain tokenization (no task prompts)."""
    def preprocess(
        self,
        images: list[tuple[npt.NDArray[Any], bool]],
        *,
        do_resize: Optional[bool] = None,
        size: Optional[dict[str, int]] = None,
        resample: Optional[int] = None,
        do_center_crop: Optional[bool] = None,
        crop_size: Optional[dict[str, int]] = None,
        do_rescale: Optional[bool] = None,
        rescale_factor: Optional[float] = None,
        do_normalize: Optional[bool] = None,
        image_mean: Optional[Union[float, list[float]]] = None,
        image_std: Optional[Union[float, list[float]]] = None,
        do_pad: Optional[bool] = None,
        pad_size: Optional[dict[str, int]] = None,
    ) -> list[npt.NDArray[Any]]:
        """pixel_values, one [3, H, W] array per image (float32; float64 for a float64 image left unrescaled), from
        (H×W×3 uint8 / float32 / float64 array, from_unit_float) pairs; the keywords override the checkpoint's
        image settings for this call."""
    def batch_decode(self, sequences: list[list[int]], skip_special_tokens: bool) -> list[str]: ...
    def token_to_id(self, token: str) -> Optional[int]: ...
    def id_to_token(self, id: int) -> Optional[str]: ...
    def is_special(self, id: int) -> bool: ...
    def post_process_generation(
        self,
        task: str,
        text: Optional[str] = None,
        sequence: Optional[list[int]] = None,
        image_size: Optional[tuple[float, float]] = None,
    ) -> dict[str, Any]:
        """{task: answer}: a string or a dict of boxes/polygons and labels."""
    def post_process_sequence(
        self,
        task: str,
        sequence: list[int],
        image_size: Optional[tuple[float, float]] = None,
    ) -> tuple[dict[str, Any], list[Optional[list[int]]]]:
        """({task: answer} of the decoded ids, per box the indices in `sequence` of its location tokens)."""

def hub_download(
    repo_id: str,
    files: list[str],
    optional_files: list[str],
    *,
    subfolder: Optional[str] = None,
    revision: Optional[str] = None,
    cache_dir: Optional[_Path] = None,
    token: Optional[str] = None,
    anonymous: bool = False,
    local_files_only: bool = False,
    force_download: bool = False,
) -> Path:
    """Makes sure the Hugging Face cache holds the files of a Hub repository (those of `subfolder` in it);
    returns the snapshot folder (with `subfolder`, the folder below it)."""

def check_subfolder(subfolder: str) -> str:
    """transformers' `subfolder` as a `/`-separated relative path ("" for the top level); ValueError for one
    that could lead out of the checkpoint folder or repository."""

def checkpoint_layout(config: dict[str, Any]) -> str:
    """The checkpoint layout config.json's content follows: "hf" or "original" (Microsoft's)."""
