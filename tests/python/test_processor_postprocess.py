"""post_process_generation equal (==) to transformers' on generated model outputs, malformed ones
included, plus property tests that the parsers and the prompt builder only ever raise ValueError."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from test_processor_parity import pair  # noqa: E402,F401  (the shared reference/ours fixture)

TASK_OF_PARSE_TYPE = {
    "pure_text": ["<CAPTION>", "<OCR>", "<REGION_TO_CATEGORY>", "<UNKNOWN_TASK>"],
    "ocr": ["<OCR_WITH_REGION>"],
    "phrase_grounding": ["<CAPTION_TO_PHRASE_GROUNDING>"],
    "description_with_bboxes": ["<OD>", "<DENSE_REGION_CAPTION>"],
    "bboxes": ["<REGION_PROPOSAL>"],
    "polygons": ["<REFERRING_EXPRESSION_SEGMENTATION>", "<REGION_TO_SEGMENTATION>"],
    "description_with_bboxes_or_polygons": ["<OPEN_VOCABULARY_DETECTION>"],
}
WORDS = ["car", "red car", "door handle", "the image", "it", "a", " sky ", "café", "北京", "person\n", "\tdog", "a group"]
STRAY = ["<s>", "</s>", "<pad>", "<od>", "</od>", "<obj>", "<ground>", "<box>", "<loc_", "<loc_12", "<loc_x>", "<", ">", "\n", "<poly", "<sep"]


def _locs(rng: random.Random, n: int) -> str:
    return "".join(f"<loc_{rng.randrange(1000)}>" for _ in range(n))


def _generation(rng: random.Random, parse_type: str) -> str:
    """A model-like output for the parse type, with some malformations."""
    parts = ["</s><s>"] if rng.random() < 0.8 else []
    for _ in range(rng.randrange(0, 5)):
        label = rng.choice(WORDS) if rng.random() < 0.85 else ""
        if parse_type == "ocr":
            n = rng.choice([8, 8, 8, 7, 9, 16, 3])
            parts.append(label + _locs(rng, n))
        elif parse_type in ("polygons", "description_with_bboxes_or_polygons") and rng.random() < 0.6:
            polys = []
            for _ in range(rng.randrange(1, 4)):
                body = _locs(rng, rng.randrange(1, 14))
                polys.append(f"<poly>{body}</poly>" if rng.random() < 0.5 else body)
            parts.append(label + rng.choice(["<sep>", ""]).join(polys))
        else:
            parts.append(label + _locs(rng, rng.choice([4, 4, 8, 12, 3, 5, 1, 0])))
        if rng.random() < 0.2:
            parts.append(rng.choice(STRAY))
    if rng.random() < 0.8:
        parts.append("</s>")
    if rng.random() < 0.2:
        parts.append("<pad>" * rng.randrange(1, 3))
    text = "".join(parts)
    if rng.random() < 0.1:  # unterminated run: cut anywhere
        text = text[: rng.randrange(len(text) + 1)]
    return text


@pytest.mark.parametrize("parse_type", list(TASK_OF_PARSE_TYPE))
def test_post_process_generation_matches(pair, parse_type):
    ref, ours = pair
    rng = random.Random(hash(parse_type) % 1000)
    for i in range(250):
        text = _generation(rng, parse_type)
        task = rng.choice(TASK_OF_PARSE_TYPE[parse_type])
        size = (rng.randrange(1, 5000), rng.randrange(1, 5000)) if i % 5 else (1000, 1000)
        want = ref.post_process_generation(text, task=task, image_size=size)
        got = ours.post_process_generation(text, task=task, image_size=size)
        assert got == want, (text, task, size)


def test_sequence_input_matches(pair):
    ref, ours = pair
    rng = random.Random(11)
    for _ in range(60):
        parse_type = rng.choice(list(TASK_OF_PARSE_TYPE))
        text = _generation(rng, parse_type)
        ids = [0] + ref.tokenizer(text, add_special_tokens=False)["input_ids"]
        task = TASK_OF_PARSE_TYPE[parse_type][0]
        want = ref.post_process_generation(sequence=torch.tensor(ids), task=task, image_size=(640, 480))
        assert ours.post_process_generation(sequence=ids, task=task, image_size=(640, 480)) == want


def test_usage_errors(pair):
    _, ours = pair
    with pytest.raises(ValueError):
        ours.post_process_generation("x", task=None)
    with pytest.raises(ValueError):
        ours.post_process_generation(task="<OD>", image_size=(1, 1))
    with pytest.raises(ValueError):
        ours.post_process_generation("x", sequence=[0, 1], task="<OD>", image_size=(1, 1))


TASKS = [t for tasks in TASK_OF_PARSE_TYPE.values() for t in tasks]
token_soup = st.lists(
    st.one_of(st.text(max_size=6), st.sampled_from(STRAY + ["<poly>", "</poly>", "<sep>", "<loc_7>", "<loc_999>"])),
    max_size=40,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=token_soup, task=st.sampled_from(TASKS), w=st.integers(1, 10000), h=st.integers(1, 10000))
def test_parsers_never_crash_and_match(pair, text, task, w, h):
    ref, ours = pair
    got = ours.post_process_generation(text, task=task, image_size=(w, h))
    want = ref.post_process_generation(text, task=task, image_size=(w, h))
    assert got == want


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200), task=st.sampled_from(TASKS))
def test_arbitrary_text_only_value_errors(pair, text, task):
    _, ours = pair
    try:
        ours.post_process_generation(text, task=task, image_size=(100, 100))
        ours.post_process_generation(text, task=task, image_size=None)
    except ValueError:
        pass


@settings(max_examples=300, deadline=None)
@given(
    text=st.lists(
        st.one_of(st.text(max_size=5), st.sampled_from(["<OD>", "<OCR>", "<REGION_TO_OCR>", "<OCR_WITH_REGION>", " ", "\x1c"])),
        max_size=6,
    ).map("".join)
)
def test_prompt_builder_matches(pair, text):
    ref, ours = pair
    try:
        want = ref._construct_prompts(text)
    except ValueError as err:
        with pytest.raises(ValueError, match=None) as ours_err:
            ours._core.build_prompts([text])
        assert str(ours_err.value) == str(err)
        return
    assert ours._core.build_prompts([text]) == want


# Sizes a caller may pass as image_size: zero, negative, huge, infinite and NaN included.
odd_sizes = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**70, 2**70))
odd_soup = st.lists(
    st.one_of(token_soup, st.sampled_from(["<loc_99999999999999999999>", "<loc_-1>", "<loc_1000>", "<loc_0>"])),
    max_size=8,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=odd_soup, task=st.sampled_from(TASKS), size=st.tuples(odd_sizes, odd_sizes),
       sequence=st.lists(st.integers(0, 2**32 - 1), max_size=30))
def test_odd_sizes_and_ids_only_value_errors(pair, text, task, size, sequence):
    _, ours = pair
    for given_input in ({"text": text}, {"sequence": sequence}):
        try:
            ours.post_process_generation(**given_input, task=task, image_size=size)
        except ValueError:
            pass
