"""From a picture and a task prompt to post-processed results, against transformers' processor and model."""

from __future__ import annotations

import pytest
import skimage
import torch
from PIL import Image

import florence2_rs
from transformers import AutoProcessor as HFProcessor
from transformers import Florence2ForConditionalGeneration as HFModel

TASKS = ["<OD>", "<CAPTION>", "<OCR_WITH_REGION>", "<CAPTION_TO_PHRASE_GROUNDING> a person in a suit",
         "<REFERRING_EXPRESSION_SEGMENTATION> the helmet", "<REGION_TO_DESCRIPTION><loc_100><loc_100><loc_500><loc_600>"]


@pytest.fixture(scope="module")
def pair(end_to_end_checkpoint):
    folder = end_to_end_checkpoint / "hf"
    return (
        HFProcessor.from_pretrained(folder), HFModel.from_pretrained(folder).eval(),
        florence2_rs.AutoProcessor.from_pretrained(folder),
        florence2_rs.Florence2ForConditionalGeneration.from_pretrained(folder),
    )


@pytest.mark.parametrize("prompt", TASKS)
def test_task_end_to_end_equals_transformers(pair, prompt):
    assert_task_equals_transformers(pair, prompt)


def assert_task_equals_transformers(pair, prompt):
    """One task prompt through both processors, models and post-processing: equal ids, text and answers.
    (test_cuda.py passes a GPU model.)"""
    hf_processor, hf_model, processor, model = pair
    image = Image.fromarray(skimage.data.astronaut())
    task = prompt.split(">")[0] + ">"
    theirs = hf_processor(text=prompt, images=image, return_tensors="pt")
    ours = processor(text=prompt, images=image, return_tensors="pt")
    assert torch.equal(theirs["input_ids"], ours["input_ids"])
    with torch.no_grad():
        expected_ids = hf_model.generate(**theirs, max_new_tokens=24, num_beams=3, no_repeat_ngram_size=3)
    ids = model.generate(**ours, max_new_tokens=24, num_beams=3, no_repeat_ngram_size=3)
    assert torch.equal(ids, expected_ids)
    expected_text = hf_processor.batch_decode(expected_ids, skip_special_tokens=False)[0]
    text = processor.batch_decode(ids, skip_special_tokens=False)[0]
    assert text == expected_text
    assert processor.post_process_generation(text, task=task, image_size=image.size) == \
        hf_processor.post_process_generation(expected_text, task=task, image_size=image.size)


def test_original_layout_runs_the_same_pipeline(end_to_end_checkpoint, pair):
    """Microsoft's layout: its released tokenizer (no Florence-2 tokens), no <image> placeholders."""
    _, _, hf_layout_processor, _ = pair
    folder = end_to_end_checkpoint / "original"
    processor = florence2_rs.AutoProcessor.from_pretrained(folder)
    model = florence2_rs.Florence2ForConditionalGeneration.from_pretrained(folder)
    image = Image.fromarray(skimage.data.coffee())
    inputs = processor(text="<OD>", images=image, return_tensors="np")
    hf_inputs = hf_layout_processor(text="<OD>", images=image, return_tensors="np")
    n_image = hf_inputs["input_ids"].shape[1] - inputs["input_ids"].shape[1]
    assert n_image == 577
    assert (inputs["input_ids"] == hf_inputs["input_ids"][:, n_image:]).all()
    ids = model.generate(**inputs, max_new_tokens=12)
    text = processor.batch_decode(ids, skip_special_tokens=False)[0]
    assert text.startswith("</s>")
    assert isinstance(processor.post_process_generation(text, task="<OD>", image_size=image.size)["<OD>"], dict)
