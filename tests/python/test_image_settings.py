"""A checkpoint's image settings have one reader: the processor and the model find them in the same file
(processor_config.json's `image_processor`, which transformers reads first, else preprocessor_config.json)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

# Under a 1 GiB allocation limit, the processor takes 8000x8000 images (their pixel array fits), the tiny
# checkpoint's vision tower cannot run on them (its first stage's activations do not).
LIMIT = "1G"
LARGE = {"height": 8000, "width": 8000}

LOAD = """
import sys
from florence2_rs import AutoProcessor, Florence2ForConditionalGeneration
print(AutoProcessor.from_pretrained(sys.argv[1]).image_processor.size)
try:
    Florence2ForConditionalGeneration.from_pretrained(sys.argv[1])
except (OSError, MemoryError) as err:
    print(type(err).__name__, err)
else:
    print("loaded")
"""


def _load(folder) -> list[str]:
    """The processor's size and how the model's load ended, in a process of its own (the limit is read once
    per process)."""
    run = subprocess.run([sys.executable, "-c", LOAD, str(folder)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "FLORENCE2_MAX_ALLOC_BYTES": LIMIT})
    assert run.returncode == 0, run.stderr
    return run.stdout.splitlines()


def _settings_only_in(source, folder, holder: str, size: dict) -> None:
    """`source`'s files copied into `folder`, with the image settings (their `size` changed) in `holder` only."""
    shutil.copytree(source, folder)
    processor_file, preprocessor_file = folder / "processor_config.json", folder / "preprocessor_config.json"
    processor = json.loads(processor_file.read_text()) if processor_file.is_file() else {}
    settings = processor.pop("image_processor", None)
    if settings is None:
        settings = json.loads(preprocessor_file.read_text())
    preprocessor_file.unlink(missing_ok=True)
    settings["size"] = size
    if holder == "processor_config.json":
        processor["image_processor"] = settings
    else:
        preprocessor_file.write_text(json.dumps(settings))
    processor_file.write_text(json.dumps(processor))


@pytest.mark.parametrize("holder", ["processor_config.json", "preprocessor_config.json"])
def test_the_model_checks_the_image_size_the_processor_reads(end_to_end_checkpoint, tmp_path, holder):
    """A vision tower that cannot run on the images the checkpoint's processor makes is refused at load, wherever
    the processor's size is written."""
    folder = tmp_path / "checkpoint"
    _settings_only_in(end_to_end_checkpoint / "hf", folder, holder, LARGE)
    size, load = _load(folder)
    assert size == str(LARGE)
    assert "8000x8000" in load and "vision tower" in load, load


def test_a_size_the_tower_can_run_loads(end_to_end_checkpoint, tmp_path):
    folder = tmp_path / "checkpoint"
    small = {"height": 64, "width": 64}
    _settings_only_in(end_to_end_checkpoint / "hf", folder, "processor_config.json", small)
    assert _load(folder) == [str(small), "loaded"]
