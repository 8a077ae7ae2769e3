"""`pipeline("image-text-to-text", ...)`: transformers' pipeline for Florence-2, returning the same records.

The records follow transformers 5.23's `ImageTextToTextPipeline`: the generated ids are decoded with
`skip_special_tokens=True` (so task and `<loc_*>` tokens are dropped), and by default the prompt text is put in
front of the answer (`return_full_text=True`). Use the processor's `post_process_generation` for boxes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from .modeling import Florence2ForConditionalGeneration, Florence2PreTrainedModel
from .processing import AutoProcessor, Florence2Processor

__all__ = ["ImageTextToTextPipeline", "pipeline"]

SUPPORTED_TASKS = ("image-text-to-text",)

# transformers' ImageTextToTextPipeline default: applied unless the call or the checkpoint sets a length.
_DEFAULT_MAX_NEW_TOKENS = 256
# GenerationConfig's own max_length default; a checkpoint that keeps it has not set a length.
_DEFAULT_MAX_LENGTH = 20
# Call keywords the pipeline handles itself; every other keyword is a generate() setting.
_POSTPROCESS_KEYS = ("return_full_text", "return_tensors", "skip_special_tokens")
_IGNORED_KEYS = ("timeout", "clean_up_tokenization_spaces", "batch_size", "num_workers")


class ImageTextToTextPipeline:
    """A callable over a model and its processor: images and task prompts in, transformers' records out.

    Args:
        model: the loaded model.
        processor: its processor.
        **defaults: call keywords applied to every call (generation settings, return_full_text ...).
    """

    task = "image-text-to-text"

    def __init__(self, model: Florence2ForConditionalGeneration, processor: Florence2Processor,
                 **defaults: Any) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self._defaults = defaults

    @property
    def device(self) -> Any:
        """The model's device."""
        return self.model.device

    @property
    def dtype(self) -> Any:
        """The model's dtype."""
        return self.model.dtype

    def __call__(self, images: Any = None, text: Union[str, list, None] = None, **kwargs: Any) -> list[dict]:
        """Answers task prompts about images.

        Args:
            images: an image (PIL image, file path or numpy array) or a list of them.
            text: the task prompt ("<OD>", "<CAPTION_TO_PHRASE_GROUNDING> a car" ...), or one per image.
            max_new_tokens: the answer's length limit (256 unless given, as in transformers).
            generate_kwargs: a dict of generate() settings.
            return_full_text: False to leave the prompt out of "generated_text".
            return_tensors: True to return "generated_token_ids" instead of text.
            skip_special_tokens: decode with special tokens kept when False (default True).
            **kwargs: other generate() settings (num_beams, do_sample ...). transformers 5.23 passes these to its
                processor, which ignores them with a warning; here they reach generate().

        Returns:
            One dict per answer, flat over the batch: {"input_text": prompt, "generated_text": text}
            (or "generated_token_ids" with return_tensors=True).

        Raises:
            ValueError: no image or no text, or as many texts as images are not given.
        """
        if images is None:
            raise ValueError("Florence-2 needs an image: pass images=")
        if text is None:
            raise ValueError("You must provide text for this pipeline.")
        options = {**self._defaults, **kwargs}
        post = {key: options.pop(key) for key in _POSTPROCESS_KEYS if key in options}
        for key in _IGNORED_KEYS:
            options.pop(key, None)
        generate_kwargs = dict(options.pop("generate_kwargs", None) or {})
        if "max_new_tokens" in options and "max_new_tokens" in generate_kwargs:
            raise ValueError("'max_new_tokens' is defined twice, once in 'generate_kwargs' and once as a direct "
                             "parameter, please use only one")
        generate_kwargs.update(options)
        if not self._length_is_set(generate_kwargs):
            generate_kwargs["max_new_tokens"] = _DEFAULT_MAX_NEW_TOKENS

        texts = [text] if isinstance(text, str) else list(text)
        inputs = self.processor(images=images, text=text, return_tensors="np", padding=len(texts) > 1)
        ids = self.model.generate(**inputs, **generate_kwargs)
        return self._records(texts, inputs["input_ids"], ids, **post)

    def _length_is_set(self, generate_kwargs: dict) -> bool:
        """Whether the call or the checkpoint's generation config sets the answer length."""
        if "max_new_tokens" in generate_kwargs or "max_length" in generate_kwargs:
            return True
        generation = self.model.generation_config
        return (getattr(generation, "max_new_tokens", None) is not None
                or getattr(generation, "max_length", _DEFAULT_MAX_LENGTH) != _DEFAULT_MAX_LENGTH)

    def _records(self, texts: list, input_ids: Any, ids: Any, return_full_text: bool = True,
                 return_tensors: bool = False, skip_special_tokens: bool = True) -> list[dict]:
        """transformers' `postprocess`: one record per generated sequence."""
        per_input = len(ids) // len(texts)
        prompts = [t for t in texts for _ in range(per_input)]
        if return_tensors:
            return [{"input_text": prompt, "generated_token_ids": row} for prompt, row in zip(prompts, ids)]
        answers = self.processor.post_process_image_text_to_text(ids, skip_special_tokens=skip_special_tokens)
        decoded_inputs = self.processor.post_process_image_text_to_text(
            input_ids, skip_special_tokens=skip_special_tokens)
        records = []
        for i, (prompt, answer) in enumerate(zip(prompts, answers)):
            # transformers drops an echo of the prompt found within the first characters of the answer.
            decoded_input = decoded_inputs[i // per_input]
            start = answer.find(decoded_input)
            if 0 <= start <= 2:
                answer = answer[start + len(decoded_input):]
            records.append({"input_text": prompt, "generated_text": prompt + answer if return_full_text else answer})
        return records


def pipeline(
    task: Optional[str] = None,
    model: Union[str, Path, Florence2PreTrainedModel, None] = None,
    processor: Union[str, Path, Florence2Processor, None] = None,
    device: Any = None,
    dtype: Any = None,
    torch_dtype: Any = None,
    device_map: Any = None,
    model_kwargs: Optional[dict] = None,
    **kwargs: Any,
) -> ImageTextToTextPipeline:
    """transformers' `pipeline()` for Florence-2.

    Args:
        task: "image-text-to-text" (the one task Florence-2 serves).
        model: a checkpoint folder, a Hub id, or a loaded model.
        processor: a processor, or where to load it from; default: the model's checkpoint.
        device: "cpu", -1, "cuda[:N]" or a CUDA ordinal (needs a CUDA build).
        dtype / torch_dtype: a torch dtype, "auto" or a name; default "auto" (the checkpoint's).
        device_map: as `from_pretrained`.
        model_kwargs: more `from_pretrained` keywords (quantization_config, attn_implementation ...).
        **kwargs: Hub keywords (revision, token, trust_remote_code ...) and default call keywords
            (generation settings, return_full_text ...).

    Returns:
        The pipeline, called as `pipe(images, text="<OD>", max_new_tokens=...)`.

    Raises:
        ValueError: another task, or no model.
    """
    if task not in SUPPORTED_TASKS:
        raise ValueError(f"Unknown task {task!r}: florence2_rs supports {', '.join(map(repr, SUPPORTED_TASKS))}")
    if model is None:
        raise ValueError("pipeline() needs model= (a Florence-2 checkpoint folder, Hub id or loaded model)")
    hub_kwargs = {key: kwargs.pop(key) for key in ("revision", "token", "cache_dir", "local_files_only",
                                                   "force_download", "trust_remote_code") if key in kwargs}
    where = device if device is not None else device_map
    dtype = dtype if dtype is not None else torch_dtype
    if isinstance(model, Florence2PreTrainedModel):
        targets = [arg for arg in (where, dtype) if arg is not None]
        if targets:
            model.to(*targets)
        source = model._folder
    else:
        load_kwargs = {**(model_kwargs or {}), **hub_kwargs}
        if dtype is not None:
            load_kwargs["dtype"] = dtype
        load_kwargs["device"] = where
        source = model
        model = Florence2ForConditionalGeneration.from_pretrained(model, **load_kwargs)
    if processor is None or isinstance(processor, (str, Path)):
        hub_kwargs.pop("trust_remote_code", None)
        processor = AutoProcessor.from_pretrained(processor or source, **hub_kwargs)
    return ImageTextToTextPipeline(model, processor, **kwargs)
