"""The configuration objects: BART's defaults come from the native model config, and equal transformers'."""

from __future__ import annotations

import pytest

from florence2_rs import Florence2Config
from florence2_rs._native import TEXT_CONFIG_DEFAULTS

transformers = pytest.importorskip("transformers")


def test_the_native_text_defaults_are_bart_configs():
    """Every default the model applies to a text_config that leaves a setting out is transformers' BartConfig's."""
    reference = transformers.BartConfig()
    assert {name: getattr(reference, name) for name in TEXT_CONFIG_DEFAULTS} == TEXT_CONFIG_DEFAULTS
    assert {"vocab_size", "pad_token_id", "decoder_start_token_id", "max_position_embeddings"} <= set(
        TEXT_CONFIG_DEFAULTS)


def test_a_setting_config_json_leaves_out_reads_as_the_default():
    """As in transformers, `text_config.<setting>` answers for settings config.json leaves out; the config's
    own values win, and to_dict stays config.json's content."""
    config = Florence2Config(text_config={"d_model": 8}, vision_config={})
    reference = transformers.BartConfig(d_model=8)
    for name in ("d_model", "vocab_size", "pad_token_id", "decoder_start_token_id", "max_position_embeddings"):
        assert getattr(config.text_config, name) == getattr(reference, name), name
    assert config.text_config.to_dict() == {"d_model": 8}
    assert not hasattr(config.text_config, "no_such_setting")


def test_a_config_holds_what_json_cannot_as_transformers_configs_do():
    """The layout rule reads only the model types: a torch dtype, int label keys or a huge number elsewhere in
    a config are kept, as transformers' configs keep them, and the layout is still read."""
    torch = pytest.importorskip("torch")
    config = Florence2Config(text_config={"id2label": {0: "LABEL_0"}}, vision_config={"model_type": "davit"},
                             torch_dtype=torch.float16, big=10**400)
    assert config.layout == "original"
    assert transformers.PretrainedConfig(torch_dtype=torch.float16, big=10**400).big == 10**400
