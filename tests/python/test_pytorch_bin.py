"""Checkpoints whose weights are a PyTorch `pytorch_model.bin` (torch.save's zip archive) instead of safetensors.

A .bin-only copy of a checkpoint gives exactly the outputs of its safetensors original, in both layouts;
safetensors win where both are there, as in transformers; archives that are not a state dict of plain tensors
are refused with OSError naming the problem, and no pickle code ever runs (a pickle that would run a command
if unpickled by Python leaves no trace).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from florence2_rs import Florence2ForConditionalGeneration  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny"


def _inputs(layout: str) -> dict:
    """The committed reference inputs of the tiny checkpoint, as each layout takes them."""
    ref = safetensors_torch.load_file(TINY / "reference.safetensors")
    n = int(ref["n_image_tokens"][0]) if layout == "original" else 0
    return {
        "input_ids": ref["input_ids"][:, n:].numpy(),
        "attention_mask": ref["attention_mask"][:, n:].numpy(),
        "pixel_values": ref["pixel_values"].numpy(),
    }


def _bin_copy(src: Path, dst: Path, *, keep_safetensors: bool = False) -> Path:
    """`src` with its weights saved by torch.save (transformers' `safe_serialization=False` format)."""
    shutil.copytree(src, dst)
    state = safetensors_torch.load_file(dst / "model.safetensors")
    torch.save(state, dst / "pytorch_model.bin")
    if not keep_safetensors:
        (dst / "model.safetensors").unlink()
    return dst


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_bin_only_copy_gives_the_same_outputs(tmp_path, layout):
    src = TINY / layout
    ours = Florence2ForConditionalGeneration.from_pretrained(src, dtype="float32")
    copy = Florence2ForConditionalGeneration.from_pretrained(_bin_copy(src, tmp_path / layout), dtype="float32")
    inputs = _inputs(layout)
    decoder = {"decoder_input_ids": np.array([[2, 0, 7, 11]] * len(inputs["input_ids"]), dtype=np.int64)}
    np.testing.assert_array_equal(copy(**inputs, **decoder).logits, ours(**inputs, **decoder).logits)
    settings = {"max_new_tokens": 8, "num_beams": 2}
    np.testing.assert_array_equal(copy.generate(**inputs, **settings), ours.generate(**inputs, **settings))


def test_tensors_stored_column_major_load_as_their_values(tmp_path):
    """torch.save keeps a transposed view's strides; the values are what count."""
    folder = _bin_copy(TINY / "hf", tmp_path / "fortran")
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    transposed = [k for k, v in state.items() if v.dim() == 2 and v.shape[0] != v.shape[1]]
    for key in transposed:
        state[key] = state[key].t().contiguous().t()
    assert not state[transposed[0]].is_contiguous()
    _write_state(folder, state)
    inputs = _inputs("hf")
    want = Florence2ForConditionalGeneration.from_pretrained(TINY / "hf", dtype="float32")(**inputs).logits
    got = Florence2ForConditionalGeneration.from_pretrained(folder, dtype="float32")(**inputs).logits
    np.testing.assert_array_equal(got, want)


def test_bin_in_bfloat16_loads_as_stored(tmp_path):
    src = _bin_copy(TINY / "hf", tmp_path / "bf16")
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    torch.save({k: v.to(torch.bfloat16) for k, v in state.items()}, src / "pytorch_model.bin")
    # Without a dtype in config.json, dtype="auto" takes the stored weights' dtype.
    config = json.loads((src / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        config.pop(key, None)
    (src / "config.json").write_text(json.dumps(config))
    model = Florence2ForConditionalGeneration.from_pretrained(src, dtype="auto")
    assert str(model.dtype).endswith("bfloat16")


def test_state_dict_of_transformers_model_loads(tmp_path):
    """torch.save(model.state_dict()): an OrderedDict with torch's `_metadata`, tied weights sharing storage."""
    from transformers import Florence2ForConditionalGeneration as HFModel

    folder = tmp_path / "state_dict"
    shutil.copytree(TINY / "hf", folder)
    (folder / "model.safetensors").unlink()
    torch.save(HFModel.from_pretrained(TINY / "hf", dtype=torch.float32).state_dict(), folder / "pytorch_model.bin")
    inputs = _inputs("hf")
    want = Florence2ForConditionalGeneration.from_pretrained(TINY / "hf", dtype="float32")(**inputs).logits
    got = Florence2ForConditionalGeneration.from_pretrained(folder, dtype="float32")(**inputs).logits
    np.testing.assert_array_equal(got, want)


def test_safetensors_are_preferred_over_bin(tmp_path):
    folder = _bin_copy(TINY / "hf", tmp_path / "both", keep_safetensors=True)
    # A .bin that cannot be read: loading succeeds only because the safetensors are taken first.
    (folder / "pytorch_model.bin").write_bytes(b"not an archive")
    Florence2ForConditionalGeneration.from_pretrained(folder, dtype="float32")


class _RunsACommand:
    """Unpickled by Python, this would run `touch <marker>`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _write_state(folder: Path, state) -> None:
    torch.save(state, folder / "pytorch_model.bin")


def _archive_with(folder: Path, edit) -> None:
    """Rewrites pytorch_model.bin entry by entry, `edit(name, data)` returning the new data (None drops it)."""
    path = folder / "pytorch_model.bin"
    with zipfile.ZipFile(path) as zin:
        entries = [(info, zin.read(info)) for info in zin.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
        for info, data in entries:
            data = edit(info.filename, data)
            if data is not None:
                zout.writestr(info, data)


def _tensor_key(folder: Path) -> str:
    return next(iter(torch.load(folder / "pytorch_model.bin", weights_only=True)))


def _bad_archives():
    def garbage(folder):
        (folder / "pytorch_model.bin").write_bytes(b"\x00" * 100)

    def no_pickle(folder):
        _archive_with(folder, lambda name, data: None if name.endswith("data.pkl") else data)

    def not_a_dict(folder):
        _write_state(folder, [torch.zeros(2)])

    def non_tensor_value(folder):
        state = torch.load(folder / "pytorch_model.bin", weights_only=True)
        state["epoch"] = 3
        _write_state(folder, state)

    def strided(folder):
        state = torch.load(folder / "pytorch_model.bin", weights_only=True)
        key = next(k for k, v in state.items() if v.dim() == 2 and v.shape[0] > 2)
        state[key] = state[key][::2]  # every other row of a larger storage: neither row- nor column-major
        _write_state(folder, state)

    def truncated_storage(folder):
        _archive_with(folder, lambda name, data: data[: len(data) // 2] if "/data/" in name else data)

    def broken_pickle(folder):
        _archive_with(folder, lambda name, data: data[: len(data) // 3] if name.endswith("data.pkl") else data)

    def huge_shape(folder):
        # One tensor of shape (3,), whose pickled shape (BININT1 3, TUPLE1) is edited to claim 2**31 - 1
        # elements: far beyond its 12-byte storage and the machine's memory.
        _write_state(folder, {"model.vision_tower.x": torch.zeros(3)})

        def edit(name, data):
            if not name.endswith("data.pkl"):
                return data
            assert data.count(b"K\x03\x85") == 1
            return data.replace(b"K\x03\x85", b"J\xff\xff\xff\x7f\x85")

        _archive_with(folder, edit)

    def memo_bomb(folder):
        # Each round pairs the memoized value with itself and memoizes the pair: 40 rounds of 5 bytes would
        # ask a reader that copies memoized values for 2**40 of them.
        body = b"\x80\x02]q\x00" + b"h\x00h\x00\x86q\x00" * 40 + b"."
        _archive_with(folder, lambda name, data: body if name.endswith("data.pkl") else data)

    def deep_nesting(folder):
        body = b"\x80\x02N" + b"\x85" * 1_000_000 + b"."
        _archive_with(folder, lambda name, data: body if name.endswith("data.pkl") else data)

    return {
        "memo_bomb": (memo_bomb, "grow far past"),
        "deep_nesting": (deep_nesting, "grow far past"),
        "garbage": (garbage, "zip archive"),
        "no_pickle": (no_pickle, "data.pkl"),
        "not_a_dict": (not_a_dict, "dict"),
        "non_tensor_value": (non_tensor_value, "epoch"),
        "strided": (strided, "strided"),
        "truncated_storage": (truncated_storage, "truncated"),
        "broken_pickle": (broken_pickle, "pickle"),
        "huge_shape": (huge_shape, "claims"),
    }


@pytest.mark.parametrize("case", sorted(_bad_archives()))
def test_bad_archives_are_refused_with_oserror(tmp_path, case):
    folder = _bin_copy(TINY / "hf", tmp_path / case)
    make, message = _bad_archives()[case]
    make(folder)
    # In a subprocess: a crash or abort of the interpreter is a failure too, not only a missing exception.
    code = (
        "import sys\n"
        "from florence2_rs import Florence2ForConditionalGeneration as M\n"
        "try:\n"
        f"    M.from_pretrained({str(folder)!r}, dtype='float32')\n"
        "except OSError as err:\n"
        "    print('OSError:', err); sys.exit(0)\n"
        "except Exception as err:\n"
        "    print(type(err).__name__, err); sys.exit(3)\n"
        "print('loaded'); sys.exit(4)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert message in run.stdout, run.stdout


def test_pickle_code_never_runs(tmp_path):
    folder = _bin_copy(TINY / "hf", tmp_path / "evil")
    marker = tmp_path / "pwned"
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state["payload"] = _RunsACommand(marker)
    _write_state(folder, state)
    with pytest.raises(OSError, match="payload"):
        Florence2ForConditionalGeneration.from_pretrained(folder, dtype="float32")
    assert not marker.exists()
