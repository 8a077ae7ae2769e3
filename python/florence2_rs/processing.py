"""Florence-2 processor with transformers' API: `Florence2Processor` and `AutoProcessor`.

The work (prompts, tokenization, resizing, post-processing) happens in Rust (`ProcessorCore`); this
module converts Python inputs the way transformers does and shapes the outputs like transformers.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ._native import ProcessorCore, check_alloc
from .batch_feature import BatchFeature
from .hub import resolve_checkpoint

__all__ = ["AutoProcessor", "Florence2Processor", "Florence2ImageProcessor", "Florence2Tokenizer"]

logger = logging.getLogger(__name__)

# The files a processor reads: the tokenizer, the image settings (released: preprocessor_config.json;
# transformers 5: processor_config.json) and config.json, which tells the checkpoint layout.
_PROCESSOR_FILES = ("tokenizer_config.json", "preprocessor_config.json", "processor_config.json", "config.json")
# The processor files `save_pretrained` writes where the loaded checkpoint had them: the above and the
# tokenizer's other files, which transformers' tokenizer reads beside tokenizer.json.
_SAVED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                "vocab.json", "merges.txt", "preprocessor_config.json", "processor_config.json")


# ---------------------------------------------------------------------------------------------
# Images: to H×W×3 uint8, as transformers' PIL backend does before it resizes.


def _pil():
    from PIL import Image

    return Image


# Bytes per pixel the conversions below may hold at once, checked before they start (an allocation that
# fails can take the process down): for a PIL image the RGBA image, the white background and the composite,
# then the RGB array; for an array, a float64 or int64 working copy per value and two uint8 RGB copies
# (numpy's and the Rust side's).
_PIL_BYTES_PER_PIXEL = 4 * 3 + 3
_ARRAY_BYTES_PER_VALUE = 8 + 2


def _pil_to_rgb(image) -> np.ndarray:
    """transformers' `convert_to_rgb`: transparency is composited onto white, then RGB."""
    Image = _pil()
    width, height = image.size
    check_alloc(f"converting a {width}x{height} image to RGB", width * height * _PIL_BYTES_PER_PIXEL)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return np.asarray(image.convert("RGB"))


def _channels_last(array: np.ndarray, input_data_format: str | None = None) -> np.ndarray:
    """(H, W, C) from (C, H, W) or (H, W, C): as `input_data_format` says ("channels_first" /
    "channels_last"), else inferred as transformers does (C in 1, 3, 4, channels first preferred)."""
    if array.ndim == 2:
        return array[..., None]
    if array.ndim != 3:
        raise ValueError(f"Unsupported number of image dimensions: {array.ndim}")
    if input_data_format == "channels_first":
        return np.moveaxis(array, 0, -1)
    if input_data_format == "channels_last":
        return array
    if array.shape[0] in (1, 3, 4):
        return np.moveaxis(array, 0, -1)
    if array.shape[-1] in (1, 3, 4):
        return array
    raise ValueError(f"Unable to infer channel dimension format of an image of shape {array.shape}")


def _array_to_rgb(array: np.ndarray, resized: bool, input_data_format: str | None) -> tuple[np.ndarray, bool]:
    """A numpy image as transformers takes it: RGB, then brought to uint8 (as a PIL image) where it is
    resized, with True when it was float in [0, 1] (transformers then rescales the resized values
    twice, reproduced in Rust); where nothing resizes it, its values in their own dtype (see
    `_unresized_values`)."""
    image = _channels_last(np.asarray(array), input_data_format)
    if image.dtype.kind not in "biuf":
        raise ValueError(f"Unsupported image dtype {image.dtype}: pass uint8 values, or floats in [0, 1]")
    check_alloc(f"converting an image array of shape {image.shape}", image.size * _ARRAY_BYTES_PER_VALUE)
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise ValueError("The image contains NaN or infinite values; pass uint8 values, or floats in [0, 1]")
    channels = image.shape[-1]
    if channels == 1:
        image = np.repeat(image, 3, axis=-1)
    elif channels == 4:
        if np.issubdtype(image.dtype, np.floating) and (image.min() < 0.0 or image.max() > 1.0):
            raise ValueError(
                f"The image to be converted to RGB contains values outside the range [0, 1], got [{image.min()}, {image.max()}]."
            )
        white = 255 if np.issubdtype(image.dtype, np.integer) else 1.0
        alpha = image[..., 3:4] / white
        composite = alpha * image[..., :3] + (1 - alpha) * white
        image = np.round(composite).astype(image.dtype) if white == 255 else composite.astype(image.dtype)
    if image.dtype == np.uint8 or not resized:
        return np.ascontiguousarray(image), False
    if np.allclose(image, image.astype(int)):
        if np.all(image >= 0) and np.all(image <= 255):
            return np.ascontiguousarray(image.astype(np.uint8)), False
        raise ValueError(
            "The image to be converted to a PIL image contains values outside the range [0, 255], "
            f"got [{image.min()}, {image.max()}] which cannot be converted to uint8."
        )
    if np.all(image >= 0) and np.all(image <= 1):
        scaled = (image.astype(np.float64) * 255).astype(np.float32)
        return np.ascontiguousarray(scaled.astype(np.uint8)), True
    raise ValueError(
        "The image to be converted to a PIL image contains values outside the range [0, 1], "
        f"got [{image.min()}, {image.max()}] which cannot be converted to uint8."
    )


def _unresized_values(pixels: np.ndarray, rescaled: bool, normalized: bool) -> np.ndarray:
    """The array the native preprocessing takes for an image: uint8, float32 and float64 as they are;
    other dtypes (integers, bool, float16) as float64, which holds their values exactly, except where
    transformers normalizes them without rescaling: integers and bool become float32 first (as its
    `normalize` casts them), float16 values float32 for `_half_normalized`."""
    if pixels.dtype in (np.uint8, np.float32, np.float64):
        return pixels
    if normalized and not rescaled:
        return pixels.astype(np.float32)
    return pixels.astype(np.float64)


def load_image(source):
    """transformers' `load_image` of a file (a path, a file object or bytes): turned upright by its EXIF
    orientation, then RGB (an alpha channel is dropped, not composited as for PIL images given directly)."""
    from PIL import ImageOps

    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    with _pil().open(source) as opened:
        width, height = opened.size
        check_alloc(f"reading a {width}x{height} image", width * height * _PIL_BYTES_PER_PIXEL)
        return ImageOps.exif_transpose(opened).convert("RGB")


def _to_rgb(image, resized: bool = True, convert_rgb: bool = True, input_data_format: str | None = None):
    """(H×W×3 array, from_unit_float) for the native preprocessing: uint8, or float32 / float64 values where
    nothing resizes them (see `_array_to_rgb`). Without `convert_rgb` an image that is not RGB is an
    error (transformers would hand a 1- or 4-channel image to a model that needs 3)."""
    if isinstance(image, (str, os.PathLike)):
        return np.asarray(load_image(image)), False
    if hasattr(image, "getbands"):
        if not convert_rgb and image.mode != "RGB":
            raise ValueError(
                f"do_convert_rgb=False with a {image.mode} image: Florence-2 needs RGB images; "
                "pass do_convert_rgb=True or convert the image"
            )
        return _pil_to_rgb(image), False
    if hasattr(image, "detach") and hasattr(image, "numpy"):  # a torch tensor
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        if not convert_rgb:
            channels = _channels_last(image, input_data_format).shape[-1]
            if channels != 3:
                raise ValueError(
                    f"do_convert_rgb=False with a {channels}-channel image: Florence-2 needs RGB images; "
                    "pass do_convert_rgb=True or convert the image"
                )
        return _array_to_rgb(image, resized, input_data_format)
    raise ValueError(f"Unsupported image type {type(image).__name__}: pass PIL images, numpy arrays or file paths")


def _flatten_images(images) -> list:
    if isinstance(images, (list, tuple)):
        flat = []
        for item in images:
            flat.extend(item if isinstance(item, (list, tuple)) else [item])
        return flat
    return [images]


# ---------------------------------------------------------------------------------------------
# Per-call keywords, taken as transformers 5.23's processor call takes them (ProcessorMixin._merge_kwargs):
# a flat keyword goes to every modality that accepts it, `text_kwargs=` / `images_kwargs=` hold one
# modality's, `common_kwargs=` every modality's; a flat keyword no modality accepts is logged and ignored.

_TEXT_KWARGS = frozenset({
    "text_pair", "text_target", "text_pair_target", "add_special_tokens", "padding", "truncation", "max_length",
    "stride", "is_split_into_words", "pad_to_multiple_of", "return_token_type_ids", "return_attention_mask",
    "return_overflowing_tokens", "return_special_tokens_mask", "return_offsets_mapping", "return_length", "verbose",
    "padding_side", "return_mm_token_type_ids", "return_text_replacement_offsets", "sanitize_control_tokens",
    "return_tensors",
})
# CLIPImageProcessor's (PIL backend) keywords.
_IMAGES_KWARGS = frozenset({
    "do_convert_rgb", "do_resize", "size", "default_to_square", "crop_size", "resample", "do_rescale",
    "rescale_factor", "do_normalize", "image_mean", "image_std", "do_pad", "pad_size", "do_center_crop",
    "data_format", "input_data_format", "device", "return_tensors", "disable_grouping", "image_seq_length",
})
# Accepted because transformers' processor accepts them; Florence-2 takes no videos or audio.
_VIDEOS_KWARGS = frozenset({
    "do_convert_rgb", "do_resize", "size", "default_to_square", "resample", "do_rescale", "rescale_factor",
    "do_normalize", "image_mean", "image_std", "do_center_crop", "do_pad", "crop_size", "data_format",
    "input_data_format", "device", "do_sample_frames", "video_metadata", "fps", "num_frames", "return_metadata",
    "return_tensors",
})
_AUDIO_KWARGS = frozenset({
    "sampling_rate", "raw_speech", "padding", "max_length", "truncation", "pad_to_multiple_of",
    "return_attention_mask", "device", "return_tensors", "load_audio_backend",
})
_MODALITY_KWARGS = {
    "text_kwargs": _TEXT_KWARGS, "images_kwargs": _IMAGES_KWARGS,
    "videos_kwargs": _VIDEOS_KWARGS, "audio_kwargs": _AUDIO_KWARGS,
}
# Processor-level keywords that the text side reads too.
_PROCESSOR_KWARGS = frozenset({"return_mm_token_type_ids", "return_text_replacement_offsets"})

# The keywords of Microsoft's remote-code processor call (processing_florence2.py), with its defaults, and
# those of them it hands to the image processor; it takes no others. Its `return_tensors` default, "pt", holds
# where torch is imported (every script written for the remote code imports it); without torch it is "np", so
# that the call never imports torch for the caller.
_MICROSOFT_CALL_KWARGS = {
    "tokenize_newline_separately": True, "padding": False, "truncation": None, "max_length": None,
    "return_tensors": "pt", "do_resize": None, "do_normalize": None, "image_mean": None, "image_std": None,
    "data_format": "channels_first", "input_data_format": None, "resample": None, "do_convert_rgb": None,
    "do_thumbnail": None, "do_align_long_axis": None, "do_rescale": None,
}
_MICROSOFT_IMAGE_KWARGS = ("do_resize", "do_normalize", "image_mean", "image_std", "input_data_format",
                           "data_format", "resample", "do_convert_rgb")

# Text keywords this package does not compute: refused unless given their no-op value.
_UNSUPPORTED_TEXT = {
    "text_pair": None, "text_target": None, "text_pair_target": None, "stride": 0, "is_split_into_words": False,
    "return_overflowing_tokens": False, "return_offsets_mapping": False, "sanitize_control_tokens": False,
    "return_text_replacement_offsets": False,
}

_warned_keywords: set[str] = set()


def _is_bool(value) -> bool:
    return isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer))


def _is_float(value) -> bool:
    # transformers' strict typing takes float for float fields, not int.
    return isinstance(value, (float, np.floating))


def _is_size(value) -> bool:
    # transformers' strict typing takes Python ints for sizes, not numpy integers.
    if isinstance(value, int):
        return True
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, int) for v in value)
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, int) for k, v in value.items())


def _is_floats(value) -> bool:
    return _is_float(value) or (isinstance(value, (list, tuple)) and all(_is_float(v) for v in value))


def _is_str_like(value) -> bool:
    return isinstance(value, str) or isinstance(getattr(value, "value", None), str)


# The type each keyword must have (None is always accepted), as transformers' typed dicts check them.
_TYPE_CHECKS = {
    **dict.fromkeys(
        ["add_special_tokens", "is_split_into_words", "return_token_type_ids", "return_attention_mask",
         "return_overflowing_tokens", "return_special_tokens_mask", "return_offsets_mapping", "return_length",
         "verbose", "return_mm_token_type_ids", "return_text_replacement_offsets", "sanitize_control_tokens",
         "do_convert_rgb", "do_resize", "default_to_square", "do_rescale", "do_normalize", "do_pad",
         "do_center_crop", "disable_grouping"],
        (_is_bool, "bool"),
    ),
    **dict.fromkeys(["max_length", "stride", "pad_to_multiple_of", "image_seq_length"], (_is_int, "int")),
    **dict.fromkeys(["size", "crop_size", "pad_size"], (_is_size, "int, list[int], tuple[int, ...] or dict[str, int]")),
    **dict.fromkeys(["image_mean", "image_std"], (_is_floats, "float, list[float] or tuple[float, ...]")),
    "rescale_factor": (_is_float, "float"),
    "resample": (_is_int, "PIL.Image.Resampling or int"),
    "padding": (lambda v: _is_bool(v) or _is_str_like(v), "bool, str or PaddingStrategy"),
    "truncation": (lambda v: _is_bool(v) or _is_str_like(v), "bool, str or TruncationStrategy"),
    "padding_side": (lambda v: v in ("left", "right"), "'left' or 'right'"),
    "return_tensors": (_is_str_like, "str or TensorType"),
    "data_format": (_is_str_like, "str or ChannelDimension"),
    "input_data_format": (_is_str_like, "str or ChannelDimension"),
}


def _check_types(options: dict) -> None:
    """Raises TypeError for a keyword whose value transformers' typed dicts refuse."""
    for key, value in options.items():
        check = _TYPE_CHECKS.get(key)
        if value is not None and check is not None and not check[0](value):
            raise TypeError(f"Field {key!r} expected {check[1]}, got {type(value).__name__} (value: {value!r})")


def _split_call_kwargs(kwargs: dict, defaults: dict | None = None) -> tuple[dict, dict, dict]:
    """(text options, image options, processor options) of a processor call's keywords, over `defaults`
    (the tokenizer's settings: each one that is a keyword of a modality, for that modality).

    Raises:
        ValueError: a keyword given both flat and in its modality's dict.
        TypeError: a keyword of the wrong type, or an image keyword CLIPImageProcessor does not take (in
            ``images_kwargs`` or ``common_kwargs``).
    """
    text, images, processor = {}, {}, {}
    outputs = {"text_kwargs": text, "images_kwargs": images, "videos_kwargs": {}, "audio_kwargs": {}}
    for key, value in (defaults or {}).items():
        for modality, valid in _MODALITY_KWARGS.items():
            if key in valid:
                outputs[modality][key] = value
    common = kwargs.get("common_kwargs") or {}
    for options in outputs.values():
        options.update(common)
    for key, value in kwargs.items():
        if key == "common_kwargs":
            continue
        if key in _MODALITY_KWARGS:
            if not isinstance(value, dict):
                raise TypeError(f"{key} must be a dict of keyword arguments, got {type(value).__name__}")
            for subkey, subvalue in value.items():
                # A processor keyword given flat and in the dict with the same value is taken once.
                if subkey in _PROCESSOR_KWARGS and subkey in kwargs and kwargs[subkey] == subvalue:
                    continue
                if subkey in kwargs and subkey in _MODALITY_KWARGS[key]:
                    raise ValueError(
                        f"Keyword argument {subkey} was passed two times:\nin a dictionary for {key} and as a **kwarg."
                    )
                outputs[key][subkey] = subvalue
        elif key in _PROCESSOR_KWARGS:
            processor[key] = value
        elif any(key in valid for valid in _MODALITY_KWARGS.values()):
            for modality, valid in _MODALITY_KWARGS.items():
                if key in valid:
                    outputs[modality][key] = value
        elif key not in ("text", "images", "videos", "audio") and key not in _warned_keywords:
            _warned_keywords.add(key)
            logger.warning(f"Keyword argument `{key}` is not a valid argument for this processor and will be ignored.")
    for key in _PROCESSOR_KWARGS:
        if key in processor:
            text[key] = processor[key]
        elif key in text:
            processor[key] = text[key]
    unknown = set(images) - _IMAGES_KWARGS
    if unknown:
        raise TypeError(f"ImagesKwargs.__init__() got an unexpected keyword argument {sorted(unknown)[0]!r}")
    _check_types(text)
    _check_types(images)
    return text, images, processor


def _plain(value):
    """A setting as JSON holds it: numpy arrays and scalars as lists and numbers, tuples as lists."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _size_dict(size, default_to_square: bool, name: str) -> dict:
    """transformers' `get_size_dict`: an int is a square (or, without `default_to_square`, the shortest
    edge), a sequence (height, width)."""
    if isinstance(size, dict):
        return {str(k): int(v) for k, v in size.items()}
    if _is_int(size):
        return {"height": int(size), "width": int(size)} if default_to_square else {"shortest_edge": int(size)}
    if isinstance(size, (list, tuple)) and len(size) >= 2:
        return {"height": int(size[0]), "width": int(size[1])}
    raise ValueError(f"Could not convert {name} input to size dict: {size!r}")


def _image_call_settings(options: dict, defaults: dict) -> tuple[dict, dict]:
    """(conversion settings for the Python side, overrides for the native `preprocess`) of a call's
    image options over the checkpoint's `defaults`.

    A keyword given as None counts as given (transformers keeps it): a step switched off, or, for the
    value of a step that is on, the error transformers raises.
    """
    def value(key):
        return options[key] if key in options else defaults.get(key)

    settings = {
        "do_resize": bool(value("do_resize")),
        "do_convert_rgb": bool(value("do_convert_rgb")),
        "input_data_format": getattr(options.get("input_data_format"), "value", options.get("input_data_format")),
    }
    if settings["input_data_format"] not in (None, "channels_first", "channels_last"):
        raise ValueError(
            f"input_data_format must be 'channels_first' or 'channels_last', got {settings['input_data_format']!r}"
        )
    flags = ["do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_pad"]
    overrides = {key: bool(options[key]) for key in flags if key in options}
    on = {key: bool(value(key)) for key in flags}
    if on["do_rescale"] and value("rescale_factor") is None:
        raise ValueError("`rescale_factor` must be specified if `do_rescale` is `True`.")
    if on["do_normalize"] and (value("image_mean") is None or value("image_std") is None):
        raise ValueError("`image_mean` and `image_std` must both be specified if `do_normalize` is `True`.")
    if on["do_center_crop"] and value("crop_size") is None:
        raise ValueError("`crop_size` must be specified if `do_center_crop` is `True`.")
    if on["do_resize"] and (value("size") is None or value("resample") is None):
        raise ValueError("`size` and `resample` must be specified if `do_resize` is `True`.")
    default_to_square = bool(options.get("default_to_square") or False)
    if options.get("size") is not None:
        overrides["size"] = _size_dict(options["size"], default_to_square, "size")
    for key in ("crop_size", "pad_size"):
        if options.get(key) is not None:
            overrides[key] = _size_dict(options[key], True, key)
    if options.get("resample") is not None:
        overrides["resample"] = int(options["resample"])
    if options.get("rescale_factor") is not None:
        overrides["rescale_factor"] = float(options["rescale_factor"])
    for key in ("image_mean", "image_std"):
        if options.get(key) is not None:
            mean = options[key]
            overrides[key] = float(mean) if _is_float(mean) else [float(v) for v in mean]
    return settings, overrides


def _check_text_options(options: dict) -> None:
    """Refuses text keywords this package does not compute, unless they are given their no-op value."""
    for key, inactive in _UNSUPPORTED_TEXT.items():
        if options.get(key, inactive) not in (inactive, None):
            raise NotImplementedError(
                f"florence2-rs does not implement `{key}` in the processor and tokenizer calls; "
                "leave it out (transformers' Florence-2 does not use it either)"
            )
    if "padding" in options and options["padding"] is None:
        raise ValueError(
            "None is not a valid PaddingStrategy, please select one of ['longest', 'max_length', 'do_not_pad']"
        )
    if "add_special_tokens" in options and options["add_special_tokens"] is None:
        raise TypeError("'None' is not an instance of 'bool'")


def _text_outputs(ids, mask, options: dict, added_special: bool, image_token_id) -> dict:
    """The tokenizer's outputs for (right-padded) ids and mask, as the options ask: the padding moved to
    the left, token_type_ids, special_tokens_mask (added `<s>` / `</s>` and padding), length,
    mm_token_type_ids (the `<image>` positions), attention_mask left out."""
    if options.get("padding_side") == "left":
        moved_ids, moved_mask = [], []
        for row_ids, row_mask in zip(ids, mask):
            n = sum(row_mask)
            moved_ids.append(row_ids[n:] + row_ids[:n])
            moved_mask.append(row_mask[n:] + row_mask[:n])
        ids, mask = moved_ids, moved_mask
    data = {"input_ids": ids}
    if options.get("return_token_type_ids"):
        data["token_type_ids"] = [[0] * len(row) for row in ids]
    if options.get("return_attention_mask", True) is not False:
        data["attention_mask"] = mask
    if options.get("return_special_tokens_mask"):
        special = []
        for row_mask in mask:
            real = [i for i, m in enumerate(row_mask) if m]
            ends = {real[0], real[-1]} if added_special and real else set()
            special.append([1 if (not m or i in ends) else 0 for i, m in enumerate(row_mask)])
        data["special_tokens_mask"] = special
    if options.get("return_length"):
        data["length"] = [len(row) for row in ids]
    if options.get("return_mm_token_type_ids"):
        data["mm_token_type_ids"] = [[int(i == image_token_id) for i in row] for row in ids]
    return data


class Florence2ImageProcessor:
    """The image half of the processor: `pixel_values` like transformers' CLIPImageProcessor (PIL
    backend): bicubic resize to `size`, rescale, normalize.

    Non-RGB images are converted as transformers does with ``do_convert_rgb=True`` (transparency
    composited onto white), whatever the checkpoint's ``do_convert_rgb`` says.
    """

    def __init__(self, core: ProcessorCore):
        self._core = core
        # The attributes are copies, so that a setting edited in place (`size["height"] = 64`) differs from
        # the checkpoint's.
        self._checkpoint_settings = core.image_settings()
        for key, value in self._checkpoint_settings.items():
            setattr(self, key, copy.deepcopy(value))

    def __call__(self, images, return_tensors: str | None = None, **kwargs) -> BatchFeature:
        """Preprocesses one image or a list of images.

        Args:
            images: PIL images, numpy arrays (H×W×C or C×H×W uint8, or float in [0, 1]), torch tensors or
                paths.
            return_tensors: "np", "pt" or None (a list of per-image arrays).
            **kwargs: CLIPImageProcessor's keywords, each overriding the checkpoint's setting for this call:
                ``do_resize``, ``size`` (a size dict, an int (the shortest edge, or a square with
                ``default_to_square=True``) or (height, width)), ``resample`` (PIL code 0-5), ``do_center_crop``,
                ``crop_size``, ``do_rescale``, ``rescale_factor``, ``do_normalize``, ``image_mean``,
                ``image_std``, ``do_pad``, ``pad_size``, ``do_convert_rgb``, ``input_data_format``;
                ``data_format``, ``device``, ``disable_grouping`` and ``image_seq_length`` are accepted and, as
                in transformers' PIL backend, change nothing.

        Returns:
            BatchFeature with ``pixel_values`` of shape [B, 3, H, W] (float32; uint8 when neither rescaled
            nor normalized).

        Raises:
            TypeError: a keyword CLIPImageProcessor does not take, or a value of the wrong type.
            ValueError: a bad size dict, mean or std, resample code or image.
        """
        unknown = set(kwargs) - _IMAGES_KWARGS
        if unknown:
            raise TypeError(f"ImagesKwargs.__init__() got an unexpected keyword argument {sorted(unknown)[0]!r}")
        _check_types(kwargs)
        pixel_values = self._pixel_values(images, kwargs, stack=return_tensors is not None)
        return BatchFeature({"pixel_values": pixel_values}, return_tensors)

    def _half_normalized(self, values: list, half: list, options: dict, overrides: dict) -> list:
        """The arrays of images of which those at `half` are float16 images normalized without rescaling,
        which transformers normalizes in float16 arithmetic (mean and std rounded to float16): these are
        cropped in Rust and normalized here, the others preprocessed in Rust; padding (after normalizing)
        is done here for both."""
        def value(key):
            return options[key] if key in options else self._checkpoint_settings.get(key)

        unpadded = {**overrides, "do_pad": False}
        rest = [i for i in range(len(values)) if i not in half]
        arrays = [None] * len(values)
        for indices, extra in ((rest, {}), (half, {"do_normalize": False})):
            if indices:
                done = self._core.preprocess([values[i] for i in indices], **unpadded, **extra)
                for i, array in zip(indices, done):
                    arrays[i] = array
        mean, std = (np.asarray(value(key), dtype=np.float16).reshape(-1, 1, 1)
                     for key in ("image_mean", "image_std"))
        for i in half:
            arrays[i] = (arrays[i].astype(np.float16) - mean) / std
        if not bool(value("do_pad")):
            return arrays
        if value("pad_size") is None:
            height, width = max(a.shape[1] for a in arrays), max(a.shape[2] for a in arrays)
        else:
            pad_size = _size_dict(value("pad_size"), True, "pad_size")
            height, width = pad_size["height"], pad_size["width"]
        padded = []
        for array in arrays:
            if array.shape[1] > height or array.shape[2] > width:
                raise ValueError(
                    "Padding dimensions are negative. Please make sure that the `pad_size` is larger than the "
                    f"image size. Got pad_size=({height}, {width}), image_size={array.shape[1:]}."
                )
            out = np.zeros((array.shape[0], height, width), dtype=array.dtype)
            out[:, :array.shape[1], :array.shape[2]] = array
            padded.append(out)
        return padded

    def _changed_settings(self) -> dict:
        """The settings whose attribute was changed since loading, by name, as plain values (see `_plain`)."""
        current = {key: _plain(getattr(self, key, value)) for key, value in self._checkpoint_settings.items()}
        return {key: value for key, value in current.items() if value != self._checkpoint_settings[key]}

    def _write_changed_settings(self, folder: Path) -> None:
        """Writes the changed settings into every image settings file of a saved processor folder
        (processor_config.json's ``image_processor``, which transformers reads first, and
        preprocessor_config.json; processor_config.json gets an ``image_processor`` where neither has
        settings); sizes as the size dicts transformers' `get_size_dict` makes of them."""
        changed = self._changed_settings()
        if not changed:
            return
        for key, default_to_square in (("size", False), ("crop_size", True), ("pad_size", True)):
            if changed.get(key) is not None:
                changed[key] = _size_dict(changed[key], default_to_square, key)
        preprocessor, processor = folder / "preprocessor_config.json", folder / "processor_config.json"
        documents = {path: json.loads(path.read_text(encoding="utf-8"))
                     for path in (preprocessor, processor) if path.is_file()}
        holders = [document if path == preprocessor else document["image_processor"]
                   for path, document in documents.items()
                   if path == preprocessor or isinstance(document.get("image_processor"), dict)]
        if not holders:
            documents.setdefault(processor, {})
            holders = [documents[processor].setdefault("image_processor", {})]
        for settings in holders:
            settings.update(changed)
        for path, document in documents.items():
            path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    def _pixel_values(self, images, options: dict, stack: bool):
        """float32 [B, 3, H, W] array (with `stack`; else a list of [3, H, W] arrays) of images with the
        call's `options` over this processor's settings (its attributes, which a user may change)."""
        options = {**self._changed_settings(), **options}
        settings, overrides = _image_call_settings(options, self._checkpoint_settings)
        converted = [
            _to_rgb(image, settings["do_resize"], settings["do_convert_rgb"], settings["input_data_format"])
            for image in _flatten_images(images)
        ]

        def on(key):
            return bool(options[key] if key in options else self._checkpoint_settings.get(key))

        rescaled, normalized = on("do_rescale"), on("do_normalize")
        values = [(_unresized_values(pixels, rescaled, normalized), flag) for pixels, flag in converted]
        half = [i for i, (pixels, _) in enumerate(converted)
                if pixels.dtype == np.float16 and normalized and not rescaled]
        if half:
            arrays = self._half_normalized(values, half, options, overrides)
        else:
            arrays = self._core.preprocess(values, **overrides)
        # transformers keeps the dtype of values nothing makes float (uint8, integers, bool, float16).
        arrays = [
            array.astype(pixels.dtype) if not from_unit_float and not rescaled and
            (not normalized or pixels.dtype == np.float16) else array
            for array, (pixels, from_unit_float) in zip(arrays, converted)
        ]
        if not stack:
            return arrays
        shapes = sorted({array.shape for array in arrays})
        if len(shapes) > 1:
            raise ValueError(
                f"Unable to stack pixel_values of different shapes {shapes}: resize them (do_resize=True), pad them "
                "(do_pad=True), or pass return_tensors=None for a list"
            )
        check_alloc(f"stacking {len(arrays)} images", sum(array.nbytes for array in arrays))
        return np.stack(arrays) if arrays else np.zeros((0, 3, 0, 0), np.float32)


class Florence2Tokenizer:
    """The tokenizer half of the processor, with the common methods of a transformers tokenizer."""

    def __init__(self, core: ProcessorCore, init_kwargs: dict | None = None):
        """
        Args:
            core: the native processor.
            init_kwargs: the settings of tokenizer_config.json, of which ``padding_side`` and
                ``truncation_side`` are read here (and the processor call takes its keywords from them).

        Raises:
            ValueError: a side that is not "left" or "right".
        """
        self._core = core
        self.init_kwargs = dict(init_kwargs or {})
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = "<s>", "</s>", "<pad>", "<unk>"
        self.image_token = "<image>" if core.image_token_id is not None else None
        self.padding_side = self.init_kwargs.get("padding_side", "right")
        self.truncation_side = self.init_kwargs.get("truncation_side", "right")
        for name in ("padding_side", "truncation_side"):
            if getattr(self, name) not in ("left", "right"):
                raise ValueError(
                    f"{name} in tokenizer_config.json must be 'left' or 'right', got {getattr(self, name)!r}"
                )

    bos_token_id = property(lambda self: self._core.bos_token_id, doc="Id of `<s>`.")
    eos_token_id = property(lambda self: self._core.eos_token_id, doc="Id of `</s>`.")
    pad_token_id = property(lambda self: self._core.pad_token_id, doc="Id of `<pad>`.")
    image_token_id = property(lambda self: self._core.image_token_id,
                              doc="Id of `<image>` (HF-native layout), else None.")
    model_max_length = property(lambda self: self._core.model_max_length, doc="The longest input, in tokens.")

    def __len__(self) -> int:
        return self._core.vocab_len()

    def __call__(self, text, return_tensors: str | None = None, **kwargs) -> BatchFeature:
        """Tokenizes a text or a list of texts.

        Args:
            text: a string or a list of strings.
            return_tensors: "np", "pt" or None.
            **kwargs: as in transformers: ``add_special_tokens`` (default True: ``<s>`` / ``</s>`` around each
                text), ``padding``, ``truncation``, ``max_length``, ``pad_to_multiple_of``, ``padding_side``,
                ``return_token_type_ids``, ``return_attention_mask``, ``return_special_tokens_mask``,
                ``return_length``, ``verbose``; other keywords are ignored, as transformers does.

        Returns:
            BatchFeature with ``input_ids`` and ``attention_mask`` (and what was asked for; unbatched lists for
            one string with return_tensors=None, as transformers).

        Raises:
            NotImplementedError: ``text_pair``, ``stride``, ``return_offsets_mapping``,
                ``return_overflowing_tokens`` or ``is_split_into_words`` given a value that does something.
        """
        options = {"add_special_tokens": True, "padding_side": self.padding_side, **kwargs}
        _check_text_options(options)
        single = isinstance(text, str)
        add_special_tokens = bool(options["add_special_tokens"])
        ids, mask = self._core.tokenize(
            [text] if single else list(text),
            add_special_tokens,
            _padding_name(options.get("padding", False)),
            _truncation_flag(options.get("truncation")),
            options.get("max_length"),
            options.get("pad_to_multiple_of"),
            self.truncation_side,
        )
        data = _text_outputs(ids, mask, options, add_special_tokens, self.image_token_id)
        if single and return_tensors is None:
            # transformers unbatches the per-token lists; `length` stays a list.
            data = {key: value if key == "length" else value[0] for key, value in data.items()}
        return BatchFeature(data, return_tensors)

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs) -> list[int]:
        """Token ids of one text."""
        return self(text, add_special_tokens=add_special_tokens, **kwargs)["input_ids"]

    def decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None, **kwargs) -> str:
        """Text of one sequence of ids. ``clean_up_tokenization_spaces`` is accepted and, as in
        transformers 5 for BPE tokenizers, ignored."""
        ids = _as_id_list(token_ids)
        if isinstance(ids, int):
            ids = [ids]
        if ids and isinstance(ids[0], list):
            raise ValueError("decode takes one sequence; use batch_decode for a batch")
        return _with_id_range(self._core.batch_decode, [ids], skip_special_tokens)[0]

    def batch_decode(self, sequences, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None, **kwargs):
        """Texts of a batch of id sequences."""
        batch = _as_id_list(sequences)
        if isinstance(batch, int):
            batch = [[batch]]
        elif batch and not isinstance(batch[0], list):
            batch = [batch]
        return _with_id_range(self._core.batch_decode, batch, skip_special_tokens)

    def convert_tokens_to_ids(self, tokens):
        """Id of a token (or ids of a list of tokens); None for unknown tokens."""
        if isinstance(tokens, str):
            return self._core.token_to_id(tokens)
        return [self._core.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        """Token of an id (or tokens of a list of ids)."""
        if isinstance(ids, (int, np.integer)):
            return self._core.id_to_token(int(ids))
        return [
            self._core.id_to_token(int(i))
            for i in _as_id_list(ids)
            if not (skip_special_tokens and self._core.is_special(int(i)))
        ]


_MAX_ID = 2**32 - 1


def _with_id_range(call, *args):
    """`call(*args)`, whose ids the native side takes as u32: an id outside that range is an OverflowError,
    as in transformers' tokenizers, with a message that gives the range."""
    try:
        return call(*args)
    except OverflowError as err:
        raise OverflowError(f"a token id is out of range ({err}): token ids are integers from 0 to {_MAX_ID}") \
            from None


def _as_id_list(ids):
    """Ids from lists, numpy arrays or torch tensors, as (nested) lists of Python ints."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, (int, np.integer)):
        return int(ids)
    return [_as_id_list(x) for x in ids]


def _padding_name(padding) -> str:
    padding = getattr(padding, "value", padding)
    if padding is True:
        return "longest"
    if padding is False or padding is None:
        return "do_not_pad"
    return str(padding)


def _truncation_flag(truncation):
    truncation = getattr(truncation, "value", truncation)
    if truncation is None or isinstance(truncation, bool):
        return truncation
    if truncation == "do_not_truncate":
        return False
    if truncation in ("longest_first", "only_first"):
        return True
    raise ValueError(f"unsupported truncation strategy {truncation!r}")


class Florence2Processor:
    """Drop-in for transformers' ``Florence2Processor``: task prompts, tokenization, image
    preprocessing, decoding and ``post_process_generation``, computed in Rust (no torch needed).
    """

    def __init__(self, core: ProcessorCore, source: str | os.PathLike | None = None):
        self._core = core
        # The folder the processor files were read from, which `save_pretrained` writes out again.
        self._source = None if source is None else Path(source)
        tokenizer_config = None if source is None else self._source / "tokenizer_config.json"
        init_kwargs = (json.loads(tokenizer_config.read_text(encoding="utf-8"))
                       if tokenizer_config is not None and tokenizer_config.is_file() else {})
        self.tokenizer = Florence2Tokenizer(core, init_kwargs)
        self.image_processor = Florence2ImageProcessor(core)
        self.image_token = self.tokenizer.image_token
        self.image_token_id = core.image_token_id
        self.num_image_tokens = self.image_processor.image_seq_length

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "Florence2Processor":
        """Loads the processor files of a checkpoint folder.

        Args:
            pretrained_model_name_or_path: a checkpoint folder with tokenizer.json and preprocessor_config.json
                (or processor_config.json), or a Hub id.
            **kwargs: hub arguments (revision, token, cache_dir, local_files_only, force_download), and
                subfolder: the folder inside the checkpoint folder or Hub repository that holds the files.

        Returns:
            The processor.
        """
        folder = resolve_checkpoint(pretrained_model_name_or_path, files=("tokenizer.json",),
                                    optional_files=_PROCESSOR_FILES, **kwargs)
        return cls(ProcessorCore.from_dir(str(folder)), source=folder)

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> list[str]:
        """Writes the processor files into a folder, for `from_pretrained` here and transformers'
        `AutoProcessor.from_pretrained` (where it loads the source files: HF-native checkpoints).

        The files are those the processor was loaded from (tokenizer.json and the tokenizer's other files,
        preprocessor_config.json / processor_config.json), with the image processor's attributes as they are
        now. config.json, which tells the processor the checkpoint layout, is the model's file: it is copied
        only into a folder that has none, so that a model saved there (before or after) keeps its own.

        Args:
            save_directory: the folder, created if missing.
            push_to_hub: not supported (raises NotImplementedError when True).
            **kwargs: transformers' other saving keywords, accepted and ignored.

        Returns:
            The paths of the files written.

        Raises:
            NotImplementedError: push_to_hub=True.
            ValueError: a processor not loaded from a folder (nothing to write its tokenizer from).
            OSError: save_directory is a file, or cannot be written.
        """
        if push_to_hub:
            raise NotImplementedError(
                "florence2-rs does not upload to the Hub: save_pretrained(folder), then upload the folder with "
                "huggingface_hub (HfApi().upload_folder)"
            )
        if self._source is None:
            raise ValueError("this processor was not loaded with from_pretrained, so it has no files to save")
        target = Path(save_directory)
        if target.is_file():
            raise OSError(f"Provided path ({target}) should be a directory, not a file")
        target.mkdir(parents=True, exist_ok=True)
        written = []
        for name in _SAVED_FILES:
            source = self._source / name
            if source.is_file():
                destination = target / name
                if not (destination.exists() and destination.samefile(source)):
                    shutil.copyfile(source, destination)
                written.append(destination)
        if (self._source / "config.json").is_file() and not (target / "config.json").exists():
            shutil.copyfile(self._source / "config.json", target / "config.json")
            written.append(target / "config.json")
        self.image_processor._write_changed_settings(target)
        return [str(path) for path in written]

    def __call__(self, text=None, images=None, **kwargs) -> BatchFeature:
        """Builds the model inputs.

        Args:
            text: a task prompt (``"<OD>"``, ``"<CAPTION_TO_PHRASE_GROUNDING> a red car"`` ...) or a list.
            images: an image or a list of images (PIL, numpy, torch tensor, file path).
            **kwargs: the keywords transformers' Florence-2 processor takes: ``return_tensors`` ("np", "pt" or
                None for Python lists); the tokenizer's (``padding``, ``truncation``, ``max_length``,
                ``pad_to_multiple_of``, ``add_special_tokens`` (default False), ``padding_side``,
                ``return_token_type_ids``, ``return_attention_mask``, ``return_special_tokens_mask``,
                ``return_length``, ``return_mm_token_type_ids``); the image processor's (see
                `Florence2ImageProcessor.__call__`: ``do_resize``, ``size``, ``resample``, ``do_rescale``,
                ``rescale_factor``, ``do_normalize``, ``image_mean``, ``image_std``, ``do_convert_rgb``,
                ``do_center_crop``, ``crop_size``, ``do_pad``, ``pad_size``, ``input_data_format`` ...); and
                ``text_kwargs=``, ``images_kwargs=``, ``common_kwargs=`` dicts of them. A keyword neither takes
                is logged as a warning and ignored, as transformers does. The tokenizer_config.json settings
                that are such keywords are their defaults. A checkpoint of Microsoft's layout takes the
                keywords of Microsoft's remote-code processor instead (see `_call_microsoft`).

        Returns:
            BatchFeature with ``input_ids``, ``attention_mask`` and, with images, ``pixel_values``.

        Raises:
            ValueError: a task without input followed by text, mismatched text and image counts,
                truncation that cuts image tokens, a keyword given twice, or a bad image setting.
            TypeError: a keyword value of the wrong type, or an image keyword the image processor does not take.
            NotImplementedError: a tokenizer keyword this package does not compute (``text_pair``,
                ``stride``, ``return_offsets_mapping`` ...) given a value that does something.
        """
        if self.image_token_id is None:
            return self._call_microsoft(text, images, kwargs)
        if text is None and images is None:
            raise ValueError("You have to specify at least one of `text` or `images`.")
        # transformers takes the tokenizer's settings that are call keywords (its attribute where it has one)
        # as defaults of every modality that takes them.
        defaults = {key: getattr(self.tokenizer, key, value) for key, value in self.tokenizer.init_kwargs.items()}
        text_options, image_options, _ = _split_call_kwargs(kwargs, defaults)
        _check_text_options(text_options)
        return_tensors = text_options.get("return_tensors")
        image_list = None if images is None else _flatten_images(images)
        if text is None:
            texts = [""] * len(image_list)
        else:
            texts = [text] if isinstance(text, str) else list(text)
            if not all(isinstance(t, str) for t in texts):
                raise ValueError("text must be a string or a list of strings")
        if image_list is not None and len(image_list) != len(texts):
            raise ValueError(
                f"The number of images ({len(image_list)}) does not match the number of texts ({len(texts)})."
            )
        # transformers' Florence-2 processor tokenizes its own <s> ... </s>: add_special_tokens defaults off.
        add_special_tokens = bool(text_options.get("add_special_tokens", False))
        ids, mask = self._core.encode_prompts(
            texts,
            image_list is not None,
            _padding_name(text_options.get("padding", False)),
            _truncation_flag(text_options.get("truncation")),
            text_options.get("max_length"),
            text_options.get("pad_to_multiple_of"),
            add_special_tokens,
            self.tokenizer.truncation_side,
        )
        options = {"padding_side": self.tokenizer.padding_side, **text_options}
        data = _text_outputs(ids, mask, options, add_special_tokens, self.image_token_id)
        if image_list is not None:
            image_options.pop("return_tensors", None)
            data["pixel_values"] = self.image_processor._pixel_values(
                image_list, image_options, stack=return_tensors is not None
            )
        return BatchFeature(data, return_tensors)

    def _call_microsoft(self, text, images, kwargs: dict) -> BatchFeature:
        """The call of Microsoft's remote-code processor (processing_florence2.py, `Florence2Processor.__call__`),
        which is the reference for its layout: its signature takes exactly `_MICROSOFT_CALL_KWARGS`, of which
        it hands `_MICROSOFT_IMAGE_KWARGS` to the image processor (a None there meaning the checkpoint's
        setting, as in the transformers it was written for) and padding, truncation and ``max_length`` less the
        image tokens to the tokenizer (which adds ``<s>`` / ``</s>``, no token_type_ids); the other keywords
        it accepts (``do_rescale``, ``do_thumbnail``, ``do_align_long_axis``, ``tokenize_newline_separately``)
        change nothing. ``return_tensors`` defaults to "pt" where torch is imported, else "np".

        Raises:
            TypeError: a keyword its signature lacks.
            ValueError: no images, or fewer images than texts.
            OverflowError: ``max_length`` below the image tokens (the tokenizer's length would be negative).
        """
        for key in kwargs:
            if key not in _MICROSOFT_CALL_KWARGS:
                raise TypeError(
                    f"Florence2Processor.__call__() got an unexpected keyword argument {key!r} (Microsoft's "
                    f"processor of this checkpoint's layout takes {', '.join(_MICROSOFT_CALL_KWARGS)})"
                )
        options = {**_MICROSOFT_CALL_KWARGS, "return_tensors": "pt" if "torch" in sys.modules else "np", **kwargs}
        if images is None:
            raise ValueError("`images` are expected as arguments to a `Florence2Processor` instance.")
        if text is None:
            text = ""
        if isinstance(text, list) and isinstance(images, list) and len(images) < len(text):
            raise ValueError(
                f"Received {len(images)} images for {len(text)} prompts. "
                "Each prompt should be associated with an image."
            )
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("text must be a string or a list of strings")
        return_tensors = options["return_tensors"]
        image_options = {key: options[key] for key in _MICROSOFT_IMAGE_KWARGS if options[key] is not None}
        pixel_values = self.image_processor._pixel_values(images, image_options, stack=return_tensors is not None)
        max_length = options["max_length"]
        if max_length is not None:
            max_length -= self.num_image_tokens
            if max_length < 0:
                raise OverflowError(
                    f"max_length={options['max_length']} is below the {self.num_image_tokens} image tokens: "
                    "Microsoft's processor counts them in max_length and hands the tokenizer max_length minus them"
                )
        inputs = self.tokenizer(
            self._core.build_prompts(texts), padding=options["padding"], truncation=options["truncation"],
            max_length=max_length, return_token_type_ids=False,
        )
        data = {**inputs, "pixel_values": pixel_values}
        return BatchFeature(data, return_tensors)

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **kwargs) -> list[str]:
        """Texts of a batch of generated ids (see `Florence2Tokenizer.batch_decode`)."""
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        """Text of one sequence of ids."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = False, **kwargs):
        """Decoded texts of generated ids (special tokens kept unless asked otherwise)."""
        return self.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    def post_process_generation(self, text=None, task=None, image_size=None, sequence=None) -> dict[str, Any]:
        """Parses generated text into the task's answer, like transformers.

        Args:
            text: the decoded generation (with special tokens).
            task: the task token, e.g. ``"<OD>"``; unknown tasks are parsed as plain text.
            image_size: (width, height) of the original image, to place the locations.
            sequence: generated ids instead of `text`.

        Returns:
            ``{task: answer}``: a string, or a dict of ``bboxes``/``quad_boxes``/``polygons`` (int
            coordinates) and ``labels``.
        """
        if task is None:
            raise ValueError("`task` must be provided for post-processing.")
        if sequence is not None:
            sequence = _as_id_list(sequence)
        if image_size is not None:
            image_size = tuple(float(v) for v in image_size)
        return _with_id_range(self._core.post_process_generation, task, text, sequence, image_size)

    def __repr__(self) -> str:
        return f"Florence2Processor(image_token_id={self.image_token_id}, image_seq_length={self.num_image_tokens})"


class AutoProcessor:
    """``AutoProcessor.from_pretrained`` returning a `Florence2Processor`."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> Florence2Processor:
        """Same as `Florence2Processor.from_pretrained`; ``trust_remote_code`` is accepted and ignored."""
        kwargs.pop("trust_remote_code", None)
        return Florence2Processor.from_pretrained(pretrained_model_name_or_path, **kwargs)
