"""The labeling tools' answers: transformers' post-processed dicts, with each box scored from the location tokens
the post-processor read its coordinates from."""

from __future__ import annotations

import random

import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from florence2_rs.apps.labeling import scored_answer  # noqa: E402
from test_processor_postprocess import TASK_OF_PARSE_TYPE, _generation  # noqa: E402

SIZE = (640, 480)


def _ids(ref, text: str) -> list[int]:
    """`text`'s ids without special tokens added (its own markup becomes their tokens)."""
    return ref.tokenizer(text, add_special_tokens=False)["input_ids"]


def _reference(ref, sequence: list[int], task: str) -> dict:
    """transformers' answer for generated ids, decoded the way the labeling tools decode them."""
    text = ref.batch_decode([sequence], skip_special_tokens=False)[0]
    return ref.post_process_generation(text, task=task, image_size=SIZE)[task]


def _scores(sequence: list[int]) -> np.ndarray:
    """Distinct log-probabilities for the generated tokens (`sequence[1:]`), so that a box scored from other
    tokens than its own gets another score."""
    return np.log(np.linspace(0.05, 0.95, len(sequence) - 1))


def _score_of(token_scores: np.ndarray, indices) -> float:
    return round(float(np.exp(np.mean([token_scores[i - 1] for i in indices]))), 4)


def test_answers_equal_transformers_and_box_tokens_hold_the_box(hf_native_processors):
    """Every answer equals transformers' post-processed dict; every box's tokens are location tokens whose
    bins transformers' own dequantization turns into that box."""
    ref, ours = hf_native_processors
    rng = random.Random(5)
    boxes = 0
    for _ in range(200):
        parse_type = rng.choice(list(TASK_OF_PARSE_TYPE))
        task = TASK_OF_PARSE_TYPE[parse_type][0]
        sequence = [ref.tokenizer.eos_token_id] + _ids(ref, _generation(rng, parse_type))
        want = _reference(ref, sequence, task)
        answers, box_tokens = ours._core.post_process_sequence(task, sequence, SIZE)
        assert answers[task] == want
        key = next((k for k in ("bboxes", "quad_boxes") if isinstance(want, dict) and want.get(k)), None)
        assert len(box_tokens) == (len(want[key]) if key else 0)
        for box, tokens in zip(want[key] if key else [], box_tokens):
            names = ref.tokenizer.convert_ids_to_tokens([sequence[i] for i in tokens])
            bins = torch.tensor([[int(name[len("<loc_"):-1]) for name in names]]).reshape(-1, 2)
            placed = ref.post_processor.dequantize(bins, size=SIZE).reshape(-1).tolist()
            assert placed == box, (names, box)
            boxes += 1
        answer = scored_answer(ours, task, sequence, _scores(sequence), SIZE)
        if isinstance(want, dict):
            answer = {k: v for k, v in answer.items() if k != "scores"}
        assert answer == want
    assert boxes > 100


def test_a_box_is_scored_from_the_tokens_it_was_read_from(hf_native_processors):
    """OCR takes the first of nine equal location tokens as the region's text and the other eight as its quad:
    the score is the eight's, not that of the first eight location tokens (which spell the same quad)."""
    ref, ours = hf_native_processors
    loc = ref.tokenizer.convert_tokens_to_ids("<loc_500>")
    sequence = [ref.tokenizer.eos_token_id, *[loc] * 9, ref.tokenizer.eos_token_id]
    token_scores = _scores(sequence)
    answer = scored_answer(ours, "<OCR_WITH_REGION>", sequence, token_scores, SIZE)
    want = _reference(ref, sequence, "<OCR_WITH_REGION>")
    assert want["labels"] == ["<loc_500>"] and len(want["quad_boxes"]) == 1
    assert {k: answer[k] for k in want} == want
    assert answer["scores"] == [_score_of(token_scores, range(2, 10))]


def test_markup_between_location_tokens_and_spelled_out_locations(hf_native_processors):
    """A `<pad>` between a box's location tokens is removed before parsing, so the box is read across it: its
    score is its four location tokens'. A box whose first location is spelled out in ordinary tokens was written
    by no location token: no score."""
    ref, ours = hf_native_processors
    eos, pad = ref.tokenizer.eos_token_id, ref.tokenizer.pad_token_id
    car, locs = _ids(ref, "car"), _ids(ref, "<loc_10><loc_20><loc_30><loc_40>")
    sequence = [eos, *car, locs[0], pad, *locs[1:], eos]
    token_scores = _scores(sequence)
    answer = scored_answer(ours, "<OD>", sequence, token_scores, SIZE)
    assert {k: answer[k] for k in ("bboxes", "labels")} == _reference(ref, sequence, "<OD>")
    first = 1 + len(car)
    assert answer["scores"] == [_score_of(token_scores, [first, first + 2, first + 3, first + 4])]

    spelled = _ids(ref, "<loc_") + _ids(ref, "10>")
    assert ref.batch_decode([spelled])[0] == "<loc_10>" and locs[0] not in spelled
    sequence = [eos, *car, *spelled, *locs[1:], eos]
    answer = scored_answer(ours, "<OD>", sequence, _scores(sequence), SIZE)
    want = _reference(ref, sequence, "<OD>")
    assert len(want["bboxes"]) == 1 and {k: answer[k] for k in want} == want
    assert answer["scores"] == [None]
