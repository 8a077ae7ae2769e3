"""`FLORENCE2_MAX_ALLOC_BYTES`: a value that is not a size is a ValueError naming the variable and what it
accepts, raised where a model or a processor is loaded; set to nothing it counts as unset; the sizes it documents
keep working.

Each case runs in its own Python process: the limit is read once per process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny" / "hf"

LOAD = """
import sys
from florence2_rs import AutoProcessor, Florence2ForConditionalGeneration
load = {"model": lambda: Florence2ForConditionalGeneration.from_pretrained(sys.argv[1]),
        "processor": lambda: AutoProcessor.from_pretrained(sys.argv[1])}[sys.argv[2]]
try:
    load()
except Exception as err:
    print(type(err).__name__, err)
    sys.exit(3)
print("loaded")
"""


def _load(what: str, folder: Path, setting: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLORENCE2_MAX_ALLOC_BYTES": setting}
    return subprocess.run([sys.executable, "-c", LOAD, str(folder), what], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.parametrize("setting", ["1.5G", "lots", "-1", " ", "16GB"])
@pytest.mark.parametrize("what", ["model", "processor"])
def test_a_setting_that_is_not_a_size_is_refused(end_to_end_checkpoint, what, setting):
    run = _load(what, end_to_end_checkpoint / "hf", setting)
    assert run.returncode == 3, run.stdout + run.stderr
    assert run.stdout.startswith("ValueError"), run.stdout
    assert f'FLORENCE2_MAX_ALLOC_BYTES="{setting}"' in run.stdout, run.stdout
    assert "K, M, G or T suffix" in run.stdout, run.stdout


@pytest.mark.parametrize("what", ["model", "processor"])
def test_set_to_nothing_is_unset(end_to_end_checkpoint, what):
    """`FLORENCE2_MAX_ALLOC_BYTES=` (empty) leaves the default limit, as an unset variable does."""
    run = _load(what, end_to_end_checkpoint / "hf", "")
    assert run.stdout.strip() == "loaded", run.stdout + run.stderr


@pytest.mark.parametrize("setting", ["200G", "16g", "1073741824", " 512 M "])
def test_documented_sizes_still_load(end_to_end_checkpoint, setting):
    """Guards what worked before the setting was checked: the sizes the variable documents still load."""
    for what in ("model", "processor"):
        run = _load(what, end_to_end_checkpoint / "hf", setting)
        assert run.stdout.strip() == "loaded", run.stdout + run.stderr


def test_the_limit_set_is_the_limit_applied():
    """Guards what worked before the setting was checked: a valid limit is the one applied."""
    # 1K is below what the tiny checkpoint's vision tower needs at its own image size: refused at load.
    run = _load("model", TINY, "1K")
    assert run.returncode == 3, run.stdout + run.stderr
    assert "FLORENCE2_MAX_ALLOC_BYTES=1K" in run.stdout, run.stdout
