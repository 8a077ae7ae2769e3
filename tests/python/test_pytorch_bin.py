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
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from florence2_rs import Florence2ForConditionalGeneration  # noqa: E402

import test_hub  # noqa: E402  (its fake Hub)
from test_hub import hub  # noqa: E402,F401  (the fixture)

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


def _sharded_save(folder: Path) -> Path:
    """The tiny checkpoint in PyTorch shards as transformers 4's `save_pretrained(safe_serialization=False,
    max_shard_size=...)` wrote them: pytorch_model.bin.index.json and pytorch_model-0000N-of-0000M.bin. transformers
    5 writes safetensors only, so its sharded save is made and each shard rewritten with torch.save under the
    name and in the index transformers 4 used."""
    from transformers import Florence2ForConditionalGeneration as HFModel

    shutil.copytree(TINY / "hf", folder)
    (folder / "model.safetensors").unlink()
    HFModel.from_pretrained(TINY / "hf", dtype=torch.float32).save_pretrained(folder, max_shard_size="100KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    renamed = {}
    for shard in sorted(set(index["weight_map"].values())):
        renamed[shard] = shard.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
        torch.save(safetensors_torch.load_file(folder / shard), folder / renamed[shard])
        (folder / shard).unlink()
    index["weight_map"] = {name: renamed[shard] for name, shard in index["weight_map"].items()}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (folder / "model.safetensors.index.json").unlink()
    assert len(renamed) > 1
    return folder


def test_sharded_bin_of_transformers_save_loads(tmp_path):
    folder = _sharded_save(tmp_path / "sharded")
    inputs = _inputs("hf")
    want = Florence2ForConditionalGeneration.from_pretrained(TINY / "hf", dtype="float32")
    got = Florence2ForConditionalGeneration.from_pretrained(folder, dtype="auto")
    assert str(got.dtype).endswith("float32")
    np.testing.assert_array_equal(got(**inputs).logits, want(**inputs).logits)
    settings = {"max_new_tokens": 8, "num_beams": 2}
    np.testing.assert_array_equal(got.generate(**inputs, **settings), want.generate(**inputs, **settings))


def _edit_index(folder: Path, edit) -> None:
    path = folder / "pytorch_model.bin.index.json"
    index = json.loads(path.read_text())
    edit(index["weight_map"])
    path.write_text(json.dumps(index))


def _bad_shard_sets():
    def outside(weight_map):
        weight_map[next(iter(weight_map))] = "../pytorch_model.bin"

    def missing_shard(weight_map):
        weight_map[next(iter(weight_map))] = "pytorch_model-09999-of-09999.bin"

    def wrong_shard(weight_map):
        names = sorted(set(weight_map.values()))
        key = next(k for k, v in weight_map.items() if v == names[0])
        weight_map[key] = names[1]

    def twice(folder):
        shards = sorted(folder.glob("pytorch_model-*.bin"))
        first = torch.load(shards[0], weights_only=True)
        second = torch.load(shards[1], weights_only=True)
        torch.save({**second, **dict(list(first.items())[:1])}, shards[1])

    return {
        "outside": (lambda folder: _edit_index(folder, outside), "not a file name inside"),
        "missing_shard": (lambda folder: _edit_index(folder, missing_shard), "listed as a shard"),
        "wrong_shard": (lambda folder: _edit_index(folder, wrong_shard), "does not hold it"),
        "tensor_in_two_shards": (twice, "two shards"),
    }


@pytest.mark.parametrize("case", sorted(_bad_shard_sets()))
def test_bad_shard_sets_are_refused(tmp_path, case):
    folder = _sharded_save(tmp_path / case)
    make, message = _bad_shard_sets()[case]
    make(folder)
    with pytest.raises(OSError, match=message):
        Florence2ForConditionalGeneration.from_pretrained(folder, dtype="float32")


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


def _text(value: str) -> bytes:
    """A pickled str (BINUNICODE)."""
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _int(value: int) -> bytes:
    """A pickled int: BININT (4 bytes) where it fits, else LONG1 (8 bytes), as pickle writes them."""
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    return b"\x8a\x08" + value.to_bytes(8, "little", signed=True)


STORAGE_ID = b"(" + _text("storage") + b"ctorch\nFloatStorage\n" + _text("0") + _text("cpu") + _int(8) + b"t"


def _rebuild_pickle(*, storage: bytes = STORAGE_ID, offset: bytes = _int(0), size: bytes = _int(8) + b"\x85",
                    stride: bytes = _int(1) + b"\x85", rest: bytes = b"\x89") -> bytes:
    """data.pkl of `{"model.vision_tower.x": _rebuild_tensor_v2(storage, offset, size, stride, *rest)}`, each part
    given as pickle opcodes (by default a float32 tensor of 8 elements, the whole of storage "0")."""
    args = b"(" + storage + b"Q" + offset + size + stride + rest + b"t"
    return (b"\x80\x02}" + _text("model.vision_tower.x") + b"ctorch._utils\n_rebuild_tensor_v2\n" + args
            + b"Rs.")


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

    def rebuilt_with(**parts):
        # One float32 storage of 8 elements under key "0", described by a hand-written rebuild call.
        def make(folder):
            _write_state(folder, {"model.vision_tower.x": torch.zeros(8)})
            body = _rebuild_pickle(**parts)
            _archive_with(folder, lambda name, data: body if name.endswith("data.pkl") else data)

        return make

    return {
        # 2**62 elements of 4 bytes wrap to byte 0 in 64-bit arithmetic: refused as torch refuses it.
        "huge_storage_offset": (rebuilt_with(offset=_int(2**62)), "overflowed"),
        "offset_past_storage": (rebuilt_with(offset=_int(1000)), "beyond its storage"),
        "negative_offset": (rebuilt_with(offset=_int(-4)), "non-negative"),
        "huge_stride": (rebuilt_with(size=_int(2) + b"\x85", stride=_int(2**62) + b"\x85"), "overflowed"),
        "storage_larger_than_record": (
            rebuilt_with(storage=STORAGE_ID.replace(_int(8), _int(1000))), "its storage claims"),
        "rebuild_with_two_arguments": (rebuilt_with(size=b"", stride=b"", rest=b""), "malformed"),
        "storage_id_too_short": (rebuilt_with(storage=b"(" + _text("storage") + b"t"), "malformed"),
        "size_not_a_tuple": (rebuilt_with(size=_int(8)), "malformed"),
        "sizes_and_strides_differ": (rebuilt_with(stride=_int(1) + _int(1) + b"\x86"), "malformed"),
        "memo_bomb": (memo_bomb, "grow far past"),
        "deep_nesting": (deep_nesting, "grow far past"),
        "garbage": (garbage, "zip archive"),
        "no_pickle": (no_pickle, "data.pkl"),
        "not_a_dict": (not_a_dict, "dict"),
        "non_tensor_value": (non_tensor_value, "epoch"),
        "strided": (strided, "strided"),
        "truncated_storage": (truncated_storage, "truncated"),
        "broken_pickle": (broken_pickle, "pickle"),
        "huge_shape": (huge_shape, "beyond its storage"),
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
    # A panic caught inside the reader still prints its message and backtrace: nothing may panic.
    assert "panicked" not in run.stderr, run.stderr


def test_pickle_code_never_runs(tmp_path):
    folder = _bin_copy(TINY / "hf", tmp_path / "evil")
    marker = tmp_path / "pwned"
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state["payload"] = _RunsACommand(marker)
    _write_state(folder, state)
    with pytest.raises(OSError, match="payload"):
        Florence2ForConditionalGeneration.from_pretrained(folder, dtype="float32")
    assert not marker.exists()


@pytest.mark.parametrize("subfolder", ["", "checkpoints/final"])
def test_sharded_bin_repository_downloads_and_loads(hub, tmp_path, subfolder):
    """A Hub repository (test_hub.py's fake Hub) whose weights are PyTorch shards, at its top or in a subfolder."""
    from florence2_rs.hub import resolve_checkpoint

    sharded = _sharded_save(tmp_path / "sharded")
    prefix = f"{subfolder}/" if subfolder else ""
    hub.repos[test_hub.REPO] = {f"{prefix}{p.name}": p.read_bytes() for p in sharded.iterdir() if p.is_file()}
    kwargs = {"subfolder": subfolder} if subfolder else {}
    folder = resolve_checkpoint(test_hub.REPO, **kwargs, **test_hub.MODEL_FILES)
    for shard in sharded.glob("pytorch_model-*.bin"):
        assert (folder / shard.name).read_bytes() == shard.read_bytes()
    inputs = _inputs("hf")
    want = Florence2ForConditionalGeneration.from_pretrained(TINY / "hf", dtype="float32")(**inputs).logits
    got = Florence2ForConditionalGeneration.from_pretrained(test_hub.REPO, dtype="float32", **kwargs)(**inputs).logits
    np.testing.assert_array_equal(got, want)
