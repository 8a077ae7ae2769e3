"""Per-call keywords of the processor, the image processor and the tokenizer, against transformers 5.23.

transformers' processor routes each keyword of a call to the tokenizer or the image processor
(CLIPImageProcessor, PIL backend: torchvision is not installed) and honours it for that call; a keyword neither
takes is logged and ignored, a keyword of the wrong type or an image keyword CLIPImageProcessor does not take
is an error. Each case runs both processors on the same inputs (PIL images, uint8 and float numpy arrays, torch
tensors) and compares input_ids, attention_mask, the other text outputs and pixel_values (dtype and values)
exactly: Pillow's fixed-point resampling is reproduced bit for bit, and the rescale and normalize follow
numpy's dtypes and order of operations.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
from PIL import Image  # noqa: E402

from florence2_rs import AutoProcessor  # noqa: E402

import make_fixtures  # noqa: E402  (tests/fixtures, on sys.path through conftest.py)

RNG = np.random.default_rng(11)
PIL_IMAGE = Image.fromarray(RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8))
UINT8 = RNG.integers(0, 256, (30, 44, 3), dtype=np.uint8)
FLOAT64 = RNG.random((30, 44, 3))
FLOAT32 = RNG.random((3, 26, 34)).astype(np.float32)  # channels first
# ComfyUI's images are float tensors in [0, 1].
TENSOR = torch.from_numpy(RNG.random((3, 33, 47)).astype(np.float32))
INT64 = RNG.integers(0, 256, (28, 36, 3)).astype(np.int64)
BOOL = RNG.random((22, 30, 3)) > 0.5
FLOAT16 = RNG.random((24, 40, 3)).astype(np.float16)
INPUTS = {"pil": PIL_IMAGE, "uint8": UINT8, "float64": FLOAT64, "float32_chw": FLOAT32, "torch": TENSOR,
          "int64": INT64, "bool": BOOL, "float16": FLOAT16}


@pytest.fixture(scope="module")
def pair(hf_native_processors):
    return hf_native_processors


def _assert_pixels(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    np.testing.assert_array_equal(got, want)


def _assert_same(got, want):
    assert set(got.keys()) == set(want.keys()), (got.keys(), want.keys())
    for key in want:
        if key == "pixel_values":
            if isinstance(want[key], list):
                assert isinstance(got[key], list) and len(got[key]) == len(want[key])
                for g, w in zip(got[key], want[key]):
                    _assert_pixels(g, w)
            else:
                _assert_pixels(got[key], want[key])
        else:
            np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)


IMAGE_CASES = [
    {},
    {"do_rescale": False},
    {"do_rescale": True},
    {"rescale_factor": 0.5},
    {"rescale_factor": 1 / 127.5},
    {"do_normalize": False},
    {"do_rescale": False, "do_normalize": False},
    {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
    {"image_mean": (0.1, 0.2, 0.3)},
    {"image_mean": 0.3, "image_std": 0.7},
    {"do_resize": False},
    {"do_resize": False, "do_rescale": False},
    {"size": {"height": 32, "width": 48}},
    {"size": 64},
    {"size": [50, 70]},
    {"size": 40, "default_to_square": True},
    {"size": {"shortest_edge": 30, "longest_edge": 40}},
    {"size": {"max_height": 30, "max_width": 50}},
    {"size": {"height": 64, "width": 64}, "resample": 0},
    {"size": {"height": 64, "width": 64}, "resample": 1},
    {"size": {"height": 20, "width": 100}, "resample": 2},
    {"size": {"height": 64, "width": 64}, "resample": Image.Resampling.BOX},
    {"size": {"height": 17, "width": 90}, "resample": 5},
    {"size": 31, "resample": 0},
    {"do_center_crop": True, "crop_size": {"height": 20, "width": 30}},
    {"do_center_crop": True, "crop_size": 1000, "size": 64},
    {"do_center_crop": True, "crop_size": [25, 90], "size": 40},
    {"do_center_crop": True, "crop_size": 21, "do_resize": False},
    {"do_convert_rgb": True},
    {"do_resize": None},
    {"do_rescale": None},
    {"data_format": "channels_first", "device": "cpu", "disable_grouping": True, "image_seq_length": 5},
    {"data_format": "channels_last"},
    {"images_kwargs": {"do_rescale": False, "size": {"height": 48, "width": 48}}},
    {"common_kwargs": {"do_rescale": False}},
    {"do_pad": True},
    {"do_pad": True, "pad_size": {"height": 800, "width": 900}},
]


def _case_id(case):
    return ",".join(f"{k}={v}" for k, v in case.items()) or "defaults"


@pytest.mark.parametrize("case", IMAGE_CASES, ids=_case_id)
@pytest.mark.parametrize("source", list(INPUTS))
def test_image_keywords_match(pair, case, source):
    ref, ours = pair
    image = INPUTS[source]
    for tensors in ["np", None]:
        want = ref(text="<OD>", images=image, return_tensors=tensors, **case)
        got = ours(text="<OD>", images=image, return_tensors=tensors, **case)
        _assert_same(got, want)
    # The image processor alone takes the image keywords directly.
    flat = {k: v for k, v in case.items() if not k.endswith("_kwargs")}
    _assert_same(ours.image_processor(image, return_tensors="np", **flat),
                 ref.image_processor(image, return_tensors="np", **flat))


def test_comfyui_do_rescale_false_differs_from_default(pair):
    """do_rescale=False (ComfyUI-Florence2's call) normalizes the values as given, 0..255: pixels far from
    the default ones, equal to transformers'."""
    ref, ours = pair
    plain = ours(text="<OD>", images=PIL_IMAGE, return_tensors="np")["pixel_values"]
    unscaled = ours(text="<OD>", images=PIL_IMAGE, return_tensors="np", do_rescale=False)["pixel_values"]
    assert abs(unscaled.mean()) > 100 * abs(plain.mean())
    _assert_pixels(unscaled, ref(text="<OD>", images=PIL_IMAGE, return_tensors="np", do_rescale=False)["pixel_values"])


@pytest.mark.parametrize("case", [{"do_resize": False}, {"do_resize": False, "do_pad": True},
                                  {"do_resize": False, "do_pad": True, "pad_size": {"height": 60, "width": 70}},
                                  {"size": 30}, {"size": 30, "do_pad": True}],
                         ids=_case_id)
def test_batches_of_different_sizes(pair, case):
    """Images that keep different sizes come back as a list (return_tensors=None); padding makes them one
    array; stacking different sizes is an error in both."""
    ref, ours = pair
    images = [PIL_IMAGE, UINT8, FLOAT64]
    texts = ["<OD>"] * 3
    _assert_same(ours(text=texts, images=images, **case), ref(text=texts, images=images, **case))
    try:
        want = ref(text=texts, images=images, return_tensors="np", **case)
    except ValueError:
        with pytest.raises(ValueError, match="different shapes"):
            ours(text=texts, images=images, return_tensors="np", **case)
    else:
        _assert_same(ours(text=texts, images=images, return_tensors="np", **case), want)


@pytest.mark.parametrize("case", [{}, {"do_pad": True}, {"do_pad": True, "pad_size": {"height": 40, "width": 50}},
                                  {"do_center_crop": True, "crop_size": 22, "do_pad": True}], ids=_case_id)
def test_float16_normalized_without_rescale_in_a_mixed_batch(pair, case):
    """transformers normalizes float16 values in float16 and the others in float32 or float64; padding
    (after normalizing) takes the whole batch."""
    ref, ours = pair
    images = [FLOAT16, UINT8, INT64]
    options = {"do_resize": False, "do_rescale": False, **case}
    _assert_same(ours.image_processor(images, **options), ref.image_processor(images, **options))


def test_channels_format_of_arrays(pair):
    """input_data_format decides which axis holds the channels where the shape does not (3×3×3 images)."""
    ref, ours = pair
    cube = RNG.integers(0, 256, (3, 3, 3), dtype=np.uint8)
    for case in [{}, {"input_data_format": "channels_first"}, {"input_data_format": "channels_last"}]:
        _assert_same(ours(text="<OD>", images=cube, return_tensors="np", **case),
                     ref(text="<OD>", images=cube, return_tensors="np", **case))
    a, b = (ours(text="<OD>", images=cube, return_tensors="np", input_data_format=f)["pixel_values"]
            for f in ("channels_first", "channels_last"))
    assert not np.array_equal(a, b)


def test_image_processor_attributes_are_settings(pair):
    """A changed attribute of the image processor is its setting from then on, as in transformers."""
    ref, ours = pair
    ours.image_processor.do_rescale = ref.image_processor.do_rescale = False
    try:
        _assert_same(ours(text="<OD>", images=PIL_IMAGE, return_tensors="np"),
                     ref(text="<OD>", images=PIL_IMAGE, return_tensors="np"))
    finally:
        ours.image_processor.do_rescale = ref.image_processor.do_rescale = True


def test_image_processor_attributes_edited_in_place_are_settings(pair):
    """An attribute edited in place (a size dict's entry, a mean's value) is a changed setting too."""
    ref, ours = pair
    assert isinstance(ours.image_processor.image_mean, list)
    for processor in (ours, ref):
        processor.image_processor.size["height"] = 64
    ours.image_processor.image_mean[0] = 0.9
    ref.image_processor.image_mean = (0.9, *ref.image_processor.image_mean[1:])
    try:
        got = ours(text="<OD>", images=PIL_IMAGE, return_tensors="np")
        assert got["pixel_values"].shape[-2:] == (64, 768)
        _assert_same(got, ref(text="<OD>", images=PIL_IMAGE, return_tensors="np"))
    finally:
        for processor in (ours, ref):
            processor.image_processor.size["height"] = 768
        ours.image_processor.image_mean[0] = 0.485
        ref.image_processor.image_mean = (0.485, *ref.image_processor.image_mean[1:])


TEXTS = ["<OD>", "<CAPTION_TO_PHRASE_GROUNDING> a red car and a cat", "What is this?"]

TEXT_CASES = [
    {},
    {"padding": True},
    {"padding": "longest"},
    {"padding": "max_length", "max_length": 600},
    {"padding": True, "pad_to_multiple_of": 8},
    {"padding": True, "padding_side": "left"},
    {"padding": "max_length", "max_length": 600, "padding_side": "right"},
    {"add_special_tokens": True},
    {"add_special_tokens": True, "padding": True},
    {"add_special_tokens": False},
    {"return_token_type_ids": True},
    {"return_token_type_ids": False},
    {"return_attention_mask": False},
    {"return_attention_mask": True, "padding": True},
    {"return_special_tokens_mask": True, "padding": True},
    {"return_special_tokens_mask": True, "padding": True, "add_special_tokens": True},
    {"return_length": True, "padding": True},
    {"return_mm_token_type_ids": True},
    {"return_mm_token_type_ids": True, "text_kwargs": {"return_mm_token_type_ids": True}},
    {"verbose": False, "stride": 0, "is_split_into_words": False, "return_offsets_mapping": False,
     "return_overflowing_tokens": False},
    {"text_kwargs": {"padding": "max_length", "max_length": 600, "return_token_type_ids": True}},
    {"text_kwargs": {"padding_side": "left"}, "padding": True},
    {"truncation": True, "max_length": 1000, "padding": True},
    {"foo": 1},
]


def _padded(case) -> bool:
    return bool(case.get("padding") or case.get("text_kwargs", {}).get("padding"))


@pytest.mark.parametrize("case", TEXT_CASES, ids=_case_id)
@pytest.mark.parametrize("with_images", [True, False], ids=["images", "text_only"])
def test_text_keywords_match(pair, case, with_images):
    """Padded batches as numpy and torch tensors; unpadded ones (ragged) as Python lists."""
    ref, ours = pair
    images = [PIL_IMAGE] * len(TEXTS) if with_images else None
    for tensors in (["np", "pt"] if _padded(case) else [None]):
        got = ours(text=TEXTS, images=images, return_tensors=tensors, **case)
        want = ref(text=TEXTS, images=images, return_tensors=tensors, **case)
        assert set(got) == set(want)
        for key in want:
            if key == "pixel_values":
                _assert_same({key: got[key]}, {key: want[key]})
            elif tensors is None:
                assert [list(row) for row in got[key]] == [list(row) for row in want[key]], key
            else:
                assert type(got[key]) is type(want[key]), key
                np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)


@pytest.mark.parametrize("case", [
    {}, {"add_special_tokens": False}, {"padding": True, "return_token_type_ids": True},
    {"padding": "max_length", "max_length": 12, "padding_side": "left"},
    {"padding": True, "return_special_tokens_mask": True}, {"return_special_tokens_mask": True},
    {"padding": True, "return_attention_mask": False}, {"padding": True, "return_length": True},
    {"foo": 1},
], ids=_case_id)
def test_tokenizer_keywords_match(pair, case):
    ref, ours = pair
    texts = ["a cat", "hello there my friend", "<loc_5> café"]
    _assert_same(ours.tokenizer(texts, return_tensors="np", **{"padding": True, **case}),
                 ref.tokenizer(texts, return_tensors="np", **{"padding": True, **case}))
    got, want = ours.tokenizer(texts[1], **case), ref.tokenizer(texts[1], **case)
    assert set(got) == set(want)
    for key in want:
        assert got[key] == want[key], key


def test_unknown_keyword_is_logged_and_ignored(pair, caplog):
    ref, ours = pair
    with caplog.at_level(logging.WARNING, logger="florence2_rs"):
        got = ours(text="<OD>", images=PIL_IMAGE, return_tensors="np", not_a_keyword=1)
    assert "Keyword argument `not_a_keyword` is not a valid argument for this processor and will be ignored." \
        in caplog.text
    _assert_same(got, ref(text="<OD>", images=PIL_IMAGE, return_tensors="np", not_a_keyword=1))


REJECTED = [
    {"do_rescale": "x"},
    {"do_rescale": 1},
    {"rescale_factor": 1},
    {"image_mean": [1, 2, 3]},
    {"image_mean": [0.5, 0.5]},
    {"image_std": [0.5]},
    {"size": {"height": 32.5, "width": 48}},
    {"size": {"height": 32}},
    {"size": {"longest_edge": 40}},
    {"size": {"min_pixels": 4, "max_pixels": 40}},
    {"size": [32]},
    {"size": np.int64(40)},
    {"size": {"height": np.int64(40), "width": 40}},
    {"size": 0},
    {"size": None},
    {"resample": None},
    {"resample": 8},
    {"rescale_factor": None},
    {"image_mean": None},
    {"do_center_crop": True, "crop_size": {"shortest_edge": 20}},
    {"padding": "foo"},
    {"padding": None},
    {"add_special_tokens": None},
    {"images_kwargs": {"foo": 1}},
    {"common_kwargs": {"padding": "longest"}},
    {"common_kwargs": {"foo": 1}},
    {"return_tensors": "np", "text_kwargs": {"return_tensors": "pt"}},
    {"size": {"height": 32, "width": 48}, "images_kwargs": {"size": 30}},
    {"padding": True, "text_kwargs": {"padding": "longest"}},
]


@pytest.mark.parametrize("case", REJECTED, ids=_case_id)
def test_keywords_transformers_rejects_are_rejected(pair, case):
    ref, ours = pair
    with pytest.raises(Exception) as theirs:
        ref(text="<OD>", images=PIL_IMAGE, **case)
    with pytest.raises((ValueError, TypeError)) as err:
        ours(text="<OD>", images=PIL_IMAGE, **case)
    if isinstance(theirs.value, ValueError) and "two times" in str(theirs.value):
        assert str(err.value) == str(theirs.value)


def test_image_processor_rejects_what_transformers_rejects(pair):
    ref, ours = pair
    for case in [{"foo": 1}, {"padding": True}, {"do_rescale": 1}, {"image_std": [0.5, 0.5]}]:
        with pytest.raises(Exception):
            ref.image_processor(PIL_IMAGE, **case)
        with pytest.raises((TypeError, ValueError)):
            ours.image_processor(PIL_IMAGE, **case)


@pytest.mark.parametrize("case", [
    {"resample": 6}, {"resample": 7}, {"stride": 2}, {"return_offsets_mapping": True},
    {"return_overflowing_tokens": True}, {"is_split_into_words": True}, {"text_pair": "x"},
], ids=_case_id)
def test_keywords_not_implemented_say_so(pair, case):
    """What transformers computes and florence2-rs does not (Pillow 13's MKS filters, token offsets,
    overflow, pairs) is refused with a message naming it, never ignored."""
    _, ours = pair
    with pytest.raises((ValueError, NotImplementedError)) as err:
        ours(text="<OD>", images=PIL_IMAGE, **case)
    name = next(iter(case))
    assert name in str(err.value) or "MKS" in str(err.value)


def test_non_rgb_image_without_conversion_is_refused(pair):
    """transformers hands a 1- or 4-channel image on with do_convert_rgb=False (and then fails in normalize, or
    returns pixels the model cannot take); here it is refused up front with a message."""
    ref, ours = pair
    for image in [PIL_IMAGE.convert("L"), PIL_IMAGE.convert("RGBA"), UINT8[..., :1]]:
        with pytest.raises(ValueError, match="do_convert_rgb"):
            ours(text="<OD>", images=image, do_convert_rgb=False)
    _assert_same(ours(text="<OD>", images=PIL_IMAGE, return_tensors="np", do_convert_rgb=False),
                 ref(text="<OD>", images=PIL_IMAGE, return_tensors="np", do_convert_rgb=False))


MICROSOFT = make_fixtures.RELEASE_FILES / "microsoft_Florence-2-base"


@pytest.fixture(scope="module")
def microsoft(pair, tmp_path_factory):
    """(reference call, our processor) for Microsoft's layout."""
    import shutil

    ref, _ = pair
    folder = tmp_path_factory.mktemp("microsoft")
    for name in ["tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "config.json"]:
        shutil.copy(MICROSOFT / name, folder / name)
    image_processor = transformers.CLIPImageProcessor.from_pretrained(MICROSOFT)

    def remote_call(text=None, images=None, tokenize_newline_separately=True, padding=False, truncation=None,
                    max_length=None, return_tensors="pt", do_resize=None, do_normalize=None, image_mean=None,
                    image_std=None, data_format="channels_first", input_data_format=None, resample=None,
                    do_convert_rgb=None, do_thumbnail=None, do_align_long_axis=None, do_rescale=None):
        """Microsoft's remote-code `Florence2Processor.__call__` (processing_florence2.py of
        microsoft/Florence-2-*, read in a public copy: the signature, then `self.image_processor(images,
        do_resize=..., do_normalize=..., return_tensors=..., image_mean=..., image_std=...,
        input_data_format=..., data_format=..., resample=..., do_convert_rgb=...)`, `max_length -=
        self.image_seq_length`, `self._construct_prompts(text)`, `self.tokenizer(text, return_tensors=...,
        padding=..., max_length=..., truncation=..., return_token_type_ids=False)`), which cannot run here (it
        needs the model's remote files and flash-attn): the same signature and the same keywords handed to
        transformers' CLIPImageProcessor and tokenizer. The image keywords given as None are left out: the
        transformers the remote code was written for read a None as the processor's setting, where 5.23 reads
        it as the step switched off."""
        if images is None:
            raise ValueError("`images` are expected")
        texts = [""] if text is None else [text] if isinstance(text, str) else text
        image_options = dict(do_resize=do_resize, do_normalize=do_normalize, image_mean=image_mean,
                             image_std=image_std, input_data_format=input_data_format, data_format=data_format,
                             resample=resample, do_convert_rgb=do_convert_rgb)
        pixel_values = image_processor(images, return_tensors=return_tensors,
                                       **{k: v for k, v in image_options.items() if v is not None})["pixel_values"]
        if max_length is not None:
            max_length -= image_processor.image_seq_length
        inputs = ref.tokenizer(ref._construct_prompts(texts), return_tensors=return_tensors, padding=padding,
                               max_length=max_length, truncation=truncation, return_token_type_ids=False)
        return {**inputs, "pixel_values": pixel_values}

    return remote_call, AutoProcessor.from_pretrained(folder)


MICROSOFT_CASES = [
    {},
    {"do_rescale": False},
    {"do_rescale": True, "do_thumbnail": True, "do_align_long_axis": False, "tokenize_newline_separately": False},
    {"do_normalize": False},
    {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.2, 0.3, 0.4]},
    {"do_resize": False},
    {"resample": 0},
    {"do_convert_rgb": True, "data_format": "channels_first"},
    {"input_data_format": "channels_last"},
    {"return_tensors": "np", "padding": True},
    {"return_tensors": None},
    {"padding": "max_length", "max_length": 600},
    {"truncation": True, "max_length": 580},
    {"max_length": 581},
]


@pytest.mark.parametrize("case", MICROSOFT_CASES, ids=_case_id)
def test_microsoft_layout_call_is_its_remote_code(microsoft, case):
    """Microsoft's layout: the keywords its remote-code processor takes, routed as it routes them (do_rescale
    is accepted and changes nothing; max_length counts the image tokens)."""
    remote_call, ours = microsoft
    texts = ["<OD>", "<CAPTION_TO_PHRASE_GROUNDING> a red car and a cat"]
    for text, images in [("<OD>", UINT8), (texts, [PIL_IMAGE, UINT8]), ("<CAPTION>", [FLOAT32])]:
        try:
            want = remote_call(text=text, images=images, **case)
        except (ValueError, TypeError):  # a ragged batch as tensors; channels_last for a channels-first array
            with pytest.raises((ValueError, TypeError)):
                ours(text=text, images=images, **case)
            continue
        got = ours(text=text, images=images, **case)
        assert list(got.keys()) == list(want.keys())
        for key in want:
            if isinstance(want[key], torch.Tensor):
                assert isinstance(got[key], torch.Tensor), key
            if key == "pixel_values":
                _assert_same({key: got[key]}, {key: want[key]})
            else:
                assert [list(row) for row in got[key]] == [list(row) for row in want[key]], key


@pytest.mark.parametrize("case", [
    {"size": 64}, {"rescale_factor": 0.5}, {"add_special_tokens": True}, {"padding_side": "left"},
    {"images_kwargs": {"do_rescale": False}}, {"foo": 1}, {"max_length": 20},
], ids=_case_id)
def test_microsoft_layout_rejects_what_its_remote_code_rejects(microsoft, case):
    remote_call, ours = microsoft
    with pytest.raises(Exception) as theirs:
        remote_call(text="<OD>", images=UINT8, **case)
    with pytest.raises(type(theirs.value)):
        ours(text="<OD>", images=UINT8, **case)


def test_image_processor_takes_every_keyword_in_both_layouts(pair, microsoft):
    """The image processor called directly is a CLIPImageProcessor in both layouts."""
    ref, _ = pair
    _, ours = microsoft
    for case in [{"do_rescale": False}, {"size": 64, "do_normalize": False}, {"rescale_factor": 0.5}]:
        _assert_pixels(ours.image_processor(UINT8, return_tensors="np", **case)["pixel_values"],
                       ref.image_processor(UINT8, return_tensors="np", **case)["pixel_values"])


def test_tokenizer_settings_are_call_defaults(pair, tmp_path):
    """tokenizer_config.json settings that are call keywords (padding_side, max_length, truncation, padding)
    are the processor call's defaults, under the call's own keywords, as in transformers' _merge_kwargs. The
    folder is saved by a transformers tokenizer that has truncated before, so its tokenizer.json holds that
    truncation, which is not a setting (transformers sets each call's own)."""
    import json

    ref, _ = pair
    folder = tmp_path / "settings"
    ref.tokenizer(TEXTS, truncation=True, max_length=4)
    ref.save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update({"padding_side": "left", "max_length": 3, "truncation": True, "padding": "longest"})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    theirs, ours = transformers.AutoProcessor.from_pretrained(folder), AutoProcessor.from_pretrained(folder)
    assert ours.tokenizer.padding_side == theirs.tokenizer.padding_side == "left"
    for case in [{}, {"max_length": 6}, {"truncation": False}, {"padding_side": "right"}, {"padding": False}]:
        got, want = ours(text=TEXTS, **case), theirs(text=TEXTS, **case)
        for key in want:
            assert [list(row) for row in got[key]] == [list(row) for row in want[key]], (key, case)
    for case in [{}, {"padding": True}, {"max_length": 3, "truncation": True}]:
        got, want = ours.tokenizer(TEXTS, **case), theirs.tokenizer(TEXTS, **case)
        for key in want:
            assert [list(row) for row in got[key]] == [list(row) for row in want[key]], (key, case)
