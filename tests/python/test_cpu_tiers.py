"""FLORENCE2_CPU_TIER: every kernel tier this CPU has gives the model's results, and no other tier runs.

The variable is read once per process, so the committed tiny checkpoint runs in a subprocess per tier. The
tiers this CPU has come from /proc/cpuinfo, independently of the extension's own detection.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "fixtures" / "tiny"
TIERS = ["scalar", "avx2", "avx512"]
# The flags each tier needs, as /proc/cpuinfo names them.
NEEDS = {"scalar": set(), "avx2": {"avx2", "fma"}, "avx512": {"avx2", "fma", "avx512f", "avx512bw", "avx512vl"}}
# Tiers differ only in rounding (fused multiply-adds, the order of sums): far inside the parity bound.
TIER_BOUND = 1e-5
# The parity bounds against transformers' float32 logits (docs/architecture.md, "How parity is tested").
PARITY_BOUND = {"float32": 1e-4, "bfloat16": 6e-2}

X86_LINUX = sys.platform == "linux" and platform.machine() == "x86_64"
pytestmark = pytest.mark.skipif(not X86_LINUX, reason="the tiers are x86-64's; the flags come from /proc/cpuinfo")

CHILD = """
import sys
import numpy as np
from safetensors.numpy import load_file
import florence2_rs

folder, dtype, out, bits = sys.argv[1:]
ref = load_file(f"{folder}/reference.safetensors")
quantization = {"int8": {"load_in_8bit": True}, "int4": {"load_in_4bit": True}}.get(bits)
model = florence2_rs.Florence2ForConditionalGeneration.from_pretrained(f"{folder}/hf", dtype=dtype,
                                                                       quantization_config=quantization)
inputs = dict(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"], pixel_values=ref["pixel_values"])
logits = model(**inputs, decoder_input_ids=ref["decoder_input_ids"]).logits
ids = model.generate(**inputs, max_new_tokens=12, num_beams=3)
np.savez(out, logits=np.asarray(logits, dtype=np.float32), ids=ids)
"""


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    raise AssertionError("/proc/cpuinfo lists no flags")


def run(tier: str, dtype: str, out: Path, bits: str = "none") -> subprocess.CompletedProcess:
    env = {**os.environ, "FLORENCE2_CPU_TIER": tier}
    return subprocess.run([sys.executable, "-c", CHILD, str(TINY), dtype, str(out), bits], capture_output=True,
                          text=True, timeout=300, env=env, cwd=ROOT)


def max_rel_error(ours, theirs) -> float:
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


HAVE = [tier for tier in TIERS if NEEDS[tier] <= cpu_flags()] if X86_LINUX else []


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def results(request, tmp_path_factory):
    """dtype, {tier: the child's logits and ids} for every tier this CPU has."""
    dtype, folder = request.param, tmp_path_factory.mktemp(request.param)
    outputs = {}
    for tier in HAVE:
        done = run(tier, dtype, folder / f"{tier}.npz")
        assert done.returncode == 0, f"FLORENCE2_CPU_TIER={tier}:\n{done.stderr}"
        outputs[tier] = dict(np.load(folder / f"{tier}.npz"))
    return dtype, outputs


def test_each_tier_agrees_with_transformers_and_the_others(results):
    dtype, outputs = results
    reference = load_file(str(TINY / "reference.safetensors"))["logits"]
    widest = outputs[HAVE[-1]]
    for tier, got in outputs.items():
        vocab = got["logits"].shape[-1]
        assert max_rel_error(got["logits"], reference[..., :vocab]) <= PARITY_BOUND[dtype], tier
        if dtype == "float32":
            assert max_rel_error(got["logits"], widest["logits"]) <= TIER_BOUND, tier
            np.testing.assert_array_equal(got["ids"], widest["ids"], err_msg=tier)


def test_the_variable_changes_the_kernels(results):
    """The baseline kernels round differently from the wide ones (no fused multiply-adds, other sums), so
    bit-identical logits would mean that the forced tier was not used."""
    _, outputs = results
    if len(outputs) < 2:
        pytest.skip("this CPU has the baseline tier only")
    assert not np.array_equal(outputs["scalar"]["logits"], outputs[HAVE[-1]]["logits"])


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized_layers_give_the_same_bits_on_avx2_and_avx512(bits, tmp_path):
    """The AVX2 int8 / int4 kernel computes the AVX512-VNNI kernel's int32 sums and the same float arithmetic
    after them, and float32's other kernels give the same bits at both widths, so a quantized float32 model's
    logits and ids are the same bits on both tiers. (In bfloat16 the unquantized convolutions differ:
    AVX512-BF16 sums each pair of products before adding it.)"""
    dtype = "float32"
    if not {"avx512_vnni"} | NEEDS["avx512"] <= cpu_flags():
        pytest.skip("this CPU has no AVX512-VNNI to compare the AVX2 kernel with")
    outputs = {}
    for tier in ("avx2", "avx512"):
        done = run(tier, dtype, tmp_path / f"{tier}.npz", bits)
        assert done.returncode == 0, f"FLORENCE2_CPU_TIER={tier}:\n{done.stderr}"
        outputs[tier] = dict(np.load(tmp_path / f"{tier}.npz"))
    np.testing.assert_array_equal(outputs["avx2"]["logits"], outputs["avx512"]["logits"])
    np.testing.assert_array_equal(outputs["avx2"]["ids"], outputs["avx512"]["ids"])


@pytest.mark.parametrize("tier", [tier for tier in TIERS if tier not in HAVE])
def test_a_tier_the_cpu_lacks_is_refused(tier, tmp_path):
    done = run(tier, "float32", tmp_path / "out.npz")
    assert done.returncode != 0
    assert f'FLORENCE2_CPU_TIER="{tier}": this CPU runs at most "{HAVE[-1]}"' in done.stderr
    assert "ValueError" in done.stderr and "PanicException" not in done.stderr, "refused at load, not a panic"


def test_an_unknown_tier_is_refused(tmp_path):
    done = run("sse9", "float32", tmp_path / "out.npz")
    assert done.returncode != 0
    assert 'FLORENCE2_CPU_TIER="sse9": expected one of scalar, avx2, avx512' in done.stderr
    assert "ValueError" in done.stderr and "PanicException" not in done.stderr, "refused at load, not a panic"
