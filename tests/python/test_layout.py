"""The checkpoint layout of a config has one reader, the native rule (`io::Layout::of_config`): the layout
`Florence2Config` says is the one the model loader and the processor read, and it is the layout of the code
that loads the config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from florence2_rs import Florence2Config, _native

transformers = pytest.importorskip("transformers")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CONFIGS = sorted(FIXTURES.glob("release/*/config.json")) + sorted(FIXTURES.glob("tiny/*/config.json"))


def _reference_layout(config: dict) -> str:
    """The layout of the code that loads `config`: transformers' own Florence-2 ("hf") where its config class
    takes it and the config names no remote code, else Microsoft's remote code ("original")."""
    if "auto_map" in config:
        return "original"
    try:
        transformers.Florence2Config(**config)
    except ValueError:
        return "original"
    return "hf"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.parent.name)
def test_config_layout_is_the_native_rule_and_the_loading_code(path):
    data = json.loads(path.read_text(encoding="utf-8"))
    layout = Florence2Config.from_json_file(path).layout
    assert layout == _native.checkpoint_layout(data) == _reference_layout(data)


def test_checkpoint_layout_takes_config_json_content_only():
    assert _native.checkpoint_layout({}) == "hf"
    with pytest.raises(TypeError, match="vision_config"):
        _native.checkpoint_layout({"vision_config": object()})
