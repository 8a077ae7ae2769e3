"""pipeline("image-text-to-text") against transformers' pipeline on the end-to-end checkpoint: same records."""

from __future__ import annotations

import numpy as np
import pytest
import skimage
import torch
from PIL import Image

import florence2_rs
import transformers

CALLS = [
    dict(text="<OD>", max_new_tokens=8),
    dict(text="<CAPTION>", max_new_tokens=8, return_full_text=False),
    dict(text="<CAPTION_TO_PHRASE_GROUNDING> a person in a suit", max_new_tokens=8),
    dict(text="<OCR_WITH_REGION>", generate_kwargs=dict(max_new_tokens=6, num_beams=3)),
    dict(text="<OD>", max_new_tokens=6, skip_special_tokens=False),
]


@pytest.fixture(scope="module")
def pipes(end_to_end_checkpoint):
    folder = end_to_end_checkpoint / "hf"
    theirs = transformers.pipeline("image-text-to-text", model=str(folder), device="cpu", dtype=torch.float32)
    ours = florence2_rs.pipeline("image-text-to-text", model=folder, device="cpu", dtype=torch.float32)
    return theirs, ours


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(skimage.data.astronaut())


@pytest.mark.parametrize("kwargs", CALLS, ids=lambda k: ",".join(f"{key}={v}" for key, v in k.items()))
def test_records_equal_transformers(pipes, image, kwargs):
    theirs, ours = pipes
    assert ours(image, **kwargs) == theirs(image, **kwargs)


def test_batch_of_images_gives_one_record_each(pipes, image):
    theirs, ours = pipes
    images = [image, Image.fromarray(skimage.data.coffee())]
    texts = ["<OD>", "<CAPTION>"]
    expected = theirs(images, text=texts, max_new_tokens=5)
    assert len(expected) == 2
    assert ours(images, text=texts, max_new_tokens=5) == expected


def test_path_and_numpy_images_give_the_pil_answer(pipes, image, tmp_path):
    _, ours = pipes
    path = tmp_path / "astronaut.png"
    image.save(path)
    expected = ours(image, text="<OD>", max_new_tokens=5)
    assert ours(str(path), text="<OD>", max_new_tokens=5) == expected
    assert ours(np.asarray(image), text="<OD>", max_new_tokens=5) == expected


def test_generation_keywords_at_call_and_construction_reach_generate(end_to_end_checkpoint, image):
    folder = end_to_end_checkpoint / "hf"
    model = florence2_rs.Florence2ForConditionalGeneration.from_pretrained(folder)
    processor = florence2_rs.AutoProcessor.from_pretrained(folder)
    inputs = processor(text="<OD>", images=image, return_tensors="np")
    ids = model.generate(**inputs, max_new_tokens=6, num_beams=3, num_return_sequences=2)
    expected = processor.batch_decode(ids, skip_special_tokens=True)
    pipe = florence2_rs.pipeline("image-text-to-text", model=model, processor=processor, num_beams=3)
    records = pipe(image, text="<OD>", max_new_tokens=6, num_return_sequences=2, return_full_text=False)
    assert [r["generated_text"] for r in records] == expected
    tensors = pipe(image, text="<OD>", max_new_tokens=6, return_tensors=True)
    assert set(tensors[0]) == {"input_text", "generated_token_ids"}


def test_original_layout_gives_the_same_records(end_to_end_checkpoint, pipes, image):
    _, ours = pipes
    original = florence2_rs.pipeline("image-text-to-text", model=end_to_end_checkpoint / "original",
                                     dtype="float32")
    assert original(image, text="<CAPTION>", max_new_tokens=8) == ours(image, text="<CAPTION>", max_new_tokens=8)


def test_other_tasks_are_refused_with_the_supported_one():
    with pytest.raises(ValueError, match="image-text-to-text"):
        florence2_rs.pipeline("object-detection", model="unused")
