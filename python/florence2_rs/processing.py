"""Florence-2 processor with transformers' API: `Florence2Processor` and `AutoProcessor`.

The work (prompts, tokenization, resizing, post-processing) happens in Rust (`ProcessorCore`); this
module converts Python inputs the way transformers does and shapes the outputs like transformers.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np

from ._native import ProcessorCore, check_alloc
from .batch_feature import BatchFeature
from .hub import resolve_checkpoint

__all__ = ["AutoProcessor", "Florence2Processor", "Florence2ImageProcessor", "Florence2Tokenizer"]

# The files a processor reads: the tokenizer, the image settings (released: preprocessor_config.json;
# transformers 5: processor_config.json) and config.json, which tells the checkpoint layout.
_PROCESSOR_FILES = ("tokenizer_config.json", "preprocessor_config.json", "processor_config.json", "config.json")


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


def _channels_last(array: np.ndarray) -> np.ndarray:
    """transformers' channel inference for (C, H, W) or (H, W, C) with C in 1, 3, 4."""
    if array.ndim == 2:
        return array[..., None]
    if array.ndim != 3:
        raise ValueError(f"Unsupported number of image dimensions: {array.ndim}")
    if array.shape[0] in (1, 3, 4):
        return np.moveaxis(array, 0, -1)
    if array.shape[-1] in (1, 3, 4):
        return array
    raise ValueError(f"Unable to infer channel dimension format of an image of shape {array.shape}")


def _array_to_rgb_uint8(array: np.ndarray) -> tuple[np.ndarray, bool]:
    """A numpy image as transformers brings it to a uint8 PIL image; True when it was float in
    [0, 1] (transformers then rescales the resized values twice, reproduced in Rust)."""
    image = _channels_last(np.asarray(array))
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
    if image.dtype == np.uint8:
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


def _to_rgb_uint8(image) -> tuple[np.ndarray, bool]:
    if isinstance(image, (str, os.PathLike)):
        return np.asarray(load_image(image)), False
    if hasattr(image, "getbands"):
        return _pil_to_rgb(image), False
    if hasattr(image, "detach") and hasattr(image, "numpy"):  # a torch tensor
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        return _array_to_rgb_uint8(image)
    raise ValueError(f"Unsupported image type {type(image).__name__}: pass PIL images, numpy arrays or file paths")


def _flatten_images(images) -> list:
    if isinstance(images, (list, tuple)):
        flat = []
        for item in images:
            flat.extend(item if isinstance(item, (list, tuple)) else [item])
        return flat
    return [images]


class Florence2ImageProcessor:
    """The image half of the processor: `pixel_values` like transformers' CLIPImageProcessor (PIL
    backend): bicubic resize to `size`, rescale, normalize.

    Non-RGB images are converted as transformers does with ``do_convert_rgb=True`` (transparency
    composited onto white), whatever the checkpoint's ``do_convert_rgb`` says.
    """

    def __init__(self, core: ProcessorCore):
        self._core = core
        for key, value in core.image_settings().items():
            setattr(self, key, value)

    def __call__(self, images, return_tensors: str | None = None, **kwargs) -> BatchFeature:
        """Preprocesses one image or a list of images.

        Args:
            images: PIL images, numpy arrays (H×W×C uint8, or float in [0, 1]), torch tensors or paths.
            return_tensors: "np", "pt" or None (a list of per-image arrays).

        Returns:
            BatchFeature with ``pixel_values`` of shape [B, 3, H, W].
        """
        return BatchFeature({"pixel_values": self.pixel_values(images, return_tensors is None)}, return_tensors)

    def pixel_values(self, images, as_list: bool = False):
        """float32 [B, 3, H, W] array (or, with `as_list`, a list of [3, H, W] arrays)."""
        converted = [_to_rgb_uint8(image) for image in _flatten_images(images)]
        values = self._core.preprocess(converted)
        return list(values) if as_list else values


class Florence2Tokenizer:
    """The tokenizer half of the processor, with the common methods of a transformers tokenizer."""

    def __init__(self, core: ProcessorCore):
        self._core = core
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = "<s>", "</s>", "<pad>", "<unk>"
        self.image_token = "<image>" if core.image_token_id is not None else None
        self.padding_side = "right"
        self.truncation_side = "right"

    bos_token_id = property(lambda self: self._core.bos_token_id, doc="Id of `<s>`.")
    eos_token_id = property(lambda self: self._core.eos_token_id, doc="Id of `</s>`.")
    pad_token_id = property(lambda self: self._core.pad_token_id, doc="Id of `<pad>`.")
    image_token_id = property(lambda self: self._core.image_token_id,
                              doc="Id of `<image>` (HF-native layout), else None.")
    model_max_length = property(lambda self: self._core.model_max_length, doc="The longest input, in tokens.")

    def __len__(self) -> int:
        return self._core.vocab_len()

    def __call__(
        self,
        text,
        add_special_tokens: bool = True,
        padding=False,
        truncation=None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        return_tensors: str | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Tokenizes a text or a list of texts.

        Args:
            text: a string or a list of strings.
            add_special_tokens: add ``<s>`` / ``</s>`` around each text.
            padding, truncation, max_length, pad_to_multiple_of: as in transformers.
            return_tensors: "np", "pt" or None.

        Returns:
            BatchFeature with ``input_ids`` and ``attention_mask`` (unbatched lists for one string
            with return_tensors=None, as transformers).
        """
        single = isinstance(text, str)
        ids, mask = self._core.tokenize(
            [text] if single else list(text),
            add_special_tokens,
            _padding_name(padding),
            _truncation_flag(truncation),
            max_length,
            pad_to_multiple_of,
        )
        if single and return_tensors is None:
            ids, mask = ids[0], mask[0]
        return BatchFeature({"input_ids": ids, "attention_mask": mask}, return_tensors)

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

    def __init__(self, core: ProcessorCore):
        self._core = core
        self.tokenizer = Florence2Tokenizer(core)
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
        return cls(ProcessorCore.from_dir(str(folder)))

    def __call__(
        self,
        text=None,
        images=None,
        return_tensors: str | None = None,
        padding=False,
        truncation=None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Builds the model inputs.

        Args:
            text: a task prompt (``"<OD>"``, ``"<CAPTION_TO_PHRASE_GROUNDING> a red car"`` ...) or a list.
            images: an image or a list of images (PIL, numpy, torch tensor, file path).
            return_tensors: "np", "pt" or None (Python lists).
            padding, truncation, max_length, pad_to_multiple_of: as in transformers.

        Returns:
            BatchFeature with ``input_ids``, ``attention_mask`` and, with images, ``pixel_values``.

        Raises:
            ValueError: a task without input followed by text, mismatched text and image counts,
                or truncation that cuts image tokens.
        """
        if text is None and images is None:
            raise ValueError("You have to specify at least one of `text` or `images`.")
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
        data = {}
        ids, mask = self._core.encode_prompts(
            texts,
            image_list is not None,
            _padding_name(padding),
            _truncation_flag(truncation),
            max_length,
            pad_to_multiple_of,
        )
        data["input_ids"], data["attention_mask"] = ids, mask
        if image_list is not None:
            data["pixel_values"] = self.image_processor.pixel_values(image_list, as_list=return_tensors is None)
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
