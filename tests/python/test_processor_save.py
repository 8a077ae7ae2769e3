"""`Florence2Processor.save_pretrained`: the saved folder loads back, here and in transformers, to the same inputs.

The checkpoints are the end-to-end fixture's (released tokenizers and 768x768 image settings): the HF-native
folder holds the processor files transformers wrote, the original one Microsoft's released files, which
transformers cannot load without Microsoft's remote code (neither the source nor the copy).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

from florence2_rs import AutoProcessor, Florence2Processor  # noqa: E402

IMAGE = Image.fromarray(np.random.default_rng(5).integers(0, 256, (50, 70, 3), dtype=np.uint8))
TEXTS = ["<OD>", "<CAPTION_TO_PHRASE_GROUNDING> a red car", "What is this?"]


def _inputs(processor, **kwargs):
    return processor(text=TEXTS, images=[IMAGE] * len(TEXTS), return_tensors="np", padding=True, **kwargs)


def _assert_same(got, want):
    assert set(got) == set(want)
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
    np.testing.assert_array_equal(got["attention_mask"], want["attention_mask"])
    assert got["pixel_values"].dtype == want["pixel_values"].dtype
    np.testing.assert_array_equal(got["pixel_values"], want["pixel_values"])


def test_hf_native_round_trip_in_both_libraries(end_to_end_checkpoint, tmp_path):
    source = end_to_end_checkpoint / "hf"
    ours = AutoProcessor.from_pretrained(source)
    written = ours.save_pretrained(tmp_path / "saved")
    assert {"tokenizer.json", "tokenizer_config.json", "processor_config.json", "config.json"} <= \
        {name.rsplit("/", 1)[-1] for name in written}
    reference = _inputs(transformers.AutoProcessor.from_pretrained(source))
    _assert_same(_inputs(ours), reference)
    _assert_same(_inputs(AutoProcessor.from_pretrained(tmp_path / "saved")), reference)
    _assert_same(_inputs(transformers.AutoProcessor.from_pretrained(tmp_path / "saved")), reference)


def test_transformers_saved_processor_loads_here(end_to_end_checkpoint, tmp_path):
    ref = transformers.AutoProcessor.from_pretrained(end_to_end_checkpoint / "hf")
    ref.save_pretrained(tmp_path)
    _assert_same(_inputs(Florence2Processor.from_pretrained(tmp_path)), _inputs(ref))


def test_original_layout_round_trip(end_to_end_checkpoint, tmp_path):
    source = end_to_end_checkpoint / "original"
    ours = AutoProcessor.from_pretrained(source)
    ours.save_pretrained(tmp_path)
    again = AutoProcessor.from_pretrained(tmp_path)
    assert ours.image_token_id is None and again.image_token_id is None
    _assert_same(_inputs(again), _inputs(ours))
    # transformers reads neither Microsoft's released processor files nor their copy without remote code.
    for folder in (source, tmp_path):
        with pytest.raises(Exception):
            transformers.AutoProcessor.from_pretrained(folder)


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_model_config_in_the_folder_is_kept(end_to_end_checkpoint, tmp_path, layout):
    """A model saved into the folder first keeps its config.json; the processor still reads the layout
    from it."""
    source = end_to_end_checkpoint / layout
    config = (source / "config.json").read_text()
    (tmp_path / "config.json").write_text(config.replace("{", '{"saved_by_the_model": true, ', 1))
    AutoProcessor.from_pretrained(source).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["saved_by_the_model"] is True
    expected = AutoProcessor.from_pretrained(source).image_token_id
    assert AutoProcessor.from_pretrained(tmp_path).image_token_id == expected


def test_changed_image_settings_are_saved(end_to_end_checkpoint, tmp_path):
    source = end_to_end_checkpoint / "hf"
    ours, ref = AutoProcessor.from_pretrained(source), transformers.AutoProcessor.from_pretrained(source)
    for processor in (ours, ref):
        processor.image_processor.size = {"height": 384, "width": 320}
        processor.image_processor.do_rescale = False
    _assert_same(_inputs(ours), _inputs(ref))
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "ref")
    want = _inputs(transformers.AutoProcessor.from_pretrained(tmp_path / "ref"))
    assert want["pixel_values"].shape[-2:] == (384, 320)
    _assert_same(_inputs(AutoProcessor.from_pretrained(tmp_path / "ours")), want)
    _assert_same(_inputs(transformers.AutoProcessor.from_pretrained(tmp_path / "ours")), want)


def test_saving_errors(end_to_end_checkpoint, tmp_path):
    ours = AutoProcessor.from_pretrained(end_to_end_checkpoint / "hf")
    with pytest.raises(NotImplementedError, match="upload_folder"):
        ours.save_pretrained(tmp_path, push_to_hub=True)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OSError, match="directory"):
        ours.save_pretrained(tmp_path / "a_file")
    # Saving into the folder it was loaded from rewrites nothing it needs.
    ours.save_pretrained(tmp_path / "copy")
    copy = AutoProcessor.from_pretrained(tmp_path / "copy")
    copy.save_pretrained(tmp_path / "copy")
    _assert_same(_inputs(AutoProcessor.from_pretrained(tmp_path / "copy")), _inputs(ours))


def _edit_in_place_size(image_processor):
    image_processor.size["height"] = 64


def _edit_in_place_mean(image_processor):
    if isinstance(image_processor.image_mean, list):
        image_processor.image_mean[0] = 0.9
    else:  # transformers' mean is a tuple
        image_processor.image_mean = (0.9, *image_processor.image_mean[1:])


EDITS = {
    "size_in_place": _edit_in_place_size,
    "mean_in_place": _edit_in_place_mean,
    "size_int": lambda ip: setattr(ip, "size", 384),
    "size_pair": lambda ip: setattr(ip, "size", (300, 200)),
    "crop_size_int": lambda ip: (setattr(ip, "do_center_crop", True), setattr(ip, "crop_size", 100)),
    "pad_size_list": lambda ip: (setattr(ip, "do_pad", True), setattr(ip, "pad_size", [800, 900])),
    "mean_array": lambda ip: setattr(ip, "image_mean", np.array([0.5, 0.4, 0.3])),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_edited_image_settings_are_used_and_saved(end_to_end_checkpoint, tmp_path, edit):
    """Attributes edited in place, or set to the forms transformers' processor takes (an int or a pair as
    the size, a numpy array as the mean), are the processor's settings, and are saved so that both
    libraries load them back."""
    source = end_to_end_checkpoint / "hf"
    ours, ref = AutoProcessor.from_pretrained(source), transformers.AutoProcessor.from_pretrained(source)
    for processor in (ours, ref):
        EDITS[edit](processor.image_processor)
    want = _inputs(ref)
    _assert_same(_inputs(ours), want)
    ours.save_pretrained(tmp_path / "ours")
    _assert_same(_inputs(AutoProcessor.from_pretrained(tmp_path / "ours")), want)
    _assert_same(_inputs(transformers.AutoProcessor.from_pretrained(tmp_path / "ours")), want)


def test_image_settings_in_both_files(end_to_end_checkpoint, tmp_path):
    """A folder with processor_config.json's `image_processor` and a preprocessor_config.json that differ:
    the settings are read as transformers reads them (the nested ones first), and a change is saved into
    both files."""
    import shutil

    folder = tmp_path / "both"
    shutil.copytree(end_to_end_checkpoint / "hf", folder)
    nested = json.loads((folder / "processor_config.json").read_text())["image_processor"]
    (folder / "preprocessor_config.json").write_text(json.dumps({**nested, "size": {"height": 96, "width": 96}}))
    ours, ref = AutoProcessor.from_pretrained(folder), transformers.AutoProcessor.from_pretrained(folder)
    _assert_same(_inputs(ours), _inputs(ref))
    for processor in (ours, ref):
        processor.image_processor.size = {"height": 64, "width": 80}
    want = _inputs(ref)
    ours.save_pretrained(tmp_path / "saved")
    for name in ("preprocessor_config.json", "processor_config.json"):
        document = json.loads((tmp_path / "saved" / name).read_text())
        assert document.get("image_processor", document)["size"] == {"height": 64, "width": 80}, name
    _assert_same(_inputs(AutoProcessor.from_pretrained(tmp_path / "saved")), want)
    _assert_same(_inputs(transformers.AutoProcessor.from_pretrained(tmp_path / "saved")), want)
