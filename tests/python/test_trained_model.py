"""The small Florence-2 this project trained (tests/fixtures/shapes, made by tests/fixtures/train_small.py) on
held-out synthetic scenes (tests/fixtures/synthetic.py): florence2-rs gives transformers' ids and
post-processed answers in both layouts, the answers are right, and a LoRA adapter trained with peft on a shape
the model never saw finds it, in florence2-rs as in peft.

Random weights exercise the arithmetic; these weights put real boxes, words and phrases through generation
and post-processing (a random decoder mostly repeats one token).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import synthetic  # noqa: E402  (tests/fixtures, on sys.path through conftest)
from transformers import AutoProcessor as HFProcessor  # noqa: E402
from transformers import Florence2ForConditionalGeneration as HFModel  # noqa: E402

from florence2_rs import AutoProcessor, Florence2ForConditionalGeneration  # noqa: E402

CHECKPOINT = Path(__file__).resolve().parents[1] / "fixtures" / "shapes"
SIZE = 192
MAX_NEW_TOKENS = 64


def prompt(task: str, sc: synthetic.Scene) -> str:
    return synthetic.example(sc, task, random.Random(0))[0]


def answer(model, processor, task: str, sc: synthetic.Scene, tensors: str) -> tuple[list[int], dict]:
    """(generated ids, post-processed answer) with the checkpoint's generation settings."""
    inputs = processor(text=prompt(task, sc), images=synthetic.render(sc), return_tensors=tensors)
    ids = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS)
    text = processor.batch_decode(ids, skip_special_tokens=False)[0]
    return np.asarray(ids)[0].tolist(), processor.post_process_generation(text, task=task, image_size=(SIZE, SIZE))


@pytest.fixture(scope="module")
def reference():
    return (HFModel.from_pretrained(CHECKPOINT / "hf", dtype=torch.float32).eval(),
            HFProcessor.from_pretrained(CHECKPOINT / "hf"))


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_ids_and_answers_equal_transformers(reference, layout):
    theirs, their_processor = reference
    ours = Florence2ForConditionalGeneration.from_pretrained(CHECKPOINT / layout)
    processor = AutoProcessor.from_pretrained(CHECKPOINT / layout)
    for task in synthetic.TASKS:
        for index in range(4):
            sc = synthetic.scene_for(task, "parity", index)
            with torch.no_grad():
                expected = answer(theirs, their_processor, task, sc, "pt")
            assert answer(ours, processor, task, sc, "np") == expected, (task, index)


def test_the_model_finds_shapes():
    """What the fixture's README promises, on held-out scenes: a good share of the shapes found with the right
    name at IoU >= 0.5 (8 of 23 with the committed weights and their 3 beams; a model that lost the image finds
    almost none)."""
    model = Florence2ForConditionalGeneration.from_pretrained(CHECKPOINT / "hf")
    processor = AutoProcessor.from_pretrained(CHECKPOINT / "hf")
    shapes = hits = 0
    for index in range(24):
        sc = synthetic.scene_for("<OD>", "answers", index)
        shapes += len(sc.shapes)
        hits += synthetic.found(answer(model, processor, "<OD>", sc, "np")[1]["<OD>"], synthetic.truth(sc))
    assert hits >= shapes / 4, f"{hits} of {shapes} shapes found"


def test_the_model_reads_nothing_where_there_is_no_text():
    """`<OCR>` on held-out scenes of shapes only: an empty answer (the README's promise; a model trained only on
    scenes with text names a word in each)."""
    model = Florence2ForConditionalGeneration.from_pretrained(CHECKPOINT / "hf")
    processor = AutoProcessor.from_pretrained(CHECKPOINT / "hf")
    for index in range(8):
        sc = synthetic.scene("blank", index, SIZE, text=False)
        assert answer(model, processor, "<OCR>", sc, "np")[1] == {"<OCR>": ""}, index


MOON_SHAPES = synthetic.SHAPES + (synthetic.NEW_SHAPE,) * 3  # the new shape in about half of the scenes
LORA_STEPS = 240


def moon_scene(split: str, index: int) -> synthetic.Scene:
    return synthetic.scene(split, index, SIZE, text=False, shapes=MOON_SHAPES)


@pytest.fixture(scope="module")
def moon_adapter(tmp_path_factory):
    """A LoRA adapter that peft trains in a few minutes to detect the new shape, saved; returns (its folder,
    peft's model)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = HFModel.from_pretrained(CHECKPOINT / "hf", dtype=torch.float32)
    processor = HFProcessor.from_pretrained(CHECKPOINT / "hf")
    config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj", "fc1", "fc2", "qkv", "proj"])
    peft_model = peft.get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-3)
    peft_model.train()
    batch = 8
    for step in range(LORA_STEPS):
        scenes = [moon_scene("moon-train", step * batch + i) for i in range(batch)]
        inputs = processor(text=["<OD>"] * batch, images=[synthetic.render(sc) for sc in scenes],
                           return_tensors="pt", padding=True)
        labels = processor.tokenizer([synthetic.example(sc, "<OD>")[1] for sc in scenes], return_tensors="pt",
                                     padding=True, return_token_type_ids=False).input_ids
        labels[labels == processor.tokenizer.pad_token_id] = -100
        loss = peft_model(**inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    peft_model.eval()
    folder = tmp_path_factory.mktemp("moon_adapter")
    peft_model.save_pretrained(folder)
    return folder, peft_model, processor


def test_a_lora_adapter_trained_with_peft_finds_a_new_shape_as_in_peft(moon_adapter):
    folder, peft_model, their_processor = moon_adapter
    base = Florence2ForConditionalGeneration.from_pretrained(CHECKPOINT / "hf")
    adapted = Florence2ForConditionalGeneration.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(CHECKPOINT / "hf")
    moons = base_found = adapted_found = 0
    for index in range(12):
        sc = moon_scene("moon-test", index)
        truth = synthetic.truth(sc)
        moons += truth["labels"].count(synthetic.NEW_SHAPE)
        only_moons = {k: [v for v, label in zip(truth[k], truth["labels"]) if label == synthetic.NEW_SHAPE]
                      for k in truth}
        base_found += synthetic.found(answer(base, processor, "<OD>", sc, "np")[1]["<OD>"], only_moons)
        ours = answer(adapted, processor, "<OD>", sc, "np")
        with torch.no_grad():
            assert ours == answer(peft_model, their_processor, "<OD>", sc, "pt"), index
        adapted_found += synthetic.found(ours[1]["<OD>"], only_moons)
    assert moons >= 6
    assert base_found == 0
    assert adapted_found >= moons / 2, f"the adapter found {adapted_found} of {moons} moons"
