"""The settings generate() starts from when the caller gives none, on checkpoints with the released config files.

- Microsoft's layout: its remote code generates through `self.language_model.generate(...)`, whose generation
  config comes from config.json's `text_config` (num_beams 3, no_repeat_ngram_size 3, early_stopping, forced
  `<s>` and `</s>`); a generation_config.json, as Florence-2-large-ft ships one, never reaches that call. The
  reference is transformers' Florence-2 on the same weights with the LM head cut to the original rows (what
  Microsoft's model computes) generating with the released text_config's settings.
- The HF-native layout: transformers' own defaults for the checkpoint folder.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import skimage
import torch
from PIL import Image

import florence2_rs
import make_fixtures  # tests/fixtures, on sys.path through conftest.py
import transformers
from test_generation import original_vocab_reference
from transformers import AutoProcessor as HFProcessor
from transformers import Florence2ForConditionalGeneration as HFModel

RELEASE = make_fixtures.RELEASE_FILES
# The generation settings Microsoft's Florence2LanguageConfig reads from text_config.
TEXT_GENERATION_KEYS = ("num_beams", "no_repeat_ngram_size", "early_stopping", "forced_bos_token_id",
                        "forced_eos_token_id", "decoder_start_token_id", "bos_token_id", "eos_token_id",
                        "pad_token_id")
# The shape keys of the fixture's config that replace the released model's (everything else is released).
TEXT_SHAPE_KEYS = ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                   "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "max_position_embeddings",
                   "scale_embedding", "num_hidden_layers")
PROMPTS = ["<OD>", "<CAPTION>", "<OCR_WITH_REGION>"]
MAX_NEW_TOKENS = 20


def released(name: str) -> dict:
    return json.loads((RELEASE / name).read_text())


def released_original_config(fixture_config: dict) -> dict:
    """microsoft/Florence-2-base's config.json with the fixture's shapes: every generation setting is the
    released one."""
    config = released("microsoft_Florence-2-base/config.json")
    for key in TEXT_SHAPE_KEYS:
        if key in fixture_config["text_config"]:
            config["text_config"][key] = fixture_config["text_config"][key]
    config["vision_config"] = fixture_config["vision_config"]
    config["projection_dim"] = fixture_config["projection_dim"]
    config["vocab_size"] = fixture_config["vocab_size"]
    config["torch_dtype"] = "float32"
    return config


@pytest.fixture(scope="module")
def checkpoints(end_to_end_checkpoint, tmp_path_factory):
    """Original-layout copies of the end-to-end checkpoint with the released config sets: base (no
    generation_config.json) and large-ft (its bare generation_config.json)."""
    root = tmp_path_factory.mktemp("released_configs")
    source = end_to_end_checkpoint / "original"
    config = released_original_config(json.loads((source / "config.json").read_text()))
    folders = {}
    for name, generation in [("base", None), ("large-ft", "microsoft_Florence-2-large-ft/generation_config.json")]:
        folder = root / name
        shutil.copytree(source, folder)
        (folder / "config.json").write_text(json.dumps(config))
        if generation:
            shutil.copyfile(RELEASE / generation, folder / "generation_config.json")
        folders[name] = folder
    return folders


@pytest.fixture(scope="module")
def reference(end_to_end_checkpoint):
    hf = end_to_end_checkpoint / "hf"
    n_vocab = florence2_rs.Florence2Config.from_pretrained(end_to_end_checkpoint / "original").text_config.vocab_size
    return HFProcessor.from_pretrained(hf), original_vocab_reference(end_to_end_checkpoint, n_vocab)


def text_config_settings() -> dict:
    text = released("microsoft_Florence-2-base/config.json")["text_config"]
    return {key: text[key] for key in TEXT_GENERATION_KEYS}


def hf_inputs(processor, prompt):
    return processor(text=prompt, images=Image.fromarray(skimage.data.astronaut()), return_tensors="pt")


def test_released_text_config_sets_beam_search():
    """The settings the reference is given are the released ones (not a fixture's guess)."""
    settings = text_config_settings()
    assert settings["num_beams"] == 3 and settings["no_repeat_ngram_size"] == 3
    assert settings["forced_bos_token_id"] == 0 and settings["forced_eos_token_id"] == 2
    assert released("microsoft_Florence-2-large-ft/generation_config.json") == {"num_beams": 3,
                                                                                "early_stopping": False}


@pytest.mark.parametrize("config_set", ["base", "large-ft"])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_original_layout_defaults_are_microsofts(checkpoints, reference, config_set, prompt):
    hf_processor, ref_model = reference
    theirs = hf_inputs(hf_processor, prompt)
    with torch.no_grad():
        expected = ref_model.generate(**theirs, max_new_tokens=MAX_NEW_TOKENS, **text_config_settings()).numpy()
    folder = checkpoints[config_set]
    processor = florence2_rs.AutoProcessor.from_pretrained(folder)
    model = florence2_rs.Florence2ForConditionalGeneration.from_pretrained(folder)
    ours = processor(text=prompt, images=Image.fromarray(skimage.data.astronaut()), return_tensors="np")
    ids = model.generate(**ours, max_new_tokens=MAX_NEW_TOKENS)
    np.testing.assert_array_equal(ids, expected)
    assert ids[0, 1] == 0, "the forced <s> after the decoder start"
    assert model.generation_config.num_beams == 3
    assert model.generation_config.no_repeat_ngram_size == 3


@pytest.mark.parametrize("layout", ["original", "hf"])
def test_caller_generation_config_over_model_defaults(end_to_end_checkpoint, checkpoints, reference, layout):
    """A transformers GenerationConfig: the attributes it sets away from transformers' global defaults replace
    the model's (num_beams), the others keep the model's (no_repeat_ngram_size 3); transformers-only
    attributes (num_assistant_tokens, ...) are accepted."""
    hf_processor, ref_model = reference
    if layout == "hf":
        folder = end_to_end_checkpoint / "hf"
        ref_model = HFModel.from_pretrained(folder).eval()
        base = {}
    else:
        folder = checkpoints["large-ft"]
        base = text_config_settings()
    theirs = hf_inputs(hf_processor, "<OD>")
    with torch.no_grad():
        expected = ref_model.generate(**theirs, max_new_tokens=MAX_NEW_TOKENS,
                                      **{**base, "num_beams": 2, "length_penalty": 0.5}).numpy()
    model = florence2_rs.Florence2ForConditionalGeneration.from_pretrained(folder)
    processor = florence2_rs.AutoProcessor.from_pretrained(folder)
    ours = processor(text="<OD>", images=Image.fromarray(skimage.data.astronaut()), return_tensors="np")
    ids = model.generate(**ours, generation_config=transformers.GenerationConfig(num_beams=2, length_penalty=0.5),
                         max_new_tokens=MAX_NEW_TOKENS)
    np.testing.assert_array_equal(ids, expected)


def test_edited_model_generation_config_is_used(checkpoints):
    """model.generation_config is what generate() starts from, as in transformers: editing it changes the
    next call."""
    folder = checkpoints["base"]
    model = florence2_rs.Florence2ForConditionalGeneration.from_pretrained(folder)
    processor = florence2_rs.AutoProcessor.from_pretrained(folder)
    ours = processor(text="<OD>", images=Image.fromarray(skimage.data.astronaut()), return_tensors="np")
    beams = model.generate(**ours, max_new_tokens=MAX_NEW_TOKENS, output_scores=True, return_dict_in_generate=True)
    model.generation_config.num_beams = 1
    greedy = model.generate(**ours, max_new_tokens=MAX_NEW_TOKENS, output_scores=True, return_dict_in_generate=True)
    assert beams.sequences_scores is not None and greedy.sequences_scores is None
