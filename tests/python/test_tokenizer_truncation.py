"""Truncation with special tokens, against transformers 5.23.

transformers (through the `tokenizers` library) truncates a text so that the `<s>` / `</s>` added afterwards
fit: max_length=3 keeps one text token, `[0, x, 2]`, never cutting `</s>`; a max_length below the number of
special tokens leaves the text whole. Each case runs the tokenizer call and the processor call of both
layouts on many texts, every max_length from 0 to beyond the longest sequence, both add_special_tokens
values, with and without padding, one text and a batch, and compares input_ids and attention_mask exactly.
The references are transformers' tokenizers loaded from the released tokenizer files: the onnx-community
(HF-native) one with `<image>`, as the HF-native conversion makes it, and Microsoft's one with the Florence-2
tokens its remote code adds; Microsoft's remote processor tokenizes its prompts with add_special_tokens on.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

from florence2_rs import AutoProcessor, Florence2Processor  # noqa: E402

import make_fixtures  # noqa: E402  (tests/fixtures, on sys.path through conftest.py)

RELEASE = make_fixtures.RELEASE_FILES
MSFT = RELEASE / "microsoft_Florence-2-base"
IMAGE = Image.fromarray(np.random.default_rng(3).integers(0, 256, (24, 32, 3), dtype=np.uint8))

TEXTS = [
    "",
    "a",
    "hello world foo",
    "What is this?",
    "  spaces and UTF-8: café 北京 ",
    "<loc_5> plain<loc_999> and more words here",
    "<s>already</s> wrapped",
    "a much longer caption that goes on and on, with punctuation; and numbers 12345 to cut anywhere",
]
PROMPTS = [
    "<OD>",
    "<CAPTION>",
    "<CAPTION_TO_PHRASE_GROUNDING> a red car",
    "<REGION_TO_DESCRIPTION><loc_1><loc_2><loc_30><loc_400>",
    "What is this?",
    "",
]
PADDINGS = [False, True, "max_length"]


@pytest.fixture(scope="module")
def hf_native(hf_native_processors):
    return hf_native_processors


@pytest.fixture(scope="module")
def microsoft(tmp_path_factory, hf_native):
    """(transformers' tokenizer of Microsoft's file with the Florence-2 tokens, our Microsoft-layout processor)."""
    from transformers import AutoTokenizer

    ref_processor, _ = hf_native
    tokenizer = AutoTokenizer.from_pretrained(MSFT)
    # The Florence-2 tokens in the order Microsoft's processor adds them: the ids the onnx-community file has.
    florence_tokens = ref_processor.tokenizer.convert_ids_to_tokens(list(range(len(tokenizer), 51289)))
    tokenizer.add_tokens(florence_tokens, special_tokens=True)
    assert tokenizer.convert_tokens_to_ids("<loc_0>") == 50269
    assert tokenizer.convert_tokens_to_ids("<and>") == 51288
    folder = tmp_path_factory.mktemp("original")
    for name in ["tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "config.json"]:
        shutil.copy(MSFT / name, folder / name)
    return tokenizer, Florence2Processor.from_pretrained(folder)


def _rows(value):
    """Token lists of a batch (or of one unbatched sequence) as lists of ints."""
    return [[int(x) for x in row] for row in value] if value and isinstance(value[0], list) else [
        [int(x) for x in value]
    ]


def _assert_same(got, want, context):
    for key in ("input_ids", "attention_mask"):
        assert _rows(got[key]) == _rows(want[key]), (key, context)


def _max_lengths(longest: int):
    return range(0, longest + 3)


def _compare_tokenizers(ours, ref, texts):
    longest = max(len(ref(t)["input_ids"]) for t in texts)
    for add_special_tokens in (True, False):
        for max_length in _max_lengths(longest):
            for padding in PADDINGS:
                kwargs = {
                    "add_special_tokens": add_special_tokens, "truncation": True, "max_length": max_length,
                    "padding": padding,
                }
                for text in texts:
                    _assert_same(ours(text, **kwargs), ref(text, **kwargs), (text, kwargs))
                _assert_same(ours(texts, **kwargs), ref(texts, **kwargs), kwargs)
            # max_length alone truncates, as transformers does without padding.
            kwargs = {"add_special_tokens": add_special_tokens, "max_length": max_length}
            _assert_same(ours(texts, **kwargs), ref(texts, **kwargs), kwargs)


def test_truncation_keeps_the_closing_token():
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(RELEASE / "onnx-community_Florence-2-base")
    ours = AutoProcessor.from_pretrained(RELEASE / "onnx-community_Florence-2-base").tokenizer
    want = ref("a caption of several words", max_length=3, truncation=True)["input_ids"]
    assert want[-1] == ref.eos_token_id
    assert ours("a caption of several words", max_length=3, truncation=True)["input_ids"] == want


def test_hf_native_tokenizer_call(hf_native):
    ref, ours = hf_native
    _compare_tokenizers(ours.tokenizer, ref.tokenizer, TEXTS)


def test_microsoft_tokenizer_call(microsoft):
    ref, ours = microsoft
    _compare_tokenizers(ours.tokenizer, ref, TEXTS)


def _compare_processor_calls(ours, ref, texts, max_lengths, images=None):
    for add_special_tokens in (False, True):
        for max_length in max_lengths:
            for padding in PADDINGS:
                kwargs = {
                    "add_special_tokens": add_special_tokens, "truncation": True, "max_length": max_length,
                    "padding": padding,
                }
                for batch in [texts[:1], texts]:
                    batch_images = None if images is None else [images] * len(batch)
                    try:
                        want = ref(text=batch, images=batch_images, **kwargs)
                    except ValueError as ref_err:
                        # Truncation that cuts image tokens is an error in both, with the same message.
                        with pytest.raises(ValueError) as our_err:
                            ours(text=batch, images=batch_images, **kwargs)
                        assert str(our_err.value) == str(ref_err), kwargs
                        continue
                    _assert_same(ours(text=batch, images=batch_images, **kwargs), want, (batch, kwargs))


def test_hf_native_processor_call_without_images(hf_native):
    ref, ours = hf_native
    longest = max(len(ref(text=t, add_special_tokens=True)["input_ids"][0]) for t in PROMPTS)
    _compare_processor_calls(ours, ref, PROMPTS, _max_lengths(longest))


def test_hf_native_processor_call_with_images(hf_native):
    ref, ours = hf_native
    texts = PROMPTS[:4]
    n_image = ref.image_processor.image_seq_length
    longest = max(len(ref(text=t, images=IMAGE, add_special_tokens=True)["input_ids"][0]) for t in texts)
    # Below n_image truncation cuts image tokens (an error in both); around and above it, the text is cut.
    _compare_processor_calls(ours, ref, texts, [1, 3, n_image - 1, *range(n_image, longest + 3)], IMAGE)


def test_microsoft_processor_call(hf_native, microsoft):
    """Microsoft's remote processor (processing_florence2.py, `Florence2Processor.__call__`) calls its tokenizer
    on the prompts with add_special_tokens on and max_length less the image tokens (`max_length -=
    self.image_seq_length`)."""
    ref_processor, _ = hf_native
    ref, ours = microsoft
    n_image = ours.num_image_tokens
    prompts = ref_processor._construct_prompts(PROMPTS)
    longest = max(len(ref(p)["input_ids"]) for p in prompts)
    for max_length in _max_lengths(longest):
        for padding in PADDINGS:
            kwargs = {"truncation": True, "padding": padding}
            want = ref(prompts, max_length=max_length, **kwargs)
            got = ours(text=PROMPTS, images=[IMAGE] * len(PROMPTS), max_length=n_image + max_length,
                       return_tensors=None, **kwargs)
            _assert_same(got, want, kwargs)


@pytest.mark.parametrize("attribute", [("truncation_side", "left"), ("padding_side", "left")])
def test_sides_set_as_tokenizer_attributes(hf_native, microsoft, attribute):
    """`tokenizer.truncation_side` / `padding_side` set to "left": the tokenizer and processor calls
    truncate (keeping the special tokens) or pad on the left, as transformers does."""
    ref, ours = hf_native
    msft_ref, msft_ours = microsoft
    name, side = attribute
    for tokenizer in (ref.tokenizer, ours.tokenizer, msft_ref, msft_ours.tokenizer):
        setattr(tokenizer, name, side)
    try:
        assert ours.tokenizer("hello world foo", max_length=3, truncation=True)["input_ids"] == \
            ref.tokenizer("hello world foo", max_length=3, truncation=True)["input_ids"]
        _compare_tokenizers(ours.tokenizer, ref.tokenizer, TEXTS)
        _compare_tokenizers(msft_ours.tokenizer, msft_ref, TEXTS)
        longest = max(len(ref(text=t, add_special_tokens=True)["input_ids"][0]) for t in PROMPTS)
        _compare_processor_calls(ours, ref, PROMPTS, _max_lengths(longest))
        n_image = ref.image_processor.image_seq_length
        _compare_processor_calls(ours, ref, PROMPTS[:3], [n_image - 1, n_image + 3, n_image + 20], IMAGE)
        prompts = ref._construct_prompts(PROMPTS)
        for max_length in (3, 6, 40):
            kwargs = {"truncation": True, "padding": True}
            _assert_same(msft_ours(text=PROMPTS, images=[IMAGE] * len(PROMPTS), return_tensors=None,
                                   max_length=msft_ours.num_image_tokens + max_length, **kwargs),
                         msft_ref(prompts, max_length=max_length, **kwargs), (name, max_length))
    finally:
        for tokenizer in (ref.tokenizer, ours.tokenizer, msft_ref, msft_ours.tokenizer):
            setattr(tokenizer, name, "right")
