"""Bad inputs and what each gets: an exception of the type a transformers user would catch, with a message that
says what is wrong. None may crash the interpreter or surface as a Rust panic (pyo3's PanicException is a
BaseException, so `pytest.raises(<Exception subclass>)` would not catch it and the case fails).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

import florence2_rs
from florence2_rs import AutoProcessor, Florence2ForConditionalGeneration

load = Florence2ForConditionalGeneration.from_pretrained


@pytest.fixture(scope="module")
def env(end_to_end_checkpoint, tmp_path_factory):
    """Broken copies of the end-to-end checkpoint, broken image files, and a working model and processor."""
    source = end_to_end_checkpoint / "hf"
    root = tmp_path_factory.mktemp("bad")

    def copy(name, drop=()):
        folder = root / name
        shutil.copytree(source, folder, ignore=shutil.ignore_patterns(*drop))
        return folder

    def edit_config(folder, edit):
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))

    weights = (source / "model.safetensors").read_bytes()
    copy("no_weights", drop=["model.safetensors"])
    (copy("truncated") / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (copy("corrupt") / "model.safetensors").write_bytes(b"\x00" * 1000)
    edit_config(copy("wider_text"), lambda c: c["text_config"].update(d_model=64))
    edit_config(copy("deeper_vision"), lambda c: c["vision_config"].update(depths=[1, 1, 3, 1]))
    edit_config(copy("window_100000"), lambda c: c["vision_config"].update(window_size=100000))
    edit_config(copy("window_2_40"), lambda c: c["vision_config"].update(window_size=2**40))
    edit_config(copy("padding_1000000"), lambda c: c["vision_config"].update(patch_padding=[1000000, 1, 1, 1]))
    (root / "empty.png").write_bytes(b"")
    (root / "junk.png").write_bytes(b"this is not an image")
    processor = AutoProcessor.from_pretrained(source)
    model = load(source)
    image = Image.new("RGB", (64, 48), "red")
    inputs = processor(text="<OD>", images=image, return_tensors="np")
    return dict(root=root, source=source, processor=processor, model=model, image=image, inputs=inputs)


def _self_list() -> list:
    """A list that contains itself: no setting can be, and converting one must stop rather than recurse."""
    items: list = [[5]]
    items.append(items)
    return items


# (case, call, exception type, pattern the message must match)
CASES = [
    ("missing folder", lambda e: load(e["root"] / "nowhere"), FileNotFoundError, "nowhere.*not found"),
    ("missing Hub repo", lambda e: load("nobody-here/no-such-model", local_files_only=True), FileNotFoundError,
     "no-such-model"),
    ("folder without weights", lambda e: load(e["root"] / "no_weights"), OSError, "no model.safetensors"),
    ("truncated model.safetensors", lambda e: load(e["root"] / "truncated"), OSError, "truncated or corrupt"),
    ("corrupt model.safetensors", lambda e: load(e["root"] / "corrupt"), OSError, "truncated or corrupt"),
    ("config width contradicts weights", lambda e: load(e["root"] / "wider_text"), OSError, "d_model"),
    ("config depth contradicts weights", lambda e: load(e["root"] / "deeper_vision"), OSError,
     "do not match this Florence-2 config"),
    ("CUDA device in a CPU build", lambda e: load(e["source"], device="cuda:0"), ValueError,
     "needs a CUDA build"),
    ("zero-size image file", lambda e: e["processor"](text="<OD>", images=str(e["root"] / "empty.png")), OSError,
     "cannot identify image file"),
    ("unreadable image file", lambda e: e["processor"](text="<OD>", images=str(e["root"] / "junk.png")), OSError,
     "cannot identify image file"),
    ("missing image file", lambda e: e["processor"](text="<OD>", images=str(e["root"] / "none.png")),
     FileNotFoundError, "none.png"),
    ("zero-size image array", lambda e: e["processor"](text="<OD>", images=np.zeros((0, 0, 3), np.uint8)),
     ValueError, "empty image"),
    ("text after a task that takes none", lambda e: e["processor"](text="<OD> the car", images=e["image"]),
     ValueError, "<OD> should be the only content"),
    ("generate kwarg of the wrong type", lambda e: e["model"].generate(**e["inputs"], max_new_tokens="ten"),
     ValueError, "max_new_tokens"),
    ("generate kwarg that is no setting", lambda e: e["model"].generate(**e["inputs"], num_beams=object()),
     TypeError, "not a setting"),
    ("generate kwarg that contains itself", lambda e: e["model"].generate(**e["inputs"], bad_words_ids=_self_list()),
     ValueError, "bad_words_ids.*contains itself"),
    ("unknown generate kwarg", lambda e: e["model"].generate(**e["inputs"], num_beamz=3), ValueError,
     "num_beamz.*not a generation setting"),
    ("max_new_tokens 0", lambda e: e["model"].generate(**e["inputs"], max_new_tokens=0), ValueError,
     "max_new_tokens.*greater than 0"),
    ("max_new_tokens negative", lambda e: e["model"].generate(**e["inputs"], max_new_tokens=-3), ValueError,
     "max_new_tokens.*greater than 0"),
    ("batch with more texts than images",
     lambda e: e["processor"](text=["<OD>", "<CAPTION>"], images=[e["image"]]), ValueError,
     r"number of images \(1\) does not match the number of texts \(2\)"),
    ("batch with more images than prompts in generate",
     lambda e: e["model"].generate(input_ids=e["inputs"]["input_ids"],
                                   pixel_values=np.concatenate([e["inputs"]["pixel_values"]] * 2)),
     ValueError, "image features"),
    ("num_beams beyond memory", lambda e: e["model"].generate(**e["inputs"], num_beams=10**6), MemoryError,
     r"num_beams=1000000.*FLORENCE2_MAX_ALLOC_BYTES"),
    ("num_beams 2**63", lambda e: e["model"].generate(**e["inputs"], num_beams=2**63), MemoryError,
     "num_beams=9223372036854775808"),
    ("num_beams 2**64", lambda e: e["model"].generate(**e["inputs"], num_beams=2**64), ValueError,
     "num_beams.*below 2\\^64"),
    ("max_new_tokens 2**64 - 1", lambda e: e["model"].generate(**e["inputs"], max_new_tokens=2**64 - 1),
     ValueError, "max_new_tokens.*too large"),
    ("window_size 100000", lambda e: load(e["root"] / "window_100000"), OSError,
     "config.json.*window_size 100000.*needs"),
    ("window_size 2**40", lambda e: load(e["root"] / "window_2_40"), OSError, "window_size 1099511627776"),
    ("patch_padding 1000000", lambda e: load(e["root"] / "padding_1000000"), OSError,
     r"patch_padding \[1000000, 1, 1, 1\]"),
    ("zero-height pixel_values", lambda e: e["model"].generate(input_ids=e["inputs"]["input_ids"],
                                                              pixel_values=np.zeros((1, 3, 0, 768), np.float32)),
     ValueError, "empty 0x768 image"),
    ("zero-height pixel_values, float16", lambda e: load(e["source"], dtype="float16").get_image_features(
        np.zeros((1, 3, 0, 768), np.float32)), ValueError, "empty 0x768 image"),
    ("temperature inf", lambda e: e["model"].generate(**e["inputs"], do_sample=True, temperature=float("inf")),
     ValueError, "temperature.*finite"),
    ("empty input_ids", lambda e: e["model"].generate(input_ids=np.zeros((1, 0), np.int64)), ValueError,
     "holds no token"),
    ("a panic in native code", lambda e: florence2_rs._native._panic_inside_guard(), RuntimeError,
     "internal error in _panic_inside_guard.*deliberate panic"),
    ("labels of one dimension", lambda e: e["model"](**e["inputs"], labels=np.array([0, 5, 2])), ValueError,
     r"labels must have shape \[1, T\], got \[3\]"),
    ("labels of another batch size", lambda e: e["model"](**e["inputs"], labels=np.zeros((2, 3), np.int64)),
     ValueError, r"labels must have shape \[1, T\], got \[2, 3\]"),
    ("labels without positions", lambda e: e["model"](**e["inputs"], labels=np.zeros((1, 0), np.int64)),
     ValueError, r"labels must have shape \[1, T\], got \[1, 0\]"),
    ("labels unlike decoder_input_ids",
     lambda e: e["model"](**e["inputs"], decoder_input_ids=np.array([[2, 0]]), labels=np.array([[0, 5, 2]])),
     ValueError, r"labels must have shape \[1, 2\] \(decoder_input_ids\), got \[1, 3\]"),
    ("label beyond the vocabulary", lambda e: e["model"](**e["inputs"], labels=np.array([[0, 51328, 2]])),
     ValueError, "label 51328 is outside the vocabulary of 51328 tokens"),
    ("negative label other than -100", lambda e: e["model"](**e["inputs"], labels=[[0, -1, 2]]), ValueError,
     "label -1 is outside the vocabulary"),
    ("labels that are not integers", lambda e: e["model"](**e["inputs"], labels=np.array([[0.0, 5.5]])), ValueError,
     "labels must be integer token ids.*float64"),
    ("pipeline task other than image-text-to-text", lambda e: florence2_rs.pipeline("object-detection", model="x"),
     ValueError, "image-text-to-text"),
]


@pytest.mark.parametrize("call, error, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_a_clear_error(env, call, error, pattern):
    with pytest.raises(error, match=pattern):
        call(env)


def test_unknown_task_token_is_plain_text_as_in_transformers(env, end_to_end_checkpoint):
    """Not an error in transformers either: an unknown `<TASK>` is tokenized as text and parsed as pure text."""
    from transformers import AutoProcessor as ReferenceProcessor

    reference = ReferenceProcessor.from_pretrained(end_to_end_checkpoint / "hf")
    ours = env["processor"](text="<NOT_A_TASK>", images=env["image"], return_tensors="np")
    theirs = reference(text="<NOT_A_TASK>", images=env["image"], return_tensors="np")
    np.testing.assert_array_equal(ours["input_ids"], theirs["input_ids"])
    text = "</s><s>a red picture</s>"
    assert env["processor"].post_process_generation(text, task="<NOT_A_TASK>", image_size=(64, 48)) == \
        reference.post_process_generation(text, task="<NOT_A_TASK>", image_size=(64, 48))
