"""Parity of florence2_rs.Florence2Processor with transformers' Florence2Processor (5.23, PIL backend).

The reference processor is built from the released onnx-community tokenizer (Florence-2 tokens present,
`<image>` added as the HF-native conversion does) and the released image settings, saved with
`save_pretrained`, and ours is loaded from that folder. The original layout is loaded from Microsoft's
tokenizer.json, which lacks the 1024 Florence-2 tokens.
"""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
from PIL import Image  # noqa: E402

from florence2_rs import Florence2Processor  # noqa: E402

import make_fixtures  # noqa: E402  (tests/fixtures, on sys.path through conftest.py)

RELEASE = make_fixtures.RELEASE_FILES
MSFT = RELEASE / "microsoft_Florence-2-base"

TASKS_WITHOUT_INPUT = [
    "<OCR>", "<OCR_WITH_REGION>", "<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>", "<OD>",
    "<DENSE_REGION_CAPTION>", "<REGION_PROPOSAL>",
]
TASKS_WITH_INPUT = [
    "<CAPTION_TO_PHRASE_GROUNDING>", "<REFERRING_EXPRESSION_SEGMENTATION>", "<REGION_TO_SEGMENTATION>",
    "<OPEN_VOCABULARY_DETECTION>", "<REGION_TO_CATEGORY>", "<REGION_TO_DESCRIPTION>", "<REGION_TO_OCR>",
]


@pytest.fixture(scope="module")
def pair(hf_native_processors):
    return hf_native_processors


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    folder = tmp_path_factory.mktemp("original")
    for name in ["tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "config.json"]:
        shutil.copy(MSFT / name, folder / name)
    return Florence2Processor.from_pretrained(folder)


def _prompts():
    texts = list(TASKS_WITHOUT_INPUT)
    texts += [f"{t} a red car" for t in TASKS_WITH_INPUT]
    texts += [f"{t}  <loc_1><loc_2><loc_30><loc_400>  " for t in TASKS_WITH_INPUT]
    texts += [t for t in TASKS_WITH_INPUT]  # input missing: empty input
    texts += ["What is this?", "", "  spaces and UTF-8: café 北京 ", "<s>already</s>", "<loc_5> plain"]
    return texts


IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))


def _assert_same(ours, ref, keys=("input_ids", "attention_mask")):
    for key in keys:
        np.testing.assert_array_equal(np.asarray(ours[key]), np.asarray(ref[key]), err_msg=key)


@pytest.mark.parametrize("text", _prompts())
def test_single_prompt_ids_match(pair, text):
    ref, ours = pair
    _assert_same(ours(text=text, images=IMAGE, return_tensors="np"), ref(text=text, images=IMAGE, return_tensors="np"))
    # Text without images: the bare prompt, no <s> / </s>.
    _assert_same(ours(text=text, return_tensors="np"), ref(text=text, return_tensors="np"))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"padding": True},
        {"padding": "longest"},
        {"padding": "max_length", "max_length": 700},
        {"padding": True, "truncation": True, "max_length": 1000},
        {"padding": True, "pad_to_multiple_of": 8},
        {"padding": "max_length"},
    ],
)
def test_batched_padding_matches(pair, kwargs):
    ref, ours = pair
    texts = _prompts()[:12] + ["<CAPTION_TO_PHRASE_GROUNDING> " + "a long caption " * 20]
    images = [IMAGE] * len(texts)
    for tensors in ["np", "pt"]:
        got = ours(text=texts, images=images, return_tensors=tensors, **kwargs)
        want = ref(text=texts, images=images, return_tensors=tensors, **kwargs)
        _assert_same(got, want)
        assert type(got["input_ids"]) is type(want["input_ids"])
    _assert_same(ours(text=texts, return_tensors="np", **kwargs), ref(text=texts, return_tensors="np", **kwargs))


def test_unpadded_lists_and_truncation(pair):
    ref, ours = pair
    texts = ["<OD>", "<CAPTION_TO_PHRASE_GROUNDING> a cat and a dog"]
    got, want = ours(text=texts, images=[IMAGE, IMAGE]), ref(text=texts, images=[IMAGE, IMAGE])
    assert got["input_ids"] == [list(x) for x in want["input_ids"]]
    assert got["attention_mask"] == [list(x) for x in want["attention_mask"]]
    # Text-only truncation cuts like transformers; cutting image tokens is an error in both.
    _assert_same(ours(text=texts, truncation=True, max_length=5), ref(text=texts, truncation=True, max_length=5))
    with pytest.raises(ValueError) as ref_err:
        ref(text=texts, images=[IMAGE, IMAGE], truncation=True, max_length=100)
    with pytest.raises(ValueError) as our_err:
        ours(text=texts, images=[IMAGE, IMAGE], truncation=True, max_length=100)
    assert str(our_err.value) == str(ref_err.value)


def test_errors_match(pair):
    ref, ours = pair
    for text in ["<OCR> extra", "<CAPTION><OD>", "x<OD>"]:
        with pytest.raises(ValueError) as ref_err:
            ref(text=text, images=IMAGE)
        with pytest.raises(ValueError) as our_err:
            ours(text=text, images=IMAGE)
        assert str(our_err.value) == str(ref_err.value)
    with pytest.raises(ValueError):
        ours(text=["<OD>", "<OD>"], images=[IMAGE])


def test_original_layout_has_no_image_tokens(pair, original):
    ref, _ = pair
    assert original.tokenizer.convert_tokens_to_ids("<loc_0>") == 50269
    assert original.tokenizer.convert_tokens_to_ids("<and>") == 51288
    assert original.image_token_id is None
    n = ref.image_processor.image_seq_length
    for text in _prompts():
        want = ref(text=text, images=IMAGE, return_tensors="np")["input_ids"][0][n:]
        got = original(text=text, images=IMAGE, return_tensors="np")["input_ids"][0]
        np.testing.assert_array_equal(got, want)


def test_decode_matches(pair):
    ref, ours = pair
    rng = random.Random(3)
    vocab = len(ref.tokenizer)
    batch = [[rng.randrange(vocab) for _ in range(rng.randrange(1, 30))] for _ in range(50)]
    batch += [[2, 0, 50269, 50300, 50400, 50500, 1000, 2], [0, 2, 1, 1]]
    for skip in [False, True]:
        assert ours.batch_decode(batch, skip_special_tokens=skip) == ref.batch_decode(batch, skip_special_tokens=skip)
        assert ours.decode(batch[0], skip_special_tokens=skip) == ref.decode(batch[0], skip_special_tokens=skip)
    pair_ids = torch.tensor([[0, 2, 1, 1], [2, 0, 50269, 1]])
    assert ours.batch_decode(pair_ids) == ref.batch_decode(pair_ids)


# --- pixel_values -------------------------------------------------------------------------------


def _images():
    skimage_data = pytest.importorskip("skimage.data")
    rng = np.random.default_rng(7)
    rgba = Image.fromarray(rng.integers(0, 256, (50, 70, 4), dtype=np.uint8), "RGBA")
    images = {
        "astronaut": Image.fromarray(skimage_data.astronaut()),
        "coffee": Image.fromarray(skimage_data.coffee()),
        "camera_L": Image.fromarray(skimage_data.camera()),
        "RGBA": rgba,
        "L": rgba.convert("L"),
        "LA": rgba.convert("LA"),
        "P": rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE),
        "I;16": Image.fromarray(rng.integers(0, 65536, (33, 21), dtype=np.uint16)),
        "CMYK": rgba.convert("CMYK"),
        "1x1": Image.fromarray(np.array([[[10, 200, 30]]], dtype=np.uint8)),
        "7x3": Image.fromarray(rng.integers(0, 256, (3, 7, 3), dtype=np.uint8)),
        "768x768": Image.fromarray(rng.integers(0, 256, (768, 768, 3), dtype=np.uint8)),
        "tall": Image.fromarray(rng.integers(0, 256, (1500, 90, 3), dtype=np.uint8)),
        # Pillow 13 resizes these vertical pass first (height shrinks > 2x more pixels than width).
        "portrait_2018x1594": Image.fromarray(rng.integers(0, 256, (2018, 1594, 3), dtype=np.uint8)),
        "portrait_4000x3000": Image.fromarray(rng.integers(0, 256, (4000, 3000, 3), dtype=np.uint8)),
        "landscape_3000x4000": Image.fromarray(rng.integers(0, 256, (3000, 4000, 3), dtype=np.uint8)),
        "near_square_1000x990": Image.fromarray(rng.integers(0, 256, (1000, 990, 3), dtype=np.uint8)),
        "huge_8000x6000": Image.fromarray(
            np.kron(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8), np.ones((100, 100, 1), dtype=np.uint8))
        ),
        "np_uint8": rng.integers(0, 256, (30, 40, 3), dtype=np.uint8),
        "np_float01": rng.random((30, 40, 3)),
        "np_rgba": rng.integers(0, 256, (30, 40, 4), dtype=np.uint8),
        "np_chw": rng.integers(0, 256, (3, 30, 40), dtype=np.uint8),
    }
    return images


@pytest.mark.parametrize("name", list(_images().keys()))
def test_pixel_values_match(pair, name):
    ref, ours = pair
    image = _images()[name]
    want = ref.image_processor(image, return_tensors="np")["pixel_values"]
    got = ours(text="<OD>", images=image, return_tensors="np")["pixel_values"]
    assert got.shape == want.shape and got.dtype == np.float32
    # Pillow's fixed-point arithmetic and numpy's float32 steps are reproduced exactly.
    np.testing.assert_array_equal(got, want)


def test_batch_of_images_is_one_tensor(pair):
    ref, ours = pair
    imgs = [IMAGE, IMAGE.resize((13, 17)), IMAGE.convert("L")]
    got = ours(text=["<OD>"] * 3, images=imgs, return_tensors="pt")
    want = ref(text=["<OD>"] * 3, images=imgs, return_tensors="pt")
    assert isinstance(got["pixel_values"], torch.Tensor) and got["pixel_values"].shape == (3, 3, 768, 768)
    torch.testing.assert_close(got["pixel_values"], want["pixel_values"], rtol=0, atol=0)
    moved = got.to("cpu", torch.bfloat16)
    assert moved.pixel_values.dtype == torch.bfloat16 and moved.input_ids.dtype == torch.int64


def test_image_path(pair, tmp_path):
    ref, ours = pair
    path = tmp_path / "x.png"
    IMAGE.save(path)
    got = ours(text="<OD>", images=str(path), return_tensors="np")["pixel_values"]
    want = ref.image_processor(IMAGE, return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(got, want)
