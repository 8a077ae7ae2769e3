"""Shared pytest fixtures: random-weight checkpoints built live with transformers (the reference)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RELEASE_FILES = ROOT / "tests" / "fixtures" / "release"
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))


def _reference_available() -> str | None:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        return str(err)
    return None


def pytest_configure(config: pytest.Config) -> None:
    missing = _reference_available()
    if missing and os.environ.get("CI") == "true":
        raise pytest.UsageError(f"CI=true but the transformers reference cannot run: {missing}")


@pytest.fixture(scope="session")
def reference_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny and tiny_uneven checkpoints in both layouts (<root>/<spec>/{hf,original}), made by transformers."""
    if _reference_available():
        pytest.skip("transformers/torch not installed")
    import make_fixtures

    root = tmp_path_factory.mktemp("checkpoints")
    for spec in ("tiny", "tiny_uneven"):
        make_fixtures.make(spec, root)
    return root


@pytest.fixture(scope="session")
def end_to_end_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_768: tiny shapes with the released vocabulary, 768² images and processor files, both layouts
    (<root>/hf, <root>/original), with the released tokenizers of tests/fixtures/release."""
    if _reference_available():
        pytest.skip("transformers/torch not installed")
    import make_fixtures

    root = tmp_path_factory.mktemp("end_to_end")
    make_fixtures.make("tiny_768", root)
    return root / "tiny_768"


@pytest.fixture(scope="module")
def hf_native_processors(tmp_path_factory: pytest.TempPathFactory):
    """(transformers' processor of the released HF-native files, florence2-rs' processor of the folder it saved);
    one pair per test module, so that a module that changes a processor's settings changes only its own."""
    import make_fixtures

    from florence2_rs import AutoProcessor

    ref = make_fixtures.reference_processor(make_fixtures.RELEASE_FILES)
    folder = tmp_path_factory.mktemp("hf_native")
    ref.save_pretrained(folder)
    return ref, AutoProcessor.from_pretrained(folder)
